"""Bad-input catalogue: output folders (``--out``) and command-line options.

Every ``--out`` is checked before any long work (an existing file, an unwritable place, a full disk,
a folder that is not a report: one line ``treeprobe: error: ...``, exit 2, the analysis never runs);
a report folder is replaced as a whole at the end (a second run leaves none of the first run's files, an
interrupt or a full disk while writing leaves the previous report byte for byte, no temporary folder
stays). Bad option values are one-line errors too (argparse's own errors: exit 2 with its usage line).
"""

import errno
import functools
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from treeprobe.cli import main

DEAD_PID = 4194305  # above Linux's largest pid (2**22): never a running process
FAST = ["--permutations", "9", "--maps", "none", "--cluster-methods", "none", "--knn-k", "3", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 12-item embeddings file (3 kingdoms, 6 species, 2 images each): a full run takes < 1 s."""
    from treeprobe.simulate import simulate_world

    w = simulate_world(n_kingdoms=3, branching=[1, 1, 1, 1, 1, 2], images_per_species=2, dim=8, seed=0)
    df = w.items.drop(columns=["path"]).copy()
    df["emb"] = list(w.embeddings)
    path = tmp_path_factory.mktemp("tiny") / "tiny.parquet"
    df.to_parquet(path)
    return str(path)


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail loudly if the analysis (or loading a model / embeddings for compare) starts."""
    import treeprobe.data as data
    import treeprobe.pipeline as pipeline
    import treeprobe.tl as tl

    def boom(fn):
        @functools.wraps(fn)  # the CLI reads its defaults from these signatures
        def fail(*a, **k):
            raise AssertionError(f"{fn.__name__} started before the bad option was refused")
        return fail

    for mod, name in ((tl, "intrinsic"), (pipeline, "load_inputs"), (data, "load_data"), (data, "load_embeddings")):
        monkeypatch.setattr(mod, name, boom(getattr(mod, name)))


def _run(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("treeprobe: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".probe-" in p.name)


def _fake_figures(marker: str):
    """A figure writer that writes figures/<marker>.png (a valid PNG signature) and returns it."""
    def write(report, fig_dir):
        fig_dir.mkdir(parents=True, exist_ok=True)
        png = fig_dir / f"{marker}.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
        return {marker: str(png)}
    return write


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one-line refusals before any work (parametrised: setup → argv, exit status, key words) -----------------

Case = namedtuple("Case", "setup code words")


def _c_out_is_file(tmp, tiny):
    (tmp / "afile").write_text("keep me")
    return ["intrinsic", "--embeddings", tiny, "--out", str(tmp / "afile"), *FAST]


def _c_out_parent_is_file(tmp, tiny):
    (tmp / "afile").write_text("keep me")
    return ["intrinsic", "--embeddings", tiny, "--out", str(tmp / "afile" / "sub"), *FAST]


def _c_out_under_proc(tmp, tiny):
    if not os.path.isdir("/proc/1"):
        pytest.skip("no /proc")
    return ["intrinsic", "--embeddings", tiny, "--out", "/proc/1/treeprobe_out", *FAST]


def _c_out_is_cwd(tmp, tiny):
    os.chdir(tmp)
    return ["intrinsic", "--embeddings", tiny, "--out", ".", *FAST]


def _c_out_not_a_report(tmp, tiny):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my notes")
    (tmp / "mine" / "report.json").write_text('{"not": "treeprobe"}')  # a report.json that is not ours
    return ["intrinsic", "--embeddings", tiny, "--out", str(tmp / "mine"), *FAST]


def _c_compare_out_is_file(tmp, tiny):
    (tmp / "afile").write_text("keep me")
    return ["compare", "--model", f"a={tiny}", "--model", f"b={tiny}", "--out", str(tmp / "afile"), "--quiet"]


def _c_compare_run_out_is_file(tmp, tiny):
    (tmp / "afile").write_text("keep me")
    return ["compare", "--run", str(tmp / "no_run"), "--from-log", "--out", str(tmp / "afile")]


def _c_tree_out_is_folder(tmp, tiny):
    (tmp / "adir").mkdir()
    return ["tree", "--data", tiny, "--out", str(tmp / "adir")]


def _c_tree_out_under_file(tmp, tiny):
    (tmp / "afile").write_text("keep me")
    return ["tree", "--data", tiny, "--out", str(tmp / "afile" / "t.nwk")]


def _intrinsic(*extra):
    return lambda tmp, tiny: ["intrinsic", "--embeddings", tiny, "--out", str(tmp / "o"), *FAST, *extra]


def _compare(*models, extra=()):
    return lambda tmp, tiny: ["compare", *[a for m in models for a in ("--model", m.format(tiny=tiny))],
                              "--out", str(tmp / "o"), "--quiet", *extra]


CASES = {
    "out_is_existing_file": Case(_c_out_is_file, 2, ["is an existing file", "afile"]),
    "out_parent_is_file": Case(_c_out_parent_is_file, 2, ["is a file", "cannot be created"]),
    "out_under_proc": Case(_c_out_under_proc, 2, ["cannot write into /proc/1"]),
    "out_is_current_folder": Case(_c_out_is_cwd, 2, ["current folder", "subfolder"]),
    "out_folder_not_a_report": Case(_c_out_not_a_report, 2, ["not empty", "no treeprobe report"]),
    "compare_out_is_file": Case(_c_compare_out_is_file, 2, ["is an existing file"]),
    "compare_run_out_is_file": Case(_c_compare_run_out_is_file, 2, ["is an existing file"]),
    "tree_out_is_folder": Case(_c_tree_out_is_folder, 2, ["--out", "is a folder", "file name"]),
    "tree_out_under_file": Case(_c_tree_out_under_file, 2, ["is a file"]),
    "permutations_negative": Case(_intrinsic("--permutations", "-1"), 2, ["--permutations must be >= 0; got -1"]),
    "compare_permutations_zero": Case(_compare("a={tiny}", "b={tiny}", extra=("--permutations", "0")), 2,
                                      ["--permutations must be positive; got 0"]),
    "compare_jackknife_negative": Case(_compare("a={tiny}", "b={tiny}", extra=("--jackknife", "-2")), 2,
                                       ["--jackknife must be >= 0; got -2"]),
    "knn_k_zero": Case(_intrinsic("--knn-k", "0"), 2, ["--knn-k must be positive; got 0"]),
    "seed_negative": Case(_intrinsic("--seed", "-1"), 2, ["--seed must be between 0 and 4294967295", "got -1"]),
    "seed_huge": Case(_intrinsic("--seed", str(2**32)), 2, ["--seed must be between 0 and", "got 4294967296"]),
    "compare_seed_huge": Case(_compare("a={tiny}", "b={tiny}", extra=("--seed", str(2**40))), 2, ["--seed must be"]),
    "rank_lengths_negative": Case(_intrinsic("--rank-lengths", "1,1,1,1,1,1,-2"), 2,
                                  ["--rank-lengths must be finite and non-negative"]),
    "rank_lengths_nan": Case(_intrinsic("--rank-lengths", "1,1,1,nan,1,1,1"), 2, ["finite and non-negative"]),
    "compare_one_model": Case(_compare("a={tiny}"), 2, ["at least 2 --model", "got 1"]),
    "compare_model_empty_source": Case(_compare("a={tiny}", "b="), 2, ["empty model source", "'b='"]),
    "compare_model_unknown_kind": Case(_compare("a={tiny}", "b=weights.txt"), 2, ["cannot tell what model source",
                                                                                  "weights.txt"]),
    "compare_model_unknown_example": Case(_compare("a={tiny}", "b=example:nope"), 2, ["unknown example 'nope'",
                                                                                      "bioclip2-1k"]),
    "compare_model_duplicate_name": Case(_compare("a={tiny}", "a={tiny}"), 2, ["two models are named 'a'"]),
    "compare_checkpoint_without_data": Case(_compare("a={tiny}", "b=model.pt"), 2, ["'b' is a checkpoint",
                                                                                   "--data"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_any_work(case, tmp_path, capsys, monkeypatch, tiny, no_analysis):
    monkeypatch.chdir(tmp_path)
    spec = CASES[case]
    argv = spec.setup(tmp_path, tiny)
    before = _snapshot(tmp_path)
    code, out, err = _run(argv, capsys)
    assert code == spec.code
    line = _one_error_line(err)
    for w in spec.words:
        assert w in line, (w, line)
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed (the user's files intact)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, words", [
    (["--permutations", "1.5"], "argument --permutations: invalid int value: '1.5'"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--permute", "genes"], "argument --permute: invalid choice: 'genes'"),
    (["--example", "nope"], "argument --example: invalid choice: 'nope'"),
], ids=["permutations_not_integer", "seed_not_integer", "permute_unknown", "example_unknown"])
def test_argparse_refusals_exit_2(argv, words, tmp_path, capsys, no_analysis):
    """Option syntax errors are argparse's: its usage line, then one error line, exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(["intrinsic", "--out", str(tmp_path / "o"), *(["--embeddings", "x.parquet"] if "--example" not in argv
                                                           else []), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines()[-1].startswith(f"treeprobe intrinsic: error: {words}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, words", [
    (["--maps", "tsne,pca"], "unknown map 'pca'; choose from tsne, umap"),
    (["--cluster-methods", "dbscan"], "unknown clustering method 'dbscan'; choose from kmeans, agglomerative"),
], ids=["map_unknown", "cluster_method_unknown"])
def test_unknown_names_one_line(argv, words, tmp_path, capsys, tiny, no_analysis):
    code, _, err = _run(["intrinsic", "--out", str(tmp_path / "o"), *FAST, "--embeddings", tiny, *argv], capsys)
    assert code == 2 and words in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_data_missing_file(tmp_path, capsys):
    code, _, err = _run(["intrinsic", "--out", str(tmp_path / "o"), *FAST, "--data", str(tmp_path / "nope.csv"),
                         "--ckpt", "x.pt"], capsys)
    assert code == 2 and "nope.csv" in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_permutations_zero_is_statistics_only(tmp_path, capsys, tiny):
    """--permutations 0 is allowed: Mantel r without p-values (None in report.json), not an error."""
    out = tmp_path / "o"
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(out), *FAST, "--permutations", "0",
                         "--no-figures"], capsys)
    assert code == 0, err
    mantel = json.loads((out / "report.json").read_text())["mantel"]
    assert len(mantel) == 4 and all(m["permutations"] == 0 and m["p_value"] is None for m in mantel)
    assert all(np.isfinite(m["statistic"]) for m in mantel)


# --- unwritable places simulated: read-only folder (also as root), full disk ----------------------------------


def test_read_only_parent_folder(tmp_path, capsys, monkeypatch, tiny, no_analysis):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: refuse creating anything in ro/ as a read-only mount would
        real_mkdir = os.mkdir

        def mkdir(path, *a, **k):
            if Path(path).parent == ro:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        ro.chmod(0o555)
    try:
        code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(ro / "new" / "report"), *FAST], capsys)
    finally:
        ro.chmod(0o755)
    line = _one_error_line(err)
    assert code == 2 and f"cannot write into {ro} (Permission denied)" in line
    assert list(ro.iterdir()) == []


def test_full_disk_refused_before_the_analysis(tmp_path, capsys, monkeypatch, tiny, no_analysis):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 10 * 2**20, 10 * 2**20))
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(tmp_path / "o"), *FAST], capsys)
    line = _one_error_line(err)
    assert code == 2 and "only 10 MB free" in line and "at least 50 MB" in line
    assert not (tmp_path / "o").exists()


def test_space_estimate_grows_with_the_items(tmp_path, capsys, monkeypatch, tiny):
    """After loading, the check asks for 50 MB + 400 B per item: a disk with 50 MB + 1 KB free passes the
    first check and is refused with the item count known (12 items need 50 MB + 4.8 KB)."""
    import treeprobe.tl as tl

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 0, 50 * 2**20 + 1024))
    real = tl.intrinsic
    monkeypatch.setattr(tl, "intrinsic", functools.wraps(real)(lambda *a, **k: pytest.fail("analysis started")))
    from treeprobe._utils import OUTPUT_BYTES_PER_ITEM, OUTPUT_MIN_FREE_BYTES
    from treeprobe.report import report_bytes

    assert report_bytes(12) == OUTPUT_MIN_FREE_BYTES + 12 * OUTPUT_BYTES_PER_ITEM == 50 * 2**20 + 4800
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "only 50 MB free" in _one_error_line(err)


# --- atomic report folders ------------------------------------------------------------------------------------


def _first_report(tmp_path, capsys, monkeypatch, tiny, marker="old_figure"):
    """A complete report at tmp/o with a figure figures/<marker>.png; returns (folder, its bytes)."""
    import treeprobe.report as report

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(report, "write_figures", _fake_figures(marker))
        code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(out), *FAST, "--seed", "1"], capsys)
    assert code == 0, err
    snap = _snapshot(out)
    assert f"figures/{marker}.png" in snap and "report.json" in snap
    return out, snap


def test_second_run_replaces_the_whole_folder(tmp_path, capsys, monkeypatch, tiny):
    out, _ = _first_report(tmp_path, capsys, monkeypatch, tiny)
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(out), *FAST, "--seed", "2",
                         "--no-figures"], capsys)
    assert code == 0, err
    assert not (out / "figures").exists()  # the first run's figures do not stay beside the new report
    assert json.loads((out / "report.json").read_text())["provenance"]["seed"] == 2
    assert "old_figure" not in (out / "report.md").read_text()
    assert _leftovers(tmp_path) == []


def test_interrupt_while_figures_are_written_keeps_the_old_report(tmp_path, capsys, monkeypatch, tiny):
    import treeprobe.report as report

    out, snap = _first_report(tmp_path, capsys, monkeypatch, tiny)

    def interrupted(rep, fig_dir):
        _fake_figures("half_written")(rep, fig_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_figures", interrupted)
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(out), *FAST, "--seed", "2"], capsys)
    assert code == 130 and err.strip() == "treeprobe: interrupted"
    assert _snapshot(out) == snap  # the old report, byte for byte
    assert _leftovers(tmp_path) == []  # the temporary folder is gone


def test_disk_full_while_writing_is_one_line_and_keeps_the_old_report(tmp_path, capsys, monkeypatch, tiny):
    import treeprobe.report as report

    out, snap = _first_report(tmp_path, capsys, monkeypatch, tiny)
    real = report.atomic_write_text

    def enospc(path, text, **kw):
        if Path(path).name == "per_rank.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, **kw)

    monkeypatch.setattr(report, "atomic_write_text", enospc)
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(out), *FAST, "--no-figures"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "No space left on device" in line and "previous report is unchanged" in line
    assert ".tmp-" not in line and str(out / "per_rank.csv") in line  # names the final path, not the temporary one
    assert _snapshot(out) == snap and _leftovers(tmp_path) == []


def test_compare_folder_is_replaced_atomically(tmp_path, capsys, monkeypatch, tiny):
    """The same for ``treeprobe compare``: an interrupt while its figures are drawn keeps the old
    comparison; a second run leaves none of the first run's files."""
    import treeprobe.compare_report as cr

    out = tmp_path / "cmp"
    base = ["compare", "--model", f"a={tiny}", "--model", f"b={tiny}", "--out", str(out), "--permutations", "9",
            "--bootstrap", "19", "--jackknife", "0", "--cluster-methods", "none", "--knn-k", "3", "--no-similarity",
            "--on", "image_id", "--quiet"]

    def old_figure(obj, fig_dir):
        fig_dir.mkdir(parents=True)
        (fig_dir / "old.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        return {}

    monkeypatch.setattr(cr, "write_compare_figures", old_figure)
    code, _, err = _run(base, capsys)
    assert code == 0, err
    snap = _snapshot(out)
    assert "figures/old.png" in snap and "compare.json" in snap and "models/a/report.json" in snap

    def interrupted(obj, d):
        raise KeyboardInterrupt

    monkeypatch.setattr(cr, "write_compare_figures", interrupted)
    assert _run(base + ["--seed", "5"], capsys)[0] == 130
    assert _snapshot(out) == snap and _leftovers(tmp_path) == []
    code, _, err = _run(base + ["--seed", "5", "--no-figures"], capsys)
    assert code == 0, err
    assert not (out / "figures").exists() and json.loads((out / "compare.json").read_text())["params"]["seed"] == 5


def test_stale_temporary_folders_of_killed_runs(tmp_path, capsys, tiny):
    """What a killed run left beside --out (its pid gone) is removed by the next run; a live process's
    temporary folder is left alone."""
    (tmp_path / f".o.tmp-{DEAD_PID}").mkdir()
    (tmp_path / f".o.tmp-{DEAD_PID}" / "report.json").write_text("{}")
    (tmp_path / f".o.probe-{DEAD_PID}").mkdir()
    live = tmp_path / f".o.tmp-{os.getppid()}"  # the parent process runs
    live.mkdir()
    code, _, err = _run(["intrinsic", "--embeddings", tiny, "--out", str(tmp_path / "o"), *FAST, "--no-figures"],
                        capsys)
    assert code == 0, err
    assert _leftovers(tmp_path) == [live.name]
    assert (tmp_path / "o" / "report.json").exists()


def test_killed_between_the_renames_recovers_the_old_report(tmp_path):
    """A run killed after moving the old report aside (.o.old-<pid>) but before the new one was in place:
    the next writer puts the old report back first, so a failing write still leaves it at --out."""
    from treeprobe._utils import atomic_output_dir

    old = tmp_path / f".o.old-{DEAD_PID}"
    old.mkdir()
    (old / "report.json").write_text('{"treeprobe_report_version": 1, "run": "old"}')
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "report.json").write_text("{}")
            raise RuntimeError("the analysis of the new run fails")
    assert json.loads((tmp_path / "o" / "report.json").read_text())["run"] == "old"
    assert _leftovers(tmp_path) == []


def test_write_report_python_api_returns_final_paths(tmp_path):
    """``write_report(report, out_dir)`` keeps its API: the paths it returns are where the files are."""
    from treeprobe import datasets, tl
    from treeprobe.report import write_report

    ds = datasets.simulated_world(seed=0, n_kingdoms=3, branching=[1, 1, 1, 1, 1, 2], images_per_species=2, dim=8)
    rep = tl.intrinsic(ds, permutations=0, maps=(), cluster_methods=(), knn_k=3, progress=False)
    paths = write_report(rep, tmp_path / "api", figures=False)
    assert set(paths) >= {"json", "per_rank_csv", "items_csv", "markdown", "html"}
    for p in paths.values():
        assert Path(p).parent == tmp_path / "api" and Path(p).is_file()
    assert _leftovers(tmp_path) == []


# --- the commands that fill a folder in place (train, make-shards, extract) or write one file ---------------

def _block_work(monkeypatch):
    """Fail loudly if training, sharding, weight export or extraction starts."""
    import treeprobe.extract_dist as extract_dist
    import treeprobe.training.checkpoint as checkpoint
    import treeprobe.training.engine as engine
    import treeprobe.training.shards as shards

    def boom(*a, **k):
        raise AssertionError("the work started before --out was refused")

    for mod, name in ((engine, "train"), (shards, "make_shards"), (checkpoint, "export_weights"),
                      (extract_dist, "_load_inputs")):
        monkeypatch.setattr(mod, name, boom)


WORK_COMMANDS = {
    "train": lambda out: ["train", "--data", "meta.csv", "--out", out, "--model", "tiny"],
    "make-shards": lambda out: ["make-shards", "--data", "meta.csv", "--out", out],
    "extract": lambda out: ["extract", "--ckpt", "m.pt", "--data", "meta.csv", "--out", out],
    "export-weights": lambda out: ["export-weights", "--ckpt", "m.pt", "--out", out],
}
WORK_OUTS = {  # setup in tmp → (the --out to pass, key words of the error)
    "existing_file": (lambda tmp: (tmp / "afile").write_text("keep") and str(tmp / "afile"),
                      ["afile"]),
    "under_a_file": (lambda tmp: (tmp / "afile").write_text("keep") and str(tmp / "afile" / "sub"),
                     ["is a file"]),
    "under_proc": (lambda tmp: "/proc/1/treeprobe_out", ["cannot write into /proc/1"]),
}


@pytest.mark.parametrize("where", list(WORK_OUTS))
@pytest.mark.parametrize("command", list(WORK_COMMANDS))
def test_work_commands_check_out_first(command, where, tmp_path, capsys, monkeypatch):
    """``train``, ``make-shards``, ``extract`` and ``export-weights`` refuse an unusable ``--out`` in one
    line before any data, model or image is read."""
    if where == "under_proc" and not os.path.isdir("/proc/1"):
        pytest.skip("no /proc")
    if (command, where) == ("export-weights", "existing_file"):
        pytest.skip("export-weights replaces an existing file (atomically), as cp does")
    monkeypatch.chdir(tmp_path)
    _block_work(monkeypatch)
    setup, words = WORK_OUTS[where]
    out = setup(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = _run(WORK_COMMANDS[command](out), capsys)
    assert code == 2
    line = _one_error_line(err)
    expected = words + (["is an existing file, not a folder"] if where == "existing_file" else [])
    for w in expected:
        assert w in line, (w, line)
    assert _snapshot(tmp_path) == before and _leftovers(tmp_path) == []


def test_work_folder_may_hold_files(tmp_path, capsys, monkeypatch):
    """A run / shard / cache folder is filled in place: an existing non-empty folder passes the check
    (the command itself decides, e.g. ``train`` refuses a fresh run over an old one)."""
    from treeprobe._utils import check_work_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    assert check_work_dir(tmp_path / "run") == tmp_path / "run"
    assert check_work_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created
