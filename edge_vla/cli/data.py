"""`edge-vla data`: make demonstrations with reasoning in LIBERO, annotate existing demos, look at them."""

from __future__ import annotations

import json

import click


@click.group()
def data():
    """LIBERO demonstrations with embodied reasoning: generate, annotate, inspect."""


@data.command()
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Output directory (resumes if it exists).")
@click.option("--suite", default="libero_90", show_default=True, help="LIBERO suite.")
@click.option("--tasks", default=None,
              help="Comma-separated task names, indices or task sets, e.g. living-room-scene2-basket (its five "
                   "basket tasks; default: every task the scripted expert covers).")
@click.option("--demos-per-task", default=10, show_default=True, type=int, help="Successful demos to keep per task.")
@click.option("--image-size", default=64, show_default=True, type=int, help="Rendered image size (square).")
@click.option("--workers", default=2, show_default=True, type=int, help="Parallel simulator processes.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--init-states", type=click.Choice(["random", "benchmark"]), default="random", show_default=True,
              help="Random layouts, or the benchmark's fixed init states 0..39 (40..49 are held out for evaluation).")
@click.option("--action-noise", type=float, default=0.0, show_default=True,
              help="DART: add Gaussian noise of this std to the executed x/y/z moves (labels stay the expert's), "
                   "so demos show recoveries from off-path states.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--list-tasks", is_flag=True, help="Print the tasks the scripted expert covers, and the task sets, and exit.")
@click.option("--overwrite", is_flag=True,
              help="Delete OUT and start over (without it, OUT must be empty or a dataset this command wrote).")
def generate(out_dir, suite, tasks, demos_per_task, image_size, workers, seed, init_states, action_noise, no_progress,
             list_tasks, overwrite):
    """Roll out the scripted expert in LIBERO, keep successful demos, annotate them (hdf5 + ECoT JSON)."""
    from edge_vla.sim.expert import covered_tasks

    if list_tasks:
        from edge_vla.sim.env import TASK_SETS

        for t in covered_tasks(suite):
            click.echo(t)
        for name, members in TASK_SETS.get(suite, {}).items():
            click.echo(f"{name} (task set): {', '.join(members)}")
        return
    from edge_vla.data.generate import generate_dataset
    from edge_vla.errors import EdgeVLAError

    if not out_dir:
        raise EdgeVLAError("no output directory given", "pass --out DIR (an existing one resumes)")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    out = generate_dataset(out_dir, suite=suite, tasks=task_list, demos_per_task=demos_per_task,
                           image_size=image_size, workers=workers, seed=seed, progress=not no_progress,
                           init_states=init_states, action_noise=action_noise, overwrite=overwrite)
    m = json.loads((out / "manifest.json").read_text())
    run = m["runs"][-1]
    demos = sum(t["demos"] for t in m["tasks"].values())
    click.echo(f"{out}: {demos} demos in {len(m['files'])} files; this run kept {run['succeeded']}/{run['jobs']} "
               f"({run['steps']} steps, {run['wall_seconds']} s)")
    if run["failed_slots"]:
        click.echo(f"gave up on {len(run['failed_slots'])} slot(s) after retries: run again to retry them")


@data.command()
@click.argument("hdf5_file", type=click.Path())
@click.option("--out", "out_json", default=None, type=click.Path(),
              help="Output ECoT JSON (default: <file>_ecot.json beside the input).")
@click.option("--suite", default=None, help="LIBERO suite (default: looked up from the task name).")
@click.option("--task", default=None, help="Task name (default: from the file, `<TASK>_demo.hdf5`).")
@click.option("--image-size", default=None, type=int, help="Pixel frame of the annotations (default: the file's).")
@click.option("--no-progress", is_flag=True)
def annotate(hdf5_file, out_json, suite, task, image_size, no_progress):
    """Replay a LIBERO demo file's stored sim states and write ECoT reasoning for every step."""
    from pathlib import Path

    from edge_vla.data.annotate import annotate_file

    src = Path(hdf5_file)
    out = Path(out_json) if out_json else src.with_name(src.stem.removesuffix("_demo") + "_ecot.json")
    path = annotate_file(src, out, suite=suite, task=task, image_size=image_size, progress=not no_progress)
    click.echo(f"wrote {path}")


@data.command()
@click.argument("path", type=click.Path())
@click.option("--annotations", default=None, type=click.Path(), help="ECoT JSON for a single hdf5 file.")
@click.option("--episode", default=0, show_default=True, type=int, help="Episode (in file order) to draw.")
@click.option("--step", default=None, type=int, help="Recorded step to draw (default: the middle kept step).")
@click.option("--png", "png", default="inspect.png", show_default=True, type=click.Path(), help="Picture to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--map", "key_map", multiple=True, metavar="NAME=KEY",
              help="LeRobot data: our camera/state/action name -> the dataset's feature key, repeatable "
                   "(e.g. --map agentview=observation.images.front).")
def inspect(path, annotations, episode, step, png, as_json, key_map):
    """Counts, action statistics, and a PNG of one frame with its reasoning drawn on it."""
    from edge_vla.data.dataset import open_dataset
    from edge_vla.data.inspect import draw_sample
    from edge_vla.errors import EdgeVLAError

    ds = open_dataset(path, split="all", annotations=annotations, cameras=None, key_map=key_map or None)
    stats = ds.action_stats
    summary = {
        "path": str(path), "files": len(ds.files), "episodes": len(ds.all_episodes),
        "steps_recorded": ds.n_steps_recorded, "steps_kept": len(ds),
        "noop_steps_dropped": ds.n_steps_recorded - len(ds), "instructions": ds.instructions,
        "has_reasoning": ds.has_reasoning,
        "action_stats": {k: [round(v, 4) for v in getattr(stats, k)] for k in ("q01", "q99", "mean", "std")},
    }
    if not 0 <= episode < len(ds.episodes):
        raise EdgeVLAError(f"episode {episode} is out of range", f"use 0..{len(ds.episodes) - 1}")
    first = sum(len(e.steps) for e in ds.episodes[:episode])
    steps = ds.episodes[episode].steps
    j = len(steps) // 2 if step is None else int(abs(steps - step).argmin())
    sample = ds[first + j]
    summary["png"] = str(draw_sample(sample, png))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{path}[/]: {summary['files']} files, {summary['episodes']} episodes, "
            f"{summary['steps_recorded']} steps recorded, {summary['steps_kept']} kept "
            f"({summary['noop_steps_dropped']} no-op dropped), reasoning: {'yes' if ds.has_reasoning else 'no'}")
    for ins in ds.instructions:
        c.print(f"  - {ins}")
    t = Table("stat", *[f"a{i}" for i in range(stats.dim)], title="action statistics (train=all)")
    for k in ("q01", "q99", "mean", "std"):
        t.add_row(k, *[f"{v:+.3f}" for v in getattr(stats, k)])
    c.print(t)
    if sample.reasoning is not None:
        c.print(f"[dim]{sample.episode} step {sample.step}:[/] {sample.reasoning.to_text()}")
    c.print(f"wrote {png}")


@data.command("export-lerobot")
@click.argument("data_path", metavar="DATA", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output LeRobotDataset v3.0 directory.")
@click.option("--fps", default=10, show_default=True, type=int, help="Frame rate recorded in the dataset (LIBERO: 10).")
@click.option("--crf", default=30, show_default=True, type=int, help="AV1 quality (lower: larger files, closer frames).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--annotations", default=None, type=click.Path(), help="ECoT JSON for a single hdf5 file.")
def export_lerobot_cmd(data_path, out_dir, fps, crf, overwrite, annotations):
    """Write demos (both cameras, state, actions, reasoning) as a LeRobotDataset v3.0 for lerobot/openpi."""
    from edge_vla.data.lerobot_write import export_lerobot

    if annotations:
        from edge_vla.errors import EdgeVLAError

        raise EdgeVLAError("--annotations is for a single hdf5 file; export reads a dataset directory",
                           "put the ECoT JSON beside the hdf5 files (or in the manifest) and pass the directory")
    out = export_lerobot(data_path, out_dir, fps=fps, crf=crf, overwrite=overwrite)
    info = json.loads((out / "meta" / "info.json").read_text())
    click.echo(f"{out}: LeRobotDataset {info['codebase_version']}, {info['total_episodes']} episodes, "
               f"{info['total_frames']} frames, {info['total_tasks']} tasks, reasoning: "
               f"{'yes' if 'reasoning' in info['features'] else 'no'}")
