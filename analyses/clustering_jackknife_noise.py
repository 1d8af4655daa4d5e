"""The clustering paired tests of ``treeprobe compare``: where the old jackknife's width came from, and
the calibration of its replacement (NULL_CALIBRATION.md, runs 7 and 9).

    python analyses/clustering_jackknife_noise.py noise                  # run 7's check: worlds 3, 4, seeds 0-5
    python analyses/clustering_jackknife_noise.py calibrate --replicates 200 --out /tmp/cal.json
    python analyses/clustering_jackknife_noise.py calibrate --worlds degraded-small-1.5 --replicates 100 ...
    python analyses/clustering_jackknife_noise.py real                   # swap test, BioCLIP 2 vs degraded copy

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
``ward-swap`` / ``kmeans-swap``: ``compare``'s swap test (``cluster_test="swap"``: model labels permuted within
species, ``--bootstrap`` = its number of permutations; run 13). Worlds: ``same-model-small`` (null),
``same-model-small-rotated`` (the same, model b in a random orthonormal basis: the Procrustes step at work) and
``degraded-small-<f>`` (the same small world, model b with f × the noise: power; ``-rotated`` works there too). Prints per test the rejections at α = 0.05 with an exact 95 % interval, and
``mean z²`` = mean (Δ / se)² over worlds (1 for a calibrated normal test; the width ratio is its root).
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import null_calibration as nc  # noqa: E402
from treeprobe import compare as cmp  # noqa: E402
from treeprobe.core import TreeData  # noqa: E402

SCHEMES = ("kmeans-warm", "ward-jackknife", "ward-bootstrap", "ward-swap", "kmeans-swap")


# --- k-means scores: warm-started jackknife plus the seed variance -------------------------------

#: k-means seeds whose scores are averaged in the warm-started scheme.
CLUSTER_SEEDS = 4
_KMEANS_SCORES = ("purity", "nmi", "ari")


def _kmeans_score_values(codes: np.ndarray, labels: np.ndarray) -> dict:
    """Purity, NMI and ARI of a clustering (label arrays (n,)): the values of
    :func:`treeprobe.clustering.clustering_scores` (to rounding), from one contingency matrix."""
    from treeprobe.clustering import _PermutationScorer

    return _PermutationScorer(codes, labels).scores(None, _KMEANS_SCORES)


def warm_start_centres(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Starting centres (k, D) for k-means on the rows ``X`` (n, D) that a full-data clustering had put in
    clusters ``labels`` (int (n,)): the means of the ``k`` clusters that keep the most rows (ties: lower
    label first); when fewer than ``k`` clusters keep a row, the rows farthest from their cluster's mean
    fill the rest (as scikit-learn relocates an empty cluster).

    >>> warm_start_centres(np.array([[0., 0.], [0., 2.], [5., 5.], [9., 9.]]), np.array([3, 3, 1, 0]), 2)
    array([[0., 1.],
           [9., 9.]])
    """
    from scipy import sparse

    X = np.asarray(X)
    labels = np.asarray(labels, dtype=np.int64)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise cmp.TreeprobeError(f"warm start needs 1 <= k <= {n} rows; got k={k}")
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    member = sparse.csr_matrix((np.ones(n), (inv, np.arange(n))), shape=(counts.size, n))
    means = np.asarray(member @ X.astype(np.float64)) / counts[:, None]
    order = np.argsort(-counts, kind="stable")[:k]
    centres = means[order]
    if centres.shape[0] < k:
        d2 = np.einsum("ij,ij->i", X - means[inv], X - means[inv])
        far = np.argsort(-d2, kind="stable")[: k - centres.shape[0]]
        centres = np.vstack([centres, X[far].astype(np.float64)])
    return centres


def _kmeans_warm(Xn: np.ndarray, centres: np.ndarray, seed: int, minibatch_threshold: int) -> np.ndarray:
    """k-means labels (n,) of the normalised rows ``Xn`` started from ``centres`` (k, D) with one run
    (n_init=1): full ``KMeans`` up to ``minibatch_threshold`` rows, mini-batch k-means (float32, the
    batch size and epochs of :func:`treeprobe.clustering.cluster_labels`) above."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from treeprobe.clustering import _MAX_EPOCHS, _MIN_BATCH

    k = centres.shape[0]
    if Xn.shape[0] > minibatch_threshold:
        X32 = np.ascontiguousarray(Xn, dtype=np.float32)
        km = MiniBatchKMeans(n_clusters=k, init=centres.astype(np.float32), n_init=1,
                             batch_size=min(X32.shape[0], max(_MIN_BATCH, 4 * k)), max_iter=_MAX_EPOCHS,
                             random_state=seed)
        return km.fit(X32).labels_.astype(np.int64)
    return KMeans(n_clusters=k, init=centres.astype(Xn.dtype), n_init=1, random_state=seed).fit_predict(Xn).astype(
        np.int64)


def cluster_seed_list(seed: int, n_seeds: int) -> list:
    """The ``n_seeds`` k-means seeds of the clustering paired test: ``seed`` itself (the seed of the
    models' own clustering tables) first, then seeded sub-seeds in [0, 2**31)."""
    cmp.check_int(n_seeds, "cluster_seeds", minimum=1)
    return [int(seed)] + [cmp._sub_seed(seed, f"kmeans-seed-{r}") % cmp.SEED_BOUND for r in range(1, n_seeds)]


def _kmeans_warm_jackknife(aligned: dict, names: list, units: np.ndarray, *, groups: int, seed: int,
                           n_seeds: int) -> dict:
    """{(\"kmeans <score>\", rank): (values (R, M), replicates (G, M))} for purity, NMI and ARI.

    values: each model's k-means scores at each of the R seeds of :func:`cluster_seed_list` on all items
    (the first seed's equal the models' clustering tables). replicates: with one of ``groups`` random
    groups of species left out in turn (the groups of :func:`_jackknife`), k-means re-run once on the
    rest, started from the first seed's full-data clustering (:func:`warm_start_centres`, k = the taxa
    left at the rank). Ranks with a skip note of :func:`treeprobe.clustering.rankwise_clustering`
    (one taxon, k >= items) get NaN."""
    from threadpoolctl import threadpool_limits

    from treeprobe._utils import SINGLE_THREAD_MAX_ITEMS, l2_normalise
    from treeprobe.clustering import MINIBATCH_THRESHOLD, N_INIT, _kmeans, _skip_note
    from treeprobe.neighbors import _unknown_mask

    S = int(units.max()) + 1
    if groups > S:
        raise cmp.TreeprobeError(f"{groups} jackknife groups need at least as many species units; got {S}")
    group = np.random.default_rng(cmp._sub_seed(seed, "jackknife")).permutation(S) % groups
    seeds = cluster_seed_list(seed, n_seeds)
    codes_by_rank = aligned[names[0]].taxonomy.codes_by_rank()
    n = len(units)
    out: dict = {}
    with threadpool_limits(1 if n <= SINGLE_THREAD_MAX_ITEMS else None):
        for k_m, m in enumerate(names):
            Xn = l2_normalise(aligned[m].unit)
            Xk = np.ascontiguousarray(Xn, dtype=np.float32) if n > MINIBATCH_THRESHOLD else Xn
            for rank, codes in codes_by_rank.items():
                codes = np.asarray(codes)
                known = ~_unknown_mask(codes)
                c_known = codes[known]
                k = int(np.unique(c_known).size)
                keys = [(f"kmeans {s}", rank) for s in _KMEANS_SCORES]
                for key in keys:
                    out.setdefault(key, (np.full((len(seeds), len(names)), np.nan),
                                         np.full((groups, len(names)), np.nan)))
                if _skip_note(k, int(known.sum())):
                    continue
                Xr = Xk if known.all() else Xk[known]
                first = None
                for r, s in enumerate(seeds):
                    labels = _kmeans(Xr, k, s, N_INIT, MINIBATCH_THRESHOLD)
                    first = labels if r == 0 else first
                    for sc, v in _kmeans_score_values(c_known, labels).items():
                        out[(f"kmeans {sc}", rank)][0][r, k_m] = v
                u_known = units[known]
                for g in range(groups):
                    keep = group[u_known] != g
                    sub_codes = c_known[keep]
                    k_sub = int(np.unique(sub_codes).size)
                    if _skip_note(k_sub, int(keep.sum())):
                        continue
                    centres = warm_start_centres(Xr[keep], first[keep], k_sub)
                    labels = _kmeans_warm(Xr[keep], centres, seeds[0], MINIBATCH_THRESHOLD)
                    for sc, v in _kmeans_score_values(sub_codes, labels).items():
                        out[(f"kmeans {sc}", rank)][1][g, k_m] = v
    return out


def _seeded_jackknife_rows(exact: dict, warm: dict, names: list, per_model: list, diffs: list, n_units: int,
                           scheme: str) -> None:
    """Per-model and paired-difference rows of the warm-started k-means jackknife: estimate = mean over
    the R seeds; variance = jackknife variance of the warm replicates + seed variance / R."""
    z = 1.959963984540054
    for key, (values, reps) in warm.items():
        if key not in exact or not np.all(np.isfinite(values)):
            continue
        _, chance, n = exact[key]
        R = values.shape[0]
        est = values.mean(axis=0)

        def se(v_seeds, v_reps):
            seed_var = float(np.var(v_seeds, ddof=1)) / R if R >= 2 else 0.0
            return float(np.sqrt(cmp._jackknife_se(v_reps) ** 2 + seed_var))

        for k, m in enumerate(names):
            s = se(values[:, k], reps[:, k])
            per_model.append(cmp._model_row(m, key[0], key[1], est[k], (est[k] - z * s, est[k] + z * s), chance, n=n))
        for a, b in itertools.combinations(range(len(names)), 2):
            d = est[a] - est[b]
            s = se(values[:, a] - values[:, b], reps[:, a] - reps[:, b])
            diffs.append(cmp._diff_row(key[0], key[1], names[a], names[b], est[a], est[b], (d - z * s, d + z * s),
                                   cmp._normal_p(d, s), n_units, scheme))



def world_pair(name: str, i: int):
    """(model a, model b) TreeData of world ``i`` of ``same-model-small`` or ``degraded-small-<f>``."""
    rotate = name.endswith("-rotated")  # model b in a random orthonormal basis: the same model, other axes
    name = name.removesuffix("-rotated")
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
    Xb = np.asarray(w.obsm[nc.SECOND_MODEL], dtype=np.float64)
    if rotate:
        from scipy.stats import ortho_group

        Xb = Xb @ ortho_group.rvs(Xb.shape[1], random_state=nc._sub_seed(i, "rotation"))
    b = TreeData(np.ascontiguousarray(Xb, dtype=np.float32), w.items)
    return a, b


def noise(args) -> None:
    """Run 7's check: seed-to-seed sd of the k-means purity difference (data fixed) vs the jackknife se."""
    for world in args.world_ids:
        a, b = world_pair("same-model-small", world)
        diffs, ses = [], []
        for seed in range(args.seeds):
            comp = cmp.compare({"a": a, "b": b}, on="row", seed=seed, permutations=19, bootstrap=99,
                               similarity=False, distance_profiles=False, cluster_methods=("kmeans",),
                               chance_permutations=2)
            d = comp.differences
            d = d[d.metric == "kmeans purity"].set_index("rank")
            diffs.append(d["difference"].to_numpy())
            ses.append(((d["ci_high"] - d["ci_low"]) / 3.919927969080108).to_numpy())
        print(f"world {world}, ranks {list(d.index)}")
        print("  seed sd of the difference:", np.round(np.std(diffs, axis=0, ddof=1), 4))
        print("  mean jackknife se:        ", np.round(np.mean(ses, axis=0), 4))


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
                v = _kmeans_score_values(codes[rank][idx], cuts[ks[rank]])
                for s, val in v.items():
                    star[(f"agglomerative {s}", rank)][r, k_m] = val
    out = {}
    for key, (vals, _, _) in exact.items():
        est = vals[0] - vals[1]
        shifts = (star[key][:, 0] - star[key][:, 1]) - est
        out[key] = (est, cmp._bootstrap_p(shifts, est), cmp._percentile_ci(shifts, est))
    return out


def swap_test(a, b, units, *, method: str, B: int, seed: int) -> dict:
    """{(metric, rank): p}: ``compare``'s swap test (``treeprobe.compare._swap_p_values``: each species' images
    swapped between the models with probability 1/2, model b rotated onto model a by Procrustes first, both
    hybrids re-clustered by ``method`` with ``compare``'s scores), B permutations."""
    return cmp._swap_p_values(a.unit, b.unit, a.taxonomy.codes_by_rank(), units, permutations=B,
                              seed=cmp._sub_seed(seed, "swap a b"), score=cmp._clustering_scores((method,), seed))


def one_world(world: str, i: int, *, seed: int, groups: int, n_seeds: int, B: int, schemes) -> dict:
    """{scheme/metric/rank: (difference, se, p)} for world i."""
    a, b = world_pair(world, i)
    names = ["a", "b"]
    units = cmp.species_units(a)
    rec = {}
    if "kmeans-warm" in schemes:
        per_model, diffs = [], []
        warm = _kmeans_warm_jackknife({"a": a, "b": b}, names, units, groups=groups, seed=seed, n_seeds=n_seeds)
        exact = {key: (None, np.nan, 0) for key in warm}
        _seeded_jackknife_rows(exact, warm, names, per_model, diffs, int(units.max()) + 1, "warm")
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
    for scheme, method in (("ward-swap", "agglomerative"), ("kmeans-swap", "kmeans")):
        if scheme in schemes:
            for (metric, rank), p in swap_test(a, b, units, method=method, B=B, seed=seed).items():
                rec[f"{scheme}/{metric}/{rank}"] = (np.nan, np.nan, p)
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
    rows = summarise(results)
    for r in rows:
        print(f"| {r['world']} | {r['test']} | {r['rejected']}/{r['n']} | {r['rate']:.3f} | "
              f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['mean_z2']:.2f} |")
    pooled: dict = {}
    for r in rows:  # all tests of a scheme together (tests of one world are correlated: a description only)
        k_n = pooled.setdefault((r["world"], r["test"].split("/")[0]), [0, 0, 1.0, 0.0])
        k_n[0] += r["rejected"]
        k_n[1] += r["n"]
        k_n[2], k_n[3] = min(k_n[2], r["rate"]), max(k_n[3], r["rate"])
    for (world, scheme), (k, n, lo, hi) in pooled.items():
        print(f"pooled {world} {scheme}: {k}/{n} = {k / n:.3f} (per test {lo:.3f}-{hi:.3f})")


def real(args) -> None:
    """The swap test on the 902 bundled BioCLIP-2 vectors against their rotated + noisy copy (the known-truth
    comparison of analyses/README.md, ``compare_models.degraded_copy(noise=0.5, seed=1)``), k-means scores."""
    from compare_models import degraded_copy

    from treeprobe import datasets

    ds = datasets.bioclip2_1k()
    dg = degraded_copy(ds, noise=0.5, seed=1)
    units, codes = cmp.species_units(ds), ds.taxonomy.codes_by_rank()
    score = cmp._clustering_scores(("kmeans",), 0)
    t0 = time.perf_counter()
    sa, sb = score(ds.unit, codes), score(dg.unit, codes)
    p = cmp._swap_p_values(ds.unit, dg.unit, codes, units, permutations=args.permutations,
                           seed=cmp._sub_seed(0, "swap bioclip2 degraded"), score=score)
    print(f"{time.perf_counter() - t0:.0f} s, {args.permutations} permutations")
    print("| metric | rank | BioCLIP 2 | degraded | difference | swap p |\n|---|---|---|---|---|---|")
    for k in sorted(p, key=lambda k: (k[0], list(codes).index(k[1]))):
        print(f"| {k[0]} | {k[1]} | {sa[k]:.3f} | {sb[k]:.3f} | {sa[k] - sb[k]:.3f} | {p[k]:.2f} |")
    print(f"{sum(v <= 0.05 for v in p.values())} of {len(p)} tests at p <= 0.05")


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
    c.add_argument("--cluster-seeds", type=int, default=CLUSTER_SEEDS)
    c.add_argument("--bootstrap", type=int, default=199)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="results JSON (resumed)")
    c.add_argument("--quiet", action="store_true")
    r = sub.add_parser("real", help="the swap test on BioCLIP 2 vs its rotated + noisy copy (known truth)")
    r.add_argument("--permutations", type=int, default=99)
    args = ap.parse_args()
    if args.mode == "calibrate":
        calibrate(args)
    elif args.mode == "real":
        real(args)
    else:
        if args.mode is None:
            args.world_ids, args.seeds = [3, 4], 6
        noise(args)


if __name__ == "__main__":
    main()
