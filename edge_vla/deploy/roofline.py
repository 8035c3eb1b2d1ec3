"""Projected latency per action on a target: a roofline per phase, optionally calibrated here.

A call runs three phases (the same ones `Policy.act` times):

    vision    every camera through the vision tower + projector      (compute-bound)
    prefill   prefix + prompt [+ " ACTION:" in direct mode] through the LM  (compute-bound)
    decode    one token at a time: reasoning (full mode) then the action tokens (bandwidth-bound)

Each phase takes max(FLOPs / peak compute, bytes moved / peak bandwidth). A decode step reads
every LM weight once (the head included; the embedding only for one row) plus the KV cache so
far: at batch 1 that is what bounds it (Qwen2.5-0.5B bf16 on AGX Orin: 494M x 2 B / 204.8 GB/s
= 4.8 ms per token, docs/facts.md). The decoder graph emits logits for the last position only.

A roofline is a lower bound. `calibrate` measures what fraction of its own roofline this CPU
reached in the same phases (from `edge-vla bench` numbers) and `project_latency(...,
calibration=...)` divides each phase by that fraction: the projection then assumes the target
reaches the same fraction of its peak as the CPU did. That transfer is an assumption, reported
beside the bound, never instead of it.

A roofline has no fixed costs, so on its own it "runs" a 1M-parameter model's forward pass in
microseconds. On the GPU targets each phase therefore also pays a floor (the target profile's
assumed `graph_run_us` per graph run and `kernel_launch_us` per kernel launch, sources in
`edge_vla.deploy.targets`): phase time = max(roofline / efficiency, launches x launch cost) +
runs x run cost. Launches overlap with GPU work (they are queued asynchronously), so they bound
the phase rather than add to it; the synchronise at the end of each run does not overlap.

`published_check` tests the model against NanoLLM's OpenVLA-7B times on AGX Orin: calibrate
one efficiency on one published point, predict the others, report the errors. Projections are
printed to 2 significant figures (`fmt_projected`): their assumptions hold no more than that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.memory_fit import (PROMPT_TOKENS, REASONING_TOKENS, ModelShape, float_bytes, model_shape,
                                        sequence_length, weights_breakdown)
from edge_vla.deploy.targets import Target, get_target

PHASES = ("vision", "prefill", "decode")

# Kernels one transformer layer launches in a TensorRT-built graph (assumption): input norm, QKV
# GEMM, rotary embedding, attention, output GEMM, residual add, post-attention norm, gate/up GEMM,
# SiLU x mul, down GEMM, residual add, plus one copy of the KV cache slot.
KERNELS_PER_LAYER = 12
KERNELS_OUTSIDE_LAYERS = 4  # embedding gather, final norm, head GEMM, output copy
# Graph runs per pass, as the TensorRT backend splits the policy into engines: the vision prefix
# engine once per call; embed + decoder + head (lm_head engine or the fused action kernel) per
# LM pass (the prefill is one pass, each decode step another).
GRAPH_RUNS = {"vision": 1, "prefill": 3, "decode": 3}

# NanoLLM (MLC) measured OpenVLA-7B on Jetson AGX Orin, ms per action (docs/facts.md). Orin has no
# FP8 tensor cores, so its "FP8" is weight-only: modelled as 8-bit weights computing at the FP16
# tensor-core rate, as its INT4 (q4f16) is 4-bit weights computing at FP16.
NANOLLM_OPENVLA_AGX_ORIN_MS = {"fp16": 840.0, "fp8": 471.0, "int4": 336.0}


@dataclass(frozen=True)
class PhaseCost:
    flops: float
    bytes: float


@dataclass
class Calibration:
    """Fraction of the roofline reached per phase on the measuring machine (0 < e <= 1)."""

    efficiency: dict
    source: dict = field(default_factory=dict)

    def factor(self, phase: str) -> float:
        return float(self.efficiency.get(phase, 1.0))


@dataclass
class Projection:
    target: str
    precision: str
    mode: str
    phases_ms: dict  # vision, prefill, decode (all decode steps together)
    bound: dict  # per phase: "memory" or "compute"
    decode_steps: int
    decode_ms_per_token: float
    calibrated: bool = False
    roofline_ms: dict = field(default_factory=dict)  # per phase, the bare bound (no efficiency, no floor)
    floor_ms: dict = field(default_factory=dict)  # per phase, the fixed-cost floor (0 on the CPU target)

    @property
    def total_ms(self) -> float:
        return sum(self.phases_ms.values())

    @property
    def hz(self) -> float:
        return 1000.0 / self.total_ms if self.total_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_ms=self.total_ms, hz=self.hz)
        return d


# --- per-phase costs -----------------------------------------------------------------------------


def _attention_flops(layers: int, hidden: int, q_tokens: int, kv_tokens: int) -> float:
    # QK^T and AV: 2 matmuls x 2 FLOP per multiply-add.
    return 4.0 * layers * hidden * q_tokens * kv_tokens


def phase_costs(shape: ModelShape, precision: str, mode: str, target: Target,
                prompt_tokens: int = PROMPT_TOKENS, reasoning_tokens: int = REASONING_TOKENS) -> dict:
    """FLOPs and DRAM bytes of each phase of one call (decode: all steps summed)."""
    seq = sequence_length(shape, mode, prompt_tokens, reasoning_tokens)
    w = weights_breakdown(shape, precision, target)
    fb = float_bytes(precision, target)
    kv_tok = shape.kv_bytes_per_token(fb)

    n_img = shape.prefix_tokens - shape.proprio_tokens  # image tokens after token pooling: what the projector sees
    vision = PhaseCost(
        flops=2.0 * (shape.vision_matrix_params * shape.image_tokens_per_camera * shape.n_cameras
                     + shape.projector_params * n_img)
        + shape.n_cameras * _attention_flops(shape.vision_layers, shape.vision_hidden,
                                             shape.image_tokens_per_camera, shape.image_tokens_per_camera),
        bytes=w["vision"] + w["projector"] + 2 * n_img * shape.hidden * fb,
    )
    lm_weights = w["lm_layers"] + (w["lm_head"] or w["embedding"])  # a tied float head reads the shared table
    tp = seq["prefill"]
    prefill = PhaseCost(
        flops=2.0 * shape.lm_matrix_params * tp + _attention_flops(shape.layers, shape.hidden, tp, tp) / 2
        + 2.0 * shape.hidden * shape.vocab,  # logits of the last position only
        bytes=lm_weights + kv_tok * tp + 2 * tp * shape.hidden * fb,
    )
    # Tokens generated = reasoning (+ action prefix in full mode) + action tokens; the first comes
    # from the prefill's logits, every later one costs a decode step.
    generated = seq["reasoning"] + (seq["action_prefix"] if mode != "direct" else 0) + seq["action"]
    steps = max(generated - 1, 0)
    # Context length at step i is tp + i (i = 1..steps): sum it exactly.
    ctx_sum = steps * tp + steps * (steps + 1) / 2
    step_flops = 2.0 * (shape.lm_matrix_params + shape.hidden * shape.vocab)
    decode = PhaseCost(
        flops=steps * step_flops + _attention_flops(shape.layers, shape.hidden, 1, 1) * ctx_sum,
        bytes=steps * (lm_weights + shape.hidden * fb) + kv_tok * ctx_sum,
    )
    return {"vision": vision, "prefill": prefill, "decode": decode, "decode_steps": steps}


def _phase_ms(cost: PhaseCost, tflops: float, bandwidth_gbs: float) -> tuple[float, str]:
    compute = cost.flops / (tflops * 1e12) * 1e3
    memory = cost.bytes / (bandwidth_gbs * 1e9) * 1e3
    return (memory, "memory") if memory >= compute else (compute, "compute")


def _parallel_actions(model) -> bool:
    """Whether `model` (checkpoint/bundle dir, VLAConfig or config dict) decodes its action chunk in one pass."""
    from pathlib import Path

    if isinstance(model, dict):
        return bool(model.get("parallel_actions"))
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        from edge_vla.artifacts import open_artifact

        model = open_artifact(model).config()
    return bool(getattr(model, "parallel_actions", False))


def fixed_floor(shape: ModelShape, target: Target, decode_steps: int) -> dict:
    """Per phase: (kernel-launch bound ms, graph-run cost ms) from the target's assumed fixed costs."""
    lm_kernels = shape.layers * KERNELS_PER_LAYER + KERNELS_OUTSIDE_LAYERS
    passes = {"vision": 1, "prefill": 1, "decode": decode_steps}
    kernels = {"vision": shape.vision_layers * KERNELS_PER_LAYER + KERNELS_OUTSIDE_LAYERS,
               "prefill": lm_kernels, "decode": lm_kernels}
    return {ph: (passes[ph] * kernels[ph] * target.kernel_launch_us / 1e3,
                 passes[ph] * GRAPH_RUNS[ph] * target.graph_run_us / 1e3) for ph in PHASES}


def project_latency(model, precision: str, mode: str = "direct", target: str | Target = "orin-agx-64",
                    calibration: Calibration | None = None, prompt_tokens: int = PROMPT_TOKENS,
                    reasoning_tokens: int = REASONING_TOKENS) -> Projection:
    """Projected latency of one `Policy.act` call (vision + prefill + decode) on `target`: the
    roofline per phase, divided by the calibration's efficiency if given, with the target's floor."""
    t = get_target(target)
    t.check_precision(precision)
    shape = model_shape(model)
    if mode == "direct" and _parallel_actions(model):
        # A parallel-decoding model's action placeholders ride in the direct-mode prefill: the whole chunk
        # comes out of that one pass, no decode step follows (full mode still decodes its reasoning first,
        # and is projected as sequential: an overestimate of its last pass).
        costs = phase_costs(shape, precision, mode, t, prompt_tokens + shape.n_action_tokens, reasoning_tokens)
        costs["decode"], costs["decode_steps"] = PhaseCost(0.0, 0.0), 0
    else:
        costs = phase_costs(shape, precision, mode, t, prompt_tokens, reasoning_tokens)
    tflops = t.compute_tflops(precision)
    # The vision tower of an int4 export runs at int8 (see memory_fit's precision policy).
    vision_tflops = t.compute_tflops("int8" if precision == "int4" else precision)
    steps = costs["decode_steps"]
    floor = fixed_floor(shape, t, steps)
    phases, bound, roof, floor_ms = {}, {}, {}, {}
    for phase in PHASES:
        ms, b = _phase_ms(costs[phase], vision_tflops if phase == "vision" else tflops, t.bandwidth_gbs)
        roof[phase] = ms
        if calibration is not None:
            ms /= calibration.factor(phase)
        launches, runs = floor[phase]
        if launches > ms:
            b = "launch"
        phases[phase], bound[phase] = max(ms, launches) + runs, b
        floor_ms[phase] = launches + runs
    return Projection(target=t.name, precision=precision, mode=mode, phases_ms=phases, bound=bound,
                      decode_steps=steps, decode_ms_per_token=phases["decode"] / steps if steps else 0.0,
                      calibrated=calibration is not None, roofline_ms=roof, floor_ms=floor_ms)


def fmt_projected(x: float | None, digits: int = 2) -> str:
    """A projection as text, to `digits` significant figures (never more precise than its assumptions)."""
    if x is None:
        return "-"
    r = round_significant(x, digits)
    return f"{r:.0f}" if abs(r) >= 10 ** (digits - 1) else f"{r:.{digits}g}"


def round_significant(x: float, digits: int = 2) -> float:
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return x
    from math import floor, log10

    return round(x, digits - 1 - int(floor(log10(abs(x)))))


# --- the check against published measurements ----------------------------------------------------


def _published_precision(name: str, target: Target) -> tuple[str, Target]:
    if name == "fp8":  # weight-only on Orin: 8-bit weights, FP16 tensor-core compute
        return "int8", get_target(target, [f"int8_tops={target.fp16_tflops}"])
    return name, target


def efficiency_for(model, precision: str, measured_ms: float, target: str | Target = "orin-agx-64",
                   mode: str = "direct") -> float:
    """The one efficiency (same for every phase) at which the projection equals `measured_ms`."""
    t = get_target(target)
    lo, hi = 1e-4, 1.0
    if project_latency(model, precision, mode, t, calibration=Calibration({p: hi for p in PHASES})).total_ms > measured_ms:
        raise EdgeVLAError(f"{measured_ms} ms is faster than the {t.name} roofline + floor for {precision}",
                           "check the measurement or the target's bandwidth and fixed costs")
    for _ in range(60):  # bisection: total time falls monotonically as efficiency rises
        mid = (lo * hi) ** 0.5
        total = project_latency(model, precision, mode, t, calibration=Calibration({p: mid for p in PHASES})).total_ms
        lo, hi = (mid, hi) if total > measured_ms else (lo, mid)
    return (lo * hi) ** 0.5


def published_check(calibrate_on: str = "fp16", published: dict | None = None, model="openvla",
                    target: str = "orin-agx-64") -> dict:
    """Calibrate one efficiency on one published point; predict the others; relative errors.

    Returns {"calibrated_on", "efficiency", "rows": {precision: {published_ms, projected_ms,
    roofline_ms, error}}} where error = projected / published - 1 (0 on the calibration point).
    """
    published = dict(published or NANOLLM_OPENVLA_AGX_ORIN_MS)
    if calibrate_on not in published:
        raise EdgeVLAError(f"no published point {calibrate_on!r}", f"use one of {', '.join(published)}")
    base = get_target(target)
    prec, t = _published_precision(calibrate_on, base)
    eff = efficiency_for(model, prec, published[calibrate_on], t)
    cal = Calibration({p: eff for p in PHASES}, source={"published": published, "calibrate_on": calibrate_on})
    rows = {}
    for name, ms in published.items():
        prec, t = _published_precision(name, base)
        proj = project_latency(model, prec, "direct", t, calibration=cal)
        bare = project_latency(model, prec, "direct", t)
        rows[name] = {"published_ms": ms, "projected_ms": proj.total_ms, "roofline_ms": sum(bare.roofline_ms.values()),
                      "floor_ms": sum(proj.floor_ms.values()), "error": proj.total_ms / ms - 1.0}
    return {"calibrated_on": calibrate_on, "efficiency": eff, "target": base.name, "rows": rows}


# --- calibration against this machine -----------------------------------------------------------


def calibrate(measured: dict, cpu_bandwidth_gbs: float, model=None, precision: str = "fp32",
              cpu_gflops: float | None = None, prompt_tokens: int = PROMPT_TOKENS, mode: str = "direct") -> Calibration:
    """Efficiency per phase = this CPU's roofline time / its measured time.

    `measured` holds any of vision_ms, prefill_ms (one call, direct mode) and
    decode_ms_per_token (ms per decode step), measured with the same model and precision;
    `cpu_bandwidth_gbs` / `cpu_gflops` are this machine's peaks (see `measure_memory_bandwidth`,
    `measure_matmul_gflops`).
    """
    if model is None:
        raise EdgeVLAError("calibrate needs the model that was measured", "pass model=checkpoint, bundle or config")
    if cpu_bandwidth_gbs <= 0:
        raise EdgeVLAError(f"cpu bandwidth must be positive, got {cpu_bandwidth_gbs}")
    known = {"vision_ms", "prefill_ms", "decode_ms_per_token"}
    unknown = set(measured) - known
    if unknown or not measured:
        raise EdgeVLAError(f"calibrate takes measurements {sorted(known)}, got {sorted(measured)}")
    cpu = get_target("cpu", [f"bandwidth_gbs={cpu_bandwidth_gbs}"] + (
        [f"fp32_tflops={cpu_gflops / 1e3}", f"fp16_tflops={cpu_gflops / 1e3}", f"int8_tops={cpu_gflops / 1e3}"]
        if cpu_gflops else []))
    # The roofline of the calls that were measured (`mode`): a parallel-action model's direct call
    # has no decode step, and its full-mode call's prefill holds no action placeholders.
    bound = project_latency(model, precision, mode, cpu, prompt_tokens=prompt_tokens)
    roof = {"vision": bound.phases_ms["vision"], "prefill": bound.phases_ms["prefill"],
            "decode": bound.decode_ms_per_token}
    if "decode_ms_per_token" in measured and not bound.decode_steps:
        raise EdgeVLAError(f"a decode step was measured, but a {mode}-mode call of this model has none",
                           "pass the mode the measurement was taken in (full mode decodes its reasoning)")
    keys = {"vision": "vision_ms", "prefill": "prefill_ms", "decode": "decode_ms_per_token"}
    eff = {}
    for phase, key in keys.items():
        if key in measured:
            m = float(measured[key])
            if m <= 0:
                raise EdgeVLAError(f"measured {key} must be positive, got {m}")
            eff[phase] = min(1.0, max(1e-3, roof[phase] / m))
    return Calibration(efficiency=eff, source={"measured": dict(measured), "cpu_roofline_ms": roof,
                                               "cpu_bandwidth_gbs": cpu_bandwidth_gbs, "cpu_gflops": cpu_gflops,
                                               "precision": precision})


def measure_memory_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-n single-thread copy bandwidth in GB/s (read + write counted)."""
    import numpy as np

    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def measure_matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Best-of-n float32 matmul rate in GFLOPS (uses whatever BLAS threads the process has)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
