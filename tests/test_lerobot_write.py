"""hdf5 -> LeRobot v3.0 (`edge-vla data export-lerobot`) -> edge-vla keeps every field; training on LeRobot data."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_vla.cli import main
from edge_vla.data.dataset import open_dataset
from edge_vla.data.ecot_json import EcotAnnotations
from edge_vla.data.libero_hdf5 import write_libero_hdf5
from edge_vla.tokens.reasoning import Reasoning

FIX = Path(__file__).parent / "fixtures" / "lerobot"
S, T, N_EP = 64, 7, 3
TASKS = ["put the bowl on the plate", "open the top drawer"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two task files of demos with reasoning, as `edge-vla data generate` lays them out (smooth images)."""
    root = tmp_path_factory.mktemp("gen")
    yy, xx = np.mgrid[0:S, 0:S]
    rng = np.random.default_rng(0)
    ann = EcotAnnotations({})
    files = []
    for k, task in enumerate(TASKS):
        demos = []
        for e in range(N_EP):
            imgs = np.stack([np.stack([(xx * 3 + t * 5 + e * 30) % 256, (yy * 3 + k * 50) % 256,
                                       np.full_like(xx, 90)], -1) for t in range(T)]).astype(np.uint8)
            a = rng.uniform(-0.9, 0.9, (T, 7)).astype(np.float32)
            a[:, 6] = np.where(np.arange(T) < 3, -1.0, 1.0)
            a[4, :6] = 0.0  # a no-op step: exported too, dropped again on reading
            demos.append({"actions": a, "proprio": rng.normal(size=(T, 8)).astype(np.float32),
                          "images": {"agentview": imgs, "wrist": 255 - imgs}})
            steps = [Reasoning(task=task, plan="1. reach 2. grasp", visible_objects=[("bowl", [1 + t, 2, 30, 40])],
                               subtask_reason="not held", subtask=f"sub {k}{e}{t}", move_reason="above it",
                               move="move down", gripper=[(10 + t, 20 + e), (11 + t, 21 + e)]) for t in range(T)]
            steps[5] = Reasoning(task=task, subtask="only some fields")
            rel = f"libero_90/SCENE{k}_task_{k}_demo.hdf5"
            ann.set_episode(rel, e, steps, [(10 + t, 20 + e) for t in range(T)])
        write_libero_hdf5(root / rel, demos, task)
        files.append(rel)
    ann.save(root / "reasoning.json")
    (root / "manifest.json").write_text(json.dumps({"files": files, "reasoning": "reasoning.json"}))
    return root


@pytest.fixture(scope="module")
def exported(generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("le") / "set"
    res = CliRunner().invoke(main, ["data", "export-lerobot", str(generated), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "LeRobotDataset v3.0, 6 episodes, 42 frames, 2 tasks, reasoning: yes" in res.output
    return out


def test_round_trip_keeps_every_field(generated, exported):
    a = open_dataset(generated, split="all", drop_noops=False, val_fraction=0.0)
    b = open_dataset(exported, split="all", drop_noops=False, val_fraction=0.0)
    assert len(a) == len(b) == 2 * N_EP * T and a.instructions == b.instructions and b.has_reasoning
    worst = 0.0
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.instruction == y.instruction and x.step == y.step
        np.testing.assert_array_equal(x.state, y.state)
        np.testing.assert_array_equal(x.action, y.action)
        assert x.reasoning == y.reasoning and y.reasoning is not None
        for c in ("agentview", "wrist"):
            worst = max(worst, np.abs(x.images[c].astype(float) - y.images[c]).mean())
    assert worst < 6.0  # AV1 (crf 30) on 64 px frames
    # No-op filtering gives the same kept steps either way, and the same action statistics.
    a2, b2 = open_dataset(generated, split="all"), open_dataset(exported, split="all")
    assert len(a2) == len(b2) == 2 * N_EP * (T - 1)
    np.testing.assert_allclose(a2.action_stats.q99, b2.action_stats.q99)


def test_export_layout_is_lerobot_v30(exported):
    import pyarrow.parquet as pq

    info = json.loads((exported / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == 42
    assert {"observation.images.image", "observation.images.wrist_image", "observation.state", "action",
            "reasoning", "timestamp", "frame_index", "episode_index", "index", "task_index"} <= set(info["features"])
    ep = pq.read_table(exported / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in ep] == [0, 7, 14, 21, 28, 35]
    assert ep[2]["videos/observation.images.image/from_timestamp"] == pytest.approx(1.4)
    tasks = pq.read_table(exported / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((exported / "meta/stats.json").read_text())
    assert len(stats["action"]["q01"]) == 7 and np.asarray(stats["observation.images.image"]["mean"]).shape == (3, 1, 1)
    res = CliRunner().invoke(main, ["data", "export-lerobot", str(exported), "-o", str(exported)])
    assert res.exit_code == 1 and "would delete the input" in res.output


@pytest.mark.parametrize("recipe", ["vla", "ecot-lite-dropout"])
def test_train_a_few_steps_on_lerobot_written_data(tmp_path, recipe):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--recipe", recipe, "--data", str(FIX / "v30_libero"), "--out", str(out),
                                    "--set", "steps=2", "--set", "batch_size=4", "--set", "warmup_steps=1",
                                    "--set", "val_fraction=0.34", "--set", "val_max_samples=2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "model.safetensors").exists()


def test_train_with_a_key_map_and_reasoning_recipe_refused_without_reasoning(tmp_path, monkeypatch):
    import edge_vla.data.dataset as dataset

    monkeypatch.setattr(dataset, "_DEFAULT_KEY_MAP", {})  # --map sets it for the process
    args = ["train", "--data", str(FIX / "v30_images"), "--set", "steps=1", "--set", "batch_size=4",
            "--set", "warmup_steps=1", "--set", "val_fraction=0.34", "--set", "val_max_samples=2", "--no-progress",
            "--map", "agentview=observation.images.front", "--map", "wrist=observation.images.hand"]
    res = CliRunner().invoke(main, [*args, "--recipe", "ecot-lite-dropout", "--out", str(tmp_path / "a")])
    assert res.exit_code == 1 and "needs reasoning" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, [*args, "--recipe", "vla", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output


def test_export_lerobot_never_loses_what_is_there(generated, exported, tmp_path):
    """A foreign non-empty directory is refused unless --overwrite; the demos themselves never."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    res = CliRunner().invoke(main, ["data", "export-lerobot", str(generated), "-o", str(precious)])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert (precious / "notes.txt").read_text() == "x"
    res = CliRunner().invoke(main, ["data", "export-lerobot", str(generated), "-o", str(generated), "--overwrite"])
    assert res.exit_code != 0 and "would delete the input" in res.output
    assert (generated / "manifest.json").is_file()
    res = CliRunner().invoke(main, ["data", "export-lerobot", str(generated), "-o", str(precious), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (precious / "notes.txt").exists() and (precious / "meta" / "info.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious.")]  # no staging left behind
