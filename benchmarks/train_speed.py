"""Training throughput (samples/s) per recipe, before and after each speed lever, in one run.

    .venv/bin/python benchmarks/train_speed.py [--data DIR] [--recipes vla,ecot,ecot-lite-dropout]
        [--steps 20] [--batch 16] [--chunk 4] [--repeats 2] [--levers before,split,split+bf16,split+worker]

Every (recipe, lever) trains in a fresh process (`edge_vla.train.trainer.train`, the real loop,
tiny preset, one intra-op thread, no validation), on the same data: `--data` (a dataset
directory, e.g. the demo's) or, without it, a deterministic synthetic set of 64 samples whose
reasoning is as long as the demo's (~250-330 tokens with the tiny tokenizer) and 128 px images.
Configurations are interleaved (repeat 1: every lever of every recipe, then repeat 2, ...) so
each sees the same machine load; the table gives the median samples/s and the ratio to
`before`, per CPU second (this process and its DataLoader workers: what moves least on a shared
machine) and per wall second (what a worker process can buy, and what load moves most).

Levers (TrainConfig keys):
  before        split_by_length=false (every micro-batch padded to its longest row: the old loop)
  split         split_by_length=true (the default now: rows grouped by length, same gradient)
  split+bf16    + bf16=true (CPU bf16 autocast; opt-in, it changes the numbers slightly)
  split+worker  + num_workers=1 (sample encoding in a DataLoader worker process)
Also printed per run: the mean train loss of the last logged steps, so a lever that changed
what is learned would show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

LEVERS = {
    "before": {"split_by_length": False},
    "split": {"split_by_length": True},
    "split+bf16": {"split_by_length": True, "bf16": True},
    "split+worker": {"split_by_length": True, "num_workers": 1},
}
WARM = 2  # steps each child runs first, to subtract the set-up and the first steps' warm-up
OBJECTS = ["butter", "basket", "milk", "alphabet soup", "tomato sauce", "orange juice", "ketchup", "cream cheese"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthetic_samples(n: int = 64, chunk: int = 4, seed: int = 0, image_size: int = 128):
    """Deterministic Samples shaped like the demo's: 5 instructions, ECoT reasoning with 5-8 boxes
    and 6-10 future gripper points, `chunk`-action chunks, two cameras."""
    import numpy as np

    from edge_vla.data.sample import Sample
    from edge_vla.tokens.reasoning import Reasoning

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        obj = OBJECTS[i % 5]
        instruction = f"pick up the {obj} and put it in the basket"
        reasoning = Reasoning(
            task=instruction, plan=f"1. move to the {obj} 2. grasp it 3. lift it 4. move to the basket 5. release it",
            visible_objects=[(o, [int(v) for v in rng.integers(0, 128, 4)]) for o in OBJECTS[:int(rng.integers(5, 9))]],
            subtask_reason=f"the {obj} is not grasped yet, so the robot must reach it first",
            subtask=f"move to the {obj}", move_reason="the gripper is above and to the left of the object",
            move="move down and right",
            gripper=[(int(rng.integers(0, 128)), int(rng.integers(0, 128))) for _ in range(int(rng.integers(6, 11)))])
        action = rng.uniform(-0.9, 0.9, (chunk, 7)).astype(np.float32)
        action[:, -1] = np.where(action[:, -1] > 0, 1.0, -1.0)
        images = {cam: rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for cam in ("agentview", "wrist")}
        out.append(Sample(images=images, instruction=instruction, state=rng.normal(size=8).astype(np.float32),
                          action=action, reasoning=reasoning, episode=f"ep{i // 16}", step=i % 16))
    return out


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(spec: dict) -> dict:
    """Three training runs in this process: WARM steps (imports, not counted), WARM steps again and
    WARM + steps, the same set-up each: the last two differ by `steps` steps' cost, without the
    model build and data checks. Returns samples
    per wall second (the training loop's clock) and per CPU second (this process and its workers:
    on a shared machine the CPU time moves much less with the load than the wall time)."""
    import torch

    torch.set_num_threads(1)
    from edge_vla.train.config import TrainConfig
    from edge_vla.train.trainer import train

    data = spec["data"] or synthetic_samples(chunk=spec["chunk"])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The first run pays the imports and the lazy set-up: it is not counted.
        for i, steps in enumerate((WARM, WARM, WARM + spec["steps"])):
            cfg = TrainConfig(recipe=spec["recipe"], steps=steps, batch_size=spec["batch"], action_chunk=spec["chunk"],
                              val_fraction=0.0, warmup_steps=2, log_every=1, seed=0,
                              **{"bf16": False, **LEVERS[spec["lever"]]})
            out = Path(tmp) / f"run{i}"
            c0 = _cpu_s()
            train(cfg, data, out, show_progress=False)
            summary = json.loads((out / "summary.json").read_text())
            res[i] = {"cpu_s": _cpu_s() - c0, "wall_s": summary["wall_s"],
                          "losses": [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                                     if "train/loss" in x]}
    a, b = res[1], res[2]
    n = spec["steps"] * spec["batch"]
    return {"samples_per_s": n / max(b["wall_s"] - a["wall_s"], 1e-9), "samples_per_cpu_s": n / max(b["cpu_s"] - a["cpu_s"], 1e-9),
            "last_loss": statistics.mean(b["losses"][-5:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="a dataset directory (default: synthetic samples)")
    ap.add_argument("--recipes", default="vla,ecot,ecot-lite-dropout")
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    recipes, levers = a.recipes.split(","), a.levers.split(",")
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        sys.exit(f"unknown lever(s) {unknown}: pick from {list(LEVERS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs: dict[tuple[str, str], list[dict]] = {}
    say(f"{len(recipes)} recipes x {len(levers)} levers x {a.repeats} repeats, {a.steps} steps of batch {a.batch}")
    for r in range(a.repeats):
        for recipe in recipes:
            for lever in levers:
                spec = {"recipe": recipe, "lever": lever, "steps": a.steps, "batch": a.batch, "chunk": a.chunk,
                        "data": a.data}
                p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                   capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"{recipe} {lever} failed:\n{p.stderr[-2000:]}")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                runs.setdefault((recipe, lever), []).append(res)
                say(f"repeat {r + 1} {recipe:18s} {lever:13s} {res['samples_per_s']:6.1f} samples/s wall  "
                    f"{res['samples_per_cpu_s']:6.1f} per CPU s  loss {res['last_loss']:.4f}")
    table = {}
    for key, what in (("samples_per_cpu_s", "samples per CPU second"), ("samples_per_s", "samples per wall second")):
        print(f"\n{what}, median of {a.repeats} (ratio to {levers[0]})\n")
        print(f"| recipe | {' | '.join(levers)} |")
        print(f"| --- |{' --- |' * len(levers)}")
        for recipe in recipes:
            base = statistics.median(x[key] for x in runs[(recipe, levers[0])])
            cells = []
            for lever in levers:
                v = statistics.median(x[key] for x in runs[(recipe, lever)])
                loss = statistics.median(x["last_loss"] for x in runs[(recipe, lever)])
                table.setdefault(f"{recipe}/{lever}", {"last_loss": loss})[key] = v
                table[f"{recipe}/{lever}"][key + "_ratio"] = v / base
                cells.append(f"{v:.1f} ({v / base:.2f}x)")
            print(f"| `{recipe}` | {' | '.join(cells)} |")
    print(f"\n{a.steps} steps of batch {a.batch} after {WARM} warm-up steps; one intra-op thread, a fresh process each")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "table": table,
                                           "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
