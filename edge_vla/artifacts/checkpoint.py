"""The checkpoint: a directory `VLA.save_pretrained` writes and `VLA.from_pretrained` reads.

    config.json          {"format": "edge-vla-checkpoint", ...VLAConfig}
    model.safetensors    the weights (never a pickle)
    tokenizer/           TextTokenizer.save
    action_stats.json    ActionStats: the one de-normalisation of actions
    recipe.json          how the recipe decodes at test time (runtime.Policy reads it)
    train_summary.json, base_train_summary.json   provenance: how it was trained

This module reads the format without torch, so a torch-free process (the bundle runtime, a
memory-fit check) can tell what a checkpoint is.
"""

from __future__ import annotations

from pathlib import Path

from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVLAError
from edge_vla.io import read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
STATS_FILE = "action_stats.json"
RECIPE_FILE = "recipe.json"
CHECKPOINT_FORMAT = "edge-vla-checkpoint"
# What a checkpoint computes does not depend on these: content digests skip them.
PROVENANCE_FILES = frozenset({"train_summary.json", "base_train_summary.json"})


def check_checkpoint_dir(p: Path) -> Path:
    """The config file of the checkpoint directory `p`, or one clear error saying what is missing."""
    if not p.exists():
        raise EdgeVLAError(f"checkpoint not found: {p}", "pass the directory written by `edge-vla train` or save_pretrained")
    if not p.is_dir():
        raise EdgeVLAError(f"checkpoint {p} is a file, expected a directory", "pass the checkpoint directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (p / name).is_file():
            raise EdgeVLAError(f"checkpoint {p} lacks {name}",
                               "pass a complete checkpoint directory (config.json + model.safetensors + tokenizer/)")
    return p / CONFIG_FILE


def load_config(path: str | Path) -> VLAConfig:
    """The model config of the checkpoint at `path` (its config.json, checked), without the weights."""
    p = Path(path)
    cfg_file = check_checkpoint_dir(p)
    meta = read_json(cfg_file, "re-save the checkpoint")
    if not isinstance(meta, dict) or meta.pop("format", None) != CHECKPOINT_FORMAT:
        raise EdgeVLAError(f"{p} is not an edge-vla checkpoint (config.json lacks format={CHECKPOINT_FORMAT!r})",
                           "pass a directory written by VLA.save_pretrained / edge-vla train")
    return VLAConfig.from_dict(meta, source=str(cfg_file))
