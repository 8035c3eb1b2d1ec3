"""`edge-vla export --int8 --int8-matmul auto|nbits|integer`: the int8 decoder's MatMul kernel.

auto = MatMulInteger where the deployed action is one prefill (direct mode, parallel actions), MatMulNBits where
the model decodes token by token; the choice and its reason are in the manifest and the printed report."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import INSTRUCTIONS, make_samples
from edge_vla.errors import EdgeVLAError


def _ckpt(path, parallel: bool, recipe: dict):
    import torch

    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    torch.manual_seed(0)
    s = make_samples()
    vla = VLA.from_preset("tiny", [f"parallel_actions={str(parallel).lower()}"], texts=INSTRUCTIONS,
                          action_stats=ActionStats.from_actions(np.stack([x.action for x in s])))
    vla.recipe_info = recipe
    vla.save_pretrained(path)
    return path


DIRECT = {"name": "vla", "decode_mode": "direct", "max_free_tokens": 0, "inference_prefix": " ACTION:"}
ECOT = {"name": "ecot", "decode_mode": "full", "max_free_tokens": 4, "inference_prefix": ""}


@pytest.fixture(scope="module")
def parallel_ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("par") / "ckpt", True, DIRECT)


@pytest.fixture(scope="module")
def ecot_ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("ecot") / "ckpt", False, ECOT)


def _export(ckpt, out, *args):
    from edge_vla.cli import main

    res = CliRunner().invoke(main, ["export", str(ckpt), "--int8", "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return res.output


def _decoder_ops(bundle) -> set[str]:
    import onnx

    from edge_vla.artifacts.bundle import load_bundle

    b = load_bundle(bundle)
    return {n.op_type for n in onnx.load(str(b.graph_path("decoder"))).graph.node}, b.manifest


def test_a_parallel_direct_checkpoint_ships_a_matmulinteger_decoder(parallel_ckpt, tmp_path):
    out = _export(parallel_ckpt, tmp_path / "b")
    ops, m = _decoder_ops(tmp_path / "b")
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    assert "GroupQueryAttention" in ops  # the fused CPU decoder, quantized in the other form
    assert m["int8_matmul"]["requested"] == "auto" and m["int8_matmul"]["decoder"] == "integer"
    assert m["int8_matmul"]["op"] == "MatMulInteger" and "parallel" in m["int8_matmul"]["reason"]
    assert m["graphs"]["decoder"]["int8_matmul"] == "integer" and "int8_matmul" not in m["graphs"]["lm_head"]
    assert "int8 decoder MatMuls: MatMulInteger (auto: direct mode with parallel actions" in out
    assert "quantizing decoder graph to int8 (MatMulInteger)" in out
    import onnx

    from edge_vla.artifacts.bundle import load_bundle

    head = load_bundle(tmp_path / "b").graph_path("lm_head")  # only the decoder takes the choice
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(head)).graph.node}
    assert m["accuracy"]["direct"]["action_token_agreement"] is not None  # accuracy measured as for every bundle


def test_a_full_mode_checkpoint_ships_a_matmulnbits_decoder(ecot_ckpt, tmp_path):
    out = _export(ecot_ckpt, tmp_path / "b")
    ops, m = _decoder_ops(tmp_path / "b")
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops
    assert m["int8_matmul"] == {"requested": "auto", "decoder": "nbits", "op": "MatMulNBits",
                                "reason": m["int8_matmul"]["reason"]}
    assert "decode mode full" in m["int8_matmul"]["reason"]
    assert "int8 decoder MatMuls: MatMulNBits (auto: decode mode full" in out


def test_the_explicit_choice_overrides_auto(parallel_ckpt, tmp_path):
    _export(parallel_ckpt, tmp_path / "b", "--int8-matmul", "nbits")
    ops, m = _decoder_ops(tmp_path / "b")
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops
    assert m["int8_matmul"]["requested"] == "nbits" and m["int8_matmul"]["decoder"] == "nbits"


def test_auto_follows_the_recipe_and_the_config():
    from types import SimpleNamespace

    from edge_vla.export.steps import choose_int8_matmul

    par, seq = SimpleNamespace(parallel_actions=True), SimpleNamespace(parallel_actions=False)
    assert choose_int8_matmul("auto", "int8", par, DIRECT, "cpu")["decoder"] == "integer"
    assert choose_int8_matmul("auto", "int8", par, {}, "cpu")["decoder"] == "integer"  # the Policy's default mode
    assert choose_int8_matmul("auto", "int8", seq, DIRECT, "cpu")["decoder"] == "nbits"
    assert choose_int8_matmul("auto", "int8", par, ECOT, "cpu")["decoder"] == "nbits"
    assert choose_int8_matmul("auto", "int8", par, {"decode_mode": "adaptive"}, "cpu")["decoder"] == "nbits"
    assert choose_int8_matmul("integer", "int8", seq, ECOT, "cpu")["decoder"] == "integer"
    assert choose_int8_matmul("auto", "int4", par, DIRECT, "cpu") is None  # nothing int8 to choose for
    # The streaming export packs MatMulNBits only: auto says so, an explicit integer is refused.
    st = choose_int8_matmul("auto", "int8", par, DIRECT, "cpu", streaming=True)
    assert st["decoder"] == "nbits" and "streaming" in st["reason"]
    with pytest.raises(EdgeVLAError, match="streaming"):
        choose_int8_matmul("integer", "int8", par, DIRECT, "cpu", streaming=True)


def test_tensorrt_targets_keep_matmulinteger_and_refuse_an_explicit_choice():
    from edge_vla.deploy.targets import get_target
    from edge_vla.export.steps import choose_int8_matmul

    trt = "orin-agx-64"
    assert get_target(trt).uses_tensorrt
    rec = choose_int8_matmul("auto", "int8", None, ECOT, trt)
    assert rec["decoder"] == "integer" and "TensorRT" in rec["reason"]
    with pytest.raises(EdgeVLAError, match="TensorRT"):
        choose_int8_matmul("nbits", "int8", None, ECOT, trt)


def test_a_bad_value_is_one_clear_error(parallel_ckpt, tmp_path):
    from edge_vla.cli import main
    from edge_vla.export import export_bundle

    with pytest.raises(EdgeVLAError, match="unknown INT8 MatMul form.*`integr`") as e:
        export_bundle(parallel_ckpt, tmp_path / "b", precision="int8", int8_matmul="integr")
    assert "integer" in str(e.value)  # the close valid name
    with pytest.raises(EdgeVLAError, match="applies to --int8"):  # refused before the slow steps
        export_bundle(parallel_ckpt, tmp_path / "b", precision="int4", int8_matmul="integer")
    assert not (tmp_path / "b").exists()
    res = CliRunner().invoke(main, ["export", str(parallel_ckpt), "--int8", "--int8-matmul", "fast",
                                    "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--int8-matmul" in res.output and "Traceback" not in res.output
