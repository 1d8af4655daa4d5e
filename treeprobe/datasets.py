"""Data sets that ship with treeprobe or are made by it (as scanpy's ``sc.datasets``).

* :func:`bioclip2_1k` — 1,030 **real** BioCLIP 2 embeddings (768-d) of TreeOfLife-200M images with
  their lineages and metadata (``img_type``: museum specimen vs citizen science), bundled in the
  package (``treeprobe/assets/bioclip2_1k/``: Imageomics/emb-explorer, MIT licence, see its README).
* :func:`simulated_world` — the simulated tree of life with Brownian traits (known truth).
* :func:`synthetic_images` — that world's species rendered as small images (the ``--demo`` path).
"""

from __future__ import annotations

from pathlib import Path

from treeprobe.core import TreeData

__all__ = ["bioclip2_1k", "simulated_world", "synthetic_images", "EXAMPLES", "ASSETS"]

ASSETS = Path(__file__).resolve().parent / "assets"
BIOCLIP2_1K = ASSETS / "bioclip2_1k" / "example_1k.parquet"


def bioclip2_1k(*, missing=None, unknown: str = "separate") -> TreeData:
    """The bundled 1,030 real BioCLIP 2 embeddings: a TreeData of 902 items (768-d float32, as
    released, not normalised); the 121 rows without taxonomy and the 7 of kingdom "incertae sedis" are in ``skipped``.
    ``missing`` (rank values read as unknown) and ``unknown`` (how unknowns are treated) as in
    :class:`~treeprobe.core.TreeData`.

    >>> ds = bioclip2_1k()
    >>> len(ds), ds.n_dims, len(ds.skipped)
    (902, 768, 128)
    """
    from treeprobe.data import load_embeddings
    from treeprobe.taxonomy import MISSING_TOKENS

    ds = load_embeddings(BIOCLIP2_1K, missing=MISSING_TOKENS if missing is None else missing)
    ds.source, ds.unknown = "bioclip2-1k", unknown
    return ds


def simulated_world(seed: int = 0, **kwargs) -> TreeData:
    """Embeddings of :func:`treeprobe.simulate.simulate_world` (Brownian traits on a simulated tree,
    ``kwargs`` passed on) as a TreeData; the world itself is in ``uns["world"]``."""
    from treeprobe.simulate import simulate_world

    world = simulate_world(seed=seed, **kwargs)
    ds = TreeData(world.embeddings, world.items, source=f"simulated tree of life (seed {seed})")
    ds.uns["world"] = world
    return ds


def synthetic_images(seed: int = 0, *, folder: str | Path | None = None) -> TreeData:
    """The simulated world's species rendered as images in ``folder`` (default: the cache folder),
    as a TreeData of image paths (``X`` None: embed them with :func:`treeprobe.tl.embed`)."""
    from treeprobe._utils import default_cache_dir
    from treeprobe.data import load_metadata_csv
    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    root = Path(folder) if folder is not None else default_cache_dir() / f"demo_world_seed{seed}"
    if not (root / "metadata.csv").exists():
        write_image_folder(simulate_world(seed=seed), root, seed=seed)
    return load_metadata_csv(root / "metadata.csv")


#: Examples reachable from the command line: ``treeprobe intrinsic --example NAME``.
EXAMPLES = {"bioclip2-1k": bioclip2_1k}
