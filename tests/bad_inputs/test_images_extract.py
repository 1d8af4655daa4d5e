"""Bad-input catalogue of image extraction (treeprobe.extract): odd image files and unusable
cache folders. Each odd file is either embedded as its plain 8-bit RGB equivalent would be, or
a recorded failure with its reason; never a crash. Each unusable cache folder is a one-line
TreeprobeError naming the folder, raised before the model runs."""

from __future__ import annotations

import errno
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import treeprobe.extract as ex
from treeprobe.errors import TreeprobeError
from treeprobe.extract import cache_file_for, cache_key, extract_embeddings, partial_dir_for
from treeprobe.models import load_model

RNG = np.random.default_rng(7)
#: Smooth 30 x 40 RGB picture (JPEG round trips stay close to it).
_YY, _XX = np.mgrid[0:30, 0:40]
SMOOTH = np.stack([(_XX * 6) % 256, (_YY * 8) % 256, (_XX * 3 + _YY * 4) % 256], -1).astype(np.uint8)
NOISE = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (30, 40), dtype=np.uint8)


@pytest.fixture(scope="module")
def lm(tiny_clip_checkpoint):
    return load_model(ckpt=tiny_clip_checkpoint[0])


@pytest.fixture
def good(tmp_path):
    """A plain RGB PNG that always decodes (so a run never has zero readable images)."""
    path = tmp_path / "good.png"
    Image.fromarray(NOISE[::-1]).save(path)
    return str(path)


def _exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# ------------------------------------------------------------------ odd files that must be embedded
# Each maker writes the odd file and a plain 8-bit RGB/L reference of what it shows; returns
# (odd path, reference path, max |difference| allowed in the preprocessed tensor).


def _gray16_png(d):
    Image.fromarray(GREY.astype(np.uint16) * 257).save(d / "g16.png")  # PIL mode I;16
    Image.fromarray(GREY).save(d / "ref.png")
    return "g16.png", "ref.png", 1e-6


def _gray32_int_tiff(d):
    Image.fromarray(GREY.astype(np.int32) * 257).save(d / "i32.tif")  # PIL mode I, values 0..65535
    Image.fromarray(GREY).save(d / "ref.png")
    return "i32.tif", "ref.png", 1e-6


def _exif_orientation_6(d):  # stored turned 90° counter-clockwise; Orientation 6 says turn it back
    Image.fromarray(NOISE).transpose(Image.Transpose.ROTATE_90).save(d / "r6.png", exif=_exif(6))
    Image.fromarray(NOISE).save(d / "ref.png")
    return "r6.png", "ref.png", 1e-6


def _exif_orientation_8(d):
    Image.fromarray(NOISE).transpose(Image.Transpose.ROTATE_270).save(d / "r8.png", exif=_exif(8))
    Image.fromarray(NOISE).save(d / "ref.png")
    return "r8.png", "ref.png", 1e-6


def _exif_orientation_6_jpeg(d):  # a camera JPEG: same pixels up to JPEG rounding
    Image.fromarray(SMOOTH).transpose(Image.Transpose.ROTATE_90).save(d / "r6.jpg", exif=_exif(6), quality=95)
    Image.fromarray(SMOOTH).save(d / "ref.png")
    return "r6.jpg", "ref.png", 0.35


def _palette_transparency(d):
    pal = Image.fromarray(GREY // 64 * 64).convert("P")  # 4 colours
    idx = np.asarray(pal)
    pal.save(d / "p.png", transparency=int(idx[0, 0]))
    ref = np.asarray(pal.convert("RGB")).copy()
    ref[idx == idx[0, 0]] = 255  # transparent pixels show the white background
    Image.fromarray(ref).save(d / "ref.png")
    return "p.png", "ref.png", 1e-6


def _rgba(d):
    alpha = np.where(_XX < 20, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([NOISE, alpha])).save(d / "a.png")
    ref = NOISE.copy()
    ref[_XX < 20] = 255
    Image.fromarray(ref).save(d / "ref.png")
    return "a.png", "ref.png", 1e-6


def _rgba_opaque(d):  # a fully opaque RGBA image is its RGB image exactly
    Image.fromarray(np.dstack([NOISE, np.full((30, 40), 255, np.uint8)])).save(d / "a.png")
    Image.fromarray(NOISE).save(d / "ref.png")
    return "a.png", "ref.png", 1e-6


def _cmyk_jpeg(d):
    Image.fromarray(SMOOTH).convert("CMYK").save(d / "c.jpg", quality=95)
    Image.fromarray(SMOOTH).save(d / "ref.png")
    return "c.jpg", "ref.png", 0.35


def _one_bit(d):
    bits = GREY > 127
    Image.fromarray(bits).save(d / "b.png")  # PIL mode 1
    Image.fromarray(bits.astype(np.uint8) * 255).save(d / "ref.png")
    return "b.png", "ref.png", 1e-6


EMBEDDED = {f.__name__[1:]: f for f in (_gray16_png, _gray32_int_tiff, _exif_orientation_6, _exif_orientation_8,
                                        _exif_orientation_6_jpeg, _palette_transparency, _rgba, _rgba_opaque,
                                        _cmyk_jpeg, _one_bit)}


@pytest.mark.parametrize("case", list(EMBEDDED))
def test_odd_image_is_embedded_as_its_rgb_equivalent(case, tmp_path, lm):
    odd, ref, tol = (str(tmp_path / p) if isinstance(p, str) else p for p in EMBEDDED[case](tmp_path))
    items = ex._ImageFiles([odd, ref], lm.preprocess)
    (_, x_odd, r_odd), (_, x_ref, _) = items[0], items[1]
    assert r_odd is None and x_odd.shape == x_ref.shape == (3, 32, 32)
    assert float((x_odd - x_ref).abs().max()) <= tol
    res = extract_embeddings(lm, [odd, ref], batch_size=2, progress=False)
    assert res.ok.tolist() == [True, True] and len(res.failures) == 0
    cos = float(res.embeddings[0] @ res.embeddings[1])
    assert cos > (1 - 1e-6 if tol < 1e-3 else 0.99), cos


def test_sixteen_bit_scaling_is_value_shift_8():
    """Values v of a 16-bit image become v >> 8 (0 → 0, 255 → 0, 256 → 1, 65535 → 255)."""
    v = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    assert np.asarray(ex.to_rgb(Image.fromarray(v)))[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255]
    # mode I: clipped to 0..65535 first
    i32 = Image.fromarray(np.array([[-5, 70000, 512]], dtype=np.int32))
    assert i32.mode == "I" and np.asarray(ex.to_rgb(i32))[0, :, 0].tolist() == [0, 255, 2]


def test_half_transparent_pixels_blend_with_white():
    rgba = Image.fromarray(np.array([[[0, 0, 0, 128], [200, 100, 0, 255], [9, 9, 9, 0]]], dtype=np.uint8))
    out = np.asarray(ex.to_rgb(rgba))[0].astype(int)
    assert np.abs(out[0] - 127).max() <= 1  # 0 * 128/255 + 255 * 127/255
    assert out[1].tolist() == [200, 100, 0] and out[2].tolist() == [255, 255, 255]


# ------------------------------------------------------------------ odd files that must be recorded failures


def _truncated_jpeg(d, monkeypatch):
    Image.fromarray(NOISE).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "t.jpg").write_bytes(data[: len(data) // 2])
    return "t.jpg"


def _zero_byte(d, monkeypatch):
    (d / "z.jpg").write_bytes(b"")
    return "z.jpg"


def _text_as_jpg(d, monkeypatch):
    (d / "notes.jpg").write_text("species,count\nCorvus corax,3\n")
    return "notes.jpg"


def _decompression_bomb(d, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1250)  # error above 2 x 1,250 pixels (good.png: 1,200)
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(d / "huge.png")
    return "huge.png"


def _folder_named_jpg(d, monkeypatch):
    (d / "x.jpg").mkdir()
    return "x.jpg"


def _fifo_named_jpg(d, monkeypatch):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(d / "pipe.jpg")  # opening it would block forever
    return "pipe.jpg"


def _unreadable_chmod(d, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions are not enforced (see unreadable_open_fails)")
    Image.fromarray(NOISE).save(d / "locked.png")
    os.chmod(d / "locked.png", 0)
    return "locked.png"


def _unreadable_open_fails(d, monkeypatch):
    """What an unreadable file does to open() (EACCES), also when running as root."""
    Image.fromarray(NOISE).save(d / "locked.png")
    target = str(d / "locked.png")

    def fake_open(path, *a, **k):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return open(path, *a, **k)

    monkeypatch.setattr(ex, "open", fake_open, raising=False)
    return "locked.png"


def _missing(d, monkeypatch):
    return "gone.jpg"


def _broken_symlink(d, monkeypatch):
    os.symlink(d / "nowhere.jpg", d / "link.jpg")
    return "link.jpg"


#: case → (maker, the exact reason or its start, a word the reason must contain).
FAILED = {
    "truncated_jpeg": (_truncated_jpeg, "cannot decode image: ", "truncated"),
    "zero_byte_file": (_zero_byte, "cannot decode image: ", "cannot identify image file"),
    "text_file_named_jpg": (_text_as_jpg, "cannot decode image: ", "cannot identify image file"),
    "decompression_bomb": (_decompression_bomb, "cannot decode image: ", "decompression bomb"),
    "folder_named_jpg": (_folder_named_jpg, "not a file (a folder)", ""),
    "fifo_named_jpg": (_fifo_named_jpg, "not a regular file", ""),
    "unreadable_chmod_000": (_unreadable_chmod, "cannot read file: ", "Permission denied"),
    "unreadable_open_fails": (_unreadable_open_fails, "cannot read file: ", "Permission denied"),
    "missing_file": (_missing, "missing file", ""),
    "broken_symlink": (_broken_symlink, "missing file", ""),
}


@pytest.mark.parametrize("case", list(FAILED))
def test_bad_image_file_is_a_recorded_failure(case, tmp_path, lm, good, monkeypatch):
    make, reason, word = FAILED[case]
    bad = str(tmp_path / make(tmp_path, monkeypatch))
    res = extract_embeddings(lm, [good, bad, good], batch_size=2, progress=False)
    assert res.ok.tolist() == [True, False, True] and res.embeddings.shape == (2, 32)
    assert res.failures["item"].tolist() == [bad]
    got = res.failures["reason"].iloc[0]
    assert got == reason if not reason.endswith(": ") else got.startswith(reason), got
    assert word in got and "\n" not in got


def test_image_over_the_pixel_limit_is_embedded_with_pils_warning(tmp_path, lm, good, monkeypatch):
    """Between PIL's limit and twice it, PIL warns and the image is embedded."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1250)
    Image.fromarray(np.resize(NOISE, (40, 40, 3))).save(tmp_path / "big.png")  # 1,600 pixels
    with pytest.warns(Image.DecompressionBombWarning):
        res = extract_embeddings(lm, [good, str(tmp_path / "big.png")], batch_size=2, progress=False)
    assert res.ok.tolist() == [True, True] and len(res.failures) == 0


def test_failures_reach_skipped_and_the_report_counts_them(tmp_path, lm, tiny_clip_checkpoint, monkeypatch):
    """Through the API a user calls (load_data → tl.embed): every odd file is a skipped row, and the
    report's counts by reason add up."""
    from treeprobe import tl
    from treeprobe.data import load_data
    from treeprobe.report import Report

    monkeypatch.setenv("TREEPROBE_CACHE", str(tmp_path / "cache"))
    names = []
    for i in range(3):
        Image.fromarray(np.roll(NOISE, i, axis=1)).save(tmp_path / f"ok{i}.png")
        names.append(f"ok{i}.png")
    names += [_zero_byte(tmp_path, None), _text_as_jpg(tmp_path, None), _truncated_jpeg(tmp_path, None),
              _folder_named_jpg(tmp_path, None), _missing(tmp_path, None)]
    Image.fromarray(GREY.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    names.append("g16.png")
    lineage = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]
    rows = [[n] + lineage for n in names]
    pd.DataFrame(rows, columns=["path", "kingdom", "phylum", "class", "order", "family", "genus", "species"]
                 ).to_csv(tmp_path / "meta.csv", index=False)

    out = tl.embed(load_data(str(tmp_path / "meta.csv")), ckpt=tiny_clip_checkpoint[0], device="cpu",
                   progress=False)
    assert out.X.shape == (4, 32) and len(out.items) == 4  # 3 photos + the 16-bit PNG
    counts = out.skipped["reason"].astype(str).str.split(":").str[0].value_counts().to_dict()
    assert counts == {"cannot decode image": 3, "not a file (a folder)": 1, "missing file": 1}
    report = Report.from_data(out)
    assert report.to_dict()["skipped"]["count"] == 5


# ------------------------------------------------------------------ unusable cache folders


def _as_file(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    return tmp_path / "cache", "is a file, not a folder"


def _read_only_chmod(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("running as root: folder permissions are not enforced (see read_only_file_system)")
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o555)
    return tmp_path / "cache", "cannot write to the cache folder"


def _read_only_file_system(tmp_path, monkeypatch):
    """What a read-only mount does to file creation (EROFS), also when running as root."""
    (tmp_path / "cache").mkdir()

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ex.tempfile, "mkstemp", erofs)
    return tmp_path / "cache", "Read-only file system"


def _under_proc(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    return "/proc/self/treeprobe-cache", "cannot write to the cache folder"


def _proc_itself(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    return "/proc", "cannot write to the cache folder"


def _no_space(tmp_path, monkeypatch):
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=10 << 20)  # 10 MiB free: less than the 16 MiB margin alone

    monkeypatch.setattr(ex.shutil, "disk_usage", tiny)
    return tmp_path / "cache", "not enough free space"


CACHE_DIRS = {
    "cache_dir_is_a_file": _as_file,
    "cache_dir_read_only_chmod": _read_only_chmod,
    "cache_dir_read_only_file_system": _read_only_file_system,
    "cache_dir_under_proc": _under_proc,
    "cache_dir_is_proc": _proc_itself,
    "cache_dir_without_free_space": _no_space,
}


@pytest.mark.parametrize("case", list(CACHE_DIRS))
def test_unusable_cache_dir_fails_before_extraction(case, tmp_path, lm, good, monkeypatch):
    cache, words = CACHE_DIRS[case](tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(ex, "encode_batch", lambda *a, **k: calls.append(1))
    with pytest.raises(TreeprobeError) as info:
        extract_embeddings(lm, [good], cache_dir=cache, progress=False)
    msg = str(info.value)
    assert words in msg and os.fspath(cache) in msg and "\n" not in msg
    assert calls == []  # checked before the model ran


def test_free_space_estimate_is_two_copies_of_the_embeddings(tmp_path, lm, good, monkeypatch):
    """1,000 paths x 32 floats x 4 bytes x 2 + 1,000 + margin: one byte less free space fails."""
    need = 2 * 1000 * 32 * 4 + 1000 + ex.SPACE_MARGIN
    assert ex.space_needed(1000, 32) == need
    assert ex.space_needed(1000, 32, copies=1) == need - 1000 * 32 * 4
    real = shutil.disk_usage
    for free, fails in ((need - 1, True), (need, False)):
        monkeypatch.setattr(ex.shutil, "disk_usage", lambda p, free=free: real(p)._replace(free=free))
        if fails:
            with pytest.raises(TreeprobeError, match=r"not enough free space .* about \d+ MiB needed"):
                ex.check_cache_dir(tmp_path / "c", need)
        else:
            ex.check_cache_dir(tmp_path / "c", need)
    assert [f for f in os.listdir(tmp_path / "c")] == []  # the probe file is gone


def test_a_read_only_cache_that_holds_the_result_is_still_a_hit(tmp_path, lm, good, monkeypatch):
    """The folder check runs on a miss only: reading a shared read-only cache works."""
    cache = tmp_path / "cache"
    made = extract_embeddings(lm, [good], cache_dir=cache, progress=False)
    monkeypatch.setattr(ex.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    hit = extract_embeddings(lm, [good], cache_dir=cache, progress=False)
    assert hit.cache_hit
    np.testing.assert_array_equal(hit.embeddings, made.embeddings)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_disk_full_during_a_chunk_write_keeps_the_chunks_written(err, tmp_path, lm, monkeypatch):
    """The 3rd file write fails with ENOSPC (EDQUOT, EROFS): a one-line TreeprobeError, the two
    chunks already written stay, and a rerun embeds only the batches they lack."""
    paths = []
    for i in range(12):
        Image.fromarray(np.roll(NOISE, 3 * i, axis=1)).save(tmp_path / f"{i:02d}.png")
        paths.append(str(tmp_path / f"{i:02d}.png"))
    cache = tmp_path / "cache"
    reference = extract_embeddings(lm, paths, batch_size=2, progress=False)
    real_write, writes = ex.atomic_write, []

    def failing(path, write, **k):
        writes.append(os.path.basename(path))
        if len(writes) == 3:
            raise OSError(err, os.strerror(err))
        return real_write(path, write, **k)

    monkeypatch.setattr(ex, "atomic_write", failing)
    with pytest.raises(TreeprobeError) as info:
        extract_embeddings(lm, paths, batch_size=2, cache_dir=cache, chunk_batches=2, progress=False)
    msg = str(info.value)
    assert "cannot write" in msg and "chunk-000002.npz" in msg and os.strerror(err) in msg and "\n" not in msg
    pdir = partial_dir_for(cache_file_for(cache, cache_key(lm, paths)))
    assert sorted(os.listdir(pdir)) == ["chunk-000000.npz", "chunk-000001.npz"]  # no temporary file left

    monkeypatch.setattr(ex, "atomic_write", real_write)
    real_encode, images = ex.encode_batch, []
    monkeypatch.setattr(ex, "encode_batch", lambda m, x, p: (images.append(len(x)), real_encode(m, x, p))[1])
    res = extract_embeddings(lm, paths, batch_size=2, cache_dir=cache, chunk_batches=2, progress=False)
    assert sum(images) == 12 - 8  # 4 batches of 2 were in the chunks kept
    np.testing.assert_array_equal(res.embeddings, reference.embeddings)


def test_other_os_errors_while_writing_are_not_hidden(tmp_path, lm, good, monkeypatch):
    """Only disk/folder errnos become a TreeprobeError; e.g. EIO stays an OSError (a real fault)."""
    monkeypatch.setattr(ex, "atomic_write", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        extract_embeddings(lm, [good], cache_dir=tmp_path / "c", progress=False)
