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
from edge_vla.artifacts.bundle import HIDDEN_ALL

MS = "com.microsoft"
LLAMA_FAMILY = ("qwen2", "llama", "mistral")


def fused_decoder_unsupported(lm) -> str | None:
    """Why `lm` cannot take the fused graph (None when it can)."""
    c = lm.config
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


def build_fused_decoder(lm, head_weight: np.ndarray, head_bias: np.ndarray | None = None, opset: int = 18,
                        max_positions: int | None = None, all_hidden: bool = False):
    """onnx.ModelProto of `lm`'s decoder + LM head (the form export_full_decoder writes); `all_hidden`
    adds every new position's hidden state as output `hidden_all` (parallel action decoding)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingDependencyError("onnx", "the fused decoder graph", "pip install 'edge-vla[export]'") from None
    c = lm.config
    dec = lm.get_decoder()
    n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    hidden = c.hidden_size
    eps = float(getattr(c, "rms_norm_eps", 1e-6))
    max_positions = max_positions or int(getattr(c, "max_position_embeddings", 4096))

    inits: list = []
    nodes: list = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def w(t):
        return t.detach().float().cpu().numpy()

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0] + "/" + op, domain=domain, **attrs))
        return outs

    # Sequence bookkeeping GroupQueryAttention wants: total length (scalar int32) and seqlens_k
    # (B,) int32 = total - 1 (no padding: every row of the batch has the same length).
    node("Shape", ["inputs_embeds"], ["shape_embeds"])
    node("Shape", ["past_key_0"], ["shape_past"])
    node("Gather", ["shape_embeds", const("c/i0", np.array([0], np.int64))], ["batch"])
    node("Gather", ["shape_embeds", const("c/i1", np.array(1, np.int64))], ["seq"])
    node("Gather", ["shape_past", const("c/i2", np.array(2, np.int64))], ["past_len"])
    node("Add", ["seq", "past_len"], ["total64"])
    node("Cast", ["total64"], ["total_sequence_length"], to=TensorProto.INT32)
    node("Sub", ["total64", const("c/one", np.array(1, np.int64))], ["last_pos"])
    node("Expand", ["last_pos", "batch"], ["seqlens64"])
    node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32)
    cos, sin = _rope_tables(c, head_dim, max_positions)
    const("rope/cos", cos)
    const("rope/sin", sin)

    # First RMSNorm in standard ops (ORT fuses it); later ones are fused with the residual add.
    node("Mul", ["inputs_embeds", "inputs_embeds"], ["l0/sq"])
    node("ReduceMean", ["l0/sq", const("c/axes_last", np.array([-1], np.int64))], ["l0/ms"])
    node("Add", ["l0/ms", const("c/eps", np.array(eps, np.float32))], ["l0/ms_eps"])
    node("Sqrt", ["l0/ms_eps"], ["l0/rms"])
    node("Div", ["inputs_embeds", "l0/rms"], ["l0/normed"])
    node("Mul", ["l0/normed", const("l0/ln_in", w(dec.layers[0].input_layernorm.weight))], ["l0/x"])
    x, residual = "l0/x", "inputs_embeds"

    present = []
    for i, layer in enumerate(dec.layers):
        p = f"l{i}/"
        att, mlp = layer.self_attn, layer.mlp
        if i > 0:
            node("SkipSimplifiedLayerNormalization", [prev_out, residual, const(p + "ln_in", w(layer.input_layernorm.weight))],
                 [p + "x", "", "", p + "res"], domain=MS, epsilon=eps)
            x, residual = p + "x", p + "res"
        qkv_w = np.concatenate([w(att.q_proj.weight), w(att.k_proj.weight), w(att.v_proj.weight)], 0)
        node("MatMul", [x, const(p + "qkv_w", qkv_w.T)], [p + "qkv_mm"])
        qkv = p + "qkv_mm"
        if att.q_proj.bias is not None:
            qkv_b = np.concatenate([w(att.q_proj.bias), w(att.k_proj.bias), w(att.v_proj.bias)], 0)
            qkv = node("Add", [qkv, const(p + "qkv_b", qkv_b)], [p + "qkv"])[0]
        sizes = const(p + "qkv_split", np.array([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], np.int64))
        node("Split", [qkv, sizes], [p + "q", p + "k", p + "v"], axis=-1)
        pk, pv = f"present_key_{i}", f"present_value_{i}"
        node("GroupQueryAttention", [p + "q", p + "k", p + "v", f"past_key_{i}", f"past_value_{i}", "seqlens_k",
                                     "total_sequence_length", "rope/cos", "rope/sin"],
             [p + "attn", pk, pv], domain=MS, num_heads=n_heads, kv_num_heads=n_kv, do_rotary=1,
             rotary_interleaved=0, scale=float(head_dim ** -0.5))
        present += [pk, pv]
        node("MatMul", [p + "attn", const(p + "o_w", w(att.o_proj.weight).T)], [p + "o"])
        node("SkipSimplifiedLayerNormalization", [p + "o", residual, const(p + "ln_post", w(layer.post_attention_layernorm.weight))],
             [p + "x2", "", "", p + "res2"], domain=MS, epsilon=eps)
        residual = p + "res2"
        gu_w = np.concatenate([w(mlp.gate_proj.weight), w(mlp.up_proj.weight)], 0)
        node("MatMul", [p + "x2", const(p + "gate_up_w", gu_w.T)], [p + "gate_up"])
        node("Split", [p + "gate_up", const(p + "gu_split", np.array([mlp.gate_proj.out_features] * 2, np.int64))],
             [p + "gate", p + "up"], axis=-1)
        node("Sigmoid", [p + "gate"], [p + "gate_sig"])
        node("Mul", [p + "gate", p + "gate_sig"], [p + "silu"])
        node("Mul", [p + "silu", p + "up"], [p + "act"])
        prev_out = node("MatMul", [p + "act", const(p + "down_w", w(mlp.down_proj.weight).T)], [p + "down"])[0]

    # The last position only, then the final norm (with the last residual add); every position's
    # final norm too when all_hidden.
    last = const("c/last", np.array([-1], np.int64))
    big = const("c/end", np.array([np.iinfo(np.int64).max], np.int64))
    ax1 = const("c/ax1", np.array([1], np.int64))
    final_norm = const("final_norm", w(dec.norm.weight))
    if all_hidden:
        node("SkipSimplifiedLayerNormalization", [prev_out, residual, final_norm], [HIDDEN_ALL], domain=MS, epsilon=eps)
        node("Slice", [HIDDEN_ALL, last, big, ax1], ["last/normed"])
    else:
        node("Slice", [prev_out, last, big, ax1], ["last/out"])
        node("Slice", [residual, last, big, ax1], ["last/res"])
        node("SkipSimplifiedLayerNormalization", ["last/out", "last/res", final_norm], ["last/normed"], domain=MS,
             epsilon=eps)
    node("Squeeze", ["last/normed", ax1], ["hidden"])
    # A 2-D MatMul (not Gemm): ORT's INT4 MatMulNBits quantizer only rewrites MatMul.
    head = node("MatMul", ["hidden", const("lm_head/w", np.asarray(head_weight, np.float32).T)],
                ["logits" if head_bias is None else "logits_nobias"])[0]
    if head_bias is not None:
        node("Add", [head, const("lm_head/b", np.asarray(head_bias, np.float32))], ["logits"])

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("inputs_embeds", f, ["batch", "seq", hidden])]
    outputs = [helper.make_tensor_value_info("hidden", f, ["batch", hidden]),
               helper.make_tensor_value_info("logits", f, ["batch", int(np.shape(head_weight)[0])])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f, ["batch", n_kv, "past", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f, ["batch", n_kv, "total", head_dim]))
    if all_hidden:
        outputs.append(helper.make_tensor_value_info(HIDDEN_ALL, f, ["batch", "seq", hidden]))
    # onnx's shape inference knows no com.microsoft op: declare their float outputs, or ORT's
    # quantizers (which read the inferred types) refuse the MatMuls that consume them.
    declared = {v.name for v in inputs + outputs}
    typed = [helper.make_tensor_value_info(o, f, None) for n in nodes if n.domain == MS for o in n.output
             if o and o not in declared]
    graph = helper.make_graph(nodes, "fused_decoder", inputs, outputs, initializer=inits, value_info=typed)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="edge-vla fused decoder")
    model.ir_version = 10
    return model


__all__ = ["build_fused_decoder", "fused_decoder_unsupported"]
