"""User-facing errors: the CLI prints them as one paragraph and exits non-zero."""


class MFError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""
