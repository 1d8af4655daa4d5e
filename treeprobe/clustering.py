"""Rank-wise clustering of embeddings, scored against the taxonomy with chance baselines.

At each rank the embeddings (L2-normalised: cosine geometry) are clustered into
k = number of taxa at that rank, and the clusters are compared with the taxa by purity,
NMI, AMI and ARI (scikit-learn). At fine ranks, with many single-image taxa, purity is
high by construction, so every score is reported next to its value for a random
clustering with the same cluster sizes (:func:`chance_baseline`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from sklearn.metrics.cluster import contingency_matrix

from treeprobe.errors import TreeprobeError
from treeprobe.neighbors import l2_normalise

__all__ = [
    "purity_score",
    "cluster_labels",
    "clustering_scores",
    "chance_baseline",
    "rankwise_clustering",
]

METHODS = ("kmeans", "agglomerative")

_SCORERS = {
    "purity": lambda t, p: purity_score(t, p),
    "nmi": normalized_mutual_info_score,
    "ami": adjusted_mutual_info_score,
    "ari": adjusted_rand_score,
}


def purity_score(labels_true, labels_pred) -> float:
    """Purity = Σ_clusters max_class |cluster ∩ class| / N, in (0, 1].

    ``labels_true`` and ``labels_pred`` are label arrays of shape (N,). 1 means every
    cluster holds a single class (trivially so when every item is its own cluster).
    """
    c = contingency_matrix(labels_true, labels_pred, sparse=True)  # classes x clusters
    return float(np.asarray(c.max(axis=0).todense()).sum() / c.sum())


def _ward_cuts(Xn: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Ward tree on (normalised) X built once, cut into each k of ``ks`` clusters."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    Z = linkage(Xn.astype(np.float64, copy=False), method="ward")
    ks = sorted(set(int(k) for k in ks))
    cuts = cut_tree(Z, n_clusters=ks)  # (N, len(ks)); Ward heights are monotone
    return {k: cuts[:, j].astype(np.int64) for j, k in enumerate(ks)}


def _check_agglomerative_size(n: int, max_agglomerative: int) -> None:
    if n > max_agglomerative:
        gb = n * (n - 1) / 2 * 8 / 1e9
        raise TreeprobeError(
            f"agglomerative (Ward) clustering needs O(N^2) memory: N={n} > "
            f"max_agglomerative={max_agglomerative} (~{gb:.1f} GB of pairwise distances); "
            "use method 'kmeans', subsample, or raise max_agglomerative"
        )


def cluster_labels(
    X,
    k: int,
    method: str = "kmeans",
    seed: int = 0,
    *,
    n_init: int = 4,
    minibatch_threshold: int = 50_000,
    max_agglomerative: int = 10_000,
    n_threads: int | None = None,
) -> np.ndarray:
    """Cluster the L2-normalised rows of ``X`` (N, D) into ``k`` clusters; int64 labels (N,).

    method
        ``"kmeans"``: sklearn ``KMeans`` (``n_init`` restarts, ``random_state=seed``);
        ``MiniBatchKMeans`` when N > ``minibatch_threshold``. k-means on unit vectors is
        spherical-ish k-means (squared Euclidean = 2 - 2 cos).
        ``"agglomerative"``: Ward linkage (scipy, as sklearn uses) on the normalised
        rows. Needs the N(N-1)/2 pairwise distances (8 bytes each), so N above
        ``max_agglomerative`` raises :class:`TreeprobeError` instead of exhausting memory.

    ``n_threads`` caps BLAS/OpenMP threads (threadpoolctl) while clustering; None = library
    defaults. For N of a few thousand, 1 is often faster (and far faster on a busy machine).
    """
    with threadpool_limits(n_threads):
        return _cluster_labels(X, k, method, seed, n_init, minibatch_threshold, max_agglomerative)


def _cluster_labels(X, k, method, seed, n_init, minibatch_threshold, max_agglomerative):
    Xn = l2_normalise(X)
    n = Xn.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise TreeprobeError(f"number of clusters must be in 1..N={n}; got {k}")
    if method == "kmeans":
        if n > minibatch_threshold:
            km = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed,
                                 batch_size=max(4096, 4 * k))
        else:
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        return km.fit_predict(Xn).astype(np.int64)
    if method == "agglomerative":
        _check_agglomerative_size(n, max_agglomerative)
        if k == 1:
            return np.zeros(n, dtype=np.int64)
        return _ward_cuts(Xn, [k])[k]
    raise TreeprobeError(f"unknown clustering method {method!r}; choose from {METHODS}")


def clustering_scores(labels_true, labels_pred) -> dict[str, float]:
    """Purity, NMI (arithmetic normalisation), AMI and ARI of a clustering, as floats.

    Ranges: purity (0, 1]; NMI [0, 1]; AMI and ARI ≤ 1 with 0 = chance level.
    """
    return {name: float(f(labels_true, labels_pred)) for name, f in _SCORERS.items()}


def chance_baseline(
    labels_true,
    labels_pred,
    n_permutations: int = 20,
    seed: int = 0,
    scores: Sequence[str] = ("purity", "nmi", "ami", "ari"),
) -> dict[str, float]:
    """Scores of the clustering next to their values under random permutation.

    ``labels_true`` is permuted ``n_permutations`` times (``np.random.default_rng(seed)``),
    which keeps the number and sizes of both classes and clusters: a random clustering
    of the same shape. Returns, for each name ``s`` in ``scores``: ``s`` (observed),
    ``s_chance`` (mean over permutations) and ``s_chance_sd`` (std, ddof=1; NaN for a
    single permutation), plus

    ``purity_excess = (purity - purity_chance) / (1 - purity_chance)``: 0 at chance,
    1 for pure clusters; NaN when purity_chance == 1 (every cluster a singleton).

    AMI and ARI are already chance-adjusted (expected 0); their chance values are a check.
    """
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    unknown = set(scores) - set(_SCORERS)
    if unknown:
        raise TreeprobeError(f"unknown scores {sorted(unknown)}; choose from {list(_SCORERS)}")
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {s: float(_SCORERS[s](labels_true, labels_pred)) for s in scores}
    perm = {s: [] for s in scores}
    for _ in range(int(n_permutations)):
        shuffled = rng.permutation(labels_true)
        for s in scores:
            perm[s].append(_SCORERS[s](shuffled, labels_pred))
    for s in scores:
        v = np.asarray(perm[s], dtype=float)
        out[f"{s}_chance"] = float(v.mean()) if v.size else np.nan
        out[f"{s}_chance_sd"] = float(v.std(ddof=1)) if v.size > 1 else np.nan
    if "purity" in scores:
        ch = out["purity_chance"]
        out["purity_excess"] = (out["purity"] - ch) / (1.0 - ch) if ch < 1.0 - 1e-12 else np.nan
    return out


_COLUMNS = [
    "rank", "method", "k", "n_items", "n_singleton_taxa",
    "purity", "purity_chance", "purity_chance_sd", "purity_excess",
    "nmi", "nmi_chance", "nmi_chance_sd", "ami", "ari", "ari_chance", "ari_chance_sd", "note",
]


def rankwise_clustering(
    X,
    codes_by_rank: Mapping[str, np.ndarray],
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    n_permutations: int = 20,
    *,
    n_init: int = 4,
    minibatch_threshold: int = 50_000,
    max_agglomerative: int = 10_000,
    n_threads: int | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Cluster ``X`` (N, D; L2-normalised inside) at every rank into k = #taxa and score it.

    For each rank in ``codes_by_rank`` (rank -> int codes (N,), in rank order) and each
    method (see :func:`cluster_labels`), the clustering is scored with
    :func:`clustering_scores` and :func:`chance_baseline` (purity, NMI, ARI chance values
    over ``n_permutations`` label permutations). The Ward tree is built once and cut for
    every rank.

    Returns a tidy DataFrame, one row per (rank, method): rank, method, k, n_items,
    n_singleton_taxa, purity, purity_chance, purity_chance_sd, purity_excess, nmi,
    nmi_chance, nmi_chance_sd, ami, ari, ari_chance, ari_chance_sd, note. Scores are NaN
    with a ``note`` when the rank has a single taxon, when k >= N (every item its own
    taxon) or when agglomerative clustering is refused for size (N > max_agglomerative).
    ``progress``: tqdm bar over ranks (None = only on a terminal). ``n_threads``: see
    :func:`cluster_labels`.
    """
    with threadpool_limits(n_threads):
        return _rankwise_clustering(X, codes_by_rank, methods, seed, n_permutations, n_init,
                                    minibatch_threshold, max_agglomerative, progress)


def _rankwise_clustering(X, codes_by_rank, methods, seed, n_permutations, n_init,
                         minibatch_threshold, max_agglomerative, progress):
    from tqdm.auto import tqdm

    for m in methods:
        if m not in METHODS:
            raise TreeprobeError(f"unknown clustering method {m!r}; choose from {METHODS}")
    Xn = l2_normalise(X)
    n = Xn.shape[0]
    prepared = {}
    for rank, codes in codes_by_rank.items():
        codes = np.asarray(codes)
        if codes.shape != (n,):
            raise TreeprobeError(f"codes for rank {rank!r} have shape {codes.shape}; expected ({n},)")
        _, counts = np.unique(codes, return_counts=True)
        prepared[rank] = (codes, counts)

    def note_for(k: int) -> str:
        if k == 1:
            return "single taxon"
        if k >= n:
            return "k >= n_items (every item its own taxon)"
        return ""

    ward: dict[int, np.ndarray] | None = None
    ward_note = ""
    if "agglomerative" in methods:
        ks = [c.size for _, c in prepared.values() if not note_for(c.size)]
        try:
            _check_agglomerative_size(n, max_agglomerative)
            ward = _ward_cuts(Xn, ks) if ks else {}
        except TreeprobeError as e:
            ward_note = f"agglomerative skipped: {e}"

    rows = []
    bar = tqdm(prepared.items(), desc="clustering ranks", total=len(prepared),
               disable=None if progress is None else not progress)
    for rank, (codes, counts) in bar:
        k = int(counts.size)
        for method in methods:
            row = dict.fromkeys(_COLUMNS, np.nan)
            row.update(rank=rank, method=method, k=k, n_items=n,
                       n_singleton_taxa=int((counts == 1).sum()), note=note_for(k))
            if method == "agglomerative" and ward is None and not row["note"]:
                row["note"] = ward_note
            if not row["note"]:
                if method == "kmeans":
                    pred = cluster_labels(Xn, k, "kmeans", seed, n_init=n_init,
                                          minibatch_threshold=minibatch_threshold)
                else:
                    pred = ward[k]
                row.update(clustering_scores(codes, pred))
                base = chance_baseline(codes, pred, n_permutations, seed,
                                       scores=("purity", "nmi", "ari"))
                row.update({key: val for key, val in base.items() if key in _COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)
