"""Property tests of the taxonomy (hypothesis): for any small lineage table -- names reused at
several ranks and under several parents (homonyms), missing values in every spelling, stray
whitespace --

(a) the rank tree's patristic distances (clade structure and ete3 tree) equal the rank
    definition computed here from scratch: 2 x the summed lengths of the ranks below the deepest
    shared known taxon ("separate"), below the deepest shared prefix ("placeholder");
(b) two items share a taxon code at a rank exactly when their whole lineage prefix down to that
    rank is the same (so homonyms never merge);
(c) permuting the rows changes no number: taxon counts, conflict table, warnings, Mantel r.

Deterministic: derandomize=True, no example database."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treeprobe import tl
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import PLACEHOLDER, RANKS, Taxonomy, lineage_conflicts

PROFILE = settings(max_examples=30, derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

#: Names reused at every rank (a family and a genus called "A"; genus "A" under families A and B),
#: with stray whitespace and case variants (one name to TreeData, two to a bare Taxonomy).
NAMES = ["A", "B", " A", "B\u00a0", "a", "D e", "D  e", "D\u00a0e", "D\te "]
MISSING = ["", None, "unknown", " Incertae  sedis", "NA", "?"]
NAME = st.sampled_from(NAMES)
MAYBE_NAME = st.one_of(NAME, NAME, st.sampled_from(MISSING))  # about 2 in 3 known


@st.composite
def lineage_tables(draw, min_rows=2, max_rows=9, kingdom_missing=False):
    """A DataFrame of 7 rank columns; kingdom from K/L (or missing when ``kingdom_missing``)."""
    n = draw(st.integers(min_rows, max_rows))
    kingdom = st.sampled_from(["K", "L", " K"])
    if kingdom_missing:  # about 1 row in 7 without kingdom: set aside by TreeData
        kingdom = st.one_of(*[kingdom] * 6, st.sampled_from(MISSING))
    rows = [[draw(kingdom)] + [draw(MAYBE_NAME) for _ in RANKS[1:]] for _ in range(n)]
    return pd.DataFrame(rows, columns=list(RANKS), dtype=object)


RANK_LENGTHS = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), min_size=7, max_size=7)


# ----------------------------------------------------------------------------- explicit definitions


def _clean(v) -> str:
    """A name as the taxonomy must read it: whitespace collapsed, '' when missing."""
    if v is None:
        return ""
    v = " ".join(str(v).split())
    return "" if " ".join(v.lower().replace("_", " ").split()) in {"", "unknown", "incertae sedis", "na", "?"} else v


def _explicit_lineages(df, unknown):
    """Per item, per rank: its taxon as the tuple of names from kingdom down (None: no taxon there)."""
    out = []
    for row in df[list(RANKS)].itertuples(index=False):
        names = [_clean(v) for v in row]
        if unknown == "placeholder":
            names = [n or PLACEHOLDER.format(rank=r) for n, r in zip(names, RANKS)]
        out.append([tuple(names[: k + 1]) if names[k] else None for k in range(len(RANKS))])
    return out


def _explicit_distances(df, unknown, w):
    taxa = _explicit_lineages(df, unknown)
    n = len(taxa)
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            shared = [k for k in range(len(RANKS)) if taxa[i][k] is not None and taxa[i][k] == taxa[j][k]]
            deepest = max(shared, default=-1)
            D[i, j] = 0.0 if i == j else 2.0 * sum(w[deepest + 1:])
    return D


# ----------------------------------------------------------------------------- (a) distances


@pytest.mark.parametrize("unknown", ["separate", "placeholder"])
@PROFILE
@given(df=lineage_tables(), w=RANK_LENGTHS)
def test_rank_tree_distances_equal_the_rank_definition(unknown, df, w):
    tax = Taxonomy.from_frame(df, unknown=unknown)
    cs = tax.clade_structure(w)
    expected = _explicit_distances(df, unknown, w)
    np.testing.assert_allclose(cs.item_distances(), expected, atol=1e-9)
    # every item is Σw from the root (the tree is ultrametric by rank)
    np.testing.assert_allclose(cs.root_distance()[cs.item_node], sum(w), atol=1e-9)
    # the ete3 tree is the same tree
    t = tax.tree(w)
    node = {n.label: n for n in t.traverse()}
    leaf = [node[cs.names[v]] for v in cs.item_node]
    for i in range(len(df)):
        for j in range(i + 1, len(df)):
            assert t.get_distance(leaf[i], leaf[j]) == pytest.approx(expected[i, j], abs=1e-9)


# ----------------------------------------------------------------------------- (b) identity


@pytest.mark.parametrize("unknown", ["separate", "placeholder"])
@PROFILE
@given(df=lineage_tables())
def test_codes_equal_exactly_when_whole_prefixes_equal(unknown, df):
    tax = Taxonomy.from_frame(df, unknown=unknown)
    taxa = _explicit_lineages(df, unknown)
    for k, r in enumerate(RANKS):
        codes = tax.codes(r)
        assert ((codes >= 0) == np.array([t[k] is not None for t in taxa])).all()
        for i in range(len(df)):
            for j in range(len(df)):
                same = taxa[i][k] is not None and taxa[i][k] == taxa[j][k]
                assert (codes[i] >= 0 and codes[i] == codes[j]) == same, (r, i, j)
        assert tax.n_taxa(r) == len({t[k] for t in taxa if t[k] is not None})


@PROFILE
@given(df=lineage_tables(min_rows=2))
def test_homonyms_stay_apart_in_treedata(df):
    """The same short name under two parents: two taxa, and slicing by the short name is refused."""
    df = df.copy()
    df.loc[0, list(RANKS)] = ["K", "P", "C", "O", "F1", "Homo", "Homo x"]
    df.loc[1, list(RANKS)] = ["K", "P", "C", "O", "F2", "Homo", "Homo y"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TreeprobeWarning)
        ds = TreeData(None, df)
    genus = ds.taxonomy.codes("genus")
    assert genus[0] != genus[1] and min(genus[0], genus[1]) >= 0
    with pytest.raises(TreeprobeError, match="'Homo' names 2 taxa"):
        ds["Homo"]


# ----------------------------------------------------------------------------- (c) row order


def _summary(df, X):
    """Every number TreeData and the Mantel tool give for this table, order-free; errors as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = TreeData(X, df)
        except TreeprobeError as e:
            return dict(error=str(e))
    out = dict(warnings=sorted(str(w.message) for w in caught if issubclass(w.category, TreeprobeWarning)),
               n=len(ds), skipped=sorted(ds.skipped["reason"]),
               taxa={r: sorted(ds.taxonomy.taxon_labels(r)) for r in RANKS},
               summary=ds.taxonomy.rank_summary().to_dict("records"),
               conflicts=lineage_conflicts(ds.items).to_dict("records"))
    try:
        tab = tl.mantel(ds, permute=("species", "images"), permutations=0)
        out["mantel"] = {(a, b, c): (s, n) for a, b, c, s, n in
                         tab[["scheme", "level", "method", "statistic", "n_items"]].itertuples(index=False)}
    except TreeprobeError as e:
        out["mantel"] = str(e)
    return out


@settings(PROFILE, max_examples=20)
@given(df=lineage_tables(min_rows=5, max_rows=12, kingdom_missing=True), seed=st.integers(0, 2**16),
       data=st.data())
def test_row_order_changes_no_number(df, seed, data):
    n = len(df)
    X = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    perm = np.array(data.draw(st.permutations(range(n))))
    a = _summary(df, X)
    b = _summary(df.iloc[perm].reset_index(drop=True), X[perm])
    assert a.keys() == b.keys()
    if "error" in a:
        assert a == b
        return
    mantel_a, mantel_b = a.pop("mantel"), b.pop("mantel")
    assert a == b
    if isinstance(mantel_a, str):
        assert mantel_a == mantel_b
        return
    assert mantel_a.keys() == mantel_b.keys()
    for key, (r, n_used) in mantel_a.items():
        assert mantel_b[key][1] == n_used
        assert mantel_b[key][0] == pytest.approx(r, abs=1e-12, nan_ok=True), key
