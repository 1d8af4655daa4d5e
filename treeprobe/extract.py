"""Batched, cached, resumable image-embedding extraction with an open_clip model.

:func:`extract_embeddings` decodes and resizes images in a torch ``DataLoader`` (PIL → RGB →
the model's inference transform; in ``num_workers`` worker processes when > 0, with
``prefetch_factor`` batches in flight per worker and pinned host memory on CUDA), runs
``model.encode_image`` under ``torch.inference_mode()`` and L2-normalises the result.
Unreadable, missing or corrupt images never stop the run: they are left out and listed in
``failures`` with the reason.

Precision. The model runs in the precision it was built with (``LoadedModel.precision``).
For an fp32 model, ``autocast='auto'`` (the default) runs CUDA under bf16 autocast
(fp16 where the GPU has no bf16) and the CPU in plain fp32; ``'off'``, ``'bf16'`` or
``'fp16'`` force a choice. ``channels_last`` (default: on for CUDA when the image tower is
convolutional, off for ViTs and on the CPU) sets the memory format of model and batch.

Cache. With ``cache_dir``, results are stored as ``embeddings-<key>.npz``, where the key is
a sha256 over the model digest and name, the ordered (path, size, mtime_ns) listing of the
inputs, the transform, the precision and the autocast dtype (only when autocast is on, so
fp32 keys are those of earlier versions). A repeated call with the same inputs reads the
cache instead of running the model. With ``autocast='auto'`` a cache made under another
autocast setting for the same inputs is accepted too (e.g. a bf16 GPU extraction read
back on a CPU machine); ``ExtractionResult.compute`` says how the embeddings were made.
Cache files are written atomically (temporary file + ``os.replace``).

Resume. While a cached run is in progress, every ``chunk_batches`` batches (or every
``chunk_seconds``) the finished batches are written as a chunk into the folder
``embeddings-<key>.partial/``. A run that is interrupted (killed, Ctrl-C, a crash) and
started again with the same inputs reads those chunks and embeds only what is left,
in the same batches, so the result is identical to an uninterrupted run with the same
``batch_size``. The folder is removed when the cache file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from treeprobe.errors import TreeprobeError
from treeprobe.models import LoadedModel

CACHE_VERSION = 1
AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")
DEFAULT_CHUNK_IMAGES = 8192  # images per resume chunk (chunk_batches = this // batch_size)
DEFAULT_CHUNK_SECONDS = 120.0  # ... or whatever was embedded in this long, whichever comes first


@dataclass
class ExtractionResult:
    """embeddings: float32 (N_ok, D), unit L2 norm, rows in input order of the ok paths.
    ok: bool (N,) over the input paths, True where an embedding was produced.
    failures: DataFrame with columns ``item`` (the path as given) and ``reason``.
    cache_hit: True when read from the cache without running the model.
    seconds: wall-clock duration of the call.
    compute: how the embeddings were computed: the model precision, plus
        ``+autocast_bf16`` / ``+autocast_fp16`` when autocast was on.
    """

    embeddings: np.ndarray
    ok: np.ndarray
    failures: pd.DataFrame
    cache_hit: bool
    seconds: float
    compute: str = "fp32"


# ----------------------------------------------------------------------------- images


class _ImageFiles(Dataset):
    """Item j → (index, tensor (3, H, W), None) or (index, None, reason), where index is
    ``indices[j]`` (the position in the full listing) or j."""

    def __init__(self, paths: Sequence[str], preprocess, indices=None):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self):
        return len(self.paths) if self.indices is None else len(self.indices)

    def __getitem__(self, j):
        from PIL import Image

        i = int(j if self.indices is None else self.indices[j])
        path = self.paths[i]
        if not path or not os.path.isfile(path):
            return i, None, "missing file"
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure is a skipped image
            return i, None, f"cannot decode image: {_one_line(e)}"
        try:
            return i, self.preprocess(rgb), None
        except Exception as e:  # noqa: BLE001
            return i, None, f"cannot preprocess image: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _collate(batch):
    """Stack the decodable images; pass failures through as (index, reason) pairs."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, r) for i, x, r in batch if x is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return idx, images, failed


@contextmanager
def _torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (no-op for None or no change)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- settings


@dataclass
class _Plan:
    """Resolved runtime settings of one extraction."""

    device: torch.device
    in_dtype: torch.dtype
    amp_dtype: torch.dtype | None  # autocast dtype, None for none
    autocast_tag: str | None  # cache-key tag of an autocast chosen here (not by the precision)
    channels_last: bool
    precision: str

    @property
    def compute(self) -> str:
        return self.precision + (f"+autocast_{self.autocast_tag}" if self.autocast_tag else "")

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _input_dtype(precision: str) -> torch.dtype:
    """dtype of the image batch for models built in low precision (open_clip's convention)."""
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    return torch.float32


_TAG_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _resolve_plan(loaded: LoadedModel, device, autocast: str = "auto", channels_last=None) -> _Plan:
    """Pick device, input dtype, autocast and memory format for ``loaded``."""
    if autocast is None or autocast is False:
        autocast = "off"
    if autocast not in AUTOCAST_CHOICES:
        raise TreeprobeError(f"unknown autocast {autocast!r}; use one of {', '.join(AUTOCAST_CHOICES)}")
    device = _resolve_device(device)
    precision = getattr(loaded, "precision", "fp32") or "fp32"
    in_dtype = _input_dtype(precision)
    amp_dtype, tag = None, None
    if precision.startswith("amp"):  # the precision itself asks for autocast (open_clip's amp / amp_bf16)
        amp_dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    elif precision == "fp32":
        if autocast == "auto":
            if device.type == "cuda":
                tag = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif autocast != "off":
            tag = autocast
        amp_dtype = _TAG_DTYPE.get(tag)
    # (fp16/bf16/pure_* models already run in low precision: no autocast on top)
    if channels_last is None:
        channels_last = device.type == "cuda" and not _is_vit(loaded.model)
    return _Plan(device, in_dtype, amp_dtype, tag, bool(channels_last), precision)


def _is_vit(model) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except Exception:  # noqa: BLE001
        return False
    return isinstance(getattr(model, "visual", None), VisionTransformer)


def _autocast_fallbacks(loaded: LoadedModel, autocast: str, plan: _Plan) -> list[str | None]:
    """Autocast tags whose cache files a lookup accepts, preferred first."""
    if autocast != "auto" or plan.precision != "fp32":
        return [plan.autocast_tag]
    return [plan.autocast_tag] + [t for t in (None, "bf16", "fp16") if t != plan.autocast_tag]


# ----------------------------------------------------------------------------- cache


def _listing(paths: Sequence[str]) -> list:
    listing = []
    for p in paths:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        listing.append([p, st.st_size if st else None, st.st_mtime_ns if st else None])
    return listing


def _cache_keys(loaded: LoadedModel, paths: Sequence[str], tags: Sequence[str | None]) -> list[str]:
    """Cache keys for several autocast tags; the file listing is stat'ed and serialised once.

    Each key is sha256 of ``json.dumps(payload, sort_keys=True)`` where payload holds version,
    digest, model_name, listing, preprocess (repr), precision and, when not None, autocast.
    """
    listing_json = json.dumps(_listing(paths)).encode()
    keys = []
    for tag in tags:
        payload = {
            "version": CACHE_VERSION,
            "digest": loaded.digest,
            "model_name": loaded.model_name,
            "listing": None,
            "preprocess": repr(loaded.preprocess),
            "precision": loaded.precision,
        }
        if tag is not None:
            payload["autocast"] = tag
        head, tail = json.dumps(payload, sort_keys=True).split('"listing": null', 1)
        h = hashlib.sha256(head.encode() + b'"listing": ')
        h.update(listing_json)
        h.update(tail.encode())
        keys.append(h.hexdigest())
    return keys


def _cache_key(loaded: LoadedModel, paths: Sequence[str], autocast_tag: str | None = None) -> str:
    """sha256 hex over model identity, the ordered file listing, transform, precision (and autocast)."""
    return _cache_keys(loaded, paths, [autocast_tag])[0]


def cache_file_for(cache_dir, key: str) -> str:
    return os.path.join(os.fspath(cache_dir), f"embeddings-{key}.npz")


def _read_cache(file: str, n: int):
    """→ (embeddings, ok, failures, compute) or None (with a warning) when damaged."""
    try:
        with np.load(file, allow_pickle=False) as z:
            emb, ok = z["embeddings"].astype(np.float32), z["ok"].astype(bool)
            items, reasons = z["failure_item"].tolist(), z["failure_reason"].tolist()
            compute = str(z["compute"]) if "compute" in z.files else None
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
        warnings.warn(f"ignoring unreadable cache file {file}: {_one_line(e)}", stacklevel=3)
        return None
    if ok.shape != (n,) or emb.shape[0] != int(ok.sum()):
        warnings.warn(f"ignoring inconsistent cache file {file}", stacklevel=3)
        return None
    return emb, ok, pd.DataFrame({"item": items, "reason": reasons}, dtype=object), compute


def _atomic_savez(file: str, **arrays) -> None:
    """np.savez to a temporary file in the same folder, then os.replace (readers never see half a file)."""
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_cache(file: str, emb: np.ndarray, ok: np.ndarray, failures: pd.DataFrame,
                 compute: str | None = None, **extra) -> None:
    """Write a cache (or shard) file atomically."""
    arrays = dict(
        embeddings=np.ascontiguousarray(emb, dtype=np.float32),
        ok=np.asarray(ok, dtype=bool),
        failure_item=np.asarray(failures["item"].tolist(), dtype=str),
        failure_reason=np.asarray(failures["reason"].tolist(), dtype=str),
        **extra,
    )
    if compute is not None:
        arrays["compute"] = np.asarray(compute)
    _atomic_savez(file, **arrays)


def _failures_frame(paths: Sequence[str], failed: dict) -> pd.DataFrame:
    fail_idx = sorted(failed)
    return pd.DataFrame(
        {"item": [paths[i] for i in fail_idx], "reason": [failed[i] for i in fail_idx]}, dtype=object
    )


# ----------------------------------------------------------------------------- resume chunks


def partial_dir_for(file: str) -> str:
    """The resume folder of a cache or shard file: ``<file without .npz>.partial``."""
    return (file[:-4] if file.endswith(".npz") else file) + ".partial"


def _read_partials(pdir: str, n: int):
    """Chunks in ``pdir`` → (done bool (n,), [(ok indices, embeddings)], {index: reason}, next seq)."""
    done = np.zeros(n, dtype=bool)
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    failed: dict[int, str] = {}
    next_seq = 0
    if not os.path.isdir(pdir):
        return done, pieces, failed, next_seq
    dim = None
    for name in sorted(os.listdir(pdir)):
        if not (name.startswith("chunk-") and name.endswith(".npz")):
            continue
        try:
            next_seq = max(next_seq, int(name[6:-4]) + 1)
        except ValueError:
            continue
        file = os.path.join(pdir, name)
        try:
            with np.load(file, allow_pickle=False) as z:
                items = z["items"].astype(np.int64)
                oi, emb = z["ok_index"].astype(np.int64), z["embeddings"].astype(np.float32)
                fi, fr = z["failure_index"].astype(np.int64), z["failure_reason"].tolist()
        except Exception as e:  # noqa: BLE001 - a damaged chunk is recomputed
            warnings.warn(f"ignoring unreadable resume chunk {file}: {_one_line(e)}", stacklevel=3)
            continue
        sane = (
            items.size and items.min() >= 0 and items.max() < n and not done[items].any()
            and len(np.unique(items)) == items.size and emb.shape[0] == oi.size
            and (emb.shape[0] == 0 or (emb.ndim == 2 and (dim is None or emb.shape[1] == dim)))
            and set(oi.tolist()) | set(fi.tolist()) == set(items.tolist())
        )
        if not sane:
            warnings.warn(f"ignoring inconsistent resume chunk {file}", stacklevel=3)
            continue
        if emb.shape[0]:
            dim = emb.shape[1]
        done[items] = True
        pieces.append((oi, emb))
        failed.update(zip(fi.tolist(), fr))
    return done, pieces, failed, next_seq


def _write_chunk(pdir: str, seq: int, items, pieces, failed_items) -> None:
    oi = np.concatenate([i for i, _ in pieces]) if pieces else np.zeros(0, np.int64)
    emb = np.concatenate([e for _, e in pieces]) if pieces else np.zeros((0, 0), np.float32)
    _atomic_savez(
        os.path.join(pdir, f"chunk-{seq:06d}.npz"),
        items=np.asarray(items, dtype=np.int64),
        ok_index=oi.astype(np.int64),
        embeddings=emb.astype(np.float32),
        failure_index=np.asarray([i for i, _ in failed_items], dtype=np.int64),
        failure_reason=np.asarray([r for _, r in failed_items], dtype=str),
    )


# ----------------------------------------------------------------------------- the loop


def _prepare_model(loaded: LoadedModel, plan: _Plan):
    model = loaded.model.to(plan.device).eval()
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _encode(model, images: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """One batch → L2-normalised float32 features (on the model's device)."""
    images = images.to(device=plan.device, dtype=plan.in_dtype, non_blocking=True)
    if plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with plan.autocast():
        feats = model.encode_image(images)
    return torch.nn.functional.normalize(feats.float(), dim=-1)


class _HostCopy:
    """Features of one batch on their way to host memory (asynchronous on CUDA)."""

    def __init__(self, idx: torch.Tensor, feats: torch.Tensor):
        self.idx = idx
        if feats.device.type == "cuda":
            self.host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(feats.device))  # the stream the copy went on
        else:
            self.host, self.event = feats, None

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return self.idx.numpy(), self.host.numpy()


def _run(loaded: LoadedModel, paths: Sequence[str], plan: _Plan, *, batch_size: int, num_workers: int,
         prefetch_factor: int | None, threads: int | None, progress: bool, partial_dir: str | None,
         chunk_batches: int | None, chunk_seconds: float, desc: str = "embedding images"):
    """Embed ``paths`` → (embeddings (N_ok, D) in input order, ok (N,), {index: reason}).

    Never raises for unreadable images, not even when none is readable (the callers decide).
    With ``partial_dir``, finished batches are saved there in chunks and a run that finds
    chunks there embeds only the remaining images.
    """
    n = len(paths)
    if partial_dir is not None:
        done, pieces, failed, seq = _read_partials(partial_dir, n)
    else:
        done, pieces, failed, seq = np.zeros(n, dtype=bool), [], {}, 0
    remaining = np.flatnonzero(~done)
    if chunk_batches is None:
        chunk_batches = max(1, DEFAULT_CHUNK_IMAGES // batch_size)

    if remaining.size:
        model = _prepare_model(loaded, plan)
        kw = dict(batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                  pin_memory=plan.device.type == "cuda")
        if num_workers > 0:
            kw["prefetch_factor"] = prefetch_factor or 2
        loader = DataLoader(_ImageFiles(paths, loaded.preprocess, indices=remaining), **kw)
        from tqdm.auto import tqdm

        # chunk being assembled: processed item indices, (ok idx, emb) pieces, failures
        c_items: list[np.ndarray] = []
        c_pieces: list[tuple[np.ndarray, np.ndarray]] = []
        c_failed: list[tuple[int, str]] = []
        c_batches, c_t0 = 0, time.monotonic()

        def finish(copy: _HostCopy):
            idx, feats = copy.result()
            finite = np.isfinite(feats).all(axis=1) & (np.abs(feats).sum(axis=1) > 0)
            bad = [(int(i), "non-finite embedding from the model") for i in idx[~finite]]
            failed.update(bad)
            c_failed.extend(bad)
            piece = (idx[finite], np.array(feats[finite], dtype=np.float32))
            pieces.append(piece)
            c_pieces.append(piece)

        with tqdm(total=n, initial=n - remaining.size, desc=desc, unit="img", disable=not progress) as bar, \
                _torch_threads(threads), torch.inference_mode():
            it = iter(loader)
            pending: _HostCopy | None = None
            while True:
                # decoding in the main process: one torch thread for the small per-image tensor
                # ops (ToTensor, Normalize), which are much slower with several threads
                with _torch_threads(1 if num_workers == 0 else None):
                    batch = next(it, None)
                if batch is None:
                    break
                idx, images, batch_failed = batch
                failed.update(batch_failed)
                c_failed.extend(batch_failed)
                c_items.append(np.concatenate([idx.numpy(), np.asarray([i for i, _ in batch_failed], np.int64)]))
                if images is not None:
                    copy = _HostCopy(idx, _encode(model, images, plan))
                    if pending is not None:  # let the GPU run this batch while the last one comes back
                        finish(pending)
                    pending = copy
                bar.update(len(idx) + len(batch_failed))
                c_batches += 1
                if partial_dir is not None and (
                        c_batches >= chunk_batches or time.monotonic() - c_t0 >= chunk_seconds):
                    if pending is not None:
                        finish(pending)
                        pending = None
                    _write_chunk(partial_dir, seq, np.concatenate(c_items), c_pieces, c_failed)
                    seq += 1
                    c_items, c_pieces, c_failed, c_batches, c_t0 = [], [], [], 0, time.monotonic()
            if pending is not None:
                finish(pending)

    ok = np.zeros(n, dtype=bool)
    pieces = [p for p in pieces if p[0].size]
    if not pieces:
        return np.zeros((0, loaded.embed_dim), np.float32), ok, failed
    order = np.concatenate([i for i, _ in pieces])
    emb = np.concatenate([e for _, e in pieces]).astype(np.float32, copy=False)
    ok[order] = True
    emb = np.ascontiguousarray(emb[np.argsort(order, kind="stable")])
    return emb, ok, failed


def _no_images_error(paths, failed) -> TreeprobeError:
    first = min(failed)
    return TreeprobeError(
        f"no readable images among {len(paths)} paths (e.g. {paths[first] or '<empty path>'}: {failed[first]})"
    )


def _check_args(paths, batch_size, num_workers):
    paths = [os.fspath(p) if p is not None else "" for p in paths]
    if len(paths) == 0:
        raise TreeprobeError("no images to embed (empty list of paths)")
    if batch_size < 1:
        raise TreeprobeError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise TreeprobeError(f"num_workers must be 0 or more, got {num_workers}")
    return paths


def extract_embeddings(
    loaded: LoadedModel,
    paths: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir=None,
    device=None,
    progress: bool = True,
    *,
    autocast: str = "auto",
    channels_last: bool | None = None,
    prefetch_factor: int | None = None,
    threads: int | None = None,
    resume: bool = True,
    chunk_batches: int | None = None,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
) -> ExtractionResult:
    """Embed the images at ``paths`` with ``loaded.model``.

    Returns float32 (N_ok, D) unit-norm embeddings for the readable images, in input
    order, with ``ok`` (N,) marking which paths they belong to. Raises TreeprobeError when
    no image can be read.

    device: None → CUDA when available, else CPU (the model is moved there).
    num_workers: DataLoader worker processes that decode and resize (0: in this process);
        prefetch_factor: batches each worker keeps ready (default 2).
    autocast: 'auto' (bf16 on CUDA, off on the CPU, for fp32 models), 'off', 'bf16', 'fp16'.
    channels_last: None → on for CUDA with a convolutional image tower.
    threads: torch intra-op threads for the duration of the call (None: leave as is).
    cache_dir: folder of the embedding cache (None: no cache, no resume).
    resume: with ``cache_dir``, save finished batches every ``chunk_batches`` batches
        (default 8192 images' worth) or ``chunk_seconds`` and pick up an interrupted run.
    """
    t0 = time.perf_counter()
    paths = _check_args(paths, batch_size, num_workers)
    n = len(paths)
    plan = _resolve_plan(loaded, device, autocast, channels_last)

    cache_file = None
    if cache_dir is not None:
        tags = _autocast_fallbacks(loaded, autocast, plan)
        keys = _cache_keys(loaded, paths, tags)
        cache_file = cache_file_for(cache_dir, keys[0])
        for key in keys:
            file = cache_file_for(cache_dir, key)
            if os.path.exists(file):
                cached = _read_cache(file, n)
                if cached is not None:
                    emb, ok, failures, compute = cached
                    return ExtractionResult(emb, ok, failures, True, time.perf_counter() - t0,
                                            compute or plan.precision)

    partial = partial_dir_for(cache_file) if (cache_file is not None and resume) else None
    emb, ok, failed = _run(loaded, paths, plan, batch_size=batch_size, num_workers=num_workers,
                           prefetch_factor=prefetch_factor, threads=threads, progress=progress,
                           partial_dir=partial, chunk_batches=chunk_batches, chunk_seconds=chunk_seconds)
    if not ok.any():
        raise _no_images_error(paths, failed)
    failures = _failures_frame(paths, failed)
    if cache_file is not None:
        _write_cache(cache_file, emb, ok, failures, plan.compute)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return ExtractionResult(emb, ok, failures, False, time.perf_counter() - t0, plan.compute)
