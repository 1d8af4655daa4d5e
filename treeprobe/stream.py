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
* partial Mantel with a categorical covariate (:func:`partial_mantel_from_stats`, between-species pairs, species
  permuted within covariate make-up): additionally per (species, category) n and S, which ``covariate=``
  accumulates; a numeric covariate needs every item's value (it is not done from statistics).
* Spearman at image level and image-permutation p-values need items (a sample), not these sums.

**A stratified sample in the same pass** (``sample=SIZE``, ``sample_seed``): for what needs items (kNN
agreement, clustering, t-SNE/UMAP), at most SIZE items, strata kept whole up to a common cap m (the largest m
with Σ_s min(n_s, m) ≤ SIZE) and the rest drawn uniformly by bottom-k on a seeded hash of (file label, row).
Each row's key depends only on the seed, its file's name and its row, so the sample is the same whatever
batch_rows, file order or partition among workers, and :meth:`SpeciesStats.merge` of partial samples is
exact (bit-identical). Memory ≤ (2·SIZE + batch_rows) candidate rows. :meth:`SpeciesStats.sample_data` gives
it as a TreeData whose ``uns["sample"]`` (:attr:`SpeciesStats.sample_info`) says which numbers are exact over
all rows (the statistics) and which come from the sample.

**The whole report** (:func:`intrinsic_from_stats`, behind ``treeprobe intrinsic --embeddings FOLDER|GLOB`` via
:func:`treeprobe.pipeline.run_intrinsic_stream`): the Mantel rows and K_mult the statistics give, exact over all
rows, and the item-level tools of :func:`treeprobe.tl.intrinsic` on the sample, in one
:class:`~treeprobe.report.Report` whose ``provenance["stream"]`` says which number came from where.

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
import sys
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

__all__ = ["SpeciesStats", "species_statistics", "mantel_from_stats", "partial_mantel_from_stats",
           "physignal_from_stats",
           "intrinsic_from_stats", "rank_summary_from_stats", "PARTIAL_NUMERIC", "EMBEDDING_COLUMNS",
           "SKIP_REASONS", "NOT_FROM_STATS", "SAMPLE_RULE", "SAMPLE_ITEM_COLUMNS", "TREE_MAX_LEAVES"]

#: Embedding column names tried in order when ``columns`` names none (``emb``: treeprobe, emb-explorer and
#: the TreeOfLife-200M embeddings; the others: names emb-explorer also treats as embeddings).
EMBEDDING_COLUMNS = ("emb", "embedding", "embeddings", "vector")
#: Reasons a row is set aside, in the order they are checked (the loader's and TreeData's wording).
SKIP_REASONS = ("missing embedding", "non-finite embedding", "zero-norm embedding",
                f"no taxonomy (missing {RANKS[0]})", "unknown species (set aside: drop_unknown_species)")
#: ``estimator`` of a Mantel row that species statistics cannot give (it needs the items).
NOT_FROM_STATS = "needs items: not computable from species statistics"

#: Most species-level leaves tree recovery of a streamed report builds a tree on (S² / 2 float64 distances:
#: 0.4 GB at 10,000, plus scipy's copy); more are subsampled (:func:`intrinsic_from_stats`).
TREE_MAX_LEAVES = 10_000


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


# --- the stratified sample ------------------------------------------------------------------------------

_U64_MAX = np.uint64(2 ** 64 - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
#: Columns the sample's items table adds (so they cannot be ``sample_columns``).
SAMPLE_ITEM_COLUMNS = ("source_file", "source_row", "sample_weight")
#: The allocation rule of :func:`species_statistics` ``sample=``, as reports state it.
SAMPLE_RULE = ("stratified by lineage: per-stratum cap m = the largest m with sum_s min(n_s, m) <= size (strata "
               "of at most m items kept whole), the size - sum_s min(n_s, m) items left over one each to as many "
               "strata above the cap (those with the smallest seeded lineage hash); within a stratum the rows "
               "with the smallest seeded hash of (file label, row): a uniform random subset")


def _hash64(*parts) -> tuple[int, int]:
    """Two 64-bit words of a BLAKE2b digest of the parts (stable across processes, platforms, versions)."""
    import hashlib

    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def _row_keys(file_hash: np.uint64, rows: np.ndarray) -> np.ndarray:
    """uint64 key of each row index (the splitmix64 stream seeded with the file's hash: output ``row + 1``)."""
    z = rows.astype(np.uint64)
    z += np.uint64(1)
    z *= _GOLDEN
    z += file_hash
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def _cap_level(n: np.ndarray, size: int) -> int | None:
    """The largest m ≥ 0 with Σ min(n, m) ≤ size, or None when Σ n ≤ size (every item fits)."""
    if int(n.sum()) <= size:
        return None
    ns = np.sort(n)
    prefix = np.r_[0, np.cumsum(ns)]

    def total(m):  # Σ min(n, m)
        k = int(np.searchsorted(ns, m, side="left"))
        return int(prefix[k]) + m * (len(ns) - k)

    lo, hi = 0, int(ns[-1])  # total(lo) ≤ size < total(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid) <= size:
            lo = mid
        else:
            hi = mid
    return lo


def _allocation(n: np.ndarray, size: int, key_hi: np.ndarray, key_lo: np.ndarray):
    """(items per stratum (S,), cap m or None, strata given one more than m) of the sample rule."""
    m = _cap_level(n, size)
    if m is None:
        return n.astype(np.int64, copy=True), None, 0
    alloc = np.minimum(n, m).astype(np.int64)
    extra = size - int(alloc.sum())
    if extra > 0:
        above = np.flatnonzero(n > m)  # more than extra of them, else m + 1 would fit
        alloc[above[np.lexsort((key_lo[above], key_hi[above]))[:extra]]] += 1
    return alloc, m, extra


class _Sample:
    """The candidate rows of a stratified bottom-k sample (see :func:`species_statistics` ``sample=``).

    Strata: the folded lineage (7 names, '' unknown). Per stratum: n (rows eligible so far), a 128-bit
    seeded hash of the lineage (who gets a left-over item), and a key threshold above which a new row cannot
    be in the sample. Candidates: uint64 key, stratum, file index, row, float32 vector, extra column values.
    Invariant: each stratum holds at least the alloc smallest-key rows of its rows so far, where alloc is
    the allocation of the final counts; :meth:`compact` trims to the allocation of the current counts.
    """

    def __init__(self, size: int, seed: int, dim: int, columns: tuple, root: str | None):
        self.size, self.seed, self.dim, self.columns, self.root = size, seed, dim, columns, root
        self.strata: list[tuple] = []
        self.s_index: dict = {}
        self.s_n = _Grow((), np.int64)
        self.s_hi = _Grow((), np.uint64)
        self.s_lo = _Grow((), np.uint64)
        self.s_thr = _Grow((), np.uint64)
        self.alloc = np.zeros(0, np.int64)
        self.m: int | None = None  # cap of the counts so far, an upper bound of the final one (None: all fit)
        self.n_extra = 0
        self.labels: list[str] = []
        self.paths: list[str] = []
        self.f_index: dict = {}  # path -> file index
        self.f_hash: list[np.uint64] = []
        self.p_key = _Grow((), np.uint64)
        self.p_strat = _Grow((), np.int64)
        self.p_file = _Grow((), np.int64)
        self.p_row = _Grow((), np.int64)
        self.p_X = _Grow((dim,), np.float32)
        self.p_extra = {c: _Grow((), object) for c in columns}
        self._m_at = -1  # number of strata when m was last computed

    def reserve(self, batch_rows: int) -> None:
        """Room for the most candidates a pass holds (2·size + batch_rows), as ``np.empty``: pages are used
        only as candidates come, and the pool is never copied to grow."""
        cap = 2 * self.size + batch_rows
        for g in (self.p_key, self.p_strat, self.p_file, self.p_row, self.p_X, *self.p_extra.values()):
            if len(g.a) < cap:
                a = np.empty((cap, *g.a.shape[1:]), dtype=g.a.dtype)
                a[:g.n] = g.view
                g.a = a

    @property
    def settings(self) -> dict:
        return dict(size=self.size, seed=self.seed, columns=self.columns,
                    labels="file name" if self.root is None else "path relative to sample_root")

    # --- files and strata ------------------------------------------------------------------------------
    def label(self, path: str) -> str:
        if self.root is None:
            return os.path.basename(path)
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise TreeprobeError(f"{path} is not under sample_root {os.path.abspath(self.root)}")
        return rel.replace(os.sep, "/")

    def file(self, path: str, label: str | None = None) -> int:
        f = self.f_index.get(path)
        if f is None:
            label = self.label(path) if label is None else label
            if label in self.labels:
                other = self.paths[self.labels.index(label)]
                raise TreeprobeError(
                    f"two files have the sample label {label!r} ({other} and {path}): the sample's keys hash the "
                    "file label and row, so labels must be unique — pass sample_root= (a folder above them: "
                    "labels become paths relative to it) or give the files distinct names")
            f = len(self.labels)
            self.f_index[path] = f
            self.labels.append(label)
            self.paths.append(path)
            self.f_hash.append(np.uint64(_hash64("treeprobe-sample-file", self.seed, label)[0]))
        return f

    def stratum(self, lin: tuple) -> int:
        s = self.s_index.get(lin)
        if s is None:
            s = len(self.strata)
            self.s_index[lin] = s
            self.strata.append(lin)
            for g in (self.s_n, self.s_hi, self.s_lo, self.s_thr):
                g.extend(1)
            self.s_hi.a[s], self.s_lo.a[s] = _hash64("treeprobe-sample-stratum", self.seed, *lin)
            self.s_thr.a[s] = _U64_MAX
        return s

    # --- the pass --------------------------------------------------------------------------------------
    def add(self, f: int, rows: np.ndarray, strat: np.ndarray, X: np.ndarray, idx: np.ndarray, cols: dict) -> None:
        """Rows ``rows`` (k,) of file f in strata ``strat`` (k,); their vectors are X[idx] (as stored)."""
        self.s_n.a[:self.s_n.n] += np.bincount(strat, minlength=self.s_n.n)
        S = len(self.strata)
        if self.m is None or S <= 65536 or S > 1.125 * self._m_at:  # O(S log S): rarer when S is large
            self.m, self._m_at = _cap_level(self.s_n.view, self.size), S  # never increases: a valid bound
        key = _row_keys(self.f_hash[f], rows)
        ok = np.flatnonzero(key <= self.s_thr.a[strat])
        if self.m is not None and len(ok) > self.m + 1:  # no stratum will ever take more than m + 1 rows
            o = ok[np.lexsort((rows[ok], key[ok], strat[ok]))]
            ss = strat[o]
            rank = np.arange(len(o)) - np.searchsorted(ss, ss, side="left")
            ok = np.sort(o[rank <= self.m])
        if not len(ok):
            return
        n0 = self.p_key.n
        for g in (self.p_key, self.p_strat, self.p_file, self.p_row, self.p_X, *self.p_extra.values()):
            g.extend(len(ok))
        self.p_key.a[n0:n0 + len(ok)] = key[ok]
        self.p_strat.a[n0:n0 + len(ok)] = strat[ok]
        self.p_file.a[n0:n0 + len(ok)] = f
        self.p_row.a[n0:n0 + len(ok)] = rows[ok]
        self.p_X.a[n0:n0 + len(ok)] = X[idx[ok]]  # cast to float32 as the loaders do, in the copy
        if self.columns:
            import pyarrow as pa

            take = pa.array(idx[ok])
            for c in self.columns:
                self.p_extra[c].a[n0:n0 + len(ok)] = cols[c].take(take).to_pylist()
        if self.p_key.n > 2 * self.size:
            self.compact()

    def _label_rank(self) -> np.ndarray:
        rank = np.empty(len(self.labels), dtype=np.int64)
        rank[sorted(range(len(self.labels)), key=self.labels.__getitem__)] = np.arange(len(self.labels))
        return rank

    def compact(self) -> None:
        """Keep per stratum its allocation (of the current counts) of smallest (key, file label, row) rows;
        set the thresholds of the strata that hold fewer rows than they have."""
        S = len(self.strata)
        n = self.s_n.view
        self.alloc, self.m, self.n_extra = _allocation(n, self.size, self.s_hi.view, self.s_lo.view)
        P = self.p_key.n
        strat, key = self.p_strat.view, self.p_key.view
        order = np.lexsort((self.p_row.view, self._label_rank()[self.p_file.view], key, strat))
        ss = strat[order]
        rank = np.arange(P) - np.searchsorted(ss, ss, side="left")
        keep = order[rank < self.alloc[ss]]
        thr = np.full(S, _U64_MAX, dtype=np.uint64)
        binding = n > self.alloc  # later rows may still displace some held ones
        thr[binding & (self.alloc == 0)] = 0
        ks = strat[keep]
        last = np.flatnonzero(np.r_[ks[1:] != ks[:-1], True]) if len(keep) else np.zeros(0, np.int64)
        held_last = ks[last]
        b = binding[held_last]
        thr[held_last[b]] = key[keep[last[b]]]
        self.s_thr.a[:S] = thr
        keep = np.sort(keep)  # ascending: row i moves from keep[i] >= i, so chunks can move in place
        for g in (self.p_key, self.p_strat, self.p_file, self.p_row, self.p_X, *self.p_extra.values()):
            for a in range(0, len(keep), _BLOCK):  # no temporary of the whole pool
                part = keep[a:a + _BLOCK]
                g.a[a:a + len(part)] = g.a[part]
            g.n = len(keep)

    def finish(self) -> None:
        """Trim to the sample of the counts so far and free the room reserved for candidates."""
        self.compact()
        for g in (self.p_key, self.p_strat, self.p_file, self.p_row, self.p_X, *self.p_extra.values()):
            g.a = g.view.copy()

    # --- merging ---------------------------------------------------------------------------------------
    def merged(self, other: "_Sample") -> "_Sample":
        if self.settings != other.settings or self.dim != other.dim:
            diff = {k: (v, other.settings[k]) for k, v in self.settings.items() if other.settings[k] != v}
            raise TreeprobeError("cannot merge samples drawn with different settings: "
                                 + "; ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        out = _Sample(self.size, self.seed, self.dim, self.columns, self.root)
        for part in (self, other):
            fmap = np.array([out.file(p, lab) for p, lab in zip(part.paths, part.labels)], dtype=np.int64)
            smap = np.array([out.stratum(lin) for lin in part.strata], dtype=np.int64)
            if len(smap):
                out.s_n.a[smap] += part.s_n.view
            P = part.p_key.n
            if not P:
                continue
            n0 = out.p_key.n
            for g in (out.p_key, out.p_strat, out.p_file, out.p_row, out.p_X, *out.p_extra.values()):
                g.extend(P)
            out.p_key.a[n0:n0 + P] = part.p_key.view
            out.p_strat.a[n0:n0 + P] = smap[part.p_strat.view]
            out.p_file.a[n0:n0 + P] = fmap[part.p_file.view]
            out.p_row.a[n0:n0 + P] = part.p_row.view
            out.p_X.a[n0:n0 + P] = part.p_X.view
            for c in out.columns:
                out.p_extra[c].a[n0:n0 + P] = part.p_extra[c].view
        out.finish()
        return out

    # --- the result ------------------------------------------------------------------------------------
    def order(self) -> np.ndarray:
        """The sample's rows by (file label, row)."""
        return np.lexsort((self.p_row.view, self._label_rank()[self.p_file.view]))

    def nbytes(self) -> int:
        """Bytes of the rows held (vectors, keys, places; not the extra column values) and per-stratum arrays."""
        return int(sum(g.view.nbytes for g in (self.p_key, self.p_strat, self.p_file, self.p_row, self.p_X))
                   + sum(g.view.nbytes for g in (self.s_n, self.s_hi, self.s_lo, self.s_thr)))


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
    With ``sample=``: :attr:`has_sample`, :attr:`sample_info`, :meth:`sample_items`,
    :meth:`sample_vectors`, :meth:`sample_data` (n·(4·D + 32) bytes more).
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
    _sample: _Sample | None = field(default=None, repr=False)
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
        ``gram`` or ``covariate``. Samples (``sample=``) merge exactly: the union of the candidates trimmed
        by the rule on the added counts is the sample one pass over all the files draws (different sample
        settings raise; if only one side has a sample, the result has none, with a TreeprobeWarning)."""
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
        if self._sample is not None and other._sample is not None:
            out._sample = self._sample.merged(other._sample)
        elif self._sample is not None or other._sample is not None:
            import warnings

            from treeprobe.errors import TreeprobeWarning

            warnings.warn("one of the merged statistics has no sample: the merged statistics have none (a sample "
                          "of some of the files is not a sample of all of them); pass the same sample= to every "
                          "pass", TreeprobeWarning, stacklevel=2)
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
                    statistics_bytes=int(self._sums.a.nbytes + (0 if self._G is None else self._G.nbytes)),
                    sample=None if self._sample is None else self.sample_info)


    # --- the sample ---------------------------------------------------------------------------------------
    @property
    def has_sample(self) -> bool:
        """Whether the pass drew a sample (``species_statistics(..., sample=size)``)."""
        return self._sample is not None

    def _require_sample(self) -> _Sample:
        if self._sample is None:
            raise TreeprobeError("these statistics carry no sample: pass sample=SIZE to species_statistics")
        return self._sample

    @property
    def sample_info(self) -> dict:
        """What a report states about the sample (JSON-ready): ``size`` asked, ``seed``, ``rule``
        (:data:`SAMPLE_RULE`), ``cap`` m (None: every item kept), ``n_extra`` (strata given m + 1),
        ``n_sampled``, ``n_strata``, ``n_strata_whole`` (kept entirely), ``n_rows`` / ``n_items`` of the
        pass (rows read; items eligible, which the exact statistics use), ``n_files``, ``file_labels``
        (what the row keys hash), ``columns`` (item columns kept), ``exact`` / ``from_sample`` (which
        numbers are over all rows and which need the sample)."""
        smp = self._require_sample()
        n = smp.s_n.view
        return dict(size=smp.size, seed=smp.seed, rule=SAMPLE_RULE, cap=smp.m, n_extra=int(smp.n_extra),
                    n_sampled=int(smp.p_key.n), n_strata=len(smp.strata),
                    n_strata_whole=int(((smp.alloc == n) & (n > 0)).sum()), n_rows=int(self.n_rows),
                    n_items=int(self.n_items), n_files=len(smp.paths), file_labels=smp.settings["labels"],
                    columns=list(smp.columns), sample_bytes=smp.nbytes(),
                    exact="species statistics (counts, sums, centroids, Gram terms) and the tests on them: "
                          "all rows",
                    from_sample="tools that need items (kNN agreement, clustering, t-SNE/UMAP, image-level "
                                "Spearman, image permutations): the sample")

    def sample_items(self) -> pd.DataFrame:
        """The sampled items (n rows, by file label then row): the 7 ranks (the statistics' spelling), the
        ``columns`` kept (``where`` / ``covariate`` / ``sample_columns``, values as read), ``source_file``
        (the file as read, absolute; for a .npy source its metadata CSV), ``source_row`` (0-based row in
        it, rows of row groups skipped by ``where`` counted) and ``sample_weight`` = n_s / (items sampled
        from the stratum): the inverse inclusion probability, for estimates over all rows."""
        smp = self._require_sample()
        o = smp.order()
        strat = smp.p_strat.view[o]
        spelled = np.array([[self._spelling(r, lin[k]) for k, r in enumerate(RANKS)] for lin in smp.strata],
                           dtype=object).reshape(len(smp.strata), len(RANKS))
        df = pd.DataFrame(spelled[strat], columns=list(RANKS))
        for c in smp.columns:
            df[c] = (pd.Series(list(smp.p_extra[c].view[o]), dtype=object).infer_objects() if len(o)
                     else pd.Series([], dtype=object))  # numbers as numbers (tl's numeric-or-categorical rule)
        paths = np.array(smp.paths, dtype=object)
        df["source_file"] = paths[smp.p_file.view[o]] if len(o) else pd.Series([], dtype=object)
        df["source_row"] = smp.p_row.view[o]
        n = smp.s_n.view
        df["sample_weight"] = n[strat] / np.maximum(smp.alloc[strat], 1)
        return df

    def sample_vectors(self) -> np.ndarray:
        """The sampled embeddings, float32 (n, D) in :meth:`sample_items` order: the file's values cast to
        float32 as the loaders store ``TreeData.X`` (not normalised)."""
        smp = self._require_sample()
        return smp.p_X.view[smp.order()]

    def sample_data(self):
        """The sample as a :class:`~treeprobe.core.TreeData` (X: :meth:`sample_vectors`, items:
        :meth:`sample_items`, the pass's ``unknown`` / ``missing``), with ``uns["sample"]`` =
        :attr:`sample_info`, so ``tp.tl.knn_agreement``, clustering and maps run on it and a report can
        say which numbers come from the sample."""
        from treeprobe.core import TreeData

        info = self.sample_info
        if info["n_sampled"] == 0:
            raise TreeprobeError(f"the sample is empty ({self.n_items} usable items in the pass)")
        src = self._sample.paths[0] if len(self._sample.paths) == 1 else f"{len(self._sample.paths)} files"
        return TreeData(self.sample_vectors(), self.sample_items(), source=f"stratified sample of {src}",
                        uns={"sample": info}, missing=self.missing, unknown=self.unknown)


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


def _match_columns(names: Sequence[str], columns: Mapping[str, str] | None, where, covariate, path,
                   extra_columns: Sequence[str] = ()) -> dict:
    """canonical name (emb, ranks, where/covariate/extra columns) → column name in the file."""
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
    for extra in list(where or {}) + ([covariate] if covariate else []) + list(extra_columns):
        if extra in out:
            continue
        c = columns.get(extra, extra if extra in names else lower.get(str(extra).lower()))
        if c is None or c not in names:
            raise TreeprobeError(f"{path} has no column {extra!r} (for where= / covariate= / sample_columns=)")
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
                       drop_unknown_species: bool = False, metadata=None, sample: int | None = None,
                       sample_seed: int = 0, sample_columns: Sequence[str] = (), sample_root=None,
                       engine: str = "local", scheduler=None) -> SpeciesStats:
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

    sample: also draw, in the same pass, a stratified random sample of at most ``sample`` items (exactly
    min(sample, items) of them) for the tools that need items (:meth:`SpeciesStats.sample_data`). Only
    rows the statistics use enter it (not those ``where`` leaves out or set aside). *Strata*: the lineage
    as read (7 names, case-folded; in ``unknown="separate"`` mode the items unknown at species under one
    parent are one stratum, though each is its own unit in the statistics). *Rule* (:data:`SAMPLE_RULE`):
    cap m = the largest m with Σ_s min(n_s, m) ≤ sample, so strata of at most m items are kept whole and
    larger ones get m; the sample − Σ_s min(n_s, m) items left over go one each to as many strata above
    the cap, those with the smallest seeded hash of their lineage (if there are more strata than
    ``sample``, m = 0: that many strata, one item each). *Within a stratum*: the rows with the smallest
    key, key = splitmix64 of (a BLAKE2b hash of (sample_seed, file label), row index in the file) — a
    uniform subset without replacement; ties (equal 64-bit keys) by file label, then row. The file label
    is the file name, or with ``sample_root`` the path relative to that folder (labels must be unique:
    files of the same name in different folders need ``sample_root``); for a .npy source, its metadata
    CSV. Nothing depends on batch_rows, the order of the files or how they are split among passes:
    :meth:`SpeciesStats.merge` of passes over disjoint files gives, bit for bit, the sample of one pass.
    *Exact with bounded memory* because the cap of the counts so far never increases as rows come: a
    stratum never needs more than the allocation of the counts so far, so the pass keeps at most
    2·sample + batch_rows candidates (trimmed whenever they pass 2·sample), each 4·D + 32 bytes plus its
    ``sample_columns`` values, and 32 bytes per stratum; at the end exactly the sample. sample_columns:
    item columns kept with the sample (e.g. ``uuid``, ``path``); where / covariate columns are kept too.
    Cost: the hashing and a per-batch sort of the rows that can still enter (measured in the notes).

    engine: ``"local"`` (this process) or ``"dask"``: the same pass distributed over a Dask cluster, one task
    per shard, equal to the local result (:func:`treeprobe.stream_dask.species_statistics_dask`; parquet only);
    scheduler: None (a 2-worker LocalCluster), a scheduler address, a ``distributed.Client`` or a cluster.
    """
    # --- engine hook (issue 14.4): every other argument goes to the dask engine as it is -----------------
    if engine != "local" or scheduler is not None:
        kw = {k: v for k, v in locals().items() if k not in ("source", "engine", "scheduler")}
        if engine != "dask":
            raise TreeprobeError(f"engine must be 'local' or 'dask'; got {engine!r}"
                                 + (" (scheduler= needs engine='dask')" if engine == "local" else ""))
        from treeprobe.stream_dask import species_statistics_dask
        return species_statistics_dask(source, scheduler=scheduler, **kw)
    # --- end of the engine hook ----------------------------------------------------------------------------
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
    sample_cols = _sample_settings(sample, sample_seed, sample_columns, sample_root, where_fold, covariate)

    def cols_for(schema_names, path):
        return _match_columns(schema_names, columns, where_fold, covariate, path, sample_cols or ())

    stats: SpeciesStats | None = None
    sampler: _Sample | None = None
    u2s: dict = {}  # unit of this pass -> stratum of the sample
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
                if sample is not None:
                    stats._sample = sampler = _Sample(int(sample), int(sample_seed), dim, sample_cols,
                                                      None if sample_root is None else os.fspath(sample_root))
                    for f in files if kind == "parquet" else []:  # labels checked before any work
                        sampler.file(f)
                    sampler.reserve(batch_rows)
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
            if sampler is not None:
                u, inv = np.unique(uid[ui], return_inverse=True)
                ids = np.array([u2s[x] if x in u2s else u2s.setdefault(x, sampler.stratum(stats._lin[x]))
                                for x in u.tolist()], dtype=np.int64)
                sampler.add(sampler.file(path), rows[ui], ids[inv.ravel()], X, ui, cols)
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
    if sampler is not None:
        sampler.finish()  # exactly the sample of these rows
    stats.n_rows = pending["n_rows"]
    stats.n_filtered = pending["n_filtered"]
    stats.n_skipped = skipped
    stats.skipped_examples = examples
    stats.files = tuple(files)
    stats.timings = dict(seconds=time.perf_counter() - t0, wait_read_seconds=waits[0])
    return stats


def _sample_settings(sample, seed, columns, root, where_fold, covariate) -> tuple | None:
    """The item columns a sample keeps (where / covariate / ``columns``, ranks excluded), after checks."""
    from treeprobe._validation import check_int

    if sample is None:
        if tuple(columns) or root is not None:
            raise TreeprobeError("sample_columns= / sample_root= need sample=SIZE")
        return None
    check_int(sample, "sample", minimum=1)
    check_int(seed, "sample_seed", minimum=None)
    if isinstance(columns, str):
        columns = [columns]
    cols = [c for c in list(where_fold) + ([covariate] if covariate else []) + list(columns) if c not in RANKS]
    bad = [c for c in cols if c in SAMPLE_ITEM_COLUMNS or c == "emb"]
    if bad:
        raise TreeprobeError(f"sample column {bad[0]!r} clashes with a column of the sample's items "
                             f"({', '.join(SAMPLE_ITEM_COLUMNS)}) or the embedding")
    if root is not None and not os.path.isdir(os.fspath(root)):
        raise TreeprobeError(f"sample_root {os.fspath(root)!r} is not a folder")
    return tuple(dict.fromkeys(cols))


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
                      progress: bool = False, n_jobs: int | None = None, strict: bool = True,
                      control: str | None = None, control_kind: str = "categorical") -> pd.DataFrame:
    """The table of :func:`treeprobe.tl.mantel` (rank taxonomy) from species statistics, same seeds.

    Seeds are drawn exactly as tl.mantel draws them (scheme × level × method, one each), so every row that
    the statistics can give equals tl.mantel's on the same rows, p-value included. From statistics:
    species-centroid level, every method and scheme (centroids and sizes suffice); image level, Pearson
    with species permuted (needs ``gram=True`` and contiguous species). Other rows (image-level Spearman,
    image permutations) come back with NaN, ``estimator`` = :data:`NOT_FROM_STATS` and their seed in
    ``details``: they need items (the sample). ``control``: the partial Mantel row of tl.mantel (its seed the
    next draw) by :func:`partial_mantel_from_stats`, for statistics read with ``covariate=control``;
    ``control_kind="numeric"`` (what tl.mantel does for a numeric column) cannot be done from statistics.
    ``strict=False``: a row the statistics cannot give (read without ``gram=True`` or ``covariate``, species
    whose rows are not contiguous, a numeric or incomplete covariate) comes back marked the same way, with the
    reason, instead of raising (seeds unchanged).
    """
    from treeprobe import mantel as M
    from treeprobe._utils import SEED_BOUND
    from treeprobe.tl import MANTEL_LEVELS, CENTROIDS_PERMUTED_FREELY, _mantel_row, _partial_row

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
                why = None
                if not stats.gram_enabled:
                    why = "the image-level species Mantel test needs species_statistics(..., gram=True)"
                elif not stats.within_exact:
                    why = (f"the rows of {stats.n_scattered} species are not contiguous in the files: "
                           "the image-level test needs each species' rows together (sort the shards "
                           "by taxonomy, as TreeOfLife-200M is) — the species-centroid level does not")
                if why is not None:
                    if strict:
                        raise TreeprobeError(why)
                    rows.append(_not_from_stats(level, scheme, method, kw["seed"], why))
                    continue
                G = stats.gram
                res = _species_pearson_from_sums(
                    clades, sizes, stats.sums, float(stats.sq.sum()), float(np.sum(G * G)), float(stats.within.sum()),
                    permutations=permutations, alternative="greater", rng=np.random.default_rng(kw["seed"]),
                    perm_dtype=np.float64, n_jobs=n_jobs, progress=progress)
                rows.append(_mantel_row(level, scheme, res))
    if control is not None:
        cseed = int(rng.integers(SEED_BOUND))
        try:
            if control_kind != "categorical":
                raise TreeprobeError(PARTIAL_NUMERIC)
            rows.append(_partial_row(control, partial_mantel_from_stats(
                stats, rank_lengths=rank_lengths, permutations=permutations, seed=cseed, name=control)))
        except TreeprobeError as err:
            if strict:
                raise
            rows.append(_not_from_stats(f"image | {control}", "", "pearson (partial)", cseed, str(err)))
            rows[-1]["details"]["control"] = control
    return pd.DataFrame(rows)


def partial_mantel_from_stats(stats: SpeciesStats, *, rank_lengths=None, permutation: str = "auto",
                              permutations: int = 999, alternative: str = "greater", seed: int | None = 0,
                              name: str | None = None):
    """:func:`treeprobe.partial_mantel.partial_mantel_tree` (between-species pairs, a categorical covariate)
    from species statistics read with ``gram=True, covariate=COLUMN``: the same
    :class:`~treeprobe.partial_mantel.PartialMantelResult`, r's to ~1e-12 and the same permutations (so the
    same p-value) as the in-memory test on the same rows.

    Every sum over between-species pairs comes from per-unit and per-(unit, category) statistics: with n_g, S_g
    the count and vector sum of category g and n_sg, S_sg those of species s in g, the pairs in the same category
    number Σ_g C(n_g, 2) − Σ_sg C(n_sg, 2), and their Σ x̂_i·x̂_j = (Σ_g ‖S_g‖² − Σ_sg ‖S_sg‖²)/2; Σ(x̂_i·x̂_j)² is
    the image-level test's (‖G‖²_F − Σ_s ‖G_s‖²_F)/2; what moves with the tree positions needs only each
    species' S_s and its counts per category. ``permutation``: "auto" / "species-within-covariate" (strata =
    counts in every category: exact) or "species" (counts only). A numeric covariate (sorted values per item)
    or items with no covariate value cannot be done from these statistics: TreeprobeError.
    """
    from treeprobe import partial_mantel as PM
    from treeprobe._validation import check_choice, check_int
    from treeprobe.mantel import _Units, _unit_tree_sums

    check_choice(permutation, "permutation scheme", ("auto", "species-within-covariate", "species"))
    check_choice(alternative, "alternative", PM.ALTERNATIVES)
    check_int(permutations, "permutations", minimum=0)
    if stats.covariate is None:
        raise TreeprobeError("the partial Mantel test needs species_statistics(..., covariate=COLUMN)")
    if name is not None and name != stats.covariate:
        raise TreeprobeError(f"these statistics were read with covariate={stats.covariate!r}, not {name!r}")
    name = stats.covariate
    if not stats.gram_enabled:
        raise TreeprobeError("the partial Mantel test needs species_statistics(..., gram=True)")
    if not stats.within_exact:
        raise TreeprobeError(f"the rows of {stats.n_scattered} species are not contiguous in the files: the "
                             "partial Mantel test needs each species' rows together (sort the shards by taxonomy)")
    units, cats, n_uc, S_uc, _ = stats.covariate_table()
    if (cats == "").any():
        raise TreeprobeError(f"{int(n_uc[cats == ''].sum())} item(s) have no {name!r} value: the partial Mantel "
                             "test needs the covariate of every item (filter them out with where=)")
    levels, g = np.unique(cats.astype(str), return_inverse=True)
    g = g.ravel()
    n = stats.counts
    Su = stats.sums
    N = int(n.sum())
    S_all = Su.sum(axis=0)
    H = np.zeros((len(n), len(levels)))
    np.add.at(H, (units, g), n_uc)
    S_g = np.zeros((len(levels), stats.dim))
    np.add.at(S_g, g, S_uc)
    n_g = H.sum(axis=0)
    G = stats.gram
    P = N * (N - 1) / 2.0 - float(np.sum(n * (n - 1.0))) / 2.0
    sum_c = (float(S_all @ S_all) - float(np.einsum("ij,ij->", Su, Su))) / 2.0
    sum_c2 = (float(np.sum(G * G)) - float(stats.within.sum())) / 2.0
    same = float(np.sum(n_g * (n_g - 1.0))) / 2.0 - float(np.sum(n_uc * (n_uc - 1.0))) / 2.0
    same_c = (float(np.einsum("ij,ij->", S_g, S_g)) - float(np.einsum("ij,ij->", S_uc, S_uc))) / 2.0
    sum_z = P - same
    clades = stats.clade_structure(rank_lengths)
    U = len(n)
    species = np.unique(clades.item_node, return_inverse=True)[1].ravel()
    if not np.array_equal(species, np.arange(U)):  # pragma: no cover - canonical order is node order
        raise TreeprobeError("internal error: the units of the statistics are not in tree-node order")
    comp, sum_t, sum_t2 = _unit_tree_sums(clades, _Units(codes=np.arange(U), sizes=n, node=clades.item_node,
                                                         strata=n), N)
    m = len(comp.parent)
    item_c = np.empty(U, dtype=np.int64)
    item_c[comp.order] = np.repeat(np.arange(m), comp.own)
    moving = PM._MovingSums(comp, item_c, Su, H, sum_t)
    if permutation == "auto":
        permutation = "species-within-covariate"
    strata = (np.unique(H.astype(np.int64), axis=0, return_inverse=True)[1].ravel()
              if permutation == "species-within-covariate" else n)
    res = PM._partial_test(np.array([P, sum_c, sum_c2, sum_z, sum_z, sum_c - same_c]), sum_t, sum_t2, moving,
                           strata, permutation=permutation, permutations=permutations, alternative=alternative,
                           seed=seed, name=name, kind="categorical", n_categories=len(levels), n_items=N,
                           n_species=U, pairs="between-species")
    res.details["source"] = "species statistics (streamed)"
    return res


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


# --- the whole intrinsic analysis of a streaming pass -------------------------------------------------------


def rank_summary_from_stats(stats: SpeciesStats) -> pd.DataFrame:
    """:meth:`Taxonomy.rank_summary <treeprobe.taxonomy.Taxonomy.rank_summary>` of all the rows the
    statistics used (n_taxa, n_singleton_taxa, n_placeholder_taxa, largest_taxon, n_unknown per rank): the
    taxonomy of the units with each unit weighted by its item count, equal to the in-memory table."""
    from treeprobe.taxonomy import SEP

    tax = Taxonomy.from_frame(stats.lineages, RANKS, unknown=stats.unknown, missing=stats.missing)
    w = stats.counts
    rows = []
    for r in tax.ranks:
        codes = tax.codes(r)
        taxa = tax.taxon_labels(r)
        on = codes >= 0
        counts = np.bincount(codes[on], weights=w[on], minlength=len(taxa)).astype(np.int64)
        placeholder = PLACEHOLDER.format(rank=r)
        n_ph = 0 if stats.unknown == "separate" else int(sum(str(t).rsplit(SEP, 1)[-1] == placeholder for t in taxa))
        rows.append(dict(rank=r, n_taxa=len(counts), n_singleton_taxa=int((counts == 1).sum()), n_placeholder_taxa=n_ph,
                         largest_taxon=int(counts.max()) if len(counts) else 0,
                         n_unknown=int(w[~tax.known(r)].sum())))
    return pd.DataFrame(rows)


#: Why the partial Mantel row (``control``) of a numeric covariate is not computed from statistics.
PARTIAL_NUMERIC = ("a numeric control needs every item's value (|z_i − z_j| over pairs): not computable from "
                   "species statistics; bin it into categories (e.g. pandas.qcut) for the exact categorical test")


def intrinsic_from_stats(stats: SpeciesStats, *, rank_lengths=None, seed: int = 0, permutations: int = 999,
                         mantel_methods: Sequence[str] = ("pearson", "spearman"), centroid_level: bool = True,
                         permute: Sequence[str] = ("species",), control: str | None = None,
                         cluster_methods: Sequence[str] = ("kmeans", "agglomerative"), chance_permutations: int = 20,
                         knn_k: int = 10, knn_max_queries: int | None = 100_000, maps: Sequence[str] = ("tsne", "umap"),
                         max_map_points: int | None = None, spearman_max_n: int | None = None, phylo: bool = False,
                         tree_method: str = "upgma", tree_levels: Sequence[str] = ("species", "genus"),
                         covariate: str | None = None, covariate_levels=None, species_covariates=None,
                         max_tree_leaves: int | None = TREE_MAX_LEAVES, progress: bool = True,
                         provenance: dict | None = None, n_jobs: int | None = None):
    """:func:`treeprobe.tl.intrinsic` of a streaming pass (``species_statistics(..., gram=True, sample=SIZE)``):
    returns the :class:`~treeprobe.report.Report`, nothing is written.

    **Exact over all rows** (from the statistics, same seeds as tl.intrinsic on all rows in memory): the
    Mantel table of :func:`mantel_from_stats` (image-level between-species Pearson with species permuted,
    the species-centroid level, and the partial Mantel row of a categorical ``control``, whose column the
    pass must have read as ``covariate=control``; image-level Spearman, image permutations and a numeric
    ``control`` come back marked :data:`NOT_FROM_STATS`), K_mult with
    ``phylo`` (:func:`physignal_from_stats`) and the taxa-per-rank table (:func:`rank_summary_from_stats`).
    **From the sample** (:meth:`SpeciesStats.sample_data`, with the same ``treeprobe.tl`` tools and
    arguments as tl.intrinsic): clustering, kNN agreement, the maps, the Mantel distance figure, and with
    ``phylo`` tree recovery, within-species variation (``covariate``) and covariate alignment
    (``species_covariates``); their columns must be in the sample (``sample_columns``). No user tree. Tree
    recovery needs S² memory for S leaves: with more than ``max_tree_leaves`` species-level leaves in the sample
    (at TreeOfLife-200M scale a 100K sample holds ~100K species) it runs on the items of a seeded uniform random
    subset of that many leaves (:func:`_tree_leaf_subset`; None: all), stated in ``params["leaf_subset"]``.
    ``provenance["stream"]`` gets the pass's counts, the sample's settings and which number came from where
    (entries given in ``provenance["stream"]`` — engine, pass time — are kept).
    """
    from treeprobe import tl
    from treeprobe._utils import DEFAULT_MAX_MAP_POINTS, MANTEL_FIGURE_PAIRS
    from treeprobe._validation import check_choice, check_int
    from treeprobe.clustering import METHODS as CLUSTER_METHODS
    from treeprobe.mantel import SPEARMAN_MAX_N
    from treeprobe.report import Report

    if not isinstance(stats, SpeciesStats):
        raise TreeprobeError(f"expected the SpeciesStats of species_statistics, got {type(stats).__name__}")
    if not stats.has_sample:
        raise TreeprobeError("the intrinsic report needs a sample for kNN, clustering and maps: "
                             "species_statistics(..., sample=SIZE)")
    max_map_points = DEFAULT_MAX_MAP_POINTS if max_map_points is None else max_map_points
    spearman_max_n = SPEARMAN_MAX_N if spearman_max_n is None else spearman_max_n
    ds = stats.sample_data()
    tl.check_analysable(ds)
    phylo = bool(phylo or covariate is not None or species_covariates is not None)
    if phylo:
        tree_levels = tl._check_phylo_options(ds, None, tree_method, tree_levels, covariate, covariate_levels,
                                              species_covariates)
    levels = ("image", "species-centroid") if centroid_level else ("image",)
    tl._check_mantel_options(ds, mantel_methods, levels, permute, control, permutations)
    for name in cluster_methods:
        check_choice(name, "clustering method", CLUSTER_METHODS)
    check_int(chance_permutations, "chance_permutations", minimum=0)
    check_int(knn_k, "knn_k", minimum=1)
    for name in maps:
        check_choice(name, "map", tl.MAPS)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    leaf_note = None

    def timed(key, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        timings[key] = time.perf_counter() - t
        return out

    control_kind = "categorical"
    if control is not None:
        zs = ds.items[control]
        if pd.api.types.is_numeric_dtype(zs.dtype) and not pd.api.types.is_bool_dtype(zs.dtype):
            control_kind = "numeric"  # as partial_mantel_tree(kind="auto") would take the column
    table = timed("mantel_s", mantel_from_stats, stats, methods=mantel_methods, levels=levels, permute=permute,
                  rank_lengths=rank_lengths, permutations=permutations, seed=seed, spearman_max_n=spearman_max_n,
                  progress=progress, n_jobs=n_jobs, strict=False, control=control, control_kind=control_kind)
    for col in ("permutations", "n_items", "n_pairs"):  # counts stay integers beside the rows not computed
        if col in table.columns:
            table[col] = pd.Series([None if pd.isna(v) else int(v) for v in table[col]], dtype=object)
    ds.uns["mantel"] = table
    ds.uns["mantel_tree"] = dict(kind="rank taxonomy (patristic, " + ("one unit per rank" if rank_lengths is None
                                                                      else f"rank lengths {rank_lengths}") + ")")
    ds.uns["mantel_pairs"] = tl._pair_sample(ds.unit, ds.taxonomy.clade_structure(rank_lengths),
                                             n_pairs=MANTEL_FIGURE_PAIRS, seed=seed)
    timed("clustering_s", tl.clustering, ds, methods=cluster_methods, seed=seed,
          chance_permutations=chance_permutations, progress=progress)
    timed("knn_s", tl.knn, ds, k=knn_k, max_queries=knn_max_queries, seed=seed)
    for name in maps:
        timed(f"{name}_s", {"tsne": tl.tsne, "umap": tl.umap}[name], ds, seed=seed, max_points=max_map_points)
    if phylo:
        res = timed("physignal_s", physignal_from_stats, stats, rank_lengths=rank_lengths, permutations=permutations,
                    seed=seed, progress=progress)
        ds.uns["physignal"] = {k: v for k, v in res.to_dict().items() if k != "per_axis"}
        ds.uns["physignal_axes"] = res.per_axis
        ds.uns["physignal_result"] = res
        ds_tree, leaf_note = _tree_leaf_subset(ds, max_tree_leaves, seed)
        res = timed("tree_recovery_s", tl.tree_recovery, ds_tree, method=tree_method, levels=tree_levels,
                    rank_lengths=rank_lengths, permutations=permutations, seed=seed)
        if leaf_note is not None:
            res.params["leaf_subset"] = leaf_note
            for key in ("tree_recovery", "tree_recovery_ranks", "tree_recovery_result"):
                ds.uns[key] = ds_tree.uns[key]
        timed("within_species_variation_s", tl.within_species_variation, ds, covariate=covariate,
              levels=covariate_levels, permutations=permutations, seed=seed)
        if species_covariates is not None:
            timed("covariate_alignment_s", tl.covariate_alignment, ds, covariates=species_covariates,
                  rank_lengths=rank_lengths, permutations=permutations, seed=seed, progress=progress)
    timings["total_analysis_s"] = time.perf_counter() - t0
    ds.uns["timings"] = timings
    summary = rank_summary_from_stats(stats)
    prov = dict(provenance or {})
    stream_prov = _stream_provenance(stats, table, maps=maps, phylo=phylo, covariate_alignment=species_covariates
                                     is not None)
    if phylo and leaf_note is not None:
        stream_prov["tree_leaf_subset"] = leaf_note
        stream_prov["from_sample"] = [f"tree recovery ({leaf_note['sentence']})" if x == "tree recovery" else x
                                      for x in stream_prov["from_sample"]]
    stream_prov.update(prov.get("stream") or {})
    prov.update(
        seed=seed, permutations=permutations, knn_k=ds.uns["knn_params"]["k"], knn_max_queries=knn_max_queries,
        n_items=stats.n_items, n_sampled=len(ds), embedding_dim=stats.dim,
        n_taxa=dict(zip(summary["rank"], summary["n_taxa"].astype(int).tolist())),
        taxonomy=dict(unknown=stats.unknown, missing=list(stats.missing)), tree=ds.uns["mantel_tree"],
        timings=timings, versions=tl.package_versions(), command=" ".join(sys.argv), stream=stream_prov)
    ds.uns["provenance"] = prov
    report = Report.from_data(ds)
    report.rank_summary = summary
    report.skipped = pd.DataFrame([dict(item=ex, reason=reason) for reason, exs in stats.skipped_examples.items()
                                   for ex in exs], columns=["item", "reason"])
    return report


def _tree_leaf_subset(ds, max_leaves: int | None, seed: int):
    """(TreeData, note): ``ds`` itself and None when it has at most ``max_leaves`` species-level leaves (the
    leaves of its rank tree: species, and items of unknown species), else the items of ``max_leaves`` leaves
    drawn uniformly without replacement by ``np.random.default_rng([seed, 14])`` and a JSON-ready note."""
    from treeprobe._validation import check_int

    if max_leaves is None:
        return ds, None
    check_int(max_leaves, "max_tree_leaves", minimum=3)
    leaf = np.unique(ds.taxonomy.clade_structure().item_node, return_inverse=True)[1].ravel()
    S = int(leaf.max()) + 1
    if S <= max_leaves:
        return ds, None
    chosen = np.zeros(S, dtype=bool)
    chosen[np.random.default_rng([seed, 14]).choice(S, max_leaves, replace=False)] = True
    keep = chosen[leaf]
    sentence = (f"tree recovery on the {int(keep.sum()):,} sampled items of {max_leaves:,} of the sample's {S:,} "
                f"species-level leaves, drawn uniformly at random (seed {seed}): a tree of all would need "
                f"{S * (S - 1) * 4 / 2**30:.1f} GiB of distances")
    return ds.subset(keep), dict(n_leaves=S, n_kept=max_leaves, n_items=int(keep.sum()), seed=seed,
                                 sentence=sentence)


def _stream_provenance(stats: SpeciesStats, mantel: pd.DataFrame, *, maps, phylo: bool,
                       covariate_alignment: bool) -> dict:
    """What a report of a streaming pass states: the pass's counts, the sample, which number came from where."""
    info = stats.sample_info
    exact_rows = mantel[mantel["estimator"] != NOT_FROM_STATS]
    missing = mantel[mantel["estimator"] == NOT_FROM_STATS]

    def row_name(r):
        return f"{r['level']} {r['method']}" + (f" ({r['scheme']} permuted)" if r["scheme"] else "")

    exact = [f"Mantel {row_name(r)}" for _, r in exact_rows.iterrows()]
    exact += (["K_mult (phylogenetic signal of the species centroids)"] if phylo else [])
    exact += ["taxa per rank", "item, species and skip counts"]
    from_sample = ["kNN agreement", "rank-wise clustering"]
    from_sample += [f"{'t-SNE' if m == 'tsne' else 'UMAP'} map" for m in maps]
    from_sample += ["the Mantel distance figure (pairs of sampled items)", "items.csv"]
    if phylo:
        from_sample += ["tree recovery", "within-species variation"] + (["covariate alignment"] if covariate_alignment
                                                                         else [])
    reasons = {}
    for _, r in missing.iterrows():
        why = (r.get("details") or {}).get("reason", "")
        reasons.setdefault(why, []).append(f"Mantel {row_name(r)}")
    s = stats.summary()
    rate = stats.n_rows / stats.timings["seconds"] if stats.timings.get("seconds") else None
    return dict(
        n_files=len(stats.files), files=[str(f) for f in stats.files[:3]] + (["..."] if len(stats.files) > 3 else []),
        n_rows=int(stats.n_rows), n_filtered_by_where=int(stats.n_filtered),
        n_set_aside=int(sum(stats.n_skipped.values())), n_set_aside_by_reason=dict(stats.n_skipped),
        n_items=int(stats.n_items), n_species=int(stats.n_units - s["n_single_item_units"]),
        n_units=int(stats.n_units), n_single_item_units=int(s["n_single_item_units"]), dim=int(stats.dim),
        gram=bool(stats.gram_enabled), within_exact=bool(stats.within_exact), n_scattered=int(stats.n_scattered),
        statistics_bytes=int(s["statistics_bytes"]),
        sample=dict(size=info["size"], n_sampled=info["n_sampled"], seed=info["seed"], rule=info["rule"],
                    cap=info["cap"], n_extra=info["n_extra"], n_strata=info["n_strata"],
                    n_strata_whole=info["n_strata_whole"], columns=info["columns"], file_labels=info["file_labels"]),
        exact=exact, from_sample=from_sample, not_computed=[dict(rows=v, reason=k) for k, v in reasons.items()],
        exact_sentence=info["exact"], from_sample_sentence=info["from_sample"],
        pass_seconds=float(stats.timings.get("seconds", float("nan"))),
        wait_read_seconds=float(stats.timings.get("wait_read_seconds", float("nan"))),
        rows_per_second=rate, engine="local")
