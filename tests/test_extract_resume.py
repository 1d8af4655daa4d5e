"""Resume of an interrupted extraction (treeprobe.extract, treeprobe.extract_dist): Ctrl-C and
SIGTERM save the finished batches, periodic chunks bound what a hard kill loses, and a rerun
embeds only the missing images, bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import treeprobe.extract as ex
from treeprobe.extract import cache_file_for, cache_key, extract_embeddings, partial_dir_for
from treeprobe.extract_dist import extract_distributed, main as dist_main, merge_shards
from treeprobe.models import load_model

N, BATCH = 30, 4  # 8 batches: 7 of 4 and one of 2
BAD = (5, 17)  # a corrupt file and a missing one


@pytest.fixture(scope="module")
def lm(tiny_clip_checkpoint):
    return load_model(ckpt=tiny_clip_checkpoint[0])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_images")
    rng = np.random.default_rng(3)
    out = []
    for i in range(N):
        p = d / f"{i:02d}.png"
        if i == BAD[0]:
            p.write_bytes(b"\x89PNG not really")
        elif i != BAD[1]:
            Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def reference(lm, paths):
    """Uninterrupted, no cache, the same batches."""
    return extract_embeddings(lm, paths, batch_size=BATCH, progress=False)


class Hook:
    """Stands in for ``encode_batch``: counts calls and images; calls ``act`` at call number ``at``."""

    def __init__(self, monkeypatch, at=None, act=None):
        self.real, self.at, self.act, self.calls, self.images = ex.encode_batch, at, act, 0, 0
        monkeypatch.setattr(ex, "encode_batch", self)

    def __call__(self, model, images, plan):
        self.calls += 1
        if self.calls == self.at:
            self.act()
        self.images += len(images)
        return self.real(model, images, plan)


def _raise(exc):
    def act():
        raise exc
    return act


def _ok_images_in_batches(first_batch: int) -> int:
    """Decodable images in batches first_batch.. of the listing."""
    return sum(1 for i in range(first_batch * BATCH, N) if i not in BAD)


def _pdir(lm, paths, cache):
    return partial_dir_for(cache_file_for(cache, cache_key(lm, paths)))


def _assert_same(res, reference):
    np.testing.assert_array_equal(res.embeddings, reference.embeddings)  # bitwise
    np.testing.assert_array_equal(res.ok, reference.ok)
    pd.testing.assert_frame_equal(res.failures, reference.failures)


def _chunk_items(pdir) -> list[int]:
    items = []
    for name in sorted(os.listdir(pdir)):
        with np.load(os.path.join(pdir, name)) as z:
            items += z["items"].tolist()
    return sorted(items)


def test_ctrl_c_saves_finished_batches_and_the_rerun_is_identical(tmp_path, lm, paths, reference, monkeypatch):
    """KeyboardInterrupt while batch 5 (of 8) runs: batches 1-4 (the 4th still on its way back
    from the model) are written although no periodic chunk was due; the rerun embeds batches 5-8."""
    cache = tmp_path / "cache"
    Hook(monkeypatch, at=5, act=_raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, chunk_batches=100, chunk_seconds=1e9,
                           progress=False)
    pdir = _pdir(lm, paths, cache)
    assert _chunk_items(pdir) == list(range(4 * BATCH))
    assert not os.path.exists(cache_file_for(cache, cache_key(lm, paths)))

    hook = Hook(monkeypatch)
    res = extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False)
    assert (hook.calls, hook.images) == (8 - 4, _ok_images_in_batches(4))
    _assert_same(res, reference)
    assert not os.path.exists(pdir)


def test_sigterm_saves_finished_batches_and_restores_the_handler(tmp_path, lm, paths, reference, monkeypatch):
    """SIGTERM (a scheduler or torchrun stopping the job) acts as Ctrl-C during the batch loop; the
    handler that was there before is back afterwards and never saw the signal."""
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)  # also keeps pytest alive should the code not catch it
    try:
        cache = tmp_path / "cache"
        Hook(monkeypatch, at=3, act=lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(KeyboardInterrupt):
            extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, chunk_batches=100, chunk_seconds=1e9,
                               progress=False)
        assert seen == []
        assert signal.getsignal(signal.SIGTERM) is mine  # restored: it gets the next one
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _chunk_items(_pdir(lm, paths, cache)) == list(range(2 * BATCH))

    hook = Hook(monkeypatch)
    res = extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False)
    assert (hook.calls, hook.images) == (8 - 2, _ok_images_in_batches(2))
    _assert_same(res, reference)


def test_ctrl_c_with_decoding_workers(tmp_path, lm, paths, reference, monkeypatch):
    cache = tmp_path / "cache"
    Hook(monkeypatch, at=4, act=_raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(lm, paths, batch_size=BATCH, num_workers=1, cache_dir=cache, chunk_batches=100,
                           progress=False)
    assert _chunk_items(_pdir(lm, paths, cache)) == list(range(3 * BATCH))
    hook = Hook(monkeypatch)
    res = extract_embeddings(lm, paths, batch_size=BATCH, num_workers=1, cache_dir=cache, progress=False)
    assert hook.calls == 8 - 3
    _assert_same(res, reference)


@pytest.mark.parametrize("options, chunks, saved", [
    (dict(chunk_batches=3, chunk_seconds=1e9), 2, 6),  # after batches 3 and 6
    (dict(chunk_batches=100, chunk_seconds=0.0), 7, 7),  # after every batch
])
def test_periodic_chunks_bound_what_a_crash_loses(options, chunks, saved, tmp_path, lm, paths, reference,
                                                  monkeypatch):
    """A crash (not an interrupt: nothing is saved then) in batch 8 loses only the batches since the
    last periodic chunk: every ``chunk_batches`` batches or ``chunk_seconds``, whichever first."""
    assert ex.DEFAULT_CHUNK_SECONDS <= 60 and ex.RunOptions().batches_per_chunk == ex.DEFAULT_CHUNK_IMAGES // 64
    cache = tmp_path / "cache"
    Hook(monkeypatch, at=8, act=_raise(RuntimeError("simulated crash")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False, **options)
    pdir = _pdir(lm, paths, cache)
    assert len(os.listdir(pdir)) == chunks
    assert _chunk_items(pdir) == list(range(saved * BATCH))
    hook = Hook(monkeypatch)
    _assert_same(extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False), reference)
    assert hook.calls == 8 - saved


def test_interrupt_while_the_cache_file_is_written_loses_no_batch(tmp_path, lm, paths, reference, monkeypatch):
    """The last batches are written as a chunk before the cache file, so a Ctrl-C at that moment
    leaves everything on disk: the rerun runs no batch at all."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(ex, "write_cache", lambda *a, **k: _raise(KeyboardInterrupt)())
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False)
    monkeypatch.undo()
    hook = Hook(monkeypatch)
    res = extract_embeddings(lm, paths, batch_size=BATCH, cache_dir=cache, progress=False)
    assert hook.calls == 0 and not res.cache_hit
    _assert_same(res, reference)


def test_sharded_extraction_resumes_an_interrupted_rank(tmp_path, lm, paths, monkeypatch):
    """Two shards written without a process group; rank 0 is interrupted in its 3rd batch, rerun,
    and the merged cache equals that of an uninterrupted sharded run bit for bit."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    clean = tmp_path / "clean"
    for rank in (0, 1):
        extract_distributed(lm, paths, clean, rank=rank, world_size=2, batch_size=BATCH, progress=False)
    merge_shards(lm, paths, clean, world_size=2)
    expected = extract_embeddings(lm, paths, cache_dir=clean, progress=False)
    assert expected.cache_hit

    cache = tmp_path / "cache"
    Hook(monkeypatch, at=3, act=_raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_distributed(lm, paths, cache, rank=0, world_size=2, batch_size=BATCH, chunk_batches=100,
                            progress=False)
    partials = [f for f in os.listdir(cache) if f.endswith(".partial")]
    assert len(partials) == 1 and "shard-00000-of-00002" in partials[0]
    assert _chunk_items(cache / partials[0]) == list(range(2 * BATCH))  # shard-local indices

    hook = Hook(monkeypatch)
    for rank in (0, 1):
        extract_distributed(lm, paths, cache, rank=rank, world_size=2, batch_size=BATCH, progress=False)
    assert hook.calls == (4 - 2) + 4  # rank 0: 15 paths = 4 batches, 2 saved; rank 1: 4 batches
    merge_shards(lm, paths, cache, world_size=2)
    hit = extract_embeddings(lm, paths, cache_dir=cache, progress=False)
    assert hit.cache_hit
    _assert_same(hit, expected)


def test_extract_command_interrupted_exits_130_then_resumes(tmp_path, lm, paths, reference, tiny_clip_checkpoint,
                                                           monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    lineage = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]
    csv = tmp_path / "meta.csv"
    pd.DataFrame([[p] + lineage for p in paths],
                 columns=["path", "kingdom", "phylum", "class", "order", "family", "genus", "species"]).to_csv(
        csv, index=False)
    argv = ["--data", str(csv), "--ckpt", tiny_clip_checkpoint[0], "--out", str(tmp_path / "out"),
            "--batch-size", str(BATCH), "--no-progress"]
    Hook(monkeypatch, at=4, act=_raise(KeyboardInterrupt))
    assert dist_main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("treeprobe: interrupted") and "resume" in err and err.count("\n") == 1
    hook = Hook(monkeypatch)
    assert dist_main(argv) == 0
    assert hook.calls == 8 - 3
    assert "28 embeddings (2 images skipped)" in capsys.readouterr().err
    hit = extract_embeddings(lm, paths, cache_dir=tmp_path / "out", progress=False)
    assert hit.cache_hit
    _assert_same(hit, reference)
