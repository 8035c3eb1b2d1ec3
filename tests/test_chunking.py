"""From action chunks to per-step actions: receding horizon and ACT's temporal ensembling."""

import numpy as np
import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.eval.chunking import ChunkExecutor


def chunk(start, k=4, grip=1.0):
    """Chunk predicted at step `start`: row j is for step start + j; dim 0 encodes (start, j)."""
    c = np.zeros((k, 7), np.float32)
    c[:, 0] = [10 * start + j for j in range(k)]
    c[:, -1] = grip
    return c


def test_receding_horizon_executes_k_actions_then_asks_again():
    ex = ChunkExecutor(execute_k=2)
    assert ex.needs_query()
    ex.add(chunk(0))
    assert [ex.next()[0] for _ in range(2)] == [0, 1] and ex.needs_query()
    whole = ChunkExecutor()
    whole.add(chunk(0))
    assert [whole.next()[0] for _ in range(4)] == [0, 1, 2, 3] and whole.needs_query()


def test_temporal_ensemble_averages_every_prediction_for_the_step_oldest_weighted_most():
    m = 0.5
    ex = ChunkExecutor(ensemble_m=m)
    acts = []
    for t in range(6):
        assert ex.needs_query()  # every step
        ex.add(chunk(t))
        acts.append(ex.next())
    # step 5 is predicted by the chunks of steps 2..5 (row 5-s of chunk s), oldest first
    preds = np.array([10 * s + (5 - s) for s in (2, 3, 4, 5)], float)
    w = np.exp(-m * np.arange(4))
    assert acts[5][0] == pytest.approx((w * preds).sum() / w.sum(), rel=1e-5)
    assert acts[0][0] == 0  # the first step has one prediction
    assert acts[5][0] < preds.mean()  # the oldest (smallest here) count most


def test_temporal_ensemble_binarizes_the_gripper_and_checks_its_arguments():
    ex = ChunkExecutor(ensemble_m=0.0)
    ex.add(chunk(0, grip=-1.0))
    ex.next()
    ex.add(chunk(1, grip=0.2))  # mean (-1 + 0.2) / 2 < 0: open
    assert ex.next()[-1] == -1.0
    with pytest.raises(EdgeVLAError, match="exclude each other"):
        ChunkExecutor(execute_k=2, ensemble_m=0.01)
    with pytest.raises(EdgeVLAError, match=">= 0"):
        ChunkExecutor(ensemble_m=-1)
    with pytest.raises(EdgeVLAError, match="at least 1"):
        ChunkExecutor(execute_k=0)
    with pytest.raises(EdgeVLAError, match="no chunk"):
        ChunkExecutor(ensemble_m=0.01).next()
