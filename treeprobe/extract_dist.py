"""Sharded (multi-GPU, multi-node) image-embedding extraction, merged into treeprobe's cache.

Run one process per GPU with torchrun; each rank embeds a contiguous shard of the image
listing and writes its own shard file; rank 0 then merges the shards into the same cache
file that :func:`treeprobe.extract.extract_embeddings` (and so ``treeprobe intrinsic``)
reads, so the analysis that follows is a cache hit::

    torchrun --nproc_per_node 8 -m treeprobe extract --data metadata.csv --ckpt epoch_30.pt \\
        --out ~/.cache/treeprobe
    treeprobe intrinsic --data metadata.csv --ckpt epoch_30.pt --cache-dir ~/.cache/treeprobe ...

(``python -m treeprobe.extract_dist`` takes the same options as ``treeprobe extract``.)
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

Before a rank embeds anything it checks that ``--out`` is a writable folder with room for its
shard, twice over (resume chunks and shard file), and rank 0 also for the merged file
(:func:`treeprobe.extract.check_cache_dir`). Ctrl-C or SIGTERM (torchrun stopping its workers)
writes the finished batches of each rank before it exits (status 130 from the command line).
A rerun after an interruption skips the shards already written and resumes the others from
their chunks. Shards are contiguous slices ``[n*r//W, n*(r+1)//W)`` of the listing, so the
merged rows are in the original order; embeddings equal a single-process run up to float
rounding (batches are cut differently).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from treeprobe.errors import TreeprobeError
from treeprobe.extract import (
    AUTOCAST_CHOICES, DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_IMAGES, DEFAULT_CHUNK_SECONDS, DEFAULT_NUM_WORKERS,
    DEFAULT_PREFETCH_FACTOR, ExtractionResult, RunOptions, accepted_autocast_tags, cache_file_for, cache_key,
    cache_keys, check_cache_dir, check_paths, embed_paths, no_images_error, partial_dir_for, path_strings,
    read_cache, read_first_cache, resolve_plan, space_needed, write_cache,
)
from treeprobe.models import LoadedModel

__all__ = [
    "DEFAULT_TIMEOUT_MIN", "add_subcommands", "cmd_extract", "extract_distributed", "extract_shard", "main",
    "merge_shards", "shard_bounds", "shard_file_for",
]

#: Minutes ranks wait for each other at the barrier.
DEFAULT_TIMEOUT_MIN = 24 * 60
_SHARD_META = ("start", "stop", "n_total")
_MAX_LISTED_RANKS = 10  # missing ranks named in the merge error


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for ``rank`` of ``world_size`` (sizes differ by ≤ 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_file_for(cache_dir, key: str, *, rank: int, world_size: int) -> str:
    """Path of rank's shard file: ``embeddings-<key>.shard-RRRRR-of-WWWWW.npz`` in ``cache_dir``."""
    return os.path.join(os.fspath(cache_dir), f"embeddings-{key}.shard-{rank:05d}-of-{world_size:05d}.npz")


def _shard_files(cache_dir, key: str, world_size: int) -> list[str]:
    return [shard_file_for(cache_dir, key, rank=r, world_size=world_size) for r in range(world_size)]


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


def _rank_device(device):
    """``device``, else ``cuda:LOCAL_RANK`` when CUDA is available, else ``"cpu"``."""
    if device is not None:
        return device
    return f"cuda:{_env_int('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def _read_shard(file: str):
    """(the shard as a cache hit, {start, stop, n_total}) or None when it is unreadable."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = {k: int(z[k]) for k in _SHARD_META}
    except Exception:  # noqa: BLE001 - an unreadable shard is recomputed
        return None
    cached = read_cache(file, meta["stop"] - meta["start"])
    return None if cached is None else (cached, meta)


def extract_shard(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    *,
    rank: int,
    world_size: int,
    options: RunOptions = RunOptions(),
    device=None,
    autocast: str = "auto",
    channels_last: bool | None = None,
    key: str | None = None,
    reserve_bytes: int = 0,
) -> str:
    """Embed rank's shard of ``paths`` and write its shard file (skipped when already there).

    Unreadable images are recorded, never fatal (a shard may even have none readable).
    Raises TreeprobeError before embedding when ``cache_dir`` is not writable or lacks room for
    the shard (twice: chunks and shard file) plus ``reserve_bytes``. Returns the shard file's path.
    """
    paths = check_paths(paths)
    plan = resolve_plan(loaded, device, autocast=autocast, channels_last=channels_last)
    key = key or cache_key(loaded, paths, plan.autocast_tag)
    file = shard_file_for(cache_dir, key, rank=rank, world_size=world_size)
    if os.path.exists(file) and _read_shard(file) is not None:
        return file
    start, stop = shard_bounds(len(paths), rank, world_size)
    partial = partial_dir_for(file)
    check_cache_dir(cache_dir, space_needed(stop - start, loaded.embed_dim, partial_dir=partial) + reserve_bytes)
    res = embed_paths(loaded, paths[start:stop], plan, options=options, partial_dir=partial,
                      desc=f"embedding images (shard {rank}/{world_size})")
    write_cache(file, res, extra=dict(start=np.int64(start), stop=np.int64(stop), n_total=np.int64(len(paths))))
    shutil.rmtree(partial, ignore_errors=True)
    return file


def _shard_key(loaded: LoadedModel, paths: list[str], cache_dir, world_size: int, *, autocast: str,
               device) -> str:
    """The cache key whose shard files are present: with autocast 'auto', shards made under another
    autocast setting are accepted (e.g. a CPU merge step after bf16 GPU jobs); most files wins."""
    plan = resolve_plan(loaded, device, autocast=autocast)
    keys = cache_keys(loaded, paths, accepted_autocast_tags(autocast, plan))
    present = [sum(map(os.path.exists, _shard_files(cache_dir, k, world_size))) for k in keys]
    return keys[int(np.argmax(present))]


def _read_shards(files: list[str], n: int, cache_dir) -> list[ExtractionResult]:
    """Every shard of a listing of ``n`` paths; raises TreeprobeError naming a missing or damaged one."""
    missing = [r for r, f in enumerate(files) if not os.path.exists(f)]
    if missing:
        listed = ", ".join(map(str, missing[:_MAX_LISTED_RANKS])) + (", ..." if len(missing) > _MAX_LISTED_RANKS else "")
        raise TreeprobeError(
            f"cannot merge: {len(missing)} of {len(files)} shard files missing in {cache_dir} "
            f"(ranks {listed}); run those ranks first"
        )
    shards = []
    for r, f in enumerate(files):
        shard = _read_shard(f)
        want = (*shard_bounds(n, r, len(files)), n)
        if shard is None or tuple(shard[1][k] for k in _SHARD_META) != want:
            raise TreeprobeError(f"shard file {f} is damaged or belongs to another listing; delete it and rerun rank {r}")
        shards.append(shard[0])
    return shards


def merge_shards(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    *,
    world_size: int,
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
    paths = path_strings(paths)
    if key is None:
        key = _shard_key(loaded, paths, cache_dir, world_size, autocast=autocast, device=device)
    files = _shard_files(cache_dir, key, world_size)
    shards = _read_shards(files, len(paths), cache_dir)
    ok = np.concatenate([s.ok for s in shards])
    failures = pd.concat([s.failures for s in shards], ignore_index=True)
    if not ok.any():
        raise no_images_error(len(paths), failures)
    computes = {s.compute for s in shards}
    if len(computes) > 1:
        raise TreeprobeError(f"shards were computed differently ({', '.join(sorted(map(str, computes)))})")
    emb = np.concatenate([s.embeddings for s in shards if s.embeddings.shape[0]])
    out = cache_file_for(cache_dir, key)
    write_cache(out, ExtractionResult(emb, ok, failures.astype(object), cache_hit=False, seconds=0.0,
                                      compute=computes.pop()))
    if remove:
        for f in files:
            os.remove(f)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextmanager
def _process_group(rank: int, world_size: int, timeout_min: float):
    """Yields whether the ranks can meet at barriers: an initialised process group, else one made
    here (gloo, from torchrun's MASTER_ADDR/MASTER_PORT) and destroyed on exit; False for 1 rank."""
    import torch.distributed as dist

    own = False
    if world_size > 1 and not dist.is_initialized() and os.environ.get("MASTER_ADDR"):
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
        own = True
    try:
        grouped = world_size > 1 and dist.is_initialized()
        if grouped and dist.get_world_size() != world_size:
            raise TreeprobeError(f"process group has {dist.get_world_size()} ranks, but world_size is {world_size}")
        yield grouped
    finally:
        if own:
            dist.destroy_process_group()


def _merge_between_barriers(loaded: LoadedModel, paths: list[str], cache_dir, *, rank: int, world_size: int,
                            key: str, grouped: bool) -> None:
    """Rank 0 merges once every rank has written its shard; the others wait until it is done.
    An error of the merge is raised on rank 0 after the others were let go."""
    if grouped:
        _barrier()
    err = None
    if rank == 0:
        try:
            merge_shards(loaded, paths, cache_dir, world_size=world_size, key=key)
        except BaseException as e:  # noqa: BLE001 - let the other ranks go before raising
            err = e
    if grouped:
        _barrier()  # the others return once the merged cache exists
    if err is not None:
        raise err


def extract_distributed(
    loaded: LoadedModel,
    paths: Sequence[str],
    cache_dir,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = DEFAULT_NUM_WORKERS,
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
    t0 = time.perf_counter()
    rank, world_size = _rank_world(rank, world_size)
    options = RunOptions(batch_size=batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor,
                         threads=threads, progress=progress and rank == 0, chunk_batches=chunk_batches,
                         chunk_seconds=chunk_seconds)
    paths = check_paths(paths)
    plan = resolve_plan(loaded, _rank_device(device), autocast=autocast, channels_last=channels_last)
    if plan.device.type == "cuda" and plan.device.index is not None:
        torch.cuda.set_device(plan.device)  # this rank's GPU for everything that uses "the current device"
    key = cache_key(loaded, paths, plan.autocast_tag)
    out = cache_file_for(cache_dir, key)
    cached = read_first_cache([out], len(paths), default_compute=plan.compute)
    if cached is not None:
        return replace(cached, seconds=time.perf_counter() - t0)

    reserve = len(paths) * loaded.embed_dim * 4 if (merge and rank == 0) else 0  # the merged file
    with _process_group(rank, world_size, timeout_min) as grouped:
        extract_shard(loaded, paths, cache_dir, rank=rank, world_size=world_size, options=options,
                      device=plan.device, autocast=autocast, channels_last=channels_last, key=key,
                      reserve_bytes=reserve)
        if not merge or (world_size > 1 and not grouped):
            return None
        _merge_between_barriers(loaded, paths, cache_dir, rank=rank, world_size=world_size, key=key,
                                grouped=grouped)
    if rank != 0:
        return None
    merged = read_cache(out, len(paths), default_compute=plan.compute)
    if merged is None:
        raise TreeprobeError(f"the merged cache file {out} cannot be read back")
    return replace(merged, cache_hit=False, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- CLI

_DEFAULTS = {name: p.default for name, p in inspect.signature(extract_distributed).parameters.items()}
_DESCRIPTION = ("Sharded image-embedding extraction (one process, or one per GPU under torchrun), merged into "
                "treeprobe's embedding cache so that `treeprobe intrinsic` with the same --data/--ckpt/--cache-dir "
                "gets a cache hit.")


def _add_extract_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``treeprobe extract``; defaults are those of :func:`extract_distributed`."""
    p.add_argument("--data", required=True, help="image folder (iNat layout) or metadata CSV, as for `treeprobe intrinsic`")
    p.add_argument("--ckpt", help="checkpoint file or hf-hub:org/repo")
    p.add_argument("--model", help="open_clip architecture (needed when the checkpoint does not name it)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, with --model")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling non-tensor checkpoint objects")
    p.add_argument("--out", "--cache-dir", dest="out", help="cache folder = `treeprobe intrinsic --cache-dir` "
                                                            "(default $TREEPROBE_CACHE or ~/.cache/treeprobe)")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"],
                   help="images per forward pass per rank (default %(default)s)")
    p.add_argument("--workers", type=int, default=_DEFAULTS["num_workers"],
                   help="DataLoader decode workers per rank (default %(default)s)")
    p.add_argument("--prefetch", type=int, default=_DEFAULTS["prefetch_factor"],
                   help=f"batches each worker prepares ahead (default {DEFAULT_PREFETCH_FACTOR})")
    p.add_argument("--device", help="torch device (default cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default=_DEFAULTS["autocast"],
                   help="autocast for fp32 models (default %(default)s: bf16 on CUDA, off on the CPU)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=_DEFAULTS["channels_last"])
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--threads", type=int, default=_DEFAULTS["threads"], help="torch threads per rank")
    p.add_argument("--chunk-batches", type=int, default=_DEFAULTS["chunk_batches"],
                   help=f"batches per resume chunk (default {DEFAULT_CHUNK_IMAGES} images' worth)")
    p.add_argument("--no-merge", action="store_true", help="only write this rank's shard")
    p.add_argument("--merge-only", action="store_true", help="merge the shards of an earlier run (no extraction)")
    p.add_argument("--world-size", type=int, help="number of shards (default $WORLD_SIZE or 1)")
    p.add_argument("--rank", type=int, help="this process's shard (default $RANK or 0)")
    p.add_argument("--timeout-min", type=float, default=_DEFAULTS["timeout_min"],
                   help="minutes ranks wait for each other at the barrier (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)


def add_subcommands(subparsers) -> None:
    """Add ``extract`` (sharded extraction into the embedding cache) to an argparse subparsers object."""
    p = subparsers.add_parser("extract", help="embed images into the embedding cache (also under torchrun)",
                              description=_DESCRIPTION)
    _add_extract_arguments(p)


def _load_inputs(args, device) -> tuple[LoadedModel, list[str]]:
    """The model and the image paths of ``--data`` (raises TreeprobeError for unusable inputs)."""
    from treeprobe.data import load_data
    from treeprobe.models import load_model

    ds = load_data(args.data)
    if ds.X is not None:
        raise TreeprobeError(f"{args.data} holds embeddings already; nothing to extract")
    if args.ckpt is None and args.model is None:
        raise TreeprobeError("images need a model: pass --ckpt CHECKPOINT (and --model ARCH if needed)")
    loaded = load_model(ckpt=args.ckpt, model=args.model, pretrained=args.pretrained, device=device,
                        trust_checkpoint=args.trust_checkpoint)
    return loaded, ds.items["path"].astype(str).tolist()


def cmd_extract(args) -> int:
    """``treeprobe extract``: extract (or merge, with ``--merge-only``) into the cache; 0 on success."""
    from treeprobe._utils import check_work_dir, default_cache_dir

    rank, world_size = _rank_world(args.rank, args.world_size)
    device = _rank_device(args.device)
    out = args.out or str(default_cache_dir())
    check_work_dir(out, what="--out" if args.out else "cache folder")  # before the model is loaded
    loaded, paths = _load_inputs(args, device)
    if args.merge_only:
        file = merge_shards(loaded, paths, out, world_size=world_size, autocast=args.autocast, device=device)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treeprobe.extract_dist [options of treeprobe extract]``; exit status 2 on input errors,
    130 when interrupted (Ctrl-C, SIGTERM) after the finished batches were saved."""
    parser = argparse.ArgumentParser(prog="python -m treeprobe.extract_dist", description=_DESCRIPTION)
    _add_extract_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TreeprobeError as e:
        print(f"treeprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("treeprobe: interrupted; the finished batches are kept, run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
