"""Figures of the phylogenetic-signal tools: K_mult (:mod:`treeprobe.physignal`) and within- vs
between-species variation (:mod:`treeprobe.variation`).

Array-level like :mod:`treeprobe.plots`: each function takes the tool's result or table and returns a
:class:`~treeprobe.plots.DisplayFigure` (no pyplot state). Colours: Okabe–Ito (colour-blind safe); the
observed value is a solid mark, chance a dashed line or a grey band, as in the other rank figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from treeprobe.errors import TreeprobeError
from treeprobe.plots import DisplayFigure

__all__ = ["plot_physignal", "plot_within_species_variation", "plot_covariate_alignment"]

_BLUE, _ORANGE, _GREY = "#0072B2", "#E69F00", "0.6"


def plot_physignal(result) -> DisplayFigure:
    """K_mult next to its permutation null (left: histogram of the permuted K, the observed K as a line;
    K = 1 marks Brownian motion) and K per principal axis (right: bars, with each axis' variance share).

    ``result``: a :class:`~treeprobe.physignal.KmultResult` (``tl.physignal``'s return value).

    >>> import numpy as np, pandas as pd
    >>> from types import SimpleNamespace
    >>> r = SimpleNamespace(statistic=0.5, p_value=0.01, z=3.0, permutations=3, n_species=10,
    ...                     random_statistics=np.array([0.2, 0.25, 0.3]), permuted="species permuted",
    ...                     per_axis=pd.DataFrame(dict(axis=[1, 2], K=[0.6, 0.4], variance_share=[0.5, 0.2])))
    >>> [ax.get_title() for ax in plot_physignal(r).axes][:2]  # (the third axes: the variance-share scale)
    ['K_mult = 0.500 (p = 0.01, z = 3.0)', 'K per principal axis']
    """
    per_axis = getattr(result, "per_axis", None)
    fig = DisplayFigure(figsize=(8.4 if per_axis is not None and len(per_axis) else 4.4, 3.6), layout="constrained")
    n_panels = 2 if per_axis is not None and len(per_axis) else 1
    ax = fig.add_subplot(1, n_panels, 1)
    null = np.asarray(getattr(result, "random_statistics", ()), dtype=float)
    if null.size:
        ax.hist(null, bins=min(40, max(5, null.size // 10)), color=_GREY, label=f"permuted ({null.size})")
    ax.axvline(result.statistic, color=_BLUE, lw=2, label="observed")
    ax.axvline(1.0, color="k", ls=":", lw=1, label="Brownian motion (K = 1)")
    ax.set_xlabel("K_mult")
    ax.set_ylabel("permutations")
    ax.set_title(f"K_mult = {result.statistic:.3f} (p = {result.p_value:.2g}, z = {result.z:.1f})")
    ax.legend(fontsize=7)
    if n_panels == 2:
        bx = fig.add_subplot(1, 2, 2)
        bx.bar(per_axis["axis"], per_axis["K"], color=_BLUE, label="K of the axis")
        bx.axhline(1.0, color="k", ls=":", lw=1)
        bx.set_xlabel("principal axis of the species centroids")
        bx.set_ylabel("K")
        bx.set_title("K per principal axis")
        share = bx.twinx()
        share.plot(per_axis["axis"], per_axis["variance_share"], "o--", color=_ORANGE, label="variance share")
        share.set_ylabel("variance share", color=_ORANGE)
        share.set_ylim(0, max(1e-9, float(per_axis["variance_share"].max())) * 1.1)
    return fig


def plot_within_species_variation(ranks: pd.DataFrame, *, title: str = "") -> DisplayFigure:
    """Per rank (kingdom → species): the share of within-species variation outside the between-taxon
    principal subspace against its isotropic chance value (left), and, with a covariate, the angle of the
    mean within-species shift to that subspace against its permutation mean (right).

    ``ranks``: ``tl.within_species_variation(...).ranks`` (columns ``rank``, ``within_outside_share``,
    ``isotropic_outside_share``, and optionally ``shift_angle_deg``, ``perm_angle_mean_deg``).

    >>> t = pd.DataFrame(dict(rank=["kingdom", "species"], within_outside_share=[0.9, 0.3],
    ...                       isotropic_outside_share=[0.99, 0.8]))
    >>> len(plot_within_species_variation(t).axes)
    1
    """
    need = {"rank", "within_outside_share", "isotropic_outside_share"}
    if not need <= set(ranks.columns):
        raise TreeprobeError(f"plot_within_species_variation: the table needs columns {sorted(need)}")
    angle = "shift_angle_deg" in ranks.columns and ranks["shift_angle_deg"].notna().any()
    fig = DisplayFigure(figsize=(8.4 if angle else 4.4, 3.6), layout="constrained")
    x = np.arange(len(ranks))
    ax = fig.add_subplot(1, 2 if angle else 1, 1)
    ax.plot(x, ranks["within_outside_share"], "o-", color=_BLUE, label="within species")
    if "between_outside_share" in ranks.columns:
        ax.plot(x, ranks["between_outside_share"], "^-", color=_ORANGE, label="between taxa (left out)")
    ax.plot(x, ranks["isotropic_outside_share"], "s--", color=_GREY, label="chance (isotropic)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of variation outside the\nbetween-taxon principal subspace")
    ax.set_title("Within- vs between-taxon variation")
    ax.legend(fontsize=7)
    axes = [ax]
    if angle:
        bx = fig.add_subplot(1, 2, 2)
        bx.plot(x, ranks["shift_angle_deg"], "o-", color=_BLUE, label="covariate shift")
        if "perm_angle_mean_deg" in ranks.columns:
            bx.plot(x, ranks["perm_angle_mean_deg"], "s--", color=_GREY, label="labels permuted within species")
        bx.set_ylim(0, 90)
        bx.set_ylabel("angle to the subspace (degrees)")
        bx.set_title("Mean within-species shift")
        bx.legend(fontsize=7)
        axes.append(bx)
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels(ranks["rank"], rotation=45, ha="right")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


_ALIGNMENT_LABELS = {
    "mantel_embedding_covariate": "embedding ~ covariate",
    "partial_mantel_embedding_covariate_given_tree": "embedding ~ covariate | tree",
    "mantel_covariate_tree": "covariate ~ tree",
    "mantel_embedding_tree": "embedding ~ tree",
}


def plot_covariate_alignment(result, *, statistic: str = "partial_mantel_embedding_covariate_given_tree",
                             title: str = "") -> DisplayFigure:
    """Covariate alignment (:mod:`treeprobe.covariate_alignment`): left, the permutation null of one
    statistic (histogram of the permuted r, the observed r as a line); right, the Mantel r of each row of the
    table (bars; p-values in the labels, "n.t." where not tested).

    ``result``: a :class:`~treeprobe.covariate_alignment.CovariateAlignmentResult` (or anything with its
    ``table`` and ``permuted_statistics``); ``statistic``: the row whose null is drawn.

    >>> import numpy as np, pandas as pd
    >>> from types import SimpleNamespace
    >>> t = pd.DataFrame(dict(statistic=["mantel_embedding_covariate", "partial_mantel_embedding_covariate_given_tree"],
    ...                       r=[0.3, 0.2], p_value=[0.01, 0.02], permutations=[3, 3]))
    >>> r = SimpleNamespace(table=t, scheme="within-genus",
    ...                     permuted_statistics={"partial_mantel_embedding_covariate_given_tree": np.array([0.0, 0.1, -0.1])})
    >>> [ax.get_title() for ax in plot_covariate_alignment(r).axes]
    ['embedding ~ covariate | tree: r = 0.200 (p = 0.02)', 'Mantel r per statistic']
    """
    table = getattr(result, "table", None)
    if table is None or not {"statistic", "r", "p_value"} <= set(table.columns):
        raise TreeprobeError("plot_covariate_alignment needs a covariate-alignment result (columns statistic, r, p_value)")
    rows = table.set_index("statistic")
    if statistic not in rows.index:
        raise TreeprobeError(f"plot_covariate_alignment: no row {statistic!r}; rows: {', '.join(rows.index)}")
    fig = DisplayFigure(figsize=(8.8, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    null = np.asarray(getattr(result, "permuted_statistics", {}).get(statistic, ()), dtype=float)
    if null.size:
        ax.hist(null, bins=min(40, max(5, null.size // 10)), color=_GREY,
                label=f"permuted ({getattr(result, 'scheme', '')}, {null.size})")
    r_obs, p_obs = float(rows.loc[statistic, "r"]), float(rows.loc[statistic, "p_value"])
    ax.axvline(r_obs, color=_BLUE, lw=2, label="observed")
    ax.set_xlabel("Mantel r")
    ax.set_ylabel("permutations")
    name = _ALIGNMENT_LABELS.get(statistic, statistic)
    ax.set_title(f"{name}: r = {r_obs:.3f} (p = {p_obs:.2g})" if np.isfinite(p_obs) else f"{name}: r = {r_obs:.3f}")
    ax.legend(fontsize=7)
    bx = fig.add_subplot(1, 2, 2)
    y = np.arange(len(rows))
    r_all = rows["r"].to_numpy(dtype=float)
    colours = [_ORANGE if s == statistic else _BLUE for s in rows.index]
    bx.barh(y, np.nan_to_num(r_all), color=colours)
    bx.axvline(0.0, color="k", lw=0.8)
    labels = [f"{_ALIGNMENT_LABELS.get(s, s)}\n" + (f"p = {p:.2g}" if np.isfinite(p) else "n.t.")
              for s, p in zip(rows.index, rows["p_value"].to_numpy(dtype=float))]
    bx.set_yticks(y)
    bx.set_yticklabels(labels, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("Mantel r (species pairs)")
    bx.set_title("Mantel r per statistic")
    bx.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    return fig
