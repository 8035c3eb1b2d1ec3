"""The ONNX Runtime backend's in-place KV cache: one buffer per layer bound as both past_* and present_* of the
fused decoder (which takes the cache's length as an input) decodes exactly what feeding the cache back does,
through a prefill, parallel and single steps, and buffer growth."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bundle(tiny_fp32_bundle):
    return tiny_fp32_bundle


def test_the_fused_decoder_takes_the_cache_length(bundle):
    from edge_vla.artifacts.bundle import PAST_LEN, load_bundle

    dec = load_bundle(bundle).graphs["decoder"]
    assert dec["form"] == "onnxruntime-fused" and dec["cache_length"] == PAST_LEN
    assert PAST_LEN not in dec["inputs"]  # the past_* names stay the inputs after inputs_embeds


def test_in_place_cache_decodes_what_the_fed_back_cache_decodes(bundle, monkeypatch):
    from edge_vla.runtime import ort_backend
    from edge_vla.runtime.ort_backend import KVCache, OrtBackend

    monkeypatch.setattr(ort_backend, "KV_HEADROOM", 2)  # so that the steps below outgrow the prefill's buffers
    inplace, fed = OrtBackend.load(bundle), OrtBackend.load(bundle, in_place_kv=False)
    rng = np.random.default_rng(0)
    h = inplace.bundle.graphs["decoder"]["hidden_size"]
    prefix = rng.standard_normal((1, 5, h)).astype(np.float32)
    prompt = [3, 4, 5, 6]
    (ha, _, ca), (hb, _, cb) = inplace.prefill(prefix, prompt), fed.prefill(prefix, prompt)
    assert isinstance(ca, KVCache) and isinstance(cb, list)
    assert ca.length == 9 and ca.capacity == 11
    np.testing.assert_allclose(ha, hb, rtol=1e-5, atol=1e-5)
    first_buffers = ca.buffers
    for tokens in ([7, 8, 9], [10], [11], [12, 13], *([[14]] * 6)):
        (ha, _, ca), (hb, _, cb) = inplace.step(tokens, ca), fed.step(tokens, cb)
        np.testing.assert_allclose(ha, hb, rtol=1e-5, atol=1e-5)
        assert ca.length == cb[0].shape[2]
    assert ca.length == 22 and ca.capacity >= 22 and ca.buffers is not first_buffers  # grew (twice)
    for buf, arr in zip(ca.buffers, cb):  # the cache itself: the same keys and values where filled
        np.testing.assert_allclose(buf[:, :, :ca.length], arr, rtol=1e-5, atol=1e-5)


def test_a_cache_continues_from_where_it_was_taken(bundle):
    # Policies branch only by starting over, but an older cache handle must stay valid for one continuation:
    # a step from it writes from its own length on.
    from edge_vla.runtime.ort_backend import OrtBackend

    be = OrtBackend.load(bundle)
    prefix = np.zeros((1, 2, be.bundle.graphs["decoder"]["hidden_size"]), np.float32)
    _, _, c0 = be.prefill(prefix, [3, 4])
    h_a, _, _ = be.step([5], c0)
    be.step([9, 9, 9], c0)  # another continuation, abandoned
    h_b, _, c1 = be.step([5], c0)
    np.testing.assert_allclose(h_a, h_b, rtol=1e-6, atol=1e-6)
    assert c0.length == 4 and c1.length == 5
