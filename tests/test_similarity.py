"""Model-to-model similarity: CKA against explicit N×N HSIC formulas, RSA against scipy, the pair
sample's interval, centroids by rank, and the errors."""

import numpy as np
import pytest
import scipy.stats
from scipy.spatial.distance import pdist

from treeprobe import similarity
from treeprobe.errors import TreeprobeError
from treeprobe.similarity import linear_cka, rsa, similarity_by_rank, taxon_centroids

pytestmark = pytest.mark.usefixtures("one_blas_thread")


# --- explicit N×N references (the textbook formulas, nothing shared with the module) ---------


def _hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def _hsic_unbiased(K, L):
    """Song et al. (2012), eq. 5: K̃, L̃ with zeroed diagonals."""
    n = len(K)
    Kt = K - np.diag(np.diag(K))
    Lt = L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def _cka_reference(X, Y, debiased):
    K, L = X @ X.T, Y @ Y.T
    h = _hsic_unbiased if debiased else _hsic_biased
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def _data(n=50, d1=7, d2=13, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d1)) + 3.0  # an offset: the centring matters
    Y = X @ rng.normal(size=(d1, d2)) + 2.0 * rng.normal(size=(n, d2)) - 1.5
    return X, Y


def _random_rotation(d, rng):
    Q, R = np.linalg.qr(rng.normal(size=(d, d)))
    return Q * np.sign(np.diag(R))


# --- CKA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [7, 4096])
@pytest.mark.parametrize("debiased", [True, False])
def test_cka_equals_explicit_hsic_formulas(monkeypatch, debiased, block_rows):
    monkeypatch.setattr(similarity, "_BLOCK_ROWS", block_rows)  # 7: many blocks and a short last one
    X, Y = _data()
    ref = _cka_reference(X, Y, debiased)
    assert 0.1 < ref < 0.99  # a non-trivial value
    assert abs(linear_cka(X, Y, debiased=debiased) - ref) < 1e-10
    assert abs(linear_cka(Y, X, debiased=debiased) - ref) < 1e-10  # symmetric
    # float32 input is accumulated in float64: the same number as float64 input of the same values
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    ref32 = _cka_reference(X32.astype(float), Y32.astype(float), debiased)
    assert abs(linear_cka(X32, Y32, debiased=debiased) - ref32) < 1e-10


@pytest.mark.parametrize("block_rows", [7, 4096])
def test_feature_space_formulas_exact_without_centring(monkeypatch, block_rows):
    """linear_cka centres first (for accuracy), which makes the s_x terms ~0; the formulas themselves
    must be exact on raw, uncentred features (every term of the module docstring is exercised)."""
    monkeypatch.setattr(similarity, "_BLOCK_ROWS", block_rows)
    X, Y = _data(n=40, d1=4, d2=6, seed=12)
    m = similarity._moments(X, Y, centre=False, normalise=False)
    assert np.linalg.norm(m.sx) > 10 and np.linalg.norm(m.sy) > 10  # really uncentred
    assert abs(similarity._debiased_cka(m) - _cka_reference(X, Y, True)) < 1e-10
    assert abs(similarity._biased_cka(m) - _cka_reference(X, Y, False)) < 1e-10
    K, L = X @ X.T, Y @ Y.T
    h = similarity._hsic_unbiased(m.n, m.Gxy, m.sx, m.sy, float(m.ay @ m.sy), float(m.bx @ m.sx), m.sab, m.sa, m.sb)
    assert abs(h - _hsic_unbiased(K, L)) < 1e-9 * abs(_hsic_unbiased(K, L))


def test_debiased_and_biased_differ_and_small_n():
    X, Y = _data(n=12, d1=3, d2=5, seed=4)
    a, b = linear_cka(X, Y), linear_cka(X, Y, debiased=False)
    assert abs(a - _cka_reference(X, Y, True)) < 1e-10 and abs(b - _cka_reference(X, Y, False)) < 1e-10
    assert abs(a - b) > 1e-3
    X4, Y4 = _data(n=5, d1=2, d2=3, seed=5)  # the smallest N where HSIC_u(K, K) is reliably positive
    ref = _cka_reference(X4, Y4, True)
    if _hsic_unbiased(X4 @ X4.T, X4 @ X4.T) > 0 and _hsic_unbiased(Y4 @ Y4.T, Y4 @ Y4.T) > 0:
        assert abs(linear_cka(X4, Y4) - ref) < 1e-10


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_invariances(debiased):
    rng = np.random.default_rng(1)
    X, Y = _data(n=80, d1=6, d2=9, seed=1)
    base = linear_cka(X, Y, debiased=debiased)
    Q = _random_rotation(6, rng)
    assert abs(linear_cka(X @ Q, Y, debiased=debiased) - base) < 1e-10  # orthogonal rotation
    assert abs(linear_cka(0.01 * X, 250.0 * Y, debiased=debiased) - base) < 1e-10  # isotropic scaling
    assert abs(linear_cka(X + 40.0, Y - 7.0, debiased=debiased) - base) < 1e-9  # translation
    assert abs(linear_cka(X, X, debiased=debiased) - 1.0) < 1e-12
    assert abs(linear_cka(X, 3.0 * X @ Q + 1.0, debiased=debiased) - 1.0) < 1e-12
    # an anisotropic scaling is not an invariance: the value must move
    assert abs(linear_cka(X * np.array([10.0, 1, 1, 1, 1, 0.1]), Y, debiased=debiased) - base) > 1e-3


def test_debiased_cka_near_zero_for_independent_wide_data():
    """Why debiasing matters: N = 200 items, D = 500 features each, X and Y independent. Measured
    (seed 0): debiased 0.0105, biased 0.717 (the biased CKA of pure noise, since D > N);
    over seeds 0-19 the debiased value had mean 0.002, sd 0.005, largest |value| 0.0105."""
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(200, 500)), rng.normal(size=(200, 500))
    deb, bia = linear_cka(X, Y), linear_cka(X, Y, debiased=False)
    assert abs(deb) < 0.04
    assert bia > 0.6


def test_known_truth_rotated_copy_and_independent():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 32))
    Y = X @ _random_rotation(32, rng) + 0.05 * rng.normal(size=(400, 32))
    assert linear_cka(X, Y) > 0.99
    assert rsa(X, Y).statistic > 0.99
    assert rsa(X, Y, method="pearson").statistic > 0.99
    Z = rng.normal(size=(400, 20))
    assert abs(linear_cka(X, Z)) < 0.03
    assert abs(rsa(X, Z).statistic) < 0.05
    assert abs(rsa(X, Z, method="pearson").statistic) < 0.05


# --- RSA ---------------------------------------------------------------------------------


def _rsa_data(n, seed, d1=5, d2=9, noise=1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d1)) + 0.5
    Y = np.hstack([X, np.zeros((n, d2 - d1))]) @ _random_rotation(d2, rng) + noise * rng.normal(size=(n, d2))
    return X, Y


@pytest.mark.parametrize("cond_block", [16, 1024])
def test_rsa_exact_spearman_equals_scipy_on_pdist(monkeypatch, cond_block):
    monkeypatch.setattr(similarity, "_COND_BLOCK", cond_block)
    X, Y = _rsa_data(120, 3)
    ref = scipy.stats.spearmanr(pdist(X, "cosine"), pdist(Y, "cosine"))[0]
    res = rsa(X, Y)
    assert res.method == "spearman" and res.estimator == "exact" and np.isnan(res.ci95)
    assert res.n_items == 120 and res.n_pairs == 120 * 119 // 2
    assert 0.2 < ref < 0.95
    assert abs(res.statistic - ref) < 1e-10
    assert abs(rsa(X.astype(np.float32), Y).statistic
               - scipy.stats.spearmanr(pdist(X.astype(np.float32).astype(float), "cosine"),
                                       pdist(Y, "cosine"))[0]) < 1e-10


def test_condensed_cosine_is_pdist_order():
    X, _ = _rsa_data(37, 4)
    for block in (5, 1024):
        old = similarity._COND_BLOCK
        similarity._COND_BLOCK = block
        try:
            np.testing.assert_allclose(similarity._condensed_cosine(X, "X"), pdist(X, "cosine"), atol=1e-13)
        finally:
            similarity._COND_BLOCK = old


@pytest.mark.parametrize("block_rows", [7, 4096])
def test_rsa_pearson_is_exact_at_any_n(monkeypatch, block_rows):
    monkeypatch.setattr(similarity, "_BLOCK_ROWS", block_rows)
    X, Y = _rsa_data(150, 5)
    ref = scipy.stats.pearsonr(pdist(X, "cosine"), pdist(Y, "cosine"))[0]
    res = rsa(X, Y, method="pearson", max_exact=10)  # no sampling for Pearson, whatever max_exact
    assert res.estimator == "exact" and res.n_pairs == 150 * 149 // 2 and np.isnan(res.ci95)
    assert abs(res.statistic - ref) < 1e-10
    assert abs(res.statistic - rsa(X, Y).statistic) > 1e-3  # Pearson ≠ Spearman here


@pytest.fixture(scope="module")
def rsa_3000():
    X, Y = _rsa_data(3000, 6, d1=4, d2=6, noise=1.5)
    exact = rsa(X, Y, max_exact=5000)
    assert exact.estimator == "exact"
    return X, Y, exact.statistic


def test_rsa_pair_sample_within_its_interval(rsa_3000):
    X, Y, exact = rsa_3000
    res = rsa(X, Y, max_exact=1000, n_pairs=50_000, seed=3)
    assert res.estimator == "pair-sample" and res.n_pairs == 50_000 and res.n_items == 3000
    assert 0 < res.ci95 < 0.02
    assert abs(res.statistic - exact) <= res.ci95
    again = rsa(X, Y, max_exact=1000, n_pairs=50_000, seed=3)
    assert again == res  # seeded
    assert rsa(X, Y, max_exact=1000, n_pairs=50_000, seed=4).statistic != res.statistic
    # the estimate and its interval written out: the documented pair draw (i, j uniform, j redrawn
    # while equal, then ordered), Spearman r over the sample, and the batch-means half-width
    # t(0.975, 19) · sd(ddof=1) of the r of 20 consecutive groups / sqrt(20)
    rng = np.random.default_rng(3)
    i, j = rng.integers(0, 3000, 50_000), rng.integers(0, 3000, 50_000)
    same = np.flatnonzero(i == j)
    while same.size:
        j[same] = rng.integers(0, 3000, same.size)
        same = same[i[same] == j[same]]
    i, j = np.minimum(i, j), np.maximum(i, j)
    UX = X / np.linalg.norm(X, axis=1, keepdims=True)
    UY = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    d, e = 1 - np.einsum("ij,ij->i", UX[i], UX[j]), 1 - np.einsum("ij,ij->i", UY[i], UY[j])
    assert res.statistic == pytest.approx(scipy.stats.spearmanr(d, e)[0], abs=1e-9)
    groups = [scipy.stats.spearmanr(a, b)[0] for a, b in zip(np.array_split(d, 20), np.array_split(e, 20))]
    half = scipy.stats.t.ppf(0.975, 19) * np.std(groups, ddof=1) / np.sqrt(20)
    assert res.ci95 == pytest.approx(half, rel=1e-6)


def test_rsa_pair_sample_interval_coverage(rsa_3000):
    X, Y, exact = rsa_3000
    runs = [rsa(X, Y, max_exact=1000, n_pairs=5_000, seed=s) for s in range(40)]
    est = np.array([r.statistic for r in runs])
    half = np.array([r.ci95 for r in runs])
    covered = int(np.sum(np.abs(est - exact) <= half))
    assert covered >= 36, f"the 95 % interval covered the exact value in {covered} of 40 seeds"
    # and it is not covering by being too wide: half-width ≈ 1.96 × the spread of the estimates
    ratio = np.median(half) / (1.96 * np.std(est, ddof=1))
    assert 0.6 < ratio < 1.6, ratio
    assert abs(np.mean(est) - exact) < 3 * np.std(est, ddof=1) / np.sqrt(40)  # no bias beyond noise


def test_pair_sampler_uniform_and_ordered():
    rng = np.random.default_rng(0)
    i, j = similarity._sample_pairs(5, 100_000, rng)
    assert (i < j).all() and i.min() >= 0 and j.max() <= 4
    counts = np.bincount(i * 5 + j, minlength=25)[[a * 5 + b for a in range(5) for b in range(a + 1, 5)]]
    assert counts.sum() == 100_000
    assert scipy.stats.chisquare(counts).pvalue > 1e-3  # the 10 pairs equally likely


# --- centroids and by rank -----------------------------------------------------------------


def _hand_centroids(X, codes):
    taxa = sorted(set(int(c) for c in codes if c >= 0))
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = np.array([U[codes == t].mean(axis=0) for t in taxa])
    return C / np.linalg.norm(C, axis=1, keepdims=True), np.array(taxa)


def test_taxon_centroids_by_hand():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(30, 4)) * rng.uniform(0.1, 10, size=(30, 1))  # rows of very different norms
    codes = rng.choice([-1, 0, 2, 5], size=30)
    codes[:4] = [-1, 0, 2, 5]
    X[codes == -1] = np.nan  # unknown rows are ignored, whatever they hold
    C, taxa = taxon_centroids(X, codes)
    refC, reftaxa = _hand_centroids(X, codes)
    assert taxa.tolist() == reftaxa.tolist() == [0, 2, 5]
    np.testing.assert_allclose(C, refC, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-12)
    C0, t0 = taxon_centroids(X, np.full(30, -1))
    assert C0.shape == (0, 4) and t0.size == 0


def test_similarity_by_rank_against_hand_centroids():
    rng = np.random.default_rng(8)
    n = 90
    genus = np.arange(n) % 12
    family = genus // 3  # 4 families
    order = family // 2  # 2 orders: below min_taxa
    genus_unknown = genus.copy()
    genus_unknown[::10] = -1
    X = rng.normal(size=(12, 6))[genus] + 0.4 * rng.normal(size=(n, 6))
    Y = np.hstack([X, rng.normal(size=(n, 3))]) + 0.3 * rng.normal(size=(n, 9))
    codes = {"order": order, "family": family, "genus": genus_unknown}
    df = similarity_by_rank(X, Y, codes)
    assert df["rank"].tolist() == ["image", "order", "family", "genus"]
    assert df.columns[:5].tolist() == ["rank", "n_units", "cka", "rsa_spearman", "rsa_estimator"]
    assert df["n_units"].tolist() == [n, 2, 4, 12]

    UX = X / np.linalg.norm(X, axis=1, keepdims=True)
    UY = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    img = df.iloc[0]
    assert abs(img.cka - _cka_reference(UX, UY, True)) < 1e-10
    assert abs(img.rsa_spearman - scipy.stats.spearmanr(pdist(UX, "cosine"), pdist(UY, "cosine"))[0]) < 1e-10
    assert img.note == ""

    for row, rank in ((df.iloc[2], "family"), (df.iloc[3], "genus")):
        CX, tx = _hand_centroids(X, codes[rank])
        CY, ty = _hand_centroids(Y, codes[rank])
        assert (tx == ty).all()
        assert abs(row.cka - _cka_reference(CX, CY, True)) < 1e-10, rank
        assert abs(row.rsa_spearman - scipy.stats.spearmanr(pdist(CX, "cosine"), pdist(CY, "cosine"))[0]) < 1e-10
        assert row.rsa_estimator == "exact" and row.note == ""

    order_row = df.iloc[1]
    assert np.isnan(order_row.cka) and np.isnan(order_row.rsa_spearman)
    assert order_row.note == "only 2 taxa (< min_taxa = 4)"

    only_cka = similarity_by_rank(X, Y, codes, methods=("cka",), min_taxa=12)
    assert "rsa_spearman" not in only_cka.columns
    assert np.isnan(only_cka.cka[2]) and only_cka.cka[3] == df.cka[3]


def test_similarity_by_rank_samples_pairs_above_max_exact():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(60, 5))
    df = similarity_by_rank(X, X + 0.1 * rng.normal(size=(60, 5)), {"genus": np.arange(60) % 30},
                            max_exact=40, n_pairs=2000)
    assert df.rsa_estimator.tolist() == ["pair-sample", "exact"]
    assert df.rsa_ci95[0] > 0 and np.isnan(df.rsa_ci95[1])


# --- errors --------------------------------------------------------------------------------


def _one_line_error(fn, *args, match, **kw):
    with pytest.raises(TreeprobeError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


def test_errors():
    rng = np.random.default_rng(10)
    X, Y = rng.normal(size=(10, 3)), rng.normal(size=(10, 4))
    _one_line_error(linear_cka, X, Y[:9], match="X has 10 rows but Y has 9")
    _one_line_error(rsa, X, Y[:9], match="X has 10 rows but Y has 9")
    _one_line_error(similarity_by_rank, X, Y[:9], {}, match="X has 10 rows but Y has 9")
    _one_line_error(linear_cka, X[:3], Y[:3], match="debiased CKA needs at least 4 items; got 3")
    assert abs(linear_cka(X[:3], Y[:3], debiased=False) - _cka_reference(X[:3], Y[:3], False)) < 1e-10
    _one_line_error(linear_cka, X[:1], Y[:1], debiased=False, match="at least 2 items")
    _one_line_error(rsa, X[:2], Y[:2], match="at least 3 items")
    _one_line_error(linear_cka, X[0], Y[0], match="2-D")
    bad = X.copy()
    bad[4, 1] = np.nan
    _one_line_error(linear_cka, bad, Y, match="X contains NaN or infinite")
    _one_line_error(linear_cka, X, np.where(Y > 1.5, np.inf, Y), match="Y contains NaN or infinite")
    for method in ("spearman", "pearson"):
        _one_line_error(rsa, bad, Y, method=method, match="X contains NaN or infinite")
    bad = X.copy()
    bad[2] = 0
    for method in ("spearman", "pearson"):
        _one_line_error(rsa, bad, Y, method=method, match="1 rows of X are all zeros")
    _one_line_error(linear_cka, np.ones((10, 3)), Y, match="undefined")
    _one_line_error(linear_cka, np.ones((10, 3)), Y, debiased=False, match="X is constant")
    _one_line_error(rsa, np.ones((10, 3)), Y, match="correlation is undefined")
    _one_line_error(rsa, np.ones((10, 3)), Y, method="pearson", match="correlation is undefined")
    same_direction = rng.uniform(0.5, 7.0, size=(10, 1)) * np.array([1.0, 3.0, -2.0])  # cosines 1 ± rounding
    _one_line_error(rsa, Y, same_direction, method="pearson", match="distances of Y are equal")
    _one_line_error(rsa, X, Y, method="kendall", match="unknown RSA method 'kendall'")
    _one_line_error(rsa, X, Y, n_pairs=10, match="n_pairs must be >= 200")
    _one_line_error(similarity_by_rank, X, Y, {"genus": np.zeros(10, int)}, min_taxa=3, match="min_taxa must be >= 4")
    _one_line_error(similarity_by_rank, X, Y, {"genus": np.zeros(9, int)}, match="codes for rank 'genus'")
    _one_line_error(similarity_by_rank, X, Y, {}, methods=("cka", "svcca"), match="unknown similarity method")
    _one_line_error(taxon_centroids, X, np.zeros(9, int), match="codes have shape")
    _one_line_error(taxon_centroids, X, np.zeros(10), match="codes must be integers")


def test_average_ranks_equal_scipy_with_ties():
    rng = np.random.default_rng(11)
    for a in (rng.normal(size=1000), rng.integers(0, 7, size=1000).astype(float), np.array([2.0]),
              np.array([3.0, 1.0, 3.0, 3.0, -1.0])):
        np.testing.assert_array_equal(similarity._average_ranks(a), scipy.stats.rankdata(a))
