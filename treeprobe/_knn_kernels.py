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
# row g, offered only the columns ``col`` with ``ccode[l, col] != rcode[g, l]`` (int32 exclusion
# codes >= 0, ``ccode`` (L, N) and ``rcode`` (n, L): the item's own child taxon at that level;
# self always shares its own code). The plain buffer (``vals``/``idx``/``thr``) is filled from the
# same pass, so each block is read once.
#
# Which entries can enter a buffer is decided first, for a run of entries at once, by a
# branch-free count that the compiler vectorises: ``need = [s > t] * 64 + Σ_l [s > lthr_l] -
# Σ_l [col shares g's class at level l]``. For a row whose levels nest (``nested[g]``: whoever
# shares its class at level l + 1 shares it at level l) its eligible levels are a suffix
# l >= e (e = the number of shared classes) and, the eligible sets growing with l, its
# thresholds rise with l, so the levels an entry beats are a prefix l < b: some level can take
# it iff b > e. For other rows the shared count is left out (their codes are compared with -2,
# which no code equals): need iff some threshold is beaten. The few entries with need > 0 are
# then offered level by level. (Written out in both kernels: as shared numba functions, inlined
# or not, the two kernels ran 20-30 % slower.)

_RUN = 256  # entries per branch-free count in the row kernel (thresholds refreshed after each)
_SUB = 32  # entries per sub-run whose largest count decides whether it is scanned at all


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


def _offer_levels_rows(S, r0, c0, vals, idx, thr, lvals, lidx, lthr, rcode, ccode, nested):
    """:func:`_offer_rows` into the plain buffer and the level buffers (rows r0 + i), in runs
    of ``_RUN`` entries: a vectorised count of what each entry can enter, then the offers."""
    b, c = S.shape
    n_lv = lthr.shape[1]
    for i in numba.prange(b):
        g = r0 + i
        row = S[i]
        t = thr[g]
        acc = np.empty(_RUN, dtype=np.int32)
        for a in range(0, c, _RUN):
            w = min(a + _RUN, c) - a
            seg = row[a:a + w]
            for j in range(w):
                acc[j] = (seg[j] > t) * 64
            for lv in range(n_lv):
                x = lthr[g, lv]
                r = rcode[g, lv] if nested[g] else -2
                cc = ccode[lv, c0 + a:c0 + a + w]
                for j in range(w):
                    acc[j] += (seg[j] > x) - (cc[j] == r)
            for s0 in range(0, w, _SUB):  # offers, in sub-runs without any need skipped
                s1 = min(s0 + _SUB, w)
                hi = acc[s0]
                for j in range(s0 + 1, s1):
                    hi = max(hi, acc[j])
                if hi <= 0:
                    continue
                for j in range(s0, s1):
                    if acc[j] > 0:
                        s = seg[j]
                        col = c0 + a + j
                        if s > t:
                            t = _insert(vals, idx, g, s, col)
                        for lv in range(n_lv):
                            if s > lthr[g, lv] and ccode[lv, col] != rcode[g, lv]:
                                lthr[g, lv] = _insert_level(lvals, lidx, lv, g, s, col)
        thr[g] = t


def _offer_levels_cols(St, r0, c0, vals, idx, thr, lvals, lidx, lthr, rcode, ccode, nested):
    """:func:`_offer_cols` into the plain buffer and the level buffers (rows r0 + j of St's
    columns): for each column, a vectorised count over the tile's rows, then the offers."""
    c, b = St.shape
    n_lv = lthr.shape[1]
    tile = _TILE
    for jt in numba.prange((b + tile - 1) // tile):
        j0 = jt * tile
        j1 = min(j0 + tile, b)
        w = j1 - j0
        t = np.empty(tile, dtype=np.float32)
        lt = np.empty((n_lv, tile), dtype=np.float32)  # the tile rows' level thresholds
        rc = np.empty((n_lv, tile), dtype=np.int32)  # their codes (-2: not nested)
        acc = np.empty(tile, dtype=np.int32)
        for j in range(w):
            g = r0 + j0 + j
            t[j] = thr[g]
            for lv in range(n_lv):
                lt[lv, j] = lthr[g, lv]
                rc[lv, j] = rcode[g, lv] if nested[g] else -2
        for i in range(c):
            col = c0 + i
            seg = St[i, j0:j1]
            for j in range(w):
                acc[j] = (seg[j] > t[j]) * 64
            for lv in range(n_lv):
                cc = ccode[lv, col]
                ltl = lt[lv]
                rcl = rc[lv]
                for j in range(w):
                    acc[j] += (seg[j] > ltl[j]) - (rcl[j] == cc)
            for s0 in range(0, w, _SUB):
                s1 = min(s0 + _SUB, w)
                hi = acc[s0]
                for j in range(s0 + 1, s1):
                    hi = max(hi, acc[j])
                if hi <= 0:
                    continue
                for j in range(s0, s1):
                    if acc[j] > 0:
                        s = seg[j]
                        g = r0 + j0 + j
                        if s > t[j]:
                            t[j] = _insert(vals, idx, g, s, col)
                        for lv in range(n_lv):
                            if s > lt[lv, j] and ccode[lv, col] != rcode[g, lv]:
                                lt[lv, j] = _insert_level(lvals, lidx, lv, g, s, col)
                                lthr[g, lv] = lt[lv, j]
        for j in range(w):
            thr[r0 + j0 + j] = t[j]


offer_levels_rows = numba.njit(parallel=True, cache=True, nogil=True)(_offer_levels_rows)
offer_levels_cols = numba.njit(parallel=True, cache=True, nogil=True)(_offer_levels_cols)
offer_levels_rows_serial = numba.njit(cache=True, nogil=True)(_offer_levels_rows)
offer_levels_cols_serial = numba.njit(cache=True, nogil=True)(_offer_levels_cols)
