"""Compiled (numba) passes of :func:`treeprobe.zeroshot.zeroshot` over one block of *transposed* logits.

A block's logits are held as (W, b): one row per candidate taxon, one column per image, so that every
pass below runs over whole rows of b contiguous values (vectorised across the images of the block) and
writes only small per-image results. Columns are split over numba threads in chunks of :data:`CHUNK`
images (``parallel=True``; each output column is written by one thread). Conventions shared with
:mod:`treeprobe.zeroshot`:

* arg-max: the *first* candidate of the maximum (as ``np.argmax``);
* "in top-k": fewer than k candidates score strictly higher than the true one (False where the true
  code is −1);
* top-k lists: best first, exact ties in candidate order.

Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["CHUNK", "segment_argmax_hits", "topk_cols", "top_down_cols", "sum_runs", "shifted_clipped"]

#: Images per thread chunk (a row segment of 128 float32 = 512 bytes).
CHUNK = 128


@numba.njit(parallel=True, nogil=True, cache=True)
def segment_argmax_hits(LT, starts, stops, true, k, pred, hit):
    """Per image column i of ``LT`` (W, b) and row segment q = [starts[q], stops[q]): ``pred[i, q]`` =
    arg-max within the segment (segment-relative), ``hit[i, q]`` = the true code ``true[i, q]`` (−1:
    unknown) is in the top k."""
    b = LT.shape[1]
    n_chunks = (b + CHUNK - 1) // CHUNK
    for ch in numba.prange(n_chunks):
        i0 = ch * CHUNK
        i1 = min(b, i0 + CHUNK)
        m = i1 - i0
        best = np.empty(m, dtype=LT.dtype)
        tv = np.empty(m, dtype=LT.dtype)
        arg = np.empty(m, dtype=np.int32)  # 32-bit: twice the lanes of int64 in the vectorised loop
        above = np.empty(m, dtype=np.int32)
        for q in range(len(starts)):
            o0, o1 = starts[q], stops[q]
            for i in range(m):
                t = true[i0 + i, q]
                tv[i] = LT[o0 + t, i0 + i] if t >= 0 else np.inf
                best[i] = LT[o0, i0 + i]
                arg[i] = 0
                above[i] = 0
            for c in range(o0, o1):
                row = LT[c, i0:i1]
                r = np.int32(c - o0)
                for i in range(m):  # branch-free: vectorised across the images
                    v = row[i]
                    gt = v > best[i]
                    best[i] = v if gt else best[i]
                    arg[i] = r if gt else arg[i]
                    above[i] += np.int32(v > tv[i])
            for i in range(m):
                pred[i0 + i, q] = arg[i]
                hit[i0 + i, q] = (true[i0 + i, q] >= 0) and (above[i] < k)


#: Images per chunk of :func:`topk_cols` (narrow: a row rarely beats any of the chunk's thresholds).
TOPK_CHUNK = 32


@numba.njit(parallel=True, nogil=True, cache=True)
def topk_cols(LT, k, out, best):
    """``out[i]`` (k,) = rows of the k largest entries of column i of ``LT`` (T, b), best first, ties in
    row order; ``best[i]`` = the column maximum. Needs 1 <= k <= T."""
    T, b = LT.shape
    n_chunks = (b + TOPK_CHUNK - 1) // TOPK_CHUNK
    for ch in numba.prange(n_chunks):
        i0 = ch * TOPK_CHUNK
        i1 = min(b, i0 + TOPK_CHUNK)
        m = i1 - i0
        vals = np.full((m, k), -np.inf, dtype=LT.dtype)
        idx = np.full((m, k), -1, dtype=np.int64)
        thr = np.full(m, -np.inf, dtype=LT.dtype)  # = vals[:, k - 1]
        for c in range(T):
            row = LT[c, i0:i1]
            any_in = False
            for i in range(m):  # vectorised test first: most rows change no buffer
                any_in |= row[i] > thr[i]
            if not any_in and c >= k:
                continue
            for i in range(m):
                v = row[i]
                if v > thr[i] or idx[i, k - 1] < 0:
                    p = k - 1
                    while p > 0 and (idx[i, p - 1] < 0 or vals[i, p - 1] < v):  # equals keep their place
                        vals[i, p] = vals[i, p - 1]
                        idx[i, p] = idx[i, p - 1]
                        p -= 1
                    vals[i, p] = v
                    idx[i, p] = c
                    thr[i] = vals[i, k - 1]
        for i in range(m):
            for j in range(k):
                out[i0 + i, j] = idx[i, j]
            best[i0 + i] = vals[i, 0]


@numba.njit(parallel=True, nogil=True, cache=True)
def top_down_cols(LT, offsets, first_group, group_rank, group_ptr0, ptr, child, chosen):
    """Top-down choice per image column of ``LT`` (W, b), the logits of all R ranks stacked (rank j in
    rows [offsets[j], offsets[j+1])). ``chosen[i, 0]`` = arg-max at the top rank; at rank j >= 1 the
    candidates are, for each group g in [first_group[j], first_group[j+1]) (anchor rank ``group_rank[g]``,
    in increasing order), the children ``child[ptr[p]:ptr[p+1]]`` (increasing codes) of the taxon u chosen
    at that rank, p = group_ptr0[g] + u; the best candidate (first of equals) or −1 when there is none."""
    b = LT.shape[1]
    R = len(offsets) - 1
    for i in numba.prange(b):
        o0 = offsets[0]
        best = LT[o0, i]
        arg = 0
        for c in range(o0, offsets[1]):
            if LT[c, i] > best:
                best = LT[c, i]
                arg = c - o0
        chosen[i, 0] = arg
        for j in range(1, R):
            oj = offsets[j]
            best = -np.inf
            arg = -1
            for g in range(first_group[j], first_group[j + 1]):
                u = chosen[i, group_rank[g]]
                if u < 0:
                    continue
                p = group_ptr0[g] + u
                for e in range(ptr[p], ptr[p + 1]):
                    t = child[e]
                    v = LT[oj + t, i]
                    if v > best:
                        best = v
                        arg = t
            chosen[i, j] = arg


@numba.njit(parallel=True, nogil=True, cache=True)
def sum_runs(src, run_ptr, run_start, run_stop, out, add):
    """Row u of ``out`` (U, b) = Σ of the rows of ``src`` (n, b) in the runs q = run_ptr[u] … run_ptr[u+1]−1,
    each run the rows [run_start[q], run_stop[q]) (added to ``out`` when ``add``, else written)."""
    U, b = out.shape
    n_chunks = (b + CHUNK - 1) // CHUNK
    for ch in numba.prange(n_chunks):
        i0 = ch * CHUNK
        i1 = min(b, i0 + CHUNK)
        for u in range(U):
            o = out[u, i0:i1]
            if not add:
                o[:] = 0
            for q in range(run_ptr[u], run_ptr[u + 1]):
                for c in range(run_start[q], run_stop[q]):
                    s = src[c, i0:i1]
                    for i in range(i1 - i0):
                        o[i] += s[i]


@numba.njit(parallel=True, nogil=True, cache=True)
def shifted_clipped(LT, col_max, floor, out):
    """``out`` (T, b) = max(LT − col_max[None, :], floor), one pass (the argument of the softmax's exp)."""
    T, b = LT.shape
    for c in numba.prange(T):
        row = LT[c]
        o = out[c]
        for i in range(b):
            v = row[i] - col_max[i]
            o[i] = v if v > floor else floor


@numba.njit(parallel=True, nogil=True, cache=True)
def row_norms_finite(X, norms, finite):
    """One pass over ``X`` (N, D): ``norms[i]`` = the L2 norm of row i (accumulated in float64),
    ``finite[i]`` = every value of row i is finite (norms[i] = 0 where not)."""
    N, D = X.shape
    for i in numba.prange(N):
        row = X[i]
        s = 0.0
        bad = False
        for j in range(D):
            v = np.float64(row[j])
            s += v * v
            bad |= not np.isfinite(v)
        finite[i] = not bad
        norms[i] = 0.0 if bad else np.sqrt(s)
