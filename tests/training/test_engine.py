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


def test_truncate_log_keeps_the_lines_up_to_the_step_and_drops_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    recs = [{"event": "start", "step": 0}, {"event": "train", "step": 1}, {"event": "checkpoint", "step": 1},
            {"event": "train", "step": 2}, {"event": "stop", "step": 2}]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    path.write_text(text + "junk line\n" + '{"event": "tr')
    kept, dropped = engine.truncate_log(path, 1)
    assert kept == recs[:3] and dropped == 3  # steps 2, 2 and the torn line; "junk line" is not ours to judge
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in recs[:3]) + "junk line\n"
    before = path.stat().st_mtime_ns
    assert engine.truncate_log(path, 5) == (recs[:3], 0) and path.stat().st_mtime_ns == before  # not rewritten
    assert engine.truncate_log(tmp_path / "none.jsonl", 3) == ([], 0)


def test_stop_flag_takes_sigterm_and_ctrl_c_and_a_second_ctrl_c_quits():
    import os
    import signal

    with engine.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.signum, stop.reason) == (signal.SIGTERM, "signal")
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal being Ctrl-C: quit at once
    with engine.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert (stop.signum, stop.reason) == (signal.SIGINT, "interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_evaluation_gives_torch_its_thread_count_back(monkeypatch, tmp_path):
    # numba's OpenMP layer, started by the first kNN of a process, resets torch's thread count: a run
    # resumed past an evaluation would then reduce floats in another order than one that went through it
    import pandas as pd

    from treeprobe.training import evaluate as ev

    def knn_that_resets_threads(emb, items, k=10, chance=False):
        torch.set_num_threads(3)
        return {}

    monkeypatch.setattr(ev, "knn_metrics", knn_that_resets_threads)
    monkeypatch.setattr(ev, "embed_images", lambda *a, **kw: np.zeros((2, 4), np.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ev.evaluate(None, pd.DataFrame({"path": ["a", "b"]}), None, use_pipeline=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "--epochs must be >= 1; got 0"),
    (["--lr", "-0.1"], "--lr must be a finite number >= 0; got -0.1"),
    (["--wd", "inf"], "--wd must be a finite number >= 0; got inf"),
    (["--warmup", "-1"], "--warmup must be >= 0; got -1"),
    (["--save-every-steps", "-2"], "--save-every-steps must be >= 0; got -2"),
    (["--train-num-samples", "0"], "--train-num-samples must be >= 1; got 0"),
    (["--beta1", "-0.5"], "--beta1 must be in [0, 1); got -0.5"),
])
def test_options_the_loop_cannot_run_with_are_input_errors(argv, words, tmp_path, capsys):
    assert main(["--data", "synthetic", "--out", str(tmp_path / "o"), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"treeprobe: error: {words}\n"
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_the_old_bookkeeping_resumes_where_its_steps_say(tmp_path, capsys):
    # before the fix a Ctrl-C just after an epoch's last batch saved step_N.pt as (epoch e, position 0):
    # resuming it repeated the epoch. With the run's own options the step count decides.
    from treeprobe.training import checkpoint as ck

    run = ["--data", "synthetic", "--train-num-samples", "8", "--batch-size", "4", "--epochs", "2", "--warmup", "1",
           "--no-progress", "-q"]
    assert main([*run, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "old"
    assert main([*run, "--max-steps", "2", "--out", str(out)]) == 0  # epoch_1.pt: step 2, epoch 1, position 0
    old = ck.load_checkpoint(out / "checkpoints" / "epoch_1.pt")
    old.update(epoch=0, name="step_2.pt", sampler={"epoch": 0, "position": 0})
    ck.save_checkpoint(old, out / "checkpoints", "step_2.pt")
    (out / "checkpoints" / "epoch_1.pt").unlink()
    capsys.readouterr()
    assert main([*run, "--resume", "latest", "--out", str(out)]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("treeprobe: warning: ")]
    assert len(warned) == 1 and ("says epoch 0, position 0, but 2 steps of 2 per epoch end at epoch 1, "
                                 "position 0") in warned[0], warned
    a = ck.load_checkpoint(tmp_path / "ref" / "checkpoints" / "epoch_2.pt")
    b = ck.load_checkpoint(out / "checkpoints" / "epoch_2.pt")
    assert b["step"] == 4 and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
