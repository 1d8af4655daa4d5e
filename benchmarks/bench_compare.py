"""``treeprobe.compare`` on synthetic precomputed embeddings: its cost next to one intrinsic run per model.

Three models on the same items of ``make_synthetic_embeddings.py`` (real iNat21 taxonomy, Brownian
traits): the embeddings as made, the same plus isotropic noise, and a random rotation of them plus
more noise. Prints the wall time of one plain ``tl.intrinsic`` run, then the comparison's stages
(``Comparison.params["timings"]``): one intrinsic run per model, the species bootstrap of the Mantel r,
the jackknife of the kNN and clustering scores, CKA / RSA and the distance profiles, and the ratio

    (intrinsic runs inside compare + everything but the paired tests) / (models × one intrinsic run)

which the issue's target bounds by 1.5 (the paired tests are reported on their own line).

    python benchmarks/bench_compare.py                       # 100,000 x 512, 10,000 species (long)
    python benchmarks/bench_compare.py --per-species 2       # 20,000 x 512
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _data(per_species: int, dim: int) -> Path:
    out = HERE / "_data" / f"inat21_synth_{per_species}x_{dim}d"
    if not (out / "embeddings.npy").exists():
        subprocess.run([sys.executable, str(HERE / "make_synthetic_embeddings.py"), "--per-species", str(per_species),
                        "--dim", str(dim), "--out", str(out)], check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-species", type=int, default=10, help="images per species (10: N = 100,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--permutations", type=int, default=199)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--jackknife", type=int, default=10)
    ap.add_argument("--cluster-methods", default="kmeans")
    args = ap.parse_args(argv)

    from treeprobe import tl
    from treeprobe.core import TreeData

    folder = _data(args.per_species, args.dim)
    X = np.load(folder / "embeddings.npy")
    items = pd.read_csv(folder / "metadata.csv")
    items["path"] = [f"item_{i}" for i in range(len(items))]
    rng = np.random.default_rng(0)
    scale = float(X.std())
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], X.shape[1])))
    models = {"base": X,
              "noisy": (X + 0.5 * scale * rng.standard_normal(X.shape)).astype(np.float32),
              "rotated": (X @ Q + 1.0 * scale * rng.standard_normal(X.shape)).astype(np.float32)}
    methods = tuple(m for m in args.cluster_methods.split(",") if m and m != "none")
    kw = dict(permutations=args.permutations, cluster_methods=methods, maps=(), progress=False)
    print(f"N = {len(X):,}, D = {X.shape[1]}, species = {items['species'].nunique():,}, models = {len(models)}")
    t0 = time.perf_counter()
    tl.intrinsic(TreeData(X, items), **kw)
    one = time.perf_counter() - t0
    print(f"one intrinsic run: {one:.1f} s")
    t0 = time.perf_counter()
    comp = tl.compare({k: TreeData(v, items) for k, v in models.items()}, bootstrap=args.bootstrap,
                      jackknife=args.jackknife, **kw)
    total = time.perf_counter() - t0
    t = comp.params["timings"]
    for key, value in t.items():
        print(f"  {key:<28s} {value:8.1f} s")
    paired = sum(v for k, v in t.items() if k in ("mantel_bootstrap_s", "knn_jackknife_s", "clustering_jackknife_s"))
    rest = total - paired
    print(f"compare total {total:.1f} s = paired tests {paired:.1f} s + the rest {rest:.1f} s")
    print(f"ratio (compare without the paired tests) / ({len(models)} x one intrinsic run) = "
          f"{rest / (len(models) * one):.2f} (target <= 1.5)")
    d = comp.differences
    print(d[d.metric.str.startswith("mantel")][["metric", "rank", "model_a", "model_b", "difference", "ci_low",
                                                "ci_high", "p_value"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
