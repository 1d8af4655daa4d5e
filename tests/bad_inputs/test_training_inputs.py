"""Bad inputs of ``treeprobe train`` (training/engine.py, training/checkpoint.py): each kind is one
``treeprobe: error: ...`` line with exit status 2, or a documented behaviour (a warning, a fresh
start), asserted exactly."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from treeprobe.errors import TreeprobeWarning
from treeprobe.training.checkpoint import export_weights
from treeprobe.training.cli import main

#: A 2-step run on synthetic images (8 samples, batch 4): what most cases start from.
SYNTHETIC = ("--data", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--warmup", "1", "--no-progress",
             "-q")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder stopped by --max-steps 1: checkpoints/step_1.pt, log.jsonl."""
    out = tmp_path_factory.mktemp("bad_train_inputs") / "run"
    assert main([*SYNTHETIC, "--max-steps", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """metadata.csv of 16 rendered 32-px images."""
    from tests._helpers import rendered_image_csv

    return rendered_image_csv(tmp_path_factory.mktemp("bad_train_images"))


def _ckpt(trained: Path) -> Path:
    return trained / "checkpoints" / "step_1.pt"


def _edited_checkpoint(trained: Path, tmp: Path, edit) -> Path:
    ck = torch.load(_ckpt(trained), map_location="cpu", weights_only=True)
    path = tmp / "edited.pt"
    torch.save(edit(ck), path)
    return path


def _shards(images: Path, tmp: Path, corrupt: str) -> Path:
    """make-shards of the 16 images (3 shards); ``corrupt``: 'one' (the first cut short) or 'all' (random bytes)."""
    shards = tmp / "shards"
    assert main(["make-shards", "--data", str(images), "--out", str(shards), "--shard-size", "6"]) == 0
    tars = sorted(shards.glob("*.tar"))
    if corrupt == "one":
        tars[0].write_bytes(tars[0].read_bytes()[:5000])
    else:
        for t in tars:
            t.write_bytes(os.urandom(600))
    return shards


def _other_arch(tmp: Path) -> Path:
    cfg = json.loads((Path(__file__).parents[2] / "training" / "configs" / "treeprobe-tiny.json").read_text())
    cfg["vision_cfg"]["width"] = 32
    path = tmp / "other-arch.json"
    path.write_text(json.dumps(cfg))
    return path


# case id → (argv maker (trained run, images csv, tmp folder) → argv, exit status, words of the one stderr line
#            or of the TreeprobeWarning (exit 0); {r} / {t} stand for the trained run / the tmp folder)
CASES = {
    "epochs_zero": (lambda r, i, t: [*SYNTHETIC, "--epochs", "0", "--out", str(t / "o")], 2,
                    ["--epochs must be >= 1; got 0"]),
    "negative_lr": (lambda r, i, t: [*SYNTHETIC, "--lr", "-1", "--out", str(t / "o")], 2,
                    ["--lr must be a finite number >= 0; got -1.0"]),
    "nan_lr": (lambda r, i, t: [*SYNTHETIC, "--lr", "nan", "--out", str(t / "o")], 2,
               ["--lr must be a finite number >= 0; got nan"]),
    "batch_size_zero": (lambda r, i, t: [*SYNTHETIC, "--batch-size", "0", "--out", str(t / "o")], 2,
                        ["--batch-size must be >= 1; got 0"]),
    "log_every_zero": (lambda r, i, t: [*SYNTHETIC, "--log-every", "0", "--out", str(t / "o")], 2,
                       ["--log-every must be >= 1; got 0"]),
    "negative_max_steps": (lambda r, i, t: [*SYNTHETIC, "--max-steps", "-1", "--out", str(t / "o")], 2,
                           ["--max-steps must be >= 0; got -1"]),
    "beta2_one": (lambda r, i, t: [*SYNTHETIC, "--beta2", "1", "--out", str(t / "o")], 2,
                  ["--beta2 must be in [0, 1); got 1.0"]),
    "unknown_text_type": (lambda r, i, t: [*SYNTHETIC, "--text-type", "vernacular", "--out", str(t / "o")], 2,
                          ["argument --text-type: invalid choice: 'vernacular'"]),
    "data_folder_without_images": (lambda r, i, t: [*SYNTHETIC[2:], "--data", str(t), "--out", str(t / "o")], 2,
                                   ["no iNat-style class folders", "{t}"]),
    "existing_run_folder_fresh_run": (lambda r, i, t: [*SYNTHETIC, "--lr", "1e-3", "--out", str(r)], 2,
                                      ["--out {r} already holds a training run (log.jsonl, 1 checkpoint(s))",
                                       "--resume latest"]),
    "resume_missing_file": (lambda r, i, t: [*SYNTHETIC, "--resume", str(t / "nope.pt"), "--out", str(t / "o")], 2,
                            ["no such checkpoint file"]),
    "resume_random_bytes": (lambda r, i, t: [*SYNTHETIC, "--resume", str(_write(t / "r.pt", bytes(range(3, 200)))),
                                             "--out", str(t / "o")], 2,
                            ["is not a PyTorch checkpoint (it starts with bytes 03 04 05 06"]),
    "resume_empty_file": (lambda r, i, t: [*SYNTHETIC, "--resume", str(_write(t / "e.pt", b"")), "--out", str(t / "o")],
                          2, ["e.pt: the file is empty (0 bytes)"]),
    "resume_truncated_checkpoint": (lambda r, i, t: [*SYNTHETIC, "--resume",
                                                     str(_write(t / "cut.pt", _ckpt(r).read_bytes()[:4096])),
                                                     "--out", str(t / "o")], 2,
                                    ["cut.pt is truncated or corrupted (its zip archive ends early"]),
    "resume_plain_state_dict": (lambda r, i, t: [*SYNTHETIC, "--resume",
                                                 str(_edited_checkpoint(r, t, lambda ck: ck["state_dict"])),
                                                 "--out", str(t / "o")], 2,
                                ["not a checkpoint written by treeprobe train", "--pretrained"]),
    "resume_other_architecture": (lambda r, i, t: [*SYNTHETIC, "--model", str(_other_arch(t)), "--resume",
                                                   str(_ckpt(r)), "--out", str(t / "o")], 2,
                                  ["the checkpoint is of model treeprobe-tiny, this run builds other-arch",
                                   "pass --model tiny"]),
    "resume_state_dict_of_other_shapes": (
        lambda r, i, t: [*SYNTHETIC, "--resume", str(_edited_checkpoint(
            r, t, lambda ck: {**ck, "state_dict": {**ck["state_dict"], "text_projection": torch.zeros(64, 8)}})),
            "--out", str(t / "o")], 2,
        ["does not match architecture treeprobe-tiny: 0 missing keys; 0 unexpected keys; 1 with the wrong shape "
         "(e.g. text_projection: checkpoint (64, 8) vs model (64, 64))"]),
    "corrupted_shard": (lambda r, i, t: [*SYNTHETIC[2:], "--data", str(_shards(i, t, "one")), "--max-steps", "1",
                                         "--out", str(t / "o")],
                        0, []),
    "all_shards_corrupted": (lambda r, i, t: [*SYNTHETIC[2:], "--data", str(_shards(i, t, "all")),
                                              "--out", str(t / "o")], 2,
                             ["the shards yielded no full batch (too few readable samples?)"]),
    "resume_latest_without_checkpoint": (lambda r, i, t: [*SYNTHETIC, "--resume", "latest", "--max-steps", "1",
                                                          "--out", str(t / "o")], 0, []),
    "resume_weights_only_export": (lambda r, i, t: [*SYNTHETIC, "--resume",
                                                    str(export_weights(_ckpt(r), t / "export.pt")),
                                                    "--out", str(t / "o")], 0,
                                   ["the checkpoint has no optimizer state (a weights-only export?)"]),
    "eval_every_without_eval_data": (lambda r, i, t: [*SYNTHETIC, "--eval-every", "1", "--max-steps", "1",
                                                      "--out", str(t / "o")], 0,
                                     ["--eval-every 1 without --eval-data: nothing is evaluated"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_input(case, trained, images, tmp_path, capsys):
    make_argv, status, words = CASES[case]
    argv = make_argv(trained, images, tmp_path)
    words = [w.format(r=trained, t=tmp_path) for w in words]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors: usage line + error line, status 2
            rc = e.code
    err = capsys.readouterr().err
    assert rc == status, err
    if status == 2:
        lines = err.strip().splitlines()
        error = lines[-1]
        assert error.startswith("treeprobe: error:" if case != "unknown_text_type" else "treeprobe-train train: error:")
        assert all(w in error for w in words), error
        assert "Traceback" not in err and "trust" not in error
        if case != "unknown_text_type":
            assert len(lines) == 1, err
        if case != "all_shards_corrupted":  # found at the first batch, after the start line
            assert not (tmp_path / "o" / "log.jsonl").exists()  # nothing was trained or logged
        return
    # the CLI prints each TreeprobeWarning as one line on stderr
    notes = [l[len("treeprobe: warning: "):] for l in err.splitlines() if l.startswith("treeprobe: warning: ")]
    notes += [str(w.message) for w in caught if issubclass(w.category, TreeprobeWarning)]
    assert all(any(w in n for n in notes) for w in words), (notes, err)
    if case == "corrupted_shard":  # webdataset skips the cut shard's unreadable tail and warns with its name
        shard = str(tmp_path / "shards" / "shard-000000.tar")
        assert any("ReadError" in str(w.message) and shard in str(w.message) for w in caught)
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start"
    if case == "resume_latest_without_checkpoint":  # documented: --resume latest starts fresh when none
        assert log[0]["resumed_from"] is None and log[0]["step"] == 0
        assert json.loads((tmp_path / "o" / "checkpoints" / "latest.json").read_text())["path"] == "step_1.pt"
    if case == "resume_weights_only_export":
        assert log[0]["step"] == 1 and log[0]["resumed_from"].endswith("export.pt")
