"""``mf recipes ls|show|validate``."""

from __future__ import annotations

import json

import typer

recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
def ls() -> None:
    """List the recipes in ./recipes and the shipped ones."""
    from rich.table import Table

    from mfcli.config import read_toml, recipe_dirs
    from mfcli.console import out

    table = Table(title="recipes")
    for col in ("name", "objective", "backbone", "data", "path"):
        table.add_column(col)
    seen = set()
    for d in recipe_dirs():
        for f in sorted(d.glob("*.toml")):
            if f.stem in seen:
                continue
            seen.add(f.stem)
            try:
                raw = read_toml(f)
                if raw.get("task") == "compress":  # `mf compress` recipes: MeanFlow modules in a ResNet
                    parts = ["mf (compress)", "resnet", str(raw.get("data", {}).get("name", "?"))]
                else:
                    parts = [str(raw.get(s, {}).get("name", "?")) for s in ("objective", "backbone", "data")]
            except Exception:
                parts = ["(unreadable)", "", ""]
            table.add_row(f.stem, *parts, str(f))
    out.print(table)


@recipes_app.command("show")
def show(
    name: str = typer.Argument(..., help="Recipe name (from `mf recipes ls`) or path."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
) -> None:
    """Print the resolved recipe (every default filled in) as JSON."""
    from mfcli.compress.recipe import is_compress_recipe, load_compress_recipe
    from mfcli.config import find_recipe, load_recipe, read_toml

    path = find_recipe(name)
    loader = load_compress_recipe if is_compress_recipe(read_toml(path)) else load_recipe
    recipe = loader(path, overrides or [])
    typer.echo(json.dumps(recipe.resolved(), indent=2))


@recipes_app.command("validate")
def validate(
    path: str = typer.Argument(..., help="Recipe file."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
) -> None:
    """Check a recipe: TOML syntax, plugin names, keys and types. Exit 0 when valid."""
    from mfcli.compress.recipe import is_compress_recipe, load_compress_recipe
    from mfcli.config import load_recipe, read_toml
    from mfcli.console import console

    (load_compress_recipe if is_compress_recipe(read_toml(path)) else load_recipe)(path, overrides or [])
    console.print(f"[green]{path}: valid[/]")
