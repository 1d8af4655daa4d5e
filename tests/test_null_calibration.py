"""The null-calibration harness (analyses/null_calibration.py): registry, worlds, binomial intervals, CLI;
and (slow) the calibration of the listed tests in the worlds that broke today's tests."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str = "null_calibration"):
    """The script analyses/NAME.py as a module (once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "analyses" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


nc = _load()


# --- the harness itself (fast) ------------------------------------------------------------------

def test_binomial_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 40), (2, 40), (5, 100), (10, 200), (40, 40)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert nc.binomial_ci(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    lo, hi = nc.binomial_ci(5, 100)
    assert lo < 0.05 < hi


def test_verdicts():
    assert nc.verdict(0.01, 0.11) == "calibrated"
    assert nc.verdict(0.0, 0.04) == "conservative"
    assert nc.verdict(0.06, 0.2) == "anti-conservative"
    assert nc.verdict(0.06, 0.2, null=False) == "power"


@functools.lru_cache(maxsize=1)
def _tiny_data():
    rng = np.random.default_rng(0)
    items = pd.DataFrame({r: ["a", "a", "b", "b"] if r != "species" else ["a x", "a y", "b x", "b y"]
                          for r in nc.RANKS})
    return nc.TreeData(rng.standard_normal((4, 3)), items)


def _tiny_world(seed):
    return _tiny_data()  # the p-value 'tests' below ignore the data: one object keeps the harness test fast


@pytest.fixture
def toy_registry():
    """A cheap world and three p-value 'tests' (uniform, always 0.01, always 1); removed afterwards."""
    nc.register_world("toy", _tiny_world, replace=True)
    nc.register_test("uniform", lambda data, seed, permutations: np.random.default_rng(seed).uniform(), replace=True)
    nc.register_test("always", lambda data, seed, permutations: (1.0, 0.01), replace=True)
    nc.register_test("never", lambda data, seed, permutations: {"statistic": 0.0, "p_value": 1.0}, replace=True)
    yield
    for t in ("uniform", "always", "never"):
        nc.unregister(t)
    nc.WORLDS.pop("toy", None)


def test_uniform_p_values_are_calibrated(toy_registry):
    obj = nc.run_calibration(["toy"], replicates=400, permutations=0, tests=["uniform", "always", "never"],
                             progress=False)
    s = obj["summary"]
    by = {r["test"]: r for r in s}
    assert set(by) == {"uniform", "always", "never"}  # the mantel family was not selected
    u = by["uniform"]
    assert u["n"] == 400 and u["ci_low"] <= 0.05 <= u["ci_high"] and u["verdict"] == "calibrated"
    assert (u["ci_low"], u["ci_high"]) == pytest.approx(nc.binomial_ci(u["rejections"], 400))
    assert by["always"]["verdict"] == "anti-conservative" and by["always"]["rate"] == 1.0
    assert by["never"]["verdict"] == "conservative" and by["never"]["rate"] == 0.0
    # replicates draw distinct, reproducible seeds
    assert len({r["world_seed"] for r in obj["records"]}) == 400
    again = nc.run_calibration(["toy"], replicates=3, permutations=0, tests=["uniform"], progress=False)
    assert [r["results"]["uniform"][1] for r in again["records"]] == [r["results"]["uniform"][1]
                                                                       for r in obj["records"][:3]]


def test_register_duplicate_and_selection(toy_registry):
    with pytest.raises(ValueError, match="already registered"):
        nc.register_test("uniform", lambda data, seed, permutations: 0.5)
    assert nc._pattern_selects("mantel", ["mantel/image/*"]) and not nc._pattern_selects("mantel", ["uniform"])
    res = nc.run_tests(_tiny_world(0), seed=1, permutations=0, tests=["always"])
    assert list(res) == ["always"] and res["always"]["p_value"] == 0.01 and res["always"]["statistic"] == 1.0


def test_mantel_rows_become_tests():
    from treeprobe import tl

    data = nc.species_clusters(0, n_species=20)
    res = nc.run_tests(data, seed=0, permutations=9, tests=["mantel/*"])
    names = {n.split("/")[1] + "/" + n.split("/")[2] for n in res}
    assert names >= {f"{lv}/{m}" for lv in ("image", "species-centroid") for m in ("pearson", "spearman")}
    for scheme in getattr(tl, "MANTEL_SCHEMES", ()):  # every permutation scheme tl.mantel offers is measured
        assert any(n.endswith("/" + scheme) for n in res)
    assert all(0.1 <= r["p_value"] <= 1.0 for r in res.values())  # (hits + 1) / 10


def test_table_family_reads_rows_generically():
    def fake(data, *, permutations, seed):
        return pd.DataFrame({"level": ["image", "new-level"], "method": ["pearson", "pearson"],
                             "statistic": [0.1, 0.2], "p_value": [0.5, 0.01]})

    out = nc.table_family(fake, "fake")(None, seed=0, permutations=9)
    assert out == {"fake/image/pearson": (0.1, 0.5), "fake/new-level/pearson": (0.2, 0.01)}

    def two_schemes(data, *, permutations, seed):
        return pd.DataFrame({"level": ["image"] * 2, "method": ["pearson"] * 2, "scheme": ["species", "images"],
                             "statistic": [0.1, 0.2], "p_value": [0.5, 0.01]})

    out = nc.table_family(two_schemes, "m")(None, seed=0, permutations=9)
    assert set(out) == {"m/image/pearson/species", "m/image/pearson/images"}
    with pytest.raises(ValueError, match="both named"):
        nc.table_family(two_schemes, "m", keys=("level", "method"))(None, seed=0, permutations=9)


def _species_sizes(data):
    return np.bincount(nc.species_units(data))


def _mean_cosine(data):
    U = data.unit.astype(np.float64)
    n = len(U)
    s = U.sum(0)
    return (s @ s - n) / (n * (n - 1))


def test_species_clusters_structure():
    d = nc.species_clusters(3)
    sizes = _species_sizes(d)
    assert len(sizes) == 130 and sizes.min() >= 1 and sizes.max() <= 6 and len(set(sizes)) == 6
    assert 350 <= len(d) <= 560
    codes = nc.species_units(d)
    U = d.unit
    G = U @ U.T
    same = codes[:, None] == codes[None, :]
    np.fill_diagonal(same, False)
    other = codes[:, None] != codes[None, :]
    assert G[same].mean() > 0.7 and abs(G[other].mean()) < 0.02  # tight species, nothing shared above
    assert nc.species_clusters(3).X.tobytes() == d.X.tobytes()  # seeded


def test_size_by_kingdom_structure():
    d = nc.size_by_kingdom(5)
    sizes = _species_sizes(d)
    sp_kingdom = d.items.groupby(nc.species_units(d), sort=True)["kingdom"].first().to_numpy()
    big = d.uns["world"]["big_kingdom"]
    assert set(sizes[sp_kingdom == big]) == {4} and set(sizes[sp_kingdom != big]) == {1}
    assert len(set(sp_kingdom)) >= 2 and len(sizes) == 220
    assert 0.55 <= _mean_cosine(d) <= 0.65  # as real BioCLIP-2 vectors (0.59)


def test_real_vector_worlds():
    X0, items0, codes0, known = nc._bioclip()
    assert 0.55 <= _mean_cosine(nc.shuffled_images(0)) <= 0.63

    d = nc.shuffled_images(1)
    assert len(d) == 400
    rows = {x.tobytes() for x in X0}
    assert all(x.tobytes() in rows for x in d.X)

    d = nc.iid_gaussian(2)
    assert len(d) == 400 and abs(_mean_cosine(d)) < 0.01

    d = nc.shuffled_species(4)
    src = np.asarray(d.uns["world"]["source_rows"])
    assert 450 <= len(d) <= 480 and np.array_equal(d.X, X0[src]) and known[src].all()
    new_codes = nc.species_units(d)
    # every new species holds exactly the whole image set of one real species
    for c in np.unique(new_codes):
        orig = np.unique(codes0[src[new_codes == c]])
        assert len(orig) == 1 and (codes0 == orig[0]).sum() == (new_codes == c).sum()
    # the lineages are those of the chosen species, permuted: the same set, not the same assignment
    orig_lin = {tuple(r) for r in items0.iloc[src][list(nc.RANKS)].itertuples(index=False)}
    new_lin = {tuple(r) for r in d.items[list(nc.RANKS)].itertuples(index=False)}
    assert orig_lin == new_lin
    assert (d.items["species"].to_numpy() != items0["species"].iloc[src].to_numpy()).mean() > 0.9


def test_brownian_worlds():
    assert {"brownian-0", "brownian-0.01"} <= set(nc.WORLDS)
    assert nc.WORLDS["brownian-0"].null and not nc.WORLDS["brownian-0.01"].null
    d0, d1 = nc.brownian(0, fraction=0.0), nc.brownian(0, fraction=1.0)
    assert len(d0) == len(d1) and 250 <= len(d0) <= 600
    assert d0.items["species"].equals(d1.items["species"])


def test_covariate_confound_structure():
    """The covariate follows the tree (each kingdom has a majority category holding ~80 % of its images) and
    shifts the embeddings; species are clusters unrelated to the tree otherwise."""
    d = nc.covariate_confound(3)
    assert nc.COVARIATE in d.items.columns and set(d.items[nc.COVARIATE]) == {"museum", "field"}
    share = d.items.groupby("kingdom")[nc.COVARIATE].agg(lambda v: v.value_counts(normalize=True).iloc[0])
    assert np.all(share > 0.65) and share.mean() == pytest.approx(0.8, abs=0.08)
    X = d.X.astype(float)
    museum = (d.items[nc.COVARIATE] == "museum").to_numpy()
    shift = np.linalg.norm(X[museum].mean(0) - X[~museum].mean(0))
    assert shift > 0.5 * np.sqrt(X.shape[1]) / 4  # the effect direction has length sqrt(dim)/4
    fam = nc.TESTS["partial"].fn
    res = fam(d, seed=0, permutations=19)
    assert list(res) == [f"partial/{nc.COVARIATE}/species-within-covariate"]
    assert fam(nc.species_clusters(0), seed=0, permutations=19) == {}


def test_two_model_worlds():
    """Paired-comparison worlds: the same items twice, model b in obsm; equal noise under the null."""
    d = nc.same_model_simulated(2)
    b = d.obsm[nc.SECOND_MODEL]
    assert b.shape == d.X.shape and not np.allclose(b, d.X)
    # noise 1.0 x the base sd in each model: b - a and a itself both have sd sqrt(2) x the base sd
    assert d.uns["world"]["noise"] == 1.0 and np.std(b - d.X) == pytest.approx(np.std(d.X), rel=0.1)
    assert nc.WORLDS["same-model"].null and not nc.WORLDS["degraded-1.3"].null
    worse = nc.WORLDS["degraded-1.3"].make(2)
    assert worse.items.equals(d.items)
    real = nc.same_model_real(0)
    assert len(real) == 400 and nc.SECOND_MODEL in real.obsm
    assert nc.TESTS["compare"].fn(nc.species_clusters(0), seed=0, permutations=19) == {}


def test_cli_writes_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "res.json"
    args = ["--permutations", "9", "--worlds", "species-clusters", "--tests", "mantel/species-centroid/*",
            "--out", str(out), "--quiet"]
    assert nc.main(["--replicates", "2", *args]) == 0
    obj = json.loads(out.read_text())
    assert len(obj["records"]) == 2 and obj["config"]["permutations"] == 9
    got = set(obj["records"][0]["results"])
    assert got and all(n.startswith("mantel/species-centroid/") for n in got)
    assert obj["meta"]["code"]["treeprobe_sources"]
    assert nc.main(["--replicates", "3", *args]) == 0  # resumes: only replicate 2 is new
    obj2 = json.loads(out.read_text())
    assert [r["replicate"] for r in obj2["records"]] == [0, 1, 2] and obj2["records"][:2] == obj["records"]
    with pytest.raises(SystemExit):  # other settings, same file
        nc.main(["--replicates", "3", *args[:1], "19", *args[2:]])
    capsys.readouterr()
    assert nc.main(["--report", "--markdown", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| species-clusters | mantel/species-centroid/pearson" in text and "/3 |" in text


# --- calibration of the listed tests (slow) ---------------------------------------------------------

#: The worlds where today's tests fail (issue "Valid inference").
CALIBRATION_WORLDS = ("species-clusters", "size-by-kingdom")
#: Tests that must be calibrated or conservative in CALIBRATION_WORLDS: the lead lists the default tests
#: here by registry name. ``tl.mantel`` rows are named mantel/<level>/<method>/<scheme> (the scheme
#: suffix appears once tl.mantel's table has a ``scheme`` column): "species" is the new size-stratified
#: species permutation, "images" today's image permutation / free centroid permutation.
REQUIRED_TESTS = [
    "mantel/image/pearson/species",
    "mantel/image/spearman/species",
    "mantel/species-centroid/pearson/species",
    "mantel/species-centroid/spearman/species",
    "mantel/image/pearson/images",
    "mantel/image/spearman/images",
    "mantel/species-centroid/pearson/images",
    "mantel/species-centroid/spearman/images",
]
_WITHIN = "images are not exchangeable within species"
_SHRINK = "free centroid permutation: centroid spread follows species size, which follows the tree"
#: Known failures, measured (analyses/NULL_CALIBRATION.md); expected to fail (strict): remove an entry
#: when the test is fixed, or drop the test from REQUIRED_TESTS.
KNOWN_MISCALIBRATED = {
    ("species-clusters", "mantel/image/pearson/images"): _WITHIN,
    ("species-clusters", "mantel/image/spearman/images"): _WITHIN,
    ("size-by-kingdom", "mantel/image/pearson/images"): _WITHIN,
    ("size-by-kingdom", "mantel/image/spearman/images"): _WITHIN,
    ("size-by-kingdom", "mantel/species-centroid/pearson/images"): _SHRINK,
    ("size-by-kingdom", "mantel/species-centroid/spearman/images"): _SHRINK,
}
SLOW_REPLICATES, SLOW_PERMUTATIONS = 40, 99


@functools.lru_cache(maxsize=None)
def _slow_summary(tests: tuple) -> dict:
    obj = nc.run_calibration(CALIBRATION_WORLDS, replicates=SLOW_REPLICATES, permutations=SLOW_PERMUTATIONS,
                             seed=0, tests=list(tests), progress=False)
    return {(r["world"], r["test"]): r for r in obj["summary"]}


def _cases():
    for w in CALIBRATION_WORLDS:
        for t in REQUIRED_TESTS:
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_MISCALIBRATED[(w, t)])]
                     if (w, t) in KNOWN_MISCALIBRATED else [])
            yield pytest.param(w, t, marks=marks, id=f"{w}:{t}")


@pytest.mark.slow
@pytest.mark.parametrize("world,test", list(_cases()))
def test_calibrated_or_conservative(world, test):
    summary = _slow_summary(tuple(REQUIRED_TESTS))
    assert (world, test) in summary, f"{test} gave no result in {world}: is it registered?"
    row = summary[(world, test)]
    assert row["n"] == SLOW_REPLICATES
    assert row["verdict"] in ("calibrated", "conservative"), (
        f"{test} in {world}: {row['rejections']}/{row['n']} rejections at 0.05, "
        f"exact 95 % CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")


#: (world, test pattern) pairs of the partial Mantel and paired-comparison tests, checked at 40 replicates.
EXTRA_CALIBRATION = [("covariate-confound", "partial/*"), ("same-model", "compare/*"), ("same-model-real", "compare/*")]


@pytest.mark.slow
@pytest.mark.parametrize("world,pattern", EXTRA_CALIBRATION, ids=[f"{w}:{p}" for w, p in EXTRA_CALIBRATION])
def test_partial_and_paired_tests_calibrated(world, pattern):
    """Every partial-Mantel / paired-difference test is calibrated or conservative in its null world."""
    obj = nc.run_calibration([world], replicates=SLOW_REPLICATES, permutations=SLOW_PERMUTATIONS, seed=0,
                             tests=[pattern], progress=False)
    rows = [r for r in obj["summary"] if r["world"] == world]
    assert rows, f"no {pattern} test ran in {world}"
    bad = [f"{r['test']}: {r['rejections']}/{r['n']} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for r in rows
           if r["verdict"] not in ("calibrated", "conservative")]
    assert not bad, "anti-conservative: " + "; ".join(bad)


@pytest.mark.slow
def test_clustering_swap_test_is_calibrated_in_200_null_worlds():
    """compare's swap test of clustering differences (Ward, 19 permutations: exact at α = 0.05 when the two
    models' images of a species are exchangeable), 200 worlds of same-model-small with model b in a random
    basis (so the Procrustes step matters): every one of the 21 tests (purity / NMI / ARI × 7 ranks) has a
    rejection rate whose exact 95 % interval reaches 0.05 at the 99.8 % level (Bonferroni over 21), and the
    pooled rate lies in [0.035, 0.065]."""
    from scipy.stats import binomtest

    cj = _load("clustering_jackknife_noise")
    recs = [cj.one_world("same-model-small-rotated", i, seed=i, groups=10, n_seeds=1, B=19, schemes=["ward-swap"])
            for i in range(200)]
    tests = sorted(recs[0])
    assert len(tests) == 21
    k_all = 0
    for t in tests:
        k = sum(r[t][2] <= 0.05 for r in recs)
        k_all += k
        ci = binomtest(k, 200).proportion_ci(confidence_level=1 - 0.05 / 21, method="exact")
        assert ci.low <= 0.05 <= ci.high, f"{t}: {k}/200"
    assert 0.035 <= k_all / (21 * 200) <= 0.065
