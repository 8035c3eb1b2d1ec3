"""Export -> bundle -> runtime on a tiny trained checkpoint: parity, accuracy, tamper, no-torch runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from _trained_tiny import train_tiny_checkpoint
from edge_vla.errors import EdgeVLAError
from edge_vla.data.observations import sample_to_obs


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained") / "ckpt")


@pytest.fixture(scope="session")
def int8_bundle(trained, tmp_path_factory):
    """Exported through the CLI, as users run it."""
    from edge_vla.cli import main

    ckpt, _ = trained
    out = tmp_path_factory.mktemp("b8") / "bundle"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--int8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "parity vs PyTorch" in res.output and "action-token agreement" in res.output
    return out


@pytest.fixture(scope="session")
def fp32_bundle(trained, tmp_path_factory):
    from edge_vla.export import export_bundle

    ckpt, samples = trained
    return export_bundle(ckpt, tmp_path_factory.mktemp("b32") / "bundle", precision="fp32",
                         parity_samples=samples[:2], report=lambda *_: None)


def test_int8_bundle_manifest_records_parity_and_accuracy(int8_bundle, trained):
    from edge_vla.artifacts.bundle import load_bundle

    b = load_bundle(int8_bundle)
    m = b.manifest
    assert m["parity"]["passed"] and m["parity"]["max_logit_diff"] < 1e-2 and m["parity"]["token_agreement"] == 1.0
    assert {m["graphs"][r]["precision"] for r in ("prefix", "embed", "decoder", "lm_head")} == {"int8"}
    assert m["schema_version"] == 2 and m["parity"]["action_bin_agreement"] == 1.0  # the restricted head is checked too
    assert m["accuracy"]["direct"]["action_token_agreement"] >= 0.95  # trained model: INT8 keeps the argmax
    assert m["accuracy"]["direct"]["action_token_agreement_tf"] >= 0.95  # and per token, fed the fp32 tokens
    # The action vectors, as users compare a deployed VLA: fp32 graphs vs PyTorch, INT8 vs fp32.
    assert m["parity"]["action_cosine"] > 0.99999 and m["parity"]["action_max_abs_err"] < 1e-4
    acc = m["accuracy"]["direct"]
    assert 0.9 < acc["action_cosine"] <= 1.0 + 1e-9 and acc["action_max_abs_err"] >= max(acc["per_dim_max"]) - 1e-9
    assert set(m["files"]) >= {"decoder.onnx", "lm_head.onnx", "prefix.onnx", "embed.onnx", "action_head.onnx",
                               "tokenizer/tokenizer.json"}
    assert m["graphs"]["action_head"]["precision"] == "fp32"
    assert m["recipe"]["decode_mode"] == "direct" and m["action_stats"]["q01"]
    # A CPU export ships the fused decoder, its MatMuls as 8-bit blocks with int8 compute.
    import onnx

    assert m["graphs"]["decoder"]["form"] == "onnxruntime-fused"
    nodes = onnx.load(str(b.graph_path("decoder"))).graph.node
    assert "GroupQueryAttention" in {n.op_type for n in nodes}
    nbits = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and all(a["bits"] == 8 and a["accuracy_level"] == 4 for a in nbits)
    assert not any(n.op_type == "MatMul" and n.input[1].endswith("_w") for n in nodes)  # every weight quantized


def test_int4_export_is_smaller_and_reports_accuracy(trained, int8_bundle, tmp_path):
    from edge_vla.export import export_bundle
    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.runtime.policy import load_policy

    ckpt, samples = trained
    out = export_bundle(ckpt, tmp_path / "b4", precision="int4", parity_samples=samples[:1],
                        calibration_data=samples, report=lambda *_: None)
    b = load_bundle(out)
    assert b.graphs["decoder"]["precision"] == "int4"
    import onnx

    ops = {n.op_type for n in onnx.load(str(b.graph_path("decoder"))).graph.node}
    # The vocabulary head is a graph of its own and is 4-bit too (a large share of a real model's weights).
    assert b.graphs["lm_head"]["precision"] == "int4"
    assert {n.op_type for n in onnx.load(str(b.graph_path("lm_head"))).graph.node} == {"MatMulNBits"}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in {n.op_type for n in onnx.load(str(b.graph_path("embed"))).graph.node}
    dec4 = b.graph_path("decoder").stat().st_size
    dec8 = (int8_bundle / "decoder.onnx").stat().st_size
    assert dec4 < dec8
    acc = b.manifest["accuracy"]["direct"]
    assert 0.0 <= acc["action_token_agreement"] <= 1.0 and len(acc["per_dim_l1"]) == 7
    r = load_policy(out).act(sample_to_obs(samples[0]))
    assert r.action.shape == (7,) and np.isfinite(r.action).all()


def test_int4_block_size_is_an_export_option_recorded_in_the_manifest(trained, tmp_path):
    """Larger INT4 blocks decode faster on a CPU (docs/results.md); the block is the user's choice."""
    import onnx

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.cli import main

    ckpt, _ = trained
    sizes = {}
    for block in (32, 128):
        out = tmp_path / f"b{block}"
        res = CliRunner().invoke(main, ["export", str(ckpt), "--int4", "--int4-block", str(block), "-o", str(out)])
        assert res.exit_code == 0, res.output
        b = load_bundle(out)
        assert b.graphs["decoder"]["int4_block"] == block and "int4_block" not in b.graphs["action_head"]
        blocks = {a.i for n in onnx.load(str(b.graph_path("decoder"))).graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "block_size"}
        assert max(blocks) == block  # K >= block gets the block (a smaller K, the largest power of two below it)
        sizes[block] = b.graph_path("decoder").stat().st_size
    assert sizes[128] < sizes[32]  # fewer scales
    for bad, words in ((["--int4", "--int4-block", "48"], "not a power of two"),
                       (["--int8", "--int4-block", "64"], "has no INT4 graph")):
        res = CliRunner().invoke(main, ["export", str(ckpt), *bad, "-o", str(tmp_path / "bad")])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output
        assert not (tmp_path / "bad").exists()
    from edge_vla.export import export_bundle

    with pytest.raises(EdgeVLAError, match="streaming one writes blocks of 64"):
        export_bundle(ckpt, tmp_path / "bad", precision="int4", streaming=True, int4_block=64)


def test_int4_keep8_keeps_the_most_sensitive_decoder_matmuls_at_8_bits(trained, tmp_path):
    """Mixed precision: the K MatMuls whose 4-bit rounding moves the fp32 decoder most, measured on the
    held-out observations during the export, are the ones written at 8 bits; the rest stay 4-bit."""
    import onnx

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.cli import main

    ckpt, samples = trained
    out = tmp_path / "k2"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--int4", "--int4-keep8", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "kept at 8 bits" in res.output and "(2 MatMuls at 8 bits)" in res.output
    b = load_bundle(out)
    sens = b.manifest["int4_sensitivity"]
    scores = sens["scores"]
    kept = b.graphs["decoder"]["int8_nodes"]
    assert len(scores) >= 4 and sens["kept_8bit"] == kept and len(kept) == 2
    assert sorted(scores.values(), reverse=True)[:2] == [scores[n] for n in kept]
    assert len(set(scores.values())) > 1  # a ranking, not a tie
    bits = {}
    for n in onnx.load(str(b.graph_path("decoder"))).graph.node:
        if n.op_type == "MatMulNBits":
            bits[n.name] = next(a.i for a in n.attribute if a.name == "bits")
    assert sorted(bits.values()).count(8) == 2 and sorted(bits.values()).count(4) == len(scores) - 2
    assert {name for name, x in bits.items() if x == 8} == {f"{n}_Q8" for n in kept}  # the quantizer's naming
    assert "int8_nodes" not in b.graphs["lm_head"]
    plain = tmp_path / "k0"
    assert CliRunner().invoke(main, ["export", str(ckpt), "--int4", "-o", str(plain)]).exit_code == 0
    assert b.graph_path("decoder").stat().st_size > load_bundle(plain).graph_path("decoder").stat().st_size
    assert "int4_sensitivity" not in load_bundle(plain).manifest
    for bad, words in ((["--int8", "--int4-keep8", "2"], "add --int4"),
                       (["--int4", "--int4-keep8", "500"], "more MatMuls than the decoder has"),
                       (["--int4", "--int4-keep8", "2", "--target", "orin-nano-8"], "4-bit blocks only"),
                       (["--int4", "--int4-keep8", "-1"], "-1")):
        res = CliRunner().invoke(main, ["export", str(ckpt), *bad, "-o", str(tmp_path / "bad")])
        assert res.exit_code != 0 and words in res.output and "Traceback" not in res.output
        assert not (tmp_path / "bad").exists()
    from edge_vla.export import export_bundle

    with pytest.raises(EdgeVLAError, match="in-memory export"):
        export_bundle(ckpt, tmp_path / "bad", precision="int4", streaming=True, int4_keep8=2)


def test_checkpoint_and_fp32_bundle_give_the_same_actions(trained, fp32_bundle):
    from edge_vla.runtime.policy import load_policy

    ckpt, samples = trained
    pt, ox = load_policy(ckpt), load_policy(fp32_bundle)
    assert pt.backend.name == "torch" and ox.backend.name == "onnxruntime"
    # torch decodes with the LM head's logits, the bundle with the kernels' fused action-head graph.
    assert ox.backend.has_fused_action_head and not hasattr(pt.backend, "has_fused_action_head")
    for s in samples[:4]:
        a, b = pt.act(sample_to_obs(s)), ox.act(sample_to_obs(s))
        assert a.info["action_token_ids"] == b.info["action_token_ids"]
        np.testing.assert_allclose(a.action, b.action, atol=1e-6)
    # Trained: the action comes back close to the demonstrated one (an untrained model is ~0.5 off).
    r = ox.act(sample_to_obs(samples[1]))
    assert np.abs(r.action[:6] - samples[1].action[:6]).mean() < 0.02
    assert r.action[6] == samples[1].action[6]
    assert set(r.timings) >= {"vision", "prefill", "decode_tokens", "action_decode", "total"}
    assert r.tokens["action"] == 7 and r.tokens["reasoning"] == 0


def test_full_mode_on_bundle_matches_torch(trained, fp32_bundle):
    from edge_vla.runtime.policy import load_policy

    ckpt, samples = trained
    kw = dict(mode="full", max_free_tokens=6, force_action_prefix=False)
    pt, ox = load_policy(ckpt, **kw), load_policy(fp32_bundle, **kw)
    a, b = pt.act(sample_to_obs(samples[0])), ox.act(sample_to_obs(samples[0]))
    assert a.info["free_token_ids"] == b.info["free_token_ids"]
    assert a.info["action_token_ids"] == b.info["action_token_ids"]
    assert a.reasoning_text == b.reasoning_text and isinstance(b.reasoning_text, str)
    assert len(b.timings["decode_tokens"]) == b.tokens["reasoning"]
    # Free tokens go through lm_head, action tokens through the restricted head: one head per token
    # (+1 for the lm_head call that finds the first action token, unless the budget ran out first).
    n_free, n_act = b.tokens["reasoning"], b.tokens["action"]
    assert len(b.timings["head"]) in (n_free + n_act, n_free + 1 + n_act)


def test_direct_mode_on_bundle_never_runs_the_full_lm_head(trained, fp32_bundle):
    """One copy of the head weights: decoder.onnx holds no vocabulary-sized weight, and direct
    decoding (restricted head) never calls lm_head; head="full" picks the same tokens through it."""
    import onnx

    from edge_vla.runtime.policy import load_policy

    ckpt, samples = trained
    from edge_vla.artifacts.bundle import load_bundle

    b = load_bundle(fp32_bundle)
    vocab = b.config.lm["vocab_size"]
    hidden = b.graphs["decoder"]["hidden_size"]
    def weight_shapes(role):
        return [sorted(i.dims) for i in onnx.load(str(b.graph_path(role))).graph.initializer]

    head_shape = sorted([vocab, hidden])
    assert head_shape not in weight_shapes("decoder") and head_shape in weight_shapes("lm_head")
    restricted, full = load_policy(fp32_bundle), load_policy(fp32_bundle, head="full")
    calls = []
    lm = restricted.backend.lm_logits
    restricted.backend.lm_logits = lambda h: calls.append(1) or lm(h)
    for s in samples[:3]:
        a, f = restricted.act(sample_to_obs(s)), full.act(sample_to_obs(s))
        assert a.info["action_token_ids"] == f.info["action_token_ids"]
        assert len(a.timings["head"]) == 7 and len(a.timings["body"]) == 6
    assert not calls
    # Adaptive mode's direct pass reads its entropy/margin from the restricted head's 256 logits.
    adaptive = load_policy(fp32_bundle, mode="adaptive", entropy_threshold=1e9)
    adaptive.backend.lm_logits = restricted.backend.lm_logits
    r, pt = adaptive.act(sample_to_obs(samples[0])), load_policy(ckpt, mode="adaptive", entropy_threshold=1e9)
    ref = pt.act(sample_to_obs(samples[0]))
    assert r.info["action_token_ids"] == ref.info["action_token_ids"] and not calls
    assert r.info["adaptive"]["entropy"] == pytest.approx(ref.info["adaptive"]["entropy"], abs=1e-4)
    assert restricted.backend.has_fused_action_head and not full.backend.has_fused_action_head
    with pytest.raises(EdgeVLAError, match="unknown action head"):
        load_policy(fp32_bundle, head="partial")


def test_ort_runtime_does_not_import_torch(int8_bundle, trained):
    _, samples = trained
    s = samples[0]
    code = f"""
import sys, numpy as np
from edge_vla.runtime.policy import load_policy
p = load_policy({str(int8_bundle)!r})
rng = np.random.default_rng(0)
obs = {{"images": {{"agentview": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                    "wrist": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}},
       "state": np.zeros(8, np.float32), "instruction": {s.instruction!r}}}
r = p.act(obs)
assert r.action.shape == (7,)
bad = [m for m in ("torch", "transformers") if m in sys.modules]
print("IMPORTED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_bundles_are_refused_with_the_reason(int8_bundle, tmp_path):
    from edge_vla.artifacts.bundle import load_bundle

    b = _copy(int8_bundle, tmp_path)
    data = bytearray((b / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EdgeVLAError, match="decoder.onnx .*changed"):
        load_bundle(b)

    b = _copy(int8_bundle, tmp_path / "2")
    (b / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(EdgeVLAError, match="missing tokenizer/tokenizer.json"):
        load_bundle(b)

    b = _copy(int8_bundle, tmp_path / "3")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgeVLAError, match="schema version 99"):
        load_bundle(b)
    m["schema_version"] = 1  # a bundle from before the LM head left the decoder graph
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgeVLAError, match="schema version 1 .*full-vocabulary logits.*re-export"):
        load_bundle(b)

    (b / "manifest.json").write_text("{not json")
    with pytest.raises(EdgeVLAError, match="not valid JSON"):
        load_bundle(b)

    (b / "manifest.json").unlink()
    with pytest.raises(EdgeVLAError, match="not an edge-vla bundle"):
        load_bundle(b)


def test_wrong_inputs_at_act_raise_clear_errors(int8_bundle, trained):
    from edge_vla.runtime.policy import load_policy

    _, samples = trained
    p = load_policy(int8_bundle)
    obs = sample_to_obs(samples[0])
    with pytest.raises(EdgeVLAError, match="wrist"):
        p.act({**obs, "images": {"agentview": obs["images"]["agentview"]}})
    with pytest.raises(EdgeVLAError, match="image"):
        p.act({**obs, "images": {**obs["images"], "wrist": np.zeros((64, 64), np.uint8)}})
    with pytest.raises(EdgeVLAError, match="8"):
        p.act({**obs, "state": np.zeros(5)})
    with pytest.raises(EdgeVLAError, match="NaN"):
        p.act({**obs, "state": np.full(8, np.nan)})
    with pytest.raises(EdgeVLAError, match="instruction"):
        p.act({"images": obs["images"], "state": obs["state"]})


class _Skewed:
    """A backend whose logits drift: what a broken export looks like to the parity check."""

    def __init__(self, inner, skew):
        self.inner, self.skew = inner, skew

    def encode_prefix(self, pv, st):
        return self.inner.encode_prefix(pv, st)

    def prefill(self, prefix, ids):
        h, lg, c = self.inner.prefill(prefix, ids)
        return h, lg + self.skew, c

    def step(self, ids, cache):
        h, lg, c = self.inner.step(ids, cache)
        return h, lg + self.skew, c


def test_parity_check_catches_drifting_logits(trained):
    from edge_vla.model.vla import VLA
    from edge_vla.runtime.torch_backend import TorchBackend

    ckpt, samples = trained
    ref = TorchBackend(VLA.from_pretrained(ckpt))
    obs = [sample_to_obs(samples[0])]
    from edge_vla.export.accuracy import parity

    assert parity(ref, _Skewed(ref, 0.0), obs, n_tokens=4)["passed"]
    skew = np.zeros(ref.vla.config.lm["vocab_size"], np.float32)
    skew[5] = 100.0  # one token always wins: greedy tokens disagree
    r = parity(ref, _Skewed(ref, skew), obs, n_tokens=4)
    assert not r["passed"] and r["token_agreement"] < 0.5 and r["max_logit_diff"] >= 100 - 1e-3


@pytest.mark.slow
def test_export_refuses_a_bundle_that_fails_parity(trained, tmp_path):
    from edge_vla.export import export_bundle

    ckpt, samples = trained
    out = tmp_path / "never"
    with pytest.raises(EdgeVLAError, match="disagree with PyTorch"):
        export_bundle(ckpt, out, precision="fp32", parity_samples=samples[:1], parity_atol=-1.0,
                      report=lambda *_: None)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_export_rejects_what_is_not_an_edge_vla_checkpoint(tmp_path):
    from edge_vla.cli import main

    bad = tmp_path / "hf_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (bad / "model.safetensors").write_bytes(b"")
    res = CliRunner().invoke(main, ["export", str(bad), "--int8", "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "not an edge-vla checkpoint" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path / "nothing"), "--int4", "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "Traceback" not in res.output


@pytest.mark.slow
def test_static_int8_calibrates_on_a_dataset_path(trained, tmp_path):
    """--int8-static --data: held-out samples of a LIBERO hdf5 calibrate and measure the bundle."""
    from edge_vla.cli import main
    from edge_vla.data.libero_hdf5 import write_libero_hdf5
    from edge_vla.artifacts.bundle import load_bundle

    ckpt, samples = trained
    rng = np.random.default_rng(0)
    demos = [{"actions": rng.uniform(-0.5, 0.5, (6, 7)).astype(np.float32), "proprio": rng.normal(size=(6, 8)),
              "images": {c: rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8) for c in ("agentview", "wrist")}}
             for _ in range(10)]
    write_libero_hdf5(tmp_path / "ds" / "task_demo.hdf5", demos, samples[0].instruction)
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--int8-static", "--data", str(tmp_path / "ds"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    b = load_bundle(out)
    assert b.graphs["decoder"]["precision"] == "int8-static"
    import onnx

    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(b.graph_path("decoder"))).graph.node}
    assert b.manifest["accuracy"]["n_observations"] >= 1


def test_bundle_action_head_stops_at_bins_and_the_kernel_tables_decode_as_the_tokenizer(fp32_bundle):
    """The bundle's restricted head computes bins (and logits) only; the fused CUDA kernel's tables,
    built by the TensorRT backend, reproduce those bins and ActionTokenizer's de-normalisation."""
    import onnxruntime as ort

    from edge_vla.artifacts.bundle import load_bundle
    from edge_vla.kernels.reference import decode_actions_numpy
    from edge_vla.runtime.tensorrt_backend import action_head_tables
    from edge_vla.tokens.action import ActionTokenizer

    bundle = load_bundle(fp32_bundle)
    sess = ort.InferenceSession(str(bundle.graph_path("action_head")), providers=["CPUExecutionProvider"])
    assert "actions" not in [o.name for o in sess.get_outputs()]
    t = action_head_tables(bundle)
    rng = np.random.default_rng(3)
    tok = bundle.tokenizer()
    dim = bundle.action_stats.dim
    hidden = rng.standard_normal((2 * dim, t["weight"].shape[1])).astype(np.float32) * 3
    dims = np.arange(2 * dim, dtype=np.int64) % dim
    bins, acts = decode_actions_numpy(hidden, t["weight"], dims, t["values"], t["low"], t["high"], t["bias"])
    (g_bins,) = sess.run(["bins"], {"hidden": hidden, "dim": dims})
    assert (bins == g_bins).all()
    want = ActionTokenizer(bundle.action_stats, tok.first_action_id, tok.n_bins).decode(g_bins + tok.first_action_id)
    np.testing.assert_allclose(acts, np.asarray(want).reshape(-1), rtol=1e-6, atol=1e-6)


def test_action_similarity_is_cosine_and_max_error_of_the_action_vectors():
    from edge_vla.export.accuracy import action_similarity

    same = action_similarity([np.array([1.0, 0.0, 2.0])], [np.array([1.0, 0.0, 2.0])])
    assert same["action_cosine"] == pytest.approx(1.0) and same["action_max_abs_err"] == 0.0
    r = action_similarity([np.array([[1.0, 0.0]]), np.zeros(2)], [np.array([[0.0, 1.0]]), np.zeros(2)])
    assert r["action_cosine"] == pytest.approx(0.5) and r["action_max_abs_err"] == 1.0  # orthogonal, then equal zeros
