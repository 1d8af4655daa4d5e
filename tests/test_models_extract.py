"""treeprobe.models (checkpoint formats, errors, hub offline) and treeprobe.extract (real photos, cache)."""

from tests._paths import SHARED_DATA
import json
import os
import time

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from treeprobe.errors import TreeprobeError
from treeprobe.extract import ExtractionResult, extract_embeddings
from treeprobe.models import LoadedModel, load_model, sha256_file

MULTIKINGDOM_CSV = str(SHARED_DATA / "multikingdom_photos_index" / "metadata.csv")
needs_photos = pytest.mark.skipif(not os.path.exists(MULTIKINGDOM_CSV), reason="shared photos missing")
TINY_NAME = "treeprobe-tiny-test"


@pytest.fixture(scope="module")
def tiny_registered(tmp_path_factory, tiny_clip_cfg):
    """Register the tiny config with open_clip under TINY_NAME (for name-only checkpoints)."""
    d = tmp_path_factory.mktemp("cfg")
    (d / f"{TINY_NAME}.json").write_text(json.dumps(tiny_clip_cfg))
    open_clip.add_model_config(d / f"{TINY_NAME}.json")
    return TINY_NAME


@pytest.fixture(scope="module")
def photos():
    """20 real photos spread over the four source sets (absolute paths)."""
    df = pd.read_csv(MULTIKINGDOM_CSV)
    rows = df.iloc[np.linspace(0, len(df) - 1, 20).astype(int)]
    paths = [os.path.normpath(os.path.join(os.path.dirname(MULTIKINGDOM_CSV), p)) for p in rows["path"]]
    assert rows["source_dataset"].nunique() == 4
    return paths


def _pixels(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def _embed(lm: LoadedModel, x):
    with torch.inference_mode():
        return lm.model.encode_image(x)


# ----------------------------------------------------------------------------- models


def test_checkpoint_formats_round_trip(tmp_path, tiny_clip_checkpoint, tiny_clip_cfg, tiny_registered):
    path, sd = tiny_clip_checkpoint
    x = _pixels()
    ref = open_clip.CLIP(**tiny_clip_cfg).eval()
    ref.load_state_dict(sd)
    with torch.inference_mode():
        expected = ref.encode_image(x)

    files = {}
    files["trainer_module_prefix"] = (path, None)
    torch.save({"state_dict": sd, "model_cfg": tiny_clip_cfg}, tmp_path / "plain.pt")
    files["dict_with_cfg"] = (tmp_path / "plain.pt", None)
    torch.save({"epoch": 3, "state_dict": sd, "model_name": TINY_NAME}, tmp_path / "named.pt")
    files["dict_with_name"] = (tmp_path / "named.pt", None)
    torch.save(sd, tmp_path / "bare.bin")
    files["bare_state_dict"] = (tmp_path / "bare.bin", TINY_NAME)
    torch.save({"state_dict": sd, "model_cfg": tiny_clip_cfg}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    files["legacy_torch_format"] = (tmp_path / "legacy.pt", None)
    save_file(sd, tmp_path / "w.safetensors", metadata={"model_cfg": json.dumps(tiny_clip_cfg)})
    files["safetensors_with_cfg"] = (tmp_path / "w.safetensors", None)
    save_file({f"module.{k}": v for k, v in sd.items()}, tmp_path / "bare.safetensors")
    files["safetensors_bare_module_prefix"] = (tmp_path / "bare.safetensors", TINY_NAME)

    for label, (f, arch) in files.items():
        lm = load_model(ckpt=f, model=arch)
        assert lm.embed_dim == 32, label
        assert lm.digest == sha256_file(str(f)), label
        assert lm.source == os.path.abspath(f), label
        assert not lm.model.training, label
        torch.testing.assert_close(_embed(lm, x), expected, rtol=0, atol=0, msg=label)
    # pretrained=<file> is the same as ckpt=<file>
    lm = load_model(model=TINY_NAME, pretrained=str(tmp_path / "bare.bin"))
    torch.testing.assert_close(_embed(lm, x), expected, rtol=0, atol=0)
    # the trainer checkpoint names its architecture
    assert load_model(ckpt=path).model_name == "tiny-test-clip"


def test_preprocess_follows_config(tiny_clip_checkpoint):
    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    img = Image.new("RGB", (90, 60), (255, 0, 0))
    t = lm.preprocess(img)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    # red channel normalised with open_clip's default (OpenAI) mean/std
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    assert t[0].mean().item() == pytest.approx((1 - mean[0]) / std[0], abs=1e-4)
    assert t[1].mean().item() == pytest.approx((0 - mean[1]) / std[1], abs=1e-4)


def test_no_architecture_error(tmp_path, tiny_clip_checkpoint):
    torch.save(tiny_clip_checkpoint[1], tmp_path / "bare.pt")
    with pytest.raises(TreeprobeError, match=r"has no architecture; pass --model NAME, e.g. ViT-B-16"):
        load_model(ckpt=tmp_path / "bare.pt")


def test_mismatch_error_counts(tmp_path, tiny_clip_checkpoint, tiny_clip_cfg):
    sd = dict(tiny_clip_checkpoint[1])
    for k in ("visual.proj", "logit_scale"):
        sd.pop(k)
    sd["head.extra"] = torch.zeros(2)
    torch.save({"state_dict": sd, "model_cfg": tiny_clip_cfg}, tmp_path / "bad.pt")
    with pytest.raises(TreeprobeError) as ei:
        load_model(ckpt=tmp_path / "bad.pt")
    msg = str(ei.value)
    assert "2 missing keys" in msg and "visual.proj" in msg and "logit_scale" in msg
    assert "1 unexpected keys (head.extra)" in msg and "\n" not in msg

    wide = dict(tiny_clip_cfg, embed_dim=16)
    torch.save({"state_dict": tiny_clip_checkpoint[1], "model_cfg": wide}, tmp_path / "shape.pt")
    with pytest.raises(TreeprobeError, match=r"2 with the wrong shape .*checkpoint \(32, 32\) vs model \(32, 16\)"):
        load_model(ckpt=tmp_path / "shape.pt")


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(TreeprobeError, match="no such checkpoint file"):
        load_model(ckpt=tmp_path / "missing.pt", model="ViT-B-16")
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(TreeprobeError, match="cannot read checkpoint"):
        load_model(ckpt=tmp_path / "junk.pt", model="ViT-B-16")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(TreeprobeError, match="cannot read safetensors"):
        load_model(ckpt=tmp_path / "junk.safetensors", model="ViT-B-16")


def test_unknown_architecture_lists_names():
    with pytest.raises(TreeprobeError, match=r"unknown open_clip architecture 'ViT-B-61'; valid names include .*ViT-B-16"):
        load_model(model="ViT-B-61")
    with pytest.raises(TreeprobeError, match="no model given"):
        load_model()
    with pytest.raises(TreeprobeError, match="unknown precision"):
        load_model(model="ViT-B-16", precision="fp8")


@pytest.mark.parametrize("kwargs", [
    {"ckpt": "hf-hub:imageomics/bioclip"},
    {"model": "hf-hub:imageomics/bioclip-2"},
    {"model": "ViT-B-32", "pretrained": "openai"},
])
def test_hub_offline_is_one_clear_line(kwargs):
    t0 = time.perf_counter()
    with pytest.raises(TreeprobeError) as ei:
        load_model(**kwargs)
    assert time.perf_counter() - t0 < 10
    msg = str(ei.value)
    assert "\n" not in msg and "Hugging Face hub" in msg
    assert "--ckpt path/to/checkpoint.pt --model ARCH" in msg


def test_hub_without_offline_env_fails_fast(monkeypatch):
    """No HF_HUB_OFFLINE and no network: the reachability probe avoids huggingface_hub's retries."""
    import huggingface_hub.constants as hfc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(TreeprobeError, match="Hugging Face hub"):
        load_model(ckpt="hf-hub:treeprobe-test/does-not-exist")
    assert time.perf_counter() - t0 < 15
    assert hfc.HF_HUB_OFFLINE is False  # restored


def test_random_init_is_seeded(tiny_registered):
    a = load_model(model=tiny_registered)
    b = load_model(model=tiny_registered)
    assert a.source == "random-init" and a.digest == f"random-init-{tiny_registered}"
    x = _pixels(2)
    torch.testing.assert_close(_embed(a, x), _embed(b, x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- extraction


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
