"""treeprobe: does a vision model's representation agree with the tree of life?

The API follows scanpy: one data object, :class:`TreeData` (embeddings + items + taxonomy +
results), tools that compute on it (:mod:`treeprobe.tl`), plots that read what the tools stored
(:mod:`treeprobe.pl`), loaders (:func:`read`, :mod:`treeprobe.data`) and bundled data sets
(:mod:`treeprobe.datasets`)::

    import treeprobe as tp
    ds = tp.datasets.bioclip2_1k()          # 902 real BioCLIP 2 embeddings with lineages
    tp.tl.mantel(ds["Insecta"])             # Mantel test inside one clade
    tp.tl.tsne(ds); tp.pl.tsne(ds, color="order")
    report = tp.tl.intrinsic(ds)            # everything, as in `treeprobe intrinsic`

Submodules are imported when first used (``tp.pl`` works right after ``import treeprobe``).
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("treeprobe")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from treeprobe._utils import RANKS
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError, TreeprobeWarning

#: Submodules reachable as attributes without importing them first.
SUBMODULES = ("tl", "pl", "datasets", "data", "report", "taxonomy", "tree", "mantel", "clustering", "neighbors",
              "embedding_maps", "plots", "simulate", "synthetic_images", "models", "extract", "extract_dist",
              "pipeline", "cli", "core", "permutation", "training", "compare", "compare_report", "compare_plots",
              "similarity", "drilldown", "html_report", "training_curves", "partial_mantel", "physignal",
              "tree_recovery", "variation", "phylo_plots", "covariate_alignment", "zeroshot", "mistakes", "fewshot",
              "text_embed", "text_tree", "image_text", "image_text_plots", "stream", "stream_dask")

#: Classes and functions reachable at the top level, imported when first used.
_LAZY_NAMES = {"Taxonomy": "taxonomy", "CladeStructure": "tree", "Report": "report", "write_report": "report",
               "load_report": "report"}

__all__ = ["RANKS", "TreeData", "TreeprobeError", "TreeprobeWarning", "read", "__version__", *_LAZY_NAMES, *SUBMODULES]


def read(path, *, metadata=None) -> TreeData:
    """Load a data set into a :class:`TreeData`: an embeddings file (``.parquet`` with an ``emb``
    column, or ``.npy`` + ``metadata``), a metadata CSV of images, or an iNat21-style image folder."""
    from treeprobe import data

    return data.load_embeddings(path, metadata=metadata) if metadata is not None else data.load_data(path)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"treeprobe.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"treeprobe.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'treeprobe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES) | set(_LAZY_NAMES))
