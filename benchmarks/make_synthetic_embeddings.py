"""Synthetic benchmark input: N = 10 x 10,000 embeddings over the real iNat21 taxonomy.

The 10,000 iNat2021 species with their full kingdom..species lineages
(``/work/shared/data/inat2021_taxonomy/metadata.csv``, or ``--taxonomy``) get a
``D``-dimensional trait by Brownian motion down the rank tree: every taxon adds a Gaussian
offset (s.d. ``RANK_SD[rank]`` per unit of variance) to its parent's trait, so species that
share more ranks have more similar traits. Each image (``--per-species`` per species, iNat21
val has 10) is its species trait plus isotropic noise whose scale varies per species
(lognormal), plus a common mean direction (real CLIP-style embeddings share one). An
anisotropic per-dimension scale (spectrum decaying like 1/sqrt(1 + d/32)) gives a realistic PCA
spectrum. Everything is float32 and seeded.

Writes ``embeddings.npy`` (N, D) float32 and ``metadata.csv`` (path='', 7 ranks, inat21_id,
image_idx) into ``--out`` (default ``benchmarks/_data/inat21_synth_100k``, ignored by git: the
script drops a ``.gitignore`` of ``*`` there).

    python benchmarks/make_synthetic_embeddings.py                # 100,000 x 512
    python benchmarks/make_synthetic_embeddings.py --per-species 2 --out /tmp/synth20k
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS
# Brownian increment s.d. per rank (variance per unit of trait); the noise s.d. is NOISE_SD.
RANK_SD = dict(kingdom=1.2, phylum=1.0, **{"class": 0.9}, order=0.8, family=0.7, genus=0.6, species=0.55)
NOISE_SD = 1.0
MEAN_NORM = 2.0  # common direction, in units of sqrt(D) * per-dim s.d.

DEFAULT_TAXONOMY = "/work/shared/data/inat2021_taxonomy/metadata.csv"
DEFAULT_OUT = Path(__file__).resolve().parent / "_data" / "inat21_synth_100k"
CHUNK_ROWS = 20_000  # images generated per step: 20,000 x 512 float32 = 40 MB per temporary


def make(taxonomy: str = DEFAULT_TAXONOMY, per_species: int = 10, dim: int = 512, seed: int = 0):
    """Return (X float32 (n_species * per_species, dim), metadata DataFrame)."""
    tax = pd.read_csv(taxonomy, dtype=str, keep_default_na=False)
    tax = tax.sort_values("inat21_id", key=lambda s: s.astype(int)).reset_index(drop=True)
    n_sp = len(tax)
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.sqrt(1.0 + np.arange(dim) / 32.0)).astype(np.float32)
    spectrum *= np.sqrt(dim / float((spectrum ** 2).sum()))  # mean per-dim variance 1
    spectrum = spectrum[rng.permutation(dim)]
    trait = np.zeros((n_sp, dim), dtype=np.float32)
    for i, rank in enumerate(RANKS):
        key = tax[list(RANKS[: i + 1])].agg("|".join, axis=1)  # cumulative label: homonyms stay apart
        codes, uniq = pd.factorize(key)
        off = rng.standard_normal((len(uniq), dim), dtype=np.float32) * (RANK_SD[rank] / np.sqrt(dim))
        trait += off[codes]
    mean = rng.standard_normal(dim).astype(np.float32)
    mean *= MEAN_NORM / np.linalg.norm(mean)
    sp_noise = np.exp(rng.normal(0.0, 0.25, n_sp)).astype(np.float32) * (NOISE_SD / np.sqrt(dim))
    sp = np.repeat(np.arange(n_sp), per_species)
    X = np.empty((sp.size, dim), dtype=np.float32)
    chunk = CHUNK_ROWS
    for a in range(0, sp.size, chunk):
        s = sp[a:a + chunk]
        eps = rng.standard_normal((s.size, dim), dtype=np.float32) * sp_noise[s, None]
        X[a:a + chunk] = (trait[s] + eps) * spectrum + mean
    meta = tax.loc[sp, ["inat21_id", *RANKS]].reset_index(drop=True)
    meta.insert(0, "path", "")
    meta["image_idx"] = np.tile(np.arange(per_species), n_sp)
    return X, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--taxonomy", default=DEFAULT_TAXONOMY)
    ap.add_argument("--per-species", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    t = time.perf_counter()
    X, meta = make(a.taxonomy, a.per_species, a.dim, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gi = out / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    np.save(out / "embeddings.npy", X)
    meta.to_csv(out / "metadata.csv", index=False)
    print(f"wrote {out}/embeddings.npy {X.shape} {X.dtype} and metadata.csv "
          f"({meta['species'].nunique()} species) in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
