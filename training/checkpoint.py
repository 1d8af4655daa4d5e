"""Checkpoints in open_clip's trainer format, written atomically.

A checkpoint is a dict saved with :func:`torch.save`::

    epoch        int   completed epochs when saved (open_clip's meaning: resume starts here)
    step         int   global optimizer steps done
    state_dict   dict  model weights (no ``module.`` prefix)
    optimizer    dict  AdamW state            (absent in weights-only exports)
    scaler       dict  GradScaler state or None
    model_name   str   open_clip architecture name (``treeprobe-tiny`` for ``--model tiny``)
    model_cfg    dict  the architecture config (as open_clip's ``model_configs/*.json``)
    text_type    str   caption type used for training
    args         dict  the command-line options (plain types)
    rng          dict  torch / cuda / numpy / python RNG states (plain lists + tensors)
    sampler      dict  ``{"epoch": e, "position": batches done in epoch e}``

Everything in it is a tensor or a plain Python type, so ``torch.load(...,
weights_only=True)`` (open_clip's default) reads it.

Writing goes (through :func:`treeprobe._utils.atomic_write`) to a temporary file in the same
folder, which is flushed, fsync'ed and then ``os.replace``'d onto the final name: a crash or an exception mid-write never
leaves a truncated checkpoint under the final name. SIGINT and SIGTERM that arrive during a
write are held until the checkpoint and ``latest.json`` are in place, then delivered
(:func:`deferred_signals`), so a Ctrl-C never costs the checkpoint being written. A SIGKILL
mid-write leaves only a ``.<name>.<random>.tmp`` file, which :func:`remove_stale_tmp` clears
when the run starts again. ``latest.json`` in the folder points at the newest checkpoint (also
written atomically); :func:`find_latest` falls back to globbing when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from treeprobe._utils import atomic_write, atomic_write_text
from treeprobe.errors import TreeprobeError

#: The pointer file naming the newest checkpoint of a folder.
LATEST = "latest.json"
#: Entries of a checkpoint that a weights-only export keeps (besides the state dict).
EXPORT_KEYS = ("epoch", "step", "model_name", "model_cfg", "text_type", "args")
#: Signals held back while a checkpoint is written (delivered once it is complete).
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Name pattern of the temporary files :func:`treeprobe._utils.atomic_write` makes in a folder.
TMP_GLOB = ".*.tmp"
_MODULE_PREFIX = "module."

__all__ = [
    "LATEST",
    "EXPORT_KEYS",
    "DEFERRED_SIGNALS",
    "deferred_signals",
    "remove_stale_tmp",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest",
    "get_rng_state",
    "set_rng_state",
    "plain",
    "strip_module_prefix",
    "export_weights",
]


@contextlib.contextmanager
def deferred_signals(signums=DEFERRED_SIGNALS):
    """Hold SIGINT/SIGTERM while the block runs, then deliver them (in arrival order) to the
    handlers that were installed before, e.g. the trainer's stop flag, Python's
    KeyboardInterrupt or the default termination.

    A no-op outside the main thread (only it can set handlers; signals go to it anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in held:
            signal.raise_signal(s)


def remove_stale_tmp(folder: str | os.PathLike, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the temporary files an interrupted atomic write (SIGKILL, power loss) left in
    ``folder`` (``.<name>.<random>.tmp``; only those of the files ``names`` when given) → the
    paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [TMP_GLOB] if names is None else [f".{n}.*.tmp" for n in names]
    stale = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` via tmp file + fsync + ``os.replace`` (:func:`treeprobe._utils.atomic_write`),
    with SIGINT/SIGTERM held until the file is in place (:func:`deferred_signals`)."""
    with deferred_signals():
        return atomic_write(path, lambda f: torch.save(obj, f))


def plain(obj: Any) -> Any:
    """Recursively convert to JSON/pickle-safe plain types (Paths → str, tuples → lists).

    >>> plain({"out": Path("runs/a"), "betas": (0.9, 0.98), "n": np.int64(3)})
    {'out': 'runs/a', 'betas': [0.9, 0.98], 'n': 3}
    """
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def get_rng_state() -> dict:
    """Torch (CPU and CUDA), numpy and python RNG states as tensors/plain lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state` (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    if "python" in state:
        p = state["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def strip_module_prefix(state_dict: dict) -> dict:
    """Drop DDP's ``module.`` prefix from keys."""
    n = len(_MODULE_PREFIX)
    return {(k[n:] if k.startswith(_MODULE_PREFIX) else k): v for k, v in state_dict.items()}


def save_checkpoint(ckpt: dict, ckpt_dir: str | os.PathLike, name: str) -> Path:
    """Atomically write ``ckpt_dir/name`` and point ``latest.json`` at it (signals held until both are written)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = {"path": name, "step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0))}
    with deferred_signals():
        path = atomic_save(ckpt, ckpt_dir / name)
        atomic_write_text(ckpt_dir / LATEST, json.dumps(pointer) + "\n")
    return path


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``ckpt_dir``: ``latest.json`` if valid, else by glob.

    The glob fallback picks the most recently modified ``*.pt`` file. Not open_clip_train's
    ``get_latest_checkpoint``: it sorts the names (natural order), so ``step_3.pt`` would win
    over a later ``epoch_1.pt``, and it reads no pointer written atomically with the checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        try:
            target = ckpt_dir / json.loads(pointer.read_text())["path"]
            if target.is_file():
                return target
        except (ValueError, KeyError, OSError):
            pass
    files = [p for p in ckpt_dir.glob("*.pt") if p.is_file()]
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint (``weights_only=True``: it holds only tensors and plain types).

    A file that is not a PyTorch checkpoint, is truncated, or holds other Python objects raises
    a one-line :class:`TreeprobeError`.
    """
    from treeprobe.models import _unreadable, check_checkpoint_bytes

    path = str(path)
    kind = check_checkpoint_bytes(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn zip, a safetensors file, a foreign pickle, ...
        raise _unreadable(path, kind, e) from None


def export_weights(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True) -> Path:
    """Write a weights-only copy of a training checkpoint (no optimizer/RNG), fp16 if ``half``.

    Keeps ``epoch``, ``step``, ``state_dict``, ``model_name``, ``model_cfg``,
    ``text_type`` and ``args``; floating tensors are cast to fp16 when ``half``
    (a model built in fp32 upcasts them on ``load_state_dict``).
    """
    if not os.path.isfile(src):
        raise TreeprobeError(f"no such checkpoint file: {src}")
    ck = load_checkpoint(src)
    sd = ck["state_dict"]
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    out = {k: ck[k] for k in EXPORT_KEYS if k in ck}
    out["state_dict"] = sd
    return atomic_save(out, dst)
