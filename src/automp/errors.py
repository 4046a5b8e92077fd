"""The one exception type users see: a clear message, no traceback (the CLI prints it and exits 2)."""


class AutompError(Exception):
    """Bad input or an impossible request, explained in one sentence."""
