"""LIBERO demos (+ ECoT reasoning) as a torch Dataset of `Sample`s: the one door training uses.

    ds = open_dataset("data/libero90_mini", split="train", action_chunk=8)
    ds.action_stats, ds.instructions, ds.has_reasoning, ds[0] -> Sample

`cameras=None` takes the cameras the files hold. `path` is a directory made by `generate_dataset` (manifest.json + hdf5 files + reasoning.json),
any directory of LIBERO hdf5 files (with ECoT JSON files beside them, if any), one hdf5 file
(with `annotations=` for its JSON), or a LeRobotDataset v3.0/v2.1 directory or cached hub id
(edge_vla.data.lerobot_read; `key_map=` names its camera/state/action features, and an ECoT JSON
for it is keyed by the dataset's directory name, or has one file key, and LeRobot episode indices). Splits are by episode, so no validation frame shares an
episode with a training frame. No-op steps (no motion, gripper unchanged: OpenVLA's test) are
dropped by default: in LIBERO they teach a policy to stall (docs/facts.md). With
`action_chunk=K`, `Sample.action` is the next K kept actions of the episode, padded by repeating
the last. Only the index (actions, a few numbers per step) is read up front; images are read
one step at a time when a Sample is asked for.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vla.data.ecot_json import EcotAnnotations
from edge_vla.data.libero_hdf5 import LiberoHDF5
from edge_vla.data.sample import Sample
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionStats

try:  # torch is a core dependency, but keep the data layer importable without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object

NOOP_THRESHOLD = 1e-4  # OpenVLA's regenerated LIBERO data: |action[:6]| below this and gripper unchanged
SPLITS = ("train", "val", "all")


def is_noop(action: np.ndarray, prev_action: np.ndarray | None, threshold: float = NOOP_THRESHOLD) -> bool:
    if prev_action is None:
        return bool(np.linalg.norm(action[:-1]) < threshold)
    return bool(np.linalg.norm(action[:-1]) < threshold and action[-1] == prev_action[-1])


@dataclass
class _Episode:
    file: int  # index into the dataset's file list
    demo: str  # "demo_3"
    steps: np.ndarray  # kept step indices (into the demo)
    actions: np.ndarray  # (len(steps), 7) kept actions
    name: str
    instruction: str = ""  # where episodes of one file differ (LeRobot datasets)


def _require_finite(f, demo: str, actions: np.ndarray, state: np.ndarray) -> None:
    """NaN/Inf anywhere in the data, named where it is. Checked for every episode when the dataset
    opens (a few numbers per step): a batch that draws it would otherwise train on it, or not."""
    for what, a in (("actions", actions), ("proprio state", state)):
        bad = ~np.isfinite(a)
        if bad.any():
            t, d = (int(i) for i in np.argwhere(bad)[0])
            raise EdgeVLAError(f"{f}, episode {demo}: the {what} hold NaN or Inf ({int(bad.sum())} values; first at "
                               f"step {t}, dim {d})", "clean or drop that episode")


def _resolve(path: Path, annotations, key_map=None) -> tuple[list[Path], list[EcotAnnotations], dict]:
    from edge_vla.data import lerobot_read

    if lerobot_read.is_lerobot_dir(path) or lerobot_read.looks_like_hub_id(str(path)):
        src = lerobot_read.LeRobotSource(path, key_map)
        anns = [annotations if isinstance(annotations, EcotAnnotations) else EcotAnnotations.load(annotations)] \
            if annotations is not None else []
        return [src.root], anns, {"root": src.root.parent, "lerobot": src}
    if key_map:
        raise EdgeVLAError(f"a key map (--map) names LeRobot features, and {path} is not a LeRobot dataset",
                           "drop --map for LIBERO hdf5 data")
    if not path.exists():
        raise EdgeVLAError(f"dataset not found: {path}",
                           "pass a directory made by `edge-vla data generate` or a LIBERO *.hdf5 file")
    anns: list[EcotAnnotations] = []
    if annotations is not None:
        anns.append(annotations if isinstance(annotations, EcotAnnotations) else EcotAnnotations.load(annotations))
    if path.is_file():
        return [path], anns, {"root": path.parent}
    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        files = [path / f for f in m.get("files", [])]
        if m.get("reasoning") and (path / m["reasoning"]).is_file():
            anns.append(EcotAnnotations.load(path / m["reasoning"]))
        if not files:
            raise EdgeVLAError(f"{manifest} lists no demo files", "generation made no successful demo yet: run it again")
        return files, anns, {"root": path, "manifest": m}
    files = sorted(p for p in path.rglob("*.hdf5") if "parts" not in p.relative_to(path).parts)
    if not files:
        raise EdgeVLAError(f"no *.hdf5 demo files under {path}", "pass a LIBERO demo directory or file")
    for j in sorted(path.rglob("*.json")):
        try:
            anns.append(EcotAnnotations.load(j))
        except EdgeVLAError:
            continue  # not an annotation file
    return files, anns, {"root": path}


class LiberoDataset(_TorchDataset):
    """Samples of LIBERO demos; see the module docstring. Build it with `open_dataset`."""

    def __init__(self, path, split="train", val_fraction=0.1, action_chunk=1, drop_noops=True,
                 cameras=("agentview", "wrist"), seed=0, annotations=None, key_map=None):
        if split not in SPLITS:
            raise EdgeVLAError(f"unknown split `{split}`", f"use one of {', '.join(SPLITS)}")
        if not 0.0 <= val_fraction < 1.0:
            raise EdgeVLAError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if int(action_chunk) < 1:
            raise EdgeVLAError(f"action_chunk must be >= 1, got {action_chunk}")
        self.path = Path(path)
        self.split = split
        self.action_chunk = int(action_chunk)
        files, self._annotations, info = _resolve(self.path, annotations, key_map)
        self._lerobot = info.get("lerobot")
        if cameras is None:  # whatever the (first) file holds
            with self._open(files[0]) as h:
                cameras = tuple(h.cameras())
        self.cameras = tuple(cameras)
        if self._lerobot is not None:  # no camera found at all is a missing agentview
            self._lerobot.require_cameras(self.cameras or ("agentview",))
        self.root = info["root"]
        self.files = [str(f) for f in files]
        self._handles: dict = {}
        episodes, instructions, ann_keys = [], [], []
        n_steps_total = 0
        unannotated: list[tuple[str, str, list[int]]] = []  # (file, demo, steps without a record)
        for fi, f in enumerate(files):
            with self._open(f) as h:
                missing = [c for c in self.cameras if c not in h.cameras()]
                if missing:
                    raise EdgeVLAError(f"{f} has no images for camera(s) {', '.join(missing)}",
                                       f"open it with cameras={tuple(h.cameras())}")
                instructions.append(h.instruction)
                rel = self._rel(f)
                ann = next((a for a in self._annotations if a.file_key(rel) or a.file_key(f)), None)
                ann_keys.append((ann, rel if ann is not None and ann.file_key(rel) else str(f)))
                if ann is None and self._lerobot is not None:  # one file key: its episodes are LeRobot's
                    ann = next((a for a in self._annotations if len(a.data) == 1), None)
                    if ann is not None:
                        ann_keys[-1] = (ann, next(iter(ann.data)))
                instruction_of = getattr(h, "episode_instruction", lambda d: h.instruction)
                file_eps = []
                for demo in h.demos:
                    actions = h.actions(demo)
                    _require_finite(f, demo, actions, h.proprio(demo))
                    n_steps_total += len(actions)
                    if ann is not None:
                        skipped = ann.check_episode(ann_keys[-1][1], demo.split("_")[1], len(actions))
                        if skipped and ann.episode(ann_keys[-1][1], demo.split("_")[1]) is not None:
                            unannotated.append((rel, demo, skipped))
                    keep = [t for t in range(len(actions))
                            if not (drop_noops and is_noop(actions[t], actions[t - 1] if t else None))]
                    file_eps.append((demo, actions, keep))
                episodes += self._keep_episodes(fi, f, file_eps, instruction_of)
        if not episodes:
            raise EdgeVLAError(f"{self.path} holds no usable steps", "check the files hold demos with actions")
        self._ann_keys = ann_keys
        self._check_annotations(episodes, ann_keys, unannotated)
        self.instructions = sorted(set(instructions) | {e.instruction for e in episodes if e.instruction})
        self._file_instruction = instructions
        self.has_reasoning = any(a is not None and a.episode(k, e.demo.split("_")[1]) is not None
                                 for e in episodes for a, k in [ann_keys[e.file]])
        if self._lerobot is not None:
            self.has_reasoning = self.has_reasoning or any(self._lerobot.has_reasoning(e.demo) for e in episodes)
        val_ids = val_episode_indices(len(episodes), val_fraction, seed)
        self.all_episodes = episodes
        pick = {"train": lambda i: i not in val_ids, "val": lambda i: i in val_ids, "all": lambda i: True}[split]
        self.episodes = [e for i, e in enumerate(episodes) if pick(i)]
        train_eps = [e for i, e in enumerate(episodes) if i not in val_ids] or episodes
        self.action_stats = ActionStats.from_actions(np.concatenate([e.actions for e in train_eps]))
        self._index = [(ei, j) for ei, e in enumerate(self.episodes) for j in range(len(e.steps))]
        self.n_steps_recorded = n_steps_total
        if self._lerobot is not None:
            from edge_vla.data.lerobot_read import check_stats

            every = ActionStats.from_actions(np.concatenate([self._lerobot.actions(d) for d in self._lerobot.demos]))
            check_stats(self._lerobot, np.asarray(every.q01), np.asarray(every.q99))

    def _open(self, f):
        """A reader of one demo file (LIBERO hdf5), or the LeRobot dataset itself."""
        return self._lerobot if self._lerobot is not None else LiberoHDF5(f)

    @staticmethod
    def _keep_episodes(fi, f, file_eps, instruction_of) -> list[_Episode]:
        """Episodes of one file after no-op dropping; a task all of whose steps would go is kept whole
        (its actions are not LIBERO-style deltas, or it never moves: dropping it would delete the task)."""
        out, by_task = [], {}
        for demo, actions, keep in file_eps:
            by_task.setdefault(instruction_of(demo), []).append((demo, actions, keep))
        for task, eps in by_task.items():
            if eps and not any(keep for _, _, keep in eps) and any(len(a) for _, a, _ in eps):
                warnings.warn(f"{f}: no-op filtering would drop every step of task {task!r}; kept them all",
                              stacklevel=3)
                eps = [(d, a, list(range(len(a)))) for d, a, _ in eps]
            for demo, actions, keep in eps:
                if not keep:
                    continue
                keep = np.asarray(keep)
                out.append(_Episode(fi, demo, keep, actions[keep], f"{Path(f).stem.removesuffix('_demo')}/{demo}",
                                    instruction_of(demo)))
        order = {d: i for i, (d, _, _) in enumerate(file_eps)}
        return sorted(out, key=lambda e: order[e.demo])

    def _check_annotations(self, episodes, ann_keys, unannotated) -> None:
        """An ECoT file that names no demo of the dataset is an error; steps without a record, a warning."""
        for a in self._annotations:
            if not a.looks_like_ecot():
                continue
            if not any(ak is a and a.episode(k, e.demo.split("_")[1]) is not None
                       for e in episodes for ak, k in [ann_keys[e.file]]):
                names = sorted({Path(str(k)).name for k in a.data})
                raise EdgeVLAError(f"{a.source} has no record for any demo of {self.path} (it names "
                                   f"{len(names)} file(s), e.g. {names[0] if names else '-'}, with demo ids "
                                   f"{', '.join(sorted(next(iter(a.data.values()), {}))[:3])}...)",
                                   "pass the ECoT file annotated for these demos: files match by name, episodes by "
                                   "demo id (LeRobot: episode index)")
        if unannotated:
            n = sum(len(s) for _, _, s in unannotated)
            f, d, s = unannotated[0]
            warnings.warn(f"ECoT reasoning: {n} step(s) of {len(unannotated)} episode(s) have no record (first: {f} "
                          f"{d} step {s[0]}); they reuse the latest earlier step's reasoning", stacklevel=3)

    def _rel(self, f) -> str:
        try:
            return str(Path(f).relative_to(self.root))
        except ValueError:
            return str(f)

    @property
    def episode_names(self) -> list[str]:
        return [e.name for e in self.episodes]

    def __len__(self) -> int:
        return len(self._index)

    def _handle(self, fi: int) -> LiberoHDF5:
        if self._lerobot is not None:  # it keeps its decoders per process itself
            return self._lerobot
        # h5py handles must not cross a fork: one set per process (DataLoader workers).
        key = (os.getpid(), fi)
        if key not in self._handles:
            self._handles[key] = LiberoHDF5(self.files[fi])
        return self._handles[key]

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        ei, j = self._index[i]
        e = self.episodes[ei]
        t = int(e.steps[j])
        h = self._handle(e.file)
        chunk = e.actions[j : j + self.action_chunk]
        if self.action_chunk > 1:
            pad = self.action_chunk - len(chunk)
            action = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        else:
            action = chunk[0]
        reasoning = None
        ann, key = self._ann_keys[e.file]
        if ann is not None:
            reasoning = ann.reasoning(key, e.demo.split("_")[1], t)
        if reasoning is None and self._lerobot is not None:
            reasoning = h.reasoning(e.demo, t)
        state = self._state(h, e.demo, t)
        return Sample(
            images={c: h.image(e.demo, c, t) for c in self.cameras},
            instruction=e.instruction or self._file_instruction[e.file],
            state=state, action=np.asarray(action, dtype=np.float32), reasoning=reasoning,
            episode=e.name, step=t, meta={"file": self.files[e.file], "demo": e.demo},
        )

    @staticmethod
    def _state(h: LiberoHDF5, demo: str, t: int) -> np.ndarray:
        return np.asarray(h.state(demo, t), dtype=np.float32)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __getstate__(self):  # DataLoader workers re-open files themselves
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


def open_dataset(path, split: str = "train", val_fraction: float = 0.1, action_chunk: int = 1,
                 drop_noops: bool = True, cameras=("agentview", "wrist"), seed: int = 0,
                 annotations=None, key_map=None) -> LiberoDataset:
    """The dataset training reads. See the module docstring for what `path` may be. `key_map`
    (LeRobot only; e.g. {"agentview": "observation.images.front"}) defaults to the one set with
    `set_default_key_map` (what `edge-vla train --map` does)."""
    return LiberoDataset(path, split=split, val_fraction=val_fraction, action_chunk=action_chunk,
                         drop_noops=drop_noops, cameras=cameras, seed=seed, annotations=annotations,
                         key_map=key_map if key_map is not None else _DEFAULT_KEY_MAP.get("map"))


_DEFAULT_KEY_MAP: dict = {}


def set_default_key_map(key_map) -> None:
    """The LeRobot key map `open_dataset` uses when its caller passes none (the training CLI's --map:
    training opens its data through code that does not take a map)."""
    from edge_vla.data.lerobot_read import parse_key_map

    _DEFAULT_KEY_MAP["map"] = parse_key_map(key_map) or None


def val_episode_indices(n_episodes: int, val_fraction: float, seed: int = 0) -> set[int]:
    """The episode split: a seeded permutation, whose first round(val_fraction * n) episodes (at
    least one when val_fraction > 0) are validation; a single episode stays all training."""
    if n_episodes < 2:
        return set()
    order = np.random.default_rng(seed).permutation(n_episodes)
    n_val = int(round(val_fraction * n_episodes))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    return set(order[:n_val].tolist())


def pick_evenly(items, n: int) -> list:
    """`n` items spread evenly over a sequence, first and last included (all of them when n >= len)."""
    n = min(int(n), len(items))
    if n <= 0:
        return []
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


__all__ = ["open_dataset", "LiberoDataset", "is_noop", "NOOP_THRESHOLD", "pick_evenly", "val_episode_indices",
           "set_default_key_map"]
