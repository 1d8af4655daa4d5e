"""treeprobe.drilldown: nested drill-down subsets, same-seed t-SNE per model, exact distance profiles."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from treeprobe._utils import RANKS
from treeprobe.drilldown import ROOT, _LevelSums, distance_profile, drilldown_subsets, drilldown_tsne
from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import Taxonomy


def _frame(rows):
    """Items table from 'k p c o f g s' strings ('-' = unknown)."""
    return pd.DataFrame([r.split() for r in rows], columns=list(RANKS)).replace("-", "")


# Kingdom K1 (6 items) beats K2 (5): within K1 phylum P1 (3) and P2 (3) tie -> P1 (label first);
# P3 under K2 is larger than both but outside the largest kingdom.
HAND = _frame([
    "K1 P1 C1 O1 F1 G1 s1",
    "K1 P1 C1 O1 F1 G1 s2",
    "K1 P1 C2 O2 F2 G2 s3",
    "K1 P2 C3 O3 F3 G3 s4",
    "K1 P2 C3 O3 F3 G3 s4",
    "K1 P2 C3 O3 F3 G3 s5",
    "K2 P3 C4 O4 F4 G4 s6",
    "K2 P3 C4 O4 F4 G4 s6",
    "K2 P3 C4 O4 F4 G4 s6",
    "K2 P3 C4 O4 F4 G4 s7",
    "K1 - - - - - -",     # unknown below kingdom: counted in K1 (6 items), in no taxon below
])


def test_drilldown_subsets_chain_ties_and_unknowns():
    tax = Taxonomy.from_frame(HAND, unknown="separate")
    subs = drilldown_subsets(tax.codes_by_rank())
    got = {s.rank: (s.parent_rank, tax.taxon_labels(s.parent_rank)[s.parent_code], s.rows.tolist()) for s in subs}
    assert [s.rank for s in subs] == list(RANKS[1:])
    assert got["phylum"] == ("kingdom", "K1", [0, 1, 2, 3, 4, 5, 10])  # largest kingdom, its unknown too
    assert got["class"] == ("phylum", "K1|P1", [0, 1, 2])            # tie P1/P2 -> smaller code (label)
    assert got["order"] == ("class", "K1|P1|C1", [0, 1])               # chained: within P1, not P3's C4
    assert got["species"] == ("genus", "K1|P1|C1|O1|F1|G1", [0, 1])
    # three unknown phyla would outnumber P1 if unknowns formed a taxon: they do not
    codes = {"kingdom": np.zeros(6, int), "phylum": np.array([-1, -1, -1, 0, 0, 1]), "class": np.arange(6)}
    sub = drilldown_subsets(codes, ["class"])[0]
    assert (sub.parent_code, sub.rows.tolist()) == (0, [3, 4])
    # ties go to the smaller code whatever the row order
    codes = {"kingdom": np.zeros(4, int), "phylum": np.array([5, 2, 5, 2])}
    assert drilldown_subsets(codes, ["phylum"])[0].parent_code == 0
    codes = {"kingdom": np.array([1, 0, 1, 0]), "phylum": np.arange(4)}
    assert drilldown_subsets(codes, ["phylum"])[0].rows.tolist() == [1, 3]
    # a column skipping ranks is still chained through them
    sub = drilldown_subsets(tax, ["order"])[0]
    assert sub.rows.tolist() == [0, 1] and sub.parent_rank == "class"
    with pytest.raises(TreeprobeError):
        drilldown_subsets(tax, ["kingdom"])
    with pytest.warns(UserWarning, match="left out"):
        out = drilldown_subsets({"kingdom": np.zeros(3, int), "phylum": np.full(3, -1), "class": np.arange(3)},
                                ["phylum", "class"])
    assert [s.rank for s in out] == ["phylum"]


def _tree_items(rng, n, unknown_frac=0.15, n_lineages=40):
    """``n`` items drawn from ``n_lineages`` random lineages of a binary tree of names, each with
    unknown ranks (``unknown_frac``): many items share a lineage, also across unknown gaps (same
    genus, unknown family), so every LCA rank occurs."""
    lineages = []
    for _ in range(n_lineages):
        parts = [f"K{rng.integers(2)}"] + [f"{r[0]}{rng.integers(2)}" for r in RANKS[1:]]
        lineages.append(["" if j and rng.random() < unknown_frac else p for j, p in enumerate(parts)])
    return pd.DataFrame([lineages[i] for i in rng.integers(0, n_lineages, size=n)], columns=list(RANKS))


def _pairwise_profile(X, codes):
    """Explicit O(N²) reference: every pair, its deepest shared known rank, mean cosine distance."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = 1.0 - U @ U.T
    iu = np.triu_indices(len(X), 1)
    lca = np.full(iu[0].size, -1)
    for k, r in enumerate(RANKS):
        c = codes[r]
        lca[(c[iu[0]] == c[iu[1]]) & (c[iu[0]] >= 0)] = k
    d = D[iu]
    out = {}
    for k, r in enumerate(RANKS):
        m = lca == k
        out[r] = (int(m.sum()), d[m].mean() if m.any() else np.nan)
    m = lca == -1
    out[ROOT] = (int(m.sum()), d[m].mean())
    return out


def test_distance_profile_matches_explicit_pairs():
    rng = np.random.default_rng(1)
    items = _tree_items(rng, 160)
    tax = Taxonomy.from_frame(items, unknown="separate")
    codes = tax.codes_by_rank()
    assert all((codes[r] == -1).any() for r in RANKS[1:])  # unknowns at every rank below kingdom
    gap = (codes["family"] == -1) & (codes["genus"] >= 0)
    assert np.bincount(codes["genus"][gap]).max() > 1     # a genus shared by items of unknown family
    X = rng.normal(size=(160, 12))
    prof = distance_profile(X * rng.uniform(0.5, 3, size=(160, 1)), tax, bootstrap=0)  # scale-free
    ref = _pairwise_profile(X, codes)
    assert prof["lca_rank"].tolist() == [*RANKS[::-1], ROOT]
    assert prof["tree_distance"].tolist() == list(range(8))
    assert prof["n_pairs"].sum() == 160 * 159 // 2
    for row in prof.itertuples():
        n, mean = ref[row.lca_rank]
        assert row.n_pairs == n, row.lca_rank
        assert n > 0 and abs(row.mean_distance - mean) < 1e-10, row.lca_rank
    assert prof[["ci_low", "ci_high"]].isna().all().all()
    with pytest.raises(TreeprobeError, match="nested"):
        distance_profile(X, {"kingdom": np.zeros(160, int), "species": np.arange(160) % 3,
                             "genus": np.arange(160) % 5}, bootstrap=0)


def test_bootstrap_sums_are_multiplicity_weighted_pair_sums():
    """The resample sums equal explicit sums over item pairs weighted m_s m_t (items of units s != t)
    or m_s (two items of unit s), on both code paths (group products and unit-pair dot products)."""
    rng = np.random.default_rng(2)
    unit_of = np.sort(rng.integers(0, 12, size=40))
    unit_of = np.unique(unit_of, return_inverse=True)[1]
    S = unit_of.max() + 1
    U = rng.normal(size=(40, 5))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    V = np.stack([U[unit_of == s].sum(0) for s in range(S)])
    n_unit = np.bincount(unit_of).astype(float)
    lev0 = (np.arange(S) >= S // 2).astype(int)                # 2 groups of units
    lev1 = np.arange(S) // 2                                   # pairs of units (nested in lev0 when S even-split)
    lev1 = np.unique(np.stack([lev0, lev1]), axis=1, return_inverse=True)[1]
    level_id = [lev0, lev1, np.arange(S)]
    M = rng.integers(0, 3, size=(3, S)).astype(float)
    w = M[:, unit_of]                                          # (b, N) item weights
    iu = np.triu_indices(40, 1)
    dots = (U @ U.T)[iu]
    same = [lid[unit_of][iu[0]] == lid[unit_of][iu[1]] for lid in level_id] + [np.ones(iu[0].size, bool)]
    for budget in (0, 10**9):
        Q, C = _LevelSums(V, n_unit, level_id, pair_budget=budget)(M)
        for b in range(3):
            ww = np.where(unit_of[iu[0]] == unit_of[iu[1]], w[b][iu[0]], w[b][iu[0]] * w[b][iu[1]])
            for k, m in enumerate(same):
                assert abs(Q[b, k] - (ww * dots)[m].sum()) < 1e-9
                assert abs(C[b, k] - ww[m].sum()) < 1e-9


def test_bootstrap_interval_covers_population_value():
    """Species sampled from a large fixed population: the 95 % species-bootstrap interval of a
    sample covers the population's mean distance (per LCA rank) in most of 40 samples; for
    same-species pairs (a mean over clusters) its half-width matches 1.96 standard deviations of the
    estimate over the samples. For pairs across species (a U-statistic over species) the species
    bootstrap is known to be conservative when the pair-level noise dominates (here ~1.3x wide)."""
    rng = np.random.default_rng(3)
    n_gen, per_gen = 20, 100                    # 2,000 population species in 20 genera, 3 items each
    centres = rng.normal(size=(n_gen, 8))
    sp_centre = np.repeat(centres, per_gen, axis=0) + 0.8 * rng.normal(size=(n_gen * per_gen, 8))
    n_sp = len(sp_centre)
    item_sp = np.repeat(np.arange(n_sp), 3)
    X = sp_centre[item_sp] + 0.5 * rng.normal(size=(len(item_sp), 8))
    codes = {"kingdom": np.zeros(len(item_sp), int), "genus": item_sp // per_gen, "species": item_sp}
    pop = distance_profile(X, codes, bootstrap=0).set_index("lca_rank")["mean_distance"]
    est, half, hits = [], [], 0
    for t in range(40):
        chosen = rng.choice(n_sp, size=80, replace=False)
        rows = np.flatnonzero(np.isin(item_sp, chosen))
        prof = distance_profile(X[rows], {r: c[rows] for r, c in codes.items()}, bootstrap=200, seed=t)
        prof = prof.set_index("lca_rank").loc[["species", "genus", "kingdom"]]
        assert ((prof.ci_low <= prof.mean_distance) & (prof.mean_distance <= prof.ci_high)).all()
        hits += int(((prof.ci_low <= pop[prof.index]) & (pop[prof.index] <= prof.ci_high)).sum())
        est.append(prof.mean_distance.to_numpy())
        half.append(((prof.ci_high - prof.ci_low) / 2).to_numpy())
    assert hits >= 0.88 * 120, hits
    ratio = np.mean(half, axis=0) / (1.96 * np.std(est, axis=0, ddof=1))
    assert 0.8 < ratio[0] < 1.25 and np.all((ratio[1:] > 0.8) & (ratio[1:] < 1.8)), ratio


def test_distance_profile_real_bioclip2_slice():
    import treeprobe as tp

    ds = tp.datasets.bioclip2_1k()[:300]
    prof = distance_profile(ds.X, ds, bootstrap=20)
    ref = _pairwise_profile(ds.X.astype(np.float64), ds.taxonomy.codes_by_rank())
    for row in prof.itertuples():
        n, mean = ref[row.lca_rank]
        assert row.n_pairs == n
        assert (n == 0 and np.isnan(row.mean_distance)) or abs(row.mean_distance - mean) < 1e-10
    known = prof.dropna(subset=["mean_distance"])
    # BioCLIP 2 puts items of one species closer than items of different kingdoms
    assert known.mean_distance.iloc[0] < known.mean_distance.iloc[-1]


def test_drilldown_tsne_same_seed_same_rows():
    rng = np.random.default_rng(4)
    items = _tree_items(rng, 120, unknown_frac=0.05)
    tax = Taxonomy.from_frame(items, unknown="separate")
    X = rng.normal(size=(120, 16)).astype(np.float32)
    Y = rng.normal(size=(120, 16)).astype(np.float32)
    ranks = ("phylum", "order")  # order: chained through class, which is not mapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lowered perplexity is recorded, not warned about per model
        tab = drilldown_tsne({"a": X, "a_copy": X.copy(), "b": Y}, tax, seed=7, perplexity=30, ranks=ranks,
                             n_iter=30, max_points=40)
    subs = {s.rank: s for s in drilldown_subsets(tax, ranks)}
    assert list(tab.columns) == ["model", "column_rank", "parent_rank", "parent_label", "row", "x", "y",
                                 "label", "perplexity"]
    for (model, rank), g in tab.groupby(["model", "column_rank"]):
        assert set(g.row) <= set(subs[rank].rows) and len(g) == min(40, subs[rank].rows.size)
        assert (g.label.to_numpy() == tax.labels(rank)[g.row.to_numpy()]).all()
        assert g.parent_label.iloc[0] == tax.taxon_labels(subs[rank].parent_rank)[subs[rank].parent_code]
        n = len(g)
        assert g.perplexity.iloc[0] == (30 if 30 < n / 3 else max((n - 1) / 3, 1))
    a, c, b = (tab[tab.model == m].reset_index(drop=True) for m in ("a", "a_copy", "b"))
    assert a.row.tolist() == b.row.tolist()                      # same rows for every model
    np.testing.assert_array_equal(a[["x", "y"]].to_numpy(), c[["x", "y"]].to_numpy())
    assert not np.allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    json.dumps(tab.to_dict(orient="records"))                    # JSON-ready as is
    with pytest.raises(TreeprobeError):
        drilldown_tsne({"a": X[:10]}, tax)
