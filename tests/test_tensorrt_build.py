"""TensorRT engine build and runtime: everything that runs without TensorRT, plus gpu-marked end-to-end tests.

TensorRT cannot be installed here (docs/facts.md): the CPU tests prove the lint-before-build order,
the one-line errors, the manifest records and the refusal of engines built elsewhere.
"""

import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.artifacts.bundle import load_bundle, write_bundle
from edge_vla.runtime.tensorrt_backend import check_engine_record, import_tensorrt
from edge_vla.tensorrt.build import build_engines, engine_profiles, record_engines

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _graph(path, inputs, outputs, nodes, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    onnx.save(m, str(path))


def _bundle(tmp_path, tiny_vla, contrib_decoder=False):
    """A schema-valid bundle whose graphs are small static stand-ins (fast; real graphs: test_export)."""
    staging = tmp_path / "staging"
    staging.mkdir(parents=True)
    f = lambda n, s: helper.make_tensor_value_info(n, TP.FLOAT, s)  # noqa: E731
    _graph(staging / "prefix.onnx", [f("pixel_values", [1, 2, 3, 64, 64])], [f("prefix_embeds", [1, 2, 3, 64, 64])],
           [helper.make_node("Relu", ["pixel_values"], ["prefix_embeds"])])
    _graph(staging / "embed.onnx", [f("input_ids", [1, 4])], [f("token_embeds", [1, 4])],
           [helper.make_node("Relu", ["input_ids"], ["token_embeds"])])
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    # FusedMatMul: an ONNX Runtime contrib op that nothing rewrites for TensorRT.
    node = (helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", alpha=1.0)
            if contrib_decoder else helper.make_node("MatMul", ["x", "w"], ["y"]))
    _graph(staging / "decoder.onnx", [f("x", [1, 8])], [f("y", [1, 8])], [node], [w])
    _graph(staging / "lm_head.onnx", [f("hidden", [1, 8])], [f("logits", [1, 8])],
           [helper.make_node("MatMul", ["hidden", "w"], ["logits"])], [w])
    _graph(staging / "action_head.onnx", [f("hidden", [1, 8])], [f("bins", [1, 8])],
           [helper.make_node("Relu", ["hidden"], ["bins"])])
    tiny_vla.processor.tokenizer.save(staging / "tokenizer")
    graphs = {r: {"file": f"{r}.onnx", "inputs": [], "outputs": [], "precision": "fp16"}
              for r in ("prefix", "embed", "decoder", "lm_head", "action_head")}
    manifest = {"model_config": tiny_vla.config.to_dict(), "action_stats": tiny_vla.action_stats.to_dict(),
                "graphs": graphs, "target": "orin-nano-8", "precision": "fp16"}
    return write_bundle(tmp_path / "bundle", staging, manifest)


def test_tensorrt_absent_is_one_clear_line():
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(MissingDependencyError) as e:
        import_tensorrt()
    assert "tensorrt" in str(e.value) and "\n" not in str(e.value)


def test_build_lints_before_it_needs_tensorrt(tmp_path, tiny_vla):
    bad = _bundle(tmp_path / "a", tiny_vla, contrib_decoder=True)
    with pytest.raises(EdgeVLAError, match="not TensorRT-ready for orin-nano-8: .*FusedMatMul"):
        build_engines(bad.path)
    good = _bundle(tmp_path / "b", tiny_vla)
    if not HAS_TENSORRT:
        with pytest.raises(MissingDependencyError, match="tensorrt"):
            build_engines(good.path)
    with pytest.raises(EdgeVLAError, match="does not run TensorRT"):
        build_engines(good.path, target="cpu")


def test_engine_records_are_hashed_into_the_manifest_and_checked_at_load(tmp_path, tiny_vla):
    b = _bundle(tmp_path, tiny_vla)
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    records = {r: {"file": f"engines/{r}.plan", "graph": f"{r}.onnx", "precision": "fp16", "tensorrt_version": "10.3.0",
                   "gpu": gpu, "target": "orin-nano-8", "profiles": []} for r in ("prefix", "embed", "decoder", "lm_head")}
    # Stand-in plan bytes: this tests the bundle bookkeeping, not TensorRT.
    record_engines(b.path, {r: f"plan-{r}".encode() for r in records}, records, timing_cache=b"cache",
                   extra_files={"engines/decoder.trt.onnx": b"prepared graph"})
    again = load_bundle(b.path)  # verifies every sha256, engines and timing cache included
    assert set(again.manifest["engines"]) == {"prefix", "embed", "decoder", "lm_head"}
    assert {"engines/decoder.plan", "engines/timing.cache", "engines/decoder.trt.onnx"} <= set(again.manifest["files"])
    assert (b.path / "engines" / "embed.plan").read_bytes() == b"plan-embed"
    rec = again.manifest["engines"]["decoder"]
    check_engine_record(rec, "10.3.0", gpu)  # same machine: accepted
    with pytest.raises(EdgeVLAError, match="built with TensorRT 10.3.0, this machine has 10.7.0"):
        check_engine_record(rec, "10.7.0", gpu)
    with pytest.raises(EdgeVLAError, match="built for Orin .*this GPU is NVIDIA H100"):
        check_engine_record(rec, "10.3.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})
    (b.path / "engines" / "decoder.plan").write_bytes(b"tampered")
    with pytest.raises(EdgeVLAError, match="sha256 mismatch"):
        load_bundle(b.path)


def test_engine_profiles_for_a_kv_cache_graph(tmp_path, tiny_vla):
    e = helper.make_tensor_value_info("inputs_embeds", TP.FLOAT, ["batch", "seq", 128])
    p = helper.make_tensor_value_info("past_key_0", TP.FLOAT, ["batch", 2, "past", 32])
    out = helper.make_tensor_value_info("o", TP.FLOAT, ["batch", 2, "past", 32])
    _graph(tmp_path / "d.onnx", [e, p], [out], [helper.make_node("Relu", ["past_key_0"], ["o"])])
    from edge_vla.deploy.memory_fit import model_shape

    prefix = model_shape(tiny_vla.config).prefix_tokens
    prefill, decode = engine_profiles(tmp_path / "d.onnx", tiny_vla.config)
    assert prefill["past_key_0"][2] == (1, 2, 0, 32)  # prefill starts from an empty cache
    assert prefill["inputs_embeds"][1] == (1, prefix + 32 + 3, 128)  # opt: prefix + prompt + " ACTION:"
    assert decode["inputs_embeds"][2] == (1, 8, 128) and decode["past_key_0"][2][2] >= prefix + 512


def test_tensorrt_backend_refuses_cleanly_without_tensorrt(tmp_path, tiny_vla):
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    from edge_vla.runtime.policy import load_policy

    b = _bundle(tmp_path, tiny_vla)
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        load_policy(b.path, backend="tensorrt")


def test_cli_build_engine_lint_only_and_targets(tmp_path, tiny_vla):
    from edge_vla.cli import main

    runner = CliRunner()
    b = _bundle(tmp_path / "bad", tiny_vla, contrib_decoder=True)
    r = runner.invoke(main, ["build-engine", str(b.path), "--lint-only"])
    assert r.exit_code == 1 and "custom-op" in r.output and "not TensorRT-ready" in r.output
    r = runner.invoke(main, ["targets", "--model", "minivla", "--precision", "int8", "--json"])
    rows = {row["target"]: row for row in json.loads(r.output)}
    assert r.exit_code == 0 and rows["orin-nano-8"]["fits"] and rows["orin-agx-64"]["projected_hz"] > 0
    r = runner.invoke(main, ["targets", "--model", "minivla", "--precision", "fp8", "--json"])
    assert "does not run fp8" in json.loads(r.output)[1]["error"]


@pytest.mark.gpu
def test_engines_build_and_match_onnxruntime_on_a_gpu(tmp_path, tiny_vla):
    """On a machine with TensorRT + pycuda: export, build engines, compare actions with ORT."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("pycuda")
    from conftest import make_samples

    from edge_vla.export import export_bundle
    from edge_vla.runtime.policy import load_policy

    ckpt = tiny_vla.save_pretrained(tmp_path / "ckpt")
    bundle = export_bundle(ckpt, tmp_path / "bundle", precision="fp16", target="cuda-gpu", report=lambda *_: None)
    build_engines(bundle, "cuda-gpu", max_free_tokens=32, report=lambda *_: None)
    ort, trt = load_policy(bundle, backend="onnxruntime"), load_policy(bundle, backend="tensorrt")
    for s in make_samples(4):
        obs = {"images": s.images, "state": s.state, "instruction": s.instruction}
        assert np.allclose(ort.act(obs).action, trt.act(obs).action, atol=1e-2)


def test_onnxruntime_int4_graph_is_rewritten_to_tensorrt_int4_with_identical_outputs(tmp_path):
    """The exporter's INT4 (MatMulNBits + GatherBlockQuantized) -> DequantizeLinear(int4, block) + MatMul, float Gather."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edge_vla.tensorrt.int4_rewrite import prepare_for_tensorrt
    from edge_vla.tensorrt.lint import lint_onnx

    rng = np.random.default_rng(0)
    v, h, n = 50, 64, 48
    ids = helper.make_tensor_value_info("ids", TP.INT64, [1, 5])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, 5, n])
    inits = [numpy_helper.from_array(rng.standard_normal((v, h)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((h, n)).astype(np.float32), "w")]
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
                           helper.make_node("MatMul", ["e", "w"], ["y"])], "g", [ids], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    float_model = onnx.ModelProto()
    float_model.CopyFrom(m)  # the quantizer rewrites `m` in place
    q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))  # the exporter's INT4 settings
    q.process()
    ort_int4 = q.model.model
    assert {nd.op_type for nd in ort_int4.graph.node} == {"MatMulNBits", "GatherBlockQuantized"}
    assert not lint_onnx(ort_int4, "orin-nano-8").ok  # raw: contrib ops TensorRT cannot parse

    trt_int4, notes = prepare_for_tensorrt(ort_int4)
    assert {nd.op_type for nd in trt_int4.graph.node} == {"Gather", "DequantizeLinear", "MatMul"}
    assert any(i.data_type == TP.INT4 for i in trt_int4.graph.initializer) and notes
    assert lint_onnx(trt_int4, "orin-nano-8").ok

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no re-fusion: compare the math
    feeds = {"ids": np.array([[0, 7, 49, 3, 7]], np.int64)}
    a = ort.InferenceSession(ort_int4.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(trt_int4.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    same, none = prepare_for_tensorrt(float_model)
    assert same is float_model and none == []  # nothing to rewrite: the graph is returned as is


def test_a_killed_engine_record_leaves_nothing_the_next_one_does_not_clean(tmp_path, tiny_vla):
    """record_engines stages beside the bundle under edge_vla.io's writer names: killed mid-write,
    its staging is removed by the next write of the same bundle, and the bundle still loads."""
    import os
    import signal
    import subprocess
    import sys
    import time

    b = _bundle(tmp_path, tiny_vla)
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    records = {"decoder": {"file": "engines/decoder.plan", "graph": "decoder.onnx", "precision": "fp16",
                           "tensorrt_version": "10.3.0", "gpu": gpu, "target": "orin-nano-8", "profiles": []}}
    # A writer that stalls once its staging exists (a big extra file keeps it busy), then is killed.
    code = ("import sys, json; from edge_vla.tensorrt.build import record_engines; "
            "record_engines(sys.argv[1], {'decoder': b'plan'}, json.loads(sys.argv[2]), "
            "extra_files={f'engines/big{i}.bin': bytes(64 << 20) for i in range(64)})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(b.path), json.dumps(records)])
    staging = []
    for _ in range(600):
        staging = [p for p in tmp_path.iterdir() if p.name.startswith(f".{b.path.name}.")]
        if staging or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging, "the writer never staged"
    record_engines(b.path, {"decoder": b"plan"}, records)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{b.path.name}.")]
    assert load_bundle(b.path).manifest["engines"]["decoder"]["file"] == "engines/decoder.plan"
