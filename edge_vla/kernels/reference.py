"""The fused action-decode op: the spec (PyTorch) and its numpy twin.

One contract for every implementation (reference, numpy, ONNX, Triton, CUDA):

    inputs   hidden  (N, H) float     last hidden states of the decoder, one row per action token
             weight  (n_bins, H)      the LM-head rows of the action tokens
                                      (rows first_action_id .. first_action_id + n_bins)
             bias    (n_bins,) | None the matching LM-head bias entries, if the head has one
             dim     (N,) int         which action dimension each row decodes (token t -> t % D)
             values  (n_bins, D)      env-unit value of each bin for each dimension
                                      (ActionTokenizer bin centres, gripper snapped to low/high)
             low, high (D,)           clip bounds per dimension
    outputs  bins    (N,) int64       argmax of hidden @ weight.T (+ bias); ties -> LOWEST index
             actions (N,) float32     min(max(values[bins, dim], low[dim]), high[dim])

The batched layout (B, T, H) with dim (B, T) or (T,) returns (B, T) bins and actions.

Why one op: in direct mode a reasoning-lite VLA decodes only action tokens, and each one would
otherwise read the full LM head (for Qwen2.5-0.5B, 152k x 896 weights), argmax over the whole
vocabulary, and de-tokenize in a separate step. The restricted head reads 256 rows.

NaN hidden states give unspecified (but in-range) bins. This module imports torch only inside
`decode_actions_torch`, so the ONNX runtime path can use the numpy twin without torch.
"""

from __future__ import annotations

import numpy as np

from edge_vla.errors import EdgeVLAError


def action_value_table(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (n_bins, D) float32, low (D,) float32, high (D,) float32) for an ActionTokenizer.

    With these the fused op reproduces `ActionTokenizer.decode` (the one de-normalisation of the
    project) to float32 rounding: values are the bin centres in env units with the gripper snapped
    the way `from_bins` snaps it, and the clip bounds are the range the bins cover.
    """
    values = tokenizer.snap_gripper(np.array(tokenizer.centers_env(), dtype=np.float64))
    low = np.asarray(tokenizer.low, dtype=np.float64).copy()
    high = np.asarray(tokenizer.high, dtype=np.float64).copy()
    g = tokenizer.stats.gripper_dim
    if tokenizer.binarize_gripper and g is not None:
        g = g % values.shape[1]
        low[g] = min(low[g], values[:, g].min())
        high[g] = max(high[g], values[:, g].max())
    return values.astype(np.float32), low.astype(np.float32), high.astype(np.float32)


def action_dims(n_tokens: int, action_dim: int, start: int = 0) -> np.ndarray:
    """(n_tokens,) int64 dimension index of each action token: token t of an action is dim t % D."""
    return (start + np.arange(n_tokens, dtype=np.int64)) % int(action_dim)


def action_head_rows(lm_head_weight, first_action_id: int, n_bins: int, bias=None):
    """Slice the action-token rows (and bias entries) out of a full LM head; numpy or torch."""
    v = lm_head_weight.shape[0]
    if first_action_id < 0 or first_action_id + n_bins > v:
        raise EdgeVLAError(f"action tokens {first_action_id}..{first_action_id + n_bins - 1} lie outside the "
                           f"LM head's {v} rows", "pass the tokenizer's first_action_id and n_bins")
    w = lm_head_weight[first_action_id:first_action_id + n_bins]
    b = None if bias is None else bias[first_action_id:first_action_id + n_bins]
    return w, b


def check_shapes(h_shape, w_shape, dim_shape, values_shape, low_shape, high_shape, bias_shape=None) -> None:
    """Raise EdgeVLAError unless the shapes fit the contract (batched layouts allowed)."""
    h_shape, w_shape = tuple(h_shape), tuple(w_shape)
    if len(h_shape) < 2:
        raise EdgeVLAError(f"hidden has shape {h_shape}, expected (N, H) or (B, T, H)",
                           "pass the decoder's last hidden states, one row per action token")
    if len(w_shape) != 2 or w_shape[1] != h_shape[-1]:
        raise EdgeVLAError(f"action-head weight has shape {w_shape}, expected (n_bins, {h_shape[-1]})",
                           "pass the action-token rows of the LM head (action_head_rows)")
    n_bins = w_shape[0]
    if tuple(values_shape)[:1] != (n_bins,) or len(values_shape) != 2:
        raise EdgeVLAError(f"value table has shape {tuple(values_shape)}, expected ({n_bins}, D)",
                           "build it with action_value_table(ActionTokenizer)")
    d = values_shape[1]
    if tuple(low_shape) != (d,) or tuple(high_shape) != (d,):
        raise EdgeVLAError(f"clip bounds have shapes {tuple(low_shape)} and {tuple(high_shape)}, expected ({d},)",
                           "pass one low and one high value per action dimension")
    if bias_shape is not None and tuple(bias_shape) != (n_bins,):
        raise EdgeVLAError(f"action-head bias has shape {tuple(bias_shape)}, expected ({n_bins},)",
                           "pass the bias entries of the action-token rows, or None")
    lead = h_shape[:-1]
    dim_shape = tuple(dim_shape)
    if len(dim_shape) > len(lead) or dim_shape != lead[len(lead) - len(dim_shape):]:
        raise EdgeVLAError(f"dim has shape {dim_shape}, expected {lead} (one action dimension per hidden row)",
                           "pass action_dims(n_tokens, D)")


def _check_dim_range(dim: np.ndarray, d: int) -> None:
    if dim.size and (dim.min() < 0 or dim.max() >= d):
        raise EdgeVLAError(f"dim holds {int(dim.min())}..{int(dim.max())}, outside [0, {d})",
                           "pass action_dims(n_tokens, D)")


def decode_actions_numpy(hidden, weight, dim, values, low, high, bias=None) -> tuple[np.ndarray, np.ndarray]:
    """The numpy twin of the reference (no torch): returns (bins int64, actions float32)."""
    h = np.asarray(hidden, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    dim = np.asarray(dim, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    check_shapes(h.shape, w.shape, dim.shape, values.shape, low.shape, high.shape,
                 None if bias is None else np.shape(bias))
    _check_dim_range(dim, values.shape[1])
    with np.errstate(over="ignore"):  # logits overflowing to +-inf are part of the contract
        logits = h @ w.T
        if bias is not None:
            logits = logits + np.asarray(bias, dtype=np.float32)
    bins = np.argmax(logits, axis=-1).astype(np.int64)  # first maximum = lowest index
    dim = np.broadcast_to(dim, bins.shape)
    v = values[bins, dim]
    actions = np.minimum(np.maximum(v, low[dim]), high[dim]).astype(np.float32)
    return bins, actions


def decode_actions_torch(hidden, weight, dim, values, low, high, bias=None):
    """The spec, in PyTorch: returns (bins int64, actions float32) tensors on hidden's device."""
    import torch

    h = torch.as_tensor(hidden)
    dev = h.device
    w = torch.as_tensor(weight, device=dev)
    dim = torch.as_tensor(dim, device=dev).long()
    values = torch.as_tensor(values, device=dev).float()
    low = torch.as_tensor(low, device=dev).float()
    high = torch.as_tensor(high, device=dev).float()
    check_shapes(h.shape, w.shape, dim.shape, values.shape, low.shape, high.shape,
                 None if bias is None else tuple(bias.shape))
    if dim.numel() and (int(dim.min()) < 0 or int(dim.max()) >= values.shape[1]):
        _check_dim_range(dim.cpu().numpy(), values.shape[1])
    logits = h.float() @ w.float().T
    if bias is not None:
        logits = logits + torch.as_tensor(bias, device=dev).float()
    bins = _argmax_lowest(logits)
    dim = dim.expand(bins.shape)
    v = values[bins, dim]
    actions = torch.minimum(torch.maximum(v, low[dim]), high[dim])
    return bins, actions


def _argmax_lowest(logits):
    """Argmax over the last axis with ties resolved to the lowest index, stated explicitly.

    torch.argmax documents "first maximal value" but says nothing about CUDA; spelling it out
    keeps the tie rule identical on every device.
    """
    import torch

    best = logits.max(dim=-1, keepdim=True).values
    n = logits.shape[-1]
    idx = torch.arange(n, device=logits.device).expand_as(logits)
    cand = torch.where(logits == best, idx, torch.full_like(idx, n))
    bins = cand.min(dim=-1).values
    # All-NaN rows have no maximum equal to itself; keep the result in range.
    return torch.where(bins >= n, torch.zeros_like(bins), bins)


__all__ = ["action_value_table", "action_dims", "action_head_rows", "check_shapes", "decode_actions_numpy",
           "decode_actions_torch"]
