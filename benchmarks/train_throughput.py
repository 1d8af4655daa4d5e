"""Training throughput (img/s): treeprobe-train vs open_clip's own trainer, same settings.

    python benchmarks/train_throughput.py                      # GPU: ViT-B-16, batch 256, bf16
    python benchmarks/train_throughput.py --model tiny --batch-size 8 --steps 5   # CPU smoke test

Both trainers run the same model, batch size, precision, loader workers and number of
steps on synthetic data (one blank image through the train transform, as open_clip's
``--dataset-type synthetic``), one after the other in this process's run, each in its own
subprocess:

* ours:     ``python -m treeprobe.training --data synthetic --log-every 1 ...`` (``treeprobe train``) → per-step ``img_s``
            from ``log.jsonl``;
* open_clip: ``python -m open_clip_train.main --dataset-type synthetic
            --log-every-n-steps 1 ...`` → per-step ``.../s`` from its log lines.

Each trainer's per-step rate counts the whole step (data wait + forward + backward +
optimizer), as both trainers log it. The first ``--skip`` steps (warm-up, cudnn
autotuning) are dropped and the median of the rest is reported. Prints both numbers,
the ratio ours/open_clip and a JSON line; ``--json-out`` writes that JSON.

open_clip's trainer is the ``open_clip_train`` package (shipped in the open_clip_torch
wheel, its extra dependencies via ``pip install 'open_clip_torch[training]'``). If it cannot
be imported the script says so and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
__all__ = ["run_ours", "run_open_clip", "main"]


def _check_open_clip_train() -> str | None:
    try:
        import open_clip_train.main  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing package or a missing dependency of it
        return (f"open_clip's trainer is not importable ({type(e).__name__}: {e}). Install it with "
                f"pip install 'open_clip_torch[training]' (the open_clip_train package and its dependencies), "
                f"then rerun.")
    return None


def _run(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log_path``; ``(returncode, seconds)``, 124 on timeout (the
    steps logged until then are still read by the callers)."""
    t0 = time.time()
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def run_ours(a, work: Path) -> dict:
    """Time ``treeprobe train`` (``python -m treeprobe.training``): rc, wall time, per-step img/s."""
    out = work / "ours"
    cmd = [sys.executable, "-m", "treeprobe.training", "--data", "synthetic", "--train-num-samples",
           str(a.steps * a.batch_size), "--epochs", "1", "--model", a.model, "--batch-size", str(a.batch_size),
           "--precision", a.precision, "--workers", str(a.workers), "--lr", "5e-4", "--warmup", "1",
           "--log-every", "1", "--no-progress", "--out", str(out), "--seed", "0"]
    if a.image_size:
        cmd += ["--image-size", str(a.image_size)]
    if a.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    rc, wall = _run(cmd, work / "ours.log", a.timeout)
    rates = []
    log = out / "log.jsonl"
    if log.is_file():
        rates = [r["img_s"] for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "train"]
    return {"rc": rc, "wall_s": round(wall, 1), "per_step_img_s": rates, "cmd": " ".join(cmd),
            "log": str(work / "ours.log")}


_OC_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,")


def run_open_clip(a, work: Path) -> dict:
    """Time open_clip's trainer on the same settings: rc, wall time, per-step img/s."""
    import treeprobe.training
    from treeprobe.models import MODEL_ALIASES

    config_dir = Path(treeprobe.training.__file__).resolve().parent / "configs"  # the bundled 'tiny'
    name = MODEL_ALIASES.get(a.model, a.model)
    boot = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
            "from open_clip_train.main import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", boot, str(config_dir), "--dataset-type", "synthetic", "--train-num-samples",
           str(a.steps * a.batch_size), "--epochs", "1", "--model", name, "--batch-size", str(a.batch_size),
           "--precision", a.precision, "--workers", str(a.workers), "--lr", "5e-4", "--warmup", "1",
           "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(work / "open_clip_logs"),
           "--name", "bench", "--seed", "0"]
    if a.image_size:
        cmd += ["--force-image-size", str(a.image_size)]
    if a.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    rc, wall = _run(cmd, work / "open_clip.log", a.timeout)
    text = (work / "open_clip.log").read_text(errors="replace")
    rates = [float(m) for m in _OC_RATE.findall(text)]
    return {"rc": rc, "wall_s": round(wall, 1), "per_step_img_s": rates, "cmd": " ".join(cmd),
            "log": str(work / "open_clip.log")}


def _summary(rates: list[float], skip: int) -> float | None:
    kept = rates[skip:] if len(rates) > skip else rates[-1:]
    return round(statistics.median(kept), 2) if kept else None


def main(argv=None) -> int:
    """Run both trainers and print the comparison; exit status (3: no open_clip_train)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture, or 'tiny' (CPU smoke test)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (per GPU)")
    p.add_argument("--steps", type=int, default=60, help="training steps per trainer")
    p.add_argument("--skip", type=int, default=10, help="leading steps left out of the median (warm-up)")
    p.add_argument("--precision", default=None, choices=["amp_bf16", "amp", "fp32"],
                   help="default: amp_bf16 with CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers for both trainers")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input size")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per trainer run")
    p.add_argument("--work", default=None, help="folder for logs/checkpoints (default: a temp folder)")
    p.add_argument("--json-out", default=None, help="also write the JSON result here")
    a = p.parse_args(argv)

    import torch

    if a.precision is None:
        a.precision = "amp_bf16" if torch.cuda.is_available() else "fp32"
    if a.skip >= a.steps:
        a.skip = max(0, a.steps // 2)
    missing = _check_open_clip_train()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 3
    work = Path(a.work or tempfile.mkdtemp(prefix="treeprobe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    ours = run_ours(a, work)
    oc = run_open_clip(a, work)
    res = {
        "device": device, "model": a.model, "batch_size": a.batch_size, "precision": a.precision,
        "steps": a.steps, "skip": a.skip, "workers": a.workers, "torch": torch.__version__,
        "ours_img_s": _summary(ours["per_step_img_s"], a.skip),
        "open_clip_img_s": _summary(oc["per_step_img_s"], a.skip),
        "ours": ours, "open_clip": oc,
    }
    ok = ours["rc"] == 0 and oc["rc"] == 0 and res["ours_img_s"] and res["open_clip_img_s"]
    res["ratio_ours_over_open_clip"] = round(res["ours_img_s"] / res["open_clip_img_s"], 3) if ok else None
    print(f"device: {device}; model {a.model}, batch {a.batch_size}, {a.precision}, {a.steps} steps "
          f"(median of steps after the first {a.skip})")
    print(f"treeprobe train : {res['ours_img_s']} img/s  (rc {ours['rc']}, log {ours['log']})")
    print(f"open_clip_train : {res['open_clip_img_s']} img/s  (rc {oc['rc']}, log {oc['log']})")
    print(f"ratio ours/open_clip: {res['ratio_ours_over_open_clip']}")
    compact = {k: v for k, v in res.items() if k not in ("ours", "open_clip")}
    print(json.dumps(compact))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
