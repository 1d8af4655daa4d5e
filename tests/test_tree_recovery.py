"""Tests of treeprobe.tree_recovery: trees built from taxon centroids and their scores against the taxonomy.

Each score is checked three ways: against an independent computation (scipy's cophenet, ete3's
Robinson–Foulds / distances / check_monophyly, brute force over pairs, skbio's neighbour joining),
on known truth (tree-like distances and strong Brownian signal it must recover) and under the null
(shuffled labels sit at the permutation mean; the slow test measures the false-positive rate).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.cluster.hierarchy import cophenet
from scipy.spatial.distance import pdist, squareform
from scipy.stats import beta

import treeprobe as tp
from treeprobe import tree_recovery as tr
from treeprobe.errors import TreeprobeError
from treeprobe.simulate import simulate_world
from treeprobe.taxonomy import Taxonomy
from treeprobe.tree import CladeStructure, clade_structure_from_tree, read_newick

pytestmark = pytest.mark.usefixtures("one_blas_thread")


# --- independent helpers (ete3 trees built here, converted by treeprobe.tree) -------------------------


def _random_ete(n: int, rng, *, ultrametric: bool = False, max_children: int = 2):
    """A random rooted ete3 tree on leaves t0..t{n-1}: subtrees joined at random, 2..max_children at a
    time; ultrametric (coalescent heights) or random positive lengths."""
    from ete3 import Tree

    nodes = [Tree(name=f"t{i}") for i in range(n)]
    height = [0.0] * n
    t_now = 0.0
    while len(nodes) > 1:
        k = min(len(nodes), int(rng.integers(2, max_children + 1)))
        pick = sorted(rng.choice(len(nodes), size=k, replace=False).tolist(), reverse=True)
        t_now += float(rng.exponential(1.0)) + 0.05
        parent = Tree()
        for i in pick:
            child = nodes.pop(i)
            h = height.pop(i)
            child.dist = (t_now - h) if ultrametric else float(rng.uniform(0.1, 1.0))
            parent.add_child(child)
        nodes.append(parent)
        height.append(t_now)
    return nodes[0]


def _names(n):
    return [f"t{i}" for i in range(n)]


def _cs(tree, n):
    cs, placed = clade_structure_from_tree(tree, _names(n))
    assert placed.all()
    return cs


def _ete_distances(tree, n):
    """Patristic distances by ete3's get_distance, (n, n)."""
    leaves = {lf.name: lf for lf in tree.iter_leaves()}
    D = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        D[i, j] = D[j, i] = tree.get_distance(leaves[f"t{i}"], leaves[f"t{j}"])
    return D


def _splits(tree):
    """Non-trivial unrooted splits of an ete3 tree, as frozensets of two frozensets."""
    all_leaves = frozenset(tree.get_leaf_names())
    out = set()
    for node in tree.traverse():
        side = frozenset(node.get_leaf_names())
        other = all_leaves - side
        if len(side) >= 2 and len(other) >= 2:
            out.add(frozenset([side, other]))
    return out


def _brute_purity(tree, codes):
    """Dendrogram purity by brute force over the same-class pairs (unknown −1 ignored)."""
    cls = {f"t{i}": c for i, c in enumerate(codes)}
    total, n_pairs = 0.0, 0
    known = [f"t{i}" for i, c in enumerate(codes) if c >= 0]
    for a, b in itertools.combinations(known, 2):
        if cls[a] != cls[b]:
            continue
        sub = [x for x in tree.get_common_ancestor(a, b).get_leaf_names() if cls[x] >= 0]
        total += sum(cls[x] == cls[a] for x in sub) / len(sub)
        n_pairs += 1
    return total / n_pairs


def _orthogonal_centroids(tree, n):
    """Leaf vectors x_i = Σ_{edges above i} √len_e · u_e (u_e orthonormal): x_i · x_j is the shared path
    length, so on an ultrametric tree the cosine distance is the patristic distance / (2 · height)."""
    nodes = list(tree.traverse("preorder"))
    idx = {id(v): k for k, v in enumerate(nodes)}
    X = np.zeros((n, len(nodes)))
    for leaf in tree.iter_leaves():
        i = int(leaf.name[1:])
        v = leaf
        while v.up is not None:
            X[i, idx[id(v)]] = np.sqrt(v.dist)
            v = v.up
    return X


def _world_data(seed=0, **kw):
    w = simulate_world(seed=seed, **kw)
    return w, tp.TreeData(w.embeddings, w.items)


# --- building trees -----------------------------------------------------------------------------------


def test_upgma_patristic_distances_are_scipys_cophenetic_distances():
    rng = np.random.default_rng(1)
    D = squareform(pdist(rng.standard_normal((25, 4))))
    t = tr.upgma(D, names=_names(25))
    assert np.abs(squareform(t.patristic(), checks=False) - cophenet(t.linkage)).max() < 1e-12
    assert t.n_leaves == 25 and t.clades.n_nodes == 49 and list(t.names) == _names(25)
    assert np.bincount(t.clades.parent[1:]).max() == 2  # binary
    c = tr.upgma(squareform(D, checks=False), names=_names(25))  # the condensed form: the same tree
    assert np.array_equal(c.linkage, t.linkage) and c.to_newick() == t.to_newick()


def test_neighbour_joining_matches_skbio_on_random_matrices():
    from skbio import DistanceMatrix
    from skbio.tree import nj

    rng = np.random.default_rng(2)
    for S, kind in ((5, "euclid"), (17, "euclid"), (40, "euclid"), (30, "uniform")):
        if kind == "euclid":
            D = squareform(pdist(rng.standard_normal((S, 6))))
        else:  # not a metric: NJ makes negative branch lengths, set to 0 by both
            D = squareform(rng.uniform(0.1, 1.0, size=S * (S - 1) // 2))
        mine = tr.neighbor_joining(D, names=_names(S))
        theirs = nj(DistanceMatrix(D, _names(S))).tip_tip_distances().filter(_names(S)).data
        assert np.abs(mine.patristic() - theirs).max() < 1e-10, (S, kind)
        assert (mine.clades.length >= 0).all()


def test_nj_block_scan_finds_the_first_minimum_of_q_with_ties(monkeypatch):
    """The pick of each join, scanned in small row blocks (block boundaries exercised), is the first
    minimum of the full Q matrix in row-major order, also with many exact ties (integer distances)."""
    monkeypatch.setattr(tr, "_NJ_BLOCK_ELEMS", 40)
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(4, 25))
        A = rng.integers(1, 4, size=(n, n)).astype(float)
        A = A + A.T
        np.fill_diagonal(A, 0.0)
        r = A.sum(axis=1)
        Q = (n - 2) * A - r[:, None] - r[None, :]
        Q[np.tril_indices(n)] = np.inf
        expect = np.unravel_index(int(np.argmin(Q)), Q.shape)
        tri = np.tril(np.ones((n, n), dtype=bool))
        got = tr._nj_pick(A, r, n, np.empty(tr._NJ_BLOCK_ELEMS + n), tri)
        assert got == tuple(int(x) for x in expect)


def test_nj_recovers_an_additive_tree_and_roots_it_at_the_midpoint():
    rng = np.random.default_rng(4)
    true = _random_ete(30, rng)
    D = _ete_distances(true, 30)
    t = tr.neighbor_joining(D, names=_names(30))
    assert np.abs(t.patristic() - D).max() < 1e-9
    assert tr.robinson_foulds(t, _cs(true, 30))["rf"] == 0
    # midpoint: the two ends of the longest path are each half of it from the root
    P = t.patristic()
    a, b = np.unravel_index(int(np.argmax(P)), P.shape)
    rd = t.clades.root_distance()[t.clades.item_node]
    assert rd[a] == pytest.approx(P[a, b] / 2, abs=1e-12) and rd[b] == pytest.approx(P[a, b] / 2, abs=1e-12)
    assert rd.max() == pytest.approx(P[a, b] / 2, abs=1e-12)


def test_upgma_recovers_an_ultrametric_tree_exactly():
    rng = np.random.default_rng(5)
    true = _random_ete(40, rng, ultrametric=True)
    ref = _cs(true, 40)
    X = _orthogonal_centroids(true, 40)
    t = tr.build_tree(X, "upgma", names=_names(40))
    height = true.get_farthest_leaf()[1]
    assert np.abs(t.patristic() - ref.item_distances() / (2 * height)).max() < 1e-12
    assert tr.robinson_foulds(t, ref)["rf"] == 0
    assert tr.cophenetic_correlation(t, ref) == pytest.approx(1.0, abs=1e-12)
    # the clades of the true tree, as classes, are clades of the recovered tree
    cut = [n for n in true.traverse() if 2 <= len(n) <= 8]
    codes = np.full(40, -1)
    for k, node in enumerate(cut[:6]):
        for name in node.get_leaf_names():
            codes[int(name[1:])] = k
    assert np.nanmin(tr.monophyly(t, codes)) == 1.0
    assert tr.dendrogram_purity(t, codes) == pytest.approx(1.0, abs=1e-12)


# --- scores against independent computations --------------------------------------------------------


def test_cophenetic_correlation_matches_explicit_pearson():
    rng = np.random.default_rng(6)
    D = squareform(pdist(rng.standard_normal((30, 5))))
    ref_tree = _random_ete(30, rng, max_children=4)  # polytomies, random lengths
    ref = _cs(ref_tree, 30)
    T = squareform(_ete_distances(ref_tree, 30), checks=False)
    up = tr.upgma(D, names=_names(30))
    assert tr.cophenetic_correlation(up, ref) == pytest.approx(np.corrcoef(cophenet(up.linkage), T)[0, 1], abs=1e-10)
    nj = tr.neighbor_joining(D, names=_names(30))
    P = squareform(_ete_distances(nj.to_ete3(), 30), checks=False)
    assert tr.cophenetic_correlation(nj, ref) == pytest.approx(np.corrcoef(P, T)[0, 1], abs=1e-10)
    # against the rank taxonomy of a simulated world (unary chains, polytomies, 7 ranks)
    w = simulate_world(seed=1, dim=8, images_per_species=1)
    tax = Taxonomy.from_frame(w.species_lineage)
    cs = tax.clade_structure([1, 2, 1, 3, 1, 1, 0.5])
    t = tr.build_tree(w.embeddings, "upgma")
    expect = np.corrcoef(squareform(t.patristic(), checks=False), squareform(cs.item_distances(), checks=False))[0, 1]
    assert tr.cophenetic_correlation(t, cs) == pytest.approx(expect, abs=1e-10)


def test_robinson_foulds_matches_ete3_and_brute_force():
    rng = np.random.default_rng(7)
    for trial in range(6):
        n = int(rng.integers(6, 30))
        a = _random_ete(n, rng)
        b = _random_ete(n, rng, max_children=int(rng.integers(2, 6)))
        mine = tr.robinson_foulds(_cs(a, n), _cs(b, n))
        rf, max_rf = a.robinson_foulds(b, unrooted_trees=True)[:2]
        sa, sb = _splits(a), _splits(b)
        assert (mine["rf"], mine["max_rf"]) == (rf, max_rf) == (len(sa ^ sb), len(sa) + len(sb)), trial
        assert mine["split_recall"] == pytest.approx(len(sa & sb) / len(sb))
        assert mine["n_tree_splits"] == len(sa) and mine["n_reference_splits"] == len(sb)
    # by hand: the caterpillar ((((a,b),c),d),e) has the splits ab|cde and abc|de (its 4-leaf clade is
    # the trivial split e|abcd); ((a,b),(c,(d,e))) has the same two: RF 0 of 4
    from ete3 import Tree

    cat = Tree("((((t0,t1),t2),t3),t4);")
    bal = Tree("((t0,t1),(t2,(t3,t4)));")
    other = Tree("((t0,t2),(t1,(t3,t4)));")  # ac|bde and abc|de: shares one
    assert tr.robinson_foulds(_cs(cat, 5), _cs(bal, 5)) == dict(rf=0, max_rf=4, nrf=0.0, split_recall=1.0,
                                                                n_tree_splits=2, n_reference_splits=2)
    assert tr.robinson_foulds(_cs(cat, 5), _cs(other, 5))["rf"] == 2
    # against the rank taxonomy (ete3 tree of the same taxonomy)
    w = simulate_world(seed=2, dim=8, images_per_species=1)
    tax = Taxonomy.from_frame(w.species_lineage)
    t = tr.build_tree(w.embeddings, "nj", names=list(w.species_lineage["species"]))
    rf, max_rf = t.to_ete3().robinson_foulds(tax.tree(), unrooted_trees=True)[:2]
    mine = tr.robinson_foulds(t, tax.clade_structure())
    assert (mine["rf"], mine["max_rf"]) == (rf, max_rf)


def test_random_resolution_keeps_every_clade_and_scores_nrf_best():
    w = simulate_world(seed=3, dim=8, images_per_species=1)
    tax = Taxonomy.from_frame(w.species_lineage)
    ref = tax.clade_structure()
    res = tr.resolve_polytomies(ref, seed=4)
    assert np.bincount(res.parent[1:]).max() == 2
    assert np.array_equal(res.item_distances(), ref.item_distances())
    names = list(w.species_lineage["species"])
    as_tree = tr.RecoveredTree(clades=res, names=np.array(names, dtype=object), method="upgma")
    rf, max_rf = as_tree.to_ete3().robinson_foulds(tax.tree(), unrooted_trees=True)[:2]
    nB, nT = w.n_species - 3, len(_splits(tax.tree()))
    assert (rf, max_rf) == (nB - nT, nB + nT)
    t = tr.build_tree(w.embeddings, "upgma", names=names)
    sc = tr.tree_scores(t, ref, {}, permutations=0).summary.iloc[0]
    assert sc["nrf_best"] == pytest.approx((nB - nT) / (nB + nT))
    assert sc["split_recall_best"] == 1.0 and sc["nrf_resolved_best"] == 0.0 and sc["cophenetic_r_best"] == 1.0


def test_dendrogram_purity_matches_brute_force():
    rng = np.random.default_rng(8)
    for trial in range(5):
        n = int(rng.integers(8, 30))
        tree = _random_ete(n, rng, max_children=2 if trial < 3 else 4)
        codes = rng.integers(-1, 4, size=n)
        codes[:2] = 0  # at least one same-class pair
        assert tr.dendrogram_purity(_cs(tree, n), codes) == pytest.approx(_brute_purity(tree, codes), abs=1e-12)


def test_monophyly_matches_ete3_check_monophyly():
    rng = np.random.default_rng(9)
    for trial in range(5):
        n = 30
        tree = _random_ete(n, rng)
        codes = np.full(n, -1)
        left, right = tree.children[0].get_leaf_names()[0], tree.children[1].get_leaf_names()[0]
        clades = [c for c in tree.traverse() if 2 <= len(c) <= 6 and not {left, right} & set(c.get_leaf_names())]
        for k, c in enumerate(clades[::3][:5]):
            codes[[int(x[1:]) for x in c.get_leaf_names()]] = k
        others = [i for i in range(n) if f"t{i}" not in (left, right)]
        flip = rng.choice(others, size=4, replace=False)
        codes[flip] = rng.integers(-1, 5, size=4)  # some stop being clades, some unknown
        codes[[int(left[1:]), int(right[1:])]] = 5  # two leaves on either side of the root: never a clade
        mine = tr.monophyly(_cs(tree, n), codes)
        pruned = tree.copy()
        pruned.prune([f"t{i}" for i in range(n) if codes[i] >= 0])
        for k in range(codes.max() + 1):
            members = {f"t{i}" for i in np.flatnonzero(codes == k)}
            if len(members) < 2:
                assert np.isnan(mine[k])
            else:
                assert mine[k] == float(pruned.check_monophyly(members, target_attr="name", unrooted=False)[0])
        assert (np.nan_to_num(mine) == 1).any() and (np.nan_to_num(mine, nan=1) == 0).any(), "both outcomes tested"


# --- the permutation null -------------------------------------------------------------------------------


@pytest.mark.parametrize("stratified", [False, True])
def test_null_values_are_the_scores_of_explicitly_permuted_labels(monkeypatch, stratified):
    """The b-th permuted value is each score recomputed with the reference's taxon π_b(i) at tip i
    (π_b: the b-th draw of default_rng(seed)), in any batch size; p-values follow the stated formula."""
    w, _ = _world_data(seed=4, dim=16, images_per_species=1)
    tax = Taxonomy.from_frame(w.species_lineage)
    ref = tax.clade_structure()
    groups = {r: tax.codes(r) for r in ("family", "genus")}
    t = tr.build_tree(w.embeddings, "upgma")
    strata = (np.arange(w.n_species) % 3) if stratified else None
    B = 7
    monkeypatch.setattr(tr, "_BATCH_NNZ", 1)  # one permutation per batch
    one = tr.tree_scores(t, ref, groups, permutations=B, seed=11, strata=strata)
    monkeypatch.setattr(tr, "_BATCH_NNZ", 1 << 30)  # all in one batch
    alls = tr.tree_scores(t, ref, groups, permutations=B, seed=11, strata=strata)
    rng = np.random.default_rng(11)
    if stratified:
        from treeprobe.permutation import stratified_sampler

        draw = stratified_sampler(strata)
    for b in range(B):
        pi = draw(rng) if stratified else rng.permutation(w.n_species)
        if stratified:
            assert np.array_equal(strata[pi], strata)
        moved = CladeStructure(parent=ref.parent, length=ref.length, item_node=ref.item_node[pi], names=ref.names)
        assert alls.null["cophenetic_r"][b] == pytest.approx(tr.cophenetic_correlation(t, moved), abs=1e-12)
        assert alls.null["nrf"][b] == tr.robinson_foulds(t, moved)["nrf"]
        for r, c in groups.items():
            assert alls.null[("purity", r)][b] == pytest.approx(tr.dendrogram_purity(t, c[pi]), abs=1e-12)
            assert alls.null[("monophyly", r)][b] == pytest.approx(np.nanmean(tr.monophyly(t, c[pi])), abs=1e-12)
    for k in one.null:
        assert np.allclose(one.null[k], alls.null[k], rtol=0, atol=1e-13, equal_nan=True), k
    s = alls.summary.iloc[0]
    assert s["cophenetic_r_p"] == (1 + np.sum(alls.null["cophenetic_r"] >= s["cophenetic_r"])) / (B + 1)
    assert s["nrf_p"] == (1 + np.sum(alls.null["nrf"] <= s["nrf"])) / (B + 1)
    assert s["cophenetic_r_null"] == pytest.approx(alls.null["cophenetic_r"].mean())


def test_p_values_count_ties_and_the_direction_of_each_score():
    assert tr._p_value(0.5, np.array([0.1, 0.5 - 1e-14, 0.7, 0.2]), True) == 3 / 5  # a rounding tie counts
    assert tr._p_value(0.5, np.array([0.1, 0.5 - 1e-9, 0.7, 0.2]), True) == 2 / 5
    assert tr._p_value(0.5, np.array([0.1, 0.5 + 1e-14, 0.7, 0.2]), False) == 4 / 5  # lower is better (RF)
    assert np.isnan(tr._p_value(0.5, np.zeros(0), True))


def test_shuffled_labels_score_at_the_null_mean():
    """Centroids of a strongly tree-like world given to the wrong taxa (rows shuffled): every score is
    within 3 null standard deviations of its permutation mean, far from the unshuffled scores."""
    w, _ = _world_data(seed=5, dim=32, trait_dim=32, noise=0.2, images_per_species=1)
    tax = Taxonomy.from_frame(w.species_lineage)
    ref = tax.clade_structure()
    groups = {r: tax.codes(r) for r in ("class", "order", "family", "genus")}
    X = w.embeddings[np.random.default_rng(0).permutation(w.n_species)]
    sc = tr.tree_scores(tr.build_tree(X, "upgma"), ref, groups, permutations=99, seed=1)
    good = tr.tree_scores(tr.build_tree(w.embeddings, "upgma"), ref, groups, permutations=0)
    s, g = sc.summary.iloc[0], good.summary.iloc[0]
    for stat in ("cophenetic_r", "nrf", "split_recall", "nrf_resolved"):
        sd = sc.null[stat].std()
        assert abs(s[stat] - s[f"{stat}_null"]) <= 3 * sd + 1e-12, stat
    assert g["cophenetic_r"] - s["cophenetic_r"] > 0.5 and s["nrf"] - g["nrf"] > 0.3
    for r in groups:
        row = sc.ranks.set_index("rank").loc[r]
        for stat in ("purity", "monophyly"):
            sd = sc.null[(stat, r)].std()
            assert abs(row[stat] - row[f"{stat}_null"]) <= 3 * sd + 1e-12, (stat, r)
    assert good.ranks.set_index("rank").loc["genus", "purity"] > sc.ranks.set_index("rank").loc["genus", "purity"] + 0.5


# --- known truth on simulated worlds; the wrapper on a TreeData ------------------------------------------


@pytest.mark.parametrize("method, min_r", [("upgma", 0.8), ("nj", 0.6)])
def test_strong_brownian_signal_is_recovered(method, min_r):
    w, data = _world_data(seed=0, dim=64, trait_dim=64, noise=0.3, images_per_species=(1, 3))
    res = tr.tree_recovery(data, method=method, levels=("species", "genus"), permutations=19, seed=0)
    s = res.summary.set_index("level")
    sp_ = s.loc["species"]
    assert sp_["n_leaves"] == w.n_species and s.loc["genus", "n_leaves"] == w.n_taxa("genus")
    assert sp_["cophenetic_r"] > min_r and sp_["cophenetic_r_null"] < 0.1
    assert sp_["split_recall"] > 0.7 and sp_["nrf"] < sp_["nrf_null"] - 0.4
    assert sp_["cophenetic_r_p"] == sp_["nrf_p"] == sp_["split_recall_p"] == 1 / 20
    ranks = res.ranks.set_index(["level", "rank"])
    genus = ranks.loc[("species", "genus")]
    assert genus["monophyly"] > 0.85 and genus["purity"] > 0.9 and genus["monophyly_null"] < 0.1
    assert genus["purity_p"] == genus["monophyly_p"] == 1 / 20
    assert (ranks["purity_best"] == 1).all() and (ranks["monophyly_best"] == 1).all()
    taxa = res.taxa[(res.taxa["level"] == "species") & (res.taxa["rank"] == "genus")]
    assert taxa["monophyletic"].sum() == genus["n_monophyletic"] and len(taxa) == genus["n_taxa"]


def test_user_tree_reference_equals_the_rank_taxonomy_it_spells():
    w, data = _world_data(seed=1, dim=16, images_per_species=2)
    from ete3 import Tree

    a = tr.tree_recovery(data, permutations=0)
    b = tr.tree_recovery(data, tree=Tree(w.newick(), format=1), permutations=0)
    assert b.params["reference"] == "user tree"
    c = tr.tree_recovery(data, tree=w.newick(), permutations=0)  # Newick text (or a file path) works too
    assert c.summary["cophenetic_r"].iloc[0] == pytest.approx(b.summary["cophenetic_r"].iloc[0], abs=1e-12)
    cols = ["n_leaves", "cophenetic_r", "rf", "max_rf", "split_recall"]
    assert np.allclose(a.summary[cols].to_numpy(float), b.summary[cols].to_numpy(float), atol=1e-12)
    assert np.allclose(a.ranks["purity"], b.ranks["purity"], atol=1e-12)


def test_stratified_permutations_keep_image_counts():
    """tree_recovery(permute="size-strata", the default) permutes species only among species with as many images: its null
    is tree_scores' with the image counts as strata, and differs from the free one."""
    _, data = _world_data(seed=6, dim=16, images_per_species=(1, 3))
    res = tr.tree_recovery(data, permutations=9, seed=3)
    free = tr.tree_recovery(data, permutations=9, seed=3, permute="free")
    keep, codes, ref, first = tr._level_inputs(data, "species", None, None)
    tax = data.taxonomy
    groups = {r: tax.codes(r)[first] for r in tax.ranks[:-1]}
    direct = tr.tree_scores(res.tree(), ref, groups, permutations=9, seed=3, strata=np.bincount(codes))
    assert np.allclose(res.null[("species", "cophenetic_r")], direct.null["cophenetic_r"], atol=1e-13)
    assert not np.allclose(res.null[("species", "cophenetic_r")], free.null[("species", "cophenetic_r")])
    assert res.params["permute"] == "size-strata" and "equal image count" in res.params["permuted"]
    assert "freely" in free.params["permuted"]
    free_direct = tr.tree_scores(res.tree(), ref, groups, permutations=9, seed=3)
    assert np.allclose(free.null[("species", "cophenetic_r")], free_direct.null["cophenetic_r"], atol=1e-13)
    with pytest.raises(TreeprobeError, match="permutation scheme"):
        tr.tree_recovery(data, permutations=9, permute="stratified")


def test_newick_round_trip(tmp_path):
    w, data = _world_data(seed=2, dim=16, images_per_species=1)
    res = tr.tree_recovery(data, method="nj", permutations=0)
    t = res.tree("species")
    assert any(" " in n for n in t.names)  # binomials with spaces survive
    path = res.write_newick(tmp_path / "out" / "species.nwk")
    back, placed = clade_structure_from_tree(read_newick(path), list(t.names))
    assert placed.all()
    assert np.allclose(back.item_distances(), t.patristic(), rtol=1e-9, atol=1e-12)
    assert tr.robinson_foulds(back, t)["rf"] == 0


def test_tree_recovery_on_the_real_bioclip_embeddings():
    data = tp.datasets.bioclip2_1k()
    res = tr.tree_recovery(data, method="upgma", levels=("species", "genus"), permutations=19, seed=0)
    s = res.summary.set_index("level")
    tax = data.taxonomy
    n_unknown_species = int((~tax.known("species")).sum())
    assert s.loc["species", "n_leaves"] == tax.n_taxa("species") + n_unknown_species
    assert s.loc["genus", "n_leaves"] == tax.n_taxa("genus")
    for lvl in ("species", "genus"):
        row = s.loc[lvl]
        assert row["cophenetic_r"] > row["cophenetic_r_null"] + 0.03 and row["cophenetic_r_p"] == 0.05
        assert row["split_recall"] > row["split_recall_null"] and row["nrf"] < row["nrf_null"]
        assert row["cophenetic_r_best"] == pytest.approx(1.0) and row["split_recall_best"] == 1.0
    ranks = res.ranks.set_index(["level", "rank"])
    assert (ranks["purity_best"] == 1).all() and (ranks["monophyly_best"] == 1).all()
    assert ranks.loc[("species", "genus"), "monophyly"] > 0.1 > ranks.loc[("species", "genus"), "monophyly_null"]
    assert list(res.leaf_labels["genus"].columns) == list(tax.ranks[:6])


def test_plot_tree_recovery(tmp_path):
    from matplotlib.figure import Figure

    from treeprobe.compare_plots import TAXON_COLOURS

    _, data = _world_data(seed=3, dim=16, images_per_species=1)
    res = tr.tree_recovery(data, permutations=9)
    fig = tr.plot_tree_recovery(res, rank="order", top_n=5)
    assert isinstance(fig, Figure)
    ax_t, ax_m, ax_r = fig.axes[:3]
    S = res.tree().n_leaves
    assert sum(len(c.get_segments()) for c in ax_m.collections) == S  # one line per leaf
    used = {tuple(np.round(c, 4)) for coll in ax_m.collections for c in coll.get_edgecolors()[:, :3]}
    from matplotlib.colors import to_rgb

    allowed = {tuple(np.round(to_rgb(c), 4)) for c in TAXON_COLOURS[:5] + ("#c8c8c8", "#ececec")}
    assert used <= allowed and len(used) >= 5
    fig.savefig(tmp_path / "tangle.png")
    assert (tmp_path / "tangle.png").stat().st_size > 10_000
    with pytest.raises(TreeprobeError, match="not above level"):
        tr.plot_tree_recovery(res, rank="subspecies")


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(TreeprobeError, match="at least 3"):
        tr.upgma(np.zeros((2, 2)))
    with pytest.raises(TreeprobeError, match="square"):
        tr.neighbor_joining(np.zeros((3, 4)))
    with pytest.raises(TreeprobeError, match="negative"):
        tr.upgma(-np.ones((3, 3)))
    with pytest.raises(TreeprobeError, match="negative"):
        tr.upgma(np.array([1.0, -1.0, 2.0]))  # condensed
    with pytest.raises(TreeprobeError, match="NaN"):
        tr.upgma(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(TreeprobeError, match="not S"):
        tr.upgma(np.ones(4))
    with pytest.raises(TreeprobeError, match="at least 3"):
        tr.upgma(np.ones(1))
    with pytest.raises(TreeprobeError, match="symmetric"):
        tr.upgma(np.array([[0, 1, 2], [1, 0, 3], [2, 4, 0.0]]))
    with pytest.raises(TreeprobeError, match="tree method"):
        tr.build_tree(np.eye(4), "wpgma")
    a = tr.upgma(squareform(pdist(np.random.default_rng(0).standard_normal((5, 2)))))
    b = tr.upgma(squareform(pdist(np.random.default_rng(1).standard_normal((6, 2)))))
    with pytest.raises(TreeprobeError, match="same taxa"):
        tr.robinson_foulds(a, b)
    _, data = _world_data(seed=0, dim=8, images_per_species=1)
    with pytest.raises(TreeprobeError, match="level"):
        tr.tree_recovery(data, levels=("subspecies",), permutations=0)


# --- slow: calibration over many null worlds ------------------------------------------------------------


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = beta.ppf(0.025, k, n - k + 1) if k else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


@pytest.mark.slow
@pytest.mark.parametrize("method, n_worlds", [("upgma", 400), ("nj", 200)])
def test_false_positive_rate_in_null_worlds(method, n_worlds):
    """No tree signal (signal = 0: i.i.d. centroids): the share of worlds with p <= 0.05 has a 95 %
    Clopper-Pearson interval containing 0.05 for the continuous scores (cophenetic r, purity) and is not
    above it for the discrete ones (RF, recall, monophyly: ties make them conservative). Measured
    (seeds 5000..): UPGMA, 400 worlds: cophenetic 0.035, genus purity 0.038, order purity 0.055 (nRF 0.01,
    recall 0.01, nRF resolved 0.035, monophyly genus 0.01, family 0.038); NJ, 200 worlds: 0.04, 0.025,
    0.045 (0.01, 0.01, 0.025, 0.01, 0.015)."""
    P = []
    for s in range(n_worlds):
        w = simulate_world(seed=5000 + s, n_kingdoms=2, branching=[(1, 2), (1, 2), (1, 3), (1, 3), (1, 3), (1, 3)],
                           images_per_species=1, dim=16, trait_dim=4, signal=0.0)
        tax = Taxonomy.from_frame(w.species_lineage)
        sc = tr.tree_scores(tr.build_tree(w.embeddings, method), tax.clade_structure(),
                            {r: tax.codes(r) for r in ("order", "family", "genus")}, permutations=99, seed=s)
        row, rk = sc.summary.iloc[0], sc.ranks.set_index("rank")
        P.append([row["cophenetic_r_p"], rk.loc["genus", "purity_p"], rk.loc["order", "purity_p"],
                  row["nrf_p"], row["split_recall_p"], row["nrf_resolved_p"], rk.loc["genus", "monophyly_p"],
                  rk.loc["family", "monophyly_p"]])
    P = np.array(P)
    hits = (P <= 0.05).sum(axis=0)
    rates = hits / n_worlds
    print(f"\n{method}: false-positive rates at 0.05 over {n_worlds} null worlds "
          f"(cophenetic, purity genus, purity order, nRF, recall, nRF resolved, monophyly genus, family): "
          f"{np.round(rates, 3).tolist()}; mean p {np.round(P.mean(axis=0), 3).tolist()}")
    for j, k in enumerate(hits):
        lo, hi = _clopper_pearson(int(k), n_worlds)
        if j < 3:
            assert lo <= 0.05 <= hi, (j, rates[j])
        else:
            assert lo <= 0.05, (j, rates[j])
    assert 0.45 < P[:, 0].mean() < 0.56
