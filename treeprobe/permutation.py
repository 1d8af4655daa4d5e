"""Permutation schemes for tests whose exchangeable units are species, not images.

Images of one species are not independent draws: a test that permutes images asks whether images
are exchangeable, which within-species similarity alone rejects. These schemes move whole species:
all images of a species go, as a block, to the tree position of another species **with the same
number of images** (size strata). Under the null "given their image counts, species' embeddings are
exchangeable among tree positions" every such permutation is equally likely, so the test is exact,
and the pairs at each tree distance keep their counts (sample-size effects cannot masquerade as signal).
"""

from __future__ import annotations

import numpy as np

from treeprobe._validation import check_codes

__all__ = ["species_sizes", "stratified_species_permutation", "item_permutation", "n_permutable_species"]


def species_sizes(species_codes: np.ndarray) -> np.ndarray:
    """Images per species, int64 (S,), for codes 0..S-1 (every code must occur)."""
    codes = np.asarray(species_codes)
    sizes = np.bincount(codes)
    if (sizes == 0).any():
        raise ValueError("species codes must be 0..S-1 with every code used")
    return sizes


def stratified_species_permutation(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation ``pi`` (S,) of species with ``sizes[pi] == sizes``: species swap tree
    positions only with species of the same image count (each stratum shuffled by ``rng``, in
    increasing order of size, so the stream is reproducible).

    >>> pi = stratified_species_permutation(np.array([1, 2, 1, 2, 1]), np.random.default_rng(0))
    >>> sorted(pi.tolist()), bool((np.array([1, 2, 1, 2, 1])[pi] == [1, 2, 1, 2, 1]).all())
    ([0, 1, 2, 3, 4], True)
    """
    sizes = np.asarray(sizes)
    pi = np.arange(len(sizes))
    order = np.argsort(sizes, kind="stable")
    bounds = np.flatnonzero(np.diff(sizes[order])) + 1
    for group in np.split(order, bounds):
        if len(group) > 1:
            pi[group] = group[rng.permutation(len(group))]
    return pi


def n_permutable_species(sizes: np.ndarray) -> int:
    """Species that can move at all (their size stratum holds at least two species)."""
    _, counts = np.unique(np.asarray(sizes), return_counts=True)
    return int(counts[counts > 1].sum())


def item_permutation(species_codes: np.ndarray, species_perm: np.ndarray) -> np.ndarray:
    """Item-level permutation (N,) that moves the images of each species ``s`` as a block onto the
    tree positions of species ``species_perm[s]``.

    With a kernel that reads ``X[perm[k]]`` at item slot k (slot k keeps its tree position), slot k
    of species t receives the j-th image of species s = species_perm⁻¹[t], where k is the j-th
    slot of t (images in row order). Needs ``sizes[species_perm] == sizes``.

    >>> item_permutation(np.array([0, 1, 0, 1, 2]), np.array([1, 0, 2])).tolist()
    [1, 0, 3, 2, 4]
    """
    codes = check_codes(species_codes, len(species_codes), "species")
    sizes = species_sizes(codes)
    species_perm = np.asarray(species_perm)
    if not np.array_equal(sizes[species_perm], sizes):
        raise ValueError("species_perm must map every species to one with the same number of images")
    order = np.argsort(codes, kind="stable")  # items grouped by species, row order inside
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = np.arange(len(codes)) - np.repeat(start, sizes)  # j of each grouped item
    inv = np.empty_like(species_perm)
    inv[species_perm] = np.arange(len(species_perm))
    t = codes[order]  # the species whose slot this is
    perm = np.empty(len(codes), dtype=np.int64)
    perm[order] = order[start[inv[t]] + within]
    return perm
