"""The shared rich console (stderr for messages, so stdout stays clean for --json output)."""

from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)
