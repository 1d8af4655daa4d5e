"""The training loop: open_clip model + ClipLoss, DDP under torchrun, exact resume.

Single process on CPU (``treeprobe-train ...``) or one process per GPU under
``torchrun`` (``env://`` rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
NCCL on GPU, gloo on CPU). Every rank builds the same seeded model; DDP keeps
them in sync; rank 0 writes logs and checkpoints.

Reproducibility: ``--seed`` seeds torch/numpy/python identically on all ranks; the data
order and augmentations are functions of (seed, epoch, sample) (see
:mod:`training.data`); the text type of a ``mixed`` batch is a function of (seed,
step). On CPU two runs with the same options give bit-identical weights, and a run
stopped at step k then resumed gives the same weights as one run straight through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training import checkpoint as ckpt_io
from training.text import TEXT_TYPE_CHOICES, text_type_for_step

log = logging.getLogger("training")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_ALIASES = {"tiny": "treeprobe-tiny"}

__all__ = [
    "TrainError",
    "register_configs",
    "resolve_model_name",
    "create_model",
    "param_groups",
    "cosine_lr",
    "DistInfo",
    "init_distributed",
    "train",
]


class TrainError(RuntimeError):
    """A problem the user can fix (bad option, missing data, no network for weights)."""


# ----------------------------------------------------------------------------- model
def register_configs() -> None:
    """Add ``training/configs/*.json`` (e.g. ``treeprobe-tiny``) to open_clip's registry."""
    import open_clip

    if "treeprobe-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def resolve_model_name(model: str) -> str:
    """open_clip architecture name for ``--model``: aliases (``tiny``), a path to a config
    JSON (registered under its file stem), or any open_clip name / ``hf-hub:`` id."""
    import open_clip

    register_configs()
    model = MODEL_ALIASES.get(model, model)
    if model.endswith(".json") and Path(model).is_file():
        open_clip.add_model_config(Path(model))
        return Path(model).stem
    return model


def _first_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split()).split("; pass a local file")[0]
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _FactoryFilter(logging.Filter):
    def filter(self, record):  # open_clip's factory logs "initialized randomly" etc. on the root logger
        return not record.pathname.replace("\\", "/").endswith("open_clip/factory.py")


@contextlib.contextmanager
def _quiet_factory():
    flt = _FactoryFilter()
    logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def create_model(model: str, pretrained: str | None = None, device="cpu", image_size: int | None = None,
                 cache_dir: str | None = None):
    """``(model, preprocess_train, preprocess_val, tokenizer, model_name, model_cfg)``.

    Built with :func:`open_clip.create_model_and_transforms` in fp32 (mixed precision is
    autocast in the loop). ``pretrained``: an open_clip tag (e.g. ``openai``, downloaded
    from the hub) or a local file (open_clip / OpenAI / treeprobe checkpoint). Offline
    downloads fail with a :class:`TrainError` that says how to pass a local file.
    """
    import open_clip

    name = resolve_model_name(model)
    model_cfg = open_clip.get_model_config(name) if not name.startswith("hf-hub:") else None
    if model_cfg is None and not name.startswith(("hf-hub:", "local-dir:")):
        raise TrainError(f"unknown model {model!r}: not 'tiny', a config .json, nor an open_clip "
                         f"architecture (see open_clip.list_models())")
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise TrainError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {name} "
                         f"(tags: {tags or 'none'})")
    guard = contextlib.nullcontext()
    if (pretrained and not os.path.isfile(pretrained)) or name.startswith("hf-hub:"):
        try:  # treeprobe's hub guard: probe the hub once, fail at once when offline
            from treeprobe.models import hub_guard

            guard = hub_guard(f"{name} / {pretrained}")
        except ImportError:
            pass
    try:
        with guard, _quiet_factory():
            model_obj, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, precision="fp32", device=device,
                force_image_size=image_size, cache_dir=cache_dir, output_dict=True)
    except Exception as e:
        if type(e).__name__ not in ("RuntimeError", "TreeprobeError"):
            raise
        if pretrained and not os.path.isfile(pretrained) or name.startswith("hf-hub:"):
            raise TrainError(
                f"could not fetch weights for {name} / {pretrained} ({_first_line(e)}). "
                f"Without network access, download the open_clip weights elsewhere and pass the "
                f"local file: --pretrained /path/to/open_clip_pytorch_model.bin") from e
        raise
    if model_cfg is None:  # hf-hub: the config was fetched with the weights
        model_cfg = open_clip.get_model_config(name)
    model_cfg = dict(model_cfg or {})
    if image_size is not None and "vision_cfg" in model_cfg:
        model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "image_size": image_size}
    tokenizer = open_clip.get_tokenizer(name)
    return model_obj, pre_train, pre_val, tokenizer, name, model_cfg


def open_clip_preprocess_cfg(model) -> dict:
    """The model's preprocessing config (size, mean, std, interpolation, resize_mode)."""
    import open_clip

    try:
        return dict(open_clip.get_model_preprocess_cfg(model))
    except Exception:  # noqa: BLE001 - optional metadata
        return {}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on biases, norms (1-D), ``logit_scale`` etc."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def cosine_lr(base_lr: float, warmup: int, total: int):
    """open_clip's schedule: linear warmup to ``base_lr`` over ``warmup`` steps, then
    half-cosine to 0 at ``total``. Returns ``f(step) -> lr``."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / warmup
        e, es = step - warmup, max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr

    return lr_at


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control_group: object = None  # a gloo group for CPU-side control messages (stop flag)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Read torchrun's env vars; init the process group (``env://``) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    control = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                    init_method="env://", rank=rank, world_size=world)
        # control messages go over gloo on CPU tensors, so agreeing on a stop needs no
        # device synchronisation in the step (an NCCL all-reduce + .item() would stall it)
        control = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, control_group=control)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- logging
class JsonlLogger:
    """Append JSON lines to ``<out>/log.jsonl`` (rank 0 only; no-op elsewhere)."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path is not None else None

    def __call__(self, **rec):
        if self.f is not None:
            rec = {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in rec.items()}
            self.f.write(json.dumps(rec) + "\n")

    def close(self):
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


# ----------------------------------------------------------------------------- training
def _autocast(precision: str, device: torch.device):
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "amp":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _build_data(args, pre_train, di: DistInfo, tokenizer=None):
    """TrainData for ``args.data``; its batches carry token ids of the text types the run
    can draw (tokenized in the loader workers)."""
    from training.data import ShardData, build_map_data, detect_data_type, load_items
    from training.text import TEXT_TYPES

    text = dict(tokenize=tokenizer, text_types=TEXT_TYPES if args.text_type == "mixed" else (args.text_type,))
    dtype = args.data_type if args.data_type != "auto" else detect_data_type(args.data)
    if dtype == "synthetic":
        from training.data import SyntheticImages

        size = pre_train.transforms[0].size
        ds = SyntheticImages(args.train_num_samples or 10 * args.batch_size * di.world_size, pre_train, size,
                             seed=args.seed)
        return build_map_data(None, pre_train, args.batch_size, args.seed, rank=di.rank, world_size=di.world_size,
                              workers=args.workers, kind="synthetic", dataset=ds, **text)
    if dtype == "wds":
        return ShardData(args.data, pre_train, args.batch_size, args.seed, num_samples=args.train_num_samples,
                         rank=di.rank, world_size=di.world_size, workers=args.workers, **text).train_data()
    items = load_items(args.data, dtype)
    if args.limit:
        items = items.iloc[: args.limit]
    return build_map_data(items, pre_train, args.batch_size, args.seed, rank=di.rank,
                          world_size=di.world_size, workers=args.workers, kind=dtype, **text)


RESUME_MUST_MATCH = ("model", "batch_size", "epochs", "lr", "warmup", "text_type", "seed", "data",
                     "precision", "image_size", "limit")


def _resolve_resume(args, ckpt_dir: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "latest":
        return ckpt_io.find_latest(ckpt_dir)
    p = Path(args.resume)
    if not p.is_file():
        raise TrainError(f"--resume {args.resume}: no such checkpoint file")
    return p


def train(args) -> dict:
    """Run training as configured by the parsed ``args`` (see :mod:`training.cli`).

    Returns a summary dict: ``step``, ``epoch``, ``stopped`` (``done`` | ``max_steps`` |
    ``signal`` | ``interrupt``), ``checkpoint`` (path of the last one written), ``out``.
    The torch thread count (``--threads``) is restored on return, so in-process callers
    keep theirs.
    """
    threads = torch.get_num_threads()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> dict:
    """Run training as configured by the parsed ``args`` (see :mod:`training.cli`).

    Returns a summary dict: ``step``, ``epoch``, ``stopped`` (``done`` | ``max_steps`` |
    ``signal`` | ``interrupt``), ``checkpoint`` (path of the last one written), ``out``.
    """
    if args.text_type not in TEXT_TYPE_CHOICES:
        raise TrainError(f"--text-type must be one of {TEXT_TYPE_CHOICES}")
    di = init_distributed(args.device, args.dist_backend)
    if not di.main:  # one voice: rank 0 logs, the others only report errors
        log.setLevel(logging.ERROR)
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if di.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)  # restored by train() on return
    if di.device.type == "cuda":  # as open_clip's trainer: TF32 matmuls, cudnn autotuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    precision = args.precision or ("amp_bf16" if di.device.type == "cuda" else "fp32")

    seed_everything(args.seed)
    model, pre_train, pre_val, tokenizer, model_name, model_cfg = create_model(
        args.model, args.pretrained, device=di.device, image_size=args.image_size, cache_dir=args.cache_dir)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
        if type(getattr(model, "visual", None)).__name__ == "ModifiedResNet":
            log.warning("--grad-checkpointing: open_clip has none for ResNet image towers (%s); only the "
                        "text tower is checkpointed", model_name)
    data = _build_data(args, pre_train, di, tokenizer)
    total_steps = data.steps_per_epoch * args.epochs
    warmup = args.warmup
    if warmup >= total_steps:
        warmup = max(0, total_steps // 10)
        log.warning("--warmup %d >= total steps %d: using %d", args.warmup, total_steps, warmup)
    lr_at = cosine_lr(args.lr, warmup, total_steps)

    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2),
                                  eps=args.eps)
    scaler = torch.amp.GradScaler(di.device.type) if precision == "amp" else None

    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                       rank=di.rank, world_size=di.world_size)

    # ---- resume
    start_epoch, step, position = 0, 0, 0
    resume_path = _resolve_resume(args, ckpt_dir)
    if args.resume and resume_path is None and di.main:
        log.info("--resume latest: no checkpoint in %s, starting fresh", ckpt_dir)
    if resume_path is not None:
        ck = ckpt_io.load_checkpoint(resume_path, map_location="cpu")
        _unwrap(model).load_state_dict(ckpt_io.strip_module_prefix(ck["state_dict"]))
        if "optimizer" in ck and ck["optimizer"] is not None:
            optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch = int(ck.get("epoch", 0))
        step = int(ck.get("step", 0))
        position = int(ck.get("sampler", {}).get("position", 0))
        if "rng" in ck:
            ckpt_io.set_rng_state(ck["rng"])
        old = ck.get("args", {})
        diff = {k: (old.get(k), getattr(args, k, None)) for k in RESUME_MUST_MATCH
                if k in old and old.get(k) != ckpt_io.plain(getattr(args, k, None))}
        if diff and di.main:
            log.warning("resuming with different options (the run will not match an uninterrupted one): %s", diff)
        if di.main:
            log.info("resumed from %s (epoch %d, step %d, position %d)", resume_path, start_epoch, step, position)

    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[di.device.index] if di.device.type == "cuda" else None,
                    static_graph=args.ddp_static_graph)

    eval_items = None
    if args.eval_data and di.main:
        from training.data import load_items, verify_images

        eval_items, _ = verify_images(load_items(args.eval_data))

    logger = JsonlLogger(out / "log.jsonl" if di.main else None)
    plain_args = ckpt_io.plain(vars(args))
    if di.main:
        ckpt_io.atomic_write_text(json.dumps(plain_args, indent=1) + "\n", out / "args.json")
        if len(data.skipped):
            data.skipped.to_csv(out / "skipped.csv", index=False)
        logger(event="start", step=step, epoch=start_epoch, model_name=model_name, text_type=args.text_type,
               world_size=di.world_size, device=str(di.device), precision=precision,
               steps_per_epoch=data.steps_per_epoch, total_steps=total_steps, num_samples=data.num_samples,
               n_skipped=len(data.skipped), resumed_from=str(resume_path) if resume_path else None)

    last_ckpt = {"path": None}

    def save(name: str, epoch_done: int, pos: int):
        if not di.main:
            return
        ck = {
            "epoch": epoch_done, "step": step, "name": name,
            "state_dict": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "model_name": model_name, "model_cfg": ckpt_io.plain(model_cfg),
            "preprocess_cfg": ckpt_io.plain(open_clip_preprocess_cfg(_unwrap(model))),
            "text_type": args.text_type, "args": plain_args,
            "rng": ckpt_io.get_rng_state(),
            "sampler": {"epoch": epoch_done, "position": pos},
            "world_size": di.world_size,
        }
        path = ckpt_io.save_checkpoint(ck, ckpt_dir, name)
        last_ckpt["path"] = str(path)
        logger(event="checkpoint", step=step, epoch=epoch_done, path=str(path))

    def run_eval(epoch_done: int):
        if eval_items is not None:
            from training.evaluate import evaluate

            t0 = time.time()
            ac = torch.bfloat16 if precision == "amp_bf16" else None
            res = evaluate(_unwrap(model), eval_items, pre_val, di.device, seed=args.seed, autocast_dtype=ac,
                           use_pipeline=not args.eval_knn_only, permutations=args.eval_permutations)
            logger(event="eval", step=step, epoch=epoch_done, seconds=round(time.time() - t0, 2), **res)
        if di.distributed:
            dist.barrier()

    bar = None
    if di.main and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)

    stopped = "done"
    if args.eval_every and step == 0:
        run_eval(0)  # agreement of the initial model, the baseline for the curve
    model.train()
    t_log, n_log = time.time(), 0
    epoch = start_epoch
    try:
        with StopFlag() as stop:
            for epoch in range(start_epoch, args.epochs):
                skip = position if epoch == start_epoch else 0
                position = skip
                for images, texts_by_type in data.batches(epoch, skip):
                    ttype = text_type_for_step(args.text_type, step, args.seed)
                    texts = texts_by_type[ttype].to(di.device, non_blocking=True)
                    images = images.to(di.device, non_blocking=True)
                    lr = lr_at(step)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(precision, di.device):
                        outd = model(images, texts)
                        loss = loss_fn(outd["image_features"], outd["text_features"], outd["logit_scale"])
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        if args.grad_clip_norm:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        if args.grad_clip_norm:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
                        optimizer.step()
                    with torch.no_grad():
                        _unwrap(model).logit_scale.clamp_(0, math.log(100))
                    step += 1
                    position += 1
                    n_log += images.shape[0] * di.world_size
                    if bar is not None:
                        bar.update(1)
                    # the loss is read (a device sync) only on logged steps
                    if di.main and (step % args.log_every == 0 or step == total_steps):
                        loss_value = float(loss.item())
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
                        dt = time.time() - t_log
                        rec = dict(event="train", step=step, epoch=epoch, loss=loss_value, lr=lr,
                                   img_s=round(n_log / max(dt, 1e-9), 2), text_type=ttype,
                                   logit_scale=float(_unwrap(model).logit_scale.exp().item()))
                        if di.device.type == "cuda":
                            rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(di.device) / 2**30, 3)
                        logger(**rec)
                        t_log, n_log = time.time(), 0
                    want_stop = stop.signum is not None
                    if di.distributed:
                        flag = torch.tensor([1 if want_stop else 0], dtype=torch.int32)  # CPU tensor
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=di.control_group)
                        want_stop = bool(flag.item() > 0)
                    end_of_epoch = position >= data.steps_per_epoch
                    if want_stop or (args.max_steps and step >= args.max_steps):
                        stopped = "signal" if want_stop else "max_steps"
                        if end_of_epoch:
                            save(f"epoch_{epoch + 1}.pt", epoch + 1, 0)
                        else:
                            save(f"step_{step}.pt", epoch, position)
                        if want_stop and di.main:
                            logger(event="stop", step=step, epoch=epoch, reason="SIGTERM")
                        raise _Stop()
                    if args.save_every_steps and step % args.save_every_steps == 0 and not end_of_epoch:
                        save(f"step_{step}.pt", epoch, position)
                    if di.distributed and args.save_every_steps and step % args.save_every_steps == 0:
                        dist.barrier()
                position = 0
                save(f"epoch_{epoch + 1}.pt", epoch + 1, 0)
                if di.distributed:
                    dist.barrier()
                if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                    run_eval(epoch + 1)
    except _Stop:
        pass
    except KeyboardInterrupt:
        stopped = "interrupt"
        save(f"step_{step}.pt", epoch, position)
        if di.main:
            logger(event="stop", step=step, epoch=epoch, reason="KeyboardInterrupt")
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if di.distributed:
        dist.barrier()
    return {"step": step, "epoch": epoch, "stopped": stopped, "checkpoint": last_ckpt["path"], "out": str(out),
            "model_name": model_name}


class _Stop(Exception):
    pass
