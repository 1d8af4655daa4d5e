"""Model comparison on one taxonomy, BioCLIP-paper style: drill-down t-SNE maps and distance profiles.

Pure computation (arrays in, arrays / DataFrames out); the figures are drawn by
:mod:`treeprobe.compare_plots`.

* :func:`drilldown_subsets` — the nested subsets of the drill-down figure: the phylum column
  shows the items of the largest kingdom, the class column those of the largest phylum *of that
  kingdom*, and so on down to species.
* :func:`drilldown_tsne` — one openTSNE map per (model, column), the same seed, perplexity and
  rows for every model, as a long table that can be stored in a report's JSON and redrawn.
* :func:`distance_profile` — mean cosine distance of item pairs by the rank of their lowest
  common ancestor (same species, same genus but different species, ..., different kingdoms),
  computed exactly from nested sums of unit vectors (no N x N matrix), with a species-level
  bootstrap interval.

Lineages come as ``codes_by_rank`` (an ordered mapping rank -> int codes (N,), top rank first, −1
= unknown, as :meth:`treeprobe.taxonomy.Taxonomy.codes_by_rank` gives), or a
:class:`~treeprobe.taxonomy.Taxonomy` / :class:`~treeprobe.core.TreeData` (whose cumulative labels
are then used too). **An item unknown at a rank is in no taxon there**: it never forms, nor joins,
a taxon at that rank.
"""

from __future__ import annotations

import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError

__all__ = ["DrilldownSubset", "drilldown_subsets", "drilldown_tsne", "distance_profile",
           "DEFAULT_DRILLDOWN_POINTS", "ROOT"]

#: At most this many items per drill-down column are mapped (a seeded subset of a larger column,
#: the same rows for every model).
DEFAULT_DRILLDOWN_POINTS = 5_000
#: ``lca_rank`` of pairs that share no taxon at all (different kingdoms) in :func:`distance_profile`.
ROOT = "root"
_TSNE_MIN_POINTS = 5  # as treeprobe.embedding_maps: fewer points cannot be mapped


class DrilldownSubset(NamedTuple):
    """One column of the drill-down: the items (``rows``, sorted int64) of the largest taxon
    ``parent_code`` at ``parent_rank``, to be coloured by their taxa at ``rank``."""

    rank: str
    parent_rank: str
    parent_code: int
    rows: np.ndarray


def _lineage(codes_by_rank, labels_by_rank=None):
    """(ordered dict rank -> int64 codes (N,), dict rank -> labels (N,) or None) from a mapping,
    a Taxonomy or a TreeData."""
    tax = getattr(codes_by_rank, "taxonomy", None)  # a TreeData
    if tax is None and hasattr(codes_by_rank, "codes_by_rank"):
        tax = codes_by_rank
    if tax is not None:
        codes = tax.codes_by_rank()
        if labels_by_rank is None:
            labels_by_rank = tax.labels_by_rank()
    else:
        codes = codes_by_rank
    if not isinstance(codes, Mapping) or not codes:
        raise TreeprobeError("codes_by_rank must be a non-empty mapping rank -> codes (N,), a Taxonomy or a TreeData")
    out = {r: np.asarray(c) for r, c in codes.items()}
    n = {c.shape for c in out.values()}
    if len(n) != 1 or len(next(iter(n))) != 1:
        raise TreeprobeError(f"codes_by_rank: every rank needs a 1-D code array of one length; got shapes {sorted(n)}")
    for r, c in out.items():
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise TreeprobeError(f"codes for rank {r!r} must be integers (−1 = unknown); got {c.dtype}")
        out[r] = c.astype(np.int64, copy=False)
    if labels_by_rank is not None:
        labels_by_rank = {r: np.asarray(v, dtype=object) for r, v in labels_by_rank.items()}
    return out, labels_by_rank


def _largest(codes: np.ndarray) -> int | None:
    """The most frequent known code (ties: the smallest code), or None when all are unknown."""
    known = codes[codes >= 0]
    if known.size == 0:
        return None
    values, counts = np.unique(known, return_counts=True)  # values ascending: argmax takes the smallest tie
    return int(values[np.argmax(counts)])


def drilldown_subsets(codes_by_rank, ranks: Sequence[str] = RANKS[1:]) -> list[DrilldownSubset]:
    """The nested item subsets of a BioCLIP-style drill-down, one per column rank in ``ranks``.

    Walking down the ranks of ``codes_by_rank`` (top first), the subset is narrowed at each rank
    to the largest taxon of that rank *within the current subset*; the column of rank r holds the
    items of the largest taxon of the rank above r (phylum column: the largest kingdom; class
    column: the largest phylum of that kingdom; ...). The chain runs through every rank, also
    those not shown as columns. **Ties** (two taxa of one size) go to the smaller code, i.e. the
    cumulative label first in alphabetical order for :class:`~treeprobe.taxonomy.Taxonomy` codes
    (which are sorted by label). Unknown (−1) codes never form a taxon; when no item of the
    current subset is known at a rank the chain stops and the deeper columns are left out (with
    a warning).

    Returns a list of :class:`DrilldownSubset` ``(rank, parent_rank, parent_code, rows)`` in the
    order of ``ranks``.

    >>> codes = {"kingdom": np.array([0, 0, 0, 1, 1]), "phylum": np.array([0, 1, 1, 2, 2]),
    ...          "class": np.array([0, 1, 2, 3, 4])}
    >>> [(s.rank, s.parent_rank, s.parent_code, s.rows.tolist()) for s in drilldown_subsets(codes, ["phylum", "class"])]
    [('phylum', 'kingdom', 0, [0, 1, 2]), ('class', 'phylum', 1, [1, 2])]
    """
    codes, _ = _lineage(codes_by_rank)
    order = list(codes)
    ranks = [ranks] if isinstance(ranks, str) else list(ranks)
    for r in ranks:
        if r not in codes:
            raise TreeprobeError(f"drilldown_subsets: no codes for rank {r!r} (have {', '.join(order)})")
        if order.index(r) == 0:
            raise TreeprobeError(f"drilldown_subsets: {r!r} is the top rank; a column needs a rank above it")
    wanted = set(ranks)
    deepest = max(order.index(r) for r in ranks) if ranks else 0
    rows = np.arange(len(next(iter(codes.values()))), dtype=np.int64)
    found: dict[str, DrilldownSubset] = {}
    for k in range(1, deepest + 1):
        parent = order[k - 1]
        best = _largest(codes[parent][rows])
        if best is None:
            missing = [r for r in ranks if order.index(r) >= k]
            warnings.warn(f"drilldown_subsets: no item of the subset is known at {parent}; "
                          f"columns {', '.join(missing)} left out", stacklevel=2)
            break
        rows = rows[codes[parent][rows] == best]
        if order[k] in wanted:
            found[order[k]] = DrilldownSubset(order[k], parent, best, rows)
    return [found[r] for r in ranks if r in found]


def drilldown_tsne(
    X_by_model: Mapping[str, np.ndarray],
    codes_by_rank,
    *,
    labels_by_rank: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    perplexity: float = 30.0,
    max_points: int | None = DEFAULT_DRILLDOWN_POINTS,
    ranks: Sequence[str] = RANKS[1:],
    n_iter: int = 500,
) -> pd.DataFrame:
    """openTSNE maps of each drill-down column (:func:`drilldown_subsets`) for each model.

    ``X_by_model``: dict model name -> embeddings (N, D_model), the same N rows (items) in the
    same order for every model. ``codes_by_rank``: as :func:`drilldown_subsets`, or a Taxonomy /
    TreeData (then its cumulative labels are used). ``labels_by_rank``: rank -> taxon label per
    item (N,); without it the labels are ``"<rank> <code>"``.

    Every model is mapped with the same ``seed``, the same ``perplexity`` and the same rows: a
    column larger than ``max_points`` is cut to a seeded random subset (``seed``) of that many rows,
    drawn once for all models. For a column of n < 3 * perplexity points the perplexity is lowered
    to (n − 1) / 3, for every model alike; the value used is in column ``perplexity``. Columns of
    fewer than 5 items are left out (a warning). Each map: :func:`treeprobe.embedding_maps.tsne_2d`
    (cosine geometry, PCA initialisation, ``n_iter`` iterations after early exaggeration).

    Returns a long DataFrame, one row per (model, column, item): ``model``, ``column_rank``,
    ``parent_rank``, ``parent_label`` (the label of the parent taxon), ``row`` (the item's row in
    X), ``x``, ``y``, ``label`` (the item's taxon at ``column_rank``; '' when unknown) and
    ``perplexity``. Only plain numbers and strings: ``to_dict(orient="records")`` is JSON-ready and
    :func:`treeprobe.compare_plots.plot_drilldown` redraws the figure from it.
    """
    from treeprobe.embedding_maps import subsample_index, tsne_2d

    codes, labels = _lineage(codes_by_rank, labels_by_rank)
    if not X_by_model:
        raise TreeprobeError("drilldown_tsne needs at least one model's embeddings")
    n = len(next(iter(codes.values())))
    Xs = {}
    for name, X in X_by_model.items():
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[0] != n:
            raise TreeprobeError(f"embeddings of model {name!r} have shape {X.shape}; expected ({n}, D)")
        Xs[str(name)] = X

    def label_of(rank, rows):
        if labels is not None and rank in labels:
            return np.asarray(labels[rank][rows]).astype(str)
        c = codes[rank][rows]
        return np.where(c >= 0, np.char.add(f"{rank} ", c.astype(str)), "")

    frames = []
    for sub in drilldown_subsets(codes, ranks):
        rows = sub.rows
        if max_points is not None and rows.size > max_points:
            rows = rows[subsample_index(rows.size, max_points, seed)]
        if rows.size < _TSNE_MIN_POINTS:
            warnings.warn(f"drilldown_tsne: the {sub.rank} column has {rows.size} item(s); "
                          f"fewer than {_TSNE_MIN_POINTS} cannot be mapped, column left out", stacklevel=2)
            continue
        perp = float(perplexity) if perplexity < rows.size / 3 else max((rows.size - 1) / 3.0, 1.0)
        parent_label = str(label_of(sub.parent_rank, rows[:1])[0])
        taxon = label_of(sub.rank, rows)
        for name, X in Xs.items():
            coords, _ = tsne_2d(X[rows], seed=seed, perplexity=perp, n_iter=n_iter)
            frames.append(pd.DataFrame({
                "model": name, "column_rank": sub.rank, "parent_rank": sub.parent_rank,
                "parent_label": parent_label, "row": rows.astype(np.int64),
                "x": coords[:, 0].astype(np.float64), "y": coords[:, 1].astype(np.float64),
                "label": taxon, "perplexity": perp,
            }))
    cols = ["model", "column_rank", "parent_rank", "parent_label", "row", "x", "y", "label", "perplexity"]
    if not frames:
        return pd.DataFrame({c: [] for c in cols})
    return pd.concat(frames, ignore_index=True)[cols]


def _check_nested(codes: dict[str, np.ndarray], order: list[str]) -> None:
    """Raise unless sharing a taxon at a rank implies sharing it at every shallower rank where known
    (true of Taxonomy codes: they are made from cumulative labels). O(N·R²), no sorting."""
    for k, deep in enumerate(order[1:], start=1):
        cd = codes[deep]
        rows = np.flatnonzero(cd >= 0)
        if rows.size == 0:
            continue
        t = cd[rows]
        first = np.empty(int(t.max()) + 1, dtype=np.int64)
        first[t] = rows  # one row of each taxon (which one, among repeats, does not matter)
        for shallow in order[:k]:
            cs = codes[shallow]
            if not np.array_equal(cs[rows], cs[first[t]]):
                raise TreeprobeError(f"codes are not nested: a {deep} taxon spans several {shallow} values; "
                                     "pass Taxonomy codes (made from cumulative labels)")


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (n, d) arrays (measured several times faster than einsum here)."""
    return (a * b).sum(axis=1)


def _unit_sums(X, unit_of: np.ndarray, S: int) -> np.ndarray:
    """(S, D) float64: Σ of the L2-normalised rows of ``X`` per unit, in row chunks (no N x D copy)."""
    import scipy.sparse as sp

    from treeprobe._utils import ROW_CHUNK

    V = np.zeros((S, X.shape[1]))
    for a in range(0, X.shape[0], ROW_CHUNK):
        block = np.asarray(X[a:a + ROW_CHUNK], dtype=np.float64)
        norms = np.sqrt(_rowdot(block, block))
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise TreeprobeError("distance_profile: every embedding must be finite and non-zero")
        ind = sp.csr_matrix((1.0 / norms, (unit_of[a:a + ROW_CHUNK], np.arange(block.shape[0]))),
                            shape=(S, block.shape[0]))
        V += ind @ block
    return V


class _LevelSums:
    """Weighted pair sums per level from per-unit vector sums, never a pass over item pairs.

    ``V`` (S, D): Σ u_i over each unit's items; ``n_unit`` (S,) items per unit; ``level_id[k]`` (S,):
    each unit's group at level k (groups contiguous, nested; level R−1 = the units themselves).
    Calling it with multiplicities ``M`` (b, S) gives ``(Q, C)``, each (b, R + 1): Σ c_ij u_i·u_j
    and Σ c_ij over the pairs i < j in one level-k group (k = 0 .. R−1), then over all pairs, where
    c_ij = m_s m_t for items of different units s, t and c_ij = m_s for two items of one unit s (each
    copy of a unit has its own pairs; pairs across two copies of one unit are left out).

    With g = Σ_{s in group} m_s V_s, the pairs across units sum to (‖g‖² − Σ_s m_s² ‖V_s‖²)/2, and the
    pairs inside units add Σ_s m_s (‖V_s‖² − n_s)/2. ‖g‖² is computed
    per group from its rows of V (one BLAS product per group, O(S·D) per resample and level) at the
    shallow levels, and at the deep levels, where groups are small, from the dot products V_s·V_t
    of the unit pairs inside a group (O(pairs) per resample, the dot products computed once).
    """

    def __init__(self, V, n_unit, level_id, pair_budget: int | None = None):
        self.V, self.n_unit = V, n_unit
        S, D = V.shape
        self.R = R = len(level_id)
        self.vnorm2 = _rowdot(V, V)
        self.ranges, sizes = [], []
        for lid in level_id:
            st = np.flatnonzero(np.r_[True, lid[1:] != lid[:-1]])
            en = np.r_[st[1:], S]
            self.ranges.append((st, en))
            sizes.append(en - st)
        self.level_id = level_id
        unit_pairs = [int((n * (n - 1) // 2).sum()) for n in sizes]  # non-increasing in k
        budget = max(S * D // 8, 10_000) if pair_budget is None else pair_budget
        self.kstar = next((k for k in range(R) if unit_pairs[k] <= budget), R)
        self.pair_levels = []  # (k, s, t, K) of the unit pairs whose deepest shared level is k
        if self.kstar < R:
            st, en = self.ranges[self.kstar]
            parts = []  # (s, t, V_s·V_t) of the unit pairs s < t of each group, from its Gram block
            for a, e in zip(st, en):
                if e - a > 1:
                    iu = np.triu_indices(e - a, 1)
                    parts.append((iu[0] + a, iu[1] + a, (V[a:e] @ V[a:e].T)[iu]))
            s_idx, t_idx, K = (np.concatenate(x) for x in zip(*parts)) if parts else (np.zeros(0, int),) * 3
            L = np.full(s_idx.size, self.kstar)
            for k in range(self.kstar + 1, R):
                L[level_id[k][s_idx] == level_id[k][t_idx]] = k
            for k in range(self.kstar, R):
                m = L == k
                self.pair_levels.append((k, s_idx[m], t_idx[m], K[m]))

    def __call__(self, M):
        b = M.shape[0]
        R, V, n = self.R, self.V, self.n_unit
        self_term = (M * M) @ self.vnorm2        # Σ_s m_s² ‖V_s‖²: unit s with (its copies of) itself
        within = M @ (0.5 * (self.vnorm2 - n))   # Σ_s m_s Σ_{i<j in s} u_i·u_j: each copy's own pairs
        self_cnt = (M * M) @ (n * n)
        within_cnt = M @ (0.5 * n * (n - 1))
        wn = M * n                               # Σ w_i per unit, (b, S)
        G2 = np.empty((b, R))                    # Σ_groups ‖Σ_s m_s V_s‖² per level
        C = np.empty((b, R + 1))
        acc = np.zeros(b)
        for k, s, t, K in reversed(self.pair_levels):  # deepest first: prefix sums of the pair terms
            for a in range(0, s.size, 1 << 16):
                sl = slice(a, a + (1 << 16))
                acc += (M[:, s[sl]] * M[:, t[sl]]) @ K[sl]
            G2[:, k] = self_term + 2.0 * acc
        for k in range(self.kstar):
            st, en = self.ranges[k]
            tot = np.zeros(b)
            for a, e in zip(st, en):
                g = M[:, a:e] @ V[a:e]
                tot += _rowdot(g, g)
            G2[:, k] = tot
        for k in range(R):
            gc = np.stack([np.bincount(self.level_id[k], weights=w) for w in wn])
            C[:, k] = 0.5 * (_rowdot(gc, gc) - self_cnt) + within_cnt
        tot = M @ V
        Q = np.empty((b, R + 1))
        Q[:, :R] = 0.5 * (G2 - self_term[:, None]) + within[:, None]
        Q[:, R] = 0.5 * (_rowdot(tot, tot) - self_term) + within
        C[:, R] = 0.5 * (wn.sum(axis=1) ** 2 - self_cnt) + within_cnt
        return Q, C


def distance_profile(
    X,
    codes_by_rank,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Mean cosine distance of item pairs by the rank of their lowest common ancestor (LCA).

    The LCA rank of a pair is the deepest rank at which the two items share a (known) taxon;
    pairs sharing none (different kingdoms) have LCA :data:`ROOT`. Unknown codes (−1) never share
    a taxon: two items of genus *G* whose species are unknown are a "same genus" pair. Codes
    must be nested (sharing a taxon implies sharing every known taxon above it: Taxonomy codes
    are; checked).

    **Exact, without N x N.** With unit vectors u (rows of X L2-normalised, float64), the sum of
    u_i·u_j over the pairs of a group is (‖Σu‖² − n)/2. "Pairs sharing a taxon at r or deeper" is
    an equivalence relation, whose groups are the taxa at the first known rank at or below r;
    summing over those groups gives Q_r and the pair count C_r, and the pairs whose LCA is r have
    sums Q_r − Q_(r+1) and C_r − C_(r+1) (the root: all pairs minus Q_(top rank)). mean distance
    = 1 − mean u_i·u_j. Cost O(N·D·R).

    **Interval**: percentile bootstrap over *species* (the resampling units are the species; an
    item unknown at species is a unit of its own): ``bootstrap`` resamples of the S units with
    replacement (``np.random.default_rng(seed)``), unit s drawn m_s times. The m_s copies of a
    unit are m_s separate draws of it, as in a cluster bootstrap: a pair of items of two different
    units s, t counts m_s·m_t times, a pair inside one unit counts m_s times (once per copy), and
    pairs across two copies of one unit are left out (they would pair an image with its own copy,
    or count the unit's own pairs again as if between two species). Each resample uses the same
    nested sums with these multiplicities as weights, O(S·D·R) from per-unit vector sums, never a
    pass over pairs. (Counting cross-copy pairs as same-species pairs instead, weight m_s², was
    measured to widen the intervals ~1.3-1.7x past the sampling spread.) ``level``: coverage (0.95 -> 2.5 % and 97.5 % percentiles);
    ``bootstrap=0``: no interval (NaN).

    Returns a DataFrame, one row per LCA rank from the deepest (species) to ``root``:
    ``lca_rank``, ``tree_distance`` (ranks below the LCA: 0 same species ... 7 different
    kingdoms for the 7 ranks), ``n_pairs`` (exact), ``mean_distance`` (NaN without pairs),
    ``ci_low``, ``ci_high``.

    >>> X = np.array([[1.0, 0], [1, 0], [0, 1], [-1, 0]])
    >>> codes = {"kingdom": np.array([0, 0, 0, 1]), "species": np.array([0, 0, 1, 2])}
    >>> distance_profile(X, codes, bootstrap=0)[["lca_rank", "tree_distance", "n_pairs", "mean_distance"]]
      lca_rank  tree_distance  n_pairs  mean_distance
    0  species              0        1       0.000000
    1  kingdom              1        2       1.000000
    2     root              2        3       1.666667
    """
    from treeprobe._validation import check_embeddings, check_int

    codes, _ = _lineage(codes_by_rank)
    order = list(codes)
    R = len(order)
    X = check_embeddings(X, n_rows=len(codes[order[0]]))
    check_int(bootstrap, "bootstrap", minimum=0)
    if not 0 < level < 1:
        raise TreeprobeError(f"level must be between 0 and 1; got {level}")
    _check_nested(codes, order)
    N = X.shape[0]

    # keys[k][i]: the group of item i in "shares a taxon at order[k] or deeper": its taxon at the
    # first known rank at or below order[k]; items known at no such rank are singletons.
    keys = [None] * R
    cur_rank = np.full(N, -1, dtype=np.int64)
    cur_code = np.arange(N, dtype=np.int64)  # singleton ids (disjoint from codes: marked by rank −1)
    span = max([N] + [int(c.max()) + 1 for c in codes.values() if c.size])  # (rank, code) -> one int64
    for k in range(R - 1, -1, -1):
        c = codes[order[k]]
        known = c >= 0
        cur_rank = np.where(known, k, cur_rank)
        cur_code = np.where(known, c, cur_code)
        keys[k] = pd.factorize((cur_rank + 1) * span + cur_code)[0].astype(np.int64)
    perm = np.lexsort(keys[::-1])  # top key first: every level's groups become contiguous
    keys = [kk[perm] for kk in keys]
    unit_starts = np.flatnonzero(np.r_[True, keys[-1][1:] != keys[-1][:-1]])
    S = unit_starts.size
    n_unit = np.diff(np.r_[unit_starts, N]).astype(np.float64)       # (S,) items per unit
    unit_of = np.empty(N, dtype=np.int64)                            # unit of each item (original rows)
    unit_of[perm] = np.cumsum(np.r_[True, keys[-1][1:] != keys[-1][:-1]]) - 1
    V = _unit_sums(X, unit_of, S)                                    # (S, D) sums of unit vectors

    unit_keys = [kk[unit_starts] for kk in keys]
    level_id = [np.cumsum(np.r_[True, uk[1:] != uk[:-1]]) - 1 for uk in unit_keys]  # (S,) per level
    sums = _LevelSums(V, n_unit, level_id)

    def by_lca(A):
        """Per exact LCA, deepest rank first, root last, from the level sums ``A`` (R + 1,)."""
        nested = np.r_[A[:R], 0]          # "at rank k or deeper"; nothing is deeper than the last rank
        exact = nested[:R] - nested[1:]   # at rank k and not deeper
        return np.r_[exact[::-1], A[R] - A[0]]

    Q, _ = sums(np.ones((1, S)))
    q_obs = by_lca(Q[0])
    C_int = np.empty(R + 1, dtype=np.int64)  # exact integer pair counts
    for k in range(R):
        g = np.bincount(level_id[k], weights=n_unit).astype(np.int64)
        C_int[k] = int((g * (g - 1) // 2).sum())
    C_int[R] = N * (N - 1) // 2
    n_pairs = by_lca(C_int).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_pairs > 0, 1.0 - q_obs / np.maximum(n_pairs, 1), np.nan)

    lo = np.full(R + 1, np.nan)
    hi = np.full(R + 1, np.nan)
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = np.empty((bootstrap, R + 1))
        chunk = min(bootstrap, 64)  # resamples per batch: (64, S) multiplicities
        for b0 in range(0, bootstrap, chunk):
            b = min(chunk, bootstrap - b0)
            M = np.stack([np.bincount(rng.integers(0, S, size=S), minlength=S) for _ in range(b)]).astype(np.float64)
            Qb, Cb = sums(M)
            for j in range(b):
                qb, cb = by_lca(Qb[j]), by_lca(Cb[j])
                boot[b0 + j] = np.where(cb > 0.5, 1.0 - qb / np.maximum(cb, 1.0), np.nan)
        alpha = (1.0 - level) / 2.0
        ok = np.isfinite(boot).any(axis=0)
        if ok.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo[ok], hi[ok] = np.nanquantile(boot[:, ok], [alpha, 1.0 - alpha], axis=0)
    return pd.DataFrame({
        "lca_rank": [*order[::-1], ROOT],
        "tree_distance": np.arange(R + 1, dtype=np.int64),
        "n_pairs": n_pairs,
        "mean_distance": mean,
        "ci_low": lo,
        "ci_high": hi,
    })
