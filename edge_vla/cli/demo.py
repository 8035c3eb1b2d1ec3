import click


@click.command()
@click.option("--quick", is_flag=True, help="Prove the pipeline in ~10 minutes (one task, few demos, short training).")
@click.option("--out", default="demo_out", show_default=True, help="Output directory (reruns resume from it).")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker processes for data and rollouts.")
@click.option("--pretrained", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory of shipped checkpoints (<recipe>/) to compare instead of the live short runs.")
@click.option("--trials", type=int, default=None, help="Rollouts per task (held-out benchmark init states).")
@click.option("--train-steps", type=int, default=None,
              help="Optimizer steps per recipe (with --pretrained: the live proof runs' steps, default 100).")
@click.option("--demos-per-task", type=int, default=None, help="Expert demonstrations per task.")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Use this dataset (from `edge-vla data generate`) instead of generating one.")
@click.option("--task", "tasks", multiple=True,
              help="A LIBERO-90 task or task set to use, e.g. living-room-scene2-basket (repeatable; default: the "
                   "demo's basket task). With --data, the tasks in it.")
def demo(quick, out, workers, pretrained, trials, train_steps, demos_per_task, data, tasks):
    """Run the whole pipeline on CPU: LIBERO demos with reasoning -> train vla / ecot /
    ecot-lite-dropout -> export fp32/int8/int4 -> bench -> LIBERO rollouts -> trade-off report."""
    from edge_vla.pipeline import DemoConfig, run_demo

    steps = {"proof_steps" if pretrained else "train_steps": train_steps}
    kw = {k: v for k, v in dict(out=out, workers=workers, pretrained=pretrained, trials=trials,
                                 **steps, demos_per_task=demos_per_task, data=data,
                                 tasks=tuple(tasks) or None).items()
          if v is not None}
    if pretrained:
        cfg = DemoConfig.for_pretrained(kw.pop("pretrained"), quick=quick, **kw)
    else:
        cfg = DemoConfig.quick(**kw) if quick else DemoConfig(**kw)
    run_demo(cfg)
