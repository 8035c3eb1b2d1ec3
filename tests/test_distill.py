"""Distillation lowers the student-teacher KL, in both modes; students start from the teacher; the
teacher reasons as the deployed policy does in full mode."""

import copy
import json
import shutil

import pytest
import torch

from conftest import make_samples
from edge_vla.data.observations import sample_to_obs
from edge_vla.errors import EdgeVLAError
from edge_vla.model.vla import VLA
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.torch_backend import TorchBackend
from edge_vla.tokens.sequence import action_prefix_ids, reasoning_prefix_ids
from edge_vla.train.config import TrainConfig
from edge_vla.train.distill import DistillConfig, build_student, distill, reasoning_targets
from edge_vla.train.trainer import train


@pytest.fixture(scope="module")
def data():
    return make_samples(16, seed=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(recipe="ecot", recipe_options={"max_reasoning_tokens": 48}, steps=15, batch_size=8,
                      warmup_steps=2, lr=3e-3, val_fraction=0.0)
    return train(cfg, data, out, show_progress=False)


def test_reasoning_distillation_lowers_action_kl(tmp_path, teacher_dir, data):
    # A fresh student (the default copies the teacher, whose direct and reasoned action
    # distributions are already close after 15 steps) and the KL term alone.
    cfg = DistillConfig(mode="reasoning", init_from_teacher=False, alpha=1.0, steps=10, batch_size=8, lr=2e-3,
                        warmup_steps=1, val_fraction=0.25, log_every=1)
    final = distill(cfg, str(teacher_dir), data, tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_kl_after"] < 0.7 * summary["val_kl_before"], summary
    student = VLA.from_pretrained(final)
    assert student.recipe_info["decode_mode"] == "direct" and student.recipe_info["distilled"]["mode"] == "reasoning"


def test_size_distillation_initialises_from_teacher_and_lowers_kl(tmp_path, teacher_dir, data):
    teacher = VLA.from_pretrained(teacher_dir)
    student, copied = build_student(teacher, {"lm.num_hidden_layers": 2})
    assert copied > 0
    t, s = teacher.state_dict(), student.state_dict()
    # Two of four layers: the student keeps teacher layers 0 and 3.
    q = "lm.model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(s[q.format(0)], t[q.format(0)]) and torch.equal(s[q.format(1)], t[q.format(3)])
    assert torch.equal(s["projector.0.weight"], t["projector.0.weight"])
    cfg = DistillConfig(mode="size", student_model={"lm.num_hidden_layers": 2}, steps=10, batch_size=8, lr=2e-3,
                        warmup_steps=1, val_fraction=0.25)
    final = distill(cfg, teacher, data, tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_kl_after"] < 0.7 * summary["val_kl_before"], summary
    assert summary["student_params"] < summary["teacher_params"]
    assert VLA.from_pretrained(final).config.lm["num_hidden_layers"] == 2


def test_reasoning_distillation_needs_a_reasoning_teacher(tmp_path, tiny_vla, data):
    teacher = copy.deepcopy(tiny_vla)  # the fixture is shared: leave it as it was
    teacher.recipe_info = {"name": "vla", "options": {}}
    with pytest.raises(EdgeVLAError, match="teacher trained to reason"):
        distill(DistillConfig(mode="reasoning", steps=1), teacher, data, tmp_path, show_progress=False)
    with pytest.raises(EdgeVLAError, match="unknown distillation mode"):
        distill(DistillConfig(mode="sizes", steps=1), teacher, data, tmp_path, show_progress=False)


def test_a_dropout_teacher_asked_to_reason_writes_from_the_forced_reasoning_prefix(tmp_path, data):
    # Trained with all its reasoning dropped (p=1), the teacher left free goes straight to acting:
    # asked to reason, it must be started on the reasoning, as the deployed policy in full mode is.
    cfg = TrainConfig(recipe="ecot-lite-dropout", recipe_options={"p": 1.0, "max_reasoning_tokens": 16}, steps=15,
                      batch_size=8, warmup_steps=2, lr=3e-3, val_fraction=0.0)
    teacher = VLA.from_pretrained(train(cfg, data, tmp_path, show_progress=False))
    tok = teacher.processor.tokenizer
    start, act = reasoning_prefix_ids(tok), action_prefix_ids(tok)
    free = Policy(TorchBackend(teacher), mode="full", reasoning_prefix="", max_free_tokens=16).act(sample_to_obs(data[0]))
    assert free.info["free_token_ids"][:len(start)] != start
    for target in reasoning_targets(teacher, data[:2]):
        assert target.reasoning_ids[:len(start)] == start and target.reasoning_ids[-len(act):] == act
        assert len(target.reasoning_ids) <= len(start) + 16 + len(act)  # the recipe's reasoning budget
        assert target.action_logp.shape == (teacher.config.n_action_tokens, tok.n_bins)


# --- capped, resumable teacher targets and resumable training ----------------------------------------
def test_the_teacher_subset_is_seeded_and_spread_over_the_samples():
    from edge_vla.train.teacher_targets import draw_subset

    a = draw_subset(1000, 50, seed=0)
    assert a == draw_subset(1000, 50, seed=0) and a != draw_subset(1000, 50, seed=1)
    # One from each twentieth of the sequence (datasets are ordered by task, demo, frame), not the first 50.
    assert [i // 20 for i in a] == list(range(50)) and a != list(range(50))
    assert draw_subset(10, None, 0) == draw_subset(10, 99, 0) == list(range(10))
    with pytest.raises(EdgeVLAError, match="size distillation runs the teacher online"):
        DistillConfig(mode="size", teacher_samples=100).validate()
    with pytest.raises(EdgeVLAError, match="teacher_samples must be a positive integer"):
        DistillConfig(teacher_samples=0).validate()


class _Stop(Exception):
    pass


def _stop_after(n):
    def progress(done, total):
        if done >= n:
            raise _Stop
    return progress


def test_interrupted_teacher_targets_continue_to_the_uninterrupted_ones(tmp_path, teacher_dir, data):
    from edge_vla.train.distill import teacher_targets

    teacher = VLA.from_pretrained(teacher_dir)
    splits = {"train": data[:5], "val": data[5:7]}
    whole, stats = teacher_targets(teacher, splits, tmp_path / "whole", chunk=2, show_progress=False)
    assert stats["computed"] == 7 and stats["seconds"] > 0

    with pytest.raises(_Stop):  # killed during the second chunk: the first is on disk, the second is not
        teacher_targets(teacher, splits, tmp_path / "cut", 2, False, progress=_stop_after(3))
    assert (tmp_path / "cut" / "train-000000.json").is_file() and not (tmp_path / "cut" / "train-000001.json").exists()
    seen = []
    again, stats = teacher_targets(teacher, splits, tmp_path / "cut", 2, False, progress=lambda d, t: seen.append(d))
    assert stats["computed"] == 5 and seen[0] == 2 and seen[-1] == 7  # only the rest was computed
    for name in splits:
        assert len(again[name]) == len(whole[name]) == len(splits[name])
        for a, b in zip(again[name], whole[name]):
            assert a.reasoning_ids == b.reasoning_ids and torch.equal(a.action_logp, b.action_logp)

    # Targets of another teacher or of other samples are refused, not mixed in.
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.projector[0].weight.add_(0.01)
    with pytest.raises(EdgeVLAError, match="another teacher"):
        teacher_targets(other, splits, tmp_path / "cut", 2, False)
    with pytest.raises(EdgeVLAError, match="other train samples"):
        teacher_targets(teacher, {"train": data[1:6], "val": data[5:7]}, tmp_path / "cut", 2, False)
    with pytest.raises(EdgeVLAError, match="teacher_chunk=2"):
        teacher_targets(teacher, splits, tmp_path / "cut", 3, False)
    (tmp_path / "cut" / "train-000001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EdgeVLAError, match="train-000001.safetensors cannot be read.*computed again"):
        teacher_targets(teacher, splits, tmp_path / "cut", 2, False)


def _weights(final):
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


def test_capped_distillation_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, teacher_dir, data):
    cfg = DistillConfig(mode="reasoning", teacher_samples=8, teacher_chunk=3, steps=4, batch_size=4, lr=2e-3,
                        warmup_steps=1, val_fraction=0.25, val_max_samples=4, log_every=1, seed=3)
    whole = distill(cfg, str(teacher_dir), data, tmp_path / "whole", show_progress=False)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["n_train"] == 8 and summary["teacher_targets"]["computed"] == 8 + 4
    assert json.loads((tmp_path / "whole" / "distill_config.json").read_text())["teacher_samples"] == 8

    out = tmp_path / "cut"
    with pytest.raises(_Stop):  # killed while the teacher reasons
        distill(cfg, str(teacher_dir), data, out, show_progress=False, teacher_progress=_stop_after(7))
    # Re-run: the finished chunks are kept; then pre-empted after 2 of 4 steps.
    assert distill(cfg, str(teacher_dir), data, out, show_progress=False, stop_at_step=2).name == "state"
    with pytest.raises(EdgeVLAError, match="pass --resume"):
        distill(cfg, str(teacher_dir), data, out, show_progress=False)
    changed = copy.deepcopy(cfg)
    changed.lr = 1e-3
    with pytest.raises(EdgeVLAError, match="config differs.*lr"):
        distill(changed, str(teacher_dir), data, out, show_progress=False, resume=True)
    with pytest.raises(EdgeVLAError, match="training samples differ"):
        distill(cfg, str(teacher_dir), data[:-3], out, show_progress=False, resume=True)
    other = VLA.from_pretrained(teacher_dir)
    with torch.no_grad():
        other.projector[0].weight.add_(0.01)
    with pytest.raises(EdgeVLAError, match="teacher differs"):
        distill(cfg, other, data, out, show_progress=False, resume=True)

    final = distill(cfg, str(teacher_dir), data, out, show_progress=False, resume=True)
    a, b = _weights(whole), _weights(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["teacher_targets"]["computed"] == 0 and resumed["teacher_targets"]["samples"] == 12
    assert resumed["val_kl_before"] == summary["val_kl_before"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(2) == 1  # the resumed log repeats no step
    # A resume of the finished run is a no-op; a plain re-run is refused.
    assert distill(cfg, str(teacher_dir), data, out, show_progress=False, resume=True) == final
    with pytest.raises(EdgeVLAError, match="already holds a distilled checkpoint"):
        distill(cfg, str(teacher_dir), data, out, show_progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, data):
    """The teacher's samples on disk, as `edge-vla data` writes them (3-step episodes + ECoT JSON)."""
    import numpy as np

    from conftest import INSTRUCTIONS
    from edge_vla.data.ecot_json import EcotAnnotations
    from edge_vla.data.libero_hdf5 import write_libero_hdf5

    root = tmp_path_factory.mktemp("ds")
    episodes = [data[i:i + 3] for i in range(0, 15, 3)]
    demos = [{"actions": np.stack([s.action for s in ep]), "proprio": np.stack([s.state for s in ep]),
              "images": {c: np.stack([s.images[c] for s in ep]) for c in ("agentview", "wrist")}} for ep in episodes]
    rel = "libero_90/LIVING_ROOM_SCENE2_pick_up_the_butter_and_put_it_in_the_basket_demo.hdf5"
    write_libero_hdf5(root / rel, demos, INSTRUCTIONS[0])
    ann = EcotAnnotations({})
    for e, ep in enumerate(episodes):
        ann.set_episode(rel, e, [s.reasoning for s in ep], [(10, 20)] * len(ep))
    ann.save(root / "reasoning.json")
    (root / "manifest.json").write_text(json.dumps({"files": [rel], "reasoning": "reasoning.json"}))
    return root


def test_distill_command_caps_the_teacher_and_resumes(tmp_path, teacher_dir, data_dir):
    from click.testing import CliRunner

    from edge_vla.cli import main

    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_dir), "--data", str(data_dir), "--out", str(out), "--no-progress",
            "--set", "teacher_samples=5", "--set", "teacher_chunk=2", "--set", "batch_size=4", "--set", "warmup_steps=1",
            "--set", "val_fraction=0.25", "--set", "val_max_samples=2", "--set", "save_every=2", "--set", "log_every=1"]
    res = CliRunner().invoke(main, [*args, "--set", "steps=2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 5 and summary["teacher_targets"]["samples"] == 5 + 2  # train + val
    assert summary["command"].startswith("edge-vla distill --teacher ") and "teacher_samples=5" in summary["command"]
    assert sorted(p.name for p in (out / "teacher_targets").glob("*.json")) == [
        "manifest.json", "train-000000.json", "train-000001.json", "train-000002.json", "val-000000.json"]

    res = CliRunner().invoke(main, [*args, "--set", "steps=2"])
    assert res.exit_code == 1 and "already holds a distilled checkpoint" in res.output
    res = CliRunner().invoke(main, [*args, "--set", "steps=2", "--set", "temperature=2", "--resume"])
    assert res.exit_code == 1 and "config differs" in res.output and "Traceback" not in res.output
    # Longer (steps may change on a resume): it continues from step 2, the teacher's targets reused.
    res = CliRunner().invoke(main, [*args, "--set", "steps=4", "--resume"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["teacher_targets"]["computed"] == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and steps.count(1) == 1

    # The targets, copied into a new run, serve another temperature without the teacher reasoning again.
    shutil.copytree(out / "teacher_targets", tmp_path / "hot" / "teacher_targets")
    res = CliRunner().invoke(main, [*args[:6], str(tmp_path / "hot"), *args[7:], "--set", "steps=1",
                                    "--set", "temperature=2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hot" / "summary.json").read_text())["teacher_targets"]["computed"] == 0

    res = CliRunner().invoke(main, ["distill", "--teacher", str(teacher_dir), "--data", str(data_dir), "--out",
                                    str(tmp_path / "size"), "--mode", "size", "--set", "teacher_samples=5"])
    assert res.exit_code == 1 and "runs the teacher online" in res.output and "Traceback" not in res.output


def test_size_distillation_resumes_to_the_uninterrupted_weights(tmp_path, teacher_dir, data):
    cfg = DistillConfig(mode="size", student_model={"lm.num_hidden_layers": 2}, steps=4, batch_size=4, lr=2e-3,
                        warmup_steps=1, val_fraction=0.25, val_max_samples=4)
    whole = distill(cfg, str(teacher_dir), data, tmp_path / "whole", show_progress=False)
    distill(cfg, str(teacher_dir), data, tmp_path / "cut", show_progress=False, stop_at_step=1)
    final = distill(cfg, str(teacher_dir), data, tmp_path / "cut", show_progress=False, resume=True)
    a, b = _weights(whole), _weights(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "teacher_targets").exists()  # size mode runs the teacher online
    other = copy.deepcopy(cfg)
    other.student_model = {"lm.num_hidden_layers": 3}
    with pytest.raises(EdgeVLAError, match="config differs.*student_model"):
        distill(other, str(teacher_dir), data, tmp_path / "cut", show_progress=False, resume=True)
