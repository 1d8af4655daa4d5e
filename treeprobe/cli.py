"""``treeprobe`` command line: ``intrinsic`` (the analysis) and ``tree`` (taxonomy → Newick).

Input problems end with one line ``treeprobe: error: ...`` and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from treeprobe.errors import TreeprobeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeprobe",
        description="Does a vision model's representation agree with the tree of life?",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser(
        "intrinsic",
        help="embed images (or read embeddings) and report agreement with the taxonomy",
        description="Extract embeddings (or read precomputed ones), then report how well they agree with the "
                    "taxonomy: Mantel correlation with tree distance (permutation p-values), rank-wise "
                    "clustering purity/NMI/AMI/ARI with chance baselines, kNN rank agreement, t-SNE/UMAP maps. "
                    "With no data, runs the built-in simulated tree of life (--demo).",
    )
    src = a.add_argument_group("inputs")
    src.add_argument("--data", help="metadata CSV (path + kingdom..species, paths relative to the CSV), an "
                                    "iNat21-style image folder, or an embeddings file (.npy / .parquet)")
    src.add_argument("--embeddings", help="precomputed embeddings: .npy (with --metadata or a metadata.csv beside "
                                          "it) or .parquet with an 'emb' column and rank columns")
    src.add_argument("--metadata", help="metadata CSV for a .npy embeddings file")
    src.add_argument("--tree", help="Newick phylogeny with branch lengths, leaves named by species binomial; its "
                                    "patristic distances replace the rank taxonomy's in the Mantel tests")
    src.add_argument("--demo", action="store_true", help="run on the built-in simulated tree of life")
    m = a.add_argument_group("model")
    m.add_argument("--ckpt", help="open_clip checkpoint (.pt with state_dict, bare state dict, .safetensors) "
                                  "or an hf-hub:ORG/NAME id")
    m.add_argument("--model", help="open_clip architecture (e.g. ViT-B-16) when the checkpoint does not name it")
    m.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai) for --model")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a torch checkpoint holding non-tensor Python objects (unpickling runs its code)")
    m.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    m.add_argument("--workers", type=int, default=0, help="DataLoader workers for image decoding (default 0)")
    m.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--cache-dir", help="embedding cache folder (default $TREEPROBE_CACHE or ~/.cache/treeprobe)")
    s = a.add_argument_group("analysis")
    s.add_argument("--seed", type=int, default=0, help="seed of every stochastic step (default 0)")
    s.add_argument("--permutations", type=int, default=999, help="Mantel permutations (default 999)")
    s.add_argument("--knn-k", type=int, default=10, help="neighbours for kNN agreement (default 10)")
    s.add_argument("--knn-max-queries", type=int, default=100_000,
                   help="above this many items, kNN agreement is estimated (with a 95%% CI) from this many "
                        "random query items, each with its exact neighbours among all items (default 100000)")
    s.add_argument("--rank-lengths", help="edge length above each rank, 7 comma-separated numbers "
                                          "kingdom..species (default 1 each)")
    s.add_argument("--maps", default="tsne,umap", help="2-D maps to draw: tsne,umap or none (default tsne,umap)")
    s.add_argument("--max-map-points", type=int, default=20000, help="subsample maps above this many points")
    s.add_argument("--cluster-methods", default="kmeans,agglomerative", help="kmeans,agglomerative (default both)")
    s.add_argument("--no-centroids", action="store_true", help="skip the species-centroid Mantel tests")
    o = a.add_argument_group("output")
    o.add_argument("--out", default="treeprobe_out", help="output folder (default ./treeprobe_out)")
    o.add_argument("--no-figures", action="store_true", help="write numbers only")
    o.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("tree", help="export the taxonomy of a data set as Newick",
                       description="Build the rank taxonomy of a data set (metadata CSV, iNat21 folder or "
                                   "embeddings file) and write it as Newick (internal nodes named, one unit per rank).")
    t.add_argument("--data", required=True, help="metadata CSV, iNat21 folder, .npy or .parquet")
    t.add_argument("--metadata", help="metadata CSV for a .npy file")
    t.add_argument("--rank-lengths", help="7 comma-separated edge lengths kingdom..species")
    t.add_argument("--out", required=True, help="output .nwk file")
    return p


def _rank_lengths(text: str | None):
    if not text:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise TreeprobeError(f"--rank-lengths must be 7 comma-separated numbers, got {text!r}") from None
    if len(vals) != 7:
        raise TreeprobeError(f"--rank-lengths needs 7 values (kingdom..species), got {len(vals)}")
    return vals


def _split(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip() and v.strip() != "none")


def cmd_intrinsic(args) -> int:
    from treeprobe.pipeline import run_intrinsic

    demo = args.demo or (args.data is None and args.embeddings is None)
    if demo and not args.demo:
        print("treeprobe: no --data or --embeddings given: running the built-in simulated tree of life (--demo)",
              file=sys.stderr)
    for name in ("permutations", "knn_k", "knn_max_queries", "batch_size", "max_map_points"):
        if getattr(args, name) < (0 if name == "permutations" else 1):
            raise TreeprobeError(f"--{name.replace('_', '-')} must be positive")
    report, paths = run_intrinsic(
        data=args.data, embeddings=args.embeddings, metadata=args.metadata, ckpt=args.ckpt, model=args.model,
        pretrained=args.pretrained, tree=args.tree, out=args.out, demo=demo, cache_dir=args.cache_dir,
        batch_size=args.batch_size, workers=args.workers, device=args.device, figures=not args.no_figures,
        progress=not args.quiet, trust_checkpoint=args.trust_checkpoint, seed=args.seed, permutations=args.permutations, knn_k=args.knn_k,
        knn_max_queries=args.knn_max_queries,
        rank_lengths=_rank_lengths(args.rank_lengths), maps=_split(args.maps),
        max_map_points=args.max_map_points, cluster_methods=_split(args.cluster_methods),
        centroid_level=not args.no_centroids,
    )
    _print_summary(report, paths)
    return 0


def _print_summary(report, paths) -> None:
    print(f"items analysed: {report.n_items}   skipped: {len(report.skipped)}")
    for _, row in report.mantel.iterrows():
        print(f"Mantel {row['level']:>16s} {row['method']:<8s} r = {row['statistic']:+.4f}  p = {row['p_value']:.4g}"
              f"  ({row['permutations']} permutations)")
    if len(report.knn):
        print("kNN agreement (excess over chance): " + ", ".join(
            f"{r['rank']} {r['agreement']:.3f} ({r['agreement_excess']:+.3f})" for _, r in report.knn.iterrows()))
    if paths:
        print(f"report: {paths.get('markdown')}  json: {paths.get('json')}")


def cmd_tree(args) -> int:
    from treeprobe import data as data_mod
    from treeprobe.taxonomy import Taxonomy, placeable_mask

    if args.metadata:
        ds = data_mod.load_embeddings(args.data, metadata=args.metadata)
    else:
        ds = data_mod.load_data(args.data)
    items = ds.items[placeable_mask(ds.items)]
    if len(items) == 0:
        raise TreeprobeError("no item has a kingdom: no taxonomy to export")
    tax = Taxonomy.from_frame(items)
    nwk = tax.to_newick(_rank_lengths(args.rank_lengths))
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        fh.write(nwk + "\n")
    os.replace(out + ".tmp", out)
    print(f"wrote {out}: {tax.n_taxa('species')} species, {len(items)} items "
          f"({len(ds.items) - len(items)} without kingdom left out)")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "intrinsic":
            return cmd_intrinsic(args)
        return cmd_tree(args)
    except TreeprobeError as exc:
        print(f"treeprobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("treeprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
