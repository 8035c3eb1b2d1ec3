"""An independent greedy decoder for tests: the VLA's full forward pass over the whole sequence at
every token (no KV cache, no Policy), so runtime.Policy and every backend are checked against
something that shares none of their decoding code."""

from __future__ import annotations

import torch

from edge_vla.tokens.sequence import placeholder_id


@torch.no_grad()
def reference_decode(vla, pixel_values, prompt_ids: torch.Tensor, state=None, max_free_tokens: int = 0):
    """(free token ids [F], action token ids [n_action_tokens]) for one observation (batch 1).

    Free tokens (nothing forced) end at the first action token or eos; action tokens are the
    argmax over the action block, all from one pass for a parallel-decoding model."""
    tok = vla.processor.tokenizer
    lo, hi = tok.first_action_id, tok.first_action_id + tok.n_bins
    n_act = vla.config.n_action_tokens
    ids = prompt_ids[0].tolist()

    def logits(seq: list[int], last: int = 1) -> torch.Tensor:
        return vla(pixel_values, torch.tensor([seq]), state=state).logits[0, -last:]

    free: list[int] = []
    for _ in range(max_free_tokens):
        nxt = int(logits(ids + free)[-1].argmax())
        if lo <= nxt < hi or nxt == tok.eos_id:
            break
        free.append(nxt)
    seq = ids + free
    if vla.config.parallel_actions:
        rows = logits(seq + [placeholder_id(tok)] * (n_act - 1), last=n_act)
        return free, [lo + int(r[lo:hi].argmax()) for r in rows]
    actions: list[int] = []
    while len(actions) < n_act:
        actions.append(lo + int(logits(seq + actions)[-1][lo:hi].argmax()))
    return free, actions
