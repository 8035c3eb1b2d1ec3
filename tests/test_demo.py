"""`edge-vla demo --quick`: the whole pipeline end to end on this CPU (slow: ~10-20 minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = ("vla", "ecot", "ecot-lite-dropout")


@pytest.mark.slow
@pytest.mark.libero
def test_quick_demo_writes_a_report_with_every_row(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "edge_vla", "demo", "--quick", "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    report_dir = out / "report"
    md = (report_dir / "report.md").read_text()
    html = (report_dir / "report.html").read_text()
    assert (report_dir / "pareto.png").stat().st_size > 1000
    for recipe in RECIPES:
        for precision in ("fp32", "int8", "int4"):
            assert (out / "bundles" / f"{recipe}-{precision}" / "manifest.json").exists()
        assert f"{recipe}-int8" in md and f"{recipe}-int8" in html
    assert "baseline" in md.lower()
    assert "http://" not in html and "https://" not in html.replace("https://github.com", "")  # self-contained
    # every stage is recorded, so a second run reuses all of it
    stages = json.loads((out / "stages.json").read_text())
    assert any(k.startswith("bench:") for k in stages) and sum(k.startswith("train:") for k in stages) == 3
    assert summary["seconds"] > 0
    rerun = subprocess.run([sys.executable, "-m", "edge_vla", "demo", "--quick", "--out", str(out), "--workers", "1"],
                           capture_output=True, text=True, env=env, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "train vla" not in rerun.stdout  # nothing retrained
