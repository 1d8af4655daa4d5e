"""Benchmark: treeprobe's exact Pearson Mantel test (``mantel_tree``) against scikit-bio's ``mantel``.

Both test the same thing in the same run: Pearson correlation between the cosine distance of
D-dimensional embeddings and the patristic distance on the iNat21 rank taxonomy (one unit per
rank), 999 permutations. Items get species drawn uniformly from the 10,000 real iNat21 species
(/work/shared/data/inat2021_taxonomy/metadata.csv, or --metadata), so at N = 1,000,000 every
species has ~100 items. Embeddings are 'clustered' (a Brownian walk down the taxonomy plus item
noise, so r > 0) or 'random' (standard normal: the null).

Every measurement runs in its own subprocess, so its peak RSS (ru_maxrss) is clean; times are
wall-clock seconds of the test call alone (data generation excluded). scikit-bio's time includes
building the two N×N distance matrices it needs (our blocked cosine_distance_matrix and
CladeStructure.item_distances), and is also reported for its ``mantel`` call alone.

    python benchmarks/bench_mantel.py                          # N = 1,000, 5,000, 10,000; 3 runs each
    python benchmarks/bench_mantel.py --n 1000000 --repeats 1  # treeprobe alone (scikit-bio cannot)
    python benchmarks/bench_mantel.py --json out.json          # also write the raw measurements
    python benchmarks/bench_mantel.py --permute species --n 100000 --permutations 199 --repeats 1
        # the between-species test, species permuted within size strata (mantel_species; treeprobe alone)

``--permute images`` (default) times ``mantel_tree`` (images permuted); ``--permute species`` times
``mantel_species`` (r over between-species pairs; species = the iNat21 species of the items, about
min(N, 10,000) of them), which scikit-bio has no form of.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METADATA = ROOT.parent / "shared" / "data" / "inat2021_taxonomy" / "metadata.csv"
CHUNK = 65536  # items generated per step: 65,536 x 512 float32 = 128 MB per temporary


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _cpu() -> float:
    """CPU seconds (user + system, all threads) of this process: less sensitive to other load than wall time."""
    t = os.times()
    return t.user + t.system


def _status(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2  # kB → GiB
    return float("nan")


def build_problem(n: int, dim: int, seed: int, embeddings: str, metadata: Path):
    """(X float32 (n, dim), CladeStructure over the n items) from the iNat21 rank taxonomy."""
    import pandas as pd

    from treeprobe.taxonomy import RANKS, Taxonomy
    from treeprobe.tree import CladeStructure

    meta = pd.read_csv(metadata)
    tax = Taxonomy.from_frame(meta[list(RANKS)])  # one row per species
    cs = tax.clade_structure()
    rng = np.random.default_rng(seed)
    sp_of_item = rng.integers(0, len(meta), n)  # uniform over species
    species_node = cs.item_node  # node of each metadata row (species)
    clades = CladeStructure(parent=cs.parent, length=cs.length, item_node=species_node[sp_of_item], names=cs.names,
                            ultrametric_levels=cs.ultrametric_levels)
    X = np.empty((n, dim), dtype=np.float32)
    if embeddings == "random":
        for i in range(0, n, CHUNK):
            X[i:i + CHUNK] = rng.standard_normal((min(CHUNK, n - i), dim), dtype=np.float32)
    else:  # Brownian walk down the tree: each node = parent + N(0, 1/8), items = species + N(0, 1.5²)
        node_vec = np.zeros((cs.n_nodes, dim), dtype=np.float32)
        depth = cs.depth_levels()
        for level in range(1, int(depth.max()) + 1):
            nodes = np.flatnonzero(depth == level)
            node_vec[nodes] = node_vec[cs.parent[nodes]] + rng.standard_normal(
                (len(nodes), dim), dtype=np.float32) * np.float32(np.sqrt(1 / 8))
        for i in range(0, n, CHUNK):
            b = clades.item_node[i:i + CHUNK]
            X[i:i + CHUNK] = node_vec[b] + np.float32(1.5) * rng.standard_normal((len(b), dim), dtype=np.float32)
    return X, clades


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import threadpoolctl

    X, clades = build_problem(args.n, args.dim, args.seed, args.embeddings, Path(args.metadata))
    rss_data = _status("VmRSS")
    out = dict(tool=args.worker, permute=args.permute, n=args.n, dim=args.dim, permutations=args.permutations,
               embeddings=args.embeddings, n_species=int(len(np.unique(clades.item_node))),
               rss_after_data_gb=rss_data,
               blas=[{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                     for i in threadpoolctl.threadpool_info()])
    if args.worker == "treeprobe":
        from treeprobe.mantel import mantel_species, mantel_tree

        # compile/load the numba kernels outside the timed region (a one-off per machine; the
        # on-disk cache makes it ~0.5 s in a fresh process)
        mantel_tree(X[:50], clades.subset_items(np.arange(50)), permutations=1)
        t, c = time.perf_counter(), _cpu()
        if args.permute == "species":
            codes = np.unique(clades.item_node, return_inverse=True)[1]  # one iNat21 species per leaf node
            res = mantel_species(X, clades, codes, method="pearson", permutations=args.permutations,
                                 seed=args.seed, n_jobs=args.n_jobs, progress=args.progress)
        else:
            res = mantel_tree(X, clades, method="pearson", permutations=args.permutations, seed=args.seed,
                              n_jobs=args.n_jobs, progress=args.progress)
        out.update(seconds=time.perf_counter() - t, cpu_seconds=_cpu() - c, statistic=res.statistic,
                   p_value=res.p_value, details=res.details)
    else:
        from skbio import DistanceMatrix
        from skbio.stats.distance import mantel as skbio_mantel

        from treeprobe.mantel import cosine_distance_matrix

        t, c = time.perf_counter(), _cpu()
        D = DistanceMatrix(cosine_distance_matrix(X), validate=True)
        T = DistanceMatrix(clades.item_distances(), validate=True)
        t_mat = time.perf_counter() - t
        t = time.perf_counter()
        r, p, n = skbio_mantel(D, T, method="pearson", permutations=args.permutations,
                               alternative="greater")
        t_mantel = time.perf_counter() - t
        out.update(seconds=t_mat + t_mantel, seconds_mantel_call=t_mantel, seconds_matrices=t_mat,
                   cpu_seconds=_cpu() - c, statistic=float(r), p_value=float(p))
    out["peak_rss_gb"] = _rss_gb()
    return out


def run_one(tool: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--n", str(n), "--dim", str(args.dim),
           "--permutations", str(args.permutations), "--seed", str(args.seed), "--embeddings", args.embeddings,
           "--metadata", str(args.metadata), "--permute", args.permute]
    if args.n_jobs is not None:
        cmd += ["--n-jobs", str(args.n_jobs)]
    if args.progress:
        cmd += ["--progress"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) / 1024**2 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return dict(cpu=cpu, cores=os.cpu_count(), mem_gib=round(mem, 1), python=platform.python_version(),
                numpy=np.__version__, loadavg=open("/proc/loadavg").read().split()[:3],
                openblas_env={k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 5000, 10000], help="numbers of items")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", choices=("clustered", "random"), default="clustered")
    ap.add_argument("--skbio-max-n", type=int, default=10000, help="largest N also run with scikit-bio")
    ap.add_argument("--n-jobs", type=int, default=None, help="treeprobe threads (default: all cores)")
    ap.add_argument("--metadata", default=str(DEFAULT_METADATA), help="iNat21 species metadata CSV")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--permute", choices=("images", "species"), default="images",
                    help="images: mantel_tree (all pairs, images permuted); species: mantel_species "
                         "(between-species pairs, species permuted within size strata; no scikit-bio run)")
    ap.add_argument("--worker", choices=("treeprobe", "skbio"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        (n,) = args.n
        args.n = n
        print(json.dumps(worker(args)))
        return 0

    info = machine()
    print(f"# machine: {info}", flush=True)
    rows, raw = [], []
    for n in args.n:
        tools = ["treeprobe"] + (["skbio"] if n <= args.skbio_max_n and args.permute == "images" else [])
        runs = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool in tools:  # interleaved, so that load changes hit both alike
                m = run_one(tool, n, args)
                runs[tool].append(m)
                raw.append(m)
                print(f"  N={n} {tool} run {rep + 1}: {m['seconds']:.3f} s, peak RSS {m['peak_rss_gb']:.2f} GiB, "
                      f"r={m['statistic']:.12f} p={m['p_value']:.4f}", flush=True)
        tp = runs["treeprobe"]
        row = dict(n=n, treeprobe_s=float(np.median([m["seconds"] for m in tp])),
                   treeprobe_cpu_s=float(np.median([m["cpu_seconds"] for m in tp])),
                   treeprobe_rss_gb=float(np.median([m["peak_rss_gb"] for m in tp])), runs=len(tp))
        if "skbio" in runs:
            sk = runs["skbio"]
            row.update(skbio_s=float(np.median([m["seconds"] for m in sk])),
                       skbio_mantel_call_s=float(np.median([m["seconds_mantel_call"] for m in sk])),
                       skbio_rss_gb=float(np.median([m["peak_rss_gb"] for m in sk])),
                       r_abs_diff=float(max(abs(a["statistic"] - b["statistic"]) for a, b in zip(tp, sk))))
            row["ratio"] = row["skbio_s"] / row["treeprobe_s"]
            row["ratio_mantel_call"] = row["skbio_mantel_call_s"] / row["treeprobe_s"]
        rows.append(row)
    print(f"# load average at the end: {open('/proc/loadavg').read().split()[:3]}")
    print("\n| N | treeprobe s (median) | CPU s | peak RSS GiB | scikit-bio s (matrices + mantel) "
          "| scikit-bio mantel() s | peak RSS GiB | speed-up (total / mantel() only) | max abs(r diff) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skbio_s" in r:
            print(f"| {r['n']:,} | {r['treeprobe_s']:.3f} | {r['treeprobe_cpu_s']:.2f} | {r['treeprobe_rss_gb']:.2f} | "
                  f"{r['skbio_s']:.2f} | "
                  f"{r['skbio_mantel_call_s']:.2f} | {r['skbio_rss_gb']:.2f} | {r['ratio']:.0f}× / "
                  f"{r['ratio_mantel_call']:.0f}× | {r['r_abs_diff']:.1e} |")
        else:
            print(f"| {r['n']:,} | {r['treeprobe_s']:.3f} | {r['treeprobe_cpu_s']:.2f} | {r['treeprobe_rss_gb']:.2f} "
                  "| – | – | – | – | – |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, summary=rows, runs=raw), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
