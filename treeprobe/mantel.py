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
and one bottom-up pass over the tree. Pearson r is then

    r = (P·Σdt − Σd·Σt) / sqrt((P·Σd² − (Σd)²)(P·Σt² − (Σt)²)),   P = N(N−1)/2.

Spearman is Pearson on the ranks of the pairwise distances, which does not split
over clades: it is computed exactly with the matrix form up to ``spearman_max_n``
items, and above that estimated on random item subsamples (named as such in the
result).

p-values follow scikit-bio: (#{permuted r at least as extreme} + 1) / (permutations + 1).

**What is permuted.** :func:`mantel_tree` permutes *images* among tree positions (``permute="images"``):
it tests whether images are exchangeable, which within-species similarity alone rejects. Two tests
treat species as the exchangeable units, with the size-stratified species permutations of
:mod:`treeprobe.permutation` (a species' images move together, to the position of a species with
as many images):

* :func:`mantel_species` (or ``mantel_tree(..., permute="species")``): the correlation over the
  *between-species* image pairs only. Within-species pairs have tree distance 0 and stay
  within-species under such a permutation, and Σd, Σd², Σt, Σt² and the count over the
  between-species pairs do not change, so only Σ t_ij x̂_i·x̂_j does: the clade sums above, on the
  species sums S_s = Σ_{i∈s} x̂_i placed at their species' node, O(S·D) per permutation (S species).
* :func:`mantel_centroids`: one unit-norm centroid per species, their tree positions permuted within
  the same size strata, so a link between images per species and clade is kept in every permutation.

Every result says what its p-value permuted in ``details['permuted']``.

**Spearman ties.** Tree distances are rounded to multiples of :data:`TREE_TIE_RESOLUTION` × the
largest distance before ranking (:func:`round_tree_distances`), so distances that are equal sums of
branch lengths tie exactly whatever the order of the float additions.

The permutation loops run compiled (numba, a dependency of umap-learn) on ``n_jobs``
threads; without numba (or with ``TREEPROBE_NO_NUMBA=1``: :func:`treeprobe._utils.numba_enabled`)
a numpy fallback gives the same numbers, more slowly.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import scipy.stats
from scipy.spatial.distance import squareform

from treeprobe.errors import TreeprobeError
from treeprobe._utils import SEED_BOUND, available_cpus, l2_normalise, numba_enabled
from treeprobe._validation import check_choice, check_codes, check_embeddings, check_int
from treeprobe.permutation import (inverse_permutation, n_permutable_species, n_strata, species_item_permuter,
                                   species_sizes, stratified_sampler)
from treeprobe.tree import CladeStructure, tree_depth

__all__ = [
    "MantelResult", "mantel", "mantel_tree", "mantel_species", "mantel_centroids", "permutation_p_value",
    "cosine_distance_matrix", "cosine_distance_condensed", "taxon_centroids", "tree_distance_matrix", "round_tree_distances",
    "ALTERNATIVES", "METHODS", "PERMUTE", "PERMUTED_IMAGES", "PERMUTED_SPECIES", "PERMUTED_CENTROIDS",
    "SPEARMAN_MAX_N", "SPEARMAN_REPEATS", "TREE_TIE_RESOLUTION",
]

#: Alternative hypotheses of the permutation p-value (as in scikit-bio).
ALTERNATIVES = ("greater", "less", "two-sided")
#: Correlations the Mantel tests compute.
METHODS = ("pearson", "spearman")
#: Default largest N for the exact Spearman test of :func:`mantel_tree` (it builds N×N matrices:
#: measured 1.75 GB peak and ~0.1 s of one core per permutation at 6000; 7 GB at 12,000).
SPEARMAN_MAX_N = 6000
#: Default number of extra subsamples behind the Spearman estimate above ``spearman_max_n``.
SPEARMAN_REPEATS = 5
#: What :func:`mantel_tree` can permute for its p-value (``permute=``).
PERMUTE = ("images", "species")
#: ``details['permuted']`` of the image-permutation test.
PERMUTED_IMAGES = "images permuted among tree positions: tests whether images are exchangeable"
#: ``details['permuted']`` of :func:`mantel_species`.
PERMUTED_SPECIES = ("species permuted among tree positions within strata of equal image count; "
                    "images of a species kept together")
#: ``details['permuted']`` of :func:`mantel_centroids`.
PERMUTED_CENTROIDS = ("species centroids permuted among tree positions within strata of equal image count "
                      "(species of n images only swap with species of n images)")
#: Before ranking (Spearman), tree distances are rounded to multiples of this fraction of the largest
#: tree distance: sums of branch lengths that are equal up to float rounding (~1e-16 relative) tie
#: exactly, and distances that differ by more than ~1e-9 of the largest stay distinct.
TREE_TIE_RESOLUTION = 1e-9

_BLOCK_ROWS = 8192  # rows per block in the float64 passes over X (8192 × 512 × 8 B = 32 MB)
# Work per permutation (multiply-adds: N·D for the tree form, n²/2 for the matrix form) below which
# the permutations run on one thread: at 2e5 one permutation takes under 1 ms of one core
# (measured 0.7 ms at N = 2000, D = 100, drawing the permutation included) and 2 threads gained nothing.
_MIN_THREAD_WORK = 2e5
# Permutations go to the threads in chunks of about this much work (~7 ms of one core at the rate above), so the
# hand-over cost (a future per chunk) is amortised; chunks stay small enough to balance the threads.
_CHUNK_WORK = 2e6
# Elements per row block of the numpy fallback of the matrix-form permutation (16 MB of float64).
_NUMPY_PAIR_BLOCK = 2_000_000
# Rows per block of cosine_distance_matrix: a 2048 × N float64 product (16 MB per 1000 columns).
_COSINE_BLOCK_ROWS = 2048
# A distance whose pairwise variance is below this fraction of its mean square is taken as constant
# (the correlation is then undefined); far above float64 rounding of the sums, far below any real spread.
_CONSTANT_VARIANCE = 1e-12


@dataclass(kw_only=True)
class MantelResult:
    """Outcome of a Mantel test.

    statistic: correlation r between the pairwise distances. p_value: permutation
    p-value (NaN when permutations == 0). estimator: 'exact' or how it was estimated.
    ci: (low, high) approximate 95 % confidence interval of the statistic when it is
    estimated (see :func:`mantel_tree`), else None.
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
        """The result as a JSON-ready dict (``ci`` as a list or None)."""
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        return d


def _check_args(method: str, alternative: str, permutations: int):
    check_choice(method, "Mantel method", METHODS)
    check_choice(alternative, "alternative", ALTERNATIVES)
    check_int(permutations, "permutations", minimum=0)


def permutation_p_value(observed: float, permuted: np.ndarray, alternative: str) -> float:
    """(#{permuted at least as extreme as observed} + 1) / (len(permuted) + 1); NaN if none.

    ``permuted``: (P,) statistics under permutation; ``alternative``: one of :data:`ALTERNATIVES`
    ("two-sided" compares absolute values).

    >>> permutation_p_value(0.5, [0.1, 0.5, -0.6, 0.2], "greater")
    0.4
    """
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


# --- compiled kernels and the permutation loop -----------------------------------------

@functools.lru_cache(maxsize=None)
def _load_kernels():
    """The numba kernels module, compiled (or loaded from cache) once; None if numba fails."""
    try:
        from treeprobe import _mantel_kernels as k

        try:  # the prefetch hint is an LLVM intrinsic: fall back to the plain loop if it fails to build
            k.warm_up()
            k.clade_term_fast = k.clade_term
        except Exception:  # pragma: no cover - depends on the llvmlite version
            k.clade_term_fast = k.clade_term_noprefetch()
        return k
    except Exception:  # pragma: no cover - numba not installed or broken
        return None


def _kernels():
    """The numba kernels module, or None (numba missing or failing, or TREEPROBE_NO_NUMBA set)."""
    return _load_kernels() if numba_enabled() else None


def _n_workers(n_jobs: int | None, permutations: int, work_per_permutation: float) -> int:
    """Threads for the permutations: ``n_jobs`` (None or <= 0: every CPU this process may use),
    1 for small problems, never more than ``permutations``."""
    if n_jobs is None or n_jobs <= 0:
        n_jobs = available_cpus()
    if work_per_permutation < _MIN_THREAD_WORK:  # threads cost more than they save on tiny problems
        n_jobs = 1
    return max(1, min(int(n_jobs), permutations))


def _run_permutations(one, n: int, permutations: int, rng: np.random.Generator, workers: int,
                      progress: bool, desc: str, work_per_permutation: float = 0.0, sample=None) -> np.ndarray:
    """[one(sample(rng), worker) for each permutation], on ``workers`` threads.

    ``sample(rng)`` draws one permutation (default: ``rng.permutation(n)``). Permutations are drawn
    in order from ``rng`` in this thread, so the results do not depend on ``workers``; ``one`` must
    release the GIL to gain from threads (the numba kernels do).
    ``worker`` (0..workers−1) names the work space that call may use: never two at once.
    Small permutations go to the threads in chunks of several, to amortise the hand-over.
    """
    from tqdm.auto import tqdm

    out = np.empty(permutations)
    if permutations == 0:
        return out
    if sample is None:
        def sample(r):
            return r.permutation(n)
    bar = tqdm(total=permutations, desc=desc, disable=not progress, leave=False)
    try:
        if workers == 1:
            for k in range(permutations):
                out[k] = one(sample(rng), 0)
                bar.update()
            return out
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        chunk = int(np.clip(_CHUNK_WORK // max(work_per_permutation, 1.0), 1, max(1, permutations // (4 * workers))))

        def run_chunk(perms, wid):
            return [one(p, wid) for p in perms]

        def draw(k):
            return [sample(rng) for _ in range(min(chunk, permutations - k))]

        free = list(range(workers))
        pending: dict = {}
        k = 0
        nxt = draw(0)
        with ThreadPoolExecutor(workers) as ex:
            while k < permutations or pending:
                while k < permutations and free:
                    wid = free.pop()
                    pending[ex.submit(run_chunk, nxt, wid)] = (k, wid)
                    k += len(nxt)
                    nxt = draw(k) if k < permutations else None  # drawn while the others work
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    kk, wid = pending.pop(f)
                    vals = f.result()
                    out[kk:kk + len(vals)] = vals
                    free.append(wid)
                    bar.update(len(vals))
        return out
    finally:
        bar.close()


# --- the matrix form ---------------------------------------------------------------------


def _as_square(m: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(m, dtype=float)
    if m.ndim == 1:
        m = squareform(m, checks=False)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise TreeprobeError(f"{name} must be a square distance matrix or a condensed vector")
    if not np.isfinite(m).all():
        raise TreeprobeError(f"{name} has non-finite values")
    return m


def _pair_sum_numpy(Xsq: np.ndarray, ys: np.ndarray, perm: np.ndarray) -> float:
    """Σ_{i<j} Xsq[perm[i], perm[j]] · ys[k(i, j)] in row blocks (numpy fallback of the kernel)."""
    n = len(perm)
    total = 0.0
    b = max(1, _NUMPY_PAIR_BLOCK // n)
    k = 0
    cols = np.arange(n)
    for i0 in range(0, n - 1, b):
        i1 = min(i0 + b, n - 1)
        blk = Xsq[np.ix_(perm[i0:i1], perm)]
        mask = cols[None, :] > np.arange(i0, i1)[:, None]
        vals = blk[mask]
        total += float(vals @ ys[k:k + len(vals)])
        k += len(vals)
    return total


def _standardise(xf: np.ndarray, yf: np.ndarray, constant: str):
    """(mean of xf, ‖xf − mean‖, (yf − ȳ)/‖yf − ȳ‖) of two pair vectors; raises '<constant>: the
    correlation is undefined' if either is constant. r = (xf − mean)·ys / ‖xf − mean‖."""
    xmean = xf.mean()
    xs = xf - xmean
    nx = np.linalg.norm(xs)
    del xs
    ys = yf - yf.mean()
    ny = np.linalg.norm(ys)
    if nx == 0 or ny == 0:
        raise TreeprobeError(f"{constant}: the correlation is undefined")
    ys /= ny
    return xmean, nx, ys


def mantel(x, y, *, method: str = "pearson", permutations: int = 999, alternative: str = "two-sided",
           seed: int | None = 0, n_jobs: int | None = None, progress: bool = False) -> MantelResult:
    """Mantel test between two distance matrices (square (n, n) or condensed (n(n−1)/2,)).

    r is the Pearson (or Spearman: Pearson of average ranks) correlation of the
    upper triangles; the p-value permutes rows and columns of ``x`` jointly
    (permutation k is the k-th ``rng.permutation(n)`` of ``np.random.default_rng(seed)``).
    Memory: about 5·8·n² bytes (the two square matrices, condensed copies and ranks;
    ~1.5 GB at n = 6000); each permutation costs O(n²) time (~0.1 s of one core at n = 6000),
    on ``n_jobs`` threads (None: all cores). See :func:`mantel_tree` for embeddings against a tree at scale.

    Four points on a line against a tree of two pairs:

    >>> x = [[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]]
    >>> y = [[0, 1, 4, 4], [1, 0, 4, 4], [4, 4, 0, 1], [4, 4, 1, 0]]
    >>> res = mantel(x, y, permutations=23, seed=0)
    >>> round(res.statistic, 4), round(res.p_value, 4), res.n_pairs
    (0.6325, 0.1667, 6)
    """
    _check_args(method, alternative, permutations)
    X = _as_square(x, "x")
    Y = _as_square(y, "y")
    n = X.shape[0]
    if Y.shape[0] != n:
        raise TreeprobeError(f"distance matrices differ in size: {n} vs {Y.shape[0]}")
    if n < 3:
        raise TreeprobeError("a Mantel test needs at least 3 items")
    xf = squareform(X, checks=False)
    yf = squareform(Y, checks=False)
    del Y
    if method == "spearman":
        xf = scipy.stats.rankdata(xf)
        yf = scipy.stats.rankdata(yf)
        X = squareform(xf, checks=False)
    xmean, nx, ys = _standardise(xf, yf, "a distance matrix is constant")
    del yf
    # Σ (x − x̄)·ys = Σ x·ys since Σ ys = 0: the permuted statistic needs no centring
    r = float((xf - xmean) @ ys / nx)
    del xf
    K = _kernels()
    pair_sum = K.pair_sum if K is not None else _pair_sum_numpy
    work = n * n / 2.0
    workers = _n_workers(n_jobs, permutations, work)
    perm_stats = _run_permutations(lambda p, _w: pair_sum(X, ys, p) / nx, n, permutations,
                                   np.random.default_rng(seed), workers, progress, "Mantel permutations", work)
    return MantelResult(
        statistic=r, p_value=permutation_p_value(r, perm_stats, alternative), method=method,
        alternative=alternative, permutations=permutations, n_items=n, n_pairs=n * (n - 1) // 2,
    )


def _cosine_row_blocks(X: np.ndarray):
    """Yield (i, blk): blk = x̂_{i:i+b}·x̂_{i:}ᵀ, float64 (b, N − i), for row blocks of the L2-normalised rows
    of X (N, D), the (b, b) diagonal part made exactly symmetric. General matrix products, never
    ``X @ X.T``, whose OpenBLAS syrk kernel crashes from about N = 33,000 on 2 threads."""
    Xn = l2_normalise(X, dtype=np.float64)
    b = _COSINE_BLOCK_ROWS
    for i in range(0, len(Xn), b):
        blk = Xn[i:i + b] @ Xn[i:].T  # (b, N − i): never the (N, N) self-product
        d = blk[:, :len(blk)]
        d += d.T.copy()
        d *= 0.5
        yield i, blk


def cosine_distance_matrix(X: np.ndarray) -> np.ndarray:
    """1 − cos(x_i, x_j) for rows of X (N, D), float64 (N, N), zero diagonal, values in [0, 2]
    (computed in row blocks, exactly symmetric)."""
    N = len(X)
    D = np.empty((N, N))
    for i, blk in _cosine_row_blocks(X):  # upper block row, mirrored
        b = len(blk)
        D[i:i + b, i:] = blk
        D[i + b:, i:i + b] = blk[:, b:].T
    np.subtract(1.0, D, out=D)
    np.fill_diagonal(D, 0.0)
    return np.maximum(D, 0.0, out=D)


def cosine_distance_condensed(X: np.ndarray) -> np.ndarray:
    """The entries i < j of :func:`cosine_distance_matrix` (the same values, bit for bit) as scipy's
    condensed vector, float64 (N(N−1)/2,), without the (N, N) matrix: half its memory."""
    N = len(X)
    out = np.empty(N * (N - 1) // 2)
    for i, blk in _cosine_row_blocks(X):
        for k in range(len(blk)):
            r = i + k
            a = N * r - r * (r + 1) // 2
            seg = out[a:a + N - r - 1]
            np.subtract(1.0, blk[k, k + 1:], out=seg)
            np.maximum(seg, 0.0, out=seg)
    return out


def _check_norms(norms: np.ndarray) -> None:
    if not np.isfinite(norms).all():
        raise TreeprobeError("embeddings contain NaN or infinite values")
    if (norms == 0).any():
        raise TreeprobeError(f"{int((norms == 0).sum())} embedding(s) have zero norm")


def taxon_centroids(X: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Unit-norm mean of the unit-normalised rows of X (N, D) per taxon code (codes: int (N,),
    0..n_taxa−1), float64 (n_taxa, D); a code with no item gets a zero row.

    Row blocks: memory O(n_taxa·D + block·D), no float64 copy of X.
    """
    codes = np.asarray(codes)
    X = check_embeddings(X, n_rows=len(codes))
    n_taxa = int(codes.max()) + 1
    C = np.zeros((n_taxa, X.shape[1]))
    for i in range(0, len(X), _BLOCK_ROWS):
        B = l2_normalise(X[i:i + _BLOCK_ROWS], dtype=np.float64)
        c = codes[i:i + _BLOCK_ROWS]
        ind = sp.csr_matrix((np.ones(len(c)), (c, np.arange(len(c)))), shape=(n_taxa, len(c)))
        C += ind @ B
    norms = np.linalg.norm(C, axis=1)
    norms[norms == 0] = 1.0
    return C / norms[:, None]


# --- the exact clade-sum form -------------------------------------------------


@dataclass
class _Compressed:
    """The tree reduced to what the statistic sees: non-empty clades, with every chain of
    single-child nodes (same item set, same S_C) merged into one node whose weight is the
    chain's total length. Nodes are numbered in post-order: each subtree is a contiguous range
    ending at its root, so ``parent[v] > v`` and the root is last.

    parent (m,), w (m,), depth (m,): the compressed tree. order (N,): items sorted by node; the
    items of node v are ``order[start[v]:start[v + 1]]``. own (m,): items sitting at each node.
    levels: node indices by depth, deepest first (root excluded).
    """

    parent: np.ndarray
    w: np.ndarray
    depth: np.ndarray
    order: np.ndarray
    start: np.ndarray
    own: np.ndarray
    levels: list


def _preorder(par: np.ndarray, levels: list) -> np.ndarray:
    """Depth-first pre-order position of every node of the parent array ``par`` (m,), int64 (m,);
    ``levels``: node indices by depth, root first. pre[v] = pre[parent] + 1 + the number of nodes
    in the subtrees of v's earlier siblings (siblings ordered by index)."""
    m = len(par)
    nsub = np.ones(m, dtype=np.int64)  # subtree sizes
    for nodes in levels[:0:-1]:
        np.add.at(nsub, par[nodes], nsub[nodes])
    sib = np.lexsort((np.arange(m), par))[1:]  # non-root nodes grouped by parent (root sorts first)
    csum = np.cumsum(nsub[sib])
    first = np.r_[True, par[sib][1:] != par[sib][:-1]]
    base = np.maximum.accumulate(np.where(first, csum - nsub[sib], 0))
    off = np.zeros(m, dtype=np.int64)
    off[sib] = csum - nsub[sib] - base
    pre = np.zeros(m, dtype=np.int64)
    for nodes in levels[1:]:
        pre[nodes] = pre[par[nodes]] + 1 + off[nodes]
    return pre


def _compress(clades: CladeStructure) -> _Compressed:
    """The :class:`_Compressed` form of ``clades`` (empty clades dropped, single-child chains merged)."""
    n = clades.n_nodes
    parent = clades.parent
    size = clades.items_per_node()
    kept = np.flatnonzero(size > 0)
    # a non-empty node with a child of the same size has no items of its own and one non-empty
    # child: the same clade. canon[v] = the deepest node of v's chain (pointer jumping).
    nxt = np.arange(n)
    below = kept[kept > 0]
    same = below[size[below] == size[parent[below]]]
    nxt[parent[same]] = same
    canon = nxt
    while True:
        c2 = canon[canon]
        if np.array_equal(c2, canon):
            break
        canon = c2
    cn = kept[canon[kept] == kept]  # canonical nodes, ascending (parents before children)
    m = len(cn)
    idx = np.full(n, -1, dtype=np.int64)
    idx[cn] = np.arange(m)
    w = np.bincount(idx[canon[kept]], weights=clades.length[kept], minlength=m)
    par = np.full(m, -1, dtype=np.int64)
    top = below[canon[parent[below]] != canon[below]]  # the top node of each chain
    par[idx[canon[top]]] = idx[parent[top]]  # the parent of a chain's top is canonical
    depth = tree_depth(par)
    by_depth = np.argsort(depth, kind="stable")
    levels = np.split(by_depth, np.cumsum(np.bincount(depth))[:-1])
    new = m - 1 - _preorder(par, levels)  # reversed pre-order: a post-order (children in reverse), root last
    cparent = np.full(m, -1, dtype=np.int64)
    cparent[new[par >= 0]] = new[par[par >= 0]]
    cw = np.empty(m)
    cw[new] = w
    cdepth = np.empty(m, dtype=np.int64)
    cdepth[new] = depth
    item_c = new[idx[canon[clades.item_node]]]
    order = np.argsort(item_c, kind="stable")
    own = np.bincount(item_c, minlength=m)
    start = np.concatenate([[0], np.cumsum(own)]).astype(np.int64)
    clevels = [new[nodes] for nodes in levels[:0:-1]]
    return _Compressed(cparent, cw, cdepth, order, start, own, clevels)


def _tree_pair_sums(comp: _Compressed, N: int) -> tuple[float, float]:
    """Σ_{i<j} t_ij and Σ_{i<j} t_ij² over item pairs, one vectorised step per depth level.

    Per node u: n_u items below, a_u = Σ dist(i, u), b_u = Σ dist(i, u)². The pairs whose
    deepest common node is u are those between different groups (u's own items, one group per
    child), and Σ (d_i + d_j)² over them = (Σn)(Σb) − Σ n·b + (Σa)² − Σ a².
    """
    m = len(comp.parent)
    w = comp.w
    n = comp.own.astype(float)
    a = np.zeros(m)
    b = np.zeros(m)
    sum_t2 = 0.0
    for nodes in comp.levels:  # deepest first; a node's children are one level deeper
        p = comp.parent[nodes]
        nv, wv = n[nodes], w[nodes]
        av = a[nodes] + nv * wv
        bv = b[nodes] + 2.0 * wv * a[nodes] + nv * wv * wv
        up, inv = np.unique(p, return_inverse=True)
        k = len(up)
        sn = np.bincount(inv, weights=nv, minlength=k) + n[up]  # own items of the parent: a = b = 0
        sa = np.bincount(inv, weights=av, minlength=k)
        sb = np.bincount(inv, weights=bv, minlength=k)
        snb = np.bincount(inv, weights=nv * bv, minlength=k)
        sa2 = np.bincount(inv, weights=av * av, minlength=k)
        sum_t2 += float(np.sum(sn * sb - snb + sa * sa - sa2))
        n[up] = sn
        a[up] = sa
        b[up] = sb
    size = n  # now the clade sizes
    sum_t = float(np.sum(w[:-1] * size[:-1] * (N - size[:-1])))
    return sum_t, sum_t2


def _clade_term_numpy(X, scale, q, perm, comp: _Compressed) -> float:
    """Σ_C w_C (S_C·S − ‖S_C‖²) in numpy (fallback of the numba kernel; same float64 sums)."""
    m = len(comp.parent)
    D = X.shape[1]
    buf = np.zeros((m, D))
    src = perm[comp.order]
    node_of_slot = np.repeat(np.arange(m), comp.own)
    for i in range(0, len(src), _BLOCK_ROWS):
        j = src[i:i + _BLOCK_ROWS]
        rows = X[j].astype(np.float64) * scale[j, None]
        seg = node_of_slot[i:i + _BLOCK_ROWS]
        u, st = np.unique(seg, return_index=True)
        buf[u] += np.add.reduceat(rows, st, axis=0)
    qbuf = np.bincount(node_of_slot, weights=q[src], minlength=m)
    for nodes in comp.levels:
        np.add.at(buf, comp.parent[nodes], buf[nodes])
        np.add.at(qbuf, comp.parent[nodes], qbuf[nodes])
    nonroot = slice(0, m - 1)
    return float(np.sum(comp.w[nonroot] * (qbuf[nonroot] - np.einsum("ij,ij->i", buf[nonroot], buf[nonroot]))))


class _CladeTerm:
    """Σ_C w_C (S_C·S − ‖S_C‖²) for a permutation of the items, with per-worker work space.

    X (N, D) float32/float64 C-contiguous, scale (N,) float64 (row i enters as scale[i]·X[i]),
    q (N,) float64 (x̂_i·S). Accumulation is float64 whatever the dtype of X. Work space per
    worker: (max depth + 1) × D float64 (the kernel keeps one open sum per depth).
    """

    def __init__(self, comp: _Compressed, X: np.ndarray, scale: np.ndarray, q: np.ndarray, workers: int):
        self.comp, self.X, self.scale, self.q = comp, X, scale, q
        self.K = _kernels()
        h = int(comp.depth.max()) + 1
        self.space = [] if self.K is None else [
            (np.zeros((h, X.shape[1])), np.zeros(h), np.zeros(h, dtype=np.bool_)) for _ in range(workers)]

    def __call__(self, perm: np.ndarray, worker: int = 0) -> float:
        c = self.comp
        if self.K is None:
            return _clade_term_numpy(self.X, self.scale, self.q, perm, c)
        stack, qstack, dirty = self.space[worker]
        return self.K.clade_term_fast(self.X, self.scale, self.q, perm, c.order, c.start, c.depth, c.w,
                                      stack, qstack, dirty)


def _observed_sums(X: np.ndarray):
    """One blocked float64 pass over X: inverse row norms, S = Σ x̂, Σ‖x̂‖², Σ‖x̂‖⁴, ‖X̂ᵀX̂‖²_F;
    then q = X̂·S. Memory O(block·D + D²)."""
    N, D = X.shape
    scale = np.empty(N)
    S = np.zeros(D)
    G = np.zeros((D, D))
    sq = sq4 = 0.0
    for i in range(0, N, _BLOCK_ROWS):
        B = X[i:i + _BLOCK_ROWS].astype(np.float64)
        nrm = np.linalg.norm(B, axis=1)
        _check_norms(nrm)
        scale[i:i + len(B)] = 1.0 / nrm
        B *= scale[i:i + len(B), None]
        S += B.sum(axis=0)
        r2 = np.einsum("ij,ij->i", B, B)
        sq += float(r2.sum())
        sq4 += float(r2 @ r2)
        G += B.T @ B  # (D, D): a syrk on a block of rows, never the (N, N) product
    q = np.empty(N)
    for i in range(0, N, _BLOCK_ROWS):
        B = X[i:i + _BLOCK_ROWS].astype(np.float64)
        q[i:i + len(B)] = (B @ S) * scale[i:i + len(B)]
    return scale, S, sq, sq4, float(np.sum(G * G)), q


def mantel_tree(X: np.ndarray, clades: CladeStructure, *, method: str = "pearson", permutations: int = 999,
                alternative: str = "greater", seed: int | None = 0, spearman_max_n: int = SPEARMAN_MAX_N,
                spearman_repeats: int = SPEARMAN_REPEATS, perm_dtype=np.float32, progress: bool = False,
                n_jobs: int | None = None, permute: str = "images",
                species_codes: np.ndarray | None = None) -> MantelResult:
    """Mantel test between embedding cosine distance and tree distance.

    X: (N, D) embeddings (normalised here), row i sitting at ``clades.item_node[i]``.
    Tree distance t_ij = patristic distance (sum of edge lengths) between the items' nodes.

    ``permute="images"`` (default): r over all N(N−1)/2 image pairs, and the p-value permutes
    images among tree positions, so it tests whether *images* are exchangeable
    (``details['permuted']`` = :data:`PERMUTED_IMAGES`). Permutation k is the k-th
    ``rng.permutation(N)`` of ``np.random.default_rng(seed)`` (as in :func:`mantel`), so the two
    forms give the same permutation distribution. ``permute="species"`` runs
    :func:`mantel_species` instead (needs ``species_codes``, int (N,) 0..S−1; between-species pairs,
    species permuted within size strata; ``perm_dtype`` applies to image permutations only).

    **Pearson** (exact, no N×N matrix; module docstring). The observed statistic is computed in
    float64 from X as given (row blocks; equal to the matrix form to ~1e-12). The permuted
    statistics read ``perm_dtype`` data (float32 by default: X itself when it is float32, else
    one normalised float32 copy) and accumulate in float64: they differ from exact float64 ones
    by ~1e-7 relative in the clade sums, far below the spread of the permutation distribution.
    Cost: O(N·D²) once, O(N·D) per permutation on ``n_jobs`` threads (None: all cores), memory
    O(N + n_nodes·D·n_jobs) beyond X (plus N·D·4 bytes if the float32 copy is needed: pass
    float32 embeddings at a million items). The sums are per compressed clade: empty clades are
    dropped and single-child chains merged.

    **Spearman** (ranks of all pairwise distances, tree distances rounded first by
    :func:`round_tree_distances`; does not split over clades): exact via :func:`mantel` for N ≤ ``spearman_max_n``, which builds N×N matrices: about
    6·8·N² bytes of peak memory (measured 1.75 GB at the default 6000; 7 GB at 12,000) and
    O(N²) time per permutation (~0.1 s of one core at 6000, so 999 permutations take about
    a minute on 2 cores). Above it, the estimator 'item-subsample': ``1 + spearman_repeats`` independent
    random subsamples of ``spearman_max_n`` items each. ``statistic`` is the mean of their
    Spearman r; ``ci`` is an approximate 95 % t-interval for it from the spread of the
    subsample values (it covers the subsampling noise; the O(1/spearman_max_n) bias of a
    subsample rank correlation is not included; None if spearman_repeats = 0). ``p_value`` is the exact
    permutation p-value of the first subsample (a valid test of the same null hypothesis, with
    the power of ``spearman_max_n`` items); its r is in ``details['p_value_subsample_statistic']``.
    """
    check_choice(permute, "permute", PERMUTE)
    if permute == "species":
        if species_codes is None:
            raise TreeprobeError("permute='species' needs species_codes (the species of each image, 0..S-1)")
        return mantel_species(X, clades, species_codes, method=method, permutations=permutations,
                              alternative=alternative, seed=seed, spearman_max_n=spearman_max_n,
                              spearman_repeats=spearman_repeats, progress=progress, n_jobs=n_jobs)
    _check_args(method, alternative, permutations)
    X = _check_tree_input(X, clades)
    rng = np.random.default_rng(seed)
    if method == "spearman":
        res = _spearman_tree(X, clades, permutations, alternative, rng, spearman_max_n, spearman_repeats,
                             n_jobs, progress)
    else:
        res = _pearson_tree(X, clades, permutations, alternative, rng, perm_dtype, n_jobs, progress)
    res.details["permuted"] = PERMUTED_IMAGES
    return res


def _check_tree_input(X, clades: CladeStructure) -> np.ndarray:
    """X as a 2-D array with one row per item of ``clades`` (at least 3); raises otherwise."""
    X = check_embeddings(X)
    N = clades.n_items
    if X.shape[0] != N:
        raise TreeprobeError(f"{X.shape[0]} embeddings but {N} items in the tree")
    if N < 3:
        raise TreeprobeError("a Mantel test needs at least 3 items")
    return X


def round_tree_distances(T: np.ndarray) -> np.ndarray:
    """Tree distances (any shape, float) rounded to multiples of q = :data:`TREE_TIE_RESOLUTION` ×
    max(T), float64, same shape: equal sums of branch lengths tie exactly before ranking.

    Order is kept (a monotone map); values closer than q may merge. All zero: returned as is.

    >>> t = np.array([0.1 + 0.2, 0.3, 0.7])
    >>> bool(t[0] == t[1]), bool(round_tree_distances(t)[0] == round_tree_distances(t)[1])
    (False, True)
    """
    T = np.asarray(T, dtype=np.float64)
    top = float(T.max()) if T.size else 0.0
    if top <= 0:
        return T.copy()
    q = TREE_TIE_RESOLUTION * top
    return np.round(T / q) * q


def _pearson_moments(N: int, S: np.ndarray, sq: float, sq4: float, g2: float, comp: _Compressed):
    """(P, Σd, Σt, denominator) of the Pearson r over the P = N(N−1)/2 item pairs, from the
    observed sums of :func:`_observed_sums` and the compressed tree; raises if either distance
    is constant (the correlation is undefined)."""
    P = N * (N - 1) / 2.0
    SS = float(S @ S)
    sum_c = (SS - sq) / 2.0  # Σ_{i<j} x̂_i·x̂_j
    sum_d = P - sum_c
    sum_d2 = P - 2.0 * sum_c + (g2 - sq4) / 2.0
    sum_t, sum_t2 = _tree_pair_sums(comp, N)
    denom = _pearson_denominator(P, sum_d, sum_d2, sum_t, sum_t2, "all items are at the same tree distance",
                                 "all embeddings are at the same distance")
    return P, sum_d, sum_t, denom


def _pearson_denominator(P, sum_d, sum_d2, sum_t, sum_t2, same_t: str, same_d: str) -> float:
    """sqrt((PΣd² − (Σd)²)(PΣt² − (Σt)²)) over P pairs; raises '<same_t|same_d>: the correlation is
    undefined' when the tree or the embedding distance is constant over the pairs."""
    var_d = P * sum_d2 - sum_d ** 2
    var_t = P * sum_t2 - sum_t ** 2
    if var_t <= _CONSTANT_VARIANCE * P * sum_t2:
        raise TreeprobeError(f"{same_t}: the correlation is undefined")
    if var_d <= _CONSTANT_VARIANCE * P * sum_d2:
        raise TreeprobeError(f"{same_d}: the correlation is undefined")
    return float(np.sqrt(var_d * var_t))


def _clade_test(comp: _Compressed, rows: np.ndarray, scale: np.ndarray, q: np.ndarray, corr, perm_rows, *,
                permutations: int, rng, n_jobs, progress: bool, desc: str, sample=None):
    """(observed r, permuted r (permutations,), workers) of a clade-sum statistic ``corr(term)``.

    ``rows``/``scale``/``q``: the observed data of :class:`_CladeTerm` (slot k reads row k);
    ``perm_rows()`` → (rows, scale) the permutations read (called only if permutations > 0);
    ``sample``: the permutation draw of :func:`_run_permutations`.
    """
    n = len(scale)
    r = corr(_CladeTerm(comp, rows, scale, q, 1)(np.arange(n)))
    work = float(n) * rows.shape[1]
    workers = _n_workers(n_jobs, permutations, work)
    perm_stats = np.empty(0)
    if permutations:
        prow, pscale = perm_rows()
        term = _CladeTerm(comp, prow, pscale, q, workers)
        extra = {} if sample is None else {"sample": sample}  # image permutations: the call as it always was
        perm_stats = _run_permutations(lambda p, wk: corr(term(p, wk)), n, permutations, rng, workers,
                                       progress, desc, work, **extra)
    return r, perm_stats, workers


def _mean_ci(allr: np.ndarray):
    """(mean, approximate 95 % t-interval of the mean or None if fewer than 2 values) of subsample r."""
    k = len(allr)
    mean = float(np.mean(allr))
    if k < 2:
        return mean, None
    half = float(scipy.stats.t.ppf(0.975, k - 1) * np.std(allr, ddof=1) / np.sqrt(k))
    return mean, (mean - half, mean + half)


def _permutation_data(X: np.ndarray, scale: np.ndarray, perm_dtype: np.dtype):
    """(rows, scale) the permutations read: X itself if it already has ``perm_dtype``, else one
    normalised copy in ``perm_dtype`` (made in row blocks) with unit scale."""
    if X.dtype == perm_dtype:
        return X, scale
    Xp = np.empty(X.shape, dtype=perm_dtype)
    for i in range(0, X.shape[0], _BLOCK_ROWS):
        Xp[i:i + _BLOCK_ROWS] = X[i:i + _BLOCK_ROWS] * scale[i:i + _BLOCK_ROWS, None]
    return Xp, np.ones(X.shape[0])


def _pearson_tree(X, clades, permutations, alternative, rng, perm_dtype, n_jobs, progress) -> MantelResult:
    """The exact Pearson form of :func:`mantel_tree` (arguments checked there)."""
    N = clades.n_items
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    X = np.ascontiguousarray(X)
    scale, S, sq, sq4, g2, q = _observed_sums(X)
    comp = _compress(clades)
    P, sum_d, sum_t, denom = _pearson_moments(N, S, sq, sq4, g2, comp)

    def corr(term: float) -> float:
        return (P * (sum_t - term) - sum_d * sum_t) / denom

    perm_dtype = np.dtype(perm_dtype)
    r, perm_stats, workers = _clade_test(comp, X, scale, q, corr, lambda: _permutation_data(X, scale, perm_dtype),
                                         permutations=permutations, rng=rng, n_jobs=n_jobs, progress=progress,
                                         desc="Mantel permutations")
    return MantelResult(
        statistic=float(r), p_value=permutation_p_value(r, perm_stats, alternative), method="pearson",
        alternative=alternative, permutations=permutations, n_items=N, n_pairs=int(N * (N - 1) // 2),
        details=dict(mean_embedding_distance=sum_d / P, mean_tree_distance=sum_t / P,
                     permutation_dtype=str(perm_dtype), n_jobs=workers,
                     backend="numba" if _kernels() is not None else "numpy"),
    )


def tree_distance_matrix(clades: CladeStructure) -> np.ndarray:
    """Patristic distances between items, float64 (N, N), in units of edge length (needs N² memory)."""
    return clades.item_distances()


def _spearman_tree(X, clades, permutations, alternative, rng, max_n, repeats, n_jobs, progress) -> MantelResult:
    N = clades.n_items
    check_int(max_n, "spearman_max_n", minimum=3)

    def run(idx, perms):
        sub = clades.subset_items(idx)
        return mantel(cosine_distance_matrix(X[idx]), round_tree_distances(sub.item_distances()), method="spearman",
                      permutations=perms, alternative=alternative, seed=int(rng.integers(SEED_BOUND)),
                      n_jobs=n_jobs, progress=progress)

    if N <= max_n:
        res = run(np.arange(N), permutations)
        res.n_items = N
        return res
    first = run(np.sort(rng.choice(N, max_n, replace=False)), permutations)
    others = [run(np.sort(rng.choice(N, max_n, replace=False)), 0).statistic for _ in range(repeats)]
    allr = np.array([first.statistic] + others)
    k = len(allr)
    mean, ci = _mean_ci(allr)
    return MantelResult(
        statistic=mean, p_value=first.p_value, method="spearman", alternative=alternative,
        permutations=permutations, n_items=N, n_pairs=int(N * (N - 1) // 2),
        estimator=f"item-subsample ({max_n} of {N} items, {k} subsamples)", ci=ci,
        details=dict(subsample_size=max_n, subsample_statistics=allr.tolist(),
                     ci_method="95% t-interval of the mean over independent subsamples",
                     p_value_subsample_statistic=first.statistic,
                     p_value_method=f"permutation test on the first subsample of {max_n} items"),
    )


# --- species as the exchangeable units ------------------------------------------------------


@dataclass
class _Units:
    """Rows grouped into units that permute as blocks (species). codes int (N,): unit of each row;
    sizes int64 (U,): rows per unit; node int64 (U,): the tree node every row of the unit sits at;
    strata (U,): units swap tree positions only with units of an equal stratum label (image counts)."""

    codes: np.ndarray
    sizes: np.ndarray
    node: np.ndarray
    strata: np.ndarray


def _species_units(clades: CladeStructure, species_codes) -> _Units:
    """The species of the items of ``clades`` as :class:`_Units` (strata = image counts); raises
    unless the codes are 0..S−1, every species sits at one node, and there are >= 2 species."""
    codes = check_codes(species_codes, clades.n_items, "species")
    sizes = species_sizes(codes)
    node = np.empty(len(sizes), dtype=np.int64)
    node[codes] = clades.item_node
    bad = np.flatnonzero(node[codes] != clades.item_node)
    if bad.size:
        raise TreeprobeError(f"the images of species {int(codes[bad[0]])} sit at more than one tree node; "
                             "every image of a species must sit at the species' node")
    if len(sizes) < 2:
        raise TreeprobeError("a between-species test needs at least 2 species")
    return _Units(codes=codes, sizes=sizes, node=node, strata=sizes)


def _unit_tree(clades: CladeStructure, units: _Units) -> CladeStructure:
    """The same tree with one item per unit, at the unit's node."""
    return CladeStructure(parent=clades.parent, length=clades.length, item_node=units.node, names=clades.names,
                          ultrametric_levels=clades.ultrametric_levels)


def _unit_tree_sums(clades: CladeStructure, units: _Units, N: int) -> tuple[_Compressed, float, float]:
    """(the compressed tree with one item per unit, Σt, Σt² over the N images' pairs): a compressed node holds
    the images of its units; within-unit pairs add t = 0."""
    comp = _compress(_unit_tree(clades, units))
    m = len(comp.parent)
    img_own = np.bincount(np.repeat(np.arange(m), comp.own), weights=units.sizes[comp.order], minlength=m)
    sum_t, sum_t2 = _tree_pair_sums(replace(comp, own=img_own), N)
    return comp, sum_t, sum_t2


def _unit_sums(X: np.ndarray, scale: np.ndarray, units: _Units) -> tuple[np.ndarray, float]:
    """Per unit u: S_u = Σ_{i∈u} x̂_i, float64 (U, D), and g2w = Σ_u ‖X̂_uᵀX̂_u‖²_F = Σ_u Σ_{i,j∈u} (x̂_i·x̂_j)²
    (ordered pairs, i = j included). x̂_i = scale[i]·X[i]. Units of equal size go through in
    batches of about ``_BLOCK_ROWS`` rows; each unit's Gram is n×n or D×D, whichever is smaller,
    so the cost is O(Σ_u n_u·D·min(n_u, D)) ≤ O(N·D²), memory O(block·D + D²)."""
    D = X.shape[1]
    sizes = units.sizes
    order = np.argsort(units.codes, kind="stable")
    start = np.concatenate([[0], np.cumsum(sizes)])
    Su = np.zeros((len(sizes), D))
    g2w = 0.0

    def rows(idx):
        B = X[idx].astype(np.float64)
        B *= scale[idx, None]
        return B

    for n in np.unique(sizes):
        n = int(n)
        grp_all = np.flatnonzero(sizes == n)
        if n > _BLOCK_ROWS:  # a large unit alone, in row blocks
            for u in grp_all:
                M = np.zeros((D, D))
                for a in range(start[u], start[u + 1], _BLOCK_ROWS):
                    B = rows(order[a:min(a + _BLOCK_ROWS, start[u + 1])])
                    Su[u] += B.sum(axis=0)
                    M += B.T @ B
                g2w += float(np.sum(M * M))
            continue
        per = max(1, _BLOCK_ROWS // n)
        for c in range(0, len(grp_all), per):
            grp = grp_all[c:c + per]
            B = rows(order[(start[grp][:, None] + np.arange(n)).ravel()]).reshape(len(grp), n, D)
            Su[grp] = B.sum(axis=1)
            if n <= D:
                Gm = np.einsum("kid,kjd->kij", B, B, optimize=True) if n > 1 else np.einsum("kid,kid->ki", B, B)
            else:
                Gm = np.matmul(B.transpose(0, 2, 1), B)
            g2w += float(np.sum(Gm * Gm))
    return Su, g2w


def _unit_details(units: _Units, n_within: float, mean_within: float) -> dict:
    """The ``details`` every species-permutation result carries."""
    return dict(n_species=int(len(units.sizes)), n_permutable_species=n_permutable_species(units.strata),
                n_strata=n_strata(units.strata), permuted=PERMUTED_SPECIES,
                n_within_species_pairs=int(n_within), mean_within_species_distance=mean_within)


def _species_pearson(X, clades, units: _Units, permutations, alternative, rng, perm_dtype, n_jobs,
                     progress) -> MantelResult:
    """Exact Pearson r over between-unit pairs, p-value from size-stratified unit permutations."""
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    X = np.ascontiguousarray(X)
    scale, S, sq, _sq4, g2, _q = _observed_sums(X)
    Su, g2w = _unit_sums(X, scale, units)
    return _species_pearson_from_sums(clades, units, Su, S, sq, g2, g2w, N=len(units.codes),
                                      permutations=permutations, alternative=alternative, rng=rng,
                                      perm_dtype=perm_dtype, n_jobs=n_jobs, progress=progress)


def _species_pearson_from_sums(clades, units: _Units, Su, S, sq, g2, g2w, *, N, permutations, alternative, rng,
                               perm_dtype, n_jobs, progress) -> MantelResult:
    """:func:`_species_pearson` from sufficient statistics (also fed by :mod:`treeprobe.stream`): unit sums
    Su (U, D) of the unit vectors, their total S (D,), sq = Σ‖x̂‖², g2 = ‖Σ x̂x̂ᵀ‖²_F, g2w = Σ_u ‖G_u‖²_F; N items."""
    U = len(units.sizes)
    comp, sum_t, sum_t2 = _unit_tree_sums(clades, units, N)
    P = N * (N - 1) / 2.0
    P_w = float(np.sum(units.sizes * (units.sizes - 1))) / 2.0
    P_b = P - P_w
    if P_b <= 0:
        raise TreeprobeError("no between-species pairs: the test needs at least 2 species")
    ss_u = float(np.einsum("ij,ij->", Su, Su))
    sum_c = (float(S @ S) - ss_u) / 2.0  # Σ over between-unit pairs of x̂_i·x̂_j
    sum_c2 = (g2 - g2w) / 2.0  # … of (x̂_i·x̂_j)²
    sum_d = P_b - sum_c
    sum_d2 = P_b - 2.0 * sum_c + sum_c2
    denom = _pearson_denominator(P_b, sum_d, sum_d2, sum_t, sum_t2,
                                 "all between-species pairs are at the same tree distance",
                                 "all between-species pairs are at the same embedding distance")

    def corr(term: float) -> float:  # term = Σ_C w_C S_C·(S − S_C) = Σ_between t_ij x̂_i·x̂_j
        return (P_b * (sum_t - term) - sum_d * sum_t) / denom

    ones = np.ones(U)
    perm_dtype = np.dtype(perm_dtype)
    draw = stratified_sampler(units.strata)
    # slot (unit position) t reads unit pi⁻¹[t]: unit s moves to the position of pi[s]
    r, perm_stats, workers = _clade_test(
        comp, Su, ones, Su @ S, corr, lambda: (np.ascontiguousarray(Su, dtype=perm_dtype), ones),
        permutations=permutations, rng=rng, n_jobs=n_jobs, progress=progress, desc="Mantel species permutations",
        sample=lambda g: inverse_permutation(draw(g)))
    within_c = (ss_u - sq) / 2.0
    details = _unit_details(units, P_w, (P_w - within_c) / P_w if P_w else float("nan"))
    details.update(mean_between_species_distance=sum_d / P_b, mean_tree_distance=sum_t / P_b,
                   permutation_dtype=str(perm_dtype), n_jobs=workers,
                   backend="numba" if _kernels() is not None else "numpy")
    return MantelResult(
        statistic=float(r), p_value=permutation_p_value(r, perm_stats, alternative), method="pearson",
        alternative=alternative, permutations=permutations, n_items=N, n_pairs=int(round(P_b)), details=details)


def _species_spearman_exact(X, clades, units: _Units, permutations, alternative, rng, n_jobs,
                            progress) -> MantelResult:
    """Spearman r over the explicit between-unit pairs (N×N matrices), p-value from size-stratified
    unit permutations (each moved to the item level); ~6·8·N² bytes."""
    N = len(units.codes)
    between = squareform(units.codes[:, None] != units.codes[None, :], checks=False)  # condensed bool
    dfull = cosine_distance_condensed(X)
    P_w = int((~between).sum())
    mean_within = float(dfull[~between].mean()) if P_w else float("nan")
    rd = scipy.stats.rankdata(dfull[between])
    del dfull
    rt = scipy.stats.rankdata(squareform(round_tree_distances(clades.item_distances()), checks=False)[between])
    if len(rd) < 2:
        raise TreeprobeError("fewer than 2 between-species pairs: the correlation is undefined")
    xmean, nx, ys_b = _standardise(rd, rt, "a distance is constant over the between-species pairs")
    del rt
    r = float((rd - xmean) @ ys_b / nx)
    # permuted: Σ_between rank_d[perm k, perm l]·ys[k, l]; ys = 0 on within-species slot pairs, and a
    # between-species slot pair always reads a between-species pair of rows, so Σ ys = 0 needs no centring
    ys = np.zeros(len(between))
    ys[between] = ys_b
    del ys_b
    full = np.zeros(len(between))
    full[between] = rd
    del rd
    Rsq = squareform(full, checks=False)
    del full
    K = _kernels()
    pair_sum = K.pair_sum if K is not None else _pair_sum_numpy
    work = N * N / 2.0
    workers = _n_workers(n_jobs, permutations, work)
    perm_stats = np.empty(0)
    if permutations:
        draw = stratified_sampler(units.strata)
        to_items = species_item_permuter(units.codes)
        perm_stats = _run_permutations(lambda p, _w: pair_sum(Rsq, ys, p) / nx, N, permutations, rng, workers,
                                       progress, "Mantel species permutations", work,
                                       sample=lambda g: to_items(draw(g)))
    details = _unit_details(units, P_w, mean_within)
    details.update(tree_tie_resolution=TREE_TIE_RESOLUTION, n_jobs=workers)
    return MantelResult(statistic=r, p_value=permutation_p_value(r, perm_stats, alternative), method="spearman",
                        alternative=alternative, permutations=permutations, n_items=N,
                        n_pairs=int(between.sum()), details=details)


def _subsample_units(units: _Units, max_n: int, rng: np.random.Generator) -> tuple[np.ndarray, _Units]:
    """Whole units in a random order until ``max_n`` rows are used (units larger than ``max_n``
    never enter): (sorted row indices, their :class:`_Units`, renumbered 0..)."""
    U = len(units.sizes)
    order = rng.permutation(U)
    order = order[units.sizes[order] <= max_n]
    chosen = np.sort(order[np.cumsum(units.sizes[order]) <= max_n])
    if len(chosen) < 2 or units.sizes[chosen].sum() < 3:
        raise TreeprobeError(f"spearman_max_n = {max_n} is too small to hold 2 species and 3 images")
    rows = np.flatnonzero(np.isin(units.codes, chosen))
    new = np.full(U, -1, dtype=np.int64)
    new[chosen] = np.arange(len(chosen))
    return rows, _Units(codes=new[units.codes[rows]], sizes=units.sizes[chosen], node=units.node[chosen],
                        strata=units.strata[chosen])


def _species_spearman(X, clades, units: _Units, permutations, alternative, rng, max_n, repeats, n_jobs,
                      progress) -> MantelResult:
    """Exact for N ≤ max_n, else the 'species-subsample' estimator (see :func:`mantel_species`)."""
    check_int(max_n, "spearman_max_n", minimum=3)
    check_int(repeats, "spearman_repeats", minimum=0)
    N = len(units.codes)
    if N <= max_n:
        return _species_spearman_exact(X, clades, units, permutations, alternative, rng, n_jobs, progress)
    runs = []
    for k in range(1 + repeats):
        rows, sub = _subsample_units(units, max_n, rng)
        res = _species_spearman_exact(X[rows], clades.subset_items(rows), sub, permutations if k == 0 else 0,
                                      alternative, rng, n_jobs, progress)
        runs.append((res, len(sub.sizes), len(rows)))
    first = runs[0][0]
    allr = np.array([res.statistic for res, _, _ in runs])
    k = len(allr)
    mean, ci = _mean_ci(allr)
    Su, sq = _species_vector_sums(X, units.codes, len(units.sizes))
    P_w = float(np.sum(units.sizes * (units.sizes - 1))) / 2.0
    within_c = (float(np.einsum("ij,ij->", Su, Su)) - sq) / 2.0
    details = _unit_details(units, P_w, (P_w - within_c) / P_w if P_w else float("nan"))
    details.update(subsample_size=max_n, subsample_statistics=allr.tolist(),
                   subsample_species=[s for _, s, _ in runs], subsample_items=[n for _, _, n in runs],
                   ci_method="95% t-interval of the mean over independent species subsamples",
                   p_value_subsample_statistic=first.statistic,
                   p_value_method=(f"species-permutation test on the first subsample ({runs[0][1]} species, "
                                   f"{runs[0][2]} items)"),
                   tree_tie_resolution=TREE_TIE_RESOLUTION)
    P_b = N * (N - 1) / 2.0 - P_w
    return MantelResult(
        statistic=mean, p_value=first.p_value, method="spearman", alternative=alternative,
        permutations=permutations, n_items=N, n_pairs=int(round(P_b)),
        estimator=f"species-subsample (whole species up to {max_n} of {N} items, {k} subsamples)", ci=ci,
        details=details)


def _species_vector_sums(X: np.ndarray, codes: np.ndarray, n_taxa: int) -> tuple[np.ndarray, float]:
    """Σ of the unit-normalised rows of X (N, D) per code, float64 (n_taxa, D), and Σ_i ‖x̂_i‖²
    (row blocks: no float64 copy of X)."""
    C = np.zeros((n_taxa, X.shape[1]))
    sq = 0.0
    for i in range(0, len(X), _BLOCK_ROWS):
        B = l2_normalise(X[i:i + _BLOCK_ROWS], dtype=np.float64)
        c = codes[i:i + _BLOCK_ROWS]
        ind = sp.csr_matrix((np.ones(len(c)), (c, np.arange(len(c)))), shape=(n_taxa, len(c)))
        C += ind @ B
        sq += float(np.einsum("ij,ij->", B, B))
    return C, sq


def _units_test(X, clades, units, method, permutations, alternative, rng, max_n, repeats, perm_dtype, n_jobs,
                progress) -> MantelResult:
    if method == "spearman":
        return _species_spearman(X, clades, units, permutations, alternative, rng, max_n, repeats, n_jobs, progress)
    return _species_pearson(X, clades, units, permutations, alternative, rng, perm_dtype, n_jobs, progress)


def mantel_species(X: np.ndarray, clades: CladeStructure, species_codes: np.ndarray, *, method: str = "pearson",
                   permutations: int = 999, alternative: str = "greater", seed: int | None = 0,
                   spearman_max_n: int = SPEARMAN_MAX_N, spearman_repeats: int = SPEARMAN_REPEATS,
                   perm_dtype=np.float64, progress: bool = False, n_jobs: int | None = None) -> MantelResult:
    """Between-species Mantel test on images, with species (not images) permuted.

    X: (N, D) embeddings (normalised here), row i at ``clades.item_node[i]``; species_codes: int
    (N,), 0..S−1, every code used, all images of a species at one node (raises otherwise).

    **Statistic**: the correlation between cosine distance and tree (patristic) distance over the
    *between-species* image pairs only (``n_pairs`` of them). Within-species pairs (tree distance 0)
    are left out of r and described on their own in ``details``.

    **p-value**: permutation k is ``pi_k``, the k-th draw of
    :func:`treeprobe.permutation.stratified_species_permutation` ``(sizes, rng)`` from
    ``np.random.default_rng(seed)`` (sizes = images per species): species s with all its images
    moves to the tree position of species ``pi_k[s]``, which has as many images (the image-level
    permutation is :func:`treeprobe.permutation.item_permutation` ``(species_codes, pi_k)``). Exact under
    "given their image counts, species' embeddings are exchangeable among tree positions". Species
    alone in their size stratum never move (``details['n_permutable_species']``); if none can,
    every permuted r equals the observed one and p = 1.

    **Pearson** (exact, no N×N matrix): Σd, Σd², Σt, Σt² and the count over between-species pairs
    do not change under these permutations; the cross term is the clade-sum form of
    :func:`mantel_tree` on the species sums S_s = Σ_{i∈s} x̂_i at their species' node. Cost: O(N·D²)
    once, O(S·D) per permutation (``perm_dtype`` species sums, float64 by default; float32 moves the
    permuted r by ~1e-7), memory O(S·D + n_nodes·D·n_jobs) beyond X.

    **Spearman** (ranks; tree distances rounded by :func:`round_tree_distances`): exact for
    N ≤ ``spearman_max_n`` from explicit N×N matrices (~6·8·N² bytes, O(N²) per permutation; permutation
    k as above). Above it, the estimator 'species-subsample': ``1 + spearman_repeats`` random sets of
    whole species (a random order of species, taken while the images fit in ``spearman_max_n``; species
    with more images never enter); ``statistic`` is the mean of their r, ``ci`` a 95 % t-interval over
    them, ``p_value`` the exact species-permutation p-value of the first set (its r in
    ``details['p_value_subsample_statistic']``).

    ``details``: n_species, n_permutable_species, n_strata (distinct image counts), permuted
    (:data:`PERMUTED_SPECIES`), n_within_species_pairs, mean_within_species_distance (mean cosine
    distance of the within-species pairs; NaN if none); Pearson adds mean_between_species_distance,
    mean_tree_distance (both over between-species pairs), permutation_dtype, n_jobs, backend.

    Two species of two images under one parent, a third species far away:

    >>> from treeprobe.tree import CladeStructure
    >>> cs = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0, 1.0, 1, 1, 3]),
    ...                     item_node=np.array([2, 2, 3, 3, 4, 4]), names=np.array([""] * 5, dtype=object))
    >>> X = np.array([[1, 0.1], [1, 0.2], [1, 0.5], [1, 0.6], [0.1, 1], [0.2, 1]])
    >>> res = mantel_species(X, cs, np.array([0, 0, 1, 1, 2, 2]), permutations=5)
    >>> round(res.statistic, 4), res.n_pairs, res.details["n_within_species_pairs"], res.details["n_strata"]
    (0.8597, 12, 3, 1)
    """
    _check_args(method, alternative, permutations)
    X = _check_tree_input(X, clades)
    units = _species_units(clades, species_codes)
    return _units_test(X, clades, units, method, permutations, alternative, np.random.default_rng(seed),
                       spearman_max_n, spearman_repeats, perm_dtype, n_jobs, progress)


def mantel_centroids(X: np.ndarray, clades: CladeStructure, species_codes: np.ndarray, *, method: str = "pearson",
                     permutations: int = 999, alternative: str = "greater", seed: int | None = 0,
                     spearman_max_n: int = SPEARMAN_MAX_N, spearman_repeats: int = SPEARMAN_REPEATS,
                     perm_dtype=np.float64, progress: bool = False, n_jobs: int | None = None) -> MantelResult:
    """Species-centroid Mantel test, calibrated when images per species vary with the clade.

    X: (N, D) embeddings, row i at ``clades.item_node[i]``; species_codes: int (N,), 0..S−1 (all
    images of a species at one node). The statistic is r between the cosine distances of the S
    unit-norm species centroids (:func:`taxon_centroids`) and their tree distances, all S(S−1)/2 pairs
    (the same number as :func:`mantel_tree` on one centroid per species). A centroid of more images
    sits closer to the common direction of the embeddings, so if image counts differ between clades
    the centroid distances carry the clade even without tree signal: permuting centroids freely is
    then miscalibrated. Here the p-value permutes the centroids' tree positions within strata of
    equal image count: permutation k is the k-th draw of
    :func:`treeprobe.permutation.stratified_species_permutation` ``(sizes, rng)`` from
    ``np.random.default_rng(seed)``, species s moving to the position of species ``pi_k[s]``; the
    size–clade association is the same in every permutation.

    Pearson is exact with O(S·D) per permutation (``perm_dtype`` centroids, float64 by default);
    Spearman is exact for S ≤ ``spearman_max_n`` (S×S matrices), else the 'species-subsample'
    estimator of :func:`mantel_species` on centroids.

    ``details``: n_species, n_images (N), n_permutable_species, n_strata, permuted
    (:data:`PERMUTED_CENTROIDS`); Pearson adds mean_centroid_distance (mean cosine distance of
    the centroid pairs), mean_tree_distance, permutation_dtype, n_jobs, backend.
    """
    _check_args(method, alternative, permutations)
    X = _check_tree_input(X, clades)
    species = _species_units(clades, species_codes)
    S = len(species.sizes)
    if S < 3:
        raise TreeprobeError("a centroid Mantel test needs at least 3 species")
    C = taxon_centroids(X, species.codes)
    units = _Units(codes=np.arange(S), sizes=np.ones(S, dtype=np.int64), node=species.node, strata=species.sizes)
    res = _units_test(C, _unit_tree(clades, units), units, method, permutations, alternative,
                      np.random.default_rng(seed), spearman_max_n, spearman_repeats, perm_dtype, n_jobs, progress)
    for key in ("n_within_species_pairs", "mean_within_species_distance"):
        res.details.pop(key, None)
    if "mean_between_species_distance" in res.details:
        res.details["mean_centroid_distance"] = res.details.pop("mean_between_species_distance")
    res.details.update(permuted=PERMUTED_CENTROIDS, n_images=int(X.shape[0]))
    return res
