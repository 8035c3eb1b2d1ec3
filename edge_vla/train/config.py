"""TrainConfig: everything a training run needs besides the data, as one dataclass.

Loads from YAML/JSON and takes dotted overrides (`--set lr=1e-3 --set recipe_options.p=0.3
--set model.lm.num_hidden_layers=2`). `model` holds overrides of the preset's model config
(dotted keys -> values) and `recipe_options` the recipe's options; both are free-form here and
checked by the preset and the recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from edge_vla.config import apply_overrides, parse_override_value, load_config_file, unknown_name_error
from edge_vla.errors import EdgeVLAError


@dataclass
class TrainConfig:
    recipe: str = "vla"
    recipe_options: dict = field(default_factory=dict)
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # {"lm.num_hidden_layers": 2, ...} on top of the preset
    init_from: str | None = None  # start from this checkpoint's weights instead of the preset's init
    action_chunk: int = 1
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # per process, per micro-batch
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    bf16: str | bool = "auto"  # "auto": bf16 autocast where the GPU supports it; True/False force it
    freeze_vision: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters on the LM's attention/MLP instead of the whole LM
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # data
    augment_shift: int = 4  # random shift of +-N px (on the model's image grid), in the collate; 0 = off
    val_fraction: float = 0.1
    drop_noops: bool = True
    num_workers: int = 0
    # Run each micro-batch as groups of rows of similar length, each padded only to its own longest
    # row, with each group's loss weighted by its share of the supervised tokens: the padded batch's
    # loss and gradient (up to float rounding) without the work on padding. A reasoning-dropout
    # batch mixes ~60-token and ~300-token rows, so it costs about half as much.
    split_by_length: bool = True
    # bookkeeping
    eval_every: int = 0  # 0 = only at the end
    val_max_samples: int = 64
    save_every: int = 0  # training state + checkpoint every N steps; 0 = only at the end
    log_every: int = 10
    seed: int = 0

    # Keys that may change between a run and its resume (they do not change the weights' path).
    RESUMABLE_CHANGES = ("steps", "eval_every", "val_max_samples", "save_every", "log_every", "num_workers")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "train config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise EdgeVLAError(f"{source} must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in known:
                raise unknown_name_error(f"key in {source}", k, known)
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "train config") -> None:
        positive = ("batch_size", "grad_accum", "steps", "action_chunk")
        for k in positive:
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise EdgeVLAError(f"{source}: {k} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("warmup_steps", "eval_every", "save_every", "log_every", "augment_shift", "lora_rank", "num_workers"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise EdgeVLAError(f"{source}: {k} must be an integer >= 0, got {getattr(self, k)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise EdgeVLAError(f"{source}: lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise EdgeVLAError(f"{source}: val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.bf16 not in ("auto", True, False):
            raise EdgeVLAError(f"{source}: bf16 must be auto, true or false, got {self.bf16!r}")
        if not isinstance(self.split_by_length, bool):
            raise EdgeVLAError(f"{source}: split_by_length must be true or false, got {self.split_by_length!r}")
        if not isinstance(self.model, dict) or not isinstance(self.recipe_options, dict):
            raise EdgeVLAError(f"{source}: `model` and `recipe_options` must be mappings")

    def model_overrides(self) -> list[str]:
        import json

        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.model.items()]

    def fingerprint(self) -> dict:
        """The part of the config a resumed run must share with the run it resumes."""
        d = self.to_dict()
        for k in self.RESUMABLE_CHANGES:
            d.pop(k, None)
        return d


def load_train_config(path: str | Path | None = None, overrides: list[str] = (), **base) -> TrainConfig:
    """Defaults <- `base` (e.g. CLI --recipe/--preset) <- config file <- dotted overrides."""
    d = TrainConfig(**{k: v for k, v in base.items() if v is not None}).to_dict()
    if path is not None:
        file_d = load_config_file(path)
        known = [f.name for f in dataclasses.fields(TrainConfig)]
        for k in file_d:
            if k not in known:
                raise unknown_name_error(f"key in {path}", k, known)
        d.update(file_d)
    d = merge_overrides(d, overrides, free_sections=("model", "recipe_options"))
    return TrainConfig.from_dict(d, source=str(path) if path else "train config")


def merge_overrides(d: dict, overrides, free_sections=()) -> dict:
    """Apply `key=value` overrides; keys below a free-form section (`model.lm.x=1`) are accepted
    as they are and checked later by whoever reads that section."""
    plain = []
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise EdgeVLAError(f"override `{item}` has no `=`", "write overrides as key=value, e.g. lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        for section in free_sections:
            if key.startswith(section + "."):
                d[section] = dict(d.get(section) or {})
                d[section][key[len(section) + 1:]] = parse_override_value(raw.strip())
                break
        else:
            plain.append(item)
    return apply_overrides(d, plain)


__all__ = ["TrainConfig", "load_train_config", "merge_overrides"]
