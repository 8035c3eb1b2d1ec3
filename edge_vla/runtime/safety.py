"""Safety on the serving path: what leaves the server is finite, inside configured limits, and late
replies are flagged.

- clipping: every action dimension is clipped to [low, high] (LIBERO/robosuite OSC deltas and the
  gripper live in [-1, 1]; a real robot sets its own limits);
- NaN/Inf never leaves: the reply carries a *hold* action and an error instead. Hold = no motion
  (zero deltas) with the gripper kept at its last commanded value, because opening the gripper
  would drop a held object;
- a latency watchdog: a call slower than `deadline_ms` is flagged in the reply (the client decides
  whether to use the action) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_vla.errors import EdgeVLAError

log = logging.getLogger("edge_vla.safety")


@dataclass
class SafetyConfig:
    action_dim: int = 7
    low: list[float] = field(default_factory=lambda: [-1.0] * 7)
    high: list[float] = field(default_factory=lambda: [1.0] * 7)
    gripper_dim: int | None = -1  # which dimension is the gripper (kept on hold); None: no gripper
    hold_gripper: float = 0.0  # gripper value of a hold before any action was sent (robosuite: 0 = keep)
    deadline_ms: float | None = None  # latency watchdog; None = off

    @classmethod
    def from_options(cls, action_dim: int = 7, low=None, high=None, deadline_ms=None, **kw) -> "SafetyConfig":
        def vec(v, default):
            if v is None:
                return [default] * action_dim
            a = np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)
            if a.size == 1:
                a = np.repeat(a, action_dim)
            if a.size != action_dim or not np.isfinite(a).all():
                raise EdgeVLAError(f"safety limit {list(a)} must be 1 or {action_dim} finite numbers",
                                   "give e.g. --clip-low -1 or --clip-low -0.5,-0.5,-0.5,-0.3,-0.3,-0.3,-1")
            return [float(x) for x in a]

        cfg = cls(action_dim=action_dim, low=vec(low, -1.0), high=vec(high, 1.0), deadline_ms=deadline_ms, **kw)
        if any(lo > hi for lo, hi in zip(cfg.low, cfg.high)):
            raise EdgeVLAError(f"safety limits have low > high ({cfg.low} vs {cfg.high})", "swap or fix the limits")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SafetyOutcome:
    actions: np.ndarray  # (K, D) float32, always finite and inside the limits
    error: str | None = None  # set when the policy's output was replaced by a hold action
    clipped: int = 0  # number of values clipped
    deadline_missed: bool = False

    def to_dict(self) -> dict:
        return {"clipped": self.clipped, "deadline_missed": self.deadline_missed, "held": self.error is not None}


class SafetyFilter:
    """One per client connection (it remembers the last gripper command for holds)."""

    def __init__(self, config: SafetyConfig | None = None):
        self.config = config or SafetyConfig()
        self.low = np.asarray(self.config.low, np.float32)
        self.high = np.asarray(self.config.high, np.float32)
        self.last_gripper: float | None = None

    def hold_action(self, k: int = 1) -> np.ndarray:
        c = self.config
        a = np.zeros((k, c.action_dim), np.float32)
        if c.gripper_dim is not None:
            g = self.last_gripper if self.last_gripper is not None else c.hold_gripper
            a[:, c.gripper_dim] = np.clip(g, self.low[c.gripper_dim], self.high[c.gripper_dim])
        return a

    def hold(self, reason: str, k: int = 1) -> SafetyOutcome:
        log.warning("holding the robot: %s", reason)
        return SafetyOutcome(actions=self.hold_action(k), error=reason)

    def filter(self, action, latency_ms: float | None = None) -> SafetyOutcome:
        """(D,) or (K, D) policy output -> SafetyOutcome with (K, D) actions safe to send."""
        c = self.config
        try:
            a = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError):
            return self.hold(f"policy returned a non-numeric action ({type(action).__name__})")
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != c.action_dim or a.shape[0] == 0:
            return self.hold(f"policy returned actions of shape {tuple(np.shape(action))}, expected ({c.action_dim},) "
                             f"or (K, {c.action_dim})")
        if not np.isfinite(a).all():
            return self.hold("policy returned NaN/Inf actions; sent a hold action instead", k=a.shape[0])
        safe = np.clip(a, self.low, self.high)
        clipped = int((safe != a).sum())
        if clipped:
            log.info("clipped %d action value(s) to the safety limits", clipped)
        missed = c.deadline_ms is not None and latency_ms is not None and latency_ms > c.deadline_ms
        if missed:
            log.warning("latency watchdog: %.1f ms > deadline %.1f ms", latency_ms, c.deadline_ms)
        if c.gripper_dim is not None:
            self.last_gripper = float(safe[0, c.gripper_dim])  # the one row every client executes
        return SafetyOutcome(actions=safe, clipped=clipped, deadline_missed=bool(missed))
