"""Extraction at scale: DataLoader workers, resume after an interruption, sharded extraction
(torchrun with 2 CPU ranks on gloo, and shards merged without a process group)."""

from tests._paths import SHARED_DATA
import argparse
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import treeprobe.extract as ex
from treeprobe.data import load_data
from treeprobe.errors import TreeprobeError
from treeprobe.extract import cache_file_for, extract_embeddings, partial_dir_for
from treeprobe.extract_dist import add_subcommands, extract_distributed, main as dist_main, merge_shards, shard_bounds
from treeprobe.models import load_model

REPO = Path(__file__).resolve().parents[1]
MULTIKINGDOM_CSV = str(SHARED_DATA / "multikingdom_photos_index" / "metadata.csv")
needs_photos = pytest.mark.skipif(not os.path.exists(MULTIKINGDOM_CSV), reason="shared photos missing")


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    """40 real photos over the four source sets, with a corrupt file at 3 and a missing one at 22:
    (metadata CSV with absolute paths, list of the 42 paths in CSV order)."""
    df = pd.read_csv(MULTIKINGDOM_CSV, dtype=str)
    rows = df.iloc[np.linspace(0, len(df) - 1, 40).astype(int)].copy()
    rows["path"] = [os.path.normpath(os.path.join(os.path.dirname(MULTIKINGDOM_CSV), p)) for p in rows["path"]]
    d = tmp_path_factory.mktemp("listing")
    corrupt = d / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    bad = [rows.iloc[0].copy(), rows.iloc[0].copy()]
    bad[0]["path"], bad[1]["path"] = str(corrupt), str(d / "missing.jpg")
    rows = pd.concat([rows.iloc[:3], bad[0].to_frame().T, rows.iloc[3:21], bad[1].to_frame().T, rows.iloc[21:]],
                     ignore_index=True)
    csv = d / "metadata.csv"
    rows.to_csv(csv, index=False)
    return str(csv), rows["path"].tolist()


@pytest.fixture(scope="module")
def tiny(tiny_clip_checkpoint):
    return load_model(ckpt=tiny_clip_checkpoint[0])


@pytest.fixture(scope="module")
def reference(tiny, listing):
    """Single process, no workers, no cache."""
    return extract_embeddings(tiny, listing[1], batch_size=8, progress=False)


def test_shard_bounds_cover_in_order():
    for n, w in [(42, 2), (5, 3), (2, 4), (1000, 7)]:
        bounds = [shard_bounds(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@needs_photos
def test_reference_records_failures(reference, listing):
    paths = listing[1]
    assert reference.embeddings.shape == (40, 32)
    assert np.flatnonzero(~reference.ok).tolist() == [3, 22]
    assert reference.failures["item"].tolist() == [paths[3], paths[22]]
    assert reference.failures["reason"].iloc[0].startswith("cannot decode image")
    assert reference.failures["reason"].iloc[1] == "missing file"
    np.testing.assert_allclose(np.linalg.norm(reference.embeddings, axis=1), 1.0, atol=1e-5)


@needs_photos
def test_workers_equal_no_workers(tiny, listing, reference):
    res = extract_embeddings(tiny, listing[1], batch_size=8, num_workers=2, prefetch_factor=3, progress=False)
    np.testing.assert_array_equal(res.embeddings, reference.embeddings)
    np.testing.assert_array_equal(res.ok, reference.ok)
    pd.testing.assert_frame_equal(res.failures, reference.failures)
    assert res.compute == "fp32"


@needs_photos
def test_resume_after_interrupt_is_identical(tmp_path, tiny, listing, reference, monkeypatch):
    paths, cache = listing[1], tmp_path / "cache"
    real_encode = ex.encode_batch
    calls = []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_encode(*a, **k)

    monkeypatch.setattr(ex, "encode_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_embeddings(tiny, paths, batch_size=8, cache_dir=cache, chunk_batches=2, progress=False)
    key = ex.cache_key(tiny, paths)
    pdir = partial_dir_for(cache_file_for(cache, key))
    # batches 1-2 were saved as one chunk when the 4th batch crashed; no cache file yet
    assert sorted(os.listdir(pdir)) == ["chunk-000000.npz"]
    assert not os.path.exists(cache_file_for(cache, key))

    calls.clear()
    monkeypatch.setattr(ex, "encode_batch", lambda *a, **k: (calls.append(1), real_encode(*a, **k))[1])
    res = extract_embeddings(tiny, paths, batch_size=8, cache_dir=cache, chunk_batches=2, progress=False)
    assert not res.cache_hit
    assert len(calls) == 6 - 2  # 42 paths = 6 batches of 8; only the 4 unsaved ones ran again
    np.testing.assert_array_equal(res.embeddings, reference.embeddings)
    np.testing.assert_array_equal(res.ok, reference.ok)
    pd.testing.assert_frame_equal(res.failures, reference.failures)
    assert not os.path.exists(pdir) and os.path.exists(cache_file_for(cache, key))

    # an interruption in the middle of a chunk and a damaged chunk: still identical
    shutil.rmtree(cache)
    calls.clear()
    monkeypatch.setattr(ex, "encode_batch", crashing)
    with pytest.raises(RuntimeError):
        extract_embeddings(tiny, paths, batch_size=8, num_workers=1, cache_dir=cache, chunk_batches=1,
                           progress=False)
    assert len(os.listdir(pdir)) == 3
    Path(pdir, "chunk-000002.npz").write_bytes(b"garbage")
    monkeypatch.setattr(ex, "encode_batch", real_encode)
    with pytest.warns(UserWarning, match="ignoring unreadable resume chunk"):
        res = extract_embeddings(tiny, paths, batch_size=8, cache_dir=cache, chunk_batches=1, progress=False)
    np.testing.assert_array_equal(res.embeddings, reference.embeddings)
    pd.testing.assert_frame_equal(res.failures, reference.failures)


@needs_photos
def test_autocast_cache_is_found_by_auto(tmp_path, tiny, listing):
    """A cache made under bf16 autocast (e.g. on GPUs) is a hit for an 'auto' lookup on the CPU."""
    paths = listing[1][:10]
    made = extract_embeddings(tiny, paths, batch_size=8, cache_dir=tmp_path, autocast="bf16", progress=False)
    assert made.compute == "fp32+autocast_bf16"
    again = extract_embeddings(tiny, paths, cache_dir=tmp_path, progress=False)
    assert again.cache_hit and again.compute == "fp32+autocast_bf16"
    np.testing.assert_array_equal(again.embeddings, made.embeddings)
    # asking for fp32 explicitly does not take the bf16 file
    fp32 = extract_embeddings(tiny, paths, cache_dir=tmp_path, autocast="off", progress=False)
    assert not fp32.cache_hit and fp32.compute == "fp32"
    assert np.abs(fp32.embeddings - made.embeddings).max() < 0.05
    with pytest.raises(TreeprobeError, match="unknown autocast"):
        extract_embeddings(tiny, paths, autocast="fp8", progress=False)


@needs_photos
def test_shards_without_process_group_then_merge(tmp_path, tiny, listing, reference, monkeypatch):
    """Independent jobs (no process group): each writes its shard; a merge step makes the cache."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    paths = listing[1]
    for rank in (2, 0):
        assert extract_distributed(tiny, paths, tmp_path, rank=rank, world_size=3, batch_size=8,
                                   progress=False) is None
    with pytest.raises(TreeprobeError, match=r"1 of 3 shard files missing .*ranks 1\)"):
        merge_shards(tiny, paths, tmp_path, world_size=3)
    extract_distributed(tiny, paths, tmp_path, rank=1, world_size=3, batch_size=8, progress=False)
    merge_shards(tiny, paths, tmp_path, world_size=3)
    assert [f for f in os.listdir(tmp_path) if "shard" in f] == []
    res = extract_embeddings(tiny, paths, cache_dir=tmp_path, progress=False)
    assert res.cache_hit
    np.testing.assert_allclose(res.embeddings, reference.embeddings, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(res.failures, reference.failures)

    # shards made under bf16 autocast (GPU jobs) merged by a default ('auto') step on the CPU:
    # the merge finds them, and so does a later 'auto' lookup
    bf16 = tmp_path / "bf16"
    for rank in (0, 1):
        extract_distributed(tiny, paths, bf16, rank=rank, world_size=2, autocast="bf16", batch_size=8,
                            progress=False)
    merge_shards(tiny, paths, bf16, world_size=2)
    hit = extract_embeddings(tiny, paths, cache_dir=bf16, progress=False)
    assert hit.cache_hit and hit.compute == "fp32+autocast_bf16"
    assert np.abs(hit.embeddings - reference.embeddings).max() < 0.05

    # WORLD_SIZE=1 through the CLI: one shard, merged at once
    out = tmp_path / "single"
    assert dist_main(["--data", listing[0], "--ckpt", tiny.source, "--out", str(out), "--batch-size", "8",
                      "--no-progress", "--world-size", "1", "--rank", "0"]) == 0
    hit = extract_embeddings(tiny, paths, cache_dir=out, progress=False)
    assert hit.cache_hit
    np.testing.assert_array_equal(hit.embeddings, reference.embeddings)  # same batches: bitwise equal


@needs_photos
def test_torchrun_two_ranks_gloo_equals_single_process(tmp_path, tiny, listing, reference, tiny_clip_checkpoint):
    csv, paths = listing
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "cache"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "treeprobe.extract_dist",
           "--data", csv, "--ckpt", tiny_clip_checkpoint[0], "--out", str(out), "--batch-size", "8",
           "--workers", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "40 embeddings (2 images skipped)" in proc.stderr
    assert [f for f in os.listdir(out) if "shard" in f or "partial" in f] == []

    # what `treeprobe intrinsic --data csv --ckpt ... --cache-dir out` does next: a cache hit
    from treeprobe.data import load_data

    assert load_data(csv).items["path"].tolist() == paths
    res = extract_embeddings(load_model(ckpt=tiny_clip_checkpoint[0]), paths, cache_dir=out, progress=False)
    assert res.cache_hit
    np.testing.assert_allclose(res.embeddings, reference.embeddings, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.ok, reference.ok)
    pd.testing.assert_frame_equal(res.failures, reference.failures)


def test_extract_subcommand_cache_is_hit_by_extract_embeddings(tmp_path, tiny, tiny_clip_checkpoint, monkeypatch,
                                                               capsys):
    """`treeprobe extract` through argparse, one process. Catches: a cache key built otherwise than
    extract_embeddings builds it (device, autocast, listing: no hit), CLI defaults that drifted
    from the functions' (other batches: not bitwise equal), input errors printed instead of raised."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "images"
    species = data / "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax"
    species.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(species / f"{i}.png")
    (species / "5.jpg").write_bytes(b"\xff\xd8 broken")
    cache = tmp_path / "cache"
    parser = argparse.ArgumentParser(prog="treeprobe")
    add_subcommands(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["extract", "--data", str(data), "--ckpt", tiny_clip_checkpoint[0],
                              "--cache-dir", str(cache), "--no-progress"])
    assert args.batch_size == inspect.signature(extract_embeddings).parameters["batch_size"].default
    assert args.func(args) == 0
    assert "5 embeddings (1 images skipped), extracted" in capsys.readouterr().err
    assert [f for f in os.listdir(cache) if "shard" in f or "partial" in f] == []

    paths = load_data(str(data)).items["path"].tolist()
    hit = extract_embeddings(tiny, paths, cache_dir=cache, progress=False)
    assert hit.cache_hit
    fresh = extract_embeddings(tiny, paths, progress=False)
    np.testing.assert_array_equal(hit.embeddings, fresh.embeddings)
    np.testing.assert_array_equal(hit.ok, [True] * 5 + [False])
    pd.testing.assert_frame_equal(hit.failures, fresh.failures)

    args = parser.parse_args(["extract", "--data", str(data), "--cache-dir", str(cache)])
    with pytest.raises(TreeprobeError, match="images need a model"):
        args.func(args)
    # python -m treeprobe.extract_dist: the same options; an input error is one line, status 2
    assert dist_main(["--data", str(tmp_path / "absent"), "--ckpt", tiny_clip_checkpoint[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("treeprobe: error: ") and err.count("\n") == 1
