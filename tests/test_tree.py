"""The generic tree (treeprobe/tree.py): CladeStructure, clade_structure_from_tree, read_newick, tree_depth."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from ete3 import Tree

from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import RANKS, Taxonomy
from treeprobe.tree import CladeStructure, clade_structure_from_tree, read_newick, tree_depth


def random_taxonomy(n, seed, sizes=(2, 3, 3, 4, 5, 6, 8)):
    rng = np.random.default_rng(seed)
    return Taxonomy.from_frame(pd.DataFrame({r: [f"{r}{rng.integers(k)}" for _ in range(n)]
                                             for r, k in zip(RANKS, sizes)}))


def random_tree_structure(n_leaves, n_items, seed, internal_items=0):
    """An ete3 random tree with random branch lengths; items on random leaves (and, optionally,
    some on internal nodes)."""
    rng = np.random.default_rng(seed)
    t = Tree()
    t.populate(n_leaves, random_branches=True, branch_range=(0.0, 2.0))
    for i, node in enumerate(t.traverse("preorder")):
        node.dist = float(rng.uniform(0.01, 3.0)) if i else 0.0
    leaves = [l.name for l in t.get_leaves()]
    names = [leaves[i] for i in rng.integers(0, len(leaves), n_items)]
    cs, mask = clade_structure_from_tree(t, names)
    assert mask.all()
    if internal_items:
        internal = np.flatnonzero(np.bincount(cs.parent[1:], minlength=cs.n_nodes) > 0)
        item_node = cs.item_node.copy()
        item_node[rng.choice(n_items, internal_items, replace=False)] = rng.choice(internal, internal_items)
        cs = CladeStructure(parent=cs.parent, length=cs.length, item_node=item_node, names=cs.names)
    return cs


def _three_leaf_tree():
    """((a:1, b:2)x:0.5, c:4): nodes 0 root, 1 x, 2 a, 3 b, 4 c; one item per leaf."""
    return CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0.0, 0.5, 1, 2, 4]),
                          item_node=np.array([2, 3, 4]), names=np.array(["", "x", "a", "b", "c"], dtype=object))


# --- CladeStructure -----------------------------------------------------------------------------

def test_preorder_is_enforced():
    with pytest.raises(TreeprobeError, match="pre-order"):
        CladeStructure(parent=np.array([-1, 2, 0]), length=np.ones(3), item_node=np.array([1]),
                       names=np.array(["a", "b", "c"], dtype=object))


def test_distances_sizes_and_membership_by_hand():
    cs = _three_leaf_tree()
    assert cs.n_nodes == 5 and cs.n_items == 3
    np.testing.assert_array_equal(cs.item_distances(), [[0, 3, 5.5], [3, 0, 6.5], [5.5, 6.5, 0]])
    np.testing.assert_array_equal(cs.root_distance(), [0, 0.5, 1.5, 2.5, 4])
    np.testing.assert_array_equal(cs.items_per_node(), [3, 2, 1, 1, 1])
    np.testing.assert_array_equal(cs.membership().toarray(),
                                  [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(cs.node_distances(np.array([1, 4])), [[0, 4.5], [4.5, 0]])


def test_pair_distances_equal_the_full_matrix():
    tax = random_taxonomy(40, seed=0)
    cs = tax.clade_structure([5, 4, 3, 2, 1.5, 1, 0.5])
    D = cs.item_distances()
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, tax.n_items, 50), rng.integers(0, tax.n_items, 50)
    assert np.allclose(cs.pair_distances(cs.item_node[i], cs.item_node[j]), D[i, j])
    # and on a Newick tree with items on internal nodes (a node paired with its own ancestor)
    cs = random_tree_structure(20, 60, seed=1, internal_items=10)
    D = cs.item_distances()
    i, j = rng.integers(0, 60, 200), rng.integers(0, 60, 200)
    assert np.allclose(cs.pair_distances(cs.item_node[i], cs.item_node[j]), D[i, j])


def test_subset_items_keeps_the_tree():
    cs = random_tree_structure(15, 40, seed=2)
    idx = np.array([3, 0, 17, 17])
    sub = cs.subset_items(idx)
    assert sub.n_nodes == cs.n_nodes and sub.n_items == 4
    np.testing.assert_array_equal(sub.item_distances(), cs.item_distances()[np.ix_(idx, idx)])
    assert sub.items_per_node()[0] == 4


def _loop_reference(cs):
    n = cs.n_nodes
    d = np.zeros(n, dtype=np.int64)
    rd = np.zeros(n)
    for v in range(1, n):
        d[v] = d[cs.parent[v]] + 1
        rd[v] = rd[cs.parent[v]] + cs.length[v]
    rows, cols, anc = [], [], [[0]]
    for v in range(1, n):
        a = anc[cs.parent[v]] + [v]
        anc.append(a)
        rows.extend(a)
        cols.extend([v] * len(a))
    A = sp.csr_matrix((np.ones(len(rows) + 1), (rows + [0], cols + [0])), shape=(n, n))
    return d, rd, A


@pytest.mark.parametrize("kind", ["rank", "newick"])
def test_clade_structure_internals_match_loops(kind):
    cs = random_taxonomy(300, 21).clade_structure([1, 2, 3, 1, 1, 1, 0.5]) if kind == "rank" \
        else random_tree_structure(80, 200, seed=22)
    d, rd, A = _loop_reference(cs)
    assert np.array_equal(cs.depth_levels(), d)
    assert np.array_equal(cs.root_distance(), rd)
    assert (cs.ancestor_matrix() != A).nnz == 0
    vals = np.random.default_rng(23).normal(size=(cs.n_nodes, 3))
    assert np.allclose(cs.accumulate_up(vals), A @ vals)
    assert np.array_equal(cs.items_per_node(), np.asarray(A @ np.bincount(cs.item_node, minlength=cs.n_nodes)))


def test_deep_caterpillar_levels():
    """A 1500-deep chain of internal nodes: pointer jumping and the level passes stay fast and right."""
    n_int = 1500
    parent = np.r_[-1, np.arange(n_int - 1), np.arange(n_int)]  # chain, then one leaf per chain node
    length = np.r_[0.0, np.full(len(parent) - 1, 0.5)]
    cs = CladeStructure(parent=parent, length=length, item_node=np.arange(n_int, len(parent)),
                        names=np.array([""] * len(parent), dtype=object))
    depth = cs.depth_levels()
    assert depth.max() == n_int
    np.testing.assert_array_equal(depth[:n_int], np.arange(n_int))  # chain node v is v edges down
    np.testing.assert_array_equal(cs.root_distance()[n_int:], 0.5 * np.arange(1, n_int + 1))
    np.testing.assert_array_equal(cs.items_per_node()[:n_int], np.arange(n_int, 0, -1))  # leaves below


# --- tree_depth ------------------------------------------------------------------------------------

def test_tree_depth_any_node_order():
    """Parents listed after their children (not pre-order) are still followed to the root."""
    cs = random_tree_structure(30, 10, seed=3)
    perm = np.random.default_rng(4).permutation(cs.n_nodes)  # relabel node v as inv[v]
    inv = np.argsort(perm)
    parent = np.where(cs.parent[perm] >= 0, inv[np.maximum(cs.parent[perm], 0)], -1)
    assert (parent[parent >= 0] > np.flatnonzero(parent >= 0)).any()  # some parent after its child
    np.testing.assert_array_equal(tree_depth(parent), cs.depth_levels()[perm])
    assert tree_depth(np.array([-1])).tolist() == [0]


# --- Newick trees ------------------------------------------------------------------------------------

def test_user_tree_with_branch_lengths():
    t = Tree("((A_a:1,B_b:2)x:0.5,C_c:4);", format=1)
    with pytest.warns(TreeprobeWarning, match=r"^the tree covers 3 of 4 species: 1 of 4 items of species not in "
                                              r"the tree are left out of the Mantel tests, which use 3 items$"):
        cs, mask = clade_structure_from_tree(t, ["A a", "C c", "Z z", "B b"])
    assert mask.tolist() == [True, True, False, True]
    D = cs.item_distances()
    assert D[0, 1] == pytest.approx(1 + 0.5 + 4)
    assert D[0, 2] == pytest.approx(3)
    with pytest.raises(TreeprobeError, match="no item"):
        clade_structure_from_tree(t, ["Q q"])


def test_partial_tree_counts_species_and_unnamed_items():
    """S of T counts distinct species (not items); items with no species name are counted apart."""
    import warnings

    t = Tree("(A_a:1,B_b:1);", format=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, mask = clade_structure_from_tree(t, ["A a", "A a", "Z z", "Z z", "", "Y y", "B b"])
    assert mask.sum() == 3
    assert [str(w.message) for w in caught] == [
        "the tree covers 2 of 4 species: 4 of 7 items of species not in the tree (1 of them with no species "
        "name) are left out of the Mantel tests, which use 3 items"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every item placed: no warning
        clade_structure_from_tree(t, ["A a", "B b"])


def test_bad_user_trees_are_refused():
    with pytest.raises(TreeprobeError, match="duplicate leaf name 'A'"):
        clade_structure_from_tree(Tree("((A:1,B:1):1,A:2);", format=1), ["A", "B"])
    with pytest.raises(TreeprobeError, match="negative branch lengths"):
        clade_structure_from_tree(Tree("((A:1,B:-1):1,C:2);", format=1), ["A", "B"])


def test_read_newick_keeps_internal_names_and_lengths(tmp_path):
    path = tmp_path / "tree.nwk"
    path.write_text("((A_a:1,B_b:2)Genus:0.5,C_c:4)Root;\n")
    t = read_newick(path)
    assert t.name == "Root" and {n.name for n in t.children} == {"Genus", "C_c"}
    cs, mask = clade_structure_from_tree(t, ["B b", "C c"])
    assert mask.all() and cs.item_distances()[0, 1] == pytest.approx(2 + 0.5 + 4)
    assert "Genus" in set(cs.names)


@pytest.mark.parametrize("text", [None, "((a,b);"])
def test_read_newick_errors_in_one_line(tmp_path, text):
    path = tmp_path / "tree.nwk"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TreeprobeError, match="cannot read Newick tree") as info:
        read_newick(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
