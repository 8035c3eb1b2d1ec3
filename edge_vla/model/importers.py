"""Importers of released VLA checkpoints: a released layout in, an ordinary edge-vla `VLA` out.

    read_released(src)            -> config, tokenizer, statistics and renamed weights
    VLA.from_released(src)        -> the VLA, converted in memory (VLA.from_pretrained(DIR) too)
    edge-vla import SRC -o CKPT   -> VLA.from_released(SRC).save_pretrained(CKPT)

Layouts (what each computes is in edge_vla.model.prismatic):

- Prismatic's training layout (MiniVLA): `config.json` whose `vla.base_vlm` names the base VLM
  (PRISMATIC_VLMS), `dataset_statistics.json`, `checkpoints/*.pt` holding the `vision_backbone`,
  `projector` and `llm_backbone` state dicts, read ONLY with torch.load(weights_only=True); the
  LLM's config and tokenizer come from its own directory (`llm`, e.g. Qwen/Qwen2.5-0.5B), plus
  the 256 `<|extra_i|>` tokens MiniVLA adds. Its prompt is Qwen's chat turn; the image follows
  `<|im_start|>`; its action tokens are the last 256 ids of the tokenizer with the extras.
- the OpenVLA family's Hugging Face layout: `config.json` with `OpenVLAForActionPrediction`,
  `model.safetensors` (or shards listed in `model.safetensors.index.json`) holding
  `vision_backbone.featurizer.*` / `.fused_featurizer.*` (timm key names), `projector.fc1..3`,
  `language_model.*`, the action statistics in `norm_stats`, and the tokenizer. openvla-7b, its
  LIBERO fine-tunes and the ECoT-7B checkpoints are published this way.

Conventions kept: the image patches follow <bos> (`image_after_bos`); the prompt is OpenVLA's
`In: What action should the robot take to {instruction}?\\nOut:` and decoding forces token 29871
after it, as `predict_action` appends it; action tokens are the last 256 ids before
`text_config.vocab_size - pad_to_multiple_of`, in reverse, de-normalised with the `unnorm_key`
dataset's q01/q99 and `mask` (ActionStats with bin_layout "openvla": the one de-normalisation).
Weights are read from safetensors directly; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_vla.config import VLAConfig
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionStats

SUPPORTED = ("the OpenVLA family's Hugging Face layout (OpenVLAForActionPrediction: openvla-7b, its LIBERO "
             "fine-tunes, ECoT-7B) and Prismatic training checkpoints of MiniVLA (config.json + checkpoints/*.pt)")
OPENVLA_ARCH = "OpenVLAForActionPrediction"
# `predict_action` appends Llama's empty piece "▁" (id 29871) after "Out:" when the prompt lacks it.
OPENVLA_EMPTY_TOKEN = 29871
# ECoT-7B (embodied-CoT's README and Example.ipynb): Vicuna's chat turn, the reasoning started
# with "TASK:", no 29871, then free generation (up to 1024 tokens) that ends with ACTION: and
# the action tokens.
ECOT_TEMPLATE = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. USER: What action should the robot take to "
                 "{instruction}? ASSISTANT: TASK:")
ECOT_MAX_REASONING_TOKENS = 1024
LIBERO_CROP_AREA = 0.9  # run_libero_eval.py: center_crop with crop_scale 0.9
# Files that only OpenVLA-OFT checkpoints carry beside the OpenVLA layout (its continuous action
# head, proprio projector, FiLM): a different model, refused rather than imported without them.
OFT_MARKERS = ("action_head", "proprio_projector", "noisy_action_projector", "vision_backbone--")


# --- where the checkpoint is -----------------------------------------------------------------------


def _read_config(path: Path) -> dict | None:
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise EdgeVLAError(f"{f} is not valid JSON ({e})", "re-download the checkpoint's config.json") from None
    return d if isinstance(d, dict) else None


def _looks_like_hub_id(src: str) -> bool:
    parts = str(src).split("/")
    return len(parts) == 2 and all(parts) and not str(src).startswith((".", "/", "~"))


def is_released_layout(src) -> bool:
    """True when the local directory `src` holds a released checkpoint's config.json (not an
    edge-vla checkpoint's): VLA.from_pretrained converts those on the fly. Hub ids go through
    `edge-vla import` / load_released, which fetch them."""
    p = Path(src)
    if not p.is_dir():
        return False
    cfg = _read_config(p)
    return cfg is not None and "format" not in cfg and ("architectures" in cfg or "norm_stats" in cfg)


def resolve(src) -> Path:
    """A local directory for `src`: itself, or a hub id fetched with huggingface_hub (cached)."""
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists():
        raise EdgeVLAError(f"{p} is a file, expected a checkpoint directory", "pass the directory holding config.json")
    if not _looks_like_hub_id(str(src)):
        raise EdgeVLAError(f"checkpoint not found: {p}", "pass a local directory or a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src)))
    except Exception as e:
        raise EdgeVLAError(
            f"could not fetch `{src}` from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
            f"on a machine with network run `huggingface-cli download {src} --local-dir DIR`, then pass DIR") from None


def detect(path: Path) -> str:
    """The family of the released checkpoint at `path`, or one line naming what it is and what is supported."""
    cfg = _read_config(path)
    if cfg is None:
        raise EdgeVLAError(f"{path} has no config.json", f"pass a released checkpoint directory; supported: {SUPPORTED}")
    if cfg.get("format") == "edge-vla-checkpoint":
        return "edge-vla"
    arch = list(cfg.get("architectures") or [])
    if OPENVLA_ARCH in arch:
        oft = sorted(f.name for f in path.iterdir() if f.name.startswith(OFT_MARKERS))
        if oft or any(k in cfg for k in ("use_film", "use_l1_regression", "use_diffusion")):
            raise EdgeVLAError(
                f"{path} is an OpenVLA-OFT checkpoint ({oft[0] if oft else 'FiLM / continuous action head'}): its "
                "continuous action head is a different model that edge-vla does not import yet",
                f"supported: {SUPPORTED}")
        return "openvla-hf"
    if isinstance(cfg.get("vla"), dict) and (path / "checkpoints").is_dir():
        return "prismatic-pt"
    what = arch[0] if arch else (cfg.get("model_type") or "an unknown model")
    raise EdgeVLAError(f"{path} holds {what}, not a VLA layout edge-vla imports", f"supported: {SUPPORTED}")


# --- weights -----------------------------------------------------------------------------------------


class ShardedTensors(Mapping):
    """The tensors of a (possibly sharded) safetensors checkpoint by name, read one at a time.

    Nothing is read at construction but the shards' headers; `t[name]` reads that tensor, in its
    stored dtype, with one positioned read into a buffer of its own; `shape(name)` / `dtype(name)`
    read the header only; `rows(name, a, b)` reads those rows alone. Positioned reads rather than a
    memory map: the kernel's page cache still serves repeated reads, but no page of a 15 GB shard
    set is ever mapped into (and counted in) the process, which holds only the tensors it was
    given. `on_read(name)` (optional) is called for every tensor read."""

    def __init__(self, path: Path, files: dict[str, Path], on_read=None):
        self.path, self.on_read = path, on_read
        self._files: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, dict, int]] = {}  # name -> (shard, header entry, data start)
        self._aliases: dict[str, str] = {}  # name -> the stored name holding its tensor (tied weights)
        for name, f in files.items():
            if not f.is_file():
                raise EdgeVLAError(f"shard {name} listed in model.safetensors.index.json is missing from {path}",
                                   "download every shard of the checkpoint (huggingface-cli download resumes)")
            header, start = _safetensors_header(f)
            self._files[name] = f
            for k, v in header.items():
                if k != "__metadata__":
                    self._meta[k] = (name, v, start)

    def _entry(self, name: str):
        name = self._aliases.get(name, name)
        if name not in self._meta:
            raise KeyError(name)
        return self._meta[name]

    def alias(self, name: str, stored: str) -> None:
        """Read `name` as the stored tensor `stored`: tied weights (a tied LM's input embedding and
        head) are saved once, under one of their names. Iteration lists the stored tensor once."""
        self._entry(stored)
        self._aliases[name] = stored

    def _read(self, name: str, begin: int, end: int):
        shard, _, start = self._entry(name)
        buf = bytearray(end - begin)
        with open(self._files[shard], "rb") as f:
            n = os.preadv(f.fileno(), [buf], start + begin)
        if n != len(buf):
            raise EdgeVLAError(f"shard {self._files[shard]} ends inside tensor {name}",
                               "re-download it: the file is truncated or damaged")
        return buf

    def _tensor(self, name: str, buf, shape) -> torch.Tensor:
        dtype = getattr(torch, self.dtype(name))
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __getitem__(self, name: str):
        _, e, _ = self._entry(name)
        if self.on_read is not None:
            self.on_read(name)
        begin, end = e["data_offsets"]
        return self._tensor(name, self._read(name, begin, end), self.shape(name))

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, name) -> bool:
        return name in self._meta or name in self._aliases

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> str:
        """The stored dtype as torch names it (bfloat16, float32, ...)."""
        st = self._entry(name)[1]["dtype"]
        if st not in _SAFETENSORS_TORCH:
            raise EdgeVLAError(f"tensor {name} in {self.path} has dtype {st}, which edge-vla does not read",
                               f"store it as one of {', '.join(sorted(_SAFETENSORS_TORCH))}")
        return _SAFETENSORS_TORCH[st]

    def rows(self, name: str, start: int, stop: int):
        """Rows [start, stop) of a tensor, read alone (one embedding row, without the table)."""
        import math

        if self.on_read is not None:
            self.on_read(name)
        shape = self.shape(name)
        row = math.prod(shape[1:]) * _ITEMSIZE[self.dtype(name)]
        begin = self._entry(name)[1]["data_offsets"][0]
        return self._tensor(name, self._read(name, begin + start * row, begin + stop * row), (stop - start, *shape[1:]))

    def nbytes(self) -> int:
        import math

        return sum(math.prod(self.shape(k)) * _ITEMSIZE[self.dtype(k)] for k in self._meta)


def _safetensors_header(f: Path) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, checked against the file's size."""
    damaged = EdgeVLAError(f"shard {f} does not load (its safetensors header is damaged)",
                           "re-download it: the file is truncated or damaged")
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or n > min(size - 8, 100 << 20):
                raise damaged
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        raise damaged from None
    if not isinstance(header, dict):
        raise damaged
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise EdgeVLAError(f"shard {f} is truncated ({size} bytes, its header lists {8 + n + end})",
                           "re-download it: the file is truncated or damaged")
    return header, 8 + n


_SAFETENSORS_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
             "bool": 1}


def read_safetensors(path: Path, on_read=None) -> ShardedTensors:
    """Every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped and read on access."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EdgeVLAError(f"{index} is malformed ({type(e).__name__}: {e})", "re-download the index file") from None
        shards = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise EdgeVLAError(f"{path} has no model.safetensors nor model.safetensors.index.json",
                           "download the weights too (the safetensors files)")
    return ShardedTensors(path, {name: path / name for name in shards}, on_read)


# --- tokenizer and statistics -------------------------------------------------------------------------


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def released_tokenizer(path: Path, first_action_id: int, n_bins: int):
    """The released tokenizer (tokenizer.json) with the action block at ids [first, first + n_bins):
    existing vocabulary tokens, nothing added."""
    from tokenizers import Tokenizer

    from edge_vla.tokens.text import TextTokenizer

    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise EdgeVLAError(f"{path} has no tokenizer.json", "download the checkpoint's tokenizer files too")
    tok = Tokenizer.from_file(str(tj))
    special = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            special.update({k: _token_text(v) for k, v in json.loads((path / name).read_text()).items()
                            if k in ("bos_token", "eos_token", "pad_token") and v})
    ids = {k: tok.token_to_id(v) for k, v in special.items() if v is not None}
    if ids.get("eos_token") is None:
        raise EdgeVLAError(f"the tokenizer in {path} names no eos token", "download its tokenizer_config.json too")
    return TextTokenizer(tokenizer=tok, bos_id=ids.get("bos_token"), eos_id=ids["eos_token"],
                         pad_id=ids.get("pad_token", ids["eos_token"]), first_action_id=first_action_id, n_bins=n_bins)


def released_stats(norm_stats: dict, unnorm_key: str | None, where: str,
                   gripper: str = "auto") -> tuple[ActionStats, str]:
    """OpenVLA's `norm_stats[unnorm_key]["action"]` as ActionStats (bin layout "openvla", its mask).

    `gripper`: "raw" returns the gripper as predict_action does; "libero" as OpenVLA's LIBERO
    evaluation sends it to the simulator (-1 open / +1 close, edge-vla's Sample convention);
    "auto": "libero" for a `libero*` dataset key, else "raw"."""
    if not isinstance(norm_stats, dict) or not norm_stats:
        raise EdgeVLAError(f"{where} has no norm_stats (action statistics)", "download the checkpoint's config.json")
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise EdgeVLAError(f"{where} holds statistics of {len(keys)} datasets; say which the robot's actions use",
                               f"pass --unnorm-key, one of: {', '.join(keys)}")
        unnorm_key = keys[0]
    if unnorm_key not in norm_stats:
        raise EdgeVLAError(f"unknown unnorm_key `{unnorm_key}` in {where}", f"known keys: {', '.join(keys)}")
    a = norm_stats[unnorm_key].get("action") if isinstance(norm_stats[unnorm_key], dict) else None
    if not isinstance(a, dict) or "q01" not in a or "q99" not in a:
        raise EdgeVLAError(f"norm_stats[{unnorm_key!r}] in {where} lacks action q01/q99", "re-download config.json")
    d = len(a["q01"])
    if gripper not in ("auto", "raw", "libero"):
        raise EdgeVLAError(f"unknown gripper convention `{gripper}`", "use auto, raw or libero")
    libero = gripper == "libero" or (gripper == "auto" and unnorm_key.lower().startswith("libero"))
    lo_g, hi_g = (-1.0, 1.0) if libero else (None, None)  # the command's range in the env's units
    stats = ActionStats(
        q01=list(a["q01"]), q99=list(a["q99"]), mean=list(a.get("mean", [0.0] * d)), std=list(a.get("std", [1.0] * d)),
        min=list(a.get("min", a["q01"]))[:-1] + [lo_g] if libero else list(a.get("min", a["q01"])),
        max=list(a.get("max", a["q99"]))[:-1] + [hi_g] if libero else list(a.get("max", a["q99"])),
        # raw: no snap, the gripper as the bins give it (predict_action); libero: OpenVLA's LIBERO
        # script's post-processing, in the one de-normalisation so every backend applies it.
        gripper_dim=-1 if libero else None, gripper_map="openvla-libero" if libero else None,
        count=int(norm_stats[unnorm_key].get("num_transitions", 0) or 0),
        mask=[bool(m) for m in a["mask"]] if "mask" in a else None, bin_layout="openvla",
        extra={"unnorm_key": unnorm_key},
    )
    return ActionStats.from_dict(stats.to_dict(), source=f"norm_stats[{unnorm_key!r}] in {where}"), unnorm_key


# --- the OpenVLA Hugging Face layout ---------------------------------------------------------------------


def _openvla_config(cfg: dict, sd: dict, where: Path) -> tuple[VLAConfig, int]:
    from edge_vla.model.prismatic import BACKBONES, TIMM_TOWERS, tower_config

    backbone = cfg.get("vision_backbone_id")
    timm_ids = list(cfg.get("timm_model_ids") or BACKBONES.get(backbone, ()))
    if not timm_ids:
        raise EdgeVLAError(f"vision backbone `{backbone}` of {where} is not supported",
                           f"supported: {', '.join(sorted(BACKBONES))}")
    sizes = list(cfg.get("image_sizes") or [224] * len(timm_ids))
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."][:len(timm_ids)]
    towers = [tower_config(t, sd, p, int(s)) for t, p, s in zip(timm_ids, prefixes, sizes)]
    arch = str(cfg.get("arch_specifier", "no-align+gelu-mlp"))
    projector = arch.split("+")[-1]
    if projector not in ("gelu-mlp", "fused-gelu-mlp"):
        raise EdgeVLAError(f"projector `{projector}` (arch_specifier {arch}) of {where} is not supported",
                           "supported projectors: gelu-mlp, fused-gelu-mlp")
    text = dict(cfg.get("text_config") or {})
    if not text.get("model_type"):
        raise EdgeVLAError(f"{where}/config.json has no text_config.model_type", "re-download config.json")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        text.pop(k, None)
    lm_vocab = int(text.get("vocab_size") or _shape(sd, "language_model.model.embed_tokens.weight")[0])
    end = lm_vocab - int(cfg.get("pad_to_multiple_of", 0) or 0)
    strategy = str(cfg.get("image_resize_strategy", "letterbox"))
    config = VLAConfig(
        preset="openvla-released", vision=towers[0], fused_vision=towers[1] if len(towers) > 1 else {},
        vision_backbone="prismatic",
        tower_norms=[[list(TIMM_TOWERS[t]["mean"]), list(TIMM_TOWERS[t]["std"])] for t in timm_ids],
        lm=text, image_size=int(sizes[0]), token_pool=1, cameras=("agentview",),
        image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), use_proprio=False,
        projector_hidden=4 * sum(t["hidden_size"] for t in towers) if projector == "fused-gelu-mlp" else int(text.get("hidden_size", 0)),
        projector=projector, resize_strategy=strategy, image_after_bos=True,
        n_action_bins=int(cfg.get("n_action_bins", 256)),
    )
    return config, end


# --- Prismatic's training layout (MiniVLA) ---------------------------------------------------------------

# Base VLM ids (prismatic/conf/models.py of openvla-mini) -> what their registry entry says.
PRISMATIC_VLMS = {
    "prism-qwen25-extra-dinosiglip-224px+0_5b": dict(vision_backbone_id="dinosiglip-vit-so-224px",
                                                     image_resize_strategy="resize-naive",
                                                     arch_specifier="no-align+fused-gelu-mlp",
                                                     llm="Qwen/Qwen2.5-0.5B", extra_tokens=256),
    "prism-qwen25-dinosiglip-224px+0_5b": dict(vision_backbone_id="dinosiglip-vit-so-224px",
                                               image_resize_strategy="resize-naive",
                                               arch_specifier="no-align+fused-gelu-mlp",
                                               llm="Qwen/Qwen2.5-0.5B", extra_tokens=0),
}
# action_tokenizer name -> whether the action block ends at len(tokenizer) (with the extras) or
# at the base vocabulary's size.
PRISMATIC_ACTION_TOKENIZERS = {"action_tokenizer": False, "extra_action_tokenizer": True}
# QwenPromptBuilder's one human turn, without its final "\n": edge-vla's Policy forces at least
# one token after the prompt, and Qwen's pre-tokenizer always makes that newline its own token,
# so it is forced instead (the same ids).
QWEN_TEMPLATE = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nWhat action should the robot take to {instruction}?<|im_end|>\n<|im_start|>assistant")


def read_pt(f: Path) -> dict:
    """A Prismatic `.pt`, unpickling nothing but tensors and plain containers."""
    import pickle

    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        raise EdgeVLAError(
            f"{f} needs more than tensors to load ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "edge-vla unpickles only tensors (torch.load weights_only=True)",
            "where you trust the file, load it and save {'model': {name: state_dict}} with plain tensors "
            "(or safetensors), then import that") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise EdgeVLAError(f"{f} is not a Prismatic checkpoint (no `model` dict of state dicts)",
                           "pass the run directory written by Prismatic's training (checkpoints/*.pt)")
    return obj["model"]


def _read_prismatic(path: Path, llm) -> tuple[dict, dict, object, list[int]]:
    """(HF-layout config dict, HF-layout state dict, tokenizer, forced ids) of a Prismatic run dir."""
    from tokenizers import AddedToken

    cfg = _read_config(path)
    vla = cfg["vla"]
    base = vla.get("base_vlm")
    spec = PRISMATIC_VLMS.get(str(base))
    if spec is None:
        raise EdgeVLAError(f"{path}: base VLM `{base}` is not one edge-vla imports from Prismatic's training layout",
                           f"supported base VLMs: {', '.join(sorted(PRISMATIC_VLMS))}")
    tok_name = vla.get("action_tokenizer", "action_tokenizer")
    if tok_name not in PRISMATIC_ACTION_TOKENIZERS:
        raise EdgeVLAError(f"{path}: action tokenizer `{tok_name}` is not imported "
                           "(VQ action chunks need the vqvae package's pickled model, which edge-vla does not unpickle)",
                           f"supported: {', '.join(PRISMATIC_ACTION_TOKENIZERS)}")
    if int(vla.get("image_sequence_len", 1) or 1) != 1 or vla.get("use_wrist_image"):
        raise EdgeVLAError(f"{path}: this MiniVLA reads {vla.get('image_sequence_len')} images per step "
                           "(history or wrist), which the importer does not build yet", "import a one-image MiniVLA")
    stats_file = path / "dataset_statistics.json"
    if not stats_file.is_file():
        raise EdgeVLAError(f"{path} lacks dataset_statistics.json (the action statistics)", "download it with the run")
    pts = sorted((path / "checkpoints").glob("*.pt"))
    if not pts:
        raise EdgeVLAError(f"{path}/checkpoints holds no .pt file", "download the run's checkpoint too")
    pt = path / "checkpoints" / "latest-checkpoint.pt"
    model = read_pt(pt if pt.is_file() else pts[-1])
    if "vision_backbone" not in model:
        raise EdgeVLAError(f"{pt if pt.is_file() else pts[-1]} carries no vision_backbone weights (trained frozen: they are "
                           "timm's pretrained DINOv2/SigLIP, not in the file)",
                           "import a checkpoint saved with its vision backbone")
    sd: dict[str, torch.Tensor] = {}
    vb = model["vision_backbone"]
    fused = any(k.startswith("siglip_featurizer.") for k in vb)
    renames = ({"dino_featurizer.": "featurizer.", "siglip_featurizer.": "fused_featurizer."} if fused
               else {"featurizer.": "featurizer."})
    for k, v in vb.items():
        for old, new in renames.items():
            if k.startswith(old):
                sd["vision_backbone." + new + k[len(old):]] = v
    for k, v in model.get("projector", {}).items():  # nn.Sequential: projector.0 / .2 / .4 are fc1 / fc2 / fc3
        idx, rest = k[len("projector."):].split(".", 1)
        sd[f"projector.fc{int(idx) // 2 + 1}.{rest}"] = v
    for k, v in model.get("llm_backbone", {}).items():
        if k.startswith("llm."):
            sd["language_model." + k[len("llm."):]] = v
    emb = sd.get("language_model.model.embed_tokens.weight")
    if emb is None:
        raise EdgeVLAError(f"{path}: the checkpoint lacks llm_backbone's llm.model.embed_tokens.weight",
                           "pass a complete Prismatic checkpoint")
    llm_dir = resolve(llm or spec["llm"])
    text = _read_config(llm_dir)
    if text is None:
        raise EdgeVLAError(f"{llm_dir} has no config.json", f"pass --llm a local copy of {spec['llm']}")
    tokenizer = released_tokenizer(llm_dir, 0, 256)
    tok = tokenizer.tokenizer
    base_len = tok.get_vocab_size(with_added_tokens=False)
    if spec["extra_tokens"]:
        tok.add_tokens([AddedToken(f"<|extra_{i}|>") for i in range(spec["extra_tokens"])])
    end = tok.get_vocab_size(with_added_tokens=True) if PRISMATIC_ACTION_TOKENIZERS[tok_name] else base_len
    first = tok.token_to_id("<|im_start|>")
    if first is None:
        raise EdgeVLAError(f"the tokenizer in {llm_dir} has no <|im_start|>", f"pass --llm a copy of {spec['llm']}")
    tokenizer.bos_id = first  # the token the image follows (see QWEN_TEMPLATE)
    text["vocab_size"] = int(emb.shape[0])
    n_towers = 2 if fused else 1
    patch = int(sd["vision_backbone.featurizer.patch_embed.proj.weight"].shape[-1])
    side = int(round(sd["vision_backbone.featurizer.pos_embed"].shape[1] ** 0.5)) * patch
    hf_cfg = dict(spec, text_config=text, pad_to_multiple_of=int(emb.shape[0]) - end, n_action_bins=256,
                  image_sizes=[side] * n_towers, norm_stats=json.loads(stats_file.read_text()))
    return hf_cfg, sd, tokenizer, tok.encode("\n", add_special_tokens=False).ids


def _shape(sd, name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it where the source can (safetensors headers)."""
    return sd.shape(name) if isinstance(sd, ShardedTensors) else tuple(sd[name].shape)


class RenamedWeights(Mapping):
    """A released checkpoint's weights under edge-vla's state-dict names, in their stored dtype.

    The vision towers (renamed and split by timm_to_hf: qkv chunks, padded positions) are
    converted when this is built (~0.7B parameters at OpenVLA's size); the projector and the
    language model are renames, read from the shards only when asked for, one at a time."""

    def __init__(self, sd, config: VLAConfig):
        from edge_vla.model.prismatic import timm_to_hf

        self.sd = sd
        self.vision: dict = {}
        towers = [config.vision] + ([config.fused_vision] if config.fused_vision else [])
        for i, (prefix, tcfg) in enumerate(zip(("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."), towers)):
            try:
                self.vision.update({f"vision.towers.{i}.{k}": v for k, v in timm_to_hf(sd, prefix, tcfg).items()})
            except KeyError as e:
                raise EdgeVLAError(f"the checkpoint lacks {e.args[0]}", "download every shard of the checkpoint") from None
        self.renames = {}
        for k in sd:
            if k.startswith("projector."):
                self.renames[k] = k
            elif k.startswith("language_model."):
                self.renames["lm." + k[len("language_model."):]] = k

    def __getitem__(self, name: str):
        if name in self.vision:
            return self.vision[name]
        return self.sd[self.renames[name]]

    def __iter__(self):
        yield from self.vision
        yield from self.renames

    def __len__(self) -> int:
        return len(self.vision) + len(self.renames)

    def __contains__(self, name) -> bool:
        return name in self.vision or name in self.renames

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.vision[name].shape) if name in self.vision else _shape(self.sd, self.renames[name])

    def dtype(self, name: str) -> str:
        if name in self.vision:
            return str(self.vision[name].dtype).replace("torch.", "")
        src = self.renames[name]
        return self.sd.dtype(src) if isinstance(self.sd, ShardedTensors) else str(self.sd[src].dtype).replace("torch.", "")

    def rows(self, name: str, start: int, stop: int):
        src = self.renames[name]
        return self.sd.rows(src, start, stop) if isinstance(self.sd, ShardedTensors) else self.sd[src][start:stop]


@dataclass
class Released:
    """A released checkpoint read into edge-vla's terms; VLA.from_released builds the model."""

    config: VLAConfig
    tokenizer: object  # TextTokenizer
    stats: ActionStats
    weights: dict  # edge-vla state-dict names -> float32 tensors (a RenamedWeights, read on access, when lazy)
    recipe_info: dict
    path: Path


def read_released(src, unnorm_key: str | None = None, llm=None, ecot: bool = False, gripper: str = "auto",
                  center_crop: bool | None = None, lazy: bool = False) -> Released:
    """The released checkpoint at `src` (local directory or hub id), converted: config, tokenizer,
    statistics, weights renamed to edge-vla's modules, and how to decode it. `llm`: the base LLM's
    directory (or hub id) for Prismatic training checkpoints, which do not carry its config.
    `ecot`: an ECoT checkpoint in OpenVLA's layout (nothing in its files says so): its prompt, and
    full-mode decoding (reasoning, then the actions). `gripper`: see released_stats. `center_crop`:
    run on the centre 0.9 of the frame's area (None: for OpenVLA's libero* fine-tunes, as their
    evaluation does). `lazy`: the weights stay in the shards (RenamedWeights, stored dtype, read one
    tensor at a time): how the streaming import and export read a 7B checkpoint."""
    path = resolve(src)
    family = detect(path)
    if family == "edge-vla":
        raise EdgeVLAError(f"{path} is already an edge-vla checkpoint", "load it with VLA.from_pretrained / pass it directly")
    if ecot and family != "openvla-hf":
        raise EdgeVLAError(f"{path}: ECoT is imported from OpenVLA's Hugging Face layout only",
                           "pass an ecot-openvla-7b-* directory, or drop --ecot")
    if family == "prismatic-pt":
        cfg, sd, tokenizer, prefix_ids = _read_prismatic(path, llm)
        config, end = _openvla_config(cfg, sd, path)
        config.prompt_template = QWEN_TEMPLATE
        n_bins = config.n_action_bins
        tokenizer.first_action_id = end - n_bins
    else:
        cfg = _read_config(path)
        sd = read_safetensors(path)
        config, end = _openvla_config(cfg, sd, path)
        n_bins = config.n_action_bins
        tokenizer = released_tokenizer(path, end - n_bins, n_bins)
        prefix_ids = [OPENVLA_EMPTY_TOKEN]
    emb = "language_model.model.embed_tokens.weight"
    lm_rows = int(_shape(sd, emb)[0]) if emb in sd else 0
    special = {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None}
    if end - n_bins < 0 or end > lm_rows or special & set(range(end - n_bins, end)):
        raise EdgeVLAError(
            f"the vocabulary of {path} has no room for {n_bins} action bins below id {end} "
            f"(embedding rows {lm_rows}, special ids {sorted(special)})",
            "check text_config.vocab_size and pad_to_multiple_of in config.json: the action tokens are the last "
            f"{n_bins} ids of the base vocabulary")
    where = f"{path}/dataset_statistics.json" if family == "prismatic-pt" else f"{path}/config.json"
    stats, key = released_stats(cfg.get("norm_stats"), unnorm_key, where, gripper)
    if center_crop is None:  # OpenVLA's LIBERO fine-tunes are evaluated with center_crop=True (0.9 of the area)
        center_crop = family == "openvla-hf" and key.lower().startswith("libero")
    config.center_crop_scale = LIBERO_CROP_AREA if center_crop else 1.0
    config.action_dim = len(stats.q01)
    config.validate(str(path))
    renamed = RenamedWeights(sd, config)
    if lazy:
        weights = renamed
    else:
        # One tensor at a time: the shards are memory-mapped (page cache, reclaimable), each released
        # tensor is read and converted alone, so the process's own memory peaks at the float32 model.
        weights = {k: renamed[k].float() for k in list(renamed)}
        sd = renamed = None
    recipe_info = {
        "name": "vla", "options": {"released": family, "source": str(src), "unnorm_key": key},
        "decode_mode": "direct", "max_free_tokens": 0, "inference_prefix": "",
        # What the family's prompt ends with (OpenVLA's 29871, MiniVLA's newline) is forced in
        # either mode: full mode (a reasoning MiniVLA such as ECoT-Lite's) starts after it too.
        "inference_prefix_ids": list(prefix_ids), "reasoning_prefix_ids": list(prefix_ids),
    }
    if ecot:
        # The prompt ends with "TASK:", the start of the reasoning; direct mode (asked for
        # explicitly) forces " ACTION:" after it, ECoT-Lite's short path.
        config.prompt_template = ECOT_TEMPLATE
        recipe_info.update(name="ecot", decode_mode="full", max_free_tokens=ECOT_MAX_REASONING_TOKENS,
                           inference_prefix_ids=[], reasoning_prefix_ids=[],
                           options=dict(recipe_info["options"], released="ecot-hf"))
    return Released(config, tokenizer, stats, weights, recipe_info, path)


__all__ = ["Released", "read_released", "ShardedTensors", "RenamedWeights", "is_released_layout", "detect", "resolve", "SUPPORTED"]
