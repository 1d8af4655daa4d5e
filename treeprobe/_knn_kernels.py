"""Compiled (numba) inner loops of :mod:`treeprobe.neighbors`. Private: reached through
``treeprobe.neighbors._numba_kernels()``, which falls back to numpy when numba is missing.

Both kernels offer a block of float32 similarities to per-row top-``cap`` buffers
(``vals``/``idx`` (n, cap), unsorted; ``thr`` (n,) = the buffer minimum, ``-inf`` until full):
an entry strictly above its row's threshold replaces the buffer minimum. Rows are split over
numba threads (``parallel=True``; each buffer row is written by one thread); the ``*_serial``
twins skip the thread launch, for small blocks. The ``offer_levels_*`` kernels fill, in the same
pass, per-level buffers that skip each row's own exclusion class (the level-specific neighbours of
:func:`treeprobe.neighbors.knn_rank_agreement`). Compiled on first use and cached on disk
(``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["offer_rows", "offer_cols", "offer_rows_serial", "offer_cols_serial",
           "offer_levels_rows", "offer_levels_cols", "offer_levels_rows_serial", "offer_levels_cols_serial"]

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


# --- level buffers: top-cap among the columns outside the row's own exclusion class ----------
#
# ``lvals``/``lidx`` (L, n, cap) and ``lthr`` (n, L): one top-``cap`` buffer per level l for every
# row g, offered only the columns ``col`` with ``ccode[col, l] != rcode[g, l]`` (int32 exclusion
# codes: the item's own child taxon at that level; self always shares its own code). The plain
# buffer (``vals``/``idx``/``thr``) is filled from the same pass, so each block is read once.
# ``nested`` (bool (n,)): row g's eligible set at each level contains its set at the previous
# level (whoever shares its class at level l + 1 shares its class at level l), so its thresholds
# rise with l and one count of the thresholds an entry beats tells which levels it may enter.
# The plain buffer sees a superset of every level's columns, so its threshold is never below a
# level's: entries at or below the lowest level threshold are skipped at once.


@numba.njit(inline="always", nogil=True)
def _insert_level(lvals, lidx, lv, g, s, col):
    """Put (s, col) in the minimum slot of level lv's buffer row g; return the new minimum."""
    cap = lvals.shape[2]
    m = 0
    mv = lvals[lv, g, 0]
    for q in range(1, cap):
        if lvals[lv, g, q] < mv:
            mv = lvals[lv, g, q]
            m = q
    lvals[lv, g, m] = s
    lidx[lv, g, m] = col
    mv = lvals[lv, g, 0]
    for q in range(1, cap):
        if lvals[lv, g, q] < mv:
            mv = lvals[lv, g, q]
    return mv


@numba.njit(inline="always", nogil=True)
def _lowest(lthr, g, nested):
    """Lowest level threshold of row g (the first one when its levels nest)."""
    lo = lthr[g, 0]
    if not nested[g]:
        for lv in range(1, lthr.shape[1]):
            if lthr[g, lv] < lo:
                lo = lthr[g, lv]
    return lo


def _offer_levels_rows(S, r0, c0, vals, idx, thr, lvals, lidx, lthr, rcode, ccode, nested):
    """:func:`_offer_rows` into the plain buffer and the level buffers (rows r0 + i).

    Two passes per row: a branch-free one listing the entries above the row's lowest level
    threshold (a share of the row large enough to defeat branch prediction when the classes
    are interleaved), then the offers of the listed entries.

    Rows whose levels nest (thresholds rising with the level): an entry can only enter the levels
    below its band b = #{l : s > lthr[g, l]}, and none of them if the column shares the row's
    class at level b - 1 (it then shares the classes of every level below): one branch-free
    count and one code comparison settle the common case. Otherwise every level is tried.
    (Written out in both kernels: as a shared function it ran several times slower.)"""
    b, c = S.shape
    n_lv = lthr.shape[1]
    for i in numba.prange(b):
        g = r0 + i
        t = thr[g]
        tl = _lowest(lthr, g, nested)
        cand = np.empty(c, dtype=np.int32)
        cnt = 0
        for j in range(c):
            cand[cnt] = j
            cnt += S[i, j] > tl
        for p in range(cnt):
            j = cand[p]
            s = S[i, j]
            col = c0 + j
            if s > t:
                t = _insert(vals, idx, g, s, col)
            if nested[g]:
                band = 0
                for lv in range(n_lv):
                    band += s > lthr[g, lv]
                if band > 0 and ccode[col, band - 1] != rcode[g, band - 1]:
                    for lv in range(band):
                        if ccode[col, lv] != rcode[g, lv]:
                            lthr[g, lv] = _insert_level(lvals, lidx, lv, g, s, col)
                    tl = lthr[g, 0]
            else:
                lo = t
                for lv in range(n_lv):
                    if s > lthr[g, lv] and ccode[col, lv] != rcode[g, lv]:
                        lthr[g, lv] = _insert_level(lvals, lidx, lv, g, s, col)
                    lo = min(lo, lthr[g, lv])
                tl = lo
        thr[g] = t


def _offer_levels_cols(St, r0, c0, vals, idx, thr, lvals, lidx, lthr, rcode, ccode, nested):
    """:func:`_offer_cols` into the plain buffer and the level buffers (rows r0 + j of St's
    columns), listing each tile row's entries above their lowest level thresholds first
    (the offers as in :func:`_offer_levels_rows`)."""
    c, b = St.shape
    n_lv = lthr.shape[1]
    tile = _TILE
    for jt in numba.prange((b + tile - 1) // tile):
        j0 = jt * tile
        j1 = min(j0 + tile, b)
        t = np.empty(tile, dtype=np.float32)
        tl = np.empty(tile, dtype=np.float32)
        cand = np.empty(tile, dtype=np.int32)
        for j in range(j0, j1):
            t[j - j0] = thr[r0 + j]
            tl[j - j0] = _lowest(lthr, r0 + j, nested)
        for i in range(c):
            col = c0 + i
            cnt = 0
            for j in range(j0, j1):
                cand[cnt] = j - j0
                cnt += St[i, j] > tl[j - j0]
            for p in range(cnt):
                jj = cand[p]
                s = St[i, j0 + jj]
                g = r0 + j0 + jj
                if s > t[jj]:
                    t[jj] = _insert(vals, idx, g, s, col)
                if nested[g]:
                    band = 0
                    for lv in range(n_lv):
                        band += s > lthr[g, lv]
                    if band > 0 and ccode[col, band - 1] != rcode[g, band - 1]:
                        for lv in range(band):
                            if ccode[col, lv] != rcode[g, lv]:
                                lthr[g, lv] = _insert_level(lvals, lidx, lv, g, s, col)
                        tl[jj] = lthr[g, 0]
                else:
                    lo = t[jj]
                    for lv in range(n_lv):
                        if s > lthr[g, lv] and ccode[col, lv] != rcode[g, lv]:
                            lthr[g, lv] = _insert_level(lvals, lidx, lv, g, s, col)
                        lo = min(lo, lthr[g, lv])
                    tl[jj] = lo
        for j in range(j0, j1):
            thr[r0 + j] = t[j - j0]


offer_levels_rows = numba.njit(parallel=True, cache=True, nogil=True)(_offer_levels_rows)
offer_levels_cols = numba.njit(parallel=True, cache=True, nogil=True)(_offer_levels_cols)
offer_levels_rows_serial = numba.njit(cache=True, nogil=True)(_offer_levels_rows)
offer_levels_cols_serial = numba.njit(cache=True, nogil=True)(_offer_levels_cols)
