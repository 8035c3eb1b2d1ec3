"""The trainer: loss falls for every recipe, exact resume, checkpoints, bad input before any step."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_samples
from edge_vla.errors import EdgeVLAError
from edge_vla.model.vla import VLA
from edge_vla.tokens.action import ActionStats
from edge_vla.train.config import TrainConfig, load_train_config
from edge_vla.train.recipes import RECIPES
from edge_vla.train.trainer import train

FAST = dict(batch_size=8, warmup_steps=2, lr=3e-3, log_every=1, val_fraction=0.0)


@pytest.fixture(scope="module")
def data():
    return make_samples(24, seed=1)


def losses(out):
    return [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_loss_falls_for_every_recipe(tmp_path, data, name):
    opts = {"n": 4} if name == "thinking-tokens" else {}
    cfg = TrainConfig(recipe=name, recipe_options=opts, steps=10, **FAST)
    final = train(cfg, data, tmp_path, show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(tmp_path)) == 10
    # Per stage: ecot-lite-pretrain's second stage starts on a new target (actions only).
    for stage in dict.fromkeys(r["stage"] for r in records):
        ls = [r["train/loss"] for r in records if r.get("stage") == stage]
        assert np.mean(ls[-2:]) < 0.9 * np.mean(ls[:2]), (stage, ls)
    info = json.loads((final / "recipe.json").read_text())
    assert info["name"] == name and info["decode_mode"] == RECIPES[name].decode_mode
    model = VLA.from_pretrained(final)
    assert model.recipe_info == info and model.action_stats is not None


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_resume_after_kill_reaches_the_same_weights(tmp_path, data):
    cfg = TrainConfig(recipe="ecot-lite-dropout", steps=4, grad_accum=2, augment_shift=4, **{**FAST, "batch_size": 4})
    straight = train(cfg, data, tmp_path / "a", show_progress=False)
    stopped = train(cfg, data, tmp_path / "b", stop_at_step=2, show_progress=False)
    assert stopped.name == "state" and not (tmp_path / "b" / "final").exists()
    assert json.loads((stopped / "trainer.json").read_text())["step"] == 2
    with pytest.raises(EdgeVLAError, match="--resume"):
        train(cfg, data, tmp_path / "b", show_progress=False)
    resumed = train(cfg, data, tmp_path / "b", resume=True, show_progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics of the resumed run continue the first one's without duplicates.
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == list(range(1, 5))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    # throughput counts both sessions' samples (4 steps x 2 micro-batches x 4), over both sessions' time
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["train_samples_per_s"] * summary["wall_s"] == pytest.approx(32)
    # resuming the finished run is a no-op: the summary (its throughput) and the final weights stay
    final_bytes = (resumed / "model.safetensors").read_bytes()
    again = train(cfg, data, tmp_path / "b", resume=True, show_progress=False)
    assert json.loads((tmp_path / "b" / "summary.json").read_text()) == summary
    assert (again / "model.safetensors").read_bytes() == final_bytes


def test_resume_with_another_config_fails_before_any_step(tmp_path, data):
    cfg = TrainConfig(recipe="vla", steps=4, **FAST)
    train(cfg, data, tmp_path, stop_at_step=2, show_progress=False)
    before = (tmp_path / "state" / "trainer.json").read_text()
    with pytest.raises(EdgeVLAError, match=r"config differs.*lr"):
        train(replace(cfg, lr=1e-2), data, tmp_path, resume=True, show_progress=False)
    with pytest.raises(EdgeVLAError, match="action statistics differ"):
        train(cfg, make_samples(24, seed=5), tmp_path, resume=True, show_progress=False)
    assert (tmp_path / "state" / "trainer.json").read_text() == before


class StatsDataset(list):
    """A dataset object carrying (wrong) precomputed statistics, as the data engine's does."""

    action_stats = None
    has_reasoning = True


def test_bad_input_is_caught_before_training(tmp_path, data):
    with pytest.raises(EdgeVLAError, match="unknown recipe.*valid: ecot"):
        train(TrainConfig(recipe="cot", **FAST), data, tmp_path / "a")
    with pytest.raises(EdgeVLAError, match="unknown preset `tinyy`.*did you mean `tiny`"):
        train(TrainConfig(preset="tinyy", **FAST), data, tmp_path / "b")
    with pytest.raises(EdgeVLAError, match="needs reasoning"):
        train(TrainConfig(recipe="ecot", **FAST), make_samples(8, with_reasoning=False), tmp_path / "c")
    wrong = StatsDataset(data)
    wrong.action_stats = ActionStats.from_actions(np.stack([s.action for s in data]) * 0.01)
    with pytest.raises(EdgeVLAError, match="statistics do not match"):
        train(TrainConfig(**FAST), wrong, tmp_path / "d")
    with pytest.raises(EdgeVLAError, match="action chunks of 1.*action_chunk=4"):
        train(TrainConfig(action_chunk=4, **FAST), data, tmp_path / "e")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_config_file_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: ecot-lite-dropout\nrecipe_options: {p: 0.3}\nsteps: 50\n")
    cfg = load_train_config(f, ["lr=1e-3", "recipe_options.per_tag=true", "model.lm.num_hidden_layers=2"], preset="tiny")
    assert (cfg.recipe, cfg.steps, cfg.lr) == ("ecot-lite-dropout", 50, 1e-3)
    assert cfg.recipe_options == {"p": 0.3, "per_tag": True} and cfg.model == {"lm.num_hidden_layers": 2}
    with pytest.raises(EdgeVLAError, match="unknown config key `lrr`"):
        load_train_config(None, ["lrr=1"])
    with pytest.raises(EdgeVLAError, match="batch_size must be a positive"):
        load_train_config(None, ["batch_size=0"])


def test_validation_lora_freeze_and_periodic_checkpoints(tmp_path, data):
    cfg = TrainConfig(recipe="vla", steps=4, save_every=2, eval_every=2, freeze_vision=True, lora_rank=4,
                      model={"lm.num_hidden_layers": 2}, **{**FAST, "val_fraction": 0.25})
    final = train(cfg, data, tmp_path, show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/action_token_acc" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert {"val/action_l1", "val/loss", "val/reasoning_loss", "val/action_token_acc_tf"} <= set(val[-1])
    assert (tmp_path / "checkpoint-000002" / "model.safetensors").exists()
    w0 = _weights(tmp_path / "checkpoint-000002")
    w1 = _weights(final)
    vision = [k for k in w1 if k.startswith("vision.")]
    assert vision and all(torch.equal(w0[k], w1[k]) for k in vision)  # frozen
    lm = [k for k in w1 if k.startswith("lm.") and "layers.0.self_attn.q_proj.weight" in k]
    assert lm and not torch.equal(w0[lm[0]], w1[lm[0]])  # LoRA merged into the plain weights
    model = VLA.from_pretrained(final)  # a plain checkpoint: no peft names left
    assert model.config.lm["num_hidden_layers"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val"]["n"] > 0 and "environment" in summary


def test_resume_accepts_the_same_init_checkpoint_spelled_another_way(tmp_path, data, tiny_vla, monkeypatch):
    base = tiny_vla.save_pretrained(tmp_path / "ckpts" / "base")
    other = tiny_vla.save_pretrained(tmp_path / "ckpts" / "other")
    cfg = TrainConfig(recipe="vla", steps=3, init_from=str(base), **FAST)
    train(cfg, data, tmp_path / "run", stop_at_step=1, show_progress=False)
    monkeypatch.chdir(tmp_path / "ckpts")
    final = train(replace(cfg, init_from="../ckpts/./base"), data, tmp_path / "run", resume=True, show_progress=False)
    assert final.name == "final"
    train(cfg, data, tmp_path / "run2", stop_at_step=1, show_progress=False)
    with pytest.raises(EdgeVLAError, match="config differs.*init_from"):
        train(replace(cfg, init_from=str(other)), data, tmp_path / "run2", resume=True, show_progress=False)


def test_state_saves_do_not_print_accelerates_tied_weights_notice(tmp_path, data, caplog):
    # The tiny LM ties its embedding and head: accelerate's save_state drops the alias and says so each save.
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(recipe="vla", steps=2, save_every=1, **FAST), data, tmp_path, show_progress=False)
    assert (tmp_path / "checkpoint-000001").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
