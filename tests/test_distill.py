"""Distillation lowers the student-teacher KL, in both modes; students start from the teacher; the
teacher reasons as the deployed policy does in full mode."""

import copy
import json

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
