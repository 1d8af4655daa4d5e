"""The scalable Mantel path: exactness against scikit-bio on several trees and sizes, the tree
compression, the compiled kernels against their numpy fallback, and threads. (The CladeStructure
internals against plain loops: test_tree.py.)"""

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skbio import DistanceMatrix
from skbio.stats.distance import mantel as skbio_mantel

from treeprobe.taxonomy import RANKS, Taxonomy
from treeprobe.tree import CladeStructure
from tests.test_tree import random_taxonomy, random_tree_structure

M = importlib.import_module("treeprobe.mantel")  # the module (the package re-exports the function `mantel`)
INAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "inat2021_taxonomy" / "metadata.csv"


def skbio_r(X, cs, method="pearson"):
    r, _, _ = skbio_mantel(DistanceMatrix(M.cosine_distance_matrix(X)), DistanceMatrix(cs.item_distances()),
                           method=method, permutations=0)
    return r


@pytest.mark.parametrize("n,seed", [(30, 0), (250, 1), (1200, 2)])
def test_pearson_equals_skbio_rank_taxonomy(n, seed):
    tax = random_taxonomy(n, seed)
    cs = tax.clade_structure([3, 2, 2, 1.5, 1, 1, 0.25])
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 16)) + 2 * np.eye(16)[tax.codes("order") % 16]
    assert M.mantel_tree(X, cs, permutations=0).statistic == pytest.approx(skbio_r(X, cs), abs=1e-9)
    # float32 embeddings: the observed statistic is still exact (float64 from the data as given)
    X32 = X.astype(np.float32)
    assert M.mantel_tree(X32, cs, permutations=0).statistic == pytest.approx(skbio_r(X32, cs), abs=1e-9)


@pytest.mark.skipif(not INAT.exists(), reason="iNat21 taxonomy not in shared/data")
def test_pearson_equals_skbio_real_inat_lineages():
    meta = pd.read_csv(INAT)
    rng = np.random.default_rng(3)
    rows = meta.iloc[rng.integers(0, len(meta), 1500)]
    tax = Taxonomy.from_frame(rows[list(RANKS)])
    cs = tax.clade_structure()
    X = rng.normal(size=(1500, 32)).astype(np.float32) + np.eye(32, dtype=np.float32)[tax.codes("class") % 32]
    res = M.mantel_tree(X, cs, permutations=9)
    assert res.statistic == pytest.approx(skbio_r(X, cs), abs=1e-9)
    assert res.statistic > 0.05


@pytest.mark.parametrize("internal_items", [0, 25])
def test_pearson_equals_skbio_newick_tree_with_branch_lengths(internal_items):
    cs = random_tree_structure(60, 300, seed=4, internal_items=internal_items)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 12))
    X += 3 * rng.normal(size=(cs.n_nodes, 12))[cs.item_node]  # related to the tree
    res = M.mantel_tree(X, cs, permutations=0)
    assert res.statistic == pytest.approx(skbio_r(X, cs), abs=1e-9)
    assert res.n_pairs == 300 * 299 // 2


def test_subset_with_empty_clades_and_chains():
    tax = random_taxonomy(400, 6)
    cs = tax.clade_structure([1, 1, 2, 1, 1, 3, 1]).subset_items(np.arange(0, 400, 7))  # many empty nodes
    X = np.random.default_rng(7).normal(size=(cs.n_items, 5))
    comp = M._compress(cs)
    assert len(comp.parent) < cs.n_nodes
    assert M.mantel_tree(X, cs, permutations=0).statistic == pytest.approx(skbio_r(X, cs), abs=1e-9)


def test_compressed_tree_is_a_post_order_with_the_same_distances():
    cs = random_tree_structure(40, 150, seed=8, internal_items=10)
    comp = M._compress(cs)
    m = len(comp.parent)
    assert comp.parent[-1] == -1 and (comp.parent[:-1] > np.arange(m - 1)).all()
    # post-order: the subtree of v is the contiguous range ending at v
    sub_start = np.arange(m)
    for v in range(m - 1):
        sub_start[comp.parent[v]] = min(sub_start[comp.parent[v]], sub_start[v])
    for v in range(m):
        inside = np.arange(sub_start[v], v + 1)
        anc = inside.copy()
        for _ in range(m):  # every node of the range lies below v
            anc = np.where(anc == v, v, np.where(anc >= 0, comp.parent[np.maximum(anc, 0)], -1))
        assert (anc == v).all()
    node_of_item = np.empty(cs.n_items, dtype=np.int64)
    node_of_item[comp.order] = np.repeat(np.arange(m), comp.own)
    cc = CladeStructure(parent=np.r_[-1, (m - 1 - comp.parent[::-1][1:])], length=comp.w[::-1].copy(),
                        item_node=m - 1 - node_of_item, names=np.array([""] * m, dtype=object))
    assert np.allclose(cc.item_distances(), cs.item_distances())
    sum_t, sum_t2 = M._tree_pair_sums(comp, cs.n_items)
    T = cs.item_distances()[np.triu_indices(cs.n_items, 1)]
    assert sum_t == pytest.approx(T.sum(), rel=1e-12)
    assert sum_t2 == pytest.approx((T ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("kind", ["rank", "newick"])
def test_kernel_numpy_fallback_and_matrix_form_agree_on_permutations(kind, monkeypatch):
    if kind == "rank":
        cs = random_taxonomy(150, 9).clade_structure()
    else:
        cs = random_tree_structure(30, 150, seed=10, internal_items=5)
    X = np.random.default_rng(11).normal(size=(150, 6))
    kw = dict(permutations=60, seed=12, alternative="two-sided")
    fast = M.mantel_tree(X, cs, perm_dtype=np.float64, n_jobs=1, **kw)
    assert fast.details["backend"] == "numba"
    mat = M.mantel(M.cosine_distance_matrix(X), cs.item_distances(), **kw)
    monkeypatch.setenv("TREEPROBE_NO_NUMBA", "1")
    slow = M.mantel_tree(X, cs, perm_dtype=np.float64, **kw)
    slow_mat = M.mantel(M.cosine_distance_matrix(X), cs.item_distances(), **kw)
    assert slow.details["backend"] == "numpy"
    assert fast.statistic == pytest.approx(mat.statistic, abs=1e-12)
    assert fast.p_value == mat.p_value == slow.p_value == slow_mat.p_value
    assert slow.statistic == pytest.approx(fast.statistic, abs=1e-12)


def test_permuted_statistics_threads_and_float32(monkeypatch):
    """Threads change nothing; float32 permutation data moves permuted r by ~1e-7 at most."""
    tax = random_taxonomy(2000, 13)
    cs = tax.clade_structure()
    X = np.random.default_rng(14).normal(size=(2000, 128))
    calls = []
    orig = M._run_permutations

    def spy(*args):
        out = orig(*args)
        calls.append((args[4], out.copy()))  # (workers, permuted statistics)
        return out

    monkeypatch.setattr(M, "_run_permutations", spy)
    a = M.mantel_tree(X, cs, permutations=40, n_jobs=1)
    b = M.mantel_tree(X, cs, permutations=40, n_jobs=2)
    c = M.mantel_tree(X, cs, permutations=40, n_jobs=2, perm_dtype=np.float64)
    assert [w for w, _ in calls] == [1, 2, 2]
    assert a.statistic == b.statistic and a.p_value == b.p_value
    assert b.details["n_jobs"] == 2
    assert np.array_equal(calls[0][1], calls[1][1])
    assert a.statistic == pytest.approx(c.statistic, abs=1e-12)
    assert 0 < np.abs(calls[0][1] - calls[2][1]).max() < 1e-6


def test_progress_bar_and_defaults(capsys):
    tax = random_taxonomy(80, 15)
    X = np.random.default_rng(16).normal(size=(80, 4))
    res = M.mantel_tree(X, tax.clade_structure(), permutations=30, progress=True)
    assert "Mantel permutations" in capsys.readouterr().err  # the bar was drawn (tqdm writes to stderr)
    quiet = M.mantel_tree(X, tax.clade_structure(), permutations=30, progress=False)
    assert (res.statistic, res.p_value) == (quiet.statistic, quiet.p_value)  # the bar changes no number
    assert res.p_value * 31 == pytest.approx(round(res.p_value * 31))  # (hits + 1) / (30 + 1)
    assert res.details["permutation_dtype"] == "float32"


def test_cosine_distance_matrix_blocked_is_symmetric_and_exact():
    X = np.random.default_rng(17).normal(size=(2500, 7))
    D = M.cosine_distance_matrix(X)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    ref = np.maximum(1 - Xn @ Xn.T, 0)
    np.fill_diagonal(ref, 0)
    assert (D == D.T).all() and np.abs(D - ref).max() < 1e-13


def test_cosine_distance_condensed_is_the_matrix_upper_triangle_bit_for_bit():
    # 2500 rows: two row blocks of 2048, so a wrong offset in the second block or row segment shows
    from scipy.spatial.distance import squareform

    X = np.random.default_rng(23).normal(size=(2500, 7))
    X[3] = X[4]  # a zero distance: clipped at 0 in both
    y = M.cosine_distance_condensed(X)
    assert y.shape == (2500 * 2499 // 2,)
    assert np.array_equal(y, squareform(M.cosine_distance_matrix(X), checks=False))
    assert y[2500 * 3 - 3 * 4 // 2] < 1e-15 < y[2500 * 3 - 3 * 4 // 2 + 1] and (y >= 0).all()  # pair (3, 4)


def test_taxon_centroids_blocked():
    rng = np.random.default_rng(18)
    X = rng.normal(size=(20000, 5))
    codes = rng.integers(0, 37, 20000)
    C = M.taxon_centroids(X, codes)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    ref = np.array([Xn[codes == c].sum(0) for c in range(37)])
    assert np.allclose(C, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-12)


def test_spearman_estimator_semantics():
    tax = random_taxonomy(400, 19)
    X = np.random.default_rng(20).normal(size=(400, 8)) + 2 * np.eye(8)[tax.codes("phylum")]
    cs = tax.clade_structure()
    exact = M.mantel_tree(X, cs, method="spearman", permutations=0)
    est = M.mantel_tree(X, cs, method="spearman", permutations=29, spearman_max_n=200, spearman_repeats=7)
    d = est.details
    assert est.estimator == "item-subsample (200 of 400 items, 8 subsamples)"
    allr = np.array(d["subsample_statistics"])
    assert est.statistic == pytest.approx(allr.mean())
    half = (est.ci[1] - est.ci[0]) / 2
    assert half == pytest.approx(2.3646 * allr.std(ddof=1) / np.sqrt(8), rel=1e-3)  # t(0.975, 7)
    assert est.ci[0] < exact.statistic < est.ci[1] or abs(est.statistic - exact.statistic) < 3 * half
    assert d["p_value_subsample_statistic"] == allr[0]
    assert est.p_value == pytest.approx(1 / 30)  # strong signal: no permutation of the first subsample reaches it
    assert est.n_items == 400 and est.n_pairs == 400 * 399 // 2
    none = M.mantel_tree(X, cs, method="spearman", permutations=0, spearman_max_n=200, spearman_repeats=0)
    assert none.ci is None and np.isnan(none.p_value)


def test_deep_caterpillar_tree():
    """A 1500-deep chain of internal nodes: the compression and level passes stay fast and right
    (the tree's own depth passes on it: test_tree.py)."""
    n_int = 1500
    parent = np.r_[-1, np.arange(n_int - 1), np.arange(n_int)]  # chain, then one leaf per chain node
    length = np.r_[0.0, np.full(len(parent) - 1, 0.5)]
    item_node = np.arange(n_int, len(parent))
    cs = CladeStructure(parent=parent, length=length, item_node=item_node, names=np.array([""] * len(parent), dtype=object))
    X = np.random.default_rng(24).normal(size=(n_int, 4))
    sub = np.arange(0, n_int, 6)
    r_full = M.mantel_tree(X, cs, permutations=3).statistic
    assert r_full == pytest.approx(skbio_r(X, cs), abs=1e-9)
    assert M.mantel_tree(X[sub], cs.subset_items(sub), permutations=0).statistic == pytest.approx(
        skbio_r(X[sub], cs.subset_items(sub)), abs=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not INAT.exists(), reason="iNat21 taxonomy not in shared/data")
@pytest.mark.parametrize("n", [5000, 10000])
def test_slow_pearson_equals_skbio_at_10k_real_lineages(n):
    """The benchmark's problem (iNat21 lineages, 512-d float32) against scikit-bio; ~3.5 GB at 10,000."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_mantel import build_problem

    X, cs = build_problem(n, 512, seed=1, embeddings="clustered", metadata=INAT)
    res = M.mantel_tree(X, cs, permutations=99)
    assert res.statistic == pytest.approx(skbio_r(X, cs), abs=1e-9)
    assert res.p_value == pytest.approx(1 / 100)


# --- the species-permutation path at scale: batching branches, threads, float32 --------------------------

def _between_r(X, cs, codes):
    """Pearson r over between-species pairs from explicit matrices."""
    Xn = X.astype(float) / np.linalg.norm(X.astype(float), axis=1, keepdims=True)
    i, j = np.triu_indices(len(codes), 1)
    b = codes[i] != codes[j]
    return np.corrcoef((1 - Xn @ Xn.T)[i, j][b], cs.item_distances()[i, j][b])[0, 1]


@pytest.mark.parametrize("block", [8192, 16])
def test_species_sums_all_batching_branches(block, monkeypatch):
    """Species of 1 image, of fewer images than D, of more than D, and (block = 16) of more than one
    row block: every branch of the species pass gives the explicit between-species r."""
    monkeypatch.setattr(M, "_BLOCK_ROWS", block)
    tree = random_tree_structure(40, 40, seed=21)
    leaves = np.unique(tree.item_node)
    rng = np.random.default_rng(22)
    sizes = rng.choice([1, 1, 2, 3, 5, 9, 17, 40], len(leaves))  # D = 6 below: n < D, n > D, n > 16 rows
    codes = np.repeat(np.arange(len(leaves)), sizes)
    cs = CladeStructure(parent=tree.parent, length=tree.length, item_node=leaves[codes], names=tree.names)
    X = rng.normal(size=(len(codes), 6)) + 2 * rng.normal(size=(len(leaves), 6))[codes]
    res = M.mantel_species(X, cs, codes, permutations=0)
    assert res.statistic == pytest.approx(_between_r(X, cs, codes), abs=1e-10)


def test_species_test_threads_and_float32(monkeypatch):
    """Threads change nothing; float32 species sums move permuted r by ~1e-7 at most."""
    tax = random_taxonomy(6000, 23)
    cs = tax.clade_structure()
    codes = tax.codes("species")
    X = np.random.default_rng(24).normal(size=(6000, 128)).astype(np.float32)
    calls = []
    orig = M._run_permutations

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append((args[4], out.copy()))
        return out

    monkeypatch.setattr(M, "_run_permutations", spy)
    a = M.mantel_species(X, cs, codes, permutations=30, n_jobs=1)
    b = M.mantel_species(X, cs, codes, permutations=30, n_jobs=2)
    c = M.mantel_species(X, cs, codes, permutations=30, n_jobs=2, perm_dtype=np.float32)
    assert a.details["n_species"] * 128 >= M._MIN_THREAD_WORK  # large enough for threads
    assert [w for w, _ in calls] == [1, 2, 2]
    assert a.statistic == b.statistic and a.p_value == b.p_value and np.array_equal(calls[0][1], calls[1][1])
    assert 0 < np.abs(calls[0][1] - calls[2][1]).max() < 1e-6
    assert c.details["permutation_dtype"] == "float32"


@pytest.mark.slow
def test_slow_species_test_100k_items_no_square_matrix():
    """N = 100,000 (512-d float32, ~10,000 iNat-like species): exact Pearson in seconds, memory far
    below one N×N float64 matrix (80 GB)."""
    import resource
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    if not INAT.exists():
        pytest.skip("iNat21 taxonomy not in shared/data")
    from bench_mantel import build_problem

    X, cs = build_problem(100_000, 512, seed=0, embeddings="clustered", metadata=INAT)
    codes = np.unique(cs.item_node, return_inverse=True)[1]
    t = time.perf_counter()
    res = M.mantel_species(X, cs, codes, permutations=199)
    assert time.perf_counter() - t < 120
    assert res.statistic > 0.3 and res.p_value == pytest.approx(1 / 200)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 1024 ** 2  # KiB: < 4 GiB
