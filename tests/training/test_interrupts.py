"""Stops and resumes of the trainer (training/engine.py, training/checkpoint.py): a Ctrl-C at any
point, during a checkpoint write, or a kill mid-write, then ``--resume latest``, gives the
checkpoint and the log lines of an uninterrupted run, bit for bit.

Every run here trains with a loss scaled by draws from the torch, numpy and python global RNGs
(:class:`_RngLoss`), so weights depend on those streams: a resume that did not restore them, or a
data loader that drew from them at another point, shows as different weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from treeprobe.training import checkpoint as ckpt_io
from treeprobe.training import engine
from treeprobe.training.cli import main

#: 12 images, batch 4: 3 steps per epoch, 2 epochs, 6 steps.
STEPS_PER_EPOCH, EPOCHS = 3, 2
#: Fields of a log record that are timings (they differ between any two runs).
TIMING = ("img_s", "seconds")


class _RngLoss(ClipLoss):
    """open_clip's ClipLoss times (1 + 0.1 * (torch + numpy + python uniform draws))."""

    def forward(self, *args, **kwargs):
        draw = torch.rand(()).item() + np.random.rand() + random.random()
        return super().forward(*args, **kwargs) * (1 + 0.1 * draw)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """metadata.csv of 16 rendered images (32 px) of 16 species."""
    from tests._helpers import rendered_image_csv

    return rendered_image_csv(tmp_path_factory.mktemp("interrupt_images"))


def _argv(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(csv), "--limit", "12", "--batch-size", "4", "--epochs", str(EPOCHS), "--warmup", "1",
            "--log-every", "1", "--text-type", "mixed", "--seed", "3", "--eval-data", str(csv), "--eval-every", "1",
            "--eval-knn-only", "--threads", "1", "--no-progress", "-q", "--out", str(out), *extra]


def _train(csv: Path, out: Path, *extra: str) -> int:
    import open_clip.loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(open_clip.loss, "ClipLoss", _RngLoss)
        return main(_argv(csv, out, *extra))


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The run straight through (no stop)."""
    out = tmp_path_factory.mktemp("interrupt_ref") / "run"
    assert _train(images, out) == 0
    return out


def _records(out: Path) -> list[dict]:
    """The log's train / eval / epoch-checkpoint records, timings left out, checkpoint paths as names."""
    recs = []
    for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        if rec["event"] == "checkpoint":
            rec["path"] = Path(rec["path"]).name
            if rec["path"].startswith("step_"):  # the stop's own checkpoint: not in an uninterrupted run
                continue
        if rec["event"] in ("train", "eval", "checkpoint"):
            recs.append({k: v for k, v in rec.items() if k not in TIMING})
    return recs


def _tensors_equal(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, compared exactly (torch.equal for tensors)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_tensors_equal, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _assert_same_run(ref: Path, out: Path) -> None:
    a = ckpt_io.load_checkpoint(ref / "checkpoints" / f"epoch_{EPOCHS}.pt")
    b = ckpt_io.load_checkpoint(out / "checkpoints" / f"epoch_{EPOCHS}.pt")
    for key in ("state_dict", "optimizer", "rng", "sampler"):  # weights, AdamW state + LR, RNG streams, position
        assert _tensors_equal(a[key], b[key]), key
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS)
    assert _records(out) == _records(ref)


def _sigint_after_step(monkeypatch, k: int) -> None:
    real = engine._step

    def step(st, *a):
        res = real(st, *a)
        if st.step == k:
            os.kill(os.getpid(), signal.SIGINT)
        return res

    monkeypatch.setattr(engine, "_step", step)


def _sigint_at_epoch_end(monkeypatch, epoch: int) -> None:
    """The signal comes just after the epoch's last batch, before its checkpoint is written."""
    real = engine._end_epoch

    def end(st, stop):
        if st.epoch == epoch:
            os.kill(os.getpid(), signal.SIGINT)
        return real(st, stop)

    monkeypatch.setattr(engine, "_end_epoch", end)


def _sigint_inside_save(monkeypatch, name: str, presses: int = 1) -> None:
    """``presses`` SIGINTs come while torch.save writes checkpoint ``name`` (its file is open)."""
    real = torch.save

    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("name") == name:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)


def _sigint_inside_eval(monkeypatch, epoch: int) -> None:
    real = engine._evaluate

    def evaluate(st):
        if st.epoch == epoch:
            os.kill(os.getpid(), signal.SIGINT)
        return real(st)

    monkeypatch.setattr(engine, "_evaluate", evaluate)


# stop point → (hook, the checkpoint the stop leaves, its (epoch, position), the stop's logged reason)
STOPS = {
    "mid_epoch_0": (lambda mp: _sigint_after_step(mp, 1), "step_1.pt", (0, 1), "SIGINT"),
    "last_batch_of_epoch_0": (lambda mp: _sigint_after_step(mp, 3), "epoch_1.pt", (1, 0), "SIGINT"),
    "just_after_epoch_0": (lambda mp: _sigint_at_epoch_end(mp, 0), "epoch_1.pt", (1, 0), "SIGINT"),
    "inside_epoch_1_save": (lambda mp: _sigint_inside_save(mp, "epoch_1.pt"), "epoch_1.pt", (1, 0), "SIGINT"),
    # a second press quits at once, but not before the checkpoint being written is complete
    "two_presses_inside_epoch_1_save": (lambda mp: _sigint_inside_save(mp, "epoch_1.pt", presses=2), "epoch_1.pt",
                                        (1, 0), "KeyboardInterrupt"),
    "inside_epoch_1_eval": (lambda mp: _sigint_inside_eval(mp, 1), "epoch_1.pt", (1, 0), "SIGINT"),
    "first_batch_of_epoch_1": (lambda mp: _sigint_after_step(mp, 4), "step_4.pt", (1, 1), "SIGINT"),
    "last_step_of_the_run": (lambda mp: _sigint_after_step(mp, 6), "epoch_2.pt", (2, 0), "SIGINT"),
}
#: Stop points also run by default (the others only with the slow tests): ~5 s each on a busy machine.
DEFAULT_STOPS = ("mid_epoch_0", "last_batch_of_epoch_0", "two_presses_inside_epoch_1_save", "first_batch_of_epoch_1",
                 "last_step_of_the_run")


@pytest.mark.parametrize("where", [w if w in DEFAULT_STOPS else pytest.param(w, marks=pytest.mark.slow) for w in STOPS])
def test_ctrl_c_anywhere_then_resume_equals_the_uninterrupted_run(where, images, reference, tmp_path, monkeypatch):
    hook, saved, position, reason = STOPS[where]
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        hook(mp)
        assert _train(images, out) == 130  # the clean interrupted path: no traceback, exit 128 + SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert pointer["path"] == saved
    ck = ckpt_io.load_checkpoint(out / "checkpoints" / saved)  # complete and loadable
    assert (ck["epoch"], ck["sampler"]["position"]) == position
    assert ck["step"] == position[0] * STEPS_PER_EPOCH + position[1]
    stops = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "stop"]
    assert [(r["step"], r["reason"]) for r in stops] == [(ck["step"], reason)]
    assert not list((out / "checkpoints").glob(".*.tmp"))

    assert _train(images, out, "--resume", "latest") == 0
    _assert_same_run(reference, out)


def test_second_ctrl_c_quits_at_once_without_a_new_checkpoint(images, tmp_path, monkeypatch, capsys):
    real = engine._step

    def step(st, *a):
        res = real(st, *a)
        if st.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second press: KeyboardInterrupt here
        return res

    monkeypatch.setattr(engine, "_step", step)
    out = tmp_path / "run"
    assert _train(images, out) == 130
    assert "treeprobe: interrupted" in capsys.readouterr().err
    assert not (out / "checkpoints" / "step_2.pt").exists() and not (out / "checkpoints" / "latest.json").exists()
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert (last["event"], last["step"], last["reason"]) == ("stop", 2, "KeyboardInterrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_resume_restores_each_rng_stream(images, reference, tmp_path, monkeypatch):
    # the comparison above is sensitive to every stream: leaving one out of the restore changes the weights
    with monkeypatch.context() as mp:
        _sigint_after_step(mp, 4)
        assert _train(images, tmp_path / "stopped") == 130
    real = ckpt_io.set_rng_state
    for left_out in ("torch", "numpy", "python"):
        out = tmp_path / left_out
        shutil.copytree(tmp_path / "stopped", out)
        with monkeypatch.context() as mp:
            mp.setattr(ckpt_io, "set_rng_state", lambda s, k=left_out: real({n: v for n, v in s.items() if n != k}))
            assert _train(images, out, "--resume", "latest") == 0
        a = ckpt_io.load_checkpoint(reference / "checkpoints" / "epoch_2.pt")["state_dict"]
        b = ckpt_io.load_checkpoint(out / "checkpoints" / "epoch_2.pt")["state_dict"]
        assert not _tensors_equal(a, b), left_out


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it."""


def test_kill_mid_write_then_resume_drops_tmp_and_later_log_lines(images, tmp_path, monkeypatch, capsys):
    # what a SIGKILL while step_4.pt is written leaves: epoch_1.pt (step 3) the newest checkpoint, the
    # log one train line further (step 4) with a torn last line, and the write's .tmp file
    extra = ("--save-every-steps", "2")
    ref = tmp_path / "ref"
    assert _train(images, ref, *extra) == 0
    out = tmp_path / "run"
    real = torch.save

    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("name") == "step_4.pt":
            raise _Killed
        return real(obj, f, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", save)
        with pytest.raises(_Killed):
            _train(images, out, *extra)
    ckpts = out / "checkpoints"
    (ckpts / ".step_4.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "train", "step": 5, "ep')  # torn mid-line
    assert json.loads((ckpts / "latest.json").read_text())["path"] == "epoch_1.pt"
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()[:-1])
            if r["event"] == "train"] == [1, 2, 3, 4]

    capsys.readouterr()
    assert _train(images, out, *extra, "--resume", "latest") == 0
    prefix = "treeprobe: warning: "  # the CLI prints each TreeprobeWarning as one line
    notes = [ln[len(prefix):] for ln in capsys.readouterr().err.splitlines() if ln.startswith(prefix)]
    assert any("removed 1 temporary file" in n and ".step_4.pt.k1ll3d.tmp" in n for n in notes), notes
    assert any("dropped 2 line(s) logged after step 3" in n for n in notes), notes
    assert not list(ckpts.glob(".*.tmp"))
    assert _records(out) == _records(ref) and len([r for r in _records(out) if r["event"] == "train"]) == 6
    a = ckpt_io.load_checkpoint(ref / "checkpoints" / "epoch_2.pt")
    b = ckpt_io.load_checkpoint(out / "checkpoints" / "epoch_2.pt")
    assert _tensors_equal(a["state_dict"], b["state_dict"]) and _tensors_equal(a["optimizer"], b["optimizer"])


def test_a_resume_at_an_epoch_boundary_runs_the_evaluation_the_stop_left_out_once(images, reference, tmp_path,
                                                                                 monkeypatch):
    # stopped by --max-steps 3 (the end of epoch 0) after its evaluation: the resume must not log it twice;
    # stopped by Ctrl-C before it: the resume runs it (both compared to the reference in the tests above)
    out = tmp_path / "run"
    assert _train(images, out, "--max-steps", "3") == 0
    evals = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    assert evals == [0, 3]
    calls = []
    real = engine._evaluate
    monkeypatch.setattr(engine, "_evaluate", lambda st: (calls.append(st.step), real(st))[1])
    assert _train(images, out, "--resume", "latest") == 0
    assert calls == [6]
    _assert_same_run(reference, out)


def test_deferred_signals_deliver_after_the_block():
    # held, not lost: the KeyboardInterrupt comes after the write, not inside it
    got = []
    with pytest.raises(KeyboardInterrupt):
        with ckpt_io.deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            got.append("write finished")
    assert got == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # an exception in the block still restores the handlers (the held signal is delivered too)
    seen = []
    old = signal.signal(signal.SIGTERM, lambda n, f: seen.append(n))
    try:
        with pytest.raises(OSError):
            with ckpt_io.deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                assert seen == []
                raise OSError("disk full")
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigint_inside_atomic_save_leaves_the_whole_checkpoint(tmp_path, monkeypatch):
    real = torch.save

    def save(obj, f, *a, **kw):
        f.write(b"")
        os.kill(os.getpid(), signal.SIGINT)  # before a byte of the checkpoint is written
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint({"step": 7, "state_dict": {"w": torch.arange(5.0)}}, tmp_path, "step_7.pt")
    monkeypatch.setattr(torch, "save", real)
    assert torch.equal(ckpt_io.load_checkpoint(tmp_path / "step_7.pt")["state_dict"]["w"], torch.arange(5.0))
    assert json.loads((tmp_path / "latest.json").read_text())["path"] == "step_7.pt"  # the pointer too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_7.pt"]


@pytest.mark.slow
def test_a_real_sigkill_then_resume_equals_the_uninterrupted_run(images, tmp_path):
    # the same as above with a real SIGKILL at a random point (mid-step, mid-write or mid-line)
    import subprocess
    import sys
    import time

    extra = ("--limit", "16", "--batch-size", "2", "--save-every-steps", "1", "--eval-every", "0")
    ref = tmp_path / "ref"
    assert main(_argv(images, ref, *extra)) == 0
    out = tmp_path / "run"
    repo = Path(__file__).parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "treeprobe.training", *_argv(images, out, *extra)], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and log.read_text().count('"event": "train"') >= 5:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line and line.endswith("}")]
    assert 5 <= max(steps) < 16  # killed mid-run
    assert main(_argv(images, out, *extra, "--resume", "latest")) == 0
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert _records(out) == _records(ref)
    a = ckpt_io.load_checkpoint(ref / "checkpoints" / "epoch_2.pt")
    b = ckpt_io.load_checkpoint(out / "checkpoints" / "epoch_2.pt")
    assert _tensors_equal(a["state_dict"], b["state_dict"]) and _tensors_equal(a["optimizer"], b["optimizer"])
