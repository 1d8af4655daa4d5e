"""treeprobe.stream: species statistics of one streaming pass equal the in-memory numbers.

Reference: the in-memory path (data.load_embeddings → TreeData → tl.mantel / tl.physignal) on the same rows.
"""

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from treeprobe import mantel as M
from treeprobe import stream, tl
from treeprobe.data import load_embeddings
from treeprobe.datasets import BIOCLIP2_1K
from treeprobe.errors import TreeprobeError
from treeprobe.stream import mantel_from_stats, physignal_from_stats, species_statistics
from treeprobe.taxonomy import RANKS

from tests._helpers import spy_mantel_permutations

TOL = 1e-12


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(r, "ascending") for r in RANKS])


def _float16_fixed(table: pa.Table) -> pa.Table:
    """The ``emb`` column as fixed_size_list<halffloat> (the TreeOfLife-200M layout)."""
    emb = np.stack(table.column("emb").to_numpy(zero_copy_only=False)).astype(np.float16)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    return table.set_column(table.schema.get_field_index("emb"), "emb", col)


def _split_inside_species(table: pa.Table, k: int) -> list[int]:
    """k − 1 cut points, each inside a run of one species (so a species spans two shards)."""
    sp = table.column("species").to_pylist()
    gn = table.column("genus").to_pylist()
    inside = [i for i in range(1, len(sp)) if sp[i] and sp[i] == sp[i - 1] and gn[i] == gn[i - 1]]
    return [inside[int(j * len(inside) / k)] for j in range(1, k)]


def _write_shards(table: pa.Table, folder, cuts, prefix="part", **kw) -> list[str]:
    bounds = [0, *cuts, len(table)]
    paths = []
    for j in range(len(bounds) - 1):
        p = str(folder / f"{prefix}{j:02d}.parquet")
        pq.write_table(table.slice(bounds[j], bounds[j + 1] - bounds[j]), p, **kw)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def tol(tmp_path_factory):
    """The bundled 1,030 real BioCLIP 2 rows sorted by taxonomy, float16 fixed-size lists: one file and
    3 shards cut inside species; with the in-memory TreeData of the whole file."""
    folder = tmp_path_factory.mktemp("tol")
    table = _float16_fixed(_sorted(pq.read_table(BIOCLIP2_1K)))
    whole = str(folder / "all.parquet")
    pq.write_table(table, whole)
    shard_dir = folder / "shards"
    shard_dir.mkdir()
    shards = _write_shards(table, shard_dir, _split_inside_species(table, 3))
    return dict(whole=whole, shards=shards, folder=str(shard_dir), ds=load_embeddings(whole), table=table)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A simulated world (8-d, up to 20 images per species: Grams above D rows), sorted, 20 rows unknown at
    species, ``emb`` as list<float32>, row groups of 64 rows, 4 shards cut inside species."""
    from treeprobe.simulate import simulate_world

    w = simulate_world(n_kingdoms=2, branching=[2, 2, 2, 2, 2, (2, 4)], images_per_species=(1, 20), dim=8, seed=4)
    items = w.items[list(RANKS)].copy()
    rng = np.random.default_rng(0)
    items.loc[rng.choice(len(items), 20, replace=False), "species"] = ""
    items["img_type"] = rng.choice(["museum", "citizen"], len(items))
    table = pa.Table.from_pandas(items, preserve_index=False)
    table = table.append_column("emb", pa.array(list(w.embeddings.astype(np.float32))))
    table = _sorted(table)
    folder = tmp_path_factory.mktemp("world")
    whole = str(folder / "all.parquet")
    pq.write_table(table, whole, row_group_size=64)
    shard_dir = folder / "shards"
    shard_dir.mkdir()
    shards = _write_shards(table, shard_dir, _split_inside_species(table, 4), row_group_size=64)
    return dict(whole=whole, shards=shards, ds=load_embeddings(whole), table=table)


def _in_memory_units(ds):
    """(unit codes (N,), S) of tl.mantel's species-level tests on ``ds``."""
    _, clades, units, _, _ = tl._mantel_inputs(ds, None, None)
    return units, int(units.max()) + 1


def _compare_tables(ref: pd.DataFrame, got: pd.DataFrame):
    assert list(ref.level) == list(got.level) and list(ref.scheme) == list(got.scheme)
    assert list(ref.method) == list(got.method)
    from_stats = got.estimator != stream.NOT_FROM_STATS
    assert from_stats.sum() >= 2
    np.testing.assert_allclose(got.statistic[from_stats], ref.statistic[from_stats], rtol=0, atol=TOL)
    assert (got.p_value[from_stats].to_numpy() == ref.p_value[from_stats].to_numpy()).all()
    assert (got.n_items[from_stats].to_numpy() == ref.n_items[from_stats].to_numpy()).all()
    assert (got.n_pairs[from_stats].to_numpy() == ref.n_pairs[from_stats].to_numpy()).all()
    return from_stats


# --- the sums themselves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tol", "world"])
def test_species_sums_equal_the_in_memory_sums(name, request):
    d = request.getfixturevalue(name)
    ds = d["ds"]
    st = species_statistics(d["whole"], gram=True, progress=False)
    units, S = _in_memory_units(ds)
    Su, sq = M._species_vector_sums(ds.unit, units, S)
    assert st.n_units == S and st.n_items == len(ds)
    np.testing.assert_array_equal(st.counts, np.bincount(units))
    np.testing.assert_allclose(st.sums, Su, rtol=0, atol=TOL)
    assert abs(st.sq.sum() - sq) < TOL * len(ds)
    X64 = ds.unit.astype(np.float64)
    X64 /= np.linalg.norm(X64, axis=1)[:, None]
    np.testing.assert_allclose(st.gram, X64.T @ X64, rtol=0, atol=TOL * len(ds))
    sizes = np.bincount(units)
    mu = M._Units(codes=units, sizes=sizes, node=np.zeros(S, np.int64), strata=sizes)
    _, g2w = M._unit_sums(ds.unit, 1.0 / np.linalg.norm(ds.unit.astype(np.float64), axis=1), mu)
    assert abs(st.within.sum() - g2w) < TOL * g2w
    # the unit lineages are the in-memory tree leaves' lineages
    first = pd.Series(np.arange(len(ds))).groupby(units).first().to_numpy()
    lin = ds.taxonomy.lineages.iloc[first].reset_index(drop=True)
    pd.testing.assert_frame_equal(st.lineages, lin[list(RANKS)], check_dtype=False)
    assert st.within_exact
    assert st.n_skipped == ds.skipped.reason.value_counts().to_dict()
    np.testing.assert_allclose(np.linalg.norm(st.centroids(), axis=1), 1.0, atol=1e-14)


# --- the tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, methods", [("tol", ("pearson", "spearman")), ("world", ("pearson",))])
def test_mantel_table_equals_tl_mantel_same_seed(name, methods, request, monkeypatch):
    d = request.getfixturevalue(name)
    opts = dict(methods=methods, permute=("species", "images"), permutations=29, seed=5)
    spy = spy_mantel_permutations(monkeypatch)
    ref = tl.mantel(d["ds"], **opts)
    ref_perm = list(spy)
    spy.clear()
    st = species_statistics(d["whole"], gram=True, progress=False)
    got = mantel_from_stats(st, **opts)
    from_stats = _compare_tables(ref, got)
    # the rows that need items: image-level Spearman and image permutations
    expect = ~((got.level == "species-centroid") | ((got.scheme == "species") & (got.method == "pearson")))
    assert (~from_stats == expect).all()
    # every permuted statistic the stats path computed equals the in-memory one (same draws)
    ref_rows = [k for k in range(len(ref)) if from_stats.iloc[k]]
    assert len(spy) == len(ref_rows)
    for k, perm in zip(ref_rows, spy):
        np.testing.assert_allclose(perm, ref_perm[k], rtol=0, atol=TOL)
    assert np.ptp(spy[0]) > 0.01  # a real null distribution, not constants


def test_image_level_p_value_is_not_trivial(world):
    """On a world with little signal the p-value is inside (0, 1): equality is a real check."""
    ds = world["ds"]
    noisy = ds.copy()
    noisy.X = np.random.default_rng(1).normal(size=ds.X.shape).astype(np.float32)
    noisy._unit = None
    ref = tl.mantel(noisy, methods=("pearson",), permutations=99, seed=2)
    table = world["table"]
    table = table.set_column(table.schema.get_field_index("emb"), "emb", pa.array(list(noisy.X)))
    path = world["whole"].replace("all.parquet", "noisy.parquet")
    pq.write_table(table, path)
    got = mantel_from_stats(species_statistics(path, gram=True, progress=False), methods=("pearson",),
                            permutations=99, seed=2)
    assert (0.05 < ref.p_value).all() and (ref.p_value < 0.95).all()
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=0, atol=TOL)
    assert (got.p_value.to_numpy() == ref.p_value.to_numpy()).all()


@pytest.mark.parametrize("permute", ["size-strata", "free"])
def test_physignal_equals_tl_physignal(tol, permute):
    ref = tl.physignal(tol["ds"], permutations=49, seed=3, permute=permute)
    got = physignal_from_stats(species_statistics(tol["whole"], progress=False), permutations=49, seed=3,
                               permute=permute)
    assert abs(got.statistic - ref.statistic) < TOL
    assert got.p_value == ref.p_value and abs(got.z - ref.z) < 1e-9
    np.testing.assert_allclose(got.random_statistics, ref.random_statistics, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.per_axis.K, ref.per_axis.K, rtol=1e-9)
    assert got.n_species == ref.n_species


def test_physignal_plain_means_close(tol):
    ref = tl.physignal(tol["ds"], permutations=0, renormalise=False)
    got = physignal_from_stats(species_statistics(tol["whole"], progress=False), permutations=0, renormalise=False)
    assert abs(got.statistic - ref.statistic) < 1e-6 * ref.statistic


# --- merging and batching ---------------------------------------------------------------------------------


def _assert_same_stats(a, b):
    np.testing.assert_array_equal(a.counts, b.counts)
    pd.testing.assert_frame_equal(a.lineages, b.lineages)
    np.testing.assert_allclose(a.sums, b.sums, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.sq, b.sq, rtol=0, atol=TOL)
    if a.gram_enabled:
        np.testing.assert_allclose(a.within, b.within, rtol=0, atol=TOL * max(1.0, float(a.within.max())))
        np.testing.assert_allclose(a.gram, b.gram, rtol=0, atol=TOL * a.n_items)
        assert a.within_exact and b.within_exact
    assert a.n_skipped == b.n_skipped and a.n_rows == b.n_rows


@pytest.mark.parametrize("name", ["tol", "world"])
def test_merged_shards_equal_one_pass_in_any_order(name, request):
    d = request.getfixturevalue(name)
    whole = species_statistics(d["whole"], gram=True, progress=False)
    parts = [species_statistics(p, gram=True, progress=False) for p in d["shards"]]
    forward = parts[0]
    for p in parts[1:]:
        forward = forward.merge(p)
    backward = parts[-1]
    for p in parts[-2::-1]:
        backward = backward.merge(p)
    _assert_same_stats(whole, forward)
    _assert_same_stats(whole, backward)
    one_call = species_statistics(d["shards"], gram=True, progress=False)  # the shards as one stream
    _assert_same_stats(whole, one_call)
    ref = mantel_from_stats(whole, permutations=19, seed=1)
    got = mantel_from_stats(backward, permutations=19, seed=1)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=0, atol=TOL)
    assert (got.p_value.to_numpy() == ref.p_value.to_numpy()).all()
    with pytest.raises(TreeprobeError, match="twice"):
        parts[0].merge(parts[0])


def test_folder_and_glob_sources(tol):
    a = species_statistics(tol["folder"], progress=False)
    b = species_statistics(tol["folder"] + "/part*.parquet", progress=False)
    _assert_same_stats(a, b)
    assert len(a.files) == 3


def test_small_batches_and_blocks_change_nothing(world, monkeypatch):
    ref = species_statistics(world["whole"], gram=True, progress=False)
    monkeypatch.setattr(stream, "_BLOCK", 7)
    got = species_statistics(world["whole"], gram=True, batch_rows=13, progress=False)
    _assert_same_stats(ref, got)


# --- rows set aside, names, filters, other layouts --------------------------------------------------------


def test_rows_set_aside_and_names_as_the_in_memory_loader(tmp_path):
    rng = np.random.default_rng(0)
    n, D = 40, 6
    X = rng.normal(size=(n, D)).astype(np.float16)
    lin = pd.DataFrame({r: ["x"] * n for r in RANKS})
    lin["kingdom"] = ["Animalia"] * 20 + ["animalia"] * 5 + ["Plantae"] * 11 + ["Incertae sedis", None, "", "Fungi"]
    lin["genus"] = ["Parus"] * 10 + ["Par us"] * 2 + ["Parus\u00a0"] * 3 + ["Felis"] * 25
    lin["species"] = (["major"] * 6 + ["MAJOR"] * 2 + ["unknown"] * 4 + ["minor"] * 28)
    X[3] = np.nan
    X[7] = 0
    X[30, 2] = np.inf
    emb = [list(map(float, x)) for x in X]
    emb[11] = None
    table = pa.Table.from_pandas(lin, preserve_index=False).append_column(
        "emb", pa.array(emb, type=pa.list_(pa.float16())))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_embeddings(path)
    st = species_statistics(path, progress=False)
    assert st.n_skipped == ds.skipped.reason.value_counts().to_dict()
    assert st.n_skipped["no taxonomy (missing kingdom)"] == 3
    assert st.n_items == len(ds) and st.n_rows == n
    units, S = _in_memory_units(ds)
    assert st.n_units == S
    first = pd.Series(np.arange(len(ds))).groupby(units).first().to_numpy()
    pd.testing.assert_frame_equal(st.lineages, ds.taxonomy.lineages.iloc[first].reset_index(drop=True)[list(RANKS)],
                                  check_dtype=False)
    assert "animalia" not in set(st.lineages.kingdom)  # spelled as the most frequent variant
    np.testing.assert_allclose(st.sums, M._species_vector_sums(ds.unit, units, S)[0], rtol=0, atol=TOL)


def test_where_filters_rows_like_a_clade_slice(world):
    ds = world["ds"]
    kingdom = ds.items.kingdom.iloc[0]
    sub = ds[kingdom]
    st = species_statistics(world["whole"], where={"kingdom": kingdom.upper()}, gram=True, progress=False)
    assert st.n_items == len(sub) and st.n_filtered == len(ds) - len(sub)
    assert st.n_rows == len(world["table"])  # every row accounted for, skipped row groups included
    ref = tl.mantel(sub, methods=("pearson",), permutations=19, seed=0)
    got = mantel_from_stats(st, methods=("pearson",), permutations=19, seed=0)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=0, atol=TOL)
    assert (got.p_value.to_numpy() == ref.p_value.to_numpy()).all()
    with pytest.raises(TreeprobeError, match="no"):
        species_statistics(world["whole"], where={"class": "no such class"}, progress=False).lineages


def test_covariate_sums_per_species_and_category(world):
    ds = world["ds"]
    st = species_statistics(world["whole"], covariate="img_type", progress=False)
    units, S = _in_memory_units(ds)
    unit, cat, counts, sums, sq = st.covariate_table()
    df = pd.DataFrame({"u": units, "c": ds.items.img_type.to_numpy()})
    ref_counts = df.groupby(["u", "c"]).size()
    assert list(zip(unit, cat)) == list(ref_counts.index)
    np.testing.assert_array_equal(counts, ref_counts.to_numpy())
    U = ds.unit.astype(np.float64)
    U /= np.linalg.norm(U, axis=1)[:, None]
    ref_sums = pd.DataFrame(U).groupby([df.u, df.c]).sum().to_numpy()
    np.testing.assert_allclose(sums, ref_sums, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.bincount(unit, weights=counts), st.counts)


@pytest.mark.parametrize("name, scheme", [("world", "auto"), ("world", "species"), ("tol", "auto")])
def test_partial_mantel_from_stats_equals_the_in_memory_test(name, scheme, request):
    """Shards cut inside species, read in one pass (and merged from two), against partial_mantel_tree on the
    whole file: r_dt, r_dz, r_tz and the partial r to 1e-12, the same permutations hence the same p-values.
    tol: the real BioCLIP 2 rows (float16), 8 image types; world: 2 types, items of unknown species."""
    from treeprobe.partial_mantel import partial_mantel_tree

    w = request.getfixturevalue(name)
    ds = w["ds"]
    X_m, clades, _, _, _ = tl._mantel_inputs(ds, None, None)
    ref = partial_mantel_tree(X_m, clades, ds.items.img_type.to_numpy(), name="img_type", permutations=49,
                              seed=11, permutation=scheme)
    one = species_statistics(w["shards"], gram=True, covariate="img_type", progress=False)
    a = species_statistics(w["shards"][:2], gram=True, covariate="img_type", progress=False)
    b = species_statistics(w["shards"][2:], gram=True, covariate="img_type", progress=False)
    for st in (one, b.merge(a)):
        got = stream.partial_mantel_from_stats(st, permutations=49, seed=11, permutation=scheme)
        for key in ("statistic", "r_dt", "r_dz", "r_tz"):
            assert getattr(got, key) == pytest.approx(getattr(ref, key), abs=TOL), key
        assert (got.p_value, got.mantel_p_value, got.n_pairs, got.n_items, got.n_species, got.permutation) == \
            (ref.p_value, ref.mantel_p_value, ref.n_pairs, ref.n_items, ref.n_species, ref.permutation)
        assert got.details["n_permutable_units"] == ref.details["n_permutable_units"]
        np.testing.assert_allclose(got.permuted_statistics, ref.permuted_statistics, rtol=0, atol=1e-10)
        assert got.control == ref.control
    if name == "tol":  # real image types follow the tree and the embeddings: the covariate terms matter
        assert abs(ref.r_dz) > 0.05 and abs(ref.r_tz) > 0.05


def test_mantel_from_stats_control_row_equals_tl_mantel(world):
    ds = world["ds"]
    ref = tl.mantel(ds, control="img_type", permutations=19, seed=3)
    st = species_statistics(world["shards"], gram=True, covariate="img_type", progress=False)
    got = mantel_from_stats(st, methods=("pearson", "spearman"), control="img_type", permutations=19, seed=3)
    assert got.iloc[-1].level == ref.iloc[-1].level == "image | img_type"
    assert got.iloc[-1].p_value == ref.iloc[-1].p_value  # the partial test's seed: the next draw, as tl.mantel
    assert got.iloc[-1].statistic == pytest.approx(ref.iloc[-1].statistic, abs=TOL)
    marked = mantel_from_stats(st, control="img_type", control_kind="numeric", permutations=0, strict=False)
    assert marked.iloc[-1].estimator == stream.NOT_FROM_STATS
    with pytest.raises(TreeprobeError, match="numeric control"):
        mantel_from_stats(st, control="img_type", control_kind="numeric", permutations=0)


def test_partial_mantel_from_stats_refuses_what_it_cannot_do(world, tmp_path):
    with pytest.raises(TreeprobeError, match="covariate=COLUMN"):
        stream.partial_mantel_from_stats(species_statistics(world["whole"], gram=True, progress=False))
    st = species_statistics(world["whole"], covariate="img_type", progress=False)
    with pytest.raises(TreeprobeError, match="gram=True"):
        stream.partial_mantel_from_stats(st)
    st = species_statistics(world["whole"], gram=True, covariate="img_type", progress=False)
    with pytest.raises(TreeprobeError, match="not 'batch'"):
        stream.partial_mantel_from_stats(st, name="batch")
    with pytest.raises(TreeprobeError, match="permutation scheme"):
        stream.partial_mantel_from_stats(st, permutation="images")
    t = world["table"]
    z = t.column("img_type").to_pylist()
    z[5] = None
    path = str(tmp_path / "missing.parquet")
    pq.write_table(t.set_column(t.schema.get_field_index("img_type"), "img_type", pa.array(z)), path)
    with pytest.raises(TreeprobeError, match="1 item\\(s\\) have no 'img_type' value"):
        stream.partial_mantel_from_stats(species_statistics(path, gram=True, covariate="img_type", progress=False))
    scattered = species_statistics(BIOCLIP2_1K, gram=True, covariate="img_type", progress=False)
    with pytest.raises(TreeprobeError, match="not contiguous"):
        stream.partial_mantel_from_stats(scattered)


def test_npy_with_metadata_csv_equals_parquet(tol, tmp_path):
    t = tol["table"]
    X = np.stack(t.column("emb").to_numpy(zero_copy_only=False)).astype(np.float16)
    np.save(tmp_path / "emb.npy", X)
    meta = t.drop_columns(["emb"]).to_pandas()
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    a = species_statistics(tmp_path / "emb.npy", progress=False)
    b = species_statistics(tol["whole"], progress=False)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, rtol=0, atol=TOL)
    assert a.n_skipped == b.n_skipped


def test_unsorted_rows_refuse_the_image_level_test_but_not_the_centroids():
    """The bundled file is a random sample: species rows are scattered."""
    st = species_statistics(BIOCLIP2_1K, gram=True, progress=False)
    assert not st.within_exact and st.n_scattered > 0
    with pytest.raises(TreeprobeError, match="not contiguous"):
        mantel_from_stats(st, permutations=0)
    got = mantel_from_stats(st, levels=("species-centroid",), permutations=0)
    ref = tl.mantel(load_embeddings(BIOCLIP2_1K), methods=("pearson",), levels=("species-centroid",), permutations=0)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=0, atol=TOL)


def test_placeholder_mode_and_dropping_unknown_species(tol):
    ds = load_embeddings(tol["whole"])
    ds.unknown, ds._taxonomy = "placeholder", None
    st = species_statistics(tol["whole"], gram=True, unknown="placeholder", progress=False)
    assert st.n_units == _in_memory_units(ds)[1]
    ref = tl.mantel(ds, methods=("pearson",), permutations=19, seed=4)
    got = mantel_from_stats(st, methods=("pearson",), permutations=19, seed=4)
    np.testing.assert_allclose(got.statistic, ref.statistic, rtol=0, atol=TOL)
    assert (got.p_value.to_numpy() == ref.p_value.to_numpy()).all()
    dropped = species_statistics(tol["whole"], drop_unknown_species=True, progress=False)
    n_unknown = int((tol["ds"].items.species == "").sum())
    assert dropped.n_skipped[stream.SKIP_REASONS[4]] == n_unknown > 0
    assert dropped.n_items == len(tol["ds"]) - n_unknown


def test_image_level_needs_gram(tol):
    st = species_statistics(tol["whole"], progress=False)
    assert st.within is None and st.gram is None
    with pytest.raises(TreeprobeError, match="gram=True"):
        mantel_from_stats(st, permutations=0)


def test_clear_errors(tmp_path, tol):
    with pytest.raises(TreeprobeError, match="no such file"):
        species_statistics(tmp_path / "nothing.parquet", progress=False)
    with pytest.raises(TreeprobeError, match="no .parquet"):
        species_statistics(tmp_path, progress=False)
    pq.write_table(tol["table"].rename_columns(["uuid", "vec", *tol["table"].column_names[2:]]), tmp_path / "x.parquet")
    with pytest.raises(TreeprobeError, match="no embedding column"):
        species_statistics(tmp_path / "x.parquet", progress=False)
    st = species_statistics(tmp_path / "x.parquet", columns={"emb": "vec"}, progress=False)
    assert st.n_items == len(tol["ds"])
    with pytest.raises(TreeprobeError, match="different gram"):
        st.merge(species_statistics(tol["shards"][0], gram=True, progress=False))
