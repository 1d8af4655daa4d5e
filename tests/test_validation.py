"""treeprobe/_validation.py: the shared input checks, and that the tools use them (one wording)."""

import importlib

import numpy as np
import pytest

from treeprobe._validation import check_choice, check_codes, check_embeddings, check_int
from treeprobe.errors import TreeprobeError

M = importlib.import_module("treeprobe.mantel")


def test_check_embeddings():
    X = np.ones((4, 3), dtype=np.float32)
    out = check_embeddings(X)
    assert out is X  # no copy of what may be gigabytes
    assert check_embeddings([[1, 2]]).shape == (1, 2)
    assert check_embeddings(X, n_rows=4) is X
    with pytest.raises(TreeprobeError, match=r"^embeddings must be a 2-D array \(N, D\); got shape \(3,\)$"):
        check_embeddings(np.ones(3))
    with pytest.raises(TreeprobeError, match=r"^vectors must be a 2-D array \(N, D\); got shape \(2, 2, 2\)$"):
        check_embeddings(np.ones((2, 2, 2)), "vectors")
    with pytest.raises(TreeprobeError, match="^embeddings have 4 rows but 5 were expected$"):
        check_embeddings(X, n_rows=5)


def test_check_int():
    assert check_int(np.int64(7), "k") == 7 and type(check_int(np.int64(7), "k")) is int
    assert check_int(0, "permutations", minimum=0) == 0
    assert check_int(-3, "offset", minimum=None) == -3
    with pytest.raises(TreeprobeError, match="^k must be >= 1; got 0$"):
        check_int(0, "k")
    for bad in (True, 3.0, "3", None):  # a bool is an int to Python, not a count to a user
        with pytest.raises(TreeprobeError, match="k must be an integer"):
            check_int(bad, "k")


def test_check_choice():
    assert check_choice("b", "letter", ("a", "b")) == "b"
    with pytest.raises(TreeprobeError, match="^unknown letter 'c'; choose from a, b$"):
        check_choice("c", "letter", ("a", "b"))


def test_check_codes():
    np.testing.assert_array_equal(check_codes([2, 0, 2], 3, "genus"), [2, 0, 2])
    with pytest.raises(TreeprobeError, match=r"^codes for rank 'genus' have shape \(2,\); expected \(3,\)$"):
        check_codes([0, 1], 3, "genus")
    with pytest.raises(TreeprobeError, match="expected"):
        check_codes(np.zeros((3, 1)), 3, "genus")


def test_every_tool_words_a_bad_shape_the_same():
    """A 1-D array gets the one check_embeddings message from every tool that takes embeddings."""
    from treeprobe.embedding_maps import tsne_2d, umap_2d
    from treeprobe.neighbors import knn_indices, knn_rank_agreement
    from treeprobe.tree import CladeStructure

    cs = CladeStructure(parent=np.array([-1, 0, 0, 0]), length=np.ones(4), item_node=np.array([1, 2, 3]),
                        names=np.array(["", "a", "b", "c"], dtype=object))
    calls = [
        lambda x: M.mantel_tree(x, cs),
        lambda x: M.taxon_centroids(x, np.zeros(6, int)),
        lambda x: M.cosine_distance_matrix(x),
        lambda x: knn_indices(x, 2),
        lambda x: knn_indices(x, 2, normalised=True),
        lambda x: knn_rank_agreement(x, {"genus": np.zeros(6, int)}, k=2),
        lambda x: tsne_2d(x),
        lambda x: umap_2d(x),
    ]
    for call in calls:
        with pytest.raises(TreeprobeError, match=r"^embeddings must be a 2-D array \(N, D\); got shape \(6,\)$"):
            call(np.ones(6))


def test_the_tools_use_the_shared_wording_for_counts_and_choices():
    from treeprobe.clustering import cluster_labels, rankwise_clustering
    from treeprobe.embedding_maps import subsample_index
    from treeprobe.neighbors import knn_indices

    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(TreeprobeError, match="^k must be >= 1; got 0$"):
        knn_indices(X, 0)
    with pytest.raises(TreeprobeError, match="^max_points must be >= 1; got 0$"):
        subsample_index(10, 0)
    with pytest.raises(TreeprobeError, match="^unknown clustering method 'spectral'; choose from kmeans, agglomerative$"):
        cluster_labels(X, 2, "spectral")
    with pytest.raises(TreeprobeError, match="^unknown clustering method 'spectral'"):
        rankwise_clustering(X, {"genus": np.arange(10) % 2}, methods=("spectral",))
    with pytest.raises(TreeprobeError, match=r"^codes for rank 'genus' have shape \(9,\); expected \(10,\)$"):
        rankwise_clustering(X, {"genus": np.arange(9) % 2}, progress=False)
    with pytest.raises(TreeprobeError, match="^unknown Mantel method 'kendall'; choose from pearson, spearman$"):
        M.mantel(np.ones((3, 3)), np.ones((3, 3)), method="kendall")
