"""Nothing lost: every command that writes a directory replaces only what it may.

An output directory may be missing, empty, or a previous output of the same kind; anything else
is refused unless --overwrite, and an input never is. Killed writers leave staging siblings that
the next write of the same output removes, and a previous output moved aside by a writer killed
between its two renames is put back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_vla.errors import EdgeVLAError


@pytest.fixture(scope="module")
def ckpt(tiny_vla, tmp_path_factory):
    return tiny_vla.save_pretrained(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from edge_vla.export import export_bundle

    return export_bundle(ckpt, tmp_path_factory.mktemp("bundle") / "bundle", precision="fp32",
                         report=lambda *_: None)


def _export(*args):
    from edge_vla.cli import main

    return CliRunner().invoke(main, ["export", *map(str, args)])


def _refused(res, *words):
    """The CLI said one line (`error: ...`) holding `words` and exited 1."""
    out = res.output.strip()
    assert res.exit_code == 1 and out.startswith("error:") and "\n" not in out, res.output
    assert all(w in out for w in words), out


def _tree(p: Path) -> dict:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


# --- export -o -----------------------------------------------------------------------------------
def test_export_onto_its_own_checkpoint_is_refused_even_with_overwrite(ckpt):
    before = _tree(ckpt)
    for extra in ((), ("--overwrite",)):
        res = _export(ckpt, "--fp32", "-o", ckpt, *extra)
        _refused(res, "is the input")
    assert _tree(ckpt) == before  # model.safetensors and config.json are still there


def test_export_onto_a_folder_holding_its_checkpoint_is_refused(ckpt):
    res = _export(ckpt, "--fp32", "-o", ckpt.parent, "--overwrite")
    _refused(res, "holds the input")
    assert (ckpt / "model.safetensors").is_file()


def test_export_onto_a_foreign_folder_is_refused_without_overwrite(ckpt, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    res = _export(ckpt, "--fp32", "-o", precious)
    _refused(res, "not a previous bundle", "--overwrite")
    assert (precious / "notes.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # and nothing staged beside it


def test_export_onto_another_checkpoint_is_refused(ckpt, tiny_vla, tmp_path):
    other = tiny_vla.save_pretrained(tmp_path / "other")
    res = _export(ckpt, "--fp32", "-o", other)
    _refused(res, "it is a checkpoint")
    assert (other / "model.safetensors").is_file()


def test_a_bundle_is_replaced_and_overwrite_replaces_a_foreign_folder(ckpt, bundle, tmp_path):
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.export import export_bundle

    again = export_bundle(ckpt, bundle, precision="fp32", report=lambda *_: None)  # a bundle: replaced
    load_bundle(again)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    export_bundle(ckpt, precious, precision="fp32", report=lambda *_: None, overwrite=True)
    assert not (precious / "notes.txt").exists() and load_bundle(precious)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_save_pretrained_replaces_a_checkpoint_but_not_a_bundle_or_a_folder(tiny_vla, bundle, tmp_path):
    from edge_vla.model.vla import VLA

    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    tiny_vla.save_pretrained(path)  # a checkpoint over a checkpoint: the usual re-save
    VLA.from_pretrained(path)
    before = _tree(bundle)
    with pytest.raises(EdgeVLAError, match="not a previous checkpoint .it is a bundle"):
        tiny_vla.save_pretrained(bundle)
    assert _tree(bundle) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(EdgeVLAError, match=r"overwrite=True in Python"):
        tiny_vla.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]
    # The fix the message names works: asked for, the folder is replaced by a checkpoint.
    VLA.from_pretrained(tiny_vla.save_pretrained(tmp_path / "notes", overwrite=True))
    assert not (tmp_path / "notes" / "a.txt").exists()


# --- staging of killed writers -------------------------------------------------------------------
def test_killed_export_leaves_only_what_the_next_export_cleans(ckpt, tmp_path):
    """SIGKILL a real `edge-vla export` once its staging folder exists; the next export of the same
    output removes the folder (and an old-style pid-less one), not a stranger's."""
    out = tmp_path / "bundle"
    code = textwrap.dedent(f"""
        import os, sys, time
        import edge_vla.export.steps as steps
        real = steps.export_fp32_graphs
        def graphs_then_hang(*a, **k):
            r = real(*a, **k)
            print("STAGED", flush=True)
            time.sleep(600)
        steps.export_fp32_graphs = graphs_then_hang
        steps.export_bundle({str(ckpt)!r}, {str(out)!r}, precision="fp32", report=lambda *_: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STAGED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".bundle.export.pid") and not out.exists()
    (tmp_path / ".bundle.export.k2j4n1x9").mkdir()  # edge-vla 0.x staging: no pid in its name
    (tmp_path / ".bundle.qwerty12.tmp").mkdir()
    (tmp_path / ".bundle2.export.pid1.abcdefgh").mkdir()  # another output's: not ours to clean
    from edge_vla.export import export_bundle

    export_bundle(ckpt, out, precision="fp32", report=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle2.export.pid1.abcdefgh", "bundle"]


def test_a_live_writers_staging_is_left_alone(tmp_path):
    from edge_vla.io import clean_staging

    live = tmp_path / f".out.pid{os.getppid()}.abcdefgh.tmp"
    live.mkdir()
    clean_staging(tmp_path / "out")
    assert live.is_dir()


def test_killed_between_the_two_renames_keeps_the_last_good_output(ckpt, bundle, tmp_path):
    """A writer killed after moving the old bundle aside and before moving the new one in: the next
    write (here a failing one) puts the old one back, and it still loads."""
    import shutil

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.io import atomic_directory

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    dead = _dead_pid()
    os.replace(out, tmp_path / f".bundle.pid{dead}.old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, kind="edge-vla-bundle"):
            raise RuntimeError("killed again")
    assert load_bundle(out) and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- manifest paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["/etc/hostname", "../outside.onnx", "tokenizer/../../outside.onnx", "link.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, rel):
    import shutil

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.io import sha256_file

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not yours")
    if rel == "link.onnx":
        (b / rel).symlink_to(outside)
    m = json.loads((b / "manifest.json").read_text())
    target = outside if rel != "/etc/hostname" else Path(rel)
    m["files"][rel] = sha256_file(target)
    m["graphs"]["lm_head"]["file"] = rel
    (b / "manifest.json").write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(EdgeVLAError, match="outside the bundle"):
            load_bundle(b, verify=verify)


# --- directories written in place: runs, generated datasets ----------------------------------------
def _precious(tmp_path) -> Path:
    p = tmp_path / "precious"
    p.mkdir()
    (p / "notes.txt").write_text("x")
    (p / "summary.json").write_text("{}")  # a name a run writes too
    return p


def test_train_and_distill_refuse_a_foreign_folder_and_overwrite_starts_over(ckpt, tmp_path):
    from conftest import make_samples
    from edge_vla.cli import main
    from edge_vla.data.libero_hdf5 import write_libero_hdf5
    from edge_vla.train.config import TrainConfig
    from edge_vla.train.trainer import train

    precious = _precious(tmp_path)
    common = ["--recipe", "vla", "--preset", "tiny", "--set", "steps=1", "--set", "batch_size=2", "--no-progress"]
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nodata"), "--out", str(precious), *common])
    _refused(res, "not a previous run directory", "--overwrite")
    res = CliRunner().invoke(main, ["distill", "--teacher", str(ckpt), "--data", str(tmp_path / "nodata"),
                                    "--out", str(precious), "--no-progress"])
    _refused(res, "not a previous run directory")
    assert (precious / "notes.txt").read_text() == "x" and (precious / "summary.json").read_text() == "{}"
    res = CliRunner().invoke(main, ["train", "--data", str(precious), "--out", str(precious), "--overwrite", *common])
    _refused(res, "is the input")
    res = CliRunner().invoke(main, ["train", "--data", "d", "--out", str(precious), "--overwrite", "--resume", *common])
    _refused(res, "--overwrite", "--resume")
    cfg = TrainConfig(recipe="vla", steps=1, batch_size=2, val_fraction=0.0)
    final = train(cfg, make_samples(4), precious, show_progress=False, overwrite=True)
    assert final.is_dir() and not (precious / "notes.txt").exists()


def test_data_generate_refuses_a_foreign_folder(tmp_path):
    from edge_vla.data.generate import generate_dataset

    precious = _precious(tmp_path)
    (precious / "manifest.json").write_text('{"format": "edge-vla-bundle"}')
    with pytest.raises(EdgeVLAError, match="not a previous libero-dataset .it is a bundle"):
        generate_dataset(precious, tasks=["x"], progress=False)
    assert sorted(p.name for p in precious.iterdir()) == ["manifest.json", "notes.txt", "summary.json"]
