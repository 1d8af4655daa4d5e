"""The training loop: open_clip model + ClipLoss, DDP under torchrun, exact resume.

Single process on CPU (``treeprobe train ...``) or one process per GPU under
``torchrun`` (``env://`` rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
NCCL on GPU, gloo on CPU). Every rank builds the same seeded model; DDP keeps
them in sync; rank 0 writes logs and checkpoints.

Reproducibility: ``--seed`` seeds torch/numpy/python identically on all ranks; the data
order and augmentations are functions of (seed, epoch, sample) (see
:mod:`treeprobe.training.data`); the text type of a ``mixed`` batch is a function of (seed,
step). On CPU two runs with the same options give bit-identical weights, and a run
stopped at step k then resumed gives the same weights as one run straight through.

open_clip's trainer (the ``open_clip_train`` package) provides the LR schedule
(``scheduler.cosine_lr``), the autocast context (``precision.get_autocast``), the seeding
(``main.random_seed``) and the reading of the distributed environment
(``distributed.world_info_from_env`` / ``init_distributed_device_so`` / ``is_master``); what
differs from it on purpose is kept here and says why (the gloo stop flag, exact resume;
atomic checkpoints and ``latest.json`` in :mod:`treeprobe.training.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from open_clip_train.distributed import init_distributed_device_so, is_master, world_info_from_env
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr

from treeprobe.errors import TreeprobeError
from treeprobe.training import checkpoint as ckpt_io
from treeprobe.training.text import TEXT_TYPE_CHOICES, TEXT_TYPES, text_type_for_step

log = logging.getLogger(__package__)

__all__ = [
    "RESUME_MUST_MATCH",
    "param_groups",
    "warmup_steps",
    "DistInfo",
    "init_distributed",
    "JsonlLogger",
    "StopFlag",
    "TrainState",
    "train",
]

#: Options that must equal the checkpoint's for a resumed run to match an uninterrupted one.
RESUME_MUST_MATCH = ("model", "batch_size", "epochs", "lr", "warmup", "text_type", "seed", "data",
                     "precision", "image_size", "limit")
#: open_clip's clamp of the learned temperature: logit scale at most 100.
MAX_LOGIT_SCALE = math.log(100)
#: A warmup not shorter than the run is cut to a tenth of the run.
WARMUP_CAP_DIVISOR = 10  # warmup = total // 10
#: Samples per epoch of ``--data synthetic`` without ``--train-num-samples``: this many global batches.
SYNTHETIC_BATCHES = 10
#: Precision when ``--precision`` is not given: bf16 autocast on GPU, fp32 on CPU.
DEFAULT_PRECISION = {"cuda": "amp_bf16"}
CHECKPOINT_DIR = "checkpoints"
GIB = 2**30
#: Parsed-argument entries of the command line itself, not options of the run (left out of args.json).
_CLI_ENTRIES = ("func", "command")


# ----------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on biases, norms (1-D), ``logit_scale`` etc."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def warmup_steps(requested: int, total: int) -> int:
    """Warmup steps for a run of ``total`` steps: ``requested``, or ``total // 10`` when it is not
    shorter than the run (open_clip's cosine schedule needs warmup < total)."""
    if requested < total:
        return requested
    warmup = max(0, total // WARMUP_CAP_DIVISOR)
    log.warning("--warmup %d >= total steps %d: using %d", requested, total, warmup)
    return warmup


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """This process's place in the run: ranks, world size, device, and the gloo control group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control_group: object = None  # a gloo group for CPU-side control messages (stop flag)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0, the one that logs and writes checkpoints."""
        return is_master(self)


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TreeprobeError(f"--device {device}: CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Read torchrun's environment; when WORLD_SIZE > 1 init the process group (``env://``; NCCL on
    GPU, gloo on CPU) through open_clip_train's ``init_distributed_device_so``.

    Kept apart from open_clip's ``init_distributed_device``: only torchrun's WORLD_SIZE makes a
    run distributed (open_clip also reads SLURM_NTASKS, so a plain run in an ``salloc`` shell
    with several tasks would wait for ranks that never come); an explicit ``--device cuda:N`` is
    kept under torchrun (two ranks may share one GPU over gloo); a gloo control group is added
    for the stop flag.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = world_info_from_env()[0] if distributed else 0  # LOCAL_RANK under torchrun
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not distributed:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        init_distributed_device_so(device=str(dev), dist_backend=backend, no_set_device_rank=True)
    # control messages go over gloo on CPU tensors, so agreeing on a stop needs no
    # device synchronisation in the step (an NCCL all-reduce + .item() would stall it)
    control = dist.new_group(backend="gloo")
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev,
                    control_group=control)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- logging
class JsonlLogger:
    """Append JSON lines to ``<out>/log.jsonl`` (rank 0 only; no-op elsewhere)."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path is not None else None

    def __call__(self, **rec):
        """Write one record (numpy floats become Python floats)."""
        if self.f is not None:
            rec = {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in rec.items()}
            self.f.write(json.dumps(rec) + "\n")

    def close(self):
        """Close the file."""
        if self.f is not None:
            self.f.close()


class StopFlag:
    """SIGTERM → finish the current step, save a checkpoint, exit (restores the handler)."""

    def __init__(self):
        self.signum = None
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


class _Stop(Exception):
    """Leave the loop after a saved stop (``reason``: ``signal`` or ``max_steps``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything one training run holds; ``step``/``epoch``/``position`` say where it is
    (global optimizer steps done, the current epoch, batches done in it)."""

    args: object
    di: DistInfo
    model: torch.nn.Module  # DDP-wrapped under torchrun
    model_name: str
    model_cfg: dict
    preprocess_val: Callable
    data: object  # TrainData
    optimizer: torch.optim.Optimizer
    scaler: object  # GradScaler or None
    loss_fn: Callable
    scheduler: Callable[[int], float]  # sets the LR of the step on the optimizer, returns it
    autocast: Callable  # () -> the precision's autocast context
    precision: str
    total_steps: int
    out: Path
    start_epoch: int = 0
    step: int = 0
    epoch: int = 0
    position: int = 0
    resumed_from: Path | None = None
    last_checkpoint: str | None = None
    eval_items: object = None
    logger: JsonlLogger = field(default_factory=lambda: JsonlLogger(None))
    bar: object = None
    t_log: float = 0.0
    n_log: int = 0

    @property
    def ckpt_dir(self) -> Path:
        """``<out>/checkpoints``."""
        return self.out / CHECKPOINT_DIR


def _configure_torch(args, di: DistInfo) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)  # restored by train() on return
    if di.device.type == "cuda":  # as open_clip's trainer: TF32 matmuls, cudnn autotuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # numpy's seed range (open_clip_train.main.random_seed seeds numpy with it)
        raise TreeprobeError(f"--seed must be in [0, 2**32); got {seed}")


def _create_model(args, di: DistInfo):
    """The run's model through treeprobe's one factory, drawn from the global RNG (seeded
    by the caller), plus its tokenizer."""
    import open_clip

    from treeprobe.models import create_model

    built = create_model(args.model, pretrained=args.pretrained, image_size=args.image_size, device=di.device,
                         cache_dir=args.cache_dir, seed=None, output_dict=True, pretrained_text=True,
                         hint="pass the local file: --pretrained /path/to/open_clip_pytorch_model.bin")
    if args.grad_checkpointing:
        built.model.set_grad_checkpointing(True)
        if type(getattr(built.model, "visual", None)).__name__ == "ModifiedResNet":
            log.warning("--grad-checkpointing: open_clip has none for ResNet image towers (%s); only the "
                        "text tower is checkpointed", built.name)
    return built, open_clip.get_tokenizer(built.name)


def _build_data(args, pre_train, di: DistInfo, tokenizer=None):
    """TrainData for ``args.data``; its batches carry token ids of the text types the run
    can draw (tokenized in the loader workers)."""
    from treeprobe.training.data import ShardData, SyntheticImages, build_map_data, detect_data_type, load_items

    text = dict(tokenize=tokenizer, text_types=TEXT_TYPES if args.text_type == "mixed" else (args.text_type,))
    common = dict(seed=args.seed, rank=di.rank, world_size=di.world_size, workers=args.workers, **text)
    dtype = args.data_type if args.data_type != "auto" else detect_data_type(args.data)
    if dtype == "synthetic":
        n = args.train_num_samples or SYNTHETIC_BATCHES * args.batch_size * di.world_size
        ds = SyntheticImages(n, pre_train, pre_train.transforms[0].size, seed=args.seed)
        return build_map_data(None, pre_train, args.batch_size, kind="synthetic", dataset=ds, **common)
    if dtype == "wds":
        return ShardData(args.data, pre_train, args.batch_size, num_samples=args.train_num_samples,
                         **common).train_data()
    items = load_items(args.data, dtype)
    if args.limit:
        items = items.iloc[: args.limit]
    return build_map_data(items, pre_train, args.batch_size, kind=dtype, **common)


def _new_state(args, di: DistInfo) -> TrainState:
    """Seed, build model, data, optimizer, loss and schedule (in this order: the RNG draws of
    the init depend on it)."""
    from open_clip.loss import ClipLoss
    from open_clip_train.main import random_seed  # imports open_clip's whole trainer: only here

    precision = args.precision or DEFAULT_PRECISION.get(di.device.type, "fp32")
    random_seed(args.seed)
    built, tokenizer = _create_model(args, di)
    data = _build_data(args, built.preprocess_train, di, tokenizer)
    total_steps = data.steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(param_groups(built.model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps)
    return TrainState(
        args=args, di=di, model=built.model, model_name=built.name, model_cfg=built.model_cfg,
        preprocess_val=built.preprocess_val, data=data, optimizer=optimizer,
        scaler=torch.amp.GradScaler(di.device.type) if precision == "amp" else None,
        loss_fn=ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                         rank=di.rank, world_size=di.world_size),
        scheduler=cosine_lr(optimizer, args.lr, warmup_steps(args.warmup, total_steps), total_steps),
        autocast=get_autocast(precision, device_type=di.device.type), precision=precision,
        total_steps=total_steps, out=Path(args.out))


# ----------------------------------------------------------------------------- resume
def _resolve_resume(args, ckpt_dir: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "latest":
        return ckpt_io.find_latest(ckpt_dir)
    p = Path(args.resume)
    if not p.is_file():
        raise TreeprobeError(f"--resume {args.resume}: no such checkpoint file")
    return p


def _resume(st: TrainState, path: Path | None) -> None:
    """Restore weights, optimizer, scaler, RNGs and the position from the checkpoint at ``path``."""
    args, main = st.args, st.di.main
    if args.resume and path is None and main:
        log.info("--resume latest: no checkpoint in %s, starting fresh", st.ckpt_dir)
    if path is None:
        return
    ck = ckpt_io.load_checkpoint(path, map_location="cpu")
    _unwrap(st.model).load_state_dict(ckpt_io.strip_module_prefix(ck["state_dict"]))
    if "optimizer" in ck and ck["optimizer"] is not None:
        st.optimizer.load_state_dict(ck["optimizer"])
    if st.scaler is not None and ck.get("scaler"):
        st.scaler.load_state_dict(ck["scaler"])
    st.start_epoch = int(ck.get("epoch", 0))
    st.step = int(ck.get("step", 0))
    st.position = int(ck.get("sampler", {}).get("position", 0))
    st.resumed_from = path
    if "rng" in ck:
        ckpt_io.set_rng_state(ck["rng"])
    old = ck.get("args", {})
    diff = {k: (old.get(k), getattr(args, k, None)) for k in RESUME_MUST_MATCH
            if k in old and old.get(k) != ckpt_io.plain(getattr(args, k, None))}
    if diff and main:
        log.warning("resuming with different options (the run will not match an uninterrupted one): %s", diff)
    if main:
        log.info("resumed from %s (epoch %d, step %d, position %d)", path, st.start_epoch, st.step, st.position)


# ----------------------------------------------------------------------------- outputs
def _plain_args(args) -> dict:
    """The run's options as plain types (for args.json and checkpoints)."""
    return ckpt_io.plain({k: v for k, v in vars(args).items() if k not in _CLI_ENTRIES})


def _open_outputs(st: TrainState) -> None:
    """Rank 0: args.json, skipped.csv, the ``start`` log line and the progress bar."""
    args, di, data = st.args, st.di, st.data
    if args.eval_data and di.main:
        from treeprobe.training.data import load_items, verify_images

        st.eval_items, _ = verify_images(load_items(args.eval_data))
    st.logger = JsonlLogger(st.out / "log.jsonl" if di.main else None)
    if di.main:
        from treeprobe._utils import atomic_write_text

        atomic_write_text(st.out / "args.json", json.dumps(_plain_args(args), indent=1) + "\n")
        if len(data.skipped):
            data.skipped.to_csv(st.out / "skipped.csv", index=False)
        st.logger(event="start", step=st.step, epoch=st.start_epoch, model_name=st.model_name,
                  text_type=args.text_type, world_size=di.world_size, device=str(di.device),
                  precision=st.precision, steps_per_epoch=data.steps_per_epoch, total_steps=st.total_steps,
                  num_samples=data.num_samples, n_skipped=len(data.skipped),
                  resumed_from=str(st.resumed_from) if st.resumed_from else None)
    if di.main and not args.no_progress:
        from tqdm import tqdm

        st.bar = tqdm(total=st.total_steps, initial=st.step, desc="train", dynamic_ncols=True, file=sys.stderr)


def _save(st: TrainState, name: str, epoch_done: int, pos: int) -> None:
    """Rank 0: write checkpoint ``name`` (``epoch_done`` epochs and ``pos`` batches of the next done)."""
    if not st.di.main:
        return
    net = _unwrap(st.model)
    ck = {
        "epoch": epoch_done, "step": st.step, "name": name,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": st.optimizer.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "model_name": st.model_name, "model_cfg": ckpt_io.plain(st.model_cfg),
        "preprocess_cfg": ckpt_io.plain(_preprocess_cfg(net)),
        "text_type": st.args.text_type, "args": _plain_args(st.args),
        "rng": ckpt_io.get_rng_state(),
        "sampler": {"epoch": epoch_done, "position": pos},
        "world_size": st.di.world_size,
    }
    path = ckpt_io.save_checkpoint(ck, st.ckpt_dir, name)
    st.last_checkpoint = str(path)
    st.logger(event="checkpoint", step=st.step, epoch=epoch_done, path=str(path))


def _preprocess_cfg(model) -> dict:
    """The model's preprocessing config (size, mean, std, interpolation, resize_mode)."""
    import open_clip

    try:
        return dict(open_clip.get_model_preprocess_cfg(model))
    except Exception:  # noqa: BLE001 - optional metadata
        return {}


def _evaluate(st: TrainState, epoch_done: int) -> None:
    """Tree agreement on ``--eval-data`` (rank 0), logged as ``event=eval``; all ranks wait."""
    if st.eval_items is not None:
        from treeprobe.training.evaluate import evaluate

        t0 = time.time()
        ac = torch.bfloat16 if st.precision == "amp_bf16" else None
        res = evaluate(_unwrap(st.model), st.eval_items, st.preprocess_val, device=st.di.device, seed=st.args.seed,
                       autocast_dtype=ac, use_pipeline=not st.args.eval_knn_only,
                       permutations=st.args.eval_permutations)
        st.logger(event="eval", step=st.step, epoch=epoch_done, seconds=round(time.time() - t0, 2), **res)
    if st.di.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- the loop
def _step(st: TrainState, images, texts_by_type):
    """One optimizer step on a batch → (loss tensor, lr, text type)."""
    ttype = text_type_for_step(st.args.text_type, st.step, st.args.seed)
    texts = texts_by_type[ttype].to(st.di.device, non_blocking=True)
    images = images.to(st.di.device, non_blocking=True)
    lr = st.scheduler(st.step)  # sets the LR of every param group
    st.optimizer.zero_grad(set_to_none=True)
    with st.autocast():
        out = st.model(images, texts)
        loss = st.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    clip = st.args.grad_clip_norm
    if st.scaler is not None:
        st.scaler.scale(loss).backward()
        if clip:
            st.scaler.unscale_(st.optimizer)
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), clip)
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), clip)
        st.optimizer.step()
    with torch.no_grad():
        _unwrap(st.model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    st.step += 1
    st.position += 1
    st.n_log += images.shape[0] * st.di.world_size
    return loss, lr, ttype


def _log_train(st: TrainState, loss, lr: float, ttype: str) -> None:
    # the loss is read (a device sync) only on logged steps
    loss_value = float(loss.item())
    if st.bar is not None:
        st.bar.set_postfix(loss=f"{loss_value:.4f}", epoch=st.epoch)
    dt = time.time() - st.t_log
    rec = dict(event="train", step=st.step, epoch=st.epoch, loss=loss_value, lr=lr,
               img_s=round(st.n_log / max(dt, 1e-9), 2), text_type=ttype,
               logit_scale=float(_unwrap(st.model).logit_scale.exp().item()))
    if st.di.device.type == "cuda":
        rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(st.di.device) / GIB, 3)
    st.logger(**rec)
    st.t_log, st.n_log = time.time(), 0


def _agree_stop(st: TrainState, want_stop: bool) -> bool:
    """Whether any rank got SIGTERM (a MAX all-reduce over the gloo control group)."""
    if not st.di.distributed:
        return want_stop
    flag = torch.tensor([1 if want_stop else 0], dtype=torch.int32)  # CPU tensor
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=st.di.control_group)
    return bool(flag.item() > 0)


def _after_step(st: TrainState, stop: StopFlag, loss, lr: float, ttype: str) -> None:
    """Progress, the train log line, a stop (SIGTERM on any rank, ``--max-steps``) and periodic checkpoints."""
    args = st.args
    if st.bar is not None:
        st.bar.update(1)
    if st.di.main and (st.step % args.log_every == 0 or st.step == st.total_steps):
        _log_train(st, loss, lr, ttype)
    want_stop = _agree_stop(st, stop.signum is not None)
    end_of_epoch = st.position >= st.data.steps_per_epoch
    if want_stop or (args.max_steps and st.step >= args.max_steps):
        if end_of_epoch:
            _save(st, f"epoch_{st.epoch + 1}.pt", st.epoch + 1, 0)
        else:
            _save(st, f"step_{st.step}.pt", st.epoch, st.position)
        if want_stop and st.di.main:
            st.logger(event="stop", step=st.step, epoch=st.epoch, reason="SIGTERM")
        raise _Stop("signal" if want_stop else "max_steps")
    every = args.save_every_steps
    if every and st.step % every == 0:
        if not end_of_epoch:
            _save(st, f"step_{st.step}.pt", st.epoch, st.position)
        if st.di.distributed:
            dist.barrier()


def _run_epoch(st: TrainState, stop: StopFlag) -> None:
    """The remaining batches of epoch ``st.epoch``, its checkpoint and (every ``--eval-every``) its evaluation."""
    epoch = st.epoch
    skip = st.position if epoch == st.start_epoch else 0
    st.position = skip
    for images, texts_by_type in st.data.batches(epoch, skip):
        loss, lr, ttype = _step(st, images, texts_by_type)
        _after_step(st, stop, loss, lr, ttype)
    st.position = 0
    _save(st, f"epoch_{epoch + 1}.pt", epoch + 1, 0)
    if st.di.distributed:
        dist.barrier()
    every = st.args.eval_every
    if every and ((epoch + 1) % every == 0 or epoch + 1 == st.args.epochs):
        _evaluate(st, epoch + 1)


def _run(st: TrainState) -> str:
    """Train from the state's position to the end → why it stopped (see :func:`train`)."""
    stopped = "done"
    if st.args.eval_every and st.step == 0:
        _evaluate(st, 0)  # agreement of the initial model, the baseline for the curve
    st.model.train()
    st.t_log, st.n_log = time.time(), 0
    st.epoch = st.start_epoch
    try:
        with StopFlag() as stop:
            for epoch in range(st.start_epoch, st.args.epochs):
                st.epoch = epoch
                _run_epoch(st, stop)
    except _Stop as s:
        stopped = s.reason
    except KeyboardInterrupt:
        stopped = "interrupt"
        _save(st, f"step_{st.step}.pt", st.epoch, st.position)
        if st.di.main:
            st.logger(event="stop", step=st.step, epoch=st.epoch, reason="KeyboardInterrupt")
    finally:
        if st.bar is not None:
            st.bar.close()
        st.logger.close()
    return stopped


def train(args) -> dict:
    """Run training as configured by the parsed ``args`` (the options of ``treeprobe train``).

    Returns a summary dict: ``step``, ``epoch``, ``stopped`` (``done`` | ``max_steps`` |
    ``signal`` | ``interrupt``), ``checkpoint`` (path of the last one written), ``out``,
    ``model_name``. The torch thread count (``--threads``) is restored on return, so in-process
    callers keep theirs.
    """
    threads = torch.get_num_threads()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> dict:
    if args.text_type not in TEXT_TYPE_CHOICES:
        raise TreeprobeError(f"--text-type must be one of {TEXT_TYPE_CHOICES}")
    _check_seed(args.seed)
    di = init_distributed(args.device, args.dist_backend)
    if not di.main:  # one voice: rank 0 logs, the others only report errors
        log.setLevel(logging.ERROR)
    if di.main:
        (Path(args.out) / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    _configure_torch(args, di)
    st = _new_state(args, di)
    _resume(st, _resolve_resume(args, st.ckpt_dir))
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        st.model = DDP(st.model, device_ids=[di.device.index] if di.device.type == "cuda" else None,
                       static_graph=args.ddp_static_graph)
    _open_outputs(st)
    stopped = _run(st)
    if di.distributed:
        dist.barrier()
    return {"step": st.step, "epoch": st.epoch, "stopped": stopped, "checkpoint": st.last_checkpoint,
            "out": str(st.out), "model_name": st.model_name}
