"""The report layer writes the numbers the analysis computed, rank by rank and column by column.

Each file a report folder holds (report.json, per_rank.csv, report.md, report.html; compare.json,
per_model.csv, differences.csv) is read back and compared with the in-memory tables, keyed by rank
(or metric / rank / model), so a writer that swaps two ranks, two columns or two models fails. The
data: a small simulated tree of life with two children per node at every rank (so every rank has a
different number of taxa and different scores), few permutations. Also: ``--rank-lengths`` through
the CLI gives the Python API's Mantel numbers and the hand-computed correlation; ``--seed`` drives
the t-SNE map bit for bit.
"""

import json
import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from treeprobe import tl
from treeprobe._utils import RANKS
from treeprobe.cli import main

# 2 kingdoms, 2 children per node at every rank: 2, 4, ..., 128 taxa; 1-2 images per species
BRANCHING = [2, 2, 2, 2, 2, 2]
INTRINSIC = dict(permutations=19, maps=(), cluster_methods=("kmeans",), chance_permutations=3, progress=False)
LENGTHS = [4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5]


def _world(seed=0):
    from treeprobe.simulate import simulate_world

    return simulate_world(n_kingdoms=2, branching=BRANCHING, images_per_species=(1, 2), dim=16, seed=seed)


@pytest.fixture(scope="module")
def world_file(tmp_path_factory):
    """(world, parquet path): the world's embeddings and lineages as an embeddings file."""
    w = _world()
    df = w.items.drop(columns=["path"]).copy()
    df["emb"] = list(w.embeddings)
    path = tmp_path_factory.mktemp("world") / "world.parquet"
    df.to_parquet(path)
    return w, str(path)


@pytest.fixture(scope="module")
def intrinsic_result(world_file, tmp_path_factory):
    """(TreeData after tl.intrinsic, report, folder written by write_report)."""
    from treeprobe.data import load_embeddings
    from treeprobe.report import write_report

    ds = load_embeddings(world_file[1])
    report = tl.intrinsic(ds, **INTRINSIC)
    out = tmp_path_factory.mktemp("rep") / "report"
    paths = write_report(report, out, figures=False)
    assert paths["json"] == str(out / "report.json")  # paths point to the final folder, not a temporary one
    return ds, report, out


# --- reading the files back ------------------------------------------------------------------------


def _same(a, b) -> bool:
    """Equal values, NaN / None / '' counting as the same missing value; numbers compared exactly."""
    miss = lambda v: v is None or (isinstance(v, float) and math.isnan(v)) or v == ""  # noqa: E731
    if miss(a) or miss(b):
        return miss(a) and miss(b)
    if isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool):
        return float(a) == float(b)
    return str(a) == str(b)


def _assert_rows(expected: pd.DataFrame, got: pd.DataFrame, key: list[str], columns=None):
    """Every column of ``expected`` (or ``columns``) equals ``got``'s, row by row matched on ``key``."""
    assert list(got[key].astype(str).itertuples(index=False)) == list(expected[key].astype(str).itertuples(index=False))
    for col in columns or [c for c in expected.columns if c not in key]:
        if col == "details":
            continue
        bad = [(tuple(k), e, g) for k, e, g in zip(expected[key].itertuples(index=False), expected[col], got[col])
               if not _same(e, g)]
        assert not bad, f"column {col}: {bad[:3]}"


def _json_frame(records) -> pd.DataFrame:
    return pd.DataFrame.from_records(records)


class _Tables(HTMLParser):
    """Every <table> of a page: caption → (header, rows); a number cell is its data-value (full precision)."""

    def __init__(self):
        super().__init__()
        self.tables, self._t, self._cell, self._caption = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._t = dict(caption="", header=[], rows=[])
        elif tag == "caption":
            self._caption = ""
        elif tag == "tr" and self._t is not None:
            self._row = []
        elif tag in ("td", "th") and self._t is not None:
            self._cell = dict(text="", value=a.get("data-value"), tag=tag)

    def handle_data(self, data):
        if self._caption is not None:
            self._caption += data
        elif self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "caption":
            self._t["caption"], self._caption = self._caption, None
        elif tag in ("td", "th") and self._cell is not None:
            c, self._cell = self._cell, None
            if c["tag"] == "th":
                self._t["header"].append(c["text"].strip())
            else:
                self._row.append(float(c["value"]) if c["value"] is not None else c["text"].strip())
        elif tag == "tr" and self._t is not None and self._row:
            self._t["rows"].append(self._row)
        elif tag == "table":
            self.tables[self._t["caption"]] = pd.DataFrame(self._t["rows"], columns=self._t["header"])
            self._t = None


def html_tables(path) -> dict[str, pd.DataFrame]:
    p = _Tables()
    p.feed(open(path, encoding="utf-8").read())
    return p.tables


def md_table(path, heading: str) -> pd.DataFrame:
    """The first Markdown table after ``## heading`` as text cells."""
    lines = open(path, encoding="utf-8").read().split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in ln.strip("|").split("|")])
    return pd.DataFrame(block[2:], columns=block[0])


def _printed_close(cell: str, value) -> bool:
    """Whether the Markdown cell shows ``value`` to its printed precision (3 decimals or 3 significant)."""
    if cell == "–":
        return value is None or (isinstance(value, float) and math.isnan(value))
    x = float(cell)
    return abs(x - float(value)) <= 5e-4 + 1e-9 + 5e-3 * abs(float(value)) * (abs(float(value)) < 1e-3)


# --- intrinsic report ----------------------------------------------------------------------------


def test_the_data_tell_ranks_apart(intrinsic_result):
    """Precondition of the checks below: every rank scores differently (beyond the printed digits),
    so a file that swaps two ranks cannot pass."""
    ds, _, _ = intrinsic_result
    for table, col in ((ds.uns["knn"], "agreement"), (ds.uns["knn"], "chance"), (ds.uns["clustering"], "nmi")):
        v = np.sort(table[col].to_numpy(float))
        assert len(v) == 7 and np.diff(v).min() > 2e-3, (col, v)


def test_report_json_headline_and_tables_rank_by_rank(intrinsic_result):
    ds, report, out = intrinsic_result
    rep = json.loads((out / "report.json").read_text())
    knn = ds.uns["knn"].set_index("rank")
    mantel = ds.uns["mantel"]
    expected = {f"knn_{r}_agreement_excess": knn.loc[r, "agreement_excess"] for r in RANKS}
    for _, row in mantel.iterrows():
        expected[f"mantel_{row['level']}_{row['method']}_r"] = row["statistic"]
        expected[f"mantel_{row['level']}_{row['method']}_p"] = row["p_value"]
    assert set(rep["headline"]) == set(expected)
    assert {k: v for k, v in rep["headline"].items()} == {k: float(v) for k, v in expected.items()}
    _assert_rows(ds.uns["knn"], _json_frame(rep["knn"]), ["rank"])
    _assert_rows(ds.uns["clustering"], _json_frame(rep["clustering"]), ["rank", "method"])
    _assert_rows(mantel, _json_frame(rep["mantel"]), ["level", "scheme", "method"])
    # taxa counts, against the lineages themselves (2 kingdoms, then twice as many taxa per rank)
    lineages = ds.items[list(RANKS)].astype(str)
    n_taxa = {r: lineages[list(RANKS[: i + 1])].drop_duplicates().shape[0] for i, r in enumerate(RANKS)}
    assert {r["rank"]: r["n_taxa"] for r in rep["rank_summary"]} == n_taxa == {r: 2 ** (i + 1) for i, r in
                                                                                enumerate(RANKS)}
    assert rep["provenance"]["n_items"] == len(ds) and rep["provenance"]["permutations"] == 19


def test_per_rank_csv_columns_rank_by_rank(intrinsic_result):
    ds, _, out = intrinsic_result
    csv = pd.read_csv(out / "per_rank.csv", float_precision="round_trip")
    assert csv["rank"].tolist() == list(RANKS)
    knn = ds.uns["knn"].set_index("rank").loc[list(RANKS)].reset_index()
    clus = ds.uns["clustering"].set_index("rank").loc[list(RANKS)].reset_index()
    knn_cols = [c for c in knn.columns if c != "rank"]
    clus_cols = [c for c in clus.columns if c not in ("rank", "method", "k", "n_items", "n_singleton_taxa")]
    _assert_rows(knn.rename(columns={c: f"knn_{c}" for c in knn_cols}), csv, ["rank"],
                 columns=[f"knn_{c}" for c in knn_cols])
    _assert_rows(clus.rename(columns={c: f"kmeans_{c}" for c in clus_cols}), csv, ["rank"],
                 columns=[f"kmeans_{c}" for c in clus_cols])
    assert csv["n_taxa"].tolist() == [2 ** (i + 1) for i in range(7)]


def test_markdown_tables_rank_by_rank(intrinsic_result):
    ds, _, out = intrinsic_result
    md = out / "report.md"
    knn = ds.uns["knn"].set_index("rank")
    table = md_table(md, "Nearest-neighbour rank agreement")
    assert table["rank"].tolist() == list(RANKS)
    for col in ("agreement", "chance", "ceiling", "agreement_normalised", "agreement_excess", "level_agreement",
                "top1", "n_evaluated"):
        for _, row in table.iterrows():
            assert _printed_close(row[col], knn.loc[row["rank"], col]), (col, row["rank"], row[col])
    clus = ds.uns["clustering"].set_index("rank")
    table = md_table(md, "Rank-wise clustering")
    assert table["rank"].tolist() == list(RANKS)
    for col in ("k", "purity", "purity_chance", "purity_excess", "nmi", "nmi_chance", "ami", "ari"):
        for _, row in table.iterrows():
            assert _printed_close(row[col], clus.loc[row["rank"], col]), (col, row["rank"], row[col])
    mantel = ds.uns["mantel"].set_index(["level", "method"])
    table = md_table(md, "Does embedding distance follow the tree? (Mantel)")
    assert len(table) == len(mantel) == 4
    for _, row in table.iterrows():
        assert _printed_close(row["statistic"], mantel.loc[(row["level"], row["method"]), "statistic"])
        assert _printed_close(row["p_value"], mantel.loc[(row["level"], row["method"]), "p_value"])


def test_html_tables_rank_by_rank(intrinsic_result):
    ds, report, out = intrinsic_result
    tables = html_tables(out / "report.html")
    knn = tables["kNN agreement"]
    _assert_rows(ds.uns["knn"][knn.columns], knn, ["rank"])
    assert len(knn.columns) >= 12
    clus = tables["Clustering"]
    _assert_rows(ds.uns["clustering"][clus.columns], clus, ["rank", "method"])
    per_rank = tables["Per rank"]
    _assert_rows(report.per_rank()[per_rank.columns], per_rank, ["rank"])
    assert {"knn_agreement", "kmeans_nmi", "n_taxa"} <= set(per_rank.columns)
    mantel = tables["Mantel tests"]
    _assert_rows(ds.uns["mantel"][mantel.columns], mantel, ["level", "scheme", "method"])
    head = tables["Headline numbers"]
    assert dict(zip(head["number"], head["value"])) == report.headline()


# --- comparison ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_result(tmp_path_factory):
    """Two models on the same items (the world's embeddings, and the same with noise added)."""
    from treeprobe import compare as cmp
    from treeprobe.compare_report import write_comparison
    from treeprobe.core import TreeData

    w = _world()
    items = w.items.assign(path=[f"img{i}.jpg" for i in range(w.n_items)])
    noise = np.random.default_rng(1).normal(scale=1.5, size=w.embeddings.shape).astype(np.float32)
    comp = cmp.compare({"good": TreeData(w.embeddings, items), "noisy": TreeData(w.embeddings + noise, items)},
                       seed=0, permutations=9, bootstrap=19, jackknife=3, cluster_methods=(), progress=False)
    out = tmp_path_factory.mktemp("cmp") / "compare"
    paths = write_comparison(comp, out, figures=False)
    assert paths["json"] == str(out / "compare.json")
    return comp, out


def test_compare_files_equal_the_tables_row_by_row(compare_result):
    comp, out = compare_result
    key_m, key_d = ["model", "metric", "rank"], ["metric", "rank", "model_a", "model_b"]
    obj = json.loads((out / "compare.json").read_text())
    assert obj["models"] == ["good", "noisy"]
    _assert_rows(comp.per_model, _json_frame(obj["per_model"]), key_m)
    _assert_rows(comp.differences, _json_frame(obj["differences"]), key_d)
    _assert_rows(comp.per_model, pd.read_csv(out / "per_model.csv", float_precision="round_trip"), key_m)
    _assert_rows(comp.differences, pd.read_csv(out / "differences.csv", float_precision="round_trip"), key_d)
    _assert_rows(comp.similarity, pd.read_csv(out / "similarity.csv", float_precision="round_trip"), ["model_a", "model_b", "rank"])
    html = html_tables(out / "report.html")
    cols = [c for c in html["Paired differences"].columns]
    _assert_rows(comp.differences[cols], html["Paired differences"], key_d)
    _assert_rows(comp.per_model, html["Per-model estimates"], key_m)
    # each model's own report folder holds that model's numbers, not the other's
    for name in ("good", "noisy"):
        rep = json.loads((out / "models" / name / "report.json").read_text())
        _assert_rows(comp.reports[name].knn, _json_frame(rep["knn"]), ["rank"])


def test_compare_rows_agree_across_tables(compare_result):
    """differences.csv: estimate_a / estimate_b are the per-model estimates of model_a / model_b (a
    swapped pair fails), difference = a - b; the per-model kNN rows are each model's own kNN table."""
    comp, out = compare_result
    per_model = pd.read_csv(out / "per_model.csv", float_precision="round_trip").set_index(["model", "metric", "rank"])
    diffs = pd.read_csv(out / "differences.csv", float_precision="round_trip")
    assert len(diffs) >= 2 * 7
    for _, d in diffs.iterrows():
        assert d["estimate_a"] == per_model.loc[(d["model_a"], d["metric"], d["rank"]), "estimate"]
        assert d["estimate_b"] == per_model.loc[(d["model_b"], d["metric"], d["rank"]), "estimate"]
        assert d["difference"] == pytest.approx(d["estimate_a"] - d["estimate_b"], abs=1e-15)
    for name in comp.models:
        knn = comp.reports[name].knn.set_index("rank")
        for r in RANKS:
            assert per_model.loc[(name, "knn agreement", r), "estimate"] == knn.loc[r, "agreement"]
    good = per_model.xs("knn agreement", level="metric").loc["good", "estimate"]
    noisy = per_model.xs("knn agreement", level="metric").loc["noisy", "estimate"]
    assert ((good - noisy).abs() > 0.005).all() and (good - noisy).mean() > 0.02  # a swapped pair is visible


# --- the command line reaches the analysis with the numbers asked for -----------------------------


def _pearson_between_species(w, lengths):
    """Image-level Mantel r by hand: cosine distance vs 2·Σ_{s ≥ first differing rank} w_s over the pairs
    of images of different species (the statistic of the default species permutation scheme)."""
    X = w.embeddings.astype(np.float64)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    i, j = np.triu_indices(len(U), k=1)
    anc = w.species_ancestors[w.item_species]
    shared = np.cumprod(anc[i] == anc[j], axis=1).sum(axis=1)
    tail = np.concatenate([np.cumsum(np.asarray(lengths, float)[::-1])[::-1], [0.0]])  # tail[k] = Σ_{s≥k} w_s
    t = 2 * tail[shared]
    d = 1 - np.einsum("ij,ij->i", U[i], U[j])
    keep = shared < 7
    return float(np.corrcoef(d[keep], t[keep])[0, 1])


def test_rank_lengths_through_the_cli_equal_the_python_api(world_file, tmp_path, capsys):
    from treeprobe.data import load_embeddings

    w, path = world_file
    out = tmp_path / "rl"
    args = ["intrinsic", "--embeddings", path, "--permutations", "19", "--maps", "none", "--cluster-methods",
            "none", "--quiet", "--no-figures", "--out", str(out)]
    assert main(args + ["--rank-lengths", ",".join(map(str, LENGTHS))]) == 0, capsys.readouterr().err
    cli = _json_frame(json.loads((out / "report.json").read_text())["mantel"])
    api = tl.intrinsic(load_embeddings(path), rank_lengths=LENGTHS, permutations=19, maps=(), cluster_methods=(),
                       progress=False).mantel
    _assert_rows(api[["level", "scheme", "method", "statistic", "p_value", "permutations", "n_pairs"]], cli,
                 ["level", "scheme", "method"])
    image = cli.set_index(["level", "method"]).loc[("image", "pearson"), "statistic"]
    by_hand, unit = _pearson_between_species(w, LENGTHS), _pearson_between_species(w, [1.0] * 7)
    assert abs(by_hand - unit) > 0.01  # the lengths matter for these data...
    assert image == pytest.approx(by_hand, abs=1e-9)  # ...and the CLI's r is the one with these lengths, in order
    assert f"rank lengths {LENGTHS}" in json.loads((out / "report.json").read_text())["provenance"]["tree"]["kind"]


@pytest.mark.parametrize("value, words", [("1,2,3", "7 values"), ("1,1,1,1,1,1,x", "comma-separated numbers"),
                                          ("1,1,1,1,1,-1,1", "non-negative"), ("1,1,1,1,1,1,inf", "finite")])
def test_bad_rank_lengths_are_one_line_before_any_work(world_file, tmp_path, capsys, value, words):
    out = tmp_path / "o"
    code = main(["intrinsic", "--embeddings", world_file[1], "--rank-lengths", value, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("treeprobe: error: --rank-lengths") and words in err[0]
    assert not out.exists()


def test_seed_drives_the_tsne_map_bit_for_bit(world_file, tmp_path, capsys):
    from treeprobe.data import load_embeddings

    _, path = world_file
    out = tmp_path / "ts"
    assert main(["intrinsic", "--embeddings", path, "--permutations", "0", "--maps", "tsne", "--cluster-methods",
                 "none", "--no-centroids", "--quiet", "--no-figures", "--seed", "3", "--out", str(out)]) == 0
    items = pd.read_csv(out / "items.csv", float_precision="round_trip")
    cli = items[["tsne_1", "tsne_2"]].to_numpy(np.float64).astype(np.float32)
    ds = load_embeddings(path)
    same = tl.tsne(ds, seed=3)
    other = tl.tsne(ds, seed=4)
    assert same.dtype == np.float32 and np.isfinite(same).all()
    np.testing.assert_array_equal(cli, same)  # the CLI's seed reached the map, and the map is reproducible
    assert np.abs(other - same).max() > 0.1  # another seed, another map
    rep = json.loads((out / "report.json").read_text())
    assert rep["provenance"]["seed"] == 3 and {m["p_value"] for m in rep["mantel"]} == {None}  # 0 permutations
