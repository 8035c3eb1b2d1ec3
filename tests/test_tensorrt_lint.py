"""TensorRT lint: graphs that must pass and graphs that must fail, built with onnx.helper and ORT's quantizers."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from edge_vla.errors import EdgeVLAError
from edge_vla.tensorrt.lint import default_dim_ranges, lint_onnx, profiles_from_dim_ranges

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=21, value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _mlp(k=16, n=8, batch=1):
    x = helper.make_tensor_value_info("x", TP.FLOAT, [batch, k])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [batch, n])
    w = numpy_helper.from_array(RNG.standard_normal((k, n)).astype(np.float32), "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")], [x], [y], [w])


def _qdq_linear(zero_point=0, qtype=TP.INT8, w_axis=1, act_scale_n=1, scale_const=True, k=16, n=8):
    """x -> Q -> DQ -> MatMul(DQ(int8 weight, per-channel)) -> y"""
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, n])
    np_q = {TP.INT8: np.int8, TP.UINT8: np.uint8}[qtype]
    inits = [numpy_helper.from_array(np.full(act_scale_n, 0.02, np.float32), "xs"),
             numpy_helper.from_array(np.full(act_scale_n, zero_point, np_q), "xz"),
             numpy_helper.from_array(RNG.integers(-127, 127, (k, n)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full((k, n)[w_axis], 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros((k, n)[w_axis], np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=w_axis),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    if not scale_const:
        inits = [i for i in inits if i.name != "xs"]
        nodes.insert(0, helper.make_node("ReduceMax", ["x"], ["xs"], name="runtime_scale", keepdims=0))
    return _model(nodes, [x], [y], inits)


def test_float_graph_and_symmetric_int8_qdq_pass():
    assert lint_onnx(_mlp()).findings == []
    r = lint_onnx(_qdq_linear())
    assert r.ok and r.findings == [], r.summary()


def test_asymmetric_uint8_qdq_fails_with_the_quantizer_fix():
    r = lint_onnx(_qdq_linear(zero_point=128, qtype=TP.UINT8))
    assert {"qdq-uint8", "qdq-zero-point"} <= r.codes() and not r.ok
    with pytest.raises(EdgeVLAError, match="not TensorRT-ready for orin-agx-64"):
        r.raise_on_error()


def test_qdq_placement_errors():
    assert "qdq-weight-axis" in lint_onnx(_qdq_linear(w_axis=0)).codes()  # per-channel along K
    assert "qdq-per-channel-activation" in lint_onnx(_qdq_linear(act_scale_n=16)).codes()
    assert "qdq-scale-not-constant" in lint_onnx(_qdq_linear(scale_const=False)).codes()


def test_dangling_q_and_unfusable_pair():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    yq = helper.make_tensor_value_info("yq", TP.INT8, [1, 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    dangling = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["yq"], name="q")], [x], [yq], inits)
    assert "qdq-dangling-q" in lint_onnx(dangling).codes()
    softmax = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                      helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
                      helper.make_node("Softmax", ["d"], ["y"], name="sm")], [x], [y], inits)
    r = lint_onnx(softmax)
    assert r.ok and "qdq-unfusable" in r.codes()  # a warning: it builds, but costs reformats


def _int4_weight_graph(dtype=TP.INT4, on_activation=False):
    k, n = 64, 8
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, n])
    vals = RNG.integers(-8, 7, (k, n)).tolist()
    wq = helper.make_tensor("wq", dtype, [k, n], np.array(vals).ravel().tolist())
    ws = numpy_helper.from_array(np.full((k // 32, n), 0.01, np.float32), "ws")
    if on_activation:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s4"], ["xq"], name="q4", output_dtype=TP.INT4),
                 helper.make_node("DequantizeLinear", ["xq", "s4"], ["xd"], name="dq4"),
                 helper.make_node("MatMul", ["xd", "wf"], ["y"], name="mm")]
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s4"),
                 numpy_helper.from_array(RNG.standard_normal((k, n)).astype(np.float32), "wf")]
        return _model(nodes, [x], [y], inits)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="dq_w4", axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    return _model(nodes, [x], [y], [wq, ws])


def test_int4_weight_only_passes_but_int4_activations_and_uint4_fail():
    r = lint_onnx(_int4_weight_graph(), "orin-nano-8")
    assert r.ok, r.summary()
    assert "qdq-int4-activation" in lint_onnx(_int4_weight_graph(on_activation=True)).codes()
    assert "qdq-uint4" in lint_onnx(_int4_weight_graph(dtype=TP.UINT4)).codes()


def test_fp8_refused_on_orin_but_not_on_a_cuda_gpu():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("z", TP.FLOAT8E4M3FN, [], [0.0])]
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q8"),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq8"),
                helper.make_node("Relu", ["d"], ["y"])], [x], [y], inits)
    assert "precision-unsupported" in lint_onnx(m, "orin-agx-64").codes()
    assert lint_onnx(m, "cuda-gpu").ok


def test_unsupported_ops_dtypes_and_int64_weights():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [6])
    u = helper.make_tensor_value_info("u", TP.FLOAT, [None])
    m = _model([helper.make_node("Unique", ["x"], ["u"], name="uniq")], [x], [u], opset=18)
    r = lint_onnx(m, profiles=[{}])
    assert "unsupported-op" in r.codes() and "uniq" in r.summary()

    xd = helper.make_tensor_value_info("xd", TP.DOUBLE, [2])
    yd = helper.make_tensor_value_info("yd", TP.DOUBLE, [2])
    assert "unsupported-dtype" in lint_onnx(_model([helper.make_node("Relu", ["xd"], ["yd"])], [xd], [yd])).codes()

    data = helper.make_tensor_value_info("data", TP.FLOAT, [4, 4])
    out = helper.make_tensor_value_info("out", TP.FLOAT, [2, 4])

    def slice_graph(end):
        inits = [numpy_helper.from_array(np.array([1], np.int64), "starts"),
                 numpy_helper.from_array(np.array([end], np.int64), "ends"),
                 numpy_helper.from_array(np.array([0], np.int64), "axes")]
        return _model([helper.make_node("Slice", ["data", "starts", "ends", "axes"], ["out"])], [data], [out], inits)

    r = lint_onnx(slice_graph(2**63 - 1))  # "to the end": clamped safely
    assert r.ok and "int64-weights" in r.codes()
    assert "int64-out-of-range" in lint_onnx(slice_graph(2**40)).codes()


def test_ort_quantizers_output_is_judged_like_tensorrt_would(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    src = tmp_path / "mlp.onnx"
    m = _mlp(k=32, n=32)
    m.opset_import[0].version = 18
    onnx.save(m, src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": RNG.standard_normal((1, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_dynamic(str(src), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    assert "unsupported-op" in lint_onnx(tmp_path / "dyn.onnx").codes()  # MatMulInteger / DynamicQuantizeLinear

    quantize_static(str(src), str(tmp_path / "asym.onnx"), Reader())  # ORT defaults: asymmetric int8
    assert "qdq-zero-point" in lint_onnx(tmp_path / "asym.onnx").codes()
    quantize_static(str(src), str(tmp_path / "u8.onnx"), Reader(), activation_type=QuantType.QUInt8)
    assert "qdq-uint8" in lint_onnx(tmp_path / "u8.onnx").codes()

    quantize_static(str(src), str(tmp_path / "sym.onnx"), Reader(), activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    r = lint_onnx(tmp_path / "sym.onnx")
    assert r.ok, r.summary()


def test_matmulnbits_contrib_op_fails_with_the_int4_fix(tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = _mlp(k=64, n=32)
    m.opset_import[0].version = 18
    q = MatMulNBitsQuantizer(m, block_size=32, is_symmetric=True)
    q.process()
    r = lint_onnx(q.model.model)
    bad = [f for f in r.errors if f.code == "custom-op"]
    assert bad and "MatMulNBits" in bad[0].message and "DequantizeLinear(int4, block_size)" in bad[0].fix


def _dynamic_decoder_like():
    e = helper.make_tensor_value_info("inputs_embeds", TP.FLOAT, ["batch", "seq", 8])
    p = helper.make_tensor_value_info("past_key_0", TP.FLOAT, ["batch", 2, "past", 4])
    y = helper.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", 8])
    z = helper.make_tensor_value_info("z", TP.FLOAT, ["batch", 2, "past", 4])
    return _model([helper.make_node("Relu", ["inputs_embeds"], ["y"]), helper.make_node("Relu", ["past_key_0"], ["z"])],
                  [e, p], [y, z])


def test_dynamic_shapes_need_profiles():
    m = _dynamic_decoder_like()
    r = lint_onnx(m)
    assert [f.node for f in r.errors] == ["inputs_embeds", "past_key_0"]
    ranges = [{"batch": (1, 1, 1), "seq": (1, 300, 400), "past": (0, 0, 0)},
              {"batch": (1, 1, 1), "seq": (1, 1, 8), "past": (1, 548, 900)}]
    assert lint_onnx(m, dim_ranges=ranges).ok
    profiles = profiles_from_dim_ranges(m, ranges)
    assert profiles[1]["past_key_0"] == ((1, 2, 1, 4), (1, 2, 548, 4), (1, 2, 900, 4))
    with pytest.raises(EdgeVLAError, match="`past`"):
        profiles_from_dim_ranges(m, [{"batch": (1, 1, 1), "seq": (1, 1, 1)}])
    bad = [{"inputs_embeds": ((1, 1, 8), (1, 4, 8), (1, 2, 8)), "past_key_0": ((1, 3, 0, 4),) * 3}]
    codes = lint_onnx(m, profiles=bad).codes()
    assert {"profile-order", "profile-static-mismatch"} <= codes


def test_default_profiles_cover_the_longest_full_mode_call():
    prefill, decode = default_dim_ranges("minivla")
    assert prefill["past"] == (0, 0, 0) and prefill["seq"][1] == 256 + 32 + 3
    assert decode["past"][1] == 256 + 32 + 250 + 3 + 7 and decode["past"][2] >= 256 + 512


def test_bad_paths():
    with pytest.raises(EdgeVLAError, match="no ONNX graph"):
        lint_onnx("/nonexistent.onnx")


@pytest.mark.slow
def test_exported_tiny_bundle_graphs_are_tensorrt_ready(tmp_path, tiny_vla):
    from edge_vla.export.onnx_export import export_graphs

    graphs = export_graphs(tiny_vla, tmp_path)
    ranges = default_dim_ranges(tiny_vla.config)
    for g in graphs.values():
        r = lint_onnx(tmp_path / g["file"], "orin-nano-8", dim_ranges=ranges)
        assert r.ok, r.summary()


def test_export_lint_hook_refuses_for_tensorrt_targets_only(tmp_path, tiny_vla):
    from edge_vla.tensorrt.lint import lint_for_target

    onnx.save(_qdq_linear(zero_point=3), tmp_path / "decoder.onnx")
    onnx.save(_mlp(), tmp_path / "embed.onnx")
    graphs = {"embed": {"file": "embed.onnx"}, "decoder": {"file": "decoder.onnx"}}
    assert lint_for_target(tmp_path, graphs, tiny_vla.config, "cpu", print) is None
    with pytest.raises(EdgeVLAError, match="decoder.onnx is not TensorRT-ready for orin-nx-16: .*zero-point"):
        lint_for_target(tmp_path, graphs, tiny_vla.config, "orin-nx-16", lambda *_: None)
    graphs.pop("decoder")
    out = lint_for_target(tmp_path, graphs, tiny_vla.config, "orin-nx-16", lambda *_: None)
    assert out["embed"]["ok"]


@pytest.mark.slow
def test_export_for_a_jetson_writes_fp16_and_int4_and_refuses_dynamic_int8(tmp_path, tiny_vla):
    from edge_vla.export import export_bundle
    from edge_vla.artifacts.bundle import load_bundle

    ckpt = tiny_vla.save_pretrained(tmp_path / "ckpt")
    quiet = lambda *_: None  # noqa: E731
    out = export_bundle(ckpt, tmp_path / "fp16", precision="fp16", target="orin-nano-8", report=quiet)
    m = load_bundle(out).manifest
    assert m["memory_fit"]["fits"] and all(r["ok"] for r in m["tensorrt_lint"].values())
    int4 = export_bundle(ckpt, tmp_path / "int4", precision="int4", target="orin-nano-8", report=quiet)
    assert all(r["ok"] for r in load_bundle(int4).manifest["tensorrt_lint"].values())  # lints the rewritten graphs
    with pytest.raises(EdgeVLAError, match="not TensorRT-ready for orin-nano-8: .*DynamicQuantizeLinear|MatMulInteger"):
        export_bundle(ckpt, tmp_path / "int8", precision="int8", target="orin-nano-8", report=quiet)
    assert not (tmp_path / "int8").exists()  # nothing written on refusal


@pytest.mark.gpu
def test_lint_verdicts_agree_with_tensorrts_own_parser(tmp_path):
    """On a machine with TensorRT: a graph the lint passes parses; the unsupported-op graphs do not."""
    trt = pytest.importorskip("tensorrt")
    logger = trt.Logger(trt.Logger.ERROR)

    def parses(model) -> bool:
        path = tmp_path / "g.onnx"
        onnx.save(model, path)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if hasattr(
            trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") else 0
        parser = trt.OnnxParser(builder.create_network(flags), logger)
        return bool(parser.parse_from_file(str(path)))

    assert parses(_mlp()) and parses(_qdq_linear()) and parses(_int4_weight_graph())
    x = helper.make_tensor_value_info("x", TP.FLOAT, [6])
    u = helper.make_tensor_value_info("u", TP.FLOAT, [None])
    assert not parses(_model([helper.make_node("Unique", ["x"], ["u"])], [x], [u], opset=18))
    assert not parses(_qdq_linear(zero_point=128, qtype=TP.UINT8))
