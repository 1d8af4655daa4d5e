"""The taxonomy as a first-class object: rank labels, an ete3 tree, and clade sums.

A :class:`Taxonomy` holds the lineage of N items (images) over the ranks (the 7 Linnaean ranks by
default). Every taxon is identified by its *cumulative* label (``Animalia|Arthropoda|Insecta``),
so two genera called ``Morus`` (a plant and a bird) or a family and an order that share a name
never merge.

**Missing names.** A rank value is missing when it is NaN/None or, after stripping and lower-casing
(runs of spaces/underscores read as one space), one of :data:`MISSING_TOKENS` (``incertae sedis``,
``unknown``, ``NA``, ``-``, ``?``, '' ...; configurable with ``missing=``) or this module's own
placeholder for that rank (``incertae_sedis_genus`` in the genus column). Items with no top rank
(kingdom) cannot be placed at all; :func:`placeable_mask` flags them so callers drop and record them.

What a missing rank means depends on ``unknown`` (:meth:`Taxonomy.from_frame`):

``"placeholder"`` (the default for now; the old behaviour)
    The item is placed in a placeholder taxon ``incertae_sedis_<rank>`` under its parent, one per
    parent: two images of *Felis* with no species share ``...|Felis|incertae_sedis_species``.

``"separate"`` (meant to become the default): **an unknown is not evidence of identity.**
    An item unknown at a rank is in no taxon there: ``codes(rank)`` is −1, ``labels(rank)`` is
    '' and ``known(rank)`` False; two unknowns are never the same taxon. A *known* name below a
    gap is still a taxon, identified by its nearest known ancestor and its name, i.e. by its
    cumulative label with '' in the unknown slots (``Animalia|Chordata||Perciformes``). Two genera
    *X* under one order with unknown families therefore merge: same name, same known ancestor,
    and nothing known that tells them apart (genus names are unique within a nomenclatural code).
    No name is imputed from other rows: *X* under a known family *F* and *X* under the same order
    with an unknown family stay two genera.
    In the rank tree (:meth:`Taxonomy.clade_structure`) an item with unknown ranks gets a private
    leaf below its deepest known taxon, so two items whose deepest known taxon is the family F are
    as far apart as two different species of F (2·Σ of the rank lengths below family), never 0.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.tree import CladeStructure

__all__ = ["RANKS", "SEP", "PLACEHOLDER", "UNKNOWN_LEAF", "UNKNOWN_MODES", "MISSING_TOKENS", "Taxonomy",
           "clean_lineages", "is_missing", "placeable_mask"]

#: Separator of the ranks in a cumulative label (``Animalia|Chordata|Aves``).
SEP = "|"
#: Name of the placeholder taxon of an item whose ``rank`` is missing (``unknown="placeholder"``).
PLACEHOLDER = "incertae_sedis_{rank}"
#: Short name of the private leaf of item ``item`` (its row, 0..N-1) whose last rank is unknown,
#: in the tree of ``unknown="separate"``.
UNKNOWN_LEAF = "unknown_item_{item}"
#: How missing ranks are treated (see the module docstring).
UNKNOWN_MODES = ("placeholder", "separate")
#: Rank values read as missing, compared stripped and lower-cased, runs of whitespace/underscores as
#: one space. NaN, None and '' are always missing, whatever set is passed as ``missing=``.
MISSING_TOKENS: frozenset[str] = frozenset(
    {"", "incertae sedis", "incertae_sedis", "unknown", "na", "n/a", "none", "null", "nan", "-", "?"}
)


def _normalise_token(s: str) -> str:
    return re.sub(r"[\s_]+", " ", str(s).strip().lower())


def _token_set(missing: Iterable[str]) -> frozenset[str]:
    if isinstance(missing, str):
        raise TreeprobeError("missing must be a collection of strings, not one string")
    return frozenset(_normalise_token(t) for t in missing) | {""}  # '' is always missing


def is_missing(values, *, missing: Iterable[str] = MISSING_TOKENS, rank: str | None = None) -> np.ndarray:
    """Boolean (n,): which of ``values`` (array-like of str/NaN/None, length n) are missing names.

    Missing: NaN/None, a value in ``missing`` (case, surrounding whitespace, and runs of
    spaces/underscores ignored) or, when ``rank`` is given, the placeholder ``incertae_sedis_<rank>``.

    >>> is_missing([" Incertae Sedis", "NA", "Nasua", "?", None, "Felis"]).tolist()
    [True, True, False, True, True, False]
    """
    s = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
    return _missing_mask(s, _token_set(missing), rank).to_numpy(dtype=bool)


def _missing_mask(col: pd.Series, tokens: frozenset[str], rank: str | None) -> pd.Series:
    """Boolean Series: NaN/None, a token, or (``rank`` given) that rank's placeholder."""
    if rank is not None:
        tokens = tokens | {_normalise_token(PLACEHOLDER.format(rank=rank))}
    key = col.astype("string").fillna("").str.strip().str.lower().str.replace(r"[\s_]+", " ", regex=True)
    return col.isna() | key.isin(tokens)


def _clean_column(col: pd.Series, tokens: frozenset[str], rank: str) -> pd.Series:
    """Strings stripped; missing values (NaN/None/tokens/placeholder of ``rank``) → ''."""
    s = col.astype("string").fillna("").str.strip()
    return s.where(~_missing_mask(col, tokens, rank), "").astype(object)


def clean_lineages(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                   missing: Iterable[str] = MISSING_TOKENS) -> pd.DataFrame:
    """The rank columns of ``df`` as stripped strings, '' where missing (see :func:`is_missing`).

    Shape (N, len(ranks)), same index as ``df``. Raises :class:`TreeprobeError` if a rank column is absent.
    """
    absent = [r for r in ranks if r not in df.columns]
    if absent:
        raise TreeprobeError(
            f"missing rank column(s): {', '.join(absent)} (need {', '.join(ranks)})"
        )
    tokens = _token_set(missing)
    return pd.DataFrame({r: _clean_column(df[r], tokens, r) for r in ranks}, index=df.index)


def placeable_mask(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                   missing: Iterable[str] = MISSING_TOKENS) -> np.ndarray:
    """Boolean (N,): True where the lineage has a known top rank (kingdom; ``incertae sedis`` is not)."""
    return (clean_lineages(df, ranks, missing=missing)[ranks[0]] != "").to_numpy()


class Taxonomy:
    """Lineages of N items over the ranks, with cumulative labels and integer codes.

    Build with :meth:`from_frame`. ``unknown``: ``"placeholder"`` or ``"separate"`` (module docstring).
    ``codes(rank)`` gives int64 (N,) taxon indices 0..n_taxa-1, sorted by cumulative label (so
    independent of row order); in ``"separate"`` mode −1 where the item is unknown at ``rank``.
    ``lineages``: the (N, len(ranks)) DataFrame of clean names (placeholders filled in
    ``"placeholder"`` mode, '' for unknown in ``"separate"`` mode).
    """

    def __init__(self, lineages: pd.DataFrame, ranks: Sequence[str] = RANKS, *, unknown: str = "placeholder"):
        if unknown not in UNKNOWN_MODES:
            raise TreeprobeError(f"unknown must be one of {', '.join(UNKNOWN_MODES)}; got {unknown!r}")
        self.ranks: tuple[str, ...] = tuple(ranks)
        self.unknown = unknown
        self.lineages = lineages.reset_index(drop=True)
        self._labels: dict[str, np.ndarray] = {}
        self._codes: dict[str, np.ndarray] = {}
        self._taxa: dict[str, np.ndarray] = {}
        self._known: dict[str, np.ndarray] = {}
        separate = unknown == "separate"
        cum = None
        for r in self.ranks:
            col = self.lineages[r].to_numpy(dtype=object)
            known = col != "" if separate else col != PLACEHOLDER.format(rank=r)
            cum = col.copy() if cum is None else (cum + SEP + col)  # '' in the unknown slots
            key = np.where(known, cum, None) if separate else cum
            codes, uniques = pd.factorize(key, sort=True)  # None → −1
            self._labels[r] = np.where(known, cum, "") if separate else cum
            self._codes[r] = codes.astype(np.int64)
            self._taxa[r] = np.asarray(uniques, dtype=object)
            self._known[r] = np.asarray(known, dtype=bool)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, ranks: Sequence[str] = RANKS, *, unknown: str = "placeholder",
                   missing: Iterable[str] = MISSING_TOKENS) -> "Taxonomy":
        """Taxonomy of the rows of ``df`` (which needs the rank columns).

        ``unknown="placeholder"``: missing ranks become ``incertae_sedis_<rank>`` under their parent.
        ``unknown="separate"``: missing ranks stay unknown (code −1, label ''), never a shared taxon.
        ``missing``: the tokens read as missing (:data:`MISSING_TOKENS`). Raises
        :class:`TreeprobeError` if a row has no top rank (use :func:`placeable_mask` to drop such
        rows first) or if ``df`` is empty.

        Two genera called *Morus* (a bird and a plant) stay apart:

        >>> df = pd.DataFrame({"kingdom": ["Animalia", "Plantae", "Plantae"],
        ...                    "genus": ["Morus", "Morus", "Ficus"]})
        >>> tax = Taxonomy.from_frame(df, ranks=("kingdom", "genus"))
        >>> tax.codes("genus").tolist(), tax.n_taxa("genus")
        ([0, 2, 1], 3)
        >>> tax.labels("genus")[1]
        'Plantae|Morus'

        Two unknown genera are not one genus:

        >>> df = pd.DataFrame({"kingdom": ["Plantae"] * 3, "genus": ["unknown", None, "Ficus"]})
        >>> tax = Taxonomy.from_frame(df, ranks=("kingdom", "genus"), unknown="separate")
        >>> tax.codes("genus").tolist(), tax.n_taxa("genus"), tax.labels("genus").tolist()
        ([-1, -1, 0], 1, ['', '', 'Plantae|Ficus'])
        """
        if unknown not in UNKNOWN_MODES:
            raise TreeprobeError(f"unknown must be one of {', '.join(UNKNOWN_MODES)}; got {unknown!r}")
        if len(df) == 0:
            raise TreeprobeError("no items: the data is empty")
        lin = clean_lineages(df, ranks, missing=missing)
        top = lin[ranks[0]]
        if (top == "").any():
            n = int((top == "").sum())
            raise TreeprobeError(
                f"{n} item(s) have no {ranks[0]} and cannot be placed in the taxonomy"
            )
        if unknown == "placeholder":
            for r in ranks[1:]:
                fill = PLACEHOLDER.format(rank=r)
                lin[r] = lin[r].where(lin[r] != "", fill)
        return cls(lin, ranks, unknown=unknown)

    # --- labels and codes -------------------------------------------------
    @property
    def n_items(self) -> int:
        """Number of items N."""
        return len(self.lineages)

    def labels(self, rank: str) -> np.ndarray:
        """Cumulative labels, object array (N,); '' where unknown at ``rank`` (``"separate"`` mode)."""
        return self._labels[self._check(rank)]

    def codes(self, rank: str) -> np.ndarray:
        """Taxon codes at ``rank``, int64 (N,); −1 where unknown at ``rank`` (``"separate"`` mode)."""
        return self._codes[self._check(rank)]

    def known(self, rank: str) -> np.ndarray:
        """Boolean (N,): the item's name at ``rank`` is known (not missing). In ``"placeholder"``
        mode the unknown items still have a code (their placeholder taxon)."""
        return self._known[self._check(rank)]

    def taxon_labels(self, rank: str) -> np.ndarray:
        """Cumulative label of each taxon code at ``rank``, object array (n_taxa,)."""
        return self._taxa[self._check(rank)]

    def n_taxa(self, rank: str) -> int:
        """Number of taxa at ``rank``: placeholders included in ``"placeholder"`` mode, known
        taxa only in ``"separate"`` mode."""
        return len(self._taxa[self._check(rank)])

    def codes_by_rank(self) -> dict[str, np.ndarray]:
        """Ordered mapping rank → codes (N,), top rank first."""
        return {r: self._codes[r] for r in self.ranks}

    def labels_by_rank(self) -> dict[str, np.ndarray]:
        """Ordered mapping rank → cumulative labels (N,), top rank first."""
        return {r: self._labels[r] for r in self.ranks}

    def rank_summary(self) -> pd.DataFrame:
        """One row per rank: ``n_taxa``, ``n_singleton_taxa`` (taxa of one item),
        ``n_placeholder_taxa`` (0 in ``"separate"`` mode), ``largest_taxon`` (items; 0 when no
        taxon) and ``n_unknown`` (items whose name at the rank is missing). Counts of items/taxa."""
        rows = []
        for r in self.ranks:
            codes = self._codes[r]
            counts = np.bincount(codes[codes >= 0], minlength=len(self._taxa[r]))
            placeholder = PLACEHOLDER.format(rank=r)
            n_ph = 0 if self.unknown == "separate" else int(
                sum(str(t).rsplit(SEP, 1)[-1] == placeholder for t in self._taxa[r]))
            rows.append(
                dict(rank=r, n_taxa=len(counts), n_singleton_taxa=int((counts == 1).sum()),
                     n_placeholder_taxa=n_ph, largest_taxon=int(counts.max()) if len(counts) else 0,
                     n_unknown=int((~self._known[r]).sum()))
            )
        return pd.DataFrame(rows)

    def subset(self, index) -> "Taxonomy":
        """Taxonomy of a subset of the items (boolean mask or integer index); codes are recomputed."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Taxonomy(self.lineages.iloc[idx], self.ranks, unknown=self.unknown)

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

        ``"separate"`` mode: no node for an unknown; a known taxon hangs from its nearest known
        ancestor (root if none) by the summed lengths of the ranks in between, and an item unknown
        at the last rank sits on its own leaf (:data:`UNKNOWN_LEAF`) below its deepest known taxon,
        at length Σ of the ranks below it. Every leaf is then Σ_s w_s from the root, and two items
        whose deepest shared known taxon is at rank r are 2·Σ_{s>r} w_s apart (0 only when both are
        known to be the same last-rank taxon).
        """
        return self._tree_arrays(self._rank_lengths(rank_lengths))[0]

    def _tree_arrays(self, w: np.ndarray) -> tuple[CladeStructure, np.ndarray]:
        """(clade structure, rank of each node: object (n_nodes,), 'root' / a rank / 'item')."""
        separate = self.unknown == "separate"
        cumw = np.concatenate([[0.0], np.cumsum(w)])  # cumw[k] = Σ_{s<k} w_s

        def span(lo, hi):  # Σ_{lo≤s<hi} w_s per element; exactly w[lo] for one rank (old bits kept)
            lo = np.asarray(lo)
            return np.where(hi - lo == 1, w[np.minimum(lo, len(w) - 1)], cumw[hi] - cumw[lo])

        N = self.n_items
        parent, length, names, node_rank = [-1], [0.0], ["root"], ["root"]
        deepest_node = np.zeros(N, dtype=np.int64)  # node of each item's deepest known taxon so far
        deepest_rank = np.full(N, -1, dtype=np.int64)  # its rank index (−1: the root)
        offset = 1
        for k, r in enumerate(self.ranks):
            codes = self._codes[r]
            n = self.n_taxa(r)
            have = codes >= 0
            par = np.zeros(n, dtype=np.int64)
            above = np.full(n, -1, dtype=np.int64)
            # parent of each taxon: the deepest known taxon above it of any member (all members agree)
            par[codes[have]] = deepest_node[have]
            above[codes[have]] = deepest_rank[have]
            parent.extend(par.tolist())
            length.extend(span(above + 1, k + 1).tolist())
            names.extend(self._taxa[r].tolist())
            node_rank.extend([r] * n)
            deepest_node[have] = codes[have] + offset
            deepest_rank[have] = k
            offset += n
        item_node = deepest_node.copy()
        if separate:
            alone = ~self._known[self.ranks[-1]]
            idx = np.flatnonzero(alone)
            parent.extend(deepest_node[idx].tolist())
            length.extend(span(deepest_rank[idx] + 1, len(w)).tolist())
            names.extend(f"{names[v]}{SEP}{UNKNOWN_LEAF.format(item=i)}" for v, i in zip(deepest_node[idx], idx))
            node_rank.extend(["item"] * len(idx))
            item_node[idx] = offset + np.arange(len(idx))
        cs = CladeStructure(
            parent=np.asarray(parent, dtype=np.int64),
            length=np.asarray(length, dtype=float),
            item_node=item_node.astype(np.int64),
            names=np.asarray(names, dtype=object),
            ultrametric_levels=len(self.ranks),
        )
        return cs, np.asarray(node_rank, dtype=object)

    def tree(self, rank_lengths=None):
        """ete3 ``Tree`` of the taxonomy (the same tree as :meth:`clade_structure`): nodes named by
        short name, with features ``rank`` ('item' for a private leaf of ``"separate"`` mode),
        ``label`` (cumulative) and ``n_items``; ``dist`` = edge length."""
        from ete3 import Tree

        cs, node_rank = self._tree_arrays(self._rank_lengths(rank_lengths))
        counts = cs.items_per_node()
        nodes = [Tree(name="root")]
        nodes[0].add_features(rank="root", label="root", n_items=int(counts[0]))
        for v in range(1, cs.n_nodes):
            label = cs.names[v]
            short = label.rsplit(SEP, 1)[-1]
            if short.startswith("incertae_sedis_"):
                short = label  # placeholders keep their full label: unique
            child = nodes[cs.parent[v]].add_child(name=short, dist=float(cs.length[v]))
            child.add_features(rank=node_rank[v], label=label, n_items=int(counts[v]))
            nodes.append(child)
        return nodes[0]

    def to_newick(self, rank_lengths=None) -> str:
        """Newick of the taxonomy (internal nodes named, branch lengths = rank lengths)."""
        return self.tree(rank_lengths).write(format=1, format_root_node=True)
