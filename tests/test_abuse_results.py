"""Results files checked below the top level: hand-picked damage, then hypothesis mutating real
files at random depths. A file is either refused with one line naming the field, or the whole
report renders from it; nothing in between (a traceback, a string counted as a success)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_vla.errors import EdgeVLAError
from edge_vla.eval.report import add_ratios, collect, render_html, render_markdown
from edge_vla.eval.results import load_results

FIX = Path(__file__).parent / "fixtures" / "results"
DOCS = {f.name: json.loads(f.read_text()) for f in sorted(FIX.glob("*.json"))}


def write(tmp_path, doc, name="r.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def edited(name, edit):
    doc = copy.deepcopy(DOCS[name])
    edit(doc)
    return doc


@pytest.mark.parametrize("name,edit,field", [
    ("ecot_full.json", lambda d: d["records"].__setitem__(0, "notadict"), "records.0"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("success", "false"), "records.0.success"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("success", 1), "records.0.success"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("latency_ms", "12"), "records.0.latency_ms"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("latency_ms", [1.0, "x"]), "records.0.latency_ms.1"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("steps", -3), "records.0.steps"),
    ("ecot_full.json", lambda d: d["records"][0].__setitem__("tokens_generated", "many"), "records.0.tokens_generated"),
    ("ecot_full.json", lambda d: d["config"].__setitem__("variant", ["ecot"]), "config.variant"),
    ("ecot_full.json", lambda d: d["config"]["variant"].__setitem__("recipe", 7), "config.variant.recipe"),
    ("ecot_full.json", lambda d: d["config"].__setitem__("policy", {"path": "x"}), "config.policy"),
    ("lite_bench.json", lambda d: d["records"][0].__setitem__("latency_ms", [60.0]), "records.0.latency_ms"),
    ("lite_bench.json", lambda d: d["summary"].__setitem__("latency_p50_ms", "62"), "summary.latency_p50_ms"),
    ("lite_bench.json", lambda d: d["summary"].__setitem__("projected_hz", {"orin": "fast"}),
     "summary.projected_hz.orin"),
    ("lite_bench.json", lambda d: d["summary"].__setitem__("agreement_vs_fp32", 0.9), "summary.agreement_vs_fp32"),
    ("vla_int4.json", lambda d: d["config"]["variant"].__setitem__("bundle_bytes", "94 MB"),
     "config.variant.bundle_bytes"),
    ("vla_int4.json", lambda d: d.__setitem__("created", 2024), "created"),
])
def test_damaged_fields_are_refused_in_one_line_naming_them(tmp_path, name, edit, field):
    p = write(tmp_path, edited(name, edit))
    with pytest.raises(EdgeVLAError) as e:
        load_results(p)
    msg = str(e.value)
    assert f"`{field}`" in msg and str(p) in msg and "\n" not in msg, msg
    # the report command says the same line and exits 1, no traceback
    res = CliRunner().invoke(_main(), ["report", str(p), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "does not match the results schema" in res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)


def _main():
    from edge_vla.cli import main

    return main


def test_a_string_false_is_not_a_success(tmp_path):
    """Item: `"success": "false"` was counted as a success (1/1 = 100%)."""
    doc = edited("ecot_full.json", lambda d: d.__setitem__("records", [{**d["records"][0], "success": "false"}]))
    with pytest.raises(EdgeVLAError, match=r"`records.0.success`: input should be a valid boolean, got 'false'"):
        collect([write(tmp_path, doc)])


def test_report_on_a_directory_without_results_is_an_error(tmp_path):
    empty = tmp_path / "runs"
    empty.mkdir()
    (empty / "notes.txt").write_text("no results here")
    res = CliRunner().invoke(_main(), ["report", str(empty), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "holds no results files" in lines[0] and str(empty) in lines[0]
    assert not (tmp_path / "out").exists()


# --- fuzzing: real files, mutated at random depths ----------------------------------------------
JSON_LEAF = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
             | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=8))
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                 max_size=3),
                    max_leaves=6)


def _paths(x, prefix=()):
    """Every (container, key) in `x`: where a mutation may land."""
    out = []
    if isinstance(x, dict):
        for k, v in x.items():
            out.append((prefix + (k,)))
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(x, list):
        for i, v in enumerate(x[:3]):
            out.append((prefix + (i,)))
            out.extend(_paths(v, prefix + (i,)))
    return out


@st.composite
def mutated_docs(draw):
    doc = copy.deepcopy(DOCS[draw(st.sampled_from(sorted(DOCS)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p[0] not in ("format", "schema_version", "environment")]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(("replace", "replace", "delete")))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return doc


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=mutated_docs())
def test_mutated_results_files_are_refused_or_fully_reported(tmp_path, doc):
    p = write(tmp_path, doc)
    try:
        loaded = load_results(p)
    except EdgeVLAError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    for r in loaded["records"]:
        assert isinstance(r, dict)
        if loaded["kind"] != "bench":
            assert r.get("success") in (True, False, None)
    variants = collect([p])
    base = add_ratios(variants)
    md = render_markdown(variants, base, has_plot=False)
    html = render_html(variants, base, None)
    assert md.startswith("# edge-vla evaluation report") and "<table>" in html
    for v in variants:
        rate = v.row["success_rate"]
        assert rate is None or 0.0 <= rate <= 1.0
