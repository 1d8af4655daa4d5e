"""Partial Mantel test: does embedding distance follow the tree once a covariate is controlled for?

Museum specimens look alike whatever their taxon, and they are mostly plants and insects: an image
covariate z that is confounded with the tree can make embedding distance d and tree distance t
correlate with no tree signal at all. The partial Mantel statistic removes the part of r(d, t)
that goes through z:

    r_dt.z = (r_dt − r_dz·r_tz) / sqrt((1 − r_dz²)(1 − r_tz²)),

all three Pearson correlations over the same set of item pairs. d_ij = 1 − x̂_i·x̂_j (cosine
distance of the L2-normalised embeddings), t_ij the patristic distance on a
:class:`~treeprobe.tree.CladeStructure` (sum of edge lengths), and z_ij from one value per item:
categorical → z_ij = 0 if i and j share the category, else 1; numeric → z_ij = |z_i − z_j|.

**Exact, without N×N matrices.** A Pearson r needs the pair sums of x, x², y, y², x·y. With
c_ij = x̂_i·x̂_j and S the sum of all x̂:

* Σc = (‖S‖² − Σ‖x̂_i‖²)/2 and Σc² = (‖X̂ᵀX̂‖²_F − Σ‖x̂_i‖⁴)/2;
* Σ c·t = Σ_C w_C S_C·(S − S_C), S_C the sum of x̂ in clade C, w_C the length of the edge above C
  (t_ij is the sum of w_C over the clades holding exactly one of i and j);
* categorical z: Σ c·[same category] = Σ_g (‖S_g‖² − Σ_{i∈g}‖x̂_i‖²)/2 (per-category sums), and
  Σ t·[same category] = Σ_C w_C Σ_g n_Cg (n_g − n_Cg) (per-category clade counts);
* numeric z, items sorted by z with gaps γ_k between neighbours: |z_i − z_j| is the sum of the gaps
  between them, so Σ c·|Δz| = Σ_k γ_k S_≤k·(S − S_≤k) (one O(N·D) sweep), and
  Σ t·|Δz| = Σ_C w_C Σ_{i∈C, j∉C} |z_i − z_j| = Σ_C w_C (Σ_{i∈C} F_i − 2 W_C) with
  F_i = Σ_j |z_i − z_j| and W_C = Σ_{i<j∈C} |z_i − z_j| from the z-order inside each clade
  (O(N·depth) per evaluation);
* Σt and Σt² from clade sizes and one bottom-up pass (as :func:`treeprobe.mantel.mantel_tree`).

**Pairs.** By default only *between-species* pairs enter (a species is the set of items at one
tree node): within-species pairs all have t = 0, and mixing them in mostly measures how tight
species are. Their sums are the all-pair sums minus per-species sums; every t-weighted sum is the
same for both pair sets (t = 0 within species). ``pairs="all"`` takes every pair, as vegan does.

**Permutations.** Tree positions move; d and z stay with the images, so r_dz is fixed. Species
(all images at one tree node) move as blocks, each only to the position of a species with the same
image count (:func:`treeprobe.permutation.stratified_species_permutation`): images of one species
are not independent, species are the exchangeable units. The schemes:

* ``"species-within-covariate"`` (the default for a categorical z): species swap only with species
  of the same number of images *in every category*. The covariate at each tree position, and so
  r_tz, stays fixed; only r_dt moves. Exact under "species of one covariate make-up are
  exchangeable among tree positions", however strongly z follows the tree.
* ``"species"`` (the default for a numeric z, which has no such strata): image count alone. The
  permuted trees lose their link to z, and the partial statistic does not fully make up for that:
  in simulated worlds where d follows z only and z follows the tree (r_tz 0.1-0.34, r_dz
  0.45-0.65) it rejected a true null at the 5 % level in 9-14 % of the worlds (12.8 % in the
  world of ``tests/test_partial_mantel.py``, where the within-covariate scheme gives 4.8 %): the
  known weakness of the raw-permutation partial Mantel test (Legendre 2000; Guillot & Rousset
  2013). Binning a numeric covariate (``pandas.qcut``) gives the exact scheme for the binned one.
* ``"images"`` (with ``pairs="all"`` only): the classical scheme, every image on its own: the rows
  and columns of the tree-distance matrix are permuted by ``rng.permutation(N)``, which is exactly
  ``vegan::mantel.partial(t, d, z)`` (vegan permutes its first matrix), so the statistic and the
  scheme can be checked against the field's reference (``benchmarks/partial_mantel_vegan.R``).

Each permutation re-sums the clades over the slots in post-order (prefix sums: O(S·(D + groups))
plus O(clades·(D + groups)) for the clades of two or more species), plus an O(N·depth·log) sort
for numeric z.

p-values: (#{permuted statistic at least as extreme} + 1) / (permutations + 1), as
:func:`treeprobe.mantel.permutation_p_value`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from treeprobe._utils import l2_normalise
from treeprobe._validation import check_choice, check_int
from treeprobe.errors import TreeprobeError
from treeprobe.mantel import ALTERNATIVES, _compress, _tree_pair_sums, permutation_p_value
from treeprobe.permutation import n_permutable_species, stratified_species_permutation
from treeprobe.tree import CladeStructure

__all__ = [
    "PartialMantelResult", "partial_mantel_tree", "partial_mantel_data", "partial_correlation",
    "covariate_distance_matrix", "PAIRS", "SCHEMES", "COVARIATE_KINDS",
]

#: Which item pairs enter the correlations.
PAIRS = ("between-species", "all")
#: What the permutations move: whole species among species of their image count and covariate
#: make-up, whole species among species of their image count, or single images (vegan's scheme);
#: ``permutation="auto"`` takes the first for a categorical covariate and the second for a numeric one.
SCHEMES = ("species-within-covariate", "species", "images")
#: How an item column becomes a distance: categorical (0 same / 1 different) or numeric (|z_i − z_j|).
COVARIATE_KINDS = ("auto", "categorical", "numeric")

_BLOCK_ROWS = 8192  # rows per block of the float64 passes over X (8192 × 768 × 8 B = 50 MB)
_SMALL_SPECIES = 64  # species up to this many images enter the within-species sums pair by pair
_PRODUCT_ELEMENTS = 4_000_000  # elements of one (clades × columns) block of the clade sums (32 MB)
# A distance whose pairwise variance is below this fraction of its mean square is taken as constant.
_CONSTANT_VARIANCE = 1e-12


@dataclass(kw_only=True)
class PartialMantelResult:
    """Outcome of a partial Mantel test of embedding distance d against tree distance t given z.

    statistic: the partial correlation r_dt.z. p_value: its permutation p-value (NaN when
    permutations == 0). r_dt, r_dz, r_tz: the three Pearson correlations over the same pairs
    (r_dt is the plain Mantel r over those pairs). mantel_p_value: the p-value of r_dt alone under
    the same permutations (the plain Mantel test, for comparison). n_pairs: pairs entering the
    correlations. permuted: one sentence saying what the permutations moved and why. control:
    ``{"column": name, "kind": "categorical" | "numeric", "n_categories": int | None}``.
    permuted_statistics: (permutations,) the permuted r_dt.z (left out of :meth:`to_dict`).
    """

    statistic: float
    p_value: float
    r_dt: float
    r_dz: float
    r_tz: float
    mantel_p_value: float
    n_pairs: int
    n_items: int
    n_species: int
    pairs: str
    permutation: str
    permutations: int
    alternative: str
    permuted: str
    control: dict
    permuted_statistics: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict, without ``permuted_statistics``."""
        d = asdict(self)
        del d["permuted_statistics"]
        return d


def partial_correlation(r_xy: float, r_xz: float, r_yz: float) -> float:
    """(r_xy − r_xz·r_yz) / sqrt((1 − r_xz²)(1 − r_yz²)); raises when |r_xz| or |r_yz| is 1
    (z then explains x or y entirely and the partial correlation is undefined).

    >>> round(partial_correlation(0.5, 0.5, 0.5), 6)
    0.333333
    """
    den = (1.0 - r_xz * r_xz) * (1.0 - r_yz * r_yz)
    if not den > 1e-15:
        raise TreeprobeError("the covariate distance is perfectly correlated with one of the distances: "
                             "the partial correlation is undefined")
    return float((r_xy - r_xz * r_yz) / np.sqrt(den))


def _covariate(values, kind: str, n_items: int) -> tuple[str, np.ndarray, int | None]:
    """(kind, values, n_categories): categorical → int64 codes (N,) 0..G−1; numeric → float64 (N,)."""
    check_choice(kind, "covariate kind", COVARIATE_KINDS)
    s = pd.Series(values) if not isinstance(values, pd.Series) else values.reset_index(drop=True)
    if len(s) != n_items:
        raise TreeprobeError(f"the covariate has {len(s)} values but there are {n_items} items")
    if s.isna().any():
        raise TreeprobeError(f"the covariate is missing for {int(s.isna().sum())} item(s): drop them first")
    if kind == "auto":
        numeric = pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype)
        kind = "numeric" if numeric else "categorical"
    if kind == "categorical":
        codes, uniques = pd.factorize(s, sort=True)
        return kind, codes.astype(np.int64), len(uniques)
    try:
        z = s.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise TreeprobeError("a numeric covariate needs numbers; use kind='categorical' for labels") from None
    if not np.isfinite(z).all():
        raise TreeprobeError("the numeric covariate has non-finite values")
    return kind, z, None


def covariate_distance_matrix(values, kind: str = "auto") -> np.ndarray:
    """The covariate distance between all items, float64 (N, N) (needs N² memory; for references).

    ``values``: one per item (N,). Categorical: 0 if two items share the category, else 1;
    numeric: |z_i − z_j| in the column's units. ``kind="auto"``: numeric for a numeric dtype.

    >>> covariate_distance_matrix(["a", "b", "a"]).tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    >>> covariate_distance_matrix([1.0, 4.0]).tolist()
    [[0.0, 3.0], [3.0, 0.0]]
    """
    kind, z, _ = _covariate(values, kind, len(values))
    if kind == "categorical":
        return (z[:, None] != z[None, :]).astype(np.float64)
    return np.abs(z[:, None] - z[None, :])


# --- the sums over pairs that do not move -------------------------------------------------


def _gram_sq(U: np.ndarray) -> float:
    """‖ÛÛᵀ‖²_F of rows U (n, D), through the smaller of the two Gram matrices (row blocks)."""
    n, D = U.shape
    if n <= D:
        G = U @ U.T
        return float(np.sum(G * G))
    G = np.zeros((D, D))
    for i in range(0, n, _BLOCK_ROWS):
        B = U[i:i + _BLOCK_ROWS]
        G += B.T @ B
    return float(np.sum(G * G))


def _fixed_sums(U: np.ndarray, z: np.ndarray, kind: str) -> np.ndarray:
    """[P, Σc, Σc², Σz, Σz², Σc·z] over the pairs i < j of the rows U (n, D) (unit, float64), with
    c_ij = u_i·u_j and z_ij the covariate distance of z (n,) (codes or numbers)."""
    n = len(U)
    P = n * (n - 1) / 2.0
    S = U.sum(axis=0)
    sq = np.einsum("ij,ij->i", U, U)
    sum_c = (float(S @ S) - float(sq.sum())) / 2.0
    sum_c2 = (_gram_sq(U) - float(sq @ sq)) / 2.0
    if kind == "categorical":
        _, g = np.unique(z, return_inverse=True)
        ng = np.bincount(g).astype(float)
        Sg = sp.csr_matrix((np.ones(n), (g, np.arange(n))), shape=(len(ng), n)) @ U
        same_c = (float(np.sum(Sg * Sg)) - float(sq.sum())) / 2.0
        sum_z = P - float(np.sum(ng * (ng - 1.0))) / 2.0
        return np.array([P, sum_c, sum_c2, sum_z, sum_z, sum_c - same_c])
    order = np.argsort(z, kind="stable")
    v = z[order] - np.median(z)  # |Δz| is shift-invariant: centre for smaller rounding
    k = np.arange(n)
    sum_z = float(v @ (2.0 * k - n + 1.0))
    sum_z2 = float(n * (v @ v) - v.sum() ** 2)
    gaps = np.diff(v)
    sum_cz = 0.0
    left = np.zeros(U.shape[1])
    for a in range(0, n - 1, _BLOCK_ROWS):  # S_≤k in row blocks: no (n, D) cumulative sum
        blk = np.cumsum(U[order[a:min(a + _BLOCK_ROWS, n - 1)]], axis=0) + left
        sum_cz += float(gaps[a:a + len(blk)] @ np.einsum("ij,ij->i", blk, S - blk))
        left = blk[-1]
    return np.array([P, sum_c, sum_c2, sum_z, sum_z2, sum_cz])


def _pearson(P: float, sx: float, sxx: float, sy: float, syy: float, sxy, what: str):
    """Pearson r over P pairs from the pair sums (sxy may be an array); raises if x or y is constant."""
    vx = P * sxx - sx * sx
    vy = P * syy - sy * sy
    for v, s2, name in ((vx, sxx, what[0]), (vy, syy, what[1])):
        if not v > _CONSTANT_VARIANCE * P * s2:
            raise TreeprobeError(f"the {name} distance is constant over the pairs: the correlation is undefined")
    return (P * np.asarray(sxy) - sx * sy) / np.sqrt(vx * vy)


# --- the sums that move with the tree positions -------------------------------------------


class _MovingSums:
    """Σ c·t and Σ t·z for an assignment of units (species, or single images) to tree slots.

    ``__call__(inv)``: inv (U,) the unit sitting at each slot (slot k keeps its tree position);
    ``inv = arange(U)`` is the observed data. Units keep their images, so d and z move with them.
    The compressed tree is numbered in post-order, so with the slots sorted by node every clade
    holds a contiguous run of slots: its sums S_C are differences of prefix sums over the slots.
    """

    def __init__(self, comp, slot_c: np.ndarray, V: np.ndarray, H: np.ndarray | None, sum_t: float):
        """comp: the compressed tree; slot_c (U,): the compressed node of each unit's slot; V (U, D): the
        units' vector sums Σ x̂; H (U, groups): their item counts per category, or None for a numeric
        covariate (then :meth:`of_items` adds the item-level part)."""
        n_units = len(slot_c)
        self.sizes = None
        self.slot_order = np.argsort(slot_c, kind="stable")  # slots in post-order of their nodes
        pos = np.empty(n_units, dtype=np.int64)
        pos[self.slot_order] = np.arange(n_units)
        rows, cols = [], []
        cur, units = slot_c, np.arange(n_units)
        while cur.size:  # one step up per pass: every (clade, slot) incidence, root excluded
            keep = comp.parent[cur] >= 0
            cur, units = cur[keep], units[keep]
            rows.append(cur)
            cols.append(units)
            cur = comp.parent[cur]
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        clade_ids, rows = np.unique(rows, return_inverse=True)
        R = len(clade_ids)
        self.w = comp.w[clade_ids]
        self.lo = np.full(R, n_units, dtype=np.int64)
        np.minimum.at(self.lo, rows, pos[cols])
        self.hi = self.lo + np.bincount(rows, minlength=R)  # clade r holds slots slot_order[lo:hi]
        single = self.hi - self.lo == 1  # clades of one slot: S_C is that unit's own sum
        self.single_pos, self.w_single = self.lo[single], self.w[single]
        self.lo_m, self.hi_m, self.w_m = self.lo[~single], self.hi[~single], self.w[~single]
        self.kind = "categorical" if H is not None else "numeric"
        self.sum_t, self.n_vec = sum_t, V.shape[1]
        S = V.sum(axis=0)
        if H is not None:
            self.Y = np.hstack([V, H])
            # per unit: Y_u·T and ‖Y_u‖², for the vector part and the count part
            self.q = np.stack([V @ S, H @ H.sum(axis=0)], axis=1)
            self.sq = np.stack([np.einsum("ij,ij->i", V, V), np.einsum("ij,ij->i", H, H)], axis=1)
        else:
            self.Y = V
            self.q, self.sq = (V @ S)[:, None], np.einsum("ij,ij->i", V, V)[:, None]
        self._incidence = (rows, cols, pos)

    @classmethod
    def of_items(cls, comp, unit_of_item: np.ndarray, U: np.ndarray, z: np.ndarray, kind: str,
                 sum_t: float) -> "_MovingSums":
        """From items: unit_of_item (N,) the unit of each item (species, or the item itself), U (N, D) unit
        rows, z (N,) category codes (``kind="categorical"``) or numbers."""
        N = len(unit_of_item)
        m = len(comp.parent)
        item_c = np.empty(N, dtype=np.int64)
        item_c[comp.order] = np.repeat(np.arange(m), comp.own)
        n_units = int(unit_of_item.max()) + 1
        first = np.full(n_units, N, dtype=np.int64)
        np.minimum.at(first, unit_of_item, np.arange(N))
        ind = sp.csr_matrix((np.ones(N), (unit_of_item, np.arange(N))), shape=(n_units, N))
        H = None
        if kind == "categorical":
            H = (ind @ sp.csr_matrix((np.ones(N), (z, np.arange(N)))).T).toarray()  # (units, groups) counts
        self = cls(comp, item_c[first], ind @ U, H, sum_t)
        self.sizes = np.bincount(unit_of_item, minlength=n_units)
        if kind != "categorical":
            rows, cols, pos = self._incidence
            order = np.lexsort((pos[cols], rows))
            self._numeric_setup(rows[order], cols[order], unit_of_item, z)
        return self

    def _numeric_setup(self, rows: np.ndarray, cols: np.ndarray, unit_of_item: np.ndarray, z: np.ndarray) -> None:
        """Item-level (clade, item slot) entries for Σ t·|Δz| (rows, cols: the (clade, slot) incidence,
        sorted by clade): fixed in shape, since a unit only moves to a slot of its own size."""
        N = len(z)
        rep = self.sizes[cols]
        self.e_row = np.repeat(rows, rep)
        self.e_slot = np.repeat(cols, rep)
        self.e_within = np.arange(len(self.e_row)) - np.repeat(np.cumsum(rep) - rep, rep)
        self.unit_items = np.argsort(unit_of_item, kind="stable")
        self.unit_start = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        order = np.argsort(z, kind="stable")
        self.zrank = np.empty(N, dtype=np.int64)
        self.zrank[order] = np.arange(N)
        v = z[order] - np.median(z)
        self.zc = np.empty(N)
        self.zc[order] = v
        k = np.arange(N)
        prefix = np.concatenate([[0.0], np.cumsum(v)])
        self.F = np.empty(N)
        self.F[order] = v * (2.0 * k - N + 1.0) - prefix[:-1] + (prefix[-1] - prefix[1:])  # Σ_j |z_i − z_j|
        n_c = np.bincount(self.e_row, minlength=len(self.w)).astype(float)
        q = np.arange(len(self.e_row)) - (np.cumsum(n_c) - n_c)[self.e_row]  # position within the clade
        self.e_coef = 2.0 * q - n_c[self.e_row] + 1.0  # W_C = Σ_q z_(q)(2q − n_C + 1), z sorted in C

    def _numeric_tz(self, inv: np.ndarray) -> float:
        N = len(self.zc)
        items = self.unit_items[self.unit_start[inv[self.e_slot]] + self.e_within]
        o = np.argsort(self.e_row * N + self.zrank[items])  # by clade, then by z
        W = np.bincount(self.e_row, weights=self.zc[items[o]] * self.e_coef, minlength=len(self.w))
        F = np.bincount(self.e_row, weights=self.F[items], minlength=len(self.w))
        return float(self.w @ (F - 2.0 * W))

    def __call__(self, inv: np.ndarray) -> tuple[float, float]:
        sl = inv[self.slot_order]  # the unit at each slot, slots in post-order
        # Σ_C w_C S_C·(T − S_C) per part: S_C·T from prefix sums of the units' Y_u·T; ‖S_C‖² is the
        # unit's own ‖Y_u‖² for one-slot clades and a difference of vector prefix sums otherwise
        q = np.zeros((len(sl) + 1, self.q.shape[1]))
        np.cumsum(self.q[sl], axis=0, out=q[1:])
        term = self.w @ (q[self.hi] - q[self.lo]) - self.w_single @ self.sq[sl[self.single_pos]]
        if len(self.w_m):
            Y = self.Y[sl]
            C, nv = Y.shape[1], self.n_vec
            step = max(1, _PRODUCT_ELEMENTS // len(Y))
            for a in range(0, C, step):
                pre = np.zeros((len(Y) + 1, min(step, C - a)))
                np.cumsum(Y[:, a:a + step], axis=0, out=pre[1:])
                B = pre[self.hi_m] - pre[self.lo_m]  # (clades of 2+ slots, block): S_C (and n_Cg)
                cut = min(max(nv - a, 0), B.shape[1])  # columns before the cut are vector columns
                term[0] -= self.w_m @ np.einsum("ij,ij->i", B[:, :cut], B[:, :cut])
                if cut < B.shape[1]:
                    term[1] -= self.w_m @ np.einsum("ij,ij->i", B[:, cut:], B[:, cut:])
        sum_ct = float(term[0])
        if self.kind == "categorical":
            sum_tz = self.sum_t - float(term[1])
        else:
            sum_tz = self._numeric_tz(inv)
        return sum_ct, sum_tz


# --- the test ------------------------------------------------------------------------------


def _permuted_sentence(scheme: str, name: str, strata: np.ndarray) -> str:
    movable = f"{n_permutable_species(strata)} of {len(strata)} species can move"
    if scheme == "species":
        return (f"Tree positions of whole species, each swapped only with species of the same image count "
                f"({movable}), while embedding and {name!r} distances stay with the images (so r_dz is fixed), "
                f"because images of one species are not independent and species are the exchangeable units; "
                f"approximate, since the permuted trees lose any link between {name!r} and the tree.")
    if scheme == "species-within-covariate":
        return (f"Tree positions of whole species, each swapped only with species of the same image count in "
                f"every {name!r} category ({movable}), so the covariate at each tree position and with it r_tz "
                f"and r_dz stay fixed and only r_dt moves: exact when species of one covariate make-up are "
                f"exchangeable, however strongly the covariate follows the tree.")
    return (f"Tree positions of single images (rows and columns of the tree-distance matrix, the scheme of "
            f"vegan's mantel.partial(t, d, z)), while embedding and {name!r} distances stay with the images "
            f"(so r_dz is fixed); it treats images as independent, which within-species similarity violates, "
            f"so it is a reference check rather than a species-level test.")


def _pair_sums(U: np.ndarray, z: np.ndarray, kind: str, species: np.ndarray, pairs: str) -> np.ndarray:
    """:func:`_fixed_sums` over all pairs, or over between-species pairs (all minus within-species:
    species of up to ``_SMALL_SPECIES`` images pair by pair, grouped by size; larger ones by Gram)."""
    fixed = _fixed_sums(U, z, kind)
    if pairs == "all":
        return fixed
    sizes = np.bincount(species)
    order = np.argsort(species, kind="stable")
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for n in np.unique(sizes[sizes > 1]):
        members = order[start[sizes == n][:, None] + np.arange(n)]  # (species of n images, n)
        if n > _SMALL_SPECIES:
            for idx in members:
                fixed -= _fixed_sums(U[idx], z[idx], kind)
            continue
        a, b = np.triu_indices(n, 1)
        i, j = members[:, a].ravel(), members[:, b].ravel()
        c = np.einsum("ij,ij->i", U[i], U[j])
        zz = (z[i] != z[j]).astype(float) if kind == "categorical" else np.abs(z[i] - z[j])
        fixed -= np.array([len(c), c.sum(), c @ c, zz.sum(), zz @ zz, c @ zz])
    return fixed


def _strata(scheme: str, species: np.ndarray, z: np.ndarray, kind: str) -> np.ndarray:
    """Stratum label per permutation unit (species, or images for "images"): units swap tree
    positions only within a stratum."""
    if scheme == "images":
        return np.zeros(len(species), dtype=np.int64)
    sizes = np.bincount(species)
    if scheme == "species":
        return sizes
    if kind != "categorical":
        raise TreeprobeError("permutation='species-within-covariate' needs a categorical covariate "
                             "(bin a numeric one first, e.g. with pandas.qcut)")
    make_up = np.zeros((len(sizes), int(z.max()) + 1), dtype=np.int64)
    np.add.at(make_up, (species, z), 1)  # images of each species in each category
    return np.unique(make_up, axis=0, return_inverse=True)[1].ravel()


def _slot_units(scheme: str, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One permutation as the unit sitting at each tree slot (U,)."""
    if scheme == "images":
        return np.argsort(rng.permutation(len(strata)))  # slot k holds image inv[k]: t[p][:, p] against d, z
    pi = stratified_species_permutation(strata, rng)  # species s goes to the slot of species pi[s]
    inv = np.empty_like(pi)
    inv[pi] = np.arange(len(pi))
    return inv


def partial_mantel_tree(X, clades: CladeStructure, z, *, kind: str = "auto", pairs: str = "between-species",
                        permutation: str = "auto", permutations: int = 999, alternative: str = "greater",
                        seed: int | None = 0, name: str = "z") -> PartialMantelResult:
    """Partial Mantel test r(d, t | z), exact and without N×N matrices (module docstring).

    X: (N, D) embeddings (L2-normalised here, float64); row i sits at ``clades.item_node[i]``.
    d_ij = 1 − x̂_i·x̂_j (unitless, in [0, 2]); t_ij = patristic distance (edge-length units);
    z: (N,) one covariate value per item (array, list or Series): ``kind="categorical"`` → z_ij = 0
    same category / 1 different, ``"numeric"`` → |z_i − z_j| (the column's units), ``"auto"``:
    numeric for a numeric dtype. ``name``: the covariate's name in the result.

    ``pairs``: "between-species" (items at different tree nodes; default) or "all".
    ``permutation`` (species = the items at one tree node, numbered in node order): permutation k
    moves species s to the tree position of species ``pi[s]``, pi the k-th
    :func:`~treeprobe.permutation.stratified_species_permutation` of ``np.random.default_rng(seed)``
    (as :func:`~treeprobe.permutation.item_permutation` does), over strata of

    * "species-within-covariate" (categorical z): image count in every category (strata numbered in
      the lexicographic order of the species' count vectors, categories sorted) — exact; r_tz fixed;
    * "species": image count alone — approximate, rejects a true null too often when z follows the
      tree (module docstring);
    * "auto" (default): the first for a categorical z, the second for a numeric one;
    * or "images" (needs ``pairs="all"``): the rows and columns of t are permuted by the k-th
      ``rng.permutation(N)``, vegan's ``mantel.partial(t, d, z)``.

    ``alternative``: one of ALTERNATIVES ("greater": the partial correlation is positive).
    Cost: O(N·min(N, D)·D) once; per permutation O((S + clades)·(D + categories)) (S: the units
    moved, species or images), plus O(N·depth·log) for numeric z; memory O(N·D + clades·D).

    Two genera of two species each, two images per species; a batch label that half follows the genus:

    >>> import pandas as pd
    >>> from treeprobe.taxonomy import Taxonomy
    >>> lin = pd.DataFrame({r: ["a"] * 8 for r in ["kingdom", "phylum", "class", "order", "family"]})
    >>> lin["genus"] = ["g1"] * 4 + ["g2"] * 4
    >>> lin["species"] = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4"]
    >>> X = np.array([[1, .1], [1, .2], [1, .3], [1, .1], [.1, 1], [.2, 1], [.3, 1], [.2, 1]])
    >>> batch = ["p", "q", "p", "p", "q", "q", "q", "p"]
    >>> res = partial_mantel_tree(X, Taxonomy.from_frame(lin).clade_structure(), batch, permutations=9,
    ...                           name="batch")
    >>> round(res.statistic, 3), round(res.r_dt, 3), round(res.r_dz, 3), round(res.r_tz, 3), res.n_pairs
    (0.966, 0.967, 0.126, 0.12, 24)
    >>> res.permutation, res.details["n_permutable_units"], res.p_value  # only s1 and s4 share a make-up
    ('species-within-covariate', 2, 0.7)
    >>> res.control
    {'column': 'batch', 'kind': 'categorical', 'n_categories': 2}
    """
    check_choice(pairs, "pairs", PAIRS)
    check_choice(permutation, "permutation scheme", ("auto",) + SCHEMES)
    check_choice(alternative, "alternative", ALTERNATIVES)
    check_int(permutations, "permutations", minimum=0)
    N = clades.n_items
    if permutation == "images" and pairs != "all":
        raise TreeprobeError("permutation='images' moves single images off their species: use pairs='all'")
    U = l2_normalise(X, dtype=np.float64)
    if U.shape[0] != N:
        raise TreeprobeError(f"{U.shape[0]} embeddings but {N} items in the tree")
    if N < 3:
        raise TreeprobeError("a partial Mantel test needs at least 3 items")
    kind, zv, n_cat = _covariate(z, kind, N)
    if permutation == "auto":
        permutation = "species-within-covariate" if kind == "categorical" else "species"
    species = np.unique(clades.item_node, return_inverse=True)[1].astype(np.int64).ravel()
    strata = _strata(permutation, species, zv, kind)

    P, sum_c, sum_c2, sum_z, sum_z2, sum_cz = _pair_sums(U, zv, kind, species, pairs)
    comp = _compress(clades)
    sum_t, sum_t2 = _tree_pair_sums(comp, N)
    moving = _MovingSums.of_items(comp, np.arange(N) if permutation == "images" else species, U, zv, kind, sum_t)
    return _partial_test(np.array([P, sum_c, sum_c2, sum_z, sum_z2, sum_cz]), sum_t, sum_t2, moving, strata,
                         permutation=permutation, permutations=permutations, alternative=alternative, seed=seed,
                         name=name, kind=kind, n_categories=n_cat, n_items=N, n_species=int(species.max()) + 1,
                         pairs=pairs)


def _partial_test(fixed: np.ndarray, sum_t: float, sum_t2: float, moving: _MovingSums, strata: np.ndarray, *,
                  permutation: str, permutations: int, alternative: str, seed, name: str, kind: str,
                  n_categories, n_items: int, n_species: int, pairs: str) -> PartialMantelResult:
    """The test from the pair sums that do not move (``fixed`` = [P, Σc, Σc², Σz, Σz², Σc·z] over the pairs),
    Σt, Σt², the moving sums and the strata of the units (also fed by :mod:`treeprobe.stream`)."""
    P, sum_c, sum_c2, sum_z, sum_z2, sum_cz = (float(v) for v in fixed)
    if not P >= 3:
        raise TreeprobeError(f"only {int(P)} pairs: too few for a partial Mantel test")
    sum_d, sum_d2, sum_dz = P - sum_c, P - 2.0 * sum_c + sum_c2, sum_z - sum_cz
    r_dz = float(_pearson(P, sum_d, sum_d2, sum_z, sum_z2, sum_dz, ("embedding", name)))

    def stats(inv):
        sum_ct, sum_tz = moving(inv)
        r_dt = float(_pearson(P, sum_d, sum_d2, sum_t, sum_t2, sum_t - sum_ct, ("embedding", "tree")))
        r_tz = float(_pearson(P, sum_t, sum_t2, sum_z, sum_z2, sum_tz, ("tree", name)))
        return r_dt, r_tz

    r_dt, r_tz = stats(np.arange(len(strata)))
    stat = partial_correlation(r_dt, r_dz, r_tz)
    rng = np.random.default_rng(seed)
    perm_r = np.array([stats(_slot_units(permutation, strata, rng)) for _ in range(permutations)]).reshape(-1, 2)
    perm_stat = (perm_r[:, 0] - r_dz * perm_r[:, 1]) / np.sqrt((1 - r_dz ** 2) * (1 - perm_r[:, 1] ** 2))
    return PartialMantelResult(
        statistic=stat, p_value=permutation_p_value(stat, perm_stat, alternative), r_dt=r_dt, r_dz=r_dz,
        r_tz=r_tz, mantel_p_value=permutation_p_value(r_dt, perm_r[:, 0], alternative), n_pairs=int(round(P)),
        n_items=n_items, n_species=n_species, pairs=pairs, permutation=permutation,
        permutations=permutations, alternative=alternative, permuted=_permuted_sentence(permutation, name, strata),
        control=dict(column=name, kind=kind, n_categories=n_categories), permuted_statistics=perm_stat,
        details=dict(mean_embedding_distance=float(sum_d / P), mean_tree_distance=float(sum_t / P),
                     mean_covariate_distance=float(sum_z / P), n_permutable_units=n_permutable_species(strata),
                     permuted_r_tz_mean=float(perm_r[:, 1].mean()) if permutations else float("nan")),
    )


def partial_mantel_data(data, column: str, *, rank_lengths=None, **options) -> PartialMantelResult:
    """:func:`partial_mantel_tree` on a :class:`~treeprobe.core.TreeData`: its embeddings ``data.X``
    (N, D), its rank taxonomy (``rank_lengths``: edge length per rank, default 1) and the item
    column ``column`` as the covariate (``options``: the keywords of :func:`partial_mantel_tree`).

    >>> from treeprobe.datasets import bioclip2_1k
    >>> res = partial_mantel_data(bioclip2_1k(), "img_type", permutations=0)
    >>> round(res.statistic, 3), round(res.r_dt, 3), round(res.r_dz, 3), round(res.r_tz, 3)
    (0.117, 0.133, 0.24, 0.081)
    """
    if column not in data.items.columns:
        raise TreeprobeError(f"no item column {column!r}; columns are {', '.join(map(str, data.items.columns))}")
    clades = data.taxonomy.clade_structure(rank_lengths)
    return partial_mantel_tree(data.require_embeddings(), clades, data.items[column], name=column, **options)
