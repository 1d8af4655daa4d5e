"""Image-text alignment per rank and the text embeddings as a data set (treeprobe.text_tree)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import treeprobe as tp
from treeprobe.errors import TreeprobeError
from treeprobe.taxonomy import Taxonomy
from treeprobe.text_tree import align_text_embeddings, image_text_alignment, taxon_parents, text_tree_data


def _world(seed=0, n_per=4, noise=0.5, dim=16):
    """Two kingdoms × 2 genera × 3 species; image = species direction + noise; returns items, X, taxonomy."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in ("K1", "K2"):
        for g in ("g1", "g2"):
            for s in ("a", "b", "c"):
                rows += [dict(kingdom=k, genus=f"{k}{g}", species=f"{k}{g} {s}")] * n_per
    items = pd.DataFrame(rows)
    tax = Taxonomy.from_frame(items, ranks=("kingdom", "genus", "species"))
    centres = rng.normal(size=(tax.n_taxa("species"), dim))
    X = centres[tax.codes("species")] + noise * rng.normal(size=(len(items), dim))
    return items, X.astype(np.float32), tax, centres


def _brute(X, codes, T, parents):
    """Loops over items: own cosine, mean sibling cosine, own beats every sibling."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    own, sib, win, ch = [], [], [], []
    for i, c in enumerate(codes):
        if c < 0:
            continue
        sibs = [s for s in range(len(T)) if s != c and parents[s] == parents[c]]
        if not sibs:
            continue
        o = float(Xn[i] @ Tn[c])
        cs = [float(Xn[i] @ Tn[s]) for s in sibs]
        own.append(o), sib.append(np.mean(cs)), win.append(o > max(cs)), ch.append(1 / (len(sibs) + 1))
    return np.mean(own), np.mean(sib), np.mean(np.array(own) - np.array(sib)), np.mean(win), np.mean(ch), len(own)


def _texts(tax, rng, dim, X=None):
    """Random text vectors per rank (or the taxon means of X)."""
    out = {}
    for r in tax.ranks:
        if X is None:
            out[r] = rng.normal(size=(tax.n_taxa(r), dim)).astype(np.float32)
        else:
            out[r] = np.stack([X[tax.codes(r) == t].mean(0) for t in range(tax.n_taxa(r))]).astype(np.float32)
    return out


def test_taxon_parents_follow_the_items():
    _, _, tax, _ = _world()
    par = taxon_parents(tax)
    assert (par["kingdom"] == -1).all()
    for r_up, r in (("kingdom", "genus"), ("genus", "species")):
        assert np.array_equal(par[r][tax.codes(r)], tax.codes(r_up))


def test_alignment_equals_the_item_loop():
    items, X, tax, _ = _world(seed=1)
    rng = np.random.default_rng(2)
    T = _texts(tax, rng, X.shape[1])
    par = taxon_parents(tax)
    df = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=0).set_index("rank")
    for r in tax.ranks:
        o, s, m, w, ch, n = _brute(X, tax.codes(r), T[r], par[r])
        got = df.loc[r]
        assert got["n_items"] == n
        assert np.allclose([got.own_cos, got.sibling_cos, got.margin, got.top1_siblings, got.chance],
                           [o, s, m, w, ch], atol=1e-6)
    assert df.loc["kingdom", "chance"] == pytest.approx(0.5) and df.loc["species", "chance"] == pytest.approx(1 / 3)


def test_unknown_items_and_only_children_are_not_scored():
    items, X, tax, _ = _world(seed=3)
    codes = {r: c.copy() for r, c in tax.codes_by_rank().items()}
    codes["species"][:4] = -1  # unknown species: never scored at species
    par = taxon_parents(tax)
    T = _texts(tax, np.random.default_rng(0), X.shape[1])
    par_only = {**par, "genus": np.arange(tax.n_taxa("genus"))}  # every genus an only child
    df = image_text_alignment(X, codes, T, parents=par_only, bootstrap=0).set_index("rank")
    assert df.loc["species", "n_items"] == len(X) - 4
    assert df.loc["genus", "n_items"] == 0 and df.loc["genus", "n_no_siblings"] == len(X)
    assert np.isnan(df.loc["genus", "margin"])


def test_known_truth_text_at_the_taxon_means():
    """Text vectors at the taxon means of the images: the own text wins almost always; texts shuffled
    among siblings: the margin is negative and the wins fall to about chance or below."""
    items, X, tax, _ = _world(seed=4, n_per=8, noise=0.3)
    par = taxon_parents(tax)
    T = _texts(tax, None, X.shape[1], X=X)
    df = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=50, seed=1).set_index("rank")
    # (species directions are independent: a kingdom mean is a blurred target, so a little below 1 there)
    assert df.loc["species", "top1_siblings"] > 0.95 and (df["top1_siblings"] > 0.8).all()
    assert (df["margin_lo"] > 0).all() and (df["top1_siblings"] > df["chance"] + 0.3).all()
    sh = dict(T)
    sh["species"] = T["species"][np.array([1, 2, 0, 4, 5, 3, 7, 8, 6, 10, 11, 9])]  # rotate within genus
    bad = image_text_alignment(X, tax.codes_by_rank(), sh, parents=par, bootstrap=50, seed=1).set_index("rank")
    assert bad.loc["species", "margin_hi"] < 0 and bad.loc["species", "top1_siblings"] < 0.1
    assert bad.loc["genus", "margin"] == df.loc["genus", "margin"]  # other ranks untouched


def test_bootstrap_resamples_species_and_is_seeded():
    items, X, tax, _ = _world(seed=5)
    par = taxon_parents(tax)
    T = _texts(tax, np.random.default_rng(1), X.shape[1])
    a = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=100, seed=7)
    b = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=100, seed=7)
    c = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=100, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["margin_lo"], c["margin_lo"])
    assert (a["margin_lo"] <= a["margin"]).all() and (a["margin"] <= a["margin_hi"]).all()
    # resampling whole species: with one species unit per item group the interval is the species one;
    # resampling items instead (each item its own unit) gives a narrower interval here (4 alike images)
    items_units = image_text_alignment(X, tax.codes_by_rank(), T, parents=par, bootstrap=100, seed=7,
                                       species=np.arange(len(X)))
    wid = (a["margin_hi"] - a["margin_lo"]).to_numpy()
    wid_items = (items_units["margin_hi"] - items_units["margin_lo"]).to_numpy()
    assert np.mean(wid_items < wid) >= 2 / 3


def test_align_text_embeddings_by_label():
    items, X, tax, _ = _world()
    labels = list(tax.taxon_labels("genus"))[::-1]
    arr = np.arange(len(labels) * 2, dtype=np.float32).reshape(-1, 2)
    out = align_text_embeddings(tax, {"genus": (labels, arr)})
    assert np.array_equal(out["genus"], arr[::-1])
    with pytest.raises(TreeprobeError, match="have no text embedding"):
        align_text_embeddings(tax, {"genus": (labels[1:], arr[1:])})
    with pytest.raises(TreeprobeError, match="labels but text embeddings"):
        align_text_embeddings(tax, {"genus": (labels, arr[1:])})


def test_text_tree_data_runs_the_tools():
    """Text vectors of species that follow the tree (kingdom + genus + species parts) give a positive
    Mantel r; vectors shuffled among species give none."""
    rng = np.random.default_rng(0)
    lin = pd.DataFrame([dict(kingdom=f"K{k}", phylum=f"P{k}", **{"class": f"C{k}"}, order=f"O{k}", family=f"F{k}{g}",
                             genus=f"G{k}{g}", species=f"G{k}{g} s{s}") for k in range(2) for g in range(5)
                        for s in range(4)])
    parts = {c: {v: rng.normal(size=32) for v in lin[c].unique()} for c in ("kingdom", "genus", "species")}
    X = np.stack([parts["kingdom"][r.kingdom] + parts["genus"][r.genus] + 0.5 * parts["species"][r.species]
                  for r in lin.itertuples()])
    data = text_tree_data(X, lin, text_type="scientific")
    assert data.uns["text"] == {"text_type": "scientific"} and len(data) == 40
    r = tp.tl.mantel(data, methods=("pearson",), levels=("image",), permutations=99)
    assert r["statistic"].iloc[0] > 0.5 and r["p_value"].iloc[0] == 0.01
    shuffled = text_tree_data(X[rng.permutation(40)], lin)
    r0 = tp.tl.mantel(shuffled, methods=("pearson",), levels=("image",), permutations=99)
    assert abs(r0["statistic"].iloc[0]) < 0.2
    with pytest.raises(TreeprobeError, match="40 lineages"):
        text_tree_data(X[:5], lin)


def test_margin_permutation_p_equals_the_exact_within_parent_distribution():
    """2 parents × 3 children: all 36 within-parent text permutations enumerated by brute force (loops over
    images); the sampled p of 4,000 draws is within 0.02 of the exact one, and a text that follows the
    images gets the smallest p the 36 permutations allow."""
    import itertools

    rng = np.random.default_rng(0)
    par = np.array([0, 0, 0, 1, 1, 1])
    codes = np.repeat(np.arange(6), 4)
    X = rng.normal(size=(24, 5))

    def brute_margin(T):
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        S = Xn @ (T / np.linalg.norm(T, axis=1, keepdims=True)).T
        return np.mean([S[i, c] - S[i, [j for j in range(6) if j != c and par[j] == par[c]]].mean()
                        for i, c in enumerate(codes)])

    for T in (rng.normal(size=(6, 5)), np.stack([X[codes == c].mean(axis=0) for c in range(6)])):
        df = image_text_alignment(X, {"genus": codes}, {"genus": T}, parents={"genus": par}, bootstrap=0,
                                  permutations=4000, seed=1)
        obs = brute_margin(T)
        perms = [list(a) + list(b) for a in itertools.permutations(range(3)) for b in itertools.permutations(range(3, 6))]
        exact = np.mean([brute_margin(T[p]) >= obs - 1e-12 for p in perms])
        assert df["margin"][0] == pytest.approx(obs, abs=1e-6)
        assert df["margin_p"][0] == pytest.approx(exact, abs=0.02)
        assert df["n_sibling_sets"][0] == 2
    assert exact == pytest.approx(1 / 36)  # the centroid texts: only the identity is as good
