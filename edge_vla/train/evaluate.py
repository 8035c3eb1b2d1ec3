"""Validation during training: decode as the deployed policy does, and teacher-forced losses.

The decoded metrics come from `runtime.Policy` over a `TorchBackend` that wraps the model being
trained (weights shared, nothing exported), in the recipe's own decode mode: the numbers are
what the deployed policy does, prefixes forced and reasoning budget included.

Metrics (means over the validation samples looked at):
    action_token_acc     the Policy's action tokens == target bins
    action_l1            |the Policy's action - target action| in env units
    free_tokens          tokens the Policy decoded before the action (full mode: the reasoning,
                         its forced prefix included; 0 in direct mode)
    action_token_acc_tf  teacher-forced argmax over the action block at the action positions
    loss                 the recipe's training loss (its current stage)
    reasoning_loss       cross-entropy on the reasoning tokens given the prompt (samples with reasoning)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_vla.data.dataset import pick_evenly
from edge_vla.tokens.sequence import IGNORE


def policy_for(model, recipe, mode: str | None = None):
    """The deployed decoder over `model` itself (no copy): the recipe's settings, as its
    recipe.json would give them, in its own decode mode unless `mode` says otherwise.
    Puts `model` in eval mode."""
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    return Policy(TorchBackend(model, recipe=recipe.info(model.processor.tokenizer)), mode=mode)


def decoded_metrics(policy, samples) -> dict:
    """What `policy` decodes on `samples`, against their target actions."""
    from edge_vla.data.observations import sample_to_obs

    act_tok = policy.action_tokenizer
    hits = total = 0
    l1, free = [], []
    for s in samples:
        r = policy.act(sample_to_obs(s))
        target = act_tok.encode(np.asarray(s.action)).reshape(-1)
        hits += int((np.asarray(r.info["action_token_ids"]) == target).sum())
        total += target.size
        l1.append(float(np.abs(r.action - np.asarray(s.action)).mean()))
        free.append(r.tokens["reasoning"])
    return {"action_token_acc": hits / total, "action_l1": float(np.mean(l1)), "free_tokens": float(np.mean(free))}


def _teacher_forced(model, rows, collate, first, n_bins):
    batch = collate(rows)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model(**batch)
    labels = batch["labels"][:, 1:]
    logits = out.logits[:, :-1]
    is_act = (labels >= first) & (labels < first + n_bins)
    pred = logits[..., first:first + n_bins].argmax(-1) + first
    hits = (pred == labels)[is_act]
    n_tok = int((labels != IGNORE).sum())
    loss_sum = float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                     reduction="sum")) if n_tok else 0.0
    return loss_sum, n_tok, int(hits.sum()), int(is_act.sum())


def teacher_forced_metrics(model, recipe, samples, stage: str | None = None, batch_size: int = 16) -> dict:
    from edge_vla.train.data import Collate, RecipeDataset
    from edge_vla.train.recipes import get_recipe

    tok = model.processor.tokenizer
    act_tok = model.action_tokenizer
    first, n_bins = tok.first_action_id, tok.n_bins
    collate = Collate(tok.pad_id, shift=0)
    rows = RecipeDataset(samples, recipe, model.processor, act_tok)
    # Reasoning-only labels: exactly stage 1 of reasoning pre-training without the action loss.
    reasoning_rows = RecipeDataset([s for s in samples if s.reasoning is not None and not s.reasoning.is_empty()],
                                   get_recipe("ecot-lite-pretrain", stage1_action_loss=False), model.processor, act_tok)
    loss_sum = n_tok = hits_tf = n_act_tf = 0
    for i in range(0, len(samples), batch_size):
        chunk = [rows.row(s, np.random.default_rng([7, i + j]), stage) for j, s in enumerate(samples[i:i + batch_size])]
        ls, nt, h, na = _teacher_forced(model, chunk, collate, first, n_bins)
        loss_sum, n_tok, hits_tf, n_act_tf = loss_sum + ls, n_tok + nt, hits_tf + h, n_act_tf + na
    r_sum = r_tok = 0
    for i in range(0, len(reasoning_rows), batch_size):
        chunk = [reasoning_rows.row(s, np.random.default_rng(0), "reasoning")
                 for s in reasoning_rows.samples[i:i + batch_size]]
        ls, nt, _, _ = _teacher_forced(model, chunk, collate, first, n_bins)
        r_sum, r_tok = r_sum + ls, r_tok + nt
    metrics = {"loss": loss_sum / max(n_tok, 1), "action_token_acc_tf": hits_tf / max(n_act_tf, 1), "n": len(samples)}
    if r_tok:
        metrics["reasoning_loss"] = r_sum / r_tok
    return metrics


@torch.no_grad()
def evaluate(model, recipe, dataset, max_samples: int = 64, stage: str | None = None, batch_size: int = 16,
             decode: bool = True, mode: str | None = None) -> dict:
    """Validation metrics of `model` on `max_samples` samples spread evenly over `dataset`.
    `mode`: decode in this Policy mode instead of the recipe's own. Leaves `model` in the mode
    (train / eval) it was in."""
    was_training = model.training
    model.eval()
    samples = pick_evenly(dataset, max_samples)
    metrics = teacher_forced_metrics(model, recipe, samples, stage, batch_size)
    if decode and samples:
        metrics.update(decoded_metrics(policy_for(model, recipe, mode), samples))
    if was_training:
        model.train()
    return metrics


__all__ = ["evaluate", "policy_for", "decoded_metrics", "teacher_forced_metrics"]
