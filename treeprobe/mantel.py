"""Mantel tests: does embedding distance grow with distance on the tree of life?

Two forms, one statistic.

:func:`mantel` is the textbook test on two square distance matrices (the form of
scikit-bio's ``mantel``): the correlation r between the upper triangles, and a
permutation p-value from jointly permuting rows and columns of one matrix.

:func:`mantel_tree` is the same test between the cosine distance of embeddings
and the patristic distance on a tree, computed *exactly without any N×N matrix*
for Pearson. For unit vectors, d_ij = 1 − x_i·x_j, and a tree distance is a sum of
edge lengths w_C over the edges that separate i and j, so

    Σ_{i<j} d_ij t_ij = Σ_C w_C Σ_{i∈C, j∉C} (1 − x_i·x_j)
                      = Σ_C w_C [ |C|(N−|C|) − S_C·(S − S_C) ],

with S_C the vector sum of the embeddings in clade C and S the sum of all. A
permutation of the items only changes the clade sums S_C: O(N·D) per permutation.
Σ_{i<j} d_ij² needs ‖XᵀX‖²_F once (O(N·D²)); Σ t and Σ t² come from clade sizes
and one post-order pass. Pearson r is then

    r = (P·Σdt − Σd·Σt) / sqrt((P·Σd² − (Σd)²)(P·Σt² − (Σt)²)),   P = N(N−1)/2.

Spearman is Pearson on the ranks of the pairwise distances, which does not split
over clades: it is computed exactly with the matrix form up to ``spearman_max_n``
items, and above that estimated on random item subsamples (named as such in the
result).

p-values follow scikit-bio: (#{permuted r at least as extreme} + 1) / (permutations + 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.stats
from scipy.spatial.distance import squareform

from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import CladeStructure

ALTERNATIVES = ("greater", "less", "two-sided")
METHODS = ("pearson", "spearman")


@dataclass
class MantelResult:
    """Outcome of a Mantel test.

    statistic: correlation r between the pairwise distances. p_value: permutation
    p-value (NaN when permutations == 0). estimator: 'exact' or how it was estimated.
    ci: (low, high) spread of the estimate over item subsamples, when estimated.
    """

    statistic: float
    p_value: float
    method: str
    alternative: str
    permutations: int
    n_items: int
    n_pairs: int
    estimator: str = "exact"
    ci: tuple[float, float] | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        return d


def _check_args(method: str, alternative: str, permutations: int):
    if method not in METHODS:
        raise TreeprobeError(f"unknown Mantel method {method!r}; choose from {', '.join(METHODS)}")
    if alternative not in ALTERNATIVES:
        raise TreeprobeError(f"unknown alternative {alternative!r}; choose from {', '.join(ALTERNATIVES)}")
    if permutations < 0:
        raise TreeprobeError("permutations must be >= 0")


def permutation_p_value(observed: float, permuted: np.ndarray, alternative: str) -> float:
    """(#{permuted at least as extreme as observed} + 1) / (len(permuted) + 1); NaN if none."""
    permuted = np.asarray(permuted)
    if permuted.size == 0 or not np.isfinite(observed):
        return float("nan")
    if alternative == "greater":
        hits = np.sum(permuted >= observed)
    elif alternative == "less":
        hits = np.sum(permuted <= observed)
    else:
        hits = np.sum(np.abs(permuted) >= abs(observed))
    return float((hits + 1) / (permuted.size + 1))


def _as_square(m: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(m, dtype=float)
    if m.ndim == 1:
        m = squareform(m, checks=False)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise TreeprobeError(f"{name} must be a square distance matrix or a condensed vector")
    if not np.isfinite(m).all():
        raise TreeprobeError(f"{name} has non-finite values")
    return m


def mantel(x, y, method: str = "pearson", permutations: int = 999, alternative: str = "two-sided",
           seed: int | None = 0) -> MantelResult:
    """Mantel test between two distance matrices (square (n, n) or condensed).

    r is the Pearson (or Spearman: Pearson of average ranks) correlation of the
    upper triangles; the p-value permutes rows and columns of ``x`` jointly.
    Memory O(n²); see :func:`mantel_tree` for embeddings against a tree at scale.
    """
    _check_args(method, alternative, permutations)
    X = _as_square(x, "x")
    Y = _as_square(y, "y")
    n = X.shape[0]
    if Y.shape[0] != n:
        raise TreeprobeError(f"distance matrices differ in size: {n} vs {Y.shape[0]}")
    if n < 3:
        raise TreeprobeError("a Mantel test needs at least 3 items")
    iu = np.triu_indices(n, k=1)
    xf, yf = X[iu], Y[iu]
    if method == "spearman":
        xf = scipy.stats.rankdata(xf)
        yf = scipy.stats.rankdata(yf)
        X = squareform(xf, checks=False)
    xs = xf - xf.mean()
    ys = yf - yf.mean()
    nx, ny = np.linalg.norm(xs), np.linalg.norm(ys)
    if nx == 0 or ny == 0:
        raise TreeprobeError("a distance matrix is constant: the correlation is undefined")
    ys /= ny
    r = float(xs @ ys / nx)
    perm_stats = np.empty(permutations)
    rng = np.random.default_rng(seed)
    xmean = xf.mean()
    for k in range(permutations):
        p = rng.permutation(n)
        xp = X[np.ix_(p, p)][iu] - xmean
        perm_stats[k] = xp @ ys / nx
    return MantelResult(
        statistic=r, p_value=permutation_p_value(r, perm_stats, alternative), method=method,
        alternative=alternative, permutations=permutations, n_items=n, n_pairs=len(xf),
    )


def cosine_distance_matrix(X: np.ndarray) -> np.ndarray:
    """1 − cos(x_i, x_j) for rows of X (N, D), float64 (N, N), zero diagonal."""
    Xn = normalize_rows(X)
    D = 1.0 - Xn @ Xn.T
    np.fill_diagonal(D, 0.0)
    return np.maximum(D, 0.0, out=D)


def normalize_rows(X: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows of X scaled to unit L2 norm, as ``dtype``. Raises on zero or non-finite rows."""
    X = np.asarray(X, dtype=dtype)
    if X.ndim != 2:
        raise TreeprobeError(f"embeddings must be a 2-D array (N, D), got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1)
    if not np.isfinite(norms).all():
        raise TreeprobeError("embeddings contain NaN or infinite values")
    if (norms == 0).any():
        raise TreeprobeError(f"{int((norms == 0).sum())} embedding(s) have zero norm")
    return X / norms[:, None]


def taxon_centroids(X: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Unit-norm mean of the unit-normalised rows of X per taxon code, float64 (n_taxa, D)."""
    Xn = normalize_rows(X)
    n_taxa = int(codes.max()) + 1
    C = np.zeros((n_taxa, Xn.shape[1]))
    np.add.at(C, codes, Xn)
    norms = np.linalg.norm(C, axis=1)
    norms[norms == 0] = 1.0
    return C / norms[:, None]


# --- the exact clade-sum form -------------------------------------------------


def _tree_pair_sums(clades: CladeStructure) -> tuple[float, float]:
    """Σ_{i<j} t_ij and Σ_{i<j} t_ij² over item pairs, from clade sizes and one post-order pass."""
    N = clades.n_items
    size = clades.items_per_node().astype(float)
    w = clades.length
    sum_t = float(np.sum(w * size * (N - size)))
    # post-order: per node, items below it with Σ distance and Σ distance² to the node
    n = np.bincount(clades.item_node, minlength=clades.n_nodes).astype(float)
    a = np.zeros(clades.n_nodes)
    b = np.zeros(clades.n_nodes)
    sum_t2 = 0.0
    parent = clades.parent
    for v in range(clades.n_nodes - 1, 0, -1):
        if n[v] == 0:
            continue
        wv = w[v]
        av = a[v] + n[v] * wv
        bv = b[v] + 2.0 * wv * a[v] + n[v] * wv * wv
        u = parent[v]
        sum_t2 += n[u] * bv + n[v] * b[u] + 2.0 * a[u] * av
        n[u] += n[v]
        a[u] += av
        b[u] += bv
    return sum_t, sum_t2


class _CladeSums:
    """Clade vector sums S_C of permuted embeddings: leaf sums by a sorted reduceat, then
    a sparse ancestor matrix to every clade. Memory O(N·D + n_nodes·D)."""

    def __init__(self, clades: CladeStructure):
        order = np.argsort(clades.item_node, kind="stable")
        leaves, starts = np.unique(clades.item_node[order], return_index=True)
        self.order = order
        self.starts = starts
        self.up = clades.ancestor_matrix()[:, leaves].tocsr()  # (n_nodes, n_leaves)

    def __call__(self, Xn: np.ndarray, perm: np.ndarray | None = None) -> np.ndarray:
        idx = self.order if perm is None else perm[self.order]
        leaf_sums = np.add.reduceat(Xn[idx], self.starts, axis=0, dtype=np.float64)
        return np.asarray(self.up @ leaf_sums)


def mantel_tree(X: np.ndarray, clades: CladeStructure, method: str = "pearson", permutations: int = 999,
                alternative: str = "greater", seed: int | None = 0, spearman_max_n: int = 6000,
                spearman_repeats: int = 5, perm_dtype=np.float32, progress: bool = False) -> MantelResult:
    """Mantel test between embedding cosine distance and tree distance.

    X: (N, D) embeddings (normalised here), row i sitting at ``clades.item_node[i]``.
    Tree distance t_ij = patristic distance (sum of edge lengths) between the items' nodes.
    Pearson: exact, no N×N matrix (module docstring), O(N·D) per permutation.
    Spearman: exact via :func:`mantel` for N ≤ ``spearman_max_n``; above it, the test is run on
    a random subsample of ``spearman_max_n`` items and ``ci`` gives the 2.5–97.5 % range of r
    over ``spearman_repeats`` more subsamples (estimator 'item-subsample').
    """
    _check_args(method, alternative, permutations)
    N = clades.n_items
    if X.shape[0] != N:
        raise TreeprobeError(f"{X.shape[0]} embeddings but {N} items in the tree")
    if N < 3:
        raise TreeprobeError("a Mantel test needs at least 3 items")
    rng = np.random.default_rng(seed)
    if method == "spearman":
        return _spearman_tree(X, clades, permutations, alternative, rng, spearman_max_n, spearman_repeats)

    Xn = normalize_rows(X)
    P = N * (N - 1) / 2.0
    S = Xn.sum(axis=0)
    SS = float(S @ S)
    sum_d = P - (SS - N) / 2.0
    G = Xn.T @ Xn
    sum_c2 = (float(np.sum(G * G)) - N) / 2.0
    sum_d2 = P - (SS - N) + sum_c2
    sum_t, sum_t2 = _tree_pair_sums(clades)
    var_d = P * sum_d2 - sum_d ** 2
    var_t = P * sum_t2 - sum_t ** 2
    if var_t <= 0:
        raise TreeprobeError("all items are at the same tree distance: the correlation is undefined")
    if var_d <= 0:
        raise TreeprobeError("all embeddings are at the same distance: the correlation is undefined")
    w = clades.length
    sums = _CladeSums(clades)

    def cross(Sc: np.ndarray) -> float:
        # Σ_C w_C (S_C·S − ‖S_C‖²)
        return float(w @ (Sc @ S) - w @ np.einsum("ij,ij->i", Sc, Sc))

    def corr(sum_dt: float) -> float:
        return (P * sum_dt - sum_d * sum_t) / np.sqrt(var_d * var_t)

    r = corr(sum_t - cross(sums(Xn)))
    perm_stats = np.empty(permutations)
    if permutations:
        Xp = Xn.astype(perm_dtype, copy=False)
        from tqdm.auto import tqdm

        for k in tqdm(range(permutations), desc="Mantel permutations", disable=not progress, leave=False):
            perm_stats[k] = corr(sum_t - cross(sums(Xp, rng.permutation(N))))
    return MantelResult(
        statistic=float(r), p_value=permutation_p_value(r, perm_stats, alternative), method="pearson",
        alternative=alternative, permutations=permutations, n_items=N, n_pairs=int(P),
        details=dict(mean_embedding_distance=sum_d / P, mean_tree_distance=sum_t / P),
    )


def tree_distance_matrix(clades: CladeStructure) -> np.ndarray:
    """Patristic distances between items, float64 (N, N) (needs N² memory)."""
    return clades.item_distances()


def _spearman_tree(X, clades, permutations, alternative, rng, max_n, repeats) -> MantelResult:
    N = clades.n_items

    def run(idx, perms):
        sub = clades.subset_items(idx)
        return mantel(cosine_distance_matrix(X[idx]), sub.item_distances(), method="spearman",
                      permutations=perms, alternative=alternative, seed=int(rng.integers(2**31)))

    if N <= max_n:
        res = run(np.arange(N), permutations)
        res.n_items = N
        return res
    first = run(np.sort(rng.choice(N, max_n, replace=False)), permutations)
    others = [run(np.sort(rng.choice(N, max_n, replace=False)), 0).statistic for _ in range(repeats)]
    allr = np.array([first.statistic] + others)
    first.estimator = f"item-subsample ({max_n} of {N} items, {len(allr)} subsamples)"
    first.statistic = float(np.mean(allr))
    first.ci = (float(np.percentile(allr, 2.5)), float(np.percentile(allr, 97.5)))
    first.n_items = N
    first.details = dict(subsample_size=max_n, subsample_statistics=allr.tolist())
    return first
