"""Embodied reasoning for free: ECoT fields computed exactly from simulator state.

During generation the annotator takes a `snapshot()` of privileged state at every step (the
expert's phase included) and, once the episode is over, `annotate()` turns the snapshots into
one `Reasoning` per step. Doing it after the episode lets the GRIPPER POSITION tag carry the
gripper's real future pixels and the MOVE primitive describe the motion that really happened.
`replay()` does the same for an existing demo by restoring its stored MuJoCo states one by one
(how users annotate the released LIBERO-90 demos without an LLM); there the phase comes from
the state itself (is the object held? is the goal satisfied?).

Coordinates: (x = column, y = row) pixels of the agentview image in the canonical upright frame
at the stored image size. Boxes are occlusion-aware where the env can render: a segmentation
render (geom id per pixel, same camera and size as the stored images) drops objects with no
visible pixel and tightens each box to the pixels that show the object. Without an offscreen
renderer (an env built with cameras=() and offscreen=False) boxes fall back to the projected
extents of each object's geoms, clipped to the image (an object hidden behind another keeps its
box there). `annotator.box_source` ("segmentation" | "projection") says which one was used; the
generated and replayed ECoT JSON carry it per episode under "meta".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edge_vla.tokens.reasoning import Reasoning

LOOKAHEAD = 5  # gripper pixels in the tag: now and the next 4 steps (ECoT)
MOVE_WINDOW = 3  # steps of future end-effector motion a MOVE primitive describes
MOVE_EPS = 0.004  # metres over the window below which an axis counts as still
FINGER_EPS = 0.002  # metres of finger travel over the window that count as opening/closing
# Robot-frame direction names, as ECoT words them: LIBERO's robot faces +x, +y is its left.
AXIS_WORDS = (("forward", "backward"), ("left", "right"), ("up", "down"))
BOX_SOURCES = ("auto", "segmentation", "projection")


def object_phrase(name: str) -> str:
    """`black_bowl_1` -> `black bowl`, `basket_1_contain_region` -> `basket`, `wooden_cabinet_1_top_side` -> `wooden cabinet`."""
    name = re.sub(r"_(contain|top|bottom|middle|front|back|left|right)?_?region$", "", name)
    name = re.sub(r"_(top|bottom)_side$", "", name)  # wooden_cabinet_1_top_side -> the cabinet itself
    name = re.sub(r"_\d+$", "", name)
    name = re.sub(r"_\d+_", "_", name)
    return name.replace("_", " ").strip()


def move_primitive(delta: np.ndarray, gripper_before: float, gripper_now: float) -> str:
    """ECoT-style movement primitive from the end-effector's displacement and gripper command."""
    if gripper_before <= 0 < gripper_now:
        return "close gripper"
    if gripper_before > 0 >= gripper_now:
        return "open gripper"
    d = np.asarray(delta, dtype=np.float64)
    big = np.abs(d).max()
    if big < MOVE_EPS:
        return "stop"
    words = [AXIS_WORDS[i][0 if d[i] > 0 else 1] for i in range(3)
             if abs(d[i]) >= MOVE_EPS and abs(d[i]) >= 0.4 * big]
    return "move " + " ".join(words)


@dataclass
class Snapshot:
    """What the annotator needs from one step (cheap: no images)."""

    eef: np.ndarray  # (3,) world
    gripper_px: tuple[int, int]
    boxes: list[tuple[str, list[int]]]
    object_pos: dict  # name -> (3,)
    gripper_cmd: float  # the action's gripper command at this step (-1 open / +1 close)
    opening: float  # finger opening (m)
    held: bool
    goal_done: bool
    phase: str | None
    box_source: str = "projection"  # "segmentation" (visible pixels) or "projection" (geom extents)


class ReasoningAnnotator:
    def __init__(self, env, camera: str = "agentview", image_size: int | None = None, lookahead: int = LOOKAHEAD,
                 boxes: str = "auto"):
        from edge_vla.errors import EdgeVLAError
        from edge_vla.sim.expert import parse_goal

        if boxes not in BOX_SOURCES:
            raise EdgeVLAError(f"unknown box source `{boxes}`", f"use one of {', '.join(BOX_SOURCES)}")
        can_segment = bool(getattr(env, "offscreen", False))
        if boxes == "segmentation" and not can_segment:
            raise EdgeVLAError("segmentation boxes need an env with an offscreen renderer",
                               "build LiberoEnv with cameras=(...) or offscreen=True, or use boxes='projection'")
        # Which box path this annotator uses, for the annotation metadata.
        self.box_source = "segmentation" if boxes != "projection" and can_segment else "projection"

        self.env = env
        self.camera_name = camera
        self.image_size = int(image_size or env.image_size)
        self.lookahead = lookahead
        self.instruction = env.instruction
        goal = env.privileged(cameras=False)["goal"]
        try:
            self.relation, self.object, self.target = parse_goal(goal)
        except Exception:  # not a pick-and-place goal: one subtask, the instruction itself
            self.relation, self.object, self.target = None, None, None
        self.plan_steps = self._plan()

    # --- per step -------------------------------------------------------------------------------
    def snapshot(self, action=None, phase: str | None = None) -> Snapshot:
        pv = self.env.privileged(cameras=False)
        cam = self.env.camera(self.camera_name, self.image_size)
        s = self.image_size
        x, y = cam.project(pv["eef_pos"])[0]
        if self.box_source == "segmentation":
            boxes = self.segmentation_boxes(pv)
        else:
            boxes = self.projected_boxes(pv, cam)
        held = False
        if self.object is not None and self.object in pv["objects"]:
            o = pv["objects"][self.object]
            inside = np.all(pv["eef_pos"] >= o["lo"] - 0.01) and np.all(pv["eef_pos"] <= o["hi"] + 0.01)
            held = bool(inside and pv["gripper_opening"] < 0.075 and o["lo"][2] > self._table_z(pv) + 0.005)
        cmd = float(action[-1]) if action is not None else (1.0 if pv["gripper_opening"] < 0.07 else -1.0)
        return Snapshot(
            eef=np.asarray(pv["eef_pos"], dtype=np.float64).copy(),
            gripper_px=(int(round(x)), int(round(y))),
            boxes=boxes,
            object_pos={n: o["pos"].copy() for n, o in pv["objects"].items()},
            gripper_cmd=cmd, opening=float(pv["gripper_opening"]), held=held, goal_done=self.env.success(), phase=phase,
            box_source=self.box_source,
        )

    @property
    def meta(self) -> dict:
        """What an episode's annotation was made with (stored per episode in the ECoT JSON)."""
        return {"bboxes": self.box_source, "camera": self.camera_name, "image_size": self.image_size}

    def projected_boxes(self, pv: dict, cam=None) -> list[tuple[str, list[int]]]:
        """Each in-view object's projected geom extents, clipped to the image (not occlusion-aware)."""
        cam = cam or self.env.camera(self.camera_name, self.image_size)
        s = self.image_size
        boxes = []
        for name, o in pv["objects"].items():
            pts = o["points"]
            if (cam.depth(pts) <= 0).any():
                continue
            px = cam.project(pts)
            lo, hi = px.min(0), px.max(0)
            if hi[0] < 0 or hi[1] < 0 or lo[0] > s - 1 or lo[1] > s - 1:
                continue  # outside the view
            box = [int(np.clip(round(v), 0, s - 1)) for v in (lo[0], lo[1], hi[0], hi[1])]
            boxes.append((object_phrase(name), box))
        return boxes

    def segmentation_boxes(self, pv: dict, geom: np.ndarray | None = None) -> list[tuple[str, list[int]]]:
        """Each object's box over its visible pixels in a segmentation render; objects with none are dropped."""
        s = self.image_size
        if geom is None:
            geom = self.env.segmentation(self.camera_name, s)
        names = list(pv["objects"])
        owner = self.env.geom_owner({n: pv["objects"][n]["body_id"] for n in names})
        labels = owner[geom].ravel()  # object index per pixel, -1 for the robot, the table, the walls
        pix = np.flatnonzero(labels >= 0)
        idx = labels[pix]
        rows, cols = np.divmod(pix, s)
        n = len(names)
        x1, y1 = np.full(n, s), np.full(n, s)
        x2, y2 = np.full(n, -1), np.full(n, -1)
        np.minimum.at(x1, idx, cols)
        np.minimum.at(y1, idx, rows)
        np.maximum.at(x2, idx, cols)
        np.maximum.at(y2, idx, rows)
        return [(object_phrase(names[k]), [int(x1[k]), int(y1[k]), int(x2[k]), int(y2[k])])
                for k in range(n) if x2[k] >= 0]

    def _table_z(self, pv) -> float:
        # The lowest object bottom approximates the table top.
        return float(min(o["lo"][2] for o in pv["objects"].values()))

    # --- per episode ----------------------------------------------------------------------------
    def annotate(self, snaps: list[Snapshot]) -> tuple[list[Reasoning], list[tuple[int, int]], list[str]]:
        """Snapshots of a whole episode -> (Reasoning per step, gripper pixel per step, move per step)."""
        n = len(snaps)
        stages = self._stages(snaps)
        moves, out = [], []
        for t, sn in enumerate(snaps):
            later = snaps[min(t + MOVE_WINDOW, n - 1)]
            # A gripper command change is the primitive of the step that issues it.
            prev_cmd = snaps[t - 1].gripper_cmd if t else -1.0
            move = move_primitive(later.eef - sn.eef, prev_cmd, sn.gripper_cmd)
            # While the fingers are still closing (or opening) in place, that is the primitive.
            fingers = later.opening - sn.opening
            if move.startswith(("stop", "move")) and abs(fingers) > FINGER_EPS and \
                    np.abs(later.eef - sn.eef).max() < 2 * MOVE_EPS:
                move = "close gripper" if fingers < 0 else "open gripper"
            moves.append(move)
            track = [snaps[min(t + k, n - 1)].gripper_px for k in range(self.lookahead)]
            stage = stages[t]
            out.append(Reasoning(
                task=self.instruction,
                plan=self._plan_text(),
                visible_objects=list(sn.boxes),
                subtask_reason=self._subtask_reason(stage),
                subtask=self.plan_steps[stage],
                move_reason=self._move_reason(stage, sn, move),
                move=move,
                gripper=track,
            ))
        return out, [s.gripper_px for s in snaps], moves

    def replay(self, states: np.ndarray, actions: np.ndarray):
        """Annotate a recorded demo by restoring each stored MuJoCo state (no stepping)."""
        snaps = []
        for state, action in zip(states, actions):
            self.env.set_sim_state(state)
            snaps.append(self.snapshot(action))
        return self.annotate(snaps)

    # --- language -------------------------------------------------------------------------------
    def _plan(self) -> list[str]:
        if self.object is None:
            return [self.instruction]
        obj, tgt = object_phrase(self.object), object_phrase(self.target)
        prep = "in" if self.relation == "in" else "on"
        return [f"pick up the {obj}", f"put the {obj} {prep} the {tgt}", f"move the gripper away from the {tgt}"]

    def _plan_text(self) -> str:
        return " ".join(f"{i + 1}. {s}" for i, s in enumerate(self.plan_steps))

    PHASE_STAGE = {"settle": 0, "approach": 0, "descend": 0, "grasp": 0, "lift": 1, "carry": 1, "lower": 1,
                   "release": 1, "retreat": 2, "done": 2}

    def _stages(self, snaps: list[Snapshot]) -> list[int]:
        if self.object is None:
            return [0] * len(snaps)
        stages, stage = [], 0
        for sn in snaps:
            if sn.phase in self.PHASE_STAGE:
                s = self.PHASE_STAGE[sn.phase]
            elif sn.goal_done and not sn.held:
                s = 2
            elif sn.held or (stage >= 1 and sn.gripper_cmd > 0):
                s = 1
            else:
                s = 0
            stage = max(stage, s) if sn.phase is None else s  # replay: stages only advance
            stages.append(stage)
        return stages

    def _subtask_reason(self, stage: int) -> str:
        if self.object is None:
            return f"the task is to {self.instruction}"
        obj, tgt = object_phrase(self.object), object_phrase(self.target)
        return (
            f"the {obj} is not in the gripper yet, so it must be picked up first",
            f"the {obj} is in the gripper, so it can be moved to the {tgt}",
            f"the {obj} is {'in' if self.relation == 'in' else 'on'} the {tgt}, so the gripper can move away",
        )[stage]

    def _move_reason(self, stage: int, sn: Snapshot, move: str) -> str:
        if move == "close gripper":
            return f"the gripper is around the {object_phrase(self.object or 'object')}, so close it to grasp"
        if move == "open gripper":
            return f"the {object_phrase(self.object or 'object')} is above the {object_phrase(self.target or 'goal')}, so open the gripper to release it"
        if self.object is None or stage == 2:
            return f"{move} to finish the task" if move != "stop" else "the task is done, so stop"
        if stage == 1 and move.startswith("move") and "up" in move.split():
            return (f"the {object_phrase(self.object)} is grasped, so lift it clear before carrying it to the "
                    f"{object_phrase(self.target)}")
        goal_name = self.object if stage == 0 else self.target
        if goal_name not in sn.object_pos:  # a region site: use the object that owns it (basket_1_contain_region)
            goal_name = next((n for n in sn.object_pos if goal_name.startswith(n)), goal_name)
        goal = sn.object_pos.get(goal_name)
        if goal is None:
            return f"{move} toward the goal"
        d = goal - sn.eef
        parts = [f"{abs(d[i]) * 100:.0f} cm {AXIS_WORDS[i][0 if d[i] > 0 else 1]}" for i in range(3) if abs(d[i]) > 0.01]
        if not parts:
            return f"the {object_phrase(goal_name)} is right at the gripper, so {move}"
        return f"the {object_phrase(goal_name)} is {', '.join(parts)} of the gripper, so {move}"


__all__ = ["ReasoningAnnotator", "Snapshot", "move_primitive", "object_phrase", "LOOKAHEAD", "AXIS_WORDS"]
