"""Two comparisons that run here, with ``treeprobe.tl.compare`` (paired tests, figures, HTML report).

    python analyses/compare_models.py --out runs/compare_models

1. **Three tiny CLIP models on held-out real photos** (``../shared/data/multikingdom_photos_index``,
   the split of ``text_type_study.py``: seed 12345, 30 % held out): the *untrained* tiny network
   (random init, seed 0), the bundled *demo* checkpoint (``treeprobe/assets/demo_clip.pt``: the tiny
   model trained on synthetic images of a simulated tree, never on real photos) and a tiny model
   *trained* here on the training photos by ``treeprobe train`` (taxonomic captions, 12 epochs,
   seed 0). Each embeds the same 322 held-out photos; the comparison pairs them by path.
2. **BioCLIP 2 against a degraded copy of itself** (the bundled 902 real embeddings), where the
   answer is known: the copy is the same vectors after a random rotation (which changes no cosine
   distance) plus isotropic Gaussian noise (``--noise`` × the per-coordinate sd), so every tree
   metric of the copy must be lower, and CKA / RSA between the two must be high but below 1.

Writes ``OUT/photos/`` and ``OUT/bioclip2_degraded/`` (each: compare.json, per_model.csv,
differences.csv, similarity.csv, report.md, report.html, figures/), and prints the Mantel rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analyses"))
sys.path.insert(0, str(REPO))

from text_type_study import DEFAULT_CSV, EMBED_BATCH_SIZE, SHARD_SIZE, split_items  # noqa: E402

__all__ = ["photo_models", "degraded_copy", "main"]


def _embed(model, preprocess, heldout: pd.DataFrame):
    from treeprobe.core import TreeData
    from treeprobe.training.evaluate import embed_images

    return TreeData(embed_images(model, list(heldout["path"]), preprocess, batch_size=EMBED_BATCH_SIZE), heldout)


def photo_models(out: Path, *, data: Path, epochs: int, seed: int, split_seed: int) -> dict:
    """model name → TreeData of the held-out photos embedded by that model (see the module docstring)."""
    from treeprobe.models import create_model, load_model
    from treeprobe.pipeline import DEMO_CKPT
    from treeprobe.training.cli import main as train_main
    from treeprobe.training.shards import make_shards

    train_csv, held_csv = split_items(data, 0.3, seed=split_seed, out=out / "split")
    heldout = pd.read_csv(held_csv, dtype=str, keep_default_na=False)
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        make_shards(train_csv, shards, shard_size=SHARD_SIZE, max_size=64, shuffle_seed=split_seed)
    run = out / "runs" / f"taxonomic_seed{seed}"
    ckpt = run / "checkpoints" / f"epoch_{epochs}.pt"
    if not ckpt.exists():
        t0 = time.time()
        rc = train_main(["--data", str(shards), "--out", str(run), "--model", "tiny", "--text-type", "taxonomic",
                         "--seed", str(seed), "--epochs", str(epochs), "--batch-size", "64", "--lr", "1e-3",
                         "--warmup", "20", "--no-progress", "-q"])
        if rc != 0:
            raise SystemExit(f"training failed (rc {rc})")
        print(f"trained the tiny model in {time.time() - t0:.0f} s", flush=True)
    untrained = create_model("tiny", seed=seed)
    demo = load_model(ckpt=str(DEMO_CKPT))
    trained = load_model(ckpt=str(ckpt))
    return {"untrained": _embed(untrained.model.eval(), untrained.preprocess_val, heldout),
            "demo": _embed(demo.model, demo.preprocess, heldout),
            "trained": _embed(trained.model, trained.preprocess, heldout)}


def degraded_copy(data, *, noise: float, seed: int):
    """``data`` with its vectors rotated at random and noise added (``noise`` × the per-coordinate sd)."""
    from treeprobe.core import TreeData

    rng = np.random.default_rng(seed)
    X = np.asarray(data.X, dtype=np.float64)
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], X.shape[1])))
    return TreeData((X @ Q + noise * X.std() * rng.standard_normal(X.shape)).astype(np.float32), data.items)


def _print(comp, title: str) -> None:
    d = comp.differences
    rows = d[d.metric.str.startswith("mantel") | (d.metric == "knn agreement")]
    print(f"\n== {title}")
    print(rows[["metric", "rank", "model_a", "model_b", "estimate_a", "estimate_b", "difference", "ci_low",
                "ci_high", "p_value", "p_holm"]].round(4).to_string(index=False))
    if len(comp.similarity):
        print(comp.similarity[["model_a", "model_b", "rank", "cka", "rsa_spearman"]].round(3).to_string(index=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DEFAULT_CSV), help="metadata CSV of the real photos")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=12345)
    ap.add_argument("--noise", type=float, default=0.5, help="degraded copy: noise sd / per-coordinate sd")
    ap.add_argument("--permutations", type=int, default=999)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--only", choices=("photos", "bioclip2"), default=None)
    a = ap.parse_args(argv)

    from treeprobe import datasets, tl
    from treeprobe.compare_report import write_comparison

    out = Path(a.out)
    common = dict(seed=0, permutations=a.permutations, bootstrap=a.bootstrap, drilldown=True)
    if a.only in (None, "photos"):
        t0 = time.time()
        models = photo_models(out, data=Path(a.data), epochs=a.epochs, seed=a.seed, split_seed=a.split_seed)
        comp = tl.compare(models, **common)
        write_comparison(comp, out / "photos")
        _print(comp, f"tiny models on {len(models['trained'])} held-out photos ({time.time() - t0:.0f} s)")
    if a.only in (None, "bioclip2"):
        t0 = time.time()
        ds = datasets.bioclip2_1k()
        comp = tl.compare({"bioclip2": ds, "degraded": degraded_copy(ds, noise=a.noise, seed=1)},
                          control="img_type", **common)
        write_comparison(comp, out / "bioclip2_degraded")
        _print(comp, f"BioCLIP 2 vs rotated + noise {a.noise} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
