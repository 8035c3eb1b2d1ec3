"""LeRobotDataset v3.0 / v2.1 written by lerobot itself (tests/fixtures/lerobot) read through open_dataset."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_vla.data.dataset import open_dataset
from edge_vla.data.lerobot_read import LeRobotSource, parse_key_map
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.reasoning import Reasoning

FIX = Path(__file__).parent / "fixtures" / "lerobot"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)
FRONT_MAP = {"agentview": "observation.images.front", "wrist": "observation.images.hand"}
CASES = [("v30_libero", None, 10.0), ("v21_libero", None, 10.0), ("v30_images", FRONT_MAP, 0.0)]


@pytest.mark.parametrize("name,key_map,tol", CASES)
def test_reads_every_frame_state_action_and_task(name, key_map, tol):
    ds = open_dataset(FIX / name, split="all", drop_noops=False, val_fraction=0.0, key_map=key_map)
    assert len(ds) == sum(mf.LENGTHS) and len(ds.episodes) == len(mf.LENGTHS)
    assert ds.instructions == sorted(mf.TASKS)
    i = 0
    for ep, n in enumerate(mf.LENGTHS):
        frames, wrist, state, action, reasoning = mf.expected_episode(ep)
        for t in range(n):
            s = ds[i]
            i += 1
            assert s.step == t and s.episode.endswith(f"episode_{ep}") and s.instruction == mf.TASKS[ep % 2]
            np.testing.assert_array_equal(s.state, state[t])
            np.testing.assert_array_equal(s.action, action[t])
            for cam, exp in (("agentview", frames), ("wrist", wrist)):
                img = s.images[cam]
                assert img.shape == (mf.SIZE, mf.SIZE, 3) and img.dtype == np.uint8
                errs = [np.abs(img.astype(float) - x).mean() for x in exp]
                assert errs[t] <= tol, (name, ep, t, cam, errs[t])  # PNG: exact; AV1 at 32 px: codec tolerance
                assert int(np.argmin(errs)) == t  # the frame of this step, not a neighbour
            if name == "v30_libero":
                assert s.reasoning == Reasoning.from_dict(reasoning[t])
            else:
                assert s.reasoning is None


def test_frame_seek_path_matches_the_whole_episode_cache(monkeypatch):
    """Large datasets decode one frame per step (seek); small ones cache episodes: same frames."""
    cached = LeRobotSource(FIX / "v30_libero")
    monkeypatch.setenv("EDGE_VLA_FRAME_CACHE_MB", "0")
    seek = LeRobotSource(FIX / "v30_libero")
    for demo in ("episode_0", "episode_2", "episode_1"):
        for t in (0, 5, 3, 8):
            np.testing.assert_array_equal(seek.image(demo, "wrist", t), cached.image(demo, "wrist", t))
    assert not seek._frames and cached._frames


def test_noops_dropped_and_split_by_episode():
    ds = open_dataset(FIX / "v30_libero", split="all")
    assert len(ds) == sum(mf.LENGTHS) - 3 and ds.n_steps_recorded == sum(mf.LENGTHS)  # step 2 of each episode
    assert all(2 not in e.steps for e in ds.episodes)
    train = open_dataset(FIX / "v30_libero", split="train", val_fraction=0.34)
    val = open_dataset(FIX / "v30_libero", split="val", val_fraction=0.34)
    assert len(val.episodes) == 1 and not set(train.episode_names) & set(val.episode_names)
    assert train.action_stats.dim == 7


def test_noop_filter_does_not_delete_a_task(tmp_path):
    root = tmp_path / "still"
    shutil.copytree(FIX / "v30_images", root)
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(f)
    ep = t.column("episode_index").to_numpy()
    act = np.stack(t.column("action").to_pylist()).astype(np.float32)
    act[ep == 1] = 0.0  # task 1 ("open the top drawer") never moves
    arr = pa.FixedSizeListArray.from_arrays(pa.array(act.reshape(-1)), 7)
    pq.write_table(t.set_column(t.column_names.index("action"), "action", arr), f)
    with pytest.warns(UserWarning, match="would drop every step of task 'open the top drawer'"):
        ds = open_dataset(root, split="all", key_map=FRONT_MAP)
    assert "open the top drawer" in ds.instructions
    assert len([e for e in ds.episodes if e.demo == "episode_1"][0].steps) == mf.LENGTHS[1]


def test_key_map_parsing_and_bad_keys():
    assert parse_key_map(["agentview=a.b", "wrist=c d=e"]) == {"agentview": "a.b", "wrist": "c", "d": "e"}
    with pytest.raises(EdgeVLAError, match="bad --map entry"):
        parse_key_map(["agentview"])
    with pytest.raises(EdgeVLAError, match=r"no image feature for camera\(s\) agentview, wrist.*observation.images.front"):
        open_dataset(FIX / "v30_images", split="all")
    with pytest.raises(EdgeVLAError, match=r"has no feature 'observation.images.nope'.*its features: observation.images.front"):
        open_dataset(FIX / "v30_images", split="all", key_map={"agentview": "observation.images.nope"})
    with pytest.raises(EdgeVLAError, match="is float32, not an image"):
        open_dataset(FIX / "v30_images", split="all", key_map={"agentview": "observation.state"})


def _copy(tmp_path, name):
    root = tmp_path / name
    shutil.copytree(FIX / name, root)
    return root


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(EdgeVLAError, match="looks like a Hugging Face hub id.*pass a local directory"):
        open_dataset("HuggingFaceVLA/libero")
    # v2/v3 mismatch: info.json says v3.0 but the files are v2.1's
    root = _copy(tmp_path, "v21_libero")
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v3.0"}))
    with pytest.raises(EdgeVLAError, match=r"says v3.0 but holds v2.x files"):
        open_dataset(root)
    (root / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(EdgeVLAError, match="LeRobotDataset v1.6"):
        open_dataset(root)
    # a video that cannot be decoded
    root = _copy(tmp_path, "v30_libero")
    (root / "videos/observation.images.image/chunk-000/file-000.mp4").write_bytes(b"not a video" * 100)
    ds = open_dataset(root, split="all")
    with pytest.raises(EdgeVLAError, match="cannot decode"):
        ds[0]
    # an action that is not 7-dim
    with pytest.raises(EdgeVLAError, match="`observation.state` has 8 dims; edge-vla's policies take 7"):
        open_dataset(FIX / "v30_libero", key_map={"action": "observation.state"})


def test_ecot_json_matched_by_episode_index(tmp_path):
    """Reasoning for a LeRobot set from an ECoT JSON: episodes are LeRobot episode indices."""
    rec = {str(t): {"plan": {"1": "reach", "2": "grasp"}, "subtask": f"step {t}", "movement": "move left",
                    "gripper": [3, 4]} for t in range(mf.LENGTHS[1])}
    (tmp_path / "r.json").write_text(json.dumps({"v21_libero": {"1": rec}}))
    ds = open_dataset(FIX / "v21_libero", split="all", drop_noops=False, annotations=tmp_path / "r.json")
    assert ds.has_reasoning
    s = [ds[i] for i in range(len(ds)) if ds[i].episode.endswith("episode_1")]
    assert [x.reasoning.subtask for x in s] == [f"step {t}" for t in range(mf.LENGTHS[1])]
    assert s[0].reasoning.plan == "1. reach 2. grasp" and s[0].reasoning.move == "move left"
    assert ds[0].reasoning is None  # episode 0 has none
    (tmp_path / "r.json").write_text(json.dumps({"v21_libero": {"9": rec}}))
    with pytest.raises(EdgeVLAError, match="has no record for any demo"):
        open_dataset(FIX / "v21_libero", split="all", annotations=tmp_path / "r.json")


def test_language_persistent_rows_give_plan_subtask_move():
    from edge_vla.data.lerobot_read import _from_language

    rows = [{"role": "assistant", "content": "reach then grasp", "style": "plan", "timestamp": 0.0},
            {"role": "assistant", "content": "reach", "style": "subtask", "timestamp": 0.0},
            {"role": "assistant", "content": "grasp", "style": "subtask", "timestamp": 0.5},
            {"role": "assistant", "content": "move down", "style": "motion", "timestamp": 0.3}]
    assert _from_language(rows, 0.2) == Reasoning(plan="reach then grasp", subtask="reach")
    assert _from_language(rows, 0.6) == Reasoning(plan="reach then grasp", subtask="grasp", move="move down")
    assert _from_language([], 0.0) is None
