"""Load and launch the CUDA C action-decode kernel (edge_vla/kernels/action_decode.cu).

The source ships as package data and is compiled at run time, the way Jetson deployments load
custom kernels: with pycuda's `SourceModule` (nvcc on the target), or where pycuda is absent
with CuPy's `RawModule` (NVRTC). Both loaders launch the same source with the same arguments;
the tensors are torch CUDA tensors (pointers are passed as-is, no copies).

`nvcc_compile` compiles the source to PTX/cubin with nvcc alone: it needs no GPU, so the CPU
test suite proves the shipped source compiles wherever nvcc exists.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edge_vla.errors import EdgeVLAError, MissingDependencyError
from edge_vla.kernels.reference import check_shapes

KERNEL_FILE = Path(__file__).with_name("action_decode.cu")
KERNEL_NAME = "action_decode_f32"
THREADS = 256  # = ACTION_DECODE_THREADS in the source
MAX_SHARED_BYTES = 48 * 1024  # dynamic shared memory available without opting in
LOADERS = ("pycuda", "cupy")


def kernel_source() -> str:
    if not KERNEL_FILE.is_file():
        raise EdgeVLAError(f"CUDA kernel source missing at {KERNEL_FILE}", "reinstall edge-vla (it ships kernels/*.cu)")
    return KERNEL_FILE.read_text()


def nvcc_compile(out_dir: str | Path, arch: str = "sm_87", mode: str = "ptx") -> Path:
    """Compile the shipped source with nvcc (`mode` ptx or cubin; sm_87 = Jetson Orin). No GPU needed."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise MissingDependencyError("nvcc", "compiling the CUDA action-decode kernel", "install the CUDA toolkit")
    if mode not in ("ptx", "cubin"):
        raise EdgeVLAError(f"unknown nvcc mode {mode!r}", "use ptx or cubin")
    out = Path(out_dir) / f"action_decode_{arch}.{mode}"
    target = f"-arch=compute_{arch.removeprefix('sm_')}" if mode == "ptx" else f"-arch={arch}"
    cmd = [nvcc, f"--{mode}", target, "-O3", str(KERNEL_FILE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise EdgeVLAError(f"nvcc failed to compile {KERNEL_FILE.name} for {arch}: {proc.stderr.strip()[:500]}")
    return out


def find_nvrtc() -> str | None:
    """Path of libnvrtc (what CuPy compiles with): $EDGE_VLA_NVRTC_LIBRARY, the system, the CUDA
    toolkit, or an `nvidia-cuda-nvrtc` wheel; None when there is none."""
    import ctypes.util
    import glob
    import os
    import site

    env = os.environ.get("EDGE_VLA_NVRTC_LIBRARY")
    if env:
        return env
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/*/lib"]
    roots += [f"{p}/nvidia/*/lib" for p in site.getsitepackages()] + [f"{p}/nvidia/cuda_nvrtc/lib" for p in site.getsitepackages()]
    for root in roots:
        hits = sorted(glob.glob(f"{root}/libnvrtc.so*"))
        hits = [h for h in hits if "builtins" not in h]
        if hits:
            return hits[0]
    return None


def nvrtc_compile(arch: str = "compute_87", library: str | None = None) -> str:
    """Compile the shipped source to PTX with NVRTC (the compiler CuPy's RawModule uses), via
    ctypes: needs libnvrtc but no GPU. Returns the PTX text."""
    import ctypes

    path = library or find_nvrtc()
    if path is None:
        raise MissingDependencyError("libnvrtc", "compiling the CUDA kernel with NVRTC",
                                     "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc`")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source().encode(), KERNEL_FILE.name.encode(), 0, None, None):
        raise EdgeVLAError(f"NVRTC could not create a program from {KERNEL_FILE.name}")
    try:
        opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
        rc = lib.nvrtcCompileProgram(prog, 1, opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc:
            raise EdgeVLAError(f"NVRTC failed to compile {KERNEL_FILE.name} for {arch}: "
                               f"{log.value.decode(errors='replace')[:500]}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def available_loaders() -> dict[str, str | None]:
    """loader -> None when it can run here, else why not."""
    out: dict[str, str | None] = {}
    for name, module in (("pycuda", "pycuda"), ("cupy", "cupy")):
        out[name] = None if importlib.util.find_spec(module) else f"`{module}` is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            out = {k: v or "no CUDA GPU" for k, v in out.items()}
    except ImportError:
        out = {k: v or "torch is not installed" for k, v in out.items()}
    return out


@functools.cache
def _pycuda_function():
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (shares the device's primary context with torch)
        from pycuda.compiler import SourceModule
    except ImportError:
        raise MissingDependencyError("pycuda", "the CUDA action-decode kernel (pycuda loader)") from None
    module = SourceModule(kernel_source(), no_extern_c=True, options=["-O3"])
    return module.get_function(KERNEL_NAME)


@functools.cache
def _cupy_function():
    try:
        import cupy
    except ImportError:
        raise MissingDependencyError("cupy", "the CUDA action-decode kernel (CuPy loader)",
                                     "pip install cupy-cuda12x (or the build matching your CUDA)") from None
    return cupy.RawModule(code=kernel_source()).get_function(KERNEL_NAME)


def _launch_pycuda(args, n_rows, shared):
    fn = _pycuda_function()
    ptrs = [np.uintp(a.data_ptr()) if a is not None else np.uintp(0) for a in args[:9]]
    ints = [np.int32(x) for x in args[9:]]
    fn(*ptrs, *ints, block=(THREADS, 1, 1), grid=(n_rows, 1, 1), shared=shared)


def _launch_cupy(args, n_rows, shared):
    import cupy

    fn = _cupy_function()
    ptrs = [cupy.asarray(a) if a is not None else np.uint64(0) for a in args[:9]]
    ints = [np.int32(x) for x in args[9:]]
    fn((n_rows,), (THREADS,), (*ptrs, *ints), shared_mem=shared)


def decode_actions_cuda(hidden, weight, dim, values, low, high, bias=None, loader: str = "auto"):
    """(bins int64, actions float32) torch CUDA tensors from torch CUDA tensors; batched layouts
    (B, T, H) give (B, T). `loader`: "pycuda", "cupy" or "auto" (pycuda, else CuPy)."""
    import torch

    h = torch.as_tensor(hidden)
    if not h.is_cuda:
        raise EdgeVLAError("the CUDA action-decode kernel needs CUDA tensors", "move the inputs to the GPU")
    check_shapes(h.shape, np.shape(weight), np.shape(dim), np.shape(values), np.shape(low), np.shape(high),
                 None if bias is None else np.shape(bias))
    if loader == "auto":
        status = available_loaders()
        loader = next((k for k in LOADERS if status[k] is None), None)
        if loader is None:
            raise MissingDependencyError("pycuda or cupy", "the CUDA action-decode kernel")
    if loader not in LOADERS:
        raise EdgeVLAError(f"unknown CUDA loader {loader!r}", f"use one of {', '.join(LOADERS)} or auto")
    dev = h.device
    lead = h.shape[:-1]
    H = h.shape[-1]
    h2 = h.reshape(-1, H).float()
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    # The tables may come as numpy arrays or tensors anywhere: one copy to the device (cache them
    # on the device in a decode loop to avoid it).
    t = lambda x, dt: torch.as_tensor(x, dtype=dt, device=dev).contiguous()  # noqa: E731
    w = t(weight, torch.float32)
    d = t(dim, torch.int64).expand(lead).reshape(-1).contiguous()
    vals, lo, hi = t(values, torch.float32), t(low, torch.float32), t(high, torch.float32)
    b = t(bias, torch.float32) if bias is not None else None
    n_rows, n_bins = h2.shape[0], w.shape[0]
    shared = (H + n_bins) * 4
    if shared > MAX_SHARED_BYTES:
        raise EdgeVLAError(f"hidden size {H} + {n_bins} bins need {shared} bytes of shared memory (> 48 KiB)",
                           "use the Triton kernel for this model size")
    bins = torch.empty(n_rows, dtype=torch.int64, device=dev)
    actions = torch.empty(n_rows, dtype=torch.float32, device=dev)
    if n_rows:
        args = (h2, w, b, d, vals, lo, hi, bins, actions, n_rows, H, h2.stride(0), n_bins, vals.shape[1])
        with torch.cuda.device(dev):
            # Both loaders launch on the legacy default stream; wait for torch's work first.
            torch.cuda.current_stream().synchronize()
            (_launch_pycuda if loader == "pycuda" else _launch_cupy)(args, n_rows, shared)
            torch.cuda.synchronize()
    return bins.reshape(lead), actions.reshape(lead)


__all__ = ["decode_actions_cuda", "nvcc_compile", "nvrtc_compile", "find_nvrtc", "kernel_source", "available_loaders", "KERNEL_FILE", "KERNEL_NAME"]
