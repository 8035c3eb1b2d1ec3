"""pretrained/scene2-basket's make.sh and evaluate.sh: what they train, skip, ship and export, in which order.

The runs themselves take ~18 core-hours, so `edge-vla` is replaced here by a script that records its
arguments and writes what a finished run writes (a real tiny checkpoint as `final/`, a summary); the
shipping step (float16 re-save) and everything else in make.sh run for real.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "pretrained" / "scene2-basket" / "make.sh"
EVALUATE = MAKE.with_name("evaluate.sh")
SHIPPED = ["vla", "ecot", "ecot-lite-dropout", "ecot-lite-pretrain", "thinking-tokens", "ecot-distilled"]

STUB = """#!/usr/bin/env bash
# edge-vla stand-in: log the call, then write what the finished command would
echo "$*" >> "$LOG"
[ "$1 $2" = "data generate" ] && exit 0
[ "$1" = eval ] || [ "$1" = report ] && exit 0
if [ "$1" = export ]; then
    prev=""; for a in "$@"; do [ "$prev" = "-o" ] && mkdir -p "$a"; prev="$a"; done; exit 0
fi
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
name="$(basename "$out")"
case ",$FAIL," in *",$name,"*) echo "boom" >&2; exit 3;; esac
mkdir -p "$out" && cp -r "$TINY" "$out/final" && echo "{\\"run\\": \\"$name\\"}" > "$out/summary.json"
"""


def _run(tmp_path, tiny_ckpt, env_extra, shipped=SHIPPED, script=MAKE):
    ship, work, bin_ = tmp_path / "ship", tmp_path / "work", tmp_path / "bin"
    bin_.mkdir()
    for name in shipped:  # a shipped checkpoint: what MISSING_ONLY looks for
        (ship / name).mkdir(parents=True)
        (ship / name / "train_summary.json").write_text('{"shipped": true}')
    stub = bin_ / "edge-vla"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_}:{Path(sys.executable).parent}:{os.environ['PATH']}", "WORK": str(work),
           "SHIP": str(ship), "LOG": str(log), "TINY": str(tiny_ckpt), "JOBS": "2", **env_extra}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    calls = [c.split() for c in log.read_text().splitlines()]
    return r, calls, ship, work


def _trained(calls):
    return [c[c.index("--out") + 1].rsplit("/", 1)[1] for c in calls if c[0] in ("train", "distill")]


def _arg(call, flag):
    return call[call.index(flag) + 1]


def _last_set(call, key):
    """The value of the last `--set key=...` (the one that counts)."""
    return [call[i + 1].split("=", 1)[1] for i, a in enumerate(call)
            if a == "--set" and call[i + 1].startswith(key + "=")][-1]


def test_missing_only_trains_what_is_not_shipped_and_teaches_from_the_shipped(tmp_path, tiny_ckpt):
    r, calls, ship, work = _run(tmp_path, tiny_ckpt, {"MISSING_ONLY": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(_trained(calls)) == ["dropout-2layer", "ecot-lite-dropout-20000", "ecot-sequential", "scaffold",
                                       "vla-5000"]
    control = next(c for c in calls if c[0] == "train" and _arg(c, "--out").endswith("/vla-5000"))
    assert _arg(control, "--recipe") == "vla" and _last_set(control, "steps") == "5000"
    # twice the budget: the shipped dropout checkpoint trained on, at half the learning rate
    longer = next(c for c in calls if c[0] == "train" and _arg(c, "--out").endswith("/ecot-lite-dropout-20000"))
    assert _arg(longer, "--recipe") == "ecot-lite-dropout"
    assert _last_set(longer, "init_from") == str(ship / "ecot-lite-dropout")
    assert (_last_set(longer, "lr"), _last_set(longer, "steps"), _last_set(longer, "seed")) == ("5e-4", "10000", "1")
    student = next(c for c in calls if c[0] == "distill")
    assert _arg(student, "--teacher") == str(ship / "ecot-lite-dropout")  # its run is not in WORK
    for name in SHIPPED:  # kept as shipped, not replaced
        assert json.loads((ship / name / "train_summary.json").read_text()) == {"shipped": True}
    from safetensors import safe_open
    for name in ("scaffold", "dropout-2layer", "ecot-sequential", "vla-5000", "ecot-lite-dropout-20000"):
        assert json.loads((ship / name / "train_summary.json").read_text()) == {"run": name}
        with safe_open(str(ship / name / "model.safetensors"), "pt") as f:  # shipped in float16
            tensors = [f.get_tensor(k) for k in f.keys()]
        assert {str(t.dtype) for t in tensors if t.is_floating_point()} == {"torch.float16"}
    assert "scaffold: " not in r.stdout and "vla: shipped, kept (MISSING_ONLY=1)" in r.stdout


@pytest.mark.slow  # ships all eleven (a fresh interpreter each): ~1.5 min
def test_a_full_rebuild_trains_everything_and_students_learn_from_the_runs(tmp_path, tiny_ckpt):
    r, calls, ship, work = _run(tmp_path, tiny_ckpt, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(_trained(calls)) == sorted(SHIPPED + ["scaffold", "dropout-2layer", "ecot-sequential", "vla-5000",
                                                        "ecot-lite-dropout-20000"])
    teachers = {_arg(c, "--out").rsplit("/", 1)[1]: _arg(c, "--teacher") for c in calls if c[0] == "distill"}
    assert teachers == {"ecot-distilled": str(work / "ecot" / "final"),
                        "dropout-2layer": str(work / "ecot-lite-dropout" / "final")}
    # a student starts only after its teacher's run has ended
    order = _trained(calls)
    assert order.index("dropout-2layer") > order.index("ecot-lite-dropout")
    assert order.index("ecot-distilled") > order.index("ecot")
    assert json.loads((ship / "vla" / "train_summary.json").read_text()) == {"run": "vla"}


@pytest.mark.parametrize("fail", ["ecot-lite-dropout", "scaffold"])
def test_a_failed_run_stops_the_build_with_its_name(tmp_path, tiny_ckpt, fail):
    r, calls, ship, work = _run(tmp_path, tiny_ckpt, {"MISSING_ONLY": "1", "FAIL": fail},
                                shipped=[n for n in SHIPPED if n != fail])
    assert r.returncode != 0
    assert f"{fail} failed: see {work / fail}.log" in r.stdout
    assert not (ship / fail / "train_summary.json").exists()
    if fail == "ecot-lite-dropout":  # its student never starts without it
        assert "dropout-2layer" not in _trained(calls)


@pytest.mark.parametrize("with_data", [False, True])
def test_evaluate_exports_what_is_shipped_with_or_without_the_training_demos(tmp_path, tiny_ckpt, with_data):
    if with_data:  # make.sh's finished demos: the export checks parity on their held-out samples
        (tmp_path / "work" / "data").mkdir(parents=True)
        (tmp_path / "work" / "data" / "manifest.json").write_text("{}")
    r, calls, ship, work = _run(tmp_path, tiny_ckpt, {}, shipped=["vla", "ecot"], script=EVALUATE)
    assert r.returncode == 0, r.stdout + r.stderr
    exports = [c for c in calls if c[0] == "export"]
    assert [_arg(c, "-o").rsplit("/", 1)[1] for c in exports] == ["ecot", "vla"]
    assert all(("--data" in c) == with_data for c in exports)
    rolled = [_arg(c, "--out") for c in calls if c[:2] == ["eval", "libero"]]
    assert len(rolled) == 2 and "scaffold: not shipped yet, skipped" in r.stdout
    assert any(c[0] == "report" and "--baseline" in c for c in calls)
