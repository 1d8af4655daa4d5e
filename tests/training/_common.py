"""Shared by the training tests: where the real photos are, a small training command line,
and checkpoint comparisons."""

from __future__ import annotations

import torch

from tests._paths import REPO, SHARED_DATA

PHOTOS_CSV = SHARED_DATA / "multikingdom_photos_index" / "metadata.csv"
__all__ = ["REPO", "SHARED_DATA", "PHOTOS_CSV", "train_args", "weights", "same"]


def train_args(out, *extra, limit=16, batch=8, epochs=1) -> list[str]:
    """``treeprobe train`` options for a tiny CPU run on the first ``limit`` real photos."""
    return ["--data", str(PHOTOS_CSV), "--limit", str(limit), "--batch-size", str(batch), "--epochs", str(epochs),
            "--model", "tiny", "--out", str(out), "--no-progress", "-q", "--warmup", "1", *extra]


def weights(path) -> dict:
    """The ``state_dict`` of a checkpoint file."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same(a: dict, b: dict) -> bool:
    """Whether two state dicts have the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
