"""The safety gates of export and the runtime, each held by a default-suite test that fails when
the gate is switched off: export refuses graphs that fail parity, parity looks at the logits (not
only at greedy tokens), `--min-agreement` refuses a quantized bundle, and the ONNX Runtime backend
(what serve, eval and bench load) verifies a bundle's hashes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_samples
from edge_vla.data.observations import sample_to_obs
from edge_vla.errors import EdgeVLAError


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def fp32_bundle(tiny_fp32_bundle):
    return tiny_fp32_bundle


class Shifted:
    """A backend whose every logit is `shift` higher than its inner one: the greedy token never
    changes, only the logits drift (what a subtly broken graph looks like)."""

    def __init__(self, inner, shift: float):
        self.inner, self.shift = inner, shift

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, prefix, ids, **kw):
        h, lg, c = self.inner.prefill(prefix, ids, **kw)
        return h, lg + self.shift, c

    def step(self, ids, cache, **kw):
        h, lg, c = self.inner.step(ids, cache, **kw)
        return h, lg + self.shift, c


@pytest.fixture(scope="module")
def observations():
    return [sample_to_obs(s) for s in make_samples(2)]


def test_parity_fails_on_a_logit_drift_that_flips_no_token(tiny_vla, observations):
    """Gate: parity's logit-difference threshold (greedy-token agreement alone would pass this)."""
    from edge_vla.export.accuracy import parity
    from edge_vla.runtime.torch_backend import TorchBackend

    ref = TorchBackend(tiny_vla)
    ok = parity(ref, Shifted(ref, 1e-5), observations, n_tokens=3)
    assert ok["passed"] and ok["token_agreement"] == 1.0
    drift = parity(ref, Shifted(ref, 0.5), observations, n_tokens=3)
    assert drift["token_agreement"] == 1.0 and drift["max_logit_diff"] == pytest.approx(0.5, abs=1e-4)
    assert not drift["passed"]


def test_export_refuses_graphs_whose_logits_drift(tiny_vla, observations):
    """Gate: export's refusal on failed parity, on the same logits-only drift."""
    from edge_vla.export.steps import check_parity
    from edge_vla.runtime.torch_backend import TorchBackend

    lines = []
    assert check_parity(tiny_vla, Shifted(TorchBackend(tiny_vla), 1e-5), observations, 1e-3, lines.append)["passed"]
    with pytest.raises(EdgeVLAError, match=r"disagree with PyTorch \(max logit diff 5\.00e-01, token agreement "
                                           r"100\.0%\); no bundle written"):
        check_parity(tiny_vla, Shifted(TorchBackend(tiny_vla), 0.5), observations, 1e-3, lines.append)


def test_export_writes_nothing_when_parity_fails(ckpt, tmp_path, observations):
    """End to end: real graphs, a threshold nothing meets; the greedy tokens all agree."""
    from edge_vla.export import export_bundle

    out = tmp_path / "never"
    lines = []
    with pytest.raises(EdgeVLAError, match=r"disagree with PyTorch .*token agreement 100\.0%\); no bundle written"):
        export_bundle(ckpt, out, precision="fp32", parity_samples=observations[:1], parity_atol=-1.0,
                      report=lines.append)
    assert any("parity vs PyTorch" in x for x in lines)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_export_min_agreement_refuses_the_bundle(ckpt, tmp_path):
    """Gate: `edge-vla export --min-agreement` (no agreement reaches 101%)."""
    from edge_vla.cli import main

    out = tmp_path / "b8"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--int8", "--min-agreement", "1.01", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "action-token agreement" in res.output and "is below the required 101.00%" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_onnxruntime_backend_verifies_bundle_hashes(fp32_bundle, tmp_path, observations):
    """Gate: serve, eval and bench load bundles through the ONNX Runtime backend, which must
    refuse a file whose sha256 changed, even when the change still loads and runs."""
    import onnx
    from onnx import numpy_helper

    from edge_vla.runtime.ort_backend import OrtBackend
    from edge_vla.runtime.policy import load_policy

    b = tmp_path / "tampered"
    shutil.copytree(fp32_bundle, b)
    model = onnx.load(str(b / "action_head.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0  # still a valid graph: unverified, it would load and decode
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(b / "action_head.onnx"))
    with pytest.raises(EdgeVLAError, match=r"action_head\.onnx .*changed"):
        load_policy(b)
    with pytest.raises(EdgeVLAError, match=r"action_head\.onnx .*changed"):
        OrtBackend.load(b)
    assert load_policy(fp32_bundle).act(observations[0]).action.shape == (7,)
