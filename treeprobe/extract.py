"""Batched, cached, resumable image-embedding extraction with an open_clip model.

:func:`extract_embeddings` decodes and resizes images in a torch ``DataLoader`` (PIL → RGB →
the model's inference transform; in ``num_workers`` worker processes when > 0, with
``prefetch_factor`` batches in flight per worker and pinned host memory on CUDA), runs
``model.encode_image`` under ``torch.inference_mode()`` and L2-normalises the result.
Unreadable, missing or corrupt images never stop the run: they are left out and listed in
``failures`` with the reason (``missing file``, ``not a file (a folder)``, ``not a regular file``,
``cannot read file: ...``, ``cannot decode image: ...``, ``cannot preprocess image: ...``).

Decoding (:func:`decode_image`). The EXIF orientation is applied first (a photo stored
sideways with Orientation 6 or 8 is embedded upright). 16-bit grey images (PIL modes
``I;16*``, and ``I`` clipped to 0..65535) are scaled to 8 bits by ``value >> 8``; images with
transparency (RGBA, LA, PA, palette or colour-key ``transparency``) are composited onto white
(:data:`ALPHA_BACKGROUND`); everything else (palette, 1-bit, L, CMYK, YCbCr, ...) goes through
PIL's ``convert("RGB")``. PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)
applies: above twice the limit an image is a failure, above the limit PIL warns.

Precision. The model runs in the precision it was built with (``LoadedModel.precision``).
For an fp32 model, ``autocast='auto'`` (the default) runs CUDA under bf16 autocast
(fp16 where the GPU has no bf16) and the CPU in plain fp32; ``'off'``, ``'bf16'`` or
``'fp16'`` force a choice. ``channels_last`` (default: on for CUDA when the image tower is
convolutional, off for ViTs and on the CPU) sets the memory format of model and batch.

Cache. With ``cache_dir``, results are stored as ``embeddings-<key>.npz``, where the key is
a sha256 over :data:`CACHE_VERSION`, the model digest (sha256 of the checkpoint file) and
name, the ordered (path, size, mtime_ns, ctime_ns) listing of the inputs, the transform's
``repr`` (image size, resize mode, interpolation, mean/std), the precision and the autocast
dtype (only when autocast is on). ``ctime_ns`` changes whenever a file is rewritten, even when
its size and mtime are put back (it also changes on chmod/chown/hard links: such files are
embedded again). A repeated call with the same inputs reads the cache instead of running the
model. With ``autocast='auto'`` a cache made under another
autocast setting for the same inputs is accepted too (e.g. a bf16 GPU extraction read
back on a CPU machine); ``ExtractionResult.compute`` says how the embeddings were made.
Cache files are written atomically (:func:`treeprobe._utils.atomic_write`). Before the
model runs, the cache folder is checked (:func:`check_cache_dir`: created, a probe file
written and deleted, free space for about ``2 x N x D x 4`` bytes), so an unusable folder
fails at once; a full disk or a read-only folder while writing is a TreeprobeError too.

Resume. While a cached run is in progress, every ``chunk_batches`` batches (default
:data:`DEFAULT_CHUNK_IMAGES` images' worth) or every ``chunk_seconds``
(:data:`DEFAULT_CHUNK_SECONDS`), whichever comes first, the finished batches are written as
a chunk into the folder ``embeddings-<key>.partial/`` (a chunk of 2,048 x 768 float32 takes
about 17 ms to write with fsync). On Ctrl-C (KeyboardInterrupt) or SIGTERM (turned into a
KeyboardInterrupt while the batch loop runs in the main thread; the previous handler is
restored after) the finished batches are written before the interrupt propagates. A run
started again with the same inputs reads those chunks and embeds only what is left, in the
same batches, so the result is identical to an uninterrupted run with the same
``batch_size``. The folder is removed when the cache file is written.

Building blocks. Besides :func:`extract_embeddings`, the steps it is made of are public so
that :mod:`treeprobe.extract_dist` (sharded extraction) and the benchmarks use the same code:
:class:`RunOptions` (batching, workers, resume chunking) and :func:`resolve_plan` (device,
dtypes), :func:`embed_paths` (the batch loop with resume chunks), the cache files
(:func:`cache_keys`, :func:`cache_file_for`, :func:`read_cache`, :func:`write_cache`) and the
one-batch forward (:func:`prepare_model`, :func:`encode_batch`), and the decoder
(:func:`decode_image`, :func:`to_rgb`) for other code that reads images the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from treeprobe._utils import atomic_write, one_line
from treeprobe._validation import check_choice, check_int
from treeprobe.errors import TreeprobeError
from treeprobe.models import LoadedModel

__all__ = [
    "ALPHA_BACKGROUND", "AUTOCAST_CHOICES", "CACHE_VERSION", "DEFAULT_BATCH_SIZE", "DEFAULT_CHUNK_IMAGES",
    "DEFAULT_CHUNK_SECONDS", "DEFAULT_NUM_WORKERS", "DEFAULT_PREFETCH_FACTOR", "ExtractionResult", "Plan",
    "RunOptions", "accepted_autocast_tags", "cache_file_for", "cache_key", "cache_keys", "check_cache_dir",
    "check_paths", "decode_image", "embed_paths", "encode_batch", "extract_embeddings", "no_images_error",
    "partial_dir_for", "path_strings", "prepare_model", "read_cache", "read_first_cache", "resolve_plan",
    "space_needed", "to_rgb", "write_cache",
]

#: Version number inside every cache key; bump it when the cache format or the numbers change.
#: 2: EXIF orientation, 16-bit grey and transparency decoded as described above; ctime in the listing.
CACHE_VERSION = 2
#: Values of the ``autocast`` argument (see the module docstring).
AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")
#: Images per forward pass.
DEFAULT_BATCH_SIZE = 64
#: DataLoader worker processes that decode images (0: the calling process decodes).
DEFAULT_NUM_WORKERS = 0
#: Batches each DataLoader worker prepares ahead (torch's own default).
DEFAULT_PREFETCH_FACTOR = 2
#: Images per resume chunk (``chunk_batches`` defaults to this // batch_size) ...
DEFAULT_CHUNK_IMAGES = 2048
#: ... or whatever was embedded in this many seconds, whichever comes first.
DEFAULT_CHUNK_SECONDS = 30.0
#: Colour (RGB) that transparent pixels are composited onto.
ALPHA_BACKGROUND = (255, 255, 255)
#: Bytes kept free beyond the estimate of :func:`space_needed`.
SPACE_MARGIN = 16 << 20

_CHUNK_PREFIX, _CHUNK_SUFFIX = "chunk-", ".npz"
_CACHE_SUFFIX, _PARTIAL_SUFFIX = ".npz", ".partial"
_MISSING_FILE = "missing file"
_NON_FINITE = "non-finite embedding from the model"
_TAG_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112
#: errno values of a write that failed because of the disk or the folder (full, quota, read-only, no permission).
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EACCES", "EPERM")
                          if hasattr(errno, n))


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


@dataclass(frozen=True)
class RunOptions:
    """How the batch loop runs: images per batch, decoding workers (``prefetch_factor`` batches
    ahead each; None: 2), torch threads (None: leave as is), progress bar, resume chunk size
    (``chunk_batches`` batches, None: :data:`DEFAULT_CHUNK_IMAGES` images' worth, or
    ``chunk_seconds`` s, whichever comes first)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = DEFAULT_NUM_WORKERS
    prefetch_factor: int | None = None
    threads: int | None = None
    progress: bool = True
    chunk_batches: int | None = None
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS

    def __post_init__(self):
        check_int(self.batch_size, "batch_size", minimum=1)
        check_int(self.num_workers, "num_workers", minimum=0)
        if self.chunk_batches is not None:
            check_int(self.chunk_batches, "chunk_batches", minimum=1)

    @property
    def batches_per_chunk(self) -> int:
        """Batches per resume chunk (at least 1)."""
        if self.chunk_batches is not None:
            return self.chunk_batches
        return max(1, DEFAULT_CHUNK_IMAGES // self.batch_size)


# ----------------------------------------------------------------------------- images


def to_rgb(img):
    """A PIL image as 8-bit RGB (a new image): 16-bit grey (``I;16*``; ``I`` clipped to
    0..65535) scaled by ``value >> 8``; transparency composited onto :data:`ALPHA_BACKGROUND`;
    other modes through ``convert("RGB")``."""
    from PIL import Image

    if img.mode in _WIDE_GREY_MODES:
        grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return img.convert("RGB")


def _exif_upright(img):
    """``img`` turned as its EXIF Orientation (2-8) says; as is without one or with unreadable EXIF."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels unusable
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def decode_image(fp):
    """An image file (path or binary file object) as an upright 8-bit RGB PIL image (see the
    module docstring); raises what PIL raises for undecodable data."""
    from PIL import Image

    with Image.open(fp) as img:
        return to_rgb(_exif_upright(img))


def _file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as an image file (a failure reason), or None when it is a regular file."""
    if not path:
        return _MISSING_FILE
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return _MISSING_FILE
    except OSError as e:
        return f"cannot read file: {e.strerror or one_line(e)}"
    if stat.S_ISDIR(mode):
        return "not a file (a folder)"
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        return "not a regular file"
    return None


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
        i = int(j if self.indices is None else self.indices[j])
        path = self.paths[i]
        problem = _file_problem(path)
        if problem is not None:
            return i, None, problem
        try:
            f = open(path, "rb")
        except OSError as e:
            return i, None, f"cannot read file: {e.strerror or one_line(e)}"
        try:
            with f:
                rgb = decode_image(f)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a skipped image
            return i, None, f"cannot decode image: {one_line(e)}"
        try:
            return i, self.preprocess(rgb), None
        except Exception as e:  # noqa: BLE001
            return i, None, f"cannot preprocess image: {one_line(e)}"


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


def path_strings(paths: Sequence) -> list[str]:
    """``paths`` as a list of str (``os.fspath``; None → ``''``, which reads as a missing file)."""
    return [os.fspath(p) if p is not None else "" for p in paths]


def check_paths(paths: Sequence) -> list[str]:
    """:func:`path_strings` of ``paths``; raises TreeprobeError when there are none."""
    paths = path_strings(paths)
    if len(paths) == 0:
        raise TreeprobeError("no images to embed (empty list of paths)")
    return paths


# ----------------------------------------------------------------------------- settings


@dataclass
class Plan:
    """Resolved runtime settings of one extraction: device, dtype of the image batch, autocast
    dtype (None: no autocast), cache-key tag of an autocast chosen here (not by the precision),
    memory format and the model's precision."""

    device: torch.device
    in_dtype: torch.dtype
    amp_dtype: torch.dtype | None
    autocast_tag: str | None
    channels_last: bool
    precision: str

    @property
    def compute(self) -> str:
        """How embeddings are computed: the precision, plus ``+autocast_<tag>`` for a chosen autocast."""
        return self.precision + (f"+autocast_{self.autocast_tag}" if self.autocast_tag else "")

    def autocast(self):
        """The autocast context of this plan (a no-op without autocast)."""
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


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _autocast_tag(precision: str, autocast: str, device: torch.device) -> str | None:
    """The autocast an fp32 model runs under ('bf16', 'fp16' or None); other precisions: None."""
    if precision != "fp32" or autocast == "off":
        return None
    if autocast != "auto":
        return autocast
    if device.type != "cuda":
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_plan(loaded: LoadedModel, device=None, *, autocast: str = "auto", channels_last=None) -> Plan:
    """Pick device (None: CUDA if available), input dtype, autocast and memory format for ``loaded``."""
    if autocast is None or autocast is False:
        autocast = "off"
    check_choice(autocast, "autocast", AUTOCAST_CHOICES)
    device = _resolve_device(device)
    precision = getattr(loaded, "precision", "fp32") or "fp32"
    tag = _autocast_tag(precision, autocast, device)
    if precision.startswith("amp"):  # the precision itself asks for autocast (open_clip's amp / amp_bf16)
        amp_dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    else:  # (fp16/bf16/pure_* models already run in low precision: no autocast on top)
        amp_dtype = _TAG_DTYPE.get(tag)
    if channels_last is None:
        channels_last = device.type == "cuda" and not _is_vit(loaded.model)
    return Plan(device, _input_dtype(precision), amp_dtype, tag, bool(channels_last), precision)


def _is_vit(model) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except Exception:  # noqa: BLE001
        return False
    return isinstance(getattr(model, "visual", None), VisionTransformer)


def accepted_autocast_tags(autocast: str, plan: Plan) -> list[str | None]:
    """Autocast tags whose cache files a lookup accepts, preferred first (all of them for 'auto' + fp32)."""
    if autocast != "auto" or plan.precision != "fp32":
        return [plan.autocast_tag]
    return [plan.autocast_tag] + [t for t in (None, "bf16", "fp16") if t != plan.autocast_tag]


# ----------------------------------------------------------------------------- cache


def _listing(paths: Sequence[str]) -> list:
    """[path, size, mtime_ns, ctime_ns] of each path in order (None for the numbers of a path that cannot be stat'ed)."""
    listing = []
    for p in paths:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        listing.append([p, st.st_size, st.st_mtime_ns, st.st_ctime_ns] if st else [p, None, None, None])
    return listing


def cache_keys(loaded: LoadedModel, paths: Sequence[str], tags: Sequence[str | None]) -> list[str]:
    """sha256 hex cache keys of ``paths`` for each autocast tag; the listing is stat'ed once.

    Each key is sha256 of ``json.dumps(payload, sort_keys=True)`` where payload holds version,
    digest, model_name, listing (path, size, mtime_ns, ctime_ns), preprocess (repr), precision
    and, when not None, autocast.
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


def cache_key(loaded: LoadedModel, paths: Sequence[str], autocast_tag: str | None = None) -> str:
    """The sha256 hex cache key of ``paths`` for one autocast tag (see :func:`cache_keys`)."""
    return cache_keys(loaded, paths, [autocast_tag])[0]


def cache_file_for(cache_dir, key: str) -> str:
    """Path of the cache file of ``key`` in ``cache_dir``: ``embeddings-<key>.npz``."""
    return os.path.join(os.fspath(cache_dir), f"embeddings-{key}{_CACHE_SUFFIX}")


def read_cache(file: str, n: int, *, default_compute: str | None = None) -> ExtractionResult | None:
    """A cache (or shard) file of ``n`` paths as a cache hit (``seconds`` 0), or None with a warning
    when it is damaged; ``compute`` is ``default_compute`` for files that do not record it."""
    try:
        with np.load(file, allow_pickle=False) as z:
            emb, ok = z["embeddings"].astype(np.float32), z["ok"].astype(bool)
            items, reasons = z["failure_item"].tolist(), z["failure_reason"].tolist()
            compute = str(z["compute"]) if "compute" in z.files else None
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
        warnings.warn(f"ignoring unreadable cache file {file}: {one_line(e)}", stacklevel=3)
        return None
    if ok.shape != (n,) or emb.shape[0] != int(ok.sum()):
        warnings.warn(f"ignoring inconsistent cache file {file}", stacklevel=3)
        return None
    failures = pd.DataFrame({"item": items, "reason": reasons}, dtype=object)
    return ExtractionResult(emb, ok, failures, cache_hit=True, seconds=0.0, compute=compute or default_compute)


def read_first_cache(files: Sequence[str], n: int, *, default_compute: str | None = None) -> ExtractionResult | None:
    """:func:`read_cache` of the first of ``files`` that exists and reads, else None."""
    for file in files:
        if os.path.exists(file):
            cached = read_cache(file, n, default_compute=default_compute)
            if cached is not None:
                return cached
    return None


def _savez(file: str, arrays: dict) -> None:
    """``np.savez`` written atomically (readers never see half a file); a full disk, a quota or a
    read-only folder is a TreeprobeError (files written before are kept)."""
    try:
        atomic_write(file, lambda f: np.savez(f, **arrays))
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise TreeprobeError(
            f"cannot write {file} ({e.strerror or one_line(e)}); make room or fix the folder (or pass another "
            "--cache-dir) and run again: the resume chunks already written there are used"
        ) from None


def space_needed(n: int, dim: int, *, copies: int = 2, partial_dir: str | None = None) -> int:
    """Bytes an extraction of ``n`` images of ``dim`` floats needs in its cache folder:
    ``copies`` x n x dim x 4 (resume chunks and the cache file exist together before the chunks
    are removed) + n + :data:`SPACE_MARGIN`, less what the chunks in ``partial_dir`` already hold."""
    have = 0
    if partial_dir is not None and os.path.isdir(partial_dir):
        for entry in os.scandir(partial_dir):
            if _chunk_seq(entry.name) is not None:
                have += entry.stat().st_size
    return max(copies * n * dim * 4 + n - have, 0) + SPACE_MARGIN


def check_cache_dir(cache_dir, need_bytes: int = 0) -> None:
    """Raise TreeprobeError (one line, naming the folder) unless ``cache_dir`` is, or can be made, a
    folder where a file can be created and deleted, with at least ``need_bytes`` free."""
    d = os.fspath(cache_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise TreeprobeError(f"cache folder {d} is a file, not a folder; pass another --cache-dir")
    try:
        os.makedirs(d, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".treeprobe-write-test-", dir=d)
        os.close(fd)
        os.remove(probe)
        free = shutil.disk_usage(d).free
    except OSError as e:
        raise TreeprobeError(f"cannot write to the cache folder {d} ({e.strerror or one_line(e)}); "
                             "pass a writable --cache-dir") from None
    if free < need_bytes:
        raise TreeprobeError(f"not enough free space in the cache folder {d}: {free / 2**20:.0f} MiB free, "
                             f"about {need_bytes / 2**20:.0f} MiB needed; make room or pass another --cache-dir")


def write_cache(file: str, result: ExtractionResult, *, extra: dict | None = None) -> None:
    """Write ``result`` (embeddings, ok, failures, compute unless None) and ``extra`` arrays as a
    cache (or shard) file, atomically."""
    arrays = dict(
        embeddings=np.ascontiguousarray(result.embeddings, dtype=np.float32),
        ok=np.asarray(result.ok, dtype=bool),
        failure_item=np.asarray(result.failures["item"].tolist(), dtype=str),
        failure_reason=np.asarray(result.failures["reason"].tolist(), dtype=str),
        **(extra or {}),
    )
    if result.compute is not None:
        arrays["compute"] = np.asarray(result.compute)
    _savez(file, arrays)


def _failures_frame(paths: Sequence[str], failed: dict) -> pd.DataFrame:
    fail_idx = sorted(failed)
    return pd.DataFrame(
        {"item": [paths[i] for i in fail_idx], "reason": [failed[i] for i in fail_idx]}, dtype=object
    )


# ----------------------------------------------------------------------------- resume chunks


def partial_dir_for(file: str) -> str:
    """The resume folder of a cache or shard file: ``<file without .npz>.partial``."""
    return (file[:-len(_CACHE_SUFFIX)] if file.endswith(_CACHE_SUFFIX) else file) + _PARTIAL_SUFFIX


@dataclass
class _Batch:
    """One finished batch: ``items`` int64 (b,) every index it held, ``ok_index`` int64 (k,) and
    ``embeddings`` float32 (k, D) of those embedded, ``failed`` [(index, reason)] of the others."""

    items: np.ndarray
    ok_index: np.ndarray
    embeddings: np.ndarray
    failed: list


@dataclass
class _Collected:
    """What is embedded so far: ``done`` bool (n,), pieces [(ok indices, float32 (k, D))] and
    ``failed`` {index: reason}; ``next_seq`` is the number of the next resume chunk."""

    done: np.ndarray
    pieces: list
    failed: dict
    next_seq: int = 0

    def add(self, batch: _Batch) -> None:
        self.pieces.append((batch.ok_index, batch.embeddings))
        self.failed.update(batch.failed)

    def result(self, paths: Sequence[str], dim: int, compute: str) -> ExtractionResult:
        """The collected pieces in input order (``seconds`` 0)."""
        ok = np.zeros(len(paths), dtype=bool)
        pieces = [p for p in self.pieces if p[0].size]
        if pieces:
            order = np.concatenate([i for i, _ in pieces])
            emb = np.concatenate([e for _, e in pieces]).astype(np.float32, copy=False)
            ok[order] = True
            emb = np.ascontiguousarray(emb[np.argsort(order, kind="stable")])
        else:
            emb = np.zeros((0, dim), np.float32)
        return ExtractionResult(emb, ok, _failures_frame(paths, self.failed), cache_hit=False, seconds=0.0,
                                compute=compute)


def _load_chunk(file: str):
    """(items, ok indices, embeddings, failure indices, failure reasons) of a chunk, or None (warned)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            return (z["items"].astype(np.int64), z["ok_index"].astype(np.int64),
                    z["embeddings"].astype(np.float32), z["failure_index"].astype(np.int64),
                    z["failure_reason"].tolist())
    except Exception as e:  # noqa: BLE001 - a damaged chunk is recomputed
        warnings.warn(f"ignoring unreadable resume chunk {file}: {one_line(e)}", stacklevel=4)
        return None


def _chunk_fits(chunk, done: np.ndarray, dim: int | None) -> bool:
    """Whether a chunk's items are new, in range, unique and match its embeddings and failures."""
    items, oi, emb, fi, _ = chunk
    n = done.size
    return bool(
        items.size and items.min() >= 0 and items.max() < n and not done[items].any()
        and len(np.unique(items)) == items.size and emb.shape[0] == oi.size
        and (emb.shape[0] == 0 or (emb.ndim == 2 and (dim is None or emb.shape[1] == dim)))
        and set(oi.tolist()) | set(fi.tolist()) == set(items.tolist())
    )


def _chunk_seq(name: str) -> int | None:
    """The number of a chunk file name ``chunk-NNNNNN.npz``, or None for other names."""
    if not (name.startswith(_CHUNK_PREFIX) and name.endswith(_CHUNK_SUFFIX)):
        return None
    try:
        return int(name[len(_CHUNK_PREFIX):-len(_CHUNK_SUFFIX)])
    except ValueError:
        return None


def _read_partials(pdir: str | None, n: int) -> _Collected:
    """What the resume chunks in ``pdir`` (None: no folder) hold for a listing of ``n`` paths."""
    got = _Collected(np.zeros(n, dtype=bool), [], {})
    if pdir is None or not os.path.isdir(pdir):
        return got
    dim = None
    for name in sorted(os.listdir(pdir)):
        seq = _chunk_seq(name)
        if seq is None:
            continue
        got.next_seq = max(got.next_seq, seq + 1)
        file = os.path.join(pdir, name)
        chunk = _load_chunk(file)
        if chunk is None:
            continue
        if not _chunk_fits(chunk, got.done, dim):
            warnings.warn(f"ignoring inconsistent resume chunk {file}", stacklevel=3)
            continue
        items, oi, emb, fi, fr = chunk
        if emb.shape[0]:
            dim = emb.shape[1]
        got.done[items] = True
        got.add(_Batch(items, oi, emb, list(zip(fi.tolist(), fr))))
    return got


class _ChunkWriter:
    """The batches finished since the last resume chunk; :meth:`write` saves them as
    ``chunk-<seq>.npz`` in ``partial_dir`` (None: no resume, nothing is kept).

    Finished batches are kept by batch number (one dict store each), so a KeyboardInterrupt
    at any point leaves whole batches only, and recording a batch twice is harmless.
    """

    def __init__(self, partial_dir: str | None, seq: int, options: RunOptions):
        self.partial_dir, self.seq = partial_dir, seq
        self.batches_per_chunk, self.seconds = options.batches_per_chunk, options.chunk_seconds
        self._start()

    def _start(self) -> None:
        self.finished: dict[int, _Batch] = {}
        self.loaded, self.t0 = 0, time.monotonic()

    def loaded_batch(self) -> None:
        """Another batch came out of the loader."""
        self.loaded += 1

    def add(self, number: int, batch: _Batch) -> None:
        """Batch ``number`` is finished."""
        if self.partial_dir is not None:
            self.finished[number] = batch

    def due(self) -> bool:
        """True when the batches since the last chunk should be written now."""
        return self.partial_dir is not None and (
            self.loaded >= self.batches_per_chunk or time.monotonic() - self.t0 >= self.seconds)

    def write(self) -> None:
        """Save the batches finished since the last chunk as the next chunk file (none: nothing written)."""
        if self.partial_dir is None or not self.finished:
            self._start()
            return
        batches = [self.finished[k] for k in sorted(self.finished)]
        _savez(os.path.join(self.partial_dir, f"{_CHUNK_PREFIX}{self.seq:06d}{_CHUNK_SUFFIX}"), dict(
            items=np.concatenate([b.items for b in batches]).astype(np.int64),
            ok_index=np.concatenate([b.ok_index for b in batches]).astype(np.int64),
            embeddings=np.concatenate([b.embeddings for b in batches]).astype(np.float32),
            failure_index=np.asarray([i for b in batches for i, _ in b.failed], dtype=np.int64),
            failure_reason=np.asarray([r for b in batches for _, r in b.failed], dtype=str),
        ))
        self.seq += 1
        self._start()


# ----------------------------------------------------------------------------- the loop


def prepare_model(loaded: LoadedModel, plan: Plan) -> torch.nn.Module:
    """``loaded.model`` on the plan's device, in eval mode and the plan's memory format."""
    model = loaded.model.to(plan.device).eval()
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def encode_batch(model, images: torch.Tensor, plan: Plan) -> torch.Tensor:
    """One batch (B, 3, H, W) → L2-normalised float32 features (B, D) on the model's device."""
    images = images.to(device=plan.device, dtype=plan.in_dtype, non_blocking=True)
    if plan.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with plan.autocast():
        feats = model.encode_image(images)
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def _failed_batch(failed: list, dim: int) -> _Batch:
    """A batch none of whose images could be decoded: its failures [(index, reason)]."""
    return _Batch(np.asarray([i for i, _ in failed], np.int64), np.zeros(0, np.int64),
                  np.zeros((0, dim), np.float32), list(failed))


class _HostCopy:
    """Features of one batch on their way to host memory (asynchronous on CUDA), with the
    batch's decoding failures [(index, reason)]."""

    def __init__(self, number: int, idx: torch.Tensor, feats: torch.Tensor, failed: list):
        self.number, self.idx, self.failed = number, idx, list(failed)
        if feats.device.type == "cuda":
            self.host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(feats.device))  # the stream the copy went on
        else:
            self.host, self.event = feats, None

    def result(self) -> _Batch:
        """The finished batch; non-finite or zero features are failures."""
        if self.event is not None:
            self.event.synchronize()
        idx, feats = self.idx.numpy(), self.host.numpy()
        finite = np.isfinite(feats).all(axis=1) & (np.abs(feats).sum(axis=1) > 0)
        bad = [(int(i), _NON_FINITE) for i in idx[~finite]]
        items = np.concatenate([idx, np.asarray([i for i, _ in self.failed], np.int64)])
        return _Batch(items, idx[finite], np.array(feats[finite], dtype=np.float32), self.failed + bad)


def _loader(loaded: LoadedModel, paths: Sequence[str], indices: np.ndarray, plan: Plan,
            options: RunOptions) -> DataLoader:
    kw = dict(batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
              collate_fn=_collate, pin_memory=plan.device.type == "cuda")
    if options.num_workers > 0:
        kw["prefetch_factor"] = options.prefetch_factor or DEFAULT_PREFETCH_FACTOR
    return DataLoader(_ImageFiles(paths, loaded.preprocess, indices=indices), **kw)


def _batches(loader: DataLoader, num_workers: int) -> Iterator:
    """The loader's batches; decoding in this process runs with one torch thread for the small
    per-image tensor ops (ToTensor, Normalize), which are much slower with several threads."""
    it = iter(loader)
    while True:
        with _torch_threads(1 if num_workers == 0 else None):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


@contextmanager
def _sigterm_as_interrupt():
    """While active, SIGTERM raises KeyboardInterrupt in the main thread (so the finished batches
    are saved as on Ctrl-C); the previous handler is restored after. A no-op outside the main
    thread and where SIGTERM is ignored or has a handler not set from Python."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous is signal.SIG_IGN:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _save_interrupted(chunks: _ChunkWriter, pending: _HostCopy | None, finish) -> None:
    """On an interrupt: record the batch whose features are on their way back, write the chunk."""
    if pending is not None:
        try:
            finish(pending)
        except Exception:  # noqa: BLE001 - that batch is embedded again on the next run
            pass
    try:
        chunks.write()
    except Exception as e:  # noqa: BLE001 - the interrupt is what the caller must see
        warnings.warn(f"could not save the finished batches on interrupt: {one_line(e)}", stacklevel=3)


def _embed_remaining(loaded: LoadedModel, paths: Sequence[str], plan: Plan, options: RunOptions,
                     got: _Collected, chunks: _ChunkWriter, desc: str) -> None:
    """Embed the paths not ``got.done`` into ``got``, handing every batch to ``chunks`` too; the
    last batches are written as a chunk at the end, and on KeyboardInterrupt / SIGTERM."""
    from tqdm.auto import tqdm

    remaining = np.flatnonzero(~got.done)
    model = prepare_model(loaded, plan)
    loader = _loader(loaded, paths, remaining, plan, options)

    def finish(copy: _HostCopy) -> None:
        batch = copy.result()
        chunks.add(copy.number, batch)
        got.add(batch)

    n = len(paths)
    pending: _HostCopy | None = None
    with tqdm(total=n, initial=n - remaining.size, desc=desc, unit="img", disable=not options.progress) as bar, \
            _torch_threads(options.threads), torch.inference_mode(), _sigterm_as_interrupt():
        try:
            for number, (idx, images, batch_failed) in enumerate(_batches(loader, options.num_workers)):
                chunks.loaded_batch()
                if images is None:
                    batch = _failed_batch(batch_failed, loaded.embed_dim)
                    chunks.add(number, batch)
                    got.add(batch)
                else:
                    copy = _HostCopy(number, idx, encode_batch(model, images, plan), batch_failed)
                    if pending is not None:  # let the GPU run this batch while the last one comes back
                        finish(pending)
                    pending = copy
                bar.update(len(idx) + len(batch_failed))
                if chunks.due():
                    if pending is not None:
                        finish(pending)
                        pending = None
                    chunks.write()
            if pending is not None:
                finish(pending)
                pending = None
            chunks.write()  # everything is on disk before the cache file is written
        except KeyboardInterrupt:
            _save_interrupted(chunks, pending, finish)
            raise


def embed_paths(loaded: LoadedModel, paths: Sequence[str], plan: Plan, *, options: RunOptions = RunOptions(),
                partial_dir: str | None = None, desc: str = "embedding images") -> ExtractionResult:
    """Embed ``paths`` → embeddings (N_ok, D) in input order, ok (N,), failures (``seconds`` 0).

    Never raises for unreadable images, not even when none is readable (the callers decide).
    With ``partial_dir``, finished batches are saved there in chunks (also on Ctrl-C / SIGTERM,
    before the KeyboardInterrupt propagates) and a run that finds chunks there embeds only the
    remaining images.
    """
    got = _read_partials(partial_dir, len(paths))
    if not got.done.all():
        chunks = _ChunkWriter(partial_dir, got.next_seq, options)
        _embed_remaining(loaded, paths, plan, options, got, chunks, desc)
    return got.result(paths, loaded.embed_dim, plan.compute)


def no_images_error(n_paths: int, failures: pd.DataFrame) -> TreeprobeError:
    """The error for a listing of ``n_paths`` where every image failed (``failures`` in input order)."""
    item, reason = failures["item"].iloc[0], failures["reason"].iloc[0]
    return TreeprobeError(f"no readable images among {n_paths} paths (e.g. {item or '<empty path>'}: {reason})")


def extract_embeddings(
    loaded: LoadedModel,
    paths: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    num_workers: int = DEFAULT_NUM_WORKERS,
    cache_dir=None,
    device=None,
    progress: bool = True,
    autocast: str = "auto",
    channels_last: bool | None = None,
    prefetch_factor: int | None = None,
    threads: int | None = None,
    resume: bool = True,
    chunk_batches: int | None = None,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
) -> ExtractionResult:
    """Embed the images at ``paths`` → float32 (N_ok, D) unit-norm embeddings in input order.

    ``ok`` (N,) marks which paths they belong to. Raises TreeprobeError when no image can be read.

    device: None → CUDA when available, else CPU (the model is moved there).
    num_workers: DataLoader worker processes that decode and resize (0: in this process);
        prefetch_factor: batches each worker keeps ready (default 2).
    autocast: 'auto' (bf16 on CUDA, off on the CPU, for fp32 models), 'off', 'bf16', 'fp16'.
    channels_last: None → on for CUDA with a convolutional image tower.
    threads: torch intra-op threads for the duration of the call (None: leave as is).
    cache_dir: folder of the embedding cache (None: no cache, no resume); on a cache miss it
        must be writable with room for the result (checked before the model runs).
    resume: with ``cache_dir``, save finished batches every ``chunk_batches`` batches
        (default 2048 images' worth) or ``chunk_seconds`` (default 30), and on Ctrl-C / SIGTERM,
        and pick up an interrupted run.
    """
    t0 = time.perf_counter()
    options = RunOptions(batch_size=batch_size, num_workers=num_workers, prefetch_factor=prefetch_factor,
                         threads=threads, progress=progress, chunk_batches=chunk_batches, chunk_seconds=chunk_seconds)
    paths = check_paths(paths)
    plan = resolve_plan(loaded, device, autocast=autocast, channels_last=channels_last)
    if cache_dir is None:
        return _run_and_store(loaded, paths, plan, options=options, t0=t0)
    files = [cache_file_for(cache_dir, key)
             for key in cache_keys(loaded, paths, accepted_autocast_tags(autocast, plan))]
    cached = read_first_cache(files, len(paths), default_compute=plan.precision)
    if cached is not None:
        return replace(cached, seconds=time.perf_counter() - t0)
    return _run_and_store(loaded, paths, plan, options=options, t0=t0, cache_file=files[0], resume=resume)


def _run_and_store(loaded: LoadedModel, paths: list[str], plan: Plan, *, options: RunOptions, t0: float,
                      cache_file: str | None = None, resume: bool = True) -> ExtractionResult:
    """Run the model on ``paths`` and write ``cache_file`` (None: no cache); raises when none is readable
    or when the cache folder cannot take the result (checked first)."""
    partial = partial_dir_for(cache_file) if (cache_file is not None and resume) else None
    if cache_file is not None:
        check_cache_dir(os.path.dirname(cache_file), space_needed(
            len(paths), loaded.embed_dim, copies=2 if partial else 1, partial_dir=partial))
    res = embed_paths(loaded, paths, plan, options=options, partial_dir=partial)
    if not res.ok.any():
        raise no_images_error(len(paths), res.failures)
    if cache_file is not None:
        write_cache(cache_file, res)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return replace(res, seconds=time.perf_counter() - t0)
