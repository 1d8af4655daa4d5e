"""Zero-shot per rank by training text type, where names and tree are known (issue 13).

    nice -n 10 env OMP_NUM_THREADS=1 python analyses/zeroshot_text_types.py --out /tmp/zeroshot_text_types

Question: does a CLIP model trained with *taxonomic* captions (``a photo of Kingdom Phylum ... Genus
epithet.``) name higher-rank taxa zero-shot better than one trained with *scientific* names
(``a photo of Genus epithet.``)? BioCLIP (Stevens et al., CVPR 2024, Sec. 4.4) reports that it does.

Part 1 - the bundled demo checkpoint (``treeprobe/assets/demo_clip.pt``, trained by
``python -m treeprobe.training.demo``: tiny model, taxonomic captions, 8 renders per species of
``simulate_world(seed=0)``, render seed 1). Held-out images are fresh renders of the same world
(render seed 2, as the demo's own held-out check; ``--demo-per-species`` renders per species, default:
the world's own 1-6). Zero-shot per rank (flat, top_down, species_summed) with the taxonomic and the
scientific class texts, and the mistake summary (LCA depth, severity, hdist@k, nLCA) of the top-1
species.

Part 2 - a seeded ``--n-species`` subset (default 100) of the same world: one species of every phylum
first (so every kingdom and phylum has a taxon), the rest drawn uniformly. ``--train-per-species``
renders per species (render seed 1) are the training set, ``--heldout-per-species`` fresh renders
(render seed 2) the held-out set; the candidates are the subset's species. For each text type
(taxonomic, scientific) and seed (``--seeds``): ``treeprobe train`` (its Python entry point, as
``analyses/text_type_study.py`` runs it) with the tiny model and the same budget; the final checkpoint
is loaded with ``treeprobe.models.load_model`` (as ``treeprobe intrinsic --ckpt`` does). Untrained
tiny networks (the seeded random init of each run) give a baseline. Each model is scored with its
own training text type as the class texts (and, in ``subset_runs.csv``, with the other type too);
the paired difference taxonomic - scientific per rank is taken seed by seed, with a species-bootstrap
interval for its mean over seeds.

Caveat: the held-out images are new renders of species seen in training, so "zero-shot" means
classification by text embeddings alone (no classifier fitted), not unseen species. Higher-rank
texts (``a photo of Kingdomname.``) are captions neither model was trained on verbatim; at kingdom
the taxonomic and the scientific caption are the same string.

Outputs in ``--out``: ``demo_zeroshot.csv``, ``demo_mistakes.csv``, ``subset_species.csv``,
``subset_runs.csv`` (one row per model x class-text type x rank x mode), ``subset_paired.csv``,
``summary.md`` (markdown tables, budget and timings), ``timings.json``; ``runs/`` holds the
training runs (only the final checkpoint is kept unless ``--keep-checkpoints``). A rerun with the
same ``--out`` reuses finished runs; change the training options only with a new ``--out``.
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
#: Seeds of the renders (as ``treeprobe.training.demo``): training and held-out images differ.
TRAIN_RENDER_SEED, HELDOUT_RENDER_SEED = 1, 2
#: Side of the rendered images in pixels (the tiny model's input size).
IMAGE_SIZE = 32
EMBED_BATCH_SIZE = 256
LOG_EVERY = 5
#: Text types compared in part 2 (the first minus the second is the paired difference).
COMPARED = ("taxonomic", "scientific")
#: Ranks called "higher" in the verdict (above genus).
HIGHER_RANKS = ("kingdom", "phylum", "class", "order", "family")
MODES_SHOWN = ("flat", "species_summed")

__all__ = ["choose_species", "subset_world", "zeroshot_by_text_type", "hit_matrix", "paired_difference",
           "zeroshot_markdown", "main"]


# ----------------------------------------------------------------------------- pure pieces


def choose_species(world, n: int, *, seed: int) -> np.ndarray:
    """Sorted int64 (n,) species codes of ``world``: one species per phylum (random within it) while
    n allows, then uniform without replacement. Raises TreeprobeError if n exceeds the species or the
    subset has fewer than 2 kingdoms or 2 phyla."""
    from treeprobe.errors import TreeprobeError

    S = world.n_species
    if not 2 <= n <= S:
        raise TreeprobeError(f"--n-species must be in 2..{S} (the world's species); got {n}")
    rng = np.random.default_rng(seed)
    phylum = world.species_ancestors[:, 1]
    firsts = np.array([rng.choice(np.flatnonzero(phylum == p)) for p in rng.permutation(np.unique(phylum))])
    firsts = firsts[:n]
    rest = np.setdiff1d(np.arange(S), firsts)
    chosen = np.sort(np.concatenate([firsts, rng.choice(rest, n - len(firsts), replace=False)])).astype(np.int64)
    anc = world.species_ancestors[chosen]
    if len(np.unique(anc[:, 0])) < 2 or len(np.unique(anc[:, 1])) < 2:
        raise TreeprobeError(f"the {n}-species subset has {len(np.unique(anc[:, 0]))} kingdom(s) and "
                             f"{len(np.unique(anc[:, 1]))} phyla; higher ranks need >= 2 taxa (use more species)")
    return chosen


def subset_world(world, species: np.ndarray):
    """The world restricted to ``species`` (codes, S' of them): species-level fields and items cut and
    renumbered 0..S'-1; the tree above the species, the traits of internal nodes and the map are kept,
    so every kept species looks (:func:`treeprobe.synthetic_images.species_looks`) as in ``world``."""
    from dataclasses import replace

    species = np.asarray(species, dtype=np.int64)
    new_code = np.full(world.n_species, -1, dtype=np.int64)
    new_code[species] = np.arange(len(species))
    keep = new_code[world.item_species] >= 0
    items = world.items[keep].reset_index(drop=True)
    items["image_id"] = np.arange(len(items), dtype=np.int64)
    traits = world.species_traits[species]
    return replace(world, items=items, embeddings=world.embeddings[keep], species_traits=traits,
                   species_names=[world.species_names[s] for s in species],
                   item_species=new_code[world.item_species[keep]],
                   node_traits={**world.node_traits, "species": traits},
                   species_lineage=world.species_lineage.iloc[species].reset_index(drop=True),
                   species_ancestors=world.species_ancestors[species])


def hit_matrix(result) -> dict:
    """mode → bool (N, R): top-1 right per image and rank, from a :class:`~treeprobe.zeroshot.ZeroShotResult`
    (False where the truth is unknown)."""
    known = result.true_codes >= 0
    return {m: (p == result.true_codes) & known for m, p in result.predictions.items()}


def paired_difference(hits_a: list, hits_b: list, truth: np.ndarray, ranks, *, modes=MODES_SHOWN,
                      n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired difference a − b of top-1 accuracy per rank and mode, seed by seed.

    ``hits_a``, ``hits_b``: one entry per seed (paired by position), each mode → bool (N, R) on the
    same N held-out images; ``truth``: int (N,) species of each image. Returns one row per (rank,
    mode): ``diff_seed<i>``, ``mean`` (over seeds), ``sd`` (ddof 1; NaN for one seed), ``n_positive``
    (seeds with a > b), ``lo``/``hi`` (95 % species-bootstrap interval of the seed-mean difference:
    species resampled with all their images, the same draws for every cell).
    """
    from treeprobe.zeroshot import species_bootstrap_ratio

    if len(hits_a) != len(hits_b) or not hits_a:
        raise ValueError(f"need the same number (>= 1) of seeds on both sides; got {len(hits_a)} and {len(hits_b)}")
    cells, per_seed, nums = [], [], []
    for m in modes:
        for j, r in enumerate(ranks):
            d = np.stack([a[m][:, j].astype(float) - b[m][:, j].astype(float) for a, b in zip(hits_a, hits_b)])
            cells.append((r, m))
            per_seed.append(d.mean(axis=1))  # (n_seeds,) accuracy differences
            nums.append(d.mean(axis=0))  # (N,) per-image difference, averaged over seeds
    num = np.stack(nums, axis=1)
    lo, hi = species_bootstrap_ratio(truth, num, np.ones_like(num), n_boot=n_boot, seed=seed)
    rows = []
    for c, ((r, m), ds) in enumerate(zip(cells, per_seed)):
        row = {"rank": r, "mode": m, **{f"diff_seed{i}": float(v) for i, v in enumerate(ds)},
               "mean": float(ds.mean()), "sd": float(ds.std(ddof=1)) if len(ds) > 1 else np.nan,
               "n_positive": int((ds > 0).sum()), "n_seeds": len(ds), "lo": float(lo[c]), "hi": float(hi[c])}
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- models and scoring


def _embed(lm, paths: list[str]) -> np.ndarray:
    from treeprobe.training.evaluate import embed_images

    return embed_images(lm.model, paths, lm.preprocess, batch_size=EMBED_BATCH_SIZE)


def zeroshot_by_text_type(lm, emb: np.ndarray, items: pd.DataFrame, text_types, *, modes=("flat", "top_down",
                          "species_summed"), n_boot: int = 1000, seed: int = 0, logit_scale: float = 100.0,
                          k: int = 5) -> dict:
    """Zero-shot of images ``emb`` (N, D) with lineages ``items`` (N rows, kingdom..species), the
    candidates being the species in ``items``, for each class-text type. ``lm``: a
    :class:`~treeprobe.models.LoadedModel` (its text tower embeds the class texts; no cache is written).
    Returns text_type → the dict of :func:`treeprobe.image_text.zeroshot_tables` (``zeroshot`` table,
    ``mistakes``, ``result``, ...), plus ``truth`` (N,) and ``hierarchy``."""
    from treeprobe._utils import RANKS
    from treeprobe.image_text import zeroshot_tables
    from treeprobe.text_embed import taxon_text_embeddings
    from treeprobe.zeroshot import ClassHierarchy

    lin = items[list(RANKS)].reset_index(drop=True)
    hierarchy = ClassHierarchy.from_lineages(lin)  # repeated rows are one species
    truth = hierarchy.species_index(lin)
    texts = taxon_text_embeddings(lm, lin, text_types=tuple(text_types), cache_dir=False, progress=False)
    out = {}
    for tt in text_types:
        res = zeroshot_tables(emb, hierarchy, truth, text=texts[tt], modes=modes, k=k, logit_scale=logit_scale,
                              n_boot=n_boot, seed=seed)
        out[tt] = {**res, "truth": truth, "hierarchy": hierarchy}
    return out


def _untrained(seed: int):
    """The tiny network at the seeded random init a training run of ``seed`` starts from, as a LoadedModel."""
    from treeprobe.models import LoadedModel, create_model

    built = create_model("tiny", seed=seed)
    return LoadedModel(model=built.model.eval(), preprocess=built.preprocess_val, model_name=built.name,
                       digest=f"random-init-{built.name}-seed{seed}", source="random-init",
                       embed_dim=built.embed_dim)


def _train(a, csv: Path, text_type: str, seed: int) -> tuple[Path, float, float]:
    """Train (or find finished) one run; (final checkpoint, train seconds, final loss)."""
    from treeprobe.errors import TreeprobeError
    from treeprobe.training.cli import main as train_main

    run = Path(a.out) / "runs" / f"{text_type}_seed{seed}"
    final = run / "checkpoints" / f"epoch_{a.epochs}.pt"
    t0 = time.time()
    if not final.is_file():
        targs = ["--data", str(csv), "--out", str(run), "--model", "tiny", "--text-type", text_type,
                 "--seed", str(seed), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
                 "--warmup", str(a.warmup), "--threads", str(a.threads), "--no-progress", "-q",
                 "--log-every", str(LOG_EVERY), "--resume", "latest"]
        rc = train_main(targs)
        if rc != 0 or not final.is_file():
            raise TreeprobeError(f"training {text_type} seed {seed} failed (exit status {rc}); see {run}")
    train_s = time.time() - t0
    if not a.keep_checkpoints:
        for p in (run / "checkpoints").glob("*.pt"):
            if p != final:
                p.unlink()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in log if r.get("event") == "train"]
    return final, train_s, (losses[-1] if losses else np.nan)


# ----------------------------------------------------------------------------- tables


def _fmt(v, lo=None, hi=None) -> str:
    if pd.isna(v):
        return "—"
    return f"{v:.3f}" if lo is None else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def zeroshot_markdown(table: pd.DataFrame, columns: list[tuple[str, str]], *, modes=MODES_SHOWN) -> list[str]:
    """Markdown lines: one row per (rank, mode), a column per (label, key); ``table`` has columns rank,
    mode, n_taxa, chance_top1, key, top1, top1_lo, top1_hi."""
    lines = ["| rank | mode | taxa | chance | " + " | ".join(lab for lab, _ in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    ranks = list(dict.fromkeys(table["rank"]))
    for m in modes:
        for r in ranks:
            sel = table[(table["rank"] == r) & (table["mode"] == m)]
            if sel.empty:
                continue
            cells = []
            for _, key in columns:
                row = sel[sel["key"] == key]
                cells.append("—" if row.empty else _fmt(*row.iloc[0][["top1", "top1_lo", "top1_hi"]]))
            lines.append(f"| {r} | {m} | {int(sel['n_taxa'].iloc[0])} | {sel['chance_top1'].iloc[0]:.3f} | "
                         + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- parts


def run_demo(a, out: Path, timings: dict) -> list[str]:
    """Part 1 (module docstring); writes demo_zeroshot.csv / demo_mistakes.csv; markdown lines."""
    from treeprobe.models import load_model
    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    t0 = time.time()
    ckpt = Path(a.demo_ckpt)
    world = simulate_world(seed=a.world_seed)
    folder = out / "demo_heldout"
    meta = write_image_folder(world, folder, image_size=IMAGE_SIZE, seed=HELDOUT_RENDER_SEED,
                              images_per_species=a.demo_per_species)
    lm = load_model(ckpt=str(ckpt))
    emb = _embed(lm, [str(folder / p) for p in meta["path"]])
    zs = zeroshot_by_text_type(lm, emb, meta, COMPARED, n_boot=a.n_boot, seed=a.boot_seed, logit_scale=a.logit_scale)
    tab = pd.concat([zs[tt]["zeroshot"].assign(text_type=tt) for tt in COMPARED], ignore_index=True)
    mis = pd.concat([zs[tt]["mistakes"].assign(text_type=tt) for tt in COMPARED], ignore_index=True)
    tab.to_csv(out / "demo_zeroshot.csv", index=False)
    mis.to_csv(out / "demo_mistakes.csv", index=False)
    timings["demo_s"] = round(time.time() - t0, 1)
    n_sp = zs[COMPARED[0]]["hierarchy"].n_species
    lines = [f"## 1. Demo checkpoint on its synthetic world (seed {a.world_seed})", "",
             f"Checkpoint `{ckpt.name}` (trained with taxonomic captions on every species of the world). "
             f"Held-out: {len(meta)} fresh renders (render seed {HELDOUT_RENDER_SEED}) of {n_sp} species; "
             f"candidates: all {n_sp} species. Top-1 [95 % species-bootstrap interval, {a.n_boot} resamples]; "
             f"logit scale {a.logit_scale:g}. {timings['demo_s']:.0f} s.", ""]
    lines += zeroshot_markdown(tab.rename(columns={"text_type": "key"}),
                               [("taxonomic text", "taxonomic"), ("scientific text", "scientific")],
                               modes=("flat", "top_down", "species_summed"))
    lines += ["", "Mistakes of the top-1 species (heights in ranks; chance = a uniformly drawn candidate):", "",
              "| metric | taxonomic text | scientific text | chance |", "|---|---|---|---|"]
    for metric in mis["metric"].unique():
        cell = {tt: mis[(mis["metric"] == metric) & (mis["text_type"] == tt)].iloc[0] for tt in COMPARED}
        lines.append(f"| {metric} | " + " | ".join(_fmt(cell[tt]["value"], cell[tt]["lo"], cell[tt]["hi"])
                                                    for tt in COMPARED) + f" | {cell[COMPARED[0]]['chance']:.3f} |")
    return lines + [""]


def run_subset(a, out: Path, timings: dict) -> list[str]:
    """Part 2 (module docstring); writes subset_*.csv; markdown lines."""
    from treeprobe._utils import RANKS
    from treeprobe.models import load_model
    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    t0 = time.time()
    world = simulate_world(seed=a.world_seed)
    species = choose_species(world, a.n_species, seed=a.subset_seed)
    sub = subset_world(world, species)
    sub.species_lineage.assign(world_code=species).to_csv(out / "subset_species.csv", index=False)
    train = write_image_folder(sub, out / "subset_train", image_size=IMAGE_SIZE, seed=TRAIN_RENDER_SEED,
                               images_per_species=a.train_per_species)
    held = write_image_folder(sub, out / "subset_heldout", image_size=IMAGE_SIZE, seed=HELDOUT_RENDER_SEED,
                              images_per_species=a.heldout_per_species)
    held_paths = [str(out / "subset_heldout" / p) for p in held["path"]]
    timings["subset_images_s"] = round(time.time() - t0, 1)

    rows, hits, train_info = [], {}, []

    def score(label: str, seed: int, lm, own: str, extra: dict):
        t1 = time.time()
        emb = _embed(lm, held_paths)
        zs = zeroshot_by_text_type(lm, emb, held, COMPARED, modes=("flat", "top_down", "species_summed"),
                                   n_boot=a.n_boot, seed=a.boot_seed, logit_scale=a.logit_scale)
        for tt in COMPARED:
            rows.append(zs[tt]["zeroshot"].assign(model=label, seed=seed, class_text=tt, own=(tt == own), **extra))
        hits[(label, seed)] = hit_matrix(zs[own]["result"])
        return zs[own]["truth"], round(time.time() - t1, 1)

    truth = None
    for seed in a.seeds:
        truth, eval_s = score("untrained", seed, _untrained(seed), "taxonomic", {"train_s": 0.0, "final_loss": np.nan})
        train_info.append(dict(model="untrained", seed=seed, train_s=0.0, eval_s=eval_s, final_loss=np.nan))
    for tt in COMPARED:
        for seed in a.seeds:
            final, train_s, loss = _train(a, out / "subset_train" / "metadata.csv", tt, seed)
            truth, eval_s = score(tt, seed, load_model(ckpt=str(final)), tt,
                                  {"train_s": round(train_s, 1), "final_loss": loss})
            train_info.append(dict(model=tt, seed=seed, train_s=round(train_s, 1), eval_s=eval_s, final_loss=loss))
            print(f"{tt} seed {seed}: train {train_s:.0f} s, loss {loss:.3f}, eval {eval_s:.0f} s", flush=True)
    runs = pd.concat(rows, ignore_index=True)
    runs.to_csv(out / "subset_runs.csv", index=False)
    pd.DataFrame(train_info).to_csv(out / "subset_training.csv", index=False)

    ranks = tuple(RANKS)
    paired = paired_difference([hits[(COMPARED[0], s)] for s in a.seeds], [hits[(COMPARED[1], s)] for s in a.seeds],
                               truth, ranks, n_boot=a.n_boot, seed=a.boot_seed)
    paired.to_csv(out / "subset_paired.csv", index=False)
    timings["subset_s"] = round(time.time() - t0, 1)
    timings["subset_train_s"] = round(sum(r["train_s"] for r in train_info), 1)

    # --- markdown: mean over seeds of each model with its own class texts ------------------------
    own = runs[runs["own"]]
    g = own.groupby(["model", "rank", "mode"], sort=False)
    mean = g["top1"].mean().rename("top1").reset_index()
    sd = g["top1"].std(ddof=1).rename("sd").reset_index()
    first = own.drop_duplicates(["rank", "mode"])[["rank", "mode", "n_taxa", "chance_top1"]]
    mean = mean.merge(sd, on=["model", "rank", "mode"]).merge(first, on=["rank", "mode"])
    n_tr = len(train)
    steps = a.epochs * (n_tr // a.batch_size)  # the trainer drops the last partial batch
    taxa = {r: sub.species_ancestors[:, i] for i, r in enumerate(RANKS)}
    lines = [f"## 2. {a.n_species}-species subset: trained with taxonomic vs scientific captions", "",
             f"Subset of world seed {a.world_seed} (subset seed {a.subset_seed}): "
             + ", ".join(f"{len(np.unique(v))} {r}" for r, v in taxa.items()) + ". "
             f"Training: {n_tr} renders ({a.train_per_species}/species, render seed {TRAIN_RENDER_SEED}); "
             f"held-out: {len(held)} renders ({a.heldout_per_species}/species, render seed {HELDOUT_RENDER_SEED}); "
             f"candidates: the {a.n_species} species. Budget per run: tiny model from scratch, {a.epochs} epochs x "
             f"batch {a.batch_size} ({steps} steps), lr {a.lr:g}, warmup {a.warmup}, {a.threads} torch thread(s); "
             f"seeds {list(a.seeds)}. Class texts: each model's own training text type (untrained: taxonomic); "
             f"logit scale {a.logit_scale:g}. Mean ± sd over seeds of held-out top-1.", ""]
    labels = ["untrained", *COMPARED]
    lines += ["| rank | mode | taxa | chance | " + " | ".join(labels) + " | taxonomic − scientific [95 % CI] "
              "| seeds tax > sci |", "|---|---|---|---|" + "---|" * (len(labels) + 2)]
    for m in MODES_SHOWN:
        for r in ranks:
            sel = mean[(mean["rank"] == r) & (mean["mode"] == m)].set_index("model")
            p = paired[(paired["rank"] == r) & (paired["mode"] == m)].iloc[0]
            cells = [f"{sel.at[x, 'top1']:.3f} ± {0.0 if pd.isna(sel.at[x, 'sd']) else sel.at[x, 'sd']:.3f}"
                     for x in labels]
            lines.append(f"| {r} | {m} | {int(sel['n_taxa'].iloc[0])} | {sel['chance_top1'].iloc[0]:.3f} | "
                         + " | ".join(cells) + f" | {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] | "
                         f"{p['n_positive']}/{p['n_seeds']} |")
    lines += ["", "(CI: species bootstrap of the seed-mean paired difference, "
              f"{a.n_boot} resamples; it covers species sampling, not seed-to-seed variation — see the seed "
              "columns of subset_paired.csv.)", ""]
    lines += _verdict(paired)
    return lines + [""]


def _verdict(paired: pd.DataFrame) -> list[str]:
    """One line per shown mode: at the higher ranks, where taxonomic − scientific is clearly > 0 / < 0."""
    out = ["Verdict (higher ranks = " + ", ".join(HIGHER_RANKS) + "; 'clearly' = interval excludes 0 and every "
           "seed agrees in sign):", ""]
    for m in MODES_SHOWN:
        sel = paired[(paired["mode"] == m) & paired["rank"].isin(HIGHER_RANKS)]
        better = [r for r, lo, k, n in zip(sel["rank"], sel["lo"], sel["n_positive"], sel["n_seeds"]) if lo > 0 and k == n]
        worse = [r for r, hi, k in zip(sel["rank"], sel["hi"], sel["n_positive"]) if hi < 0 and k == 0]
        out.append(f"- {m}: taxonomic clearly better at {', '.join(better) or 'no rank'}; clearly worse at "
                   f"{', '.join(worse) or 'no rank'}; mean difference over these ranks {sel['mean'].mean():+.3f}.")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--world-seed", type=int, default=0, help="simulate_world seed (0: the demo's world)")
    p.add_argument("--demo-ckpt", default=str(REPO / "treeprobe" / "assets" / "demo_clip.pt"))
    p.add_argument("--demo-per-species", type=int, default=None,
                   help="part 1: held-out renders per species (default: the world's own 1-6, as the demo)")
    p.add_argument("--n-species", type=int, default=100, help="part 2: species in the subset")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--train-per-species", type=int, default=8)
    p.add_argument("--heldout-per-species", type=int, default=4)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30, help="training epochs per run (the budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads of training (and of this process)")
    p.add_argument("--n-boot", type=int, default=1000, help="species-bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--logit-scale", type=float, default=100.0, help="zero-shot logit scale (CLIP's 100)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-subset", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every epoch's checkpoint")
    return p


def main(argv=None) -> int:
    """Run the study (module docstring); exit status."""
    import torch

    a = _parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    timings: dict = {}
    lines = ["# Zero-shot by training text type (synthetic world)", ""]
    if not a.skip_demo:
        lines += run_demo(a, out, timings)
    if not a.skip_subset:
        lines += run_subset(a, out, timings)
    timings["total_s"] = round(time.time() - t0, 1)
    timings["cpu_s"] = round(time.process_time() - c0, 1)  # this process (training runs in it too)
    lines += [f"Total wall time {timings['total_s']:.0f} s, CPU time {timings['cpu_s']:.0f} s (torch threads "
              f"{a.threads or 'default'}; " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()
                                                        if k not in ("total_s", "cpu_s")) + ").", ""]
    (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
