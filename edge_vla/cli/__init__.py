"""The `edge-vla` command. Thin: parse options, call one stage function, print the result.

Commands live one module each under edge_vla/cli/ and load lazily, so `edge-vla --help` does
not import torch. Errors the user can fix (EdgeVLAError) print one line and exit 1.
"""

from __future__ import annotations

import importlib
import sys

import click

from edge_vla import __version__
from edge_vla.errors import EdgeVLAError

# name -> "module:attribute". Add a command here when it works (no stubs).
COMMANDS: dict[str, str] = {
    "eval": "edge_vla.cli.eval:eval_group",
    "info": "edge_vla.cli.info:info",
    "data": "edge_vla.cli.data:data",
    "export": "edge_vla.cli.export:export",
    "bench": "edge_vla.cli.bench:bench",
    "report": "edge_vla.cli.report:report",
    "serve": "edge_vla.cli.serve:serve",
    "build-engine": "edge_vla.cli.build_engine:build_engine",
    "targets": "edge_vla.cli.targets:targets",
    "train": "edge_vla.cli.train:train",
    "distill": "edge_vla.cli.distill:distill",
    "demo": "edge_vla.cli.demo:demo",
    "import": "edge_vla.cli.import_:import_",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeVLAError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-vla")
def main():
    """edge-vla: train reasoning-lite VLAs, quantize and export them, and measure them on the edge."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
