"""`edge-vla bench ARTIFACT...`: latency, memory, size and roofline of checkpoints/bundles side by side."""

from __future__ import annotations

import click


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--mode", type=click.Choice(["direct", "full", "adaptive"]), default=None,
              help="Decode mode (default: each artefact's recipe).")
@click.option("--backend", default="auto", show_default=True, help="auto | torch | onnxruntime | tensorrt")
@click.option("--calls", default=20, show_default=True, help="Timed calls per artefact.")
@click.option("--warmup", default=3, show_default=True, help="Untimed calls first.")
@click.option("--max-free-tokens", type=int, default=None, help="Reasoning budget in full mode.")
@click.option("--target", "targets", multiple=True,
              help="Also project actions/s on this target (repeatable; see `edge-vla targets`).")
@click.option("-o", "--out", "out_dir", default="results/bench", show_default=True, type=click.Path(path_type=str),
              help="Directory for the results files (one per artefact).")
@click.option("--compare-head", is_flag=True,
              help="Also time each bundle's direct-mode decode step with the full LM head vs the restricted "
                   "action head (same process, interleaved) and print the ratio.")
@click.option("--data", type=click.Path(), default=None,
              help="Decode held-out observations of this dataset (default: synthetic ones; full-mode reasoning "
                   "lengths are only realistic on real observations).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def bench(artifacts, mode, backend, calls, warmup, max_free_tokens, targets, out_dir, compare_head, as_json, data):
    """Benchmark ARTIFACTS (checkpoints or bundles) in one run, ratios against the first.

    DIR@MODE runs DIR in that mode (e.g. `bundle@full bundle@direct`: the same bundle both ways).

    Each artefact runs in a fresh process with one intra-op thread. Reports latency median/p95
    per component and per action (the decode step split into body and head), actions/s, peak memory,
    model bytes, and the fraction of this machine's measured memory-bandwidth roofline each decoder
    reaches. --compare-head: full LM head vs restricted action head on the same bundle, one run.
    """
    import json

    from rich.progress import Progress

    from edge_vla.eval.bench import bench_artifacts, format_table

    opts = {"max_free_tokens": max_free_tokens} if max_free_tokens else {}
    with Progress(transient=True) as prog:
        task = prog.add_task("bench", total=len(artifacts))

        def progress(i, n, name):
            prog.update(task, completed=i, description=f"bench {name}")

        result = bench_artifacts(list(artifacts), mode=mode, backend=backend, calls=calls, warmup=warmup,
                                 out_dir=out_dir, targets=tuple(targets), opts=opts, progress=progress,
                                 compare_head=compare_head, data=data)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items()}, indent=1, default=str))
        return
    click.echo(format_table(result))
    for f in result.get("files", []):
        click.echo(f"wrote {f}")
