"""Training speed levers that must not change what is learned: split_by_length (each micro-batch run
as groups of rows of similar length) and bf16 autocast on the CPU (opt-in, within a tolerance)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_samples
from edge_vla.tokens.action import ActionStats
from edge_vla.tokens.sequence import IGNORE
from edge_vla.train.config import TrainConfig
from edge_vla.train.data import Collate, RecipeDataset, length_groups, take_rows
from edge_vla.train.loop import LoopSettings, MetricsLog, TrainLoop, make_accelerator
from edge_vla.train.recipes import get_recipe
from edge_vla.train.trainer import RecipeObjective, train

FAST = dict(batch_size=6, warmup_steps=1, lr=3e-3, log_every=1, val_fraction=0.0, augment_shift=4)


@pytest.fixture(scope="module")
def data():
    return make_samples(12, seed=1)


def _vla(data, chunk=1):
    from edge_vla.model.vla import VLA
    from edge_vla.train.data import dataset_texts

    stats = ActionStats.from_actions(np.stack([s.action for s in data]).reshape(-1, 7))
    torch.manual_seed(0)
    return VLA.from_preset("tiny", [f"action_chunk={chunk}"], texts=dataset_texts(data), action_stats=stats)


def test_length_groups_cover_every_row_once_and_split_only_mixed_lengths():
    mixed = [60, 300, 58, 310, 61, 290, 300, 59]
    groups = length_groups(mixed)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [sorted(mixed[i] for i in g) for g in groups] == [[58, 59, 60, 61], [290, 300, 300, 310]]
    assert length_groups([300] * 8) == [list(range(8))]
    assert length_groups([5]) == [[0]]
    # A row or two a little longer is not worth another forward pass.
    assert len(length_groups([300, 301, 302, 299, 300, 305])) == 1


class Recording(RecipeObjective):
    """The recipe objective, noting which sample and which exact row every forward pass saw."""

    def __init__(self, recipe, steps):
        super().__init__(recipe, [], steps, 0)
        self.seen, self.calls = [], 0

    def loss(self, model, batch, index):
        self.calls += 1
        for i, ids, mask in zip(index.tolist(), batch["input_ids"], batch["attention_mask"]):
            self.seen.append((i, tuple(ids[:int(mask.sum())].tolist())))
        return super().loss(model, batch, index)


@pytest.mark.parametrize("split", [True, False])
def test_split_batches_keep_each_samples_draw_and_every_sample_once_per_epoch(tmp_path, data, split):
    recipe = get_recipe("ecot-lite-dropout", p=0.5)
    model = _vla(data)
    settings = LoopSettings(steps=4, batch_size=6, lr=1e-3, seed=3, split_by_length=split)  # 2 epochs of 12
    objective = Recording(recipe, settings.steps)
    loop = TrainLoop(settings, make_accelerator(settings), model, objective, tmp_path, lambda s: 1.0,
                     lambda s: None, "t")
    rows = RecipeDataset(data, recipe, model.processor, model.action_tokenizer, seed=3)
    loop.run(rows, MetricsLog(tmp_path, False, None), show_progress=False)
    # Each epoch is every sample exactly once, and each row is the sample's own draw for that
    # epoch (RecipeDataset's key), whatever group it ran in.
    assert len(objective.seen) == 24
    for epoch in (0, 1):  # two micro-batches of 6 per epoch, run in order
        per_epoch = objective.seen[12 * epoch:12 * (epoch + 1)]
        assert Counter(i for i, _ in per_epoch) == Counter(range(12))
        for i, ids in per_epoch:
            assert ids == tuple(rows[(i, epoch, None, 0)]["input_ids"]), (i, epoch)
    drew = {len(ids) > 40 for _, ids in objective.seen}
    assert drew == {True, False}  # both dropout paths occur
    if split:
        assert objective.calls > 4  # some micro-batch did run as more than one group
    else:
        assert objective.calls == 4


def test_split_batch_loss_and_gradient_equal_the_padded_batch(data):
    recipe = get_recipe("ecot-lite-dropout", p=0.5)
    model = _vla(data)
    rows = RecipeDataset(data, recipe, model.processor, model.action_tokenizer, seed=3)
    batch = Collate(model.processor.tokenizer.pad_id)([rows[(i, 0, None, 0)] for i in range(12)])
    batch.pop("index")
    groups = length_groups(batch["attention_mask"].sum(1).tolist())
    assert len(groups) > 1
    objective = RecipeObjective(recipe, [], 1, 0)

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g

    padded = model(**batch).loss
    padded.backward()
    g_padded = grads()
    total = objective.weight(batch)
    split = 0.0
    for g in groups:
        part = take_rows(batch, g)
        assert part["input_ids"].shape[1] == int(part["attention_mask"].sum(1).max())  # no padding beyond the group
        loss = model(**part).loss * objective.weight(part) / total
        loss.backward()
        split += float(loss.detach())
    g_split = grads()
    assert split == pytest.approx(float(padded.detach()), rel=1e-6)
    assert g_split.keys() == g_padded.keys()
    for name in g_padded:
        torch.testing.assert_close(g_split[name], g_padded[name], rtol=1e-4, atol=1e-7, msg=name)
    # ... which is the token-weighted mean of each sample's loss computed alone.
    alone = []
    for i in range(12):
        one = take_rows(batch, [i])
        alone.append((float(model(**one).loss.detach()), int((one["labels"][:, 1:] != IGNORE).sum())))
    weighted = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert weighted == pytest.approx(float(padded.detach()), rel=1e-5)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _losses(out):
    return [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def test_training_with_split_batches_learns_what_padded_batches_learn(tmp_path, data):
    """The same run with and without split_by_length: the same losses and weights up to float
    rounding (the loss sums in another order), not another trajectory."""
    finals = {}
    for split in (False, True):
        cfg = TrainConfig(recipe="ecot-lite-dropout", steps=3, split_by_length=split, **FAST)
        finals[split] = train(cfg, data, tmp_path / str(split), show_progress=False)
    assert _losses(tmp_path / "True") == pytest.approx(_losses(tmp_path / "False"), rel=1e-5)
    a, b = _weights(finals[False]), _weights(finals[True])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


def test_a_run_saved_before_split_by_length_resumes_only_as_it_ran(tmp_path, data):
    """A state from before the option existed ran whole batches: it resumes with
    split_by_length=false, and a resume that would switch the batching is refused."""
    from edge_vla.errors import EdgeVLAError

    cfg = TrainConfig(recipe="vla", steps=2, split_by_length=False, **FAST)
    train(cfg, data, tmp_path / "r", stop_at_step=1, show_progress=False)
    f = tmp_path / "r" / "state" / "trainer.json"
    saved = json.loads(f.read_text())
    del saved["config_fingerprint"]["split_by_length"]
    f.write_text(json.dumps(saved))
    with pytest.raises(EdgeVLAError, match="split_by_length"):
        train(TrainConfig(recipe="vla", steps=2, **FAST), data, tmp_path / "r", resume=True, show_progress=False)
    train(cfg, data, tmp_path / "r", resume=True, show_progress=False)
    assert (tmp_path / "r" / "final").is_dir()


# bf16 autocast on this CPU: measured over 3 steps of ecot-lite-dropout, the logged losses stay
# within 1% of fp32's (docs/training.md states the same tolerance).
BF16_LOSS_RTOL = 0.01


def test_bf16_autocast_on_cpu_matches_fp32_losses_within_tolerance(tmp_path, data):
    runs = {}
    for bf16 in (False, True):
        cfg = TrainConfig(recipe="ecot-lite-dropout", steps=3, bf16=bf16, **FAST)
        train(cfg, data, tmp_path / str(bf16), show_progress=False)
        runs[bf16] = _losses(tmp_path / str(bf16))
    assert runs[True] == pytest.approx(runs[False], rel=BF16_LOSS_RTOL)
    assert runs[True] != runs[False]  # autocast really ran in bf16 (the numbers moved)
