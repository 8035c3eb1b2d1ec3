"""Distillation: a student learns a teacher's distributions instead of (only) the data's labels.

    distill(config, teacher_ckpt, data, out_dir) -> out_dir/final

Two modes (`DistillConfig.mode`):

- `reasoning`: the teacher reasons (the deployed `Policy` in full mode over the teacher: its
  recipe's reasoning prefix forced, then its own chain of thought, greedily) and then scores the
  action tokens; the student, a direct-mode policy (the `vla` sequence: prompt ->
  " ACTION:" -> actions), learns that action distribution (KL on the action block). The fast path
  inherits what reasoning adds. The teacher's targets are computed once per sample, before
  training (reasoning is the expensive part), and written to OUT/teacher_targets as they are
  made (edge_vla.train.teacher_targets: a re-run computes only what is missing);
  `teacher_samples` caps them to a seeded subset of the training samples spread over every demo,
  and the student trains on that subset. The student starts as a copy of the teacher.
- `size`: a smaller student (the teacher's model config with `student_model` overrides, e.g.
  fewer LM layers or a narrower projector) learns the teacher's full next-token distributions on
  the teacher's own recipe sequences, online. It starts from the teacher's tensors wherever the
  shapes allow: same-named tensors of the same shape are copied, and a student with fewer layers
  takes evenly spaced teacher layers (first and last kept).

Resume: the run keeps the training loop's state (OUT/state, every `save_every` steps and at the
end) with what a resume must match (the config, the teacher's weights, the samples), so a run
killed anywhere and resumed (`resume=True`, `edge-vla distill --resume`) ends with the weights an
uninterrupted run ends with.

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the labels,
minimised by the one training loop (edge_vla.train.loop) with a distillation objective.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_vla.config import VLAConfig, apply_overrides, unknown_name_error
from edge_vla.errors import EdgeVLAError
from edge_vla.io import RUN_KIND, atomic_write_text, replace_output_dir
from edge_vla.tokens.sequence import IGNORE, action_prefix_ids
from edge_vla.train.data import Collate, RecipeDataset, check_data, open_split
from edge_vla.train.loop import (STATE_DIR, LoopSettings, MetricsLog, Objective, TrainLoop, lr_lambda_for,
                                 make_accelerator, save_checkpoint, saved_run)
from edge_vla.train.recipes import DEFAULT_MAX_REASONING_TOKENS, get_recipe
from edge_vla.train.teacher_targets import (TARGETS_DIR, TeacherTarget, draw_subset, samples_digest, stored_targets,
                                            teacher_digest)

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
    weight_decay: float = 0.01  # AdamW's default, what distillation has always used
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
    save_every: int = 0  # training state + checkpoint every N steps; 0 = the state only at the end
    # Reasoning mode: the teacher reasons on this many training samples (a seeded subset spread over
    # the demos; the student trains on it), None = all of them.
    teacher_samples: int | None = None
    teacher_chunk: int = 256  # teacher targets are written every this many samples
    seed: int = 0

    # Keys that may change between a run and its resume (as for training).
    RESUMABLE_CHANGES = ("steps", "save_every", "log_every")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise unknown_name_error("distillation mode", self.mode, MODES)
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise EdgeVLAError(f"distill: alpha must be in [0, 1] and temperature > 0 (got {self.alpha}, {self.temperature})")
        for k in ("batch_size", "steps", "teacher_chunk"):
            if not _is_int(getattr(self, k)) or getattr(self, k) < 1:
                raise EdgeVLAError(f"distill: {k} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("save_every", "log_every"):
            if not _is_int(getattr(self, k)) or getattr(self, k) < 0:
                raise EdgeVLAError(f"distill: {k} must be an integer >= 0, got {getattr(self, k)!r}")
        if self.teacher_samples is not None and (not _is_int(self.teacher_samples) or self.teacher_samples < 1):
            raise EdgeVLAError(f"distill: teacher_samples must be a positive integer or null (all), got "
                               f"{self.teacher_samples!r}")
        if self.mode == "reasoning" and self.student_model:
            raise EdgeVLAError("distill: student_model overrides apply to size distillation",
                               "use --mode size, or drop the student overrides")
        if self.mode == "size" and self.teacher_samples is not None:
            raise EdgeVLAError("distill: teacher_samples caps reasoning distillation's precomputed teacher targets; "
                               "size distillation runs the teacher online, on every training batch",
                               "drop teacher_samples (steps and batch_size set the teacher's work in size mode)")

    def fingerprint(self) -> dict:
        """The part of the config a resumed run must share with the run it resumes."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                raise unknown_name_error("distill config key", k, known)
        cfg = cls(**d)
        cfg.validate()
        return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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

    from edge_vla.model.vla import VLA, build_vision_tower, hf_config

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
    vision = build_vision_tower(cfg)  # the fused Prismatic backbone too
    lm = AutoModelForCausalLM.from_config(hf_config(dict(cfg.lm, vocab_size=tok.vocab_size), "language model"))
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
def reasoning_policy(teacher):
    """The teacher as deployed, asked to reason: the Policy in full mode over the teacher itself
    (its recipe's reasoning prefix forced, " ACTION:" forced when its reasoning budget runs out)."""
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    options = (teacher.recipe_info or {}).get("options", {})
    return Policy(TorchBackend(teacher), mode="full",
                  max_free_tokens=int(options.get("max_reasoning_tokens", DEFAULT_MAX_REASONING_TOKENS)))


def _own_reasoning(policy, sample) -> list[int]:
    from edge_vla.data.observations import sample_to_obs

    ids = list(policy.act(sample_to_obs(sample)).info["free_token_ids"])
    prefix = action_prefix_ids(policy.tokenizer)
    # " ACTION:" is not among the free tokens when the Policy forced it (budget or eos) or the
    # model went straight to an action token: the student's targets always follow it.
    return ids if ids[-len(prefix):] == prefix else ids + prefix


@torch.no_grad()
def reasoning_targets(teacher, samples, temperature: float = 1.0, progress=None, policy=None) -> list[TeacherTarget]:
    """For each sample: the teacher's own reasoning (decoded by `reasoning_policy`) and its
    action-block log-probs after it, the target actions teacher-forced, so the student learns the
    teacher's belief at every action position. `progress()` is called after each sample."""
    policy = policy or reasoning_policy(teacher)
    tok = teacher.processor.tokenizer
    first, n_bins = tok.first_action_id, tok.n_bins
    out = []
    for s in samples:
        reasoning = _own_reasoning(policy, s)
        pv, ids, st = teacher.model_inputs(s.images, s.instruction, s.state)
        acts = teacher.action_tokenizer.encode(np.asarray(s.action)).reshape(-1).tolist()
        seq = torch.tensor([ids[0].tolist() + reasoning + acts], device=teacher.device)
        logits = teacher(pv, seq, state=st).logits[0]
        n = len(acts)
        pos = seq.shape[1] - n - 1  # the logits at position i predict token i + 1
        block = logits[pos:pos + n, first:first + n_bins].float() / temperature
        out.append(TeacherTarget(reasoning, F.log_softmax(block, -1).cpu()))
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


# --- the objectives -------------------------------------------------------------------------------
class _Distillation(Objective):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the labels' cross-entropy."""

    def __init__(self, cfg: DistillConfig, val_samples: list):
        self.cfg, self.val_samples = cfg, val_samples

    def mix(self, kl: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        return self.cfg.alpha * self.cfg.temperature ** 2 * kl + (1 - self.cfg.alpha) * hard


class ReasoningDistillation(_Distillation):
    """A direct-mode student learns the teacher's action distribution after the teacher's own
    reasoning (precomputed `TeacherTarget`s, keyed by sample index)."""

    def __init__(self, cfg, tokenizer, targets: list[TeacherTarget], val_samples, val_targets: list[TeacherTarget]):
        super().__init__(cfg, val_samples)
        self.first, self.n_bins = tokenizer.first_action_id, tokenizer.n_bins
        self.targets, self.val_targets = targets, val_targets

    def loss(self, model, batch, index):
        out = model(**batch)
        where = _action_positions(batch["labels"], self.first, self.n_bins)
        s_block = out.logits[:, :-1][where][:, self.first:self.first + self.n_bins]
        t = torch.cat([self.targets[i].action_logp for i in index.tolist()]).to(s_block.device)
        kl = _kl(t, s_block, self.cfg.temperature)
        return self.mix(kl, out.loss), {"kl": kl}

    def validate(self, model, step):
        return {"kl": action_kl(model, self.val_samples, [t.action_logp for t in self.val_targets],
                                self.cfg.temperature)}


class SizeDistillation(_Distillation):
    """A smaller student learns the teacher's full next-token distributions on the recipe's
    sequences, online."""

    def __init__(self, cfg, teacher, recipe, val_samples):
        super().__init__(cfg, val_samples)
        self.teacher, self.recipe = teacher.eval(), recipe

    def loss(self, model, batch, index):
        kl, _, out = _sequence_kl(model, self.teacher, batch, self.cfg.temperature)
        return self.mix(kl, out.loss), {"kl": kl}

    def validate(self, model, step):
        return {"kl": sequence_kl(model, self.teacher, self.val_samples, self.recipe, self.cfg.temperature)}


# --- the run --------------------------------------------------------------------------------------
def _open_teacher(teacher, mode: str):
    """(the teacher VLA, the recipe the student trains on)."""
    from edge_vla.model.vla import VLA

    if not isinstance(teacher, torch.nn.Module):
        teacher = VLA.from_pretrained(teacher)
    if teacher.action_stats is None:
        raise EdgeVLAError("the teacher checkpoint has no action statistics", "distil from a trained checkpoint")
    info = teacher.recipe_info or {}
    if mode == "size":
        return teacher, get_recipe(info["name"], **info.get("options", {})) if info.get("name") else get_recipe("vla")
    if info.get("name") not in REASONING_TEACHERS:
        raise EdgeVLAError(f"reasoning distillation needs a teacher trained to reason (recipe `{info.get('name')}`)",
                           "use a teacher trained with --recipe ecot or ecot-lite-dropout, or --mode size")
    return teacher, get_recipe("vla")


def _open_student(cfg: DistillConfig, teacher, recipe, student):
    """(the student, how many of its tensors came from the teacher (size mode), else None)."""
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
                           "distilled": {"mode": cfg.mode, "teacher_recipe": (teacher.recipe_info or {}).get("name")}}
    return student, copied


def _progress_bar(show: bool, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not show)


def teacher_targets(teacher, splits: dict[str, list], directory, chunk: int, show_progress: bool = True,
                    progress=None, teacher_fp: str | None = None):
    """The teacher's targets (temperature 1) for every split ({name: samples}), through the
    resumable store in `directory` (edge_vla.train.teacher_targets). `progress(done, total)` is
    called after every sample (a test stops the computation from it). Returns (targets per split,
    {"samples", "computed", "seconds"})."""
    policy = reasoning_policy(teacher)
    bar = _progress_bar(show_progress, "teacher reasons")
    with bar:
        task = bar.add_task("teacher reasons", total=sum(len(v) for v in splits.values()))

        def report(done, total):
            bar.update(task, completed=done)
            if progress is not None:
                progress(done, total)

        return stored_targets(directory, splits, teacher_fp or teacher_digest(teacher), chunk,
                              lambda part, advance: reasoning_targets(teacher, part, 1.0, advance, policy), report)


def _at_temperature(targets: list[TeacherTarget], temperature: float) -> list[TeacherTarget]:
    """Targets stored at temperature 1, re-softened: log_softmax(logp / T) is the teacher's
    log-probs at T (logp differs from the logits by a per-row constant)."""
    if temperature == 1.0:
        return targets
    return [TeacherTarget(t.reasoning_ids, F.log_softmax(t.action_logp / temperature, -1)) for t in targets]


# --- resume ---------------------------------------------------------------------------------------
def _open_run(out: Path, resume: bool, overwrite: bool, inputs) -> dict | None:
    """The run's saved state (its trainer.json) when resuming; refuses what train refuses."""

    if overwrite and resume:
        raise EdgeVLAError("--overwrite starts the run over and --resume continues it", "pass one of them")
    replace_output_dir(out, RUN_KIND, overwrite, inputs)
    saved = None if overwrite else saved_run(out)
    if (out / "final").exists() and not (resume and saved is not None):
        raise EdgeVLAError(f"{out} already holds a distilled checkpoint", "choose another --out, or pass --overwrite")
    if saved is not None and not resume:
        raise EdgeVLAError(f"{out} holds a resumable distillation state",
                           "pass --resume to continue it, --overwrite to start over, or choose another --out")
    return saved


def _check_resume(saved: dict, mine: dict, out: Path) -> None:
    """`mine`: the state meta of this run (config fingerprint, teacher, samples)."""
    if "distill_fingerprint" not in saved:
        raise EdgeVLAError(f"cannot resume {out}: its state is a training run's, not a distillation's",
                           "resume it with `edge-vla train --resume`, or distil into a new --out")
    a, b = saved["distill_fingerprint"], mine["distill_fingerprint"]
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        raise EdgeVLAError(f"cannot resume {out}: the config differs from the run's ({detail})",
                           f"resume with the same config (only {', '.join(DistillConfig.RESUMABLE_CHANGES)} may "
                           "change), or distil into a new --out")
    if saved.get("teacher_digest") != mine["teacher_digest"]:
        raise EdgeVLAError(f"cannot resume {out}: the teacher differs from the run's (its weights, statistics or "
                           "recipe)", "resume with the same --teacher, or distil into a new --out")
    if saved.get("train_samples_digest") != mine["train_samples_digest"]:
        raise EdgeVLAError(f"cannot resume {out}: the training samples differ from the run's (the data changed)",
                           "resume on the same --data, or distil into a new --out")


def _finished(saved: dict, cfg: DistillConfig, out: Path) -> bool:
    return int(saved["step"]) >= cfg.steps and (out / "final").is_dir() and (out / "summary.json").is_file()


# --- the run --------------------------------------------------------------------------------------
def distill(config: DistillConfig, teacher, data, out_dir, student=None, show_progress: bool = True,
            overwrite: bool = False, resume: bool = False, stop_at_step: int | None = None,
            command: str | None = None, teacher_progress=None) -> Path:
    """Distil `teacher` (a checkpoint path or a VLA) into a student; returns out_dir/final.

    `student`: a VLA to start from (else built per the config: a copy of the teacher for
    reasoning distillation, the teacher's config + `student_model` overrides for size). The run
    trains in the one training loop (edge_vla.train.loop) and keeps its resumable state in
    out_dir/state: `resume` continues it exactly; `stop_at_step` ends the run after that step with
    its state saved, as a pre-emption would (returns out_dir/state). Reasoning mode keeps the
    teacher's targets in out_dir/teacher_targets, and a re-run (resumed or not) computes only
    those missing; `teacher_progress(done, total)` is called after each. `out_dir` may be missing,
    empty or this run's; `overwrite` deletes anything else there (never the teacher or the data).
    `command`: the command line, recorded in summary.json.
    """
    cfg = config
    cfg.validate()
    out = Path(out_dir)
    saved = _open_run(out, resume, overwrite, [p for p in (teacher, data) if isinstance(p, (str, Path))])
    teacher, recipe = _open_teacher(teacher, cfg.mode)
    k = teacher.config.action_chunk
    cams = teacher.config.cameras  # what the teacher sees (a released VLA: one 3rd-person camera)
    # A dataset on disk is read lazily: only the samples the run uses are loaded (a capped teacher's
    # subset, not the whole dataset's images).
    train_all = open_split(data, "train", cfg.val_fraction, k, cfg.drop_noops, cfg.seed, cams)
    val_all = open_split(data, "val", cfg.val_fraction, k, cfg.drop_noops, cfg.seed, cams)
    check_data(train_all, teacher.action_stats, recipe, k, "distillation data")
    if cfg.mode == "reasoning":
        check_data(train_all, teacher.action_stats, get_recipe("ecot"), k, "distillation data")
    val_from = val_all if len(val_all) else train_all
    val_samples = [val_from[i] for i in range(min(len(val_from), cfg.val_max_samples))]
    # Reasoning: the student trains on the samples the teacher reasoned on.
    keep = draw_subset(len(train_all), cfg.teacher_samples if cfg.mode == "reasoning" else None, cfg.seed)
    train_ds = [train_all[i] for i in keep]
    teacher_fp = teacher_digest(teacher)
    # (Not "samples": the loop's clock records its sample count under that name.)
    meta = {"distill_fingerprint": cfg.fingerprint(), "config": asdict(cfg), "teacher_digest": teacher_fp,
            "train_samples_digest": samples_digest(train_ds)}
    if saved is not None:
        _check_resume(saved, meta, out)
        if _finished(saved, cfg, out):
            return out / "final"  # a resume of a finished run is a no-op
    student, copied = _open_student(cfg, teacher, recipe, student)

    settings = LoopSettings.of(cfg)
    accelerator = make_accelerator(settings)
    main = accelerator.is_main_process
    teacher.to(accelerator.device)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_text(out / "distill_config.json", json.dumps(asdict(cfg), indent=2))
    teacher_cost = None
    if cfg.mode == "reasoning":
        found, teacher_cost = teacher_targets(teacher, {"train": train_ds, "val": val_samples}, out / TARGETS_DIR,
                                              cfg.teacher_chunk, show_progress, teacher_progress, teacher_fp)
        objective = ReasoningDistillation(cfg, student.processor.tokenizer,
                                          _at_temperature(found["train"], cfg.temperature), val_samples,
                                          _at_temperature(found["val"], cfg.temperature))
    else:
        objective = SizeDistillation(cfg, teacher, recipe, val_samples)
    # One learning-rate stage: a multi-stage teacher recipe's stage switch is not the student's.
    loop = TrainLoop(settings, accelerator, student, objective, out, lr_lambda_for(settings, get_recipe("vla")),
                     lambda step: recipe.stages[-1], f"distil ({cfg.mode})", lambda: meta)
    log = MetricsLog(out, main, int(saved["step"]) if saved is not None else None)
    if saved is not None:
        loop.restore(saved)
        meta["val_kl_before"] = saved.get("val_kl_before")
    else:
        meta["val_kl_before"] = loop.validate(0, log).get("kl")
    rows = RecipeDataset(train_ds, recipe, student.processor, student.action_tokenizer, cfg.seed)
    step = loop.run(rows, log, stop_at_step, show_progress=show_progress)
    wall = loop.clock()["wall_s"]
    if step < cfg.steps:  # stopped early on purpose: the state is saved, no final checkpoint
        log.close()
        return out / STATE_DIR
    kl_after = loop.validate(cfg.steps, log).get("kl")
    log.close()
    final = out / "final"
    if main:
        save_checkpoint(loop.unwrapped, final, lora=False)
        n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        summary = {"mode": cfg.mode, "val_kl_before": meta["val_kl_before"], "val_kl_after": kl_after,
                   "steps": cfg.steps, "teacher_params": n_params(teacher), "student_params": n_params(loop.unwrapped),
                   "tensors_initialised_from_teacher": copied, "wall_s": wall, "n_train": len(train_ds),
                   "command": command, "config": asdict(cfg)}
        if teacher_cost is not None:
            summary["teacher_targets"] = {**teacher_cost,
                                          "s_per_sample": teacher_cost["seconds"] / max(teacher_cost["samples"], 1)}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return final


__all__ = ["DistillConfig", "load_distill_config", "distill", "build_student", "init_from", "reasoning_targets",
           "reasoning_policy", "teacher_targets", "TeacherTarget", "ReasoningDistillation", "SizeDistillation",
           "action_kl", "sequence_kl", "MODES"]
