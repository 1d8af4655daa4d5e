"""Mistake severity (treeprobe.mistakes): LCA depths and heights by hand, a brute-force label-prefix
implementation, the analytic chance against exact enumeration and simulation, known truth, bad inputs."""

import numpy as np
import pandas as pd
import pytest

import treeprobe as tp
from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.mistakes import (chance_levels, depth_histogram, first_error_depth, hdist_at_k, lca_depth,
                                lca_heights, mistake_severity, mistake_summary, nlca, severity_interval)
from treeprobe.simulate import simulate_world
from treeprobe.zeroshot import ClassHierarchy, zeroshot

R4 = ("kingdom", "family", "genus", "species")


def _hand():
    """0 A|F|g|a  1 A|F|g|b  2 A|F|h|c  3 A|?|k|d  4 A|?|l|e  5 A|?|k|d2  6 B|G|m|f  (? = unknown family)."""
    df = pd.DataFrame({"kingdom": ["A"] * 6 + ["B"], "family": ["F", "F", "F", "?", "?", "?", "G"],
                       "genus": ["g", "g", "h", "k", "l", "k", "m"],
                       "species": ["g a", "g b", "h c", "k d", "l e", "k d2", "m f"]})
    h = ClassHierarchy.from_lineages(df, ranks=R4)
    assert h.taxa["species"].tolist() == ["A|F|g|g a", "A|F|g|g b", "A|F|h|h c", "A||k|k d", "A||k|k d2",
                                          "A||l|l e", "B|G|m|m f"]
    return h


# species codes of _hand() (sorted cumulative labels)
GA, GB, HC, KD, KD2, LE, MF = range(7)


def _world_hierarchy(seed=0, gaps=0.0):
    w = simulate_world(n_kingdoms=3, branching=[2, 2, (1, 2), 2, (1, 3), (1, 3)], images_per_species=1, seed=seed)
    lin = w.species_lineage.copy()
    rng = np.random.default_rng(seed)
    for r in ("phylum", "class", "order", "family", "genus"):
        lin.loc[rng.random(len(lin)) < gaps, r] = None
    return ClassHierarchy.from_lineages(lin), lin


# --- by hand -------------------------------------------------------------------------------------

def test_lca_depths_heights_and_severity_by_hand():
    h = _hand()
    truth = np.array([GA, GA, GA, GA, GA, KD, KD, KD])
    pred = np.array([GA, GB, HC, KD, MF, KD2, LE, KD])
    d = lca_depth(truth, pred, h)
    # same species 4; same genus 3; same family 2; kingdom only (family unknown) 1; other kingdom 0;
    # d vs d2: same genus k (family unknown for both: not a shared family, but the genus is shared) 3;
    # d vs e: genera k and l, both of unknown family: only the kingdom is shared -> 1
    assert d.tolist() == [4, 3, 2, 1, 0, 3, 1, 4]
    heights = lca_heights(R4, [1.0, 2.0, 3.0, 4.0])
    assert heights.tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]
    assert mistake_severity(d, heights) == pytest.approx((4 + 7 + 9 + 10 + 4 + 9) / 6)
    assert nlca(truth, pred, h, rank_lengths=[1.0, 2.0, 3.0, 4.0]) == pytest.approx((0 + 4 + 7 + 9 + 10 + 4 + 9 + 0)
                                                                                     / 8 / 10)
    assert depth_histogram(d, 4).tolist() == [1, 2, 1, 2, 2]
    assert np.isnan(mistake_severity([4, 4], heights))


def test_hdist_at_k_by_hand_from_ranks_and_from_scores():
    h = _hand()
    truth = np.array([GA, MF])
    ranked = np.array([[GB, HC, MF], [MF, GA, KD]])
    # unit lengths: heights by depth [4, 3, 2, 1, 0]; image 0: 1, 2, 4; image 1: 0, 4, 4
    assert hdist_at_k(truth, ranked, h, k=1) == pytest.approx((1 + 0) / 2)
    assert hdist_at_k(truth, ranked, h, k=2) == pytest.approx((1 + 2 + 0 + 4) / 4)
    assert hdist_at_k(truth, ranked, h, k=3) == pytest.approx((1 + 2 + 4 + 0 + 4 + 4) / 6)
    scores = np.zeros((2, 7))
    scores[0, [GB, HC, MF]] = [3.0, 2.0, 1.0]
    scores[1, [MF, GA, KD]] = [5.0, 4.0, 3.0]
    scores[1, [KD2, LE]] = [-1.0, -2.0]
    scores[0, [KD, KD2, LE, GA]] = [-1.0, -2.0, -3.0, -4.0]
    scores[1, [GB, HC]] = [-3.0, -4.0]
    for k in (1, 2, 3):
        assert hdist_at_k(truth, scores, h, k=k) == pytest.approx(hdist_at_k(truth, ranked, h, k=k))


def test_first_error_depth_by_hand_and_equal_to_lca_depth():
    t = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, -1, 2, 3], [0, -1, 2, 3], [0, 1, 2, 3]])
    p = np.array([[0, 1, 2, 3], [0, 1, 9, 9], [0, 7, 9, 3], [0, 7, 2, 9], [1, 1, 2, 3]])
    assert first_error_depth(t, p).tolist() == [4, 2, 1, 3, 0]
    h, _ = _world_hierarchy(seed=1, gaps=0.3)
    rng = np.random.default_rng(0)
    truth = rng.integers(0, h.n_species, 300)
    pred = rng.integers(0, h.n_species, 300)
    A = h.species_ancestors
    np.testing.assert_array_equal(first_error_depth(A[truth], A[pred]), lca_depth(truth, pred, h))


# --- an independent computation: LCA from the cumulative label strings -------------------------------

def _lca_brute(h, s, p):
    """Depth from the lineage names: 1 + the deepest rank where both names are known and the
    cumulative labels (names of all ranks down to it) are equal."""
    ls = h.taxa[h.ranks[-1]][s].split("|")
    lp = h.taxa[h.ranks[-1]][p].split("|")
    depth = 0
    for j in range(len(h.ranks)):
        if ls[j] != "" and ls[: j + 1] == lp[: j + 1]:
            depth = j + 1
    return depth


def test_lca_depth_and_hdist_match_a_brute_force_on_random_hierarchies():
    rng = np.random.default_rng(2)
    for gaps in (0.0, 0.35):
        h, _ = _world_hierarchy(seed=3, gaps=gaps)
        S = h.n_species
        truth = rng.integers(0, S, 60)
        scores = rng.standard_normal((60, S))
        ranked = np.argsort(-scores, axis=1)  # full sort, no partition
        depth = np.array([[_lca_brute(h, truth[i], ranked[i, c]) for c in range(5)] for i in range(60)])
        np.testing.assert_array_equal(lca_depth(truth, ranked[:, :5], h), depth)
        w = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
        heights = [sum(w[d:]) for d in range(8)]
        expect = np.mean([[heights[depth[i, c]] for c in range(5)] for i in range(60)])
        assert hdist_at_k(truth, scores, h, k=5, rank_lengths=w) == pytest.approx(expect)
        assert hdist_at_k(truth, ranked, h, k=5, rank_lengths=w) == pytest.approx(expect)


# --- chance: analytic vs exact enumeration vs simulation -----------------------------------------------

def _chance_enumerated(h, truth, heights):
    """Average over every candidate species as the prediction (the exact uniform expectation)."""
    S, R = h.n_species, len(h.ranks)
    probs = np.zeros(R + 1)
    mh, sev = 0.0, 0.0
    for s in truth:
        d = lca_depth(np.full(S, s), np.arange(S), h)
        probs += np.bincount(d, minlength=R + 1) / S
        mh += heights[d].mean()
        sev += heights[d[d < R]].mean()
    n = len(truth)
    return probs / n, mh / n, sev / n


@pytest.mark.parametrize("gaps", [0.0, 0.3])
def test_analytic_chance_equals_enumeration(gaps):
    h, _ = _world_hierarchy(seed=4, gaps=gaps)
    truth = np.random.default_rng(1).integers(0, h.n_species, 40)
    w = [1.0, 1.0, 2.0, 1.0, 0.5, 1.0, 3.0]
    c = chance_levels(truth, h, rank_lengths=w)
    probs, mh, sev = _chance_enumerated(h, truth, lca_heights(RANKS, w))
    np.testing.assert_allclose(c["depth_probs"], probs, rtol=1e-12, atol=1e-15)
    assert c["mean_height"] == pytest.approx(mh, rel=1e-12)
    assert c["severity"] == pytest.approx(sev, rel=1e-12)
    assert c["nlca"] == pytest.approx(mh / sum(w), rel=1e-12)
    assert c["accuracy"] == 1 / h.n_species


def test_analytic_chance_matches_simulated_uniform_guessing_on_real_lineages():
    """BioCLIP-2 1k lineages (real gaps): uniform random predictions, 200 per image."""
    ds = tp.datasets.bioclip2_1k()
    items = ds.items[ds.taxonomy.known("species")]
    h = ClassHierarchy.from_lineages(items)
    truth = h.species_index(items)
    assert (truth >= 0).all() and (h.species_ancestors < 0).any()  # the lineages have gaps
    rng = np.random.default_rng(0)
    reps = 200
    t = np.repeat(truth, reps)
    p = rng.integers(0, h.n_species, len(t))
    d = lca_depth(t, p, h)
    heights = lca_heights(RANKS)
    c = chance_levels(truth, h)
    freq = np.bincount(d, minlength=8) / len(d)
    se = np.sqrt(c["depth_probs"] * (1 - c["depth_probs"]) / len(d))
    assert (np.abs(freq - c["depth_probs"]) <= 4 * se + 1e-9).all()
    sd = heights[d].std()
    assert heights[d].mean() == pytest.approx(c["mean_height"], abs=4 * sd / np.sqrt(len(d)))
    assert mistake_severity(d, heights) == pytest.approx(c["severity"], abs=4 * sd / np.sqrt(len(d)))
    # hdist@5 of five distinct uniform draws per image has the same expectation
    top = np.stack([rng.permutation(h.n_species)[:5] for _ in range(len(truth))])
    assert hdist_at_k(truth, top, h) == pytest.approx(c["mean_height"], abs=4 * sd / np.sqrt(5 * len(truth)))


# --- known truth ---------------------------------------------------------------------------------

def test_sibling_mistakes_have_severity_of_one_species_edge():
    """Predictions shifted to a sibling species of the same genus: every mistake at depth 6 and of height
    w_species; chance is far worse."""
    h, _ = _world_hierarchy(seed=5)
    g = h.species_ancestors[:, -2]
    pred = np.arange(h.n_species)
    for genus in np.unique(g):
        members = np.flatnonzero(g == genus)
        pred[members] = np.roll(members, 1)
    truth = np.arange(h.n_species)
    w = [1, 1, 1, 1, 1, 1, 2.5]
    out = mistake_summary(truth, pred, h, rank_lengths=w, n_boot=200)
    s = out["summary"].set_index("metric")
    multi = np.bincount(g)[g] > 1
    assert s.loc["accuracy", "value"] == pytest.approx(1 - multi.mean())
    assert s.loc["mistake_severity", "value"] == pytest.approx(2.5)
    assert s.loc["mistake_severity", ["lo", "hi"]].tolist() == pytest.approx([2.5, 2.5])
    assert s.loc["mistake_severity", "chance"] > 6
    hist = out["histogram"].set_index("depth")
    assert hist.loc[6, "count"] == multi.sum() and hist.loc[7, "count"] == (~multi).sum()
    assert hist["count"].sum() == h.n_species and hist["chance_fraction"].sum() == pytest.approx(1)
    assert hist.loc[6, "lca_rank"] == "genus"


def test_zeroshot_predictions_feed_mistake_summary():
    w = simulate_world(n_kingdoms=2, branching=[2, 1, 2, 2, 2, 2], images_per_species=3, dim=32, noise=2.0, seed=6)
    h = ClassHierarchy.from_lineages(w.species_lineage)
    truth = h.species_index(w.items)
    # text of each species: its true centroid (the images are noisy copies of it)
    order = [w.species_names.index(lab.split("|")[-1]) for lab in h.taxa["species"]]
    text = {"species": (w.species_traits @ w.projection.T)[order]}
    res = zeroshot(w.embeddings, text, h, truth=truth, modes=["flat"], n_boot=50)
    out = mistake_summary(truth, res.predictions["flat"][:, -1], h, topk=res.species_topk, n_boot=100)
    s = out["summary"].set_index("metric")
    assert s.loc["accuracy", "value"] == pytest.approx(res.table["top1"].iloc[0])
    assert 0.9 < s.loc["accuracy", "value"] < 1  # a few mistakes
    assert s.loc["nlca", "value"] < 0.05 < s.loc["nlca", "chance"]
    assert s.loc["mistake_severity", "value"] < s.loc["mistake_severity", "chance"]
    assert s.loc["hdist@5", "value"] < s.loc["hdist@5", "chance"]
    assert s.loc["hdist@1", "value"] == pytest.approx(7 * s.loc["nlca", "value"])
    assert (s["lo"] <= s["value"] + 1e-12).all() and (s["value"] <= s["hi"] + 1e-12).all()


def test_severity_interval_resamples_species():
    """Species 0-9 all mistakes at height 1, species 10-19 all at height 6: species-level spread is wide."""
    truth = np.repeat(np.arange(20), 10)
    depth = np.where(truth < 10, 6, 1)
    heights = lca_heights(RANKS)
    lo, hi = severity_interval(truth, depth, heights, n_boot=500, seed=0)
    assert lo < 3.5 < hi and hi - lo > 1.5
    assert mistake_severity(depth, heights) == 3.5


# --- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs():
    h = _hand()
    with pytest.raises(TreeprobeError, match="outside"):
        lca_depth([0], [7], h)
    with pytest.raises(TreeprobeError, match="shape"):
        lca_depth([0, 1], [0], h)
    with pytest.raises(TreeprobeError, match="integer"):
        lca_depth([0.5], [0], h)
    with pytest.raises(TreeprobeError, match="candidate species are scored"):
        hdist_at_k([0], np.zeros((1, 7)), h, k=8)
    with pytest.raises(TreeprobeError, match="NaN"):
        hdist_at_k([0], np.full((1, 7), np.nan), h, k=2)
    with pytest.raises(TreeprobeError, match="non-negative"):
        lca_heights(R4, [1, -1, 1, 1])
    with pytest.raises(TreeprobeError, match="unknown rank"):
        lca_heights(R4, {"tribe": 1})
    with pytest.raises(TreeprobeError, match="non-empty"):
        chance_levels(np.array([], dtype=int), h)
    with pytest.raises(TreeprobeError, match="0..4"):
        depth_histogram([5], 4)
    with pytest.raises(TreeprobeError, match="height 0"):
        nlca([0], [1], h, rank_lengths=[0, 0, 0, 0])
