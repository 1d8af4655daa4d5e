"""Few-shot classification per rank (treeprobe.fewshot): SimpleShot against an explicit computation,
the logistic probe against scikit-learn, the split protocol and its file, known truth, the null, and
clear errors."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from treeprobe.errors import TreeprobeError
from treeprobe.fewshot import (SPLIT_COLUMNS, fewshot_eval, fewshot_splits, logistic_predict, read_splits,
                               simpleshot_predict, summarise, write_splits)

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def _world(n_genera=4, species_per_genus=3, per_species=6, *, dim=16, seed=0, scales=None, noise=0.01):
    """Lineages (2 kingdoms, 1 phylum..family per kingdom, genera, species) and embeddings: the sum of
    a random offset per taxon at each rank (scale per rank), plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_genera):
        kingdom = f"K{g % 2}"
        for s in range(species_per_genus):
            for _ in range(per_species):
                rows.append([kingdom, f"P{g % 2}", f"C{g % 2}", f"O{g % 2}", f"F{g % 2}", f"G{g}", f"G{g} s{s}"])
    lin = pd.DataFrame(rows, columns=list(RANKS))
    scales = scales or dict(zip(RANKS, (0, 0, 0, 0, 0, 4.0, 1.0)))
    X = noise * rng.normal(size=(len(lin), dim))
    for r in RANKS:
        if scales[r]:
            codes, _ = pd.factorize(lin[r])
            X += scales[r] * rng.normal(size=(codes.max() + 1, dim))[codes]
    return lin, X


# ----------------------------------------------------------------------------- classifiers


def _explicit_simpleshot(S, y, Q):
    """SimpleShot written out with loops: centre on the support mean, normalise, nearest class mean."""
    S, Q = np.asarray(S, float), np.asarray(Q, float)
    mean = [sum(S[i, j] for i in range(len(S))) / len(S) for j in range(S.shape[1])]

    def cl2n(v):
        c = [v[j] - mean[j] for j in range(len(v))]
        norm = math.sqrt(sum(x * x for x in c))
        return [x / norm for x in c]

    Sn = [cl2n(v) for v in S]
    classes = sorted(set(y))
    cents = {}
    for c in classes:
        members = [Sn[i] for i in range(len(y)) if y[i] == c]
        cents[c] = [sum(m[j] for m in members) / len(members) for j in range(S.shape[1])]
    out = []
    for q in Q:
        qn = cl2n(q)
        dists = {c: math.sqrt(sum((qn[j] - cents[c][j]) ** 2 for j in range(len(qn)))) for c in classes}
        out.append(min(classes, key=lambda c: (dists[c], c)))
    return np.array(out)


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_simpleshot_equals_an_explicit_computation(offset):
    rng = np.random.default_rng(1)
    for trial in range(5):
        y = np.repeat([3, 7, 11, 20], [1, 2, 3, 5])
        S = rng.normal(size=(len(y), 6)) + offset
        Q = rng.normal(size=(25, 6)) + offset
        got = simpleshot_predict(S, y, Q)
        np.testing.assert_array_equal(got, _explicit_simpleshot(S, y, Q))
    # the centring matters: with a common offset, plain nearest-mean on normalised vectors differs
    y = np.repeat([0, 1, 2], 4)
    S = rng.normal(size=(12, 6)) + 5.0
    Q = rng.normal(size=(40, 6)) + 5.0
    Sn, Qn = S / np.linalg.norm(S, axis=1, keepdims=True), Q / np.linalg.norm(Q, axis=1, keepdims=True)
    plain = np.argmin(((Qn[:, None, :] - np.stack([Sn[y == c].mean(0) for c in range(3)])[None]) ** 2).sum(-1), 1)
    assert (simpleshot_predict(S, y, Q) != plain).any()


def test_logistic_equals_sklearn_directly():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(5), 3)
    S, Q = rng.normal(size=(15, 8)), rng.normal(size=(30, 8))
    for C in (0.05, 1.0, 20.0):
        want = LogisticRegression(C=C, max_iter=1000, random_state=4).fit(S, y).predict(Q)
        np.testing.assert_array_equal(logistic_predict(S, y, Q, C=C, seed=4), want)
    assert (logistic_predict(S, y, Q, C=0.001) != logistic_predict(S, y, Q, C=100.0)).any()


# ----------------------------------------------------------------------------- splits


def _lineage_with_sizes():
    """genus Ga: species a1 x5, a2 x1; Gb: b1 x4 (one species); Gc: c1 x1 (too small); one item
    unknown at genus."""
    rows = [["K", "P", "C", "O", "F", "Ga", "Ga a1"]] * 5 + [["K", "P", "C", "O", "F", "Ga", "Ga a2"]] + \
        [["K", "P", "C", "O", "F", "Gb", "Gb b1"]] * 4 + [["K", "P", "C", "O", "F", "Gc", "Gc c1"]] + \
        [["K", "P", "C", "O", "F", None, None]]
    return pd.DataFrame(rows, columns=list(RANKS))


def test_split_protocol_any_and_disjoint():
    lin = _lineage_with_sizes()
    sp = fewshot_splits(lin, ks=(1, 5), ranks=("genus",), seeds=3)
    assert list(sp.columns) == list(SPLIT_COLUMNS)
    assert len(sp) == 3 * 2 * 11  # the item unknown at genus is in no split
    for (seed, k), part in sp.groupby(["seed", "k"]):
        counts = part.groupby(["taxon", "role"]).size().unstack(fill_value=0)
        if k == 1:
            assert counts.loc["K|P|C|O|F|Ga", "support"] == 1 and counts.loc["K|P|C|O|F|Ga", "query"] == 5
            assert counts.loc["K|P|C|O|F|Gb", "support"] == 1 and counts.loc["K|P|C|O|F|Gb", "query"] == 3
            assert counts.loc["K|P|C|O|F|Gc", "excluded"] == 1
        else:  # only Ga has k + 1 = 6 images
            assert counts.loc["K|P|C|O|F|Ga", "support"] == 5 and counts.loc["K|P|C|O|F|Ga", "query"] == 1
            assert counts.loc["K|P|C|O|F|Gb", "excluded"] == 4
    dj = fewshot_splits(lin, ks=(1, 5), ranks=("genus",), seeds=3, support_species="disjoint")
    species = lin["species"].to_numpy()
    for (seed, k), part in dj.groupby(["seed", "k"]):
        ga = part[part["taxon"] == "K|P|C|O|F|Ga"]
        items = ga["item"].astype(int).to_numpy()
        sup = set(species[items[ga["role"].to_numpy() == "support"]])
        qry = set(species[items[ga["role"].to_numpy() == "query"]])
        assert sup and qry and not sup & qry
        assert set(species[items[ga["role"].to_numpy() == "unused"]]) <= sup
        if k == 5:  # only a1 can give 5 support images: a2 is the query species
            assert sup == {"Ga a1"} and qry == {"Ga a2"}
        assert (part.loc[part["taxon"] == "K|P|C|O|F|Gb", "role"] == "excluded").all()  # one species only
    # at the species rank "disjoint" is "any"
    a = fewshot_splits(lin, ks=(1,), ranks=("species",), seeds=2)
    b = fewshot_splits(lin, ks=(1,), ranks=("species",), seeds=2, support_species="disjoint")
    pd.testing.assert_frame_equal(a, b)


def test_splits_reproducible_bytes_and_rerun(tmp_path):
    lin, X = _world(seed=3, scales=dict(zip(RANKS, (1, 0, 0, 0, 0, 1, 1))), noise=0.5)
    ids = [f"img{i:03d}" for i in range(len(lin))]
    one = fewshot_eval(X, lin, ks=(1, 5), seeds=3, items=ids)
    two = fewshot_eval(X, lin, ks=(1, 5), seeds=3, items=ids)
    p1, p2, p3 = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    one.write_splits(p1)
    two.write_splits(p2)
    assert p1.read_bytes() == p2.read_bytes()
    write_splits(fewshot_splits(lin, ks=(1, 5), seeds=[1, 2, 3], items=ids), p3)
    assert p3.read_bytes() != p1.read_bytes()
    back = read_splits(p1)
    pd.testing.assert_frame_equal(back, one.splits.astype(back.dtypes.to_dict()))
    again = fewshot_eval(X, lin, splits=back, items=ids)
    pd.testing.assert_frame_equal(again.per_seed, one.per_seed)
    pd.testing.assert_frame_equal(again.summary, one.summary)
    # a subset of ranks / seeds draws the same splits as the full run
    sub = fewshot_splits(lin, ks=(5,), ranks=("genus",), seeds=[2], items=ids)
    full = one.splits[(one.splits["rank"] == "genus") & (one.splits["k"] == 5) & (one.splits["seed"] == 2)]
    np.testing.assert_array_equal(sub["role"].to_numpy(), full["role"].to_numpy())
    # and a rerun restricted from the file
    part = fewshot_eval(X, lin, splits=back, items=ids, ranks=("genus",), seeds=[2], ks=(5,))
    want = one.per_seed.query("rank == 'genus' and seed == 2 and k == 5").reset_index(drop=True)
    pd.testing.assert_frame_equal(part.per_seed, want)


def test_summary_statistics_and_counts():
    lin = _lineage_with_sizes()
    X = np.random.default_rng(0).normal(size=(len(lin), 4))
    res = fewshot_eval(X, lin, ks=(1,), ranks=("genus",), seeds=4, methods=("simpleshot",))
    ps = res.per_seed
    assert (ps["n_taxa"] == 2).all() and (ps["chance"] == 0.5).all()
    assert (ps["n_queries"] == 8).all() and (ps["n_excluded_taxa"] == 1).all() and (ps["n_excluded_items"] == 1).all()
    np.testing.assert_allclose(ps["accuracy"], ps["n_correct"] / 8)
    row = res.summary.iloc[0]
    assert row["mean"] == pytest.approx(ps["accuracy"].mean())
    assert row["sd"] == pytest.approx(np.std(ps["accuracy"], ddof=1))
    assert (row["min"], row["max"], row["n_seeds"]) == (ps["accuracy"].min(), ps["accuracy"].max(), 4)
    one = summarise(ps[ps["seed"] == 0])
    assert np.isnan(one["sd"].iloc[0])


# ----------------------------------------------------------------------------- known truth and null


def test_well_separated_clusters_are_classified_perfectly():
    scales = dict(zip(RANKS, (3.0, 0, 0, 0, 0, 2.0, 1.0)))
    lin, X = _world(n_genera=6, species_per_genus=3, per_species=7, dim=24, seed=5, scales=scales, noise=0.02)
    res = fewshot_eval(X, lin, ks=(1, 5), ranks=("kingdom", "genus", "species"), seeds=2)
    s = res.summary
    assert set(s["rank"]) == {"kingdom", "genus", "species"} and len(s) == 12
    assert (s["mean"] > 0.99).all(), s
    assert (s.loc[s["rank"] == "species", "n_taxa"] == 18).all()
    assert (s.loc[s["rank"] == "kingdom", "chance"] == 0.5).all()


def test_disjoint_species_removes_the_species_shortcut():
    # species clusters with no genus signal: genus accuracy comes only from shared species
    scales = dict(zip(RANKS, (0, 0, 0, 0, 0, 0.0, 1.0)))
    lin, X = _world(n_genera=6, species_per_genus=4, per_species=6, dim=32, seed=6, scales=scales, noise=0.05)
    kw = dict(ks=(5,), ranks=("genus",), seeds=3, methods=("simpleshot",))
    easy = fewshot_eval(X, lin, **kw).summary["mean"].iloc[0]
    hard = fewshot_eval(X, lin, support_species="disjoint", **kw)
    n = hard.per_seed["n_queries"].sum()
    lo, hi = stats.binom.interval(0.999, n, 1 / 6)
    assert easy > 0.5
    assert lo / n <= hard.summary["mean"].iloc[0] <= hi / n


@pytest.mark.parametrize("method", ["simpleshot", "logistic"])
def test_random_embeddings_are_at_chance(method):
    lin, _ = _world(n_genera=8, species_per_genus=2, per_species=10, seed=7)
    X = np.random.default_rng(8).normal(size=(len(lin), 16))
    res = fewshot_eval(X, lin, ks=(1, 5), ranks=("genus",), seeds=2, methods=(method,))
    for _, row in res.per_seed.iterrows():
        lo, hi = stats.binom.interval(0.999, row["n_queries"], row["chance"])
        assert lo <= row["n_correct"] <= hi, row


@pytest.mark.slow
def test_null_false_positive_rate_over_many_worlds():
    """Random embeddings: the share of worlds whose accuracy exceeds the binomial 95 % upper bound of chance
    stays near (below) 5 % (the count is a Poisson-binomial, less spread than a binomial)."""
    lin, _ = _world(n_genera=5, species_per_genus=2, per_species=8, seed=9)
    above = 0
    worlds = 200
    for w in range(worlds):
        X = np.random.default_rng(1000 + w).normal(size=(len(lin), 8))
        row = fewshot_eval(X, lin, ks=(1,), ranks=("genus",), seeds=[w], methods=("simpleshot",)).per_seed.iloc[0]
        above += row["n_correct"] > stats.binom.ppf(0.95, row["n_queries"], row["chance"])
    assert above / worlds <= 0.09


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(tmp_path):
    lin = _lineage_with_sizes()
    X = np.random.default_rng(0).normal(size=(len(lin), 4))
    with pytest.raises(TreeprobeError, match="k=50 is larger than the taxa allow"):
        fewshot_eval(X, lin, ks=(50,), ranks=("genus",), seeds=1)
    with pytest.raises(TreeprobeError, match="unknown rank 'tribe'"):
        fewshot_eval(X, lin, ranks=("tribe",))
    with pytest.raises(TreeprobeError, match="not in the lineages"):
        fewshot_eval(X, lin[["kingdom", "genus"]], ranks=("species",))
    with pytest.raises(TreeprobeError, match="unknown few-shot method 'knn'"):
        fewshot_eval(X, lin, methods=("knn",))
    with pytest.raises(TreeprobeError, match="unknown support_species 'same'"):
        fewshot_eval(X, lin, support_species="same")
    with pytest.raises(TreeprobeError, match="12 embeddings but 11 lineages"):
        fewshot_eval(X, lin.iloc[:11])
    with pytest.raises(TreeprobeError, match="k must be >= 1"):
        fewshot_splits(lin, ks=(0,))
    with pytest.raises(TreeprobeError, match="seed must be >= 0"):
        fewshot_splits(lin, seeds=[-1])
    with pytest.raises(TreeprobeError, match="item ids repeat"):
        fewshot_splits(lin, items=["a"] * len(lin))
    with pytest.raises(TreeprobeError, match="at least two taxa"):
        logistic_predict(X[:2], [0, 0], X)
    with pytest.raises(TreeprobeError, match="support labels have shape"):
        simpleshot_predict(X[:3], [0, 1], X)
    good = fewshot_splits(lin, ks=(1,), ranks=("genus",), seeds=1)
    other = good.assign(item=good["item"].astype(int) + 100)
    with pytest.raises(TreeprobeError, match="not in these data"):
        fewshot_eval(X, lin, splits=other)
    moved = lin.copy()
    moved.loc[0, ["genus", "species"]] = ["Gb", "Gb b1"]
    with pytest.raises(TreeprobeError, match="made for other data"):
        fewshot_eval(X, moved, splits=good)
    with pytest.raises(TreeprobeError, match="hold no k 5"):
        fewshot_eval(X, lin, splits=good, ks=(5,))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.drop(columns="role"), "lack column"), (lambda d: d.assign(role="train"), "unknown role"),
    (lambda d: d.assign(k="one"), "integers >= 1"), (lambda d: d.assign(rank="tribe"), "unknown rank"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "appears twice"),
    (lambda d: d.assign(role=np.where(d["role"] == "query", "support", d["role"])), "support items at k=1"),
    (lambda d: d.iloc[:0], "are empty"),
])
def test_bad_split_files(tmp_path, edit, match):
    good = fewshot_splits(_lineage_with_sizes(), ks=(1,), ranks=("genus",), seeds=1)
    edit(good).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(TreeprobeError, match=match):
        read_splits(tmp_path / "s.csv")
    with pytest.raises(TreeprobeError, match="no such splits file"):
        read_splits(tmp_path / "none.csv")
