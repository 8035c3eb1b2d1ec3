"""TensorRT backend for `Policy`: the bundle's engines on a Jetson/CUDA GPU, KV cache kept on the device.

NOT YET RUN ON ANY HARDWARE: TensorRT and pycuda cannot be installed in this workplace
(docs/facts.md) and no GPU was lent to the task that wrote it. It follows the TensorRT
10 Python API (named tensors, `set_tensor_address`, `execute_async_v3`) and is kept thin so the
first run on a board is easy to debug. What it does:

- engines from `edge-vla build-engine`, each checked against this machine's TensorRT version
  and GPU (`check_engine_record`) and refit from the ONNX graph when the plan is weight-stripped;
- device buffers allocated once with pycuda at the largest shapes the profiles allow;
- the prefix engine's output is copied device-to-device to the start of the decoder's
  `inputs_embeds` buffer and the embed engine writes right after it: prefill copies nothing
  through the host;
- the KV cache lives in two device buffer sets (past, present) that swap after each step: the
  decoder reads one and writes the other, no cache bytes cross to the host. A cache handle from
  an older step is refused (it has been overwritten);
- the decoder engine is the bundle's decoder body (no LM head): per step only `hidden` (H floats)
  comes back to the host. The full-vocabulary logits come from the separate lm_head engine, run
  only when the Policy asks (`lm_logits`: free reasoning tokens). Action tokens are decoded by
  the fused action-decode CUDA kernel (edge_vla.kernels.cuda_loader, through the Policy's
  `has_fused_action_head`/`action_bin` hook) from the bundle's action_head.onnx tables when
  torch is present, else greedily from the action rows of the lm_head engine's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.runtime.policy import bind_bundle


ENGINE_DIR = "engines"
# One engine per graph the backend runs through TensorRT. The action head is not among them: the
# fused CUDA kernel (edge_vla.kernels) decodes action tokens from its tables.
ROLES = ("prefix", "embed", "decoder", "lm_head")


def import_tensorrt():
    """The tensorrt module, or one clear line saying why it is not usable here."""
    try:
        import tensorrt as trt  # noqa: F401
    except (ImportError, OSError) as e:
        raise MissingDependencyError(
            "tensorrt", "building and running TensorRT engines",
            "run this on the target: JetPack ships TensorRT (python3-libnvinfer); on a CUDA machine "
            f"pip install tensorrt from NVIDIA's index ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
        ) from None
    return trt


def gpu_identity() -> dict:
    """{"name", "compute_capability"} of GPU 0, through pycuda (the runtime's CUDA binding) or torch."""
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (the primary context torch and the kernels share)
        import pycuda.driver as cuda

        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    raise MissingDependencyError("pycuda", "identifying the GPU an engine is built for",
                                 "install pycuda on the target (pip install pycuda, needs the CUDA toolkit)")


def check_engine_record(record: dict, tensorrt_version: str, gpu: dict) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU (plans are not portable)."""
    built_v, built_gpu = record.get("tensorrt_version"), record.get("gpu", {})
    where = f"engine {record.get('file', '?')}"
    if built_v != tensorrt_version:
        raise EdgeVLAError(f"{where} was built with TensorRT {built_v}, this machine has {tensorrt_version}",
                           "rebuild it here: edge-vla build-engine BUNDLE")
    if (built_gpu.get("name"), built_gpu.get("compute_capability")) != (gpu.get("name"), gpu.get("compute_capability")):
        raise EdgeVLAError(f"{where} was built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), "
                           f"this GPU is {gpu.get('name')} (sm {gpu.get('compute_capability')})",
                           "rebuild it here: edge-vla build-engine BUNDLE")


def _import_pycuda():
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (GPU 0's primary context, shared with torch and the kernels)
        import pycuda.driver as cuda
    except ImportError:
        raise MissingDependencyError("pycuda", "the TensorRT backend",
                                     "pip install pycuda on the target (it builds against the CUDA toolkit)") from None
    return cuda


def action_head_tables(bundle) -> dict:
    """weight (n_bins, H), bias | None: the action-token rows of the LM head, read from the bundle's
    action-head graph; values (n_bins, D), low, high (D,): the bins' env-unit table from the bundle's
    action statistics (the ActionTokenizer's de-normalisation). The fused CUDA kernel's inputs."""
    import onnx
    from onnx import numpy_helper

    from edge_vla.kernels.reference import action_value_table
    from edge_vla.tokens.action import ActionTokenizer

    graph = onnx.load(str(bundle.graph_path("action_head"))).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    tok = bundle.tokenizer()
    values, low, high = action_value_table(ActionTokenizer(bundle.action_stats, tok.first_action_id, tok.n_bins))
    return {"weight": inits["action_head/weight_t"].T, "bias": inits.get("action_head/bias"),
            "values": values, "low": low, "high": high}


@dataclass
class DeviceCache:
    """Handle to the KV cache on the device: which buffer set holds it, how long it is, which step made it."""

    length: int
    generation: int


class _Engine:
    """One deserialized engine with its execution context and named tensors."""

    def __init__(self, trt, runtime, logger, plan: bytes, onnx_path: Path, stripped: bool, role: str):
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EdgeVLAError(f"TensorRT could not deserialize the {role} engine", "rebuild it: edge-vla build-engine BUNDLE")
        if stripped:
            refitter = trt.Refitter(engine, logger)
            if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
                raise EdgeVLAError(f"refitting the weight-stripped {role} engine from {onnx_path.name} failed",
                                   "rebuild the engine from this bundle")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.profile = -1

    def use_profile(self, index: int, stream) -> None:
        if index != self.profile and self.engine.num_optimization_profiles > index:
            self.context.set_optimization_profile_async(index, stream.handle)
            self.profile = index

    def run(self, shapes: dict, addresses: dict, stream) -> dict:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(s) for s in shape)):
                raise EdgeVLAError(f"input {name} shape {tuple(shape)} is outside the engine's profiles",
                                   "rebuild the engines with larger --max-free-tokens")
        for name, ptr in addresses.items():
            self.context.set_tensor_address(name, int(ptr))
        if not self.context.execute_async_v3(stream.handle):
            raise EdgeVLAError("TensorRT execution failed (see the TensorRT log)")
        return {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle, max_total_tokens: int | None = None):
        if bundle.config.parallel_actions:
            raise EdgeVLAError(f"bundle {bundle.path} decodes actions in parallel, which the TensorRT backend does "
                               "not run yet", "use the onnxruntime backend (CUDA or CPU) for this bundle")
        trt = import_tensorrt()
        cuda = _import_pycuda()
        self._cuda = cuda
        engines = bundle.manifest.get("engines") or {}
        missing = [r for r in ROLES if r not in engines]
        if missing:
            raise EdgeVLAError(f"bundle {bundle.path} has no TensorRT engine for {missing}",
                               "build them on this machine: edge-vla build-engine BUNDLE")
        gpu = gpu_identity()
        for role in ROLES:
            check_engine_record(engines[role], trt.__version__, gpu)
        bind_bundle(self, bundle)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        # A weight-stripped plan is refit from the graph it was built from (the TensorRT-prepared one).
        self.engines = {role: _Engine(trt, runtime, logger, (bundle.path / engines[role]["file"]).read_bytes(),
                                      bundle.path / engines[role].get("graph", bundle.graphs[role]["file"]),
                                      engines[role].get("weights_stripped", False), role)
                        for role in ROLES}
        self.stream = cuda.Stream()

        dec_graph = bundle.graphs["decoder"]
        self._past = dec_graph["inputs"][1:]
        self._present = [n for n in dec_graph["outputs"] if n.startswith("present_")]
        self._n_kv, self._head_dim, self._hidden = dec_graph["n_kv_heads"], dec_graph["head_dim"], dec_graph["hidden_size"]
        profiles = engines["decoder"]["profiles"]
        # The longest cache the engine accepts: max of `past` over the profiles, plus one step.
        max_past = max(p[self._past[0]][2][2] for p in profiles)
        self.max_total = int(max_total_tokens or max_past + 8)
        self._prefix_tokens = None
        dec = self.engines["decoder"]
        self._kv_dtype = dec.dtypes[self._past[0]]
        self._embed_dtype = dec.dtypes["inputs_embeds"]
        kv_bytes = self._n_kv * self.max_total * self._head_dim * self._kv_dtype.itemsize
        # Two full buffer sets; set `self._cur` holds the cache, the other receives `present`.
        self._kv = [[cuda.mem_alloc(kv_bytes) for _ in self._past] for _ in range(2)]
        self._cur, self._generation, self._length = 0, 0, 0
        for role, name in (("prefix", "prefix_embeds"), ("embed", "token_embeds")):
            if self.engines[role].dtypes[name] != self._embed_dtype:
                raise EdgeVLAError(f"the {role} engine writes {self.engines[role].dtypes[name]} embeddings, the decoder "
                                   f"reads {self._embed_dtype}", "re-export the bundle (graph I/O types must agree)")
        row_bytes = self._hidden * self._embed_dtype.itemsize
        self._embeds = cuda.mem_alloc(self.max_total * row_bytes)
        # The prefix embeddings stay in their own buffer: decode steps reuse the start of _embeds, and
        # adaptive mode prefills twice from one prefix.
        self._prefix_buf = cuda.mem_alloc(self.max_total * row_bytes)
        self._row_bytes = row_bytes
        # The LM head's rows, which a released model pads past its tokenizer (OpenVLA: 32064 vs 32001).
        vocab = int(bundle.config.lm.get("vocab_size") or self.processor.tokenizer.vocab_size)
        self._host_hidden = cuda.pagelocked_empty(self._hidden, dec.dtypes["hidden"])
        self._dev_hidden = cuda.mem_alloc(self._host_hidden.nbytes)
        head = self.engines["lm_head"]
        self._head_in = cuda.pagelocked_empty(self._hidden, head.dtypes["hidden"])
        self._dev_head_in = cuda.mem_alloc(self._head_in.nbytes)
        self._host_logits = cuda.pagelocked_empty(vocab, head.dtypes["logits"])
        self._dev_logits = cuda.mem_alloc(self._host_logits.nbytes)
        self._ids = cuda.mem_alloc(self.max_total * 8)
        self._pixels = self._state = None
        self._prefix_inputs = bundle.graphs["prefix"]["inputs"]
        self._fused = self._load_fused_head(bundle)

    @classmethod
    def load(cls, path: str | Path, **opts):
        from edge_vla.artifacts.bundle import load_bundle

        return cls(load_bundle(path), **opts)

    # --- the Backend protocol ----------------------------------------------------------------------
    def encode_prefix(self, pixel_values, state):
        cuda, eng = self._cuda, self.engines["prefix"]
        pv = np.ascontiguousarray(pixel_values, dtype=eng.dtypes["pixel_values"])
        if self._pixels is None:
            self._pixels = cuda.mem_alloc(pv.nbytes)
        cuda.memcpy_htod_async(self._pixels, pv, self.stream)
        shapes, addresses = {"pixel_values": pv.shape}, {"pixel_values": self._pixels}
        if "state" in self._prefix_inputs:
            if state is None:
                raise EdgeVLAError("this bundle reads the proprio state but none was given", "pass `state`")
            st = np.ascontiguousarray(state, dtype=eng.dtypes["state"])
            if self._state is None:
                self._state = cuda.mem_alloc(st.nbytes)
            cuda.memcpy_htod_async(self._state, st, self.stream)
            shapes["state"], addresses["state"] = st.shape, self._state
        eng.use_profile(0, self.stream)
        out = eng.run(shapes, {**addresses, "prefix_embeds": self._prefix_buf}, self.stream)
        self._prefix_tokens = int(out["prefix_embeds"][1])
        return self._prefix_tokens

    def _embed_into(self, ids: list[int], offset_tokens: int, profile: int) -> None:
        cuda, eng = self._cuda, self.engines["embed"]
        arr = np.asarray([list(ids)], dtype=eng.dtypes["input_ids"])
        cuda.memcpy_htod_async(self._ids, arr, self.stream)
        eng.use_profile(profile, self.stream)
        dst = int(self._embeds) + offset_tokens * self._row_bytes
        eng.run({"input_ids": arr.shape}, {"input_ids": self._ids, "token_embeds": dst}, self.stream)

    def _decode(self, n_new: int, profile: int):
        cuda, eng = self._cuda, self.engines["decoder"]
        if self._length + n_new > self.max_total:
            raise EdgeVLAError(f"the sequence would reach {self._length + n_new} tokens, the engines hold {self.max_total}",
                               "lower max_free_tokens or rebuild the engines with a larger --max-free-tokens")
        eng.use_profile(profile, self.stream)
        past_shape = (1, self._n_kv, self._length, self._head_dim)
        shapes = {"inputs_embeds": (1, n_new, self._hidden), **{n: past_shape for n in self._past}}
        addresses = {"inputs_embeds": self._embeds, "hidden": self._dev_hidden}
        nxt = 1 - self._cur
        addresses.update(zip(self._past, self._kv[self._cur]))
        addresses.update(zip(self._present, self._kv[nxt]))
        eng.run(shapes, addresses, self.stream)
        cuda.memcpy_dtoh_async(self._host_hidden, self._dev_hidden, self.stream)
        self.stream.synchronize()
        self._cur, self._length = nxt, self._length + n_new
        self._generation += 1
        # No logits: the head is a separate engine, run only when the Policy needs them (lm_logits).
        return self._host_hidden.astype(np.float32), None, DeviceCache(self._length, self._generation)

    def prefill(self, prefix, input_ids):
        if prefix != self._prefix_tokens:
            raise EdgeVLAError("prefill got a prefix handle from another call", "call encode_prefix right before prefill")
        self._length = 0
        self._cuda.memcpy_dtod_async(self._embeds, self._prefix_buf, prefix * self._row_bytes, self.stream)
        self._embed_into(input_ids, prefix, profile=0)
        return self._decode(prefix + len(input_ids), profile=0)

    def step(self, token_ids, cache: DeviceCache):
        if cache.generation != self._generation:
            raise EdgeVLAError("this KV cache handle is stale (a later step overwrote it on the device)",
                               "continue from the cache the last prefill/step returned")
        self._embed_into(token_ids, 0, profile=1)
        return self._decode(len(token_ids), profile=1)

    def lm_logits(self, hidden) -> np.ndarray:
        """(V,) full-vocabulary logits of one hidden state through the lm_head engine."""
        cuda, eng = self._cuda, self.engines["lm_head"]
        self._head_in[:] = np.asarray(hidden, dtype=np.float32)
        cuda.memcpy_htod_async(self._dev_head_in, self._head_in, self.stream)
        eng.use_profile(0, self.stream)
        eng.run({"hidden": (1, self._hidden)}, {"hidden": self._dev_head_in, "logits": self._dev_logits}, self.stream)
        cuda.memcpy_dtoh_async(self._host_logits, self._dev_logits, self.stream)
        self.stream.synchronize()
        return self._host_logits.astype(np.float32)

    def action_logits(self, hidden, logits):
        return (logits if logits is not None else self.lm_logits(hidden))[self._lo:self._hi]

    # --- fused action decode on the device (Policy's has_fused_action_head / action_bin hook) -----
    def _load_fused_head(self, bundle):
        """The action-head tables of the bundle's action_head graph as CUDA tensors, or None.

        The CUDA kernel (edge_vla.kernels.cuda_loader) takes torch CUDA tensors; without torch the
        Policy falls back to the action rows of the lm_head engine's logits.
        """
        if "action_head" not in bundle.graphs:
            return None
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        tables = action_head_tables(bundle)
        return {k: None if v is None else torch.as_tensor(np.ascontiguousarray(v), device="cuda")
                for k, v in tables.items()}

    @property
    def has_fused_action_head(self) -> bool:
        return self._fused is not None

    def action_bin(self, hidden, dim: int) -> int:
        """Bin of one action token from the fused CUDA kernel (reads only the action rows of the head)."""
        import torch

        from edge_vla.kernels.cuda_loader import decode_actions_cuda

        f = self._fused
        h = torch.as_tensor(np.asarray(hidden, np.float32), device="cuda")[None]
        bins, _ = decode_actions_cuda(h, f["weight"], torch.tensor([dim], device="cuda"), f["values"], f["low"],
                                      f["high"], f["bias"], loader="pycuda")
        return int(bins[0])
