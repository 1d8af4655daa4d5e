"""User-facing errors and warnings.

Anything raised as :class:`TreeprobeError` is a problem with the user's input or
environment (a missing column, an unreadable checkpoint, no network for a hub id).
The command line prints its message on one line and exits with status 2, without
a traceback; the Python API lets it propagate like any exception.

:class:`TreeprobeWarning` is something the input had that treeprobe changed or set aside
(duplicated rows dropped, names normalised, a lineage conflict), with counts. The command
line prints it as one ``treeprobe: warning: ...`` line; the Python API issues it through
:mod:`warnings`, so ``warnings.simplefilter("error", TreeprobeWarning)`` makes it fatal.
"""


__all__ = ["TreeprobeError", "TreeprobeWarning"]


class TreeprobeError(Exception):
    """A clear, one-line problem with the input that the user can fix."""


class TreeprobeWarning(UserWarning):
    """The input was changed or partly set aside; the message says what and how many."""
