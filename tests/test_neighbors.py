"""kNN: exact blocked cosine neighbours against scikit-learn and brute force, and rank agreement."""

import math

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from tests._paths import real_tol_embeddings
from treeprobe.errors import TreeprobeError
from treeprobe.neighbors import knn_indices, knn_rank_agreement

from treeprobe.taxonomy import RANKS


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.mark.parametrize("block_size", [1, 7, 50, 4096])
def test_knn_equals_sklearn_brute(block_size):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(257, 12)) * rng.uniform(0.1, 10, size=(257, 1))
    idx, sim = knn_indices(X, 7, block_size=block_size)
    assert idx.shape == (257, 7) and idx.dtype == np.int64
    dist, ref = NearestNeighbors(n_neighbors=8, metric="cosine", algorithm="brute").fit(X).kneighbors(X)
    assert (ref[:, 0] == np.arange(257)).all()
    np.testing.assert_array_equal(idx, ref[:, 1:])
    np.testing.assert_allclose(sim, 1 - dist[:, 1:], atol=1e-12)
    assert (idx != np.arange(257)[:, None]).all()
    assert (np.diff(sim, axis=1) <= 0).all()


def test_knn_float32_keeps_dtype_and_k_max():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5)).astype(np.float32)
    idx, sim = knn_indices(X, 39, block_size=8)  # k = N - 1: everyone else
    assert sim.dtype == np.float32
    for i in range(40):
        assert sorted(idx[i]) == [j for j in range(40) if j != i]


def test_knn_ties_broken_by_index():
    base = np.random.default_rng(2).normal(size=(5, 3))
    X = np.repeat(base, 4, axis=0)  # groups of 4 identical points
    for bs in (3, 5, 100):
        idx, sim = knn_indices(X, 3, block_size=bs)
        for i in range(20):
            g = i // 4
            assert list(idx[i]) == [j for j in range(4 * g, 4 * g + 4) if j != i]
        np.testing.assert_allclose(sim, 1.0, atol=1e-12)


def test_knn_errors():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(TreeprobeError):
        knn_indices(X, 10)
    with pytest.raises(TreeprobeError):
        knn_indices(X, 0)
    with pytest.raises(TreeprobeError, match="2-D"):
        knn_indices(X[0], 2, normalised=True)
    X[3] = 0
    with pytest.raises(TreeprobeError, match="zeros"):
        knn_indices(X, 2)
    with pytest.raises(TreeprobeError):
        knn_rank_agreement(np.ones((5, 2)) + np.eye(5, 2), {"genus": np.zeros(5, int)}, k=5)
    with pytest.raises(TreeprobeError, match="2-D"):
        knn_rank_agreement(np.ones(5), {"genus": np.zeros(5, int)}, k=1)
    with pytest.raises(TreeprobeError, match="codes for rank 'genus'"):
        knn_rank_agreement(np.eye(5), {"genus": np.zeros(4, int)}, k=1)
    with pytest.raises(TreeprobeError, match="max_queries must be >= 2"):
        knn_rank_agreement(np.eye(5), {"genus": np.zeros(5, int)}, k=1, max_queries=1)


def test_agreement_planted_clusters_near_one():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 20))
    y = np.repeat(np.arange(5), 40)
    X = centres[y] + 0.05 * rng.normal(size=(200, 20))
    df = knn_rank_agreement(X, {"kingdom": y // 3, "genus": y}, k=10)
    g = df.set_index("rank").loc["genus"]
    assert g["agreement"] == 1.0 and g["top1"] == 1.0
    assert g["chance"] == pytest.approx(39 / 199)
    assert g["agreement_excess"] == pytest.approx(1.0)
    assert g["n_evaluated"] == 200 and g["n_excluded_singletons"] == 0 and g["n_taxa"] == 5


def test_agreement_random_labels_is_chance():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(1200, 16))
    y = rng.integers(0, 4, 1200)
    row = knn_rank_agreement(X, {"order": y}, k=15).iloc[0]
    assert abs(row["agreement"] - row["chance"]) < 0.02
    assert abs(row["agreement_excess"]) < 0.03
    assert row["chance"] == pytest.approx(0.25, abs=0.01)


def test_agreement_singletons_and_single_taxon():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(12, 4))
    species = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8])  # 7 singletons
    df = knn_rank_agreement(
        X, {"kingdom": np.zeros(12, int), "species": species, "strain": np.arange(12)}, k=3
    ).set_index("rank")
    sp = df.loc["species"]
    assert sp["n_evaluated"] == 5 and sp["n_excluded_singletons"] == 7
    # chance by hand: 3 items with n_t=3 -> 2/11, 2 items with n_t=2 -> 1/11
    assert sp["chance"] == pytest.approx((3 * 2 / 11 + 2 * 1 / 11) / 5)
    k = df.loc["kingdom"]
    assert k["note"] == "single taxon" and k["agreement"] == 1.0 and math.isnan(k["agreement_excess"])
    st = df.loc["strain"]
    assert st["n_evaluated"] == 0 and math.isnan(st["agreement"]) and st["note"]


def test_real_bioclip2_knn_agreement_far_above_chance():
    X, codes = real_tol_embeddings()
    df = knn_rank_agreement(X, codes, k=10).set_index("rank")
    assert list(df.index) == list(RANKS)
    king = df.loc["kingdom"]
    # measured: agreement 0.790, chance 0.446, excess 0.62, top1 0.89 (909 items, 5 kingdoms)
    assert king["n_evaluated"] == 909
    assert king["agreement"] > king["chance"] + 0.25
    assert king["agreement_excess"] > 0.5
    assert king["top1"] > 0.8
    # every rank above chance; chance falls with rank
    assert (df["agreement"] > df["chance"] + 0.1).all()
    assert (np.diff(df["chance"].to_numpy()) < 0).all()
    assert (np.diff(df["n_excluded_singletons"].to_numpy()) >= 0).all()


# --- scale path: float32 products, float64 re-scoring, numba / numpy kernels -----------------

def _brute(X, k):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T.copy()
    np.fill_diagonal(S, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(X)), S.shape), -S), axis=1)[:, :k]
    return order, np.take_along_axis(S, order, axis=1)


def _set_numba(monkeypatch, use_numba: bool) -> None:
    if use_numba:
        monkeypatch.delenv("TREEPROBE_NO_NUMBA", raising=False)
    else:
        monkeypatch.setenv("TREEPROBE_NO_NUMBA", "1")


@pytest.mark.parametrize("use_numba", [True, False])
def test_knn_multi_block_kernels_equal_brute(use_numba, monkeypatch):
    _set_numba(monkeypatch, use_numba)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 24))
    X = centres[rng.integers(0, 40, 700)] + 0.3 * rng.normal(size=(700, 24))
    ref_idx, ref_sim = _brute(X, 12)
    for bs in (300, 700):  # 300: off-diagonal blocks (transposed scans), parallel kernels
        idx, sim = knn_indices(X, 12, block_size=bs)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(sim, ref_sim, atol=1e-12)


def test_knn_near_ties_fall_back_to_exact_rows():
    # 30 copies of each of 12 directions: every row has 29 exact ties at similarity 1, more than
    # the k + extra float32 buffer holds, so the float64 fallback decides (ties by index)
    rng = np.random.default_rng(8)
    X = np.repeat(rng.normal(size=(12, 6)), 30, axis=0)
    idx, sim = knn_indices(X, 5, block_size=64, extra=2)
    for i in range(len(X)):
        g = i // 30
        assert list(idx[i]) == [j for j in range(30 * g, 30 * g + 30) if j != i][:5]
    np.testing.assert_allclose(sim, 1.0, atol=1e-12)


def test_knn_float32_input_is_rescored_in_float64():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(400, 64)).astype(np.float32)
    idx, sim = knn_indices(X, 8, block_size=128)
    ref_idx, ref_sim = _brute(X.astype(np.float64), 8)
    np.testing.assert_array_equal(idx, ref_idx)
    assert sim.dtype == np.float32
    np.testing.assert_allclose(sim, ref_sim, atol=1e-6)


@pytest.mark.parametrize("use_numba", [True, False])
def test_knn_of_query_rows_equals_those_rows_of_the_full_search(use_numba, monkeypatch):
    _set_numba(monkeypatch, use_numba)
    rng = np.random.default_rng(11)
    X = rng.normal(size=(900, 24))[rng.integers(0, 300, 900)] + 0.05 * rng.normal(size=(900, 24))
    X[10] = X[3]  # exact duplicates: near-ties take the float64 fallback
    ref_idx, ref_sim = _brute(X, 8)
    q = np.r_[3, 10, np.sort(rng.choice(900, 200, replace=False))]
    for bs in (64, 900):
        idx, sim = knn_indices(X, 8, block_size=bs, queries=q)
        np.testing.assert_array_equal(idx, ref_idx[q])  # query positions never mistaken for items
        np.testing.assert_allclose(sim, ref_sim[q], atol=1e-12)
    with pytest.raises(TreeprobeError, match="queries"):
        knn_indices(X, 8, queries=np.array([0, 900]))


def test_query_subsample_agreement_covers_the_exact_value():
    rng = np.random.default_rng(5)
    genus = rng.integers(0, 150, 4000)
    centres = rng.normal(size=(150, 16))
    X = centres[genus] + 1.2 * rng.normal(size=(4000, 16))
    codes = {"family": genus // 5, "genus": genus}
    exact = knn_rank_agreement(X, codes, k=10).set_index("rank")
    assert (exact["estimator"] == "exact").all() and exact["agreement_ci95"].isna().all()
    assert knn_rank_agreement(X, codes, k=10, max_queries=4000).equals(exact.reset_index())
    est = [knn_rank_agreement(X, codes, k=10, max_queries=400, seed=s).set_index("rank") for s in range(30)]
    for rank in codes:
        e = exact.loc[rank]
        assert 0.2 < e["agreement"] < 0.9  # neither trivial nor saturated
        a = np.array([d.loc[rank, "agreement"] for d in est])
        ci = np.array([d.loc[rank, "agreement_ci95"] for d in est])
        t1, t1ci = (np.array([d.loc[rank, c] for d in est]) for c in ("top1", "top1_ci95"))
        assert est[0].loc[rank, "estimator"] == "query-subsample" and est[0].loc[rank, "n_queries"] == 400
        assert (ci > 0).all() and np.ptp(a) > 0
        assert np.mean(np.abs(a - e["agreement"]) <= ci) >= 0.8  # nominal 95 %
        assert np.mean(np.abs(t1 - e["top1"]) <= t1ci) >= 0.8
        assert abs(a.mean() - e["agreement"]) < 2 * ci.mean() / np.sqrt(len(a)) + 1e-3  # unbiased
        assert all(d.loc[rank, "chance"] == e["chance"] for d in est)  # chance stays exact

