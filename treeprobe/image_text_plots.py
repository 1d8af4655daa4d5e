"""Figures of the image-text side: per-rank zero-shot accuracy, the depth of the mistakes, few-shot accuracy
and image-text alignment, each drawn from the tool's table (so a report's JSON redraws them).

Array-level like :mod:`treeprobe.plots`: each function returns a :class:`~treeprobe.plots.DisplayFigure`.
Okabe–Ito colours (colour-blind safe), one colour per mode / text type / method across panels; chance is a
dashed grey line, intervals are shaded bands or error bars.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.plots import DisplayFigure

__all__ = ["plot_zeroshot", "plot_mistake_depths", "plot_fewshot", "plot_image_text_alignment"]

_OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
_GREY = "0.55"


def _need(table: pd.DataFrame, cols, what: str) -> None:
    missing = sorted(set(cols) - set(table.columns))
    if missing:
        raise TreeprobeError(f"{what}: the table lacks column(s) {', '.join(missing)}")
    if not len(table):
        raise TreeprobeError(f"{what}: the table is empty")


def _rank_axis(ax, ranks) -> None:
    ax.set_xticks(np.arange(len(ranks)))
    ax.set_xticklabels(ranks, rotation=45, ha="right")
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, first: pd.DataFrame, pos: dict, chance: str, ranks, title: str, legend: bool) -> None:
    """Chance line (dashed, from one row per rank of ``first``), 0-1 accuracy axis, rank ticks, title."""
    ax.plot(first["rank"].map(pos), first[chance], "--", color=_GREY, label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    _rank_axis(ax, ranks)
    if legend:
        ax.legend(fontsize=7)


def _ranks_in(table: pd.DataFrame) -> list:
    present = list(dict.fromkeys(table["rank"]))
    return [r for r in RANKS if r in present] + [r for r in present if r not in RANKS]


def plot_zeroshot(table: pd.DataFrame, *, title: str = "") -> DisplayFigure:
    """Top-1 (left) and top-k (right) zero-shot accuracy per rank, one line per (text type, mode) with its
    species-bootstrap band, chance dashed. ``table``: ``uns["zeroshot"]`` (columns rank, mode, top1,
    top1_lo, top1_hi, topk, topk_lo, topk_hi, k, chance_top1, chance_topk; optional text_type).

    >>> t = pd.DataFrame(dict(rank=["kingdom", "species"], mode="flat", top1=[.9, .2], top1_lo=[.8, .1],
    ...     top1_hi=[.95, .3], topk=[1., .5], topk_lo=[1., .4], topk_hi=[1., .6], k=5, chance_top1=[.5, .01],
    ...     chance_topk=[1., .05]))
    >>> [a.get_title() for a in plot_zeroshot(t).axes]
    ['top-1 zero-shot accuracy', 'top-5 zero-shot accuracy']
    """
    _need(table, ["rank", "mode", "top1", "top1_lo", "top1_hi", "chance_top1"], "plot_zeroshot")
    ranks = _ranks_in(table)
    pos = {r: i for i, r in enumerate(ranks)}
    has_k = "topk" in table.columns and table["topk"].notna().any()
    fig = DisplayFigure(figsize=(9.0 if has_k else 4.8, 3.8), layout="constrained")
    groups = list(table.groupby(["text_type", "mode"] if "text_type" in table.columns else ["mode"], sort=False))
    k = int(table["k"].max()) if "k" in table.columns else 5
    for p, (col, lo, hi, chance, name) in enumerate(
            [("top1", "top1_lo", "top1_hi", "chance_top1", "top-1"),
             ("topk", "topk_lo", "topk_hi", "chance_topk", f"top-{k}")][: 2 if has_k else 1]):
        ax = fig.add_subplot(1, 2 if has_k else 1, p + 1)
        for c, (key, sub) in enumerate(groups):
            sub = sub[sub[col].notna()]
            if not len(sub):
                continue
            x = sub["rank"].map(pos).to_numpy()
            label = " / ".join(key) if isinstance(key, tuple) else str(key)
            colour = _OKABE_ITO[c % len(_OKABE_ITO)]
            ax.plot(x, sub[col], "o-", color=colour, label=label)
            ax.fill_between(x, sub[lo], sub[hi], color=colour, alpha=0.18, lw=0)
        _accuracy_panel(ax, table.drop_duplicates("rank"), pos, chance, ranks, f"{name} zero-shot accuracy", p == 0)
    if title:
        fig.suptitle(title)
    return fig


def plot_mistake_depths(histogram: pd.DataFrame, *, title: str = "") -> DisplayFigure:
    """Where the top-1 species prediction meets the truth: share of images by the rank of the lowest common
    ancestor (root → same species), bars per text type, next to uniform guessing (grey outline).
    ``histogram``: ``uns["mistake_depths"]`` (columns depth, lca_rank, fraction, chance_fraction; optional
    text_type).

    >>> h = pd.DataFrame(dict(depth=[0, 1, 2], lca_rank=["root", "kingdom", "same species"],
    ...                       fraction=[.1, .3, .6], chance_fraction=[.5, .4, .1]))
    >>> plot_mistake_depths(h).axes[0].get_xlabel()
    'deepest shared rank of prediction and truth'
    """
    _need(histogram, ["depth", "lca_rank", "fraction", "chance_fraction"], "plot_mistake_depths")
    types = list(dict.fromkeys(histogram["text_type"])) if "text_type" in histogram.columns else [None]
    fig = DisplayFigure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(types)
    for c, tt in enumerate(types):
        sub = histogram if tt is None else histogram[histogram["text_type"] == tt]
        ax.bar(sub["depth"] - 0.4 + width * (c + 0.5), sub["fraction"], width=width,
               color=_OKABE_ITO[c % len(_OKABE_ITO)], label=tt or "model")
    first = histogram.drop_duplicates("depth").sort_values("depth")
    ax.step(first["depth"], first["chance_fraction"], where="mid", color=_GREY, ls="--", label="uniform guess")
    ax.set_xticks(first["depth"])
    ax.set_xticklabels(first["lca_rank"], rotation=45, ha="right")
    ax.set_xlabel("deepest shared rank of prediction and truth")
    ax.set_ylabel("share of images")
    ax.set_title("Distance of mistakes (top-1 species)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return fig


def plot_fewshot(summary: pd.DataFrame, *, title: str = "") -> DisplayFigure:
    """Few-shot accuracy per rank, one panel per shot count k, one line per method with min–max over seeds
    as a band and the mean ± sd as error bars; chance dashed. ``summary``: ``uns["fewshot"]``.

    >>> s = pd.DataFrame(dict(rank=["kingdom", "genus"] * 2, k=[1, 1, 5, 5], method="simpleshot",
    ...     mean=[.7, .3, .8, .5], sd=.05, min=[.6, .2, .7, .4], max=[.8, .4, .9, .6], chance=[.5, .1, .5, .1]))
    >>> [a.get_title() for a in plot_fewshot(s).axes]
    ['1-shot', '5-shot']
    """
    _need(summary, ["rank", "k", "method", "mean", "sd", "min", "max", "chance"], "plot_fewshot")
    ks = sorted(summary["k"].unique())
    ranks = _ranks_in(summary)
    pos = {r: i for i, r in enumerate(ranks)}
    fig = DisplayFigure(figsize=(4.4 * len(ks), 3.6), layout="constrained")
    methods = list(dict.fromkeys(summary["method"]))
    for p, k in enumerate(ks):
        ax = fig.add_subplot(1, len(ks), p + 1)
        part = summary[summary["k"] == k]
        for c, m in enumerate(methods):
            sub = part[(part["method"] == m) & part["mean"].notna()]
            x = sub["rank"].map(pos).to_numpy()
            colour = _OKABE_ITO[c % len(_OKABE_ITO)]
            ax.errorbar(x, sub["mean"], yerr=sub["sd"].fillna(0), fmt="o-", color=colour, capsize=2, label=m)
            ax.fill_between(x, sub["min"], sub["max"], color=colour, alpha=0.15, lw=0)
        _accuracy_panel(ax, part.drop_duplicates("rank"), pos, "chance", ranks, f"{k}-shot", p == 0)
    if title:
        fig.suptitle(title)
    return fig


def plot_image_text_alignment(table: pd.DataFrame, *, title: str = "") -> DisplayFigure:
    """Per rank: the mean cosine of each image to its own taxon's text and to its sibling taxa's texts (left),
    and the share of images whose own text beats every sibling's next to chance (right), with
    species-bootstrap intervals. ``table``: ``uns["image_text_alignment"]``.

    >>> t = pd.DataFrame(dict(rank=["kingdom", "genus"], own_cos=[.3, .5], sibling_cos=[.1, .4],
    ...     top1_siblings=[.9, .6], chance=[.5, .3]))
    >>> [a.get_title() for a in plot_image_text_alignment(t).axes]
    ['image-text cosine', 'own text beats every sibling']
    """
    _need(table, ["rank", "own_cos", "sibling_cos", "top1_siblings", "chance"], "plot_image_text_alignment")
    ranks = _ranks_in(table)
    x = table["rank"].map({r: i for i, r in enumerate(ranks)}).to_numpy()
    fig = DisplayFigure(figsize=(9.0, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(x, table["own_cos"], "o-", color=_OKABE_ITO[0], label="own taxon's text")
    ax.plot(x, table["sibling_cos"], "s--", color=_OKABE_ITO[1], label="sibling taxa's texts (mean)")
    ax.set_ylabel("cosine")
    ax.set_title("image-text cosine")
    ax.legend(fontsize=7)
    _rank_axis(ax, ranks)
    bx = fig.add_subplot(1, 2, 2)
    bx.plot(x, table["top1_siblings"], "o-", color=_OKABE_ITO[0], label="observed")
    if {"top1_siblings_lo", "top1_siblings_hi"} <= set(table.columns):
        bx.fill_between(x, table["top1_siblings_lo"], table["top1_siblings_hi"], color=_OKABE_ITO[0], alpha=0.18,
                        lw=0)
    bx.plot(x, table["chance"], "--", color=_GREY, label="chance")
    bx.set_ylim(-0.02, 1.02)
    bx.set_ylabel("share of images")
    bx.set_title("own text beats every sibling")
    bx.legend(fontsize=7)
    _rank_axis(bx, ranks)
    if title:
        fig.suptitle(title)
    return fig
