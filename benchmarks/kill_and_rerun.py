"""Kill every stage, rerun, compare: the hardening issue's "same numbers as an uninterrupted run" check.

    python benchmarks/kill_and_rerun.py                 # real photos, demo checkpoint, ~10 min on 2 cores
    python benchmarks/kill_and_rerun.py --only train    # or: --only intrinsic

intrinsic: `treeprobe intrinsic --ckpt <demo> --data <real photos>` is run once uninterrupted (reference),
then, for each kill point (a share of the reference's wall time, so the kills land in extraction, in the
analysis and in the report writing) and each signal (SIGKILL: nothing can be saved; SIGINT: Ctrl-C), a
fresh run is killed there and rerun to the end with the same --cache-dir and --out. Each final report.json
is compared with the reference by benchmarks/compare_reports.py (timings, versions, command line and the
cache-hit flag ignored) and the items.csv files are compared byte for byte.

train: `treeprobe train` (tiny model, 512 real photos, 4 epochs = 64 steps, a checkpoint every 8 steps) uninterrupted,
then killed at several points (SIGKILL and SIGINT) and continued with --resume latest; the final
checkpoint's weights and optimizer state must equal the reference's bit for bit, and the log's train /
eval records too (timings left out).

Prints one line per trial and a summary; exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_reports import diff  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "multikingdom_photos_index" / "metadata.csv"
TREEPROBE = [sys.executable, "-m", "treeprobe"]
TIMING = ("img_s", "seconds")


def _run(argv, env, kill_after=None, sig=signal.SIGKILL):
    """Run ``argv``; with ``kill_after`` seconds, send ``sig`` then. Returns (exit status, seconds)."""
    t = time.perf_counter()
    # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, and a
    # Python started so never sees a Ctrl-C (nohup semantics, which treeprobe keeps)
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if kill_after is None:
        err = p.communicate()[1]
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{err[-2000:]}")
        return p.returncode, time.perf_counter() - t
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
    p.communicate()
    return p.returncode, time.perf_counter() - t


def intrinsic_trials(root: Path, env, fractions, signals) -> list[tuple[str, bool]]:
    base = [*TREEPROBE, "intrinsic", "--ckpt", str(REPO / "treeprobe" / "assets" / "demo_clip.pt"),
            "--data", str(PHOTOS), "--permutations", "199", "--quiet"]
    _, ref_s = _run([*base, "--cache-dir", str(root / "c_ref"), "--out", str(root / "r_ref")], env)
    ref = json.loads((root / "r_ref" / "report.json").read_text())
    ref_items = (root / "r_ref" / "items.csv").read_bytes()
    print(f"intrinsic reference: {ref_s:.1f} s", flush=True)
    results = []
    for sig in signals:
        for f in fractions:
            name = f"{signal.Signals(sig).name}@{f:.2f}"
            cache, out = root / f"c_{name}", root / f"r_{name}"
            code, _ = _run([*base, "--cache-dir", str(cache), "--out", str(out)], env, kill_after=f * ref_s, sig=sig)
            partial = sorted(p.name for p in cache.rglob("chunk-*.npz")) if cache.exists() else []
            had_report = (out / "report.json").exists()
            _, rerun_s = _run([*base, "--cache-dir", str(cache), "--out", str(out)], env)
            rows = list(diff(ref, json.loads((out / "report.json").read_text())))
            rows = [r for r in rows if not r[0].startswith("/provenance/data/cache")]
            same = not rows and (out / "items.csv").read_bytes() == ref_items
            leftovers = sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
            print(f"intrinsic {name:>13}: killed at {f * ref_s:5.1f} s (exit {code}), {len(partial)} resume chunk(s) "
                  f"kept, report present after the kill: {had_report}; rerun {rerun_s:5.1f} s; "
                  f"{len(rows)} difference(s), items.csv {'equal' if same else 'DIFFERENT'}; temp folders left: "
                  f"{leftovers or 'none'}", flush=True)
            for r in rows[:5]:
                print("   ", r)
            results.append((f"intrinsic {name}", same and not leftovers))
    return results


def _records(out: Path) -> list[dict]:
    recs = []
    for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        if rec["event"] == "checkpoint" and Path(rec["path"]).name.startswith("step_"):
            continue  # a stop's own checkpoint (or a --save-every-steps one): compared through the weights
        if rec["event"] in ("train", "eval"):
            recs.append({k: v for k, v in rec.items() if k not in TIMING})
    return recs


def _final_state(out: Path):
    import torch

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["path"]
    return torch.load(out / "checkpoints" / latest, map_location="cpu", weights_only=False)


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def train_trials(root: Path, env, fractions, signals) -> list[tuple[str, bool]]:
    base = [*TREEPROBE, "train", "--data", str(PHOTOS), "--model", "tiny", "--epochs", "4", "--batch-size", "32",
            "--limit", "512", "--warmup", "2", "--save-every-steps", "8", "--log-every", "1", "--seed", "5",
            "--threads", "1", "--no-progress", "-q"]
    _, ref_s = _run([*base, "--out", str(root / "t_ref")], env)
    ref, ref_log = _final_state(root / "t_ref"), _records(root / "t_ref")
    print(f"train reference: {ref_s:.1f} s, {ref['step']} steps", flush=True)
    results = []
    for sig in signals:
        for f in fractions:
            name = f"{signal.Signals(sig).name}@{f:.2f}"
            out = root / f"t_{name}"
            code, _ = _run([*base, "--out", str(out)], env, kill_after=f * ref_s, sig=sig)
            _run([*base, "--out", str(out), "--resume", "latest"], env)
            got = _final_state(out)
            same_w = _equal(ref["state_dict"], got["state_dict"]) and _equal(ref["optimizer"], got["optimizer"])
            same_log = _records(out) == ref_log
            print(f"train {name:>13}: killed at {f * ref_s:5.1f} s (exit {code}); final step {got['step']}; weights + "
                  f"optimizer {'equal' if same_w else 'DIFFERENT'}; log records {'equal' if same_log else 'DIFFERENT'}",
                  flush=True)
            results.append((f"train {name}", same_w and same_log and got["step"] == ref["step"]))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("intrinsic", "train"))
    ap.add_argument("--keep", action="store_true", help="keep the run folders (their path is printed)")
    ap.add_argument("--signals", default="KILL,INT", help="signals to send, comma-separated (default KILL,INT)")
    ap.add_argument("--fractions", default="0.15,0.45,0.75,0.95",
                    help="kill points as shares of the reference run's wall time")
    args = ap.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    signals = [signal.Signals[f"SIG{name.strip().upper()}"] for name in args.signals.split(",")]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    root = Path(tempfile.mkdtemp(prefix="treeprobe_kill_"))
    results = []
    try:
        if args.only in (None, "intrinsic"):
            results += intrinsic_trials(root, env, fractions, signals)
        if args.only in (None, "train"):
            results += train_trials(root, env, fractions, signals)
    finally:
        if args.keep:
            print(f"run folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    bad = [name for name, ok in results if not ok]
    print(f"{len(results) - len(bad)} of {len(results)} killed-and-rerun trials equal the uninterrupted run"
          + (f"; differ: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
