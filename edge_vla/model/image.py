"""The one image transform used by training, export and every runtime backend.

uint8 HxWx3 (canonical upright frame) -> float32 3xSxS, resized with an antialiased linear
(triangle) filter and normalised with the tower's mean/std. Written in numpy so the ONNX
runtime path runs it without torch; resizing is two small matrix products, which is exact
PIL-style "bilinear with antialias" for downscaling and plain bilinear for upscaling.
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
_resize_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
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


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a triangle filter; rows sum to 1. Read-only (shared by the cache)."""
    global _resize_cache_bytes
    key = (int(n_in), int(n_out))
    with _resize_lock:
        hit = _resize_cache.get(key)
        if hit is not None:
            _resize_cache.move_to_end(key)
            return hit
    w = _triangle_weights(*key)
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


def preprocess_image(image, size: int, mean, std, name: str = "image") -> np.ndarray:
    a = check_image(image, name).astype(np.float32) * (1.0 / 255.0)
    if a.shape[0] != size or a.shape[1] != size:
        a = np.einsum("oh,hwc,pw->opc", resize_matrix(a.shape[0], size), a, resize_matrix(a.shape[1], size), optimize=True)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)
