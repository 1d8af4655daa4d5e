"""Mantel tests against scikit-bio, the exact clade-sum form, and simulations with known truth;
the species-permutation tests (between-species pairs, centroids) against explicit matrices, under
the null and with known signal; Spearman ties."""

import importlib

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from scipy.stats import binomtest
from skbio import DistanceMatrix
from skbio.stats.distance import mantel as skbio_mantel

from treeprobe.errors import TreeprobeError
from treeprobe.mantel import (PERMUTED_CENTROIDS, PERMUTED_IMAGES, PERMUTED_SPECIES, cosine_distance_matrix, mantel,
                              mantel_centroids, mantel_species, mantel_tree, permutation_p_value,
                              round_tree_distances, taxon_centroids)
from treeprobe.permutation import item_permutation, species_sizes, stratified_species_permutation
from treeprobe.simulate import simulate_world
from treeprobe.taxonomy import RANKS, Taxonomy
from treeprobe.tree import CladeStructure, clade_structure_from_tree
from tests._helpers import spy_mantel_permutations
from tests.test_tree import random_taxonomy, random_tree_structure

MM = importlib.import_module("treeprobe.mantel")  # the module (the package re-exports the function `mantel`)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_mantel_equals_skbio(method, seed):
    rng = np.random.default_rng(seed)
    n = 40
    a = rng.random((n, n)); a = a + a.T; np.fill_diagonal(a, 0)
    b = rng.random((n, n)) + 0.3 * a; b = b + b.T; np.fill_diagonal(b, 0)
    r_ref, p_ref, n_ref = skbio_mantel(DistanceMatrix(a), DistanceMatrix(b), method=method, permutations=0)
    res = mantel(a, b, method=method, permutations=0)
    assert res.statistic == pytest.approx(r_ref, abs=1e-9)
    assert np.isnan(res.p_value) and res.n_items == n_ref


@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("weights", [None, [4, 3, 2, 2, 1, 1, 0.5]])
def test_tree_mantel_equals_skbio(method, weights):
    tax = random_taxonomy(120, seed=3)
    cs = tax.clade_structure(weights)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 24)) + 1.5 * np.eye(24)[tax.codes("phylum") % 24]
    D, T = cosine_distance_matrix(X), cs.item_distances()
    r_ref, p_ref, _ = skbio_mantel(DistanceMatrix(D), DistanceMatrix(T), method=method, permutations=0)
    res = mantel_tree(X, cs, method=method, permutations=0)
    assert res.statistic == pytest.approx(r_ref, abs=1e-9)
    assert res.n_pairs == 120 * 119 // 2


def test_tree_mantel_permutation_distribution_matches_matrix_form():
    """Same permutations → the exact clade-sum form and the matrix form give the same permuted r."""
    tax = random_taxonomy(60, seed=5)
    cs = tax.clade_structure()
    X = np.random.default_rng(6).normal(size=(60, 8))
    D, T = cosine_distance_matrix(X), cs.item_distances()
    res_tree = mantel_tree(X, cs, permutations=99, seed=11, alternative="two-sided", perm_dtype=np.float64)
    res_mat = mantel(D, T, permutations=99, seed=11, alternative="two-sided")
    assert res_tree.statistic == pytest.approx(res_mat.statistic, abs=1e-12)
    assert res_tree.p_value == res_mat.p_value


def test_p_value_rule():
    perm = np.array([0.1, 0.5, -0.6, 0.2])
    assert permutation_p_value(0.5, perm, "greater") == pytest.approx(2 / 5)
    assert permutation_p_value(0.5, perm, "two-sided") == pytest.approx(3 / 5)
    assert permutation_p_value(-0.6, perm, "less") == pytest.approx(2 / 5)


def test_known_truth_brownian_world_is_significant():
    world = simulate_world(seed=0)
    tax = Taxonomy.from_frame(world.items)
    res = mantel_tree(world.embeddings, tax.clade_structure(), permutations=199, seed=0)
    assert res.statistic > 0.3
    assert res.p_value == pytest.approx(1 / 200)  # no permutation reaches it
    # centroids: one point per species (no within-species pairs), still clearly positive
    cent = taxon_centroids(world.embeddings, tax.codes("species"))
    first = np.unique(tax.codes("species"), return_index=True)[1]
    res_c = mantel_tree(cent, tax.clade_structure().subset_items(first), permutations=199, seed=0)
    assert res_c.statistic > 0.3 and res_c.p_value == pytest.approx(1 / 200)
    assert res_c.n_items == tax.n_taxa("species")


def test_random_embeddings_give_null_result():
    world = simulate_world(seed=1)
    tax = Taxonomy.from_frame(world.items)
    rs, ps = [], []
    for s in range(5):
        res = mantel_tree(world.null_embeddings(seed=s), tax.clade_structure(), permutations=99, seed=s)
        rs.append(res.statistic)
        ps.append(res.p_value)
    assert max(abs(r) for r in rs) < 0.03
    assert np.mean(ps) > 0.15  # uniform p-values under the null, not piled near 0


def test_spearman_subsample_estimator_is_named():
    tax = random_taxonomy(300, seed=7)
    X = np.random.default_rng(8).normal(size=(300, 8)) + 2 * np.eye(8)[tax.codes("kingdom")]
    exact = mantel_tree(X, tax.clade_structure(), method="spearman", permutations=0)
    est = mantel_tree(X, tax.clade_structure(), method="spearman", permutations=19, spearman_max_n=150,
                      spearman_repeats=4)
    assert exact.estimator == "exact"
    assert est.estimator.startswith("item-subsample (150 of 300")
    # the mean of the 5 subsample r and its 95 % t-interval (t(0.975, 4) = 2.776), written out
    allr = np.array(est.details["subsample_statistics"])
    half = scipy.stats.t.ppf(0.975, 4) * allr.std(ddof=1) / np.sqrt(5)
    assert est.statistic == pytest.approx(allr.mean(), abs=1e-15) and half > 0.01
    np.testing.assert_allclose(est.ci, (allr.mean() - half, allr.mean() + half), rtol=0, atol=1e-15)
    assert abs(est.statistic - exact.statistic) < 0.1
    assert est.p_value == pytest.approx(1 / 20)  # strong signal: no permutation of the first subsample reaches it


def test_bad_inputs():
    tax = random_taxonomy(20, seed=0)
    cs = tax.clade_structure()
    X = np.ones((20, 4))
    X[3] = np.nan
    with pytest.raises(TreeprobeError, match="NaN"):
        mantel_tree(X, cs)
    with pytest.raises(TreeprobeError, match="2-D"):
        mantel_tree(np.ones(20), cs)
    with pytest.raises(TreeprobeError, match="permutations must be >= 0"):
        mantel_tree(np.random.rand(20, 4), cs, permutations=-1)
    with pytest.raises(TreeprobeError, match="unknown alternative 'bigger'; choose from greater, less, two-sided"):
        mantel(np.ones((4, 4)) - np.eye(4), np.ones((4, 4)) - np.eye(4), alternative="bigger")
    with pytest.raises(TreeprobeError, match="spearman_max_n must be >= 3"):
        mantel_tree(np.random.rand(20, 4), cs, method="spearman", spearman_max_n=2)
    with pytest.raises(TreeprobeError, match="19 embeddings"):
        mantel_tree(np.ones((19, 4)), cs)
    with pytest.raises(TreeprobeError, match="method"):
        mantel_tree(np.random.rand(20, 4), cs, method="kendall")
    one = Taxonomy.from_frame(pd.DataFrame({r: ["a"] * 5 for r in RANKS}))
    with pytest.raises(TreeprobeError, match="same tree distance"):
        mantel_tree(np.random.rand(5, 3), one.clade_structure(), permutations=0)


# --- species as the exchangeable units: independent computation, null calibration, known truth ---------



def _explicit(X, T, codes, perm=None, method="pearson"):
    """r over between-species pairs from explicit N×N matrices (numpy/scipy only); slot k reads row perm[k]."""
    Xn = np.asarray(X, dtype=float)
    Xn = Xn / np.linalg.norm(Xn, axis=1, keepdims=True)
    D = 1.0 - Xn @ Xn.T
    if perm is not None:
        D = D[np.ix_(perm, perm)]
    i, j = np.triu_indices(len(codes), 1)
    b = codes[i] != codes[j]
    if method == "spearman":
        return scipy.stats.spearmanr(D[i, j][b], T[i, j][b])[0]
    return np.corrcoef(D[i, j][b], T[i, j][b])[0, 1]


def _species_problem(kind, seed, dtype=np.float64):
    """(X, clades, species codes) with species sizes 1..~6 and some tree signal."""
    rng = np.random.default_rng(seed)
    if kind == "rank":
        tax = random_taxonomy(240, seed)
        cs, codes = tax.clade_structure([3, 2, 2, 1.5, 1, 1, 0.25]), tax.codes("species")
    else:  # an ete3 tree with random branch lengths, some items on internal nodes; species = node
        cs = random_tree_structure(50, 240, seed=seed, internal_items=15)
        codes = np.unique(cs.item_node, return_inverse=True)[1]
        if kind == "shared-node":  # two species at each of some nodes: between-species pairs at t = 0
            split = rng.random(len(codes)) < 0.3
            codes = np.unique(codes * 2 + split, return_inverse=True)[1]
    X = rng.normal(size=(cs.n_items, 12)) + 1.5 * rng.normal(size=(cs.n_nodes, 12))[cs.item_node]
    X += 2.0 * rng.normal(size=(codes.max() + 1, 12))[codes]  # within-species similarity
    return X.astype(dtype), cs, codes


def _spy(monkeypatch):
    return spy_mantel_permutations(monkeypatch)


@pytest.mark.parametrize("kind", ["rank", "newick", "shared-node"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_species_pearson_equals_explicit_between_species_pairs(kind, dtype):
    X, cs, codes = _species_problem(kind, 1, dtype)
    res = mantel_species(X, cs, codes, permutations=0)
    T = cs.item_distances()
    assert res.statistic == pytest.approx(_explicit(X, T, codes), abs=1e-10)
    i, j = np.triu_indices(len(codes), 1)
    within = codes[i] == codes[j]
    assert res.n_pairs == int((~within).sum()) and res.n_items == len(codes)
    d = res.details
    Xn = X.astype(float) / np.linalg.norm(X.astype(float), axis=1, keepdims=True)
    D = (1 - Xn @ Xn.T)[i, j]
    assert d["n_within_species_pairs"] == int(within.sum())
    assert d["mean_within_species_distance"] == pytest.approx(D[within].mean(), abs=1e-10)
    assert d["mean_between_species_distance"] == pytest.approx(D[~within].mean(), abs=1e-10)
    assert d["mean_tree_distance"] == pytest.approx(T[i, j][~within].mean(), rel=1e-12)
    sizes = species_sizes(codes)
    assert d["n_species"] == len(sizes) and d["n_strata"] == len(np.unique(sizes))
    assert d["n_permutable_species"] == int(sum(c for c in np.bincount(sizes) if c > 1))
    assert d["permuted"] == PERMUTED_SPECIES
    if kind == "shared-node":  # some between-species pairs at tree distance 0: still exact
        assert (T[i, j][~within] == 0).any()


@pytest.mark.parametrize("method", ["pearson", "spearman"])
@pytest.mark.parametrize("kind", ["rank", "newick"])
def test_species_permutation_distribution_equals_explicit(method, kind, monkeypatch):
    """The same species permutations (same seed) applied to explicit matrices give the same permuted r."""
    X, cs, codes = _species_problem(kind, 2)
    T = cs.item_distances() if method == "pearson" else round_tree_distances(cs.item_distances())
    calls = _spy(monkeypatch)
    res = mantel_species(X, cs, codes, method=method, permutations=25, seed=7, alternative="two-sided")
    rng = np.random.default_rng(7)
    sizes = species_sizes(codes)
    ref = [_explicit(X, T, codes, item_permutation(codes, stratified_species_permutation(sizes, rng)), method)
           for _ in range(25)]
    assert res.statistic == pytest.approx(_explicit(X, T, codes, method=method), abs=1e-10)
    assert np.abs(calls[-1] - ref).max() < 1e-10
    assert np.ptp(calls[-1]) > 1e-3  # the permutations moved something
    assert res.p_value == permutation_p_value(res.statistic, np.array(ref), "two-sided")


def test_species_test_numpy_fallback_and_threads_agree(monkeypatch):
    X, cs, codes = _species_problem("newick", 3)
    kw = dict(permutations=40, seed=1, alternative="two-sided")
    calls = _spy(monkeypatch)
    fast = mantel_species(X, cs, codes, n_jobs=1, **kw)
    two = mantel_species(X, cs, codes, n_jobs=2, **kw)
    monkeypatch.setenv("TREEPROBE_NO_NUMBA", "1")
    slow = mantel_species(X, cs, codes, **kw)
    assert fast.details["backend"] == "numba" and slow.details["backend"] == "numpy"
    assert fast.statistic == pytest.approx(slow.statistic, abs=1e-12)
    assert np.abs(calls[0] - calls[2]).max() < 1e-12 and np.array_equal(calls[0], calls[1])
    assert fast.p_value == slow.p_value == two.p_value


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_centroid_test_equals_explicit(method, monkeypatch):
    X, cs, codes = _species_problem("rank", 4)
    sizes = species_sizes(codes)
    C = np.array([X[codes == s].astype(float).T @ (1 / np.linalg.norm(X[codes == s], axis=1))
                  for s in range(len(sizes))])  # Σ of unit rows (the norm is taken in _explicit)
    first = np.unique(codes, return_index=True)[1]
    cs_c = cs.subset_items(first)
    T = cs_c.item_distances()
    if method == "spearman":
        T = round_tree_distances(T)
    calls = _spy(monkeypatch)
    res = mantel_centroids(X, cs, codes, method=method, permutations=30, seed=5, alternative="two-sided")
    unit = np.arange(len(sizes))
    assert res.statistic == pytest.approx(_explicit(C, T, unit, method=method), abs=1e-10)
    assert res.statistic == pytest.approx(mantel_tree(C, cs_c, method=method, permutations=0).statistic, abs=1e-10)
    rng = np.random.default_rng(5)
    ref = [_explicit(C, T, unit, item_permutation(unit, stratified_species_permutation(sizes, rng)), method)
           for _ in range(30)]
    assert np.abs(calls[0] - ref).max() < 1e-10
    assert res.n_items == len(sizes) and res.n_pairs == len(sizes) * (len(sizes) - 1) // 2
    assert res.details["permuted"] == PERMUTED_CENTROIDS and res.details["n_images"] == len(codes)


def test_mantel_tree_names_what_it_permutes():
    X, cs, codes = _species_problem("rank", 5)
    img = mantel_tree(X, cs, permutations=9)
    assert img.details["permuted"] == PERMUTED_IMAGES
    assert img.n_pairs == len(codes) * (len(codes) - 1) // 2
    a = mantel_tree(X, cs, permutations=19, permute="species", species_codes=codes)
    b = mantel_species(X, cs, codes, permutations=19)
    assert a.statistic == b.statistic and a.p_value == b.p_value and a.details["permuted"] == PERMUTED_SPECIES
    with pytest.raises(TreeprobeError, match="needs species_codes"):
        mantel_tree(X, cs, permute="species")
    with pytest.raises(TreeprobeError, match="unknown permute 'taxa'"):
        mantel_tree(X, cs, permute="taxa")


def test_species_spearman_subsample_estimator_is_named():
    X, cs, codes = _species_problem("rank", 6)
    exact = mantel_species(X, cs, codes, method="spearman", permutations=0)
    est = mantel_species(X, cs, codes, method="spearman", permutations=19, spearman_max_n=120, spearman_repeats=4)
    assert exact.estimator == "exact"
    assert est.estimator == "species-subsample (whole species up to 120 of 240 items, 5 subsamples)"
    d = est.details
    assert all(n <= 120 for n in d["subsample_items"]) and len(d["subsample_statistics"]) == 5
    allr = np.array(d["subsample_statistics"])
    half = scipy.stats.t.ppf(0.975, 4) * allr.std(ddof=1) / np.sqrt(5)  # 95 % t-interval of the mean of 5
    assert est.statistic == pytest.approx(allr.mean(), abs=1e-15) and half > 1e-3
    np.testing.assert_allclose(est.ci, (allr.mean() - half, allr.mean() + half), rtol=0, atol=1e-15)
    assert abs(est.statistic - exact.statistic) < 0.1
    # p of the first subsample's species-permutation test (its r is p_value_subsample_statistic):
    # measured (1 + 2) / (19 + 1)
    assert est.p_value == pytest.approx(3 / 20) and d["permuted"] == PERMUTED_SPECIES


def test_species_bad_inputs():
    X, cs, codes = _species_problem("rank", 7)
    moved = CladeStructure(parent=cs.parent, length=cs.length, item_node=cs.item_node.copy(), names=cs.names)
    two = np.flatnonzero(species_sizes(codes)[codes] > 1)[0]
    moved.item_node[two] = cs.item_node[np.flatnonzero(codes != codes[two])[0]]
    with pytest.raises(TreeprobeError, match="more than one tree node"):
        mantel_species(X, moved, codes)
    with pytest.raises(TreeprobeError, match="at least 2 species"):
        one = CladeStructure(parent=cs.parent, length=cs.length, item_node=np.full(5, cs.item_node[0]), names=cs.names)
        mantel_species(X[:5], one, np.zeros(5, dtype=int))
    with pytest.raises(TreeprobeError, match="codes for rank 'species'"):
        mantel_species(X, cs, codes[:-1])
    with pytest.raises(TreeprobeError, match="every code used"):
        mantel_species(X, cs, codes * 2)


# --- calibration under the null --------------------------------------------------------------------------

_SMALL_TREE = [(1, 2), (1, 2), (1, 2), (1, 2), (1, 3), (2, 3)]  # ~30-60 species in 2 kingdoms


def species_cluster_world(seed, dim=8):
    """Null world: each species its own random cluster, unrelated to the tree above species
    (1-4 images per species). Returns (X, clades, species codes)."""
    w = simulate_world(seed=seed, n_kingdoms=2, branching=_SMALL_TREE, images_per_species=(1, 4), dim=dim)
    rng = np.random.default_rng([seed, 1])
    codes = w.item_species
    X = rng.normal(size=(w.n_species, dim))[codes] + 0.5 * rng.normal(size=(len(codes), dim))
    return X, Taxonomy.from_frame(w.items).clade_structure(), codes


def size_clade_world(seed, dim=8):
    """Null world for centroids: 4 images per species in kingdom 0, 1 elsewhere; every image is the
    same mean direction plus noise (no species or tree signal). Returns (X, clades, species codes)."""
    w = simulate_world(seed=seed, n_kingdoms=2, branching=_SMALL_TREE, images_per_species=1, dim=dim)
    sizes = np.where(w.species_ancestors[:, 0] == 0, 4, 1)
    codes = np.repeat(np.arange(w.n_species), sizes)
    tax = Taxonomy.from_frame(w.species_lineage.iloc[codes].reset_index(drop=True))
    X = 1.0 + np.random.default_rng([seed, 2]).normal(size=(len(codes), dim))
    return X, tax.clade_structure(), codes


def _rejection(pvalues, alpha=0.05):
    k = int(np.sum(np.asarray(pvalues) <= alpha))
    ci = binomtest(k, len(pvalues)).proportion_ci(0.95)
    return k / len(pvalues), (ci.low, ci.high)


def _null_species(worlds):
    ps, ps_img = [], []
    for s in range(worlds):
        X, cs, codes = species_cluster_world(s)
        ps.append(mantel_species(X, cs, codes, permutations=99, seed=s).p_value)
        if s < 20:  # the image-permutation test on the same worlds: rejects nearly always
            ps_img.append(mantel_tree(X, cs, permutations=99, seed=s).p_value)
    return _rejection(ps), _rejection(ps_img)


def _null_centroids(worlds):
    ps, ps_free = [], []
    for s in range(worlds):
        X, cs, codes = size_clade_world(s)
        ps.append(mantel_centroids(X, cs, codes, permutations=99, seed=s).p_value)
        first = np.unique(codes, return_index=True)[1]  # centroids permuted freely (ignoring image counts)
        ps_free.append(mantel_tree(taxon_centroids(X, codes), cs.subset_items(first), permutations=99,
                                   seed=s).p_value)
    return _rejection(ps), _rejection(ps_free)


def test_null_species_clusters_species_permutation_is_calibrated():
    (rate, (lo, hi)), (rate_img, _) = _null_species(100)
    assert lo <= 0.05 <= hi, (rate, lo, hi)
    assert rate_img > 0.8  # permuting images rejects: the null it tests (exchangeable images) is false


def test_null_size_clade_world_centroid_test_is_calibrated():
    (rate, (lo, hi)), (rate_free, (lo_free, _)) = _null_centroids(100)
    assert lo <= 0.05 <= hi, (rate, lo, hi)
    assert lo_free > 0.05  # free centroid permutation is miscalibrated in this world


@pytest.mark.slow
def test_slow_null_calibration_1000_worlds():
    (rate, (lo, hi)), _ = _null_species(1000)
    assert lo <= 0.05 <= hi, (rate, lo, hi)
    (rate, (lo, hi)), _ = _null_centroids(1000)
    assert lo <= 0.05 <= hi, (rate, lo, hi)


def test_known_truth_brownian_world_species_tests_detect_it():
    world = simulate_world(seed=0)
    tax = Taxonomy.from_frame(world.items)
    cs, codes = tax.clade_structure(), world.item_species
    res = mantel_species(world.embeddings, cs, codes, permutations=199, seed=0)
    assert res.statistic > 0.3 and res.p_value == pytest.approx(1 / 200)
    assert res.details["mean_within_species_distance"] < res.details["mean_between_species_distance"]
    res_c = mantel_centroids(world.embeddings, cs, codes, permutations=199, seed=0)
    assert res_c.statistic > 0.3 and res_c.p_value == pytest.approx(1 / 200)
    res_s = mantel_species(world.embeddings, cs, codes, method="spearman", permutations=99, seed=0)
    assert res_s.statistic > 0.3 and res_s.p_value == pytest.approx(1 / 100)


# --- Spearman ties -------------------------------------------------------------------------------------


def test_spearman_tree_distances_tie_exactly_on_an_ultrametric_tree():
    """On an ultrametric Newick tree, equal patristic distances computed along different paths
    differ by float rounding, so ties break differently in treeprobe and in scikit-bio (their
    tip-to-tip distances) and Spearman r differed (|Δρ| ~1e-4). Rounded to the stated resolution,
    both sides tie exactly and agree to float precision."""
    import io

    from ete3 import Tree
    from skbio import TreeNode

    rng = np.random.default_rng(2)
    t = Tree()
    t.populate(80, random_branches=True)
    t.convert_to_ultrametric()
    nw = t.write(format=1)
    names = [leaf.name for leaf in Tree(nw, format=1).get_leaves()]
    items = [names[k] for k in rng.integers(0, len(names), 300)]
    cs, mask = clade_structure_from_tree(Tree(nw, format=1), items)
    X = rng.normal(size=(300, 16)) + 2 * rng.normal(size=(cs.n_nodes, 16))[cs.item_node]
    idx = [names.index(s) for s in items]
    T_sk = TreeNode.read(io.StringIO(nw)).tip_tip_distances(names).data[np.ix_(idx, idx)]
    D = cosine_distance_matrix(X)
    raw = skbio_mantel(DistanceMatrix(D), DistanceMatrix(T_sk, validate=False), method="spearman",
                       permutations=0)[0]
    tied = skbio_mantel(DistanceMatrix(D), DistanceMatrix(round_tree_distances(T_sk)), method="spearman",
                        permutations=0)[0]
    res = mantel_tree(X, cs, method="spearman", permutations=0)
    assert len(np.unique(round_tree_distances(T_sk))) < len(np.unique(T_sk))  # rounding made ties
    assert abs(raw - tied) > 1e-6  # unrounded scikit-bio breaks those ties
    assert res.statistic == pytest.approx(tied, abs=1e-12)
    codes = np.unique(items, return_inverse=True)[1]  # species = leaves: the between-species test ties too
    res_sp = mantel_species(X, cs, codes, method="spearman", permutations=0)
    assert res_sp.statistic == pytest.approx(_explicit(X, round_tree_distances(T_sk), codes, method="spearman"),
                                             abs=1e-10)
    assert abs(res_sp.statistic - _explicit(X, T_sk, codes, method="spearman")) > 1e-6


@pytest.mark.parametrize("weights", [None, [3, 2, 2, 1.5, 1, 1, 0.25], [0.7, 0.3, 0.1, 0.1, 0.2, 0.3, 0.1]])
def test_spearman_rounding_leaves_rank_taxonomy_results_identical(weights, monkeypatch):
    from scipy.spatial.distance import squareform

    tax = random_taxonomy(300, seed=9)
    cs = tax.clade_structure(weights)
    X = np.random.default_rng(10).normal(size=(300, 8)) + np.eye(8)[tax.codes("class") % 8]
    T = squareform(cs.item_distances(), checks=False)
    assert np.array_equal(scipy.stats.rankdata(T), scipy.stats.rankdata(round_tree_distances(T)))
    codes = tax.codes("species")
    kw = dict(method="spearman", permutations=29, seed=1)
    rounded = [mantel_tree(X, cs, **kw), mantel_species(X, cs, codes, **kw)]
    monkeypatch.setattr(MM, "round_tree_distances", lambda t: np.asarray(t, dtype=float))
    unrounded = [mantel_tree(X, cs, **kw), mantel_species(X, cs, codes, **kw)]
    for a, b in zip(rounded, unrounded):
        assert a.statistic == b.statistic and a.p_value == b.p_value
