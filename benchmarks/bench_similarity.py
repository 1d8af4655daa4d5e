"""Benchmark: model-to-model similarity (``treeprobe.similarity``) at scale, without N×N matrices.

Two random float32 representations of the same N items (default N = 100,000, 512-d and 768-d;
Y shares a rotated copy of X's first 256 dimensions plus noise, so the values are not all ~0):

* debiased linear CKA (:func:`~treeprobe.similarity.linear_cka`), feature-space form;
* Pearson RSA (``rsa(method="pearson")``), exact over all N(N−1)/2 pairs;
* Spearman RSA (``rsa(method="spearman")``), the pair-sample estimate (``--n-pairs`` pairs, default 1e6);
* optionally (``--anchor-n``, default 4,000) the same debiased CKA computed the textbook way, with the N×N
  Gram matrices, on the first ``--anchor-n`` items: the time and memory the feature-space form avoids,
  and a check that both give the same number.

Times are wall-clock seconds of each call (data generation excluded); peak memory is tracemalloc's peak of
the Python/numpy allocations made during the call (what the call adds beyond the inputs), and the process's
peak RSS at the end.

    .venv/bin/python benchmarks/bench_similarity.py
    .venv/bin/python benchmarks/bench_similarity.py --n 20000 --d1 256 --d2 384 --anchor-n 0
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc

import numpy as np

CHUNK = 65536


def _measure(fn):
    """(result, seconds, peak MiB allocated during the call)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


def _make(n: int, d1: int, d2: int, seed: int):
    rng = np.random.default_rng(seed)
    shared = min(256, d1, d2)
    Q = np.linalg.qr(rng.standard_normal((shared, shared)))[0].astype(np.float32)
    X = np.empty((n, d1), dtype=np.float32)
    Y = np.empty((n, d2), dtype=np.float32)
    for i in range(0, n, CHUNK):
        m = min(CHUNK, n - i)
        X[i:i + m] = rng.standard_normal((m, d1), dtype=np.float32)
        Y[i:i + m] = rng.standard_normal((m, d2), dtype=np.float32)
        Y[i:i + m, :shared] += 2.0 * X[i:i + m, :shared] @ Q
    return X, Y


def _explicit_debiased_cka(X, Y):
    """The N×N form: Gram matrices with zeroed diagonals and the unbiased HSIC formula."""
    def hsic(K, L):
        n = len(K)
        k1, l1 = K.sum(axis=1), L.sum(axis=1)
        return (np.sum(K * L) + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))

    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    K = X @ X.T
    np.fill_diagonal(K, 0.0)
    L = Y @ Y.T
    np.fill_diagonal(L, 0.0)
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="items (rows)")
    ap.add_argument("--d1", type=int, default=512, help="dimensions of X")
    ap.add_argument("--d2", type=int, default=768, help="dimensions of Y")
    ap.add_argument("--n-pairs", type=int, default=1_000_000, help="pairs of the Spearman pair sample")
    ap.add_argument("--anchor-n", type=int, default=4000, help="items for the explicit N×N CKA (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from treeprobe.similarity import linear_cka, rsa

    X, Y = _make(args.n, args.d1, args.d2, args.seed)
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}; "
          f"X {X.shape} float32, Y {Y.shape} float32 ({(X.nbytes + Y.nbytes) / 2**20:.0f} MiB)")
    print(f"{'what':<44} {'value':>10} {'seconds':>9} {'peak MiB':>9}")

    def show(what, value, dt, peak):
        print(f"{what:<44} {value:>10.5f} {dt:>9.2f} {peak:>9.1f}", flush=True)

    v, dt, pk = _measure(lambda: linear_cka(X, Y))
    show(f"linear_cka debiased, N={args.n}", v, dt, pk)
    v, dt, pk = _measure(lambda: linear_cka(X, Y, debiased=False))
    show(f"linear_cka biased, N={args.n}", v, dt, pk)
    res, dt, pk = _measure(lambda: rsa(X, Y, method="pearson"))
    show(f"rsa pearson exact, {res.n_pairs:.3g} pairs", res.statistic, dt, pk)
    res, dt, pk = _measure(lambda: rsa(X, Y, method="spearman", n_pairs=args.n_pairs, seed=args.seed))
    show(f"rsa spearman {res.estimator}, {res.n_pairs:.3g} pairs", res.statistic, dt, pk)
    print(f"{'':<44}  ci95 ± {res.ci95:.5f}")
    if args.anchor_n:
        a = min(args.anchor_n, args.n)
        v1, dt1, pk1 = _measure(lambda: linear_cka(X[:a], Y[:a]))
        show(f"linear_cka debiased, N={a} (feature space)", v1, dt1, pk1)
        v2, dt2, pk2 = _measure(lambda: _explicit_debiased_cka(X[:a], Y[:a]))
        show(f"explicit N×N debiased CKA, N={a}", v2, dt2, pk2)
        print(f"{'':<44}  |difference| = {abs(v1 - v2):.2e}")
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
