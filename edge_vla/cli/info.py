import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool):
    """Versions, CPU/GPU, and which optional backends are usable here (and why not)."""
    from edge_vla.environment import environment_report

    report = environment_report()
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
