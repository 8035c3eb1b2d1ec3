"""The fused action head inside the project's exported decoder graph (edge_vla.export), in ONNX Runtime.

A direct-mode decode loop on the tiny VLA's real decoder.onnx: the appended head picks exactly
the token the full head picks when restricted to the action block, its values equal
ActionTokenizer.decode, and with the full logits dropped the graph no longer holds the LM head.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_samples


@pytest.fixture(scope="module")
def exported(tiny_vla, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from edge_vla.export.onnx_export import export_full_decoder, kv_shape

    out = tmp_path_factory.mktemp("kernels_export") / "decoder_with_head.onnx"
    inputs, outputs = export_full_decoder(tiny_vla, out)  # the unsplit decoder (bundles ship it split)
    n_layers, n_kv, hd = kv_shape(tiny_vla.lm.config)
    return out, {"inputs": inputs, "outputs": outputs, "n_kv_heads": n_kv, "head_dim": hd,
                 "hidden_size": tiny_vla.lm.config.hidden_size}


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_action_head_in_the_exported_decoder_matches_the_full_head(tiny_vla, exported):
    import onnx
    import torch

    from edge_vla.kernels import action_dims, action_head_rows, action_value_table
    from edge_vla.kernels.onnx_graph import append_action_head
    from edge_vla.tokens.sequence import action_prefix_ids

    path, info = exported
    vla = tiny_vla.eval()
    tok = vla.processor.tokenizer
    lo, n_bins, d = tok.first_action_id, tok.n_bins, vla.config.action_dim
    w, _ = action_head_rows(vla.lm.get_output_embeddings().weight.detach().numpy(), lo, n_bins)
    values, low, high = action_value_table(vla.action_tokenizer)
    decoder = onnx.load(str(path))
    both = _session(append_action_head(decoder, "hidden", w, values, low, high))
    direct_model = append_action_head(decoder, "hidden", w, values, low, high, drop_outputs=("logits",))
    head_t_size = w.shape[1] * tok.vocab_size
    assert max(int(np.prod(i.dims)) for i in direct_model.graph.initializer) < head_t_size  # LM head gone
    direct = _session(direct_model)
    assert "logits" not in [o.name for o in direct.get_outputs()]

    s = make_samples(1, seed=11)[0]
    pv, ids, st = vla.model_inputs(s.images, s.instruction, s.state, action_prefix_ids(tok))
    embed = vla.lm.get_input_embeddings().weight.detach().numpy()
    with torch.no_grad():
        first = torch.cat([vla.encode_prefix(pv, st), vla.lm.get_input_embeddings()(ids)], 1).numpy()
    past_names = info["inputs"][1:]
    present_names = [n for n in info["outputs"] if n.startswith("present")]
    empty = np.zeros((1, info["n_kv_heads"], 0, info["head_dim"]), np.float32)

    def run(sess, embeds, past, dim):
        names = [o.name for o in sess.get_outputs()]
        feed = {"inputs_embeds": embeds, "action_dim": np.array([dim], np.int64), **dict(zip(past_names, past))}
        out = dict(zip(names, sess.run(None, feed)))
        return out, [out[n] for n in present_names]

    n_act = vla.config.n_action_tokens
    dims = action_dims(n_act, d)
    past_b, past_d = [empty] * len(past_names), [empty] * len(past_names)
    emb_b = emb_d = first
    bins_b, bins_d, acts = [], [], []
    for t in range(n_act):
        ob, past_b = run(both, emb_b, past_b, dims[t])
        od, past_d = run(direct, emb_d, past_d, dims[t])
        assert int(ob["action_bins"][0]) == int(np.argmax(ob["logits"][0, lo:lo + n_bins]))
        bins_b.append(int(ob["action_bins"][0]))
        bins_d.append(int(od["action_bins"][0]))
        acts.append(float(od["actions"][0]))
        emb_b = embed[lo + bins_b[-1]][None, None]
        emb_d = embed[lo + bins_d[-1]][None, None]
    assert bins_d == bins_b
    np.testing.assert_allclose(acts, vla.action_tokenizer.decode(np.array(bins_d) + lo).reshape(-1),
                               rtol=1e-5, atol=1e-6)


def test_split_lm_head_on_the_exported_decoder(tiny_vla, exported):
    """body + head reproduce the exported decoder's hidden state and logits; the body holds no
    vocabulary-sized weight, so direct mode (body + fused action head) never reads the LM head."""
    import onnx

    from edge_vla.kernels.onnx_graph import split_lm_head

    path, info = exported
    decoder = onnx.load(str(path))
    head_w = tiny_vla.lm.get_output_embeddings().weight.detach().numpy()
    body, head = split_lm_head(decoder, head_w)
    vocab_sized = head_w.size
    assert max(int(np.prod(i.dims)) for i in body.graph.initializer) < vocab_sized
    rng = np.random.default_rng(0)
    feed = {"inputs_embeds": rng.normal(size=(2, 5, info["hidden_size"])).astype(np.float32)}
    for n in info["inputs"][1:]:
        feed[n] = rng.normal(size=(2, info["n_kv_heads"], 3, info["head_dim"])).astype(np.float32)
    want = dict(zip(info["outputs"], _session(decoder).run(None, feed)))
    got = dict(zip([o.name for o in body.graph.output], _session(body).run(None, feed)))
    np.testing.assert_allclose(got["hidden"], want["hidden"], rtol=1e-5, atol=1e-5)
    (logits,) = _session(head).run(None, {"hidden": got["hidden"]})
    np.testing.assert_allclose(logits, want["logits"], rtol=1e-4, atol=1e-4)
