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


def test_reasoning_fidelity_compares_what_was_written_field_by_field():
    from edge_vla.tokens.reasoning import Reasoning
    from edge_vla.train.evaluate import _fidelity_summary, reasoning_fidelity

    ann = Reasoning(subtask="pick up the butter", move="move left", gripper=[(10, 10), (12, 10)],
                    visible_objects=[("butter", [1, 2, 3, 4]), ("basket", [5, 6, 7, 8])])
    assert reasoning_fidelity(ann, ann) == {"subtask": True, "move": True, "gripper_px": 0.0, "objects_f1": 1.0}
    off = Reasoning(subtask="pick up the butter", move="move right", gripper=[(12, 10)],
                    visible_objects=[("butter", [1, 2, 3, 4]), ("milk", [0, 0, 1, 1])])
    assert reasoning_fidelity(off, ann) == {"subtask": True, "move": False, "gripper_px": 1.0, "objects_f1": 0.5}
    # no tag written at all: every field wrong, no gripper distance to take
    assert reasoning_fidelity(None, ann) == {"subtask": False, "move": False, "objects_f1": 0.0}
    rows = [{"subtask": True, "move": True, "gripper_px": 0.0, "action_acc": 0.9},
            {"subtask": False, "move": False, "action_acc": 0.3}]
    s = _fidelity_summary(rows)
    assert s["reasoning_n"] == 2 and s["reasoning_move_acc"] == 0.5 and s["reasoning_gripper_px"] == 0.0
    assert s["action_token_acc_move_right"] == 0.9 and s["action_token_acc_move_wrong"] == 0.3
    assert "reasoning_objects_f1" not in s


def test_a_saved_checkpoint_evaluates_to_what_its_run_logged(run):
    from edge_vla.train.evaluate import evaluate_checkpoint

    final, val, summary = run
    data = make_samples(24, seed=3)  # the run's data: its summary's split gives the same held-out samples
    r = evaluate_checkpoint(final, data, CFG.val_max_samples)
    assert r["mode"] == "direct" and r["split"] == {"val_fraction": 0.25, "seed": 0, "drop_noops": True}
    for k in ("action_token_acc", "action_token_acc_tf", "free_tokens", "n"):
        assert r["metrics"][k] == summary["final_val"][k], k
    assert "reasoning_n" not in r["metrics"]  # direct mode writes no reasoning
    full = evaluate_checkpoint(final, data, CFG.val_max_samples, mode="full")["metrics"]
    assert full["reasoning_n"] == CFG.val_max_samples
    assert 0 <= full["reasoning_move_acc"] <= 1 and 0 <= full["reasoning_objects_f1"] <= 1


def test_eval_offline_cli_on_a_dataset_directory(run, tmp_path):
    from click.testing import CliRunner

    from _trained_tiny import train_tiny_checkpoint
    from conftest import INSTRUCTIONS, random_demos
    from edge_vla.cli import main
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    data = tmp_path / "ds"
    write_libero_hdf5(data / "libero_90" / "TASK_pick_up_the_butter_demo.hdf5", random_demos(20), INSTRUCTIONS[0])
    ckpt, _ = train_tiny_checkpoint(tmp_path / "vla", steps=5)  # a `vla` checkpoint, no training summary
    out = tmp_path / "offline.json"
    r = CliRunner().invoke(main, ["eval", "offline", str(ckpt), "--data", str(data), "--samples", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    written = json.loads(out.read_text())
    assert written["split"]["val_fraction"] == TrainConfig().val_fraction  # the training defaults
    assert written["metrics"]["n"] == 3 and 0 <= written["metrics"]["action_token_acc"] <= 1
    assert "action_token_acc" in r.output
    r = CliRunner().invoke(main, ["eval", "offline", str(ckpt), "--data", str(data), "--samples", "0"])
    assert r.exit_code != 0 and "--samples" in r.output and "Traceback" not in r.output
    # a reasoning recipe on data without reasoning: one line saying so
    r = CliRunner().invoke(main, ["eval", "offline", str(run[0]), "--data", str(data)])
    assert r.exit_code == 1 and "needs reasoning" in r.output and "Traceback" not in r.output
