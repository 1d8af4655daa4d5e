"""The `treeprobe` command end to end: real data, the demo, and bad inputs (one line, exit 2)."""

from tests._paths import SHARED_DATA
import json
import os

import numpy as np
import pandas as pd
import pytest

from treeprobe.cli import main

SHARED = str(SHARED_DATA)
PARQUET = os.path.join(SHARED, "tol200m_bioclip2_embeddings_1k", "example_1k.parquet")
PHOTOS = os.path.join(SHARED, "multikingdom_photos_index", "metadata.csv")
FAST = ["--permutations", "49", "--maps", "none", "--cluster-methods", "kmeans", "--quiet"]
NO_CLUSTERING = ["--permutations", "49", "--maps", "none", "--cluster-methods", "none", "--quiet"]  # tests of other parts


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def load_report(out):
    with open(os.path.join(out, "report.json")) as fh:
        return json.load(fh)


def check_complete(rep, n_items, *, signal=True):
    """Every section present, every number finite, counts consistent; with ``signal`` (real embeddings),
    every Mantel r and kNN agreement clearly above chance."""
    assert rep["provenance"]["n_items"] == n_items
    assert {m["level"] for m in rep["mantel"]} == {"image", "species-centroid"}
    for m in rep["mantel"]:
        assert np.isfinite(m["statistic"]) and 0 < m["n_items"] <= n_items
        if signal:  # real embeddings follow the tree: r > 0, and no permutation reached it (p = 1/(B + 1))
            assert m["statistic"] > 0.05 and m["p_value"] == pytest.approx(1 / (m["permutations"] + 1), rel=1e-12)
    ranks = [r["rank"] for r in rep["knn"]]
    assert ranks == ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
    for row in rep["knn"]:
        # above chance at every rank, never above the ceiling; excess = (agreement - chance) / (1 - chance)
        assert row["agreement"] <= row["ceiling"] + 1e-12 and (not signal or row["chance"] + 0.05 < row["agreement"])
        assert row["agreement_excess"] == pytest.approx((row["agreement"] - row["chance"]) / (1 - row["chance"]),
                                                        abs=1e-12)
    assert rep["headline"]["knn_kingdom_agreement_excess"] == rep["knn"][0]["agreement_excess"]
    for row in rep["clustering"]:
        if not row.get("note"):
            assert all(row[k] is not None and np.isfinite(row[k]) for k in ("purity", "nmi", "ami", "ari"))
    assert rep["provenance"]["versions"]["numpy"]
    assert rep["provenance"]["seed"] == 0


def test_real_bioclip2_embeddings_full_report(tmp_path, capsys):
    out = str(tmp_path / "bc2")
    # Ward: k-means on these items costs 22 s here and runs in test_runs_anywhere (the README's command)
    code, stdout, err = run(["intrinsic", "--embeddings", PARQUET, "--out", out, "--permutations", "99",
                             "--maps", "tsne", "--cluster-methods", "agglomerative", "--quiet"], capsys)
    assert code == 0, err
    rep = load_report(out)
    # 1,030 rows, 121 without any taxonomy and 7 of kingdom "incertae sedis": skipped and listed, never dropped silently
    check_complete(rep, 902)
    assert rep["skipped"]["count"] == 128
    assert all(s["reason"].startswith("no taxonomy") for s in rep["skipped"]["items"])
    img = {m["method"]: m for m in rep["mantel"] if m["level"] == "image"}
    assert img["pearson"]["statistic"] > 0.05 and img["pearson"]["p_value"] <= 0.01
    knn = {r["rank"]: r for r in rep["knn"]}
    assert knn["kingdom"]["agreement"] > knn["kingdom"]["chance"] + 0.3  # real BioCLIP-2 separates kingdoms
    assert rep["provenance"]["n_taxa"]["kingdom"] == 4
    per_rank = pd.read_csv(os.path.join(out, "per_rank.csv"))
    assert len(per_rank) == 7 and "knn_agreement" in per_rank.columns
    md = open(os.path.join(out, "report.md")).read()
    assert "Mantel" in md and "figures/tsne_by_rank.png" in md
    assert os.path.getsize(os.path.join(out, "figures", "tsne_by_rank.pdf")) > 0
    assert "items analysed: 902" in stdout


def test_same_seed_same_numbers(tmp_path, capsys):
    # the first 300 rows (k-means at k up to ~250 instead of ~800: 5x faster), t-SNE included
    sub = str(tmp_path / "sub.parquet")
    pd.read_parquet(PARQUET).head(300).to_parquet(sub)
    fast = [*FAST[:2], "--maps", "tsne", *FAST[4:]]
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")
    for out, seed in ((a, "0"), (b, "0"), (c, "1")):
        assert run(["intrinsic", "--embeddings", sub, "--out", out, *fast, "--seed", seed, "--no-figures"],
                   capsys)[0] == 0
    ra, rb, rc = load_report(a), load_report(b), load_report(c)
    for key in ("mantel", "clustering", "knn"):
        assert ra[key] == rb[key], key
    maps = [pd.read_csv(os.path.join(o, "items.csv"))[["tsne_1", "tsne_2"]].to_numpy() for o in (a, b, c)]
    assert np.array_equal(maps[0], maps[1]) and not np.allclose(maps[0], maps[2])
    assert ra["clustering"] != rc["clustering"]  # the seed reaches k-means and the t-SNE map


def test_demo_runs_the_image_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TREEPROBE_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "demo")
    code, stdout, err = run(["intrinsic", "--demo", "--out", out, *FAST], capsys)
    assert code == 0, err
    rep = load_report(out)
    assert rep["provenance"]["data"]["kind"].startswith("demo: synthetic images")
    assert rep["provenance"]["model"]["digest"]  # the bundled checkpoint embedded the rendered images
    img = {m["method"]: m for m in rep["mantel"] if m["level"] == "image"}
    # known truth: the simulated world is built from the tree
    assert img["pearson"]["statistic"] > 0.2 and img["pearson"]["p_value"] == pytest.approx(1 / 50)


def test_tree_export_and_user_tree(tmp_path, capsys):
    nwk = str(tmp_path / "tax.nwk")
    code, stdout, err = run(["tree", "--data", PHOTOS, "--out", nwk], capsys)
    assert code == 0, err
    from ete3 import Tree

    t = Tree(open(nwk).read(), format=1)
    assert len(t.get_leaves()) == 465
    # the exported taxonomy used as a user tree reproduces the rank-taxonomy Mantel r
    out1, out2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    meta = pd.read_csv(PHOTOS).drop_duplicates("path", ignore_index=True)  # one photo is listed twice
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(meta), 16)) + 3 * np.eye(16)[pd.factorize(meta["family"])[0] % 16]
    np.save(tmp_path / "emb.npy", X.astype(np.float32))
    meta.to_csv(tmp_path / "meta.csv", index=False)
    base = ["intrinsic", "--embeddings", str(tmp_path / "emb.npy"), "--metadata", str(tmp_path / "meta.csv"),
            *NO_CLUSTERING, "--no-figures"]
    assert run(base + ["--out", out1], capsys)[0] == 0
    assert run(base + ["--out", out2, "--tree", nwk], capsys)[0] == 0
    r1 = {(m["level"], m["method"]): m["statistic"] for m in load_report(out1)["mantel"]}
    r2 = {(m["level"], m["method"]): m["statistic"] for m in load_report(out2)["mantel"]}
    assert r1[("image", "pearson")] == pytest.approx(r2[("image", "pearson")], abs=1e-9)
    assert load_report(out2)["provenance"]["tree"]["kind"].startswith("user tree")


def test_first_contact_says_what_to_run(tmp_path, capsys):
    code, stdout, err = run([], capsys)  # bare `treeprobe`
    assert code == 0 and "treeprobe intrinsic --example bioclip2-1k" in stdout and "--demo" in stdout
    code, stdout, err = run(["intrinsic", "--out", str(tmp_path / "o")], capsys)  # no input: guidance, no run
    assert code == 2 and "no input given" in err and "--example bioclip2-1k" in err
    assert not (tmp_path / "o").exists()


def test_version(capsys):
    from treeprobe import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"treeprobe {__version__}"


def test_one_cli_mounts_every_command(capsys):
    from treeprobe.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"intrinsic", "tree", "extract", "train", "make-shards", "export-weights"} <= set(sub.choices)


def test_example_runs_without_any_path(tmp_path, capsys):
    """The bundled real example (byte-identical to the shared file: tests/test_datasets.py) from the CLI."""
    a = str(tmp_path / "example")
    assert run(["intrinsic", "--example", "bioclip2-1k", "--out", a, *NO_CLUSTERING, "--no-figures"], capsys)[0] == 0
    ra = load_report(a)
    check_complete(ra, 902)
    assert ra["skipped"]["count"] == 128 and ra["provenance"]["data"]["source"] == "example bioclip2-1k (bundled)"


def test_two_inputs_are_refused(tmp_path, capsys):
    code, _, err = run(["intrinsic", "--example", "bioclip2-1k", "--demo", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "pass one input, not --example and --demo" in err


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.mark.parametrize("case", ["missing_column", "empty", "single_taxon", "nan_embeddings", "missing_file",
                                  "no_model", "bad_ckpt", "hub_offline", "bad_rank_lengths", "bad_tree"])
def test_bad_inputs_one_line_exit_2(case, tmp_path, capsys):
    meta = tmp_path / "meta.csv"
    row = dict(path="x.jpg", kingdom="Animalia", phylum="Chordata", **{"class": "Aves"}, order="O", family="F",
               genus="G", species="G s")
    args = ["intrinsic", "--out", str(tmp_path / "o"), *FAST]
    if case == "missing_column":
        _write_csv(meta, [{k: v for k, v in row.items() if k != "family"}])
        args += ["--data", str(meta), "--ckpt", "whatever.pt"]
        expect = "family"
    elif case == "empty":
        meta.write_text("path,kingdom,phylum,class,order,family,genus,species\n")
        args += ["--data", str(meta), "--ckpt", "whatever.pt"]
        expect = "no rows"
    elif case == "single_taxon":
        _write_csv(meta, [dict(row, path=f"x{i}.jpg") for i in range(6)])
        np.save(tmp_path / "e.npy", np.random.rand(6, 4).astype(np.float32))
        args += ["--embeddings", str(tmp_path / "e.npy"), "--metadata", str(meta)]
        expect = "single taxon"
    elif case == "nan_embeddings":
        _write_csv(meta, [dict(row, species=f"G s{i}") for i in range(4)])
        e = np.full((4, 4), np.nan, dtype=np.float32)
        np.save(tmp_path / "e.npy", e)
        args += ["--embeddings", str(tmp_path / "e.npy"), "--metadata", str(meta)]
        expect = "usable"
    elif case == "missing_file":
        args += ["--data", str(tmp_path / "nope.csv"), "--ckpt", "x.pt"]
        expect = "nope.csv"
    elif case == "no_model":
        args += ["--data", PHOTOS]
        expect = "--ckpt"
    elif case == "bad_ckpt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        args += ["--data", PHOTOS, "--ckpt", str(bad), "--model", "ViT-B-32"]
        expect = "bad.pt"
    elif case == "hub_offline":
        args += ["--data", PHOTOS, "--ckpt", "hf-hub:imageomics/bioclip"]
        expect = "--ckpt"
    elif case == "bad_rank_lengths":
        args += ["--embeddings", PARQUET, "--rank-lengths", "1,2"]
        expect = "7 values"
    elif case == "bad_tree":
        (tmp_path / "t.nwk").write_text("((a,b;")
        args += ["--embeddings", PARQUET, "--tree", str(tmp_path / "t.nwk")]
        expect = "Newick"
    code, stdout, err = run(args, capsys)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    warned = [l for l in lines if l.startswith("treeprobe: warning:")]
    # the real photo index lists one photo twice (rows 825 and 828): one warning line before the error
    assert len(warned) == (1 if PHOTOS in args else 0), err
    lines = [l for l in lines if l not in warned]
    assert len(lines) == 1 and lines[0].startswith("treeprobe: error:"), err
    assert expect in lines[0]
    assert "Traceback" not in err


def test_real_photos_with_a_checkpoint(tmp_path, capsys, tiny_clip_checkpoint):
    """The image path on the 1,072 real photos with a small open_clip checkpoint saved by the test."""
    ckpt, _ = tiny_clip_checkpoint
    out = str(tmp_path / "photos")
    cache = str(tmp_path / "cache")
    args = ["intrinsic", "--data", PHOTOS, "--ckpt", ckpt, "--out", out, "--cache-dir", cache, *FAST, "--no-figures"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    rep = load_report(out)
    check_complete(rep, 1071, signal=False)  # a random tiny checkpoint: no signal expected
    assert rep["skipped"]["count"] == 1  # the photo listed twice in the index (rows 825 and 828)
    assert rep["provenance"]["n_taxa"] == dict(kingdom=3, phylum=4, **{"class": 8}, order=45, family=133,
                                               genus=316, species=465)
    model = rep["provenance"]["model"]
    assert len(model["digest"]) == 64 and model["embed_dim"] == 32 and model["cache_hit"] is False
    # a second run reuses the cached embeddings and gives the same numbers
    code, _, err = run(args[:-1] + ["--out", out + "2", "--no-figures"], capsys)
    assert code == 0, err
    rep2 = load_report(out + "2")
    assert rep2["provenance"]["model"]["cache_hit"] is True
    assert rep2["mantel"] == rep["mantel"]


def test_report_folder_round_trip_and_figure_redraw(tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["intrinsic", "--embeddings", PARQUET, "--out", out, "--permutations", "19", "--maps", "tsne",
            "--cluster-methods", "agglomerative", "--quiet", "--no-centroids"]
    assert run(args, capsys)[0] == 0
    from treeprobe.report import load_report as load_folder

    rep = load_folder(out)
    assert rep.items_table().shape[0] == 902
    assert rep.maps["tsne"]["coords"].shape == (902, 2)
    assert rep.mantel["statistic"].iloc[0] == pytest.approx(load_report(out)["mantel"][0]["statistic"])
    import subprocess
    import sys

    redraw = os.path.join(os.path.dirname(__file__), "..", "figures", "redraw_report_figures.py")
    res = subprocess.run([sys.executable, redraw, out, "--out", str(tmp_path / "fig")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "fig" / "tsne_by_rank.png").stat().st_size > 10000
    assert (tmp_path / "fig" / "mantel_distances.pdf").exists()


def test_knn_query_subsample_on_real_embeddings(tmp_path, capsys):
    exact_out, est_out = str(tmp_path / "exact"), str(tmp_path / "est")
    assert run(["intrinsic", "--embeddings", PARQUET, "--out", exact_out, *NO_CLUSTERING, "--no-centroids"],
               capsys)[0] == 0
    args = ["intrinsic", "--embeddings", PARQUET, "--out", est_out, *NO_CLUSTERING, "--no-centroids",
            "--knn-max-queries"]
    assert run(args + ["300"], capsys)[0] == 0
    exact = {r["rank"]: r for r in load_report(exact_out)["knn"]}
    est = {r["rank"]: r for r in load_report(est_out)["knn"]}
    assert load_report(est_out)["provenance"]["knn_max_queries"] == 300
    for rank, e in est.items():
        assert exact[rank]["estimator"] == "exact" and e["estimator"] == "query-subsample"
        assert e["n_queries"] == 300 and e["n_evaluated"] <= 300 and e["agreement_ci95"] > 0
        assert abs(e["agreement"] - exact[rank]["agreement"]) <= 2 * e["agreement_ci95"]
        assert e["chance"] == pytest.approx(exact[rank]["chance"], rel=1e-12)
    md = open(os.path.join(est_out, "report.md")).read()
    assert "Estimated from 300 random query items" in md and "agreement_ci95" in md
    code, _, err = run(args + ["0"], capsys)
    assert code == 2 and "--knn-max-queries must be positive" in err


def _warning_run(monkeypatch, tmp_path, capsys, *, error=False):
    """``treeprobe intrinsic`` whose loading step issues a TreeprobeWarning and a plain UserWarning."""
    import functools
    import warnings

    import treeprobe.pipeline as pipeline
    from treeprobe.errors import TreeprobeWarning

    real = pipeline.load_inputs

    @functools.wraps(real)
    def load(*a, **k):
        warnings.warn("3 duplicated rows dropped;\n kept the first of each", TreeprobeWarning)
        warnings.warn("some library notice", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "load_inputs", load)
    if error:
        monkeypatch.setattr("sys.warnoptions", ["error::treeprobe.errors.TreeprobeWarning"])
        warnings.simplefilter("error", TreeprobeWarning)
    return run(["intrinsic", "--embeddings", PARQUET, "--out", str(tmp_path / "w"), *NO_CLUSTERING,
                "--no-figures", "--no-centroids"], capsys)


def test_treeprobe_warning_is_one_cli_line(tmp_path, capsys, monkeypatch):
    import warnings

    with warnings.catch_warnings(record=True) as shown:  # what reaches the usual warning display
        warnings.simplefilter("always")
        code, _, err = _warning_run(monkeypatch, tmp_path, capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert lines.count("treeprobe: warning: 3 duplicated rows dropped; kept the first of each") == 1
    assert not any("TreeprobeWarning" in ln for ln in lines)  # no file:line, no class name
    # other warnings go on to the usual display (Python's file:line: Category: message), TreeprobeWarning not
    assert [str(w.message) for w in shown if w.category is UserWarning] == ["some library notice"]
    assert not [w for w in shown if "duplicated rows" in str(w.message)]


def test_treeprobe_warning_as_error_is_one_error_line(tmp_path, capsys, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        code, _, err = _warning_run(monkeypatch, tmp_path, capsys, error=True)
    assert code == 2 and err.strip() == "treeprobe: error: 3 duplicated rows dropped; kept the first of each"
    assert not (tmp_path / "w").exists()
