"""treeprobe.compare: alignment, the paired statistics against explicit computations, and the comparison."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from treeprobe import compare as cmp
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError
from treeprobe.simulate import simulate_world


def _world(seed=0, signal=0.3, **kw):
    w = simulate_world(seed=seed, signal=signal, n_kingdoms=2, images_per_species=(1, 3), dim=16, **kw)
    items = w.items.copy()
    items["path"] = [f"img_{i:04d}.png" for i in range(len(items))]
    return TreeData(w.embeddings.astype(np.float32), items)


# --- pure statistics ---------------------------------------------------------------------------


def test_pair_bootstrap_pearson_equals_repeated_pairs():
    """Weighted r with integer weights = scipy's r on each pair repeated w_u·w_v times (catches a wrong
    weight product, a sum over the wrong column or a variance without the mean correction)."""
    rng = np.random.default_rng(0)
    P, S = 300, 25
    ui, uj = rng.integers(0, S, P), rng.integers(0, S, P)
    t = rng.integers(0, 6, P).astype(float)
    d = np.stack([0.3 * t + rng.standard_normal(P), rng.standard_normal(P)])
    w = rng.multinomial(S, np.full(S, 1 / S), size=3).astype(float)
    r, rb = cmp.pair_bootstrap_pearson(d, t, ui=ui, uj=uj, weights=w)
    for m in range(2):
        assert r[m] == pytest.approx(stats.pearsonr(d[m], t)[0], abs=1e-12)
        for b in range(3):
            rep = (w[b, ui] * w[b, uj]).astype(int)
            assert rb[b, m] == pytest.approx(stats.pearsonr(np.repeat(d[m], rep), np.repeat(t, rep))[0], abs=1e-10)


def test_pair_bootstrap_partial_equals_residual_correlation():
    """The partial r(d, t | z) equals the correlation of the residuals of d and t on z."""
    rng = np.random.default_rng(1)
    P = 400
    z = rng.integers(0, 2, P).astype(float)
    t = rng.integers(0, 5, P) + z
    d = 0.2 * t + 0.5 * z + rng.standard_normal(P)
    r, _ = cmp.pair_bootstrap_pearson(d, t, ui=np.zeros(P, int), uj=np.ones(P, int), weights=np.ones((1, 2)), z=z)

    def resid(y):
        A = np.c_[np.ones(P), z]
        return y - A @ np.linalg.lstsq(A, y, rcond=None)[0]

    assert r[0] == pytest.approx(stats.pearsonr(resid(d), resid(t))[0], abs=1e-10)


def test_holm_against_statsmodels_and_by_hand():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    adj = cmp.holm(p)
    # by hand: sorted 0.01, 0.03, 0.04, 0.5 with m = 4 -> 0.04, 0.09, 0.09, 0.5
    assert np.allclose(adj[[0, 2, 1, 4]], [0.04, 0.09, 0.09, 0.5]) and np.isnan(adj[3])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    ok = np.isfinite(p)
    assert np.allclose(adj[ok], multitest.multipletests(p[ok], method="holm")[1])


def test_between_pairs_all_and_sampled():
    units = np.array([0, 0, 1, 2, 2, 3])
    i, j = cmp._between_pairs(units, 100, np.random.default_rng(0))
    assert len(i) == 15 - 2 and np.all(units[i] != units[j]) and np.all(i < j)
    units = np.arange(2000) // 2
    i, j = cmp._between_pairs(units, 50_000, np.random.default_rng(0))
    assert np.all(i != j) and np.all(units[i] != units[j]) and 49_900 < len(i) <= 50_000
    # uniform over items: each item appears ~ 2 * 50,000 / 2,000 = 50 times
    counts = np.bincount(np.r_[i, j], minlength=2000)
    assert stats.chisquare(counts).pvalue > 1e-3
    # uniform over pairs: with every item its own unit, P(|i - j| = g) = 2 (n - g) / (n (n - 1)) exactly
    # (a sampler that never draws j = i + 1, say, halves the g = 1 bin)
    n = 300
    i, j = cmp._between_pairs(np.arange(n), 40_000, np.random.default_rng(1))
    assert len(i) == 40_000 and np.all(i != j)
    gap = np.bincount(np.abs(i - j), minlength=n)[1:]
    expected = 40_000 * 2.0 * (n - np.arange(1, n)) / (n * (n - 1))
    coarse = np.add.reduceat(gap, np.arange(0, n - 1, 10)), np.add.reduceat(expected, np.arange(0, n - 1, 10))
    assert stats.chisquare(coarse[0], coarse[1]).pvalue > 1e-4  # bins of 10 gaps (expected >= 14 each)
    assert stats.binomtest(int(gap[0]), 40_000, 2.0 / n).pvalue > 1e-4


def test_jackknife_se_and_normal_p():
    """Delete-a-group jackknife se = sqrt((G-1)/G Σ (v_g - mean)²) (catches a missing (G-1)/G factor)."""
    v = np.array([1.0, 2.0, 4.0, 7.0])
    assert cmp._jackknife_se(v) == pytest.approx(np.sqrt(3 / 4 * np.sum((v - v.mean()) ** 2)))
    assert cmp._normal_p(1.959963984540054, 1.0) == pytest.approx(0.05)
    assert cmp._normal_p(0.0, 0.0) == 1.0 and np.isnan(cmp._normal_p(np.nan, 1.0))


def test_jackknife_leaves_out_whole_species():
    """Each replicate drops whole species (never part of one) and every species is dropped exactly once."""
    a = _world(seed=2)
    units = cmp.species_units(a)
    seen = []

    def score(X, codes):
        seen.append(len(X))
        return {("n", "all"): float(len(X))}

    jack = cmp._jackknife({"a": a, "b": a}, ["a", "b"], units, groups=5, seed=0, score=score)
    sizes = np.bincount(units)
    dropped = len(a) - jack[("n", "all")][:, 0]
    assert dropped.sum() == len(a)  # every item left out once over the 5 groups
    group_sizes = set()
    rng = np.random.default_rng(cmp._sub_seed(0, "jackknife"))
    group = rng.permutation(units.max() + 1) % 5
    for g in range(5):
        group_sizes.add(int(sizes[group == g].sum()))
    assert set(dropped.astype(int)) == group_sizes
    with pytest.raises(TreeprobeError, match="jackknife groups"):
        cmp._jackknife({"a": a}, ["a"], units, groups=units.max() + 2, seed=0, score=score)


def test_swap_test_against_an_explicit_replay():
    """The swap p-values equal a replay written out here: Procrustes by SVD, hybrids built species by species,
    the same rng draws, the same clustering; the same model in another basis, or embedded in more dimensions,
    gives p = 1 (Δ* = Δ₀ = 0)."""
    from treeprobe.clustering import rankwise_clustering

    a = _world(seed=3)
    rng0 = np.random.default_rng(8)
    Q = np.linalg.qr(rng0.standard_normal((16, 16)))[0]
    Xa = a.unit.astype(np.float64)
    Xb = Xa + 0.1 * rng0.standard_normal(Xa.shape)
    Xb = (Xb / np.linalg.norm(Xb, axis=1, keepdims=True)) @ Q  # another basis
    units = cmp.species_units(a)
    codes = a.taxonomy.codes_by_rank()
    score = cmp._clustering_scores(("agglomerative",), 0)
    got = cmp._swap_p_values(Xa, Xb, codes, units, permutations=19, seed=5, score=score)

    def tab(X):
        t = rankwise_clustering(X, codes, methods=("agglomerative",), seed=0, n_permutations=1, progress=False)
        return {(f"agglomerative {m}", r.rank): getattr(r, m) for r in t.itertuples() for m in ("purity", "nmi", "ari")}

    U, _, Vt = np.linalg.svd(Xb.T @ Xa)
    Xr = Xb @ (U @ Vt)
    assert np.abs(Xr - Xa).mean() < np.abs(Xb - Xa).mean() / 2  # the rotation is undone
    t_a, t_b = tab(Xa), tab(Xr)
    rng = np.random.default_rng(5)
    hits = dict.fromkeys(t_a, 0)
    for _ in range(19):
        flip = rng.random(units.max() + 1) < 0.5
        A, B = Xa.copy(), Xr.copy()
        for sp in np.flatnonzero(flip):
            rows = units == sp
            A[rows], B[rows] = Xr[rows], Xa[rows]
        pa, pb = tab(A), tab(B)
        for k in hits:
            hits[k] += abs(pa[k] - pb[k]) >= abs(t_a[k] - t_b[k]) - 1e-12
    assert got.keys() == hits.keys() and len(got) == 21
    assert all(got[k] == pytest.approx((1 + hits[k]) / 20) for k in got)
    assert min(got.values()) < 1  # not every difference is zero: the replay compares something
    same = cmp._swap_p_values(Xa, Xa @ Q, codes, units, permutations=19, seed=5, score=score)
    assert set(same.values()) == {1.0}
    # another dimension: the same model embedded in 24-d (zero-padded, rotated) is still the same model
    Q24 = np.linalg.qr(rng0.standard_normal((24, 24)))[0]
    wide = cmp._swap_p_values(Xa, np.pad(Xa, ((0, 0), (0, 8))) @ Q24, codes, units, permutations=19, seed=5,
                              score=score)
    assert set(wide.values()) == {1.0}
    with pytest.raises(TreeprobeError, match="same items"):
        cmp._swap_p_values(Xa, Xa[:10], codes, units, permutations=19, seed=5, score=score)


def test_species_bootstrap_weights():
    w = cmp.species_bootstrap_weights(30, 50, seed=4)
    assert w.shape == (50, 30) and np.all(w.sum(axis=1) == 30)
    assert np.array_equal(w, cmp.species_bootstrap_weights(30, 50, seed=4))
    assert not np.array_equal(w, cmp.species_bootstrap_weights(30, 50, seed=5))


# --- alignment -----------------------------------------------------------------------------------


def test_align_reorders_by_path_and_refuses_mismatches():
    a = _world()
    order = np.random.default_rng(0).permutation(len(a))
    b = a.subset(order)
    out = cmp.align({"a": a, "b": b})
    assert np.array_equal(out["b"].X, a.X) and list(out["b"].items.path) == list(a.items.path)
    with pytest.raises(TreeprobeError, match="do not cover the same items.*--intersect"):
        cmp.align({"a": a, "b": b[5:]})
    inter = cmp.align({"a": a, "b": b[5:]}, mismatch="intersect")
    assert len(inter["a"]) == len(a) - 5 and list(inter["a"].items.path) == list(inter["b"].items.path)
    # a path listed twice with another embedding never reaches the comparison (TreeData refuses the
    # conflicting copy since the duplicate rule of treeprobe.core; align refused it before)
    with pytest.raises(TreeprobeError, match="duplicated path|same path 'img_0000.png' but a different embedding"):
        cmp.align({"a": a, "b": TreeData(a.X, pd.concat([a.items.iloc[:-1], a.items.iloc[:1]], ignore_index=True))})
    other = a.items.copy()
    other.loc[0, "genus"] = "Othergenus"
    with pytest.raises(TreeprobeError, match="genus"):
        cmp.align({"a": a, "b": TreeData(a.X, other)})
    with pytest.raises(TreeprobeError, match="at least 2 models"):
        cmp.align({"a": a})
    with pytest.raises(TreeprobeError, match="different numbers of items"):
        cmp.align({"a": a, "b": a[3:]}, on="row")


# --- the comparison --------------------------------------------------------------------------------


def _models():
    """The three models of the ``comparison`` fixture: a world, an exact copy, a noisier version."""
    a = _world(seed=1)
    rng = np.random.default_rng(5)
    X = a.X.astype(float)
    worse = TreeData((X + 2.0 * X.std() * rng.standard_normal(X.shape)).astype(np.float32), a.items)
    return {"good": a, "same": TreeData(a.X.copy(), a.items), "worse": worse}


@pytest.fixture(scope="module")
def comparison():
    models = _models()
    return models["good"], cmp.compare(models, seed=0, permutations=49, bootstrap=199, cluster_methods=("kmeans",),
                                       jackknife=5, chance_permutations=2, drilldown=False)


def _weighted_r(x, y, w):
    """Pearson r of x and y with pair weights w (written out: weighted means, covariance, variances)."""
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    cov = np.average((x - mx) * (y - my), weights=w)
    return cov / np.sqrt(np.average((x - mx) ** 2, weights=w) * np.average((y - my) ** 2, weights=w))


def _replay_mantel_bootstrap(models, *, seed, bootstrap, control=None):
    """compare()'s species bootstrap of the image-level Mantel r, replayed with numpy: weights =
    species_bootstrap_weights(S, B, first draw of default_rng(seed)), every between-species pair (fewer
    than max_pairs here) weighted w_u · w_v. With ``control`` (a categorical item column) the partial
    r(d, t | z), z = 0 same / 1 different category. Returns (r per model on all pairs (M,), r* (B, M))."""
    first = next(iter(models.values()))
    units = cmp.species_units(first)
    rng = np.random.default_rng(seed)
    w = cmp.species_bootstrap_weights(int(units.max()) + 1, bootstrap, int(rng.integers(2 ** 31)))
    i, j = np.triu_indices(len(first), 1)
    keep = units[i] != units[j]
    i, j = i[keep], j[keep]
    t = first.taxonomy.clade_structure().item_distances()[i, j]
    d = []
    for ds in models.values():
        U = ds.unit.astype(np.float64)
        d.append(1.0 - np.einsum("ij,ij->i", U[i], U[j]))
    if control is None:
        def stat(dm, wp):
            return _weighted_r(dm, t, wp)
    else:
        zc = first.items[control].to_numpy()
        z = (zc[i] != zc[j]).astype(float)

        def stat(dm, wp):
            r_dt, r_dz, r_tz = _weighted_r(dm, t, wp), _weighted_r(dm, z, wp), _weighted_r(t, z, wp)
            return (r_dt - r_dz * r_tz) / np.sqrt((1 - r_dz ** 2) * (1 - r_tz ** 2))
    r = np.array([stat(dm, np.ones(len(t))) for dm in d])
    rb = np.array([[stat(dm, w[b, units[i]] * w[b, units[j]]) for dm in d] for b in range(bootstrap)])
    return r, rb


def test_compare_identical_models_differ_by_zero(comparison):
    _, comp = comparison
    d = comp.differences
    same = d[(d.model_a == "good") & (d.model_b == "same")]
    assert len(same) and np.all(same["difference"].abs() < 1e-12)
    # identical vectors: every bootstrap shift and jackknife replicate difference is exactly 0, so the
    # interval is [0, 0] and p = (1 + B)/(B + 1) = 1 (bootstrap) or 1 (jackknife se 0, estimate 0)
    assert np.all(same["ci_low"].abs() < 1e-12) and np.all(same["ci_high"].abs() < 1e-12)
    assert np.all(same["p_value"] == 1.0)


def test_compare_detects_the_degraded_model(comparison):
    a, comp = comparison
    d = comp.differences.set_index(["metric", "rank", "model_a", "model_b"])
    for level in ("image", "species-centroid"):
        row = d.loc[("mantel r", level, "good", "worse")]
        assert row.difference > 0 and row.ci_low > 0 and row.p_value < 0.01
    genus = d.loc[("knn agreement", "genus", "good", "worse")]
    assert genus.difference > 0 and genus.p_value < 0.01
    # per-model Mantel r is the exact between-species r of tl.mantel
    from treeprobe import tl

    exact = tl.mantel(a, methods=("pearson",), levels=("image",), permutations=9)
    pm = comp.per_model.set_index(["model", "metric", "rank"])
    assert pm.loc[("good", "mantel r", "image"), "estimate"] == pytest.approx(exact.statistic.iloc[0], abs=1e-12)
    # Holm within each (metric, model pair) family, by hand: sorted p times (m, m - 1, ...), running max, cap 1
    for _, fam in comp.differences.groupby(["metric", "model_a", "model_b"]):
        p = fam["p_value"].to_numpy()
        ok = np.isfinite(p)
        order = np.argsort(p[ok], kind="stable")
        m = int(ok.sum())
        adj = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[ok][order]), 1.0)
        want = np.full(len(p), np.nan)
        want[np.flatnonzero(ok)[order]] = adj
        np.testing.assert_allclose(fam["p_holm"].to_numpy(), want, rtol=0, atol=1e-15)
    assert (d.groupby(level=["metric", "model_a", "model_b"]).size() > 1).any()  # families of several ranks


def test_compare_mantel_intervals_and_p_equal_the_replayed_bootstrap(comparison):
    """The image-level Mantel rows against compare()'s documented species bootstrap replayed here:
    interval = exact r + the 2.5 / 97.5 % percentiles of (r* − r), difference interval the same on the
    paired shifts, p = (1 + #{|shift| ≥ |Δ|}) / (B + 1)."""
    _, comp = comparison
    models = _models()
    r, rb = _replay_mantel_bootstrap(models, seed=0, bootstrap=199)
    names = list(models)
    pm = comp.per_model.set_index(["model", "metric", "rank"])
    for k, m in enumerate(names):
        row = pm.loc[(m, "mantel r", "image")]
        # all pairs used: the exact between-species r (tl.mantel renormalises the float32 unit rows in
        # float64, the bootstrap pairs read them as they are: ~1e-9 apart)
        assert row.estimate == pytest.approx(r[k], abs=1e-7)
        lo, hi = np.percentile(rb[:, k] - r[k], [2.5, 97.5])
        np.testing.assert_allclose([row.ci_low, row.ci_high], [row.estimate + lo, row.estimate + hi], rtol=0, atol=1e-9)
    a, b = names.index("good"), names.index("worse")
    row = comp.differences.set_index(["metric", "rank", "model_a", "model_b"]).loc[("mantel r", "image", "good", "worse")]
    est = r[a] - r[b]
    shifts = (rb[:, a] - rb[:, b]) - est
    lo, hi = np.percentile(shifts, [2.5, 97.5])
    np.testing.assert_allclose([row.ci_low, row.ci_high], [row.difference + lo, row.difference + hi], rtol=0, atol=1e-9)
    assert row.p_value == pytest.approx((1 + np.sum(np.abs(shifts) >= abs(est) - 1e-12)) / 200, abs=1e-12)
    assert 0.1 < (hi - lo) / abs(est) < 2  # a real interval, neither degenerate nor dominating


def test_compare_knn_intervals_equal_the_replayed_jackknife(comparison):
    """kNN rows against the delete-a-group jackknife replayed here: groups = permutation of the S species
    % G (seeded by the 'jackknife' sub-seed), se = sqrt((G − 1)/G Σ (v_g − v̄)²), interval ±1.959964 se,
    p = 2 Φ(−|Δ|/se)."""
    from treeprobe.neighbors import knn_rank_agreement

    _, comp = comparison
    models = _models()
    names = list(models)
    first = models["good"]
    units = cmp.species_units(first)
    G = 5
    group = np.random.default_rng(cmp._sub_seed(0, "jackknife")).permutation(int(units.max()) + 1) % G
    codes = first.taxonomy.codes_by_rank()
    reps = np.empty((G, len(names)))
    for g in range(G):
        keep = group[units] != g
        for k, m in enumerate(names):
            tab = knn_rank_agreement(models[m].unit[keep], {r: c[keep] for r, c in codes.items()}, k=10,
                                     max_queries=100_000, seed=0, normalised=True)
            reps[g, k] = tab.set_index("rank").loc["genus", "agreement"]

    def se(v):
        return np.sqrt((G - 1) / G * np.sum((v - v.mean()) ** 2))

    z = stats.norm.ppf(0.975)
    pm = comp.per_model.set_index(["model", "metric", "rank"])
    good = pm.loc[("good", "knn agreement", "genus")]
    np.testing.assert_allclose([good.ci_low, good.ci_high], good.estimate + np.array([-z, z]) * se(reps[:, 0]),
                               rtol=0, atol=1e-12)
    a, b = names.index("good"), names.index("worse")
    row = comp.differences.set_index(["metric", "rank", "model_a", "model_b"]).loc[("knn agreement", "genus", "good", "worse")]
    s_d = se(reps[:, a] - reps[:, b])
    np.testing.assert_allclose([row.ci_low, row.ci_high], row.difference + np.array([-z, z]) * s_d, rtol=0, atol=1e-12)
    assert row.p_value == pytest.approx(2 * stats.norm.sf(abs(row.difference) / s_d), rel=1e-9)
    assert s_d > 0 and abs(row.difference) > 0.01


def test_compare_tables_and_json(comparison, tmp_path):
    from treeprobe.compare_report import write_comparison

    _, comp = comparison
    assert set(comp.per_model.model) == {"good", "same", "worse"}
    assert {"kmeans purity", "kmeans nmi", "kmeans ari", "knn level agreement"} <= set(comp.per_model.metric)
    assert set(comp.similarity.columns) >= {"model_a", "model_b", "rank", "cka", "rsa_spearman"}
    same_sim = comp.similarity[(comp.similarity.model_b == "same") & (comp.similarity["rank"] == "image")]
    assert same_sim["cka"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    paths = write_comparison(comp, tmp_path, model_reports=False)
    obj = json.loads((tmp_path / "compare.json").read_text())
    assert obj["models"] == ["good", "same", "worse"] and len(obj["differences"]) == len(comp.differences)
    assert set(obj["distance_profiles"]) == {"good", "same", "worse"}
    html = (tmp_path / "report.html").read_text()
    assert "Paired differences" in html and "http://" not in html and "https://" not in html
    assert any(k.startswith("figure:") for k in paths)


def test_cli_compare_embedding_files(tmp_path, capsys):
    from treeprobe.cli import main
    from treeprobe.datasets import BIOCLIP2_1K

    df = pd.read_parquet(BIOCLIP2_1K)
    df = df[df["species"].notna()].iloc[:160]
    df.to_parquet(tmp_path / "a.parquet")
    rng = np.random.default_rng(0)
    X = np.stack(df["emb"].to_numpy()).astype(np.float64)
    df2 = df.copy()
    df2["emb"] = list((X + 0.5 * X.std() * rng.standard_normal(X.shape)).astype(np.float32))
    df2.iloc[::-1].to_parquet(tmp_path / "b.parquet")  # another row order: aligned by uuid
    out = tmp_path / "out"
    rc = main(["compare", "--model", f"real={tmp_path / 'a.parquet'}", "--model", f"noisy={tmp_path / 'b.parquet'}",
               "--out", str(out), "--permutations", "19", "--bootstrap", "99", "--cluster-methods", "none",
               "--no-similarity", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mantel r (image): real" in text and "noisy" in text
    obj = json.loads((out / "compare.json").read_text())
    assert obj["models"] == ["real", "noisy"] and obj["params"]["n_items"] > 100
    assert (out / "models" / "real" / "report.json").exists() and (out / "report.html").exists()
    assert main(["compare", "--model", f"real={tmp_path / 'a.parquet'}", "--out", str(out)]) == 2
    assert "at least 2 --model" in capsys.readouterr().err
    df2.iloc[:-3].to_parquet(tmp_path / "c.parquet")
    assert main(["compare", "--model", f"a={tmp_path / 'a.parquet'}", "--model", f"c={tmp_path / 'c.parquet'}",
                 "--out", str(out), "--quiet"]) == 2
    assert "do not cover the same items" in capsys.readouterr().err


def test_parse_model_spec():
    from treeprobe.pipeline import parse_model_spec

    assert parse_model_spec("runs/a/checkpoints/epoch_3.pt") == ("epoch_3", {"ckpt": "runs/a/checkpoints/epoch_3.pt"})
    assert parse_model_spec("emb=x.parquet") == ("emb", {"embeddings": "x.parquet"})
    assert parse_model_spec("example:bioclip2-1k") == ("example:bioclip2-1k", {"example": "bioclip2-1k"})
    with pytest.raises(TreeprobeError, match="cannot tell"):
        parse_model_spec("nothing")


def test_drilldown_of_a_comparison_names_the_taxa():
    """The drill-down table carries taxon labels (not codes), the same rows for every model (bug caught: the
    labels were not passed, so panels said 'family 20')."""
    a = _world(seed=3)
    t = cmp._drilldown({"x": a, "y": a}, ["x", "y"], 0)
    assert set(t["model"]) == {"x", "y"}
    assert t["label"].str.contains(r"\|").all() and t["parent_label"].str.len().gt(0).all()
    rows = t.groupby("model")["row"].apply(lambda r: tuple(sorted(r)))
    assert rows["x"] == rows["y"]


def test_compare_partial_mantel_row_is_the_exact_partial_r():
    """With control=COLUMN the comparison carries the partial Mantel r of each model (the exact value of
    tl.mantel(control=...)) and its paired difference."""
    from treeprobe import tl

    a = _world(seed=4)
    items = a.items.copy()
    items["source"] = np.where(np.arange(len(items)) % 3 == 0, "museum", "field")
    a = TreeData(a.X, items)
    b = TreeData((a.X + np.random.default_rng(0).standard_normal(a.X.shape)).astype(np.float32), items)
    comp = cmp.compare({"a": a, "b": b}, control="source", permutations=19, bootstrap=99, jackknife=0,
                       cluster_methods=(), similarity=False, distance_profiles=False)
    metric = "partial mantel r (source)"
    exact = tl.mantel(a, methods=("pearson",), levels=("image",), control="source", permutations=19)
    want = exact[exact.method == "pearson (partial)"].statistic.iloc[0]
    pm = comp.per_model[comp.per_model.metric == metric].set_index("model")["estimate"]
    assert pm["a"] == pytest.approx(want, abs=1e-12)
    row = comp.differences[comp.differences.metric == metric].iloc[0]
    assert row.difference == pytest.approx(want - pm["b"], abs=1e-12)
    # interval and p from the species bootstrap of the partial r, replayed (image-level r first in the
    # seed stream: the same weights serve both)
    r, rb = _replay_mantel_bootstrap({"a": a, "b": b}, seed=0, bootstrap=99, control="source")
    assert r[0] == pytest.approx(want, abs=1e-7)  # float32 unit rows as they are (see above)
    shifts = (rb[:, 0] - rb[:, 1]) - (r[0] - r[1])
    lo, hi = np.percentile(shifts, [2.5, 97.5])
    np.testing.assert_allclose([row.ci_low, row.ci_high], [row.difference + lo, row.difference + hi], rtol=0, atol=1e-9)
    assert row.p_value == pytest.approx((1 + np.sum(np.abs(shifts) >= abs(row.difference) - 1e-12)) / 100, abs=1e-12)
    assert not comp.differences.metric.str.startswith("knn").any()  # jackknife=0: no kNN comparison


def test_compare_swap_test_replaces_only_the_clustering_p_values():
    """cluster_test="swap": the clustering rows carry the swap p-values of _swap_p_values (seeded per pair) and
    its scheme; their estimates and jackknife intervals, and every other row, are those of the default run."""
    models = {k: v for k, v in _models().items() if k != "same"}
    kw = dict(seed=0, permutations=19, bootstrap=99, cluster_methods=("kmeans",), jackknife=5, chance_permutations=2,
              similarity=False, distance_profiles=False)
    jack = cmp.compare(models, **kw).differences
    swap = cmp.compare(models, cluster_test="swap", cluster_permutations=19, **kw).differences
    clus = swap.metric.str.startswith("kmeans")
    assert clus.sum() == 21 and (swap.scheme[clus] == cmp.SWAP_SCHEME).all()
    pd.testing.assert_frame_equal(swap[~clus], jack[~clus])
    pd.testing.assert_frame_equal(swap.loc[clus, ["difference", "ci_low", "ci_high"]],
                                  jack.loc[clus, ["difference", "ci_low", "ci_high"]])
    a, b = models["good"], models["worse"]
    ref = cmp._swap_p_values(a.unit, b.unit, a.taxonomy.codes_by_rank(), cmp.species_units(a), permutations=19,
                             seed=cmp._sub_seed(0, "swap good worse"), score=cmp._clustering_scores(("kmeans",), 0))
    for r in swap[clus].itertuples():
        assert r.p_value == ref[(r.metric, r.rank)]
    assert (swap.p_value[clus] * 20).round(9).isin(range(1, 21)).all()
    # known truth: model "worse" has 2 sd of extra noise, its clusterings are far worse (ARI ~0.3 vs ~0): the
    # swap test finds it at (nearly) every rank, at its smallest p-value 1/20
    assert (swap.p_value[clus] == 0.05).sum() >= 17 and (swap.difference[clus] > 0).sum() >= 19
    with pytest.raises(TreeprobeError, match="cluster_test"):
        cmp.compare(models, cluster_test="bootstrap", **kw)
