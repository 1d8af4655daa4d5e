"""k-nearest-neighbour agreement with the taxonomy, rank by rank.

All geometry is cosine: embeddings are L2-normalised inside and similarity is the
dot product of unit vectors (cosine similarity in [-1, 1]; cosine distance = 1 - it).

* :func:`knn_indices` — exact cosine kNN by blocked matrix products (float32 products,
  float64 re-scoring of the candidates near the k-th): memory is ``O(block_size**2 + N*k)``,
  never ``N x N``; self is excluded; ties in similarity are broken by the smaller index
  (deterministic).
* :func:`knn_rank_agreement` — per rank, the share of each item's k nearest
  neighbours that belong to its own taxon, next to its chance value.
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
    (their order in float32 does not matter: see :func:`knn_indices`).
    """

    def __init__(self, n: int, cap: int):
        self.vals = np.full((n, cap), -np.inf, dtype=np.float32)
        self.idx = np.full((n, cap), -1, dtype=np.int64)
        self.thr = np.full(n, -np.inf, dtype=np.float32)
        self.cap = cap

    def update(self, r0: int, S: np.ndarray, c0: int) -> None:
        """Offer ``S[i, j]`` (similarity of row r0 + i and column c0 + j; never self) to the buffers."""
        kernels = _numba_kernels()
        if kernels is None:
            self._update_numpy(r0, S, c0)
            return
        rows, cols = kernels[:2] if S.size >= _PARALLEL_MIN else kernels[2:]
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


@functools.lru_cache(maxsize=None)
def _load_numba_kernels():
    """(rows, cols, rows_serial, cols_serial) of :mod:`treeprobe._knn_kernels`, or None without numba."""
    try:
        from treeprobe import _knn_kernels
    except ImportError:  # pragma: no cover - numba comes with umap-learn
        return None
    return (_knn_kernels.offer_rows, _knn_kernels.offer_cols,
            _knn_kernels.offer_rows_serial, _knn_kernels.offer_cols_serial)


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


def _exact_rows(X: np.ndarray, rows: np.ndarray, k: int, block_size: int):
    """Exact float64 top-k (ties by index, self excluded) of ``rows``, by full products."""
    n = X.shape[0]
    out_idx = np.empty((rows.size, k), dtype=np.int64)
    out_sim = np.empty((rows.size, k), dtype=np.float64)
    step = max(1, min(rows.size, _EXACT_BLOCK_ELEMENTS // max(n, 1)))
    for a in range(0, rows.size, step):
        rr = rows[a:a + step]
        S = _f64_products(X, rr)
        S[np.arange(rr.size), rr] = -np.inf
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
    n = Xn.shape[0]
    k = check_int(k, "k")
    if k >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={k + 1} items; got {n}")
    block_size = max(int(block_size), 1)
    extra = max(4, k // 4) if extra is None else max(int(extra), 0)
    cap = min(k + extra, n - 1)
    X32 = np.ascontiguousarray(Xn, dtype=np.float32)  # Xn itself for float32 input
    if queries is None:
        item = np.arange(n)  # the item behind each buffer row
        buf = _search_all(X32, cap, block_size)
    else:
        item = _check_queries(queries, n)
        buf = _search_queries(X32, item, cap, block_size)
    out_idx, out_sim = _rescore(buf, Xn, item, k, block_size)
    return out_idx, out_sim.astype(Xn.dtype, copy=False)


def _check_queries(queries, n: int) -> np.ndarray:
    """``queries`` as int64 row indices (Q,) into [0, n); raises otherwise."""
    item = np.asarray(queries)
    if item.ndim != 1 or (item.size and (item.dtype.kind not in "iu" or item.min() < 0 or item.max() >= n)):
        raise TreeprobeError(f"queries must be a 1-D array of row indices in [0, {n}); got {item!r:.80}")
    return item.astype(np.int64)


def _search_all(X32: np.ndarray, cap: int, block_size: int) -> _TopBuffer:
    """Top-``cap`` float32 candidates of every row (self excluded), over the upper triangle of
    block pairs: each block product is offered to its rows and, transposed, to its columns."""
    n = X32.shape[0]
    starts = list(range(0, n, block_size))
    buf = _TopBuffer(n, cap)
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
    return buf


def _search_queries(X32: np.ndarray, item: np.ndarray, cap: int, block_size: int) -> _TopBuffer:
    """Top-``cap`` float32 candidates of the rows ``item`` (Q,) among all N rows (self excluded)."""
    n = X32.shape[0]
    buf = _TopBuffer(item.size, cap)
    for a in range(0, item.size, block_size):
        qa = item[a:a + block_size]
        A = X32[qa]
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            S = _gemm(A, X32[c0:c1])
            own = np.flatnonzero((qa >= c0) & (qa < c1))
            S[own, qa[own] - c0] = -np.inf
            buf.update(a, S, c0)
    return buf


def _rescore(buf: _TopBuffer, Xn: np.ndarray, item: np.ndarray, k: int, block_size: int):
    """Exact (float64) top-k of each buffer row: the float32 candidates near the k-th are
    re-scored in float64; rows whose buffer cannot certify the result (more near-ties than it
    holds) are recomputed in full. Returns (indices int64 (Q, k), similarities float64 (Q, k))."""
    n, dim = Xn.shape
    nq = item.size
    cap = buf.cap
    tol = _f32_dot_tolerance(dim)
    kth = -np.partition(-buf.vals, k - 1, axis=1)[:, k - 1]
    bound = kth - 2 * tol
    certified = (cap == n - 1) | (buf.thr == -np.inf) | (buf.thr < bound)
    cand = buf.vals >= bound[:, None]
    cand[~certified] = False
    ri, cj = np.nonzero(cand)
    ci = buf.idx[ri, cj]
    s64 = np.empty(ri.size, dtype=np.float64)
    step = max(1, _RESCORE_ELEMENTS // max(dim, 1))
    for a in range(0, ri.size, step):
        s64[a:a + step] = np.einsum("ij,ij->i", Xn[item[ri[a:a + step]]].astype(np.float64),
                                    Xn[ci[a:a + step]].astype(np.float64))
    order = np.lexsort((ci, -s64, ri))
    ri, ci, s64 = ri[order], ci[order], s64[order]
    counts = np.bincount(ri, minlength=nq)
    first = np.cumsum(counts) - counts
    rows_ok = np.flatnonzero(certified)
    take = first[rows_ok][:, None] + np.arange(k)
    out_idx = np.empty((nq, k), dtype=np.int64)
    out_sim = np.empty((nq, k), dtype=np.float64)
    out_idx[rows_ok] = ci[take]
    out_sim[rows_ok] = s64[take]
    bad = np.flatnonzero(~certified)
    if bad.size:
        out_idx[bad], out_sim[bad] = _exact_rows(Xn, item[bad], k, block_size)
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
) -> pd.DataFrame:
    """Share of each item's k nearest neighbours (cosine) that share its taxon, per rank.

    The kNN graph is computed once (:func:`knn_indices`) and reused for every rank.
    Above ``max_queries`` items the means below are estimated from a uniform random sample
    of ``max_queries`` query items (seeded), each with its exact k nearest neighbours among
    all N: ``estimator`` = 'query-subsample' and ``agreement_ci95`` / ``top1_ci95`` give the
    95 % half-widths (normal approximation, finite-population corrected; ``3/n`` when every
    sampled item scored the same, e.g. all 1). The work is then
    ``max_queries x N`` similarities instead of ``N x N / 2``. ``chance`` is always exact.

    For item i in taxon t (size n_t) with neighbours j_1..j_k:

    * ``agreement`` = mean_i (1/k) Σ_m [code(j_m) == code(i)]
    * ``top1`` = mean_i [code(j_1) == code(i)]  (its chance value is also ``chance``)
    * ``chance`` = mean_i (n_t - 1)/(N - 1): the expected share if the k neighbours were
      drawn at random from the other N - 1 items
    * ``agreement_excess`` = (agreement - chance)/(1 - chance)  (0 = chance, 1 = perfect;
      NaN when chance == 1, i.e. a single taxon)

    Items alone in their taxon (n_t == 1) cannot have a same-taxon neighbour: they are
    excluded from every mean above and counted in ``n_excluded_singletons``.

    Parameters
    ----------
    X : array (N, D)
        Embeddings (L2-normalised inside).
    codes_by_rank : mapping rank -> int array (N,)
        Taxon code per item at each rank (any integer labels), in rank order.
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

    Returns
    -------
    DataFrame, one row per rank: rank, k, n_taxa, agreement, chance, agreement_excess,
    top1, n_evaluated (items whose neighbours were scored), n_excluded_singletons (items
    alone in their taxon, among all N), estimator ('exact' | 'query-subsample'),
    n_queries, agreement_ci95, top1_ci95 (NaN when exact), note ('' or why scores are NaN).

    Three genera of two items in two kingdoms; every item's nearest neighbour is its congener:

    >>> X = [[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [-0.9, -0.1]]
    >>> codes = {"kingdom": [0, 0, 0, 0, 1, 1], "genus": [0, 0, 1, 1, 2, 2]}
    >>> df = knn_rank_agreement(X, codes, k=1)
    >>> print(df[["rank", "agreement", "chance", "agreement_excess"]].round(3).to_string(index=False))
       rank  agreement  chance  agreement_excess
    kingdom        1.0   0.467               1.0
      genus        1.0   0.200               1.0
    """
    X = check_embeddings(X)
    n = X.shape[0]
    if int(k) >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={int(k) + 1} items; got {n}")
    codes_by_rank = {r: check_codes(c, n, r) for r, c in codes_by_rank.items()}
    if max_queries is not None:
        check_int(max_queries, "max_queries", minimum=2)
    sampled = max_queries is not None and n > int(max_queries)
    if sampled:
        queries = np.sort(np.random.default_rng(seed).choice(n, int(max_queries), replace=False))
    else:
        queries = np.arange(n)
    nn_idx, _ = knn_indices(X, k, block_size=block_size, queries=queries if sampled else None,
                            normalised=normalised)
    rows = [_agreement_row(rank, codes, nn_idx, queries, int(k), sampled) for rank, codes in codes_by_rank.items()]
    return pd.DataFrame(rows)


def _agreement_row(rank: str, codes: np.ndarray, nn_idx: np.ndarray, queries: np.ndarray, k: int,
                   sampled: bool) -> dict:
    """One row of :func:`knn_rank_agreement`: the scores of rank ``rank`` (codes (N,)) from the
    neighbours ``nn_idx`` (Q, k) of the items ``queries`` (Q,)."""
    n = codes.shape[0]
    _, inv, counts = np.unique(codes, return_inverse=True, return_counts=True)
    size = counts[inv]  # taxon size per item
    keep_all = size > 1
    n_pop = int(keep_all.sum())  # items that can have a same-taxon neighbour
    keep = keep_all[queries]
    n_eval = int(keep.sum())
    row = dict(rank=rank, k=k, n_taxa=int(counts.size), agreement=np.nan,
               chance=np.nan, agreement_excess=np.nan, top1=np.nan,
               n_evaluated=n_eval, n_excluded_singletons=int(n - n_pop),
               estimator="query-subsample" if sampled else "exact", n_queries=int(queries.size),
               agreement_ci95=np.nan, top1_ci95=np.nan, note="")
    if n_eval == 0:
        row["note"] = "every taxon has a single item" if n_pop == 0 else "no sampled item in a taxon of >1"
        return row
    q = queries[keep]
    same = inv[nn_idx[keep]] == inv[q][:, None]  # (n_eval, k)
    agreement = float(same.mean())
    chance = float(np.mean((size[keep_all] - 1) / (n - 1)))  # exact, over all items
    row.update(agreement=agreement, chance=chance, top1=float(same[:, 0].mean()))
    if sampled and n_eval > 1:
        fpc = np.sqrt(max(n_pop - n_eval, 0) / max(n_pop - 1, 1))
        for name, per_item in (("agreement", same.mean(axis=1)), ("top1", same[:, 0])):
            sd = per_item.std(ddof=1)
            # no spread in the sample (all 0 or all 1): the rule of three, 3/n, bounds the
            # population's deviation at 95 % where the normal interval would say 0
            half = 1.96 * sd / np.sqrt(n_eval) if sd > 0 else 3.0 / n_eval
            row[f"{name}_ci95"] = float(half * fpc)
    if chance < 1.0:
        row["agreement_excess"] = (agreement - chance) / (1.0 - chance)
    if counts.size == 1:
        row["note"] = "single taxon"
    return row
