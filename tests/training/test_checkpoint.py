"""Atomic checkpoint writes, latest-pointer, RNG round trip (training/checkpoint.py)."""

import random

import numpy as np
import pytest
import torch

from treeprobe.training import checkpoint as ck


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "step_5.pt"
    real_save = torch.save

    def broken_save(obj, f, *a, **kw):
        f.write(b"half a checkpoint")  # something reached the disk ...
        raise OSError("disk full")  # ... then the write failed

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint({"step": 5, "state_dict": {}}, tmp_path, "step_5.pt")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file, no latest.json

    # an existing good checkpoint is not clobbered by a failed overwrite
    monkeypatch.setattr(torch, "save", real_save)
    ck.save_checkpoint({"step": 5, "state_dict": {"w": torch.ones(2)}}, tmp_path, "step_5.pt")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint({"step": 5, "state_dict": {"w": torch.zeros(2)}}, tmp_path, "step_5.pt")
    assert torch.equal(ck.load_checkpoint(target)["state_dict"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_5.pt"]


def test_find_latest_pointer_and_glob_fallback(tmp_path):
    assert ck.find_latest(tmp_path) is None
    ck.save_checkpoint({"step": 1}, tmp_path, "step_1.pt")
    ck.save_checkpoint({"step": 2, "epoch": 1}, tmp_path, "epoch_1.pt")
    assert ck.find_latest(tmp_path).name == "epoch_1.pt"
    (tmp_path / "latest.json").unlink()
    assert ck.find_latest(tmp_path).name == "epoch_1.pt"  # newest by mtime


def test_rng_state_round_trip_and_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = ck.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.atomic_save({"rng": state, "args": ck.plain({"p": tmp_path, "t": (1, 2)})}, tmp_path / "x.pt")
    loaded = ck.load_checkpoint(tmp_path / "x.pt")  # weights_only=True must be able to read it
    ck.set_rng_state(loaded["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert loaded["args"] == {"p": str(tmp_path), "t": [1, 2]}
