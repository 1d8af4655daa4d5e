"""k-nearest-neighbour agreement with the taxonomy, rank by rank.

All geometry is cosine: embeddings are L2-normalised inside and similarity is the
dot product of unit vectors (cosine similarity in [-1, 1]; cosine distance = 1 - it).

* :func:`knn_indices` — exact cosine kNN by blocked matrix products (float32 products,
  float64 re-scoring of the candidates near the k-th): memory is ``O(block_size**2 + N*k)``,
  never ``N x N``; self is excluded; ties in similarity are broken by the smaller index
  (deterministic).
* :func:`knn_rank_agreement` — per rank, the share of each item's k nearest
  neighbours that belong to its own taxon, next to its chance value and its ceiling (the most
  any embedding can score with these taxon sizes and k), normalised between the two; and the
  level-specific share among the neighbours outside the item's own child taxon (genus
  agreement without species agreement counted again). Codes of -1 mark unknown taxa.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import pandas as pd

from treeprobe._utils import l2_normalise, numba_enabled
from treeprobe._validation import check_codes, check_embeddings, check_int
from treeprobe.errors import TreeprobeError

__all__ = ["knn_indices", "knn_rank_agreement", "DEFAULT_BLOCK_SIZE"]

#: Rows and columns per similarity block of :func:`knn_indices` (peak 2 × 4096² float32 = 128 MB
#: of blocks).
DEFAULT_BLOCK_SIZE = 4096
# Blocks with fewer similarities than this go to the serial numba kernels: launching numba's
# threads costs more than it saves on them.
_PARALLEL_MIN = 1 << 16
# Above this share of a block's entries beating their row's threshold, the numpy fallback merges
# the whole block into the buffers (the first block a row sees), below it only the hits.
_DENSE_FRACTION = 0.25
# Columns per float64 chunk when a float32 X is cast for exact products (65,536 × 512 × 8 B = 256 MB).
_F64_COLUMN_CHUNK = 1 << 16
# Float64 similarities per block of the exact full-row fallback (16M × 8 B = 128 MB).
_EXACT_BLOCK_ELEMENTS = 1 << 24
# Float64 values per chunk of the candidate re-scoring (4M × 8 B = 32 MB per operand).
_RESCORE_ELEMENTS = 1 << 22


# float32 rounding bound for a dot product of two unit vectors of dimension D, any summation
# order: |fl32(x.y) - x.y| <= (D + 2) u (1 + u)^2, u = 2**-24 (inputs rounded to float32 + accumulation).
def _f32_dot_tolerance(dim: int) -> float:
    return float((dim + 4) * 2.0 ** -24)


class _TopBuffer:
    """Per-row buffers of the ``cap`` largest float32 similarities seen so far (unsorted).

    ``vals``/``idx`` (n, cap): the buffer (``-inf``/``-1`` while not full); ``thr`` (n,): its
    minimum, below which offers are ignored. Entries equal to the threshold are dropped
    (their order in float32 does not matter: see :func:`knn_indices`). ``vals``/``idx``/``thr``
    may be given (views into the level buffers of :class:`_LevelSearch`).
    """

    def __init__(self, n: int, cap: int, arrays=None):
        if arrays is None:
            arrays = (np.full((n, cap), -np.inf, dtype=np.float32), np.full((n, cap), -1, dtype=np.int64),
                      np.full(n, -np.inf, dtype=np.float32))
        self.vals, self.idx, self.thr = arrays
        self.cap = cap

    def update(self, r0: int, S: np.ndarray, c0: int) -> None:
        """Offer ``S[i, j]`` (similarity of row r0 + i and column c0 + j; never self) to the buffers."""
        kernels = _numba_kernels()
        if kernels is None:
            self._update_numpy(r0, S, c0)
            return
        rows, cols = kernels[:2] if S.size >= _PARALLEL_MIN else kernels[2:4]
        if S.flags.c_contiguous:
            rows(S, r0, c0, self.vals, self.idx, self.thr)
        elif S.T.flags.c_contiguous:  # a transposed block: scan its columns, tile by tile
            cols(S.T, r0, c0, self.vals, self.idx, self.thr)
        else:
            rows(np.ascontiguousarray(S), r0, c0, self.vals, self.idx, self.thr)

    def _update_numpy(self, r0: int, S: np.ndarray, c0: int) -> None:
        b, c = S.shape
        cap = self.cap
        thr = self.thr[r0:r0 + b]
        mask = S > thr[:, None]
        counts = np.count_nonzero(mask, axis=1)
        total = int(counts.sum())
        if total == 0:
            return
        if total > _DENSE_FRACTION * S.size:  # dense: e.g. the first block a row sees
            rows = np.arange(b)
            new_vals = S
            new_idx = np.broadcast_to(np.arange(c0, c0 + c, dtype=np.int64), (b, c))
        else:  # sparse: few entries beat the current threshold
            rows = np.flatnonzero(counts)
            if S.flags.c_contiguous:
                ri, cj = np.nonzero(mask)
            else:  # a transposed view: group the hits by row
                cj, ri = np.nonzero(mask.T)
                order = np.argsort(ri, kind="stable")
                ri, cj = ri[order], cj[order]
            cnt = counts[rows]
            width = int(cnt.max())
            start = np.repeat(np.cumsum(cnt) - cnt, cnt)
            pos = np.arange(ri.size) - start
            slot = np.repeat(np.arange(rows.size), cnt)
            new_vals = np.full((rows.size, width), -np.inf, dtype=np.float32)
            new_idx = np.full((rows.size, width), -1, dtype=np.int64)
            new_vals[slot, pos] = S[ri, cj]
            new_idx[slot, pos] = cj + c0
        g = rows + r0
        all_vals = np.concatenate([self.vals[g], new_vals], axis=1)
        all_idx = np.concatenate([self.idx[g], new_idx], axis=1)
        if all_vals.shape[1] > cap:
            keep = np.argpartition(-all_vals, cap - 1, axis=1)[:, :cap]
            all_vals = np.take_along_axis(all_vals, keep, axis=1)
            all_idx = np.take_along_axis(all_idx, keep, axis=1)
        self.vals[g] = all_vals
        self.idx[g] = all_idx
        self.thr[g] = all_vals.min(axis=1)


class _LevelSearch:
    """The plain top-``cap`` buffer of :class:`_TopBuffer` plus one per level with exclusions.

    Level l of buffer row g is offered only the columns ``col`` whose exclusion code differs:
    ``ccode[col, l] != rcode[g, l]`` (int32 codes >= 0, (N, L) and (n, L); kept as (L, N) and
    (n, L); an item shares its own code, so self is excluded too). ``lvals``/``lidx`` (L, n, cap), ``lthr`` (n, L). ``nested`` bool
    (n,): the row's exclusion classes nest level by level (see :func:`_nested_rows`). Every
    block is read once for all the buffers (numba), or masked level by level (numpy fallback).
    """

    def __init__(self, n: int, cap: int, rcode: np.ndarray, ccode: np.ndarray, nested: np.ndarray):
        n_lv = rcode.shape[1]
        self.main = _TopBuffer(n, cap)
        self.cap = cap
        self.lvals = np.full((n_lv, n, cap), -np.inf, dtype=np.float32)
        self.lidx = np.full((n_lv, n, cap), -1, dtype=np.int64)
        self.lthr = np.full((n, n_lv), -np.inf, dtype=np.float32)
        self.rcode = np.ascontiguousarray(rcode, dtype=np.int32)
        self.ccode = np.ascontiguousarray(np.asarray(ccode, dtype=np.int32).T)  # (L, N): runs per level
        self.nested = np.ascontiguousarray(nested, dtype=np.bool_)

    def level(self, lv: int) -> _TopBuffer:
        """Level ``lv``'s buffers as a :class:`_TopBuffer` (views)."""
        return _TopBuffer(self.lthr.shape[0], self.cap, (self.lvals[lv], self.lidx[lv], self.lthr[:, lv]))

    def update(self, r0: int, S: np.ndarray, c0: int) -> None:
        """Offer ``S[i, j]`` (row r0 + i, column c0 + j; never self) to the plain and level buffers."""
        kernels = _numba_kernels()
        if kernels is None:
            self.main._update_numpy(r0, S, c0)
            b, c = S.shape
            for lv in range(self.lthr.shape[1]):
                same = self.rcode[r0:r0 + b, lv][:, None] == self.ccode[lv, c0:c0 + c][None, :]
                self.level(lv)._update_numpy(r0, np.where(same, np.float32(-np.inf), S), c0)
            return
        rows, cols = kernels[4:6] if S.size >= _PARALLEL_MIN else kernels[6:]
        m = self.main
        args = (m.vals, m.idx, m.thr, self.lvals, self.lidx, self.lthr, self.rcode, self.ccode, self.nested)
        if S.flags.c_contiguous:
            rows(S, r0, c0, *args)
        elif S.T.flags.c_contiguous:
            cols(S.T, r0, c0, *args)
        else:
            rows(np.ascontiguousarray(S), r0, c0, *args)


@functools.lru_cache(maxsize=None)
def _load_numba_kernels():
    """(rows, cols, rows_serial, cols_serial, and the same four of the level kernels) of
    :mod:`treeprobe._knn_kernels`, or None without numba."""
    try:
        from treeprobe import _knn_kernels as K
    except ImportError:  # pragma: no cover - numba comes with umap-learn
        return None
    return (K.offer_rows, K.offer_cols, K.offer_rows_serial, K.offer_cols_serial,
            K.offer_levels_rows, K.offer_levels_cols, K.offer_levels_rows_serial, K.offer_levels_cols_serial)


def _numba_kernels():
    """The numba top-k kernels (numba, a umap-learn dependency, scans the blocks in parallel), or
    None for the numpy fallback: numba missing, or ``TREEPROBE_NO_NUMBA`` set
    (:func:`treeprobe._utils.numba_enabled`). The results are the same either way."""
    return _load_numba_kernels() if numba_enabled() else None


def _gemm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B.T by a general matrix product (never numpy's syrk path for A is B)."""
    if np.shares_memory(A, B):
        B = B.copy()
    return A @ B.T


def _f64_products(X: np.ndarray, rows: np.ndarray, chunk: int = _F64_COLUMN_CHUNK) -> np.ndarray:
    """``X[rows] @ X.T`` in float64, (len(rows), N), casting ``X`` chunk by chunk (no
    float64 copy of the whole of a float32 ``X``)."""
    A = X[rows].astype(np.float64)
    S = np.empty((rows.size, X.shape[0]), dtype=np.float64)
    for c0 in range(0, X.shape[0], chunk):
        S[:, c0:c0 + chunk] = _gemm(A, X[c0:c0 + chunk].astype(np.float64))
    return S


def _f64_dots(Xn: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 dot products of the row pairs (Xn[a[p]], Xn[b[p]]), (P,): float32 rows are cast
    inside einsum's buffers (no float64 copy of the gathered rows: ~3x faster)."""
    return np.einsum("ij,ij->i", Xn[a], Xn[b], dtype=np.float64)


def _exact_rows(X: np.ndarray, rows: np.ndarray, k: int, block_size: int, excl=None):
    """Exact float64 top-k (ties by index, self excluded) of ``rows``, by full products.

    ``excl``: optional (row codes (len(rows),), column codes (N,)): columns sharing the row's
    code are excluded too (level searches)."""
    n = X.shape[0]
    out_idx = np.empty((rows.size, k), dtype=np.int64)
    out_sim = np.empty((rows.size, k), dtype=np.float64)
    step = max(1, min(rows.size, _EXACT_BLOCK_ELEMENTS // max(n, 1)))
    for a in range(0, rows.size, step):
        rr = rows[a:a + step]
        S = _f64_products(X, rr)
        S[np.arange(rr.size), rr] = -np.inf
        if excl is not None:
            S[excl[0][a:a + step, None] == excl[1][None, :]] = -np.inf
        cols = np.broadcast_to(np.arange(n), S.shape)
        order = np.lexsort((cols, -S), axis=1)[:, :k]
        out_idx[a:a + step] = order
        out_sim[a:a + step] = np.take_along_axis(S, order, axis=1)
    return out_idx, out_sim


def knn_indices(X, k: int, block_size: int = DEFAULT_BLOCK_SIZE, *, extra: int | None = None,
                queries=None, normalised: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours of every row of ``X`` (self excluded), or of the
    rows listed in ``queries`` (searched against all N rows).

    Brute force by blocked matrix products, memory ``O(block_size**2 + N*k)``, never
    ``N x N``. The products run in float32 over the upper triangle of block pairs (each
    block product serves both its rows and its columns: half the flops). Every row keeps
    its ``k + extra`` best float32 candidates; the candidates within the float32 rounding
    bound of the k-th are then re-scored in float64, so the result is exact for the
    float64 cosine similarities of the normalised rows: same neighbours and order as a
    float64 brute-force search, ties broken by the smaller index. A row whose buffer cannot
    certify this (more than ``extra`` near-ties at the k-th value, e.g. many duplicates) is
    recomputed in float64 in full. No ``X @ X.T`` (numpy's syrk path, which segfaults in
    some OpenBLAS builds from N ~ 33,000 with 2 threads) is ever formed.

    Parameters
    ----------
    X : array (N, D)
        Embeddings; L2-normalised inside (cosine geometry).
    k : int
        Neighbours per item, ``1 <= k <= N - 1``.
    block_size : int
        Rows and columns per similarity block; peak extra memory about
        ``2 * block_size**2`` float32 (4096 -> 128 MB) plus the buffers (N * (k + extra) * 12 B).
    extra : int, optional
        Spare candidates per row (default ``max(4, k // 4)``).
    queries : int array (Q,), optional
        Row indices to search for (default all N). The work is ``Q x N`` products instead
        of the ``N x N / 2`` of the full search; the results are the same rows of it.
    normalised : bool
        ``X`` is already the output of :func:`l2_normalise`: used as it is, no copy (2 GB at
        1M x 512 float32).

    Returns
    -------
    indices : int64 (N, k) or (Q, k)
        Neighbour indices, most similar first; equal similarities ordered by index.
    similarities : float (N, k) or (Q, k)
        Cosine similarities (float32 for float32 input, else float64), descending.
    """
    Xn = check_embeddings(X) if normalised else l2_normalise(X)
    out_idx, out_sim, _ = _knn_search(Xn, k, block_size, extra, queries)
    return out_idx, out_sim.astype(Xn.dtype, copy=False)


def _knn_search(Xn: np.ndarray, k: int, block_size: int, extra: int | None, queries, levels=None):
    """:func:`knn_indices` of the normalised ``Xn`` (N, D), plus the level neighbours.

    ``levels``: None, or (ccode int32 (N, L), nested bool (N,), active bool (Q, L)): the
    exclusion codes and nesting of :class:`_LevelSearch` and, per level, the query rows whose
    level neighbours are wanted. Returns (indices (Q, k), similarities float64 (Q, k), level
    neighbour sets int64 (L, Q, k) with -1 in inactive rows, or None)."""
    n = Xn.shape[0]
    k = check_int(k, "k")
    if k >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={k + 1} items; got {n}")
    block_size = max(int(block_size), 1)
    extra = max(4, k // 4) if extra is None else max(int(extra), 0)
    cap = min(k + extra, n - 1)
    X32 = np.ascontiguousarray(Xn, dtype=np.float32)  # Xn itself for float32 input
    item = np.arange(n) if queries is None else _check_queries(queries, n)  # the item behind each buffer row
    if levels is None:
        buf = _TopBuffer(item.size, cap)
    else:
        ccode, nested, _ = levels
        buf = _LevelSearch(item.size, cap, ccode[item], ccode, nested[item])
    if queries is None:
        _search_all(X32, buf, block_size)
    else:
        _search_queries(X32, item, buf, block_size)
    main = buf if levels is None else buf.main
    out_idx, out_sim = _rescore(main, Xn, item, k, block_size)
    level_idx = None
    if levels is not None:
        ccode, _, active = levels
        level_idx = np.full((ccode.shape[1], item.size, k), -1, dtype=np.int64)
        for lv in range(ccode.shape[1]):
            excl = (buf.rcode[:, lv], buf.ccode[lv])
            level_idx[lv] = _topk_sets(buf.level(lv), Xn, item, k, block_size, active[:, lv], excl)
    return out_idx, out_sim, level_idx


def _check_queries(queries, n: int) -> np.ndarray:
    """``queries`` as int64 row indices (Q,) into [0, n); raises otherwise."""
    item = np.asarray(queries)
    if item.ndim != 1 or (item.size and (item.dtype.kind not in "iu" or item.min() < 0 or item.max() >= n)):
        raise TreeprobeError(f"queries must be a 1-D array of row indices in [0, {n}); got {item!r:.80}")
    return item.astype(np.int64)


def _search_all(X32: np.ndarray, buf, block_size: int) -> None:
    """Fill ``buf`` (:class:`_TopBuffer` or :class:`_LevelSearch`, one row per item) with the
    top-``cap`` float32 candidates of every row (self excluded), over the upper triangle of
    block pairs: each block product is offered to its rows and, transposed, to its columns."""
    n = X32.shape[0]
    starts = list(range(0, n, block_size))
    for bi, r0 in enumerate(starts):
        r1 = min(r0 + block_size, n)
        A = X32[r0:r1]
        for c0 in starts[bi:]:
            c1 = min(c0 + block_size, n)
            S = _gemm(A, X32[c0:c1])
            if c0 == r0:
                np.fill_diagonal(S, -np.inf)
            buf.update(r0, S, c0)
            if c0 != r0:
                buf.update(c0, S.T, r0)


def _search_queries(X32: np.ndarray, item: np.ndarray, buf, block_size: int) -> None:
    """Fill ``buf`` (one row per query) with the top-``cap`` float32 candidates of the rows
    ``item`` (Q,) among all N rows (self excluded)."""
    n = X32.shape[0]
    for a in range(0, item.size, block_size):
        qa = item[a:a + block_size]
        A = X32[qa]
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            S = _gemm(A, X32[c0:c1])
            own = np.flatnonzero((qa >= c0) & (qa < c1))
            S[own, qa[own] - c0] = -np.inf
            buf.update(a, S, c0)


def _topk_sets(buf: _TopBuffer, Xn: np.ndarray, item: np.ndarray, k: int, block_size: int,
               active: np.ndarray, excl) -> np.ndarray:
    """The exact top-k *sets* (int64 (Q, k), in no particular order; -1 in inactive rows) of a
    level buffer: what :func:`_rescore` finds, but only the candidates within the float32
    bound of the k-th are re-scored in float64 (those clearly above it are in, those below
    out), a few per row instead of all k. ``excl``: (row codes (Q,), column codes (N,))."""
    n, dim = Xn.shape
    out = np.full((item.size, k), -1, dtype=np.int64)
    sel = np.flatnonzero(active)
    if sel.size == 0:
        return out
    vals, idx, thr = buf.vals[sel], buf.idx[sel], buf.thr[sel]
    tol2 = 2 * _f32_dot_tolerance(dim)
    kth = -np.partition(-vals, k - 1, axis=1)[:, k - 1]
    certified = (buf.cap == n - 1) | (thr == -np.inf) | (thr < kth - tol2)
    sure = vals > (kth + tol2)[:, None]
    band = (vals >= (kth - tol2)[:, None]) & ~sure
    sure[~certified] = band[~certified] = False
    need = k - sure.sum(axis=1)
    # the band: re-scored in float64, ranked by (similarity desc, index) within its row
    bi, bj = np.nonzero(band)
    bc = idx[bi, bj]
    s64 = np.empty(bi.size, dtype=np.float64)
    step = max(1, _RESCORE_ELEMENTS // max(dim, 1))
    for a in range(0, bi.size, step):
        s64[a:a + step] = _f64_dots(Xn, item[sel[bi[a:a + step]]], bc[a:a + step])
    order = np.lexsort((bc, -s64, bi))
    bi, bc = bi[order], bc[order]
    counts = np.bincount(bi, minlength=sel.size)
    pos = np.arange(bi.size) - np.repeat(np.cumsum(counts) - counts, counts)
    chosen = pos < need[bi]
    si, sj = np.nonzero(sure)
    rows = np.concatenate([si, bi[chosen]])
    cols = np.concatenate([idx[si, sj], bc[chosen]])
    order = np.argsort(rows, kind="stable")
    ok = np.flatnonzero(certified)
    out[sel[ok]] = cols[order].reshape(ok.size, k)
    bad = np.flatnonzero(~certified)
    if bad.size:
        out[sel[bad]] = _exact_rows(Xn, item[sel[bad]], k, block_size, (excl[0][sel[bad]], excl[1]))[0]
    return out


def _rescore(buf: _TopBuffer, Xn: np.ndarray, item: np.ndarray, k: int, block_size: int, *,
             active: np.ndarray | None = None, excl=None):
    """Exact (float64) top-k of each buffer row: the float32 candidates near the k-th are
    re-scored in float64; rows whose buffer cannot certify the result (more near-ties than it
    holds) are recomputed in full. ``active`` (Q,) bool: only these rows (others get -1/NaN;
    each needs k candidates). ``excl``: the (row codes (Q,), column codes (N,)) of a level
    buffer, for the full recomputation. Returns (indices int64 (Q, k), similarities float64 (Q, k))."""
    n, dim = Xn.shape
    nq = item.size
    cap = buf.cap
    out_idx = np.full((nq, k), -1, dtype=np.int64)
    out_sim = np.full((nq, k), np.nan, dtype=np.float64)
    sel = np.arange(nq) if active is None else np.flatnonzero(active)
    if sel.size == 0:
        return out_idx, out_sim
    vals, idx, thr = (buf.vals, buf.idx, buf.thr) if active is None else (buf.vals[sel], buf.idx[sel], buf.thr[sel])
    tol = _f32_dot_tolerance(dim)
    kth = -np.partition(-vals, k - 1, axis=1)[:, k - 1]
    bound = kth - 2 * tol
    certified = (cap == n - 1) | (thr == -np.inf) | (thr < bound)
    cand = vals >= bound[:, None]
    cand[~certified] = False
    ri, cj = np.nonzero(cand)
    ci = idx[ri, cj]
    it = item[sel]
    s64 = np.empty(ri.size, dtype=np.float64)
    step = max(1, _RESCORE_ELEMENTS // max(dim, 1))
    for a in range(0, ri.size, step):
        s64[a:a + step] = _f64_dots(Xn, it[ri[a:a + step]], ci[a:a + step])
    order = np.lexsort((ci, -s64, ri))
    ri, ci, s64 = ri[order], ci[order], s64[order]
    counts = np.bincount(ri, minlength=sel.size)
    first = np.cumsum(counts) - counts
    rows_ok = np.flatnonzero(certified)
    take = first[rows_ok][:, None] + np.arange(k)
    out_idx[sel[rows_ok]] = ci[take]
    out_sim[sel[rows_ok]] = s64[take]
    bad = np.flatnonzero(~certified)
    if bad.size:
        ex = None if excl is None else (excl[0][sel[bad]], excl[1])
        out_idx[sel[bad]], out_sim[sel[bad]] = _exact_rows(Xn, it[bad], k, block_size, ex)
    return out_idx, out_sim


def knn_rank_agreement(
    X,
    codes_by_rank: Mapping[str, np.ndarray],
    k: int = 10,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_queries: int | None = None,
    seed: int = 0,
    normalised: bool = False,
    level: bool = True,
) -> pd.DataFrame:
    """Share of each item's k nearest neighbours (cosine) that share its taxon, per rank,
    next to its chance value and its ceiling, and the level-specific share.

    The kNN graph is computed once (:func:`knn_indices`) and reused for every rank; the
    level-specific neighbours come from the same pass over the similarity blocks.
    Above ``max_queries`` items the means below are estimated from a uniform random sample
    of ``max_queries`` query items (seeded), each with its exact k nearest neighbours among
    all N: ``estimator`` = 'query-subsample' and the ``*_ci95`` columns give the 95 %
    half-widths (normal approximation, finite-population corrected; ``3/n`` when every sampled
    item scored the same, e.g. all 1; the normalised scores' by linearisation of the ratio).
    The work is then ``max_queries x N`` similarities instead of ``N x N / 2``. ``chance`` and
    ``level_chance`` are always exact (over all N items, from the taxon sizes alone);
    ``ceiling`` and ``level_ceiling`` are means over the *scored* items, i.e. estimated on the
    same queries as the agreement, so the normalised scores never exceed 1 and a perfect
    embedding scores exactly 1 under subsampling too (exact when every item is a query).

    **Unknown taxa.** A code of -1 means the item's taxon at that rank is unknown: the item is
    not scored at that rank (counted in ``n_unknown``), stays a possible neighbour of the
    others but never agrees with them (two unknowns are never the same taxon), and taxon sizes,
    chance and ceiling count the known items only.

    For an evaluated item i (known at the rank, in a taxon of m_i >= 2 known items) with
    neighbours j_1..j_k among the other N - 1 items:

    * ``agreement`` = mean_i (1/k) Σ_m [code(j_m) == code(i)]
    * ``top1`` = mean_i [code(j_1) == code(i)]  (its chance value is also ``chance``)
    * ``chance`` = mean_i (m_i - 1)/(N - 1): the expected share if the k neighbours were
      drawn at random from the other N - 1 items
    * ``ceiling`` = mean_i min(k, m_i - 1)/k: the most any embedding can score (at most
      m_i - 1 others share the taxon); reached, at every rank at once, by an embedding whose
      similarities follow the tree (closer within species than within genus, and so on)
    * ``agreement_normalised`` = (agreement - chance)/(ceiling - chance): 0 = chance,
      1 = the ceiling, comparable across ranks; NaN with a note when ceiling == chance
      (a single taxon, or k = N - 1)
    * ``top1_normalised`` = (top1 - chance)/(1 - chance) (the top-1 ceiling is 1)
    * ``agreement_excess`` = (agreement - chance)/(1 - chance)  (kept for comparison: its
      maximum is below 1 when k > m_i - 1; NaN when chance == 1, i.e. a single taxon)

    Items alone in their taxon (m_i == 1) cannot have a same-taxon neighbour: they are
    excluded from every mean above and counted in ``n_excluded_singletons``.

    **Level-specific agreement** (``level=True``; every rank but the last, whose child rank
    c is the next one in ``codes_by_rank``): the same share among the k nearest neighbours of
    i *outside its own child taxon* (its rank-c taxon; an item unknown at c is its own child
    taxon), so genus agreement does not count species agreement again. With c_i = size of i's
    child taxon and a_i = number of items in i's rank taxon but not in its child taxon:

    * ``level_agreement`` = mean_i (1/k) Σ_m [code(j'_m) == code(i)], j'_1..j'_k the k nearest
      items outside i's child taxon
    * ``level_chance`` = mean_i a_i/(N - c_i);  ``level_ceiling`` = mean_i min(k, a_i)/k
    * ``level_normalised`` = (level_agreement - level_chance)/(level_ceiling - level_chance)

    over ``level_n_evaluated`` items: known at the rank, a_i >= 1, N - c_i >= k.
    ``level_child`` names the child rank; ``level_note`` says why level scores are NaN.
    Cost: no N x N memory and no extra block products: one more top-(k + extra) buffer per
    level, filled from the same similarity blocks (memory (R - 1) * Q * (k + extra) * 12 B:
    1.0 GB for 6 levels at Q = N = 1M, k = 10; 100 MB at the 100,000 queries of
    ``treeprobe.tl.knn``), plus a vectorised count per block entry of the buffers it can enter;
    measured 1.1-1.5x the time of ``level=False`` at N = 100,000 (``benchmarks/bench_knn.py``,
    exact and 10,000 queries, on a shared 2-core machine).

    Parameters
    ----------
    X : array (N, D)
        Embeddings (L2-normalised inside).
    codes_by_rank : mapping rank -> int array (N,)
        Taxon code per item at each rank (any integer labels; -1 = unknown), in rank order
        (top first): the level-specific scores of a rank exclude the next rank's taxa.
    k : int
        Neighbours per item, ``k <= N - 1`` (else :class:`TreeprobeError`).
    block_size : int
        Rows per similarity block of :func:`knn_indices` (memory, not the result).
    max_queries : int, optional
        Largest N searched in full (None: always in full).
    seed : int
        Seed of the query sample.
    normalised : bool
        ``X`` comes from :func:`l2_normalise` (no copy is made; see :func:`knn_indices`).
    level : bool
        Compute the level-specific columns (False: NaN, and only the plain search).

    Returns
    -------
    DataFrame, one row per rank: rank, k, n_taxa (known taxa), agreement, chance,
    agreement_excess, top1, n_evaluated (items whose neighbours were scored),
    n_excluded_singletons (known items alone in their taxon, among all N), estimator
    ('exact' | 'query-subsample'), n_queries, agreement_ci95, top1_ci95 (NaN when exact),
    note ('' or why scores are NaN), then n_unknown (items with code -1, among all N), ceiling,
    agreement_normalised, agreement_normalised_ci95, top1_normalised, level_child,
    level_agreement, level_chance, level_ceiling, level_normalised, level_n_evaluated,
    level_agreement_ci95, level_normalised_ci95, level_note. Agreements, chances and ceilings
    are shares in [0, 1]; the normalised scores are <= 1 (0 at chance, negative below it).

    Three genera of two items in two kingdoms; every item's nearest neighbour is its congener:

    >>> X = [[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [-0.9, -0.1]]
    >>> codes = {"kingdom": [0, 0, 0, 0, 1, 1], "genus": [0, 0, 1, 1, 2, 2]}
    >>> df = knn_rank_agreement(X, codes, k=1)
    >>> print(df[["rank", "agreement", "chance", "agreement_excess"]].round(3).to_string(index=False))
       rank  agreement  chance  agreement_excess
    kingdom        1.0   0.467               1.0
      genus        1.0   0.200               1.0

    Outside its own genus, each Kingdom-0 item's nearest is the other genus of its kingdom:

    >>> print(df[["rank", "level_child", "level_agreement", "level_ceiling"]].to_string(index=False))
       rank level_child  level_agreement  level_ceiling
    kingdom       genus              1.0            1.0
      genus                          NaN            NaN
    """
    X = check_embeddings(X)
    n = X.shape[0]
    if int(k) >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={int(k) + 1} items; got {n}")
    k = int(k)
    ranks = list(codes_by_rank)
    taxa = {r: _TaxonCodes(check_codes(c, n, r)) for r, c in codes_by_rank.items()}
    if max_queries is not None:
        check_int(max_queries, "max_queries", minimum=2)
    sampled = max_queries is not None and n > int(max_queries)
    if sampled:
        queries = np.sort(np.random.default_rng(seed).choice(n, int(max_queries), replace=False))
    else:
        queries = np.arange(n)
    pairs = list(zip(ranks[:-1], ranks[1:])) if level else []
    stats = [_level_stats(taxa[r], taxa[c], k) for r, c in pairs]
    # the levels with an item to score get a buffer each (a level without one is left out)
    used = [i for i, st in enumerate(stats) if st["eval"][queries].any()]
    levels = None
    if used:
        ccode = np.stack([taxa[pairs[i][1]].exclusion for i in used], axis=1)
        active = np.stack([stats[i]["eval"][queries] for i in used], axis=1)
        levels = (ccode, _nested_rows(ccode), active)
    Xn = check_embeddings(X) if normalised else l2_normalise(X)
    nn_idx, _, level_idx = _knn_search(Xn, k, block_size, None, queries if sampled else None, levels)
    rows = []
    for i, rank in enumerate(ranks):
        row = _agreement_row(rank, taxa[rank], nn_idx, queries, k, sampled)
        if i < len(pairs):
            lidx = level_idx[used.index(i)] if i in used else None  # None: nothing to score
            row.update(_level_row(taxa[rank], stats[i], lidx, queries, k, sampled, ranks[i + 1]))
        else:
            row.update(level_child="", level_note="finest rank: no child rank" if level else "level=False")
        rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)


#: Columns of :func:`knn_rank_agreement`, in order.
_COLUMNS = ["rank", "k", "n_taxa", "agreement", "chance", "agreement_excess", "top1", "n_evaluated",
            "n_excluded_singletons", "estimator", "n_queries", "agreement_ci95", "top1_ci95", "note",
            "n_unknown", "ceiling", "agreement_normalised", "agreement_normalised_ci95", "top1_normalised",
            "level_child", "level_agreement", "level_chance", "level_ceiling", "level_normalised",
            "level_n_evaluated", "level_agreement_ci95", "level_normalised_ci95", "level_note"]


def _unknown_mask(codes: np.ndarray) -> np.ndarray:
    """Bool (N,): items whose code is -1 (taxon unknown at that rank); none for non-numeric labels."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iuf":
        return np.zeros(codes.shape, dtype=bool)
    return codes == -1


class _TaxonCodes:
    """One rank's codes (N,) as dense taxa: ``inv`` int64 (N,) taxon index 0..n_taxa-1 of the
    known items, -1 where unknown (code -1); ``size`` int64 (N,) known items in the item's taxon
    (0 if unknown); ``exclusion`` int32 (N,) a class per taxon, each unknown item its own."""

    def __init__(self, codes: np.ndarray):
        codes = np.asarray(codes)
        known = ~_unknown_mask(codes)
        self.n = codes.shape[0]
        self.inv = np.full(self.n, -1, dtype=np.int64)
        _, inv, counts = np.unique(codes[known], return_inverse=True, return_counts=True)
        self.inv[known] = inv.ravel()
        self.n_taxa = int(counts.size)
        self.known = known
        self.n_unknown = int(self.n - known.sum())
        self.size = np.zeros(self.n, dtype=np.int64)
        self.size[known] = counts[self.inv[known]]
        excl = self.inv.copy()
        excl[~known] = self.n_taxa + np.arange(self.n_unknown)
        self.exclusion = excl.astype(np.int32)


def _nested_rows(ccode: np.ndarray) -> np.ndarray:
    """Bool (N,): items whose exclusion classes nest, level by level (``ccode`` (N, L)): at
    every level l >= 1 the item's class lies inside one class of level l - 1. Their level
    thresholds rise with the level, which the kernels exploit (see :mod:`treeprobe._knn_kernels`);
    an item with a gap in its lineage (unknown at one rank, known below) is scanned level by level."""
    ok = np.ones(ccode.shape[0], dtype=bool)
    for lv in range(1, ccode.shape[1]):
        fine = ccode[:, lv].astype(np.int64)
        pair = np.unique(fine * (int(ccode[:, lv - 1].max()) + 1) + ccode[:, lv - 1])
        n_parents = np.bincount(pair // (int(ccode[:, lv - 1].max()) + 1), minlength=int(fine.max()) + 1)
        ok &= n_parents[fine] == 1
    return ok


def _level_stats(parent: _TaxonCodes, child: _TaxonCodes, k: int) -> dict:
    """Per item (N,) of rank ``parent`` with child rank ``child``: ``a`` (items in its taxon but not
    in its child taxon), ``pool`` (N - child taxon size), ``eval`` (bool: scored at this level)."""
    n = parent.n
    c = np.where(child.known, child.size, 1)  # an item unknown at the child rank is its own child taxon
    both = parent.known & child.known
    overlap = np.ones(n, dtype=np.int64)
    if both.any():
        pair = parent.inv[both] * max(child.n_taxa, 1) + child.inv[both]
        _, pinv, pcount = np.unique(pair, return_inverse=True, return_counts=True)
        overlap[both] = pcount[pinv.ravel()]
    a = np.where(parent.known, parent.size - overlap, 0)
    pool = n - c
    return dict(a=a, pool=pool, eval=parent.known & (a >= 1) & (pool >= k))


def _ci95(per_item: np.ndarray, n_pop: int) -> float:
    """95 % half-width of the mean of ``per_item`` (a uniform sample of ``n_pop`` items),
    finite-population corrected; the rule of three, 3/n, when the sample has no spread."""
    n_eval = per_item.size
    fpc = np.sqrt(max(n_pop - n_eval, 0) / max(n_pop - 1, 1))
    sd = per_item.std(ddof=1)
    # no spread in the sample (all 0 or all 1): the rule of three, 3/n, bounds the
    # population's deviation at 95 % where the normal interval would say 0
    half = 1.96 * sd / np.sqrt(n_eval) if sd > 0 else 3.0 / n_eval
    return float(half * fpc)


def _ratio_ci95(score: np.ndarray, ceil: np.ndarray, chance: float, n_pop: int) -> float:
    """95 % half-width of R = (mean(score) - chance)/(mean(ceil) - chance), both means over the
    same sample (per-item arrays (n,)), by linearisation: the :func:`_ci95` of
    (score_i - chance - R (ceil_i - chance))/(mean(ceil) - chance). NaN when R is undefined."""
    den = float(ceil.mean()) - chance
    if not den > 1e-12:
        return np.nan
    r = (float(score.mean()) - chance) / den
    return _ci95((score - chance - r * (ceil - chance)) / den, n_pop)


def _normalised(value: float, chance: float, ceiling: float) -> float:
    """(value - chance)/(ceiling - chance), NaN when the ceiling does not exceed chance."""
    return (value - chance) / (ceiling - chance) if ceiling > chance + 1e-12 else np.nan


def _agreement_row(rank: str, tx: _TaxonCodes, nn_idx: np.ndarray, queries: np.ndarray, k: int,
                   sampled: bool) -> dict:
    """The plain columns of :func:`knn_rank_agreement` for rank ``rank`` (taxa ``tx``) from the
    neighbours ``nn_idx`` (Q, k) of the items ``queries`` (Q,)."""
    n = tx.n
    keep_all = tx.size > 1  # known items that can have a same-taxon neighbour
    n_pop = int(keep_all.sum())
    keep = keep_all[queries]
    n_eval = int(keep.sum())
    row = dict(rank=rank, k=k, n_taxa=tx.n_taxa, n_evaluated=n_eval,
               n_excluded_singletons=int((tx.size == 1).sum()),
               estimator="query-subsample" if sampled else "exact", n_queries=int(queries.size),
               note="", n_unknown=tx.n_unknown)
    if n_eval == 0:
        row["note"] = ("every item unknown at this rank" if tx.n_unknown == n else
                       "every taxon has a single item" if n_pop == 0 else "no sampled item in a taxon of >1")
        return row
    q = queries[keep]
    same = tx.inv[nn_idx[keep]] == tx.inv[q][:, None]  # (n_eval, k); unknown neighbours (-1) never agree
    per_item = same.mean(axis=1)
    agreement = float(per_item.mean())
    chance = float(np.mean((tx.size[keep_all] - 1) / (n - 1)))  # exact, over all items
    ceil_i = np.minimum(k, tx.size[q] - 1) / k  # over the scored items: the queries when sampled
    ceiling = float(ceil_i.mean())
    top1 = float(same[:, 0].mean())
    row.update(agreement=agreement, chance=chance, top1=top1, ceiling=ceiling,
               agreement_normalised=_normalised(agreement, chance, ceiling),
               top1_normalised=_normalised(top1, chance, 1.0))
    if sampled and n_eval > 1:
        row["agreement_ci95"] = _ci95(per_item, n_pop)
        row["top1_ci95"] = _ci95(same[:, 0].astype(float), n_pop)
        row["agreement_normalised_ci95"] = _ratio_ci95(per_item, ceil_i, chance, n_pop)
    if chance < 1.0:
        row["agreement_excess"] = (agreement - chance) / (1.0 - chance)
    if tx.n_taxa == 1:
        row["note"] = "single taxon"
    elif not ceiling > chance + 1e-12:
        row["note"] = "ceiling == chance: agreement_normalised undefined"
    return row


def _level_row(tx: _TaxonCodes, st: dict, level_idx: np.ndarray | None, queries: np.ndarray, k: int,
               sampled: bool, child: str) -> dict:
    """The level columns of :func:`knn_rank_agreement` for one rank: ``st`` from
    :func:`_level_stats`, ``level_idx`` (Q, k) the neighbours outside each query's child taxon."""
    ev_all = st["eval"]
    n_pop = int(ev_all.sum())
    keep = ev_all[queries]
    n_eval = int(keep.sum())
    row = dict(level_child=child, level_n_evaluated=n_eval, level_note="")
    if n_eval == 0:
        row["level_note"] = ("no item has a taxon member outside its own child taxon" if n_pop == 0
                             else "no sampled item with a taxon member outside its child taxon")
        return row
    q = queries[keep]
    same = tx.inv[level_idx[keep]] == tx.inv[q][:, None]
    per_item = same.mean(axis=1)
    agreement = float(per_item.mean())
    chance = float(np.mean(st["a"][ev_all] / st["pool"][ev_all]))  # exact, over all items
    ceil_i = np.minimum(k, st["a"][q]) / k  # over the scored items
    ceiling = float(ceil_i.mean())
    row.update(level_agreement=agreement, level_chance=chance, level_ceiling=ceiling,
               level_normalised=_normalised(agreement, chance, ceiling))
    if sampled and n_eval > 1:
        row["level_agreement_ci95"] = _ci95(per_item, n_pop)
        row["level_normalised_ci95"] = _ratio_ci95(per_item, ceil_i, chance, n_pop)
    if not ceiling > chance + 1e-12:
        row["level_note"] = "level_ceiling == level_chance: level_normalised undefined"
    return row
