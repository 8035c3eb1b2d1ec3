import json
import math

import numpy as np
import pytest

from edge_vla.errors import EdgeVLAError
from edge_vla.eval.results import SCHEMA_VERSION, load_results, summarize, wilson_interval, write_results

ENV = {"python": "3.11"}


def test_write_and_load_round_trip(tmp_path):
    recs = [{"id": "a", "success": True, "steps": 5, "actions_executed": 8, "latency_ms": [10.0, 30.0],
             "tokens_generated": np.int64(14)},
            {"id": "b", "success": False, "steps": 7, "actions_executed": 8, "latency_ms": [20.0, float("nan")],
             "tokens_generated": 14, "extra": np.float32(0.5)}]
    p = write_results(tmp_path / "sub" / "r.json", "libero", {"policy": "x", "shape": (2, 3)}, recs, environment=ENV)
    doc = load_results(p)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "libero"
    assert doc["records"][1]["latency_ms"] == [20.0, None]  # NaN is not JSON: stored as null
    s = doc["summary"]
    assert (s["episodes"], s["successes"], s["success_rate"]) == (2, 1, 0.5)
    assert s["latency_p50_ms"] == 20.0 and s["tokens_per_action"] == pytest.approx(28 / 16)
    assert s["actions_per_s"] == pytest.approx(16 / 0.06)
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temp files left behind


def test_aborted_episodes_do_not_count():
    s = summarize("hardware", [{"success": True, "latency_ms": [1.0]}, {"success": None, "error": "lost"}])
    assert s["episodes"] == 1 and s["success_rate"] == 1.0


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28
    lo, hi = wilson_interval(45, 50)
    assert 0.78 < lo < 0.79 and 0.95 < hi < 0.97
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("content,match", [
    ("not json", "not valid JSON"),
    ('{"a": 1}', "not an edge-vla results file"),
    ('{"format": "edge-vla-results", "schema_version": 0, "kind": "libero"}', "schema version 0"),
    ('{"format": "edge-vla-results", "schema_version": 1, "kind": "what"}', "unknown kind"),
    ('{"format": "edge-vla-results", "schema_version": 1, "kind": "bench", "config": {}, "records": {}}', "records"),
])
def test_load_refuses_bad_files(tmp_path, content, match):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(EdgeVLAError, match=match):
        load_results(p)


def test_write_refuses_unknown_kind(tmp_path):
    with pytest.raises(EdgeVLAError, match="unknown results kind"):
        write_results(tmp_path / "r.json", "rollout", {}, [], environment=ENV)
    assert not (tmp_path / "r.json").exists()
