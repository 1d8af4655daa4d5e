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

**Names.** :func:`clean_lineages` (and so every Taxonomy) reads names in Unicode NFC with runs of
whitespace (spaces, tabs, no-break spaces) as one space and no leading/trailing whitespace, so
``"Parus\u00a0 major"`` is ``"Parus major"``. Letter case is kept here: ``Aves`` and ``aves`` are two
names to a Taxonomy; :func:`tidy_lineage_names` (run by :class:`~treeprobe.core.TreeData` on its
items) spells the case variants of one name alike. A name may not contain :data:`SEP`.

**Lineage conflicts.** A taxon is expected to have one parent: the same name at the same rank in
the same kingdom under two different names at the rank directly above (rows where both are known)
is a conflict. :func:`lineage_conflicts` lists them; the items keep their lineages (each lineage
is its own taxon, as homonyms are), since no rule can tell which parent is right.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.tree import CladeStructure

__all__ = ["RANKS", "SEP", "PLACEHOLDER", "UNKNOWN_LEAF", "UNKNOWN_MODES", "MISSING_TOKENS", "CONFLICT_COLUMNS",
           "Taxonomy", "clean_lineages", "conflict_summary", "is_missing", "lineage_conflicts", "lineage_graph",
           "normalise_name", "placeable_mask", "tidy_lineage_names"]

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


#: Columns of :func:`lineage_conflicts`.
CONFLICT_COLUMNS = ("kingdom", "rank", "name", "parent_rank", "parent", "n_items")
_WHITESPACE = re.compile(r"\s+")  # str patterns: every Unicode space (tab, U+00A0, U+2009, ...)
_NUMBER = r"[+-]?\d+(?:[.,]\d+)?"


def normalise_name(name: str) -> str:
    """``name`` in Unicode NFC, runs of whitespace as one space, stripped.

    >>> normalise_name(" Parus\u00a0\tmajor  ")
    'Parus major'
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", name)).strip()


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


def _factorize(col) -> tuple[np.ndarray, list]:
    """(codes (n,), −1 for NaN/None; the distinct values): string work is then done once per
    distinct name, in plain Python (no per-call pandas overhead on small tables)."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    return codes, list(np.asarray(uniques, dtype=object))


def _unique_missing(uniques: list, tokens: frozenset[str], rank: str | None) -> np.ndarray:
    if rank is not None:
        tokens = tokens | {_normalise_token(PLACEHOLDER.format(rank=rank))}
    return np.array([_normalise_token(u) in tokens for u in uniques], dtype=bool)


def _missing_mask(col: pd.Series, tokens: frozenset[str], rank: str | None) -> pd.Series:
    """Boolean Series: NaN/None, a token, or (``rank`` given) that rank's placeholder."""
    codes, uniques = _factorize(col)
    miss = np.append(_unique_missing(uniques, tokens, rank), True)  # code −1 (NaN) → last: missing
    return pd.Series(miss[codes], index=col.index)


def _clean_column(col: pd.Series, tokens: frozenset[str], rank: str, normalise: bool = True) -> pd.Series:
    """Strings (through :func:`normalise_name` unless ``normalise`` is False); missing values
    (NaN/None/tokens/placeholder of ``rank``) → ''."""
    codes, uniques = _factorize(col)
    text = [normalise_name(str(u)) if normalise else str(u) for u in uniques]
    miss = _unique_missing(uniques, tokens, rank)
    clean = np.array([("" if m else t) for t, m in zip(text, miss)] + [""], dtype=object)
    return pd.Series(clean[codes], index=col.index, dtype=object)


def clean_lineages(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                   missing: Iterable[str] = MISSING_TOKENS, normalise: bool = True) -> pd.DataFrame:
    """The rank columns of ``df`` as strings, '' where missing (see :func:`is_missing`), each name through
    :func:`normalise_name` (``normalise=False``: kept as given, for a caller that counts the changes).

    Shape (N, len(ranks)), same index as ``df``. Raises :class:`TreeprobeError` if a rank column is absent.
    """
    absent = [r for r in ranks if r not in df.columns]
    if absent:
        raise TreeprobeError(
            f"missing rank column(s): {', '.join(absent)} (need {', '.join(ranks)})"
        )
    tokens = _token_set(missing)
    return pd.DataFrame({r: _clean_column(df[r], tokens, r, normalise) for r in ranks}, index=df.index)


def _separator_error(rank: str, n: int, example: str) -> TreeprobeError:
    return TreeprobeError(f"{n} {rank} value(s) contain {SEP!r} (e.g. {example!r}), the separator of treeprobe's "
                          f"cumulative taxon labels: rename them (e.g. replace {SEP!r} by '/')")


def _check_separator(lin: pd.DataFrame) -> None:
    """Raise if a (clean) name contains :data:`SEP`: cumulative labels would then collide."""
    for r in lin.columns:
        bad = [v for v in pd.unique(lin[r].to_numpy(dtype=object)) if SEP in v]
        if bad:
            raise _separator_error(r, int(lin[r].isin(bad).sum()), bad[0])


def tidy_lineage_names(items: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                       missing: Iterable[str] = MISSING_TOKENS) -> tuple[pd.DataFrame, dict]:
    """The rank columns of ``items`` spelled alike: every string through :func:`normalise_name`, then the
    case variants of a name at a rank (``Aves`` / ``aves``) all spelled as its most frequent variant
    (ties: the first in sort order, so the choice does not depend on row order): nomenclature never
    tells two names apart by letter case alone, so they are one name mistyped. Missing values and
    non-strings are left as they are.

    Returns (``items``, a copy when something changed; ``notes``): ``n_normalised`` (values changed by
    normalisation), ``case_variants`` (list of (rank, chosen spelling, [other spellings], items changed)),
    and ``numeric`` (list of (rank, example, items): names that are plain numbers, kept as names).
    Raises :class:`TreeprobeError` for a name with :data:`SEP`.
    Works on the distinct values of each column: O(N) plus O(distinct names).
    """
    tokens = _token_set(missing)
    notes = dict(n_normalised=0, case_variants=[], numeric=[])
    out = items
    for r in ranks:
        if r not in items.columns:
            continue
        codes, uniques = pd.factorize(items[r], use_na_sentinel=True)
        uniques = np.asarray(uniques, dtype=object)
        counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
        new = np.array([normalise_name(u) if isinstance(u, str) else u for u in uniques], dtype=object)
        is_str = np.array([isinstance(u, str) for u in uniques], dtype=bool)
        notes["n_normalised"] += int(counts[is_str & (new != uniques)].sum())
        known = is_str & ~_missing_mask(pd.Series(new, dtype=object), tokens, r).to_numpy(dtype=bool)
        has_sep = np.array([SEP in v for v in new[known]], dtype=bool)
        if has_sep.any():
            raise _separator_error(r, int(counts[known][has_sep].sum()), new[known][has_sep][0])
        # case variants, counted on the normalised spellings (uniques that became equal add up)
        names = pd.Series(counts[known], index=pd.Index(new[known], dtype=object)).groupby(level=0).sum()
        folded = names.index.str.casefold().to_numpy()
        variants = pd.Series(folded).duplicated(keep=False).to_numpy()  # a key shared by ≥ 2 spellings
        names, folded = names[variants], folded[variants]
        spelling = {}
        for _, group in names.groupby(folded):
            if len(group) > 1:
                ordered = sorted(group.items(), key=lambda kv: (-kv[1], kv[0]))
                chosen, others = ordered[0][0], [k for k, _ in ordered[1:]]
                spelling.update(dict.fromkeys(others, chosen))
                notes["case_variants"].append((r, chosen, others, int(sum(n for _, n in ordered[1:]))))
        if spelling:
            new = np.array([spelling.get(v, v) if isinstance(v, str) else v for v in new], dtype=object)
        nums = known & np.array([isinstance(v, str) and re.fullmatch(_NUMBER, v) is not None for v in new], bool)
        nums |= np.array([isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and pd.notna(v)
                          for v in uniques], dtype=bool)
        if nums.any():
            notes["numeric"].append((r, str(new[np.flatnonzero(nums)[0]]), int(counts[nums].sum())))
        if (is_str & (new != uniques)).any():
            if out is items:
                out = items.copy()
            out[r] = pd.Series(new[np.maximum(codes, 0)], index=items.index, dtype=object).where(codes >= 0,
                                                                                               items[r])
    return out, notes


def lineage_conflicts(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                      missing: Iterable[str] = MISSING_TOKENS) -> pd.DataFrame:
    """Taxa with more than one parent: one row per (taxon, parent) of each such taxon.

    A taxon is (kingdom, rank, name) -- homonyms in different kingdoms (the genus *Morus*, a bird and
    a plant) are different taxa -- and its parent is its name at the rank directly above, counted
    over the rows where both are known (a missing parent is no evidence). Columns
    :data:`CONFLICT_COLUMNS`; ``n_items``: rows with that parent. Sorted by rank, kingdom, name,
    then most items first (independent of row order). Empty when every taxon has one parent.

    >>> df = pd.DataFrame({"kingdom": ["Animalia"] * 3, "family": ["Paridae", "Paridae", "Muscicapidae"],
    ...                    "genus": ["Parus", "Parus", "Parus"]})
    >>> lineage_conflicts(df, ("kingdom", "family", "genus"))[["name", "parent", "n_items"]].values.tolist()
    [['Parus', 'Paridae', 2], ['Parus', 'Muscicapidae', 1]]
    """
    return _conflicts(clean_lineages(df, ranks, missing=missing), ranks)


def _conflicts(lin: pd.DataFrame, ranks: Sequence[str]) -> pd.DataFrame:
    """:func:`lineage_conflicts` of clean lineages ('' = missing), on integer codes."""
    codes = {}
    for r in ranks:
        c, uniq = pd.factorize(lin[r].to_numpy(dtype=object))
        codes[r] = (np.where(np.asarray(uniq, dtype=object)[c] == "", -1, c), np.asarray(uniq, dtype=object))
    top, names_top = codes[ranks[0]]
    frames = []
    for k in range(2, len(ranks)):
        (child, names_c), (parent, names_p) = codes[ranks[k]], codes[ranks[k - 1]]
        both = (top >= 0) & (child >= 0) & (parent >= 0)
        if not both.any():
            continue
        # one int64 key per (kingdom, name) and per (kingdom, name, parent): bases are the numbers of names
        pair = top[both].astype(np.int64) * len(names_c) + child[both]
        triple_keys, n = np.unique(pair * len(names_p) + parent[both], return_counts=True)
        pair_of = triple_keys // len(names_p)
        _, inverse, per_pair = np.unique(pair_of, return_inverse=True, return_counts=True)
        hit = per_pair[inverse] > 1
        if hit.any():
            p_hit, t_hit = pair_of[hit], triple_keys[hit]
            frames.append(pd.DataFrame({"kingdom": names_top[p_hit // len(names_c)], "rank": ranks[k],
                                        "name": names_c[p_hit % len(names_c)], "parent_rank": ranks[k - 1],
                                        "parent": names_p[t_hit % len(names_p)],
                                        "n_items": n[hit].astype(np.int64), "_k": k}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "n_items" else object) for c in CONFLICT_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values(["_k", "kingdom", "name", "n_items", "parent"], ascending=[True, True, True, False, True])
    return out[list(CONFLICT_COLUMNS)].reset_index(drop=True)


def conflict_summary(conflicts: pd.DataFrame, limit: int = 3) -> str:
    """One line for the warning: "2 taxa have more than one parent: 'Parus' (genus, Animalia) under
    family Paridae (4 items) and family Muscicapidae (1 item); ..." (the first ``limit`` taxa)."""
    groups = list(conflicts.groupby(["rank", "kingdom", "name"], sort=False))
    parts = []
    for (rank, kingdom, name), g in groups[:limit]:
        under = " and ".join(f"{p_rank} {p} ({n} item{'s' if n != 1 else ''})"
                             for p_rank, p, n in zip(g["parent_rank"], g["parent"], g["n_items"]))
        parts.append(f"{name!r} ({rank}, {kingdom}) under {under}")
    more = f"; and {len(groups) - limit} more" if len(groups) > limit else ""
    head = f"{len(groups)} taxa have" if len(groups) != 1 else "1 taxon has"
    return f"{head} more than one parent: " + "; ".join(parts) + more


def lineage_graph(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *, missing: Iterable[str] = MISSING_TOKENS):
    """The lineage graph: a :class:`networkx.DiGraph` with a node (kingdom, rank, name) per taxon
    (attribute ``n_items``) and an edge parent → child (attribute ``n_items``: rows with both known)
    for each parent seen. Every taxon has in-degree ≤ 1 exactly when :func:`lineage_conflicts` is
    empty; its conflicting taxa are the nodes of in-degree > 1 below the second rank."""
    import networkx as nx

    lin = clean_lineages(df, ranks, missing=missing)
    top = lin[ranks[0]]
    g = nx.DiGraph()
    for k, r in enumerate(ranks):
        have = (top != "") & (lin[r] != "")
        for (kd, name), n in pd.DataFrame({"k": top[have], "n": lin[r][have]}).groupby(["k", "n"]).size().items():
            g.add_node((kd, r, name), n_items=int(n))
        if k == 0:
            continue
        p = ranks[k - 1]
        both = have & (lin[p] != "")
        edges = pd.DataFrame({"k": top[both], "p": lin[p][both], "n": lin[r][both]}).groupby(["k", "p", "n"]).size()
        for (kd, parent, name), n in edges.items():
            g.add_edge((kd, p, parent), (kd, r, name), n_items=int(n))
    return g


def placeable_mask(df: pd.DataFrame, ranks: Sequence[str] = RANKS, *,
                   missing: Iterable[str] = MISSING_TOKENS) -> np.ndarray:
    """Boolean (N,): True where the lineage has a known top rank (kingdom; ``incertae sedis`` is not)."""
    return (clean_lineages(df, ranks[:1], missing=missing)[ranks[0]] != "").to_numpy()


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
        _check_separator(lin)
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
