"""Training data plumbing: open/split datasets, check them against a recipe, turn Samples into
padded batches.

The order of samples is a pure function of (seed, position in the sample stream), and every
random choice (reasoning dropout, image shift) is seeded from the same counters, so a run that
is killed and resumed sees exactly the batches an uninterrupted run sees — on one process or
many (each process takes its own slice of every global batch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_vla.data.dataset import open_dataset, pick_evenly, val_episode_indices
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionStats
from edge_vla.tokens.sequence import IGNORE, parallel_action_inputs, placeholder_id


# --- opening and splitting -----------------------------------------------------------------------
def open_split(data, split: str, val_fraction: float, action_chunk: int, drop_noops: bool, seed: int = 0,
               cameras=("agentview", "wrist")):
    """A path (read with edge_vla.data.dataset.open_dataset, `cameras` from it) or an in-memory
    sequence of Samples."""
    if isinstance(data, (str, Path)):
        if not Path(data).exists():
            raise EdgeVLAError(f"dataset not found: {data}", "pass --data with an existing dataset path")
        if split == "val" and val_fraction <= 0:
            return []
        return open_dataset(str(data), split=split, val_fraction=val_fraction, action_chunk=action_chunk,
                            drop_noops=drop_noops, seed=seed, cameras=tuple(cameras))
    if type(data) in (list, tuple):
        return split_samples(list(data), split, val_fraction, seed)
    # A dataset object (e.g. open_dataset's) keeps its precomputed statistics: it is used whole
    # for training; pass `val_data` for validation.
    return data if split == "train" else []


def split_samples(samples: list, split: str, val_fraction: float, seed: int = 0) -> list:
    """Hold out whole episodes for validation, by the rule datasets on disk use (a single
    episode stays all training)."""
    episodes = sorted({s.episode for s in samples})
    val_eps = {episodes[i] for i in val_episode_indices(len(episodes), val_fraction, seed)}
    return [s for s in samples if (s.episode in val_eps) == (split == "val")]


def dataset_stats(ds) -> ActionStats:
    stats = getattr(ds, "action_stats", None)
    if stats is not None:
        return stats
    acts = np.concatenate([np.asarray(s.action, np.float64).reshape(-1, np.asarray(s.action).shape[-1]) for s in ds])
    return ActionStats.from_actions(acts)


def dataset_texts(ds, limit: int = 512) -> list[str]:
    """Instructions (+ reasoning texts of a spread of samples): what the tiny tokenizer learns from."""
    texts = list(getattr(ds, "instructions", None) or [])
    for s in pick_evenly(ds, limit):
        if not getattr(ds, "instructions", None):
            texts.append(s.instruction)
        if s.reasoning is not None and not s.reasoning.is_empty():
            texts.append(s.reasoning.to_text())
    return texts


def has_reasoning(ds) -> bool:
    flag = getattr(ds, "has_reasoning", None)
    if flag is not None:
        return bool(flag)
    return all(s.reasoning is not None and not s.reasoning.is_empty() for s in ds)


def check_data(ds, stats: ActionStats, recipe, action_chunk: int, what: str = "training data",
               check_range: bool = True) -> None:
    """Every problem the data can have, found before the first step. `check_range`: the statistics
    claim to describe this data (validation data may legitimately reach past the training range)."""
    if len(ds) == 0:
        raise EdgeVLAError(f"the {what} is empty", "check --data (and val_fraction: it may have taken every episode)")
    if recipe.needs_reasoning and not has_reasoning(ds):
        raise EdgeVLAError(f"recipe `{recipe.name}` needs reasoning, but the {what} has samples without it",
                           "annotate the demos with reasoning (ECoT JSON), or pick --recipe vla / thinking-tokens")
    peek = pick_evenly(ds, 256)
    a = np.asarray(peek[0].action)
    k = 1 if a.ndim == 1 else a.shape[0]
    if k != action_chunk:
        raise EdgeVLAError(f"the {what} gives action chunks of {k}, the config asks for action_chunk={action_chunk}",
                           "set action_chunk to match (or re-open the dataset with that chunk)")
    if a.shape[-1] != stats.dim:
        raise EdgeVLAError(f"actions in the {what} have {a.shape[-1]} dims, the action statistics have {stats.dim}",
                           "recompute the statistics from this dataset")
    if not check_range:
        return
    acts = np.concatenate([np.asarray(s.action, np.float64).reshape(-1, stats.dim) for s in peek])
    lo, hi = np.asarray(stats.min), np.asarray(stats.max)
    tol = 0.05 * np.maximum(hi - lo, 1e-6)
    outside = ((acts < lo - tol) | (acts > hi + tol)).any(1).mean()
    if outside > 0.05:
        raise EdgeVLAError(f"the action statistics do not match the {what}: {outside:.0%} of checked actions fall "
                           "outside the statistics' min..max", "recompute the statistics from this dataset")


# --- sample order --------------------------------------------------------------------------------
class MicroBatches:
    """Yields, for micro-batch m = start..end-1, this process's keys (index, epoch, stage, m).

    Global position p = (m * world + rank) * batch + j walks through one permutation of the
    dataset per epoch (seeded by (seed, epoch)), so the order survives a resume and is split
    without overlap between processes.
    """

    def __init__(self, n: int, batch_size: int, start: int, end: int, seed: int, world: int = 1, rank: int = 0,
                 stage_of=lambda m: None):
        self.n, self.batch_size, self.start, self.end = n, batch_size, start, end
        self.seed, self.world, self.rank, self.stage_of = seed, world, rank, stage_of
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self):
        return max(0, self.end - self.start)

    def __iter__(self):
        for m in range(self.start, self.end):
            keys = []
            for j in range(self.batch_size):
                epoch, k = divmod((m * self.world + self.rank) * self.batch_size + j, self.n)
                keys.append((int(self._perm(epoch)[k]), epoch, self.stage_of(m), m))
            yield keys


class RecipeDataset(torch.utils.data.Dataset):
    """Samples -> model rows under a recipe. Indexed by key (index, epoch, stage, micro-batch)."""

    def __init__(self, samples, recipe, processor, action_tokenizer, seed: int = 0):
        self.samples, self.recipe, self.processor, self.action_tokenizer = samples, recipe, processor, action_tokenizer
        self.seed = seed
        self._prompts: dict[str, list[int]] = {}

    def __len__(self):
        return len(self.samples)

    def prompt_ids(self, instruction: str) -> list[int]:
        if instruction not in self._prompts:
            self._prompts[instruction] = self.processor.prompt_ids(instruction)
        return self._prompts[instruction]

    def row(self, sample, rng: np.random.Generator, stage: str | None) -> dict:
        row = self.recipe.encode(sample, self.processor.tokenizer, self.action_tokenizer,
                                 self.prompt_ids(sample.instruction), rng, stage)
        cfg = self.processor.config
        if cfg.parallel_actions:
            row["input_ids"] = parallel_action_inputs(row["input_ids"], cfg.n_action_tokens,
                                                      placeholder_id(self.processor.tokenizer))
        row["pixel_values"] = self.processor.images(sample.images)
        row["state"] = self.processor.state(sample.state)
        return row

    def __getitem__(self, key):
        index, epoch, stage, micro = key if isinstance(key, tuple) else (key, 0, None, 0)
        # One generator per (sample, epoch): the same sample gets a fresh dropout draw each epoch;
        # or one per micro-batch when the recipe draws once for the whole batch.
        per_batch = getattr(self.recipe, "draws_per_batch", False)
        rng = np.random.default_rng([self.seed, epoch, micro, 1] if per_batch else [self.seed, epoch, index])
        row = self.row(self.samples[index], rng, stage)
        row["micro"], row["index"] = micro, index
        return row


class Collate:
    """Right-pads rows into a batch and applies the random image shift (augmentation lives here,
    not in the dataset, so validation and export never see it). Rows from RecipeDataset[key]
    also give the batch `index`, their samples' indices (what a distillation target is keyed by)."""

    def __init__(self, pad_id: int, shift: int = 0, seed: int = 0, rank: int = 0):
        self.pad_id, self.shift, self.seed, self.rank = pad_id, shift, seed, rank

    def __call__(self, rows: list[dict]) -> dict:
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = torch.tensor(r["attention_mask"])
        pv = torch.from_numpy(np.stack([r["pixel_values"] for r in rows]))
        if self.shift:
            micro = rows[0].get("micro", 0)
            pv = random_shift(pv, self.shift, np.random.default_rng([self.seed, 1, micro, self.rank]))
        state = torch.from_numpy(np.stack([r["state"] for r in rows]))
        batch = {"pixel_values": pv, "input_ids": ids, "labels": labels, "attention_mask": mask, "state": state}
        if "index" in rows[0]:
            batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return batch


# --- no padding waste ------------------------------------------------------------------------------
# What one extra forward + backward costs beyond its rows, in padded token-rows (measured on the
# tiny preset on one CPU thread: ~10 ms of fixed per-call work against ~0.25 ms per token-row).
GROUP_FIXED_COST = 64


def length_groups(lengths, fixed_cost: int = GROUP_FIXED_COST) -> list[list[int]]:
    """Partition a micro-batch's rows into groups of similar length, each to be run padded only to
    its own longest row: the split that minimises sum(rows x longest row) + fixed_cost per group
    (a DP over the rows sorted by length). A dropout batch of short and long rows becomes two
    groups; rows of one length stay one group. Groups are lists of row positions, shortest first."""
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 form the last group, padded to the j-1-th's length
            c = best[i] + (j - i) * lengths[order[j - 1]] + fixed_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The rows `rows` of a right-padded batch, cut to their own longest row. Right padding sits
    after every real token and attention is causal, so a row's logits do not depend on how much
    padding follows it: the cut batch computes the same numbers for these rows."""
    idx = torch.tensor(rows, dtype=torch.long)
    t = int(batch["attention_mask"][idx].sum(1).max())
    return {k: (v[idx, :t] if k in ("input_ids", "labels", "attention_mask") else v[idx]) for k, v in batch.items()}


def random_shift(pv: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Shift every image (B, C, 3, S, S) by up to +-`shift` px, padding with edge pixels (DrQ)."""
    b, c, ch, s, _ = pv.shape
    flat = pv.flatten(0, 1)
    padded = F.pad(flat, (shift, shift, shift, shift), mode="replicate")
    offs = rng.integers(0, 2 * shift + 1, size=(flat.shape[0], 2))
    out = torch.stack([padded[i, :, y:y + s, x:x + s] for i, (y, x) in enumerate(offs)])
    return out.view(b, c, ch, s, s)


__all__ = ["open_split", "split_samples", "dataset_stats", "dataset_texts", "has_reasoning", "check_data",
           "MicroBatches", "RecipeDataset", "Collate", "random_shift", "length_groups", "take_rows", "GROUP_FIXED_COST"]
