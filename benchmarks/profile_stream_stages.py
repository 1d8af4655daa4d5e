"""Memory of the streamed report stage by stage: current RSS sampled every 20 ms while each tool of
``treeprobe intrinsic --embeddings FOLDER --phylo`` runs (the numbers behind RESULTS_stream.md run 2).

    .venv/bin/python benchmarks/profile_stream_stages.py --rows 300000   # writes, profiles, removes the data

Prints, per stage, RSS at its start, its peak and at its end (GiB), and the process's peak (ru_maxrss).
The data are bench_stream.py's (same generator, ``--rows`` rows × 768 float16, iNat21 species).
"""

import argparse
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stream  # noqa: E402


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--sample", type=int, default=100_000)
    p.add_argument("--permutations", type=int, default=99)
    p.add_argument("--tmp", default="/tmp")
    args = p.parse_args(argv)

    from treeprobe import pipeline, report, stream, tl

    stage, peaks = ["setup"], {}

    def sample():
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), _rss_gib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def wrap(owner, name):
        fn = getattr(owner, name)

        def timed(*a, **k):
            prev, stage[0] = stage[0], name
            t, start = time.perf_counter(), _rss_gib()
            try:
                return fn(*a, **k)
            finally:
                print(f"{name:28s} start {start:.2f}  peak {peaks.get(name, 0):.2f}  end {_rss_gib():.2f} GiB  "
                      f"{time.perf_counter() - t:.1f} s", flush=True)
                stage[0] = prev

        setattr(owner, name, timed)

    for name in ("clustering", "knn", "tsne", "umap", "tree_recovery", "within_species_variation"):
        wrap(tl, name)
    for name in ("species_statistics", "mantel_from_stats", "physignal_from_stats"):
        wrap(stream, name)
    wrap(report, "write_report")
    tmp = Path(tempfile.mkdtemp(prefix="treeprobe_profile_stream_", dir=args.tmp))
    try:
        (tmp / "data").mkdir()
        bench_stream.write_dataset(tmp / "data", rows=args.rows, dim=768, files=args.files,
                                   species_list=bench_stream.DEFAULT_SPECIES, progress=False)
        pipeline.run_intrinsic_stream(str(tmp / "data"), out=str(tmp / "report"), sample=args.sample, phylo=True,
                                      progress=False, permutations=args.permutations)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"peak RSS (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
