"""The ``mf`` command line: one module per command, errors as one paragraph and a non-zero exit."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from mfcli import __version__
from mfcli.errors import MFError

app = typer.Typer(
    name="mf",
    help="Train, sample, evaluate and compress one-step generative models of the MeanFlow family.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG = {"on": os.environ.get("MF_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (or set MF_DEBUG=1)."),
) -> None:
    """mf: MeanFlow-family one-step generators and MeanFlow compression of ResNets."""
    if debug:
        _DEBUG["on"] = True


from mfcli.cli import compress, eval as eval_cmd, plugins, recipes, sample, train  # noqa: E402

train.register(app)
sample.register(app)
eval_cmd.register(app)
compress.register(app)
plugins.register(app)
recipes.register(app)


def main() -> None:
    import warnings

    from rich.markup import escape

    from mfcli.console import console

    # torch.func's JVP decompositions still use torch.jit.script internally; the warning is not ours to act on.
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

    try:
        app()
    except MFError as exc:
        if _DEBUG["on"]:
            traceback.print_exc()
        # escaped: messages name recipe tables such as [meta], which rich would take for markup
        console.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # an unexpected failure still gets one paragraph, not a traceback
        if _DEBUG["on"]:
            traceback.print_exc()
        console.print(f"[bold red]Error:[/] {type(exc).__name__}: {escape(str(exc))}. This is unexpected; rerun with --debug (or MF_DEBUG=1) for the traceback and report it.", soft_wrap=True)
        sys.exit(1)
