"""Recipes: sequences, loss masks, stage switches, dropout rates and test-time decoding."""

import numpy as np
import pytest

from conftest import make_samples
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.sequence import IGNORE, action_prefix_ids, reasoning_ids
from edge_vla.train.recipes import RECIPES, get_recipe


@pytest.fixture(scope="module")
def parts(tiny_vla):
    tok = tiny_vla.processor.tokenizer
    s = make_samples(4)[1]
    return tok, tiny_vla.action_tokenizer, tiny_vla.processor.prompt_ids(s.instruction), s


def encode(recipe, parts, seed=0, stage=None, sample=None):
    tok, act, prompt, s = parts
    return recipe.encode(sample or s, tok, act, prompt, np.random.default_rng(seed), stage)


def action_part(parts):
    tok, act, _, s = parts
    return action_prefix_ids(tok) + act.encode(s.action).tolist() + [tok.eos_id]


def test_registry_names_and_unknown_recipe():
    assert set(RECIPES) == {"vla", "ecot", "ecot-lite-dropout", "ecot-lite-pretrain", "scaffold", "thinking-tokens"}
    with pytest.raises(EdgeVLAError, match="unknown recipe `ecot-lite-drop`.*did you mean `ecot-lite-dropout`"):
        get_recipe("ecot-lite-drop")
    with pytest.raises(EdgeVLAError, match="has no option"):
        get_recipe("vla", p=0.3)
    with pytest.raises(EdgeVLAError, match="probability"):
        get_recipe("ecot-lite-dropout", p=1.5)


def test_vla_sequence_prompt_then_actions(parts):
    tok, act, prompt, s = parts
    row = encode(get_recipe("vla"), parts)
    assert row["input_ids"] == prompt + action_part(parts)
    assert row["labels"] == [IGNORE] * len(prompt) + action_part(parts)
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_ecot_learns_reasoning_then_actions_and_decodes_full(parts):
    tok, act, prompt, s = parts
    r = get_recipe("ecot")
    row = encode(r, parts)
    mid = reasoning_ids(tok, s.reasoning)
    assert len(mid) > 20
    assert row["input_ids"] == prompt + mid + action_part(parts)
    assert row["labels"] == [IGNORE] * len(prompt) + mid + action_part(parts)
    assert r.decode_mode == "full" and r.max_free_tokens > len(mid) and r.inference_prefix_ids(tok) == []


def test_reasoning_recipes_reject_samples_without_reasoning(parts):
    tok, act, prompt, _ = parts
    bare = make_samples(2, with_reasoning=False)[0]
    for name in ("ecot", "ecot-lite-dropout", "ecot-lite-pretrain", "scaffold"):
        with pytest.raises(EdgeVLAError, match="needs reasoning"):
            encode(get_recipe(name), parts, sample=bare)
    assert encode(get_recipe("vla"), parts, sample=bare)["input_ids"]


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_rate_within_binomial_bounds_and_both_paths_exact(parts, p):
    tok, act, prompt, s = parts
    r = get_recipe("ecot-lite-dropout", p=p)
    n = 2000
    ecot_row, vla_row = encode(get_recipe("ecot"), parts), encode(get_recipe("vla"), parts)
    dropped = 0
    for seed in range(n):
        row = encode(r, parts, seed=seed)
        assert row in (ecot_row, vla_row)  # the whole reasoning, or none of it
        dropped += row == vla_row
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(dropped / n - p) < 4.5 * sigma
    assert r.decode_mode == "direct" and r.inference_prefix_ids(tok) == action_prefix_ids(tok)


def test_per_tag_dropout_keeps_each_tag_with_one_minus_p(parts):
    tok, act, prompt, s = parts
    r = get_recipe("ecot-lite-dropout", p=0.5, per_tag=True)
    n_tags = len(s.reasoning.present_fields())
    kept, partial = [], 0
    for seed in range(600):
        text = tok.decode(encode(r, parts, seed=seed)["input_ids"][len(prompt):])
        k = sum(tag in text for tag in ("TASK:", "PLAN:", "VISIBLE OBJECTS:", "SUBTASK REASONING:", "SUBTASK:",
                                        "MOVE REASONING:", "MOVE:", "GRIPPER POSITION:"))
        kept.append(k)
        partial += 0 < k < n_tags
    # SUBTASK: also matches inside "SUBTASK REASONING:", MOVE: inside "MOVE REASONING:" — fine for a mean.
    assert partial > 400  # most samples keep some tags and lose others
    assert 0.3 * n_tags < np.mean(kept) < 0.8 * n_tags


def test_pretrain_stages_switch_targets(parts):
    tok, act, prompt, s = parts
    mid = reasoning_ids(tok, s.reasoning)
    r = get_recipe("ecot-lite-pretrain", stage1_fraction=0.25)
    assert [r.stage_at(i, 100) for i in (0, 24, 25, 99)] == ["reasoning", "reasoning", "actions", "actions"]
    stage1 = encode(r, parts, stage="reasoning")
    assert stage1 == encode(get_recipe("ecot"), parts)  # default: stage 1 is the full ECoT objective
    stage2 = encode(r, parts, stage="actions")
    assert stage2 == encode(get_recipe("vla"), parts)
    reasoning_only = encode(get_recipe("ecot-lite-pretrain", stage1_action_loss=False), parts, stage="reasoning")
    n_act = len(action_part(parts))
    assert reasoning_only["labels"] == [IGNORE] * len(prompt) + mid + [IGNORE] * n_act
    assert r.decode_mode == "direct"
    with pytest.raises(EdgeVLAError, match="no stage"):
        encode(r, parts, stage="main")


def test_scaffold_puts_reasoning_in_input_without_loss(parts):
    tok, act, prompt, s = parts
    mid = reasoning_ids(tok, s.reasoning)
    row = encode(get_recipe("scaffold", p=0.0), parts)
    assert row["input_ids"] == prompt + mid + action_part(parts)
    assert row["labels"] == [IGNORE] * (len(prompt) + len(mid)) + action_part(parts)
    assert encode(get_recipe("scaffold", p=1.0), parts) == encode(get_recipe("vla"), parts)


def test_thinking_tokens_filler_before_action_matches_inference_prefix(parts):
    tok, act, prompt, s = parts
    r = get_recipe("thinking-tokens", n=8)
    row = encode(r, parts)
    prefix = r.inference_prefix_ids(tok)
    assert len(prefix) == 8 + len(action_prefix_ids(tok)) and len(set(prefix[:8])) == 1
    assert row["input_ids"] == prompt + prefix + act.encode(s.action).tolist() + [tok.eos_id]
    assert row["labels"][: len(prompt) + 8] == [IGNORE] * (len(prompt) + 8)
    assert "reasoning" not in str(row)
    # The runtime re-encodes recipe.json's prefix text: it must give back the same ids.
    info = r.info(tok)
    assert tok.encode(info["inference_prefix"]) == prefix == info["inference_prefix_ids"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_direct_recipes_train_on_what_they_decode(parts, name):
    """For every direct recipe some training rows start with prompt + the forced inference prefix."""
    tok, act, prompt, s = parts
    r = get_recipe(name)
    info = r.info(tok)
    assert set(info) >= {"name", "options", "decode_mode", "max_free_tokens", "inference_prefix"}
    if r.decode_mode != "direct":
        return
    prefix = prompt + r.inference_prefix_ids(tok)
    stage = r.stages[-1]
    assert any(encode(r, parts, seed=i, stage=stage)["input_ids"][: len(prefix)] == prefix for i in range(20))
    assert info["inference_prefix"].strip().endswith("ACTION:")


def test_same_seed_same_sequence(parts):
    r = get_recipe("ecot-lite-dropout", per_tag=True)
    assert encode(r, parts, seed=3) == encode(r, parts, seed=3)


def test_per_batch_dropout_shares_one_draw_per_micro_batch(tiny_vla):
    """per_batch: every row of a micro-batch keeps the reasoning or none does (no padding to the
    longest row), while the batches still mix both kinds at rate p."""
    from edge_vla.train.data import MicroBatches, RecipeDataset

    samples = make_samples(12, with_reasoning=True)
    kinds = {}
    for per_batch in (True, False):
        r = get_recipe("ecot-lite-dropout", p=0.5, per_batch=per_batch)
        ds = RecipeDataset(samples, r, tiny_vla.processor, tiny_vla.action_tokenizer, seed=3)
        batches = [[len(ds[k]["input_ids"]) > 80 for k in keys] for keys in MicroBatches(12, 6, 0, 40, seed=3)]
        kinds[per_batch] = [len(set(b)) == 1 for b in batches], [b[0] for b in batches]
    uniform, first = kinds[True]
    assert all(uniform)
    assert 8 < sum(first) < 32  # both kinds of batch occur
    assert not all(kinds[False][0])  # per-sample draws mix lengths inside a batch


def test_reasoning_budget_is_recorded_for_every_recipe_that_writes_reasoning(parts, tiny_vla):
    """A dropout model acts directly but reasons on demand (full/adaptive mode): its budget is its
    own max_reasoning_tokens, not the runtime's generic default; recipes without reasoning get none."""
    from edge_vla.runtime.policy import Policy
    from edge_vla.runtime.torch_backend import TorchBackend

    tok = parts[0]
    assert get_recipe("ecot-lite-dropout", max_reasoning_tokens=300).info(tok)["max_free_tokens"] == 300
    assert get_recipe("ecot", max_reasoning_tokens=200).max_free_tokens == 200
    assert get_recipe("ecot-lite-pretrain").max_free_tokens > 0
    assert get_recipe("vla").max_free_tokens == 0 and get_recipe("thinking-tokens").max_free_tokens == 0
    # A checkpoint written before (dropout recorded 0) still gets its options' budget in the Policy.
    old = get_recipe("ecot-lite-dropout", max_reasoning_tokens=300).info(tok) | {"max_free_tokens": 0}
    tiny_vla.recipe_info = old
    try:
        assert Policy(TorchBackend(tiny_vla), mode="full").max_free_tokens == 300
    finally:
        tiny_vla.recipe_info = {}
