"""Captions built from the taxonomy (training/text.py), on real lineages."""

from pathlib import Path

import pandas as pd
import pytest

from tests._paths import SHARED_DATA
from treeprobe.errors import TreeprobeError

from treeprobe.training.text import (TEXT_TYPES, all_captions, make_caption, scientific_name, split_binomial,
                           taxonomic_name, text_type_for_step)

SHARED = SHARED_DATA
PHOTOS_CSV = SHARED / "multikingdom_photos_index" / "metadata.csv"
TOL_CSV = SHARED / "tol200m_bioclip2_embeddings_1k" / "metadata.csv"
COLS = ["kingdom", "phylum", "class", "order", "family", "genus", "species", "common_name"]


def _rows(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        pytest.skip(f"shared data not available: {csv}")
    return pd.read_csv(csv, dtype=str)  # NaN for empty cells, as a user's pandas would give


def _row(df: pd.DataFrame, **match) -> dict:
    m = pd.Series(True, index=df.index)
    for k, v in match.items():
        m &= df[k].fillna("") == v
    assert m.any(), match
    return df.loc[m, COLS].iloc[0].to_dict()


def test_full_lineage_all_types():
    r = _row(_rows(PHOTOS_CSV), species="Acer circinatum")
    caps = all_captions(r)
    tax = "Plantae Tracheophyta Magnoliopsida Sapindales Sapindaceae Acer circinatum"
    assert caps == {
        "taxonomic": f"a photo of {tax}.",
        "scientific": "a photo of Acer circinatum.",
        "common": "a photo of Vine Maple.",
        "scientific_common": "a photo of Acer circinatum with common name Vine Maple.",
        "taxonomic_common": f"a photo of {tax} with common name Vine Maple.",
    }
    assert set(caps) == set(TEXT_TYPES)


def test_missing_common_name_falls_back_to_scientific():
    r = _row(_rows(PHOTOS_CSV), species="Amanita amerirubescens")
    assert pd.isna(r["common_name"])
    assert make_caption(r, "common") == "a photo of Amanita amerirubescens."
    assert make_caption(r, "scientific_common") == "a photo of Amanita amerirubescens."
    assert make_caption(r, "taxonomic_common") == (
        "a photo of Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita amerirubescens.")


def test_missing_order_is_dropped():
    r = _row(_rows(TOL_CSV), species="Kinosternon subrubrum")
    assert pd.isna(r["order"])
    assert make_caption(r, "taxonomic") == (
        "a photo of Animalia Chordata Testudines Kinosternidae Kinosternon subrubrum.")
    assert make_caption(r, "taxonomic_common") == (
        "a photo of Animalia Chordata Testudines Kinosternidae Kinosternon subrubrum "
        "with common name Eastern mud turtle.")


def test_missing_class_is_dropped():
    r = _row(_rows(TOL_CSV), species="Lagodon rhomboides")
    assert make_caption(r, "taxonomic") == "a photo of Animalia Chordata Perciformes Sparidae Lagodon rhomboides."
    assert make_caption(r, "common") == "a photo of Pinfish."


def test_missing_species_gives_genus_only():
    r = _row(_rows(TOL_CSV), genus="Amphibolips", species="")
    assert make_caption(r, "taxonomic") == "a photo of Animalia Arthropoda Insecta Hymenoptera Cynipidae Amphibolips."
    assert make_caption(r, "scientific") == "a photo of Amphibolips."
    assert make_caption(r, "common") == "a photo of Amphibolips."


def test_empty_lineage_gives_empty_caption():
    df = _rows(TOL_CSV)
    empty = df[df[COLS].isna().all(axis=1)]
    assert len(empty)
    r = empty[COLS].iloc[0].to_dict()
    assert all(make_caption(r, t) == "" for t in TEXT_TYPES)


def test_capitalisation_and_binomial_rules():
    r = {"kingdom": "plantae", "phylum": "TRACHEOPHYTA", "genus": "", "species": "Acer Circinatum"}
    assert taxonomic_name(r) == "Plantae Tracheophyta Acer circinatum"  # genus read from the binomial
    assert split_binomial("Pica", "Pica pica pica") == ("Pica", "pica pica")
    assert split_binomial("Acer", "circinatum") == ("Acer", "circinatum")
    assert scientific_name({"family": "Sapindaceae"}) == "Sapindaceae"


def test_mixed_is_repeatable_and_covers_all_types():
    a = [text_type_for_step("mixed", s, seed=7) for s in range(200)]
    b = [text_type_for_step("mixed", s, seed=7) for s in range(200)]
    c = [text_type_for_step("mixed", s, seed=8) for s in range(200)]
    assert a == b and a != c
    assert set(a) == set(TEXT_TYPES)
    assert text_type_for_step("scientific", 5) == "scientific"
    with pytest.raises(TreeprobeError, match="unknown text type 'latin'"):
        text_type_for_step("latin", 0)
