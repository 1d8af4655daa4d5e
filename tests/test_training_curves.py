"""Training curves of a treeprobe-train run (treeprobe/training_curves.py).

One tiny CPU run (the bundled tiny model, synthetic images of a small simulated world, 2 epochs of
2 steps, a checkpoint every step, kNN evaluation on held-out renders every epoch) is trained once
for the module; every test reads it (copies are symlinks to its checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import treeprobe as tp
from treeprobe import tl
from treeprobe import training_curves as tc
from treeprobe.errors import TreeprobeError

PERMUTATIONS = 99
BRANCHING = ((1, 2), (1, 2), (1, 1), (1, 2), (1, 2), (2, 3))  # 34 species in 2 kingdoms


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder
    from treeprobe.training.cli import main

    root = tmp_path_factory.mktemp("curves")
    world = simulate_world(seed=0, n_kingdoms=2, branching=BRANCHING, images_per_species=2)
    write_image_folder(world, root / "train", image_size=32, seed=1, images_per_species=1)  # 34 images
    write_image_folder(world, root / "heldout", image_size=32, seed=2, images_per_species=2)  # 68 fresh renders
    out = root / "run"
    rc = main(["--data", str(root / "train" / "metadata.csv"), "--out", str(out), "--model", "tiny",
               "--epochs", "2", "--batch-size", "16", "--warmup", "1", "--lr", "1e-3", "--save-every-steps", "1",
               "--eval-data", str(root / "heldout" / "metadata.csv"), "--eval-every", "1", "--eval-knn-only",
               "--log-every", "1", "--no-progress", "-q"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def heldout(run_dir):
    return tp.read(run_dir.parent / "heldout" / "metadata.csv")


@pytest.fixture(scope="module")
def run(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run reads without a warning
        return tc.read_run(run_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedding cache for the module: each checkpoint's images are embedded once (the cache is
    keyed by the checkpoint's digest, so a direct call with the same checkpoint reads the same vectors)."""
    return tmp_path_factory.mktemp("embedding_cache")


@pytest.fixture(scope="module")
def curves(run, heldout, cache):
    return tc.evaluate_run(run, heldout, permutations=PERMUTATIONS, seed=0, cache_dir=cache, progress=False)


def _copy_run(src, dst, *, checkpoints=True):
    """A copy of a run folder: log and args copied, checkpoints symlinked."""
    dst.mkdir()
    for name in ("log.jsonl", "args.json"):
        shutil.copy(src / name, dst / name)
    (dst / "checkpoints").mkdir()
    if checkpoints:
        for p in (src / "checkpoints").iterdir():
            os.symlink(p, dst / "checkpoints" / p.name)
    return dst


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- read_run


def test_read_run_checkpoints_sorted_by_step_with_the_logged_step_and_epoch(run, run_dir):
    ck = run.checkpoints
    assert list(ck["name"]) == ["step_1.pt", "epoch_1.pt", "step_3.pt", "epoch_2.pt"]
    assert list(ck["step"]) == [1, 2, 3, 4] and list(ck["epoch"]) == [0, 1, 1, 2]
    assert set(ck["source"]) == {"log"}
    logged = {os.path.basename(r["path"]): (r["step"], r["epoch"]) for r in _log(run_dir) if r["event"] == "checkpoint"}
    for row in ck.itertuples():
        assert logged[row.name] == (row.step, row.epoch)
        stored = torch.load(row.path, map_location="cpu", weights_only=True, mmap=True)
        assert (stored["step"], stored["epoch"]) == (row.step, row.epoch)
        assert os.path.isabs(row.path) and os.path.isfile(row.path)
    assert run.args["epochs"] == 2 and run.args["save_every_steps"] == 1
    assert len(run.log) == len(_log(run_dir)) and run.n_bad_lines == 0
    assert list(run.evals["step"]) == [0, 2, 4] and list(run.evals["epoch"]) == [0, 1, 2]
    assert "event" not in run.evals.columns and "knn_genus" in run.evals.columns
    assert list(run.train["step"]) == [1, 2, 3, 4]
    assert run.checkpoint("epoch_2") == run.checkpoint("epoch_2.pt") == run_dir.resolve() / "checkpoints" / "epoch_2.pt"


def test_read_run_falls_back_to_checkpoint_metadata_without_a_log(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path / "nolog")
    (copy / "log.jsonl").unlink()
    r = tc.read_run(copy)
    assert list(r.checkpoints["step"]) == [1, 2, 3, 4] and list(r.checkpoints["epoch"]) == [0, 1, 1, 2]
    assert set(r.checkpoints["source"]) == {"checkpoint"} and r.log.empty and r.evals.empty


def test_read_run_clear_errors(run_dir, tmp_path):
    with pytest.raises(TreeprobeError, match="no such run folder"):
        tc.read_run(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TreeprobeError, match="not a treeprobe train run folder"):
        tc.read_run(tmp_path / "empty")
    bare = _copy_run(run_dir, tmp_path / "nockpt", checkpoints=False)
    (bare / "log.jsonl").write_text("\n".join(json.dumps(r) for r in _log(run_dir) if r["event"] != "checkpoint"))
    with pytest.raises(TreeprobeError, match="no checkpoints in"):
        tc.read_run(bare)
    assert tc.read_run(bare, require_checkpoints=False).checkpoints.empty
    with pytest.raises(TreeprobeError, match="missing"):
        tc.read_run(tmp_path / "empty", missing="maybe")


def test_checkpoint_named_in_the_log_but_missing(run_dir, tmp_path, heldout):
    copy = _copy_run(run_dir, tmp_path / "gone")
    (copy / "checkpoints" / "step_3.pt").unlink()
    with pytest.raises(TreeprobeError, match=r"missing from .*step_3\.pt"):
        tc.read_run(copy)
    with pytest.raises(TreeprobeError, match=r"step_3\.pt"):
        tc.evaluate_run(copy, heldout, progress=False)
    with pytest.warns(UserWarning, match=r"step_3\.pt"):
        r = tc.read_run(copy, missing="skip")
    assert list(r.checkpoints["name"]) == ["step_1.pt", "epoch_1.pt", "epoch_2.pt"]


def test_truncated_last_line_and_corrupt_line_are_skipped_with_a_warning(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path / "killed")
    lines = (copy / "log.jsonl").read_text().splitlines()
    partial = json.dumps({"event": "train", "step": 5, "epoch": 2, "loss": 1.0})[:25]  # killed mid-write
    (copy / "log.jsonl").write_text("\n".join(lines) + "\n" + partial)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line.*the last line"):
        r = tc.read_run(copy)
    assert r.bad_lines == [len(lines) + 1] and r.n_bad_lines == 1
    assert len(r.log) == len(lines) and list(r.checkpoints["step"]) == [1, 2, 3, 4]
    with pytest.warns(UserWarning):
        assert len(tc.curves_from_log(copy)) == len(tc.curves_from_log(run_dir))

    corrupt = lines[:3] + ["{not json", "[1, 2]"] + lines[3:]
    (copy / "log.jsonl").write_text("\n".join(corrupt) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable line.*line 4.*line 5"):
        r = tc.read_run(copy)
    assert r.bad_lines == [4, 5] and len(r.log) == len(lines)


# ----------------------------------------------------------------------------- evaluate_run


def _direct(heldout, ckpt, cache, *, seed, metrics=("mantel", "knn")):
    """The same numbers straight from tl.embed + tl.mantel / tl.knn, as {(metric, rank): (est, p)}."""
    emb = tl.embed(heldout, ckpt=ckpt, device="cpu", cache_dir=cache, progress=False)
    out = {}
    if "mantel" in metrics:
        for r in tl.mantel(emb, permutations=PERMUTATIONS, seed=seed).itertuples():
            out[(f"mantel {r.level} {r.method}", r.level)] = (r.statistic, r.p_value)
    if "knn" in metrics:
        knn = tl.knn(emb, seed=seed)
        for score in tc.KNN_SCORES:
            for r in knn.itertuples():
                out[(f"knn {score}", r.rank)] = (getattr(r, score), math.nan)
    return out


def _as_dict(table):
    return {(r.metric, r.rank): (r.estimate, r.p_value) for r in table.itertuples()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x == y or (math.isnan(x) and math.isnan(y))) for k in a for x, y in zip(a[k], b[k]))


def test_evaluate_run_table_shape(curves, run):
    assert tuple(curves.columns) == tc.CURVE_COLUMNS
    assert list(dict.fromkeys(curves["checkpoint"])) == list(run.checkpoints["name"])
    assert sorted(set(curves["step"])) == [1, 2, 3, 4]
    per = curves.groupby("checkpoint").size()
    assert (per == 4 + 3 * 7).all()  # Mantel: 2 levels x 2 methods; kNN: 3 scores x 7 ranks
    mantel = curves[curves["metric"].str.startswith("mantel")]
    assert set(mantel["metric"]) == {"mantel image pearson", "mantel image spearman",
                                     "mantel species-centroid pearson", "mantel species-centroid spearman"}
    assert (mantel["rank"] == mantel["metric"].str.split().str[1]).all()
    assert mantel["p_value"].between(1 / (PERMUTATIONS + 1), 1).all()
    knn = curves[curves["metric"].str.startswith("knn")]
    assert knn["p_value"].isna().all() and knn["ci_low"].isna().all()  # exact estimates: no interval
    assert list(knn[knn["step"] == 4]["rank"].iloc[:7]) == list(tp.RANKS)


def test_evaluate_run_last_checkpoint_equals_direct_calls(curves, run, heldout, cache):
    last = run.checkpoints.iloc[-1]
    got = curves[curves["checkpoint"] == last["name"]]
    assert set(got["step"]) == {last["step"]} and set(got["epoch"]) == {last["epoch"]}
    assert _same(_as_dict(got), _direct(heldout, last["path"], cache, seed=0))


def test_first_checkpoint_differs_from_last(curves, run, heldout, cache):
    first, last = (curves[curves["checkpoint"] == n] for n in run.checkpoints["name"].iloc[[0, -1]])
    a, b = first.set_index(["metric", "rank"])["estimate"], last.set_index(["metric", "rank"])["estimate"]
    assert a.loc[("mantel image pearson", "image")] != b.loc[("mantel image pearson", "image")]
    assert (a != b).sum() >= 4
    first_ck = run.checkpoints.iloc[0]
    assert _same(_as_dict(first), _direct(heldout, first_ck["path"], cache, seed=0))


def test_evaluate_run_matches_the_logged_in_training_evaluation(curves, run):
    """Same metric names and (up to float noise) the same kNN agreement as the run's own eval at that step."""
    log = tc.curves_from_log(run)
    for step in (2, 4):  # the epoch checkpoints, evaluated during training
        ours = curves[(curves["step"] == step)].set_index(["metric", "rank"])["estimate"]
        theirs = log[log["step"] == step].set_index(["metric", "rank"])["estimate"]
        assert set(theirs.index) <= set(ours.index)
        np.testing.assert_allclose(ours.loc[theirs.index].to_numpy(), theirs.to_numpy(), atol=1e-6)


def test_same_seed_for_every_checkpoint_and_every_nth(run, heldout, cache):
    """On a tree with no signal (lineages shuffled among species) the p-values depend on the seed:
    the last checkpoint's must be the direct call's with the same seed."""
    items = heldout.items.copy()
    species = items["species"].unique()
    lineage = items.drop_duplicates("species").set_index("species")[list(tp.RANKS[:-1])]
    perm = np.random.default_rng(3).permutation(len(species))
    mapping = dict(zip(species, species[perm]))
    shuffled = lineage.loc[items["species"].map(mapping)].reset_index(drop=True)
    items[list(tp.RANKS[:-1])] = shuffled.to_numpy()
    items["species"] = items["species"].map(mapping)
    null = tp.TreeData(None, items)
    table = tc.evaluate_run(run, null, metrics=("mantel",), every=10, seed=5, permutations=PERMUTATIONS,
                            cache_dir=cache, progress=False)
    assert list(dict.fromkeys(table["checkpoint"])) == ["step_1.pt", "epoch_2.pt"]  # the first, always the last
    last = table[table["checkpoint"] == "epoch_2.pt"]
    path = run.checkpoint("epoch_2")
    assert _same(_as_dict(last), _direct(null, path, cache, seed=5, metrics=("mantel",)))
    assert not _same(_as_dict(last), _direct(null, path, cache, seed=6, metrics=("mantel",)))


def test_knn_subsample_same_seed_and_its_interval(run, heldout, cache, curves):
    """Above max_queries the kNN scores are seeded estimates with a 95 % interval."""
    table = tc.evaluate_run(run, heldout, metrics=("knn",), every=10, seed=5, max_queries=20, cache_dir=cache,
                            progress=False)
    last = table[table["checkpoint"] == "epoch_2.pt"]
    emb = tl.embed(heldout, ckpt=run.checkpoint("epoch_2"), cache_dir=cache, progress=False)
    direct = tl.knn(emb, seed=5, max_queries=20).set_index("rank")
    other = tl.knn(emb, seed=6, max_queries=20).set_index("rank")
    assert not direct["agreement"].equals(other["agreement"])  # the seed matters here
    got = last[last["metric"] == "knn agreement"].set_index("rank")
    assert got["estimate"].to_dict() == direct["agreement"].to_dict()
    hw = direct["agreement_ci95"]
    assert np.isfinite(got["ci_low"].to_numpy()).all()
    assert got["ci_low"].to_dict() == (direct["agreement"] - hw).to_dict()
    assert got["ci_high"].to_dict() == (direct["agreement"] + hw).to_dict()
    fig = tc.plot_training_curves(table, metrics=["knn agreement"])
    assert len(fig.axes[0].collections) == 7  # one band per rank


def test_selected_checkpoints():
    assert tc._selected(4, 1) == [0, 1, 2, 3]
    assert tc._selected(4, 2) == [0, 2, 3]
    assert tc._selected(5, 2) == [0, 2, 4]
    assert tc._selected(4, 10) == [0, 3]
    assert tc._selected(1, 3) == [0] and tc._selected(0, 1) == []


def test_evaluate_run_input_errors(run, heldout):
    with pytest.raises(TreeprobeError, match="unknown metric"):
        tc.evaluate_run(run, heldout, metrics=("mantel", "purity"), progress=False)
    with pytest.raises(TreeprobeError, match="every"):
        tc.evaluate_run(run, heldout, every=0, progress=False)
    with pytest.raises(TreeprobeError, match="TreeData"):
        tc.evaluate_run(run, heldout.items, progress=False)


# ----------------------------------------------------------------------------- curves_from_log


def test_curves_from_log_reproduces_the_logged_numbers(run, run_dir):
    table = tc.curves_from_log(run_dir)
    assert tuple(table.columns) == tc.CURVE_COLUMNS
    evals = [r for r in _log(run_dir) if r["event"] == "eval"]
    assert sorted(set(table["step"])) == [r["step"] for r in evals] == [0, 2, 4]
    names = table.drop_duplicates("step").set_index("step")["checkpoint"]
    assert names.to_dict() == {0: "", 2: "epoch_1.pt", 4: "epoch_2.pt"}
    for rec in evals:
        sub = table[table["step"] == rec["step"]]
        assert set(sub["epoch"]) == {rec["epoch"]}
        got = sub.set_index(["metric", "rank"])["estimate"]
        want = {("knn agreement", r): rec[f"knn_{r}"] for r in tp.RANKS}
        want |= {("knn agreement_excess", r): rec[f"knn_excess_{r}"] for r in tp.RANKS}
        assert got.to_dict() == want
    assert table["p_value"].isna().all() and table["ci_low"].isna().all()


def test_curves_from_log_reads_the_pipeline_mantel_numbers(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path / "tp")
    rec = {"event": "eval", "step": 4, "epoch": 2, "seconds": 1.0, "eval_n": 68, "knn_genus": 0.5,
           "knn_excess_genus": 0.25, "tp_mantel_image_pearson_r": 0.61, "tp_mantel_image_pearson_p": 0.001,
           "tp_mantel_species-centroid_spearman_r": 0.42, "tp_mantel_species-centroid_spearman_p": 0.02,
           "tp_mantel_image_pearson_images_permuted_r": 0.7, "tp_mantel_image_pearson_images_permuted_p": 0.5,
           "tp_knn_genus_agreement_excess": 0.3, "tp_knn_family_agreement_excess": 0.2, "tp_note": "x"}
    (copy / "log.jsonl").write_text(json.dumps(rec) + "\n")
    table = tc.curves_from_log(copy)
    got = {(r.metric, r.rank): (r.estimate, r.p_value) for r in table.itertuples()}
    assert got.keys() == {("knn agreement", "genus"), ("knn agreement_excess", "genus"),
                          ("knn agreement_excess", "family"), ("mantel image pearson", "image"),
                          ("mantel species-centroid spearman", "species-centroid"),
                          ("mantel image pearson images-permuted", "image")}
    assert got[("mantel image pearson", "image")] == (0.61, 0.001)
    assert got[("mantel species-centroid spearman", "species-centroid")] == (0.42, 0.02)
    assert got[("mantel image pearson images-permuted", "image")] == (0.7, 0.5)
    assert got[("knn agreement_excess", "genus")][0] == 0.25  # the plain number, not the pipeline's copy
    assert got[("knn agreement_excess", "family")][0] == 0.2
    assert math.isnan(got[("knn agreement", "genus")][1])
    assert set(table["checkpoint"]) == {"epoch_2.pt"}  # from the checkpoints on disk


# ----------------------------------------------------------------------------- the figure


def _lines(ax):
    return {ln.get_label(): ln for ln in ax.get_lines()}


def test_plot_panels_lines_and_loss(curves, run):
    fig = tc.plot_training_curves(curves, loss=run)
    metrics = list(dict.fromkeys(curves["metric"]))
    main = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main] == metrics + ["training loss"]
    for ax, metric in zip(main, metrics):
        want = list(dict.fromkeys(curves[curves["metric"] == metric]["rank"]))
        lines = _lines(ax)
        assert list(lines) == want
        for rank, ln in lines.items():
            sub = curves[(curves["metric"] == metric) & (curves["rank"] == rank)].sort_values("step")
            np.testing.assert_array_equal(ln.get_xdata(), sub["step"].to_numpy(float))
            np.testing.assert_array_equal(ln.get_ydata(), sub["estimate"].to_numpy(float))
        assert not ax.collections  # no finite interval, no band
    loss = main[-1].get_lines()
    assert len(loss) == 1 and list(loss[0].get_ydata()) == list(run.train["loss"])
    top = [c for c in main[0].child_axes]
    assert top and [t.get_text() for t in top[0].get_xticklabels()] == ["ep 1", "ep 2"]
    np.testing.assert_array_equal(top[0].get_xticks(), [2, 4])


def test_plot_band_where_the_interval_is_finite_and_metric_choice():
    table = pd.DataFrame({"step": [1, 2, 3, 1, 2, 3], "epoch": [0, 1, 1, 0, 1, 1], "checkpoint": "",
                          "metric": ["knn agreement"] * 3 + ["mantel image pearson"] * 3,
                          "rank": ["genus"] * 3 + ["image"] * 3, "estimate": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                          "ci_low": [0.05, 0.15, 0.25] + [math.nan] * 3,
                          "ci_high": [0.15, 0.25, 0.35] + [math.nan] * 3, "p_value": math.nan})
    fig = tc.plot_training_curves(table)
    knn, mantel = [ax for ax in fig.axes if ax.get_title()]
    assert len(knn.collections) == 1 and not mantel.collections
    fig = tc.plot_training_curves(table, metrics=["mantel image pearson"])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["mantel image pearson"]
    with pytest.raises(TreeprobeError, match="not in the table"):
        tc.plot_training_curves(table, metrics=["knn top1"])
    with pytest.raises(TreeprobeError, match="curves table"):
        tc.plot_training_curves(table.drop(columns="metric"))


def test_intervals_come_from_the_estimators():
    """kNN: estimate ± the ``*_ci95`` half-width of a subsampled estimate; Mantel: its ``ci`` pair."""
    knn = pd.DataFrame({"rank": ["genus", "species"], "agreement": [0.5, 0.2], "agreement_ci95": [0.1, math.nan],
                        "agreement_normalised": [0.4, 0.1], "agreement_normalised_ci95": [0.05, math.nan],
                        "agreement_excess": [0.3, 0.05]})
    rows = {(r["metric"], r["rank"]): r for r in tc._knn_rows(knn)}
    assert len(rows) == 6
    assert (rows[("knn agreement", "genus")]["ci_low"], rows[("knn agreement", "genus")]["ci_high"]) == (0.4, 0.6)
    g = rows[("knn agreement_normalised", "genus")]
    assert (g["estimate"], g["ci_low"], g["ci_high"]) == (0.4, 0.4 - 0.05, 0.4 + 0.05)
    assert all(math.isnan(rows[k][c]) for k in [("knn agreement", "species"), ("knn agreement_excess", "genus")]
               for c in ("ci_low", "ci_high", "p_value"))
    mantel = pd.DataFrame({"level": ["image", "species-centroid"], "scheme": ["species", "images"],
                           "method": ["pearson", "spearman"], "statistic": [0.3, 0.2], "p_value": [0.01, 0.2],
                           "ci": [None, (0.1, 0.25)]})
    a, b = tc._mantel_rows(mantel)
    assert (a["metric"], a["rank"], a["estimate"], a["p_value"]) == ("mantel image pearson", "image", 0.3, 0.01)
    assert math.isnan(a["ci_low"]) and math.isnan(a["ci_high"])
    assert (b["metric"], b["rank"], b["ci_low"], b["ci_high"]) == (
        "mantel species-centroid spearman images-permuted", "species-centroid", 0.1, 0.25)


def test_curves_from_log_of_a_log_appended_to_by_resumed_and_restarted_runs(run_dir, tmp_path):
    copy = _copy_run(run_dir, tmp_path / "appended")
    evals = [r for r in _log(run_dir) if r["event"] == "eval"]
    again = dict(evals[-1], knn_genus=0.123)  # a resumed run evaluating step 4 again
    with open(copy / "log.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "step": 3, "epoch": 1}) + "\n" + json.dumps(again) + "\n")
    table = tc.curves_from_log(copy)
    assert sorted(set(table["step"])) == [0, 2, 4]
    genus = table[(table["metric"] == "knn agreement") & (table["rank"] == "genus")].set_index("step")["estimate"]
    assert genus[4] == 0.123 and genus[2] == evals[1]["knn_genus"]
    fresh = dict(evals[0], knn_genus=0.5)
    with open(copy / "log.jsonl", "a") as f:  # started afresh in the same --out: the old curve is gone
        f.write(json.dumps({"event": "start", "step": 0, "epoch": 0}) + "\n" + json.dumps(fresh) + "\n")
    table = tc.curves_from_log(copy)
    assert set(table["step"]) == {0}
    assert table[(table["metric"] == "knn agreement") & (table["rank"] == "genus")]["estimate"].tolist() == [0.5]


def test_cli_compare_run_writes_the_curves(run_dir, curves, cache, tmp_path, capsys):
    """``treeprobe compare --run RUN --data HELDOUT`` writes the same table as evaluate_run and the figure."""
    from treeprobe.cli import main

    out = tmp_path / "curves"
    rc = main(["compare", "--run", str(run_dir), "--data", str(run_dir.parent / "heldout" / "metadata.csv"),
               "--permutations", str(PERMUTATIONS), "--seed", "0", "--cache-dir", str(cache), "--out", str(out),
               "--quiet"])
    assert rc == 0 and "4 checkpoints scored on" in capsys.readouterr().out
    table = pd.read_csv(out / "training_curves.csv")
    assert len(table) == len(curves) and list(table["step"]) == list(curves["step"])
    np.testing.assert_allclose(table["estimate"].to_numpy(float), curves["estimate"].to_numpy(float), equal_nan=True)
    assert (out / "training_curves.png").stat().st_size > 10_000 and (out / "training_curves.pdf").exists()
    assert main(["compare", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "--run needs --data" in capsys.readouterr().err
    # --from-log: the run's own evaluations, no re-embedding
    assert main(["compare", "--run", str(run_dir), "--from-log", "--out", str(tmp_path / "log"), "--quiet"]) == 0
    logged = pd.read_csv(tmp_path / "log" / "training_curves.csv")
    assert list(logged.columns) == list(tc.curves_from_log(tc.read_run(run_dir)).columns) and len(logged)
