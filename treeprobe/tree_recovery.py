"""The tree recovered from the embeddings: UPGMA or neighbour joining on taxon centroids, scored
against the taxonomy.

**Trees.** The centroid of a taxon is the unit-norm mean of its items' unit-normalised embeddings;
distances between centroids are cosine distances (1 − cos). :func:`upgma` is average linkage
(:func:`scipy.cluster.hierarchy.linkage`), an ultrametric rooted tree whose node heights are half the
linkage distances, so patristic distances equal scipy's :func:`~scipy.cluster.hierarchy.cophenet`.
:func:`neighbor_joining` is Saitou & Nei's neighbour joining written here in numpy (the canonical,
exact algorithm: no heuristic), O(S²) memory (one float64 S × S matrix: 0.8 GB at S = 10,000) and
O(S³) time; negative branch lengths are set to zero and the unrooted tree is rooted at the midpoint of
its longest leaf-to-leaf path. Either is a :class:`RecoveredTree`: a
:class:`~treeprobe.tree.CladeStructure` over the S taxa (item i = taxon i), an ete3 tree and Newick.

**Scores** (each against a reference tree over the same S taxa: the rank taxonomy or a user tree):

* cophenetic correlation: Pearson r over the S(S−1)/2 taxon pairs between the recovered tree's
  patristic distances (for UPGMA: scipy's cophenetic distances) and the reference's tree distances;
* Robinson–Foulds distance on unrooted bipartitions, as ete3's ``robinson_foulds(unrooted_trees=True)``
  counts it: only the non-trivial splits (both sides ≥ 2 taxa) that each tree has, so a polytomy of the
  taxonomy contributes no split; RF = |B Δ T|, max = |B| + |T|, nRF = RF / max. A binary tree B cannot
  reach nRF 0 against a polytomous T: the best it can do (any random resolution of T, which contains
  every split of T) is (|B| − |T|) / (|B| + |T|), reported as ``nrf_best``. ``split_recall`` = |B ∩ T| / |T|
  (the taxonomy's splits found; 1 for any resolution of T), and ``nrf_resolved`` is nRF against one
  random binary resolution of T (seeded), binary against binary;
* dendrogram purity per rank (Heller & Ghahramani 2005): over pairs of taxa in the same class (a taxon
  of that rank), the mean share of that class among the leaves of their smallest common subtree; items
  unknown at the rank are left out (the tree restricted to the known ones);
* monophyly per rank: the share of the rank's taxa with ≥ 2 leaves whose leaves form a clade of the
  rooted tree (again on the tree restricted to the leaves known at the rank), and per taxon.

Each score comes with a permutation null (the taxonomy labels of the leaves shuffled: tip i gets the
identity of taxon π(i)), its mean (``_null``: chance), the p-value (1 + #{null at least as good}) / (1 + B)
(``>=`` for scores where higher is better, ``<=`` for RF), and the score of the reference itself
resolved at random (``_best``: 1 for correlation, recall, purity, monophyly; ``nrf_best`` as above).

With a user reference tree, ``_best`` for purity and monophyly is that tree's own score (1 when the
taxonomy's taxa are clades of it).

**Cost** (one core, 512-d centroids; ``benchmarks/bench_tree_recovery.py``): UPGMA 0.08 s / 1.5 s / 7 s at
S = 1,000 / 5,000 / 10,000 (plus the cosine matrix, 2.6 s at 10,000); neighbour joining 1 s / 66 s at
1,000 / 5,000 (O(S³): about 9 minutes at 10,000; memory 8·S² bytes). Permutations cost
O(Σ_i depth(i) · depth_ref(i)) each (sparse clade sums, batched: no S × S matrix): about 0.01 s / 0.07 s /
0.2 s per permutation at 1,000 / 5,000 / 10,000, i.e. 10 s / 66 s / 194 s for 999; a caterpillar-like tree
makes them O(S²). Memory: UPGMA works on the condensed distances (S(S−1)/2 float64: 0.4 GB at
10,000, plus scipy's copy; +0.8 GiB over the data at 10,000 leaves in ``benchmarks/bench_stream.py``), neighbour
joining on the S × S matrix (0.8 GB).

>>> D = np.array([[0, 2, 6, 10], [2, 0, 6, 10], [6, 6, 0, 10], [10, 10, 10, 0]], dtype=float)
>>> t = upgma(D, names=["a", "b", "c", "d"])
>>> t.to_newick()
'(d:5,(c:3,(a:1,b:1):2):2);'
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from treeprobe._validation import check_choice, check_codes, check_embeddings, check_int
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.permutation import TIP_SCHEMES
from treeprobe.tree import CladeStructure

__all__ = ["TREE_METHODS", "PERMUTED_LEAVES", "NJ_WARN_LEAVES", "TIE_TOLERANCE", "RecoveredTree", "TreeScores", "TreeRecoveryResult",
           "upgma", "neighbor_joining", "build_tree", "resolve_polytomies", "cophenetic_correlation", "robinson_foulds",
           "dendrogram_purity", "monophyly", "tree_scores", "tree_recovery", "plot_tree_recovery",
           "write_newick"]

#: Tree-building methods of :func:`build_tree`.
TREE_METHODS = ("upgma", "nj")
#: ``TreeRecoveryResult.params["permuted"]``: what the permutation nulls of :func:`tree_recovery` move.
PERMUTED_LEAVES = {
    "size-strata": "leaf labels (taxa) permuted among the tips of the recovered tree within strata of equal image "
                   "count (a taxon of n images only swaps with taxa of n images: centroids are exchangeable only "
                   "at equal precision)",
    "free": "leaf labels (taxa) permuted freely among the tips of the recovered tree (image counts ignored)",
}
#: Above this many taxa :func:`neighbor_joining` warns (O(S³): about a minute at 5,000 on one core).
NJ_WARN_LEAVES = 6_000
_NJ_BLOCK_ELEMS = 1 << 18  # float64 elements of the Q-criterion scratch block (2 MiB: stays in cache)
_KEY_STREAM = 0x5B11  # seed-sequence key of the split-hashing keys
_RESOLVE_STREAM = 0x2E50  # seed-sequence key of the random resolution of the reference


# --- trees as arrays --------------------------------------------------------------------------


def _preorder(parent: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    """Nodes in depth-first pre-order from the root (parent −1), children by increasing ``key``
    (default: node index), int64 (n,). Any node numbering."""
    parent = np.asarray(parent, dtype=np.int64)
    n = len(parent)
    roots = np.flatnonzero(parent < 0)
    if len(roots) != 1:
        raise TreeprobeError(f"a tree needs exactly one root; got {len(roots)}")
    nodes = np.flatnonzero(parent >= 0)
    k = nodes if key is None else np.asarray(key)[nodes]
    order = nodes[np.lexsort((nodes, k, parent[nodes]))]
    starts = np.searchsorted(parent[order], np.arange(n + 1)).tolist()
    kids = order.tolist()
    out, stack = [], [int(roots[0])]
    while stack:
        v = stack.pop()
        out.append(v)
        a, b = starts[v], starts[v + 1]
        if b > a:
            stack.extend(kids[b - 1:a - 1:-1] if a else kids[b - 1::-1])
    if len(out) != n:
        raise TreeprobeError("the parent array is not a tree (a cycle or a detached node)")
    return np.asarray(out, dtype=np.int64)


def _structure(parent, length, item_node, names=None, key=None) -> CladeStructure:
    """CladeStructure in depth-first pre-order (each subtree a contiguous node range) of a rooted
    tree given in any numbering: parent (n,) with −1 at the root, edge lengths (n,), the node of
    each item (N,), node names (n,) or None."""
    parent = np.asarray(parent, dtype=np.int64)
    pre = _preorder(parent, key)
    inv = np.empty(len(pre), dtype=np.int64)
    inv[pre] = np.arange(len(pre))
    p = parent[pre]
    newp = np.where(p >= 0, inv[np.maximum(p, 0)], -1)
    lengths = np.where(newp >= 0, np.asarray(length, dtype=np.float64)[pre], 0.0)
    nm = np.full(len(pre), "", dtype=object) if names is None else np.asarray(names, dtype=object)[pre]
    return CladeStructure(parent=newp, length=lengths, item_node=inv[np.asarray(item_node, dtype=np.int64)],
                          names=nm)


def _prune_empty(cs: CladeStructure) -> CladeStructure:
    """The same tree without the nodes that hold no item below them (their splits and clades are
    empty); node order and lengths kept."""
    keep = cs.items_per_node() > 0
    if keep.all():
        return cs
    new = np.full(cs.n_nodes, -1, dtype=np.int64)
    new[keep] = np.arange(int(keep.sum()))
    p = cs.parent[keep]
    return CladeStructure(parent=np.where(p >= 0, new[np.maximum(p, 0)], -1), length=cs.length[keep],
                          item_node=new[cs.item_node], names=cs.names[keep],
                          ultrametric_levels=cs.ultrametric_levels)


def _clades_of(tree) -> CladeStructure:
    if isinstance(tree, RecoveredTree):
        return tree.clades
    if isinstance(tree, CladeStructure):
        return tree
    raise TreeprobeError(f"expected a RecoveredTree or a CladeStructure, got {type(tree).__name__}")


def resolve_polytomies(clades: CladeStructure, *, seed: int = 0) -> CladeStructure:
    """A random binary resolution of a tree (CladeStructure over N items): every node with k > 2
    children becomes a random binary tree on them (k − 2 new nodes with zero-length edges, made by
    joining two of the current subtrees chosen uniformly, until two remain), seeded. Clades, splits and
    patristic distances of the input are all kept. Nodes without items are dropped first.

    >>> cs = CladeStructure(parent=np.array([-1, 0, 0, 0, 0]), length=np.array([0.0, 1, 1, 1, 1]),
    ...                     item_node=np.array([1, 2, 3, 4]), names=np.array([""] * 5, dtype=object))
    >>> r = resolve_polytomies(cs, seed=1)
    >>> r.n_nodes, int(np.bincount(r.parent[1:]).max()), r.item_distances().tolist() == cs.item_distances().tolist()
    (7, 2, True)
    """
    cs = _prune_empty(clades)
    rng = np.random.default_rng(np.random.SeedSequence([check_int(seed, "seed", minimum=0), _RESOLVE_STREAM]))
    parent = cs.parent.tolist()
    length = cs.length.tolist()
    names = cs.names.tolist()
    n_children = np.bincount(cs.parent[1:], minlength=cs.n_nodes)
    children: dict[int, list[int]] = {}
    for v in np.flatnonzero(n_children > 2).tolist():
        children[v] = []
    for c in range(1, cs.n_nodes):
        if parent[c] in children:
            children[parent[c]].append(c)
    for v, pool in children.items():
        while len(pool) > 2:
            a, b = sorted(rng.choice(len(pool), size=2, replace=False).tolist())
            u = len(parent)
            parent.append(v)
            length.append(0.0)
            names.append("")
            parent[pool[a]] = parent[pool[b]] = u
            pool.pop(b)
            pool.pop(a)
            pool.append(u)
    out = _structure(np.asarray(parent), np.asarray(length), cs.item_node, np.asarray(names, dtype=object))
    out.ultrametric_levels = cs.ultrametric_levels
    return out


# --- building trees ------------------------------------------------------------------------------


def _check_distances(D, what: str = "distance matrix") -> np.ndarray:
    """A square, symmetric, finite, non-negative float64 matrix (S ≥ 3); a condensed vector is expanded."""
    from scipy.spatial.distance import squareform

    D = np.asarray(D, dtype=np.float64)
    if D.ndim == 1:
        D = squareform(_check_condensed(D, what), checks=False)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise TreeprobeError(f"{what} must be square (S, S); got shape {D.shape}")
    if len(D) < 3:
        raise TreeprobeError(f"a tree needs at least 3 taxa; got {len(D)}")
    if not np.isfinite(D).all():
        raise TreeprobeError(f"{what} has NaN or infinite values")
    if (D < 0).any():
        raise TreeprobeError(f"{what} has negative values")
    scale = float(np.abs(D).max()) or 1.0
    for i in range(0, len(D), 1024):  # row blocks: no second S x S array
        if np.abs(D[i:i + 1024] - D[:, i:i + 1024].T).max() > 1e-9 * scale:
            raise TreeprobeError(f"{what} is not symmetric")
    return D


def _check_condensed(y, what: str = "distance matrix") -> np.ndarray:
    """A condensed distance vector (S(S−1)/2,), float64, finite, non-negative, S ≥ 3."""
    y = np.asarray(y, dtype=np.float64)
    s = (1 + math.isqrt(1 + 8 * y.size)) // 2
    if s * (s - 1) // 2 != y.size:
        raise TreeprobeError(f"{what}: a condensed vector of length {y.size} is not S(S−1)/2 for any S")
    if s < 3:
        raise TreeprobeError(f"a tree needs at least 3 taxa; got {s}")
    if not np.isfinite(y).all():
        raise TreeprobeError(f"{what} has NaN or infinite values")
    if (y < 0).any():
        raise TreeprobeError(f"{what} has negative values")
    return y


def _names(names, S: int) -> np.ndarray:
    if names is None:
        return np.array([f"t{i}" for i in range(S)], dtype=object)
    names = np.asarray([str(n) for n in names], dtype=object)
    if names.shape != (S,):
        raise TreeprobeError(f"names has {len(names)} entries for {S} taxa")
    return names


@dataclass(kw_only=True)
class RecoveredTree:
    """A tree built from S taxon centroids; build by keyword (made by :func:`upgma`,
    :func:`neighbor_joining`, :func:`build_tree`).

    clades: :class:`~treeprobe.tree.CladeStructure` in depth-first pre-order, item i = taxon i at a
    leaf, lengths in units of the input distances (cosine distance for centroids).
    names: object (S,), taxon names (leaf labels). method: ``"upgma"`` or ``"nj"``.
    linkage: scipy linkage matrix (S − 1, 4) for UPGMA, else None.
    """

    clades: CladeStructure
    names: np.ndarray
    method: str
    linkage: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_leaves(self) -> int:
        """Number of taxa S."""
        return self.clades.n_items

    def patristic(self) -> np.ndarray:
        """Patristic distances between the taxa, float64 (S, S) (S² memory)."""
        return self.clades.item_distances()

    def to_ete3(self):
        """ete3 ``Tree``: leaves named by taxon, ``dist`` = edge length, internal nodes unnamed."""
        from ete3 import Tree

        cs = self.clades
        leaf_name = np.full(cs.n_nodes, "", dtype=object)
        leaf_name[cs.item_node] = self.names
        nodes = [Tree()]
        for v in range(1, cs.n_nodes):
            nodes.append(nodes[cs.parent[v]].add_child(name=leaf_name[v], dist=float(cs.length[v])))
        return nodes[0]

    def to_newick(self) -> str:
        """Newick text (leaf names and branch lengths, 10 significant digits). ete3 writes the
        characters Newick reserves in a name (``( ) , : ; [ ]``) as ``_``; spaces are kept."""
        return self.to_ete3().write(format=5, dist_formatter="%0.10g")

    def write_newick(self, path) -> Path:
        """Write :meth:`to_newick` to ``path`` (atomically; folders created); returns the path."""
        return write_newick(self, path)


def write_newick(tree, path) -> Path:
    """Write a :class:`RecoveredTree` as Newick to ``path`` (parent folders created, written
    atomically); returns the path. Read back with :func:`treeprobe.tree.read_newick`."""
    from treeprobe._utils import atomic_write_text

    if not isinstance(tree, RecoveredTree):
        raise TreeprobeError(f"expected a RecoveredTree, got {type(tree).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, tree.to_newick() + "\n", fsync=False)


def upgma(D, names=None) -> RecoveredTree:
    """UPGMA tree of a distance matrix D (S, S) or its condensed form (scipy average linkage).

    Node heights are half the linkage distances, so the patristic distance between two taxa is
    their cophenetic distance (``scipy.cluster.hierarchy.cophenet``). Returns a :class:`RecoveredTree`
    (rooted, binary, ultrametric) with ``linkage`` set.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if np.ndim(D) == 1:  # condensed: used as it is (half the memory of the square form)
        y = _check_condensed(D)
        S = (1 + math.isqrt(1 + 8 * y.size)) // 2
    else:
        D = _check_distances(D)
        S = len(D)
        y = squareform(D, checks=False)
        del D
    Z = linkage(y, method="average")
    parent = np.full(2 * S - 1, -1, dtype=np.int64)
    parent[Z[:, 0].astype(np.int64)] = S + np.arange(S - 1)
    parent[Z[:, 1].astype(np.int64)] = S + np.arange(S - 1)
    height = np.concatenate([np.zeros(S), Z[:, 2] / 2.0])
    length = np.where(parent >= 0, height[np.maximum(parent, 0)] - height, 0.0)
    nm = _names(names, S)
    node_names = np.concatenate([nm, np.full(S - 1, "", dtype=object)])
    cs = _structure(parent, np.maximum(length, 0.0), np.arange(S), node_names)
    return RecoveredTree(clades=cs, names=nm, method="upgma", linkage=Z)


def _nj_pick(A: np.ndarray, r: np.ndarray, n: int, buf: np.ndarray, tri: np.ndarray) -> tuple[int, int]:
    """(i, j), i < j < n, minimising Q = (n − 2)·A[i, j] − r[i] − r[j] (first in row-major order on ties),
    scanning the upper triangle in row blocks that fit in cache."""
    best, bi, bj = np.inf, -1, -1
    m = float(n - 2)
    step = max(1, min(n, _NJ_BLOCK_ELEMS // n, tri.shape[0]))
    for b0 in range(0, n - 1, step):
        b1 = min(b0 + step, n - 1)
        h, w = b1 - b0, n - b0
        blk = buf[:h * w].reshape(h, w)
        np.multiply(A[b0:b1, b0:n], m, out=blk)
        blk -= r[b0:n]
        blk[:, :h][tri[:h, :h]] = np.inf  # j <= i
        idx = blk.argmin(axis=1)
        vals = blk[np.arange(h), idx] - r[b0:b1]
        t = int(vals.argmin())
        if vals[t] < best:
            best, bi, bj = vals[t], b0 + t, b0 + int(idx[t])
    return bi, bj


def _nj_unrooted(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour joining of D (S, S; overwritten). Returns (parent, length), (2S − 2,) each: leaves
    0..S−1, joined nodes S.., the last node (the centre of the final three) as a provisional root;
    lengths as computed (may be negative)."""
    A = D
    S = len(A)
    np.fill_diagonal(A, 0.0)
    r = A.sum(axis=1)
    slot = np.arange(S)  # node held by each active row
    parent = np.full(2 * S - 2, -1, dtype=np.int64)
    length = np.zeros(2 * S - 2)
    buf = np.empty(_NJ_BLOCK_ELEMS + S)
    rows = max(1, min(S, _NJ_BLOCK_ELEMS // 3))
    tri = np.tril(np.ones((min(rows, S), min(rows, S)), dtype=bool))
    new, n = S, S
    while n > 3:
        i, j = _nj_pick(A, r, n, buf, tri)
        dij = A[i, j]
        li = 0.5 * (dij + (r[i] - r[j]) / (n - 2))
        parent[slot[i]] = parent[slot[j]] = new
        length[slot[i]], length[slot[j]] = li, dij - li
        u = 0.5 * (A[i, :n] + A[j, :n] - dij)  # distances of the new node to every active row
        r[:n] += u - A[i, :n] - A[j, :n]
        A[i, :n] = u
        A[:n, i] = u
        A[i, i] = 0.0
        last = n - 1
        if j != last:  # the last active row moves into j
            A[j, :n] = A[last, :n]
            A[:n, j] = A[:n, last]
            A[j, j] = 0.0
            r[j] = r[last]
            slot[j] = slot[last]
        slot[i] = new
        new += 1
        n -= 1
        r[i] = A[i, :n].sum()
    d01, d02, d12 = A[0, 1], A[0, 2], A[1, 2]
    l0 = 0.5 * (d01 + d02 - d12)
    parent[slot[:3]] = new
    length[slot[:3]] = (l0, d01 - l0, d02 - l0)
    return parent, length


def _distances_from(x: int, parent: np.ndarray, length: np.ndarray, pre: np.ndarray, rd: np.ndarray) -> np.ndarray:
    """Path lengths from node x to every node of a rooted tree (any numbering; ``pre``: pre-order,
    ``rd``: root distances)."""
    on_path = np.zeros(len(parent), dtype=bool)
    v = x
    while v >= 0:
        on_path[v] = True
        v = parent[v]
    lca = np.empty(len(parent), dtype=np.int64)
    par = parent.tolist()
    onp = on_path.tolist()
    lc = [0] * len(parent)
    for v in pre.tolist():
        lc[v] = v if onp[v] else lc[par[v]]
    lca[:] = lc
    return rd + rd[x] - 2.0 * rd[lca]


def _midpoint_root(parent: np.ndarray, length: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-root a tree (leaves 0..S−1, non-negative lengths) at the midpoint of its longest leaf-to-leaf
    path: a new root node (index len(parent)) splits the edge holding the midpoint."""
    pre = _preorder(parent)
    rd = np.zeros(len(parent))
    par = parent.tolist()
    lens = length.tolist()
    rdl = rd.tolist()
    for v in pre.tolist()[1:]:
        rdl[v] = rdl[par[v]] + lens[v]
    rd = np.asarray(rdl)
    a = int(np.argmax(_distances_from(0, parent, length, pre, rd)[:S]))
    da = _distances_from(a, parent, length, pre, rd)
    b = int(np.argmax(da[:S]))
    m = da[b] / 2.0
    up_a, up_b = [a], [b]  # paths from a and b up to the root
    while par[up_a[-1]] >= 0:
        up_a.append(par[up_a[-1]])
    while par[up_b[-1]] >= 0:
        up_b.append(par[up_b[-1]])
    on_b = set(up_b)
    k = next(i for i, v in enumerate(up_a) if v in on_b)  # up_a[k]: the common ancestor
    path_a, path_b = up_a[:k], up_b[:up_b.index(up_a[k])]  # edges (v, parent v) of the a-b path
    w, x = a, 0.0  # a == b (all distances zero): the root goes on a's edge
    for v in path_a:  # from a upwards: distance from a grows
        if da[par[v]] >= m:
            w, x = v, m - da[v]
            break
    else:
        for v in reversed(path_b):  # then down towards b
            if da[v] >= m:
                w, x = v, da[v] - m
                break
    x = min(max(x, 0.0), lens[w])
    R = len(par)
    newp = par + [-1]
    newl = lens + [0.0]
    newp[w], newl[w] = R, x
    prev, cur, cur_len = R, par[w], lens[w] - x
    while cur >= 0:
        nxt, nxt_len = par[cur], lens[cur]
        newp[cur], newl[cur] = prev, cur_len
        prev, cur, cur_len = cur, nxt, nxt_len
    return np.asarray(newp, dtype=np.int64), np.asarray(newl)


def neighbor_joining(D, names=None) -> RecoveredTree:
    """Neighbour-joining tree of a distance matrix D (S, S) or its condensed form, S ≥ 3.

    Exact NJ (Saitou & Nei 1987): at each step the pair minimising Q(i, j) = (n − 2)·d(i, j) − Σ_k d(i, k)
    − Σ_k d(j, k) is joined (first pair in row-major order on ties), as ``skbio.tree.nj`` does; negative
    branch lengths are then set to 0 (skbio's default) and the unrooted result is rooted at the midpoint
    of its longest leaf-to-leaf path. O(S²) memory (one float64 copy of D: 8·S² bytes, 0.8 GB at 10,000)
    and O(S³) time (warned above :data:`NJ_WARN_LEAVES`). Returns a :class:`RecoveredTree`.
    """
    return _neighbor_joining(_check_distances(D).copy(), names)


def _neighbor_joining(D: np.ndarray, names) -> RecoveredTree:
    S = len(D)
    if S > NJ_WARN_LEAVES:
        warnings.warn(f"neighbour joining of {S} taxa is O(S³): expect several minutes (UPGMA is O(S²))",
                      TreeprobeWarning, stacklevel=3)
    parent, length = _nj_unrooted(D)
    parent, length = _midpoint_root(parent, np.maximum(length, 0.0), S)
    nm = _names(names, S)
    node_names = np.concatenate([nm, np.full(len(parent) - S, "", dtype=object)])
    cs = _structure(parent, length, np.arange(S), node_names)
    return RecoveredTree(clades=cs, names=nm, method="nj")


def build_tree(centroids, method: str = "upgma", names=None) -> RecoveredTree:
    """Tree of S taxon centroids (S, D): cosine distances between the unit-normalised rows, then
    :func:`upgma` (``method="upgma"``, on the condensed distances: about S²·8 bytes with scipy's copy) or
    :func:`neighbor_joining` (``"nj"``, S² float64)."""
    from treeprobe.mantel import cosine_distance_condensed, cosine_distance_matrix

    check_choice(method, "tree method", TREE_METHODS)
    C = check_embeddings(centroids, "centroids")
    if len(C) < 3:
        raise TreeprobeError(f"a tree needs at least 3 taxa; got {len(C)}")
    if method == "upgma":  # the condensed distances: S²·4 bytes instead of S²·8
        return upgma(cosine_distance_condensed(C), names)
    return _neighbor_joining(cosine_distance_matrix(C), names)


# --- what the scores need of a tree ---------------------------------------------------------------


class _Prep:
    """Arrays of one tree over N items (nodes without items dropped) that every score reads."""

    def __init__(self, clades: CladeStructure):
        cs = _prune_empty(clades)
        self.cs = cs
        n, N = cs.n_nodes, cs.n_items
        self.N = N
        self.mem = cs.membership().tocsr()  # (n, N): item below node
        self.memT = self.mem.T.tocsr()  # (N, n), rows gathered by permutations
        size = cs.items_per_node().astype(np.float64)
        self.size = size
        self.length = cs.length.astype(np.float64)
        rd = cs.root_distance()
        self.r = rd[cs.item_node]  # root distance of each item
        self.sigma = np.asarray(self.memT @ (self.length * size)).ravel()  # Σ_j shared(i, j)
        sum_s2 = float(np.sum(self.length * size ** 2 * (2.0 * rd - self.length)))  # Σ_ij shared(i, j)²
        P = N * (N - 1) / 2.0
        self.P = P
        self.sum_r = float(self.r.sum())
        self.sum_pairs = N * self.sum_r - float(self.sigma.sum())  # Σ_{i<j} d(i, j)
        sum_sq = N * float(self.r @ self.r) + self.sum_r ** 2 - 4.0 * float(self.r @ self.sigma) + 2.0 * sum_s2
        self.ss = sum_sq - self.sum_pairs ** 2 / P  # centred Σ_{i<j} d²
        child = np.flatnonzero(cs.parent >= 0)
        self.child_sum = sp.csr_matrix((np.ones(len(child)), (cs.parent[child], child)), shape=(n, n))
        self.at_node = sp.csr_matrix((np.ones(N), (cs.item_node, np.arange(N))), shape=(n, N))
        pre = _preorder(cs.parent)
        pos = np.empty(n, dtype=np.int64)
        pos[pre] = np.arange(n)
        self.item_order = np.argsort(pos[cs.item_node], kind="stable")  # items in depth-first order
        own = np.bincount(cs.item_node, minlength=n)[pre]
        lo = np.empty(n, dtype=np.int64)
        lo[pre] = np.concatenate([[0], np.cumsum(own)[:-1]])
        split = np.flatnonzero((size >= 2) & (size <= N - 2))
        self.split_lo, self.split_hi = lo[split], lo[split] + size[split].astype(np.int64)

    def splits(self, keys: np.ndarray) -> np.ndarray:
        """Unique hashes (uint64) of the non-trivial unrooted splits, items hashed by ``keys`` (N,):
        a clade's hash is the wrapped sum of its keys, a split's the smaller of clade and complement."""
        with np.errstate(over="ignore"):
            c = np.concatenate([np.zeros(1, np.uint64), np.cumsum(keys[self.item_order], dtype=np.uint64)])
            h = c[self.split_hi] - c[self.split_lo]
            h = np.minimum(h, c[-1] - h)
        return np.unique(h)


class _Groups:
    """Classes of the N items at one rank (codes, −1 unknown) as a one-hot sparse matrix."""

    def __init__(self, codes: np.ndarray):
        codes = np.asarray(codes, dtype=np.int64)
        known = np.flatnonzero(codes >= 0)
        K = int(codes.max()) + 1 if known.size else 0
        self.codes = codes
        self.K = K
        self.sizes = np.bincount(codes[known], minlength=K).astype(np.float64)
        self.pairs = float(np.sum(self.sizes * (self.sizes - 1) / 2.0))
        self.eligible = self.sizes >= 2


def _batch_groups(g: _Groups, perms: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(one-hot (N, b·K), known (N, b)) of the classes with tip i holding item perms[p, i], permutation
    p in column block p."""
    b, N = perms.shape
    codes = g.codes[perms]  # (b, N)
    known = codes >= 0
    pi, ii = np.nonzero(known)
    G = sp.csr_matrix((np.ones(len(ii)), (ii, codes[pi, ii] + pi * g.K)), shape=(N, b * g.K))
    return G, known.T.astype(np.float64)


def _purity_monophyly(t: _Prep, g: _Groups, perms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dendrogram purity (b,), monophyletic flags (b, K)) of tree ``t`` for the classes ``g`` under
    each of the b permutations (rows of ``perms``). One sparse product for all b."""
    b = len(perms)
    G, known = _batch_groups(g, perms)
    Nm = (t.mem @ G).tocsr()  # (n, b·K): items of each class below each node
    nk = np.asarray(t.mem @ known)  # (n, b): known items below each node
    N2 = Nm.multiply(Nm).tocsr()
    same_pairs = (N2 - t.child_sum @ N2 - t.at_node @ G) * 0.5  # same-class pairs whose LCA is the node
    c = same_pairs.multiply(Nm).tocoo()
    perm_of = c.col // g.K
    share = c.data / np.where(nk[c.row, perm_of] > 0, nk[c.row, perm_of], 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.bincount(perm_of, weights=share, minlength=b) / g.pairs
    coo = Nm.tocoo()
    k = coo.col % g.K
    size = g.sizes[k]
    hit = (coo.data == size) & (nk[coo.row, coo.col // g.K] == size)
    mono = np.zeros(b * g.K, dtype=bool)
    mono[coo.col[hit]] = True
    return purity, mono.reshape(b, g.K) & g.eligible


def _pair_cross(t: _Prep, ref: _Prep, perms: np.ndarray) -> np.ndarray:
    """Pearson r (b,) over item pairs between the patristic distances of ``t`` and those of ``ref``
    with ref's item perms[p, i] at t's item i. Clade-sum form (no N × N matrix), one sparse product
    for the b permutations."""
    b, N = perms.shape
    if not (t.ss > 0 and ref.ss > 0):
        return np.full(b, np.nan)
    inv = np.empty_like(perms)
    np.put_along_axis(inv, perms, np.arange(N)[None, :], axis=1)  # tip holding each ref item
    mt = ref.memT.tocoo()
    n_ref = ref.memT.shape[1]
    rows = inv[:, mt.row].ravel()
    cols = (mt.col[None, :] + n_ref * np.arange(b)[:, None]).ravel()
    MT = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(N, b * n_ref))
    C = (t.mem @ MT).tocsr()  # (n_t, b·n_ref): shared items of each pair of clades
    C.data **= 2
    cross = (np.asarray(t.length @ C).ravel().reshape(b, n_ref) @ ref.length)  # Σ_ij shared_t · shared_ref
    q, tau = ref.r[perms], ref.sigma[perms]  # (b, N)
    sxy = N * (q @ t.r) + t.sum_r * ref.sum_r - 2.0 * (tau @ t.r) - 2.0 * (q @ t.sigma) + 2.0 * cross
    cov = sxy - t.sum_pairs * ref.sum_pairs / t.P
    return cov / math.sqrt(t.ss * ref.ss)


@dataclass
class _Context:
    ref: _Prep
    keys: np.ndarray
    ref_splits: np.ndarray
    resolved_splits: np.ndarray
    groups: dict


#: Non-zeros of the batched sparse products held at once (sets how many permutations run together).
_BATCH_NNZ = 1 << 24


def _batch_rows(t: _Prep, ctx: _Context) -> int:
    """Permutations per batch: each costs about nnz(membership) · (reference depth + ranks) entries."""
    depth = ctx.ref.memT.nnz / max(ctx.ref.N, 1)
    per = t.mem.nnz * (depth + 2.0 * max(len(ctx.groups), 1))
    return int(max(1, min(256, _BATCH_NNZ // max(per, 1.0))))


def _evaluate(t: _Prep, ctx: _Context, perms: np.ndarray, *, taxa: bool = False) -> dict:
    """Every score of tree ``t`` against the reference with ref's item perms[p, i] at t's item i, for
    each row p of ``perms`` (b, N): name → (b,) array (``("taxa", rank)`` → (b, K) flags if ``taxa``)."""
    perms = np.atleast_2d(np.asarray(perms, dtype=np.int64))
    out: dict = {"cophenetic_r": _pair_cross(t, ctx.ref, perms)}
    n_ref, n_res = len(ctx.ref_splits), len(ctx.resolved_splits)
    common, common_res, n_t = [], [], []
    for p in perms:
        h = t.splits(ctx.keys[p])
        n_t.append(len(h))
        common.append(int(np.isin(h, ctx.ref_splits, assume_unique=True).sum()))
        common_res.append(int(np.isin(h, ctx.resolved_splits, assume_unique=True).sum()))
    n_t, common, common_res = np.array(n_t), np.array(common), np.array(common_res)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["rf"] = (n_t + n_ref - 2 * common).astype(np.float64)
        out["max_rf"] = (n_t + n_ref).astype(np.float64)
        out["nrf"] = out["rf"] / out["max_rf"]
        out["split_recall"] = common / n_ref if n_ref else np.full(len(perms), np.nan)
        out["nrf_resolved"] = (n_t + n_res - 2 * common_res) / (n_t + n_res)
    out["n_tree_splits"], out["n_reference_splits"] = n_t.astype(np.float64), np.full(len(perms), float(n_ref))
    for rank, g in ctx.groups.items():
        purity, mono = _purity_monophyly(t, g, perms)
        out[("purity", rank)] = purity
        n_el = int(g.eligible.sum())
        out[("monophyly", rank)] = mono.sum(axis=1) / n_el if n_el else np.full(len(perms), np.nan)
        if taxa:
            out[("taxa", rank)] = mono
    return out


# --- single scores ------------------------------------------------------------------------------


def _same_items(tree: CladeStructure, reference: CladeStructure) -> None:
    if tree.n_items != reference.n_items:
        raise TreeprobeError(f"the tree has {tree.n_items} taxa but the reference {reference.n_items}: "
                             "both must be over the same taxa, in the same order")
    if tree.n_items < 3:
        raise TreeprobeError(f"scores need at least 3 taxa; got {tree.n_items}")


def cophenetic_correlation(tree, reference) -> float:
    """Pearson r over the S(S−1)/2 taxon pairs between the patristic distances of ``tree`` and of
    ``reference`` (RecoveredTree or CladeStructure, item i = the same taxon in both). For a UPGMA tree
    this is the correlation of scipy's cophenetic distances with the reference's tree distances.
    Computed from clade sums (no S × S matrix). NaN when either tree has all pair distances equal."""
    t, ref = _clades_of(tree), _clades_of(reference)
    _same_items(t, ref)
    return float(_pair_cross(_Prep(t), _Prep(ref), np.arange(t.n_items)[None, :])[0])


def robinson_foulds(tree, reference) -> dict:
    """Robinson–Foulds distance between the unrooted bipartitions of two trees over the same S taxa
    (RecoveredTree or CladeStructure), counted as ete3's ``robinson_foulds(..., unrooted_trees=True)``:
    non-trivial splits only (both sides ≥ 2 taxa), each tree's distinct splits (a polytomy adds none).

    Returns ``rf`` = |B Δ T|, ``max_rf`` = |B| + |T|, ``nrf`` = rf / max_rf, ``split_recall`` = |B ∩ T| / |T|
    (share of the reference's splits in ``tree``), ``n_tree_splits`` = |B|, ``n_reference_splits`` = |T|.
    Splits are compared by 64-bit hashes (a false match has probability about S²/2⁶⁴).
    """
    t, ref = _clades_of(tree), _clades_of(reference)
    _same_items(t, ref)
    keys = _split_keys(t.n_items, 0)
    pt, pr = _Prep(t), _Prep(ref)
    ctx = _Context(ref=pr, keys=keys, ref_splits=pr.splits(keys), resolved_splits=pr.splits(keys), groups={})
    h = pt.splits(keys)
    common = int(np.isin(h, ctx.ref_splits, assume_unique=True).sum())
    n_t, n_r = len(h), len(ctx.ref_splits)
    rf = n_t + n_r - 2 * common
    return dict(rf=rf, max_rf=n_t + n_r, nrf=rf / (n_t + n_r) if n_t + n_r else float("nan"),
                split_recall=common / n_r if n_r else float("nan"), n_tree_splits=n_t, n_reference_splits=n_r)


def _split_keys(N: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _KEY_STREAM]))
    return rng.integers(0, np.iinfo(np.uint64).max, size=N, dtype=np.uint64, endpoint=True)


def dendrogram_purity(tree, codes) -> float:
    """Dendrogram purity (Heller & Ghahramani 2005) of a rooted tree (RecoveredTree or CladeStructure
    over S taxa) for classes ``codes`` (int (S,), −1 = unknown: left out, as if pruned from the tree):
    the mean, over unordered pairs of taxa of one class, of the share of that class among the known
    leaves of their smallest common subtree. In [0, 1]; 1 when every class is a clade. NaN without
    such pairs.

    >>> cs = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.ones(5),
    ...                     item_node=np.array([2, 3, 4]), names=np.array([""] * 5, dtype=object))
    >>> dendrogram_purity(cs, [0, 1, 0])   # the pair (0, 2) meets at the root: 2 of 3 leaves
    0.6666666666666666
    """
    cs = _clades_of(tree)
    codes = check_codes(codes, cs.n_items, "classes")
    g = _Groups(codes)
    return float(_purity_monophyly(_Prep(cs), g, np.arange(cs.n_items)[None, :])[0][0])


def monophyly(tree, codes) -> np.ndarray:
    """Per class of ``codes`` (int (S,), −1 = unknown), whether its taxa form a clade of the rooted
    ``tree`` restricted to the known taxa: float (K,), 1.0 / 0.0, NaN for classes of fewer than 2 taxa."""
    cs = _clades_of(tree)
    codes = check_codes(codes, cs.n_items, "classes")
    g = _Groups(codes)
    mono = _purity_monophyly(_Prep(cs), g, np.arange(cs.n_items)[None, :])[1][0]
    return np.where(g.eligible, mono.astype(np.float64), np.nan)


# --- scores with their permutation nulls ------------------------------------------------------------

#: (score, higher is better) of the tree-wide scores.
_TREE_STATS = (("cophenetic_r", True), ("nrf", False), ("split_recall", True), ("nrf_resolved", False))


@dataclass(kw_only=True)
class TreeScores:
    """Scores of one recovered tree against its reference, with permutation nulls; build by keyword.

    summary: one-row DataFrame: ``n_leaves``, ``n_permutations``, ``rf``, ``max_rf``, ``n_tree_splits``,
    ``n_reference_splits`` and, for each of ``cophenetic_r``, ``nrf``, ``split_recall``, ``nrf_resolved``,
    the observed value, ``<stat>_null`` (mean under permutation), ``<stat>_p`` and ``<stat>_best``.
    ranks: one row per rank: ``rank``, ``n_taxa`` (taxa with ≥ 2 leaves), ``n_pairs`` (same-taxon pairs),
    ``purity``/``_null``/``_p``/``_best``, ``monophyly``/``_null``/``_p``/``_best``, ``n_monophyletic``.
    taxa: one row per taxon with ≥ 2 leaves: ``rank``, ``code``, ``taxon``, ``n_leaves``, ``monophyletic``.
    null: statistic name (or ``(stat, rank)``) → float array (B,) of permuted values.
    """

    summary: pd.DataFrame
    ranks: pd.DataFrame
    taxa: pd.DataFrame
    null: dict = field(repr=False, default_factory=dict)


#: Relative tolerance within which a permuted score ties the observed one (the same labelling reached
#: by another permutation gives the same score up to the order of floating-point sums).
TIE_TOLERANCE = 1e-12


def _p_value(obs: float, null: np.ndarray, higher: bool) -> float:
    """(1 + #{null at least as good as obs}) / (1 + B), ties within :data:`TIE_TOLERANCE` counted; NaN
    without permutations or for a NaN score."""
    null = np.asarray(null, dtype=np.float64)
    if null.size == 0 or not np.isfinite(obs):
        return float("nan")
    tol = TIE_TOLERANCE * max(1.0, abs(obs))
    hits = np.sum(null >= obs - tol) if higher else np.sum(null <= obs + tol)
    return float((hits + 1) / (null.size + 1))


def tree_scores(tree, reference, groups: Mapping[str, np.ndarray] | None = None, *, permutations: int = 999,
                seed: int = 0, strata=None, taxon_labels: Mapping[str, Sequence[str]] | None = None) -> TreeScores:
    """Score a tree (RecoveredTree or CladeStructure over S taxa) against ``reference`` (CladeStructure
    over the same S taxa, e.g. the rank taxonomy) and, per rank, against the classes ``groups``
    (rank → int codes (S,), −1 unknown).

    Permutation null: ``permutations`` (B) shuffles of the reference's taxa among the tips
    (``np.random.default_rng(seed).permutation(S)`` each; with ``strata`` (S,) only within equal
    strata, e.g. image counts); p = (1 + #{null at least as good}) / (1 + B), ties within
    :data:`TIE_TOLERANCE` (relative) counted as at least as good. The random resolution
    behind ``nrf_resolved``/``*_best`` and the split hashes are seeded by ``seed`` too.
    ``taxon_labels``: rank → label per code, for the ``taxa`` table. Returns :class:`TreeScores`.
    """
    t_cs, ref_cs = _clades_of(tree), _clades_of(reference)
    _same_items(t_cs, ref_cs)
    B = check_int(permutations, "permutations", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    N = t_cs.n_items
    groups = dict(groups or {})
    for rank, codes in groups.items():
        groups[rank] = np.asarray(check_codes(codes, N, rank), dtype=np.int64)
    draw = None
    if strata is not None:
        from treeprobe.permutation import stratified_sampler

        strata = np.asarray(strata)
        if strata.shape != (N,):
            raise TreeprobeError(f"strata has shape {strata.shape}; expected ({N},)")
        draw = stratified_sampler(pd.factorize(strata, sort=True)[0])
    t, ref = _Prep(t_cs), _Prep(ref_cs)
    resolved = _Prep(resolve_polytomies(ref_cs, seed=seed))
    keys = _split_keys(N, seed)
    ctx = _Context(ref=ref, keys=keys, ref_splits=ref.splits(keys), resolved_splits=resolved.splits(keys),
                   groups={r: _Groups(c) for r, c in groups.items() if (c >= 0).any()})
    identity = np.arange(N)[None, :]
    obs = {k: v[0] for k, v in _evaluate(t, ctx, identity, taxa=True).items()}
    best = {k: v[0] for k, v in _evaluate(resolved, ctx, identity).items()}
    rng = np.random.default_rng(seed)
    perms = np.array([(draw(rng) if draw is not None else rng.permutation(N)) for _ in range(B)],
                     dtype=np.int64).reshape(B, N)
    keys_stats = [k for k in obs if not (isinstance(k, tuple) and k[0] == "taxa")]
    step = _batch_rows(t, ctx)
    parts = [_evaluate(t, ctx, perms[i:i + step]) for i in range(0, B, step)]
    null = {k: (np.concatenate([part[k] for part in parts]) if parts else np.zeros(0)) for k in keys_stats}

    def triple(key, higher):
        o = obs[key]
        d = null[key]
        return dict(null=float(d.mean()) if d.size else float("nan"), p=_p_value(o, d, higher) if d.size
                    else float("nan"), best=best[key])

    row = dict(n_leaves=N, n_permutations=B, rf=int(obs["rf"]), max_rf=int(obs["max_rf"]),
               n_tree_splits=int(obs["n_tree_splits"]), n_reference_splits=int(obs["n_reference_splits"]))
    for stat, higher in _TREE_STATS:
        tr = triple(stat, higher)
        row.update({stat: obs[stat], f"{stat}_null": tr["null"], f"{stat}_p": tr["p"], f"{stat}_best": tr["best"]})
    rank_rows, taxa_rows = [], []
    for rank, g in ctx.groups.items():
        rr = dict(rank=rank, n_taxa=int(g.eligible.sum()), n_pairs=int(g.pairs))
        for stat in ("purity", "monophyly"):
            tr = triple((stat, rank), True)
            rr.update({stat: obs[(stat, rank)], f"{stat}_null": tr["null"], f"{stat}_p": tr["p"],
                       f"{stat}_best": tr["best"]})
        mono = obs[("taxa", rank)]
        rr["n_monophyletic"] = int(mono.sum())
        rank_rows.append(rr)
        labels = None if taxon_labels is None or rank not in taxon_labels else list(taxon_labels[rank])
        for k in np.flatnonzero(g.eligible):
            taxa_rows.append(dict(rank=rank, code=int(k), taxon=labels[k] if labels is not None else str(k),
                                  n_leaves=int(g.sizes[k]), monophyletic=bool(mono[k])))
    rank_cols = ["rank", "n_taxa", "n_pairs"] + [f"{s}{x}" for s in ("purity", "monophyly")
                                                  for x in ("", "_null", "_p", "_best")] + ["n_monophyletic"]
    return TreeScores(summary=pd.DataFrame([row]), ranks=pd.DataFrame(rank_rows, columns=rank_cols),
                      taxa=pd.DataFrame(taxa_rows, columns=["rank", "code", "taxon", "n_leaves", "monophyletic"]),
                      null=null)


# --- on a TreeData ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TreeRecoveryResult:
    """What :func:`tree_recovery` found; build by keyword.

    method: ``"upgma"`` or ``"nj"``. trees: level → :class:`RecoveredTree` (level ``"species"``: one
    leaf per leaf of the rank tree, i.e. per species and per item of unknown species; another rank:
    one leaf per known taxon of that rank). references: level → the reference
    :class:`~treeprobe.tree.CladeStructure` over the same leaves. leaf_labels: level → DataFrame
    (S rows, one column per rank up to the level) of each leaf's cumulative taxon labels ('' unknown).
    summary: one row per level (``level`` + :class:`TreeScores` ``summary``); ranks: one row per
    (level, rank); taxa: per-taxon monophyly; null: (level, statistic) → permuted values; params.
    """

    method: str
    trees: dict
    references: dict
    leaf_labels: dict
    summary: pd.DataFrame
    ranks: pd.DataFrame
    taxa: pd.DataFrame
    null: dict = field(repr=False, default_factory=dict)
    params: dict = field(default_factory=dict)

    def tree(self, level: str = "species") -> RecoveredTree:
        """The recovered tree of ``level``."""
        if level not in self.trees:
            raise TreeprobeError(f"no tree for level {level!r}; levels are {', '.join(self.trees)}")
        return self.trees[level]

    def write_newick(self, path, level: str = "species") -> Path:
        """Write the recovered tree of ``level`` as Newick to ``path``; returns the path."""
        return write_newick(self.tree(level), path)


def _short_unique(labels) -> np.ndarray:
    """Last part of each cumulative label; the full label where the last part is not unique."""
    labels = np.asarray(labels, dtype=object)
    short = np.array([str(x).rsplit("|", 1)[-1] for x in labels], dtype=object)
    vals, counts = np.unique(short, return_counts=True)
    dup = set(vals[counts > 1].tolist())
    return np.array([lab if s in dup else s for s, lab in zip(short, labels)], dtype=object)


def _level_inputs(data, level: str, tree, rank_lengths):
    """(items used (N,) bool, leaf code (0..S−1) of each used item, reference CladeStructure over the
    S leaves, first item (index into all items) of each leaf) for one level."""
    tax = data.taxonomy
    ranks = list(tax.ranks)
    check_choice(level, "level", ("species", *ranks))
    if level in ("species", ranks[-1]):
        if tree is not None:
            from treeprobe.tree import clade_structure_from_tree

            clades, keep = clade_structure_from_tree(tree, tax.lineages[ranks[-1]].to_numpy())
        else:  # leaves of the rank tree: species, and items of unknown species on their own leaves
            clades, keep = tax.clade_structure(rank_lengths), np.ones(len(data), dtype=bool)
        codes = np.unique(clades.item_node, return_inverse=True)[1].astype(np.int64)
        first_pos = np.zeros(int(codes.max()) + 1, dtype=np.int64)
        first_pos[codes[::-1]] = np.arange(len(codes))[::-1]  # first (used) item of each leaf
        return keep, codes, clades.subset_items(first_pos), np.flatnonzero(keep)[first_pos]
    full = tax.clade_structure(rank_lengths)
    node_of: dict = {}
    for v, name in enumerate(full.names.tolist()):
        node_of.setdefault(name, v)
    item_node = np.array([node_of[lab] for lab in tax.taxon_labels(level)], dtype=np.int64)
    keep = tax.codes(level) >= 0
    codes = tax.codes(level)[keep]
    first = np.zeros(tax.n_taxa(level), dtype=np.int64)
    idx = np.flatnonzero(keep)
    first[codes[::-1]] = idx[::-1]
    ref = CladeStructure(parent=full.parent, length=full.length, item_node=item_node, names=full.names)
    return keep, codes, ref, first


def tree_recovery(data, *, method: str = "upgma", levels: Sequence[str] = ("species",), tree=None,
                  rank_lengths=None, permutations: int = 999, seed: int = 0,
                  permute: str = "size-strata") -> TreeRecoveryResult:
    """Build the tree of taxon centroids of ``data`` (a :class:`~treeprobe.core.TreeData`) and score it
    against the taxonomy.

    For each of ``levels`` (``"species"`` and/or rank names): one centroid per leaf (unit-norm mean of
    the unit-normalised embeddings ``data.unit`` of its items; at ``"species"`` the leaves of the rank
    tree: species, plus one per item of unknown species; at a rank, its known taxa, items unknown there
    left out), the tree by ``method`` (:data:`TREE_METHODS`), and :func:`tree_scores` against the rank
    tree (edge lengths ``rank_lengths``, one unit per rank by default) or, at ``"species"`` only, the
    ``tree`` (an ete3 tree, a Newick file or Newick text; leaves named by species; species not in it are
    left out, warned), per rank above the level. Permutations as :func:`tree_scores`; ``permute``
    (:data:`~treeprobe.permutation.TIP_SCHEMES`): ``"size-strata"`` (default) moves leaves only among leaves
    of equal image count (a centroid of 1 image is noisier than one of 10), ``"free"`` any leaf to any tip.
    ``params["permuted"]`` says which. Returns :class:`TreeRecoveryResult`.
    """
    from treeprobe.core import TreeData
    from treeprobe.mantel import taxon_centroids

    if not isinstance(data, TreeData):
        raise TreeprobeError(f"expected a treeprobe.TreeData, got {type(data).__name__}")
    check_choice(method, "tree method", TREE_METHODS)
    check_choice(permute, "tree-recovery permutation scheme", TIP_SCHEMES)
    levels = list(levels)
    if not levels:
        raise TreeprobeError("levels is empty: name at least one (species or a rank)")
    if tree is not None and levels != ["species"]:
        raise TreeprobeError("a user tree is compared at the species level only: use levels=('species',)")
    if isinstance(tree, (str, Path)):
        from treeprobe.tree import read_newick

        tree = read_newick(tree)
    tax = data.taxonomy
    X = data.unit
    trees, refs, leaf_labels, summaries, rank_tables, taxa_tables, nulls = {}, {}, {}, [], [], [], {}
    for level in levels:
        keep, codes, ref, first = _level_inputs(data, level, tree, rank_lengths)
        S = int(codes.max()) + 1
        if S < 3:
            raise TreeprobeError(f"level {level}: {S} leaves; a tree needs at least 3")
        centroids = taxon_centroids(X[keep], codes)
        upto = tax.ranks.index(level) if level in tax.ranks else len(tax.ranks) - 1
        lab = pd.DataFrame({r: tax.labels(r)[first] for r in tax.ranks[:upto + 1]})
        if level == "species" and tree is None:
            leaf_label = np.asarray(ref.names, dtype=object)[ref.item_node]
        elif level == "species":
            leaf_label = tax.labels(tax.ranks[-1])[first]
        else:
            leaf_label = tax.taxon_labels(level)
        names = _short_unique(leaf_label)
        rec = build_tree(centroids, method, names)
        scored = [r for r in tax.ranks[:upto] if r != level]
        groups = {r: tax.codes(r)[first] for r in scored}
        labels = {r: tax.taxon_labels(r) for r in scored}
        strata = np.bincount(codes, minlength=S) if permute == "size-strata" else None
        sc = tree_scores(rec, ref, groups, permutations=permutations, seed=seed, strata=strata, taxon_labels=labels)
        trees[level], refs[level], leaf_labels[level] = rec, ref, lab
        summaries.append(sc.summary.assign(level=level))
        rank_tables.append(sc.ranks.assign(level=level))
        taxa_tables.append(sc.taxa.assign(level=level))
        nulls.update({(level, k): v for k, v in sc.null.items()})

    def front(df):
        return df[["level"] + [c for c in df.columns if c != "level"]].reset_index(drop=True)

    params = dict(method=method, levels=levels, permutations=permutations, seed=seed, permute=permute,
                  permuted=PERMUTED_LEAVES[permute],
                  reference="user tree" if tree is not None else "rank taxonomy",
                  rank_lengths=None if rank_lengths is None else rank_lengths,
                  distance="cosine between unit-norm centroids")
    return TreeRecoveryResult(method=method, trees=trees, references=refs, leaf_labels=leaf_labels,
                              summary=front(pd.concat(summaries)), ranks=front(pd.concat(rank_tables)),
                              taxa=front(pd.concat(taxa_tables)), null=nulls, params=params)


# --- figure ---------------------------------------------------------------------------------------


def _layout(cs: CladeStructure, leaf_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """(x = root distance (n,), y (n,), line segments) of a rectangular dendrogram with item i at
    height leaf_y[i] (items at leaves)."""
    n = cs.n_nodes
    x = cs.root_distance()
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    np.minimum.at(lo, cs.item_node, leaf_y)
    np.maximum.at(hi, cs.item_node, leaf_y)
    y = np.full(n, np.nan)
    y[cs.item_node] = leaf_y
    par = cs.parent
    for v in range(n - 1, 0, -1):  # children after parents in pre-order: bottom-up
        if np.isnan(y[v]):
            y[v] = 0.5 * (lo[v] + hi[v])
        p = par[v]
        lo[p] = min(lo[p], y[v])
        hi[p] = max(hi[p], y[v])
    if np.isnan(y[0]):
        y[0] = 0.5 * (lo[0] + hi[0])
    v = np.arange(1, n)
    segs = [((x[par[i]], y[i]), (x[i], y[i])) for i in v]
    internal = np.flatnonzero(np.isfinite(lo) & (lo < hi))
    segs += [((x[i], lo[i]), (x[i], hi[i])) for i in internal]
    return x, y, segs


def plot_tree_recovery(result: TreeRecoveryResult, *, level: str = "species", rank: str = "order",
                       top_n: int = 10, title: str | None = None):
    """Tanglegram: the recovered tree of ``level`` (left, rectangular, branch lengths) and the reference
    (right, mirrored, its children ordered to follow the recovered tree), each leaf joined to itself by
    a line coloured by its taxon at ``rank`` (the ``top_n`` largest taxa in the colour-blind-safe
    :data:`~treeprobe.compare_plots.TAXON_COLOURS`, others grey, unknown light grey). The title gives
    the cophenetic r, nRF and the rank's monophyly and purity. Returns the Figure."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    from treeprobe.compare_plots import MIN_FONT_SIZE, taxon_colours
    from treeprobe.plots import _OTHER_GREY, _UNKNOWN_GREY, DisplayFigure, _short

    if not isinstance(result, TreeRecoveryResult):
        raise TreeprobeError(f"expected a TreeRecoveryResult, got {type(result).__name__}")
    rec = result.tree(level)
    labels_df = result.leaf_labels[level]
    if rank not in labels_df.columns:
        raise TreeprobeError(f"rank {rank!r} is not above level {level!r}; choose from {', '.join(labels_df.columns)}")
    labels = labels_df[rank].astype(str).to_numpy()
    colours = taxon_colours(labels, top_n=check_int(top_n, "top_n"))
    col = [colours.get(lab, _UNKNOWN_GREY if lab == "" else _OTHER_GREY) for lab in labels]
    S = rec.n_leaves
    cs = rec.clades
    pos = np.empty(S)
    order = np.argsort(cs.item_node, kind="stable")  # leaves in pre-order = depth-first order
    pos[order] = np.arange(S)
    ref = _prune_empty(result.references[level])
    sums = ref.accumulate_up(np.bincount(ref.item_node, weights=pos, minlength=ref.n_nodes))
    key = sums / np.maximum(ref.items_per_node(), 1)
    ref = _structure(ref.parent, ref.length, ref.item_node, ref.names, key=key)  # rotated to follow the tree
    ref_pos = np.empty(S)
    ref_order = np.lexsort((pos, ref.item_node))
    ref_pos[ref_order] = np.arange(S)

    fig = DisplayFigure(figsize=(11, 8), layout="constrained")
    gs = fig.add_gridspec(1, 3, width_ratios=[3, 1.2, 3])
    ax_t, ax_m, ax_r = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    lw = 0.6 if S <= 300 else 0.3
    for ax, tree_cs, leaf_y, mirror in ((ax_t, cs, pos, False), (ax_r, ref, ref_pos, True)):
        x, _, segs = _layout(tree_cs, leaf_y)
        ax.add_collection(LineCollection(segs, colors="0.25" if S <= 300 else "0.45", linewidths=lw))
        tip_x = x[tree_cs.item_node]
        ax.scatter(tip_x, leaf_y, c=col, s=8 if S <= 300 else 3, marker="s", linewidths=0, zorder=3)
        ax.set_xlim((x.max() * 1.02, -0.02 * x.max()) if mirror else (-0.02 * x.max(), x.max() * 1.02))
        ax.set_ylim(S, -1)
        ax.set_yticks([])
        ax.tick_params(labelsize=MIN_FONT_SIZE)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    grey = [i for i in range(S) if col[i] in (_OTHER_GREY, _UNKNOWN_GREY)]
    coloured = [i for i in range(S) if i not in set(grey)]
    for idx, alpha in ((grey, 0.35), (coloured, 0.7)):
        if idx:
            ax_m.add_collection(LineCollection([((0, pos[i]), (1, ref_pos[i])) for i in idx],
                                               colors=[col[i] for i in idx], linewidths=lw, alpha=alpha))
    ax_m.set_xlim(0, 1)
    ax_m.set_ylim(S, -1)
    ax_m.axis("off")
    s = result.summary[result.summary["level"] == level].iloc[0]
    rk = result.ranks[(result.ranks["level"] == level) & (result.ranks["rank"] == rank)]
    method = {"upgma": "UPGMA", "nj": "neighbour joining"}[result.method]
    ax_t.set_title(f"{method} tree of {S} {level} centroids\n(cosine distance; branch lengths)", fontsize=9)
    ax_r.set_title("taxonomy (reference tree)" if result.params.get("reference") == "rank taxonomy"
                   else "reference tree", fontsize=9)
    ax_t.set_xlabel("distance from the root", fontsize=MIN_FONT_SIZE)
    ax_r.set_xlabel("distance from the root", fontsize=MIN_FONT_SIZE)
    def f2(v):  # two decimals, no "-0.00"
        return f"{v:.2f}".replace("-0.00", "0.00")

    stats = f"cophenetic r = {f2(s['cophenetic_r'])} (chance {f2(s['cophenetic_r_null'])}), " \
            f"nRF = {f2(s['nrf'])} (chance {f2(s['nrf_null'])}, best {f2(s['nrf_best'])})"
    if len(rk):
        r0 = rk.iloc[0]
        stats += f"; {rank}: monophyletic {r0['monophyly']:.0%} (chance {r0['monophyly_null']:.0%}), " \
                 f"purity {f2(r0['purity'])} (chance {f2(r0['purity_null'])})"
    fig.suptitle((title + "\n" if title else "") + stats, fontsize=9)
    handles = [Line2D([], [], marker="s", ls="", color=c, label=_short(t)) for t, c in colours.items()]
    if any(c == _OTHER_GREY for c in col):
        handles.append(Line2D([], [], marker="s", ls="", color=_OTHER_GREY, label="other"))
    if any(c == _UNKNOWN_GREY for c in col):
        handles.append(Line2D([], [], marker="s", ls="", color=_UNKNOWN_GREY, label="unknown"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, max(1, len(handles))),
               fontsize=MIN_FONT_SIZE, frameon=False, title=rank, title_fontsize=MIN_FONT_SIZE)
    return fig
