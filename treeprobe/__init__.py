"""treeprobe: does a vision model's representation agree with the tree of life?

The API follows scanpy's split: data loaders (``treeprobe.data``), tools that compute
(``mantel``, ``clustering``, ``neighbors``, ``embedding_maps``), plots (``treeprobe.plots``),
and the report (``treeprobe.report``). The most used names are re-exported here.
"""

__version__ = "0.1.0"

from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import RANKS, CladeStructure, Taxonomy, clade_structure_from_tree
from treeprobe.mantel import mantel, mantel_tree
from treeprobe import data
from treeprobe.pipeline import analyse_embeddings, run_intrinsic
from treeprobe.report import Report, write_report

__all__ = [
    "RANKS", "CladeStructure", "Report", "Taxonomy", "TreeprobeError", "analyse_embeddings",
    "clade_structure_from_tree", "data", "mantel", "mantel_tree", "run_intrinsic", "write_report",
]
