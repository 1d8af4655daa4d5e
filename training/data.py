"""Training data: metadata CSV / iNat21 folders (map-style) and webdataset shards.

Both sources yield batches ``(images, texts)``: ``images`` is a float tensor
(B, 3, H, W) from open_clip's train transform, ``texts`` a dict mapping each text type the
run can draw (``text_types``; default every fixed type of :data:`treeprobe.training.text.TEXT_TYPES`)
to the batch's captions: token ids (B, context_length) when a ``tokenize`` callable is
given — the engine passes open_clip's tokenizer, so tokenization runs in the loader
workers, off the training step, as in open_clip's trainer — else lists of B strings. The
engine picks the text type for the step.

Determinism: the random augmentation of a sample is a pure function of
``(seed, epoch, sample id)`` (the transform runs under a forked, re-seeded RNG), and the
sampler's order is a function of ``(seed, epoch)``. So a run, or a resume that skips the
batches already done in an epoch, sees exactly the same pixels in the same order —
for CSV/iNat data whatever the number of loader workers; for shards, whose order also
depends on how shards are split over ranks and workers, with the same ``--workers`` and
world size.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.training.text import TEXT_TYPES, all_captions, clean

log = logging.getLogger(__package__)

#: Samples held by the shuffle buffer of a shard stream.
SHUFFLE_BUFFER = 1000
#: webdataset's minimum fill of the shuffle buffer before it yields (at most the buffer size).
SHUFFLE_INITIAL = 100
#: Keys of a shard sample that hold its image.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SEED_MASK = 0x7FFFFFFF  # non-negative 31-bit seeds

__all__ = [
    "SHUFFLE_BUFFER",
    "load_items",
    "detect_data_type",
    "encode_texts",
    "caption_table",
    "unreadable_reason",
    "verify_images",
    "sample_seed",
    "seeded_transform",
    "CaptionedImages",
    "SkipSampler",
    "SyntheticImages",
    "TrainData",
    "build_map_data",
    "list_shards",
    "shard_manifest_count",
    "ShardData",
]


# ----------------------------------------------------------------------------- items
def load_items(path: str | Path, data_type: str = "auto") -> pd.DataFrame:
    """Items (one row per image: absolute ``path``, the 7 ranks, ``common_name``, covariates).

    Read by treeprobe's loaders (:func:`treeprobe.data.load_metadata_csv`,
    :func:`treeprobe.data.load_inat_folder`), so training reads exactly what treeprobe analyses.
    """
    from treeprobe.data import load_inat_folder, load_metadata_csv

    path = Path(path)
    if data_type == "auto":
        data_type = detect_data_type(path)
    if data_type not in ("csv", "inat"):
        raise TreeprobeError(f"load_items reads csv/inat data, not {data_type!r}")
    if not path.exists():
        raise TreeprobeError(f"training data not found: {path}")
    loader = load_metadata_csv if data_type == "csv" else load_inat_folder
    items = loader(str(path)).items.copy()
    if "common_name" not in items.columns:
        items["common_name"] = ""
    for r in RANKS + ("common_name",):
        items[r] = items[r].map(clean)
    return items.reset_index(drop=True)


def detect_data_type(path: str | Path) -> str:
    """``csv`` (a file), ``wds`` (tar shards: a .tar, a brace pattern or a folder of
    .tar files), ``inat`` (a folder of ``NNNNN_Kingdom_..._epithet`` class folders) or
    ``synthetic`` (the literal ``synthetic``: blank images, for throughput benchmarks)."""
    s = str(path)
    if s == "synthetic":
        return "synthetic"
    if "{" in s or s.endswith(".tar") or "::" in s:
        return "wds"
    p = Path(s)
    if p.is_file():
        return "csv"
    if p.is_dir():
        if any(p.glob("*.tar")):
            return "wds"
        return "inat"
    raise TreeprobeError(f"training data not found: {path}")


def encode_texts(captions: dict[str, list[str]], text_types=TEXT_TYPES, tokenize: Callable | None = None) -> dict:
    """``{text type: captions}`` for ``text_types``: ``tokenize(captions)`` (token ids,
    (B, context_length)) when ``tokenize`` is given, else the caption strings."""
    return {t: tokenize(captions[t]) if tokenize is not None else captions[t] for t in text_types}


def caption_table(items: pd.DataFrame) -> dict[str, list[str]]:
    """Text type → caption per row (see :mod:`treeprobe.training.text`)."""
    records = items[list(RANKS) + ["common_name"]].to_dict("records")
    caps = [all_captions(r) for r in records]
    return {t: [c[t] for c in caps] for t in TEXT_TYPES}


def unreadable_reason(path: str) -> str:
    """'' if PIL can open and verify the image at ``path``, else why not (one line)."""
    if not path:
        return "no image path"
    try:
        with Image.open(path) as im:
            im.verify()
        return ""
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # noqa: BLE001 - any decoder failure means: skip it
        return f"unreadable image: {type(e).__name__}: {e}"


def verify_images(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split items into (readable, skipped) — skipped has ``item``, ``reason``.

    Rows without any caption (no rank known) are skipped too.
    """
    caps = caption_table(items)["taxonomic"]
    reasons = []
    for p, c in zip(items["path"], caps):
        reasons.append("no taxonomy for a caption" if not c else unreadable_reason(p))
    reasons = pd.Series(reasons, index=items.index)
    ok = reasons == ""
    skipped = pd.DataFrame({"item": items.loc[~ok, "path"].values, "reason": reasons[~ok].values})
    return items.loc[ok].reset_index(drop=True), skipped


def sample_seed(seed: int, epoch: int, key) -> int:
    """Seed for the augmentation of one sample: a function of (seed, epoch, key)."""
    return zlib.crc32(f"{seed}:{epoch}:{key}".encode()) & _SEED_MASK


def seeded_transform(transform: Callable, img, seed: int):
    """Apply ``transform`` with torch (CPU) + python RNGs temporarily seeded by ``seed``.

    Only the CPU generator is seeded (the transforms draw from it): ``torch.manual_seed``
    would also seed every accelerator's generators, 60x slower per sample."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(img)
        finally:
            random.setstate(py_state)


# ----------------------------------------------------------------------------- map-style
class CaptionedImages(Dataset):
    """Map-style dataset over an items frame: ``ds[i]`` → (image tensor (3, H, W), i).
    ``collate`` makes a batch's texts (see :func:`encode_texts`) for ``text_types`` with
    ``tokenize``."""

    text_types: tuple = TEXT_TYPES
    tokenize: Callable | None = None

    def __init__(self, items: pd.DataFrame, transform: Callable, seed: int = 0):
        self.items = items.reset_index(drop=True)
        self.paths = list(self.items["path"])
        self.captions = caption_table(self.items)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int):
        n = len(self.paths)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                with Image.open(self.paths[j]) as im:
                    img = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - skip undecodable images
                log.warning("skipping unreadable image %s (%s)", self.paths[j], e)
                continue
            return seeded_transform(self.transform, img, sample_seed(self.seed, self.epoch, j)), j
        raise TreeprobeError("no readable image in the dataset")

    def collate(self, batch):
        """list of (image, index) → (images (B,3,H,W), {text type: token ids (B, L) or [B captions]})."""
        images = torch.stack([b[0] for b in batch])
        idx = [b[1] for b in batch]
        caps = {t: [self.captions[t][i] for i in idx] for t in self.text_types}
        return images, encode_texts(caps, self.text_types, self.tokenize)


class SkipSampler(DistributedSampler):
    """:class:`DistributedSampler` (seeded, ``drop_last``) that can skip the first
    ``skip`` indices of an epoch — used to resume mid-epoch exactly."""

    skip = 0

    def __iter__(self):
        it = super().__iter__()
        return iter(list(it)[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class SyntheticImages(CaptionedImages):
    """Like open_clip's ``--dataset-type synthetic``: one blank image (``image_size``),
    passed through the train transform per sample, and one fixed lineage's captions.
    For throughput benchmarks only."""

    LINEAGE = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Passeriformes",
               "family": "Corvidae", "genus": "Pica", "species": "Pica pica", "common_name": "Eurasian magpie"}

    def __init__(self, num_samples: int, transform: Callable, image_size, *, seed: int = 0):
        items = pd.DataFrame([{"path": "", **self.LINEAGE}] * int(num_samples))
        super().__init__(items, transform, seed=seed)
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size), int(image_size))
        self.image = Image.new("RGB", size)

    def __getitem__(self, i: int):
        return seeded_transform(self.transform, self.image, sample_seed(self.seed, self.epoch, i)), i


@dataclass
class TrainData:
    """What the engine iterates: ``batches(epoch, skip_batches)`` → iterator of batches."""

    steps_per_epoch: int
    num_samples: int
    batches: Callable[[int, int], Iterator]
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    kind: str = "csv"


def build_map_data(items: pd.DataFrame | None, transform: Callable, batch_size: int, *, seed: int,
                   rank: int = 0, world_size: int = 1, workers: int = 0,
                   verify: bool = True, kind: str = "csv", dataset: CaptionedImages | None = None,
                   tokenize: Callable | None = None, text_types=TEXT_TYPES) -> TrainData:
    """TrainData for a CSV/iNat items frame (or a ready ``dataset``): per-rank
    DistributedSampler, drop_last batches; texts for ``text_types``, tokenized by ``tokenize``."""
    skipped = pd.DataFrame(columns=["item", "reason"])
    if dataset is not None:
        ds = dataset
    else:
        if verify:
            items, skipped = verify_images(items)
        ds = CaptionedImages(items, transform, seed=seed)
    ds.tokenize, ds.text_types = tokenize, tuple(text_types)
    if len(ds) < batch_size * world_size:
        raise TreeprobeError(f"{len(ds)} usable images < batch size {batch_size} x {world_size} rank(s)")
    sampler = SkipSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    steps = sampler.num_samples // batch_size

    def batches(epoch: int, skip_batches: int = 0):
        sampler.set_epoch(epoch)
        sampler.skip = skip_batches * batch_size
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=ds.collate, drop_last=True,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        return iter(loader)

    return TrainData(steps_per_epoch=steps, num_samples=len(ds), batches=batches, skipped=skipped, kind=kind)


# ----------------------------------------------------------------------------- shards
def list_shards(spec: str) -> list[str]:
    """Shard URLs from a folder (``*.tar``, sorted), a single .tar or a brace pattern
    (``shards/shard-{000000..000009}.tar``; several specs joined with ``::``)."""
    import webdataset as wds
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(x) for x in p.glob("*.tar"))
    else:
        urls = list(wds.shardlists.expand_urls(spec))
    if not urls:
        raise TreeprobeError(f"no .tar shards found for {spec!r}")
    return urls


def shard_manifest_count(spec: str) -> int | None:
    """Sample count from ``manifest.json`` (written by ``make-shards``) next to the shards."""
    p = Path(spec)
    folder = p if p.is_dir() else Path(list_shards(spec)[0]).parent
    m = folder / "manifest.json"
    if m.is_file():
        try:
            return int(json.loads(m.read_text())["num_samples"])
        except (ValueError, KeyError):
            return None
    return None


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ShardData:
    """Webdataset pipeline over tar shards written by ``treeprobe make-shards``.

    Per epoch the shard list is shuffled with ``(seed, epoch)`` and split across ranks
    (``shards[rank::world]``) and then loader workers; samples pass a shuffle buffer
    seeded by ``(seed, epoch, rank, worker)``. Each rank yields exactly
    ``steps_per_epoch = num_samples // (batch_size * world)`` full batches, cycling its
    shards if they run dry, so all ranks step together under DDP. Unreadable samples are
    skipped (``warn_and_continue``). Resume mid-epoch replays the epoch's deterministic
    stream and drops the batches already done (costs their I/O, not their compute).
    """

    def __init__(self, spec: str, transform: Callable, batch_size: int, *, seed: int,
                 num_samples: int | None = None, rank: int = 0, world_size: int = 1,
                 workers: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER, tokenize: Callable | None = None,
                 text_types=TEXT_TYPES):
        self.urls = list_shards(spec)
        self.tokenize, self.text_types = tokenize, tuple(text_types)
        n = num_samples or shard_manifest_count(spec)
        if not n:
            raise TreeprobeError("shards need --train-num-samples (no manifest.json next to them)")
        self.num_samples = int(n)
        self.transform, self.batch_size, self.seed = transform, batch_size, int(seed)
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.shuffle_buffer = shuffle_buffer
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise TreeprobeError(f"{self.num_samples} samples < batch size {batch_size} x {world_size} rank(s)")
        if len(self.urls) < world_size:
            log.warning("%d shards for %d ranks: some ranks re-read shards", len(self.urls), world_size)

    def _rank_urls(self, epoch: int, rnd: int) -> list[str]:
        urls = list(self.urls)
        random.Random(f"{self.seed}:{epoch}:{rnd}").shuffle(urls)
        mine = urls[self.rank::self.world_size]
        return mine or [urls[self.rank % len(urls)]]

    def _pipeline(self, epoch: int, rnd: int):
        import webdataset as wds
        seed, rank = self.seed, self.rank

        def shuffle(src):
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            rng = random.Random(f"{seed}:{epoch}:{rnd}:{rank}:{wid}")
            return wds.filters._shuffle(src, self.shuffle_buffer, min(SHUFFLE_INITIAL, self.shuffle_buffer), rng)

        def to_sample(s):
            img_key = next((k for k in IMAGE_KEYS if k in s), None)
            if img_key is None or "json" not in s:
                raise ValueError(f"sample {s.get('__key__')} lacks an image or json")
            meta = json.loads(s["json"])
            img = _decode_image(s[img_key])
            x = seeded_transform(self.transform, img, sample_seed(seed, epoch, s["__key__"]))
            texts = meta["texts"]
            return x, {t: texts[t] for t in self.text_types}

        def collate(samples):
            images = torch.stack([s[0] for s in samples])
            caps = {t: [s[1][t] for s in samples] for t in self.text_types}
            return images, encode_texts(caps, self.text_types, self.tokenize)

        return wds.DataPipeline(
            wds.SimpleShardList(self._rank_urls(epoch, rnd)),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            shuffle,
            wds.map(to_sample, handler=wds.warn_and_continue),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        )

    def batches(self, epoch: int, skip_batches: int = 0) -> Iterator:
        """This rank's ``steps_per_epoch`` batches of ``epoch``, the first ``skip_batches`` dropped."""
        def stream():
            rnd = 0
            while True:
                n = 0
                loader = DataLoader(self._pipeline(epoch, rnd), batch_size=None, num_workers=self.workers)
                for b in loader:
                    n += 1
                    yield b
                if n == 0:
                    raise TreeprobeError("the shards yielded no full batch (too few readable samples?)")
                rnd += 1

        it = stream()
        for i, b in enumerate(it):
            if i >= self.steps_per_epoch:
                return
            if i >= skip_batches:
                yield b

    def train_data(self) -> TrainData:
        """This pipeline as the engine's :class:`TrainData`."""
        return TrainData(steps_per_epoch=self.steps_per_epoch, num_samples=self.num_samples,
                         batches=self.batches, kind="wds")
