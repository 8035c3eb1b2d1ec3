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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.memory_fit import (PROMPT_TOKENS, REASONING_TOKENS, ModelShape, float_bytes, model_shape,
                                        sequence_length, weights_breakdown)
from edge_vla.deploy.targets import Target, get_target

PHASES = ("vision", "prefill", "decode")


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


def project_latency(model, precision: str, mode: str = "direct", target: str | Target = "orin-agx-64",
                    calibration: Calibration | None = None, prompt_tokens: int = PROMPT_TOKENS,
                    reasoning_tokens: int = REASONING_TOKENS) -> Projection:
    """Roofline latency of one `Policy.act` call (vision + prefill + decode) on `target`."""
    t = get_target(target)
    t.check_precision(precision)
    shape = model_shape(model)
    costs = phase_costs(shape, precision, mode, t, prompt_tokens, reasoning_tokens)
    tflops = t.compute_tflops(precision)
    # The vision tower of an int4 export runs at int8 (see memory_fit's precision policy).
    vision_tflops = t.compute_tflops("int8" if precision == "int4" else precision)
    phases, bound = {}, {}
    for phase in PHASES:
        ms, b = _phase_ms(costs[phase], vision_tflops if phase == "vision" else tflops, t.bandwidth_gbs)
        if calibration is not None:
            ms /= calibration.factor(phase)
        phases[phase], bound[phase] = ms, b
    steps = costs["decode_steps"]
    return Projection(target=t.name, precision=precision, mode=mode, phases_ms=phases, bound=bound,
                      decode_steps=steps, decode_ms_per_token=phases["decode"] / steps if steps else 0.0,
                      calibrated=calibration is not None)


# --- calibration against this machine -----------------------------------------------------------


def calibrate(measured: dict, cpu_bandwidth_gbs: float, model=None, precision: str = "fp32",
              cpu_gflops: float | None = None, prompt_tokens: int = PROMPT_TOKENS) -> Calibration:
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
    bound = project_latency(model, precision, "direct", cpu, prompt_tokens=prompt_tokens)
    roof = {"vision": bound.phases_ms["vision"], "prefill": bound.phases_ms["prefill"],
            "decode": bound.decode_ms_per_token}
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
