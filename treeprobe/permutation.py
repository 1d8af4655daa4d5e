"""Permutation schemes for tests whose exchangeable units are species, not images.

Images of one species are not independent draws: a test that permutes images asks whether images
are exchangeable, which within-species similarity alone rejects. These schemes move whole species:
all images of a species go, as a block, to the tree position of another species **with the same
number of images** (size strata). Under the null "given their image counts, species' embeddings are
exchangeable among tree positions" every such permutation is equally likely, so the test is exact,
and the pairs at each tree distance keep their counts (sample-size effects cannot masquerade as signal).

Convention: a species permutation ``pi`` (S,) sends species ``s`` to the tree position of species
``pi[s]``. Kernels that read row ``perm[k]`` at slot k want its inverse at the species level
(:func:`inverse_permutation`) and :func:`item_permutation` at the image level.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from treeprobe._validation import check_codes
from treeprobe.errors import TreeprobeError

__all__ = ["TIP_SCHEMES", "species_sizes", "stratified_species_permutation", "stratified_sampler", "item_permutation",
           "species_item_permuter", "inverse_permutation", "n_permutable_species", "n_strata"]

#: How taxa move among the tips of a tree in the tree-level tests (K_mult, tree recovery):
#: ``"size-strata"`` only among taxa with as many images (a centroid of 1 image is noisier than one of
#: 10, so only equal sizes are exchangeable; the default), ``"free"`` any tip with any.
TIP_SCHEMES = ("size-strata", "free")


def species_sizes(species_codes: np.ndarray) -> np.ndarray:
    """Images per species, int64 (S,), for integer codes 0..S-1 (every code must occur).

    >>> species_sizes(np.array([0, 1, 0, 2])).tolist()
    [2, 1, 1]
    """
    codes = np.asarray(species_codes)
    if codes.ndim != 1 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0:
        raise TreeprobeError("species codes must be a non-empty 1-D array of integers 0..S-1")
    sizes = np.bincount(codes).astype(np.int64)
    if (sizes == 0).any():
        raise TreeprobeError("species codes must be 0..S-1 with every code used")
    return sizes


def _strata(sizes: np.ndarray) -> list[np.ndarray]:
    """Species indices grouped by size (increasing size; ascending index inside), groups of >= 2 only."""
    sizes = np.asarray(sizes)
    order = np.argsort(sizes, kind="stable")
    bounds = np.flatnonzero(np.diff(sizes[order])) + 1
    return [g for g in np.split(order, bounds) if len(g) > 1]


def stratified_sampler(sizes: np.ndarray) -> Callable[[np.random.Generator], np.ndarray]:
    """``draw(rng)`` → a random size-stratified species permutation (S,), with the strata found once.

    ``draw(rng)`` returns exactly what :func:`stratified_species_permutation` ``(sizes, rng)`` returns
    (same random stream), in O(S) per draw instead of a sort of the sizes each time.

    >>> draw = stratified_sampler(np.array([1, 2, 1, 2, 1]))
    >>> a, b = draw(np.random.default_rng(0)), stratified_species_permutation(np.array([1, 2, 1, 2, 1]),
    ...                                                                        np.random.default_rng(0))
    >>> bool((a == b).all())
    True
    """
    groups = _strata(sizes)
    S = len(sizes)

    def draw(rng: np.random.Generator) -> np.ndarray:
        pi = np.arange(S)
        for group in groups:
            pi[group] = group[rng.permutation(len(group))]
        return pi

    return draw


def stratified_species_permutation(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation ``pi`` (S,) of species with ``sizes[pi] == sizes``: species swap tree
    positions only with species of the same image count (each stratum shuffled by ``rng``, in
    increasing order of size, so the stream is reproducible). Each permutation that keeps the sizes
    has probability 1 / Π_strata (stratum size)!.

    >>> pi = stratified_species_permutation(np.array([1, 2, 1, 2, 1]), np.random.default_rng(0))
    >>> sorted(pi.tolist()), bool((np.array([1, 2, 1, 2, 1])[pi] == [1, 2, 1, 2, 1]).all())
    ([0, 1, 2, 3, 4], True)
    """
    return stratified_sampler(sizes)(rng)


def n_permutable_species(sizes: np.ndarray) -> int:
    """Species that can move at all (their size stratum holds at least two species).

    >>> n_permutable_species(np.array([1, 2, 1, 3]))
    2
    """
    _, counts = np.unique(np.asarray(sizes), return_counts=True)
    return int(counts[counts > 1].sum())


def n_strata(sizes: np.ndarray) -> int:
    """Size strata: distinct image counts among the species (strata of one species included).

    >>> n_strata(np.array([1, 2, 1, 3]))
    3
    """
    return int(len(np.unique(np.asarray(sizes))))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """``inv`` (n,) with ``inv[perm[i]] == i``.

    >>> inverse_permutation(np.array([2, 0, 1])).tolist()
    [1, 2, 0]
    """
    perm = np.asarray(perm)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=perm.dtype)
    return inv


def species_item_permuter(species_codes: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``to_items(species_perm)`` → :func:`item_permutation` ``(species_codes, species_perm)``, with
    the grouping of the images by species (a sort) done once: O(N) per call.

    ``species_codes``: int (N,), 0..S-1, every code used.
    """
    codes = check_codes(species_codes, len(species_codes), "species")
    sizes = species_sizes(codes)
    order = np.argsort(codes, kind="stable")  # items grouped by species, row order inside
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = np.arange(len(codes)) - np.repeat(start, sizes)  # j of each grouped item
    t = codes[order]  # the species whose slot this is

    def to_items(species_perm: np.ndarray) -> np.ndarray:
        species_perm = np.asarray(species_perm)
        if species_perm.shape != sizes.shape or not np.array_equal(sizes[species_perm], sizes):
            raise TreeprobeError("species_perm must map every species to one with the same number of images")
        inv = inverse_permutation(species_perm)
        perm = np.empty(len(codes), dtype=np.int64)
        perm[order] = order[start[inv[t]] + within]
        return perm

    return to_items


def item_permutation(species_codes: np.ndarray, species_perm: np.ndarray) -> np.ndarray:
    """Item-level permutation (N,) that moves the images of each species ``s`` as a block onto the
    tree positions of species ``species_perm[s]``.

    With a kernel that reads ``X[perm[k]]`` at item slot k (slot k keeps its tree position), slot k
    of species t receives the j-th image of species s = species_perm⁻¹[t], where k is the j-th
    slot of t (images in row order). Needs ``sizes[species_perm] == sizes``.

    >>> item_permutation(np.array([0, 1, 0, 1, 2]), np.array([1, 0, 2])).tolist()
    [1, 0, 3, 2, 4]
    """
    return species_item_permuter(species_codes)(species_perm)
