"""The Sample contract (docs/architecture.md): one timestep, as every stage sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_vla.tokens.reasoning import Reasoning

# openpi's LIBERO layout: end-effector position (3), end-effector axis-angle (3), gripper qpos (2).
STATE_DIM = 8
ACTION_DIM = 7


@dataclass
class Sample:
    images: dict[str, np.ndarray]  # camera name -> uint8 HxWx3, canonical upright frame
    instruction: str
    state: np.ndarray  # float32 (STATE_DIM,)
    action: np.ndarray  # float32 (ACTION_DIM,) or (K, ACTION_DIM) chunk, env units; gripper -1 open / +1 close
    reasoning: Reasoning | None = None
    episode: str = ""  # e.g. "libero_90/LIVING_ROOM_SCENE2_.../demo_3"
    step: int = 0
    meta: dict = field(default_factory=dict)
