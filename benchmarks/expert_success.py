"""Scripted expert success per LIBERO task over the benchmark init states (no rendering).

    OMP_NUM_THREADS=1 python benchmarks/expert_success.py --tasks 46,47 --episodes 50 --out expert_success.json

Resumable: finished (task, init state) records are kept in --out and skipped on a rerun.
Prints one line per task; the JSON keeps every episode's outcome and length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="libero_90")
    ap.add_argument("--tasks", default=None, help="comma-separated names or indices (default: the covered list)")
    ap.add_argument("--episodes", type=int, default=50, help="benchmark init states 0..N-1")
    ap.add_argument("--out", default="expert_success.json")
    args = ap.parse_args()

    from edge_vla.io import atomic_write_text
    from edge_vla.sim.env import LiberoEnv, list_tasks, resolve_task
    from edge_vla.sim.expert import covered_tasks, run_episode

    names = list_tasks(args.suite)
    tasks = [names[resolve_task(args.suite, t)] for t in args.tasks.split(",")] if args.tasks else covered_tasks(args.suite)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for task in tasks:
        rec = results.setdefault(task, {})
        todo = [i for i in range(args.episodes) if str(i) not in rec]
        if todo:
            env = LiberoEnv(args.suite, task, cameras=())
            t0 = time.time()
            for i in todo:
                r = run_episode(env, init_state=i)
                rec[str(i)] = {"success": r["success"], "steps": r["steps"]}
                atomic_write_text(out, json.dumps(results, indent=1))
            env.close()
            rate = f"{time.time() - t0:.0f}s"
        else:
            rate = "cached"
        done = [rec[str(i)] for i in range(args.episodes) if str(i) in rec]
        ok = sum(r["success"] for r in done)
        steps = [r["steps"] for r in done if r["success"]]
        print(f"{task}: {ok}/{len(done)} ({100 * ok / max(1, len(done)):.0f}%), mean steps "
              f"{sum(steps) / max(1, len(steps)):.0f}, {rate}", flush=True)


if __name__ == "__main__":
    main()
