"""The intrinsic analysis as a few calls: embeddings + lineages in, :class:`Report` out.

``analyse_embeddings`` is pure (arrays and DataFrames in, a Report out).
``run_intrinsic`` adds the I/O edges: load data, load a model, extract (cached),
analyse, write the report.
"""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from treeprobe.errors import TreeprobeError
from treeprobe.mantel import mantel_tree, taxon_centroids
from treeprobe.neighbors import l2_normalise, row_norms
from treeprobe.taxonomy import RANKS, Taxonomy, clade_structure_from_tree, placeable_mask

DEFAULT_MAPS = ("tsne", "umap")


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


def _skips(items: pd.DataFrame, mask: np.ndarray, reason: str) -> pd.DataFrame:
    col = items["path"] if "path" in items.columns else pd.Series(items.index.astype(str), index=items.index)
    ids = [p if isinstance(p, str) and p else f"row {i}" for i, p in zip(items.index[mask], col[mask])]
    return pd.DataFrame({"item": ids, "reason": reason})


def prepare_items(embeddings: np.ndarray, items: pd.DataFrame, ranks: Sequence[str] = RANKS):
    """Drop rows that cannot be analysed; return (X (n, D) float32, items (n rows), taxonomy, skipped).

    Left out and recorded: non-finite or zero embeddings, rows without a top rank.
    """
    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise TreeprobeError(f"embeddings must be 2-D (N, D), got shape {X.shape}")
    if len(items) != X.shape[0]:
        raise TreeprobeError(f"{X.shape[0]} embeddings but {len(items)} metadata rows")
    if X.shape[0] == 0:
        raise TreeprobeError("no items: the data is empty")
    items = items.reset_index(drop=True)
    skipped = []
    finite, norms = row_norms(X)  # in row chunks: no N x D temporaries
    if (~finite).any():
        skipped.append(_skips(items, ~finite, "non-finite embedding"))
    norm_ok = finite & (norms > 0)
    zero = finite & ~norm_ok
    if zero.any():
        skipped.append(_skips(items, zero, "zero-norm embedding"))
    placed = placeable_mask(items, ranks)
    no_tax = norm_ok & ~placed
    if no_tax.any():
        skipped.append(_skips(items, no_tax, f"no taxonomy (missing {ranks[0]})"))
    keep = norm_ok & placed
    if keep.sum() < 3:
        raise TreeprobeError(f"only {int(keep.sum())} usable item(s) after dropping bad rows; need at least 3")
    items = items[keep].reset_index(drop=True)
    tax = Taxonomy.from_frame(items, ranks)
    if tax.n_taxa(ranks[-1]) < 2:
        raise TreeprobeError(f"all items belong to a single taxon ({tax.taxon_labels(ranks[-1])[0]}): "
                             "there is no tree to compare with")
    skipped_df = pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(columns=["item", "reason"])
    X = X if keep.all() else X[keep]  # no copy of the caller's array when every row is kept
    return X.astype(np.float32, copy=False), items, tax, skipped_df


def analyse_embeddings(
    embeddings: np.ndarray,
    items: pd.DataFrame,
    *,
    tree=None,
    rank_lengths=None,
    seed: int = 0,
    permutations: int = 999,
    mantel_methods: Sequence[str] = ("pearson", "spearman"),
    centroid_level: bool = True,
    cluster_methods: Sequence[str] = ("kmeans", "agglomerative"),
    chance_permutations: int = 20,
    knn_k: int = 10,
    knn_max_queries: int | None = 100_000,
    maps: Sequence[str] = DEFAULT_MAPS,
    max_map_points: int = 20000,
    spearman_max_n: int = 6000,
    progress: bool = True,
    provenance: dict | None = None,
    skipped: pd.DataFrame | None = None,
) -> "Report":
    """Intrinsic analysis of embeddings (N, D) against the lineages in ``items`` (N rows, 7 rank columns).

    tree: optional ete3 tree with branch lengths, leaves named by species binomial; its patristic
    distances replace the rank taxonomy's (one unit per rank, or ``rank_lengths``) in the Mantel tests.
    Returns a :class:`treeprobe.report.Report`; nothing is written.
    """
    from treeprobe import clustering, embedding_maps, neighbors
    from treeprobe.report import Report

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    X, items, tax, skipped_now = prepare_items(embeddings, items)
    skipped_all = pd.concat([s for s in (skipped, skipped_now) if s is not None and len(s)], ignore_index=True) \
        if (skipped is not None and len(skipped)) or len(skipped_now) else pd.DataFrame(columns=["item", "reason"])
    N = len(items)
    Xn = l2_normalise(X, dtype=np.float32)  # one float32 copy: 2 GB at 1M × 512
    dim = int(X.shape[1])
    del X  # prepare_items' copy, if it made one

    # --- tree distances ---------------------------------------------------------
    species = tax.lineages[tax.ranks[-1]].to_numpy()
    if tree is not None:
        clades, in_tree = clade_structure_from_tree(tree, species)
        if (~in_tree).any():
            skipped_all = pd.concat([skipped_all, _skips(items, ~in_tree, "species not in --tree (Mantel only)")],
                                    ignore_index=True)
        X_m = Xn[in_tree]
        codes_m = pd.factorize(species[in_tree], sort=True)[0]
        tree_info = dict(kind="user tree (patristic, branch lengths)", n_items_in_tree=int(in_tree.sum()))
    else:
        clades = tax.clade_structure(rank_lengths)
        X_m = Xn
        codes_m = tax.codes(tax.ranks[-1])
        tree_info = dict(kind="rank taxonomy (patristic, " +
                         ("one unit per rank" if rank_lengths is None else f"rank lengths {rank_lengths}") + ")")

    # --- Mantel ------------------------------------------------------------------
    rows = []
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for method in mantel_methods:
        res = mantel_tree(X_m, clades, method=method, permutations=permutations, alternative="greater",
                          seed=int(rng.integers(2**31)), spearman_max_n=spearman_max_n, progress=progress)
        rows.append(dict(level="image", **res.to_dict()))
    if centroid_level:
        # one item per species: the unit-norm centroid of its images, at that species' node
        n_sp = int(codes_m.max()) + 1
        first = np.zeros(n_sp, dtype=np.int64)
        first[codes_m[::-1]] = np.arange(len(codes_m))[::-1]
        cent = taxon_centroids(X_m, codes_m)
        sub = clades.subset_items(first)
        if n_sp >= 3:
            for method in mantel_methods:
                res = mantel_tree(cent, sub, method=method, permutations=permutations, alternative="greater",
                                  seed=int(rng.integers(2**31)), spearman_max_n=spearman_max_n, progress=progress)
                rows.append(dict(level="species-centroid", **res.to_dict()))
    mantel_df = pd.DataFrame(rows)
    timings["mantel_s"] = time.perf_counter() - t

    # a sample of pair distances for the figure
    mantel_sample = _pair_sample(X_m, clades, n_pairs=20000, seed=seed)

    # --- clustering and neighbours --------------------------------------------------
    codes = tax.codes_by_rank()
    t = time.perf_counter()
    # threads oversubscribe small k-means problems (measured: 2 threads 5-10x slower than 1 below ~1e4 items)
    clus = clustering.rankwise_clustering(Xn, codes, methods=tuple(cluster_methods), seed=seed,
                                          n_permutations=chance_permutations, progress=progress,
                                          n_threads=1 if N <= 20000 else None)
    timings["clustering_s"] = time.perf_counter() - t
    t = time.perf_counter()
    k = min(knn_k, N - 1)
    # above knn_max_queries items: exact neighbours of a seeded query sample (estimate + 95 % CI)
    knn = neighbors.knn_rank_agreement(Xn, codes, k=k, max_queries=knn_max_queries, seed=seed, normalised=True)
    timings["knn_s"] = time.perf_counter() - t

    # --- 2-D maps ---------------------------------------------------------------------
    map_out = {}
    for name in maps:
        t = time.perf_counter()
        if name == "tsne":
            coords, idx = embedding_maps.tsne_2d(Xn, seed=seed, max_points=max_map_points)
        elif name == "umap":
            coords, idx = embedding_maps.umap_2d(Xn, seed=seed, max_points=max_map_points)
        else:
            raise TreeprobeError(f"unknown map {name!r}; choose from tsne, umap")
        title = f"n = {len(idx)} of {N} points (random subsample, seed {seed})" if len(idx) < N else ""
        map_out[name] = dict(coords=coords, index=idx, info=dict(subsampled=len(idx) < N, title=title))
        timings[f"{name}_s"] = time.perf_counter() - t

    timings["total_analysis_s"] = time.perf_counter() - t0
    prov = dict(provenance or {})
    prov.update(
        seed=seed, permutations=permutations, knn_k=k, knn_max_queries=knn_max_queries, n_items=N, embedding_dim=dim,
        n_taxa={r: tax.n_taxa(r) for r in tax.ranks}, tree=tree_info, timings=timings,
        versions=package_versions(), command=" ".join(sys.argv),
    )
    return Report(
        mantel=mantel_df, clustering=clus, knn=knn, rank_summary=tax.rank_summary(), maps=map_out,
        labels_by_rank=tax.labels_by_rank(), provenance=prov, skipped=skipped_all, mantel_sample=mantel_sample,
        items=items,
    )


def _pair_sample(Xn: np.ndarray, clades, n_pairs: int, seed: int) -> dict:
    """Embedding and tree distances of random item pairs (for the Mantel figure)."""
    rng = np.random.default_rng(seed)
    N = len(Xn)
    i = rng.integers(0, N, n_pairs)
    j = rng.integers(0, N, n_pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    d = 1.0 - np.einsum("ij,ij->i", Xn[i], Xn[j])
    t = clades.pair_distances(clades.item_node[i], clades.item_node[j])
    return dict(d_embed=d, d_tree=t)


# --- the I/O edge ---------------------------------------------------------------------


def run_intrinsic(
    *,
    data: str | None = None,
    embeddings: str | None = None,
    metadata: str | None = None,
    ckpt: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    tree: str | None = None,
    out: str | None = None,
    demo: bool = False,
    cache_dir: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | None = None,
    figures: bool = True,
    progress: bool = True,
    trust_checkpoint: bool = False,
    **analysis_kwargs,
):
    """Load → (extract) → analyse → write. Returns (report, written paths)."""
    from treeprobe import data as data_mod
    from treeprobe.report import write_report
    from treeprobe.taxonomy import read_newick

    prov: dict = {}
    skipped = None
    if demo:
        X, items, prov = _demo_inputs(cache_dir=cache_dir, seed=analysis_kwargs.get("seed", 0),
                                      batch_size=batch_size, progress=progress, device=device)
    elif embeddings is not None:
        ds = data_mod.load_embeddings(embeddings, metadata=metadata)
        X, items, skipped = ds.embeddings, ds.items, ds.skipped
        prov["data"] = dict(source=str(embeddings), kind="precomputed embeddings", n_rows=len(ds.items) + len(ds.skipped))
        prov["model"] = dict(name="precomputed embeddings", digest=None)
    elif data is not None:
        ds = data_mod.load_data(data)
        if ds.embeddings is not None:
            X, items, skipped = ds.embeddings, ds.items, ds.skipped
            prov["model"] = dict(name="precomputed embeddings", digest=None)
        else:
            if ckpt is None and model is None:
                raise TreeprobeError("images need a model: pass --ckpt CHECKPOINT (and --model ARCH if the "
                                     "checkpoint does not name its architecture), or --embeddings")
            X, items, skipped, mprov = _extract(ds, ckpt=ckpt, model=model, pretrained=pretrained,
                                                cache_dir=cache_dir, batch_size=batch_size, workers=workers,
                                                device=device, progress=progress,
                                                trust_checkpoint=trust_checkpoint)
            prov["model"] = mprov
        prov["data"] = dict(source=str(data), n_rows=len(ds.items))
    else:
        raise TreeprobeError("nothing to analyse: pass --data, --embeddings or --demo")

    ete_tree = read_newick(tree) if tree else None
    if tree:
        prov["tree_file"] = str(tree)
    report = analyse_embeddings(X, items, tree=ete_tree, provenance=prov, skipped=skipped,
                                progress=progress, **analysis_kwargs)
    paths = write_report(report, out, figures=figures) if out else {}
    return report, paths


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("TREEPROBE_CACHE", Path.home() / ".cache" / "treeprobe"))


def _extract(ds, *, ckpt, model, pretrained, cache_dir, batch_size, workers, device, progress,
             trust_checkpoint=False):
    from treeprobe.extract import extract_embeddings
    from treeprobe.models import load_model

    loaded = load_model(ckpt=ckpt, model=model, pretrained=pretrained, device=device or _default_device(),
                        trust_checkpoint=trust_checkpoint)
    paths = ds.items["path"].astype(str).tolist()
    res = extract_embeddings(loaded, paths, batch_size=batch_size, num_workers=workers,
                             cache_dir=str(cache_dir or default_cache_dir()), device=device, progress=progress)
    items = ds.items[res.ok].reset_index(drop=True)
    skipped = pd.concat([s for s in (ds.skipped, res.failures) if s is not None and len(s)], ignore_index=True) \
        if (len(ds.skipped) or len(res.failures)) else None
    mprov = dict(name=loaded.model_name, digest=loaded.digest, source=loaded.source, embed_dim=loaded.embed_dim,
                 extraction_seconds=res.seconds, cache_hit=res.cache_hit, n_images=len(paths))
    return res.embeddings, items, skipped, mprov


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _demo_inputs(*, cache_dir, seed, batch_size, progress, device):
    """The embedded default: the simulated tree of life.

    With the bundled demo checkpoint (``treeprobe/assets/demo_clip.pt``), the synthetic species are
    rendered as images and embedded by it (the full image path); without it, the simulated
    embeddings are analysed directly.
    """
    from treeprobe.simulate import simulate_world

    world = simulate_world(seed=seed)
    demo_ckpt = Path(__file__).parent / "assets" / "demo_clip.pt"
    prov = dict(data=dict(source=f"simulated tree of life (seed {seed})", kind="demo"))
    if demo_ckpt.exists():
        from treeprobe import data as data_mod
        from treeprobe.synthetic_images import write_image_folder

        root = Path(cache_dir or default_cache_dir()) / f"demo_world_seed{seed}"
        if not (root / "metadata.csv").exists():
            write_image_folder(world, root, seed=seed)
        ds = data_mod.load_metadata_csv(root / "metadata.csv")
        X, items, skipped, mprov = _extract(ds, ckpt=str(demo_ckpt), model=None, pretrained=None,
                                            cache_dir=cache_dir, batch_size=batch_size, workers=0,
                                            device=device, progress=progress)
        prov["model"] = mprov
        prov["data"]["kind"] = "demo: synthetic images of simulated species, bundled demo checkpoint"
        return X, items, prov
    prov["model"] = dict(name="simulated embeddings (Brownian traits)", digest=None)
    return world.embeddings, world.items, prov
