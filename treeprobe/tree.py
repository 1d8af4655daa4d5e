"""Any rooted tree with branch lengths over N items, as arrays; reading Newick phylogenies.

:class:`CladeStructure` is the array form of a tree (nodes in pre-order, ``parent[v] < v``).
It is what the exact Mantel statistics and the pairwise tree distances are computed from,
for the rank taxonomy (:meth:`treeprobe.taxonomy.Taxonomy.clade_structure`) and for a
user-supplied phylogeny (:func:`clade_structure_from_tree`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import warnings

import numpy as np
import scipy.sparse as sp

from treeprobe.errors import TreeprobeError, TreeprobeWarning

__all__ = ["CladeStructure", "clade_structure_from_tree", "read_newick", "tree_depth"]


def tree_depth(parent: np.ndarray) -> np.ndarray:
    """Edges from the root to each node of a parent array (int (n_nodes,), −1 at the root), int64 (n_nodes,).

    Pointer jumping: d[v] counts the edges from v up to jump[v]; O(n log depth), no Python loop over nodes.
    Any node order works (not only pre-order).

    >>> tree_depth(np.array([-1, 0, 1, 0, 2])).tolist()
    [0, 1, 2, 1, 3]
    """
    d = (parent >= 0).astype(np.int64)
    jump = parent.copy()
    idx = np.flatnonzero(jump >= 0)
    while idx.size:
        j = jump[idx]
        d[idx] += d[j]
        jump[idx] = jump[j]
        idx = idx[jump[idx] >= 0]
    return d


@dataclass(kw_only=True)
class CladeStructure:
    """A rooted tree over N items, as arrays (nodes in pre-order: ``parent[v] < v``); build by keyword.

    parent: int64 (n_nodes,), -1 for the root (node 0).
    length: float64 (n_nodes,), length of the edge above each node (root: 0).
    item_node: int64 (N,), the node each item sits at (a leaf of the tree).
    names: object (n_nodes,), node names (cumulative labels for the rank taxonomy).
    ultrametric_levels: number of ranks if this is a rank taxonomy, else None.

    Distances are in units of edge length. The tree ((a:1, b:2):0.5, c:4) with one item per leaf:

    >>> cs = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0, 0.5, 1, 2, 4]),
    ...                     item_node=np.array([2, 3, 4]), names=np.array(["", "x", "a", "b", "c"], dtype=object))
    >>> cs.item_distances().tolist()
    [[0.0, 3.0, 5.5], [3.0, 0.0, 6.5], [5.5, 6.5, 0.0]]
    >>> cs.items_per_node().tolist()
    [3, 2, 1, 1, 1]
    """

    parent: np.ndarray
    length: np.ndarray
    item_node: np.ndarray
    names: np.ndarray
    ultrametric_levels: int | None = None

    def __post_init__(self):
        p = self.parent
        if p[0] != -1 or (len(p) > 1 and (p[1:] < 0).any()) or (p[1:] >= np.arange(1, len(p))).any():
            raise TreeprobeError("clade structure must list nodes in pre-order (parent[v] < v, root first)")

    @property
    def n_nodes(self) -> int:
        """Number of nodes, root included."""
        return len(self.parent)

    @property
    def n_items(self) -> int:
        """Number of items N."""
        return len(self.item_node)

    def depth_levels(self) -> np.ndarray:
        """Number of edges from the root to each node, int64 (n_nodes,)."""
        return tree_depth(self.parent)

    def _levels(self) -> list[np.ndarray]:
        """Node indices grouped by depth (level 0 = the root), each group ascending."""
        depth = self.depth_levels()
        order = np.argsort(depth, kind="stable")
        return np.split(order, np.cumsum(np.bincount(depth))[:-1])

    def root_distance(self) -> np.ndarray:
        """Sum of edge lengths from the root to each node, float64 (n_nodes,)."""
        d = np.zeros(self.n_nodes)
        for nodes in self._levels()[1:]:  # one vectorised step per depth level, same sums as a pre-order pass
            d[nodes] = d[self.parent[nodes]] + self.length[nodes]
        return d

    def ancestor_matrix(self) -> sp.csr_matrix:
        """Sparse (n_nodes, n_nodes) 0/1 matrix A with A[a, v] = 1 if a is v or an ancestor of v."""
        cols = np.arange(self.n_nodes)
        cur = cols
        rows_l, cols_l = [cur], [cols]
        while True:  # one step up the tree per iteration, for all nodes still below the root
            cur = self.parent[cur]
            keep = cur >= 0
            cur, cols = cur[keep], cols[keep]
            if not cur.size:
                break
            rows_l.append(cur)
            cols_l.append(cols)
        rows, cols = np.concatenate(rows_l), np.concatenate(cols_l)
        return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(self.n_nodes, self.n_nodes))

    def membership(self) -> sp.csr_matrix:
        """Sparse (n_nodes, N) 0/1 matrix: item j lies in the clade below node v."""
        leaf = sp.csr_matrix(
            (np.ones(self.n_items), (self.item_node, np.arange(self.n_items))),
            shape=(self.n_nodes, self.n_items),
        )
        return (self.ancestor_matrix() @ leaf).tocsr()

    def items_per_node(self) -> np.ndarray:
        """Clade sizes |C| for every node, int64 (n_nodes,)."""
        counts = np.bincount(self.item_node, minlength=self.n_nodes).astype(np.int64)
        return self.accumulate_up(counts)

    def accumulate_up(self, values: np.ndarray) -> np.ndarray:
        """Subtree sums: out[v] = Σ of ``values`` over v and its descendants. values: (n_nodes, ...)."""
        out = np.array(values, copy=True)
        for nodes in self._levels()[:0:-1]:  # deepest level first: children are final before their parents
            np.add.at(out, self.parent[nodes], out[nodes])
        return out

    def node_distances(self, nodes: np.ndarray) -> np.ndarray:
        """Patristic distances between the given nodes, float64 (k, k)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        A = self.ancestor_matrix()[:, nodes]  # (n_nodes, k)
        shared = (A.T @ sp.diags(self.length) @ A).toarray()  # length shared from the root
        rd = np.asarray(shared.diagonal()).copy()
        D = rd[:, None] + rd[None, :] - 2.0 * shared
        np.fill_diagonal(D, 0.0)
        return np.maximum(D, 0.0)

    def pair_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Patristic distances between node pairs (u[k], v[k]) (node indices (P,) each), float64
        (P,); O(P·depth) memory.

        t = r(u) + r(v) − 2·Σ_{common ancestors c, incl. u or v themselves} w_c, r = root distance.

        In the tree ((a:1, b:2)x:0.5, c:4), nodes 0 (root), 1 (x), 2 (a), 3 (b), 4 (c):

        >>> cs = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0, 0.5, 1, 2, 4]),
        ...                     item_node=np.array([2, 3, 4]), names=np.array(["", "x", "a", "b", "c"], dtype=object))
        >>> cs.pair_distances([2, 2, 3, 1], [3, 4, 4, 1]).tolist()
        [3.0, 5.5, 6.5, 0.0]
        """
        u = np.asarray(u, dtype=np.int64)
        v = np.asarray(v, dtype=np.int64)
        A = self.ancestor_matrix().tocsc()
        shared = np.asarray(A[:, u].multiply(A[:, v]).T @ self.length).ravel()
        rd = self.root_distance()
        return np.maximum(rd[u] + rd[v] - 2.0 * shared, 0.0)

    def item_distances(self) -> np.ndarray:
        """Patristic distances between all items, float64 (N, N). Needs N² memory."""
        leaves, inv = np.unique(self.item_node, return_inverse=True)
        D = self.node_distances(leaves)
        return D[np.ix_(inv, inv)]

    def subset_items(self, index: np.ndarray) -> "CladeStructure":
        """Same tree, restricted to the given items (nodes kept, so sizes may be zero)."""
        return CladeStructure(parent=self.parent, length=self.length, item_node=self.item_node[np.asarray(index)],
                              names=self.names, ultrametric_levels=self.ultrametric_levels)


def clade_structure_from_tree(tree, item_leaf_names: Sequence[str]) -> tuple[CladeStructure, np.ndarray]:
    """Array form of an ete3 tree whose leaves are named by species.

    ``item_leaf_names``: the species of each of N items; a leaf ``Genus_epithet`` also matches
    ``Genus epithet``. Returns the structure over the items whose name matches a leaf (edge
    lengths = the tree's ``dist``), and a boolean (N,) mask of which items were placed (the
    others are not in the tree). Raises if leaf names are duplicated, no item matches, or a
    branch length is negative. When some items are not placed, a :class:`TreeprobeWarning` says
    "the tree covers S of T species: N items of species not in the tree are left out of the Mantel
    tests" (T: distinct non-empty names among the items; items with no species name count in N).
    """
    nodes = list(tree.traverse("preorder"))
    index = {id(n): i for i, n in enumerate(nodes)}
    parent = np.array([-1] + [index[id(n.up)] for n in nodes[1:]], dtype=np.int64)
    length = np.array([0.0] + [float(n.dist) for n in nodes[1:]])
    names = np.array([n.name for n in nodes], dtype=object)
    leaf_index: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.is_leaf():
            if n.name in leaf_index:
                raise TreeprobeError(f"tree has duplicate leaf name {n.name!r}")
            leaf_index[n.name] = i
    alt = {k.replace("_", " "): v for k, v in leaf_index.items()}
    item_node = np.array([leaf_index.get(s, alt.get(s, -1)) for s in item_leaf_names], dtype=np.int64)
    mask = item_node >= 0
    if not mask.any():
        raise TreeprobeError("no item's species matches a leaf name of the tree")
    if (length < 0).any():
        raise TreeprobeError("tree has negative branch lengths")
    if not mask.all():
        names_ = np.asarray(item_leaf_names, dtype=object)
        named = np.array([isinstance(s, str) and s != "" for s in names_], dtype=bool)
        n_species = len(set(names_[named]))
        n_in = len(set(names_[mask & named]))
        n_unnamed = int((~named).sum())
        unnamed = f" ({n_unnamed} of them with no species name)" if n_unnamed else ""
        warnings.warn(f"the tree covers {n_in} of {n_species} species: {int((~mask).sum())} of {len(mask)} items "
                      f"of species not in the tree{unnamed} are left out of the Mantel tests, which use "
                      f"{int(mask.sum())} items", TreeprobeWarning, stacklevel=2)
    return CladeStructure(parent=parent, length=length, item_node=item_node[mask], names=names), mask


def read_newick(path: str):
    """Read a Newick file with ete3 (internal node names and branch lengths allowed); returns the
    ete3 ``Tree`` (for :func:`clade_structure_from_tree`). Raises :class:`TreeprobeError`, in one
    line, when the file is missing or not Newick."""
    from ete3 import Tree

    try:
        return Tree(str(path), format=1)
    except Exception as exc:  # ete3 raises NewickError and others
        raise TreeprobeError(f"cannot read Newick tree {path}: {exc}".splitlines()[0]) from None
