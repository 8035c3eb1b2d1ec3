"""benchmarks/attention_forms.py: the plain-op decode attention it times is GroupQueryAttention's, output for output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_forms  # noqa: E402


@pytest.mark.parametrize("past", [1, 37])
def test_the_two_forms_agree_and_both_are_timed(past):
    # measure() raises where the grouped-MatMul form and GroupQueryAttention (in place) disagree beyond 1e-5.
    err, rows = attention_forms.measure(past, layers=2, repeats=2, steps=2, heads=4, kv_heads=2, head_dim=16)
    assert err < 1e-5
    assert len(rows) == 2 and all(g > 0 and m > 0 for g, m in rows)


def test_a_wrong_form_is_caught(monkeypatch):
    # The check is live: scaling the plain form's softmax input changes its output, and measure() refuses it.
    build = attention_forms.build

    def off_scale(form, *a):
        model, out = build(form, *a)
        if form == "matmul":
            for init in model.graph.initializer:
                if init.name == "scale":
                    init.float_data[0] *= 2
        return model, out

    monkeypatch.setattr(attention_forms, "build", off_scale)
    with pytest.raises(SystemExit, match="disagree"):
        attention_forms.measure(9, layers=1, repeats=1, steps=1, heads=4, kv_heads=2, head_dim=16)
