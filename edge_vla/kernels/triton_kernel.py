"""The fused action-decode op as one Triton kernel (contract: edge_vla/kernels/reference.py).

One program per row: it streams the row's hidden state against all action-head rows in
(n_bins x BLOCK_H) tiles, keeps the n_bins logits in registers, takes the argmax (ties to the
lowest index, written out explicitly), and gathers + clips the bin value. Logits never touch
memory, and the whole action decode is one launch instead of matmul, argmax, gather and clip.

Triton is imported lazily. On a CPU machine set TRITON_INTERPRET=1 BEFORE the first call (the
kernel is decorated on first use, and triton reads the flag at decoration time): it then runs
on CPU torch tensors (slowly; for tests). Compiled kernels need a CUDA GPU.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.kernels.reference import check_shapes

BLOCK_H = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise MissingDependencyError("triton", "the Triton action-decode kernel", "pip install 'edge-vla[gpu]'") from None
    return triton, tl


@functools.cache
def _kernel():
    """The kernel, jitted (or interpreted, when TRITON_INTERPRET was set before the first call)."""
    triton, _ = _triton()
    return triton.jit(_kernel_function())


@functools.cache
def _kernel_function():
    """The undecorated kernel (triton reads its source); `tl` is imported lazily."""
    _, tl = _triton()

    def action_decode_kernel(h_ptr, w_ptr, b_ptr, dim_ptr, values_ptr, low_ptr, high_ptr, bins_ptr, actions_ptr,
                             H, n_bins, D, stride_h, stride_w,
                             HAS_BIAS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        bins = tl.arange(0, BLOCK_BINS)
        bin_ok = bins < n_bins
        acc = tl.zeros([BLOCK_BINS], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(h_ptr + row * stride_h + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + bins[:, None] * stride_w + ks[None, :], mask=bin_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + bins, mask=bin_ok, other=0.0).to(tl.float32)
        acc = tl.where(bin_ok, acc, float("-inf"))
        best = tl.max(acc, axis=0)
        # Lowest index among the maxima (padding bins sit above n_bins, so they never win a tie).
        idx = tl.min(tl.where(acc == best, bins, BLOCK_BINS), axis=0)
        idx = tl.where(idx < n_bins, idx, 0)  # all-NaN row: stay in range
        d = tl.load(dim_ptr + row)
        v = tl.load(values_ptr + idx * D + d)
        v = tl.minimum(tl.maximum(v, tl.load(low_ptr + d)), tl.load(high_ptr + d))
        tl.store(bins_ptr + row, idx.to(tl.int64))
        tl.store(actions_ptr + row, v)

    return action_decode_kernel


SIGNATURE = {"h_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "dim_ptr": "*i64", "values_ptr": "*fp32",
             "low_ptr": "*fp32", "high_ptr": "*fp32", "bins_ptr": "*i64", "actions_ptr": "*fp32", "H": "i32",
             "n_bins": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "HAS_BIAS": "constexpr",
             "BLOCK_BINS": "constexpr", "BLOCK_H": "constexpr"}


# Fused multiply-adds, what the kernel was checked against the reference with. Triton 3.9 warns that
# its default flips to off in 3.10; asking explicitly keeps the numerics and the terminal quiet.
FP_FUSION = True


def compile_for(capability: int = 87, n_bins: int = 256, has_bias: bool = False, num_warps: int = 8) -> dict:
    """Compile the kernel ahead of time for a CUDA compute capability (87 = Jetson Orin, 90 = H100)
    without a GPU (triton ships ptxas). Returns {"ptx": str, "cubin": bytes, "shared": bytes used}."""
    triton, _ = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    block_bins = max(16, 1 << (n_bins - 1).bit_length())
    src = ASTSource(fn=JITFunction(_kernel_function()), signature=SIGNATURE,
                    constexprs={"HAS_BIAS": has_bias, "BLOCK_BINS": block_bins, "BLOCK_H": BLOCK_H})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})
    except Exception as e:
        raise EdgeVLAError(f"Triton could not compile the action-decode kernel for sm_{capability} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"], "shared": compiled.metadata.shared}


def decode_actions_triton(hidden, weight, dim, values, low, high, bias=None):
    """(bins int64, actions float32) torch tensors; inputs are torch tensors on one CUDA device
    (or on the CPU under TRITON_INTERPRET=1). Batched (B, T, H) inputs give (B, T) outputs."""
    import torch

    h = torch.as_tensor(hidden)
    if not h.is_cuda and not interpreting():
        raise EdgeVLAError("the compiled Triton kernel needs CUDA tensors",
                           "move the inputs to a GPU, or set TRITON_INTERPRET=1 before the first call (slow, for tests)")
    dev = h.device
    check_shapes(h.shape, np.shape(weight), np.shape(dim), np.shape(values), np.shape(low), np.shape(high),
                 None if bias is None else np.shape(bias))
    lead = h.shape[:-1]
    H = h.shape[-1]
    h2 = h.reshape(-1, H).float().contiguous()
    w = torch.as_tensor(weight, device=dev).float().contiguous()
    d = torch.as_tensor(dim, device=dev).long().expand(lead).reshape(-1).contiguous()
    vals = torch.as_tensor(values, device=dev).float().contiguous()
    lo = torch.as_tensor(low, device=dev).float().contiguous()
    hi = torch.as_tensor(high, device=dev).float().contiguous()
    if not h.is_cuda and d.numel() and (int(d.min()) < 0 or int(d.max()) >= vals.shape[1]):
        raise EdgeVLAError(f"dim holds values outside [0, {vals.shape[1]})", "pass action_dims(n_tokens, D)")
    b = torch.as_tensor(bias, device=dev).float().contiguous() if bias is not None else w  # dummy pointer
    n_rows, n_bins = h2.shape[0], w.shape[0]
    bins = torch.empty(n_rows, dtype=torch.int64, device=dev)
    actions = torch.empty(n_rows, dtype=torch.float32, device=dev)
    if n_rows:
        block_bins = max(16, 1 << (n_bins - 1).bit_length())
        _kernel()[(n_rows,)](h2, w, b, d, vals, lo, hi, bins, actions, H, n_bins, vals.shape[1], h2.stride(0),
                             w.stride(0), HAS_BIAS=bias is not None, BLOCK_BINS=block_bins, BLOCK_H=BLOCK_H,
                             num_warps=8)  # a 256 x 64 fp32 tile: 8 warps keep it in registers
    return bins.reshape(lead), actions.reshape(lead)


__all__ = ["decode_actions_triton", "compile_for", "interpreting", "BLOCK_H"]
