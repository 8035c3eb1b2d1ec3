import numpy as np
import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.reasoning import TAGS, Reasoning, build_prompt


def full_reasoning():
    return Reasoning(
        task="put the butter in the basket", plan="1. pick up the butter 2. put it in the basket",
        visible_objects=[("butter", [10, 20, 30, 40]), ("wicker basket", [50, 5, 90, 45])],
        subtask_reason="the butter is not grasped yet", subtask="pick up the butter",
        move_reason="the gripper is left of the butter", move="move right",
        gripper=[(12, 34), (13, 35), (15, 36)],
    )


def test_text_has_ecot_tags_in_order_and_ends_with_action():
    text = full_reasoning().to_text()
    positions = [text.index(tag) for _, tag, _ in TAGS]
    assert positions == sorted(positions)
    assert text.endswith("ACTION:")
    assert "butter [10, 20, 30, 40], wicker basket [50, 5, 90, 45]" in text
    assert "GRIPPER POSITION: [12, 34, 13, 35, 15, 36]" in text


def test_text_round_trip():
    r = full_reasoning()
    assert Reasoning.from_text(r.to_text()) == r
    assert Reasoning.from_text(r.to_text(include_action_tag=False)) == r


def test_dict_round_trip():
    r = full_reasoning()
    assert Reasoning.from_dict(r.to_dict()) == r


def test_subtask_reasoning_is_not_confused_with_subtask():
    r = Reasoning(subtask_reason="why", subtask="what")
    back = Reasoning.from_text(r.to_text())
    assert back.subtask_reason == "why" and back.subtask == "what"


def test_per_tag_dropout_rate_is_within_statistical_bounds():
    rng = np.random.default_rng(0)
    r = full_reasoning()
    kept = [len(r.drop_tags(0.3, rng).present_fields()) for _ in range(2000)]
    rate = 1 - np.mean(kept) / len(TAGS)
    # binomial with n = 16000 tags: sd ~ 0.0036
    assert abs(rate - 0.3) < 0.02
    assert r.drop_tags(0.0, rng) == r
    assert r.drop_tags(1.0, rng).is_empty()
    dropped = r.drop_tags(0.5, np.random.default_rng(3))
    assert Reasoning.from_text(dropped.to_text()) == dropped


def test_errors():
    with pytest.raises(EdgeVLAError):
        Reasoning.from_text("no tags at all")
    with pytest.raises(EdgeVLAError):
        full_reasoning().drop_tags(1.5, np.random.default_rng())
    with pytest.raises(EdgeVLAError):
        build_prompt("   ")


def test_prompt_is_openvla_ecot_template():
    assert build_prompt("Put the butter in the basket.") == \
        "In: What action should the robot take to put the butter in the basket?\nOut:"


def test_generated_reasoning_parses_with_the_tag_its_prompt_ended_in():
    """ECoT's own prompt ends in `TASK:`: what the model writes starts with the task's value."""
    from edge_vla.tokens.reasoning import Reasoning

    written = " put the spoon on the towel PLAN: 1. grasp the spoon 2. place it GRIPPER POSITION: [10, 20, 11, 21]"
    r = Reasoning.from_generated(written, "What action should the robot take to put the spoon? ASSISTANT: TASK:")
    assert r.task == "put the spoon on the towel" and r.plan == "1. grasp the spoon 2. place it"
    assert r.gripper == [(10, 20), (11, 21)]
    same = Reasoning.from_generated("TASK:" + written, "ASSISTANT:")  # the tag written by the model itself
    assert same == r
    assert Reasoning.from_generated("no tags at all", "Out:") is None  # an untrained model's babble
