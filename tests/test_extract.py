"""treeprobe.extract: real photos with failures, the cache, checkpoint formats, workers."""

from tests._paths import SHARED_DATA
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from treeprobe.errors import TreeprobeError
from treeprobe.extract import ExtractionResult, extract_embeddings
from treeprobe.models import LoadedModel, load_model

MULTIKINGDOM_CSV = str(SHARED_DATA / "multikingdom_photos_index" / "metadata.csv")
needs_photos = pytest.mark.skipif(not os.path.exists(MULTIKINGDOM_CSV), reason="shared photos missing")


@pytest.fixture(scope="module")
def photos():
    """20 real photos spread over the four source sets (absolute paths)."""
    df = pd.read_csv(MULTIKINGDOM_CSV)
    rows = df.iloc[np.linspace(0, len(df) - 1, 20).astype(int)]
    paths = [os.path.normpath(os.path.join(os.path.dirname(MULTIKINGDOM_CSV), p)) for p in rows["path"]]
    assert rows["source_dataset"].nunique() == 4
    return paths


def _embed(lm: LoadedModel, x):
    with torch.inference_mode():
        return lm.model.encode_image(x)


@needs_photos
def test_extract_real_photos_with_failures_and_cache(tmp_path, photos, tiny_clip_checkpoint):
    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    missing = str(tmp_path / "missing.jpg")
    paths = photos[:7] + [str(corrupt)] + photos[7:15] + [missing] + photos[15:]
    cache = tmp_path / "cache"

    res = extract_embeddings(lm, paths, batch_size=6, cache_dir=cache, progress=False)
    assert isinstance(res, ExtractionResult) and not res.cache_hit
    assert res.embeddings.shape == (20, 32) and res.embeddings.dtype == np.float32
    assert res.ok.tolist() == [p not in (str(corrupt), missing) for p in paths]
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, atol=1e-5)
    reasons = dict(zip(res.failures["item"], res.failures["reason"]))
    assert set(reasons) == {str(corrupt), missing}
    assert reasons[str(corrupt)].startswith("cannot decode image: ")
    assert reasons[missing] == "missing file"
    assert len(os.listdir(cache)) == 1 and os.listdir(cache)[0].endswith(".npz")

    # rows follow input order: row 8 (the 9th ok path) is photos[8], embedded by hand
    with Image.open(photos[8]) as im:
        x = lm.preprocess(im.convert("RGB"))[None]
    direct = torch.nn.functional.normalize(_embed(lm, x), dim=-1).numpy()[0]
    np.testing.assert_allclose(res.embeddings[8], direct, atol=1e-5)
    # distinct photos give distinct embeddings
    assert np.unique(res.embeddings.round(5), axis=0).shape[0] == 20

    # second call: read from the cache, model never runs
    def boom(*a, **k):
        raise AssertionError("model ran despite cache")

    lm.model.encode_image = boom
    again = extract_embeddings(lm, paths, batch_size=64, cache_dir=cache, progress=False)
    assert again.cache_hit
    np.testing.assert_array_equal(again.embeddings, res.embeddings)
    np.testing.assert_array_equal(again.ok, res.ok)
    pd.testing.assert_frame_equal(again.failures, res.failures)

    # a changed input file changes the key: no hit
    del lm.model.encode_image
    os.utime(corrupt, ns=(1, 1))
    third = extract_embeddings(lm, paths[:9], cache_dir=cache, progress=False)
    assert not third.cache_hit and third.ok.sum() == 8
    np.testing.assert_allclose(third.embeddings, res.embeddings[:8], atol=1e-5)  # batch-size invariant


@needs_photos
def test_extract_same_embeddings_from_every_format(tmp_path, photos, tiny_clip_checkpoint, tiny_clip_cfg):
    path, sd = tiny_clip_checkpoint
    save_file(sd, tmp_path / "w.safetensors", metadata={"model_cfg": json.dumps(tiny_clip_cfg)})
    a = extract_embeddings(load_model(ckpt=path), photos[:4], progress=False)
    b = extract_embeddings(load_model(ckpt=tmp_path / "w.safetensors"), photos[:4], progress=False)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_extract_all_failures_errors(tmp_path, tiny_clip_checkpoint):
    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(TreeprobeError, match=r"no readable images among 2 paths"):
        extract_embeddings(lm, [str(tmp_path / "bad.png"), str(tmp_path / "gone.jpg")], progress=False)
    with pytest.raises(TreeprobeError, match="no images to embed"):
        extract_embeddings(lm, [], progress=False)


def test_extract_with_workers_and_inat_folder(tmp_path, tiny_clip_checkpoint):
    """Images listed by load_inat_folder, decoded in a worker process."""
    from treeprobe.data import load_inat_folder

    d = tmp_path / "00007_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax"
    d.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), color).save(d / f"{i}.png")
    (d / "3.jpg").write_bytes(b"\xff\xd8 broken")
    ds = load_inat_folder(tmp_path)
    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    res = extract_embeddings(lm, ds.items["path"].tolist(), batch_size=2, num_workers=1, progress=False)
    assert res.ok.tolist() == [True, True, True, False]
    assert res.embeddings.shape == (3, 32)
    single = extract_embeddings(lm, ds.items["path"].tolist()[:3], batch_size=1, progress=False)
    np.testing.assert_allclose(res.embeddings, single.embeddings, atol=1e-5)
