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


import contextlib
import sys
import warnings

__all__ = ["TreeprobeError", "TreeprobeWarning", "warnings_as_lines"]


class TreeprobeError(Exception):
    """A clear, one-line problem with the input that the user can fix."""


class TreeprobeWarning(UserWarning):
    """The input was changed or partly set aside; the message says what and how many."""


@contextlib.contextmanager
def warnings_as_lines():
    """For the command lines: inside the block each :class:`TreeprobeWarning` is printed as one line
    ``treeprobe: warning: <message>`` on stderr (every occurrence, unless ``-W`` / ``PYTHONWARNINGS``
    say otherwise); other warnings are shown as before. The previous warning settings come back after."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, TreeprobeWarning):
                print(f"treeprobe: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        if not sys.warnoptions:
            warnings.simplefilter("always", TreeprobeWarning)
        yield
