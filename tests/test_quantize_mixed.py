"""The 4-bit levers of edge_vla/export/quantize.py (quantize_nbits): algorithms of ONNX Runtime's
MatMulNBitsQuantizer, block sizes, mixed 8/4 bits by node, and the compute level, on a real ONNX graph run
by ONNX Runtime; and the accuracy report's shared reference decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_vla.errors import EdgeVLAError
from edge_vla.export.quantize import quantize_nbits

REPO = Path(__file__).resolve().parents[1]
TINY_VLA = REPO / "pretrained" / "tiny-libero-butter" / "vla"


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """ids -> embedding Gather -> MatMul "up" (128x256) -> MatMul "down" (256x64): trained-looking weights
    (a few large rows, as in a real model) so that block scales matter."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(96, 128)).astype(np.float32)
    up = (rng.normal(size=(128, 256)) * rng.uniform(0.1, 3.0, (128, 1))).astype(np.float32)
    down = (rng.normal(size=(256, 64)) / 16).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "up_w"], ["h"], name="up"),
             helper.make_node("MatMul", ["h", "down_w"], ["y"], name="down")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 64])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(up, "up_w"),
                           numpy_helper.from_array(down, "down_w")])
    path = tmp_path_factory.mktemp("graph") / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


IDS = {"ids": np.arange(40, dtype=np.int64)[None]}


def _run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, IDS)[0]


def _rel_err(path: Path, ref: Path) -> float:
    a, b = _run(path), _run(ref)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nbits_nodes(path: Path) -> dict[str, dict]:
    m = onnx.load(str(path))
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in m.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}


def test_mixed_bits_by_node(graph, tmp_path):
    four, mixed = tmp_path / "four.onnx", tmp_path / "mixed.onnx"
    quantize_nbits(graph, four)
    quantize_nbits(graph, mixed, node_bits={"up": 8})
    nodes = _nbits_nodes(mixed)
    # "up" at 8 bits, "down" at 4 (int8 compute on both), the embedding's Gather in 4-bit blocks
    assert {n: a.get("bits") for n, a in nodes.items()} == {"up_Q8": 8, "down_Q4": 4, "embed_Q4": None}
    assert nodes["up_Q8"]["accuracy_level"] == nodes["down_Q4"]["accuracy_level"] == 4
    assert {a.get("bits") for a in _nbits_nodes(four).values()} == {4, None}
    # the 8-bit node makes the output closer to fp32, and the file larger
    assert _rel_err(mixed, graph) < _rel_err(four, graph) < 0.2
    assert four.stat().st_size < mixed.stat().st_size < graph.stat().st_size


@pytest.mark.parametrize("algo", ["default", "hqq", "rtn", "k_quant"])
def test_algorithms_write_runnable_4bit_graphs(graph, tmp_path, algo):
    out = tmp_path / f"{algo}.onnx"
    quantize_nbits(graph, out, algo=algo, gather=False)
    nodes = _nbits_nodes(out)
    assert {a["bits"] for a in nodes.values()} == {4} and len(nodes) == 2
    assert all(a["accuracy_level"] == 4 for a in nodes.values())  # HQQ/RTN get int8 compute too
    assert _rel_err(out, graph) < 0.2


def test_block_size_and_float_compute(graph, tmp_path):
    sizes = {}
    for block in (16, 32, 128):
        out = tmp_path / f"b{block}.onnx"
        quantize_nbits(graph, out, block=block, gather=False, accuracy_level=0)
        nodes = _nbits_nodes(out)
        assert {a["block_size"] for a in nodes.values()} == {block}
        assert {a["accuracy_level"] for a in nodes.values()} == {0}
        sizes[block] = out.stat().st_size
    assert sizes[16] > sizes[32] > sizes[128]  # one fp32 scale per block


def test_blocks_divide_k_so_no_weight_row_is_padded(tmp_path):
    # MatMulNBits pads K up to whole blocks and reads the padding at every step; a K that the asked block does
    # not divide (Qwen2.5-0.5B's 896 in 8-bit blocks of 256) gets the block that stores the fewest bytes.
    from edge_vla.export.nbits import pack_matmul
    from edge_vla.export.quantize import INT8_BLOCK, block_for

    assert block_for(896, 256, 8) == 128 and block_for(4864, 256, 8) == 256 and block_for(896, 64, 4) == 64
    assert block_for(96, 64, 4) == 32 and block_for(128, 256, 8) == 128  # K below the block: a power of two <= K
    # SigLIP's MLP (4304 = 16 x 269): 1% padding at 256 costs less than a scale per 16 weights
    assert block_for(4304, 256, 8) == 256 and block_for(4304, 64, 4) == 64
    assert block_for(100, 64, 4) == 64  # no block divides it: the one with the fewest bytes, padded
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [numpy_helper.from_array(w, "w")])
    src, out = tmp_path / "g.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    quantize_nbits(src, out, block=64, gather=False)
    (node,) = _nbits_nodes(out).values()
    assert node["block_size"] == 32 and node["K"] == 96
    x = rng.normal(size=(1, 96)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x @ w).max() < 0.1 * np.abs(x @ w).max()
    # the weight-by-weight packer (streaming export) takes the same blocks: 3 of 32 rows, none padded
    p = pack_matmul(rng.normal(size=(896, 16)).astype(np.float32), 8)
    assert INT8_BLOCK == 256 and p.block == 128 and p.data.shape == (16, 7, 128)


def test_gptq_uses_calibration_and_refuses_without(graph, tmp_path):
    with pytest.raises(EdgeVLAError, match="calibration"):
        quantize_nbits(graph, tmp_path / "x.onnx", algo="gptq", gather=False)
    out = tmp_path / "gptq.onnx"
    feeds = [{"ids": np.random.default_rng(i).integers(0, 96, (1, 24)).astype(np.int64)} for i in range(4)]
    quantize_nbits(graph, out, algo="gptq", gather=False, calibration=feeds)
    assert len(_nbits_nodes(out)) == 2 and _rel_err(out, graph) < 0.2


def test_bad_levers_are_refused(graph, tmp_path):
    with pytest.raises(EdgeVLAError, match="weight-only algorithm"):
        quantize_nbits(graph, tmp_path / "x.onnx", algo="awq-magic")
    with pytest.raises(EdgeVLAError, match="no node named 'mlp'"):
        quantize_nbits(graph, tmp_path / "x.onnx", node_bits={"mlp": 8})
    with pytest.raises(EdgeVLAError, match="4-bit weights only"):
        quantize_nbits(graph, tmp_path / "x.onnx", bits=8, algo="rtn")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.skipif(not (TINY_VLA / "model.safetensors").exists(), reason="the shipped tiny checkpoint is missing")
def test_accuracy_report_reuses_reference_decodes():
    from edge_vla.data.observations import synthetic_observations
    from edge_vla.export import accuracy as acc
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    vla = VLA.from_pretrained(TINY_VLA)
    ref, test = Policy(TorchBackend(vla), mode="direct"), Policy(TorchBackend(vla), mode="direct")
    obs = synthetic_observations(vla.config, n=3)
    shared = acc.reference_results(ref, obs)
    assert len(shared["direct"]) == 3
    a = acc.accuracy_report(ref, test, obs, reference=shared)["direct"]
    b = acc.accuracy_report(ref, test, obs)["direct"]
    assert a["action_token_agreement"] == b["action_token_agreement"] == 1.0
    assert a["action_token_agreement_se"] == 0.0 and a["n_action_tokens"] == 3 * 28


def test_fp32_copy_brings_the_external_data_side_file(graph, tmp_path):
    """A graph over protobuf's 2 GB cap (a MiniVLA vision tower) keeps its weights in a side file:
    the fp32 "quantizer" must copy it too, or the bundle cannot be opened."""
    from edge_vla.export.quantize import external_data_files, quantize_graph

    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir(), dst_dir.mkdir()
    onnx.save(onnx.load(str(graph)), str(src_dir / "g.onnx"), save_as_external_data=True, location="g.onnx.data",
              size_threshold=0)
    assert external_data_files(src_dir / "g.onnx") == ["g.onnx.data"]
    quantize_graph(src_dir / "g.onnx", dst_dir / "g.onnx", "fp32")
    assert sorted(p.name for p in dst_dir.iterdir()) == ["g.onnx", "g.onnx.data"]
    np.testing.assert_array_equal(_run(dst_dir / "g.onnx"), _run(graph))
    assert external_data_files(graph) == []
