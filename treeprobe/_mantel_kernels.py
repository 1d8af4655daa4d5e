"""Compiled (numba) inner loops of :mod:`treeprobe.mantel`. Private: import through
``treeprobe.mantel._kernels()``, which falls back to numpy when numba is missing.

All functions release the GIL (``nogil=True``), so :mod:`treeprobe.mantel` runs several
permutations at once on Python threads. They are compiled on first use and cached on disk
(``cache=True``: ``__pycache__`` next to this file, or numba's user cache directory).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["clade_term", "clade_term_noprefetch", "pair_sum", "warm_up"]

# Rows the clade kernel prefetches ahead of the one it adds: a permutation reads rows in random
# order, so each read would otherwise wait for memory; a few rows ahead covers that latency.
_AHEAD = 4
# Bytes per cache line: one prefetch hint per line of a row.
_CACHE_LINE = 64


@intrinsic
def _prefetch_row(typingctx, arr, i, j):
    """Hint the CPU to fetch ``arr[i, j]`` into cache (LLVM ``llvm.prefetch``; no effect on results)."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        a, ii, jj = args
        ary = context.make_array(aty)(context, builder, a)
        ii = context.cast(builder, ii, signature.args[1], types.intp)
        jj = context.cast(builder, jj, signature.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [ii, jj], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        name = "llvm.prefetch.p0" if getattr(i8p, "is_opaque", True) else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        i32 = ir.IntType(32)
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _make_clade_term(prefetch: bool, cache: bool):
    @njit(nogil=True, cache=cache, fastmath={"reassoc", "contract"})
    def clade_term(X, scale, q, perm, order, node_start, depth, w, stack, qstack, dirty):
        """Σ_C w_C (S_C·S − ‖S_C‖²) over the non-root nodes C of a compressed tree.

        Nodes are numbered in post-order (every subtree is a contiguous range that ends with its
        root; the tree's root is last and has depth 0), so the open partial sums form one path:
        ``stack[d]`` (float64, (max depth + 1, D)) holds the sum of the node being completed at
        depth d, and a finished node adds it into ``stack[d − 1]``, its parent's (``dirty[d]``:
        stack[d] holds something). Item slot ``order[k]`` (k = 0..N−1) holds embedding row
        ``perm[order[k]]``; the slots of node v are ``order[node_start[v]:node_start[v + 1]]``.
        Row j enters as scale[j]·X[j]; S_C·S is accumulated from q[j] = x̂_j·S. The last row of a
        node is added in the same sweep that finishes the node (its norm, the add to the parent).
        Reassociation (fastmath) only reorders the float64 sums of squares.

        The prefetch of the row ``ahead`` slots on is written out twice (in the loop and for the
        last row) on purpose: moving it into a helper, even an inlined one, measured 20-30 %
        slower per permutation (N = 200,000, D = 128).
        """
        m = depth.shape[0]
        D = X.shape[1]
        N = order.shape[0]
        step = max(1, _CACHE_LINE // X.itemsize)
        ahead = _AHEAD
        stack[:, :] = 0.0
        qstack[:] = 0.0
        dirty[:] = False
        total = 0.0
        for v in range(m):
            dv = depth[v]
            if dv == 0:
                break  # the root (last): S_root = S, its term is 0; its own items are not needed
            acc = stack[dv]
            up = stack[dv - 1]
            k0 = node_start[v]
            k1 = node_start[v + 1]
            qa = qstack[dv]
            for k in range(k0, k1 - 1):  # all rows but the last into the open sum
                if prefetch and k + ahead < N:
                    jn = perm[order[k + ahead]]
                    for c in range(0, D, step):
                        _prefetch_row(X, jn, c)
                j = perm[order[k]]
                f = scale[j]
                row = X[j]
                for d in range(D):
                    acc[d] += row[d] * f
                qa += q[j]
                dirty[dv] = True
            nn = 0.0
            if k1 > k0:
                k = k1 - 1
                if prefetch and k + ahead < N:
                    jn = perm[order[k + ahead]]
                    for c in range(0, D, step):
                        _prefetch_row(X, jn, c)
                j = perm[order[k]]
                f = scale[j]
                row = X[j]
                qa += q[j]
                if dirty[dv]:
                    for d in range(D):
                        x = acc[d] + row[d] * f
                        nn += x * x
                        up[d] += x
                        acc[d] = 0.0
                else:  # a single row and nothing below: the open sum was never touched
                    for d in range(D):
                        x = row[d] * f
                        nn += x * x
                        up[d] += x
            else:
                for d in range(D):
                    x = acc[d]
                    nn += x * x
                    up[d] += x
                    acc[d] = 0.0
            dirty[dv] = False
            dirty[dv - 1] = True
            qstack[dv] = 0.0
            qstack[dv - 1] += qa
            total += w[v] * (qa - nn)
        return total

    return clade_term


clade_term = _make_clade_term(True, cache=True)  # the kernel in use (cached on disk)


def clade_term_noprefetch():
    """The same kernel without the prefetch hint (for an llvmlite that cannot build it); not cached."""
    return _make_clade_term(False, cache=False)


@njit(nogil=True, cache=True)
def pair_sum(Xsq, ys, perm):
    """Σ_{i<j} Xsq[perm[i], perm[j]] · ys[k(i, j)], ys condensed (row-major upper triangle)."""
    n = perm.shape[0]
    total = 0.0
    k = 0
    for i in range(n - 1):
        row = Xsq[perm[i]]
        s = 0.0
        for j in range(i + 1, n):
            s += row[perm[j]] * ys[k]
            k += 1
        total += s
    return total


def warm_up() -> None:
    """Compile (or load from cache) the common specialisations (float32 and float64 rows)."""
    m, n = 3, 4
    for dt in (np.float32, np.float64):
        X = np.ones((n, 2), dtype=dt)
        clade_term(X, np.ones(n), np.ones(n), np.arange(n), np.arange(n), np.array([0, 2, 4, 4]),
                   np.array([1, 1, 0]), np.ones(m), np.zeros((2, 2)), np.zeros(2), np.zeros(2, dtype=np.bool_))
