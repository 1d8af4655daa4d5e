"""Null calibration of treeprobe's tests: how often does each test reject in worlds where the
tree of life is *not* in the embeddings (false-positive rate), and how often when it is (power)?

    python analyses/null_calibration.py --replicates 200 --permutations 199 \\
        --out analyses/null_calibration_results.json

For every world × replicate a fresh world is drawn (seeded), every registered test is run on it
(seeded), and the p-values are stored. A test rejects when ``p <= alpha`` (0.05). The table gives,
per world and test, the rejection rate with an exact (Clopper-Pearson) binomial 95 % interval and
a verdict: *calibrated* (the interval contains alpha), *conservative* (entirely below) or
*anti-conservative* (entirely above); for the worlds with a tree signal the rate is the power.
Results are written as the run goes (atomically, every few seconds) and a run with the same
settings resumes where the file stops. See ``analyses/NULL_CALIBRATION.md``.

Registry of tests
-----------------
A test is a function ``fn(data, *, seed, permutations)`` of a :class:`~treeprobe.core.TreeData`
returning a p-value, ``(statistic, p_value)``, a dict / object with ``statistic`` and ``p_value``;
a *family* returns ``{test name: one of those}`` (several tests from one call)::

    register_test("my-test", lambda data, seed, permutations: my_p_value(data, seed=seed, B=permutations))
    register_family("my-family", table_family(my_tl_tool, "my-family"))  # one test per row of its table

(add such lines after the ``register_family("mantel", ...)`` line below; ``my_p_value`` and
``my_tl_tool`` stand for the new tests' functions). The ``mantel`` family runs ``tl.mantel`` under every
permutation scheme it offers and names its rows ``mantel/<level>/<method>/<scheme>``
(``mantel/<level>/<method>`` for a table without a ``scheme`` column).

Null worlds (each ``fn(seed) -> TreeData``; ``WORLDS``)
-------------------------------------------------------
``iid-gaussian``      iid Gaussian vectors on the real taxonomy of 400 BioCLIP-2 items
``shuffled-images``   400 real BioCLIP-2 vectors shuffled against their labels (images exchangeable)
``species-clusters``  130 species (1-6 images each) of a simulated tree; each species its own random
                      cluster (species means iid), nothing shared above species
``size-by-kingdom``   220 species of a simulated tree; 4 images per species in one kingdom, 1 elsewhere;
                      vectors share a mean direction (mean pairwise cosine ~0.6), species means iid
``shuffled-species``  ~450 real BioCLIP-2 images; whole species' image sets reassigned to other species'
                      lineages (within-species structure real, tree unrelated)

Power worlds ``brownian-<f>``: :func:`treeprobe.simulate.simulate_world` (2 kingdoms, 1-3 images per
species, ~400 images) with ``signal = f`` × the default 1.0 (``DEFAULT_SIGNALS``: 0 to 0.04; at the
default signal every test has power 1); ``brownian-0`` is a null world too.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from treeprobe import tl  # noqa: E402,F401  (for one-line registrations below)
from treeprobe._utils import RANKS  # noqa: E402
from treeprobe.compare import species_units  # noqa: E402,F401  (the tree's leaves, as tl.mantel's units)
from treeprobe.core import TreeData  # noqa: E402

__all__ = [
    "ALPHA", "TESTS", "WORLDS", "World", "register_test", "register_family", "table_family", "run_tests",
    "register_world", "power_worlds", "species_units", "code_digest", "iid_gaussian", "shuffled_images",
    "species_clusters", "size_by_kingdom", "shuffled_species", "brownian", "run_calibration", "summarise",
    "verdict", "binomial_ci", "format_table", "markdown_table", "main", "DEFAULT_SIGNALS", "NULL_WORLDS",
]

ALPHA = 0.05
#: Signal strengths of the power curve, as fractions of simulate_world's default signal (1.0).
# Measured (20 draws, 99 permutations): at 0.02 every Mantel test already rejects in >= 85 % of worlds,
# at 0.1 its r is ~0.3, so the curve lives far below the default signal.
DEFAULT_SIGNALS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04)
SAVE_EVERY_S = 5.0


# ============================================================================================
# Registry of tests
# ============================================================================================

@dataclass(frozen=True)
class _Entry:
    name: str
    fn: Callable
    family: bool


#: Registry: entry name -> test or family. Families expand into several test names when run.
TESTS: dict[str, _Entry] = {}


def register_test(name: str, fn: Callable | None = None, *, replace: bool = False):
    """Register ``fn(data, *, seed, permutations)`` -> p-value, ``(statistic, p_value)``, or a dict /
    object with ``statistic`` and ``p_value``, under ``name``. Usable as a decorator."""
    def deco(f):
        _add(_Entry(name, f, family=False), replace)
        return f
    return deco if fn is None else deco(fn)


def register_family(name: str, fn: Callable | None = None, *, replace: bool = False):
    """Register ``fn(data, *, seed, permutations)`` -> ``{test name: result}`` (results as in
    :func:`register_test`): several tests from one call (e.g. every row of a tl table)."""
    def deco(f):
        _add(_Entry(name, f, family=True), replace)
        return f
    return deco if fn is None else deco(fn)


def _add(entry: _Entry, replace: bool) -> None:
    if "/" in entry.name and entry.family:
        raise ValueError(f"family names have no '/': {entry.name!r}")
    if entry.name in TESTS and not replace:
        raise ValueError(f"a test named {entry.name!r} is already registered (pass replace=True)")
    TESTS[entry.name] = entry


def unregister(name: str) -> None:
    """Remove a registry entry (for tests of the harness)."""
    TESTS.pop(name, None)


def table_family(fn: Callable, prefix: str | None = None, keys: Sequence[str] = ("level", "method", "scheme"),
                 **kwargs) -> Callable:
    """A family from a tl-style function ``fn(data, *, permutations, seed, **kwargs)`` returning a table
    with columns ``statistic`` and ``p_value``: one test per row, named ``<prefix>/<key values>`` from the
    ``keys`` columns the table has (``mantel/image/pearson``, or ``mantel/image/pearson/species`` once the
    table has a ``scheme`` column). Rows are read generically, so rows a new version of ``fn`` adds
    appear as new tests; two rows with one name are an error (pass other ``keys``)."""
    pre = prefix or fn.__name__

    def family(data, *, seed, permutations):
        table = fn(data, permutations=permutations, seed=seed, **kwargs)
        out = {}
        for _, row in table.iterrows():
            key = "/".join(str(row[k]).replace(" ", "") for k in keys if k in table.columns and pd.notna(row[k]))
            name = f"{pre}/{key}" if key else pre
            if name in out:
                raise ValueError(f"two rows of {fn.__name__}'s table are both named {name!r}: pass keys= "
                                 f"with more of its columns ({', '.join(map(str, table.columns))})")
            out[name] = (row.get("statistic", np.nan), row["p_value"])
        return out

    family.__name__ = f"{pre}_family"
    return family


def _as_result(value) -> tuple[float, float]:
    """(statistic, p_value) from a p-value, a pair, a dict or an object with those attributes."""
    if isinstance(value, Mapping):
        return float(value.get("statistic", np.nan)), float(value["p_value"])
    if hasattr(value, "p_value"):
        return float(getattr(value, "statistic", np.nan)), float(value.p_value)
    if isinstance(value, (tuple, list)):
        stat, p = value
        return float(stat), float(p)
    return float("nan"), float(value)


def _pattern_selects(entry: str, patterns: Sequence[str] | None) -> bool:
    """Whether an entry runs under ``patterns`` (fnmatch on test names): it does when a pattern matches
    its name or its first ``/`` part (``mantel/*`` runs the family ``mantel``), or starts with a wildcard."""
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(entry, p) or fnmatch.fnmatchcase(entry, p.split("/")[0]) or p[:1] in "*?["
               for p in patterns)


def _name_selected(name: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split("/")[0], p)
                               for p in patterns)


def _sub_seed(*keys) -> int:
    """A 32-bit seed from integers and strings (strings by CRC32, so it does not depend on run order)."""
    ints = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def run_tests(data: TreeData, *, seed: int, permutations: int, tests: Sequence[str] | None = None
              ) -> dict[str, dict]:
    """Run the selected registry entries on ``data``: {test name: {statistic, p_value, seconds}}.

    Each entry gets its own seed from ``seed`` and its name, so adding a test changes no other.
    ``tests``: fnmatch patterns on test names (None: all)."""
    out: dict[str, dict] = {}
    for entry in list(TESTS.values()):
        if not _pattern_selects(entry.name, tests):
            continue
        t0 = time.perf_counter()
        value = entry.fn(data, seed=_sub_seed(seed, entry.name), permutations=permutations)
        dt = time.perf_counter() - t0
        results = value if entry.family else {entry.name: value}
        for name, res in results.items():
            if _name_selected(name, tests):
                stat, p = _as_result(res)
                out[name] = dict(statistic=stat, p_value=p, seconds=dt / max(len(results), 1))
    return out


def _mantel_family(data, *, seed, permutations):
    """Every row of ``tl.mantel`` with its default levels and methods, under every permutation scheme it
    offers (``tl.MANTEL_SCHEMES``, when it has the ``permute`` argument), so the old and new p-values of
    one statistic are measured side by side."""
    import inspect

    from treeprobe import tl

    kw = {}
    if "permute" in inspect.signature(tl.mantel).parameters and hasattr(tl, "MANTEL_SCHEMES"):
        kw["permute"] = tuple(tl.MANTEL_SCHEMES)
    return table_family(tl.mantel, "mantel", **kw)(data, seed=seed, permutations=permutations)


# Today's tests: every row of tl.mantel (image / species-centroid × pearson / spearman [× scheme], and
# whatever levels tl.mantel runs by default once new ones are added), named mantel/<level>/<method>[/<scheme>].
register_family("mantel", _mantel_family)


#: The covariate column of the worlds made for the partial Mantel test (see :func:`covariate_confound`).
COVARIATE = "source"


def _partial_family(data, *, seed, permutations):
    """The partial Mantel row of ``tl.mantel(control=COVARIATE)`` (worlds without the column: no test)."""
    if COVARIATE not in data.items.columns:
        return {}
    table = tl.mantel(data, methods=("pearson",), levels=("image",), control=COVARIATE, permutations=permutations,
                      seed=seed)
    return {f"partial/{COVARIATE}/{row.scheme}".replace(" ", ""): (row.statistic, row.p_value)
            for row in table.itertuples() if row.method == "pearson (partial)"}


register_family("partial", _partial_family)


def _physignal_family(data, *, seed, permutations):
    """K_mult of the species centroids on the rank taxonomy, both permutation schemes of ``tl.physignal``
    (size strata, the default; free, geomorph's), named physignal/<scheme>."""
    out = {}
    for scheme in ("size-strata", "free"):
        try:
            res = tl.physignal(data, permutations=permutations, seed=seed, n_axes=0, permute=scheme)
        except TreeprobeError:  # fewer than 3 species, or no variation
            continue
        out[f"physignal/{scheme}"] = (res.statistic, res.p_value)
    return out


register_family("physignal", _physignal_family)


def _tree_recovery_family(data, *, seed, permutations):
    """The species-level recovered-tree scores of ``tl.tree_recovery`` (UPGMA; cophenetic r, nRF, split
    recall, and genus / family monophyly and purity), under both permutation schemes (size strata, the
    default; free), named tree-recovery/<statistic>[/<rank>]/<scheme>."""
    out = {}
    for scheme in ("size-strata", "free"):
        try:
            res = tl.tree_recovery(data, permutations=permutations, seed=seed, permute=scheme)
        except TreeprobeError:  # fewer than 3 leaves
            continue
        row = res.summary.iloc[0]
        for key in ("cophenetic_r", "nrf", "split_recall"):
            out[f"tree-recovery/{key}/{scheme}"] = (row[key], row[f"{key}_p"])
        ranks = res.ranks.set_index("rank")
        for rank in ("family", "genus"):
            if rank in ranks.index:
                for key in ("purity", "monophyly"):
                    out[f"tree-recovery/{key}/{rank}/{scheme}"] = (ranks.loc[rank, key], ranks.loc[rank, f"{key}_p"])
    return out


register_family("tree-recovery", _tree_recovery_family)

#: Where a world stores its second model's embeddings (paired-comparison worlds).
SECOND_MODEL = "X_model_b"


def _compare_family(data, *, seed, permutations, clustering: bool = False):
    """Every paired difference test of ``treeprobe.compare.compare`` between the world's two models
    (``data.X`` and ``data.obsm[SECOND_MODEL]``), named compare/<metric>/<rank> (compare-clustering/... for
    the clustering rows); worlds with one model:
    no test. Mantel (199 bootstrap draws) and kNN differences (10-group jackknife); with ``clustering``, the
    k-means differences only (each jackknife group re-clustered: ~20x the cost, so a family of its own)."""
    if SECOND_MODEL not in data.obsm:
        return {}
    from treeprobe.compare import compare

    b = TreeData(np.ascontiguousarray(data.obsm[SECOND_MODEL], dtype=np.float32), data.items)
    a = TreeData(data.X, data.items)
    comp = compare({"a": a, "b": b}, on="row", seed=seed, permutations=19, bootstrap=199, similarity=False,
                   distance_profiles=False, cluster_methods=("kmeans",) if clustering else (),
                   chance_permutations=2)
    rows = comp.differences
    rows = rows[rows.metric.str.startswith("kmeans")] if clustering else rows
    prefix = "compare-clustering" if clustering else "compare"
    return {f"{prefix}/{r.metric}/{r.rank}".replace(" ", "_"): (r.difference, r.p_value) for r in rows.itertuples()}


register_family("compare", _compare_family)
register_family("compare-clustering", functools.partial(_compare_family, clustering=True))


# ============================================================================================
# Worlds
# ============================================================================================

@dataclass(frozen=True)
class World:
    """A generator ``make(seed) -> TreeData``; ``null``: no tree signal (rejections are false positives)."""
    name: str
    make: Callable[[int], TreeData]
    null: bool
    description: str = ""
    params: dict = field(default_factory=dict)


#: Registry of worlds: name -> World.
WORLDS: dict[str, World] = {}


def register_world(name: str, make: Callable[[int], TreeData], *, null: bool = True, description: str = "",
                   replace: bool = False, **params) -> World:
    """Register a world (``make(seed) -> TreeData``)."""
    if name in WORLDS and not replace:
        raise ValueError(f"a world named {name!r} is already registered")
    WORLDS[name] = World(name, make, null, description, params or _default_params(make))
    return WORLDS[name]


def _default_params(make: Callable) -> dict:
    """The keyword defaults of a generator (those of a functools.partial included), for the results file."""
    import inspect

    out = {}
    try:
        for k, v in inspect.signature(make).parameters.items():
            if v.default is not inspect.Parameter.empty:
                out[k] = list(v.default) if isinstance(v.default, tuple) else v.default
    except (TypeError, ValueError):  # pragma: no cover
        pass
    return out


@functools.lru_cache(maxsize=1)
def _bioclip():
    """(X float32 (N, 768) as released, path + rank columns (N × 8), species units (N,), species known (N,))
    of the bundled set."""
    from treeprobe.datasets import bioclip2_1k

    ds = bioclip2_1k()
    items = ds.items[list(RANKS)].copy()
    items.insert(0, "path", ds.items["path"] if "path" in ds.items.columns else "")
    units = species_units(ds)
    return ds.X.copy(), items, units, np.asarray(ds.taxonomy.codes(RANKS[-1])) >= 0


def _tree_data(X: np.ndarray, items: pd.DataFrame, source: str, **info) -> TreeData:
    data = TreeData(np.ascontiguousarray(X, dtype=np.float32), items.reset_index(drop=True), source=source)
    data.uns["world"] = dict(source=source, **info)
    return data


def _simulated_lineages(seed: int, n_species: int, *, n_kingdoms: int = 3) -> pd.DataFrame:
    """Lineages (n_species × 7, in tree order) of ``n_species`` species drawn at random from a
    simulate_world tree (default shape, ~300 species); trees with too few species are redrawn."""
    from treeprobe.simulate import simulate_world

    for attempt in range(1000):
        w = simulate_world(seed=_sub_seed(seed, "tree", attempt), n_kingdoms=n_kingdoms, dim=1, trait_dim=1,
                           images_per_species=1)
        if w.n_species >= n_species:
            break
    else:  # pragma: no cover
        raise ValueError(f"no simulated tree with {n_species} species")
    rng = np.random.default_rng(_sub_seed(seed, "species"))
    pick = np.sort(rng.choice(w.n_species, n_species, replace=False))
    return w.species_lineage.iloc[pick].reset_index(drop=True)


def _items(lineage: pd.DataFrame, sizes: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    codes = np.repeat(np.arange(len(lineage)), sizes)
    items = lineage.iloc[codes].reset_index(drop=True)
    items.insert(0, "path", "")
    return items, codes


def iid_gaussian(seed: int, *, n: int = 400, dim: int = 128) -> TreeData:
    """(a) iid N(0, I) vectors (``dim``) on the lineages of ``n`` random items of the bundled BioCLIP-2 set."""
    X0, items0, _, _ = _bioclip()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items0), n, replace=False))
    return _tree_data(rng.standard_normal((n, dim)), items0.iloc[idx], "iid-gaussian", n=n, dim=dim)


def shuffled_images(seed: int, *, n: int = 400) -> TreeData:
    """(b) ``n`` random items of the bundled BioCLIP-2 set, their real vectors shuffled among them."""
    X0, items0, _, _ = _bioclip()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items0), n, replace=False))
    return _tree_data(X0[idx][rng.permutation(n)], items0.iloc[idx], "shuffled-images", n=n)


def species_clusters(seed: int, *, n_species: int = 130, images: tuple[int, int] = (1, 6), dim: int = 128,
                     noise: float = 0.5) -> TreeData:
    """(c) ``n_species`` species of a simulated tree, ``images`` (inclusive range, uniform) images each;
    species means iid N(0, I), images = mean + ``noise`` · N(0, I): clusters unrelated to the tree."""
    lineage = _simulated_lineages(seed, n_species)
    rng = np.random.default_rng(_sub_seed(seed, "vectors"))
    sizes = rng.integers(images[0], images[1] + 1, size=n_species)
    items, codes = _items(lineage, sizes)
    means = rng.standard_normal((n_species, dim))
    X = means[codes] + noise * rng.standard_normal((len(codes), dim))
    return _tree_data(X, items, "species-clusters", n_species=n_species, images=list(images), dim=dim,
                      noise=noise, sizes=sizes.tolist())


def size_by_kingdom(seed: int, *, n_species: int = 220, big: int = 4, kingdom: str = "random", dim: int = 128,
                    mean_cosine: float = 0.6, species_share: float = 0.5) -> TreeData:
    """(d) ``n_species`` species of a simulated tree (3 kingdoms); ``big`` images per species in one kingdom
    (``kingdom``: "random" or "largest" among the drawn species), 1 elsewhere. Image =
    sqrt(mean_cosine)·mu + species mean + image noise, mu a shared random unit direction, species means and
    noise iid N(0, v/dim · I) with v = (1 − mean_cosine) split ``species_share`` : 1 − ``species_share``,
    so cosine ≈ mean_cosine between species and ≈ mean_cosine + species_share·(1 − mean_cosine) within."""
    lineage = _simulated_lineages(seed, n_species)
    rng = np.random.default_rng(_sub_seed(seed, "vectors"))
    counts = lineage["kingdom"].value_counts()
    k1 = counts.index[0] if kingdom == "largest" else rng.choice(np.sort(counts.index.to_numpy()))
    sizes = np.where(lineage["kingdom"].to_numpy() == k1, big, 1)
    items, codes = _items(lineage, sizes)
    mu = rng.standard_normal(dim)
    mu /= np.linalg.norm(mu)
    rest = 1.0 - mean_cosine
    means = rng.standard_normal((n_species, dim)) * math.sqrt(rest * species_share / dim)
    X = math.sqrt(mean_cosine) * mu + means[codes]
    X = X + rng.standard_normal(X.shape) * math.sqrt(rest * (1 - species_share) / dim)
    return _tree_data(X, items, "size-by-kingdom", n_species=n_species, big=big, big_kingdom=str(k1), dim=dim,
                      mean_cosine=mean_cosine, species_share=species_share)


def shuffled_species(seed: int, *, n: int = 450) -> TreeData:
    """(e) Real BioCLIP-2 images of random species (in random order, until ``n`` images are reached; items
    whose species is unknown are left out), each species' whole image set given the lineage of another of
    those species (a random permutation): within-species structure real, the tree above it unrelated."""
    X0, items0, codes0, known = _bioclip()
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.unique(codes0[known]))
    sizes = np.bincount(codes0)[order]
    chosen = order[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    pi = chosen[rng.permutation(len(chosen))]  # species chosen[i] takes the lineage of pi[i]
    first = np.full(int(codes0.max()) + 1, -1)
    first[codes0[::-1]] = np.arange(len(codes0))[::-1]
    rows, lineage_rows = [], []
    for s, t in zip(chosen, pi):
        idx = np.flatnonzero(codes0 == s)
        rows.append(idx)
        lineage_rows.append(np.full(len(idx), first[t]))
    rows, lineage_rows = np.concatenate(rows), np.concatenate(lineage_rows)
    items = items0.iloc[lineage_rows].reset_index(drop=True)
    items["path"] = items0["path"].iloc[rows].to_numpy()
    return _tree_data(X0[rows], items, "shuffled-species", n=int(len(rows)), n_species=int(len(chosen)),
                      source_rows=rows.tolist())


def brownian(seed: int, *, fraction: float, n_kingdoms: int = 2, images_per_species=(1, 3), **kwargs) -> TreeData:
    """Known truth: :func:`treeprobe.simulate.simulate_world` with ``signal = fraction`` × 1.0 (its default;
    noise 0.5), 2 kingdoms and 1-3 images per species (~200 species, ~400 images)."""
    from treeprobe.simulate import simulate_world

    w = simulate_world(seed=seed, signal=float(fraction), n_kingdoms=n_kingdoms,
                       images_per_species=images_per_species, **kwargs)
    return _tree_data(w.embeddings, w.items[["path", *RANKS]], f"brownian-{fraction:g}", fraction=fraction)


def power_worlds(fractions: Sequence[float] = DEFAULT_SIGNALS, *, replace: bool = True) -> list[str]:
    """Register ``brownian-<f>`` for each fraction; returns their names."""
    names = []
    for f in fractions:
        name = f"brownian-{float(f):g}"
        register_world(name, functools.partial(brownian, fraction=float(f)), null=float(f) == 0.0,
                       description=f"simulate_world, signal {float(f):g} × default", replace=replace)
        names.append(name)
    return names


def covariate_confound(seed: int, *, n_species: int = 220, images: tuple[int, int] = (1, 4), dim: int = 128,
                       follow: float = 0.8, effect: float = 1.0, noise: float = 0.5) -> TreeData:
    """Null world of the partial Mantel test: a two-category covariate (``source``, as photo source) that
    follows the tree (each kingdom has a majority category, taken by ``follow`` of its species' images) and
    shifts the embeddings (``effect`` × a shared random direction), on species clusters that are unrelated
    to the tree otherwise (species means iid). The plain Mantel test rejects here (the covariate follows
    the tree); the partial test, given the covariate, should not."""
    lineage = _simulated_lineages(seed, n_species)
    rng = np.random.default_rng(_sub_seed(seed, "vectors"))
    sizes = rng.integers(images[0], images[1] + 1, size=n_species)
    items, codes = _items(lineage, sizes)
    kingdoms = np.sort(items["kingdom"].unique())
    major = dict(zip(kingdoms, rng.integers(0, 2, size=len(kingdoms))))
    base = items["kingdom"].map(major).to_numpy()
    source = np.where(rng.random(len(items)) < follow, base, 1 - base)
    u = rng.standard_normal(dim)
    u *= effect / np.linalg.norm(u) * math.sqrt(dim) / 4
    X = rng.standard_normal((n_species, dim))[codes] + noise * rng.standard_normal((len(codes), dim))
    X = X + source[:, None] * u
    items[COVARIATE] = np.where(source == 1, "museum", "field")
    return _tree_data(X, items, "covariate-confound", n_species=n_species, follow=follow, effect=effect)


def _two_models(data: TreeData, noise: float, noise_b: float, seed: int, name: str) -> TreeData:
    """``data`` with two noisy copies of its embeddings: model a = X + noise·N(0, I), model b =
    X + noise_b·N(0, I) (in ``obsm[SECOND_MODEL]``), noise scaled to the embeddings' per-coordinate sd."""
    rng = np.random.default_rng(_sub_seed(seed, "models"))
    X = np.asarray(data.X, dtype=np.float64)
    scale = float(X.std())
    a = X + noise * scale * rng.standard_normal(X.shape)
    b = X + noise_b * scale * rng.standard_normal(X.shape)
    out = _tree_data(a, data.items, name, noise=noise, noise_b=noise_b)
    out.obsm[SECOND_MODEL] = b.astype(np.float32)
    return out


def same_model_simulated(seed: int, *, noise: float = 1.0, noise_b: float | None = None) -> TreeData:
    """Paired-comparison null: a Brownian world (``simulate_world``, signal 0.05 × default, 1-3 images per
    species) seen by two models that are the same model with independent noise of equal size, so every
    difference between them is zero in expectation (``noise_b`` > ``noise``: model b is worse: power)."""
    base = brownian(_sub_seed(seed, "base"), fraction=0.05)
    return _two_models(base, noise, noise if noise_b is None else noise_b, seed,
                       "same-model" if noise_b is None else f"degraded-{noise_b:g}")


#: The small world of the clustering paired tests: ~50 species, ~100 images, 16-d (so that 200 worlds of
#: 11 k-means fits per model and rank run in minutes, not hours).
SMALL_BRANCHING = ((1, 2), (1, 2), (1, 2), (1, 2), (2, 3), (1, 3))


def same_model_small(seed: int, *, noise: float = 1.0) -> TreeData:
    """Paired-comparison null, small: a Brownian world (signal 0.05 × default, 2 kingdoms,
    :data:`SMALL_BRANCHING`, 1-3 images per species, 16-d) seen by two models = the same model with
    independent equal noise."""
    base = brownian(_sub_seed(seed, "base"), fraction=0.05, dim=16, trait_dim=16, branching=SMALL_BRANCHING)
    return _two_models(base, noise, noise, seed, "same-model-small")


def same_model_real(seed: int, *, n: int = 400, noise: float = 1.0) -> TreeData:
    """Paired-comparison null on real vectors: ``n`` random BioCLIP-2 items, two models = the real vectors
    plus independent noise of equal size."""
    X0, items0, _, _ = _bioclip()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items0), n, replace=False))
    return _two_models(_tree_data(X0[idx], items0.iloc[idx], "real"), noise, noise, seed, "same-model-real")


NULL_WORLDS = ("iid-gaussian", "shuffled-images", "species-clusters", "size-by-kingdom", "shuffled-species")
#: Worlds of the partial Mantel and paired-comparison tests (run with --tests 'partial/*' / 'compare/*').
COVARIATE_WORLDS = ("covariate-confound",)
COMPARE_WORLDS = ("same-model", "same-model-real", "same-model-small")
COMPARE_POWER_WORLDS = ("degraded-1.3",)
register_world("iid-gaussian", iid_gaussian, description="(a) iid Gaussian vectors, real taxonomy (400 items)")
register_world("shuffled-images", shuffled_images, description="(b) real vectors shuffled against labels")
register_world("species-clusters", species_clusters,
               description="(c) each species a random cluster (130 species, 1-6 images)")
register_world("size-by-kingdom", size_by_kingdom,
               description="(d) 4 images/species in one kingdom, 1 elsewhere; shared direction (cos 0.6)")
register_world("shuffled-species", shuffled_species,
               description="(e) real vectors, whole species reassigned to other species' lineages")
power_worlds(DEFAULT_SIGNALS)
register_world("covariate-confound", covariate_confound,
               description="(f) a 2-category covariate that follows the tree and shifts embeddings; no tree signal")
register_world("same-model", same_model_simulated,
               description="(g) two models = one Brownian world + independent equal noise (paired null)")
register_world("same-model-real", same_model_real,
               description="(h) two models = 400 real BioCLIP-2 vectors + independent equal noise (paired null)")
register_world("same-model-small", same_model_small,
               description="(i) two models = a small Brownian world (~100 images, 16-d) + independent equal noise")
register_world("degraded-1.3", functools.partial(same_model_simulated, noise_b=1.3), null=False,
               description="power of the paired tests: model b has 1.3x the noise of model a")


# ============================================================================================
# Running and summarising
# ============================================================================================

def binomial_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion: scipy's binomtest(...).proportion_ci."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n), ALPHA).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def verdict(low: float, high: float, alpha: float = ALPHA, null: bool = True) -> str:
    """calibrated (interval contains alpha), conservative (entirely below), anti-conservative (above);
    "power" for worlds with a tree signal."""
    if not null:
        return "power"
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no data"
    if high < alpha:
        return "conservative"
    if low > alpha:
        return "anti-conservative"
    return "calibrated"


def code_digest() -> dict:
    """SHA-1 (12 hex digits) of the treeprobe package sources and of this script, and the git commit:
    the checkout changes under a long run, so every results file says which code made it."""
    import hashlib
    import subprocess

    h = hashlib.sha1()
    for f in sorted((REPO / "treeprobe").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        commit = ""
    return dict(treeprobe_sources=h.hexdigest()[:12],
                script=hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12], git_commit=commit)


def _task_seeds(seed: int, world: str, rep: int) -> tuple[int, int]:
    return _sub_seed(seed, world, rep, "world"), _sub_seed(seed, world, rep, "tests")


def run_task(world: str, rep: int, seed: int, permutations: int, tests: Sequence[str] | None) -> dict:
    """One replicate of one world: draw it, run the tests; a JSON-ready record."""
    w_seed, t_seed = _task_seeds(seed, world, rep)
    t0 = time.perf_counter()
    data = WORLDS[world].make(w_seed)
    res = run_tests(data, seed=t_seed, permutations=permutations, tests=tests)
    return dict(world=world, replicate=rep, world_seed=w_seed, n_items=len(data),
                n_species=int(species_units(data).max()) + 1, seconds=time.perf_counter() - t0,
                results={k: [v["statistic"], v["p_value"]] for k, v in res.items()})


def _worker_init():  # pragma: no cover - runs in child processes
    """One thread per worker process: BLAS and the Mantel permutation threads."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    import treeprobe.mantel as m

    m.available_cpus = lambda: 1  # the permutation loop asks this how many threads to start


def _run_task_star(args):  # pragma: no cover - runs in child processes
    return run_task(*args)


def _config(worlds, replicates, permutations, seed, tests, alpha) -> dict:
    return dict(worlds=list(worlds), permutations=int(permutations), seed=int(seed),
                tests=None if tests is None else list(tests), alpha=alpha,
                world_params={w: WORLDS[w].params for w in worlds})


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"), default=_json_default)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def _jsonable(o):
    return json.loads(json.dumps(o, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def run_calibration(worlds: Sequence[str], *, replicates: int, permutations: int, seed: int = 0,
                    tests: Sequence[str] | None = None, out: str | Path | None = None, jobs: int = 1,
                    progress: bool = True, alpha: float = ALPHA, overwrite: bool = False) -> dict:
    """Run every world × replicate (replicate-major order, so a partial run covers all worlds) and
    return ``{"config", "records", "summary", ...}``; with ``out`` the file is rewritten as results
    come in and an existing file with the same config is resumed (its records kept)."""
    from tqdm.auto import tqdm

    for w in worlds:
        if w not in WORLDS:
            raise ValueError(f"unknown world {w!r}; known: {', '.join(WORLDS)}")
    config = _config(worlds, replicates, permutations, seed, tests, alpha)
    records: list[dict] = []
    path = Path(out) if out is not None else None
    started = time.time()
    if path is not None and path.exists() and not overwrite:
        old = json.loads(path.read_text())
        oc = old.get("config", {})
        same = all(_jsonable(oc.get(k)) == _jsonable(config[k]) for k in ("permutations", "seed", "tests", "alpha"))
        same &= all(_jsonable(oc.get("world_params", {})[w]) == _jsonable(config["world_params"][w])
                    for w in worlds if w in oc.get("world_params", {}))
        if not same:
            raise SystemExit(f"{path} holds a run with other settings ({oc}); pass --overwrite or another --out")
        records = old.get("records", [])
        config["worlds"] = list(dict.fromkeys(old["config"]["worlds"] + list(worlds)))
        config["world_params"] = {w: WORLDS[w].params for w in config["worlds"] if w in WORLDS}
        started -= float(old.get("elapsed_s", 0.0))
    done = {(r["world"], r["replicate"]) for r in records}
    todo = [(w, r) for r in range(replicates) for w in worlds if (w, r) not in done]
    meta = dict(machine=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
                python=platform.python_version(), command=" ".join(sys.argv), jobs=jobs, code=code_digest())

    def snapshot():
        return dict(config=config, meta=meta, elapsed_s=time.time() - started, records=records,
                    summary=summarise(records, alpha=alpha).to_dict(orient="records"))

    last = time.time()
    bar = tqdm(total=len(todo), desc="null calibration", disable=not progress, dynamic_ncols=True)
    args = [(w, r, seed, permutations, tests) for w, r in todo]
    def collect(results) -> None:
        nonlocal last
        for rec in results:
            records.append(rec)
            bar.set_postfix_str(rec["world"])
            bar.update()
            if path is not None and time.time() - last > SAVE_EVERY_S:
                _write_json(path, snapshot())
                last = time.time()

    try:
        if jobs > 1 and len(args) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
                collect(pool.imap_unordered(_run_task_star, args))
        else:
            collect(run_task(*a) for a in args)
    finally:
        bar.close()
        if path is not None:
            _write_json(path, snapshot())
    return snapshot()


def summarise(records: Sequence[dict], *, alpha: float = ALPHA) -> pd.DataFrame:
    """World × test: n, rejections (p <= alpha), rate, exact 95 % interval, verdict, mean statistic."""
    rows = []
    for rec in records:
        for test, (stat, p) in rec["results"].items():
            rows.append((rec["world"], test, stat, p))
    cols = ["world", "test", "n", "rejections", "rate", "ci_low", "ci_high", "verdict", "mean_statistic",
            "n_nan"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=["world", "test", "statistic", "p_value"])
    world_order = list(dict.fromkeys(df["world"]))
    test_order = list(dict.fromkeys(df["test"]))
    out = []
    for (world, test), g in df.groupby(["world", "test"], sort=False):
        p = pd.to_numeric(g["p_value"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(p)
        n, k = int(ok.sum()), int((p[ok] <= alpha).sum())
        lo, hi = binomial_ci(k, n)
        null = WORLDS[world].null if world in WORLDS else True
        out.append(dict(world=world, test=test, n=n, rejections=k, rate=k / n if n else float("nan"),
                        ci_low=lo, ci_high=hi, verdict=verdict(lo, hi, alpha, null),
                        mean_statistic=_nanmean(g["statistic"]), n_nan=int((~ok).sum())))
    res = pd.DataFrame(out, columns=cols)
    res["_w"] = res["world"].map({w: i for i, w in enumerate(world_order)})
    res["_t"] = res["test"].map({t: i for i, t in enumerate(test_order)})
    return res.sort_values(["_w", "_t"]).drop(columns=["_w", "_t"]).reset_index(drop=True)


def _nanmean(values) -> float:
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _rows(summary: pd.DataFrame):
    for r in summary.itertuples(index=False):
        yield (r.world, r.test, f"{r.rejections}/{r.n}", f"{r.rate:.3f}", f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
               r.verdict, f"{r.mean_statistic:.3f}")


_HEADER = ("world", "test", "rejected", "rate", "exact 95 % CI", "verdict", "mean stat")


def format_table(summary: pd.DataFrame) -> str:
    """A plain-text table of :func:`summarise`."""
    rows = [_HEADER, *_rows(summary)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_HEADER))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(summary: pd.DataFrame) -> str:
    """A Markdown table of :func:`summarise`."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(summary)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=200, help="worlds drawn per world type (default 200)")
    ap.add_argument("--permutations", type=int, default=199, help="permutations per test (default 199)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (written as it goes; resumed)")
    ap.add_argument("--worlds", nargs="+", default=None,
                    help=f"world names or fnmatch patterns (default: all); known: {', '.join(WORLDS)}")
    ap.add_argument("--signals", type=float, nargs="+", default=None,
                    help=f"power-curve signal fractions (default {' '.join(map(str, DEFAULT_SIGNALS))})")
    ap.add_argument("--tests", nargs="+", default=None, help="fnmatch patterns on test names (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each single-threaded)")
    ap.add_argument("--alpha", type=float, default=ALPHA)
    ap.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds other settings")
    ap.add_argument("--report", action="store_true", help="only print the table of an existing --out")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    if args.report:
        if args.out is None:
            ap.error("--report needs --out")
        obj = json.loads(args.out.read_text())
        summary = summarise(obj["records"], alpha=obj["config"].get("alpha", ALPHA))
    else:
        if args.signals is not None:
            for name in [w for w in WORLDS if w.startswith("brownian-")]:
                del WORLDS[name]
            power_worlds(args.signals)
        names = list(WORLDS)
        worlds = names if args.worlds is None else [w for w in names if any(fnmatch.fnmatchcase(w, p)
                                                                            for p in args.worlds)]
        if not worlds:
            ap.error(f"no world matches {args.worlds}; known: {', '.join(names)}")
        t0 = time.time()
        obj = run_calibration(worlds, replicates=args.replicates, permutations=args.permutations, seed=args.seed,
                              tests=args.tests, out=args.out, jobs=args.jobs, progress=not args.quiet,
                              alpha=args.alpha, overwrite=args.overwrite)
        summary = summarise(obj["records"], alpha=args.alpha)
        print(f"{len(obj['records'])} world draws, {time.time() - t0:.0f} s this call "
              f"({obj['elapsed_s']:.0f} s in all), {args.permutations} permutations, alpha {args.alpha}",
              file=sys.stderr)
    print(markdown_table(summary) if args.markdown else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
