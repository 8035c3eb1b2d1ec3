"""A tiny VLA overfit on a few make_samples (agreement is only meaningful on a trained model)."""

from __future__ import annotations

import numpy as np

from conftest import INSTRUCTIONS, make_samples

N_SAMPLES = 8


def train_tiny_checkpoint(path, steps: int = 100, decode_mode: str | None = None):
    import torch

    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats
    from edge_vla.tokens.sequence import action_prefix_ids, build_sequence

    torch.manual_seed(0)
    s = make_samples(N_SAMPLES)
    stats = ActionStats.from_actions(np.stack([x.action for x in s]))
    vla = VLA.from_preset("tiny", texts=INSTRUCTIONS, action_stats=stats)
    tok, at = vla.processor.tokenizer, vla.action_tokenizer
    rows = [build_sequence(vla.processor.prompt_ids(x.instruction), [], action_prefix_ids(tok) + list(at.encode(x.action)),
                           tok.eos_id, False) for x in s]
    n = max(len(i) for i, _ in rows)
    ids = torch.tensor([i + [tok.pad_id] * (n - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in rows])
    pv = torch.from_numpy(np.stack([vla.processor.images(x.images) for x in s]))
    st = torch.from_numpy(np.stack([x.state for x in s]))
    opt = torch.optim.AdamW(vla.parameters(), lr=1e-3)
    vla.train()
    for _ in range(steps):
        loss = vla(pv, ids, mask, labels, st).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vla.eval()
    vla.recipe_info = {"name": "vla", "decode_mode": decode_mode or "direct", "max_free_tokens": 24,
                       "inference_prefix": " ACTION:"}
    vla.save_pretrained(path)
    return path, s
