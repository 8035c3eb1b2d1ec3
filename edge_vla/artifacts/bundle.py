"""The bundle: a directory the runtime loads without torch.

    manifest.json   format, schema_version, model_config, graphs (file, inputs, outputs,
                    precision), action_stats, recipe, target, parity, accuracy, files (sha256)
    tokenizer/      tokenizer.json + edge_vla_tokens.json (TextTokenizer.save)
    *.onnx          prefix (vision + projector + proprio), embed, decoder (the body: KV cache as
                    tensors, hidden state out, no LM head), lm_head (hidden -> full logits, free
                    tokens only), action_head (the fused restricted head: every action token)
    engines/        optional, e.g. TensorRT engines built on the target

`write_bundle` writes atomically; `load_bundle` checks the schema and the sha256 of every
file and names exactly what is wrong. Imports: numpy/json/tokenizers only (runtime path).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_directory, read_json, sha256_file
from edge_vla.tokens.action import ActionStats

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "edge-vla-bundle"
# 2: the LM head left the decoder graph (lm_head.onnx) and action_head.onnx is required. Version 1
# bundles (decoder.onnx with logits inside) are refused with a re-export hint.
BUNDLE_SCHEMA_VERSION = 2
# Decoder output of parallel-decoding bundles: every new position's hidden state (B, T, H).
HIDDEN_ALL = "hidden_all"
# Input of the fused decoder (manifest: graphs.decoder.cache_length): the KV cache's length (1,) int64, so that a
# runtime may bind one preallocated buffer per layer as both past_* and present_* (the cache kept in place).
PAST_LEN = "past_len"
TOKENIZER_DIR = "tokenizer"
GRAPH_ROLES = ("prefix", "embed", "decoder", "lm_head", "action_head")


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def config(self) -> VLAConfig:
        return VLAConfig.from_dict(dict(self.manifest["model_config"]), source=f"{self.path / MANIFEST} model_config")

    @property
    def action_stats(self) -> ActionStats:
        return ActionStats.from_dict(self.manifest["action_stats"], source=f"{self.path / MANIFEST} action_stats")

    @property
    def recipe(self) -> dict:
        return dict(self.manifest.get("recipe") or {})

    @property
    def graphs(self) -> dict:
        return self.manifest["graphs"]

    def graph_path(self, role: str) -> Path:
        return self.path / self.graphs[role]["file"]

    def tokenizer(self):
        from edge_vla.tokens.text import TextTokenizer

        return TextTokenizer.load(self.path / TOKENIZER_DIR)

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.manifest["files"])


def decoder_feeds(decoder: dict, inputs_embeds, past) -> dict:
    """The feeds of a bundle's decoder graph (`decoder`: the manifest's graphs.decoder) for new positions
    `inputs_embeds` after the cache `past` (the past_* arrays in the manifest's order); a decoder that takes
    the cache's length as an input (`cache_length`, the fused one) gets the past arrays' own length."""
    import numpy as np

    names = decoder["inputs"]
    feeds = {names[0]: inputs_embeds, **dict(zip(names[1:], past))}
    if decoder.get("cache_length"):
        feeds[decoder["cache_length"]] = np.array([past[0].shape[2]], np.int64)
    return feeds


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_bundle(path: str | Path, staging: str | Path, manifest: dict, overwrite: bool = False,
                 inputs=()) -> Bundle:
    """Move the files of `staging` (graphs, tokenizer/, engines/) into `path` with a manifest, atomically.

    `manifest` holds everything but `format`, `schema_version` and `files`, which are filled here.
    `path` may be missing, empty or a bundle; anything else only with `overwrite`, and never one
    of `inputs` (edge_vla.io.atomic_directory).
    """
    staging = Path(staging)
    for role in GRAPH_ROLES:
        g = manifest.get("graphs", {}).get(role)
        if g is None or not (staging / g["file"]).is_file():
            raise EdgeVLAError(f"cannot write the bundle: the {role} graph is missing",
                               f"export all of {list(GRAPH_ROLES)} first")
    if not (staging / TOKENIZER_DIR / "tokenizer.json").is_file():
        raise EdgeVLAError("cannot write the bundle: tokenizer/ is missing")
    with atomic_directory(path, kind=BUNDLE_FORMAT, overwrite=overwrite, inputs=inputs) as tmp:
        for item in staging.iterdir():
            if item.name == MANIFEST:
                continue
            dst = tmp / item.name
            shutil.copytree(item, dst) if item.is_dir() else shutil.copy2(item, dst)
        full = {"format": BUNDLE_FORMAT, "schema_version": BUNDLE_SCHEMA_VERSION, **manifest, "files": _hash_tree(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2))
    return load_bundle(path)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    p = Path(path)
    if not p.is_dir():
        raise EdgeVLAError(f"bundle not found: {p}", "pass the directory written by `edge-vla export`")
    mf = p / MANIFEST
    if not mf.is_file():
        raise EdgeVLAError(f"{p} is not an edge-vla bundle (no {MANIFEST})", "pass a directory written by `edge-vla export`")
    m = read_json(mf, "re-export the bundle")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise EdgeVLAError(f"{mf} lacks format={BUNDLE_FORMAT!r}: not an edge-vla bundle", "re-export the bundle")
    if m.get("schema_version") == 1:
        raise EdgeVLAError(f"bundle {p} has schema version 1 (its decoder.onnx computes the full-vocabulary logits; "
                           f"this edge-vla reads version {BUNDLE_SCHEMA_VERSION}: decoder body + lm_head.onnx + "
                           "action_head.onnx)", "re-export it from its checkpoint: edge-vla export CKPT -o BUNDLE")
    if m.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        raise EdgeVLAError(f"bundle {p} has schema version {m.get('schema_version')!r}, this edge-vla reads "
                           f"{BUNDLE_SCHEMA_VERSION}", "re-export it with this version of edge-vla")
    for key in ("model_config", "graphs", "action_stats", "files"):
        if not isinstance(m.get(key), dict):
            raise EdgeVLAError(f"{mf} lacks `{key}`", "re-export the bundle")
    for rel in m["files"]:
        _check_inside(p, rel, mf)
    for role in GRAPH_ROLES:
        g = m["graphs"].get(role)
        if not isinstance(g, dict) or not isinstance(g.get("file"), str):
            raise EdgeVLAError(f"{mf} names no `{role}` graph", "re-export the bundle")
        if g["file"] not in m["files"]:
            raise EdgeVLAError(f"{mf}: the {role} graph {g['file']} has no sha256 entry", "re-export the bundle")
    engines = m.get("engines") or {}
    if not isinstance(engines, dict) or not all(isinstance(e, dict) and e.get("file") in m["files"]
                                                for e in engines.values()):
        raise EdgeVLAError(f"{mf}: an `engines` record names no file of the bundle's `files`",
                           "rebuild the engines with `edge-vla build-engine`, or re-export the bundle")
    if verify:
        for rel, digest in m["files"].items():
            f = p / rel
            if not f.is_file():
                raise EdgeVLAError(f"bundle {p} is missing {rel}", "copy the whole bundle directory, or re-export it")
            if sha256_file(f) != digest:
                raise EdgeVLAError(f"bundle file {rel} in {p} was changed (sha256 mismatch)",
                                   "restore the original file or re-export the bundle")
        listed = set(m["files"])
        extra = [str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and f.name != MANIFEST
                 and str(f.relative_to(p)) not in listed]
        if any(e.endswith(".onnx") or e.startswith("engines/") for e in extra):
            raise EdgeVLAError(f"bundle {p} holds graph/engine files not in its manifest: {sorted(extra)[:3]}",
                               "remove them or re-export the bundle")
    return Bundle(p, m)


def _check_inside(root: Path, rel, manifest: Path) -> None:
    """A manifest names files inside its bundle only: reading (or hashing) a path the manifest
    chose would otherwise reach anywhere on the machine."""
    from pathlib import PurePosixPath, PureWindowsPath

    bad = (not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel
           or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive
           or ".." in PurePosixPath(rel).parts)
    if not bad:
        try:
            (root / rel).resolve().relative_to(root.resolve())  # a symlink out of the bundle
        except ValueError:
            bad = True
    if bad:
        raise EdgeVLAError(f"{manifest} lists a file outside the bundle ({str(rel)[:80]!r}): refused",
                           "file paths in a manifest are relative and stay inside the bundle; re-export the bundle")
