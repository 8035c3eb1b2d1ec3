"""Write edge-vla demos (LIBERO hdf5 + ECoT reasoning) as a LeRobotDataset v3.0, for lerobot and openpi.

    export_lerobot("data/libero90_mini", "out/libero90_mini_lerobot")

Laid out as lerobot >= 0.4 writes it (HuggingFaceVLA/libero's names, so LIBERO configs of lerobot
and openpi read it unchanged):

    meta/info.json, meta/stats.json, meta/tasks.parquet (task_index, pandas index `task`)
    meta/episodes/chunk-000/file-000.parquet   one row per episode: tasks, length, data/ and
                                               videos/<key>/ chunk and file indices, dataset_from/to_index,
                                               from/to_timestamp, stats/<feature>/<stat>
    data/chunk-000/file-000.parquet            observation.state (8), action (7), reasoning (string),
                                               timestamp, frame_index, episode_index, index, task_index
    videos/observation.images.image/chunk-000/file-000.mp4        agentview, every episode in one file
    videos/observation.images.wrist_image/chunk-000/file-000.mp4  wrist

Every recorded step is written (no-op steps too: the reader drops them again). The reasoning
goes in a per-frame string column, JSON of `Reasoning.to_dict()`: lerobot's language columns
hold plan/subtask/motion rows only, not the boxes, gripper track and reasons ECoT has.
Videos are AV1 (libsvtav1, yuv420p, a keyframe every 2 frames, lerobot's defaults): lossy, so
frames read back within codec tolerance; everything else reads back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_directory, check_output_dir

CAMERA_KEYS = {"agentview": "observation.images.image", "wrist": "observation.images.wrist_image"}
CHUNK_SIZE = 1000
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
VIDEO_DEFAULTS = {"vcodec": "libsvtav1", "pix_fmt": "yuv420p", "g": 2, "crf": 30, "preset": 12}


def _stats(x: np.ndarray) -> dict:
    """lerobot's per-feature statistics of (N, ...) values, reduced over the first axis."""
    x = np.asarray(x, dtype=np.float64)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=0)
    return out


def _image_stats(frames: np.ndarray) -> dict:
    """Per-channel statistics in [0, 1], shaped (3, 1, 1) like lerobot's (frames subsampled to <= 100)."""
    idx = np.linspace(0, len(frames) - 1, min(len(frames), 100)).round().astype(int)
    px = frames[idx].reshape(-1, 3).astype(np.float64) / 255.0
    st = _stats(px)
    st = {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in st.items()}
    st["count"] = np.array([len(idx)])
    return st


def _merge_stats(parts: list[dict]) -> dict:
    """Dataset statistics from per-episode ones (count-weighted means; quantiles averaged, as lerobot does)."""
    w = np.array([p["count"][0] for p in parts], dtype=np.float64)
    out = {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0)}
    mean = np.tensordot(w, np.stack([p["mean"] for p in parts]), axes=1) / w.sum()
    var = np.tensordot(w, np.stack([p["std"] ** 2 + (p["mean"] - mean) ** 2 for p in parts]), axes=1) / w.sum()
    out.update(mean=mean, std=np.sqrt(var), count=np.array([int(w.sum())]))
    for k in parts[0]:
        if k.startswith("q"):
            out[k] = np.tensordot(w, np.stack([p[k] for p in parts]), axes=1) / w.sum()
    return out


def _tolist(st: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in st.items()}


class _Video:
    """One camera's mp4: every episode's frames in one stream, pts = frame number."""

    def __init__(self, path: Path, size: tuple[int, int], fps: int, crf: int):
        import os

        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config per stream otherwise

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(VIDEO_DEFAULTS["vcodec"], rate=fps)
        self.stream.width, self.stream.height = size[1], size[0]
        self.stream.pix_fmt = VIDEO_DEFAULTS["pix_fmt"]
        self.stream.options = {"g": str(VIDEO_DEFAULTS["g"]), "crf": str(crf), "preset": str(VIDEO_DEFAULTS["preset"])}
        self.n = 0

    def add(self, frames: np.ndarray) -> None:
        import av

        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.n
            self.n += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _tasks_table(tasks: list[str]):
    """meta/tasks.parquet as pandas writes it (lerobot reads it with pandas: the task is the index)."""
    import pyarrow as pa

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.3.3",
    }
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def export_lerobot(data, out, fps: int = 10, overwrite: bool = False, crf: int = VIDEO_DEFAULTS["crf"],
                   robot_type: str = "panda", repo_id: str | None = None, progress=None) -> Path:
    """Write the demos of `data` (anything `open_dataset` reads) as a LeRobotDataset v3.0 at `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edge_vla.data.dataset import open_dataset

    out = Path(out)
    # Before the slow part: a non-empty `out` only with --overwrite, and never the demos themselves.
    check_output_dir(out, None, overwrite, inputs=[data])
    ds = open_dataset(data, split="all", drop_noops=False, cameras=None, val_fraction=0.0)
    cams = list(ds.cameras)
    if not cams:
        raise EdgeVLAError(f"{data} holds no camera images", "export demos that have agentview/wrist images")
    keys = {c: CAMERA_KEYS.get(c, f"observation.images.{c}") for c in cams}
    tasks: list[str] = []
    with atomic_directory(out, overwrite=overwrite, inputs=[data]) as tmp:
        videos: dict = {}
        columns = {k: [] for k in ("observation.state", "action", "reasoning", "timestamp", "frame_index",
                                   "episode_index", "index", "task_index")}
        ep_rows, ep_stats = [], []
        size = None
        index = 0
        with_reasoning = ds.has_reasoning
        # Episodes in dataset order; every recorded step of each (the dataset was opened with drop_noops=False).
        starts = np.cumsum([0] + [len(e.steps) for e in ds.episodes])
        for ei, e in enumerate(ds.episodes):
            samples = [ds[int(i)] for i in range(starts[ei], starts[ei + 1])]
            n = len(samples)
            task = samples[0].instruction
            if task not in tasks:
                tasks.append(task)
            frames = {c: np.stack([s.images[c] for s in samples]) for c in cams}
            if size is None:
                size = frames[cams[0]].shape[1:3]
                for c in cams:
                    videos[c] = _Video(tmp / f"videos/{keys[c]}/chunk-000/file-000.mp4", size, fps, crf)
            from_ts = {c: videos[c].n / fps for c in cams}
            for c in cams:
                if frames[c].shape[1:3] != tuple(size):
                    raise EdgeVLAError(f"{e.name}: camera {c} frames are {frames[c].shape[1:3]}, earlier episodes' {tuple(size)}",
                                       "export demos rendered at one image size")
                videos[c].add(frames[c])
            state = np.stack([s.state for s in samples]).astype(np.float32)
            action = np.stack([s.action for s in samples]).astype(np.float32)
            ts = (np.arange(n) / fps).astype(np.float32)
            columns["observation.state"] += list(state)
            columns["action"] += list(action)
            columns["reasoning"] += [json.dumps(s.reasoning.to_dict()) if s.reasoning is not None else "" for s in samples]
            columns["timestamp"] += list(ts)
            columns["frame_index"] += list(range(n))
            columns["episode_index"] += [ei] * n
            columns["index"] += list(range(index, index + n))
            columns["task_index"] += [tasks.index(task)] * n
            st = {"observation.state": _stats(state), "action": _stats(action), "timestamp": _stats(ts[:, None]),
                  "frame_index": _stats(np.arange(n)[:, None]), "episode_index": _stats(np.full((n, 1), ei)),
                  "index": _stats(np.arange(index, index + n)[:, None]), "task_index": _stats(np.full((n, 1), tasks.index(task)))}
            st.update({keys[c]: _image_stats(frames[c]) for c in cams})
            ep_stats.append(st)
            row = {"episode_index": ei, "tasks": [task], "length": n, "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": index, "dataset_to_index": index + n}
            for c in cams:
                row.update({f"videos/{keys[c]}/chunk_index": 0, f"videos/{keys[c]}/file_index": 0,
                            f"videos/{keys[c]}/from_timestamp": from_ts[c], f"videos/{keys[c]}/to_timestamp": from_ts[c] + n / fps})
            for feat, s in st.items():
                row.update({f"stats/{feat}/{k}": np.asarray(v).tolist() for k, v in s.items()})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            ep_rows.append(row)
            index += n
            if progress is not None:
                progress(ei + 1, len(ds.episodes))
        for v in videos.values():
            v.close()

        features = {keys[c]: {"dtype": "video", "shape": [int(size[0]), int(size[1]), 3], "names": ["height", "width", "channel"],
                              "info": {"video.height": int(size[0]), "video.width": int(size[1]), "video.codec": "av1",
                                       "video.pix_fmt": VIDEO_DEFAULTS["pix_fmt"], "video.is_depth_map": False,
                                       "video.fps": fps, "video.channels": 3, "has_audio": False,
                                       "video.g": VIDEO_DEFAULTS["g"], "video.crf": crf, "video.preset": VIDEO_DEFAULTS["preset"]}}
                    for c in cams}
        features["observation.state"] = {"dtype": "float32", "shape": [8], "names": [
            "eef_pos_x", "eef_pos_y", "eef_pos_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
            "gripper_qpos_left", "gripper_qpos_right"]}
        features["action"] = {"dtype": "float32", "shape": [7], "names": ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]}
        if with_reasoning:
            features["reasoning"] = {"dtype": "string", "shape": [1], "names": None}
        for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
                      ("task_index", "int64")):
            features[k] = {"dtype": dt, "shape": [1], "names": None}

        def vec(name, dim):
            flat = pa.array(np.asarray(columns[name], np.float32).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, dim)

        arrays = {"observation.state": vec("observation.state", 8), "action": vec("action", 7)}
        if with_reasoning:
            arrays["reasoning"] = pa.array(columns["reasoning"], pa.string())
        arrays["timestamp"] = pa.array(np.asarray(columns["timestamp"], np.float32))
        for k in ("frame_index", "episode_index", "index", "task_index"):
            arrays[k] = pa.array(np.asarray(columns[k], np.int64))
        hf = {"observation.state": {"feature": {"dtype": "float32", "_type": "Value"}, "length": 8, "_type": "List"},
              "action": {"feature": {"dtype": "float32", "_type": "Value"}, "length": 7, "_type": "List"}}
        if with_reasoning:
            hf["reasoning"] = {"dtype": "string", "_type": "Value"}
        hf.update({k: {"dtype": features[k]["dtype"], "_type": "Value"}
                   for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")})
        table = pa.table(arrays).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": hf}})})
        (tmp / "data/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp / "data/chunk-000/file-000.parquet")
        (tmp / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(ep_rows), tmp / "meta/episodes/chunk-000/file-000.parquet")
        pq.write_table(_tasks_table(tasks), tmp / "meta/tasks.parquet")
        stats = {feat: _tolist(_merge_stats([s[feat] for s in ep_stats])) for feat in ep_stats[0]}
        (tmp / "meta/stats.json").write_text(json.dumps(stats, indent=4))
        info = {
            "codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": len(ep_rows), "total_frames": index,
            "total_tasks": len(tasks), "chunks_size": CHUNK_SIZE, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(ep_rows)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features,
        }
        (tmp / "meta/info.json").write_text(json.dumps(info, indent=4))
        if repo_id:
            (tmp / "README.md").write_text(f"---\ntags: [LeRobot, edge-vla]\n---\n# {repo_id}\n\nWritten by "
                                           "`edge-vla data export-lerobot`.\n")
    return out


__all__ = ["export_lerobot", "CAMERA_KEYS"]
