"""Samples/s reading demos from LIBERO hdf5 vs the same demos as a LeRobot v3.0 dataset (AV1 video).

    .venv/bin/python benchmarks/lerobot_decode.py [--episodes 20] [--steps 50] [--size 64] [--train-steps 20]

Writes a synthetic dataset at the tiny preset's image size (64 px, two cameras), exports it with
`export_lerobot`, then reads every sample in a shuffled order three ways: hdf5, LeRobot with the
decoded-frame cache (what a dataset that fits EDGE_VLA_FRAME_CACHE_MB gets), and LeRobot decoding
one frame per sample (seek; what a dataset larger than the cache gets). With --train-steps > 0 it
also times `edge-vla train --recipe vla` (tiny preset) on each. Prints one JSON object.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make(root: Path, episodes: int, steps: int, size: int) -> Path:
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    demos = []
    for e in range(episodes):
        imgs = np.stack([np.stack([(xx * 3 + t * 2 + e * 9) % 256, (yy * 3) % 256, (xx + yy + t) % 256], -1)
                         for t in range(steps)]).astype(np.uint8)
        imgs += rng.integers(0, 8, imgs.shape, dtype=np.uint8)  # some texture, as rendered scenes have
        a = rng.uniform(-0.9, 0.9, (steps, 7)).astype(np.float32)
        a[:, 6] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)
        demos.append({"actions": a, "proprio": rng.normal(size=(steps, 8)), "images": {"agentview": imgs, "wrist": imgs[:, ::-1]}})
    write_libero_hdf5(root / "hdf5" / "SCENE1_do_the_task_demo.hdf5", demos, "do the task")
    return root / "hdf5"


def read_rate(path, env=None) -> float:
    from edge_vla.data.dataset import open_dataset

    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        ds = open_dataset(path, split="all")
        order = np.random.default_rng(1).permutation(len(ds))
        t0 = time.perf_counter()
        for i in order:
            ds[int(i)]
        return len(order) / (time.perf_counter() - t0)
    finally:
        os.environ.clear()
        os.environ.update(old)


def train_rate(path, out, steps: int, env=None) -> float:
    from edge_vla.train.config import load_train_config
    from edge_vla.train.trainer import train

    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        cfg = load_train_config(None, ["recipe=vla", "preset=tiny", f"steps={steps}", "batch_size=16", "warmup_steps=1",
                                       "val_fraction=0.05", "val_max_samples=4", f"log_every={steps}"])
        t0 = time.perf_counter()
        train(cfg, str(path), str(out), show_progress=False)
        return steps * 16 / (time.perf_counter() - t0)
    finally:
        os.environ.clear()
        os.environ.update(old)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=0)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from edge_vla.data.lerobot_write import export_lerobot

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        h5 = make(root, args.episodes, args.steps, args.size)
        le = export_lerobot(h5, root / "lerobot")
        r = {"frames": args.episodes * args.steps, "image_size": args.size, "cameras": 2,
             "hdf5_samples_per_s": read_rate(h5),
             "lerobot_cached_samples_per_s": read_rate(le),
             "lerobot_seek_samples_per_s": read_rate(le, {"EDGE_VLA_FRAME_CACHE_MB": "0"})}
        if args.train_steps:
            train_rate(h5, root / "t0", 2)  # warm-up: first-call costs (imports, allocator) land on no one
            r["train_hdf5_samples_per_s"] = train_rate(h5, root / "t1", args.train_steps)
            r["train_lerobot_cached_samples_per_s"] = train_rate(le, root / "t2", args.train_steps)
            r["train_lerobot_seek_samples_per_s"] = train_rate(le, root / "t3", args.train_steps,
                                                               {"EDGE_VLA_FRAME_CACHE_MB": "0"})
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
