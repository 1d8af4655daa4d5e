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
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from sklearn.metrics.cluster import contingency_matrix, mutual_info_score
from scipy import sparse
from scipy.special import gammaln

from treeprobe.errors import TreeprobeError
from treeprobe._utils import SEED_BOUND, l2_normalise
from treeprobe._validation import check_choice, check_codes
from treeprobe.neighbors import _unknown_mask

__all__ = [
    "purity_score",
    "cluster_labels",
    "clustering_scores",
    "chance_baseline",
    "rankwise_clustering",
    "adjusted_mutual_info",
    "expected_mutual_info",
    "kmeans_plusplus_seeds",
    "METHODS",
    "SCORES",
    "MINIBATCH_THRESHOLD",
    "MAX_AGGLOMERATIVE",
    "N_INIT",
]

#: Clustering methods of :func:`cluster_labels` and :func:`rankwise_clustering`.
METHODS = ("kmeans", "agglomerative")
#: Above this many items k-means is mini-batch k-means in float32 (:func:`_kmeans_large`). Full
#: ``KMeans`` is exact and quick up to tens of thousands of items but impractical beyond (with
#: scikit-learn's k-means++ it takes hours at k = 10,000 species, N = 100,000).
MINIBATCH_THRESHOLD = 50_000
#: Largest N for Ward clustering: its N(N−1)/2 float64 pairwise distances are 0.4 GB at 10,000
#: (and grow with N²: 10 GB at 50,000).
MAX_AGGLOMERATIVE = 10_000
#: Default k-means restarts (``n_init``): the best of 4 seedings by inertia.
N_INIT = 4

# Mini-batch k-means settings (see _kmeans_large for the measurements behind them):
_MIN_BATCH = 32768  # smallest batch (rows); batches are max(this, 4k), at most N
_MIN_SEED_SAMPLE = 10_000  # rows sampled for the k-means++ seeding: max(3k, this), at most N
_SEED_DIM = 64  # principal components the k-means++ seeding works in
_KPP_MAX_K = 1000  # above this k, seeds are k distinct random rows (Forgy), not k-means++
_MULTI_INIT_MAX_K = 256  # n_init seedings are compared only up to this k (one seeding above)
_MAX_EPOCHS = 3  # passes over the data
# (pair, n_ij) terms per vectorised chunk of the expected mutual information: 4M float64 terms,
# ~32 MB per temporary array.
_EMI_CHUNK_TERMS = 1 << 22

_SCORERS = {
    "purity": lambda t, p: purity_score(t, p),
    "nmi": normalized_mutual_info_score,
    "ami": lambda t, p: adjusted_mutual_info(t, p),
    "ari": adjusted_rand_score,
}
#: Scores :func:`clustering_scores` and :func:`chance_baseline` compute.
SCORES = tuple(_SCORERS)
_EPS = np.finfo("float64").eps


def purity_score(labels_true, labels_pred) -> float:
    """Purity = Σ_clusters max_class |cluster ∩ class| / N, in (0, 1].

    ``labels_true`` and ``labels_pred`` are label arrays of shape (N,). 1 means every
    cluster holds a single class (trivially so when every item is its own cluster).

    >>> purity_score([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])  # clusters {0,0} {0,1} {1,1}: (2 + 1 + 2) / 6
    0.8333333333333334
    >>> purity_score([0, 0, 1, 1], [0, 1, 2, 3])  # singletons are pure by construction
    1.0
    """
    c = contingency_matrix(labels_true, labels_pred, sparse=True)  # classes x clusters
    return float(np.asarray(c.max(axis=0).todense()).sum() / c.sum())


def _entropy_counts(counts) -> float:
    """Entropy (nats) of a labelling from its class sizes, as sklearn computes it."""
    pi = np.asarray(counts, dtype=np.float64)
    if pi.size <= 1:
        return 0.0
    pi_sum = pi.sum()
    return float(-np.sum((pi / pi_sum) * (np.log(pi) - np.log(pi_sum))))


def expected_mutual_info(a, b, n: int, *, max_terms: int = _EMI_CHUNK_TERMS) -> float:
    """Expected mutual information (nats) of two random labellings of ``n`` items with class
    sizes ``a`` (int, (n_classes,)) and ``b`` (int, (n_clusters,)).

    The hypergeometric model of Vinh, Epps & Bailey (2010), term for term as in
    scikit-learn's ``expected_mutual_information``, but summed once per pair of *distinct*
    sizes (a, b) weighted by how often each pair occurs: the same value, at a cost of
    (#distinct a) x (#distinct b) x min(a, b) instead of (#classes) x (#clusters) x min(a, b)
    (k = 10,000 species of 10 images: 3 minutes in scikit-learn, milliseconds here).
    ``max_terms`` bounds the terms summed per vectorised chunk (memory, not the result).
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    if a.size <= 1 or b.size <= 1:
        return 0.0
    n = int(n)
    ua, ca = np.unique(a, return_counts=True)
    ub, cb = np.unique(b, return_counts=True)
    A = np.repeat(ua, ub.size)
    B = np.tile(ub, ua.size)
    W = (np.repeat(ca, ub.size) * np.tile(cb, ua.size)).astype(np.float64)
    start = np.maximum(1, A - n + B)
    length = np.maximum(np.minimum(A, B) + 1 - start, 0)
    log_n, gln_n = np.log(n), gammaln(n + 1)
    emi = 0.0
    ends = np.cumsum(length)
    p0 = 0
    while p0 < A.size:  # chunks of pairs with at most ~max_terms (pair, n_ij) terms
        p1 = int(np.searchsorted(ends, (ends[p0 - 1] if p0 else 0) + max_terms, side="right"))
        p1 = max(p1, p0 + 1)
        L = length[p0:p1]
        pair = np.repeat(np.arange(p0, p1), L)
        if pair.size:
            nij = (start[pair] + np.arange(pair.size) - np.repeat(np.cumsum(L) - L, L)).astype(np.float64)
            a_, b_ = A[pair].astype(np.float64), B[pair].astype(np.float64)
            term1 = nij / n
            term2 = (log_n + np.log(nij)) - np.log(a_) - np.log(b_)
            gln = (gammaln(a_ + 1) + gammaln(b_ + 1) + gammaln(n - a_ + 1) + gammaln(n - b_ + 1)
                   - (gammaln(nij + 1) + gln_n) - gammaln(a_ - nij + 1) - gammaln(b_ - nij + 1)
                   - gammaln(n - a_ - b_ + nij + 1))
            emi += float(np.sum(W[pair] * (term1 * term2 * np.exp(gln))))
        p0 = p1
    return emi


def _ami_from(mi: float, emi: float, h_true: float, h_pred: float) -> float:
    """AMI (arithmetic normalisation) from its parts, with scikit-learn's guards."""
    denominator = 0.5 * (h_true + h_pred) - emi
    denominator = min(denominator, -_EPS) if denominator < 0 else max(denominator, _EPS)
    numerator = mi - emi
    numerator = min(numerator, -_EPS) if numerator < 0 else max(numerator, _EPS)
    return float(numerator / denominator)


def adjusted_mutual_info(labels_true, labels_pred) -> float:
    """Adjusted mutual information (arithmetic normalisation) of two labellings (N,), ≤ 1 with
    0 at chance: equal to scikit-learn's ``adjusted_mutual_info_score`` (to rounding) but with
    :func:`expected_mutual_info`, so it stays fast at thousands of classes and clusters."""
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    _, ti, a = np.unique(labels_true, return_inverse=True, return_counts=True)
    _, pi, b = np.unique(labels_pred, return_inverse=True, return_counts=True)
    if a.size == b.size == 1 or a.size == b.size == 0:
        return 1.0
    if a.size == 1 or b.size == 1:
        return 0.0
    c = _contingency(ti.ravel(), pi.ravel(), a.size, b.size)
    mi = mutual_info_score(None, None, contingency=c)
    emi = expected_mutual_info(a, b, labels_true.shape[0])
    return _ami_from(mi, emi, _entropy_counts(a), _entropy_counts(b))


def _contingency(ti: np.ndarray, pi: np.ndarray, n_classes: int, n_clusters: int) -> sparse.csr_matrix:
    """Sparse int64 contingency matrix (classes x clusters) from dense codes."""
    c = sparse.coo_matrix((np.ones(ti.size, dtype=np.int64), (ti, pi)), shape=(n_classes, n_clusters))
    c = c.tocsr()
    c.sum_duplicates()
    return c


class _PermutationScorer:
    """Purity, NMI, AMI and ARI of (permuted labels_true, labels_pred) from one contingency matrix.

    The marginals do not change under permutation, so entropies and the expected mutual
    information are computed once; each permutation costs one sparse contingency matrix.
    Values equal scikit-learn's scores (to rounding).
    """

    def __init__(self, labels_true, labels_pred):
        _, self.ti, self.a = np.unique(np.asarray(labels_true), return_inverse=True, return_counts=True)
        _, self.pi, self.b = np.unique(np.asarray(labels_pred), return_inverse=True, return_counts=True)
        self.ti, self.pi = self.ti.ravel(), self.pi.ravel()
        self.n = self.ti.size
        self.h_true, self.h_pred = _entropy_counts(self.a), _entropy_counts(self.b)
        self._emi = None

    def scores(self, perm: np.ndarray | None, names) -> dict[str, float]:
        """The scores ``names`` of (labels_true[perm], labels_pred); perm None: unpermuted."""
        ti = self.ti if perm is None else self.ti[perm]
        c = _contingency(ti, self.pi, self.a.size, self.b.size)
        n, out = self.n, {}
        one_one = self.a.size == self.b.size == 1
        need_mi = "nmi" in names or "ami" in names
        mi = mutual_info_score(None, None, contingency=c.astype(np.float64)) if need_mi else 0.0
        for s in names:
            if s == "purity":
                out[s] = float(np.asarray(c.max(axis=0).todense()).sum() / n)
            elif s == "nmi":
                out[s] = 1.0 if one_one else (0.0 if mi == 0 else float(mi / (0.5 * (self.h_true + self.h_pred))))
            elif s == "ami":
                if one_one:
                    out[s] = 1.0
                elif self.a.size == 1 or self.b.size == 1:
                    out[s] = 0.0
                else:
                    if self._emi is None:
                        self._emi = expected_mutual_info(self.a, self.b, n)
                    out[s] = _ami_from(mi, self._emi, self.h_true, self.h_pred)
            elif s == "ari":
                n_k = self.b.astype(np.int64)
                n_c = self.a.astype(np.int64)
                ss = int((c.data.astype(np.int64) ** 2).sum())
                fp = int(c.dot(n_k).sum()) - ss  # C[0, 1]
                fn = int(c.T.dot(n_c).sum()) - ss  # C[1, 0]
                tp = ss - n
                tn = n * n - fp - fn - ss
                out[s] = 1.0 if fn == 0 and fp == 0 else \
                    2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
        return out


def kmeans_plusplus_seeds(Z: np.ndarray, k: int, rng: np.random.Generator, *,
                          n_trials: int | None = None) -> np.ndarray:
    """Row indices (int64 (k,)) of ``k`` k-means++ seeds of ``Z`` (m, d): D^2 sampling
    (Arthur & Vassilvitskii 2007), drawn from ``rng``.

    Greedy like scikit-learn's: each step draws ``n_trials`` candidates (default
    2 + int(ln k)) and keeps the one that lowers the potential most. Written for many
    seeds: one small matrix product per seed, O(k * n_trials * m * d) in all.
    """
    Z = np.asarray(Z, dtype=np.float64)
    m = Z.shape[0]
    k = int(k)
    if not 1 <= k <= m:
        raise TreeprobeError(f"k-means++ needs 1 <= k <= {m} points; got k={k}")
    n_trials = 2 + int(np.log(k)) if n_trials is None else max(int(n_trials), 1)
    sq = np.einsum("ij,ij->i", Z, Z)
    seeds = np.empty(k, dtype=np.int64)
    seeds[0] = rng.integers(m)
    d2 = np.maximum(sq + sq[seeds[0]] - 2.0 * (Z @ Z[seeds[0]]), 0.0)
    d2[seeds[0]] = 0.0
    pot = d2.sum()
    for c in range(1, k):
        if pot <= 0:  # fewer distinct points than k: fill with unused rows
            rest = np.setdiff1d(np.arange(m), seeds[:c])[: k - c]
            seeds[c:] = rest
            break
        cand = np.searchsorted(np.cumsum(d2), rng.random(n_trials) * pot)
        cand = np.minimum(cand, m - 1)
        D = sq[cand][:, None] + sq[None, :] - 2.0 * (Z[cand] @ Z.T)
        np.maximum(D, 0.0, out=D)
        np.minimum(D, d2[None, :], out=D)
        pots = D.sum(axis=1)
        best = int(np.argmin(pots))
        seeds[c] = cand[best]
        d2 = D[best]
        d2[cand[best]] = 0.0
        pot = pots[best]
    return seeds


def _pca_project(X: np.ndarray, d: int) -> np.ndarray:
    """Rows of ``X`` (m, D) on their top ``d`` principal components, float64 (m, d).

    From the eigenvectors of the D x D covariance (one m x D x D product, a general one: no
    syrk), not an SVD of X: seconds instead of a minute for m = 10,000 here.
    """
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(axis=0)
    cov = Xc.T @ Xc.copy()  # a copy: numpy would take the syrk path for Xc.T @ Xc
    _, vecs = np.linalg.eigh(cov)
    return Xc @ vecs[:, ::-1][:, :d]


def _kmeans_large(Xn: np.ndarray, k: int, seed: int, n_init: int, *, batch_size: int | None = None,
                  max_epochs: int = _MAX_EPOCHS, seed_dim: int = _SEED_DIM, seed_sample: int | None = None,
                  seed_trials: int | None = None, kpp_max_k: int = _KPP_MAX_K) -> np.ndarray:
    """Mini-batch k-means for large N and k: float32, few epochs, cheap seeding.

    1. Seeds, for k <= ``kpp_max_k`` (1000): greedy k-means++ (:func:`kmeans_plusplus_seeds`)
       on a seeded random sample of ``max(3k, 10,000)`` rows (at most N), in the sample's top
       ``seed_dim`` principal components; the seeds are those rows in full dimension.
       (scikit-learn's own k-means++ re-reads the whole ``init_size`` x D sample for every
       seed: at k = 10,000 it ran > 12 min here without finishing.) For larger k: k distinct
       random rows (Forgy). Measured at k = 10,000 species, N = 100,000 (synthetic iNat21):
       purity 0.533 with PCA k-means++ seeds vs 0.538 with random rows, for 2.5x the time.
    2. ``MiniBatchKMeans`` from those seeds on the float32 rows: batches of
       ``batch_size`` (default ``min(N, max(32768, 4k))``: at k = 10,000, batches of 32768
       gave purity 0.54 against 0.44 for 8192 and 0.41 for 2048, at about the same cost per
       epoch), at most ``max_epochs`` passes (plus scikit-learn's early stopping), then one
       labelling pass over all rows.
    3. ``n_init`` k-means++ seedings while k <= 256 (one above), the one with the lowest
       inertia on the sample kept (as scikit-learn's ``MiniBatchKMeans`` does with ``n_init``);
       then a single mini-batch run.

    Cost: about (max_epochs + 1) * N * k * D multiply-adds in float32 BLAS; memory
    O(N * D + k * D + batch_size * k).
    """
    n = Xn.shape[0]
    X32 = np.ascontiguousarray(Xn, dtype=np.float32)
    batch = min(n, max(_MIN_BATCH, 4 * k)) if batch_size is None else int(batch_size)
    m = min(n, max(3 * k, _MIN_SEED_SAMPLE) if seed_sample is None else max(int(seed_sample), k))
    runs = max(int(n_init), 1) if k <= _MULTI_INIT_MAX_K else 1
    rng = np.random.default_rng(seed)
    if k > kpp_max_k:
        init = X32[np.sort(rng.choice(n, size=k, replace=False))]
    else:
        init = _best_kpp_seeds(X32, k, rng, m, runs, seed_dim, seed_trials)
    km = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, batch_size=batch, max_iter=max_epochs,
                         random_state=int(rng.integers(SEED_BOUND)))
    best_labels = km.fit(X32).labels_.astype(np.int64)
    return best_labels


def _best_kpp_seeds(X32: np.ndarray, k: int, rng: np.random.Generator, m: int, runs: int, seed_dim: int,
                    seed_trials: int | None) -> np.ndarray:
    """Step 1 and 3 of :func:`_kmeans_large`: the rows (k, D) of the best of ``runs`` k-means++
    seedings (lowest inertia) on a random sample of ``m`` rows, seeded in ``seed_dim`` PCA dims."""
    n, dim = X32.shape
    sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    Xs = X32[sample]
    d = min(seed_dim, dim, m)
    Z = _pca_project(Xs, d) if d < dim else Xs
    best_inertia = np.inf
    for _ in range(runs):  # like scikit-learn's MiniBatchKMeans n_init: best seeds on the sample
        with threadpool_limits(1):  # one small product per seed: threads only add overhead
            cand = Xs[kmeans_plusplus_seeds(Z, k, rng, n_trials=seed_trials)]
        if runs == 1:
            return cand
        d2 = (np.einsum("ij,ij->i", Xs, Xs)[:, None] + np.einsum("ij,ij->i", cand, cand)[None, :]
              - 2.0 * (Xs @ cand.T)).min(axis=1)
        inertia = float(np.maximum(d2, 0).sum())
        if inertia < best_inertia:
            init, best_inertia = cand, inertia
    return init


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
    *,
    seed: int = 0,
    n_init: int = N_INIT,
    minibatch_threshold: int = MINIBATCH_THRESHOLD,
    max_agglomerative: int = MAX_AGGLOMERATIVE,
    n_threads: int | None = None,
) -> np.ndarray:
    """Cluster the L2-normalised rows of ``X`` (N, D) into ``k`` clusters; int64 labels (N,).

    method
        ``"kmeans"``: sklearn ``KMeans`` (``n_init`` restarts, ``random_state=seed``) up to
        N = ``minibatch_threshold``; above it mini-batch k-means in float32 with k-means++
        seeds drawn in PCA space and at most 3 epochs (see :func:`_kmeans_large`: k = 10,000
        species at N = 100,000 in minutes, where full k-means with scikit-learn's k-means++
        takes hours). k-means on unit vectors is spherical-ish k-means (squared Euclidean
        = 2 - 2 cos).
        ``"agglomerative"``: Ward linkage (scipy, as sklearn uses) on the normalised
        rows. Needs the N(N-1)/2 pairwise distances (8 bytes each), so N above
        ``max_agglomerative`` raises :class:`TreeprobeError` instead of exhausting memory.

    ``n_threads`` caps BLAS/OpenMP threads (threadpoolctl) while clustering; None = library
    defaults. For N of a few thousand, 1 is often faster (and far faster on a busy machine).
    """
    with threadpool_limits(n_threads):
        return _cluster_labels(X, k, method, seed, n_init, minibatch_threshold, max_agglomerative)


def _cluster_labels(X, k, method, seed, n_init, minibatch_threshold, max_agglomerative):
    check_choice(method, "clustering method", METHODS)
    Xn = l2_normalise(X)
    n = Xn.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise TreeprobeError(f"number of clusters must be in 1..N={n}; got {k}")
    if method == "kmeans":
        return _kmeans(Xn, k, seed, n_init, minibatch_threshold)
    _check_agglomerative_size(n, max_agglomerative)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    return _ward_cuts(Xn, [k])[k]


def _kmeans(Xn: np.ndarray, k: int, seed: int, n_init: int, minibatch_threshold: int) -> np.ndarray:
    """k-means labels of normalised rows: full ``KMeans`` up to ``minibatch_threshold`` rows,
    :func:`_kmeans_large` (mini-batch, float32) above."""
    if Xn.shape[0] > minibatch_threshold:
        return _kmeans_large(Xn, k, seed, n_init)
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(Xn).astype(np.int64)


def clustering_scores(labels_true, labels_pred) -> dict[str, float]:
    """Purity, NMI (arithmetic normalisation), AMI and ARI of a clustering (label arrays (N,)), as floats.

    Ranges: purity (0, 1]; NMI [0, 1]; AMI and ARI ≤ 1 with 0 = chance level.
    """
    return {name: float(f(labels_true, labels_pred)) for name, f in _SCORERS.items()}


def chance_baseline(
    labels_true,
    labels_pred,
    n_permutations: int = 20,
    *,
    seed: int = 0,
    scores: Sequence[str] = SCORES,
) -> dict[str, float]:
    """Scores of the clustering (label arrays (N,)) next to their values under random permutation.

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
    scorer = _PermutationScorer(labels_true, labels_pred)
    for _ in range(int(n_permutations)):
        # rng.permutation(labels_true) == labels_true[rng.permutation(N)] (same stream)
        vals = scorer.scores(rng.permutation(labels_true.shape[0]), scores)
        for s in scores:
            perm[s].append(vals[s])
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
    "n_unknown",
]
_CHANCE_SCORES = ("purity", "nmi", "ari")  # the chance values rankwise_clustering reports


def rankwise_clustering(
    X,
    codes_by_rank: Mapping[str, np.ndarray],
    *,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    n_permutations: int = 20,
    n_init: int = N_INIT,
    minibatch_threshold: int = MINIBATCH_THRESHOLD,
    max_agglomerative: int = MAX_AGGLOMERATIVE,
    n_threads: int | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Cluster ``X`` (N, D; L2-normalised inside) at every rank into k = #taxa and score it.

    For each rank in ``codes_by_rank`` (rank -> int codes (N,), in rank order; -1 = taxon
    unknown at that rank) and each method (see :func:`cluster_labels`), the clustering is
    scored with :func:`clustering_scores` and :func:`chance_baseline` (purity, NMI, ARI chance
    values over ``n_permutations`` label permutations). A rank is clustered and scored on the
    items known at it only: k = number of known taxa, the permutations shuffle the known items'
    labels, and the items with code -1 are counted in ``n_unknown``. The Ward tree is built
    once per distinct set of known items (once in all when no code is -1) and cut for every
    rank that has that set.

    Returns a tidy DataFrame, one row per (rank, method): rank, method, k (known taxa),
    n_items (items clustered: the known ones), n_singleton_taxa, purity, purity_chance,
    purity_chance_sd, purity_excess, nmi, nmi_chance, nmi_chance_sd, ami, ari, ari_chance,
    ari_chance_sd, note, n_unknown. Scores are NaN with a ``note`` when the rank has a single
    taxon, when k >= n_items (every item its own taxon), when no item is known at the rank,
    or when agglomerative clustering is refused for size (n_items > max_agglomerative).
    ``progress``: tqdm bar over ranks (None = only on a terminal). ``n_threads``: see
    :func:`cluster_labels`.
    """
    with threadpool_limits(n_threads):
        return _rankwise_clustering(X, codes_by_rank, methods, seed, n_permutations, n_init,
                                    minibatch_threshold, max_agglomerative, progress)


def _skip_note(k: int, n: int) -> str:
    """Why a rank with ``k`` taxa over ``n`` items is not clustered ('' if it is)."""
    if n == 0:
        return "every item unknown at this rank"
    if k == 1:
        return "single taxon"
    if k >= n:
        return "k >= n_items (every item its own taxon)"
    return ""


def _ward_for_ranks(Xn: np.ndarray, ks: Sequence[int], max_agglomerative: int):
    """(Ward labels by k, or None if refused for size; the note saying why)."""
    try:
        _check_agglomerative_size(Xn.shape[0], max_agglomerative)
        return (_ward_cuts(Xn, ks) if ks else {}), ""
    except TreeprobeError as e:
        return None, f"agglomerative skipped: {e}"


def _rankwise_clustering(X, codes_by_rank, methods, seed, n_permutations, n_init,
                         minibatch_threshold, max_agglomerative, progress):
    from tqdm.auto import tqdm

    for m in methods:
        check_choice(m, "clustering method", METHODS)
    Xn = l2_normalise(X)
    n = Xn.shape[0]
    prepared = {}
    for rank, codes in codes_by_rank.items():
        codes = check_codes(codes, n, rank)
        known = ~_unknown_mask(codes)
        _, counts = np.unique(codes[known], return_counts=True)
        prepared[rank] = (known, np.packbits(known).tobytes(), codes[known], counts)

    # one Ward tree per distinct set of known items (key: the packed mask), cut at every k of
    # the ranks that share it: (labels by k or None if refused for size, the note saying why)
    ward: dict[bytes, tuple] = {}
    if "agglomerative" in methods:
        groups: dict[bytes, tuple] = {}
        for known, key, _, counts in prepared.values():
            if not _skip_note(counts.size, int(known.sum())):
                groups.setdefault(key, (known, []))[1].append(counts.size)
        for key, (known, ks) in groups.items():
            ward[key] = _ward_for_ranks(Xn if known.all() else Xn[known], ks, max_agglomerative)

    # k-means works on float32 rows above the mini-batch threshold (one copy for all ranks)
    Xk = np.ascontiguousarray(Xn, dtype=np.float32) if n > minibatch_threshold else Xn
    rows = []
    bar = tqdm(prepared.items(), desc="clustering ranks", total=len(prepared),
               disable=None if progress is None else not progress)
    for rank, (known, key, codes, counts) in bar:
        k = int(counts.size)
        n_known = int(known.sum())
        for method in methods:
            row = dict.fromkeys(_COLUMNS, np.nan)
            row.update(rank=rank, method=method, k=k, n_items=n_known, n_unknown=n - n_known,
                       n_singleton_taxa=int((counts == 1).sum()), note=_skip_note(k, n_known))
            cuts, ward_note = ward.get(key, (None, ""))
            if method == "agglomerative" and cuts is None and not row["note"]:
                row["note"] = ward_note
            if not row["note"]:
                if method == "kmeans":
                    src = Xk if n_known > minibatch_threshold else Xn
                    pred = _kmeans(src if n_known == n else src[known], k, seed, n_init, minibatch_threshold)
                else:
                    pred = cuts[k]
                row.update(clustering_scores(codes, pred))
                base = chance_baseline(codes, pred, n_permutations, seed=seed, scores=_CHANCE_SCORES)
                row.update({key: val for key, val in base.items() if key in _COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS)
