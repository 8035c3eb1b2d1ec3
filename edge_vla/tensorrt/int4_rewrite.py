"""ONNX Runtime's INT4 contrib ops rewritten into the forms TensorRT's ONNX parser takes.

Shared by the lint (which must see what the builder will parse) and the engine build.
"""

from __future__ import annotations

from edge_vla.errors import EdgeVLAError


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unpack_uint4(packed, count: int):
    """Two 4-bit values per byte, low nibble first (ONNX Runtime's MatMulNBits layout)."""
    import numpy as np

    b = np.asarray(packed, dtype=np.uint8)
    out = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    return out[..., :count]


def prepare_for_tensorrt(model):
    """Rewrite ONNX Runtime's INT4 contrib ops into forms TensorRT's parser takes. Returns (model, notes).

    - com.microsoft MatMulNBits (4-bit, symmetric, no g_idx) -> DequantizeLinear(int4 weights,
      block_size, axis 0) + MatMul: TensorRT 10's weight-only INT4 GEMM path, same numbers;
    - com.microsoft GatherBlockQuantized (the INT4 embedding) -> a float embedding dequantized
      here + Gather: TensorRT has no INT4 Gather, so the table costs float16/32 bytes there.
    The graph's default opset is raised to 21 (INT4 and blocked DequantizeLinear).
    """
    import copy

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    notes, new_nodes, drop = [], [], set()
    for node in g.node:
        if node.domain != "com.microsoft" or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            new_nodes.append(node)
            continue
        a = _attrs(node)
        label = node.name or node.op_type
        ins = list(node.input) + [""] * 6
        if node.op_type == "MatMulNBits":
            k, n, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
            if bits != 4 or ins[3] or ins[4] or ins[1] not in inits or ins[2] not in inits:
                raise EdgeVLAError(f"{label}: only symmetric 4-bit MatMulNBits with constant weights converts to "
                                   "TensorRT INT4", "export --fp16 for this target")
            scales = numpy_helper.to_array(inits[ins[2]])
            n_blocks = -(-k // block)
            q = _unpack_uint4(numpy_helper.to_array(inits[ins[1]]).reshape(n, -1), n_blocks * block)[:, :k]
            signed = q.astype(np.int8) - 8  # no zero_points input: ONNX Runtime's implicit zero point is 8
            w_name, s_name = f"{label}/int4_weight", f"{label}/int4_scale"
            g.initializer.append(helper.make_tensor(w_name, TensorProto.INT4, [k, n], signed.T.ravel().tolist()))
            g.initializer.append(numpy_helper.from_array(scales.reshape(n, n_blocks).T.copy(), s_name))
            wd = f"{label}/weight"
            out = node.output[0] if not ins[5] else f"{label}/matmul"
            new_nodes.append(helper.make_node("DequantizeLinear", [w_name, s_name], [wd], name=f"{label}/dq",
                                              axis=0, block_size=block))
            new_nodes.append(helper.make_node("MatMul", [ins[0], wd], [out], name=f"{label}/matmul"))
            if ins[5]:
                new_nodes.append(helper.make_node("Add", [out, ins[5]], [node.output[0]], name=f"{label}/bias"))
            drop.update([ins[1], ins[2]])
        else:
            data, idx, sc = ins[0], ins[1], ins[2]
            if ins[3] or data not in inits or sc not in inits or a.get("quantize_axis", 1) != 1 or a.get("gather_axis", 0) != 0:
                raise EdgeVLAError(f"{label}: only a symmetric row-blocked GatherBlockQuantized converts",
                                   "export --fp16 for this target")
            block = a["block_size"]
            d = inits[data]
            if d.data_type == TensorProto.INT4:
                q = numpy_helper.to_array(d).astype(np.float32)
            else:  # packed uint8, implicit zero point 8
                q = _unpack_uint4(numpy_helper.to_array(d), d.dims[-1] * 2).astype(np.float32) - 8
            scales = numpy_helper.to_array(inits[sc])
            table = (q * np.repeat(scales.astype(np.float32), block, axis=1)[:, : q.shape[1]]).astype(scales.dtype)
            t_name = f"{label}/table"
            g.initializer.append(numpy_helper.from_array(table, t_name))
            new_nodes.append(helper.make_node("Gather", [t_name, idx], list(node.output), name=f"{label}/gather", axis=0))
            drop.update([data, sc])
            notes.append(f"{label}: INT4 embedding dequantized to {table.dtype} (TensorRT has no INT4 Gather)")
    if not drop:
        return model, notes
    del g.node[:]
    g.node.extend(new_nodes)
    still_used = {i for nd in g.node for i in nd.input}
    keep = [i for i in g.initializer if i.name not in drop or i.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 21:
            op.version = 21
    if not any(nd.domain == "com.microsoft" for nd in g.node):
        keep_ops = [op for op in m.opset_import if op.domain != "com.microsoft"]
        del m.opset_import[:]
        m.opset_import.extend(keep_ops)
    m.ir_version = max(m.ir_version, 10)
    onnx.checker.check_model(m)
    return m, notes
