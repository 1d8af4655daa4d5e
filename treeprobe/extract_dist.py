"""Sharded (multi-GPU, multi-node) image-embedding extraction, merged into treeprobe's cache.

Run one process per GPU with torchrun; each rank embeds a contiguous shard of the image
listing and writes its own shard file; rank 0 then merges the shards into the same cache
file that :func:`treeprobe.extract.extract_embeddings` (and so ``treeprobe intrinsic``)
reads, so the analysis that follows is a cache hit::

    torchrun --nproc_per_node 8 -m treeprobe.extract_dist --data metadata.csv --ckpt epoch_30.pt \\
        --out ~/.cache/treeprobe
    treeprobe intrinsic --data metadata.csv --ckpt epoch_30.pt --cache-dir ~/.cache/treeprobe ...

Multi-node: the same command under ``torchrun --nnodes N --node_rank R --rdzv-endpoint HOST:PORT``
with ``--out`` on a file system all nodes share. Only a barrier is needed between ranks (a
gloo process group, also on GPU nodes; an already initialised process group is used as is).
Without a process group (independent jobs, e.g. a scheduler array job that sets RANK and
WORLD_SIZE), pass ``--no-merge`` to every job and run ``--merge-only --world-size W`` once
they have all finished.

Layout in ``--out`` (``<key>`` is the cache key of the whole listing, see treeprobe.extract):

* ``embeddings-<key>.shard-RRRRR-of-WWWWW.npz``: rank R's shard (cache format over its paths,
  plus ``start``/``stop``/``n_total``), written atomically; removed after the merge.
* ``embeddings-<key>.shard-RRRRR-of-WWWWW.partial/``: rank R's resume chunks while it runs.
* ``embeddings-<key>.npz``: the merged cache.

A rerun after an interruption skips the shards already written and resumes the others from
their chunks. Shards are contiguous slices ``[n*r//W, n*(r+1)//W)`` of the listing, so the
merged rows are in the original order; embeddings equal a single-process run up to float
rounding (batches are cut differently).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from treeprobe.errors import TreeprobeError
from treeprobe.extract import (
    AUTOCAST_CHOICES, DEFAULT_CHUNK_SECONDS, ExtractionResult, _autocast_fallbacks, _cache_key, _cache_keys,
    _check_args, _failures_frame,
    _no_images_error, _read_cache, _resolve_plan, _run, _write_cache, cache_file_for, partial_dir_for,
)
from treeprobe.models import LoadedModel

DEFAULT_TIMEOUT_MIN = 24 * 60  # how long ranks wait for each other at the barrier


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for ``rank`` of ``world_size`` (sizes differ by ≤ 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_file_for(cache_dir, key: str, rank: int, world_size: int) -> str:
    return os.path.join(os.fspath(cache_dir), f"embeddings-{key}.shard-{rank:05d}-of-{world_size:05d}.npz")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise TreeprobeError(f"environment variable {name}={value!r} is not an integer") from None


def _rank_world(rank, world_size) -> tuple[int, int]:
    rank = _env_int("RANK", 0) if rank is None else int(rank)
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TreeprobeError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _read_shard(file: str):
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = {k: int(z[k]) for k in ("start", "stop", "n_total")}
    except Exception:  # noqa: BLE001 - an unreadable shard is recomputed
        return None
    cached = _read_cache(file, meta["stop"] - meta["start"])
    return None if cached is None else (*cached, meta)


def extract_shard(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    rank: int,
    world_size: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device=None,
    autocast: str = "auto",
    channels_last: bool | None = None,
    prefetch_factor: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    chunk_batches: int | None = None,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    key: str | None = None,
) -> str:
    """Embed rank's shard of ``paths`` and write its shard file (skipped when already there).

    Unreadable images are recorded, never fatal (a shard may even have none readable).
    Returns the shard file's path.
    """
    paths = _check_args(paths, batch_size, num_workers)
    plan = _resolve_plan(loaded, device, autocast, channels_last)
    key = key or _cache_key(loaded, paths, plan.autocast_tag)
    file = shard_file_for(cache_dir, key, rank, world_size)
    start, stop = shard_bounds(len(paths), rank, world_size)
    if os.path.exists(file) and _read_shard(file) is not None:
        return file
    mine = paths[start:stop]
    partial = partial_dir_for(file)
    if mine:
        emb, ok, failed = _run(loaded, mine, plan, batch_size=batch_size, num_workers=num_workers,
                               prefetch_factor=prefetch_factor, threads=threads, progress=progress,
                               partial_dir=partial, chunk_batches=chunk_batches, chunk_seconds=chunk_seconds,
                               desc=f"embedding images (shard {rank}/{world_size})")
    else:
        emb, ok, failed = np.zeros((0, loaded.embed_dim), np.float32), np.zeros(0, bool), {}
    _write_cache(file, emb, ok, _failures_frame(mine, failed), plan.compute,
                 start=np.int64(start), stop=np.int64(stop), n_total=np.int64(len(paths)))
    shutil.rmtree(partial, ignore_errors=True)
    return file


def merge_shards(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    world_size: int,
    *,
    autocast: str = "auto",
    device=None,
    remove: bool = True,
    key: str | None = None,
) -> str:
    """Merge the ``world_size`` shard files of ``paths`` into the cache file (atomically).

    ``autocast``/``device`` must resolve as they did for the shards (they pick the key).
    Raises TreeprobeError when a shard is missing or damaged, or when no image was readable.
    Returns the cache file's path; the shard files are removed when ``remove``.
    """
    paths = [os.fspath(p) if p is not None else "" for p in paths]
    n = len(paths)
    if key is None:
        # with autocast 'auto', shards made under another autocast setting are accepted (e.g. a
        # CPU merge step after bf16 GPU jobs): the key with the most shard files present wins
        plan = _resolve_plan(loaded, device, autocast, None)
        keys = _cache_keys(loaded, paths, _autocast_fallbacks(loaded, autocast, plan))
        present = [sum(os.path.exists(shard_file_for(cache_dir, k, r, world_size)) for r in range(world_size))
                   for k in keys]
        key = keys[int(np.argmax(present))]
    files = [shard_file_for(cache_dir, key, r, world_size) for r in range(world_size)]
    missing = [r for r, f in enumerate(files) if not os.path.exists(f)]
    if missing:
        raise TreeprobeError(
            f"cannot merge: {len(missing)} of {world_size} shard files missing in {cache_dir} "
            f"(ranks {', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}); "
            f"run those ranks first"
        )
    embs, oks, fails, computes = [], [], [], set()
    for r, f in enumerate(files):
        shard = _read_shard(f)
        want = shard_bounds(n, r, world_size)
        if shard is None or (shard[4]["start"], shard[4]["stop"], shard[4]["n_total"]) != (*want, n):
            raise TreeprobeError(f"shard file {f} is damaged or belongs to another listing; delete it and rerun rank {r}")
        emb, ok, failures, compute, _ = shard
        embs.append(emb)
        oks.append(ok)
        fails.append(failures)
        computes.add(compute)
    ok = np.concatenate(oks)
    failures = pd.concat(fails, ignore_index=True) if fails else pd.DataFrame({"item": [], "reason": []}, dtype=object)
    if not ok.any():
        failed = {i: r for i, r in zip(np.flatnonzero(~ok).tolist(), failures["reason"].tolist())}
        raise _no_images_error(paths, failed)
    emb = np.concatenate([e for e in embs if e.shape[0]])
    if len(computes) > 1:
        raise TreeprobeError(f"shards were computed differently ({', '.join(sorted(map(str, computes)))})")
    out = cache_file_for(cache_dir, key)
    _write_cache(out, emb, ok, failures.astype(object), computes.pop())
    if remove:
        for f in files:
            os.remove(f)
    return out


def extract_distributed(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device=None,
    autocast: str = "auto",
    channels_last: bool | None = None,
    prefetch_factor: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    chunk_batches: int | None = None,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    timeout_min: float = DEFAULT_TIMEOUT_MIN,
) -> ExtractionResult | None:
    """Embed ``paths`` sharded over ranks and merge into the cache in ``cache_dir``.

    rank / world_size: None → the RANK / WORLD_SIZE environment variables (torchrun sets
    them), else 0 / 1. With world_size > 1 the ranks meet at a barrier: the process group
    already initialised, else a gloo group from torchrun's MASTER_ADDR/MASTER_PORT (created
    and destroyed here). Without either, each rank only writes its shard (merge later with
    :func:`merge_shards`). device None → ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    Returns the merged result on rank 0 when merged here (``cache_hit`` False), the cached
    result on every rank when the cache already held it (``cache_hit`` True), else None.
    """
    import torch.distributed as dist

    t0 = time.perf_counter()
    rank, world_size = _rank_world(rank, world_size)
    if device is None and torch.cuda.is_available():
        device = f"cuda:{_env_int('LOCAL_RANK', 0)}"
    paths = _check_args(paths, batch_size, num_workers)
    plan = _resolve_plan(loaded, device, autocast, channels_last)
    if plan.device.type == "cuda" and plan.device.index is not None:
        torch.cuda.set_device(plan.device)  # this rank's GPU for everything that uses "the current device"
    key = _cache_key(loaded, paths, plan.autocast_tag)
    out = cache_file_for(cache_dir, key)
    if os.path.exists(out):
        cached = _read_cache(out, len(paths))
        if cached is not None:
            emb, ok, failures, compute = cached
            return ExtractionResult(emb, ok, failures, True, time.perf_counter() - t0, compute or plan.compute)

    own_group = False
    if world_size > 1 and not dist.is_initialized() and os.environ.get("MASTER_ADDR"):
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
        own_group = True
    grouped = world_size > 1 and dist.is_initialized()
    if grouped and dist.get_world_size() != world_size:
        raise TreeprobeError(f"process group has {dist.get_world_size()} ranks, but world_size is {world_size}")
    try:
        extract_shard(loaded, paths, cache_dir, rank, world_size, batch_size=batch_size, num_workers=num_workers,
                      device=plan.device, autocast=autocast, channels_last=channels_last,
                      prefetch_factor=prefetch_factor, threads=threads, progress=progress and rank == 0,
                      chunk_batches=chunk_batches, chunk_seconds=chunk_seconds, key=key)
        if not merge or (world_size > 1 and not grouped):
            return None
        if grouped:
            _barrier(dist)
        err = None
        if rank == 0:
            try:
                merge_shards(loaded, paths, cache_dir, world_size, key=key)
            except BaseException as e:  # noqa: BLE001 - let the other ranks go before raising
                err = e
        if grouped:
            _barrier(dist)  # the others return once the merged cache exists
        if err is not None:
            raise err
        if rank != 0:
            return None
        emb, ok, failures, compute = _read_cache(out, len(paths))
        return ExtractionResult(emb, ok, failures, False, time.perf_counter() - t0, compute or plan.compute)
    finally:
        if own_group:
            dist.destroy_process_group()


def _barrier(dist) -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treeprobe.extract_dist",
        description="Sharded image-embedding extraction (run under torchrun), merged into treeprobe's "
                    "embedding cache so that `treeprobe intrinsic` with the same --data/--ckpt/--cache-dir "
                    "gets a cache hit.",
    )
    p.add_argument("--data", required=True, help="image folder (iNat layout) or metadata CSV, as for `treeprobe intrinsic`")
    p.add_argument("--ckpt", help="checkpoint file or hf-hub:org/repo")
    p.add_argument("--model", help="open_clip architecture (needed when the checkpoint does not name it)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, with --model")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling non-tensor checkpoint objects")
    p.add_argument("--out", help="cache folder = `treeprobe intrinsic --cache-dir` "
                                 "(default $TREEPROBE_CACHE or ~/.cache/treeprobe)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank (default 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader decode workers per rank (default 0)")
    p.add_argument("--prefetch", type=int, default=None, help="batches each worker prepares ahead (default 2)")
    p.add_argument("--device", help="torch device (default cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                   help="autocast for fp32 models (default auto: bf16 on CUDA, off on the CPU)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--threads", type=int, help="torch threads per rank")
    p.add_argument("--chunk-batches", type=int, help="batches per resume chunk (default 8192 images' worth)")
    p.add_argument("--no-merge", action="store_true", help="only write this rank's shard")
    p.add_argument("--merge-only", action="store_true", help="merge the shards of an earlier run (no extraction)")
    p.add_argument("--world-size", type=int, help="number of shards (default $WORLD_SIZE or 1)")
    p.add_argument("--rank", type=int, help="this process's shard (default $RANK or 0)")
    p.add_argument("--timeout-min", type=float, default=DEFAULT_TIMEOUT_MIN,
                   help="minutes ranks wait for each other at the barrier (default 1440)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from treeprobe.data import load_data
        from treeprobe.models import load_model
        from treeprobe.pipeline import default_cache_dir

        rank, world_size = _rank_world(args.rank, args.world_size)
        device = args.device
        if device is None:
            device = f"cuda:{_env_int('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        out = args.out or str(default_cache_dir())
        ds = load_data(args.data)
        if ds.embeddings is not None:
            raise TreeprobeError(f"{args.data} holds embeddings already; nothing to extract")
        paths = ds.items["path"].astype(str).tolist()
        if args.ckpt is None and args.model is None:
            raise TreeprobeError("images need a model: pass --ckpt CHECKPOINT (and --model ARCH if needed)")
        loaded = load_model(ckpt=args.ckpt, model=args.model, pretrained=args.pretrained, device=device,
                            trust_checkpoint=args.trust_checkpoint)
        if args.merge_only:
            file = merge_shards(loaded, paths, out, world_size, autocast=args.autocast, device=device)
            print(f"merged {world_size} shards into {file}", file=sys.stderr)
            return 0
        res = extract_distributed(
            loaded, paths, out, rank=rank, world_size=world_size, merge=not args.no_merge,
            batch_size=args.batch_size, num_workers=args.workers, device=device, autocast=args.autocast,
            channels_last=args.channels_last, prefetch_factor=args.prefetch, threads=args.threads,
            progress=not args.no_progress, chunk_batches=args.chunk_batches, timeout_min=args.timeout_min,
        )
        if res is not None and rank == 0:
            what = "cache hit" if res.cache_hit else f"extracted in {res.seconds:.1f} s"
            print(f"{int(res.ok.sum())} embeddings ({len(res.failures)} images skipped), {what}, in {out}",
                  file=sys.stderr)
        elif res is None and rank == 0 and (args.no_merge or world_size > 1):
            print(f"rank {rank}: shard written to {out}", file=sys.stderr)
        return 0
    except TreeprobeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
