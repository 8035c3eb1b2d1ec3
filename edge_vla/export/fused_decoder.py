"""The decoder graph built directly from a Llama/Qwen2-family LM's weights with ONNX Runtime's fused ops.

Same interface as the torch export (edge_vla.export.onnx_export.export_full_decoder): inputs
`inputs_embeds` (B, T, H) and `past_key_i`/`past_value_i` (B, kv, L, d), outputs `hidden`
(B, H) of the last position, `logits` (B, V) and `present_key_i`/`present_value_i`
(B, kv, L+T, d) holding rotated keys, exactly the cache Hugging Face keeps. So the two graphs
are interchangeable in a bundle and parity against PyTorch checks this one like the other.

Why build it by hand: at batch 1 a decode step should cost the weights it reads, but the
dynamo graph of a Qwen2 layer is ~90 small nodes (rotary Slice/Neg/Concat, repeat_kv
Expand/Reshape copies of the whole cache for grouped-query attention, Concat of past and new,
Transpose, a mask built per step): measured on a 136M decoder at 100 tokens of context, those
nodes took ~45% of an INT8 step. Here a layer is

    SkipSimplifiedLayerNorm -> MatMul(QKV fused) [+bias] -> GroupQueryAttention (rotary inside, reads
    the kv heads in place) -> MatMul(o) -> SkipSimplifiedLayerNorm -> MatMul(gate|up fused) -> SiLU*up
    -> MatMul(down)

and fusing Q/K/V and gate/up into one MatMul each makes the INT8/INT4 kernels quantize the
shared activation once and run 4 weight matrices per layer instead of 7.

The com.microsoft ops run in ONNX Runtime (CPU and CUDA); TensorRT has no importer for them, so
exports for TensorRT targets keep the torch-exported graph (`fused_decoder_unsupported`).
"""

from __future__ import annotations

import numpy as np

from edge_vla.errors import MissingDependencyError
from edge_vla.artifacts.bundle import HIDDEN_ALL, PAST_LEN

MS = "com.microsoft"
LLAMA_FAMILY = ("qwen2", "llama", "mistral")


def fused_config_unsupported(c) -> str | None:
    """Why an LM config cannot take the fused graph, from the config alone (None when it can)."""
    if getattr(c, "model_type", None) not in LLAMA_FAMILY:
        return f"model type {getattr(c, 'model_type', None)!r} is not one of {LLAMA_FAMILY}"
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope type {rope.get('rope_type')!r} (only the default rotary embedding is fused)"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation {c.hidden_act!r} (only SiLU-gated MLPs are fused)"
    if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])):
        return "sliding-window layers"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim % 16:
        # ONNX Runtime's fused attention kernels refuse it at session creation.
        return f"head size {head_dim} (ONNX Runtime's fused attention needs a multiple of 16)"
    return None


def fused_decoder_unsupported(lm) -> str | None:
    """Why `lm` cannot take the fused graph (None when it can)."""
    why = fused_config_unsupported(lm.config)
    if why is not None:
        return why
    layer = lm.get_decoder().layers[0]
    if getattr(layer.self_attn.o_proj, "bias", None) is not None or getattr(layer.mlp.down_proj, "bias", None) is not None:
        return "biased o_proj/MLP projections"
    return None


def _rope_tables(config, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    # float32 positions times inv_freq, as transformers computes it (the cache must match it bit for bit-ish).
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class InlineInitializers:
    """Initializers kept in the graph proto (a model under protobuf's 2 GB)."""

    def __init__(self):
        self.tensors: list = []

    def add(self, name: str, array: np.ndarray, data_type: int | None = None, dims=None) -> str:
        from onnx import helper, numpy_helper

        if data_type is None:
            self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        else:  # packed sub-byte data (INT4): raw bytes with the logical dims
            self.tensors.append(helper.make_tensor(name, data_type, list(dims), np.ascontiguousarray(array).tobytes(), True))
        return name


class ExternalInitializers(InlineInitializers):
    """Initializers appended to one external-data file as they are produced: the graph proto holds
    only their names, dtypes, shapes and offsets, so it never holds the weights. Tensors under
    `inline_below` bytes (shape constants, norms of tiny models) stay in the proto."""

    ALIGN = 4096  # page-aligned offsets: ONNX Runtime can map them instead of copying

    def __init__(self, path, inline_below: int = 1024):
        super().__init__()
        from pathlib import Path

        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.inline_below = inline_below
        self.bytes_written = 0

    def add(self, name: str, array: np.ndarray, data_type: int | None = None, dims=None) -> str:
        from onnx import TensorProto, helper

        a = np.ascontiguousarray(array)
        if a.nbytes < self.inline_below:
            return super().add(name, a, data_type, dims)
        pad = -self._f.tell() % self.ALIGN
        self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(memoryview(a).cast("B"))
        t = TensorProto()
        t.name = name
        t.data_type = data_type if data_type is not None else helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(int(d) for d in (dims if dims is not None else a.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.tensors.append(t)
        self.bytes_written = self._f.tell()
        return name

    def close(self) -> None:
        self._f.close()


class ModuleWeights:
    """The float32 numpy weights of a live decoder module by their state-dict names (the in-memory path)."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, name: str) -> np.ndarray:
        return self.decoder.get_parameter(name).detach().float().cpu().numpy()

    def has(self, name: str) -> bool:
        try:
            self.decoder.get_parameter(name)
            return True
        except AttributeError:
            return False


def build_fused_decoder(lm, head_weight: np.ndarray, head_bias: np.ndarray | None = None, opset: int = 18,
                        max_positions: int | None = None, all_hidden: bool = False):
    """onnx.ModelProto of `lm`'s decoder + LM head (the form export_full_decoder writes); `all_hidden`
    adds every new position's hidden state as output `hidden_all` (parallel action decoding)."""
    return build_decoder_graph(lm.config, ModuleWeights(lm.get_decoder()), InlineInitializers(), head_weight=head_weight,
                               head_bias=head_bias, opset=opset, max_positions=max_positions, all_hidden=all_hidden)


def build_decoder_graph(c, weights, sink, bits: int | None = None, layers=None, head_weight=None, head_bias=None,
                        opset: int = 18, max_positions: int | None = None, all_hidden: bool = False,
                        probe: bool = False, on_layer=None):
    """The fused decoder of the LM config `c` from `weights` (decoder state-dict name -> float32 (out, in)
    numpy array, read when the node that needs it is built), initializers through `sink`.

    `bits` 4/8: every weight MatMul becomes MatMulNBits, each weight packed as it is read
    (edge_vla.export.nbits), so neither the float32 graph nor the model is ever whole in memory.
    `head_weight` (V, H): logits inside the graph (the in-memory form, split afterwards); None: the
    decoder body alone (hidden + present_*), what a bundle's decoder.onnx holds.
    `layers`: which layers (default all); `probe`: one layer's graph whose output `layer_out` is the
    residual stream after it (per-layer parity), its cache inputs numbered from 0.
    `on_layer(i)` is called after layer i's nodes are built (progress)."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        raise MissingDependencyError("onnx", "the fused decoder graph", "pip install 'edge-vla[export]'") from None
    from edge_vla.export.nbits import matmul_nbits_node, pack_matmul, weight_kn

    layer_ids = list(range(c.num_hidden_layers) if layers is None else layers)
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    hidden = c.hidden_size
    eps = float(getattr(c, "rms_norm_eps", 1e-6))
    max_positions = max_positions or int(getattr(c, "max_position_embeddings", 4096))
    nodes: list = []

    def const(name, array):
        return sink.add(name, np.ascontiguousarray(array))

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0] + "/" + op, domain=domain, **attrs))
        return outs

    def matmul(x, wname, w_kn, out):
        """x @ w_kn: float MatMul, or MatMulNBits with the weight packed now (names as ORT's quantizer gives them)."""
        if bits is None:
            return node("MatMul", [x, const(wname, w_kn)], [out])[0]
        p = pack_matmul(w_kn, bits)
        names = (sink.add(f"{wname}_Q{bits}", p.data), sink.add(f"{wname}_scales", p.scales))
        nodes.append(matmul_nbits_node(helper, x, names, out, p))
        return out

    def has(name):
        return weights.has(name)

    # Sequence bookkeeping GroupQueryAttention wants: total length (scalar int32) and seqlens_k
    # (B,) int32 = total - 1 (no padding: every row of the batch has the same length). The cache's length
    # is an input (`past_len`), not the past inputs' length: a runtime may bind one preallocated buffer per
    # layer as both past_* and present_*, and GroupQueryAttention then appends the new keys in place
    # instead of clearing the present cache and copying the past into it, once per query head, every step.
    node("Shape", ["inputs_embeds"], ["shape_embeds"])
    node("Gather", ["shape_embeds", const("c/i0", np.array([0], np.int64))], ["batch"])
    node("Gather", ["shape_embeds", const("c/i1", np.array(1, np.int64))], ["seq"])
    node("Add", ["seq", PAST_LEN], ["total64"])
    node("Cast", ["total64"], ["total_sequence_length"], to=TensorProto.INT32)
    node("Sub", ["total64", const("c/one", np.array(1, np.int64))], ["last_pos"])
    node("Expand", ["last_pos", "batch"], ["seqlens64"])
    node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32)
    cos, sin = _rope_tables(c, head_dim, max_positions)
    const("rope/cos", cos)
    const("rope/sin", sin)

    # First RMSNorm in standard ops (ORT fuses it); later ones are fused with the residual add.
    first = f"layers.{layer_ids[0]}."
    node("Mul", ["inputs_embeds", "inputs_embeds"], ["l0/sq"])
    node("ReduceMean", ["l0/sq", const("c/axes_last", np.array([-1], np.int64))], ["l0/ms"])
    node("Add", ["l0/ms", const("c/eps", np.array(eps, np.float32))], ["l0/ms_eps"])
    node("Sqrt", ["l0/ms_eps"], ["l0/rms"])
    node("Div", ["inputs_embeds", "l0/rms"], ["l0/normed"])
    node("Mul", ["l0/normed", const("l0/ln_in", weights(first + "input_layernorm.weight"))], ["l0/x"])
    x, residual = "l0/x", "inputs_embeds"

    present = []
    prev_out = None
    for j, i in enumerate(layer_ids):
        p, src = f"l{j}/", f"layers.{i}."
        if j > 0:
            node("SkipSimplifiedLayerNormalization", [prev_out, residual, const(p + "ln_in", weights(src + "input_layernorm.weight"))],
                 [p + "x", "", "", p + "res"], domain=MS, epsilon=eps)
            x, residual = p + "x", p + "res"
        att = src + "self_attn."
        qkv_w = weight_kn(*(weights(att + f"{n}_proj.weight") for n in "qkv"))
        qkv = matmul(x, p + "qkv_w", qkv_w, p + "qkv_mm")
        del qkv_w
        if has(att + "q_proj.bias"):
            qkv_b = np.concatenate([weights(att + f"{n}_proj.bias") for n in "qkv"], 0)
            qkv = node("Add", [qkv, const(p + "qkv_b", qkv_b)], [p + "qkv"])[0]
        sizes = const(p + "qkv_split", np.array([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], np.int64))
        node("Split", [qkv, sizes], [p + "q", p + "k", p + "v"], axis=-1)
        pk, pv = f"present_key_{j}", f"present_value_{j}"
        node("GroupQueryAttention", [p + "q", p + "k", p + "v", f"past_key_{j}", f"past_value_{j}", "seqlens_k",
                                     "total_sequence_length", "rope/cos", "rope/sin"],
             [p + "attn", pk, pv], domain=MS, num_heads=n_heads, kv_num_heads=n_kv, do_rotary=1,
             rotary_interleaved=0, scale=float(head_dim ** -0.5))
        present += [pk, pv]
        matmul(p + "attn", p + "o_w", weight_kn(weights(att + "o_proj.weight")), p + "o")
        node("SkipSimplifiedLayerNormalization", [p + "o", residual, const(p + "ln_post", weights(src + "post_attention_layernorm.weight"))],
             [p + "x2", "", "", p + "res2"], domain=MS, epsilon=eps)
        residual = p + "res2"
        gu_w = weight_kn(weights(src + "mlp.gate_proj.weight"), weights(src + "mlp.up_proj.weight"))
        n_inter = gu_w.shape[1] // 2
        matmul(p + "x2", p + "gate_up_w", gu_w, p + "gate_up")
        del gu_w
        node("Split", [p + "gate_up", const(p + "gu_split", np.array([n_inter] * 2, np.int64))],
             [p + "gate", p + "up"], axis=-1)
        node("Sigmoid", [p + "gate"], [p + "gate_sig"])
        node("Mul", [p + "gate", p + "gate_sig"], [p + "silu"])
        node("Mul", [p + "silu", p + "up"], [p + "act"])
        prev_out = matmul(p + "act", p + "down_w", weight_kn(weights(src + "mlp.down_proj.weight")), p + "down")
        if on_layer is not None:
            on_layer(i)

    f = TensorProto.FLOAT
    n_graph_layers = len(layer_ids)
    inputs = [helper.make_tensor_value_info("inputs_embeds", f, ["batch", "seq", hidden])]
    outputs = []
    if probe:
        node("Add", [prev_out, residual], [LAYER_OUT])
        outputs.append(helper.make_tensor_value_info(LAYER_OUT, f, ["batch", "seq", hidden]))
    else:
        # The last position only, then the final norm (with the last residual add); every position's
        # final norm too when all_hidden.
        last = const("c/last", np.array([-1], np.int64))
        big = const("c/end", np.array([np.iinfo(np.int64).max], np.int64))
        ax1 = const("c/ax1", np.array([1], np.int64))
        final_norm = const("final_norm", weights("norm.weight"))
        if all_hidden:
            node("SkipSimplifiedLayerNormalization", [prev_out, residual, final_norm], [HIDDEN_ALL], domain=MS, epsilon=eps)
            node("Slice", [HIDDEN_ALL, last, big, ax1], ["last/normed"])
        else:
            node("Slice", [prev_out, last, big, ax1], ["last/out"])
            node("Slice", [residual, last, big, ax1], ["last/res"])
            node("SkipSimplifiedLayerNormalization", ["last/out", "last/res", final_norm], ["last/normed"], domain=MS,
                 epsilon=eps)
        node("Squeeze", ["last/normed", ax1], ["hidden"])
        outputs.append(helper.make_tensor_value_info("hidden", f, ["batch", hidden]))
        if head_weight is not None:
            # A 2-D MatMul (not Gemm): ORT's INT4 MatMulNBits quantizer only rewrites MatMul.
            out = "logits" if head_bias is None else "logits_nobias"
            head = matmul("hidden", "lm_head/w", np.asarray(head_weight, np.float32).T, out)
            if head_bias is not None:
                node("Add", [head, const("lm_head/b", np.asarray(head_bias, np.float32))], ["logits"])
            outputs.append(helper.make_tensor_value_info("logits", f, ["batch", int(np.shape(head_weight)[0])]))
    inputs.append(helper.make_tensor_value_info(PAST_LEN, TensorProto.INT64, [1]))
    for j in range(n_graph_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{j}", f, ["batch", n_kv, "past", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{j}", f, ["batch", n_kv, "total", head_dim]))
    if all_hidden and not probe:
        outputs.append(helper.make_tensor_value_info(HIDDEN_ALL, f, ["batch", "seq", hidden]))
    # onnx's shape inference knows no com.microsoft op: declare their float outputs, or ORT's
    # quantizers (which read the inferred types) refuse the MatMuls that consume them.
    declared = {v.name for v in inputs + outputs}
    typed = [helper.make_tensor_value_info(o, f, None) for n in nodes if n.domain == MS for o in n.output
             if o and o not in declared]
    graph = helper.make_graph(nodes, "fused_decoder", inputs, outputs, initializer=sink.tensors, value_info=typed)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="edge-vla fused decoder")
    model.ir_version = 10
    return model


LAYER_OUT = "layer_out"

__all__ = ["build_fused_decoder", "build_decoder_graph", "fused_decoder_unsupported", "fused_config_unsupported",
           "InlineInitializers", "ExternalInitializers", "ModuleWeights", "LAYER_OUT"]
