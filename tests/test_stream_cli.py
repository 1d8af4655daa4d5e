"""``treeprobe intrinsic --embeddings FOLDER|GLOB`` (streamed): the report's exact numbers equal the statistics'
tests and the in-memory analysis of all rows; its sampled numbers equal the tools run on the pass's sample.

References: :func:`treeprobe.stream.mantel_from_stats` / :func:`~treeprobe.stream.physignal_from_stats` on a
separate pass, ``tl.mantel`` / ``tl.physignal`` / ``Taxonomy.rank_summary`` on every row loaded in memory, and
``tl.knn`` / ``tl.clustering`` on ``stats.sample_data()``.
"""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from treeprobe import stream, tl
from treeprobe.cli import main
from treeprobe.data import load_embeddings
from treeprobe.datasets import BIOCLIP2_1K
from treeprobe.report import STREAM_SECTION
from treeprobe.stream import NOT_FROM_STATS, mantel_from_stats, physignal_from_stats, species_statistics
from treeprobe.taxonomy import RANKS

from tests.test_cli import load_report as _report, run as _run
from tests.test_stream import _sorted, _split_inside_species, _write_shards

TOL = 1e-12
PERM = 49
SAMPLE = 600
OPTS = ["--permutations", str(PERM), "--cluster-methods", "kmeans", "--quiet", "--no-figures"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A simulated world sorted by taxonomy (8-d list<float32>, 1-20 images per species, 15 rows unknown at
    species, a null and a zero embedding), 4 shards cut inside species in one folder, and the whole file."""
    from treeprobe.simulate import simulate_world

    w = simulate_world(n_kingdoms=2, branching=[2, 2, 2, 2, 2, (2, 4)], images_per_species=(1, 20), dim=8, seed=7)
    items = w.items[list(RANKS)].copy()
    rng = np.random.default_rng(1)
    items.loc[rng.choice(len(items), 15, replace=False), "species"] = ""
    items["img_type"] = rng.choice(["museum", "citizen"], len(items))
    items["year"] = rng.integers(1900, 2020, len(items))
    X = w.embeddings.astype(np.float32)
    X[3] = 0
    emb = [list(map(float, x)) for x in X]
    emb[10] = None
    table = _sorted(pa.Table.from_pandas(items, preserve_index=False).append_column(
        "emb", pa.array(emb, type=pa.list_(pa.float32()))))
    root = tmp_path_factory.mktemp("stream_cli")
    whole = str(root / "all.parquet")
    pq.write_table(table, whole, row_group_size=128)
    folder = root / "shards"
    folder.mkdir()
    _write_shards(table, folder, _split_inside_species(table, 4), row_group_size=128)
    return dict(whole=whole, folder=str(folder), glob=str(folder / "part*.parquet"), ds=load_embeddings(whole),
                root=root)


@pytest.fixture(scope="module")
def folder_run(world, tmp_path_factory):
    """The CLI on the folder with --phylo (one run shared by the tests)."""
    out = str(tmp_path_factory.mktemp("out") / "rep")
    assert main(["intrinsic", "--embeddings", world["folder"], "--out", out, "--sample", str(SAMPLE), "--phylo",
                 "--maps", "none", "--tree-levels", "genus", *OPTS]) == 0
    return out


@pytest.fixture(scope="module")
def stats(world):
    return species_statistics(world["folder"], gram=True, sample=SAMPLE, sample_seed=0, progress=False)


def _mantel(rep) -> pd.DataFrame:
    return pd.DataFrame(rep["mantel"])


def _check_exact_rows(got: pd.DataFrame, ref: pd.DataFrame, rows) -> None:
    for level, method in rows:
        g = got[(got.level == level) & (got.method == method)].iloc[0]
        r = ref[(ref.level == level) & (ref.method == method)].iloc[0]
        assert abs(g.statistic - r.statistic) < TOL, (level, method)
        assert g.p_value == r.p_value and g.n_items == r.n_items and g.n_pairs == r.n_pairs, (level, method)


EXACT_ROWS = [("image", "pearson"), ("species-centroid", "pearson"), ("species-centroid", "spearman")]


def test_mantel_rows_equal_the_statistics_and_the_in_memory_analysis(world, folder_run, stats):
    rep = _report(folder_run)
    got = _mantel(rep)
    assert list(zip(got.level, got.method)) == [("image", "pearson"), ("image", "spearman"),
                                                 ("species-centroid", "pearson"), ("species-centroid", "spearman")]
    ref_stats = mantel_from_stats(stats, methods=("pearson", "spearman"), permutations=PERM, seed=0)
    _check_exact_rows(got, ref_stats, EXACT_ROWS)
    ref_mem = tl.mantel(world["ds"], permutations=PERM, seed=0)  # every row in memory, the same seeds
    _check_exact_rows(got, ref_mem, EXACT_ROWS)
    assert 0.05 < got.statistic[0] and got.p_value[0] == pytest.approx(1 / (PERM + 1))  # a real signal
    spear = rep["mantel"][1]
    assert spear["estimator"] == NOT_FROM_STATS and spear["statistic"] is None  # marked, not a number
    assert rep["provenance"]["n_items"] == len(world["ds"]) == stats.n_items


def test_kmult_and_rank_table_are_exact(world, folder_run, stats):
    rep = _report(folder_run)
    k = rep["phylo"]["physignal"][0]
    ref = physignal_from_stats(stats, permutations=PERM, seed=0)
    mem = tl.physignal(world["ds"], permutations=PERM, seed=0)
    assert abs(k["statistic"] - ref.statistic) < TOL and abs(k["statistic"] - mem.statistic) < 1e-10
    assert k["p_value"] == ref.p_value == mem.p_value
    pd.testing.assert_frame_equal(pd.DataFrame(rep["rank_summary"]), world["ds"].taxonomy.rank_summary(),
                                  check_dtype=False)
    assert rep["provenance"]["n_taxa"]["species"] == world["ds"].taxonomy.n_taxa("species")


def test_knn_and_clustering_rows_are_the_tools_on_the_sample(world, folder_run, stats):
    rep = _report(folder_run)
    sample = stats.sample_data()
    assert len(sample) == SAMPLE < stats.n_items
    knn = tl.knn(sample, k=10, seed=0)
    got = pd.DataFrame(rep["knn"])
    np.testing.assert_allclose(got.agreement, knn.agreement, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.chance, knn.chance, rtol=0, atol=1e-15)
    assert list(got.n_evaluated) == list(knn.n_evaluated)
    cl = tl.clustering(sample, methods=("kmeans",), seed=0)
    got = pd.DataFrame(rep["clustering"])
    for col in ("purity", "nmi", "ami", "ari", "purity_chance"):
        np.testing.assert_allclose(got[col].astype(float), cl[col].astype(float), rtol=0, atol=1e-15)
    items = pd.read_csv(os.path.join(folder_run, "items.csv"), keep_default_na=False)
    assert len(items) == SAMPLE and (items.source_row.to_numpy() == stats.sample_items().source_row).all()
    # the sample differs from all rows: kNN on everything gives other numbers
    assert abs(tl.knn(world["ds"], seed=0).agreement.iloc[-1] - knn.agreement.iloc[-1]) > 0.01


def test_glob_gives_the_folder_report(world, folder_run, tmp_path, capsys):
    out = str(tmp_path / "g")
    code, stdout, err = _run(["intrinsic", "--embeddings", world["glob"], "--out", out, "--sample", str(SAMPLE),
                              "--maps", "none", *OPTS], capsys)
    assert code == 0, err
    assert "streamed" in stdout and "exact over" in stdout
    a, b = _report(folder_run), _report(out)
    assert a["mantel"] == b["mantel"] and a["knn"] == b["knn"]
    assert b["provenance"]["stream"]["n_files"] == 4


def test_report_states_exact_and_sampled(world, folder_run):
    rep = _report(folder_run)
    st = rep["provenance"]["stream"]
    ds = world["ds"]
    n_rows = pq.ParquetFile(world["whole"]).metadata.num_rows
    assert st["n_rows"] == n_rows and st["n_filtered_by_where"] == 0 and st["engine"] == "local"
    assert st["n_set_aside_by_reason"] == ds.skipped.reason.value_counts().to_dict()
    assert st["n_set_aside"] == n_rows - len(ds) == 2
    assert st["n_items"] == len(ds)
    assert st["n_species"] == ds.taxonomy.n_taxa("species") and st["n_single_item_units"] == 15
    smp = st["sample"]
    assert smp["size"] == smp["n_sampled"] == SAMPLE and smp["seed"] == 0 and smp["rule"] == stream.SAMPLE_RULE
    assert st["exact_sentence"].startswith("species statistics") and "kNN" in st["from_sample_sentence"]
    assert "Mantel image pearson (species permuted)" in st["exact"] and any("K_mult" in e for e in st["exact"])
    assert "kNN agreement" in st["from_sample"] and "tree recovery" in st["from_sample"]
    assert st["not_computed"][0]["rows"] == ["Mantel image spearman (species permuted)"]
    assert st["pass_seconds"] > 0 and st["rows_per_second"] == pytest.approx(n_rows / st["pass_seconds"])
    md = open(os.path.join(folder_run, "report.md")).read()
    head = md[:md.index("## How to read")]  # near the top, before everything else
    assert f"## {STREAM_SECTION}" in head and f"**Exact over all {len(ds):,} items**" in head
    assert f"**From the stratified sample** of {SAMPLE:,} items" in head and "**Not computed**" in head
    assert f"{n_rows:,} rows read" in head and "missing embedding: 1" in head
    html = open(os.path.join(folder_run, "report.html")).read()
    assert STREAM_SECTION in html and "From the stratified sample" in html


def test_where_gives_the_numbers_of_the_filtered_rows(world, tmp_path, capsys):
    ds = world["ds"]
    kingdom = ds.items.kingdom.iloc[-1]
    sub = ds[kingdom]
    out = str(tmp_path / "w")
    code, _, err = _run(["intrinsic", "--embeddings", world["folder"], "--out", out, "--where",
                         f"kingdom={kingdom.lower()}", "--sample", "200", "--maps", "none", *OPTS], capsys)
    assert code == 0, err
    rep = _report(out)
    got = _mantel(rep)
    _check_exact_rows(got, tl.mantel(sub, permutations=PERM, seed=0), EXACT_ROWS)
    full = _mantel(_report_of_folder(world, tmp_path, capsys))
    assert abs(got.statistic[0] - full.statistic[0]) > 1e-3  # the filter changed the numbers
    st = rep["provenance"]["stream"]
    kingdoms = pq.read_table(world["whole"], columns=["kingdom"]).column("kingdom").to_pylist()
    assert st["n_items"] == len(sub) and st["n_filtered_by_where"] == sum(k != kingdom for k in kingdoms) > 0
    assert st["where"] == {"kingdom": [kingdom.lower()]}
    pd.testing.assert_frame_equal(pd.DataFrame(rep["rank_summary"]), sub.taxonomy.rank_summary(), check_dtype=False)
    knn = tl.knn(species_statistics(world["folder"], where={"kingdom": kingdom}, sample=200, progress=False)
                 .sample_data(), seed=0)
    np.testing.assert_allclose(pd.DataFrame(rep["knn"]).agreement, knn.agreement, rtol=0, atol=1e-15)


def _report_of_folder(world, tmp_path, capsys):
    out = str(tmp_path / "full")
    assert _run(["intrinsic", "--embeddings", world["folder"], "--out", out, "--sample", "200", "--maps", "none",
                 "--cluster-methods", "none", "--permutations", str(PERM), "--quiet", "--no-figures"],
                capsys)[0] == 0
    return _report(out)


def test_single_file_with_stream_and_without(world, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert _run(["intrinsic", "--embeddings", world["whole"], "--stream", "--out", out, "--sample", "300",
                 "--maps", "none", *OPTS], capsys)[0] == 0
    got = _mantel(_report(out))
    _check_exact_rows(got, tl.mantel(world["ds"], permutations=PERM, seed=0), EXACT_ROWS)
    # without --stream: the in-memory path as before (every row computed, no stream provenance)
    out2 = str(tmp_path / "m")
    assert _run(["intrinsic", "--embeddings", world["whole"], "--out", out2, "--maps", "none", *OPTS], capsys)[0] == 0
    rep = _report(out2)
    assert "stream" not in rep["provenance"] and STREAM_SECTION not in open(os.path.join(out2, "report.md")).read()
    mem = _mantel(rep)
    assert mem.statistic.notna().all() and mem.permutations.tolist() == [PERM] * 4
    _check_exact_rows(got, mem, EXACT_ROWS)


def test_unsorted_rows_mark_the_image_level_instead_of_failing(tmp_path, capsys):
    """The bundled example is a random sample: species rows are scattered, the centroid level still exact."""
    out = str(tmp_path / "u")
    code, stdout, err = _run(["intrinsic", "--embeddings", str(BIOCLIP2_1K), "--stream", "--out", out, "--sample",
                              "300", "--maps", "none", "--cluster-methods", "none", "--permutations", "19",
                              "--quiet", "--no-figures"], capsys)
    assert code == 0, err
    got = _mantel(_report(out))
    img = got[got.level == "image"]
    assert (img.estimator == NOT_FROM_STATS).all() and "not contiguous" in img.details.iloc[0]["reason"]
    ref = tl.mantel(load_embeddings(BIOCLIP2_1K), permutations=19, seed=0)
    _check_exact_rows(got, ref, [("species-centroid", "pearson"), ("species-centroid", "spearman")])
    assert "not computed" in stdout


def test_control_row_is_the_in_memory_partial_mantel_and_its_column_kept(world, tmp_path, capsys):
    out = str(tmp_path / "c")
    assert _run(["intrinsic", "--embeddings", world["folder"], "--out", out, "--sample", "200", "--control",
                 "img_type", "--maps", "none", "--cluster-methods", "none", "--permutations", "19", "--quiet",
                 "--no-figures"], capsys)[0] == 0
    rep = _report(out)
    row = rep["mantel"][-1]
    ref = tl.mantel(load_embeddings(world["whole"]), control="img_type", permutations=19, seed=0).iloc[-1]
    assert row["level"] == ref.level == "image | img_type" and row["estimator"] == "exact"
    for key in ("statistic", "r_dt", "r_dz", "r_tz"):
        assert row[key] == pytest.approx(ref[key], abs=1e-12)
    assert (row["p_value"], row["n_pairs"], row["scheme"]) == (ref.p_value, ref.n_pairs, ref.scheme)
    assert row["details"]["mantel_p_value"] == ref.details["mantel_p_value"]
    assert any("img_type" in e for e in rep["provenance"]["stream"]["exact"])
    assert "img_type" in pd.read_csv(os.path.join(out, "items.csv")).columns


def test_numeric_control_row_is_marked_not_computed(world, tmp_path, capsys):
    out = str(tmp_path / "n")
    assert _run(["intrinsic", "--embeddings", world["folder"], "--out", out, "--sample", "200", "--control",
                 "year", "--maps", "none", "--cluster-methods", "none", "--permutations", "9", "--quiet",
                 "--no-figures"], capsys)[0] == 0
    row = _report(out)["mantel"][-1]
    assert row["level"] == "image | year" and row["estimator"] == NOT_FROM_STATS and row["statistic"] is None
    assert row["details"]["reason"] == stream.PARTIAL_NUMERIC


@pytest.mark.parametrize("args, message", [
    (["--embeddings", "{empty}"], "no .parquet files in folder"),
    (["--embeddings", "{root}/nothing*.parquet"], "no files match"),
    (["--embeddings", "{folder}", "--where", "kingdom"], "expected COLUMN=VALUE"),
    (["--embeddings", "{folder}", "--where", "kingdom=A", "--where", "kingdom=B"], "twice"),
    (["--embeddings", "{folder}", "--where", "no_such_column=x"], "no column 'no_such_column'"),
    (["--embeddings", "{folder}", "--sample", "0"], "--sample must be positive"),
    (["--embeddings", "{whole}", "--sample", "10"], "need streamed embeddings"),
    (["--embeddings", "{folder}", "--tree", "t.nwk"], "--tree cannot be used"),
    (["--embeddings", "{folder}", "--scheduler", "tcp://x:1"], "--scheduler needs --engine dask"),
])
def test_bad_inputs_are_one_line_errors(world, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    fill = dict(empty=str(empty), root=str(world["root"]), folder=world["folder"], whole=world["whole"])
    argv = ["intrinsic", *[a.format(**fill) for a in args], "--out", str(tmp_path / "o"), "--quiet"]
    code, stdout, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("treeprobe: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_dask_engine_gives_the_local_numbers(world, folder_run, tmp_path, capsys):
    pytest.importorskip("distributed")
    out = str(tmp_path / "d")
    code, _, err = _run(["intrinsic", "--embeddings", world["folder"], "--engine", "dask", "--out", out,
                         "--sample", str(SAMPLE), "--maps", "none", "--cluster-methods", "none", "--permutations",
                         str(PERM), "--quiet", "--no-figures"], capsys)
    assert code == 0, err
    rep = _report(out)
    _check_exact_rows(_mantel(rep), _mantel(_report(folder_run)), EXACT_ROWS)
    assert rep["knn"] == _report(folder_run)["knn"]  # the same sample, bit for bit
    assert rep["provenance"]["stream"]["engine"] == "dask"


def test_tree_recovery_on_a_stated_leaf_subset_above_max_tree_leaves(stats):
    """Above max_tree_leaves species-level leaves the tree is built on the items of a seeded uniform subset of
    that many leaves: the report's tree-recovery numbers are tl.tree_recovery's on exactly that subset."""
    kw = dict(phylo=True, maps=(), cluster_methods=(), permutations=9, tree_levels=("species",), progress=False,
              seed=2, mantel_methods=("pearson",), centroid_level=False, chance_permutations=0)
    rep = stream.intrinsic_from_stats(stats, max_tree_leaves=25, **kw)
    ds = stats.sample_data()
    leaf = np.unique(ds.taxonomy.clade_structure().item_node, return_inverse=True)[1].ravel()
    chosen = np.random.default_rng([2, 14]).choice(leaf.max() + 1, 25, replace=False)
    ref = tl.tree_recovery(ds.subset(np.isin(leaf, chosen)), levels=("species",), permutations=9, seed=2)
    got = rep.results["tree_recovery"]
    assert got.summary.n_leaves.iloc[0] == 25 < leaf.max() + 1
    pd.testing.assert_frame_equal(got.summary, ref.summary)
    assert got.params["leaf_subset"]["n_kept"] == 25
    note = rep.provenance["stream"]["tree_leaf_subset"]
    assert (note["n_leaves"], note["n_kept"], note["n_items"]) == (leaf.max() + 1, 25, int(np.isin(leaf, chosen).sum()))
    assert any(x.startswith("tree recovery (tree recovery on the") for x in rep.provenance["stream"]["from_sample"])
    whole = stream.intrinsic_from_stats(stats, max_tree_leaves=None, **kw)
    assert whole.results["tree_recovery"].summary.n_leaves.iloc[0] == leaf.max() + 1
    assert "tree_leaf_subset" not in whole.provenance["stream"]
