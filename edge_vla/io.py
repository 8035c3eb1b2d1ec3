"""Atomic file and directory writes: a reader never sees half a file, a crash loses nothing.

An output directory is written through `atomic_directory`, which replaces only what it may: an
empty or missing directory, or a previous output of the same kind (its marker file names its
`format`). Anything else, and any input of the command, is refused unless told to overwrite
(inputs: always). Staging siblings of killed writers (`.NAME.pidN.*.tmp`, `.NAME.export.*`) are
cleaned, and a directory moved aside by a writer killed between its two renames is put back, at
the next write of the same output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

# The files in which edge-vla outputs say what they are ({"format": "edge-vla-..."}): a bundle's
# and a generated dataset's manifest.json, a checkpoint's config.json.
MARKER_FILES = ("manifest.json", "config.json")
# What each kind of output holds at its top level (fnmatch patterns). A directory without a
# readable marker that holds only these is an earlier output of that kind, damaged or cut short
# (a broken config.json, a generation killed before its manifest): re-writing it is the fix.
OUTPUT_ENTRIES = {
    "edge-vla-checkpoint": ("config.json", "model.safetensors", "tokenizer", "action_stats.json", "recipe.json",
                            "train_summary.json", "base_train_summary.json"),
    "edge-vla-bundle": ("manifest.json", "tokenizer", "*.onnx", "*.onnx.data", "engines"),
    "edge-vla-libero-dataset": ("manifest.json", "reasoning.json", "parts", "libero_*"),
    # A training or distillation run directory (it has no marker file of its own).
    "edge-vla-run": ("train_config.json", "distill_config.json", "metrics.jsonl", "summary.json", "state", "final",
                     "teacher_targets", "checkpoint-*", "tensorboard", ".state.tmp", ".state.old",
                     ".metrics.jsonl.*.tmp", ".summary.json.*.tmp", ".*_config.json.*.tmp",
                     # a checkpoint save killed mid-write (its staging, or the one it moved aside)
                     ".checkpoint-*.pid*.tmp", ".checkpoint-*.pid*.old", ".final.pid*.tmp", ".final.pid*.old"),
}
RUN_KIND = "edge-vla-run"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- output directories -----------------------------------------------------------------------------
def output_format(path: str | os.PathLike) -> str | None:
    """The `format` an edge-vla output directory declares in its marker file, or None."""
    for name in MARKER_FILES:
        f = Path(path) / name
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("format"), str) and d["format"].startswith("edge-vla-"):
            return d["format"]
    return None


def replace_output_dir(path: str | os.PathLike, kind: str | None, overwrite: bool, inputs: Iterable = ()) -> None:
    """For outputs written in place (a run, a generated dataset): refuse `path` as check_output_dir
    does; with `overwrite`, delete what is there so the write starts over."""
    p = Path(path)
    check_output_dir(p, kind, overwrite, inputs)
    # Launched as several processes (torchrun, accelerate launch), one deletes: rank 0.
    if overwrite and p.is_dir() and any(p.iterdir()) and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(p)
    elif p.is_dir():
        # What killed writers left inside (a checkpoint save's staging): the resumed run may never
        # write that output again, so clean it now.
        for name in {m.group(1) for e in p.iterdir() if (m := _STAGED_IN.match(e.name))}:
            clean_staging(p / name)


def _within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_output_dir(path: str | os.PathLike, kind: str | None, overwrite: bool = False,
                     inputs: Iterable = ()) -> None:
    """Refuse to write an output of format `kind` at `path` where that would destroy something.

    Never an input (or a directory holding one), even with `overwrite`; without it, a non-empty
    directory must be a previous output of the same kind (`kind=None`: only an empty one)."""
    from edge_vla.errors import EdgeVLAError

    p = Path(path)
    for src in inputs:
        if src is not None and _within(Path(src), p):
            what = "is" if Path(src).resolve() == p.resolve() else "holds"
            raise EdgeVLAError(f"output {p} {what} the input {src}: writing it would delete the input",
                               "write the output to another directory")
    if p.exists() and not p.is_dir():
        raise EdgeVLAError(f"output {p} exists and is not a directory", "pass a new directory path")
    if overwrite or not p.exists() or not any(p.iterdir()):
        return
    found = output_format(p)
    if kind is not None and found == kind:
        return
    if kind in OUTPUT_ENTRIES and found is None and all(
            any(fnmatch.fnmatchcase(e.name, pat) for pat in OUTPUT_ENTRIES[kind]) for e in p.iterdir()):
        return
    label = {RUN_KIND: "run directory"}.get(kind, (kind or "output").removeprefix("edge-vla-"))
    holds = f"it is a {found.removeprefix('edge-vla-')}" if found else "it is not an edge-vla output"
    raise EdgeVLAError(f"{p} is not empty and is not a previous {label} ({holds}); nothing was written",
                       "choose another output directory, or pass --overwrite (overwrite=True in Python) to replace it")


_PID_NAMES = (re.compile(r"^(?:export\.)?pid(\d+)\.[a-z0-9_]{8}(?:\.tmp)?$"),  # staging of a writer
              re.compile(r"^pid(\d+)\.old$"),  # the previous output, moved aside for the swap
              re.compile(r"^old\.(\d+)$"))  # the same, as edge-vla 0.x named it
# `.NAME.pidN...`: a writer's staging (or a moved-aside output) of the output NAME.
_STAGED_IN = re.compile(r"^\.(.+?)\.(?:export\.)?pid\d+\.")
# Staging as edge-vla 0.x named it (no writer pid): tempfile's 8 random characters.
_OLD_NAMES = (re.compile(r"^export\.[a-z0-9_]{8}$"), re.compile(r"^[a-z0-9_]{8}\.tmp$"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of the output `path` left beside it; returns what was removed.

    Only our own names count (`.NAME.pidN.xxxxxxxx.tmp`, `.NAME.export.pidN.xxxxxxxx`,
    `.NAME.pidN.old`, and 0.x's pid-less `.NAME.xxxxxxxx.tmp`, `.NAME.export.xxxxxxxx`); a name
    whose writer is still running is left alone. A moved-aside previous output whose replacement
    never landed (killed between the two renames) is moved back to `path` instead."""
    final = Path(path)
    prefix = f".{final.name}."
    removed = []
    try:
        siblings = [s for s in final.parent.iterdir() if s.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for s in sorted(siblings):
        rest = s.name[len(prefix):]
        kind = next((i for i, r in enumerate(_PID_NAMES) if r.match(rest)), None)
        if kind is not None:
            if _alive(int(_PID_NAMES[kind].match(rest).group(1))):
                continue
        elif not any(r.match(rest) for r in _OLD_NAMES):
            continue
        if kind in (1, 2) and not final.exists() and s.is_dir():
            os.replace(s, final)  # the last good output: it was never replaced
            continue
        shutil.rmtree(s, ignore_errors=True) if s.is_dir() and not s.is_symlink() else s.unlink(missing_ok=True)
        removed.append(s)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, kind: str | None = None, overwrite: bool = False,
                     inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    `kind` is the `format` the written directory declares in its marker file (None: whatever the
    written directory declares). `path` may hold nothing, or a previous output of that kind;
    anything else is refused (check_output_dir) before and again after the write, unless
    `overwrite`. `inputs` are never replaced. An existing `path` is moved aside first and removed
    only after the new one is in place, so an interrupted write leaves either the old directory or
    the new one (the next write puts a moved-aside one back), never a mix.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    inputs = list(inputs)
    clean_staging(final)
    if kind is not None:
        check_output_dir(final, kind, overwrite, inputs)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.pid{os.getpid()}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        # Again, with the kind that was written: the directory may have changed meanwhile.
        check_output_dir(final, kind or output_format(tmp), overwrite, inputs)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.pid{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, fix: str):
    """Parse a JSON file; a malformed one is a one-line EdgeVLAError naming the file and `fix`."""
    from edge_vla.errors import EdgeVLAError

    p = Path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EdgeVLAError(f"{p} is not valid JSON ({e.msg}, line {e.lineno})", fix) from None
    except UnicodeDecodeError:
        raise EdgeVLAError(f"{p} is not valid JSON (not UTF-8 text)", fix) from None


def jsonable(x):
    """A value as plain JSON: numpy scalars and arrays, tuples and paths to lists, numbers and
    strings; NaN/Inf to None (JSON has no NaN); anything else unknown to its str()."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)
