"""Taxonomy: cumulative labels, the missing-rank rule, the rank tree (ete3, Newick, clade structure).

The generic tree (CladeStructure, Newick trees) is tested in test_tree.py."""

from tests._paths import SHARED_DATA
import numpy as np
import pandas as pd
import pytest
from ete3 import Tree

from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import RANKS, Taxonomy, placeable_mask
from treeprobe.tree import clade_structure_from_tree

SHARED = str(SHARED_DATA)


def lineage(*names):
    return dict(zip(RANKS, names))


def small_frame():
    return pd.DataFrame([
        lineage("Animalia", "Chordata", "Aves", "Passeriformes", "Moridae", "Morus", "Morus bassanus"),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus nigra"),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", ""),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", None),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Ficus", np.nan),
        lineage("Plantae", "Tracheophyta", "Magnoliopsida", "", "", "Ficus", "Ficus carica"),
    ])


def test_homonyms_never_merge():
    tax = Taxonomy.from_frame(small_frame())
    g = tax.codes("genus")
    assert g[0] != g[1]  # the bird Morus and the plant Morus
    assert g[1] == g[2] == g[3] == g[4]
    assert tax.labels("genus")[0] == "Animalia|Chordata|Aves|Passeriformes|Moridae|Morus"


def test_missing_rank_rule_one_placeholder_per_parent():
    tax = Taxonomy.from_frame(small_frame())
    s = tax.codes("species")
    assert s[3] == s[4]  # two Morus images with no species share the placeholder
    assert s[5] != s[3]  # Ficus' unknown species is a different placeholder
    assert tax.labels("species")[5].endswith("Ficus|incertae_sedis_species")
    # row 6 lacks order and family: placeholders under its class, not merged with Rosales
    assert tax.labels("order")[6].endswith("Magnoliopsida|incertae_sedis_order")
    assert tax.codes("genus")[6] != tax.codes("genus")[5]  # Ficus under a different parent
    summ = tax.rank_summary().set_index("rank")
    assert summ.loc["species", "n_placeholder_taxa"] == 2
    assert summ.loc["species", "n_taxa"] == 6


def test_rows_without_kingdom_flagged_and_rejected():
    df = small_frame()
    df.loc[2, "kingdom"] = " "
    assert placeable_mask(df).tolist() == [True, True, False, True, True, True, True]
    with pytest.raises(TreeprobeError, match="no kingdom"):
        Taxonomy.from_frame(df)
    with pytest.raises(TreeprobeError, match="missing rank column"):
        Taxonomy.from_frame(df.drop(columns=["genus"]))


def test_codes_do_not_depend_on_row_order():
    df = small_frame()
    a = Taxonomy.from_frame(df)
    b = Taxonomy.from_frame(df.iloc[::-1])
    assert list(a.taxon_labels("species")) == list(b.taxon_labels("species"))
    assert np.array_equal(a.codes("family"), b.codes("family")[::-1])


def _brute_rank_distance(tax, weights):
    """2·Σ_{ranks below the deepest shared one} w, by comparing cumulative labels."""
    N = tax.n_items
    T = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            shared = sum(tax.labels(r)[i] == tax.labels(r)[j] for r in RANKS)
            T[i, j] = 2 * sum(weights[shared:])
    return T


@pytest.mark.parametrize("weights", [[1] * 7, [5, 4, 3, 2, 1.5, 1, 0.5]])
def test_clade_structure_distances_match_rank_definition(weights):
    tax = Taxonomy.from_frame(small_frame())
    cs = tax.clade_structure(weights)
    assert np.allclose(cs.item_distances(), _brute_rank_distance(tax, weights))
    sizes = cs.items_per_node()
    assert sizes[0] == tax.n_items


def test_ete3_tree_and_newick_round_trip():
    tax = Taxonomy.from_frame(small_frame())
    t = tax.tree()
    assert len(t.get_leaves()) == tax.n_taxa("species")
    bird = [n for n in t.get_leaves() if n.name == "Morus bassanus"][0]
    plant = [n for n in t.get_leaves() if n.name == "Morus alba"][0]
    assert t.get_distance(bird, plant) == 14.0
    assert bird.rank == "species" and bird.n_items == 1
    t2 = Tree(tax.to_newick(), format=1)
    assert sorted(l.name for l in t2.get_leaves()) == sorted(l.name for l in t.get_leaves())
    cs, mask = clade_structure_from_tree(t2, tax.lineages["species"].where(
        ~tax.lineages["species"].str.startswith("incertae"), tax.labels("species")))
    assert mask.all()
    assert np.allclose(cs.item_distances(), tax.clade_structure().item_distances())


def test_real_multikingdom_lineages():
    df = pd.read_csv(f"{SHARED}/multikingdom_photos_index/metadata.csv")
    tax = Taxonomy.from_frame(df)
    counts = {r: tax.n_taxa(r) for r in RANKS}
    assert counts == dict(kingdom=3, phylum=4, **{"class": 8}, order=45, family=133, genus=316, species=465)
    cs = tax.clade_structure()
    assert cs.n_items == 1072 and cs.n_nodes == 1 + sum(counts.values())
