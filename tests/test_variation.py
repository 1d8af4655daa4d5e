"""Within-species variation vs the between-species subspace (treeprobe/variation.py): against explicit
computations (numpy eigh / projection matrices / scipy subspace angles), on simulated known truth, under
the null (labels shuffled within species), invariance to rotation, errors, and the real BioCLIP-2 set."""

import numpy as np
import pandas as pd
import pytest
from scipy import linalg, stats

import treeprobe as tp
from treeprobe import variation as va
from treeprobe.errors import TreeprobeError


def _world(seed, *, S=30, n=8, D=40, k=3, spread=5.0, noise=0.3, shift=None, offset=0.0):
    """Species centroids in span(e_0..e_{k-1}) (rotated by a random orthogonal Q), isotropic noise,
    levels alternating within species, ``shift`` (D,) in the unrotated frame added to level-1 items,
    ``offset`` added to coordinate D-1 of every item (far from the origin, L2 normalisation is almost a
    constant scaling). Returns X (S·n, D), species codes, levels, Q."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(D, D)))[0]
    cent = np.zeros((S, D))
    cent[:, :k] = rng.normal(scale=spread, size=(S, k))
    codes = np.repeat(np.arange(S), n)
    group = np.tile(np.arange(n) % 2, S)
    X = cent[codes] + rng.normal(scale=noise, size=(S * n, D))
    if shift is not None:
        X[group == 1] += shift
    X[:, D - 1] += offset
    return X @ Q.T, codes, group, Q


def _treedata(X, codes, group):
    items = pd.DataFrame({"kingdom": "K", "phylum": "P", "class": "C", "order": [f"o{c % 2}" for c in codes],
                          "family": [f"f{c % 4}" for c in codes], "genus": [f"f{c % 4}g{c // 12}" for c in codes],
                          "species": [f"s{c}" for c in codes], "cov": np.where(group == 1, "b", "a")})
    return tp.TreeData(X.astype(np.float32), items)


# --- against explicit computations --------------------------------------------------------------


def test_subspace_share_and_angle_match_explicit_computation(monkeypatch):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 12)) + np.repeat(rng.normal(scale=3, size=(15, 12)), 6, axis=0)
    codes = np.repeat(np.arange(15), 6)
    codes[:3] = -1                                   # unknown species: left out everywhere
    codes[-2:] = 99                                  # a species with 2 items
    group = rng.integers(0, 2, size=90)
    group[10] = -1
    df = pd.DataFrame(X).assign(sp=codes, g=group)
    known = df[df.sp >= 0]
    cent = known.groupby("sp")[list(range(12))].mean().to_numpy()
    Cc = cent - cent.mean(0)
    lam, vec = np.linalg.eigh(Cc.T @ Cc)
    lam, vec = lam[::-1], vec[:, ::-1]
    k = next(j + 1 for j in range(12) if lam[: j + 1].sum() / lam.sum() >= 0.8)
    P = vec[:, :k] @ vec[:, :k].T
    sub = va.between_subspace(va.species_centroids(X, codes)[0], variance_share=0.8)
    assert sub.n_components == k
    np.testing.assert_allclose(sub.basis @ sub.basis.T, P, atol=1e-10)
    np.testing.assert_allclose(sub.explained, lam[:k] / lam.sum(), rtol=1e-10)
    dev = np.vstack([g.to_numpy()[:, :12] - g.to_numpy()[:, :12].mean(0) for _, g in known.groupby("sp")])
    R = np.eye(12) - P
    expect = np.trace(R @ dev.T @ dev @ R) / np.trace(dev.T @ dev)
    got_dev, _ = va.within_deviations(X, codes)
    assert got_dev.shape == dev.shape
    assert va.outside_share(got_dev, sub.basis) == pytest.approx(expect, rel=1e-10)
    # the scatter the TreeData path uses (blocks of rows, no deviation matrix) is dev.T @ dev of pandas' groups
    monkeypatch.setattr(va, "_BLOCK_ROWS", 7)  # many blocks, one ending inside a species
    G, m, n_sp = va.within_scatter(X, codes)
    np.testing.assert_allclose(G, dev.T @ dev, rtol=0, atol=1e-12)
    assert (m, n_sp) == (len(dev), int((known.groupby("sp").size() >= 2).sum()))
    assert va._scatter_outside_share(G, sub.basis) == pytest.approx(expect, rel=1e-10)
    assert va._scatter_random_share(G, 3) == pytest.approx(va.random_subspace_share(dev, 3), rel=1e-10)
    diffs = []
    for _, g in df[(df.sp >= 0) & (df.g >= 0)].groupby("sp"):
        a, b = g[g.g == 0], g[g.g == 1]
        if len(a) and len(b):
            diffs.append(b[list(range(12))].mean().to_numpy() - a[list(range(12))].mean().to_numpy())
    v, n_both = va.covariate_shift(X, codes, group)
    assert n_both == len(diffs)
    np.testing.assert_allclose(v, np.mean(diffs, axis=0), atol=1e-12)
    angle = np.degrees(linalg.subspace_angles(v[:, None], sub.basis)[0])
    assert va.shift_angle(v, sub.basis) == pytest.approx(angle, abs=1e-8)
    assert va.inside_share(v, sub.basis) == pytest.approx(v @ P @ v / (v @ v), rel=1e-10)
    obs, _ = va.shift_permutations(X, codes, group, permutations=3)
    np.testing.assert_allclose(obs, v, atol=1e-12)
    _, blocks = va.shift_permutations(X, codes, group, permutations=23, seed=4)  # 5 permutations per block
    monkeypatch.setattr(va, "_BLOCK_ROWS", 8192)
    _, whole = va.shift_permutations(X, codes, group, permutations=23, seed=4)  # one block: the same draws
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-12)


def test_taxon_centroids_are_means_of_species_centroids():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    sp = rng.integers(0, 12, size=40)
    genus = sp // 4
    genus[sp == 11] = -1
    df = pd.DataFrame(X).assign(sp=sp, gen=genus)
    sc = df[df.gen >= 0].groupby(["gen", "sp"]).mean().groupby("gen").mean().to_numpy()
    np.testing.assert_allclose(va.taxon_centroids(X, sp, genus), sc, atol=1e-12)


def test_random_subspace_sd_matches_monte_carlo():
    rng = np.random.default_rng(3)
    D, k = 10, 3
    E = rng.normal(size=(200, D)) * np.linspace(3, 0.2, D)
    mean, sd = va.random_subspace_share(E, k)
    shares = [va.outside_share(E, np.linalg.qr(rng.normal(size=(D, k)))[0]) for _ in range(3000)]
    assert mean == pytest.approx((D - k) / D)
    assert np.mean(shares) == pytest.approx(mean, abs=0.006)
    assert np.std(shares) == pytest.approx(sd, rel=0.06)


def test_permutations_shuffle_within_species_only():
    X = np.zeros((6, 1))
    X[[0, 1, 2], 0] = [0.0, 1.0, 2.0]                # species 0
    X[[3, 4, 5], 0] = [10.0, 20.0, 40.0]             # species 1
    codes = np.array([0, 0, 0, 1, 1, 1])
    group = np.array([0, 0, 1, 0, 1, 1])
    obs, perm = va.shift_permutations(X, codes, group, permutations=400, seed=5)
    s0 = {2.0 - 0.5, 1.0 - 1.0, 0.0 - 1.5}           # one level-1 item of three
    s1 = {30.0 - 10.0, 25.0 - 20.0, 15.0 - 40.0}     # two level-1 items of three
    expect = {round((a + b) / 2, 9) for a in s0 for b in s1}
    got = {round(x, 9) for x in perm[:, 0]}
    assert obs[0] == pytest.approx((1.5 + 20.0) / 2)
    assert got == expect                             # all 9 within-species relabellings, nothing else
    _, perm2 = va.shift_permutations(X, codes, group, permutations=400, seed=5)
    np.testing.assert_array_equal(perm, perm2)


# --- known truth -------------------------------------------------------------------------------------


def test_isotropic_within_noise_gives_chance_share():
    X, codes, _, _ = _world(4, S=40, n=10)
    sub = va.between_subspace(va.species_centroids(X, codes)[0], variance_share=0.9)
    assert sub.n_components == 3
    dev, _ = va.within_deviations(X, codes)
    assert va.outside_share(dev, sub.basis) == pytest.approx(37 / 40, abs=0.01)
    # within-species variation placed inside the subspace instead: share near 0
    Xin, codes_in, _, Q = _world(4, S=40, n=10, noise=0.0)
    rng = np.random.default_rng(0)
    noise = np.zeros_like(Xin)
    noise[:, :3] = rng.normal(scale=0.3, size=(len(Xin), 3))
    Xin = Xin + noise @ Q.T
    sub = va.between_subspace(va.species_centroids(Xin, codes_in)[0], n_components=3)
    assert va.outside_share(va.within_deviations(Xin, codes_in)[0], sub.basis) < 1e-10


@pytest.mark.parametrize("where", ["orthogonal", "inside"])
def test_shift_angle_recovered(where):
    D = 40
    shift = np.zeros(D)
    shift[10 if where == "orthogonal" else 1] = 2.0   # estimate noise ≈ 0.25 in norm
    X, codes, group, _ = _world(6, D=D, shift=shift, offset=100.0)
    data = _treedata(X, codes, group)
    res = va.within_species_variation(data, covariate="cov", n_components=3, permutations=199, seed=1,
                                      ranks=["genus", "species"])
    s = res.summary
    assert s["levels"] == ["a", "b"] and s["n_species_both"] == 30
    assert s["p_norm"] == pytest.approx(1 / 200)     # a consistent shift: beats every permutation
    if where == "orthogonal":
        assert s["shift_angle_deg"] > 80 and s["p_angle"] <= 0.02
        assert res.ranks["random_p"].iloc[-1] < 0.01
    else:
        assert s["shift_angle_deg"] < 12 and s["p_angle"] > 0.9
    sp = res.ranks.set_index("rank").loc["species"]
    assert sp["shift_inside_share"] == pytest.approx(np.cos(np.radians(sp["shift_angle_deg"])) ** 2)
    # within-species variance: noise 0.09 per axis, plus the ±1 of the shift on its axis
    expect = (37 * 0.09 + (1.0 if where == "orthogonal" else 0.0)) / (40 * 0.09 + 1.0)
    assert sp["within_outside_share"] == pytest.approx(expect, abs=0.03)


def test_per_rank_rows_use_between_taxon_subspaces():
    X, codes, group, _ = _world(7, S=24, n=4, D=20)
    data = _treedata(X, codes, group)
    res = va.within_species_variation(data, covariate="cov", permutations=0, variance_share=0.95)
    t = res.ranks.set_index("rank")
    assert list(t.index) == list(tp.RANKS)
    assert t.loc["kingdom", "n_components"] == 0 and t.loc["kingdom", "within_outside_share"] == 1.0
    assert t.loc["order", "n_components"] == 1       # 2 orders: one direction
    sp = np.asarray(data.taxonomy.codes_by_rank()["species"])
    ge = np.asarray(data.taxonomy.codes_by_rank()["genus"])
    U = data.unit
    sub = va.between_subspace(va.taxon_centroids(U, sp, ge), variance_share=0.95)
    dev, _ = va.within_deviations(U, sp)
    assert t.loc["genus", "n_taxa"] == np.unique(ge).size
    assert t.loc["genus", "within_outside_share"] == pytest.approx(va.outside_share(dev, sub.basis), rel=1e-6)
    assert t.loc["genus", "shift_angle_deg"] == pytest.approx(va.shift_angle(res.shift, sub.basis), rel=1e-6)
    assert res.summary["headline_rank"] == "species"


# --- null -------------------------------------------------------------------------------------------


def _null_pvalues(n_worlds, B, seed0):
    out = []
    for w in range(n_worlds):
        X, codes, group, _ = _world(1000 + seed0 + w, S=10, n=6, D=8, k=2, spread=2.0, noise=1.0)
        X = X * np.linspace(2.0, 0.5, 8)             # anisotropic noise: the angle null is not trivial
        group = np.random.default_rng(w).permutation(group.reshape(10, 6).T).T.ravel()
        sub = va.between_subspace(va.species_centroids(X, codes)[0], n_components=2)
        obs, perm = va.shift_permutations(X, codes, group, permutations=B, seed=w)
        ang = va.shift_angle(obs, sub.basis)
        pang = np.degrees(np.arccos(np.sqrt(np.clip(np.sum((perm @ sub.basis) ** 2, 1) / np.sum(perm ** 2, 1), 0, 1))))
        p_norm = (1 + np.sum(np.linalg.norm(perm, axis=1) >= np.linalg.norm(obs) * (1 - 1e-9))) / (1 + B)
        p_ang = (1 + np.sum(pang >= ang - 1e-9)) / (1 + B)
        out.append((p_norm, p_ang))
    return np.array(out)


def test_null_pvalues_roughly_uniform():
    p = _null_pvalues(120, 99, 0)
    for col in (0, 1):
        assert stats.kstest(p[:, col], "uniform").pvalue > 0.001
        assert 0.35 < p[:, col].mean() < 0.65


def test_function_pvalues_under_null_match_direct_computation():
    X, codes, group, _ = _world(8, S=12, n=6, D=10, k=2)
    data = _treedata(X, codes, group)
    res = va.within_species_variation(data, covariate="cov", n_components=2, permutations=99, seed=3,
                                      ranks=["species"])
    U = data.unit
    sp = np.asarray(data.taxonomy.codes_by_rank()["species"])
    grp = (data.items["cov"] == "b").to_numpy().astype(int)
    obs, perm = va.shift_permutations(U, sp, grp, permutations=99, seed=3)
    p_norm = (1 + np.sum(np.linalg.norm(perm, axis=1) >= np.linalg.norm(obs))) / 100
    assert res.summary["p_norm"] == pytest.approx(p_norm)
    assert 0 < res.summary["p_norm"] <= 1 and 0 < res.summary["p_angle"] <= 1


@pytest.mark.slow
def test_false_positive_rate_at_005_over_1000_null_worlds():
    p = _null_pvalues(1000, 199, 10_000)
    for col, name in ((0, "norm"), (1, "angle")):
        hits = int(np.sum(p[:, col] <= 0.05))
        ci = stats.binomtest(hits, len(p)).proportion_ci(0.95)
        print(f"null FPR ({name}) = {hits}/{len(p)} = {hits / len(p):.4f}, 95% CI [{ci.low:.4f}, {ci.high:.4f}]")
        assert ci.low <= 0.05 <= ci.high


# --- invariance -----------------------------------------------------------------------------------


def test_rotation_of_embedding_space_changes_nothing():
    shift = np.zeros(20)
    shift[5] = 0.1
    X, codes, group, _ = _world(9, S=20, n=4, D=20, k=3, shift=shift)
    R = np.linalg.qr(np.random.default_rng(11).normal(size=(20, 20)))[0]
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    a = va.within_species_variation(_treedata(X, codes, group), covariate="cov", permutations=99, seed=2)
    b = va.within_species_variation(_treedata(X @ R, codes, group), covariate="cov", permutations=99, seed=2)
    cols = ["n_components", "within_outside_share", "shift_angle_deg", "shift_inside_share", "p_angle"]
    pd.testing.assert_frame_equal(a.ranks[cols], b.ranks[cols], atol=1e-4)
    for key in ("within_outside_share", "shift_norm", "p_norm", "p_angle"):
        assert a.summary[key] == pytest.approx(b.summary[key], abs=1e-4)
    np.testing.assert_allclose(a.shift @ R, b.shift, atol=1e-5)


# --- errors and real data ---------------------------------------------------------------------------


def test_errors_are_one_line_and_clear():
    X, codes, group, _ = _world(12, S=6, n=4, D=6, k=2)
    data = _treedata(X, codes, group)
    with pytest.raises(TreeprobeError, match=r"'nope' is not a column"):
        va.within_species_variation(data, covariate="nope")
    data.items["three"] = np.array(["x", "y", "z"])[np.arange(len(data.items)) % 3]
    with pytest.raises(TreeprobeError, match=r"has 3 levels \('x', 'y', 'z'\), not 2; pass levels"):
        va.within_species_variation(data, covariate="three")
    data.items["split"] = np.where(np.asarray(data.taxonomy.codes_by_rank()["species"]) < 3, "u", "v")
    with pytest.raises(TreeprobeError, match=r"no species is observed under both levels 'u' and 'v'"):
        va.within_species_variation(data, covariate="split")
    with pytest.raises(TreeprobeError, match=r"'w' not found"):
        va.within_species_variation(data, covariate="three", levels=("x", "w"))
    res = va.within_species_variation(data, covariate="three", levels=("x", ["y", "z"]), permutations=9)
    assert res.summary["levels"] == ["x", "y | z"]
    with pytest.raises(TreeprobeError) as err:
        va.between_subspace(np.zeros((3, 2)), variance_share=1.5)
    assert "\n" not in str(err.value)


def test_bioclip2_1k_img_type_smoke():
    data = tp.datasets.bioclip2_1k()
    museum = sorted(v for v in data.items["img_type"].unique() if v.startswith("Museum Specimen"))
    with pytest.raises(TreeprobeError, match="img_type' has 8 levels"):
        va.within_species_variation(data, covariate="img_type")
    res = va.within_species_variation(data, covariate="img_type", levels=("Citizen Science", museum),
                                      permutations=199, seed=0)
    s, t = res.summary, res.ranks
    assert s["n_species_both"] == 5 and s["n_species_within"] == 51 and s["dimension"] == 768
    assert t["within_outside_share"].between(0, 1).all() and t["shift_angle_deg"].between(0, 90).all()
    assert s["within_outside_share"] == pytest.approx(0.2557, abs=0.002)   # measured at species rank
    assert s["shift_angle_deg"] == pytest.approx(29.41, abs=0.1)
    # the deeper the rank, the larger the subspace and the less variation outside it
    assert t["n_components"].is_monotonic_increasing and t["within_outside_share"].is_monotonic_decreasing
    assert (t["within_outside_share"] > t["between_outside_share"]).all()
