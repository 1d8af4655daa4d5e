"""Calibration of the paired zero-shot test of ``treeprobe compare --zeroshot`` (species bootstrap of the
difference in top-1 accuracy per rank; ``treeprobe.compare._zeroshot_rows``).

    python analyses/zeroshot_paired_null.py --replicates 300 --bootstrap 199          # null + power, ~5 min

Each world: S species on a 7-rank tree (2 kingdoms, branching 2 below, species means Brownian along the
ranks), 2-8 images per species (image = species mean + noise), text vector of each taxon = the mean of its
species' means + text noise. Two models embed the same images:

* **null** ``same-model``: model b = the same base embedding with an independent noise draw of the same
  size as model a's (the two models are equally good; only the draw differs);
* **power** ``degraded``: model b has ``--degrade`` times model a's noise.

Prints, per rank and mode, the share of worlds where p < 0.05 with its exact 95 % binomial interval (the null
rate should contain 0.05) and the mean difference.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd

from treeprobe import compare as cmp
from treeprobe._utils import RANKS
from treeprobe.core import TreeData


def world(seed: int, *, n_species: int = 48, dim: int = 16, noise: float = 1.0, text_noise: float = 0.5):
    """(items, base species means per image (N, D), text by rank {rank: (labels, (T, D))}, per-image noise scale)."""
    rng = np.random.default_rng(seed)
    groups = {"kingdom": 24, "phylum": 12, "class": 12, "order": 6, "family": 6, "genus": 2, "species": 1}
    codes = {r: np.arange(n_species) // g for r, g in groups.items()}
    means = np.zeros((n_species, dim))
    for r in RANKS:  # Brownian: each rank adds a step shared by its descendants
        step = rng.normal(size=(codes[r].max() + 1, dim))
        means += step[codes[r]]
    lin = pd.DataFrame({r: [f"{r[:2]}{c}" for c in codes[r]] for r in RANKS})
    lin["species"] = [f"{lin.genus[s]} sp{s}" for s in range(n_species)]
    per = rng.integers(2, 9, size=n_species)
    sp = np.repeat(np.arange(n_species), per)
    items = lin.iloc[sp].reset_index(drop=True)
    items["path"] = [f"i{i}" for i in range(len(sp))]
    text = {}
    for r in RANKS:
        labels = ["|".join(row) for row in lin[list(RANKS[: RANKS.index(r) + 1])].itertuples(index=False, name=None)]
        uniq = sorted(set(labels))
        lab = np.array(labels)
        vec = np.stack([means[lab == u].mean(axis=0) for u in uniq])
        text[r] = (uniq, vec + text_noise * rng.normal(size=vec.shape))
    return items, means[sp], {"taxonomic": text}, noise


def one(seed: int, *, b_noise_factor: float, bootstrap: int) -> list[dict]:
    items, base, text, noise = world(seed)
    rng = np.random.default_rng([seed, 1])
    X = {m: (base + f * noise * rng.normal(size=base.shape)).astype(np.float32)
         for m, f in (("a", 1.0), ("b", b_noise_factor))}
    aligned = {m: TreeData(x, items) for m, x in X.items()}
    per_model, diffs = [], []
    cmp._zeroshot_rows(aligned, {m: text for m in X}, ["a", "b"], per_model, diffs, bootstrap=bootstrap, seed=seed)
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=300)
    ap.add_argument("--bootstrap", type=int, default=199)
    ap.add_argument("--degrade", type=float, default=1.5, help="noise factor of model b in the power worlds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from scipy.stats import binomtest

    t0 = time.perf_counter()
    print("| world | mode | rank | rejected (p < 0.05) | rate | exact 95 % CI | mean difference |")
    print("|---|---|---|---|---|---|---|")
    for name, factor in (("same-model", 1.0), (f"degraded x{args.degrade:g}", args.degrade)):
        rows = []
        for i in range(args.replicates):
            rows += one(args.seed + i, b_noise_factor=factor, bootstrap=args.bootstrap)
        df = pd.DataFrame(rows)
        for (metric, rank), sub in df.groupby(["metric", "rank"], sort=False):
            k, n = int((sub["p_value"] < 0.05).sum()), int(sub["p_value"].notna().sum())
            ci = binomtest(k, n).proportion_ci(method="exact")
            print(f"| {name} | {metric.split()[1]} | {rank} | {k}/{n} | {k / n:.3f} | [{ci.low:.3f}, {ci.high:.3f}] | "
                  f"{sub['difference'].mean():+.4f} |")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
