"""Multivariate phylogenetic signal K_mult (Adams 2014) of species centroids on a tree, without any S×S matrix.

K_mult generalises Blomberg's K (Blomberg, Garland & Ives 2003) to D-dimensional traits (Adams 2014,
*Syst. Biol.* 63:685; geomorph's ``physignal``). For S species with traits Y (S, D) on a tree with
Brownian covariance C (C_ij = length of the path the root-to-tip paths of i and j share):

    a    = (1ᵀC⁻¹1)⁻¹ 1ᵀC⁻¹Y                       the GLS (phylogenetic) mean, a row of D numbers
    MSE0 = tr((Y − 1a)ᵀ(Y − 1a)) / (S − 1)           spread around it, ignoring the tree
    MSE  = tr((Y − 1a)ᵀ C⁻¹ (Y − 1a)) / (S − 1)      spread in the tree's metric
    E    = (tr C − S / 1ᵀC⁻¹1) / (S − 1)            E[MSE0] / E[MSE] under Brownian motion
    K    = (MSE0 / MSE) / E

K ≈ 1 for Brownian motion along the tree (with any rate matrix), K < 1 when close relatives are less
alike than that, K > 1 when they are more alike. For traits with no tree structure (iid rows) the ratio
of expectations gives K ≈ (S − 2 + S·wᵀw) / ((tr C⁻¹ − s·wᵀw)·E), with s = 1ᵀC⁻¹1 and w = C⁻¹1/s the
GLS weights (about 0.25 on the simulated rank trees). For D = 1, K is Blomberg's K (phytools
``phylosig(method="K")``).

**How it is computed.** One pruning pass over the tree (Felsenstein's independent contrasts,
generalised to polytomies): every node k gets the weighted mean x_k = Σ_c x_c/v_c / Σ_c 1/v_c of its
children c (v_c = branch length of c + δ_c, δ_k = 1/Σ_c 1/v_c, δ = 0 at a tip). Then
1ᵀC⁻¹1 = 1/δ_root, a = x_root and

    tr((Y − 1a)ᵀ C⁻¹ (Y − 1a)) = Σ_k Σ_c ‖x_c − x_k‖² / v_c     (k over internal nodes),

the quadratic-form identity of the contrasts (Felsenstein 1985; Ho & Ané 2014 for the general
linear-time form). Cost O(nodes·D) per evaluation, memory O(depth·D); permutations run the same pass
(a compiled kernel; numpy fallback with the same numbers) on the permuted rows.

**Invariances.** K does not change under rotation, scaling or translation of Y, relabelling of the
tips (rows moved with their tips), or the length of the stem above the most recent common ancestor of
the species (C + l·11ᵀ gives the same a, MSE and E: proved by Sherman-Morrison), so unary nodes and the
stem are dropped.

**Zero-length branches.** Internal ones are exact. A tip with a zero-length terminal branch (or a
clade of zero variance) pins its parent's estimate to its value: the limit of C⁻¹ as the branch → 0,
exact while C is non-singular. Two such children of one node make C singular and raise
:class:`~treeprobe.errors.TreeprobeError` (pass ``min_terminal_length`` to :func:`phylo_tree`).
The rank taxonomy with positive rank lengths has none.

**Permutations** (geomorph's scheme): the rows of Y (species) are permuted freely among the tips;
permutation b is the b-th ``rng.permutation(S)`` of ``np.random.default_rng(seed)``, row
``perm[i]`` going to tip i. p = (1 + #{K_perm ≥ K}) / (1 + B), a K_perm within :data:`TIE_TOLERANCE`
(relative) below K counting as a tie. **Effect size** z: geomorph's
``physignal`` reports none (its ``physignal.z`` is a different statistic: the standardised
log-likelihood of a Pagel-λ-optimised multivariate Brownian model, after a Box-Cox transform); here
z = (log K − mean L) / sd L over the B + 1 values L = {log K, log K_perm} (observed included,
population sd), geomorph's ``effect.size`` convention with the log transform Adams & Collyer use for
ratio statistics.

**Per principal axis.** The PCA of the centroids (centred on their plain mean): for each of the
first n axes its share of the variance, K of that axis alone (Blomberg's K of the scores, with a
p-value and z from the same permutations, not adjusted for multiple axes), and K of axes 1..j
together (geomorph's ``K.by.p``, there on phylogenetically aligned components). K of all axes is K.
The PCA does not depend on the row order, so permuting the scores is permuting Y, and each axis'
p-value is a valid test. But the leading axes are chosen for their variance, which Brownian motion
puts into the deepest splits: under Brownian motion their K is far above 1 (K ≈ 100 on the first axis
at 10,000 species); compare axes with one another, not with 1.

A three-species tree ((a:1, b:1):1, c:2), one trait:

>>> from treeprobe.tree import CladeStructure
>>> cs = CladeStructure(parent=np.array([-1, 0, 1, 1, 0]), length=np.array([0, 1.0, 1, 1, 2]),
...                     item_node=np.array([2, 3, 4]), names=np.array(["", "x", "a", "b", "c"], dtype=object))
>>> round(kmult(np.array([[0.0], [1.0], [3.0]]), cs), 6)
1.234375
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from treeprobe._utils import available_cpus, numba_enabled
from treeprobe._validation import check_choice, check_embeddings, check_int
from treeprobe.errors import TreeprobeError
from treeprobe.permutation import TIP_SCHEMES
from treeprobe.tree import CladeStructure

__all__ = ["PhyloTree", "KmultResult", "PERMUTED_TIPS", "PERMUTED_TIPS_BY_SIZE", "PHYSIGNAL_SCHEMES", "TIE_TOLERANCE", "phylo_tree", "kmult", "kmult_test",
           "physignal"]

#: ``KmultResult.permuted``: what the p-value permutes.
PERMUTED_TIPS = ("species (rows of Y) permuted freely among the tips of the tree (geomorph's physignal scheme; "
                 "numbers of images per species ignored)")
#: What the size-stratified permutations of :func:`physignal` move (the default on a TreeData): a species'
#: centroid is as precise as its number of images, so centroids are exchangeable only at equal size.
#: The permutation schemes of :func:`physignal` (:data:`treeprobe.permutation.TIP_SCHEMES`).
PHYSIGNAL_SCHEMES = TIP_SCHEMES
PERMUTED_TIPS_BY_SIZE = ("species centroids permuted among the tips of the tree within strata of equal image count "
                         "(species of n images only swap with species of n images; as the centroid Mantel test)")

#: A permuted K within this relative distance below K counts as a tie (≥ K): a permutation that maps the tree
#: onto itself (sister tips of equal branch lengths swapped) gives the same K up to float rounding (~1e-15).
TIE_TOLERANCE = 1e-9

# Permutations handed to a thread at once: each is a full pass over the tree (≥ ~1 ms at S·D ≥ 1e5).
_CHUNK = 8


# --- the tree, prepared once ----------------------------------------------------------------------


@dataclass(kw_only=True, eq=False)
class PhyloTree:
    """The tree reduced to what K_mult sees, with the weights of the pruning pass (build with :func:`phylo_tree`).

    Nodes 0..m−1 in post-order (children before parents, the root — the species' most recent common
    ancestor — last; the first child of a node is the one with zero variance if it has one), every
    internal node with ≥ 2 children. Per node v: ``depth`` (int64, root 0), ``tip`` (row of Y at a tip,
    −1 inside), ``coef`` (weight of x_v in its parent's mean), ``invv`` (1/v_v; 0 for a pinning child),
    ``first`` (v is its parent's first child), ``dinv`` (internal nodes: Σ_c 1/v_c, 0 when pinned),
    ``parent`` (−1 at the root) and ``length`` (branch above v: sums over merged unary chains).
    ``trace_c``: tr C; ``delta_root``: 1/(1ᵀC⁻¹1) (0 when a tip sits at the root); ``expected``: E.
    """

    n_tips: int
    parent: np.ndarray
    length: np.ndarray
    depth: np.ndarray
    tip: np.ndarray
    coef: np.ndarray
    invv: np.ndarray
    first: np.ndarray
    dinv: np.ndarray
    trace_c: float
    delta_root: float
    expected: float

    @property
    def n_nodes(self) -> int:
        """Nodes of the reduced tree (tips included)."""
        return len(self.parent)

    @functools.cached_property
    def tip_seq(self) -> np.ndarray:
        """Row index of the tips in post-order, int64 (S,)."""
        t = self.tip[self.tip >= 0]
        return np.ascontiguousarray(t)

    @property
    def max_depth(self) -> int:
        """Edges from the root to the deepest tip."""
        return int(self.depth.max())

    def gls_weights(self) -> np.ndarray:
        """Weights w (float64 (S,), summing to 1) of the GLS mean a = wᵀY: w = C⁻¹1 / 1ᵀC⁻¹1."""
        g = np.ones(self.n_nodes)
        for v in range(self.n_nodes - 2, -1, -1):  # parents come after their children: walk down
            g[v] = g[self.parent[v]] * self.coef[v]
        w = np.zeros(self.n_tips)
        is_tip = self.tip >= 0
        w[self.tip[is_tip]] = g[is_tip]
        return w


def _check_tree_arrays(parent, length, tips) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parent = np.asarray(parent, dtype=np.int64)
    length = np.asarray(length, dtype=np.float64)
    tips = np.asarray(tips, dtype=np.int64)
    n = len(parent)
    if parent.ndim != 1 or length.shape != parent.shape or tips.ndim != 1:
        raise TreeprobeError(f"parent and length must be 1-D of one length, tips 1-D; got shapes "
                             f"{parent.shape}, {length.shape}, {tips.shape}")
    if n == 0 or parent[0] != -1 or (parent[1:] < 0).any() or (parent[1:] >= np.arange(1, n)).any():
        raise TreeprobeError("tree nodes must be numbered so that parent[v] < v (root 0, parent −1)")
    if not np.isfinite(length).all() or (length[1:] < 0).any():
        raise TreeprobeError("branch lengths must be finite and non-negative")
    if len(tips) < 3:
        raise TreeprobeError(f"K_mult needs at least 3 species on the tree; got {len(tips)}")
    if tips.min() < 0 or tips.max() >= n:
        raise TreeprobeError(f"tip nodes must be in 0..{n - 1}")
    if len(np.unique(tips)) != len(tips):
        raise TreeprobeError("two species sit at the same node: C is singular (merge them or give each its own leaf)")
    return parent, length, tips


def _singular(node_name: str) -> TreeprobeError:
    return TreeprobeError(f"two species (or clades) hang at zero distance from {node_name}: the Brownian covariance "
                          "C is singular; lengthen zero terminal branches with phylo_tree(..., min_terminal_length=ε)")


def phylo_tree(parent, length, tips, *, min_terminal_length: float = 0.0) -> PhyloTree:
    """The reduced tree over the species of a tree given as arrays, for :func:`kmult` / :func:`kmult_test`.

    parent: int (n_nodes,), parent[v] < v, −1 at the root (node 0) — the :class:`~treeprobe.tree.CladeStructure`
    convention; length: float (n_nodes,), branch above each node (≥ 0; the root's is ignored); tips: int (S,),
    the node of each species (row i of Y sits at node tips[i]; distinct; a tip may be an internal node, a
    sampled ancestor). Polytomies, unary nodes and nodes without species are allowed; a terminal branch
    shorter than ``min_terminal_length`` is lengthened to it. O(n_nodes) Python work.
    """
    parent, length, tips = _check_tree_arrays(parent, length, tips)
    if not (min_terminal_length >= 0 and math.isfinite(min_terminal_length)):
        raise TreeprobeError(f"min_terminal_length must be finite and >= 0; got {min_terminal_length}")
    n, S = len(parent), len(tips)
    par = parent.tolist()
    below = np.bincount(tips, minlength=n).tolist()
    for v in range(n - 1, 0, -1):
        below[par[v]] += below[v]
    if below[0] != S:  # pragma: no cover - guaranteed by the checks
        raise TreeprobeError("tips are not all below the root")
    kept = [b > 0 for b in below]
    kids = [0] * n  # kept children per node
    for v in range(1, n):
        if kept[v]:
            kids[par[v]] += 1
    # a species at a node with kept children (a sampled ancestor) gets a zero-length leaf of its own
    par_x, len_x = list(par), length.tolist()
    tip_node = tips.tolist()
    for i, t in enumerate(tip_node):
        if kids[t] > 0:
            par_x.append(t)
            len_x.append(0.0)
            kept.append(True)
            kids.append(0)
            kids[t] += 1
            tip_node[i] = len(par_x) - 1
    nx = len(par_x)
    tip_of = [-1] * nx
    for i, t in enumerate(tip_node):
        tip_of[t] = i
    important = [kept[v] and (tip_of[v] >= 0 or kids[v] >= 2) for v in range(nx)]
    # merge unary chains: every important node hangs from its nearest important ancestor
    anc = [-1] * nx
    acc = [0.0] * nx
    for v in range(1, nx):
        if not kept[v]:
            continue
        p = par_x[v]
        if important[p]:
            anc[v], acc[v] = p, len_x[v]
        else:
            anc[v], acc[v] = anc[p], acc[p] + len_x[v]
    keep_ids = [v for v in range(nx) if important[v]]  # ascending: parents before children
    new_id = {v: k for k, v in enumerate(keep_ids)}
    m = len(keep_ids)
    cpar = [new_id[anc[v]] if anc[v] >= 0 else -1 for v in keep_ids]
    clen = [acc[v] if anc[v] >= 0 else 0.0 for v in keep_ids]  # the stem above the MRCA is dropped
    ctip = [tip_of[v] for v in keep_ids]
    if sum(p < 0 for p in cpar) != 1:  # pragma: no cover - one MRCA by construction
        raise TreeprobeError("the species do not form one tree")
    for k in range(m):
        if ctip[k] >= 0 and clen[k] < min_terminal_length:
            clen[k] = float(min_terminal_length)

    def name(k):
        v = keep_ids[k]
        return f"node {v}" if v < n else f"the node of species {tip_node.index(v)}"

    # bottom-up: δ (variance of each node's estimate), the pinning child if any
    W = [0.0] * m
    nzero = [0] * m
    zchild = [-1] * m
    delta = [0.0] * m
    v_of = [0.0] * m
    for k in range(m - 1, -1, -1):  # children (larger ids) first
        if ctip[k] < 0:
            if nzero[k] >= 2:
                raise _singular(name(k))
            delta[k] = 0.0 if nzero[k] == 1 else 1.0 / W[k]
        vk = clen[k] + delta[k]
        v_of[k] = vk
        p = cpar[k]
        if p < 0:
            continue
        inv = 1.0 / vk if vk > 0 else math.inf
        if math.isinf(inv):
            nzero[p] += 1
            zchild[p] = k
        else:
            W[p] += inv
    root = cpar.index(-1)
    if root != 0:  # pragma: no cover - pre-order ids: the MRCA is the smallest
        raise TreeprobeError("internal error: MRCA is not the first kept node")
    # children lists, the pinning child first; post-order numbering by an explicit stack
    children: list[list[int]] = [[] for _ in range(m)]
    for k in range(1, m):
        children[cpar[k]].append(k)
    for k in range(m):
        z = zchild[k]
        if z >= 0 and children[k][0] != z:
            children[k].remove(z)
            children[k].insert(0, z)
    post: list[int] = []
    dep = [0] * m
    stack = [(0, 0)]
    while stack:
        k, i = stack.pop()
        if i < len(children[k]):
            stack.append((k, i + 1))
            c = children[k][i]
            dep[c] = dep[k] + 1
            stack.append((c, 0))
        else:
            post.append(k)
    pos = np.empty(m, dtype=np.int64)
    pos[np.asarray(post)] = np.arange(m)
    post_a = np.asarray(post, dtype=np.int64)
    coef = np.zeros(m)
    invv = np.zeros(m)
    first = np.zeros(m, dtype=np.bool_)
    dinv = np.zeros(m)
    for k in range(m):
        p = cpar[k]
        if ctip[k] < 0:
            dinv[k] = W[k] if nzero[k] == 0 else 0.0
        if p < 0:
            continue
        first[k] = children[p][0] == k
        if nzero[p]:
            coef[k] = 1.0 if zchild[p] == k else 0.0
            invv[k] = 0.0 if zchild[p] == k else 1.0 / v_of[k]
        else:
            invv[k] = 1.0 / v_of[k]
            coef[k] = invv[k] * delta[p]
    # tr C = Σ_tips (distance from the MRCA)
    rd = [0.0] * m
    for k in range(1, m):
        rd[k] = rd[cpar[k]] + clen[k]
    trace_c = float(sum(rd[k] for k in range(m) if ctip[k] >= 0))
    delta_root = float(delta[0])
    expected = (trace_c - S * delta_root) / (S - 1)
    if not expected > 0:
        raise TreeprobeError("the tree has no length between the species: K_mult is undefined")
    cpar_a = np.asarray(cpar, dtype=np.int64)
    new_parent = np.where(cpar_a[post_a] >= 0, pos[np.maximum(cpar_a[post_a], 0)], -1)
    return PhyloTree(
        n_tips=S, parent=new_parent.astype(np.int64), length=np.asarray(clen)[post_a],
        depth=np.asarray(dep, dtype=np.int64)[post_a], tip=np.asarray(ctip, dtype=np.int64)[post_a],
        coef=coef[post_a], invv=invv[post_a], first=first[post_a], dinv=dinv[post_a],
        trace_c=trace_c, delta_root=delta_root, expected=float(expected),
    )


def _as_tree(tree) -> PhyloTree:
    if isinstance(tree, PhyloTree):
        return tree
    if isinstance(tree, CladeStructure):
        return phylo_tree(tree.parent, tree.length, tree.item_node)
    raise TreeprobeError(f"tree must be a treeprobe CladeStructure or a PhyloTree (phylo_tree(...)); "
                         f"got {type(tree).__name__}")


# --- the pruning pass: numba kernel and numpy fallback -------------------------------------------


# Tips ahead whose data row the kernel asks the CPU to fetch: the rows of a permutation are read in random order.
_AHEAD = 4
# Bytes per cache line: one prefetch hint per line of a row.
_CACHE_LINE = 64
# The prefetch intrinsic of treeprobe._mantel_kernels, set when the kernel is first built (a module global,
# not a closure variable, so that numba's disk cache recognises the kernel in the next process).
_prefetch_row = None


def _make_kernel(per_column: bool, prefetch: bool):
    global _prefetch_row
    from numba import njit

    if prefetch:
        from treeprobe._mantel_kernels import _prefetch_row as hint
    else:  # pragma: no cover - only for an llvmlite that cannot build the intrinsic
        @njit(inline="always")
        def hint(arr, i, j):
            pass
    _prefetch_row = hint

    @njit(nogil=True, cache=prefetch, fastmath={"reassoc", "contract"})
    def prune(Y, perms, tip, tip_seq, depth, coef, invv, first, dinv, ref, acc, sq, Q, A):
        """For each permutation b (row perms[b, t] of Y at tip t): Q[b] = Σ_k Σ_c ‖x_c − x_k‖²/v_c
        (per column when ``per_column``: Q[b, d]) and A[b] = x_root, the GLS mean.

        Nodes in post-order: the open nodes form one root-to-current path, one per depth. Slot d holds
        the node being built at depth d relative to its first child's value ref[d]:
        acc[d] = Σ_c coef_c (x_c − ref[d]) = x_k − ref[d] and sq[d] = Σ_c (x_c − ref[d])²/v_c, so
        Σ_c ‖x_c − x_k‖²/v_c = sq[d] − (Σ_c 1/v_c)·‖acc[d]‖², with no cancellation on a clade far from 0.
        A finished node goes into its parent's slot in the same sweep. ``tip_seq``: the tips in
        post-order, for the prefetch of the row ``ahead`` tips on.
        """
        m = depth.shape[0]
        D = Y.shape[1]
        S = tip_seq.shape[0]
        step = max(1, _CACHE_LINE // Y.itemsize)
        ahead = _AHEAD
        for b in range(perms.shape[0]):  # rows indexed in place (no row views: no reference counting per node)
            if per_column:
                for d in range(D):
                    Q[b, d] = 0.0
            total = 0.0
            ti = 0
            if prefetch:
                for j in range(min(ahead, S)):
                    row = perms[b, tip_seq[j]]
                    for c0 in range(0, D, step):
                        _prefetch_row(Y, row, c0)
            for v in range(m):
                dv = depth[v]
                t = tip[v]
                p = dv - 1
                if t >= 0:  # a tip: its data row into the parent's slot (a tip is never the root)
                    if prefetch and ti + ahead < S:
                        row = perms[b, tip_seq[ti + ahead]]
                        for c0 in range(0, D, step):
                            _prefetch_row(Y, row, c0)
                    ti += 1
                    j = perms[b, t]
                    if first[v]:
                        for d in range(D):
                            ref[p, d] = Y[j, d]
                    else:
                        c = coef[v]
                        iv = invv[v]
                        if per_column:
                            for d in range(D):
                                df = Y[j, d] - ref[p, d]
                                acc[p, d] += c * df
                                sq[p, d] += iv * df * df
                        else:
                            s2 = 0.0
                            for d in range(D):
                                df = Y[j, d] - ref[p, d]
                                acc[p, d] += c * df
                                s2 += df * df
                            sq[p, 0] += iv * s2
                    continue
                # an internal node: x = ref + acc; its term; then into the parent's slot
                w = dinv[v]
                if dv == 0:
                    nn = 0.0
                    for d in range(D):
                        ad = acc[0, d]
                        if per_column:
                            Q[b, d] += sq[0, d] - w * ad * ad
                        nn += ad * ad
                        A[b, d] = ref[0, d] + ad
                    if not per_column:
                        total += sq[0, 0] - w * nn
                    break
                if per_column:
                    if first[v]:
                        for d in range(D):
                            ad = acc[dv, d]
                            Q[b, d] += sq[dv, d] - w * ad * ad
                            ref[p, d] = ref[dv, d] + ad
                            acc[dv, d] = 0.0
                            sq[dv, d] = 0.0
                    else:
                        c = coef[v]
                        iv = invv[v]
                        for d in range(D):
                            ad = acc[dv, d]
                            Q[b, d] += sq[dv, d] - w * ad * ad
                            df = ref[dv, d] + ad - ref[p, d]
                            acc[p, d] += c * df
                            sq[p, d] += iv * df * df
                            acc[dv, d] = 0.0
                            sq[dv, d] = 0.0
                else:
                    nn = 0.0
                    if first[v]:
                        for d in range(D):
                            ad = acc[dv, d]
                            nn += ad * ad
                            ref[p, d] = ref[dv, d] + ad
                            acc[dv, d] = 0.0
                    else:
                        c = coef[v]
                        s2 = 0.0
                        for d in range(D):
                            ad = acc[dv, d]
                            nn += ad * ad
                            df = ref[dv, d] + ad - ref[p, d]
                            acc[p, d] += c * df
                            s2 += df * df
                            acc[dv, d] = 0.0
                        sq[p, 0] += invv[v] * s2
                    total += sq[dv, 0] - w * nn
                    sq[dv, 0] = 0.0
            if not per_column:
                Q[b, 0] = total
            for e in range(D):  # every other slot was cleared when its node was finished
                acc[0, e] = 0.0
            for e in range(sq.shape[1]):
                sq[0, e] = 0.0

    return prune


@functools.lru_cache(maxsize=None)
def _load_kernel(per_column: bool):
    """The compiled pass (compiled, or loaded from the disk cache, once), or None when numba fails."""
    tr = phylo_tree([-1, 0, 0, 0], [0.0, 1.0, 1.0, 1.0], [1, 2, 3])
    for prefetch in (True, False):  # the prefetch hint is an LLVM intrinsic: plain loop if it fails to build
        try:
            k = _make_kernel(per_column, prefetch)
            _run_kernel(k, np.zeros((3, 1)), tr, np.arange(3)[None, :], per_column)
            return k
        except Exception:  # pragma: no cover - numba missing or broken, or an llvmlite without the intrinsic
            continue
    return None  # pragma: no cover


def _kernel(per_column: bool):
    return _load_kernel(per_column) if numba_enabled() else None


def _run_kernel(k, Y, tree: PhyloTree, perms, per_column: bool):
    B, D = perms.shape[0], Y.shape[1]
    L = tree.max_depth + 1
    ref = np.zeros((L, D))
    acc = np.zeros((L, D))
    sq = np.zeros((L, D if per_column else 1))
    Q = np.zeros((B, D if per_column else 1))
    A = np.zeros((B, D))
    k(Y, perms, tree.tip, tree.tip_seq, tree.depth, tree.coef, tree.invv, tree.first, tree.dinv, ref, acc, sq, Q, A)
    return (Q if per_column else Q[:, 0]), A


@functools.lru_cache(maxsize=8)
def _levels(tree: PhyloTree):
    """Per depth d ≥ 1 (deepest first): (nodes at depth d ascending, segment starts, their parents)."""
    out = []
    order = np.argsort(tree.depth, kind="stable")
    bounds = np.cumsum(np.bincount(tree.depth))
    for d in range(tree.max_depth, 0, -1):
        nodes = order[bounds[d - 1]:bounds[d]]
        par = tree.parent[nodes]
        starts = np.flatnonzero(np.r_[True, par[1:] != par[:-1]])
        out.append((nodes, starts, par[starts]))
    return out


def _prune_numpy(Y, tree: PhyloTree, perms, per_column: bool):
    """The pass of the kernel in numpy, level by level, with the plain difference form of each term."""
    m, D = tree.n_nodes, Y.shape[1]
    is_tip = np.flatnonzero(tree.tip >= 0)
    nonroot = np.flatnonzero(tree.parent >= 0)
    lv = _levels(tree)
    Q = np.zeros((len(perms), D)) if per_column else np.zeros(len(perms))
    A = np.zeros((len(perms), D))
    for b, perm in enumerate(perms):
        X = np.zeros((m, D))
        X[is_tip] = Y[perm[tree.tip[is_tip]]]
        for nodes, starts, parents in lv:
            X[parents] = np.add.reduceat(tree.coef[nodes, None] * X[nodes], starts, axis=0)
        diff = X[nonroot] - X[tree.parent[nonroot]]
        terms = tree.invv[nonroot, None] * diff * diff
        Q[b] = terms.sum(axis=0) if per_column else terms.sum()
        A[b] = X[m - 1]
    return Q, A


def _prune(Y, tree: PhyloTree, perms, per_column: bool = False):
    k = _kernel(per_column)
    if k is None:
        return _prune_numpy(Y, tree, perms, per_column)
    return _run_kernel(k, Y, tree, perms, per_column)


# --- the statistic ---------------------------------------------------------------------------------


def _centred(Y) -> tuple[np.ndarray, np.ndarray]:
    """(Y − column mean as C-contiguous float64, Σ_i (y_i − ȳ)² per column)."""
    Y = check_embeddings(Y, "Y")
    if not np.isfinite(Y).all():
        raise TreeprobeError("Y has non-finite values")
    Yc = np.ascontiguousarray(Y, dtype=np.float64)
    Yc = Yc - Yc.mean(axis=0)
    return Yc, np.einsum("ij,ij->j", Yc, Yc)


def _k_values(T, Q, A, S: int, expected: float, *, per_column: bool = False):
    """K from the spread T = Σ_i (y_i − ȳ)² (summed over columns, or per column), the quadratic forms Q
    and the GLS means A (of the centred data): MSE0·(S − 1) = T + S·‖a‖² (per column: T_j + S·a_j²)."""
    mse0 = T + S * (A * A if per_column else (A * A).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return mse0 / Q / expected


def kmult(Y, tree) -> float:
    """K_mult of traits Y (float (S, D): row i = species at tip i) on ``tree``.

    tree: a :class:`~treeprobe.tree.CladeStructure` (species = its items, at ``item_node``) or a
    :class:`PhyloTree`. O(nodes·D); no S×S matrix. NaN if Y has no variation.
    """
    tr = _as_tree(tree)
    Yc, T = _centred(Y)
    if Yc.shape[0] != tr.n_tips:
        raise TreeprobeError(f"Y has {Yc.shape[0]} rows but the tree has {tr.n_tips} species")
    Q, A = _prune(Yc, tr, np.arange(tr.n_tips, dtype=np.int64)[None, :])
    return float(_k_values(T.sum(), Q[0], A[0], tr.n_tips, tr.expected))


def _effect_size(k_obs: float, k_perm: np.ndarray) -> float:
    """(log K − mean L) / sd L over L = log of [K, *K_perm] (population sd); NaN without permutations."""
    if k_perm.size == 0 or not np.isfinite(k_obs) or k_obs <= 0:
        return float("nan")
    L = np.log(np.concatenate([[k_obs], k_perm]))
    sd = L.std()
    return float((L[0] - L.mean()) / sd) if sd > 0 else 0.0


def _p_value(k_obs: float, k_perm: np.ndarray) -> float:
    """(1 + #{K_perm ≥ K·(1 − tie tolerance)}) / (1 + B); NaN without permutations."""
    if k_perm.size == 0 or not np.isfinite(k_obs):
        return float("nan")
    return float((1 + np.sum(k_perm >= k_obs * (1 - TIE_TOLERANCE))) / (1 + k_perm.size))


@dataclass(kw_only=True)
class KmultResult:
    """Outcome of :func:`kmult_test` / :func:`physignal`.

    statistic: K_mult; p_value: (1 + #{K_perm ≥ K}) / (1 + permutations) (NaN without permutations);
    z: effect size (log K standardised in the permutation distribution; see the module docstring);
    mse0, mse, expected: the parts, K = (mse0/mse)/expected; n_species (S), n_dims (D);
    per_axis: DataFrame, one row per principal axis (``axis``, ``variance_share``, ``K``, ``p_value``, ``z``,
    ``K_cumulative``: axes 1..axis together); permuted: what the p-value permutes;
    random_statistics: the K of each permutation (permutations,); details: tree and data notes.
    """

    statistic: float
    p_value: float
    z: float
    permutations: int
    n_species: int
    n_dims: int
    mse0: float
    mse: float
    expected: float
    per_axis: pd.DataFrame
    permuted: str = PERMUTED_TIPS
    alternative: str = "greater"
    random_statistics: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict: the numbers, ``per_axis`` as a list of records, no permutation values."""
        out = {k: getattr(self, k) for k in ("statistic", "p_value", "z", "permutations", "n_species", "n_dims",
                                             "mse0", "mse", "expected", "permuted", "alternative")}
        out["per_axis"] = self.per_axis.to_dict(orient="records")
        out["details"] = dict(self.details)
        return out


def _pca_scores(Yc: np.ndarray, n_axes: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (S, n) on the first n principal axes of the centred Yc, variance share of each)."""
    S, D = Yc.shape
    total = float(np.einsum("ij,ij->", Yc, Yc))
    if D <= S:
        evals, vecs = np.linalg.eigh(Yc.T @ Yc)
        idx = np.argsort(evals)[::-1][:n_axes]
        V = vecs[:, idx]
        scores = Yc @ V
    else:  # fewer species than dimensions: the S×S Gram is smaller
        evals, U = np.linalg.eigh(Yc @ Yc.T)
        idx = np.argsort(evals)[::-1][:n_axes]
        scores = U[:, idx] * np.sqrt(np.maximum(evals[idx], 0.0))
    # sign: largest |score| positive, so the table does not depend on the eigen solver
    big = np.abs(scores).argmax(axis=0)
    scores = scores * np.where(scores[big, np.arange(scores.shape[1])] < 0, -1.0, 1.0)
    share = np.einsum("ij,ij->j", scores, scores) / total if total > 0 else np.zeros(scores.shape[1])
    return np.ascontiguousarray(scores), share


def _draw(rng: np.random.Generator, S: int, B: int, sampler=None) -> np.ndarray:
    """B permutations of S tips (B, S): ``rng.permutation(S)`` each, or ``sampler(rng)`` (size strata)."""
    if not B:
        return np.zeros((0, S), dtype=np.int64)
    return np.stack([rng.permutation(S) if sampler is None else sampler(rng) for _ in range(B)])


def _permuted_sums(Yc, Z, tr: PhyloTree, permutations: int, rng, n_jobs, progress: bool, sampler=None):
    """Q and GLS means of every permutation for Yc (summed) and Z (per column), drawn in order from rng."""
    from tqdm.auto import tqdm

    S = tr.n_tips
    B = permutations
    Qy, Ay = np.zeros(B), np.zeros((B, Yc.shape[1]))
    Qz, Az = np.zeros((B, Z.shape[1])), np.zeros((B, Z.shape[1]))
    workers = available_cpus() if n_jobs is None or n_jobs <= 0 else int(n_jobs)
    workers = max(1, min(workers, -(-B // _CHUNK))) if B else 1

    def run(lo, perms):
        q, a = _prune(Yc, tr, perms)
        Qy[lo:lo + len(perms)], Ay[lo:lo + len(perms)] = q, a
        if Z.shape[1]:
            q, a = _prune(Z, tr, perms, per_column=True)
            Qz[lo:lo + len(perms)], Az[lo:lo + len(perms)] = q, a
        return len(perms)

    bar = tqdm(total=B, desc="K_mult permutations", disable=not progress, leave=False)
    try:
        if workers == 1:
            for lo in range(0, B, _CHUNK):
                run(lo, _draw(rng, S, min(_CHUNK, B - lo), sampler))
                bar.update(min(_CHUNK, B - lo))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as ex:
                lo = 0
                while lo < B:  # one round: `workers` chunks drawn in order here, run at once
                    jobs = []
                    for _ in range(workers):
                        if lo >= B:
                            break
                        n = min(_CHUNK, B - lo)
                        jobs.append(ex.submit(run, lo, _draw(rng, S, n, sampler)))
                        lo += n
                    for j in jobs:
                        bar.update(j.result())
    finally:
        bar.close()
    return Qy, Ay, Qz, Az


def kmult_test(Y, tree, *, permutations: int = 999, seed: int | None = 0, n_axes: int = 10,
               sizes=None, n_jobs: int | None = 1, progress: bool = False) -> KmultResult:
    """K_mult of Y (float (S, D), row i at tip i of ``tree``) with its permutation p-value, effect size z
    and the signal per principal axis (the first ``n_axes``, at most min(S − 1, D)).

    tree: :class:`~treeprobe.tree.CladeStructure` (species = items) or :class:`PhyloTree`. Permutation b is
    the b-th ``rng.permutation(S)`` of ``np.random.default_rng(seed)`` (row perm[i] to tip i), the same
    for every axis; with ``sizes`` (int (S,), e.g. images per species) permutation b is instead the b-th
    size-stratified draw (:func:`treeprobe.permutation.stratified_sampler`: rows swap only with rows of
    equal size). ``n_jobs`` threads (None: every CPU) give the same numbers. Cost O(nodes·D) per
    permutation (~10K species × 512 dims: see benchmarks/bench_physignal.py).
    """
    tr = _as_tree(tree)
    permutations = check_int(permutations, "permutations", minimum=0)
    n_axes = check_int(n_axes, "n_axes", minimum=0)
    Yc, T = _centred(Y)
    S, D = Yc.shape
    if S != tr.n_tips:
        raise TreeprobeError(f"Y has {S} rows but the tree has {tr.n_tips} species")
    ident = np.arange(S, dtype=np.int64)[None, :]
    Q, A = _prune(Yc, tr, ident)
    if not Q[0] > 0:
        raise TreeprobeError("the species' traits do not vary: K_mult is undefined")
    k_obs = float(_k_values(T.sum(), Q[0], A[0], S, tr.expected))
    n_axes = min(n_axes, S - 1, D)
    Z, share = _pca_scores(Yc, n_axes) if n_axes else (np.zeros((S, 0)), np.zeros(0))
    Tz = np.einsum("ij,ij->j", Z, Z)
    Qz, Az = _prune(Z, tr, ident, per_column=True)
    rng = np.random.default_rng(seed)
    sampler = None
    if sizes is not None:
        from treeprobe.permutation import stratified_sampler

        sizes = np.asarray(sizes)
        if sizes.shape != (S,):
            raise TreeprobeError(f"sizes must have one entry per row of Y ({S}); got shape {sizes.shape}")
        sampler = stratified_sampler(sizes)
    Qyp, Ayp, Qzp, Azp = _permuted_sums(Yc, Z, tr, permutations, rng, n_jobs, progress, sampler)
    k_perm = _k_values(T.sum(), Qyp, Ayp, S, tr.expected)
    k_axis = _k_values(Tz, Qz[0], Az[0], S, tr.expected, per_column=True)
    kz_perm = _k_values(Tz, Qzp, Azp, S, tr.expected, per_column=True)
    mse0_axis = Tz + S * Az[0] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        k_cum = np.cumsum(mse0_axis) / np.cumsum(Qz[0]) / tr.expected
    per_axis = pd.DataFrame(dict(
        axis=np.arange(1, n_axes + 1), variance_share=share, K=k_axis,
        p_value=[_p_value(k_axis[j], kz_perm[:, j]) for j in range(n_axes)],
        z=[_effect_size(k_axis[j], kz_perm[:, j]) for j in range(n_axes)], K_cumulative=k_cum))
    mse0 = float((T.sum() + S * float(A[0] @ A[0])) / (S - 1))
    return KmultResult(
        statistic=k_obs, p_value=_p_value(k_obs, k_perm), z=_effect_size(k_obs, k_perm), permutations=permutations,
        n_species=S, n_dims=D, mse0=mse0, mse=float(Q[0] / (S - 1)), expected=tr.expected, per_axis=per_axis,
        random_statistics=k_perm, permuted=PERMUTED_TIPS if sizes is None else PERMUTED_TIPS_BY_SIZE,
        details=dict(n_tree_nodes=tr.n_nodes, tree_depth=tr.max_depth, seed=seed,
                     backend="numba" if _kernel(False) is not None else "numpy"),
    )


# --- on a TreeData --------------------------------------------------------------------------------


def _read_tree(tree):
    """None, an ete3 tree, or Newick (a file path or the string itself) → None or an ete3 tree."""
    if tree is None or hasattr(tree, "traverse"):
        return tree
    if isinstance(tree, str):
        import os

        from treeprobe.tree import read_newick

        if os.path.exists(tree):
            return read_newick(tree)
        if tree.strip().endswith(";"):
            from ete3 import Tree

            try:
                return Tree(tree.strip(), format=1)
            except Exception as exc:
                raise TreeprobeError(f"cannot read the Newick string: {exc}".splitlines()[0]) from None
    raise TreeprobeError(f"tree must be None (the rank taxonomy), an ete3 tree, a Newick file or a Newick string; "
                         f"got {type(tree).__name__}")


def _unit_means(X: np.ndarray, units: np.ndarray, n_units: int) -> np.ndarray:
    """Plain mean of the rows of X (N, D) per unit code (N,), float64 (n_units, D), in row blocks."""
    import scipy.sparse as sp

    sums = np.zeros((n_units, X.shape[1]))
    block = 8192
    for i in range(0, len(X), block):
        u = units[i:i + block]
        ind = sp.csr_matrix((np.ones(len(u)), (u, np.arange(len(u)))), shape=(n_units, len(u)))
        sums += ind @ np.asarray(X[i:i + block], dtype=np.float64)
    return sums / np.bincount(units, minlength=n_units)[:, None]


def physignal(data, *, tree=None, rank_lengths=None, permutations: int = 999, seed: int | None = 0,
              n_axes: int = 10, renormalise: bool = True, permute: str = "size-strata", n_jobs: int | None = 1,
              progress: bool = False) -> KmultResult:
    """K_mult of the species centroids of a :class:`~treeprobe.core.TreeData` on a tree (see :func:`kmult_test`).

    Centroids: the mean of each species' unit-normalised embeddings (``data.unit``), renormalised to unit
    length when ``renormalise`` (the species-centroid level of :func:`treeprobe.tl.mantel`: direction
    only; False keeps the shrinkage of spread-out species). Species: the leaves of ``tree`` — an ete3
    tree or Newick (file or string) whose leaves are species binomials (items of other species left out,
    with a warning), or by default the rank taxonomy, one unit per rank or ``rank_lengths``; there an
    item known only above species is its own leaf. ``details`` says which tree and how many items.

    permute: ``"size-strata"`` (default): centroids swap tips only with centroids of species with the same
    number of images (a centroid of 1 image is noisier than one of 10: only equal sizes are exchangeable,
    as in the centroid Mantel test); ``"free"``: any tip with any (geomorph's scheme, right when every
    species has the same number of images or the centroids are species-level traits).
    """
    from treeprobe.core import TreeData
    from treeprobe.tl import _centroid_inputs, _mantel_inputs

    if not isinstance(data, TreeData):
        raise TreeprobeError(f"expected a treeprobe.TreeData, got {type(data).__name__}")
    X_m, clades, units, info, in_tree = _mantel_inputs(data, _read_tree(tree), rank_lengths)
    Y, cs = _centroid_inputs(X_m, clades, units)
    if not renormalise:
        Y = _unit_means(X_m, units, len(Y))
    check_choice(permute, "K_mult permutation scheme", PHYSIGNAL_SCHEMES)
    if len(Y) < 3:
        raise TreeprobeError(f"K_mult needs at least 3 species on the tree; got {len(Y)}")
    sizes = np.bincount(units, minlength=len(Y)) if permute == "size-strata" else None
    res = kmult_test(Y, cs, permutations=permutations, seed=seed, n_axes=n_axes, sizes=sizes, n_jobs=n_jobs,
                     progress=progress)
    res.details.update(tree=info, n_items=int(in_tree.sum()), n_items_not_in_tree=int((~in_tree).sum()),
                       centroids="unit-norm mean of unit embeddings" if renormalise
                       else "mean of unit embeddings (not renormalised)")
    return res
