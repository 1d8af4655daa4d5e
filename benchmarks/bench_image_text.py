"""Image–text benchmark (issue 13): taxon text embeddings and zero-shot over 100K images, each against
its bare compute.

    .venv/bin/python benchmarks/bench_image_text.py                 # both parts, full size, 3 repeats
    .venv/bin/python benchmarks/bench_image_text.py --part text     # text part only
    .venv/bin/python benchmarks/bench_image_text.py --quick         # small sizes, 1 repeat (smoke check)

**Text part** (target: the whole call within 2x the bare model forward). Lineages: the iNat2021
species table (``--lineages``, default ``/work/shared/data/inat2021_taxonomy/metadata.csv``; kingdom..species
+ ``common_name``), all 10,000 species or a seeded sample of ``--n-species``. Model: the bundled demo
checkpoint ``treeprobe/assets/demo_clip.pt`` (treeprobe-tiny, 64-d). Timed, interleaved, order rotating
per repetition:

* ``bare``: ``tokenizer(batch)`` + ``model.model.encode_text(tokens)`` under ``torch.no_grad()`` over exactly
  the unique texts the call embeds, in the same order and batches of the same size (``--batch-size``, 256 =
  ``DEFAULT_BATCH_SIZE``); the tokenizer is ``text_tokenizer(model)`` (built before any timing);
* ``call, no cache``: ``taxon_text_embeddings(model, lineages, text_types=("taxonomic", "scientific",
  "common"), ranks=RANKS, cache_dir=False, progress=False)``: captions, dedup, tokenize, forward,
  normalise, regroup;
* ``call, cold cache``: the same with ``cache_dir`` a new empty temp folder (forward + shard write);
* ``call, warm cache``: the same again on that folder (no forward pass).

**Zero-shot part** (target: ``zeroshot`` at all ranks within 2x one blocked matrix-product pass).
Hierarchy: ``ClassHierarchy.from_lineages`` of the same species (7 ranks). Synthetic float32 data, seeded:
species text vectors random unit (S, D); the text vector of a higher-rank taxon is the renormalised mean of
its species' vectors; ``--n-images`` images with uniform random true species, image = unit(text of its
species + noise of norm ``--noise``) (so accuracies are neither 0 nor 1). Timed, interleaved:

* ``ref species``: for each block of ``DEFAULT_BLOCK_ELEMENTS // S`` images (419 at S = 10,000: the largest
  16 MiB block of species logits), ``X[block] @ T_species.T`` (float32, a new (b, S) array per block);
  nothing else. This is the reference of the target (``zeroshot`` picks its own blocks: 16 MiB of the
  stacked logits of every rank it needs, 256 images when all 7 ranks are needed);
* ``ref species + argmax``: the same + ``argmax(axis=1)`` of each block;
* ``ref all ranks``: the products with all 7 ranks' text matrices (what flat / top-down need at least);
* ``zeroshot`` with ``modes=(m,)`` for each mode and with all three, ``k=5``, ``n_boot=--n-boot`` (1 by
  default, the smallest allowed: one bootstrap replicate costs ~nothing), default block size; one untimed
  call on 2,000 images first compiles its numba kernels;
* the bootstrap alone: ``species_bootstrap_ratio`` on the (N, 42) 0/1 hit columns of an all-modes run,
  ``n_boot=1000`` (``zeroshot``'s default) minus ``n_boot=1``: what ``n_boot=1000`` adds to a call;
* ``mistake_summary(truth, species_summed species prediction, h, topk=species_topk, k=5)`` with
  ``n_boot=1`` and ``n_boot=1000``.

Threads: ``--threads`` (default 1) limits BLAS / OpenMP (threadpoolctl), numba and torch. Prints each repetition,
the medians, and ``RATIO ...`` lines (median of the per-repetition ratios; target <= 2). ``--json-out``
writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_LINEAGES = "/work/shared/data/inat2021_taxonomy/metadata.csv"
DEMO_CKPT = REPO / "treeprobe" / "assets" / "demo_clip.pt"
TEXT_TYPES = ("taxonomic", "scientific", "common")
BOOT_FULL = 1000


def cpu_model() -> str:
    """'Model name' of lscpu (else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def read_lineages(path: str, n_species: int | None, seed: int):
    """Species table (rows sorted as in the file): rank columns + common_name; a seeded sample of n_species."""
    import numpy as np
    import pandas as pd

    from treeprobe._utils import RANKS

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = [*RANKS, "common_name"] if "common_name" in df.columns else list(RANKS)
    df = df[cols]
    if n_species is not None and n_species < len(df):
        keep = np.sort(np.random.default_rng(seed).choice(len(df), n_species, replace=False))
        df = df.iloc[keep]
    return df.reset_index(drop=True)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _run_interleaved(cases: dict, repeats: int, label: str) -> dict:
    """name → list of seconds; the case order rotates from one repetition to the next."""
    names = list(cases)
    times = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            dt, _ = _timed(cases[n])
            times[n].append(dt)
            print(f"  [{label} rep {rep + 1}/{repeats}] {n:<28s} {dt:9.3f} s", flush=True)
    return times


def _ratio_lines(times: dict, ref: str, targets: list, tag: str) -> dict:
    out = {}
    for name in targets:
        per = [a / b for a, b in zip(times[name], times[ref])]
        med = statistics.median(per)
        out[name] = dict(median_of_ratios=med, ratio_of_medians=statistics.median(times[name]) /
                         statistics.median(times[ref]), per_repeat=per)
        verdict = "met" if med <= 2.0 else "NOT met"
        print(f"RATIO {tag}: {name} / {ref} = {med:.3f} (median of {len(per)} per-repetition ratios; "
              f"ratio of medians {out[name]['ratio_of_medians']:.3f}); target <= 2: {verdict}", flush=True)
    return out


# ----------------------------------------------------------------------------- text part


def text_part(args, lineages) -> dict:
    import torch

    from treeprobe._utils import RANKS
    from treeprobe.models import load_model
    from treeprobe.text_embed import taxon_text_embeddings, taxon_texts, text_tokenizer

    model = load_model(str(args.ckpt))
    net = model.model
    tok = text_tokenizer(model)
    all_texts, per_type = [], {}
    for tt in TEXT_TYPES:
        n0 = len(all_texts)
        for frame in taxon_texts(lineages, tt, RANKS).values():
            all_texts += frame["text"][frame["text"] != ""].tolist()
        per_type[tt] = len(all_texts) - n0
    unique = list(dict.fromkeys(all_texts))
    bs = args.batch_size
    n_batches = -(-len(unique) // bs)
    print(f"text part: {len(lineages)} species, model {model.model_name} ({Path(model.source).name}, "
          f"{model.embed_dim}-d, context {tok.context_length if hasattr(tok, 'context_length') else '?'}); "
          f"texts {len(all_texts)} ({', '.join(f'{k} {v}' for k, v in per_type.items())}), "
          f"unique {len(unique)}; batch {bs} -> {n_batches} forward batches", flush=True)

    def bare():
        with torch.no_grad():
            for a in range(0, len(unique), bs):
                net.encode_text(tok(unique[a:a + bs]))

    def call(cache_dir):
        return taxon_text_embeddings(model, lineages, text_types=TEXT_TYPES, ranks=RANKS, batch_size=bs,
                                     cache_dir=cache_dir, progress=False)

    tmp = tempfile.TemporaryDirectory(prefix="bench_image_text_")
    state = {"folder": None, "i": 0}

    def cold():
        state["i"] += 1
        state["folder"] = os.path.join(tmp.name, f"c{state['i']}")
        call(state["folder"])

    def warm():  # runs right after a cold call, on its folder
        call(state["folder"])

    with torch.no_grad():  # warm-up: first-call costs of the forward (allocations), untimed
        net.encode_text(tok(unique[:bs]))
    cases = {"bare forward": bare, "call, no cache": lambda: call(False), "call, cold cache": cold}
    times = {n: [] for n in [*cases, "call, warm cache"]}
    for rep in range(args.repeats):  # the order of the first three rotates; warm always follows cold
        names = list(cases)
        for n in names[rep % 3:] + names[:rep % 3]:
            for name, fn in [(n, cases[n])] + ([("call, warm cache", warm)] if n == "call, cold cache" else []):
                dt, _ = _timed(fn)
                times[name].append(dt)
                print(f"  [text rep {rep + 1}/{args.repeats}] {name:<28s} {dt:9.3f} s", flush=True)
    tmp.cleanup()
    med = {n: statistics.median(v) for n, v in times.items()}
    print("text medians: " + "; ".join(f"{n} {v:.3f} s" for n, v in med.items()) +
          f"; bare per unique text {1e6 * med['bare forward'] / len(unique):.0f} us", flush=True)
    ratios = _ratio_lines(times, "bare forward", ["call, no cache", "call, cold cache", "call, warm cache"], "text")
    return dict(n_species=len(lineages), texts=len(all_texts), per_type=per_type, unique_texts=len(unique),
                batch_size=bs, n_batches=n_batches, times=times, medians=med, ratios=ratios,
                model=model.model_name, embed_dim=int(model.embed_dim))


# ----------------------------------------------------------------------------- zero-shot part


def make_zeroshot_data(lineages, n_images: int, dim: int, noise: float, seed: int):
    """(hierarchy, images float32 (N, D) unit rows, text rank → float32 (T_r, D) unit rows, truth int64 (N,))."""
    import numpy as np

    from treeprobe._utils import RANKS
    from treeprobe.zeroshot import ClassHierarchy

    h = ClassHierarchy.from_lineages(lineages[list(RANKS)], ranks=RANKS)
    rng = np.random.default_rng(seed)
    S = h.n_species
    Ts = rng.standard_normal((S, dim), dtype=np.float32)
    Ts /= np.linalg.norm(Ts, axis=1, keepdims=True)
    text = {}
    for j, r in enumerate(h.ranks):
        col = h.species_ancestors[:, j]
        M = np.zeros((h.n_taxa(r), dim), dtype=np.float64)
        np.add.at(M, col, Ts)  # every species is known at every rank in iNat21
        M /= np.linalg.norm(M, axis=1, keepdims=True)
        text[r] = M.astype(np.float32)
    text[h.ranks[-1]] = Ts
    truth = rng.integers(0, S, size=n_images).astype(np.int64)
    X = np.empty((n_images, dim), dtype=np.float32)
    for a in range(0, n_images, 65536):
        b = min(a + 65536, n_images)
        E = rng.standard_normal((b - a, dim), dtype=np.float32)
        E *= np.float32(noise) / np.linalg.norm(E, axis=1, keepdims=True)
        E += Ts[truth[a:b]]
        E /= np.linalg.norm(E, axis=1, keepdims=True)
        X[a:b] = E
    return h, X, text, truth


def zeroshot_part(args, lineages) -> dict:
    import numpy as np

    from treeprobe.mistakes import mistake_summary
    from treeprobe.zeroshot import DEFAULT_BLOCK_ELEMENTS, MODES, species_bootstrap_ratio, zeroshot

    t0 = time.perf_counter()
    h, X, text, truth = make_zeroshot_data(lineages, args.n_images, args.dim, args.noise, args.seed)
    S, N = h.n_species, len(X)
    widest = max(t.shape[0] for t in text.values())
    block = max(1, DEFAULT_BLOCK_ELEMENTS // widest)
    n_blocks = -(-N // block)
    Ts = text[h.ranks[-1]]
    sizes = {r: h.n_taxa(r) for r in h.ranks}
    print(f"zero-shot part: {N} images x {args.dim}-d, {S} species, taxa per rank "
          f"{', '.join(f'{r} {n}' for r, n in sizes.items())} (sum {sum(sizes.values())}); block {block} images "
          f"-> {n_blocks} blocks; k 5, n_boot {args.n_boot}; data built in {time.perf_counter() - t0:.1f} s",
          flush=True)

    def ref_species():
        for a in range(0, N, block):
            X[a:a + block] @ Ts.T

    def ref_argmax():
        for a in range(0, N, block):
            (X[a:a + block] @ Ts.T).argmax(axis=1)

    def ref_all():
        for a in range(0, N, block):
            Xb = X[a:a + block]
            for r in h.ranks:
                Xb @ text[r].T

    results = {}

    def zs(modes, n_boot):
        def run():
            results[(modes, n_boot)] = zeroshot(X, text, h, truth=truth, modes=modes, k=5, n_boot=n_boot,
                                                seed=args.seed)
        return run

    cases = {"ref species": ref_species, "ref species + argmax": ref_argmax, "ref all ranks": ref_all}
    for m in MODES:
        cases[f"zeroshot {m}"] = zs((m,), args.n_boot)
    cases["zeroshot all modes"] = zs(MODES, args.n_boot)
    ref_argmax()  # warm-up (first-touch of the BLAS buffers), untimed
    zeroshot(X[:2000], text, h, truth=truth[:2000], modes=MODES, k=5, n_boot=1)  # compiles the kernels, untimed
    times = _run_interleaved(cases, args.repeats, "zero-shot")

    res = results[(MODES, args.n_boot)]
    tab = res.table
    summary = {f"{row['mode']}/{row['rank']}": round(float(row["top1"]), 4) for _, row in tab.iterrows()
               if row["rank"] in ("kingdom", "family", "species")}
    print("top-1 (synthetic data, a sanity check): " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)

    # bootstrap: the same (N, 42) statistics zeroshot resamples (hit columns of every (mode, rank) entry)
    known = res.true_codes >= 0
    cols = []
    for m in MODES:
        hit1 = res.predictions[m] == res.true_codes
        for j in range(len(h.ranks)):
            cols.append(hit1[:, j] & known[:, j])
            cols.append(hit1[:, j] & known[:, j])  # stands in for the top-k column: same cost
    num = np.stack(cols, axis=1).astype(float)
    den = np.repeat(known, 2 * len(MODES), axis=1).astype(float)
    pred_ss = res.predictions["species_summed"][:, -1]
    extra = {
        f"bootstrap n_boot={BOOT_FULL}": lambda: species_bootstrap_ratio(truth, num, den, n_boot=BOOT_FULL),
        f"bootstrap n_boot={args.n_boot}": lambda: species_bootstrap_ratio(truth, num, den, n_boot=args.n_boot),
        f"mistake_summary n_boot={args.n_boot}": lambda: mistake_summary(truth, pred_ss, h, topk=res.species_topk,
                                                                         k=5, n_boot=args.n_boot),
        f"mistake_summary n_boot={BOOT_FULL}": lambda: mistake_summary(truth, pred_ss, h, topk=res.species_topk,
                                                                       k=5, n_boot=BOOT_FULL),
    }
    times.update(_run_interleaved(extra, args.repeats, "zero-shot extras"))
    med = {n: statistics.median(v) for n, v in times.items()}
    print("zero-shot medians: " + "; ".join(f"{n} {v:.3f} s" for n, v in med.items()), flush=True)
    boot_cost = [a - b for a, b in zip(times[f"bootstrap n_boot={BOOT_FULL}"],
                                       times[f"bootstrap n_boot={args.n_boot}"])]
    print(f"bootstrap cost of n_boot={BOOT_FULL} (vs {args.n_boot}) in an all-modes call: "
          f"{statistics.median(boot_cost):.3f} s (median)", flush=True)
    ratios = _ratio_lines(times, "ref species", [f"zeroshot {m}" for m in MODES] + ["zeroshot all modes"],
                          "zero-shot")
    ratios_all = _ratio_lines(times, "ref all ranks", ["zeroshot flat", "zeroshot top_down", "zeroshot all modes"],
                              "zero-shot (info, vs all ranks' products)")
    return dict(n_images=N, dim=args.dim, n_species=S, taxa=sizes, block_size=block, n_blocks=n_blocks,
                n_boot=args.n_boot, times=times, medians=med, bootstrap_cost=boot_cost, ratios=ratios,
                ratios_vs_all_ranks=ratios_all, top1=summary)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("text", "zeroshot", "both"), default="both")
    p.add_argument("--lineages", default=DEFAULT_LINEAGES, help="species table (kingdom..species, common_name)")
    p.add_argument("--ckpt", default=str(DEMO_CKPT), help="checkpoint of the text part (default: the demo one)")
    p.add_argument("--n-images", type=int, default=100_000)
    p.add_argument("--n-species", type=int, default=None, help="seeded sample of the species (default: all)")
    p.add_argument("--dim", type=int, default=512, help="width of the synthetic zero-shot embeddings")
    p.add_argument("--noise", type=float, default=5.5, help="norm of the noise added to an image's species vector")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward batch")
    p.add_argument("--n-boot", type=int, default=1, help="bootstrap replicates in the timed zeroshot calls")
    p.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP / torch threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke sizes: 150 species, 3,000 images x 64-d, 1 repeat")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if args.quick:
        args.n_species = args.n_species or 150
        args.n_images, args.dim, args.repeats = min(args.n_images, 3000), min(args.dim, 64), 1

    import numpy as np
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the zero-shot kernels
    with threadpool_limits(limits=args.threads):
        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                         f"{i.get('num_threads')} thr" for i in threadpool_info())
        print(f"cpu: {cpu_model()} ({os.cpu_count()} logical cpus); load {loadavg()}; threads {args.threads} "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.get_num_threads()}); "
              f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
              f"BLAS: {blas}", flush=True)
        lineages = read_lineages(args.lineages, args.n_species, args.seed)
        out = dict(cpu=cpu_model(), threads=args.threads, load_start=loadavg(), args=vars(args))
        if args.part in ("text", "both"):
            out["text"] = text_part(args, lineages)
        if args.part in ("zeroshot", "both"):
            out["zeroshot"] = zeroshot_part(args, lineages)
    out["load_end"] = loadavg()
    print(f"load at the end {out['load_end']}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
