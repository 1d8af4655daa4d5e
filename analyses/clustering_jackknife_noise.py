"""The clustering paired tests of ``treeprobe compare``: where the old jackknife's width came from, and
the calibration of its replacement (NULL_CALIBRATION.md, runs 7 and 9).

    python analyses/clustering_jackknife_noise.py noise                  # run 7's check: worlds 3, 4, seeds 0-5
    python analyses/clustering_jackknife_noise.py calibrate --replicates 200 --out /tmp/cal.json
    python analyses/clustering_jackknife_noise.py calibrate --worlds degraded-small-1.5 --replicates 100 ...

``noise``: for each world of ``same-model-small`` (analyses/null_calibration.py) the two models are compared
with ``compare`` under several seeds (the data stay fixed; the seed moves only the k-means starts and the
jackknife groups). Prints, per rank, the seed-to-seed sd of the k-means purity difference next to the mean
se of each scheme (``cluster_scheme`` "jackknife": every group re-clustered from fresh starts; the default
"warm-jackknife": warm-started groups + the seed variance of the mean over the seeds).

``calibrate``: the paired clustering tests run directly (the internals of ``compare``, without its Mantel
and kNN parts), per world: k-means with the warm-started scheme (``kmeans-warm``), Ward with the
delete-a-group jackknife of ``compare`` (``ward-jackknife``) and, for contrast, Ward with a paired species
bootstrap (``ward-bootstrap``: species drawn with replacement with all their images, the same draw for both
models, the Ward tree rebuilt on the resample; percentile interval and ``(1 + #{|Δ* − Δ̂| ≥ |Δ̂|})/(B + 1)``).
Worlds: ``same-model-small`` (null) and ``degraded-small-<f>`` (the same small world, model b with f × the
noise: power). Prints per test the rejections at α = 0.05 with an exact 95 % interval, and
``mean z²`` = mean (Δ / se)² over worlds (1 for a calibrated normal test; the width ratio is its root).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import null_calibration as nc  # noqa: E402
from treeprobe import compare as cmp  # noqa: E402
from treeprobe.core import TreeData  # noqa: E402

SCHEMES = ("kmeans-warm", "ward-jackknife", "ward-bootstrap")


def world_pair(name: str, i: int):
    """(model a, model b) TreeData of world ``i`` of ``same-model-small`` or ``degraded-small-<f>``."""
    if name == "same-model-small":
        w = nc.WORLDS[name].make(i)
    elif name.startswith("degraded-small-"):
        f = float(name.rsplit("-", 1)[1])
        base = nc.brownian(nc._sub_seed(i, "base"), fraction=0.05, dim=16, trait_dim=16,
                           branching=nc.SMALL_BRANCHING)
        w = nc._two_models(base, 1.0, f, i, name)
    else:
        w = nc.WORLDS[name].make(i)
    a = TreeData(w.X, w.items)
    b = TreeData(np.ascontiguousarray(w.obsm[nc.SECOND_MODEL], dtype=np.float32), w.items)
    return a, b


def noise(args) -> None:
    for world in args.world_ids:
        a, b = world_pair("same-model-small", world)
        out = {}
        for scheme in ("jackknife", "warm-jackknife"):
            diffs, ses = [], []
            for seed in range(args.seeds):
                comp = cmp.compare({"a": a, "b": b}, on="row", seed=seed, permutations=19, bootstrap=99,
                                   similarity=False, distance_profiles=False, cluster_methods=("kmeans",),
                                   chance_permutations=2, cluster_scheme=scheme)
                d = comp.differences
                d = d[d.metric == "kmeans purity"].set_index("rank")
                diffs.append(d["difference"].to_numpy())
                ses.append(((d["ci_high"] - d["ci_low"]) / 3.919927969080108).to_numpy())
            out[scheme] = (np.std(diffs, axis=0, ddof=1), np.mean(ses, axis=0))
        print(f"world {world}, ranks {list(d.index)}")
        print("  seed sd of one-seed difference (old):", np.round(out["jackknife"][0], 4))
        print("  mean se, old cold jackknife:         ", np.round(out["jackknife"][1], 4))
        print("  seed sd of the 4-seed mean (new):    ", np.round(out["warm-jackknife"][0], 4))
        print("  mean se, warm jackknife + seed var:  ", np.round(out["warm-jackknife"][1], 4))


def _ward_rows(a, b, names, units, seed, groups, per_model, diffs):
    from treeprobe.clustering import rankwise_clustering

    aligned = {"a": a, "b": b}
    codes = a.taxonomy.codes_by_rank()
    exact = {}
    tabs = {m: rankwise_clustering(aligned[m].unit, codes, methods=("agglomerative",), seed=seed, n_permutations=1,
                                   progress=False).set_index("rank") for m in names}
    for rank in codes:
        for s in ("purity", "nmi", "ari"):
            exact[(f"agglomerative {s}", rank)] = ([float(tabs[m].loc[rank, s]) for m in names], np.nan, 0)
    jack = cmp._jackknife(aligned, names, units, groups=groups, seed=seed,
                          score=cmp._clustering_scores(("agglomerative",), seed))
    cmp._jackknife_rows(exact, jack, names, per_model, diffs, int(units.max()) + 1, "ward-jackknife")
    return exact


def ward_bootstrap(a, b, units, exact, *, B: int, seed: int) -> dict:
    """{key: (Δ̂, p, ci)}: paired species bootstrap of the Ward scores (tree rebuilt on each resample)."""
    from treeprobe._utils import l2_normalise
    from treeprobe.clustering import _skip_note, _ward_cuts

    S = int(units.max()) + 1
    w = cmp.species_bootstrap_weights(S, B, cmp._sub_seed(seed, "ward-bootstrap")).astype(int)
    members = [np.flatnonzero(units == s) for s in range(S)]
    codes = a.taxonomy.codes_by_rank()
    Xs = [l2_normalise(m.unit).astype(np.float64) for m in (a, b)]
    star = {key: np.full((B, 2), np.nan) for key in exact}
    for r in range(B):
        idx = np.concatenate([np.tile(members[s], w[r, s]) for s in range(S) if w[r, s]])
        ks = {rank: int(np.unique(c[idx]).size) for rank, c in codes.items()}
        ok = [rank for rank in codes if not _skip_note(ks[rank], idx.size)]
        for k_m, X in enumerate(Xs):
            cuts = _ward_cuts(X[idx], [ks[rank] for rank in ok])
            for rank in ok:
                v = cmp._kmeans_score_values(codes[rank][idx], cuts[ks[rank]])
                for s, val in v.items():
                    star[(f"agglomerative {s}", rank)][r, k_m] = val
    out = {}
    for key, (vals, _, _) in exact.items():
        est = vals[0] - vals[1]
        shifts = (star[key][:, 0] - star[key][:, 1]) - est
        out[key] = (est, cmp._bootstrap_p(shifts, est), cmp._percentile_ci(shifts, est))
    return out


def one_world(world: str, i: int, *, seed: int, groups: int, n_seeds: int, B: int, schemes) -> dict:
    """{scheme/metric/rank: (difference, se, p)} for world i."""
    a, b = world_pair(world, i)
    names = ["a", "b"]
    units = cmp.species_units(a)
    rec = {}
    if "kmeans-warm" in schemes:
        per_model, diffs = [], []
        warm = cmp._kmeans_warm_jackknife({"a": a, "b": b}, names, units, groups=groups, seed=seed, n_seeds=n_seeds)
        exact = {key: (None, np.nan, 0) for key in warm}
        cmp._seeded_jackknife_rows(exact, warm, names, per_model, diffs, int(units.max()) + 1, "warm")
        for d in diffs:
            rec[f"kmeans-warm/{d['metric']}/{d['rank']}"] = (d["difference"], (d["ci_high"] - d["ci_low"]) / 3.92,
                                                             d["p_value"])
    if "ward-jackknife" in schemes or "ward-bootstrap" in schemes:
        per_model, diffs = [], []
        exact = _ward_rows(a, b, names, units, seed, groups, per_model, diffs)
        if "ward-jackknife" in schemes:
            for d in diffs:
                rec[f"ward-jackknife/{d['metric']}/{d['rank']}"] = (
                    d["difference"], (d["ci_high"] - d["ci_low"]) / 3.92, d["p_value"])
        if "ward-bootstrap" in schemes:
            for (metric, rank), (est, p, ci) in ward_bootstrap(a, b, units, exact, B=B, seed=seed).items():
                if np.isfinite(est):
                    rec[f"ward-bootstrap/{metric}/{rank}"] = (est, (ci[1] - ci[0]) / 3.92, p)
    return rec


def summarise(results: dict, alpha: float = 0.05) -> list:
    from scipy.stats import binomtest

    rows = []
    for world, recs in results.items():
        tests = sorted({t for r in recs.values() for t in r})
        for t in tests:
            vals = np.array([recs[i][t] for i in recs if t in recs[i]], dtype=float)
            p = vals[:, 2]
            ok = np.isfinite(p)
            k, n = int(np.sum(p[ok] <= alpha)), int(ok.sum())
            if n == 0:
                continue
            ci = binomtest(k, n).proportion_ci(method="exact")
            with np.errstate(invalid="ignore", divide="ignore"):
                z2 = (vals[ok, 0] / vals[ok, 1]) ** 2
            z2 = z2[np.isfinite(z2)]
            rows.append(dict(world=world, test=t, rejected=k, n=n, rate=k / n, lo=ci.low, hi=ci.high,
                             mean_z2=float(np.mean(z2)) if z2.size else np.nan, mean_diff=float(np.mean(vals[ok, 0]))))
    return rows


def calibrate(args) -> None:
    out = Path(args.out) if args.out else None
    results = json.loads(out.read_text()) if out and out.exists() else {}
    t0 = time.perf_counter()
    for world in args.worlds:
        recs = results.setdefault(world, {})
        for i in range(args.replicates):
            if str(i) in recs:
                continue
            recs[str(i)] = one_world(world, i, seed=args.seed + i, groups=args.groups, n_seeds=args.cluster_seeds,
                                     B=args.bootstrap, schemes=args.schemes)
            if out and (i + 1) % 10 == 0:
                out.write_text(json.dumps(results))
            if not args.quiet and (i + 1) % 20 == 0:
                print(f"{world}: {i + 1} worlds, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if out:
        out.write_text(json.dumps(results))
    print(f"wall {time.perf_counter() - t0:.0f} s")
    print("| world | test | rejected | rate | exact 95 % CI | mean z² |")
    print("|---|---|---|---|---|---|")
    for r in summarise(results):
        print(f"| {r['world']} | {r['test']} | {r['rejected']}/{r['n']} | {r['rate']:.3f} | "
              f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['mean_z2']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode")
    n = sub.add_parser("noise", help="seed-to-seed sd against each scheme's se (run 7's check)")
    n.add_argument("--world-ids", type=int, nargs="+", default=[3, 4])
    n.add_argument("--seeds", type=int, default=6)
    c = sub.add_parser("calibrate", help="rejection rates of the clustering paired tests over many worlds")
    c.add_argument("--worlds", nargs="+", default=["same-model-small"])
    c.add_argument("--replicates", type=int, default=200)
    c.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    c.add_argument("--groups", type=int, default=10)
    c.add_argument("--cluster-seeds", type=int, default=cmp.CLUSTER_SEEDS)
    c.add_argument("--bootstrap", type=int, default=199)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="results JSON (resumed)")
    c.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.mode == "calibrate":
        calibrate(args)
    else:
        if args.mode is None:
            args.world_ids, args.seeds = [3, 4], 6
        noise(args)


if __name__ == "__main__":
    main()
