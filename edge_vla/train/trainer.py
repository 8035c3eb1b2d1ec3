"""The trainer: one loop on `accelerate`, the same code on a CPU, a GPU, DDP or FSDP.

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

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.io import atomic_write_text
from edge_vla.train.config import TrainConfig
from edge_vla.train.data import (Collate, MicroBatches, RecipeDataset, check_data, dataset_stats, dataset_texts,
                                 open_split)
from edge_vla.train.evaluate import evaluate
from edge_vla.train.recipes import get_recipe

STATE_DIR = "state"
FINAL_DIR = "final"
TRAINER_FILE = "trainer.json"
METRICS_FILE = "metrics.jsonl"


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


def export_checkpoint(model, path: Path, lora: bool) -> Path:
    """Write `model` in the checkpoint format; LoRA adapters are merged into a copy first."""
    if lora:
        model = copy.deepcopy(model)
        model.lm = model.lm.merge_and_unload()
    return model.save_pretrained(path)


def lr_lambda_for(cfg: TrainConfig, recipe):
    """Warmup then cosine to min_lr_ratio, restarted at every recipe stage boundary."""
    bounds = recipe.stage_bounds(cfg.steps)

    def lr_lambda(step: int) -> float:
        lo, hi = next((lo, hi) for _, lo, hi in reversed(bounds) if step >= lo)
        local, length = step - lo, max(1, hi - lo)
        warm = min(cfg.warmup_steps, max(0, length - 1))
        if local < warm:
            return (local + 1) / (warm + 1)
        progress = min(1.0, (local - warm) / max(1, length - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_lambda


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed); main process only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path = out / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop lines written after the state we resume from: they will be written again.
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.bf16 is True:
        return "bf16"
    if cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA:
    # accelerate forms a CPU process group (gloo) only when told cpu=True.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Some tower parameters (SigLIP's unused pooling head) get no gradient: DDP must know.
    return Accelerator(mixed_precision=_mixed_precision(cfg), cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _read_state(out: Path) -> dict | None:
    f = out / STATE_DIR / TRAINER_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise EdgeVLAError(f"{f} is corrupt", f"delete {out / STATE_DIR} to start over") from None


def _check_resume(saved: dict, cfg: TrainConfig, stats, tokenizer, out: Path) -> None:
    mine, theirs = cfg.fingerprint(), saved["config_fingerprint"]
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


def _save_state(accelerator, out: Path, step: int, cfg: TrainConfig, stats, tokenizer, micro: int,
                clock: dict) -> None:
    """Write out/state atomically: all processes write into one temp dir, then one rename.
    `clock`: the run's training wall time and samples so far, over every session."""
    tmp = out / f".{STATE_DIR}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": step, "micro": micro, "config_fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
                "action_stats": stats.to_dict(), "vocab_size": tokenizer.vocab_size, "vocab_hash": _vocab_hash(tokenizer),
                "world_size": accelerator.num_processes, **clock}
        (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=2))
        final = out / STATE_DIR
        old = out / f".{STATE_DIR}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(config: TrainConfig, data, out_dir, resume: bool = False, val_data=None, stop_at_step: int | None = None,
          show_progress: bool = True, command: str | None = None) -> Path:
    """Train a VLA with `config.recipe` on `data` (a dataset path, a torch Dataset of Samples or a
    list of Samples); returns the final checkpoint directory.

    `val_data` overrides the validation split; `stop_at_step` ends the run after that step with
    its state saved, as a pre-emption would (tests use it to prove resume is exact). `command`:
    the command line that started the run, recorded in summary.json so a shipped checkpoint says
    how to reproduce it.
    """
    cfg = config
    cfg.validate()
    out = Path(out_dir)
    recipe = get_recipe(cfg.recipe, **cfg.recipe_options)
    from edge_vla.config import PRESETS, unknown_name_error

    if not cfg.init_from and cfg.preset not in PRESETS:
        raise unknown_name_error("preset", cfg.preset, PRESETS)
    saved = _read_state(out)
    if saved is None and not resume and (out / "train_config.json").exists():
        raise EdgeVLAError(f"{out} already holds a training run", "pass --resume to continue it, or choose another --out")
    if saved is not None and not resume:
        raise EdgeVLAError(f"{out} holds a resumable training state", "pass --resume to continue it, or choose another --out")

    # --- data, checked before anything is built ---------------------------------------------------
    train_ds = open_split(data, "train", cfg.val_fraction, cfg.action_chunk, cfg.drop_noops, cfg.seed)
    val_ds = val_data if val_data is not None else open_split(data, "val", cfg.val_fraction, cfg.action_chunk,
                                                             cfg.drop_noops, cfg.seed)
    stats = dataset_stats(train_ds)
    check_data(train_ds, stats, recipe, cfg.action_chunk, "training data")
    if len(val_ds):
        check_data(val_ds, stats, recipe, cfg.action_chunk, "validation data", check_range=False)

    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset_texts(train_ds), stats)
    tokenizer = model.processor.tokenizer
    if model.config.n_action_tokens != cfg.action_chunk * stats.dim:
        raise EdgeVLAError(f"the model decodes {model.config.n_action_tokens} action tokens, the data needs "
                           f"{cfg.action_chunk * stats.dim}", "match action_chunk with the checkpoint (init_from)")
    if saved is not None:
        _check_resume(saved, cfg, stats, tokenizer, out)
        if int(saved["step"]) >= cfg.steps and (out / FINAL_DIR).is_dir() and (out / "summary.json").is_file():
            return out / FINAL_DIR  # finished: a resume is a no-op (its summary keeps the run's throughput)
    model.recipe_info = recipe.info(tokenizer)
    model = apply_trainable(model, cfg)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step
    # it once per process), and checkpointed as a registered object.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, recipe))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    if saved is not None:
        if saved.get("world_size", 1) != accelerator.num_processes:
            raise EdgeVLAError(f"cannot resume {out}: it ran on {saved.get('world_size')} processes, this run has "
                               f"{accelerator.num_processes}", "resume with the same number of processes")
        accelerator.load_state(str(out / STATE_DIR / "accelerate"))
        start_step = int(saved["step"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    log = MetricsLog(out, main, start_step if saved is not None else None)

    unwrapped = accelerator.unwrap_model(model)
    rows = RecipeDataset(train_ds, recipe, unwrapped.processor, unwrapped.action_tokenizer, cfg.seed)
    batches = MicroBatches(len(train_ds), cfg.batch_size, start_step * cfg.grad_accum, cfg.steps * cfg.grad_accum,
                           cfg.seed, accelerator.num_processes, accelerator.process_index,
                           stage_of=lambda m: recipe.stage_at(m // cfg.grad_accum, cfg.steps))
    loader = torch.utils.data.DataLoader(rows, batch_sampler=batches, num_workers=cfg.num_workers,
                                         collate_fn=Collate(tokenizer.pad_id, cfg.augment_shift, cfg.seed,
                                                            accelerator.process_index))

    def run_eval(step: int) -> dict:
        metrics = {}
        if main and len(val_ds):
            metrics = evaluate(unwrapped, recipe, val_ds, cfg.val_max_samples,
                               stage=recipe.stage_at(max(step - 1, 0), cfg.steps))
            log.write({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        accelerator.wait_for_everyone()
        return metrics

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train {task.fields[recipe]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e}"), TimeRemainingColumn(),
                        disable=not (main and show_progress))
    task = progress.add_task("train", total=cfg.steps, completed=start_step, recipe=recipe.name, loss=float("nan"),
                             lr=cfg.lr)
    step, micro_in_step, loss_acc = start_step, 0, 0.0
    t0, samples_seen = time.perf_counter(), 0
    before = {k: (saved or {}).get(k, 0) for k in ("wall_s", "samples")}  # earlier sessions of this run

    def clock() -> dict:
        return {"wall_s": before["wall_s"] + time.perf_counter() - t0,
                "samples": before["samples"] + samples_seen * accelerator.num_processes}
    model.train()
    end_step = min(cfg.steps, stop_at_step) if stop_at_step is not None else cfg.steps
    with progress:
        for batch in loader:
            if step >= end_step:
                break
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            last_micro = micro_in_step == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not last_micro else _nullcontext()
            with ctx, accelerator.autocast():
                loss = model(**batch).loss / cfg.grad_accum
                accelerator.backward(loss)
            loss_acc += float(loss.detach())
            samples_seen += batch["input_ids"].shape[0]
            micro_in_step += 1
            if not last_micro:
                continue
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            micro_in_step = 0
            mean_loss = float(accelerator.reduce(torch.tensor(loss_acc, device=accelerator.device), "mean"))
            loss_acc = 0.0
            progress.update(task, completed=step, loss=mean_loss, lr=lr)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write({"step": step, "train/loss": mean_loss, "lr": lr,
                           "stage": recipe.stage_at(step - 1, cfg.steps)})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(step)
                model.train()
            if (cfg.save_every and step % cfg.save_every == 0) or step == end_step:
                _save_state(accelerator, out, step, cfg, stats, tokenizer, step * cfg.grad_accum, clock())
                if main and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    export_checkpoint(unwrapped, out / f"checkpoint-{step:06d}", bool(cfg.lora_rank))
                accelerator.wait_for_everyone()
    run = clock()
    if step < cfg.steps:  # stopped early on purpose (stop_at_step): state saved, no final checkpoint
        log.close()
        return out / STATE_DIR

    model.eval()
    final = out / FINAL_DIR
    metrics = run_eval(step)
    if main:
        export_checkpoint(unwrapped, final, bool(cfg.lora_rank))
        from edge_vla.environment import environment_report

        summary = {"recipe": recipe.info(tokenizer), "steps": step, "final_val": metrics,
                   "train_samples_per_s": run["samples"] / max(run["wall_s"], 1e-9),
                   "wall_s": run["wall_s"], "processes": accelerator.num_processes, "n_train": len(train_ds),
                   "n_val": len(val_ds), "command": command, "config": cfg.to_dict(),
                   "environment": environment_report()}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    accelerator.wait_for_everyone()
    log.close()
    return final


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["train", "build_model", "apply_trainable", "export_checkpoint", "lr_lambda_for", "STATE_DIR", "FINAL_DIR"]
