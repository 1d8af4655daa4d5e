"""K_mult (treeprobe.physignal) against explicit matrices (numpy C and C⁻¹), R phytools (Blomberg's K),
under the null (shuffled traits, false-positive rate) and on known truth (Brownian traits: K ≈ 1);
the permutation p-value replayed from its seed; invariances; the TreeData entry point."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import scipy.stats
from scipy.stats import binomtest

import treeprobe as tp
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.physignal import PERMUTED_TIPS, TIE_TOLERANCE, kmult, kmult_test, phylo_tree, physignal
from treeprobe.simulate import simulate_world
from treeprobe.taxonomy import Taxonomy
from treeprobe.tree import CladeStructure, clade_structure_from_tree

TOL = 1e-10


# --- the independent computation: explicit matrices ------------------------------------------------


def covariance(cs: CladeStructure) -> np.ndarray:
    """Brownian covariance of the items of cs: C_ij = shared root path = (r_i + r_j − d_ij) / 2."""
    r = cs.root_distance()[cs.item_node]
    return (r[:, None] + r[None, :] - cs.item_distances()) / 2


def explicit_parts(Y, C):
    """(K, MSE0, MSE, E, a) from the definitions (Adams 2014), with np.linalg on the S×S matrix C."""
    Y = np.asarray(Y, dtype=float)
    S = len(Y)
    Ci = np.linalg.inv(C)
    one = np.ones(S)
    s = one @ Ci @ one
    a = one @ Ci @ Y / s
    R = Y - a
    mse0 = np.trace(R.T @ R) / (S - 1)
    mse = np.trace(R.T @ Ci @ R) / (S - 1)
    E = (np.trace(C) - S / s) / (S - 1)
    return mse0 / mse / E, mse0, mse, E, a


def explicit_k(Y, C) -> float:
    return explicit_parts(Y, C)[0]


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


def random_clades(n_nodes, seed, *, zero_internal=0.2, leaf_share=0.8, internal_tips=0):
    """A random tree with polytomies, unary nodes, zero-length internal branches and leaves without
    species; species on a random share of the leaves (and optionally on internal nodes)."""
    rng = np.random.default_rng(seed)
    parent = np.full(n_nodes, -1)
    for v in range(1, n_nodes):
        parent[v] = rng.integers(0, v) if rng.random() < 0.3 else rng.integers(max(0, v - 5), v)
    length = rng.uniform(0.05, 2.0, n_nodes)
    length[0] = 0.0
    n_child = np.bincount(parent[1:], minlength=n_nodes)
    internal = np.flatnonzero(n_child > 0)
    length[internal[rng.random(len(internal)) < zero_internal]] = 0.0
    length[0] = 0.0
    leaves = np.flatnonzero(n_child == 0)
    k = max(3, int(round(leaf_share * len(leaves))))
    tips = rng.choice(leaves, k, replace=False)
    if internal_tips:
        tips = np.r_[tips, rng.choice(internal[1:], internal_tips, replace=False)]
    return CladeStructure(parent=parent, length=length, item_node=tips,
                          names=np.array([f"n{v}" for v in range(n_nodes)], dtype=object))


def world_tree(world, rank_lengths=None):
    """Rank taxonomy of a simulated world's species (row i = species i) and its traits."""
    tax = Taxonomy.from_frame(world.species_lineage)
    return tax.clade_structure(rank_lengths), world.species_traits


# --- against explicit matrices --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_kmult_equals_explicit_matrices_on_random_trees(seed):
    cs = random_clades(70, seed)
    rng = np.random.default_rng(100 + seed)
    for D in (1, 5):
        Y = rng.normal(size=(cs.n_items, D)) + 3.0  # away from 0: the centring matters
        assert rel(kmult(Y, cs), explicit_k(Y, covariance(cs))) < TOL


def test_kmult_equals_explicit_on_polytomy_heavy_and_deep_trees():
    rng = np.random.default_rng(0)
    star = CladeStructure(parent=np.r_[-1, np.zeros(30, int)], length=np.r_[0.0, rng.uniform(0.1, 1, 30)],
                          item_node=np.arange(1, 31), names=np.array([""] * 31, dtype=object))
    n = 40  # caterpillar over n leaves (pre-order: leaf, then the rest of the spine): depth n − 1
    cat_parent = np.array([-1] + [v - 1 if v % 2 else v - 2 for v in range(1, 2 * n - 1)])
    cat = CladeStructure(parent=cat_parent, length=rng.uniform(0.1, 1, len(cat_parent)),
                         item_node=np.flatnonzero(np.bincount(cat_parent[1:], minlength=len(cat_parent)) == 0),
                         names=np.array([""] * len(cat_parent), dtype=object))
    for cs in (star, cat):
        Y = rng.normal(size=(cs.n_items, 4))
        assert rel(kmult(Y, cs), explicit_k(Y, covariance(cs))) < TOL


def test_sampled_ancestors_and_one_zero_terminal_branch_are_exact():
    """A species at an internal node, and a tip with a zero-length branch (C still non-singular)."""
    for seed in range(5):
        cs = random_clades(60, seed, internal_tips=3)
        length = cs.length.copy()
        leaf_tips = cs.item_node[np.bincount(cs.parent[1:], minlength=cs.n_nodes)[cs.item_node] == 0]
        length[leaf_tips[0]] = 0.0  # one zero terminal branch
        cs = CladeStructure(parent=cs.parent, length=length, item_node=cs.item_node, names=cs.names)
        C = covariance(cs)
        assert np.linalg.cond(C) < 1e12
        Y = np.random.default_rng(seed).normal(size=(cs.n_items, 3))
        assert rel(kmult(Y, cs), explicit_k(Y, C)) < TOL


@pytest.mark.parametrize("rank_lengths", [None, [3, 2, 2, 1.5, 1, 0.5, 0.25], [1, 1, 0, 0, 1, 1, 1]])
def test_kmult_equals_explicit_on_rank_taxonomy(rank_lengths):
    world = simulate_world(n_kingdoms=2, branching=[(1, 3), (1, 3), (1, 3), (1, 2), (1, 3), (1, 4)], dim=4,
                           trait_dim=6, seed=3)
    cs, Y = world_tree(world, rank_lengths)
    assert rel(kmult(Y, cs), explicit_k(Y, covariance(cs))) < TOL
    assert rel(kmult(Y[:, :1], cs), explicit_k(Y[:, :1], covariance(cs))) < TOL


def test_parts_gls_mean_and_weights_equal_explicit():
    cs = random_clades(80, 7)
    C = covariance(cs)
    Y = np.random.default_rng(1).normal(size=(cs.n_items, 6)) * [1, 2, 3, 4, 5, 6] + 10
    K, mse0, mse, E, a = explicit_parts(Y, C)
    tr = phylo_tree(cs.parent, cs.length, cs.item_node)
    Ci1 = np.linalg.solve(C, np.ones(len(C)))
    assert np.allclose(tr.gls_weights(), Ci1 / Ci1.sum(), rtol=1e-10, atol=1e-13)
    assert rel(tr.delta_root, 1 / Ci1.sum()) < TOL
    assert rel(tr.trace_c, np.trace(C)) < TOL
    res = kmult_test(Y, tr, permutations=0, n_axes=2)
    assert rel(res.statistic, K) < TOL and rel(res.mse0, mse0) < TOL and rel(res.mse, mse) < TOL
    assert rel(res.expected, E) < TOL
    assert np.isnan(res.p_value) and np.isnan(res.z)


def test_tip_at_the_root_and_stem_length_are_handled_exactly():
    """K depends on C only through C + l·11ᵀ: a species at zero distance from the root (C singular) is
    the limit, equal to the explicit K with C + 11ᵀ; a stem above the root changes nothing."""
    rng = np.random.default_rng(5)
    cs = random_clades(50, 2)
    Y = rng.normal(size=(cs.n_items + 1, 3))
    # a new species hanging from the root by a zero-length branch
    parent = np.r_[cs.parent, 0]
    length = np.r_[cs.length, 0.0]
    cs0 = CladeStructure(parent=parent, length=length, item_node=np.r_[cs.item_node, len(parent) - 1],
                         names=np.append(cs.names, "zero"))
    C0 = covariance(cs0)
    assert np.abs(C0[-1]).max() == 0  # a zero row: C is singular
    assert rel(kmult(Y, cs0), explicit_k(Y, C0 + 1.0)) < TOL
    # a stem (the old root hangs below a new root by a branch of length 2.5) and a unary chain
    Y = Y[:-1]
    stem = CladeStructure(parent=np.r_[-1, 0, 1, cs.parent[1:] + 2], length=np.r_[0.0, 1.5, 1.0, cs.length[1:]],
                          item_node=cs.item_node + 2, names=np.append(["r0", "r1"], cs.names))
    C = covariance(cs)
    assert rel(kmult(Y, stem), kmult(Y, cs)) < 1e-12
    assert rel(explicit_k(Y, C + 2.5), explicit_k(Y, C)) < 1e-9


def test_singular_and_invalid_trees_raise():
    two_zero = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0, 1.0, 0, 0, 1]),
                              item_node=np.array([2, 3, 4]), names=np.array([""] * 5, dtype=object))
    Y = np.arange(6.0).reshape(3, 2)
    with pytest.raises(TreeprobeError, match="singular"):
        kmult(Y, two_zero)
    # lengthening zero terminal branches makes it computable, equal to the explicit K on that tree
    tr = phylo_tree(two_zero.parent, two_zero.length, two_zero.item_node, min_terminal_length=0.01)
    fixed = CladeStructure(parent=two_zero.parent, length=np.array([0, 1.0, 0.01, 0.01, 1]),
                           item_node=two_zero.item_node, names=two_zero.names)
    assert rel(kmult(Y, tr), explicit_k(Y, covariance(fixed))) < TOL
    with pytest.raises(TreeprobeError, match="same node"):
        phylo_tree([-1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 2])
    with pytest.raises(TreeprobeError, match="at least 3"):
        phylo_tree([-1, 0, 0], [0, 1, 1], [1, 2])
    with pytest.raises(TreeprobeError, match="parent"):
        phylo_tree([-1, 2, 0, 0], [0, 1, 1, 1], [1, 2, 3])
    with pytest.raises(TreeprobeError, match="non-negative"):
        phylo_tree([-1, 0, 0, 0], [0, 1, -1, 1], [1, 2, 3])
    with pytest.raises(TreeprobeError, match="rows"):
        kmult(np.zeros((4, 2)), tr)
    with pytest.raises(TreeprobeError, match="do not vary"):
        kmult_test(np.ones((3, 2)), tr)


# --- invariances ----------------------------------------------------------------------------------


def _reversed_preorder(cs: CladeStructure) -> CladeStructure:
    """The same tree numbered by another pre-order (children visited in reverse order)."""
    n = cs.n_nodes
    children = [[] for _ in range(n)]
    for v in range(1, n):
        children[cs.parent[v]].append(v)
    order, stack = [], [0]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(children[v])  # popped last-first: reversed child order
    new = np.empty(n, dtype=int)
    new[order] = np.arange(n)
    order = np.asarray(order)
    parent = np.where(cs.parent[order] >= 0, new[np.maximum(cs.parent[order], 0)], -1)
    return CladeStructure(parent=parent, length=cs.length[order], item_node=new[cs.item_node], names=cs.names[order])


def test_invariances_rotation_scale_translation_relabelling():
    cs = random_clades(90, 11)
    rng = np.random.default_rng(2)
    S, D = cs.n_items, 7
    Y = rng.normal(size=(S, D)) + np.linspace(0, 1, S)[:, None]
    k = kmult(Y, cs)
    Qm, _ = np.linalg.qr(rng.normal(size=(D, D)))
    assert rel(kmult(Y @ Qm, cs), k) < 1e-12
    assert rel(kmult(1e-3 * Y, cs), k) < 1e-12 and rel(kmult(1e3 * Y + 50.0, cs), k) < 1e-12
    order = rng.permutation(S)  # rows move with their tips
    relabelled = CladeStructure(parent=cs.parent, length=cs.length, item_node=cs.item_node[order], names=cs.names)
    assert rel(kmult(Y[order], relabelled), k) < 1e-12
    assert rel(kmult(Y, _reversed_preorder(cs)), k) < 1e-12
    # a genuine change of the tip assignment does change K (the test above can fail)
    assert rel(kmult(Y[order], cs), k) > 1e-3


# --- permutations ---------------------------------------------------------------------------------


def test_permutation_p_value_replays_with_explicit_loop():
    cs = random_clades(60, 4)
    C = covariance(cs)
    S = cs.n_items
    rng = np.random.default_rng(9)
    X = rng.normal(size=(S, 3))
    Y = X + 0.5 * np.linalg.cholesky(C) @ rng.normal(size=(S, 3))  # some signal: p in between
    B = 99
    res = kmult_test(Y, cs, permutations=B, seed=123, n_axes=2)
    replay = np.random.default_rng(123)
    k_obs = explicit_k(Y, C)
    k_perm = np.array([explicit_k(Y[replay.permutation(S)], C) for _ in range(B)])
    assert np.allclose(res.random_statistics, k_perm, rtol=1e-10, atol=0)
    p_ref = (1 + np.sum(k_perm >= k_obs * (1 - TIE_TOLERANCE))) / (1 + B)
    assert res.p_value == p_ref
    assert 0.02 < p_ref < 0.98  # an informative p, not a floor or a ceiling
    # z: log K standardised among all B + 1 values (population sd), the observed included
    assert res.z == pytest.approx(scipy.stats.zscore(np.log(np.r_[k_obs, k_perm]))[0], rel=1e-9)
    assert res.permuted == PERMUTED_TIPS and res.permutations == B and res.n_species == S and res.n_dims == 3


def test_ties_count_as_at_least_as_large():
    """On a star tree of equal branches every permutation maps the tree onto itself: every permuted K
    equals K up to rounding, and p is exactly 1 (no rounding-dependent count)."""
    S = 25
    star = phylo_tree(np.r_[-1, np.zeros(S, int)], np.r_[0.0, np.full(S, 0.7)], np.arange(1, S + 1))
    Y = np.random.default_rng(0).normal(size=(S, 6)) * 10
    res = kmult_test(Y, star, permutations=200, seed=0, n_axes=2)
    assert np.allclose(res.random_statistics, res.statistic, rtol=1e-12)
    assert res.statistic == pytest.approx(1.0, rel=1e-12)  # C = 0.7·I: K = (S − 1)/(S − 1) = 1
    assert res.p_value == 1.0 and res.per_axis.p_value.tolist() == [1.0, 1.0]


def test_threads_and_numpy_fallback_give_the_same_numbers(monkeypatch):
    cs = random_clades(120, 6)
    Y = np.random.default_rng(3).normal(size=(cs.n_items, 9))
    one = kmult_test(Y, cs, permutations=40, seed=5, n_axes=3, n_jobs=1)
    two = kmult_test(Y, cs, permutations=40, seed=5, n_axes=3, n_jobs=2)
    assert np.array_equal(one.random_statistics, two.random_statistics)
    assert one.per_axis.equals(two.per_axis)
    monkeypatch.setenv("TREEPROBE_NO_NUMBA", "1")
    slow = kmult_test(Y, cs, permutations=40, seed=5, n_axes=3, n_jobs=1)
    assert slow.details["backend"] == "numpy" and one.details["backend"] == "numba"
    assert np.allclose(slow.random_statistics, one.random_statistics, rtol=1e-11, atol=0)
    assert slow.p_value == one.p_value
    assert np.allclose(slow.per_axis[["K", "p_value", "K_cumulative"]], one.per_axis[["K", "p_value", "K_cumulative"]],
                       rtol=1e-11)


def test_per_axis_table_equals_explicit_pca():
    cs = random_clades(70, 8)
    C = covariance(cs)
    S = cs.n_items
    rng = np.random.default_rng(4)
    Y = rng.normal(size=(S, 5)) * [3, 2, 1, 0.5, 0.2] + np.linalg.cholesky(C) @ rng.normal(size=(S, 5))
    res = kmult_test(Y, cs, permutations=19, seed=1, n_axes=5)
    Yc = Y - Y.mean(axis=0)
    U, sv, Vt = np.linalg.svd(Yc, full_matrices=False)
    scores = U * sv
    tab = res.per_axis
    assert tab.axis.tolist() == [1, 2, 3, 4, 5]
    assert np.allclose(tab.variance_share, sv**2 / np.sum(sv**2), rtol=1e-9)
    for j in range(5):  # K of each axis alone = Blomberg's K of its scores (the sign does not matter)
        assert rel(tab.K[j], explicit_k(scores[:, [j]], C)) < 1e-9
        assert rel(tab.K_cumulative[j], explicit_k(scores[:, :j + 1], C)) < 1e-9
    assert rel(tab.K_cumulative.iloc[-1], res.statistic) < 1e-9  # all axes: K itself
    replay = np.random.default_rng(1)
    k1 = np.array([explicit_k(scores[replay.permutation(S), :1], C) for _ in range(19)])
    assert tab.p_value[0] == (1 + np.sum(k1 >= tab.K[0] * (1 - TIE_TOLERANCE))) / 20
    json.dumps(res.to_dict())  # JSON-ready


# --- known truth and the null ---------------------------------------------------------------------


def test_brownian_traits_give_k_near_one_and_small_p():
    """Brownian traits on the true tree. Measured over seeds 0..19 (D = 16, 170-420 species):
    K mean 1.007, sd 0.054, range 0.93-1.11; here seeds 0..5, each within 0.2 of 1, mean within 0.08."""
    ks = []
    for seed in range(6):
        world = simulate_world(seed=seed, dim=4, trait_dim=16)
        cs, Y = world_tree(world)
        res = kmult_test(Y, cs, permutations=99, seed=seed, n_axes=2)
        assert abs(res.statistic - 1) < 0.2
        assert res.p_value == pytest.approx(1 / 100) and res.z > 5
        ks.append(res.statistic)
    assert abs(np.mean(ks) - 1) < 0.08


def test_shuffled_traits_give_small_k_and_uniform_p():
    """Traits shuffled among species (no tree structure): K ≈ 0.25 on these worlds (measured
    0.24-0.26), far below 1, and p uniform."""
    ps, ks = [], []
    for seed in range(40):
        world = simulate_world(n_kingdoms=2, seed=seed, dim=4, trait_dim=4)
        cs, Y = world_tree(world)
        Y = Y[np.random.default_rng(1000 + seed).permutation(len(Y))]
        res = kmult_test(Y, cs, permutations=99, seed=seed, n_axes=0)
        ps.append(res.p_value)
        ks.append(res.statistic)
    assert max(ks) < 0.45
    assert scipy.stats.kstest(ps, "uniform").pvalue > 0.01
    assert 0.3 < np.mean(ps) < 0.7


def test_iid_traits_match_the_null_expectation():
    """iid traits in many dimensions (the ratio concentrates): K equals the ratio of expectations
    (S − 2 + S·wᵀw) / ((tr C⁻¹ − s·wᵀw)·E) (measured 0.25466 ± 0.0004 against 0.25471 here)."""
    world = simulate_world(n_kingdoms=2, seed=0, dim=4, trait_dim=4)
    cs, _ = world_tree(world)
    C = covariance(cs)
    Ci = np.linalg.inv(C)
    S, s = len(C), Ci.sum()
    w = Ci.sum(axis=1) / s
    E = (np.trace(C) - S / s) / (S - 1)
    predicted = (S - 2 + S * w @ w) / ((np.trace(Ci) - s * w @ w) * E)
    k = kmult(np.random.default_rng(0).normal(size=(S, 512)), cs)
    assert k == pytest.approx(predicted, rel=0.02)
    assert predicted < 0.3


@pytest.mark.slow
def test_null_false_positive_rate_is_nominal():
    """iid Gaussian centroids on one fixed rank tree: the share of p ≤ 0.05 over 400 null worlds (99
    permutations each) has a 95 % binomial interval containing 0.05 (measured: see the report)."""
    world = simulate_world(n_kingdoms=2, seed=0, dim=4, trait_dim=4)
    cs, _ = world_tree(world)
    tr = phylo_tree(cs.parent, cs.length, cs.item_node)
    rng = np.random.default_rng(2024)
    n_worlds = 400
    hits = 0
    for w in range(n_worlds):
        Y = rng.normal(size=(tr.n_tips, 8))
        hits += kmult_test(Y, tr, permutations=99, seed=w, n_axes=0).p_value <= 0.05
    ci = binomtest(int(hits), n_worlds).proportion_ci(0.95)
    print(f"false-positive rate {hits}/{n_worlds} = {hits / n_worlds:.4f}, 95% CI ({ci.low:.4f}, {ci.high:.4f})")
    assert ci.low <= 0.05 <= ci.high


# --- on a TreeData --------------------------------------------------------------------------------


def test_physignal_on_treedata_matches_independent_centroids_and_tree():
    world = simulate_world(seed=1, dim=16, trait_dim=8, noise=0.3)
    data = tp.TreeData(world.embeddings, world.items)
    res = physignal(data, permutations=49, seed=0, n_axes=3)
    # independent: per-species mean of the unit embeddings (pandas), renormalised; the world's Newick tree
    from ete3 import Tree

    unit = world.embeddings / np.linalg.norm(world.embeddings, axis=1, keepdims=True)
    species = world.items["species"].to_numpy()
    names = sorted(set(species))
    cent = np.array([unit[species == s].mean(axis=0) for s in names])
    cs, mask = clade_structure_from_tree(Tree(world.newick(), format=1), names)
    assert mask.all()
    k_ref = explicit_k(cent / np.linalg.norm(cent, axis=1, keepdims=True), covariance(cs))
    assert rel(res.statistic, k_ref) < 1e-6  # data.unit is float32: rounding of ~1e-8 per value
    assert res.p_value == pytest.approx(1 / 50) and res.n_species == world.n_species
    assert res.details["n_items"] == world.n_items
    raw = physignal(data, permutations=0, renormalise=False, n_axes=0)
    assert rel(raw.statistic, explicit_k(cent, covariance(cs))) < 1e-6
    assert rel(raw.statistic, res.statistic) > 1e-4  # not renormalised: a different statistic
    # the same tree given as Newick (string) gives the same K as the rank taxonomy (unit lengths)
    by_newick = physignal(data, tree=world.newick(), permutations=0, n_axes=0)
    assert rel(by_newick.statistic, res.statistic) < 1e-9
    assert by_newick.details["tree"]["kind"].startswith("user tree")
    # an ete3 tree over some of the species: the others are left out, with a warning
    part_tree = Tree(world.newick(), format=1)
    keep = names[:-7]
    part_tree.prune(keep, preserve_branch_length=True)
    with pytest.warns(TreeprobeWarning, match="covers"):
        part = physignal(data, tree=part_tree, permutations=0, n_axes=0)
    assert part.n_species == len(keep) and part.details["n_items_not_in_tree"] == int((~np.isin(species, keep)).sum())
    cs_part, _ = clade_structure_from_tree(part_tree, keep)
    k_part = explicit_k(cent[:-7] / np.linalg.norm(cent[:-7], axis=1, keepdims=True), covariance(cs_part))
    assert rel(part.statistic, k_part) < 1e-6


def test_size_strata_permutations_replay_and_differ_from_free():
    """The default scheme on a TreeData: species swap tips only with species of as many images; each
    permuted K equals the explicit K of the centroids permuted by the replayed stratified draws."""
    from treeprobe.permutation import stratified_sampler
    from treeprobe.physignal import PERMUTED_TIPS_BY_SIZE

    world = simulate_world(seed=4, dim=8, trait_dim=8, noise=1.5, images_per_species=(1, 4))
    data = tp.TreeData(world.embeddings, world.items)
    B = 59
    res = physignal(data, permutations=B, seed=11, n_axes=0)
    free = physignal(data, permutations=B, seed=11, n_axes=0, permute="free")
    assert res.permuted == PERMUTED_TIPS_BY_SIZE and free.permuted == PERMUTED_TIPS
    assert res.statistic == free.statistic  # the scheme changes the null, never the statistic
    from ete3 import Tree

    from treeprobe.tl import _mantel_inputs

    units = _mantel_inputs(data, None, None)[2]  # the tips' order: one species per unit code
    unit = world.embeddings / np.linalg.norm(world.embeddings, axis=1, keepdims=True)
    species = data.items["species"].to_numpy()
    names = [species[units == u][0] for u in range(units.max() + 1)]
    cent = np.array([unit[species == s].mean(axis=0) for s in names])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cs, _ = clade_structure_from_tree(Tree(world.newick(), format=1), names)
    C = covariance(cs)
    sizes = np.array([(species == s).sum() for s in names])
    assert rel(res.statistic, explicit_k(cent, C)) < 1e-6
    assert len(set(sizes)) > 1  # several strata: the two schemes differ
    draw, replay = stratified_sampler(sizes), np.random.default_rng(11)
    perms = [draw(replay) for _ in range(B)]
    assert all((sizes[p] == sizes).all() for p in perms)
    k_perm = np.array([explicit_k(cent[p], C) for p in perms])
    assert np.allclose(res.random_statistics, k_perm, rtol=1e-6, atol=0)  # float32 data.unit
    assert not np.allclose(res.random_statistics, free.random_statistics)
    with pytest.raises(TreeprobeError, match="unknown K_mult permutation scheme 'tips'"):
        physignal(data, permutations=0, permute="tips")


def test_physignal_real_bioclip_embeddings_show_signal():
    """902 real BioCLIP 2 embeddings, 838 species on the rank taxonomy: K ≈ 0.46 (measured 0.4574), far
    above shuffled data (~0.25 on such trees) and below Brownian motion; no permutation reaches it."""
    ds = tp.datasets.bioclip2_1k()
    res = physignal(ds, permutations=199, seed=0, n_axes=3)
    assert res.n_species == 838 and res.n_dims == 768
    assert 0.40 < res.statistic < 0.52
    assert res.p_value == pytest.approx(1 / 200) and res.z > 10
    assert res.per_axis.variance_share.iloc[0] > res.per_axis.variance_share.iloc[1]


# --- R: phytools' Blomberg K and the K_mult formula in R ------------------------------------------


def _newick(cs: CladeStructure) -> str:
    """Newick of a tree whose leaves all carry species, tip i labelled t{i}."""
    label = {int(v): f"t{i}" for i, v in enumerate(cs.item_node)}
    children = [[] for _ in range(cs.n_nodes)]
    for v in range(1, cs.n_nodes):
        children[cs.parent[v]].append(v)

    def write(v):
        body = label.get(v, "")
        if children[v]:
            body = "(" + ",".join(write(c) for c in children[v]) + ")" + body
        return f"{body}:{float(cs.length[v])!r}" if v else body

    return write(0) + ";"


def _full_leaf_tree(n_nodes, seed):
    cs = random_clades(n_nodes, seed, zero_internal=0.1, leaf_share=1.0)
    return cs


@pytest.mark.slow
def test_blomberg_k_and_kmult_equal_r(tmp_path):
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not installed")
    cases = []
    for seed in range(6):
        cs = _full_leaf_tree(60, seed)
        Y = np.random.default_rng(seed).normal(size=(cs.n_items, 4))
        cases.append((cs, Y))
    world = simulate_world(n_kingdoms=2, branching=[(1, 3), (1, 3), (1, 3), (1, 2), (1, 3), (1, 4)], seed=3,
                           dim=4, trait_dim=4)
    cs, Y = world_tree(world, [2, 1, 1, 1, 0.5, 0.5, 0.25])
    cases.append((cs, Y))
    lines = []
    for i, (cs, Y) in enumerate(cases):
        (tmp_path / f"t{i}.nwk").write_text(_newick(cs))
        np.savetxt(tmp_path / f"y{i}.csv", Y, delimiter=",")
    script = tmp_path / "k.R"
    script.write_text(f"""
suppressMessages(library(phytools))
for (i in 0:{len(cases) - 1}) {{
  tree <- collapse.singles(read.tree(file.path("{tmp_path}", paste0("t", i, ".nwk"))))
  Y <- as.matrix(read.csv(file.path("{tmp_path}", paste0("y", i, ".csv")), header = FALSE))
  rownames(Y) <- paste0("t", seq_len(nrow(Y)) - 1)
  x <- setNames(Y[, 1], rownames(Y))
  kb <- as.numeric(phylosig(tree, x, method = "K"))
  C <- vcv(tree)[rownames(Y), rownames(Y)]
  Ci <- solve(C); one <- rep(1, nrow(Y)); s <- sum(Ci)
  a <- colSums(Ci) %*% Y / s
  R <- Y - one %*% a
  n <- nrow(Y)
  km <- (sum(R^2) / sum(diag(t(R) %*% Ci %*% R))) / ((sum(diag(C)) - n / s) / (n - 1))
  cat(sprintf("%.17g %.17g\\n", kb, km))
}}
""")
    out = subprocess.run(["Rscript", str(script)], capture_output=True, text=True, timeout=300, check=True).stdout
    vals = np.array([[float(v) for v in line.split()] for line in out.strip().splitlines()])
    assert vals.shape == (len(cases), 2)
    for (cs, Y), (kb, km) in zip(cases, vals):
        assert rel(kmult(Y[:, :1], cs), kb) < 1e-8  # Blomberg's K, phytools
        assert rel(kmult(Y, cs), km) < 1e-8  # K_mult from ape's vcv and the definition, in R
