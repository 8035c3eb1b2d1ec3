"""LIBERO's demonstration hdf5 layout: read (streaming) and write.

    data/                       attrs: problem_info (JSON with language_instruction), env_args, ...
      demo_0/                   attrs: num_samples
        actions                 (T, 7) float: dx, dy, dz, droll, dpitch, dyaw, gripper (-1 open / +1 close)
        states                  (T, S) float: flattened MuJoCo states (replay, annotation)
        obs/agentview_rgb       (T, H, W, 3) uint8, as MuJoCo renders it (upside down)
        obs/eye_in_hand_rgb     (T, H, W, 3) uint8
        obs/ee_pos (T, 3), obs/ee_ori (T, 3, axis-angle), obs/gripper_states (T, 2), obs/joint_states (T, 7)
        rewards, dones          (T,)

The released LIBERO files store images as rendered; files whose `data` group carries
`image_frame = "canonical"` (e.g. re-rendered, already rotated) are read without the flip.
Either way, `read_step` returns images in the canonical upright frame (`raw[::-1, ::-1]`).
Files are opened lazily and read one step (or one array) at a time: nothing loads a file whole.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError

# The proprio state (openpi's LIBERO layout): obs key, width.
PROPRIO_KEYS = (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2))
# Our camera names -> LIBERO obs keys.
IMAGE_KEYS = {"agentview": "agentview_rgb", "wrist": "eye_in_hand_rgb"}
_DEMO_RE = re.compile(r"^demo_(\d+)$")
FORMAT_NOTE = "a LIBERO demo file has a `data` group with `demo_N` groups holding `actions` and `obs/`"
DAMAGED_FIX = "the file's bytes are damaged (a broken copy or disk?): copy, download or generate it again"
# What h5py raises on damaged bytes: a failed filter or checksum (OSError), an unreadable object
# header or B-tree (RuntimeError, KeyError), a shape or type it cannot make sense of (ValueError, TypeError).
_H5_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover
        from edge_vla.errors import MissingDependencyError

        raise MissingDependencyError("h5py", "reading LIBERO hdf5 files") from e
    return h5py


def instruction_from_filename(path: str | Path) -> str:
    """LIBERO names files `SCENE_task_words_demo.hdf5`: the instruction is the words after the scene."""
    stem = Path(path).stem
    stem = re.sub(r"_demo$", "", stem)
    words = stem.split("_")
    i = next((k for k, w in enumerate(words) if w.isupper() and re.search(r"SCENE\d+$", w)), None)
    if i is not None:
        words = words[i + 1 :]
    return " ".join(w for w in words if not w.isupper() or len(w) == 1).strip()


class LiberoHDF5:
    """A LIBERO demo file, read lazily. Use as a context manager or call close()."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeVLAError(f"LIBERO hdf5 file not found: {self.path}", "pass an existing *.hdf5 demo file")
        h5py = _h5py()
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise EdgeVLAError(f"{self.path} is not an hdf5 file ({_first_line(e)})", FORMAT_NOTE) from None
        try:
            with self._reading():
                self._read_layout(h5py)
        except BaseException:
            self.close()
            raise

    def _read_layout(self, h5py) -> None:
        if "data" not in self._f or not isinstance(self._f["data"], h5py.Group):
            raise EdgeVLAError(f"{self.path} is not LIBERO hdf5: no `data` group", FORMAT_NOTE)
        data = self._f["data"]
        demos = [k for k in data.keys() if _DEMO_RE.match(k)]
        if not demos:
            raise EdgeVLAError(f"{self.path} is not LIBERO hdf5: `data` has no demo_N groups", FORMAT_NOTE)
        self.demos = sorted(demos, key=lambda k: int(_DEMO_RE.match(k).group(1)))
        for d in self.demos:
            with self._reading(d):
                has_actions = "actions" in data[d]
            if not has_actions:
                raise EdgeVLAError(f"{self.path}: data/{d} has no `actions`", FORMAT_NOTE)
        self.image_frame = str(data.attrs.get("image_frame", "raw"))
        self.attrs = {k: data.attrs[k] for k in data.attrs}

    @contextlib.contextmanager
    def _reading(self, demo: str | None = None):
        """h5py's errors on damaged bytes -> one line naming the file and the episode."""
        try:
            yield
        except EdgeVLAError:
            raise
        except _H5_DAMAGE as e:
            where = f"{self.path}, episode data/{demo}" if demo else str(self.path)
            raise EdgeVLAError(f"{where} cannot be read ({_first_line(e)})", DAMAGED_FIX) from None

    # --- metadata -------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        info = self.attrs.get("problem_info")
        if info is not None:
            try:
                lang = json.loads(info if isinstance(info, str) else info.decode()).get("language_instruction")
                if lang:
                    return " ".join(lang) if isinstance(lang, list) else str(lang)
            except (ValueError, AttributeError):
                pass
        return instruction_from_filename(self.path)

    @property
    def suite(self) -> str:
        return str(self.attrs.get("suite", ""))

    @property
    def task_name(self) -> str:
        return str(self.attrs.get("task_name", re.sub(r"_demo$", "", self.path.stem)))

    def length(self, demo: str) -> int:
        with self._reading(demo):
            return int(self._demo(demo)["actions"].shape[0])

    def cameras(self) -> list[str]:
        with self._reading(self.demos[0]):
            obs = self._demo(self.demos[0]).get("obs", {})
            return [c for c, k in IMAGE_KEYS.items() if k in obs]

    def image_size(self) -> int | None:
        with self._reading(self.demos[0]):
            obs = self._demo(self.demos[0]).get("obs", {})
            for k in IMAGE_KEYS.values():
                if k in obs:
                    return int(obs[k].shape[1])
        return None

    # --- arrays -----------------------------------------------------------------------------------
    def _demo(self, demo: str):
        if demo not in self._f["data"]:
            raise EdgeVLAError(f"{self.path} has no demo `{demo}`", f"demos: {', '.join(self.demos[:5])}...")
        return self._f["data"][demo]

    def actions(self, demo: str) -> np.ndarray:
        with self._reading(demo):
            a = np.asarray(self._demo(demo)["actions"][()], dtype=np.float32)
            if a.ndim != 2:
                raise EdgeVLAError(f"{self.path}, episode data/{demo}: `actions` has shape {a.shape}, expected (T, D)",
                                   FORMAT_NOTE)
            return a

    def states(self, demo: str) -> np.ndarray:
        with self._reading(demo):
            g = self._demo(demo)
            if "states" not in g:
                raise EdgeVLAError(f"{self.path}: data/{demo} has no `states`",
                                   "replay annotation needs the MuJoCo states LIBERO records; use a file that keeps them")
            return np.asarray(g["states"][()], dtype=np.float64)

    def proprio(self, demo: str) -> np.ndarray:
        """(T, 8) state: eef pos, eef axis-angle, gripper qpos (zeros where the file lacks a key)."""
        n = self.length(demo)
        with self._reading(demo):
            obs = self._demo(demo).get("obs")
            parts = []
            for key, dim in PROPRIO_KEYS:
                if obs is not None and key in obs:
                    parts.append(np.asarray(obs[key][()], dtype=np.float32).reshape(n, dim))
                else:
                    parts.append(np.zeros((n, dim), dtype=np.float32))
            return np.concatenate(parts, axis=1)

    def state(self, demo: str, t: int) -> np.ndarray:
        """(8,) proprio state of step `t` (one step of `proprio`, read alone)."""
        with self._reading(demo):
            obs = self._demo(demo).get("obs")
            return np.concatenate([np.asarray(obs[key][t], dtype=np.float32).reshape(dim)
                                   if obs is not None and key in obs else np.zeros(dim, dtype=np.float32)
                                   for key, dim in PROPRIO_KEYS])

    def image(self, demo: str, camera: str, t: int) -> np.ndarray:
        with self._reading(demo):
            obs = self._demo(demo).get("obs")
            key = IMAGE_KEYS.get(camera, camera)
            if obs is None or key not in obs:
                raise EdgeVLAError(f"{self.path}: data/{demo}/obs has no `{key}`",
                                   f"cameras in this file: {', '.join(self.cameras()) or 'none'}")
            img = np.asarray(obs[key][t])
        return np.ascontiguousarray(img[::-1, ::-1]) if self.image_frame == "raw" else img

    def close(self) -> None:
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # h5py handles are cheap but finite; close on garbage collection too
        try:
            self.close()
        except Exception:
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def write_libero_hdf5(path: str | Path, demos: list[dict], instruction: str, attrs: dict | None = None) -> Path:
    """Write demos in LIBERO's layout, atomically (a temp file renamed into place).

    Each demo: {"actions" (T, 7), "states" (T, S) optional, "images": {camera: (T, H, W, 3) canonical
    frame}, "proprio" (T, 8) optional, "joint_states" (T, 7) optional}. Images are stored as MuJoCo
    renders them (raw frame), like the released files, so either kind reads back the same way.
    """
    h5py = _h5py()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": instruction})
        data.attrs["image_frame"] = "raw"
        data.attrs["total"] = int(sum(len(d["actions"]) for d in demos))
        for k, v in (attrs or {}).items():
            data.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
        for i, d in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            actions = np.asarray(d["actions"], dtype=np.float64)
            n = len(actions)
            g.attrs["num_samples"] = n
            g.create_dataset("actions", data=actions)
            g.create_dataset("rewards", data=np.asarray(d.get("rewards", np.zeros(n)), dtype=np.float64))
            dones = np.zeros(n, dtype=np.uint8)
            dones[-1] = 1
            g.create_dataset("dones", data=dones)
            if d.get("states") is not None:
                g.create_dataset("states", data=np.asarray(d["states"], dtype=np.float64))
            obs = g.create_group("obs")
            for cam, frames in d.get("images", {}).items():
                frames = np.asarray(frames, dtype=np.uint8)
                # Chunked per frame so a reader streams one step at a time.
                obs.create_dataset(IMAGE_KEYS.get(cam, cam), data=frames[:, ::-1, ::-1],
                                   chunks=(1, *frames.shape[1:]), compression="gzip", compression_opts=1)
            if d.get("proprio") is not None:
                p = np.asarray(d["proprio"], dtype=np.float64)
                obs.create_dataset("ee_pos", data=p[:, :3])
                obs.create_dataset("ee_ori", data=p[:, 3:6])
                obs.create_dataset("ee_states", data=p[:, :6])
                obs.create_dataset("gripper_states", data=p[:, 6:8])
            if d.get("joint_states") is not None:
                obs.create_dataset("joint_states", data=np.asarray(d["joint_states"], dtype=np.float64))
    tmp.replace(path)
    return path


__all__ = ["LiberoHDF5", "write_libero_hdf5", "IMAGE_KEYS", "instruction_from_filename"]
