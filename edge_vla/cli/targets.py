"""`edge-vla targets`: the deployment targets, and for a model: memory fit and projected speed on each."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--model", default=None, help="Checkpoint/bundle directory or preset name to size on every target.")
@click.option("--precision", default=None, help="fp32|fp16|bf16|int8|int4 (default: each target's default).")
@click.option("--mode", default="direct", show_default=True, type=click.Choice(["direct", "full", "adaptive"]))
@click.option("--reasoning-tokens", type=int, default=250, show_default=True, help="Reasoning length in full mode.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def targets(model, precision, mode, reasoning_tokens, as_json):
    """List target profiles; with --model, the memory each needs and its roofline latency per action.

    Projections are rooflines from datasheet bandwidth and compute plus each target's assumed fixed
    costs per graph run and kernel launch, printed to 2 significant figures; not measurements; `edge-vla bench --target NAME` puts them beside what was measured here.
    """
    from edge_vla.errors import EdgeVLAError
    from edge_vla.deploy.memory_fit import GIB, estimate_memory, model_shape
    from edge_vla.deploy.roofline import fmt_projected, project_latency, round_significant
    from edge_vla.deploy.targets import TARGETS, get_target

    rows = []
    shape = model_shape(model) if model else None
    for name in TARGETS:
        t = get_target(name)
        row = {"target": name, "usable_gib": round(t.usable_gib, 1), "bandwidth_gbs": t.bandwidth_gbs,
               "int8_tops": t.int8_tops, "precisions": list(t.precisions), "tensorrt": t.uses_tensorrt,
               "description": t.description}
        if shape is not None:
            p = precision or t.default_precision
            try:
                est = estimate_memory(shape, p, mode, t, reasoning_tokens=reasoning_tokens)
                proj = project_latency(shape, p, mode, t, reasoning_tokens=reasoning_tokens)
                row.update(precision=p, needs_gib=round(est.total / GIB, 2), fits=est.fits,
                           projected_ms=round_significant(proj.total_ms), projected_hz=round_significant(proj.hz))
            except EdgeVLAError as e:
                row.update(precision=p, error=str(e))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    cols = ["target", "usable GiB", "GB/s", "INT8 TOPS"]
    cols += ["precisions", "TensorRT"] if shape is None else ["precision", "needs GiB", "fits", "proj. ms", "proj. Hz"]
    table = Table(*cols)
    for r in rows:
        cells = [r["target"], f"{r['usable_gib']:.1f}", f"{r['bandwidth_gbs']:g}", f"{r['int8_tops']:g}"]
        if shape is None:
            cells += [",".join(r["precisions"]), "yes" if r["tensorrt"] else "no"]
        else:
            if "error" in r:
                cells += [r["precision"], "-", "-", r["error"][:40], "-"]
            else:
                cells += [r["precision"], f"{r['needs_gib']:.2f}", "yes" if r["fits"] else "[red]no[/]",
                          fmt_projected(r['projected_ms']), fmt_projected(r['projected_hz'])]
        table.add_row(*cells)
    Console().print(table)
    if shape is not None:
        click.echo(f"proj. ms, Hz: PROJECTED {mode}-mode latency per call: roofline plus the target's assumed fixed costs per graph run "
                   "and kernel launch (2 significant figures), not a measurement")
