"""User-facing errors.

Anything raised as :class:`TreeprobeError` is a problem with the user's input or
environment (a missing column, an unreadable checkpoint, no network for a hub id).
The command line prints its message on one line and exits with status 2, without
a traceback; the Python API lets it propagate like any exception.
"""


__all__ = ["TreeprobeError"]


class TreeprobeError(Exception):
    """A clear, one-line problem with the input that the user can fix."""
