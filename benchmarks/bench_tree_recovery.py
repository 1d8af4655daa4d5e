"""Benchmark: the tree recovered from taxon centroids (``treeprobe.tree_recovery``).

S species (1,000 / 5,000 / 10,000 by default) drawn from the 10,000 real iNat21 species
(/work/shared/data/inat2021_taxonomy/metadata.csv, or --metadata; a simulated world when absent), one
512-d centroid each: a Brownian walk down the rank taxonomy (one unit of variance per rank and
dimension) plus isotropic noise (--noise, in the same units), so the tree is recoverable but not
perfectly. Times (wall-clock seconds, the call alone) of

* the cosine distance matrix, UPGMA (scipy average linkage) and neighbour joining (numpy, O(S³):
  only up to --nj-max species);
* each score once on each tree: cophenetic correlation, Robinson–Foulds, dendrogram purity and
  monophyly (all six ranks above species);
* ``tree_scores`` with --permutations permutations (every score with its null), reported per
  permutation and extrapolated to 999.

Each S runs in its own subprocess, so its peak RSS is clean.

    python benchmarks/bench_tree_recovery.py                      # S = 1,000, 5,000, 10,000
    python benchmarks/bench_tree_recovery.py --sizes 1000 5000 --nj-max 5000 --json out.json
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


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _taxonomy(S: int, metadata: Path, seed: int):
    """(Taxonomy of S species, source text): S of the iNat21 species (seeded), or a simulated world."""
    import pandas as pd

    from treeprobe.taxonomy import RANKS, Taxonomy

    if metadata.exists():
        meta = pd.read_csv(metadata, dtype=str)
        if S > len(meta):
            raise SystemExit(f"{metadata} has {len(meta)} species; asked for {S}")
        rows = np.sort(np.random.default_rng(seed).choice(len(meta), size=S, replace=False))
        return Taxonomy.from_frame(meta.iloc[rows][list(RANKS)]), f"{S} of the iNat21 species ({metadata.name})"
    from treeprobe.simulate import simulate_world

    k = int(np.ceil(S / 1000))
    w = simulate_world(n_kingdoms=k, branching=[2, 2, 2, 5, 5, 4], images_per_species=1, dim=2, seed=seed)
    return Taxonomy.from_frame(w.species_lineage.iloc[:S]), f"simulated world ({S} species)"


def _centroids(tax, dim: int, noise: float, seed: int) -> np.ndarray:
    """Brownian walk down the rank tree: each node adds N(0, length · I_dim); species centroid = its
    leaf's root-path sum + N(0, noise² · I_dim). float64 (S, dim)."""
    cs = tax.clade_structure()
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((cs.n_nodes, dim)) * np.sqrt(cs.length)[:, None]
    X = cs.membership().T @ steps  # (S, dim): sum of the steps above each species
    return np.asarray(X) + noise * rng.standard_normal(X.shape)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_one(S: int, args) -> dict:
    """All measurements at one S (run inside the subprocess)."""
    from treeprobe import tree_recovery as tr
    from treeprobe.mantel import cosine_distance_matrix

    tax, source = _taxonomy(S, Path(args.metadata), args.seed)
    X = _centroids(tax, args.dim, args.noise, args.seed)
    ref = tax.clade_structure()
    groups = {r: tax.codes(r) for r in tax.ranks[:-1]}
    out = dict(S=S, dim=args.dim, source=source, permutations=args.permutations)
    D, out["cosine_s"] = _timed(cosine_distance_matrix, X)
    trees = {}
    trees["upgma"], out["upgma_s"] = _timed(tr.upgma, D)
    if S <= args.nj_max:
        trees["nj"], out["nj_s"] = _timed(tr.neighbor_joining, D)
    del D
    for name, t in trees.items():
        m = t.clades.membership().nnz / S
        out[f"{name}_mean_depth"] = round(m, 1)
        r, out[f"{name}_cophenetic_s"] = _timed(tr.cophenetic_correlation, t, ref)
        rf, out[f"{name}_rf_s"] = _timed(tr.robinson_foulds, t, ref)
        t0 = time.perf_counter()
        purity = {k: tr.dendrogram_purity(t, c) for k, c in groups.items()}
        out[f"{name}_purity_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mono = {k: float(np.nanmean(tr.monophyly(t, c))) for k, c in groups.items()}
        out[f"{name}_monophyly_s"] = time.perf_counter() - t0
        out[f"{name}_cophenetic_r"], out[f"{name}_nrf"] = round(r, 4), round(rf["nrf"], 4)
        out[f"{name}_genus_purity"], out[f"{name}_genus_monophyly"] = round(purity["genus"], 4), round(mono["genus"], 4)
        _, base = _timed(tr.tree_scores, t, ref, groups, permutations=0, seed=args.seed)
        sc, full = _timed(tr.tree_scores, t, ref, groups, permutations=args.permutations, seed=args.seed)
        per = (full - base) / max(args.permutations, 1)
        out[f"{name}_scores_setup_s"] = base
        out[f"{name}_per_permutation_s"] = per
        out[f"{name}_scores_999_s"] = base + 999 * per
        out[f"{name}_cophenetic_r_null"] = round(float(sc.summary["cophenetic_r_null"].iloc[0]), 4)
    out["peak_rss_gb"] = round(_rss_gb(), 2)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000], help="numbers of species S")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=6.0, help="centroid noise sd (Brownian: 1 per rank)")
    p.add_argument("--nj-max", type=int, default=10000, help="largest S for neighbour joining (O(S³))")
    p.add_argument("--permutations", type=int, default=49, help="permutations timed (extrapolated to 999)")
    p.add_argument("--metadata", default=str(DEFAULT_METADATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one S, print JSON
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args)))
        return 0
    rows = []
    for S in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(S), "--dim", str(args.dim), "--noise", str(args.noise),
               "--nj-max", str(args.nj_max), "--permutations", str(args.permutations), "--metadata", args.metadata,
               "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"S = {S}: done", file=sys.stderr, flush=True)
    print(f"# tree recovery benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {rows[0]['source'].split(' (')[0]}, "
          f"{args.dim}-d centroids, noise {args.noise}")
    keys = [k for k in rows[0] if k not in ("S", "source", "dim", "permutations")]
    keys += [k for r in rows for k in r if k not in keys and k not in ("S", "source", "dim", "permutations")]
    keys = list(dict.fromkeys(keys))
    print(f"{'measurement':32s}" + "".join(f"{'S=' + str(r['S']):>12s}" for r in rows))
    for k in keys:
        print(f"{k:32s}" + "".join(f"{_fmt(r.get(k, '-')):>12s}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
