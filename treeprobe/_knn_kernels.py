"""Compiled (numba) inner loops of :mod:`treeprobe.neighbors`. Private: reached through
``treeprobe.neighbors._numba_kernels()``, which falls back to numpy when numba is missing.

Both kernels offer a block of float32 similarities to per-row top-``cap`` buffers
(``vals``/``idx`` (n, cap), unsorted; ``thr`` (n,) = the buffer minimum, ``-inf`` until full):
an entry strictly above its row's threshold replaces the buffer minimum. Rows are split over
numba threads (``parallel=True``; each buffer row is written by one thread); the ``*_serial``
twins skip the thread launch, for small blocks. Compiled on first use and cached on disk
(``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["offer_rows", "offer_cols", "offer_rows_serial", "offer_cols_serial"]

# Columns per tile of the transposed scan (contiguous loads; narrower tiles thrash the TLB).
_TILE = 256


@numba.njit(inline="always", nogil=True)
def _insert(vals, idx, g, s, col):
    """Put (s, col) in the minimum slot of row g; return the new minimum."""
    cap = vals.shape[1]
    m = 0
    mv = vals[g, 0]
    for q in range(1, cap):
        if vals[g, q] < mv:
            mv = vals[g, q]
            m = q
    vals[g, m] = s
    idx[g, m] = col
    mv = vals[g, 0]
    for q in range(1, cap):
        if vals[g, q] < mv:
            mv = vals[g, q]
    return mv


def _offer_rows(S, r0, c0, vals, idx, thr):
    """Buffer row r0 + i gets S[i, j] as the similarity to column c0 + j (self pairs come as
    -inf from the caller, which never beats a threshold)."""
    b, c = S.shape
    for i in numba.prange(b):
        g = r0 + i
        t = thr[g]
        for j in range(c):
            s = S[i, j]
            if s > t:
                t = _insert(vals, idx, g, s, c0 + j)
        thr[g] = t


def _offer_cols(St, r0, c0, vals, idx, thr):
    """Row r0 + j gets St[i, j] as the similarity to column c0 + i: the transposed block,
    read row by row in tiles of 256 columns (contiguous loads; narrower tiles thrash the TLB)."""
    c, b = St.shape
    tile = _TILE
    for jt in numba.prange((b + tile - 1) // tile):
        j0 = jt * tile
        j1 = min(j0 + tile, b)
        t = np.empty(tile, dtype=np.float32)
        for j in range(j0, j1):
            t[j - j0] = thr[r0 + j]
        for i in range(c):
            for j in range(j0, j1):
                s = St[i, j]
                if s > t[j - j0]:
                    t[j - j0] = _insert(vals, idx, r0 + j, s, c0 + i)
        for j in range(j0, j1):
            thr[r0 + j] = t[j - j0]


offer_rows = numba.njit(parallel=True, cache=True, nogil=True)(_offer_rows)
offer_cols = numba.njit(parallel=True, cache=True, nogil=True)(_offer_cols)
offer_rows_serial = numba.njit(cache=True, nogil=True)(_offer_rows)
offer_cols_serial = numba.njit(cache=True, nogil=True)(_offer_cols)
