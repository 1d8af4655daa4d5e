"""treeprobe/_utils.py: row norms and normalisation, atomic writes, the numba switch, CPUs, error text."""

import importlib
import os

import numpy as np
import pandas as pd
import pytest

from treeprobe import _utils
from treeprobe._utils import (atomic_write, atomic_write_text, available_cpus, default_cache_dir, l2_normalise,
                              numba_enabled, one_line, row_norms)
from treeprobe.errors import TreeprobeError
from tests.test_tree import random_taxonomy

M = importlib.import_module("treeprobe.mantel")  # the module (the package re-exports the function `mantel`)
NB = importlib.import_module("treeprobe.neighbors")


# --- row norms and normalisation -------------------------------------------------------------------

def test_row_norms_in_chunks_equal_numpy():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1000, 7)).astype(np.float32)
    X[3, 2], X[700, 0], X[5] = np.nan, np.inf, 0.0
    finite, norms = row_norms(X, chunk=64)
    np.testing.assert_array_equal(finite, np.isfinite(X).all(axis=1))
    ok = finite
    np.testing.assert_array_equal(norms[ok], np.linalg.norm(X[ok], axis=1))
    assert norms[5] == 0 and norms[3] == 0 and norms.dtype == np.float32


def test_l2_normalise_dtypes_and_copies():
    X = np.array([[3, 4], [0, -2]])
    Xn = l2_normalise(X)
    assert Xn.dtype == np.float64
    np.testing.assert_array_equal(Xn, [[0.6, 0.8], [0.0, -1.0]])
    X32 = np.array([[3, 4], [1, 0]], dtype=np.float32)
    out = l2_normalise(X32)
    assert out.dtype == np.float32 and not np.shares_memory(out, X32)
    np.testing.assert_array_equal(X32, [[3, 4], [1, 0]])  # the input is left alone
    assert l2_normalise(X32, dtype=np.float64).dtype == np.float64
    rows = np.random.default_rng(0).normal(size=(50, 9))
    np.testing.assert_allclose(np.linalg.norm(l2_normalise(rows), axis=1), 1.0, atol=1e-15)


def test_l2_normalise_refuses_bad_rows():
    with pytest.raises(TreeprobeError, match="NaN or infinite values \\(1 rows\\)"):
        l2_normalise(np.array([[np.nan, 1.0]]))
    with pytest.raises(TreeprobeError, match="2 embedding rows are all zeros \\(first: row 1\\)"):
        l2_normalise(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(TreeprobeError, match="2-D"):
        l2_normalise(np.ones(3))


# --- atomic writes ------------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "new" / "sub" / "out.bin"  # parents are created
    assert atomic_write(path, lambda f: f.write(b"abc")) == path
    assert path.read_bytes() == b"abc"
    atomic_write_text(path, "naïve – text", fsync=False)
    assert path.read_text(encoding="utf-8") == "naïve – text"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(path.parent) == ["out.bin"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_that_raises_leaves_the_old_file_and_no_temporary(tmp_path, exc):
    path = tmp_path / "report.json"
    path.write_text("old")

    def write(f):
        f.write(b"half of the new ")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


# --- the numba switch -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,enabled", [(None, True), ("", True), ("0", True), ("1", False), ("yes", False)])
def test_numba_enabled_reads_the_variable_at_each_call(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("TREEPROBE_NO_NUMBA", raising=False)
    else:
        monkeypatch.setenv("TREEPROBE_NO_NUMBA", value)
    assert numba_enabled() is enabled
    assert (M._kernels() is not None) is enabled
    assert (NB._numba_kernels() is not None) is enabled


def test_no_numba_switches_mantel_and_knn_to_numpy_with_the_same_numbers(monkeypatch):
    """One variable turns off every kernel; the numpy paths then run and give the numba numbers."""
    cs = random_taxonomy(150, 3).clade_structure()
    rng = np.random.default_rng(4)
    X = rng.normal(size=(150, 6)) + 2 * np.eye(6)[cs.item_node % 6]
    Y = rng.normal(size=(700, 24))[rng.integers(0, 60, 700)] + 0.3 * rng.normal(size=(700, 24))
    codes = {"genus": np.arange(700) % 37}
    numpy_blocks = []
    orig_update = NB._TopBuffer._update_numpy

    def spy_update(self, *args):
        numpy_blocks.append(args[1].shape)
        return orig_update(self, *args)

    monkeypatch.setattr(NB._TopBuffer, "_update_numpy", spy_update)
    permuted = []
    orig_run = M._run_permutations

    def spy_run(*args):
        out = orig_run(*args)
        permuted.append(out.copy())
        return out

    monkeypatch.setattr(M, "_run_permutations", spy_run)

    def run():
        kw = dict(permutations=40, seed=5, alternative="two-sided")
        tree = M.mantel_tree(X, cs, perm_dtype=np.float64, n_jobs=1, **kw)
        mat = M.mantel(M.cosine_distance_matrix(X), cs.item_distances(), **kw)
        knn = NB.knn_indices(Y, 9, block_size=300)
        agree = NB.knn_rank_agreement(Y, codes, k=5, block_size=256, max_queries=200, seed=1)
        return tree, mat, knn, agree

    monkeypatch.delenv("TREEPROBE_NO_NUMBA", raising=False)
    fast = run()
    assert fast[0].details["backend"] == "numba" and not numpy_blocks
    monkeypatch.setenv("TREEPROBE_NO_NUMBA", "1")
    slow = run()
    assert slow[0].details["backend"] == "numpy"
    assert len(numpy_blocks) > 10  # every kNN block went through the numpy top-k buffers
    for a, b in zip(fast[:2], slow[:2]):
        assert a.statistic == b.statistic and a.p_value == b.p_value
    for a, b in zip(permuted[:2], permuted[2:]):  # (tree, matrix) permuted r of each run
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fast[2][0], slow[2][0])
    np.testing.assert_array_equal(fast[2][1], slow[2][1])
    pd.testing.assert_frame_equal(fast[3], slow[3], check_exact=True)


# --- small helpers --------------------------------------------------------------------------------------

def test_available_cpus_is_the_affinity_mask():
    assert available_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_one_line():
    assert one_line(KeyError(101)) == "KeyError: 101"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(ValueError("first line\n  second   line of the message")) == "first line second line of the message"
    long = one_line(ValueError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TREEPROBE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TREEPROBE_CACHE")
    assert default_cache_dir() == _utils.Path.home() / ".cache" / "treeprobe"
