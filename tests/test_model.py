import json

import numpy as np
import pytest
import torch

from conftest import INSTRUCTIONS, make_samples
from edge_vla.config import PRESETS, VLAConfig, apply_overrides, preset
from edge_vla.errors import EdgeVLAError
from edge_vla.model.vla import VLA
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.torch_backend import TorchBackend
from edge_vla.tokens.sequence import IGNORE, action_prefix_ids, build_sequence, reasoning_ids


def batch_for(vla, samples, with_reasoning=False):
    tok = vla.processor.tokenizer
    rows = []
    for s in samples:
        act = vla.action_tokenizer.encode(s.action).reshape(-1).tolist()
        mid = reasoning_ids(tok, s.reasoning) if with_reasoning else []
        rows.append(build_sequence(vla.processor.prompt_ids(s.instruction), mid, action_prefix_ids(tok) + act,
                                   tok.eos_id, loss_on_middle=True))
    t = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), t), tok.pad_id)
    labels = torch.full((len(rows), t), IGNORE)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for k, (i, l) in enumerate(rows):
        ids[k, : len(i)], labels[k, : len(l)], mask[k, : len(i)] = torch.tensor(i), torch.tensor(l), 1
    pv = torch.from_numpy(np.stack([vla.processor.images(s.images) for s in samples]))
    st = torch.from_numpy(np.stack([vla.processor.state(s.state) for s in samples]))
    return pv, ids, mask, labels, st


def policy_action(vla, images, instruction, state=None):
    """The deployed decoder's greedy action: Policy over the torch backend, in the model's recipe mode."""
    return Policy(TorchBackend(vla)).act({"images": images, "instruction": instruction, "state": state}).action


def test_forward_shapes_and_loss(tiny_vla, samples):
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples, with_reasoning=True)
    out = tiny_vla(pv, ids, mask, labels, st)
    assert out.logits.shape == (len(samples), ids.shape[1], tiny_vla.processor.tokenizer.vocab_size)
    assert out.hidden.shape[:2] == ids.shape
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert tiny_vla.encode_prefix(pv, st).shape[1] == tiny_vla.n_prefix_tokens == 2 * 16 + 1  # 8x8 patches pooled 2x2, + proprio


def test_loss_is_taken_only_where_labels_are_set(tiny_vla, samples):
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples[:2])
    base = tiny_vla(pv, ids, mask, labels, st).loss.item()
    ignored = (labels == IGNORE) & (mask == 1)
    ignored[:, 0] = False  # the first token is never a target
    changed_ids = ids.clone()
    # The loss is the next-token cross-entropy over the supervised labels alone: the prompt and
    # padding positions add nothing, and supervising the prompt too would change it...
    logits = tiny_vla(pv, ids, mask, labels, st).logits[:, :-1].float()
    kept = labels[:, 1:] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[:, 1:][kept]).item()
    assert base == pytest.approx(expected, rel=1e-5)
    l2 = labels.clone()
    l2[ignored] = ids[ignored]
    assert tiny_vla(pv, ids, mask, l2, st).loss.item() != pytest.approx(base, rel=1e-3)
    # ...changing a supervised label changes the loss.
    l3 = labels.clone()
    pos = (labels != IGNORE).nonzero()[0]
    l3[pos[0], pos[1]] = (labels[pos[0], pos[1]] + 1) % 50
    assert tiny_vla(pv, changed_ids, mask, l3, st).loss.item() != pytest.approx(base)


def test_right_padding_does_not_change_real_positions(tiny_vla, samples):
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples[:1])
    n = ids.shape[1]
    padded = torch.cat([ids, torch.full((1, 5), tiny_vla.processor.tokenizer.pad_id)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], 1)
    a = tiny_vla(pv, ids, mask, state=st).logits
    b = tiny_vla(pv, padded, pmask, state=st).logits[:, :n]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_only_a_right_padded_mask_is_dropped(tiny_vla, samples):
    """Right padding needs no mask in a causal LM (the forward drops it, SDPA runs causal); any other
    mask is still applied."""
    from edge_vla.model.vla import _right_padded

    assert _right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]])) and _right_padded(torch.tensor([[True, False]]))
    assert not _right_padded(torch.tensor([[0, 1, 1]])) and not _right_padded(torch.tensor([[1, 0, 1]]))
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples[:1])
    holed = mask.clone()
    holed[0, 2] = 0
    a = tiny_vla(pv, ids, mask, state=st).logits
    b = tiny_vla(pv, ids, holed, state=st).logits
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4


def test_kv_cache_decoding_matches_full_forward(tiny_vla, samples):
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples[:1])
    full = tiny_vla(pv, ids, state=st).hidden
    h, cache = tiny_vla.prefill(pv, ids[:, :-3], st)
    torch.testing.assert_close(h, full[:, -4], atol=1e-5, rtol=1e-4)
    for k in (-3, -2, -1):
        h, cache = tiny_vla.step(ids[:, k], cache)
        torch.testing.assert_close(h, full[:, k], atol=1e-5, rtol=1e-4)


def test_save_load_identity(tmp_path, tiny_vla, samples):
    tiny_vla.recipe_info = {"name": "vla", "decode_mode": "direct"}
    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer", "action_stats.json", "recipe.json"}
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl"))
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o644  # readable by whoever deploys it
    loaded = VLA.from_pretrained(path)
    pv, ids, mask, labels, st = batch_for(tiny_vla, samples)
    tiny_vla.eval()
    torch.testing.assert_close(loaded(pv, ids, mask, state=st).logits, tiny_vla(pv, ids, mask, state=st).logits, atol=0, rtol=0)
    assert loaded.recipe_info["name"] == "vla"
    assert loaded.processor.tokenizer.encode("move left") == tiny_vla.processor.tokenizer.encode("move left")
    s = samples[0]
    np.testing.assert_array_equal(policy_action(loaded, s.images, s.instruction, s.state),
                                  policy_action(tiny_vla, s.images, s.instruction, s.state))


def test_half_precision_checkpoint_is_half_the_size_and_loads_as_float32(tmp_path, tiny_vla):
    full = tiny_vla.save_pretrained(tmp_path / "fp32")
    half = tiny_vla.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert next(tiny_vla.parameters()).dtype == torch.float32  # the live model is untouched
    loaded = VLA.from_pretrained(half)
    for (name, p), (_, q) in zip(tiny_vla.state_dict().items(), loaded.state_dict().items()):
        assert q.dtype == torch.float32, name
        torch.testing.assert_close(q, p.half().float(), atol=0, rtol=0)


def test_checkpoint_errors_are_one_line_and_name_the_fix(tmp_path, tiny_vla):
    with pytest.raises(EdgeVLAError, match="not found"):
        VLA.from_pretrained(tmp_path / "nope")
    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    (path / "config.json").write_text("{broken")
    with pytest.raises(EdgeVLAError, match="not valid JSON"):
        VLA.from_pretrained(path)
    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["lm"]["hidden_size"] = 64
    cfg["lm"]["head_dim"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeVLAError, match="do not (load|match)"):
        VLA.from_pretrained(path)
    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(EdgeVLAError, match="do not load"):
        VLA.from_pretrained(path)
    path = tiny_vla.save_pretrained(tmp_path / "ckpt")
    (path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(EdgeVLAError, match="tokenizer file missing"):
        VLA.from_pretrained(path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(EdgeVLAError, match="not an edge-vla checkpoint"):
        VLA.from_pretrained(tmp_path / "other")


def test_bad_observations(tiny_vla, samples):
    s = samples[0]
    with pytest.raises(EdgeVLAError, match="dtype"):
        policy_action(tiny_vla, {k: v.astype(np.float32) for k, v in s.images.items()}, s.instruction, s.state)
    with pytest.raises(EdgeVLAError, match="shape"):
        policy_action(tiny_vla, {k: v[..., 0] for k, v in s.images.items()}, s.instruction, s.state)
    with pytest.raises(EdgeVLAError, match="lacks camera"):
        policy_action(tiny_vla, {"agentview": s.images["agentview"]}, s.instruction, s.state)
    with pytest.raises(EdgeVLAError, match="proprio"):
        policy_action(tiny_vla, s.images, s.instruction, np.zeros(3))
    with pytest.raises(EdgeVLAError, match="NaN"):
        policy_action(tiny_vla, s.images, s.instruction, np.full(8, np.nan))
    with pytest.raises(EdgeVLAError, match="pixel_values"):
        tiny_vla.encode_prefix(torch.zeros(1, 3, 64, 64))


def test_presets_and_overrides():
    assert set(PRESETS) == {"tiny", "minivla", "openvla"}
    mini = preset("minivla")
    assert mini.lm_path == "Qwen/Qwen2.5-0.5B" and mini.image_size == 224
    assert "Llama-2-7b" in preset("openvla").lm_path
    cfg = preset("tiny", ["lm.hidden_size=64", "action_chunk=4", "cameras=[\"agentview\"]"])
    assert cfg.lm["hidden_size"] == 64 and cfg.action_chunk == 4 and cfg.cameras == ("agentview",)
    with pytest.raises(EdgeVLAError, match="did you mean `tiny`"):
        preset("tinny")
    with pytest.raises(EdgeVLAError, match="unknown config key"):
        apply_overrides(preset("tiny").to_dict(), ["image_sise=3"])
    with pytest.raises(EdgeVLAError, match="no `=`"):
        apply_overrides({}, ["oops"])
    with pytest.raises(EdgeVLAError, match="unknown model config keys"):
        VLAConfig.from_dict({**preset("tiny").to_dict(), "bogus": 1})


def _save_standins(tmp_path, lm_kind):
    """Tiny stand-ins for a hub LM (Qwen2 or Llama) + SigLIP, saved the way the hub stores them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config,
                              SiglipConfig, SiglipModel)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(INSTRUCTIONS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=hf_tok.vocab_size)
    lm_cfg = Qwen2Config(**kw) if lm_kind == "qwen2" else LlamaConfig(**kw)
    AutoModelForCausalLM.from_config(lm_cfg).save_pretrained(tmp_path / "lm")
    hf_tok.save_pretrained(tmp_path / "lm")
    sig = SiglipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=16),
                       text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100))
    SiglipModel(sig).save_pretrained(tmp_path / "vision")
    return str(tmp_path / "lm"), str(tmp_path / "vision")


@pytest.mark.parametrize("name,lm_kind", [("minivla", "qwen2"), ("openvla", "llama")])
def test_large_presets_load_with_from_pretrained_and_round_trip(tmp_path, name, lm_kind):
    lm_path, vision_path = _save_standins(tmp_path, lm_kind)
    cfg = preset(name, [f"lm_path={lm_path}", f"vision_path={vision_path}", "image_size=32", "projector_hidden=32"])
    stats_samples = make_samples(3, image_size=32)
    from edge_vla.tokens.action import ActionStats

    vla = VLA.from_config(cfg, action_stats=ActionStats.from_actions(np.stack([s.action for s in stats_samples])))
    assert vla.lm.config.model_type == lm_kind
    from transformers import AutoTokenizer

    base_vocab = len(AutoTokenizer.from_pretrained(lm_path))
    assert vla.processor.tokenizer.first_action_id == base_vocab  # appended after the LM's own vocabulary
    assert vla.lm.get_input_embeddings().weight.shape[0] == vla.processor.tokenizer.vocab_size
    assert not getattr(vla.vision.config, "vision_use_head", False)
    out = vla.save_pretrained(tmp_path / "ckpt")
    # The checkpoint rebuilds without the original paths.
    import shutil

    shutil.rmtree(lm_path)
    shutil.rmtree(vision_path)
    back = VLA.from_pretrained(out)
    s = stats_samples[0]
    images = {"agentview": s.images["agentview"]}
    np.testing.assert_array_equal(policy_action(back, images, s.instruction), policy_action(vla, images, s.instruction))


def test_unreachable_hub_id_is_a_clear_error():
    cfg = preset("minivla", ["lm_path=/nonexistent/qwen", "tokenizer_path=/nonexistent/qwen"])
    with pytest.raises(EdgeVLAError, match="could not load a tokenizer"):
        VLA.from_config(cfg)
