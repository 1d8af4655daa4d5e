"""Train the bundled demo checkpoint ``treeprobe/assets/demo_clip.pt`` on the synthetic world.

    python -m treeprobe.training.demo [--out treeprobe/assets/demo_clip.pt] [--work DIR] [--epochs N]

1. ``treeprobe.simulate.simulate_world(seed=0)`` — the world ``treeprobe intrinsic --demo``
   analyses (its species, rendered by ``treeprobe.synthetic_images``).
2. Training images: ``write_image_folder(world, WORK/train, image_size=32, seed=1,
   images_per_species=K)`` — the same species, other renders (position, rotation, scale,
   brightness and noise jitter differ), K per species.
3. ``treeprobe train`` with the tiny model on them (the options are in :data:`TRAIN_ARGS`).
4. Export weights only, in fp16 (:func:`treeprobe.training.checkpoint.export_weights`), to ``--out``.
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

import treeprobe

#: Where the bundled checkpoint lives (the ``assets`` folder of the installed treeprobe package).
REPO_ASSET = Path(treeprobe.__file__).resolve().parent / "assets" / "demo_clip.pt"
#: Side of the rendered images in pixels (the tiny model's input size).
IMAGE_SIZE = 32
#: The ``treeprobe train`` options of the demo run (besides data, output and epochs).
TRAIN_ARGS = ["--model", "tiny", "--text-type", "taxonomic", "--batch-size", "128", "--lr", "1e-3",
              "--warmup", "50", "--seed", "0", "--log-every", "20"]
#: Seeds of the renders: training images and held-out images differ.
TRAIN_RENDER_SEED, HELDOUT_RENDER_SEED = 1, 2
HELDOUT_BATCH_SIZE = 256

__all__ = ["REPO_ASSET", "TRAIN_ARGS", "main"]


def _heldout_metrics(ckpt: str | None, csv: Path) -> dict:
    """kNN agreement (and chance) per rank of held-out renders embedded by ``ckpt``
    (None: the tiny model at its seeded random init)."""
    import numpy as np

    from treeprobe.models import load_model
    from treeprobe.training.data import load_items
    from treeprobe.training.evaluate import EVAL_K, embed_images, knn_metrics

    lm = load_model(model="tiny") if ckpt is None else load_model(ckpt=ckpt)
    items = load_items(csv)
    emb = embed_images(lm.model, list(items["path"]), lm.preprocess, batch_size=HELDOUT_BATCH_SIZE)
    assert np.isfinite(emb).all()
    res = knn_metrics(emb, items, k=EVAL_K, chance=True)
    res["n_heldout"] = int(len(items))
    res["embed_dim"] = int(emb.shape[1]) if emb.ndim == 2 else 0
    return res


def main(argv=None) -> int:
    """Build the demo checkpoint (see the module docstring); exit status."""
    p = argparse.ArgumentParser(prog="python -m treeprobe.training.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ASSET), help="where to write the fp16 checkpoint "
                                                          "(default treeprobe/assets/demo_clip.pt)")
    p.add_argument("--work", default=None, help="working folder for images and the training run (default: temp)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default %(default)s)")
    p.add_argument("--images-per-species", type=int, default=8,
                   help="training renders per species (default %(default)s)")
    p.add_argument("--world-seed", type=int, default=0, help="simulate_world seed (default %(default)s, as --demo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = p.parse_args(argv)

    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    from treeprobe.training.checkpoint import export_weights
    from treeprobe.training.cli import main as train_main

    work = Path(a.work or tempfile.mkdtemp(prefix="treeprobe-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = simulate_world(seed=a.world_seed)
    write_image_folder(world, work / "train", image_size=IMAGE_SIZE, seed=TRAIN_RENDER_SEED,
                       images_per_species=a.images_per_species)
    write_image_folder(world, work / "heldout", image_size=IMAGE_SIZE, seed=HELDOUT_RENDER_SEED)
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
        "command": "python -m treeprobe.training.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_command": "treeprobe train " + " ".join(targs),
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
