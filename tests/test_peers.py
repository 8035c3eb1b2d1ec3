"""benchmarks/peers.py on the shipped tiny LM: every installed peer runs the same weights on the same
prompt; the table's ratios, sizes and bits are consistent; absent peers skip with the reason; the action
row times one action per runtime."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from edge_vla.errors import EdgeVLAError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

pytestmark = pytest.mark.skipif(not peers.TINY_CKPT.joinpath("model.safetensors").exists(),
                                reason="the shipped tiny checkpoint is not in this checkout")


# ExecuTorch runs from its own venv (numpy 2): with $EXECUTORCH_PYTHON set, its peers build and run (fp32 and the
# 4-bit XNNPACK programs, ~4 min of export each on the shared cores); without it, they are skipped with the reason.
EXECUTORCH = ("executorch-fp32", "executorch-8da4w")
CHOSEN = ("edge-vla-fp32", "torch-eager", "ort-genai-int4", "llama.cpp-q8_0", *EXECUTORCH)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    res = peers.run_peers("tiny", tmp_path_factory.mktemp("peers"), CHOSEN, prompt=40, new=4, repeats=1,
                          llama_src=os.environ.get("LLAMA_CPP_SRC"), log=lambda *_: None, rows=("decode", "action"),
                          action_decoding=("parallel", "sequential"))
    return res


def test_installed_peers_run_and_absent_ones_say_why(table):
    rows, skipped = table["rows"], table["skipped"]
    assert {"edge-vla-fp32", "torch-eager"} <= set(rows)  # always here: the project's own stack
    for peer, module in (("ort-genai-int4", "onnxruntime_genai"), ("llama.cpp-q8_0", "llama_cpp")):
        if importlib.util.find_spec(module) is None:
            assert peer in skipped and "not installed" in skipped[peer]
        elif peer not in rows:
            assert skipped[peer]  # installed but not runnable here (e.g. no converter source): a reason
    decode_skips = {p for p in skipped if not p.endswith(" (action)")}
    assert set(rows) | decode_skips == set(CHOSEN)


def test_executorch_runs_from_its_own_venv_or_says_how_to_make_it(table):
    rows, skipped = table["rows"], table["skipped"]
    if not os.environ.get("EXECUTORCH_PYTHON"):
        for p in EXECUTORCH:
            assert p not in rows and "executorch needs its own venv (numpy 2)" in skipped[p]
            assert "--executorch-python" in skipped[p] and "EXECUTORCH_PYTHON" in skipped[p]
        return
    assert set(EXECUTORCH) <= set(rows), skipped
    # the 4-bit program holds far fewer bits per weight than the fp32 one (~32: fp32 weights, XNNPACK-packed)
    assert 30 < rows["executorch-fp32"]["bits_per_weight"] < 40
    assert rows["executorch-8da4w"]["bits_per_weight"] < 0.5 * rows["executorch-fp32"]["bits_per_weight"]
    assert all(p in table["action"]["rows"] for p in EXECUTORCH)


def test_executorch_missing_reasons(tmp_path):
    # No interpreter, a path that is not one, and a python without executorch: each says what to do.
    assert "executorch needs its own venv" in peers.missing("executorch-8da4w", None, None)
    assert "no interpreter at" in peers.missing("executorch-fp32", None, tmp_path / "nope" / "python")
    why = peers.missing("executorch-8da8w", None, Path(sys.executable))
    if importlib.util.find_spec("executorch") is None:
        assert "lacks executorch" in why and "EXECUTORCH_PYTHON" in why


def test_rows_are_consistent(table):
    rows = table["rows"]
    assert min(r["decode_vs_best"] for r in rows.values()) == pytest.approx(1.0)
    assert min(r["prefill_vs_best"] for r in rows.values()) == pytest.approx(1.0)
    for r in rows.values():
        assert 0 < r["decode_ms_median"] <= r["decode_ms_p95"] and r["prefill_ms"] > 0 and r["peak_rss_mb"] > 0
        assert len(r["tokens"]) == 5  # the prefill's token + 4 decoded
        assert 0 < r["roofline_fraction"]
    # the fp32 graphs and the fp32 safetensors hold ~32 bits per weight; a 4-bit format far fewer
    assert 30 < rows["edge-vla-fp32"]["bits_per_weight"] < 45 and 30 < rows["torch-eager"]["bits_per_weight"] < 34
    if "ort-genai-int4" in rows:
        assert rows["ort-genai-int4"]["bits_per_weight"] < 0.5 * rows["torch-eager"]["bits_per_weight"]
    text = peers.format_table(table)
    assert "edge-vla-fp32" in text and "ms/tok p50" in text and "x best" in text


def test_same_weights_same_greedy_tokens(table):
    # The fp32 ONNX graphs and PyTorch run the same weights: the greedy continuation must agree, which
    # is what makes their times comparable (a broken conversion would decode something else, faster).
    rows = table["rows"]
    assert rows["edge-vla-fp32"]["tokens"] == rows["torch-eager"]["tokens"]
    if "executorch-fp32" in rows:  # the fp32 XNNPACK program with its in-program KV cache: the same continuation
        assert rows["executorch-fp32"]["tokens"] == rows["torch-eager"]["tokens"]
    if "llama.cpp-q8_0" in rows:  # the GGUF conversion kept the weights: the trained model's first pick holds at 8 bits
        assert rows["llama.cpp-q8_0"]["tokens"][0] == rows["edge-vla-fp32"]["tokens"][0]


def test_action_row_is_measured_per_runtime(table):
    # The action row: edge-vla's direct-mode Policy.act (the shipped parallel-decoding checkpoint: its
    # whole 4 x 7 chunk from one prefill) against each peer's prefill + 7 tokens one by one, on the same
    # number of prefix + prompt positions.
    a = table["action"]
    rows, pos = a["rows"], a["positions"]
    assert {"edge-vla-fp32-parallel", "torch-eager"} <= set(rows)
    assert pos["prefix"] == 33 and pos["prompt"] > 2  # 2 cameras x 16 + proprio
    edge = rows["edge-vla-fp32-parallel"]
    assert edge["decoding"] == "parallel" and edge["format"] == peers.FORMAT_BITS["edge-vla-fp32"]
    assert edge["positions"]["parallel"] and edge["positions"]["action_tokens"] == 28
    assert len(edge["tokens"]) == 28
    for p, r in rows.items():
        assert 0 < r["action_cpu_ms_min"] <= r["action_cpu_ms"] <= r["action_cpu_ms_max"] and r["actions"] == 1
        if not p.startswith("edge-vla"):
            assert len(r["tokens"]) == peers.OPENVLA_ACTION_TOKENS
    # ratios against the best peer (edge-vla is not a peer of itself): the best peer scores exactly 1
    best = min(r["action_cpu_ms"] for p, r in rows.items() if not p.startswith("edge-vla"))
    assert a["best_peer_cpu_ms"] == best
    for r in rows.values():
        assert r["vs_best_peer"] == pytest.approx(best / r["action_cpu_ms"])
    text = peers.format_action_table(table)
    assert "edge-vla-fp32-parallel" in text and "best peer / this" in text and "CPU ms by part" in text


def test_action_profile_shows_one_decoder_pass_for_a_parallel_chunk(table):
    # Where edge-vla's action time goes, per graph: a parallel chunk runs the decoder once (the prefill,
    # no decode steps), the vision graph and the fused head once each; the parts fit in the action's CPU time.
    parts = table["action"]["rows"]["edge-vla-fp32-parallel"]["components_cpu_ms"]
    assert {"vision", "embed", "decoder_prefill", "action_head", "other"} <= set(parts)
    assert "decoder_steps" not in parts and "lm_head" not in parts
    assert all(v > 0 for k, v in parts.items() if k != "other")


def test_tiny_has_no_sequential_action_row(table):
    # The shipped tiny checkpoint was trained to decode in parallel: a sequential row is refused with why.
    why = table["skipped"]["edge-vla-fp32-sequential (action)"]
    assert "parallel only" in why and "edge-vla-fp32-sequential" not in table["action"]["rows"]


def test_unknown_peer_and_model_are_refused(tmp_path):
    with pytest.raises(EdgeVLAError, match="unknown peer"):
        peers.run_peers("tiny", tmp_path, ("vllm",))
    with pytest.raises(EdgeVLAError, match="unknown model"):
        peers.run_peers("llama-70b", tmp_path, ("torch-eager",))
    with pytest.raises(EdgeVLAError, match="unknown rows"):
        peers.run_peers("tiny", tmp_path, ("torch-eager",), rows=("latency",))
    with pytest.raises(EdgeVLAError, match="unknown action decoding"):
        peers.run_peers("tiny", tmp_path, ("torch-eager",), rows=("action",), action_decoding=("speculative",))


@pytest.mark.slow  # three exports of the shipped tiny checkpoint (~50 s on the shared cores)
def test_edge_vla_int8_is_what_the_export_writes_and_the_forced_forms_differ_in_the_decoder_only(tmp_path):
    # edge-vla-int8 is `edge-vla export --int8` (its --int8-matmul auto): the shipped tiny checkpoint decodes its
    # chunk in parallel in direct mode, so its decoder is MatMulInteger; -nbits forces the other form. Real
    # bundles that Policy loads and that act.
    import onnx

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    auto, nbits = (load_bundle(peers.build_edge_vla(peers.TINY_CKPT, tmp_path, f)) for f in ("int8", "int8-nbits"))
    ops = {n.op_type for n in onnx.load(str(auto.graph_path("decoder"))).graph.node}
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops and "MatMul" not in ops
    assert auto.manifest["int8_matmul"]["requested"] == "auto" and auto.manifest["int8_matmul"]["decoder"] == "integer"
    ops = {n.op_type for n in onnx.load(str(nbits.graph_path("decoder"))).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops
    for role in ("prefix", "embed", "lm_head", "action_head"):
        assert auto.graph_path(role).read_bytes() == nbits.graph_path(role).read_bytes()
    obs = synthetic_observations(auto.config, n=1)[0]
    assert len(load_policy(str(auto.path), mode="direct").act(obs).info["action_token_ids"]) == 28
    # A bundle written before the export recorded its form is not reused as the export's int8.
    m = json.loads((auto.path / "manifest.json").read_text())
    assert peers.build_edge_vla(peers.TINY_CKPT, tmp_path, "int8") == auto.path
    del m["int8_matmul"]
    (auto.path / "manifest.json").write_text(json.dumps(m))
    peers.build_edge_vla(peers.TINY_CKPT, tmp_path, "int8")
    assert "int8_matmul" in json.loads((auto.path / "manifest.json").read_text())


def test_edge_vla_int4_block_variants_are_what_the_export_writes(tmp_path):
    path = peers.build_edge_vla(peers.TINY_CKPT, tmp_path, "int4-b32")
    graphs = json.loads((path / "manifest.json").read_text())["graphs"]
    assert graphs["decoder"]["precision"] == "int4" and graphs["decoder"]["int4_block"] == 32
    assert peers.FORMAT_BITS["edge-vla-int4-b32"].startswith("4-bit blocks of 32")
    # a bundle of another block at the default's path is exported again, not reused
    (tmp_path / "bundle-int4").mkdir()
    (path / "manifest.json").rename(tmp_path / "bundle-int4" / "manifest.json")
    default = peers.build_edge_vla(peers.TINY_CKPT, tmp_path, "int4")
    assert json.loads((default / "manifest.json").read_text())["graphs"]["decoder"]["int4_block"] == 64


def test_matmul_forms_times_every_weight_form_per_shape():
    # The per-MatMul comparison behind the action row's finding: each shape x rows gets every form, in CPU ms.
    rows = peers.matmul_forms(rows=(8, 1), repeats=1, shapes={"small": (64, 96)})
    assert [(r["matmul"], r["rows"]) for r in rows] == [("small", 8), ("small", 1)]
    for r in rows:
        assert all(r[f] >= 0 for f in ("fp32", "int8", "int4", "int8-integer"))
    assert "int8-integer" in peers.format_matmuls(rows)

