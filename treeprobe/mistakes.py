"""How bad the mistakes are: depth of the lowest common ancestor (LCA) of prediction and truth.

Ranks are R levels (kingdom..species). The **LCA depth** of a prediction is 1 + the index of the
deepest rank at which prediction and truth are *known* and the same taxon: 0 = they differ at
kingdom, R = the right species (7 for the Linnaean ranks). Unknown ranks are never a match (two
unknowns are not one taxon); since taxa are cumulative, a shared taxon at rank r means the lineages
agree at every rank above it.

Heights follow the rank tree with lengths ``w`` (one per rank, default 1: the edge above a rank-r
taxon has length ``w[r]``): a species leaf has height 0, a rank-r taxon ``Σ_{s>r} w_s``, the root
``H = Σ_s w_s``. An LCA at depth d (a taxon of rank d−1; the root for d = 0) has height
``heights[d] = Σ_{s≥d} w_s`` (:func:`lca_heights`).

* **mistake severity** (Bertinetto et al. 2020, "Making Better Mistakes"): mean LCA height over the
  mistakes only (top-1 wrong);
* **hdist@k**: mean LCA height over the k best predictions of each image (correct ones count 0);
* **nLCA** (normalised LCA distance): LCA height / H of the top-1 prediction, averaged over all
  images: 0 = every species right, 1 = every prediction in another kingdom.

**Chance** (:func:`chance_levels`): the same metrics when the prediction is a uniform draw from the S
candidate species, computed exactly from the hierarchy: for true species s, P(depth ≥ d) = the
share of species in s's taxon at the first known rank ≥ d−1. Intervals resample species, each with
all its images (:func:`~treeprobe.zeroshot.species_bootstrap_ratio`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe.errors import TreeprobeError
from treeprobe.zeroshot import ClassHierarchy, _topk, species_bootstrap_ratio

__all__ = ["SUMMARY_COLUMNS", "HISTOGRAM_COLUMNS", "lca_heights", "lca_depth", "first_error_depth", "depth_histogram",
           "mistake_severity", "hdist_at_k", "nlca", "chance_levels", "severity_interval", "mistake_summary"]

#: Columns of the ``summary`` frame of :func:`mistake_summary`.
SUMMARY_COLUMNS = ("metric", "value", "lo", "hi", "chance", "n_items")
#: Columns of the ``histogram`` frame of :func:`mistake_summary`.
HISTOGRAM_COLUMNS = ("depth", "lca_rank", "count", "fraction", "chance_fraction", "height")


def lca_heights(ranks: Sequence[str], rank_lengths: Mapping[str, float] | Sequence[float] | None = None) -> np.ndarray:
    """float64 (R+1,): height of an LCA at depth d = Σ_{s≥d} w_s (``heights[0]`` = H, ``heights[R]`` = 0).

    ``rank_lengths``: mapping rank → length or R values (default 1 each; non-negative, finite).

    >>> lca_heights(("kingdom", "genus", "species"), {"species": 2}).tolist()
    [4.0, 3.0, 2.0, 0.0]
    """
    ranks = tuple(ranks)
    if rank_lengths is None:
        w = np.ones(len(ranks))
    elif isinstance(rank_lengths, Mapping):
        unknown = set(rank_lengths) - set(ranks)
        if unknown:
            raise TreeprobeError(f"rank_lengths has unknown rank(s): {sorted(unknown)}")
        w = np.array([float(rank_lengths.get(r, 1.0)) for r in ranks])
    else:
        w = np.asarray(rank_lengths, dtype=float)
        if w.shape != (len(ranks),):
            raise TreeprobeError(f"rank_lengths needs {len(ranks)} values, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise TreeprobeError("rank_lengths must be finite and non-negative")
    return np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])


def _species(values, hierarchy: ClassHierarchy, name: str) -> np.ndarray:
    a = np.asarray(values)
    if not np.issubdtype(a.dtype, np.integer):
        raise TreeprobeError(f"{name} must be integer species indices; got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= hierarchy.n_species):
        raise TreeprobeError(f"{name} has species indices outside 0..{hierarchy.n_species - 1}")
    return a.astype(np.int64)


def _truth(true_species, hierarchy) -> np.ndarray:
    t = _species(true_species, hierarchy, "true_species")
    if t.ndim != 1 or len(t) == 0:
        raise TreeprobeError(f"true_species must be a non-empty 1-D array; got shape {t.shape}")
    return t


def lca_depth(true_species, pred_species, hierarchy: ClassHierarchy) -> np.ndarray:
    """int64 LCA depth (0..R) of each prediction. ``true_species``: int (N,); ``pred_species``: int
    (N,) or (N, k) (each column compared with the truth). Module docstring for unknown ranks.

    >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["g", "g", "h"], "species": ["x", "y", "z"]})
    >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "genus", "species"))
    >>> lca_depth([0, 0, 0], [0, 1, 2], h).tolist()
    [3, 2, 0]
    """
    t = _truth(true_species, hierarchy)
    p = _species(pred_species, hierarchy, "pred_species")
    if p.shape[0] != len(t) or p.ndim not in (1, 2):
        raise TreeprobeError(f"pred_species has shape {p.shape}; expected ({len(t)},) or ({len(t)}, k)")
    A = hierarchy.species_ancestors
    at = A[t] if p.ndim == 1 else A[t][:, None, :]
    ap = A[p]
    same = (at == ap) & (at >= 0)
    R = A.shape[1]
    deepest = R - 1 - np.argmax(same[..., ::-1], axis=-1)
    return np.where(same.any(axis=-1), deepest + 1, 0).astype(np.int64)


def first_error_depth(true_codes, pred_codes) -> np.ndarray:
    """int64 (N,): LCA depth of per-rank predictions. ``true_codes``, ``pred_codes``: int (N, R)
    taxon codes per rank (truth −1 = unknown, skipped). Depth = 1 + the deepest known-truth rank
    above the first wrong one (R when none is wrong; 0 when kingdom is wrong); equal to
    :func:`lca_depth` for the lineages of predicted species.

    >>> first_error_depth([[0, 1, 2], [0, 1, 2], [0, -1, 2]], [[0, 1, 5], [3, 1, 2], [0, 4, 2]]).tolist()
    [2, 0, 3]
    """
    t, p = np.asarray(true_codes), np.asarray(pred_codes)
    if t.ndim != 2 or t.shape != p.shape:
        raise TreeprobeError(f"true_codes {t.shape} and pred_codes {p.shape} must both be (N, R)")
    R = t.shape[1]
    known = t >= 0
    wrong = known & (p != t)
    first = np.where(wrong.any(axis=1), np.argmax(wrong, axis=1), R)
    r = np.arange(R)[None, :]
    return (np.where(known & (r < first[:, None]), r, -1).max(axis=1) + 1).astype(np.int64)


def depth_histogram(depth, n_ranks: int) -> np.ndarray:
    """int64 (n_ranks+1,): number of predictions at each LCA depth 0..n_ranks.

    >>> depth_histogram([3, 2, 0, 3], 3).tolist()
    [1, 0, 1, 2]
    """
    d = np.asarray(depth).ravel()
    if d.size and (d.min() < 0 or d.max() > n_ranks):
        raise TreeprobeError(f"depths must lie in 0..{n_ranks}")
    return np.bincount(d, minlength=n_ranks + 1).astype(np.int64)


def mistake_severity(depth, heights) -> float:
    """Mean LCA height (rank-length units) over the mistakes (depth < R, R = len(heights) − 1); NaN
    when there is none (Bertinetto et al. 2020).

    >>> mistake_severity([3, 2, 0], lca_heights(("kingdom", "genus", "species")))
    2.0
    """
    heights = np.asarray(heights, dtype=float)
    d = np.asarray(depth).ravel()
    wrong = d < len(heights) - 1
    return float(heights[d[wrong]].mean()) if wrong.any() else float("nan")


def _ranked(predictions, k: int, block: int = 4096) -> np.ndarray:
    """int (N, k) ranked species from int predictions (N, ≥k) or a float score matrix (N, S)."""
    P = np.asarray(predictions)
    if P.ndim != 2:
        raise TreeprobeError(f"predictions must be 2-D (N, k) species or (N, S) scores; got shape {P.shape}")
    if np.issubdtype(P.dtype, np.floating):
        if not np.isfinite(P).all():
            raise TreeprobeError("scores contain NaN or infinite values")
        if k > P.shape[1]:
            raise TreeprobeError(f"k = {k} but only {P.shape[1]} candidate species are scored")
        return np.concatenate([_topk(P[i:i + block], k) for i in range(0, len(P), block)]) if len(P) else \
            np.zeros((0, k), np.int64)
    if k > P.shape[1]:
        raise TreeprobeError(f"k = {k} but predictions have only {P.shape[1]} columns")
    return P[:, :k]


def hdist_at_k(true_species, predictions, hierarchy: ClassHierarchy, *, k: int = 5,
               rank_lengths: Mapping[str, float] | Sequence[float] | None = None) -> float:
    """Mean LCA height (rank-length units) over the k best predictions of each image.

    ``predictions``: int (N, ≥k) species ranked best first (the first k columns are used) or a float
    score matrix (N, S) (higher is better; its top k per row are taken).

    >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["g", "g", "h"], "species": ["x", "y", "z"]})
    >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "genus", "species"))
    >>> hdist_at_k([0], [[1, 2]], h, k=2)  # heights 1 (same genus) and 3 (other kingdom)
    2.0
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise TreeprobeError(f"k must be an integer >= 1; got {k!r}")
    t = _truth(true_species, hierarchy)
    top = _ranked(predictions, int(k))
    heights = lca_heights(hierarchy.ranks, rank_lengths)
    return float(heights[lca_depth(t, top, hierarchy)].mean())


def nlca(true_species, pred_species, hierarchy: ClassHierarchy, *,
         rank_lengths: Mapping[str, float] | Sequence[float] | None = None) -> float:
    """Normalised LCA distance: mean over images of (LCA height of the top-1 prediction) / H, H the
    height of the tree (Σ of the rank lengths). 0 = all correct, 1 = all wrong at the top rank.

    >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["g", "g", "h"], "species": ["x", "y", "z"]})
    >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "genus", "species"))
    >>> nlca([0, 0], [1, 2], h)  # (1/3 + 3/3) / 2
    0.6666666666666666
    """
    heights = lca_heights(hierarchy.ranks, rank_lengths)
    if heights[0] == 0:
        raise TreeprobeError("the tree has height 0 (all rank lengths 0): nLCA is undefined")
    return float(heights[lca_depth(true_species, pred_species, hierarchy)].mean() / heights[0])


def _depth_probs(t: np.ndarray, hierarchy: ClassHierarchy) -> np.ndarray:
    """float64 (N, R+1): P(LCA depth = d) for a uniform random species against each true species."""
    A = hierarchy.species_ancestors
    S, R = A.shape
    size = np.zeros((S, R))
    for j, r in enumerate(hierarchy.ranks):
        counts = hierarchy.species_per_taxon(r)
        size[:, j] = np.where(A[:, j] >= 0, counts[np.maximum(A[:, j], 0)], np.nan)
    filled = size.copy()  # size at the first known rank at or below: the species rank is always known
    for j in range(R - 2, -1, -1):
        filled[:, j] = np.where(np.isnan(size[:, j]), filled[:, j + 1], size[:, j])
    # M[:, d] = number of species at LCA depth >= d: S for d = 0, filled[:, d-1] for d = 1..R, 0 after
    M = np.concatenate([np.full((S, 1), float(S)), filled, np.zeros((S, 1))], axis=1)
    return ((M[:, :-1] - M[:, 1:]) / S)[t]


def chance_levels(true_species, hierarchy: ClassHierarchy, *,
                  rank_lengths: Mapping[str, float] | Sequence[float] | None = None) -> dict:
    """Exact expected metrics when each prediction is a uniform draw from the S candidate species.

    Returns a dict: ``depth_probs`` float64 (R+1,) (mean over the images of P(LCA depth = d)),
    ``accuracy`` (1/S), ``mean_height`` (expected LCA height, also the chance hdist@k for every k:
    the k distinct draws are each uniform), ``severity`` (expected height given a mistake; NaN
    when S = 1) and ``nlca`` (``mean_height`` / H).

    >>> df = pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["g", "g", "h"], "species": ["x", "y", "z"]})
    >>> h = ClassHierarchy.from_lineages(df, ranks=("kingdom", "genus", "species"))
    >>> c = chance_levels([0], h)
    >>> c["depth_probs"].round(3).tolist(), round(c["mean_height"], 3), round(c["severity"], 9)
    ([0.333, 0.0, 0.333, 0.333], 1.333, 2.0)
    """
    t = _truth(true_species, hierarchy)
    heights = lca_heights(hierarchy.ranks, rank_lengths)
    P = _depth_probs(t, hierarchy)
    S = hierarchy.n_species
    R = len(heights) - 1
    per_item = P @ heights
    severity = float(np.mean((P[:, :R] @ heights[:R]) / (1 - 1 / S))) if S > 1 else float("nan")
    mean_height = float(per_item.mean())
    return dict(depth_probs=P.mean(axis=0), accuracy=1.0 / S, mean_height=mean_height, severity=severity,
                nlca=mean_height / heights[0] if heights[0] > 0 else float("nan"))


def severity_interval(true_species, depth, heights, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Species-bootstrap percentile interval of :func:`mistake_severity` (``depth`` int (N,) LCA depths
    of the top-1 predictions of images of species ``true_species`` (N,)); NaN when no mistakes.

    >>> d = np.array([0, 2, 3, 2] * 10); s = np.repeat(np.arange(10), 4)
    >>> lo, hi = severity_interval(s, d, lca_heights(("kingdom", "genus", "species")), n_boot=200)
    >>> lo <= mistake_severity(d, lca_heights(("kingdom", "genus", "species"))) <= hi
    True
    """
    heights = np.asarray(heights, dtype=float)
    d = np.asarray(depth)
    wrong = (d < len(heights) - 1).astype(float)
    return species_bootstrap_ratio(true_species, heights[d] * wrong, wrong, n_boot=n_boot, seed=seed, level=level)


def mistake_summary(true_species, pred_species, hierarchy: ClassHierarchy, *, topk=None, k: int = 5,
                    rank_lengths: Mapping[str, float] | Sequence[float] | None = None, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Mistake-severity metrics of top-1 species predictions, with species-bootstrap intervals and chance.

    ``true_species``, ``pred_species``: int (N,); ``topk``: optional ranked species (N, ≥k) or scores
    (N, S) for hdist@k. Returns ``{"summary": DataFrame (SUMMARY_COLUMNS), "histogram": DataFrame
    (HISTOGRAM_COLUMNS)}``; metrics ``accuracy``, ``mean_lca_depth``, ``mistake_severity``, ``nlca``,
    ``hdist@1`` and ``hdist@k`` (with ``topk``); heights in rank-length units.
    """
    t = _truth(true_species, hierarchy)
    p = _species(pred_species, hierarchy, "pred_species")
    if p.shape != t.shape:
        raise TreeprobeError(f"pred_species has shape {p.shape}; expected {t.shape}")
    heights = lca_heights(hierarchy.ranks, rank_lengths)
    R = len(heights) - 1
    H = heights[0] if heights[0] > 0 else np.nan
    d = lca_depth(t, p, hierarchy)
    h = heights[d]
    wrong = (d < R).astype(float)
    ones = np.ones(len(t))
    cols = {"accuracy": ((d == R).astype(float), ones), "mean_lca_depth": (d.astype(float), ones),
            "mistake_severity": (h * wrong, wrong), "nlca": (h / H, ones), "hdist@1": (h, ones)}
    ch = chance_levels(t, hierarchy, rank_lengths=rank_lengths)
    chance = {"accuracy": ch["accuracy"], "mean_lca_depth": float(ch["depth_probs"] @ np.arange(R + 1)),
              "mistake_severity": ch["severity"], "nlca": ch["nlca"], "hdist@1": ch["mean_height"]}
    if topk is not None:
        top = _ranked(topk, int(k))
        if top.shape[0] != len(t):
            raise TreeprobeError(f"topk has {top.shape[0]} rows; expected {len(t)}")
        hk = heights[lca_depth(t, top, hierarchy)].mean(axis=1)
        cols[f"hdist@{k}"] = (hk, ones)
        chance[f"hdist@{k}"] = ch["mean_height"]
    num = np.stack([v[0] for v in cols.values()], axis=1)
    den = np.stack([v[1] for v in cols.values()], axis=1)
    lo, hi = species_bootstrap_ratio(t, num, den, n_boot=n_boot, seed=seed, level=level)
    with np.errstate(invalid="ignore"):
        value = num.sum(axis=0) / den.sum(axis=0)
    summary = pd.DataFrame({"metric": list(cols), "value": value, "lo": lo, "hi": hi,
                            "chance": [chance[m] for m in cols], "n_items": den.sum(axis=0).astype(np.int64)},
                           columns=list(SUMMARY_COLUMNS))
    counts = depth_histogram(d, R)
    histogram = pd.DataFrame({"depth": np.arange(R + 1), "lca_rank": ["root", *hierarchy.ranks[:-1], "same species"],
                              "count": counts, "fraction": counts / len(t), "chance_fraction": ch["depth_probs"],
                              "height": heights}, columns=list(HISTOGRAM_COLUMNS))
    return {"summary": summary, "histogram": histogram}
