"""Validation decodes through the deployed decoder (Policy over the model being trained): its
numbers are what the deployed policy does on the same samples, in every decode mode."""

import json

import numpy as np
import pytest

from conftest import make_samples
from edge_vla.data.dataset import pick_evenly
from edge_vla.data.observations import sample_to_obs
from edge_vla.model.vla import VLA
from edge_vla.runtime.policy import Policy, load_policy
from edge_vla.runtime.torch_backend import TorchBackend
from edge_vla.tokens.sequence import reasoning_prefix_ids
from edge_vla.train.config import TrainConfig
from edge_vla.train.data import open_split
from edge_vla.train.evaluate import evaluate
from edge_vla.train.recipes import get_recipe
from edge_vla.train.trainer import train

CFG = TrainConfig(recipe="ecot-lite-dropout", steps=20, batch_size=8, warmup_steps=2, lr=3e-3, val_fraction=0.25,
                  val_max_samples=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_samples(24, seed=3)
    out = tmp_path_factory.mktemp("dropout")
    final = train(CFG, data, out, show_progress=False)
    val = open_split(data, "val", CFG.val_fraction, CFG.action_chunk, CFG.drop_noops, CFG.seed)
    return final, pick_evenly(val, CFG.val_max_samples), json.loads((out / "summary.json").read_text())


def policy_metrics(policy, samples) -> tuple[float, float]:
    """(action-token accuracy, mean tokens decoded before the action) of `policy` on `samples`."""
    hits = total = 0
    free = []
    for s in samples:
        r = policy.act(sample_to_obs(s))
        target = policy.action_tokenizer.encode(np.asarray(s.action)).reshape(-1)
        hits += int((np.asarray(r.info["action_token_ids"]) == target).sum())
        total += target.size
        free.append(r.tokens["reasoning"])
    return hits / total, float(np.mean(free))


def test_final_validation_accuracy_is_what_the_deployed_policy_decodes(run):
    final, val, summary = run
    acc, free = policy_metrics(load_policy(final, backend="torch"), val)  # recipe.json's mode: direct
    assert summary["final_val"]["n"] == len(val) == CFG.val_max_samples
    assert summary["final_val"]["action_token_acc"] == acc
    assert summary["final_val"]["free_tokens"] == free == 0


def test_full_mode_validation_reasons_from_the_forced_prefix_as_the_policy_does(run):
    final, val, _ = run
    model = VLA.from_pretrained(final)
    recipe = get_recipe(model.recipe_info["name"], **model.recipe_info["options"])
    metrics = evaluate(model, recipe, val, len(val), mode="full")
    acc, free = policy_metrics(Policy(TorchBackend(VLA.from_pretrained(final)), mode="full"), val)
    assert metrics["action_token_acc"] == acc and metrics["free_tokens"] == free
    assert free >= len(reasoning_prefix_ids(model.processor.tokenizer))  # the reasoning was started for it


def test_validation_leaves_a_training_model_in_train_mode(run):
    final, val, _ = run
    model = VLA.from_pretrained(final).train()
    recipe = get_recipe(model.recipe_info["name"], **model.recipe_info["options"])
    evaluate(model, recipe, val, 1)
    assert model.training
