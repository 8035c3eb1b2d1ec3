"""LIBERO rollouts sharded over a Ray cluster (`edge-vla eval libero ... --ray ADDRESS`).

The driver (run_libero) keeps everything that makes a run resumable: the episode list, the
results file, the skip of finished episodes and the atomic rewrite after every episode. Ray only
runs episodes: one actor per worker (one CPU each) loads the policy once, keeps one env per task,
and returns each episode's record (`libero_rollout.episode_record`, the same dict the local
workers emit); the driver hands the next episode to whichever actor finishes first, so a slow
task does not hold the others back. An interrupted Ray run resumes with or without Ray.

Addresses: `local` starts a Ray instance on this machine for the run (shut down after), `auto`
joins the one already running here (`ray start --head`), anything else is passed to
`ray.init(address=...)` (`HOST:6379`, `ray://HOST:10001`). Every node needs edge-vla and LIBERO
installed at the same versions (the actors import them).
"""

from __future__ import annotations

import contextlib
import logging
import os

from edge_vla.errors import EdgeVLAError, MissingDependencyError

LOCAL, AUTO = "local", "auto"
# Records are a few kB: a small object store keeps a local instance from reserving 30% of RAM.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


def _ray():
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError("ray", "--ray (rollouts on a Ray cluster)",
                                     "install the extra: pip install 'edge-vla[ray]'") from e
    return ray


@contextlib.contextmanager
def ray_session(address: str, workers: int | None):
    """Connected to the cluster at `address` inside; a `local` instance started here is shut down after."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
             # actors roll out with one intra-op thread, like the local workers
             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                          **{k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM")
                                             if k in os.environ}}}}
    try:
        if address == LOCAL:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     **quiet)
        else:
            ray.init(address=address, **quiet)
    except ConnectionError:
        if address == AUTO:
            raise EdgeVLAError("--ray auto found no Ray instance running on this machine",
                               "start one with `ray start --head`, or pass --ray local to start one for this run") \
                from None
        raise EdgeVLAError(f"could not reach a Ray cluster at `{address}`",
                           "check the address (HOST:6379 or ray://HOST:10001) and that the cluster is up") from None
    try:
        yield ray
    finally:
        ray.shutdown()  # a local instance stops; from a cluster this driver only disconnects


class RolloutActor:
    """Runs episodes of one run on a Ray worker (wrapped by ray.remote in run_on_ray).

    `steps` carries libero_rollout's own functions (load_policy, make_env, record): the actor runs
    exactly what the local workers run, and this module does not import libero_rollout back."""

    def __init__(self, cfg, variant: str, steps: dict):
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
        from edge_vla.eval.chunking import ChunkExecutor

        self.cfg, self.variant, self.steps = cfg, variant, steps
        self.policy = steps["load_policy"](cfg)
        self.chunks = ChunkExecutor(cfg.execute_k, cfg.temporal_ensemble)
        self.env, self.task = None, None

    def run(self, task: str, trial: int) -> dict:
        if task != self.task:  # one env (one GL context) per actor at a time
            self.close()
            self.env, self.task = self.steps["make_env"](self.cfg, self.policy, task), task
        return self.steps["record"](self.cfg, self.env, self.policy, task, trial, self.chunks, self.variant)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.task = None, None


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # RayTaskError wraps what the actor raised
    if isinstance(cause, EdgeVLAError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"a Ray rollout actor failed: {type(cause).__name__}: {text[-1][:300] if text else ''}"


def run_on_ray(ray, cfg, todo: list[tuple[str, int]], variant: str, emit, steps: dict) -> None:
    """Run the episodes `todo` on Ray actors (inside ray_session); emit(record) in the driver as each
    one finishes. `steps`: see RolloutActor."""
    actors = []
    try:
        n = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = max(1, min(n, len(todo)))
        # Task by task: an actor builds an env only when the queue moves on to the next task.
        queue = sorted(todo, key=lambda e: (e[0], e[1]))
        remote = ray.remote(num_cpus=1, max_restarts=0)(RolloutActor)
        actors = [remote.remote(cfg, variant, steps) for _ in range(n)]
        inflight = {}

        def submit(actor):
            if queue:
                task, trial = queue.pop(0)
                inflight[actor.run.remote(task, trial)] = actor

        for a in actors:
            submit(a)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one line, and the finished episodes are saved
                raise EdgeVLAError(f"{_one_line(e)} (finished episodes are saved; re-run the same command to resume)") \
                    from None
            emit(rec)
            submit(actor)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass


__all__ = ["run_on_ray", "ray_session", "RolloutActor", "LOCAL", "AUTO"]
