"""Prismatic's vision backbone and projectors (OpenVLA, ECoT, MiniVLA), on transformers' own classes.

What is computed, from the published modeling code (prismatic/extern/hf/modeling_prismatic.py):

- each featurizer is a timm ViT whose features are the output of its SECOND-TO-LAST block
  (`get_intermediate_layers(n={depth - 2})`, no final norm), patch tokens only: DINOv2's class
  token and 4 registers are dropped, SigLIP has neither;
- the fused backbone (`dinosiglip-*`) runs DINOv2 and SigLIP on the same image, each with its
  own normalisation, and concatenates their patch features along the feature dimension;
- the projector is `gelu-mlp` (Linear(v, l) GELU Linear(l, l)) or, for fused backbones,
  `fused-gelu-mlp` (Linear(v, 4v) GELU Linear(4v, l) GELU Linear(l, l)).

The towers here are `Dinov2WithRegistersModel` and `SiglipVisionModel` built one block short:
the released last block is never read, so it is neither computed nor exported. timm's exact
GELU is kept (`hidden_act="gelu"`; transformers' SigLIP default is the tanh approximation).
`timm_to_hf` renames a released timm state dict to these classes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from edge_vla.errors import EdgeVLAError

# Prismatic backbone id -> its timm featurizers, and what each implies that the weights do not
# say (heads; DINOv2's registers). Resolution comes from the checkpoint's image_sizes.
BACKBONES: dict[str, tuple[str, ...]] = {
    "dinosiglip-vit-so-224px": ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"),
    "dinosiglip-vit-so-384px": ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"),
    "siglip-vit-so400m": ("vit_so400m_patch14_siglip_224",),
    "siglip-vit-so400m-384px": ("vit_so400m_patch14_siglip_384",),
    "dinov2-vit-l": ("vit_large_patch14_reg4_dinov2.lvd142m",),
}
TIMM_TOWERS = {
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(kind="dinov2", heads=16, registers=4,
                                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "vit_so400m_patch14_siglip_224": dict(kind="siglip", heads=16, registers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "vit_so400m_patch14_siglip_384": dict(kind="siglip", heads=16, registers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def tower_config(timm_id: str, sd: dict, prefix: str, image_size: int) -> dict:
    """The Hugging Face config dict of one released featurizer, sized from its weights (depth - 1 blocks)."""
    spec = TIMM_TOWERS.get(timm_id)
    if spec is None:
        raise EdgeVLAError(f"vision featurizer `{timm_id}` is not supported",
                           f"supported featurizers: {', '.join(sorted(TIMM_TOWERS))}")
    need = [f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight", f"{prefix}blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise EdgeVLAError(f"the checkpoint lacks {missing[0]}", "pass a complete released checkpoint (all shards)")
    dim = int(sd[f"{prefix}pos_embed"].shape[-1])
    patch = int(sd[f"{prefix}patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in sd if k.startswith(f"{prefix}blocks."))
    if depth < 2:
        raise EdgeVLAError(f"featurizer {prefix[:-1]} has {depth} block; its features are read after the second-to-last")
    n_pos = int(sd[f"{prefix}pos_embed"].shape[1])
    if n_pos != (image_size // patch) ** 2:
        raise EdgeVLAError(f"featurizer {prefix[:-1]} has {n_pos} position embeddings, {image_size} px with patch "
                           f"{patch} needs {(image_size // patch) ** 2}", "check image_sizes in its config.json")
    common = dict(hidden_size=dim, intermediate_size=int(sd[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]),
                  num_hidden_layers=depth - 1, num_attention_heads=spec["heads"], image_size=image_size,
                  patch_size=patch, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6)
    if spec["kind"] == "dinov2":
        ratio, rest = divmod(common["intermediate_size"], dim)
        if rest:
            raise EdgeVLAError(f"featurizer {prefix[:-1]}: MLP width is not a multiple of {dim}",
                               "Dinov2WithRegistersModel needs an integer mlp_ratio")
        # mlp_ratio sizes the MLP; intermediate_size stays as an attribute so tools that size a
        # tower by it (deploy's memory fit) read the same width.
        return dict(model_type="dinov2_with_registers", num_register_tokens=spec["registers"],
                    mlp_ratio=ratio, qkv_bias=True, **common)
    return dict(model_type="siglip_vision_model", vision_use_head=False, **common)


def timm_to_hf(sd: dict, prefix: str, hf_cfg: dict) -> dict:
    """A released timm ViT state dict (keys under `prefix`) renamed and split for the Hugging Face
    tower of `hf_cfg`: fused qkv split into q/k/v, layer scale (timm `gamma`, or `scale_factor`
    in OpenVLA's HF export) to `lambda1`, registers, position embeddings. Blocks past the feature
    layer and SigLIP's attention-pooling head are left out: they are never read."""
    dino = hf_cfg["model_type"] == "dinov2_with_registers"
    n_blocks = hf_cfg["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}

    def get(k):
        return sd[prefix + k]

    if dino:
        pos = get("pos_embed")
        # timm's DINOv2 (no_embed_class) adds positions to the patches only; the HF class adds
        # a row to the class token too, so that row is zero.
        out["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["embeddings.cls_token"] = get("cls_token")
        out["embeddings.register_tokens"] = get("reg_token")
        out["embeddings.mask_token"] = torch.zeros(1, pos.shape[-1], dtype=pos.dtype)
        out["embeddings.patch_embeddings.projection.weight"] = get("patch_embed.proj.weight")
        out["embeddings.patch_embeddings.projection.bias"] = get("patch_embed.proj.bias")
        layer, attn, o_proj, n1, n2 = "encoder.layer", "attention", "o_proj", "norm1", "norm2"
        final = "layernorm"
    else:
        out["embeddings.position_embedding.weight"] = get("pos_embed")[0].clone()
        out["embeddings.patch_embedding.weight"] = get("patch_embed.proj.weight")
        out["embeddings.patch_embedding.bias"] = get("patch_embed.proj.bias")
        layer, attn, o_proj, n1, n2 = "encoder.layers", "self_attn", "out_proj", "layer_norm1", "layer_norm2"
        final = "post_layernorm"
    for i in range(n_blocks):
        b, h = f"blocks.{i}.", f"{layer}.{i}."
        for t, n in (("norm1", n1), ("norm2", n2)):
            out[h + n + ".weight"], out[h + n + ".bias"] = get(b + t + ".weight"), get(b + t + ".bias")
        for part in ("weight", "bias"):
            # clones, not views: each becomes its own parameter (VLA.from_released assigns them)
            q, k, v = (t.clone() for t in get(b + "attn.qkv." + part).chunk(3, dim=0))
            out[h + f"{attn}.q_proj.{part}"], out[h + f"{attn}.k_proj.{part}"], out[h + f"{attn}.v_proj.{part}"] = q, k, v
            out[h + f"{attn}.{o_proj}.{part}"] = get(b + "attn.proj." + part)
            out[h + f"mlp.fc1.{part}"], out[h + f"mlp.fc2.{part}"] = get(b + "mlp.fc1." + part), get(b + "mlp.fc2." + part)
        if dino:
            for j in (1, 2):
                key = next((prefix + b + f"ls{j}.{n}" for n in ("gamma", "scale_factor") if prefix + b + f"ls{j}.{n}" in sd), None)
                if key is None:
                    raise EdgeVLAError(f"the checkpoint lacks {prefix}{b}ls{j}.gamma (DINOv2 layer scale)",
                                       "pass a complete released checkpoint")
                out[h + f"layer_scale{j}.lambda1"] = sd[key]
    # The final norm is not on the feature path (features are taken before it); kept so the
    # tower's own state is complete.
    out[f"{final}.weight"], out[f"{final}.bias"] = get("norm.weight"), get("norm.bias")
    return out


def _build_tower(cfg: dict) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

    d = {k: v for k, v in cfg.items() if k != "model_type"}
    if cfg.get("model_type") == "dinov2_with_registers":
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**d))
    if cfg.get("model_type") in ("siglip_vision_model", "siglip"):
        return SiglipVisionModel(SiglipVisionConfig(**d))
    raise EdgeVLAError(f"Prismatic tower model_type {cfg.get('model_type')!r} is not supported",
                       "use dinov2_with_registers or siglip_vision_model")


class PrismaticBackbone(nn.Module):
    """One or two towers on the same image -> (B, N, sum of widths) patch features.

    Input is the processor's pixels in [0, 1] (its mean 0, std 1); each tower normalises them
    itself, so the graph input stays one 3-channel image per camera."""

    def __init__(self, towers: list[dict], norms: list):
        super().__init__()
        if len(norms) != len(towers):
            raise EdgeVLAError(f"{len(towers)} vision towers but {len(norms)} normalisations (tower_norms)")
        self.towers = nn.ModuleList(_build_tower(c) for c in towers)
        self.n_skip = [int(c.get("num_register_tokens", 0)) + 1 if c["model_type"] == "dinov2_with_registers" else 0
                       for c in towers]
        for i, (mean, std) in enumerate(norms):
            # Not persistent: they come from the config, so the checkpoint's weights stay the towers'.
            self.register_buffer(f"mean{i}", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        sizes = {(c["image_size"], c["patch_size"]) for c in towers}
        if len(sizes) != 1:
            raise EdgeVLAError(f"fused towers disagree on image/patch size {sorted(sizes)}", "both must see the same grid")
        (image_size, patch), = sizes
        self.config = SimpleNamespace(hidden_size=sum(c["hidden_size"] for c in towers), patch_size=patch,
                                      image_size=image_size)

    def forward(self, pixel_values: torch.Tensor):
        feats = []
        for i, (tower, skip) in enumerate(zip(self.towers, self.n_skip)):
            x = (pixel_values - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            # hidden_states[-1] is the last built block's output before the final norm: the
            # released tower's second-to-last block.
            h = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
            feats.append(h[:, skip:])
        return SimpleNamespace(last_hidden_state=torch.cat(feats, dim=-1))


class PrismaticProjector(nn.Module):
    """`gelu-mlp` (fc1, fc2) or `fused-gelu-mlp` (fc1, fc2, fc3), the released key names."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int):
        super().__init__()
        self.kind = kind
        if kind == "fused-gelu-mlp":
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        elif kind == "gelu-mlp":
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        else:
            raise EdgeVLAError(f"unknown Prismatic projector `{kind}`", "use gelu-mlp or fused-gelu-mlp")
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(x)))
        return self.fc3(self.act(x)) if self.kind == "fused-gelu-mlp" else x


def build_backbone(config) -> PrismaticBackbone:
    towers = [config.vision] + ([config.fused_vision] if config.fused_vision else [])
    return PrismaticBackbone(towers, config.tower_norms)
