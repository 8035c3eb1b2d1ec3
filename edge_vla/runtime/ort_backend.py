"""ONNX Runtime backend: runs a bundle with onnxruntime + numpy + tokenizers only (no torch).

Prefill and decode use the same decoder graph (past length 0 at prefill). A decoder that takes the
cache's length as an input (the fused one: manifest `cache_length`) keeps its KV cache in place: one
numpy buffer per past_* input, bound (IOBinding) as both that input and its present_* output, so that
each step appends its keys and values where they belong instead of having ONNX Runtime clear and
re-copy the whole cache (`KVCache`; buffers grow by doubling). Other decoders (the torch-exported one)
take the cache as a list of numpy arrays fed back as `past_*`. The decoder graph is the body only (hidden state
out): `prefill`/`step` return logits=None and the Policy asks for what it needs from the hidden
state, the full-vocabulary logits (`lm_logits`, lm_head.onnx: free tokens) or the action token
(`action_bin`/`action_logits`, action_head.onnx: 256 rows). `head="full"` makes action tokens go
through the full head too (the comparison `edge-vla bench --compare-head` measures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.artifacts.bundle import HIDDEN_ALL, decoder_feeds
from edge_vla.runtime.policy import bind_bundle

# Positions an in-place cache holds beyond what its prefill needs before it first grows (a direct-mode
# action's remaining tokens; full mode's ~250 reasoning tokens grow it once).
KV_HEADROOM = 64


class KVCache:
    """An in-place KV cache: `buffers` (1, kv, capacity, d) per past_* input, the first `length` positions
    filled. A step returns a new KVCache over the same buffers: an older one stays valid for a step that
    continues from it (it writes from its own length on), but two continuations from one cache cannot both
    be kept."""

    __slots__ = ("buffers", "length", "_bindings")

    def __init__(self, buffers: list, length: int, bindings: dict | None = None):
        self.buffers, self.length = buffers, length
        self._bindings = {} if bindings is None else bindings

    def binding(self, session, past_names, present_names, output: str):
        """The session's IOBinding with these buffers bound as both past_* and present_* and `output` left for
        ONNX Runtime to allocate: made once per set of buffers and output, as binding every cache tensor at
        every step costs a small model more than the copies it saves."""
        io = self._bindings.get(output)
        if io is None:
            import onnxruntime as ort

            io = self._bindings[output] = session.io_binding()
            for past, present, buf in zip(past_names, present_names, self.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buf)  # wraps the numpy memory: ORT writes into it
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            io.bind_output(output)
        return io

    def advanced(self, n: int) -> "KVCache":
        """The same buffers (and bindings) with `n` more positions filled."""
        return KVCache(self.buffers, self.length + n, self._bindings)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def with_room(self, n: int) -> "KVCache":
        """This cache, or a copy in buffers twice as large, holding `n` more positions."""
        need = self.length + n
        if need <= self.capacity:
            return self
        cap = max(need, 2 * self.capacity)
        grown = []
        for b in self.buffers:
            g = np.empty((*b.shape[:2], cap, b.shape[3]), b.dtype)
            g[:, :, :self.length] = b[:, :, :self.length]
            grown.append(g)
        return KVCache(grown, self.length)


class OrtBackend:
    name = "onnxruntime"

    HEADS = ("restricted", "full")

    def __init__(self, bundle, threads: int | None = 1, providers: list[str] | None = None, head: str = "restricted",
                 in_place_kv: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "the ONNX Runtime backend") from None

        if head not in self.HEADS:
            from edge_vla.config import unknown_name_error

            raise unknown_name_error("action head", head, list(self.HEADS))
        self.head = head
        bind_bundle(self, bundle)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise EdgeVLAError(f"onnxruntime here lacks provider(s) {missing}", f"available: {available}")
        self.sessions = {}
        for role in ("prefix", "embed", "decoder", "lm_head", "action_head"):
            try:
                self.sessions[role] = ort.InferenceSession(str(bundle.graph_path(role)), so, providers=providers)
            except Exception as e:
                raise EdgeVLAError(f"onnxruntime cannot load the {role} graph of {bundle.path} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", "re-export the bundle") from None
        dec = bundle.graphs["decoder"]
        self._decoder = dec
        # `in_place_kv=False` feeds the cache back as arrays even where the decoder could keep it in place
        # (the reference the in-place cache is tested and timed against). The buffers are host memory: on
        # CUDA they would have to live on the device (not built: no GPU here to test it), so CUDA feeds.
        self._in_place = (in_place_kv and bool(dec.get("cache_length"))
                          and self.sessions["decoder"].get_providers() == ["CPUExecutionProvider"])
        self._past_names = dec["inputs"][1:]
        outs = [o.name for o in self.sessions["decoder"].get_outputs()]
        self._present_names = [o for o in outs if o.startswith("present")]
        if self.parallel_actions and HIDDEN_ALL not in outs:
            raise EdgeVLAError(f"bundle {bundle.path} decodes actions in parallel but its decoder graph has no "
                               f"`{HIDDEN_ALL}` output", "re-export the checkpoint with this edge-vla")
        self._kv_shape = (dec["n_kv_heads"], dec["head_dim"])
        self._prefix_inputs = bundle.graphs["prefix"]["inputs"]
        self._kv_dtype = np.float16 if "float16" in self.sessions["decoder"].get_inputs()[1].type else np.float32
        self._embed_dtype = np.float16 if "float16" in self.sessions["decoder"].get_inputs()[0].type else np.float32
        self._lm_dtype = np.float16 if "float16" in self.sessions["lm_head"].get_inputs()[0].type else np.float32

    @classmethod
    def load(cls, path: str | Path, **opts):
        from edge_vla.artifacts.bundle import load_bundle

        return cls(load_bundle(path), **opts)

    def encode_prefix(self, pixel_values, state):
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if "state" in self._prefix_inputs:
            if state is None:
                raise EdgeVLAError("this bundle reads the proprio state but none was given", "pass `state`")
            feeds["state"] = np.ascontiguousarray(state, dtype=np.float32)
        return self.sessions["prefix"].run(None, feeds)[0]

    def _embed(self, ids):
        return self.sessions["embed"].run(None, {"input_ids": np.asarray([list(ids)], dtype=np.int64)})[0]

    def _run(self, embeds, cache, n_last=None):
        embeds = embeds.astype(self._embed_dtype, copy=False)
        first = "hidden" if n_last is None else HIDDEN_ALL
        if self._in_place:
            hidden, cache = self._run_in_place(embeds, cache, first)
        else:
            hidden, *cache = self.sessions["decoder"].run([first, *self._present_names],
                                                          decoder_feeds(self._decoder, embeds, cache))
        hidden = hidden[0] if n_last is None else hidden[0, -n_last:]
        return hidden.astype(np.float32), None, cache

    def _run_in_place(self, embeds, cache: KVCache, first: str):
        n = embeds.shape[1]
        cache = cache.with_room(n)
        io = cache.binding(self.sessions["decoder"], self._past_names, self._present_names, first)
        io.bind_cpu_input(self._decoder["inputs"][0], np.ascontiguousarray(embeds))
        io.bind_cpu_input(self._decoder["cache_length"], np.array([cache.length], np.int64))
        self.sessions["decoder"].run_with_iobinding(io)
        hidden = io.get_outputs()[-1].numpy()  # the one output ORT allocated (bound last)
        return hidden, cache.advanced(n)

    def _empty_cache(self, n: int):
        n_kv, head_dim = self._kv_shape
        if not self._in_place:
            return [np.zeros((1, n_kv, 0, head_dim), dtype=self._kv_dtype)] * len(self._past_names)
        return KVCache([np.empty((1, n_kv, n + KV_HEADROOM, head_dim), dtype=self._kv_dtype)
                        for _ in self._past_names], 0)

    def prefill(self, prefix, input_ids, n_last: int | None = None):
        """(hidden (H,), None, cache) of the last position; with `n_last` (a parallel-decoding bundle),
        the hidden states of the last n_last positions (n_last, H)."""
        embeds = np.concatenate([prefix.astype(np.float32), self._embed(input_ids).astype(np.float32)], axis=1)
        return self._run(embeds, self._empty_cache(embeds.shape[1]), n_last)

    def step(self, token_ids, cache, n_last: int | None = None):
        return self._run(self._embed(token_ids), cache, n_last)

    def lm_logits(self, hidden) -> np.ndarray:
        """(V,) full-vocabulary logits of one hidden state (lm_head.onnx)."""
        feed = {"hidden": np.asarray(hidden, np.float32)[None].astype(self._lm_dtype, copy=False)}
        return self.sessions["lm_head"].run(None, feed)[0][0].astype(np.float32)

    def action_logits(self, hidden, logits):
        """(n_bins,) logits of the action tokens: from the restricted head, or sliced from the full one."""
        if logits is not None:
            return np.asarray(logits)[self._lo:self._hi]
        if self.head == "full":
            return self.lm_logits(hidden)[self._lo:self._hi]
        return self.sessions["action_head"].run(["action_logits"], self._action_feed(hidden, 0))[0][0]

    @property
    def has_fused_action_head(self) -> bool:
        return self.head == "restricted"

    def _action_feed(self, hidden, dim: int) -> dict:
        return {"hidden": np.asarray(hidden, np.float32)[None], "dim": np.asarray([dim], np.int64)}

    def action_bin(self, hidden, dim: int) -> int:
        """Bin of one action token from the fused head graph (reads only the 256 action rows)."""
        return int(self.sessions["action_head"].run(["bins"], self._action_feed(hidden, dim))[0][0])

    def action_bins(self, hidden, dims) -> np.ndarray:
        """Bins of n action tokens (hidden (n, H), dims (n,)) in one run of the fused head graph."""
        feed = {"hidden": np.asarray(hidden, np.float32), "dim": np.asarray(dims, np.int64)}
        return self.sessions["action_head"].run(["bins"], feed)[0].astype(np.int64)
