"""Memory fit: exact parameter counts, hand-computed breakdowns, refusals that name the numbers and the fix."""

import numpy as np
import pytest

from edge_vla.config import preset
from edge_vla.errors import EdgeVLAError
from edge_vla.deploy.memory_fit import (GIB, check_fit, estimate_memory, model_shape, sequence_length,
                                        weights_breakdown)
from edge_vla.deploy.targets import get_target


def test_shape_counts_match_the_real_tiny_model(tiny_vla):
    shape = model_shape(tiny_vla.config)
    # every parameter a graph runs (SigLIP's unused pooling head is never exported)
    used = sum(p.numel() for n, p in tiny_vla.named_parameters() if not n.startswith("vision.vision_model.head."))
    assert shape.total_params == used
    assert shape.prefix_tokens == tiny_vla.n_prefix_tokens == 33
    assert shape.vocab == tiny_vla.lm.get_input_embeddings().weight.shape[0]


def test_shape_of_hub_presets_without_download():
    qwen = model_shape("minivla")
    assert qwen.lm_params == 494_032_768  # Qwen2.5-0.5B as Hugging Face counts it (tied head)
    assert qwen.tied_embeddings and qwen.kv_heads == 2 and qwen.head_dim == 64
    llama = model_shape("openvla")
    assert llama.lm_params == 6_738_415_616 and not llama.tied_embeddings
    assert llama.prefix_tokens == 256  # 224 px / patch 14 = 16 x 16


def test_checkpoint_and_manifest_sources(tmp_path, tiny_vla):
    ckpt = tiny_vla.save_pretrained(tmp_path / "ckpt")
    from_dir = model_shape(ckpt)
    assert from_dir == model_shape(tiny_vla.config)
    manifest = {"schema_version": 1, "model_config": tiny_vla.config.to_dict()}
    assert model_shape(manifest) == from_dir
    with pytest.raises(EdgeVLAError, match="neither an edge-vla checkpoint .* nor a bundle"):
        model_shape(tmp_path)


def test_sequence_lengths_per_mode():
    shape = model_shape("minivla")
    d, f = sequence_length(shape, "direct"), sequence_length(shape, "full")
    assert d["total"] == 256 + 32 + 0 + 3 + 7 and d["prefill"] == 256 + 32 + 3
    assert f["total"] == 256 + 32 + 250 + 3 + 7 and f["prefill"] == 256 + 32
    assert sequence_length(shape, "adaptive")["total"] == f["total"]
    with pytest.raises(EdgeVLAError, match="unknown decode mode"):
        sequence_length(shape, "fast")


def test_breakdown_by_hand_for_qwen_int4_on_nano():
    shape = model_shape("minivla")
    t = get_target("orin-nano-8")
    est = estimate_memory(shape, "int4", "full", t)
    emb = 151936 * 896
    # head quantized to int4 (0.5 B + one fp32 scale per block of 64), embedding Gather kept fp16
    assert est.weights["lm_head"] == pytest.approx(emb * (0.5 + 4 / 64))
    assert est.weights["embedding"] == pytest.approx(emb * 2)
    # vision stays int8 under int4
    assert est.weights["vision"] == pytest.approx(shape.vision_matrix_params * 1 + shape.vision_other_params * 2)
    # KV cache: past + present, 2 (k, v) x 24 layers x 2 kv heads x 64 dims x fp16 x 548 tokens
    assert est.kv_cache == pytest.approx(2 * 2 * 24 * 2 * 64 * 2 * 548)
    assert est.runtime_overhead == t.runtime_overhead_gib * GIB
    assert est.total == pytest.approx(est.weights_total + est.kv_cache + est.activations + est.runtime_overhead)
    assert est.fits


def test_tied_float_head_is_stored_once():
    shape = model_shape("minivla")
    w = weights_breakdown(shape, "fp16", get_target("orin-agx-64"))
    assert w["lm_head"] == 0 and w["embedding"] == 151936 * 896 * 2


def test_precision_order_of_totals():
    totals = [estimate_memory("openvla", p, "full", "orin-agx-64").total for p in ("fp16", "int8", "int4")]
    assert totals[0] > totals[1] > totals[2]


def test_refusal_names_numbers_and_the_precision_that_fits():
    with pytest.raises(EdgeVLAError) as e:
        check_fit("openvla", "fp16", "full", "orin-nano-8")
    msg = str(e.value)
    need = estimate_memory("openvla", "fp16", "full", "orin-nano-8").total / GIB
    assert f"needs {need:.1f} GiB" in msg and "orin-nano-8 has 6.6 GiB usable" in msg
    assert "use --int4" in msg  # int8 (8.4 GiB) does not fit 6.6 GiB; int4 (5.7 GiB) does
    with pytest.raises(EdgeVLAError, match="use --int8"):
        check_fit("openvla", "fp16", "full", "orin-nx-16")  # int8 is the first narrower one that fits


def test_refusal_when_nothing_fits_points_to_a_bigger_board():
    big = preset("openvla", ["lm_path=null", "lm={\"model_type\": \"llama\", \"hidden_size\": 5120, "
                             "\"intermediate_size\": 13824, \"num_hidden_layers\": 40, \"num_attention_heads\": 40, "
                             "\"vocab_size\": 32000}"])
    with pytest.raises(EdgeVLAError, match="no precision fits orin-nano-8; target orin-nx-16 fits it"):
        check_fit(big, "int4", "full", "orin-nano-8")


def test_fits_returns_the_estimate_and_rejects_unsupported_precision():
    est = check_fit("minivla", "fp16", "direct", "orin-nano-8")
    assert est.fits and est.to_dict()["total_gib"] < 6.6
    with pytest.raises(EdgeVLAError, match="does not run fp8"):
        check_fit("minivla", "fp8", "direct", "orin-nano-8")


def test_export_check_refuses_before_exporting_and_skips_unknown_targets(tiny_vla):
    from types import SimpleNamespace

    from edge_vla.deploy.memory_fit import check_export_fits

    lines = []
    fit = check_export_fits(tiny_vla, "int8-static", "orin-nano-8", lines.append)
    assert fit["fits"] and fit["precision"] == "int8" and "memory fit: int8" in lines[0]
    assert check_export_fits(tiny_vla, "int8", "cuda", lines.append) is None  # not a registry target
    seven_b = SimpleNamespace(config=preset("openvla"), recipe_info={"decode_mode": "full"})
    with pytest.raises(EdgeVLAError, match="full needs .* orin-nano-8 .* use --int4"):
        check_export_fits(seven_b, "fp16", "orin-nano-8", lines.append)


def test_int4_bytes_per_weight_are_what_the_export_packs():
    # The memory and roofline models count the INT4 bytes the exporter writes (4-bit blocks plus their
    # scales, fp32 as MatMulNBits keeps them beside fp32 activations), not a format it does not write.
    from edge_vla.deploy.memory_fit import weight_bytes
    from edge_vla.export.nbits import pack_matmul

    k, n = 896, 1152
    p = pack_matmul(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), 4)
    assert (p.data.nbytes + p.scales.nbytes) / (k * n) == pytest.approx(weight_bytes("int4"))
