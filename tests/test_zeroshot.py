"""Zero-shot classification per rank (treeprobe.zeroshot): hand-worked hierarchies, an independent
brute-force implementation, blocked = unblocked, known truth, the null, species bootstrap, bad inputs."""

import numpy as np
import pandas as pd
import pytest

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.mistakes import lca_depth
from treeprobe.simulate import simulate_world
from treeprobe.zeroshot import ClassHierarchy, species_bootstrap_ratio, zeroshot

R4 = ("kingdom", "family", "genus", "species")


def _gapped_frame():
    """A|F|g|{a,b}, A|F|h|c, A|?|k|d (family unknown), A|?|l|e (family unknown), B|G|m|f."""
    return pd.DataFrame({"kingdom": ["A", "A", "A", "A", "A", "B"],
                         "family": ["F", "F", "F", "unknown", None, "G"],
                         "genus": ["g", "g", "h", "k", "l", "m"],
                         "species": ["g a", "g b", "h c", "k d", "l e", "m f"]})


def _world(seed=0, **kw):
    kw.setdefault("branching", [2, 2, 1, 2, 2, 3])
    kw.setdefault("images_per_species", (2, 4))
    w = simulate_world(n_kingdoms=2, dim=16, seed=seed, **kw)
    h = ClassHierarchy.from_lineages(w.species_lineage)
    truth = h.species_index(w.items)
    return w, h, truth


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _random_text(h, D, rng):
    return {r: rng.standard_normal((h.n_taxa(r), D)).astype(np.float32) for r in h.ranks}


# --- the hierarchy, by hand ----------------------------------------------------------------------

def test_hierarchy_by_hand_with_unknown_ranks():
    h = ClassHierarchy.from_lineages(_gapped_frame(), ranks=R4)
    assert h.taxa["family"].tolist() == ["A|F", "B|G"]  # the two unknown families are no family
    assert h.taxa["genus"].tolist() == ["A|F|g", "A|F|h", "A||k", "A||l", "B|G|m"]  # k, l stay two genera
    assert h.parent["genus"].tolist() == [0, 0, -1, -1, 1]
    assert h.anchor_rank["genus"].tolist() == [1, 1, 0, 0, 1]  # k and l hang from the kingdom
    assert h.anchor["genus"].tolist() == [0, 0, 0, 0, 1]
    assert h.anchor_rank["kingdom"].tolist() == [-1, -1]
    assert h.species_ancestors.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2], [0, -1, 2, 3],
                                            [0, -1, 3, 4], [1, 1, 4, 5]]
    assert h.species_per_taxon("family").tolist() == [3, 1]
    # repeated rows are one species; rows are matched by cumulative label, not by species name alone
    items = pd.DataFrame({"kingdom": ["A", "B", "A"], "family": ["F", "G", "F"], "genus": ["g", "m", "g"],
                          "species": ["g b", "m f", "g zz"]})
    assert h.species_index(items).tolist() == [1, 5, -1]
    h2 = ClassHierarchy.from_lineages(pd.concat([_gapped_frame()] * 2), ranks=R4)
    assert h2.n_species == 6 and h2.species_ancestors.tolist() == h.species_ancestors.tolist()


def test_top_down_and_species_summed_by_hand():
    """One image: kingdom A and family F are chosen; genus k (unknown family, under A) competes with F's
    genera and wins; the species is then chosen among k's species only."""
    h = ClassHierarchy.from_lineages(_gapped_frame(), ranks=R4)
    D = 6
    x = np.array([[1.0, 0, 0, 0, 0, 0]], np.float32)
    e = np.eye(D, dtype=np.float32)
    text = {"kingdom": np.stack([e[0] + e[1], e[2]]), "family": np.stack([e[0] + e[3], e[2]]),
            "genus": np.stack([e[3], e[4], e[0] + e[5], e[5], e[2]]),
            "species": np.stack([e[1], e[0] + 0.1 * e[3], e[4], e[3], e[0] + 0.5 * e[5], e[2]])}
    res = zeroshot(x, text, h, truth=np.array([2]), k=2, n_boot=10)
    # top-down: kingdom A (0); family F (0); genus among {g, h, k, l}: k (2) wins (cos .71 vs 0);
    # species among k's species {d}: 3, although species b (1) and e (4) score higher overall
    assert res.predictions["top_down"][0].tolist() == [0, 0, 2, 3]
    # flat: the best of each rank on its own
    assert res.predictions["flat"][0].tolist() == [0, 0, 2, 1]
    # species-summed: softmax over species at scale 100 -> species b (cos .995) dominates
    assert res.predictions["species_summed"][0].tolist() == [0, 0, 0, 1]
    assert res.species_topk[0].tolist() == [1, 4]


def test_top_down_abstains_when_no_candidate_is_left():
    """Family chosen but every remaining species has unknown genus -> no genus candidate: −1, wrong."""
    df = pd.DataFrame({"kingdom": ["A", "A"], "family": ["F", "G"], "genus": ["g", None], "species": ["x", "y"]})
    h = ClassHierarchy.from_lineages(df, ranks=R4)
    e = np.eye(3, dtype=np.float32)
    text = {"kingdom": e[:1], "family": np.stack([e[0], e[1]]), "genus": e[2:3], "species": np.stack([e[0], e[1]])}
    res = zeroshot(e[1:2], text, h, truth=np.array([1]), modes=["top_down"], n_boot=10)
    assert res.predictions["top_down"][0].tolist() == [0, 1, -1, 1]
    tab = res.table.set_index("rank")
    assert tab.loc["genus", "n_items"] == 0 and np.isnan(tab.loc["genus", "top1"])  # truth unknown: left out
    assert tab.loc["species", "top1"] == 1.0


# --- an independent brute-force implementation -----------------------------------------------------

def _brute(X, text, h, truth, scale=100.0, k=5):
    """Full N x T matrices, python loops over images and taxa (float64)."""
    X = _unit(X.astype(np.float64))
    T = {r: _unit(t.astype(np.float64)) for r, t in text.items()}
    R, N = len(h.ranks), len(X)
    flat, td, ss = (np.zeros((N, R), int) for _ in range(3))
    flat5, ss5 = (np.zeros((N, R), bool) for _ in range(2))
    A = h.species_ancestors
    for i in range(N):
        remaining = list(range(h.n_species))
        logits_s = scale * (T["species"] @ X[i])
        p = np.exp(logits_s - logits_s.max())
        p /= p.sum()
        for j, r in enumerate(h.ranks):
            L = scale * (T[r] @ X[i])
            order = sorted(range(len(L)), key=lambda t: -L[t])
            flat[i, j] = order[0]
            flat5[i, j] = A[truth[i], j] in order[:k]
            cand = sorted({A[s, j] for s in remaining if A[s, j] >= 0})
            choice = max(cand, key=lambda t: L[t]) if cand else -1
            td[i, j] = choice
            if choice >= 0:
                remaining = [s for s in remaining if A[s, j] in (choice, -1)]
            mass = np.zeros(h.n_taxa(r))
            for s in range(h.n_species):
                if A[s, j] >= 0:
                    mass[A[s, j]] += p[s]
            o = sorted(range(len(mass)), key=lambda t: -mass[t])
            ss[i, j] = o[0]
            ss5[i, j] = A[truth[i], j] in o[:k]
    return flat, flat5, td, ss, ss5


@pytest.mark.parametrize("gapped", [False, True])
def test_matches_brute_force_on_random_data(gapped):
    rng = np.random.default_rng(3)
    w, h, truth = _world(seed=1)
    if gapped:  # knock out some family and genus names (never the species)
        lin = w.species_lineage.copy()
        lin.loc[rng.random(len(lin)) < 0.3, "family"] = "incertae sedis"
        lin.loc[rng.random(len(lin)) < 0.2, "class"] = None
        h = ClassHierarchy.from_lineages(lin)
        truth = h.species_index(lin.iloc[w.item_species])
    D = 12
    X = rng.standard_normal((len(truth), D)).astype(np.float32)
    text = _random_text(h, D, rng)
    flat, flat5, td, ss, ss5 = _brute(X, text, h, truth, scale=30.0)
    res = zeroshot(X, text, h, truth=truth, logit_scale=30.0, block_size=7, n_boot=50)
    np.testing.assert_array_equal(res.predictions["flat"], flat)
    np.testing.assert_array_equal(res.predictions["top_down"], td)
    np.testing.assert_array_equal(res.predictions["species_summed"], ss)
    tab = res.table.set_index(["mode", "rank"])
    A = h.species_ancestors[truth]
    for j, r in enumerate(h.ranks):
        known = A[:, j] >= 0
        assert tab.loc[("flat", r), "top1"] == pytest.approx((flat[known, j] == A[known, j]).mean())
        assert tab.loc[("flat", r), "topk"] == pytest.approx(flat5[known, j].mean())
        assert tab.loc[("top_down", r), "top1"] == pytest.approx((td[known, j] == A[known, j]).mean())
        assert tab.loc[("species_summed", r), "top1"] == pytest.approx((ss[known, j] == A[known, j]).mean())
        assert tab.loc[("species_summed", r), "topk"] == pytest.approx(ss5[known, j].mean())
        assert tab.loc[("flat", r), "n_items"] == known.sum()


def test_exact_ties_go_to_the_first_candidate():
    """Axis-aligned unit vectors at logit scale 1 give exactly tied logits (the same in float32 and float64):
    flat and top-down pick the first of the tied candidates and count top-k by strictly-higher scores,
    as the brute force does; blocks wider than a compiled chunk (128 images) included."""
    rng = np.random.default_rng(5)
    w, h, truth = _world(seed=3, images_per_species=(8, 12))
    D = 6  # unit vectors with one nonzero entry: every logit is exactly 0 or ±1
    X = np.eye(D, dtype=np.float32)[rng.integers(0, D, len(truth))] * rng.choice([-1, 1], (len(truth), 1))
    text = {r: np.eye(D, dtype=np.float32)[rng.integers(0, D, h.n_taxa(r))] for r in h.ranks}
    flat, _, td, _, _ = _brute(X, text, h, truth, scale=1.0)
    A = h.species_ancestors[truth]
    above = np.stack([((X @ text[r].T) > (X @ text[r].T)[np.arange(len(X)), A[:, j], None]).sum(axis=1)
                      for j, r in enumerate(h.ranks)], axis=1)  # candidates strictly above the truth
    assert len(truth) > 300 and (above < 5).mean() > (flat == A).mean() + 0.1  # ties matter here
    for block in (None, 300, 7):
        res = zeroshot(X, text, h, truth=truth, logit_scale=1.0, block_size=block, n_boot=5,
                       modes=("flat", "top_down"))
        np.testing.assert_array_equal(res.predictions["flat"], flat)
        np.testing.assert_array_equal(res.predictions["top_down"], td)
        tab = res.table.set_index(["mode", "rank"])
        for j, r in enumerate(h.ranks[:-1]):  # ties favour the truth in top-k (the species rank: its top-5 list)
            assert tab.loc[("flat", r), "topk"] == pytest.approx((above[:, j] < 5).mean())


def test_blocked_equals_unblocked_and_chance_columns():
    rng = np.random.default_rng(0)
    w, h, truth = _world(seed=2)
    X = rng.standard_normal((len(truth), 16)).astype(np.float32)
    text = _random_text(h, 16, rng)
    a = zeroshot(X, text, h, truth=truth, block_size=7, n_boot=100, seed=5)
    b = zeroshot(X, text, h, truth=truth, block_size=len(truth), n_boot=100, seed=5)
    c = zeroshot(X.astype(np.float64), text, h, truth=truth, n_boot=100, seed=5)  # default block size
    for m in a.predictions:
        np.testing.assert_array_equal(a.predictions[m], b.predictions[m])
        np.testing.assert_array_equal(a.predictions[m], c.predictions[m])
    np.testing.assert_array_equal(a.species_topk, b.species_topk)
    pd.testing.assert_frame_equal(a.table, b.table)
    tab = a.table.set_index(["mode", "rank"])
    for r in h.ranks:
        T = h.n_taxa(r)
        codes = h.species_ancestors[truth, h.ranks.index(r)]
        assert tab.loc[("flat", r), "chance_top1"] == 1 / T
        assert tab.loc[("flat", r), "chance_topk"] == min(5, T) / T
        assert tab.loc[("flat", r), "majority"] == pytest.approx(np.bincount(codes).max() / len(codes))
        assert np.isnan(tab.loc[("top_down", r), "topk"])
    assert a.species_topk.shape == (len(truth), 5)


# --- known truth ---------------------------------------------------------------------------------

def _centroid_data(h, rng, *, D=64, per_species=3, noise=0.05, text_noise=0.05):
    """Species centroids = sum of random directions per rank (nested); images near their species
    centroid; the text of a taxon = the mean centroid of its species plus noise."""
    A = h.species_ancestors
    dirs = {r: rng.standard_normal((h.n_taxa(r), D)) for r in h.ranks}
    cent = sum(dirs[r][A[:, j]] for j, r in enumerate(h.ranks))
    truth = np.repeat(np.arange(h.n_species), per_species)
    X = cent[truth] + noise * np.sqrt(len(h.ranks)) * rng.standard_normal((len(truth), D))
    text = {}
    for j, r in enumerate(h.ranks):
        m = np.zeros((h.n_taxa(r), D))
        np.add.at(m, A[:, j], cent)
        m /= h.species_per_taxon(r)[:, None]
        text[r] = (m + text_noise * np.sqrt(len(h.ranks)) * rng.standard_normal(m.shape)).astype(np.float32)
    return X.astype(np.float32), text, truth


def test_noisy_copies_of_true_centroids_give_near_perfect_accuracy():
    rng = np.random.default_rng(7)
    _, h, _ = _world(seed=3)
    X, text, truth = _centroid_data(h, rng)
    res = zeroshot(X, text, h, truth=truth, n_boot=100)
    assert (res.table["top1"] >= 0.97).all(), res.table[["rank", "mode", "top1"]]
    assert (res.table.loc[res.table["mode"] != "top_down", "topk"] >= 0.99).all()
    assert (res.table["top1_lo"] <= res.table["top1"]).all() and (res.table["top1"] <= res.table["top1_hi"]).all()


def test_text_shuffled_within_genus_is_right_at_genus_wrong_at_species():
    rng = np.random.default_rng(8)
    _, h, _ = _world(seed=4, branching=[2, 2, 1, 2, 2, (2, 3)])  # every genus has >= 2 species
    X, text, truth = _centroid_data(h, rng)
    g = h.species_ancestors[:, -2]
    perm = np.arange(h.n_species)
    for genus in np.unique(g):  # a cyclic shift inside each genus: every species gets a sibling's text
        members = np.flatnonzero(g == genus)
        perm[members] = np.roll(members, 1)
    text["species"] = text["species"][perm]
    res = zeroshot(X, text, h, truth=truth, modes=["flat", "top_down"], n_boot=100)
    tab = res.table.set_index(["mode", "rank"])
    for m in ("flat", "top_down"):
        assert tab.loc[(m, "genus"), "top1"] >= 0.97
        assert tab.loc[(m, "species"), "top1"] <= 0.05
    # the mistakes are siblings: LCA at genus (depth 6 of 7)
    depth = lca_depth(truth, res.predictions["flat"][:, -1], h)
    assert np.mean(depth == len(RANKS) - 1) >= 0.95


def test_a_wrong_kingdom_makes_every_lower_rank_wrong_top_down():
    rng = np.random.default_rng(9)
    _, h, _ = _world(seed=5)
    X, text, truth = _centroid_data(h, rng)
    text["kingdom"] = text["kingdom"][::-1].copy()  # two kingdoms, swapped
    res = zeroshot(X, text, h, truth=truth, n_boot=50)
    td = res.predictions["top_down"]
    A = h.species_ancestors[truth]
    assert (td[:, 0] != A[:, 0]).all()
    assert (td != A).all()  # no rank right below a wrong kingdom
    # every top-down path is a path of the hierarchy: each choice is a child of the one above
    for j, r in enumerate(h.ranks[1:], start=1):
        np.testing.assert_array_equal(h.parent[r][td[:, j]], td[:, j - 1])
    # flat is not so constrained: its lower ranks stay right
    assert res.table.set_index(["mode", "rank"]).loc[("flat", "species"), "top1"] >= 0.97


# --- the null, and the species bootstrap -----------------------------------------------------------

def _null_class_rows(n_worlds: int, *, seed0: int, n_boot: int) -> list:
    """The class-rank row of flat zero-shot in ``n_worlds`` null worlds (random images and text)."""
    rows = []
    for seed in range(n_worlds):
        rng = np.random.default_rng(seed0 + seed)
        w, h, truth = _world(seed=seed, images_per_species=(3, 6))
        X = rng.standard_normal((len(truth), 16)).astype(np.float32)
        tab = zeroshot(X, _random_text(h, 16, rng), h, truth=truth, modes=["flat"], n_boot=n_boot, seed=seed).table
        rows.append(tab.set_index("rank").loc["class"])
    return rows


def test_null_accuracy_is_chance_and_intervals_cover_it():
    """Random images and text: each prediction is uniform over the candidates, so the mean accuracy over
    worlds is 1/T_r; the 95 % species-bootstrap interval covers 1/T_r in most worlds."""
    rows = _null_class_rows(12, seed0=100, n_boot=300)
    accs = [row["top1"] * row["n_taxa"] for row in rows]  # accuracy / chance: 1 on average
    cover = [row["top1_lo"] <= row["chance_top1"] <= row["top1_hi"] for row in rows]
    assert abs(np.mean(accs) - 1) < 0.25
    assert np.mean(cover) >= 0.75


@pytest.mark.slow
def test_null_interval_coverage_over_many_worlds():
    """200 null worlds: the 95 % species-bootstrap interval of class accuracy covers chance (1/T) in
    90-99 % of them (false-positive rate of 'better than chance' about 2.5 %)."""
    rows = _null_class_rows(200, seed0=1000, n_boot=500)
    cover = [row["top1_lo"] <= row["chance_top1"] <= row["top1_hi"] for row in rows]
    above = [row["top1_lo"] > row["chance_top1"] for row in rows]
    assert 0.90 <= np.mean(cover) <= 0.99
    assert np.mean(above) <= 0.06


def test_species_bootstrap_matches_a_loop_and_resamples_species():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), rng.integers(1, 6, size=12))
    num = rng.random(len(groups))
    den = np.ones(len(groups))
    lo, hi = species_bootstrap_ratio(groups, num, den, n_boot=200, seed=4)
    draws = np.random.default_rng(4).integers(0, 12, size=(200, 12))
    ratios = []
    for b in range(200):
        idx = np.concatenate([np.flatnonzero(groups == g) for g in draws[b]])
        ratios.append(num[idx].sum() / den[idx].sum())
    assert lo == pytest.approx(np.quantile(ratios, 0.025)) and hi == pytest.approx(np.quantile(ratios, 0.975))
    # 20 species, each all right or all wrong (50 images): species-level width ~ 4 * sqrt(.25 / 20) = 0.45,
    # where resampling images would give ~0.06
    g = np.repeat(np.arange(20), 50)
    y = (g % 2 == 0).astype(float)
    lo, hi = species_bootstrap_ratio(g, y, np.ones_like(y), n_boot=500, seed=0)
    assert hi - lo > 0.3 and lo < 0.5 < hi


# --- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs():
    rng = np.random.default_rng(0)
    w, h, truth = _world(seed=0)
    X = rng.standard_normal((len(truth), 16)).astype(np.float32)
    text = _random_text(h, 16, rng)
    with pytest.raises(TreeprobeError, match="dimension"):
        zeroshot(X[:, :8], text, h, truth=truth)
    bad = dict(text, genus=text["genus"][:-1])
    with pytest.raises(TreeprobeError, match="genus taxa"):
        zeroshot(X, bad, h, truth=truth)
    with pytest.raises(TreeprobeError, match="empty candidate set"):
        zeroshot(X, dict(text, genus=np.zeros((0, 16))), h, truth=truth)
    with pytest.raises(TreeprobeError, match="empty"):
        ClassHierarchy.from_lineages(w.species_lineage.iloc[:0])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(TreeprobeError, match="NaN"):
        zeroshot(Xn, text, h, truth=truth)
    tn = dict(text, family=text["family"].copy())
    tn["family"][0, 0] = np.nan
    with pytest.raises(TreeprobeError, match="NaN"):
        zeroshot(X, tn, h, truth=truth)
    with pytest.raises(TreeprobeError, match="outside"):
        zeroshot(X, text, h, truth=np.where(np.arange(len(truth)) == 0, -1, truth))
    with pytest.raises(TreeprobeError, match="missing for rank"):
        zeroshot(X, {"species": text["species"]}, h, truth=truth, modes=["top_down"])
    with pytest.raises(TreeprobeError, match="mode"):
        zeroshot(X, text, h, truth=truth, modes=["beam"])
    with pytest.raises(TreeprobeError, match="zeros"):
        zeroshot(np.zeros_like(X), text, h, truth=truth)
    with pytest.raises(TreeprobeError, match="logit_scale"):
        zeroshot(X, text, h, truth=truth, logit_scale=0)
    with pytest.raises(TreeprobeError, match="no species"):
        ClassHierarchy.from_lineages(_gapped_frame().assign(species=["x", None, "y", "z", "u", "v"]), ranks=R4)
    # species only: flat and species-summed still work, top-down is refused (above)
    res = zeroshot(X, {"species": text["species"]}, h, truth=truth, modes=["flat", "species_summed"], n_boot=10)
    assert set(res.table["rank"][res.table["mode"] == "flat"]) == {"species"}


def test_topk_kernels_match_a_full_sort():
    """The compiled top-k (column chunks of 32 images, a vectorised test before any insertion) against a
    stable full sort: best first, exact ties in column order (integer-valued scores tie often), k = T,
    partial chunks; the scores are not modified."""
    from treeprobe.zeroshot import _topk

    rng = np.random.default_rng(11)
    for T in (1, 7, 300, 1024, 3001):
        for b in (1, 40, 301):
            for L in (rng.standard_normal((b, T)).astype(np.float32),
                      rng.integers(0, 4, (b, T)).astype(np.float32)):
                before = L.copy()
                for k in (1, 5, 12):
                    np.testing.assert_array_equal(_topk(L, k), np.argsort(-L, axis=1, kind="stable")[:, :min(k, T)])
                np.testing.assert_array_equal(L, before)
