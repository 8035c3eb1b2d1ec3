"""The trainer: a recipe's cross-entropy in the one training loop (edge_vla.train.loop, on
`accelerate`: the same code on a CPU, a GPU, DDP or FSDP).

    train(config, data, out_dir) -> out_dir/final  (a checkpoint: VLA.from_pretrained loads it)

out_dir/
    train_config.json   the resolved TrainConfig
    metrics.jsonl       one JSON object per log/eval line (TensorBoard events too, when installed)
    state/              the resumable training state (weights, optimizer, scheduler, RNG, step)
    checkpoint-NNNNNN/  periodic checkpoints (save_every)
    final/              the final checkpoint
    summary.json        final validation metrics, throughput, environment

Exact resume: the sample order and every random draw are functions of (seed, step), and the
state holds optimizer, scheduler and RNG, so a run killed at step k and resumed with --resume
ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.io import RUN_KIND, atomic_write_text, replace_output_dir
from edge_vla.tokens.sequence import IGNORE
from edge_vla.train.config import TrainConfig
from edge_vla.train.data import RecipeDataset, check_data, dataset_stats, dataset_texts, open_split
from edge_vla.train.evaluate import evaluate
from edge_vla.train.loop import (STATE_DIR, LoopSettings, MetricsLog, Objective, TrainLoop,
                                 lr_lambda_for, make_accelerator, save_checkpoint, saved_run)
from edge_vla.train.recipes import get_recipe

FINAL_DIR = "final"


def build_model(cfg: TrainConfig, texts: list[str], stats):
    from edge_vla.model.vla import VLA

    if cfg.init_from:
        model = VLA.from_pretrained(cfg.init_from)
        model.action_stats = stats
        # Only how actions are decoded can change under pretrained weights, not the architecture.
        other = sorted(set(cfg.model) - {"parallel_actions"})
        if other:
            raise EdgeVLAError(f"model override(s) {other} cannot change the pretrained checkpoint {cfg.init_from}",
                               "drop them, or train from a preset (no init_from)")
        if "parallel_actions" in cfg.model:
            value = cfg.model["parallel_actions"]
            if not isinstance(value, bool):
                raise EdgeVLAError(f"model.parallel_actions must be true or false, got {value!r}")
            model.config.parallel_actions = value
        return model
    overrides = cfg.model_overrides() + [f"action_chunk={cfg.action_chunk}"]
    return VLA.from_preset(cfg.preset, overrides, texts=texts, action_stats=stats, seed=cfg.seed)


def apply_trainable(model, cfg: TrainConfig):
    """Freeze the vision tower and/or swap the LM's full fine-tuning for LoRA adapters."""
    if cfg.freeze_vision:
        model.vision.requires_grad_(False)
    if cfg.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MissingDependencyError("peft", "LoRA training (lora_rank > 0)", "pip install 'edge-vla[train]'") from None
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.lm.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")})
        if not targets:
            raise EdgeVLAError("LoRA found no q/k/v/o or MLP projections in this language model", "set lora_rank=0")
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets)
        # The LM's embeddings hold the (new) action tokens: they stay trainable beside the adapters.
        model.lm = get_peft_model(model.lm, lcfg)
        model.lm.get_input_embeddings().weight.requires_grad_(True)
    return model


class RecipeObjective(Objective):
    """The recipe's cross-entropy; validation decodes as the deployed Policy does (evaluate)."""

    def __init__(self, recipe, val_ds, steps: int, max_samples: int):
        self.recipe, self.val_ds, self.steps, self.max_samples = recipe, val_ds, steps, max_samples

    def loss(self, model, batch, index):
        return model(**batch).loss, {}

    def weight(self, batch):
        # The model's loss is the mean over the supervised next-token targets (labels shifted by one).
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def validate(self, model, step):
        if not len(self.val_ds):
            return {}
        stage = self.recipe.stage_at(max(step - 1, 0), self.steps)
        return evaluate(model, self.recipe, self.val_ds, self.max_samples, stage=stage)


def _check_resume(saved: dict, cfg: TrainConfig, stats, tokenizer, out: Path) -> None:
    # A run saved before split_by_length existed ran every micro-batch whole.
    mine, theirs = cfg.fingerprint(), {"split_by_length": False, **saved["config_fingerprint"]}
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if "init_from" in diff and _same_path(mine["init_from"], theirs.get("init_from")):
        diff.remove("init_from")  # one checkpoint, spelled another way (relative, through `..`)
    if diff:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:4])
        raise EdgeVLAError(f"cannot resume {out}: the config differs from the run's ({detail})",
                           f"resume with the same config (only {', '.join(TrainConfig.RESUMABLE_CHANGES)} may change), "
                           "or train into a new --out")
    if saved["action_stats"] != stats.to_dict():
        raise EdgeVLAError(f"cannot resume {out}: the data's action statistics differ from the run's",
                           "resume on the same dataset, or train into a new --out")
    if saved["vocab_size"] != tokenizer.vocab_size or saved["vocab_hash"] != _vocab_hash(tokenizer):
        raise EdgeVLAError(f"cannot resume {out}: the tokenizer differs from the run's (the data's texts changed?)",
                           "resume on the same dataset, or train into a new --out")


def _same_path(a: str | None, b: str | None) -> bool:
    try:
        return bool(a and b) and os.path.samefile(a, b)
    except OSError:  # a hub id, or a path that is gone: only the same string is the same checkpoint
        return False


def _vocab_hash(tokenizer) -> str:
    import hashlib

    vocab = sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]



def _open_run(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool = False, inputs=()) -> dict | None:
    """The run's saved state (its trainer.json) when resuming; refuses to train over a run, or into
    a directory that is not one (`overwrite`: it is deleted and the run starts over)."""
    from edge_vla.config import PRESETS, unknown_name_error

    if not cfg.init_from and cfg.preset not in PRESETS:
        raise unknown_name_error("preset", cfg.preset, PRESETS)
    if overwrite and resume:
        raise EdgeVLAError("--overwrite starts the run over and --resume continues it", "pass one of them")
    replace_output_dir(out, RUN_KIND, overwrite, [cfg.init_from, *inputs])
    if overwrite:
        return None
    saved = saved_run(out)
    if saved is None and not resume and (out / "train_config.json").exists():
        raise EdgeVLAError(f"{out} already holds a training run", "pass --resume to continue it, or choose another --out")
    if saved is not None and not resume:
        raise EdgeVLAError(f"{out} holds a resumable training state", "pass --resume to continue it, or choose another --out")
    return saved


def _open_data(cfg: TrainConfig, data, val_data, recipe):
    """(train split, validation split, action statistics), every problem found before a model is built."""
    split = lambda name: open_split(data, name, cfg.val_fraction, cfg.action_chunk, cfg.drop_noops, cfg.seed)  # noqa: E731
    train_ds = split("train")
    val_ds = val_data if val_data is not None else split("val")
    stats = dataset_stats(train_ds)
    check_data(train_ds, stats, recipe, cfg.action_chunk, "training data")
    if len(val_ds):
        check_data(val_ds, stats, recipe, cfg.action_chunk, "validation data", check_range=False)
    return train_ds, val_ds, stats


def _check_action_tokens(model, cfg: TrainConfig, stats) -> None:
    if model.config.n_action_tokens != cfg.action_chunk * stats.dim:
        raise EdgeVLAError(f"the model decodes {model.config.n_action_tokens} action tokens, the data needs "
                           f"{cfg.action_chunk * stats.dim}", "match action_chunk with the checkpoint (init_from)")


def _finished(saved: dict, cfg: TrainConfig, out: Path) -> bool:
    return int(saved["step"]) >= cfg.steps and (out / FINAL_DIR).is_dir() and (out / "summary.json").is_file()


def _state_meta(cfg: TrainConfig, stats, tokenizer):
    """What a resume must match, recorded with every saved state."""
    return lambda: {"config_fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "action_stats": stats.to_dict(),
                    "vocab_size": tokenizer.vocab_size, "vocab_hash": _vocab_hash(tokenizer)}


def _write_summary(out: Path, loop: TrainLoop, recipe, metrics: dict, run: dict, n_train: int, n_val: int,
                   cfg: TrainConfig, command: str | None) -> None:
    from edge_vla.environment import environment_report

    summary = {"recipe": recipe.info(loop.unwrapped.processor.tokenizer), "steps": loop.step, "final_val": metrics,
               "train_samples_per_s": run["samples"] / max(run["wall_s"], 1e-9),
               "wall_s": run["wall_s"], "processes": loop.accelerator.num_processes, "n_train": n_train,
               "n_val": n_val, "command": command, "config": cfg.to_dict(), "environment": environment_report()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))


def train(config: TrainConfig, data, out_dir, resume: bool = False, val_data=None, stop_at_step: int | None = None,
          show_progress: bool = True, command: str | None = None, overwrite: bool = False) -> Path:
    """Train a VLA with `config.recipe` on `data` (a dataset path, a torch Dataset of Samples or a
    list of Samples); returns the final checkpoint directory.

    `val_data` overrides the validation split; `stop_at_step` ends the run after that step with
    its state saved, as a pre-emption would (tests use it to prove resume is exact). `command`:
    the command line that started the run, recorded in summary.json so a shipped checkpoint says
    how to reproduce it. `out_dir` may be missing, empty or this run's; `overwrite` deletes any
    other directory there (never the data or init_from) and starts over.
    """
    cfg = config
    cfg.validate()
    out = Path(out_dir)
    recipe = get_recipe(cfg.recipe, **cfg.recipe_options)
    saved = _open_run(cfg, out, resume, overwrite, [d for d in (data, val_data) if isinstance(d, (str, Path))])
    train_ds, val_ds, stats = _open_data(cfg, data, val_data, recipe)

    settings = LoopSettings.of(cfg)
    accelerator = make_accelerator(settings)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset_texts(train_ds), stats)
    tokenizer = model.processor.tokenizer
    _check_action_tokens(model, cfg, stats)
    if saved is not None:
        _check_resume(saved, cfg, stats, tokenizer, out)
        if _finished(saved, cfg, out):
            return out / FINAL_DIR  # a resume is a no-op (its summary keeps the run's throughput)
    model.recipe_info = recipe.info(tokenizer)
    model = apply_trainable(model, cfg)

    loop = TrainLoop(settings, accelerator, model, RecipeObjective(recipe, val_ds, cfg.steps, cfg.val_max_samples),
                     out, lr_lambda_for(cfg, recipe), lambda step: recipe.stage_at(step, cfg.steps),
                     f"train {recipe.name}", _state_meta(cfg, stats, tokenizer))
    if saved is not None:
        loop.restore(saved)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    log = MetricsLog(out, main, loop.step if saved is not None else None)
    rows = RecipeDataset(train_ds, recipe, loop.unwrapped.processor, loop.unwrapped.action_tokenizer, cfg.seed)
    step = loop.run(rows, log, stop_at_step, show_progress)
    run = loop.clock()
    if step < cfg.steps:  # stopped early on purpose (stop_at_step): state saved, no final checkpoint
        log.close()
        return out / STATE_DIR

    loop.model.eval()
    final = out / FINAL_DIR
    metrics = loop.validate(step, log)
    if main:
        save_checkpoint(loop.unwrapped, final, bool(cfg.lora_rank))
        _write_summary(out, loop, recipe, metrics, run, len(train_ds), len(val_ds), cfg, command)
    accelerator.wait_for_everyone()
    log.close()
    return final


__all__ = ["train", "build_model", "apply_trainable", "save_checkpoint", "lr_lambda_for", "RecipeObjective",
           "STATE_DIR", "FINAL_DIR"]
