"""A simulated tree of life with known truth (the embedded default world).

:func:`simulate_world` draws a random, irregular 7-rank taxonomy, lets a
``trait_dim``-dimensional trait evolve down it by Brownian motion, and turns each
image's species trait into an embedding with a fixed random linear map plus
isotropic noise. Because the generating tree is known, every treeprobe analysis
has a right answer on this world; :meth:`SimulatedWorld.null_embeddings` gives the
matching negative control (same shape, no tree signal).

Everything is a pure function of the arguments: the same seed gives bit-identical
output. The random streams are split (structure / traits / map / images / noise), so
changing e.g. ``noise`` or ``signal`` leaves the tree and the traits unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS

__all__ = ["RANKS", "DEFAULT_BRANCHING", "NAME_STYLES", "SimulatedWorld", "simulate_world", "newick"]

#: Default children per node for phylum..species, each an inclusive (low, high) range
#: drawn per parent node. Expected size: 3 * 2.5 * 2.5 * 2 * 2 * 2 * 2 = 300 species.
DEFAULT_BRANCHING: tuple[tuple[int, int], ...] = ((2, 3), (2, 3), (1, 3), (1, 3), (1, 3), (1, 3))

# --- names -------------------------------------------------------------------------

_ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_SYLLABLES = tuple(o + v for o in _ONSETS for v in _VOWELS)  # 80 syllables
# Suffixes start with a consonant (stems end in a vowel): 'Tivo' + 'phyta' -> 'Tivophyta'.
_SUFFIX = {
    "kingdom": ("nia",),
    "phylum": ("phyta", "zoa", "mycota"),
    "class": ("psida", "cea", "tes"),
    "order": ("les", "rida", "formes"),
    "family": ("ceae", "dae"),
    "genus": ("s", "ra", "lla", "nium"),
    "species": ("s", "ris", "ta", "nsis", "des", "num"),
}
_INDEXED = {
    "kingdom": "Regnum",
    "phylum": "Phylum",
    "class": "Classis",
    "order": "Ordo",
    "family": "Familia",
    "genus": "Genus",
    "species": "epithet",
}
_MULT = 2713  # coprime with 80, so i -> (_MULT * i + offset) mod 80**L is a bijection
_RANK_OFFSET = 1009  # offset step per rank (a prime): equal indices at different ranks get unrelated stems
_NULL_STREAM = 0x6E756C6C  # 'null' in ASCII: the seed-sequence key of the negative-control stream
#: Naming styles of :func:`simulate_world`.
NAME_STYLES = ("latin", "indexed")


def _stem(index: int, rank_pos: int) -> str:
    """Syllable stem (>= 2 syllables) for the ``index``-th taxon of a rank.

    Indices are scrambled by a bijection of ``[0, 80**L)`` (offset per rank), so
    neighbouring taxa get unrelated names and equal indices differ across ranks;
    within one rank distinct indices give distinct stems.
    """
    n = len(_SYLLABLES)
    length, base = 2, 0
    while index - base >= n**length:
        base += n**length
        length += 1
    size = n**length
    code = (_MULT * (index - base) + _RANK_OFFSET * rank_pos + 7) % size
    digits = []
    for _ in range(length):
        digits.append(code % n)
        code //= n
    return "".join(_SYLLABLES[d] for d in digits)


def _taxon_name(rank: str, index: int, style: str) -> str:
    """Name of the ``index``-th taxon of ``rank`` (species: the epithet only)."""
    if style == "indexed":
        return f"{_INDEXED[rank]}{index}"
    stem = _stem(index, RANKS.index(rank))
    suffixes = _SUFFIX[rank]
    name = stem + suffixes[(index // 7) % len(suffixes)]
    return name if rank == "species" else name.capitalize()


def _rank_names(rank: str, n: int, style: str) -> list[str]:
    """``n`` distinct names for ``rank`` (a clash, if the suffixes ever made one,
    is resolved by appending syllables)."""
    out, seen = [], set()
    for i in range(n):
        name = _taxon_name(rank, i, style)
        extra = 0
        while name in seen:
            name = name + _SYLLABLES[(i + extra) % len(_SYLLABLES)]
            extra += 1
        seen.add(name)
        out.append(name)
    return out


# --- the world ---------------------------------------------------------------------


@dataclass(kw_only=True)
class SimulatedWorld:
    """A simulated taxonomy, its Brownian traits and per-image embeddings.

    Attributes
    ----------
    items : DataFrame, N rows
        ``path`` ('' - no image files), the 7 rank columns (names; ``species`` is the
        binomial "Genus epithet") and ``image_id`` (int, 0..N-1).
    embeddings : float32 (N, dim)
        ``signal * traits[species] @ projection.T + noise * N(0, I)``; not normalised.
    species_traits : float64 (n_species, trait_dim)
        Brownian trait at each species tip (root trait 0, sigma 1 per unit length).
    species_names : list[str], n_species
        Binomials, in code order (``item_species`` indexes this list).
    item_species : int64 (N,)
        Species code of each image.
    rank_lengths : tuple of 7 floats
        Branch length above a node of each rank (kingdom..species); the kingdom
        branch joins the root.
    seed : int
    node_traits : dict rank -> float64 (n_taxa(rank), trait_dim)
        Traits at every internal node (``node_traits['species'] is species_traits``).
    species_lineage : DataFrame (n_species, 7)
        Names of each species' ancestors, one column per rank.
    species_ancestors : int64 (n_species, 7)
        Per-rank taxon index of each species' ancestors (rows of ``node_traits[rank]``).
    projection : float64 (dim, trait_dim)
        The fixed linear map trait -> embedding (entries N(0, 1/trait_dim)).
    signal, noise : float
    """

    items: pd.DataFrame
    embeddings: np.ndarray
    species_traits: np.ndarray
    species_names: list
    item_species: np.ndarray
    rank_lengths: tuple
    seed: int
    node_traits: dict = field(repr=False, default_factory=dict)
    species_lineage: pd.DataFrame = field(repr=False, default=None)
    species_ancestors: np.ndarray = field(repr=False, default=None)
    projection: np.ndarray = field(repr=False, default=None)
    signal: float = 1.0
    noise: float = 0.5

    @property
    def n_items(self) -> int:
        """Number of images N."""
        return int(self.embeddings.shape[0])

    @property
    def n_species(self) -> int:
        """Number of species."""
        return len(self.species_names)

    def n_taxa(self, rank: str) -> int:
        """Number of distinct taxa at ``rank``."""
        return int(self.node_traits[rank].shape[0])

    def null_embeddings(self, seed: int = 0) -> np.ndarray:
        """Negative control: float32 (N, dim) isotropic Gaussian noise, no tree signal.

        Scaled to the overall standard deviation of :attr:`embeddings` so magnitudes
        are comparable; depends only on ``seed`` and the shape.
        """
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _NULL_STREAM]))
        scale = float(np.std(self.embeddings, dtype=np.float64)) or 1.0
        return (rng.standard_normal(self.embeddings.shape) * scale).astype(np.float32)

    def tree_distance(self, i: np.ndarray | None = None, j: np.ndarray | None = None) -> np.ndarray:
        """Rank-count tree distance between images: 2 x (number of ranks not shared).

        With no arguments returns the condensed vector over all image pairs (the
        ``scipy.spatial.distance.pdist`` order), float64 of length N(N-1)/2. With
        index arrays ``i``, ``j`` returns the distance for each pair ``(i[k], j[k])``.
        """
        anc = self.species_ancestors[self.item_species]  # (N, 7)
        if i is None:
            n = anc.shape[0]
            i, j = np.triu_indices(n, k=1)
        # ranks are nested, so the number of shared ranks = first rank that differs
        same = anc[np.asarray(i)] == anc[np.asarray(j)]
        shared = np.cumprod(same, axis=1).sum(axis=1)
        return 2.0 * (len(RANKS) - shared)

    def newick(self, underscores: bool = False) -> str:
        """The true tree as a Newick string (ete3 ``format=1``).

        Internal nodes are named by their taxon, leaves by the species binomial
        (spaces kept, as ete3 reads them; ``underscores=True`` writes ``Genus_epithet``
        for strict Newick readers). Branch lengths are :attr:`rank_lengths`.
        """
        return newick(self, underscores=underscores)


def _parse_branching(branching) -> list[tuple[int, int]]:
    """Six inclusive (low, high) ranges of children per node (phylum..species)."""
    if branching is None:
        branching = DEFAULT_BRANCHING
    branching = list(branching)
    if len(branching) != len(RANKS) - 1:
        raise ValueError(f"branching needs {len(RANKS) - 1} entries (phylum..species), got {len(branching)}")
    return [_parse_range(b, f"branching for {rank}") for rank, b in zip(RANKS[1:], branching)]


def _parse_rank_lengths(rank_lengths) -> tuple[float, ...]:
    """Seven non-negative branch lengths (kingdom..species) from a sequence, a mapping or None (all 1)."""
    if rank_lengths is None:
        return (1.0,) * len(RANKS)
    if isinstance(rank_lengths, Mapping):
        unknown = set(rank_lengths) - set(RANKS)
        if unknown:
            raise ValueError(f"unknown ranks in rank_lengths: {sorted(unknown)}")
        vals = tuple(float(rank_lengths.get(r, 1.0)) for r in RANKS)
    else:
        vals = tuple(float(v) for v in rank_lengths)
        if len(vals) != len(RANKS):
            raise ValueError(f"rank_lengths needs {len(RANKS)} values (kingdom..species), got {len(vals)}")
    if any(v < 0 for v in vals):
        raise ValueError("rank_lengths must be non-negative")
    return vals


def _parse_range(value, what: str) -> tuple[int, int]:
    """An int or an inclusive (low, high) pair as (low, high), with 1 <= low <= high."""
    lo, hi = (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))
    if lo < 1 or hi < lo:
        raise ValueError(f"{what} must satisfy 1 <= low <= high, got {value!r}")
    return lo, hi


def simulate_world(
    *,
    n_kingdoms: int = 3,
    branching: Sequence | None = None,
    images_per_species: int | tuple[int, int] = (1, 6),
    dim: int = 64,
    trait_dim: int = 16,
    signal: float = 1.0,
    noise: float = 0.5,
    rank_lengths: Sequence[float] | Mapping[str, float] | None = None,
    seed: int = 0,
    names: str = "latin",
) -> SimulatedWorld:
    """Simulate a tree of life, Brownian traits and image embeddings.

    Parameters
    ----------
    n_kingdoms : int
        Number of kingdoms under the root.
    branching : 6 entries (phylum..species), each an int or an inclusive (low, high)
        Children per node at that rank, drawn uniformly per parent node so the tree
        is irregular. Default :data:`DEFAULT_BRANCHING` (about 300 species).
    images_per_species : int or inclusive (low, high)
        Images per species, drawn per species (every species gets >= 1).
    dim, trait_dim : int
        Embedding and trait dimensions.
    signal : float
        Multiplier on the projected trait (0 gives embeddings with no tree signal).
    noise : float
        Standard deviation of the per-image isotropic noise (embedding units).
    rank_lengths : 7 floats (kingdom..species) or {rank: length}; default all 1
        Branch length above a node of each rank. Trait increment over a branch of
        length ``l`` is N(0, l * I) (sigma = 1).
    seed : int
    names : "latin" or "indexed"
        "latin": made-up Latin-ish names, unique per rank (e.g. kingdom 'Kivonia',
        family 'Dothaceae', genus 'Mezira', species 'Mezira lubonsis'); "indexed":
        'Regnum0', 'Phylum3', ..., 'Genus12', species 'Genus12 epithet3'.

    Returns
    -------
    SimulatedWorld

    >>> w = simulate_world(n_kingdoms=2, branching=[1, 1, 1, 1, 1, 2], images_per_species=3, dim=8, seed=0)
    >>> w.n_species, w.n_items, w.embeddings.shape, w.embeddings.dtype
    (4, 12, (12, 8), dtype('float32'))
    >>> w.tree_distance(np.array([0, 0, 0]), np.array([1, 3, 11])).tolist()  # same species, genus, kingdom
    [0.0, 2.0, 14.0]
    """
    if n_kingdoms < 1:
        raise ValueError("n_kingdoms must be >= 1")
    if dim < 1 or trait_dim < 1:
        raise ValueError("dim and trait_dim must be >= 1")
    if names not in NAME_STYLES:
        raise ValueError("names must be 'latin' or 'indexed'")
    branch = _parse_branching(branching)
    lengths = _parse_rank_lengths(rank_lengths)
    ipp_lo, ipp_hi = _parse_range(images_per_species, "images_per_species")

    ss = np.random.SeedSequence(int(seed))
    rng_tree, rng_traits, rng_map, rng_images, rng_noise = (np.random.default_rng(s) for s in ss.spawn(5))

    parents = _draw_parents(rng_tree, n_kingdoms, branch)
    node_names = _name_nodes(parents, names)
    species_names = node_names[-1]
    n_species = len(species_names)
    anc = _species_ancestors(parents)
    node_traits = _brownian_traits(rng_traits, parents, lengths, trait_dim)
    species_traits = node_traits["species"]

    # --- images and embeddings ---------------------------------------------------------
    projection = rng_map.standard_normal((dim, trait_dim)) / np.sqrt(trait_dim)
    n_img = rng_images.integers(ipp_lo, ipp_hi + 1, size=n_species)
    item_species = np.repeat(np.arange(n_species, dtype=np.int64), n_img)
    emb = signal * (species_traits[item_species] @ projection.T)
    emb = emb + noise * rng_noise.standard_normal(emb.shape)
    embeddings = emb.astype(np.float32)

    lineage = pd.DataFrame({rank: [node_names[pos][i] for i in anc[:, pos]] for pos, rank in enumerate(RANKS)})
    items = lineage.iloc[item_species].reset_index(drop=True)
    items.insert(0, "path", "")
    items["image_id"] = np.arange(len(item_species), dtype=np.int64)

    return SimulatedWorld(
        items=items,
        embeddings=embeddings,
        species_traits=species_traits,
        species_names=species_names,
        item_species=item_species,
        rank_lengths=lengths,
        seed=int(seed),
        node_traits=node_traits,
        species_lineage=lineage,
        species_ancestors=anc,
        projection=projection,
        signal=float(signal),
        noise=float(noise),
    )


def _draw_parents(rng: np.random.Generator, n_kingdoms: int, branch) -> list[np.ndarray]:
    """Parent index of every node, rank by rank: ``parents[pos]`` (n_taxa(rank),) indexes the
    taxa of the rank above (kingdoms: −1). Children per node drawn from ``branch``."""
    parents: list[np.ndarray] = [np.full(n_kingdoms, -1, dtype=np.int64)]
    for lo, hi in branch:
        n_parent = len(parents[-1])
        k = rng.integers(lo, hi + 1, size=n_parent)
        parents.append(np.repeat(np.arange(n_parent, dtype=np.int64), k))
    return parents


def _name_nodes(parents: list[np.ndarray], style: str) -> list[list[str]]:
    """Names of the taxa of every rank: unique per rank; species as binomials, epithets unique
    within their genus ("indexed": numbered within it; "latin": globally distinct)."""
    node_names = [_rank_names(rank, len(parents[pos]), style) for pos, rank in enumerate(RANKS[:-1])]
    sp_parent = parents[-1]
    if style == "indexed":  # 'Genus12 epithet0', 'Genus12 epithet1', ...: numbered within the genus
        starts = np.r_[0, np.flatnonzero(np.diff(sp_parent)) + 1] if len(sp_parent) else np.zeros(0, int)
        counts = np.diff(np.r_[starts, len(sp_parent)])
        within = np.arange(len(sp_parent)) - np.repeat(starts, counts)
        epithets = [_taxon_name("species", int(w), style) for w in within]
    else:  # globally distinct epithets
        epithets = _rank_names("species", len(sp_parent), style)
    genus_names = node_names[-1]
    node_names.append([f"{genus_names[g]} {e}" for g, e in zip(sp_parent, epithets)])
    return node_names


def _species_ancestors(parents: list[np.ndarray]) -> np.ndarray:
    """Per-rank taxon index of every species' ancestors, int64 (n_species, 7)."""
    n_species = len(parents[-1])
    anc = np.empty((n_species, len(RANKS)), dtype=np.int64)
    anc[:, -1] = np.arange(n_species)
    for pos in range(len(RANKS) - 1, 0, -1):
        anc[:, pos - 1] = parents[pos][anc[:, pos]]
    return anc


def _brownian_traits(rng: np.random.Generator, parents: list[np.ndarray], lengths, trait_dim: int) -> dict:
    """Brownian traits at every node, rank by rank: rank -> float64 (n_taxa(rank), trait_dim),
    each the parent's trait plus N(0, length · I) (root trait 0)."""
    node_traits: dict[str, np.ndarray] = {}
    prev = np.zeros((1, trait_dim))
    for pos, rank in enumerate(RANKS):
        par = np.zeros(len(parents[pos]), dtype=np.int64) if pos == 0 else parents[pos]
        step = rng.standard_normal((len(par), trait_dim)) * np.sqrt(lengths[pos])
        prev = prev[par] + step
        node_traits[rank] = prev
    return node_traits


def _fmt_len(x: float) -> str:
    """Shortest round-tripping decimal for a branch length ('1' for 1.0)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def newick(world: SimulatedWorld, underscores: bool = False) -> str:
    """Newick string of the true tree of ``world`` (see :meth:`SimulatedWorld.newick`).

    Leaves: species binomials; internal nodes: taxon names; branch lengths from
    ``world.rank_lengths``. The root is unnamed. Parses with ete3 ``Tree(s, format=1)``.
    """
    anc = world.species_ancestors
    lineage = world.species_lineage
    lengths = [_fmt_len(v) for v in world.rank_lengths]

    def clean(name: str) -> str:
        return name.replace(" ", "_") if underscores else name

    # children of each node, rank by rank (species are sorted by ancestry already)
    def build(rows: np.ndarray, pos: int) -> str:
        codes = anc[rows, pos]
        parts = []
        # unique in order of first appearance
        _, first = np.unique(codes, return_index=True)
        for start in np.sort(first):
            code = codes[start]
            sub = rows[codes == code]
            name = clean(lineage.iat[sub[0], pos])
            if pos == len(RANKS) - 1:
                parts.append(f"{name}:{lengths[pos]}")
            else:
                parts.append(f"{build(sub, pos + 1)}{name}:{lengths[pos]}")
        return "(" + ",".join(parts) + ")"

    return build(np.arange(len(world.species_names)), 0) + ";"
