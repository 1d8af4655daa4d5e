"""The taxonomy as a first-class object: rank labels, an ete3 tree, and clade sums.

A :class:`Taxonomy` holds the 7-rank lineage of N items (images). Every taxon is
identified by its *cumulative* label (``Animalia|Arthropoda|Insecta``), so two
genera called ``Morus`` (a plant and a bird) or a family and an order that share
a name never merge.

Missing ranks (empty string, NaN, ``None``) follow one rule: the item is placed in
a placeholder taxon ``incertae_sedis_<rank>`` under its parent. There is one
placeholder per parent: two images of the genus *Felis* with no species share the
species ``...|Felis|incertae_sedis_species``, while an unknown species in
*Canis* is a different placeholder. Items with no kingdom cannot be placed at all;
:func:`placeable_mask` flags them so callers can drop and record them.

:class:`CladeStructure` is the array form of any rooted tree with branch lengths
over the items (nodes in pre-order, ``parent[v] < v``). It is what the exact
Mantel statistics and the pairwise tree distances are computed from, for the rank
taxonomy and for a user-supplied phylogeny alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from treeprobe.errors import TreeprobeError

RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
SEP = "|"
PLACEHOLDER = "incertae_sedis_{rank}"
_MISSING = {"", "nan", "none", "null", "na", "n/a"}


def _clean_column(col: pd.Series) -> pd.Series:
    """Strings stripped; NaN/None/'nan'/'' → ''."""
    s = col.astype("string").fillna("").str.strip()
    return s.where(~s.str.lower().isin(_MISSING), "").astype(object)


def clean_lineages(df: pd.DataFrame, ranks: Sequence[str] = RANKS) -> pd.DataFrame:
    """The rank columns of ``df`` as clean strings ('' for missing). Shape (N, len(ranks))."""
    missing = [r for r in ranks if r not in df.columns]
    if missing:
        raise TreeprobeError(
            f"missing rank column(s): {', '.join(missing)} (need {', '.join(ranks)})"
        )
    return pd.DataFrame({r: _clean_column(df[r]) for r in ranks}, index=df.index)


def placeable_mask(df: pd.DataFrame, ranks: Sequence[str] = RANKS) -> np.ndarray:
    """Boolean (N,): True where the lineage has at least its top rank (kingdom)."""
    return (clean_lineages(df, ranks)[ranks[0]] != "").to_numpy()


def tree_depth(parent: np.ndarray) -> np.ndarray:
    """Edges from the root to each node of a parent array (−1 at the root), int64 (n_nodes,).

    Pointer jumping: d[v] counts the edges from v up to jump[v]; O(n log depth), no Python loop over nodes.
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


class Taxonomy:
    """Lineages of N items over the ranks, with cumulative labels and integer codes.

    Build with :meth:`from_frame`. ``codes(rank)`` gives int64 (N,) taxon indices
    (0..n_taxa-1, sorted by cumulative label, so independent of row order).
    """

    def __init__(self, lineages: pd.DataFrame, ranks: Sequence[str] = RANKS):
        self.ranks: tuple[str, ...] = tuple(ranks)
        self.lineages = lineages.reset_index(drop=True)
        self._labels: dict[str, np.ndarray] = {}
        self._codes: dict[str, np.ndarray] = {}
        self._taxa: dict[str, np.ndarray] = {}
        cum = None
        for r in self.ranks:
            col = self.lineages[r].to_numpy(dtype=object)
            cum = col.copy() if cum is None else (cum + SEP + col)
            codes, uniques = pd.factorize(cum, sort=True)
            self._labels[r] = cum
            self._codes[r] = codes.astype(np.int64)
            self._taxa[r] = np.asarray(uniques, dtype=object)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, ranks: Sequence[str] = RANKS) -> "Taxonomy":
        """Taxonomy of the rows of ``df`` (which needs the rank columns).

        Missing ranks become ``incertae_sedis_<rank>`` under their parent. Raises
        :class:`TreeprobeError` if a row has no top rank (use :func:`placeable_mask`
        to drop such rows first) or if ``df`` is empty.
        """
        if len(df) == 0:
            raise TreeprobeError("no items: the data is empty")
        lin = clean_lineages(df, ranks)
        top = lin[ranks[0]]
        if (top == "").any():
            n = int((top == "").sum())
            raise TreeprobeError(
                f"{n} item(s) have no {ranks[0]} and cannot be placed in the taxonomy"
            )
        for r in ranks[1:]:
            fill = PLACEHOLDER.format(rank=r)
            lin[r] = lin[r].where(lin[r] != "", fill)
        return cls(lin, ranks)

    # --- labels and codes -------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.lineages)

    def labels(self, rank: str) -> np.ndarray:
        """Cumulative labels, object array (N,)."""
        return self._labels[self._check(rank)]

    def codes(self, rank: str) -> np.ndarray:
        """Taxon codes at ``rank``, int64 (N,)."""
        return self._codes[self._check(rank)]

    def taxon_labels(self, rank: str) -> np.ndarray:
        """Cumulative label of each taxon code at ``rank``, object array (n_taxa,)."""
        return self._taxa[self._check(rank)]

    def n_taxa(self, rank: str) -> int:
        return len(self._taxa[self._check(rank)])

    def codes_by_rank(self) -> dict[str, np.ndarray]:
        """Ordered mapping rank → codes (N,), top rank first."""
        return {r: self._codes[r] for r in self.ranks}

    def labels_by_rank(self) -> dict[str, np.ndarray]:
        return {r: self._labels[r] for r in self.ranks}

    def rank_summary(self) -> pd.DataFrame:
        """Per rank: number of taxa, of single-item taxa, of placeholder taxa, largest taxon size."""
        rows = []
        for r in self.ranks:
            counts = np.bincount(self._codes[r])
            placeholder = PLACEHOLDER.format(rank=r)
            n_ph = int(sum(str(t).rsplit(SEP, 1)[-1] == placeholder for t in self._taxa[r]))
            rows.append(
                dict(rank=r, n_taxa=len(counts), n_singleton_taxa=int((counts == 1).sum()),
                     n_placeholder_taxa=n_ph, largest_taxon=int(counts.max()))
            )
        return pd.DataFrame(rows)

    def subset(self, index) -> "Taxonomy":
        """Taxonomy of a subset of the items (boolean mask or integer index); codes are recomputed."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Taxonomy(self.lineages.iloc[idx], self.ranks)

    def _check(self, rank: str) -> str:
        if rank not in self._codes:
            raise TreeprobeError(f"unknown rank {rank!r}; ranks are {', '.join(self.ranks)}")
        return rank

    # --- trees --------------------------------------------------------------
    def _rank_lengths(self, rank_lengths: Mapping[str, float] | Sequence[float] | None) -> np.ndarray:
        if rank_lengths is None:
            return np.ones(len(self.ranks))
        if isinstance(rank_lengths, Mapping):
            unknown = set(rank_lengths) - set(self.ranks)
            if unknown:
                raise TreeprobeError(f"rank_lengths has unknown rank(s): {sorted(unknown)}")
            w = np.array([float(rank_lengths.get(r, 1.0)) for r in self.ranks])
        else:
            w = np.asarray(rank_lengths, dtype=float)
            if w.shape != (len(self.ranks),):
                raise TreeprobeError(f"rank_lengths needs {len(self.ranks)} values, got {w.shape}")
        if (w < 0).any() or not np.isfinite(w).all():
            raise TreeprobeError("rank_lengths must be finite and non-negative")
        return w

    def clade_structure(self, rank_lengths=None) -> "CladeStructure":
        """Array form of the rank tree: root, one node per taxon per rank; items at species.

        The edge above a rank-r taxon has length ``rank_lengths[r]`` (default 1), so
        two items whose lineages first differ at rank r are 2·Σ_{s≥r} w_s apart.
        """
        w = self._rank_lengths(rank_lengths)
        parent = [-1]
        length = [0.0]
        depth = [0]
        names = ["root"]
        offset = 1
        prev_codes_of_taxa = None
        prev_offset = 0
        for k, r in enumerate(self.ranks):
            n = self.n_taxa(r)
            # parent of each taxon at rank r: taxon at rank r-1 of any member item
            if k == 0:
                par = np.zeros(n, dtype=np.int64)
            else:
                par = np.empty(n, dtype=np.int64)
                par[self._codes[r]] = self._codes[self.ranks[k - 1]]
                par += prev_offset
            parent.extend(par.tolist())
            length.extend([w[k]] * n)
            depth.extend([k + 1] * n)
            names.extend(self._taxa[r].tolist())
            prev_offset = offset
            offset += n
        item_node = self._codes[self.ranks[-1]] + prev_offset
        return CladeStructure(
            parent=np.asarray(parent, dtype=np.int64),
            length=np.asarray(length, dtype=float),
            item_node=item_node.astype(np.int64),
            names=np.asarray(names, dtype=object),
            ultrametric_levels=len(self.ranks),
        )

    def tree(self, rank_lengths=None):
        """ete3 ``Tree`` of the taxonomy: nodes named by short name, with features
        ``rank``, ``label`` (cumulative) and ``n_items``; ``dist`` = edge length."""
        from ete3 import Tree

        cs = self.clade_structure(rank_lengths)
        counts = cs.items_per_node()
        nodes = [Tree(name="root")]
        nodes[0].add_features(rank="root", label="root", n_items=int(counts[0]))
        rank_of_depth = ("root",) + self.ranks
        depth = cs.depth_levels()
        for v in range(1, cs.n_nodes):
            label = cs.names[v]
            short = label.rsplit(SEP, 1)[-1]
            if short.startswith("incertae_sedis_"):
                short = label  # placeholders keep their full label: unique
            child = nodes[cs.parent[v]].add_child(name=short, dist=float(cs.length[v]))
            child.add_features(rank=rank_of_depth[depth[v]], label=label, n_items=int(counts[v]))
            nodes.append(child)
        return nodes[0]

    def to_newick(self, rank_lengths=None) -> str:
        """Newick of the taxonomy (internal nodes named, branch lengths = rank lengths)."""
        return self.tree(rank_lengths).write(format=1, format_root_node=True)


@dataclass
class CladeStructure:
    """A rooted tree over N items, as arrays (nodes in pre-order: ``parent[v] < v``).

    parent: int64 (n_nodes,), -1 for the root (node 0).
    length: float64 (n_nodes,), length of the edge above each node (root: 0).
    item_node: int64 (N,), the node each item sits at (a leaf of the tree).
    names: object (n_nodes,), node names (cumulative labels for the rank taxonomy).
    ultrametric_levels: number of ranks if this is a rank taxonomy, else None.
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
        return len(self.parent)

    @property
    def n_items(self) -> int:
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
        """Patristic distances between node pairs (u[k], v[k]), float64 (P,); O(P·depth) memory.

        t = r(u) + r(v) − 2·Σ_{common ancestors c, incl. u or v themselves} w_c, r = root distance.
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
        return CladeStructure(self.parent, self.length, self.item_node[np.asarray(index)], self.names,
                              self.ultrametric_levels)


def clade_structure_from_tree(tree, item_leaf_names: Sequence[str]) -> tuple[CladeStructure, np.ndarray]:
    """Array form of an ete3 tree whose leaves are named by species.

    Returns the structure over the items whose name matches a leaf, and a boolean
    (N,) mask of which items were placed (the others are not in the tree).
    Raises if leaf names are duplicated.
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
    return CladeStructure(parent, length, item_node[mask], names), mask


def read_newick(path: str):
    """Read a Newick file with ete3 (internal node names and branch lengths allowed)."""
    from ete3 import Tree

    try:
        return Tree(str(path), format=1)
    except Exception as exc:  # ete3 raises NewickError and others
        raise TreeprobeError(f"cannot read Newick tree {path}: {exc}".splitlines()[0]) from None
