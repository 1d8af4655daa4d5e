"""Benchmark: treeprobe's exact partial Mantel test against R's ``vegan::mantel.partial``.

Both compute r(d, t | z) over all item pairs of the same data: d = cosine distance of embeddings,
t = patristic distance on a random rank tree with random rank lengths, z = a categorical
(0 same / 1 different) or numeric (|z_i − z_j|) covariate that partly follows the tree. vegan gets
the three N×N matrices as text files (benchmarks/partial_mantel_vegan.R) and permutes the rows and
columns of t, the scheme of ``partial_mantel_tree(..., pairs="all", permutation="images")``; the
statistics must agree to 1e-9, the p-values up to Monte-Carlo error (other random streams).
Times are wall-clock seconds: vegan's includes R's start and reading the files; ours is the call
alone. The last rows time the species-level default on the bundled BioCLIP 2 set.

    python benchmarks/bench_partial_mantel.py                    # N = 60, 300, 1000; 999 permutations
    python benchmarks/bench_partial_mantel.py --n 60 --permutations 99
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "benchmarks" / "partial_mantel_vegan.R"


def example(n: int, kind: str, seed: int = 0):
    """(X, clades, z) for n items: about n/2 species of 1-3 images on a random 7-rank tree."""
    import pandas as pd

    from treeprobe.taxonomy import RANKS, Taxonomy

    rng = np.random.default_rng(seed)
    n_species = max(2, n // 2)
    lin = pd.DataFrame({r: [f"{r}{rng.integers(k)}" for _ in range(n_species)]
                        for r, k in zip(RANKS[:-1], (2, 3, 4, 6, 8, 12))})
    lin["species"] = [f"s{i}" for i in range(n_species)]
    sp = np.sort(rng.integers(0, n_species, n))
    items = lin.iloc[sp].reset_index(drop=True)
    clades = Taxonomy.from_frame(items).clade_structure(rng.uniform(0.5, 2.0, 7))
    top = (items["kingdom"] == "kingdom0").to_numpy()
    X = rng.normal(size=(n, 16)) + 1.2 * top[:, None] * np.eye(16)[0]
    if kind == "categorical":
        z = np.where(rng.random(n) < np.where(top, 0.7, 0.3), "museum", "field")
    else:
        z = rng.normal(size=n) + top
    return X, clades, z


def run_vegan(X, clades, z, permutations: int, folder: Path) -> tuple[float, float, float]:
    """(statistic, p-value, seconds) of vegan::mantel.partial(t, d, z)."""
    from treeprobe.mantel import cosine_distance_matrix
    from treeprobe.partial_mantel import covariate_distance_matrix

    paths = []
    for name, M in (("t", clades.item_distances()), ("d", cosine_distance_matrix(X)),
                    ("z", covariate_distance_matrix(z))):
        paths.append(folder / f"{name}.txt")
        np.savetxt(paths[-1], M, fmt="%.17g")
    t0 = time.perf_counter()
    out = subprocess.run(["Rscript", str(SCRIPT), *map(str, paths), str(permutations)], capture_output=True,
                         text=True, check=True)
    secs = time.perf_counter() - t0
    vals = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return float(vals["statistic"]), float(vals["signif"]), secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[60, 300, 1000])
    ap.add_argument("--permutations", type=int, default=999)
    args = ap.parse_args(argv)
    from treeprobe.datasets import bioclip2_1k
    from treeprobe.partial_mantel import partial_mantel_data, partial_mantel_tree

    have_r = shutil.which("Rscript") is not None and subprocess.run(
        ["Rscript", "-e", "library(vegan)"], capture_output=True).returncode == 0
    print("| N | z | vegan r | treeprobe r | abs diff | vegan p | treeprobe p | vegan s | treeprobe s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            for kind in ("categorical", "numeric"):
                X, clades, z = example(n, kind)
                t0 = time.perf_counter()
                res = partial_mantel_tree(X, clades, z, kind=kind, pairs="all", permutation="images",
                                          permutations=args.permutations)
                ours = time.perf_counter() - t0
                if have_r:
                    r_v, p_v, s_v = run_vegan(X, clades, z, args.permutations, Path(tmp))
                    print(f"| {n} | {kind} | {r_v:.15f} | {res.statistic:.15f} | {abs(r_v - res.statistic):.1e} "
                          f"| {p_v:.3f} | {res.p_value:.3f} | {s_v:.2f} | {ours:.2f} |")
                else:
                    print(f"| {n} | {kind} | (no Rscript/vegan) | {res.statistic:.15f} | | | {res.p_value:.3f} | "
                          f"| {ours:.2f} |")
    ds = bioclip2_1k()
    for scheme in ("auto", "species"):
        t0 = time.perf_counter()
        res = partial_mantel_data(ds, "img_type", permutations=args.permutations, permutation=scheme)
        print(f"BioCLIP 2 img_type, {res.permutation}, {res.n_pairs} between-species pairs, {args.permutations} "
              f"permutations: r_dt.z {res.statistic:.4f} (p {res.p_value:.3f}), r_dt {res.r_dt:.4f}, "
              f"r_dz {res.r_dz:.4f}, r_tz {res.r_tz:.4f}; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
