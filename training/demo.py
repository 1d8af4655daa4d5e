"""Train the bundled demo checkpoint ``treeprobe/assets/demo_clip.pt`` on the synthetic world.

    python -m training.demo [--out treeprobe/assets/demo_clip.pt] [--work DIR] [--epochs N]

1. ``treeprobe.simulate.simulate_world(seed=0)`` — the world ``treeprobe intrinsic --demo``
   analyses (its species, rendered by ``treeprobe.synthetic_images``).
2. Training images: ``write_image_folder(world, WORK/train, image_size=32, seed=1,
   images_per_species=K)`` — the same species, other renders (position, rotation, scale,
   brightness and noise jitter differ), K per species.
3. ``treeprobe-train`` with the tiny model on them (the options are in :data:`TRAIN_ARGS`).
4. Export weights only, in fp16 (:func:`training.checkpoint.export_weights`), to ``--out``.
5. Held-out check: embed ``write_image_folder(world, WORK/heldout, seed=2)`` (fresh renders)
   with the exported checkpoint through ``treeprobe.models.load_model`` and report kNN
   agreement per rank (k=10) against chance, next to a randomly initialised tiny model.

Prints one JSON summary (timings, file size, metrics) and writes it to
``WORK/demo_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ASSET = Path(__file__).resolve().parents[1] / "treeprobe" / "assets" / "demo_clip.pt"

TRAIN_ARGS = ["--model", "tiny", "--text-type", "taxonomic", "--batch-size", "128", "--lr", "1e-3",
              "--warmup", "50", "--seed", "0", "--log-every", "20"]


def _heldout_metrics(ckpt: str | None, csv: Path, seed: int = 0) -> dict:
    import numpy as np
    import torch

    from training.data import load_items
    from training.evaluate import embed_images, knn_metrics

    from treeprobe.models import load_model

    if ckpt is None:  # baseline: the same architecture, random init
        from training.engine import register_configs

        register_configs()
        torch.manual_seed(seed)
        lm = load_model(model="treeprobe-tiny")
    else:
        lm = load_model(ckpt=ckpt)
    items = load_items(csv)
    emb = embed_images(lm.model, list(items["path"]), lm.preprocess, "cpu", batch_size=256)
    res = knn_metrics(emb, items, k=10)
    from treeprobe.neighbors import knn_rank_agreement  # noqa: F401  (same numbers, with chance)
    from treeprobe.taxonomy import RANKS, Taxonomy

    tax = Taxonomy.from_frame(items)
    df = knn_rank_agreement(emb, {r: tax.codes(r) for r in RANKS}, k=10)
    res.update({f"chance_{r.rank}": float(r.chance) for r in df.itertuples()})
    res["n_heldout"] = int(len(items))
    res["embed_dim"] = int(emb.shape[1]) if emb.ndim == 2 else 0
    assert np.isfinite(emb).all()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ASSET), help="where to write the fp16 checkpoint "
                                                          "(default treeprobe/assets/demo_clip.pt)")
    p.add_argument("--work", default=None, help="working folder for images and the training run (default: temp)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--images-per-species", type=int, default=8, help="training renders per species (default 8)")
    p.add_argument("--world-seed", type=int, default=0, help="simulate_world seed (default 0, as --demo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = p.parse_args(argv)

    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    from training.checkpoint import export_weights
    from training.cli import main as train_main

    work = Path(a.work or tempfile.mkdtemp(prefix="treeprobe-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = simulate_world(seed=a.world_seed)
    write_image_folder(world, work / "train", image_size=32, seed=1, images_per_species=a.images_per_species)
    write_image_folder(world, work / "heldout", image_size=32, seed=2)
    t_images = time.time() - t0

    t1 = time.time()
    targs = ["--data", str(work / "train" / "metadata.csv"), "--out", str(work / "run"), "--epochs",
             str(a.epochs), *TRAIN_ARGS, "--no-progress"]
    if a.threads:
        targs += ["--threads", str(a.threads)]
    rc = train_main(targs)
    if rc != 0:
        return rc
    t_train = time.time() - t1
    final = work / "run" / "checkpoints" / f"epoch_{a.epochs}.pt"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_weights(final, out, half=True)

    t2 = time.time()
    trained = _heldout_metrics(str(out), work / "heldout" / "metadata.csv")
    baseline = _heldout_metrics(None, work / "heldout" / "metadata.csv")
    summary = {
        "command": "python -m training.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_command": "treeprobe-train " + " ".join(targs),
        "seconds_images": round(t_images, 1), "seconds_train": round(t_train, 1),
        "seconds_eval": round(time.time() - t2, 1),
        "checkpoint": str(out), "checkpoint_bytes": os.path.getsize(out),
        "heldout_trained": trained, "heldout_random_init": baseline,
    }
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
