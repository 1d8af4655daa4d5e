"""k-nearest-neighbour agreement with the taxonomy, rank by rank.

All geometry is cosine: embeddings are L2-normalised inside and similarity is the
dot product of unit vectors (cosine similarity in [-1, 1]; cosine distance = 1 - it).

* :func:`knn_indices` — exact cosine kNN by blocked matrix products: memory is
  ``O(block_size**2 + N*k)``, never ``N x N``; self is excluded; ties in similarity are
  broken by the smaller index (deterministic).
* :func:`knn_rank_agreement` — per rank, the share of each item's k nearest
  neighbours that belong to its own taxon, next to its chance value.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from treeprobe.errors import TreeprobeError

__all__ = ["l2_normalise", "knn_indices", "knn_rank_agreement"]


def l2_normalise(X, dtype=None) -> np.ndarray:
    """Return ``X / ||X||`` row-wise as a new float array, shape (N, D).

    Float32 input stays float32 (other input becomes float64 unless ``dtype`` is given).
    Raises :class:`TreeprobeError` for a non-2-D array, non-finite values or a zero row
    (cosine geometry is undefined for a zero vector).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise TreeprobeError(f"embeddings must be a 2-D array (N, D); got shape {X.shape}")
    if dtype is None:
        dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = X.astype(dtype, copy=True)
    if not np.all(np.isfinite(X)):
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise TreeprobeError(f"embeddings contain NaN or infinite values ({bad} rows)")
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise TreeprobeError(
            f"{zero.size} embedding rows are all zeros (first: row {zero[0]}); "
            "cosine similarity is undefined for them"
        )
    X /= norms[:, None]
    return X


def _topk_block(S: np.ndarray, col0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a similarity block, ties -> smaller column first.

    ``S`` is (b, c); returns global column indices (b, min(k, c)) and their values, not sorted.
    """
    b, c = S.shape
    if c <= k:
        idx = np.broadcast_to(np.arange(col0, col0 + c, dtype=np.int64), (b, c)).copy()
        return idx, S.copy()
    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(S, part, axis=1)
    kth = vals.min(axis=1)
    # rows where more than k entries reach the k-th value: argpartition chose arbitrarily
    n_ge = (S >= kth[:, None]).sum(axis=1)
    for r in np.flatnonzero(n_ge > k):
        order = np.lexsort((np.arange(c), -S[r]))[:k]
        part[r] = order
        vals[r] = S[r, order]
    return part.astype(np.int64) + col0, vals


def knn_indices(X, k: int, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours of every row of ``X`` (self excluded).

    Parameters
    ----------
    X : array (N, D)
        Embeddings; L2-normalised inside (cosine geometry).
    k : int
        Neighbours per item, ``1 <= k <= N - 1``.
    block_size : int
        Rows and columns per similarity block; peak extra memory about
        ``block_size**2`` floats (4096 -> 64 MB at float32).

    Returns
    -------
    indices : int64 (N, k)
        Neighbour indices, most similar first; equal similarities ordered by index.
    similarities : float (N, k)
        Cosine similarities (float32 for float32 input, else float64), descending.
    """
    Xn = l2_normalise(X)
    n = Xn.shape[0]
    k = int(k)
    if k < 1:
        raise TreeprobeError(f"k must be >= 1; got {k}")
    if k >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={k + 1} items; got {n}")
    block_size = max(int(block_size), 1)
    out_idx = np.empty((n, k), dtype=np.int64)
    out_sim = np.empty((n, k), dtype=Xn.dtype)
    for r0 in range(0, n, block_size):
        r1 = min(r0 + block_size, n)
        rows = np.arange(r0, r1)
        best_sim = np.full((r1 - r0, k), -np.inf, dtype=Xn.dtype)
        best_idx = np.full((r1 - r0, k), n, dtype=np.int64)  # sentinel index sorts last
        for c0 in range(0, n, block_size):
            c1 = min(c0 + block_size, n)
            S = Xn[r0:r1] @ Xn[c0:c1].T
            own = (rows >= c0) & (rows < c1)
            if own.any():
                S[np.flatnonzero(own), rows[own] - c0] = -np.inf
            bidx, bsim = _topk_block(S, c0, k)
            cand_idx = np.concatenate([best_idx, bidx], axis=1)
            cand_sim = np.concatenate([best_sim, bsim], axis=1)
            order = np.lexsort((cand_idx, -cand_sim), axis=1)[:, :k]
            best_idx = np.take_along_axis(cand_idx, order, axis=1)
            best_sim = np.take_along_axis(cand_sim, order, axis=1)
        out_idx[r0:r1] = best_idx
        out_sim[r0:r1] = best_sim
    return out_idx, out_sim


def _check_codes(codes, n: int, rank: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n,):
        raise TreeprobeError(f"codes for rank {rank!r} have shape {codes.shape}; expected ({n},)")
    return codes


def knn_rank_agreement(
    X,
    codes_by_rank: Mapping[str, np.ndarray],
    k: int = 10,
    block_size: int = 4096,
) -> pd.DataFrame:
    """Share of each item's k nearest neighbours (cosine) that share its taxon, per rank.

    The kNN graph is computed once (:func:`knn_indices`) and reused for every rank.

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

    Returns
    -------
    DataFrame, one row per rank: rank, k, n_taxa, agreement, chance, agreement_excess,
    top1, n_evaluated, n_excluded_singletons, note ('' or why scores are NaN).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise TreeprobeError(f"embeddings must be a 2-D array (N, D); got shape {X.shape}")
    n = X.shape[0]
    if int(k) >= n:
        raise TreeprobeError(f"k={k} neighbours needs at least k+1={int(k) + 1} items; got {n}")
    codes_by_rank = {r: _check_codes(c, n, r) for r, c in codes_by_rank.items()}
    nn_idx, _ = knn_indices(X, k, block_size=block_size)
    rows = []
    for rank, codes in codes_by_rank.items():
        _, inv, counts = np.unique(codes, return_inverse=True, return_counts=True)
        size = counts[inv]  # taxon size per item
        keep = size > 1
        n_eval = int(keep.sum())
        row = dict(rank=rank, k=int(k), n_taxa=int(counts.size), agreement=np.nan,
                   chance=np.nan, agreement_excess=np.nan, top1=np.nan,
                   n_evaluated=n_eval, n_excluded_singletons=int(n - n_eval), note="")
        if n_eval == 0:
            row["note"] = "every taxon has a single item"
        else:
            same = inv[nn_idx[keep]] == inv[keep][:, None]  # (n_eval, k)
            agreement = float(same.mean())
            chance = float(np.mean((size[keep] - 1) / (n - 1)))
            row.update(agreement=agreement, chance=chance, top1=float(same[:, 0].mean()))
            if chance < 1.0:
                row["agreement_excess"] = (agreement - chance) / (1.0 - chance)
            if counts.size == 1:
                row["note"] = "single taxon"
        rows.append(row)
    return pd.DataFrame(rows)
