"""The one data object of an analysis: :class:`TreeData`.

A ``TreeData`` holds N items (images) aligned row for row: their embeddings ``X`` (N, D),
their metadata ``items`` (N rows: ``path``, the 7 ranks, covariates), per-item arrays
``obsm`` (the 2-D maps ``X_tsne`` / ``X_umap``, (N, 2)), and the results of the tools
in ``uns``. The taxonomy is built from ``items`` when first asked for and cached.

Rows that cannot be analysed are set aside *when the object is made*, each with its reason,
in ``skipped`` (DataFrame ``item``, ``reason``): a non-finite or all-zero embedding, a
lineage without a kingdom, or a second copy of an item (see :class:`TreeData` for the rules on
duplicates, names and lineage conflicts). Slicing keeps everything aligned::

    ds["Insecta"]                               # a clade, by name or by cumulative label
    ds[ds.items.img_type == "Citizen Science"]  # a boolean mask
    ds[:100]                                    # rows

A slice carries ``X``, ``items``, ``obsm`` and ``skipped`` but not ``uns``: results computed on
the whole set do not describe a part of it, so tools are run again on the slice.

Why a class of our own rather than :class:`anndata.AnnData` (scanpy's container, whose
``obs`` / ``obsm`` / ``uns`` names we follow): slicing by clade name, a lazily built taxonomy that
is rebuilt for each slice, rows set aside with a reason at construction, and embeddings that
may be absent (images still to embed) are not AnnData semantics, and AnnData would be a heavy
dependency for a 1-D list of items. :meth:`TreeData.to_anndata` / :meth:`TreeData.from_anndata`
convert both ways for users of the scverse tools (``pip install anndata``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS, row_norms
from treeprobe._validation import check_embeddings
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import (MISSING_TOKENS, PLACEHOLDER, SEP, Taxonomy, _conflicts, clean_lineages,
                                conflict_summary, tidy_lineage_names)

PLACEHOLDER_PREFIX = PLACEHOLDER.split("{")[0]  # "incertae_sedis_"

__all__ = ["TreeData", "ITEM_KEYS", "SKIPPED_COLUMNS", "concat_skipped", "empty_skipped", "skip_records"]

SKIPPED_COLUMNS = ("item", "reason")
#: Columns that identify an item (an image), in order: two rows with the same non-empty value in one
#: of them are the same item. ``id`` is not one: in many tables it is a taxon's id, shared by images.
ITEM_KEYS = ("path", "uuid")


def empty_skipped() -> pd.DataFrame:
    """An empty ``skipped`` table (columns ``item``, ``reason``)."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in SKIPPED_COLUMNS})


def skip_records(items: pd.DataFrame, mask: np.ndarray, reason: str) -> pd.DataFrame:
    """``skipped`` rows for ``items[mask]``: the item's path, or ``row <i>`` when it has none."""
    col = items["path"] if "path" in items.columns else pd.Series("", index=items.index)
    ids = [p if isinstance(p, str) and p else f"row {i}" for i, p in zip(items.index[mask], col[mask])]
    return pd.DataFrame({"item": pd.Series(ids, dtype=object), "reason": reason})


def concat_skipped(frames) -> pd.DataFrame:
    """The non-empty ``skipped`` tables of ``frames`` one after the other."""
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else empty_skipped()


class TreeData:
    """N items with lineages, their embeddings and every result computed on them.

    Parameters
    ----------
    X : array (N, D) or None
        Embeddings in the source's own units (stored as float32, not normalised), or None when
        the items are images still to embed.
    items : DataFrame (N rows)
        Needs the 7 rank columns (``kingdom`` .. ``species``); ``path`` and covariates optional.
    skipped : DataFrame (item, reason), optional
        Inputs a loader already left out; rows set aside here are appended to it.
    source : str
        Where the data came from (a path, ``bioclip2-1k``, ...).
    missing : iterable of str
        Rank values read as unknown (case-insensitive; default
        :data:`treeprobe.taxonomy.MISSING_TOKENS`: ``incertae sedis``, ``unknown``, ``NA``, ``-``, ...).
    unknown : ``"separate"`` or ``"placeholder"``
        How items unknown at a rank are treated (:class:`~treeprobe.taxonomy.Taxonomy`): ``"separate"``
        (default) never counts two unknowns as one taxon; ``"placeholder"`` is the pre-0.2 rule
        (one ``incertae_sedis_<rank>`` taxon per parent).

    Input rules, applied in this order (each change is a :class:`~treeprobe.errors.TreeprobeWarning`
    with its count; :func:`warnings.simplefilter` ``("error", TreeprobeWarning)`` makes them fatal):

    1. **Names** (:func:`~treeprobe.taxonomy.tidy_lineage_names`): rank values in Unicode NFC,
       whitespace runs (tabs, no-break spaces) as one space, stripped; case variants of a name at a
       rank (``aves`` / ``Aves``) spelled as the most frequent one. Plain numbers are kept as names
       (warned). A name with ``|`` is an error.
    2. **Set aside** into ``skipped``: non-finite embedding, zero-norm embedding, no kingdom.
    3. **Duplicates**: a row with the same non-empty value as an earlier kept row in one of the
       :data:`ITEM_KEYS` columns (``path``, then ``uuid``) is the same item. It must have the same
       lineage and (with ``X``) a bit-identical embedding row: then it is dropped, the first copy
       kept, and ``skipped`` says ``duplicate of row K (same path)`` (K: position in ``items``);
       otherwise it is a conflict and a :class:`TreeprobeError` names the first such value.
       Other columns may differ (the first row's values are kept; the warning names the columns).
    4. **Lineage conflicts** (:func:`~treeprobe.taxonomy.lineage_conflicts`): a taxon under two
       parents is warned about and listed in ``uns["lineage_conflicts"]``; items are not changed
       (passing that same table in ``uns``, as a tool re-making a TreeData of the same items does,
       keeps it without warning again). A rank missing in every kept item is warned about.

    Attributes: ``X``, ``items`` (index 0..N-1), ``obsm`` (dict name → (N, k) array), ``uns``
    (dict of results, keys listed in :mod:`treeprobe.tl`), ``skipped``, ``source``, and the lazily
    built :attr:`taxonomy` and :attr:`unit` (L2-normalised float32 copy of ``X``).

    >>> import numpy as np, pandas as pd
    >>> items = pd.DataFrame({"kingdom": ["Animalia", "Animalia", "Plantae", ""],
    ...                       "phylum": "p", "class": "c", "order": "o", "family": "f",
    ...                       "genus": ["A", "B", "C", "D"], "species": ["A a", "B b", "C c", "D d"]})
    >>> ds = TreeData(np.eye(4, 3, dtype=np.float32) + 1, items)
    >>> len(ds), list(ds.skipped.reason)
    (3, ['no taxonomy (missing kingdom)'])
    >>> len(ds["Animalia"]), ds.taxonomy.n_taxa("kingdom")
    (2, 2)
    """

    def __init__(self, X=None, items: pd.DataFrame | None = None, *, skipped: pd.DataFrame | None = None,
                 source: str = "", obsm: dict | None = None, uns: dict | None = None,
                 missing=MISSING_TOKENS, unknown: str = "separate"):
        if items is None:
            raise TreeprobeError("TreeData needs an items table with the rank columns")
        items = items.reset_index(drop=True)
        if X is not None:
            X = check_embeddings(X, n_rows=len(items))
        if len(items) == 0:
            raise TreeprobeError("no items: the data is empty")
        self.missing = tuple(sorted(set(missing)))  # sorted: a frozenset's order changes from one process to the next
        self.unknown = unknown
        items = _tidy_names(items, self.missing)
        lin = clean_lineages(items, RANKS, missing=self.missing)
        keep, set_aside = self._usable_rows(X, items, lin)
        first_copy, dup_skipped = _drop_duplicates(X, items, keep, lin)
        keep &= first_copy
        self.skipped = concat_skipped([skipped, *set_aside, dup_skipped])
        self.source = str(source)
        if keep.all():
            self.items = items
            self.X = None if X is None else X.astype(np.float32, copy=False)  # no copy when kept whole
        else:
            if not keep.any():
                raise TreeprobeError(f"no usable items: all {len(items)} were set aside "
                                     f"({', '.join(sorted(set(self.skipped['reason'].astype(str))))})")
            self.items = items[keep].reset_index(drop=True)
            self.X = None if X is None else X[keep].astype(np.float32, copy=False)
        self.obsm = {k: np.asarray(v)[keep] for k, v in (obsm or {}).items()}
        self.uns: dict[str, Any] = dict(uns or {})
        self._taxonomy: Taxonomy | None = None
        self._unit: np.ndarray | None = None
        lin = lin[keep] if not keep.all() else lin
        empty = [r for r in RANKS[1:] if (lin[r] == "").all()]
        if empty:
            _warn(f"rank(s) {', '.join(empty)} missing in every one of the {len(lin)} items: no taxa there "
                  "(check the column)")
        conflicts = _conflicts(lin, RANKS)
        carried = self.uns.pop("lineage_conflicts", None)
        if len(conflicts):
            self.uns["lineage_conflicts"] = conflicts
        if len(conflicts) and not (isinstance(carried, pd.DataFrame) and carried.equals(conflicts)):
            _warn(conflict_summary(conflicts) + "; kept as given (each lineage its own taxon); "
                  "the table is in uns['lineage_conflicts']")

    @staticmethod
    def _usable_rows(X, items: pd.DataFrame, lin: pd.DataFrame) -> tuple[np.ndarray, list[pd.DataFrame]]:
        """(keep (N,) bool, skipped frames): non-finite / zero embeddings, then lineages without kingdom
        (``lin``: the clean rank columns of ``items``)."""
        out = []
        keep = np.ones(len(items), dtype=bool)
        if X is not None:
            finite, norms = row_norms(X)  # in row chunks: no N x D temporaries
            if (~finite).any():
                out.append(skip_records(items, ~finite, "non-finite embedding"))
            zero = finite & (norms == 0)
            if zero.any():
                out.append(skip_records(items, zero, "zero-norm embedding"))
            keep = finite & (norms > 0)
        placed = (lin[RANKS[0]] != "").to_numpy()
        if (keep & ~placed).any():
            out.append(skip_records(items, keep & ~placed, f"no taxonomy (missing {RANKS[0]})"))
        return keep & placed, out

    # --- sizes and lazily built views ----------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def n_items(self) -> int:
        """Number of items (rows) kept for analysis."""
        return len(self.items)

    @property
    def n_dims(self) -> int | None:
        """Embedding dimension D, or None without embeddings."""
        return None if self.X is None else int(self.X.shape[1])

    @property
    def taxonomy(self) -> Taxonomy:
        """The :class:`~treeprobe.taxonomy.Taxonomy` of the items (built once, then cached)."""
        if self._taxonomy is None:
            self._taxonomy = Taxonomy.from_frame(self.items, RANKS, unknown=self.unknown, missing=self.missing)
        return self._taxonomy

    @property
    def unit(self) -> np.ndarray:
        """L2-normalised embeddings, float32 (N, D) (computed once, then cached)."""
        if self._unit is None:
            from treeprobe._utils import l2_normalise

            self._unit = l2_normalise(self.require_embeddings(), dtype=np.float32)
        return self._unit

    def require_embeddings(self) -> np.ndarray:
        """``X``, or a clear error when the items are images not yet embedded."""
        if self.X is None:
            raise TreeprobeError("these items have no embeddings yet: embed them first "
                                 "(treeprobe.tl.embed(data, ckpt=...)) or load precomputed ones")
        return self.X

    def labels(self, rank: str) -> np.ndarray:
        """Cumulative taxon label of each item at ``rank`` (``Animalia|Arthropoda|Insecta``), (N,)."""
        return self.taxonomy.labels(rank)

    # --- slicing ----------------------------------------------------------------------
    def clade_mask(self, name: str) -> np.ndarray:
        """Boolean (N,): items inside the taxon ``name``.

        ``name`` is a short name at any rank (``"Insecta"``) or a cumulative label
        (``"Animalia|Arthropoda|Insecta"``); a short name found under several parents or at
        several ranks is an error that lists the cumulative labels to choose from. Placeholders for
        missing ranks (``incertae_sedis_<rank>``) are reachable only by their cumulative label.
        """
        tax = self.taxonomy
        hits = []  # (rank, cumulative label)
        for r in tax.ranks:
            taxa = tax.taxon_labels(r)
            if SEP in name:
                hits += [(r, t) for t in taxa if t == name]
            elif not name.startswith(PLACEHOLDER_PREFIX):  # an unknown rank is not a named taxon
                hits += [(r, t) for t in taxa if t.rsplit(SEP, 1)[-1] == name]
        if not hits:
            raise TreeprobeError(f"no taxon named {name!r} among these {len(self)} items")
        if len(hits) > 1:
            shown = ", ".join(f"{t} ({r})" for r, t in hits[:6])
            raise TreeprobeError(f"{name!r} names {len(hits)} taxa: {shown}{' ...' if len(hits) > 6 else ''}; "
                                 "pass the cumulative label")
        rank, label = hits[0]
        return tax.labels(rank) == label

    def __getitem__(self, key) -> "TreeData":
        if isinstance(key, str):
            return self.subset(self.clade_mask(key))
        if isinstance(key, slice):
            return self.subset(np.arange(len(self))[key])
        if isinstance(key, pd.Series):
            key = key.to_numpy()
        return self.subset(key)

    def subset(self, index) -> "TreeData":
        """The rows selected by ``index`` (bool (N,) or integer positions), everything aligned.

        ``uns`` is not carried (its results describe the whole set); ``skipped`` is.
        """
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise TreeprobeError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TreeprobeError(f"cannot select rows with {idx.dtype} values; use a boolean mask, "
                                 "integer positions or a taxon name")
        if idx.size == 0:
            raise TreeprobeError("the selection is empty")
        new = object.__new__(TreeData)
        new.items = self.items.iloc[idx].reset_index(drop=True)
        new.X = None if self.X is None else self.X[idx]
        new.obsm = {k: v[idx] for k, v in self.obsm.items()}
        new.uns = {}
        new.skipped = self.skipped.copy()
        new.source = self.source
        new.missing, new.unknown = self.missing, self.unknown
        new._taxonomy = None
        new._unit = None if self._unit is None else self._unit[idx]
        return new

    def copy(self) -> "TreeData":
        """A deep copy (arrays and tables copied; ``uns`` copied one level deep)."""
        new = self.subset(np.arange(len(self)))
        new.X = None if self.X is None else self.X.copy()
        new.uns = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in self.uns.items()}
        return new

    def __repr__(self) -> str:
        dims = "images (no embeddings yet)" if self.X is None else f"{self.n_dims}-d embeddings"
        lines = [f"TreeData: {len(self)} items, {dims}, source {self.source or '-'}"]
        lines.append("    items: " + ", ".join(map(str, self.items.columns)))
        if self.obsm:
            lines.append("    obsm: " + ", ".join(self.obsm))
        if self.uns:
            lines.append("    uns: " + ", ".join(self.uns))
        if len(self.skipped):
            by = self.skipped["reason"].astype(str).str.split(":").str[0].value_counts()
            lines.append(f"    skipped: {len(self.skipped)} (" + ", ".join(f"{r}: {n}" for r, n in by.items()) + ")")
        return "\n".join(lines)

    # --- AnnData ---------------------------------------------------------------------------
    def to_anndata(self):
        """An :class:`anndata.AnnData`: ``X`` (float32), ``obs`` = items (as strings where
        object), ``obsm``, ``uns`` (tables as DataFrames) and ``uns['treeprobe_skipped']``."""
        try:
            import anndata
        except ImportError:
            raise TreeprobeError("to_anndata needs the anndata package: pip install anndata") from None
        obs = self.items.copy()
        obs.index = obs.index.astype(str)
        uns = {k: v for k, v in self.uns.items() if isinstance(v, (pd.DataFrame, dict, str, int, float))}
        uns["treeprobe_skipped"] = self.skipped.astype(str)
        uns["treeprobe_source"] = self.source
        return anndata.AnnData(X=self.require_embeddings(), obs=obs, obsm=dict(self.obsm), uns=uns)

    @classmethod
    def from_anndata(cls, adata) -> "TreeData":
        """A TreeData from an AnnData with the 7 rank columns in ``obs`` (inverse of :meth:`to_anndata`)."""
        X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        uns = dict(adata.uns)
        skipped = uns.pop("treeprobe_skipped", None)
        source = str(uns.pop("treeprobe_source", ""))
        items = adata.obs.reset_index(drop=True)
        for r in RANKS:
            if r in items.columns:
                items[r] = items[r].astype(object).where(items[r].notna(), "").astype(str)
        return cls(X, items, skipped=None if skipped is None else pd.DataFrame(skipped),
                   source=source, obsm={k: np.asarray(v) for k, v in adata.obsm.items()}, uns=uns)


def _warn(msg: str) -> None:
    warnings.warn(msg, TreeprobeWarning, stacklevel=3)


def _tidy_names(items: pd.DataFrame, missing) -> pd.DataFrame:
    """Rule 1 of :class:`TreeData`: the items with tidy rank names; one warning per kind of change."""
    items, notes = tidy_lineage_names(items, RANKS, missing=missing)
    if notes["n_normalised"]:
        _warn(f"normalised {notes['n_normalised']} rank value(s) (Unicode NFC; tabs, no-break and repeated "
              "spaces read as one space; leading/trailing spaces removed)")
    if notes["case_variants"]:
        n = sum(v[3] for v in notes["case_variants"])
        shown = "; ".join(f"{r} {', '.join(map(repr, others[:2]))} -> {chosen!r}"
                          for r, chosen, others, _ in notes["case_variants"][:3])
        more = f"; and {len(notes['case_variants']) - 3} more" if len(notes["case_variants"]) > 3 else ""
        _warn(f"{len(notes['case_variants'])} name(s) were spelled with different letter case; {n} value(s) "
              f"respelled as the most frequent spelling: {shown}{more}")
    for r, example, n in notes["numeric"]:
        _warn(f"{n} {r} value(s) are plain numbers (e.g. {example!r}): read as taxon names; "
              "if they are ids or codes, give the names instead")
    return items


def _drop_duplicates(X, items: pd.DataFrame, keep: np.ndarray, lin: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Rule 3 of :class:`TreeData`: (first-copy mask (N,), ``skipped`` rows of the dropped copies).

    Among the rows in ``keep``; ``lin``: the clean rank columns. Raises on a copy whose lineage or
    embedding differs from its first copy's."""
    first_copy = np.ones(len(items), dtype=bool)
    frames, n_dup, differ = [], {}, set()
    rank_cols = list(lin.columns)
    for key in ITEM_KEYS:
        if key not in items.columns:
            continue
        rows = np.flatnonzero(keep & first_copy)
        values = items[key].iloc[rows].astype("string").fillna("").str.strip()
        filled = (values != "").to_numpy()
        values = pd.Series(values.to_numpy()[filled], index=rows[filled])
        dup = values.duplicated(keep="first").to_numpy()
        if not dup.any():
            continue
        firsts = values[~dup]
        first_of = pd.Series(firsts.index, index=firsts.to_numpy())
        copies = values.index.to_numpy()[dup]
        originals = first_of.loc[values.to_numpy()[dup]].to_numpy()
        pair_lin = lin.to_numpy(dtype=object)
        same_lineage = (pair_lin[copies] == pair_lin[originals]).all(axis=1)
        same_x = np.ones(len(copies), dtype=bool) if X is None else np.array(
            [np.array_equal(np.asarray(X[j], dtype=np.float32), np.asarray(X[k], dtype=np.float32))
             for j, k in zip(copies, originals)], dtype=bool)
        bad = np.flatnonzero(~(same_lineage & same_x))
        if bad.size:
            j, k = int(copies[bad[0]]), int(originals[bad[0]])
            what = "lineage" if not same_lineage[bad[0]] else "embedding"
            raise TreeprobeError(
                f"rows {k} and {j} have the same {key} {items[key].iat[j]!r} but a different {what}: "
                f"{int(bad.size)} such conflicting duplicate(s); list each item once (fix or remove the copies)")
        others = [c for c in items.columns if c not in (*rank_cols, key)]
        if others:
            a = items[others].iloc[copies].astype(str).to_numpy()
            b = items[others].iloc[originals].astype(str).to_numpy()
            differ.update(c for c, d in zip(others, (a != b).any(axis=0)) if d)
        first_copy[copies] = False
        n_dup[key] = len(copies)
        frames.append(_duplicate_records(items, copies, originals, key))
    if n_dup:
        extra = (f"; the copies differ in column(s) {', '.join(sorted(differ)[:5])} (the first row's values are kept)"
                 if differ else "")
        how = " and ".join(f"{n} with the same {k}" for k, n in n_dup.items())
        _warn(f"dropped {sum(n_dup.values())} duplicated item(s) ({how} as an earlier row, same lineage"
              f"{' and embedding' if X is not None else ''}); kept the first copy of each{extra}; "
              "listed in skipped")
    return first_copy, concat_skipped(frames)


def _duplicate_records(items: pd.DataFrame, copies: np.ndarray, originals: np.ndarray, key: str) -> pd.DataFrame:
    """``skipped`` rows for dropped copies: the copy's path (or ``row <j>``) and ``duplicate of row K (same key)``."""
    col = items["path"] if "path" in items.columns else pd.Series("", index=items.index)
    ids = [p if isinstance(p, str) and p else f"row {j}" for j, p in zip(copies, col.iloc[copies])]
    reasons = [f"duplicate of row {int(k)} (same {key})" for k in originals]
    return pd.DataFrame({"item": pd.Series(ids, dtype=object), "reason": pd.Series(reasons, dtype=object)})
