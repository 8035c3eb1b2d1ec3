"""Reasoning distillation's teacher targets on disk: computed once, in chunks, resumable.

The teacher's targets are its own chain of thought (hundreds of free-running tokens) per sample,
far the most expensive part of a reasoning distillation, so they are written as they are made:

    OUT/teacher_targets/
      manifest.json              what they are for: the teacher's weights, the samples, the chunk size
      train-000000.safetensors   action_logp (n, K*D, n_bins) float32: log-probs at temperature 1
      train-000000.json          the chunk's sample keys ([episode, step]), the teacher's reasoning
                                 token ids, the seconds the chunk took
      val-000000.*               the same for the validation samples

Each file is written atomically, the safetensors first and the JSON last: a chunk whose JSON exists
is finished. A re-run computes only the missing chunks and ends with the targets an uninterrupted
run has (each sample's target depends on the teacher and that sample alone). A manifest for
another teacher, other samples or another chunk size is refused. Log-probs are kept at temperature
1 so `temperature` can change without recomputing them. Nothing here is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_bytes, atomic_write_text, read_json

TARGETS_DIR = "teacher_targets"
TARGETS_FORMAT = "edge-vla-teacher-targets/1"
MANIFEST = "manifest.json"
# A stream of its own for the subset draw, apart from the split's and the sample order's.
_SUBSET_STREAM = 23


@dataclass
class TeacherTarget:
    """What the student learns from one sample: the teacher's action belief after its own reasoning."""

    reasoning_ids: list[int]  # the teacher's reasoning: the forced reasoning prefix first, " ACTION:" last
    action_logp: torch.Tensor  # (K*D, n_bins) log-probs of the action tokens at temperature T


# --- which samples, and fingerprints ---------------------------------------------------------------
def draw_subset(n: int, k: int | None, seed: int) -> list[int]:
    """`k` of `n` sample positions for the teacher (all when k is None or >= n): one drawn at
    random from each of k equal stretches of the sequence, so the subset spreads over every demo
    and task (datasets are ordered by task, demo, frame) and is fixed by `seed`."""
    if k is None or k >= n:
        return list(range(n))
    edges = [i * n // k for i in range(k + 1)]  # strictly increasing: n / k >= 1
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    return [int(rng.integers(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def sample_key(sample) -> list:
    return [sample.episode, int(sample.step)]


def samples_digest(samples) -> str:
    """A hash of what the teacher sees and is scored on: keys, instruction, images, state, action."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([*sample_key(s), s.instruction]).encode())
        for cam in sorted(s.images):
            h.update(cam.encode())
            h.update(np.ascontiguousarray(s.images[cam]))
        h.update(np.ascontiguousarray(np.asarray(s.state, np.float32)))
        h.update(np.ascontiguousarray(np.asarray(s.action, np.float32)))
    return h.hexdigest()[:32]


def teacher_digest(model) -> str:
    """A hash of a checkpoint's weights, action statistics and recipe: another teacher, or the
    same one trained further, hashes differently. One pass over the weights (seconds for a 7B)."""
    h = hashlib.sha256()
    stats = model.action_stats.to_dict() if model.action_stats is not None else None
    h.update(json.dumps([stats, model.recipe_info or {}], sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:32]


# --- the store ------------------------------------------------------------------------------------
def _manifest(teacher_fp: str, splits: dict, chunk: int) -> dict:
    return {"format": TARGETS_FORMAT, "teacher": teacher_fp, "chunk": chunk,
            "splits": {name: {"n": len(part), "samples": samples_digest(part)} for name, part in splits.items()}}


def _check_manifest(directory: Path, mine: dict) -> None:
    f = directory / MANIFEST
    fix_delete = f"delete {directory} (its targets are computed again)"
    theirs = read_json(f, fix_delete)
    if not isinstance(theirs, dict) or theirs.get("format") != TARGETS_FORMAT:
        raise EdgeVLAError(f"{f} is not a teacher-targets manifest ({TARGETS_FORMAT})", fix_delete)
    diff = []
    if theirs.get("teacher") != mine["teacher"]:
        diff.append("another teacher (its weights, statistics or recipe differ)")
    for name, split in mine["splits"].items():
        if theirs.get("splits", {}).get(name) != split:
            diff.append(f"other {name} samples (the data, seed, val_fraction, val_max_samples or teacher_samples "
                        "changed)")
    if theirs.get("chunk") != mine["chunk"]:
        diff.append(f"teacher_chunk={theirs.get('chunk')} (now {mine['chunk']})")
    if diff:
        raise EdgeVLAError(f"{directory} holds teacher targets computed for {'; '.join(diff)}",
                           "re-run with the run's own distill_config.json, teacher and data; or pass --overwrite to "
                           "start the run over, or choose another --out")


def _chunk_paths(directory: Path, split: str, i: int) -> tuple[Path, Path]:
    stem = directory / f"{split}-{i:06d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _read_chunk(directory: Path, split: str, i: int, samples: list) -> tuple[list[TeacherTarget], float] | None:
    """A finished chunk's targets and seconds, or None when it is not finished."""
    from safetensors.torch import load_file

    st, js = _chunk_paths(directory, split, i)
    if not js.is_file():
        return None
    fix = f"delete {js} and re-run: that chunk is computed again"
    meta = read_json(js, fix)
    try:
        logp = load_file(str(st))["action_logp"]
        ids, keys, seconds = meta["reasoning_ids"], meta["keys"], float(meta["seconds"])
    except Exception as e:  # a missing or damaged file: safetensors' error, OSError, KeyError, TypeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgeVLAError(f"teacher-target chunk {st} cannot be read ({first})", fix) from None
    if keys != [sample_key(s) for s in samples] or len(ids) != logp.shape[0]:
        raise EdgeVLAError(f"teacher-target chunk {js} is for other samples than its manifest says", fix)
    return [TeacherTarget(list(r), logp[j]) for j, r in enumerate(ids)], seconds


def _write_chunk(directory: Path, split: str, i: int, samples: list, targets: list[TeacherTarget],
                 seconds: float) -> None:
    from safetensors.torch import save

    st, js = _chunk_paths(directory, split, i)
    logp = torch.stack([t.action_logp for t in targets]).float().contiguous()
    atomic_write_bytes(st, save({"action_logp": logp}))
    atomic_write_text(js, json.dumps({"keys": [sample_key(s) for s in samples],
                                      "reasoning_ids": [list(map(int, t.reasoning_ids)) for t in targets],
                                      "seconds": seconds}))  # last: its presence marks the chunk done


def stored_targets(directory, splits: dict[str, list], teacher_fp: str, chunk: int,
                   compute: Callable[[list, Callable[[], None]], list[TeacherTarget]],
                   progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, list[TeacherTarget]], dict]:
    """The targets of every split ({name: samples}), read from `directory` where finished and
    computed with `compute(samples, advance)` (calling `advance()` once per sample) where not.
    `progress(done, total)` is called at the start and after every sample. Returns the targets per
    split and {"samples", "computed", "seconds"}: how many there are, how many this call computed,
    and the teacher's seconds over all of them (this call's and earlier runs')."""
    directory = Path(directory)
    mine = _manifest(teacher_fp, splits, chunk)
    if (directory / MANIFEST).exists():
        _check_manifest(directory, mine)
    else:
        atomic_write_text(directory / MANIFEST, json.dumps(mine, indent=2))
    plan = [(name, i, samples[i * chunk:(i + 1) * chunk]) for name, samples in splits.items()
            for i in range(-(-len(samples) // chunk))]
    total = sum(len(s) for s in splits.values())
    done = {(name, i): _read_chunk(directory, name, i, part) for name, i, part in plan}
    count = sum(len(part) for name, i, part in plan if done[(name, i)] is not None)
    stats = {"samples": total, "computed": 0, "seconds": sum(d[1] for d in done.values() if d is not None)}
    if progress is not None:
        progress(count, total)
    out: dict[str, list[TeacherTarget]] = {name: [] for name in splits}
    for name, i, part in plan:
        if done[(name, i)] is None:
            t0 = time.perf_counter()

            def advance():
                nonlocal count
                count += 1
                if progress is not None:
                    progress(count, total)

            targets = compute(part, advance)
            seconds = time.perf_counter() - t0
            _write_chunk(directory, name, i, part, targets, seconds)
            done[(name, i)] = (targets, seconds)
            stats["computed"] += len(part)
            stats["seconds"] += seconds
        out[name] += done[(name, i)][0]
    return out, stats


__all__ = ["TeacherTarget", "TARGETS_DIR", "TARGETS_FORMAT", "draw_subset", "samples_digest", "teacher_digest",
           "stored_targets"]
