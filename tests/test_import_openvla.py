"""Released OpenVLA-layout checkpoints in: import, reference parity, de-normalised actions, errors.

A tiny random checkpoint is written the way OpenVLA publishes openvla-7b (config.json with
OpenVLAForActionPrediction and norm_stats, sharded safetensors with timm key names for the fused
DINOv2 + SigLIP featurizers, projector.fc1..3, language_model.*, tokenizer.json with a
32000-token vocabulary and <PAD> at 32000, embeddings padded to 32064), sizes shrunk. The
reference below is written from the published math (modeling_prismatic.py, timm's ViT block),
independently of edge_vla.model.prismatic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_vla.errors import EdgeVLAError

DINO = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP = "vit_so400m_patch14_siglip_224"
HEADS = 16  # what the timm ids imply, whatever the width
D_DINO, D_SIG, DEPTH, PX, PATCH = 32, 48, 3, 28, 14
VOCAB, PAD_TO = 32000, 64
PROMPT_WORDS = "In: What action should the robot take to put the bowl on plate?".split() + ["Out:"]
ECOT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.")
PROMPT_WORDS += (ECOT_SYSTEM + " USER: ASSISTANT: TASK: ACTION:").split()
INSTRUCTION = "put the bowl on the plate"
MEAN_DINO, STD_DINO = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

NORM_STATS = {
    "bridge_orig": {"action": {
        "q01": [-0.03, -0.04, -0.02, -0.1, -0.1, -0.2, 0.0], "q99": [0.03, 0.04, 0.03, 0.1, 0.12, 0.2, 1.0],
        "mean": [0.0] * 7, "std": [0.01] * 7, "min": [-0.05] * 6 + [0.0], "max": [0.05] * 6 + [1.0],
        "mask": [True] * 6 + [False]}, "num_transitions": 1000},
    "libero_spatial_no_noops": {"action": {
        "q01": [-0.7, -0.6, -0.9, -0.1, -0.15, -0.2, -1.0], "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.3, 1.0],
        "mean": [0.0] * 7, "std": [0.3] * 7, "min": [-0.9] * 6 + [-1.0], "max": [0.9] * 6 + [1.0],
        "mask": [True] * 6 + [False]}, "num_transitions": 500},
}


def _timm_vit(g, dim, registers: int, cls: bool, attn_pool: bool) -> dict:
    """A random timm ViT state dict (the key names timm and OpenVLA's checkpoints use)."""
    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    n = (PX // PATCH) ** 2
    sd = {"patch_embed.proj.weight": r(dim, 3, PATCH, PATCH, s=0.05), "patch_embed.proj.bias": r(dim),
          "pos_embed": r(1, n, dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if cls:
        sd["cls_token"] = r(1, 1, dim)
    if registers:
        sd["reg_token"] = r(1, registers, dim)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "norm2.weight": 1 + r(dim),
                   b + "norm2.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
        if registers:  # DINOv2's layer scale, named as OpenVLA's HF export patches it
            sd[b + "ls1.scale_factor"] = 0.5 + r(dim)
            sd[b + "ls2.scale_factor"] = 0.5 + r(dim)
    if attn_pool:  # SigLIP's pooling head: in the release, never read by the VLA
        sd.update({"attn_pool.latent": r(1, 1, dim), "attn_pool.q.weight": r(dim, dim), "attn_pool.q.bias": r(dim)})
    return sd


def _text_config() -> dict:
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=VOCAB + PAD_TO, max_position_embeddings=256, rms_norm_eps=1e-6,
                pad_token_id=VOCAB, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", tie_word_embeddings=False)


def _tokenizer(path: Path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 29871}
    for w in PROMPT_WORDS:
        vocab.setdefault(w, len(vocab) + 10)
    taken = set(vocab.values())
    free = (i for i in range(VOCAB) if i not in taken)
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = next(free)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<PAD>", special=True)])
    assert tok.token_to_id("<PAD>") == VOCAB
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<PAD>", "tokenizer_class": "LlamaTokenizer"}))


BACKBONE_TOWERS = {  # Prismatic backbone id -> (timm id, width, registers + class token) per featurizer
    "dinosiglip-vit-so-224px": [(DINO, D_DINO, 5), (SIGLIP, D_SIG, 0)],
    "siglip-vit-so400m": [(SIGLIP, D_SIG, 0)],
    "dinov2-vit-l": [(DINO, D_DINO, 5)],
}


def make_openvla_checkpoint(path: Path, seed: int = 0, resize: str = "resize-naive",
                            backbone: str = "dinosiglip-vit-so-224px") -> dict:
    """Write a tiny OpenVLA-layout checkpoint at `path`; return its full state dict (reference).
    Fused backbones take the `fused-gelu-mlp` projector, single ones `gelu-mlp`, as Prismatic's do."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    towers = BACKBONE_TOWERS[backbone]
    for prefix, (timm_id, dim, n_prefix) in zip(("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."), towers):
        dino = timm_id == DINO
        sd.update({prefix + k: v for k, v in _timm_vit(g, dim, 4 if dino else 0, dino, not dino).items()})
    v = sum(dim for _, dim, _ in towers)
    h = _text_config()["hidden_size"]
    fused = len(towers) == 2
    shapes = (("fc1", (4 * v, v)), ("fc2", (h, 4 * v)), ("fc3", (h, h))) if fused else (("fc1", (h, v)), ("fc2", (h, h)))
    for name, shape in shapes:
        sd[f"projector.{name}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        sd[f"projector.{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    torch.manual_seed(seed)
    tc = {k: v for k, v in _text_config().items() if k not in ("architectures", "torch_dtype")}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tc))
    for k, t in lm.state_dict().items():
        sd["language_model." + k] = (t * 8 if "embed_tokens" in k or "lm_head" in k else t).clone()
    # Stored in two shards with an index, as the 7B release is (bfloat16 there; float32 here so the
    # reference and the import see the same numbers).
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    cfg = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "model_type": "openvla", "vision_backbone_id": backbone, "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "gelu-mlp", "use_fused_vision_backbone": fused,
        "image_resize_strategy": resize, "text_config": _text_config(), "llm_max_length": 2048,
        "pad_token_id": VOCAB, "pad_to_multiple_of": PAD_TO, "output_projector_states": False,
        "timm_model_ids": [t for t, _, _ in towers], "timm_override_act_layers": [None] * len(towers),
        "image_sizes": [PX] * len(towers),
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "n_action_bins": 256, "norm_stats": NORM_STATS,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    _tokenizer(path)
    return sd


# --- the reference, from the published math -------------------------------------------------------------


def ref_featurizer(sd: dict, prefix: str, x: torch.Tensor, n_prefix_tokens: int) -> torch.Tensor:
    """timm ViT, `get_intermediate_layers(n={depth - 2})`: the second-to-last block's output, no
    final norm, prefix (class + register) tokens dropped."""
    def p(k):
        return sd[prefix + k]

    def layer_scale(k):  # DINOv2's LayerScale: timm's `gamma`, `scale_factor` in OpenVLA's HF export; none in SigLIP
        for name in ("gamma", "scale_factor"):
            if f"{prefix}{k}.{name}" in sd:
                return sd[f"{prefix}{k}.{name}"]
        return 1

    tok = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=PATCH).flatten(2).transpose(1, 2)
    if n_prefix_tokens:  # DINOv2 (no_embed_class): positions on the patches, then [cls][registers][patches]
        b = tok.shape[0]
        tok = torch.cat([p("cls_token").expand(b, -1, -1), p("reg_token").expand(b, -1, -1), tok + p("pos_embed")], 1)
    else:
        tok = tok + p("pos_embed")
    dim = tok.shape[-1]
    hd = dim // HEADS
    for i in range(DEPTH - 1):
        b = f"blocks.{i}."
        y = F.layer_norm(tok, (dim,), p(b + "norm1.weight"), p(b + "norm1.bias"), eps=1e-6)
        q, k, v = (y @ p(b + "attn.qkv.weight").T + p(b + "attn.qkv.bias")).unflatten(-1, (3, HEADS, hd)).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        a = a.transpose(1, 2).flatten(2) @ p(b + "attn.proj.weight").T + p(b + "attn.proj.bias")
        tok = tok + layer_scale(b + "ls1") * a
        y = F.layer_norm(tok, (dim,), p(b + "norm2.weight"), p(b + "norm2.bias"), eps=1e-6)
        m = F.gelu(y @ p(b + "mlp.fc1.weight").T + p(b + "mlp.fc1.bias")) @ p(b + "mlp.fc2.weight").T + p(b + "mlp.fc2.bias")
        tok = tok + layer_scale(b + "ls2") * m
    return tok[:, n_prefix_tokens:]


def _towers(sd: dict) -> list[tuple[str, int]]:
    """(key prefix, prefix tokens dropped) of the featurizers present in `sd`."""
    out = []
    for prefix in ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."):
        if prefix + "pos_embed" in sd:
            out.append((prefix, 5 if prefix + "reg_token" in sd else 0))
    return out


def ref_center_crop(image: np.ndarray, area: float = 0.9) -> np.ndarray:
    """openvla_utils.get_vla_action(center_crop=True): TF crop_and_resize of the centre box with
    side sqrt(0.9) back to the frame's size, then convert_image_dtype(uint8, saturate). Computed
    here with torch's grid_sample (align_corners: TF samples y1 (H-1) + i (y2-y1)(H-1)/(S-1))."""
    h, w = image.shape[:2]
    side = math.sqrt(area)
    lo, hi = (1 - side) / 2, (1 - side) / 2 + side
    ys = torch.linspace(lo, hi, h) * 2 - 1  # normalised sampling positions, align_corners=True
    xs = torch.linspace(lo, hi, w) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
    out = F.grid_sample(x, grid, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).clamp(0, 1)
    return (out * 255.5).clamp(0, 255).to(torch.uint8).numpy()


def ref_pixels(image: np.ndarray, sd: dict) -> torch.Tensor:
    """PrismaticImageProcessor for a 28 px frame (no resize): each tower's own normalisation
    (DINOv2: ImageNet's; SigLIP: 0.5), channel-stacked when fused."""
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
    dino = (x - torch.tensor(MEAN_DINO).view(1, 3, 1, 1)) / torch.tensor(STD_DINO).view(1, 3, 1, 1)
    return torch.cat([dino if n else (x - 0.5) / 0.5 for _, n in _towers(sd)], dim=1)


def ref_embeddings(sd: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """PrismaticForConditionalGeneration.forward up to the LM: [bos][projected patches][rest]."""
    imgs = torch.split(pixel_values, 3, dim=1)
    feats = torch.cat([ref_featurizer(sd, prefix, img, n) for (prefix, n), img in zip(_towers(sd), imgs)], dim=2)
    x = F.gelu(feats @ sd["projector.fc1.weight"].T + sd["projector.fc1.bias"])
    if "projector.fc3.weight" in sd:  # fused-gelu-mlp
        x = F.gelu(x @ sd["projector.fc2.weight"].T + sd["projector.fc2.bias"])
        patches = x @ sd["projector.fc3.weight"].T + sd["projector.fc3.bias"]
    else:  # gelu-mlp
        patches = x @ sd["projector.fc2.weight"].T + sd["projector.fc2.bias"]
    emb = F.embedding(input_ids, sd["language_model.model.embed_tokens.weight"])
    return torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)


def ref_lm(sd: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    tc = {k: v for k, v in _text_config().items() if k not in ("architectures", "torch_dtype")}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tc))
    lm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")})
    return lm.eval()


def ref_predict_action(sd: dict, image: np.ndarray, unnorm_key: str) -> tuple[np.ndarray, list[int]]:
    """OpenVLAForActionPrediction.predict_action: prompt + 29871, greedy 7 tokens, vocab - id
    -> bin centre, de-normalised with q01/q99 where mask. Greedy over the 256 action ids (edge-vla's
    runtime restricts action tokens to them; on a trained model the full argmax is one of them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(sd["__path__"] / "tokenizer.json"))
    prompt = f"In: What action should the robot take to {INSTRUCTION}?\nOut:"
    ids = [1] + tok.encode(prompt, add_special_tokens=False).ids + [29871]
    lm = ref_lm(sd)
    vocab = VOCAB  # text_config.vocab_size - pad_to_multiple_of
    if unnorm_key.startswith("libero"):  # run_libero_eval: center_crop=True for the fine-tunes
        image = ref_center_crop(image)
    with torch.no_grad():
        embeds = ref_embeddings(sd, ref_pixels(image, sd), torch.tensor([ids]))
        out = ref_action_tokens(lm, embeds, vocab)
    return ref_unnormalize(out, vocab, NORM_STATS[unnorm_key]["action"]), out


def ref_action_tokens(lm, embeds: torch.Tensor, top: int, n: int = 7) -> list[int]:
    """predict_action's greedy action tokens: the argmax over the 256 ids below `top` (the vocabulary
    size, or len(tokenizer) for MiniVLA's extra tokens), each fed back."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(torch.argmax(lm(inputs_embeds=embeds).logits[0, -1][top - 256:top])) + top - 256
            out.append(t)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[t]]))], 1)
    return out


def ref_unnormalize(tokens: list[int], top: int, a: dict) -> np.ndarray:
    """top - id -> bin centre of 256 uniform edges in [-1, 1], then q01/q99 where `mask`."""
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    normalized = centers[np.clip(top - np.array(tokens) - 1, 0, centers.shape[0] - 1)]
    return np.where(a["mask"], 0.5 * (normalized + 1) * (np.array(a["q99"]) - np.array(a["q01"])) + np.array(a["q01"]),
                    normalized)


def libero_gripper(action: np.ndarray) -> np.ndarray:
    """run_libero_eval.py's post-processing for OpenVLA: normalize_gripper_action(binarize=True),
    then invert_gripper_action."""
    a = np.array(action, dtype=np.float64)
    a[..., -1] = np.sign(2 * (a[..., -1] - 0.0) / (1.0 - 0.0) - 1)
    a[..., -1] = a[..., -1] * -1.0
    return a


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("openvla-7b-tiny")
    sd = make_openvla_checkpoint(path)
    sd["__path__"] = path
    return path, sd


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    from click.testing import CliRunner

    from edge_vla.cli import main

    src, _ = released
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(out), "--unnorm-key", "libero_spatial_no_noops"])
    assert res.exit_code == 0, res.output
    return out


def _image(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (PX, PX, 3), dtype=np.uint8)


# --- tests -------------------------------------------------------------------------------------------------------


def test_fused_backbone_matches_the_published_featurizers(released):
    """The converter (timm keys -> Dinov2WithRegistersModel + SiglipVisionModel, one block short)
    gives the reference's second-to-last-block patch features, concatenated DINOv2 then SigLIP."""
    from edge_vla.model.vla import VLA

    src, sd = released
    vla = VLA.from_released(src, unnorm_key="bridge_orig")
    img = _image()
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        ours = vla.vision(x).last_hidden_state
        ref_pv = ref_pixels(img, sd)
        ref = torch.cat([ref_featurizer(sd, "vision_backbone.featurizer.", ref_pv[:, :3], 5),
                         ref_featurizer(sd, "vision_backbone.fused_featurizer.", ref_pv[:, 3:], 0)], dim=2)
        assert not torch.allclose(ref[..., :D_DINO], ref_featurizer(sd, "vision_backbone.featurizer.", ref_pv[:, 3:], 5))
    assert ours.shape == (1, (PX // PATCH) ** 2, D_DINO + D_SIG)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # The last released block is never read: building it would only cost time and bundle bytes.
    assert len(vla.vision.towers[0].encoder.layer) == DEPTH - 1


def test_imported_logits_match_the_reference_at_every_position(released, imported):
    from edge_vla.model.vla import VLA

    src, sd = released
    vla = VLA.from_pretrained(imported)
    img = _image()
    pv = torch.from_numpy(vla.processor.images({"agentview": img}))[None]
    ids = vla.processor.prompt_ids(INSTRUCTION) + [29871]
    ref_ids = torch.tensor([[1] + ids])
    with torch.no_grad():
        prefix = vla.encode_prefix(pv)
        ours = vla(pv, torch.tensor([ids])).logits
        ref_embeds = ref_embeddings(sd, ref_pixels(ref_center_crop(img), sd), ref_ids)  # a libero* import
        ref = ref_lm(sd)(inputs_embeds=ref_embeds).logits
    n_patches = (PX // PATCH) ** 2
    # [bos][patches] is our prefix; the prompt ids follow it.
    assert torch.allclose(prefix, ref_embeds[:, : 1 + n_patches], atol=1e-5)
    assert ours.shape == (1, len(ids), VOCAB + PAD_TO)
    assert torch.allclose(ours, ref[:, 1 + n_patches:], atol=1e-4), (ours - ref[:, 1 + n_patches:]).abs().max()


def test_the_policy_returns_the_published_de_normalised_action(released, imported):
    from edge_vla.runtime.policy import load_policy

    _, sd = released
    img = _image(2)
    want, want_ids = ref_predict_action(sd, img, "libero_spatial_no_noops")
    r = load_policy(imported, backend="torch").act({"images": {"agentview": img}, "instruction": INSTRUCTION})
    assert r.action.shape == (7,)
    # a libero* key: the gripper as OpenVLA's LIBERO evaluation sends it to the simulator
    np.testing.assert_allclose(r.action, libero_gripper(want), atol=1e-6)
    assert r.action[6] in (-1.0, 1.0)


def test_from_pretrained_converts_a_released_directory_on_the_fly(released, imported):
    from edge_vla.model.vla import VLA

    src, _ = released
    with pytest.raises(EdgeVLAError, match="holds statistics of 2 datasets.*bridge_orig, libero_spatial_no_noops"):
        VLA.from_pretrained(src)  # two datasets: it must be told which statistics to use
    a = VLA.from_pretrained(imported)
    b = VLA.from_released(src, unnorm_key="libero_spatial_no_noops")
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.action_stats.to_dict() == b.action_stats.to_dict()
    assert a.recipe_info["inference_prefix_ids"] == [29871]


def test_info_describes_an_imported_checkpoint(imported):
    from click.testing import CliRunner

    from edge_vla.cli import main

    res = CliRunner().invoke(main, ["info", "--json", "--checkpoint", str(imported)])
    assert res.exit_code == 0, res.output
    c = json.loads(res.output)["checkpoint"]
    assert c["lm"] == "llama" and c["image_size"] == PX and c["action_stats"]
    assert c["vision"] == "prismatic: dinov2_with_registers + siglip_vision_model, fused-gelu-mlp projector"
    assert c["action_tokens"] == "openvla: last 256 ids below 32000, reversed; unnorm_key libero_spatial_no_noops"


def test_import_cli_writes_a_checkpoint_and_refuses_with_one_line(released, tmp_path):
    from click.testing import CliRunner

    from edge_vla.cli import main

    src, _ = released
    out = tmp_path / "ck"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(out), "--unnorm-key", "bridge_orig"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "action_stats.json").is_file()
    assert json.loads((out / "action_stats.json").read_text())["bin_layout"] == "openvla"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "x"), "--unnorm-key", "nope"])
    assert res.exit_code == 1
    assert "unknown unnorm_key `nope`" in res.output and "known keys: bridge_orig, libero_spatial_no_noops" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_one_line_errors(released, tmp_path, monkeypatch):
    from edge_vla.model.importers import read_released as load_released

    src, _ = released
    # a missing shard
    d = _copy(src, tmp_path / "missing")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EdgeVLAError, match="shard model-00002-of-00002.safetensors listed in .* is missing"):
        load_released(d, "bridge_orig")
    # OpenVLA-OFT: same architecture name, extra heads
    d = _copy(src, tmp_path / "oft")
    (d / "action_head--150000_checkpoint.pt").write_bytes(b"x")
    with pytest.raises(EdgeVLAError, match="OpenVLA-OFT checkpoint .*supported: the OpenVLA family"):
        load_released(d, "bridge_orig")
    # another architecture
    d = _copy(src, tmp_path / "llava")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlavaForConditionalGeneration"])))
    with pytest.raises(EdgeVLAError, match="holds LlavaForConditionalGeneration, not a VLA layout.*supported"):
        load_released(d, "bridge_orig")
    # a vocabulary with no room for the bins: pad_to_multiple_of pushes the block past the table
    d = _copy(src, tmp_path / "novocab")
    (d / "config.json").write_text(json.dumps(dict(cfg, pad_to_multiple_of=-64)))
    with pytest.raises(EdgeVLAError, match="no room for 256 action bins"):
        load_released(d, "bridge_orig")
    # a hub id with no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgeVLAError, match="could not fetch `openvla/openvla-7b`.*pass DIR"):
        load_released("openvla/openvla-7b")


def test_openvla_bins_round_trip_through_the_one_tokenizer():
    """ActionTokenizer with bin_layout openvla encodes as OpenVLA's ActionTokenizer (vocab - digitize)
    and decodes as predict_action, with the mask passing dims through."""
    from edge_vla.tokens.action import ActionStats, ActionTokenizer

    a = NORM_STATS["bridge_orig"]["action"]
    stats = ActionStats(q01=a["q01"], q99=a["q99"], mean=a["mean"], std=a["std"], min=a["min"], max=a["max"],
                        gripper_dim=None, mask=a["mask"], bin_layout="openvla")
    tok = ActionTokenizer(stats, first_token_id=VOCAB - 256)
    rng = np.random.default_rng(0)
    act = rng.uniform(np.array(a["q01"]) * 1.2, np.array(a["q99"]) * 1.2)
    act[6] = 0.37
    ids = tok.encode(act)
    low, high = np.array(a["q01"]), np.array(a["q99"])
    norm = np.where(a["mask"], np.clip(2 * (act - low) / (high - low) - 1, -1, 1), np.clip(act, -1, 1))
    edges = np.linspace(-1, 1, 256)
    np.testing.assert_array_equal(ids, VOCAB - np.digitize(norm, edges))
    centers = (edges[:-1] + edges[1:]) / 2
    n = centers[np.clip(VOCAB - ids - 1, 0, 254)]
    want = np.where(a["mask"], 0.5 * (n + 1) * (high - low) + low, n)
    np.testing.assert_allclose(tok.decode(ids), want, atol=1e-12)


def test_resize_strategies_make_the_frame_square_as_prismatic_does():
    from edge_vla.model.processor import square

    img = np.zeros((4, 8, 3), np.uint8)
    img[:, :2] = 10  # left columns
    img[:, 6:] = 200  # right columns
    assert square(img, "resize-naive") is not None and square(img, "resize-naive").shape == (4, 8, 3)
    lb = square(img, "letterbox", fill=(123, 116, 103))
    assert lb.shape == (8, 8, 3)
    assert (lb[:2] == (123, 116, 103)).all() and (lb[6:] == (123, 116, 103)).all()  # padded top and bottom
    np.testing.assert_array_equal(lb[2:6], img)
    rc = square(img, "resize-crop")
    np.testing.assert_array_equal(rc, img[:, 2:6])  # the centre square: the side columns are gone
    with pytest.raises(EdgeVLAError, match="unknown resize strategy"):
        square(img, "squash")


@pytest.fixture(scope="module")
def bundles(released, imported, tmp_path_factory):
    """fp32 and INT8 bundles of the imported checkpoint, and an INT4 bundle exported straight from
    the released directory (`edge-vla export SRC --int4`, converted on the fly; a copy whose
    norm_stats hold the one dataset, as a LIBERO fine-tune's do). export_bundle refuses to write a
    bundle whose graphs fail parity against PyTorch."""
    import shutil

    from click.testing import CliRunner

    from edge_vla.cli import main
    from edge_vla.export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for precision in ("fp32", "int8"):
        out[precision] = export_bundle(imported, root / precision, precision=precision, report=lambda *a, **k: None)
    src = shutil.copytree(released[0], root / "openvla-7b-finetuned-libero-spatial")
    cfg = json.loads((src / "config.json").read_text())
    cfg["norm_stats"] = {"libero_spatial_no_noops": cfg["norm_stats"]["libero_spatial_no_noops"]}
    (src / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["export", str(src), "--int4", "-o", str(root / "int4")])
    assert res.exit_code == 0, res.output
    out["int4"] = root / "int4"
    return out


def test_exported_bundles_pass_parity_and_keep_the_conventions(bundles):
    from edge_vla.artifacts.bundle import load_bundle

    for precision, path in bundles.items():
        b = load_bundle(path)
        m = b.manifest
        assert m["precision"] == precision
        assert m["parity"]["passed"] and m["parity"]["token_agreement"] == 1.0, m["parity"]
        assert m["parity"]["action_bin_agreement"] == 1.0, m["parity"]
        assert b.action_stats.bin_layout == "openvla" and b.action_stats.mask == [True] * 6 + [False]
        assert m["recipe"]["inference_prefix_ids"] == [29871]
        assert m["model_config"]["image_after_bos"] and m["model_config"]["vision_backbone"] == "prismatic"


def test_the_fp32_bundle_acts_as_the_published_model(released, bundles):
    """Without torch in the loop: the prefix graph ([bos][patches]), the forced 29871, the restricted
    head's OpenVLA bin table and the mask give predict_action's de-normalised action."""
    from edge_vla.runtime.policy import load_policy

    _, sd = released
    img = _image(3)
    want, _ = ref_predict_action(sd, img, "libero_spatial_no_noops")
    r = load_policy(bundles["fp32"]).act({"images": {"agentview": img}, "instruction": INSTRUCTION})
    np.testing.assert_allclose(r.action, libero_gripper(want), atol=1e-5)


@pytest.mark.parametrize("backbone", ["siglip-vit-so400m", "dinov2-vit-l"])
def test_single_tower_backbones_with_the_gelu_mlp_projector(backbone, tmp_path):
    from edge_vla.model.vla import VLA

    sd = make_openvla_checkpoint(tmp_path / "rel", seed=4, backbone=backbone)
    sd["__path__"] = tmp_path / "rel"
    vla = VLA.from_released(tmp_path / "rel", unnorm_key="bridge_orig")
    assert vla.config.projector == "gelu-mlp" and not vla.config.fused_vision
    img = _image(5)
    pv = torch.from_numpy(vla.processor.images({"agentview": img}))[None]
    ids = vla.processor.prompt_ids(INSTRUCTION) + [29871]
    n_patches = (PX // PATCH) ** 2
    with torch.no_grad():
        ours = vla(pv, torch.tensor([ids])).logits
        ref = ref_lm(sd)(inputs_embeds=ref_embeddings(sd, ref_pixels(img, sd), torch.tensor([[1] + ids]))).logits
    assert torch.allclose(ours, ref[:, 1 + n_patches:], atol=1e-4), (ours - ref[:, 1 + n_patches:]).abs().max()


def test_ecot_imports_with_its_prompt_and_reasons_in_full_mode(released, tmp_path):
    """ECoT (embodied-CoT's Example.ipynb): `{system} USER: What action should the robot take to
    {instruction}? ASSISTANT: TASK:`, no 29871, greedy free generation until the first action
    token; the Policy's contract when the budget runs out first: force " ACTION:", then act."""
    from click.testing import CliRunner
    from tokenizers import Tokenizer

    from edge_vla.cli import main
    from edge_vla.runtime.policy import load_policy

    src, sd = released
    out = tmp_path / "ecot"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(out), "--ecot", "--unnorm-key", "bridge_orig"])
    assert res.exit_code == 0, res.output
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    prompt = f"{ECOT_SYSTEM} USER: What action should the robot take to {INSTRUCTION.lower()}? ASSISTANT: TASK:"
    ids = [1] + tok.encode(prompt, add_special_tokens=False).ids
    policy = load_policy(out, backend="torch", max_free_tokens=6)
    assert policy.mode == "full"
    img = _image(4)
    r = policy.act({"images": {"agentview": img}, "instruction": INSTRUCTION})

    lm = ref_lm(sd)
    free, actions = [], []
    with torch.no_grad():
        embeds = ref_embeddings(sd, ref_pixels(img, sd), torch.tensor([ids]))

        def feed(t):
            return torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[t]]))], 1)

        reached = False
        for _ in range(6):
            t = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if VOCAB - 256 <= t < VOCAB:
                reached = True
                break
            if t == 2:
                break
            free.append(t)
            embeds = feed(t)
        if not reached:
            for t in tok.encode(" ACTION:", add_special_tokens=False).ids:
                embeds = feed(t)
        for _ in range(7):
            t = int(lm(inputs_embeds=embeds).logits[0, -1][VOCAB - 256:VOCAB].argmax()) + VOCAB - 256
            actions.append(t)
            embeds = feed(t)
    assert r.tokens["reasoning"] == len(free) and free  # this seed reasons before acting
    assert r.reasoning_text == tok.decode(free, skip_special_tokens=True).strip()
    edges = np.linspace(-1, 1, 256)
    n = ((edges[:-1] + edges[1:]) / 2)[np.clip(VOCAB - np.array(actions) - 1, 0, 254)]
    a = NORM_STATS["bridge_orig"]["action"]
    want = np.where(a["mask"], 0.5 * (n + 1) * (np.array(a["q99"]) - np.array(a["q01"])) + np.array(a["q01"]), n)
    np.testing.assert_allclose(r.action, want, atol=1e-6)


def test_the_policy_server_serves_an_imported_bundle(released, bundles):
    """openpi's own client against `edge-vla serve`'s server on the imported model's fp32 bundle:
    the action is predict_action's (one camera: the first openpi image)."""
    pytest.importorskip("websockets")
    pytest.importorskip("openpi_client")
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from edge_vla.runtime.policy import load_policy
    from edge_vla.runtime.server import PolicyServer

    _, sd = released
    img = _image(6)
    want, _ = ref_predict_action(sd, img, "libero_spatial_no_noops")
    with PolicyServer(load_policy(bundles["fp32"]), port=0, request_timeout_s=60) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        out = client.infer({"observation/image": img, "prompt": INSTRUCTION})
    np.testing.assert_allclose(np.asarray(out["actions"]).reshape(-1, 7)[0], libero_gripper(want), atol=1e-5)


def test_the_prefix_graph_holds_one_embedding_row_not_the_table(bundles):
    """<bos> is the prefix's first row: its own (1, H) parameter, so prefix.onnx does not carry the
    32064-row embedding table (525 MB in float32 for Llama-2 7B)."""
    import onnx

    m = onnx.load(str(bundles["int8"] / "prefix.onnx"))
    biggest = max(int(np.prod(i.dims)) for i in m.graph.initializer)
    assert biggest < VOCAB * 64 // 10, biggest


def test_the_gripper_convention_is_part_of_the_one_de_normalisation(released, tmp_path):
    """`--gripper raw` returns predict_action's value (bridge_orig: raw by default); the libero map
    is applied by ActionTokenizer, so the fused kernel's value table carries it too."""
    from edge_vla.kernels.reference import action_value_table
    from edge_vla.model.vla import VLA

    src, sd = released
    raw = VLA.from_released(src, unnorm_key="libero_spatial_no_noops", gripper="raw")
    assert raw.action_stats.gripper_map is None and raw.action_stats.gripper_dim is None
    lib = VLA.from_released(src, unnorm_key="libero_spatial_no_noops")
    ids = np.arange(VOCAB - 256, VOCAB)[[3, 200, 17, 90, 255, 0, 130]]
    a_raw, a_lib = raw.action_tokenizer.decode(ids), lib.action_tokenizer.decode(ids)
    np.testing.assert_allclose(a_lib, libero_gripper(a_raw), atol=1e-12)
    values, low, high = action_value_table(lib.action_tokenizer)
    assert set(np.unique(values[:, 6])) <= {-1.0, 0.0, 1.0} and low[6] == -1.0 and high[6] == 1.0
    bridge = VLA.from_released(src, unnorm_key="bridge_orig")
    assert bridge.action_stats.gripper_map is None


def test_the_libero_center_crop_follows_openvla_eval(released):
    """The crop is part of the processor (every backend sees the same pixels) and matches the
    reference sampling to one uint8 level; off for a bridge_orig import."""
    from edge_vla.model.processor import center_crop
    from edge_vla.model.vla import VLA

    src, _ = released
    img = np.random.default_rng(9).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ours, ref = center_crop(img, 0.9, 224).astype(int), ref_center_crop(img).astype(int)
    assert np.abs(ours - ref).max() <= 1 and (ours == ref).mean() > 0.99
    assert not np.array_equal(ours, img.astype(int))
    assert VLA.from_released(src, unnorm_key="libero_spatial_no_noops").config.center_crop_scale == 0.9
    assert VLA.from_released(src, unnorm_key="bridge_orig").config.center_crop_scale == 1.0
    assert VLA.from_released(src, unnorm_key="libero_spatial_no_noops", center_crop=False).config.center_crop_scale == 1.0


def test_a_smaller_student_of_an_imported_model_keeps_its_backbone(imported):
    """Size distillation builds the student's towers from the imported config: the fused Prismatic
    backbone, not edge-vla's own tower."""
    from edge_vla.model.vla import VLA
    from edge_vla.train.distill import build_student

    teacher = VLA.from_pretrained(imported)
    n = teacher.config.lm["num_hidden_layers"]
    student, copied = build_student(teacher, {"lm.num_hidden_layers": max(1, n - 1)})
    assert type(student.vision) is type(teacher.vision)
    assert student.vision.state_dict().keys() == teacher.vision.state_dict().keys()
    assert copied > 0 and student.config.lm["num_hidden_layers"] == max(1, n - 1)


def test_memory_fit_sizes_the_imported_fused_backbone_and_projector(imported):
    """--target memory fit counts both towers and the fused projector of an imported model, as the
    loaded model holds them."""
    from edge_vla.deploy.memory_fit import model_shape
    from edge_vla.model.vla import VLA

    vla = VLA.from_pretrained(imported)
    shape = model_shape(imported)
    held = sum(p.numel() for p in vla.vision.parameters())
    assert shape.vision_matrix_params + shape.vision_other_params == held
    assert shape.projector_params == sum(p.numel() for p in vla.projector.parameters())
    assert shape.vision_layers == sum(t.config.num_hidden_layers for t in vla.vision.towers)


@pytest.mark.libero
def test_eval_libero_rolls_out_an_imported_checkpoint(imported, tmp_path):
    """An imported OpenVLA-layout checkpoint runs LIBERO's evaluation for an episode, as the
    OpenVLA fine-tunes expect it (one 3rd-person camera, no proprio, their gripper convention)."""
    pytest.importorskip("libero.libero")
    from click.testing import CliRunner

    from edge_vla.cli import main
    from edge_vla.eval.results import load_results

    res = CliRunner().invoke(main, ["eval", "libero", str(imported), "--tasks", "0", "--trials", "1",
                                    "--max-steps", "3", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    (path,) = tmp_path.glob("*.json")
    (rec,) = load_results(path)["records"]
    assert rec["steps"] == 3 and rec["success"] is False and len(rec["latency_ms"]) >= 1


def test_an_imported_ecot_teacher_distils_into_a_direct_student(released, tmp_path):
    """`edge-vla distill` (reasoning mode) from an imported ECoT checkpoint: the teacher reasons
    through the deployed decoder on the teacher's one camera, and the student acts directly."""
    from click.testing import CliRunner

    from edge_vla.cli import main
    from edge_vla.data.ecot_json import EcotAnnotations
    from edge_vla.data.libero_hdf5 import write_libero_hdf5
    from edge_vla.runtime.policy import load_policy
    from edge_vla.tokens.reasoning import Reasoning

    src, _ = released
    teacher = tmp_path / "ecot"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(teacher), "--ecot", "--unnorm-key", "bridge_orig"])
    assert res.exit_code == 0, res.output
    st = json.loads((teacher / "action_stats.json").read_text())
    lo, hi = np.maximum(st["q01"], st["min"]), np.minimum(st["q99"], st["max"])
    rng = np.random.default_rng(0)
    rel = "bridge/put_the_spoon_on_the_towel_demo.hdf5"
    demos = [{"actions": (lo + (hi - lo) * rng.uniform(0.1, 0.9, (5, 7))).astype(np.float32),
              "images": {"agentview": rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)}} for _ in range(3)]
    write_libero_hdf5(tmp_path / "data" / rel, demos, INSTRUCTION)  # one camera, as the teacher sees
    ann = EcotAnnotations({})
    for e in range(3):
        ann.set_episode(rel, e, [Reasoning(task=INSTRUCTION, plan="1. grasp 2. place", move="move down")] * 5,
                        [(10, 20)] * 5)
    ann.save(tmp_path / "data" / "reasoning.json")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"files": [rel], "reasoning": "reasoning.json"}))
    res = CliRunner().invoke(main, ["distill", "--teacher", str(teacher), "--data", str(tmp_path / "data"),
                                    "--out", str(tmp_path / "run"), "--set", "steps=2", "--set", "batch_size=2",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    student = load_policy(tmp_path / "run" / "final", backend="torch")
    assert student.mode == "direct"
    r = student.act({"images": {"agentview": _image(2)}, "instruction": INSTRUCTION})
    assert r.reasoning_text is None and r.tokens["reasoning"] == 0 and r.action.shape == (7,)
