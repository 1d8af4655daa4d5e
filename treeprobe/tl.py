"""Tools: compute on a :class:`~treeprobe.core.TreeData` and store the results in it.

Each tool reads the (cached, L2-normalised) embeddings and the taxonomy of ``data``, calls the
tested pure functions of :mod:`treeprobe.mantel`, :mod:`treeprobe.clustering`,
:mod:`treeprobe.neighbors` and :mod:`treeprobe.embedding_maps`, and stores under stated keys:

=======================  ==========================================================================
tool                     stores
=======================  ==========================================================================
:func:`embed`            a new TreeData with ``X`` from an open_clip model, ``uns["model"]``
:func:`mantel`           ``uns["mantel"]`` (DataFrame, one row per level × method),
                         ``uns["mantel_tree"]`` (which tree), ``uns["mantel_pairs"]`` (pair sample
                         for the figure), ``uns["mantel_not_in_tree"]`` (items outside a ``tree``)
:func:`clustering`       ``uns["clustering"]`` (DataFrame, rank × method, with chance values)
:func:`knn`              ``uns["knn"]`` (DataFrame, one row per rank), ``uns["knn_params"]``
:func:`tsne`, :func:`umap`  ``obsm["X_tsne"]`` / ``obsm["X_umap"]`` (N, 2; NaN for rows not drawn),
                         ``uns["tsne"]`` / ``uns["umap"]`` (subsample, title, seed)
:func:`physignal`        ``uns["physignal"]`` (K_mult of the species centroids: K, p, z, parts),
                         ``uns["physignal_axes"]`` (DataFrame, one row per principal axis),
                         ``uns["physignal_result"]`` (the result, with the permuted K)
:func:`tree_recovery`    ``uns["tree_recovery"]`` (one row per level), ``uns["tree_recovery_ranks"]``
                         (level × rank), ``uns["tree_recovery_result"]`` (with the recovered trees)
:func:`within_species_variation`  ``uns["within_species_variation"]`` (headline numbers),
                         ``uns["within_species_variation_ranks"]`` (DataFrame, one row per rank)
:func:`covariate_alignment`  ``uns["covariate_alignment"]`` (dict), ``uns["covariate_alignment_table"]``
                         (one row per statistic), ``uns["covariate_alignment_result"]``
:func:`text_embeddings`  ``uns["text_embeddings"]`` (text type → rank → (taxa, (T_r, D))), ``uns["text_model"]``
:func:`zeroshot`         ``uns["zeroshot"]`` (text type × rank × mode), ``uns["mistakes"]``,
                         ``uns["mistake_depths"]``, ``uns["zeroshot_result"]``, ``uns["zeroshot_params"]``
:func:`fewshot`          ``uns["fewshot"]`` (summary), ``uns["fewshot_per_seed"]``, ``uns["fewshot_splits"]``
:func:`text_tree`        ``uns["text_tree"]`` (the text tower's tree), ``uns["image_text_alignment"]``
:func:`image_text`       the three above in one call (after :func:`text_embeddings`)
:func:`intrinsic`        all of the above (the tree-level four with ``phylo=True``, the image-text ones
                         with ``image_text=True``) + ``uns["timings"]``;
                         returns the :class:`~treeprobe.report.Report`
:func:`compare`          several TreeData (one per model, same items): every tool on each, paired tests;
                         returns a :class:`~treeprobe.compare.Comparison`
=======================  ==========================================================================

Every stochastic step takes ``seed``; the same call on the same data gives the same numbers.
"""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata as importlib_metadata
from typing import Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import DEFAULT_MAX_MAP_POINTS, MANTEL_FIGURE_PAIRS, SEED_BOUND, SINGLE_THREAD_MAX_ITEMS
from treeprobe._validation import check_choice, check_int
from treeprobe.core import TreeData, skip_records
from treeprobe.errors import TreeprobeError
from treeprobe.mantel import SPEARMAN_MAX_N

__all__ = ["embed", "mantel", "clustering", "knn", "physignal", "tree_recovery", "within_species_variation",
           "covariate_alignment", "text_embeddings", "zeroshot", "fewshot", "text_tree", "image_text",
           "tsne", "umap", "intrinsic", "compare", "check_analysable", "MANTEL_LEVELS", "MANTEL_SCHEMES", "MAPS"]

MANTEL_LEVELS = ("image", "species-centroid")
#: What a Mantel p-value can permute (see :func:`mantel`).
MANTEL_SCHEMES = ("species", "images")
CENTROIDS_PERMUTED_FREELY = ("species centroids permuted freely among tree positions (image counts ignored: "
                             "miscalibrated when the number of images per species varies with the clade)")
MAPS = ("tsne", "umap")



def _check_data(data) -> TreeData:
    if not isinstance(data, TreeData):
        raise TreeprobeError(f"expected a treeprobe.TreeData, got {type(data).__name__}; "
                             "make one with treeprobe.TreeData(X, items) or treeprobe.read(path)")
    return data


def check_analysable(data: TreeData) -> None:
    """Raise unless ``data`` has embeddings, at least 3 items and at least 2 species."""
    _check_data(data).require_embeddings()
    if len(data) < 3:
        raise TreeprobeError(f"only {len(data)} usable item(s) after dropping bad rows; need at least 3")
    tax = data.taxonomy
    last = tax.ranks[-1]
    n_leaves = tax.n_taxa(last) + int((~tax.known(last)).sum()) if tax.unknown == "separate" else tax.n_taxa(last)
    if n_leaves < 2:
        raise TreeprobeError("all items belong to a single taxon "
                             f"({tax.taxon_labels(last)[0] if tax.n_taxa(last) else 'unknown'}): "
                             "there is no tree to compare with")


# --- embeddings from images ------------------------------------------------------------------


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def embed(data: TreeData, *, ckpt=None, model: str | None = None, pretrained: str | None = None,
          cache_dir=None, batch_size: int = 64, workers: int = 0, device: str | None = None,
          progress: bool = True, trust_checkpoint: bool = False) -> TreeData:
    """Embed the images of ``data`` (``items.path``) with an open_clip model; returns a new TreeData.

    The model is a checkpoint file or ``hf-hub:`` id (``ckpt``), or an architecture + pretrained tag
    (see :func:`treeprobe.models.load_model`). Embeddings are cached under ``cache_dir`` (default
    ``$TREEPROBE_CACHE`` or ~/.cache/treeprobe) keyed by checkpoint digest + file listing +
    preprocessing. Unreadable images are set aside in ``skipped``; ``uns["model"]`` says which model.
    """
    from treeprobe._utils import default_cache_dir
    from treeprobe.core import concat_skipped
    from treeprobe.extract import extract_embeddings
    from treeprobe.models import load_model

    _check_data(data)
    if ckpt is None and model is None:
        raise TreeprobeError("images need a model: pass --ckpt CHECKPOINT (and --model ARCH if the "
                             "checkpoint does not name its architecture), or --embeddings")
    loaded = load_model(ckpt=ckpt, model=model, pretrained=pretrained, device=device or default_device(),
                        trust_checkpoint=trust_checkpoint)
    paths = data.items["path"].astype(str).tolist()
    res = extract_embeddings(loaded, paths, batch_size=batch_size, num_workers=workers,
                             cache_dir=str(cache_dir or default_cache_dir()), device=device, progress=progress)
    carried = {k: data.uns[k] for k in ("lineage_conflicts",) if k in data.uns}  # warned about once, at load
    out = TreeData(res.embeddings, data.items[res.ok], skipped=concat_skipped([data.skipped, res.failures]),
                   source=data.source, uns=carried)
    out.uns["model"] = dict(name=loaded.model_name, digest=loaded.digest, source=loaded.source,
                            embed_dim=loaded.embed_dim, extraction_seconds=res.seconds, cache_hit=res.cache_hit,
                            n_images=len(paths))
    return out


# --- Mantel ----------------------------------------------------------------------------------


def _mantel_inputs(data: TreeData, tree, rank_lengths):
    """(unit embeddings of the items on the tree, their clade structure, species codes, tree info, in-tree mask)."""
    from treeprobe.tree import clade_structure_from_tree

    tax = data.taxonomy
    Xn = data.unit
    if tree is not None:
        species = tax.lineages[tax.ranks[-1]].to_numpy()
        clades, in_tree = clade_structure_from_tree(tree, species)
        codes = pd.factorize(species[in_tree], sort=True)[0]
        info = dict(kind="user tree (patristic, branch lengths)", n_items_in_tree=int(in_tree.sum()))
        return Xn[in_tree], clades, codes, info, in_tree
    clades = tax.clade_structure(rank_lengths)
    info = dict(kind="rank taxonomy (patristic, " +
                ("one unit per rank" if rank_lengths is None else f"rank lengths {rank_lengths}") + ")")
    # the units of the species-level tests are the tree's leaves: a species, or an item known only
    # above species (its own leaf: an unknown is not evidence of identity)
    units = np.unique(clades.item_node, return_inverse=True)[1].astype(np.int64)
    return Xn, clades, units, info, np.ones(len(data), dtype=bool)


def _centroid_inputs(X_m: np.ndarray, clades, codes: np.ndarray):
    """One item per species: the unit-norm centroid of its images, placed at that species' node."""
    from treeprobe.mantel import taxon_centroids

    n_sp = int(codes.max()) + 1
    first = np.zeros(n_sp, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]  # first item of each species
    return taxon_centroids(X_m, codes), clades.subset_items(first)


def _pair_sample(Xn: np.ndarray, clades, *, n_pairs: int, seed: int) -> dict:
    """Embedding and tree distances of ``n_pairs`` seeded random item pairs (i ≠ j), for the figure."""
    rng = np.random.default_rng(seed)
    N = len(Xn)
    i = rng.integers(0, N, n_pairs)
    j = rng.integers(0, N, n_pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    d = 1.0 - np.einsum("ij,ij->i", Xn[i], Xn[j])
    t = clades.pair_distances(clades.item_node[i], clades.item_node[j])
    return dict(d_embed=d, d_tree=t)


def _mantel_row(level: str, scheme: str, res) -> dict:
    row = dict(level=level, scheme=scheme, **res.to_dict())
    row["permuted"] = res.details.get("permuted", "")
    return row


def _check_mantel_options(data, methods, levels, permute, control, permutations) -> None:
    """Raise TreeprobeError (one line) for an unknown Mantel method / level / scheme, a ``control`` that
    is not an items column, or a negative number of permutations."""
    from treeprobe.mantel import METHODS as MANTEL_METHODS

    for name in methods:
        check_choice(name, "Mantel method", MANTEL_METHODS)
    for lv in levels:
        check_choice(lv, "Mantel level", MANTEL_LEVELS)
    for scheme in permute:
        check_choice(scheme, "permutation scheme", MANTEL_SCHEMES)
    check_int(permutations, "permutations", minimum=0)
    if control is not None and control not in data.items.columns:
        raise TreeprobeError(f"--control {control!r} is not a column of the items "
                             f"(columns: {', '.join(map(str, data.items.columns))})")


def _partial_row(control: str, res) -> dict:
    """The Mantel-table row of a :class:`~treeprobe.partial_mantel.PartialMantelResult`."""
    return dict(level=f"image | {control}", scheme=res.permutation, method="pearson (partial)",
                statistic=res.statistic, p_value=res.p_value, permutations=res.permutations,
                n_items=res.n_items, n_pairs=res.n_pairs, alternative=res.alternative, estimator="exact",
                permuted=res.permuted, r_dt=res.r_dt, r_dz=res.r_dz, r_tz=res.r_tz,
                details=dict(control=res.control, mantel_p_value=res.mantel_p_value,
                             n_species=res.n_species, pairs=res.pairs))


def mantel(data: TreeData, *, methods: Sequence[str] = ("pearson", "spearman"),
           levels: Sequence[str] = MANTEL_LEVELS, permute: Sequence[str] = ("species",), control: str | None = None,
           tree=None, rank_lengths=None, permutations: int = 999, seed: int = 0,
           spearman_max_n: int = SPEARMAN_MAX_N, progress: bool = False) -> pd.DataFrame:
    """Mantel tests of embedding cosine distance against tree distance; stores ``uns["mantel"]``.

    levels: ``"image"`` (images) and/or ``"species-centroid"`` (one unit-norm centroid per species,
    at least 3 species). methods: ``"pearson"`` (exact, no N×N matrix) and/or ``"spearman"``.
    permute (what each p-value permutes; one row per scheme):

    * ``"species"`` (default): at image level r over **between-species pairs**, species moved among
      tree positions with all their images, only between species with the same number of images;
      at centroid level the centroids' positions permuted within the same size strata. Answers
      "does the representation follow the tree above species?" (see :mod:`treeprobe.permutation`).
    * ``"images"``: all pairs, images permuted among tree positions (centroids permuted freely):
      tests whether images are exchangeable, which within-species similarity alone rejects.

    control: an ``items`` column; adds a partial Mantel row (between-species pairs, r(d, t | z) with
    z = same/different category, or |difference| for a numeric column; see
    :func:`treeprobe.partial_mantel.partial_mantel_tree` for its permutation scheme).
    tree: an ete3 tree with branch lengths, leaves named by species binomial (items whose species is
    not a leaf are left out and listed in ``uns["mantel_not_in_tree"]``); default the rank taxonomy,
    one unit per rank or ``rank_lengths`` (7 numbers). Alternative: greater. Each test's permutation
    seed is the next draw of ``np.random.default_rng(seed)`` in the order scheme × level × method,
    then the partial Mantel. Returns the table (level, scheme, method, statistic, p_value, permuted, ...).
    """
    from treeprobe import mantel as m
    from treeprobe.partial_mantel import partial_mantel_tree

    _check_data(data)
    _check_mantel_options(data, methods, levels, permute, control, permutations)
    X_m, clades, units, info, in_tree = _mantel_inputs(data, tree, rank_lengths)
    rng = np.random.default_rng(seed)
    rows = []
    enough = int(units.max()) + 1 >= 3
    for scheme in permute:
        for level in levels:
            if level == "species-centroid" and not enough:
                continue
            for method in methods:
                kw = dict(method=method, permutations=permutations, alternative="greater",
                          seed=int(rng.integers(SEED_BOUND)), spearman_max_n=spearman_max_n, progress=progress)
                if scheme == "species":
                    fn = m.mantel_species if level == "image" else m.mantel_centroids
                    res = fn(X_m, clades, units, **kw)
                elif level == "image":
                    res = m.mantel_tree(X_m, clades, **kw)
                else:
                    res = m.mantel_tree(*_centroid_inputs(X_m, clades, units), **kw)
                    res.details["permuted"] = CENTROIDS_PERMUTED_FREELY
                rows.append(_mantel_row(level, scheme, res))
    if control is not None:
        z = data.items[control].to_numpy()[in_tree]
        res = partial_mantel_tree(X_m, clades, z, name=control, permutations=permutations,
                                  seed=int(rng.integers(SEED_BOUND)))
        rows.append(_partial_row(control, res))
    table = pd.DataFrame(rows)
    data.uns["mantel"] = table
    data.uns["mantel_tree"] = info
    data.uns["mantel_not_in_tree"] = skip_records(data.items, ~in_tree, "species not in --tree (Mantel only)")
    data.uns["mantel_pairs"] = _pair_sample(X_m, clades, n_pairs=MANTEL_FIGURE_PAIRS, seed=seed)
    return table


# --- clustering and neighbours ----------------------------------------------------------------


def clustering(data: TreeData, *, methods: Sequence[str] = ("kmeans", "agglomerative"), seed: int = 0,
               chance_permutations: int = 20, progress: bool = False) -> pd.DataFrame:
    """Rank-wise clustering (k = number of taxa at each rank) scored against the taxonomy, with chance
    values from ``chance_permutations`` label permutations; stores ``uns["clustering"]``."""
    from treeprobe.clustering import rankwise_clustering

    _check_data(data)
    table = rankwise_clustering(data.unit, data.taxonomy.codes_by_rank(), methods=tuple(methods), seed=seed,
                                n_permutations=chance_permutations, progress=progress,
                                n_threads=1 if len(data) <= SINGLE_THREAD_MAX_ITEMS else None)
    data.uns["clustering"] = table
    return table


def knn(data: TreeData, *, k: int = 10, max_queries: int | None = 100_000, seed: int = 0) -> pd.DataFrame:
    """Share of each item's k nearest neighbours (cosine) in its own taxon, per rank, with chance;
    above ``max_queries`` items estimated from that many seeded query items (95 % CI).
    ``k`` is lowered to N − 1 for tiny sets. Stores ``uns["knn"]`` and ``uns["knn_params"]``."""
    from treeprobe.neighbors import knn_rank_agreement

    _check_data(data)
    k = min(int(k), len(data) - 1)
    table = knn_rank_agreement(data.unit, data.taxonomy.codes_by_rank(), k=k, max_queries=max_queries,
                               seed=seed, normalised=True)
    data.uns["knn"] = table
    data.uns["knn_params"] = dict(k=k, max_queries=max_queries)
    return table


def physignal(data: TreeData, *, tree=None, rank_lengths=None, permutations: int = 999, seed: int = 0,
              n_axes: int = 10, renormalise: bool = True, permute: str = "size-strata", n_jobs: int | None = 1,
              progress: bool = False):
    """Multivariate phylogenetic signal K_mult (Adams 2014) of the species centroids on the rank taxonomy or
    ``tree`` (species permuted among the tips, by default only among species with as many images: see
    :func:`treeprobe.physignal.physignal`); stores ``uns["physignal"]`` (dict: K, p, z, parts, details)
    and ``uns["physignal_axes"]`` (DataFrame, one row per principal axis); returns the
    :class:`~treeprobe.physignal.KmultResult`."""
    from treeprobe.physignal import physignal as _physignal

    res = _physignal(_check_data(data), tree=tree, rank_lengths=rank_lengths, permutations=permutations, seed=seed,
                     n_axes=n_axes, renormalise=renormalise, permute=permute, n_jobs=n_jobs, progress=progress)
    data.uns["physignal"] = {k: v for k, v in res.to_dict().items() if k != "per_axis"}
    data.uns["physignal_axes"] = res.per_axis
    data.uns["physignal_result"] = res
    return res


def tree_recovery(data: TreeData, *, method: str = "upgma", levels: Sequence[str] = ("species",), tree=None,
                  rank_lengths=None, permutations: int = 999, seed: int = 0, permute: str = "size-strata"):
    """Tree of taxon centroids (UPGMA or neighbour joining on cosine distances) scored against the rank
    taxonomy or ``tree``: cophenetic r, normalised Robinson-Foulds, dendrogram purity and monophyly per rank,
    each next to its permutation null (leaf labels shuffled; by default only among taxa with as many
    images, ``permute="size-strata"``; see :func:`treeprobe.tree_recovery.tree_recovery`). Stores ``uns["tree_recovery"]``,
    ``uns["tree_recovery_ranks"]`` and ``uns["tree_recovery_result"]``; returns the result."""
    from treeprobe.tree_recovery import tree_recovery as _tree_recovery

    res = _tree_recovery(_check_data(data), method=method, levels=levels, tree=tree, rank_lengths=rank_lengths,
                         permutations=permutations, seed=seed, permute=permute)
    data.uns["tree_recovery"] = res.summary.assign(permuted=res.params["permuted"])
    data.uns["tree_recovery_ranks"] = res.ranks
    data.uns["tree_recovery_result"] = res
    return res


def within_species_variation(data: TreeData, *, covariate: str | None = None, levels=None,
                             ranks: Sequence[str] | None = None, n_components: int | None = None,
                             variance_share: float = 0.9, min_centroid_items: int = 1,
                             permutations: int = 999, seed: int = 0):
    """Share of within-species variation outside the between-taxon principal subspace at each rank and,
    with a 2-level ``covariate`` (``levels=(a, b)``, each a value or a list of values), the mean
    within-species shift b − a: its angle to each subspace and permutation p-values (labels shuffled
    within species; see :func:`treeprobe.variation.within_species_variation`). Stores
    ``uns["within_species_variation"]`` (dict: headline numbers) and ``uns["within_species_variation_ranks"]``
    (DataFrame, one row per rank); returns the :class:`~treeprobe.variation.VariationResult`."""
    from treeprobe.variation import within_species_variation as _wsv

    res = _wsv(_check_data(data), covariate=covariate, levels=levels, ranks=ranks, n_components=n_components,
               variance_share=variance_share, min_centroid_items=min_centroid_items,
               permutations=permutations, seed=seed)
    data.uns["within_species_variation"] = res.summary
    data.uns["within_species_variation_ranks"] = res.ranks
    return res


def covariate_alignment(data: TreeData, covariates, *, tree=None, rank_lengths=None, kind: str = "auto",
                        permute: str = "within-genus", match_sizes: bool = True, permutations: int = 999,
                        seed: int = 0, min_images: int = 1, alternative: str = "greater", progress: bool = False):
    """Does the embedding follow a species-level covariate beyond what the tree explains? Mantel r(embedding,
    covariate), partial r(embedding, covariate | tree) and r(covariate, tree) of the species centroids; the
    covariate is permuted within genera among species with as many images by default (the scheme measured
    calibrated: see :mod:`treeprobe.covariate_alignment`). Stores ``uns["covariate_alignment"]`` (dict),
    ``uns["covariate_alignment_table"]`` (DataFrame) and ``uns["covariate_alignment_result"]``; returns the result."""
    from treeprobe.covariate_alignment import covariate_alignment as _covariate_alignment

    res = _covariate_alignment(_check_data(data), covariates, tree=tree, rank_lengths=rank_lengths, kind=kind,
                               permute=permute, match_sizes=match_sizes, permutations=permutations, seed=seed,
                               min_images=min_images, alternative=alternative, progress=progress)
    data.uns["covariate_alignment"] = res.to_dict()
    data.uns["covariate_alignment_table"] = res.table
    data.uns["covariate_alignment_result"] = res
    return res


# --- the image-text side ---------------------------------------------------------------------------


def text_embeddings(data: TreeData, *, ckpt=None, model: str | None = None, pretrained: str | None = None,
                    file=None, text_types: Sequence[str] = ("taxonomic",), templates=None, cache_dir=None,
                    batch_size: int = 256, device: str | None = None, progress: bool = True,
                    trust_checkpoint: bool = False) -> dict:
    """Text embeddings of every taxon of ``data`` at every rank, in each of ``text_types`` (BioCLIP's caption
    types: see :mod:`treeprobe.text_embed`), from an open_clip model's text tower (``ckpt`` / ``model`` /
    ``pretrained`` as :func:`embed`; cached by checkpoint digest + text) or read from ``file`` (a parquet or
    npz of taxon → vector). Stores ``uns["text_embeddings"]`` (text_type → rank → (taxa, float32 (T_r, D)))
    and ``uns["text_model"]``; returns the mapping."""
    from treeprobe import image_text, text_embed

    _check_data(data)
    ranks = tuple(data.taxonomy.ranks)
    if file is not None:
        text = text_embed.read_text_embeddings(file, dim=data.n_dims if data.X is not None else None)
        info = dict(source=str(file), kind="text-embedding file")
    else:
        from treeprobe.models import load_model

        if ckpt is None and model is None:
            raise TreeprobeError("text embeddings need a model with a text tower (--ckpt / --model) or a "
                                 "text-embedding file (--text-embeddings)")
        loaded = load_model(ckpt=ckpt, model=model, pretrained=pretrained, device=device or default_device(),
                            trust_checkpoint=trust_checkpoint)
        text = text_embed.taxon_text_embeddings(loaded, image_text.lineage_table(data), text_types=text_types,
                                                ranks=ranks, templates=templates, batch_size=batch_size,
                                                cache_dir=cache_dir, progress=progress)
        info = dict(source=loaded.source, name=loaded.model_name, digest=loaded.digest,
                    templates="ensemble" if templates == "ensemble" else (list(templates) if templates else None))
    data.uns["text_embeddings"] = text
    data.uns["text_model"] = dict(info, text_types=list(text))
    return text


def zeroshot(data: TreeData, *, text_types: Sequence[str] | None = None, modes: Sequence[str] = ("flat", "top_down",
             "species_summed"), k: int = 5, logit_scale: float = 100.0, n_boot: int = 1000, seed: int = 0,
             rank_lengths=None) -> pd.DataFrame:
    """Per-rank zero-shot accuracy of the images against the text embeddings of their taxa (run
    :func:`text_embeddings` first): flat, top-down and species-summed, top-1 / top-k with species-bootstrap
    intervals next to chance (:func:`treeprobe.zeroshot.zeroshot`; the candidates are the data's species),
    and how severe the mistakes are (:func:`treeprobe.mistakes.mistake_summary` on the top-1 species), for
    each text type (default: all embedded). Stores ``uns["zeroshot"]``, ``uns["mistakes"]`` and
    ``uns["mistake_depths"]`` (DataFrames with a ``text_type`` column) and ``uns["zeroshot_result"]``
    (text type → :class:`~treeprobe.zeroshot.ZeroShotResult`); returns the zero-shot table."""
    from treeprobe import image_text

    check_analysable(data)
    text = data.uns.get("text_embeddings")
    image_text.text_type_of(text, None)  # raises when there are none
    types = list(text) if text_types is None else [image_text.text_type_of(text, t) for t in text_types]
    h, truth = image_text.hierarchy_of(data)
    X = np.asarray(data.X)
    parts: dict[str, list] = {"zeroshot": [], "mistakes": [], "mistake_depths": []}
    results = {}
    for tt in types:
        out = image_text.zeroshot_tables(X, h, truth, text=text[tt], modes=modes, k=k, logit_scale=logit_scale,
                                         n_boot=n_boot, seed=seed, rank_lengths=rank_lengths)
        results[tt] = out["result"]
        for key in parts:
            if key in out:
                parts[key].append(out[key].assign(text_type=tt)[["text_type", *out[key].columns]])
    for key, frames in parts.items():
        if frames:
            data.uns[key] = pd.concat(frames, ignore_index=True)
    data.uns["zeroshot_result"] = results
    data.uns["zeroshot_params"] = dict(modes=list(modes), k=k, logit_scale=logit_scale, n_boot=n_boot, seed=seed,
                                       n_candidate_species=h.n_species,
                                       n_unknown_species=int((truth < 0).sum()))
    return data.uns["zeroshot"]


def fewshot(data: TreeData, *, ks: Sequence[int] = (1, 5), ranks: Sequence[str] | None = None, seeds=5,
            methods: Sequence[str] = ("simpleshot", "logistic"), support_species: str = "any", splits=None):
    """1-shot and 5-shot accuracy per rank (SimpleShot nearest centroid and a logistic probe on the image
    embeddings; seeded splits, or ``splits`` read back with :func:`treeprobe.fewshot.read_splits`), mean and
    spread over seeds next to chance (:func:`treeprobe.fewshot.fewshot_eval`). Stores ``uns["fewshot"]``
    (summary), ``uns["fewshot_per_seed"]`` and ``uns["fewshot_splits"]`` (item ids = row numbers, or the
    ``path`` column when the items have one); returns the :class:`~treeprobe.fewshot.FewShotResult`."""
    from treeprobe.fewshot import fewshot_eval

    check_analysable(data)
    items = data.items["path"].astype(str).to_numpy() if "path" in data.items.columns and \
        data.items["path"].astype(str).is_unique else None
    res = fewshot_eval(data.X, data.taxonomy, ks=ks, ranks=ranks if ranks is not None else data.taxonomy.ranks,
                       seeds=seeds, methods=methods, support_species=support_species, splits=splits, items=items)
    data.uns["fewshot"] = res.summary
    data.uns["fewshot_per_seed"] = res.per_seed
    data.uns["fewshot_splits"] = res.splits
    return res


def text_tree(data: TreeData, *, text_type: str | None = None, permutations: int = 999, seed: int = 0,
              bootstrap: int = 200, tree_method: str = "upgma") -> pd.DataFrame:
    """Does the text tower follow the tree? The species-name embeddings of ``text_type`` scored against the
    taxonomy (Mantel r, K_mult, recovered-tree cophenetic r and nRF, with permutation p-values), and
    image-text alignment per rank (cosine of each image to its own taxon's text vs its sibling taxa's, with
    species-bootstrap intervals: :func:`treeprobe.text_tree.image_text_alignment`). Stores
    ``uns["text_tree"]`` and ``uns["image_text_alignment"]`` (with a ``text_type`` column); returns the
    first."""
    from treeprobe import image_text

    check_analysable(data)
    text = data.uns.get("text_embeddings")
    tt = image_text.text_type_of(text, text_type)
    h, truth = image_text.hierarchy_of(data)
    out = image_text.text_tree_tables(data, h, truth, text=text[tt], permutations=permutations, seed=seed,
                                      bootstrap=bootstrap, tree_method=tree_method)
    data.uns["text_tree"] = out["text_tree"].assign(text_type=tt)
    data.uns["image_text_alignment"] = out["alignment"].assign(text_type=tt)
    return data.uns["text_tree"]


def image_text(data: TreeData, *, text_types: Sequence[str] | None = None, seed: int = 0, permutations: int = 999,
               n_boot: int = 1000, k: int = 5, fewshot_ks: Sequence[int] = (1, 5), fewshot_seeds=5,
               rank_lengths=None, progress: bool = False) -> dict:
    """The whole image-text side in one call: :func:`zeroshot` and :func:`text_tree` (for each text type
    embedded by :func:`text_embeddings`; skipped, with a note, when none is) and :func:`fewshot` (image
    embeddings only), seeded by ``seed``. Returns the seconds each took (also in ``uns["timings"]``)."""
    check_analysable(data)
    timings: dict[str, float] = {}
    text = data.uns.get("text_embeddings") or {}
    if text:
        t = time.perf_counter()
        zeroshot(data, text_types=text_types, k=k, n_boot=n_boot, seed=seed, rank_lengths=rank_lengths)
        timings["zeroshot_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tables = []
        for tt in (list(text) if text_types is None else text_types):
            text_tree(data, text_type=tt, permutations=permutations, seed=seed, bootstrap=min(n_boot, 200))
            tables.append((data.uns["text_tree"], data.uns["image_text_alignment"]))
        data.uns["text_tree"] = pd.concat([a for a, _ in tables], ignore_index=True)
        data.uns["image_text_alignment"] = pd.concat([b for _, b in tables], ignore_index=True)
        timings["text_tree_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fewshot(data, ks=fewshot_ks, seeds=fewshot_seeds)
    timings["fewshot_s"] = time.perf_counter() - t
    data.uns.setdefault("timings", {}).update(timings)
    return timings


_image_text_tool = image_text  # for intrinsic(), whose flag of the same name hides it


# --- 2-D maps ------------------------------------------------------------------------------------


def _store_map(data: TreeData, name: str, coords: np.ndarray, index: np.ndarray, seed: int) -> np.ndarray:
    N = len(data)
    full = np.full((N, 2), np.nan, dtype=coords.dtype)
    full[index] = coords
    data.obsm[f"X_{name}"] = full
    sub = len(index) < N
    data.uns[name] = dict(subsampled=sub, seed=seed, n_points=int(len(index)),
                          title=f"n = {len(index)} of {N} points (random subsample, seed {seed})" if sub else "")
    return full


def tsne(data: TreeData, *, seed: int = 0, max_points: int | None = DEFAULT_MAX_MAP_POINTS) -> np.ndarray:
    """openTSNE t-SNE (cosine) of the embeddings; above ``max_points`` a seeded subsample is drawn.
    Stores ``obsm["X_tsne"]`` (N, 2; NaN where not drawn) and ``uns["tsne"]``; returns the (N, 2) array."""
    from treeprobe.embedding_maps import tsne_2d

    coords, index = tsne_2d(_check_data(data).unit, seed=seed, max_points=max_points)
    return _store_map(data, "tsne", coords, index, seed)


def umap(data: TreeData, *, seed: int = 0, max_points: int | None = DEFAULT_MAX_MAP_POINTS) -> np.ndarray:
    """UMAP (cosine) of the embeddings, as :func:`tsne`; stores ``obsm["X_umap"]`` and ``uns["umap"]``."""
    from treeprobe.embedding_maps import umap_2d

    coords, index = umap_2d(_check_data(data).unit, seed=seed, max_points=max_points)
    return _store_map(data, "umap", coords, index, seed)


# --- the whole intrinsic analysis ----------------------------------------------------------------


def package_versions() -> dict:
    """Versions of treeprobe and the libraries whose numbers it reports."""
    out = {"python": platform.python_version()}
    for name in ("treeprobe", "numpy", "scipy", "pandas", "scikit-learn", "torch", "open_clip_torch",
                 "umap-learn", "openTSNE", "ete3", "matplotlib"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def _check_phylo_options(data, tree, tree_method, tree_levels, covariate, covariate_levels,
                         species_covariates=None) -> tuple[str, ...]:
    """The tree-level options of :func:`intrinsic`, checked before the first test; returns the levels
    tree recovery runs at (a user ``tree`` is compared at the species level only)."""
    from treeprobe.tree_recovery import TREE_METHODS
    from treeprobe.variation import _covariate_groups, _shift_weights

    check_choice(tree_method, "tree method", TREE_METHODS)
    levels = tuple(tree_levels)
    if not levels:
        raise TreeprobeError("tree_levels is empty: name at least one (species or a rank)")
    for level in levels:
        check_choice(level, "tree-recovery level", ("species", *data.taxonomy.ranks[:-1]))
    if tree is not None:
        levels = ("species",)
    if covariate is not None:
        group, lv = _covariate_groups(data.items, covariate, covariate_levels)
        if _shift_weights(data.taxonomy.codes(data.taxonomy.ranks[-1]), group)[2] == 0:
            raise TreeprobeError(f"no species is observed under both levels {lv[0]!r} and {lv[1]!r} "
                                 f"of covariate {covariate!r}")
    for col in [species_covariates] if isinstance(species_covariates, str) else (species_covariates or ()):
        if col not in data.items.columns:
            raise TreeprobeError(f"species covariate {col!r} is not a column of the items; columns: "
                                 f"{', '.join(map(str, data.items.columns))}")
    return levels


def intrinsic(data: TreeData, *, tree=None, rank_lengths=None, seed: int = 0, permutations: int = 999,
              mantel_methods: Sequence[str] = ("pearson", "spearman"), centroid_level: bool = True,
              permute: Sequence[str] = ("species",), control: str | None = None,
              cluster_methods: Sequence[str] = ("kmeans", "agglomerative"), chance_permutations: int = 20,
              knn_k: int = 10, knn_max_queries: int | None = 100_000, maps: Sequence[str] = MAPS,
              max_map_points: int | None = DEFAULT_MAX_MAP_POINTS, spearman_max_n: int = SPEARMAN_MAX_N,
              phylo: bool = False, tree_method: str = "upgma", tree_levels: Sequence[str] = ("species", "genus"),
              covariate: str | None = None, covariate_levels=None, species_covariates=None,
              image_text: bool = False, progress: bool = True, provenance: dict | None = None):
    """The whole intrinsic analysis: :func:`mantel`, :func:`clustering`, :func:`knn` and the maps,
    all seeded by ``seed``; returns the :class:`~treeprobe.report.Report` (nothing is written).

    ``phylo``: also the tree-level analyses — :func:`physignal` (K_mult), :func:`tree_recovery`
    (``tree_method`` at ``tree_levels``; at ``"species"`` only with a user ``tree``) and
    :func:`within_species_variation`, the latter with ``covariate`` (an item column, 2 levels or
    ``covariate_levels=(a, b)``) when given, and :func:`covariate_alignment` of ``species_covariates`` (item
    column name(s), constant within species) when given; either turns ``phylo`` on. Same ``seed`` and
    ``permutations`` as the Mantel tests.

    ``image_text``: also :func:`image_text` (zero-shot, mistakes and the text tower's tree for the text
    types :func:`text_embeddings` stored, and few-shot).
    """
    from treeprobe.report import Report

    from treeprobe.clustering import METHODS as CLUSTER_METHODS

    check_analysable(data)
    phylo = bool(phylo or covariate is not None or species_covariates is not None)
    if phylo:
        tree_levels = _check_phylo_options(data, tree, tree_method, tree_levels, covariate, covariate_levels,
                                           species_covariates)
    # every option checked before the first (long) test runs
    levels = ("image", "species-centroid") if centroid_level else ("image",)
    _check_mantel_options(data, mantel_methods, levels, permute, control, permutations)
    for name in cluster_methods:
        check_choice(name, "clustering method", CLUSTER_METHODS)
    check_int(chance_permutations, "chance_permutations", minimum=0)
    check_int(knn_k, "knn_k", minimum=1)
    for name in maps:
        check_choice(name, "map", MAPS)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(key, fn, **kw):
        t = time.perf_counter()
        fn(data, **kw)
        timings[key] = time.perf_counter() - t

    timed("mantel_s", mantel, methods=mantel_methods, levels=levels, permute=permute, control=control, tree=tree,
          rank_lengths=rank_lengths, permutations=permutations, seed=seed, spearman_max_n=spearman_max_n,
          progress=progress)
    timed("clustering_s", clustering, methods=cluster_methods, seed=seed, chance_permutations=chance_permutations,
          progress=progress)
    timed("knn_s", knn, k=knn_k, max_queries=knn_max_queries, seed=seed)
    for name in maps:
        timed(f"{name}_s", {"tsne": tsne, "umap": umap}[name], seed=seed, max_points=max_map_points)
    if phylo:
        timed("physignal_s", physignal, tree=tree, rank_lengths=rank_lengths, permutations=permutations, seed=seed,
              progress=progress)
        timed("tree_recovery_s", tree_recovery, method=tree_method, levels=tree_levels, tree=tree,
              rank_lengths=rank_lengths, permutations=permutations, seed=seed)
        timed("within_species_variation_s", within_species_variation, covariate=covariate, levels=covariate_levels,
              permutations=permutations, seed=seed)
        if species_covariates is not None:
            timed("covariate_alignment_s", covariate_alignment, covariates=species_covariates, tree=tree,
                  rank_lengths=rank_lengths, permutations=permutations, seed=seed, progress=progress)
    if image_text:
        timings.update(_image_text_tool(data, seed=seed, permutations=permutations, rank_lengths=rank_lengths))
    timings["total_analysis_s"] = time.perf_counter() - t0
    data.uns["timings"] = timings
    tax = data.taxonomy
    prov = dict(provenance or {})
    prov.update(
        seed=seed, permutations=permutations, knn_k=data.uns["knn_params"]["k"], knn_max_queries=knn_max_queries,
        n_items=len(data), embedding_dim=data.n_dims, n_taxa={r: tax.n_taxa(r) for r in tax.ranks},
        taxonomy=dict(unknown=data.unknown, missing=list(data.missing)),
        tree=data.uns["mantel_tree"], timings=timings, versions=package_versions(), command=" ".join(sys.argv),
    )
    if "text_model" in data.uns:
        prov["text_model"] = data.uns["text_model"]
    data.uns["provenance"] = prov
    return Report.from_data(data)


def compare(datasets, **kwargs):
    """Several models on the same items (``datasets``: model name → TreeData): every intrinsic metric per
    model, paired differences with intervals and p-values that resample species, CKA / RSA between
    models; see :func:`treeprobe.compare.compare` for the options and the schemes. Returns the
    :class:`~treeprobe.compare.Comparison` (plots: ``tp.pl.metric_panels``, ``distance_profiles``, ``drilldown``)."""
    from treeprobe.compare import compare as _compare

    return _compare(datasets, **kwargs)
