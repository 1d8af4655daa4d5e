"""The one data object of an analysis: :class:`TreeData`.

A ``TreeData`` holds N items (images) aligned row for row: their embeddings ``X`` (N, D),
their metadata ``items`` (N rows: ``path``, the 7 ranks, covariates), per-item arrays
``obsm`` (the 2-D maps ``X_tsne`` / ``X_umap``, (N, 2)), and the results of the tools
in ``uns``. The taxonomy is built from ``items`` when first asked for and cached.

Rows that cannot be analysed are set aside *when the object is made*, each with its reason,
in ``skipped`` (DataFrame ``item``, ``reason``): a non-finite or all-zero embedding, or a
lineage without a kingdom. Slicing keeps everything aligned::

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

from typing import Any

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS, row_norms
from treeprobe._validation import check_embeddings
from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import MISSING_TOKENS, PLACEHOLDER, SEP, Taxonomy, placeable_mask

PLACEHOLDER_PREFIX = PLACEHOLDER.split("{")[0]  # "incertae_sedis_"

__all__ = ["TreeData", "SKIPPED_COLUMNS", "concat_skipped", "empty_skipped", "skip_records"]

SKIPPED_COLUMNS = ("item", "reason")


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
        self.missing = tuple(missing)
        self.unknown = unknown
        keep, set_aside = self._usable_rows(X, items, self.missing)
        self.skipped = concat_skipped([skipped, *set_aside])
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

    @staticmethod
    def _usable_rows(X, items: pd.DataFrame, missing) -> tuple[np.ndarray, list[pd.DataFrame]]:
        """(keep (N,) bool, skipped frames): non-finite / zero embeddings, then lineages without kingdom."""
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
        placed = placeable_mask(items, RANKS, missing=missing)
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
