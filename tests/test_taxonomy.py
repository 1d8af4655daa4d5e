"""Taxonomy: cumulative labels, missing tokens, the two missing-rank rules (placeholder / separate),
the rank tree (ete3, Newick, clade structure) and its Mantel statistic.

The generic tree (CladeStructure, Newick trees) is tested in test_tree.py."""

from tests._paths import SHARED_DATA
import numpy as np
import pandas as pd
import pytest
from ete3 import Tree

from treeprobe.errors import TreeprobeError
from treeprobe.mantel import mantel_tree
from treeprobe.taxonomy import (MISSING_TOKENS, RANKS, SEP, UNKNOWN_LEAF, Taxonomy, clean_lineages, is_missing,
                                placeable_mask)
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


# --- missing tokens ------------------------------------------------------------------------------

TOKENS = ["incertae sedis", "incertae_sedis", "unknown", "NA", "N/A", "none", "null", "nan", "-", "?", ""]


def _variants(tok):
    return {tok, tok.lower(), tok.upper(), tok.title(), f"  {tok}\t", f" {tok.upper()} "}


@pytest.mark.parametrize("tok", TOKENS)
def test_each_missing_token_and_its_case_variants_are_missing(tok):
    vals = sorted(_variants(tok))
    assert is_missing(vals).all(), vals
    df = pd.DataFrame({r: ["Plantae"] * len(vals) for r in RANKS})
    df["genus"] = vals
    assert (clean_lineages(df)["genus"] == "").all()
    df["kingdom"] = vals  # a missing kingdom makes the row unplaceable
    assert not placeable_mask(df).any()


def test_token_set_is_the_documented_one_and_real_names_are_kept():
    assert {t.lower() for t in TOKENS} <= MISSING_TOKENS
    names = ["Nasua", "Canidae", "Anna", "Nana", "Unknownia", "Incertae", "Sedis", "Nonea", "Nanus nanus",
             "Na na", "-a", "a?", "Felis catus"]
    assert not is_missing(names).any()
    assert is_missing([None, np.nan, pd.NA, "Incertae  Sedis", "INCERTAE__SEDIS"]).all()
    lin = clean_lineages(pd.DataFrame({r: names for r in RANKS}))
    assert (lin["genus"] == pd.Series(names)).all()


def test_missing_tokens_are_configurable_and_placeholders_are_missing():
    df = pd.DataFrame({r: ["Plantae", "Plantae", "Plantae", "Plantae"] for r in RANKS})
    df["genus"] = ["unknown", "sp.", "incertae_sedis_genus", " "]
    assert clean_lineages(df)["genus"].tolist() == ["", "sp.", "", ""]
    assert clean_lineages(df, missing={"SP."})["genus"].tolist() == ["unknown", "", "", ""]
    assert is_missing(["incertae_sedis_genus"], rank="genus").all()
    assert not is_missing(["incertae_sedis_genus"]).any()  # without rank: only the tokens
    with pytest.raises(TreeprobeError, match="collection"):
        clean_lineages(df, missing="unknown")


def test_incertae_sedis_kingdom_is_unplaceable_everywhere():
    df = small_frame()
    df.loc[1, "kingdom"] = "Incertae sedis"
    df.loc[4, "kingdom"] = "incertae_sedis"
    assert placeable_mask(df).tolist() == [True, False, True, True, False, True, True]
    for mode in ("placeholder", "separate"):
        with pytest.raises(TreeprobeError, match="2 item.*no kingdom"):
            Taxonomy.from_frame(df, unknown=mode)


def test_placeholder_mode_is_still_the_default_and_reads_the_new_tokens():
    df = small_frame()
    df.loc[0, "genus"] = "Unknown"
    tax = Taxonomy.from_frame(df)
    assert tax.unknown == "placeholder"
    assert tax.labels("genus")[0].endswith("Moridae|incertae_sedis_genus")
    assert tax.known("genus").tolist() == [False] + [True] * 6
    assert tax.known("species").tolist() == [True, True, True, False, False, False, True]
    assert (tax.codes("species") >= 0).all()
    with pytest.raises(TreeprobeError, match="unknown must be one of"):
        Taxonomy.from_frame(df, unknown="merge")


# --- unknown="separate": codes, known, labels ------------------------------------------------------

W = [5, 4, 3, 2, 1.5, 1, 0.5]  # distinct rank lengths, so a sum over the wrong ranks shows


def gap_frame():
    """Hand-made lineages with unknown ranks (comments: the row's deepest known taxon)."""
    A = ("Animalia", "Chordata", "Aves", "Passeriformes")
    return pd.DataFrame([
        lineage(*A, "Corvidae", "Corvus", "Corvus corax"),   # 0 species
        lineage(*A, "Corvidae", "Corvus", ""),               # 1 genus Corvus
        lineage(*A, "Corvidae", "Corvus", "unknown"),        # 2 genus Corvus
        lineage(*A, "Corvidae", None, None),                 # 3 family Corvidae
        lineage(*A, "Corvidae", "NA", "?"),                  # 4 family Corvidae
        lineage(*A, "", "Xus", "Xus a"),                     # 5 species, family unknown
        lineage(*A, "incertae sedis", "Xus", "Xus b"),       # 6 species, family unknown, same genus as 5
        lineage(*A, "Corvidae", "Xus", "Xus c"),             # 7 species; genus Xus under a known family
        lineage("Plantae", "", "", "", "", "", ""),          # 8 kingdom only
        lineage(*A, "Corvidae", "Corvus", "Corvus corax"),   # 9 same species as 0
        lineage("Plantae", "-", None, "", "", "", ""),       # 10 kingdom only
        lineage(*A, "Corvidae", "Pica", "Pica pica"),        # 11 species, another genus of Corvidae
    ])


def test_separate_mode_codes_known_labels():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    sp_, g, f = tax.codes("species"), tax.codes("genus"), tax.codes("family")
    assert (sp_[[1, 2, 3, 4, 8, 10]] == -1).all() and (sp_[[0, 5, 6, 7, 9, 11]] >= 0).all()
    assert sp_[0] == sp_[9] and len(set(sp_[[0, 5, 6, 7, 11]])) == 5
    assert g[0] == g[1] == g[2] and (g[[3, 4, 8, 10]] == -1).all()
    assert g[5] == g[6] != g[7]  # Xus under Passeriformes (family unknown) merges; Xus in Corvidae does not
    assert (f[[5, 6, 8, 10]] == -1).all() and len(set(f[[0, 3, 4, 7, 11]])) == 1
    assert tax.known("genus").tolist() == [True, True, True, False, False, True, True, True, False, True, False, True]
    assert np.array_equal(tax.known("species"), sp_ >= 0)
    assert tax.labels("genus")[5] == "Animalia|Chordata|Aves|Passeriformes||Xus"
    assert tax.labels("genus")[3] == "" and tax.labels("phylum")[8] == ""
    assert tax.labels("species")[11] == "Animalia|Chordata|Aves|Passeriformes|Corvidae|Pica|Pica pica"
    assert tax.n_taxa("genus") == 4 and tax.n_taxa("species") == 5 and tax.n_taxa("family") == 1
    assert list(tax.taxon_labels("genus")) == sorted(tax.taxon_labels("genus"))
    assert "" not in set(tax.taxon_labels("genus"))
    for r in RANKS:  # codes index taxon_labels; -1 exactly where unknown
        c = tax.codes(r)
        assert np.array_equal(c >= 0, tax.known(r))
        assert np.array_equal(tax.taxon_labels(r)[c[c >= 0]], tax.labels(r)[c >= 0])
    # the same frame in placeholder mode: the unknowns are shared placeholder taxa
    old = Taxonomy.from_frame(gap_frame())
    assert old.codes("species")[1] == old.codes("species")[2] and old.codes("genus")[3] == old.codes("genus")[4]


def test_separate_mode_rank_summary():
    summ = Taxonomy.from_frame(gap_frame(), unknown="separate").rank_summary().set_index("rank")
    assert summ["n_unknown"].tolist() == [0, 2, 2, 2, 4, 4, 6]
    assert summ["n_taxa"].tolist() == [2, 1, 1, 1, 1, 4, 5]
    assert summ["n_placeholder_taxa"].tolist() == [0] * 7
    assert summ.loc["species", "n_singleton_taxa"] == 4 and summ.loc["species", "largest_taxon"] == 2
    assert summ.loc["genus", "largest_taxon"] == 4  # Corvus: rows 0, 1, 2, 9
    old = Taxonomy.from_frame(gap_frame()).rank_summary().set_index("rank")
    assert old["n_unknown"].tolist() == summ["n_unknown"].tolist()
    assert old.loc["species", "n_taxa"] == 5 + 3  # placeholders under Corvus, Corvidae, Plantae|...|genus


def test_separate_mode_subset_and_row_order():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    sub = tax.subset(np.array([1, 2, 3, 0]))
    assert sub.unknown == "separate" and sub.codes("species").tolist() == [-1, -1, -1, 0]
    rev = Taxonomy.from_frame(gap_frame().iloc[::-1], unknown="separate")
    assert np.array_equal(rev.codes("genus")[::-1], tax.codes("genus"))


# --- unknown="separate": the rank tree ------------------------------------------------------------

def _brute_separate_distance(tax, w):
    """2·Σ_{s > r} w_s, r = deepest rank at which both items are known to be in the same taxon."""
    N = tax.n_items
    T = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            shared = [k for k, r in enumerate(RANKS) if tax.known(r)[i] and tax.known(r)[j]
                      and tax.labels(r)[i] == tax.labels(r)[j]]
            T[i, j] = 0.0 if i == j else 2 * sum(w[max(shared, default=-1) + 1:])
    return T


def test_separate_tree_distances_by_hand():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    cs = tax.clade_structure(W)
    D = cs.item_distances()
    g, s = W[5], W[6]
    assert D[3, 4] == 2 * (g + s) == D[0, 11]  # two unknown genera of Corvidae = two different genera of it
    assert D[0, 3] == 2 * (g + s)             # known to species vs known to family only
    assert D[1, 2] == 2 * s == D[0, 1]         # two unknown species of Corvus = two Corvus species
    assert D[0, 9] == 0.0                      # the same known species
    assert D[5, 6] == 2 * s                    # Xus a, Xus b: one genus below an unknown family
    assert D[5, 7] == 2 * sum(W[4:])           # Xus (family unknown) vs Xus in Corvidae: share the order only
    assert D[8, 10] == 2 * sum(W[1:])          # two kingdom-only plants: two different phyla of Plantae
    assert D[0, 8] == 2 * sum(W)
    off = ~np.eye(tax.n_items, dtype=bool)
    assert (D[off] > 0).sum() == off.sum() - 2  # only the pair (0, 9) is at distance 0
    assert np.allclose(D, _brute_separate_distance(tax, W))
    assert np.allclose(cs.root_distance()[cs.item_node], sum(W))  # every item at depth Σw


def test_separate_tree_shape_no_placeholders_private_leaves():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    cs = tax.clade_structure(W)
    unknown_sp = np.flatnonzero(~tax.known("species"))
    assert cs.n_nodes == 1 + sum(tax.n_taxa(r) for r in RANKS) + len(unknown_sp)
    assert not any("incertae" in str(n) or str(n).endswith(SEP) for n in cs.names[1:])
    leaves = cs.item_node[unknown_sp]
    assert len(set(leaves)) == len(unknown_sp)  # one private leaf each
    assert np.array_equal(cs.items_per_node()[leaves], np.ones(len(unknown_sp)))
    assert cs.names[cs.item_node[3]].endswith("Corvidae|" + UNKNOWN_LEAF.format(item=3))
    assert cs.length[cs.item_node[3]] == W[5] + W[6]        # below the family: genus + species
    assert cs.length[cs.item_node[8]] == sum(W[1:])
    xus = cs.parent[cs.item_node[5]]                          # genus Xus hangs from the order
    assert cs.names[cs.parent[xus]] == "Animalia|Chordata|Aves|Passeriformes"
    assert cs.length[xus] == W[4] + W[5]
    i, j = np.triu_indices(tax.n_items, 1)
    assert np.allclose(cs.pair_distances(cs.item_node[i], cs.item_node[j]), cs.item_distances()[i, j])
    # placeholder mode on the same rows: the unknown pairs are at distance 0
    old = Taxonomy.from_frame(gap_frame()).clade_structure(W).item_distances()
    assert old[3, 4] == 0 and old[1, 2] == 0


def test_separate_ete3_tree_and_newick_match_the_clade_structure():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    t = tax.tree(W)
    assert len(t.get_leaves()) == tax.n_taxa("species") + int((~tax.known("species")).sum())
    priv = [n for n in t.get_leaves() if n.rank == "item"]
    assert sorted(n.name for n in priv) == sorted(UNKNOWN_LEAF.format(item=i) for i in [1, 2, 3, 4, 8, 10])
    assert all(n.n_items == 1 for n in priv)
    xus = [n for n in t.traverse() if n.name == "Xus" and n.up.name == "Passeriformes"][0]
    assert xus.rank == "genus" and xus.dist == W[4] + W[5] and xus.n_items == 2
    cs = tax.clade_structure(W)
    t2 = Tree(tax.to_newick(W), format=1)
    leaf_of_item = [str(n).rsplit(SEP, 1)[-1] for n in cs.names[cs.item_node]]
    cs2, mask = clade_structure_from_tree(t2, leaf_of_item)
    assert mask.all()
    assert np.allclose(cs2.item_distances(), cs.item_distances())


def test_separate_mantel_equals_the_explicit_matrix():
    tax = Taxonomy.from_frame(gap_frame(), unknown="separate")
    X = np.random.default_rng(0).normal(size=(tax.n_items, 6))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    i, j = np.triu_indices(tax.n_items, 1)
    d_embed = (1 - Xn @ Xn.T)[i, j]
    T = _brute_separate_distance(tax, W)
    r_explicit = np.corrcoef(d_embed, T[i, j])[0, 1]
    res = mantel_tree(X, tax.clade_structure(W), permutations=0)
    assert res.statistic == pytest.approx(r_explicit, abs=1e-10)
    # and it is not the placeholder tree's statistic
    T_old = Taxonomy.from_frame(gap_frame()).clade_structure(W).item_distances()
    assert abs(np.corrcoef(d_embed, T_old[i, j])[0, 1] - r_explicit) > 1e-3


def test_separate_mode_random_lineages_match_the_rank_definition():
    rng = np.random.default_rng(3)
    n = 60
    df = pd.DataFrame({r: [f"{r}{rng.integers(k)}" for _ in range(n)] for r, k in zip(RANKS, (2, 3, 3, 4, 4, 5, 6))})
    for r in RANKS[1:]:
        df.loc[rng.random(n) < 0.25, r] = rng.choice(["", "unknown", "NA", None], size=1)[0]
    tax = Taxonomy.from_frame(df, unknown="separate")
    cs = tax.clade_structure(W)
    assert np.allclose(cs.item_distances(), _brute_separate_distance(tax, W))
    assert np.allclose(cs.root_distance()[cs.item_node], sum(W))


# --- the real BioCLIP-2 set ---------------------------------------------------------------------

def test_bioclip2_incertae_sedis_kingdoms_unplaceable_and_unknown_counts():
    from treeprobe.datasets import BIOCLIP2_1K, bioclip2_1k

    raw = pd.read_parquet(BIOCLIP2_1K, columns=list(RANKS))
    inc = raw["kingdom"].astype("string").str.strip().str.lower().eq("incertae sedis").fillna(False).to_numpy()
    assert inc.sum() == 7
    placed = placeable_mask(raw)
    assert not placed[inc].any() and placed.sum() == 1030 - 121 - 7
    ds = bioclip2_1k()
    assert len(ds) == 902 and len(ds.skipped) == 128
    tax = Taxonomy.from_frame(ds.items, unknown="separate")
    summ = tax.rank_summary().set_index("rank")
    assert summ["n_unknown"].to_dict() == dict(kingdom=0, phylum=0, **{"class": 9}, order=20, family=4,
                                               genus=17, species=48)
    assert summ["n_taxa"].tolist() == [4, 14, 38, 134, 350, 727, 790]
    cs = tax.clade_structure()
    assert cs.n_nodes == 1 + summ["n_taxa"].sum() + 48
    assert np.allclose(cs.root_distance()[cs.item_node], len(RANKS))


# --- names and lineage conflicts ----------------------------------------------------------------

def test_names_normalised_in_every_taxonomy():
    """NFC, tabs / no-break / doubled spaces as one space, stripped: the same taxon as the clean name."""
    from treeprobe.taxonomy import normalise_name

    assert normalise_name("\tParus\u00a0 major ") == "Parus major"
    assert normalise_name("Abe\u0301lia") == "Ab\u00e9lia"
    df = pd.DataFrame([lineage("Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Parus", s)
                       for s in ("Parus major", "Parus  major", "Parus\u00a0major", " Parus\tmajor")])
    tax = Taxonomy.from_frame(df, unknown="separate")
    assert tax.n_taxa("species") == 1 and set(tax.lineages["species"]) == {"Parus major"}
    raw = clean_lineages(df, normalise=False)  # as given, for a caller that counts what changes
    assert raw["species"].tolist() == ["Parus major", "Parus  major", "Parus\u00a0major", " Parus\tmajor"]


def test_tidy_lineage_names_counts_case_variants_and_numbers():
    from treeprobe.taxonomy import tidy_lineage_names

    df = pd.DataFrame({"kingdom": ["Animalia"] * 5, "class": ["Aves", "aves", "Aves", "AVES", " aves"],
                       "genus": ["Parus", "Parus", "12", "Parus", None]})
    out, notes = tidy_lineage_names(df, ("kingdom", "class", "genus"))
    # once ' aves' is stripped, 'Aves' and 'aves' have 2 rows each: the tie goes to sort order, 'Aves'
    assert out["class"].tolist() == ["Aves"] * 5
    assert notes["n_normalised"] == 1
    assert notes["case_variants"] == [("class", "Aves", ["aves", "AVES"], 3)]
    assert notes["numeric"] == [("genus", "12", 1)]
    assert out["genus"].isna().tolist() == [False, False, False, False, True]  # missing left as it was
    assert df["class"].tolist()[1] == "aves"  # the input is not modified
    with pytest.raises(TreeprobeError, match=r"1 genus value\(s\) contain '\|'"):
        tidy_lineage_names(df.assign(genus=["A|B", "x", "y", "z", "w"]), ("kingdom", "class", "genus"))


def test_lineage_conflicts_match_the_networkx_graph_and_ignore_homonyms():
    from treeprobe.taxonomy import lineage_conflicts, lineage_graph

    rng = np.random.default_rng(5)
    df = pd.DataFrame({r: [f"{r[0]}{rng.integers(k)}" for _ in range(80)] for r, k in zip(RANKS, (2, 2, 3, 3, 4, 4, 6))})
    df.loc[rng.random(80) < 0.2, "family"] = "unknown"
    conf = lineage_conflicts(df)
    g = lineage_graph(df)
    multi = {n for n in g if g.in_degree(n) > 1}
    assert multi == set(zip(conf["kingdom"], conf["rank"], conf["name"])) and len(multi) > 5
    for (k, r, name), grp in conf.groupby(["kingdom", "rank", "name"]):
        parents = {p[2]: d["n_items"] for p, _, d in g.in_edges((k, r, name), data=True)}
        assert parents == dict(zip(grp["parent"], grp["n_items"]))
    # each genus appears under one family: no conflict at genus; Morus in two kingdoms: none either
    assert lineage_conflicts(small_frame()).empty
    assert list(lineage_conflicts(small_frame()).columns) == ["kingdom", "rank", "name", "parent_rank", "parent",
                                                              "n_items"]
