"""`edge-vla export` of a model too large to hold: weights streamed from the shards, graphs written as built.

The in-memory export (edge_vla.export.steps) loads the VLA in float32, exports fp32 ONNX graphs
and quantizes each whole graph: ~4 bytes per parameter several times over, 28 GB for the
weights alone at OpenVLA-7B's size. Here nothing holds the model:

    source     the checkpoint's tensors by name, memory-mapped, read one at a time in their stored
               dtype (a released OpenVLA-layout directory: edge_vla.model.importers.RenamedWeights;
               an edge-vla checkpoint: its model.safetensors)
    prefix     the vision towers + projector alone (~0.7B at OpenVLA's size) as a torch module, exported
               by the torch path in float32, then quantized whole like any small graph
    embed, lm_head, action_head   one table at a time (0.5 GB in float32 at 32064 x 4096)
    decoder    the fused graph (edge_vla.export.fused_decoder) built layer by layer: each weight read,
               converted to float32, packed to MatMulNBits (edge_vla.export.nbits) and appended to
               decoder.onnx.data before the next is read
    parity     per layer: each decoder layer's fused graph in float32 against transformers' own layer
               on the same weights (refused on failure), and the quantized layer's error;
               the prefix graph against the torch module; the whole bundle against a STREAMED PyTorch
               reference (layer i read from the shards, the sequence run through it, dropped),
               teacher-forced on the bundle's own action tokens
    write      the bundle, atomically, as every export (edge_vla.artifacts.bundle.write_bundle)

When: `edge-vla export` streams a checkpoint with more than STREAM_ABOVE_PARAMS parameters
(`--streaming` forces it, `--no-streaming` refuses it), for ONNX Runtime targets and the
precisions the packer makes (int4, int8, fp32).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vla.artifacts.bundle import PAST_LEN
from edge_vla.errors import EdgeVLAError

# Above ~2B parameters the in-memory export no longer fits this 23 GB machine: the float32 model
# (8 GB), its ONNX graphs and their quantized copies are held at once (measured: a 541M import
# peaked at 3.4 GB; the export of a 0.5B model at ~4x its float32 bytes).
STREAM_ABOVE_PARAMS = 2_000_000_000
STREAM_BITS = {"int4": 4, "int8": 8, "fp32": None}
ROLES = ("prefix", "embed", "decoder", "lm_head", "action_head")
LAYER_PROBE_TOKENS = 8


# --- the source: tensors by name, read on access --------------------------------------------------------


@dataclass
class Source:
    """A checkpoint read without its weights: config, tokenizer, statistics, recipe, and its tensors
    by edge-vla state-dict name (a Mapping with shape(), dtype() and rows(), read on access)."""

    path: Path
    kind: str  # "released" or "edge-vla"
    config: object
    tokenizer: object
    stats: object
    recipe_info: dict
    weights: object

    @property
    def n_params(self) -> int:
        return sum(math.prod(self.weights.shape(k)) for k in self.weights)


def open_source(ckpt_dir, on_read=None) -> Source:
    """The checkpoint at `ckpt_dir` (a released OpenVLA-layout directory or an edge-vla checkpoint)."""
    from edge_vla.artifacts.checkpoint import RECIPE_FILE, STATS_FILE, TOKENIZER_DIR, WEIGHTS_FILE, load_config
    from edge_vla.model.importers import ShardedTensors, is_released_layout, read_released
    from edge_vla.tokens.action import ActionStats
    from edge_vla.tokens.text import TextTokenizer

    p = Path(ckpt_dir)
    if is_released_layout(p):
        r = read_released(p, lazy=True)
        if on_read is not None:
            r.weights.sd.on_read = on_read
        return Source(p, "released", r.config, r.tokenizer, r.stats, r.recipe_info, r.weights)
    config = load_config(p)
    stats = ActionStats.load(p / STATS_FILE) if (p / STATS_FILE).exists() else None
    recipe = json.loads((p / RECIPE_FILE).read_text()) if (p / RECIPE_FILE).exists() else {}
    weights = ShardedTensors(p, {WEIGHTS_FILE: p / WEIGHTS_FILE}, on_read)
    if config.lm.get("tie_word_embeddings", False):
        # safetensors saves a tied pair once, under either name (MiniVLA's Qwen2.5: the head's).
        emb, head = "lm.model.embed_tokens.weight", "lm.lm_head.weight"
        for name, stored in ((emb, head), (head, emb)):
            if name not in weights and stored in weights:
                weights.alias(name, stored)
    return Source(p, "edge-vla", config, TextTokenizer.load(p / TOKENIZER_DIR), stats, recipe, weights)


def checkpoint_params(ckpt_dir) -> int | None:
    """Parameters of the checkpoint at `ckpt_dir` from its safetensors headers (None when unreadable:
    the in-memory path then says what is wrong)."""
    from edge_vla.model.importers import is_released_layout, read_safetensors

    p = Path(ckpt_dir)
    try:
        if not (is_released_layout(p) or (p / "model.safetensors").is_file()):
            return None
        sd = read_safetensors(p)
        return sum(math.prod(sd.shape(k)) for k in sd)
    except EdgeVLAError:
        return None


def streaming_unsupported(config, target: str, precisions: dict) -> str | None:
    """Why the streaming export cannot make this bundle (None when it can)."""
    from edge_vla.deploy.targets import get_target
    from edge_vla.export.fused_decoder import fused_config_unsupported
    from edge_vla.model.vla import hf_config

    if get_target(target).uses_tensorrt:
        return f"target {target} builds TensorRT engines, which parse the torch-exported decoder, not the fused one"
    why = fused_config_unsupported(hf_config(config.lm, "language model"))
    if why:
        return f"its language model cannot take the fused decoder graph ({why})"
    if config.parallel_actions:
        return "it decodes actions in parallel (the streamed reference checks one token at a time)"
    bad = {r: p for r, p in precisions.items() if r in ("embed", "decoder", "lm_head") and p not in STREAM_BITS}
    if bad:
        return f"precision {sorted(set(bad.values()))[0]} is not packed weight by weight (int4, int8, fp32 are)"
    return None


class DecoderWeights:
    """Decoder state-dict name -> float32 numpy array, read from the source when called.

    Records what it hands out: `reads` (names, in order) and `max_live_bytes`, the largest total of
    arrays it returned that were still alive when it read the next one (weak references: what the
    builder still held). The tests assert with it that the export never holds more than a layer."""

    def __init__(self, weights, prefix: str = "lm.model."):
        self.weights, self.prefix = weights, prefix
        self.reads: list[str] = []
        self.max_live_bytes = 0
        self._live: list = []

    def __call__(self, name: str) -> np.ndarray:
        self._live = [(r, n) for r, n in self._live if r() is not None]
        self.max_live_bytes = max(self.max_live_bytes, sum(n for _, n in self._live))
        a = self.weights[self.prefix + name].float().numpy()
        self.reads.append(name)
        self._live.append((weakref.ref(a), a.nbytes))
        return a

    def has(self, name: str) -> bool:
        return self.prefix + name in self.weights


class ArrayWeights:
    """The same interface over arrays already read (one layer, for the per-layer probes)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def __call__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def has(self, name: str) -> bool:
        return name in self.arrays


def _f32(t) -> np.ndarray:
    return t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)


# --- graphs ------------------------------------------------------------------------------------------------


def _save(model, path: Path) -> None:
    import onnx

    # The weights are already in the side file (ExternalInitializers): only the proto is written.
    onnx.save(model, str(path))


def write_decoder(src: Source, lm_cfg, out: Path, bits: int | None, report, accessor: DecoderWeights | None = None) -> dict:
    """decoder.onnx + decoder.onnx.data, built layer by layer from the source."""
    from edge_vla.export.fused_decoder import ExternalInitializers, build_decoder_graph
    from edge_vla.export.onnx_export import DECODER_GRAPH, kv_names, kv_shape

    acc = accessor or DecoderWeights(src.weights)
    sink = ExternalInitializers(out / (DECODER_GRAPH + ".data"))
    n_layers, n_kv, hd = kv_shape(lm_cfg)
    with _progress(f"decoder layers ({'fp32' if bits is None else f'int{bits}'})", n_layers) as advance:
        try:
            model = build_decoder_graph(lm_cfg, acc, sink, bits=bits, on_layer=lambda i: advance())
        finally:
            sink.close()
    _save(model, out / DECODER_GRAPH)
    report(f"decoder: {n_layers} layers, {sink.bytes_written / 1e9:.2f} GB of weights written as built")
    return {"file": DECODER_GRAPH, "outputs": [o.name for o in model.graph.output],
            "inputs": ["inputs_embeds", *kv_names(n_layers, "past")], "n_layers": n_layers, "n_kv_heads": n_kv,
            "head_dim": hd, "hidden_size": lm_cfg.hidden_size, "form": "onnxruntime-fused", "built": "streaming",
            "cache_length": PAST_LEN}


def _graph(nodes, inputs, outputs, sink, name: str, ms: bool = False):
    from onnx import helper

    from edge_vla.export.onnx_export import OPSET

    g = helper.make_graph(nodes, name, inputs, outputs, initializer=sink.tensors)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    m = helper.make_model(g, opset_imports=opsets, producer_name="edge-vla streaming export")
    m.ir_version = 10
    return m


def write_embed(table: np.ndarray, out: Path, bits: int | None) -> dict:
    """embed.onnx: input_ids (B, T) -> token_embeds (B, T, H); INT4 GatherBlockQuantized, INT8 uint8 table +
    DequantizeLinear, as the whole-graph quantizers leave the torch-exported Gather."""
    from onnx import TensorProto, helper

    from edge_vla.export.fused_decoder import ExternalInitializers
    from edge_vla.export.nbits import pack_gather_int4, pack_gather_int8
    from edge_vla.export.onnx_export import EMBED_GRAPH

    sink = ExternalInitializers(out / (EMBED_GRAPH + ".data"))
    name = "embed.weight"  # the torch-exported graph's name: both paths give the same initializers
    if bits == 4:
        data, scales, block = pack_gather_int4(table)
        ins = [sink.add(name + "_Q4", data, TensorProto.INT4, table.shape), "input_ids", sink.add(name + "_scales", scales)]
        nodes = [helper.make_node("GatherBlockQuantized", ins, ["token_embeds"], name="embed/gather", domain="com.microsoft",
                                  gather_axis=0, quantize_axis=1, block_size=block)]
    elif bits == 8:
        q, scale, zp = pack_gather_int8(table)
        nodes = [helper.make_node("Gather", [sink.add(name + "_quantized", q), "input_ids"], ["embed/q"], name="embed/gather"),
                 helper.make_node("DequantizeLinear", ["embed/q", sink.add(name + "_scale", scale),
                                                       sink.add(name + "_zero_point", zp)], ["token_embeds"],
                                  name="embed/dequantize")]
    else:
        nodes = [helper.make_node("Gather", [sink.add(name, table), "input_ids"], ["token_embeds"], name="embed/gather")]
    sink.close()
    f = TensorProto.FLOAT
    m = _graph(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
               [helper.make_tensor_value_info("token_embeds", f, ["batch", "seq", int(table.shape[1])])], sink, "embed",
               ms=bits == 4)
    _save(m, out / EMBED_GRAPH)
    return {"file": EMBED_GRAPH, "inputs": ["input_ids"], "outputs": ["token_embeds"]}


def write_lm_head(weight: np.ndarray, bias, out: Path, bits: int | None) -> dict:
    """lm_head.onnx: hidden (B, H) -> logits (B, V), the head split_lm_head makes, packed as it is built."""
    from onnx import TensorProto, helper

    from edge_vla.export.fused_decoder import ExternalInitializers
    from edge_vla.export.nbits import matmul_nbits_node, pack_matmul, weight_kn
    from edge_vla.export.onnx_export import LM_HEAD_GRAPH

    sink = ExternalInitializers(out / (LM_HEAD_GRAPH + ".data"))
    mm_out = "lm_head/logits" if bias is not None else "logits"
    wt = weight_kn(weight)
    if bits is None:
        nodes = [helper.make_node("MatMul", ["hidden", sink.add("lm_head/weight_t", wt)], [mm_out], name="lm_head/matmul")]
    else:
        p = pack_matmul(wt, bits)
        names = (sink.add(f"lm_head/weight_t_Q{bits}", p.data), sink.add("lm_head/weight_t_scales", p.scales))
        nodes = [matmul_nbits_node(helper, "hidden", names, mm_out, p)]
    del wt
    if bias is not None:
        nodes.append(helper.make_node("Add", [mm_out, sink.add("lm_head/bias", np.asarray(bias, np.float32))], ["logits"],
                                      name="lm_head/add_bias"))
    sink.close()
    f = TensorProto.FLOAT
    m = _graph(nodes, [helper.make_tensor_value_info("hidden", f, ["batch", int(weight.shape[1])])],
               [helper.make_tensor_value_info("logits", f, ["batch", int(weight.shape[0])])], sink, "lm_head",
               ms=bits is not None)
    _save(m, out / LM_HEAD_GRAPH)
    return {"file": LM_HEAD_GRAPH, "inputs": ["hidden"], "outputs": ["logits"]}


# --- the vision prefix, without the language model ---------------------------------------------------------


def vision_prefix(src: Source):
    """The torch module prefix.onnx is exported from: vision towers, projector, camera embedding,
    proprio, the first prefix row; float32, built from the source's tensors only (no LM)."""
    import torch
    from accelerate import init_empty_weights
    from torch import nn

    from edge_vla.model.vla import VLA, build_vision_tower

    cfg, w = src.config, src.weights
    l_hidden = int(cfg.lm["hidden_size"])

    class VisionPrefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = cfg
            self.vision = build_vision_tower(cfg)
            v_hidden = self.vision.config.hidden_size
            if cfg.projector == "mlp":
                self.projector = nn.Sequential(nn.Linear(v_hidden, cfg.projector_hidden), nn.GELU(),
                                               nn.Linear(cfg.projector_hidden, l_hidden))
            else:
                from edge_vla.model.prismatic import PrismaticProjector

                self.projector = PrismaticProjector(cfg.projector, v_hidden, l_hidden)
            self.proprio = nn.Linear(cfg.proprio_dim, l_hidden) if cfg.use_proprio else None
            self.camera_embed = nn.Parameter(torch.zeros(len(cfg.cameras), l_hidden))
            self.first_token_embed = nn.Parameter(torch.zeros(1, l_hidden)) if cfg.image_after_bos else None

        def forward(self, pixel_values, state=None):
            # VLA.encode_prefix reads only these attributes: the one definition of the prefix.
            return VLA.encode_prefix(self, pixel_values, state)

    with init_empty_weights(include_buffers=False):
        m = VisionPrefix()
    own = {k for k, _ in m.named_parameters()}
    sd = {k: w[k].float() for k in own if k in w}
    if "camera_embed" not in sd:  # a released model has none (zero), as VLA.from_released sets it
        sd["camera_embed"] = torch.zeros(len(cfg.cameras), l_hidden)
    if m.first_token_embed is not None and "first_token_embed" not in sd:
        bos = src.tokenizer.bos_id
        sd["first_token_embed"] = w.rows("lm.model.embed_tokens.weight", bos, bos + 1).float()
    missing = sorted(own - set(sd))
    if missing:
        raise EdgeVLAError(f"the weights of {src.path} lack {missing[0]} (and {len(missing) - 1} more)",
                           "download every shard, and the config.json of the same release")
    try:
        m.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise EdgeVLAError(f"the vision weights of {src.path} do not fit its config ({str(e).splitlines()[-1].strip()[:200]})",
                           "download the config and the weights of the same release") from None
    return m.float().eval()


# --- the PyTorch reference, one layer at a time -------------------------------------------------------------


class StreamedLM:
    """transformers' own decoder layer, final norm and rotary embedding for the LM config, run one layer
    at a time with weights from the source: a reference forward that never holds more than a layer."""

    def __init__(self, src: Source, lm_cfg):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.src, self.cfg = src, lm_cfg
        with init_empty_weights(include_buffers=False):
            lm = AutoModelForCausalLM.from_config(lm_cfg)
        dec = lm.get_decoder()
        self.layer = dec.layers[0].to_empty(device="cpu").float().eval()
        self.norm = dec.norm.to_empty(device="cpu").float().eval()
        self.rotary = dec.rotary_emb
        self.keys = [k for k, _ in self.layer.named_parameters()]
        self.torch = torch

    def layer_arrays(self, i: int) -> dict:
        """Layer i's float32 weights under their decoder state-dict names (layers.i.*)."""
        return {f"layers.{i}.{k}": _f32(self.src.weights[f"lm.model.layers.{i}.{k}"]) for k in self.keys}

    def load_layer(self, arrays: dict, i: int) -> None:
        torch = self.torch
        self.layer.load_state_dict({k: torch.from_numpy(arrays[f"layers.{i}.{k}"]) for k in self.keys}, strict=True)

    def run_layer(self, x):
        """The loaded layer over a whole sequence x (1, T, H) from position 0, causally masked."""
        torch = self.torch
        t = x.shape[1]
        pos = torch.arange(t)[None]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        with torch.no_grad():
            out = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=self.rotary(x, pos))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Final-norm hidden states (T, H) of the sequence `embeds` (1, T, H): every layer read, run, dropped."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(embeds, np.float32))
        n = self.cfg.num_hidden_layers
        with _progress("streamed PyTorch reference", n) as advance:
            for i in range(n):
                self.load_layer(self.layer_arrays(i), i)
                x = self.run_layer(x)
                advance()
        self.norm.load_state_dict({"weight": torch.from_numpy(_f32(self.src.weights["lm.model.norm.weight"]))})
        with torch.no_grad():
            return self.norm(x)[0].numpy()


def check_layers(src: Source, lm_cfg, layers, bits: int | None, atol: float, report) -> dict:
    """Each decoder layer's fused graph against transformers' layer on the same float32 weights.

    fp32 graph vs PyTorch: the graph's structure (attention, rotary, norms, fused QKV/gate-up) —
    refused beyond atol + atol * |scale|. The quantized layer (`bits`): the relative error and
    cosine of the layer's update (output - input) against PyTorch's: what quantization costs, per layer."""
    import onnxruntime as ort
    import torch

    from edge_vla.export.fused_decoder import LAYER_OUT, InlineInitializers, build_decoder_graph

    ref = StreamedLM(src, lm_cfg)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    n_kv = getattr(lm_cfg, "num_key_value_heads", None) or lm_cfg.num_attention_heads
    hd = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
    rng = np.random.default_rng(0)
    rows, worst, scale = [], 0.0, 0.0
    with _progress("per-layer parity", len(layers)) as advance:
        for i in layers:
            arrays = ref.layer_arrays(i)
            ref.load_layer(arrays, i)
            x = rng.standard_normal((1, LAYER_PROBE_TOKENS, lm_cfg.hidden_size)).astype(np.float32)
            want = ref.run_layer(torch.from_numpy(x)).numpy()
            empty = np.zeros((1, n_kv, 0, hd), np.float32)
            feeds = {"inputs_embeds": x, "past_key_0": empty, "past_value_0": empty, PAST_LEN: np.zeros(1, np.int64)}
            row = {"layer": i}
            for tag, b in (("fp32", None), ("quantized", bits)):
                if tag == "quantized" and b is None:
                    continue
                g = build_decoder_graph(lm_cfg, ArrayWeights(arrays), InlineInitializers(), bits=b, layers=[i], probe=True)
                got = ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                    [LAYER_OUT], feeds)[0]
                del g
                if tag == "fp32":
                    row["max_diff"] = float(np.abs(got - want).max())
                    worst, scale = max(worst, row["max_diff"]), max(scale, float(np.abs(want).max()))
                else:
                    du, dr = (got - x).ravel().astype(np.float64), (want - x).ravel().astype(np.float64)
                    row["update_rel_err"] = float(np.linalg.norm(du - dr) / max(np.linalg.norm(dr), 1e-30))
                    row["update_cosine"] = float(du @ dr / max(np.linalg.norm(du) * np.linalg.norm(dr), 1e-30))
            del arrays
            rows.append(row)
            advance()
    passed = worst <= atol + atol * scale
    q = [r for r in rows if "update_cosine" in r]
    report(f"per-layer parity ({len(rows)} of {lm_cfg.num_hidden_layers} layers): fused fp32 graph vs PyTorch max diff "
           f"{worst:.2e} (scale {scale:.1f})" + (f"; int{bits} layer update cosine >= "
                                                 f"{min(r['update_cosine'] for r in q):.4f}, relative error <= "
                                                 f"{max(r['update_rel_err'] for r in q):.3f}" if q else ""))
    if not passed:
        raise EdgeVLAError(f"the fused decoder layers disagree with PyTorch (max diff {worst:.2e} at scale {scale:.1f}); "
                           "no bundle written", "report the model config; the graphs are not trustworthy")
    return {"layers": rows, "max_diff": worst, "scale": scale, "passed": bool(passed)}


def check_whole(src: Source, lm_cfg, bundle_dir: Path, manifest: dict, observations, ref_prefixes, atol: float,
                exact: bool, report) -> dict:
    """The bundle against the streamed PyTorch reference on `observations`, teacher-forced on the bundle's
    own action tokens: per action position the 256 action logits, the greedy bin, and the de-normalised
    action (cosine, max error), as the in-memory export's parity reports them. `exact` (fp32 graphs):
    refused beyond atol; quantized bundles report the quantization's effect against PyTorch."""
    from edge_vla.artifacts.bundle import Bundle
    from edge_vla.export import accuracy as acc
    from edge_vla.kernels.reference import action_head_rows
    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import Policy

    backend = OrtBackend(Bundle(bundle_dir, {**manifest, "files": {}}))
    policy = Policy(backend, mode="direct")
    tok = src.tokenizer
    head = _f32(src.weights[_head_name(src)])
    bias = _f32(src.weights["lm.lm_head.bias"]) if "lm.lm_head.bias" in src.weights else None
    rows_w, rows_b = action_head_rows(head, tok.first_action_id, tok.n_bins, bias)
    del head
    lm = StreamedLM(src, lm_cfg)
    worst, scale, agree, total, ref_actions, test_actions = 0.0, 0.0, 0, 0, [], []
    for obs, prefix in zip(observations, ref_prefixes):
        pv, state, prompt = policy._inputs(obs)
        forced = list(policy.inference_prefix_ids)
        # The bundle's greedy direct decode (the policy's, spelled out to keep each step's 256 action
        # logits: one pass of the bundle instead of two at 7B).
        h, _, cache = backend.prefill(backend.encode_prefix(pv, state), prompt + forced)
        got, ids = [], []
        for j in range(policy.n_action_tokens):
            got.append(np.asarray(backend.action_logits(h, None), np.float64))
            ids.append(tok.first_action_id + int(got[-1].argmax()))
            if j + 1 < policy.n_action_tokens:
                h, _, cache = backend.step([ids[-1]], cache)
        seq = prompt + forced + ids[:-1]
        emb = np.concatenate([_f32(src.weights.rows("lm.model.embed_tokens.weight", t, t + 1)) for t in seq])
        hidden = lm.forward(np.concatenate([prefix[0], emb])[None])[-len(ids):]
        want = hidden @ rows_w.T + (0 if rows_b is None else rows_b)
        got = np.stack(got)
        worst, scale = max(worst, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
        ref_ids = [tok.first_action_id + int(b) for b in want.argmax(-1)]
        agree += sum(int(a == b) for a, b in zip(ref_ids, ids))
        total += len(ids)
        ref_actions.append(policy.action_tokenizer.decode(np.asarray(ref_ids)))
        test_actions.append(policy.action_tokenizer.decode(np.asarray(ids)))
    out = {"max_action_logit_diff": worst, "logit_scale": scale, "action_bin_agreement": agree / max(total, 1),
           "n_tokens": total, "n_observations": len(observations), "reference": "streamed PyTorch (float32), teacher-forced"}
    out.update(acc.action_similarity(ref_actions, test_actions))
    out["passed"] = bool(not exact or (worst <= atol + atol * scale and out["action_bin_agreement"] == 1.0))
    report(f"whole-graph parity vs a streamed PyTorch reference ({len(observations)} observation(s)): max action-logit "
           f"diff {worst:.2e} (scale {scale:.2f}), teacher-forced action-token agreement "
           f"{100 * out['action_bin_agreement']:.1f}% over {total} tokens, action cosine {out['action_cosine']:.6f}, "
           f"max action error {out['action_max_abs_err']:.2e}")
    if not out["passed"]:
        raise EdgeVLAError(f"the exported graphs disagree with PyTorch (max action-logit diff {worst:.2e}, token agreement "
                           f"{100 * out['action_bin_agreement']:.1f}%); no bundle written",
                           "report the model config; the graphs are not trustworthy")
    return out


def _head_name(src: Source) -> str:
    tied = bool(src.config.lm.get("tie_word_embeddings", False))
    return "lm.model.embed_tokens.weight" if tied or "lm.lm_head.weight" not in src.weights else "lm.lm_head.weight"


def parity_layers(n_layers: int, large: bool) -> list[int]:
    """Every layer of a small model; of a large one the first two, the middle and the last (each check
    builds the layer's graph twice and a session: ~10 s a layer at 7B)."""
    if not large:
        return list(range(n_layers))
    return sorted({0, 1, n_layers // 2, n_layers - 1})


class _progress:
    """A rich progress bar over `total` steps (transient; silent where there is no terminal)."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total

    def __enter__(self):
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True, disable=not sys.stderr.isatty())
        self.p.__enter__()
        task = self.p.add_task(self.what, total=self.total)
        return lambda: self.p.advance(task)

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)


# --- the export ----------------------------------------------------------------------------------------------


def export_bundle_streaming(src: Source, ckpt_dir, out_dir, precision: str, precisions: dict, target: str,
                            parity_obs: list, held_out: list, min_action_agreement, parity_atol: float, report,
                            overwrite: bool, inputs: list, decoder_accessor: DecoderWeights | None = None,
                            extra_manifest: dict | None = None) -> Path:
    """The streaming export of the opened checkpoint `src` to a bundle at `out_dir`: edge_vla.export.steps
    passes what it decided (each graph's precision, the parity and held-out observations, the inputs never
    replaced). `decoder_accessor`: an instrumented accessor (tests).
    `extra_manifest`: what steps decided that the manifest records (its int8 MatMul form and why)."""
    from types import SimpleNamespace

    from edge_vla import __version__
    from edge_vla.artifacts.bundle import TOKENIZER_DIR, write_bundle
    from edge_vla.deploy.memory_fit import check_export_fits
    from edge_vla.environment import environment_report
    from edge_vla.export.onnx_export import ACTION_HEAD_GRAPH, export_prefix, write_action_head
    from edge_vla.export.quantize import quantize_graph
    from edge_vla.io import clean_staging, jsonable
    from edge_vla.kernels.reference import action_head_rows
    from edge_vla.model.vla import hf_config
    from edge_vla.tensorrt.lint import lint_for_target

    from edge_vla import notices

    notices.silence("torch.onnx._internal.exporter._registration")
    out = Path(out_dir)
    cfg = src.config
    if src.stats is None:
        raise EdgeVLAError(f"checkpoint {ckpt_dir} has no action_stats.json", "train it on a dataset first")
    lm_cfg = hf_config(cfg.lm, "language model")
    # Memory fit first: sized from the config, it refuses a board the model cannot fit before anything is read.
    memory_fit = check_export_fits(SimpleNamespace(config=cfg, recipe_info=src.recipe_info), precision, target, report)
    why = streaming_unsupported(cfg, target, precisions)
    if why:
        raise EdgeVLAError(f"checkpoint {ckpt_dir} cannot be exported by streaming: {why}",
                           "export it in memory (--no-streaming) where it fits, or pick --int4/--int8 and target cpu")
    n_params = src.n_params
    large = n_params > STREAM_ABOVE_PARAMS
    report(f"streaming export of {ckpt_dir} ({n_params / 1e9:.2f}B parameters, {src.kind} layout): weights read "
           "from the shards one tensor at a time")
    whole_obs = held_out[:1] if large else held_out

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_staging(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.export.pid{os.getpid()}.") as work:
        fp32_dir, final = Path(work) / "fp32", Path(work) / "final"
        fp32_dir.mkdir()
        final.mkdir()
        graphs: dict = {}

        # 1. prefix: the vision-only module, exported in float32 and checked against itself in torch.
        report("exporting the vision prefix (towers + projector, float32) ...")
        prefix_mod = vision_prefix(src)
        # The renamed vision tensors (a released layout's, in its dtype) are in the module now.
        getattr(src.weights, "vision", {}).clear()
        from edge_vla.model.processor import VLAProcessor
        import torch

        proc = VLAProcessor(cfg, src.tokenizer)
        pvs = [torch.from_numpy(proc.images(o["images"])[None]) for o in whole_obs]
        states = [torch.from_numpy(proc.state(o.get("state"))[None]) if cfg.use_proprio else None for o in whole_obs]
        with torch.no_grad():
            ref_prefixes = [prefix_mod(pv, st).numpy() for pv, st in zip(pvs, states)]
        graphs["prefix"] = export_prefix(prefix_mod, cfg, cfg.use_proprio, fp32_dir)
        del prefix_mod
        _trim()
        prefix_parity = _check_prefix(fp32_dir / graphs["prefix"]["file"], pvs, states, ref_prefixes, parity_atol, report)
        report(f"quantizing prefix graph to {precisions['prefix']} ...")
        quantize_graph(fp32_dir / graphs["prefix"]["file"], final / graphs["prefix"]["file"], precisions["prefix"])
        shutil.rmtree(fp32_dir)
        _trim()

        # 2. embedding, LM head, action head: one table at a time.
        table = _f32(src.weights["lm.model.embed_tokens.weight"])
        graphs["embed"] = write_embed(table, final, STREAM_BITS[precisions["embed"]])
        del table
        head = _f32(src.weights[_head_name(src)])
        bias = _f32(src.weights["lm.lm_head.bias"]) if "lm.lm_head.bias" in src.weights else None
        graphs["lm_head"] = write_lm_head(head, bias, final, STREAM_BITS[precisions["lm_head"]])
        tok = src.tokenizer
        rows_w, rows_b = action_head_rows(head, tok.first_action_id, tok.n_bins, bias)
        del head
        graphs["action_head"] = write_action_head(rows_w, rows_b, tok.n_bins, final / ACTION_HEAD_GRAPH)
        report("embedding, LM head and action head written")

        # 3. the decoder, layer by layer.
        graphs["decoder"] = write_decoder(src, lm_cfg, final, STREAM_BITS[precisions["decoder"]], report, decoder_accessor)
        tok.save(final / TOKENIZER_DIR)
        _trim()
        for role, g in graphs.items():
            g["precision"] = precisions[role]

        # 4. parity: per layer, then the whole bundle against the streamed reference.
        layers = check_layers(src, lm_cfg, parity_layers(lm_cfg.num_hidden_layers, large),
                              STREAM_BITS[precisions["decoder"]], parity_atol, report)
        manifest = {"edge_vla_version": __version__, "source_checkpoint": str(Path(ckpt_dir).resolve()),
                    "model_config": cfg.to_dict(), "action_stats": src.stats.to_dict(),
                    "recipe": dict(src.recipe_info or {}), "target": target, "graphs": graphs}
        exact = all(precisions[r] == "fp32" for r in ("embed", "decoder", "lm_head", "prefix"))
        whole = check_whole(src, lm_cfg, final, manifest, whole_obs, ref_prefixes, parity_atol, exact, report)
        if min_action_agreement is not None and whole["action_bin_agreement"] < min_action_agreement:
            raise EdgeVLAError(f"teacher-forced action-token agreement with PyTorch {whole['action_bin_agreement']:.3f} "
                               f"is below --min-agreement {min_action_agreement}; no bundle written",
                               "use a wider precision (--int8) or lower the floor")
        parity = {"passed": True, "streamed": True, "prefix": prefix_parity, "per_layer": layers, "whole_graph": whole,
                  "token_agreement": whole["action_bin_agreement"], "action_bin_agreement": whole["action_bin_agreement"],
                  "action_cosine": whole["action_cosine"], "action_max_abs_err": whole["action_max_abs_err"],
                  "max_logit_diff": layers["max_diff"]}
        manifest.update(precision=precision, parity=parity, memory_fit=memory_fit, accuracy=None,
                        tensorrt_lint=lint_for_target(final, graphs, cfg, target, report),
                        streaming={"params": n_params, "source_layout": src.kind,
                                   "decoder_bytes": sum(f.stat().st_size for f in final.glob("decoder.onnx*"))})
        manifest.update(extra_manifest or {})
        manifest["environment"] = environment_report()
        bundle = write_bundle(out, final, jsonable(manifest), overwrite=overwrite,
                              inputs=inputs)
    report(f"wrote {out} ({bundle.size_bytes / 1e6:.2f} MB)")
    return out


def _trim() -> None:
    """Hand the heap the vision stage freed back to the system (glibc keeps it otherwise, and the
    decoder stage would start on top of it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_prefix(path: Path, pvs, states, refs, atol: float, report) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    worst, scale = 0.0, 0.0
    for pv, st, ref in zip(pvs, states, refs):
        feeds = {"pixel_values": pv.numpy()}
        if "state" in names:
            feeds["state"] = st.numpy()
        got = s.run(None, feeds)[0]
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    del s
    passed = worst <= atol + atol * scale
    report(f"prefix graph vs PyTorch: max diff {worst:.2e} (scale {scale:.2f})")
    if not passed:
        raise EdgeVLAError(f"the prefix graph disagrees with PyTorch (max diff {worst:.2e}); no bundle written",
                           "report the model config; the graphs are not trustworthy")
    return {"max_diff": worst, "scale": scale, "passed": True}


__all__ = ["export_bundle_streaming", "open_source", "checkpoint_params", "streaming_unsupported", "DecoderWeights",
           "StreamedLM", "check_layers", "check_whole", "STREAM_ABOVE_PARAMS"]
