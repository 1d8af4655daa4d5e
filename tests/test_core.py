"""TreeData: rows set aside at construction, slicing that keeps everything aligned, lazy caches, AnnData."""

import numpy as np
import pandas as pd
import pytest

from treeprobe import datasets
from treeprobe._utils import RANKS
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError, TreeprobeWarning


def _items(lineages):
    return pd.DataFrame([dict(zip(RANKS, lin)) for lin in lineages])


# two genera called Morus: a plant (mulberry) and a bird (gannet); one item without kingdom
LINEAGES = [
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus nigra"),
    ("Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Morus", "Morus bassanus"),
    ("Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Sula", "Sula sula"),
    ("", "", "", "", "", "", ""),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "", ""),
]


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(LINEAGES), 5)).astype(np.float32)
    items = _items(LINEAGES)
    items["uid"] = [f"u{i}" for i in range(len(items))]
    return X, items


def test_construction_sets_rows_aside_with_reasons(small):
    X, items = small
    X = X.copy()
    X[1] = np.nan
    X[3] = 0.0
    ds = TreeData(X, items)
    assert ds.items["uid"].tolist() == ["u0", "u2", "u5"]
    np.testing.assert_array_equal(ds.X, X[[0, 2, 5]])
    assert ds.skipped.values.tolist() == [["row 1", "non-finite embedding"], ["row 3", "zero-norm embedding"],
                                          ["row 4", "no taxonomy (missing kingdom)"]]
    assert list(ds.items.index) == [0, 1, 2]


def test_whole_float32_input_is_not_copied(small):
    X, items = small
    items = items[items.kingdom != ""]
    Xk = np.ascontiguousarray(X[items.index])
    ds = TreeData(Xk, items)
    assert np.shares_memory(ds.X, Xk)
    assert TreeData(Xk.astype(np.float64), items).X.dtype == np.float32


def test_bad_shapes_are_clear_errors(small):
    X, items = small
    with pytest.raises(TreeprobeError, match="have 5 rows but 6 were expected"):
        TreeData(X[:5], items)
    with pytest.raises(TreeprobeError, match="2-D"):
        TreeData(X[:, 0], items)
    with pytest.raises(TreeprobeError, match="no usable items"):
        TreeData(X[[4]], items.iloc[[4]])


def test_clade_slicing_by_short_name_and_label(small):
    ds = TreeData(*small)
    aves = ds["Aves"]
    assert aves.items["uid"].tolist() == ["u2", "u3", "u5"]
    np.testing.assert_array_equal(aves.X, small[0][[2, 3, 5]])
    assert ds["Animalia|Chordata|Aves|Suliformes|Sulidae|Morus"].items["uid"].tolist() == ["u2"]
    with pytest.raises(TreeprobeError, match="'Morus' names 2 taxa: Animalia\\|.*\\|Morus \\(genus\\), Plantae"):
        ds["Morus"]
    with pytest.raises(TreeprobeError, match="no taxon named 'Mammalia'"):
        ds["Mammalia"]


def test_unknown_is_not_a_named_taxon(small):
    """An unknown genus is no taxon (default), and with the old placeholder rule the placeholder
    'incertae_sedis_genus' is not reachable by its short name (it would pool unknowns)."""
    ds = TreeData(*small)
    assert ds.taxonomy.labels("genus")[-1] == "" and not ds.taxonomy.known("genus")[-1]
    assert ds.taxonomy.codes("genus")[-1] == -1
    old = TreeData(*small, unknown="placeholder")
    assert old.taxonomy.labels("genus")[-1].endswith("Corvidae|incertae_sedis_genus")
    with pytest.raises(TreeprobeError, match="no taxon named 'incertae_sedis_genus'"):
        old["incertae_sedis_genus"]
    assert old.subset([0, 1]).unknown == "placeholder"  # the rule travels with slices


def test_mask_slicing_keeps_obsm_drops_uns_and_rebuilds_taxonomy(small):
    ds = TreeData(*small)
    ds.obsm["X_tsne"] = np.arange(10, dtype=np.float32).reshape(5, 2)
    ds.uns["mantel"] = pd.DataFrame({"statistic": [0.5]})
    assert ds.taxonomy is ds.taxonomy  # cached
    assert ds.taxonomy.n_taxa("kingdom") == 2
    sub = ds[ds.items.kingdom == "Plantae"]  # a boolean Series, as users write it
    np.testing.assert_array_equal(sub.obsm["X_tsne"], [[0, 1], [2, 3]])
    assert sub.uns == {} and "mantel" in ds.uns
    assert sub.taxonomy.n_taxa("kingdom") == 1 and sub.taxonomy.n_taxa("species") == 2
    assert len(sub.skipped) == len(ds.skipped) == 1
    assert ds[1:3].items["uid"].tolist() == ["u1", "u2"]
    assert ds[np.array([4, 0])].items["uid"].tolist() == ["u5", "u0"]
    with pytest.raises(TreeprobeError, match="boolean mask has shape"):
        ds[np.array([True, False])]
    with pytest.raises(TreeprobeError, match="selection is empty"):
        ds[ds.items.kingdom == "Fungi"]


def test_unit_embeddings_cached_and_sliced(small):
    ds = TreeData(*small)
    U = ds.unit
    assert U.dtype == np.float32 and ds.unit is U
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(U, ds.X / np.linalg.norm(ds.X, axis=1, keepdims=True), rtol=1e-6)
    sub = ds["Aves"]
    np.testing.assert_array_equal(sub.unit, TreeData(sub.X, sub.items).unit)


def test_images_without_embeddings(small):
    ds = TreeData(None, small[1])
    assert ds.X is None and len(ds) == 5 and ds.n_dims is None
    with pytest.raises(TreeprobeError, match="no embeddings yet"):
        ds.unit
    assert "images (no embeddings yet)" in repr(ds)


def test_copy_is_independent(small):
    ds = TreeData(*small)
    ds.uns["x"] = pd.DataFrame({"a": [1]})
    c = ds.copy()
    c.X[0] = 99
    c.uns["x"].loc[0, "a"] = 2
    assert ds.X[0, 0] != 99 and ds.uns["x"].loc[0, "a"] == 1


def test_repr_lists_what_is_inside():
    ds = datasets.bioclip2_1k()
    ds.obsm["X_tsne"] = np.zeros((len(ds), 2))
    text = repr(ds)
    assert "902 items, 768-d embeddings" in text and "obsm: X_tsne" in text
    assert "skipped: 128 (no taxonomy (missing kingdom): 128)" in text


def test_anndata_round_trip(small):
    anndata = pytest.importorskip("anndata")
    ds = TreeData(*small)
    ds.obsm["X_umap"] = np.ones((len(ds), 2), dtype=np.float32)
    ad = ds.to_anndata()
    assert isinstance(ad, anndata.AnnData) and ad.shape == (5, 5)
    back = TreeData.from_anndata(ad)
    np.testing.assert_array_equal(back.X, ds.X)
    pd.testing.assert_frame_equal(back.items, ds.items)
    np.testing.assert_array_equal(back.obsm["X_umap"], ds.obsm["X_umap"])
    assert back.skipped.values.tolist() == ds.skipped.values.tolist()
    assert back.taxonomy.n_taxa("genus") == ds.taxonomy.n_taxa("genus")


# --- input rules: names, duplicates, lineage conflicts -------------------------------------------


def test_duplicates_dropped_with_obsm_aligned_and_first_copy_kept(small):
    X, items = small
    items = items.assign(path=[f"/img/{i}.jpg" for i in range(len(items))])
    X2 = np.vstack([X, X[[0, 2]]])
    items2 = pd.concat([items, items.iloc[[0, 2]].assign(uid=["c0", "c2"])], ignore_index=True)
    obsm = {"X_tsne": np.arange(2 * len(items2)).reshape(-1, 2)}
    with pytest.warns(TreeprobeWarning, match=r"dropped 2 duplicated item\(s\) \(2 with the same path as an earlier "
                                              r"row, same lineage and embedding\).*differ in column\(s\) uid"):
        ds = TreeData(X2, items2, obsm=obsm)
    assert ds.items["uid"].tolist() == ["u0", "u1", "u2", "u3", "u5"]
    np.testing.assert_array_equal(ds.obsm["X_tsne"], obsm["X_tsne"][[0, 1, 2, 3, 5]])
    assert ds.skipped.values.tolist()[-2:] == [["/img/0.jpg", "duplicate of row 0 (same path)"],
                                               ["/img/2.jpg", "duplicate of row 2 (same path)"]]


def test_a_copy_whose_first_copy_was_set_aside_is_kept(small):
    """Duplicates are looked for among usable rows: a NaN first copy leaves the good second one."""
    X, items = small
    items = items.assign(uuid=[f"id{i}" for i in range(len(items))])
    X2 = np.vstack([X, X[[1]]])
    X2[1] = np.nan
    items2 = pd.concat([items, items.iloc[[1]]], ignore_index=True)
    ds = TreeData(X2, items2)
    assert ds.items["uuid"].tolist() == ["id0", "id2", "id3", "id5", "id1"]  # row 6 kept, in its place
    np.testing.assert_array_equal(ds.X[-1], X[1])
    assert not ds.skipped["reason"].str.startswith("duplicate").any()


def test_same_key_other_embedding_is_refused_empty_keys_are_not_keys(small):
    X, items = small
    items = items.assign(uuid=["a", "", "c", "d", "e", "a"], path="")
    X = X.copy()
    X[5] = X[0] * 2  # not the same embedding
    items.loc[5, list(RANKS)] = items.loc[0, list(RANKS)]
    with pytest.raises(TreeprobeError, match=r"^rows 0 and 5 have the same uuid 'a' but a different embedding"):
        TreeData(X, items)
    items.loc[5, "uuid"] = ""  # '' is no id: rows 1 and 5 are different items
    assert len(TreeData(X, items)) == 5


def test_lineage_conflicts_in_uns_and_warnings_can_be_fatal(small):
    X, items = small
    items = items.copy()
    items.loc[5, "family"] = "Sulidae"  # a family under two orders: Suliformes (rows 2, 3), Passeriformes (row 5)
    with pytest.warns(TreeprobeWarning, match=r"^1 taxon has more than one parent: 'Sulidae' \(family, Animalia\) "
                                              r"under order Suliformes \(2 items\) and order Passeriformes \(1 item\)"):
        ds = TreeData(X, items)
    assert ds.uns["lineage_conflicts"].values.tolist() == [
        ["Animalia", "family", "Sulidae", "order", "Suliformes", 2],
        ["Animalia", "family", "Sulidae", "order", "Passeriformes", 1]]
    assert ds.taxonomy.n_taxa("family") == 3  # kept apart: Moraceae, Suliformes|Sulidae, Passeriformes|Sulidae
    assert "lineage_conflicts" not in TreeData(*small).uns  # the two Morus genera are no conflict
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TreeprobeWarning)
        with pytest.raises(TreeprobeWarning, match="normalised 1 rank value"):
            TreeData(X, small[1].assign(species=small[1]["species"].str.replace("Sula sula", "Sula  sula")))


def test_conflicts_carried_in_uns_are_not_warned_again(small):
    """A tool re-making a TreeData of the same items (tl.embed) passes the table on: no second warning."""
    import warnings

    X, items = small
    items = items.copy()
    items.loc[5, "family"] = "Sulidae"
    with pytest.warns(TreeprobeWarning, match="more than one parent"):
        ds = TreeData(X, items)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TreeprobeWarning)
        again = TreeData(ds.X, ds.items, uns={"lineage_conflicts": ds.uns["lineage_conflicts"]})
    pd.testing.assert_frame_equal(again.uns["lineage_conflicts"], ds.uns["lineage_conflicts"])
    with pytest.warns(TreeprobeWarning, match="more than one parent"):  # another table: warned
        TreeData(ds.X, ds.items, uns={"lineage_conflicts": ds.uns["lineage_conflicts"].iloc[:1]})
    stale = TreeData(*small, uns={"lineage_conflicts": ds.uns["lineage_conflicts"]})
    assert "lineage_conflicts" not in stale.uns  # a table that no longer holds is dropped


def test_missing_tokens_in_a_fixed_order_whatever_the_hash_seed():
    """The report's provenance lists the missing-rank tokens; from a frozenset their order changed from
    one process to the next (string hashing is salted), so two runs of one command differed."""
    import subprocess
    import sys

    code = ("import treeprobe as tp, json; ds = tp.datasets.bioclip2_1k(); "
            "r = tp.tl.intrinsic(ds[:60], permutations=0, maps=(), cluster_methods=(), progress=False); "
            "print(json.dumps(r.provenance['taxonomy']['missing']))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in (1, 2)}
    assert len(outs) == 1
    import json

    from treeprobe.taxonomy import MISSING_TOKENS

    assert json.loads(outs.pop()) == sorted(MISSING_TOKENS)
