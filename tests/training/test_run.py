"""End-to-end CPU training runs with the tiny model on real photos (training/engine.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from treeprobe.training.cli import main
from treeprobe.models import create_model

from tests.training._common import PHOTOS_CSV, REPO
from tests.training._common import same as _same
from tests.training._common import train_args as _args
from tests.training._common import weights as _weights

pytestmark = pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")


def test_two_step_run_checkpoint_loads_in_treeprobe(tmp_path):
    assert main(_args(tmp_path / "run", "--log-every", "1")) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and ck["epoch"] == 1
    assert {"state_dict", "optimizer", "scaler", "model_name", "model_cfg", "text_type", "args", "rng",
            "sampler"} <= set(ck)
    assert ck["model_name"] == "treeprobe-tiny" and ck["model_cfg"]["embed_dim"] == 64
    logs = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all({"loss", "lr", "img_s", "epoch"} <= set(r) for r in train)

    from treeprobe.models import load_model

    lm = load_model(ckpt=str(ckpt))  # no --model: the checkpoint carries its architecture
    assert lm.embed_dim == 64
    with torch.no_grad():
        emb = lm.model.encode_image(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()
    assert _same({k: v for k, v in lm.model.state_dict().items()}, ck["state_dict"])


def test_stop_then_resume_latest_matches_uninterrupted(tmp_path):
    common = ("--text-type", "mixed", "--seed", "3", "--save-every-steps", "3")
    assert main(_args(tmp_path / "a", *common, limit=12, batch=4, epochs=2)) == 0  # 6 steps straight
    assert main(_args(tmp_path / "b", *common, "--max-steps", "2", limit=12, batch=4, epochs=2)) == 0
    assert (tmp_path / "b" / "checkpoints" / "step_2.pt").is_file()
    assert main(_args(tmp_path / "b", *common, "--resume", "latest", limit=12, batch=4, epochs=2)) == 0
    a = _weights(tmp_path / "a" / "checkpoints" / "epoch_2.pt")
    b = _weights(tmp_path / "b" / "checkpoints" / "epoch_2.pt")
    assert _same(a, b)
    assert not _same(a, _weights(tmp_path / "b" / "checkpoints" / "step_2.pt"))  # it did train on


def test_sigterm_saves_a_checkpoint_equal_to_a_stop_at_that_step(tmp_path):
    out = tmp_path / "term"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # same thread count in both processes: it fixes the float reduction order
    cmd = [sys.executable, "-m", "treeprobe.training", *_args(out, "--log-every", "1", "--threads", "2", limit=64, batch=2)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.time() + 50
    try:
        while time.time() < deadline:
            if log.is_file() and '"event": "train"' in log.read_text():
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=50)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143
    saved = json.loads((out / "checkpoints" / "latest.json").read_text())
    k = saved["step"]
    assert saved["path"] == f"step_{k}.pt" and 1 <= k < 32
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "stop"
    assert main(_args(tmp_path / "ref", "--max-steps", str(k), "--threads", "2", limit=64, batch=2)) == 0
    assert _same(_weights(out / "checkpoints" / f"step_{k}.pt"),
                 _weights(tmp_path / "ref" / "checkpoints" / f"step_{k}.pt"))


def test_pretrained_local_file_initialises_the_model(tmp_path):
    # init from a local file (how BioCLIP starts from OpenAI CLIP where the hub is unreachable):
    # with lr 0 the run's checkpoint holds exactly the weights it was started from
    assert main(_args(tmp_path / "first", "--max-steps", "1")) == 0
    init = tmp_path / "first" / "checkpoints" / "step_1.pt"
    assert main(_args(tmp_path / "second", "--pretrained", str(init), "--lr", "0", "--max-steps", "1")) == 0
    started = _weights(init)  # one trained step away from the seed's random init
    assert _same(_weights(tmp_path / "second" / "checkpoints" / "step_1.pt"), started)
    fresh = create_model("tiny", seed=0).model.state_dict()  # had --pretrained been ignored (same seed, lr 0)
    assert not _same({k: fresh[k] for k in started}, started)


def test_training_starts_from_the_same_init_as_load_model(tmp_path):
    # one factory: a run with lr 0 (seed 0) saves exactly the weights load_model(model="tiny")
    # builds; a training-only way of building models would drift from the analysed one
    from treeprobe.models import load_model

    out = tmp_path / "lr0"
    assert main(["--data", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--lr", "0",
                 "--max-steps", "1", "--seed", "0", "--no-progress", "-q", "--out", str(out)]) == 0
    assert _same(_weights(out / "checkpoints" / "step_1.pt"), load_model(model="tiny").model.state_dict())
