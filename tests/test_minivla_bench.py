"""benchmarks/minivla_e2e.py end to end on a tiny model: the random run in Prismatic's training
layout, `edge-vla import`, three `edge-vla export`s, every runtime timed in its own process, the
report written. Checks the report's rows and fields, never the timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "minivla_e2e.py"


def _bench():
    spec = importlib.util.spec_from_file_location("minivla_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~60-90 s on 2 busy cores: five model-building processes (write, import, 3 exports) + 4 workers
def test_the_minivla_benchmark_reports_every_runtime(tmp_path):
    bench = _bench()
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--work", str(tmp_path / "work"),
                          "--repeats", "1", "--reasoning-tokens", "4", "--lock", "", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["rows"]) == set(bench.RUNTIMES)
    for name, row in res["rows"].items():
        for k in bench.COMPONENTS:
            assert row[k] > 0 and row[k + "_cpu"] >= 0, (name, k)
        # a direct action is its vision prefix, prefill and action tokens (+ Python between them)
        assert row["direct_ms"] >= row["vision_ms"] + row["prefill_ms"], name
        assert row["reasoning_tokens"] == 4 and row["action_tokens"] == 7, name
        assert row["peak_rss_mb"] > 0 and row["disk_bytes"] > 0 and row["repeats"] == 1
        assert row["speedup_vs_torch"].keys() == {k + s for k in bench.COMPONENTS for s in ("", "_cpu")}
    assert res["rows"]["torch-fp32"]["speedup_vs_torch"]["direct_ms"] == pytest.approx(1.0)
    # full mode wrote the reasoning, " ACTION:" and the 7 action tokens through HF generate
    torch_row = res["rows"]["torch-fp32"]
    assert torch_row["generated_tokens_full"] > 4 + 7
    sizes = {p: res["steps"][f"export-{p}"]["bytes"] for p in bench.PRECISIONS}
    assert sizes["int4"] < sizes["fp32"] and sizes["int8"] < sizes["fp32"]
    for step in ("run", "import", "export-fp32", "export-int8", "export-int4"):
        s = res["steps"][step]
        assert s["wall_s"] > 0 and s["cpu_s"] > 0 and s["peak_rss_mb"] > 0 and s["bytes"] > 0, step
    assert res["rows"]["edge-vla-int8"]["disk_bytes"] == sizes["int8"]
    assert "torch-fp32" in run.stdout and "export-int4" in run.stdout  # the table printed


def test_the_random_run_is_the_prismatic_layout_minivla_imports(tmp_path):
    """The written run is what the importer reads as MiniVLA: Qwen's id layout (the 256 extra tokens
    at the end of the tokenizer, the embedding padded to a multiple of 64), the fused backbone."""
    import torch

    from edge_vla.model.importers import detect, read_released

    bench = _bench()
    paths = bench.write_run(tmp_path, "tiny")
    run = Path(paths["run"])
    assert detect(run) == "prismatic-pt"
    model = torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)["model"]
    assert set(model) == {"vision_backbone", "projector", "llm_backbone"}
    shape = bench.SHAPES["tiny"]
    rel = read_released(run, llm=paths["llm"])
    tok = rel.tokenizer
    n_tok = shape["base_vocab"] + len(bench.QWEN_SPECIALS) + 256
    assert tok.first_action_id == n_tok - 256  # extra_action_tokenizer: the last 256 ids with the extras
    assert shape["llm"]["vocab_size"] == -(-n_tok // 64) * 64
    assert rel.config.fused_vision and rel.config.projector == "fused-gelu-mlp"
    assert rel.config.lm["vocab_size"] == shape["llm"]["vocab_size"]
    # the real shape's numbers, as MiniVLA has them
    real = bench.SHAPES["minivla"]
    assert real["llm"]["vocab_size"] == -(-(real["base_vocab"] + len(bench.QWEN_SPECIALS) + 256) // 64) * 64 == 151936


def test_heavy_steps_wait_for_the_lock_flock_holds(tmp_path):
    """The benchmark's heavy steps and `flock FILE CMD` (how other engineers' heavy jobs take it)
    exclude each other: a step started while flock(1) holds the file runs only after it lets go."""
    import shutil
    import time

    if shutil.which("flock") is None:
        pytest.skip("util-linux flock is not installed")
    bench = _bench()
    lock = tmp_path / "heavy.lock"
    holder = subprocess.Popen(["flock", str(lock), "sh", "-c", f"touch {tmp_path / 'held'}; sleep 1.5"])
    try:
        while not (tmp_path / "held").exists():
            time.sleep(0.02)
        said = []
        t = time.perf_counter()
        m = bench.measured([sys.executable, "-c", "print('ran')"], str(lock), said.append)
        waited = time.perf_counter() - t
    finally:
        holder.wait()
    assert m["stdout"].strip() == "ran" and m["peak_rss_mb"] > 0
    assert holder.returncode == 0 and waited > 1.0 and said and "waiting for" in said[0]
