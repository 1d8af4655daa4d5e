"""Training data loading: iNat21 folders, unreadable images, seeded augmentation."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from treeprobe.training.data import build_map_data, load_items, seeded_transform
from treeprobe.models import create_model

from tests.training._common import PHOTOS_CSV, REPO

pytestmark = pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")


def _photos(n):
    df = pd.read_csv(PHOTOS_CSV, dtype=str, keep_default_na=False).iloc[:n]
    df["path"] = [str((PHOTOS_CSV.parent / p).resolve()) for p in df["path"]]
    return df


def test_inat_folder_items_and_captions(tmp_path):
    df = _photos(4)
    for i, r in enumerate(df.itertuples()):
        epithet = r.species.split(" ", 1)[1].replace(" ", "_")
        d = tmp_path / f"{i:05d}_{r.kingdom}_{r.phylum}_{getattr(r, '_4')}_{r.order}_{r.family}_{r.genus}_{epithet}"
        d.mkdir()
        shutil.copy(r.path, d / "a.jpg")
    items = load_items(tmp_path)
    assert len(items) == 4
    assert list(items["species"]) == list(df["species"])
    assert list(items["class"]) == list(df["class"])
    data = build_map_data(items, lambda im: torch.zeros(3, 4, 4), batch_size=2, seed=0)
    _, caps = next(data.batches(0, 0))
    assert caps["taxonomic"][0].startswith("a photo of Plantae Tracheophyta ")
    assert caps["common"] == caps["scientific"]  # iNat folders carry no common names


def test_unreadable_images_are_skipped(tmp_path):
    df = _photos(6)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    df.loc[1, "path"] = str(bad)
    df.loc[2, "path"] = str(tmp_path / "missing.jpg")
    csv = tmp_path / "m.csv"
    df.to_csv(csv, index=False)
    data = build_map_data(load_items(csv), lambda im: torch.zeros(3, 4, 4), batch_size=2, seed=0)
    assert data.num_samples == 4 and data.steps_per_epoch == 2
    assert sorted(data.skipped["item"]) == sorted([str(bad), str(tmp_path / "missing.jpg")])


def test_augmentation_is_a_function_of_seed_and_leaves_global_rng_alone():
    from PIL import Image

    pre_train = create_model("tiny").preprocess_train
    img = Image.open(_photos(1).path[0]).convert("RGB")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = seeded_transform(pre_train, img, 11)
    b = seeded_transform(pre_train, img, 11)
    c = seeded_transform(pre_train, img, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.get_rng_state())


def test_loader_workers_tokenize_the_text_types_of_the_run():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    items = load_items(PHOTOS_CSV).iloc[:8]
    plain = build_map_data(items, lambda im: torch.zeros(3, 4, 4), batch_size=4, seed=0)
    tokens = build_map_data(items, lambda im: torch.zeros(3, 4, 4), batch_size=4, seed=0, workers=2,
                            tokenize=tok, text_types=("scientific",))
    for (_, caps), (_, toks) in zip(plain.batches(1, 0), tokens.batches(1, 0)):
        assert set(toks) == {"scientific"}  # only the run's type is tokenized
        assert toks["scientific"].shape == (4, 77) and toks["scientific"].dtype == torch.long
        assert torch.equal(toks["scientific"], tok(caps["scientific"]))
