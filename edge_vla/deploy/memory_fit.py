"""Will this model fit on that board? Run-time memory from the config alone, before anything is written.

    total = weights (per precision) + KV cache (longest sequence the mode generates, past and
            present buffers) + activations (largest phase) + runtime overhead (the target's)

`model_shape(source)` reads the architecture from a `VLAConfig`, a config/manifest dict, or a
checkpoint/bundle directory, and counts parameters exactly by building the Hugging Face towers on
PyTorch's `meta` device (no memory, no download). Presets that name hub models (`minivla`,
`openvla`) use the published configs in `KNOWN_ARCHITECTURES`, so no network is needed.

Precision policy (what the export path produces; keep in step with edge_vla.export):
- the LM's linear layers and its output head take the chosen precision; INT4 adds one FP32
  scale per block of INT4_BLOCK weights (blockwise weight-only quantization: MatMulNBits keeps its
  scales in the activations' dtype, fp32 in the exported graphs, and the TensorRT rewrite keeps them);
- the token-embedding table is a Gather, left in the float dtype unless `quantize_embedding`;
  when the head is tied to it and quantized, both copies exist;
- the vision tower and projector take the precision, except INT4 -> INT8 (weight-only INT4 is an
  LLM-GEMM path; vision towers lose accuracy at 4 bits);
- norms, biases, camera/proprio embeddings, the KV cache and activations stay in the target's
  float dtype (fp16 on GPUs, fp32 on CPU), or in the precision itself when it is a float.
All sizes are bytes; GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vla.artifacts import open_artifact
from edge_vla.config import VLAConfig, unknown_name_error
from edge_vla.deploy.targets import PRECISIONS, TARGETS, Target, get_target
from edge_vla.errors import EdgeVLAError

GIB = 2**30
MODES = ("direct", "full", "adaptive")
# Defaults for the sequence a call generates (override per call).
PROMPT_TOKENS = 32  # "In: What action should the robot take to {instruction}?\nOut:" with a LIBERO instruction
REASONING_TOKENS = 250  # full ECoT generates ~250 reasoning tokens per action (docs/facts.md)
ACTION_PREFIX_TOKENS = 3  # " ACTION:"
# The export's INT4 block (edge_vla.export.quantize takes it from here): 64 weights per scale, llama.cpp
# Q4_0's 4.5 bits per weight; MLAS decodes it faster than blocks of 32 at the same accuracy (docs/results.md).
INT4_BLOCK = 64
INT4_SCALE_BYTES = 4  # one fp32 scale per block: 0.5625 bytes (4.5 bits) per weight at blocks of 64

# Published Hugging Face configs of the hub models the presets name (only the fields that size them).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=32768),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    "google/siglip-so400m-patch14-224": dict(model_type="siglip_vision_model", hidden_size=1152,
                                             intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                             image_size=224, patch_size=14, num_channels=3),
}


@dataclass(frozen=True)
class ModelShape:
    """Everything the memory and speed models need to know about a VLA's architecture."""

    n_cameras: int
    image_tokens_per_camera: int
    proprio_tokens: int
    n_action_tokens: int
    # vision tower + projector
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_matrix_params: int  # weights of linear/conv layers (quantizable)
    vision_other_params: int  # norms, biases, position embeddings
    projector_params: int  # two linear layers
    projector_hidden: int
    extra_float_params: int  # camera embeddings + proprio linear
    # language model
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    lm_matrix_params: int  # decoder-layer linear weights (excludes embedding and head)
    lm_other_params: int  # norms and biases
    token_pool: int = 1  # the VLA average-pools each camera's patch grid by this factor before the LM

    @property
    def prefix_tokens(self) -> int:
        return self.n_cameras * (self.image_tokens_per_camera // self.token_pool ** 2) + self.proprio_tokens

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_params(self) -> int:
        """Unique LM parameters (a tied head counted once), as Hugging Face reports them."""
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.lm_matrix_params + self.lm_other_params + self.embedding_params + head

    @property
    def total_params(self) -> int:
        return (self.vision_matrix_params + self.vision_other_params + self.projector_params
                + self.extra_float_params + self.lm_params)

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# --- reading a model's shape ---------------------------------------------------------------------


def _hf_dict(d: dict | None, path: str | None, what: str) -> dict:
    if d:
        return dict(d)
    if path:
        local = Path(path) / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
        if path in KNOWN_ARCHITECTURES:
            return dict(KNOWN_ARCHITECTURES[path])
        raise EdgeVLAError(f"cannot size the {what} `{path}`: not a local directory with config.json and not one of "
                           f"{sorted(KNOWN_ARCHITECTURES)}", "pass the model's local directory")
    raise EdgeVLAError(f"the model config has no {what}")


def _split_params(module, embedding=None, head=None, skip_prefix: str | None = None) -> tuple[int, int]:
    """(matrix params, other params) of a module, skipping the embedding/head tables."""
    skip = {id(t.weight) for t in (embedding, head) if t is not None}
    matrix = other = 0
    for name, p in module.named_parameters():
        if id(p) in skip or (skip_prefix and name.startswith(skip_prefix)):
            continue
        if p.ndim >= 2:
            matrix += p.numel()
        else:
            other += p.numel()
    return matrix, other


def _build_on_meta(vision_cfg: dict | None, lm_cfg: dict):
    """(vision tower | None, LM) built on the meta device: shapes and parameter counts, no memory."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from edge_vla.model.vla import hf_config

    vision = None
    with torch.device("meta"):
        if vision_cfg is not None:
            vc = hf_config(vision_cfg, "vision")
            if getattr(vc, "model_type", "") == "siglip":  # a full SigLIP config: take its vision half
                vc = vc.vision_config
            vision = SiglipVisionModel(vc) if isinstance(vc, SiglipVisionConfig) else AutoModel.from_config(vc)
        lm = AutoModelForCausalLM.from_config(hf_config(lm_cfg, "language model"))
    return vision, lm


def _prismatic_vision_shape(config: VLAConfig, llm_hidden: int) -> dict:
    """The ModelShape vision fields of a released Prismatic backbone (one tower, or DINOv2 + SigLIP
    fused) and its projector, counted on the meta device. Two towers run one after the other:
    their layers add up, and the width is the layer-weighted mean (attention work is linear in
    layers x width)."""
    import torch

    from edge_vla.model.prismatic import PrismaticProjector, build_backbone

    with torch.device("meta"):
        backbone = build_backbone(config)
        projector = PrismaticProjector(config.projector, backbone.config.hidden_size, llm_hidden)
    towers = [t.config for t in backbone.towers]
    layers = sum(t.num_hidden_layers for t in towers)
    matrix, other = _split_params(backbone)
    return dict(vision_hidden=round(sum(t.num_hidden_layers * t.hidden_size for t in towers) / layers),
                vision_layers=layers, vision_heads=max(t.num_attention_heads for t in towers),
                vision_intermediate=max(t.intermediate_size for t in towers), vision_matrix_params=matrix,
                vision_other_params=other, patch=backbone.config.patch_size,
                projector_params=sum(p.numel() for p in projector.parameters()))


def shape_from_config(config: VLAConfig) -> ModelShape:
    prismatic = config.vision_backbone == "prismatic"  # its towers are sized by _prismatic_vision_shape
    vision_cfg = None if prismatic else _hf_dict(config.vision, config.vision_path, "vision tower")
    lm_cfg = _hf_dict(config.lm, config.lm_path, "language model")
    if "vocab_size" not in lm_cfg:
        # A fresh tiny model takes the locally trained tokenizer's vocabulary plus the action tokens.
        # (A hub model's published vocab_size is used as is: the action tokens change it by < 0.2%.)
        lm_cfg["vocab_size"] = config.tokenizer_vocab_size + config.n_action_bins
    vision, lm = _build_on_meta(vision_cfg, lm_cfg)
    lcfg = lm.config
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    lm_matrix, lm_other = _split_params(lm, emb, head)
    hidden = lcfg.hidden_size
    heads = lcfg.num_attention_heads
    if prismatic:
        v = _prismatic_vision_shape(config, hidden)
    else:
        # SigLIP's attention-pooling head is never run (the VLA reads every patch), so no graph holds it.
        v_matrix, v_other = _split_params(vision, skip_prefix="vision_model.head.")
        vcfg = vision.config
        v = dict(vision_hidden=vcfg.hidden_size, vision_layers=vcfg.num_hidden_layers,
                 vision_heads=vcfg.num_attention_heads, vision_intermediate=vcfg.intermediate_size,
                 vision_matrix_params=v_matrix, vision_other_params=v_other, patch=getattr(vcfg, "patch_size", None),
                 projector_params=vcfg.hidden_size * config.projector_hidden + config.projector_hidden
                 + config.projector_hidden * hidden + hidden)
    patch = v.pop("patch")
    if not patch:
        raise EdgeVLAError("cannot size the vision tower: its config has no patch_size")
    per_cam = (config.image_size // patch) ** 2
    extra = len(config.cameras) * hidden + ((config.proprio_dim + 1) * hidden if config.use_proprio else 0)
    return ModelShape(
        n_cameras=len(config.cameras), image_tokens_per_camera=per_cam, proprio_tokens=1 if config.use_proprio else 0,
        n_action_tokens=config.n_action_tokens, **v, projector_hidden=config.projector_hidden, extra_float_params=extra,
        hidden=hidden, layers=lcfg.num_hidden_layers, heads=heads,
        kv_heads=getattr(lcfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(lcfg, "head_dim", None) or hidden // heads,
        intermediate=lcfg.intermediate_size, vocab=emb.weight.shape[0], tied_embeddings=tied,
        lm_matrix_params=lm_matrix, lm_other_params=lm_other, token_pool=config.token_pool,
    )


def _config_from_dict(d: dict, source: str) -> VLAConfig:
    # A bundle manifest nests the model config; a checkpoint's config.json is one (plus "format").
    for key in ("model_config", "model", "config"):
        if isinstance(d.get(key), dict):
            return _config_from_dict(d[key], f"{source}[{key}]")
    d = {k: v for k, v in d.items() if k not in ("format",)}
    return VLAConfig.from_dict(d, source=source)


def model_shape(source) -> ModelShape:
    """ModelShape from a ModelShape, VLAConfig, preset name, config/manifest dict, or checkpoint/bundle dir."""
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, VLAConfig):
        return shape_from_config(source)
    if isinstance(source, dict):
        return shape_from_config(_config_from_dict(source, "model config"))
    if isinstance(source, str) and not Path(source).exists():
        from edge_vla.config import PRESETS, preset

        if source in PRESETS:
            return shape_from_config(preset(source))
    if Path(source).is_dir():
        return shape_from_config(open_artifact(source).config())
    raise EdgeVLAError(f"cannot read a model config from {source}",
                       "pass a checkpoint or bundle directory, a preset name, or a VLAConfig")


# --- the estimate --------------------------------------------------------------------------------


def sequence_length(shape: ModelShape, mode: str, prompt_tokens: int = PROMPT_TOKENS,
                    reasoning_tokens: int = REASONING_TOKENS) -> dict:
    """Token counts of one call. `adaptive` may fall back to full reasoning, so it is sized as full."""
    if mode not in MODES:
        raise unknown_name_error("decode mode", mode, MODES)
    reasoning = reasoning_tokens if mode in ("full", "adaptive") else 0
    parts = {"prefix": shape.prefix_tokens, "prompt": prompt_tokens, "reasoning": reasoning,
             "action_prefix": ACTION_PREFIX_TOKENS, "action": shape.n_action_tokens}
    parts["total"] = sum(parts.values())
    # direct mode prefills the action prefix with the prompt; full mode decodes it.
    parts["prefill"] = shape.prefix_tokens + prompt_tokens + (ACTION_PREFIX_TOKENS if mode == "direct" else 0)
    return parts


def weight_bytes(precision: str) -> float:
    """Bytes per weight element including quantization scales."""
    if precision not in PRECISIONS:
        raise unknown_name_error("precision", precision, PRECISIONS)
    if precision == "int4":
        return 0.5 + INT4_SCALE_BYTES / INT4_BLOCK
    return PRECISIONS[precision]


def float_bytes(precision: str, target: Target) -> float:
    """dtype of unquantized layers, KV cache and activations."""
    return PRECISIONS[precision] if precision in ("fp32", "fp16", "bf16") else PRECISIONS[target.float_dtype]


def weights_breakdown(shape: ModelShape, precision: str, target: Target, quantize_embedding: bool = False) -> dict:
    fb = float_bytes(precision, target)
    quantized = precision not in ("fp32", "fp16", "bf16")
    vision_precision = "int8" if precision == "int4" else precision
    emb = shape.embedding_params
    if quantized:
        embedding = emb * (weight_bytes(precision) if quantize_embedding else fb)
        head = emb * weight_bytes(precision)  # a quantized head is its own copy even when tied
    else:
        embedding = emb * fb
        head = 0 if shape.tied_embeddings else emb * fb
    return {
        "vision": shape.vision_matrix_params * weight_bytes(vision_precision) + shape.vision_other_params * fb,
        "projector": shape.projector_params * weight_bytes(vision_precision) + shape.extra_float_params * fb,
        "lm_layers": shape.lm_matrix_params * weight_bytes(precision) + shape.lm_other_params * fb,
        "lm_head": head,
        "embedding": embedding,
    }


def activation_bytes(shape: ModelShape, seq: dict, fb: float) -> dict:
    """Peak live activations of the largest phase (engines reuse buffers across layers)."""
    b, t = shape.n_cameras, shape.image_tokens_per_camera
    vision = fb * (b * t * (4 * shape.vision_hidden + 2 * shape.vision_intermediate + shape.projector_hidden)
                   + b * shape.vision_heads * t * t)
    tp, total = seq["prefill"], seq["total"]
    prefill = fb * (tp * (4 * shape.hidden + 2 * shape.intermediate) + shape.heads * tp * total) + 4 * shape.vocab
    decode = fb * (4 * shape.hidden + 2 * shape.intermediate + shape.heads * total) + 4 * shape.vocab
    return {"vision": vision, "prefill": prefill, "decode": decode}


@dataclass
class MemoryEstimate:
    target: str
    precision: str
    mode: str
    usable_bytes: float
    weights: dict
    kv_cache: float
    activations: float
    runtime_overhead: float
    sequence: dict
    notes: list = field(default_factory=list)

    @property
    def weights_total(self) -> float:
        return sum(self.weights.values())

    @property
    def total(self) -> float:
        return self.weights_total + self.kv_cache + self.activations + self.runtime_overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.usable_bytes

    def summary(self) -> str:
        return (f"{self.precision} {self.mode} on {self.target}: needs {self.total / GIB:.2f} GiB "
                f"(weights {self.weights_total / GIB:.2f}, KV cache {self.kv_cache / GIB:.2f} at {self.sequence['total']} "
                f"tokens, activations {self.activations / GIB:.2f}, runtime {self.runtime_overhead / GIB:.2f}) "
                f"of {self.usable_bytes / GIB:.2f} GiB usable")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(weights_total=self.weights_total, total=self.total, fits=self.fits,
                 total_gib=round(self.total / GIB, 3), usable_gib=round(self.usable_bytes / GIB, 3))
        return d


def estimate_memory(model, precision: str, mode: str = "full", target: str | Target = "orin-agx-64",
                    prompt_tokens: int = PROMPT_TOKENS, reasoning_tokens: int = REASONING_TOKENS,
                    quantize_embedding: bool = False) -> MemoryEstimate:
    """Run-time memory of `model` (anything `model_shape` reads) at `precision` in `mode` on `target`."""
    t = get_target(target)
    t.check_precision(precision)
    shape = model_shape(model)
    seq = sequence_length(shape, mode, prompt_tokens, reasoning_tokens)
    fb = float_bytes(precision, t)
    # Past and present caches are both live while a step runs (the engine reads one, writes the other).
    kv = 2 * shape.kv_bytes_per_token(fb) * seq["total"]
    acts = activation_bytes(shape, seq, fb)
    notes = []
    if precision == "int4":
        notes.append("vision tower and projector kept at int8")
    return MemoryEstimate(target=t.name, precision=precision, mode=mode, usable_bytes=t.usable_gib * GIB,
                          weights=weights_breakdown(shape, precision, t, quantize_embedding), kv_cache=kv,
                          activations=max(acts.values()), runtime_overhead=t.runtime_overhead_gib * GIB,
                          sequence=seq, notes=notes)


def _flag(precision: str) -> str:
    return f"--{precision}" if precision in ("int8", "int4") else f"--precision {precision}"


def check_fit(model, precision: str, mode: str = "full", target: str | Target = "orin-agx-64", **kw) -> MemoryEstimate:
    """The estimate when it fits; otherwise EdgeVLAError naming the numbers and what would fit."""
    t = get_target(target)
    est = estimate_memory(model, precision, mode, t, **kw)
    if est.fits:
        return est
    shape = model_shape(model)
    # Narrower precisions this target runs, smallest step first.
    narrower = sorted((p for p in t.precisions if weight_bytes(p) < weight_bytes(precision)),
                      key=weight_bytes, reverse=True)
    for p in narrower:
        alt = estimate_memory(shape, p, mode, t, **kw)
        if alt.fits:
            fix = f"use {_flag(p)} (needs {alt.total / GIB:.1f} GiB)"
            break
    else:
        bigger = [n for n in TARGETS if n != t.name and precision in get_target(n).precisions
                  and get_target(n).kind != "cpu" and estimate_memory(shape, precision, mode, n, **kw).fits]
        smallest = min(bigger, key=lambda n: get_target(n).usable_gib) if bigger else None
        fix = (f"no precision fits {t.name}; target {smallest} fits it at {precision}" if smallest
               else f"no precision fits {t.name}: use a smaller model")
    raise EdgeVLAError(
        f"{precision} {mode} needs {est.total / GIB:.1f} GiB (weights {est.weights_total / GIB:.1f}, KV cache "
        f"{est.kv_cache / GIB:.2f}, activations {est.activations / GIB:.2f}, runtime {est.runtime_overhead / GIB:.1f}), "
        f"{t.name} has {t.usable_gib:.1f} GiB usable", fix)


# The exporter's precision names (edge_vla.export.quantize) -> the weight formats sized here.
EXPORT_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-static": "int8", "int4": "int4"}


def check_export_fits(vla, precision: str, target: str, report=print) -> dict | None:
    """`edge-vla export --target NAME`: refuse a bundle that will not fit the target's memory.

    Sized for the mode the checkpoint's recipe decodes in (adaptive/full include the reasoning).
    Targets outside the registry (e.g. the exporter's generic "cuda") are not checked.
    """
    if target not in TARGETS or precision not in EXPORT_PRECISION:
        return None
    mode = (getattr(vla, "recipe_info", None) or {}).get("decode_mode") or "direct"
    mode = mode if mode in MODES else "full"
    # The exporter's INT4 also quantizes the embedding Gather; TensorRT has no INT4 Gather, so on TensorRT
    # targets build-engine dequantizes that table back to float.
    int4_gather = precision == "int4" and not get_target(target).uses_tensorrt
    est = check_fit(vla.config, EXPORT_PRECISION[precision], mode, target, quantize_embedding=int4_gather)
    report(f"memory fit: {est.summary()}")
    return est.to_dict()
