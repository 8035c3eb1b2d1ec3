import click


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.md, report.html (self-contained) and pareto.png.")
@click.option("--baseline", default=None, metavar="VARIANT",
              help="The variant every ratio is against (default: the full-CoT `ecot` variant with rollouts, "
                   "first by name).")
def report(runs, out_dir, baseline):
    """Trade-off report from results files (or directories of them): success with 95% CI, latency,
    actions/s, tokens/action, size, projected Hz, each variant against the full-CoT baseline."""
    from edge_vla.eval.report import build_report

    info = build_report(list(runs), out_dir, baseline=baseline)
    click.echo(f"report for {len(info['variants'])} variant(s) written to {info['out']} "
               f"(baseline: {info['baseline'] or 'none found'})")
