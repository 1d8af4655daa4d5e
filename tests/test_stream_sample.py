"""treeprobe.stream ``sample=``: the stratified bottom-k sample drawn in the streaming pass.

Reference: an independent implementation of the documented rule over every row (pure-Python hashes,
brute-force cap, numpy unit vectors from pyarrow), and the invariance of the sample to batching and to the
partition of the files among passes (bit-identical).
"""

import hashlib
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from treeprobe import stream, tl
from treeprobe.data import load_embeddings
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.stream import species_statistics
from treeprobe.taxonomy import RANKS

M64 = 2 ** 64 - 1


# --- the independent reference -------------------------------------------------------------------------


def _blake(*parts) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()


def ref_key(seed: int, label: str, row: int) -> int:
    """The documented row key in Python integers: splitmix64 output row + 1 of the stream seeded with the
    file hash."""
    z = (int.from_bytes(_blake("treeprobe-sample-file", seed, label)[:8], "little")
         + (row + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_stratum_key(seed: int, lin: tuple) -> tuple[int, int]:
    h = _blake("treeprobe-sample-stratum", seed, *lin)
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def ref_sample(rows: pd.DataFrame, size: int, seed: int) -> set:
    """{(file label, row)} of the rule over ``rows`` (columns label, row, stratum tuple ``lin``)."""
    n = rows.groupby("lin").size()
    if n.sum() <= size:
        alloc = n.copy()
    else:
        m = 0
        while np.minimum(n, m + 1).sum() <= size:
            m += 1
        alloc = np.minimum(n, m)
        extra = size - int(alloc.sum())
        above = sorted((ref_stratum_key(seed, lin), lin) for lin in n.index[n > m])
        for _, lin in above[:extra]:
            alloc[lin] += 1
    out = set()
    for lin, g in rows.groupby("lin"):
        keys = sorted((ref_key(seed, lab, r), lab, r) for lab, r in zip(g.label, g.row))
        out |= {(lab, r) for _, lab, r in keys[:alloc[lin]]}
    return out


# --- data -------------------------------------------------------------------------------------------------


def _lineages(rng, sizes, n_unknown):
    """Items of species s (sizes[s] of them) under 2 kingdoms / 3 families; n_unknown items unknown at
    species under family 0 or 1."""
    rows = []
    for s, k in enumerate(sizes):
        fam = s % 3
        rows += [dict(kingdom=f"K{fam % 2}", phylum="P", **{"class": "C"}, order="O", family=f"F{fam}",
                      genus=f"G{s}", species=f"G{s} s{s}")] * k
    for j in range(n_unknown):
        rows.append(dict(kingdom="K0", phylum="P", **{"class": "C"}, order="O", family=f"F{j % 2 * 2}",
                         genus="", species=""))
    df = pd.DataFrame(rows)
    return df.iloc[rng.permutation(len(df))].reset_index(drop=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 parquet shards (rows shuffled, so species span files), 6-d list<float32> embeddings, row groups of
    16 rows, a ``uuid`` and an ``img_type`` column; a few bad rows (null, NaN, zero, no kingdom)."""
    rng = np.random.default_rng(3)
    sizes = np.r_[rng.geometric(0.05, 24).clip(1, 90), [1, 1, 2, 3, 150]]
    items = _lineages(rng, sizes, 25)
    n = len(items)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    X[5] = np.nan
    X[9] = 0
    items.loc[12, "kingdom"] = ""
    items["uuid"] = [f"id{i:05d}" for i in range(n)]
    items["img_type"] = rng.choice(["museum", "citizen"], n)
    emb = [list(map(float, x)) for x in X]
    emb[20] = None
    table = pa.Table.from_pandas(items, preserve_index=False).append_column(
        "emb", pa.array(emb, type=pa.list_(pa.float32())))
    folder = tmp_path_factory.mktemp("sample_shards")
    cuts = np.linspace(0, n, 7).astype(int)
    paths = []
    for j in range(6):
        p = str(folder / f"shard{j}.parquet")
        pq.write_table(table.slice(cuts[j], cuts[j + 1] - cuts[j]), p, row_group_size=16)
        paths.append(p)
    return dict(paths=paths, table=table, X=X, folder=str(folder))


def _eligible_rows(d, where_img=None) -> pd.DataFrame:
    """The rows the statistics use, read back from the files with pyarrow (label, row, lin, unit vector)."""
    out = []
    for p in d["paths"]:
        t = pq.read_table(p)
        items = t.drop_columns(["emb"]).to_pandas()
        emb = t.column("emb").to_pylist()
        for i, e in enumerate(emb):
            if e is None or items.kingdom[i] == "":
                continue
            x = np.asarray(e, dtype=np.float32)
            if not np.isfinite(x).all() or not x.any():
                continue
            if where_img is not None and items.img_type[i] != where_img:
                continue
            out.append(dict(label=p.rsplit("/", 1)[-1], row=i, lin=tuple(items.loc[i, list(RANKS)].str.casefold()),
                            unit=x / np.linalg.norm(x), uuid=items.uuid[i], img_type=items.img_type[i]))
    return pd.DataFrame(out)


def _pairs(st) -> set:
    df = st.sample_items()
    return set(zip(df.source_file.str.rsplit("/", n=1).str[-1], df.source_row))


def _assert_same_sample(a, b):
    pd.testing.assert_frame_equal(a.sample_items(), b.sample_items())
    va, vb = a.sample_vectors(), b.sample_vectors()
    assert va.dtype == np.float32 and va.shape == vb.shape
    assert va.tobytes() == vb.tobytes()  # bit-identical
    ia, ib = a.sample_info, b.sample_info
    for k in ("size", "seed", "cap", "n_extra", "n_sampled", "n_strata", "n_strata_whole", "n_rows", "n_items"):
        assert ia[k] == ib[k], k


# --- the rule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, seed", [(120, 0), (120, 7), (40, 1), (20, 2), (5000, 0)])
def test_sample_is_the_documented_rule_over_all_rows(shards, size, seed):
    """size 120: cap m with small species whole; 20 < 31 strata: m = 0, 20 strata one item each; 5000: all."""
    st = species_statistics(shards["paths"], sample=size, sample_seed=seed, batch_rows=50, progress=False)
    rows = _eligible_rows(shards)
    assert st.n_items == len(rows)
    assert _pairs(st) == ref_sample(rows, size, seed)
    info = st.sample_info
    assert info["n_sampled"] == min(size, len(rows)) == len(st.sample_items())
    n_strata = rows.lin.nunique()
    assert info["n_strata"] == n_strata
    if size >= len(rows):
        assert info["cap"] is None and info["n_strata_whole"] == n_strata
    if size < n_strata:
        assert info["cap"] == 0 and info["n_extra"] == size


def test_per_stratum_counts_follow_the_cap(shards):
    size = 150
    st = species_statistics(shards["paths"], sample=size, progress=False)
    rows = _eligible_rows(shards)
    n = rows.groupby("lin").size()
    df = st.sample_items()
    got = df.groupby([df[r].str.casefold() for r in RANKS]).size()
    got.index = got.index.to_flat_index()
    got = got.reindex(n.index, fill_value=0)
    m = st.sample_info["cap"]
    assert m is not None and 1 <= m < n.max()
    assert np.minimum(n, m).sum() <= size < np.minimum(n, m + 1).sum()  # the largest such m
    assert (got[n <= m] == n[n <= m]).all()  # small strata kept whole
    big = got[n > m]
    assert set(big.unique()) <= {m, m + 1}  # big ones at the cap (a few one above: the left-over items)
    assert (big == m + 1).sum() == st.sample_info["n_extra"] == size - np.minimum(n, m).sum()
    assert got.sum() == size
    # the weights are n_s / sampled_s: they add up to the items
    w = df.groupby([df[r].str.casefold() for r in RANKS]).sample_weight.sum()
    assert abs(w.sum() - len(rows)) < 1e-9
    # the 25 items unknown at species fall in 2 strata (one per parent), not 25
    unknown = got[[lin for lin in got.index if lin[-1] == ""]]
    assert len(unknown) == 2


def test_sample_vectors_are_the_rows_unit_vectors(shards):
    st = species_statistics(shards["paths"], sample=100, sample_columns=("uuid",), covariate="img_type",
                            progress=False)
    rows = _eligible_rows(shards).set_index(["label", "row"])
    df = st.sample_items()
    keys = list(zip(df.source_file.str.rsplit("/", n=1).str[-1], df.source_row))
    ref_unit = np.stack(rows.loc[keys, "unit"].to_numpy())
    ds = st.sample_data()
    assert len(ds) == 100 and ds.X.dtype == np.float32
    np.testing.assert_allclose(ds.unit, ref_unit, rtol=0, atol=2e-7)
    # bit for bit the rows of the in-memory TreeData.unit of the same files
    mem = [load_embeddings(f) for f in shards["paths"]]
    where = {u: (j, i) for j, d in enumerate(mem) for i, u in enumerate(d.items.uuid)}
    in_memory = np.stack([mem[where[u][0]].unit[where[u][1]] for u in df.uuid])
    assert ds.unit.tobytes() == in_memory.tobytes()
    # the raw rows as stored, the covariate and extra columns as read
    table = shards["table"]
    X = shards["X"]
    uu = table.column("uuid").to_pylist()
    pos = [uu.index(u) for u in df.uuid]
    assert np.array_equal(st.sample_vectors(), X[pos])
    assert list(df.img_type) == list(rows.loc[keys, "img_type"])
    assert list(df.uuid) == list(rows.loc[keys, "uuid"])
    # lineages: the statistics' spelling; metadata for the report
    assert list(ds.items.genus) == [st._spelling("genus", lin[5]) for lin in rows.loc[keys, "lin"]]
    info = ds.uns["sample"]
    assert info["size"] == 100 and info["seed"] == 0 and info["n_rows"] == len(table)
    assert info["rule"] == stream.SAMPLE_RULE and "sample" in info["from_sample"]
    knn = tl.knn(ds, k=3, seed=0)  # a tool that needs items runs on it
    assert len(knn) > 0


# --- invariance: batching, file order, partition, merge -----------------------------------------------------


def test_batch_rows_and_blocks_change_nothing(shards, monkeypatch):
    ref = species_statistics(shards["paths"], sample=90, sample_seed=3, batch_rows=1000, progress=False)
    monkeypatch.setattr(stream, "_BLOCK", 5)
    got = species_statistics(shards["paths"], sample=90, sample_seed=3, batch_rows=7, progress=False)
    _assert_same_sample(ref, got)
    backwards = species_statistics(shards["paths"][::-1], sample=90, sample_seed=3, batch_rows=13, progress=False)
    _assert_same_sample(ref, backwards)


@pytest.mark.parametrize("size", [60, 25])
def test_merged_passes_over_disjoint_files_equal_one_pass(shards, size):
    p = shards["paths"]
    whole = species_statistics(p, sample=size, sample_seed=5, progress=False)
    for groups in ([[0, 1, 2], [3, 4, 5]], [[5], [0, 3], [1, 2, 4]], [[j] for j in range(6)]):
        parts = [species_statistics([p[j] for j in g], sample=size, sample_seed=5, batch_rows=11, progress=False)
                 for g in groups]
        merged = parts[0]
        for q in parts[1:]:
            merged = merged.merge(q)
        _assert_same_sample(whole, merged)
        tree = parts[-1]  # another merge order and grouping
        for q in parts[-2::-1]:
            tree = q.merge(tree)
        _assert_same_sample(whole, tree)
    assert whole.sample_info["cap"] >= 0 and whole.sample_info["n_sampled"] == size


def test_candidates_stay_bounded_during_the_pass(shards, monkeypatch):
    """At most 2·size + batch_rows candidates are held; at the end exactly the sample."""
    seen = []
    orig = stream._Sample.add

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self.p_key.n)

    monkeypatch.setattr(stream._Sample, "add", spy)
    st = species_statistics(shards["paths"], sample=15, batch_rows=20, progress=False)
    assert len(seen) > 10 and max(seen) <= 2 * 15 + 20
    assert st._sample.p_key.n == 15


# --- filters and rows set aside ----------------------------------------------------------------------------


def test_where_and_rows_set_aside_never_enter(shards):
    st = species_statistics(shards["paths"], sample=10_000, where={"img_type": "museum"}, progress=False)
    rows = _eligible_rows(shards, where_img="museum")
    assert _pairs(st) == set(zip(rows.label, rows.row))  # all of them (size above N), nothing else
    df = st.sample_items()
    assert (df.img_type == "museum").all()
    bad = {("shard0.parquet", r) for r in (5, 9, 12, 20)}  # NaN, zero, no kingdom, null emb (all in shard 0)
    assert not bad & _pairs(st)
    small = species_statistics(shards["paths"], sample=40, sample_seed=2, where={"img_type": "museum"},
                               progress=False)
    assert _pairs(small) == ref_sample(rows, 40, 2)
    assert small.sample_info["n_items"] == len(rows) < small.sample_info["n_rows"]


def test_drop_unknown_species_leaves_them_out(shards):
    st = species_statistics(shards["paths"], sample=10_000, drop_unknown_species=True, progress=False)
    assert (st.sample_items().species != "").all() and st.sample_info["n_sampled"] == st.n_items


# --- the seed and uniformity ----------------------------------------------------------------------------------


def test_the_seed_changes_the_sample_not_its_allocation(shards):
    a = species_statistics(shards["paths"], sample=120, sample_seed=0, progress=False)
    b = species_statistics(shards["paths"], sample=120, sample_seed=1, progress=False)
    assert a.sample_info["cap"] == b.sample_info["cap"]
    pa_, pb = _pairs(a), _pairs(b)
    assert len(pa_) == len(pb) == 120
    assert len(pa_ & pb) < 100  # the kept-whole strata are shared, the rest is redrawn


def test_rows_of_a_stratum_are_drawn_uniformly(tmp_path):
    """Over 300 seeds, each of the 30 rows of the big stratum is drawn with frequency ≈ a/30 (Pearson
    statistic against χ²₂₉ scaled by 1 − p), and the one left-over item goes to either big stratum
    about half the time."""
    n_big, T = 30, 300
    lin = pd.DataFrame({r: ["x"] * (n_big + 20 + 4) for r in RANKS})
    lin["species"] = ["big"] * n_big + ["other"] * 20 + ["tiny"] * 4
    X = np.random.default_rng(0).normal(size=(len(lin), 3)).astype(np.float32)
    t = pa.Table.from_pandas(lin, preserve_index=False).append_column("emb", pa.array(list(X)))
    paths = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    pq.write_table(t.slice(0, 31), paths[0])
    pq.write_table(t.slice(31), paths[1])
    size = 4 + 8 + 8 + 1  # cap 8: tiny whole, 8 each, one left over
    counts = np.zeros(n_big)
    extra_to_big = 0
    for seed in range(T):
        st = species_statistics(paths, sample=size, sample_seed=seed, progress=False)
        df = st.sample_items()
        big = df[df.species == "big"]
        assert st.sample_info["cap"] == 8 and (df.species == "tiny").sum() == 4
        counts[big.source_row.to_numpy()] += 1  # the big rows are rows 0..29 of a.parquet
        extra_to_big += len(big) == 9
    p = counts.sum() / (T * n_big)
    assert abs(p - (8 + 0.5) / n_big) < 0.03
    E = T * p
    stat = ((counts - E) ** 2 / E).sum() / (1 - p)
    assert stat < sps.chi2.ppf(0.999, n_big - 1), (stat, counts)
    assert sps.binomtest(extra_to_big, T, 0.5).pvalue > 1e-3
    assert counts.min() > 0


# --- merging rules, file labels, errors --------------------------------------------------------------------


def test_merge_refuses_different_settings_and_drops_a_one_sided_sample(shards):
    p = shards["paths"]
    a = species_statistics(p[:3], sample=50, progress=False)
    for kw in (dict(sample=51), dict(sample=50, sample_seed=1), dict(sample=50, sample_columns=("uuid",))):
        with pytest.raises(TreeprobeError, match="different settings"):
            a.merge(species_statistics(p[3:], progress=False, **kw))
    plain = species_statistics(p[3:], progress=False)
    with pytest.warns(TreeprobeWarning, match="no sample"):
        out = a.merge(plain)
    assert not out.has_sample and out.n_items == a.n_items + plain.n_items
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both_plain = species_statistics(p[:3], progress=False).merge(plain)
    assert not both_plain.has_sample
    with pytest.raises(TreeprobeError, match="no sample"):
        both_plain.sample_data()


def test_same_file_names_need_a_sample_root(shards, tmp_path):
    t = shards["table"]
    for sub in ("eol", "gbif"):
        (tmp_path / sub).mkdir()
    pq.write_table(t.slice(0, 200), tmp_path / "eol" / "part0.parquet")
    pq.write_table(t.slice(200), tmp_path / "gbif" / "part0.parquet")
    files = [str(tmp_path / "eol" / "part0.parquet"), str(tmp_path / "gbif" / "part0.parquet")]
    with pytest.raises(TreeprobeError, match="sample_root"):
        species_statistics(files, sample=50, progress=False)
    a = species_statistics(files[:1], sample=50, progress=False)
    b = species_statistics(files[1:], sample=50, progress=False)
    with pytest.raises(TreeprobeError, match="sample_root"):
        a.merge(b)
    whole = species_statistics(str(tmp_path), sample=50, sample_root=tmp_path, progress=False)
    merged = species_statistics(files[:1], sample=50, sample_root=tmp_path, progress=False).merge(
        species_statistics(files[1:], sample=50, sample_root=tmp_path, progress=False))
    _assert_same_sample(whole, merged)
    assert whole.sample_info["file_labels"] == "path relative to sample_root"
    rows = pd.DataFrame([dict(label=lab, row=r, lin=lin) for lab, f in (("eol/part0.parquet", 0),
                                                                         ("gbif/part0.parquet", 1))
                         for r, lin in _file_rows(files[f])])
    got = set(zip(whole.sample_items().source_file.map(lambda s: s[len(str(tmp_path)) + 1:]),
                  whole.sample_items().source_row))
    assert got == ref_sample(rows, 50, 0)


def _file_rows(path):
    t = pq.read_table(path)
    items = t.drop_columns(["emb"]).to_pandas()
    for i, e in enumerate(t.column("emb").to_pylist()):
        x = None if e is None else np.asarray(e, dtype=np.float32)
        if x is None or items.kingdom[i] == "" or not np.isfinite(x).all() or not x.any():
            continue
        yield i, tuple(items.loc[i, list(RANKS)].str.casefold())


def test_sample_argument_errors(shards, tmp_path):
    p = shards["paths"]
    with pytest.raises(TreeprobeError, match="sample must be"):
        species_statistics(p, sample=0, progress=False)
    with pytest.raises(TreeprobeError, match="integer"):
        species_statistics(p, sample=1.5, progress=False)
    with pytest.raises(TreeprobeError, match="need sample"):
        species_statistics(p, sample_columns=("uuid",), progress=False)
    with pytest.raises(TreeprobeError, match="clashes"):
        species_statistics(p, sample=5, sample_columns=("source_row",), progress=False)
    with pytest.raises(TreeprobeError, match="no column 'nope'"):
        species_statistics(p, sample=5, sample_columns=("nope",), progress=False)
    with pytest.raises(TreeprobeError, match="not under sample_root"):
        species_statistics(p, sample=5, sample_root=tmp_path, progress=False)
    with pytest.raises(TreeprobeError, match="not a folder"):
        species_statistics(p, sample=5, sample_root=tmp_path / "missing", progress=False)


def test_npy_source_samples_the_metadata_rows(shards, tmp_path):
    t = shards["table"]
    keep = [i for i, e in enumerate(t.column("emb").to_pylist()) if e is not None]
    t = t.take(keep)
    X = np.stack(t.column("emb").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.save(tmp_path / "emb.npy", X)
    t.drop_columns(["emb"]).to_pandas().to_csv(tmp_path / "metadata.csv", index=False)
    st = species_statistics(tmp_path / "emb.npy", sample=60, sample_columns=("uuid",), progress=False)
    df = st.sample_items()
    assert len(df) == 60 and (df.source_file.str.endswith("metadata.csv")).all()
    assert np.array_equal(st.sample_vectors(), X[df.source_row.to_numpy()])
    assert list(df.uuid) == [t.column("uuid")[i].as_py() for i in df.source_row]


def test_statistics_unchanged_by_the_sample_and_none_by_default(shards):
    import pickle

    plain = species_statistics(shards["paths"], gram=True, progress=False)
    with_sample = species_statistics(shards["paths"], gram=True, sample=50, progress=False)
    assert not plain.has_sample and plain.summary()["sample"] is None
    np.testing.assert_array_equal(plain.counts, with_sample.counts)
    assert plain.sums.tobytes() == with_sample.sums.tobytes()
    assert plain.gram.tobytes() == with_sample.gram.tobytes()
    assert with_sample.summary()["sample"]["n_sampled"] == 50
    _assert_same_sample(with_sample, pickle.loads(pickle.dumps(with_sample)))  # partials travel (Dask)
