"""Mixed precision and gradient checkpointing in the training loop, exercised on the CPU.

The GPU defaults (``--precision amp_bf16``, ``--grad-checkpointing``) run through the same
code on the CPU: torch autocasts to bfloat16 / float16 there too and open_clip's
checkpointed transformer recomputes its blocks on either device.
"""

import json

import pytest
import torch

from tests.training._common import PHOTOS_CSV
from tests.training._common import same as _same
from tests.training._common import train_args as _args
from tests.training._common import weights as _weights
from treeprobe.training.cli import main
from treeprobe.models import create_model

needs_photos = pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _first_loss(run):
    return next(r["loss"] for r in _log(run) if r["event"] == "train" and r["step"] == 1)


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    """Two-step runs from the same seed in fp32, bf16 autocast and fp16 autocast + GradScaler."""
    root = tmp_path_factory.mktemp("precision")
    for p in ("fp32", "amp_bf16", "amp"):
        assert main(_args(root / p, "--precision", p, "--log-every", "1", "--seed", "1")) == 0
    return root


@needs_photos
def test_autocast_changes_the_loss_only_by_rounding(precision_runs):
    # step 1 sees the same initial weights and the same batch in every run: the losses
    # differ only by the reduced-precision matmuls (non-zero: autocast really ran)
    ref = _first_loss(precision_runs / "fp32")
    bf16 = _first_loss(precision_runs / "amp_bf16")
    fp16 = _first_loss(precision_runs / "amp")
    assert 0 < abs(bf16 - ref) / ref < 0.02
    assert 0 < abs(fp16 - ref) / ref < 0.005
    for p in ("fp32", "amp_bf16", "amp"):
        start = next(r for r in _log(precision_runs / p) if r["event"] == "start")
        assert start["precision"] == p
        w = _weights(precision_runs / p / "checkpoints" / "epoch_1.pt")
        assert all(torch.isfinite(v).all() for v in w.values())


@needs_photos
def test_fp16_grad_scaler_state_is_saved_and_resumed(precision_runs, tmp_path):
    straight = precision_runs / "amp" / "checkpoints" / "epoch_1.pt"
    scaler = torch.load(straight, map_location="cpu", weights_only=True)["scaler"]
    assert scaler is not None and scaler["scale"] > 0 and scaler["_growth_tracker"] == 2
    # stop after step 1, resume: same weights as the straight run (scaler state included)
    run = tmp_path / "resumed"
    common = ("--precision", "amp", "--log-every", "1", "--seed", "1")
    assert main(_args(run, *common, "--max-steps", "1")) == 0
    assert main(_args(run, *common, "--resume", "latest")) == 0
    resumed = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert resumed["scaler"] == scaler
    assert _same(resumed["state_dict"], _weights(straight))


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients():
    model = create_model("tiny", output_dict=True).model
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    calls = {"n": 0}

    def counted(forward):  # forward hooks do not fire on checkpoint's recomputation: wrap forward
        def run(*a, **k):
            calls["n"] += 1
            return forward(*a, **k)
        return run

    for b in blocks:
        b.forward = counted(b.forward)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 48))

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls["n"] = 0
        out = model(images, texts)
        (out["image_features"] @ out["text_features"].T).logsumexp(1).sum().backward()
        return calls["n"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n_plain, g_plain = grads(False)
    n_ckpt, g_ckpt = grads(True)
    assert n_plain == len(blocks) and n_ckpt == 2 * len(blocks)  # each block run again in backward
    assert g_plain.keys() == g_ckpt.keys()
    assert all(torch.allclose(g_plain[k], g_ckpt[k], rtol=1e-5, atol=1e-7) for k in g_plain)


@needs_photos
def test_grad_checkpointing_run_matches_plain_run(precision_runs, tmp_path):
    run = tmp_path / "ckpt"
    assert main(_args(run, "--precision", "fp32", "--log-every", "1", "--seed", "1", "--grad-checkpointing")) == 0
    a = _weights(run / "checkpoints" / "epoch_1.pt")
    b = _weights(precision_runs / "fp32" / "checkpoints" / "epoch_1.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((run / "args.json").read_text())["grad_checkpointing"] is True


def test_resnet_tower_trains_and_warns_that_it_has_no_grad_checkpointing(tmp_path, caplog):
    # any open_clip architecture from a config file: a tiny ModifiedResNet image tower
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "rn"
    with caplog.at_level("WARNING", logger="treeprobe.training"):
        assert main(["--data", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--model", str(path),
                     "--grad-checkpointing", "--out", str(out), "--no-progress", "--warmup", "1"]) == 0
    assert "has none for ResNet image towers" in caplog.text
    ck = torch.load(out / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and ck["model_name"] == "tiny-rn" and ck["model_cfg"]["vision_cfg"]["layers"] == [1, 1, 1, 1]
    from treeprobe.models import load_model

    lm = load_model(ckpt=str(out / "checkpoints" / "epoch_1.pt"))  # architecture from the checkpoint alone
    with torch.no_grad():
        z = lm.model.encode_image(torch.randn(2, 3, 32, 32))
    assert lm.embed_dim == 32 and z.shape == (2, 32) and torch.isfinite(z).all()
