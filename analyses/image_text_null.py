"""Null calibration and known truth of the image-text statistics (issue 13): ``text_tree.image_text_alignment``
(own-vs-sibling margin, top1_siblings), ``zeroshot.zeroshot`` (top-1 vs chance) and ``mistakes`` (LCA height
vs its exact chance), over hundreds of simulated worlds.

    nice -n 10 env OMP_NUM_THREADS=1 python analyses/image_text_null.py --replicates 300 \\
        --out /tmp/image_text_null.json           # 15.5 min CPU on one core; resumes; --report reprints
    python analyses/image_text_null.py --sweep --replicates 200   # percentile bootstrap vs tree size, 50 s

Every replicate draws a fresh tree (:func:`treeprobe.simulate.simulate_world`, 2 kingdoms, ~200 species,
1-6 images per species, 32-d, image noise 1.0) and two image worlds on it:

``brownian``          the world's own embeddings: Brownian traits on the rank tree (every rank adds a step
                      shared by its descendants), images of a species share the species' mean.
``species-clusters``  the same tree and image counts, species means iid N(0, 7 I) (as the Brownian
                      world's spread) + image noise 1.0: nothing shared above species.

On each, text embeddings of every taxon (rank → (T_r, 32)) are drawn under these conditions:

Null (text independent of the images):
``random``         iid N(0, I) per taxon.
``brownian-text``  Brownian on the taxonomy, independent of the images: a taxon's text = its parent's text +
                   N(0, I) (siblings share their parent's direction; the harder null).

Known truth (``centroid-<s>``): text of a taxon = unit centroid of its images' unit vectors + s · N(0, I/D)
(noise of norm ≈ s); ``above-genus``: kingdom..family as ``centroid-1``, genus and species = the parent's text
+ N(0, I/D) (text follows the tree all the way down, but follows the images only above genus).

Measured per world and rank: the species-bootstrap percentile interval of ``margin`` (excludes 0?) and of
``top1_siblings`` (excludes its chance?) of ``image_text_alignment`` (its default 200 resamples), and, as the
proposed fix, a **within-parent permutation test** of both (texts permuted among the children of each parent,
exact under both nulls; two-sided, ``--permutations``). Zero-shot (``zeroshot``, 1000 resamples): does the
top-1 interval exclude chance? Chance: ``flat`` 1/T_r (exact under iid text); ``top_down`` the module's 1/T_r
and the exact Π 1/(children) along the true path; ``species_summed`` the module's 1/T_r and the species share
of the true taxon (S_c / S, the chance of naming the taxon of a random species). Mistake severity
(``mistakes.mistake_summary``): predictions uniform over species, or the flat zero-shot species of the
``random`` text; does the interval of hdist@1 (mean LCA height) and of the mistake severity cover
``mistakes.chance_levels``? Rates carry exact (Clopper-Pearson) 95 % intervals; a null rate is *calibrated*
when its interval contains 0.05.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from treeprobe import mistakes  # noqa: E402
from treeprobe.simulate import RANKS, simulate_world  # noqa: E402
from treeprobe.text_tree import image_text_alignment  # noqa: E402
from treeprobe.zeroshot import ClassHierarchy, zeroshot  # noqa: E402

ALPHA = 0.05
IMAGE_WORLDS = ("brownian", "species-clusters")
NULL_TEXTS = ("random", "brownian-text")
DEFAULT_NOISES = (1.0, 2.0, 4.0, 8.0)
ZS_MODES = ("flat", "top_down", "species_summed")
SAVE_EVERY_S = 5.0
#: world parameters (recorded in the results file; a resumed run must match them)
WORLD_PARAMS = dict(n_kingdoms=2, dim=32, trait_dim=16, noise=1.0, images_per_species=(1, 6), cluster_sd=7 ** 0.5,
                    branching=None)  # None: simulate's DEFAULT_BRANCHING


def truth_texts(noises=DEFAULT_NOISES) -> tuple[str, ...]:
    """Names of the known-truth text conditions."""
    return tuple(f"centroid-{float(s):g}" for s in noises) + ("above-genus",)


def _seed(*keys) -> int:
    """32-bit seed from ints and strings (strings by CRC32: independent of run order)."""
    ints = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


# ============================================================================================
# Worlds and texts
# ============================================================================================

@dataclass
class World:
    """Images on a taxonomy, in the codes of ``hierarchy``: X float32 (N, D); truth int64 (N,) species index;
    codes rank → int64 (N,); parents rank → int64 (T_r,)."""

    X: np.ndarray
    truth: np.ndarray
    codes: dict
    hierarchy: ClassHierarchy
    parents: dict


def make_world(kind: str, seed: int, **params) -> World:
    """One image world (module docstring) on the tree of ``simulate_world(seed)``."""
    p = {**WORLD_PARAMS, **params}
    w = simulate_world(seed=int(seed), n_kingdoms=p["n_kingdoms"], dim=p["dim"], trait_dim=p["trait_dim"],
                       noise=p["noise"], images_per_species=tuple(p["images_per_species"]), branching=p["branching"])
    if kind == "brownian":
        X = w.embeddings
    elif kind == "species-clusters":
        rng = np.random.default_rng(_seed(seed, "species-clusters"))
        means = p["cluster_sd"] * rng.standard_normal((w.n_species, p["dim"]))
        X = (means[w.item_species] + p["noise"] * rng.standard_normal((w.n_items, p["dim"]))).astype(np.float32)
    else:
        raise ValueError(f"unknown image world {kind!r}; known: {', '.join(IMAGE_WORLDS)}")
    h = ClassHierarchy.from_lineages(w.species_lineage, ranks=RANKS)
    hs = h.species_index(w.species_lineage)
    truth = hs[w.item_species]
    A = h.species_ancestors[truth]
    return World(X=X, truth=truth, codes={r: A[:, j] for j, r in enumerate(RANKS)}, hierarchy=h,
                 parents={r: h.parent[r] for r in RANKS})


def taxon_centroids(X, codes: np.ndarray, n_taxa: int) -> np.ndarray:
    """float64 (n_taxa, D): unit-norm mean of the unit-norm rows of X (N, D) in each taxon code (0..n_taxa−1)."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = np.zeros((n_taxa, X.shape[1]))
    np.add.at(C, codes, U)
    return C / np.linalg.norm(C, axis=1, keepdims=True)


def make_texts(world: World, condition: str, rng: np.random.Generator) -> dict:
    """rank → float64 (T_r, D) text embeddings of ``condition`` (module docstring)."""
    h, D = world.hierarchy, world.X.shape[1]
    out = {}
    if condition == "random":
        return {r: rng.standard_normal((h.n_taxa(r), D)) for r in RANKS}
    if condition == "brownian-text":
        prev = np.zeros((1, D))
        for r in RANKS:
            par = np.maximum(world.parents[r], 0)
            prev = prev[par] + rng.standard_normal((len(par), D))
            out[r] = prev
        return out
    if condition.startswith("centroid-") or condition == "above-genus":
        s = 1.0 if condition == "above-genus" else float(condition.split("-", 1)[1])
        for r in RANKS:
            if condition == "above-genus" and RANKS.index(r) >= RANKS.index("genus"):
                parent_text = out[RANKS[RANKS.index(r) - 1]][world.parents[r]]
                out[r] = parent_text + rng.standard_normal(parent_text.shape) / np.sqrt(D)
            else:
                C = taxon_centroids(world.X, world.codes[r], h.n_taxa(r))
                out[r] = C + s * rng.standard_normal(C.shape) / np.sqrt(D)
        return out
    raise ValueError(f"unknown text condition {condition!r}")


# ============================================================================================
# The proposed test: texts permuted among the children of each parent
# ============================================================================================

from treeprobe.text_tree import within_parent_permutations  # noqa: E402  (the package's own sampler)


def log_permutations(parents: np.ndarray) -> float:
    """log of the number of within-parent permutations, Σ log(n_children!): a two-sided p ≤ 0.05 needs
    more than 40 of them (the margin of two children only flips sign under their swap)."""
    from math import lgamma

    counts = np.bincount(np.asarray(parents) + 1)
    return float(sum(lgamma(c + 1) for c in counts))


def permutation_p(M: np.ndarray, parents: np.ndarray, perms: np.ndarray) -> float:
    """Two-sided p of stat(π) = Σ_c M[c, π(c)] at the identity, π over ``perms`` (n, T) within-parent
    permutations, centred at its exact permutation mean Σ_c mean_{j sibling or c} M[c, j]:
    (1 + #{|stat(π) − centre| ≥ |stat(id) − centre|}) / (n + 1)."""
    T = len(parents)
    same = parents[:, None] == parents[None, :]
    centre = float((np.where(same, M, 0.0).sum(axis=1) / same.sum(axis=1)).sum())
    obs = float(np.trace(M)) - centre
    stats = M[np.arange(T)[None, :], perms].sum(axis=1) - centre
    tol = 1e-9 * max(abs(obs), 1e-12)
    return float((1 + np.count_nonzero(np.abs(stats) >= abs(obs) - tol)) / (len(perms) + 1))


def alignment_matrices(X, codes: np.ndarray, T: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, W), each float64 (T_r, T_r), such that for a within-parent permutation π of the texts
    margin(π) = Σ_c A[c, π(c)] − (a constant) and top1_siblings(π) = Σ_c W[c, π(c)] (the scoring of
    ``image_text_alignment``: images whose taxon has siblings). A[c, j] = Σ_{i in c} (1 + 1/n_sib)·cos(x_i, t_j)
    / n; W[c, j] = share of images of c whose best text among c's parent's children is t_j."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    n_T = len(T)
    n_sib = np.bincount(parents + 1, minlength=n_T + 1)[parents + 1] - 1
    idx = np.flatnonzero((codes >= 0) & (n_sib[np.maximum(codes, 0)] > 0))
    A, W = np.zeros((n_T, n_T)), np.zeros((n_T, n_T))
    if len(idx) == 0:
        return A, W
    c = codes[idx]
    S = Xn[idx] @ Tn.T
    w = (1.0 + 1.0 / n_sib[c]) / len(idx)
    np.add.at(A, c, w[:, None] * S)
    fam = parents[None, :] == parents[c][:, None]
    best = np.where(fam, S, -np.inf).argmax(axis=1)
    np.add.at(W, (c, best), 1.0 / len(idx))
    return A, W


def prediction_matrix(true_codes: np.ndarray, pred_codes: np.ndarray, n_taxa: int) -> np.ndarray:
    """float64 (T, T): share of images of true taxon c predicted j (flat zero-shot: top1(π) = Σ_c M[c, π(c)])."""
    M = np.zeros((n_taxa, n_taxa))
    ok = (true_codes >= 0) & (pred_codes >= 0)
    np.add.at(M, (true_codes[ok], pred_codes[ok]), 1.0 / max(int((true_codes >= 0).sum()), 1))
    return M


# ============================================================================================
# Chances
# ============================================================================================

def exact_chances(world: World) -> dict:
    """rank → (top_down chance, species-share chance), each the mean over images: Π_{j ≤ r} 1/(children of the
    true taxon's parent at rank j) (uniform choice at every step of the descent) and S_c / S (the share of the
    candidate species in the true taxon c)."""
    h = world.hierarchy
    S = h.n_species
    out, path = {}, np.ones(len(world.truth))
    for r in RANKS:
        par = world.parents[r]
        n_children = np.bincount(par + 1, minlength=h.n_taxa(r) + 1)[par + 1]
        c = world.codes[r]
        path = path / n_children[c]
        share = h.species_per_taxon(r)[c] / S
        out[r] = (float(path.mean()), float(share.mean()))
    return out


def rank_sizes(world: World) -> dict:
    """rank → [taxa, sibling sets (parents with ≥ 2 children), taxa with siblings, species with siblings]."""
    h = world.hierarchy
    out = {}
    for j, r in enumerate(RANKS):
        par = world.parents[r]
        n_children = np.bincount(par + 1, minlength=h.n_taxa(r) + 1)[par + 1]
        with_sib = n_children >= 2
        sp = h.species_ancestors[:, j]
        out[r] = [h.n_taxa(r), int(len(np.unique(par[with_sib]))), int(with_sib.sum()),
                  int(with_sib[sp].sum())]
    return out


# ============================================================================================
# One replicate
# ============================================================================================

def run_condition(world: World, texts: dict, *, bootstrap: int, n_boot: int, permutations: int, seed: int,
                  chances: dict) -> dict:
    """{"align": {rank: [margin, lo, hi, top1_sib, lo, hi, chance, n_items, p_margin, p_top1]},
        "zs": {"mode/rank": [top1, lo, hi, chance_module, chance_exact, p_perm (flat) or NaN]}, "pred": species}."""
    df = image_text_alignment(world.X, world.codes, texts, parents=world.parents, species=world.truth,
                              bootstrap=bootstrap, seed=_seed(seed, "boot"))
    prng = np.random.default_rng(_seed(seed, "perm"))
    res = zeroshot(world.X, {r: texts[r].astype(np.float32) for r in RANKS}, world.hierarchy, truth=world.truth,
                   n_boot=n_boot, seed=_seed(seed, "zs"))
    align, zs = {}, {}
    for j, (r, row) in enumerate(zip(RANKS, df.itertuples())):
        perms = within_parent_permutations(world.parents[r], permutations, prng)
        A, W = alignment_matrices(world.X, world.codes[r], texts[r], world.parents[r])
        align[r] = [row.margin, row.margin_lo, row.margin_hi, row.top1_siblings, row.top1_siblings_lo,
                    row.top1_siblings_hi, row.chance, row.n_items, permutation_p(A, world.parents[r], perms),
                    permutation_p(W, world.parents[r], perms)]
        Mz = prediction_matrix(world.codes[r], res.predictions["flat"][:, j], world.hierarchy.n_taxa(r))
        zs[f"flat/{r}"] = [None, None, None, None, 1.0 / world.hierarchy.n_taxa(r),
                           permutation_p(Mz, world.parents[r], perms)]
    for row in res.table.itertuples():
        exact = {"flat": 1.0 / row.n_taxa, "top_down": chances[row.rank][0],
                 "species_summed": chances[row.rank][1]}[row.mode]
        key = f"{row.mode}/{row.rank}"
        p = zs[key][5] if key in zs else float("nan")
        zs[key] = [row.top1, row.top1_lo, row.top1_hi, row.chance_top1, exact, p]
    return dict(align=align, zs=zs, pred=res.predictions["flat"][:, -1])


def run_replicate(rep: int, *, seed: int, image_worlds, texts, bootstrap: int, n_boot: int,
                  permutations: int, truth_worlds=("brownian",)) -> dict:
    """Every image world × text condition of replicate ``rep`` (known-truth texts only on ``truth_worlds``);
    a JSON-ready record."""
    t0 = time.perf_counter()
    w_seed = _seed(seed, rep, "world")
    rec = dict(replicate=rep, world_seed=w_seed, cells={}, mistakes={})
    for kind in image_worlds:
        world = make_world(kind, w_seed)
        chances = exact_chances(world)
        rec.setdefault("sizes", rank_sizes(world))
        rec["N"], rec["S"] = int(len(world.truth)), int(world.hierarchy.n_species)
        preds = {}
        for cond in [t for t in texts if t in NULL_TEXTS or kind in truth_worlds]:
            cseed = _seed(seed, rep, kind, cond)
            T = make_texts(world, cond, np.random.default_rng(cseed))
            out = run_condition(world, T, bootstrap=bootstrap, n_boot=n_boot, permutations=permutations, seed=cseed,
                                chances=chances)
            preds[cond] = out.pop("pred")
            rec["cells"][f"{kind}/{cond}"] = out
        mrng = np.random.default_rng(_seed(seed, rep, kind, "uniform-predictions"))
        pred_sets = {"uniform": mrng.integers(0, world.hierarchy.n_species, size=len(world.truth))}
        if "random" in preds:
            pred_sets["zeroshot-random-text"] = preds["random"]
        for name, pred in pred_sets.items():
            summ = mistakes.mistake_summary(world.truth, pred, world.hierarchy, n_boot=n_boot,
                                            seed=_seed(seed, rep, kind, name))["summary"].set_index("metric")
            rec["mistakes"][f"{kind}/{name}"] = {m: [float(summ.loc[m, c]) for c in ("value", "lo", "hi", "chance")]
                                                 for m in ("hdist@1", "mistake_severity", "accuracy")}
    rec["seconds"] = time.perf_counter() - t0
    return rec


# ============================================================================================
# Running (resumable) and summarising
# ============================================================================================

def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, separators=(",", ":"), default=_json_default)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def run(*, replicates: int, seed: int = 0, image_worlds=IMAGE_WORLDS, truth_worlds=("brownian",), texts=None,
        noises=DEFAULT_NOISES, bootstrap: int = 200, n_boot: int = 1000, permutations: int = 999,
        out: str | Path | None = None,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Run replicates 0..replicates−1 (those not already in ``out``, when its config matches) and return
    ``{"config", "meta", "elapsed_s", "records"}``; ``out`` is rewritten every few seconds (atomically)."""
    texts = tuple(texts) if texts is not None else NULL_TEXTS + truth_texts(noises)
    config = dict(seed=int(seed), image_worlds=list(image_worlds), truth_worlds=list(truth_worlds),
                  texts=list(texts), bootstrap=int(bootstrap),
                  n_boot=int(n_boot), permutations=int(permutations), world_params=WORLD_PARAMS)
    config = json.loads(json.dumps(config, default=_json_default))
    path = Path(out) if out is not None else None
    records, started = [], time.time()
    if path is not None and path.exists() and not overwrite:
        old = json.loads(path.read_text())
        if old.get("config") != config:
            raise SystemExit(f"{path} holds a run with other settings ({old.get('config')}); pass --overwrite "
                             "or another --out")
        records = old.get("records", [])
        started -= float(old.get("elapsed_s", 0.0))
    done = {r["replicate"] for r in records}
    meta = dict(machine=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
                python=platform.python_version(), command=" ".join(sys.argv))

    def snapshot():
        return dict(config=config, meta=meta, elapsed_s=time.time() - started, records=records)

    last = time.time()
    todo = [r for r in range(replicates) if r not in done]
    try:
        for k, rep in enumerate(todo):
            records.append(run_replicate(rep, seed=seed, image_worlds=image_worlds, texts=texts, bootstrap=bootstrap,
                                         n_boot=n_boot, permutations=permutations, truth_worlds=truth_worlds))
            if progress and (k + 1) % 10 == 0:
                print(f"# {k + 1}/{len(todo)} replicates, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            if path is not None and time.time() - last > SAVE_EVERY_S:
                _write_json(path, snapshot())
                last = time.time()
    finally:
        if path is not None:
            _write_json(path, snapshot())
    return snapshot()


def binomial_ci(k: int, n: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 95 % interval of k/n."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def verdict(k: int, n: int, alpha: float = ALPHA) -> str:
    """calibrated / conservative / anti-conservative (interval vs alpha)."""
    lo, hi = binomial_ci(k, n)
    return "calibrated" if lo <= alpha <= hi else ("conservative" if hi < alpha else "anti-conservative")


def cell(k: int, n: int, null: bool = True) -> str:
    """'k/n = rate [lo, hi]' (** around an anti-conservative null cell, (cons.) after a conservative one)."""
    if n == 0:
        return "–"
    lo, hi = binomial_ci(k, n)
    s = f"{k}/{n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"
    if null:
        v = verdict(k, n)
        s = f"**{s}**" if v == "anti-conservative" else (s + " (cons.)" if v == "conservative" else s)
    return s


def _excludes(lo, hi, value) -> bool:
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > value or hi < value))


def align_counts(records, key: str, rank: str) -> dict:
    """Counts over records of one cell and rank: n, margin interval excludes 0 (and lo > 0, hi < 0), top1
    interval excludes chance, permutation p ≤ α for each; means of margin, top1 − chance."""
    rows = [r["cells"][key]["align"][rank] for r in records if key in r["cells"]]
    rows = [x for x in rows if x[7] and np.isfinite(x[1])]
    out = dict(n=len(rows))
    out["m_excl"] = sum(_excludes(x[1], x[2], 0.0) for x in rows)
    out["m_pos"] = sum(x[1] > 0 for x in rows)
    out["m_neg"] = sum(x[2] < 0 for x in rows)
    out["t_excl"] = sum(_excludes(x[4], x[5], x[6]) for x in rows)
    out["m_perm"] = sum(x[8] <= ALPHA for x in rows)
    out["t_perm"] = sum(x[9] <= ALPHA for x in rows)
    out["margin"] = float(np.mean([x[0] for x in rows])) if rows else np.nan
    out["margin_sd"] = float(np.std([x[0] for x in rows], ddof=1)) if len(rows) > 1 else np.nan
    out["boot_se"] = float(np.mean([(x[2] - x[1]) / 3.92 for x in rows])) if rows else np.nan
    out["top1_minus_chance"] = float(np.mean([x[3] - x[6] for x in rows])) if rows else np.nan
    return out


def mean_sizes(records, rank: str) -> list[float]:
    return list(np.mean([r["sizes"][rank] for r in records], axis=0))


def report(obj: dict) -> str:
    """Markdown tables of a results object (module docstring)."""
    cfg, recs = obj["config"], obj["records"]
    lines = []
    n = len(recs)
    lines.append(f"{n} replicates, seed {cfg['seed']}, alignment bootstrap {cfg['bootstrap']}, zero-shot / mistakes "
                 f"bootstrap {cfg['n_boot']}, {cfg['permutations']} within-parent permutations; "
                 f"mean {np.mean([r['S'] for r in recs]):.0f} species, {np.mean([r['N'] for r in recs]):.0f} images; "
                 f"{obj.get('elapsed_s', 0):.0f} s.\n")
    lines.append("Sizes per rank (means over worlds): taxa / sibling sets (parents with ≥ 2 children) / taxa with "
                 "siblings / species with siblings\n")
    lines.append("| rank | " + " | ".join(RANKS) + " |")
    lines.append("|---|" + "---|" * len(RANKS))
    lines.append("| sizes | " + " | ".join("{:.0f} / {:.1f} / {:.1f} / {:.0f}".format(*mean_sizes(recs, r))
                                           for r in RANKS) + " |\n")
    texts = cfg["texts"]
    for kind in cfg["image_worlds"]:
        for cond in [t for t in texts if t in NULL_TEXTS]:
            key = f"{kind}/{cond}"
            lines.append(f"**Null `{kind}` images, `{cond}` text**: rejection rate at α = 0.05 (interval excludes "
                         "the null value / permutation p ≤ 0.05)\n")
            lines.append("| rank | margin: bootstrap interval excludes 0 | (lo > 0 / hi < 0) | sd of margin over "
                         "worlds / mean bootstrap se | top1_siblings: interval excludes chance | margin: within-parent "
                         "permutation | top1_siblings: permutation |")
            lines.append("|---|---|---|---|---|---|---|")
            for r in RANKS:
                c = align_counts(recs, key, r)
                lines.append(f"| {r} | {cell(c['m_excl'], c['n'])} | {c['m_pos']} / {c['m_neg']} | "
                             f"{c['margin_sd']:.4f} / {c['boot_se']:.4f} | {cell(c['t_excl'], c['n'])} | "
                             f"{cell(c['m_perm'], c['n'])} | {cell(c['t_perm'], c['n'])} |")
            lines.append("")
    # rate of the bootstrap interval by the number of sibling sets (pooled over ranks and null texts)
    lines.append("**Margin interval excludes 0, by sibling sets at the rank** (pooled over ranks and null texts)\n")
    bins = [(1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 40), (41, 10 ** 9)]
    head = "| image world | " + " | ".join(f"{a}" if a == b else (f"{a}–{b}" if b < 10 ** 9 else f">{a - 1}")
                                          for a, b in bins) + " |"
    lines.append(head)
    lines.append("|---|" + "---|" * len(bins))
    for kind in cfg["image_worlds"]:
        cells = []
        for a, b in bins:
            k = m = 0
            for rec in recs:
                for cond in [t for t in texts if t in NULL_TEXTS]:
                    for r in RANKS:
                        x = rec["cells"][f"{kind}/{cond}"]["align"][r]
                        if a <= rec["sizes"][r][1] <= b and x[7] and np.isfinite(x[1]):
                            m += 1
                            k += _excludes(x[1], x[2], 0.0)
            cells.append(f"{k / m:.3f} (n={m})" if m else "–")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    # zero-shot null
    for kind in cfg["image_worlds"]:
        key = f"{kind}/random"
        if not any(key in r["cells"] for r in recs):
            continue
        lines.append(f"**Zero-shot null, `{kind}` images, `random` text**: top-1 interval excludes chance "
                     "(mean top-1 − chance)\n")
        lines.append("| rank | flat vs 1/T | flat: permutation | top_down vs 1/T (module) | top_down vs Π 1/children "
                     "| species_summed vs 1/T (module) | species_summed vs S_c/S |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in RANKS:
            row = []
            for mode, which in (("flat", 4), ("flat", "p"), ("top_down", 3), ("top_down", 4), ("species_summed", 3),
                                ("species_summed", 4)):
                xs = [rec["cells"][key]["zs"][f"{mode}/{r}"] for rec in recs]
                if which == "p":
                    row.append(cell(sum(x[5] <= ALPHA for x in xs), len(xs)))
                    continue
                k = sum(_excludes(x[1], x[2], x[which]) for x in xs)
                d = np.mean([x[0] - x[which] for x in xs])
                row.append(f"{cell(k, len(xs))} ({d:+.3f})")
            lines.append(f"| {r} | " + " | ".join(row) + " |")
        lines.append("")
    # mistakes null
    lines.append("**Mistake severity under the null**: interval excludes the exact chance (mistakes.chance_levels); "
                 "mean value − chance\n")
    lines.append("| image world / predictions | hdist@1 (mean LCA height) | mistake severity | accuracy |")
    lines.append("|---|---|---|---|")
    keys = sorted({k for r in recs for k in r["mistakes"]})
    for key in keys:
        row = []
        for m in ("hdist@1", "mistake_severity", "accuracy"):
            xs = [r["mistakes"][key][m] for r in recs if key in r["mistakes"]]
            k = sum(_excludes(x[1], x[2], x[3]) for x in xs)
            row.append(f"{cell(k, len(xs))} ({np.mean([x[0] - x[3] for x in xs]):+.4f})")
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines.append("")
    # known truth
    truth = [t for t in texts if t not in NULL_TEXTS]
    for kind in cfg.get("truth_worlds", cfg["image_worlds"]):
        if not truth or kind not in cfg["image_worlds"]:
            continue
        lines.append(f"**Known truth, `{kind}` images**: mean margin; share of worlds with margin_lo > 0 "
                     "(bootstrap) and with permutation p ≤ 0.05; mean top-1 (flat / species_summed)\n")
        lines.append("| text | " + " | ".join(RANKS) + " |")
        lines.append("|---|" + "---|" * len(RANKS))
        for cond in truth:
            key = f"{kind}/{cond}"
            cells = []
            for r in RANKS:
                c = align_counts(recs, key, r)
                zs = [rec["cells"][key]["zs"] for rec in recs]
                f1 = np.mean([z[f"flat/{r}"][0] for z in zs])
                s1 = np.mean([z[f"species_summed/{r}"][0] for z in zs])
                cells.append(f"{c['margin']:+.3f}; {c['m_pos'] / c['n']:.2f} / {c['m_perm'] / c['n']:.2f}; "
                             f"{f1:.2f} / {s1:.2f}")
            lines.append(f"| {cond} | " + " | ".join(cells) + " |")
        lines.append("")
        key = f"{kind}/above-genus"
        if "above-genus" in truth:
            lines.append(f"`above-genus` ({kind}): margin interval excludes 0 / permutation p ≤ 0.05, per rank: "
                         + "; ".join(f"{r} {cell(align_counts(recs, key, r)['m_excl'], len(recs), null=False)} / "
                                     f"{align_counts(recs, key, r)['m_perm'] / len(recs):.3f}" for r in RANKS) + "\n")
    return "\n".join(lines)


#: Trees of the size sweep (2 kingdoms; children per node, phylum..species): ~10, ~30 and ~100 species.
SWEEP_TREES = {"tiny": ((1, 1), (1, 1), (1, 1), (1, 2), (1, 2), (2, 3)),
               "small": ((1, 2), (1, 1), (1, 1), (1, 2), (2, 3), (2, 3)),
               "medium": ((1, 2), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3))}
SWEEP_BINS = ((2, 5), (6, 10), (11, 20), (21, 40), (41, 80), (81, 10 ** 9))


def size_sweep(*, replicates: int, seed: int = 0, bootstrap: int = 200, kind: str = "species-clusters") -> str:
    """The percentile species bootstrap where it is valid (``species-clusters`` images, ``random`` text) on
    trees of ~10-100 species: rate at which the margin / top1_siblings interval excludes its null value,
    binned by the number of resampled species with siblings at the rank (all ranks pooled). Markdown."""
    counts = {b: [0, 0, 0] for b in SWEEP_BINS}  # worlds×ranks, margin excludes 0, top1 excludes chance
    for name, branching in SWEEP_TREES.items():
        for rep in range(replicates):
            w_seed = _seed(seed, rep, "sweep", name)
            w = make_world(kind, w_seed, branching=branching)
            T = make_texts(w, "random", np.random.default_rng(_seed(w_seed, "text")))
            df = image_text_alignment(w.X, w.codes, T, parents=w.parents, species=w.truth, bootstrap=bootstrap,
                                      seed=_seed(w_seed, "boot"))
            sizes = rank_sizes(w)
            for row in df.itertuples():
                n_sp = sizes[row.rank][3]
                b = next((b for b in SWEEP_BINS if b[0] <= n_sp <= b[1]), None)
                if b is None or not row.n_items:
                    continue
                counts[b][0] += 1
                counts[b][1] += _excludes(row.margin_lo, row.margin_hi, 0.0)
                counts[b][2] += _excludes(row.top1_siblings_lo, row.top1_siblings_hi, row.chance)
    lines = [f"**Size sweep, `{kind}` images, `random` text** ({replicates} worlds per tree size: "
             f"{', '.join(SWEEP_TREES)}; bootstrap {bootstrap}): interval excludes the null value, by species with "
             "siblings at the rank\n", "| species resampled | world × rank cells | margin | top1_siblings |",
             "|---|---|---|---|"]
    for (a, b), (n, m, t) in counts.items():
        label = f"{a}–{b}" if b < 10 ** 9 else f">{a - 1}"
        lines.append(f"| {label} | {n} | {cell(m, n)} | {cell(t, n)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=300, help="worlds (trees) drawn; each carries every condition")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=200, help="species resamples of image_text_alignment")
    ap.add_argument("--n-boot", type=int, default=1000, help="species resamples of zeroshot / mistake_summary")
    ap.add_argument("--permutations", type=int, default=999, help="within-parent text permutations")
    ap.add_argument("--noises", default=",".join(f"{s:g}" for s in DEFAULT_NOISES),
                    help="text noise levels of the centroid-<s> truth worlds")
    ap.add_argument("--image-worlds", default=",".join(IMAGE_WORLDS))
    ap.add_argument("--truth-worlds", default="brownian", help="image worlds that also get the known-truth texts")
    ap.add_argument("--texts", default=None, help="comma-separated text conditions (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (written as it goes; resumed)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--report", action="store_true", help="only print the tables of --out")
    ap.add_argument("--sweep", action="store_true", help="only run the size sweep of the percentile bootstrap "
                    "(--replicates worlds per tree size; printed, not saved)")
    args = ap.parse_args(argv)
    if args.report:
        if args.out is None or not args.out.exists():
            raise SystemExit("--report needs an existing --out file")
        print(report(json.loads(args.out.read_text())))
        return 0
    if args.sweep:
        t0 = time.time()
        print(size_sweep(replicates=args.replicates, seed=args.seed, bootstrap=args.bootstrap))
        print(f"\nwall time {time.time() - t0:.0f} s")
        return 0
    noises = tuple(float(s) for s in args.noises.split(",") if s)
    texts = args.texts.split(",") if args.texts else None
    obj = run(replicates=args.replicates, seed=args.seed, image_worlds=tuple(args.image_worlds.split(",")),
              truth_worlds=tuple(w for w in args.truth_worlds.split(",") if w), texts=texts, noises=noises,
              bootstrap=args.bootstrap, n_boot=args.n_boot,
              permutations=args.permutations, out=args.out, overwrite=args.overwrite)
    print(report(obj))
    print(f"\nwall time {obj['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
