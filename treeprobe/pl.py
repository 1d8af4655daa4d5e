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
=====================  ====================================  =====================================
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from treeprobe._utils import RANKS
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError

__all__ = ["embedding", "tsne", "umap", "rank_metrics", "mantel"]

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
