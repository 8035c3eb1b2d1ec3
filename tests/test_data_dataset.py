"""open_dataset on a tiny LIBERO file written here: episode split, no-op drop, chunks, reasoning join."""

import json

import numpy as np
import pytest

from edge_vla.data.dataset import is_noop, open_dataset
from edge_vla.data.ecot_json import EcotAnnotations
from edge_vla.data.libero_hdf5 import write_libero_hdf5
from edge_vla.data.sample import Sample
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.reasoning import Reasoning

N_EPISODES, T = 10, 8
NOOP_STEPS = (0, 4)  # per episode: step 0 (still, first) and step 4 (still, gripper unchanged)


def episode_actions(e):
    a = np.zeros((T, 7), np.float32)
    for t in range(T):
        a[t, 0] = 0.01 * (t + 1) + e  # distinct, so chunks can be checked value by value
        a[t, 6] = -1.0 if t < 5 else 1.0
    for t in NOOP_STEPS:
        a[t, :6] = 0.0
    return a


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    demos = []
    for e in range(N_EPISODES):
        imgs = rng.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8)
        imgs[:, 0, 0, 0] = e  # episode id in a pixel, to check images follow their step
        imgs[:, 0, 0, 1] = np.arange(T)
        demos.append({"actions": episode_actions(e), "states": np.zeros((T, 4)),
                      "proprio": np.tile(np.arange(8, dtype=np.float32), (T, 1)) + e,
                      "images": {"agentview": imgs, "wrist": imgs}})
    rel = "libero_90/SCENE_task_demo.hdf5"
    write_libero_hdf5(root / rel, demos, "do the task")
    ann = EcotAnnotations({})
    for e in range(N_EPISODES):
        steps = [Reasoning(task="do the task", subtask=f"sub {e} {t}", move="move up") for t in range(T)]
        ann.set_episode(rel, e, steps, [(t, e) for t in range(T)])
    ann.save(root / "reasoning.json")
    (root / "manifest.json").write_text(json.dumps({"files": [rel], "reasoning": "reasoning.json"}))
    return root


def test_noop_rule():
    assert is_noop(np.array([0, 0, 0, 0, 0, 0, -1.0]), None)
    assert is_noop(np.array([0, 0, 0, 0, 0, 0, -1.0]), np.array([1, 0, 0, 0, 0, 0, -1.0]))
    assert not is_noop(np.array([0, 0, 0, 0, 0, 0, 1.0]), np.array([0, 0, 0, 0, 0, 0, -1.0]))  # gripper closes
    assert not is_noop(np.array([0.01, 0, 0, 0, 0, 0, -1.0]), None)


def test_split_by_episode_and_noops(tiny_dataset):
    tr = open_dataset(tiny_dataset, split="train", val_fraction=0.2)
    va = open_dataset(tiny_dataset, split="val", val_fraction=0.2)
    al = open_dataset(tiny_dataset, split="all", val_fraction=0.2)
    assert set(tr.episode_names).isdisjoint(va.episode_names)
    assert len(va.episodes) == 2 and len(tr.episodes) == 8
    kept = T - len(NOOP_STEPS)
    assert len(tr) == 8 * kept and len(va) == 2 * kept and len(al) == len(tr) + len(va)
    assert all(s.step not in NOOP_STEPS for s in (al[i] for i in range(len(al))))
    assert len(open_dataset(tiny_dataset, split="all", drop_noops=False)) == N_EPISODES * T
    # Statistics come from the training episodes only.
    train_eps = sorted(int(n.split("_")[-1]) for n in tr.episode_names)
    expect = np.concatenate([np.delete(episode_actions(e), NOOP_STEPS, axis=0) for e in train_eps])
    assert tr.action_stats.max[0] == pytest.approx(expect[:, 0].max())
    assert va.action_stats.to_dict() == tr.action_stats.to_dict()
    # Another seed, another split; the same seed, the same split.
    assert open_dataset(tiny_dataset, split="val", val_fraction=0.2, seed=1).episode_names != va.episode_names \
        or open_dataset(tiny_dataset, split="val", val_fraction=0.2, seed=2).episode_names != va.episode_names
    assert open_dataset(tiny_dataset, split="val", val_fraction=0.2).episode_names == va.episode_names


def test_samples_images_state_reasoning(tiny_dataset):
    ds = open_dataset(tiny_dataset, split="all")
    assert ds.instructions == ["do the task"] and ds.has_reasoning
    for i in (0, 5, len(ds) - 1):
        s = ds[i]
        assert isinstance(s, Sample)
        e = int(s.episode.split("_")[-1])
        assert s.images["agentview"].shape == (8, 8, 3) and s.images["agentview"].dtype == np.uint8
        assert s.images["agentview"][0, 0, 0] == e and s.images["agentview"][0, 0, 1] == s.step
        np.testing.assert_allclose(s.state, np.arange(8) + e)
        assert s.state.dtype == np.float32 and s.action.shape == (7,)
        np.testing.assert_allclose(s.action, episode_actions(e)[s.step])
        assert s.reasoning.subtask == f"sub {e} {s.step}"
        assert s.reasoning.gripper[0] == (s.step, e)


def test_action_chunks_follow_kept_steps_and_pad(tiny_dataset):
    ds = open_dataset(tiny_dataset, split="all", action_chunk=4)
    e0 = [i for i in range(len(ds)) if ds[i].episode.endswith("demo_0")]
    kept = [t for t in range(T) if t not in NOOP_STEPS]
    a = episode_actions(0)
    first, last = ds[e0[0]], ds[e0[-1]]
    assert first.action.shape == (4, 7)
    np.testing.assert_allclose(first.action, a[kept[:4]])  # the no-op step 4 is skipped in the chunk too
    np.testing.assert_allclose(last.action, np.repeat(a[kept[-1:]], 4, axis=0))  # padded with the last action


def test_single_file_with_annotations_and_errors(tiny_dataset, tmp_path):
    f = tiny_dataset / "libero_90/SCENE_task_demo.hdf5"
    ds = open_dataset(f, split="all", annotations=tiny_dataset / "reasoning.json")
    assert ds.has_reasoning and len(ds.all_episodes) == N_EPISODES
    assert not open_dataset(f, split="all").has_reasoning
    with pytest.raises(EdgeVLAError, match="unknown split"):
        open_dataset(f, split="test")
    with pytest.raises(EdgeVLAError, match="no images for camera"):
        open_dataset(f, cameras=("agentview", "side"))
    with pytest.raises(EdgeVLAError, match="not found"):
        open_dataset(tmp_path / "nothing")
    # An annotation file whose step counts do not match the demos is refused.
    bad = EcotAnnotations.load(tiny_dataset / "reasoning.json")
    ep = bad.data["libero_90/SCENE_task_demo.hdf5"]["3"]
    ep["features"]["gripper_position"] = ep["features"]["gripper_position"][:-1]
    bad.save(tmp_path / "bad.json")
    with pytest.raises(EdgeVLAError, match="annotated steps"):
        open_dataset(f, annotations=tmp_path / "bad.json")


def test_dataloader_batches(tiny_dataset):
    import torch

    ds = open_dataset(tiny_dataset, split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=list, num_workers=0)
    batch = next(iter(loader))
    assert len(batch) == 4 and all(isinstance(s, Sample) for s in batch)
