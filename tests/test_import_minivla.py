"""Prismatic training checkpoints (MiniVLA) in: a tiny run directory the way openvla-mini's training
writes it (config.json with vla.base_vlm, dataset_statistics.json, checkpoints/*.pt holding the
vision_backbone / projector / llm_backbone state dicts with timm's and Prismatic's key names), a
tiny Qwen2 "base LLM" directory, imported and checked against a reference written from the
published code (QwenPromptBuilder, PrismaticVLM.forward, the extra action tokenizer,
predict_action)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_vla.errors import EdgeVLAError
from test_import_openvla import (D_DINO, D_SIG, NORM_STATS, PATCH, PX, _image, _timm_vit, libero_gripper,
                                 ref_action_tokens, ref_featurizer, ref_unnormalize)

INSTRUCTION = "Put the Bowl on the plate"
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
N_BASE = 900  # base BPE vocabulary (151643 in Qwen2.5)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_prompt(instruction: str) -> str:
    """QwenPromptBuilder(model_family="openvla") after one human turn."""
    msg = f"What action should the robot take to {instruction.lower()}?"
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"


def _llm_dir(path: Path) -> dict:
    """A tiny Qwen2 base LLM directory: config.json, tokenizer.json (newlines are their own
    tokens, as Qwen's pre-tokenizer makes them), tokenizer_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    words = ["\n"] + sorted(set(_qwen_prompt("put the bowl on the plate").replace("\n", " ").split()))
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(N_BASE - len(vocab)):
        vocab[f"b{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="b0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}))
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=N_BASE + len(SPECIALS),
               max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
               torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


def make_minivla_run(root: Path, seed: int = 0, action_tokenizer: str = "extra_action_tokenizer"):
    """(run dir, llm dir, HF-named reference state dict, Qwen config) of a tiny MiniVLA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    llm = root / "Qwen2.5-0.5B"
    text = _llm_dir(llm)
    g = torch.Generator().manual_seed(seed)
    dino = _timm_vit(g, D_DINO, 4, True, False)
    for k in [k for k in dino if ".ls" in k]:  # Prismatic's training code keeps timm's `gamma`
        dino[k.replace("scale_factor", "gamma")] = dino.pop(k)
    siglip = _timm_vit(g, D_SIG, 0, False, True)
    v, h = D_DINO + D_SIG, text["hidden_size"]
    proj = {}
    for i, shape in zip((0, 2, 4), ((4 * v, v), (h, 4 * v), (h, h))):
        proj[f"projector.{i}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        proj[f"projector.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    n_tok = N_BASE + len(SPECIALS) + 256  # + <|extra_0..255|>
    rows = -(-n_tok // 64) * 64  # resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    tc = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(tc, vocab_size=rows)))
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(8)
    llm_sd = {"llm." + k: t.clone() for k, t in lm.state_dict().items()}
    run = root / "prism-qwen25-dinosiglip-224px+0_5b+mx-libero-90"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"vision_backbone": {**{"dino_featurizer." + k: t for k, t in dino.items()},
                                              **{"siglip_featurizer." + k: t for k, t in siglip.items()}},
                          "projector": proj, "llm_backbone": llm_sd}},
               run / "checkpoints" / "step-010000-epoch-01-loss=0.2000.pt")
    (run / "config.json").write_text(json.dumps({"vla": {
        "vla_id": "prism-qwen25-dinosiglip-224px+0_5b+mx-libero-90", "base_vlm": "prism-qwen25-extra-dinosiglip-224px+0_5b",
        "freeze_vision_backbone": False, "data_mix": "libero_90", "action_tokenizer": action_tokenizer,
        "image_sequence_len": 1}, "run_id": "minivla-tiny"}))
    (run / "dataset_statistics.json").write_text(json.dumps({"libero_90": NORM_STATS["libero_spatial_no_noops"]}))
    ref = {**{"vision_backbone.featurizer." + k: t for k, t in dino.items()},
           **{"vision_backbone.fused_featurizer." + k: t for k, t in siglip.items()},
           "projector.fc1.weight": proj["projector.0.weight"], "projector.fc1.bias": proj["projector.0.bias"],
           "projector.fc2.weight": proj["projector.2.weight"], "projector.fc2.bias": proj["projector.2.bias"],
           "projector.fc3.weight": proj["projector.4.weight"], "projector.fc3.bias": proj["projector.4.bias"]}
    return run, llm, ref, lm.eval(), n_tok


def _ref_forward(ref: dict, lm, image: np.ndarray, ids: list[int]) -> torch.Tensor:
    """PrismaticVLM.forward: patches spliced after the first prompt token (here <|im_start|>)."""
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
    dino_x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = torch.cat([ref_featurizer(ref, "vision_backbone.featurizer.", dino_x, 5),
                       ref_featurizer(ref, "vision_backbone.fused_featurizer.", (x - 0.5) / 0.5, 0)], dim=2)
    y = F.gelu(feats @ ref["projector.fc1.weight"].T + ref["projector.fc1.bias"])
    y = F.gelu(y @ ref["projector.fc2.weight"].T + ref["projector.fc2.bias"])
    patches = y @ ref["projector.fc3.weight"].T + ref["projector.fc3.bias"]
    emb = lm.get_input_embeddings()(torch.tensor([ids]))
    return torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)


@pytest.fixture(scope="module")
def minivla(tmp_path_factory):
    return make_minivla_run(tmp_path_factory.mktemp("minivla"))


def test_minivla_logits_and_action_match_the_published_model(minivla, tmp_path):
    from click.testing import CliRunner
    from tokenizers import Tokenizer

    from edge_vla.cli import main
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.policy import load_policy

    run, llm, ref, lm, n_tok = minivla
    out = tmp_path / "ckpt"
    res = CliRunner().invoke(main, ["import", str(run), "-o", str(out), "--llm", str(llm)])
    assert res.exit_code == 0, res.output
    vla = VLA.from_pretrained(out)
    img = _image(7)
    tok = Tokenizer.from_file(str(llm / "tokenizer.json"))
    ref_ids = tok.encode(_qwen_prompt(INSTRUCTION), add_special_tokens=False).ids  # Qwen adds no <bos>
    assert ref_ids[0] == tok.token_to_id("<|im_start|>") and ref_ids[-1] == tok.token_to_id("\n")
    ids = vla.processor.prompt_ids(INSTRUCTION) + vla.recipe_info["inference_prefix_ids"]
    assert ids == ref_ids[1:]  # the first token is the prefix's first row, before the image
    pv = torch.from_numpy(vla.processor.images({"agentview": img}))[None]
    n_patches = (PX // PATCH) ** 2
    with torch.no_grad():
        embeds = _ref_forward(ref, lm, img, ref_ids)
        want = lm(inputs_embeds=embeds).logits
        got = vla(pv, torch.tensor([ids])).logits
    assert torch.allclose(got, want[:, 1 + n_patches:], atol=1e-4), (got - want[:, 1 + n_patches:]).abs().max()

    # predict_action with the extra action tokenizer: tokenizer_len = len(tokenizer) with the 256 extras
    acts = ref_action_tokens(lm, embeds, n_tok)
    expected = ref_unnormalize(acts, n_tok, NORM_STATS["libero_spatial_no_noops"]["action"])
    r = load_policy(out, backend="torch").act({"images": {"agentview": img}, "instruction": INSTRUCTION})
    np.testing.assert_allclose(r.action, libero_gripper(expected), atol=1e-6)  # libero_90: LIBERO's gripper
    # Full mode (a reasoning MiniVLA) starts writing after the published prompt too, newline included.
    full = load_policy(out, backend="torch", mode="full", max_free_tokens=2)
    assert vla.processor.prompt_ids(INSTRUCTION) + full.reasoning_prefix_ids == ref_ids[1:]


def test_a_pickle_that_needs_more_than_tensors_is_refused(minivla, tmp_path):
    import shutil

    from edge_vla.model.vla import VLA

    run, llm, *_ = minivla
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    for f in (bad / "checkpoints").glob("*.pt"):
        f.unlink()
    # An object of a class defined here: unpickling it would run this module's code.
    torch.save({"model": {"projector": {}}, "args": Path("x")}, bad / "checkpoints" / "latest-checkpoint.pt")
    with pytest.raises(EdgeVLAError, match=r"needs more than tensors to load .*weights_only=True.* — where you trust"):
        VLA.from_released(bad, llm=llm)


def test_minivla_refusals_are_one_line(minivla, tmp_path, monkeypatch):
    import shutil

    from edge_vla.model.vla import VLA

    run, llm, *_ = minivla
    d = tmp_path / "vq"
    shutil.copytree(run, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vla"]["action_tokenizer"] = "libero_vq_extra_action_tokenizer"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeVLAError, match="action tokenizer `libero_vq_extra_action_tokenizer` is not imported"):
        VLA.from_released(d, llm=llm)
    # no --llm and no network: the base LLM's hub id cannot be fetched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgeVLAError, match="could not fetch `Qwen/Qwen2.5-0.5B`"):
        VLA.from_released(run)


@pytest.mark.slow  # ~27 s on 2 cores; the OpenVLA-layout export tests cover the same steps
def test_an_imported_minivla_exports_to_int8_and_int4_bundles(minivla, tmp_path):
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.export import export_bundle
    from edge_vla.model.vla import VLA

    run, llm, *_ = minivla
    VLA.from_released(run, llm=llm).save_pretrained(tmp_path / "ckpt")
    for precision in ("int8", "int4"):
        b = load_bundle(export_bundle(tmp_path / "ckpt", tmp_path / precision, precision=precision,
                                      report=lambda *a, **k: None))
        assert b.manifest["parity"]["passed"] and b.manifest["parity"]["action_bin_agreement"] == 1.0
        assert b.manifest["model_config"]["prompt_template"].startswith("<|im_start|>system")


def test_an_imported_minivla_exports_streaming_with_its_tied_head(minivla, tmp_path):
    """Qwen2.5 ties its input embedding and head: the checkpoint stores the pair once (under the
    head's name); the streaming export reads the embedding from it and decodes as PyTorch does."""
    from safetensors import safe_open

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.export import export_bundle
    from edge_vla.model.vla import VLA

    run, llm, *_ = minivla
    ckpt = VLA.from_released(run, llm=llm).save_pretrained(tmp_path / "ckpt")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        stored = {k for k in f.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    assert len(stored) == 1  # the tied pair, once
    b = load_bundle(export_bundle(ckpt, tmp_path / "int8", precision="int8", streaming=True, report=lambda *a, **k: None))
    assert b.manifest["parity"]["passed"] and b.manifest["parity"]["action_bin_agreement"] == 1.0
