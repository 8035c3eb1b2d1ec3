"""Policy decoding modes on the torch backend (random tiny VLA: decoding logic, not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_vla.errors import EdgeVLAError
from edge_vla.data.observations import sample_to_obs
from edge_vla.runtime.policy import BACKENDS, ActionResult, Policy, backend_class, load_policy
from edge_vla.runtime.torch_backend import TorchBackend
from edge_vla.tokens.reasoning import Reasoning
from edge_vla.tokens.sequence import action_prefix_ids
from _reference_decode import reference_decode


@pytest.fixture(scope="module")
def backend(tiny_vla):
    return TorchBackend(tiny_vla)


def test_direct_mode_equals_the_reference_decoder_with_forced_action_prefix(tiny_vla, backend, samples):
    p = Policy(backend, mode="direct")
    for s in samples[:3]:
        r = p.act(sample_to_obs(s))
        assert isinstance(r, ActionResult) and r.reasoning_text is None
        pv, ids, st = tiny_vla.model_inputs(s.images, s.instruction, s.state,
                                            action_prefix_ids(tiny_vla.processor.tokenizer))
        free, act = reference_decode(tiny_vla, pv, ids, st, max_free_tokens=0)
        assert r.info["action_token_ids"] == act
        np.testing.assert_allclose(r.action, tiny_vla.action_tokenizer.decode(np.array(act)), atol=1e-6)
        assert r.tokens == {"prompt": ids.shape[1] - len(p.inference_prefix_ids), "reasoning": 0, "action": 7}
        assert r.timings["total"] >= r.timings["vision"] + r.timings["prefill"] > 0


def test_full_mode_equals_the_reference_decoder_and_returns_the_reasoning(tiny_vla, backend, samples):
    s = samples[0]
    p = Policy(backend, mode="full", max_free_tokens=5, force_action_prefix=False)
    r = p.act(sample_to_obs(s))
    pv, ids, st = tiny_vla.model_inputs(s.images, s.instruction, s.state)
    free, act = reference_decode(tiny_vla, pv, ids, st, max_free_tokens=5)
    assert r.info["free_token_ids"] == free
    assert r.info["action_token_ids"] == act
    assert r.reasoning_text == tiny_vla.processor.tokenizer.decode(free).removesuffix("ACTION:").rstrip()
    assert r.tokens["reasoning"] == len(free) == len(r.timings["decode_tokens"])


def test_full_mode_forces_the_action_prefix_when_reasoning_runs_out(backend, samples):
    p = Policy(backend, mode="full", max_free_tokens=3)
    r = p.act(sample_to_obs(samples[0]))
    if r.tokens["reasoning"] == 3:  # budget exhausted: " ACTION:" was forced, one more timed step
        assert len(r.timings["decode_tokens"]) == 4
    assert r.action.shape == (7,) and np.isfinite(r.action).all()


def test_adaptive_reasons_only_when_uncertain(backend, samples):
    obs = sample_to_obs(samples[0])
    never = Policy(backend, mode="adaptive", entropy_threshold=1e9, max_free_tokens=4)
    always = Policy(backend, mode="adaptive", entropy_threshold=-1.0, max_free_tokens=4)
    direct = Policy(backend, mode="direct").act(obs)
    full = Policy(backend, mode="full", max_free_tokens=4).act(obs)
    a, b = never.act(obs), always.act(obs)
    assert not a.info["adaptive"]["reasoned"] and a.info["action_token_ids"] == direct.info["action_token_ids"]
    assert b.info["adaptive"]["reasoned"] and b.info["action_token_ids"] == full.info["action_token_ids"]
    assert b.info["adaptive"]["entropy"] > 0 and 0 <= b.info["adaptive"]["margin"] <= 1
    by_margin = Policy(backend, mode="adaptive", entropy_threshold=1e9, margin_threshold=2.0, max_free_tokens=4)
    assert by_margin.act(obs).info["adaptive"]["reasoned"]


def test_mode_defaults_from_recipe_and_bad_names_are_explained(tiny_vla, backend):
    tiny_vla.recipe_info = {"name": "ecot", "decode_mode": "full", "max_free_tokens": 7}
    try:
        p = Policy(TorchBackend(tiny_vla))
        assert p.mode == "full" and p.max_free_tokens == 7
    finally:
        tiny_vla.recipe_info = {}
    assert Policy(backend).mode == "direct"
    tok = tiny_vla.processor.tokenizer
    # recipe.json's exact prefix ids are used as they are; a full recipe's empty prefix still acts directly.
    tiny_vla.recipe_info = {"name": "thinking-tokens", "decode_mode": "direct", "inference_prefix": "...",
                            "inference_prefix_ids": [7, 7, 7]}
    try:
        assert Policy(TorchBackend(tiny_vla)).inference_prefix_ids == [7, 7, 7]
        tiny_vla.recipe_info = {"name": "ecot", "decode_mode": "full", "inference_prefix": "", "inference_prefix_ids": []}
        p = Policy(TorchBackend(tiny_vla), mode="adaptive")
        assert p.inference_prefix_ids == action_prefix_ids(tok) == p.forced_action_ids
    finally:
        tiny_vla.recipe_info = {}
    with pytest.raises(EdgeVLAError, match="decode mode"):
        Policy(backend, mode="fast")
    with pytest.raises(EdgeVLAError, match="onnxruntime"):
        backend_class("onnxruntim")
    assert {"torch", "onnxruntime", "tensorrt"} <= set(BACKENDS)


def test_load_policy_errors(tmp_path):
    with pytest.raises(EdgeVLAError, match="no checkpoint or bundle"):
        load_policy(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(EdgeVLAError, match="is a file"):
        load_policy(tmp_path / "f")
    with pytest.raises(EdgeVLAError, match="neither an edge-vla checkpoint .* nor a bundle"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EdgeVLAError, match="lacks model.safetensors"):
        load_policy(tmp_path)


def test_nan_logits_are_refused_not_decoded(backend, samples):
    class Broken:
        def __getattr__(self, k):
            return getattr(backend, k)

        def action_logits(self, hidden, logits):
            return np.full(256, np.nan, np.float32)

    with pytest.raises(EdgeVLAError, match="NaN"):
        Policy(Broken()).act(sample_to_obs(samples[0]))


def test_bitsandbytes_int8_and_nf4_torch_backends_decode(tmp_path, tiny_vla, samples):
    pytest.importorskip("bitsandbytes")
    tiny_vla.save_pretrained(tmp_path / "ckpt")
    obs = sample_to_obs(samples[0])
    for q in ("int8", "nf4"):
        p = load_policy(tmp_path / "ckpt", backend="torch", quantize=q)
        names = {type(m).__name__ for m in p.backend.vla.lm.modules()}
        assert {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[q] in names
        r = p.act(obs)
        assert r.action.shape == (7,) and np.isfinite(r.action).all()
    with pytest.raises(EdgeVLAError, match="quantization"):
        load_policy(tmp_path / "ckpt", backend="torch", quantize="int3")


def test_min_free_tokens_keeps_reasoning_going(backend, samples):
    p = Policy(backend, mode="full", max_free_tokens=6, min_free_tokens=6)
    r = p.act(sample_to_obs(samples[0]))
    assert r.tokens["reasoning"] == 6 and r.tokens["action"] == 7


def test_accuracy_report_counts_action_and_reasoning_agreement(backend, samples):
    from edge_vla.export.accuracy import accuracy_report, format_report

    obs = [sample_to_obs(s) for s in samples[:2]]
    ref = Policy(backend, max_free_tokens=4, min_free_tokens=4)
    same = accuracy_report(ref, Policy(backend, max_free_tokens=4, min_free_tokens=4), obs, modes=("direct", "full"))
    assert same["direct"]["action_token_agreement"] == 1.0 and same["direct"]["action_l1"] == 0.0
    assert same["full"]["reasoning_token_agreement"] == 1.0 and len(same["full"]["per_dim_l1"]) == 7
    # A policy that reasons less agrees on fewer reasoning positions.
    short = accuracy_report(ref, Policy(backend, max_free_tokens=2, min_free_tokens=2), obs, modes=("full",))
    assert short["full"]["reasoning_token_agreement"] <= 0.5 + 1e-9
    assert "reasoning-token agreement" in format_report(short)


def test_teacher_forced_agreement_is_the_per_position_argmax_under_the_reference_tokens(tiny_vla, backend, samples):
    """A perturbed copy is scored position by position against one parallel forward pass of the
    perturbed model over the reference's tokens, the independent definition of teacher forcing."""
    import copy

    from edge_vla.export.accuracy import accuracy_report, teacher_forced

    noisy = copy.deepcopy(tiny_vla)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.lm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std().clamp_min(1e-3))
    ref, test = Policy(backend, mode="direct"), Policy(TorchBackend(noisy), mode="direct")
    tok = tiny_vla.processor.tokenizer
    lo = tok.first_action_id
    obs = [sample_to_obs(s) for s in samples[:4]]
    agree = total = 0
    for s, o in zip(samples[:4], obs):
        a = ref.act(o)
        _, pred = teacher_forced(test, o, a)
        ids = a.info["action_token_ids"]
        pv, inp, st = noisy.model_inputs(s.images, s.instruction, s.state, ref.inference_prefix_ids + ids[:-1])
        with torch.no_grad():
            logits = noisy(pv, inp, state=st).logits[0, -len(ids):, lo:lo + tok.n_bins]
        assert pred == (lo + logits.argmax(-1)).tolist()
        agree += sum(int(x == y) for x, y in zip(pred, ids))
        total += len(ids)
    rep = accuracy_report(ref, test, obs)["direct"]
    assert rep["action_token_agreement_tf"] == pytest.approx(agree / total)
    assert rep["action_token_agreement_tf"] < 1.0  # the perturbation is large enough to flip some bins
    assert accuracy_report(ref, Policy(backend, mode="direct"), obs)["direct"]["action_token_agreement_tf"] == 1.0


def test_full_mode_starts_the_reasoning_of_a_model_that_learned_to_write_it(tiny_vla, samples):
    """A reasoning-dropout model left free may take the short path; full mode forces " TASK:"."""
    import copy

    from edge_vla.train.recipes import get_recipe

    tok = tiny_vla.processor.tokenizer
    forced = tok.encode(" TASK:")
    assert get_recipe("ecot-lite-dropout").info(tok)["reasoning_prefix_ids"] == forced
    assert get_recipe("vla").info(tok)["reasoning_prefix_ids"] == []
    dropout = copy.copy(tiny_vla)
    dropout.recipe_info = {"name": "ecot-lite-dropout"}  # recipe.json from before the field: by name
    be = TorchBackend(dropout)
    obs = sample_to_obs(samples[0])
    r = Policy(be, mode="full", max_free_tokens=4).act(obs)
    assert r.info["free_token_ids"][:len(forced)] == forced and r.reasoning_text.startswith("TASK:")
    assert r.reasoning == Reasoning.from_text(r.reasoning_text)  # the written reasoning, parsed
    assert Policy(be, mode="direct").reasoning_prefix_ids == forced  # kept for adaptive's fallback
    plain = Policy(be, mode="full", max_free_tokens=4, reasoning_prefix="").act(obs)
    assert plain.info["free_token_ids"][:len(forced)] != forced or not plain.info["free_token_ids"]
