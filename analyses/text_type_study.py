"""Text-type study in miniature: does training on taxonomic captions give embeddings that
agree more with the tree of life than scientific names alone, or a mix (BioCLIP, Sec. 4.4)?

    python analyses/text_type_study.py --out runs/text_type_study

On the real photos (``../shared/data/multikingdom_photos_index/metadata.csv``):

1. One fixed random split of the photos (``--heldout-frac``, seed ``--split-seed``) into a
   training set and a held-out set; both written under ``OUT/split/``.
2. The training photos are written once as webdataset shards, downscaled
   (``treeprobe make-shards --max-size``), so every run decodes small JPEGs.
3. For every text type (``--text-types``, default taxonomic, scientific, mixed) and seed
   (``--seeds``, default 0 1 2): ``treeprobe train`` with the tiny model, the same budget
   (``--epochs``, ``--batch-size``, ``--lr``), the seed driving init, data order,
   augmentation and the mixed draws. Untrained models (random init, same seeds) give
   the baseline row ``untrained``.
4. Each final checkpoint is loaded with ``treeprobe.models.load_model`` (as ``treeprobe
   intrinsic --ckpt`` does), the held-out photos are embedded, and
   ``treeprobe.pipeline.analyse_embeddings`` scores them against the taxonomy (Mantel r
   image- and species-centroid-level, kNN agreement excess per rank). If the pipeline is
   missing the script falls back to kNN agreement per rank only.
   Zero-shot columns (unless ``--no-zeroshot``): per rank, flat top-1 (``zs_<rank>_flat_top1``) and
   species-summed top-1 (``zs_<rank>_summed_top1``) of the held-out photos, the candidates being the
   species of the held-out set (``zs_<rank>_chance`` = 1 / its taxa at that rank), class texts
   ``a photo of ...`` embedded by the model's own text tower in the run's training text type
   (``zs_text_type``; ``mixed`` and ``untrained`` use ``taxonomic``), logit scale 100
   (``analyses/zeroshot_text_types.py`` holds the shared scoring).
5. ``OUT/runs.csv`` (one row per run), ``OUT/summary.csv`` and ``OUT/summary.md``
   (mean ± sd over seeds per text type; a second table for zero-shot).

Caveat (see the data's SOURCE.md): photo source and kingdom are confounded (plants, fungi,
spiders and butterflies come from different photo sets), so kingdom-level agreement can
be learned from photo style alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analyses"))  # zeroshot_text_types: the shared zero-shot scoring
DEFAULT_CSV = REPO.parent / "shared" / "data" / "multikingdom_photos_index" / "metadata.csv"
SHARD_SIZE = 128
EMBED_BATCH_SIZE = 128
LOG_EVERY = 5
#: Class-text type of the zero-shot columns for runs whose training text type is not a fixed one.
ZEROSHOT_FALLBACK_TEXT = {"mixed": "taxonomic", "untrained": "taxonomic"}
#: Zero-shot modes of the columns and their column-name part.
ZEROSHOT_MODES = {"flat": "flat", "species_summed": "summed"}
__all__ = ["split_items", "score", "zeroshot_columns", "main"]


def split_items(csv: Path, frac: float, *, seed: int, out: Path) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``heldout.csv`` (absolute paths) under ``out``."""
    from treeprobe.training.data import load_items

    items = load_items(csv)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(items), bool)
    held[rng.permutation(len(items))[: int(round(frac * len(items)))]] = True
    out.mkdir(parents=True, exist_ok=True)
    items[~held].to_csv(out / "train.csv", index=False)
    items[held].to_csv(out / "heldout.csv", index=False)
    return out / "train.csv", out / "heldout.csv"


def zeroshot_columns(text_model, emb: np.ndarray, heldout: pd.DataFrame, text_type: str) -> dict:
    """Zero-shot columns of one model: ``zs_text_type``, ``zs_n_species`` and per rank
    ``zs_<rank>_flat_top1``, ``zs_<rank>_summed_top1``, ``zs_<rank>_chance`` (1 / taxa at that rank).

    ``text_model``: the model's :class:`~treeprobe.models.LoadedModel` (its text tower embeds the class
    texts of ``text_type``, or of ``ZEROSHOT_FALLBACK_TEXT[text_type]``); ``emb``: (N, D) image
    embeddings of ``heldout`` (N rows with kingdom..species); candidates: the species of ``heldout``.
    """
    from zeroshot_text_types import zeroshot_by_text_type

    tt = ZEROSHOT_FALLBACK_TEXT.get(text_type, text_type)
    # n_boot=1: the per-run intervals are not reported (the summary gives the spread over seeds)
    zs = zeroshot_by_text_type(text_model, emb, heldout, (tt,), modes=tuple(ZEROSHOT_MODES), n_boot=1)[tt]
    res = {"zs_text_type": tt, "zs_n_species": zs["hierarchy"].n_species}
    for row in zs["zeroshot"].itertuples():
        res[f"zs_{row.rank}_{ZEROSHOT_MODES[row.mode]}_top1"] = float(row.top1)
        if row.mode == "flat":  # 1 / taxa (species_summed has its own chance: the species share of the taxon)
            res[f"zs_{row.rank}_chance"] = float(row.chance_top1)
    return res


def score(model, preprocess, heldout: pd.DataFrame, *, seed: int, permutations: int, text_model=None,
          text_type: str | None = None) -> dict:
    """Held-out metrics: treeprobe's headline numbers (or the kNN fallback), plus the zero-shot
    columns (:func:`zeroshot_columns`) when ``text_model`` (a LoadedModel of ``model``) is given."""
    from treeprobe.training.evaluate import embed_images, knn_metrics, light_kwargs, pipeline_headline

    emb = embed_images(model, list(heldout["path"]), preprocess, batch_size=EMBED_BATCH_SIZE)
    zs = zeroshot_columns(text_model, emb, heldout, text_type) if text_model is not None else {}
    try:
        from treeprobe.pipeline import analyse_embeddings
    except ImportError:
        res = {f"knn_{r}_agreement_excess": v for r, v in
               ((k[len("knn_excess_"):], v) for k, v in knn_metrics(emb, heldout).items() if k.startswith("knn_excess_"))}
        res["metrics_source"] = "kNN fallback (treeprobe.pipeline missing)"
        return {**res, **zs}
    from treeprobe.tl import intrinsic  # analyse_embeddings forwards its options to it

    rep = analyse_embeddings(emb, heldout, seed=seed, **light_kwargs(intrinsic, permutations))
    res = pipeline_headline(rep)
    res["metrics_source"] = "treeprobe.pipeline.analyse_embeddings"
    return {**res, **zs}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=str(DEFAULT_CSV), help="metadata CSV of the photos")
    p.add_argument("--text-types", nargs="+", default=["taxonomic", "scientific", "mixed"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12, help="training epochs per run (the budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: tiny's 32 px)")
    p.add_argument("--max-size", type=int, default=64, help="shards: shorter image side in pixels")
    p.add_argument("--heldout-frac", type=float, default=0.3)
    p.add_argument("--split-seed", type=int, default=12345)
    p.add_argument("--permutations", type=int, default=199, help="Mantel permutations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--no-zeroshot", action="store_true", help="skip the zero-shot columns")
    return p


def _untrained_row(a, seed: int, heldout: pd.DataFrame) -> dict:
    """The baseline: the tiny network at the random init every run of ``seed`` starts from."""
    from treeprobe.models import LoadedModel, create_model

    built = create_model("tiny", image_size=a.image_size, seed=seed)
    lm = LoadedModel(model=built.model.eval(), preprocess=built.preprocess_val, model_name=built.name,
                     digest=f"random-init-{built.name}-seed{seed}", source="random-init", embed_dim=built.embed_dim)
    t0 = time.time()
    return {"text_type": "untrained", "seed": seed, "train_s": 0.0, "final_loss": np.nan,
            **score(lm.model, lm.preprocess, heldout, seed=0, permutations=a.permutations,
                    text_model=None if a.no_zeroshot else lm, text_type="untrained"),
            "eval_s": round(time.time() - t0, 1)}


def _trained_row(a, tt: str, seed: int, *, shards: Path, heldout: pd.DataFrame) -> dict | None:
    """Train text type ``tt`` with ``seed`` on the shards and score the final checkpoint (None: it failed)."""
    from treeprobe.models import load_model
    from treeprobe.training.cli import main as train_main

    run = Path(a.out) / "runs" / f"{tt}_seed{seed}"
    targs = ["--data", str(shards), "--out", str(run), "--model", "tiny", "--text-type", tt,
             "--seed", str(seed), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
             "--lr", str(a.lr), "--warmup", str(a.warmup), "--no-progress", "-q", "--log-every", str(LOG_EVERY),
             "--resume", "latest"]  # a rerun continues (or finds finished) the run already in the folder
    if a.image_size:
        targs += ["--image-size", str(a.image_size)]
    if a.threads:
        targs += ["--threads", str(a.threads)]
    t0 = time.time()
    rc = train_main(targs)
    if rc != 0:
        print(f"training failed for {tt} seed {seed} (rc {rc})", file=sys.stderr)
        return None
    train_s = time.time() - t0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("event") == "train"]
    lm = load_model(ckpt=str(run / "checkpoints" / f"epoch_{a.epochs}.pt"))
    t1 = time.time()
    return {"text_type": tt, "seed": seed, "train_s": round(train_s, 1),
            "final_loss": losses[-1] if losses else np.nan,
            **score(lm.model, lm.preprocess, heldout, seed=0, permutations=a.permutations,
                    text_model=None if a.no_zeroshot else lm, text_type=tt),
            "eval_s": round(time.time() - t1, 1)}


def _zeroshot_lines(df: pd.DataFrame, order: list[str]) -> list[str]:
    """Markdown lines of the zero-shot columns: a row per (mode, text type), a column per rank (mean ± sd
    over seeds), a chance row; [] without them."""
    from treeprobe._utils import RANKS

    ranks = [r for r in RANKS if f"zs_{r}_flat_top1" in df.columns]
    if not ranks:
        return []
    g = df.groupby("text_type", sort=False)
    text, n = g["zs_text_type"].first(), g.size()
    lines = ["| mode | text type | class texts | n | " + " | ".join(ranks) + " |",
             "|---|---|---|---|" + "---|" * len(ranks)]
    for mode, part in ZEROSHOT_MODES.items():
        names = [f"zs_{r}_{part}_top1" for r in ranks]
        mean, sd = g[names].mean(), g[names].std(ddof=1)
        for tt in order:
            cells = [f"{mean.at[tt, c]:.3f} ± {0.0 if pd.isna(sd.at[tt, c]) else sd.at[tt, c]:.3f}" for c in names]
            lines.append(f"| {mode} | {tt} | {text[tt]} | {int(n[tt])} | " + " | ".join(cells) + " |")
    chance = [f"{df[f'zs_{r}_chance'].iloc[0]:.3f}" for r in ranks]
    return lines + ["| chance (1/taxa) | | | | " + " | ".join(chance) + " |"]


def _summary_table(df: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """(mean/sd per text type, the markdown table lines)."""
    metric_cols = [c for c in df.columns if c.endswith("_r") or c.endswith("agreement_excess")
                   or (c.startswith("zs_") and c.endswith("_top1"))] + ["final_loss"]
    g = df.groupby("text_type", sort=False)[metric_cols]
    mean, sd = g.mean().reindex(order), g.std(ddof=1).reindex(order)
    summary = mean.add_suffix("_mean").join(sd.add_suffix("_sd"))
    summary.insert(0, "n_seeds", df.groupby("text_type").size().reindex(order))
    show = [c for c in metric_cols if c.startswith("mantel_") or c.startswith("knn_")] + ["final_loss"]
    short = {c: c.replace("mantel_", "Mantel ").replace("_spearman_r", " ρ").replace("_pearson_r", " r")
             .replace("species-centroid", "centroid").replace("knn_", "kNN ").replace("_agreement_excess", "")
             for c in show}
    lines = ["| text type | n | " + " | ".join(short[c] for c in show) + " |",
             "|---|---|" + "---|" * len(show)]
    for tt in order:
        cells = []
        for c in show:
            m, s = mean.at[tt, c], sd.at[tt, c]
            cells.append("—" if pd.isna(m) else f"{m:.3f} ± {0.0 if pd.isna(s) else s:.3f}")
        lines.append(f"| {tt} | {int(summary.at[tt, 'n_seeds'])} | " + " | ".join(cells) + " |")
    return summary, lines


def main(argv=None) -> int:
    """Run the study (see the module docstring); exit status."""
    from treeprobe.training.shards import make_shards

    a = _parser().parse_args(argv)
    out = Path(a.out)
    t_all = time.time()
    train_csv, held_csv = split_items(Path(a.data), a.heldout_frac, seed=a.split_seed, out=out / "split")
    heldout = pd.read_csv(held_csv, dtype=str, keep_default_na=False)
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        make_shards(train_csv, shards, shard_size=SHARD_SIZE, max_size=a.max_size, shuffle_seed=a.split_seed)
    n_train = json.loads((shards / "manifest.json").read_text())["num_samples"]
    print(f"train {n_train} photos (shards), held-out {len(heldout)} photos", flush=True)

    rows = [_untrained_row(a, seed, heldout) for seed in a.seeds]
    runs_csv = out / "runs.csv"
    for tt in a.text_types:
        for seed in a.seeds:
            row = _trained_row(a, tt, seed, shards=shards, heldout=heldout)
            if row is None:
                return 1
            rows.append(row)
            pd.DataFrame(rows).to_csv(runs_csv, index=False)
            print(f"{tt} seed {seed}: train {row['train_s']:.0f}s, loss {row['final_loss']:.3f}", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(runs_csv, index=False)

    summary, lines = _summary_table(df, ["untrained"] + list(a.text_types))
    summary.to_csv(out / "summary.csv")
    src = df["metrics_source"].iloc[0]
    text = (f"Held-out photos: {len(heldout)}; training photos: {n_train}; budget {a.epochs} epochs x batch "
            f"{a.batch_size} (lr {a.lr}); seeds {a.seeds}; metrics: {src} (Mantel {a.permutations} "
            f"permutations; kNN k=10, agreement excess = (agreement - chance)/(1 - chance)). "
            f"Mean ± sd over seeds. Total {time.time() - t_all:.0f} s.\n\n" + "\n".join(lines) + "\n")
    zs_lines = _zeroshot_lines(df, ["untrained"] + list(a.text_types))
    if zs_lines:
        text += (f"\nZero-shot top-1 on the held-out photos, candidates = the {int(df['zs_n_species'].iloc[0])} "
                 "held-out species; class texts in the run's training text type (mixed, untrained: taxonomic); "
                 "logit scale 100; 'summed' = species probabilities summed up the tree. Mean ± sd over seeds.\n\n"
                 + "\n".join(zs_lines) + "\n")
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
