"""Actions as tokens: OpenVLA-style percentile normalisation and 256 uniform bins.

Each action dimension is mapped with the dataset's 1st/99th percentiles to [-1, 1] (values
outside are clipped), cut into `n_bins` uniform bins, and each bin is one added vocabulary
token (`<act_0>` ... `<act_255>`, contiguous ids, as MiniVLA's `<extra_i>` tokens). Decoding
returns the bin centre in env units. The gripper (last dim, LIBERO: -1 open / +1 close) is
binarised on decode, as LIBERO expects.

Released OpenVLA-family checkpoints bin differently (`bin_layout="openvla"`): 256 bin EDGES on
[-1, 1] (255 centres), each value's bin number d = digitize(x, edges) in 1..256 written as token
id `end - d`, i.e. the last 256 ids of the vocabulary in reverse; decoding takes centre
clip(d - 1, 0, 254). Their ids are still a contiguous block, so the rest of edge-vla (restricted
head, fused kernel, runtime) sees one more table of bin centres and nothing else. Their
statistics also carry a `mask`: a dimension with mask False is not normalised, which is the
same as giving it the range [-1, 1].

This module is numpy-only on purpose: the ONNX runtime path decodes actions without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError

ACTION_TOKEN_FORMAT = "<act_{}>"
STATS_SCHEMA_VERSION = 1
# Statistics that use a released checkpoint's conventions (mask, OpenVLA bins, a gripper map) are
# written as version 2: an edge-vla that predates those fields refuses them instead of decoding
# with uniform bins. edge-vla's own statistics stay version 1, readable by every version.
RELEASED_CONVENTIONS_SCHEMA_VERSION = 2
BIN_LAYOUTS = ("uniform", "openvla")
# How a released model's gripper output becomes the environment's command (None: as decoded).
# "openvla-libero": OpenVLA's LIBERO evaluation (normalize_gripper_action with binarize, then
# invert_gripper_action): g in [0, 1] (0 = close) -> -sign(2g - 1), LIBERO's -1 open / +1 close.
GRIPPER_MAPS = (None, "openvla-libero")


def action_token_strings(n_bins: int = 256) -> list[str]:
    return [ACTION_TOKEN_FORMAT.format(i) for i in range(n_bins)]


@dataclass
class ActionStats:
    """Per-dimension statistics of a dataset's actions (env units)."""

    q01: list[float]
    q99: list[float]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    gripper_dim: int | None = -1  # index of the binary gripper dim, None if there is none
    count: int = 0
    schema_version: int = STATS_SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    # Released checkpoints' conventions (defaults: edge-vla's own): which dims are normalised
    # (None = all), and how bins map to values ("uniform": 256 centres; "openvla": see above).
    mask: list[bool] | None = None
    bin_layout: str = "uniform"
    gripper_map: str | None = None

    @property
    def dim(self) -> int:
        return len(self.q01)

    @classmethod
    def from_actions(cls, actions: np.ndarray, gripper_dim: int | None = -1) -> "ActionStats":
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise EdgeVLAError(
                f"action statistics need a non-empty (N, D) array, got shape {a.shape}",
                "pass every action of the dataset stacked into one 2-D array",
            )
        if not np.isfinite(a).all():
            raise EdgeVLAError("the actions contain NaN or Inf", "clean the dataset before computing statistics")
        return cls(
            q01=np.quantile(a, 0.01, axis=0).tolist(),
            q99=np.quantile(a, 0.99, axis=0).tolist(),
            mean=a.mean(0).tolist(),
            std=a.std(0).tolist(),
            min=a.min(0).tolist(),
            max=a.max(0).tolist(),
            gripper_dim=gripper_dim,
            count=int(a.shape[0]),
        )

    @property
    def uses_released_conventions(self) -> bool:
        return self.mask is not None or self.bin_layout != "uniform" or self.gripper_map is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema_version"] = (RELEASED_CONVENTIONS_SCHEMA_VERSION if self.uses_released_conventions
                               else STATS_SCHEMA_VERSION)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "action statistics") -> "ActionStats":
        try:
            version = d.get("schema_version", STATS_SCHEMA_VERSION)
            if version not in (STATS_SCHEMA_VERSION, RELEASED_CONVENTIONS_SCHEMA_VERSION):
                raise EdgeVLAError(
                    f"{source} has schema version {version}, this edge-vla reads {STATS_SCHEMA_VERSION} and "
                    f"{RELEASED_CONVENTIONS_SCHEMA_VERSION}", "upgrade edge-vla, or recompute the statistics with this version",
                )
            stats = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (TypeError, KeyError, AttributeError) as e:
            raise EdgeVLAError(f"{source} is malformed ({e})", "recompute it with ActionStats.from_actions") from None
        lengths = {len(stats.q01), len(stats.q99), len(stats.mean), len(stats.std), len(stats.min), len(stats.max)}
        if stats.mask is not None:
            lengths.add(len(stats.mask))
        if stats.gripper_map not in GRIPPER_MAPS:
            raise EdgeVLAError(f"{source} has unknown gripper_map {stats.gripper_map!r}", f"use one of {list(GRIPPER_MAPS)}")
        if stats.gripper_map is not None and stats.gripper_dim is None:
            raise EdgeVLAError(f"{source} maps the gripper but names no gripper_dim", "set gripper_dim (e.g. -1)")
        if stats.bin_layout not in BIN_LAYOUTS:
            raise EdgeVLAError(f"{source} has unknown bin_layout {stats.bin_layout!r}", f"use one of {list(BIN_LAYOUTS)}")
        if len(lengths) != 1:
            raise EdgeVLAError(f"{source} has fields of different lengths", "recompute it from the data")
        return stats

    def save(self, path: str | os.PathLike) -> None:
        from edge_vla.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActionStats":
        p = Path(path)
        if not p.is_file():
            raise EdgeVLAError(f"action statistics not found at {p}", "compute them from the dataset (edge-vla data inspect)")
        from edge_vla.io import read_json

        d = read_json(p, "recompute the statistics")
        return cls.from_dict(d, source=str(p))


class ActionTokenizer:
    """Maps continuous actions (env units) to bins and token ids, and back.

    `first_token_id` is the id of `<act_0>`; bins are contiguous ids after it. Action chunks
    (K future actions per step) are flattened step-major: K * D tokens.
    """

    def __init__(self, stats: ActionStats, first_token_id: int, n_bins: int = 256, binarize_gripper: bool = True):
        if n_bins < 2:
            raise EdgeVLAError(f"n_bins must be >= 2, got {n_bins}")
        self.stats = stats
        self.first_token_id = int(first_token_id)
        self.n_bins = int(n_bins)
        self.binarize_gripper = binarize_gripper
        self.low = np.asarray(stats.q01, dtype=np.float64)
        self.high = np.asarray(stats.q99, dtype=np.float64)
        if stats.mask is not None:
            # An unnormalised dimension behaves exactly like one whose 1-99% range is [-1, 1]: the
            # normalisation is the identity there, and the fused kernel's clip bounds stay right.
            keep = np.asarray(stats.mask, dtype=bool)
            self.low = np.where(keep, self.low, -1.0)
            self.high = np.where(keep, self.high, 1.0)
        self.bin_layout = getattr(stats, "bin_layout", "uniform")
        # A constant dimension (q01 == q99, e.g. a rotation the expert never uses) gets a unit span
        # so normalising does not divide by zero, and every bin decodes to the constant: a spread
        # of bin centres there would let a wrong token command a motion the data never had.
        span = self.high - self.low
        self.constant = span <= 1e-8
        self.span = np.where(self.constant, 1.0, span)
        if self.bin_layout == "openvla":
            # bin b is token first + b = end - d with d = n_bins - b; its value is centre d - 1.
            edges = np.linspace(-1.0, 1.0, self.n_bins)
            centres = (edges[:-1] + edges[1:]) / 2.0
            self.edges = edges
            self.bin_centers = centres[np.clip(self.n_bins - 1 - np.arange(self.n_bins), 0, self.n_bins - 2)]
        else:
            self.bin_centers = (-1.0 + (np.arange(self.n_bins) + 0.5) * (2.0 / self.n_bins)).astype(np.float64)

    @property
    def dim(self) -> int:
        return self.stats.dim

    @property
    def token_ids(self) -> range:
        return range(self.first_token_id, self.first_token_id + self.n_bins)

    def _check(self, actions: np.ndarray) -> np.ndarray:
        a = np.asarray(actions, dtype=np.float64)
        if a.shape[-1] != self.dim:
            raise EdgeVLAError(
                f"action has {a.shape[-1]} dimensions, the action statistics have {self.dim}",
                "pass 7-D (dx, dy, dz, droll, dpitch, dyaw, gripper) actions matching the dataset",
            )
        if not np.isfinite(a).all():
            raise EdgeVLAError("action contains NaN or Inf", "check the data or the controller that produced it")
        return a

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        a = self._check(actions)
        return np.clip(2.0 * (a - self.low) / self.span - 1.0, -1.0, 1.0)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        n = np.asarray(normalized, dtype=np.float64)
        return np.where(self.constant, self.low, (n + 1.0) * 0.5 * self.span + self.low)

    def to_bins(self, actions: np.ndarray) -> np.ndarray:
        n = self.normalize(actions)
        if self.bin_layout == "openvla":
            return (self.n_bins - np.digitize(n, self.edges)).astype(np.int64)
        bins = np.floor((n + 1.0) * 0.5 * self.n_bins).astype(np.int64)
        return np.clip(bins, 0, self.n_bins - 1)

    def from_bins(self, bins: np.ndarray) -> np.ndarray:
        b = np.asarray(bins, dtype=np.int64)
        if b.size and (b.min() < 0 or b.max() >= self.n_bins):
            raise EdgeVLAError(f"action bin out of range [0, {self.n_bins})", "decode only action tokens")
        return self.snap_gripper(self.unnormalize(self.bin_centers[b]))

    def snap_gripper(self, actions: np.ndarray) -> np.ndarray:
        """The gripper dimension of env-unit actions set to its low or high end (in place), where the
        tokenizer binarizes it: a half-open gripper is not a command the data has."""
        if self.binarize_gripper and self.stats.gripper_dim is not None:
            g = self.stats.gripper_dim
            if getattr(self.stats, "gripper_map", None) == "openvla-libero":
                actions[..., g] = -np.sign(2.0 * actions[..., g] - 1.0)
                return actions
            actions[..., g] = np.where(actions[..., g] >= 0.5 * (self.low[g] + self.high[g]), self.high[g], self.low[g])
        return actions

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Actions (..., D) or chunks (K, D) -> flat token ids (K * D,) or (..., D)."""
        return self.to_bins(actions) + self.first_token_id

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (..., D*K) -> actions (..., K, D) when K > 1, else (..., D)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.shape[-1] % self.dim:
            raise EdgeVLAError(
                f"{ids.shape[-1]} action tokens is not a multiple of the action dimension {self.dim}",
                "decode whole actions",
            )
        bins = ids - self.first_token_id
        if bins.size and (bins.min() < 0 or bins.max() >= self.n_bins):
            bad = ids[(bins < 0) | (bins >= self.n_bins)][0]
            raise EdgeVLAError(
                f"token id {int(bad)} is not an action token (ids {self.first_token_id}..{self.first_token_id + self.n_bins - 1})",
                "restrict decoding to action tokens",
            )
        k = ids.shape[-1] // self.dim
        actions = self.from_bins(bins.reshape(*ids.shape[:-1], k, self.dim))
        return actions[..., 0, :] if k == 1 else actions

    @property
    def half_bin_width(self) -> np.ndarray:
        """Largest round-trip error inside the 1-99% range, per dimension, in env units."""
        return self.span / (2 * self.n_bins)

    def centers_env(self) -> np.ndarray:
        """(n_bins, D) table: the env-unit value of each bin centre for each dimension (no gripper snap)."""
        return self.unnormalize(self.bin_centers[:, None])


def entropy_and_margin(logits: np.ndarray) -> tuple[float, float]:
    """Mean entropy (nats) and mean top-1/top-2 probability margin over rows of action logits."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    ent = float(-(p * np.log(np.clip(p, 1e-30, None))).sum(-1).mean())
    top2 = np.sort(p, axis=-1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).mean())
    return ent, margin


__all__ = ["ActionStats", "ActionTokenizer", "action_token_strings", "entropy_and_margin", "ACTION_TOKEN_FORMAT"]
