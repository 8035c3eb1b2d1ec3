"""Model configs, named presets, and config files with dotted overrides.

A preset names a whole model: `tiny` (random init, trains on a CPU in minutes), `minivla`
(Qwen2.5-0.5B + SigLIP 224 px, MiniVLA's shape) and `openvla` (Llama-2 7B + SigLIP 224 px,
OpenVLA's LM; OpenVLA fuses DINOv2 with SigLIP, which is not built here). Large presets load
their towers with `from_pretrained` from `lm_path` / `vision_path`, a local directory or a hub id.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_vla.errors import EdgeVLAError

CONFIG_SCHEMA_VERSION = 1
VISION_BACKBONES = ("hf", "prismatic")
PROJECTORS = ("mlp", "gelu-mlp", "fused-gelu-mlp")
RESIZE_STRATEGIES = ("resize-naive", "letterbox", "resize-crop")


@dataclass
class VLAConfig:
    preset: str = "tiny"
    # Vision tower: a Hugging Face vision config (dict with model_type) built at random init,
    # or `vision_path` (local dir or hub id) loaded with from_pretrained.
    vision: dict = field(default_factory=dict)
    vision_path: str | None = None
    # Language model: a Hugging Face causal-LM config dict, or `lm_path`.
    lm: dict = field(default_factory=dict)
    lm_path: str | None = None
    # Tokenizer: trained locally (tiny) or loaded from `tokenizer_path` (defaults to lm_path).
    tokenizer_path: str | None = None
    tokenizer_vocab_size: int = 1024
    image_size: int = 64
    # Average-pool each camera's patch grid by this factor before the projector: 2 turns 8x8
    # patches into 4x4 tokens, a 4x shorter LM prefix for the small CPU models.
    token_pool: int = 1
    cameras: tuple[str, ...] = ("agentview", "wrist")
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    use_proprio: bool = True
    proprio_dim: int = 8
    projector_hidden: int = 256
    action_dim: int = 7
    action_chunk: int = 1
    n_action_bins: int = 256
    # Parallel action decoding (OpenVLA-OFT): the action tokens' inputs are placeholders, so one
    # decoder pass yields the whole chunk instead of one pass per token (edge_vla.tokens.sequence).
    parallel_actions: bool = False
    # Released layouts (edge_vla.model.importers); the defaults are edge-vla's own model.
    # vision_backbone "hf": one Hugging Face tower, its last hidden state; "prismatic": Prismatic's
    # featurizers (edge_vla.model.prismatic): `vision` and, when fused, `fused_vision` are towers
    # built one block short (their second-to-last block is the feature layer), patch tokens only,
    # concatenated along the features, each normalising its own input with `tower_norms`.
    vision_backbone: str = "hf"
    fused_vision: dict = field(default_factory=dict)
    tower_norms: list = field(default_factory=list)  # per tower [[mean x3], [std x3]]
    # projector "mlp": Linear-GELU-Linear through projector_hidden; Prismatic's "gelu-mlp" and
    # "fused-gelu-mlp" (Linear(v, 4v)-GELU-Linear(4v, l)-GELU-Linear(l, l)).
    projector: str = "mlp"
    # How a frame becomes a square: "resize-naive" (stretch), "letterbox" (pad), "resize-crop" (centre crop).
    resize_strategy: str = "resize-naive"
    # Prismatic splices the image patches after the prompt's first token (<bos>; MiniVLA's <|im_start|>).
    image_after_bos: bool = False
    # A released model's own prompt ("{instruction}" filled in, lower-cased as its code does);
    # empty: edge-vla's (OpenVLA's) `In: What action should the robot take to ...?\nOut:`.
    prompt_template: str = ""
    # OpenVLA's LIBERO fine-tunes were trained with random crops and are run on the centre crop of
    # this fraction of the frame's AREA, resized back (TF crop_and_resize); 1.0: no crop.
    center_crop_scale: float = 1.0
    schema_version: int = CONFIG_SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cameras"] = list(self.cameras)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "VLAConfig":
        if not isinstance(d, dict):
            raise EdgeVLAError(f"{source} must hold a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", CONFIG_SCHEMA_VERSION)
        if version != CONFIG_SCHEMA_VERSION:
            raise EdgeVLAError(
                f"{source} has config schema version {version}; this edge-vla reads {CONFIG_SCHEMA_VERSION}",
                "re-save the checkpoint with this version of edge-vla",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgeVLAError(f"{source} has unknown model config keys {unknown}", f"valid keys: {sorted(known)}")
        kw = dict(d)
        for k in ("cameras", "image_mean", "image_std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        if not self.cameras:
            raise EdgeVLAError(f"{source}: `cameras` is empty", "name at least one camera, e.g. agentview")
        if self.token_pool < 1:
            raise EdgeVLAError(f"{source}: token_pool must be >= 1, got {self.token_pool}")
        if self.image_size <= 0 or self.action_dim <= 0 or self.action_chunk <= 0 or self.n_action_bins < 2:
            raise EdgeVLAError(f"{source}: image_size, action_dim, action_chunk must be positive and n_action_bins >= 2")
        if not 0.0 < float(self.center_crop_scale) <= 1.0:
            raise EdgeVLAError(f"{source}: center_crop_scale must be in (0, 1], got {self.center_crop_scale}")
        for name, value, valid in (("vision_backbone", self.vision_backbone, VISION_BACKBONES),
                                   ("projector", self.projector, PROJECTORS),
                                   ("resize_strategy", self.resize_strategy, RESIZE_STRATEGIES)):
            if value not in valid:
                raise unknown_name_error(f"{source}: {name}", value, valid)
        if not self.vision and not self.vision_path:
            raise EdgeVLAError(f"{source}: no vision tower", "set `vision` (a config dict) or `vision_path`")
        if not self.lm and not self.lm_path:
            raise EdgeVLAError(f"{source}: no language model", "set `lm` (a config dict) or `lm_path`")

    @property
    def n_action_tokens(self) -> int:
        return self.action_dim * self.action_chunk


def _tiny() -> VLAConfig:
    return VLAConfig(
        preset="tiny",
        vision=dict(
            model_type="siglip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            num_channels=3,
        ),
        lm=dict(
            model_type="qwen2",
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
        tokenizer_vocab_size=1024,
        image_size=64,
        token_pool=2,
        cameras=("agentview", "wrist"),
        use_proprio=True,
        projector_hidden=256,
    )


def _minivla() -> VLAConfig:
    return VLAConfig(
        preset="minivla",
        vision_path="google/siglip-so400m-patch14-224",
        lm_path="Qwen/Qwen2.5-0.5B",
        image_size=224,
        cameras=("agentview",),
        use_proprio=False,
        projector_hidden=2048,
    )


def _openvla() -> VLAConfig:
    return VLAConfig(
        preset="openvla",
        vision_path="google/siglip-so400m-patch14-224",
        lm_path="meta-llama/Llama-2-7b-hf",
        image_size=224,
        cameras=("agentview",),
        use_proprio=False,
        projector_hidden=4096,
    )


PRESETS = {"tiny": _tiny, "minivla": _minivla, "openvla": _openvla}


def unknown_name_error(kind: str, name: str, valid) -> EdgeVLAError:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return EdgeVLAError(f"unknown {kind} `{name}`", f"{hint}valid: {', '.join(valid)}")


def preset(name: str, overrides: list[str] | None = None) -> VLAConfig:
    if name not in PRESETS:
        raise unknown_name_error("preset", name, PRESETS)
    cfg = PRESETS[name]()
    if overrides:
        cfg = VLAConfig.from_dict(apply_overrides(cfg.to_dict(), overrides), source=f"preset {name} with overrides")
    cfg.validate(f"preset {name}")
    return cfg


# --- files and overrides -------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise EdgeVLAError(f"config file not found: {p}", "pass an existing .yaml/.yml/.json file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean "malformed"
        raise EdgeVLAError(f"config file {p} is malformed: {str(e).splitlines()[0]}", "fix its syntax") from None
    if not isinstance(data, dict):
        raise EdgeVLAError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def parse_override_value(raw: str) -> Any:
    """An override value: JSON when it parses (numbers, lists, true/false/null), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return raw


# Sections of VLAConfig that hold a Hugging Face config dict, and the path that replaces it.
HF_SECTIONS = {"vision": "vision_path", "lm": "lm_path"}


def hf_config_keys(model_type: str) -> set[str]:
    """Every key a Hugging Face config of `model_type` understands: its attributes (to_dict), its
    constructor's arguments, its aliases (attribute_map) and the legacy rope keys it folds into
    `rope_parameters` (rope_theta, ...). Unknown model types are refused with the close names."""
    import inspect

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise unknown_name_error("Hugging Face model_type", model_type, list(CONFIG_MAPPING.keys()))
    cfg = AutoConfig.for_model(model_type)
    keys = set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}) or {})
    for klass in type(cfg).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            keys |= {n for n, p in inspect.signature(init).parameters.items()
                     if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if "rope_parameters" in keys:
        keys |= {"rope_theta", "rope_scaling", "partial_rotary_factor"}
    return keys


def _check_hf_keys(config: dict, added: list[tuple[str, str, str]]) -> None:
    """Keys that overrides added inside a Hugging Face section (vision, lm) must be keys that
    section's config class knows; a section that is loaded from a path ignores them."""
    by_section: dict[str, list[tuple[str, str]]] = {}
    for section, leaf, key in added:
        by_section.setdefault(section, []).append((leaf, key))
    for section, items in by_section.items():
        node = config.get(section)
        path_key = HF_SECTIONS[section]
        if config.get(path_key):
            raise EdgeVLAError(f"override `{items[0][1]}` has no effect: the {section} tower loads from "
                               f"{path_key}={config[path_key]!r}",
                               f"drop it, or set {path_key}=null and give {section}.model_type and its sizes")
        model_type = node.get("model_type") if isinstance(node, dict) else None
        if not model_type:
            raise EdgeVLAError(f"override `{items[0][1]}` cannot be checked: `{section}` names no model_type",
                               f"set {section}.model_type too, e.g. {section}.model_type=qwen2")
        known = hf_config_keys(str(model_type))
        for leaf, key in items:
            if leaf not in known:
                raise unknown_name_error(f"{model_type} config key", key,
                                         [f"{section}.{k}" for k in known if not k.startswith("_")])


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as JSON when they parse, else strings).

    Every key must exist, at any depth, or the override is refused with the closest name. New keys
    are accepted only directly inside a Hugging Face section (vision, lm), and only when that
    section's config class (its model_type) knows them."""
    out = copy.deepcopy(config)
    added: list[tuple[str, str, str]] = []
    for item in overrides:
        if "=" not in item:
            raise EdgeVLAError(f"override `{item}` has no `=`", "write overrides as key.sub=value, e.g. lm.hidden_size=256")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[: i + 1])
                prefix = ".".join(parts[:i])
                raise unknown_name_error("config key", where, [f"{prefix}.{k}" if prefix else k for k in node]
                                         if isinstance(node, dict) else [])
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict):
            raise EdgeVLAError(f"override `{key}`: `{'.'.join(parts[:-1])}` is not a section")
        if leaf not in node:
            if len(parts) == 2 and parts[0] in HF_SECTIONS:
                added.append((parts[0], leaf, key))
            else:
                raise unknown_name_error("config key", key, [".".join(parts[:-1] + [k]) for k in node])
        node[leaf] = parse_override_value(raw.strip())
    if added:
        _check_hf_keys(out, added)
    return out
