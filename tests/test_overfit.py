"""A tiny VLA memorises a handful of (image, instruction, action) samples on CPU until the
deployed decoder (Policy) returns exactly the training actions: the model, tokens and decoding
fit together."""

import numpy as np
import torch

from conftest import INSTRUCTIONS, make_samples
from edge_vla.model.vla import VLA
from edge_vla.tokens.action import ActionStats
from test_model import batch_for, policy_action


def test_tiny_vla_overfits_and_decodes_the_training_actions_exactly():
    samples = make_samples(4, seed=1)
    stats = ActionStats.from_actions(np.stack([s.action for s in samples]))
    torch.manual_seed(0)
    vla = VLA.from_preset("tiny", texts=INSTRUCTIONS, action_stats=stats)
    pv, ids, mask, labels, st = batch_for(vla, samples)
    opt = torch.optim.AdamW(vla.parameters(), lr=3e-3)
    vla.train()
    for step in range(300):
        loss = vla(pv, ids, mask, labels, st).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    for s in samples:
        action = policy_action(vla, s.images, s.instruction, s.state)  # direct mode: " ACTION:" forced
        expected = vla.action_tokenizer.decode(vla.action_tokenizer.encode(s.action)).astype(np.float32)  # as deployed
        np.testing.assert_array_equal(action, expected)
        inside = (s.action >= np.array(stats.q01)) & (s.action <= np.array(stats.q99))
        inside[-1] = False  # the gripper is binarised
        err = np.abs(action - s.action)[inside]
        assert (err <= vla.action_tokenizer.half_bin_width[inside] + 1e-6).all()
    assert step < 299, "did not reach a near-zero loss"
