"""The demo orchestrator's own checks (the whole demo runs in the slow test_demo.py)."""

import json

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.pipeline import DEMO_TASKS, PRETRAINED_INFO, DemoConfig, check_pretrained


def shipped_dir(tmp_path, recipes, info):
    for r in recipes:
        (tmp_path / r).mkdir()
        (tmp_path / r / "config.json").write_text("{}")
    if info is not None:
        (tmp_path / PRETRAINED_INFO).write_text(json.dumps(info))
    return tmp_path


def test_shipped_checkpoints_matching_the_demo_pass(tmp_path):
    cfg = DemoConfig()
    d = shipped_dir(tmp_path, cfg.recipes, {"tasks": list(DEMO_TASKS), "action_chunk": cfg.action_chunk})
    check_pretrained(d, cfg)


@pytest.mark.parametrize("case, message", [
    ("missing recipe", "no shipped checkpoint for recipe `ecot-lite-dropout`"),
    ("no info", "has no pretrained.json"),
    ("other task", "were not trained on LIVING_ROOM_SCENE2_pick_up_the_butter"),
    ("other chunk", "predict chunks of 8 actions, the demo is set to 4"),
])
def test_shipped_checkpoints_that_do_not_match_are_refused_before_training(tmp_path, case, message):
    cfg = DemoConfig()
    recipes = [r for r in cfg.recipes if not (case == "missing recipe" and r == "ecot-lite-dropout")]
    info = {"tasks": ["KITCHEN_SCENE1_put_the_black_bowl_on_the_plate"] if case == "other task" else list(DEMO_TASKS),
            "action_chunk": 8 if case == "other chunk" else cfg.action_chunk}
    d = shipped_dir(tmp_path, recipes, None if case == "no info" else info)
    with pytest.raises(EdgeVLAError, match=message):
        check_pretrained(d, cfg)


def test_with_shipped_checkpoints_the_live_runs_are_short_proofs():
    from edge_vla.pipeline import live_steps, train_config_for

    assert live_steps(DemoConfig()) == 300
    cfg = DemoConfig(pretrained="pretrained/x")
    assert live_steps(cfg) == 100 and train_config_for(cfg, "ecot").steps == 100
    assert train_config_for(DemoConfig.quick(pretrained="p"), "vla").steps == 30
