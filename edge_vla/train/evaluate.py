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

When the policy writes reasoning (full mode, or adaptive when it reasons) on samples annotated with
it, how close its own reasoning is to the annotation, field by field, and whether its action errors
follow its reasoning errors (the mechanism behind a free-running accuracy below the teacher-forced one):
    reasoning_n                     samples where both exist
    reasoning_subtask_acc           SUBTASK written == annotated
    reasoning_move_acc              MOVE written == annotated
    reasoning_gripper_px            mean |written - annotated| of the gripper points (pixels), over
                                    the points both have
    reasoning_objects_f1            F1 of the VISIBLE OBJECTS names written vs annotated
    action_token_acc_move_right     action token accuracy on the samples whose MOVE was right
    action_token_acc_move_wrong     ... whose MOVE was wrong (or missing)
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
    l1, free, fidelity = [], [], []
    for s in samples:
        r = policy.act(sample_to_obs(s))
        target = act_tok.encode(np.asarray(s.action)).reshape(-1)
        right = np.asarray(r.info["action_token_ids"]) == target
        hits += int(right.sum())
        total += target.size
        l1.append(float(np.abs(r.action - np.asarray(s.action)).mean()))
        free.append(r.tokens["reasoning"])
        if r.reasoning_text is not None and s.reasoning is not None and not s.reasoning.is_empty():
            fidelity.append({**reasoning_fidelity(r.reasoning, s.reasoning), "action_acc": float(right.mean())})
    out = {"action_token_acc": hits / total, "action_l1": float(np.mean(l1)), "free_tokens": float(np.mean(free))}
    if fidelity:
        out.update(_fidelity_summary(fidelity))
    return out


def reasoning_fidelity(written, annotated) -> dict:
    """One sample: how the reasoning a policy wrote (a parsed Reasoning, or None when it wrote no
    tag) compares with the annotated one. Keys as in the module docstring, per sample."""
    w = written if written is not None else type(annotated)()
    out = {"subtask": w.subtask is not None and w.subtask == annotated.subtask,
           "move": w.move is not None and w.move == annotated.move}
    if annotated.gripper and w.gripper:
        n = min(len(w.gripper), len(annotated.gripper))
        out["gripper_px"] = float(np.abs(np.asarray(w.gripper[:n], float) - np.asarray(annotated.gripper[:n], float)).mean())
    if annotated.visible_objects is not None:
        a = {name for name, _ in annotated.visible_objects}
        g = {name for name, _ in (w.visible_objects or [])}
        out["objects_f1"] = 2 * len(a & g) / (len(a) + len(g)) if (a or g) else 1.0
    return out


def _fidelity_summary(rows: list[dict]) -> dict:
    def mean(key, where=lambda r: True):
        vals = [r[key] for r in rows if key in r and where(r)]
        return float(np.mean(vals)) if vals else None

    out = {"reasoning_n": len(rows), "reasoning_subtask_acc": mean("subtask"), "reasoning_move_acc": mean("move"),
           "reasoning_gripper_px": mean("gripper_px"), "reasoning_objects_f1": mean("objects_f1"),
           "action_token_acc_move_right": mean("action_acc", lambda r: r["move"]),
           "action_token_acc_move_wrong": mean("action_acc", lambda r: not r["move"])}
    return {k: v for k, v in out.items() if v is not None}


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


def evaluate_checkpoint(checkpoint, data, max_samples: int = 64, mode: str | None = None) -> dict:
    """`evaluate` of a saved checkpoint on the validation split of `data` that its training held
    out (val_fraction, seed, no-op dropping from its training summary; else the training defaults):
    the numbers its run logged as `final_val`, on as many samples as asked, in its recipe's mode
    or `mode`. Returns {"metrics", "checkpoint", "data", "recipe", "mode", "split"}."""
    from pathlib import Path

    from edge_vla.data.sample import ACTION_DIM
    from edge_vla.errors import EdgeVLAError
    from edge_vla.artifacts.checkpoint import training_summary
    from edge_vla.model.vla import VLA
    from edge_vla.train.config import TrainConfig
    from edge_vla.train.data import open_split
    from edge_vla.train.recipes import get_recipe

    ckpt = Path(checkpoint)
    model = VLA.from_pretrained(ckpt)
    info = model.recipe_info or {}
    if not info.get("name"):
        raise EdgeVLAError(f"{ckpt} records no recipe (recipe.json)", "evaluate a checkpoint saved by `edge-vla train`")
    recipe = get_recipe(info["name"], **info.get("options", {}))
    trained = (training_summary(ckpt) or {}).get("config") or {}
    defaults = TrainConfig()
    split = {k: trained.get(k, getattr(defaults, k)) for k in ("val_fraction", "seed", "drop_noops")}
    if split["val_fraction"] <= 0:
        raise EdgeVLAError(f"{ckpt} was trained with no validation split (val_fraction 0)",
                           "evaluate it on another dataset than the one it was trained on")
    val = open_split(data, "val", split["val_fraction"], model.config.n_action_tokens // ACTION_DIM,
                     split["drop_noops"], split["seed"], cameras=model.config.cameras)
    if not len(val):
        raise EdgeVLAError(f"the validation split of {data} is empty", "pass a dataset with more episodes")
    metrics = evaluate(model, recipe, val, max_samples, mode=mode)
    return {"metrics": metrics, "checkpoint": str(ckpt), "data": str(data), "recipe": info["name"],
            "mode": mode or recipe.decode_mode, "split": split}


__all__ = ["evaluate", "evaluate_checkpoint", "policy_for", "decoded_metrics", "reasoning_fidelity", "teacher_forced_metrics"]
