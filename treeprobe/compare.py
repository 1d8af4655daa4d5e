"""Several models on the same items: every intrinsic metric per model, and paired inference on
the differences between models.

**Pairing.** :func:`align` puts the models' :class:`~treeprobe.core.TreeData` row for row on the same
items (matched by an id column, ``path`` by default) and refuses a mismatch with a clear error:
a difference between two models is only meaningful on the same images.

**What is resampled, and why.** Images of one species are not independent draws, so every
interval and every paired p-value here treats whole **species** as the units (the tree's leaves;
an item whose species is unknown is a leaf of its own), never images:

* Mantel r (image level: between-species pairs, as the default test of :func:`treeprobe.tl.mantel`;
  species-centroid level; the partial Mantel r): a **species bootstrap** (species drawn with
  replacement, each with all its images; both models see the same draw, so the difference is
  paired). A pair of items from species u and v gets weight w_u · w_v in the resampled statistic.
  The sums run over every between-species pair up to ``max_pairs`` pairs and over a seeded uniform
  sample of ``max_pairs`` pairs above it (the point estimates stay the exact ones of
  :func:`treeprobe.tl.mantel`; the sample only sets the width of the interval). Interval: the
  bootstrap percentiles of Δ* − Δ̃ added to the exact Δ̂ (Δ̃: the statistic on the pairs used);
  p-value (two-sided, H0: no difference): ``(1 + #{|Δ* − Δ̃| ≥ |Δ̂|}) / (B + 1)``. A
  permutation of model labels is not used for Mantel r: swapping one species' vectors between
  two models would compare vectors from two unrelated spaces (the clustering swap test below aligns them
  first).
* kNN agreement (per rank, and level-specific) and clustering (purity, NMI, ARI per rank and
  method): a **delete-a-group jackknife over species**: ``jackknife`` random groups of species are
  left out in turn and every kNN search and clustering is redone on the rest, with the same seed
  for every model; interval ±1.96 jackknife se, p-value two-sided normal. Two cheaper schemes were
  tried first and rejected by the null worlds: per-item kNN scores treated as independent between
  species (a species-level sign-flip test, and a variance over species and neighbour pairs) were
  anti-conservative, because an item's score moves when any item near it moves (on real BioCLIP-2
  vectors the neighbour-pair variance still rejected in up to 41 % of null worlds); and holding the
  clusterings fixed while resampling species rejected in 29-43 %, because which local optimum
  k-means finds changes with small changes of the data. The jackknife costs ``jackknife`` more kNN
  searches and clusterings per model (0 turns these comparisons off). For clustering scores it is
  valid but very conservative (at most 3 of 200 null worlds rejected per test at α = 0.05; the variance
  is 2-7 × too large, for Ward as for k-means, and a species bootstrap is no better: clustering scores
  are not smooth in the species sample; analyses/NULL_CALIBRATION.md runs 7 and 10), so a clustering
  difference's p-value is an upper bound and its interval wide. ``cluster_test="swap"`` gives a calibrated
  p-value instead: a **paired permutation of model labels within species** (:func:`_swap_p_values`): each
  species' images are swapped between the two models with probability 1/2 (the smaller model padded with
  zero coordinates and model b rotated onto model a by orthogonal Procrustes first, which leaves each model's
  own clustering unchanged) and both hybrids re-clustered. Under the null "the two models' images of a species
  are exchangeable" (the same model with independent noise) the test is exact whatever the statistic's
  smoothness; on the null worlds it rejects at α (run 13). It costs 2 × ``cluster_permutations`` clusterings
  per model pair.

Zero-shot top-1 per rank (when every model carries text embeddings): species bootstrap of the images'
hits, the same draws for both models (:func:`_zeroshot_rows`; calibrated to slightly conservative, run 11).

Holm's correction is applied across ranks within each (metric, model pair) family
(``p_holm``). The calibration of these tests on null worlds (two models that are the same model
with independent noise) is measured by the ``compare`` and ``compare-clustering`` families of
``analyses/null_calibration.py`` (results: ``analyses/NULL_CALIBRATION.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import combinations
from typing import Mapping

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS, SEED_BOUND
from treeprobe._validation import check_int
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError

__all__ = ["align", "compare", "Comparison", "holm", "species_units", "species_bootstrap_weights",
           "pair_bootstrap_pearson", "ALIGN_KEYS", "DIFF_COLUMNS"]

#: Id columns tried, in order, to match items across models.
ALIGN_KEYS = ("path", "uuid", "id", "item")
#: Columns of the differences table.
DIFF_COLUMNS = ["metric", "rank", "model_a", "model_b", "estimate_a", "estimate_b", "difference", "ci_low",
                "ci_high", "p_value", "p_holm", "n_units", "scheme"]
MODEL_COLUMNS = ["model", "metric", "rank", "estimate", "ci_low", "ci_high", "chance", "p_value", "n", "note"]

BOOTSTRAP_SCHEME = "species bootstrap (species resampled with all their images; same draws for both models)"
JACKKNIFE_SCHEME = ("delete-a-group jackknife over species (random groups of species left out in turn, every kNN "
                    "search or clustering redone on the rest), normal approximation")
_CHUNK = 1 << 15


# --- alignment -------------------------------------------------------------------------------


def _id_column(datasets: Mapping[str, TreeData], on: str | None) -> str:
    if on is not None:
        for name, ds in datasets.items():
            if on not in ds.items.columns:
                raise TreeprobeError(f"model {name!r}: no id column {on!r} in its items")
        return on
    for key in ALIGN_KEYS:
        if all(key in ds.items.columns and ds.items[key].notna().all() and ds.items[key].astype(str).ne("").all()
               for ds in datasets.values()):
            return key
    raise TreeprobeError(f"cannot match items across models: none of the id columns {', '.join(ALIGN_KEYS)} is "
                         "filled in for every model; pass on=COLUMN")


def align(datasets: Mapping[str, TreeData], *, on: str | None = None, mismatch: str = "error"
          ) -> dict[str, TreeData]:
    """The models' data sets on the same items, in the first model's row order.

    datasets: model name → TreeData with embeddings (≥ 2 models). on: the id column (default the
    first of :data:`ALIGN_KEYS` filled in everywhere; ids must be unique within a model), or
    ``"row"``: the data sets are already row for row the same items.
    mismatch: ``"error"`` (default: items missing from some model, e.g. set aside there, are an
    error naming them) or ``"intersect"`` (keep the items every model has). Lineages must agree.
    """
    if len(datasets) < 2:
        raise TreeprobeError(f"a comparison needs at least 2 models, got {len(datasets)}")
    if mismatch not in ("error", "intersect"):
        raise TreeprobeError(f"mismatch must be 'error' or 'intersect', got {mismatch!r}")
    for name, ds in datasets.items():
        if not isinstance(ds, TreeData) or ds.X is None:
            raise TreeprobeError(f"model {name!r}: expected a TreeData with embeddings")
    if on == "row":
        sizes = {name: len(ds) for name, ds in datasets.items()}
        if len(set(sizes.values())) > 1:
            raise TreeprobeError(f"on='row' pairs items by position, but the models have different numbers of "
                                 f"items: {sizes}")
    key = "row" if on == "row" else _id_column(datasets, on)
    ids = {}
    for name, ds in datasets.items():
        col = pd.Series(np.arange(len(ds))).astype(str) if key == "row" else ds.items[key].astype(str)
        dup = col[col.duplicated()]
        if len(dup):
            raise TreeprobeError(f"model {name!r}: {len(dup)} duplicated {key} values (e.g. {dup.iloc[0]!r}); "
                                 "items must be unique to be paired")
        ids[name] = pd.Index(col)
    names = list(datasets)
    common = ids[names[0]]
    for name in names[1:]:
        common = common[common.isin(ids[name])]
    for name in names:
        extra = ids[name][~ids[name].isin(common)]
        if len(extra) and mismatch == "error":
            others = [n for n in names if n != name]
            lost = {n: ", ".join(datasets[n].skipped["item"].astype(str).head(3)) for n in others
                    if len(datasets[n].skipped)}
            hint = "; set aside there: " + "; ".join(f"{n}: {v}" for n, v in lost.items()) if lost else ""
            raise TreeprobeError(
                f"the models do not cover the same items: {len(extra)} of model {name!r}'s {len(ids[name])} items "
                f"(by {key}) are missing from another model (e.g. {extra[0]!r}){hint}; "
                "pass mismatch='intersect' (--intersect) to compare on the shared items")
    if len(common) < 4:
        raise TreeprobeError(f"only {len(common)} items are shared by all models; need at least 4")
    out = {}
    for name in names:
        pos = ids[name].get_indexer(common)
        out[name] = datasets[name].subset(pos)
    ref = out[names[0]].items
    for name in names[1:]:
        for rank in RANKS:
            a = ref[rank].astype(str).to_numpy()
            b = out[name].items[rank].astype(str).to_numpy()
            bad = np.flatnonzero(a != b)
            if bad.size:
                raise TreeprobeError(f"item {common[bad[0]]!r} has {rank} {a[bad[0]]!r} in model {names[0]!r} but "
                                     f"{b[bad[0]]!r} in model {name!r}: the models must be scored on the same lineages")
    return out


# --- resampling units and weights --------------------------------------------------------------


def species_units(data: TreeData) -> np.ndarray:
    """int64 (N,): each item's species unit 0..S−1, the tree's leaves (an item whose species is
    unknown is a unit of its own: an unknown is not evidence of identity)."""
    codes = np.asarray(data.taxonomy.codes(RANKS[-1]), dtype=np.int64).copy()
    unknown = codes < 0
    codes[unknown] = codes.max(initial=-1) + 1 + np.arange(int(unknown.sum()))
    return pd.factorize(codes, sort=True)[0].astype(np.int64)


def species_bootstrap_weights(n_units: int, bootstrap: int, seed: int) -> np.ndarray:
    """float64 (B, S): how many times each of ``n_units`` species is drawn in each of ``bootstrap``
    resamples of S species with replacement (seeded; row sums S)."""
    check_int(n_units, "n_units", minimum=2)
    check_int(bootstrap, "bootstrap", minimum=1)
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=bootstrap).astype(np.float64)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (float (m,), NaN kept as NaN and not counted)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def _percentile_ci(shifts: np.ndarray, estimate: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(shifts, [2.5, 97.5]) if np.isfinite(shifts).any() else (np.nan, np.nan)
    return float(estimate + lo), float(estimate + hi)


def _bootstrap_p(shifts: np.ndarray, estimate: float) -> float:
    """Two-sided p of H0 'no difference' from the centred bootstrap distribution ``shifts``."""
    shifts = shifts[np.isfinite(shifts)]
    if not shifts.size or not np.isfinite(estimate):
        return np.nan
    return float((1 + np.sum(np.abs(shifts) >= abs(estimate) - 1e-12)) / (shifts.size + 1))


# --- Mantel r: species bootstrap over item pairs ------------------------------------------------


def _between_pairs(units: np.ndarray, max_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of items in different units: all of them up to ``max_pairs``, else a
    uniform random sample of about ``max_pairs`` of them."""
    n = units.size
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        i = rng.integers(0, n, size=max_pairs)
        j = rng.integers(0, n - 1, size=max_pairs)
        j = j + (j >= i)  # uniform over j != i
    keep = units[i] != units[j]
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


def _pair_distances(Xn: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(i.size)
    for a in range(0, i.size, _CHUNK):
        out[a:a + _CHUNK] = 1.0 - np.einsum("ij,ij->i", Xn[i[a:a + _CHUNK]], Xn[j[a:a + _CHUNK]], dtype=np.float64)
    return out


def _corr(n, s_x, s_y, s_xx, s_yy, s_xy):
    cov = s_xy / n - (s_x / n) * (s_y / n)
    vx = s_xx / n - (s_x / n) ** 2
    vy = s_yy / n - (s_y / n) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(vx * vy)


def pair_bootstrap_pearson(d: np.ndarray, t: np.ndarray, *, ui: np.ndarray, uj: np.ndarray, weights: np.ndarray,
                           z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Pearson r between each row of ``d`` (M, P: one distance per pair and model) and ``t``
    (P,) over the pairs, unweighted and under each bootstrap weight vector.

    Pair p joins units ui[p] and uj[p] (int (P,)); under weights w (a row of ``weights`` (B, S)) it
    counts w[ui] · w[uj] times. With ``z`` (P,) (a covariate distance) the statistic is the partial
    r(d, t | z). Returns (r (M,) with unit weights, r* (B, M)).
    """
    d = np.atleast_2d(np.asarray(d, dtype=np.float64))
    t = np.asarray(t, dtype=np.float64)
    M, P = d.shape
    cols = [np.ones(P), t, t * t]
    cols += list(d) + list(d * d) + list(d * t)
    if z is not None:
        z = np.asarray(z, dtype=np.float64)
        cols += [z, z * z, t * z] + list(d * z)
    F = np.stack(cols, axis=1)  # (P, F)
    full = F.sum(axis=0)
    boot = np.zeros((weights.shape[0], F.shape[1]))
    for a in range(0, P, _CHUNK):
        wp = weights[:, ui[a:a + _CHUNK]] * weights[:, uj[a:a + _CHUNK]]
        boot += wp @ F[a:a + _CHUNK]

    def stat(s):
        n, st, stt = s[..., 0], s[..., 1], s[..., 2]
        sd, sdd, sdt = (s[..., 3 + k * M: 3 + (k + 1) * M] for k in range(3))
        n_, st_, stt_ = (x[..., None] for x in (n, st, stt))
        r_dt = _corr(n_, sd, st_, sdd, stt_, sdt)
        if z is None:
            return r_dt
        base = 3 + 3 * M
        sz, szz, stz = (s[..., base + k][..., None] for k in range(3))
        sdz = s[..., base + 3: base + 3 + M]
        r_dz = _corr(n_, sd, sz, sdd, szz, sdz)
        r_tz = _corr(n_, st_, sz, stt_, szz, stz)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (r_dt - r_dz * r_tz) / np.sqrt((1 - r_dz ** 2) * (1 - r_tz ** 2))

    return stat(full), stat(boot)


def _covariate_distance(values: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    v = pd.Series(values)
    if pd.api.types.is_numeric_dtype(v):
        x = v.to_numpy(dtype=float)
        return np.abs(x[i] - x[j])
    codes = pd.factorize(v.astype(str))[0]
    return (codes[i] != codes[j]).astype(np.float64)


# --- clustering: delete-a-group jackknife -----------------------------------------------------


def _jackknife_se(values: np.ndarray) -> float:
    """Delete-a-group jackknife standard error from the G leave-one-group-out values (G,)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    g = v.size
    return float(np.sqrt((g - 1) / g * np.sum((v - v.mean()) ** 2))) if g >= 2 else np.nan


def _normal_p(estimate: float, se: float) -> float:
    from scipy.stats import norm

    if not (np.isfinite(estimate) and np.isfinite(se)):
        return np.nan
    if se <= 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * norm.sf(abs(estimate) / se))


def _jackknife(aligned: dict, names: list, units: np.ndarray, *, groups: int, seed: int, score) -> dict:
    """{key: (G, M) values}: ``score(unit X (n, D), codes_by_rank) -> {key: value}`` for each model with
    one of ``groups`` random groups of species left out in turn (every kNN search or clustering redone
    on the rest, with the same seed for every model)."""
    S = int(units.max()) + 1
    if groups > S:
        raise TreeprobeError(f"{groups} jackknife groups need at least as many species units; got {S}")
    rng = np.random.default_rng(_sub_seed(seed, "jackknife"))
    group = rng.permutation(S) % groups
    codes = aligned[names[0]].taxonomy.codes_by_rank()
    out: dict = {}
    for g in range(groups):
        keep = group[units] != g
        sub_codes = {r: np.asarray(c)[keep] for r, c in codes.items()}
        for k, m in enumerate(names):
            for key, value in score(aligned[m].unit[keep], sub_codes).items():
                out.setdefault(key, np.full((groups, len(names)), np.nan))[g, k] = value
    return out


def _knn_scores(k: int, max_queries, seed: int):
    from treeprobe.neighbors import knn_rank_agreement

    def score(X, codes):
        tab = knn_rank_agreement(X, codes, k=min(k, len(X) - 1), max_queries=max_queries, seed=seed, normalised=True)
        out = {}
        for row in tab.itertuples():
            out[("knn agreement", row.rank)] = row.agreement
            out[("knn level agreement", row.rank)] = row.level_agreement
        return out

    return score


def _clustering_scores(methods, seed: int):
    from treeprobe.clustering import rankwise_clustering

    def score(X, codes):
        tab = rankwise_clustering(X, codes, methods=methods, seed=seed, n_permutations=1, progress=False)
        return {(f"{row.method} {s}", row.rank): getattr(row, s) for row in tab.itertuples()
                for s in ("purity", "nmi", "ari")}

    return score


#: Clustering paired tests of :func:`compare`: the delete-a-group jackknife or the swap test.
CLUSTER_TESTS = ("jackknife", "swap")
SWAP_SCHEME = ("paired permutation of model labels within species (each species' images swapped between the two "
               "models with probability 1/2, model b aligned onto model a by orthogonal Procrustes first, both "
               "hybrids re-clustered; exact when the two models' images of a species are exchangeable); interval: "
               "delete-a-group jackknife over species")


def _swap_p_values(Xa: np.ndarray, Xb: np.ndarray, codes: dict, units: np.ndarray, *, permutations: int, seed: int,
                   score) -> dict:
    """{key: two-sided p} of the swap test of the difference score(A) − score(B) (module docstring).

    Xa (N, D_a), Xb (N, D_b): unit rows of the two models on the same items; codes: rank → codes (N,);
    units: species unit of each item (N,). The model of fewer dimensions is padded with zero coordinates,
    then model b is rotated onto model a (orthogonal Procrustes on the unit rows): norms and angles within
    each model are unchanged, so are its clustering scores. Permutation
    r: each species swapped with probability 1/2 (``np.random.default_rng(seed)``: ``rng.random(S) < 0.5``),
    both hybrids scored; p = (1 + #{|Δ*| ≥ |Δ₀|}) / (permutations + 1), Δ₀ the unswapped difference of the
    same ``score``. Cost: 2·permutations clusterings."""
    from scipy.linalg import orthogonal_procrustes

    if len(Xa) != len(Xb):
        raise TreeprobeError(f"the swap test needs both models on the same items; got {len(Xa)} and {len(Xb)} rows")
    D = max(Xa.shape[1], Xb.shape[1])  # the smaller model padded with zero coordinates: norms and angles kept
    Xa = np.pad(np.asarray(Xa, dtype=np.float64), ((0, 0), (0, D - Xa.shape[1])))
    Xb = np.pad(np.asarray(Xb, dtype=np.float64), ((0, 0), (0, D - Xb.shape[1])))
    Xb = Xb @ orthogonal_procrustes(Xb, Xa)[0]
    sa, sb = score(Xa, codes), score(Xb, codes)
    obs = {k: sa[k] - sb[k] for k in sa if k in sb}
    S = int(units.max()) + 1
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(obs, 0)
    for _ in range(permutations):
        swap = (rng.random(S) < 0.5)[units][:, None]
        pa, pb = score(np.where(swap, Xb, Xa), codes), score(np.where(swap, Xa, Xb), codes)
        for k, d in obs.items():
            hits[k] += bool(abs(pa[k] - pb[k]) >= abs(d) - 1e-12)
    return {k: (1 + hits[k]) / (permutations + 1) for k in obs}


ZEROSHOT_SCHEME = ("species bootstrap of the images' hits (species resampled with all their images; same draws "
                   "for both models)")


def _zeroshot_rows(aligned: dict, texts: dict, names: list, per_model: list, diffs: list, *, bootstrap: int,
                   seed: int, modes=("flat", "species_summed")) -> None:
    """Per-model zero-shot top-1 per rank (metric ``zeroshot <mode> top1``, each model with its own text
    embeddings of the first text type; intervals of :func:`treeprobe.zeroshot.zeroshot`) and the paired
    differences: accuracy = Σ_s hits_s / Σ_s known_s over species s, so one species-bootstrap draw
    (weights w_s, the same for both models) gives Δ* = Σ w·hits_a / Σ w·known − Σ w·hits_b / Σ w·known;
    percentile interval and p = (1 + #{|Δ* − Δ̂| ≥ |Δ̂|}) / (B + 1), as for Mantel r."""
    from scipy import sparse

    from treeprobe import image_text

    first = aligned[names[0]]
    h, truth = image_text.hierarchy_of(first)
    keep = truth >= 0
    t = truth[keep]
    onehot = sparse.csr_matrix((np.ones(t.size), (t, np.arange(t.size))), shape=(h.n_species, t.size))
    W = species_bootstrap_weights(h.n_species, bootstrap, _sub_seed(seed, "zeroshot"))
    sums = {}
    for m in names:
        text = texts[m]
        tt = image_text.text_type_of(text, None)
        out = image_text.zeroshot_tables(np.asarray(aligned[m].X), h, truth, text=text[tt], modes=modes, k=5,
                                         logit_scale=100.0, n_boot=bootstrap, seed=seed)
        res = out["result"]
        known = res.true_codes >= 0
        for row in out["zeroshot"].itertuples():
            per_model.append(_model_row(m, f"zeroshot {row.mode} top1", row.rank, row.top1, (row.top1_lo, row.top1_hi),
                                        row.chance_top1, n=row.n_items, note=f"text type {tt}"))
        for mode, pred in res.predictions.items():
            hit = ((pred == res.true_codes) & known).astype(np.float64)
            sums[(m, mode)] = (np.asarray(onehot @ hit), np.asarray(onehot @ known.astype(np.float64)))
    for mode in modes:
        for j, rank in enumerate(h.ranks):
            den = sums[(names[0], mode)][1][:, j]
            if den.sum() == 0:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                boot_den = W @ den
                est = {m: float(sums[(m, mode)][0][:, j].sum() / den.sum()) for m in names}
                boot = {m: (W @ sums[(m, mode)][0][:, j]) / boot_den for m in names}
            for a, b in combinations(names, 2):
                d = est[a] - est[b]
                shifts = (boot[a] - boot[b]) - d
                diffs.append(_diff_row(f"zeroshot {mode} top1", rank, a, b, est[a], est[b], _percentile_ci(shifts, d),
                                       _bootstrap_p(shifts, d), h.n_species, ZEROSHOT_SCHEME))


def _sub_seed(seed: int, name: str) -> int:
    import zlib

    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]).generate_state(1)[0])


# --- the comparison -----------------------------------------------------------------------------


@dataclass
class Comparison:
    """Result of :func:`compare`.

    per_model: long table, one row per (model, metric, rank): estimate with its 95 % interval
    (species bootstrap), chance, the model's own p-value where the metric has one.
    differences: one row per (metric, rank, model pair): estimates, difference a − b, 95 % interval,
    p_value, Holm-adjusted p_holm (across ranks within metric × pair), what was resampled.
    similarity: model-to-model CKA / RSA per rank (empty when not computed).
    reports: model name → its intrinsic :class:`~treeprobe.report.Report`.
    """

    models: list
    per_model: pd.DataFrame
    differences: pd.DataFrame
    similarity: pd.DataFrame = field(default_factory=pd.DataFrame)
    reports: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (tables as lists of records; extras such as t-SNE tables included)."""
        from treeprobe.report import _jsonable

        extras = {k: (v.to_dict(orient="records") if isinstance(v, pd.DataFrame) else
                      {m: (p.to_dict(orient="records") if isinstance(p, pd.DataFrame) else p) for m, p in v.items()}
                      if isinstance(v, dict) else v) for k, v in self.extras.items()}
        return _jsonable(dict(treeprobe_compare_version=1, models=self.models, params=self.params,
                              per_model=self.per_model.to_dict(orient="records"),
                              differences=self.differences.to_dict(orient="records"),
                              similarity=self.similarity.to_dict(orient="records"),
                              reports={k: r.to_dict() for k, r in self.reports.items()}, **extras))


def _model_row(model, metric, rank, estimate, ci=(np.nan, np.nan), chance=np.nan, p=np.nan, n=np.nan, note=""):
    return dict(model=model, metric=metric, rank=rank, estimate=estimate, ci_low=ci[0], ci_high=ci[1],
                chance=chance, p_value=p, n=n, note=note)


def _diff_row(metric, rank, a, b, est_a, est_b, ci, p, n_units, scheme):
    return dict(metric=metric, rank=rank, model_a=a, model_b=b, estimate_a=est_a, estimate_b=est_b,
                difference=est_a - est_b, ci_low=ci[0], ci_high=ci[1], p_value=p, p_holm=np.nan,
                n_units=n_units, scheme=scheme)


def _jackknife_rows(exact: dict, jack: dict, names: list, per_model: list, diffs: list, n_units: int,
                    scheme: str) -> None:
    """Per-model and paired-difference rows from exact values and their jackknife replicates."""
    z = 1.959963984540054
    for (metric, rank), (values, chance, n) in exact.items():
        if not np.all(np.isfinite(values)) or (metric, rank) not in jack:
            continue
        reps = jack[(metric, rank)]
        for k, m in enumerate(names):
            se = _jackknife_se(reps[:, k])
            per_model.append(_model_row(m, metric, rank, values[k], (values[k] - z * se, values[k] + z * se),
                                        chance, n=n))
        for a, b in combinations(range(len(names)), 2):
            est = values[a] - values[b]
            se = _jackknife_se(reps[:, a] - reps[:, b])
            diffs.append(_diff_row(metric, rank, names[a], names[b], values[a], values[b],
                                   (est - z * se, est + z * se), _normal_p(est, se), n_units, scheme))


def _mantel_bootstrap(aligned: dict, names: list, weights: np.ndarray, units: np.ndarray, *, max_pairs: int,
                      seed: int, control: str | None):
    """{(metric, level): (exact r per model (M,), pair r (M,), r* (B, M), n_units)}."""
    from treeprobe.tl import _centroid_inputs, _mantel_inputs

    rng = np.random.default_rng(seed)
    first = aligned[names[0]]
    X0, clades, leaf_units, _, _ = _mantel_inputs(first, None, None)
    out = {}
    # image level: between-species pairs, weights by species unit
    i, j = _between_pairs(leaf_units, max_pairs, rng)
    t = clades.pair_distances(clades.item_node[i], clades.item_node[j])
    d = np.stack([_pair_distances(aligned[m].unit, i, j) for m in names])
    r, rb = pair_bootstrap_pearson(d, t, ui=units[i], uj=units[j], weights=weights)
    out[("mantel r", "image")] = (r, rb)
    if control is not None:
        zc = _covariate_distance(first.items[control].to_numpy(), i, j)
        r, rb = pair_bootstrap_pearson(d, t, ui=units[i], uj=units[j], weights=weights, z=zc)
        out[(f"partial mantel r ({control})", "image")] = (r, rb)
    # species-centroid level: one centroid per leaf; leaf_units == units (both the tree's leaves)
    n_leaves = int(leaf_units.max()) + 1
    if n_leaves >= 3:
        cents = []
        for m in names:
            C, sub = _centroid_inputs(aligned[m].unit, clades, leaf_units)
            cents.append(C)
        s_units = np.arange(n_leaves)
        i, j = _between_pairs(s_units, max_pairs, rng)
        t = sub.pair_distances(sub.item_node[i], sub.item_node[j])
        d = np.stack([_pair_distances(C, i, j) for C in cents])
        r, rb = pair_bootstrap_pearson(d, t, ui=i, uj=j, weights=weights)
        out[("mantel r", "species-centroid")] = (r, rb)
    return out


def _mantel_exact(report, metric: str, level: str) -> tuple[float, float]:
    tab = report.mantel
    if not len(tab):
        return np.nan, np.nan
    if metric == "mantel r":
        sel = tab[(tab.level == level) & (tab.method == "pearson") & (tab.scheme == "species")]
    else:
        sel = tab[tab.method == "pearson (partial)"]
    if not len(sel):
        return np.nan, np.nan
    return float(sel.statistic.iloc[0]), float(sel.p_value.iloc[0])


def compare(datasets: Mapping[str, TreeData], *, seed: int = 0, permutations: int = 999, bootstrap: int = 1000,
            max_pairs: int = 500_000, jackknife: int = 10, control: str | None = None, on: str | None = None,
            mismatch: str = "error", similarity: bool = True, drilldown: bool = False,
            distance_profiles: bool = True, zeroshot: bool | None = None, cluster_test: str = "jackknife",
            cluster_permutations: int = 99, progress: bool = False, **intrinsic_kwargs) -> Comparison:
    """Score every model on the same items and test their differences (see the module docstring).

    datasets: model name → TreeData with embeddings (aligned by :func:`align` with ``on`` /
    ``mismatch``). Each model gets the full :func:`treeprobe.tl.intrinsic` analysis with the same
    ``seed``, ``permutations`` and ``intrinsic_kwargs`` (maps off unless asked for); then the paired
    inference (``bootstrap`` species resamples and ``jackknife`` species groups; Mantel sums over at most
    ``max_pairs`` pairs per level), CKA / RSA per rank (``similarity``), the distance-by-tree-distance
    profile of each model (``distance_profiles``) and the drill-down t-SNE (``drilldown``).

    ``zeroshot`` (default: when every model's TreeData holds ``uns["text_embeddings"]``, from
    :func:`treeprobe.tl.text_embeddings`): per-rank zero-shot top-1 (flat and species-summed) of each model
    with its own text embeddings, and the paired differences (:func:`_zeroshot_rows`).

    ``cluster_test``: the p-value of a clustering-score difference: ``"jackknife"`` (default; any models;
    valid but conservative) or ``"swap"`` (calibrated: the paired permutation of model labels within
    species after alignment, :func:`_swap_p_values`, ``cluster_permutations`` permutations per model
    pair, seeded by ``seed``; calibrated on the null worlds, NULL_CALIBRATION.md run 13). The interval stays
    the jackknife's either way.
    """
    from treeprobe import tl
    from treeprobe._validation import check_choice

    check_choice(cluster_test, "cluster_test", CLUSTER_TESTS)
    check_int(cluster_permutations, "cluster_permutations", minimum=19)
    check_int(bootstrap, "bootstrap", minimum=19)
    check_int(max_pairs, "max_pairs", minimum=100)
    provenance = {m: dict(ds.uns.get("provenance", {})) for m, ds in datasets.items()}
    texts = {m: ds.uns.get("text_embeddings") for m, ds in datasets.items()}
    if zeroshot is None:
        zeroshot = all(texts.values())
    elif zeroshot and not all(texts.values()):
        raise TreeprobeError("zeroshot=True needs text embeddings for every model (tl.text_embeddings); missing for "
                             + ", ".join(m for m, t in texts.items() if not t))
    aligned = align(datasets, on=on, mismatch=mismatch)
    names = list(aligned)
    intrinsic_kwargs.setdefault("maps", ())
    reports, timings = {}, {}
    clock = time.perf_counter()

    def lap(key):
        nonlocal clock
        now = time.perf_counter()
        timings[key] = now - clock
        clock = now

    for m in names:
        reports[m] = tl.intrinsic(aligned[m], seed=seed, permutations=permutations, control=control,
                                  progress=progress, provenance=provenance[m],
                                  **intrinsic_kwargs)
        lap(f"intrinsic_s:{m}")
    first = aligned[names[0]]
    units = species_units(first)
    S = int(units.max()) + 1
    rng = np.random.default_rng(seed)
    weights = species_bootstrap_weights(S, bootstrap, int(rng.integers(SEED_BOUND)))
    per_model, diffs = [], []

    # Mantel r (image, centroid, partial)
    boot = _mantel_bootstrap(aligned, names, weights, units, max_pairs=max_pairs,
                             seed=int(rng.integers(SEED_BOUND)), control=control)
    for (metric, level), (r_pairs, rb) in boot.items():
        exact = [_mantel_exact(reports[m], metric, level) for m in names]
        for k, m in enumerate(names):
            ci = _percentile_ci(rb[:, k] - r_pairs[k], exact[k][0])
            per_model.append(_model_row(m, metric, level, exact[k][0], ci, 0.0, exact[k][1], S))
        for a, b in combinations(range(len(names)), 2):
            est = exact[a][0] - exact[b][0]
            shifts = (rb[:, a] - rb[:, b]) - (r_pairs[a] - r_pairs[b])
            diffs.append(_diff_row(metric, level, names[a], names[b], exact[a][0], exact[b][0],
                                   _percentile_ci(shifts, est), _bootstrap_p(shifts, est), S, BOOTSTRAP_SCHEME))
    lap("mantel_bootstrap_s")

    # kNN agreement and clustering scores: delete-a-group jackknife over species, each search / clustering redone
    exact: dict = {}
    knn0 = reports[names[0]].knn
    if len(knn0) and jackknife:
        for row in knn0.itertuples():
            for metric, col, chance_col in (("knn agreement", "agreement", "chance"),
                                            ("knn level agreement", "level_agreement", "level_chance")):
                exact[(metric, row.rank)] = ([float(reports[m].knn.set_index("rank").loc[row.rank, col]) for m in names],
                                             float(getattr(row, chance_col)), int(row.n_evaluated))
        kq = reports[names[0]].provenance
        jack = _jackknife(aligned, names, units, groups=jackknife, seed=seed,
                          score=_knn_scores(int(kq.get("knn_k", 10)), kq.get("knn_max_queries"), seed))
        _jackknife_rows(exact, jack, names, per_model, diffs, S, JACKKNIFE_SCHEME)
    lap("knn_jackknife_s")
    if zeroshot:
        _zeroshot_rows(aligned, texts, names, per_model, diffs, bootstrap=bootstrap, seed=seed)
        lap("zeroshot_s")
    clus0 = reports[names[0]].clustering
    if len(clus0) and jackknife:
        exact = {}
        for row in clus0.itertuples():
            for s_ in ("purity", "nmi", "ari"):
                key = (f"{row.method} {s_}", row.rank)
                exact[key] = ([float(reports[m].clustering.set_index(["rank", "method"]).loc[(row.rank, row.method), s_])
                               for m in names], float(getattr(row, f"{s_}_chance", np.nan)), int(row.n_items))
        score = _clustering_scores(tuple(clus0["method"].unique()), seed)
        jack = _jackknife(aligned, names, units, groups=jackknife, seed=seed, score=score)
        n0 = len(diffs)
        _jackknife_rows(exact, jack, names, per_model, diffs, S, JACKKNIFE_SCHEME)
        lap("clustering_jackknife_s")
        if cluster_test == "swap":
            codes = first.taxonomy.codes_by_rank()
            swap_p = {(a, b): _swap_p_values(aligned[a].unit, aligned[b].unit, codes, units,
                                             permutations=cluster_permutations, seed=_sub_seed(seed, f"swap {a} {b}"),
                                             score=score) for a, b in combinations(names, 2)}
            for row in diffs[n0:]:
                row["p_value"] = swap_p[(row["model_a"], row["model_b"])].get((row["metric"], row["rank"]), np.nan)
                row["scheme"] = SWAP_SCHEME
            lap("clustering_swap_s")

    per_model = pd.DataFrame(per_model, columns=MODEL_COLUMNS)
    differences = pd.DataFrame(diffs, columns=DIFF_COLUMNS)
    if len(differences):
        fam = differences.groupby(["metric", "model_a", "model_b"], sort=False).indices
        for idx in fam.values():
            differences.loc[differences.index[idx], "p_holm"] = holm(differences["p_value"].to_numpy()[idx])
    comp = Comparison(models=names, per_model=per_model, differences=differences, reports=reports,
                      params=dict(seed=seed, permutations=permutations, bootstrap=bootstrap,
                                  jackknife=jackknife, cluster_test=cluster_test,
                                  cluster_permutations=cluster_permutations if cluster_test == "swap" else None,
                                  max_pairs=max_pairs, control=control, n_items=len(first),
                                  n_species_units=S, timings=timings))
    if similarity:
        comp.similarity = _similarity(aligned, names, seed)
        lap("similarity_s")
    if distance_profiles:
        comp.extras["distance_profiles"] = _profiles(aligned, names, seed)
        lap("distance_profiles_s")
    if drilldown:
        comp.extras["drilldown_tsne"] = _drilldown(aligned, names, seed)
        lap("drilldown_s")
    return comp


def _similarity(aligned: dict, names: list, seed: int) -> pd.DataFrame:
    try:
        from treeprobe.similarity import similarity_by_rank
    except ImportError:  # pragma: no cover - module is part of the package
        return pd.DataFrame()
    rows = []
    codes = aligned[names[0]].taxonomy.codes_by_rank()
    for a, b in combinations(names, 2):
        tab = similarity_by_rank(aligned[a].unit, aligned[b].unit, codes, seed=seed)
        tab.insert(0, "model_b", b)
        tab.insert(0, "model_a", a)
        rows.append(tab)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _profiles(aligned: dict, names: list, seed: int) -> dict:
    from treeprobe.drilldown import distance_profile

    codes = aligned[names[0]].taxonomy.codes_by_rank()
    return {m: distance_profile(aligned[m].unit, codes, seed=seed) for m in names}


def _drilldown(aligned: dict, names: list, seed: int) -> pd.DataFrame:
    from treeprobe.drilldown import drilldown_tsne

    tax = aligned[names[0]].taxonomy
    return drilldown_tsne({m: aligned[m].unit for m in names}, tax.codes_by_rank(), labels_by_rank=tax.labels_by_rank(),
                          seed=seed)
