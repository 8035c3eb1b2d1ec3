"""Distillation: a student learns a teacher's distributions instead of (only) the data's labels.

    distill(config, teacher_ckpt, data, out_dir) -> out_dir/final

Two modes (`DistillConfig.mode`):

- `reasoning`: the teacher reasons (full mode: it writes its own chain of thought, greedily) and
  then scores the action tokens; the student, a direct-mode policy (the `vla` sequence: prompt ->
  " ACTION:" -> actions), learns that action distribution (KL on the action block). The fast path
  inherits what reasoning adds. The teacher's targets are computed once per sample, before
  training (reasoning is the expensive part). The student starts as a copy of the teacher.
- `size`: a smaller student (the teacher's model config with `student_model` overrides, e.g.
  fewer LM layers or a narrower projector) learns the teacher's full next-token distributions on
  the teacher's own recipe sequences, online. It starts from the teacher's tensors wherever the
  shapes allow: same-named tensors of the same shape are copied, and a student with fewer layers
  takes evenly spaced teacher layers (first and last kept).

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the labels.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_vla.config import VLAConfig, apply_overrides, unknown_name_error
from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text
from edge_vla.tokens.sequence import IGNORE, action_prefix_ids
from edge_vla.train.data import Collate, MicroBatches, RecipeDataset, check_data, open_split
from edge_vla.train.recipes import DEFAULT_MAX_REASONING_TOKENS, get_recipe

MODES = ("reasoning", "size")
# Recipes whose checkpoints write reasoning when decoded in full mode.
REASONING_TEACHERS = ("ecot", "ecot-lite-dropout")


@dataclass
class DistillConfig:
    mode: str = "reasoning"
    student_model: dict = field(default_factory=dict)  # size: overrides on the teacher's model config
    init_from_teacher: bool = True
    temperature: float = 1.0
    alpha: float = 0.9  # weight of the KL term; 1 - alpha on the hard labels
    lr: float = 5e-4
    batch_size: int = 16
    steps: int = 500
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    augment_shift: int = 0
    val_fraction: float = 0.1
    val_max_samples: int = 32
    drop_noops: bool = True
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise unknown_name_error("distillation mode", self.mode, MODES)
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise EdgeVLAError(f"distill: alpha must be in [0, 1] and temperature > 0 (got {self.alpha}, {self.temperature})")
        for k in ("batch_size", "steps"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise EdgeVLAError(f"distill: {k} must be a positive integer, got {getattr(self, k)!r}")
        if self.mode == "reasoning" and self.student_model:
            raise EdgeVLAError("distill: student_model overrides apply to size distillation",
                               "use --mode size, or drop the student overrides")

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                raise unknown_name_error("distill config key", k, known)
        cfg = cls(**d)
        cfg.validate()
        return cfg


def load_distill_config(path=None, overrides=(), **base) -> DistillConfig:
    """Defaults <- `base` <- config file <- dotted overrides (`student_model.lm.num_hidden_layers=2`)."""
    from edge_vla.config import load_config_file
    from edge_vla.train.config import merge_overrides

    d = asdict(DistillConfig(**{k: v for k, v in base.items() if v is not None}))
    if path is not None:
        file_d = load_config_file(path)
        for k in file_d:
            if k not in d:
                raise unknown_name_error(f"key in {path}", k, list(d))
        d.update(file_d)
    return DistillConfig.from_dict(merge_overrides(d, overrides, free_sections=("student_model",)))


# --- the student -----------------------------------------------------------------------------------
def build_student(teacher, overrides: dict, init_from_teacher: bool = True, seed: int = 0):
    """A VLA with the teacher's tokenizer and statistics and the teacher's config + `overrides`."""
    from transformers import AutoModelForCausalLM

    from edge_vla.model.vla import VLA, _hf_config, _vision_from_config

    d = teacher.config.to_dict()
    d.update(vision_path=None, lm_path=None, tokenizer_path=None)
    for section in ("vision", "lm"):
        if f"{section}.num_hidden_layers" in overrides:
            # Per-layer lists recorded from the teacher (e.g. Qwen2's layer_types) would contradict
            # the new depth: drop them and let the config rebuild them.
            n_old = d[section].get("num_hidden_layers")
            d[section] = {k: v for k, v in d[section].items() if not (isinstance(v, list) and len(v) == n_old)}
    d = apply_overrides(d, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    cfg = VLAConfig.from_dict(d, source="student config")
    if cfg.action_chunk != teacher.config.action_chunk or cfg.n_action_bins != teacher.config.n_action_bins:
        raise EdgeVLAError("the student must decode the teacher's actions (same action_chunk and n_action_bins)")
    torch.manual_seed(seed)
    tok = teacher.processor.tokenizer
    vision = _vision_from_config(_hf_config(cfg.vision, "vision"))
    lm = AutoModelForCausalLM.from_config(_hf_config(dict(cfg.lm, vocab_size=tok.vocab_size), "language model"))
    student = VLA(cfg, vision, lm, tok, teacher.action_stats)
    copied = init_from(student, teacher) if init_from_teacher else 0
    return student, copied


_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def _layer_map(n_student: int, n_teacher: int) -> list[int]:
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_from(student, teacher) -> int:
    """Copy teacher tensors into the student where names (after layer mapping) and shapes match."""
    t_state = teacher.state_dict()
    counts: dict[str, int] = {}  # "<prefix>" -> number of layers, per stack (LM, vision encoder)
    for state in (t_state,):
        for k in state:
            m = _LAYER.match(k)
            if m:
                counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    s_counts: dict[str, int] = {}
    for k in student.state_dict():
        m = _LAYER.match(k)
        if m:
            s_counts[m.group(1)] = max(s_counts.get(m.group(1), 0), int(m.group(2)) + 1)
    maps = {p: _layer_map(n, counts[p]) for p, n in s_counts.items() if p in counts}
    new_state, copied = {}, 0
    for k, v in student.state_dict().items():
        src = k
        m = _LAYER.match(k)
        if m and m.group(1) in maps:
            src = f"{m.group(1)}{maps[m.group(1)][int(m.group(2))]}{m.group(3)}"
        if src in t_state and t_state[src].shape == v.shape:
            new_state[k] = t_state[src].clone()
            copied += 1
    student.load_state_dict(new_state, strict=False)
    return copied


# --- teacher targets -------------------------------------------------------------------------------
@torch.no_grad()
def reasoning_targets(teacher, samples, temperature: float = 1.0, progress=None) -> list[torch.Tensor]:
    """For each sample: the teacher's action-block log-probs (K*D, n_bins) after its OWN reasoning.

    The teacher decodes freely (its reasoning ends with " ACTION:"), then scores the target action
    tokens teacher-forced, so the student learns the teacher's belief at every action position.
    """
    teacher.eval()
    tok = teacher.processor.tokenizer
    first, n_bins = tok.first_action_id, tok.n_bins
    max_free = int((teacher.recipe_info or {}).get("options", {}).get("max_reasoning_tokens", DEFAULT_MAX_REASONING_TOKENS))
    prefix = action_prefix_ids(tok)
    out = []
    for s in samples:
        pv, ids, st = teacher.model_inputs(s.images, s.instruction, s.state)
        free, _ = teacher.generate(pv, ids, st, max_free_tokens=max_free)
        reasoning = free[0].tolist()
        if reasoning[-len(prefix):] != prefix:  # reasoning that never reached " ACTION:"
            reasoning += prefix
        acts = teacher.action_tokenizer.encode(np.asarray(s.action)).reshape(-1).tolist()
        seq = torch.tensor([ids[0].tolist() + reasoning + acts], device=teacher.device)
        logits = teacher(pv, seq, state=st).logits[0]
        n = len(acts)
        pos = seq.shape[1] - n - 1  # the logits at position i predict token i + 1
        block = logits[pos:pos + n, first:first + n_bins].float() / temperature
        out.append(F.log_softmax(block, -1).cpu())
        if progress is not None:
            progress()
    return out


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) at temperature T (teacher given as log-probs at T)."""
    s_logp = F.log_softmax(student_logits.float() / temperature, -1)
    return F.kl_div(s_logp, teacher_logp, log_target=True, reduction="batchmean")


def _action_positions(labels: torch.Tensor, first: int, n_bins: int) -> torch.Tensor:
    nxt = labels[:, 1:]
    return (nxt >= first) & (nxt < first + n_bins)


@torch.no_grad()
def action_kl(student, samples, targets: list[torch.Tensor], temperature: float = 1.0, batch_size: int = 16) -> float:
    """Mean KL(teacher || student) over the action tokens of `samples` (direct-mode student)."""
    student.eval()
    tok = student.processor.tokenizer
    rows = RecipeDataset(samples, get_recipe("vla"), student.processor, student.action_tokenizer)
    collate = Collate(tok.pad_id)
    total, n = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate([rows.row(s, np.random.default_rng(0), None) for s in samples[i:i + batch_size]])
        batch = {k: v.to(student.device) for k, v in batch.items()}
        logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
        where = _action_positions(batch["labels"], tok.first_action_id, tok.n_bins)
        s_block = logits[:, :-1][where][:, tok.first_action_id:tok.first_action_id + tok.n_bins]
        t = torch.cat(targets[i:i + batch_size]).to(s_block.device)
        total += float(_kl(t, s_block, temperature)) * t.shape[0]
        n += t.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def sequence_kl(student, teacher, samples, recipe, temperature: float = 1.0, batch_size: int = 16) -> float:
    """Mean KL(teacher || student) over every labelled position of the recipe's sequences."""
    student.eval()
    teacher.eval()
    tok = student.processor.tokenizer
    rows = RecipeDataset(samples, recipe, student.processor, student.action_tokenizer)
    collate = Collate(tok.pad_id)
    total, n = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate([rows.row(s, np.random.default_rng([0, i + j]), recipe.stages[-1])
                         for j, s in enumerate(samples[i:i + batch_size])])
        batch = {k: v.to(student.device) for k, v in batch.items()}
        kl, cnt, _ = _sequence_kl(student, teacher, batch, temperature)
        total, n = total + float(kl) * cnt, n + cnt
    return total / max(n, 1)


def _sequence_kl(student, teacher, batch, temperature):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    s_out = student(**batch)
    where = batch["labels"][:, 1:] != IGNORE
    t_logp = F.log_softmax(t_logits[where].float() / temperature, -1)
    return _kl(t_logp, s_out.logits[:, :-1][where], temperature), int(where.sum()), s_out


# --- the loop -------------------------------------------------------------------------------------
def distill(config: DistillConfig, teacher, data, out_dir, student=None, show_progress: bool = True) -> Path:
    """Distil `teacher` (a checkpoint path or a VLA) into a student; returns out_dir/final.

    `student`: a VLA to start from (else built per the config: a copy of the teacher for
    reasoning distillation, the teacher's config + `student_model` overrides for size).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edge_vla.model.vla import VLA
    from edge_vla.train.trainer import MetricsLog, lr_lambda_for

    cfg = config
    cfg.validate()
    out = Path(out_dir)
    if (out / "final").exists():
        raise EdgeVLAError(f"{out} already holds a distilled checkpoint", "choose another --out")
    if not isinstance(teacher, torch.nn.Module):
        teacher = VLA.from_pretrained(teacher)
    if teacher.action_stats is None:
        raise EdgeVLAError("the teacher checkpoint has no action statistics", "distil from a trained checkpoint")
    t_info = teacher.recipe_info or {}
    if cfg.mode == "reasoning":
        if t_info.get("name") not in REASONING_TEACHERS:
            raise EdgeVLAError(f"reasoning distillation needs a teacher trained to reason (recipe `{t_info.get('name')}`)",
                               "use a teacher trained with --recipe ecot or ecot-lite-dropout, or --mode size")
        recipe = get_recipe("vla")
    else:
        recipe = get_recipe(t_info["name"], **t_info.get("options", {})) if t_info.get("name") else get_recipe("vla")

    k = teacher.config.action_chunk
    train_ds = list(open_split(data, "train", cfg.val_fraction, k, cfg.drop_noops, cfg.seed))
    val_ds = list(open_split(data, "val", cfg.val_fraction, k, cfg.drop_noops, cfg.seed))
    check_data(train_ds, teacher.action_stats, recipe, k, "distillation data")
    if cfg.mode == "reasoning":
        check_data(train_ds, teacher.action_stats, get_recipe("ecot"), k, "distillation data")

    copied = None
    if student is None:
        if cfg.mode == "reasoning":
            student = copy.deepcopy(teacher) if cfg.init_from_teacher else build_student(teacher, {}, False, cfg.seed)[0]
        else:
            student, copied = build_student(teacher, cfg.student_model, cfg.init_from_teacher, cfg.seed)
    if student.processor.tokenizer.vocab_size != teacher.processor.tokenizer.vocab_size:
        raise EdgeVLAError("the student and the teacher use different tokenizers", "start the student from the teacher")
    student.action_stats = teacher.action_stats
    student.recipe_info = {**recipe.info(student.processor.tokenizer),
                           "distilled": {"mode": cfg.mode, "teacher_recipe": t_info.get("name")}}

    tok = student.processor.tokenizer
    first, n_bins = tok.first_action_id, tok.n_bins
    val_samples = val_ds[: cfg.val_max_samples] or train_ds[: cfg.val_max_samples]
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, True, None)
    atomic_write_text(out / "distill_config.json", json.dumps(asdict(cfg), indent=2))

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not show_progress)
    with progress:
        targets = val_targets = None
        if cfg.mode == "reasoning":
            task = progress.add_task("teacher reasons", total=len(train_ds) + len(val_samples), info="")
            step_progress = lambda: progress.advance(task)  # noqa: E731
            targets = reasoning_targets(teacher, train_ds, cfg.temperature, step_progress)
            val_targets = reasoning_targets(teacher, val_samples, cfg.temperature, step_progress)
            kl_before = action_kl(student, val_samples, val_targets, cfg.temperature)
        else:
            kl_before = sequence_kl(student, teacher, val_samples, recipe, cfg.temperature)
        log.write({"step": 0, "val/kl": kl_before})

        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        from edge_vla.train.config import TrainConfig

        sched_cfg = TrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(sched_cfg, get_recipe("vla")))
        rows = RecipeDataset(train_ds, recipe, student.processor, student.action_tokenizer, cfg.seed)
        collate = Collate(tok.pad_id, cfg.augment_shift, cfg.seed)
        batches = MicroBatches(len(train_ds), cfg.batch_size, 0, cfg.steps, cfg.seed,
                               stage_of=lambda m: recipe.stages[-1])
        task = progress.add_task(f"distil ({cfg.mode})", total=cfg.steps, info="")
        student.train()
        teacher.eval()
        t0 = time.perf_counter()
        for step, keys in enumerate(batches, start=1):
            batch = collate([rows[key] for key in keys])
            batch = {k2: v.to(student.device) for k2, v in batch.items()}
            if cfg.mode == "reasoning":
                s_out = student(**batch)
                where = _action_positions(batch["labels"], first, n_bins)
                s_block = s_out.logits[:, :-1][where][:, first:first + n_bins]
                t = torch.cat([targets[key[0]] for key in keys]).to(s_block.device)
                kl = _kl(t, s_block, cfg.temperature)
            else:
                kl, _, s_out = _sequence_kl(student, teacher, batch, cfg.temperature)
            loss = cfg.alpha * cfg.temperature ** 2 * kl + (1 - cfg.alpha) * s_out.loss
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(task, completed=step, info=f"kl {float(kl.detach()):.4f} loss {float(loss.detach()):.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write({"step": step, "train/kl": float(kl.detach()), "train/loss": float(loss.detach()),
                           "lr": scheduler.get_last_lr()[0]})
        wall = time.perf_counter() - t0
        if cfg.mode == "reasoning":
            kl_after = action_kl(student, val_samples, val_targets, cfg.temperature)
        else:
            kl_after = sequence_kl(student, teacher, val_samples, recipe, cfg.temperature)
    log.write({"step": cfg.steps, "val/kl": kl_after})
    log.close()
    final = student.save_pretrained(out / "final")
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    summary = {"mode": cfg.mode, "val_kl_before": kl_before, "val_kl_after": kl_after, "steps": cfg.steps,
               "teacher_params": n_params(teacher), "student_params": n_params(student),
               "tensors_initialised_from_teacher": copied, "wall_s": wall}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return final


__all__ = ["DistillConfig", "load_distill_config", "distill", "build_student", "init_from", "reasoning_targets", "action_kl", "sequence_kl",
           "MODES"]
