"""The one training loop, on `accelerate`: recipe training and distillation differ only in their
`Objective` (what is minimised, how it is validated).

    loop = TrainLoop(LoopSettings.of(cfg), accelerator, model, objective, out, lr_lambda, stage_at, title)
    loop.restore(saved)                 # resume: weights, optimizer, scheduler, RNG, step
    loop.run(rows, log, end_step)       # -> the step it stopped at
    loop.validate(step, log)            # the objective's validation, logged as val/<name>

The loop owns what both share: the resumable sample order, gradient accumulation, clipping, the
per-stage warmup + cosine schedule, train/val logging, the progress bar, the training state
(out/state) and periodic checkpoints (out/checkpoint-NNNNNN).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text, read_json
from edge_vla.train.data import Collate, MicroBatches, length_groups, take_rows
from edge_vla.train.state import STATE_FORMAT, read_state, write_state

STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
METRICS_FILE = "metrics.jsonl"


def save_checkpoint(model, path: Path, lora: bool) -> Path:
    """Save `model` as a checkpoint directory; LoRA adapters are merged into a copy first."""
    if lora:
        model = copy.deepcopy(model)
        model.lm = model.lm.merge_and_unload()
    return model.save_pretrained(path)


def lr_lambda_for(cfg, recipe):
    """Warmup then cosine to min_lr_ratio, restarted at every recipe stage boundary.
    `cfg`: anything with steps, warmup_steps and min_lr_ratio (a TrainConfig, LoopSettings)."""
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


class Objective:
    """What the loop minimises and how it validates; the loop owns everything else.

    loss(model, batch, index) -> (loss, {name: scalar tensor}) for one micro-batch: `batch` holds
        the model's inputs and labels, `index` the samples' indices in the training rows; the
        extra terms are logged as train/<name>.
    validate(model, step) -> {name: number}, logged as val/<name>; runs on the main process, on
        the unwrapped model.
    weight(batch) -> the number of terms `loss` averages over (e.g. supervised tokens), or None.
        With a weight, the loop may run a micro-batch as groups of rows of similar length and
        scale each group's loss by its share of the weight: the same loss and gradient as the
        padded batch, without the work on padding. None: the batch always runs whole.
    """

    def loss(self, model, batch: dict, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def weight(self, batch: dict) -> int | None:
        return None

    def validate(self, model, step: int) -> dict:
        return {}


@dataclass
class LoopSettings:
    """The loop's knobs, read by name from a TrainConfig or a DistillConfig; a knob the config
    does not have keeps its default here."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    augment_shift: int = 0
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    bf16: str | bool = False
    lora_rank: int = 0
    split_by_length: bool = False

    @classmethod
    def of(cls, cfg) -> "LoopSettings":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})


def make_accelerator(settings: LoopSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA:
    # accelerate forms a CPU process group (gloo) only when told cpu=True.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses another mixed precision in it: a second
    # run in this process (a library user, the tests) with another bf16 setting resets it. The
    # process group (PartialState) is kept.
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, _mixed_precision(settings)):
        AcceleratorState._reset_state(reset_partial_state=False)
    # Some tower parameters (SigLIP's unused pooling head) get no gradient: DDP must know.
    return Accelerator(mixed_precision=_mixed_precision(settings), cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _mixed_precision(settings: LoopSettings) -> str:
    if settings.bf16 is True:
        return "bf16"
    if settings.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def recover_state(out: Path) -> None:
    """A run killed between the two renames of save_state's swap has no out/state: the newest
    complete state (the new one if its trainer.json was written, else the previous one) goes back
    in place, so a resume continues from it instead of starting over."""
    final = out / STATE_DIR
    if final.exists():
        return
    for candidate in (out / f".{STATE_DIR}.tmp", out / f".{STATE_DIR}.old"):
        if (candidate / TRAINER_FILE).is_file():
            os.replace(candidate, final)
            return


def saved_run(out: Path) -> dict | None:
    """The saved state's record (state/trainer.json: its step and what a resume must match) of
    the run in `out`, after recover_state; None when the run saved no state."""
    recover_state(out)  # killed mid-swap: the last complete state goes back in place first
    f = out / STATE_DIR / TRAINER_FILE
    if not f.is_file():
        return None
    saved = read_json(f, f"restore {out / STATE_DIR} from a copy, or delete it to start over")
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise EdgeVLAError(f"{f} is not a training state (no step)", f"delete {out / STATE_DIR} to start over")
    return saved


def save_state(accelerator, out: Path, meta: dict, model, optimizer, scheduler) -> None:
    """Write out/state atomically, without pickles (edge_vla.train.state): all processes write
    into one temp dir, trainer.json last, then a swap that recover_state can always finish.
    `meta` (the step, the run's clock, what a resume must match) goes to state/trainer.json."""
    tmp = out / f".{STATE_DIR}.tmp"
    if accelerator.is_main_process:
        recover_state(out)  # the previous state must be in place before its temp dir is reused
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_state(tmp, accelerator, model, optimizer, scheduler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_FILE, json.dumps({**meta, "state_format": STATE_FORMAT}, indent=2))
        final = out / STATE_DIR
        old = out / f".{STATE_DIR}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class TrainLoop:
    """Micro-batches -> objective -> one optimizer step per `grad_accum` micro-batches -> log,
    validate, save. `stage_at(step)`: the recipe stage of a 0-based step; `state_meta()`: what
    out/state/trainer.json records besides step and clock (None: keep no resumable state)."""

    def __init__(self, settings: LoopSettings, accelerator, model, objective: Objective, out: Path,
                 lr_lambda: Callable[[int], float], stage_at: Callable[[int], str | None], title: str,
                 state_meta: Callable[[], dict] | None = None):
        self.s, self.accelerator, self.objective, self.out = settings, accelerator, objective, Path(out)
        self.stage_at, self.title, self.state_meta = stage_at, title, state_meta
        self.main = accelerator.is_main_process
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per
        # process); saved with the training state.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.step = 0
        self._earlier = {"wall_s": 0.0, "samples": 0}  # earlier sessions of this run
        self._t0, self._samples = time.perf_counter(), 0

    # --- resume and bookkeeping ------------------------------------------------------------------
    def restore(self, saved: dict) -> None:
        """Continue from out/state (whose trainer.json is `saved`)."""
        n = self.accelerator.num_processes
        if saved.get("world_size", 1) != n:
            raise EdgeVLAError(f"cannot resume {self.out}: it ran on {saved.get('world_size')} processes, this run has "
                               f"{n}", "resume with the same number of processes")
        read_state(self.out / STATE_DIR, self.accelerator, self.unwrapped, self.optimizer, self.scheduler)
        self.step = int(saved["step"])
        self._earlier = {k: saved.get(k, 0) for k in ("wall_s", "samples")}

    def clock(self) -> dict:
        """The run's training wall time and samples so far, over every session."""
        return {"wall_s": self._earlier["wall_s"] + time.perf_counter() - self._t0,
                "samples": self._earlier["samples"] + self._samples * self.accelerator.num_processes}

    def validate(self, step: int, log: MetricsLog) -> dict:
        metrics = {}
        if self.main:
            metrics = self.objective.validate(self.unwrapped, step)
            if metrics:
                log.write({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        self.accelerator.wait_for_everyone()
        return metrics

    def save(self, step: int) -> None:
        s = self.s
        if self.state_meta is not None:
            save_state(self.accelerator, self.out, {**self.state_meta(), "step": step, "micro": step * s.grad_accum,
                                                    "world_size": self.accelerator.num_processes, **self.clock()},
                       self.unwrapped, self.optimizer, self.scheduler)
        if self.main and s.save_every and step % s.save_every == 0 and step < s.steps:
            save_checkpoint(self.unwrapped, self.out / f"checkpoint-{step:06d}", bool(s.lora_rank))
        self.accelerator.wait_for_everyone()

    # --- the loop --------------------------------------------------------------------------------
    def run(self, rows, log: MetricsLog, end_step: int | None = None, show_progress: bool = True) -> int:
        """Train on `rows` (a RecipeDataset) from the current step up to `end_step` (default: all
        the steps); returns the step reached."""
        s = self.s
        end_step = s.steps if end_step is None else min(s.steps, end_step)
        progress, task = self._progress(show_progress)
        self._t0, self._samples = time.perf_counter(), 0
        self.model.train()
        sums: dict[str, float] = {}
        micro = 0
        with progress:
            for batch in self._loader(rows):
                if self.step >= end_step:
                    break
                last = micro == s.grad_accum - 1
                self._micro_step(batch, last, sums)
                micro += 1
                if not last:
                    continue
                lr = self._optimizer_step()
                self.step, micro = self.step + 1, 0
                means = {k: float(self.accelerator.reduce(torch.tensor(v, device=self.accelerator.device), "mean"))
                         for k, v in sums.items()}
                sums = {}
                progress.update(task, completed=self.step, loss=means["loss"], lr=lr)
                self._after_step(lr, means, log, end_step)
        return self.step

    def _loader(self, rows):
        s, acc = self.s, self.accelerator
        batches = MicroBatches(len(rows), s.batch_size, self.step * s.grad_accum, s.steps * s.grad_accum, s.seed,
                               acc.num_processes, acc.process_index,
                               stage_of=lambda m: self.stage_at(m // s.grad_accum))
        collate = Collate(rows.processor.tokenizer.pad_id, s.augment_shift, s.seed, acc.process_index)
        return torch.utils.data.DataLoader(rows, batch_sampler=batches, num_workers=s.num_workers, collate_fn=collate)

    def _progress(self, show: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e}"), TimeRemainingColumn(),
                            disable=not (self.main and show))
        task = progress.add_task(self.title, total=self.s.steps, completed=self.step, loss=float("nan"), lr=self.s.lr)
        return progress, task

    def _groups(self, batch: dict) -> list[tuple[list[int] | None, float]]:
        """(rows, share of the micro-batch's loss) for each forward of this micro-batch: the whole
        batch, or with split_by_length its rows grouped by length (edge_vla.train.data.length_groups),
        each group weighted by its share of the objective's weight."""
        whole = [(None, 1.0)]
        if not self.s.split_by_length:
            return whole
        total = self.objective.weight(batch)
        if not total:
            return whole
        groups = length_groups(batch["attention_mask"].sum(1).tolist())
        if len(groups) == 1:
            return whole
        shares = [self.objective.weight(take_rows(batch, rows)) / total for rows in groups]
        if min(shares) <= 0:  # a group with nothing to average would be 0 x NaN
            return whole
        return list(zip(groups, shares))

    def _micro_step(self, batch: dict, last: bool, sums: dict) -> None:
        """Forward and backward of one micro-batch (one per length group with split_by_length);
        DDP syncs gradients only on the last backward of the last one."""
        acc, k = self.accelerator, self.s.grad_accum
        index = batch.pop("index")
        batch = {name: v.to(acc.device) for name, v in batch.items()}
        groups = self._groups(batch)
        for g, (rows, share) in enumerate(groups):
            part, part_index = (batch, index) if rows is None else (take_rows(batch, rows), index[rows])
            final = last and g == len(groups) - 1
            sync = contextlib.nullcontext() if final else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, extra = self.objective.loss(self.model, part, part_index)
                loss = loss * share / k if rows is not None else loss / k
                acc.backward(loss)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for name, v in extra.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) * share / k
        self._samples += batch["input_ids"].shape[0]

    def _optimizer_step(self) -> float:
        """Clip, step, schedule; returns the learning rate this step used."""
        if self.s.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.s.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _after_step(self, lr: float, means: dict, log: MetricsLog, end_step: int) -> None:
        s, step = self.s, self.step
        if step % s.log_every == 0 or step == s.steps:
            log.write({"step": step, **{f"train/{k}": v for k, v in means.items()}, "lr": lr,
                       "stage": self.stage_at(step - 1)})
        if s.eval_every and step % s.eval_every == 0 and step < s.steps:
            self.validate(step, log)
            self.model.train()
        if (s.save_every and step % s.save_every == 0) or step == end_step:
            self.save(step)


__all__ = ["TrainLoop", "LoopSettings", "Objective", "MetricsLog", "make_accelerator", "save_checkpoint",
           "save_state", "recover_state", "lr_lambda_for", "STATE_DIR", "TRAINER_FILE", "METRICS_FILE"]
