import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.eval.report import build_report, collect, add_ratios, pareto_front
from edge_vla.eval.results import load_results

FIXTURES = Path(__file__).parent / "fixtures" / "results"


def test_report_from_fixtures(tmp_path):
    info = build_report([FIXTURES], tmp_path / "rep")
    rows = {r["variant"]: r for r in info["variants"]}
    assert info["baseline"] == "ecot-full-fp32"
    # shards of one run merge into one variant with all 10 episodes
    lite = rows["ecot-lite-dropout-int8"]
    assert (lite["successes"], lite["episodes"]) == (8, 10)
    base = rows["ecot-full-fp32"]
    assert base["baseline"] and base["success_rate"] == pytest.approx(0.9)
    assert lite["success_vs_baseline"] == pytest.approx(0.8 / 0.9)
    assert lite["speedup_vs_baseline"] == pytest.approx(base["latency_p50_ms"] / lite["latency_p50_ms"])
    assert lite["speedup_vs_baseline"] > 20
    # the bench of the same variant contributes projected Hz per target
    assert lite["projected_hz"]["orin-nx-16gb"] == pytest.approx(17.5)
    # chunks of 4 executed per call with 7 tokens per call -> 7/4 tokens per action
    assert lite["tokens_per_action"] == pytest.approx(7 / 4)
    lo, hi = lite["success_ci95"]
    assert 0.4 < lo < 0.8 < hi < 1.0

    out = tmp_path / "rep"
    md = (out / "report.md").read_text()
    assert "ecot-full-fp32 (baseline)" in md and "pareto.png" in md and "Hz @ agx-orin" in md
    page = (out / "report.html").read_text()
    # self-contained: the plot is inlined, nothing is fetched from elsewhere
    assert "data:image/png;base64," in page
    assert not re.search(r'(src|href)=["\'](https?:|//)', page)
    assert "<link" not in page and "<script" not in page
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_baseline_leaves_ratios_empty(tmp_path):
    variants = collect([FIXTURES / "vla_int4.json"])
    assert add_ratios(variants) is None
    assert variants[0].row["speedup_vs_baseline"] is None


def test_a_named_baseline_wins_over_the_default_full_cot_choice(tmp_path):
    # two full-CoT `ecot` variants (a fair parallel one and the published sequential one): by
    # default the first by name, or the one the user names; an unknown name is a clear error
    doc = json.loads((FIXTURES / "ecot_full.json").read_text())
    doc["config"]["variant"]["name"] = "ecot-sequential"
    (tmp_path / "seq.json").write_text(json.dumps(doc))
    runs = [FIXTURES / "ecot_full.json", tmp_path / "seq.json", FIXTURES / "vla_int4.json"]
    assert build_report(runs, tmp_path / "a")["baseline"] == "ecot-full-fp32"
    info = build_report(runs, tmp_path / "b", baseline="ecot-sequential")
    assert info["baseline"] == "ecot-sequential"
    assert "Baseline: **ecot-sequential** (recipe `ecot`, mode `full`)" in (tmp_path / "b" / "report.md").read_text()
    with pytest.raises(EdgeVLAError, match="unknown baseline variant `ecot-seq`") as e:
        build_report(runs, tmp_path / "c", baseline="ecot-seq")
    assert "did you mean `ecot-sequential`" in e.value.fix


def test_pareto_front():
    # (latency, success): B dominates C; A is slow but best
    pts = [(100.0, 0.9), (10.0, 0.8), (20.0, 0.7), (5.0, 0.5)]
    assert pareto_front(pts) == [3, 1, 0]


def test_report_refuses_other_schema(tmp_path):
    doc = json.loads((FIXTURES / "vla_int4.json").read_text())
    doc["schema_version"] = 99
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(EdgeVLAError, match="schema version 99"):
        build_report([bad], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_report_cli(tmp_path):
    from click.testing import CliRunner

    from edge_vla.cli import main

    r = CliRunner().invoke(main, ["report", str(FIXTURES / "ecot_full.json"), str(FIXTURES / "vla_int4.json"),
                                  "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "2 variant(s)" in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope.json"), "-o", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "results file not found" in r.output and "Traceback" not in r.output


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    """Renders the HTML with a real browser, offline; the screenshot is kept for a human to look at."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (apt-get install -y chromium)")
    build_report([FIXTURES], tmp_path / "rep")
    png = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1600,1400", f"--screenshot={png}", (tmp_path / "rep" / "report.html").as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    keep = Path(__file__).parent.parent / "build" / "report_screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    keep.write_bytes(data)


def test_bench_of_the_same_artifact_joins_its_rollouts(tmp_path):
    from edge_vla.eval.results import write_results

    env = {"python": "3.11"}
    ep = {"id": "libero_90/t/0", "suite": "libero_90", "task": "t", "success": True, "steps": 10,
          "actions_executed": 10, "latency_ms": [5.0] * 10, "tokens_generated": 70}
    write_results(tmp_path / "roll.json", "libero", {"policy": str(tmp_path / "bundle"), "variant": {
        "name": "bundle-direct", "recipe": "vla", "mode": "direct", "precision": "int8", "backend": "onnxruntime"}},
        [ep], environment=env)
    write_results(tmp_path / "bench.json", "bench", {"artifact": str(tmp_path / "bundle"), "variant": {
        "recipe": "vla", "mode": "direct", "precision": "int8", "backend": "onnxruntime", "target": "cpu"}},
        [{"latency_ms": 4.0}], summary={"latency_p50_ms": 4.0, "peak_memory_mb": 99.0, "bundle_bytes": 12345,
                                        "projected_hz": {"agx-orin": 50.0}}, environment=env)
    (v,) = collect([tmp_path / "roll.json", tmp_path / "bench.json"])
    assert v.name == "bundle-direct" and len(v.sources) == 2
    assert v.row["projected_hz"] == {"agx-orin": 50.0} and v.row["peak_memory_mb"] == 99.0
    assert v.row["latency_p50_ms"] == 5.0  # the rollout's own latency wins over the bench's


def test_scripted_expert_is_a_reference_not_a_variant(tmp_path):
    from edge_vla.eval.results import write_results

    ep = {"id": "libero_90/t/0", "suite": "libero_90", "task": "t", "success": True, "steps": 80,
          "actions_executed": 80, "latency_ms": [0.4] * 80, "tokens_generated": 0}
    write_results(tmp_path / "expert.json", "libero", {"policy": "expert", "variant": {
        "name": "scripted-expert", "mode": "expert", "backend": "sim"}}, [ep], environment={"python": "3.11"})
    variants = {v.name: v for v in collect([FIXTURES / "ecot_full.json", tmp_path / "expert.json"])}
    add_ratios(list(variants.values()))
    assert variants["scripted-expert"].row["speedup_vs_baseline"] is None
    assert variants["scripted-expert"].row["success_rate"] == 1.0


def test_report_says_which_models_are_shipped_and_which_live(tmp_path):
    from edge_vla.pipeline import model_provenance

    live = tmp_path / "train" / "ecot" / "final"
    live.mkdir(parents=True)
    (live.parent / "summary.json").write_text(json.dumps({"steps": 300, "final_val": {"action_token_acc": 0.61}}))
    shipped = tmp_path / "pretrained" / "ecot"
    shipped.mkdir(parents=True)
    (shipped / "train_summary.json").write_text(json.dumps(
        {"steps": 6000, "final_val": {"action_token_acc": 0.93, "reasoning_loss": 0.05}, "command": "edge-vla train ..."}))
    models = [model_provenance("ecot", live, "live", compared=False),
              model_provenance("ecot", shipped, "shipped", compared=True)]
    (shipped.parent / "vla").mkdir()
    (shipped.parent / "vla" / "train_summary.json").write_text(json.dumps(
        {"steps": 6000, "final_val": {"action_token_acc": 0.9, "reasoning_loss": 12.9}}))
    vla = model_provenance("vla", shipped.parent / "vla", "shipped", compared=True)
    assert "reasoning_loss" not in vla["final_val"]  # a recipe that never learns reasoning is not scored on it
    assert models[0]["steps"] == 300 and models[1]["final_val"]["action_token_acc"] == 0.93
    info = build_report([FIXTURES], tmp_path / "rep", models=models)
    assert [m["source"] for m in info["models"]] == ["live", "shipped"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Models" in md and "| ecot | shipped | 6000 | – | 0.930 | 0.050 |" in md
    assert "compare the **shipped** checkpoints of `ecot`" in md
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Models</h2>" in page and "<td>shipped</td>" in page


def test_a_shipped_fine_tune_reports_its_decoding_and_every_runs_steps(tmp_path, tiny_vla):
    from edge_vla.eval.report import model_rows
    from edge_vla.pipeline import model_provenance

    ckpt = tiny_vla.save_pretrained(tmp_path / "ecot-lite-dropout")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "parallel_actions": True}))
    (ckpt / "train_summary.json").write_text(json.dumps(
        {"steps": 600, "final_val": {"action_token_acc": 0.74}, "config": {"init_from": "runs/x/final"}}))
    (ckpt / "base_train_summary.json").write_text(json.dumps({"steps": 1500}))
    m = model_provenance("ecot-lite-dropout", ckpt, "shipped", compared=True)
    assert m["action_decoding"] == "parallel" and m["base_steps"] == [1500]
    assert model_rows([m])[0][2:4] == ["1500 + 600 fine-tuning", "parallel"]
    # a chain of earlier runs (make.sh's phases), earliest first
    (ckpt / "base_train_summary.json").write_text(json.dumps([{"steps": 3000}, {"steps": 1000}]))
    m = model_provenance("ecot-lite-dropout", ckpt, "shipped", compared=True)
    assert model_rows([m])[0][2] == "3000 + 1000 + 600 fine-tuning"


def test_quantized_agreement_comes_from_the_export_report_in_the_mode_benched(tmp_path):
    from edge_vla.eval.bench import quantized_agreement
    from edge_vla.eval.report import table_rows
    from edge_vla.eval.results import write_results

    manifest = {"accuracy": {"direct": {"action_token_agreement": 0.981, "action_token_agreement_tf": 0.996},
                             "full": {"action_token_agreement": 0.97, "action_token_agreement_tf": 0.993}}}
    assert quantized_agreement(manifest, "full") == {"free_running": 0.97, "teacher_forced": 0.993}
    assert quantized_agreement(manifest, "adaptive") == quantized_agreement(manifest, "direct")
    assert quantized_agreement({"accuracy": None}, "direct") is None  # an fp32 bundle has no report
    write_results(tmp_path / "bench.json", "bench", {"artifact": str(tmp_path / "b"), "variant": {
        "recipe": "vla", "mode": "direct", "precision": "int8", "backend": "onnxruntime"}}, [{"latency_ms": 4.0}],
        summary={"latency_p50_ms": 4.0, "agreement_vs_fp32": quantized_agreement(manifest, "direct")},
        environment={"python": "3.11"})
    variants = collect([tmp_path / "bench.json"])
    add_ratios(variants)
    header, rows, _ = table_rows(variants)
    assert rows[0][header.index("vs fp32 tokens")] == "98.1% / 99.6%"


def test_students_are_set_beside_their_teachers(tmp_path):
    """A reasoning-distilled student sits beside the baseline (its teacher's recipe, the variant
    every ratio is against), a size-distilled one beside its teacher's variant in its own mode."""
    base = json.loads((FIXTURES / "ecot_full.json").read_text())
    seq = json.loads(json.dumps(base))
    seq["config"]["variant"]["name"] = "ecot-sequential"
    student = json.loads((FIXTURES / "vla_int4.json").read_text())
    student["config"]["variant"].update(name="ecot-distilled", distilled={"mode": "reasoning", "teacher_recipe": "ecot"})
    small = json.loads((FIXTURES / "vla_int4.json").read_text())
    small["config"]["variant"].update(name="vla-2layer", bundle_bytes=47000000,
                                      distilled={"mode": "size", "teacher_recipe": "vla"})
    orphan = json.loads((FIXTURES / "vla_int4.json").read_text())
    orphan["config"]["variant"].update(name="scaffold-small", recipe="scaffold",
                                       distilled={"mode": "size", "teacher_recipe": "scaffold-big"})
    for name, doc in (("base", base), ("seq", seq), ("student", student), ("small", small), ("orphan", orphan)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    runs = [tmp_path / f"{n}.json" for n in ("base", "seq", "student", "small", "orphan")] + [FIXTURES / "vla_int4.json"]
    build_report(runs, tmp_path / "rep", baseline="ecot-sequential")
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Students and their teachers")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in section.splitlines() if line.startswith("| ")}
    assert rows["ecot-distilled"][1:3] == ["ecot (reasoning)", "ecot-sequential"]  # the named baseline
    assert rows["vla-2layer"][1:3] == ["vla (size)", "vla-int4"]
    assert rows["vla-2layer"][-2:] == ["44.8 MiB", "89.6 MiB |"]
    assert rows["scaffold-small"][2] == "– (not in these results)"
    assert "ecot-full-fp32" not in section and "Students and their teachers" in (tmp_path / "rep" / "report.html").read_text()


def test_label_offsets_keep_close_variants_names_apart():
    """The demo's variants sit close together (6.5 ms / 27% beside 7.2 ms / 22%): their names must not
    cover each other; a variant far from the others keeps the default place."""
    from edge_vla.eval.report import CHAR_W_PT, LABEL_H_PT, LABEL_OFFSETS, PLOT_H_PT, PLOT_W_PT, label_offsets

    pts = [(6.5, 27.0), (7.2, 22.0), (8.0, 32.0), (135.8, 1.0)]
    names = ["thinking-tokens-direct", "ecot-lite-dropout-direct", "vla-direct", "ecot-full (full CoT)"]
    x_range = (4.0, 340.0)
    offs = label_offsets(pts, names, x_range)
    assert offs[0] == LABEL_OFFSETS[0] and offs[3] == LABEL_OFFSETS[0]
    lo, hi = math.log(x_range[0]), math.log(x_range[1])
    boxes = []
    for (lat, pct), name, (dx, dy) in zip(pts, names, offs):
        px, py = (math.log(lat) - lo) / (hi - lo) * PLOT_W_PT, (pct + 5) / 110 * PLOT_H_PT
        boxes.append((px + dx, py + dy, px + dx + CHAR_W_PT * len(name), py + dy + LABEL_H_PT))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
