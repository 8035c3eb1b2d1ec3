"""Observations for a Policy (`{"images", "state", "instruction"}`) from data, or synthetic ones.

Export (parity, accuracy) and the bench decode the same held-out observations through these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError


def sample_to_obs(sample) -> dict:
    """A Sample as the Policy sees it at test time: images, proprio state, instruction."""
    return {"images": sample.images, "state": sample.state, "instruction": sample.instruction}


def synthetic_observations(config, n: int = 4, seed: int = 0) -> list[dict]:
    """Deterministic observations when no data is given (images of noise; enough for parity)."""
    rng = np.random.default_rng(seed)
    s = config.image_size
    return [{"images": {c: rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for c in config.cameras},
             "state": rng.normal(size=config.proprio_dim).astype(np.float32),
             "instruction": "pick up the object and put it in the basket"} for _ in range(n)]


def load_observations(data, config, limit: int | None = None) -> list[dict]:
    """Observations from a list of Samples/obs dicts, or from a dataset path: its held-out
    (validation) episodes, spread evenly over them."""
    from edge_vla.data.dataset import open_dataset, pick_evenly

    if data is None:
        return []
    if isinstance(data, (str, Path)):
        ds = open_dataset(data, split="val", cameras=tuple(config.cameras), action_chunk=config.action_chunk)
        if len(ds) == 0:
            raise EdgeVLAError(f"dataset {data} has no held-out (validation) samples", "pass a dataset with several episodes")
        data = pick_evenly(ds, min(len(ds), limit or len(ds)))
    obs = [d if isinstance(d, dict) else sample_to_obs(d) for d in data]
    return obs[:limit] if limit else obs
