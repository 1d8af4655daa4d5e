"""Input checks shared by every tool: one wording for each problem, raised as
:class:`~treeprobe.errors.TreeprobeError`."""

from __future__ import annotations

import numbers

import numpy as np

from treeprobe.errors import TreeprobeError

__all__ = ["check_embeddings", "check_int", "check_choice", "check_codes"]


def check_embeddings(X, name: str = "embeddings", *, n_rows: int | None = None) -> np.ndarray:
    """``X`` as an array of shape (N, D) (``np.asarray``: no copy); raises unless it is 2-D
    (and has ``n_rows`` rows if given).

    >>> check_embeddings([[1.0, 2.0], [3.0, 4.0]]).shape
    (2, 2)
    >>> check_embeddings(np.zeros(3))
    Traceback (most recent call last):
    ...
    treeprobe.errors.TreeprobeError: embeddings must be a 2-D array (N, D); got shape (3,)
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise TreeprobeError(f"{name} must be a 2-D array (N, D); got shape {X.shape}")
    if n_rows is not None and X.shape[0] != n_rows:
        raise TreeprobeError(f"{name} have {X.shape[0]} rows but {n_rows} were expected")
    return X


def check_int(value, name: str, *, minimum: int | None = 1) -> int:
    """``value`` as an int; raises if it is not an integer (bools are not) or is below ``minimum``.

    >>> check_int(np.int64(5), "k")
    5
    >>> check_int(0, "k")
    Traceback (most recent call last):
    ...
    treeprobe.errors.TreeprobeError: k must be >= 1; got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TreeprobeError(f"{name} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise TreeprobeError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_choice(value: str, name: str, choices) -> str:
    """``value`` if it is one of ``choices``; raises naming the choices otherwise.

    >>> check_choice("pearson", "Mantel method", ("pearson", "spearman"))
    'pearson'
    """
    if value not in choices:
        raise TreeprobeError(f"unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")
    return value


def check_codes(codes, n_items: int, rank: str) -> np.ndarray:
    """``codes`` (taxon label per item at ``rank``) as an array of shape (n_items,); raises otherwise.

    >>> check_codes([0, 0, 1], 3, "genus").tolist()
    [0, 0, 1]
    """
    codes = np.asarray(codes)
    if codes.shape != (n_items,):
        raise TreeprobeError(f"codes for rank {rank!r} have shape {codes.shape}; expected ({n_items},)")
    return codes
