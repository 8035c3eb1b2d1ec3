"""Latency bench of checkpoints and bundles (`edge-vla bench A B ...`).

Each artefact runs in a fresh Python process with one intra-op thread (docs/facts.md: on a shared
2-core machine that is the only way timings compare), all in one run, so the ratios against
the first artefact are measured under the same conditions. Per artefact: latency median/p95
per component (vision, prefill, per decoded token, action decode, total) and per action,
actions/s, peak memory, model bytes, and the fraction of this machine's memory-bandwidth
roofline its decoder reaches (decode is bandwidth-bound at batch 1: a decode step reads every
decoder weight once, so time/token >= decoder bytes / bandwidth).

The decode step is split into body (the decoder graph/step) and head (the head evaluation that
picks the token: the full LM head for free tokens, the fused restricted action head for action
tokens in a bundle; torch computes its head inside the step, so its head column is ~0).
`compare_head=True` (`edge-vla bench --compare-head`) also runs, in the same worker process and
interleaved call by call, the direct-mode decode of each bundle with the full LM head
(OrtBackend head="full") against the restricted head, and reports the ratio per decode step.

Results: one results file per artefact (edge_vla.eval.results, kind "bench"), the side-by-side
comparison in each summary, and the table printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_vla.artifacts import open_artifact
from edge_vla.errors import EdgeVLAError
from edge_vla.runtime.policy import MODES

N_BENCH_OBS = 4  # observations cycled through the timed calls
COMPONENTS = ("vision", "prefill", "decode_token", "decode_body", "decode_head", "action_decode", "total")


# --- worker (runs inside a fresh process) -------------------------------------------------------
def _decoder_bytes(policy, path: Path) -> int:
    """Bytes a decode step reads: the decoder body + the head it runs (bundle: the restricted action
    head in direct mode, the full lm_head when reasoning or with head="full"), or the LM decoder +
    head weights (torch)."""
    be = policy.backend
    if getattr(be, "bundle", None) is not None:
        restricted = policy.mode == "direct" and getattr(be, "has_fused_action_head", False)
        head = "action_head" if restricted else "lm_head"
        return sum(be.bundle.graph_path(r).stat().st_size for r in ("decoder", head))
    if hasattr(be, "vla"):
        lm = be.vla.lm
        params = {id(p): p for m in (lm.get_decoder(), lm.get_output_embeddings()) for p in m.parameters()}
        emb = lm.get_input_embeddings().weight
        total = sum(p.numel() * p.element_size() for k, p in params.items() if k != id(emb))
        if lm.get_output_embeddings().weight is emb:  # tied head: read once per step as the head
            total += emb.numel() * emb.element_size()
        return int(total)
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's pre-exec image)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _record(r) -> dict:
    """One call's timings as a bench record (ms)."""
    t = r.timings
    n_act = r.tokens["action"]
    free_steps = t.get("decode_tokens") or []
    body, head = t.get("body") or [], t.get("head") or []
    # Decode steps of this call, one per decoder pass after the prefill: free tokens (full mode), then
    # the action tokens after the first, or one pass for a parallel chunk (none in direct mode, where
    # the placeholders ride in the prefill: no per-token decode time, no roofline fraction).
    steps = len(body)
    decode_ms = sum(free_steps) + t["action_decode"]
    return {"vision": t["vision"], "prefill": t["prefill"], "action_decode": t["action_decode"],
            "decode_token": decode_ms / steps if steps else None,
            "decode_body": float(np.mean(body)) if body else None, "decode_head": float(np.mean(head)) if head else None,
            "total": t["total"], "latency_ms": t["total"], "tokens": r.tokens["reasoning"] + n_act,
            "reasoning_tokens": r.tokens["reasoning"], "prompt_tokens": r.tokens["prompt"], "decode_steps": steps}


def _compare_heads(p: Path, backend: str, calls: int, warmup: int, opts: dict, obs: list) -> dict:
    """Direct-mode decode of one bundle with the restricted head vs the full LM head, interleaved
    call by call in this process (same load for both)."""
    from edge_vla.runtime.policy import load_policy

    policies = {h: load_policy(p, backend=backend, mode="direct", threads=1, head=h, **opts)
                for h in ("restricted", "full")}
    recs: dict[str, list] = {h: [] for h in policies}
    for i in range(warmup + calls):
        for h, pol in policies.items():
            r = pol.act(obs[i % len(obs)])
            if i >= warmup:
                recs[h].append(_record(r))
    return {h: {"records": v, "decoder_bytes": _decoder_bytes(policies[h], p)} for h, v in recs.items()}


def run_worker(path: str, backend: str, mode: str, calls: int, warmup: int, opts: dict,
               compare_head: bool = False, data: str | None = None) -> dict:
    import time

    from edge_vla.data.observations import synthetic_observations
    from edge_vla.runtime.policy import load_policy

    p = Path(path)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    policy = load_policy(p, backend=backend, mode=mode, threads=1, **opts)
    load_s = time.perf_counter() - t0
    if data:  # real held-out observations: what a full-mode model reasons about is what it would see
        from edge_vla.data.observations import load_observations

        obs = load_observations(data, policy.processor.config, limit=N_BENCH_OBS)
    else:
        obs = synthetic_observations(policy.processor.config, n=N_BENCH_OBS, seed=1)
    for i in range(warmup):
        policy.act(obs[i % len(obs)])
    records = [_record(policy.act(obs[i % len(obs)])) for i in range(calls)]
    rss = peak_rss_mb()
    cfg = policy.processor.config
    prec, agreement = None, None
    be = policy.backend
    if getattr(be, "bundle", None) is not None:
        prec = be.bundle.manifest.get("precision")
        agreement = quantized_agreement(be.bundle.manifest, policy.mode)
    out = {"records": records, "backend": be.name, "mode": policy.mode, "load_s": load_s,
           "peak_rss_mb": rss, "load_rss_mb": rss - rss0,
           "model_bytes": open_artifact(p).size_bytes(), "decoder_bytes": _decoder_bytes(policy, p),
           "precision": prec or opts.get("quantize") or "fp32", "recipe": policy.recipe.get("name"),
           "actions_per_call": cfg.action_chunk, "agreement_vs_fp32": agreement}
    if compare_head:
        # Only a backend with a separate LM head can skip it; torch computes it inside every step.
        if "full" in getattr(type(be), "HEADS", ()):
            out["head_compare"] = _compare_heads(p, backend, calls, warmup, opts, obs)
        else:
            out["head_compare_note"] = f"the {be.name} backend has no separate LM head to compare (export a bundle)"
    return out


def quantized_agreement(manifest: dict, mode: str) -> dict | None:
    """The export's action-token agreement with fp32 in `mode` (adaptive acts like direct), or None."""
    acc = (manifest.get("accuracy") or {}).get("full" if mode == "full" else "direct")
    if not acc:
        return None
    return {"free_running": acc.get("action_token_agreement"), "teacher_forced": acc.get("action_token_agreement_tf")}


def summarize_head_compare(hc: dict) -> dict:
    """Per head: median body/head/step ms; ratios full / restricted (> 1: the restricted head is faster)."""
    out = {}
    for h, v in hc.items():
        rec = v["records"]
        body = _stats(r["decode_body"] for r in rec)["median"]
        head = _stats(r["decode_head"] for r in rec)["median"]
        out[h] = {"body_ms": body, "head_ms": head, "step_ms": body + head if body is not None and head is not None
                  else None, "action_decode_ms": _stats(r["action_decode"] for r in rec)["median"],
                  "decoder_bytes": v["decoder_bytes"]}
    r, f = out["restricted"], out["full"]
    out["speedup_decode_step"] = _ratio(f["step_ms"], r["step_ms"])
    out["speedup_head"] = _ratio(f["head_ms"], r["head_ms"])
    out["speedup_action_decode"] = _ratio(f["action_decode_ms"], r["action_decode_ms"])
    return out


# --- driver ---------------------------------------------------------------------------------------
def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"median": None, "p95": None}
    return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95))}


def summarize_artifact(w: dict, bandwidth_gbs: float) -> dict:
    rec = w["records"]
    comp = {c: _stats(r[c] for r in rec) for c in COMPONENTS}
    per_action = [r["total"] / w["actions_per_call"] for r in rec]
    med = comp["total"]["median"]
    tok_ms = comp["decode_token"]["median"]
    roof_ms = w["decoder_bytes"] / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs > 0 else None
    return {
        "components_ms": comp,
        "per_action_ms": _stats(per_action),
        "latency_p50_ms": med, "latency_p95_ms": comp["total"]["p95"],
        "actions_per_s": 1000.0 * w["actions_per_call"] / med if med else None,
        "tokens_per_action": float(np.mean([r["tokens"] for r in rec])) / w["actions_per_call"],
        "reasoning_tokens_per_call": float(np.mean([r["reasoning_tokens"] for r in rec])),
        "decode_ms_per_token": tok_ms,
        "decode_body_ms": comp["decode_body"]["median"], "decode_head_ms": comp["decode_head"]["median"],
        "peak_memory_mb": w["peak_rss_mb"], "load_memory_mb": w["load_rss_mb"],
        "bundle_bytes": w["model_bytes"], "decoder_bytes": w["decoder_bytes"],
        "roofline_ms_per_token": roof_ms,
        "roofline_fraction": roof_ms / tok_ms if roof_ms and tok_ms else None,
        "agreement_vs_fp32": w.get("agreement_vs_fp32"),
        **({"head_compare": summarize_head_compare(w["head_compare"])} if w.get("head_compare") else {}),
        **({"head_compare_note": w["head_compare_note"]} if w.get("head_compare_note") else {}),
    }


def _worker_cmd(path, backend, mode, calls, warmup, opts, compare_head=False, data=None) -> list[str]:
    spec = json.dumps({"path": str(path), "backend": backend, "mode": mode, "calls": calls, "warmup": warmup,
                       "opts": opts, "compare_head": compare_head, "data": None if data is None else str(data)})
    return [sys.executable, "-m", "edge_vla.eval.bench", spec]


def split_mode(artifact: str | Path, default: str | None = None) -> tuple[Path, str | None]:
    """`DIR@MODE` -> (DIR, MODE): one run may time the same bundle in several modes."""
    text = str(artifact)
    head, sep, tail = text.rpartition("@")
    if sep and tail in MODES and not Path(text).exists():
        return Path(head), tail
    return Path(text), default


def bench_artifacts(paths: list[str | Path], mode: str | None = None, backend: str = "auto", calls: int = 20,
                    warmup: int = 3, out_dir: str | Path | None = None, targets: tuple[str, ...] = (),
                    opts: dict | None = None, progress=None, compare_head: bool = False,
                    data: str | Path | None = None) -> dict:
    """Benchmark every artefact in a fresh 1-thread process; ratios against the first. Returns the comparison.

    An artefact `DIR@MODE` (direct, full, adaptive) runs DIR in that mode, whatever `mode` says.
    compare_head: also time each bundle's direct-mode decode with the full LM head vs the restricted
    action head (same process, interleaved); summary["head_compare"] holds the split and the ratios.
    data: a dataset whose held-out observations every artefact decodes (default: synthetic ones)."""
    from edge_vla.deploy.roofline import measure_memory_bandwidth

    if not paths:
        raise EdgeVLAError("no artefact given", "pass one or more checkpoint or bundle directories")
    if calls < 1:
        raise EdgeVLAError(f"--calls must be >= 1, got {calls}")
    specs = [split_mode(p, mode) for p in paths]
    for p, _ in specs:
        open_artifact(p)  # each must be a checkpoint or a bundle: one line if not, before any worker starts
    if data is not None and not Path(data).exists():
        raise EdgeVLAError(f"no dataset at {data}", "pass a dataset written by `edge-vla data generate`, or leave --data out")
    bandwidth = measure_memory_bandwidth()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for i, (p, p_mode) in enumerate(specs):
        if progress:
            progress(i, len(paths), str(p))
        out = subprocess.run(_worker_cmd(p, backend, p_mode, calls, warmup, opts or {}, compare_head, data),
                             capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            err = [ln for ln in (out.stderr or "").splitlines() if ln.strip()]
            raise EdgeVLAError(f"benchmarking {p} failed: {err[-1] if err else 'no output'}")
        w = json.loads(lines[-1])
        if "error" in w:
            raise EdgeVLAError(f"benchmarking {p} failed: {w['error']}")
        rows.append({"artifact": str(p), **w, "summary": summarize_artifact(w, bandwidth)})
    base = rows[0]["summary"]
    for r in rows:
        s = r["summary"]
        s["ratios_vs_first"] = {
            "speedup_per_action": _ratio(base["per_action_ms"]["median"], s["per_action_ms"]["median"]),
            "speedup_per_token": _ratio(base["decode_ms_per_token"], s["decode_ms_per_token"]),
            "size": _ratio(s["bundle_bytes"], base["bundle_bytes"]),
            "decoder_size": _ratio(s["decoder_bytes"], base["decoder_bytes"]),
        }
        if targets:
            s["projected_hz"] = _project(r, s, bandwidth, targets)
    result = {"bandwidth_gbs": bandwidth, "calls": calls, "warmup": warmup, "rows": rows}
    if out_dir is not None:
        result["files"] = _write(rows, out_dir, bandwidth, calls, warmup)
    return result


def _ratio(a, b):
    return a / b if a and b else None


def _project(row, s, bandwidth, targets) -> dict:
    """Projected calls/s on each target: the target's roofline scaled by the fraction this CPU reached,
    plus the target's assumed fixed costs, rounded to 2 significant figures (what the assumptions hold)."""
    from edge_vla.deploy.roofline import calibrate, project_latency, round_significant

    measured = {"vision_ms": s["components_ms"]["vision"]["median"], "prefill_ms": s["components_ms"]["prefill"]["median"]}
    if s["decode_ms_per_token"]:
        measured["decode_ms_per_token"] = s["decode_ms_per_token"]
    prec = row["precision"] if row["precision"] in ("fp32", "fp16", "int8", "int4") else "int8"
    mode = row["mode"] if row["mode"] in ("direct", "full") else "direct"
    if mode == "direct" and "decode_ms_per_token" in measured and not project_latency(row["artifact"], prec, mode).decode_steps:
        measured.pop("decode_ms_per_token")  # adaptive's occasional reasoning: no direct-mode roofline to set it against
    cal = calibrate(measured, bandwidth, model=row["artifact"], precision=prec, mode=mode)
    return {t: round_significant(project_latency(row["artifact"], prec, mode, t, calibration=cal).hz) for t in targets}


def _write(rows, out_dir, bandwidth, calls, warmup) -> list[str]:
    from edge_vla.eval.results import write_results

    d = Path(out_dir)
    files = []
    for r in rows:
        name = Path(r["artifact"]).name
        config = {"artifact": r["artifact"], "calls": calls, "warmup": warmup, "threads": 1,
                  "bandwidth_gbs": bandwidth, "policy": name,
                  "variant": {"recipe": r["recipe"], "mode": r["mode"], "precision": r["precision"],
                              "backend": r["backend"], "target": "cpu"}}
        recs = [{**x, "artifact": r["artifact"]} for x in r["records"]]
        f = write_results(d / f"bench-{name}-{r['mode']}.json", "bench", config, recs,
                          summary={"calls": len(recs), **r["summary"]})
        files.append(str(f))
    return files


def format_table(result: dict) -> str:
    from edge_vla.deploy.roofline import fmt_projected

    lines = [f"memory bandwidth (measured, 1 thread copy): {result['bandwidth_gbs']:.1f} GB/s;"
             f" {result['calls']} calls per artefact, 1 intra-op thread, fresh process each"]
    hdr = (f"{'artefact':28s} {'backend':11s} {'mode':8s} {'prec':6s} {'vision':>7s} {'prefill':>8s} {'ms/tok':>7s} "
           f"{'body':>6s} {'head':>6s} "
           f"{'act p50':>8s} {'p95':>8s} {'act/s':>7s} {'MB':>8s} {'peakMB':>7s} {'roof%':>6s} {'x speed':>7s} {'x size':>7s}")
    lines.append(hdr)
    for r in result["rows"]:
        s = r["summary"]
        c = s["components_ms"]
        f = lambda x, fmt="{:.2f}": fmt.format(x) if x is not None else "-"  # noqa: E731
        lines.append(
            f"{Path(r['artifact']).name[:28]:28s} {r['backend']:11s} {r['mode']:8s} {r['precision']:6s} "
            f"{f(c['vision']['median']):>7s} {f(c['prefill']['median']):>8s} {f(s['decode_ms_per_token']):>7s} "
            f"{f(s['decode_body_ms'], '{:.3f}'):>6s} {f(s['decode_head_ms'], '{:.3f}'):>6s} "
            f"{f(s['per_action_ms']['median']):>8s} {f(s['per_action_ms']['p95']):>8s} {f(s['actions_per_s'], '{:.1f}'):>7s} "
            f"{s['bundle_bytes'] / 1e6:8.2f} {s['peak_memory_mb']:7.0f} "
            f"{f(100 * s['roofline_fraction'] if s['roofline_fraction'] else None, '{:.0f}'):>6s} "
            f"{f(s['ratios_vs_first']['speedup_per_action']):>7s} {f(s['ratios_vs_first']['size'], '{:.3f}'):>7s}")
        if s.get("head_compare"):
            lines.append(format_head_compare(s["head_compare"]))
        elif s.get("head_compare_note"):
            lines.append(f"    head comparison: {s['head_compare_note']}")
        if s.get("projected_hz"):
            lines.append(f"    PROJECTED (not measured) calls/s, measured here {f(1000 / s['latency_p50_ms'] if s['latency_p50_ms'] else None, '{:.1f}')}: "
                         + ", ".join(f"{t} ~{fmt_projected(hz)}" for t, hz in s["projected_hz"].items()))
    if any(r["summary"].get("projected_hz") for r in result["rows"]):
        lines.append("projected = the target's roofline / the fraction of its own roofline this CPU reached + the target's "
                     "assumed fixed costs per graph run and kernel launch (edge_vla/deploy/targets.py), 2 significant figures")
    return "\n".join(lines)


def format_head_compare(hc: dict) -> str:
    f = lambda x, fmt="{:.3f}": fmt.format(x) if x is not None else "-"  # noqa: E731
    r, u = hc["restricted"], hc["full"]
    return (f"    direct decode step, body + head (ms): restricted head {f(r['body_ms'])} + {f(r['head_ms'])} = "
            f"{f(r['step_ms'])}; full LM head {f(u['body_ms'])} + {f(u['head_ms'])} = {f(u['step_ms'])}; "
            f"restricted is {f(hc['speedup_decode_step'], '{:.2f}')}x faster per step "
            f"(head {f(hc['speedup_head'], '{:.1f}')}x, action decode {f(hc['speedup_action_decode'], '{:.2f}')}x)")


def _main(argv) -> None:
    spec = json.loads(argv[0])
    try:
        res = run_worker(spec["path"], spec["backend"], spec["mode"], spec["calls"], spec["warmup"], spec["opts"],
                         spec.get("compare_head", False), spec.get("data"))
    except EdgeVLAError as e:
        res = {"error": str(e)}
    print(json.dumps(res))


if __name__ == "__main__":
    _main(sys.argv[1:])
