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

:meth:`Taxonomy.clade_structure` gives the rank tree as a :class:`~treeprobe.tree.CladeStructure`
(the generic tree of :mod:`treeprobe.tree`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.tree import CladeStructure

__all__ = ["RANKS", "SEP", "PLACEHOLDER", "Taxonomy", "clean_lineages", "placeable_mask"]

#: Separator of the ranks in a cumulative label (``Animalia|Chordata|Aves``).
SEP = "|"
#: Name of the placeholder taxon of an item whose ``rank`` is missing (one per parent).
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


class Taxonomy:
    """Lineages of N items over the ranks, with cumulative labels and integer codes.

    Build with :meth:`from_frame`. ``codes(rank)`` gives int64 (N,) taxon indices
    (0..n_taxa-1, sorted by cumulative label, so independent of row order).
    ``lineages``: the (N, len(ranks)) DataFrame of clean names, placeholders filled.
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

        Two genera called *Morus* (a bird and a plant) stay apart:

        >>> df = pd.DataFrame({"kingdom": ["Animalia", "Plantae", "Plantae"],
        ...                    "genus": ["Morus", "Morus", "Ficus"]})
        >>> tax = Taxonomy.from_frame(df, ranks=("kingdom", "genus"))
        >>> tax.codes("genus").tolist(), tax.n_taxa("genus")
        ([0, 2, 1], 3)
        >>> tax.labels("genus")[1]
        'Plantae|Morus'
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
        """Number of items N."""
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
        """Number of taxa at ``rank`` (placeholders included)."""
        return len(self._taxa[self._check(rank)])

    def codes_by_rank(self) -> dict[str, np.ndarray]:
        """Ordered mapping rank → codes (N,), top rank first."""
        return {r: self._codes[r] for r in self.ranks}

    def labels_by_rank(self) -> dict[str, np.ndarray]:
        """Ordered mapping rank → cumulative labels (N,), top rank first."""
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

    def clade_structure(self, rank_lengths=None) -> CladeStructure:
        """Array form of the rank tree: root, one node per taxon per rank; items at species.

        The edge above a rank-r taxon has length ``rank_lengths[r]`` (a mapping rank → length
        or one value per rank; default 1 each), so two items whose lineages first differ at
        rank r are 2·Σ_{s≥r} w_s apart.
        """
        w = self._rank_lengths(rank_lengths)
        parent = [-1]
        length = [0.0]
        names = ["root"]
        offset = 1
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
