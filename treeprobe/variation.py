"""Intra-species variation against the between-species subspace (BioCLIP 2's "orthogonality" property).

BioCLIP 2 (Gu et al. 2025) reports that variation *within* a species (life stage, sex, image type)
lies mostly orthogonal to the directions that separate species. This module turns that into numbers.
For embeddings X (N, D) with species codes (N,) (-1 = unknown, those items are left out):

* **Between-species subspace.** Species centroids c_s = mean of the items of species s (S, D),
  centred on their *unweighted* mean (every species counts once, however many images it has: the
  subspace describes how species differ, not how the image counts are spread), and its top-k
  principal directions V (D, k) from the SVD. k is ``n_components`` if given, otherwise the smallest
  k whose cumulative share of the centroid variance reaches ``variance_share`` (capped at the rank).
* **Within-species share outside.** Deviations e_i = x_i − c_s(i) over species with ≥ 2 items;
  share = Σ‖(I − VVᵀ)e_i‖² / Σ‖e_i‖² in [0, 1]. Chance: isotropic deviations give (D − k)/D; a
  uniformly random k-dimensional subspace gives the same mean for *any* deviations, with standard
  deviation sqrt(2k(D−k)/(D²(D+2)(D−1)) · (D·Σλ² − (Σλ)²)) / Σλ (λ = eigenvalues of the within
  scatter; exact, from the moments of the diagonal of a random projection), reported as a z-score.
* **Covariate shift.** For a 2-level covariate (0 = level A, 1 = level B, -1 = neither) and species
  observed under both levels: d_s = mean of B items − mean of A items; the shift is the unweighted
  mean of d_s over those species. Its angle to the subspace is arccos(‖Vᵀv‖/‖v‖) in degrees (90° =
  orthogonal) and its share inside is ‖Vᵀv‖²/‖v‖² = cos²(angle). Chance for a fixed vector and a random
  subspace: share inside ~ Beta(k/2, (D − k)/2) (mean k/D); ``random_p`` = P(random share ≤ observed).
* **Per rank.** Taxon centroids at rank r = mean of the species centroids of the taxon (species
  weighted equally at every rank, so the species rank gives the species subspace), centred on their
  unweighted mean; the *within-species* deviations and the *species-level* shift are kept and
  compared with each rank's between-taxon subspace. (Deviations from genus or family centroids would
  mix in the between-species differences the property is contrasted with.)
* **Permutation null.** Covariate labels are shuffled among the items of each species with both
  levels (the other items carry no information on the shift and are left out), which keeps each
  species' counts per level and leaves every centroid, hence every subspace, unchanged. Permutation b
  sorts uniform keys ``rng.random((B, n))`` of ``np.random.default_rng(seed)`` within each species.
  p_norm = (1 + #{‖v_perm‖ ≥ ‖v‖}) / (1 + B): is there a shift consistent across species at all?
  p_angle = (1 + #{angle_perm ≥ angle}) / (1 + B), one-sided (greater): is the shift more orthogonal
  to the subspace than a shift-free average of the same within-species differences? (A shift inside
  the subspace gives p_angle near 1; a two-sided test would mix "orthogonal" with "aligned".)

Next to the chance values, ``between_outside_share`` = 1 − (share of the centroid variance inside):
the same statistic for the centroids themselves, the anisotropy-aware yardstick (within-species
variation "orthogonal" should mean clearly more outside than the between-species variation itself).

Caveats: a centroid of n images carries 1/n of its species' within-species variance, so with few
images per species the subspace also holds within-species directions (``min_centroid_items`` keeps only
species with enough images for the centroids). (D − k)/D assumes the embeddings fill all D
dimensions; for embeddings concentrated on fewer dimensions it is too high a yardstick (hence
``between_outside_share``). Singleton species enter the centroids (their centroid is their one image)
but not the deviations.

A shift along the 3rd axis, a subspace spanned by the first two:

>>> import numpy as np
>>> shift_angle(np.array([0.0, 0.0, 1.0]), np.eye(3)[:, :2])
90.0
>>> round(shift_angle(np.array([1.0, 0.0, 1.0]), np.eye(3)[:, :2]), 6)
45.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from treeprobe._validation import check_embeddings, check_int
from treeprobe.errors import TreeprobeError

__all__ = ["Subspace", "VariationResult", "species_centroids", "between_subspace", "within_deviations",
           "within_scatter", "outside_share", "random_subspace_share", "covariate_shift", "shift_angle", "inside_share",
           "taxon_centroids", "shift_permutations", "within_species_variation"]


# --- pure functions on arrays ---------------------------------------------------------------------

_BLOCK_ROWS = 8192  # rows per float64 block (8192 x 1024 x 8 B = 64 MB)


def _codes(codes, n: int, name: str = "codes") -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n,):
        raise TreeprobeError(f"{name} have shape {codes.shape}; expected ({n},)")
    if not np.issubdtype(codes.dtype, np.integer):
        raise TreeprobeError(f"{name} must be integer codes (-1 = unknown); got dtype {codes.dtype}")
    return codes


def species_centroids(X, codes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of the rows of ``X`` (N, D) per code (N,) ≥ 0 (-1 = unknown, left out): (centroids (S, D)
    float64, the codes (S,) in increasing order, item counts (S,)).

    >>> c, lab, n = species_centroids(np.array([[0.0, 0], [2, 0], [0, 4]]), np.array([0, 0, 1]))
    >>> c.tolist(), lab.tolist(), n.tolist()
    ([[1.0, 0.0], [0.0, 4.0]], [0, 1], [2, 1])
    """
    X = check_embeddings(X)
    codes = _codes(codes, X.shape[0])
    idx = np.flatnonzero(codes >= 0)
    labels, inv, counts = np.unique(codes[idx], return_inverse=True, return_counts=True)
    return _group_sums(X, idx, inv.ravel(), labels.size) / counts[:, None], labels, counts


def _group_sums(X, idx: np.ndarray, groups: np.ndarray, n_groups: int, weights: np.ndarray | None = None):
    """Σ_j weights[j]·X[idx[j]] per group ``groups[j]`` (0..n_groups−1), float64 (n_groups, D): rows taken
    in blocks of ``_BLOCK_ROWS`` (memory O(block·D), no float64 copy of X), added in row order."""
    sums = np.zeros((n_groups, X.shape[1]))
    for a in range(0, len(idx), _BLOCK_ROWS):
        B = X[idx[a:a + _BLOCK_ROWS]].astype(np.float64)
        if weights is not None:
            B *= weights[a:a + _BLOCK_ROWS, None]
        np.add.at(sums, groups[a:a + _BLOCK_ROWS], B)
    return sums


@dataclass
class Subspace:
    """Principal subspace of a set of centroids: ``basis`` (D, k) orthonormal columns, ``explained``
    (k,) share of the centroid variance per direction, ``total_variance`` (mean squared distance of
    the centroids to their unweighted mean), ``n_centroids``."""

    basis: np.ndarray
    explained: np.ndarray
    total_variance: float
    n_centroids: int

    @property
    def n_components(self) -> int:
        """k, the dimension of the subspace."""
        return int(self.basis.shape[1])

    @property
    def share(self) -> float:
        """Share of the centroid variance inside the subspace (0 when k = 0)."""
        return float(self.explained.sum())


def between_subspace(centroids, *, n_components: int | None = None, variance_share: float = 0.9) -> Subspace:
    """Top-k principal directions of ``centroids`` (S, D), centred on their unweighted mean. k =
    ``n_components`` (capped at the rank), or the smallest k reaching ``variance_share`` of the variance.

    >>> sub = between_subspace(np.array([[0.0, 0, 0], [2, 0, 0], [0, 1, 0]]), variance_share=0.99)
    >>> sub.n_components, round(sub.share, 6)
    (2, 1.0)
    """
    C = check_embeddings(centroids, "centroids").astype(np.float64)
    if not 0.0 < float(variance_share) <= 1.0:
        raise TreeprobeError(f"variance_share must be in (0, 1]; got {variance_share}")
    S, D = C.shape
    Cc = C - C.mean(axis=0)
    if S < 2:
        return Subspace(np.zeros((D, 0)), np.zeros(0), 0.0, S)
    _, sv, Vt = np.linalg.svd(Cc, full_matrices=False)
    var = sv ** 2
    total = float(var.sum())
    if total <= 0.0:
        return Subspace(np.zeros((D, 0)), np.zeros(0), 0.0, S)
    ratio = var / total
    rank = int(np.sum(sv > sv[0] * max(S, D) * np.finfo(float).eps))
    if n_components is not None:
        k = min(check_int(n_components, "n_components", minimum=0), rank)
    else:
        k = min(int(np.searchsorted(np.cumsum(ratio), float(variance_share) - 1e-12)) + 1, rank)
    return Subspace(Vt[:k].T.copy(), ratio[:k].copy(), total / S, S)


def within_deviations(X, codes, *, min_items: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Items minus their species centroid, over species with ≥ ``min_items`` items: (deviations (M, D)
    float64, the indices (M,) of those items in ``X``).

    >>> dev, idx = within_deviations(np.array([[0.0], [2.0], [5.0]]), np.array([0, 0, 1]))
    >>> dev.ravel().tolist(), idx.tolist()
    ([-1.0, 1.0], [0, 1])
    """
    X, idx, cent, pos, _ = _deviation_index(X, codes, min_items)
    return X[idx].astype(np.float64) - cent[pos], idx


def _deviation_index(X, codes, min_items: int):
    """(X checked, items idx (M,) of species with ≥ min_items items, the centroids (S, D), each item's row
    ``pos`` (M,) in them, item counts (S,))."""
    X = check_embeddings(X)
    codes = _codes(codes, X.shape[0])
    min_items = check_int(min_items, "min_items", minimum=1)
    cent, labels, counts = species_centroids(X, codes)
    idx = np.flatnonzero(codes >= 0)
    pos = np.searchsorted(labels, codes[idx])
    ok = counts[pos] >= min_items
    return X, idx[ok], cent, pos[ok], counts[counts >= min_items]


def within_scatter(X, codes, *, min_items: int = 2) -> tuple[np.ndarray, int, int]:
    """The scatter EᵀE (D, D) float64 of the deviations E of :func:`within_deviations`, summed over row
    blocks without holding E: (scatter, number of deviations M, number of species with ≥ ``min_items``
    items). Memory O(block·D + S·D + D²) instead of M·D·8 bytes.

    >>> G, m, s = within_scatter(np.array([[0.0], [2.0], [5.0]]), np.array([0, 0, 1]))
    >>> G.tolist(), m, s
    ([[2.0]], 2, 1)
    """
    X, idx, cent, pos, kept = _deviation_index(X, codes, min_items)
    G = np.zeros((X.shape[1], X.shape[1]))
    for a in range(0, len(idx), _BLOCK_ROWS):
        E = X[idx[a:a + _BLOCK_ROWS]].astype(np.float64)
        E -= cent[pos[a:a + _BLOCK_ROWS]]
        G += E.T @ E
    return G, len(idx), len(kept)


def _scatter_outside_share(G: np.ndarray, basis) -> float:
    """:func:`outside_share` from the scatter G = EᵀE (D, D): 1 − tr(VᵀGV)/tr(G)."""
    total = float(np.trace(G))
    if total <= 0.0:
        return float("nan")
    V = np.asarray(basis, dtype=np.float64)
    inside = float(np.sum((G @ V) * V))
    return float(min(max(1.0 - inside / total, 0.0), 1.0))


def _scatter_random_share(G: np.ndarray, k: int) -> tuple[float, float]:
    """:func:`random_subspace_share` from the scatter G = EᵀE (D, D): Σλ = tr(G), Σλ² = ‖G‖²_F."""
    D = G.shape[0]
    s1, s2 = float(np.trace(G)), float(np.sum(G * G))
    if s1 <= 0.0 or D < 2:
        return (D - k) / D, 0.0
    a = 2.0 * k * (D - k) / (D ** 2 * (D + 2.0))
    var = a / (D - 1.0) * (D * s2 - s1 ** 2) / s1 ** 2
    return (D - k) / D, float(np.sqrt(max(var, 0.0)))


def outside_share(deviations, basis) -> float:
    """Σ‖(I − VVᵀ)e‖² / Σ‖e‖² for deviations (M, D) and an orthonormal ``basis`` V (D, k); NaN if e = 0.

    >>> outside_share(np.array([[1.0, 1.0]]), np.array([[1.0], [0.0]]))
    0.5
    """
    E = check_embeddings(deviations, "deviations").astype(np.float64)
    V = np.asarray(basis, dtype=np.float64)
    total = float(np.einsum("ij,ij->", E, E))
    if total <= 0.0:
        return float("nan")
    inside = float(np.sum((E @ V) ** 2))
    return float(min(max(1.0 - inside / total, 0.0), 1.0))


def random_subspace_share(deviations, k: int) -> tuple[float, float]:
    """Mean and standard deviation of :func:`outside_share` of ``deviations`` (M, D) over uniformly random
    k-dimensional subspaces (exact: mean (D − k)/D, sd from the within-scatter eigenvalues).

    >>> m, sd = random_subspace_share(np.eye(4), 1)   # isotropic: every subspace gives 3/4
    >>> m, round(sd, 12)
    (0.75, 0.0)
    """
    E = check_embeddings(deviations, "deviations").astype(np.float64, copy=False)
    D = E.shape[1]
    k = check_int(k, "k", minimum=0)
    if k > D:
        raise TreeprobeError(f"k = {k} exceeds the dimension D = {D}")
    return _scatter_random_share(E.T @ E, k)


def _shift_weights(codes: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Items used (indices), their weights w (shift = Σ w_i x_i) and the number of species with both levels."""
    use = np.flatnonzero((codes >= 0) & (group >= 0))
    sp, g = codes[use], group[use]
    labels, inv = np.unique(sp, return_inverse=True)
    nb = np.bincount(inv, weights=(g == 1), minlength=labels.size)
    na = np.bincount(inv, weights=(g == 0), minlength=labels.size)
    both = (na > 0) & (nb > 0)
    n_both = int(both.sum())
    keep = both[inv]
    use, inv, g = use[keep], inv[keep], g[keep]
    if n_both == 0:
        return use, np.zeros(0), 0
    w = np.where(g == 1, 1.0 / nb[inv], -1.0 / na[inv]) / n_both
    return use, w, n_both


def _group(group, n: int) -> np.ndarray:
    g = _codes(group, n, "covariate levels")
    if np.any((g < -1) | (g > 1)):
        raise TreeprobeError("covariate levels must be 0 (level A), 1 (level B) or -1 (neither)")
    return g


def covariate_shift(X, codes, group) -> tuple[np.ndarray, int]:
    """Mean within-species shift: the unweighted mean over species with both levels of (mean of level-1
    items − mean of level-0 items); ``group`` (N,) is 0, 1 or -1 (left out). Returns (shift (D,), number
    of species with both levels); the shift is NaN when there are none.

    >>> X = np.array([[0.0, 0], [1, 0], [5, 5], [5, 7], [9, 9]])
    >>> v, n = covariate_shift(X, np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 1]))
    >>> v.tolist(), n
    ([0.5, 1.0], 2)
    """
    X = check_embeddings(X)
    codes = _codes(codes, X.shape[0])
    group = _group(group, X.shape[0])
    use, w, n_both = _shift_weights(codes, group)
    if n_both == 0:
        return np.full(X.shape[1], np.nan), 0
    return w @ X[use].astype(np.float64), n_both


def inside_share(vector, basis) -> float:
    """‖Vᵀv‖² / ‖v‖²: share of the squared norm of ``vector`` (D,) inside the subspace ``basis`` (D, k).

    >>> inside_share(np.array([1.0, 1.0]), np.array([[1.0], [0.0]]))
    0.5
    """
    v = np.asarray(vector, dtype=np.float64)
    nn = float(v @ v)
    if not nn > 0.0:
        return float("nan")
    return float(min(np.sum((v @ np.asarray(basis, dtype=np.float64)) ** 2) / nn, 1.0))


def shift_angle(vector, basis) -> float:
    """Angle in degrees between ``vector`` (D,) and the subspace spanned by ``basis`` (D, k), orthonormal:
    arccos(‖Vᵀv‖/‖v‖); 90 = orthogonal, 0 = inside. NaN for a zero vector."""
    share = inside_share(vector, basis)
    return float(np.degrees(np.arccos(np.sqrt(share)))) if np.isfinite(share) else float("nan")


def taxon_centroids(X, species_codes, rank_codes) -> np.ndarray:
    """Centroids (T, D) of the taxa at one rank: the mean of the species centroids of each taxon (every
    species counts once), i.e. the item mean with weights 1/(items of the species). Items with an unknown
    species or taxon (-1) are left out; rows in increasing taxon code.

    >>> X = np.array([[0.0], [0.0], [0.0], [6.0], [10.0]])
    >>> taxon_centroids(X, np.array([0, 0, 0, 1, 2]), np.array([0, 0, 0, 0, 1])).ravel().tolist()
    [3.0, 10.0]
    """
    X = check_embeddings(X)
    sp = _codes(species_codes, X.shape[0], "species codes")
    rc = _codes(rank_codes, X.shape[0], "rank codes")
    idx = np.flatnonzero((sp >= 0) & (rc >= 0))
    sp, rc = sp[idx], rc[idx]
    _, sinv, scount = np.unique(sp, return_inverse=True, return_counts=True)
    w = 1.0 / scount[sinv.ravel()]
    tlab, tinv = np.unique(rc, return_inverse=True)
    tinv = tinv.ravel()
    return _group_sums(X, idx, tinv, tlab.size, w) / np.bincount(tinv, weights=w)[:, None]


def shift_permutations(X, codes, group, *, permutations: int = 999, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The observed shift (D,) and B = ``permutations`` shifts (B, D) with the levels shuffled among the
    items of each species with both levels (uniform keys ``rng.random((B, n))`` sorted within species,
    ``rng = np.random.default_rng(seed)``). Raises if no species has both levels."""
    X = check_embeddings(X)
    codes = _codes(codes, X.shape[0])
    group = _group(group, X.shape[0])
    B = check_int(permutations, "permutations", minimum=0)
    use, w, n_both = _shift_weights(codes, group)
    if n_both == 0:
        raise TreeprobeError("no species is observed under both covariate levels")
    order = np.lexsort((use, codes[use]))       # items grouped by species
    use, w = use[order], w[order]
    sp = codes[use]
    Xu = X[use].astype(np.float64)
    _, first = np.unique(sp, return_index=True)
    Xu -= np.repeat(np.add.reduceat(Xu, first) / np.diff(np.append(first, sp.size))[:, None],
                    np.diff(np.append(first, sp.size)), axis=0)  # centre per species (weights sum to 0 there)
    obs = w @ Xu
    rng = np.random.default_rng(seed)
    rank_of = np.unique(sp, return_inverse=True)[1].astype(np.float64)
    out = np.empty((B, X.shape[1]))
    step = max(1, _BLOCK_ROWS * 64 // max(sp.size, 1))  # permutations per block (keys, W: at most 4 MB each)
    for a in range(0, B, step):  # rows of rng.random((B, n)) drawn block by block: the same stream
        keys = rng.random((min(step, B - a), sp.size)) + rank_of  # sort within species only
        perm = np.argsort(keys, axis=1, kind="stable")  # perm[b, j]: item that takes weight w[j]
        W = np.zeros(keys.shape)
        np.put_along_axis(W, perm, np.broadcast_to(w, W.shape), axis=1)
        out[a:a + len(W)] = W @ Xu
    return obs, out


# --- on a TreeData -----------------------------------------------------------------------------


@dataclass
class VariationResult:
    """Output of :func:`within_species_variation`: ``summary`` (headline numbers, dict), ``ranks``
    (DataFrame, one row per rank), ``shift`` (D,) mean within-species shift or None, ``levels``
    (level A, level B) or None, ``subspaces`` (rank -> :class:`Subspace`)."""

    summary: dict
    ranks: pd.DataFrame
    shift: np.ndarray | None = None
    levels: tuple | None = None
    subspaces: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """Summary and per-rank table as plain Python (JSON-friendly)."""
        return {**self.summary, "per_rank": self.ranks.to_dict(orient="records")}


def _level_values(level) -> list:
    if isinstance(level, (list, tuple, set, frozenset)):
        return list(level)
    return [level]


def _expand_patterns(values: list, observed: list) -> list:
    """Each value as it is when the column has it, else, if it is a shell-style pattern (``*``, ``?``,
    ``[``), the column's values it matches (``"Museum Specimen*"``)."""
    import fnmatch

    present = set(observed)
    out = []
    for v in values:
        if v in present or not (isinstance(v, str) and any(c in v for c in "*?[")):
            out.append(v)
        else:
            hits = [o for o in observed if isinstance(o, str) and fnmatch.fnmatchcase(o, v)]
            out.extend(hits if hits else [v])
    return out


def _covariate_groups(items: pd.DataFrame, covariate: str, levels) -> tuple[np.ndarray, tuple]:
    if covariate not in items.columns:
        raise TreeprobeError(f"covariate {covariate!r} is not a column of the items; columns: "
                             f"{', '.join(map(str, items.columns))}")
    col = items[covariate]
    observed = sorted(pd.unique(col.dropna()).tolist(), key=str)
    if levels is None:
        if len(observed) != 2:
            shown = ", ".join(repr(v) for v in observed[:12]) + (", ..." if len(observed) > 12 else "")
            raise TreeprobeError(f"covariate {covariate!r} has {len(observed)} levels ({shown}), not 2; "
                                 "pass levels=(a, b), each a value or a list of values")
        levels = (observed[0], observed[1])
    if len(levels) != 2:
        raise TreeprobeError(f"levels must be a pair (a, b); got {len(levels)} entries")
    a, b = (_expand_patterns(_level_values(lv), observed) for lv in levels)
    missing = [v for v in a + b if v not in set(observed)]
    if missing:
        raise TreeprobeError(f"level value(s) {', '.join(map(repr, missing))} not found in covariate "
                             f"{covariate!r}; levels present: {', '.join(map(repr, observed[:12]))}")
    if set(a) & set(b):
        raise TreeprobeError(f"levels a and b share value(s) {', '.join(map(repr, sorted(set(a) & set(b), key=str)))}")
    group = np.full(len(items), -1, dtype=np.int64)
    group[col.isin(a).to_numpy()] = 0
    group[col.isin(b).to_numpy()] = 1
    return group, tuple(v[0] if len(v) == 1 else v for v in (a, b))  # patterns as the values they matched


def within_species_variation(data, *, covariate: str | None = None, levels: Sequence | None = None,
                             ranks: Sequence[str] | None = None, n_components: int | None = None,
                             variance_share: float = 0.9, min_centroid_items: int = 1,
                             permutations: int = 999, seed: int = 0) -> VariationResult:
    """Share of within-species variation outside the between-taxon principal subspace at each rank of
    ``data`` (a :class:`~treeprobe.TreeData`; ``data.unit`` embeddings, the last taxonomy rank as species),
    and, with a 2-level ``covariate`` (column of ``data.items``; ``levels=(a, b)`` to choose or merge
    levels, each a value or a list of values), the mean within-species shift b − a: its norm, angle to each
    subspace and permutation p-values (see the module docstring). ``ranks`` defaults to all ranks."""
    from treeprobe.core import TreeData

    if not isinstance(data, TreeData):
        raise TreeprobeError(f"expected a treeprobe.TreeData, got {type(data).__name__}")
    X = np.asarray(data.unit)
    tax = data.taxonomy
    codes_by_rank = tax.codes_by_rank()
    species_rank = tax.ranks[-1]
    ranks = list(tax.ranks) if ranks is None else list(ranks)
    bad = [r for r in ranks if r not in codes_by_rank]
    if bad:
        raise TreeprobeError(f"unknown rank(s) {', '.join(map(repr, bad))}; ranks: {', '.join(tax.ranks)}")
    sp = np.asarray(codes_by_rank[species_rank])
    scatter, n_dev, n_sp_within = within_scatter(X, sp)
    if n_dev == 0:
        raise TreeprobeError("no species has 2 or more items; within-species variation is undefined")
    D = X.shape[1]
    m = check_int(min_centroid_items, "min_centroid_items", minimum=1)
    _, lab, cnt = species_centroids(X, sp)
    sp_c = np.where(np.isin(sp, lab[cnt >= m]), sp, -1)   # species codes used for the centroids
    if not np.any(sp_c >= 0):
        raise TreeprobeError(f"no species has {m} or more items (min_centroid_items)")

    shift = perm = None
    lv = None
    n_both = 0
    if covariate is not None:
        group, lv = _covariate_groups(data.items, covariate, levels)
        shift, n_both = covariate_shift(X, sp, group)
        if n_both == 0:
            raise TreeprobeError(f"no species is observed under both levels {lv[0]!r} and {lv[1]!r} "
                                 f"of covariate {covariate!r}")
        _, perm = shift_permutations(X, sp, group, permutations=permutations, seed=seed)

    from scipy import stats

    rows, subspaces = [], {}
    B = 0 if perm is None else perm.shape[0]
    for r in ranks:
        cent = (species_centroids(X, sp_c)[0] if r == species_rank
                else taxon_centroids(X, sp_c, np.asarray(codes_by_rank[r])))
        sub = between_subspace(cent, n_components=n_components, variance_share=variance_share)
        subspaces[r] = sub
        k = sub.n_components
        share = _scatter_outside_share(scatter, sub.basis)
        rmean, rsd = _scatter_random_share(scatter, k)
        row = {"rank": r, "n_taxa": sub.n_centroids, "n_components": k, "variance_explained": sub.share,
               "within_outside_share": share, "between_outside_share": 1.0 - sub.share,
               "isotropic_outside_share": (D - k) / D,
               "random_outside_sd": rsd,
               "within_outside_z": (share - rmean) / rsd if rsd > 0 else float("nan")}
        if shift is not None:
            ins = inside_share(shift, sub.basis)
            ang = shift_angle(shift, sub.basis)
            row.update({"shift_angle_deg": ang, "shift_inside_share": ins, "chance_inside_share": k / D,
                        "random_p": float(stats.beta.cdf(ins, k / 2, (D - k) / 2)) if 0 < k < D else float("nan")})
            if B:
                pn = np.sum(perm ** 2, axis=1)
                pin = np.sum((perm @ sub.basis) ** 2, axis=1)
                pang = np.degrees(np.arccos(np.sqrt(np.clip(pin / pn, 0.0, 1.0))))
                row["perm_angle_mean_deg"] = float(pang.mean())
                row["p_angle"] = float((1 + np.sum(pang >= ang - 1e-9)) / (1 + B))
        rows.append(row)
    table = pd.DataFrame(rows)

    summary = {"n_items": int(np.sum(sp >= 0)), "n_species": int(np.unique(sp[sp >= 0]).size),
               "n_species_centroids": int(np.unique(sp_c[sp_c >= 0]).size), "min_centroid_items": m,
               "n_species_within": n_sp_within, "n_items_within": int(n_dev),
               "dimension": D, "variance_share": float(variance_share), "n_components_fixed": n_components}
    head = table[table["rank"] == species_rank]
    head = head.iloc[0] if len(head) else table.iloc[-1]
    summary.update({"headline_rank": head["rank"], "n_components": int(head["n_components"]),
                    "within_outside_share": float(head["within_outside_share"]),
                    "isotropic_outside_share": float(head["isotropic_outside_share"]),
                    "within_outside_z": float(head["within_outside_z"])})
    if shift is not None:
        norm = float(np.linalg.norm(shift))
        names = [" | ".join(map(str, _level_values(v))) for v in lv]
        summary.update({"covariate": covariate, "levels": names, "n_species_both": n_both,
                        "shift_norm": norm, "shift_angle_deg": float(head["shift_angle_deg"]),
                        "shift_inside_share": float(head["shift_inside_share"]), "permutations": B, "seed": seed})
        if B:
            pnorm = np.linalg.norm(perm, axis=1)
            summary["p_norm"] = float((1 + np.sum(pnorm >= norm * (1 - 1e-9))) / (1 + B))
            summary["p_angle"] = float(head["p_angle"])
    return VariationResult(summary=summary, ranks=table, shift=shift, levels=lv, subspaces=subspaces)
