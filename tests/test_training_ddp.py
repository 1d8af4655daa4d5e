"""DistributedDataParallel under torchrun (2 CPU ranks, gloo): the distributed run with
local loss + gather-with-grad matches a single process with the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.cli import main

REPO = Path(__file__).resolve().parents[1]
PHOTOS_CSV = REPO.parent / "shared" / "data" / "multikingdom_photos_index" / "metadata.csv"


@pytest.mark.skipif(not PHOTOS_CSV.is_file(), reason="shared photos not available")
def test_torchrun_two_ranks_matches_single_process(tmp_path):
    common = ["--data", str(PHOTOS_CSV), "--limit", "16", "--epochs", "2", "--no-progress", "-q",
              "--warmup", "1", "--threads", "1", "--seed", "5"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", *common, "--batch-size", "4",
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
