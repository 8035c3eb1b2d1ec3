"""`edge-vla train`: one command for every recipe, on one CPU or many GPUs (accelerate launch)."""

import click

RECIPE_HELP = "vla | ecot | ecot-lite-dropout | ecot-lite-pretrain | scaffold | thinking-tokens"


@click.command(context_settings={"show_default": True})
@click.option("--recipe", default=None, help=f"Training recipe: {RECIPE_HELP} [default: vla].")
@click.option("--preset", default=None, help="Model preset: tiny | minivla | openvla [default: tiny].")
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Dataset directory (LIBERO hdf5 + reasoning.json, as `edge-vla data` writes it).")
@click.option("--out", required=True, type=click.Path(path_type=str),
              help="Run directory: metrics.jsonl, state/ (resumable), checkpoint-*/, final/.")
@click.option("--config", "config_file", default=None, type=click.Path(path_type=str),
              help="YAML/JSON TrainConfig; --recipe/--preset/--set win over it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, repeatable: steps=2000, lr=1e-4, recipe_options.p=0.3, "
                   "model.lm.num_hidden_layers=2, lora_rank=16, freeze_vision=true.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved state (exactly).")
@click.option("--overwrite", is_flag=True,
              help="Delete OUT and start over (without it, OUT must be empty or this run's; never --data).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to metrics.jsonl).")
@click.option("--map", "key_map", multiple=True, metavar="NAME=KEY",
              help="LeRobot --data: camera/state/action name -> feature key, repeatable (docs/lerobot.md).")
def train(recipe, preset, data, out, config_file, overrides, resume, overwrite, no_progress, key_map=()):
    """Train a VLA with one of the ECoT-Lite recipes; writes OUT/final (a checkpoint).

    Multi-GPU / multi-node: `accelerate launch -m edge_vla.cli train ...` (DDP or FSDP per your
    accelerate config); the same options apply.
    """
    from edge_vla.train.config import load_train_config
    from edge_vla.train.trainer import train as run

    if key_map:  # training opens --data itself; the map reaches it as open_dataset's default
        from edge_vla.data.dataset import set_default_key_map

        set_default_key_map(key_map)

    cli = [f"{k}={v}" for k, v in (("recipe", recipe), ("preset", preset)) if v is not None]
    cfg = load_train_config(config_file, cli + list(overrides))
    final = run(cfg, data, out, resume=resume, show_progress=not no_progress, overwrite=overwrite,
                command=command_line(recipe, preset, data, out, config_file, overrides))
    click.echo(f"checkpoint: {final}")


def command_line(recipe, preset, data, out, config_file, overrides) -> str:
    """The `edge-vla train` command that reproduces this run (recorded in its summary.json)."""
    import shlex

    args = ["edge-vla", "train"]
    for flag, value in (("--recipe", recipe), ("--preset", preset), ("--data", data), ("--out", out),
                        ("--config", config_file)):
        if value is not None:
            args += [flag, str(value)]
    for o in overrides:
        args += ["--set", o]
    return shlex.join(args)
