"""The ``treeprobe`` command line: one program, one subcommand per job.

``treeprobe intrinsic`` (the analysis), ``treeprobe zeroshot`` (the image-text side), ``treeprobe compare`` (several models, paired tests), ``treeprobe tree`` (taxonomy → Newick), ``treeprobe extract``
(embed images into the cache, also under torchrun), ``treeprobe train`` / ``make-shards`` /
``export-weights`` (the BioCLIP-style trainer; ``treeprobe-train`` is an alias of ``treeprobe train``).

Input problems end with one line ``treeprobe: error: ...`` and exit status 2 (no traceback);
an interrupt exits with 130. What the input had that treeprobe changed or set aside
(:class:`~treeprobe.errors.TreeprobeWarning`) is one line ``treeprobe: warning: ...`` on stderr.
Every ``--out`` is checked before any long work (an existing file, an unwritable place, a full disk
are errors at once), and a report folder is replaced as a whole at the end, never left half written.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError, TreeprobeWarning, warnings_as_lines

__all__ = ["main", "build_parser", "FIRST_CONTACT"]

FIRST_CONTACT = """\
treeprobe: does a vision model's representation agree with the tree of life?

Try it on the bundled real example (1,030 BioCLIP 2 embeddings of TreeOfLife-200M images):
  treeprobe intrinsic --example bioclip2-1k --out out/bioclip2
Run the full image path on synthetic species with the bundled demo checkpoint:
  treeprobe intrinsic --demo --out out/demo
Your own data:
  treeprobe intrinsic --embeddings emb.parquet --out out/mine          (or emb.npy --metadata meta.csv)
  treeprobe intrinsic --ckpt model.pt --data images.csv --out out/mine  (images + an open_clip checkpoint)
Compare models on the same images (paired tests, figures, HTML report):
  treeprobe compare --model a=a.pt --model b=b.pt --data images.csv --out out/ab
Zero-shot and few-shot per rank, mistake severity, the text tower's tree:
  treeprobe zeroshot --demo --text-types taxonomic,scientific --out out/demo_zeroshot
Other commands: tree, extract, train, make-shards, export-weights (treeprobe COMMAND --help).
"""


def _default(fn, name: str):
    """The default of parameter ``name`` of ``fn``: argparse defaults are read, never repeated."""
    return inspect.signature(fn).parameters[name].default


def _version() -> str:
    from treeprobe import __version__

    return __version__


def _add_intrinsic(sub) -> None:
    from treeprobe import tl
    from treeprobe.pipeline import DEFAULT_STREAM_SAMPLE

    a = sub.add_parser(
        "intrinsic",
        help="embed images (or read embeddings) and report agreement with the taxonomy",
        description="Extract embeddings (or read precomputed ones), then report how well they agree with the "
                    "taxonomy: Mantel correlation with tree distance (permutation p-values), rank-wise "
                    "clustering purity/NMI/AMI/ARI with chance baselines, kNN rank agreement, t-SNE/UMAP maps.",
        epilog=FIRST_CONTACT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inputs(a)
    a.add_argument("--tree", help="Newick phylogeny with branch lengths, leaves named by species binomial; its "
                                  "patristic distances replace the rank taxonomy's in the Mantel tests")
    s = a.add_argument_group("analysis")
    d = {k: _default(tl.intrinsic, k) for k in ("seed", "permutations", "knn_k", "knn_max_queries",
                                                "max_map_points", "maps", "cluster_methods")}
    s.add_argument("--seed", type=int, default=d["seed"], help=f"seed of every stochastic step (default {d['seed']})")
    s.add_argument("--permutations", type=int, default=d["permutations"],
                   help=f"Mantel permutations; 0: statistics only, no p-values (default {d['permutations']})")
    s.add_argument("--knn-k", type=int, default=d["knn_k"], help=f"neighbours for kNN agreement (default {d['knn_k']})")
    s.add_argument("--knn-max-queries", type=int, default=d["knn_max_queries"],
                   help="above this many items, kNN agreement is estimated (with a 95%% CI) from this many "
                        f"random query items, each with its exact neighbours among all items (default {d['knn_max_queries']})")
    s.add_argument("--rank-lengths", help="edge length above each rank, 7 comma-separated numbers "
                                          "kingdom..species (default 1 each)")
    s.add_argument("--maps", default=",".join(d["maps"]),
                   help=f"2-D maps to draw: tsne,umap or none (default {','.join(d['maps'])})")
    s.add_argument("--max-map-points", type=int, default=d["max_map_points"],
                   help=f"subsample maps above this many points (default {d['max_map_points']})")
    s.add_argument("--cluster-methods", default=",".join(d["cluster_methods"]),
                   help=f"clustering methods (default {','.join(d['cluster_methods'])})")
    s.add_argument("--no-centroids", action="store_true", help="skip the species-centroid Mantel tests")
    s.add_argument("--permute", choices=("species", "images", "both"), default="species",
                   help="what the Mantel p-values permute: species (default: whole species among tree positions, "
                        "within strata of equal image count; r over between-species pairs), images (all pairs, "
                        "images permuted: tests whether images are exchangeable), or both")
    s.add_argument("--control", metavar="COLUMN",
                   help="also run a partial Mantel test controlling for this items column (categorical: "
                        "same/different; numeric: absolute difference), e.g. img_type")
    ph = a.add_argument_group("tree-level analyses")
    ph.add_argument("--phylo", action="store_true",
                    help="also K_mult (phylogenetic signal of the species centroids), the tree recovered from the "
                         "embeddings against the taxonomy, and within- vs between-species variation")
    ph.add_argument("--tree-method", choices=("upgma", "nj"), default=_default(tl.intrinsic, "tree_method"),
                    help="how the tree of taxon centroids is built (default %(default)s)")
    ph.add_argument("--tree-levels", default=",".join(_default(tl.intrinsic, "tree_levels")),
                    help="leaves of the recovered trees: species and/or ranks (default %(default)s)")
    ph.add_argument("--covariate", metavar="COLUMN",
                    help="an items column for the within-species shift (implies --phylo), e.g. img_type")
    ph.add_argument("--covariate-levels", metavar="A;B",
                    help="the two levels of --covariate compared, separated by ';', each one value or several "
                         "joined by '|' or a shell-style pattern, e.g. 'Citizen Science;Museum Specimen*' "
                         "(default: the column's two values)")
    ph.add_argument("--species-covariate", metavar="COLUMN[,COLUMN]",
                    help="items column(s) constant within species (a trait, a habitat): does embedding distance "
                         "follow it beyond the tree? (partial Mantel; implies --phylo)")
    st = a.add_argument_group(
        "streamed embeddings (--embeddings FOLDER or 'GLOB' of parquet shards, or one file with --stream)",
        "One bounded-memory pass over the shards: the Mantel tests the species statistics give (image-level "
        "between-species Pearson, species centroids) and K_mult are exact over all rows; kNN, clustering and "
        "maps run on a stratified sample. Quote a glob so the shell does not expand it.")
    st.add_argument("--stream", action="store_true",
                    help="stream a single --embeddings file (.parquet, or .npy with --metadata) instead of loading it")
    st.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[,VALUE...]",
                    help="keep only rows whose COLUMN is one of the values (rank names compared as the taxonomy "
                         "spells them, letter case ignored); repeat for several columns (all must hold), "
                         "e.g. --where class=Aves")
    st.add_argument("--sample", type=int, metavar="N",
                    help=f"items sampled (stratified by species, seeded by --seed) for kNN, clustering and maps "
                         f"(default {DEFAULT_STREAM_SAMPLE})")
    st.add_argument("--engine", choices=("local", "dask"),
                    help="run the pass in this process (local, default) or on a Dask cluster (dask)")
    st.add_argument("--scheduler", metavar="ADDRESS",
                    help="Dask scheduler address for --engine dask (default: a local 2-worker cluster)")
    z = a.add_argument_group("image-text analyses")
    z.add_argument("--zeroshot", action="store_true",
                   help="also per-rank zero-shot, mistake severity, few-shot and the text tower's tree (as "
                        "treeprobe zeroshot), with the text options below")
    _add_text(a)
    _add_output(a, "treeprobe_out")
    a.set_defaults(func=cmd_intrinsic)


def _add_inputs(a) -> None:
    """The input and model options shared by ``intrinsic`` and ``zeroshot``."""
    from treeprobe.datasets import EXAMPLES
    from treeprobe.pipeline import load_inputs

    src = a.add_argument_group("inputs (one of)")
    src.add_argument("--example", choices=sorted(EXAMPLES),
                     help="a bundled real example: bioclip2-1k (1,030 BioCLIP 2 embeddings with lineages)")
    src.add_argument("--data", help="metadata CSV (path + kingdom..species, paths relative to the CSV), an "
                                    "iNat21-style image folder, or an embeddings file (.npy / .parquet)")
    src.add_argument("--embeddings", help="precomputed embeddings: .npy (with --metadata or a metadata.csv beside "
                                          "it) or .parquet with an 'emb' column and rank columns; for intrinsic "
                                          "also a folder or a quoted 'GLOB' of parquet shards (streamed)")
    src.add_argument("--metadata", help="metadata CSV for a .npy embeddings file")
    src.add_argument("--demo", action="store_true",
                     help="synthetic images of a simulated tree of life, embedded by the bundled demo checkpoint")
    m = a.add_argument_group("model (for images)")
    m.add_argument("--ckpt", help="open_clip checkpoint (.pt with state_dict, bare state dict, .safetensors) "
                                  "or an hf-hub:ORG/NAME id")
    m.add_argument("--model", help="open_clip architecture (e.g. ViT-B-16) when the checkpoint does not name it")
    m.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai) for --model")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a torch checkpoint holding non-tensor Python objects (unpickling runs its code)")
    bs, wk = _default(load_inputs, "batch_size"), _default(load_inputs, "workers")
    m.add_argument("--batch-size", type=int, default=bs, help=f"images per forward pass (default {bs})")
    m.add_argument("--workers", type=int, default=wk, help=f"DataLoader workers for image decoding (default {wk})")
    m.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--cache-dir", help="embedding cache folder (default $TREEPROBE_CACHE or ~/.cache/treeprobe)")


def _add_text(parser) -> None:
    """The text-embedding options (``zeroshot``, ``intrinsic --zeroshot``)."""
    from treeprobe.text_embed import TEXT_TYPES

    t = parser.add_argument_group("text embeddings of the taxa (zero-shot)")
    t.add_argument("--text-types", default="taxonomic",
                   help="caption types embedded for every taxon, comma-separated: " + ", ".join(TEXT_TYPES) +
                        " (default %(default)s; BioCLIP's text types)")
    t.add_argument("--text-embeddings", metavar="FILE",
                   help="precomputed text embeddings of the taxa (.parquet / .npz with rank, taxon, embedding; "
                        "as written by treeprobe.text_embed.write_text_embeddings) instead of the model's text tower")
    t.add_argument("--templates", choices=("single", "ensemble"), default="single",
                   help="'a photo of {}.' (default) or an average over eight CLIP-style templates")


def _text_options(args) -> dict:
    from treeprobe.text_embed import TEXT_TYPES

    return dict(text_types=_names(args.text_types, "text type", TEXT_TYPES), file=args.text_embeddings,
                templates="ensemble" if args.templates == "ensemble" else None)


def _add_zeroshot(sub) -> None:
    from treeprobe import tl

    a = sub.add_parser(
        "zeroshot", help="per-rank zero-shot and few-shot, mistake severity, the text tower's tree",
        description="Classify every image among the taxa of its data set at every rank by the text embeddings of "
                    "the taxa (flat, top-down, species scores summed up the tree), with species-bootstrap "
                    "intervals and chance; how far wrong the mistakes are (LCA depth, mistake severity, hdist@k, "
                    "nLCA); 1- and 5-shot per rank on the image embeddings (seeded splits written out); and whether "
                    "the text embeddings of species names follow the tree (Mantel, K_mult, recovered tree) and "
                    "align with the images per rank.",
        epilog="examples:\n  treeprobe zeroshot --demo --text-types taxonomic,scientific --out out/demo_zeroshot\n"
               "  treeprobe zeroshot --ckpt model.pt --data images.csv --out out/zeroshot\n"
               "  treeprobe zeroshot --example bioclip2-1k --text-embeddings taxa.parquet --out out/zs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_inputs(a)
    _add_text(a)
    s = a.add_argument_group("analysis")
    d = {k: _default(tl.image_text, k) for k in ("seed", "permutations", "n_boot", "k", "fewshot_seeds")}
    s.add_argument("--seed", type=int, default=d["seed"], help=f"seed of every stochastic step (default {d['seed']})")
    s.add_argument("--permutations", type=int, default=d["permutations"],
                   help=f"permutations of the text-tree tests (default {d['permutations']})")
    s.add_argument("--bootstrap", type=int, default=d["n_boot"],
                   help=f"species-bootstrap resamples of the intervals (default {d['n_boot']})")
    s.add_argument("--top-k", type=int, default=d["k"], help=f"k of top-k accuracy and hdist@k (default {d['k']})")
    s.add_argument("--fewshot-seeds", type=int, default=d["fewshot_seeds"],
                   help=f"seeded few-shot splits (default {d['fewshot_seeds']})")
    s.add_argument("--rank-lengths", help="edge length above each rank, 7 comma-separated numbers "
                                          "kingdom..species (default 1 each): the heights of the mistake metrics")
    _add_output(a, "treeprobe_zeroshot")
    a.set_defaults(func=cmd_zeroshot)


def _input_options(args) -> dict:
    return dict(example=args.example, data=args.data, embeddings=args.embeddings, metadata=args.metadata,
                demo=args.demo, ckpt=args.ckpt, model=args.model, pretrained=args.pretrained,
                cache_dir=args.cache_dir, batch_size=args.batch_size, workers=args.workers, device=args.device,
                progress=not args.quiet, trust_checkpoint=args.trust_checkpoint)


def cmd_zeroshot(args) -> int:
    """``treeprobe zeroshot``: check the options, run the image-text analyses, print the headline numbers."""
    from treeprobe.pipeline import run_zeroshot

    if not (args.example or args.data or args.embeddings or args.demo):
        sys.stderr.write("treeprobe zeroshot: no input given (--demo, --example, --data or --embeddings).\n")
        return 2
    _check_counts(args, positive=("bootstrap", "top_k", "fewshot_seeds", "batch_size"),
                  non_negative=("permutations", "workers"))
    report, paths = run_zeroshot(out=args.out, figures=not args.no_figures, inputs=_input_options(args),
                                 text=_text_options(args), seed=args.seed, permutations=args.permutations,
                                 n_boot=args.bootstrap, k=args.top_k, fewshot_seeds=args.fewshot_seeds,
                                 rank_lengths=_rank_lengths(args.rank_lengths), progress=not args.quiet)
    print(f"items analysed: {report.n_items}   skipped: {len(report.skipped)}")
    _print_image_text(report)
    if paths:
        print(f"report: {paths.get('markdown')}  json: {paths.get('json')}")
    return 0


def _print_image_text(report) -> None:
    z = report.image_text.get("zeroshot")
    if z is not None and len(z):
        for (tt, mode), sub in z.groupby(["text_type", "mode"], sort=False):
            print(f"zero-shot top-1 ({tt}, {mode}): " + ", ".join(f"{r} {v:.3f}" for r, v in zip(sub["rank"], sub["top1"])))
    m = report.image_text.get("mistakes")
    if m is not None and len(m):
        for tt, sub in m.groupby("text_type", sort=False):
            v = sub.set_index("metric")
            print(f"mistakes ({tt}): severity {v.loc['mistake_severity', 'value']:.3f} (chance "
                  f"{v.loc['mistake_severity', 'chance']:.3f}), nLCA {v.loc['nlca', 'value']:.3f} "
                  f"(chance {v.loc['nlca', 'chance']:.3f})")
    f = report.image_text.get("fewshot")
    if f is not None and len(f):
        for (k, meth), sub in f.groupby(["k", "method"], sort=False):
            print(f"{k}-shot {meth}: " + ", ".join(f"{r} {v:.3f}" for r, v in zip(sub["rank"], sub["mean"])))
    t = report.image_text.get("text_tree")
    if t is not None and len(t):
        for _, row in t.iterrows():
            print(f"text tree ({row['text_type']}): {row['statistic']} = {row['value']:+.4f}  p = {row['p_value']:.3g}")


def covariate_levels(text: str | None) -> tuple | None:
    """``--covariate-levels 'A;B1|B2'`` → ``(['A'], ['B1', 'B2'])`` (values may be shell-style patterns:
    :func:`treeprobe.variation.within_species_variation` matches them against the column's values)."""
    if text is None:
        return None
    parts = text.split(";")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise TreeprobeError(f"--covariate-levels {text!r}: expected two levels separated by ';' (e.g. 'A;B')")
    return tuple([v.strip() for v in p.split("|") if v.strip()] for p in parts)


def _add_output(parser, default: str) -> None:
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=default, help=f"output folder, replaced as a whole by the new report: a new "
                                                  f"folder, an empty one or an earlier report's (default ./{default})")
    o.add_argument("--no-figures", action="store_true", help="write numbers only")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_compare(sub) -> None:
    from treeprobe import tl
    from treeprobe.compare import compare
    from treeprobe.pipeline import load_inputs

    a = sub.add_parser(
        "compare", help="several models on the same items: every metric per model, paired tests, figures",
        description="Score N >= 2 models on the same items (aligned by item id) and test their differences with "
                    "paired schemes that resample species, never images (see treeprobe.compare). Or, with --run, "
                    "plot every metric against training step for the checkpoints of a treeprobe-train run.",
        epilog="examples:\n  treeprobe compare --model clip=ViT-B-16:openai --model bioclip=hf-hub:imageomics/bioclip "
               "--data images.csv --out out/clip_vs_bioclip\n  treeprobe compare --model a=emb_a.parquet "
               "--model b=emb_b.parquet --out out/ab\n  treeprobe compare --run runs/tiny --data heldout.csv "
               "--out out/curves",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = a.add_argument_group("models (two or more), or a training run")
    src.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                     help="a model: a checkpoint (.pt, .safetensors) or hf-hub:ORG/NAME (embeds --data), ARCH:PRETRAINED "
                          "(open_clip), an embeddings file (.npy, .parquet), or example:bioclip2-1k; repeat for each")
    src.add_argument("--run", help="a treeprobe-train output folder: evaluate each checkpoint on --data and plot "
                                   "the metrics against training step")
    src.add_argument("--from-log", action="store_true",
                     help="with --run: plot the run's own --eval-every evaluations (log.jsonl) instead of "
                          "embedding --data with every checkpoint")
    src.add_argument("--data", help="the images (metadata CSV or iNat21 folder) the checkpoints embed")
    src.add_argument("--metadata", help="metadata CSV for .npy embeddings files")
    src.add_argument("--on", help="id column matching items across models (default: path, uuid, id or item)")
    src.add_argument("--intersect", action="store_true",
                     help="compare on the items every model has (default: a mismatch is an error)")
    m = a.add_argument_group("embedding")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow torch checkpoints holding non-tensor Python objects (unpickling runs their code)")
    bs = _default(load_inputs, "batch_size")
    m.add_argument("--batch-size", type=int, default=bs, help=f"images per forward pass (default {bs})")
    m.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--cache-dir", help="embedding cache folder (default $TREEPROBE_CACHE or ~/.cache/treeprobe)")
    s = a.add_argument_group("analysis")
    d = {k: _default(compare, k) for k in ("seed", "permutations", "bootstrap", "max_pairs", "jackknife",
                                           "cluster_test", "cluster_permutations")}
    s.add_argument("--seed", type=int, default=d["seed"], help=f"seed of every stochastic step (default {d['seed']})")
    s.add_argument("--permutations", type=int, default=d["permutations"],
                   help=f"permutations of each model's own Mantel tests (default {d['permutations']})")
    s.add_argument("--bootstrap", type=int, default=d["bootstrap"],
                   help=f"species bootstrap resamples of the paired intervals (default {d['bootstrap']})")
    s.add_argument("--jackknife", type=int, default=d["jackknife"],
                   help="species groups of the jackknife behind the kNN and clustering differences (each group left "
                        f"out in turn, every search and clustering redone; 0 = off; default {d['jackknife']})")
    s.add_argument("--max-pairs", type=int, default=d["max_pairs"],
                   help=f"item pairs in the Mantel bootstrap sums (all pairs below it; default {d['max_pairs']})")
    s.add_argument("--cluster-test", choices=("jackknife", "swap"), default=d["cluster_test"],
                   help="p-value of the clustering differences: the jackknife (conservative) or swap (a paired "
                        "permutation of model labels within species after Procrustes alignment; calibrated; "
                        "default %(default)s)")
    s.add_argument("--cluster-permutations", type=int, default=d["cluster_permutations"],
                   help="permutations of --cluster-test swap per model pair (2 clusterings each; default %(default)s)")
    s.add_argument("--control", metavar="COLUMN", help="also compare partial Mantel r controlling for this column")
    s.add_argument("--knn-k", type=int, default=_default(tl.intrinsic, "knn_k"), help="neighbours for kNN agreement")
    s.add_argument("--cluster-methods", default=",".join(_default(tl.intrinsic, "cluster_methods")),
                   help="clustering methods (default %(default)s; none to skip)")
    s.add_argument("--drilldown", action="store_true", help="also draw the drill-down t-SNE (one row per model)")
    s.add_argument("--no-similarity", action="store_true", help="skip CKA / RSA between models")
    z = a.add_argument_group("zero-shot (each model with its own text tower)")
    z.add_argument("--zeroshot", action="store_true",
                   help="also per-rank zero-shot top-1 of every model and the paired differences (species bootstrap)")
    z.add_argument("--text-types", default="taxonomic", help="caption type of the class texts (default %(default)s)")
    z.add_argument("--text-embeddings", action="append", default=[], metavar="NAME=FILE",
                   help="precomputed text embeddings of the taxa for model NAME (needed for embedding-file models)")
    z.add_argument("--templates", choices=("single", "ensemble"), default="single",
                   help="'a photo of {}.' (default) or an average over eight CLIP-style templates")
    _add_output(a, "treeprobe_compare")
    a.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    """``treeprobe compare``: models side by side with paired tests, or the curves of a training run."""
    if args.run:
        return _compare_run(args)
    if len(args.model) < 2:
        raise TreeprobeError(f"compare needs at least 2 --model options (got {len(args.model)}), or --run RUN")
    _check_counts(args, positive=("permutations", "bootstrap", "max_pairs", "knn_k", "batch_size"),
                  non_negative=("jackknife",))
    from treeprobe.clustering import METHODS as CLUSTER_METHODS
    from treeprobe.pipeline import run_compare

    inputs = dict(data=args.data, metadata=args.metadata, cache_dir=args.cache_dir, batch_size=args.batch_size,
                  device=args.device, progress=not args.quiet, trust_checkpoint=args.trust_checkpoint, seed=args.seed)
    text = None
    if args.zeroshot or args.text_embeddings:
        from treeprobe.text_embed import TEXT_TYPES

        files = {}
        for spec in args.text_embeddings:
            name, sep, file = spec.partition("=")
            if not sep or not name or not file:
                raise TreeprobeError(f"--text-embeddings {spec!r}: expected NAME=FILE (NAME one of the --model names)")
            files[name] = file
        text = dict(text_types=_names(args.text_types, "text type", TEXT_TYPES)[:1], files=files,
                    templates="ensemble" if args.templates == "ensemble" else None)
    comp, paths = run_compare(
        models=args.model, out=args.out, figures=not args.no_figures, inputs=inputs, text=text, seed=args.seed,
        permutations=args.permutations, bootstrap=args.bootstrap, max_pairs=args.max_pairs, control=args.control,
        jackknife=args.jackknife, cluster_test=args.cluster_test, cluster_permutations=args.cluster_permutations,
        on=args.on, mismatch="intersect" if args.intersect else "error", similarity=not args.no_similarity,
        drilldown=args.drilldown, knn_k=args.knn_k,
        cluster_methods=_names(args.cluster_methods, "clustering method", CLUSTER_METHODS),
        progress=not args.quiet)
    print(f"models: {', '.join(comp.models)}   items: {comp.params['n_items']}")
    diffs = comp.differences
    head = diffs[diffs["metric"].str.startswith("mantel") | diffs["metric"].str.startswith("partial")]
    for _, r in head.iterrows():
        print(f"{r['metric']} ({r['rank']}): {r['model_a']} {r['estimate_a']:+.4f} vs {r['model_b']} "
              f"{r['estimate_b']:+.4f}  difference {r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
              f"  p = {r['p_value']:.3g}")
    if paths:
        print(f"report: {paths.get('html')}  json: {paths.get('json')}")
    return 0


def _compare_run(args) -> int:
    """``treeprobe compare --run RUN --data HELDOUT``: every checkpoint of a run scored on held-out images."""
    from pathlib import Path

    from treeprobe import training_curves as tc
    from treeprobe._utils import atomic_output_dir, atomic_write_text, check_output_dir
    from treeprobe.plots import save_figure
    from treeprobe.tl import default_device

    if args.model:
        raise TreeprobeError("pass --run or --model, not both")
    if args.data is None and not args.from_log:
        raise TreeprobeError("--run needs --data: the held-out images (metadata CSV or folder) each checkpoint embeds "
                             "(or --from-log for the run's own --eval-every evaluations)")
    _check_counts(args, positive=("permutations",))
    check_output_dir(args.out)  # before any checkpoint is scored
    run = tc.read_run(args.run, require_checkpoints=not args.from_log)
    if args.from_log:
        table = tc.curves_from_log(run)
        if not len(table):
            raise TreeprobeError(f"{args.run}: its log has no evaluations (train with --eval-data and --eval-every)")
    else:
        table = tc.evaluate_run(run, args.data, permutations=args.permutations, seed=args.seed,
                                device=args.device or default_device(), progress=not args.quiet,
                                cache_dir=args.cache_dir)
    out = Path(args.out)
    with atomic_output_dir(out) as tmp:  # the table and its figure replace an earlier one as a whole
        atomic_write_text(tmp / "training_curves.csv", table.to_csv(index=False))
        if not args.no_figures:
            save_figure(tc.plot_training_curves(table, loss=run), str(tmp / "training_curves"))
    what = "the run's own evaluations" if args.from_log else f"{len(run.checkpoints)} checkpoints scored on {args.data}"
    print(f"{args.run}: {what}: {out / 'training_curves.csv'}")
    return 0


def _add_tree(sub) -> None:
    t = sub.add_parser("tree", help="export the taxonomy of a data set as Newick",
                       description="Build the rank taxonomy of a data set (metadata CSV, iNat21 folder or "
                                   "embeddings file) and write it as Newick (internal nodes named, one unit per rank).")
    t.add_argument("--data", required=True, help="metadata CSV, iNat21 folder, .npy or .parquet")
    t.add_argument("--metadata", help="metadata CSV for a .npy file")
    t.add_argument("--rank-lengths", help="7 comma-separated edge lengths kingdom..species")
    t.add_argument("--out", required=True, help="output .nwk file")
    t.set_defaults(func=cmd_tree)


def build_parser() -> argparse.ArgumentParser:
    """The ``treeprobe`` parser with every subcommand (each sets ``func(args) -> int``)."""
    from treeprobe.extract_dist import add_subcommands as add_extract
    from treeprobe.training.cli import add_subcommands as add_training

    p = argparse.ArgumentParser(prog="treeprobe",
                                description="Does a vision model's representation agree with the tree of life?",
                                epilog=FIRST_CONTACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"treeprobe {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_intrinsic(sub)
    _add_zeroshot(sub)
    _add_compare(sub)
    _add_tree(sub)
    add_extract(sub)
    add_training(sub)
    return p


def _rank_lengths(text: str | None):
    """``--rank-lengths`` text → 7 finite, non-negative floats kingdom..species (None when not given)."""
    if not text:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise TreeprobeError(f"--rank-lengths must be 7 comma-separated numbers, got {text!r}") from None
    if len(vals) != 7:
        raise TreeprobeError(f"--rank-lengths needs 7 values (kingdom..species), got {len(vals)}")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise TreeprobeError(f"--rank-lengths must be finite and non-negative, got {text!r}")
    return vals


def _check_counts(args, *, positive=(), non_negative=()) -> None:
    """Integer options that must be >= 1 (``positive``) or >= 0, and ``--seed`` in [0, SEED_MAX]."""
    from treeprobe._utils import SEED_MAX

    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value < low:
                need = "positive" if low == 1 else f">= {low}"
                raise TreeprobeError(f"--{name.replace('_', '-')} must be {need}; got {value}")
    seed = getattr(args, "seed", 0)
    if not 0 <= seed <= SEED_MAX:
        raise TreeprobeError(f"--seed must be between 0 and {SEED_MAX} (2**32 - 1); got {seed}")


def _split(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip() and v.strip() != "none")


def _names(text: str, what: str, choices) -> tuple[str, ...]:
    """A comma-separated option (``none``: empty) checked against ``choices`` before any work."""
    from treeprobe._validation import check_choice

    names = _split(text)
    for name in names:
        check_choice(name, what, choices)
    return names


def cmd_intrinsic(args) -> int:
    """``treeprobe intrinsic``: check the options, run, print the headline numbers."""
    from treeprobe.pipeline import run_intrinsic

    if not (args.example or args.data or args.embeddings or args.demo):
        sys.stderr.write("treeprobe intrinsic: no input given.\n\n" + FIRST_CONTACT)
        return 2
    _check_counts(args, positive=("knn_k", "knn_max_queries", "batch_size", "max_map_points"),
                  non_negative=("permutations", "workers"))
    progress = not args.quiet
    zs = args.zeroshot or args.text_embeddings is not None
    if _streamed(args):
        return _cmd_intrinsic_stream(args, zs)
    report, paths = run_intrinsic(
        out=args.out, tree=args.tree, figures=not args.no_figures, inputs=_input_options(args), progress=progress,
        text=_text_options(args) if zs else None,
        **_analysis_options(args))
    _print_summary(report, paths)
    return 0


def _analysis_options(args) -> dict:
    """The analysis options of ``intrinsic`` (in memory and streamed) as keyword arguments of the pipeline."""
    from treeprobe.clustering import METHODS as CLUSTER_METHODS
    from treeprobe.tl import MAPS

    return dict(
        seed=args.seed, permutations=args.permutations, knn_k=args.knn_k, knn_max_queries=args.knn_max_queries,
        rank_lengths=_rank_lengths(args.rank_lengths), maps=_names(args.maps, "map", MAPS),
        max_map_points=args.max_map_points,
        cluster_methods=_names(args.cluster_methods, "clustering method", CLUSTER_METHODS),
        centroid_level=not args.no_centroids,
        permute=("species", "images") if args.permute == "both" else (args.permute,), control=args.control,
        phylo=args.phylo, tree_method=args.tree_method, tree_levels=_split(args.tree_levels),
        covariate=args.covariate, covariate_levels=covariate_levels(args.covariate_levels),
        species_covariates=_split(args.species_covariate) if args.species_covariate else None,
    )


def parse_where(specs) -> dict | None:
    """``--where COLUMN=VALUE[,VALUE...]`` options → {column: [values]} (None when none is given)."""
    out: dict[str, list[str]] = {}
    for spec in specs or ():
        col, sep, vals = spec.partition("=")
        col = col.strip()
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or not col or not values:
            raise TreeprobeError(f"--where {spec!r}: expected COLUMN=VALUE[,VALUE...], e.g. --where class=Aves")
        if col in out:
            raise TreeprobeError(f"--where names column {col!r} twice; list its values in one: "
                                 f"--where {col}={','.join(out[col] + values)}")
        out[col] = values
    return out or None


def _streamed(args) -> bool:
    """Whether ``intrinsic`` streams its input (a folder / glob of shards, or ``--stream``); stream options
    without a streamed input are an error."""
    from treeprobe.pipeline import is_stream_source

    streamed = bool(args.embeddings) and (args.stream or is_stream_source(args.embeddings))
    if not streamed:
        given = [f"--{n}" for n, v in (("stream", args.stream), ("where", args.where), ("sample", args.sample),
                                        ("engine", args.engine), ("scheduler", args.scheduler)) if v]
        if given:
            raise TreeprobeError(f"{', '.join(given)} need streamed embeddings: pass --embeddings FOLDER or a quoted "
                                 "'GLOB' of parquet shards, or --stream with one embeddings file")
    return streamed


def _cmd_intrinsic_stream(args, zeroshot: bool) -> int:
    """``treeprobe intrinsic`` on streamed embeddings (:func:`treeprobe.pipeline.run_intrinsic_stream`)."""
    from treeprobe.pipeline import DEFAULT_STREAM_SAMPLE, run_intrinsic_stream

    for flag, value in (("--tree", args.tree), ("--zeroshot / --text-embeddings", zeroshot), ("--data", args.data),
                        ("--example", args.example), ("--demo", args.demo)):
        if value:
            raise TreeprobeError(f"{flag} cannot be used with streamed embeddings (the statistics use the rank "
                                 "taxonomy of the shards' own columns)")
    sample = DEFAULT_STREAM_SAMPLE if args.sample is None else args.sample
    if sample < 1:
        raise TreeprobeError(f"--sample must be positive; got {sample}")
    engine = args.engine or "local"
    if args.scheduler and engine != "dask":
        raise TreeprobeError("--scheduler needs --engine dask")
    report, paths = run_intrinsic_stream(
        args.embeddings, out=args.out, figures=not args.no_figures, where=parse_where(args.where), sample=sample,
        engine=engine, scheduler=args.scheduler, metadata=args.metadata, progress=not args.quiet,
        **_analysis_options(args))
    st = report.provenance["stream"]
    print(f"streamed {st['n_rows']:,} rows from {st['n_files']} file(s) in {st['pass_seconds']:.1f} s; exact over "
          f"{st['n_items']:,} items of {st['n_species']:,} species; sample of {st['sample']['n_sampled']:,} items "
          "for kNN, clustering and maps")
    _print_summary(report, paths)
    return 0


def _print_summary(report, paths) -> None:
    from treeprobe.report import n_skipped
    from treeprobe.stream import NOT_FROM_STATS

    print(f"items analysed: {report.n_items}   skipped: {n_skipped(report)}")
    for _, row in report.mantel.iterrows():
        if row.get("estimator") == NOT_FROM_STATS:
            print(f"Mantel {row['level']:>16s} {row['method']:<8s} not computed ({NOT_FROM_STATS})")
            continue
        print(f"Mantel {row['level']:>16s} {row['method']:<8s} r = {row['statistic']:+.4f}  p = {row['p_value']:.4g}"
              f"  ({row['permutations']} permutations; {row.get('scheme', '')} permuted)")
    if len(report.knn):
        print("kNN agreement (excess over chance): " + ", ".join(
            f"{r['rank']} {r['agreement']:.3f} ({r['agreement_excess']:+.3f})" for _, r in report.knn.iterrows()))
    head = report.headline()
    if "physignal_K" in head:
        print(f"K_mult = {head['physignal_K']:.4f}  p = {head['physignal_p']:.4g}  z = {head['physignal_z']:.2f}")
    for level in dict.fromkeys(("species", *RANKS)):
        if f"tree_{level}_cophenetic_r" in head:
            print(f"recovered tree ({level}): cophenetic r = {head[f'tree_{level}_cophenetic_r']:+.4f} "
                  f"(p = {head[f'tree_{level}_cophenetic_r_p']:.4g}), nRF = {head[f'tree_{level}_nrf']:.4f}")
    if "covariate_partial_r" in head:
        print(f"species covariate given the tree: partial r = {head['covariate_partial_r']:+.4f} "
              f"(p = {head['covariate_partial_p']:.4g})")
    _print_image_text(report)
    if paths:
        print(f"report: {paths.get('markdown')}  json: {paths.get('json')}")


def cmd_tree(args) -> int:
    """``treeprobe tree``: the data set's rank taxonomy as a Newick file."""
    from treeprobe import data as data_mod
    from treeprobe._utils import atomic_write_text, check_output_file

    lengths = _rank_lengths(args.rank_lengths)
    check_output_file(args.out)  # before the data is read
    ds = data_mod.load_embeddings(args.data, metadata=args.metadata) if args.metadata else data_mod.load_data(args.data)
    tax = ds.taxonomy
    try:
        atomic_write_text(args.out, tax.to_newick(lengths) + "\n")
    except OSError as exc:
        raise TreeprobeError(f"could not write --out {args.out}: {exc.strerror or exc}") from exc
    n_no_kingdom = int(ds.skipped["reason"].astype(str).str.startswith("no taxonomy").sum())
    print(f"wrote {args.out}: {tax.n_taxa('species')} species, {len(ds)} items "
          f"({n_no_kingdom} without kingdom left out)")
    return 0


def main(argv=None) -> int:
    """Run ``treeprobe`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stdout.write(FIRST_CONTACT)
        return 0
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        with warnings_as_lines():
            return int(args.func(args) or 0)
    except (TreeprobeError, TreeprobeWarning) as exc:  # a warning raised as one: -W error::TreeprobeWarning
        print(f"treeprobe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("treeprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
