r"""The VLA: a vision tower, an MLP projector and a Hugging Face causal LM, in one readable file.

Sequence the LM sees (one row):

    [camera 1 patches][camera 2 patches]...[proprio token] [bos] prompt tokens  target tokens
    \__________________ prefix embeddings _______________/ \______ input_ids ____________/

Image patch embeddings (plus a learned per-camera embedding) and an optional proprio token are
spliced in front of the prompt's token embeddings. Released Prismatic models (OpenVLA, MiniVLA;
edge_vla.model.importers) read [bos][patches] prompt...: with `image_after_bos` the <bos>
embedding is the first prefix token and the prompt ids start after it. `forward` returns logits only for the
`input_ids` positions, so labels line up with `input_ids` exactly (-100 = no loss), and the
loss is the usual next-token shift.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge_vla.config import VLAConfig, preset as make_preset
from edge_vla.errors import EdgeVLAError
from edge_vla.artifacts.checkpoint import (CHECKPOINT_FORMAT, CONFIG_FILE, RECIPE_FILE, STATS_FILE, TOKENIZER_DIR,
                                           WEIGHTS_FILE, load_config)
from edge_vla.model.processor import VLAProcessor
from edge_vla.tokens.action import ActionStats, ActionTokenizer
from edge_vla.tokens.text import TextTokenizer


@dataclass
class VLAOutput:
    logits: torch.Tensor  # (B, T, V) for the input_ids positions
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # (B, T, H) last hidden states of the input_ids positions


def hf_config(d: dict, what: str):
    """A Hugging Face config object from a config dict with `model_type` (a tower's section of VLAConfig)."""
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if k not in ("architectures", "transformers_version")}  # provenance, not shape
    model_type = d.pop("model_type", None)
    if not model_type:
        raise EdgeVLAError(f"the {what} config has no `model_type`", "give a Hugging Face config dict with model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:
        raise EdgeVLAError(f"invalid {what} config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def build_vision_tower(config: VLAConfig):
    """The vision tower a config describes, at random init (weights are loaded after)."""
    if config.vision_backbone == "prismatic":
        from edge_vla.model.prismatic import build_backbone

        return build_backbone(config)
    return _vision_from_config(hf_config(config.vision, "vision"))


def _vision_from_config(cfg):
    from transformers import AutoModel, SiglipVisionConfig, SiglipVisionModel

    if isinstance(cfg, SiglipVisionConfig):
        return SiglipVisionModel(cfg)
    return AutoModel.from_config(cfg)


def _load_pretrained(kind: str, path: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SiglipVisionModel

    try:
        if kind == "lm":
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        cfg = AutoConfig.from_pretrained(path)
        if cfg.model_type in ("siglip", "siglip_vision_model"):
            # Drop SigLIP's attention-pooling head: the VLA reads every patch, not a pooled vector.
            return SiglipVisionModel.from_pretrained(path, dtype=torch.float32, vision_use_head=False)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        return getattr(model, "vision_model", model)
    except EdgeVLAError:
        raise
    except Exception as e:
        raise EdgeVLAError(
            f"could not load the {kind} from `{path}` ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "pass a local directory saved with save_pretrained, or a hub id reachable from this machine",
        ) from None


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row's mask is ones then zeros (padding only after the real tokens)."""
    m = mask.long()
    return bool((m.cumprod(1) == m).all())


def _last(hidden: torch.Tensor, n_last: int | None) -> torch.Tensor:
    return hidden[:, -1] if n_last is None else hidden[:, -n_last:]


class VLA(nn.Module):
    def __init__(self, config: VLAConfig, vision: nn.Module, lm: nn.Module, tokenizer: TextTokenizer,
                 action_stats: ActionStats | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.processor = VLAProcessor(config, tokenizer)
        v_hidden = vision.config.hidden_size
        l_hidden = lm.config.hidden_size
        if config.projector == "mlp":
            self.projector = nn.Sequential(
                nn.Linear(v_hidden, config.projector_hidden), nn.GELU(), nn.Linear(config.projector_hidden, l_hidden)
            )
        else:
            from edge_vla.model.prismatic import PrismaticProjector

            self.projector = PrismaticProjector(config.projector, v_hidden, l_hidden)
        self.camera_embed = nn.Parameter(torch.zeros(len(config.cameras), l_hidden))
        self.proprio = nn.Linear(config.proprio_dim, l_hidden) if config.use_proprio else None
        # With `image_after_bos` the prompt's first token is the prefix's first row. It has its own
        # parameter (the importer copies that token's embedding into it) instead of a slice of the
        # embedding table: a slice would put the whole table into the prefix graph (525 MB fp32 for
        # Llama-2 7B), and the table's row is never read again (the prompt ids start after it).
        self.first_token_embed = nn.Parameter(torch.zeros(1, l_hidden)) if config.image_after_bos else None
        rows = lm.get_input_embeddings().weight.shape[0]
        # edge-vla's own models: the table is resized to the tokenizer. A released model (its
        # actions binned by a released convention, e.g. OpenVLA's) keeps its padded table (32064
        # rows for 32001 tokens): its weights are laid out for it.
        released = action_stats is not None and getattr(action_stats, "bin_layout", "uniform") != "uniform"
        if rows < tokenizer.vocab_size or (rows != tokenizer.vocab_size and not released):
            lm.resize_token_embeddings(tokenizer.vocab_size)
        self.action_stats = action_stats
        self.recipe_info: dict = {}

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VLAConfig, texts: list[str] = (), action_stats: ActionStats | None = None,
                    seed: int | None = 0) -> "VLA":
        """Build a new VLA: random towers from config dicts, or pretrained ones from paths."""
        from transformers import AutoModelForCausalLM

        config.validate()
        if seed is not None:
            torch.manual_seed(seed)
        tok_path = config.tokenizer_path or config.lm_path
        tokenizer = (TextTokenizer.from_hf(tok_path, config.n_action_bins) if tok_path
                     else TextTokenizer.train_tiny(list(texts), config.tokenizer_vocab_size, config.n_action_bins))
        vision = _load_pretrained("vision", config.vision_path) if config.vision_path else build_vision_tower(config)
        if config.lm_path:
            lm = _load_pretrained("lm", config.lm_path)
        else:
            lm_cfg = dict(config.lm, vocab_size=tokenizer.vocab_size)
            lm = AutoModelForCausalLM.from_config(hf_config(lm_cfg, "language model"))
        # Record the towers' full configs so the checkpoint rebuilds without the original paths.
        if config.vision_backbone == "hf":
            config.vision = _config_dict(vision.config)
        config.lm = _config_dict(lm.config)
        return cls(config, vision, lm, tokenizer, action_stats)

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None, **kw) -> "VLA":
        return cls.from_config(make_preset(name, overrides), **kw)

    # --- the model -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.camera_embed.device

    @property
    def n_prefix_tokens(self) -> int:
        c = self.vision.config
        if not hasattr(c, "patch_size"):
            raise EdgeVLAError("cannot infer the number of image tokens of this vision tower")
        per_cam = (self.config.image_size // c.patch_size // self.config.token_pool) ** 2
        return (per_cam * len(self.config.cameras) + (1 if self.proprio is not None else 0)
                + (1 if self.config.image_after_bos else 0))

    def encode_prefix(self, pixel_values: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_cams, 3, S, S) [+ (B, proprio_dim)] -> (B, P, H) prefix embeddings."""
        n_cams = len(self.config.cameras)
        if pixel_values.ndim != 5 or pixel_values.shape[1] != n_cams or pixel_values.shape[2] != 3:
            raise EdgeVLAError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected (B, {n_cams}, 3, S, S)",
                "build inputs with the model's processor (VLAProcessor.images)",
            )
        b = pixel_values.shape[0]
        flat = pixel_values.flatten(0, 1).to(self.camera_embed.dtype)
        patches = self.vision(pixel_values=flat).last_hidden_state  # (B*C, N, Hv)
        if self.config.token_pool > 1:
            g = int(round(patches.shape[1] ** 0.5))
            grid = patches.transpose(1, 2).unflatten(2, (g, g))
            patches = F.avg_pool2d(grid, self.config.token_pool).flatten(2).transpose(1, 2)
        tokens = self.projector(patches).unflatten(0, (b, n_cams)) + self.camera_embed[None, :, None, :]
        prefix = tokens.flatten(1, 2)
        if self.proprio is not None:
            if state is None:
                raise EdgeVLAError("this model reads the proprio state but none was given", "pass `state`")
            prefix = torch.cat([prefix, self.proprio(state.to(prefix.dtype))[:, None, :]], dim=1)
        if self.first_token_embed is not None:
            row = self.first_token_embed.to(prefix.dtype)
            prefix = torch.cat([row[None].expand(b, -1, -1), prefix], dim=1)
        return prefix

    def _decoder(self):
        return self.lm.get_decoder()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, state=None) -> VLAOutput:
        prefix = self.encode_prefix(pixel_values, state)
        b, p = prefix.shape[:2]
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = None
        if attention_mask is not None and not _right_padded(attention_mask):
            mask = torch.cat([torch.ones(b, p, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
        # A right-padded batch needs no mask in a causal LM: a row's real tokens never attend to
        # the padding after them, and the padding's own outputs carry no loss. Without one, SDPA
        # runs causal and skips the masked-out upper triangle (~4% of an `ecot` training step).
        hidden = self._decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state[:, p:]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return VLAOutput(logits=logits, loss=loss, hidden=hidden)

    # --- incremental decoding (KV cache; prefill once, then one token at a time) -------------------
    @torch.no_grad()
    def prefill(self, pixel_values, input_ids, state=None, n_last: int | None = None):
        """Run prefix + prompt once. Returns (last hidden state (B, H), cache); with `n_last`, the
        hidden states of the last n_last positions (B, n_last, H)."""
        from transformers import DynamicCache

        prefix = self.encode_prefix(pixel_values, state)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        cache = DynamicCache(config=self.lm.config)
        out = self._decoder()(inputs_embeds=embeds, cache=cache, use_cache=True)
        return _last(out.last_hidden_state, n_last), out.cache

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache, n_last: int | None = None):
        """Feed (B,) or (B, n) tokens after the cached sequence. Returns (last hidden (B, H), cache);
        with `n_last`, the hidden states of the last n_last positions (B, n_last, H)."""
        ids = token_ids.view(token_ids.shape[0], -1)
        out = self._decoder()(inputs_embeds=self.lm.get_input_embeddings()(ids), cache=cache, use_cache=True)
        return _last(out.last_hidden_state, n_last), out.cache

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        if self.action_stats is None:
            raise EdgeVLAError("this model has no action statistics yet", "train it on a dataset (stats are saved with the checkpoint)")
        tok = self.processor.tokenizer
        return ActionTokenizer(self.action_stats, tok.first_action_id, tok.n_bins)

    def model_inputs(self, images, instruction: str, state=None, extra_prompt_ids: list[int] = ()):
        pv = torch.from_numpy(self.processor.images(images))[None].to(self.device)
        st = torch.from_numpy(self.processor.state(state))[None].to(self.device) if self.config.use_proprio else None
        ids = torch.tensor([self.processor.prompt_ids(instruction) + list(extra_prompt_ids)], device=self.device)
        return pv, ids, st

    # --- checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the checkpoint directory atomically: config, safetensors weights, tokenizer, stats.

        `dtype` (e.g. torch.float16) stores the weights at that precision, half the file for a
        shipped checkpoint; from_pretrained casts them back to float32 on load. `path` may be missing,
        empty or a checkpoint (replaced); any other directory only with `overwrite`."""
        import copy

        from safetensors.torch import save_model

        from edge_vla.io import atomic_directory

        path = Path(path)
        weights = self if dtype is None else copy.deepcopy(self).to(dtype)
        with atomic_directory(path, overwrite=overwrite) as tmp:
            meta = {"format": CHECKPOINT_FORMAT, **self.config.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            save_model(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            os.chmod(tmp / WEIGHTS_FILE, 0o644)  # safetensors writes 0600: the checkpoint would be private to its writer
            self.processor.tokenizer.save(tmp / TOKENIZER_DIR)
            if self.action_stats is not None:
                self.action_stats.save(tmp / STATS_FILE)
            if self.recipe_info:
                (tmp / RECIPE_FILE).write_text(json.dumps(self.recipe_info, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VLA":
        from safetensors import SafetensorError
        from safetensors.torch import load_model
        from transformers import AutoModelForCausalLM

        p = Path(path)
        from edge_vla.model.importers import is_released_layout

        if is_released_layout(p):
            return cls.from_released(p).to(device).eval()
        config = load_config(p)
        tokenizer = TextTokenizer.load(p / TOKENIZER_DIR)
        stats = ActionStats.load(p / STATS_FILE) if (p / STATS_FILE).exists() else None
        vision = build_vision_tower(config)
        lm = AutoModelForCausalLM.from_config(hf_config(config.lm, "language model"))
        model = cls(config, vision, lm, tokenizer, stats)
        try:
            missing, unexpected = load_model(model, str(p / WEIGHTS_FILE), strict=False)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise EdgeVLAError(f"weights in {p / WEIGHTS_FILE} do not load ({str(e).splitlines()[0][:200]})",
                               "the file is damaged or from another model config; re-save the checkpoint") from None
        if missing or unexpected:
            raise EdgeVLAError(f"weights in {p / WEIGHTS_FILE} do not match config.json "
                               f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                               "save config and weights together with save_pretrained")
        if (p / RECIPE_FILE).exists():
            model.recipe_info = json.loads((p / RECIPE_FILE).read_text())
        return model.to(device).eval()


    @classmethod
    def from_released(cls, src, unnorm_key: str | None = None, llm=None, ecot: bool = False,
                      gripper: str = "auto", center_crop: bool | None = None) -> "VLA":
        """A released checkpoint (edge_vla.model.importers: OpenVLA's Hugging Face layout, Prismatic's
        training layout), local directory or hub id, converted to this class in memory (float32).
        `unnorm_key` picks the dataset whose action statistics de-normalise the actions; `llm` is
        the base LLM's directory for a Prismatic training checkpoint; `ecot` reads an OpenVLA-layout
        checkpoint as ECoT (its prompt, full-mode reasoning); `gripper` "raw" | "libero" | "auto"
        (libero for a libero* unnorm_key): the gripper as predict_action returns it, or as OpenVLA's
        LIBERO evaluation sends it (-1 open / +1 close); `center_crop` (None: for libero* OpenVLA
        fine-tunes) runs the model on the centre 0.9 of each frame's area, as their evaluation does."""
        from transformers import AutoModelForCausalLM

        from edge_vla.model.importers import read_released

        from accelerate import init_empty_weights

        r = read_released(src, unnorm_key, llm, ecot, gripper, center_crop)
        # Parameters are created on the meta device and the converted tensors become them
        # (assign): no random init and no second float32 copy of a 7B model. Buffers (rotary
        # frequencies, position ids, tower normalisation) are computed on the CPU as usual.
        with init_empty_weights(include_buffers=False):
            lm = AutoModelForCausalLM.from_config(hf_config(r.config.lm, "language model"))
            model = cls(r.config, build_vision_tower(r.config), lm, r.tokenizer, r.stats)
        try:
            missing, unexpected = model.load_state_dict(r.weights, strict=False, assign=True)
        except RuntimeError as e:  # shapes that disagree with the config
            raise EdgeVLAError(f"the weights of {r.path} do not fit its config ({str(e).splitlines()[-1].strip()[:200]})",
                               "download the config and the weights of the same release") from None
        tied = getattr(lm.config, "tie_word_embeddings", False)
        if tied:  # the head is the embedding itself (absent from a file, or a copy of it)
            lm.tie_weights()
        # What a released model does not have: a camera embedding (zero), and the first prefix
        # row, which is that token's embedding.
        own = {"camera_embed", "first_token_embed"}
        missing = [k for k in missing if not (tied and k == "lm.lm_head.weight") and k not in own]
        if missing or unexpected:
            raise EdgeVLAError(f"the weights of {r.path} do not match its config.json "
                               f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                               "download every shard, and the config.json of the same release")
        model.camera_embed = nn.Parameter(torch.zeros(model.camera_embed.shape))
        if model.first_token_embed is not None:
            first = r.tokenizer.bos_id
            if first is None:
                raise EdgeVLAError(f"{r.path}: the image follows the prompt's first token, but its tokenizer names none",
                                   "download the tokenizer files of the same release")
            model.first_token_embed = nn.Parameter(model.lm.get_input_embeddings().weight[first:first + 1].detach().clone())
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise EdgeVLAError(f"the weights of {r.path} leave {on_meta[:3]} unset", "download every shard of the release")
        model.recipe_info = r.recipe_info
        return model.eval()


def _config_dict(hf_config) -> dict:
    d = hf_config.to_dict()
    # Keep what rebuilds the architecture; drop run-time and provenance fields.
    for k in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation_autoset"):
        d.pop(k, None)
    d["model_type"] = hf_config.model_type
    return d
