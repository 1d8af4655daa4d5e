"""make-shards round trip and training from webdataset shards (training/shards.py, data.py)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from treeprobe.training.cli import main
from treeprobe.training.text import TEXT_TYPES, all_captions

from tests.training._common import PHOTOS_CSV, REPO

pytestmark = pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")


@pytest.fixture()
def small_csv(tmp_path):
    """11 real photos from three kingdoms (absolute paths) + one missing and one corrupt image."""
    df = pd.read_csv(PHOTOS_CSV, dtype=str)
    df = pd.concat([df.iloc[:4], df.iloc[280:284], df.iloc[700:703]])
    df["path"] = [str((PHOTOS_CSV.parent / p).resolve()) for p in df["path"]]
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    extra = df.iloc[:2].copy()
    extra["path"] = [str(tmp_path / "missing.jpg"), str(bad)]
    df = pd.concat([df, extra], ignore_index=True)
    path = tmp_path / "small.csv"
    df.to_csv(path, index=False)
    return path, df.iloc[:11]


def test_make_shards_round_trip(tmp_path, small_csv):
    csv, good = small_csv
    out = tmp_path / "shards"
    assert main(["make-shards", "--data", str(csv), "--out", str(out), "--shard-size", "4", "--max-size", "64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 11 and manifest["n_skipped"] == 2
    assert manifest["shards"] == [f"shard-00000{i}.tar" for i in range(3)]
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 2 and skipped["reason"].str.contains("not found|unreadable").all()

    import webdataset as wds

    samples = list(wds.WebDataset([str(out / s) for s in manifest["shards"]], shardshuffle=False)
                   .decode("pil").to_tuple("jpg", "json"))
    assert len(samples) == 11
    by_path = {r["path"]: r for r in good.to_dict("records")}
    for img, meta in samples:
        assert min(img.size) <= 64
        row = by_path[meta["source_path"]]
        assert set(meta["texts"]) == set(TEXT_TYPES)
        assert meta["texts"] == all_captions(row)
        assert meta["lineage"]["species"] == row["species"]
        assert meta["covariates"]["source_dataset"] == row["source_dataset"]


def test_train_from_shards_and_resume(tmp_path, small_csv):
    csv, _ = small_csv
    out = tmp_path / "shards"
    assert main(["make-shards", "--data", str(csv), "--out", str(out), "--shard-size", "3"]) == 0
    args = ["--data", str(out), "--batch-size", "2", "--epochs", "2", "--no-progress", "-q", "--warmup", "1",
            "--text-type", "mixed"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0  # 5 steps per epoch from the manifest count
    ck_a = torch.load(tmp_path / "a" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert ck_a["step"] == 10
    assert main(args + ["--out", str(tmp_path / "b"), "--max-steps", "3"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--resume", "latest"]) == 0
    ck_b = torch.load(tmp_path / "b" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert all(torch.equal(ck_a["state_dict"][k], ck_b["state_dict"][k]) for k in ck_a["state_dict"])
