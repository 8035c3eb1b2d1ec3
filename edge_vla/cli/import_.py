"""`edge-vla import SRC -o CKPT`: a released VLA checkpoint -> an ordinary edge-vla checkpoint."""

from __future__ import annotations

import click


@click.command("import")
@click.argument("source", type=str)
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Checkpoint directory to write.")
@click.option("--unnorm-key", default=None,
              help="Which dataset's action statistics de-normalise the actions (norm_stats key, e.g. "
                   "libero_spatial_no_noops); needed when the checkpoint holds several.")
@click.option("--llm", default=None,
              help="Prismatic training checkpoints (MiniVLA): the base LLM's directory (config + tokenizer), "
                   "e.g. a local copy of Qwen/Qwen2.5-0.5B (default: its hub id).")
@click.option("--ecot", is_flag=True,
              help="The checkpoint is an ECoT policy (ecot-openvla-7b-*; same files as OpenVLA): its chat prompt "
                   "and full-mode decoding (reasoning, then the action).")
@click.option("--gripper", type=click.Choice(["auto", "raw", "libero"]), default="auto", show_default=True,
              help="raw: the gripper as predict_action returns it; libero: as OpenVLA's LIBERO evaluation sends it "
                   "(-1 open / +1 close); auto: libero for a libero* --unnorm-key.")
@click.option("--center-crop/--no-center-crop", default=None,
              help="Run on the centre 0.9 of each frame's area, as OpenVLA's LIBERO evaluation does for its "
                   "fine-tunes (default: on for a libero* --unnorm-key of an OpenVLA checkpoint).")
@click.option("--float16", "half", is_flag=True,
              help="Store the weights as float16 (half the file; loaded as float32). Without it the released dtype "
                   "is kept (bfloat16 for openvla-7b): the weights are written one tensor at a time, never all in memory.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT even when it is not an edge-vla checkpoint.")
def import_(source, output, unnorm_key, llm, ecot, gripper, center_crop, half, overwrite):
    """Import SOURCE (a local directory, or a Hugging Face hub id where there is network) into OUTPUT.

    Supported: the OpenVLA family's Hugging Face layout (openvla-7b, its LIBERO fine-tunes, ECoT-7B) and
    Prismatic training checkpoints of MiniVLA (config.json + checkpoints/*.pt, with --llm).
    The result is an edge-vla checkpoint: export, bench, eval and serve take it unchanged.
    """
    from pathlib import Path

    from edge_vla.artifacts.checkpoint import CHECKPOINT_FORMAT
    from edge_vla.io import check_output_dir
    from edge_vla.model.released_import import import_released

    # Refused before the slow conversion: never the source, never a directory that is not ours.
    check_output_dir(output, CHECKPOINT_FORMAT, overwrite, [source] if Path(source).exists() else [])
    out = import_released(source, output, unnorm_key=unnorm_key, llm=llm, ecot=ecot, gripper=gripper,
                          center_crop=center_crop, dtype="float16" if half else None, overwrite=overwrite)
    click.echo(f"imported {source} -> {out}")
