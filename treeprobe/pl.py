"""Plots: read what :mod:`treeprobe.tl` stored in a :class:`~treeprobe.core.TreeData` and draw it.

Each function returns a :class:`matplotlib.figure.Figure` (shown inline in Jupyter) and, with
``save="path/stem"``, also writes ``stem.png`` and ``stem.pdf``. The drawing itself is done by the
array-level functions of :mod:`treeprobe.plots`.

=====================  ====================================  =====================================
plot                   reads                                 after
=====================  ====================================  =====================================
:func:`tsne`           ``obsm["X_tsne"]``                    ``tp.tl.tsne(data)``
:func:`umap`           ``obsm["X_umap"]``                    ``tp.tl.umap(data)``
:func:`rank_metrics`   ``uns["clustering"]``, ``uns["knn"]``  ``tp.tl.clustering`` / ``tp.tl.knn``
:func:`mantel`         ``uns["mantel_pairs"]``               ``tp.tl.mantel(data)``
:func:`metric_panels`  ``comparison.per_model``               ``tp.tl.compare(...)``
:func:`distance_profiles`  ``comparison.extras``              ``tp.tl.compare(...)``
:func:`drilldown`      ``comparison.extras``                  ``tp.tl.compare(..., drilldown=True)``
:func:`training_curves`  a curves table                       ``treeprobe.training_curves.evaluate_run``
:func:`tree_recovery`  ``uns["tree_recovery_result"]``          ``tp.tl.tree_recovery(data)``
:func:`physignal`      ``uns["physignal_result"]``              ``tp.tl.physignal(data)``
:func:`within_species_variation`  ``uns["within_species_variation_ranks"]``  ``tp.tl.within_species_variation``
:func:`covariate_alignment`  ``uns["covariate_alignment_result"]``  ``tp.tl.covariate_alignment(data, "col")``
:func:`zeroshot`       ``uns["zeroshot"]``                     ``tp.tl.zeroshot(data)``
:func:`mistake_depths`  ``uns["mistake_depths"]``              ``tp.tl.zeroshot(data)``
:func:`fewshot`        ``uns["fewshot"]``                      ``tp.tl.fewshot(data)``
:func:`image_text_alignment`  ``uns["image_text_alignment"]``  ``tp.tl.text_tree(data)``
=====================  ====================================  =====================================

The comparison plots take the :class:`~treeprobe.compare.Comparison` that :func:`treeprobe.tl.compare`
returns (or its ``compare.json`` loaded as a dict), so paper figures are redrawn without embeddings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from treeprobe._utils import RANKS
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError

__all__ = ["embedding", "tsne", "umap", "rank_metrics", "mantel", "metric_panels", "distance_profiles",
           "drilldown", "training_curves", "tree_recovery", "physignal", "within_species_variation", "covariate_alignment",
           "zeroshot", "mistake_depths", "fewshot", "image_text_alignment"]

_MAP_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}


def _needs(data: TreeData, where: str, key: str, tool: str):
    store = data.obsm if where == "obsm" else data.uns
    if key not in store:
        raise TreeprobeError(f"no {where}[{key!r}] in this TreeData: run treeprobe.tl.{tool}(data) first")
    return store[key]


def _finish(fig, save):
    if save:
        from treeprobe.plots import save_figure

        save_figure(fig, save)
    return fig


def _colour_labels(data: TreeData, color) -> dict[str, np.ndarray]:
    """Rank → cumulative labels, or covariate column → its values as strings, for each name in ``color``."""
    names = list(RANKS) if color is None else ([color] if isinstance(color, str) else list(color))
    out = {}
    for name in names:
        if name in RANKS:
            out[name] = data.labels(name)
        elif name in data.items.columns:
            out[name] = data.items[name].astype(str).to_numpy()
        else:
            raise TreeprobeError(f"cannot colour by {name!r}: not a rank ({', '.join(RANKS)}) "
                                 "nor a column of data.items")
    return out


def embedding(data: TreeData, basis: str, *, color: str | Sequence[str] | None = None, top_n: int = 10,
              save: str | None = None):
    """A 2-D map (``obsm["X_<basis>"]``), one panel per name in ``color`` (a rank or an ``items`` column;
    default every rank), coloured by the ``top_n`` largest groups (the rest grey)."""
    from treeprobe.plots import plot_rank_maps

    full = _needs(data, "obsm", f"X_{basis}", basis)
    rows = np.flatnonzero(np.isfinite(full).all(axis=1))
    labels = {k: v[rows] for k, v in _colour_labels(data, color).items()}
    fig = plot_rank_maps(full[rows], labels, top_n=top_n, method_name=_MAP_NAMES.get(basis, basis),
                         n_total=len(data))
    return _finish(fig, save)


def tsne(data: TreeData, *, color: str | Sequence[str] | None = None, top_n: int = 10, save: str | None = None):
    """The t-SNE map of :func:`treeprobe.tl.tsne`, coloured by ``color`` (see :func:`embedding`)."""
    return embedding(data, "tsne", color=color, top_n=top_n, save=save)


def umap(data: TreeData, *, color: str | Sequence[str] | None = None, top_n: int = 10, save: str | None = None):
    """The UMAP map of :func:`treeprobe.tl.umap`, coloured by ``color`` (see :func:`embedding`)."""
    return embedding(data, "umap", color=color, top_n=top_n, save=save)


def rank_metrics(data: TreeData, *, save: str | None = None):
    """Clustering purity / NMI and kNN agreement per rank, each next to its chance value."""
    from treeprobe.plots import plot_rank_metrics

    clus, knn = data.uns.get("clustering"), data.uns.get("knn")
    if clus is None and knn is None:
        raise TreeprobeError("no clustering or kNN results: run treeprobe.tl.clustering(data) or tl.knn(data) first")
    return _finish(plot_rank_metrics(clus if clus is not None else knn, knn if clus is not None else None), save)


def mantel(data: TreeData, *, save: str | None = None):
    """Embedding cosine distance against tree distance for the sampled item pairs of :func:`treeprobe.tl.mantel`."""
    from treeprobe.plots import plot_mantel_scatter

    pairs = _needs(data, "uns", "mantel_pairs", "mantel")
    return _finish(plot_mantel_scatter(pairs["d_embed"], pairs["d_tree"]), save)


def _comparison_part(comparison, key: str, tool: str):
    """``key`` of a Comparison (attribute or extras) or of its JSON dict."""
    if isinstance(comparison, dict):
        part = comparison.get(key)
    else:
        part = getattr(comparison, key, None)
        if part is None:
            part = getattr(comparison, "extras", {}).get(key)
    if part is None or (hasattr(part, "__len__") and not len(part)):
        raise TreeprobeError(f"this comparison has no {key!r}: run {tool}")
    return part


def metric_panels(comparison, *, metrics: Sequence[str] | None = None, save: str | None = None):
    """Per-rank scores of every model with 95 % intervals and chance, one panel per metric
    (default: those of kNN agreement, level-specific kNN agreement, k-means NMI and purity that were computed)."""
    import pandas as pd

    from treeprobe.compare_plots import plot_metric_panels
    from treeprobe.compare_report import PANEL_METRICS

    table = pd.DataFrame(_comparison_part(comparison, "per_model", "treeprobe.tl.compare(...)"))
    wanted = list(metrics) if metrics else [m for m in PANEL_METRICS if m in set(table["metric"])]
    return _finish(plot_metric_panels(table[table["metric"].isin(wanted)], metrics=wanted or None), save)


def distance_profiles(comparison, *, save: str | None = None):
    """Mean embedding distance of item pairs by the rank of their lowest common ancestor, one line per model."""
    import pandas as pd

    from treeprobe.compare_plots import plot_distance_profiles

    prof = _comparison_part(comparison, "distance_profiles", "treeprobe.tl.compare(..., distance_profiles=True)")
    return _finish(plot_distance_profiles({m: pd.DataFrame(v) for m, v in prof.items()}), save)


def drilldown(comparison, *, top_n: int = 10, save: str | None = None):
    """The BioCLIP-style drill-down t-SNE: one row per model, one column per rank, each column the
    largest taxon of the rank above (same seed and perplexity for every model, one colour per taxon)."""
    import pandas as pd

    from treeprobe.compare_plots import plot_drilldown

    table = _comparison_part(comparison, "drilldown_tsne", "treeprobe.tl.compare(..., drilldown=True)")
    return _finish(plot_drilldown(pd.DataFrame(table), top_n=top_n), save)


def training_curves(table, *, loss=None, save: str | None = None):
    """Each metric against training step (one line per rank or level, interval bands where known), from
    :func:`treeprobe.training_curves.evaluate_run` or :func:`~treeprobe.training_curves.curves_from_log`;
    ``loss``: the run (or its log) to add the training loss."""
    from treeprobe.training_curves import plot_training_curves

    return _finish(plot_training_curves(table, loss=loss), save)


def tree_recovery(data: TreeData, *, level: str = "species", rank: str = "order", top_n: int = 10,
                  save: str | None = None):
    """Tanglegram of the recovered tree against the taxonomy, coloured by ``rank``
    (:func:`treeprobe.tree_recovery.plot_tree_recovery`), from ``uns["tree_recovery_result"]``."""
    from treeprobe.tree_recovery import plot_tree_recovery

    res = _needs(data, "uns", "tree_recovery_result", "tree_recovery")
    return _finish(plot_tree_recovery(res, level=level, rank=rank, top_n=top_n), save)


def physignal(data: TreeData, *, save: str | None = None):
    """K_mult against its permutation null and K per principal axis
    (:func:`treeprobe.phylo_plots.plot_physignal`), from ``uns["physignal_result"]``."""
    from treeprobe.phylo_plots import plot_physignal

    return _finish(plot_physignal(_needs(data, "uns", "physignal_result", "physignal")), save)


def within_species_variation(data: TreeData, *, save: str | None = None):
    """Per rank: within-species variation outside the between-taxon subspace vs chance, and a covariate's
    shift angle (:func:`treeprobe.phylo_plots.plot_within_species_variation`)."""
    from treeprobe.phylo_plots import plot_within_species_variation

    table = _needs(data, "uns", "within_species_variation_ranks", "within_species_variation")
    return _finish(plot_within_species_variation(table), save)


def covariate_alignment(data: TreeData, *, statistic: str = "partial_mantel_embedding_covariate_given_tree",
                        save: str | None = None):
    """The permutation null of one covariate-alignment statistic and the Mantel r of every row
    (:func:`treeprobe.phylo_plots.plot_covariate_alignment`), from ``uns["covariate_alignment_result"]``."""
    from treeprobe.phylo_plots import plot_covariate_alignment

    res = _needs(data, "uns", "covariate_alignment_result", "covariate_alignment")
    return _finish(plot_covariate_alignment(res, statistic=statistic), save)


def zeroshot(data: TreeData, *, save: str | None = None):
    """Per-rank zero-shot accuracy (top-1, top-k) per text type and mode with species-bootstrap bands and
    chance (:func:`treeprobe.image_text_plots.plot_zeroshot`), from ``uns["zeroshot"]``."""
    from treeprobe.image_text_plots import plot_zeroshot

    return _finish(plot_zeroshot(_needs(data, "uns", "zeroshot", "zeroshot")), save)


def mistake_depths(data: TreeData, *, save: str | None = None):
    """The distance-of-mistakes histogram: share of images by the deepest rank the top-1 species shares
    with the truth, next to uniform guessing (:func:`treeprobe.image_text_plots.plot_mistake_depths`)."""
    from treeprobe.image_text_plots import plot_mistake_depths

    return _finish(plot_mistake_depths(_needs(data, "uns", "mistake_depths", "zeroshot")), save)


def fewshot(data: TreeData, *, save: str | None = None):
    """Few-shot accuracy per rank and shot count, spread over seeds, next to chance
    (:func:`treeprobe.image_text_plots.plot_fewshot`), from ``uns["fewshot"]``."""
    from treeprobe.image_text_plots import plot_fewshot

    return _finish(plot_fewshot(_needs(data, "uns", "fewshot", "fewshot")), save)


def image_text_alignment(data: TreeData, *, save: str | None = None):
    """Own-taxon vs sibling-taxa text cosine per rank, and the share of images whose own text wins
    (:func:`treeprobe.image_text_plots.plot_image_text_alignment`), from ``uns["image_text_alignment"]``."""
    from treeprobe.image_text_plots import plot_image_text_alignment

    return _finish(plot_image_text_alignment(_needs(data, "uns", "image_text_alignment", "text_tree")), save)
