"""The text tower's side of the tree: image-text alignment per rank, and the text embeddings of taxa as a
data set of their own (so the Mantel test, K_mult and tree recovery score the text tower's tree).

**Image-text alignment** at rank r: for an image i of taxon c (its taxon at r) with text embedding t_c,
``own`` = cos(x_i, t_c) and ``sibling`` = the mean of cos(x_i, t_s) over the *siblings* s of c (the other
taxa of rank r under the same parent at rank r − 1; at the top rank, every other taxon). The margin
``own − sibling`` is what a model needs to choose the right child once the parent is right (a top-down
classifier's step), and ``top1_siblings`` the share of images whose own text beats every sibling's, next to
its chance value (the mean of 1 / (siblings + 1)). Images of a taxon without siblings are not scored at that
rank (counted in ``n_no_siblings``); unknown taxa (code −1) are never scored.

Intervals: 95 % percentile intervals over a species bootstrap (all images of a resampled species enter
together; images of one species are not independent draws).

Arrays: ``X`` (N, D) image embeddings (L2-normalised here), text embeddings per rank (T_r, D) in the order
of the taxonomy's taxon codes (:meth:`~treeprobe.taxonomy.Taxonomy.taxon_labels`), ``parents`` per rank
(T_r,) the parent's code at the rank above (−1 at the top rank).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import l2_normalise
from treeprobe._validation import check_int
from treeprobe.errors import TreeprobeError

__all__ = ["taxon_parents", "align_text_embeddings", "image_text_alignment", "margin_permutation_p",
           "within_parent_permutations", "text_tree_data"]


def taxon_parents(taxonomy) -> dict[str, np.ndarray]:
    """rank → int64 (n_taxa(rank),): the code of each taxon's parent at the rank above (−1 at the top
    rank, and for a taxon whose parent is unknown).

    >>> from treeprobe.taxonomy import Taxonomy
    >>> tax = Taxonomy.from_frame(pd.DataFrame({"kingdom": ["A", "A", "B"], "genus": ["x", "y", "z"]}),
    ...                           ranks=("kingdom", "genus"))
    >>> taxon_parents(tax)["genus"].tolist()
    [0, 0, 1]
    """
    out = {}
    prev = None
    for r in taxonomy.ranks:
        codes = taxonomy.codes(r)
        par = np.full(taxonomy.n_taxa(r), -1, dtype=np.int64)
        if prev is not None:
            ok = codes >= 0
            par[codes[ok]] = prev[ok]
        out[r] = par
        prev = codes
    return out


def align_text_embeddings(taxonomy, texts: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> dict[str, np.ndarray]:
    """Reorder text embeddings to the taxon codes of ``taxonomy`` (a Taxonomy, or a
    :class:`~treeprobe.zeroshot.ClassHierarchy`: the order of its ``taxa``). ``texts``: rank → (cumulative taxon labels
    (T,), array (T, D)), labels as :meth:`~treeprobe.taxonomy.Taxonomy.taxon_labels` writes them
    (``"Plantae|Tracheophyta|..."``). Returns rank → float32 (n_taxa(rank), D); raises naming the first
    taxa that have no text."""
    out = {}
    for r, (labels, arr) in texts.items():
        arr = np.asarray(arr, dtype=np.float32)
        labels = list(labels)
        if arr.ndim != 2 or arr.shape[0] != len(labels):
            raise TreeprobeError(f"rank {r}: {len(labels)} labels but text embeddings of shape {arr.shape}")
        row = {lab: i for i, lab in enumerate(labels)}
        want = taxonomy.taxa[r] if hasattr(taxonomy, "taxa") else taxonomy.taxon_labels(r)  # a ClassHierarchy too
        missing = [w for w in want if w not in row]
        if missing:
            raise TreeprobeError(f"rank {r}: {len(missing)} taxa have no text embedding (e.g. "
                                 f"{', '.join(map(repr, missing[:3]))})")
        out[r] = arr[[row[w] for w in want]]
    return out


def _species_groups(species: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(species, kind="stable")
    s = species[order]
    cuts = np.flatnonzero(np.diff(s)) + 1
    return np.split(order, cuts)


def within_parent_permutations(parents: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """int64 (n, T): ``n`` random permutations of the T taxa, each moving a taxon only to a taxon with the
    same parent (``parents`` (T,), −1 = the top rank)."""
    parents = np.asarray(parents)
    T = len(parents)
    order0 = np.argsort(parents, kind="stable")
    keys = rng.random((n, T)) + 2.0 * (parents + 1)[None, :]  # sorted by parent, random within it
    pi = np.empty((n, T), dtype=np.int64)
    pi[:, order0] = np.argsort(keys, axis=1)
    return pi


def margin_permutation_p(Xn_scored: np.ndarray, codes: np.ndarray, weights: np.ndarray, *, Tn: np.ndarray,
                         parents: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """One-sided p of the alignment margin when the texts are permuted among siblings (taxa with the same
    parent): the margin is Σ_c Xw_c · t_c − (a term every within-parent permutation keeps), with Xw_c the
    weighted sum of the scored images of taxon c, so each permutation costs O(Σ children²) from the
    precomputed sibling-pair products. ``weights`` (n,) = (1 + 1/n_siblings) / n of each scored image.
    p = (1 + #{stat(π) ≥ stat(id)}) / (permutations + 1); below (Σ log children!) ≈ log 20 permutations
    exist, so p cannot reach 0.05 with a single pair of siblings."""
    T = len(Tn)
    Xw = np.zeros((T, Xn_scored.shape[1]))
    np.add.at(Xw, codes, weights[:, None] * Xn_scored)
    order = np.argsort(parents, kind="stable")
    par_sorted = parents[order]
    starts = np.flatnonzero(np.r_[True, par_sorted[1:] != par_sorted[:-1]])
    sizes = np.diff(np.r_[starts, T])
    size_of = np.empty(T, dtype=np.int64)
    pos = np.empty(T, dtype=np.int64)
    base = np.empty(T, dtype=np.int64)
    pair_base = np.r_[0, np.cumsum(sizes ** 2)[:-1]].astype(np.int64)
    vals = np.zeros(int((sizes ** 2).sum()))
    for g, (a, n_g) in enumerate(zip(starts, sizes)):
        members = order[a:a + n_g]
        size_of[members], pos[members], base[members] = n_g, np.arange(n_g), pair_base[g]
        # vals[base + pos(c)·n + pos(j)] = Xw_c · t_j for c, j siblings (j = c included)
        vals[pair_base[g]:pair_base[g] + n_g * n_g] = (Xw[members] @ Tn[members].T).ravel()
    lookup = lambda pi: vals[base + pos * size_of + pos[pi]].sum(axis=-1)  # noqa: E731
    observed = lookup(np.arange(T))
    hits = 0
    for a in range(0, permutations, 256):
        pis = within_parent_permutations(parents, min(256, permutations - a), rng)
        hits += int(np.count_nonzero(lookup(pis) >= observed - 1e-12 * max(abs(observed), 1.0)))
    return float((1 + hits) / (permutations + 1))


def image_text_alignment(X, codes_by_rank: Mapping[str, np.ndarray], text_by_rank: Mapping[str, np.ndarray], *,
                         parents: Mapping[str, np.ndarray], species: np.ndarray | None = None,
                         bootstrap: int = 200, permutations: int = 0, seed: int = 0) -> pd.DataFrame:
    """Per rank: mean cosine of each image to its own taxon's text and to its siblings' texts, the margin,
    the share whose own text beats every sibling, and chance (module docstring).

    X: (N, D); codes_by_rank: rank → (N,) taxon codes (−1 unknown); text_by_rank: rank → (T_r, D) in code
    order; parents: rank → (T_r,) parent codes (:func:`taxon_parents`); species: (N,) codes of the
    resampled units (default: the last rank's codes; unknown species are their own units). Returns one
    row per rank: ``n_items``, ``n_no_siblings``, ``own_cos``, ``sibling_cos``, ``margin`` (with
    ``margin_lo`` / ``margin_hi``), ``top1_siblings`` (with ``_lo`` / ``_hi``), ``chance``, ``n_sibling_sets``
    (parents with two or more scored children) and, with ``permutations``, ``margin_p``: the test of the margin
    with the texts permuted among siblings (:func:`margin_permutation_p`). The species-bootstrap intervals say
    how precisely the margin of *these* taxa is measured; they are not a test (images of one clade share its
    position, so a text unrelated to the images has a margin of its own: analyses/NULL_CALIBRATION.md run 12).

    >>> X = np.eye(3, dtype=np.float32)
    >>> t = {"genus": np.eye(3, dtype=np.float32)}
    >>> df = image_text_alignment(X, {"genus": np.arange(3)}, t, parents={"genus": np.full(3, -1)}, bootstrap=0)
    >>> float(df["margin"][0]), float(df["top1_siblings"][0]), round(float(df["chance"][0]), 3)
    (1.0, 1.0, 0.333)
    """
    Xn = l2_normalise(np.asarray(X, dtype=np.float32))
    N = Xn.shape[0]
    B = check_int(bootstrap, "bootstrap", minimum=0)
    P = check_int(permutations, "permutations", minimum=0)
    perm_rng = np.random.default_rng([seed, 1])
    ranks = list(codes_by_rank)
    if species is None:
        species = np.asarray(codes_by_rank[ranks[-1]])
    species = np.asarray(species).copy()
    unk = species < 0
    species[unk] = species.max(initial=-1) + 1 + np.arange(int(unk.sum()))  # each unknown its own unit
    groups = _species_groups(species)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(groups), len(groups)) for _ in range(B)]
    rows = []
    for r in ranks:
        codes = np.asarray(codes_by_rank[r])
        T = np.asarray(text_by_rank[r], dtype=np.float32)
        if codes.shape != (N,):
            raise TreeprobeError(f"rank {r}: codes of shape {codes.shape}; expected ({N},)")
        if T.ndim != 2 or T.shape[1] != Xn.shape[1]:
            raise TreeprobeError(f"rank {r}: text embeddings of shape {T.shape}; expected (T, {Xn.shape[1]})")
        if codes.max(initial=-1) >= len(T):
            raise TreeprobeError(f"rank {r}: taxon code {int(codes.max())} but only {len(T)} text embeddings")
        Tn = l2_normalise(T)
        par = np.asarray(parents[r])
        sib_count = np.bincount(par + 1, minlength=len(T) + 1)[par + 1] - 1  # other children of the parent
        known = codes >= 0
        own = np.full(N, np.nan)
        sib = np.full(N, np.nan)
        win = np.full(N, np.nan)
        chance = np.full(N, np.nan)
        idx = np.flatnonzero(known & (sib_count[np.maximum(codes, 0)] > 0))
        for lo in range(0, len(idx), 4096):
            blk = idx[lo:lo + 4096]
            S = Xn[blk] @ Tn.T  # (b, T)
            c = codes[blk]
            same_parent = par[None, :] == par[c][:, None]
            same_parent[np.arange(len(blk)), c] = False
            own[blk] = S[np.arange(len(blk)), c]
            n_sib = same_parent.sum(axis=1)
            sib[blk] = np.where(same_parent, S, 0.0).sum(axis=1) / n_sib
            win[blk] = own[blk] > np.where(same_parent, S, -np.inf).max(axis=1)
            chance[blk] = 1.0 / (n_sib + 1)
        scored = np.zeros(N, dtype=bool)
        scored[idx] = True
        row = dict(rank=r, n_items=int(scored.sum()), n_no_siblings=int((known & ~scored).sum()))

        def stats(sel):
            m = scored[sel]
            if not m.any():
                return np.nan, np.nan, np.nan, np.nan, np.nan
            s = sel[m]
            return own[s].mean(), sib[s].mean(), (own[s] - sib[s]).mean(), win[s].mean(), chance[s].mean()

        o, sb, mg, w, ch = stats(np.arange(N))
        row.update(own_cos=o, sibling_cos=sb, margin=mg, top1_siblings=w, chance=ch)
        if B and row["n_items"]:
            boot = np.array([stats(np.concatenate([groups[g] for g in d]))[2:4] for d in draws])
            lo_, hi_ = np.nanpercentile(boot, [2.5, 97.5], axis=0)
            row.update(margin_lo=lo_[0], margin_hi=hi_[0], top1_siblings_lo=lo_[1], top1_siblings_hi=hi_[1])
        has = np.unique(codes[idx])
        row["n_sibling_sets"] = int(np.sum(np.bincount(par[has] + 1) >= 2)) if len(has) else 0
        if P and row["n_items"]:
            w = (1.0 + 1.0 / sib_count[codes[idx]]) / len(idx)
            row["margin_p"] = margin_permutation_p(Xn[idx].astype(np.float64), codes[idx], w,
                                                   Tn=Tn.astype(np.float64), parents=par, permutations=P,
                                                   rng=perm_rng)
        rows.append(row)
    return pd.DataFrame(rows)


def text_tree_data(embeddings, lineages: pd.DataFrame, **info):
    """A :class:`~treeprobe.core.TreeData` of text embeddings, one item per taxon row of ``lineages``
    (its rank columns; e.g. one row per species with the species' name embedded), so every tool of
    :mod:`treeprobe.tl` scores the text tower's tree. ``info`` goes to ``uns["text"]``."""
    from treeprobe.core import TreeData

    X = np.asarray(embeddings, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != len(lineages):
        raise TreeprobeError(f"{len(lineages)} lineages but text embeddings of shape {X.shape}")
    data = TreeData(X, lineages.reset_index(drop=True))
    data.uns["text"] = dict(info)
    return data
