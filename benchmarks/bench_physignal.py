"""Benchmark: K_mult (treeprobe.physignal) at 10,000 species × 512 dims, on a random tree and a rank taxonomy.

Two trees, same sizes:

* ``random``: a random binary coalescent tree (Kingman: branch lengths from exponential waiting
  times; 2S − 1 nodes, depth ~30 at S = 10,000).
* ``rank``: the 7-rank iNat21 taxonomy of /work/shared/data/inat2021_taxonomy/metadata.csv (10,000
  real species, unit length per rank, polytomies everywhere), or, when that file is absent, a
  simulated rank taxonomy (treeprobe.simulate) cut to the first S species.

Traits: Brownian motion along the tree (D independent columns, so K ≈ 1), as float64 rows.
Timed (wall clock, best of ``--repeats``): preparing the tree (``phylo_tree``), one statistic
(``kmult``), and ``kmult_test`` with 999 permutations (the per-axis table on 10 axes included) on
``--jobs`` threads. The first call compiles or loads the numba kernels; that warm-up is not timed.

    python benchmarks/bench_physignal.py                        # both trees, S = 10,000, D = 512, 1 thread
    python benchmarks/bench_physignal.py --jobs 2 --trees random
    python benchmarks/bench_physignal.py --species 2000 --dims 64 --permutations 199
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INAT = ROOT.parent / "shared" / "data" / "inat2021_taxonomy" / "metadata.csv"


def coalescent_tree(S: int, seed: int):
    """(parent, length, tips) of a Kingman coalescent tree over S tips, nodes in pre-order."""
    rng = np.random.default_rng(seed)
    n = 2 * S - 1
    par = np.full(n, -1, dtype=np.int64)
    ln = np.zeros(n)
    height = np.zeros(n)
    active = list(range(S))
    t, nxt = 0.0, S
    while len(active) > 1:
        k = len(active)
        t += rng.exponential(2.0 / (k * (k - 1)))
        pick = []
        for _ in range(2):  # swap-remove two random lineages
            i = int(rng.integers(len(active)))
            active[i], active[-1] = active[-1], active[i]
            pick.append(active.pop())
        for c in pick:
            par[c], ln[c] = nxt, t - height[c]
        height[nxt] = t
        active.append(nxt)
        nxt += 1
    children = [[] for _ in range(n)]
    for v in range(n - 1):
        children[par[v]].append(v)
    order, stack = [], [n - 1]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(children[v]))
    new = np.empty(n, dtype=np.int64)
    new[order] = np.arange(n)
    order = np.asarray(order)
    parent = np.where(par[order] >= 0, new[np.maximum(par[order], 0)], -1)
    return parent, ln[order], new[np.arange(S)]


def rank_tree(S: int, seed: int):
    """(parent, length, tips, source) of a 7-rank taxonomy with unit rank lengths over S species."""
    import pandas as pd

    from treeprobe.taxonomy import RANKS, Taxonomy

    if INAT.exists():
        df = pd.read_csv(INAT, usecols=list(RANKS)).drop_duplicates("species")
        source = f"iNat21 taxonomy ({len(df)} species)"
        if len(df) > S:
            df = df.sample(S, random_state=seed)
    else:
        from treeprobe.simulate import simulate_world

        w = simulate_world(seed=seed, branching=[(3, 5), (3, 5), (2, 5), (2, 5), (2, 4), (2, 5)], dim=2,
                           trait_dim=1, images_per_species=1)
        df = w.species_lineage.iloc[:S]
        source = f"simulated rank taxonomy ({len(df)} species)"
    cs = Taxonomy.from_frame(df.reset_index(drop=True)).clade_structure()
    return cs.parent, cs.length, cs.item_node, source


def brownian(parent, length, tips, D: int, seed: int) -> np.ndarray:
    """Brownian traits (len(tips), D) along the tree (rate 1 per unit length, root 0), level by level."""
    from treeprobe.tree import tree_depth

    rng = np.random.default_rng(seed)
    depth = tree_depth(parent)
    x = np.zeros((len(parent), D))
    order = np.argsort(depth, kind="stable")
    bounds = np.cumsum(np.bincount(depth))
    for d in range(1, len(bounds)):
        nodes = order[bounds[d - 1]:bounds[d]]
        x[nodes] = x[parent[nodes]] + rng.standard_normal((len(nodes), D)) * np.sqrt(length[nodes])[:, None]
    return x[tips]


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--species", type=int, default=10_000)
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--trees", nargs="+", default=["random", "rank"], choices=["random", "rank"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from treeprobe.physignal import _kernel, kmult, kmult_test, phylo_tree

    print(f"# K_mult benchmark: S = {args.species}, D = {args.dims}, {args.permutations} permutations, "
          f"{args.jobs} thread(s); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, numba kernel: {_kernel(False) is not None}")
    for kind in args.trees:
        if kind == "random":
            parent, length, tips = coalescent_tree(args.species, args.seed)
            source = "random coalescent tree"
        else:
            parent, length, tips, source = rank_tree(args.species, args.seed)
        Y = brownian(parent, length, tips, args.dims, args.seed + 1)
        t_prep, tr = best(lambda: phylo_tree(parent, length, tips), args.repeats)
        kmult_test(Y[:, :2], tr, permutations=2, n_axes=2)  # warm-up: compile / load both kernels
        t_k, k = best(lambda: kmult(Y, tr), args.repeats)
        t_p, res = best(lambda: kmult_test(Y, tr, permutations=args.permutations, seed=args.seed, n_jobs=args.jobs),
                        args.repeats)
        print(f"\n## {kind}: {source}")
        print(f"species {tr.n_tips}, reduced tree {tr.n_nodes} nodes, depth {tr.max_depth}")
        print(f"phylo_tree (prepare)            {t_prep:8.3f} s")
        print(f"kmult (one statistic)           {t_k:8.3f} s   K = {k:.4f}")
        print(f"kmult_test ({args.permutations} permutations)  {t_p:8.3f} s   "
              f"({1000 * t_p / max(args.permutations, 1):.1f} ms per permutation incl. 10 axes)   "
              f"K = {res.statistic:.4f}, p = {res.p_value:.4f}, z = {res.z:.2f}")
        print("per axis:", ", ".join(f"PC{a}: K={kk:.3f}" for a, kk in zip(res.per_axis.axis[:5], res.per_axis.K[:5])))


if __name__ == "__main__":
    main()
