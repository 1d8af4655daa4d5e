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

Stopping and resuming: SIGTERM or Ctrl-C (SIGINT) finishes the current step, saves a checkpoint
of exactly that point (``step_N.pt`` mid-epoch, ``epoch_N.pt`` after an epoch's last batch) and
exits (143 / 130); a signal during a checkpoint write is held until the file is complete; a
second Ctrl-C quits at once, without a new checkpoint. ``--resume`` restores weights, optimizer,
scaler, schedule position, RNG states and the place in the epoch, runs an epoch-end evaluation
the stop left out, removes temporary files of an interrupted write and cuts ``log.jsonl`` back
to the resumed step, so the resumed run's checkpoints and log lines equal an uninterrupted
run's (timings aside). The data loaders draw nothing from the training RNG streams (see
:func:`_batches`), so those streams, and a model that draws from them (dropout), resume
exactly too.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from open_clip_train.distributed import init_distributed_device_so, is_master, world_info_from_env
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr

from treeprobe._validation import check_int
from treeprobe.errors import TreeprobeError, TreeprobeWarning
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
    "truncate_log",
    "train",
]

#: Options that must equal the checkpoint's for a resumed run to match an uninterrupted one.
RESUME_MUST_MATCH = ("model", "batch_size", "epochs", "lr", "warmup", "text_type", "seed", "data",
                     "precision", "image_size", "limit", "train_num_samples")
#: open_clip's clamp of the learned temperature: logit scale at most 100.
MAX_LOGIT_SCALE = math.log(100)
#: A warmup not shorter than the run is cut to a tenth of the run.
WARMUP_CAP_DIVISOR = 10  # warmup = total // 10
#: Samples per epoch of ``--data synthetic`` without ``--train-num-samples``: this many global batches.
SYNTHETIC_BATCHES = 10
#: Precision when ``--precision`` is not given: bf16 autocast on GPU, fp32 on CPU.
DEFAULT_PRECISION = {"cuda": "amp_bf16"}
CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.jsonl"
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


def truncate_log(path: Path, step: int) -> tuple[list[dict], int]:
    """Cut the JSONL log at ``path`` back to global step ``step``: records with a larger ``step``
    and a torn last line (a write cut short) go → (the records kept, lines dropped).

    Lines that are not JSON records are kept as they are. The file is rewritten (atomically)
    only when something is dropped.
    """
    if not path.is_file():
        return [], 0
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept_lines, kept, dropped = [], [], 0
    for i, line in enumerate([*lines, tail] if tail.strip() else lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):  # the unterminated last line: torn
                dropped += 1
            elif line.strip():
                kept_lines.append(line)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
            continue
        kept_lines.append(line)
        kept.append(rec)
    if dropped:
        from treeprobe._utils import atomic_write

        data = b"".join(line + b"\n" for line in kept_lines)
        atomic_write(path, lambda f: f.write(data))
    return kept, dropped


class StopFlag:
    """SIGTERM or Ctrl-C (SIGINT) → ``signum`` is set: the loop finishes the step, saves a
    checkpoint and exits. A second Ctrl-C raises KeyboardInterrupt (quit now, no new checkpoint).
    Restores the previous handlers on exit; catches nothing outside the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                break
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint%s", signal.Signals(signum).name,
                    " (Ctrl-C again quits at once, without one)" if signum == signal.SIGINT else "")

    @property
    def reason(self) -> str:
        """Why the run stops: ``interrupt`` (SIGINT) or ``signal`` (SIGTERM)."""
        return "interrupt" if self.signum == signal.SIGINT else "signal"

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)
        self._old = {}
        return False


class _Stop(Exception):
    """Leave the loop after a saved stop (``reason``: ``signal``, ``interrupt`` or ``max_steps``)."""

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
    eval_pending: bool = False  # rank 0: the evaluation due at the resumed epoch boundary is not in the log
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


#: Integer options → their least valid value (None: the option may be left out).
_INT_MINIMUMS = {"epochs": 1, "batch_size": 1, "log_every": 1, "warmup": 0, "max_steps": 0, "save_every_steps": 0,
                 "eval_every": 0, "limit": 0, "workers": 0, "threads": 0, "train_num_samples": 1,
                 "eval_permutations": 0}
#: Float options that must be finite and not negative (None: left out).
_NON_NEGATIVE = ("lr", "wd", "eps", "grad_clip_norm")


def _check_options(args) -> None:
    """One-line errors for option values the loop cannot run with (--epochs 0, a negative --lr, ...)."""
    if args.text_type not in TEXT_TYPE_CHOICES:
        raise TreeprobeError(f"--text-type must be one of {TEXT_TYPE_CHOICES}")
    _check_seed(args.seed)
    for name, minimum in _INT_MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None:
            check_int(value, "--" + name.replace("_", "-"), minimum=minimum)
    for name in _NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise TreeprobeError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {value}")
    for name in ("beta1", "beta2"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise TreeprobeError(f"--{name} must be in [0, 1); got {value}")
    if args.eval_every and not args.eval_data:
        warnings.warn(f"--eval-every {args.eval_every} without --eval-data: nothing is evaluated", TreeprobeWarning,
                      stacklevel=3)


def _check_out(args) -> None:
    """A fresh run (no --resume) must not write into the folder of another run: its log would
    gain a second history and its checkpoints be overwritten one by one (open_clip's trainer
    refuses too)."""
    if args.resume:
        return
    out = Path(args.out)
    log_file, ckpts = out / LOG_NAME, sorted((out / CHECKPOINT_DIR).glob("*.pt"))
    has_log = log_file.is_file() and log_file.stat().st_size > 0
    if has_log or ckpts:
        what = ", ".join(([LOG_NAME] if has_log else []) + ([f"{len(ckpts)} checkpoint(s)"] if ckpts else []))
        raise TreeprobeError(f"--out {out} already holds a training run ({what}); continue it with --resume latest, "
                             f"or pass a new --out (or delete that folder)")


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
    """Restore weights, optimizer, scaler, RNGs and the position (epoch, batches done in it) from
    the checkpoint at ``path``; one-line errors for a file that is no training checkpoint or is
    of another architecture."""
    args, main = st.args, st.di.main
    if args.resume and path is None and main:
        log.info("--resume latest: no checkpoint in %s, starting fresh", st.ckpt_dir)
    if path is None:
        return
    ck = ckpt_io.load_checkpoint(path, map_location="cpu")
    if not (isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict) and "step" in ck):
        raise TreeprobeError(f"--resume {path}: not a checkpoint written by treeprobe train (no state_dict and "
                             f"step); to start from its weights pass --pretrained {path}")
    ck_name = ck.get("model_name")
    if ck_name and ck_name != st.model_name:
        ck_model = ck.get("args", {}).get("model", ck_name) if isinstance(ck.get("args"), dict) else ck_name
        raise TreeprobeError(f"--resume {path}: the checkpoint is of model {ck_name}, this run builds "
                             f"{st.model_name}; pass --model {ck_model}, or a new --out to train {args.model}")
    net = _unwrap(st.model)
    sd = ckpt_io.strip_module_prefix(ck["state_dict"])
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        from treeprobe.models import _mismatch_error

        raise _mismatch_error(str(path), st.model_name, net, sd, cause=e) from None
    if ck.get("optimizer") is not None:
        try:
            st.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise TreeprobeError(f"--resume {path}: its optimizer state does not fit this model: {e}") from None
    elif main:
        warnings.warn(f"--resume {path}: the checkpoint has no optimizer state (a weights-only export?); AdamW "
                      f"starts afresh, so the run will not match an uninterrupted one", TreeprobeWarning,
                      stacklevel=2)
    if st.scaler is not None and ck.get("scaler"):
        st.scaler.load_state_dict(ck["scaler"])
    st.step = int(ck["step"])
    epoch, position = int(ck.get("epoch", 0)), int(ck.get("sampler", {}).get("position", 0))
    st.resumed_from = path
    if "rng" in ck:
        ckpt_io.set_rng_state(ck["rng"])
    old = ck.get("args", {})
    diff = {k: (old.get(k), getattr(args, k, None)) for k in RESUME_MUST_MATCH
            if k in old and old.get(k) != ckpt_io.plain(getattr(args, k, None))}
    if diff and main:
        log.warning("resuming with different options (the run will not match an uninterrupted one): %s", diff)
    same_run = not diff and ck.get("world_size", 1) == st.di.world_size
    st.start_epoch, st.position = _resume_position(st, path, epoch, position, same_run, warn="sampler" in ck)
    st.epoch = st.start_epoch
    if main:
        log.info("resumed from %s (epoch %d, step %d, position %d)", path, st.epoch, st.step, st.position)


def _resume_position(st: TrainState, path: Path, epoch: int, position: int, same_run: bool,
                     warn: bool) -> tuple[int, int]:
    """(epoch, position) to resume at. With the run's own options the step count decides:
    ``divmod(step, steps_per_epoch)`` (an older treeprobe saved a stop after an epoch's last
    batch as that epoch's start, and a position at the epoch's end as not yet past it; a
    weights-only export has no position). ``warn``: say so when the stored position disagrees."""
    if not same_run:
        return epoch, position
    spe = st.data.steps_per_epoch
    fixed = divmod(st.step, spe)
    if warn and epoch * spe + position != st.step and st.di.main:
        warnings.warn(f"--resume {path}: the checkpoint says epoch {epoch}, position {position}, but {st.step} steps "
                      f"of {spe} per epoch end at epoch {fixed[0]}, position {fixed[1]} (saved by an older "
                      f"treeprobe); resuming there", TreeprobeWarning, stacklevel=3)
    return fixed


# ----------------------------------------------------------------------------- outputs
def _plain_args(args) -> dict:
    """The run's options as plain types (for args.json and checkpoints)."""
    return ckpt_io.plain({k: v for k, v in vars(args).items() if k not in _CLI_ENTRIES})


def _eval_due(args, epochs_done: int) -> bool:
    """Whether the evaluation runs after ``epochs_done`` epochs: at the start (0), every
    ``--eval-every`` epochs and after the last one."""
    every = args.eval_every
    return bool(every and args.eval_data) and (epochs_done % every == 0 or epochs_done == args.epochs)


def _clean_out(st: TrainState) -> None:
    """Rank 0, before anything is written: remove the temporary files of an interrupted write and
    cut ``log.jsonl`` back to the step the run starts from (0 unless resumed), so its lines are
    an uninterrupted run's; note whether the evaluation due at that point is still to run."""
    stale = ckpt_io.remove_stale_tmp(st.ckpt_dir) + ckpt_io.remove_stale_tmp(st.out, names=("args.json", LOG_NAME))
    if stale:
        warnings.warn(f"removed {len(stale)} temporary file(s) of an interrupted write in {st.out} "
                      f"({', '.join(p.name for p in stale[:3])}{', ...' if len(stale) > 3 else ''})",
                      TreeprobeWarning, stacklevel=3)
    kept, dropped = truncate_log(st.out / LOG_NAME, st.step)
    if dropped:
        since = "the checkpoint resumed from" if st.resumed_from else "no checkpoint to resume from"
        warnings.warn(f"{st.out / LOG_NAME}: dropped {dropped} line(s) logged after step {st.step} ({since}); "
                      f"the run logs those steps again", TreeprobeWarning, stacklevel=3)
    logged = any(r.get("event") == "eval" and r.get("step") == st.step for r in kept)
    st.eval_pending = st.position == 0 and _eval_due(st.args, st.epoch) and not logged


def _open_outputs(st: TrainState) -> None:
    """Rank 0: clean the folder (:func:`_clean_out`), args.json, skipped.csv, the ``start`` log line
    and the progress bar."""
    args, di, data = st.args, st.di, st.data
    if args.eval_data and di.main:
        from treeprobe.training.data import load_items, verify_images

        st.eval_items, _ = verify_images(load_items(args.eval_data))
    if di.main:
        _clean_out(st)
    st.logger = JsonlLogger(st.out / LOG_NAME if di.main else None)
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


def _save(st: TrainState, name: str) -> None:
    """Rank 0: write checkpoint ``name`` of the state as it is: ``st.step`` steps, ``st.epoch``
    epochs and ``st.position`` batches of the next one done."""
    if not st.di.main:
        return
    net = _unwrap(st.model)
    ck = {
        "epoch": st.epoch, "step": st.step, "name": name,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": st.optimizer.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "model_name": st.model_name, "model_cfg": ckpt_io.plain(st.model_cfg),
        "preprocess_cfg": ckpt_io.plain(_preprocess_cfg(net)),
        "text_type": st.args.text_type, "args": _plain_args(st.args),
        "rng": ckpt_io.get_rng_state(),
        "sampler": {"epoch": st.epoch, "position": st.position},
        "world_size": st.di.world_size,
    }
    with ckpt_io.deferred_signals():  # the checkpoint and its log line, or neither
        path = ckpt_io.save_checkpoint(ck, st.ckpt_dir, name)
        st.last_checkpoint = str(path)
        st.logger(event="checkpoint", step=st.step, epoch=st.epoch, path=str(path))


def _preprocess_cfg(model) -> dict:
    """The model's preprocessing config (size, mean, std, interpolation, resize_mode)."""
    import open_clip

    try:
        return dict(open_clip.get_model_preprocess_cfg(model))
    except Exception:  # noqa: BLE001 - optional metadata
        return {}


def _evaluate(st: TrainState) -> None:
    """Tree agreement on ``--eval-data`` (rank 0) after ``st.epoch`` epochs, logged as ``event=eval``;
    all ranks wait."""
    if st.eval_items is not None:
        from treeprobe.training.evaluate import evaluate

        t0 = time.time()
        ac = torch.bfloat16 if st.precision == "amp_bf16" else None
        res = evaluate(_unwrap(st.model), st.eval_items, st.preprocess_val, device=st.di.device, seed=st.args.seed,
                       autocast_dtype=ac, use_pipeline=not st.args.eval_knn_only,
                       permutations=st.args.eval_permutations)
        st.logger(event="eval", step=st.step, epoch=st.epoch, seconds=round(time.time() - t0, 2), **res)
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


def _any_rank(st: TrainState, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a MAX all-reduce over the gloo control group)."""
    if not st.di.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)  # CPU tensor
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=st.di.control_group)
    return bool(t.item() > 0)


def _maybe_stop(st: TrainState, stop: StopFlag, save: str | None = None, *, limit: bool = True) -> None:
    """Leave the loop (raise :class:`_Stop`) when any rank got SIGTERM/SIGINT or, with ``limit``,
    ``--max-steps`` is reached, after writing checkpoint ``save`` (None: this point is saved already)."""
    want = _any_rank(st, stop.signum is not None)
    at_limit = limit and bool(st.args.max_steps) and st.step >= st.args.max_steps
    if not (want or at_limit):
        return
    if save:
        _save(st, save)
    if not want:
        raise _Stop("max_steps")
    if st.di.main:  # another rank's signal is a SIGTERM from the scheduler, as a rule
        name = signal.Signals(stop.signum).name if stop.signum is not None else "SIGTERM"
        st.logger(event="stop", step=st.step, epoch=st.epoch, reason=name)
    raise _Stop(stop.reason if stop.signum is not None else "signal")


def _after_step(st: TrainState, stop: StopFlag, loss, lr: float, ttype: str) -> None:
    """Progress, the train log line; mid-epoch, the periodic checkpoint and a stop (a signal on
    any rank, ``--max-steps``). After an epoch's last batch :func:`_end_epoch` saves and stops."""
    args = st.args
    if st.bar is not None:
        st.bar.update(1)
    if st.di.main and (st.step % args.log_every == 0 or st.step == st.total_steps):
        _log_train(st, loss, lr, ttype)
    if st.position >= st.data.steps_per_epoch:
        return
    name = f"step_{st.step}.pt"
    if args.save_every_steps and st.step % args.save_every_steps == 0:
        _save(st, name)
        name = None
        if st.di.distributed:
            dist.barrier()
    _maybe_stop(st, stop, name)


def _batches(st: TrainState, epoch: int, skip: int):
    """The batches of ``epoch`` after the first ``skip``, fetched without touching the training RNG
    streams: a DataLoader draws its workers' base seed from torch's global generator when an
    iterator starts, at a point of the stream a resumed epoch would not share."""
    from treeprobe.training.evaluate import preserved_rng

    with preserved_rng(cuda=False):
        it = iter(st.data.batches(epoch, skip))
    while True:
        with preserved_rng(cuda=False):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def _end_epoch(st: TrainState, stop: StopFlag) -> None:
    """After an epoch's last batch: count it done, save ``epoch_N.pt``, then stop on a signal (the
    evaluation is left to the resume), evaluate when due, and stop at ``--max-steps``."""
    st.epoch, st.position = st.epoch + 1, 0  # first: any checkpoint from here on is of the finished epoch
    _save(st, f"epoch_{st.epoch}.pt")
    if st.di.distributed:
        dist.barrier()
    _maybe_stop(st, stop, limit=False)
    if _eval_due(st.args, st.epoch):
        _evaluate(st)
    if st.epoch < st.args.epochs:  # a signal during the run's last evaluation: the run is complete
        _maybe_stop(st, stop)


def _run_epoch(st: TrainState, stop: StopFlag) -> None:
    """The remaining batches of epoch ``st.epoch`` (``st.position`` are done), then :func:`_end_epoch`."""
    for images, texts_by_type in _batches(st, st.epoch, st.position):
        loss, lr, ttype = _step(st, images, texts_by_type)
        _after_step(st, stop, loss, lr, ttype)
    _end_epoch(st, stop)


def _run(st: TrainState) -> str:
    """Train from the state's position to the end → why it stopped (see :func:`train`).

    A second Ctrl-C (KeyboardInterrupt) is logged and re-raised: the state may be mid-step, so
    no checkpoint is written; the last one stays the resume point."""
    stopped = "done"
    try:
        with StopFlag() as stop:
            try:
                if _any_rank(st, st.eval_pending):  # the start, or the epoch boundary a stop left unevaluated
                    _evaluate(st)
                    _maybe_stop(st, stop, limit=False)
                st.model.train()
                st.t_log, st.n_log = time.time(), 0
                while st.epoch < st.args.epochs:
                    _run_epoch(st, stop)
            except _Stop as s:
                stopped = s.reason
    except KeyboardInterrupt:
        if st.di.main:
            st.logger(event="stop", step=st.step, epoch=st.epoch, reason="KeyboardInterrupt")
        raise
    finally:
        if st.bar is not None:
            st.bar.close()
        st.logger.close()
    return stopped


def train(args) -> dict:
    """Run training as configured by the parsed ``args`` (the options of ``treeprobe train``).

    Returns a summary dict: ``step``, ``epoch``, ``stopped`` (``done`` | ``max_steps`` |
    ``signal`` (SIGTERM) | ``interrupt`` (Ctrl-C); each stop saves a checkpoint of that point),
    ``checkpoint`` (path of the last one written), ``out``, ``model_name``. A second Ctrl-C
    raises KeyboardInterrupt without a new checkpoint. The torch thread count (``--threads``)
    is restored on return, so in-process callers keep theirs.
    """
    threads = torch.get_num_threads()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> dict:
    _check_options(args)
    _check_out(args)
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
