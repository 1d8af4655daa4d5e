"""Tests for treeprobe.simulate: the simulated world with known truth."""

import time

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from treeprobe.simulate import RANKS, SimulatedWorld, simulate_world


@pytest.fixture(scope="module")
def world() -> SimulatedWorld:
    return simulate_world(seed=0)


def _tree_distance_from_lineages(items: pd.DataFrame) -> np.ndarray:
    """Condensed 2 x (ranks not shared), from the name columns alone (pdist order)."""
    codes = np.stack(
        [pd.factorize(items[list(RANKS[: k + 1])].astype(str).agg("|".join, axis=1))[0] for k in range(len(RANKS))],
        axis=1,
    )
    n = len(items)
    i, j = np.triu_indices(n, k=1)
    shared = np.cumprod(codes[i] == codes[j], axis=1).sum(axis=1)
    return 2.0 * (len(RANKS) - shared)


def test_shapes_and_columns(world):
    n = len(world.items)
    assert list(world.items.columns) == ["path", *RANKS, "image_id"]
    assert (world.items["path"] == "").all()
    assert world.items["image_id"].tolist() == list(range(n))
    assert world.embeddings.shape == (n, 64) and world.embeddings.dtype == np.float32
    assert world.species_traits.shape == (world.n_species, 16)
    assert world.item_species.shape == (n,) and world.item_species.dtype == np.int64
    assert len(world.species_names) == world.n_species
    assert world.rank_lengths == (1.0,) * 7
    assert world.seed == 0
    # expected default size
    assert 150 <= world.n_species <= 400
    assert 600 <= n <= 1500
    assert np.isfinite(world.embeddings).all()


def test_counts_and_names_consistent(world):
    items = world.items
    # every species has >= 1 image and at most 6
    counts = np.bincount(world.item_species, minlength=world.n_species)
    assert counts.min() >= 1 and counts.max() <= 6
    # item species column agrees with the codes
    assert (items["species"].to_numpy() == np.asarray(world.species_names)[world.item_species]).all()
    # binomial: first word == genus, exactly two words
    parts = items["species"].str.split(" ")
    assert (parts.str.len() == 2).all()
    assert (parts.str[0] == items["genus"]).all()
    # names unique per rank: each name has exactly one parent (no homonyms at all)
    lin = world.species_lineage
    for k in range(1, len(RANKS)):
        assert lin.groupby(RANKS[k])[RANKS[k - 1]].nunique().max() == 1, RANKS[k]
        assert lin[RANKS[k]].nunique() == world.n_taxa(RANKS[k])
    # cumulative lineages are unique per species
    cum = lin.agg("|".join, axis=1)
    assert cum.nunique() == world.n_species
    # tree is irregular (branching drawn per node)
    kids = lin.groupby("family")["genus"].nunique()
    assert kids.nunique() > 1
    assert world.n_taxa("kingdom") == 3


def test_ancestors_match_lineage(world):
    for pos, rank in enumerate(RANKS):
        codes = world.species_ancestors[:, pos]
        # the same ancestor code <=> the same name
        assert pd.Series(codes).groupby(world.species_lineage[rank].to_numpy()).nunique().max() == 1
        assert world.node_traits[rank].shape == (world.n_taxa(rank), 16)
    assert world.node_traits["species"] is world.species_traits


def test_deterministic_bit_identical():
    a = simulate_world(seed=3)
    b = simulate_world(seed=3)
    assert a.embeddings.tobytes() == b.embeddings.tobytes()
    assert a.species_traits.tobytes() == b.species_traits.tobytes()
    pd.testing.assert_frame_equal(a.items, b.items)
    assert a.newick() == b.newick()
    assert a.null_embeddings(5).tobytes() == b.null_embeddings(5).tobytes()
    c = simulate_world(seed=4)
    assert c.embeddings.shape != a.embeddings.shape or not np.array_equal(c.embeddings, a.embeddings)


def test_noise_does_not_change_tree():
    a = simulate_world(seed=1, noise=0.5)
    b = simulate_world(seed=1, noise=2.0, signal=0.3)
    pd.testing.assert_frame_equal(a.items, b.items)
    np.testing.assert_array_equal(a.species_traits, b.species_traits)


def test_brownian_variance_follows_rank_lengths():
    # tip variance per trait dim = sum of branch lengths (sigma = 1)
    lengths = (2.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.5)
    w = simulate_world(seed=2, branching=[(3, 4)] * 6, trait_dim=8, rank_lengths=lengths)
    # increments at the species rank: species trait - genus trait
    inc = w.species_traits - w.node_traits["genus"][w.species_ancestors[:, 5]]
    assert inc.var() == pytest.approx(0.5, rel=0.05)
    inc_k = w.node_traits["kingdom"]
    assert inc_k.shape == (3, 8)
    # same-genus species are much closer in trait space than different-kingdom species
    anc = w.species_ancestors
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, w.n_species, (2, 20000))
    d = ((w.species_traits[i] - w.species_traits[j]) ** 2).sum(axis=1)
    same_genus = (anc[i, 5] == anc[j, 5]) & (i != j)
    diff_kingdom = anc[i, 0] != anc[j, 0]
    assert d[same_genus].mean() == pytest.approx(2 * 8 * 0.5, rel=0.25)
    assert d[diff_kingdom].mean() == pytest.approx(2 * 8 * sum(lengths), rel=0.25)


def test_rank_lengths_as_dict_and_errors():
    w = simulate_world(seed=0, rank_lengths={"species": 3.0})
    assert w.rank_lengths == (1, 1, 1, 1, 1, 1, 3.0)
    with pytest.raises(ValueError):
        simulate_world(rank_lengths=(1, 2))
    with pytest.raises(ValueError):
        simulate_world(rank_lengths={"tribe": 1.0})
    with pytest.raises(ValueError):
        simulate_world(branching=[(2, 3)] * 5)
    with pytest.raises(ValueError):
        simulate_world(images_per_species=(0, 2))


def test_indexed_names():
    w = simulate_world(seed=0, names="indexed")
    assert w.items["kingdom"].iloc[0] == "Regnum0"
    assert w.species_names[0] == "Genus0 epithet0"
    assert w.items["genus"].str.fullmatch(r"Genus\d+").all()
    assert (w.items["species"].str.split(" ").str[0] == w.items["genus"]).all()
    assert w.species_lineage.agg("|".join, axis=1).nunique() == w.n_species


def test_fixed_branching_sizes():
    w = simulate_world(n_kingdoms=2, branching=(2, 2, 1, 1, 3, 2), images_per_species=4, seed=9)
    assert w.n_species == 2 * 2 * 2 * 1 * 1 * 3 * 2
    assert len(w.items) == 4 * w.n_species


def test_known_truth_mantel_like(world):
    """Embedding cosine distance agrees with the true tree; the null control does not."""
    tree = _tree_distance_from_lineages(world.items)
    np.testing.assert_array_equal(tree, world.tree_distance())
    d = pdist(world.embeddings.astype(np.float64), metric="cosine")
    r = spearmanr(d, tree)[0]
    assert r > 0.3  # measured 0.459 for seed 0 (0.35..0.51 over seeds 0-5)
    r_null = spearmanr(pdist(world.null_embeddings(1).astype(np.float64), metric="cosine"), tree)[0]
    assert abs(r_null) < 0.05  # measured -0.0006
    # no signal at all -> no correlation; more noise -> weaker correlation
    w0 = simulate_world(seed=0, signal=0.0)
    assert abs(spearmanr(pdist(w0.embeddings.astype(np.float64), "cosine"), tree)[0]) < 0.05
    w_noisy = simulate_world(seed=0, noise=3.0)
    r_noisy = spearmanr(pdist(w_noisy.embeddings.astype(np.float64), "cosine"), tree)[0]
    assert 0.05 < r_noisy < r


def test_null_embeddings(world):
    z = world.null_embeddings(0)
    assert z.shape == world.embeddings.shape and z.dtype == np.float32
    assert z.std() == pytest.approx(world.embeddings.std(), rel=0.05)
    assert not np.array_equal(z, world.null_embeddings(1))


def test_tree_distance_pairs(world):
    i = np.array([0, 0, 0])
    j = np.array([0, 1, len(world.items) - 1])
    d = world.tree_distance(i, j)
    assert d[0] == 0
    items = world.items
    for k in range(3):
        a, b = items.iloc[i[k]], items.iloc[j[k]]
        shared = 0
        for r in RANKS:
            if a[r] != b[r]:
                break
            shared += 1
        assert d[k] == 2 * (7 - shared)


def test_newick_parses_with_ete3(world):
    ete3 = pytest.importorskip("ete3")
    s = world.newick()
    t = ete3.Tree(s, format=1)
    leaves = sorted(leaf.name for leaf in t)
    assert leaves == sorted(world.species_names)
    # depth of every leaf = sum of the branch lengths
    for leaf in t.get_leaves()[:20]:
        assert t.get_distance(leaf) == pytest.approx(7.0)
    # two species in one genus: distance 2 * species length; different kingdoms: 2 * 7
    genus = world.species_lineage.groupby("genus")["species"].apply(list)
    pair = next(v for v in genus if len(v) >= 2)
    assert t.get_distance(pair[0], pair[1]) == pytest.approx(2.0)
    # internal nodes are named by taxa
    assert {n.name for n in t.children} == set(world.species_lineage["kingdom"])
    # custom lengths are written
    w = simulate_world(seed=0, rank_lengths=(2, 1, 1, 1, 1, 0.5, 0.25))
    t2 = ete3.Tree(w.newick(underscores=True), format=1)
    assert all(" " not in leaf.name for leaf in t2)
    assert t2.get_distance(t2.get_leaves()[0]) == pytest.approx(6.75)


def test_builds_fast():
    t0 = time.perf_counter()
    simulate_world(seed=11)
    assert time.perf_counter() - t0 < 1.0
