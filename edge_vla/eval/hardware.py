"""Hardware rollouts: the robot-side loop. It talks to a policy server (`ws://host:port`, see
edge_vla.runtime.server) or runs the policy in-process (a checkpoint/bundle path, e.g. on the
Jetson itself), records every episode to hdf5 in LIBERO's layout (edge_vla.data.libero_hdf5:
images, states, actions; reasoning and timings as attributes), asks the operator whether the
episode succeeded (or takes it from a flag, or from the simulator) and writes the same results
file as LIBERO rollouts (kind "hardware").

A robot is any object with:
    instruction: str                  the task to send with every observation
    reset() -> obs                    start an episode; obs = {"images": {cam: uint8 HxWx3 upright},
                                      "state": (8,) float32, "instruction": str}
    step(action (7,)) -> obs          execute one action
    hold() -> None                    stop moving now (keep the gripper as it is)
    close() -> None
and optionally `done() -> bool` (the episode ended by itself) and `success() -> bool` (the robot
can judge, as the simulator can). `SimulatedRobot` puts LIBERO behind this interface and is
what the tests drive; a real robot is one small class passed as `--robot module:Class`.

If the server is lost mid-episode the robot is held, the episode is recorded in the results
file as aborted (success unknown, with the error) and no half episode is written to hdf5.
"""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.eval.chunking import ChunkExecutor, query_chunk
from edge_vla.sim.env import preload_triton
from edge_vla.eval.results import load_results, summarize, write_results

preload_triton()  # before any simulator: see its docstring

SUCCESS_MODES = ("ask", "yes", "no", "auto")


class SimulatedRobot:
    """A LIBERO task behind the robot interface (benchmark init states in turn)."""

    def __init__(self, suite: str, task: str, image_size: int = 64, cameras=("agentview", "wrist"),
                 first_init_state: int = 0, max_steps: int | None = None):
        from edge_vla.sim.env import LiberoEnv

        self.env = LiberoEnv(suite, task, image_size=image_size, cameras=cameras, max_steps=max_steps)
        self.instruction = self.env.instruction
        self.task = self.env.task_name
        self._next_init = first_init_state
        self._ended = False
        self.holds = 0

    def reset(self) -> dict:
        obs, _ = self.env.reset(options={"init_state": self._next_init})
        self._next_init += 1
        self._ended = False
        return obs

    def step(self, action) -> dict:
        obs, _, success, truncated, _ = self.env.step(action)
        self._ended = bool(success or truncated)
        return obs

    def hold(self) -> None:
        self.holds += 1  # the simulator simply is not stepped any more

    def done(self) -> bool:
        return self._ended

    def success(self) -> bool:
        return self.env.success()

    def sim_state(self) -> np.ndarray:
        return self.env.sim_state()

    def close(self) -> None:
        self.env.close()


def make_robot(spec: str, image_size: int = 64, cameras=("agentview", "wrist"), max_steps: int | None = None):
    """`libero:SUITE/TASK[@FIRST_INIT]` -> SimulatedRobot; `module:Class` -> your robot class."""
    if spec.startswith("libero:"):
        m = re.fullmatch(r"libero:([^/]+)/([^@]+)(?:@(\d+))?", spec)
        if not m:
            raise EdgeVLAError(f"--robot {spec!r} is not libero:SUITE/TASK[@INIT]",
                               "e.g. --robot libero:libero_90/LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket")
        return SimulatedRobot(m.group(1), m.group(2), image_size, cameras, int(m.group(3) or 0), max_steps)
    if ":" not in spec:
        raise EdgeVLAError(f"--robot {spec!r} is neither libero:SUITE/TASK nor module:Class",
                           "pass your robot class as my_package.my_robot:MyRobot")
    module, attr = spec.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EdgeVLAError(f"cannot import robot class {spec} ({e})", "check the module path and class name") from None
    robot = cls()
    missing = [m for m in ("reset", "step", "hold", "close") if not callable(getattr(robot, m, None))]
    if missing or not isinstance(getattr(robot, "instruction", None), str):
        raise EdgeVLAError(f"robot class {spec} lacks {missing or ['instruction']}",
                           "a robot needs instruction, reset(), step(action), hold(), close()")
    return robot


def connect_policy(policy: str, api_key: str | None = None, backend: str = "auto", mode: str | None = None,
                   timeout_s: float = 30.0):
    """`ws://host:port` (or `host:port`) -> RemotePolicy on the server; a directory -> in-process Policy."""
    if policy.startswith(("ws://", "wss://")) or (re.fullmatch(r"[\w.\-]+:\d+", policy) and not Path(policy).exists()):
        from edge_vla.runtime.client import RemotePolicy

        return RemotePolicy(policy, api_key=api_key, timeout_s=timeout_s)
    from edge_vla.runtime.policy import load_policy

    return load_policy(policy, backend=backend, mode=mode)


@dataclass
class HardwareConfig:
    policy: str  # ws://host:port or a checkpoint/bundle directory
    robot: str  # libero:SUITE/TASK or module:Class
    episodes: int = 1
    max_steps: int = 400
    execute_k: int | None = None
    temporal_ensemble: float | None = None  # ACT's weight m (edge_vla.eval.chunking)
    success: str = "ask"  # ask the operator | yes | no | auto (the robot judges: simulation)
    out: str = "runs"
    record_dir: str | None = None  # hdf5 per episode; None: <out>/episodes
    name: str | None = None
    api_key: str | None = None
    backend: str = "auto"
    mode: str | None = None
    timeout_s: float = 30.0
    control_hz: float | None = None  # pace the loop (a real robot's control rate); None: as fast as it goes


def run_episode(robot, policy, max_steps: int, chunks: ChunkExecutor | None = None, period_s: float | None = None) -> dict:
    """One episode (`chunks`: how action chunks are executed, default whole); returns the record plus
    the recorded arrays under "_recording" (None if aborted)."""
    from edge_vla.runtime.client import ServerLost

    obs = robot.reset()
    policy.reset()
    chunks = chunks or ChunkExecutor()
    chunks.reset()
    rec = {"images": {}, "proprio": [], "actions": [], "states": []}
    latency, tokens, reasoning_log, holds = [], 0, [], 0
    error, steps, t_next = None, 0, 0.0
    try:
        while steps < max_steps:
            if chunks.needs_query():
                res, a, ms = query_chunk(policy, obs, "the robot")
                latency.append(ms)
                if res.info.get("error"):  # the server sent a hold action (NaN, timeout...): execute only that
                    holds += 1
                    chunks.reset()
                    a = a[:1]
                chunks.add(a)
                tok = res.tokens or {}
                tokens += int(tok.get("reasoning", 0)) + int(tok.get("action", 0))
                if res.reasoning_text:
                    reasoning_log.append({"step": steps, "text": res.reasoning_text})
            action = chunks.next()
            for cam, img in obs["images"].items():
                rec["images"].setdefault(cam, []).append(np.asarray(img, np.uint8))
            rec["proprio"].append(np.asarray(obs.get("state", np.zeros(8)), np.float32))
            if hasattr(robot, "sim_state"):
                rec["states"].append(robot.sim_state())
            rec["actions"].append(action)
            obs = robot.step(action)
            steps += 1
            if period_s:  # keep the robot's control rate: wait out the rest of this step's period
                t_next = (t_next if steps > 1 else time.perf_counter()) + period_s
                time.sleep(max(0.0, t_next - time.perf_counter()))
            if getattr(robot, "done", lambda: False)():
                break
    except (ServerLost, EdgeVLAError) as e:
        robot.hold()  # first: the robot stops, whatever else happens
        error = str(e)
    recording = None
    if error is None and steps:
        recording = {"actions": np.stack(rec["actions"]), "proprio": np.stack(rec["proprio"]),
                     "images": {c: np.stack(v) for c, v in rec["images"].items()},
                     "states": np.stack(rec["states"]) if rec["states"] else None}
    return {"steps": steps, "actions_executed": steps, "latency_ms": latency, "tokens_generated": tokens,
            "reasoning_samples": reasoning_log[:3], "reasoning": reasoning_log, "server_holds": holds,
            "error": error, "_recording": recording}


def judge(robot, mode: str, ask=None) -> bool:
    if mode == "yes":
        return True
    if mode == "no":
        return False
    if mode == "auto":
        if not callable(getattr(robot, "success", None)):
            raise EdgeVLAError("--success auto needs a robot that can judge success (the simulator)",
                               "use --success ask (the operator answers) or yes/no")
        return bool(robot.success())
    if ask is None:
        import click

        ask = lambda: click.confirm("Did the robot succeed?", default=False)  # noqa: E731
    return bool(ask())


def run_hardware(cfg: HardwareConfig, robot=None, policy=None, ask=None) -> dict:
    """Run `cfg.episodes` episodes; returns {"path", "summary", "episodes": [hdf5 paths]}."""
    if cfg.success not in SUCCESS_MODES:
        raise EdgeVLAError(f"--success {cfg.success!r} is not one of {', '.join(SUCCESS_MODES)}")
    chunks = ChunkExecutor(cfg.execute_k, cfg.temporal_ensemble)  # checks both before the robot moves
    if cfg.episodes < 1 or cfg.max_steps < 1:
        raise EdgeVLAError("--episodes and --max-steps must be at least 1")
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    policy = policy or connect_policy(cfg.policy, cfg.api_key, cfg.backend, cfg.mode, cfg.timeout_s)
    own_robot = robot is None
    if own_robot:
        pconf = getattr(getattr(policy, "processor", None), "config", None)
        robot = make_robot(cfg.robot, image_size=pconf.image_size if pconf else 64,
                           cameras=tuple(pconf.cameras) if pconf else tuple(getattr(policy, "cameras", ("agentview", "wrist"))),
                           max_steps=cfg.max_steps)
    meta = getattr(policy, "metadata", None) or {}
    remote = bool(meta.get("server"))
    # A server announces what it serves (`edge-vla serve` puts the bundle path in its metadata).
    source = meta.get("policy") if remote else cfg.policy
    name = cfg.name or (f"{Path(source).name}-{meta.get('mode')}-server" if remote and source else
                        "remote" if remote else Path(cfg.policy).name)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    out = Path(cfg.out) / f"{slug}.hardware.json"
    record_dir = Path(cfg.record_dir or Path(cfg.out) / "episodes" / slug)
    variant = {"name": name, "mode": getattr(policy, "mode", None) or meta.get("mode"),
               "recipe": (getattr(policy, "recipe", None) or {}).get("name") if hasattr(policy, "recipe") else meta.get("recipe"),
               "backend": getattr(getattr(policy, "backend", None), "name", None) or (
                   f"server:{meta.get('backend')}" if remote else None),
               "target": "robot"}
    config = {**asdict(cfg), "api_key": bool(cfg.api_key), "variant": variant, "instruction": robot.instruction}
    records = list(load_results(out)["records"]) if out.exists() else []
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    written, lost = [], None
    try:
        for _ in range(cfg.episodes):
            index = len(records)
            t0 = time.perf_counter()
            ep = run_episode(robot, policy, cfg.max_steps, chunks, 1.0 / cfg.control_hz if cfg.control_hz else None)
            recording = ep.pop("_recording")
            reasoning = ep.pop("reasoning")
            rec = {"id": f"hardware/{slug}/{index}", "suite": "hardware", "task": getattr(robot, "task", robot.instruction),
                   "trial": index, "instruction": robot.instruction, "wall_s": round(time.perf_counter() - t0, 3), **ep}
            if ep["error"] is not None:
                rec["success"] = None  # aborted: unknown, not a failure of the policy
                records.append(rec)
                lost = ep["error"]
                break
            rec["success"] = judge(robot, cfg.success, ask)
            path = record_dir / f"episode_{index:04d}.hdf5"
            write_libero_hdf5(path, [{"actions": recording["actions"], "images": recording["images"],
                                      "proprio": recording["proprio"], "states": recording["states"]}],
                              robot.instruction,
                              attrs={"success": int(rec["success"]), "policy": cfg.policy, "reasoning": reasoning,
                                     "latency_ms": ep["latency_ms"], "source": "edge-vla eval hardware"})
            rec["recording"] = str(path)
            written.append(str(path))
            records.append(rec)
            write_results(out, "hardware", config, records, created=created)
    finally:
        if records:
            write_results(out, "hardware", config, records, created=created)
        if own_robot:
            robot.close()
    if lost is not None:
        raise EdgeVLAError(f"episode {len(records) - 1} aborted, the robot was held: {lost}",
                           f"finished episodes are in {out}; restart the server and run again to continue")
    return {"path": str(out), "summary": summarize("hardware", records), "episodes": written}
