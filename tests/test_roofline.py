"""Roofline projection: hand-computed bounds, mode/precision ordering, calibration."""

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.memory_fit import model_shape
from edge_vla.deploy.roofline import (Calibration, calibrate, measure_memory_bandwidth, phase_costs,
                                      project_latency)
from edge_vla.deploy.targets import get_target


def test_qwen_bf16_decode_on_agx_orin_is_bandwidth_bound_at_4_8_ms():
    p = project_latency("minivla", "bf16", "direct", "orin-agx-64")
    floor = 494_032_768 * 2 / 204.8e9 * 1e3  # every weight once per token (docs/facts.md: >= 4.8 ms)
    assert floor == pytest.approx(4.8245, abs=1e-3)
    assert p.bound["decode"] == "memory"
    # + the KV cache read (<= 298 tokens x 24 layers x 2 x 2 heads x 64 x 2 B = 3.7 MB -> < 0.02 ms)
    assert floor <= p.decode_ms_per_token <= floor + 0.03


def test_phase_costs_by_hand_for_direct_mode():
    shape = model_shape("minivla")
    t = get_target("orin-agx-64")
    c = phase_costs(shape, "bf16", "direct", t)
    assert c["decode_steps"] == 6  # 7 action tokens, the first from the prefill logits
    tp = 256 + 32 + 3
    expect = 2 * shape.lm_matrix_params * tp + 4 * 24 * 896 * tp * tp / 2 + 2 * 896 * 151936
    assert c["prefill"].flops == pytest.approx(expect)
    p = project_latency(shape, "bf16", "direct", t)
    assert p.bound["prefill"] == "compute"
    assert p.phases_ms["prefill"] == pytest.approx(expect / 42.5e12 * 1e3)
    assert p.total_ms == pytest.approx(sum(p.phases_ms.values())) and p.hz == pytest.approx(1000 / p.total_ms)


def test_full_mode_pays_for_250_reasoning_tokens():
    d = project_latency("minivla", "int8", "direct", "orin-nx-16")
    f = project_latency("minivla", "int8", "full", "orin-nx-16")
    assert f.decode_steps == 250 + 3 + 7 - 1
    assert f.total_ms > 10 * d.total_ms  # the ECoT-Lite argument: ~0.4-0.5 Hz vs several Hz


def test_precision_and_board_ordering():
    ms = {p: project_latency("openvla", p, "direct", "orin-agx-64").total_ms for p in ("fp16", "int8", "int4")}
    assert ms["fp16"] > ms["int8"] > ms["int4"]
    boards = [project_latency("minivla", "int8", "direct", b).total_ms for b in ("orin-agx-64", "orin-nx-16", "orin-nano-8")]
    assert boards == sorted(boards)


def test_roofline_is_below_published_openvla_measurements():
    # NanoLLM on AGX Orin: OpenVLA-7B FP16 840 ms, INT4 336 ms per action (docs/facts.md). A bound must be lower.
    assert project_latency("openvla", "fp16", "direct", "orin-agx-64").total_ms < 840
    assert project_latency("openvla", "int4", "direct", "orin-agx-64").total_ms < 336


def test_calibration_divides_each_phase_by_the_efficiency_measured_on_cpu():
    bw = 10.0
    cpu = get_target("cpu", ["bandwidth_gbs=10.0"])
    roof = project_latency("tiny", "fp32", "direct", cpu)
    measured = {"decode_ms_per_token": roof.decode_ms_per_token * 4, "prefill_ms": roof.phases_ms["prefill"] * 2}
    cal = calibrate(measured, bw, model="tiny", precision="fp32")
    assert cal.efficiency["decode"] == pytest.approx(0.25) and cal.efficiency["prefill"] == pytest.approx(0.5)
    assert "vision" not in cal.efficiency
    base = project_latency("minivla", "int8", "direct", "orin-agx-64")
    scaled = project_latency("minivla", "int8", "direct", "orin-agx-64", calibration=cal)
    assert scaled.calibrated
    assert scaled.phases_ms["decode"] == pytest.approx(base.phases_ms["decode"] * 4)
    assert scaled.phases_ms["prefill"] == pytest.approx(base.phases_ms["prefill"] * 2)
    assert scaled.phases_ms["vision"] == pytest.approx(base.phases_ms["vision"])


def test_calibration_clips_and_rejects_bad_input():
    assert Calibration({"decode": 1.0}).factor("vision") == 1.0
    roof = project_latency("tiny", "fp32", "direct", get_target("cpu", ["bandwidth_gbs=10"]))
    fast = calibrate({"decode_ms_per_token": roof.decode_ms_per_token / 10}, 10.0, model="tiny")
    assert fast.efficiency["decode"] == 1.0  # faster than the roofline means the peak was underestimated
    with pytest.raises(EdgeVLAError, match="calibrate takes measurements"):
        calibrate({"decode_ms": 3.0}, 10.0, model="tiny")
    with pytest.raises(EdgeVLAError, match="must be positive"):
        calibrate({"prefill_ms": 0}, 10.0, model="tiny")


def test_bandwidth_probe_returns_a_positive_rate():
    assert measure_memory_bandwidth(n_bytes=8 * 2**20, repeats=2) > 0.1
