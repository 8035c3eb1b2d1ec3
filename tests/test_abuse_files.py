"""Damaged files: every reader gives one line (EdgeVLAError) naming the file, never a traceback.

Byte flips are drawn by hypothesis where they reach more cases than hand-picked ones; targeted
damage (one episode's image chunk, NaN in one episode) checks that the line names the episode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_vla.errors import EdgeVLAError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _demos(n=2, T=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"actions": rng.uniform(-0.9, 0.9, (T, 7)),
             "proprio": rng.normal(size=(T, 8)),
             "images": {"agentview": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
                        "wrist": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8)}}
            for _ in range(n)]


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    return write_libero_hdf5(tmp_path_factory.mktemp("h5") / "LIVING_ROOM_SCENE1_do_it_demo.hdf5", _demos(),
                             "do the task")


def _one_line(e: EdgeVLAError, *names):
    assert "\n" not in str(e), str(e)
    assert all(str(n) in str(e) for n in names), str(e)


def _read_everything(path):
    """What `data inspect`, `open_dataset` and training read: the index, then every sample."""
    from edge_vla.data.dataset import open_dataset
    from edge_vla.data.libero_hdf5 import LiberoHDF5

    with LiberoHDF5(path) as h:
        for d in h.demos:
            h.actions(d), h.proprio(d)
    ds = open_dataset(path, split="all", drop_noops=False, val_fraction=0.0)
    for i in range(len(ds)):
        ds[i]
    ds.close()


def _flip(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for pos, xor in flips:
        b[pos % len(b)] ^= xor
    return bytes(b)


# --- hdf5 ----------------------------------------------------------------------------------------
_FLIPS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=8)
# Damage: bytes flipped anywhere, or the file cut short (a copy that did not finish).
_DAMAGE = st.one_of(_FLIPS.map(lambda f: ("flip", f)), st.floats(0.0, 0.999).map(lambda k: ("cut", k)))


def _damaged(data: bytes, damage) -> bytes:
    how, arg = damage
    return _flip(data, arg) if how == "flip" else data[: int(len(data) * arg)]


@FUZZ
@given(damage=_DAMAGE)
def test_hdf5_damage_reads_or_gives_one_line(demo_file, tmp_path_factory, damage):
    bad = tmp_path_factory.mktemp("bad") / demo_file.name
    bad.write_bytes(_damaged(demo_file.read_bytes(), damage))
    try:
        _read_everything(bad)
    except EdgeVLAError as e:
        _one_line(e, bad)


def _damage_images(src: Path, dst: Path, demo: str, steps=None) -> None:
    """Flip the bytes of compressed image chunks (`steps`, default all) of `demo`'s agentview."""
    import h5py

    with h5py.File(src, "r") as f:
        ds = f[f"data/{demo}/obs/agentview_rgb"].id
        chunks = [ds.get_chunk_info(t) for t in (steps if steps is not None else range(ds.get_num_chunks()))]
    data = bytearray(src.read_bytes())
    for c in chunks:
        for i in range(c.byte_offset, c.byte_offset + c.size):
            data[i] ^= 0x5A
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def test_damaged_episode_names_file_and_episode_in_open_dataset_and_inspect(demo_file, tmp_path):
    from edge_vla.cli import main

    bad = tmp_path / "data" / demo_file.name
    _damage_images(demo_file, bad, "demo_1", [2])
    with pytest.raises(EdgeVLAError) as e:
        _read_everything(bad)
    _one_line(e.value, bad, "episode data/demo_1")
    res = CliRunner().invoke(main, ["data", "inspect", str(bad.parent), "--episode", "1", "--step", "2"])
    assert res.exit_code == 1 and res.output.startswith("error:") and res.output.count("\n") == 1, res.output
    assert "data/demo_1" in res.output and str(bad) in res.output


def test_damaged_episode_stops_training_with_one_line(tmp_path):
    from edge_vla.cli import main
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    good = write_libero_hdf5(tmp_path / "good" / "LIVING_ROOM_SCENE1_do_it_demo.hdf5", _demos(n=3), "do the task")
    bad = tmp_path / "data" / good.name
    _damage_images(good, bad, "demo_1")
    # One step whose batch holds every sample: the damaged episode is drawn.
    res = CliRunner().invoke(main, ["train", "--recipe", "vla", "--preset", "tiny", "--data", str(bad.parent),
                                    "--out", str(tmp_path / "run"), "--set", "steps=1", "--set", "batch_size=18",
                                    "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("error:") and res.output.count("\n") == 1, res.output
    assert f"{bad}, episode data/demo_1" in res.output


# --- NaN in the data -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["actions", "proprio"])
def test_nan_anywhere_is_refused_at_open_naming_file_and_episode(tmp_path, where):
    """One NaN in one step of one episode: open_dataset and `edge-vla train` refuse it before any
    batch is drawn, naming the file and the episode."""
    from edge_vla.cli import main
    from edge_vla.data.dataset import open_dataset
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    demos = _demos(n=3)
    demos[2][where][4, 1] = np.nan
    path = write_libero_hdf5(tmp_path / "data" / "LIVING_ROOM_SCENE1_do_it_demo.hdf5", demos, "do the task")
    with pytest.raises(EdgeVLAError) as e:
        open_dataset(path.parent, split="all")
    _one_line(e.value, path, "episode demo_2", "step 4")
    res = CliRunner().invoke(main, ["train", "--recipe", "vla", "--preset", "tiny", "--data", str(path.parent),
                                    "--out", str(tmp_path / "run"), "--set", "steps=4", "--set", "batch_size=4",
                                    "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("error:") and res.output.count("\n") == 1, res.output
    assert "demo_2" in res.output and str(path) in res.output


# --- ECoT JSON, checkpoint safetensors, bundle manifest and ONNX graphs -----------------------------
@pytest.fixture(scope="module")
def annotated(demo_file):
    """The demo file with its ECoT JSON beside it (every step of both demos annotated)."""
    from edge_vla.data.ecot_json import EcotAnnotations
    from edge_vla.tokens.reasoning import Reasoning

    ann = EcotAnnotations({})
    for k in range(2):
        steps = [Reasoning(task="do it", plan="1. a 2. b", visible_objects=[("cup", [1, 2, 5, 6])],
                           subtask_reason="r", subtask="a", move_reason="m", move="move down") for _ in range(6)]
        ann.set_episode(demo_file.name, k, steps, [(t, t + 1) for t in range(6)])
    return demo_file, ann.save(demo_file.parent / "LIVING_ROOM_SCENE1_do_it_ecot.json").read_bytes()


@FUZZ
@given(damage=_DAMAGE)
def test_ecot_json_damage_reads_or_gives_one_line(annotated, tmp_path_factory, damage):
    from edge_vla.data.dataset import open_dataset

    demo_file, text = annotated
    d = tmp_path_factory.mktemp("ecot")
    shutil.copy(demo_file, d / demo_file.name)
    bad = d / "LIVING_ROOM_SCENE1_do_it_ecot.json"
    bad.write_bytes(_damaged(text, damage))
    try:
        ds = open_dataset(d / demo_file.name, split="all", annotations=bad, val_fraction=0.0)
        for i in range(len(ds)):
            ds[i]
    except EdgeVLAError as e:
        assert "\n" not in str(e), str(e)


@pytest.fixture(scope="module")
def ckpt_and_bundle(tiny_vla, tmp_path_factory):
    from edge_vla.export import export_bundle

    ckpt = tiny_vla.save_pretrained(tmp_path_factory.mktemp("ckpt") / "ckpt")
    return ckpt, export_bundle(ckpt, tmp_path_factory.mktemp("b") / "bundle", precision="fp32", report=lambda *_: None)


@settings(FUZZ, max_examples=25)
@given(damage=_DAMAGE)
def test_checkpoint_safetensors_damage_loads_or_gives_one_line(ckpt_and_bundle, tmp_path_factory, damage):
    """Flips inside the tensor data load (a checkpoint has no checksums); the rest is one line."""
    from edge_vla.model.vla import VLA

    ckpt, _ = ckpt_and_bundle
    d = tmp_path_factory.mktemp("c") / "ckpt"
    shutil.copytree(ckpt, d)
    f = d / "model.safetensors"
    f.write_bytes(_damaged(f.read_bytes(), damage))
    try:
        VLA.from_pretrained(d)
    except EdgeVLAError as e:
        _one_line(e, f)


@settings(FUZZ, max_examples=30)
@given(name=st.sampled_from(["manifest.json", "decoder.onnx", "action_head.onnx", "tokenizer/tokenizer.json"]),
       damage=_DAMAGE)
def test_bundle_damage_gives_one_line_before_any_graph_runs(ckpt_and_bundle, tmp_path_factory, name, damage):
    from edge_vla.runtime.policy import load_policy

    _, bundle = ckpt_and_bundle
    d = tmp_path_factory.mktemp("b") / "bundle"
    shutil.copytree(bundle, d)
    f = d / name
    data = f.read_bytes()
    bad = _damaged(data, damage)
    f.write_bytes(bad)
    try:
        load_policy(d)
    except EdgeVLAError as e:
        assert "\n" not in str(e) and str(d) in str(e), str(e)
    else:  # only a manifest edit that leaves every checked field intact loads
        assert name == "manifest.json" or bad == data
