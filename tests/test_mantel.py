"""Mantel tests against scikit-bio, the exact clade-sum form, and simulations with known truth."""

import numpy as np
import pandas as pd
import pytest
from skbio import DistanceMatrix
from skbio.stats.distance import mantel as skbio_mantel

from treeprobe.errors import TreeprobeError
from treeprobe.mantel import (cosine_distance_matrix, mantel, mantel_tree, permutation_p_value, taxon_centroids)
from treeprobe.simulate import simulate_world
from treeprobe.taxonomy import RANKS, Taxonomy
from tests.test_tree import random_taxonomy


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
    assert est.ci[0] <= est.statistic <= est.ci[1]
    assert abs(est.statistic - exact.statistic) < 0.1


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
