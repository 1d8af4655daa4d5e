"""What resume chunks cost: extraction with a chunk after every batch vs with the defaults vs no resume.

    python benchmarks/bench_extract_chunks.py                      # demo checkpoint, 512 real photos, CPU
    python benchmarks/bench_extract_chunks.py --n 256 --repeats 2  # quicker

Each repetition runs, on the same photos and in rotating order, ``extract_embeddings`` into a fresh
cache folder with (a) ``resume=False`` (nothing kept until the end), (b) the defaults (a chunk per
2,048 images or 30 s, so here at most one), (c) ``chunk_batches=1`` (a chunk written after every
batch: the worst case). Prints the medians and the cost of one chunk write,
(t_c − t_a) / (chunks written in c), in ms, and what it adds at the defaults (≤ 1 chunk / 30 s); then the
time to write one full default chunk (2,048 × 512 float32) directly, median of 10.
The demo model is tiny, so the forward pass is short and the chunk cost shows up at its largest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_extract import DEFAULT_CSV, cpu_model, pick_paths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=DEFAULT_CSV)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import torch

    from treeprobe.extract import DEFAULT_CHUNK_SECONDS, extract_embeddings
    from treeprobe.models import load_model
    from treeprobe.pipeline import DEMO_CKPT

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    loaded = load_model(ckpt=str(DEMO_CKPT))
    paths = pick_paths(args.csv, args.n)
    configs = {"no resume": dict(resume=False), "defaults": {}, "chunk every batch": dict(chunk_batches=1)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    n_batches = -(-len(paths) // args.batch_size)
    for rep in range(args.repeats):
        names = list(configs)
        names = names[rep % len(names):] + names[:rep % len(names)]
        for name in names:
            with tempfile.TemporaryDirectory() as cache:
                t = time.perf_counter()
                res = extract_embeddings(loaded, paths, args.batch_size, cache_dir=cache, num_workers=0,
                                         progress=False, **configs[name])
                times[name].append(time.perf_counter() - t)
                assert int(res.ok.sum()) > 0
    med = {k: statistics.median(v) for k, v in times.items()}
    # one full default chunk written directly (2,048 embeddings of 512 dims + flags, atomically, fsynced):
    # the end-to-end difference above is within the run-to-run noise on a small set
    import numpy as np

    from treeprobe.extract import DEFAULT_CHUNK_IMAGES, _savez

    arrays = dict(embeddings=np.random.default_rng(0).standard_normal((DEFAULT_CHUNK_IMAGES, 512), dtype=np.float32),
                  ok=np.ones(DEFAULT_CHUNK_IMAGES, dtype=bool), index=np.arange(DEFAULT_CHUNK_IMAGES))
    direct = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(10):
            t = time.perf_counter()
            _savez(os.path.join(d, f"chunk-{i:06d}.npz"), arrays)
            direct.append(time.perf_counter() - t)
    direct_ms = 1000 * statistics.median(direct)
    per_chunk_ms = 1000 * (med["chunk every batch"] - med["no resume"]) / n_batches
    out = dict(cpu=cpu_model(), n_images=len(paths), batch_size=args.batch_size, repeats=args.repeats,
               seconds=times, median_s=med, chunks_in_worst_case=n_batches, per_chunk_ms=per_chunk_ms,
               overhead_at_defaults_pct=100 * max(per_chunk_ms, 0) / 1000 / DEFAULT_CHUNK_SECONDS,
               default_chunk_write_ms=direct_ms,
               default_chunk_share_of_30s_pct=100 * direct_ms / 1000 / DEFAULT_CHUNK_SECONDS)
    for k, v in med.items():
        print(f"{k:>18}: {v:7.2f} s median ({len(paths) / v:6.1f} img/s)")
    print(f"one chunk write: {per_chunk_ms:.1f} ms ({n_batches} chunks of {args.batch_size} images); at the "
          f"defaults at most one per {DEFAULT_CHUNK_SECONDS:.0f} s: {out['overhead_at_defaults_pct']:.3f} % of the run")
    print(f"one default chunk ({DEFAULT_CHUNK_IMAGES} x 512 float32) written directly: {direct_ms:.1f} ms median of 10, "
          f"{out['default_chunk_share_of_30s_pct']:.3f} % of the {DEFAULT_CHUNK_SECONDS:.0f} s between chunks")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
