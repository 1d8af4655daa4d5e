"""Batched, cached image-embedding extraction with an open_clip model.

:func:`extract_embeddings` decodes images in a torch ``DataLoader`` (PIL → RGB → the
model's inference transform), runs ``model.encode_image`` under
``torch.inference_mode()`` and L2-normalises the result. Unreadable, missing or
corrupt images never stop the run: they are left out and listed in ``failures``.

Results can be cached in ``cache_dir`` as ``.npz`` files keyed by the model digest and
name, the ordered (path, size, mtime_ns) listing of the inputs, the transform and the
precision; a repeated call with the same inputs reads the cache instead of running the
model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from treeprobe.errors import TreeprobeError
from treeprobe.models import LoadedModel

CACHE_VERSION = 1


@dataclass
class ExtractionResult:
    """embeddings: float32 (N_ok, D), unit L2 norm, rows in input order of the ok paths.
    ok: bool (N,) over the input paths, True where an embedding was produced.
    failures: DataFrame with columns ``item`` (the path as given) and ``reason``.
    cache_hit: True when read from the cache without running the model.
    seconds: wall-clock duration of the call.
    """

    embeddings: np.ndarray
    ok: np.ndarray
    failures: pd.DataFrame
    cache_hit: bool
    seconds: float


class _ImageFiles(Dataset):
    """Item i → (i, tensor (3, H, W), None) or (i, None, reason)."""

    def __init__(self, paths: Sequence[str], preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

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


def _cache_key(loaded: LoadedModel, paths: Sequence[str]) -> str:
    """sha256 hex over model identity, the ordered file listing, transform and precision."""
    listing = []
    for p in paths:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        listing.append([p, st.st_size if st else None, st.st_mtime_ns if st else None])
    payload = {
        "version": CACHE_VERSION,
        "digest": loaded.digest,
        "model_name": loaded.model_name,
        "listing": listing,
        "preprocess": repr(loaded.preprocess),
        "precision": loaded.precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_cache(file: str, n: int):
    try:
        with np.load(file, allow_pickle=False) as z:
            emb, ok = z["embeddings"].astype(np.float32), z["ok"].astype(bool)
            items, reasons = z["failure_item"].tolist(), z["failure_reason"].tolist()
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
        warnings.warn(f"ignoring unreadable cache file {file}: {_one_line(e)}", stacklevel=3)
        return None
    if ok.shape != (n,) or emb.shape[0] != int(ok.sum()):
        warnings.warn(f"ignoring inconsistent cache file {file}", stacklevel=3)
        return None
    return emb, ok, pd.DataFrame({"item": items, "reason": reasons}, dtype=object)


def _write_cache(file: str, emb: np.ndarray, ok: np.ndarray, failures: pd.DataFrame) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                embeddings=emb,
                ok=ok,
                failure_item=np.asarray(failures["item"].tolist(), dtype=str),
                failure_reason=np.asarray(failures["reason"].tolist(), dtype=str),
            )
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _input_dtype(precision: str) -> torch.dtype:
    """dtype of the image batch for models built in low precision (open_clip's convention)."""
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    return torch.float32


def extract_embeddings(
    loaded: LoadedModel,
    paths: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir=None,
    device=None,
    progress: bool = True,
) -> ExtractionResult:
    """Embed the images at ``paths`` with ``loaded.model``.

    Returns float32 (N_ok, D) unit-norm embeddings for the readable images, in input
    order, with ``ok`` (N,) marking which paths they belong to. ``device`` None → CUDA
    when available, else CPU (the model is moved there). Raises TreeprobeError when no
    image can be read.
    """
    t0 = time.perf_counter()
    paths = [os.fspath(p) if p is not None else "" for p in paths]
    n = len(paths)
    if n == 0:
        raise TreeprobeError("no images to embed (empty list of paths)")
    if batch_size < 1:
        raise TreeprobeError(f"batch_size must be at least 1, got {batch_size}")

    cache_file = None
    if cache_dir is not None:
        key = _cache_key(loaded, paths)
        cache_file = os.path.join(os.fspath(cache_dir), f"embeddings-{key}.npz")
        if os.path.exists(cache_file):
            cached = _read_cache(cache_file, n)
            if cached is not None:
                emb, ok, failures = cached
                return ExtractionResult(emb, ok, failures, True, time.perf_counter() - t0)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = loaded.model.to(device).eval()
    precision = getattr(loaded, "precision", "fp32")
    in_dtype = _input_dtype(precision)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16 if "bf16" in precision else torch.float16)
        if precision.startswith("amp") else nullcontext()
    )

    loader = DataLoader(
        _ImageFiles(paths, loaded.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    from tqdm.auto import tqdm

    ok = np.zeros(n, dtype=bool)
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    failed: dict[int, str] = {}
    with tqdm(total=n, desc="embedding images", unit="img", disable=not progress) as bar, \
            torch.inference_mode():
        for idx, images, batch_failed in loader:
            failed.update(batch_failed)
            if images is not None:
                images = images.to(device=device, dtype=in_dtype, non_blocking=True)
                with autocast:
                    feats = model.encode_image(images)
                feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
                finite = np.isfinite(feats).all(axis=1) & (np.abs(feats).sum(axis=1) > 0)
                idx = idx.numpy()
                for i in idx[~finite]:
                    failed[int(i)] = "non-finite embedding from the model"
                ok[idx[finite]] = True
                chunks.append((idx[finite], feats[finite]))
            bar.update(len(idx) + len(batch_failed))

    if not ok.any():
        first = min(failed)
        raise TreeprobeError(
            f"no readable images among {n} paths (e.g. {paths[first] or '<empty path>'}: {failed[first]})"
        )
    order = np.concatenate([i for i, _ in chunks])
    emb = np.concatenate([e for _, e in chunks]).astype(np.float32)
    emb = np.ascontiguousarray(emb[np.argsort(order, kind="stable")])
    fail_idx = sorted(failed)
    failures = pd.DataFrame(
        {"item": [paths[i] for i in fail_idx], "reason": [failed[i] for i in fail_idx]}, dtype=object
    )
    if cache_file is not None:
        _write_cache(cache_file, emb, ok, failures)
    return ExtractionResult(emb, ok, failures, False, time.perf_counter() - t0)
