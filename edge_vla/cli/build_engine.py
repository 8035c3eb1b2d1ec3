"""`edge-vla build-engine BUNDLE`: build TensorRT engines on the target and record them in the bundle."""

from __future__ import annotations

import click


@click.command("build-engine")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--target", default=None, help="Target profile (default: the one the bundle was exported for).")
@click.option("--max-free-tokens", type=int, default=512, show_default=True,
              help="Longest reasoning the decode profile must hold (full mode).")
@click.option("--workspace-gib", type=float, default=None, help="Builder workspace (default: the target's).")
@click.option("--lint-only", is_flag=True, help="Only run the TensorRT-readiness lint with the engine profiles.")
def build_engine(bundle, target, max_free_tokens, workspace_gib, lint_only):
    """Build TensorRT engines for BUNDLE's graphs ON THE TARGET (Jetson or CUDA GPU).

    ONNX Runtime's INT4 ops are rewritten into TensorRT's INT4 form, then the graphs are linted; then each graph is parsed with TensorRT's ONNX parser and built
    with prefill and decode optimisation profiles, FP16/INT8 (QDQ)/INT4 (weight-only) as the
    graph's precision says, and a timing cache. Engines go to BUNDLE/engines/ and are recorded in
    the manifest with the TensorRT version and GPU; the runtime refuses them anywhere else.
    """
    if lint_only:
        from edge_vla.errors import EdgeVLAError
        from edge_vla.artifacts.bundle import load_bundle
        from edge_vla.deploy.targets import get_target
        from edge_vla.tensorrt.build import lint_bundle

        b = load_bundle(bundle)
        t = get_target(target or b.manifest.get("target") or "cuda-gpu")
        reports = []
        for role, (report, _, _, notes) in lint_bundle(b, t, max_free_tokens).items():
            for note in notes:
                click.echo(f"{role}: {note}")
            reports.append(report)
        for r in reports:
            click.echo(r.summary())
        bad = [r for r in reports if not r.ok]
        if bad:
            raise EdgeVLAError(f"{len(bad)} graph(s) of {bundle} are not TensorRT-ready for {t.name}",
                               "see the findings above")
        return
    from edge_vla.tensorrt.build import build_engines

    records = build_engines(bundle, target, max_free_tokens=max_free_tokens, workspace_gib=workspace_gib,
                            report=click.echo)
    click.echo(f"recorded {len(records)} engines in {bundle}/manifest.json")
