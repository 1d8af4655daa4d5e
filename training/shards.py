"""Write webdataset tar shards from a metadata CSV (or iNat21 folder).

Each sample is ``<key>.jpg`` (JPEG bytes; JPEG files are copied as they are unless
``max_size`` asks for a resize, other formats are re-encoded) and ``<key>.json``::

    {"lineage": {"kingdom": ..., ..., "species": "Genus epithet"},
     "common_name": "...",
     "texts": {"taxonomic": "a photo of ...", "scientific": ..., "common": ...,
               "scientific_common": ..., "taxonomic_common": ...},
     "source_path": "/abs/path.jpg", "covariates": {other CSV columns}}

plus ``manifest.json`` (``num_samples``, ``shards``, ``text_types``) and ``skipped.csv``
(unreadable images, rows without taxonomy) in the output folder. Training reads the
shards with ``treeprobe train --data DIR`` (count taken from the manifest).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pandas as pd
from PIL import Image

from treeprobe._utils import RANKS, atomic_write_text
from treeprobe.training.checkpoint import plain
from treeprobe.training.data import load_items, unreadable_reason
from treeprobe.training.text import TEXT_TYPES, all_captions

__all__ = ["DEFAULT_SHARD_SIZE", "DEFAULT_JPEG_QUALITY", "make_shards", "sample_record"]

#: Samples per tar shard.
DEFAULT_SHARD_SIZE = 1000
#: JPEG quality when an image is re-encoded.
DEFAULT_JPEG_QUALITY = 95


def sample_record(row: dict) -> dict:
    """The ``json`` part of one sample (lineage, common name, every text type)."""
    lineage = {r: row.get(r, "") for r in RANKS}
    covariates = {k: v for k, v in row.items() if k not in RANKS and k not in ("path", "common_name")}
    return {
        "lineage": lineage,
        "common_name": row.get("common_name", ""),
        "texts": all_captions({**lineage, "common_name": row.get("common_name", "")}),
        "source_path": row.get("path", ""),
        "covariates": plain(covariates),
    }


def _jpeg_bytes(path: str, max_size: int | None, quality: int) -> bytes:
    with Image.open(path) as im:
        if im.format == "JPEG" and not max_size and im.mode in ("RGB", "L"):
            return Path(path).read_bytes()
        im = im.convert("RGB")
        if max_size and min(im.size) > max_size:
            s = max_size / min(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _sample(row: dict, *, max_size: int | None, quality: int) -> tuple[dict | None, bytes | None, str]:
    """(json record, JPEG bytes, '') of one row, or (None, None, why it is skipped)."""
    rec = sample_record(row)
    if not rec["texts"]["taxonomic"]:
        return None, None, "no taxonomy for a caption"
    reason = unreadable_reason(row.get("path", ""))
    if reason:
        return None, None, reason
    try:
        return rec, _jpeg_bytes(row["path"], max_size, quality), ""
    except Exception as e:  # noqa: BLE001 - skip what cannot be decoded
        return None, None, f"unreadable image: {type(e).__name__}: {e}"


def make_shards(data: str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, data_type: str = "auto",
                max_size: int | None = None, quality: int = DEFAULT_JPEG_QUALITY, shuffle_seed: int | None = 0,
                prefix: str = "shard") -> dict:
    """Write ``out/<prefix>-NNNNNN.tar`` with ``shard_size`` samples each; returns the manifest.

    ``max_size``: downscale so the shorter side is at most this many pixels. ``shuffle_seed``
    shuffles the row order before writing (None keeps CSV order), so shards mix taxa and
    shard-level shuffling during training is enough.
    """
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(data, data_type)
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    skipped, n = [], 0
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=int(shard_size), verbose=0) as sink:
        for i in order:
            row = items.iloc[i].to_dict()
            rec, jpg, reason = _sample(row, max_size=max_size, quality=quality)
            if reason:
                skipped.append({"item": row.get("path", i), "reason": reason})
                continue
            sink.write({"__key__": f"{n:09d}", "jpg": jpg, "json": json.dumps(rec).encode("utf-8")})
            n += 1
    shards = sorted(p.name for p in out.glob(f"{prefix}-*.tar"))
    # ShardWriter opens the next shard eagerly: drop a trailing empty one
    n_shards = math.ceil(n / int(shard_size))
    if n and len(shards) > n_shards:
        for name in shards[n_shards:]:
            (out / name).unlink()
        shards = shards[:n_shards]
    manifest = {"num_samples": n, "shards": shards, "shard_size": int(shard_size),
                "text_types": list(TEXT_TYPES), "source": str(data), "n_skipped": len(skipped)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    pd.DataFrame(skipped, columns=["item", "reason"]).to_csv(out / "skipped.csv", index=False)
    return manifest
