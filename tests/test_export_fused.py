"""The fused ONNX Runtime decoder (edge_vla.export.fused_decoder) against the PyTorch decoder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edge_vla.export.fused_decoder import build_fused_decoder, fused_decoder_unsupported


@pytest.fixture(scope="module")
def perturbed_vla():
    """A tiny VLA whose q/k/v biases and norm weights are not their init values (zeros/ones would hide
    a bias or norm weight wired to the wrong place)."""
    from edge_vla.model.vla import VLA
    from edge_vla.tokens.action import ActionStats

    torch.manual_seed(0)
    stats = ActionStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (64, 7)))
    vla = VLA.from_preset("tiny", [], texts=["pick up the bowl"], action_stats=stats).float().eval()
    with torch.no_grad():
        for name, p in vla.lm.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return vla


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_fused_decoder_matches_pytorch_through_prefill_decode_and_forced_tokens(perturbed_vla):
    """Prefill 20 tokens, decode 1, append 3 at once (the forced " ACTION:" prefix), decode 1: hidden, logits
    and the whole KV cache equal PyTorch's (the cache is interchangeable with the torch-exported graph's)."""
    import onnx

    from edge_vla.export.onnx_export import DecoderWithCache, kv_shape

    vla = perturbed_vla
    head = vla.lm.get_output_embeddings().weight.detach().numpy()
    model = build_fused_decoder(vla.lm, head)
    onnx.checker.check_model(model)
    sess, ref = _session(model), DecoderWithCache(vla).eval()
    n_layers, n_kv, hd = kv_shape(vla.lm.config)
    past = [np.zeros((1, n_kv, 0, hd), np.float32)] * (2 * n_layers)
    rng = np.random.default_rng(1)
    for t in (20, 1, 3, 1):
        emb = rng.standard_normal((1, t, vla.lm.config.hidden_size)).astype(np.float32)
        feeds = {"inputs_embeds": emb, "past_len": np.array([past[0].shape[2]], np.int64),
                 **{f"past_{kind}_{i}": past[2 * i + j] for i in range(n_layers) for j, kind in enumerate(("key", "value"))}}
        got = sess.run(None, feeds)
        with torch.no_grad():
            want = [x.numpy() for x in ref(torch.from_numpy(emb), tuple(torch.from_numpy(p) for p in past))]
        assert [g.shape for g in got] == [w.shape for w in want]
        for name, g, w in zip(["hidden", "logits"] + ["kv"] * (2 * n_layers), got, want):
            np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4, err_msg=f"{name} after {t} tokens")
        past = got[2:]
    assert past[0].shape[2] == 25


def test_fused_decoder_quantizes_every_weight_matmul(perturbed_vla, tmp_path):
    """ORT's quantizers need typed inputs: the com.microsoft outputs are declared, so int8/int4 convert all 4
    weight MatMuls per layer (QKV and gate/up fused) and the graph still runs."""
    import onnx

    from edge_vla.export.quantize import quantize_graph

    vla = perturbed_vla
    model = build_fused_decoder(vla.lm, vla.lm.get_output_embeddings().weight.detach().numpy())
    onnx.save(model, tmp_path / "fp32.onnx")
    n_layers = vla.lm.config.num_hidden_layers
    for precision, bits in (("int8", 8), ("int4", 4)):
        quantize_graph(tmp_path / "fp32.onnx", tmp_path / f"{precision}.onnx", precision)
        q = onnx.load(str(tmp_path / f"{precision}.onnx"))
        nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 4 * n_layers + 1  # + the LM head
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
        sess = _session(q)
        feeds = {i.name: np.zeros((1, 2, 0, 32) if i.name.startswith("past_") else (1, 3, 128), np.float32)
                 for i in sess.get_inputs() if i.name != "past_len"}
        feeds["past_len"] = np.zeros(1, np.int64)
        hidden, logits = sess.run(None, feeds)[:2]
        assert np.isfinite(logits).all() and hidden.shape == (1, 128)


def test_unsupported_architectures_say_why():
    gpt2 = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    assert "gpt2" in fused_decoder_unsupported(gpt2)
    scaled = SimpleNamespace(config=SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "linear"}))
    assert "rope" in fused_decoder_unsupported(scaled)
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(heads):
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=heads, num_key_value_heads=heads))

    assert "head size 24" in fused_decoder_unsupported(llama(2))
    assert fused_decoder_unsupported(llama(3)) is None  # head size 16


def test_export_graphs_picks_the_form_and_records_it(perturbed_vla, tmp_path):
    """fused_decoder=True writes the fused graph; an architecture it cannot take falls back to the torch export and
    says why in the manifest's graph entry."""
    from edge_vla.export.onnx_export import export_graphs

    g = export_graphs(perturbed_vla, tmp_path / "fused", fused_decoder=True)
    assert g["decoder"]["form"] == "onnxruntime-fused" and "form_note" not in g["decoder"]
    assert g["decoder"]["inputs"][0] == "inputs_embeds" and g["decoder"]["outputs"][0] == "hidden"
    assert g["lm_head"]["outputs"] == ["logits"]
