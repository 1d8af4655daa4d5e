"""Bad-input catalogue of the loaders and TreeData (treeprobe.data, core, taxonomy, tree): metadata,
lineages and loader inputs. Each case is one kind of bad input and asserts its exact outcome: a
one-line TreeprobeError with its key words, or a TreeprobeWarning with its counts plus what was
kept / recorded in ``skipped``. Case ids are the rows of docs/BAD_INPUTS.md."""

from __future__ import annotations

import errno
import os
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from treeprobe import tl
from treeprobe.core import TreeData
from treeprobe.data import load_data, load_embeddings, load_inat_folder, load_metadata_csv
from treeprobe.datasets import BIOCLIP2_1K, bioclip2_1k
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import RANKS

PARIDAE = ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", "Parus major")
CYANISTES = ("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Cyanistes", "Cyanistes caeruleus")
CORVUS = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax")
HEADER = ",".join(("path", *RANKS))


def _csv(path, rows, columns=("path", *RANKS)):
    pd.DataFrame([list(r) for r in rows], columns=list(columns)).to_csv(path, index=False)
    return path


def _error(fn, pattern):
    with pytest.raises(TreeprobeError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    return msg


def _warns(fn, pattern):
    """Run ``fn`` recording TreeprobeWarnings; exactly one matches ``pattern``. Returns (result, messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    msgs = [str(w.message) for w in caught if issubclass(w.category, TreeprobeWarning)]
    hits = [m for m in msgs if re.search(pattern, m)]
    assert len(hits) == 1, msgs
    assert all("\n" not in m for m in msgs)
    return out, msgs


def _quiet(fn):
    """Run ``fn``; assert it issued no TreeprobeWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    msgs = [str(w.message) for w in caught if issubclass(w.category, TreeprobeWarning)]
    assert msgs == [], msgs
    return out


def _r_image(ds):
    tab = tl.mantel(ds, methods=("pearson",), levels=("image",), permutations=0)
    return float(tab["statistic"].iloc[0])


# ----------------------------------------------------------------------------- duplicates


def dup_parquet_rows(tmp_path):
    """D1: ten rows of the bundled parquet repeated: dropped, recorded, numbers unchanged."""
    df = pd.read_parquet(BIOCLIP2_1K)
    rows = np.flatnonzero(df["kingdom"].notna().to_numpy() & (df["kingdom"] != "incertae sedis").to_numpy())[:10]
    pd.concat([df, df.iloc[rows]], ignore_index=True).to_parquet(tmp_path / "dup.parquet")
    ds, _ = _warns(lambda: load_embeddings(tmp_path / "dup.parquet"),
                   r"^dropped 10 duplicated item\(s\) \(10 with the same uuid as an earlier row, same lineage and "
                   r"embedding\); kept the first copy")
    clean = bioclip2_1k()
    assert len(ds) == 902 and len(ds.skipped) == 128 + 10
    dups = ds.skipped[ds.skipped.reason.str.startswith("duplicate")]
    # row K: the first copy's position among the 1,040 loaded rows (here the source row)
    assert dups.reason.tolist() == [f"duplicate of row {k} (same uuid)" for k in rows]
    assert dups.item.tolist() == [f"row {1030 + i}" for i in range(10)]
    assert ds.items["uuid"].tolist() == clean.items["uuid"].tolist()
    assert _r_image(ds) == _r_image(clean)


def dup_npy_metadata_rows(tmp_path):
    """D2: .npy + metadata.csv whose rows 0 and 2 name the same image and embedding row."""
    np.save(tmp_path / "e.npy", np.arange(12, dtype=np.float32).reshape(4, 3) + 1)
    rows = [["a.jpg", *PARIDAE, 0], ["b.jpg", *CORVUS, 1], ["a.jpg", *PARIDAE, 0], ["c.jpg", *CYANISTES, 3]]
    _csv(tmp_path / "metadata.csv", rows, ("path", *RANKS, "emb_row"))
    ds, _ = _warns(lambda: load_data(tmp_path / "e.npy"), r"dropped 1 duplicated item\(s\) \(1 with the same path")
    assert ds.items["emb_row"].tolist() == [0, 1, 3]
    assert ds.skipped.values.tolist() == [[str(tmp_path / "a.jpg"), "duplicate of row 0 (same path)"]]


def dup_csv_path_other_covariates(tmp_path):
    """D3: a CSV listing one photo twice with different covariates: one item, the copy recorded."""
    rows = [["a.jpg", *PARIDAE, "egg"], ["b.jpg", *CORVUS, "adult"], ["./a.jpg", *PARIDAE, "adult"]]
    _csv(tmp_path / "m.csv", rows, ("path", *RANKS, "life_stage"))
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"),
                   r"dropped 1 duplicated item\(s\) \(1 with the same path as an earlier row, same lineage\); kept "
                   r"the first copy of each; the copies differ in column\(s\) life_stage")
    assert len(ds) == 2 and ds.items["life_stage"].tolist() == ["egg", "adult"]
    assert ds.skipped.values.tolist() == [[str(tmp_path / "a.jpg"), "duplicate of row 0 (same path)"]]


def dup_path_other_lineage(tmp_path):
    """D4: one path under two lineages: refused, naming the path."""
    rows = [["a.jpg", *PARIDAE], ["b.jpg", *CORVUS], ["a.jpg", *CYANISTES]]
    _csv(tmp_path / "m.csv", rows)
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"),
           rf"^rows 0 and 2 have the same path '{tmp_path / 'a.jpg'}' but a different lineage: 1 such conflicting")


def dup_uuid_other_embedding(tmp_path):
    """D5: one uuid with two different embeddings: refused."""
    df = pd.DataFrame([dict(zip(RANKS, lin)) for lin in (PARIDAE, CORVUS, PARIDAE)])
    df["uuid"] = ["u1", "u2", "u1"]
    df["emb"] = [[1.0, 2.0], [3.0, 1.0], [1.0, 2.5]]
    df.to_parquet(tmp_path / "e.parquet")
    _error(lambda: load_data(tmp_path / "e.parquet"), r"^rows 0 and 2 have the same uuid 'u1' but a different embedding")


# ----------------------------------------------------------------------------- names and missing values


def missing_tokens(tmp_path):
    """M1: unknown / Unknown / incertae sedis are no taxa; an incertae-sedis kingdom is set aside."""
    rows = [["a.jpg", "Animalia", "Chordata", "Aves", "unknown", "Paridae", "Parus", "Parus major"],
            ["b.jpg", "Animalia", "Unknown", "Aves", "Passeriformes", "incertae sedis", "Parus", "Parus ater"],
            ["c.jpg", "incertae sedis", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", "Parus major"]]
    _csv(tmp_path / "m.csv", rows)
    ds = _quiet(lambda: load_metadata_csv(tmp_path / "m.csv"))
    assert ds.items[["phylum", "order", "family"]].values.tolist() == [["Chordata", "", "Paridae"], ["", "Passeriformes", ""]]
    assert ds.skipped.values.tolist() == [[str(tmp_path / "c.jpg"), "no taxonomy (missing kingdom)"]]
    assert ds.taxonomy.n_taxa("order") == 1 and ds.taxonomy.n_taxa("family") == 1
    # the bundled example: its 7 "incertae sedis" kingdom rows are set aside, not a kingdom
    raw = pd.read_parquet(BIOCLIP2_1K, columns=["kingdom"])["kingdom"]
    inc = np.flatnonzero(raw.eq("incertae sedis").to_numpy())
    bc = bioclip2_1k()
    assert len(inc) == 7 and {f"row {i}" for i in inc} <= set(bc.skipped["item"])
    assert "incertae sedis" not in set(bc.taxonomy.lineages["kingdom"]) and bc.taxonomy.n_taxa("kingdom") == 4


def whitespace_names(tmp_path):
    """N1: doubled, no-break, tab and trailing spaces in names: one species, the count warned."""
    rows = [["a.jpg", *PARIDAE], ["b.jpg", *PARIDAE[:6], "Parus  major"], ["c.jpg", *PARIDAE[:6], "Parus\u00a0major"],
            ["d.jpg", *PARIDAE[:4], " Paridae\t", "Parus", "Parus\tmajor "]]
    _csv(tmp_path / "m.csv", rows)
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"), r"^normalised 4 rank value\(s\) \(Unicode NFC")
    assert ds.items["species"].tolist() == ["Parus major"] * 4 and ds.items["family"].tolist() == ["Paridae"] * 4
    assert ds.taxonomy.n_taxa("species") == 1 and ds.taxonomy.n_taxa("family") == 1


def unicode_nfd_names(tmp_path):
    """N2: a name in decomposed Unicode (e + combining accent) is the composed name."""
    items = pd.DataFrame([dict(zip(RANKS, PARIDAE[:5] + ("Ab\u00e9lia", "Ab\u00e9lia x"))),
                          dict(zip(RANKS, PARIDAE[:5] + ("Abe\u0301lia", "Abe\u0301lia x")))])
    ds, _ = _warns(lambda: TreeData(np.eye(2, 3, dtype=np.float32) + 1, items), r"^normalised 2 rank value")
    assert ds.items["genus"].tolist() == ["Ab\u00e9lia"] * 2 and ds.taxonomy.n_taxa("species") == 1


def case_variant_names(tmp_path):
    """N3: 'aves' beside 'Aves': respelled as the most frequent spelling, one class."""
    rows = [["a.jpg", *PARIDAE], ["b.jpg", *CORVUS], ["c.jpg", "Animalia", "Chordata", "aves", *PARIDAE[3:]]]
    _csv(tmp_path / "m.csv", rows)
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"),
                   r"^1 name\(s\) were spelled with different letter case; 1 value\(s\) respelled as the most "
                   r"frequent spelling: class 'aves' -> 'Aves'")
    assert ds.items["class"].tolist() == ["Aves"] * 3 and ds.taxonomy.n_taxa("class") == 1
    assert ds.taxonomy.n_taxa("species") == 2


def numeric_names(tmp_path):
    """N4: taxon names that are plain numbers (shifted columns, ids): kept as names, warned."""
    rows = [["a.jpg", "Animalia", "7", "Aves", *PARIDAE[3:]], ["b.jpg", "Animalia", "7", "Aves", *CORVUS[3:]]]
    _csv(tmp_path / "m.csv", rows)
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"),
                   r"^2 phylum value\(s\) are plain numbers \(e\.g\. '7'\): read as taxon names")
    assert ds.items["phylum"].tolist() == ["7", "7"] and ds.taxonomy.n_taxa("phylum") == 1


def separator_in_name(tmp_path):
    """N5: a name containing '|', the cumulative-label separator: refused (labels would collide)."""
    _csv(tmp_path / "m.csv", [["a.jpg", *PARIDAE[:5], "Parus|Cyanistes", "Parus major"]])
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"), r"^1 genus value\(s\) contain '\|' \(e\.g\. 'Parus\|Cyanistes'\)")


# ----------------------------------------------------------------------------- lineages


def lineage_conflict(tmp_path):
    """L1: one genus under two families (so one binomial twice): warned, listed, kept apart."""
    rows = [["a.jpg", *PARIDAE], ["b.jpg", *PARIDAE], ["c.jpg", *PARIDAE[:4], "Muscicapidae", "Parus", "Parus major"],
            ["d.jpg", *CORVUS]]
    _csv(tmp_path / "m.csv", rows)
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"),
                   r"^1 taxon has more than one parent: 'Parus' \(genus, Animalia\) under family Paridae \(2 items\) "
                   r"and family Muscicapidae \(1 item\); kept as given")
    assert ds.uns["lineage_conflicts"].values.tolist() == [
        ["Animalia", "genus", "Parus", "family", "Paridae", 2], ["Animalia", "genus", "Parus", "family", "Muscicapidae", 1]]
    assert ds.taxonomy.n_taxa("species") == 3  # not merged


def homonyms_across_kingdoms(tmp_path):
    """L2: the genus Morus, a plant and a bird: no conflict, two genera, the short name ambiguous."""
    rows = [["a.jpg", "Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"],
            ["b.jpg", "Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Morus", "Morus bassanus"]]
    _csv(tmp_path / "m.csv", rows)
    ds = _quiet(lambda: load_metadata_csv(tmp_path / "m.csv"))
    assert "lineage_conflicts" not in ds.uns and ds.taxonomy.n_taxa("genus") == 2
    _error(lambda: ds["Morus"], r"^'Morus' names 2 taxa")


def species_without_genus(tmp_path):
    """L3: a binomial with no genus: a species below its nearest known rank, genus unknown; no warning."""
    rows = [["a.jpg", *PARIDAE[:5], "", "Parus major"], ["b.jpg", *PARIDAE[:5], "", "Parus major"], ["c.jpg", *CORVUS]]
    _csv(tmp_path / "m.csv", rows)
    ds = _quiet(lambda: load_metadata_csv(tmp_path / "m.csv"))
    tax = ds.taxonomy
    assert tax.codes("genus").tolist()[:2] == [-1, -1]
    assert tax.codes("species")[0] == tax.codes("species")[1] >= 0 and tax.n_taxa("species") == 2


def rank_all_missing(tmp_path):
    """L4: a rank column empty in every row: warned (no taxa there), analysis goes on."""
    rows = [["a.jpg", *PARIDAE[:3], "", *PARIDAE[4:]], ["b.jpg", *CORVUS[:3], "", *CORVUS[4:]]]
    _csv(tmp_path / "m.csv", rows)
    ds, _ = _warns(lambda: load_metadata_csv(tmp_path / "m.csv"),
                   r"^rank\(s\) order missing in every one of the 2 items: no taxa there")
    assert ds.taxonomy.n_taxa("order") == 0 and ds.taxonomy.n_taxa("family") == 2


# ----------------------------------------------------------------------------- CSV files


def empty_csv(tmp_path):
    """C1: an empty file."""
    (tmp_path / "m.csv").write_text("")
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"), r"^metadata CSV .*m\.csv is empty$")


def header_only_csv(tmp_path):
    """C2: a header and no rows."""
    (tmp_path / "m.csv").write_text(HEADER + "\n")
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"), r"^metadata CSV .*m\.csv has a header but no rows$")


def no_kingdom_column(tmp_path):
    """C3: the kingdom column is absent."""
    _csv(tmp_path / "m.csv", [["a.jpg", *PARIDAE[1:]]], ("path", *RANKS[1:]))
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"), r"lacks column\(s\) kingdom; needs path, kingdom")


def bom_and_crlf_csv(tmp_path):
    """C4: a UTF-8 byte-order mark and Windows line endings: read as a plain CSV."""
    text = HEADER + "\r\n" + "a.jpg," + ",".join(PARIDAE) + "\r\n"
    (tmp_path / "m.csv").write_bytes(text.encode("utf-8-sig"))
    ds = _quiet(lambda: load_metadata_csv(tmp_path / "m.csv"))
    assert list(ds.items.columns[:2]) == ["path", "kingdom"]
    assert ds.items.iloc[0][list(RANKS)].tolist() == list(PARIDAE) and ds.items["path"][0] == str(tmp_path / "a.jpg")


def not_utf8_csv(tmp_path):
    """C5: a Latin-1 CSV: one-line error naming the encoding problem."""
    (tmp_path / "m.csv").write_bytes((HEADER + "\na.jpg," + ",".join(PARIDAE[:6]) + ",Parus m\xe4jor\n").encode("latin-1"))
    _error(lambda: load_metadata_csv(tmp_path / "m.csv"), r"^cannot parse metadata CSV .*'utf-8' codec can't decode")


def missing_image_files(tmp_path):
    """C6: paths to files that do not exist: kept at load (extraction records them as 'missing file')."""
    _csv(tmp_path / "m.csv", [["nope/a.jpg", *PARIDAE], ["nope/b.jpg", *CORVUS]])
    ds = _quiet(lambda: load_metadata_csv(tmp_path / "m.csv"))
    assert ds.items["path"].tolist() == [str(tmp_path / "nope" / "a.jpg"), str(tmp_path / "nope" / "b.jpg")]
    assert ds.X is None and len(ds.skipped) == 0


# ----------------------------------------------------------------------------- embeddings files


def nan_embedding_rows(tmp_path):
    """E1: NaN and all-zero embedding rows: set aside with their reason and source row."""
    e = np.ones((4, 3), np.float32) + np.arange(4)[:, None]
    e[1, 0], e[2] = np.nan, 0.0
    np.save(tmp_path / "e.npy", e)
    _csv(tmp_path / "metadata.csv", [["", *lin] for lin in (PARIDAE, CORVUS, CYANISTES, PARIDAE[:6] + ("Parus ater",))])
    ds = _quiet(lambda: load_data(tmp_path / "e.npy"))
    assert ds.skipped.values.tolist() == [["row 1", "non-finite embedding"], ["row 2", "zero-norm embedding"]]
    np.testing.assert_array_equal(ds.X, e[[0, 3]])


def embeddings_1d(tmp_path):
    """E2: a 1-D .npy."""
    np.save(tmp_path / "e.npy", np.ones(3, np.float32))
    _csv(tmp_path / "metadata.csv", [["", *PARIDAE]] * 3)
    _error(lambda: load_data(tmp_path / "e.npy"), r"have shape \(3,\), expected \(N, D\)$")


def embeddings_3d(tmp_path):
    """E3: a 3-D .npy (e.g. patch tokens saved by mistake)."""
    np.save(tmp_path / "e.npy", np.ones((2, 4, 3), np.float32))
    _csv(tmp_path / "metadata.csv", [["", *PARIDAE], ["", *CORVUS]])
    _error(lambda: load_data(tmp_path / "e.npy"), r"have shape \(2, 4, 3\), expected \(N, D\)$")


def embeddings_not_numbers(tmp_path):
    """E4: a .npy of strings."""
    np.save(tmp_path / "e.npy", np.array([["a", "b"], ["c", "d"]]))
    _csv(tmp_path / "metadata.csv", [["", *PARIDAE], ["", *CORVUS]])
    _error(lambda: load_data(tmp_path / "e.npy"), r"have dtype <U1, expected numbers$")


def embeddings_ragged(tmp_path):
    """E5: a parquet whose emb lists have two lengths (two models' outputs mixed)."""
    df = pd.DataFrame([dict(zip(RANKS, lin)) for lin in (PARIDAE, CORVUS, CYANISTES)])
    df["emb"] = [[1.0, 2.0, 3.0], [1.0, 2.0], [3.0, 2.0, 1.0]]
    df.to_parquet(tmp_path / "e.parquet")
    _error(lambda: load_data(tmp_path / "e.parquet"), r"ragged embeddings in 'emb' column .*: 1 rows of length 2, 2 rows of length 3")


def embeddings_rows_mismatch(tmp_path):
    """E6: .npy rows and metadata rows disagree (no emb_row to map them)."""
    np.save(tmp_path / "e.npy", np.ones((3, 2), np.float32))
    _csv(tmp_path / "metadata.csv", [["", *PARIDAE], ["", *CORVUS]])
    _error(lambda: load_data(tmp_path / "e.npy"), r"have 3 rows but metadata .* has 2 rows \(add an emb_row column")


# ----------------------------------------------------------------------------- iNat21 folders


def _class_folder(root, name, n_images=1):
    d = root / name
    d.mkdir()
    for i in range(n_images):
        Image.new("RGB", (8, 8), (i * 40, 30, 30)).save(d / f"{i}.jpg")
    return d


CORVUS_DIR = "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax"


def inat_self_symlink(tmp_path):
    """I1: a class folder that is a symlink to itself: recorded skip, the rest loads."""
    _class_folder(tmp_path, CORVUS_DIR)
    loop = tmp_path / "00002_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_ater"
    os.symlink(loop, loop)
    ds = _quiet(lambda: load_inat_folder(tmp_path))
    assert len(ds) == 1
    assert ds.skipped.values.tolist() == [[str(loop), "class folder cannot be read: Too many levels of symbolic links"]]


def inat_links_inside_class_folder(tmp_path):
    """I2: inside a class folder, a self-link, a broken image link and a looping image link."""
    d = _class_folder(tmp_path, CORVUS_DIR, n_images=2)
    os.symlink(d, d / "again")  # a folder: ignored (not recursive)
    os.symlink(tmp_path / "gone.jpg", d / "broken.jpg")
    os.symlink(d / "loop.png", d / "loop.png")
    ds = _quiet(lambda: load_inat_folder(tmp_path))
    assert ds.items["path"].tolist() == [str(d / "0.jpg"), str(d / "1.jpg")]
    assert ds.skipped.values.tolist() == [
        [str(d / "broken.jpg"), "image entry is a broken symlink"],
        [str(d / "loop.png"), "image entry cannot be read: Too many levels of symbolic links"]]


def inat_unreadable_folder(tmp_path, monkeypatch):
    """I3: a class folder that cannot be listed (permissions): recorded skip with the OS reason."""
    _class_folder(tmp_path, CORVUS_DIR)
    locked = _class_folder(tmp_path, "00002_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_ater")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # tests run as root, where chmod 000 would not lock it
    ds = _quiet(lambda: load_inat_folder(tmp_path))
    assert len(ds) == 1 and ds.skipped.values.tolist() == [[str(locked), "class folder cannot be read: Permission denied"]]


def inat_trinomial(tmp_path):
    """I4: a trinomial folder name: species is the binomial, the subspecies in 'infraspecific'."""
    _class_folder(tmp_path, "00123_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major_kapustini", 2)
    _class_folder(tmp_path, "00124_Animalia_Chordata_Aves_Passeriformes_Paridae_Parus_major")
    ds, _ = _warns(lambda: load_inat_folder(tmp_path),
                   r"^1 class folder\(s\) name more than a binomial \(e\.g\. '00123_.*_Parus_major_kapustini'\): "
                   r"species is the binomial")
    assert ds.items["species"].tolist() == ["Parus major"] * 3
    assert ds.items["infraspecific"].tolist() == ["kapustini", "kapustini", ""]
    assert ds.items["genus"].tolist() == ["Parus"] * 3 and ds.taxonomy.n_taxa("species") == 1


def inat_unparsed_names(tmp_path):
    """I5: subfolders whose name is not <id>_<7 ranks>: recorded skips."""
    _class_folder(tmp_path, CORVUS_DIR)
    bad = [_class_folder(tmp_path, n) for n in ("Corvus_corax", "x0001_A_B_C_D_E_F_g", "00003_Animalia_Chordata__D_E_F_g")]
    ds = _quiet(lambda: load_inat_folder(tmp_path))
    assert len(ds) == 1
    assert sorted(ds.skipped["item"]) == sorted(map(str, bad))
    assert set(ds.skipped["reason"]) == {"folder name does not parse as <id>_<Kingdom>_<Phylum>_<Class>_<Order>_"
                                         "<Family>_<Genus>_<epithet>"}


# ----------------------------------------------------------------------------- user trees


def newick_half_the_species(tmp_path):
    """T1: a Newick tree with half of the species: warned with the counts; Mantel rows say the items used."""
    from treeprobe.tree import read_newick

    ds = bioclip2_1k()
    tree = ds.taxonomy.tree()
    species = sorted({n.name for n in tree.get_leaves() if n.rank == "species"})
    keep = species[::2]
    tree.prune([n for n in tree.get_leaves() if n.name in keep], preserve_branch_length=True)
    (tmp_path / "half.nwk").write_text(tree.write(format=1))
    sp = ds.items["species"]
    n_in = int(sp.isin(keep).sum())
    tab, _ = _warns(lambda: tl.mantel(ds, tree=read_newick(tmp_path / "half.nwk"), methods=("pearson",), permutations=0),
                    rf"^the tree covers {len(keep)} of 790 species: {902 - n_in} of 902 items of species not in the tree "
                    rf"\(48 of them with no species name\) are left out of the Mantel tests, which use {n_in} items$")
    assert tab.set_index("level")["n_items"].to_dict() == {"image": n_in, "species-centroid": len(keep)}
    assert len(ds.uns["mantel_not_in_tree"]) == 902 - n_in


CASES = {
    "D1-duplicated-parquet-rows": dup_parquet_rows,
    "D2-duplicated-npy-metadata-rows": dup_npy_metadata_rows,
    "D3-duplicated-path-other-covariates": dup_csv_path_other_covariates,
    "D4-duplicated-path-other-lineage": dup_path_other_lineage,
    "D5-duplicated-uuid-other-embedding": dup_uuid_other_embedding,
    "M1-missing-rank-tokens": missing_tokens,
    "N1-whitespace-in-names": whitespace_names,
    "N2-decomposed-unicode-names": unicode_nfd_names,
    "N3-case-variant-names": case_variant_names,
    "N4-numeric-taxon-names": numeric_names,
    "N5-separator-in-name": separator_in_name,
    "L1-taxon-under-two-parents": lineage_conflict,
    "L2-homonyms-across-kingdoms": homonyms_across_kingdoms,
    "L3-species-without-genus": species_without_genus,
    "L4-rank-column-all-missing": rank_all_missing,
    "C1-empty-csv": empty_csv,
    "C2-header-only-csv": header_only_csv,
    "C3-no-kingdom-column": no_kingdom_column,
    "C4-bom-and-crlf-csv": bom_and_crlf_csv,
    "C5-not-utf8-csv": not_utf8_csv,
    "C6-missing-image-files": missing_image_files,
    "E1-nan-and-zero-embedding-rows": nan_embedding_rows,
    "E2-embeddings-1d": embeddings_1d,
    "E3-embeddings-3d": embeddings_3d,
    "E4-embeddings-not-numbers": embeddings_not_numbers,
    "E5-embeddings-ragged": embeddings_ragged,
    "E6-embeddings-rows-mismatch": embeddings_rows_mismatch,
    "I1-inat-self-symlink-class-folder": inat_self_symlink,
    "I2-inat-links-inside-class-folder": inat_links_inside_class_folder,
    "I3-inat-unreadable-class-folder": inat_unreadable_folder,
    "I4-inat-trinomial-folder": inat_trinomial,
    "I5-inat-unparsed-folder-names": inat_unparsed_names,
    "T1-newick-half-the-species": newick_half_the_species,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_input(case, tmp_path, monkeypatch):
    fn = CASES[case]
    if "monkeypatch" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
        fn(tmp_path, monkeypatch)
    else:
        fn(tmp_path)
