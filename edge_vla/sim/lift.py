"""Which object the robot lifted in an episode, from simulator state, and why a failure failed.

    tracker = LiftTracker(env)            # after env.reset(): heights at rest are the reference
    tracker.update()                      # after every env.step()
    lift = tracker.result()               # {"target", "destination", "lifted", "lifted_objects", "max_rise_m"}
    outcome(success, lift)                # "success" | "wrong_object" | "grasp_failure" | "placement_failure"

The rule: an object counts as lifted once its body has risen at least `LIFT_THRESHOLD_M` (5 cm)
above its height at rest (after the settle steps) *while it touches the gripper* (a MuJoCo contact
between one of its geoms and a geom of the gripper's bodies). `lifted` is the first object to
satisfy it; `lifted_objects` every one in the order they first did. Touching matters: a knocked
carton that bounces, or an object dropped into the basket, moves without being held; the height
matters: fingers brushing an object are not a grasp. In LIVING_ROOM_SCENE2 every grocery rests
on the floor and the basket's floor is ~1-2 cm above it, so nothing gets 5 cm up except in the
hand (the expert carries at >= 12 cm).

Failures are classified by what was lifted (a success is a success whatever it touched):
- `wrong_object`: another object was lifted and the target never was (grounding: the policy went
  for the wrong thing; what reasoning is meant to fix);
- `placement_failure`: the target was lifted, the task was not done (dropped, missed the basket);
- `grasp_failure`: nothing was lifted, or only the destination (the basket of "put it in the
  basket": the instruction names it, so lifting it is a failed grasp near it, not a confusion
  between the objects the instruction chooses from).
`lifted_objects` keeps every object lifted, the destination included, so nothing is hidden.
"""

from __future__ import annotations

import numpy as np

LIFT_THRESHOLD_M = 0.05
OUTCOMES = ("success", "wrong_object", "placement_failure", "grasp_failure")


def _in_on_goal(privileged: dict) -> tuple[str, str] | None:
    """(object, where) of a task's single In/On goal, else None."""
    goal = privileged.get("goal") or []
    if len(goal) == 1 and len(goal[0]) == 3 and str(goal[0][0]).lower() in ("in", "on"):
        return str(goal[0][1]), str(goal[0][2])
    return None


def target_object(privileged: dict) -> str | None:
    """The object a task moves: the first argument of its single In/On goal, else the task's
    objects of interest that are objects (not fixtures or regions), if exactly one."""
    goal, objects = _in_on_goal(privileged), privileged.get("objects", {})
    if goal and goal[0] in objects:
        return goal[0]
    of_interest = [o for o in privileged.get("obj_of_interest", []) if o in objects]
    return of_interest[0] if len(of_interest) == 1 else None


def destination_object(privileged: dict) -> str | None:
    """The object a single In/On goal puts the target in or on: the goal's third argument, or the
    object owning that region (LIBERO names regions `<object>_<region>`, e.g.
    basket_1_contain_region); None when there is none."""
    goal, objects = _in_on_goal(privileged), privileged.get("objects", {})
    if goal is None:
        return None
    where = goal[1]
    if where in objects:
        return where
    owners = [o for o in objects if where.startswith(f"{o}_")]
    return max(owners, key=len) if owners else None


class LiftTracker:
    """Per-episode lift bookkeeping over one LiberoEnv; build it after reset()."""

    def __init__(self, env, threshold_m: float = LIFT_THRESHOLD_M):
        self.env, self.threshold = env, float(threshold_m)
        pv = env.privileged(cameras=False)
        self.target = target_object(pv)
        self.destination = destination_object(pv)
        rs = env.robosuite_env
        self._bodies = {n: int(rs.obj_body_id[n]) for n in rs.objects_dict}
        self._rest = {n: float(env.sim.data.body_xpos[b][2]) for n, b in self._bodies.items()}
        self._max_rise = dict.fromkeys(self._bodies, 0.0)
        self._lifted: list[str] = []
        m = env.sim.model
        prefixes = tuple(getattr(r.gripper, "naming_prefix", "gripper0_") for r in rs.robots
                         if getattr(r, "gripper", None) is not None) or ("gripper0_",)
        gripper_bodies = [b for b in range(int(m.nbody)) if (m.body_id2name(b) or "").startswith(prefixes)]
        self._gripper_geoms = set(np.flatnonzero(np.isin(m.geom_bodyid, gripper_bodies)).tolist())
        self._object_geoms = {n: set(env._geom_corners(b)[0].tolist()) for n, b in self._bodies.items()}

    def _touching(self) -> set[str]:
        """Objects with a geom in contact with the gripper right now."""
        d = self.env.sim.data
        touched: set[int] = set()
        for i in range(int(d.ncon)):
            c = d.contact[i]
            g1, g2 = int(c.geom1), int(c.geom2)
            if g1 in self._gripper_geoms:
                touched.add(g2)
            elif g2 in self._gripper_geoms:
                touched.add(g1)
        if not touched:
            return set()
        return {n for n, geoms in self._object_geoms.items() if geoms & touched}

    def update(self) -> None:
        z = self.env.sim.data.body_xpos
        risen = []
        for n, b in self._bodies.items():
            rise = float(z[b][2]) - self._rest[n]
            if rise > self._max_rise[n]:
                self._max_rise[n] = rise
            if rise >= self.threshold and n not in self._lifted:
                risen.append(n)
        if risen:  # contacts only when something is high enough to count
            held = self._touching()
            self._lifted += [n for n in risen if n in held]

    def result(self) -> dict:
        lifted = self._lifted[0] if self._lifted else None
        return {"target": self.target, "destination": self.destination, "lifted": lifted,
                "lifted_objects": list(self._lifted),
                "max_rise_m": {n: round(r, 4) for n, r in self._max_rise.items()}}


def outcome(success: bool, lift: dict) -> str | None:
    """success / wrong_object / placement_failure / grasp_failure (None: the task has no single target)."""
    if success:
        return "success"
    target, lifted = lift.get("target"), lift.get("lifted_objects") or []
    if target is None:
        return None
    if target in lifted:
        return "placement_failure"
    others = [o for o in lifted if o != lift.get("destination")]
    return "wrong_object" if others else "grasp_failure"


__all__ = ["LiftTracker", "outcome", "target_object", "destination_object", "LIFT_THRESHOLD_M", "OUTCOMES"]
