"""kNN rank agreement at scale: exact search vs the query-subsample estimator.

    python benchmarks/bench_knn.py                                   # N = 1,000,000, 100,000 queries
    python benchmarks/bench_knn.py --per-species 10 --queries 10000 --exact   # N = 100,000, vs exact

Data: ``make_synthetic_embeddings.make`` (Brownian traits down the 10,000 real iNat21
species, float32, D = 512), ``--per-species`` images per species. Times
``knn_rank_agreement(X, codes, k=10, max_queries=Q)`` (exact neighbours of Q random query
items among all N; estimate + 95 % CI per rank; with the ceiling-normalised and the
level-specific agreement, or without the latter with ``--no-level``) and, with ``--exact``, the
full exact search (``max_queries=None``) in the same run, printing both tables and whether each
exact value lies inside the estimator's interval. Prints wall time, CPU time and peak RSS;
``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_embeddings import DEFAULT_TAXONOMY, make  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--taxonomy", default=DEFAULT_TAXONOMY)
    ap.add_argument("--per-species", type=int, default=100, help="images per species (100 -> N = 1,000,000)")
    ap.add_argument("--queries", type=int, default=100_000, help="max_queries of the estimator")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact", action="store_true", help="also run the full exact search (O(N^2))")
    ap.add_argument("--no-level", action="store_true", help="skip the level-specific agreement (level=False)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    from treeprobe.neighbors import knn_rank_agreement
    from treeprobe.taxonomy import Taxonomy

    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cpus", flush=True)
    (X, meta), t_make, _ = timed(lambda: make(a.taxonomy, a.per_species, 512, a.seed))
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # in place: the pipeline passes unit rows too
    codes = Taxonomy.from_frame(meta).codes_by_rank()
    n = X.shape[0]
    print(f"data: {n:,} x {X.shape[1]} float32, {meta['species'].nunique():,} species, made in {t_make:.1f} s",
          flush=True)

    res = {"n": n, "dim": int(X.shape[1]), "k": a.k, "queries": a.queries, "loadavg_start": os.getloadavg(),
           "peak_rss_gib_before_knn": peak_rss_gib()}
    print(f"peak RSS before the kNN calls (data + taxonomy): {res['peak_rss_gib_before_knn']:.2f} GiB", flush=True)
    level = not a.no_level
    res["level"] = level
    est, w, c = timed(lambda: knn_rank_agreement(X, codes, k=a.k, max_queries=a.queries, seed=a.seed, level=level))
    res["estimator"] = dict(wall_s=w, cpu_s=c, table=est.to_dict(orient="records"))
    print(f"\nquery-subsample ({min(a.queries, n):,} queries): {w:.1f} s wall, {c:.1f} s CPU, "
          f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    cols = ["rank", "agreement", "agreement_ci95", "chance", "ceiling", "agreement_normalised", "top1", "top1_ci95"]
    if level:
        cols += ["level_agreement", "level_agreement_ci95", "level_chance", "level_ceiling", "level_normalised"]
    print(est[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    if a.exact:
        exact, w, c = timed(lambda: knn_rank_agreement(X, codes, k=a.k, level=level))
        res["exact"] = dict(wall_s=w, cpu_s=c, table=exact.to_dict(orient="records"))
        print(f"\nexact (all {n:,} items): {w:.1f} s wall, {c:.1f} s CPU, peak RSS {peak_rss_gib():.2f} GiB")
        print(exact[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        res["inside_ci"] = {}
        for col in ("agreement", "agreement_normalised") + (("level_agreement", "level_normalised") if level else ()):
            both = pd.DataFrame({"rank": exact["rank"], "exact": exact[col], "estimate": est[col],
                                 "ci95": est[f"{col}_ci95"]})
            both["inside"] = (both["exact"] - both["estimate"]).abs() <= both["ci95"]
            print(f"\n{col}:\n" + both.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            res["inside_ci"][col] = both["inside"].tolist()
    res["peak_rss_gib"] = peak_rss_gib()
    res["loadavg_end"] = os.getloadavg()
    res["command"] = " ".join(["python", *sys.argv])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
