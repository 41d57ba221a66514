"""``mf compress``: MFI-ResNet compression of a trained ResNet with MeanFlow modules."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("compress", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def compress_cmd(ctx: typer.Context) -> None:
        """Compress a ResNet with MeanFlow modules and selective incubation (MFI-ResNet). Not available yet."""
        from mfcli.errors import MFError

        raise MFError("`mf compress` is not available in this version yet: MFI-ResNet compression is being added. Nothing was changed.")
