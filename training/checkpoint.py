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
leaves a truncated checkpoint under the final name. ``latest.json`` in the folder
points at the newest checkpoint (also written atomically); :func:`find_latest`
falls back to globbing when it is missing.
"""

from __future__ import annotations

import json
import os
import random
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
_MODULE_PREFIX = "module."

__all__ = [
    "LATEST",
    "EXPORT_KEYS",
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


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` via tmp file + fsync + ``os.replace`` (:func:`treeprobe._utils.atomic_write`)."""
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
    """Atomically write ``ckpt_dir/name`` and point ``latest.json`` at it."""
    ckpt_dir = Path(ckpt_dir)
    path = atomic_save(ckpt, ckpt_dir / name)
    pointer = {"path": name, "step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0))}
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
    """Read a checkpoint (``weights_only=True``: it holds only tensors and plain types)."""
    return torch.load(str(path), map_location=map_location, weights_only=True)


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
