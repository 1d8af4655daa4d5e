"""Matplotlib figures for the intrinsic analysis.

Figures are built as :class:`matplotlib.figure.Figure` objects directly (no pyplot state,
no GUI backend needed: safe under Agg / headless). Save with :func:`save_figure`.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from treeprobe._utils import MANTEL_FIGURE_PAIRS
from treeprobe._utils import RANKS as _RANK_ORDER
from treeprobe.errors import TreeprobeError

__all__ = ["plot_rank_maps", "plot_rank_metrics", "plot_mantel_scatter", "save_figure", "DisplayFigure"]


class DisplayFigure(Figure):
    """A matplotlib Figure that Jupyter shows inline as PNG (no pyplot state, any backend)."""

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

_OTHER_GREY = "#c8c8c8"
_UNKNOWN_GREY = "#ececec"


def _palette(n: int) -> list:
    import seaborn as sns

    name = "tab10" if n <= 10 else ("tab20" if n <= 20 else "husl")
    return list(sns.color_palette(name, n))


def _short(label: str) -> str:
    """Last part of a cumulative label ``A|B|C`` -> ``C`` ('' shown as '(missing)')."""
    s = str(label).rsplit("|", 1)[-1]
    return s if s else "(missing)"


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    ncols = max(1, min(max_cols, n))
    return -(-n // ncols), ncols


def plot_rank_maps(
    coords,
    labels_by_rank: Mapping[str, np.ndarray],
    *,
    top_n: int = 10,
    title: str = "",
    method_name: str = "t-SNE",
    n_total: int | None = None,
    max_cols: int = 2,
) -> Figure:
    """One scatter panel per rank of a 2-D map, coloured by that rank's ``top_n`` largest taxa.

    Parameters
    ----------
    coords : array (n, 2)
        Map coordinates (e.g. from :func:`treeprobe.embedding_maps.tsne_2d`).
    labels_by_rank : mapping rank -> array of str (n,)
        Taxon label per point (cumulative ``A|B|C`` labels are shown by their last part).
    top_n : int
        Taxa coloured per panel (largest first; ties by name); all others are grey and
        drawn underneath. Legend entries: short name and point count.
    n_total : int, optional
        Number of points before subsampling; when larger than n the suptitle says
        'n = n of n_total points'.

    Returns a Figure with exactly one axes per rank (``len(fig.axes) == len(labels_by_rank)``).
    """
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise TreeprobeError(f"coords must have shape (n, 2); got {coords.shape}")
    n = coords.shape[0]
    ranks = list(labels_by_rank)
    if not ranks:
        raise TreeprobeError("plot_rank_maps needs at least one rank of labels")
    nrows, ncols = _grid(len(ranks), max_cols)
    fig = DisplayFigure(figsize=(7.0 * ncols, 5.0 * nrows), layout="constrained")
    size = float(np.clip(4000.0 / max(n, 1), 0.5, 16.0))
    colours = _palette(top_n)
    for i, rank in enumerate(ranks):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        labels = np.asarray(labels_by_rank[rank]).astype(str)
        if labels.shape != (n,):
            raise TreeprobeError(f"labels for rank {rank!r} have shape {labels.shape}; expected ({n},)")
        unknown = labels == ""  # unknown at this rank: never a taxon of its own
        counts = Counter(labels[~unknown].tolist())
        top = sorted(counts, key=lambda t: (-counts[t], t))[:top_n]
        is_top = np.isin(labels, top) & ~unknown
        n_other_taxa = len(counts) - len(top)
        other = ~is_top & ~unknown
        if unknown.any():
            ax.scatter(coords[unknown, 0], coords[unknown, 1], s=size, c=_UNKNOWN_GREY, linewidths=0,
                       rasterized=True, label=f"unknown at this rank ({int(unknown.sum())})")
        if other.any():
            ax.scatter(coords[other, 0], coords[other, 1], s=size, c=_OTHER_GREY,
                       linewidths=0, rasterized=True,
                       label=f"other {n_other_taxa} taxa ({int(other.sum())})")
        for colour, taxon in zip(colours, top):
            m = labels == taxon
            ax.scatter(coords[m, 0], coords[m, 1], s=size, color=colour, linewidths=0,
                       rasterized=True, label=f"{_short(taxon)} ({counts[taxon]})")
        if len(counts) > top_n:
            ax.set_title(f"{rank} (top {top_n} of {len(counts)} taxa)")
        else:
            ax.set_title(f"{rank} (all {len(counts)} taxa)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method_name} 1")
        ax.set_ylabel(f"{method_name} 2")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, markerscale=min(max(1.0, 20 / size), 6.0),
                  frameon=False, borderaxespad=0.0)
    sup = title or f"{method_name} map by rank"
    if n_total is not None and n_total > n:
        sup = f"{sup} (n = {n} of {n_total} points)"
    fig.suptitle(sup)
    return fig


def _rank_positions(ranks) -> tuple[list[str], dict[str, int]]:
    seen = list(dict.fromkeys(ranks))
    ordered = [r for r in _RANK_ORDER if r in seen] + [r for r in seen if r not in _RANK_ORDER]
    return ordered, {r: i for i, r in enumerate(ordered)}


def plot_rank_metrics(df: pd.DataFrame, knn_df: pd.DataFrame | None = None, *, title: str = "") -> Figure:
    """Per-rank scores vs their chance values, ranks on the x axis (kingdom -> species).

    ``df`` and the optional ``knn_df`` are tidy frames with a ``rank`` column, e.g. from
    :func:`treeprobe.clustering.rankwise_clustering` (with ``method``) and
    :func:`treeprobe.neighbors.knn_rank_agreement`. A panel is drawn for each metric
    found in either: purity (vs purity_chance), NMI (vs nmi_chance), kNN agreement
    (``agreement`` vs ``chance``). Solid lines = observed, dashed = chance, one colour per
    clustering method. Returns a Figure with one axes per metric found.
    """
    frames = [f for f in (df, knn_df) if f is not None]
    specs = [("purity", "purity_chance", "Purity"), ("nmi", "nmi_chance", "NMI"),
             ("agreement", "chance", "kNN agreement")]
    panels = []
    for obs, ch, name in specs:
        for f in frames:
            if obs in f.columns and ch in f.columns and "rank" in f.columns:
                panels.append((obs, ch, name, f))
                break
    if not panels:
        raise TreeprobeError("plot_rank_metrics: no (purity|nmi|agreement) and chance columns found")
    fig = DisplayFigure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    colours = _palette(10)
    for j, (obs, ch, name, f) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        order, pos = _rank_positions(f["rank"])
        groups = f.groupby("method", sort=False) if "method" in f.columns else [("", f)]
        for g, (method, sub) in enumerate(groups):
            sub = sub.assign(_x=sub["rank"].map(pos)).sort_values("_x")
            label = f" ({method})" if method else ""
            kind = f"k={int(sub['k'].iloc[0])}" if name == "kNN agreement" and "k" in sub else ""
            c = colours[g % len(colours)]
            ax.plot(sub["_x"], sub[obs], "o-", color=c, label=f"observed{label} {kind}".rstrip())
            ax.plot(sub["_x"], sub[ch], "s--", color=c, alpha=0.7, label=f"chance{label}")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=45, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_mantel_scatter(
    d_embed,
    d_tree,
    *,
    max_points: int = MANTEL_FIGURE_PAIRS,
    seed: int = 0,
    max_groups: int = 40,
    title: str = "",
) -> Figure:
    """Embedding cosine distance against tree distance, for pairs of items.

    ``d_embed`` and ``d_tree`` are condensed distance vectors of equal length
    (``scipy.spatial.distance.squareform`` order, N(N-1)/2 pairs). At most ``max_points``
    pairs are drawn (seeded). With at most ``max_groups`` distinct tree distances a box
    plot per distinct value is drawn (no fliers; pairs drawn per box on top), and the
    subset is stratified (at most ``max_points // n_groups`` pairs per value, so rare
    close pairs are all kept); otherwise a uniform subset is shown as a hexbin density (plus a colour-bar axes). Returns the Figure.
    """
    d_embed = np.asarray(d_embed, dtype=float).ravel()
    d_tree = np.asarray(d_tree, dtype=float).ravel()
    if d_embed.shape != d_tree.shape:
        raise TreeprobeError(f"d_embed and d_tree differ in length: {d_embed.size} vs {d_tree.size}")
    if d_embed.size == 0:
        raise TreeprobeError("plot_mantel_scatter needs at least one pair")
    total = d_embed.size
    rng = np.random.default_rng(seed)
    values, group = np.unique(d_tree, return_inverse=True)
    boxes = values.size <= max_groups
    if total > max_points:
        if boxes:  # stratified: at most max_points / n_groups pairs per tree distance
            cap = max(1, int(max_points) // values.size)
            idx = np.concatenate([
                g if g.size <= cap else rng.choice(g, size=cap, replace=False)
                for g in (np.flatnonzero(group == j) for j in range(values.size))
            ])
        else:
            idx = rng.choice(total, size=int(max_points), replace=False)
        d_embed, d_tree = d_embed[idx], d_tree[idx]
    fig = DisplayFigure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if boxes:
        data = [d_embed[d_tree == v] for v in values]
        ax.boxplot(data, positions=np.arange(values.size), showfliers=False, widths=0.6,
                   patch_artist=True, boxprops=dict(facecolor="#9ecae1"),
                   medianprops=dict(color="black"))
        ax.set_xticks(np.arange(values.size))
        ax.set_xticklabels([f"{v:g}" for v in values], rotation=45 if values.size > 12 else 0)
        top = ax.get_ylim()[1]
        for i, d in enumerate(data):
            ax.text(i, top, f"{d.size}", ha="center", va="bottom", fontsize=6, color="0.4")
    else:
        hb = ax.hexbin(d_tree, d_embed, gridsize=50, mincnt=1, cmap="viridis", bins="log")
        fig.colorbar(hb, ax=ax, label="pairs (log)")
    ax.set_xlabel("tree distance")
    ax.set_ylabel("embedding cosine distance")
    sub = f"n = {d_embed.size} of {total} pairs" if total > d_embed.size else f"n = {total} pairs"
    fig.suptitle(f"{title} ({sub})" if title else sub)
    return fig


def save_figure(fig: Figure, path_stem) -> tuple[Path, Path]:
    """Write ``<path_stem>.png`` (dpi 150) and ``<path_stem>.pdf``; close the figure.

    Parent folders are created. Returns ``(png_path, pdf_path)``.
    """
    stem = Path(path_stem)
    if stem.suffix.lower() in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    fig.savefig(png, dpi=150)
    fig.savefig(pdf)
    plt = sys.modules.get("matplotlib.pyplot")  # only pyplot-made figures need closing
    if plt is not None:
        plt.close(fig)
    return png, pdf
