"""The one image transform used by training, export and every runtime backend.

uint8 HxWx3 (canonical upright frame) -> float32 3xSxS, resized and normalised with the tower's
mean/std. Written in numpy so the ONNX runtime path runs it without torch; resizing is two small
matrix products. Two filters:

- "linear" (edge-vla's own models): an antialiased triangle filter in float, PIL-style "bilinear
  with antialias" for downscaling and plain bilinear for upscaling;
- "pil-bicubic" (Prismatic's towers: OpenVLA, ECoT, MiniVLA): what their image transform runs,
  torchvision's Resize(BICUBIC) on a PIL image, i.e. Pillow's bicubic resample (a = -0.5, support
  widened when downscaling) in Pillow's own fixed-point arithmetic: 22-bit integer weights, the
  horizontal pass first, rounded and clipped to uint8, then the vertical pass. Bit-exact with
  Pillow (tests/test_prismatic_image.py), so a frame at any size enters as Prismatic feeds it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from edge_vla.errors import EdgeVLAError

# Resize weights are cached by (input size, output size): a camera's frames all share one pair.
# The cache is bounded in bytes, not entries, and big matrices are never kept: a client that sends
# frames of many odd widths (a policy server's caller) cannot make it pin memory.
RESIZE_CACHE_BYTES = 32 << 20
RESIZE_CACHE_MAX_ENTRY = 4 << 20
_resize_cache: OrderedDict[tuple[int, int, str], np.ndarray] = OrderedDict()
FILTERS = ("linear", "pil-bicubic")
# Pillow's fixed point for 8-bit resampling (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
PIL_PRECISION_BITS = 22
_resize_cache_bytes = 0
_resize_lock = threading.Lock()


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float32)
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the kernel when downscaling (antialias)
    centers = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(src[None, :] - centers[:, None]) / support, 0.0, None)
    w /= w.sum(1, keepdims=True)
    return w.astype(np.float32)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for BICUBIC, as an (n_out, n_in) matrix of
    its integer weights (float64 holds them exactly; so do the products and sums with uint8 pixels)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((n_out, n_in), np.float64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C's (int) truncates; both are >= 0 here or clamped
        hi = min(int(center + support + 0.5), n_in)
        k = _pil_bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = k.sum()
        w[xx, lo:hi] = k / total if total != 0.0 else k
    one = float(1 << PIL_PRECISION_BITS)
    return np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))


def resize_matrix(n_in: int, n_out: int, kind: str = "linear") -> np.ndarray:
    """(n_out, n_in) weights of the `kind` filter (FILTERS): "linear" rows sum to 1; "pil-bicubic"
    rows are Pillow's integer weights (sum ~2**22). Read-only (shared by the cache)."""
    global _resize_cache_bytes
    if kind not in FILTERS:
        raise EdgeVLAError(f"unknown resize filter `{kind}`", f"use one of {', '.join(FILTERS)}")
    key = (int(n_in), int(n_out), kind)
    with _resize_lock:
        hit = _resize_cache.get(key)
        if hit is not None:
            _resize_cache.move_to_end(key)
            return hit
    if kind == "pil-bicubic":
        w = _pil_bicubic_weights(*key[:2])
    else:
        w = _triangle_weights(*key[:2])
    w.setflags(write=False)
    if w.nbytes <= RESIZE_CACHE_MAX_ENTRY:
        with _resize_lock:
            if key not in _resize_cache:
                _resize_cache[key] = w
                _resize_cache_bytes += w.nbytes
            while _resize_cache_bytes > RESIZE_CACHE_BYTES:
                _, old = _resize_cache.popitem(last=False)
                _resize_cache_bytes -= old.nbytes
    return w


def resize_cache_bytes() -> int:
    """Bytes the resize-weight cache holds now (bounded by RESIZE_CACHE_BYTES)."""
    return _resize_cache_bytes


def check_image(image, name: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise EdgeVLAError(
            f"{name} has shape {a.shape}, expected (H, W, 3)",
            "pass one RGB frame as a uint8 HxWx3 array (channels last)",
        )
    if a.dtype != np.uint8:
        raise EdgeVLAError(f"{name} has dtype {a.dtype}, expected uint8", "pass raw 0-255 pixels, not normalised floats")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise EdgeVLAError(f"{name} is only {a.shape[0]}x{a.shape[1]} pixels", "pass a real camera frame")
    return a


# optimize=True contracts the three operands as two matrix products; without it numpy loops over
# every (o, h, w, p) quadruple: 256 -> 224 px took ~20 s of CPU instead of ~5 ms.


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HxWx3 frame to size x size with the same filter (for videos and datasets)."""
    a = check_image(image)
    out = np.einsum("oh,hwc,pw->opc", resize_matrix(a.shape[0], size), a.astype(np.float32), resize_matrix(a.shape[1], size), optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_pass(weights: np.ndarray, a: np.ndarray, axis: int) -> np.ndarray:
    """One of Pillow's 8-bit passes along `axis` (1: horizontal, 0: vertical): integer weights, a
    half added, shifted and clipped to uint8 (clip8)."""
    x = a.astype(np.float64)  # products and sums of uint8 and 22-bit weights are exact in float64
    if axis == 1:
        acc = np.matmul(x.transpose(0, 2, 1), weights.T).transpose(0, 2, 1)  # (h, c, w) @ (w, p)
    else:
        acc = np.matmul(weights, x.reshape(x.shape[0], -1)).reshape(weights.shape[0], *x.shape[1:])
    acc = np.floor((acc + float(1 << (PIL_PRECISION_BITS - 1))) / float(1 << PIL_PRECISION_BITS))
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_pil_bicubic(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """A uint8 HxWx3 frame resized as `PIL.Image.resize((width, height), Image.BICUBIC)` does, bit for bit."""
    a = check_image(image)
    width = height if width is None else width
    if a.shape[1] != width:  # Pillow runs the horizontal pass first, into a uint8 image
        a = _pil_pass(resize_matrix(a.shape[1], width, "pil-bicubic"), a, axis=1)
    if a.shape[0] != height:
        a = _pil_pass(resize_matrix(a.shape[0], height, "pil-bicubic"), a, axis=0)
    return a


def preprocess_image(image, size: int, mean, std, name: str = "image", resize_filter: str = "linear") -> np.ndarray:
    """uint8 HxWx3 -> normalised float32 3 x size x size; `resize_filter` one of FILTERS."""
    a = check_image(image, name)
    if resize_filter == "pil-bicubic":
        a = resize_pil_bicubic(a, size).astype(np.float32) * (1.0 / 255.0)
    elif resize_filter != "linear":
        raise EdgeVLAError(f"unknown resize filter `{resize_filter}`", f"use one of {', '.join(FILTERS)}")
    else:
        a = a.astype(np.float32) * (1.0 / 255.0)
    if a.shape[0] != size or a.shape[1] != size:
        a = np.einsum("oh,hwc,pw->opc", resize_matrix(a.shape[0], size), a, resize_matrix(a.shape[1], size), optimize=True)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)
