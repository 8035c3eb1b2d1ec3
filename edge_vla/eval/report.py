"""Trade-off reports from results files only: a Markdown and a self-contained HTML report plus a
Pareto plot (success vs latency), every variant compared with the full-CoT baseline.

A variant is what `config.variant` of a results file names (recipe, precision, backend, target,
mode...). Files of the same variant are merged: shards of one LIBERO run (episodes de-duplicated
by id), rollouts plus a latency bench of the same bundle (the bench fills in latency, projected
Hz per Jetson target, bundle size and peak memory where the rollouts lack them).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_vla.config import unknown_name_error
from edge_vla.errors import EdgeVLAError
from edge_vla.eval.results import load_results, summarize, wilson_interval
from edge_vla.io import atomic_write_bytes, atomic_write_text

BASELINE = {"recipe": "ecot", "mode": "full"}
VARIANT_FIELDS = ("recipe", "mode", "precision", "backend", "target")


@dataclass
class Variant:
    name: str
    info: dict = field(default_factory=dict)  # recipe, mode, precision, backend, target, bundle_bytes, ...
    episodes: dict = field(default_factory=dict)  # episode id -> record (rollouts)
    bench: dict = field(default_factory=dict)  # summary of a latency bench of this variant
    sources: list = field(default_factory=list)
    row: dict = field(default_factory=dict)
    baseline: bool = False  # the one full-CoT variant every ratio is against (chosen in collect)

    @property
    def is_reference(self) -> bool:
        """The scripted expert: a ceiling check of the setup, not a deployable policy (no ratios, not plotted)."""
        return str(self.info.get("mode", "")) == "expert"

    @property
    def is_full_cot(self) -> bool:
        return all(str(self.info.get(k, "")).lower() == v for k, v in BASELINE.items())

    @property
    def is_baseline(self) -> bool:
        return self.baseline


def variant_name(config: dict, path: Path) -> str:
    v = config.get("variant") or {}
    if v.get("name"):
        return str(v["name"])
    if config.get("policy"):  # the artefact's own name (a bundle or checkpoint directory)
        return Path(str(config["policy"])).name
    parts = [str(v[k]) for k in VARIANT_FIELDS if v.get(k)]
    return "/".join(parts) if parts else path.stem


def _artifact_key(config: dict) -> tuple | None:
    """(resolved checkpoint/bundle path, base decode mode): what a rollout and a bench share."""
    path = config.get("artifact") or config.get("policy")
    if not path or path == "expert" or str(path).startswith("ws"):
        return None
    mode = str((config.get("variant") or {}).get("mode") or config.get("mode") or "").split("/")[0]
    return (str(Path(path).resolve()), mode)


def collect(paths: list[str | Path], baseline: str | None = None) -> list[Variant]:
    """The variants in `paths` (results files or directories of them), the baseline marked:
    `baseline` names it, else the full-CoT variant with rollouts, first by name."""
    if not paths:
        raise EdgeVLAError("no results files given", "pass one or more JSON files written by `edge-vla eval`/`bench`")
    files: list[Path] = []
    for p in map(Path, paths):
        found = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not found:
            raise EdgeVLAError(f"{p} holds no results files (*.json)",
                               "pass the --out directory of `edge-vla eval` or `edge-vla bench`, or their JSON files")
        files.extend(found)
    docs = [(path, load_results(path)) for path in files]
    # Rollouts first, so a bench of the same artefact (same path and mode) joins that variant.
    docs.sort(key=lambda pd: pd[1]["kind"] == "bench")
    variants: dict[str, Variant] = {}
    by_artifact: dict[tuple, str] = {}
    for path, doc in docs:
        name = variant_name(doc["config"], path)
        key = _artifact_key(doc["config"])
        if doc["kind"] == "bench" and "name" not in (doc["config"].get("variant") or {}) and key in by_artifact:
            name = by_artifact[key]
        elif key is not None:
            by_artifact.setdefault(key, name)
        var = variants.setdefault(name, Variant(name))
        var.sources.append(str(path))
        for k, v in (doc["config"].get("variant") or {}).items():
            var.info.setdefault(k, v)
        if doc["kind"] == "bench":
            for k, v in doc["summary"].items():
                var.bench.setdefault(k, v)
            continue
        for i, r in enumerate(doc["records"]):
            var.episodes.setdefault(str(r.get("id", f"{path}:{i}")), r)
    # One baseline: the one named, else the full-CoT variant with rollouts (success to compare),
    # else the first full-CoT one by name.
    if baseline is not None:
        if baseline not in variants:
            raise unknown_name_error("baseline variant", baseline, sorted(variants))
        variants[baseline].baseline = True
    else:
        full_cot = sorted((v for v in variants.values() if v.is_full_cot), key=lambda v: (not v.episodes, v.name))
        if full_cot:
            full_cot[0].baseline = True
    for var in variants.values():
        var.row = _row(var)
    return sorted(variants.values(), key=lambda v: (not v.is_baseline, v.name))


def _row(var: Variant) -> dict:
    s = summarize("libero", list(var.episodes.values())) if var.episodes else {}
    b, info = var.bench, var.info
    row = {
        "variant": var.name, **{k: info.get(k) for k in VARIANT_FIELDS},
        "episodes": s.get("episodes", 0), "successes": s.get("successes", 0), "success_rate": s.get("success_rate"),
        "success_ci95": s.get("success_ci95"),
        # Rollouts measure latency in the loop; a bench of the same variant is used where they lack it.
        "latency_p50_ms": s.get("latency_p50_ms") or b.get("latency_p50_ms"),
        "latency_p95_ms": s.get("latency_p95_ms") or b.get("latency_p95_ms"),
        "actions_per_s": s.get("actions_per_s") or b.get("actions_per_s"),
        "tokens_per_action": s.get("tokens_per_action") or b.get("tokens_per_action"),
        "bundle_bytes": info.get("bundle_bytes") or b.get("bundle_bytes"),
        "agreement_vs_fp32": b.get("agreement_vs_fp32"),
        "peak_memory_mb": info.get("peak_memory_mb") or b.get("peak_memory_mb"),
        "projected_hz": dict(info.get("projected_hz") or b.get("projected_hz") or {}),
        "baseline": var.is_baseline,
        "outcomes": s.get("outcomes") or {}, "outcome_episodes": s.get("outcome_episodes", 0),
        "wrong_object": s.get("wrong_object"), "reasoning_rate": s.get("reasoning_rate"),
        "latency_by_path": s.get("latency_by_path"),
        "perturbation": info.get("perturbation"),
    }
    if row["actions_per_s"] is None and row["latency_p50_ms"]:
        row["actions_per_s"] = 1000.0 / row["latency_p50_ms"]
    return row


def add_ratios(variants: list[Variant]) -> Variant | None:
    """Each row's ratio against the full-CoT baseline: success ratio and speed-up (baseline p50 / p50)."""
    base = next((v for v in variants if v.is_baseline), None)
    for v in variants:
        r = v.row
        r["success_vs_baseline"] = r["speedup_vs_baseline"] = None
        if base is None or v.is_reference:
            continue
        b = base.row
        if r["success_rate"] is not None and b["success_rate"]:
            r["success_vs_baseline"] = r["success_rate"] / b["success_rate"]
        if r["latency_p50_ms"] and b["latency_p50_ms"]:
            r["speedup_vs_baseline"] = b["latency_p50_ms"] / r["latency_p50_ms"]
    return base


def _wrong_object(r) -> str:
    w = r.get("wrong_object")
    if not w or w.get("rate") is None:
        return "–"
    lo, hi = w["ci95"]
    return f"{100 * w['rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


FAILURE_NOTE = ("From simulator state (edge_vla/sim/lift.py): an object is lifted once it rises 5 cm above its rest "
                "height while touching the gripper. **wrong object**: the task failed, another object was lifted and "
                "the target never was (grounding); **placement failure**: the target was lifted, the task not done; "
                "**grasp failure**: nothing was lifted, or only the destination (the basket the instruction names).")
REASONING_NOTE = ("Per policy call: whether it reasoned (full mode always, direct never, adaptive when the direct "
                  "action tokens are uncertain) and the latency of the calls on each path.")
FAILURE_HEADER = ["variant", "recipe", "mode", "episodes", "success", "wrong object", "placement failure",
                  "grasp failure", "wrong-object rate (95% CI)"]


def failure_rows(variants: list[Variant]) -> list[list[str]]:
    """Why each variant's episodes failed (edge_vla.sim.lift), for variants whose records say."""
    rows = []
    for v in variants:
        r = v.row
        if not r.get("outcome_episodes"):
            continue
        o = r["outcomes"]
        rows.append([v.name, str(r["recipe"] or "–"), str(r["mode"] or "–"), str(r["outcome_episodes"]),
                     *[str(o.get(k, 0)) for k in ("success", "wrong_object", "placement_failure", "grasp_failure")],
                     _wrong_object(r)])
    return rows


REASONING_HEADER = ["variant", "mode", "calls", "reasons (% of calls)", "p50 ms reasoning", "p50 ms direct",
                    "p50 ms all"]


def reasoning_rows(variants: list[Variant]) -> list[list[str]]:
    """How often each variant reasoned and what a call costs either way (adaptive decides per call)."""
    rows = []
    for v in variants:
        r, paths = v.row, v.row.get("latency_by_path")
        if not paths or r.get("reasoning_rate") is None:
            continue
        calls = sum(p["calls"] for p in paths.values())
        rows.append([v.name, str(r["mode"] or "–"), str(calls), _pct(r["reasoning_rate"]),
                     _f(paths["reasoned"]["p50_ms"]), _f(paths["direct"]["p50_ms"]), _f(r["latency_p50_ms"])])
    return rows


STUDENT_NOTE = ("Each distilled student (`edge-vla distill`) beside its teacher: the variant of the teacher's "
                "recipe that is the baseline, else the one in the student's mode. `reasoning`: a direct-mode student "
                "of the teacher's post-reasoning actions; `size`: a smaller model of the teacher's outputs.")
STUDENT_HEADER = ["student", "distilled from", "teacher variant", "success student", "success teacher",
                  "p50 ms student", "p50 ms teacher", "speed-up", "bundle student", "bundle teacher"]


def teacher_of(student: Variant, variants: list[Variant]) -> Variant | None:
    """The variant a student is compared with: its teacher's recipe, the baseline first, then the
    student's own mode, then by name (perturbed runs and other students never)."""
    recipe = (student.info.get("distilled") or {}).get("teacher_recipe")
    cands = [v for v in variants if v is not student and v.info.get("recipe") == recipe
             and not v.info.get("distilled") and not v.info.get("perturbation")]
    cands.sort(key=lambda v: (not v.is_baseline, v.info.get("mode") != student.info.get("mode"), v.name))
    return cands[0] if cands else None


def student_rows(variants: list[Variant]) -> list[list[str]]:
    rows = []
    for v in variants:
        d = v.info.get("distilled")
        if not d:
            continue
        t = teacher_of(v, variants)
        tr = t.row if t else {}
        speedup = (tr["latency_p50_ms"] / v.row["latency_p50_ms"]
                   if tr.get("latency_p50_ms") and v.row.get("latency_p50_ms") else None)
        rows.append([v.name, f"{d.get('teacher_recipe', '?')} ({d.get('mode', '?')})", t.name if t else "– (not in these results)",
                     _success(v.row), _success(tr) if t else "–", _f(v.row["latency_p50_ms"]),
                     _f(tr.get("latency_p50_ms")), _f(speedup, "{:.1f}×"), _size(v.row["bundle_bytes"]),
                     _size(tr.get("bundle_bytes"))])
    return rows


def per_task(variants: list[Variant]) -> tuple[list[str], dict]:
    """(task labels, {variant: {task: (successes, n)}}) for the per-task table."""
    tasks: set[str] = set()
    table: dict[str, dict] = {}
    for v in variants:
        cells: dict[str, list[int]] = {}
        for r in v.episodes.values():
            if r.get("success") is None:
                continue
            key = f"{r.get('suite', '?')}/{r.get('task', '?')}"
            c = cells.setdefault(key, [0, 0])
            c[0] += bool(r["success"])
            c[1] += 1
        tasks.update(cells)
        table[v.name] = cells
    return sorted(tasks), table


# --- formatting -----------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}", none="–"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _success(r) -> str:
    if r["success_rate"] is None:
        return "–"
    lo, hi = r["success_ci95"]
    return f"{100 * r['success_rate']:.1f}% [{100 * lo:.0f}–{100 * hi:.0f}] ({r['successes']}/{r['episodes']})"


def _size(b) -> str:
    return "–" if not b else (f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB")


def _agreement(a) -> str:
    """Action-token agreement with the fp32 bundle: free-running / teacher-forced."""
    if not a or a.get("free_running") is None:
        return "–"
    tf = a.get("teacher_forced")
    return f"{100 * a['free_running']:.1f}%" + (f" / {100 * tf:.1f}%" if tf is not None else "")


def _projected(x) -> str:
    from edge_vla.deploy.roofline import fmt_projected

    return "–" if x is None else "~" + fmt_projected(x)


def table_rows(variants: list[Variant]) -> tuple[list[str], list[list[str]], list[str]]:
    targets = sorted({t for v in variants for t in v.row["projected_hz"]})
    header = ["variant", "recipe", "mode", "precision", "backend", "target", "success (95% CI)", "vs baseline",
              "wrong object (95% CI)", "reasons", "p50 ms", "p95 ms", "speed-up", "actions/s", "tokens/action", "bundle", "vs fp32 tokens", "peak MiB",
              *[f"projected Hz @ {t}" for t in targets]]
    rows = []
    for v in variants:
        r = v.row
        rows.append([
            v.name + (" (baseline)" if r["baseline"] else ""), *[str(r[k] or "–") for k in VARIANT_FIELDS],
            _success(r), _f(r["success_vs_baseline"], "{:.2f}×"), _wrong_object(r), _pct(r["reasoning_rate"]),
            _f(r["latency_p50_ms"]), _f(r["latency_p95_ms"]),
            _f(r["speedup_vs_baseline"], "{:.1f}×"), _f(r["actions_per_s"]), _f(r["tokens_per_action"]),
            _size(r["bundle_bytes"]), _agreement(r["agreement_vs_fp32"]), _f(r["peak_memory_mb"], "{:.0f}"),
            # a projection to 2 significant figures: its assumed board efficiency and fixed costs hold no more
            *[_projected(r["projected_hz"].get(t)) for t in targets],
        ])
    return header, rows, targets


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower latency AND higher success), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# The plot's axes in points (7 x 4.5 in at 72 pt/in, less the margins) and an 8-pt label's size, for
# placing the variants' names where they do not cover each other.
PLOT_W_PT, PLOT_H_PT, CHAR_W_PT, LABEL_H_PT = 430.0, 260.0, 4.6, 10.0
LABEL_OFFSETS = ((6, 6), (6, -14), (6, 18), (6, -26), (6, 30), (6, -38), (6, 42))


def label_offsets(points: list[tuple[float, float]], labels: list[str], x_range: tuple[float, float]) -> list[tuple[int, int]]:
    """Offsets (points) of each label from its (latency ms, success %) point: the first of LABEL_OFFSETS
    whose box overlaps no label placed before it (the last one when every one does)."""
    lo, hi = math.log(x_range[0]), math.log(x_range[1])
    boxes: list[tuple[float, float, float, float]] = []
    out = []
    for (lat, pct), text in zip(points, labels):
        px = (math.log(lat) - lo) / max(hi - lo, 1e-9) * PLOT_W_PT
        py = (pct + 5) / 110 * PLOT_H_PT
        w = CHAR_W_PT * len(text)
        for dx, dy in LABEL_OFFSETS:
            box = (px + dx, py + dy, px + dx + w, py + dy + LABEL_H_PT)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        out.append((dx, dy))
    return out


def pareto_png(variants: list[Variant]) -> bytes | None:
    pts = [(v.row["latency_p50_ms"], v.row["success_rate"], v) for v in variants
           if v.row["latency_p50_ms"] and v.row["success_rate"] is not None and not v.is_reference]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    pts = sorted(pts, key=lambda p: p[0])
    lats = [p[0] for p in pts]
    # Fixed limits (a margin on each side of the log axis) so the labels' places are known before drawing.
    x_range = (min(lats) / 1.6, max(lats) * 2.5)
    names = [v.name + (" (full CoT)" if v.is_baseline else "") for _, _, v in pts]
    offsets = label_offsets([(lat, 100 * sr) for lat, sr, _ in pts], names, x_range)
    for (lat, sr, v), name, off in zip(pts, names, offsets):
        lo, hi = v.row["success_ci95"]
        ax.errorbar([lat], [100 * sr], yerr=[[100 * (sr - lo)], [100 * (hi - sr)]], fmt="*" if v.is_baseline else "o",
                    markersize=13 if v.is_baseline else 7, capsize=3, color="tab:red" if v.is_baseline else "tab:blue")
        ax.annotate(name, (lat, 100 * sr), textcoords="offset points", xytext=off, fontsize=8)
    front = pareto_front([(p[0], p[1]) for p in pts])
    if len(front) > 1:  # one point is no line: a legend entry for it would name nothing drawn
        ax.plot([pts[i][0] for i in front], [100 * pts[i][1] for i in front], "--", color="gray", lw=1,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)  # where it covers the fewest points: a fixed corner hid the baseline
    ax.set_xscale("log")
    ax.set_xlim(*x_range)
    # milliseconds as plain numbers (5, 20, 50), not 2x10^1
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda x, _: f"{x:g}" if round(x / 10 ** math.floor(math.log10(x))) in (2, 5) else ""))
    ax.set_xlabel("latency per policy call, p50 (ms, log scale)")
    ax.set_ylabel("success rate (%), 95% CI")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("Success vs latency")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _cell(k: int, n: int) -> str:
    if not n:
        return "–"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} [{100 * lo:.0f}–{100 * hi:.0f}%]"


def _task_rows(variants):
    """One row per task and, with several tasks, a pooled row: successes/episodes [Wilson 95%]."""
    tasks, table = per_task(variants)
    rows = []
    for t in tasks:
        rows.append([t, *[_cell(*table[v.name].get(t, (0, 0))) for v in variants]])
    if len(tasks) > 1:
        pooled = [[sum(c[i] for c in table[v.name].values()) for i in (0, 1)] for v in variants]
        rows.append(["all tasks (pooled)", *[_cell(k, n) for k, n in pooled]])
    return ["task", *[v.name for v in variants]], rows


def _notes(variants, base) -> list[str]:
    notes = []
    if base is None:
        notes.append("No full-CoT baseline (recipe `ecot`, mode `full`) among these results: ratios are left empty.")
    else:
        how = ", ".join(f"{k} `{base.info[k]}`" for k in ("recipe", "mode") if base.info.get(k))
        notes.append(f"Baseline: **{base.name}**" + (f" ({how})" if how else "") + "; ratios are against it "
                     "(success ratio; speed-up = baseline p50 / variant p50).")
    notes.append("Success intervals are Wilson 95% score intervals. Latency is per policy call, measured in the "
                 "loop that wrote each file (see each file's environment).")
    if any(v.row.get("agreement_vs_fp32") for v in variants):
        notes.append("`vs fp32 tokens`: a quantized bundle's action-token agreement with its fp32 export on held-out "
                     "samples, free-running / teacher-forced (fed the fp32 tokens, so one flipped bin cannot change "
                     "the rest of the chunk), from the export's accuracy report.")
    if any(v.row.get("projected_hz") for v in variants):
        notes.append("`projected Hz @ target`: PROJECTED, not measured: the target's roofline divided by the fraction "
                     "of its own roofline this CPU reached, plus the target's assumed fixed costs per graph run and "
                     "kernel launch (edge_vla/deploy/targets.py); 2 significant figures.")
    return notes


MODEL_HEADER = ["recipe", "source", "steps", "action decoding", "val action-token acc", "val reasoning loss",
                "checkpoint"]


def model_rows(models: list[dict]) -> list[list[str]]:
    """Where each compared model came from: `shipped` (a pretrained checkpoint, trained by the
    recorded command) or `live` (trained by this run)."""
    rows = []
    for m in models:
        val = m.get("final_val") or {}
        steps = str(m.get("steps", "–"))
        if m.get("init_from"):
            steps = " + ".join([*map(str, m.get("base_steps") or []), f"{steps} fine-tuning"])
        rows.append([m.get("recipe", "?"), m.get("source", "?"), steps, m.get("action_decoding", "–"),
                     _f(val.get("action_token_acc"), "{:.3f}"), _f(val.get("reasoning_loss"), "{:.3f}"),
                     str(m.get("checkpoint", "–"))])
    return rows


def _model_notes(models: list[dict]) -> list[str]:
    shipped = sorted({m["recipe"] for m in models if m.get("source") == "shipped" and m.get("compared")})
    live = sorted({m["recipe"] for m in models if m.get("source") == "live"})
    notes = []
    if shipped:
        notes.append("Rollouts and benchmarks compare the **shipped** checkpoints of " + ", ".join(f"`{r}`" for r in shipped)
                     + " (trained by `edge-vla train` with the command recorded beside them); the **live** runs of "
                     + (", ".join(f"`{r}`" for r in live) or "no recipe") + " prove the training stage on this machine.")
    return notes


def render_markdown(variants, base, has_plot: bool, models: list[dict] | None = None) -> str:
    header, rows, _ = table_rows(variants)
    th, tr = _task_rows(variants)
    models = models or []
    parts = ["# edge-vla evaluation report", "", *_notes(variants, base), *_model_notes(models), "", "## Variants", "",
             _md_table(header, rows), ""]
    if models:
        parts += ["## Models", "", _md_table(MODEL_HEADER, model_rows(models)), ""]
    if has_plot:
        parts += ["## Success vs latency", "", "![Pareto plot: success vs latency](pareto.png)", ""]
    if tr:
        parts += ["## Success per task", "", _md_table(th, tr), ""]
    fr, rr, sr = failure_rows(variants), reasoning_rows(variants), student_rows(variants)
    if sr:
        parts += ["## Students and their teachers", "", STUDENT_NOTE, "", _md_table(STUDENT_HEADER, sr), ""]
    if fr:
        parts += ["## Why episodes failed", "", FAILURE_NOTE, "", _md_table(FAILURE_HEADER, fr), ""]
    if rr:
        parts += ["## Reasoning per call", "", REASONING_NOTE, "", _md_table(REASONING_HEADER, rr), ""]
    parts += ["## Sources", ""] + [f"- {v.name}: " + ", ".join(f"`{s}`" for s in v.sources) for v in variants] + [""]
    return "\n".join(parts)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}tr.baseline{background:#fff3e0;font-weight:600}
img{max-width:100%;border:1px solid #ddd}code{background:#f4f4f4;padding:0 3px}"""


def _html_table(header, rows, baseline_rows=()) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = ' class="baseline"' if i in baseline_rows else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return "\n".join(out + ["</tbody></table>"])


def render_html(variants, base, png: bytes | None, models: list[dict] | None = None) -> str:
    """One file, no external resources: CSS inline, the plot as a base64 data URI."""
    header, rows, _ = table_rows(variants)
    th, tr = _task_rows(variants)
    models = models or []
    def md_inline(s):  # the notes' Markdown (**bold**, `code`) as HTML
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s))
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    notes = [*_notes(variants, base), *_model_notes(models)]
    body = ["<h1>edge-vla evaluation report</h1>", *[f"<p>{md_inline(n)}</p>" for n in notes],
            "<h2>Variants</h2>", _html_table(header, rows, {i for i, v in enumerate(variants) if v.is_baseline})]
    if models:
        body += ["<h2>Models</h2>", _html_table(MODEL_HEADER, model_rows(models))]
    if png:
        body += ["<h2>Success vs latency</h2>",
                 f'<img alt="Pareto plot: success vs latency" src="data:image/png;base64,{base64.b64encode(png).decode()}">']
    if tr:
        body += ["<h2>Success per task</h2>", _html_table(th, tr)]
    fr, rr, sr = failure_rows(variants), reasoning_rows(variants), student_rows(variants)
    if sr:
        body += ["<h2>Students and their teachers</h2>", f"<p>{md_inline(STUDENT_NOTE)}</p>", _html_table(STUDENT_HEADER, sr)]
    if fr:
        body += ["<h2>Why episodes failed</h2>", f"<p>{md_inline(FAILURE_NOTE)}</p>", _html_table(FAILURE_HEADER, fr)]
    if rr:
        body += ["<h2>Reasoning per call</h2>", f"<p>{md_inline(REASONING_NOTE)}</p>", _html_table(REASONING_HEADER, rr)]
    body += ["<h2>Sources</h2><ul>"] + [f"<li>{html.escape(v.name)}: " + ", ".join(f"<code>{html.escape(s)}</code>"
                                                                                   for s in v.sources) + "</li>"
                                          for v in variants] + ["</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>edge-vla evaluation report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_report(paths: list[str | Path], out_dir: str | Path, models: list[dict] | None = None,
                 baseline: str | None = None) -> dict:
    """Write report.md, report.html (self-contained) and pareto.png into `out_dir`. `models`:
    where each compared model came from (see `model_rows`), shown as its own table; `baseline`:
    the variant every ratio is against (default: the full-CoT one, see `collect`)."""
    variants = collect(paths, baseline)
    base = add_ratios(variants)
    png = pareto_png(variants)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgeVLAError(f"report output {out} is a file", "pass a directory for -o")
    # Each file is written atomically; the directory itself is never replaced (it may hold other things).
    if png:
        atomic_write_bytes(out / "pareto.png", png)
    atomic_write_text(out / "report.md", render_markdown(variants, base, png is not None, models))
    atomic_write_text(out / "report.html", render_html(variants, base, png, models))
    return {"out": str(out_dir), "variants": [v.row for v in variants], "baseline": base.name if base else None,
            "models": list(models or [])}


__all__ = ["build_report", "collect", "add_ratios", "pareto_front", "wilson_interval"]
