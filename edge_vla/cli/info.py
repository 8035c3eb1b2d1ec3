import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--checkpoint", type=click.Path(path_type=str), default=None,
              help="Also describe this checkpoint (config, parameters, recipe, action statistics).")
def info(as_json: bool, checkpoint: str | None):
    """Versions, CPU/GPU, and which optional backends are usable here (and why not)."""
    from edge_vla.environment import environment_report

    report = environment_report()
    if checkpoint:
        report["checkpoint"] = describe_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]edge-vla {report['edge_vla']}[/]  python {report['python']}  {report['platform']}")
    console.print(f"CPU: {report['cpu']['model']} ({report['cpu']['cores']} cores)   GPU: {report['gpu'] or 'none'}")
    table = Table("backend", "usable", "version / why not")
    for name, b in report["backends"].items():
        table.add_row(name, "[green]yes[/]" if b["usable"] else "[red]no[/]", b["detail"])
    console.print(table)
    if checkpoint:
        c = report["checkpoint"]
        console.print(f"[bold]checkpoint[/] {checkpoint}: preset {c['preset']}, {c['parameters'] / 1e6:.2f}M parameters, "
                      f"LM {c['lm']}, cameras {c['cameras']} at {c['image_size']} px, recipe {c['recipe'] or 'none'}, "
                      f"action stats {'yes' if c['action_stats'] else 'missing'}")
        console.print(f"  vision {c['vision']}; action tokens {c['action_tokens']}")


def describe_checkpoint(path: str) -> dict:
    from edge_vla.model.vla import VLA

    vla = VLA.from_pretrained(path)
    return {
        "preset": vla.config.preset,
        "parameters": sum(p.numel() for p in vla.parameters()),
        "lm": vla.config.lm.get("model_type"),
        "cameras": list(vla.config.cameras),
        "image_size": vla.config.image_size,
        "action_chunk": vla.config.action_chunk,
        "recipe": vla.recipe_info.get("name"),
        "action_stats": vla.action_stats is not None,
        "vision": _describe_vision(vla.config),
        "action_tokens": _describe_action_tokens(vla),
    }


def _describe_vision(c) -> str:
    if c.vision_backbone == "prismatic":
        towers = [c.vision.get("model_type")] + ([c.fused_vision.get("model_type")] if c.fused_vision else [])
        return f"prismatic: {' + '.join(towers)}, {c.projector} projector"
    return f"{c.vision.get('model_type', c.vision_path)}, {c.projector} projector"


def _describe_action_tokens(vla) -> str:
    tok = vla.processor.tokenizer
    stats = vla.action_stats
    if stats is not None and stats.bin_layout == "openvla":
        key = stats.extra.get("unnorm_key")
        return (f"openvla: last {tok.n_bins} ids below {tok.first_action_id + tok.n_bins}, reversed"
                + (f"; unnorm_key {key}" if key else ""))
    return f"appended: ids {tok.first_action_id}..{tok.first_action_id + tok.n_bins - 1}"
