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


def test_remove_stale_tmp_takes_only_the_temporary_files_of_atomic_writes(tmp_path):
    # what a SIGKILL mid-write leaves: a ".<name>.<random>.tmp" next to the checkpoints
    for name in (".step_4.pt.k1ll3d.tmp", ".latest.json.x9.tmp", "step_3.pt", "notes.tmp", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in ck.remove_stale_tmp(tmp_path, names=("latest.json",))] == [".latest.json.x9.tmp"]
    assert [p.name for p in ck.remove_stale_tmp(tmp_path)] == [".step_4.pt.k1ll3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "notes.tmp", "step_3.pt"]
    assert ck.remove_stale_tmp(tmp_path / "missing") == []


@pytest.mark.parametrize("data, words", [
    (b"", "the file is empty (0 bytes)"),
    (b"\x00\x01garbage" * 4, "is not a PyTorch checkpoint (it starts with bytes 00 01 67 61"),
    (None, "is truncated or corrupted (its zip archive ends early"),
])
def test_load_checkpoint_of_a_bad_file_is_one_line(tmp_path, data, words):
    from treeprobe.errors import TreeprobeError

    path = tmp_path / "bad.pt"
    if data is None:  # a real checkpoint cut short
        ck.atomic_save({"step": 1, "state_dict": {"w": torch.zeros(4000)}}, path)
        data = path.read_bytes()[:2000]
    path.write_bytes(data)
    with pytest.raises(TreeprobeError) as ei:
        ck.load_checkpoint(path)
    assert words in str(ei.value) and "\n" not in str(ei.value) and "trust" not in str(ei.value)
