"""Fused action decoding: the restricted action head + argmax + de-tokenization as one op.

The contract (shapes, tie rule, clip) is written once in `edge_vla/kernels/reference.py`.
Implementations, all behind the same signature
`fn(hidden, weight, dim, values, low, high, bias=None) -> (bins, actions)`:

    reference  PyTorch, the spec                      (torch tensors, any device)
    numpy      numpy twin for the ONNX runtime path   (numpy arrays, no torch)
    onnx       standard-op ONNX graph in onnxruntime  (numpy arrays)
    triton     one Triton kernel                      (torch CUDA tensors; CPU under TRITON_INTERPRET=1)
    cuda       CUDA C source via pycuda / CuPy        (torch CUDA tensors)

`run_implementation(name, ...)` takes numpy arrays, moves them where the implementation wants
them and returns numpy, so one test suite covers all of them. Nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import numpy as np

from edge_vla.errors import EdgeVLAError
from edge_vla.kernels.reference import action_dims, action_head_rows, action_value_table


@dataclass(frozen=True)
class Implementation:
    name: str
    target: str  # "module:function"
    inputs: str  # "numpy" | "torch-any" | "torch-cuda"
    description: str

    def function(self):
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation("reference", "edge_vla.kernels.reference:decode_actions_torch", "torch-any",
                                "PyTorch reference (the spec)"),
    "numpy": Implementation("numpy", "edge_vla.kernels.reference:decode_actions_numpy", "numpy",
                            "numpy twin (ONNX runtime path, no torch)"),
    "onnx": Implementation("onnx", "edge_vla.kernels.onnx_graph:decode_actions_onnx", "numpy",
                           "standard-op ONNX graph in onnxruntime"),
    "triton": Implementation("triton", "edge_vla.kernels.triton_kernel:decode_actions_triton", "torch-cuda",
                             "Triton kernel (CPU only under TRITON_INTERPRET=1)"),
    "cuda": Implementation("cuda", "edge_vla.kernels.cuda_loader:decode_actions_cuda", "torch-cuda",
                           "CUDA C kernel compiled at run time (pycuda, else CuPy)"),
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def available_implementations() -> dict[str, str | None]:
    """name -> None when it runs here, else the reason it does not."""
    from edge_vla.kernels.triton_kernel import interpreting

    out: dict[str, str | None] = {}
    out["reference"] = None if _has("torch") else "`torch` is not installed"
    out["numpy"] = None
    out["onnx"] = None if _has("onnx") and _has("onnxruntime") else "`onnx`/`onnxruntime` not installed (edge-vla[export])"
    if not _has("triton"):
        out["triton"] = "`triton` is not installed (edge-vla[gpu])"
    else:
        out["triton"] = None if _cuda() or interpreting() else "no CUDA GPU (set TRITON_INTERPRET=1 to run it slowly on CPU)"
    if not _cuda():
        out["cuda"] = "no CUDA GPU"
    elif not (_has("pycuda") or _has("cupy")):
        out["cuda"] = "neither `pycuda` nor `cupy` is installed"
    else:
        out["cuda"] = None
    return out


def run_implementation(name: str, hidden, weight, dim, values, low, high, bias=None,
                       device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run implementation `name` on numpy inputs; return (bins int64, actions float32) numpy arrays."""
    if name not in IMPLEMENTATIONS:
        from edge_vla.config import unknown_name_error

        raise unknown_name_error("action-decode implementation", name, list(IMPLEMENTATIONS))
    impl = IMPLEMENTATIONS[name]
    if impl.inputs == "numpy":
        bins, actions = impl.function()(hidden, weight, dim, values, low, high, bias)
        return np.asarray(bins), np.asarray(actions)
    import torch

    dev = device or ("cuda" if impl.inputs == "torch-cuda" and torch.cuda.is_available() else "cpu")
    t = lambda a, dt: None if a is None else torch.as_tensor(np.asarray(a), dtype=dt, device=dev)  # noqa: E731
    bins, actions = impl.function()(t(hidden, torch.float32), t(weight, torch.float32), t(dim, torch.int64),
                                    t(values, torch.float32), t(low, torch.float32), t(high, torch.float32),
                                    t(bias, torch.float32))
    return bins.cpu().numpy(), actions.cpu().numpy()


__all__ = ["IMPLEMENTATIONS", "Implementation", "available_implementations", "run_implementation",
           "action_value_table", "action_dims", "action_head_rows", "EdgeVLAError"]
