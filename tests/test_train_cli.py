"""`edge-vla train` / `edge-vla distill` on a LIBERO-layout dataset on disk, and a 2-process DDP run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import INSTRUCTIONS
from edge_vla.cli import main
from edge_vla.data.ecot_json import EcotAnnotations
from edge_vla.data.libero_hdf5 import write_libero_hdf5
from edge_vla.model.vla import VLA
from edge_vla.tokens.reasoning import Reasoning

N_EPISODES, T = 8, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Eight moving episodes with ECoT reasoning, written as `edge-vla data` writes them."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    demos = []
    for e in range(N_EPISODES):
        a = rng.uniform(-0.8, 0.8, (T, 7)).astype(np.float32)
        a[:, 6] = np.where(np.arange(T) < 3, -1.0, 1.0)
        demos.append({"actions": a, "proprio": rng.normal(size=(T, 8)).astype(np.float32),
                      "images": {c: rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8) for c in ("agentview", "wrist")}})
    rel = "libero_90/LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket_demo.hdf5"
    write_libero_hdf5(root / rel, demos, INSTRUCTIONS[0])
    ann = EcotAnnotations({})
    for e in range(N_EPISODES):
        steps = [Reasoning(task=INSTRUCTIONS[0], plan="1. pick up the butter 2. put it in the basket",
                           subtask="pick up the butter", move="move down" if t < 3 else "move up") for t in range(T)]
        ann.set_episode(rel, e, steps, [(10 + t, 20 + e) for t in range(T)])
    ann.save(root / "reasoning.json")
    (root / "manifest.json").write_text(json.dumps({"files": [rel], "reasoning": "reasoning.json"}))
    return root


SMALL = ["--set", "batch_size=4", "--set", "warmup_steps=1", "--set", "val_max_samples=2", "--set", "log_every=1",
         "--set", "val_fraction=0.25"]


def test_train_then_distill_from_the_command_line(tmp_path, dataset):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--recipe", "ecot-lite-dropout", "--data", str(dataset), "--out", str(out),
                                    "--set", "steps=3", "--set", "recipe_options.p=0.3", "--no-progress", *SMALL])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "final" / "recipe.json").read_text())
    assert info["name"] == "ecot-lite-dropout" and info["options"]["p"] == 0.3 and info["decode_mode"] == "direct"
    summary = json.loads((out / "summary.json").read_text())  # how to reproduce the checkpoint
    assert summary["command"].startswith("edge-vla train --recipe ecot-lite-dropout --data ")
    assert "--set recipe_options.p=0.3" in summary["command"] and summary["config"]["recipe_options"] == {"p": 0.3}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/action_token_acc" in r for r in records)

    # Resuming a finished run with another recipe is refused with one line, no traceback.
    res = CliRunner().invoke(main, ["train", "--recipe", "vla", "--data", str(dataset), "--out", str(out), "--resume",
                                    *SMALL, "--set", "steps=3"])
    assert res.exit_code == 1 and "config differs" in res.output and "Traceback" not in res.output

    res = CliRunner().invoke(main, ["distill", "--teacher", str(out / "final"), "--data", str(dataset), "--out",
                                    str(tmp_path / "small"), "--mode", "size", "--student", "lm.num_hidden_layers=2",
                                    "--set", "steps=2", "--set", "batch_size=4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert VLA.from_pretrained(tmp_path / "small" / "final").config.lm["num_hidden_layers"] == 2


def test_train_rejects_reasoning_recipe_on_data_without_reasoning(tmp_path, dataset):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in dataset.rglob("*.hdf5"):
        (bare / f.name).write_bytes(f.read_bytes())
    res = CliRunner().invoke(main, ["train", "--recipe", "ecot", "--data", str(bare), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "needs reasoning" in res.output
    assert not (tmp_path / "o").exists()


def test_two_process_ddp_trains_and_checkpoints(tmp_path, dataset):
    """2 CPU processes (DDP over gloo through accelerate): they stay in sync and checkpoint once."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # torchrun sets RANK/WORLD_SIZE; accelerate's Accelerator picks them up (MULTI_CPU, gloo) exactly as
    # under `accelerate launch` on GPUs. (`accelerate launch --cpu --num_processes 2` starts one process.)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "edge_vla.cli", "train", "--recipe", "vla",
           "--data", str(dataset), "--out", str(out), "--no-progress", *SMALL, "--set", "steps=3",
           "--set", "save_every=2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    state = json.loads((out / "state" / "trainer.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    a, b = load_file(str(out / "checkpoint-000002" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # step 3 changed the weights
    VLA.from_pretrained(out / "final")
