"""Full ``treeprobe intrinsic`` on precomputed embeddings: wall time per stage, total, peak RSS.

Runs the CLI as a child process under ``/usr/bin/time -v`` (peak resident memory, user and
system CPU seconds) on the synthetic 100K x 512 iNat21 input of
``make_synthetic_embeddings.py`` (made first if missing), reads the per-stage timings from
``report.json`` (``provenance.timings``), and prints one line per run plus the median over
runs. The machine load (1-minute load average) is sampled every 10 s during each run: other
jobs share the 2 cores, so read the wall times next to it (CPU seconds are less affected).

    python benchmarks/bench_intrinsic.py                       # 1 run, all metrics + figures
    python benchmarks/bench_intrinsic.py --repeats 3 --json out.json
    python benchmarks/bench_intrinsic.py --extra "--max-map-points 100000"

``--no-openblas-env`` unsets OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for the child only (this
machine sets them for old OpenBLAS builds; they force the slower Haswell kernels on a current
numpy). Say so next to numbers measured with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data" / "inat21_synth_100k"

_TIME_FIELDS = {
    "max_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
    "user_s": r"User time \(seconds\): ([\d.]+)",
    "system_s": r"System time \(seconds\): ([\d.]+)",
    "elapsed": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)",
}


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    s = 0.0
    for p in parts:
        s = s * 60 + p
    return s


def one_run(data: Path, extra: list[str], env: dict, out_root: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="run_", dir=out_root))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "treeprobe", "intrinsic",
           "--embeddings", str(data / "embeddings.npy"), "--metadata", str(data / "metadata.csv"),
           "--out", str(out / "report"), "--quiet", *extra]
    loads, done = [], threading.Event()

    def sample():
        while not done.wait(10):
            loads.append(os.getloadavg()[0])

    th = threading.Thread(target=sample, daemon=True)
    load0 = os.getloadavg()[0]
    th.start()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = dict(command=" ".join(shlex.quote(c) for c in cmd[2:]), wall_s=wall, load_start=load0,
               load_mean=(sum(loads) / len(loads)) if loads else load0, load_max=max(loads, default=load0))
    for key, pat in _TIME_FIELDS.items():
        m = re.search(pat, proc.stderr)
        if m:
            res[key] = _seconds(m.group(1)) if key == "elapsed" else float(m.group(1))
    rep = json.loads((out / "report" / "report.json").read_text())
    res["timings"] = rep["provenance"]["timings"]
    res["n_items"] = rep["provenance"]["n_items"]
    res["clustering_notes"] = sorted({r["note"] for r in rep["clustering"] if r.get("note")})
    res["maps"] = rep.get("maps")
    res["out"] = str(out / "report")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA), help="folder with embeddings.npy + metadata.csv")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--extra", default="", help="extra CLI arguments, one string")
    ap.add_argument("--no-openblas-env", action="store_true",
                    help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for the child (say so with the numbers)")
    ap.add_argument("--out-root", default=tempfile.gettempdir())
    ap.add_argument("--json", help="write all runs here")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not (data / "embeddings.npy").exists():
        subprocess.run([sys.executable, str(HERE / "make_synthetic_embeddings.py"), "--out", str(data)], check=True)
    env = dict(os.environ)
    if a.no_openblas_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    runs = []
    for i in range(a.repeats):
        r = one_run(data, shlex.split(a.extra), env, Path(a.out_root))
        runs.append(r)
        stages = ", ".join(f"{k[:-2]} {v:.0f}" for k, v in r["timings"].items())
        print(f"run {i + 1}: wall {r['wall_s']:.0f} s (cpu {r.get('user_s', 0) + r.get('system_s', 0):.0f} s), "
              f"peak RSS {r.get('max_rss_kb', 0) / 1024 ** 2:.2f} GiB, load mean {r['load_mean']:.1f} "
              f"(max {r['load_max']:.1f}); stages s: {stages}", flush=True)
    if len(runs) > 1:
        keys = runs[0]["timings"].keys()
        med = {k: statistics.median(r["timings"][k] for r in runs) for k in keys}
        print("median wall %.0f s; stages s: %s" % (statistics.median(r["wall_s"] for r in runs),
                                                  ", ".join(f"{k[:-2]} {v:.0f}" for k, v in med.items())))
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
