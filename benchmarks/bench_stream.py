"""Streaming benchmark (issue 14): a synthetic TreeOfLife-200M-like folder of parquet shards, one pass over it
against the raw column scan, the full streamed report, and the species-level Mantel test at 1M species.

    .venv/bin/python benchmarks/bench_stream.py                      # 10M rows x 768 float16, 24 files (~15 GB)
    .venv/bin/python benchmarks/bench_stream.py --rows 200000 --mantel-species 20000   # smoke sizes

**Data** (written to a fresh folder under ``--tmp``, default /tmp, and removed at the end, also on an error or
an interrupt): ``--rows`` rows over ``--files`` parquet files (row groups of 65,536 rows, snappy), columns
``emb`` (``fixed_size_list<halffloat>[--dim]``, the TreeOfLife-200M layout), the 7 rank columns and a
``uuid``. Species: the 10,000 real iNat21 species (``--species-list``), item counts multinomial with
lognormal(0, 1) weights (a long tail, as TreeOfLife-200M), rows **sorted by taxonomy** and the files cut
every rows/files rows (species run across files). Embedding of an item of species s: Σ_rank v_rank[taxon of
s at that rank] + ε, v ~ N(0, 0.2²) per dimension and taxon, ε ~ N(0, 1) per dimension (a weak tree signal:
cosine ≈ 0.2 within a species, ≈ 0.03 per shared rank above it), cast to float16.

Parts (each timed in its own child process; peak RSS and CPU seconds from ``os.wait4``; load average
before and after):

* ``raw``: every record batch (65,536 rows) of the ``emb`` + rank columns read with pyarrow
  (``iter_batches``, threads on) and touched: a uint64 sum over the float16 bits of ``emb`` and the byte
  lengths of the names. The physical limit of a pass over these files on this machine.
* ``stream``: ``species_statistics(folder, progress=False)`` (per-species sums only) and with
  ``sample=--sample`` (the stratified sample the report uses); ``RATIO stream / raw`` in rows per second
  (target >= 0.80).
* ``report``: ``treeprobe intrinsic --embeddings FOLDER --out OUT --quiet --phylo`` + ``--report-args``
  (default: the CLI's defaults: 999 permutations, Pearson + Spearman, kNN, k-means + agglomerative, t-SNE +
  UMAP on 20K points, K_mult, tree recovery at species and genus, within-species variation, figures). Its
  pass is ``gram=True`` + the sample (the image-level test needs the Gram terms): its time and rows/s are
  read from report.json. Target: <= 15 min on 2 cores, peak RSS <= 4 GB.
* ``mantel``: the species-level Mantel tests at ``--mantel-species`` species x ``--mantel-dim`` dims with
  ``--mantel-permutations`` permutations, from synthetic species statistics made in memory (no files): the
  species of the 10,000 iNat21 ones each split in ``mantel-species / 10,000``; unit centroid directions
  with the same rank signal; n_s = 1 + Poisson(9); sums S_s = n_s·ρ_s·c_s (ρ = 0.45, 1 for one item).
  ``image``: the image-level between-species Pearson test from sums
  (``stream._species_pearson_from_sums``, the call of ``mantel_from_stats``); ``centroid``: the
  species-centroid Pearson test (``stream._centroid_test``). Target <= 10 min each.

Prints ``RATIO`` and ``TARGET`` lines; ``--json-out`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPECIES = "/work/shared/data/inat2021_taxonomy/metadata.csv"
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
ROW_GROUP = 65536
RANK_SD = 0.2
NOISE_SD = 1.0


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:  # pragma: no cover - not Linux
        return "?"


def mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:  # pragma: no cover
        pass
    return float("nan")


# --- the data ---------------------------------------------------------------------------------------------


def read_species(path: str):
    """The species table (7 rank columns), sorted by lineage."""
    import pandas as pd

    df = pd.read_csv(path, usecols=list(RANKS), dtype=str, keep_default_na=False)
    return df.sort_values(list(RANKS)).drop_duplicates().reset_index(drop=True)


def species_means(lin, dim: int, rng, rank_sd: float = RANK_SD):
    """(S, dim) float32: Σ over ranks of a N(0, rank_sd²) vector per taxon (cumulative names)."""
    import numpy as np
    import pandas as pd

    M = np.zeros((len(lin), dim), dtype=np.float32)
    cum = None
    for r in RANKS:
        cum = lin[r].to_numpy(dtype=object) if cum is None else cum + "|" + lin[r].to_numpy(dtype=object)
        codes, uniq = pd.factorize(cum)
        V = rng.standard_normal((len(uniq), dim), dtype=np.float32) * np.float32(rank_sd)
        M += V[codes]
    return M


def species_counts(n_rows: int, n_species: int, rng):
    import numpy as np

    w = rng.lognormal(0.0, 1.0, n_species)
    return rng.multinomial(n_rows, w / w.sum()).astype(np.int64)


def _uuids(rng, n: int):
    """n random 32-hex-digit strings as a pyarrow string array (vectorised)."""
    import numpy as np
    import pyarrow as pa

    b = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    hexd = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    h = np.empty((n, 32), dtype=np.uint8)
    h[:, 0::2] = hexd[b >> 4]
    h[:, 1::2] = hexd[b & 15]
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(h.tobytes()))


def write_dataset(folder: Path, *, rows: int, dim: int, files: int, species_list: str, seed: int = 0,
                  progress: bool = True) -> dict:
    """Write the synthetic shards into ``folder``; returns what was written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lin = read_species(species_list)
    M = species_means(lin, dim, rng)
    counts = species_counts(rows, len(lin), rng)
    sp_of_row = np.repeat(np.arange(len(lin), dtype=np.int32), counts)
    names = {r: pa.array(lin[r].tolist(), pa.string()) for r in RANKS}
    schema = pa.schema([("emb", pa.list_(pa.float16(), dim)), *[(r, pa.string()) for r in RANKS],
                        ("uuid", pa.string())])
    cuts = np.linspace(0, rows, files + 1).astype(np.int64)
    paths = []
    t0 = time.perf_counter()
    for f in range(files):
        path = folder / f"part-{f:05d}.parquet"
        with pq.ParquetWriter(path, schema) as w:
            for a in range(cuts[f], cuts[f + 1], ROW_GROUP):
                b = min(a + ROW_GROUP, cuts[f + 1])
                sp = sp_of_row[a:b]
                X = rng.standard_normal((b - a, dim), dtype=np.float32)
                X *= np.float32(NOISE_SD)
                X += M[sp]
                emb = pa.FixedSizeListArray.from_arrays(pa.array(X.astype(np.float16).ravel()), dim)
                idx = pa.array(sp)
                cols = [emb] + [names[r].take(idx) for r in RANKS] + [_uuids(rng, b - a)]
                w.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=ROW_GROUP)
        paths.append(str(path))
        if progress:
            print(f"  wrote {path.name} ({f + 1}/{files}, {time.perf_counter() - t0:.0f} s)", flush=True)
    size = sum(os.path.getsize(p) for p in paths)
    return dict(rows=rows, dim=dim, files=files, bytes=size, n_species=int((counts > 0).sum()),
                max_species_rows=int(counts.max()), seconds=time.perf_counter() - t0, compression="snappy",
                row_group=ROW_GROUP)


# --- the children -------------------------------------------------------------------------------------------


def child_raw(folder: str) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    t0 = time.perf_counter()
    n = 0
    acc = 0
    name_bytes = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=ROW_GROUP, columns=["emb", *RANKS], use_threads=True):
            emb = batch.column(0)
            vals = emb.values.to_numpy(zero_copy_only=False)  # float16 as stored
            acc += int(np.add.reduce(vals.view(np.uint16), dtype=np.uint64))
            for r in range(1, batch.num_columns):
                name_bytes += pc.sum(pc.binary_length(batch.column(r))).as_py() or 0
            n += batch.num_rows
    dt = time.perf_counter() - t0
    return dict(seconds=dt, rows=n, rows_per_second=n / dt, checksum=acc % (1 << 61), name_bytes=name_bytes)


def child_stream(folder: str, sample: int | None, gram: bool) -> dict:
    from treeprobe.stream import species_statistics

    t0 = time.perf_counter()
    st = species_statistics(folder, sample=sample, gram=gram, progress=False)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, rows=st.n_rows, rows_per_second=st.n_rows / dt, n_items=st.n_items,
                n_units=st.n_units, wait_read_seconds=st.timings.get("wait_read_seconds"),
                n_sampled=st.sample_info["n_sampled"] if st.has_sample else None,
                statistics_bytes=st.summary()["statistics_bytes"])


def mantel_inputs(n_species: int, dim: int, seed: int, species_list: str):
    """(clades, sizes (S,), unit centroid directions C (S, dim) float64, ρ (S,), N) of synthetic species
    statistics (see the module docstring)."""
    import numpy as np
    import pandas as pd

    from treeprobe.taxonomy import Taxonomy

    rng = np.random.default_rng(seed)
    base = read_species(species_list)
    per = -(-n_species // len(base))
    rep = base.loc[np.repeat(np.arange(len(base)), per)].reset_index(drop=True).iloc[:n_species]
    rep["species"] = rep["species"] + " v" + pd.Series(np.tile(np.arange(per), len(base))[:n_species]).astype(str)
    clades = Taxonomy.from_frame(rep, RANKS, unknown="separate").clade_structure()
    C = np.zeros((n_species, dim))
    cum = None
    for r in RANKS[:-1]:  # the species' own term is the noise below
        cum = rep[r].to_numpy(dtype=object) if cum is None else cum + "|" + rep[r].to_numpy(dtype=object)
        codes, uniq = pd.factorize(cum)
        V = rng.standard_normal((len(uniq), dim)) * RANK_SD
        for a in range(0, n_species, 65536):
            C[a:a + 65536] += V[codes[a:a + 65536]]
        del V
    for a in range(0, n_species, 65536):
        B = C[a:a + 65536]
        B += rng.standard_normal(B.shape) * 0.5
        B /= np.linalg.norm(B, axis=1)[:, None]
    sizes = 1 + rng.poisson(9.0, n_species).astype(np.int64)
    rho = np.where(sizes > 1, 0.45, 1.0)
    N = int(sizes.sum())
    return clades, sizes, C, rho, N


def child_mantel(level: str, n_species: int, dim: int, permutations: int, seed: int, species_list: str) -> dict:
    import numpy as np

    from treeprobe import mantel as M
    from treeprobe import stream

    t0 = time.perf_counter()
    clades, sizes, C, rho, N = mantel_inputs(n_species, dim, seed, species_list)
    prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    if level == "image":
        C *= (sizes * rho)[:, None]  # in place: the sums S_s = n_s·ρ_s·c_s
        Su = C
        sq = float(N)  # Σ‖x̂‖² of unit vectors
        g2w = float(np.sum(sizes + sizes * (sizes - 1) * rho ** 4))
        S = Su.sum(axis=0)
        P_b = (N * (N - 1) - float(np.sum(sizes * (sizes - 1)))) / 2.0
        m_c = (float(S @ S) - float(np.einsum("ij,ij->", Su, Su))) / 2.0 / P_b
        g2 = g2w + 2.0 * P_b * (m_c ** 2 + 1.0 / dim)  # consistent with the sums; enters the denominator only
        res = stream._species_pearson_from_sums(clades, sizes, Su, sq, g2, g2w, permutations=permutations,
                                                alternative="greater", rng=np.random.default_rng(seed),
                                                perm_dtype=np.float64, n_jobs=None, progress=False)
    else:
        res = stream._centroid_test(C, clades, sizes, N, method="pearson", permutations=permutations,
                                    alternative="greater", seed=seed, spearman_max_n=M.SPEARMAN_MAX_N,
                                    spearman_repeats=M.SPEARMAN_REPEATS, perm_dtype=np.float64, n_jobs=None,
                                    progress=False)
    dt = time.perf_counter() - t1
    return dict(level=level, prepare_seconds=prep, seconds=dt, n_species=n_species, dim=dim, n_items=N,
                permutations=permutations, statistic=res.statistic, p_value=res.p_value,
                n_jobs=res.details.get("n_jobs"), backend=res.details.get("backend"))


# --- the parent ---------------------------------------------------------------------------------------------


def _timed_cmd(cmd: list[str]) -> list[str]:
    """``cmd`` under a small wrapper that reports its peak RSS and CPU (the whole process tree)."""
    wrapper = ("import json,os,resource,subprocess,sys;p=subprocess.run(sys.argv[1:]);"
               "r=resource.getrusage(resource.RUSAGE_CHILDREN);"
               "print('RUSAGE '+json.dumps(dict(maxrss_gib=r.ru_maxrss/2**20,cpu_seconds=r.ru_utime+r.ru_stime,"
               "rc=p.returncode)));sys.exit(p.returncode)")
    return [sys.executable, "-c", wrapper, *cmd]


def run_measured(cmd: list[str], label: str, procs: list, env=None) -> dict:
    la0 = loadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(_timed_cmd(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         start_new_session=True, env=env)
    procs.append(p)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    procs.remove(p)
    res: dict = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res.update(json.loads(line[7:]))
        if line.startswith("RUSAGE "):
            res.update(json.loads(line[7:]))
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {p.returncode}):\n{err[-3000:]}")
    res.update(label=label, wall_seconds=wall, load_start=la0, load_end=loadavg())
    print(f"  {label}: {wall:.1f} s wall, {res.get('cpu_seconds', float('nan')):.0f} CPU s, peak RSS "
          f"{res.get('maxrss_gib', float('nan')):.2f} GiB, load {la0} -> {res['load_end']}", flush=True)
    return res


def _child_cmd(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--species-list", default=DEFAULT_SPECIES, help="species table with the 7 rank columns")
    p.add_argument("--tmp", default="/tmp", help="where the data folder is made (and removed)")
    p.add_argument("--sample", type=int, default=100_000, help="sample of the streamed report / the pass")
    p.add_argument("--parts", default="raw,stream,report,mantel", help="comma-separated: raw, stream, report, mantel")
    p.add_argument("--report-args", default="--phylo", help="extra options of the treeprobe intrinsic run")
    p.add_argument("--mantel-species", type=int, default=1_000_000)
    p.add_argument("--mantel-dim", type=int, default=1024)
    p.add_argument("--mantel-permutations", type=int, default=999)
    p.add_argument("--mantel-levels", default="image,centroid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the data folder (default: removed)")
    p.add_argument("--json-out")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "raw":
            res = child_raw(rest[0])
        elif kind == "stream":
            res = child_stream(rest[0], int(rest[1]) or None, rest[2] == "gram")
        elif kind == "mantel":
            res = child_mantel(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), rest[5])
        else:
            raise SystemExit(f"unknown child {kind}")
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = set(parts) - {"raw", "stream", "report", "mantel"}
    if bad:
        p.error(f"unknown part(s) {', '.join(sorted(bad))}")
    out: dict = dict(args={k: v for k, v in vars(args).items() if k != "child"}, load_start=loadavg(),
                     mem_available_gib_start=mem_available_gb(), cpus=os.cpu_count())
    print(f"bench_stream: {args.rows:,} rows x {args.dim} float16, {args.files} files; load {out['load_start']}; "
          f"MemAvailable {out['mem_available_gib_start']:.1f} GiB; {os.cpu_count()} cpus", flush=True)
    procs: list = []
    data = None
    prev = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if {"raw", "stream", "report"} & set(parts):
            data = Path(tempfile.mkdtemp(prefix="treeprobe_bench_stream_", dir=args.tmp))
            print(f"writing the data into {data}", flush=True)
            out["data"] = write_dataset(data, rows=args.rows, dim=args.dim, files=args.files,
                                        species_list=args.species_list, seed=args.seed)
            d = out["data"]
            print(f"data: {d['bytes'] / 2**30:.2f} GiB, {d['n_species']:,} species (largest {d['max_species_rows']:,} "
                  f"rows), written in {d['seconds']:.0f} s", flush=True)
        if "raw" in parts:
            out["raw"] = run_measured(_child_cmd("raw", data), "raw pyarrow scan", procs)
        if "stream" in parts:
            out["stream_sums"] = run_measured(_child_cmd("stream", data, 0, "nogram"), "stream: sums", procs)
            out["stream_sample"] = run_measured(_child_cmd("stream", data, args.sample, "nogram"),
                                                f"stream: sums + sample {args.sample:,}", procs)
            if "raw" not in parts:  # the ratio needs a scan near in time
                out["raw"] = run_measured(_child_cmd("raw", data), "raw pyarrow scan", procs)
            out["raw_after"] = run_measured(_child_cmd("raw", data), "raw pyarrow scan (again)", procs)
        if "report" in parts:
            rep_dir = Path(tempfile.mkdtemp(prefix="treeprobe_bench_stream_report_", dir=args.tmp)) / "report"
            try:
                cmd = [sys.executable, "-m", "treeprobe", "intrinsic", "--embeddings", str(data), "--out",
                       str(rep_dir), "--quiet", "--sample", str(args.sample), *args.report_args.split()]
                out["report"] = r = run_measured(cmd, "treeprobe intrinsic (streamed)", procs)
                rep = json.loads((rep_dir / "report.json").read_text())
                st = rep["provenance"]["stream"]
                r.update(command=" ".join(cmd[1:]), pass_seconds=st["pass_seconds"],
                         pass_rows_per_second=st["rows_per_second"], timings=rep["provenance"]["timings"],
                         mantel=[{k: m.get(k) for k in ("level", "method", "statistic", "p_value", "estimator")}
                                 for m in rep["mantel"]],
                         physignal=(rep.get("phylo", {}).get("physignal") or [{}])[0].get("statistic"),
                         knn={k["rank"]: k["agreement"] for k in rep["knn"]}, n_items=rep["provenance"]["n_items"],
                         n_sampled=rep["provenance"]["n_sampled"],
                         figures=sorted(p.name for p in (rep_dir / "figures").glob("*.png")))
            finally:
                shutil.rmtree(rep_dir.parent, ignore_errors=True)
        if data is not None and not args.keep:
            shutil.rmtree(data, ignore_errors=True)
            data = None
        if "mantel" in parts:
            for level in [s.strip() for s in args.mantel_levels.split(",") if s.strip()]:
                need = args.mantel_species * args.mantel_dim * 8 * (1 if level == "image" else 2) / 2**30
                avail = mem_available_gb()
                if avail < need * 1.15 + 1:
                    print(f"  mantel {level}: skipped, needs ~{need:.1f} GiB, {avail:.1f} GiB available", flush=True)
                    out[f"mantel_{level}"] = dict(skipped=f"needs ~{need:.1f} GiB, {avail:.1f} GiB available")
                    continue
                out[f"mantel_{level}"] = run_measured(
                    _child_cmd("mantel", level, args.mantel_species, args.mantel_dim, args.mantel_permutations,
                               args.seed, args.species_list),
                    f"Mantel {level} level, {args.mantel_species:,} species x {args.mantel_dim}", procs)
    except KeyboardInterrupt:
        print("interrupted: removing the data", file=sys.stderr, flush=True)
        raise
    finally:
        for proc in list(procs):  # a child still running (error or interrupt): its whole group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if data is not None and not args.keep:
            shutil.rmtree(data, ignore_errors=True)
        signal.signal(signal.SIGTERM, prev)
    out["load_end"] = loadavg()
    _summary(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def _summary(out: dict) -> None:
    raw = [out[k]["rows_per_second"] for k in ("raw", "raw_after") if k in out]
    if raw:
        best = max(raw)
        print(f"raw scan: {', '.join(f'{r:,.0f}' for r in raw)} rows/s", flush=True)
        for key, name in (("stream_sums", "stream sums"), ("stream_sample", "stream sums + sample")):
            if key in out:
                ratio = out[key]["rows_per_second"] / best
                out[key]["ratio_to_raw"] = ratio
                print(f"RATIO {name} / raw scan = {ratio:.3f} ({out[key]['rows_per_second']:,.0f} vs {best:,.0f} "
                      f"rows/s); TARGET >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}", flush=True)
        if "report" in out:
            ratio = out["report"]["pass_rows_per_second"] / best
            out["report"]["pass_ratio_to_raw"] = ratio
            print(f"RATIO report pass (gram + sample) / raw scan = {ratio:.3f} "
                  f"({out['report']['pass_rows_per_second']:,.0f} rows/s)", flush=True)
    if "report" in out:
        r = out["report"]
        print(f"TARGET report <= 15 min: {r['wall_seconds'] / 60:.1f} min "
              f"({'met' if r['wall_seconds'] <= 900 else 'NOT met'}); pass {r['pass_seconds']:.0f} s", flush=True)
        print(f"TARGET report peak RSS <= 4 GB: {r['maxrss_gib']:.2f} GiB "
              f"({'met' if r['maxrss_gib'] * 2**30 <= 4e9 else 'NOT met'})", flush=True)
    for level in ("image", "centroid"):
        m = out.get(f"mantel_{level}")
        if m and "seconds" in m:
            print(f"TARGET Mantel {level} level at {m['n_species']:,} species x {m['dim']}, {m['permutations']} "
                  f"permutations <= 10 min: {m['seconds'] / 60:.1f} min ({'met' if m['seconds'] <= 600 else 'NOT met'}"
                  f"; + {m['prepare_seconds']:.0f} s to make the inputs; peak RSS {m['maxrss_gib']:.2f} GiB; "
                  f"r = {m['statistic']:+.4f}, p = {m['p_value']:.4g})", flush=True)
    print(f"load at the end {out['load_end']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
