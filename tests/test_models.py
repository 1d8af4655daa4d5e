"""treeprobe.models: checkpoint formats, errors, hub offline, and the one model factory (create_model)."""

import json
import os
import time

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from treeprobe.errors import TreeprobeError
from treeprobe.models import LoadedModel, load_model, sha256_file

TINY_NAME = "treeprobe-tiny-test"


@pytest.fixture(scope="module")
def tiny_registered(tmp_path_factory, tiny_clip_cfg):
    """Register the tiny config with open_clip under TINY_NAME (for name-only checkpoints)."""
    d = tmp_path_factory.mktemp("cfg")
    (d / f"{TINY_NAME}.json").write_text(json.dumps(tiny_clip_cfg))
    open_clip.add_model_config(d / f"{TINY_NAME}.json")
    return TINY_NAME


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



# ----------------------------------------------------------------------------- the one factory


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_and_analysis_build_the_same_model_from_one_factory():
    # treeprobe train draws its init from the global RNG it seeded (seed=None, dict outputs, HF
    # text weights allowed); load_model's random init forks a seeded RNG: same seed, same weights.
    # Two factories drifting apart (another init, config or alias) would break this.
    from treeprobe.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trained_path = create_model("tiny", seed=None, output_dict=True, pretrained_text=True)
    analysed = load_model(model="tiny")
    assert analysed.model_name == trained_path.name == "treeprobe-tiny"
    assert analysed.digest == "random-init-treeprobe-tiny" and analysed.embed_dim == trained_path.embed_dim == 64
    assert _same_weights(trained_path.model, analysed.model)
    # a checkpoint's model_cfg takes open_clip's local-dir route: the same network as the name
    from_cfg = create_model(model_cfg=trained_path.model_cfg, label="custom")
    assert from_cfg.name == "custom" and _same_weights(from_cfg.model, analysed.model)


def test_factory_seed_leaves_the_global_rng_alone_and_none_uses_it():
    from treeprobe.models import create_model

    # analysis builds must not move the caller's RNG; training's must draw from it (its resume
    # restores that stream, so where the init leaves it is part of the run)
    before = torch.get_rng_state()
    a = create_model("tiny", seed=3)
    assert torch.equal(before, torch.get_rng_state())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        seeded = torch.get_rng_state()
        b = create_model("tiny", seed=None)
        assert not torch.equal(seeded, torch.get_rng_state())
    assert _same_weights(a.model, b.model)


def test_factory_image_size_config_file_and_unknown_names(tmp_path, tiny_clip_cfg):
    from treeprobe.models import create_model, resolve_model_name

    big = create_model("tiny", image_size=48)
    assert big.model_cfg["vision_cfg"]["image_size"] == 48
    assert big.preprocess_val(Image.new("RGB", (90, 60))).shape == (3, 48, 48)
    path = tmp_path / "my-net.json"
    path.write_text(json.dumps(tiny_clip_cfg))
    assert resolve_model_name(str(path)) == "my-net"
    assert create_model(str(path)).embed_dim == 32
    with pytest.raises(TreeprobeError, match="unknown open_clip architecture 'NoSuchNet'"):
        create_model("NoSuchNet")
    with pytest.raises(TreeprobeError, match="unknown pretrained tag 'nosuchtag' .*neither a file nor"):
        create_model("tiny", pretrained="nosuchtag")


def test_factory_keeps_open_clip_factory_logs_off_the_root_logger(caplog):
    # one filter for every build (open_clip logs 'initialized randomly' etc. on the root logger)
    from treeprobe.models import create_model

    with caplog.at_level("DEBUG"):
        create_model("tiny")
    assert not [r for r in caplog.records if r.pathname.replace("\\", "/").endswith("open_clip/factory.py")]


# ----------------------------------------------------------------------------- unreadable checkpoint files
def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_BAD_CKPT_FILES = {
    # name → (file name, bytes, words the one-line error must have)
    "random_bytes": ("r.pt", bytes(range(7, 250, 3)), ["is not a PyTorch checkpoint", "starts with bytes 07 0a 0d 10"]),
    "text_file": ("t.pt", b"hello world, not a checkpoint\n", ["is not a PyTorch checkpoint", "text 'hello world"]),
    "html_page": ("h.bin", b"<!DOCTYPE html><html><body>Sign in", ["is not a PyTorch checkpoint", "'<!DOCTYPE html>"]),
    "git_lfs_pointer": ("l.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
                        ["Git LFS pointer", "git lfs pull"]),
    "gzip_file": ("g.pt", b"\x1f\x8b\x08\x00" + bytes(30), ["is not a PyTorch checkpoint", "a gzip file"]),
    "empty_file": ("e.pt", b"", ["is empty (0 bytes)"]),
    "empty_safetensors": ("e.safetensors", b"", ["cannot read safetensors checkpoint", "is empty (0 bytes)"]),
}


@pytest.mark.parametrize("case", list(_BAD_CKPT_FILES))
def test_a_file_that_is_no_checkpoint_says_what_it_is_without_the_trust_hint(case, tmp_path):
    # a file that is not a pickle at all must not be "fixed" by --trust-checkpoint (which unpickles)
    name, data, words = _BAD_CKPT_FILES[case]
    (tmp_path / name).write_bytes(data)
    for trust in (False, True):
        with pytest.raises(TreeprobeError) as ei:
            load_model(ckpt=tmp_path / name, model="tiny", trust_checkpoint=trust)
        msg = str(ei.value)
        assert all(w in msg for w in words), msg
        assert "trust" not in msg and "\n" not in msg and str(tmp_path / name) in msg


def test_a_truncated_checkpoint_is_named_as_such(tmp_path, tiny_clip_checkpoint):
    ckpt, _ = tiny_clip_checkpoint
    data = open(ckpt, "rb").read()
    for name, cut in (("half.pt", data[: len(data) // 2]), ("head.pt", data[:64])):
        (tmp_path / name).write_bytes(cut)  # a zip without its central directory: a copy or write cut short
        with pytest.raises(TreeprobeError) as ei:
            load_model(ckpt=tmp_path / name)
        msg = str(ei.value)
        assert "is truncated or corrupted (its zip archive ends early" in msg and "\n" not in msg, msg
        assert "trust" not in msg
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-200])
    with pytest.raises(TreeprobeError, match=r"legacy.pt is truncated or corrupted \(its pickle ends early"):
        load_model(ckpt=legacy, model="tiny")


def test_only_a_real_pickle_that_weights_only_refuses_gets_the_trust_hint(tmp_path, tiny_clip_checkpoint):
    import argparse

    _, sd = tiny_clip_checkpoint  # old trainers stored their argparse options in the checkpoint
    path = tmp_path / "objects.pt"
    path.write_bytes(_torch_bytes({"state_dict": sd, "args": argparse.Namespace(lr=1.0)}))
    with pytest.raises(TreeprobeError, match="holds Python objects beyond tensors.*pass --trust-checkpoint"):
        load_model(ckpt=path, model="tiny")


def test_safetensors_is_supported_and_a_misnamed_one_is_named(tmp_path, tiny_clip_checkpoint, tiny_clip_cfg):
    _, sd = tiny_clip_checkpoint
    good = tmp_path / "w.safetensors"
    save_file(sd, str(good), metadata={"model_cfg": json.dumps(tiny_clip_cfg)})
    lm = load_model(ckpt=good)
    assert lm.embed_dim == 32 and torch.equal(lm.model.state_dict()["visual.proj"], sd["visual.proj"])
    (tmp_path / "w.pt").write_bytes(good.read_bytes())  # safetensors bytes under a torch name
    with pytest.raises(TreeprobeError, match=r"w.pt is a safetensors file; name it \*.safetensors"):
        load_model(ckpt=tmp_path / "w.pt")
    (tmp_path / "t.safetensors").write_bytes(_torch_bytes({"state_dict": sd}))  # and the other way round
    with pytest.raises(TreeprobeError, match=r"t.safetensors is a torch.save file, not safetensors; name it \*.pt"):
        load_model(ckpt=tmp_path / "t.safetensors")


def test_a_folder_as_ckpt_and_a_mismatching_state_dict_are_one_line(tmp_path, tiny_clip_checkpoint, tiny_clip_cfg):
    with pytest.raises(TreeprobeError, match="is a folder; pass the checkpoint file inside it"):
        load_model(ckpt=tmp_path)
    _, sd = tiny_clip_checkpoint
    wide = dict(tiny_clip_cfg, embed_dim=16, vision_cfg=dict(tiny_clip_cfg["vision_cfg"], width=48))
    (tmp_path / "other.pt").write_bytes(_torch_bytes({"state_dict": sd, "model_cfg": wide}))
    with pytest.raises(TreeprobeError) as ei:
        load_model(ckpt=tmp_path / "other.pt")
    msg = str(ei.value)
    assert "does not match architecture" in msg and "with the wrong shape" in msg
    assert "\n" not in msg and len(msg) < 600, msg
