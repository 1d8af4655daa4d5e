"""The training commands of the ``treeprobe`` command line: BioCLIP-style contrastive training
with open_clip.

Commands (added to ``treeprobe`` by :func:`add_subcommands`)::

    treeprobe train --data DATA --out DIR [options]
    treeprobe make-shards --data CSV --out DIR [--shard-size N]
    treeprobe export-weights --ckpt IN.pt --out OUT.pt [--fp32]   weights-only copy (fp16 default)

``treeprobe-train`` is an alias: ``treeprobe-train [train] ...`` (``train`` is the default
command), ``treeprobe-train make-shards ...``, ``treeprobe-train export ...`` (= ``export-weights``).

Multi-GPU / multi-node: ``torchrun --nproc_per_node 8 [--nnodes N --rdzv-endpoint H:P]
-m treeprobe train --data shards/ --out runs/x ...`` (``-m treeprobe.training ...`` works too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from treeprobe._utils import check_output_file, check_work_dir, one_line
from treeprobe.errors import TreeprobeError, TreeprobeWarning, warnings_as_lines

__all__ = ["TRAIN_EPILOG", "add_train_args", "add_subcommands", "build_parser", "run_train", "run_make_shards",
           "run_export_weights", "main"]

#: Exit status of a run stopped by SIGTERM (its checkpoint is saved), as a shell reports it.
EXIT_SIGTERM = 128 + signal.SIGTERM
#: Exit status of a run stopped by Ctrl-C (its checkpoint is saved).
EXIT_INTERRUPT = 128 + signal.SIGINT
#: Exit status of an input error (``treeprobe: error: ...``).
EXIT_USAGE = 2
#: ``treeprobe-train`` names of the commands (``export`` is the old name of ``export-weights``).
ALIAS_COMMANDS = {"train": "train", "make-shards": "make-shards", "export": "export-weights",
                  "export-weights": "export-weights"}

TRAIN_EPILOG = """\
examples:
  # a tiny model on CPU from a metadata CSV (paths relative to the CSV)
  treeprobe train --data photos/metadata.csv --out runs/tiny --model tiny --epochs 5 --batch-size 64
  # BioCLIP-like: ViT-B-16 from OpenAI CLIP weights on shards, 8 GPUs, bf16
  torchrun --nproc_per_node 8 -m treeprobe train --data shards/ --out runs/b16 --model ViT-B-16-quickgelu \\
      --pretrained openai --text-type mixed --batch-size 256 --precision amp_bf16 \\
      --grad-checkpointing --local-loss --gather-with-grad --save-every-steps 1000
  # continue after Ctrl-C, a SIGTERM, a crash or a preemption (same options)
  treeprobe train ... --out runs/b16 --resume latest

stopping: Ctrl-C or SIGTERM finishes the current step, writes a checkpoint of that point and exits
with status 130 / 143 (a second Ctrl-C quits at once, without one; a signal during a checkpoint
write waits for it to complete). --resume latest then continues bit-identically on CPU: weights,
optimizer, LR schedule, RNG states, the place in the epoch, and log.jsonl (cut back to the resumed
step; temporary files of a killed write are removed). A new run needs a new --out: one that holds
a run (log.jsonl or checkpoints) is refused unless --resume is given.

outputs in --out: log.jsonl (JSON lines: event=start|train|checkpoint|eval|stop; train lines have
step, epoch, loss, lr, img_s, text_type, logit_scale, gpu_mem_gb on CUDA), args.json,
skipped.csv (unreadable images), checkpoints/{epoch_N,step_N}.pt + checkpoints/latest.json.
Checkpoints load directly in `treeprobe intrinsic --ckpt`.
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from treeprobe.training.text import TEXT_TYPE_CHOICES

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
                        "Default: %(default)s")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny",
                   help="open_clip architecture (e.g. ViT-B-16, ViT-B-16-quickgelu for OpenAI weights, hf-hub:ID), "
                        "'tiny' (training/configs/treeprobe-tiny.json: ViT 2x64 at 32 px, text 2x64, context 48) "
                        "or a path to a config .json. Default: %(default)s")
    m.add_argument("--pretrained", default=None,
                   help="initial weights: an open_clip tag (e.g. 'openai', as BioCLIP; needs network) or a local "
                        "checkpoint file. Default: random init")
    m.add_argument("--image-size", type=int, default=None,
                   help="override the model's input size in pixels (open_clip force_image_size)")
    m.add_argument("--cache-dir", default=None, help="download cache for pretrained weights")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in both towers (open_clip set_grad_checkpointing)")


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1,
                   help="epochs; with the data size they set the LR schedule (default %(default)s)")
    o.add_argument("--batch-size", type=int, default=64, help="images per rank per step (default %(default)s)")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default %(default)s)")
    o.add_argument("--warmup", type=int, default=100,
                   help="linear warmup steps before the cosine decay (default %(default)s; cut to 10%% of the run "
                        "if not shorter than it)")
    o.add_argument("--wd", type=float, default=0.2,
                   help="AdamW weight decay, not applied to biases/norms/logit_scale (default %(default)s)")
    o.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (default %(default)s)")
    o.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2 (default %(default)s)")
    o.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon (default %(default)s)")
    o.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm (default: off)")
    o.add_argument("--precision", default=None, choices=["amp_bf16", "amp", "fp32"],
                   help="amp_bf16 = bf16 autocast (default on GPU), amp = fp16 autocast + GradScaler, "
                        "fp32 (default on CPU)")
    o.add_argument("--local-loss", action="store_true",
                   help="ClipLoss local_loss: each rank scores its own images against all texts (less memory)")
    o.add_argument("--gather-with-grad", action="store_true",
                   help="ClipLoss gather_with_grad: all-gather features with gradients (use with --local-loss)")
    o.add_argument("--seed", type=int, default=0,
                   help="seed for init, data order, augmentation and mixed text types (0 <= seed < 2**32); CPU "
                        "runs are bit-reproducible (default %(default)s)")
    o.add_argument("--max-steps", type=int, default=0,
                   help="stop (and checkpoint) after this many global steps without changing the schedule "
                        "(0 = run all epochs)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    from treeprobe.training.evaluate import EVAL_PERMUTATIONS

    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--out", required=True,
                   help="output folder (log.jsonl, args.json, checkpoints/); one that already holds a run is "
                        "only reused with --resume")
    c.add_argument("--resume", default=None,
                   help="'latest' (newest checkpoint in --out/checkpoints; starts fresh if none) or a checkpoint "
                        "path; restores weights, optimizer, scaler, RNGs and the position in the epoch, and cuts "
                        "log.jsonl back to its step")
    c.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N steps (step_N.pt; every epoch always writes epoch_N.pt)")
    c.add_argument("--log-every", type=int, default=10, help="log a train line every N steps (default %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    c.add_argument("--eval-data", default=None,
                   help="held-out metadata CSV; its tree agreement (kNN per rank + treeprobe.pipeline headline "
                        "numbers) is logged as event=eval")
    c.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on --eval-data at start and every K epochs (0 = never)")
    c.add_argument("--eval-permutations", type=int, default=EVAL_PERMUTATIONS,
                   help="Mantel permutations in the evaluation (default %(default)s; maps and progress bars are off)")
    c.add_argument("--eval-knn-only", action="store_true",
                   help="evaluation: kNN rank agreement only, skip treeprobe.pipeline.analyse_embeddings")


def _add_system_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    s.add_argument("--dist-backend", default=None, help="torch.distributed backend (default nccl on GPU, gloo on CPU)")
    s.add_argument("--ddp-static-graph", action="store_true", help="DDP static_graph=True")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    s.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option of the train command, in groups (data, model, optimisation, outputs, system)."""
    for add in (_add_data_args, _add_model_args, _add_optim_args, _add_output_args, _add_system_args):
        add(p)


def _add_shards_args(p: argparse.ArgumentParser) -> None:
    from treeprobe.training.shards import DEFAULT_JPEG_QUALITY, DEFAULT_SHARD_SIZE

    p.add_argument("--data", required=True, help="metadata CSV or iNat21-style folder")
    p.add_argument("--data-type", default="auto", choices=["auto", "csv", "inat"], help="force the input format")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="samples per shard (default %(default)s)")
    p.add_argument("--max-size", type=int, default=None,
                   help="downscale so the shorter side is at most this many pixels (default: keep size)")
    p.add_argument("--quality", type=int, default=DEFAULT_JPEG_QUALITY,
                   help="JPEG quality when re-encoding (default %(default)s)")
    p.add_argument("--shuffle-seed", type=int, default=0,
                   help="shuffle rows before writing with this seed (default %(default)s; -1 keeps the input order)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="training checkpoint")
    p.add_argument("--out", required=True, help="output .pt")
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    # open_clip logs every model creation at INFO on the root logger; keep it quiet
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(__package__).setLevel(logging.WARNING if quiet else logging.INFO)


def _input_errors(fn):
    """``fn()``, with a missing file reported as a :class:`TreeprobeError`."""
    try:
        return fn()
    except FileNotFoundError as e:
        raise TreeprobeError(one_line(e)) from None


def run_train(args: argparse.Namespace) -> int:
    """``treeprobe train``: the exit status (0 done, 143 stopped by SIGTERM, 130 by Ctrl-C; both saved a
    checkpoint of the step they stopped at)."""
    from treeprobe.training.engine import train

    _setup_logging(args.quiet)
    check_work_dir(args.out)  # before the data is read or a model built
    res = _input_errors(lambda: train(args))
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # torchrun's rank 0 (or no torchrun)
        print(json.dumps(res))
    return {"signal": EXIT_SIGTERM, "interrupt": EXIT_INTERRUPT}.get(res["stopped"], 0)


def run_make_shards(args: argparse.Namespace) -> int:
    """``treeprobe make-shards``: writes the shards, prints a JSON summary; exit status 0."""
    from treeprobe.training.shards import make_shards

    _setup_logging(False)
    check_work_dir(args.out)  # before any image is read
    man = _input_errors(lambda: make_shards(
        args.data, args.out, shard_size=args.shard_size, data_type=args.data_type, max_size=args.max_size,
        quality=args.quality, shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed))
    print(json.dumps({k: man[k] for k in ("num_samples", "n_skipped")} | {"shards": len(man["shards"])}))
    return 0


def run_export_weights(args: argparse.Namespace) -> int:
    """``treeprobe export-weights``: writes the copy, prints its path; exit status 0."""
    from treeprobe.training.checkpoint import export_weights

    check_output_file(args.out)  # before the checkpoint is read
    print(_input_errors(lambda: export_weights(args.ckpt, args.out, half=not args.fp32)))
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``train``, ``make-shards`` and ``export-weights`` to an argparse subparsers object; each
    sets ``func(args) -> int`` (exit status), which raises :class:`TreeprobeError` for input errors."""
    t = subparsers.add_parser(
        "train", help="train a CLIP model on captions built from the taxonomy (BioCLIP-style, open_clip)",
        description="Train a CLIP model contrastively on images with captions built from their taxonomy "
                    "(BioCLIP-style), with open_clip. See also the make-shards and export-weights commands.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(t)
    t.set_defaults(func=run_train)
    s = subparsers.add_parser(
        "make-shards", help="write webdataset tar shards for training",
        description="Write webdataset tar shards from a metadata CSV / iNat21 folder: per sample a jpg and a json "
                    "with the lineage, common name and the caption of every text type; plus manifest.json and "
                    "skipped.csv. Unreadable images are skipped.")
    _add_shards_args(s)
    s.set_defaults(func=run_make_shards)
    e = subparsers.add_parser(
        "export-weights", help="weights-only (fp16) copy of a training checkpoint",
        description="Write a weights-only copy of a checkpoint (no optimizer/RNG state), fp16 by default: "
                    "small enough to ship, still loadable by treeprobe and open_clip.")
    _add_export_args(e)
    e.set_defaults(func=run_export_weights)


def build_parser(prog: str = "treeprobe-train") -> argparse.ArgumentParser:
    """A parser holding just the training commands (what ``treeprobe-train`` parses)."""
    p = argparse.ArgumentParser(prog=prog, description="BioCLIP-style training with open_clip (commands: train, "
                                                       "make-shards, export-weights).")
    add_subcommands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def _alias_argv(argv: list[str]) -> list[str]:
    """``treeprobe-train`` argv → the commands' argv: ``train`` when no command is named, ``export``
    → ``export-weights``."""
    if argv and argv[0] in ALIAS_COMMANDS:
        return [ALIAS_COMMANDS[argv[0]], *argv[1:]]
    return ["train", *argv]


def main(argv=None) -> int:
    """``treeprobe-train`` (an alias of the training commands of ``treeprobe``) → exit status."""
    argv = _alias_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
        with warnings_as_lines():
            return int(args.func(args) or 0)
    except (TreeprobeError, TreeprobeWarning) as e:  # a warning raised as one: -W error::TreeprobeWarning
        print(f"treeprobe: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("treeprobe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
