"""Every released ECoT layout reads through EcotAnnotations and gives the same Reasoning for the same content."""

import json
import warnings

import numpy as np
import pytest

from edge_vla.data.dataset import open_dataset
from edge_vla.data.ecot_json import EcotAnnotations, episode_layout
from edge_vla.data.libero_hdf5 import write_libero_hdf5
from edge_vla.errors import EdgeVLAError

T = 6
FILE = "/authors/machine/libero_90/KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5"
BOXES = [("bowl", [10, 12, 30, 40]), ("stove", [40, 5, 60, 30])]


def expected_gripper(t):
    return [(20 + k, 30 - k) for k in range(t, min(t + 5, T))]


def bridge_layout():
    """ECoT's Bridge layout: text under `reasoning`, per-step lists under `features`."""
    reasoning = {str(t): {"task": "turn on the stove", "plan": "1. reach the knob 2. turn it",
                          "subtask_reason": "the knob is off", "subtask": "turn the knob",
                          "move_reason": "the gripper is left of the knob", "move": "move right"} for t in range(T)}
    return {FILE: {"0": {"reasoning": reasoning, "metadata": {"episode_id": 0, "n_steps": T},
                         "features": {"gripper_position": [[20 + t, 30 - t] for t in range(T)],
                                      "bboxes": [[[n, b] for n, b in BOXES] for _ in range(T)],
                                      "move_primitive": ["move right"] * T}}}}


def libero_layout(plan_as_dict=False, boxes="pairs", grip="point"):
    """libero_reasonings.json: one flat record per step, other key names."""
    eps = {}
    for t in range(T):
        plan = {"1": "reach the knob", "2": "turn it"} if plan_as_dict else "1. reach the knob 2. turn it"
        if boxes == "pairs":
            bb = [[n, b] for n, b in BOXES]
        elif boxes == "triples":
            bb = [[0.9, n, b] for n, b in BOXES]
        elif boxes == "dict":
            bb = {n: b for n, b in BOXES}
        else:  # dict of corner pairs
            bb = {n: [[b[0], b[1]], [b[2], b[3]]] for n, b in BOXES}
        g = [20 + t, 30 - t] if grip == "point" else [list(p) for p in expected_gripper(t)]
        eps[str(t)] = {"task": "turn on the stove", "plan": plan, "bboxes": bb,
                       "subtask_reasoning": "the knob is off", "subtask": "turn the knob",
                       "movement_reasoning": "the gripper is left of the knob", "movement": "move right",
                       "gripper": g}
    return {FILE: {"0": eps}}


VARIANTS = {
    "bridge": bridge_layout(),
    "libero": libero_layout(),
    "libero-plan-dict": libero_layout(plan_as_dict=True),
    "libero-bbox-triples": libero_layout(boxes="triples"),
    "libero-bbox-dict": libero_layout(boxes="dict"),
    "libero-bbox-corners": libero_layout(boxes="corners"),
    "libero-gripper-track": libero_layout(grip="track"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_layout_gives_the_same_reasoning(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(VARIANTS[name]))
    ann = EcotAnnotations.load(path)
    assert ann.looks_like_ecot()
    for t in range(T):
        r = ann.reasoning("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", 0, t)  # matched by file name
        assert r is not None
        assert r.plan == "1. reach the knob 2. turn it"
        assert r.subtask_reason == "the knob is off" and r.subtask == "turn the knob"
        assert r.move_reason == "the gripper is left of the knob" and r.move == "move right"
        assert r.visible_objects == BOXES
        assert r.gripper == expected_gripper(t)
        assert r.task == "turn on the stove"
    assert ann.reasoning("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", 1, 0) is None  # no such demo


def test_layout_detection():
    assert episode_layout(bridge_layout()[FILE]["0"]) == "bridge"
    assert episode_layout(libero_layout()[FILE]["0"]) == "per_step"
    assert episode_layout({"foo": 1}) is None
    assert not EcotAnnotations({"x.hdf5": {"0": {"foo": 1}}}).looks_like_ecot()


def _demo_file(root, n=T):
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.8, 0.8, (n, 7)).astype(np.float32)
    imgs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return write_libero_hdf5(root / "libero_90/KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5",
                             [{"actions": a, "images": {"agentview": imgs, "wrist": imgs}}], "turn on the stove")


def test_libero_layout_trains_through_open_dataset_and_missing_steps_warn(tmp_path):
    """The per-step layout used to load silently with every Reasoning empty; now it reads, and a
    step without a record is a warning."""
    _demo_file(tmp_path)
    data = libero_layout()
    del data[FILE]["0"]["3"]
    (tmp_path / "libero_reasonings.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"1 step\(s\) of 1 episode\(s\) have no record .*demo_0 step 3"):
        ds = open_dataset(tmp_path, split="all", drop_noops=False)
    assert ds.has_reasoning
    rs = [ds[i].reasoning for i in range(len(ds))]
    assert all(r is not None and r.subtask == "turn the knob" and r.move == "move right" for r in rs)
    assert rs[3].gripper[0] == (22, 28)  # step 3 reuses step 2's record


def test_an_ecot_file_for_other_demos_is_one_line(tmp_path):
    _demo_file(tmp_path)
    other = {"/x/LIVING_ROOM_SCENE1_other_task_demo.hdf5": libero_layout()[FILE]}
    (tmp_path / "reasoning.json").write_text(json.dumps(other))
    with pytest.raises(EdgeVLAError, match="has no record for any demo of") as e:
        open_dataset(tmp_path, split="all")
    assert "LIVING_ROOM_SCENE1_other_task_demo.hdf5" in str(e.value)
    # Same file, wrong demo ids: also no record for any demo.
    (tmp_path / "reasoning.json").write_text(json.dumps({FILE: {"7": libero_layout()[FILE]["0"]}}))
    with pytest.raises(EdgeVLAError, match="has no record for any demo"):
        open_dataset(tmp_path, split="all")


def test_too_many_annotated_steps_is_an_error(tmp_path):
    _demo_file(tmp_path, n=4)
    (tmp_path / "r.json").write_text(json.dumps(libero_layout()))
    with pytest.raises(EdgeVLAError, match="has 6 annotated steps, the demo has 4"):
        open_dataset(tmp_path, split="all")
