"""The tree-level analyses in the intrinsic report (``tl.intrinsic(phylo=True)``, ``treeprobe intrinsic
--phylo``): the report carries exactly the numbers of the tools run on their own, writes the recovered
trees, renders every section, and reads back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import treeprobe as tp
from treeprobe.cli import covariate_levels, main
from treeprobe.errors import TreeprobeError
from treeprobe.report import load_report, write_report

FAST = dict(permutations=19, maps=(), cluster_methods=("agglomerative",), progress=False, centroid_level=False,
            mantel_methods=("pearson",))
LEVELS = ("Citizen Science", "Museum Specimen*")


@pytest.fixture(scope="module")
def small():
    """The BioCLIP-2 items with their img_type column (5 species have citizen-science and museum images)
    and a species covariate: the share of each species' images that are museum specimens."""
    ds = tp.datasets.bioclip2_1k()
    museum = ds.items["img_type"].str.startswith("Museum")
    ds.items["museum_share"] = museum.groupby(ds.items["species"]).transform("mean").to_numpy()
    return ds


@pytest.fixture(scope="module")
def phylo_report(small):
    data = small.copy()
    report = tp.tl.intrinsic(data, **FAST, phylo=True, tree_levels=("species", "genus"), covariate="img_type",
                             covariate_levels=LEVELS, species_covariates="museum_share", seed=3)
    return data, report


def test_report_numbers_are_the_tools_numbers(small, phylo_report):
    """Each table equals the tool run on its own with the same seed and permutations (a wrong seed,
    permutation count, level or covariate passed through would change them)."""
    _, report = phylo_report
    d = small.copy()
    k = tp.tl.physignal(d, permutations=19, seed=3)
    t = tp.tl.tree_recovery(d, levels=("species", "genus"), permutations=19, seed=3)
    v = tp.tl.within_species_variation(d, covariate="img_type", levels=LEVELS, permutations=19, seed=3)
    ph = report.phylo
    assert ph["physignal"]["statistic"].iloc[0] == k.statistic and ph["physignal"]["p_value"].iloc[0] == k.p_value
    assert ph["physignal"]["permutations"].iloc[0] == 19
    pd.testing.assert_frame_equal(ph["physignal_axes"].reset_index(drop=True), k.per_axis.reset_index(drop=True))
    cols = ["level", "cophenetic_r", "cophenetic_r_p", "nrf", "nrf_p", "split_recall"]
    pd.testing.assert_frame_equal(ph["tree_recovery"][cols], t.summary[cols])
    assert np.allclose(ph["tree_recovery_ranks"]["monophyly_p"], t.ranks["monophyly_p"])
    assert ph["within_species_variation"]["p_norm"].iloc[0] == v.summary["p_norm"]
    assert ph["within_species_variation"]["shift_angle_deg"].iloc[0] == v.summary["shift_angle_deg"]
    c = tp.tl.covariate_alignment(d, "museum_share", permutations=19, seed=3)
    pd.testing.assert_frame_equal(ph["covariate_alignment"][["statistic", "r", "p_value"]],
                                  c.table[["statistic", "r", "p_value"]])
    head = report.headline()
    assert head["covariate_partial_r"] == c.r and head["covariate_partial_p"] == c.p_value
    assert head["physignal_K"] == k.statistic and head["tree_genus_cophenetic_r"] == t.summary["cophenetic_r"].iloc[1]
    assert head["variation_p_angle"] == v.summary["p_angle"]
    assert set(report.trees) == {"species_upgma", "genus_upgma"}
    assert report.trees["genus_upgma"] == t.tree("genus").to_newick()


def test_covariate_level_patterns_are_the_values_they_match(phylo_report, small):
    """'Museum Specimen*' stands for every museum level; the summary names the values, not the pattern."""
    _, report = phylo_report
    levels = report.phylo["within_species_variation"]["levels"].iloc[0]
    museum = sorted(v for v in small.items["img_type"].unique() if v.startswith("Museum Specimen"))
    assert levels == "Citizen Science; " + " | ".join(museum)
    explicit = tp.tl.within_species_variation(small.copy(), covariate="img_type",
                                              levels=("Citizen Science", museum), permutations=19, seed=3)
    assert explicit.summary["p_norm"] == report.phylo["within_species_variation"]["p_norm"].iloc[0]


def test_without_phylo_the_report_has_no_tree_sections(small):
    report = tp.tl.intrinsic(small.copy(), **FAST)
    assert report.phylo == {} and report.trees == {} and "phylo" not in report.to_dict()
    assert "physignal_K" not in report.headline()


def test_written_report_carries_and_reads_back_the_tree_level_sections(phylo_report, tmp_path):
    _, report = phylo_report
    paths = write_report(report, tmp_path / "rep")
    out = tmp_path / "rep"
    rep = json.loads((out / "report.json").read_text())
    assert rep["phylo"]["physignal"][0]["statistic"] == report.phylo["physignal"]["statistic"].iloc[0]
    assert len(rep["phylo"]["tree_recovery_ranks"]) == len(report.phylo["tree_recovery_ranks"])
    assert rep["headline"]["tree_species_nrf"] == report.phylo["tree_recovery"]["nrf"].iloc[0]
    # the Newick files are the recovered trees, readable by ete3 with every leaf
    from ete3 import Tree

    text = (out / "trees" / "species_upgma.nwk").read_text().strip()
    assert text == report.trees["species_upgma"] and paths["tree:species_upgma"].endswith("species_upgma.nwk")
    assert len(Tree(text, format=1).get_leaves()) == report.phylo["tree_recovery"]["n_leaves"].iloc[0]
    for name in ("physignal", "tree_recovery_species", "within_species_variation", "covariate_alignment"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    for title in ("## Phylogenetic signal (K_mult)", "## Tree recovered from the embeddings",
                  "## Within- vs between-species variation", "## Covariate alignment"):
        assert title in md
    # the covariate levels joined by '|' are escaped, so the variation table keeps its column count
    table = md.split("## Within- vs between-species variation")[1].split("\n\n")[2].splitlines()
    assert len(table) == 3 and "\\|" in table[2]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1
    html = (out / "report.html").read_text()
    assert "Tree recovered from the embeddings" in html and "K_mult against its permutation null" in html
    back = load_report(out)
    assert set(back.phylo) == set(report.phylo) and back.trees == report.trees
    assert back.headline()["physignal_K"] == pytest.approx(report.headline()["physignal_K"], rel=1e-15)
    pd.testing.assert_frame_equal(back.phylo["tree_recovery_ranks"], report.phylo["tree_recovery_ranks"],
                                  check_dtype=False)


def test_md_table_keeps_integer_columns_integers():
    """An all-numeric table (e.g. K per axis) prints its integer columns as integers (iterrows would turn
    the whole row into floats: axis '1.000')."""
    from treeprobe.report import _md_table

    text = _md_table(pd.DataFrame({"axis": [1, 2], "K": [0.5, 0.25]}), ["axis", "K"])
    assert text.splitlines()[2] == "| 1 | 0.500 |"


def test_cli_covariate_levels_parsing():
    assert covariate_levels("A;B1|B2") == (["A"], ["B1", "B2"])
    assert covariate_levels(" Citizen Science ; Museum Specimen* ") == (["Citizen Science"], ["Museum Specimen*"])
    assert covariate_levels(None) is None
    for bad in ("A", "A;B;C", "A;", ";B"):
        with pytest.raises(TreeprobeError, match="two levels separated by ';'"):
            covariate_levels(bad)


def test_cli_phylo_writes_the_sections(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["intrinsic", "--example", "bioclip2-1k", "--permutations", "9", "--maps", "none",
               "--cluster-methods", "agglomerative", "--no-centroids", "--phylo", "--tree-levels", "genus",
               "--covariate", "img_type", "--covariate-levels", "Citizen Science;Museum Specimen*",
               "--out", str(out), "--quiet", "--no-figures"])
    assert rc == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    k = rep["phylo"]["physignal"][0]
    assert f"K_mult = {k['statistic']:.4f}" in printed and "recovered tree (genus)" in printed
    assert [r["level"] for r in rep["phylo"]["tree_recovery"]] == ["genus"]
    assert rep["phylo"]["within_species_variation"][0]["covariate"] == "img_type"
    assert (out / "trees" / "genus_upgma.nwk").exists()


def test_cli_bad_tree_level_fails_before_the_analysis(tmp_path, capsys):
    rc = main(["intrinsic", "--example", "bioclip2-1k", "--phylo", "--tree-levels", "species,clade",
               "--out", str(tmp_path / "rep"), "--quiet"])
    assert rc == 2
    assert "unknown tree-recovery level 'clade'" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()
