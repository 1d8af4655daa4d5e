"""Seeded 2-D maps of embeddings (t-SNE via openTSNE, UMAP via umap-learn).

Both use cosine geometry: rows are L2-normalised and the neighbour metric is cosine.
Both return ``(coords, index)``: ``coords`` float32 (n, 2) for the rows ``X[index]``,
``index`` int64 (n,) sorted — all rows, or a seeded random subset of ``max_points``.
The same input and seed give identical output.
"""

from __future__ import annotations

import warnings

import numpy as np

from treeprobe.errors import TreeprobeError
from treeprobe._utils import available_cpus, l2_normalise
from treeprobe._validation import check_embeddings, check_int

__all__ = ["subsample_index", "tsne_2d", "umap_2d"]

# From this many points t-SNE runs on every CPU by default, below it on one: openTSNE switches to
# FFT-interpolated gradients at 10,000 points, where threads start to pay; below, they cost more
# than they save (badly so on a busy machine).
_TSNE_THREADS_MIN_POINTS = 10_000
# Fewest points each map accepts: with fewer the libraries fail (perplexity must stay below n / 3,
# n_neighbors below n) and a 2-D map would show nothing anyway.
_TSNE_MIN_POINTS = 5
_UMAP_MIN_POINTS = 4


def subsample_index(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices (at most ``max_points``,) of ``n`` rows: all when ``max_points`` is
    None or n <= max_points, else a subset drawn without replacement by
    ``np.random.default_rng(seed)``.

    >>> subsample_index(5, None).tolist()
    [0, 1, 2, 3, 4]
    >>> idx = subsample_index(1000, 3, seed=1)
    >>> idx.tolist() == subsample_index(1000, 3, seed=1).tolist(), len(idx), bool((idx[1:] > idx[:-1]).all())
    (True, 3, True)
    """
    if max_points is None:
        return np.arange(n, dtype=np.int64)
    check_int(max_points, "max_points", minimum=1)
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False)).astype(np.int64)


def _prepare(X, max_points, seed, min_points: int, what: str):
    """(L2-normalised rows X[index], index) for a map; raises below ``min_points`` points."""
    X = check_embeddings(X)
    index = subsample_index(X.shape[0], max_points, seed)
    if index.size < min_points:
        raise TreeprobeError(f"{what} needs at least {min_points} points; got {index.size}")
    return l2_normalise(X[index]), index


def tsne_2d(
    X,
    seed: int = 0,
    perplexity: float = 30.0,
    *,
    n_jobs: int | None = None,
    max_points: int | None = None,
    n_iter: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """openTSNE t-SNE of the L2-normalised rows of ``X`` (N, D), cosine metric.

    openTSNE picks exact / approximate (Annoy) neighbours and Barnes-Hut / FFT-interpolated
    gradients by size (FFT from 10,000 points: 100,000 points take minutes, see
    benchmarks/RESULTS_intrinsic.md). Initialisation is PCA (openTSNE default),
    ``random_state=seed``. Perplexity must be below n/3 (n = points used); larger values are
    lowered to (n - 1)/3 with a warning. ``n_iter``: optimisation iterations after the 250
    early-exaggeration ones. ``n_jobs``: threads; None = 1 below 10,000 points (where
    threads cost more than they save, badly so on a busy machine) and the CPUs this process
    may use from 10,000 on. openTSNE's result does not depend on it (tested for 1 and 2).

    Returns ``(coords float32 (n, 2), index int64 (n,))``; see module docstring.
    """
    from openTSNE import TSNE

    Xn, index = _prepare(X, max_points, seed, _TSNE_MIN_POINTS, "t-SNE")
    n = index.size
    if perplexity >= n / 3:
        new = max((n - 1) / 3.0, 1.0)
        warnings.warn(f"t-SNE perplexity {perplexity} too large for {n} points; using {new:.1f}",
                      stacklevel=2)
        perplexity = new
    if n_jobs is None:
        n_jobs = 1 if n < _TSNE_THREADS_MIN_POINTS else available_cpus()
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", n_iter=n_iter,
                random_state=seed, n_jobs=n_jobs, verbose=False)
    coords = np.asarray(tsne.fit(Xn), dtype=np.float32)
    return coords, index


def umap_2d(
    X,
    seed: int = 0,
    n_neighbors: int = 15,
    *,
    min_dist: float = 0.1,
    max_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """UMAP (umap-learn) of the L2-normalised rows of ``X`` (N, D), cosine metric.

    ``random_state=seed`` makes umap-learn deterministic but single-threaded.
    ``n_neighbors`` is lowered to n - 1 for tiny inputs. The first call in a process
    pays numba compilation (seconds).

    Returns ``(coords float32 (n, 2), index int64 (n,))``; see module docstring.
    """
    import umap

    Xn, index = _prepare(X, max_points, seed, _UMAP_MIN_POINTS, "UMAP")
    n = index.size
    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, n - 1)),
                        min_dist=min_dist, metric="cosine", random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        # small-N spectral init falls back to random init with a warning; still seeded
        warnings.filterwarnings("ignore", message=".*n_jobs value 1 overridden.*")
        coords = reducer.fit_transform(Xn)
    return np.asarray(coords, dtype=np.float32), index
