"""Covariate alignment (treeprobe.covariate_alignment): the statistics against explicit S×S computations and
vegan, the permutation schemes against an explicit replay, the null (false-positive rate over simulated
worlds), known truth, and bad inputs."""

import json
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from scipy.spatial.distance import squareform

import treeprobe as tp
import treeprobe.covariate_alignment as ca
from treeprobe.covariate_alignment import (STATISTICS, covariate_alignment, covariate_mantel, permutation_strata,
                                           stratified_draw)
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.simulate import RANKS, simulate_world

ALPHA = 0.05


# --- helpers: independent computations ----------------------------------------------------------


def _upper(M):
    i, j = np.triu_indices(len(M), k=1)
    return M[i, j]


def _explicit(Y, C, T):
    """(r_dc, r_dc.t by residuals, r_ct, r_dt) from explicit matrices with scipy."""
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    d, c, t = _upper(1.0 - Yn @ Yn.T), _upper(C), _upper(T)
    A = np.column_stack([np.ones_like(t), t])
    res_d = d - A @ np.linalg.lstsq(A, d, rcond=None)[0]
    res_c = c - A @ np.linalg.lstsq(A, c, rcond=None)[0]
    return (scipy.stats.pearsonr(d, c)[0], scipy.stats.pearsonr(res_d, res_c)[0],
            scipy.stats.pearsonr(c, t)[0], scipy.stats.pearsonr(d, t)[0])


def _rank_tree_distance(anc):
    """2 × (ranks − ranks shared) from per-rank ancestor codes (S, 7): the unit-length rank tree."""
    same = anc[:, None, :] == anc[None, :, :]
    return 2.0 * (anc.shape[1] - np.cumprod(same, axis=2).sum(axis=2))


def _centroids(X, species, S):
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = np.zeros((S, X.shape[1]))
    np.add.at(C, species, U)
    return C / np.linalg.norm(C, axis=1, keepdims=True)


def _bm(rng, anc, n_taxa, lengths):
    z = np.zeros(len(anc))
    for pos, l in enumerate(lengths):
        z += np.sqrt(l) * rng.standard_normal(n_taxa[pos])[anc[:, pos]]
    return z


@pytest.fixture(scope="module")
def small():
    """24 species in 8 genera of 3 (4 families of 2 genera): centroids, a 2-column covariate, tree distance."""
    rng = np.random.default_rng(3)
    S = 24
    genus, family = np.arange(S) // 3, np.arange(S) // 6
    T = 2.0 * (genus[:, None] != genus[None, :]) + 2.0 * (family[:, None] != family[None, :])
    np.fill_diagonal(T, 0.0)
    Y = rng.normal(size=(S, 6)) + 0.8 * rng.normal(size=(8, 6))[genus]
    Z = np.column_stack([rng.normal(size=S) + genus * 0.3, 1000.0 * rng.normal(size=S)])
    return dict(Y=Y, Z=Z, T=T, genus=genus, family=family)


@pytest.fixture(scope="module")
def world():
    """A simulated world (~300 species, 1-4 images) as a TreeData, with a per-species covariate column."""
    w = simulate_world(seed=5, dim=24, trait_dim=8, noise=0.8, images_per_species=(1, 4))
    rng = np.random.default_rng(11)
    z = _bm(rng, w.species_ancestors, [w.n_taxa(r) for r in RANKS], [1.0] * 7)
    items = w.items.copy()
    items["z"] = z[w.item_species]
    items["habitat"] = np.where(z > 0, "wet", "dry")[w.item_species]
    return w, z, tp.TreeData(w.embeddings, items)


# --- the statistics ---------------------------------------------------------------------------------


def test_statistics_match_explicit_matrices_and_the_residual_partial_correlation(small):
    Y, Z, T = small["Y"], small["Z"], small["T"]
    res = covariate_mantel(Y, Z, T, permutations=0)
    # covariate distance, computed independently: Euclidean of the standardised columns
    Zs = (Z - Z.mean(0)) / Z.std(0, ddof=1)
    C = np.sqrt(((Zs[:, None, :] - Zs[None, :, :]) ** 2).sum(-1))
    want = _explicit(Y, C, T)
    got = res.table.set_index("statistic")["r"]
    assert got[STATISTICS[0]] == pytest.approx(want[0], abs=1e-12)
    assert got[STATISTICS[1]] == pytest.approx(want[1], abs=1e-12)
    assert got[STATISTICS[2]] == pytest.approx(want[2], abs=1e-12)
    assert got[STATISTICS[3]] == pytest.approx(want[3], abs=1e-12)
    # the raw (unstandardised) Euclidean distance is a different statistic: the second column would dominate
    raw = _explicit(Y, np.sqrt(((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)), T)
    assert abs(raw[0] - want[0]) > 1e-3
    assert res.kind == "numeric" and res.n_species == 24 and np.isnan(res.table["p_value"]).all()


def test_one_column_is_absolute_difference_and_categories_are_zero_one(small):
    Y, T = small["Y"], small["T"]
    z = small["Z"][:, 0]
    want = _explicit(Y, np.abs(z[:, None] - z[None, :]), T)
    assert covariate_mantel(Y, z, T, permutations=0).r == pytest.approx(want[1], abs=1e-12)
    cat = np.array(["a", "b", "c"], dtype=object)[np.arange(24) % 3]
    want = _explicit(Y, (cat[:, None] != cat[None, :]).astype(float), T)
    res = covariate_mantel(Y, cat, T, permutations=0)
    assert res.kind == "categorical" and res.r == pytest.approx(want[1], abs=1e-12)
    # numbers can be read as categories too (0/1 instead of |Δ|: same here, different for 3 levels)
    codes = np.arange(24) % 3
    assert covariate_mantel(Y, codes, T, kind="categorical", permutations=0).r == pytest.approx(want[1], abs=1e-12)


def test_permutations_replay_explicitly_with_the_documented_stream(small):
    Y, T, genus = small["Y"], small["T"], small["genus"]
    z = small["Z"][:, 0]
    B = 40
    res = covariate_mantel(Y, z, T, strata=genus, permutations=B, seed=7)
    rng, rng_free = (np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(2))
    draw = stratified_draw(genus)
    C = np.abs(z[:, None] - z[None, :])
    part, plain, ct = [], [], []
    for _ in range(B):
        pi = draw(rng)
        assert (genus[pi] == genus).all()  # only congeners swap
        Cp = C[np.ix_(pi, pi)]  # species i receives the covariate of species pi[i]
        r = _explicit(Y, Cp, T)
        plain.append(r[0])
        part.append(r[1])
        ct.append(_explicit(Y, C[np.ix_(*(2 * [rng_free.permutation(24)]))], T)[2])
    assert res.permuted_statistics[STATISTICS[0]] == pytest.approx(plain, abs=1e-12)
    assert res.permuted_statistics[STATISTICS[1]] == pytest.approx(part, abs=1e-12)
    assert res.permuted_statistics[STATISTICS[2]] == pytest.approx(ct, abs=1e-12)
    obs = res.r
    assert res.p_value == pytest.approx((1 + np.sum(np.asarray(part) >= obs - 1e-10)) / (B + 1))
    assert res.n_permutable == 24


def test_within_genus_permutations_keep_the_covariate_tree_correlation_on_the_rank_tree(small):
    """Congeners are siblings on equal branches: within-genus permutations leave r_ct (and r_dt) unchanged,
    so the partial test's p-value equals the plain one's. Within-family permutations do change r_ct."""
    Y, T, z = small["Y"], small["T"], small["Z"][:, 0]
    res = covariate_mantel(Y, z, T, strata=small["genus"], permutations=60, seed=1)
    r_dt, r_ct = res.table["r"].iloc[3], res.table["r"].iloc[2]
    back = res.permuted_statistics[STATISTICS[1]] * np.sqrt((1 - r_dt ** 2) * (1 - r_ct ** 2)) + r_dt * r_ct
    assert back == pytest.approx(res.permuted_statistics[STATISTICS[0]], abs=1e-12)
    assert res.table["p_value"].iloc[0] == res.table["p_value"].iloc[1]
    fam = covariate_mantel(Y, z, T, strata=small["family"], permutations=60, seed=1)
    back = fam.permuted_statistics[STATISTICS[1]] * np.sqrt((1 - r_dt ** 2) * (1 - r_ct ** 2)) + r_dt * r_ct
    assert np.abs(back - fam.permuted_statistics[STATISTICS[0]]).max() > 1e-3


def test_strata_and_the_stratified_draw():
    assert permutation_strata([3, 3, 5, -1, -1, 3], sizes=[1, 2, 1, 1, 1, 1]).tolist() == [0, 1, 2, 3, 4, 0]
    strata = np.array([0, 1, 0, 1, 0, 2])
    draw = stratified_draw(strata)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        pi = draw(rng)
        assert sorted(pi.tolist()) == list(range(6)) and (strata[pi] == strata).all()
        seen.add(tuple(pi))
    assert len(seen) == 12  # 3! × 2! × 1!: every stratum-preserving permutation reached


def test_treedata_wrapper_equals_the_array_function_on_independent_inputs(world):
    w, z, data = world
    res = covariate_alignment(data, "z", permutations=49, seed=3)
    S = w.n_species
    Y = _centroids(w.embeddings.astype(np.float64), w.item_species, S)
    T = _rank_tree_distance(w.species_ancestors)
    # species order of the wrapper: the rank tree's leaves (cumulative labels, sorted); map by binomial
    order = np.argsort([("|".join(w.species_lineage.iloc[s])) for s in range(S)], kind="stable")
    sizes = np.bincount(w.item_species, minlength=S)[order]
    strata = permutation_strata(w.species_ancestors[order, RANKS.index("genus")], sizes)
    ref = covariate_mantel(Y[order], z[order], T[np.ix_(order, order)], strata=strata, permutations=49, seed=3)
    assert res.table["r"].to_numpy() == pytest.approx(ref.table["r"].to_numpy(), abs=1e-9, nan_ok=True)
    assert res.table["p_value"].to_numpy()[:3] == pytest.approx(ref.table["p_value"].to_numpy()[:3])
    assert res.scheme == "within-genus" and res.match_sizes and res.n_permutable == ref.n_permutable
    # a Series indexed by binomial gives the same numbers; the true tree as Newick too
    series = pd.Series(z, index=w.species_names)
    assert covariate_alignment(data, series, permutations=0).table["r"].to_numpy() == pytest.approx(
        res.table["r"].to_numpy(), abs=1e-12)
    nwk = covariate_alignment(data, "z", tree=w.newick(), permutations=0)
    assert nwk.table["r"].to_numpy() == pytest.approx(res.table["r"].to_numpy(), abs=1e-9)
    assert "user tree" in nwk.table["permuted"].iloc[1] and "exact on the rank taxonomy" in res.table["permuted"].iloc[1]
    assert all(isinstance(p, str) and len(p) > 40 for p in res.table["permuted"])
    json.dumps(res.to_dict())


def test_missing_values_and_small_species_are_dropped_and_listed(world):
    w, z, data = world
    series = pd.Series(z, index=w.species_names)
    series.iloc[:5] = np.nan
    res = covariate_alignment(data, series, permutations=0, min_images=2)
    sizes = np.bincount(w.item_species)
    n_small = int((sizes[5:] < 2).sum())
    assert res.n_species == w.n_species - 5 - n_small
    assert (res.dropped["reason"] == "missing covariate").sum() == 5
    assert set(res.dropped.loc[res.dropped.reason == "missing covariate", "species"]) == set(w.species_names[:5])
    assert (res.dropped["reason"] == "fewer than 2 images").sum() == n_small


def test_categorical_column_and_schemes_on_a_treedata(world):
    _, _, data = world
    res = covariate_alignment(data, "habitat", permutations=19, permute="within-family", match_sizes=False)
    assert res.kind == "categorical" and res.scheme == "within-family"
    assert "same family" in res.table["permuted"].iloc[1] and "approximate" in res.table["permuted"].iloc[1]
    free = covariate_alignment(data, "habitat", permutations=19, permute="free", match_sizes=False)
    assert "freely" in free.table["permuted"].iloc[1] and free.n_permutable == free.n_species
    assert free.table["r"].to_numpy() == pytest.approx(res.table["r"].to_numpy())


# --- the null and known truth --------------------------------------------------------------------------


def _null_world(seed: int, *, shared: bool):
    """~200 species; covariate either Brownian on the rank tree (deep-heavy) or the embedding's own genus-level
    ancestral trait + species-level noise: in both the embedding does not follow the covariate among congeners."""
    w = simulate_world(seed=seed, n_kingdoms=2, dim=16, trait_dim=4, noise=1.0, images_per_species=(1, 3))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    anc = w.species_ancestors
    if shared:
        z = w.node_traits["genus"][anc[:, RANKS.index("genus")], 0] + 0.7 * rng.standard_normal(w.n_species)
    else:
        z = _bm(rng, anc, [w.n_taxa(r) for r in RANKS], [4, 4, 2, 1, 1, 0.5, 0.5])
    sizes = np.bincount(w.item_species)
    return (_centroids(w.embeddings.astype(float), w.item_species, w.n_species), z, _rank_tree_distance(anc),
            permutation_strata(anc[:, RANKS.index("genus")], sizes))


def _rejections(n_worlds: int, permutations: int, *, shared: bool, first_seed: int = 0):
    default = free = 0
    for s in range(first_seed, first_seed + n_worlds):
        Y, z, T, strata = _null_world(s, shared=shared)
        default += covariate_mantel(Y, z, T, strata=strata, permutations=permutations, seed=s,
                                    test_tree_covariate=False).p_value <= ALPHA
        free += covariate_mantel(Y, z, T, permutations=permutations, seed=s,
                                 test_tree_covariate=False).p_value <= ALPHA
    return int(default), int(free)


def test_null_default_scheme_holds_its_level_where_free_permutation_fails():
    """60 worlds where covariate and embedding share their history down to the genus: the classical
    free-permutation partial Mantel rejects in most, the default (within genus, equal sizes) at about 5 %."""
    default, free = _rejections(60, 99, shared=True)
    assert default <= 9  # P(≥ 10 of 60 | 5 %) ≈ 0.2 % (this seed: 7; free: 59)
    assert free >= 30


@pytest.mark.slow
def test_null_default_scheme_is_calibrated_in_300_worlds():
    for shared in (True, False):
        default, _ = _rejections(300, 199, shared=shared, first_seed=1000)
        ci = scipy.stats.binomtest(default, 300).proportion_ci(method="exact")
        assert ci.low <= ALPHA <= ci.high, (shared, default)


def test_known_truth_shift_along_the_covariate_within_genera_is_detected():
    """Every image moved along one direction by b × (covariate − its genus mean): a signal only among
    congeners, which the tree cannot explain. One image per species: every congener can swap."""
    w = simulate_world(seed=8, dim=24, trait_dim=8, noise=0.5, images_per_species=1)
    rng = np.random.default_rng(2)
    anc = w.species_ancestors
    genus = anc[:, RANKS.index("genus")]
    z = _bm(rng, anc, [w.n_taxa(r) for r in RANKS], [1.0] * 7)
    within = z - (np.bincount(genus, weights=z) / np.bincount(genus))[genus]
    u = rng.standard_normal(24)
    u /= np.linalg.norm(u)
    X = w.embeddings + 6.0 * np.outer(within[w.item_species], u).astype(np.float32)  # centroid norm ~ 11.5
    items = w.items.copy()
    items["z"] = z[w.item_species]
    res = covariate_alignment(tp.TreeData(X, items), "z", permutations=299, seed=0)
    assert res.p_value < 0.01 and res.r > 0.005
    assert res.table["p_value"].iloc[0] < 0.01
    # the same world without the shift: no signal
    null = covariate_alignment(tp.TreeData(w.embeddings, items), "z", permutations=299, seed=0)
    assert null.p_value > 0.05


# --- bad inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_in_one_line(world, small, monkeypatch):
    w, z, data = world
    items = data.items.copy()
    items["noisy"] = np.arange(len(items), dtype=float)  # varies within every species with ≥ 2 images
    bad = tp.TreeData(data.X, items)
    with pytest.raises(TreeprobeError, match=r"covariate 'noisy' varies within species '[A-Z][a-z]+ [a-z]+'"):
        covariate_alignment(bad, "noisy", permutations=0)
    with pytest.raises(TreeprobeError, match="'nope' is not a column of the items"):
        covariate_alignment(data, "nope")
    items["const"] = 1.0
    with pytest.raises(TreeprobeError, match="constant across the"):
        covariate_alignment(tp.TreeData(data.X, items), "const", permutations=0)
    with pytest.raises(TreeprobeError, match="at least 4 species"):
        covariate_alignment(data, pd.Series([1.0, 2.0, 3.0], index=w.species_names[:3]), permutations=0)
    with pytest.raises(TreeprobeError, match="at least 4 species"):
        covariate_mantel(small["Y"][:3], [1.0, 2.0, 3.0], small["T"][:3, :3])
    with pytest.raises(TreeprobeError, match="unknown covariate permutation scheme 'within-species'"):
        covariate_alignment(data, "z", permute="within-species")
    with pytest.raises(TreeprobeError, match="categorical covariate is one column"):
        covariate_alignment(data, ["habitat", "kingdom"], permutations=0)
    with pytest.raises(TreeprobeError, match="names species .* twice"):
        covariate_alignment(data, pd.Series([1.0, 2.0], index=[w.species_names[0]] * 2))
    with pytest.raises(TreeprobeError, match="the covariate has 5 rows but there are 24 species"):
        covariate_mantel(small["Y"], np.arange(5.0), small["T"])
    with pytest.raises(TreeprobeError, match="tree distance must be"):
        covariate_mantel(small["Y"], small["Z"], small["T"][:5, :5])
    monkeypatch.setattr(ca, "MAX_SPECIES", 20)
    with pytest.raises(TreeprobeError, match="at most 20 species"):
        covariate_mantel(small["Y"], small["Z"], small["T"])


def test_no_permutable_species_warns_and_gives_p_one(small):
    with pytest.warns(TreeprobeWarning, match="no two species share a permutation stratum"):
        res = covariate_mantel(small["Y"], small["Z"], small["T"], strata=np.arange(24), permutations=9)
    assert res.p_value == 1.0 and res.n_permutable == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", TreeprobeWarning)
        covariate_mantel(small["Y"], small["Z"], small["T"], strata=small["genus"], permutations=9)
    # a covariate constant within each genus (as the kingdom is): nothing for within-genus permutations to move
    with pytest.warns(TreeprobeWarning, match="constant within every permutation stratum"):
        res = covariate_mantel(small["Y"], small["family"], small["T"], strata=small["genus"], permutations=9)
    assert res.p_value == 1.0 and res.n_permutable == 24


# --- against R -------------------------------------------------------------------------------------------


def _vegan_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    return subprocess.run(["Rscript", "-e", "library(vegan)"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_free_scheme_matches_vegan_mantel_partial(tmp_path):
    if not _vegan_available():
        pytest.skip("Rscript with vegan not available")
    rng = np.random.default_rng(4)
    S = 40
    genus = np.arange(S) // 4
    T = 2.0 * (genus[:, None] != genus[None, :]) + 2.0 * ((genus // 2)[:, None] != (genus // 2)[None, :])
    np.fill_diagonal(T, 0.0)
    Y = rng.normal(size=(S, 8)) + rng.normal(size=(10, 8))[genus]
    z = rng.normal(size=S) + 0.5 * rng.normal(size=10)[genus]
    res = covariate_mantel(Y, z, T, permutations=1999, seed=0)
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    for name, M in (("d", 1 - Yn @ Yn.T), ("c", np.abs(z[:, None] - z[None, :])), ("t", T)):
        np.savetxt(tmp_path / f"{name}.csv", M, delimiter=",")
    script = f"""
    suppressMessages(library(vegan)); set.seed(1)
    rd <- function(n) as.dist(as.matrix(read.csv(file.path("{tmp_path}", paste0(n, ".csv")), header = FALSE)))
    d <- rd("d"); c <- rd("c"); t <- rd("t")
    p <- mantel.partial(c, d, t, method = "pearson", permutations = 1999)
    m <- mantel(c, d, method = "pearson", permutations = 1999)
    cat(sprintf("%.15f", p$statistic), sprintf("%.15f", p$signif), sprintf("%.15f", m$statistic),
        sprintf("%.15f", m$signif), "\\n")
    cat(sprintf("%.15f", p$perm), "\\n")
    """
    out = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True).stdout.splitlines()
    stat, p_r, m_stat, m_p = map(float, out[0].split())
    perm_r = np.array(out[1].split(), dtype=float)
    assert res.r == pytest.approx(stat, abs=1e-10)
    assert res.table["r"].iloc[0] == pytest.approx(m_stat, abs=1e-10)
    assert abs(res.p_value - p_r) < 0.05 and 0.02 < p_r < 0.98  # a p-value away from the edges, loosely
    assert abs(res.table["p_value"].iloc[0] - m_p) < 0.05
    ours = res.permuted_statistics[STATISTICS[1]]
    assert scipy.stats.ks_2samp(ours, perm_r).pvalue > 1e-3
    assert np.mean(ours) == pytest.approx(np.mean(perm_r), abs=0.02)
    assert np.std(ours) == pytest.approx(np.std(perm_r), rel=0.1)
