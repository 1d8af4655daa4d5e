"""The 2-D maps: seeded t-SNE and UMAP of normalised rows, and their subsample."""

import numpy as np
import pytest

from treeprobe.embedding_maps import subsample_index, tsne_2d, umap_2d
from treeprobe.errors import TreeprobeError

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def blobs(n_per=30, k=4, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    return rng.normal(size=(k, dim))[y] + 0.1 * rng.normal(size=(y.size, dim)), y


# --- maps -----------------------------------------------------------------------------

def test_subsample_index():
    np.testing.assert_array_equal(subsample_index(5, None), np.arange(5))
    np.testing.assert_array_equal(subsample_index(5, 10), np.arange(5))
    i = subsample_index(100, 30, seed=1)
    assert i.size == 30 and np.unique(i).size == 30 and (np.diff(i) > 0).all()
    np.testing.assert_array_equal(i, subsample_index(100, 30, seed=1))
    assert not np.array_equal(i, subsample_index(100, 30, seed=2))


def test_tsne_seeded_shape_subsample():
    X, _ = blobs()
    a, ia = tsne_2d(X, seed=0, perplexity=20)
    b, ib = tsne_2d(X, seed=0, perplexity=20)
    assert a.shape == (120, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ia, np.arange(120))
    other, _ = tsne_2d(X, seed=1, perplexity=20)  # same rows, another seed: another map
    assert np.abs(other - a).max() > 0.1
    c, ic = tsne_2d(X, seed=1, max_points=60, perplexity=10)
    assert c.shape == (60, 2) and ic.shape == (60,)
    np.testing.assert_array_equal(ic, subsample_index(120, 60, seed=1))


def test_tsne_perplexity_guard():
    X, _ = blobs(n_per=5)
    with pytest.warns(UserWarning, match="perplexity"):
        a, _ = tsne_2d(X, perplexity=30)
    assert a.shape == (20, 2)
    with pytest.raises(TreeprobeError):
        tsne_2d(X[:3])


def test_umap_seeded_shape():
    # the real umap-learn run: ~12 s on an idle 2-core machine, nearly all numba compilation
    # (~65 s when the machine is shared by 4 busy processes)
    X, y = blobs()
    a, ia = umap_2d(X, seed=0, n_neighbors=10)
    b, _ = umap_2d(X, seed=0, n_neighbors=10)
    assert a.shape == (120, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    other, _ = umap_2d(X, seed=1, n_neighbors=10)  # same rows, another seed: another map
    assert np.abs(other - a).max() > 0.1
    c, ic = umap_2d(X, seed=3, max_points=50)
    assert c.shape == (50, 2) and ic.size == 50
    # blobs stay apart: each point's nearest map neighbour is in its own blob
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.95


def test_umap_2d_arguments_with_a_stub(monkeypatch):
    """What umap_2d hands to umap-learn (the real run is the slow test above)."""
    import sys
    import types

    calls = []

    class FakeUMAP:
        def __init__(self, **kw):
            calls.append(kw)

        def fit_transform(self, X):
            calls[-1]["X"] = X
            return np.asarray(X[:, :2], dtype=np.float64)

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    X, _ = blobs()
    coords, idx = umap_2d(X * 7.0, seed=4, n_neighbors=500, max_points=50)
    kw = calls[-1]
    assert kw["metric"] == "cosine" and kw["random_state"] == 4 and kw["n_components"] == 2
    assert kw["n_neighbors"] == 49  # lowered to n - 1
    np.testing.assert_allclose(np.linalg.norm(kw["X"], axis=1), 1.0, atol=1e-12)  # normalised rows
    assert coords.shape == (50, 2) and coords.dtype == np.float32
    np.testing.assert_array_equal(idx, subsample_index(120, 50, seed=4))
    with pytest.raises(TreeprobeError):
        umap_2d(X[:3])


@pytest.mark.slow  # threads on a busy 2-core machine: seconds to minutes
def test_tsne_threads_do_not_change_the_map():
    X, _ = blobs(n_per=40)
    a, _ = tsne_2d(X, seed=0, perplexity=15, n_jobs=1, n_iter=100)
    b, _ = tsne_2d(X, seed=0, perplexity=15, n_jobs=2, n_iter=100)
    np.testing.assert_array_equal(a, b)
