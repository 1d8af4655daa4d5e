"""Loaders in treeprobe.data: real shared data plus small fixtures built in tmp_path."""

from tests._paths import SHARED_DATA
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from treeprobe.data import (
    load_data,
    load_embeddings,
    load_inat_folder,
    load_metadata_csv,
)
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import RANKS

SHARED = str(SHARED_DATA)
MULTIKINGDOM_CSV = os.path.join(SHARED, "multikingdom_photos_index", "metadata.csv")
TOL = os.path.join(SHARED, "tol200m_bioclip2_embeddings_1k")
TOL_PARQUET = os.path.join(TOL, "example_1k.parquet")
TOL_NPY = os.path.join(TOL, "embeddings.npy")

needs_multikingdom = pytest.mark.skipif(not os.path.exists(MULTIKINGDOM_CSV), reason="shared data missing")
needs_tol = pytest.mark.skipif(not os.path.exists(TOL_PARQUET), reason="shared data missing")


# ----------------------------------------------------------------------------- real data


@needs_multikingdom
def test_multikingdom_csv_real():
    # rows 825 and 828 list the same photo (life_stage egg, then adult): one item, the copy recorded
    with pytest.warns(TreeprobeWarning, match=r"dropped 1 duplicated item\(s\) \(1 with the same path.*life_stage"):
        ds = load_data(MULTIKINGDOM_CSV)
    assert len(ds) == 1071
    assert ds.X is None
    assert ds.skipped.values.tolist() == [[os.path.join(SHARED, "uk_butterflies_moths_app", "images",
                                                        "LulworthSkipper_LulworthSkipper_immature_3.jpg"),
                                           "duplicate of row 825 (same path)"]]
    assert ds.items["life_stage"].iloc[825] == "egg"  # the first copy's covariates are kept
    assert list(ds.items.columns[:8]) == ["path", *RANKS]
    assert {"common_name", "source_dataset", "lineage_source", "life_stage"} <= set(ds.items.columns)
    # paths are absolute and resolved against the CSV's folder; all exist per SOURCE.md
    assert all(os.path.isabs(p) for p in ds.items["path"])
    assert all(os.path.exists(p) for p in ds.items["path"].iloc[::50])
    assert ds.items["path"].iloc[0].endswith("humboldt_native_plants/images/abies_grandis_icon.jpg")
    counts = ds.items["kingdom"].value_counts().to_dict()
    assert counts == {"Animalia": 711, "Plantae": 272, "Fungi": 88}
    assert ds.items["species"].nunique() == 465
    # ranks are plain strings, never NaN
    for r in RANKS:
        assert ds.items[r].map(type).eq(str).all()


@needs_tol
def test_tol_parquet_real():
    ds = load_embeddings(TOL_PARQUET)
    assert ds.X.shape == (902, 768) and ds.X.dtype == np.float32
    # the 121 rows without taxonomy and 7 of kingdom "incertae sedis" are set aside at construction, each with its reason
    assert len(ds) == 902 and len(ds.skipped) == 128
    assert set(ds.skipped["reason"]) == {"no taxonomy (missing kingdom)"}
    assert (ds.items["kingdom"] != "").all()
    assert (ds.items[list(RANKS)] != "").all(axis=1).sum() == 829
    assert (ds.items["path"] == "").all()
    assert {"uuid", "img_type", "publisher", "scientific_name"} <= set(ds.items.columns)
    norms = np.linalg.norm(ds.X, axis=1)
    assert 30 < norms.min() and 45 < np.median(norms) < 57  # stored un-normalised (SOURCE.md: ≈45–57)


@needs_tol
def test_tol_npy_matches_parquet():
    a = load_data(TOL_PARQUET)
    b = load_data(TOL_NPY)  # metadata.csv beside it, mapped by emb_row
    assert b.X.shape == (902, 768)
    pd.testing.assert_frame_equal(a.skipped, b.skipped)
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.items[list(RANKS)], b.items[list(RANKS)])
    assert (b.items["uuid"] == a.items["uuid"]).all()


@needs_tol
def test_npy_emb_row_reorders(tmp_path):
    meta = pd.read_csv(os.path.join(TOL, "metadata.csv")).iloc[[5, 2, 900]]
    meta.to_csv(tmp_path / "meta.csv", index=False)
    ds = load_embeddings(TOL_NPY, metadata=tmp_path / "meta.csv")
    full = np.load(TOL_NPY)
    np.testing.assert_array_equal(ds.X, full[[5, 2, 900]])
    assert list(ds.items["emb_row"]) == [5, 2, 900]


# ----------------------------------------------------------------------------- CSV details


def _write_csv(path, rows, columns=("path", *RANKS)):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)


def test_csv_relative_paths_missing_ranks_and_covariates(tmp_path):
    sub = tmp_path / "meta"
    sub.mkdir()
    rows = [
        ["../img/a.jpg", "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", " Corvus corax ", 3],
        ["img/b.jpg", "Plantae", None, "", "", "", "", "", 4],
        ["", "Fungi", "Basidiomycota", "", "", "", "", "", 5],
    ]
    _write_csv(sub / "m.csv", rows, columns=("path", *RANKS, "n_legs"))
    ds = load_metadata_csv(sub / "m.csv")
    assert ds.items["path"].tolist() == [
        str(tmp_path / "img" / "a.jpg"), str(sub / "img" / "b.jpg"), "",
    ]
    assert ds.items["species"].tolist() == ["Corvus corax", "", ""]
    assert ds.items["phylum"].tolist() == ["Chordata", "", "Basidiomycota"]
    assert ds.items["n_legs"].tolist() == [3, 4, 5]  # covariates keep their type
    assert ds.source == str(sub / "m.csv")


def test_csv_missing_columns_named(tmp_path):
    pd.DataFrame({"path": ["a.jpg"], "kingdom": ["Plantae"], "genus": ["Abies"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    with pytest.raises(TreeprobeError, match=r"lacks column\(s\) phylum, class, order, family, species"):
        load_metadata_csv(tmp_path / "m.csv")


def test_csv_rank_columns_case_insensitive(tmp_path):
    cols = ("Path", "Kingdom", "Phylum", "Class", "Order", "Family", "Genus", "Species")
    _write_csv(tmp_path / "m.csv", [["x.jpg", "A", "B", "C", "D", "E", "F", "F g"]], columns=cols)
    ds = load_metadata_csv(tmp_path / "m.csv")
    assert ds.items.loc[0, "class"] == "C" and ds.items.loc[0, "path"] == str(tmp_path / "x.jpg")


def test_csv_empty_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TreeprobeError, match="is empty"):
        load_metadata_csv(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(",".join(("path", *RANKS)) + "\n")
    with pytest.raises(TreeprobeError, match="no rows"):
        load_metadata_csv(tmp_path / "header.csv")


# ----------------------------------------------------------------------------- iNat folder


def _img(path, color=(200, 30, 30), size=(12, 10), fmt=None):
    Image.new("RGB", size, color).save(path, format=fmt)


def _make_inat(root):
    a = root / "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax"
    p = root / "00042_Plantae_Tracheophyta_Pinopsida_Pinales_Pinaceae_Abies_grandis"
    bad = root / "Corvus_corax"
    empty = root / "00043_Fungi_Basidiomycota_Agaricomycetes_Agaricales_Amanitaceae_Amanita_muscaria"
    for d in (a, p, bad, empty):
        d.mkdir()
    _img(a / "1.jpg")
    _img(a / "2.PNG", fmt="PNG")
    (a / "3.jpeg").write_bytes(b"not really a jpeg")  # corrupt: listed here, skipped by extraction
    (a / "notes.txt").write_text("ignored")
    _img(p / "x.webp", fmt="WEBP")
    _img(bad / "1.jpg")
    (empty / "readme.md").write_text("no images")
    (root / "stray.jpg").write_bytes(b"")
    return a, p, bad, empty


def test_inat_folder(tmp_path):
    a, p, bad, empty = _make_inat(tmp_path)
    ds = load_data(tmp_path)
    assert isinstance(ds, TreeData) and ds.X is None
    assert len(ds) == 4
    assert ds.items["path"].tolist() == [
        str(a / "1.jpg"), str(a / "2.PNG"), str(a / "3.jpeg"), str(p / "x.webp")
    ]
    row = ds.items.iloc[0]
    assert tuple(row[list(RANKS)]) == (
        "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"
    )
    assert ds.items["category_id"].tolist() == [1, 1, 1, 42]
    assert ds.items.loc[3, "species"] == "Abies grandis"
    skipped = dict(zip(ds.skipped["item"], ds.skipped["reason"]))
    assert set(skipped) == {str(bad), str(empty)}
    assert "does not parse" in skipped[str(bad)] and skipped[str(empty)] == "no images in folder"


INAT21_CATEGORIES = os.path.join(SHARED, "inat2021_taxonomy", "source", "inat2021-categories.csv")


@pytest.mark.skipif(not os.path.exists(INAT21_CATEGORIES), reason="shared data missing")
def test_inat21_folder_names_all_parse_to_their_lineage():
    """The 10,000 real iNat21 folder names: every rank and the binomial as the category list says
    (hyphenated epithets such as x-notata kept whole); none is read as a trinomial."""
    from treeprobe.data import _parse_inat_folder_name

    cats = pd.read_csv(INAT21_CATEGORIES, dtype=str, keep_default_na=False)
    parsed = pd.DataFrame([_parse_inat_folder_name(n) for n in cats["image_dir_name"]])
    for r in RANKS[:-1]:
        assert (parsed[r] == cats[r]).all(), r
    assert (parsed["species"] == cats["genus"] + " " + cats["specific_epithet"]).all()
    assert (parsed["category_id"] == cats["id"].astype(int)).all()
    assert (parsed["infraspecific"] == "").all()
    assert parsed.loc[cats["specific_epithet"] == "x-notata", "species"].tolist() == ["Zygiella x-notata"]


def test_inat_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(TreeprobeError, match=r"no iNat-style class folders.*pass one of them"):
        load_inat_folder(tmp_path)


# ----------------------------------------------------------------------------- embeddings


def _meta_rows(n):
    return [[""] + ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", f"Corvus sp{i}"]
            for i in range(n)]


def test_npy_row_mismatch_errors(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((5, 4), np.float32))
    _write_csv(tmp_path / "metadata.csv", _meta_rows(4))
    with pytest.raises(TreeprobeError, match=r"have 5 rows but metadata .* has 4 rows"):
        load_data(tmp_path / "e.npy")


def test_npy_without_metadata_errors(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((5, 4), np.float32))
    with pytest.raises(TreeprobeError, match="no metadata for"):
        load_embeddings(tmp_path / "e.npy")


def test_npy_bad_emb_row(tmp_path):
    np.save(tmp_path / "e.npy", np.ones((3, 4), np.float32))
    rows = [r + [i] for r, i in zip(_meta_rows(2), [0, 7])]
    _write_csv(tmp_path / "metadata.csv", rows, columns=("path", *RANKS, "emb_row"))
    with pytest.raises(TreeprobeError, match=r"row 1: emb_row 7 is not a row"):
        load_embeddings(tmp_path / "e.npy")


def test_nonfinite_and_zero_rows_dropped(tmp_path):
    e = np.arange(24, dtype=np.float64).reshape(6, 4) + 1
    e[1, 2] = np.nan
    e[3] = 0.0
    e[4, 0] = np.inf
    np.save(tmp_path / "e.npy", e)
    _write_csv(tmp_path / "metadata.csv", _meta_rows(6))
    ds = load_embeddings(tmp_path / "e.npy")
    assert len(ds) == 3 and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.X, e[[0, 2, 5]].astype(np.float32))
    assert ds.items["species"].tolist() == ["Corvus sp0", "Corvus sp2", "Corvus sp5"]
    assert ds.skipped.values.tolist() == [
        ["row 1", "non-finite embedding"], ["row 3", "zero-norm embedding"], ["row 4", "non-finite embedding"],
    ]


def _parquet(path, embs):
    n = len(embs)
    df = pd.DataFrame({"uuid": [f"u{i}" for i in range(n)], "emb": embs})
    for r in RANKS:
        df[r] = ["Plantae" if r == "kingdom" else f"{r}{i}" for i in range(n)]
    df.loc[0, list(RANKS)] = None  # a row without taxonomy: set aside, with its reason
    df.to_parquet(path)


def test_parquet_ragged_errors(tmp_path):
    _parquet(tmp_path / "e.parquet", [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0]])
    with pytest.raises(TreeprobeError, match="ragged embeddings.*2 rows of length 3"):
        load_data(tmp_path / "e.parquet")


def test_parquet_rejects_separate_metadata(tmp_path):
    _parquet(tmp_path / "e.parquet", [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TreeprobeError, match="only used with .npy"):
        load_embeddings(tmp_path / "e.parquet", metadata=tmp_path / "m.csv")


def test_parquet_small(tmp_path):
    _parquet(tmp_path / "e.parquet", [[1.0, 2.0], [0.0, 0.0], [3.0, float("nan")], [5.0, 6.0]])
    ds = load_data(tmp_path / "e.parquet", embeddings=True)
    np.testing.assert_array_equal(ds.X, np.array([[5, 6]], np.float32))
    assert ds.items["uuid"].tolist() == ["u3"] and ds.items.loc[0, "kingdom"] == "Plantae"
    # the loader's skips (source row ids), then TreeData's (position among the loaded rows: u0 is row 0)
    assert ds.skipped.values.tolist() == [["row 1", "zero-norm embedding"], ["row 2", "non-finite embedding"],
                                          ["row 0", "no taxonomy (missing kingdom)"]]


def test_subset_slices_embeddings(tmp_path):
    _parquet(tmp_path / "e.parquet", [[float(i), 1.0] for i in range(5)])
    ds = load_data(tmp_path / "e.parquet")
    assert len(ds) == 4  # u0 has no taxonomy
    sub = ds.subset(np.array([True, False, True, False]))
    assert len(sub) == 2 and sub.items["uuid"].tolist() == ["u1", "u3"]
    np.testing.assert_array_equal(sub.X[:, 0], [1, 3])
    assert list(sub.items.index) == [0, 1]
    assert len(ds) == 4  # original untouched
    with pytest.raises(TreeprobeError, match="boolean mask has shape"):
        ds.subset(np.array([True, False]))


def test_load_data_dispatch_errors(tmp_path):
    with pytest.raises(TreeprobeError, match="no such file or folder: .*nope.csv"):
        load_data(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TreeprobeError, match="don't know how to read"):
        load_data(tmp_path / "x.txt")
    _write_csv(tmp_path / "m.csv", [["a.jpg", "A", "B", "C", "D", "E", "F", "F g"]])
    with pytest.raises(TreeprobeError, match="lists images, not embeddings"):
        load_data(tmp_path / "m.csv", embeddings=True)
