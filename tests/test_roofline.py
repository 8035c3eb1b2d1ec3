"""Roofline projection: hand-computed bounds, mode/precision ordering, calibration."""

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.memory_fit import model_shape
from edge_vla.deploy.roofline import (NANOLLM_OPENVLA_AGX_ORIN_MS, Calibration, calibrate, fixed_floor,
                                      fmt_projected, measure_memory_bandwidth, phase_costs, project_latency,
                                      published_check, round_significant)
from edge_vla.deploy.targets import get_target


def test_qwen_bf16_decode_on_agx_orin_is_bandwidth_bound_at_4_8_ms():
    p = project_latency("minivla", "bf16", "direct", "orin-agx-64")
    floor = 494_032_768 * 2 / 204.8e9 * 1e3  # every weight once per token (docs/facts.md: >= 4.8 ms)
    assert floor == pytest.approx(4.8245, abs=1e-3)
    assert p.bound["decode"] == "memory"
    # + the KV cache read (<= 298 tokens x 24 layers x 2 x 2 heads x 64 x 2 B = 3.7 MB -> < 0.02 ms)
    assert floor <= p.roofline_ms["decode"] / p.decode_steps <= floor + 0.03
    # + 3 graph runs x 150 us per step (assumed fixed costs; 24 x 12 + 4 launches x 8 us overlap the 4.8 ms)
    assert p.decode_ms_per_token == pytest.approx(p.roofline_ms["decode"] / p.decode_steps + 0.45)


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
    assert p.roofline_ms["prefill"] == pytest.approx(expect / 42.5e12 * 1e3)
    assert p.phases_ms["prefill"] == pytest.approx(expect / 42.5e12 * 1e3 + 3 * 0.150)
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
    run = {ph: scaled.floor_ms[ph] - fixed_floor(model_shape("minivla"), get_target("orin-agx-64"),
                                                scaled.decode_steps)[ph][0] for ph in scaled.phases_ms}
    # the efficiency divides the roofline; the fixed cost per graph run is not scaled
    assert scaled.phases_ms["decode"] == pytest.approx(base.roofline_ms["decode"] * 4 + run["decode"])
    assert scaled.phases_ms["prefill"] == pytest.approx(base.roofline_ms["prefill"] * 2 + run["prefill"])
    assert scaled.phases_ms["vision"] == pytest.approx(base.phases_ms["vision"])


def test_a_full_mode_measurement_of_a_parallel_action_model_calibrates_its_decode():
    """A parallel-action model's direct call has no decode step: calibrating a full-mode decode
    measurement against it set the decode efficiency to its floor (1e-3) and projected a tiny
    model's full-mode call on an Orin at ~7 s (the demo's bench printed ~0.15 calls/s)."""
    from edge_vla.config import preset

    cfg = preset("tiny")
    cfg.parallel_actions = True
    cpu = get_target("cpu", ["bandwidth_gbs=10.0"])
    full = project_latency(cfg, "fp32", "full", cpu)
    assert not project_latency(cfg, "fp32", "direct", cpu).decode_steps and full.decode_steps
    cal = calibrate({"decode_ms_per_token": full.decode_ms_per_token * 2}, 10.0, model=cfg, mode="full")
    assert cal.efficiency["decode"] == pytest.approx(0.5)
    orin = project_latency(cfg, "fp32", "full", "orin-agx-64", calibration=cal)
    bare = project_latency(cfg, "fp32", "full", "orin-agx-64")
    assert orin.total_ms <= 2 * bare.total_ms  # at 50% efficiency, never the 1000x of the floor
    with pytest.raises(EdgeVLAError, match="has none"):
        calibrate({"decode_ms_per_token": 1.0}, 10.0, model=cfg, mode="direct")


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


def test_no_projected_forward_pass_beats_the_fixed_floor():
    # The tiny 1M-parameter model's INT4 direct action once projected 9,212 actions/s on AGX Orin: a
    # roofline with no fixed cost. Now every phase pays graph runs + kernel launches.
    agx = get_target("orin-agx-64")
    shape = model_shape("tiny")
    ms = {}
    for prec in ("fp32", "int8", "int4"):
        p = project_latency("tiny", prec, "direct", agx)
        runs = 1 + 3 + 3 * p.decode_steps  # vision engine; embed + decoder + head per LM pass
        assert p.total_ms >= runs * agx.graph_run_us / 1e3
        assert all(p.phases_ms[ph] >= p.floor_ms[ph] > 0 for ph in p.phases_ms)
        assert p.bound["decode"] == "launch"  # launch-bound, not bandwidth-bound
        ms[prec] = p.total_ms
    assert 1000 / ms["int4"] < 1000  # calls/s: was 9,212
    # at this size the bytes saved by INT4 buy nothing: the floor is the same for every precision
    assert ms["int4"] == pytest.approx(ms["fp32"], rel=0.05)
    # the floor counts layers: 4 layers x 12 kernels + 4 outside, 8 us each, per decode step
    launches, runs = fixed_floor(shape, agx, 6)["decode"]
    assert launches == pytest.approx(6 * (4 * 12 + 4) * 8e-3) and runs == pytest.approx(6 * 3 * 0.15)
    # the CPU target has no assumed floor: bench measures this CPU's fixed costs
    cpu = project_latency("tiny", "fp32", "direct", "cpu")
    assert sum(cpu.floor_ms.values()) == 0 and cpu.phases_ms == cpu.roofline_ms


def test_floor_is_an_override_like_any_target_figure():
    fast = get_target("orin-agx-64", ["graph_run_us=0", "kernel_launch_us=0"])
    assert project_latency("tiny", "int4", "direct", fast).total_ms < 0.1  # the bare roofline again
    assert project_latency("tiny", "int4", "direct", "orin-agx-64").total_ms > 1


@pytest.mark.parametrize("on", ["fp16", "fp8", "int4"])
def test_published_openvla_times_predicted_from_one_point_within_10_percent(on):
    # Calibrate one efficiency on one of NanoLLM's OpenVLA-7B times on AGX Orin, predict the other two.
    r = published_check(on)
    assert r["rows"][on]["error"] == pytest.approx(0, abs=1e-6)
    assert 0.3 < r["efficiency"] < 1
    for name, row in r["rows"].items():
        assert row["published_ms"] == NANOLLM_OPENVLA_AGX_ORIN_MS[name]
        assert row["roofline_ms"] < row["published_ms"]  # the bare bound stays below every measurement
        assert abs(row["error"]) < 0.10, (name, row)
    # the precisions keep their published order
    p = r["rows"]
    assert p["fp16"]["projected_ms"] > p["fp8"]["projected_ms"] > p["int4"]["projected_ms"]


def test_published_check_refuses_what_it_cannot_calibrate_on():
    with pytest.raises(EdgeVLAError, match="no published point"):
        published_check("int2")
    with pytest.raises(EdgeVLAError, match="faster than the orin-agx-64 roofline"):
        published_check("fp16", published={"fp16": 100.0})


def test_projections_print_to_two_significant_figures():
    assert fmt_projected(9212.3) == "9200" and fmt_projected(153.4) == "150"
    assert fmt_projected(3.456) == "3.5" and fmt_projected(0.01234) == "0.012" and fmt_projected(None) == "-"
    assert round_significant(153.4) == 150 and round_significant(0.0) == 0


def test_parallel_chunk_decoding_is_one_prefill_pass_in_direct_mode():
    # The shipped tiny checkpoints decode their 4-action chunk (28 tokens) in one pass: the placeholders
    # ride in the direct-mode prefill, so no decode step (and no per-step floor) follows it.
    from edge_vla.config import preset

    par = preset("tiny", ["parallel_actions=true", "action_chunk=4"])
    seq = preset("tiny", ["action_chunk=4"])
    p = project_latency(par, "int4", "direct", "orin-agx-64")
    s = project_latency(seq, "int4", "direct", "orin-agx-64")
    assert p.decode_steps == 0 and p.phases_ms["decode"] == 0
    assert s.decode_steps == 27 and s.total_ms > 5 * p.total_ms
    shape = model_shape(par)
    bare = phase_costs(shape, "int4", "direct", get_target("orin-agx-64"), 32 + 28)
    assert p.roofline_ms["prefill"] > 0 and bare["prefill"].flops > phase_costs(
        shape, "int4", "direct", get_target("orin-agx-64"))["prefill"].flops  # the 28 placeholders are prefilled
    assert project_latency(par, "int4", "full", "orin-agx-64").decode_steps > 250  # full mode still decodes
