"""Target profiles: the registry, the datasheet numbers, overrides and export defaults."""

import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.targets import PRECISIONS, TARGETS, export_precision_for, get_target, target_defaults


def test_registry_has_the_boards_users_deploy_on():
    assert {"cpu", "orin-agx-64", "orin-nx-16", "orin-nano-8", "cuda-gpu"} <= set(TARGETS)
    for name in TARGETS:
        t = get_target(name)
        assert t.name == name
        assert 0 < t.usable_gib < t.memory_gib + 1e-9
        assert t.default_precision in t.precisions
        assert set(t.precisions) <= set(PRECISIONS)


def test_orin_numbers_match_the_datasheets():
    agx, nx, nano = get_target("orin-agx-64"), get_target("orin-nx-16"), get_target("orin-nano-8")
    assert (agx.bandwidth_gbs, nx.bandwidth_gbs, nano.bandwidth_gbs) == (204.8, 102.4, 68.0)
    # dense INT8 = half the sparse datasheet TOPS (GPU only): 170/2, 60/2, 40/2
    assert (agx.int8_tops, nx.int8_tops, nano.int8_tops) == (85.0, 30.0, 20.0)
    for t in (agx, nx, nano):
        assert "fp8" not in t.precisions  # Ampere has no FP8 tensor cores
        assert t.tensorrt is not None and t.tensorrt.use_dla is False
        assert t.compute_tflops("int8") == 2 * t.compute_tflops("fp16")
    assert nano.tensorrt.external_weights and nano.usable_gib < 8


def test_unknown_target_suggests_the_closest_name():
    with pytest.raises(EdgeVLAError, match="did you mean `orin-nano-8`"):
        get_target("orin-nano8")


def test_overrides_change_one_field_and_reject_unknown_ones():
    t = get_target("cuda-gpu", ["memory_gib=80", "linux_visible_gib=80", "bandwidth_gbs=3350",
                                "tensorrt.workspace_gib=16"])
    assert t.memory_gib == 80 and t.bandwidth_gbs == 3350 and t.tensorrt.workspace_gib == 16
    with pytest.raises(EdgeVLAError, match="unknown config key"):
        get_target("cuda-gpu", ["bandwith_gbs=1"])


def test_precision_check_refuses_fp8_on_orin():
    with pytest.raises(EdgeVLAError, match="does not run fp8"):
        get_target("orin-agx-64").check_precision("fp8")
    get_target("cuda-gpu").check_precision("fp8")


def test_export_defaults_per_target():
    nano, cpu = target_defaults("orin-nano-8"), target_defaults("cpu")
    assert nano["precision"] == "int4" and nano["runtime"] == "tensorrt" and nano["lint_tensorrt"]
    assert nano["quant_format"] == "qdq-symmetric" and nano["export_precision"] == "int4"
    assert cpu["runtime"] == "onnxruntime" and not cpu["lint_tensorrt"] and cpu["tensorrt"] is None


def test_exporter_default_precision_per_target():
    assert export_precision_for("cpu") == "int8"  # ORT dynamic INT8: the fastest accurate CPU path
    assert export_precision_for("orin-nx-16") == "fp16"  # the exporter's int8 paths are not TensorRT-ready
    assert export_precision_for("orin-nano-8") == "int4"  # MatMulNBits, rewritten to TensorRT INT4 at build
    assert export_precision_for("cuda") == "int8"  # the exporter's own generic name, outside the registry


def test_vision_precision_default_for_int4_exports():
    from edge_vla.deploy.targets import default_vision_precision

    assert default_vision_precision("cpu", "int4") == "int8"
    assert default_vision_precision("orin-nano-8", "int4") == "fp16"  # ORT dynamic INT8 does not parse in TensorRT
    assert default_vision_precision("orin-nano-8", "fp16") == "fp16"


def test_gpu_targets_carry_a_fixed_floor_and_the_cpu_none():
    # The floor per graph run and per kernel launch is what keeps small models' projections physical.
    for name in ("orin-agx-64", "orin-nx-16", "orin-nano-8", "cuda-gpu"):
        t = get_target(name)
        assert t.graph_run_us > 0 and t.kernel_launch_us > 0
    # Orin's Arm host launches more slowly than a desktop x86 host (assumed, stated in the profile)
    assert get_target("orin-nano-8").kernel_launch_us > get_target("cuda-gpu").kernel_launch_us
    cpu = get_target("cpu")
    assert cpu.graph_run_us == 0 and cpu.kernel_launch_us == 0  # bench measures the CPU's own fixed costs
    assert get_target("orin-agx-64", ["kernel_launch_us=5"]).kernel_launch_us == 5
