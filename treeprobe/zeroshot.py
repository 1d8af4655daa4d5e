"""Zero-shot classification per rank, from image and text embeddings given as arrays.

Inputs are arrays only (no model here): image embeddings (N, D), the text embeddings of the
candidate taxa of each rank (rank → (T_r, D), rows in the order of :attr:`ClassHierarchy.taxa`)
and the :class:`ClassHierarchy` of the candidate species. Both sides are L2-normalised; the logits
are ``logit_scale · cos`` (100 by default, as CLIP) and the probabilities their softmax over the
candidates. Three ways to name a taxon at rank r:

``flat``
    the best of all T_r taxa of rank r (top-1 and top-k).
``top_down``
    the best kingdom, then the best phylum among the children of the chosen kingdom, ... down to
    species (top-1 only). A wrong early choice makes every lower rank wrong.
``species_summed`` (as pybioclip)
    softmax over the species; the probability of a taxon of rank r is the sum of its species'
    probabilities (top-1 and top-k per rank).

**Unknown ranks** (the lineage table has a gap, e.g. a genus whose family is unknown) are read as in
``Taxonomy(unknown="separate")``: an unknown is in no taxon, two unknowns are never one taxon. A
taxon hangs from its *nearest known ancestor* (:attr:`ClassHierarchy.anchor_rank` / ``anchor``).
In ``top_down`` the candidates at rank r are the taxa whose nearest known ancestor is the one chosen
at that ancestor's rank (so a genus of unknown family competes with the genera of the family chosen
under the same order); when no candidate is left the prediction is −1 (counted as wrong). In
``species_summed`` a species unknown at rank r adds to no taxon of rank r. Images whose true
species is unknown at rank r are left out of that rank's accuracy (``n_items``).

**Top-k**: an image counts as a top-k hit at rank r when fewer than k candidates score strictly
higher than its true taxon (exact ties favour the truth); the top-1 prediction is the arg-max.

**Intervals** resample species, each with all its images (the images of one species are not
independent draws): ``n_boot`` seeded replicates, percentile interval (:func:`species_bootstrap_ratio`).

**Cost.** Images are processed in blocks of ``block_size`` rows: one float32 product per block with the
text rows of every rank the modes need stacked (``T_all @ X_b.T``, (W, b): a row per candidate, a column
per image), then compiled passes over it (:mod:`treeprobe._zeroshot_kernels`: arg-max / in-top-k per rank,
species top-k, top-down choice, the species-summed sums rank by rank), vectorised across the block's
images; no other (W, b) array than the logits and, for ``species_summed``, the species probabilities.
100K images × 10K species stream in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe import _zeroshot_kernels as _kern
from treeprobe._utils import RANKS, row_norms
from treeprobe._validation import check_choice, check_embeddings, check_int
from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import MISSING_TOKENS, Taxonomy

__all__ = ["MODES", "RESULT_COLUMNS", "DEFAULT_BLOCK_ELEMENTS", "ClassHierarchy", "ZeroShotResult", "zeroshot",
           "species_bootstrap_ratio"]

#: Ways to name a taxon (module docstring).
MODES = ("flat", "top_down", "species_summed")
#: Columns of :attr:`ZeroShotResult.table`.
RESULT_COLUMNS = ("rank", "mode", "n_items", "n_taxa", "top1", "top1_lo", "top1_hi", "topk", "topk_lo", "topk_hi",
                  "k", "chance_top1", "chance_topk", "majority")
#: Largest (block, T) logit matrix, in elements, when ``block_size`` is not given (2**22 float32 = 16 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ClassHierarchy:
    """The candidate taxa of each rank and how they nest.

    ``taxa[r]``: object (T_r,), cumulative labels (``Animalia|Chordata|...``) sorted, as the codes
    of :class:`~treeprobe.taxonomy.Taxonomy`; the text embeddings of rank r follow this order.
    ``parent[r]``: int64 (T_r,), code of each taxon's parent at the rank above (−1 for the top rank
    or where that rank is unknown). ``anchor_rank[r]`` / ``anchor[r]``: int64 (T_r,), rank index and
    code of the nearest *known* ancestor (−1 / −1 for the top rank). ``species_ancestors``: int64
    (S, R), code of each species' taxon at each rank (−1 unknown; the last column is 0..S−1).
    Build with :meth:`from_lineages`.
    """

    ranks: tuple
    taxa: dict
    parent: dict
    anchor_rank: dict
    anchor: dict
    species_ancestors: np.ndarray = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_lineages(cls, table: pd.DataFrame, *, ranks: Sequence[str] = RANKS,
                      missing: Iterable[str] = MISSING_TOKENS) -> "ClassHierarchy":
        """Hierarchy of the candidate species in ``table`` (one row per species; repeated rows are one
        species). Every row needs a known top rank and a known last rank (a species name); missing
        names in between are unknown ranks (module docstring). Raises :class:`TreeprobeError`.

        >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["g", "h", "g"],
        ...                    "species": ["g x", "h y", "g z"]})
        >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "genus", "species"))
        >>> h.taxa["genus"].tolist(), h.parent["genus"].tolist(), h.n_species
        (['A|g', 'A|h', 'B|g'], [0, 0, 1], 3)
        """
        ranks = tuple(ranks)
        if len(table) == 0:
            raise TreeprobeError("no candidate species: the lineage table is empty")
        tax = Taxonomy.from_frame(table, ranks, unknown="separate", missing=missing)
        last = ranks[-1]
        no_species = ~tax.known(last)
        if no_species.any():
            raise TreeprobeError(f"{int(no_species.sum())} candidate row(s) have no {last}: every candidate needs a "
                                 f"{last} name (drop those rows)")
        sp = tax.codes(last)
        first_row = np.full(tax.n_taxa(last), -1, dtype=np.int64)
        first_row[sp[::-1]] = np.arange(len(sp))[::-1]  # first row of each species
        anc = np.stack([tax.codes(r)[first_row] for r in ranks], axis=1).astype(np.int64)
        taxa, parent, anchor_rank, anchor = {}, {}, {}, {}
        for k, r in enumerate(ranks):
            n = tax.n_taxa(r)
            taxa[r] = np.asarray(tax.taxon_labels(r), dtype=object)
            have = anc[:, k] >= 0
            rep = np.full(n, -1, dtype=np.int64)  # one species of each taxon
            rep[anc[have, k]] = np.flatnonzero(have)
            parent[r] = anc[rep, k - 1] if k > 0 else np.full(n, -1, dtype=np.int64)
            a_rank = np.full(n, -1, dtype=np.int64)
            a_code = np.full(n, -1, dtype=np.int64)
            for j in range(k):  # deepest known ancestor wins: later j overwrite
                code = anc[rep, j]
                a_rank = np.where(code >= 0, j, a_rank)
                a_code = np.where(code >= 0, code, a_code)
            anchor_rank[r], anchor[r] = a_rank, a_code
        return cls(ranks, taxa, parent, anchor_rank, anchor, anc)

    @property
    def n_species(self) -> int:
        """Number of candidate species S."""
        return int(self.species_ancestors.shape[0])

    def n_taxa(self, rank: str) -> int:
        """Number of candidate taxa T_r at ``rank``."""
        return len(self.taxa[self._check(rank)])

    def species_per_taxon(self, rank: str) -> np.ndarray:
        """int64 (T_r,): candidate species in each taxon of ``rank``."""
        col = self.species_ancestors[:, self.ranks.index(self._check(rank))]
        return np.bincount(col[col >= 0], minlength=self.n_taxa(rank)).astype(np.int64)

    def species_index(self, table: pd.DataFrame, *, missing: Iterable[str] = MISSING_TOKENS) -> np.ndarray:
        """int64 (len(table),): the candidate species of each row of ``table`` (same cumulative label),
        −1 where the row's species is unknown or not a candidate.

        >>> df = pd.DataFrame({"kingdom": ["A", "A"], "species": ["x", "y"]})
        >>> h = ClassHierarchy.from_lineages(df.iloc[:1], ranks=("kingdom", "species"))
        >>> h.species_index(df).tolist()
        [0, -1]
        """
        tax = Taxonomy.from_frame(table, self.ranks, unknown="separate", missing=missing)
        lookup = {lab: i for i, lab in enumerate(self.taxa[self.ranks[-1]])}
        return np.array([lookup.get(lab, -1) if lab else -1 for lab in tax.labels(self.ranks[-1])], dtype=np.int64)

    def _children(self, rank: str) -> list:
        """Top-down candidate tables of ``rank`` (not the top rank): a list of (a, table) with ``table``
        int64 (T_a + 1, c), row u = the taxa of ``rank`` whose nearest known ancestor is taxon u of rank
        a, padded with −1; the last row (u = −1) is all −1."""
        key = ("children", rank)
        if key not in self._cache:
            out = []
            a_rank, a_code = self.anchor_rank[rank], self.anchor[rank]
            for a in np.unique(a_rank):
                taxa = np.flatnonzero(a_rank == a)
                n_a = self.n_taxa(self.ranks[a])
                counts = np.bincount(a_code[taxa], minlength=n_a)
                table = np.full((n_a + 1, max(int(counts.max()), 1)), -1, dtype=np.int64)
                order = taxa[np.argsort(a_code[taxa], kind="stable")]
                slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
                table[a_code[order], slot] = order
                out.append((int(a), table))
            self._cache[key] = out
        return self._cache[key]

    def _top_down_plan(self) -> tuple:
        """The candidate tables of :meth:`_children` as flat arrays for
        :func:`~treeprobe._zeroshot_kernels.top_down_rows`: (first_group (R+1,), group_rank, group_ptr0,
        ptr, child), all int64."""
        if "top_down" not in self._cache:
            first, g_rank, g_ptr0, ptrs, childs = [0, 0], [], [], [], []
            n_ptr = n_child = 0
            for r in self.ranks[1:]:
                for a, table in self._children(r):
                    rows = table[:-1]
                    ok = rows >= 0
                    g_rank.append(a)
                    g_ptr0.append(n_ptr)
                    ptrs.append(n_child + np.concatenate([[0], np.cumsum(ok.sum(axis=1))]))
                    childs.append(rows[ok])  # row-major: each anchor's children in increasing code
                    n_ptr += len(rows) + 1
                    n_child += int(ok.sum())
                first.append(len(g_rank))
            as64 = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
            self._cache["top_down"] = (np.asarray(first, np.int64), np.asarray(g_rank, np.int64),
                                       np.asarray(g_ptr0, np.int64), as64(ptrs), as64(childs))
        return self._cache["top_down"]

    def _summing_plan(self) -> list:
        """Species-summed probabilities, rank by rank upwards: a list of (j, child_runs, unknown_runs) for
        j = R−2 … 0, each runs triple (run_ptr, run_start, run_stop) as
        :func:`~treeprobe._zeroshot_kernels.sum_runs` takes it: P_j[u] = Σ of P_{j+1} over the children of
        u (taxa of rank j+1 whose parent is u) + Σ of the species probabilities over the species known at
        j as u but unknown at j+1 (so every species known at j counts once at j; ``unknown_runs`` is None
        when there is no such species)."""
        if "plan" not in self._cache:
            A, plan = self.species_ancestors, []
            for j in range(len(self.ranks) - 2, -1, -1):
                n_j = self.n_taxa(self.ranks[j])
                unk_code = np.where((A[:, j] >= 0) & (A[:, j + 1] < 0), A[:, j], -1)
                plan.append((j, _runs(self.parent[self.ranks[j + 1]], n_j),
                             _runs(unk_code, n_j) if (unk_code >= 0).any() else None))
            self._cache["plan"] = plan
        return self._cache["plan"]

    def _check(self, rank: str) -> str:
        if rank not in self.taxa:
            raise TreeprobeError(f"unknown rank {rank!r}; ranks are {', '.join(self.ranks)}")
        return rank


def _runs(group: np.ndarray, n_groups: int) -> tuple:
    """Items 0..n−1 of each group as runs of consecutive indices: (run_ptr (n_groups+1,), run_start, run_stop),
    int64; ``group`` int (n,), −1 = in no group. Group u's runs are run_ptr[u] … run_ptr[u+1]−1, in
    increasing index order.

    >>> [a.tolist() for a in _runs(np.array([1, 1, -1, 0, 1]), 2)]
    [[0, 1, 3], [3, 0, 4], [4, 2, 5]]
    """
    group = np.asarray(group, dtype=np.int64)
    items = np.flatnonzero(group >= 0)
    items = items[np.argsort(group[items], kind="stable")]
    g = group[items]
    new = np.ones(len(items), dtype=bool)
    new[1:] = (g[1:] != g[:-1]) | (items[1:] != items[:-1] + 1)
    first = np.flatnonzero(new)
    run_start = items[first]
    run_stop = np.append(items[first[1:] - 1], items[-1:]) + 1 if len(items) else np.zeros(0, np.int64)
    run_ptr = np.searchsorted(g[first], np.arange(n_groups + 1), side="left").astype(np.int64)
    return run_ptr, run_start.astype(np.int64), run_stop.astype(np.int64)


@dataclass
class ZeroShotResult:
    """Output of :func:`zeroshot`.

    ``table``: one row per (rank, mode), columns :data:`RESULT_COLUMNS` (accuracies are fractions
    of ``n_items``; ``*_lo``/``*_hi`` the species-bootstrap interval; ``topk`` NaN for ``top_down``).
    ``predictions``: mode → int64 (N, R), top-1 taxon code per image and rank (−1: no prediction).
    ``species_topk``: int64 (N, k), the k best species per image, best first (for
    :func:`treeprobe.mistakes.hdist_at_k`; None when species were not scored).
    ``true_codes``: int64 (N, R), the true codes (−1 unknown).
    """

    table: pd.DataFrame
    predictions: dict
    species_topk: np.ndarray
    true_codes: np.ndarray
    ranks: tuple


def species_bootstrap_ratio(groups, numerators, denominators, *, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ratios Σ num / Σ den when whole groups (species) are resampled.

    ``groups``: int (N,) group of each item; ``numerators``, ``denominators``: (N,) or (N, m) per-item
    values (m statistics share the same draws). Each of ``n_boot`` replicates draws as many groups as
    there are, with replacement (seeded), and takes every item of each drawn group. Returns
    (lo, hi), each float64 (m,) (or scalars for 1-D input); NaN where every replicate has Σ den = 0.

    >>> g = np.repeat(np.arange(50), 4); num = (g % 2 == 0).astype(float)
    >>> lo, hi = species_bootstrap_ratio(g, num, np.ones(200), n_boot=500, seed=1)
    >>> bool(lo < 0.5 < hi)
    True
    """
    n_boot = check_int(n_boot, "n_boot")
    if not 0 < level < 1:
        raise TreeprobeError(f"level must be in (0, 1); got {level}")
    groups = np.asarray(groups)
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    one = num.ndim == 1
    num, den = num.reshape(len(num), -1), den.reshape(len(den), -1)
    if groups.ndim != 1 or num.shape[0] != len(groups) or den.shape != num.shape:
        raise TreeprobeError(f"groups {groups.shape}, numerators {num.shape} and denominators {den.shape} disagree")
    if len(groups) == 0:
        raise TreeprobeError("no items to resample")
    _, g = np.unique(groups, return_inverse=True)
    G = int(g.max()) + 1
    num_g = np.zeros((G, num.shape[1]))
    den_g = np.zeros((G, num.shape[1]))
    np.add.at(num_g, g, num)
    np.add.at(den_g, g, den)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, G, size=(n_boot, G))
    weights = np.bincount((draws + G * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * G)
    weights = weights.reshape(n_boot, G).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (weights @ num_g) / (weights @ den_g)
    alpha = (1 - level) / 2
    ok = np.isfinite(ratio).any(axis=0)
    lo = np.full(num.shape[1], np.nan)
    hi = np.full(num.shape[1], np.nan)
    if ok.any():
        lo[ok] = np.nanquantile(ratio[:, ok], alpha, axis=0)
        hi[ok] = np.nanquantile(ratio[:, ok], 1 - alpha, axis=0)
    return (float(lo[0]), float(hi[0])) if one else (lo, hi)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """int64 (b, k): column indices of the k largest scores per row, best first, exact ties in column
    order (k is capped at the number of columns)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    _kern.topk_cols(np.ascontiguousarray(scores.T), k, out, np.empty(scores.shape[0], dtype=scores.dtype))
    return out


def _softmax_cols(LT: np.ndarray, col_max: np.ndarray) -> np.ndarray:
    """Softmax over the rows of float32 logits (T, b), per column, *up to a positive factor per column*
    (a new array; the ranking of summed probabilities needs no normalisation); ``col_max`` (b,) the
    column maxima. Logits more than 80 below the column's best are raised to best − 80 (probability ratio
    e^-80 ≈ 2e-35): that keeps exp out of the float32 subnormals, which are ~10x slower, and changes no
    normalised probability by more than 2e-35."""
    P = np.empty_like(LT)
    _kern.shifted_clipped(LT, col_max, np.float32(-80.0), P)
    np.exp(P, out=P)
    return P


_ZERO = np.zeros(1, dtype=np.int64)


def _check_inputs(images, text_embeddings, hierarchy, truth, modes):
    if not isinstance(hierarchy, ClassHierarchy):
        raise TreeprobeError("hierarchy must be a ClassHierarchy (ClassHierarchy.from_lineages)")
    X = check_embeddings(images, "image embeddings")
    if X.shape[0] == 0:
        raise TreeprobeError("no images")
    if not isinstance(text_embeddings, Mapping):
        raise TreeprobeError("text_embeddings must be a mapping rank -> array (T_r, D)")
    unknown = set(text_embeddings) - set(hierarchy.ranks)
    if unknown:
        raise TreeprobeError(f"text_embeddings has unknown rank(s): {sorted(unknown)}")
    need = set()
    if "top_down" in modes:
        need |= set(hierarchy.ranks)
    if "species_summed" in modes:
        need.add(hierarchy.ranks[-1])
    if "flat" in modes and not text_embeddings:
        raise TreeprobeError("flat mode needs text embeddings of at least one rank")
    absent = [r for r in hierarchy.ranks if r in need and r not in text_embeddings]
    if absent:
        raise TreeprobeError(f"text embeddings missing for rank(s) {', '.join(absent)} (needed by {', '.join(modes)})")
    text = {}
    for r in hierarchy.ranks:
        if r not in text_embeddings:
            continue
        T = check_embeddings(text_embeddings[r], f"text embeddings of {r}")
        if T.shape[0] == 0:
            raise TreeprobeError(f"empty candidate set: no text embeddings for rank {r}")
        if T.shape[0] != hierarchy.n_taxa(r):
            raise TreeprobeError(f"text embeddings of {r} have {T.shape[0]} rows; the hierarchy has "
                                 f"{hierarchy.n_taxa(r)} {r} taxa")
        if T.shape[1] != X.shape[1]:
            raise TreeprobeError(f"text embeddings of {r} have dimension {T.shape[1]}; images have {X.shape[1]}")
        T = T.astype(np.float32)
        finite, norms = row_norms(T)
        if not finite.all() or (norms == 0).any():
            raise TreeprobeError(f"text embeddings of {r} contain NaN/infinite values or zero rows")
        text[r] = T / norms[:, None].astype(np.float32)
    truth = np.asarray(truth)
    if truth.shape != (X.shape[0],) or not np.issubdtype(truth.dtype, np.integer):
        raise TreeprobeError(f"truth must be integer species indices of shape ({X.shape[0]},); got "
                             f"{truth.dtype} {truth.shape}")
    if ((truth < 0) | (truth >= hierarchy.n_species)).any():
        raise TreeprobeError(f"truth has species indices outside 0..{hierarchy.n_species - 1} (drop images whose "
                             "species is not a candidate)")
    norms = np.empty(X.shape[0], dtype=np.float64)
    finite = np.empty(X.shape[0], dtype=np.bool_)
    _kern.row_norms_finite(X if X.flags.c_contiguous else np.ascontiguousarray(X), norms, finite)
    if not finite.all():
        raise TreeprobeError(f"image embeddings contain NaN or infinite values ({int((~finite).sum())} rows)")
    if (norms == 0).any():
        raise TreeprobeError(f"{int((norms == 0).sum())} image embedding rows are all zeros")
    return X, text, truth.astype(np.int64), norms


def zeroshot(images, text_embeddings: Mapping[str, np.ndarray], hierarchy: ClassHierarchy, *, truth,
             modes: Sequence[str] = MODES, logit_scale: float = 100.0, k: int = 5, block_size: int | None = None,
             n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> ZeroShotResult:
    """Zero-shot accuracy per rank and mode (module docstring), with species-bootstrap intervals.

    ``images``: (N, D); ``text_embeddings``: rank → (T_r, D) in the order of ``hierarchy.taxa[rank]``
    (``flat`` uses the ranks given, ``top_down`` needs all, ``species_summed`` the last);
    ``truth``: int (N,) true species (index into ``hierarchy.taxa[last rank]``). ``logit_scale``
    multiplies the cosines before the softmax. ``block_size``: images per block (default: blocks of
    at most :data:`DEFAULT_BLOCK_ELEMENTS` logits). Chance: ``chance_top1`` = 1/T_r and
    ``chance_topk`` = min(k, T_r)/T_r (uniform guessing among the rank's candidates); for
    ``species_summed`` above the species rank, where random species scores sum to more for taxa of many
    species, ``chance_top1`` = the mean share S_c/S of the candidate species in the image's true taxon
    (measured against random text in analyses/NULL_CALIBRATION.md run 12) and ``chance_topk`` is not
    given (NaN). ``majority`` = share of the most frequent true taxon. Returns a :class:`ZeroShotResult`.

    >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "species": ["x", "y", "z"]})
    >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "species"))
    >>> E = np.eye(3, dtype=np.float32)
    >>> text = {"kingdom": np.array([[1, 1, 0], [0, 0, 1]], np.float32), "species": E}
    >>> res = zeroshot(E, text, h, truth=np.arange(3), k=2, n_boot=10)
    >>> res.table[["rank", "mode", "top1", "chance_top1"]].values.tolist()[:2]
    [['kingdom', 'flat', 1.0, 0.5], ['species', 'flat', 1.0, 0.3333333333333333]]
    """
    modes = tuple(dict.fromkeys(check_choice(m, "zero-shot mode", MODES) for m in modes))
    if not modes:
        raise TreeprobeError("no zero-shot mode chosen")
    k = check_int(k, "k")
    if not np.isfinite(logit_scale) or logit_scale <= 0:
        raise TreeprobeError(f"logit_scale must be finite and > 0; got {logit_scale}")
    X, text, truth, norms = _check_inputs(images, text_embeddings, hierarchy, truth, modes)
    ranks = hierarchy.ranks
    R, N, S = len(ranks), X.shape[0], hierarchy.n_species
    scale = float(logit_scale)
    true_codes = hierarchy.species_ancestors[truth]  # (N, R)

    flat_ranks = [r for r in ranks if r in text] if "flat" in modes else []
    last = ranks[-1]
    has_species = last in flat_ranks or "species_summed" in modes
    # one product per block with the text of every rank a mode needs, side by side (one BLAS call)
    prod_ranks = [r for r in ranks if r in flat_ranks or "top_down" in modes or (r == last and has_species)]
    offsets = np.concatenate([[0], np.cumsum([text[r].shape[0] for r in prod_ranks])]).astype(np.int64)
    col = {r: (int(offsets[q]), int(offsets[q + 1])) for q, r in enumerate(prod_ranks)}
    T_all = np.concatenate([text[r] for r in prod_ranks]) if len(prod_ranks) > 1 else text[prod_ranks[0]]
    if block_size is None:
        block_size = max(1, DEFAULT_BLOCK_ELEMENTS // T_all.shape[0])
    block_size = check_int(block_size, "block_size")
    pred = {m: np.full((N, R), -1, dtype=np.int64) for m in modes}
    hit_k = {m: np.zeros((N, R), dtype=bool) for m in modes if m != "top_down"}
    k_s = min(k, S)
    species_topk = np.zeros((N, k_s), dtype=np.int64) if has_species else None
    seg = [j for j, r in enumerate(ranks) if r in flat_ranks and r != last]  # flat ranks above species
    seg_starts = np.array([col[ranks[j]][0] for j in seg], dtype=np.int64)
    seg_stops = np.array([col[ranks[j]][1] for j in seg], dtype=np.int64)
    if "top_down" in modes:
        td_plan = hierarchy._top_down_plan()
    if "species_summed" in modes and R > 1:
        sum_plan = hierarchy._summing_plan()

    for start in range(0, N, block_size):
        stop = min(start + block_size, N)
        rows = slice(start, stop)
        b = stop - start
        Xb = X[rows].astype(np.float32) * (scale / norms[rows, None]).astype(np.float32)  # scaled unit rows
        tb = true_codes[rows]
        LT = T_all @ Xb.T  # float32 (W, b): logit_scale * cosine, a row per candidate of every needed rank
        if seg:  # flat above species: one pass over each rank's rows
            p_out = np.empty((b, len(seg)), dtype=np.int64)
            h_out = np.empty((b, len(seg)), dtype=np.bool_)
            _kern.segment_argmax_hits(LT, seg_starts, seg_stops, np.ascontiguousarray(tb[:, seg]), k, p_out, h_out)
            pred["flat"][rows, seg] = p_out
            hit_k["flat"][rows, seg] = h_out
        if has_species:
            Ls = LT[col[last][0]:col[last][1]]  # (S, b), contiguous
            top = np.empty((b, k_s), dtype=np.int64)
            row_max = np.empty(b, dtype=np.float32)
            _kern.topk_cols(Ls, k_s, top, row_max)  # row_max: the softmax's shift
            species_topk[rows] = top
            species_hit = (top == tb[:, R - 1, None]).any(axis=1)
            for m in ("flat", "species_summed"):  # the softmax keeps the order of the logits
                if m in modes and (m != "flat" or last in flat_ranks):
                    pred[m][rows, R - 1] = top[:, 0]
                    hit_k[m][rows, R - 1] = species_hit
        if "top_down" in modes:
            chosen = np.empty((b, R), dtype=np.int64)
            _kern.top_down_cols(LT, offsets, *td_plan, chosen)
            pred["top_down"][rows] = chosen
        if "species_summed" in modes and R > 1:
            P = _softmax_cols(Ls, row_max)
            below = P
            p_out = np.empty((b, 1), dtype=np.int64)
            h_out = np.empty((b, 1), dtype=np.bool_)
            for j, child_runs, unknown_runs in sum_plan:
                Pj = np.empty((hierarchy.n_taxa(ranks[j]), b), dtype=np.float32)
                _kern.sum_runs(below, *child_runs, Pj, False)
                if unknown_runs is not None:
                    _kern.sum_runs(P, *unknown_runs, Pj, True)
                _kern.segment_argmax_hits(Pj, _ZERO, np.array([len(Pj)], np.int64),
                                          np.ascontiguousarray(tb[:, j:j + 1]), k, p_out, h_out)
                pred["species_summed"][rows, j] = p_out[:, 0]
                hit_k["species_summed"][rows, j] = h_out[:, 0]
                below = Pj

    # --- table: accuracies, species-bootstrap intervals, chance ------------------------------
    known = true_codes >= 0
    entries, nums = [], []
    for m in modes:
        hit1 = pred[m] == true_codes
        for j, r in enumerate(ranks):
            if m == "flat" and r not in flat_ranks:
                continue
            entries.append((m, j))
            nums.append(hit1[:, j] & known[:, j])
            nums.append((hit_k[m][:, j] & known[:, j]) if m in hit_k else np.zeros(N, dtype=bool))
    num = np.stack(nums, axis=1).astype(float)
    den = np.repeat(known[:, [j for _, j in entries]], 2, axis=1).astype(float)
    lo, hi = species_bootstrap_ratio(truth, num, den, n_boot=n_boot, seed=seed, level=level)
    rows_out = []
    for e, (m, j) in enumerate(entries):
        r = ranks[j]
        n_known = int(known[:, j].sum())
        T = hierarchy.n_taxa(r)
        codes = true_codes[known[:, j], j]
        majority = float(np.bincount(codes).max() / n_known) if n_known else np.nan
        chance1, chancek = 1.0 / T, (min(k, T) / T) if m != "top_down" else np.nan
        if m == "species_summed" and j < R - 1:  # random species scores favour taxa with many species
            chance1 = float(np.mean(hierarchy.species_per_taxon(r)[codes])) / S if n_known else np.nan
            chancek = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            top1 = num[:, 2 * e].sum() / n_known if n_known else np.nan
            topk = num[:, 2 * e + 1].sum() / n_known if (n_known and m != "top_down") else np.nan
        rows_out.append(dict(rank=r, mode=m, n_items=n_known, n_taxa=T, top1=float(top1), top1_lo=lo[2 * e],
                             top1_hi=hi[2 * e], topk=float(topk),
                             topk_lo=lo[2 * e + 1] if m != "top_down" else np.nan,
                             topk_hi=hi[2 * e + 1] if m != "top_down" else np.nan, k=min(k, T),
                             chance_top1=chance1, chance_topk=chancek, majority=majority))
    table = pd.DataFrame(rows_out, columns=list(RESULT_COLUMNS))
    return ZeroShotResult(table=table, predictions=pred, species_topk=species_topk, true_codes=true_codes,
                          ranks=ranks)
