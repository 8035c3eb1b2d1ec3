"""`edge-vla bench`: fresh-process timings, side-by-side ratios, results files (timings never asserted)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_vla.errors import EdgeVLAError


def test_bench_two_artifacts_writes_results_with_ratios(tmp_path, tiny_vla):
    from edge_vla.cli import main
    from edge_vla.eval.results import load_results

    a = tiny_vla.save_pretrained(tmp_path / "a")
    b = tiny_vla.save_pretrained(tmp_path / "b")
    res = CliRunner().invoke(main, ["bench", str(a), str(b), "--calls", "2", "--warmup", "1", "-o", str(tmp_path / "out"),
                                    "--target", "orin-agx-64"])
    assert res.exit_code == 0, res.output
    assert "memory bandwidth" in res.output and "PROJECTED (not measured) calls/s" in res.output
    proj_line = next(ln for ln in res.output.splitlines() if "PROJECTED" in ln)
    # A projection is printed to 2 significant figures: "orin-agx-64 ~150", never "~153.4"
    import re
    shown = re.search(r"orin-agx-64 ~([0-9.e+]+)", proj_line).group(1)
    assert len(shown.replace(".", "").lstrip("0").rstrip("0") or "0") <= 2, proj_line
    files = sorted((tmp_path / "out").glob("bench-*.json"))
    assert [f.name for f in files] == ["bench-a-direct.json", "bench-b-direct.json"]
    doc = load_results(files[0])
    s = doc["summary"]
    assert doc["kind"] == "bench" and len(doc["records"]) == 2 and doc["environment"]["python"]
    assert doc["config"]["variant"]["backend"] == "torch" and doc["config"]["threads"] == 1
    assert set(s["components_ms"]) == {"vision", "prefill", "decode_token", "decode_body", "decode_head",
                                       "action_decode", "total"}
    assert s["decode_body_ms"] > 0 and s["decode_head_ms"] is not None  # torch: the head runs inside the step
    assert s["ratios_vs_first"]["speedup_per_action"] == 1.0 and s["ratios_vs_first"]["size"] == 1.0
    assert 0 < s["roofline_fraction"] and s["decoder_bytes"] > 0 and s["bundle_bytes"] > s["decoder_bytes"]
    assert s["peak_memory_mb"] > 0 and s["actions_per_s"] > 0 and s["tokens_per_action"] == 7
    # The tiny model is bound by the board's fixed costs (graph runs, kernel launches), not its bytes:
    # no projection of a 1M-parameter model's call beats them (it once said 9,212/s).
    assert 0 < s["projected_hz"]["orin-agx-64"] < 1000
    other = load_results(files[1])["summary"]["ratios_vs_first"]
    assert other["size"] == 1.0 and other["speedup_per_action"] > 0


def test_bench_refuses_missing_artifacts_and_bad_counts(tmp_path):
    from edge_vla.eval.bench import bench_artifacts

    with pytest.raises(EdgeVLAError, match="no checkpoint or bundle"):
        bench_artifacts([tmp_path / "nope"])
    with pytest.raises(EdgeVLAError, match="neither an edge-vla checkpoint .* nor a bundle"):
        bench_artifacts([tmp_path], calls=1)  # refused before any worker process starts
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EdgeVLAError, match="lacks model.safetensors"):
        bench_artifacts([tmp_path], calls=1)  # a half-written checkpoint says what it lacks
    with pytest.raises(EdgeVLAError, match="calls"):
        bench_artifacts([tmp_path / "nope"], calls=0)  # bad counts first: nothing is looked at


def test_bench_compare_head_splits_body_and_head_on_one_bundle(tmp_path, tiny_vla):
    """--compare-head: the same bundle's direct decode with the full LM head and with the restricted
    action head, both timed in one worker; the full head reads the vocabulary-sized lm_head graph."""
    from edge_vla.cli import main
    from edge_vla.export import export_bundle

    ckpt = tiny_vla.save_pretrained(tmp_path / "ckpt")
    bundle = export_bundle(ckpt, tmp_path / "bundle", precision="fp32", report=lambda *_: None)
    res = CliRunner().invoke(main, ["bench", str(bundle), str(ckpt), "--calls", "2", "--warmup", "1", "--compare-head",
                                    "--mode", "direct", "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    s = rows[0]["summary"]
    assert rows[0]["backend"] == "onnxruntime" and s["decode_body_ms"] > 0 and s["decode_head_ms"] > 0
    hc = s["head_compare"]
    for h in ("restricted", "full"):
        assert hc[h]["body_ms"] > 0 and hc[h]["head_ms"] > 0 and hc[h]["step_ms"] == hc[h]["body_ms"] + hc[h]["head_ms"]
    assert hc["speedup_decode_step"] > 0 and hc["speedup_head"] > 0
    assert hc["full"]["decoder_bytes"] > hc["restricted"]["decoder_bytes"] == s["decoder_bytes"]
    assert "no separate LM head" in rows[1]["summary"]["head_compare_note"]  # a torch checkpoint
    table = CliRunner().invoke(main, ["bench", str(bundle), "--calls", "1", "--warmup", "0", "--compare-head",
                                      "-o", str(tmp_path / "out2")])
    assert table.exit_code == 0 and "faster per step" in table.output, table.output


def test_one_run_times_the_same_artifact_in_two_modes(tmp_path, tiny_vla):
    from edge_vla.cli import main
    from edge_vla.eval.bench import split_mode
    from edge_vla.eval.results import load_results

    a = tiny_vla.save_pretrained(tmp_path / "a")
    assert split_mode(f"{a}@full") == (a, "full") and split_mode(a, "direct") == (a, "direct")
    weird = tmp_path / "x@full"  # a directory really named like that stays a path
    weird.mkdir()
    assert split_mode(weird) == (weird, None)
    res = CliRunner().invoke(main, ["bench", f"{a}@direct", f"{a}@full", "--calls", "2", "--warmup", "0",
                                    "--max-free-tokens", "3", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "out").glob("bench-*.json"))
    assert [f.name for f in files] == ["bench-a-direct.json", "bench-a-full.json"]
    assert [load_results(f)["config"]["variant"]["mode"] for f in files] == ["direct", "full"]
    bad = CliRunner().invoke(main, ["bench", str(a), "--data", str(tmp_path / "nope"), "--calls", "1"])
    assert bad.exit_code != 0 and "no dataset at" in bad.output


def test_a_call_without_decode_steps_has_no_per_token_time():
    """A parallel model in direct mode decodes its chunk inside the prefill: no decode step to time."""
    from edge_vla.eval.bench import _record
    from edge_vla.runtime.policy import ActionResult

    t = {"vision": 1.0, "prefill": 2.0, "action_decode": 0.1, "total": 3.2, "decode_tokens": [], "body": [], "head": [0.1]}
    rec = _record(ActionResult(action=None, timings=t, tokens={"action": 28, "reasoning": 0, "prompt": 20}))
    assert rec["decode_steps"] == 0 and rec["decode_token"] is None and rec["tokens"] == 28
    seq = _record(ActionResult(action=None, timings={**t, "body": [0.2] * 27}, tokens={"action": 28, "reasoning": 0,
                                                                                      "prompt": 20}))
    assert seq["decode_steps"] == 27 and seq["decode_token"] == pytest.approx(0.1 / 27)
