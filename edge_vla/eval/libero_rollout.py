"""LIBERO rollouts the way the field runs them: benchmark init states, seed 7, 10 settle steps,
per-suite step limits (edge_vla.sim.env), preprocessing identical to training (the Policy's
processor), N trials per task.

    run_libero(RolloutConfig(policy="ckpt/", suite="libero_90", tasks=[...], trials=50, out="runs/"))

- one results file per policy (edge_vla.eval.results), rewritten after every episode, so an
  interrupted run resumes where it stopped (episodes already in the file are skipped);
- `tasks` may name task sets (`living-room-scene2-basket`: edge_vla.sim.env.TASK_SETS);
- `shard=(i, N)`: a deterministic 1/N of the episode list (index % N == i), so a SLURM array or a
  Ray job spreads a suite over machines and `edge-vla report` merges the shard files;
- `workers`: parallel processes on this machine (spawned: MuJoCo/EGL and torch do not fork well),
  or, with `ray=ADDRESS`, Ray actors on a cluster (edge_vla.eval.ray_rollout; same file, same resume);
- every episode records which object was lifted and why a failure failed (edge_vla.sim.lift), and
  per policy call whether it reasoned (adaptive mode decides per call);
- `perturbation`: a LIBERO-PRO perturbed version of the suite (edge_vla.sim.env.perturbations);
- action chunks: a (K, 7) answer executes its first `execute_k` actions before re-planning, or, with
  `temporal_ensemble=m`, the policy is asked every step and the chunks' predictions are averaged
  (ACT's temporal ensembling; edge_vla.eval.chunking);
- `reason_every=k` (full mode): reason on every k-th call and reuse the last reasoning in between;
- `policy="expert"`: the scripted expert (privileged state), a ceiling check for the setup.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.data.sample import ACTION_DIM
from edge_vla.eval.chunking import ChunkExecutor, query_chunk
from edge_vla.eval.results import load_results, summarize, write_results
from edge_vla.artifacts import content_digest
from edge_vla.procs import exit_with_parent, sigterm_raises_exit

from edge_vla.sim.env import preload_triton  # noqa: E402  (before any simulator: see its docstring)

preload_triton()

EXPERT = "expert"
REASONING_SAMPLES = 3  # reasoning texts kept per episode in the results file


@dataclass
class RolloutConfig:
    policy: str  # checkpoint dir, bundle dir, or "expert"
    suite: str = "libero_90"
    tasks: list[str] | None = None  # names, instructions or indices; None = every task of the suite
    trials: int = 50  # benchmark init states first_trial .. first_trial + trials - 1
    first_trial: int = 0
    out: str = "runs"  # results directory
    name: str | None = None  # variant name (default: policy dir name + mode)
    backend: str = "auto"
    mode: str | None = None
    workers: int | None = 1  # None: 1 here, or one Ray actor per CPU of the cluster with `ray`
    shard: tuple[int, int] = (0, 1)
    execute_k: int | None = None  # actions executed per chunk before re-planning (None: the whole chunk)
    temporal_ensemble: float | None = None  # ACT's weight m: query every step, average the chunks (eval.chunking)
    reason_every: int = 1
    max_steps: int | None = None  # None: the suite's limit
    seed: int = 7
    settle_steps: int = 10
    video_dir: str | None = None
    image_size: int | None = None  # env render size; None: the policy's input size (64 for the expert)
    perturbation: str | None = None  # LIBERO-PRO: roll out on `<suite>_<perturbation>` (edge_vla.sim.env.perturbations)
    entropy_threshold: float | None = None  # adaptive mode: reason when the action tokens' mean entropy is above
    max_free_tokens: int | None = None  # full/adaptive: cap on reasoning tokens per call (None: the Policy's default)
    ray: str | None = None  # Ray cluster address ("local", "auto", host:port, ray://...): shard episodes over it
    extra: dict = field(default_factory=dict)

    @property
    def run_suite(self) -> str:
        """The suite episodes run in: the perturbed one when a perturbation is asked for."""
        if not self.perturbation:
            return self.suite
        from edge_vla.sim.env import perturbed_suite

        return perturbed_suite(self.suite, self.perturbation)


# --- the episode list and sharding ------------------------------------------------------------------
def episode_list(suite: str, tasks: list[str] | None, trials: int, first_trial: int = 0) -> list[tuple[str, int]]:
    """Every (task name, init state) of the run, in a fixed order (the tasks as given, task sets
    expanded, or the suite's order; then trial)."""
    from edge_vla.sim.env import expand_tasks, init_states, list_tasks

    chosen = expand_tasks(suite, tasks) if tasks else list_tasks(suite)
    out = []
    for name in chosen:
        n = len(init_states(suite, name))
        if first_trial + trials > n:
            raise EdgeVLAError(f"{suite}/{name} has {n} benchmark init states, asked for trials "
                               f"{first_trial}..{first_trial + trials - 1}", f"use --trials {n - first_trial} or fewer")
        out += [(name, first_trial + i) for i in range(trials)]
    return out


def shard_of(items: list, shard: tuple[int, int]) -> list:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise EdgeVLAError(f"shard {i}/{n} is invalid", "use --shard i/N with 0 <= i < N, e.g. 0/4")
    return [x for k, x in enumerate(items) if k % n == i]


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise EdgeVLAError(f"--shard {text!r} is not i/N", "use e.g. --shard 0/4 (this is shard 0 of 4)")
    shard = (int(m.group(1)), int(m.group(2)))
    shard_of([], shard)
    return shard


def episode_id(suite: str, task: str, trial: int) -> str:
    return f"{suite}/{task}/{trial}"


# --- policies ---------------------------------------------------------------------------------------
class ReuseReasoning:
    """Full-mode policy that reasons every k-th call and reuses that reasoning in between: the
    cached reasoning tokens are forced after the prompt (as `direct` forces " ACTION:") and only the
    action tokens are decoded, with the current image."""

    def __init__(self, policy, every: int):
        if policy.mode != "full":
            raise EdgeVLAError(f"--reason-every needs a policy in `full` mode, this one decodes `{policy.mode}`",
                               "pass --mode full, or drop --reason-every")
        self.policy, self.every = policy, int(every)
        self.mode = "full"
        self._ids: list[int] | None = None
        self._text: str | None = None
        self._calls = 0

    def reset(self):
        self.policy.reset()
        self._ids, self._text, self._calls = None, None, 0

    def act(self, obs):
        p = self.policy
        if self._ids is None or self._calls % self.every == 0:
            res = p.act(obs)
            ids = list(res.info.get("free_token_ids", []))
            prefix = list(p.inference_prefix_ids)
            self._ids = ids if prefix and ids[-len(prefix):] == prefix else ids + prefix
            self._text = res.reasoning_text
        else:
            saved = p.mode, p.inference_prefix_ids
            p.mode, p.inference_prefix_ids = "direct", self._ids
            try:
                res = p.act(obs)
            finally:
                p.mode, p.inference_prefix_ids = saved
            res.reasoning_text = self._text
            res.info["reused_reasoning"] = True
        self._calls += 1
        return res

    def __getattr__(self, name):
        return getattr(self.policy, name)


class ExpertPolicy:
    """The scripted expert behind the Policy interface (it reads privileged state from the env).

    `goal_object`: move this object of the scene instead of the task's (the expert of a sibling
    task in the same scene): a known wrong-object episode for checking edge_vla.sim.lift."""

    mode = EXPERT

    def __init__(self, goal_object: str | None = None):
        self.env = None
        self.expert = None
        self.goal_object = goal_object

    def bind(self, env):
        from edge_vla.sim.expert import ScriptedExpert

        self.env = env
        self.expert = ScriptedExpert(env, strict=False)

    def reset(self):
        if self.expert is not None:
            self.expert.reset()
            if self.goal_object is not None:
                self.expert.object = self.goal_object

    def act(self, obs):
        from edge_vla.runtime.policy import ActionResult

        return ActionResult(action=np.asarray(self.expert.act(obs), np.float32), tokens={},
                            info={"phase": self.expert.phase})


def load_rollout_policy(cfg: RolloutConfig):
    if cfg.policy == EXPERT:
        return ExpertPolicy()
    from edge_vla.runtime.policy import load_policy

    opts = {k: getattr(cfg, k) for k in ("entropy_threshold", "max_free_tokens") if getattr(cfg, k) is not None}
    policy = load_policy(cfg.policy, backend=cfg.backend, mode=cfg.mode, **opts)
    pc = policy.processor.config
    if int(pc.action_dim) != ACTION_DIM:
        raise EdgeVLAError(f"policy {cfg.policy} acts in {pc.action_dim}-D, LIBERO takes {ACTION_DIM}-D actions",
                           "evaluate a policy trained on LIBERO data (7-D: xyz, rpy deltas, gripper)")
    from edge_vla.sim.env import CAMERAS

    unknown = [c for c in pc.cameras if c not in CAMERAS]
    if unknown:
        raise EdgeVLAError(f"policy {cfg.policy} reads camera(s) {unknown}, LIBERO renders {list(CAMERAS)}",
                           "evaluate a policy trained on LIBERO's agentview/wrist cameras")
    if cfg.reason_every > 1:
        return ReuseReasoning(policy, cfg.reason_every)
    return policy


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def variant_info(cfg: RolloutConfig, policy) -> dict:
    """What the report groups and labels by: recipe, mode, precision, backend, target, size."""
    tag = f"-{cfg.perturbation}" if cfg.perturbation else ""  # a perturbed run is its own variant
    if cfg.policy == EXPERT:
        return {"name": cfg.name or f"scripted-expert{tag}", "recipe": "scripted-expert", "mode": EXPERT,
                "backend": "sim", "perturbation": cfg.perturbation}
    inner = getattr(policy, "policy", policy)
    backend = inner.backend
    recipe = dict(getattr(inner, "recipe", {}) or {})
    manifest = getattr(getattr(backend, "bundle", None), "manifest", None) or {}
    info = {
        "recipe": recipe.get("name") or recipe.get("recipe"),
        "mode": inner.mode + (f"/reason-every-{cfg.reason_every}" if cfg.reason_every > 1 else ""),
        "precision": manifest.get("precision") or getattr(backend, "precision", None) or "fp32",
        "backend": getattr(backend, "name", cfg.backend),
        "target": manifest.get("target") or "cpu",  # where it ran; a bundle names its target
        "bundle_bytes": _dir_bytes(Path(cfg.policy)),
        "perturbation": cfg.perturbation,
    }
    if recipe.get("distilled"):  # a student: the report sets it beside its teacher
        info["distilled"] = dict(recipe["distilled"])
    info["name"] = cfg.name or f"{Path(cfg.policy).name}-{info['mode'].replace('/', '-')}{tag}"
    return info


# --- one episode -----------------------------------------------------------------------------------
def run_episode(env, policy, trial: int, chunks: ChunkExecutor | None = None, video_path: Path | None = None) -> dict:
    """Roll one episode from benchmark init state `trial` (`chunks`: how action chunks are executed,
    default whole); returns its results record."""
    from edge_vla.sim.lift import LiftTracker, outcome

    obs, _ = env.reset(options={"init_state": trial})
    if isinstance(policy, ExpertPolicy):
        policy.bind(env)
    policy.reset()
    lift = LiftTracker(env)
    chunks = chunks or ChunkExecutor()
    chunks.reset()
    latency, reasoned, generated, samples, frames = [], [], 0, [], []
    reasoning, steps, success, executed = None, 0, False, 0
    t_episode = time.perf_counter()
    while True:
        if chunks.needs_query():
            res, a, ms = query_chunk(policy, obs, "LIBERO", "evaluate a policy trained on LIBERO data")
            latency.append(ms)
            reasoned.append(_reasoned(policy, res))
            chunks.add(a)
            tok = res.tokens or {}
            generated += int(tok.get("reasoning", 0)) + int(tok.get("action", 0))
            if res.reasoning_text:
                reasoning = res.reasoning_text
                if len(samples) < REASONING_SAMPLES and not res.info.get("reused_reasoning"):
                    samples.append({"step": steps, "text": res.reasoning_text})
        action = chunks.next()
        if video_path is not None:
            from edge_vla.eval.video import compose_frame

            caption = f"step {steps}  action {np.array2string(action, precision=2, suppress_small=True)}"
            frames.append(compose_frame(obs["images"], caption, reasoning))
        # Frames are rendered only where they are seen: the next policy call, or the video.
        obs, _, success, truncated, _ = env.step(action, render=video_path is not None or chunks.needs_query())
        lift.update()
        steps += 1
        executed += 1
        if success or truncated:
            break
    if video_path is not None:
        from edge_vla.eval.video import write_mp4

        write_mp4(video_path, frames)
    lifted = lift.result()
    return {"success": bool(success), "steps": steps, "actions_executed": executed, "latency_ms": latency,
            "reasoned": reasoned, "reasoning_rate": round(sum(reasoned) / len(reasoned), 4) if reasoned else None,
            "lifted": lifted["lifted"], "lifted_objects": lifted["lifted_objects"], "target_object": lifted["target"],
            "destination_object": lifted["destination"],
            "max_rise_m": lifted["max_rise_m"], "outcome": outcome(success, lifted),
            "tokens_generated": generated, "reasoning_samples": samples,
            "wall_s": round(time.perf_counter() - t_episode, 3), "video": str(video_path) if video_path else None}


def _reasoned(policy, res) -> bool:
    """Whether this call reasoned: adaptive says so per call; full mode always does (unless it
    reused the last reasoning, --reason-every); direct and the expert never."""
    adaptive = (res.info or {}).get("adaptive")
    if adaptive is not None:
        return bool(adaptive.get("reasoned"))
    return getattr(policy, "mode", None) == "full" and not (res.info or {}).get("reused_reasoning")


def _env_for(cfg: RolloutConfig, policy, task: str):
    from edge_vla.sim.env import LiberoEnv

    inner = getattr(policy, "policy", policy)
    pconf = getattr(getattr(inner, "processor", None), "config", None)
    size = cfg.image_size or (pconf.image_size if pconf is not None else 64)
    cameras = tuple(pconf.cameras) if pconf is not None else ("agentview", "wrist")
    if isinstance(policy, ExpertPolicy) and not cfg.video_dir:
        cameras = ()  # the expert reads simulator state: no frames to render (~17x faster steps)
    return LiberoEnv(cfg.run_suite, task, image_size=size, cameras=cameras, max_steps=cfg.max_steps,
                     settle_steps=cfg.settle_steps, seed=cfg.seed)


def _video_path(cfg: RolloutConfig, variant: str, task: str, trial: int) -> Path | None:
    if not cfg.video_dir:
        return None
    return Path(cfg.video_dir) / variant / f"{task}__{trial}.mp4"


def run_episodes(cfg: RolloutConfig, episodes: list[tuple[str, int]], emit, policy=None, variant: str = "") -> None:
    """Run episodes (grouped by task: one env per task) and call emit(record) after each."""
    policy = policy or load_rollout_policy(cfg)
    chunks = ChunkExecutor(cfg.execute_k, cfg.temporal_ensemble)
    by_task: dict[str, list[int]] = {}
    for task, trial in episodes:
        by_task.setdefault(task, []).append(trial)
    for task, trials in by_task.items():
        env = _env_for(cfg, policy, task)
        try:
            for trial in trials:
                emit(episode_record(cfg, env, policy, task, trial, chunks, variant))
        finally:
            env.close()


def episode_record(cfg: RolloutConfig, env, policy, task: str, trial: int, chunks: ChunkExecutor, variant: str) -> dict:
    """One episode of `task` from init state `trial`, as the record the results file keeps (the
    same for local workers and Ray actors)."""
    rec = run_episode(env, policy, trial, chunks, _video_path(cfg, variant, task, trial))
    return {"id": episode_id(cfg.run_suite, task, trial), "suite": cfg.run_suite, "task": task, "trial": trial,
            "init_state": trial, "instruction": env.instruction, **rec,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}  # which process ran it (Ray: which node)


def _worker(cfg: RolloutConfig, episodes, variant: str, out_q, parent_pid: int) -> None:  # a spawned process
    exit_with_parent(parent_pid)  # a killed `edge-vla eval` leaves no rollouts running
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        run_episodes(cfg, episodes, lambda rec: out_q.put(("record", rec)), variant=variant)
        out_q.put(("done", None))
    except EdgeVLAError as e:
        out_q.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        out_q.put(("error", f"worker failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))


# --- a whole run -----------------------------------------------------------------------------------
def results_path(cfg: RolloutConfig, variant: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", variant)
    i, n = cfg.shard
    return Path(cfg.out) / (f"{slug}.json" if n == 1 else f"{slug}.shard-{i}-of-{n}.json")


def _run_config(cfg: RolloutConfig, variant: dict) -> dict:
    d = asdict(cfg)
    d.pop("out")
    d.pop("ray")  # where it ran, not what it ran: a Ray run and a local one resume each other
    d["run_suite"] = cfg.run_suite
    d["shard"] = f"{cfg.shard[0]}/{cfg.shard[1]}"
    # a path whose contents changed (re-exported, re-trained) is another policy: never resume across it
    d["policy_sha256"] = content_digest(cfg.policy) if Path(cfg.policy).exists() else None
    d["variant"] = variant
    d["protocol"] = {"seed": cfg.seed, "settle_steps": cfg.settle_steps, "max_steps": cfg.max_steps or "suite default",
                     "init_states": "benchmark"}
    return d


def _set_aside(path: Path, prev: dict) -> Path:
    """Rename the results of a policy that is no longer at its path, so a fresh run starts there."""
    old = prev["config"].get("policy_sha256") or "unknown"
    aside = path.with_name(f"{path.stem}.replaced-{old[:12]}{path.suffix}")
    os.replace(path, aside)
    return aside


def _check_resumable(prev: dict, config: dict, path: Path) -> None:
    keys = ("policy", "policy_sha256", "suite", "perturbation", "mode", "backend", "execute_k", "temporal_ensemble",
            "reason_every", "entropy_threshold", "max_free_tokens", "seed", "settle_steps", "max_steps")
    diff = [k for k in keys if prev["config"].get(k) != config.get(k)]
    if diff:
        changed = " (the policy at that path has other contents now)" if "policy_sha256" in diff else ""
        raise EdgeVLAError(f"{path} holds a run with other settings ({', '.join(diff)} differ){changed}",
                           "pass another --out directory, or the same settings to resume")


def run_libero(cfg: RolloutConfig, progress: bool = True, set_aside_stale: bool = False) -> dict:
    """Run (or resume) an evaluation; returns {"path", "summary", "ran", "skipped", "set_aside"}.
    A results file of another policy at the same path (re-exported, re-shipped) is refused, or with
    `set_aside_stale` renamed (`set_aside`: where it went) and rolled afresh."""
    if cfg.trials < 1:
        raise EdgeVLAError(f"--trials {cfg.trials} must be at least 1")
    ChunkExecutor(cfg.execute_k, cfg.temporal_ensemble)  # checks both before any episode
    if cfg.reason_every < 1:
        raise EdgeVLAError(f"--reason-every {cfg.reason_every} must be at least 1")
    suite = cfg.run_suite
    all_eps = episode_list(suite, cfg.tasks, cfg.trials, cfg.first_trial)
    mine = shard_of(all_eps, cfg.shard)
    policy = load_rollout_policy(cfg)  # loaded here too: fail fast, and name the variant
    variant = variant_info(cfg, policy)
    config = _run_config(cfg, variant)
    path = results_path(cfg, variant["name"])
    records: list[dict] = []
    aside = None
    if path.exists():
        prev = load_results(path)
        if set_aside_stale and prev["config"].get("policy_sha256") != config["policy_sha256"]:
            aside = _set_aside(path, prev)
        else:
            _check_resumable(prev, config, path)
            records = list(prev["records"])
    done = {r["id"] for r in records}
    todo = [e for e in mine if episode_id(suite, *e) not in done]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_results(path, "libero", config, records, created=created)

    def save(rec):
        records.append(rec)
        write_results(path, "libero", config, records, created=created)

    bar = _Progress(len(mine), len(mine) - len(todo), sum(bool(r["success"]) for r in records), variant["name"],
                    enabled=progress)
    with contextlib.ExitStack() as stack:
        ray = None
        if cfg.ray and todo:  # connected before the bar: a cluster that is not there is one line, no bar
            from edge_vla.eval.ray_rollout import ray_session

            ray = stack.enter_context(ray_session(cfg.ray, cfg.workers))
        stack.enter_context(bar)

        def emit(rec):
            save(rec)
            bar.advance(rec["success"])

        if cfg.ray:
            from edge_vla.eval.ray_rollout import run_on_ray

            del policy
            if todo:
                run_on_ray(ray, cfg, todo, variant["name"], emit,
                           {"load_policy": load_rollout_policy, "make_env": _env_for, "record": episode_record})
        else:
            workers = max(1, min(cfg.workers or 1, len(todo)))
            if workers == 1:
                run_episodes(cfg, todo, emit, policy=policy, variant=variant["name"])
            else:
                del policy
                _run_parallel(cfg, todo, workers, variant["name"], emit)
    return {"path": str(path), "summary": summarize("libero", records), "ran": len(todo), "skipped": len(mine) - len(todo),
            "set_aside": aside, "variant": variant}


def _run_parallel(cfg, todo, workers, variant, emit) -> None:
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    # Round-robin over the task-ordered list: every worker gets a similar mix of tasks and trials.
    procs = [ctx.Process(target=_worker, args=(cfg, todo[w::workers], variant, out_q, os.getpid()), daemon=True)
             for w in range(workers)]
    finished, error = 0, None
    with sigterm_raises_exit():  # SIGTERM (a scheduler, `kill`) runs the `finally` that stops the workers
        try:
            for p in procs:
                p.start()
            while finished < workers and error is None:
                try:
                    kind, payload = out_q.get(timeout=5)
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in procs) and out_q.empty():
                        error = "a rollout worker exited without reporting (killed? out of memory?)"
                    continue
                if kind == "record":
                    emit(payload)
                elif kind == "done":
                    finished += 1
                else:
                    error = payload
        finally:
            for p in (p for p in procs if p.pid is not None):
                if p.is_alive() and (error is not None or finished < workers):
                    p.terminate()
                p.join(10)
    if error:
        raise EdgeVLAError(f"{error} (finished episodes are saved; re-run the same command to resume)")


class _Progress:
    """rich progress bar with the running success rate; silent when disabled."""

    def __init__(self, total: int, done: int, successes: int, name: str, enabled: bool = True):
        self.total, self.done, self.successes, self.name, self.enabled = total, done, successes, name, enabled
        self._p = None

    def _desc(self):
        rate = f"{100 * self.successes / self.done:.0f}%" if self.done else "–"
        return f"{self.name}: success {self.successes}/{self.done} ({rate})"

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._p.__enter__()
            self._task = self._p.add_task(self._desc(), total=self.total, completed=self.done)
        return self

    def advance(self, success: bool):
        self.done += 1
        self.successes += bool(success)
        if self._p is not None:
            self._p.update(self._task, advance=1, description=self._desc())

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
