"""``mf plugins``: what is installed and what each plugin registered."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """List plugins, their versions and the objectives, backbones and datasets each registered."""
        from rich.table import Table

        from mfcli.console import out
        from mfcli.plugins import KINDS, registry

        reg = registry()
        if as_json:
            doc = [
                {"name": p.name, "module": p.module, "distribution": p.distribution, "version": p.version,
                 "components": {k: sorted(v) for k, v in p.components.items()}}
                for p in reg.plugins.values()
            ]
            typer.echo(json.dumps(doc, indent=2))
            return
        table = Table(title="mf plugins")
        for col in ("plugin", "distribution", "version", *KINDS):
            table.add_column(col)
        for p in reg.plugins.values():
            table.add_row(p.name, p.distribution, p.version, *(", ".join(sorted(p.components.get(k, []))) for k in KINDS))
        out.print(table)
