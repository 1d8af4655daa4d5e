"""The image-text null / known-truth study (analyses/image_text_null.py), scaled down with fixed seeds: the
within-parent permutation test against the module's statistics and under the null, the exact chances of
zero-shot and mistake severity, known-truth recovery, the documented miscalibration of the species bootstrap
at ranks with few sibling sets, and the CLI's writing / resuming / reporting."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from treeprobe import mistakes
from treeprobe.simulate import RANKS
from treeprobe.text_tree import image_text_alignment
from treeprobe.zeroshot import zeroshot

from ._paths import REPO

#: A small tree (~100 species, ~250 images) so that dozens of worlds run in seconds.
SMALL = dict(branching=((1, 2), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3)), images_per_species=(1, 4))


@pytest.fixture(scope="module")
def itn():
    spec = importlib.util.spec_from_file_location("image_text_null", REPO / "analyses" / "image_text_null.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["image_text_null"] = mod
    spec.loader.exec_module(mod)
    return mod


def _world(itn, kind, seed):
    return itn.make_world(kind, seed, **SMALL)


# --- the permutation test ---------------------------------------------------------------------


def test_within_parent_permutations_keep_the_parent(itn):
    parents = np.array([-1, 0, 0, 1, 1, 1, 2, 0])
    pi = itn.within_parent_permutations(parents, 500, np.random.default_rng(0))
    assert pi.shape == (500, 8)
    assert (np.sort(pi, axis=1) == np.arange(8)).all()  # permutations
    assert (parents[pi] == parents).all()  # within the parent
    assert (pi[:, 0] == 0).all() and (pi[:, 6] == 6).all()  # only children stay put
    # uniform over the 3! × 2! × 3! = ... arrangements within parent 1: each child lands on each slot ~1/3
    share = np.mean(pi[:, 3] == 5)
    assert 0.27 < share < 0.40


def test_permutation_matrices_reproduce_image_text_alignment(itn):
    """margin(texts permuted by π) − margin = Σ_c A[c, π(c)] − trace A; top1_siblings(π) = Σ_c W[c, π(c)]."""
    w = _world(itn, "brownian", 3)
    T = itn.make_texts(w, "random", np.random.default_rng(1))
    rng = np.random.default_rng(2)
    base = image_text_alignment(w.X, w.codes, T, parents=w.parents, species=w.truth, bootstrap=0).set_index("rank")
    for r in ("phylum", "genus", "species"):
        A, W = itn.alignment_matrices(w.X, w.codes[r], T[r], w.parents[r])
        assert np.trace(W) == pytest.approx(base.loc[r, "top1_siblings"], abs=1e-9)
        pi = itn.within_parent_permutations(w.parents[r], 1, rng)[0]
        assert (pi != np.arange(len(pi))).any()
        Tp = dict(T)
        Tp[r] = T[r][pi]
        moved = image_text_alignment(w.X, w.codes, Tp, parents=w.parents, species=w.truth, bootstrap=0)
        moved = moved.set_index("rank")
        n = len(pi)
        assert A[np.arange(n), pi].sum() - np.trace(A) == pytest.approx(
            moved.loc[r, "margin"] - base.loc[r, "margin"], abs=1e-6)
        assert W[np.arange(n), pi].sum() == pytest.approx(moved.loc[r, "top1_siblings"], abs=1e-9)


def test_permutation_p_uniform_under_the_null_and_small_under_truth(itn):
    """Random text: the margin's permutation p ≤ 0.05 in ~5 % of (world, rank) pairs with > 1000 distinct
    within-parent permutations, mean p ~0.5; centroid text: p ≤ 0.05 at genus and species in ≥ 90 % of the
    worlds."""
    ps, truth_ps = [], []
    for seed in range(70):
        w = _world(itn, "brownian", 100 + seed)
        rng = np.random.default_rng(seed)
        T = itn.make_texts(w, "random", rng)
        Tt = itn.make_texts(w, "centroid-2", rng)
        for r in ("family", "genus", "species"):
            if itn.log_permutations(w.parents[r]) < np.log(1000):
                continue
            perms = itn.within_parent_permutations(w.parents[r], 199, rng)
            ps.append(itn.permutation_p(itn.alignment_matrices(w.X, w.codes[r], T[r], w.parents[r])[0],
                                        w.parents[r], perms))
            if r in ("genus", "species"):
                truth_ps.append(itn.permutation_p(itn.alignment_matrices(w.X, w.codes[r], Tt[r], w.parents[r])[0],
                                                  w.parents[r], perms))
    ps = np.array(ps)
    assert len(ps) >= 170
    assert 0.015 <= np.mean(ps <= 0.05) <= 0.10
    assert abs(np.mean(ps) - 0.5) < 0.06
    assert np.mean(ps <= 0.5) == pytest.approx(0.5, abs=0.08)
    assert np.mean(np.array(truth_ps) <= 0.05) >= 0.9


def test_two_children_make_the_permutation_test_powerless(itn):
    """Two kingdoms: the only other permutation swaps them and flips the margin's sign, so p = 1."""
    w = _world(itn, "brownian", 5)
    T = itn.make_texts(w, "centroid-1", np.random.default_rng(0))
    A, _ = itn.alignment_matrices(w.X, w.codes["kingdom"], T["kingdom"], w.parents["kingdom"])
    perms = itn.within_parent_permutations(w.parents["kingdom"], 99, np.random.default_rng(0))
    assert itn.permutation_p(A, w.parents["kingdom"], perms) == 1.0


# --- the species bootstrap of the margin under the null ----------------------------------------


def _boot_rates(itn, kind, n_worlds, seed0, bootstrap=50):
    excl = {r: 0 for r in RANKS}
    for s in range(n_worlds):
        w = _world(itn, kind, seed0 + s)
        T = itn.make_texts(w, "random", np.random.default_rng(s))
        df = image_text_alignment(w.X, w.codes, T, parents=w.parents, species=w.truth, bootstrap=bootstrap, seed=s)
        for row in df.itertuples():
            excl[row.rank] += bool(row.margin_lo > 0 or row.margin_hi < 0)
    return {r: k / n_worlds for r, k in excl.items()}


def test_species_bootstrap_is_anticonservative_where_sibling_sets_are_few(itn):
    """Brownian images, random text: all images of a kingdom share its Brownian step, so the margin of the
    two kingdoms' texts is a fixed non-zero value in each world that resampling species cannot vary: the
    interval excludes 0 in most worlds at kingdom (1 sibling set), and in few at species (~40 sets).
    Species-clusters images (nothing shared above species): near 0.05 at kingdom."""
    brown = _boot_rates(itn, "brownian", 30, 500)
    clusters = _boot_rates(itn, "species-clusters", 30, 500)
    assert brown["kingdom"] >= 0.6
    assert brown["species"] <= 0.2
    assert clusters["kingdom"] <= 0.2


# --- zero-shot and mistake chances -------------------------------------------------------------


def test_exact_chances_by_brute_force(itn):
    w = _world(itn, "brownian", 7)
    ch = itn.exact_chances(w)
    h = w.hierarchy
    anc = h.species_ancestors
    for j, r in enumerate(RANKS):
        path, share = [], []
        for s in w.truth:
            p = 1.0
            for k in range(j + 1):
                par = anc[s, k - 1] if k else None
                siblings = {t[k] for t in anc if (k == 0 or t[k - 1] == par)}
                p /= len(siblings)
            path.append(p)
            share.append(np.mean(anc[:, j] == anc[s, j]))
        assert ch[r][0] == pytest.approx(np.mean(path))
        assert ch[r][1] == pytest.approx(np.mean(share))


def test_zeroshot_null_means_match_the_exact_chances(itn):
    """Over random-text draws on one world: mean flat top-1 ≈ 1/T, top_down ≈ Π 1/children, species_summed
    ≈ S_c/S, which lies above the module's 1/T at kingdom (the larger kingdom wins more often)."""
    w = _world(itn, "brownian", 18)  # kingdoms of unequal size: the species share of the true kingdom is 0.62
    ch = itn.exact_chances(w)
    acc = {m: {r: [] for r in RANKS} for m in ("flat", "top_down", "species_summed")}
    for s in range(100):
        T = itn.make_texts(w, "random", np.random.default_rng(s))
        tab = zeroshot(w.X, {r: T[r].astype(np.float32) for r in RANKS}, w.hierarchy, truth=w.truth, n_boot=1).table
        for row in tab.itertuples():
            acc[row.mode][row.rank].append(row.top1)
    for r in ("kingdom", "phylum", "class"):
        flat, td, ss = (np.array(acc[m][r]) for m in ("flat", "top_down", "species_summed"))
        se = lambda a: a.std() / np.sqrt(len(a))  # noqa: E731
        assert abs(flat.mean() - 1 / w.hierarchy.n_taxa(r)) < 4 * se(flat) + 0.01
        assert abs(td.mean() - ch[r][0]) < 4 * se(td) + 0.01
        assert abs(ss.mean() - ch[r][1]) < 4 * se(ss) + 0.02
    assert ch["kingdom"][1] > 0.6
    assert np.mean(acc["species_summed"]["kingdom"]) > 0.56  # the module's chance_top1 is 1/T = 0.5


def test_uniform_predictions_cover_the_exact_mistake_chance(itn):
    """Uniform random species predictions: the species-bootstrap intervals of hdist@1 and of the mistake
    severity cover mistakes.chance_levels in ~95 % of 100 worlds, and the values average to it."""
    cover, diff = {"hdist@1": 0, "mistake_severity": 0}, {"hdist@1": [], "mistake_severity": []}
    for s in range(100):
        w = _world(itn, "species-clusters", 900 + s)
        pred = np.random.default_rng(s).integers(0, w.hierarchy.n_species, size=len(w.truth))
        summ = mistakes.mistake_summary(w.truth, pred, w.hierarchy, n_boot=200, seed=s)["summary"].set_index("metric")
        for m in cover:
            lo, hi, ch, v = (summ.loc[m, c] for c in ("lo", "hi", "chance", "value"))
            cover[m] += bool(lo <= ch <= hi)
            diff[m].append(v - ch)
    for m in cover:
        assert 0.88 <= cover[m] / 100 <= 1.0
        assert abs(np.mean(diff[m])) < 3 * np.std(diff[m]) / 10 + 1e-3


# --- known truth -------------------------------------------------------------------------------


def test_known_truth_margins_and_accuracy_follow_the_signal(itn):
    """Centroid text: margin > 0 with lo > 0 at every rank at noise 1; the margin and the flat species top-1
    fall as the text noise grows; above-genus: margins above genus, ~0 at genus and species."""
    margins = {c: {r: [] for r in RANKS} for c in ("centroid-1", "centroid-4", "centroid-16", "above-genus")}
    top1 = {c: [] for c in margins}
    lo_pos = scored = 0
    for s in range(8):
        w = _world(itn, "brownian", 300 + s)
        for c in margins:
            T = itn.make_texts(w, c, np.random.default_rng(s))
            df = image_text_alignment(w.X, w.codes, T, parents=w.parents, species=w.truth, bootstrap=40, seed=s)
            for row in df.itertuples():
                if row.n_items == 0:  # no taxon of this rank has a sibling in this small tree
                    continue
                margins[c][row.rank].append(row.margin)
                if c == "centroid-1":
                    scored += 1
                    lo_pos += bool(row.margin_lo > 0)
            tab = zeroshot(w.X, {r: T[r].astype(np.float32) for r in RANKS}, w.hierarchy, truth=w.truth,
                           modes=("flat",), n_boot=1).table
            top1[c].append(float(tab.top1.iloc[-1]))
    mean = {c: {r: np.mean(v) for r, v in d.items()} for c, d in margins.items()}
    assert scored >= 40 and lo_pos == scored
    for r in RANKS:
        assert mean["centroid-1"][r] > mean["centroid-4"][r] > mean["centroid-16"][r] - 0.01
        assert mean["centroid-1"][r] > 0.05
    assert np.mean(top1["centroid-1"]) > np.mean(top1["centroid-4"]) > np.mean(top1["centroid-16"])
    assert np.mean(top1["centroid-1"]) > 0.4
    for r in ("kingdom", "phylum", "class", "order", "family"):
        assert mean["above-genus"][r] > 0.1
    for r in ("genus", "species"):
        assert abs(mean["above-genus"][r]) < 0.03


# --- the script --------------------------------------------------------------------------------


def test_cli_writes_resumes_and_reports(itn, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(itn.WORLD_PARAMS, "branching", SMALL["branching"])
    monkeypatch.setitem(itn.WORLD_PARAMS, "images_per_species", SMALL["images_per_species"])
    out = tmp_path / "itn.json"
    args = ["--replicates", "2", "--bootstrap", "20", "--n-boot", "50", "--permutations", "19", "--noises", "1",
            "--texts", "random,above-genus", "--out", str(out)]
    assert itn.main(args) == 0
    first = json.loads(out.read_text())
    assert [r["replicate"] for r in first["records"]] == [0, 1]
    rec = first["records"][0]
    assert set(rec["cells"]) == {"brownian/random", "brownian/above-genus", "species-clusters/random"}
    assert set(rec["mistakes"]) == {"brownian/uniform", "brownian/zeroshot-random-text", "species-clusters/uniform",
                                    "species-clusters/zeroshot-random-text"}
    assert len(rec["cells"]["brownian/random"]["align"]["genus"]) == 10
    args[1] = "3"
    assert itn.main(args) == 0
    second = json.loads(out.read_text())
    assert [r["replicate"] for r in second["records"]] == [0, 1, 2]
    assert second["records"][0] == first["records"][0]  # kept, not recomputed
    capsys.readouterr()
    assert itn.main(["--report", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "**Null `brownian` images, `random` text**" in text and "| kingdom |" in text
    assert "**Known truth, `brownian` images**" in text
    with pytest.raises(SystemExit):
        itn.main([*args[:-2], "--bootstrap", "21", "--out", str(out)])  # other settings on the same file


def test_package_margin_permutation_test_is_calibrated_on_brownian_worlds(itn):
    """`image_text_alignment(permutations=...)` (the package's one-sided within-parent test): random text on
    200 Brownian worlds, where the species-bootstrap interval rejects in up to 2/3 of worlds. The test rejects
    at ~α at ranks with many sibling sets and never at kingdom (one pair of siblings: p ≥ 0.5)."""
    rej = {r: [] for r in RANKS}
    for seed in range(200):
        w = itn.make_world("brownian", seed)
        T = itn.make_texts(w, "random", np.random.default_rng([seed, 7]))
        df = image_text_alignment(w.X, w.codes, T, parents=w.parents, species=w.truth, bootstrap=0,
                                  permutations=99, seed=seed)
        for r, p in zip(df["rank"], df["margin_p"]):
            rej[r].append(p <= 0.05)
    rate = {r: float(np.mean(v)) for r, v in rej.items()}
    assert rate["kingdom"] == 0.0
    for r in ("order", "family", "genus", "species"):
        assert 0.015 <= rate[r] <= 0.10, (r, rate[r])  # binomial 95 % range of 200 draws at 0.05: 0.02-0.085
