"""Validation during training: decode as the policy will at test time, and teacher-forced losses.

Metrics (means over the validation samples looked at):
    action_token_acc     greedy action tokens (the recipe's test-time decoding) == target bins
    action_l1            |decoded action - target action| in env units
    action_token_acc_tf  teacher-forced argmax over the action block at the action positions
    loss                 the recipe's training loss (its current stage)
    reasoning_loss       cross-entropy on the reasoning tokens given the prompt (samples with reasoning)
    free_tokens          tokens decoded freely before the action (full-mode recipes)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edge_vla.tokens.sequence import IGNORE


def _pick(ds, n: int) -> list:
    n = min(n, len(ds))
    return [ds[int(i)] for i in np.linspace(0, len(ds) - 1, n).round().astype(int)] if n else []


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


@torch.no_grad()
def evaluate(model, recipe, dataset, max_samples: int = 64, stage: str | None = None, batch_size: int = 16,
             decode: bool = True) -> dict:
    from edge_vla.train.data import Collate, RecipeDataset
    from edge_vla.train.recipes import get_recipe

    was_training = model.training
    model.eval()
    samples = _pick(dataset, max_samples)
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
    if decode and samples:
        prefix = recipe.inference_prefix_ids(tok)
        hits = total = 0
        l1, free_counts = [], []
        for s in samples:
            pv, ids, st = model.model_inputs(s.images, s.instruction, s.state, extra_prompt_ids=prefix)
            free, act = model.generate(pv, ids, st, max_free_tokens=recipe.max_free_tokens)
            pred = act[0].cpu().numpy()
            target = act_tok.encode(np.asarray(s.action)).reshape(-1)
            hits += int((pred == target).sum())
            total += target.size
            l1.append(float(np.abs(act_tok.decode(pred) - np.asarray(s.action)).mean()))
            free_counts.append(free.shape[1])
        metrics.update(action_token_acc=hits / total, action_l1=float(np.mean(l1)),
                       free_tokens=float(np.mean(free_counts)))
    if was_training:
        model.train()
    return metrics


__all__ = ["evaluate"]
