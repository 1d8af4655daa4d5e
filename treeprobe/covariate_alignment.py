"""Covariate alignment: does the embedding follow a species-level covariate beyond what the tree explains?

BioCLIP 2's "ecological alignment", generalised. For S species with unit-norm centroids y_s (the
unit-norm mean of each species' unit-norm image embeddings, as :func:`treeprobe.physignal.physignal`
and the centroid Mantel test build them), a covariate per species and a tree:

* d_ij = 1 − y_i·y_j, the cosine distance of the centroids;
* c_ij, the covariate distance. Numeric, one column: |z_i − z_j|. Numeric, several columns: the
  Euclidean distance of the columns standardised over the S species (mean 0, sample sd 1), so each
  column weighs the same whatever its unit. Categorical (one column): 0 for the same category, 1 for
  different ones;
* t_ij, the patristic distance on the tree: the rank taxonomy (``rank_lengths``, default one unit
  per rank) or a user Newick tree.

Over the S(S−1)/2 species pairs the table reports the Mantel r_dc (Pearson), the partial Mantel

    r_dc.t = (r_dc − r_dt·r_ct) / sqrt((1 − r_dt²)(1 − r_ct²)),

the Mantel r_ct (how strongly the covariate follows the tree: context) and r_dt (how strongly the
embedding follows the tree; no p-value here, that is :func:`treeprobe.tl.mantel`'s job).

**The inference.** The question "beyond the tree" has the null world: the covariate follows the tree,
the embedding follows the tree, and the embedding does not depend on the covariate otherwise. Permuting
the covariate freely among species (the classical partial Mantel test, ``vegan::mantel.partial``) is
anti-conservative there, because both distances are phylogenetically autocorrelated (Harmon & Glor
2010; Guillot & Rousset 2013). The default here permutes the covariate only among species of the
same genus (``permute="within-genus"``; any rank: ``"within-family"``, ...), and, with
``match_sizes=True`` (default), only among species with the same number of images. Species alone in
their stratum keep their value. On the rank taxonomy the species of a genus are siblings on branches of
one length: if the covariate is whatever a genus shares plus species-level parts that are exchangeable
among congeners and independent of the embedding (Brownian motion on the rank tree, or any correlation
with the embedding deeper in the tree), the covariate values of congeners are exchangeable and the
within-genus test is exact. It asks whether the
embedding follows the covariate *among congeners*, where the tree says nothing. Image counts: a
centroid of 1 image is noisier (farther from every other centroid) than one of 20, and a covariate
built from a species' images (a share, a mean) is more extreme at small counts, so both distances can
share the image count with no link between them; matching sizes keeps that structure in every
permutation. A user tree with unequal branch lengths inside a genus makes the within-genus scheme
approximate (stated in ``permuted``).

**Measured** (``analyses/covariate_alignment_null.py --replicates 300 --power-replicates 150
--permutations 199 --seed 0``: simulated rank trees of ~200 species, 1-6 images each; rejection rate of
the partial r at α = 0.05, 95 % Clopper-Pearson interval):

===================  =====================  =====================  =====================  =====================
null world           free (classical)       within-genus           within-genus + sizes   within-family + sizes
===================  =====================  =====================  =====================  =====================
Brownian covariate   0.220 [0.174, 0.271]   0.053 [0.031, 0.085]   0.070 [0.044, 0.105]   0.057 [0.033, 0.089]
Brownian, deep       0.343 [0.290, 0.400]   0.037 [0.018, 0.065]   0.043 [0.023, 0.073]   0.073 [0.047, 0.109]
shared to the genus  0.950 [0.919, 0.972]   0.060 [0.036, 0.093]   0.057 [0.033, 0.089]   0.523 [0.465, 0.581]
image share          0.207 [0.162, 0.257]   0.070 [0.044, 0.105]   0.037 [0.018, 0.065]   0.053 [0.031, 0.085]
image share, noisy   0.273 [0.224, 0.328]   0.123 [0.088, 0.166]   0.040 [0.021, 0.069]   0.050 [0.028, 0.081]
3 categories         0.260 [0.211, 0.314]   0.047 [0.026, 0.077]   0.030 [0.014, 0.056]   0.043 [0.023, 0.073]
===================  =====================  =====================  =====================  =====================

Only within-genus with equal image counts (the default) holds 0.05 inside its interval in every null
world (0.030-0.070); without size matching it rejects 12 % when the covariate is a share of the images
and centroids of few images are noisy; within-family fails when covariate and embedding share their
history down to the genus; free permutation fails everywhere (and the plain Mantel r under free
permutation, which ignores the tree, rejects in 62-98 % of the null worlds). The price is power: only
species whose genus holds another sampled species of the same image count can move (~41 of ~200 in
those worlds; 133 of 790 on the BioCLIP-2 1k sample). With every image moved by b·z along one
direction, power at b = 1 was 0.25 [0.19, 0.33] (free: 0.72; within-genus without sizes: 0.67).
With one image per species, or a covariate measured outside the images (a trait, a habitat from a
flora), ``match_sizes=False`` is the measured-calibrated choice with more power.

Under within-genus permutations on the rank tree r_ct and r_dt do not change, so the partial and the
plain Mantel test give the same p-value; they differ under other schemes and on user trees. The r_ct
row is tested with free permutations (within-genus ones leave r_ct fixed): "does the covariate follow
the tree at all?".

**Permutations.** Permutation b of the scheme is the b-th draw of :func:`stratified_draw` ``(strata)`` from
``np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])`` (``rng.permutation(S)`` when the
scheme is free without strata); species i receives the covariate of species π_i, i.e. the covariate
matrix becomes C[π][:, π]. The r_ct row uses ``rng.permutation(S)`` draws from the second spawned
stream. p = (1 + #{permuted ≥ observed − 1e-10}) / (1 + B) (the tolerance counts permutations that
give the same value up to float rounding as ties).

**Size.** S×S matrices (cosine, covariate and tree distance plus condensed pair vectors: about
40·S² bytes, 1 GB at :data:`MAX_SPECIES` = 5,000) and O(S²) per permutation (measured 35 ms at 3,000
species, free r_ct pass included: ≈ 0.1 s at 5,000); above :data:`MAX_SPECIES` species the functions
refuse (no pair sampling).

>>> rng = np.random.default_rng(0)
>>> z = np.repeat([0.0, 1.0, 2.0, 3.0], 3)                      # a covariate, 12 species
>>> Y = rng.normal(size=(12, 5)) + np.outer(z, np.ones(5))      # centroids that follow it
>>> T = 2.0 * (np.arange(12)[:, None] // 3 != np.arange(12)[None, :] // 3)  # 4 genera of 3
>>> res = covariate_mantel(Y, z, T, permutations=99)
>>> res.table["statistic"].tolist()
['mantel_embedding_covariate', 'partial_mantel_embedding_covariate_given_tree', 'mantel_covariate_tree', 'mantel_embedding_tree']
>>> bool(res.table["r"].iloc[0] > 0.3), bool(res.table["p_value"].iloc[0] < 0.05)
(True, True)
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist, squareform

from treeprobe._validation import check_choice, check_int
from treeprobe.errors import TreeprobeError, TreeprobeWarning

__all__ = [
    "CovariateAlignmentResult", "covariate_alignment", "covariate_mantel", "covariate_distances",
    "permutation_strata", "stratified_draw", "permuted_sentence", "MAX_SPECIES", "COVARIATE_KINDS", "STATISTICS",
    "PERMUTED_FREE_CT",
]

#: Most species the S×S computation takes (about 1 GB of float64 matrices and ~0.1 s per permutation there).
MAX_SPECIES = 5000
#: How the covariate becomes a distance (``"auto"``: numeric for numeric non-boolean columns).
COVARIATE_KINDS = ("auto", "numeric", "categorical")
#: The rows of :attr:`CovariateAlignmentResult.table`, in order.
STATISTICS = ("mantel_embedding_covariate", "partial_mantel_embedding_covariate_given_tree",
              "mantel_covariate_tree", "mantel_embedding_tree")
#: ``permuted`` of the r_ct row.
PERMUTED_FREE_CT = ("covariate values permuted freely among all species: asks whether the covariate follows "
                    "the tree at all (its phylogenetic signal), the context of the partial test")

_TIE = 1e-10  # permuted correlations this far below the observed one count as ties
_CONSTANT = 1e-12  # a distance with pair variance below this fraction of its mean square is constant
_MIN_SPECIES = 4


@dataclass(kw_only=True)
class CovariateAlignmentResult:
    """Outcome of :func:`covariate_alignment` / :func:`covariate_mantel`.

    table: one row per statistic (:data:`STATISTICS`): ``statistic``, ``r``, ``p_value`` (NaN where not
    tested), ``permutations``, ``n_species``, ``permuted`` (one sentence: what the p-value permuted, and
    why). kind: ``"numeric"`` or ``"categorical"``; covariates: the column names; scheme: the permutation
    scheme (``"within-genus"``, ``"free"``, ...); match_sizes: strata split by image count;
    n_permutable: species that share their stratum with another (the others never move);
    dropped: DataFrame of the species left out (``species``, ``reason``); permuted_statistics: name →
    permuted r values (left out of :meth:`to_dict`); details: tree, sizes, notes.
    """

    table: pd.DataFrame
    kind: str
    covariates: list
    scheme: str
    match_sizes: bool
    alternative: str
    n_species: int
    n_permutable: int
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["species", "reason"]))
    permuted_statistics: dict = field(default_factory=dict, repr=False)
    details: dict = field(default_factory=dict)

    def row(self, statistic: str) -> pd.Series:
        """The table row of one statistic (a name of :data:`STATISTICS`)."""
        check_choice(statistic, "statistic", STATISTICS)
        return self.table.set_index("statistic").loc[statistic]

    @property
    def r(self) -> float:
        """The partial Mantel r_dc.t (embedding ~ covariate given the tree)."""
        return float(self.row(STATISTICS[1])["r"])

    @property
    def p_value(self) -> float:
        """p-value of the partial Mantel r under the chosen scheme."""
        return float(self.row(STATISTICS[1])["p_value"])

    def to_dict(self) -> dict:
        """JSON-ready dict (the table and ``dropped`` as lists of records; no permuted values)."""
        def clean(v):
            if isinstance(v, (np.floating, float)):
                return None if not math.isfinite(float(v)) else float(v)
            if isinstance(v, np.integer):
                return int(v)
            return v

        return dict(
            table=[{k: clean(v) for k, v in rec.items()} for rec in self.table.to_dict(orient="records")],
            kind=self.kind, covariates=list(self.covariates), scheme=self.scheme, match_sizes=self.match_sizes,
            alternative=self.alternative, n_species=self.n_species, n_permutable=self.n_permutable,
            dropped=self.dropped.to_dict(orient="records"),
            details={k: clean(v) for k, v in self.details.items()},
        )


# --- pure array functions -------------------------------------------------------------------------


def _covariate_frame(covariate) -> pd.DataFrame:
    if isinstance(covariate, pd.DataFrame):
        return covariate.reset_index(drop=True)
    if isinstance(covariate, pd.Series):
        return covariate.reset_index(drop=True).to_frame(name=covariate.name if covariate.name is not None else 0)
    arr = np.asarray(covariate)
    if arr.ndim == 1:
        return pd.DataFrame({0: arr})
    if arr.ndim == 2:
        return pd.DataFrame(arr)
    raise TreeprobeError(f"the covariate must be 1-D (S,) or 2-D (S, k); got shape {arr.shape}")


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype)


def _resolve_kind(frame: pd.DataFrame, kind: str) -> str:
    check_choice(kind, "covariate kind", COVARIATE_KINDS)
    numeric = all(_is_numeric(frame[c]) for c in frame.columns)
    if kind == "auto":
        kind = "numeric" if numeric else "categorical"
    if kind == "categorical" and frame.shape[1] != 1:
        raise TreeprobeError(f"a categorical covariate is one column; got {frame.shape[1]} "
                             f"({', '.join(map(str, frame.columns))}): test them one at a time")
    if kind == "numeric" and not numeric:
        bad = [str(c) for c in frame.columns if not _is_numeric(frame[c])]
        raise TreeprobeError(f"numeric covariate column(s) {', '.join(bad)} hold non-numbers; "
                             "use kind='categorical' for labels")
    return kind


def covariate_distances(covariate, kind: str = "auto") -> tuple[np.ndarray, str]:
    """(covariate distance float64 (S, S), kind) of one value (or row of k values) per species.

    ``covariate``: (S,) or (S, k) array, Series or DataFrame, no missing values. Numeric, one column:
    |z_i − z_j| (its units); numeric, k > 1 columns: Euclidean distance of the columns standardised to
    mean 0, sample sd 1 over the S species; categorical (one column): 0 same, 1 different. Raises if a
    column is constant (nothing to align with).

    >>> covariate_distances([1.0, 4.0, 2.0])[0].tolist()
    [[0.0, 3.0, 1.0], [3.0, 0.0, 2.0], [1.0, 2.0, 0.0]]
    >>> covariate_distances(["wet", "dry", "wet"])
    (array([[0., 1., 0.],
           [1., 0., 1.],
           [0., 1., 0.]]), 'categorical')
    """
    frame = _covariate_frame(covariate)
    kind = _resolve_kind(frame, kind)
    if frame.isna().to_numpy().any():
        raise TreeprobeError(f"the covariate is missing for {int(frame.isna().any(axis=1).sum())} species: "
                             "drop them first")
    for c in frame.columns:
        if frame[c].nunique() < 2:
            raise TreeprobeError(f"the covariate {c!r} is constant across the {len(frame)} species: "
                                 "there is nothing to align with")
    if kind == "categorical":
        codes = pd.factorize(frame.iloc[:, 0], sort=True)[0]
        return (codes[:, None] != codes[None, :]).astype(np.float64), kind
    Z = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(Z).all():
        raise TreeprobeError("the numeric covariate has non-finite values")
    if Z.shape[1] == 1:
        return np.abs(Z[:, 0][:, None] - Z[:, 0][None, :]), kind
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0, ddof=1)
    return squareform(pdist(Z)), kind


def permutation_strata(groups, sizes=None) -> np.ndarray:
    """Stratum label (int64 (S,)) per species for :func:`covariate_mantel`: species share a stratum when
    they share ``groups`` (e.g. genus codes; −1 = unknown: a stratum of its own) and, if given, ``sizes``.

    >>> permutation_strata([0, 0, 1, -1, -1], sizes=[1, 1, 1, 1, 1]).tolist()
    [0, 0, 1, 2, 3]
    >>> permutation_strata([0, 0, 0], sizes=[1, 2, 1]).tolist()
    [0, 1, 0]
    """
    g = np.asarray(groups, dtype=np.int64)
    if g.ndim != 1:
        raise TreeprobeError(f"groups must be 1-D (S,); got shape {g.shape}")
    g = g.copy()
    unknown = g < 0
    g[unknown] = g.max(initial=-1) + 1 + np.arange(int(unknown.sum()))
    cols = [g]
    if sizes is not None:
        s = np.asarray(sizes, dtype=np.int64)
        if s.shape != g.shape:
            raise TreeprobeError(f"sizes must have one entry per species ({len(g)}); got shape {s.shape}")
        cols.append(s)
    key = pd.MultiIndex.from_arrays(cols) if len(cols) > 1 else pd.Index(cols[0])
    return pd.factorize(key)[0].astype(np.int64)


def stratified_draw(strata) -> Callable[[np.random.Generator], np.ndarray]:
    """``draw(rng)`` → a random permutation π (int64 (S,)) with ``strata[π] == strata``, uniform over those.

    One vectorised draw: species are ordered by (stratum, ``rng.random(S)`` key) and the k-th species of
    the stratum-sorted order (stable, by index) receives the k-th of that random order: O(S log S).

    >>> pi = stratified_draw(np.array([0, 1, 0, 1, 2]))(np.random.default_rng(0))
    >>> sorted(pi.tolist()), np.array([0, 1, 0, 1, 2])[pi].tolist()
    ([0, 1, 2, 3, 4], [0, 1, 0, 1, 2])
    """
    strata = np.asarray(strata)
    base = np.argsort(strata, kind="stable")
    S = len(strata)

    def draw(rng: np.random.Generator) -> np.ndarray:
        pi = np.empty(S, dtype=np.int64)
        pi[base] = np.lexsort((rng.random(S), strata))
        return pi

    return draw


def permuted_sentence(scheme: str, *, match_sizes: bool = False, user_tree: bool = False) -> str:
    """The one-sentence ``permuted`` text of a scheme (``"free"`` or ``"within-<rank>"``).

    >>> permuted_sentence("free")[:45]
    'covariate values permuted freely among all sp'
    """
    size = " with the same number of images" if match_sizes else ""
    if scheme == "free":
        return (f"covariate values permuted freely among all species{size} (the classical partial Mantel scheme, "
                "as vegan::mantel.partial): anti-conservative when covariate and embedding both follow the tree")
    rank = scheme.split("-", 1)[1]
    exact = ("approximate on a user tree, whose branch lengths inside a " + rank + " may differ" if user_tree else
             "exact on the rank taxonomy, where the species of one " + rank + " are siblings on equal branches"
             if rank == "genus" else
             "approximate: species of one " + rank + " are not all siblings on the tree")
    return (f"covariate values permuted only among species of the same {rank}{size} (species alone in their "
            f"stratum kept), so whatever the tree explains stays in every permutation and the p-value asks "
            f"whether the embedding follows the covariate beyond the tree ({exact})")


def _condensed(M: np.ndarray) -> np.ndarray:
    return squareform(M, checks=False)


def _standardised(v: np.ndarray) -> tuple[np.ndarray | None, float]:
    """((v − mean)/‖v − mean‖, ‖v − mean‖) or (None, 0) when v is constant over the pairs."""
    vc = v - v.mean()
    nv = float(np.linalg.norm(vc))
    if not nv * nv > _CONSTANT * len(v) * float(np.mean(v * v)):
        return None, 0.0
    return vc / nv, nv


def _pair_sums_numpy(C: np.ndarray, a: np.ndarray, b: np.ndarray, perm: np.ndarray) -> tuple[float, float]:
    """(Σ_{i<j} C[π_i, π_j]·a_ij, the same with b): a, b condensed (row-major upper triangle)."""
    cp = _condensed(C[np.ix_(perm, perm)])
    return float(cp @ a), float(cp @ b)


@functools.lru_cache(maxsize=None)
def _compiled_pair_sums():
    """The numba form of :func:`_pair_sums_numpy` (one pass for both sums), or None without numba."""
    try:
        from numba import njit
    except Exception:  # pragma: no cover - numba is a dependency of umap-learn
        return None

    @njit(nogil=True, cache=True)
    def pair_sums(C, a, b, perm):  # pragma: no cover - compiled
        n = perm.shape[0]
        s1 = 0.0
        s2 = 0.0
        k = 0
        for i in range(n - 1):
            row = C[perm[i]]
            t1 = 0.0
            t2 = 0.0
            for j in range(i + 1, n):
                v = row[perm[j]]
                t1 += v * a[k]
                t2 += v * b[k]
                k += 1
            s1 += t1
            s2 += t2
        return s1, s2

    return pair_sums


def _pair_sums():
    """Σ C[π_i, π_j]·a_ij and ·b_ij over i < j: compiled unless numba is off (TREEPROBE_NO_NUMBA)."""
    from treeprobe._utils import numba_enabled

    k = _compiled_pair_sums() if numba_enabled() else None
    return k if k is not None else _pair_sums_numpy


def _p(obs: float, perm: np.ndarray, alternative: str) -> float:
    if perm.size == 0 or not np.isfinite(obs):
        return float("nan")
    if alternative == "greater":
        hits = np.sum(perm >= obs - _TIE)
    elif alternative == "less":
        hits = np.sum(perm <= obs + _TIE)
    else:
        hits = np.sum(np.abs(perm) >= abs(obs) - _TIE)
    return float((hits + 1) / (perm.size + 1))


def _partial(r_dc, r_dt: float, r_ct):
    with np.errstate(divide="ignore", invalid="ignore"):
        return (r_dc - r_dt * r_ct) / np.sqrt((1.0 - r_dt * r_dt) * (1.0 - r_ct * r_ct))


def _moves(frame: pd.DataFrame, strata: np.ndarray) -> bool:
    """Whether some stratum holds two species with different covariate values."""
    key = pd.Series(pd.factorize(pd.MultiIndex.from_frame(frame.astype(str)))[0])
    return bool((key.groupby(np.asarray(strata)).nunique() > 1).any())


def _tree_matrix(tree, S: int) -> np.ndarray:
    from treeprobe.tree import CladeStructure

    if isinstance(tree, CladeStructure):
        if tree.n_items != S:
            raise TreeprobeError(f"the tree holds {tree.n_items} items but there are {S} species")
        return tree.item_distances()
    T = np.asarray(tree, dtype=np.float64)
    if T.shape != (S, S):
        raise TreeprobeError(f"the tree distance must be ({S}, {S}) or a CladeStructure over the species; "
                             f"got shape {T.shape}")
    if not np.isfinite(T).all() or not np.allclose(T, T.T):
        raise TreeprobeError("the tree distance must be finite and symmetric")
    return T


def covariate_mantel(centroids, covariate, tree, *, strata=None, kind: str = "auto", permutations: int = 999,
                     seed: int | None = 0, alternative: str = "greater", permuted: str | None = None,
                     scheme: str | None = None, test_tree_covariate: bool = True,
                     progress: bool = False) -> CovariateAlignmentResult:
    """Mantel r_dc, partial Mantel r_dc.t, r_ct and r_dt of S species with their permutation p-values.

    centroids: float (S, D), one row per species (normalised to unit length here; d = cosine distance);
    covariate: (S,) or (S, k), see :func:`covariate_distances`; tree: float (S, S) tree distance or a
    :class:`~treeprobe.tree.CladeStructure` whose items are the S species. strata: int (S,) labels
    (:func:`permutation_strata`): the covariate moves only among species of one label; None: freely.
    ``permuted``/``scheme``: the sentence and name stored with the p-values (default: from ``strata``).
    The r_dc and r_dc.t rows use the scheme's permutations, the r_ct row free ones (module docstring);
    r_dt has no p-value (``test_tree_covariate=False``: nor r_ct, saving a third of the work).
    4 ≤ S ≤ :data:`MAX_SPECIES`. O(S²) memory and time per permutation.
    """
    from treeprobe.mantel import ALTERNATIVES, cosine_distance_condensed
    from treeprobe.permutation import n_permutable_species

    permutations = check_int(permutations, "permutations", minimum=0)
    check_choice(alternative, "alternative", ALTERNATIVES)
    Y = np.asarray(centroids, dtype=np.float64)
    if Y.ndim != 2:
        raise TreeprobeError(f"centroids must be 2-D (S, D); got shape {Y.shape}")
    S = len(Y)
    if S < _MIN_SPECIES:
        raise TreeprobeError(f"covariate alignment needs at least {_MIN_SPECIES} species; got {S}")
    if S > MAX_SPECIES:
        raise TreeprobeError(f"covariate alignment builds S×S matrices and takes at most {MAX_SPECIES} species; "
                             f"got {S}: subsample species (e.g. per genus) first")
    norms = np.linalg.norm(Y, axis=1)
    if not np.isfinite(norms).all() or (norms == 0).any():
        raise TreeprobeError("centroids must be finite and non-zero")
    frame = _covariate_frame(covariate)
    if len(frame) != S:
        raise TreeprobeError(f"the covariate has {len(frame)} rows but there are {S} species")
    C, kind = covariate_distances(frame, kind)
    T = _tree_matrix(tree, S)
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (S,):
            raise TreeprobeError(f"strata must have one label per species ({S}); got shape {strata.shape}")
    d = cosine_distance_condensed(Y)
    ds, _ = _standardised(d)
    if ds is None:
        raise TreeprobeError("the centroids' cosine distances are all equal: the correlation is undefined")
    cs_, nc = _standardised(_condensed(C))
    if cs_ is None:
        raise TreeprobeError("the covariate distance is constant over the species pairs")
    ts, _ = _standardised(_condensed(T))
    C = np.ascontiguousarray(C)
    pair_sums = _pair_sums()
    ident = np.arange(S, dtype=np.int64)
    zeros = np.zeros_like(ds)
    s_dc, s_ct = pair_sums(C, ds, ts if ts is not None else zeros, ident)
    r_dc = float(s_dc / nc)
    if ts is None:  # a star tree: nothing to partial out
        r_dt = r_ct = float("nan")
        r_part = r_dc
    else:
        r_dt = float(ds @ ts)
        r_ct = float(s_ct / nc)
        if max(abs(r_dt), abs(r_ct)) > 1 - 1e-12:
            raise TreeprobeError("the tree distance is perfectly correlated with the covariate or the embedding "
                                 "distance: the partial correlation is undefined")
        r_part = float(_partial(r_dc, r_dt, r_ct))
    ss = np.random.SeedSequence(seed)
    rng, rng_free = (np.random.default_rng(s) for s in ss.spawn(2))
    draw = stratified_draw(strata) if strata is not None else (lambda g: g.permutation(S))
    from tqdm.auto import tqdm

    p_dc, p_ct, p_ctf = np.empty(permutations), np.empty(permutations), np.empty(permutations)
    for b in tqdm(range(permutations), desc="covariate permutations", disable=not progress, leave=False):
        pi = np.ascontiguousarray(draw(rng), dtype=np.int64)
        s_dc, s_ct = pair_sums(C, ds, ts if ts is not None else zeros, pi)
        p_dc[b], p_ct[b] = s_dc / nc, s_ct / nc
        if ts is not None and test_tree_covariate:
            p_ctf[b] = pair_sums(C, ts, zeros, rng_free.permutation(S).astype(np.int64))[0] / nc
    p_part = p_dc if ts is None else _partial(p_dc, r_dt, p_ct)
    n_perm = n_permutable_species(strata) if strata is not None else S
    if scheme is None:
        scheme = "free" if strata is None else "strata"
    if permuted is None:
        permuted = (permuted_sentence("free") if strata is None else
                    "covariate values permuted only among species of the same stratum (species alone in theirs kept)")
    if permutations and n_perm > 0 and strata is not None and not _moves(frame, strata):
        warnings.warn("the covariate is constant within every permutation stratum: no permutation moves it and "
                      "every p-value of the scheme is 1 (the tree, at this rank, explains all of its variation)",
                      TreeprobeWarning, stacklevel=2)
    if permutations and n_perm == 0:
        warnings.warn("no two species share a permutation stratum: every permutation is the identity and every "
                      "p-value is 1 (use a coarser scheme, e.g. permute='within-family', or match_sizes=False)",
                      TreeprobeWarning, stacklevel=2)
    B = permutations
    ct_tested = ts is not None and test_tree_covariate
    if not ct_tested:
        p_ctf = np.zeros(0)
    table = pd.DataFrame([
        dict(statistic=STATISTICS[0], r=r_dc, p_value=_p(r_dc, p_dc, alternative), permutations=B, n_species=S,
             permuted=permuted),
        dict(statistic=STATISTICS[1], r=r_part, p_value=_p(r_part, p_part, alternative), permutations=B,
             n_species=S, permuted=permuted),
        dict(statistic=STATISTICS[2], r=r_ct, p_value=_p(r_ct, p_ctf, alternative) if ct_tested else np.nan,
             permutations=B if ct_tested else 0, n_species=S,
             permuted=PERMUTED_FREE_CT if ct_tested else "not tested (test_tree_covariate=False)"),
        dict(statistic=STATISTICS[3], r=r_dt, p_value=np.nan, permutations=0, n_species=S,
             permuted="not tested here: the embedding's tree signal is treeprobe.tl.mantel / tl.physignal"),
    ])
    log_distinct = 0.0
    if strata is not None:
        _, counts = np.unique(strata, return_counts=True)
        log_distinct = float(sum(math.lgamma(k + 1) for k in counts))
    else:
        log_distinct = math.lgamma(S + 1)
    details = dict(seed=seed, n_pairs=S * (S - 1) // 2, log10_distinct_permutations=log_distinct / math.log(10),
                   mean_embedding_distance=float(d.mean()), mean_covariate_distance=float(_condensed(C).mean()))
    if ts is None:
        details["note"] = "the tree distance is constant (a star tree): the partial r equals the plain r"
    return CovariateAlignmentResult(
        table=table, kind=kind, covariates=[str(c) for c in frame.columns], scheme=scheme,
        match_sizes=False, alternative=alternative, n_species=S, n_permutable=int(n_perm),
        permuted_statistics={STATISTICS[0]: p_dc, STATISTICS[1]: np.asarray(p_part),
                             STATISTICS[2]: p_ctf},
        details=details)


# --- on a TreeData --------------------------------------------------------------------------------


def _check_scheme(permute: str, ranks) -> str:
    choices = ["free"] + [f"within-{r}" for r in ranks[:-1]]
    return check_choice(permute, "covariate permutation scheme", choices)


def _unit_covariates(data, covariates, first: np.ndarray, units: np.ndarray, in_tree: np.ndarray,
                     names: np.ndarray) -> pd.DataFrame:
    """One row per unit (species leaf) of covariate values; NaN where missing."""
    if isinstance(covariates, (pd.Series, pd.DataFrame)):
        frame = covariates.to_frame() if isinstance(covariates, pd.Series) else covariates.copy()
        frame = frame.copy()
        frame.index = [str(k).replace("_", " ").strip() for k in frame.index]
        if frame.index.has_duplicates:
            dup = frame.index[frame.index.duplicated()][0]
            raise TreeprobeError(f"the covariate index names species {dup!r} twice: give one value per species")
        found = np.array([bool(n) and n in frame.index for n in names])
        if not found.any():
            raise TreeprobeError("no species of the data is in the covariate's index (index it by species binomial)")
        out = frame.reindex(np.where(found, names, frame.index[0])).reset_index(drop=True)
        out.loc[~found] = np.nan
        return out
    cols = [covariates] if isinstance(covariates, str) else list(covariates)
    if not cols:
        raise TreeprobeError("no covariate column given")
    missing = [c for c in cols if c not in data.items.columns]
    if missing:
        raise TreeprobeError(f"covariate column {missing[0]!r} is not a column of the items "
                             f"(columns: {', '.join(map(str, data.items.columns))})")
    items = data.items.loc[in_tree, cols].reset_index(drop=True)
    for c in cols:
        col = items[c]
        key = col.astype(object).where(col.notna(), "\0missing")
        n_vals = pd.Series(key.to_numpy()).groupby(units).nunique()
        bad = n_vals.index[n_vals.to_numpy() > 1]
        if len(bad):
            u = int(bad[0])
            vals = sorted(map(str, pd.unique(col[units == u])))[:4]
            raise TreeprobeError(f"covariate {c!r} varies within species {names[u] or 'unit ' + str(u)!r} "
                                 f"(values {', '.join(vals)}) and {len(bad) - 1} other(s): give one value per species "
                                 "(e.g. a per-species share or mean as a Series indexed by species)")
    return items.iloc[first].reset_index(drop=True)


def covariate_alignment(data, covariates, *, tree=None, rank_lengths=None, kind: str = "auto",
                        permute: str = "within-genus", match_sizes: bool = True, permutations: int = 999,
                        seed: int | None = 0, min_images: int = 1, alternative: str = "greater",
                        progress: bool = False) -> CovariateAlignmentResult:
    """Does the embedding of a :class:`~treeprobe.core.TreeData` follow a species covariate beyond the tree?

    covariates: a column name (or list of names) of ``data.items`` holding one value per species
    (refused, naming the species, if it varies within one), or a Series / DataFrame indexed by species
    binomial. Species with a missing value, or with fewer than ``min_images`` images, are left out
    (listed in ``dropped``). tree: None (the rank taxonomy, ``rank_lengths``; an item unknown at species
    is its own leaf) or an ete3 tree / Newick file / Newick string over species binomials.
    permute: ``"within-genus"`` (default; with ``match_sizes`` the one scheme measured calibrated in every
    null world, see the module docstring), any
    ``"within-<rank>"``, or ``"free"`` (classical); ``match_sizes``: permute only among species with the
    same number of images too. The rest as :func:`covariate_mantel`.
    """
    from treeprobe.core import TreeData
    from treeprobe.physignal import _read_tree
    from treeprobe.tl import _centroid_inputs, _mantel_inputs

    if not isinstance(data, TreeData):
        raise TreeprobeError(f"expected a treeprobe.TreeData, got {type(data).__name__}")
    tax = data.taxonomy
    _check_scheme(permute, tax.ranks)
    min_images = check_int(min_images, "min_images", minimum=1)
    if not isinstance(match_sizes, bool):
        raise TreeprobeError(f"match_sizes must be True or False; got {match_sizes!r}")
    ete_tree = _read_tree(tree)
    X_m, clades, units, info, in_tree = _mantel_inputs(data, ete_tree, rank_lengths)
    n_units = int(units.max()) + 1
    first = np.zeros(n_units, dtype=np.int64)
    first[units[::-1]] = np.arange(len(units))[::-1]
    species_col = tax.lineages[tax.ranks[-1]].to_numpy(dtype=object)[in_tree]
    names = np.array([str(s) for s in species_col[first]], dtype=object)
    frame = _unit_covariates(data, covariates, first, units, in_tree, names)
    sizes = np.bincount(units, minlength=n_units)
    Y_all, cs_all = _centroid_inputs(X_m, clades, units)
    label = np.where(names != "", names, np.asarray(cs_all.names, dtype=object)[cs_all.item_node])
    miss = frame.isna().any(axis=1).to_numpy()
    small = sizes < min_images
    dropped = pd.DataFrame(dict(
        species=np.concatenate([label[miss], label[small & ~miss]]),
        reason=["missing covariate"] * int(miss.sum()) + [f"fewer than {min_images} images"] * int((small & ~miss).sum())))
    keep = np.flatnonzero(~miss & ~small)
    if len(keep) < _MIN_SPECIES:
        raise TreeprobeError(f"covariate alignment needs at least {_MIN_SPECIES} species with a covariate value; "
                             f"got {len(keep)} ({len(dropped)} left out)")
    if len(keep) > MAX_SPECIES:
        raise TreeprobeError(f"covariate alignment builds S×S matrices and takes at most {MAX_SPECIES} species; "
                             f"got {len(keep)}: subsample species first")
    cs = cs_all.subset_items(keep)
    cov = frame.iloc[keep].reset_index(drop=True)
    if permute == "free":
        strata = sizes[keep] if match_sizes else None
    else:
        rank = permute.split("-", 1)[1]
        groups = tax.codes(rank)[in_tree][first][keep]
        strata = permutation_strata(groups, sizes[keep] if match_sizes else None)
    sentence = permuted_sentence(permute, match_sizes=match_sizes, user_tree=ete_tree is not None)
    res = covariate_mantel(Y_all[keep], cov, cs, strata=strata, kind=kind, permutations=permutations, seed=seed,
                           alternative=alternative, permuted=sentence, scheme=permute, progress=progress)
    res.match_sizes = match_sizes
    res.dropped = dropped
    res.covariates = ([covariates] if isinstance(covariates, str) else
                      [str(c) for c in cov.columns])
    res.details.update(tree=info, n_items=int(in_tree.sum()), n_items_not_in_tree=int((~in_tree).sum()),
                       n_dropped=len(dropped), images_per_species_median=float(np.median(sizes[keep])),
                       centroids="unit-norm mean of unit embeddings")
    return res
