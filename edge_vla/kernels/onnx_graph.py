"""The fused action-decode op as a plain ONNX graph (standard ops only).

    hidden (N, H) float32, dim (N,) int64
      -> MatMul(W^T) [-> Add(bias)] -> ArgMax(axis=-1, select_last_index=0)   = bins (N,) int64
      -> Gather(values_flat, bins * D + dim) -> Max(low[dim]) -> Min(high[dim]) = actions (N,) float32

Only standard ops, so ONNX Runtime runs it on CPU and TensorRT builds it on the target without
a plugin. `build_action_head_graph` makes the standalone graph a bundle ships next to the
decoder; `append_action_head` merges the same nodes into a decoder graph (and can drop the
decoder's full-vocabulary logits so the 152k-row head is never computed in direct mode).

Stable API (the export/bundle code calls it):
    build_action_head_graph(weight, values, low, high, bias=None, opset=18, batched=False,
                            hidden_name="hidden", dim_name="dim", bins_name="bins",
                            actions_name="actions") -> onnx.ModelProto
    append_action_head(decoder, hidden_output_name, weight, values, low, high, bias=None, ...)
                            -> onnx.ModelProto
    split_lm_head(decoder, head_weight, bias=None) -> (body, head) onnx.ModelProto pair
"""

from __future__ import annotations

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.kernels.reference import check_shapes

DEFAULT_OPSET = 18
PRODUCER = "edge-vla action head"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("onnx", "the ONNX action-head graph", "pip install 'edge-vla[export]'") from None
    return onnx


def _head_nodes(onnx, weight, values, low, high, bias, hidden: str, dim: str, bins: str, actions: str | None,
                prefix: str):
    """Nodes and initializers of the op, names prefixed so they merge into any graph.

    `actions=None` builds the restricted head alone (bins; no value table): what a bundle runs,
    since the Policy de-normalises every backend's bins with the one ActionTokenizer."""
    from onnx import helper, numpy_helper

    w = np.asarray(weight, dtype=np.float32)
    if actions is not None:
        values = np.asarray(values, dtype=np.float32)
        low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        check_shapes((1, w.shape[1]), w.shape, (1,), values.shape, low.shape, high.shape,
                     None if bias is None else np.shape(bias))
        if np.any(low > high):
            raise EdgeVLAError("a clip bound has low > high", "pass low <= high per action dimension")
    elif w.ndim != 2 or (bias is not None and np.shape(bias) != (w.shape[0],)):
        raise EdgeVLAError(f"action-head weight {w.shape} / bias {np.shape(bias) if bias is not None else None} "
                           "do not fit (n_bins, H) / (n_bins,)", "pass the action-token rows of the LM head")
    n = lambda s: f"{prefix}{s}"  # noqa: E731
    # Stored transposed (H, n_bins) so MatMul needs no Transpose and works for any batch rank.
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), n("weight_t"))]
    logits = n("logits")
    nodes = [helper.make_node("MatMul", [hidden, n("weight_t")], [logits], name=n("matmul"))]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), n("bias")))
        nodes.append(helper.make_node("Add", [logits, n("bias")], [n("logits_b")], name=n("add_bias")))
        logits = n("logits_b")
    # select_last_index=0: ties go to the lowest bin, as in every other implementation.
    nodes.append(helper.make_node("ArgMax", [logits], [bins], name=n("argmax"), axis=-1, keepdims=0,
                                  select_last_index=0))
    if actions is None:
        return nodes, inits
    inits += [
        numpy_helper.from_array(values.reshape(-1), n("values_flat")),
        numpy_helper.from_array(np.array(values.shape[1], dtype=np.int64), n("action_dim")),
        numpy_helper.from_array(low, n("low")),
        numpy_helper.from_array(high, n("high")),
    ]
    nodes += [
        helper.make_node("Mul", [bins, n("action_dim")], [n("row_base")], name=n("mul")),
        helper.make_node("Add", [n("row_base"), dim], [n("flat_index")], name=n("add_index")),
        helper.make_node("Gather", [n("values_flat"), n("flat_index")], [n("value")], name=n("gather_value"), axis=0),
        helper.make_node("Gather", [n("low"), dim], [n("low_row")], name=n("gather_low"), axis=0),
        helper.make_node("Gather", [n("high"), dim], [n("high_row")], name=n("gather_high"), axis=0),
        # min(max(v, low), high): Clip takes only scalar bounds, these are per row.
        helper.make_node("Max", [n("value"), n("low_row")], [n("value_lo")], name=n("clip_low")),
        helper.make_node("Min", [n("value_lo"), n("high_row")], [actions], name=n("clip_high")),
    ]
    return nodes, inits


def build_action_head_graph(weight, values, low, high, bias=None, opset: int = DEFAULT_OPSET, batched: bool = False,
                            hidden_name: str = "hidden", dim_name: str = "dim", bins_name: str = "bins",
                            actions_name: str | None = "actions"):
    """Standalone graph: inputs `hidden` (N, H) float32 and `dim` (N,) int64 (or (B, T, H) and (B, T)
    with batched=True); outputs `bins` int64 and `actions` float32 of the leading shape. N is dynamic.
    `actions_name=None`: bins only (values, low, high unused; `dim` is still an input, so a bundle's
    graph keeps one interface whether or not it de-normalises)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    if opset < 13:
        raise EdgeVLAError(f"opset {opset} is too old for the action head", "use opset 13 or newer")
    h = int(np.shape(weight)[1])
    lead = ["batch", "tokens"] if batched else ["rows"]
    nodes, inits = _head_nodes(onnx, weight, values, low, high, bias, hidden_name, dim_name, bins_name,
                               actions_name, prefix="action_head/")
    graph = helper.make_graph(
        nodes, "action_head",
        inputs=[helper.make_tensor_value_info(hidden_name, TensorProto.FLOAT, [*lead, h]),
                helper.make_tensor_value_info(dim_name, TensorProto.INT64, lead)],
        outputs=[helper.make_tensor_value_info(bins_name, TensorProto.INT64, lead)]
        + ([helper.make_tensor_value_info(actions_name, TensorProto.FLOAT, lead)] if actions_name else []),
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.20
    onnx.checker.check_model(model)
    return model


def append_action_head(decoder, hidden_output_name: str, weight, values, low, high, bias=None,
                       dim_input_name: str = "action_dim", bins_name: str = "action_bins",
                       actions_name: str = "actions", drop_outputs: tuple[str, ...] = (),
                       prefix: str = "action_head/"):
    """Return a copy of `decoder` (onnx.ModelProto) with the action head fed by its output
    `hidden_output_name` ((B, H) or (B, T, H)): a new int64 input `dim_input_name` of the hidden's
    leading shape, new outputs `bins_name` and `actions_name`. Outputs named in `drop_outputs`
    (e.g. the full-vocabulary "logits") are removed together with every node that only they
    needed, so the direct-mode graph never computes the full LM head.

    A decoder loaded with `onnx.load(path, load_external_data=False)` stays light: the copy refers
    to the same weight file by relative path, so save it in the same directory. The ONNX checker
    runs here on self-contained models under 2 GB; for the others check the saved file by path
    (`onnx.checker.check_model(path)`).
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(decoder)
    g = out.graph
    outputs = {o.name: o for o in g.output}
    if hidden_output_name not in outputs:
        raise EdgeVLAError(f"the decoder graph has no output {hidden_output_name!r} (outputs: {sorted(outputs)[:8]})",
                           "export the decoder with its last hidden state as an output")
    unknown = [o for o in drop_outputs if o not in outputs or o == hidden_output_name]
    if unknown:
        raise EdgeVLAError(f"cannot drop outputs {unknown} of the decoder graph", "name outputs the decoder has, "
                           "other than the hidden state")
    taken = {i.name for i in g.input} | set(outputs)
    for name in (dim_input_name, bins_name, actions_name):
        if name in taken:
            raise EdgeVLAError(f"the decoder graph already has an input or output {name!r}", "choose another name")
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 13:
        raise EdgeVLAError(f"the decoder graph uses default-domain opset {opset}", "export it with opset 13 or newer")

    hid_type = outputs[hidden_output_name].type.tensor_type
    dims = list(hid_type.shape.dim)
    if len(dims) < 2:
        raise EdgeVLAError(f"decoder output {hidden_output_name!r} has rank {len(dims)}, expected (B, H) or (B, T, H)")
    lead = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in dims[:-1]]
    nodes, inits = _head_nodes(onnx, weight, values, low, high, bias, hidden_output_name, dim_input_name,
                               bins_name, actions_name, prefix)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.append(helper.make_tensor_value_info(dim_input_name, TensorProto.INT64, lead))
    g.output.append(helper.make_tensor_value_info(bins_name, TensorProto.INT64, lead))
    g.output.append(helper.make_tensor_value_info(actions_name, TensorProto.FLOAT, lead))
    if drop_outputs:
        kept = [o for o in g.output if o.name not in drop_outputs]
        del g.output[:]
        g.output.extend(kept)
        _prune_dead_nodes(g)
    if out.ByteSize() < 1_900_000_000 and not _uses_external_data(out):
        onnx.checker.check_model(out)
    return out


def _uses_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def split_lm_head(decoder, head_weight, bias=None, hidden_output_name: str = "hidden",
                  logits_output_name: str = "logits"):
    """Split a decoder graph into (body, head) so one copy of the weights serves both modes.

    body: the decoder without `logits_output_name` and without the nodes only it needed (the LM
          head inside it, whatever form the exporter gave it);
    head: `hidden_output_name` (..., H) -> `logits_output_name` (..., V): MatMul with
          `head_weight` (V, H) [+ bias], a standalone graph.
    Direct mode runs body + the fused action head; full mode runs body + head for the reasoning
    tokens. Why not one graph and fewer requested outputs: ONNX Runtime computes every node of a
    graph whatever outputs a run asks for (measured: a 151936 x 896 head costs the same with only
    `hidden` requested), so the head must leave the graph to be skipped.
    """
    onnx = _onnx()
    from onnx import helper, numpy_helper

    outputs = {o.name: o for o in decoder.graph.output}
    for name in (hidden_output_name, logits_output_name):
        if name not in outputs:
            raise EdgeVLAError(f"the decoder graph has no output {name!r} (outputs: {sorted(outputs)[:8]})",
                               "export the decoder with its last hidden state and logits as outputs")
    w = np.asarray(head_weight, dtype=np.float32)
    hid_dims = outputs[hidden_output_name].type.tensor_type.shape.dim
    if w.ndim != 2 or (hid_dims and hid_dims[-1].HasField("dim_value") and hid_dims[-1].dim_value != w.shape[1]):
        raise EdgeVLAError(f"LM-head weight has shape {w.shape}, expected (vocab, hidden size of the decoder)",
                           "pass the full output-embedding weight of the model")
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "lm_head/weight_t")]
    nodes = [helper.make_node("MatMul", [hidden_output_name, "lm_head/weight_t"],
                              ["lm_head/logits" if bias is not None else logits_output_name], name="lm_head/matmul")]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "lm_head/bias"))
        nodes.append(helper.make_node("Add", ["lm_head/logits", "lm_head/bias"], [logits_output_name],
                                      name="lm_head/add_bias"))
    head_graph = helper.make_graph(nodes, "lm_head", [outputs[hidden_output_name]], [outputs[logits_output_name]],
                                   initializer=inits)
    opset = next((o.version for o in decoder.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    head = helper.make_model(head_graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    head.ir_version = decoder.ir_version

    body = onnx.ModelProto()
    body.CopyFrom(decoder)
    kept = [o for o in body.graph.output if o.name != logits_output_name]
    del body.graph.output[:]
    body.graph.output.extend(kept)
    _prune_dead_nodes(body.graph)
    onnx.checker.check_model(head)
    if body.ByteSize() < 1_900_000_000 and not _uses_external_data(body):
        onnx.checker.check_model(body)
    return body, head


def _prune_dead_nodes(graph) -> None:
    """Remove nodes (and initializers) no graph output depends on. Subgraphs keep their nodes."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # If/Loop/Scan bodies read outer names implicitly
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    for sn in sub.node:
                        needed.update(sn.input)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)


class OnnxActionHead:
    """The standalone graph in an onnxruntime session: `head(hidden, dim) -> (bins, actions)`."""

    def __init__(self, weight, values, low, high, bias=None, batched: bool = False, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "the ONNX action head", "pip install 'edge-vla[export]'") from None
        self.batched = batched
        model = build_action_head_graph(weight, values, low, high, bias, batched=batched)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.hidden_size = int(np.shape(weight)[1])
        self.n_dims = int(np.shape(values)[1])

    def __call__(self, hidden, dim) -> tuple[np.ndarray, np.ndarray]:
        h = np.ascontiguousarray(hidden, dtype=np.float32)
        if h.ndim != (3 if self.batched else 2) or h.shape[-1] != self.hidden_size:
            want = "(B, T, H)" if self.batched else "(N, H)"
            raise EdgeVLAError(f"hidden has shape {h.shape}, this action head takes {want} with H={self.hidden_size}",
                               "pass the decoder's last hidden states")
        d = np.ascontiguousarray(np.broadcast_to(np.asarray(dim, dtype=np.int64), h.shape[:-1]))
        if d.size and (d.min() < 0 or d.max() >= self.n_dims):
            raise EdgeVLAError(f"dim holds values outside [0, {self.n_dims})", "pass action_dims(n_tokens, D)")
        bins, actions = self.session.run(None, {"hidden": h, "dim": d})
        return bins, actions


def decode_actions_onnx(hidden, weight, dim, values, low, high, bias=None) -> tuple[np.ndarray, np.ndarray]:
    """One-shot convenience (builds a session per call; hold an OnnxActionHead in a loop)."""
    h = np.asarray(hidden, dtype=np.float32)
    check_shapes(h.shape, np.shape(weight), np.shape(dim), np.shape(values), np.shape(low), np.shape(high),
                 None if bias is None else np.shape(bias))
    lead = h.shape[:-1]
    if h.ndim > 3:  # flatten any deeper batch layout into rows
        bins, actions = OnnxActionHead(weight, values, low, high, bias)(
            h.reshape(-1, h.shape[-1]), np.broadcast_to(dim, lead).reshape(-1))
        return bins.reshape(lead), actions.reshape(lead)
    return OnnxActionHead(weight, values, low, high, bias, batched=h.ndim == 3)(h, dim)

__all__ = ["build_action_head_graph", "append_action_head", "split_lm_head", "OnnxActionHead", "decode_actions_onnx", "DEFAULT_OPSET"]
