"""Numbers audit: the reported intervals, statistics and seeds against formulas written out here.

Each test recomputes a number the science modules report from its definition (documented in the
module docstrings), with numpy/scipy/scikit-learn only, on a case where every term of the formula
changes the result by far more than the tolerance:

* the kNN agreement intervals of :func:`treeprobe.neighbors.knn_rank_agreement` (z = 1.96, the
  finite-population correction sqrt((n_pop - n)/(n_pop - 1)), the rule of three 3/n when the
  sample has no spread, the linearised interval of the normalised score), plain and level-specific;
* the species-centroid level of :func:`treeprobe.tl.mantel` (centroids by full lineage, their tree
  distances from the rank rules including unknown ranks, Pearson / Spearman r, and the permutation
  distributions of both schemes, draw by draw);
* the seeds of the 2-D maps (:func:`treeprobe.embedding_maps.tsne_2d`, :func:`treeprobe.tl.tsne`,
  :func:`treeprobe.tl.umap`).
"""

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.neighbors import NearestNeighbors

import treeprobe as tp
from treeprobe.embedding_maps import tsne_2d
from treeprobe.neighbors import knn_rank_agreement
from treeprobe.permutation import stratified_species_permutation
from treeprobe.taxonomy import RANKS
from tests._helpers import spy_mantel_permutations

pytestmark = pytest.mark.usefixtures("one_blas_thread")

Z = 1.96  # the documented z of the kNN intervals (the 97.5 % normal quantile, rounded)


# --- kNN agreement intervals -------------------------------------------------------------------


def _fpc(n_pop, n):
    """Finite-population correction of a mean of n items drawn without replacement from n_pop."""
    return np.sqrt((n_pop - n) / (n_pop - 1))


def _half(values, n_pop):
    """95 % half-width of the mean of ``values`` (a sample of n_pop items), written out: the normal
    interval with z = 1.96 and ddof = 1, or 3/n (rule of three) when the values do not vary."""
    v = np.asarray(values, dtype=float)
    n = v.size
    sd = v.std(ddof=1)
    return (Z * sd / np.sqrt(n) if sd > 0 else 3.0 / n) * _fpc(n_pop, n)


def _ratio_half(score, ceil, chance, n_pop):
    """Half-width of (mean score - chance)/(mean ceil - chance) by linearisation (delta method)."""
    den = ceil.mean() - chance
    r = (score.mean() - chance) / den
    return _half((score - chance - r * (ceil - chance)) / den, n_pop)


def _queries(n, max_queries, seed):
    """The documented query sample of knn_rank_agreement: sorted, default_rng(seed), no replacement."""
    return np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))


def _ci_world(seed=0):
    """(X, codes) with 300 items: genera of 1-9 items (singletons included, so the population of
    scorable items is smaller than N), 2 species per genus where possible; clustered by genus with
    enough noise that the per-item shares vary."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 10, 80)
    genus = np.repeat(np.arange(80), sizes)[:300]
    genus = np.concatenate([genus, rng.integers(0, 80, 300 - genus.size)])
    genus = genus[rng.permutation(300)]
    species = genus * 2 + (rng.random(300) < 0.5)
    X = 1.2 * rng.normal(size=(80, 10))[genus] + rng.normal(size=(300, 10))
    return X, {"genus": genus, "species": species}


def _plain_per_item(X, codes, k, queries):
    """Per scored query: share of its k nearest (cosine, sklearn brute force) in its own taxon,
    top-1 hit, ceiling min(k, m - 1)/k; the chance over all items; n_pop (items in taxa of > 1)."""
    n = len(X)
    _, nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(X).kneighbors(X)
    assert (nn[:, 0] == np.arange(n)).all()
    nn = nn[:, 1:]
    size = np.bincount(codes)[codes]
    scorable = size > 1
    q = queries[scorable[queries]]
    same = codes[nn[q]] == codes[q][:, None]
    chance = np.mean((size[scorable] - 1) / (n - 1))
    return same.mean(axis=1), same[:, 0].astype(float), np.minimum(k, size[q] - 1) / k, chance, int(scorable.sum())


def _level_per_item(X, parent, child, k, queries):
    """Per scored query: share of its k nearest *outside its own child taxon* in its own parent
    taxon, and the level ceiling min(k, a)/k; the level chance; n_pop (items with a >= 1 and
    N - c >= k). Explicit N x N cosine similarities."""
    n = len(X)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    same_child = child[:, None] == child[None, :]
    a = ((parent[:, None] == parent[None, :]) & ~same_child).sum(axis=1)
    pool = n - same_child.sum(axis=1)
    ev = (a >= 1) & (pool >= k)
    chance = np.mean(a[ev] / pool[ev])
    q = queries[ev[queries]]
    share = []
    for i in q:
        s = np.where(same_child[i], -np.inf, S[i])
        nb = np.argsort(-s, kind="stable")[:k]
        share.append(np.mean(parent[nb] == parent[i]))
    return np.array(share), np.minimum(k, a[q]) / k, chance, int(ev.sum())


def test_knn_intervals_equal_the_formula_with_fpc():
    """Sampled queries (half the items): every *_ci95 column equals 1.96 · sd(ddof=1)/√n · FPC,
    FPC = sqrt((n_pop − n)/(n_pop − 1)) over the items that can be scored (taxa of > 1 item), and
    the normalised columns their linearised (delta-method) interval."""
    X, codes = _ci_world()
    k, mq, seed = 5, 150, 4
    q = _queries(300, mq, seed)
    df = knn_rank_agreement(X, codes, k=k, max_queries=mq, seed=seed).set_index("rank")
    g = df.loc["genus"]
    share, top1, ceil, chance, n_pop = _plain_per_item(X, codes["genus"], k, q)
    n = share.size
    assert g["n_evaluated"] == n and g["estimator"] == "query-subsample" and g["n_queries"] == mq
    assert n_pop < 300 and _fpc(n_pop, n) < 0.75  # singletons are out of the population; FPC matters
    assert g["agreement"] == pytest.approx(share.mean(), abs=1e-12)
    assert g["chance"] == pytest.approx(chance, abs=1e-12)
    assert share.std() > 0 and top1.std() > 0  # the normal branch, not the rule of three
    assert g["agreement_ci95"] == pytest.approx(_half(share, n_pop), rel=1e-10)
    assert g["top1_ci95"] == pytest.approx(_half(top1, n_pop), rel=1e-10)
    assert g["agreement_normalised_ci95"] == pytest.approx(_ratio_half(share, ceil, chance, n_pop), rel=1e-10)
    # what the FPC and the z-value change (far above the tolerance above)
    assert abs(g["agreement_ci95"] / (Z * share.std(ddof=1) / np.sqrt(n)) - 1) > 0.25
    assert abs(1.645 / Z - 1) > 0.1 and abs(2.576 / Z - 1) > 0.1
    # level-specific: genus agreement outside the item's own species
    lshare, lceil, lchance, ln_pop = _level_per_item(X, codes["genus"], codes["species"], k, q)
    assert g["level_n_evaluated"] == lshare.size and lshare.std() > 0 and _fpc(ln_pop, lshare.size) < 0.75
    assert g["level_agreement"] == pytest.approx(lshare.mean(), abs=1e-12)
    assert g["level_chance"] == pytest.approx(lchance, abs=1e-12)
    assert g["level_agreement_ci95"] == pytest.approx(_half(lshare, ln_pop), rel=1e-10)
    assert g["level_normalised_ci95"] == pytest.approx(_ratio_half(lshare, lceil, lchance, ln_pop), rel=1e-10)
    # species (the finest rank): its own population of scorable items
    sshare, stop1, sceil, schance, sn_pop = _plain_per_item(X, codes["species"], k, q)
    s = df.loc["species"]
    assert sn_pop < n_pop and s["n_evaluated"] == sshare.size
    assert s["agreement_ci95"] == pytest.approx(_half(sshare, sn_pop), rel=1e-10)
    assert s["top1_ci95"] == pytest.approx(_half(stop1, sn_pop), rel=1e-10)


def _separated(n_clusters, per, dim=6, seed=0):
    """Tight, far-apart clusters of ``per`` points: every point's nearest neighbours are its own
    cluster's (the k < per nearest)."""
    rng = np.random.default_rng(seed)
    c = np.repeat(np.arange(n_clusters), per)
    return 10.0 * rng.normal(size=(n_clusters, dim))[c] + 0.01 * rng.normal(size=(c.size, dim)), c


def test_knn_intervals_rule_of_three_when_all_or_none_agree():
    """No spread in the sample: the interval is 3/n · FPC (rule of three), for all successes (taxa =
    clusters) and for none (each taxon holds one item of every cluster, so no neighbour agrees)."""
    X, cluster = _separated(30, 6)
    n_items, mq, k = 180, 60, 3
    q = _queries(n_items, mq, 1)
    all_hit = knn_rank_agreement(X, {"genus": cluster}, k=k, max_queries=mq, seed=1).iloc[0]
    none_hit = knn_rank_agreement(X, {"genus": np.arange(n_items) % 6}, k=k, max_queries=mq, seed=1).iloc[0]
    want = 3.0 / mq * _fpc(n_items, mq)  # every item can be scored: n_pop = N, n = the queries
    assert _fpc(n_items, mq) < 0.85
    assert all_hit["agreement"] == 1.0 and all_hit["top1"] == 1.0 and all_hit["n_evaluated"] == q.size
    assert none_hit["agreement"] == 0.0 and none_hit["top1"] == 0.0 and none_hit["n_evaluated"] == q.size
    for row in (all_hit, none_hit):
        assert row["agreement_ci95"] == pytest.approx(want, rel=1e-12)
        assert row["top1_ci95"] == pytest.approx(want, rel=1e-12)
    # the normalised score of "none agree" has no spread either (every item at 0 - chance)
    ch = none_hit["chance"]
    assert none_hit["agreement_normalised"] == pytest.approx(-ch / (1 - ch), abs=1e-12)
    assert none_hit["agreement_normalised_ci95"] == pytest.approx(want, rel=1e-12)


def test_knn_interval_uses_the_scorable_population_not_n():
    """With singletons the FPC population is the items in taxa of > 1 (not N): 40 singletons out of
    200, 100 queries."""
    X, cluster = _separated(40, 4, seed=2)
    codes = np.concatenate([cluster, 1000 + np.arange(40)])  # 160 clustered + 40 singletons
    X = np.vstack([X, 10.0 * np.random.default_rng(3).normal(size=(40, 6))])
    q = _queries(200, 100, 5)
    row = knn_rank_agreement(X, {"genus": codes}, k=2, max_queries=100, seed=5).iloc[0]
    n = int((q < 160).sum())
    assert row["n_evaluated"] == n and row["agreement"] == 1.0
    assert row["agreement_ci95"] == pytest.approx(3.0 / n * _fpc(160, n), rel=1e-12)
    assert abs(_fpc(160, n) / _fpc(200, n) - 1) > 0.05


# --- the species-centroid level of tl.mantel ---------------------------------------------------

#: Rank lengths with exact binary sums: equal tree distances tie exactly whatever the path.
W = np.array([4.0, 2.0, 2.0, 1.5, 1.0, 1.0, 0.25])


def _centroid_world(seed=0, n_species=36, dim=8):
    """TreeData (items shuffled) with 1-4 images per species (6 for one), tree signal, and unknown ranks:
    species of unknown family (a gap: known genus below), items of unknown species (each its own
    leaf), items known only to class."""
    rng = np.random.default_rng(seed)
    rows, vec = [], []
    node = {}  # taxon (prefix tuple) -> its random vector: embeddings follow the tree

    def v(prefix):
        if prefix not in node:
            node[prefix] = rng.normal(size=dim)
        return node[prefix]

    def names(path):  # one name per taxon: its letter and the whole index path (no homonyms)
        return ["KPCOFG"[r] + "".join(map(str, path[:r + 1])) for r in range(len(path))]

    for s in range(n_species):
        lin = names([rng.integers(2), rng.integers(2), rng.integers(2), rng.integers(3), rng.integers(3),
                     rng.integers(4)]) + ["s%d" % s]
        if s % 7 == 3:
            lin[4] = ""  # family unknown, genus and species known
        for _ in range(6 if s == 0 else int(rng.integers(1, 5))):  # species 0 alone in its stratum
            rows.append(list(lin))
            vec.append(sum(v(tuple(lin[:r + 1])) * (0.8 ** r) for r in range(7)))
    for i in range(8):  # species unknown: every image its own leaf below its genus
        lin = names([0, 1, 0, i % 2, 0, i % 3]) + [""]
        rows.append(lin)
        vec.append(sum(v(tuple(lin[:r + 1])) * (0.8 ** r) for r in range(6)))
    for i in range(3):  # known to class only
        lin = names([1, 0, 1]) + [""] * 4
        rows.append(lin)
        vec.append(sum(v(tuple(lin[:r + 1])) for r in range(3)))
    items = pd.DataFrame(rows, columns=list(RANKS))
    X = np.array(vec) + 0.7 * rng.normal(size=(len(rows), dim))
    order = rng.permutation(len(rows))  # rows not grouped by species: placement by position would fail
    return tp.TreeData(X[order].astype(np.float32), items.iloc[order].reset_index(drop=True))


def _units_by_lineage(items):
    """Unit key per item: the full lineage ('' for unknown ranks) when the species is known, else
    the item itself; and the units in the tree's leaf order (species by cumulative label, then the
    items of unknown species in row order). Returns (unit of each item (N,), lineage of each unit)."""
    lin = items[list(RANKS)].astype(str)
    known = (lin["species"] != "").to_numpy()
    key = lin.agg("|".join, axis=1).to_numpy(dtype=object)
    key[~known] = [f"~item {i:06d}" for i in np.flatnonzero(~known)]  # '~' sorts after every name
    keys, unit = np.unique(key, return_inverse=True)
    first = np.array([np.flatnonzero(unit == u)[0] for u in range(len(keys))])
    return unit.ravel(), lin.to_numpy()[first]


def _tree_distance(lineages, w):
    """t between units from their lineages: 2 Σ_{s>r} w_s with r the deepest rank at which both are
    known and share the whole lineage down to r ('' slots included); 2 Σ w if none."""
    n, R = lineages.shape
    tail = 2.0 * np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])  # tail[r] = 2 Σ_{s>=r} w_s
    T = np.empty((n, n))
    for a in range(n):
        for b in range(n):
            deepest = -1
            for r in range(R):
                if lineages[a, r] != "" and (lineages[a, :r + 1] == lineages[b, :r + 1]).all():
                    deepest = r
            T[a, b] = tail[deepest + 1]
    np.fill_diagonal(T, 0.0)  # a unit and itself (an item of unknown species too)
    return T


def _centroids(ds, unit):
    """Unit-norm mean of the unit-normalised rows per unit (pandas groupby), float64 (U, D)."""
    U = ds.unit.astype(np.float64)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    C = pd.DataFrame(U).groupby(unit).sum().to_numpy()
    return C / np.linalg.norm(C, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def centroid_case():
    ds = _centroid_world()
    unit, lineages = _units_by_lineage(ds.items)
    C = _centroids(ds, unit)
    D = 1.0 - C @ C.T
    T = _tree_distance(lineages, W)
    return ds, unit, lineages, D, T


def _spy(monkeypatch):
    return spy_mantel_permutations(monkeypatch)


def test_centroid_level_statistic_and_tree_equal_an_independent_computation(centroid_case):
    ds, unit, lineages, D, T = centroid_case
    S = len(lineages)
    iu = np.triu_indices(S, 1)
    assert (lineages[:, 4] == "").any() and (lineages[:, 6] == "").sum() == 11  # gaps and own leaves
    assert len(np.unique(T[iu])) >= 6  # many tree distances: a dropped rank or length shows
    table = tp.tl.mantel(ds, methods=("pearson", "spearman"), levels=("species-centroid",),
                         permute=("species", "images"), rank_lengths=list(W), permutations=0)
    got = table.set_index(["scheme", "method"])
    want = {"pearson": scipy.stats.pearsonr(D[iu], T[iu])[0], "spearman": scipy.stats.spearmanr(D[iu], T[iu])[0]}
    assert 0.2 < want["pearson"] < 0.9
    for scheme in ("species", "images"):
        for method, r in want.items():
            row = got.loc[(scheme, method)]
            assert row.statistic == pytest.approx(r, abs=1e-10), (scheme, method)
            assert row.n_items == S and row.n_pairs == S * (S - 1) // 2
    det = got.loc[("species", "pearson"), "details"]
    assert det["n_species"] == S and det["n_images"] == len(ds)
    assert det["mean_tree_distance"] == pytest.approx(T[iu].mean(), rel=1e-12)
    assert det["mean_centroid_distance"] == pytest.approx(D[iu].mean(), rel=1e-12)
    # the centroid tree itself: one item per unit, at its unit's node (units in the tree's leaf order)
    from treeprobe.tl import _centroid_inputs, _mantel_inputs

    X_m, clades, units, _, _ = _mantel_inputs(ds, None, list(W))
    np.testing.assert_array_equal(units, unit)
    Cc, sub = _centroid_inputs(X_m, clades, units)
    np.testing.assert_allclose(sub.item_distances(), T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(1.0 - Cc @ Cc.T, D, rtol=0, atol=1e-6)  # float32 unit rows in the tool


def test_centroid_permutations_are_size_strata_draws(centroid_case, monkeypatch):
    """Permutation k of the species scheme is the k-th size-stratified draw (sizes = images per
    unit) of default_rng(seed of the test): centroid s sits at the tree position of pi_k[s]; of
    the images scheme, the k-th rng.permutation(S): slot k holds centroid perm[k]. Every permuted r
    and both p-values equal the explicit computation."""
    ds, unit, lineages, D, T = centroid_case
    S = len(lineages)
    iu = np.triu_indices(S, 1)
    sizes = np.bincount(unit)
    assert len(np.unique(sizes)) >= 3 and (np.bincount(sizes)[sizes] == 1).any()  # strata, and a fixed unit
    B = 60
    calls = _spy(monkeypatch)
    table = tp.tl.mantel(ds, methods=("pearson",), levels=("species-centroid",), permute=("species", "images"),
                         rank_lengths=list(W), permutations=B, seed=11).set_index("scheme")
    s_species, s_images = np.random.default_rng(11).integers(2 ** 31, size=2)
    r_obs = scipy.stats.pearsonr(D[iu], T[iu])[0]

    rng = np.random.default_rng(int(s_species))
    strat = []
    for _ in range(B):
        pi = stratified_species_permutation(sizes, rng)
        assert (sizes[pi] == sizes).all()
        strat.append(scipy.stats.pearsonr(D[iu], T[np.ix_(pi, pi)][iu])[0])
    rng = np.random.default_rng(int(s_images))
    free = []
    for _ in range(B):
        p = rng.permutation(S)
        free.append(scipy.stats.pearsonr(D[np.ix_(p, p)][iu], T[iu])[0])
    strat, free = np.array(strat), np.array(free)
    np.testing.assert_allclose(calls[0], strat, rtol=0, atol=1e-10)
    np.testing.assert_allclose(calls[1], free, rtol=0, atol=1e-6)  # float32 permutation data
    assert np.ptp(strat) > 0.05 and not np.allclose(np.sort(strat), np.sort(free), atol=1e-3)
    for name, ref in (("species", strat), ("images", free)):
        gap = np.abs(ref - r_obs)
        assert ((gap < 1e-12) | (gap > 1e-5)).all()  # no near-tie: the count is well defined
        want = (1 + np.sum(ref >= r_obs - 1e-12)) / (B + 1)
        assert table.loc[name, "p_value"] == pytest.approx(want, abs=1e-15), name


def test_centroid_p_value_on_an_enumerable_case(monkeypatch):
    """Five species of 1, 1, 2, 2 and 3 images: strata {a, b}, {c, d}, {e}, so exactly 4 size-keeping
    permutations (the identity among them). Every permuted r is one of their 4 values, each drawn
    (~1/4 of 400 draws), and p counts the draws at or above the observed r, ties (the identity)
    included: (1 + #{r_k >= r}) / (B + 1)."""
    from itertools import permutations

    lineages = [["K", "P", "C", "O1", "F1", "G1", "a"], ["K", "P", "C", "O2", "F3", "G5", "b"],
                ["K", "P", "C", "O1", "F2", "G3", "c"], ["K", "P", "C", "O2", "F3", "G4", "d"],
                ["K", "P", "C", "O1", "F1", "G2", "e"]]  # no swap within a stratum leaves the tree as it is
    sizes = np.array([1, 1, 2, 2, 3])
    items = pd.DataFrame([lineages[s] for s in np.repeat(np.arange(5), sizes)], columns=list(RANKS))
    X = np.random.default_rng(2).normal(size=(len(items), 4)) + np.repeat(np.eye(5, 4) * 2, sizes, axis=0)
    ds = tp.TreeData(X.astype(np.float32), items)
    unit, lin = _units_by_lineage(ds.items)
    su = np.bincount(unit)
    C = _centroids(ds, unit)
    D, T = 1.0 - C @ C.T, _tree_distance(lin, np.ones(7))
    iu = np.triu_indices(5, 1)
    r_obs = scipy.stats.pearsonr(D[iu], T[iu])[0]
    valid = [np.array(p) for p in permutations(range(5)) if (su[list(p)] == su).all()]  # identity first
    assert len(valid) == 4
    values = np.array([scipy.stats.pearsonr(D[iu], T[np.ix_(pi, pi)][iu])[0] for pi in valid])
    assert values[0] == r_obs and np.min(np.abs(np.subtract.outer(values, values))[np.triu_indices(4, 1)]) > 1e-3
    B = 399
    calls = _spy(monkeypatch)
    row = tp.tl.mantel(ds, methods=("pearson",), levels=("species-centroid",), permutations=B, seed=3).iloc[0]
    perm = calls[0]
    which = np.argmin(np.abs(perm[:, None] - values[None, :]), axis=1)
    np.testing.assert_allclose(perm, values[which], rtol=0, atol=1e-12)  # only size-keeping permutations
    counts = np.bincount(which, minlength=4)
    assert counts.min() > 70  # all four drawn, about equally often
    assert row.statistic == pytest.approx(r_obs, abs=1e-12)
    assert row.p_value == (1 + int(counts[values >= r_obs].sum())) / (B + 1)
    assert counts[0] > 0 and row.details["n_permutable_species"] == 4 and row.details["n_strata"] == 3


# --- the seeds of the 2-D maps ----------------------------------------------------------------


def _small_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({r: "x" for r in RANKS}, index=range(n))
    items["genus"] = [f"G{i % 4}" for i in range(n)]
    items["species"] = [f"s{i % 12}" for i in range(n)]
    X = rng.normal(size=(4, 12))[np.arange(n) % 4] + 0.5 * rng.normal(size=(n, 12))
    return tp.TreeData(X.astype(np.float32), items)


def test_tsne_seed_changes_the_map_and_reproduces_it_bit_for_bit():
    """All rows (no subsample, so only the optimiser's seed can differ): the same seed gives the
    same bytes, another seed another map; tl.tsne hands its seed to tsne_2d unchanged."""
    X = _small_data().unit
    a, ia = tsne_2d(X, seed=3, perplexity=10, n_iter=60)
    b, _ = tsne_2d(X, seed=3, perplexity=10, n_iter=60)
    c, ic = tsne_2d(X, seed=4, perplexity=10, n_iter=60)
    np.testing.assert_array_equal(ia, ic)  # the same rows
    assert a.tobytes() == b.tobytes()
    assert np.abs(a - c).max() > 0.1
    ds = _small_data()
    full = tp.tl.tsne(ds, seed=5, max_points=None)
    ref, _ = tsne_2d(ds.unit, seed=5)
    assert full.tobytes() == ref.tobytes() and ds.uns["tsne"]["seed"] == 5 and not ds.uns["tsne"]["subsampled"]
    other = tp.tl.tsne(_small_data(), seed=6, max_points=None)
    assert np.abs(other - full).max() > 0.1


def test_tl_umap_hands_its_seed_to_umap(monkeypatch):
    """What tl.umap passes to umap-learn (a stub; the real run is in test_embedding_maps.py): the
    seed as random_state, for the subsample too, and the stub's output stored at the drawn rows."""
    import sys
    import types

    calls = []

    class FakeUMAP:
        def __init__(self, **kw):
            calls.append(kw)

        def fit_transform(self, X):
            return np.asarray(X[:, :2] * calls[-1]["random_state"], dtype=np.float64)

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    ds = _small_data()
    full = tp.tl.umap(ds, seed=7, max_points=40)
    assert calls[-1]["random_state"] == 7 and calls[-1]["metric"] == "cosine"
    idx = np.flatnonzero(np.isfinite(full).all(axis=1))
    np.testing.assert_array_equal(idx, np.sort(np.random.default_rng(7).choice(100, 40, replace=False)))
    np.testing.assert_allclose(full[idx], ds.unit[idx, :2] * 7, rtol=1e-6)
    assert ds.uns["umap"] == dict(subsampled=True, seed=7, n_points=40,
                                  title="n = 40 of 100 points (random subsample, seed 7)")
