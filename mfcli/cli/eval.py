"""``mf eval``: sample quality (FID through clean-fid, offline Fréchet distances) and classifier accuracy."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_cmd(ctx: typer.Context) -> None:
        """Measure quality: FID (clean-fid), Fréchet distance in a classifier's features, accuracy. Not available yet."""
        from mfcli.errors import MFError

        raise MFError("`mf eval` is not available in this version yet: FID, the offline classifier Fréchet distance and accuracy evaluation are being added. Nothing was computed.")
