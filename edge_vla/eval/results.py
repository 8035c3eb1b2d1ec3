"""The results-file format: one JSON per eval/bench run; `edge-vla report` reads only these.

    {"format": "edge-vla-results", "schema_version": 1, "kind": "libero" | "hardware" | "bench",
     "created": ISO time, "config": {...run settings, "variant": {recipe, precision, backend, target, ...}},
     "environment": edge_vla.environment.environment_report(),
     "records": [ per-episode (rollouts) or per-call (bench) dicts ],
     "summary": {...}}

Writes are atomic (a reader or a crash never sees half a file). Rollouts rewrite the file after
every finished episode, which is what makes them resumable: episodes already in the file are
skipped on the next run. A file from another schema version is refused with one clear line.

`load_results` checks the whole file against a schema (pydantic models below), not just its top
level: every field the report reads has its type (`"success": "false"` is not a success, a record
is an object), so a damaged or hand-edited file is refused with one line naming the field, never
a traceback in `edge-vla report`. Fields the report does not read are free.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text, jsonable, read_json

RESULTS_FORMAT = "edge-vla-results"
SCHEMA_VERSION = 1
KINDS = ("libero", "hardware", "bench")


def write_results(path: str | Path, kind: str, config: dict, records: list[dict], summary: dict | None = None,
                  environment: dict | None = None, created: str | None = None) -> Path:
    """Write one results file atomically. `environment` defaults to this machine's report."""
    if kind not in KINDS:
        raise EdgeVLAError(f"unknown results kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if environment is None:
        environment = environment_snapshot()
    doc = {
        "format": RESULTS_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "environment": environment,
        "records": records,
        "summary": summary if summary is not None else summarize(kind, records),
    }
    path = Path(path)
    atomic_write_text(path, json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


_ENVIRONMENT: dict | None = None


def environment_snapshot() -> dict:
    """edge_vla.environment.environment_report(), computed once per process.

    Probing the backends imports triton, whose native library segfaults when imported after
    LIBERO's (MuJoCo/robosuite/EGL) libraries are loaded in the same process. In that case the
    report is taken in a fresh interpreter instead.
    """
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        loaded = any(m in sys.modules for m in ("mujoco", "robosuite", "libero"))
        if loaded and "triton" not in sys.modules:
            code = "import json; from edge_vla.environment import environment_report as r; print(json.dumps(r()))"
            try:
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
                _ENVIRONMENT = json.loads(out.stdout.strip().splitlines()[-1])
            except (subprocess.SubprocessError, json.JSONDecodeError, IndexError):
                from edge_vla.environment import environment_report

                _ENVIRONMENT = environment_report(backends=False)
        else:
            from edge_vla.environment import environment_report

            _ENVIRONMENT = environment_report()
    return _ENVIRONMENT


# --- the schema ----------------------------------------------------------------------------------
# Strict types: JSON's true/false only for booleans, numbers only for numbers (a bool is not a
# number here, a string is never coerced). Fields the report does not read may hold anything.
Number = StrictFloat  # strict floats take JSON integers too, never true/false or "1.5"
Count = Annotated[StrictInt, Field(ge=0)]
Label = Union[StrictStr, StrictInt]  # suites, tasks and ids are names or indices


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class VariantSchema(_Open):
    name: Optional[Label] = None
    recipe: Optional[StrictStr] = None
    mode: Optional[StrictStr] = None
    precision: Optional[StrictStr] = None
    backend: Optional[StrictStr] = None
    target: Optional[StrictStr] = None
    bundle_bytes: Optional[Count] = None
    peak_memory_mb: Optional[Number] = None
    projected_hz: Optional[dict[str, Optional[Number]]] = None
    distilled: Optional[dict[str, StrictStr]] = None  # a student: {"mode", "teacher_recipe"}


class ConfigSchema(_Open):
    variant: Optional[VariantSchema] = None
    policy: Optional[StrictStr] = None
    artifact: Optional[StrictStr] = None
    mode: Optional[StrictStr] = None


class EpisodeRecord(_Open):
    """One rollout (libero) or robot episode (hardware); success None = aborted, not counted."""
    id: Optional[Label] = None
    suite: Optional[Label] = None
    task: Optional[Label] = None
    success: Optional[StrictBool] = None
    steps: Optional[Count] = None
    actions_executed: Optional[Count] = None
    latency_ms: Optional[list[Optional[Number]]] = None
    tokens_generated: Optional[Number] = None
    reasoned: Optional[list[StrictBool]] = None  # per policy call, beside latency_ms
    outcome: Optional[Literal["success", "wrong_object", "placement_failure", "grasp_failure"]] = None
    lifted: Optional[StrictStr] = None


class BenchRecord(_Open):
    """One policy call of a bench."""
    latency_ms: Optional[Number] = None
    tokens: Optional[Number] = None


class AgreementSchema(_Open):
    free_running: Optional[Number] = None
    teacher_forced: Optional[Number] = None


class SummarySchema(_Open):
    latency_p50_ms: Optional[Number] = None
    latency_p95_ms: Optional[Number] = None
    actions_per_s: Optional[Number] = None
    tokens_per_action: Optional[Number] = None
    bundle_bytes: Optional[Count] = None
    peak_memory_mb: Optional[Number] = None
    projected_hz: Optional[dict[str, Optional[Number]]] = None
    agreement_vs_fp32: Optional[AgreementSchema] = None


class ResultsSchema(_Open):
    format: Literal["edge-vla-results"]
    schema_version: Literal[1]
    kind: Literal["libero", "hardware", "bench"]
    created: Optional[StrictStr] = None
    config: ConfigSchema
    environment: dict[str, Any]
    records: list[dict[str, Any]]
    summary: SummarySchema


_RECORD_SCHEMA = {"libero": EpisodeRecord, "hardware": EpisodeRecord, "bench": BenchRecord}


def _first_error(e: ValidationError, prefix: str = "") -> str:
    err = e.errors(include_url=False)[0]
    where = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    got = repr(err.get("input"))
    got = got if len(got) <= 40 else got[:37] + "..."
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"`{where}`: {msg}, got {got}{more}"


def check_results(doc: Any, source: str = "results") -> dict:
    """`doc` checked against the results schema; a problem is one EdgeVLAError line naming the field."""
    fix = "the file is damaged or edited by hand; re-run the evaluation that wrote it"
    try:
        top = ResultsSchema.model_validate(doc)
    except ValidationError as e:
        raise EdgeVLAError(f"{source} does not match the results schema: {_first_error(e)}", fix) from None
    record = _RECORD_SCHEMA[top.kind]
    for i, r in enumerate(doc["records"]):
        try:
            record.model_validate(r)
        except ValidationError as e:
            raise EdgeVLAError(f"{source} does not match the results schema: {_first_error(e, f'records.{i}')}",
                               fix) from None
    return doc


def load_results(path: str | Path) -> dict:
    """Read and check a results file; every problem is one EdgeVLAError line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise EdgeVLAError(f"results file not found: {p}", "pass a JSON written by `edge-vla eval` or `edge-vla bench`")
    doc = read_json(p, "re-run the evaluation that wrote it")
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise EdgeVLAError(f"{p} is not an edge-vla results file (no format={RESULTS_FORMAT!r})",
                           "pass a JSON written by `edge-vla eval` or `edge-vla bench`")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EdgeVLAError(f"{p} has results schema version {version}, this edge-vla reads version {SCHEMA_VERSION}",
                           "re-run the evaluation with this version, or read it with the edge-vla that wrote it")
    if doc.get("kind") not in KINDS:
        raise EdgeVLAError(f"{p} has unknown kind {doc.get('kind')!r}", f"kind must be one of {', '.join(KINDS)}")
    for key, typ in (("config", dict), ("records", list), ("summary", dict), ("environment", dict)):
        if not isinstance(doc.get(key), typ):
            raise EdgeVLAError(f"{p} lacks a valid `{key}` ({typ.__name__})", "the file is damaged; re-run the evaluation")
    return check_results(doc, str(p))


# --- statistics shared by rollouts, the bench and the report ---------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well-behaved at 0/n and n/n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (centre - half is ~1e-17, not 0, in floating point at 0/n)
    return (0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half))


def percentile(values, q: float) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.percentile(v, q)) if v else None


def summarize(kind: str, records: list[dict]) -> dict:
    """Summary of episode records (rollouts) or call records (bench): the numbers the report shows.

    Episode records carry `success`, `steps`, `latency_ms` (one per policy call), `actions_executed`
    and `tokens` (generated per call); call records carry `latency_ms` (a number) and `tokens`.
    """
    if kind == "bench":
        lat = [r.get("latency_ms") for r in records]
        tok = [r.get("tokens") for r in records if r.get("tokens") is not None]
        p50 = percentile(lat, 50)
        return {"calls": len(records), "latency_p50_ms": p50, "latency_p95_ms": percentile(lat, 95),
                "tokens_per_call": float(np.mean(tok)) if tok else None}
    done = [r for r in records if r.get("success") is not None]
    k = sum(bool(r["success"]) for r in done)
    lo, hi = wilson_interval(k, len(done))
    lat = [float(x) for r in done for x in (r.get("latency_ms") or []) if x is not None and math.isfinite(float(x))]
    actions = sum(int(r.get("actions_executed") or 0) for r in done)
    calls = sum(len(r.get("latency_ms") or []) for r in done)
    tokens = sum(float(r.get("tokens_generated") or 0) for r in done)
    policy_s = sum(lat) / 1000.0
    return {
        "episodes": len(done),
        "successes": k,
        "success_rate": k / len(done) if done else None,
        "success_ci95": [lo, hi],
        "calls": calls,
        "latency_p50_ms": percentile(lat, 50),
        "latency_p95_ms": percentile(lat, 95),
        # Actions the policy delivers per second of its own compute (chunks count every executed action).
        "actions_per_s": actions / policy_s if policy_s > 0 else None,
        "tokens_per_action": tokens / actions if actions else None,
        "mean_steps": float(np.mean([r.get("steps") or 0 for r in done])) if done else None,
        **outcome_summary(done),
        **reasoning_summary(done),
        "per_task": per_task_summary(done),
    }


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": k, "rate": k / n if n else None, "ci95": [lo, hi]}


def outcome_summary(records: list[dict]) -> dict:
    """Why episodes failed (edge_vla.sim.lift): counts of each outcome, and the wrong-object rate
    (failed episodes in which another object was lifted and the target never was: grounding
    errors) with its Wilson interval, over the episodes that carry an outcome."""
    judged = [r for r in records if r.get("outcome")]
    counts: dict[str, int] = {}
    for r in judged:
        counts[str(r["outcome"])] = counts.get(str(r["outcome"]), 0) + 1
    wrong = counts.get("wrong_object", 0)
    return {"outcomes": counts, "outcome_episodes": len(judged),
            "wrong_object": _rate(wrong, len(judged)) if judged else None}


def reasoning_summary(records: list[dict]) -> dict:
    """How often the policy reasoned (adaptive mode decides per call), and the latency of the calls
    that reasoned and of those that did not."""
    flags, by_path = [], {"reasoned": [], "direct": []}
    for r in records:
        lat, why = r.get("latency_ms") or [], r.get("reasoned")
        if not isinstance(why, list) or len(why) != len(lat):
            continue
        flags += [bool(x) for x in why]
        for x, reasoned in zip(lat, why):
            by_path["reasoned" if reasoned else "direct"].append(x)
    if not flags:
        return {"reasoning_rate": None, "latency_by_path": None}
    return {"reasoning_rate": sum(flags) / len(flags),
            "latency_by_path": {k: {"calls": len(v), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95)}
                                for k, v in by_path.items()}}


def per_task_summary(records: list[dict]) -> dict:
    """suite/task -> successes, episodes, rate with its Wilson interval, and the outcome counts."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(f"{r.get('suite', '?')}/{r.get('task', '?')}", []).append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        k = sum(bool(r["success"]) for r in rs)
        out[key] = {"episodes": len(rs), "successes": k, **{f"success_{a}": b for a, b in _rate(k, len(rs)).items()
                                                             if a != "count"},
                    "outcomes": outcome_summary(rs)["outcomes"]}
    return out
