"""t-SNE / UMAP maps: treeprobe against its anchors, timed in the same run.

For each N (random rows of the synthetic iNat21 embeddings, see make_synthetic_embeddings.py),
L2-normalised once, then timed on the same rows:

* t-SNE: ``treeprobe.embedding_maps.tsne_2d`` (openTSNE FFT, n_jobs threads) vs
  ``sklearn.manifold.TSNE`` (Barnes-Hut, cosine, PCA init, 750 iterations, n_jobs) vs
  ``openTSNE.TSNE`` called directly (its defaults: Annoy neighbours, n_jobs threads);
* UMAP: ``treeprobe.embedding_maps.umap_2d`` vs ``umap.UMAP`` called directly (cosine,
  ``random_state`` set, i.e. umap-learn's reproducible single-threaded mode).

A warm-up call on 4,500 points first pays numba compilation for every library (not timed;
above 4,096 points umap-learn switches to pynndescent, whose compilation would otherwise land
in the first timed UMAP call).
Prints one line per (method, N, implementation) with seconds and the ratio anchor/treeprobe;
``--json`` writes them. The 100K row runs treeprobe only (``--big``).

    python benchmarks/bench_maps.py                    # N = 5000, 20000; 1 repeat
    python benchmarks/bench_maps.py --sizes 5000 --repeats 3
    python benchmarks/bench_maps.py --sizes 5000,20000 --big 100000

Note the machine load (``uptime``) with the numbers: other jobs share the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "_data" / "inat21_synth_100k" / "embeddings.npy"


def _load(path: Path, n: int, seed: int = 0) -> np.ndarray:
    X = np.load(path, mmap_mode="r")
    idx = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=min(n, X.shape[0]), replace=False))
    Xs = np.asarray(X[idx], dtype=np.float32)
    return Xs / np.linalg.norm(Xs, axis=1, keepdims=True)


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(sizes, big, repeats, n_jobs, data, anchors=True):
    from openTSNE import TSNE as OpenTSNE
    from sklearn.manifold import TSNE as SkTSNE
    import umap

    from treeprobe.embedding_maps import tsne_2d, umap_2d

    impls = {
        "tsne": {
            "treeprobe": lambda X: tsne_2d(X, seed=0, n_jobs=n_jobs),
            "sklearn": lambda X: SkTSNE(n_components=2, perplexity=30.0, metric="cosine", init="pca",
                                        max_iter=750, random_state=0, n_jobs=n_jobs).fit_transform(X),
            "openTSNE": lambda X: OpenTSNE(n_components=2, perplexity=30.0, metric="cosine", n_jobs=n_jobs,
                                           random_state=0).fit(X),
        },
        "umap": {
            "treeprobe": lambda X: umap_2d(X, seed=0),
            "umap-learn": lambda X: umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, metric="cosine",
                                              random_state=0).fit_transform(X),
        },
    }
    warm = _load(data, 4500, seed=1)
    for m in impls.values():
        for name, fn in m.items():
            fn(warm)
    rows = []
    plan = [(n, True) for n in sizes] + [(n, False) for n in big]
    for n, with_anchors in plan:
        X = _load(data, n)
        for method, m in impls.items():
            base = None
            for name, fn in m.items():
                if name != "treeprobe" and not (anchors and with_anchors):
                    continue
                ts = _time(lambda: fn(X), repeats)
                med = float(np.median(ts))
                if name == "treeprobe":
                    base = med
                row = dict(method=method, n=n, impl=name, seconds=med, runs=ts, load1=os.getloadavg()[0],
                           ratio_vs_treeprobe=(med / base) if base else None)
                rows.append(row)
                ratio = f"  x{med / base:.2f} of treeprobe" if base and name != "treeprobe" else ""
                print(f"{method:5s} N={n:>7d} {name:10s} {med:8.1f} s  (runs {', '.join(f'{t:.1f}' for t in ts)};"
                      f" load {row['load1']:.1f}){ratio}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,20000", help="N with anchors (comma-separated)")
    ap.add_argument("--big", default="", help="N for treeprobe only, e.g. 100000")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if not Path(a.data).exists():
        raise SystemExit(f"{a.data} missing: run benchmarks/make_synthetic_embeddings.py first")
    sizes = [int(v) for v in a.sizes.split(",") if v]
    big = [int(v) for v in a.big.split(",") if v]
    rows = run(sizes, big, a.repeats, a.n_jobs, Path(a.data), anchors=not a.no_anchors)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
