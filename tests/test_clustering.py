"""Rank-wise clustering: purity, NMI/AMI/ARI against scikit-learn, chance baselines, the k-means paths."""

import math

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)

from treeprobe.clustering import (
    chance_baseline,
    cluster_labels,
    clustering_scores,
    purity_score,
    rankwise_clustering,
)
from tests._paths import real_tol_embeddings
from treeprobe.errors import TreeprobeError


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def planted(n_per=30, n_clusters=6, dim=16, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per)
    X = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    return X, labels


# --- purity ---------------------------------------------------------------------------

def test_purity_by_hand():
    t = [0, 0, 0, 1, 1, 1]
    assert purity_score(t, [0, 0, 1, 1, 2, 2]) == pytest.approx(5 / 6)  # 2 + 1 + 2
    assert purity_score(t, [0, 0, 0, 0, 0, 0]) == pytest.approx(3 / 6)
    assert purity_score([0, 0, 0, 0, 1, 1], [7] * 6) == pytest.approx(4 / 6)
    assert purity_score(t, [5, 5, 5, 9, 9, 9]) == 1.0
    assert purity_score(t, np.arange(6)) == 1.0  # singletons: pure by construction
    # string labels work too
    assert purity_score(list("aabbcc"), list("xxxyyy")) == pytest.approx(4 / 6)


def test_scores_equal_sklearn():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 7, 300), rng.integers(0, 5, 300)
    p[:100] = t[:100]
    s = clustering_scores(t, p)
    assert set(s) == {"purity", "nmi", "ami", "ari"}
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)
    assert s["ami"] == pytest.approx(adjusted_mutual_info_score(t, p), abs=1e-12)
    assert s["ari"] == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
    assert s["purity"] == pytest.approx(purity_score(t, p))


# --- chance baseline ------------------------------------------------------------------

def test_chance_random_clustering_has_no_excess():
    rng = np.random.default_rng(2)
    t, p = rng.integers(0, 8, 800), rng.integers(0, 12, 800)
    b = chance_baseline(t, p, n_permutations=30, seed=0)
    assert abs(b["purity_excess"]) < 0.05
    assert abs(b["purity"] - b["purity_chance"]) < 4 * b["purity_chance_sd"] + 1e-3
    assert abs(b["nmi"] - b["nmi_chance"]) < 4 * b["nmi_chance_sd"] + 1e-3
    assert abs(b["ari_chance"]) < 0.01 and abs(b["ami_chance"]) < 0.01
    assert b["purity_chance"] > 1 / 8  # chance purity is above 1/k_true


def test_chance_perfect_and_degenerate():
    t = np.repeat(np.arange(5), 20)
    p = (t + 3) % 5  # same partition, other names
    b = chance_baseline(t, p, n_permutations=10, seed=0)
    assert b["purity"] == 1.0 and b["ari"] == pytest.approx(1.0)
    assert b["purity_excess"] == pytest.approx(1.0)
    assert b["purity_chance"] < 0.4
    # every cluster a singleton: chance purity 1, excess undefined
    b = chance_baseline(t, np.arange(t.size), n_permutations=3)
    assert b["purity_chance"] == 1.0 and math.isnan(b["purity_excess"])
    # seeded
    rng = np.random.default_rng(0)
    q = rng.integers(0, 4, 100)
    b3 = chance_baseline(t, q, 5, seed=3)
    assert b3 == chance_baseline(t, q, 5, seed=3)
    assert b3["purity_chance"] != chance_baseline(t, q, 5, seed=4)["purity_chance"]  # the seed is used
    with pytest.raises(TreeprobeError):
        chance_baseline(t, q, scores=("purity", "bogus"))


# --- clustering -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_cluster_labels_recover_planted(method):
    X, y = planted()
    pred = cluster_labels(X, 6, method=method, seed=0)
    assert pred.dtype == np.int64 and pred.shape == y.shape
    assert adjusted_rand_score(y, pred) == pytest.approx(1.0)
    np.testing.assert_array_equal(pred, cluster_labels(X, 6, method=method, seed=0))


def test_cluster_labels_scale_invariant_and_matches_sklearn_ward():
    X, _ = planted(noise=0.6, seed=4)
    scale = np.random.default_rng(0).uniform(0.5, 50, size=(X.shape[0], 1))
    # cosine geometry: rescaling rows changes nothing
    np.testing.assert_array_equal(cluster_labels(X, 9, "agglomerative"),
                                  cluster_labels(X * scale, 9, "agglomerative"))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sk = AgglomerativeClustering(n_clusters=9, linkage="ward").fit_predict(Xn)
    assert adjusted_rand_score(sk, cluster_labels(X, 9, "agglomerative")) == pytest.approx(1.0)


def test_cluster_labels_minibatch_and_errors():
    X, y = planted()
    pred = cluster_labels(X, 6, "kmeans", minibatch_threshold=50)  # forces MiniBatchKMeans
    assert adjusted_rand_score(y, pred) > 0.95
    with pytest.raises(TreeprobeError, match="O\\(N\\^2\\)"):
        cluster_labels(X, 6, "agglomerative", max_agglomerative=100)
    with pytest.raises(TreeprobeError):
        cluster_labels(X, 0)
    with pytest.raises(TreeprobeError):
        cluster_labels(X, X.shape[0] + 1)
    with pytest.raises(TreeprobeError):
        cluster_labels(X, 3, method="spectral")


def test_rankwise_clustering_planted_hierarchy():
    X, fine = planted(n_per=20, n_clusters=8, noise=0.05, seed=5)
    codes = {"kingdom": np.zeros_like(fine), "family": fine // 2, "genus": fine,
             "species": np.arange(fine.size)}
    df = rankwise_clustering(X, codes, seed=0, n_permutations=5, progress=False)
    assert len(df) == 8
    assert list(df["rank"]) == ["kingdom"] * 2 + ["family"] * 2 + ["genus"] * 2 + ["species"] * 2
    for col in ("rank", "method", "k", "n_items", "n_singleton_taxa", "purity", "purity_chance",
                "purity_chance_sd", "purity_excess", "nmi", "nmi_chance", "ami", "ari",
                "ari_chance", "note"):
        assert col in df.columns
    single = df[df["rank"] == "kingdom"]
    assert (single["note"] == "single taxon").all() and single["purity"].isna().all()
    allsing = df[df["rank"] == "species"]
    assert allsing["note"].str.contains("k >= n_items").all() and allsing["nmi"].isna().all()
    assert (allsing["n_singleton_taxa"] == fine.size).all()
    genus = df[df["rank"] == "genus"].set_index("method")
    assert (genus["k"] == 8).all() and (genus["n_items"] == 160).all()
    assert genus["purity"].min() == pytest.approx(1.0)
    assert genus["purity_excess"].min() == pytest.approx(1.0)
    assert genus["ari"].min() == pytest.approx(1.0)
    assert (genus["purity_chance"] < 0.3).all()


def test_rankwise_clustering_passes_its_seed_to_clustering_and_chance():
    """Each row is cluster_labels(X, k, method, seed) scored by clustering_scores and chance_baseline
    with the same seed (a seed dropped on the way falls back to 0 and changes the chance values)."""
    X, fine = planted(n_per=15, n_clusters=6, noise=0.8, seed=11)
    codes = {"family": fine // 2, "genus": fine}
    df = rankwise_clustering(X, codes, seed=3, n_permutations=4, progress=False).set_index(["rank", "method"])
    for rank, c in codes.items():
        k = np.unique(c).size
        for method in ("kmeans", "agglomerative"):
            pred = cluster_labels(X, k, method, seed=3)
            want = {**clustering_scores(c, pred), **chance_baseline(c, pred, 4, seed=3, scores=("purity", "nmi", "ari"))}
            row = df.loc[(rank, method)]
            for col in ("purity", "nmi", "ami", "ari", "purity_chance", "purity_chance_sd", "purity_excess",
                        "nmi_chance", "ari_chance", "ari_chance_sd"):
                assert row[col] == pytest.approx(want[col], abs=1e-12), (rank, method, col)
    other = rankwise_clustering(X, codes, seed=4, n_permutations=4, progress=False).set_index(["rank", "method"])
    assert (other["purity_chance"] != df["purity_chance"]).any()


def test_rankwise_clustering_refuses_big_ward_with_note():
    X, fine = planted()
    df = rankwise_clustering(X, {"genus": fine}, max_agglomerative=10, n_permutations=2,
                             progress=False)
    row = df.set_index("method").loc["agglomerative"]
    assert "agglomerative skipped" in row["note"] and math.isnan(row["purity"])
    assert df.set_index("method").loc["kmeans", "purity"] == pytest.approx(1.0)
    with pytest.raises(TreeprobeError):
        rankwise_clustering(X, {"genus": fine[:-1]}, progress=False)


def test_real_bioclip2_clusters_follow_kingdom_and_class():
    X, codes = real_tol_embeddings()
    assert X.shape == (909, 768)
    sub = {r: codes[r] for r in ("kingdom", "phylum", "class")}
    df = rankwise_clustering(X, sub, seed=0, n_permutations=5, progress=False)
    # measured: kingdom purity 0.77 (kmeans) / 0.79 (ward) vs chance ~0.50 (excess 0.53 / 0.58),
    # NMI 0.22 / 0.23 vs chance 0.009; class excess 0.35 / 0.46
    for _, row in df.iterrows():
        assert row["purity_excess"] > 0.2, row.to_dict()
        assert row["nmi"] > row["nmi_chance"] + 0.1
        assert row["ari"] > 0.03 > abs(row["ari_chance"])
    king = df[df["rank"] == "kingdom"]
    assert (king["purity_excess"] > 0.4).all()
    assert (king["k"] == 5).all()


def test_n_threads_param_gives_same_labels():
    X, _ = planted(noise=0.5, seed=6)
    with threadpool_limits(2):
        a = cluster_labels(X, 5, "kmeans", seed=1, n_threads=1)
        b = cluster_labels(X, 5, "kmeans", seed=1, n_threads=None)
    np.testing.assert_array_equal(a, b)


# --- scale path ---------------------------------------------------------------------------

def test_fast_ami_and_permutation_scores_equal_sklearn():
    from treeprobe.clustering import _PermutationScorer, adjusted_mutual_info, expected_mutual_info
    from sklearn.metrics.cluster import contingency_matrix
    from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information

    rng = np.random.default_rng(11)
    for trial in range(40):
        n = int(rng.integers(2, 500))
        t = rng.integers(0, int(rng.integers(1, 40)), n)
        p = rng.integers(0, int(rng.integers(1, 40)), n)
        if trial % 3 == 0:
            p[: n // 2] = t[: n // 2]
        assert adjusted_mutual_info(t, p) == pytest.approx(adjusted_mutual_info_score(t, p), abs=1e-11)
        c = contingency_matrix(t, p, sparse=True)
        emi = expected_mutual_info(np.ravel(c.sum(1)), np.ravel(c.sum(0)), n, max_terms=50)  # many chunks
        assert emi == pytest.approx(expected_mutual_information(c, n), rel=1e-9, abs=1e-12)
        got = _PermutationScorer(t, p).scores(None, ("purity", "nmi", "ami", "ari"))
        assert got["purity"] == pytest.approx(purity_score(t, p), abs=1e-12)
        assert got["nmi"] == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)
        assert got["ami"] == pytest.approx(adjusted_mutual_info_score(t, p), abs=1e-11)
        assert got["ari"] == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)


def test_chance_baseline_equals_sklearn_on_permuted_labels():
    rng = np.random.default_rng(12)
    t, p = rng.integers(0, 9, 600), rng.integers(0, 14, 600)
    p[:200] = t[:200]
    b = chance_baseline(t, p, n_permutations=6, seed=5, scores=("purity", "nmi", "ami", "ari"))
    r = np.random.default_rng(5)
    perms = [r.permutation(t) for _ in range(6)]
    for name, f in (("purity", purity_score), ("nmi", normalized_mutual_info_score),
                    ("ami", adjusted_mutual_info_score), ("ari", adjusted_rand_score)):
        ref = [f(s, p) for s in perms]
        assert b[f"{name}_chance"] == pytest.approx(np.mean(ref), abs=1e-11)
        assert b[f"{name}_chance_sd"] == pytest.approx(np.std(ref, ddof=1), abs=1e-11)


def test_big_k_ami_is_fast():
    import time

    from treeprobe.clustering import adjusted_mutual_info

    rng = np.random.default_rng(13)
    t = np.repeat(np.arange(5000), 10)  # scikit-learn: about a minute
    p = np.where(rng.random(t.size) < 0.5, t, rng.integers(0, 5000, t.size))
    start = time.perf_counter()
    v = adjusted_mutual_info(t, p)
    assert time.perf_counter() - start < 5
    assert 0.2 < v < 0.6


def test_kmeans_plusplus_seeds():
    from treeprobe.clustering import kmeans_plusplus_seeds

    X, y = planted(n_per=20, n_clusters=8, noise=0.01, seed=3)
    s = kmeans_plusplus_seeds(X, 8, np.random.default_rng(0))
    assert s.dtype == np.int64 and np.unique(s).size == 8
    assert np.unique(y[s]).size == 8  # D^2 sampling finds every well-separated cluster
    np.testing.assert_array_equal(s, kmeans_plusplus_seeds(X, 8, np.random.default_rng(0)))
    dup = np.repeat(X[:3], 4, axis=0)  # 3 distinct points, k = 5: filled with unused rows
    s = kmeans_plusplus_seeds(dup, 5, np.random.default_rng(1))
    assert np.unique(s).size == 5
    with pytest.raises(TreeprobeError):
        kmeans_plusplus_seeds(X, X.shape[0] + 1, np.random.default_rng(0))


def test_minibatch_path_recovers_planted_and_is_seeded():
    X, y = planted(n_per=40, n_clusters=12, dim=80, noise=0.1, seed=9)
    a = cluster_labels(X, 12, "kmeans", seed=2, minibatch_threshold=100)  # PCA seeding: 80 -> 64 dims
    assert adjusted_rand_score(y, a) > 0.95
    np.testing.assert_array_equal(a, cluster_labels(X, 12, "kmeans", seed=2, minibatch_threshold=100))
    df = rankwise_clustering(X, {"genus": y}, methods=("kmeans",), minibatch_threshold=100,
                             n_permutations=3, progress=False)
    assert df.loc[0, "purity"] > 0.95 and df.loc[0, "ami"] > 0.9


def test_minibatch_random_seeds_above_kpp_max_k():
    from treeprobe.clustering import _kmeans_large

    X, y = planted(n_per=40, n_clusters=12, dim=20, noise=0.1, seed=10)
    a = _kmeans_large(X, 12, seed=1, n_init=1, kpp_max_k=5)  # k > 5: k random rows as seeds
    assert a.shape == y.shape and a.dtype == np.int64 and a.max() < 12
    assert adjusted_rand_score(y, a) > 0.7
    np.testing.assert_array_equal(a, _kmeans_large(X, 12, seed=1, n_init=1, kpp_max_k=5))


# --- unknown codes (-1) -------------------------------------------------------------------

def test_rankwise_clustering_scores_each_rank_on_its_known_items():
    X, fine = planted(n_per=20, n_clusters=8, noise=0.4, seed=7)
    rng = np.random.default_rng(0)
    n = fine.size
    genus = np.where(rng.random(n) < 0.25, -1, fine)
    genus[fine == 7] = -1  # a whole taxon unknown: if -1 were a taxon it would be a pure cluster
    family = np.where(rng.random(n) < 0.1, -1, fine // 2)
    codes = {"kingdom": np.zeros(n, int), "family": family, "genus": genus, "species": np.full(n, -1)}
    df = rankwise_clustering(X, codes, seed=0, n_permutations=4, progress=False)
    for rank in ("family", "genus"):
        c = codes[rank]
        known = c != -1
        # independent: the same call on the explicit subset of known items
        sub = rankwise_clustering(X[known], {rank: c[known]}, seed=0, n_permutations=4, progress=False)
        got = df[df["rank"] == rank].reset_index(drop=True)
        assert (got["n_unknown"] == (~known).sum()).all() and (sub["n_unknown"] == 0).all()
        assert (got["n_items"] == known.sum()).all() and (got["k"] == np.unique(c[known]).size).all()
        pd.testing.assert_frame_equal(got.drop(columns="n_unknown"), sub.drop(columns="n_unknown"))
        assert got["purity"].notna().all() and got["purity_chance"].notna().all()
    king = df[df["rank"] == "kingdom"]
    assert (king["n_unknown"] == 0).all() and (king["n_items"] == n).all()
    sp = df[df["rank"] == "species"]
    assert (sp["note"] == "every item unknown at this rank").all() and sp["purity"].isna().all()
    assert (sp["n_unknown"] == n).all() and (sp["n_items"] == 0).all()


def test_rankwise_clustering_unknowns_refuse_ward_by_known_size():
    X, fine = planted(n_per=10, n_clusters=4, seed=8)
    g = fine.copy()
    g[:25] = -1  # 15 known items
    df = rankwise_clustering(X, {"genus": g}, max_agglomerative=20, n_permutations=2, progress=False)
    assert df.set_index("method").loc["agglomerative", "purity"] == pytest.approx(1.0)  # 15 <= 20
    df = rankwise_clustering(X, {"genus": fine}, max_agglomerative=20, n_permutations=2, progress=False)
    assert "agglomerative skipped" in df.set_index("method").loc["agglomerative", "note"]  # 40 > 20


def test_clustering_public_api():
    import treeprobe.clustering as C
    from tests.test_neighbors import assert_public_api

    assert_public_api(C)
