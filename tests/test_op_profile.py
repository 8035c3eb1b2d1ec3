"""benchmarks/op_profile.py on a tiny INT8 bundle: it finds the decoder's weight matmuls by their shapes, profiles
both phases per op type, and relates the matmuls to the standalone int8 GEMM rate and the copy bandwidth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import INSTRUCTIONS, make_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_profile  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edge_vla.cli import main
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    tmp = tmp_path_factory.mktemp("opprof")
    s = make_samples()
    vla = VLA.from_preset("tiny", ["parallel_actions=true"], texts=INSTRUCTIONS,
                          action_stats=ActionStats.from_actions(np.stack([x.action for x in s])))
    vla.recipe_info = {"name": "vla", "decode_mode": "direct", "max_free_tokens": 0, "inference_prefix": " ACTION:"}
    vla.save_pretrained(tmp / "ckpt")
    res = CliRunner().invoke(main, ["export", str(tmp / "ckpt"), "--int8", "-o", str(tmp / "bundle")])
    assert res.exit_code == 0, res.output
    return tmp / "bundle"


def test_weight_matmuls_are_the_decoders_projections(bundle):
    lm = json.loads((bundle / "manifest.json").read_text())["model_config"]["lm"]
    h, inter, layers = lm["hidden_size"], lm["intermediate_size"], lm["num_hidden_layers"]
    kv = lm["num_key_value_heads"] * h // lm["num_attention_heads"]
    mms = op_profile.weight_matmuls(bundle / "decoder.onnx")
    # the direct-mode parallel export's int8 decoder is MatMulInteger (--int8-matmul auto): qkv, o, gate|up, down
    assert {m["op"] for m in mms} == {"MatMulInteger"} and len(mms) == 4 * layers
    assert sorted({(m["K"], m["N"]) for m in mms}) == sorted({(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h)})
    for m in mms:  # int8 weights plus per-channel scale and zero point
        assert m["K"] * m["N"] <= m["bytes"] < 1.1 * m["K"] * m["N"]


def test_both_phases_are_profiled_and_related_to_their_ceilings(bundle):
    r = op_profile.analyse(bundle, prefill=24, past=30, runs=4)
    mms = op_profile.weight_matmuls(bundle / "decoder.onnx")
    for phase, positions, past in (("prefill", 24, 0), ("decode", 1, 30)):
        p = r[phase]
        assert p["positions"] == positions and p["past"] == past and p["cpu_ms"] > 0
        assert sum(p["share"].values()) == pytest.approx(1.0)
        assert "GroupQueryAttention" in p["share"]  # the fused decoder's attention is one op per layer
        w = p["weight_matmuls"]
        assert 0 < w["cpu_ms"] <= p["cpu_ms"] and w["other_ops_ms"] == pytest.approx(p["cpu_ms"] - w["cpu_ms"])
    assert r["prefill"]["weight_matmuls"]["gop"] == pytest.approx(sum(2 * 24 * m["K"] * m["N"] for m in mms) / 1e9)
    assert r["prefill"]["weight_matmuls"]["of_standalone_rate"] > 0
    assert r["decode"]["weight_matmuls"]["bytes"] == sum(m["bytes"] for m in mms)
    assert r["decode"]["weight_matmuls"]["step_of_roofline"] < r["decode"]["weight_matmuls"]["of_roofline"]
    assert set(r["int8_gemm_gops"]) == {f"{m['K']}x{m['N']}" for m in mms} and min(r["int8_gemm_gops"].values()) > 0
    text = op_profile.report(r)
    assert "prefill: 24 position(s)" in text and "decode: 1 position(s) after 30 cached" in text


def test_a_directory_without_a_decoder_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="no decoder.onnx; pass an edge-vla bundle directory"):
        op_profile.analyse(tmp_path, prefill=8, past=8, runs=1)
