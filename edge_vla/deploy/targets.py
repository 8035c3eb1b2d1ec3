"""Deployment targets: what a board offers (memory, bandwidth, compute, precisions, TensorRT settings).

One frozen dataclass per target, registered by name in `TARGETS`. The memory-fit check
(`memory_fit`), the roofline projection (`roofline`), the TensorRT lint (`edge_vla.tensorrt.lint`) and the
engine builder (`edge_vla.tensorrt.build`) read these numbers; nothing else hard-codes a board.

Sources of the numbers (decimal GB/s and TOPS, as NVIDIA's datasheets give them):
- Memory bandwidth: Jetson AGX Orin 64GB 204.8 GB/s, Orin NX 16GB 102.4 GB/s, Orin Nano 8GB
  68 GB/s (NVIDIA Jetson Orin module datasheets; docs/facts.md).
- Compute: the Jetson AGX Orin Series Technical Brief gives the AGX Orin GPU as 2048 CUDA cores
  (5.3 FP32 TFLOPS) and 64 third-generation Tensor Cores (170 sparse INT8 TOPS at 1.3 GHz);
  the module datasheets give Orin NX 16GB 100 TOPS (GPU 60 sparse + 2 DLA 40) at 918 MHz and
  Orin Nano 8GB 40 sparse TOPS (GPU only, 625 MHz). Ampere structured sparsity doubles the
  rate, so dense INT8 = sparse / 2, and dense FP16 tensor = dense INT8 / 2. DLA TOPS are not
  counted: engines here run on the GPU (DLA cores take only a subset of layers, no LLM decode).
  FP32 = CUDA cores x 2 FLOP x clock.
- Usable memory: Orin shares one LPDDR5 pool between CPU and GPU. `linux_visible_gib` is what
  `free` reports on JetPack 6 (carve-outs for firmware/display removed); `os_reserved_gib` is an
  assumed headless JetPack baseline (Ubuntu + system services, no desktop). The CUDA/TensorRT
  runtime's own footprint is `runtime_overhead_gib`, counted by the memory-fit estimate, not here.
  These three are assumptions, stated so a user can override them (`get_target(name, ["os_reserved_gib=2"])`).
- No FP8/FP4 on Orin (Ampere, SM 8.7): TensorRT Edge-LLM lists FP16/INT8/INT4 for Orin.
- Fixed costs (`graph_run_us`, `kernel_launch_us`): ASSUMPTIONS, not datasheet figures, and
  not measured by this project (no board or GPU has run here). A roofline alone lets a
  1M-parameter model "run" a forward pass in microseconds; no GPU does. `kernel_launch_us` is the
  host-side cost of one CUDA kernel launch, which bounds a graph of many small kernels: the
  figure usually quoted for a desktop x86 host is ~3-5 us (assumed 4 us), and 8 us is assumed on
  Orin's Arm Cortex-A78AE host, whose cores run the CUDA driver more slowly. `graph_run_us` is
  one engine execution's enqueue + stream synchronise + the small host<->device copies of a
  step's inputs and outputs: assumed 150 us on Orin and 50 us on a desktop GPU. Kernels per graph
  run follow from the layer count (`roofline.KERNELS_PER_LAYER`). The check against NanoLLM's
  published OpenVLA-7B times (`roofline.published_check`, docs/jetson-and-tensorrt.md) cannot
  test these figures: a 7B model's launches hide under its roofline and its graph-run
  synchronises add ~3 ms of 840; the first board to run
  `make test-gpu` should replace them with measured ones. The CPU target has none: `edge-vla
  bench` measures this CPU's fixed costs and its calibration carries them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from edge_vla.config import apply_overrides, unknown_name_error
from edge_vla.errors import EdgeVLAError

# Precisions edge-vla knows, narrowest last. Bytes per weight element (before scales).
PRECISIONS: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class TensorRTSettings:
    """How `edge-vla build-engine` configures the TensorRT builder for a target."""

    workspace_gib: float = 1.0  # builder scratch memory (MemoryPoolType.WORKSPACE)
    optimization_level: int = 3  # builder_optimization_level: 3 is TensorRT's default; 5 searches longest
    use_dla: bool = False  # DLA cannot run an LLM decoder; everything runs on the GPU
    timing_cache: bool = True
    external_weights: bool = False  # keep weights outside the plan (INT4 builds on 8 GB boards need it)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "cpu" | "jetson" | "cuda": picks the runtime (onnxruntime on cpu, TensorRT otherwise)
    memory_gib: float  # physical memory (GiB), shared CPU/GPU on Jetson
    linux_visible_gib: float  # what the OS sees after firmware carve-outs
    os_reserved_gib: float  # assumed OS baseline that the policy process cannot use
    runtime_overhead_gib: float  # CUDA context + TensorRT/cuBLAS libraries (or ORT + Python on cpu)
    bandwidth_gbs: float  # peak DRAM bandwidth, decimal GB/s
    fp32_tflops: float
    fp16_tflops: float  # dense tensor-core FP16 (also BF16 on Ampere)
    int8_tops: float  # dense tensor-core INT8
    precisions: tuple[str, ...]  # what its runtime builds/executes
    default_precision: str
    float_dtype: str  # dtype of the layers left unquantized and of the KV cache
    tensorrt: TensorRTSettings | None = field(default=None)
    # Fixed costs per graph run and per kernel launch (microseconds): assumptions, sources above.
    graph_run_us: float = 0.0
    kernel_launch_us: float = 0.0

    @property
    def usable_gib(self) -> float:
        return self.linux_visible_gib - self.os_reserved_gib

    @property
    def uses_tensorrt(self) -> bool:
        return self.tensorrt is not None

    def compute_tflops(self, precision: str) -> float:
        """Peak dense rate for the GEMMs of a graph at `precision` (TFLOPS or TOPS)."""
        if precision == "fp32":
            return self.fp32_tflops
        if precision == "int8":
            return self.int8_tops
        # fp16/bf16 run on FP16 tensor cores; int4 is weight-only (dequantised to FP16 GEMMs);
        # fp8 only exists on targets with FP8 tensor cores, at twice the FP16 rate.
        if precision == "fp8":
            return 2 * self.fp16_tflops
        if self.kind == "cpu":
            return self.fp32_tflops  # ORT CPU computes fp16/int4-weight graphs in fp32
        return self.fp16_tflops

    def check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise unknown_name_error("precision", precision, PRECISIONS)
        if precision not in self.precisions:
            raise EdgeVLAError(f"target {self.name} does not run {precision}",
                               f"use one of {', '.join(self.precisions)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precisions"] = list(self.precisions)
        d["usable_gib"] = round(self.usable_gib, 3)
        return d


def _cpu_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 16.0


def _cpu() -> Target:
    mem = _cpu_memory_gib()
    return Target(
        name="cpu", description="this machine's CPU with ONNX Runtime (numbers are nominal; `calibrate` measures them)",
        kind="cpu", memory_gib=mem, linux_visible_gib=mem, os_reserved_gib=min(2.0, mem * 0.1),
        runtime_overhead_gib=0.4,
        # Nominal 2-core x86 figures; bench calibrates against a measured copy bandwidth / matmul rate.
        bandwidth_gbs=20.0, fp32_tflops=0.1, fp16_tflops=0.1, int8_tops=0.2,
        # fp16 graphs run on ORT's CPU provider too (slowly: it upcasts), so the exporter may write them.
        precisions=("fp32", "fp16", "int8", "int4"), default_precision="int8", float_dtype="fp32", tensorrt=None,
    )


def _orin_agx_64() -> Target:
    return Target(
        name="orin-agx-64", description="Jetson AGX Orin 64GB (MAXN): 2048 CUDA cores, 64 Tensor Cores at 1.3 GHz",
        kind="jetson", memory_gib=64.0, linux_visible_gib=61.4, os_reserved_gib=1.2, runtime_overhead_gib=1.0,
        bandwidth_gbs=204.8, fp32_tflops=5.3, fp16_tflops=42.5, int8_tops=85.0,
        precisions=("fp32", "fp16", "bf16", "int8", "int4"), default_precision="fp16", float_dtype="fp16",
        tensorrt=TensorRTSettings(workspace_gib=4.0, optimization_level=3),
        graph_run_us=150.0, kernel_launch_us=8.0,
    )


def _orin_nx_16() -> Target:
    return Target(
        name="orin-nx-16", description="Jetson Orin NX 16GB (MAXN): 1024 CUDA cores, 32 Tensor Cores at 918 MHz",
        kind="jetson", memory_gib=16.0, linux_visible_gib=15.3, os_reserved_gib=1.0, runtime_overhead_gib=1.0,
        bandwidth_gbs=102.4, fp32_tflops=1.9, fp16_tflops=15.0, int8_tops=30.0,
        precisions=("fp32", "fp16", "bf16", "int8", "int4"), default_precision="int8", float_dtype="fp16",
        tensorrt=TensorRTSettings(workspace_gib=2.0, optimization_level=3),
        graph_run_us=150.0, kernel_launch_us=8.0,
    )


def _orin_nano_8() -> Target:
    return Target(
        name="orin-nano-8", description="Jetson Orin Nano 8GB (15 W): 1024 CUDA cores, 32 Tensor Cores at 625 MHz",
        kind="jetson", memory_gib=8.0, linux_visible_gib=7.4, os_reserved_gib=0.8, runtime_overhead_gib=1.0,
        bandwidth_gbs=68.0, fp32_tflops=1.28, fp16_tflops=10.0, int8_tops=20.0,
        precisions=("fp32", "fp16", "bf16", "int8", "int4"), default_precision="int4", float_dtype="fp16",
        # Small workspace and externalised weights: 8 GB boards run out of memory building INT4 engines
        # with weights inside the plan (docs/facts.md, NanoLLM issues).
        tensorrt=TensorRTSettings(workspace_gib=1.0, optimization_level=3, external_weights=True),
        graph_run_us=150.0, kernel_launch_us=8.0,
    )


def _cuda_gpu() -> Target:
    return Target(
        name="cuda-gpu",
        description="a generic discrete CUDA GPU; defaults describe a 24 GB RTX 4090 (override memory/bandwidth to match yours)",
        kind="cuda", memory_gib=24.0, linux_visible_gib=24.0, os_reserved_gib=0.5, runtime_overhead_gib=1.0,
        bandwidth_gbs=1008.0, fp32_tflops=82.6, fp16_tflops=165.2, int8_tops=660.6,
        precisions=("fp32", "fp16", "bf16", "fp8", "int8", "int4"), default_precision="fp16", float_dtype="fp16",
        tensorrt=TensorRTSettings(workspace_gib=8.0, optimization_level=3),
        graph_run_us=50.0, kernel_launch_us=4.0,
    )


TARGETS = {"cpu": _cpu, "orin-agx-64": _orin_agx_64, "orin-nx-16": _orin_nx_16, "orin-nano-8": _orin_nano_8,
           "cuda-gpu": _cuda_gpu}


def get_target(name: str | Target, overrides: list[str] | None = None) -> Target:
    """The named target profile, optionally with `field=value` overrides (e.g. "bandwidth_gbs=51.2")."""
    if isinstance(name, Target):
        target = name
    else:
        if name not in TARGETS:
            raise unknown_name_error("target", name, TARGETS)
        target = TARGETS[name]()
    if not overrides:
        return target
    d = dataclasses.asdict(target)
    d = apply_overrides(d, list(overrides))
    if d.get("tensorrt") is not None:
        d["tensorrt"] = TensorRTSettings(**d["tensorrt"])
    d["precisions"] = tuple(d["precisions"])
    try:
        return Target(**d)
    except TypeError as e:
        raise EdgeVLAError(f"bad target override for {target.name}: {e}") from None


def target_defaults(name: str) -> dict:
    """What `edge-vla export --target NAME` uses when the user does not say otherwise."""
    t = get_target(name)
    return {
        "target": t.name,
        "precision": t.default_precision,
        # In the exporter's vocabulary (edge_vla.export.quantize). For TensorRT: fp16, or int4 (its MatMulNBits
        # graphs are rewritten to TensorRT's INT4 form by build-engine); its int8 is ORT-dynamic and its
        # int8-static asymmetric, both refused by the TensorRT lint.
        "export_precision": ("int4" if t.default_precision == "int4" else "fp16") if t.uses_tensorrt else "int8",
        "float_dtype": t.float_dtype,
        "runtime": "tensorrt" if t.uses_tensorrt else "onnxruntime",
        "lint_tensorrt": t.uses_tensorrt,
        # TensorRT's INT8/INT4 paths want symmetric (zero-point 0) signed quantization in QDQ form.
        "quant_format": "qdq-symmetric" if t.uses_tensorrt else "onnxruntime-dynamic",
        "tensorrt": dataclasses.asdict(t.tensorrt) if t.tensorrt else None,
    }


def export_precision_for(target: str) -> str:
    """The exporter's default precision for `target` (names outside the registry get the CPU default)."""
    return target_defaults(target)["export_precision"] if target in TARGETS else "int8"


def default_vision_precision(target: str, precision: str) -> str:
    """The exporter's vision-graph precision when the user names none.

    INT4 is an LLM-GEMM path, so an int4 export keeps the vision tower at int8, which on the CPU
    is ONNX Runtime's dynamic INT8; TensorRT cannot parse that, so TensorRT targets get fp16.
    """
    if precision != "int4":
        return precision
    return "fp16" if target in TARGETS and get_target(target).uses_tensorrt else "int8"
