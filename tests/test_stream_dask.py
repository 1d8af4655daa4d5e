"""treeprobe.stream_dask: the streaming pass distributed over a 2-worker Dask LocalCluster equals the
single-process pass (treeprobe.stream.species_statistics on the same files), a killed worker included.

Bit-for-bit where the additions are the same: counts, row/skip counts and lineages always; sums, Σ‖x̂‖²,
within-species terms and covariate sums of a species whose rows lie in one shard (each task reads its files
with the same batches and blocks as the single pass, and a merge adds them to zeros). To 1e-12 relative:
those of a species running across a shard boundary and the Gram matrix (the same terms in another grouping).
"""

import functools
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed not installed (pip install treeprobe[dask])")

from treeprobe import stream, stream_dask  # noqa: E402
from treeprobe.errors import TreeprobeError  # noqa: E402
from treeprobe.stream import mantel_from_stats, physignal_from_stats, species_statistics  # noqa: E402
from treeprobe.taxonomy import RANKS  # noqa: E402

from tests.test_stream import _sorted, _split_inside_species, _write_shards  # noqa: E402

TOL = 1e-12
OPTS = dict(gram=True, covariate="img_type", batch_rows=64)  # several batches per shard
_REDUCE = stream_dask._reduce_group  # the real task (the test module is imported on the workers too)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards cut inside species (row groups of 50 rows) of a sorted 8-d world: 48 species with 2-120
    images (Grams above D rows and rows below), 30 rows unknown at species, 6 null and 3 NaN embeddings."""
    from treeprobe.simulate import simulate_world

    w = simulate_world(n_kingdoms=2, branching=[1, 2, 2, 2, 1, (2, 4)], images_per_species=(2, 120), dim=8, seed=7)
    items = w.items[list(RANKS)].copy()
    rng = np.random.default_rng(1)
    items.loc[rng.choice(len(items), 30, replace=False), "species"] = ""
    items["img_type"] = rng.choice(["museum", "citizen", "camera"], len(items))
    X = w.embeddings.astype(np.float32)
    X[rng.choice(len(X), 3, replace=False), 2] = np.nan
    emb = list(X)
    for i in rng.choice(len(X), 6, replace=False):
        emb[i] = None
    table = pa.Table.from_pandas(items, preserve_index=False)
    table = _sorted(table.append_column("emb", pa.array(emb, type=pa.list_(pa.float32()))))
    folder = tmp_path_factory.mktemp("dask_shards")
    files = _write_shards(table, folder, _split_inside_species(table, 6), row_group_size=50)
    return dict(files=files, folder=str(folder), table=table)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c, set_as_default=False) as cl:
        yield cl


def _inside_one_shard(st, files) -> np.ndarray:
    """(S,) bool in canonical order: the unit's rows are all in one shard (single items always are)."""
    per_shard = [set(map(tuple, pq.read_table(f, columns=list(RANKS)).to_pandas().fillna("").to_numpy()))
                 for f in files]
    lin = st.lineages.to_numpy()
    return np.array([row[-1] == "" or sum(tuple(row) in s for s in per_shard) == 1 for row in lin])


def _assert_equal_stats(ref, got, files):
    assert got.files == ref.files and got.n_rows == ref.n_rows and got.n_filtered == ref.n_filtered
    assert got.n_skipped == ref.n_skipped and got.skipped_examples == ref.skipped_examples
    pd.testing.assert_frame_equal(got.lineages, ref.lineages)
    np.testing.assert_array_equal(got.counts, ref.counts)
    inside = _inside_one_shard(ref, files)
    assert 0 < (~inside).sum() < len(inside)  # some species do span shards
    for name in ("sums", "sq", "within"):
        a, b = getattr(ref, name), getattr(got, name)
        np.testing.assert_array_equal(b[inside], a[inside])
        np.testing.assert_allclose(b[~inside], a[~inside], rtol=TOL, atol=TOL * np.abs(a).max())
    np.testing.assert_allclose(got.gram, ref.gram, rtol=0, atol=TOL * np.abs(ref.gram).max())
    assert got.within_exact == ref.within_exact
    cr, cg = ref.covariate_table(), got.covariate_table()
    for a, b in zip(cr[:3], cg[:3]):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(cg[3], cr[3], rtol=0, atol=TOL * np.abs(cr[3]).max())


def test_dask_pass_equals_single_process_and_same_tests(shards, client):
    ref = species_statistics(shards["folder"], progress=False, **OPTS)
    got = stream_dask.species_statistics_dask(shards["folder"], scheduler=client, progress=False, **OPTS)
    assert ref.n_skipped == {"missing embedding": 6, "non-finite embedding": 3}
    assert ref.n_units > 48 and ref.within_exact and len(ref.files) == 6
    _assert_equal_stats(ref, got, shards["files"])
    assert got.timings["tasks"] == 6 and got.timings["task_seconds"] > 0
    opts = dict(methods=("pearson", "spearman"), permute=("species", "images"), permutations=49, seed=3)
    a, b = mantel_from_stats(ref, **opts), mantel_from_stats(got, **opts)
    done = a.estimator != stream.NOT_FROM_STATS
    assert done.sum() == 5 and (b.estimator == a.estimator).all()
    np.testing.assert_allclose(b.statistic[done], a.statistic[done], rtol=0, atol=TOL)
    assert (b.p_value[done].to_numpy() == a.p_value[done].to_numpy()).all()
    assert (0 < a.p_value[done]).all()
    ka, kb = physignal_from_stats(ref, permutations=49, seed=2), physignal_from_stats(got, permutations=49, seed=2)
    assert abs(kb.statistic - ka.statistic) < TOL and kb.p_value == ka.p_value


def test_engine_hook_local_cluster_and_files_per_task(shards):
    """engine='dask' in stream.species_statistics, no scheduler: a LocalCluster started and closed by the call;
    3 files per task (an odd number of tasks would be carried up the merge tree: here 2)."""
    ref = species_statistics(shards["files"], progress=False, **OPTS)
    got = species_statistics(shards["files"], engine="dask", progress=False, **OPTS)
    _assert_equal_stats(ref, got, shards["files"])
    got3 = stream_dask.species_statistics_dask(shards["files"][:5], files_per_task=2, n_workers=1, progress=False,
                                               **OPTS)
    _assert_equal_stats(species_statistics(shards["files"][:5], progress=False, **OPTS), got3, shards["files"][:5])
    assert got3.timings["tasks"] == 3


def test_where_leaves_whole_shards_empty(shards, client):
    """A clade filter on taxonomy-sorted shards: whole shards have no row (their row groups are skipped
    unread); their rows still count in n_rows / n_filtered as in the single pass."""
    kingdom = shards["table"].column("kingdom")[0].as_py()
    opts = dict(OPTS, where={"kingdom": kingdom})
    ref = species_statistics(shards["files"], progress=False, **opts)
    got = stream_dask.species_statistics_dask(shards["files"], scheduler=client, progress=False, **opts)
    empty = [f for f in shards["files"] if kingdom not in set(pq.read_table(f, columns=["kingdom"])[0].to_pylist())]
    assert empty and ref.n_filtered > 0 and ref.n_rows == len(shards["table"])
    assert got.n_rows == ref.n_rows and got.n_filtered == ref.n_filtered and got.files == ref.files
    np.testing.assert_array_equal(got.counts, ref.counts)
    np.testing.assert_allclose(got.sums, ref.sums, rtol=0, atol=TOL * 100)
    assert got.n_skipped == ref.n_skipped and got.skipped_examples == ref.skipped_examples
    with pytest.raises(TreeprobeError, match=r"no embeddings read from 2 files \(\d+ rows, \d+ filtered"):
        stream_dask.species_statistics_dask(empty[-2:], scheduler=client, progress=False, **opts)


def test_shards_of_null_embeddings_count_as_in_the_single_pass(shards, client, tmp_path):
    """Two leading shards whose embeddings are all null: no statistics of their own, but their rows are
    "missing embedding" (counts and the first examples, in file order) exactly as in the single pass."""
    t = shards["table"]
    null = []
    for j, n in enumerate((4, 3)):
        part = t.slice(0, n)
        part = part.set_column(part.schema.get_field_index("emb"), "emb", pa.nulls(n, part.schema.field("emb").type))
        null.append(str(tmp_path / f"null{j}.parquet"))
        pq.write_table(part, null[-1])
    files = null + shards["files"][:3]
    ref = species_statistics(files, progress=False, **OPTS)
    got = stream_dask.species_statistics_dask(files, scheduler=client, progress=False, **OPTS)
    assert ref.n_skipped["missing embedding"] >= 7 and ref.skipped_examples["missing embedding"][4].startswith(null[1])
    _assert_equal_stats(ref, got, files)


def _dies_once(files, kwargs, *, marker, victim):
    """The task, except that on ``victim`` it kills its worker process once, after reading, before returning."""
    out = _REDUCE(files, kwargs)
    if files[0] == victim:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return out
        os._exit(1)
    return out


def _always_dies(files, kwargs):
    os._exit(1)


def test_killed_worker_task_is_rerun_nothing_counted_twice(shards, client, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(stream_dask, "_reduce_group",
                        functools.partial(_dies_once, marker=str(marker), victim=shards["files"][2]))
    ref = species_statistics(shards["folder"], progress=False, **OPTS)
    got = stream_dask.species_statistics_dask(shards["folder"], scheduler=client, progress=False, **OPTS)
    assert marker.exists()  # the worker did die mid-task
    assert got.n_rows == ref.n_rows == len(shards["table"]) and got.n_items == ref.n_items
    _assert_equal_stats(ref, got, shards["files"])
    client.wait_for_workers(2, timeout=30)  # the nanny restarted it (the cluster is shared by the module)


def test_clear_errors(shards, client, tmp_path, monkeypatch):
    with pytest.raises(TreeprobeError, match="cannot reach the Dask scheduler 'tcp://127.0.0.1:9'"):
        stream_dask.species_statistics_dask(shards["files"], scheduler="tcp://127.0.0.1:9", connect_timeout=1)
    bad = tmp_path / "part02.parquet"
    bad.write_bytes(b"PAR1 not really a parquet file PAR1")
    files = [shards["files"][0], str(bad), shards["files"][3]]
    with pytest.raises(TreeprobeError, match=f"cannot read parquet {bad}") as info:
        stream_dask.species_statistics_dask(files, scheduler=client, progress=False)
    assert "Traceback" not in str(info.value) and info.value.__cause__ is None
    np.save(tmp_path / "emb.npy", np.zeros((3, 2)))
    with pytest.raises(TreeprobeError, match="one .npy memory map"):
        species_statistics(tmp_path / "emb.npy", engine="dask")
    with pytest.raises(TreeprobeError, match="engine must be 'local' or 'dask'"):
        species_statistics(shards["files"], engine="spark")
    with pytest.raises(TreeprobeError, match="files_per_task"):
        stream_dask.species_statistics_dask(shards["files"], scheduler=client, files_per_task=0)
    with pytest.raises(TreeprobeError, match="lacks column"):  # a data error from one worker, as is
        stream_dask.species_statistics_dask(shards["files"], scheduler=client, progress=False,
                                            columns={"genus": "no_such_column"})


def test_a_task_that_always_kills_its_worker(shards, tmp_path, monkeypatch):
    import dask

    monkeypatch.setattr(stream_dask, "_reduce_group", _always_dies)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        with pytest.raises(TreeprobeError, match=f"reading {shards['files'][0]} killed its worker"):
            stream_dask.species_statistics_dask(shards["files"][:1], scheduler=c, progress=False)


def test_missing_dask_is_a_clear_error(monkeypatch, shards):
    import builtins

    real = builtins.__import__

    def no_distributed(name, *a, **k):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("No module named 'distributed'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    with pytest.raises(TreeprobeError, match=r"pip install 'treeprobe\[dask\]'"):
        species_statistics(shards["files"], engine="dask")


def test_the_seeded_sample_is_the_same_on_workers(shards, client):
    """species_statistics(sample=...) passes through untouched; the merged sample is the single pass's, bit for bit."""
    import inspect

    if "sample" not in inspect.signature(species_statistics).parameters:
        pytest.skip("species_statistics has no sample= here")
    opts = dict(OPTS, sample=150, sample_seed=4)
    ref = species_statistics(shards["files"], progress=False, **opts)
    got = stream_dask.species_statistics_dask(shards["files"], scheduler=client, progress=False, **opts)
    assert ref.has_sample and got.has_sample
    pd.testing.assert_frame_equal(got.sample_items(), ref.sample_items())
    assert got.sample_vectors().tobytes() == ref.sample_vectors().tobytes()
    for k in ("cap", "n_sampled", "n_strata", "n_rows", "n_items"):
        assert got.sample_info[k] == ref.sample_info[k], k
