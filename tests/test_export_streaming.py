"""The streaming export and import (issue #19): a released OpenVLA-layout checkpoint to a bundle without
holding the model.

The tiny checkpoint is test_import_openvla's (the released key names, shards and index, sizes shrunk;
one dataset's norm_stats, as a LIBERO fine-tune's). What is checked: the streamed bundle acts as the
published model (an fp32 streaming export against the independent reference), its INT4/INT8 graphs
hold exactly the bytes the in-memory export's whole-graph quantizer writes and decode the same
action tokens, the decoder is built from one layer's tensors at a time, and an imported checkpoint
keeps the released dtype and exports the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vla.errors import EdgeVLAError
from test_import_openvla import INSTRUCTION, _image, libero_gripper, make_openvla_checkpoint, ref_predict_action

KEY = "libero_spatial_no_noops"


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "openvla-7b-finetuned-libero-spatial"
    sd = make_openvla_checkpoint(path)
    sd["__path__"] = path
    cfg = json.loads((path / "config.json").read_text())
    cfg["norm_stats"] = {KEY: cfg["norm_stats"][KEY]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, sd


def _export_pairs(src, root, precisions, fp32: bool) -> dict:
    from edge_vla.export import export_bundle

    out = {}
    if fp32:
        out["fp32"] = export_bundle(src, root / "stream_fp32", precision="fp32", streaming=True, report=_quiet)
    for precision in precisions:
        out[precision] = export_bundle(src, root / f"stream_{precision}", precision=precision, streaming=True,
                                       report=_quiet)
        out[f"memory_{precision}"] = export_bundle(src, root / f"memory_{precision}", precision=precision,
                                                   streaming=False, report=_quiet)
    return out


@pytest.fixture(scope="module")
def bundles(released, tmp_path_factory):
    """Streamed fp32 and INT4 bundles, and the in-memory INT4 bundle of the same checkpoint."""
    return _export_pairs(released[0], tmp_path_factory.mktemp("stream_bundles"), ("int4",), fp32=True)


@pytest.fixture(scope="module")
def int8_bundles(released, tmp_path_factory):
    return _export_pairs(released[0], tmp_path_factory.mktemp("stream_int8"), ("int8",), fp32=False)


def _obs(img):
    return {"images": {"agentview": img}, "instruction": INSTRUCTION}


def test_a_streamed_fp32_bundle_acts_as_the_published_model(released, bundles):
    """Graphs built from the shards, checked per layer and against the streamed PyTorch reference,
    give predict_action's de-normalised action (the test's own reference from the published math)."""
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.runtime.policy import load_policy

    m = load_bundle(bundles["fp32"]).manifest
    p = m["parity"]
    assert p["passed"] and p["streamed"] and m["graphs"]["decoder"]["built"] == "streaming"
    assert [r["layer"] for r in p["per_layer"]["layers"]] == [0, 1] and p["per_layer"]["max_diff"] < 1e-4
    assert p["whole_graph"]["action_bin_agreement"] == 1.0 and p["whole_graph"]["max_action_logit_diff"] < 1e-3
    assert p["prefix"]["max_diff"] < 1e-3
    img = _image(3)
    want, _ = ref_predict_action(released[1], img, KEY)
    np.testing.assert_allclose(load_policy(bundles["fp32"]).act(_obs(img)).action, libero_gripper(want), atol=1e-5)


def test_streamed_and_in_memory_int4_bundles_hold_the_same_weights(bundles):
    """Packed weight by weight (edge_vla.export.nbits) or by ORT's MatMulNBitsQuantizer over the whole fp32
    graph: the same MatMulNBits / embedding bytes, the same nodes, the same action tokens."""
    _same_weights_and_tokens(bundles, "int4")


@pytest.mark.slow
def test_streamed_and_in_memory_int8_bundles_hold_the_same_weights(int8_bundles):
    _same_weights_and_tokens(int8_bundles, "int8")


def _same_weights_and_tokens(bundles, precision):
    import onnx
    from onnx import numpy_helper

    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    a_dir, b_dir = bundles[precision], bundles[f"memory_{precision}"]
    for graph in ("decoder.onnx", "lm_head.onnx", "embed.onnx"):
        a, b = onnx.load(str(a_dir / graph)), onnx.load(str(b_dir / graph))
        assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node), graph
        ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
        ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
        packed = [k for k in ia if k.endswith(("_Q4", "_Q8", "_scales", "_quantized", "_scale", "_zero_point"))]
        assert packed, graph
        for k in packed:
            np.testing.assert_array_equal(ia[k], ib[k], err_msg=f"{graph}: {k}")
        attrs = lambda m: sorted(str(n.attribute) for n in m.graph.node if n.op_type == "MatMulNBits")  # noqa: E731
        assert attrs(a) == attrs(b), graph
    pa, pb = load_policy(a_dir), load_policy(b_dir)
    from edge_vla.artifacts.bundle import load_bundle

    for o in synthetic_observations(load_bundle(a_dir).config):
        assert pa.act(o).info["action_token_ids"] == pb.act(o).info["action_token_ids"]


@pytest.mark.slow
def test_the_int8_streamed_bundle_reports_parity_per_layer_and_whole(int8_bundles):
    from edge_vla.artifacts.bundle import load_bundle

    p = load_bundle(int8_bundles["int8"]).manifest["parity"]
    assert all(0.99 < r["update_cosine"] <= 1.0 + 1e-9 for r in p["per_layer"]["layers"])
    assert p["whole_graph"]["n_tokens"] > 0 and 0.0 <= p["whole_graph"]["action_bin_agreement"] <= 1.0
    assert p["whole_graph"]["action_cosine"] > 0.99  # 8-bit blocks of 256 on this tiny random model


def test_the_decoder_is_built_from_one_layer_at_a_time(released, tmp_path):
    """The instrumented accessor: every decoder tensor is read exactly once, in layer order, and when
    any tensor is read the arrays still held from earlier reads never exceed one layer's."""
    from edge_vla.export.streaming import DecoderWeights, open_source, write_decoder
    from edge_vla.model.vla import hf_config

    src = open_source(released[0])
    acc = DecoderWeights(src.weights)
    lm_cfg = hf_config(src.config.lm, "language model")
    write_decoder(src, lm_cfg, tmp_path, 4, _quiet, acc)
    names = [k[len("lm.model."):] for k in src.weights if k.startswith("lm.model.layers.")]
    assert sorted(acc.reads) == sorted(names + ["norm.weight"])
    layer_of = [int(n.split(".")[1]) for n in acc.reads if n.startswith("layers.")]
    assert layer_of == sorted(layer_of)
    one_layer = max(sum(4 * np.prod(src.weights.shape(f"lm.model.{n}")) for n in names if n.startswith(f"layers.{i}."))
                    for i in range(lm_cfg.num_hidden_layers))
    assert 0 < acc.max_live_bytes < one_layer
    import onnx

    m = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    # The weights live in the side file: the graph proto holds their offsets, not their bytes.
    packed = [i for i in m.graph.initializer if i.name.endswith("_Q4")]
    assert len(packed) == 4 * lm_cfg.num_hidden_layers  # qkv, o, gate|up, down
    assert all(i.data_location == onnx.TensorProto.EXTERNAL and not i.raw_data for i in packed)
    assert (tmp_path / "decoder.onnx.data").stat().st_size > 5 * m.ByteSize()


def test_an_imported_checkpoint_keeps_the_released_dtype_and_streams_the_same(released, bundles, tmp_path):
    """bfloat16 shards -> `edge-vla import` writes bfloat16 (never float32 in memory); from_pretrained
    loads it as from_released does; `edge-vla export CKPT --streaming --int4` gives the bundle the released
    directory gives."""
    from click.testing import CliRunner
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edge_vla.cli import main
    from edge_vla.model.vla import VLA

    src = shutil.copytree(released[0], tmp_path / "bf16")
    for f in src.glob("model-*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    ckpt = tmp_path / "ckpt"
    res = CliRunner().invoke(main, ["import", str(src), "-o", str(ckpt)])
    assert res.exit_code == 0, res.output
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.get_slice("lm.model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"
    a, b = VLA.from_pretrained(ckpt), VLA.from_released(src)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    res = CliRunner().invoke(main, ["export", str(ckpt), "--int4", "--streaming", "-o", str(tmp_path / "b_ckpt")])
    assert res.exit_code == 0, res.output
    assert "streaming export" in res.output and "per-layer parity" in res.output
    res = CliRunner().invoke(main, ["export", str(src), "--int4", "--streaming", "-o", str(tmp_path / "b_src")])
    assert res.exit_code == 0, res.output
    import onnx

    da = {i.name: i.raw_data for i in onnx.load(str(tmp_path / "b_ckpt" / "decoder.onnx")).graph.initializer}
    db = {i.name: i.raw_data for i in onnx.load(str(tmp_path / "b_src" / "decoder.onnx")).graph.initializer}
    assert da == db


def test_streaming_refuses_what_it_cannot_build_with_one_line(released, tmp_path):
    from edge_vla.export import export_bundle

    with pytest.raises(EdgeVLAError, match="cannot be exported by streaming: target orin-agx-64.*TensorRT"):
        export_bundle(released[0], tmp_path / "b", precision="int8", target="orin-agx-64", streaming=True, report=_quiet)
    with pytest.raises(EdgeVLAError, match="precision fp16 is not packed weight by weight"):
        export_bundle(released[0], tmp_path / "b", precision="fp16", streaming=True, report=_quiet)
    assert not (tmp_path / "b").exists()


def test_streaming_is_chosen_by_size(released, monkeypatch):
    from edge_vla.export import streaming

    n = streaming.checkpoint_params(released[0])
    assert 0 < n < streaming.STREAM_ABOVE_PARAMS
    assert streaming.checkpoint_params(Path("/nonexistent")) is None


def test_a_truncated_shard_is_named_before_anything_is_read(released, tmp_path):
    from edge_vla.model.importers import read_safetensors

    src = shutil.copytree(released[0], tmp_path / "cut")
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(EdgeVLAError, match="model-00002-of-00002.safetensors is truncated.*re-download"):
        read_safetensors(src)
    shard.write_bytes(b"\x10\x00")
    with pytest.raises(EdgeVLAError, match="does not load .*header is damaged"):
        read_safetensors(src)


def test_memory_fit_refuses_a_7b_config_for_a_small_board_before_reading_weights(released, tmp_path):
    """`--target orin-*` applies to imported/released models on the streaming path too: sized from the
    config (here a Llama-2-7B text config over the tiny weights, which are never read)."""
    from edge_vla.export import export_bundle

    src = shutil.copytree(released[0], tmp_path / "big")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeVLAError, match=r"int8 direct needs .* GiB.*orin-nano-8 has .* GiB usable"):
        export_bundle(src, tmp_path / "b", precision="int8", target="orin-nano-8", streaming=True, report=_quiet)
