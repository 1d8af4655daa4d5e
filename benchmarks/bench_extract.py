"""Extraction throughput: treeprobe's end-to-end ``extract_embeddings`` vs the bare model forward.

    python benchmarks/bench_extract.py                                  # ViT-B-32, batch 32, 256 photos, CPU
    python benchmarks/bench_extract.py --n 64 --repeats 3 --workers 0 2 # quicker
    python benchmarks/bench_extract.py --main-threads 2 1               # also try torch thread counts

Measures, interleaved within each repetition (the order rotates from one repetition to
the next, so slow drifts in machine load hit every configuration alike):

* bare: the model forward exactly as extraction runs it (``model.encode_image`` with the
  same autocast and memory format: bf16 + channels_last on CUDA, fp32 on the CPU) under
  ``torch.inference_mode()`` on preprocessed tensors already on the device, the same
  batches, img/s;
* e2e w=K: ``extract_embeddings(..., num_workers=K, cache_dir=None)`` from the JPEG files
  (decode + resize + forward + normalise + collect), img/s from its own wall clock, for each
  ``--workers`` value and each ``--main-threads`` value (torch threads in the main process
  during the call; "default" leaves torch's setting).

Prints per-repetition numbers, medians, and the ratio e2e / bare both as the ratio of the
medians and as the median of the per-repetition ratios (target >= 0.9). ``--json-out``
writes everything as JSON. The model is a random initialisation by default (the
throughput does not depend on the weights); ``--ckpt`` loads a checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CSV = "/work/shared/data/multikingdom_photos_index/metadata.csv"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pick_paths(csv: str, n: int) -> list[str]:
    import numpy as np
    import pandas as pd

    df = pd.read_csv(csv, dtype=str)
    rows = df.iloc[np.linspace(0, len(df) - 1, min(n, len(df))).astype(int)]
    base = os.path.dirname(os.path.abspath(csv))
    return [os.path.normpath(os.path.join(base, p)) for p in rows["path"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32, random init)")
    p.add_argument("--ckpt", help="checkpoint file instead of a random init")
    p.add_argument("--csv", default=DEFAULT_CSV, help="metadata CSV listing the photos")
    p.add_argument("--n", type=int, default=256, help="number of photos (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values (default 0 1 2)")
    p.add_argument("--main-threads", nargs="+", default=["default"],
                   help="torch threads in the main process for the e2e runs ('default' or numbers)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out")
    args = p.parse_args(argv)

    import torch

    from treeprobe._utils import available_cpus
    from treeprobe.extract import encode_batch, extract_embeddings, prepare_model, resolve_plan
    from treeprobe.models import load_model
    from PIL import Image

    lm = load_model(ckpt=args.ckpt, model=args.model if not args.ckpt else None, device=args.device)
    if args.ckpt and args.model:
        lm = load_model(ckpt=args.ckpt, model=args.model, device=args.device)
    paths = pick_paths(args.csv, args.n)
    n, bs = len(paths), args.batch_size
    default_threads = torch.get_num_threads()
    print(f"cpu: {cpu_model()} ({os.cpu_count()} logical cpus, {available_cpus()} available), torch {torch.__version__}, "
          f"{default_threads} torch threads; model {lm.model_name} ({lm.source}); {n} photos, batch {bs}",
          flush=True)

    # pre-decoded, preprocessed tensors for the bare forward
    tensors = []
    for path in paths:
        with Image.open(path) as im:
            tensors.append(lm.preprocess(im.convert("RGB")))
    x = torch.stack(tensors).to(args.device)
    batches = [x[i:i + bs] for i in range(0, n, bs)]

    # the bare forward runs the model exactly as extraction does (same autocast and memory format:
    # bf16 autocast + channels_last on CUDA, plain fp32 on the CPU), minus decoding and loading
    plan = resolve_plan(lm, args.device)
    model = prepare_model(lm, plan)
    print(f"compute: {plan.compute}, channels_last {plan.channels_last}", flush=True)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                encode_batch(model, b, plan)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    def e2e(workers: int, threads) -> float:
        res = extract_embeddings(lm, paths, batch_size=bs, num_workers=workers, cache_dir=None,
                                 device=args.device, progress=False,
                                 threads=None if threads == "default" else int(threads))
        assert res.ok.all(), res.failures
        return n / res.seconds

    configs = [("bare", lambda: bare())]
    for th in args.main_threads:
        for w in args.workers:
            label = f"e2e w={w}" + ("" if th == "default" else f" t={th}")
            configs.append((label, lambda w=w, th=th: e2e(w, th)))

    with torch.inference_mode():  # warm-up (allocator, oneDNN primitive caches)
        encode_batch(model, batches[0], plan)
    def cpu_seconds() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    runs: dict[str, list[float]] = {label: [] for label, _ in configs}
    cpu_ms: dict[str, list[float]] = {label: [] for label, _ in configs}
    load_before = os.getloadavg()
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for label, fn in order:
            c0 = cpu_seconds()
            runs[label].append(fn())
            cpu_ms[label].append((cpu_seconds() - c0) / n * 1000)
            print(f"  rep {rep + 1}: {label:<14} {runs[label][-1]:8.2f} img/s   "
                  f"{cpu_ms[label][-1]:7.1f} cpu-ms/img (this process + its workers)   "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\nmedians over {args.repeats} interleaved repetitions (img/s):")
    summary = {}
    for label in runs:
        if label == "bare":
            print(f"  {label:<14} {med[label]:8.2f}   cpu-ms/img {statistics.median(cpu_ms[label]):.1f}")
            continue
        ratio_med = med[label] / med["bare"]
        ratio_rep = statistics.median(a / b for a, b in zip(runs[label], runs["bare"]))
        summary[label] = dict(median_img_s=med[label], ratio_of_medians=ratio_med, median_of_ratios=ratio_rep)
        summary[label]["median_cpu_ms_per_img"] = statistics.median(cpu_ms[label])
        print(f"  {label:<14} {med[label]:8.2f}   e2e/bare: {ratio_med:.3f} (median of per-rep ratios "
              f"{ratio_rep:.3f})  {'OK' if ratio_rep >= 0.9 else 'below 0.9'}   "
              f"cpu-ms/img {statistics.median(cpu_ms[label]):.1f}")
    print(f"1-min load average: {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({os.cpu_count()} logical cpus)")
    out = dict(cpu=cpu_model(), logical_cpus=os.cpu_count(), available_cpus=available_cpus(), torch=torch.__version__,
               torch_threads=default_threads, model=lm.model_name, source=lm.source, n=n, batch_size=bs,
               device=args.device, repeats=args.repeats, runs=runs, cpu_ms_per_img=cpu_ms, medians=med, e2e=summary,
               loadavg_before=load_before, loadavg_after=load_after,
               command=" ".join([os.path.basename(sys.executable), *sys.argv]))
    print(json.dumps(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
