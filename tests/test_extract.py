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


# ----------------------------------------------------------------------------- cache key


def _bmp_listing(d, n=4, seed=0):
    """n BMP files (fixed size for fixed dimensions, so content can change at the same size)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(d / f"{i}.bmp")
        paths.append(str(d / f"{i}.bmp"))
    return paths


def _rewrite_keeping_size_and_mtime(path):
    """New pixels, the same size and mtime (as `cp -p` or a restore from an archive would leave)."""
    import time

    before = os.stat(path)
    for attempt in range(200):  # until the file system's ctime clock has moved on
        Image.fromarray(np.full((12, 10, 3), attempt % 256, np.uint8)).save(path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        if after.st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def _with_transform(lm, **kw):
    from dataclasses import replace

    from open_clip.transform import image_transform

    return replace(lm, preprocess=image_transform(kw.pop("image_size", 32), is_train=False, **kw))


def _tweaked_checkpoint(tmp_path, tiny_clip_checkpoint):
    sd = {k: v.clone() for k, v in tiny_clip_checkpoint[1].items()}
    sd["visual.proj"] += 0.01
    ckpt = torch.load(tiny_clip_checkpoint[0], weights_only=False)
    ckpt["state_dict"] = {f"module.{k}": v for k, v in sd.items()}
    torch.save(ckpt, tmp_path / "epoch_2.pt")
    return load_model(ckpt=str(tmp_path / "epoch_2.pt"))


def _copied_checkpoint(tmp_path, tiny_clip_checkpoint):
    import shutil

    shutil.copy(tiny_clip_checkpoint[0], tmp_path / "renamed.pt")
    return load_model(ckpt=str(tmp_path / "renamed.pt"))


def _renamed(paths, i=1):
    new = paths[i].replace(".bmp", "_moved.bmp")
    os.rename(paths[i], new)
    return paths[:i] + [new] + paths[i + 1:]


def _appended(paths):
    with open(paths[0], "ab") as f:  # a longer file (BMP readers ignore the tail); mtime put back
        st = os.stat(paths[0])
        f.write(b"\0" * 16)
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    return paths


def _touched(paths):
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return paths


def _added(paths, d):
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(d / "extra.bmp")
    return paths + [str(d / "extra.bmp")]


#: change → (what it does to (model, paths), whether the cache must still hit). Each miss fails when
#: the matching part of the key (digest, preprocess repr, path, size, mtime_ns, ctime_ns, order) is dropped.
KEY_CHANGES = {
    "nothing": (lambda lm, paths, d, ck: (lm, paths), True),
    "same_checkpoint_bytes_elsewhere": (lambda lm, paths, d, ck: (_copied_checkpoint(d, ck), paths), True),
    "checkpoint_weights": (lambda lm, paths, d, ck: (_tweaked_checkpoint(d, ck), paths), False),
    "mean_std": (lambda lm, paths, d, ck: (_with_transform(lm, mean=(0.5,) * 3, std=(0.5,) * 3), paths), False),
    "resize_mode": (lambda lm, paths, d, ck: (_with_transform(lm, resize_mode="squash"), paths), False),
    "interpolation": (lambda lm, paths, d, ck: (_with_transform(lm, interpolation="bilinear"), paths), False),
    "file_added": (lambda lm, paths, d, ck: (lm, _added(paths, d)), False),
    "file_removed": (lambda lm, paths, d, ck: (lm, paths[:-1]), False),
    "file_renamed": (lambda lm, paths, d, ck: (lm, _renamed(paths)), False),
    "files_reordered": (lambda lm, paths, d, ck: (lm, paths[::-1]), False),
    "size_changed_same_mtime": (lambda lm, paths, d, ck: (lm, _appended(paths)), False),
    "mtime_changed": (lambda lm, paths, d, ck: (lm, _touched(paths)), False),
    "content_changed_same_size_and_mtime": (
        lambda lm, paths, d, ck: (_rewrite_keeping_size_and_mtime(paths[3]), (lm, paths))[1], False),
}


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_cache_misses_when_model_transform_or_listing_changes(change, tmp_path, tiny_clip_checkpoint, monkeypatch):
    import treeprobe.extract as ex

    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    d = tmp_path / "images"
    d.mkdir()
    paths = _bmp_listing(d)
    cache = tmp_path / "cache"
    first = extract_embeddings(lm, paths, batch_size=2, cache_dir=cache, progress=False)
    assert not first.cache_hit
    make, hit = KEY_CHANGES[change]
    lm2, paths2 = make(lm, list(paths), tmp_path, tiny_clip_checkpoint)
    real, calls = ex.encode_batch, []
    monkeypatch.setattr(ex, "encode_batch", lambda *a: (calls.append(1), real(*a))[1])
    again = extract_embeddings(lm2, paths2, batch_size=2, cache_dir=cache, progress=False)
    assert again.cache_hit is hit and (calls == []) is hit
    if hit:
        np.testing.assert_array_equal(again.embeddings, first.embeddings)


def test_cache_key_covers_version_name_precision_and_autocast(tiny_clip_checkpoint, monkeypatch, tmp_path):
    """The parts that the extraction tests above do not change (each a different key); the input
    size too (the tiny model only runs at 32 px)."""
    from dataclasses import replace

    import treeprobe.extract as ex

    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    paths = _bmp_listing(tmp_path, n=2)
    base = ex.cache_key(lm, paths)
    assert ex.cache_key(lm, paths) == base  # deterministic
    variants = [ex.cache_key(replace(lm, model_name="other-arch"), paths),
                ex.cache_key(_with_transform(lm, image_size=64), paths),
                ex.cache_key(replace(lm, precision="fp16"), paths),
                ex.cache_key(lm, paths, "bf16"), ex.cache_key(lm, paths, "fp16")]
    monkeypatch.setattr(ex, "CACHE_VERSION", ex.CACHE_VERSION + 1)
    variants.append(ex.cache_key(lm, paths))
    assert len({base, *variants}) == 1 + len(variants)
    monkeypatch.undo()
    assert ex.cache_keys(lm, paths, [None, "bf16"]) == [base, variants[3]]  # one stat, several tags


def test_every_listing_field_enters_the_key(tiny_clip_checkpoint, monkeypatch):
    """With stat results faked, changing any one of path, size, mtime_ns, ctime_ns, the order or the
    existence of a file changes the key (on a real disk most changes move ctime too, which would
    hide a dropped field from the extraction tests above)."""
    from types import SimpleNamespace

    import treeprobe.extract as ex

    lm = load_model(ckpt=tiny_clip_checkpoint[0])
    files = {"a.jpg": [100, 5, 7], "b.jpg": [200, 6, 8], "c.jpg": [200, 6, 8]}

    def key(paths, **changed):
        def fake_stat(p, *a, **k):
            if p not in files:
                raise FileNotFoundError(p)
            size, mtime, ctime = changed.get(p, files[p])
            return SimpleNamespace(st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime)

        with monkeypatch.context() as m:
            m.setattr(ex.os, "stat", fake_stat)
            return ex.cache_key(lm, paths)

    ab = ["a.jpg", "b.jpg"]
    keys = [key(ab), key(["a.jpg", "c.jpg"]), key(ab[::-1]), key(ab + ["gone.jpg"]),
            key(ab, **{"a.jpg": [101, 5, 7]}), key(ab, **{"a.jpg": [100, 9, 7]}), key(ab, **{"a.jpg": [100, 5, 9]})]
    assert key(ab) == keys[0] and len(set(keys)) == len(keys)
