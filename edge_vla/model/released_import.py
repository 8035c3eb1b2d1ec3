"""`edge-vla import`: a released checkpoint written as an edge-vla checkpoint, one tensor at a time.

Apart from edge_vla.model.importers (which reads the layouts and which VLA.from_released uses)
because it builds the VLA on the meta device to know every name and shape it must write.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_vla.errors import EdgeVLAError
from edge_vla.model.importers import read_released


def import_released(src, out, unnorm_key: str | None = None, llm=None, ecot: bool = False, gripper: str = "auto",
                    center_crop: bool | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """`edge-vla import`: the released checkpoint at `src` written as an edge-vla checkpoint at `out`,
    one tensor at a time: each is read from its memory-mapped shard, checked against the VLA the
    config builds (names and shapes, on the meta device) and appended to model.safetensors in its
    released dtype (bfloat16 for openvla-7b; `dtype` "float16" halves float32 ones), so a 7B model is
    never in memory. from_pretrained casts the weights to float32 on load, as for any checkpoint.

    Models with tied input/output embeddings (MiniVLA's Qwen2.5) are converted in memory
    (VLA.from_released(...).save_pretrained): safetensors stores their one shared tensor under the
    name it picks, which that writer knows."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from edge_vla.artifacts.checkpoint import (CHECKPOINT_FORMAT, CONFIG_FILE, RECIPE_FILE, STATS_FILE, TOKENIZER_DIR,
                                               WEIGHTS_FILE, write_safetensors_streaming)
    from edge_vla.io import atomic_directory
    from edge_vla.model.vla import VLA, build_vision_tower, hf_config

    r = read_released(src, unnorm_key, llm, ecot, gripper, center_crop, lazy=True)
    lm_cfg = hf_config(r.config.lm, "language model")
    if getattr(lm_cfg, "tie_word_embeddings", False):
        vla = VLA.from_released(src, unnorm_key=unnorm_key, llm=llm, ecot=ecot, gripper=gripper, center_crop=center_crop)
        return vla.save_pretrained(out, dtype=getattr(torch, dtype) if dtype else None)
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(lm_cfg)
        model = VLA(r.config, build_vision_tower(r.config), lm, r.tokenizer, r.stats)
    w = r.weights
    emb = "lm.model.embed_tokens.weight"
    entries, missing = [], []
    for k, t in model.state_dict().items():
        shape = tuple(t.shape)
        if k == "camera_embed":  # a released model has none: zero, as from_released sets it
            produce, stored = (lambda s=shape: torch.zeros(s)), "float32"
        elif k == "first_token_embed":  # the first prefix row is that token's embedding
            first = r.tokenizer.bos_id
            if first is None:
                raise EdgeVLAError(f"{r.path}: the image follows the prompt's first token, but its tokenizer names none",
                                   "download the tokenizer files of the same release")
            produce, stored = (lambda f=first: w.rows(emb, f, f + 1)), w.dtype(emb)
        elif k in w:
            if w.shape(k) != shape:
                raise EdgeVLAError(f"the weights of {r.path} do not fit its config ({k}: {w.shape(k)} in the checkpoint, "
                                   f"{shape} from config.json)", "download the config and the weights of the same release")
            produce, stored = (lambda k=k: w[k]), w.dtype(k)
        elif not t.is_meta:  # a persistent buffer computed from the config
            produce, stored = (lambda t=t: t), str(t.dtype).replace("torch.", "")
        else:
            missing.append(k)
            continue
        if dtype and stored in ("float32", "bfloat16", "float16"):
            stored = dtype
        entries.append((k, stored, shape, produce))
    unexpected = sorted(set(w) - {e[0] for e in entries})
    if missing or unexpected:
        raise EdgeVLAError(f"the weights of {r.path} do not match its config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})",
                           "download every shard, and the config.json of the same release")
    with atomic_directory(out, CHECKPOINT_FORMAT, overwrite, [src] if Path(str(src)).exists() else []) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **r.config.to_dict()}, indent=2))
        write_safetensors_streaming(tmp / WEIGHTS_FILE, entries)
        r.tokenizer.save(tmp / TOKENIZER_DIR)
        r.stats.save(tmp / STATS_FILE)
        (tmp / RECIPE_FILE).write_text(json.dumps(r.recipe_info, indent=2))
    return Path(out)


__all__ = ["import_released"]
