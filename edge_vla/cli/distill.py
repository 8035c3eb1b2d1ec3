"""`edge-vla distill`: reasoning distillation (full-CoT teacher -> direct student) or size distillation."""

from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.option("--teacher", required=True, type=click.Path(path_type=str), help="Teacher checkpoint directory.")
@click.option("--data", required=True, type=click.Path(path_type=str), help="Dataset directory.")
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Run directory: teacher_targets/ (reasoning mode), state/ (resumable), final/ (the student).")
@click.option("--mode", type=click.Choice(["reasoning", "size"]), default=None,
              help="reasoning: direct-mode student learns the teacher's post-reasoning action distribution; "
                   "size: a smaller student learns the teacher's logits [default: reasoning].")
@click.option("--student", "student", multiple=True, metavar="KEY=VALUE|DIR",
              help="Size mode: overrides of the teacher's model config (lm.num_hidden_layers=2, repeatable), "
                   "or a checkpoint directory to start the student from.")
@click.option("--config", "config_file", default=None, type=click.Path(path_type=str), help="YAML/JSON DistillConfig.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, repeatable: steps=500, temperature=2, alpha=0.9, lr=1e-4, "
                   "teacher_samples=4096 (reasoning mode: the teacher reasons on a seeded subset), save_every=100.")
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT from its last saved state (exactly). Finished teacher targets are "
                   "reused with or without it.")
@click.option("--overwrite", is_flag=True,
              help="Delete OUT and start over (without it, OUT must be empty or this run's; never the teacher).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def distill(teacher, data, out, mode, student, config_file, overrides, resume, overwrite, no_progress):
    """Distil a teacher checkpoint into a faster (direct-mode) or smaller student."""
    from edge_vla.errors import EdgeVLAError
    from edge_vla.train.distill import distill as run, load_distill_config

    student_dir = None
    student_sets = []
    for item in student:
        if "=" in item:
            student_sets.append(f"student_model.{item}")
        elif Path(item).is_dir():
            student_dir = item
        else:
            raise EdgeVLAError(f"--student `{item}` is neither KEY=VALUE nor a checkpoint directory",
                               "e.g. --student lm.num_hidden_layers=2")
    cli = [f"mode={mode}"] if mode else []
    cfg = load_distill_config(config_file, cli + student_sets + list(overrides))
    start = None
    if student_dir:
        from edge_vla.model.vla import VLA

        start = VLA.from_pretrained(student_dir)
    final = run(cfg, teacher, data, out, student=start, show_progress=not no_progress, overwrite=overwrite,
                resume=resume, command=command_line(teacher, data, out, mode, student, config_file, overrides))
    click.echo(f"student checkpoint: {final}")


def command_line(teacher, data, out, mode, student, config_file, overrides) -> str:
    """The `edge-vla distill` command that reproduces this run (recorded in its summary.json)."""
    import shlex

    args = ["edge-vla", "distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    for flag, value in (("--mode", mode), ("--config", config_file)):
        if value is not None:
            args += [flag, str(value)]
    for item in student:
        args += ["--student", item]
    for o in overrides:
        args += ["--set", o]
    return shlex.join(args)
