"""treeprobe.tl: tools on a TreeData store under their stated keys and give the numbers of the pure functions."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import squareform

import treeprobe as tp
from treeprobe.errors import TreeprobeError

FAST = dict(permutations=49, maps=(), cluster_methods=("kmeans",), progress=False)

# Recorded with the code before the TreeData redesign (commit fa863c2):
#   treeprobe intrinsic --embeddings example_1k.parquet --permutations 49 --maps none --cluster-methods kmeans
BEFORE_MANTEL = {("image", "pearson"): 0.13056420944878763, ("image", "spearman"): 0.10722989610565199,
                 ("species-centroid", "pearson"): 0.13093525034456058,
                 ("species-centroid", "spearman"): 0.11491995616990486}
BEFORE_KNN = {"kingdom": 0.7899889988998899, "order": 0.24887573964497042, "species": 0.12338709677419354}
BEFORE_PURITY = {"kingdom": 0.7656765676567657, "family": 0.5577557755775577, "species": 0.9702970297029703}


@pytest.fixture(scope="module")
def bc2():
    return tp.datasets.bioclip2_1k()


#: The missing-rank tokens before the valid-inference change (the literal "incertae sedis" was a taxon).
OLD_MISSING = ("", "nan", "none", "null", "na", "n/a")


@pytest.fixture(scope="module")
def analysed():
    ds = tp.datasets.bioclip2_1k()
    # Ward instead of k-means: 2 s instead of 22 s here; k-means on these items is pinned by the legacy test
    report = tp.tl.intrinsic(ds, **{**FAST, "cluster_methods": ("agglomerative",)})
    return ds, report


def test_legacy_image_permutation_reproduces_the_numbers_before_the_redesign():
    """The item-permutation test under its new name (permute="images"), with the old rules for missing
    ranks (placeholders, old tokens), gives exactly the numbers of commit fa863c2."""
    ds = tp.datasets.bioclip2_1k(missing=OLD_MISSING, unknown="placeholder")
    report = tp.tl.intrinsic(ds, permute=("images",), **FAST)
    got = {(r.level, r.method): r.statistic for r in report.mantel.itertuples()}
    # 1e-13, not 1e-15: the BLAS Gram sums behind the exact Pearson r differ in the last bits between CPUs
    # (1.2e-14 between the Intel host that recorded the numbers and an AMD EPYC one); any real change is >> 1e-13
    assert got == pytest.approx(BEFORE_MANTEL, rel=0, abs=1e-13)
    assert set(report.mantel.p_value) == {0.02}  # 1 / (49 + 1): no permutation reaches the observed r
    assert set(report.mantel.scheme) == {"images"}
    knn = report.knn.set_index("rank")["agreement"]
    assert {r: knn[r] for r in BEFORE_KNN} == pytest.approx(BEFORE_KNN, abs=1e-15)
    pur = report.clustering.set_index("rank")["purity"]
    assert {r: pur[r] for r in BEFORE_PURITY} == pytest.approx(BEFORE_PURITY, abs=1e-15)
    assert report.n_items == 909 and len(report.skipped) == 121


def test_default_tests_are_species_level_and_say_what_they_permuted(analysed):
    ds, report = analysed
    m = report.mantel
    assert set(m.scheme) == {"species"} and len(m) == 4
    assert (m.permuted.str.contains("within strata of equal image count")).all()
    img = m[m.level == "image"].iloc[0]
    # between-species pairs only: all pairs minus those within a tree leaf (species, or an item's own leaf)
    leaves = np.unique(ds.taxonomy.clade_structure().item_node, return_counts=True)[1]
    n = len(ds)
    assert img.n_pairs == n * (n - 1) // 2 - int((leaves * (leaves - 1) // 2).sum())
    assert report.n_items == 902 and len(report.skipped) == 128


def test_tools_store_under_their_keys(analysed):
    ds, report = analysed
    for key in ("mantel", "mantel_tree", "mantel_pairs", "clustering", "knn", "knn_params", "timings", "provenance"):
        assert key in ds.uns, key
    assert ds.uns["mantel"] is report.mantel and ds.uns["knn_params"] == {"k": 10, "max_queries": 100_000}
    assert report.provenance["n_taxa"]["kingdom"] == 4 and report.provenance["embedding_dim"] == 768


def test_clade_mantel_equals_explicit_matrices(bc2):
    """tl.mantel on ds['Insecta'] against an independent computation: numpy on the explicit N x N
    cosine and tree distance matrices of exactly those items, over pairs from different tree leaves
    (default, species permuted) and over all pairs (images permuted)."""
    ins = bc2["Insecta"]
    table = tp.tl.mantel(ins, methods=("pearson",), levels=("image",), permute=("species", "images"),
                         permutations=0)
    X = ins.unit.astype(np.float64)  # the tools' float32 unit vectors, in float64 from here
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    D = 1.0 - X @ X.T
    np.fill_diagonal(D, 0.0)
    cs = ins.taxonomy.clade_structure()
    T = cs.item_distances()
    iu = np.triu_indices(len(ins), 1)
    between = cs.item_node[iu[0]] != cs.item_node[iu[1]]
    r_between = np.corrcoef(D[iu][between], T[iu][between])[0, 1]
    r_all = np.corrcoef(squareform(D, checks=False), squareform(T, checks=False))[0, 1]
    assert len(ins) == 190 and (ins.items["class"] == "Insecta").all()
    got = table.set_index("scheme").statistic
    assert got["species"] == pytest.approx(r_between, abs=1e-10)
    assert got["images"] == pytest.approx(r_all, abs=1e-10)
    assert table.set_index("scheme").n_pairs["species"] == int(between.sum())
    assert "mantel" in ins.uns and "mantel" not in bc2.uns  # stored on the slice only


def test_mantel_seed_stream_and_levels(bc2):
    """Each test's permutation seed is the next draw of default_rng(seed): order scheme x level x method."""
    from treeprobe.mantel import mantel_centroids, mantel_species

    ins = bc2["Insecta"]
    table = tp.tl.mantel(ins, methods=("pearson",), permutations=19, seed=3)
    assert table.level.tolist() == ["image", "species-centroid"]
    s_img, s_cent = np.random.default_rng(3).integers(2**31, size=2)
    cs = ins.taxonomy.clade_structure()
    units = np.unique(cs.item_node, return_inverse=True)[1]
    direct = mantel_species(ins.unit, cs, units, method="pearson", permutations=19, seed=int(s_img))
    cent = mantel_centroids(ins.unit, cs, units, method="pearson", permutations=19, seed=int(s_cent))
    assert (table.statistic.iloc[0], table.p_value.iloc[0]) == (direct.statistic, direct.p_value)
    assert (table.statistic.iloc[1], table.p_value.iloc[1]) == (cent.statistic, cent.p_value)
    with pytest.raises(TreeprobeError, match="unknown Mantel level 'genus'"):
        tp.tl.mantel(ins, levels=("genus",))
    with pytest.raises(TreeprobeError, match="unknown permutation scheme 'rows'"):
        tp.tl.mantel(ins, permute=("rows",))
    with pytest.raises(TreeprobeError, match="'colour' is not a column"):
        tp.tl.mantel(ins, control="colour")


def test_partial_mantel_row_controls_for_a_covariate(bc2):
    from treeprobe.partial_mantel import partial_mantel_tree

    table = tp.tl.mantel(bc2, methods=("pearson",), levels=("image",), control="img_type", permutations=19, seed=5)
    row = table[table.level == "image | img_type"].iloc[0]
    seeds = np.random.default_rng(5).integers(2**31, size=2)
    direct = partial_mantel_tree(bc2.unit, bc2.taxonomy.clade_structure(), bc2.items.img_type.to_numpy(),
                                 name="img_type", permutations=19, seed=int(seeds[1]))
    assert row.statistic == pytest.approx(direct.statistic, abs=1e-12) and row.p_value == direct.p_value
    assert row.r_dz > 0.1 and row.statistic < table.statistic.iloc[0]  # img_type explains part of r
    assert "img_type" in row.permuted


def test_user_tree_lists_items_not_on_it(bc2, tmp_path):
    from ete3 import Tree

    sub = bc2["Lepidoptera"]
    species = sorted(set(sub.items.species) - {""})
    keep = species[: len(species) // 2]
    half = len(keep) // 2
    clade = lambda names: "(" + ",".join(n.replace(" ", "_") + ":1" for n in names) + "):1"  # noqa: E731
    tree = Tree("(" + clade(keep[:half]) + "," + clade(keep[half:]) + ");")
    tp.tl.mantel(sub, methods=("pearson",), levels=("image",), tree=tree, permutations=0)
    on_tree = sub.items.species.isin(keep)
    assert sub.uns["mantel_tree"]["n_items_in_tree"] == int(on_tree.sum())
    assert len(sub.uns["mantel_not_in_tree"]) == int((~on_tree).sum())
    report = tp.report.Report.from_data(sub)
    assert (report.skipped.reason == "species not in --tree (Mantel only)").sum() == int((~on_tree).sum())


def test_knn_on_a_slice_equals_the_pure_function(bc2):
    from treeprobe.neighbors import knn_rank_agreement

    plants = bc2[bc2.items.kingdom == "Plantae"]
    table = tp.tl.knn(plants, k=5)
    X = plants.X / np.linalg.norm(plants.X, axis=1, keepdims=True)
    codes = {}
    for r in tp.RANKS:  # '' = unknown at that rank: code -1, never a taxon
        labels = plants.labels(r)
        codes[r] = np.where(labels == "", -1, pd.factorize(labels)[0])
    direct = knn_rank_agreement(X, codes, k=5)
    np.testing.assert_allclose(table.agreement, direct.agreement, rtol=0, atol=1e-12)
    assert plants.uns["knn_params"]["k"] == 5


def test_tsne_stores_full_rows_with_nan_outside_the_subsample(bc2):
    from treeprobe.embedding_maps import tsne_2d

    ds = bc2["Plantae"]
    full = tp.tl.tsne(ds, max_points=150, seed=1)
    drawn = np.isfinite(full).all(axis=1)
    assert full.shape == (len(ds), 2) and drawn.sum() == 150
    coords, index = tsne_2d(ds.unit, seed=1, max_points=150)
    np.testing.assert_array_equal(np.flatnonzero(drawn), index)
    np.testing.assert_array_equal(full[index], coords)
    assert ds.uns["tsne"]["subsampled"] and "150 of" in ds.uns["tsne"]["title"]
    sub = ds[drawn]  # slicing keeps the map aligned
    np.testing.assert_array_equal(sub.obsm["X_tsne"], coords)


def test_tools_refuse_what_cannot_be_analysed(bc2):
    with pytest.raises(TreeprobeError, match="single taxon"):
        tp.tl.intrinsic(bc2[np.array([0, 0, 0])], **FAST)  # three copies of one image: one species
    with pytest.raises(TreeprobeError, match="only 2 usable item"):
        tp.tl.intrinsic(bc2[:2], **FAST)
    with pytest.raises(TreeprobeError, match="expected a treeprobe.TreeData"):
        tp.tl.knn(bc2.X)
    with pytest.raises(TreeprobeError, match="unknown map 'pca'"):
        tp.tl.intrinsic(bc2, maps=("pca",))
    images = tp.TreeData(None, bc2.items.head(5))
    with pytest.raises(TreeprobeError, match="no embeddings yet"):
        tp.tl.knn(images)
    with pytest.raises(TreeprobeError, match="images need a model"):
        tp.tl.embed(images)


@pytest.mark.parametrize("option, words", [
    (dict(cluster_methods=("kmeans", "spectral")), "unknown clustering method 'spectral'"),
    (dict(mantel_methods=("kendall",)), "unknown Mantel method 'kendall'"),
    (dict(permute=("genus",)), "unknown permutation scheme 'genus'"),
    (dict(permutations=-1), "permutations must be >= 0; got -1"),
    (dict(chance_permutations=-3), "chance_permutations must be >= 0; got -3"),
    (dict(knn_k=0), "knn_k must be >= 1; got 0"),
    (dict(control="no_such_column"), "'no_such_column' is not a column"),
    (dict(phylo=True, tree_method="ward"), "unknown tree method 'ward'"),
    (dict(phylo=True, tree_levels=("species", "subspecies")), "unknown tree-recovery level 'subspecies'"),
    (dict(phylo=True, tree_levels=()), "tree_levels is empty"),
    (dict(covariate="no_such_column"), "covariate 'no_such_column' is not a column"),
    (dict(covariate="img_type"), "has 8 levels"),  # a covariate alone turns the tree-level analyses on
    (dict(covariate="img_type", covariate_levels=("Citizen Science", "Herbarium*")), "not found in covariate 'img_type'"),
    (dict(species_covariates=["img_type", "habitat"]), "species covariate 'habitat' is not a column"),
    (dict(covariate="img_type", covariate_levels=("Camera-trap", "Museum Specimen: Plant")),
     "no species is observed under both levels"),
])
def test_intrinsic_checks_every_option_before_the_first_test(option, words, bc2, monkeypatch):
    """A misspelt option of the last stage (clustering, kNN) is refused before the Mantel tests run."""
    def boom(*a, **k):
        raise AssertionError("the analysis started before the bad option was refused")

    monkeypatch.setattr(tp.tl, "mantel", boom)
    with pytest.raises(TreeprobeError, match=words.replace("(", r"\(")):
        tp.tl.intrinsic(bc2, **{**FAST, **option})
