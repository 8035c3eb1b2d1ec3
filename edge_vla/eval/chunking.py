"""From action chunks to one action per control step (LIBERO and hardware rollouts share it).

Receding horizon (the default): execute the first `execute_k` actions of a chunk (the whole chunk
when None), then ask the policy again.

Temporal ensembling (ACT, Zhao et al. 2023; `ensemble_m` set): ask the policy at every step and
execute, for step t, the weighted mean of every stored chunk's prediction for t, with weights
exp(-m * i) where i = 0 is the oldest prediction (m = 0.01 in ACT: old and new count almost alike;
larger m trusts the oldest more). The gripper dimension takes the sign of its weighted mean: the
grippers here are commanded open (-1) or closed (+1), and a mean of the two is neither.
"""

from __future__ import annotations

import time

import numpy as np

from edge_vla.data.sample import ACTION_DIM
from edge_vla.errors import EdgeVLAError


def query_chunk(policy, obs, consumer: str, fix: str | None = None):
    """One policy call: (its ActionResult, the action chunk (K, ACTION_DIM) float32, latency in ms).

    `consumer` names what takes the actions (LIBERO, the robot) in the error for a wrong shape."""
    t0 = time.perf_counter()
    res = policy.act(obs)
    latency_ms = round((time.perf_counter() - t0) * 1e3, 3)
    a = np.asarray(res.action, dtype=np.float32)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[1] != ACTION_DIM:
        raise EdgeVLAError(f"policy returned actions of shape {np.shape(res.action)}, {consumer} takes "
                           f"({ACTION_DIM},) or (K, {ACTION_DIM})", fix)
    return res, a, latency_ms


class ChunkExecutor:
    def __init__(self, execute_k: int | None = None, ensemble_m: float | None = None, gripper_dim: int | None = -1):
        if execute_k is not None and execute_k < 1:
            raise EdgeVLAError(f"--execute-k {execute_k} must be at least 1")
        if ensemble_m is not None and (not np.isfinite(ensemble_m) or ensemble_m < 0):
            raise EdgeVLAError(f"--temporal-ensemble {ensemble_m} must be a finite weight >= 0 (ACT uses 0.01)")
        if execute_k is not None and ensemble_m is not None:
            raise EdgeVLAError("--execute-k and --temporal-ensemble exclude each other",
                               "temporal ensembling queries the policy at every step; pick one")
        self.execute_k, self.ensemble_m, self.gripper_dim = execute_k, ensemble_m, gripper_dim
        self.reset()

    def reset(self) -> None:
        self._pending: list[np.ndarray] = []
        self._chunks: list[tuple[np.ndarray, int]] = []  # (chunk, index of the current step in it), oldest first

    def needs_query(self) -> bool:
        return self.ensemble_m is not None or not self._pending

    def add(self, chunk: np.ndarray) -> None:
        """A (K, D) chunk predicted from the current observation; its row 0 is for the current step."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if self.ensemble_m is None:
            self._pending = list(chunk[: self.execute_k or len(chunk)])
        else:
            self._chunks.append((chunk, 0))

    def next(self) -> np.ndarray:
        """The action of the current step (then the executor moves on one step)."""
        if self.ensemble_m is None:
            if not self._pending:
                raise EdgeVLAError("no action left to execute", "query the policy when needs_query() says so")
            return self._pending.pop(0)
        if not self._chunks:
            raise EdgeVLAError("no chunk predicts this step", "add the policy's chunk before asking for the action")
        preds = np.stack([c[i] for c, i in self._chunks])
        w = np.exp(-self.ensemble_m * np.arange(len(preds)))
        action = (w[:, None] * preds).sum(0) / w.sum()
        if self.gripper_dim is not None:
            action[self.gripper_dim] = 1.0 if action[self.gripper_dim] >= 0 else -1.0
        self._chunks = [(c, i + 1) for c, i in self._chunks if i + 1 < len(c)]
        return action.astype(np.float32)


__all__ = ["ChunkExecutor", "query_chunk"]
