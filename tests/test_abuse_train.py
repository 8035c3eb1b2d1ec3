"""Training state: nothing pickled, nothing executed, and a resume never silently starts over.

The state is safetensors + JSON (edge_vla.train.state); a pickle planted in a run directory is
never loaded; a damaged state file is one line naming it; a run killed between the two renames
of the state swap resumes from the last complete state, bit for bit."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import make_samples
from edge_vla.errors import EdgeVLAError
from edge_vla.train.config import TrainConfig
from edge_vla.train.trainer import train

CFG = TrainConfig(recipe="vla", steps=4, batch_size=4, warmup_steps=1, lr=3e-3, log_every=1, val_fraction=0.0)


@pytest.fixture(scope="module")
def data():
    return make_samples(12, seed=2)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    return load_file(str(train(CFG, data, tmp_path_factory.mktemp("straight"), show_progress=False)
                         / "model.safetensors"))


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A run pre-empted after step 2 (its state saved)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(CFG, data, out, stop_at_step=2, show_progress=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _mark_metrics(run: Path, upto: int) -> None:
    """Tag the metric lines of steps <= `upto`: a resume keeps them, a run that starts over rewrites them."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "kept": r["step"] <= upto}) + "\n" for r in lines))


def _kept(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kept")]


def _no_pickles(state: Path) -> None:
    for f in state.rglob("*"):
        if f.is_file():  # every file is JSON or safetensors
            assert f.suffix in (".json", ".safetensors"), f
            (json.loads(f.read_text()) if f.suffix == ".json" else load_file(str(f)))


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Marker:
    """Unpickling this writes a file: what a crafted pickle could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_state_holds_no_pickle_and_a_planted_one_is_never_loaded(stopped, data, straight, tmp_path):
    run = _copy(stopped, tmp_path)
    state = run / "state"
    _no_pickles(state)
    marker = tmp_path / "marker"
    evil = pickle.dumps(_Marker(marker))
    (state / "accelerate").mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (state / "accelerate" / name).write_bytes(evil)
        (state / name).write_bytes(evil)
    final = train(CFG, data, run, resume=True, show_progress=False)
    assert not marker.exists()
    _same(straight, load_file(str(final / "model.safetensors")))


def test_a_pickled_state_of_an_earlier_version_is_refused_in_one_line(stopped, data, tmp_path):
    run = _copy(stopped, tmp_path)
    state = run / "state"
    for f in list(state.iterdir()):
        if f.name != "trainer.json":
            f.unlink()
    (state / "accelerate").mkdir()
    marker = tmp_path / "marker"
    (state / "accelerate" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(EdgeVLAError, match="pickles") as e:
        train(CFG, data, run, resume=True, show_progress=False)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.json", "model.safetensors",
                                  "scheduler.json", "rng_0.json", "rng_0.safetensors"])
def test_a_truncated_state_file_is_one_line_naming_it(stopped, data, tmp_path, name):
    run = _copy(stopped, tmp_path)
    f = run / "state" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(EdgeVLAError) as e:
        train(CFG, data, run, resume=True, show_progress=False)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("left", [".state.old", ".state.tmp"])
def test_killed_between_the_two_renames_resumes_from_the_last_state(stopped, data, straight, tmp_path, left):
    """Only `.state.old` (the previous state) or a complete `.state.tmp` (the new one) is left:
    --resume continues from it to the same weights as the run never killed."""
    run = _copy(stopped, tmp_path)
    _mark_metrics(run, 2)
    os.replace(run / "state", run / left)
    final = train(CFG, data, run, resume=True, show_progress=False)
    metrics = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4] and _kept(run) == [1, 2]  # steps 1-2 were not trained again
    _same(straight, load_file(str(final / "model.safetensors")))
    assert not (run / left).exists()


def test_sigkill_mid_run_then_resume_reaches_the_same_weights(data, straight, tmp_path):
    """A real kill, wherever it lands once a state exists (mid-step, mid-save, mid-swap): --resume
    ends where the run never killed ends."""
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    run = tmp_path / "run"
    cfg = {**asdict(CFG), "save_every": 1}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from conftest import make_samples\n"
            "from edge_vla.train.config import TrainConfig\n"
            "from edge_vla.train.trainer import train\n"
            f"train(TrainConfig(**{cfg!r}), make_samples(12, seed=2), {str(run)!r}, show_progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while not (run / "state" / "trainer.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = next(json.loads((d / "trainer.json").read_text())["step"] for d in
                 (run / "state", run / ".state.tmp", run / ".state.old") if (d / "trainer.json").is_file())
    _no_pickles(next(d for d in (run / "state", run / ".state.old") if d.is_dir()))
    _mark_metrics(run, saved)
    final = train(TrainConfig(**cfg), data, run, resume=True, show_progress=False)
    assert _kept(run) == list(range(1, saved + 1))
    _same(straight, load_file(str(final / "model.safetensors")))
    assert not [e.name for e in run.iterdir() if ".pid" in e.name]  # no killed writer's staging left inside


# --- byte flips in the state files -----------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny_vla, tmp_path_factory):
    """A model, optimizer (one step taken) and scheduler, and their saved state."""
    from accelerate import Accelerator

    from edge_vla.train.state import write_state

    model = copy.deepcopy(tiny_vla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    sched.step()
    acc = Accelerator(cpu=True)
    d = tmp_path_factory.mktemp("state")
    write_state(d, acc, model, opt, sched)
    return d, acc, model, opt, sched


STATE_FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_0.json",
               "rng_0.safetensors"]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(STATE_FILES), pos=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
       cut=st.booleans())
def test_damaged_state_reads_or_gives_one_line(live, tmp_path_factory, name, pos, xor, cut):
    from edge_vla.train.state import read_state

    src, acc, model, opt, sched = live
    d = tmp_path_factory.mktemp("bad")
    for f in src.iterdir():
        shutil.copy(f, d / f.name)
    data = bytearray((src / name).read_bytes())
    i = int(pos * len(data))
    if cut:
        data = data[:i]
    else:
        data[i] ^= xor
    (d / name).write_bytes(bytes(data))
    try:
        read_state(d, acc, model, opt, sched)
    except EdgeVLAError as e:
        assert "\n" not in str(e) and str(d) in str(e), str(e)
