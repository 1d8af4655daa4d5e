"""Paper figures of a model comparison (BioCLIP-paper style), drawn from tables only.

Each function takes the tables that :mod:`treeprobe.drilldown` and the per-model metrics produce
(DataFrames, or the lists of records they become in a report's JSON) and returns a
:class:`matplotlib.figure.Figure` (no pyplot state; shown inline in Jupyter). Save them with
:func:`treeprobe.plots.save_figure` (PNG + vector PDF).

* :func:`plot_drilldown` — one row per model, one column per rank: the drill-down t-SNE maps.
* :func:`plot_metric_panels` — one panel per metric, ranks on x, one line per model with its
  interval as error bars, chance as a dashed grey line.
* :func:`plot_distance_profiles` — mean cosine distance by the rank of the pair's lowest common
  ancestor, one line per model with its interval as a band.

Publication defaults: every text at least 8 pt, colour-blind-safe colours (taxa: Paul Tol's
"muted" scheme plus black, 10 colours; models: the Okabe–Ito colours, each with its own marker
too), grey for the other and the unknown taxa, and **one colour per taxon in every panel**: a
taxon keeps its colour in every model's panel of a column.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.plots import _OTHER_GREY, _UNKNOWN_GREY, DisplayFigure, _palette, _short

__all__ = ["plot_drilldown", "plot_metric_panels", "plot_distance_profiles", "taxon_colours",
           "TAXON_COLOURS", "MODEL_COLOURS", "CHANCE_COLOUR", "MIN_FONT_SIZE"]

#: Colours of the largest taxa, in order: Paul Tol's colour-blind-safe "muted" scheme, then black.
TAXON_COLOURS = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
                 "#AA4499", "#000000")
#: Colours of the models, in order (Okabe & Ito, colour-blind safe; yellow last, as it is faint on white).
MODEL_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Colour of the chance lines.
CHANCE_COLOUR = "#7f7f7f"
#: Smallest font size used anywhere (points).
MIN_FONT_SIZE = 8
_TITLE_SIZE = 9
_RASTER_POINTS = 5_000  # panels with more points have their dots rasterised in the PDF (text stays vector)


def _frame(table, what: str, columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame from a DataFrame or a list of records; raises when ``columns`` are missing."""
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TreeprobeError(f"{what}: missing column(s) {', '.join(missing)} (have {', '.join(map(str, df.columns))})")
    if df.empty:
        raise TreeprobeError(f"{what}: the table is empty")
    return df


def _ordered_ranks(values) -> list[str]:
    seen = list(dict.fromkeys(map(str, values)))
    return [r for r in RANKS if r in seen] + [r for r in seen if r not in RANKS]


def _model_style(i: int) -> tuple:
    colours = MODEL_COLOURS if i < len(MODEL_COLOURS) else _palette(i + 1)
    return colours[i % len(colours)], _MODEL_MARKERS[i % len(_MODEL_MARKERS)]


def _style(ax) -> None:
    ax.tick_params(labelsize=MIN_FONT_SIZE)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def taxon_colours(labels, *, top_n: int = 10) -> dict[str, tuple | str]:
    """Colour of each of the ``top_n`` largest taxa among ``labels`` (one label per item; '' =
    unknown, never a taxon): largest first, ties by label, colours :data:`TAXON_COLOURS` in order
    (beyond 10 taxa: seaborn's husl colours). Taxa not in the dict are drawn grey.

    >>> taxon_colours(["b", "a", "b", "", "", "", "c"], top_n=2)
    {'b': '#332288', 'a': '#88CCEE'}
    """
    labels = np.asarray(labels).astype(str)
    counts = Counter(labels[labels != ""].tolist())
    top = sorted(counts, key=lambda t: (-counts[t], t))[:top_n]
    colours = TAXON_COLOURS if len(top) <= len(TAXON_COLOURS) else _palette(len(top))
    return {t: colours[i] for i, t in enumerate(top)}


def plot_drilldown(
    tsne_table,
    *,
    top_n: int = 10,
    models: Sequence[str] | None = None,
    ranks: Sequence[str] | None = None,
    title: str = "",
    panel_size: float = 2.2,
) -> Figure:
    """The drill-down t-SNE maps: one row per model, one column per rank.

    ``tsne_table``: the table of :func:`treeprobe.drilldown.drilldown_tsne` (DataFrame or its
    records): columns ``model``, ``column_rank``, ``parent_label``, ``row``, ``x``, ``y``, ``label``.
    Each panel is coloured by the column rank's ``top_n`` largest taxa in that column (counted over
    the column's items; ties by label), the others grey, the unknown light grey underneath. A taxon
    has the same colour in every model's panel; the legend (short names and item counts) is shared
    by the column, under its bottom panel. Top-row titles: ``"<rank> (within <parent>)"``; the model
    names label the rows. ``models`` / ``ranks`` choose and order rows / columns (default: models in
    order of appearance, ranks top first).

    Returns a Figure with exactly one axes per (model, rank), row by row.
    """
    df = _frame(tsne_table, "plot_drilldown", ("model", "column_rank", "parent_label", "row", "x", "y", "label"))
    df = df.assign(label=df["label"].fillna("").astype(str), model=df["model"].astype(str),
                   column_rank=df["column_rank"].astype(str))
    models = list(dict.fromkeys(df["model"])) if models is None else [str(m) for m in models]
    ranks = _ordered_ranks(df["column_rank"]) if ranks is None else [str(r) for r in ranks]
    fig = DisplayFigure(figsize=(panel_size * len(ranks) + 0.4, panel_size * len(models) + 1.6),
                        layout="constrained")
    axes = np.empty((len(models), len(ranks)), dtype=object)
    for i in range(len(models)):
        for j in range(len(ranks)):
            axes[i, j] = fig.add_subplot(len(models), len(ranks), i * len(ranks) + j + 1)
    for j, rank in enumerate(ranks):
        col = df[df["column_rank"] == rank]
        if col.empty:
            raise TreeprobeError(f"plot_drilldown: no points for rank {rank!r}")
        items = col.drop_duplicates("row")
        colours = taxon_colours(items["label"], top_n=top_n)
        counts = Counter(items["label"].tolist())
        n_unknown = counts.pop("", 0)
        n_other_taxa = len(counts) - len(colours)
        n_other = sum(counts.values()) - sum(counts[t] for t in colours)
        parent = _short(col["parent_label"].iloc[0])
        for i, model in enumerate(models):
            ax = axes[i, j]
            g = col[col["model"] == model]
            if g.empty:
                raise TreeprobeError(f"plot_drilldown: no points for model {model!r} at rank {rank!r}")
            xy, lab = g[["x", "y"]].to_numpy(dtype=float), g["label"].to_numpy()
            size = float(np.clip(1500.0 / len(g), 1.0, 14.0))
            raster = len(g) > _RASTER_POINTS
            unknown = lab == ""
            other = ~unknown & ~np.isin(lab, list(colours))
            for mask, colour, name in ((unknown, _UNKNOWN_GREY, "unknown"), (other, _OTHER_GREY, "other")):
                if mask.any():
                    ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, linewidths=0, rasterized=raster,
                               label=name)
            for taxon, colour in colours.items():
                m = lab == taxon
                if m.any():
                    ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colour, linewidths=0, rasterized=raster,
                               label=taxon)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{rank} (within {parent})", fontsize=_TITLE_SIZE)
            if j == 0:
                ax.set_ylabel(model, fontsize=_TITLE_SIZE)
        handles = [Line2D([], [], ls="", marker="o", ms=5, color=c, label=f"{_short(t)} ({counts[t]})")
                   for t, c in colours.items()]
        if n_other:
            handles.append(Line2D([], [], ls="", marker="o", ms=5, color=_OTHER_GREY,
                                  label=f"other {n_other_taxa} taxa ({n_other})"))
        if n_unknown:
            handles.append(Line2D([], [], ls="", marker="o", ms=5, color=_UNKNOWN_GREY,
                                  label=f"unknown {rank} ({n_unknown})"))
        axes[-1, j].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.03), fontsize=MIN_FONT_SIZE,
                           frameon=False, borderaxespad=0.0, handletextpad=0.2)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE + 1)
    return fig


def plot_metric_panels(
    table,
    *,
    models: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    title: str = "",
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Per-rank metrics of several models: one panel per metric, ranks (kingdom -> species) on x.

    ``table``: long table (DataFrame or records) with columns ``model``, ``metric``, ``rank``,
    ``estimate``, ``ci_low``, ``ci_high`` and optionally ``chance``. Each model is one line with
    markers (its own colour and marker; models slightly offset on x so the error bars do not
    overlap) and error bars from ``ci_low`` to ``ci_high`` (none where missing). The chance values
    are a dashed grey line per panel (one per distinct chance curve when models differ).
    ``models`` / ``metrics`` choose and order them (default: order of appearance). Legend: the
    models and "chance", once, right of the panels.

    Returns a Figure with one axes per metric.
    """
    df = _frame(table, "plot_metric_panels", ("model", "metric", "rank", "estimate", "ci_low", "ci_high"))
    df = df.assign(model=df["model"].astype(str), metric=df["metric"].astype(str), rank=df["rank"].astype(str))
    models = list(dict.fromkeys(df["model"])) if models is None else [str(m) for m in models]
    metrics = list(dict.fromkeys(df["metric"])) if metrics is None else [str(m) for m in metrics]
    ranks = _ordered_ranks(df["rank"])
    pos = {r: k for k, r in enumerate(ranks)}
    fig = DisplayFigure(figsize=(2.9 * len(metrics) + 1.4, 2.8), layout="constrained")
    width = 0.3
    offsets = (np.arange(len(models)) - (len(models) - 1) / 2) * (width / max(len(models) - 1, 1))
    handles, chance_handle = [], None
    for p, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), p + 1)
        sub = df[df["metric"] == metric]
        if sub.empty:
            raise TreeprobeError(f"plot_metric_panels: no rows for metric {metric!r}")
        chance_drawn: list[np.ndarray] = []
        for i, model in enumerate(models):
            g = sub[sub["model"] == model]
            if g.empty:
                continue
            g = g.assign(_x=g["rank"].map(pos)).sort_values("_x")
            x = g["_x"].to_numpy(dtype=float)
            est = g["estimate"].to_numpy(dtype=float)
            lo, hi = g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float)
            yerr = np.clip(np.nan_to_num(np.stack([est - lo, hi - est]), nan=0.0), 0.0, None)
            colour, marker = _model_style(i)
            cont = ax.errorbar(x + offsets[i], est, yerr=yerr, color=colour, marker=marker, ms=4, lw=1.2,
                               capsize=2, elinewidth=0.9, label=model)
            cont.lines[0].set_label(model)  # the data line itself carries the model's name
            if p == 0:
                handles.append(cont)
            if "chance" in g.columns:
                ch = np.full(len(ranks), np.nan)
                ch[g["_x"].to_numpy()] = pd.to_numeric(g["chance"], errors="coerce").to_numpy(dtype=float)
                if np.isfinite(ch).any() and not any(np.allclose(ch, c, equal_nan=True) for c in chance_drawn):
                    line, = ax.plot(np.arange(len(ranks)), ch, ls="--", color=CHANCE_COLOUR, lw=1.0, zorder=1,
                                    label="chance")
                    chance_handle = line if chance_handle is None else chance_handle
                    chance_drawn.append(ch)
        ax.set_xticks(range(len(ranks)))
        ax.set_xticklabels(ranks, rotation=45, ha="right")
        ax.set_xlim(-0.5, len(ranks) - 0.5)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(metric, fontsize=_TITLE_SIZE)
        ax.set_ylabel(metric, fontsize=MIN_FONT_SIZE)
        ax.grid(axis="y", alpha=0.3)
        _style(ax)
    handles += [chance_handle] if chance_handle is not None else []
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside right upper",
               fontsize=MIN_FONT_SIZE, frameon=False)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE + 1)
    return fig


def plot_distance_profiles(
    profiles: Mapping[str, object],
    *,
    title: str = "",
    band_alpha: float = 0.2,
) -> Figure:
    """Mean cosine distance of item pairs by the rank of their lowest common ancestor, per model.

    ``profiles``: dict model -> the table of :func:`treeprobe.drilldown.distance_profile`
    (DataFrame or records: ``lca_rank``, ``tree_distance``, ``mean_distance``, ``ci_low``,
    ``ci_high``). x: the LCA rank from species (same species) to root (different kingdoms), placed
    at its tree distance; y: mean cosine distance, one line with markers per model and its interval
    as a band of the model's colour (where the interval is known).

    Returns a Figure with one axes.
    """
    if not profiles:
        raise TreeprobeError("plot_distance_profiles needs at least one model's profile")
    fig = DisplayFigure(figsize=(4.2, 3.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ticks: dict[int, str] = {}
    for i, (model, prof) in enumerate(profiles.items()):
        df = _frame(prof, f"plot_distance_profiles ({model})",
                    ("lca_rank", "tree_distance", "mean_distance", "ci_low", "ci_high"))
        df = df.sort_values("tree_distance")
        x = df["tree_distance"].to_numpy(dtype=float)
        y = df["mean_distance"].to_numpy(dtype=float)
        lo, hi = df["ci_low"].to_numpy(dtype=float), df["ci_high"].to_numpy(dtype=float)
        colour, marker = _model_style(i)
        ax.plot(x, y, color=colour, marker=marker, ms=4, lw=1.4, label=str(model))
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=colour,
                            alpha=band_alpha, lw=0, label=f"_{model} interval")
        ticks.update({int(t): str(r) for t, r in zip(df["tree_distance"], df["lca_rank"])})
    order = sorted(ticks)
    ax.set_xticks(order)
    ax.set_xticklabels([ticks[t] for t in order], rotation=45, ha="right")
    ax.set_xlabel("rank of the lowest common ancestor" + (" (root: different kingdoms)" if "root" in ticks.values()
                                                           else ""), fontsize=MIN_FONT_SIZE)
    ax.set_ylabel("mean cosine distance", fontsize=MIN_FONT_SIZE)
    ax.grid(axis="y", alpha=0.3)
    _style(ax)
    ax.legend(fontsize=MIN_FONT_SIZE, frameon=False)
    if title:
        ax.set_title(title, fontsize=_TITLE_SIZE)
    return fig
