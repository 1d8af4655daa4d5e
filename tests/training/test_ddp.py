"""DistributedDataParallel under torchrun (2 CPU ranks, gloo): the distributed run with
local loss + gather-with-grad matches a single process with the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treeprobe.training.cli import main

from tests.training._common import PHOTOS_CSV, REPO


@pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")
def test_torchrun_two_ranks_matches_single_process(tmp_path):
    common = ["--data", str(PHOTOS_CSV), "--limit", "16", "--epochs", "2", "--no-progress", "-q",
              "--warmup", "1", "--threads", "1", "--seed", "5"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "treeprobe.training", *common, "--batch-size", "4",
           "--local-loss", "--gather-with-grad", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["world_size"] == 2
    # per rank: half of each global batch (DistributedSampler), same pixels (per-sample seeded
    # augmentation); gradients all-reduced -> the same updates up to float rounding
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert diff < 1e-4


def _rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (children of the agent, from /proc)."""
    out = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(child)
    return out


@pytest.mark.skipif(not PHOTOS_CSV.is_file() or not Path("/proc/self/task").is_dir(),
                    reason="shared photos or /proc not available")
def test_sigterm_to_one_rank_stops_all_ranks_with_one_checkpoint(tmp_path):
    # a preemption notice reaching one node only: the ranks agree over the gloo control
    # group, stop after the same step, and rank 0 writes that step's checkpoint
    import json
    import os
    import signal
    import time

    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "treeprobe.training", "--data", str(PHOTOS_CSV),
           "--limit", "128", "--epochs", "1", "--batch-size", "2", "--no-progress", "-q", "--warmup", "1",
           "--threads", "1", "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = out / "log.jsonl"
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (log.is_file() and '"event": "train"' in log.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGTERM)  # rank 1 only
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = json.loads((out / "checkpoints" / "latest.json").read_text())
    k = saved["step"]
    assert saved["path"] == f"step_{k}.pt" and 1 <= k < 32  # 64 steps per epoch: it stopped early
    ck = torch.load(out / "checkpoints" / saved["path"], map_location="cpu", weights_only=True)
    assert ck["step"] == k and ck["world_size"] == 2
    *_, saved_rec, stop_rec = map(json.loads, log.read_text().splitlines())
    assert (saved_rec["event"], saved_rec["step"]) == ("checkpoint", k)
    assert (stop_rec["event"], stop_rec["step"], stop_rec["reason"]) == ("stop", k, "SIGTERM")
    assert not (out / "checkpoints" / "epoch_1.pt").exists()
