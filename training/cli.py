"""``treeprobe-train``: BioCLIP-style contrastive training with open_clip.

Commands::

    treeprobe-train [train] --data DATA --out DIR [options]     train (the default command)
    treeprobe-train make-shards --data CSV --out DIR [--shard-size N]
    treeprobe-train export --ckpt IN.pt --out OUT.pt [--fp32]   weights-only copy (fp16 default)

Multi-GPU / multi-node: ``torchrun --nproc_per_node 8 [--nnodes N --rdzv-endpoint H:P]
-m training --data shards/ --out runs/x ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from training.text import TEXT_TYPE_CHOICES

TRAIN_EPILOG = """\
examples:
  # a tiny model on CPU from a metadata CSV (paths relative to the CSV)
  treeprobe-train --data photos/metadata.csv --out runs/tiny --model tiny --epochs 5 --batch-size 64
  # BioCLIP-like: ViT-B-16 from OpenAI CLIP weights on shards, 8 GPUs, bf16
  torchrun --nproc_per_node 8 -m training --data shards/ --out runs/b16 --model ViT-B-16-quickgelu \\
      --pretrained openai --text-type mixed --batch-size 256 --precision amp_bf16 \\
      --grad-checkpointing --local-loss --gather-with-grad --save-every-steps 1000
  # continue after a crash / preemption
  treeprobe-train ... --out runs/b16 --resume latest

outputs in --out: log.jsonl (JSON lines: event=start|train|checkpoint|eval|stop; train lines have
step, epoch, loss, lr, img_s, text_type, logit_scale, gpu_mem_gb on CUDA), args.json,
skipped.csv (unreadable images), checkpoints/{epoch_N,step_N}.pt + checkpoints/latest.json.
Checkpoints load directly in `treeprobe intrinsic --ckpt`.
"""


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option of the train command."""
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True,
                   help="training data: a metadata CSV (treeprobe format: path + kingdom..species + optional "
                        "common_name), an iNat21-style folder of class folders, or webdataset shards (a folder of "
                        ".tar files written by make-shards, a .tar, or a brace pattern), or 'synthetic' (blank "
                        "images, like open_clip's --dataset-type synthetic, for throughput benchmarks)")
    d.add_argument("--data-type", default="auto", choices=["auto", "csv", "inat", "wds", "synthetic"],
                   help="force the data format (default: detect from --data)")
    d.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch for shards (default: manifest.json next to the shards) and for "
                        "synthetic data (default 10 batches)")
    d.add_argument("--limit", type=int, default=0,
                   help="use only the first N rows of a CSV / iNat folder (0 = all; for smoke tests)")
    d.add_argument("--workers", type=int, default=0,
                   help="data-loader worker processes per rank (default 0 = load in the main process)")
    d.add_argument("--text-type", default="taxonomic", choices=TEXT_TYPE_CHOICES,
                   help="caption built from the taxonomy (BioCLIP): taxonomic='a photo of Kingdom Phylum Class Order "
                        "Family Genus epithet.', scientific='a photo of Genus epithet.', common (falls back to "
                        "scientific when no common name), scientific_common, taxonomic_common ('... with common "
                        "name X'), or mixed (one of the five drawn per batch, seeded by --seed and the step). "
                        "Default: taxonomic")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny",
                   help="open_clip architecture (e.g. ViT-B-16, ViT-B-16-quickgelu for OpenAI weights, hf-hub:ID), "
                        "'tiny' (training/configs/treeprobe-tiny.json: ViT 2x64 at 32 px, text 2x64, context 48) "
                        "or a path to a config .json. Default: tiny")
    m.add_argument("--pretrained", default=None,
                   help="initial weights: an open_clip tag (e.g. 'openai', as BioCLIP; needs network) or a local "
                        "checkpoint file. Default: random init")
    m.add_argument("--image-size", type=int, default=None,
                   help="override the model's input size in pixels (open_clip force_image_size)")
    m.add_argument("--cache-dir", default=None, help="download cache for pretrained weights")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in both towers (open_clip set_grad_checkpointing)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1, help="epochs; with the data size they set the LR schedule "
                                                         "(default 1)")
    o.add_argument("--batch-size", type=int, default=64, help="images per rank per step (default 64)")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    o.add_argument("--warmup", type=int, default=100,
                   help="linear warmup steps before the cosine decay (default 100; capped to 10%% of the run "
                        "if longer than it)")
    o.add_argument("--wd", type=float, default=0.2,
                   help="AdamW weight decay, not applied to biases/norms/logit_scale (default 0.2)")
    o.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (default 0.9)")
    o.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2 (default 0.98)")
    o.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon (default 1e-6)")
    o.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm (default: off)")
    o.add_argument("--precision", default=None, choices=["amp_bf16", "amp", "fp32"],
                   help="amp_bf16 = bf16 autocast (default on GPU), amp = fp16 autocast + GradScaler, "
                        "fp32 (default on CPU)")
    o.add_argument("--local-loss", action="store_true",
                   help="ClipLoss local_loss: each rank scores its own images against all texts (less memory)")
    o.add_argument("--gather-with-grad", action="store_true",
                   help="ClipLoss gather_with_grad: all-gather features with gradients (use with --local-loss)")
    o.add_argument("--seed", type=int, default=0,
                   help="seed for init, data order, augmentation and mixed text types; CPU runs are "
                        "bit-reproducible (default 0)")
    o.add_argument("--max-steps", type=int, default=0,
                   help="stop (and checkpoint) after this many global steps without changing the schedule "
                        "(0 = run all epochs)")

    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--out", required=True, help="output folder (log.jsonl, args.json, checkpoints/)")
    c.add_argument("--resume", default=None,
                   help="'latest' (newest checkpoint in --out/checkpoints; starts fresh if none) or a checkpoint "
                        "path; restores weights, optimizer, scaler, RNGs and the position in the epoch")
    c.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N steps (step_N.pt; every epoch always writes epoch_N.pt)")
    c.add_argument("--log-every", type=int, default=10, help="log a train line every N steps (default 10)")
    c.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    c.add_argument("--eval-data", default=None,
                   help="held-out metadata CSV; its tree agreement (kNN per rank + treeprobe.pipeline headline "
                        "numbers) is logged as event=eval")
    c.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on --eval-data at start and every K epochs (0 = never)")
    c.add_argument("--eval-permutations", type=int, default=199,
                   help="Mantel permutations in the evaluation (default 199; maps and progress bars are off)")
    c.add_argument("--eval-knn-only", action="store_true",
                   help="evaluation: kNN rank agreement only, skip treeprobe.pipeline.analyse_embeddings")

    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    s.add_argument("--dist-backend", default=None, help="torch.distributed backend (default nccl on GPU, gloo on CPU)")
    s.add_argument("--ddp-static-graph", action="store_true", help="DDP static_graph=True")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeprobe-train",
        description="Train a CLIP model contrastively on images with captions built from their taxonomy "
                    "(BioCLIP-style), with open_clip. Other commands: 'treeprobe-train make-shards --help', "
                    "'treeprobe-train export --help'.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    return p


def shards_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeprobe-train make-shards",
        description="Write webdataset tar shards from a metadata CSV / iNat21 folder: per sample a jpg and a json "
                    "with the lineage, common name and the caption of every text type; plus manifest.json and "
                    "skipped.csv. Unreadable images are skipped.")
    p.add_argument("--data", required=True, help="metadata CSV or iNat21-style folder")
    p.add_argument("--data-type", default="auto", choices=["auto", "csv", "inat"], help="force the input format")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=int, default=None,
                   help="downscale so the shorter side is at most this many pixels (default: keep size)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="shuffle rows before writing with this seed (default 0; -1 keeps the input order)")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeprobe-train export",
        description="Write a weights-only copy of a checkpoint (no optimizer/RNG state), fp16 by default: "
                    "small enough to ship, still loadable by treeprobe and open_clip.")
    p.add_argument("--ckpt", required=True, help="training checkpoint")
    p.add_argument("--out", required=True, help="output .pt")
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    # open_clip logs every model creation at INFO on the root logger; keep it quiet
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("training").setLevel(logging.WARNING if quiet else logging.INFO)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in ("train", "make-shards", "export") else "train"
    if argv and argv[0] == cmd:
        argv = argv[1:]
    from training.data import DataError
    from training.engine import TrainError

    try:
        from treeprobe.errors import TreeprobeError
    except ImportError:  # pragma: no cover
        TreeprobeError = DataError
    try:
        if cmd == "make-shards":
            a = shards_parser().parse_args(argv)
            _setup_logging(False)
            from training.shards import make_shards

            man = make_shards(a.data, a.out, shard_size=a.shard_size, data_type=a.data_type, max_size=a.max_size,
                              quality=a.quality, shuffle_seed=None if a.shuffle_seed < 0 else a.shuffle_seed)
            print(json.dumps({k: man[k] for k in ("num_samples", "n_skipped")} | {"shards": len(man["shards"])}))
            return 0
        if cmd == "export":
            a = export_parser().parse_args(argv)
            from training.checkpoint import export_weights

            path = export_weights(a.ckpt, a.out, half=not a.fp32)
            print(path)
            return 0
        a = train_parser().parse_args(argv)
        _setup_logging(a.quiet)
        from training.engine import train

        res = train(a)
        if not a.quiet and os.environ.get("RANK", "0") == "0":
            print(json.dumps(res))
        if res["stopped"] == "signal":
            return 143
        if res["stopped"] == "interrupt":
            return 130
        return 0
    except (TrainError, DataError, TreeprobeError, FileNotFoundError) as e:
        return _fail(str(e))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
