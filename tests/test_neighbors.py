"""kNN: exact blocked cosine neighbours against scikit-learn and brute force, and rank agreement."""

import math

import numpy as np
import pandas as pd
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
    # the most any embedding can reach with these taxon sizes at k = 10 (by hand, species: 44
    # pairs, 6 triples, 1 of 4, 2 of 7 -> (88*1 + 18*2 + 4*3 + 14*6) / (124*10))
    assert df.loc["species", "ceiling"] == pytest.approx(220 / 1240)
    assert df.loc["genus", "ceiling"] == pytest.approx(0.2074, abs=1e-4)
    # measured: normalised 0.63 0.55 0.47 0.26 0.26 0.59 0.69 (kingdom..species): the raw
    # species agreement 0.12 is 69 % of the way from chance to its ceiling 0.18
    assert df.loc["species", "agreement_normalised"] > 0.5 > df.loc["species", "agreement"]
    assert ((df["agreement_normalised"] > 0.2) & (df["agreement_normalised"] <= 1)).all()
    # level-specific (outside the item's own child taxon), measured 0.17 0.19 0.33 0.17 0.20 0.53
    lev = df.iloc[:-1]
    assert (lev["level_agreement"] > lev["level_chance"] + 0.05).all()
    assert (lev["level_agreement"] < df["agreement"].iloc[:-1]).all()  # the child taxon no longer counts
    assert ((lev["level_normalised"] > 0.1) & (lev["level_normalised"] < 0.7)).all()


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
        # the normalised and level scores: their intervals cover the exact values too, and are
        # not much wider than the spread of the estimates
        cols = [("agreement_normalised", "agreement_normalised_ci95")]
        if rank == "family":
            cols.append(("level_agreement", "level_agreement_ci95"))
            cols.append(("level_normalised", "level_normalised_ci95"))
        for col, cicol in cols:
            v, vci = (np.array([d.loc[rank, c] for d in est]) for c in (col, cicol))
            assert np.mean(np.abs(v - e[col]) <= vci) >= 0.8, col
            assert 0.6 < vci.mean() / (1.96 * v.std(ddof=1)) < 1.6, col



# --- ceiling, level-specific agreement, unknown codes (-1) ------------------------------------

def _nested_codes(rng, n, n_species=60):
    """Random nested codes (order > family > genus > species) in shuffled item order, with
    uneven taxon sizes: ``n_species`` species (an upper bound; geometric sizes, many single
    items), 3 species a genus, 3 genera a family, 2 families an order."""
    sizes = rng.geometric(0.35, n_species)
    sp = np.repeat(np.arange(n_species), sizes)[:n]
    sp = np.concatenate([sp, rng.integers(0, n_species, n - sp.size)])
    sp = np.unique(sp, return_inverse=True)[1].ravel()[rng.permutation(n)]
    genus = sp // 3
    family = genus // 3
    order = family // 2
    return {"order": order, "family": family, "genus": genus, "species": sp}


def _with_gaps(rng, codes):
    """Copies of ``codes`` with -1 at random: a whole lineage below some rank, and single ranks
    (unknown genus, known species: a gap)."""
    out = {r: c.copy() for r, c in codes.items()}
    n = len(next(iter(codes.values())))
    ranks = list(codes)
    below = rng.random(n) < 0.1  # unknown from family down
    for r in ranks[1:]:
        out[r][below] = -1
    out["genus"][rng.random(n) < 0.1] = -1  # gaps: genus unknown, species known
    out["species"][rng.random(n) < 0.15] = -1
    return out


def _brute_scores(X, codes, k, queries=None):
    """Independent reference: per rank, plain scores from scikit-learn's brute-force cosine kNN
    and level scores from a full float64 similarity matrix with the child taxon masked out."""
    n = len(X)
    queries = np.arange(n) if queries is None else queries
    _, nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(X).kneighbors(X)
    assert (nn[:, 0] == np.arange(n)).all()
    nn = nn[:, 1:]
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T.copy()
    np.fill_diagonal(S, -np.inf)
    ranks = list(codes)
    out = {}
    for ri, r in enumerate(ranks):
        c = np.asarray(codes[r])
        agr, ceil, top1, lagr, lceil = [], [], [], [], []
        chance, lchance = [], []
        for i in range(n):
            if c[i] == -1:
                continue
            m = int((c == c[i]).sum())
            if m >= 2:
                chance.append((m - 1) / (n - 1))
                if i in queries:
                    same = (c[nn[i]] == c[i]) & (c[nn[i]] != -1)
                    agr.append(same.mean())
                    top1.append(same[0])
                    ceil.append(min(k, m - 1) / k)
            if ri + 1 < len(ranks):
                ch = np.asarray(codes[ranks[ri + 1]])
                child = (ch == ch[i]) if ch[i] != -1 else (np.arange(n) == i)
                a = int(((c == c[i]) & ~child).sum())
                if a >= 1 and int((~child).sum()) >= k:
                    lchance.append(a / (~child).sum())
                    if i in queries:
                        s = np.where(child, -np.inf, S[i])
                        order = np.lexsort((np.arange(n), -s))[:k]
                        lagr.append(np.mean(c[order] == c[i]))
                        lceil.append(min(k, a) / k)
        mean = lambda v: float(np.mean(v)) if len(v) else np.nan  # noqa: E731
        out[r] = dict(agreement=mean(agr), top1=mean(top1), ceiling=mean(ceil), chance=mean(chance),
                      n_evaluated=len(agr), n_unknown=int((c == -1).sum()),
                      level_agreement=mean(lagr), level_ceiling=mean(lceil), level_chance=mean(lchance),
                      level_n_evaluated=len(lagr) if ri + 1 < len(ranks) else np.nan)
    return out


def _assert_matches(df, ref):
    df = df.set_index("rank")
    for r, want in ref.items():
        for col, v in want.items():
            got = df.loc[r, col]
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(got), (r, col, got)
            else:
                assert got == pytest.approx(v, abs=1e-12), (r, col, got, v)


def _dense_codes(rng, n, n_species=90):
    """Nested codes with large taxa: species uniform over ``n_species``, 3 a genus, 4 genera a
    family, 3 families an order (many level buffers fill from outside the plain top k)."""
    sp = rng.integers(0, n_species, n)
    return {"order": sp // 36, "family": sp // 12, "genus": sp // 3, "species": sp}


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("taxa", ["uneven", "dense"])
def test_ceiling_and_level_agreement_equal_brute_force(use_numba, gaps, taxa, monkeypatch):
    _set_numba(monkeypatch, use_numba)
    rng = np.random.default_rng(21 + gaps)
    n = 420 if taxa == "uneven" else 600
    codes = _nested_codes(rng, n) if taxa == "uneven" else _dense_codes(rng, n)
    if gaps:
        codes = _with_gaps(rng, codes)
    # clustered by species, so neighbours share taxa well above chance but not always
    dim = 12 if taxa == "uneven" else 16
    X = rng.normal(size=(90, dim))[np.maximum(codes["species"], 0)] + 0.9 * rng.normal(size=(n, dim))
    ref = _brute_scores(X, codes, 7)
    for bs in (64, 4096):  # 64: many blocks, transposed (column) offers
        df = knn_rank_agreement(X, codes, k=7, block_size=bs)
        _assert_matches(df, ref)
    d = df.set_index("rank")
    assert list(d["level_child"]) == ["family", "genus", "species", ""]
    assert d.loc["species", "level_note"] == "finest rank: no child rank"
    assert (d["agreement"] <= d["ceiling"] + 1e-12).all()
    assert (d["level_agreement"].iloc[:-1] <= d["level_ceiling"].iloc[:-1] + 1e-12).all()
    norm = (d["agreement"] - d["chance"]) / (d["ceiling"] - d["chance"])
    np.testing.assert_allclose(d["agreement_normalised"], norm, atol=1e-12)
    lnorm = (d["level_agreement"] - d["level_chance"]) / (d["level_ceiling"] - d["level_chance"])
    np.testing.assert_allclose(d["level_normalised"], lnorm, atol=1e-12)
    np.testing.assert_allclose(d["top1_normalised"], (d["top1"] - d["chance"]) / (1 - d["chance"]), atol=1e-12)
    if gaps:
        assert (d["n_unknown"].iloc[1:] > 0).all() and 0 < d.loc["genus", "level_n_evaluated"]


def test_level_neighbours_exclude_the_child_taxon_exactly():
    # every item's nearest neighbours are its own species; outside it, its genus mates are next,
    # then the other genus: genus-level agreement counts only the genus mates outside the species
    codes = {"genus": np.repeat([0, 1], 6), "species": np.repeat([0, 1, 2, 3], 3)}
    sp = codes["species"]
    X = np.eye(4)[sp] * 10 + np.eye(4)[[0, 0, 2, 2]][sp] * 3 + 1e-3 * np.random.default_rng(0).normal(size=(12, 4))
    df = knn_rank_agreement(X, codes, k=4).set_index("rank")
    g = df.loc["genus"]
    # plain: 2 species mates + 2 of the 3 other congeners = 4/4; level: 3 congeners outside the
    # species, then 1 from the other genus = 3/4, which is the ceiling min(4, 3)/4
    assert g["agreement"] == 1.0 and g["ceiling"] == 1.0
    assert g["level_agreement"] == pytest.approx(0.75) and g["level_ceiling"] == pytest.approx(0.75)
    assert g["level_chance"] == pytest.approx(3 / 9) and g["level_normalised"] == pytest.approx(1.0)
    assert df.loc["species", "ceiling"] == pytest.approx(0.5)  # min(4, 2)/4


def _perfect_embedding(codes, noise=1e-4, seed=0):
    """One-hot blocks per rank, weighted so that sharing a finer rank always means more similar
    (similarities follow the tree), plus tiny noise that orders items within a taxon."""
    rng = np.random.default_rng(seed)
    blocks = []
    for depth, c in enumerate(codes.values()):
        dense = np.unique(c, return_inverse=True)[1].ravel()
        blocks.append(np.eye(dense.max() + 1)[dense] * 2.0 ** depth)
    X = np.hstack(blocks)
    return X + noise * rng.normal(size=X.shape)


@pytest.mark.parametrize("max_queries", [None, 150])
def test_perfect_embedding_reaches_the_ceiling_at_every_rank(max_queries):
    rng = np.random.default_rng(23)
    codes = _nested_codes(rng, 500, n_species=250)
    X = _perfect_embedding(codes)
    df = knn_rank_agreement(X, codes, k=10, max_queries=max_queries, seed=3).set_index("rank")
    # the raw agreement stays far below 1 at fine ranks: only the ceiling makes ranks comparable
    assert df.loc["species", "agreement"] < 0.6 and df.loc["species", "agreement_excess"] < 0.6
    np.testing.assert_allclose(df["agreement"], df["ceiling"], atol=1e-12)
    np.testing.assert_allclose(df["agreement_normalised"], 1.0, atol=1e-12)
    np.testing.assert_allclose(df["top1_normalised"], 1.0, atol=1e-12)
    lev = df.iloc[:-1]
    assert (lev["level_n_evaluated"] > 0).all()
    np.testing.assert_allclose(lev["level_agreement"], lev["level_ceiling"], atol=1e-12)
    np.testing.assert_allclose(lev["level_normalised"], 1.0, atol=1e-12)
    if max_queries:
        assert (df["estimator"] == "query-subsample").all()
        exact = knn_rank_agreement(X, codes, k=10).set_index("rank")
        assert (df["chance"] == exact["chance"]).all()  # chance: exact over all items
        assert not np.allclose(df["ceiling"], exact["ceiling"])  # ceiling: over the same queries
        # no sampling spread in the normalised score (every query at its own ceiling), although
        # agreement and ceiling vary: the interval is the rule of three, not their spread
        assert (df["agreement_ci95"] > 3 / df["n_evaluated"]).iloc[2:].all()
        # exactly 3/n times the finite-population correction over the scorable items (the exact
        # run's counts): every linearised residual is 0, so the sample has no spread at all
        def rule_of_three(n, n_pop):
            return 3.0 / n * np.sqrt((n_pop - n) / (n_pop - 1))

        np.testing.assert_allclose(df["agreement_normalised_ci95"],
                                   rule_of_three(df["n_evaluated"], exact["n_evaluated"]), rtol=1e-12)
        np.testing.assert_allclose(lev["level_normalised_ci95"],
                                   rule_of_three(lev["level_n_evaluated"], exact["level_n_evaluated"].iloc[:-1]),
                                   rtol=1e-12)


def test_null_random_embedding_scores_zero_normalised():
    # random embeddings know nothing of the taxonomy: normalised (and level) agreement ~ 0.
    # Tolerance: mean over 8 seeds within 0.004 of 0, every seed within 0.01 (measured: s.d.
    # of one seed 0.0007-0.002 per rank, N = 1500; both bounds are about 5 s.d.)
    vals = {c: [] for c in ("agreement_normalised", "level_normalised")}
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        codes = _nested_codes(rng, 1500, n_species=600)
        X = rng.normal(size=(1500, 16))
        df = knn_rank_agreement(X, codes, k=10).set_index("rank")
        vals["agreement_normalised"].append(df["agreement_normalised"].to_numpy())
        vals["level_normalised"].append(df["level_normalised"].to_numpy()[:-1])
    for name, v in vals.items():
        v = np.array(v)
        assert np.abs(v.mean(axis=0)).max() < 0.004, (name, v.mean(axis=0))
        assert np.abs(v).max() < 0.01, (name, v)


def test_unknown_codes_are_not_scored_and_never_agree():
    rng = np.random.default_rng(31)
    n = 300
    genus = np.repeat(np.arange(30), 10)
    X = rng.normal(size=(30, 8))[genus] + 0.3 * rng.normal(size=(n, 8))
    unknown = np.zeros(n, dtype=bool)
    unknown[genus < 6] = True  # six whole genera unknown: if -1 were a taxon they would all agree
    unknown[rng.choice(np.flatnonzero(genus >= 6), 20, replace=False)] = True
    g = np.where(unknown, -1, genus)
    row = knn_rank_agreement(X, {"genus": g}, k=5).iloc[0]
    idx, _ = knn_indices(X, 5)
    known = np.flatnonzero(~unknown)
    same = (g[idx[known]] == g[known][:, None]) & (g[idx[known]] != -1)
    m = np.array([(g == g[i]).sum() for i in known])
    assert row["n_unknown"] == unknown.sum() and row["n_evaluated"] == known.size
    assert row["n_taxa"] == 24 and row["n_excluded_singletons"] == 0
    assert row["agreement"] == pytest.approx(same.mean())
    assert row["chance"] == pytest.approx(np.mean((m - 1) / (n - 1)))  # known sizes, all N - 1 others
    assert row["ceiling"] == pytest.approx(np.mean(np.minimum(5, m - 1) / 5))
    # the same scores whatever the unknown items' codes would have been: -1 is "not this taxon"
    g2 = g.copy()
    g2[unknown] = -1
    assert knn_rank_agreement(X, {"genus": g2}, k=5).iloc[0]["agreement"] == row["agreement"]
    # a rank where nothing is known
    df = knn_rank_agreement(X, {"genus": g, "species": np.full(n, -1)}, k=5).set_index("rank")
    sp = df.loc["species"]
    assert sp["n_unknown"] == n and sp["n_evaluated"] == 0 and math.isnan(sp["agreement"])
    assert sp["note"] == "every item unknown at this rank"
    assert df.loc["genus", "level_n_evaluated"] == known.size  # unknown species: own child taxon
    # ... so the genus level neighbours are the plain ones
    assert df.loc["genus", "level_agreement"] == pytest.approx(row["agreement"])


def test_query_subsample_level_scores_are_the_brute_force_over_the_queries():
    rng = np.random.default_rng(41)
    n = 400
    codes = _with_gaps(rng, _nested_codes(rng, n))
    X = rng.normal(size=(60, 10))[np.maximum(codes["species"], 0)] + 1.0 * rng.normal(size=(n, 10))
    q = np.sort(np.random.default_rng(7).choice(n, 120, replace=False))  # the estimator's sample
    df = knn_rank_agreement(X, codes, k=6, max_queries=120, seed=7)
    ref = _brute_scores(X, codes, 6, queries=q)
    _assert_matches(df, ref)
    d = df.set_index("rank")
    assert (d["estimator"] == "query-subsample").all()
    assert (d["level_agreement_ci95"].iloc[:-1] > 0).all() and (d["agreement_normalised_ci95"] > 0).all()


def test_defaults_unchanged_and_level_off():
    rng = np.random.default_rng(51)
    codes = _nested_codes(rng, 300)
    X = rng.normal(size=(300, 6))
    full = knn_rank_agreement(X, codes, k=5)
    off = knn_rank_agreement(X, codes, k=5, level=False)
    plain = ["rank", "k", "n_taxa", "agreement", "chance", "agreement_excess", "top1", "n_evaluated",
             "n_excluded_singletons", "estimator", "n_queries", "agreement_ci95", "top1_ci95", "note"]
    assert list(full.columns[:len(plain)]) == plain  # existing columns first, in their order
    pd.testing.assert_frame_equal(full[plain], off[plain])
    assert off["level_agreement"].isna().all() and (off["level_note"] == "level=False").all()
    assert (full["n_unknown"] == 0).all()


def assert_public_api(module, max_positional=3):
    """Every callable in ``module.__all__`` takes at most ``max_positional`` positional
    parameters and has a docstring (shared with tests/test_clustering.py)."""
    import inspect

    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj):
            params = inspect.signature(obj).parameters.values()
            assert sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params) <= max_positional, name
            assert obj.__doc__, name


def test_public_api():
    import treeprobe._knn_kernels as K
    import treeprobe.neighbors as NB

    assert_public_api(NB)
    assert all(callable(getattr(K, name)) for name in K.__all__)


def test_level_scores_same_with_and_without_numba(monkeypatch):
    rng = np.random.default_rng(61)
    codes = _with_gaps(rng, _nested_codes(rng, 500))
    X = rng.normal(size=(60, 9))[np.maximum(codes["species"], 0)] + rng.normal(size=(500, 9))
    out = []
    for use_numba in (True, False):
        _set_numba(monkeypatch, use_numba)
        out.append([knn_rank_agreement(X, codes, k=8, block_size=128),
                    knn_rank_agreement(X, codes, k=8, block_size=128, max_queries=150, seed=2)])
    for fast, slow in zip(*out):
        pd.testing.assert_frame_equal(fast, slow, check_exact=True)


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("gaps", [False, True])
def test_level_buffers_hold_the_top_cap_outside_each_child_taxon(use_numba, gaps, monkeypatch):
    # the float32 top-cap buffers themselves (not only the top k re-scored from them), fed the
    # same blocks row-wise and transposed (the two numba kernels), against the full matrix of
    # those blocks with each row's child taxon masked out, level by level
    from treeprobe import neighbors as NB

    _set_numba(monkeypatch, use_numba)
    rng = np.random.default_rng(71 + gaps)
    n, cap = 600, 10
    codes = _dense_codes(rng, n)
    if gaps:
        codes = _with_gaps(rng, codes)
    X = rng.normal(size=(90, 16))[np.maximum(codes["species"], 0)] + 0.9 * rng.normal(size=(n, 16))
    X32 = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    ranks = list(codes)
    ccode = np.stack([NB._TaxonCodes(codes[r]).exclusion for r in ranks[1:]], axis=1)
    nested = NB._nested_rows(ccode)
    assert nested.all() != gaps  # the gaps make some rows non-nested
    rows = np.arange(300)
    blocks = [(c0, NB._gemm(X32[c0:c0 + 75], X32[rows])) for c0 in range(0, n, 75)]  # (75, 300) each
    full = np.concatenate([S for _, S in blocks]).T.copy()  # (300, n), the same float32 values
    full[rows, rows] = -np.inf
    for orientation in ("rows", "cols"):
        buf = NB._LevelSearch(rows.size, cap, ccode[rows], ccode, nested[rows])
        for c0, S in blocks:
            S = S.copy()
            own = np.arange(c0, c0 + S.shape[0])
            S[own < rows.size, own[own < rows.size]] = -np.inf  # self: never offered
            if orientation == "rows":
                buf.update(0, np.ascontiguousarray(S.T), c0)  # C-contiguous: the row kernel
            else:
                buf.update(0, S.T, c0)  # transposed view: the column kernel
        want = -np.sort(-full, axis=1)[:, :cap]
        np.testing.assert_array_equal(-np.sort(-buf.main.vals, axis=1), want)
        np.testing.assert_array_equal(buf.main.thr, want[:, -1])
        for lv in range(ccode.shape[1]):
            masked = np.where(ccode[rows, lv][:, None] == ccode[:, lv][None, :], -np.inf, full)
            want = -np.sort(-masked, axis=1)[:, :cap]
            np.testing.assert_array_equal(-np.sort(-buf.lvals[lv], axis=1), want, err_msg=f"{orientation} {lv}")
            np.testing.assert_array_equal(buf.lthr[:, lv], want[:, -1])
            got_sims = np.take_along_axis(full, buf.lidx[lv], axis=1)  # the indices match the values
            np.testing.assert_array_equal(got_sims, buf.lvals[lv])
