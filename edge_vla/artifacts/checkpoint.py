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


def training_summary(checkpoint: str | Path) -> dict | None:
    """How the checkpoint was trained: the summary a shipped checkpoint carries as train_summary.json,
    else the one its live run keeps beside `final/`; None when neither exists."""
    ckpt = Path(checkpoint)
    for f in (ckpt / "train_summary.json", ckpt.parent / "summary.json"):
        if f.is_file():
            return read_json(f, f"fix or remove {f}, or re-run the training that wrote it")
    return None


# safetensors dtype names of the tensors a checkpoint holds (the file format's own spelling).
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32",
                      "uint8": "U8", "int8": "I8", "bool": "BOOL", "float64": "F64"}


def write_safetensors_streaming(path: str | Path, entries, metadata: dict | None = None) -> int:
    """Write a safetensors file tensor by tensor: `entries` is a list of (name, dtype name, shape,
    produce) where `produce()` returns that tensor (torch, or numpy). Only one produced tensor is
    alive at a time, so a 7B checkpoint is written without holding it: the header (names, shapes,
    offsets) is known before any tensor is read. Returns the bytes written. Writers call it inside
    edge_vla.io.atomic_directory, which makes the file appear whole or not at all."""
    import json
    import math

    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    sizes = []
    for name, dtype, shape, _ in entries:
        st = SAFETENSORS_DTYPES.get(str(dtype).replace("torch.", ""))
        if st is None:
            raise EdgeVLAError(f"tensor {name} has dtype {dtype}, which a checkpoint does not store",
                               f"use one of {', '.join(SAFETENSORS_DTYPES)}")
        n = math.prod(int(d) for d in shape) * _ITEMSIZE[st]
        header[name] = {"dtype": st, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, dtype, shape, produce), n in zip(entries, sizes):
            data = _raw_bytes(produce(), dtype, shape, name)
            if len(data) != n:
                raise EdgeVLAError(f"tensor {name} produced {len(data)} bytes, its header says {n}",
                                   "report this: the writer's plan and the tensor disagree")
            f.write(data)
    return 8 + len(blob) + offset


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "F64": 8}


def _raw_bytes(t, dtype, shape, name) -> memoryview:
    if hasattr(t, "detach"):  # torch: bfloat16 has no numpy dtype, its bytes are viewed as uint8
        import torch

        want = getattr(torch, str(dtype).replace("torch.", ""))
        t = t.detach().to("cpu", want).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise EdgeVLAError(f"tensor {name} has shape {tuple(t.shape)}, its header says {tuple(shape)}",
                               "report this: the writer's plan and the tensor disagree")
        return memoryview(t.view(torch.uint8).numpy() if t.numel() else b"").cast("B")
    import numpy as np

    a = np.ascontiguousarray(t, dtype=str(dtype))
    if tuple(a.shape) != tuple(shape):
        raise EdgeVLAError(f"tensor {name} has shape {a.shape}, its header says {tuple(shape)}",
                           "report this: the writer's plan and the tensor disagree")
    return memoryview(a).cast("B")
