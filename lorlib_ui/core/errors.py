"""The one exception type that reaches users.

Everything the core refuses on purpose (a bad name, an adapter that does not fit, a corrupt file)
raises `LorlibError` with a single line that says what is wrong and, where it helps, what to do.
The CLI prints that line and exits non-zero; the UI shows it. Any other exception is a bug.
"""


class LorlibError(Exception):
    """A user-facing error: the message is one clear line."""
