"""Size-stratified species permutations: strata kept, every permutation reachable (uniformly), the
item-level mapping moves whole species in row order, and the fast samplers equal the plain ones."""

import math
from collections import Counter
from itertools import permutations

import numpy as np
import pytest
import scipy.stats

from treeprobe.errors import TreeprobeError
from treeprobe.permutation import (inverse_permutation, item_permutation, n_permutable_species, n_strata,
                                   species_item_permuter, species_sizes, stratified_sampler,
                                   stratified_species_permutation)


def test_species_sizes_and_counts():
    codes = np.array([2, 0, 0, 1, 2, 2, 3])
    sizes = species_sizes(codes)
    assert sizes.tolist() == [2, 1, 3, 1]
    assert n_permutable_species(sizes) == 2  # the two species of one image
    assert n_strata(sizes) == 3
    with pytest.raises(TreeprobeError, match="every code used"):
        species_sizes(np.array([0, 2]))
    with pytest.raises(TreeprobeError, match="integers"):
        species_sizes(np.array([0.0, 1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_strata_preserved(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, 200)
    for _ in range(20):
        pi = stratified_species_permutation(sizes, rng)
        assert np.array_equal(np.sort(pi), np.arange(200))  # a permutation
        assert np.array_equal(sizes[pi], sizes)  # every species goes to a position of its own size
    singleton = np.flatnonzero(np.bincount(sizes)[sizes] == 1)
    assert (pi[singleton] == singleton).all()


def test_every_permutation_reachable_and_uniform():
    sizes = np.array([1, 2, 1, 2, 1, 3])  # strata {0, 2, 4} and {1, 3}: 3!·2! = 12 permutations
    valid = {p for p in permutations(range(6)) if np.array_equal(sizes[list(p)], sizes)}
    assert len(valid) == math.factorial(3) * math.factorial(2)
    rng = np.random.default_rng(0)
    draws = 6000
    seen = Counter(tuple(stratified_species_permutation(sizes, rng).tolist()) for _ in range(draws))
    assert set(seen) == valid
    counts = np.array([seen[p] for p in sorted(valid)])
    assert scipy.stats.chisquare(counts).pvalue > 1e-3  # uniform over the 12


def test_fast_sampler_is_the_same_stream():
    sizes = np.random.default_rng(1).integers(1, 6, 300)
    draw = stratified_sampler(sizes)
    r1, r2 = np.random.default_rng(2), np.random.default_rng(2)
    for _ in range(10):
        assert np.array_equal(draw(r1), stratified_species_permutation(sizes, r2))


def test_item_permutation_moves_whole_species_in_row_order():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 40, 300)
    codes = np.unique(codes, return_inverse=True)[1]  # every code used
    sizes = species_sizes(codes)
    pi = stratified_species_permutation(sizes, rng)
    perm = item_permutation(codes, pi)
    assert np.array_equal(np.sort(perm), np.arange(300))
    inv = inverse_permutation(pi)
    # slot k (of species t) reads a row of species pi⁻¹[t]: species s lands on the positions of pi[s]
    assert np.array_equal(codes[perm], inv[codes])
    for t in range(len(sizes)):  # the j-th slot of t gets the j-th image of its new species
        slots = np.flatnonzero(codes == t)
        assert np.array_equal(perm[slots], np.flatnonzero(codes == inv[t]))
    # the cached permuter gives the same mapping
    assert np.array_equal(species_item_permuter(codes)(pi), perm)
    # a size-breaking species permutation is refused
    bad = np.arange(len(sizes))
    a, b = np.flatnonzero(sizes == 1)[0], np.flatnonzero(sizes > 1)[0]
    bad[[a, b]] = bad[[b, a]]
    with pytest.raises(TreeprobeError, match="same number of images"):
        item_permutation(codes, bad)


def test_inverse_permutation():
    p = np.random.default_rng(4).permutation(50)
    inv = inverse_permutation(p)
    assert np.array_equal(inv[p], np.arange(50)) and np.array_equal(p[inv], np.arange(50))
