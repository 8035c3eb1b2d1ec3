"""LIBERO hdf5 and ECoT JSON: round trips, the released layouts, and clear errors on bad files."""

import json

import h5py
import numpy as np
import pytest

from edge_vla.data.ecot_json import EcotAnnotations, episode_record, episode_step_reasoning
from edge_vla.data.libero_hdf5 import LiberoHDF5, instruction_from_filename, write_libero_hdf5
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.reasoning import Reasoning


def make_demo(n=6, size=16, seed=0, with_states=True):
    rng = np.random.default_rng(seed)
    d = {
        "actions": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
        "proprio": rng.normal(size=(n, 8)).astype(np.float32),
        "images": {"agentview": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                   "wrist": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)},
    }
    if with_states:
        d["states"] = rng.normal(size=(n, 11))
    return d


def test_hdf5_round_trip_streams_canonical_images(tmp_path):
    demos = [make_demo(6, seed=1), make_demo(4, seed=2)]
    p = write_libero_hdf5(tmp_path / "KITCHEN_SCENE1_put_the_bowl_on_the_plate_demo.hdf5", demos,
                          "put the bowl on the plate", attrs={"suite": "libero_90"})
    with LiberoHDF5(p) as h:
        assert h.demos == ["demo_0", "demo_1"]
        assert h.instruction == "put the bowl on the plate"
        assert h.cameras() == ["agentview", "wrist"] and h.image_size() == 16
        assert h.length("demo_1") == 4
        np.testing.assert_allclose(h.actions("demo_0"), demos[0]["actions"], atol=1e-6)
        np.testing.assert_allclose(h.states("demo_1"), demos[1]["states"])
        np.testing.assert_allclose(h.proprio("demo_0"), demos[0]["proprio"], atol=1e-6)
        for t in range(4):
            np.testing.assert_array_equal(h.image("demo_1", "wrist", t), demos[1]["images"]["wrist"][t])
    # On disk the images are stored as MuJoCo renders them (the released files' frame): flipped.
    with h5py.File(p, "r") as f:
        raw = f["data/demo_0/obs/agentview_rgb"][2]
        np.testing.assert_array_equal(raw, demos[0]["images"]["agentview"][2][::-1, ::-1])
        assert f["data/demo_0/obs/agentview_rgb"].chunks[0] == 1  # one frame per chunk: streaming reads


def test_reads_a_released_style_file(tmp_path):
    """The released LIBERO files: raw frames, ee_pos/ee_ori/gripper_states, no image_frame attribute."""
    p = tmp_path / "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket_demo.hdf5"
    img = np.zeros((3, 8, 8, 3), np.uint8)
    img[:, 0, 0] = 255  # top-left of the raw frame -> bottom-right of the canonical frame
    with h5py.File(p, "w") as f:
        g = f.create_group("data/demo_0")
        f["data"].attrs["problem_info"] = json.dumps({"language_instruction": ["pick", "up", "the", "butter"]})
        g["actions"] = np.zeros((3, 7))
        g["states"] = np.zeros((3, 5))
        g["obs/agentview_rgb"] = img
        g["obs/ee_pos"] = np.ones((3, 3))
        g["obs/ee_ori"] = 2 * np.ones((3, 3))
        g["obs/gripper_states"] = 3 * np.ones((3, 2))
    with LiberoHDF5(p) as h:
        assert h.instruction == "pick up the butter"
        assert h.image("demo_0", "agentview", 1)[7, 7, 0] == 255
        np.testing.assert_array_equal(h.proprio("demo_0")[0], [1, 1, 1, 2, 2, 2, 3, 3])
        assert h.task_name == "LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket"


def test_instruction_from_filename():
    assert instruction_from_filename("KITCHEN_SCENE10_close_the_top_drawer_of_the_cabinet_demo.hdf5") == \
        "close the top drawer of the cabinet"


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(EdgeVLAError, match="not found"):
        LiberoHDF5(tmp_path / "missing.hdf5")
    txt = tmp_path / "x.hdf5"
    txt.write_text("hello")
    with pytest.raises(EdgeVLAError, match="not an hdf5 file"):
        LiberoHDF5(txt)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros(3)
    with pytest.raises(EdgeVLAError, match="no `data` group"):
        LiberoHDF5(other)
    p = write_libero_hdf5(tmp_path / "nostates_demo.hdf5", [make_demo(3, with_states=False)], "do it")
    with LiberoHDF5(p) as h, pytest.raises(EdgeVLAError, match="no `states`"):
        h.states("demo_0")
    with LiberoHDF5(p) as h, pytest.raises(EdgeVLAError, match="no demo"):
        h.actions("demo_9")


def reasoning(t):
    return Reasoning(task="put the bowl on the plate", plan="1. pick up the bowl 2. put the bowl on the plate",
                     visible_objects=[("bowl", [1, 2, 3 + t, 4]), ("plate", [5, 6, 7, 8])],
                     subtask_reason="the bowl is not grasped", subtask="pick up the bowl",
                     move_reason="the bowl is below", move="move down", gripper=None)


def test_ecot_json_round_trip(tmp_path):
    steps = [reasoning(t) for t in range(7)]
    px = [(10 + t, 20 - t) for t in range(7)]
    ann = EcotAnnotations({})
    ann.set_episode("/nfs/elsewhere/libero_90/KITCHEN_SCENE1_x_demo.hdf5", 3, steps, px)
    p = ann.save(tmp_path / "r.json")
    back = EcotAnnotations.load(p)
    # Matched by file name, so the released JSON (authors' absolute paths) works with a local copy.
    r = back.reasoning("/local/copy/KITCHEN_SCENE1_x_demo.hdf5", "3", 2)
    assert r.subtask == "pick up the bowl" and r.move == "move down"
    assert r.visible_objects == [("bowl", [1, 2, 5, 4]), ("plate", [5, 6, 7, 8])]
    assert r.gripper == [(12, 18), (13, 17), (14, 16), (15, 15), (16, 14)]  # now + the next 4
    assert back.reasoning("KITCHEN_SCENE1_x_demo.hdf5", 3, 6).gripper == [(16, 14)]  # end of episode
    assert back.reasoning("unknown_demo.hdf5", 3, 0) is None
    assert Reasoning.from_text(r.to_text()) == r
    back.check_episode("KITCHEN_SCENE1_x_demo.hdf5", 3, 7)
    with pytest.raises(EdgeVLAError, match="7 annotated steps, the demo has 9"):
        back.check_episode("KITCHEN_SCENE1_x_demo.hdf5", 3, 9)


def test_released_layout_with_sparse_steps():
    """The released JSON: string step keys, features per step; a missing step uses the latest before it."""
    ep = {"reasoning": {"0": {"task": "t", "plan": "p", "subtask": "a", "subtask_reason": "r", "move": "move up",
                              "move_reason": "m"},
                        "2": {"task": "t", "plan": "p", "subtask": "b", "subtask_reason": "r", "move": "stop",
                              "move_reason": "m"}},
          "features": {"gripper_position": [[1, 2], [3, 4], [5, 6]], "bboxes": [[["cup", [0, 0, 5, 5]]], [], []],
                       "move_primitive": ["move up", "move up", "stop"]}}
    assert episode_step_reasoning(ep, 1).subtask == "a"
    assert episode_step_reasoning(ep, 2).subtask == "b"
    assert episode_step_reasoning(ep, 0).visible_objects == [("cup", [0, 0, 5, 5])]
    assert episode_step_reasoning(ep, 0).gripper == [(1, 2), (3, 4), (5, 6)]
    rec = episode_record([episode_step_reasoning(ep, t) for t in range(3)], [[1, 2], [3, 4], [5, 6]])
    assert set(rec) == {"reasoning", "features"} and set(rec["reasoning"]) == {"0", "1", "2"}
    assert set(rec["features"]) == {"gripper_position", "bboxes", "move_primitive"}


def test_bad_annotation_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(EdgeVLAError, match="not valid JSON"):
        EcotAnnotations.load(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(EdgeVLAError, match="not ECoT annotation JSON"):
        EcotAnnotations.load(p)
