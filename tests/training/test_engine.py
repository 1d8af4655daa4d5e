"""The training loop's pieces that come from open_clip's trainer (open_clip_train) are the same
numbers as the code they replaced; where ours differs on purpose, the difference is pinned."""

import json
import math
import random

import numpy as np
import pytest
import torch

from treeprobe.errors import TreeprobeError
from treeprobe.training import engine
from treeprobe.training.cli import main


def _old_cosine_lr(base_lr, warmup, total):
    """The schedule treeprobe had before it used open_clip_train.scheduler.cosine_lr."""

    def lr_at(step):
        if step < warmup:
            return base_lr * (step + 1) / warmup
        e, es = step - warmup, max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr

    return lr_at


def _old_seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer():
    return torch.optim.AdamW(engine.param_groups(torch.nn.Linear(3, 2), 0.2), lr=1.0)


@pytest.mark.parametrize("base_lr, warmup, total", [(5e-4, 100, 1000), (1e-3, 0, 7), (3e-4, 1, 2), (1.0, 9, 10)])
def test_open_clip_cosine_lr_is_the_old_schedule_at_every_step(base_lr, warmup, total):
    # a schedule that changed the numbers (warmup off by one, another decay) breaks bit-identical resumes
    from open_clip_train.scheduler import cosine_lr

    opt = _optimizer()
    theirs, ours = cosine_lr(opt, base_lr, warmup, total), _old_cosine_lr(base_lr, warmup, total)
    for step in range(total):
        lr = theirs(step)
        assert lr == ours(step), step
        assert all(g["lr"] == lr for g in opt.param_groups)  # it also sets the optimizer's LR


def test_warmup_longer_than_the_run_is_cut_to_a_tenth():
    # open_clip's cosine divides by total - warmup: the cut keeps it defined
    assert engine.warmup_steps(3, 8) == 3
    assert engine.warmup_steps(8, 8) == 0 and engine.warmup_steps(100, 50) == 5


def test_logged_lr_of_a_run_is_open_clip_schedule_on_its_optimizer(tmp_path):
    # the loop's wiring: the LR it logs at step k (k-1 steps done) is the scheduler's at k-1,
    # with the warmup it was given (catches an off-by-one step or a dropped warmup cut)
    from open_clip_train.scheduler import cosine_lr

    out = tmp_path / "run"
    assert main(["--data", "synthetic", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "2",
                 "--lr", "1e-3", "--warmup", "3", "--log-every", "1", "--no-progress", "-q", "--out", str(out)]) == 0
    logged = [r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "train"]
    sched = cosine_lr(_optimizer(), 1e-3, 3, 8)
    assert logged == [sched(k) for k in range(8)]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("amp", torch.float16),
                                              ("amp_bf16", torch.bfloat16)])
def test_autocast_is_open_clip_trains_and_casts_as_before(precision, dtype):
    # the engine uses open_clip_train's get_autocast; under it a matmul runs in the dtype the old
    # torch.autocast(device_type, dtype) gave (fp32: no autocast at all)
    from open_clip_train.precision import get_autocast

    assert engine.get_autocast is get_autocast
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with get_autocast(precision, device_type="cpu")():
        assert (a @ b).dtype == dtype
    if precision != "fp32":
        with torch.autocast(device_type="cpu", dtype=dtype):
            old = a @ b
        with get_autocast(precision, device_type="cpu")():
            assert torch.equal(a @ b, old)


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1])
def test_open_clip_random_seed_draws_what_the_old_seeding_drew(seed):
    # init, numpy and python draws after seeding decide the initial weights and the run's RNG state
    from open_clip_train.main import random_seed

    _old_seed_everything(seed)
    old = (torch.rand(3), np.random.rand(3), random.random())
    random_seed(seed)
    new = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(old[0], new[0]) and np.array_equal(old[1], new[1]) and old[2] == new[2]


def test_a_plain_run_is_single_process_even_inside_a_slurm_allocation(monkeypatch):
    # open_clip's init_distributed_device would read SLURM_NTASKS and wait for 4 ranks that never
    # come; ours only follows torchrun's WORLD_SIZE
    import torch.distributed as dist

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    di = engine.init_distributed("cpu")
    assert (di.rank, di.world_size, di.distributed, di.main, str(di.device)) == (0, 1, False, True, "cpu")
    assert not dist.is_initialized()
    assert not engine.DistInfo(rank=1, world_size=2).main  # is_master: rank 0 only


def test_cuda_device_without_cuda_is_an_input_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(TreeprobeError, match="CUDA is not available"):
        engine.init_distributed("cuda")


def test_find_latest_differs_from_open_clips_on_purpose(tmp_path):
    # open_clip_train's get_latest_checkpoint sorts names: step_3.pt would win over the newer
    # epoch_1.pt (step 4); resuming from it would redo a step. Ours follows latest.json.
    from open_clip_train.main import get_latest_checkpoint

    from treeprobe.training import checkpoint as ck

    ck.save_checkpoint({"step": 3}, tmp_path, "step_3.pt")
    ck.save_checkpoint({"step": 4, "epoch": 1}, tmp_path, "epoch_1.pt")
    assert ck.find_latest(tmp_path).name == "epoch_1.pt"
    assert get_latest_checkpoint(str(tmp_path) + "/", remote=False).endswith("step_3.pt")
