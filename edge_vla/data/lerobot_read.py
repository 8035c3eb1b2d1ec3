"""Read a LeRobotDataset (v3.0 or v2.1) from disk, with pyarrow and PyAV (no `lerobot` import).

v3.0 (lerobot >= 0.4):                         v2.1 (lerobot 0.2-0.3, openpi's LIBERO set):
  meta/info.json   codebase_version "v3.0"       meta/info.json   codebase_version "v2.1"
  meta/stats.json                                meta/stats.json or meta/episodes_stats.jsonl
  meta/tasks.parquet  (task_index, task)         meta/tasks.jsonl
  meta/episodes/chunk-*/file-*.parquet           meta/episodes.jsonl (episode_index, tasks, length)
    per episode: data/{chunk,file}_index,        data/chunk-{c:03d}/episode_{e:06d}.parquet
    dataset_{from,to}_index, videos/<key>/...    videos/chunk-{c:03d}/<key>/episode_{e:06d}.mp4
    from_timestamp / to_timestamp
  data/chunk-*/file-*.parquet (many episodes)
  videos/<key>/chunk-*/file-*.mp4 (many episodes)

A camera is a `video` feature (frames decoded from the mp4 at the frame's timestamp plus the
episode's `from_timestamp`) or an `image` feature (PNG bytes in the parquet). Only the small
columns (state, action, indices, reasoning) are read up front; frames are decoded when a step
is asked for. Decoding seeks to the frame (lerobot writes a keyframe every 2 frames); where all
decoded frames of the dataset fit the frame cache (EDGE_VLA_FRAME_CACHE_MB, default 1024), each
episode is decoded once, sequentially, and kept.

A key map names the features: our camera names (agentview, wrist, or any), `state`, `action`
and `reasoning` -> the dataset's feature keys, e.g. {"agentview": "observation.images.image"}.
Without one, the LIBERO sets' names are tried (HuggingFaceVLA/libero, physical-intelligence/libero).

Reasoning comes from a per-frame string column (`reasoning`, JSON of `Reasoning.to_dict()`, what
`edge-vla data export-lerobot` writes) or, failing that, from lerobot's `language_persistent`
column (its `plan`, `subtask` and `motion` rows active at the frame's time).
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.reasoning import Reasoning

SUPPORTED = ("v2.0", "v2.1", "v3.0")
# Our name -> the keys tried when no map names it: HuggingFaceVLA/libero (v3.0) first, then
# physical-intelligence/libero (v2.x, what openpi trains on), then common LeRobot names.
DEFAULT_KEYS = {
    "agentview": ("observation.images.image", "image", "observation.images.agentview_image",
                  "observation.images.agentview"),
    "wrist": ("observation.images.wrist_image", "wrist_image", "observation.images.wrist",
              "observation.images.eye_in_hand"),
    "state": ("observation.state", "state"),
    "action": ("action", "actions"),
    "reasoning": ("reasoning",),
}
NON_CAMERA = ("state", "action", "reasoning")
FRAME_CACHE_MB = 1024
STATS_TOLERANCE = 0.25  # of the q01..q99 range
MAP_HELP = "name the features with --map, e.g. --map agentview=observation.images.front wrist=observation.images.wrist"


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        from edge_vla.errors import MissingDependencyError

        raise MissingDependencyError("pyarrow", "reading LeRobot datasets") from e
    return pq


def parse_key_map(items) -> dict[str, str]:
    """["agentview=observation.images.image", ...] (or a dict) -> {"agentview": "observation.images.image"}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items:
        for part in str(item).replace(",", " ").split():
            name, sep, key = part.partition("=")
            if not sep or not name or not key:
                raise EdgeVLAError(f"bad --map entry `{part}`", "write NAME=FEATURE_KEY, e.g. agentview=observation.images.image")
            out[name.strip()] = key.strip()
    return out


def lerobot_home() -> Path:
    return Path(os.environ.get("HF_LEROBOT_HOME", Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "lerobot"))


def is_lerobot_dir(path: Path) -> bool:
    return (Path(path) / "meta" / "info.json").is_file()


def looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path))) and not Path(path).exists()


def resolve_path(path) -> Path:
    """A local LeRobot directory, or a hub id found in lerobot's local cache ($HF_LEROBOT_HOME/<id>)."""
    p = Path(path)
    if is_lerobot_dir(p):
        return p
    if looks_like_hub_id(str(path)):
        cached = lerobot_home() / str(path)
        if is_lerobot_dir(cached):
            return cached
        raise EdgeVLAError(f"`{path}` looks like a Hugging Face hub id, and edge-vla does not download datasets "
                           f"(none in the local cache {cached})",
                           f"pass a local directory: `huggingface-cli download --repo-type dataset {path} "
                           f"--local-dir DIR` on a machine with network access, then --data DIR")
    raise EdgeVLAError(f"{p} is not a LeRobot dataset: no meta/info.json", "pass the dataset's root directory")


@dataclass
class _LeEpisode:
    index: int
    task: str
    rows: np.ndarray  # row numbers of its frames in `data_file`, in frame order
    data_file: int  # index into LeRobotSource.data_files
    timestamps: np.ndarray  # (T,) seconds from the episode's start
    videos: dict = field(default_factory=dict)  # key -> (video path, from_timestamp)


class LeRobotSource:
    """One LeRobot dataset, read like a LIBERO demo file: demos are `episode_<index>`."""

    def __init__(self, path, key_map=None):
        self.root = resolve_path(path)
        self.path = self.root
        info_path = self.root / "meta" / "info.json"
        try:
            self.info = json.loads(info_path.read_text())
        except ValueError as e:
            raise EdgeVLAError(f"{info_path} is not valid JSON ({e})", "restore the dataset's meta/info.json") from e
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in SUPPORTED:
            raise EdgeVLAError(f"{self.root} is LeRobotDataset {self.version or '(no codebase_version)'}, "
                               f"edge-vla reads {', '.join(SUPPORTED)}",
                               "convert it with lerobot (e.g. lerobot.scripts.convert_dataset_v21_to_v30)")
        self._check_layout()
        self.features: dict = self.info.get("features", {})
        self.fps = float(self.info.get("fps", 0) or 0)
        self.key_map = parse_key_map(key_map)
        unknown = [k for k in self.key_map.values() if k not in self.features]
        if unknown:
            raise EdgeVLAError(f"{self.root} has no feature {', '.join(map(repr, unknown))}",
                               f"its features: {self.feature_list()}")
        self.state_key = self._key("state", required=False)
        self.action_key = self._key("action", required=True)
        self.reasoning_key = self._key("reasoning", required=False)
        self.instruction = ""
        self._frames: OrderedDict = OrderedDict()  # (episode, camera) -> decoded frames (whole-episode cache)
        self._budget = self._cache_budget()
        self._frame_bytes = 0
        self._containers: dict = {}
        self._rowgroups: OrderedDict = OrderedDict()
        self._load()

    # --- layout -----------------------------------------------------------------------------------
    def _check_layout(self) -> None:
        meta = self.root / "meta"
        has_v3 = (meta / "episodes").is_dir()
        has_v2 = (meta / "episodes.jsonl").is_file()
        if self.version == "v3.0" and not has_v3:
            extra = " but holds v2.x files (meta/episodes.jsonl)" if has_v2 else ""
            raise EdgeVLAError(f"{self.root}: meta/info.json says v3.0{extra}; meta/episodes/ is missing",
                               "the dataset is half converted: re-download it or convert it again with lerobot")
        if self.version != "v3.0" and not has_v2:
            extra = " but holds v3.0 files (meta/episodes/)" if has_v3 else ""
            raise EdgeVLAError(f"{self.root}: meta/info.json says {self.version}{extra}; meta/episodes.jsonl is missing",
                               "fix codebase_version in meta/info.json or re-download the dataset")

    def feature_list(self) -> str:
        return ", ".join(f"{k} ({v.get('dtype')}{list(v.get('shape', []))})" for k, v in self.features.items())

    def _key(self, name: str, required: bool) -> str | None:
        if name in self.key_map:
            return self.key_map[name]
        for k in DEFAULT_KEYS.get(name, ()):
            if k in self.features:
                return k
        if required:
            raise EdgeVLAError(f"{self.root}: no feature for `{name}`: the dataset's features are {self.feature_list()}",
                               f"name it with --map {name}=FEATURE_KEY")
        return None

    def camera_key(self, camera: str) -> str | None:
        key = self.key_map.get(camera)
        if key is None:
            key = next((k for k in DEFAULT_KEYS.get(camera, ()) if k in self.features), None)
        if key is not None and self.features[key].get("dtype") not in ("video", "image"):
            raise EdgeVLAError(f"{self.root}: feature `{key}` (for camera `{camera}`) is {self.features[key].get('dtype')}, "
                               "not an image or video", f"its image features: {', '.join(self.image_keys()) or 'none'}")
        return key

    def image_keys(self) -> list[str]:
        return [k for k, v in self.features.items() if v.get("dtype") in ("video", "image")]

    def cameras(self) -> list[str]:
        names = [c for c in self.key_map if c not in NON_CAMERA] + [c for c in ("agentview", "wrist") if c not in self.key_map]
        return [c for c in names if self.camera_key(c) is not None]

    def require_cameras(self, cameras) -> None:
        missing = [c for c in cameras if self.camera_key(c) is None]
        if missing:
            raise EdgeVLAError(f"{self.root}: no image feature for camera(s) {', '.join(missing)}; "
                               f"its image features: {', '.join(self.image_keys()) or 'none'}", MAP_HELP)

    # --- index --------------------------------------------------------------------------------------
    def _tasks(self) -> dict[int, str]:
        meta = self.root / "meta"
        if self.version == "v3.0":
            t = _pq().read_table(meta / "tasks.parquet").to_pylist()
            # pandas writes the task text as the index column `task` (or `__index_level_0__`)
            return {int(r["task_index"]): str(r.get("task", r.get("__index_level_0__"))) for r in t}
        return {int(r["task_index"]): str(r["task"]) for r in _jsonl(meta / "tasks.jsonl")}

    def _episode_rows(self) -> list[dict]:
        meta = self.root / "meta"
        if self.version == "v3.0":
            files = sorted((meta / "episodes").rglob("*.parquet"))
            if not files:
                raise EdgeVLAError(f"{self.root}: meta/episodes/ holds no parquet file", "re-download the dataset")
            pq = _pq()
            rows = []
            for f in files:
                cols = [c for c in pq.read_schema(f).names if not c.startswith("stats/")]
                rows += pq.read_table(f, columns=cols).to_pylist()
            return sorted(rows, key=lambda r: r["episode_index"])
        return sorted(_jsonl(meta / "episodes.jsonl"), key=lambda r: r["episode_index"])

    def _data_path(self, ep: dict) -> Path:
        if self.version == "v3.0":
            rel = self.info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        else:
            chunk = ep["episode_index"] // int(self.info.get("chunks_size", 1000))
            rel = self.info["data_path"].format(episode_chunk=chunk, episode_index=ep["episode_index"])
        return self.root / rel

    def _video(self, ep: dict, key: str) -> tuple[Path, float]:
        if self.version == "v3.0":
            rel = self.info["video_path"].format(video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"],
                                                 file_index=ep[f"videos/{key}/file_index"])
            return self.root / rel, float(ep[f"videos/{key}/from_timestamp"])
        chunk = ep["episode_index"] // int(self.info.get("chunks_size", 1000))
        rel = self.info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=ep["episode_index"])
        return self.root / rel, 0.0

    def _load(self) -> None:
        pq = _pq()
        tasks = self._tasks()
        ep_rows = self._episode_rows()
        self.data_files: list[Path] = []
        self._columns: list[dict] = []
        file_ids: dict[Path, int] = {}
        video_keys = [k for k in self.image_keys() if self.features[k]["dtype"] == "video"]
        wanted = [k for k in (self.state_key, self.action_key, self.reasoning_key, "language_persistent") if k]
        self.episodes: dict[int, _LeEpisode] = {}
        for ep in ep_rows:
            path = self._data_path(ep)
            if path not in file_ids:
                if not path.is_file():
                    raise EdgeVLAError(f"{self.root}: data file {path.relative_to(self.root)} is missing",
                                       "re-download the dataset (meta/ names files that data/ lacks)")
                names = pq.read_schema(path).names
                cols = [c for c in dict.fromkeys(("episode_index", "frame_index", "timestamp", "task_index", *wanted))
                        if c in names]
                table = pq.read_table(path, columns=cols)
                file_ids[path] = len(self.data_files)
                self.data_files.append(path)
                self._columns.append(_columns(table))
            fi = file_ids[path]
            c = self._columns[fi]
            rows = np.flatnonzero(c["episode_index"] == ep["episode_index"])
            if "frame_index" in c:
                rows = rows[np.argsort(c["frame_index"][rows], kind="stable")]
            if not len(rows):
                continue
            ts = c["timestamp"][rows].astype(np.float64) if "timestamp" in c else np.arange(len(rows)) / max(self.fps, 1)
            ep_tasks = ep.get("tasks") or []
            if "task_index" in c and int(c["task_index"][rows[0]]) in tasks:
                task = tasks[int(c["task_index"][rows[0]])]
            else:
                task = str(ep_tasks[0]) if ep_tasks else ""
            videos = {k: self._video(ep, k) for k in video_keys}
            self.episodes[int(ep["episode_index"])] = _LeEpisode(int(ep["episode_index"]), task, rows, fi, ts, videos)
        if not self.episodes:
            raise EdgeVLAError(f"{self.root} holds no episodes", "check meta/episodes and data/")
        self.demos = [f"episode_{i}" for i in sorted(self.episodes)]
        self.instruction = next(iter(self.episodes.values())).task
        for name, key in (("action", self.action_key), ("state", self.state_key)):
            if key is None:
                continue
            for fi, c in enumerate(self._columns):
                if key not in c:
                    raise EdgeVLAError(f"{self.data_files[fi]} has no column `{key}`", f"its features: {self.feature_list()}")
        dim = self._columns[0][self.action_key].shape[-1]
        if dim != 7:
            raise EdgeVLAError(f"{self.root}: `{self.action_key}` has {dim} dims; edge-vla's policies take 7 "
                               "(dx, dy, dz, droll, dpitch, dyaw, gripper)", "map a 7-dim end-effector delta action with --map action=KEY")
        if self.state_key is not None:
            sdim = self._columns[0][self.state_key].shape[-1]
            if sdim != 8:
                raise EdgeVLAError(f"{self.root}: `{self.state_key}` has {sdim} dims; edge-vla's state is 8 "
                                   "(eef pos 3, eef axis-angle 3, gripper qpos 2)", "map an 8-dim state with --map state=KEY")

    # --- the LiberoHDF5-like surface the dataset reads ------------------------------------------------
    def _ep(self, demo: str) -> _LeEpisode:
        try:
            return self.episodes[int(str(demo).rsplit("_", 1)[-1])]
        except (KeyError, ValueError):
            raise EdgeVLAError(f"{self.root} has no episode `{demo}`", f"episodes: {', '.join(self.demos[:5])}...") from None

    def episode_instruction(self, demo: str) -> str:
        return self._ep(demo).task

    def length(self, demo: str) -> int:
        return len(self._ep(demo).rows)

    def actions(self, demo: str) -> np.ndarray:
        e = self._ep(demo)
        return self._columns[e.data_file][self.action_key][e.rows].astype(np.float32)

    def proprio(self, demo: str) -> np.ndarray:
        e = self._ep(demo)
        if self.state_key is None:
            return np.zeros((len(e.rows), 8), np.float32)
        return self._columns[e.data_file][self.state_key][e.rows].astype(np.float32)

    def state(self, demo: str, t: int) -> np.ndarray:
        return self.proprio(demo)[t]

    def has_reasoning(self, demo: str) -> bool:
        e = self._ep(demo)
        c = self._columns[e.data_file]
        if self.reasoning_key in c:
            return any(c[self.reasoning_key][r] for r in e.rows)
        return "language_persistent" in c and any(c["language_persistent"][r] for r in e.rows)

    def reasoning(self, demo: str, t: int) -> Reasoning | None:
        e = self._ep(demo)
        c = self._columns[e.data_file]
        row = e.rows[t]
        if self.reasoning_key in c:
            raw = c[self.reasoning_key][row]
            if not raw:
                return None
            try:
                r = Reasoning.from_dict(json.loads(raw))
            except (ValueError, TypeError) as ex:
                raise EdgeVLAError(f"{self.root}: `{self.reasoning_key}` of episode {e.index} frame {t} is not "
                                   f"reasoning JSON ({ex})", "store json.dumps(Reasoning.to_dict()) per frame") from ex
            return None if r.is_empty() else r
        if "language_persistent" in c:
            return _from_language(c["language_persistent"][row], float(e.timestamps[t]))
        return None

    def image(self, demo: str, camera: str, t: int) -> np.ndarray:
        key = self.camera_key(camera)
        if key is None:
            self.require_cameras([camera])
        e = self._ep(demo)
        if self.features[key]["dtype"] == "image":
            return self._png(e, key, t)
        frames = self._frames.get((e.index, key))
        if frames is not None:
            self._frames.move_to_end((e.index, key))
            return frames[t]
        path, start = e.videos[key]
        if self._cache_whole_episodes(key):
            frames = self._decoder(path).segment(start + e.timestamps, self.fps)
            self._frames[(e.index, key)] = frames
            self._frame_bytes += frames.nbytes
            while self._frame_bytes > self._budget and len(self._frames) > 1:
                _, old = self._frames.popitem(last=False)
                self._frame_bytes -= old.nbytes
            return frames[t]
        return self._decoder(path).frame(start + float(e.timestamps[t]), self.fps)

    # --- frames ---------------------------------------------------------------------------------------
    @staticmethod
    def _cache_budget() -> int:
        return int(float(os.environ.get("EDGE_VLA_FRAME_CACHE_MB", FRAME_CACHE_MB)) * 2**20)

    def _cache_whole_episodes(self, key: str) -> bool:
        h, w, ch = (list(self.features[key].get("shape", [0, 0, 3])) + [3])[:3]
        n_frames = sum(len(e.rows) for e in self.episodes.values())
        n_video = len([k for k in self.image_keys() if self.features[k]["dtype"] == "video"])
        return n_frames * h * w * ch * max(n_video, 1) <= self._budget

    def _decoder(self, path: Path) -> "VideoDecoder":
        key = (os.getpid(), str(path))  # decoders must not cross a fork (DataLoader workers)
        if key not in self._containers:
            self._containers[key] = VideoDecoder(path)
        return self._containers[key]

    def _png(self, e: _LeEpisode, key: str, t: int) -> np.ndarray:
        pq = _pq()
        path = self.data_files[e.data_file]
        row = int(e.rows[t])
        pf_key = (os.getpid(), str(path))
        if pf_key not in self._containers:
            pf = pq.ParquetFile(path)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self._containers[pf_key] = (pf, starts)
        pf, starts = self._containers[pf_key]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        cache_key = (str(path), g, key)
        col = self._rowgroups.get(cache_key)
        if col is None:
            col = pf.read_row_group(g, columns=[key]).column(key).to_pylist()
            self._rowgroups[cache_key] = col
            while len(self._rowgroups) > 8:
                self._rowgroups.popitem(last=False)
        cell = col[row - starts[g]]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise EdgeVLAError(f"{path}: `{key}` of episode {e.index} frame {t} holds no image bytes "
                               f"(an image path: {cell.get('path') if isinstance(cell, dict) else None})",
                               "use a dataset with embedded images (lerobot embeds them when it saves an episode)")
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    # --- statistics -------------------------------------------------------------------------------------
    def action_quantiles(self) -> tuple[np.ndarray, np.ndarray] | None:
        """q01/q99 of the action from meta/stats.json, where the dataset records them."""
        p = self.root / "meta" / "stats.json"
        if not p.is_file():
            return None
        try:
            st = json.loads(p.read_text()).get(self.action_key, {})
        except ValueError:
            return None
        if "q01" not in st or "q99" not in st:
            return None
        return np.asarray(st["q01"], np.float64), np.asarray(st["q99"], np.float64)

    def close(self) -> None:
        for v in self._containers.values():
            if isinstance(v, VideoDecoder):
                v.close()
        self._containers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __getstate__(self):  # DataLoader workers open their own decoders
        d = dict(self.__dict__)
        d["_containers"] = {}
        return d


class VideoDecoder:
    """Frames of one mp4 by timestamp, with PyAV: a seek to the keyframe before, then decode forward."""

    def __init__(self, path: Path):
        try:
            import av
        except ImportError as e:  # pragma: no cover
            from edge_vla.errors import MissingDependencyError

            raise MissingDependencyError("av", "decoding LeRobot videos") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeVLAError(f"video file {self.path} is missing", "re-download the dataset's videos/")
        try:
            self.container = av.open(str(self.path))
            self.stream = self.container.streams.video[0]
            self.stream.thread_type = "NONE"  # one frame at a time: threads only add latency
            codec = self.stream.codec_context.name
        except (av.FFmpegError, IndexError) as e:
            raise EdgeVLAError(f"cannot decode {self.path} ({e})",
                               "this PyAV build lacks the codec: pip install -U av (its wheels decode AV1, H.264, HEVC)") from e
        self.codec = codec
        self.time_base = float(self.stream.time_base)

    def _decode_from(self, ts: float):
        import av

        try:
            self.container.seek(int(max(ts, 0.0) / self.time_base), stream=self.stream, backward=True, any_frame=False)
            for frame in self.container.decode(self.stream):
                yield frame
        except av.FFmpegError as e:
            raise EdgeVLAError(f"cannot decode {self.path} ({self.codec}): {e}",
                               "this PyAV build cannot decode it: pip install -U av, or re-encode the video") from e

    def frame(self, ts: float, fps: float) -> np.ndarray:
        tol = 0.5 / max(fps, 1.0)
        last = None
        for f in self._decode_from(ts):
            t = float(f.pts * self.time_base) if f.pts is not None else None
            if t is None or t >= ts - tol:
                return f.to_ndarray(format="rgb24")
            last = f
        if last is None:
            raise EdgeVLAError(f"{self.path} has no frame at {ts:.3f} s", "the video is shorter than its episode: re-download it")
        return last.to_ndarray(format="rgb24")

    def segment(self, timestamps: np.ndarray, fps: float) -> np.ndarray:
        """Frames at `timestamps` (sorted), decoded in one pass."""
        tol = 0.5 / max(fps, 1.0)
        out = [None] * len(timestamps)
        i = 0
        for f in self._decode_from(float(timestamps[0])):
            t = float(f.pts * self.time_base)
            while i < len(timestamps) and t >= timestamps[i] - tol:
                out[i] = f.to_ndarray(format="rgb24")
                i += 1
            if i == len(timestamps):
                break
        if i < len(timestamps):
            raise EdgeVLAError(f"{self.path} ends before {timestamps[i]:.3f} s", "the video is shorter than its episode: re-download it")
        return np.stack(out)

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise EdgeVLAError(f"{path} is missing", "re-download the dataset's meta/")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _columns(table) -> dict[str, np.ndarray]:
    """Parquet columns as numpy: vectors (fixed-size or plain lists) as (N, D), text and language rows as objects."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        t = col.type
        if pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), t.list_size)
        elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type):
            out[name] = np.asarray(col.to_pylist(), dtype=np.float64)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out[name] = col.to_numpy(zero_copy_only=False)
        else:  # text, language rows
            out[name] = np.asarray(col.to_pylist() + [None], dtype=object)[:-1]
    return out


def _from_language(rows, t: float) -> Reasoning | None:
    """lerobot's language_persistent rows -> the plan / subtask / motion active at time t."""
    if not rows:
        return None
    active: dict[str, tuple[float, str]] = {}
    for r in rows:
        style, ts = r.get("style"), float(r.get("timestamp") or 0.0)
        if style in ("plan", "subtask", "motion") and ts <= t + 1e-6 and r.get("content"):
            if style not in active or ts >= active[style][0]:
                active[style] = (ts, str(r["content"]))
    r = Reasoning(plan=active.get("plan", (0, None))[1], subtask=active.get("subtask", (0, None))[1],
                  move=active.get("motion", (0, None))[1])
    return None if r.is_empty() else r


def check_stats(source: LeRobotSource, q01: np.ndarray, q99: np.ndarray) -> None:
    """Warn where the dataset's own action q01/q99 disagree with ours (stale or other-normalized stats)."""
    theirs = source.action_quantiles()
    if theirs is None:
        return
    lo, hi = theirs
    if lo.shape != q01.shape:
        return
    # lerobot estimates quantiles from per-episode histograms: close to the exact ones on real data,
    # loose on a few dozen frames; a stale or differently scaled stats.json is off by far more.
    span = np.maximum(np.asarray(q99) - np.asarray(q01), 1e-6)
    off = np.maximum(np.abs(lo - q01), np.abs(hi - q99)) / span
    if (off > STATS_TOLERANCE).any():
        dims = ", ".join(str(i) for i in np.flatnonzero(off > STATS_TOLERANCE))
        warnings.warn(f"{source.root}: meta/stats.json's action q01/q99 differ from the data's by more than "
                      f"{STATS_TOLERANCE:.0%} of the range in dim(s) {dims}; training uses the statistics computed "
                      "from the data", stacklevel=2)


__all__ = ["LeRobotSource", "VideoDecoder", "parse_key_map", "resolve_path", "is_lerobot_dir", "looks_like_hub_id",
           "check_stats", "DEFAULT_KEYS"]
