"""Partial Mantel test: exact against explicit N×N matrices, level under a confounded null, power
with known truth, the real BioCLIP 2 example, and (slow) R's vegan::mantel.partial."""

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from ete3 import Tree

import treeprobe.partial_mantel as pm
from treeprobe.datasets import bioclip2_1k
from treeprobe.errors import TreeprobeError
from treeprobe.mantel import mantel_tree
from treeprobe.partial_mantel import covariate_distance_matrix, partial_mantel_data, partial_mantel_tree
from treeprobe.permutation import item_permutation, stratified_species_permutation
from treeprobe.tree import CladeStructure, clade_structure_from_tree

ROOT = Path(__file__).resolve().parents[1]
VEGAN_SCRIPT = ROOT / "benchmarks" / "partial_mantel_vegan.R"


# --- worlds ------------------------------------------------------------------------------------


def rank_clades(lineage: np.ndarray, lengths) -> CladeStructure:
    """Rank tree of integer lineages (n_items, n_ranks), without pandas: one node per distinct
    lineage prefix, edge above a rank-r node of length lengths[r]; items at the last rank."""
    n, n_ranks = lineage.shape
    parent, length = [-1], [0.0]
    prev = np.zeros(n, dtype=np.int64)
    for r in range(n_ranks):
        _, first, inv = np.unique(lineage[:, :r + 1], axis=0, return_index=True, return_inverse=True)
        offset = len(parent)
        parent.extend(prev[first].tolist())
        length.extend([float(lengths[r])] * len(first))
        prev = offset + inv.ravel()
    return CladeStructure(parent=np.array(parent), length=np.array(length), item_node=prev,
                          names=np.array([""] * len(parent), dtype=object))


def rank_distances(lineage: np.ndarray, lengths) -> np.ndarray:
    """t_ij = 2·Σ of the rank lengths from the first rank where the lineages differ (N, N)."""
    differ = np.logical_or.accumulate(lineage[:, None, :] != lineage[None, :, :], axis=2)
    return 2.0 * differ @ np.asarray(lengths, dtype=float)


def covariate(kind: str, n: int, rng) -> np.ndarray:
    if kind == "categorical":
        return rng.choice(["citizen", "museum", "camera"], size=n, p=[0.5, 0.3, 0.2])
    return np.round(rng.normal(size=n), 1) + 1000.0  # ties, and far from 0


def world_a(tree: str, kind: str, seed: int = 0):
    """(X, clades, T, z, species codes) with 1-4 images per species, z partly following the tree."""
    rng = np.random.default_rng(seed)
    n_species = 24
    sizes = rng.integers(1, 5, n_species)
    sp = np.repeat(np.arange(n_species), sizes)
    if tree == "rank":
        sp_lin = np.column_stack([rng.integers(k, size=n_species) for k in (2, 2, 3, 3, 3, 4)]
                                 + [np.arange(n_species)])
        lengths = rng.uniform(0.2, 3.0, 7)
        lin = sp_lin[sp]
        clades, T = rank_clades(lin, lengths), rank_distances(lin, lengths)
        top = lin[:, 0]
    else:
        random.seed(seed)  # ete3's populate draws from the random module
        t = Tree()
        t.populate(n_species)
        for i, node in enumerate(t.traverse("preorder")):
            node.dist = float(rng.uniform(0.05, 3.0)) if i else 0.0
        leaves = t.get_leaves()
        Tsp = np.array([[t.get_distance(a, b) for b in leaves] for a in leaves])
        clades, mask = clade_structure_from_tree(t, [leaves[s].name for s in sp])
        assert mask.all()
        T = Tsp[np.ix_(sp, sp)]
        top = (Tsp[0, sp] < np.median(Tsp[0])).astype(int)
    X = rng.normal(size=(len(sp), 6)) + 0.8 * rng.normal(size=(n_species, 6))[sp]
    X[:, 0] += 1.5 * top
    z = covariate(kind, len(sp), rng)
    if kind == "numeric":
        z = z + 0.8 * top
    species = np.unique(clades.item_node, return_inverse=True)[1].ravel()  # codes in node order
    return X, clades, T, z, species


def reference(D, T, Z, mask):
    """(r_dt.z, r_dt, r_dz, r_tz) over the pairs i < j with mask[i, j], from the explicit matrices."""
    iu = np.triu_indices(len(D), 1)
    keep = mask[iu]
    r = np.corrcoef([D[iu][keep], T[iu][keep], Z[iu][keep]])
    rdt, rdz, rtz = r[0, 1], r[0, 2], r[1, 2]
    return (rdt - rdz * rtz) / np.sqrt((1 - rdz ** 2) * (1 - rtz ** 2)), rdt, rdz, rtz


def matrices(X, z, kind):
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = 1.0 - U @ U.T
    Z = (z[:, None] != z[None, :]).astype(float) if kind == "categorical" else np.abs(z[:, None] - z[None, :])
    return D, Z


# --- (a) exact against explicit matrices ------------------------------------------------------


@pytest.mark.parametrize("tree", ["rank", "ete3"])
@pytest.mark.parametrize("kind", ["categorical", "numeric"])
@pytest.mark.parametrize("pairs", ["between-species", "all"])
def test_equals_explicit_matrices_with_species_permutations(tree, kind, pairs):
    X, clades, T, z, species = world_a(tree, kind, seed=1)
    D, Z = matrices(X, z, kind)
    mask = species[:, None] != species[None, :] if pairs == "between-species" else np.ones(D.shape, bool)
    res = partial_mantel_tree(X, clades, z, kind=kind, pairs=pairs, permutation="species", permutations=30,
                              seed=7, alternative="two-sided", name="z")
    want = reference(D, T, Z, mask)
    got = (res.statistic, res.r_dt, res.r_dz, res.r_tz)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert res.n_pairs == int(mask[np.triu_indices(len(D), 1)].sum())
    # the same permutations on the matrices: species move as blocks, d and z move with the images
    sizes, rng = np.bincount(species), np.random.default_rng(7)
    perm_ref = []
    for _ in range(30):
        p = item_permutation(species, stratified_species_permutation(sizes, rng))
        perm_ref.append(reference(D[np.ix_(p, p)], T, Z[np.ix_(p, p)], mask))
    perm_ref = np.array(perm_ref)
    np.testing.assert_allclose(res.permuted_statistics, perm_ref[:, 0], rtol=0, atol=1e-10)
    assert res.p_value == pytest.approx((np.sum(np.abs(perm_ref[:, 0]) >= abs(want[0])) + 1) / 31)
    assert res.mantel_p_value == pytest.approx((np.sum(np.abs(perm_ref[:, 1]) >= abs(want[1])) + 1) / 31)
    assert res.control == {"column": "z", "kind": kind, "n_categories": 3 if kind == "categorical" else None}
    # the details: means over the same pairs, and what could move
    iu = np.triu_indices(len(D), 1)
    keep = mask[iu]
    det = res.details
    assert det["mean_embedding_distance"] == pytest.approx(D[iu][keep].mean(), abs=1e-12)
    assert det["mean_tree_distance"] == pytest.approx(T[iu][keep].mean(), rel=1e-12)
    assert det["mean_covariate_distance"] == pytest.approx(Z[iu][keep].mean(), rel=1e-12)
    assert det["permuted_r_tz_mean"] == pytest.approx(perm_ref[:, 3].mean(), abs=1e-10)
    per_size = np.bincount(sizes)
    assert det["n_permutable_units"] == int(per_size[per_size > 1].sum()) and res.n_species == len(sizes)


@pytest.mark.parametrize("tree", ["rank", "ete3"])
@pytest.mark.parametrize("kind", ["categorical", "numeric"])
def test_image_permutations_are_vegans_scheme(tree, kind):
    """permutation='images': t's rows and columns permuted by rng.permutation(N), d and z fixed."""
    X, clades, T, z, _ = world_a(tree, kind, seed=2)
    D, Z = matrices(X, z, kind)
    res = partial_mantel_tree(X, clades, z, pairs="all", permutation="images", permutations=25, seed=3)
    rng = np.random.default_rng(3)
    everything = np.ones(D.shape, bool)
    perm_ref = [reference(D, T[np.ix_(p, p)], Z, everything)[0] for p in (rng.permutation(len(D)) for _ in range(25))]
    np.testing.assert_allclose(res.permuted_statistics, perm_ref, rtol=0, atol=1e-10)
    assert res.r_dz == pytest.approx(reference(D, T, Z, everything)[2], abs=1e-12)


@pytest.mark.parametrize("tree", ["rank", "ete3"])
def test_within_covariate_strata_keep_r_tz_and_match_matrices(tree):
    X, clades, T, z, species = world_a(tree, "categorical", seed=4)
    D, Z = matrices(X, z, "categorical")
    mask = species[:, None] != species[None, :]
    res = partial_mantel_tree(X, clades, z, permutations=30, seed=5)  # auto: within-covariate for labels
    assert res.permutation == "species-within-covariate"
    # strata: the (count per category) vector of each species, numbered in lexicographic order
    make_up = pd.crosstab(species, z).to_numpy()
    strata = np.unique(make_up, axis=0, return_inverse=True)[1].ravel()
    rng = np.random.default_rng(5)
    perm_ref = []
    for _ in range(30):
        p = item_permutation(species, stratified_species_permutation(strata, rng))
        perm_ref.append(reference(D[np.ix_(p, p)], T, Z[np.ix_(p, p)], mask))
    perm_ref = np.array(perm_ref)
    np.testing.assert_allclose(perm_ref[:, 3], res.r_tz, rtol=0, atol=1e-12)  # the covariate never moved
    np.testing.assert_allclose(res.permuted_statistics, perm_ref[:, 0], rtol=0, atol=1e-10)
    assert res.p_value == res.mantel_p_value  # r_tz fixed: the partial r is monotone in r_dt
    assert 0 < res.details["n_permutable_units"] < res.n_species


def test_items_on_internal_nodes():
    """Species sitting on internal nodes (own items above other clades) keep the clade runs exact."""
    from tests.test_tree import random_tree_structure

    clades = random_tree_structure(12, 50, seed=3, internal_items=8)
    rng = np.random.default_rng(3)
    X, z = rng.normal(size=(50, 5)), covariate("numeric", 50, rng)
    species = np.unique(clades.item_node, return_inverse=True)[1].ravel()
    D, Z = matrices(X, z, "numeric")
    T, mask = clades.item_distances(), species[:, None] != species[None, :]
    res = partial_mantel_tree(X, clades, z, permutations=20, seed=2)
    sizes, g = np.bincount(species), np.random.default_rng(2)
    perm_ref = [reference(D[np.ix_(p, p)], T, Z[np.ix_(p, p)], mask)[0]
                for p in (item_permutation(species, stratified_species_permutation(sizes, g)) for _ in range(20))]
    assert res.statistic == pytest.approx(reference(D, T, Z, mask)[0], abs=1e-10)
    np.testing.assert_allclose(res.permuted_statistics, perm_ref, rtol=0, atol=1e-10)


def test_large_species_path_equals_pairwise_path(monkeypatch):
    """Species above _SMALL_SPECIES images enter the within-species sums through Gram matrices."""
    for kind in ("categorical", "numeric"):
        X, clades, _, z, _ = world_a("rank", kind, seed=6)
        a = partial_mantel_tree(X, clades, z, permutation="species", permutations=5)
        monkeypatch.setattr(pm, "_SMALL_SPECIES", 1)
        b = partial_mantel_tree(X, clades, z, permutation="species", permutations=5)
        monkeypatch.undo()
        np.testing.assert_allclose([b.statistic, b.r_dt, b.r_dz, b.r_tz], [a.statistic, a.r_dt, a.r_dz, a.r_tz],
                                   rtol=0, atol=1e-12)


def test_all_pairs_r_dt_is_the_plain_mantel_r():
    X, clades, _, z, _ = world_a("ete3", "numeric", seed=8)
    res = partial_mantel_tree(X, clades, z, pairs="all", permutations=0)
    assert res.r_dt == pytest.approx(mantel_tree(X, clades, permutations=0).statistic, abs=1e-12)
    assert np.isnan(res.p_value) and res.permuted_statistics.shape == (0,)


def test_covariate_distance_matrix_and_bad_inputs():
    assert covariate_distance_matrix(pd.Series([2, 5, 3])).tolist() == [[0, 3, 1], [3, 0, 2], [1, 2, 0]]
    X, clades, _, z, _ = world_a("rank", "categorical", seed=9)
    with pytest.raises(TreeprobeError, match="pairs='all'"):
        partial_mantel_tree(X, clades, z, permutation="images")
    with pytest.raises(TreeprobeError, match="categorical covariate"):
        partial_mantel_tree(X, clades, np.arange(len(X)) * 1.0, permutation="species-within-covariate")
    with pytest.raises(TreeprobeError, match="missing"):
        partial_mantel_tree(X, clades, pd.Series(z).where(np.arange(len(z)) > 0))
    with pytest.raises(TreeprobeError, match="constant"):
        partial_mantel_tree(X, clades, ["same"] * len(X))
    with pytest.raises(TreeprobeError, match="values but"):
        partial_mantel_tree(X, clades, z[:-1])
    with pytest.raises(TreeprobeError, match="perfectly correlated"):  # z = genus: t = 2 + 2·z exactly
        genera = rank_clades(np.array([[0, 0], [0, 1], [1, 2], [1, 3]]), [1.0, 1.0])
        partial_mantel_tree(np.random.default_rng(0).normal(size=(4, 3)), genera, ["a", "a", "b", "b"],
                            permutations=0)
    with pytest.raises(TreeprobeError, match="unknown permutation scheme"):
        partial_mantel_tree(X, clades, z, permutation="rows")


# --- (b) level under a confounded null, (c) power with known truth ----------------------------


def null_world(seed: int, *, follow: float = 0.85, shift: float = 2.0, tree_signal: float = 0.0):
    """40 species of 1-3 images on a random rank tree. z (museum or not) follows the kingdom
    (P = follow in one, 1 − follow in the other); embeddings = species effect (independent of the
    tree) + image noise ± shift on one axis by z, + tree_signal × a Brownian walk down the ranks."""
    rng = np.random.default_rng(seed)
    n_species, dim = 40, 8
    sp_lin = np.column_stack([rng.integers(k, size=n_species) for k in (2, 2, 2, 3, 3, 4)] + [np.arange(n_species)])
    sp = np.repeat(np.arange(n_species), rng.integers(1, 4, n_species))
    lin = sp_lin[sp]
    museum = rng.random(len(sp)) < np.where(lin[:, 0] == 0, follow, 1.0 - follow)
    X = rng.normal(size=(len(sp), dim)) + 0.7 * rng.normal(size=(n_species, dim))[sp]
    X[:, 0] += np.where(museum, shift, -shift)
    if tree_signal:
        for r in range(6):  # one random vector per taxon at each rank above species
            _, inv = np.unique(lin[:, :r + 1], axis=0, return_inverse=True)
            X += tree_signal * rng.normal(size=(inv.max() + 1, dim))[inv.ravel()]
    return X, rank_clades(lin, np.ones(7)), np.where(museum, "museum", "field")


def test_null_level_with_a_covariate_that_follows_the_tree():
    """d follows z only, z follows the tree: the plain Mantel test rejects almost always; the
    partial test with covariate strata (the default) rejects 5 % of the time; the raw species
    scheme (strata of image count only) rejects too often, the known weakness of raw permutation."""
    n_worlds = 400
    hits = {"partial": 0, "raw partial": 0, "plain": 0}
    for s in range(n_worlds):
        X, clades, z = null_world(s)
        exact = partial_mantel_tree(X, clades, z, permutations=19, seed=s)  # 19: P(p <= 0.05) = 1/20 exactly
        raw = partial_mantel_tree(X, clades, z, permutation="species", permutations=19, seed=s)
        hits["partial"] += exact.p_value <= 0.05
        hits["raw partial"] += raw.p_value <= 0.05
        hits["plain"] += raw.mantel_p_value <= 0.05
    lo, hi = scipy.stats.binom.interval(0.95, n_worlds, 0.05)
    rates = {k: v / n_worlds for k, v in hits.items()}
    print(f"\nnull rejection at 0.05 over {n_worlds} worlds (binomial 95 % interval [{lo / n_worlds:.4f}, "
          f"{hi / n_worlds:.4f}]): {rates}; last world r_dt {raw.r_dt:.3f}, r_dz {raw.r_dz:.3f}, r_tz {raw.r_tz:.3f}")
    assert lo <= hits["partial"] <= hi
    assert rates["plain"] > 0.9
    assert hits["raw partial"] > hi


def test_known_truth_tree_signal_survives_the_confound():
    hits = 0
    for s in range(5):
        X, clades, z = null_world(100 + s, tree_signal=0.6)
        res = partial_mantel_tree(X, clades, z, permutations=99, seed=s)
        assert res.r_dz > 0.3 and res.r_tz > 0.15  # the confound is there
        assert 0.1 < res.statistic < res.r_dt  # ...it takes part of r_dt, the tree signal stays
        hits += res.p_value <= 0.01
    assert hits == 5


# --- (d) the real BioCLIP 2 example ------------------------------------------------------------


def test_bioclip2_img_type_confound():
    ds = bioclip2_1k()
    res = partial_mantel_data(ds, "img_type", permutations=199)
    raw = partial_mantel_data(ds, "img_type", permutations=199, permutation="species")
    museum = ds.items["img_type"].str.startswith("Museum").map({True: "museum", False: "other"})
    binary = partial_mantel_tree(ds.X, ds.taxonomy.clade_structure(), museum, permutations=199, name="museum")
    share = ds.items.assign(m=museum == "museum").groupby("kingdom")["m"].mean()
    print(f"\nBioCLIP 2 (909 items, {res.n_species} species, {res.n_pairs} between-species pairs), "
          f"museum share by kingdom {share.round(2).to_dict()}")
    for label, r in (("img_type", res), ("img_type raw", raw), ("museum vs other", binary)):
        print(f"  {label}: {r.permutation}: r_dt {r.r_dt:.4f} (p {r.mantel_p_value:.3f}), r_dz {r.r_dz:.4f}, "
              f"r_tz {r.r_tz:.4f}, r_dt.z {r.statistic:.4f} (p {r.p_value:.3f}, "
              f"{r.details['n_permutable_units']} species can move)")
    assert share["Plantae"] > 3 * share["Animalia"]  # museum specimens are mostly plants
    for r in (res, raw, binary):
        assert r.r_dz > 0.2 and r.r_tz > 0.03  # img_type shapes embeddings and follows the tree
        assert 0.08 < r.statistic < r.r_dt and r.p_value <= 0.01  # the tree signal survives the confound
    assert res.statistic == raw.statistic and res.r_tz == pytest.approx(0.0815, abs=1e-3)


# --- R's vegan::mantel.partial ------------------------------------------------------------------


def _vegan_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    return subprocess.run(["Rscript", "-e", "library(vegan)"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _vegan_available(), reason="Rscript with the vegan package is not installed")
@pytest.mark.parametrize("kind", ["categorical", "numeric"])
def test_matches_vegan_mantel_partial(kind, tmp_path):
    X, clades, T, z, _ = world_a("ete3", kind, seed=11)
    X, z = X[:60], z[:60]
    clades = clades.subset_items(np.arange(60))
    T = T[:60, :60]
    D, Z = matrices(X, z, kind)
    files = []
    for name, M in (("t", T), ("d", D), ("z", Z)):
        files.append(str(tmp_path / f"{name}.txt"))
        np.savetxt(files[-1], M, fmt="%.17g")
    out = subprocess.run(["Rscript", str(VEGAN_SCRIPT), *files, "999"], capture_output=True, text=True, check=True)
    vals = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    res = partial_mantel_tree(X, clades, z, kind=kind, pairs="all", permutation="images", permutations=999)
    print(f"\nvegan {kind}: r {vals['statistic']} p {vals['signif']}; treeprobe r {res.statistic!r} p {res.p_value}")
    assert float(vals["statistic"]) == pytest.approx(res.statistic, abs=1e-9)
    assert abs(float(vals["signif"]) - res.p_value) < 0.1  # same scheme, other random streams
