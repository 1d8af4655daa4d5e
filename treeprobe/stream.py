"""One streaming pass over sharded embeddings: per-species sufficient statistics, memory O(S·D), not O(N·D).

:func:`species_statistics` reads parquet shards (a folder, a glob, a list; or one ``.npy`` memory map + its
metadata CSV) in bounded record batches, only the embedding, rank (and ``where`` / covariate) columns, and
reduces them to a :class:`SpeciesStats`: per unit (a species, or in ``unknown="separate"`` mode an item
unknown at species, its own unit as in :class:`~treeprobe.taxonomy.Taxonomy`) the item count n_s, the vector
sum S_s = Σ x̂_i (float64, D) and Σ‖x̂_i‖², where x̂ are the unit vectors every analysis uses
(``l2_normalise`` in float32 as :attr:`TreeData.unit <treeprobe.core.TreeData.unit>`, then in float64 as
:mod:`treeprobe.mantel` does: the same arithmetic, so the statistics equal the in-memory ones to ~1e-15).

**What the tests need** (derived from :mod:`treeprobe.mantel` / :mod:`treeprobe.physignal`):

* species-centroid Mantel (both schemes, Pearson and Spearman) and K_mult: the centroids S_s/‖S_s‖ and n_s
  (the size strata of the permutations). Exact from (n_s, S_s).
* image-level between-species Mantel (Pearson, species permuted): also Σd² over between-species pairs,
  i.e. Σ_{i<j, s(i)≠s(j)} (x̂_i·x̂_j)² = (‖G‖²_F − Σ_s ‖G_s‖²_F)/2 with G = Σ_i x̂_i x̂_iᵀ (D×D, additive)
  and G_s the same over species s. Per-species sums and sums of squares are **not** enough: ‖G_s‖²_F is
  a fourth moment that does not add over parts of a species (the cross term 2⟨G_s^a, G_s^b⟩). With
  ``gram=True`` the pass keeps G and, per species, w_s = ‖G_s‖²_F, computed when the species' run of rows
  ends: exact when each species' rows are contiguous in the stream (TreeOfLife-200M is sorted by
  taxonomy). The first and last species of a pass keep their rows (or their D×D Gram above D rows) so
  that :meth:`SpeciesStats.merge` of passes over different files stays exact; a species whose rows come
  back after its run ended is flagged (``within_exact`` False) and the image-level test refuses it.
  Cost O(N·D²) for G: the part of the pass that is not I/O (measured in the module's benchmark notes).
* partial Mantel with a categorical covariate (not implemented here): additionally per (species, category)
  n, S and Σ‖x̂‖², which ``covariate=`` accumulates.
* Spearman at image level and image-permutation p-values need items (a sample), not these sums.

Rows are set aside as the in-memory loader and :class:`~treeprobe.core.TreeData` do (counted per reason, a few
examples kept): null ``emb`` ("missing embedding"), non-finite values after the float32 cast, zero norm,
then no kingdom. Names follow TreeData's rules: Unicode NFC, whitespace runs as one space, missing tokens,
case variants of a name at a rank spelled as the most frequent one (counted over the rows that pass the
embedding checks). Not done here: duplicate items (same ``path`` / ``uuid``) are not detected (it needs a
set of all ids, O(N) memory), and lineage conflicts are not warned about.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import MISSING_TOKENS, PLACEHOLDER, UNKNOWN_MODES, Taxonomy, normalise_name

__all__ = ["SpeciesStats", "species_statistics", "mantel_from_stats", "physignal_from_stats",
           "EMBEDDING_COLUMNS", "SKIP_REASONS", "NOT_FROM_STATS"]

#: Embedding column names tried in order when ``columns`` names none (``emb``: treeprobe, emb-explorer and
#: the TreeOfLife-200M embeddings; the others: names emb-explorer also treats as embeddings).
EMBEDDING_COLUMNS = ("emb", "embedding", "embeddings", "vector")
#: Reasons a row is set aside, in the order they are checked (the loader's and TreeData's wording).
SKIP_REASONS = ("missing embedding", "non-finite embedding", "zero-norm embedding",
                f"no taxonomy (missing {RANKS[0]})", "unknown species (set aside: drop_unknown_species)")
#: ``estimator`` of a Mantel row that species statistics cannot give (it needs the items).
NOT_FROM_STATS = "needs items: not computable from species statistics"

_BLOCK = 8192  # rows per float64 block (8192 x 1024 x 8 B = 64 MB)
_SINGLE = "\x00item"  # first element of the key of a unit that is one item (unknown species, separate mode)
_EXAMPLES = 5  # examples kept per skip reason


# --- the open rows of a species whose run has not ended ------------------------------------------------


class _Open:
    """Rows (float64 unit vectors) of one species still being read, or their D×D Gram once more than D."""

    __slots__ = ("rows", "n", "gram")

    def __init__(self):
        self.rows: list[np.ndarray] = []
        self.n = 0
        self.gram: np.ndarray | None = None

    def add(self, R: np.ndarray) -> None:
        if self.gram is not None:
            self.gram += R.T @ R
            return
        self.rows.append(np.array(R, dtype=np.float64))
        self.n += len(R)
        if self.n > R.shape[1]:
            A = np.concatenate(self.rows)
            self.gram, self.rows = A.T @ A, []

    def combined(self, other: "_Open") -> "_Open":
        out = _Open()
        for part in (self, other):
            if part.gram is not None:
                if out.gram is None:
                    A = np.concatenate(out.rows) if out.rows else None
                    out.gram = part.gram.copy() if A is None else part.gram + A.T @ A
                    out.rows = []
                else:
                    out.gram = out.gram + part.gram
            else:
                for R in part.rows:
                    out.add(R)
        return out

    def frobenius(self) -> float:
        """‖Σ x̂ x̂ᵀ‖²_F over the rows held (through the smaller Gram)."""
        if self.gram is not None:
            return float(np.sum(self.gram * self.gram))
        if not self.rows:
            return 0.0
        A = np.concatenate(self.rows)
        K = A @ A.T
        return float(np.sum(K * K))

    def nbytes(self) -> int:
        return int(self.gram.nbytes if self.gram is not None else sum(r.nbytes for r in self.rows))


# --- the statistics ------------------------------------------------------------------------------------


class _Grow:
    """A float64/int64 array that grows along axis 0 (amortised doubling)."""

    def __init__(self, shape_tail=(), dtype=np.float64):
        self.a = np.zeros((16, *shape_tail), dtype=dtype)
        self.n = 0

    def extend(self, k: int) -> None:
        need = self.n + k
        if need > len(self.a):
            new = np.zeros((max(need, 2 * len(self.a)), *self.a.shape[1:]), dtype=self.a.dtype)
            new[:self.n] = self.a[:self.n]
            self.a = new
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.a[:self.n]


@dataclass(eq=False)
class SpeciesStats:
    """Per-unit sufficient statistics of one streaming pass (or of merged passes).

    Units are the species (known at the last rank) and, in ``unknown="separate"`` mode, each item unknown at
    species (its own unit, as :class:`~treeprobe.taxonomy.Taxonomy` gives it its own leaf). Public arrays are
    in the **canonical order**: the order of the units (tree leaves) of :func:`treeprobe.tl.mantel` on the
    same rows, i.e. known species by cumulative label, then single items by (file path, row), so the
    permutations of the tests draw the same streams as the in-memory path.

    lineages: DataFrame (S, 7) clean names ('' unknown); counts: int64 (S,) items; sums: float64 (S, D)
    Σ x̂; sq: float64 (S,) Σ ‖x̂‖²; within: float64 (S,) ‖Σ_{i∈s} x̂_i x̂_iᵀ‖²_F or None (``gram=False``);
    gram: float64 (D, D) Σ_i x̂_i x̂_iᵀ or None; within_exact: False if some species' rows were not contiguous
    (``n_scattered`` of them); n_rows: rows of the sources (those ``where`` left out included);
    n_filtered: rows left out by ``where``; n_skipped: reason → count (:data:`SKIP_REASONS`);
    skipped_examples: reason → up to 5 ``'<file> row <i>'``; files: the sources; timings: seconds of the
    pass and seconds spent waiting for the reader thread. Per (unit, covariate category):
    :meth:`covariate_table`. Memory: S·D·8 bytes of sums (+ D²·8 with ``gram``), whatever N.
    """

    dim: int
    unknown: str
    missing: tuple
    gram_enabled: bool
    covariate: str | None
    # insertion-order storage (private; the public properties reorder)
    _keys: list = field(default_factory=list, repr=False)
    _lin: list = field(default_factory=list, repr=False)  # folded 7-tuples
    _index: dict = field(default_factory=dict, repr=False)
    _counts: _Grow = field(default=None, repr=False)
    _sums: _Grow = field(default=None, repr=False)
    _sq: _Grow = field(default=None, repr=False)
    _w: _Grow = field(default=None, repr=False)
    _state: _Grow = field(default=None, repr=False)  # 0 new, 1 open, 2 closed
    _open: dict = field(default_factory=dict, repr=False)  # unit -> _Open
    _scattered: set = field(default_factory=set, repr=False)
    _G: np.ndarray | None = field(default=None, repr=False)
    _spell: dict = field(default_factory=dict, repr=False)  # rank -> folded -> Counter(spelling)
    _cov_index: dict = field(default_factory=dict, repr=False)
    _cov_keys: list = field(default_factory=list, repr=False)
    _cov_counts: _Grow = field(default=None, repr=False)
    _cov_sums: _Grow = field(default=None, repr=False)
    _cov_sq: _Grow = field(default=None, repr=False)
    _head: int | None = field(default=None, repr=False)
    _tail: int | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    n_rows: int = 0
    n_filtered: int = 0
    n_skipped: dict = field(default_factory=dict)
    skipped_examples: dict = field(default_factory=dict)
    files: tuple = ()
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        D = self.dim
        self._counts = self._counts or _Grow((), np.int64)
        self._sums = self._sums or _Grow((D,))
        self._sq = self._sq or _Grow(())
        self._w = self._w or _Grow(())
        self._state = self._state or _Grow((), np.int8)
        self._cov_counts = self._cov_counts or _Grow((), np.int64)
        self._cov_sums = self._cov_sums or _Grow((D,))
        self._cov_sq = self._cov_sq or _Grow(())
        if self.gram_enabled and self._G is None:
            self._G = np.zeros((D, D))
        for r in RANKS:
            self._spell.setdefault(r, {})

    # --- units ---------------------------------------------------------------------------------------
    def _unit(self, key: tuple, lin: tuple) -> int:
        u = self._index.get(key)
        if u is None:
            u = len(self._keys)
            self._index[key] = u
            self._keys.append(key)
            self._lin.append(lin)
            for g in (self._counts, self._sums, self._sq, self._w, self._state):
                g.extend(1)
        return u

    def _new_units(self, keys: list, lins: list) -> int:
        """Append units that are new for sure (single items); returns the index of the first."""
        start = len(self._keys)
        for i, k in enumerate(keys):
            if k in self._index:
                raise TreeprobeError(f"row {k[2]} of {k[1]} was read twice")
            self._index[k] = start + i
        self._keys.extend(keys)
        self._lin.extend(lins)
        for g in (self._counts, self._sums, self._sq, self._w, self._state):
            g.extend(len(keys))
        return start

    def _cov_unit(self, u: int, cat: str) -> int:
        k = self._cov_index.get((u, cat))
        if k is None:
            k = len(self._cov_keys)
            self._cov_index[(u, cat)] = k
            self._cov_keys.append((u, cat))
            for g in (self._cov_counts, self._cov_sums, self._cov_sq):
                g.extend(1)
        return k

    # --- the runs of the within-species Gram terms -----------------------------------------------------
    def _start(self, u: int) -> None:
        st = self._state.a
        if u in self._open:
            return
        if st[u] == 0:
            self._open[u] = _Open()
            st[u] = 1
        elif st[u] == 2:
            self._scattered.add(u)
        if self._head is None:
            self._head = u

    def _end_tail(self) -> None:
        u = self._tail
        self._tail = None
        if u is None or u == self._head or u not in self._open:
            return
        self._w.a[u] += self._open.pop(u).frobenius()
        self._state.a[u] = 2

    def _append(self, u: int, R: np.ndarray) -> None:
        buf = self._open.get(u)
        if buf is not None:
            buf.add(R)

    def _within_block(self, X: np.ndarray, r2: np.ndarray, uid: np.ndarray) -> None:
        """Within-species Gram terms of one block in stream order (X (b, D) unit rows, uid (b,))."""
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], len(uid)]
        ru = uid[starts]
        R = len(ru)
        # first run: continues the open tail, or starts a new one
        u0 = int(ru[0])
        if u0 != self._tail:
            self._end_tail()
            self._start(u0)
        self._append(u0, X[starts[0]:ends[0]])
        self._tail = u0
        if R == 1:
            return
        self._end_tail()
        uniq, cnt = np.unique(ru, return_counts=True)
        dup = set(uniq[cnt > 1].tolist())
        st = self._state.a
        inner = np.arange(1, R - 1)
        fast = np.array([j for j in inner if st[ru[j]] == 0 and int(ru[j]) not in dup
                         and int(ru[j]) not in self._open], dtype=np.int64) if R > 2 else np.zeros(0, np.int64)
        fast_set = set(fast.tolist())
        for j in inner:  # the rare runs: a species seen before, or twice in this block
            if j in fast_set:
                continue
            u = int(ru[j])
            self._start(u)
            self._append(u, X[starts[j]:ends[j]])
            self._tail = u
            self._end_tail()
        if len(fast):
            lens = ends[fast] - starts[fast]
            us = ru[fast]
            one = lens == 1
            self._w.a[us[one]] += r2[starts[fast[one]]] ** 2
            for n in np.unique(lens[~one]):
                sel = fast[lens == n]
                B = X[starts[sel][:, None] + np.arange(n)]  # (k, n, D)
                if n <= X.shape[1]:
                    K = np.einsum("kid,kjd->kij", B, B, optimize=True)
                    vals = np.einsum("kij,kij->k", K, K)
                else:
                    M = np.matmul(B.transpose(0, 2, 1), B)
                    vals = np.einsum("kij,kij->k", M, M)
                self._w.a[ru[sel]] += vals
            st[us] = 2
        u = int(ru[-1])
        self._start(u)
        self._append(u, X[starts[-1]:ends[-1]])
        self._tail = u

    # --- one block of kept rows ------------------------------------------------------------------------
    def _add_block(self, X: np.ndarray, uid: np.ndarray, cov: np.ndarray | None) -> None:
        """X: (b, D) float64 unit vectors in stream order; uid: (b,) unit index; cov: (b,) covariate-unit
        index or None."""
        r2 = np.einsum("ij,ij->i", X, X)
        u, inv = np.unique(uid, return_inverse=True)
        inv = inv.ravel()
        ind = sp.csr_matrix((np.ones(len(uid)), (inv, np.arange(len(uid)))), shape=(len(u), len(uid)))
        self._counts.a[u] += np.bincount(inv, minlength=len(u))
        self._sums.a[u] += ind @ X
        self._sq.a[u] += np.bincount(inv, weights=r2, minlength=len(u))
        if cov is not None:
            k, kinv = np.unique(cov, return_inverse=True)
            kinv = kinv.ravel()
            kind = sp.csr_matrix((np.ones(len(cov)), (kinv, np.arange(len(cov)))), shape=(len(k), len(cov)))
            self._cov_counts.a[k] += np.bincount(kinv, minlength=len(k))
            self._cov_sums.a[k] += kind @ X
            self._cov_sq.a[k] += np.bincount(kinv, weights=r2, minlength=len(k))
        if self.gram_enabled:
            self._G += X.T @ X
            self._within_block(X, r2, uid)

    # --- merging -----------------------------------------------------------------------------------------
    def merge(self, other: "SpeciesStats") -> "SpeciesStats":
        """The statistics of both passes together (a new object): counts, sums and G add; a species in both
        is exact only if both passes still hold its rows (it was at the start or end of each pass).
        Raises if the two passes share a file (rows would be counted twice) or differ in D, ``unknown``,
        ``gram`` or ``covariate``."""
        if not isinstance(other, SpeciesStats):
            raise TreeprobeError(f"can only merge SpeciesStats, not {type(other).__name__}")
        for name in ("dim", "unknown", "missing", "gram_enabled", "covariate"):
            if getattr(self, name) != getattr(other, name):
                raise TreeprobeError(f"cannot merge species statistics with different {name}: "
                                     f"{getattr(self, name)!r} vs {getattr(other, name)!r}")
        shared = set(self.files) & set(other.files)
        if shared:
            raise TreeprobeError(f"both statistics include {sorted(shared)[0]}: merging would count its rows twice")
        out = SpeciesStats(self.dim, self.unknown, self.missing, self.gram_enabled, self.covariate)
        for part in (self, other):
            n = len(part._keys)
            ids = np.array([out._unit(k, l) for k, l in zip(part._keys, part._lin)], dtype=np.int64) \
                if n else np.zeros(0, np.int64)
            if n:
                out._counts.a[ids] += part._counts.view
                out._sums.a[ids] += part._sums.view
                out._sq.a[ids] += part._sq.view
                out._w.a[ids] += part._w.view
            for u_part in range(n):
                u = int(ids[u_part])
                s_old, s_new = out._state.a[u], part._state.a[u_part]
                held = part._open.get(u_part)
                if u_part in part._scattered:
                    out._scattered.add(u)
                if s_old == 0:
                    out._state.a[u] = s_new
                    if held is not None:
                        out._open[u] = held.combined(_Open())
                    continue
                if held is not None and u in out._open:
                    out._open[u] = out._open[u].combined(held)
                else:  # rows of this species on both sides, one side no longer holds them
                    out._scattered.add(u)
                    out._state.a[u] = 2
                    if u in out._open:
                        out._w.a[u] += out._open.pop(u).frobenius()
                    if held is not None:
                        out._w.a[u] += held.frobenius()
            if part.covariate is not None:
                for (u_part, cat), k_part in zip(part._cov_keys, range(len(part._cov_keys))):
                    k = out._cov_unit(int(ids[u_part]), cat)
                    out._cov_counts.a[k] += part._cov_counts.a[k_part]
                    out._cov_sums.a[k] += part._cov_sums.a[k_part]
                    out._cov_sq.a[k] += part._cov_sq.a[k_part]
            if part._G is not None:
                out._G += part._G
            for r, table in part._spell.items():
                mine = out._spell[r]
                for folded, spellings in table.items():
                    mine.setdefault(folded, Counter()).update(spellings)
            out.n_rows += part.n_rows
            out.n_filtered += part.n_filtered
            for reason, n_r in part.n_skipped.items():
                out.n_skipped[reason] = out.n_skipped.get(reason, 0) + n_r
            for reason, ex in part.skipped_examples.items():
                out.skipped_examples[reason] = (out.skipped_examples.get(reason, []) + list(ex))[:_EXAMPLES]
        out.files = tuple(self.files) + tuple(other.files)
        return out

    # --- the canonical view -----------------------------------------------------------------------------
    def _spelling(self, rank: str, folded: str) -> str:
        """The most frequent spelling of a name (ties: first in sort order), as TreeData's tidying."""
        if folded == "":
            return ""
        c = self._spell[rank].get(folded)
        if not c:
            return folded
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

    def _canonical(self):
        """(order (S,) of the insertion indices, lineages frame, clade structure) — cached."""
        if "order" in self._cache:
            return self._cache["order"], self._cache["lineages"]
        n = len(self._keys)
        if n == 0:
            raise TreeprobeError("no usable rows: every row was filtered out or set aside "
                                 f"({self.n_skipped or 'none read'})")
        spelled = {r: {} for r in RANKS}
        lin = np.empty((n, len(RANKS)), dtype=object)
        for i, folded in enumerate(self._lin):
            for k, r in enumerate(RANKS):
                s = spelled[r].get(folded[k])
                if s is None:
                    s = spelled[r][folded[k]] = self._spelling(r, folded[k])
                lin[i, k] = s
        single = np.array([k[0] == _SINGLE for k in self._keys], dtype=bool)
        known = np.flatnonzero(~single)
        singles = np.flatnonzero(single)
        if len(singles):
            singles = singles[sorted(range(len(singles)), key=lambda j: self._keys[singles[j]][1:])]
        pre = np.concatenate([known, singles]).astype(np.int64)
        frame = pd.DataFrame(lin[pre], columns=list(RANKS))
        tax = Taxonomy.from_frame(frame, RANKS, unknown=self.unknown, missing=self.missing)
        node = tax.clade_structure().item_node
        if len(np.unique(node)) != len(node):  # pragma: no cover - one leaf per unit by construction
            raise TreeprobeError("internal error: two units of the species statistics share a tree leaf")
        by_node = np.argsort(node, kind="stable")
        order = pre[by_node]
        self._cache["order"] = order
        self._cache["lineages"] = frame.iloc[by_node].reset_index(drop=True)
        return order, self._cache["lineages"]

    @property
    def n_units(self) -> int:
        """S: units (species, plus single items unknown at species in ``"separate"`` mode)."""
        return len(self._keys)

    @property
    def n_items(self) -> int:
        """Items kept (Σ n_s)."""
        return int(self._counts.view.sum())

    @property
    def lineages(self) -> pd.DataFrame:
        return self._canonical()[1]

    @property
    def counts(self) -> np.ndarray:
        return self._counts.view[self._canonical()[0]]

    @property
    def sums(self) -> np.ndarray:
        return self._sums.view[self._canonical()[0]]

    @property
    def sq(self) -> np.ndarray:
        return self._sq.view[self._canonical()[0]]

    @property
    def within(self) -> np.ndarray | None:
        """‖G_s‖²_F per unit (closed runs + the rows still held), or None without ``gram``."""
        if not self.gram_enabled:
            return None
        w = self._w.view.copy()
        for u, buf in self._open.items():
            w[u] += buf.frobenius()
        return w[self._canonical()[0]]

    @property
    def gram(self) -> np.ndarray | None:
        return None if self._G is None else self._G

    @property
    def within_exact(self) -> bool:
        return not self._scattered

    @property
    def n_scattered(self) -> int:
        return len(self._scattered)

    @property
    def held_bytes(self) -> int:
        """Bytes of rows / Grams held for species at the edges of the passes (for merges)."""
        return sum(b.nbytes() for b in self._open.values())

    def centroids(self) -> np.ndarray:
        """Unit-norm centroid of each unit, float64 (S, D), as :func:`treeprobe.mantel.taxon_centroids`."""
        C = self.sums
        norms = np.linalg.norm(C, axis=1)
        norms[norms == 0] = 1.0
        return C / norms[:, None]

    def clade_structure(self, rank_lengths=None):
        """The rank tree over the units (one item per unit, in canonical order): the tree of
        :meth:`Taxonomy.clade_structure <treeprobe.taxonomy.Taxonomy.clade_structure>` of the rows, with
        the same node numbering (each unit at its species' node or its own leaf)."""
        tax = Taxonomy.from_frame(self.lineages, RANKS, unknown=self.unknown, missing=self.missing)
        return tax.clade_structure(rank_lengths)

    def covariate_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(unit (K,) in canonical numbering, category (K,) str, counts (K,), sums (K, D), sq (K,)) per
        (unit, covariate category); raises without ``covariate``."""
        if self.covariate is None:
            raise TreeprobeError("these statistics were read without covariate=")
        order = self._canonical()[0]
        rank_of = np.empty(len(order), dtype=np.int64)
        rank_of[order] = np.arange(len(order))
        units = np.array([rank_of[u] for u, _ in self._cov_keys], dtype=np.int64)
        cats = np.array([c for _, c in self._cov_keys], dtype=object)
        o = np.lexsort((cats.astype(str), units))
        return (units[o], cats[o], self._cov_counts.view[o], self._cov_sums.view[o], self._cov_sq.view[o])

    def summary(self) -> dict:
        """Counts and memory in one JSON-ready dict."""
        return dict(n_rows=self.n_rows, n_filtered=self.n_filtered, n_items=self.n_items, n_units=self.n_units,
                    n_single_item_units=int(sum(k[0] == _SINGLE for k in self._keys)), dim=self.dim,
                    n_skipped=dict(self.n_skipped), gram=self.gram_enabled, within_exact=self.within_exact,
                    n_scattered=self.n_scattered, held_bytes=self.held_bytes, n_files=len(self.files),
                    statistics_bytes=int(self._sums.a.nbytes + (0 if self._G is None else self._G.nbytes)))


# --- reading -------------------------------------------------------------------------------------------


def _sources(source, metadata) -> tuple[str, list[str]]:
    """('parquet' | 'npy', the files) of a folder, glob, list or single file."""
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if os.path.isdir(s):
            files = sorted(glob.glob(os.path.join(s, "**", "*.parquet"), recursive=True))
            if not files:
                raise TreeprobeError(f"no .parquet files in folder {os.path.abspath(s)}")
        elif any(c in s for c in "*?["):
            files = sorted(f for f in glob.glob(s, recursive=True) if os.path.isfile(f))
            if not files:
                raise TreeprobeError(f"no files match {s}")
        elif os.path.isfile(s):
            files = [s]
        else:
            raise TreeprobeError(f"no such file or folder: {os.path.abspath(s)}")
    else:
        files = [os.fspath(f) for f in source]
        if not files:
            raise TreeprobeError("no embeddings files given")
    files = [os.path.abspath(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise TreeprobeError(f"no such file: {f}")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts == {".npy"}:
        if len(files) != 1:
            raise TreeprobeError("a .npy source is one file (with its metadata CSV); pass parquet shards for several")
        return "npy", files
    if metadata is not None:
        raise TreeprobeError("metadata= is only used with a .npy source; parquet files carry their own rank columns")
    bad = [f for f in files if not f.lower().endswith(".parquet")]
    if bad:
        raise TreeprobeError(f"unsupported embeddings file {bad[0]}: expected .parquet shards or one .npy")
    return "parquet", files


def _match_columns(names: Sequence[str], columns: Mapping[str, str] | None, where, covariate, path) -> dict:
    """canonical name (emb, ranks, where/covariate columns) → column name in the file."""
    columns = dict(columns or {})
    lower = {}
    for c in names:
        lower.setdefault(str(c).strip().lower(), c)
    out = {}
    emb = columns.get("emb")
    if emb is None:
        emb = next((c for c in EMBEDDING_COLUMNS if c in names), None)
    if emb is None or emb not in names:
        raise TreeprobeError(f"{path} has no embedding column ({emb or ' / '.join(EMBEDDING_COLUMNS)}; "
                             f"found: {', '.join(map(str, list(names)[:12]))}): pass columns={{'emb': NAME}}")
    out["emb"] = emb
    missing = []
    for r in RANKS:
        c = columns.get(r, r if r in names else lower.get(r))
        if c is None or c not in names:
            missing.append(r)
        out[r] = c
    if missing:
        raise TreeprobeError(f"{path} lacks column(s) {', '.join(missing)}; needs {', '.join(RANKS)} "
                             f"(found: {', '.join(map(str, list(names)[:12]))})")
    for extra in list(where or {}) + ([covariate] if covariate else []):
        if extra in out:
            continue
        c = columns.get(extra, extra if extra in names else lower.get(str(extra).lower()))
        if c is None or c not in names:
            raise TreeprobeError(f"{path} has no column {extra!r} (for where= / covariate=)")
        out[extra] = c
    return out


class _Names:
    """Per rank: raw value → (folded name, spelling) with the missing rules of :mod:`treeprobe.taxonomy`."""

    def __init__(self, missing):
        from treeprobe.taxonomy import _normalise_token, _token_set

        self._token = _normalise_token
        self.tokens = _token_set(missing)
        self.cache = {r: {} for r in RANKS}
        self.placeholder = {r: _normalise_token(PLACEHOLDER.format(rank=r)) for r in RANKS}

    def lookup(self, rank: str, value) -> tuple[str, str]:
        c = self.cache[rank]
        hit = c.get(value)
        if hit is None:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                hit = ("", "")
            else:
                text = str(value)
                tok = self._token(text)
                if tok in self.tokens or tok == self.placeholder[rank]:
                    hit = ("", "")
                else:
                    spelled = normalise_name(text)
                    hit = (spelled.casefold(), spelled)
            c[value] = hit
        return hit


def _encode(arr, names: _Names, rank: str):
    """(index (b,) into the distinct values, −1 → the last entry (null); folded names (k+1,); spellings (k+1,))
    of a pyarrow column: the string work is done once per distinct value."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    d = arr if pa.types.is_dictionary(arr.type) else arr.dictionary_encode()
    idx = d.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    vals = d.dictionary.to_pylist()
    pairs = [names.lookup(rank, v) for v in vals] + [("", "")]
    idx[idx < 0] = len(vals)
    return idx, np.array([p[0] for p in pairs], dtype=object), np.array([p[1] for p in pairs], dtype=object)


def _embeddings(col, path: str, dim: int | None):
    """(rows (b, D) as stored (float16 stays float16; NaN where a value or the row is null), valid (b,) bool:
    emb not null, D) of a list column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise TreeprobeError(f"embedding column of {path} is {t}, expected a list of numbers")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise TreeprobeError(f"embedding column of {path} holds {t.value_type}, expected numbers")
    b = len(col)
    valid = np.ones(b, dtype=bool) if col.null_count == 0 else col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(t):
        D = t.list_size
        lengths = None
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        lv = lengths[valid]
        D = int(lv[0]) if len(lv) else (dim or 0)
        if len(lv) and (lv != D).any():
            u, c = np.unique(lv, return_counts=True)
            raise TreeprobeError(f"ragged embeddings in {path}: " + ", ".join(f"{n} rows of length {d}"
                                                                           for d, n in zip(u, c)))
    if dim is not None and D != dim and valid.any():
        raise TreeprobeError(f"{path} has {D}-d embeddings, earlier files {dim}-d")
    if D == 0 and valid.any():
        raise TreeprobeError(f"embedding column of {path} holds no values")
    if valid.all():
        flat = col.flatten()
    else:
        flat = pc.list_flatten(col.filter(pa.array(valid)))
    vals = flat.to_numpy(zero_copy_only=False)  # float16 stays float16 (no copy); nulls become NaN
    if valid.all():
        return vals.reshape(b, D), valid, D
    out = np.full((b, D), np.nan, dtype=vals.dtype if vals.dtype.kind == "f" else np.float64)
    if valid.any():
        out[valid] = vals.reshape(-1, D)
    return out, valid, D


def _unit_vectors(x: np.ndarray, flags_only: bool = False):
    """(finite (b,), zero (b,), usable (b,), float64 unit rows of the usable ones) of rows x (b, D) as stored:
    cast to float32 (as the loaders store X), normalised in float32 as ``TreeData.unit``, then in float64 as
    the Mantel code does (``l2_normalise`` twice)."""
    x32 = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x32).all(axis=1)
    norms = np.zeros(len(x32), dtype=np.float32)
    norms[finite] = np.linalg.norm(x32[finite], axis=1)
    zero = finite & (norms == 0)
    ok = finite & ~zero
    if flags_only:
        return finite, zero, ok, None
    u64 = (x32[ok] / norms[ok][:, None]).astype(np.float64)  # the float32 unit rows of TreeData.unit
    u64 *= (1.0 / np.sqrt(np.einsum("ij,ij->i", u64, u64)))[:, None]  # as mantel's float64 pass (1/‖·‖)
    return finite, zero, ok, u64


def _batches_parquet(files, cols_for, batch_rows, where_fold, names):
    """Yield (file, first row index, {canonical: pyarrow array}) per record batch; a row group with no row
    matching ``where`` is skipped without reading its embeddings: (file, first row, number of rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise TreeprobeError(f"cannot read parquet {path}: {' '.join(str(e).split())}") from None
        cmap = cols_for(pf.schema_arrow.names, path)
        rev = {v: k for k, v in cmap.items()}
        need = list(dict.fromkeys(cmap.values()))
        row0 = 0
        for rg in range(pf.num_row_groups):
            n_rg = pf.metadata.row_group(rg).num_rows
            if where_fold:
                wcols = [cmap[k] for k in where_fold]
                t = pf.read_row_group(rg, columns=wcols)
                if not _where_mask({k: t.column(cmap[k]) for k in where_fold}, where_fold, names).any():
                    yield path, row0, n_rg
                    row0 += n_rg
                    continue
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=need, use_threads=True):
                yield path, row0, {rev[c]: batch.column(i) for i, c in enumerate(batch.schema.names)}
                row0 += batch.num_rows


def _where_mask(cols: dict, where_fold: dict, names: _Names) -> np.ndarray:
    """Rows matching every ``where`` condition (rank: folded name in the set; other columns: str value in it)."""
    mask = None
    for k, allowed in where_fold.items():
        if k in RANKS:
            idx, fv, _ = _encode(cols[k], names, k)
            m = np.isin(fv, list(allowed))[idx]
        else:
            v = cols[k].to_pandas() if hasattr(cols[k], "to_pandas") else pd.Series(cols[k])
            m = v.astype("string").fillna("").isin(list(allowed)).to_numpy()
        mask = m if mask is None else mask & m
    return mask


def _where_folded(where) -> dict:
    out = {}
    for k, v in (where or {}).items():
        vals = [v] if isinstance(v, (str, int, float)) else list(v)
        if k in RANKS:
            out[k] = {normalise_name(str(x)).casefold() for x in vals}
        else:
            out[k] = {str(x) for x in vals}
    return out


def _batches_npy(path, metadata, batch_rows, cols_for):
    """Yield (file, first row, {canonical: values}) from a .npy memory map + metadata CSV (in chunks)."""
    import pyarrow as pa

    if metadata is None:
        metadata = os.path.join(os.path.dirname(path), "metadata.csv")
    if not os.path.isfile(metadata):
        raise TreeprobeError(f"no metadata for {path}: pass metadata=path/to/metadata.csv")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TreeprobeError(f"cannot read {path} as a numpy array: {' '.join(str(e).split())}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise TreeprobeError(f"embeddings {path} have shape {arr.shape} / dtype {arr.dtype}, expected numbers (N, D)")
    header = pd.read_csv(metadata, nrows=0).columns
    cmap = cols_for(list(header) + ["emb"], metadata)
    usecols = [c for k, c in cmap.items() if k != "emb"] + (["emb_row"] if "emb_row" in header else [])
    row0 = 0
    for chunk in pd.read_csv(metadata, usecols=list(dict.fromkeys(usecols)), chunksize=batch_rows,
                             dtype={cmap[r]: str for r in RANKS}):
        n = len(chunk)
        if "emb_row" in chunk.columns:
            rows = pd.to_numeric(chunk["emb_row"], errors="coerce").to_numpy()
            if np.isnan(rows).any() or (rows < 0).any() or (rows >= len(arr)).any() or (rows != np.round(rows)).any():
                raise TreeprobeError(f"metadata {metadata}: an emb_row is not a row of {path}")
            X = np.asarray(arr[rows.astype(np.int64)])
        else:
            if row0 + n > len(arr):
                raise TreeprobeError(f"metadata {metadata} has more rows than {path} ({len(arr)})")
            X = np.asarray(arr[row0:row0 + n])
        cols = {k: pa.array(chunk[c].astype(object).where(chunk[c].notna(), None).tolist())
                for k, c in cmap.items() if k != "emb"}
        cols["emb"] = X
        yield metadata, row0, cols
        row0 += n
    if "emb_row" not in header and row0 != len(arr):
        raise TreeprobeError(f"embeddings {path} have {len(arr)} rows but metadata {metadata} has {row0} "
                             "(add an emb_row column to map metadata rows to embedding rows)")


def _usable_flags(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite (b,), zero-norm (b,)) of the rows of X marked in ``rows`` (others: finite, not zero), after
    the float32 cast the loaders make; float16 is checked as stored (its cast is exact, its norm cannot
    underflow in float32)."""
    b = len(X)
    fin = np.ones(b, dtype=bool)
    zer = np.zeros(b, dtype=bool)
    idx_all = np.flatnonzero(rows)
    for a in range(0, len(idx_all), _BLOCK):
        idx = idx_all[a:a + _BLOCK]
        x = X[idx]
        if x.dtype == np.float16:  # on the bits: exponent all ones = inf/NaN; zero = ±0
            v = x.view(np.uint16)
            f = ~((v & 0x7C00) == 0x7C00).any(axis=1)
            z = f & ((v & 0x7FFF) == 0).all(axis=1)
        else:
            f, z, _, _ = _unit_vectors(x, flags_only=True)
        fin[idx], zer[idx] = f, z
    return fin, zer


def _unit_ids(stats: SpeciesStats, enc: dict, use: np.ndarray, single: np.ndarray, path: str, rows: np.ndarray):
    """Unit index (b,) of the rows in ``use`` (−1 elsewhere): one unit per folded lineage, or per row for
    the ``single`` ones (unknown species, separate mode). New units are created in stream order."""
    b = len(use)
    uid = np.full(b, -1, dtype=np.int64)
    grouped = use & ~single
    if grouped.any():
        codes = [enc[r][0][grouped] for r in RANKS]
        key = np.zeros(int(grouped.sum()), dtype=np.int64)
        radix = 1
        for r, c in zip(RANKS, codes):
            size = len(enc[r][1])
            if radix * size >= 2 ** 62:
                key = None
                break
            key += c * radix
            radix *= size
        if key is None:  # pragma: no cover - more than 2**62 name combinations in one batch
            _, key = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
        uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
        ids = np.empty(len(uniq), dtype=np.int64)
        for j in np.argsort(first, kind="stable"):  # first appearance order: units numbered as the stream goes
            i = first[j]
            lin = tuple(enc[r][1][c[i]] for r, c in zip(RANKS, codes))
            ids[j] = stats._unit(lin, lin)
        uid[grouped] = ids[inv.ravel()]
    sel = np.flatnonzero(single & use)
    if len(sel):
        lins = [tuple(enc[r][1][enc[r][0][i]] for r in RANKS) for i in sel]
        start = stats._new_units([(_SINGLE, path, int(rows[i])) for i in sel], lins)
        uid[sel] = start + np.arange(len(sel))
    return uid


def _prefetch(items, depth: int = 2):
    """Iterate ``items`` in a background thread, ``depth`` items ahead: parquet decoding (pyarrow, GIL
    released) overlaps the numpy reduction of the previous batch. Exceptions come out where they happened
    in the order; closing the generator stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    th = threading.Thread(target=run, name="treeprobe-stream-read", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def _decoded(it):
    """(path, first row, columns, (X, valid, D)) with the embedding column turned into rows (in the reader)."""
    for path, row0, cols in it:
        if isinstance(cols, int):  # a row group skipped by where
            yield path, row0, cols, None
        elif isinstance(cols["emb"], np.ndarray):
            X = cols["emb"]
            yield path, row0, cols, (X, np.ones(len(X), dtype=bool), X.shape[1])
        else:
            yield path, row0, cols, _embeddings(cols["emb"], path, None)


def _timed(it, waits: list):
    """``it``, adding to waits[0] the seconds spent waiting for each item."""
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            waits[0] += time.perf_counter() - t
        yield item


def _total_rows(kind, files) -> int | None:
    if kind != "parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return int(sum(pq.ParquetFile(f).metadata.num_rows for f in files))
    except Exception:  # noqa: BLE001 - only for the progress bar's total
        return None


def species_statistics(source, *, columns: Mapping[str, str] | None = None, where: Mapping | None = None,
                       batch_rows: int = 65536, progress: bool = True, gram: bool = False,
                       covariate: str | None = None, unknown: str = "separate", missing: Iterable[str] = MISSING_TOKENS,
                       drop_unknown_species: bool = False, metadata=None) -> SpeciesStats:
    """Per-species sufficient statistics of embeddings in one bounded-memory pass (module docstring).

    source: a folder (every ``*.parquet`` below it, sorted by path), a glob, a list of parquet files (read in
    the given order), or one ``.npy`` (N, D) with ``metadata`` (a CSV with the rank columns, default
    ``metadata.csv`` beside it; ``emb_row`` maps CSV rows to array rows). Parquet: an embedding list column
    (``emb``, else the first of :data:`EMBEDDING_COLUMNS`; list / large_list / fixed_size_list of float16,
    float32, float64 or integers) and the 7 rank columns (names matched case-insensitively); ``columns``
    maps a canonical name (``emb``, a rank, a where/covariate column) to the file's column name.

    where: {column: value or values}: keep rows whose rank name (compared as TreeData spells it: NFC,
    whitespace, letter case ignored) or other column value (exact string) is one of the values; all
    conditions must hold. Row groups without a matching row are skipped unread.
    gram: also keep Σ x̂x̂ᵀ and per-species ‖G_s‖²_F (needed by the image-level species Mantel; O(N·D²)).
    covariate: a column; also per (unit, category) counts, sums and Σ‖x̂‖² (category: the value as a string).
    unknown: ``"separate"`` (TreeData's default: an item unknown at species is its own unit) or
    ``"placeholder"``; ``drop_unknown_species``: set such items aside instead (memory: each single-item unit
    costs D·8 bytes). batch_rows: rows per record batch read (memory ≈ batch_rows·D·(2 + 4) bytes plus
    blocks of 8192 rows in float64). Progress: a tqdm bar in rows with rows/s.
    """
    from tqdm.auto import tqdm

    if unknown not in UNKNOWN_MODES:
        raise TreeprobeError(f"unknown must be one of {', '.join(UNKNOWN_MODES)}; got {unknown!r}")
    if not isinstance(batch_rows, int) or batch_rows < 1:
        raise TreeprobeError(f"batch_rows must be a positive integer; got {batch_rows!r}")
    kind, files = _sources(source, metadata)
    missing_t = tuple(sorted(set(missing)))
    names = _Names(missing_t)
    where_fold = _where_folded(where)
    if covariate is not None and covariate in RANKS:
        raise TreeprobeError(f"covariate {covariate!r} is a rank column: pick an item column")

    def cols_for(schema_names, path):
        return _match_columns(schema_names, columns, where_fold, covariate, path)

    stats: SpeciesStats | None = None
    pending = dict(n_rows=0, n_filtered=0)
    skipped: dict = {}
    examples: dict = {}

    def skip(reason, mask, path, rows):
        n = int(mask.sum())
        if not n:
            return
        skipped[reason] = skipped.get(reason, 0) + n
        ex = examples.setdefault(reason, [])
        for i in rows[mask][:max(0, _EXAMPLES - len(ex))]:
            ex.append(f"{path} row {int(i)}")

    total = _total_rows(kind, files)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="species statistics", disable=not progress,
               smoothing=0.1)
    t0 = time.perf_counter()
    waits = [0.0]
    dim = None
    if kind == "parquet":
        it = _batches_parquet(files, cols_for, batch_rows, where_fold, names)
    else:
        it = _batches_npy(files[0], metadata, batch_rows, cols_for)
    try:
        for path, row0, cols, decoded in _timed(_prefetch(_decoded(it)), waits):
            if decoded is None:
                pending["n_rows"] += cols
                pending["n_filtered"] += cols
                bar.update(cols)
                continue
            X, valid, D = decoded
            if dim is not None and D != dim and valid.any():
                raise TreeprobeError(f"{path} has {D}-d embeddings, earlier files {dim}-d")
            b = len(X)
            pending["n_rows"] += b
            rows = row0 + np.arange(b)
            if dim is None and valid.any():
                dim = D
            if stats is None and dim is not None:
                stats = SpeciesStats(dim, unknown, missing_t, gram, covariate)
            keep = valid.copy()
            if where_fold:
                w = _where_mask(cols, where_fold, names)
                pending["n_filtered"] += int((~w).sum())
                keep &= w
                valid = valid | ~w  # rows filtered out are not reported as missing
            skip(SKIP_REASONS[0], ~valid, path, rows)
            fin, zer = _usable_flags(X, keep)
            skip(SKIP_REASONS[1], keep & ~fin, path, rows)
            skip(SKIP_REASONS[2], keep & fin & zer, path, rows)
            ok_all = keep & fin & ~zer
            enc = {r: _encode(cols[r], names, r) for r in RANKS}
            if stats is not None and ok_all.any():  # names counted over the rows TreeData would tidy
                for r in RANKS:
                    idx_r, fv, sv = enc[r]
                    cnt = np.bincount(idx_r[ok_all], minlength=len(fv))
                    table = stats._spell[r]
                    for j in np.flatnonzero(cnt):
                        if fv[j]:
                            table.setdefault(fv[j], Counter())[sv[j]] += int(cnt[j])
            placed = enc[RANKS[0]][1][enc[RANKS[0]][0]] != ""
            skip(SKIP_REASONS[3], ok_all & ~placed, path, rows)
            use = ok_all & placed
            no_species = enc[RANKS[-1]][1][enc[RANKS[-1]][0]] == ""
            if drop_unknown_species:
                skip(SKIP_REASONS[4], use & no_species, path, rows)
                use &= ~no_species
            if not use.any():
                bar.update(b)
                continue
            uid = _unit_ids(stats, enc, use, no_species & (unknown == "separate"), path, rows)
            cov_id = None
            if covariate is not None:
                cv = cols[covariate]
                cv = cv.to_pandas() if hasattr(cv, "to_pandas") else pd.Series(cv)
                cats = cv.astype("string").fillna("").to_numpy(dtype=object)
                cov_id = np.full(b, -1, dtype=np.int64)
                ui = np.flatnonzero(use)
                pair_codes, pair_cats = pd.factorize(pd.Series(cats[ui], dtype=object))
                combos, inv = np.unique(np.stack([uid[ui], pair_codes]), axis=1, return_inverse=True)
                ids = np.array([stats._cov_unit(int(u), str(pair_cats[c])) for u, c in combos.T], dtype=np.int64)
                cov_id[ui] = ids[inv.ravel()]
            ui = np.flatnonzero(use)
            for a in range(0, len(ui), _BLOCK):
                idx = ui[a:a + _BLOCK]
                stats._add_block(_unit_vectors(X[idx])[3], uid[idx], None if cov_id is None else cov_id[idx])
            bar.update(b)
    finally:
        bar.close()
    if stats is None:
        raise TreeprobeError(f"no embeddings read from {files[0] if len(files) == 1 else f'{len(files)} files'} "
                             f"({pending['n_rows']} rows, {pending['n_filtered']} filtered out by where)")
    if stats.gram_enabled:
        stats._tail = None  # the last species stays held (a later merge may continue it)
    stats.n_rows = pending["n_rows"]
    stats.n_filtered = pending["n_filtered"]
    stats.n_skipped = skipped
    stats.skipped_examples = examples
    stats.files = tuple(files)
    stats.timings = dict(seconds=time.perf_counter() - t0, wait_read_seconds=waits[0])
    return stats


# --- the tests on species statistics ----------------------------------------------------------------------


def _species_pearson_from_sums(clades, sizes, Su, sq, g2, g2w, *, permutations, alternative, rng, perm_dtype,
                               n_jobs, progress):
    """:func:`treeprobe.mantel.mantel_species` (Pearson) from per-unit sums (``clades``: one item per unit, in
    unit order; Su (U, D); sq = Σ‖x̂‖²; g2 = ‖Σ x̂x̂ᵀ‖²_F; g2w = Σ_u ‖G_u‖²_F): the code of
    ``mantel._species_pearson`` after its pass over X."""
    from treeprobe import mantel as M

    U = len(sizes)
    N = int(sizes.sum())
    if N < 3:
        raise TreeprobeError("a Mantel test needs at least 3 items")
    if U < 2:
        raise TreeprobeError("a between-species test needs at least 2 species")
    units = M._Units(codes=np.arange(U), sizes=sizes, node=clades.item_node, strata=sizes)
    return M._species_pearson_from_sums(clades, units, Su, Su.sum(axis=0), sq, g2, g2w, N=N,
                                        permutations=permutations, alternative=alternative, rng=rng,
                                        perm_dtype=perm_dtype, n_jobs=n_jobs, progress=progress)


def _centroid_test(C, clades, sizes, n_images, *, method, permutations, alternative, seed, spearman_max_n,
                   spearman_repeats, perm_dtype, n_jobs, progress):
    """:func:`treeprobe.mantel.mantel_centroids` from the centroids C (S, D) at ``clades.item_node``."""
    from treeprobe import mantel as M

    S = len(sizes)
    if S < 3:
        raise TreeprobeError("a centroid Mantel test needs at least 3 species")
    units = M._Units(codes=np.arange(S), sizes=np.ones(S, dtype=np.int64), node=clades.item_node, strata=sizes)
    res = M._units_test(C, M._unit_tree(clades, units), units, method, permutations, alternative,
                        np.random.default_rng(seed), spearman_max_n, spearman_repeats, perm_dtype, n_jobs, progress)
    for key in ("n_within_species_pairs", "mean_within_species_distance"):
        res.details.pop(key, None)
    if "mean_between_species_distance" in res.details:
        res.details["mean_centroid_distance"] = res.details.pop("mean_between_species_distance")
    res.details.update(permuted=M.PERMUTED_CENTROIDS, n_images=int(n_images))
    return res


def _not_from_stats(level, scheme, method, seed, why) -> dict:
    return dict(level=level, scheme=scheme, statistic=float("nan"), p_value=float("nan"), method=method,
                estimator=NOT_FROM_STATS, permuted="", details=dict(reason=why, seed=seed))


def mantel_from_stats(stats: SpeciesStats, *, methods: Sequence[str] = ("pearson",),
                      levels: Sequence[str] | None = None, permute: Sequence[str] = ("species",),
                      rank_lengths=None, permutations: int = 999, seed: int = 0, spearman_max_n: int | None = None,
                      progress: bool = False, n_jobs: int | None = None) -> pd.DataFrame:
    """The table of :func:`treeprobe.tl.mantel` (rank taxonomy) from species statistics, same seeds.

    Seeds are drawn exactly as tl.mantel draws them (scheme × level × method, one each), so every row that
    the statistics can give equals tl.mantel's on the same rows, p-value included. From statistics:
    species-centroid level, every method and scheme (centroids and sizes suffice); image level, Pearson
    with species permuted (needs ``gram=True`` and contiguous species). Other rows (image-level Spearman,
    image permutations) come back with NaN, ``estimator`` = :data:`NOT_FROM_STATS` and their seed in
    ``details``: they need items (the sample). No partial Mantel (``control``) row.
    """
    from treeprobe import mantel as M
    from treeprobe._utils import SEED_BOUND
    from treeprobe.tl import MANTEL_LEVELS, CENTROIDS_PERMUTED_FREELY, _mantel_row

    levels = MANTEL_LEVELS if levels is None else tuple(levels)
    spearman_max_n = M.SPEARMAN_MAX_N if spearman_max_n is None else spearman_max_n
    clades = stats.clade_structure(rank_lengths)
    sizes = stats.counts
    C = stats.centroids()
    rng = np.random.default_rng(seed)
    rows = []
    enough = stats.n_units >= 3
    for scheme in permute:
        for level in levels:
            if level == "species-centroid" and not enough:
                continue
            for method in methods:
                kw = dict(method=method, permutations=permutations, alternative="greater",
                          seed=int(rng.integers(SEED_BOUND)), spearman_max_n=spearman_max_n, progress=progress)
                if level == "species-centroid":
                    if scheme == "species":
                        res = _centroid_test(C, clades, sizes, stats.n_items, spearman_repeats=M.SPEARMAN_REPEATS,
                                             perm_dtype=np.float64, n_jobs=n_jobs, **kw)
                    else:
                        res = M.mantel_tree(C, clades, n_jobs=n_jobs, **kw)
                        res.details["permuted"] = CENTROIDS_PERMUTED_FREELY
                    rows.append(_mantel_row(level, scheme, res))
                    continue
                if scheme != "species" or method != "pearson":
                    rows.append(_not_from_stats(level, scheme, method, kw["seed"],
                                                "image-level Spearman and image permutations need the items"))
                    continue
                if not stats.gram_enabled:
                    raise TreeprobeError("the image-level species Mantel test needs species_statistics(..., gram=True)")
                if not stats.within_exact:
                    raise TreeprobeError(f"the rows of {stats.n_scattered} species are not contiguous in the files: "
                                         "the image-level test needs each species' rows together (sort the shards "
                                         "by taxonomy, as TreeOfLife-200M is) — the species-centroid level does not")
                G = stats.gram
                res = _species_pearson_from_sums(
                    clades, sizes, stats.sums, float(stats.sq.sum()), float(np.sum(G * G)), float(stats.within.sum()),
                    permutations=permutations, alternative="greater", rng=np.random.default_rng(kw["seed"]),
                    perm_dtype=np.float64, n_jobs=n_jobs, progress=progress)
                rows.append(_mantel_row(level, scheme, res))
    return pd.DataFrame(rows)


def physignal_from_stats(stats: SpeciesStats, *, rank_lengths=None, permutations: int = 999, seed: int = 0,
                         n_axes: int = 10, renormalise: bool = True, permute: str = "size-strata",
                         n_jobs: int | None = 1, progress: bool = False):
    """:func:`treeprobe.physignal.physignal` (rank taxonomy) from species statistics: the same call of
    :func:`~treeprobe.physignal.kmult_test` on the same centroids, tree and size strata, so K, p and z
    equal the in-memory ones. ``renormalise=False`` (plain means Σx̂/n) is exact only to ~1e-7: the
    in-memory means average the float32 unit vectors, these the float64 ones."""
    from treeprobe._validation import check_choice
    from treeprobe.physignal import PHYSIGNAL_SCHEMES, kmult_test

    check_choice(permute, "K_mult permutation scheme", PHYSIGNAL_SCHEMES)
    if stats.n_units < 3:
        raise TreeprobeError(f"K_mult needs at least 3 species on the tree; got {stats.n_units}")
    Y = stats.centroids() if renormalise else stats.sums / stats.counts[:, None]
    res = kmult_test(Y, stats.clade_structure(rank_lengths), permutations=permutations, seed=seed, n_axes=n_axes,
                     sizes=stats.counts if permute == "size-strata" else None, n_jobs=n_jobs, progress=progress)
    res.details.update(tree=dict(kind="rank taxonomy (patristic, " + ("one unit per rank" if rank_lengths is None
                                                                       else f"rank lengths {rank_lengths}") + ")"),
                       n_items=stats.n_items, n_items_not_in_tree=0, source="species statistics (streamed)",
                       centroids="unit-norm mean of unit embeddings" if renormalise
                       else "mean of unit embeddings (not renormalised)")
    return res
