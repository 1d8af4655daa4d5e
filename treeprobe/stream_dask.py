"""The streaming pass of :mod:`treeprobe.stream` distributed over a Dask cluster (issue 14, point 4).

:func:`species_statistics_dask` cuts the parquet shards (resolved as :func:`~treeprobe.stream.species_statistics`
resolves them: folder sorted by path, glob, list in the given order) into groups of ``files_per_task``
consecutive files, runs ``stream.species_statistics(group, progress=False, **kwargs)`` on the workers, one
task per group, and merges the partial :class:`~treeprobe.stream.SpeciesStats` with
:meth:`SpeciesStats.merge <treeprobe.stream.SpeciesStats.merge>` in a pairwise tree **in file order**
(group 0 with 1, 2 with 3, ..., then the pairs): each merge joins two consecutive file ranges, left then
right, the condition under which merging is exact (species running across a shard boundary included).

The merges run **on the workers**, not on the client: a merge costs O(S_left + S_right) (a Python loop over
the units) plus O(D²) with ``gram``, so a tree costs O(S·log T) for T tasks where a left fold on the client
would cost O(S·T); the merges of one level run in parallel; a partial result travels once (worker to
worker) and the client receives only the final statistics; and a partial result lost with a worker is
recomputed by Dask from the task graph. Nothing is counted twice: a task that dies returns nothing, Dask
reruns it, and ``merge`` refuses two partials that share a file.

Equal to the single-process engine: counts, lineages, row and skip counts exactly; the sums, Σ‖x̂‖², the
within-species terms of a species whose rows lie in one shard bit for bit (the same additions in the same
order: batches never cross files); those of a species running across a group boundary and the Gram
matrix G to ~1e-15 relative (the same terms added in another grouping).

A group with no embedding at all (typically every row group skipped by ``where=`` on taxonomy-sorted
shards) cannot give a SpeciesStats; its task returns its row counts instead (:class:`_EmptyPart`, the
counts the single pass would add) and the merge adds them, so ``n_rows``, ``n_filtered`` and the skip
counts still equal the single pass.

``.npy`` sources are refused: one memory map is one pass (:func:`stream.species_statistics` has no row
range to split); use ``engine="local"`` or write parquet shards.
"""

from __future__ import annotations

import copy
import inspect
import time
import uuid
from dataclasses import dataclass, field

from treeprobe.errors import TreeprobeError
from treeprobe import stream
from treeprobe.stream import SpeciesStats

__all__ = ["species_statistics_dask"]

_INSTALL = "the dask engine needs dask.distributed: pip install 'treeprobe[dask]'"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise TreeprobeError(_INSTALL) from None
    return distributed


# --- the tasks (run on the workers) -----------------------------------------------------------------------


@dataclass
class _EmptyPart:
    """The row counts of a file group that gave no embedding (what the single pass adds for those files)."""

    files: tuple
    n_rows: int = 0
    n_filtered: int = 0
    n_skipped: dict = field(default_factory=dict)
    skipped_examples: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _default(name):
    return inspect.signature(stream.species_statistics).parameters[name].default


def _empty_part(files, kwargs) -> _EmptyPart | None:
    """The counts of ``files`` if no row group that the pass reads holds a non-null embedding (the case where
    ``species_statistics`` finds no embedding), else None. Mirrors the pass: a row group without a ``where``
    match counts as rows filtered out; in a read one every row is null, so the rows matching ``where``
    (all rows without it) are "missing embedding"."""
    import numpy as np
    import pyarrow.parquet as pq

    where_fold = stream._where_folded(kwargs.get("where"))
    names = stream._Names(tuple(sorted(set(kwargs.get("missing", _default("missing"))))))
    covariate = kwargs.get("covariate")
    out = _EmptyPart(tuple(files))
    reason = stream.SKIP_REASONS[0]
    for path in files:
        pf = pq.ParquetFile(path)
        cmap = stream._match_columns(pf.schema_arrow.names, kwargs.get("columns"), where_fold, covariate, path)
        row0 = 0
        for rg in range(pf.num_row_groups):
            n_rg = pf.metadata.row_group(rg).num_rows
            out.n_rows += n_rg
            w = np.ones(n_rg, dtype=bool)
            if where_fold:
                t = pf.read_row_group(rg, columns=[cmap[k] for k in where_fold])
                w = stream._where_mask({k: t.column(cmap[k]) for k in where_fold}, where_fold, names)
                if not w.any():
                    out.n_filtered += n_rg
                    row0 += n_rg
                    continue
            if pf.read_row_group(rg, columns=[cmap["emb"]]).column(0).null_count != n_rg:
                return None
            out.n_filtered += int((~w).sum())
            hit = np.flatnonzero(w)
            if len(hit):
                out.n_skipped[reason] = out.n_skipped.get(reason, 0) + len(hit)
                ex = out.skipped_examples.setdefault(reason, [])
                ex.extend(f"{path} row {row0 + int(i)}" for i in hit[:max(0, stream._EXAMPLES - len(ex))])
            row0 += n_rg
    return out


def _reduce_group(files, kwargs):
    """One task: the statistics of consecutive ``files`` (or their counts if they hold no embedding)."""
    try:
        return stream.species_statistics(list(files), progress=False, **kwargs)
    except TreeprobeError as e:
        if not str(e).startswith("no embeddings read from"):
            raise
        try:  # confirm on the files themselves, and get the counts the single pass would add
            empty = _empty_part(files, kwargs)
        except Exception:  # noqa: BLE001 - the pass's own error is the one to report
            empty = None
        if empty is None:
            raise
        empty.timings = dict(seconds=0.0, wait_read_seconds=0.0)
        return empty
    except Exception as e:  # noqa: BLE001 - name the files: the client shows one line, not a traceback
        raise TreeprobeError(f"reading {_label(files)} failed: {type(e).__name__}: {' '.join(str(e).split())}") \
            from None


def _merge_pair(a, b):
    """``a`` then ``b`` (consecutive file ranges, in file order); per-task timings summed."""
    if isinstance(a, _EmptyPart) or isinstance(b, _EmptyPart):
        out = _with_empty(a, b)
    else:
        out = a.merge(b)
    out.timings = {k: a.timings.get(k, 0.0) + b.timings.get(k, 0.0) for k in ("seconds", "wait_read_seconds")}
    return out


def _with_empty(a, b):
    """Counts of an empty part added to the other part (a new object; the inputs, which Dask may hold in
    memory for a rerun, are not changed)."""
    base = copy.copy(b if isinstance(a, _EmptyPart) else a)
    if isinstance(base, SpeciesStats):
        base._cache = {}
    base.n_rows = a.n_rows + b.n_rows
    base.n_filtered = a.n_filtered + b.n_filtered
    base.n_skipped = dict(a.n_skipped)
    for reason, n in b.n_skipped.items():
        base.n_skipped[reason] = base.n_skipped.get(reason, 0) + n
    base.skipped_examples = {r: list(ex) for r, ex in a.skipped_examples.items()}
    for reason, ex in b.skipped_examples.items():
        base.skipped_examples[reason] = (base.skipped_examples.get(reason, []) + list(ex))[:stream._EXAMPLES]
    base.files = tuple(a.files) + tuple(b.files)
    return base


# --- the client side --------------------------------------------------------------------------------------


def _label(files) -> str:
    files = list(files)
    return files[0] if len(files) == 1 else f"{len(files)} files {files[0]} ... {files[-1]}"


class _Connection:
    """The client of ``scheduler`` (None: a LocalCluster started here; an address; a Client; a Cluster
    object such as dask-jobqueue's SLURMCluster); closes only what it started."""

    def __init__(self, scheduler, n_workers, threads_per_worker, timeout):
        self.d = _distributed()
        self.cluster = self.client = None
        self.own = scheduler is None or not isinstance(scheduler, self.d.Client)
        try:
            if scheduler is None:
                self.cluster = self.d.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                                   processes=True, dashboard_address=":0")
                self.client = self.d.Client(self.cluster, set_as_default=False)
            elif isinstance(scheduler, self.d.Client):
                self.client = scheduler
            elif isinstance(scheduler, str) or hasattr(scheduler, "scheduler_address"):
                address = scheduler if isinstance(scheduler, str) else scheduler.scheduler_address
                self.client = self.d.Client(address, timeout=timeout, set_as_default=False)
            else:
                raise TreeprobeError("scheduler must be None (a local cluster), an address such as "
                                     f"'tcp://host:8786', a distributed.Client or a cluster; got {type(scheduler).__name__}")
        except TreeprobeError:
            self.close()
            raise
        except (OSError, TimeoutError, ValueError, RuntimeError) as e:
            self.close()
            if scheduler is None:  # workers are spawned processes that import the main module
                raise TreeprobeError("cannot start a local Dask cluster: "
                                     f"{' '.join(str(e).split())} (in a script, run it under "
                                     "`if __name__ == \"__main__\":`; from stdin / -c, pass scheduler=)") from None
            raise TreeprobeError(f"cannot reach the Dask scheduler {scheduler!r} (timeout {timeout:g} s): "
                                 f"{' '.join(str(e).split())}") from None

    def close(self):
        if self.own:
            for x in (self.client, self.cluster):
                if x is not None:
                    try:
                        x.close()
                    except Exception:  # noqa: BLE001 - closing after an error: keep the first error
                        pass


def _clean_error(e: BaseException, label: str, d) -> TreeprobeError:
    """One line for what a task raised: the worker's TreeprobeError message as it is."""
    if isinstance(e, TreeprobeError):
        return TreeprobeError(str(e))
    if isinstance(e, d.KilledWorker):
        return TreeprobeError(f"the Dask task reading {label} killed its worker too many times "
                              "(out of memory? see the worker logs; fewer files_per_task or more memory per worker)")
    if type(e).__name__ == "CancelledError":
        return TreeprobeError(f"the Dask task reading {label} was cancelled (did the scheduler go away?)")
    return TreeprobeError(f"the Dask task reading {label} failed: {type(e).__name__}: {' '.join(str(e).split())}")


def species_statistics_dask(source, *, scheduler=None, n_workers: int = 2, threads_per_worker: int = 1,
                            files_per_task: int = 1, connect_timeout: float = 30.0, progress: bool = True,
                            **kwargs) -> SpeciesStats:
    """:func:`treeprobe.stream.species_statistics` of parquet shards, one Dask task per ``files_per_task``
    consecutive files, partial statistics merged in file order on the workers (module docstring).

    scheduler: None (a ``distributed.LocalCluster`` of ``n_workers`` processes × ``threads_per_worker``
    threads, started and closed by this call), a scheduler address (``"tcp://host:8786"``, reached within
    ``connect_timeout`` seconds), a ``distributed.Client`` (used, not closed) or a cluster object with a
    ``scheduler_address`` (dask-jobqueue, dask-kubernetes). kwargs: those of ``species_statistics``
    (``gram``, ``where``, ``covariate``, ...), passed to every task untouched. Progress: a bar in files
    on the client. Returns the merged :class:`~treeprobe.stream.SpeciesStats`; ``timings``: ``seconds`` (wall,
    client), ``task_seconds`` and ``wait_read_seconds`` (summed over tasks), ``tasks``.
    Memory per worker: one task's pass (batch_rows·D·6 bytes + 64 MB blocks + its S_group·D·8 bytes of sums,
    + D²·8 with gram) and the partials it holds for merges (at most ~S·D·8 bytes for the last merge).
    """
    from tqdm.auto import tqdm

    engine = kwargs.pop("engine", "dask")
    if engine != "dask":
        raise TreeprobeError(f"species_statistics_dask runs the dask engine, not engine={engine!r}")
    if not isinstance(files_per_task, int) or files_per_task < 1:
        raise TreeprobeError(f"files_per_task must be a positive integer; got {files_per_task!r}")
    for name, v in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if not isinstance(v, int) or v < 1:
            raise TreeprobeError(f"{name} must be a positive integer; got {v!r}")
    kind, files = stream._sources(source, kwargs.get("metadata"))
    if kind != "parquet":
        raise TreeprobeError(f"the dask engine distributes parquet shards; {files[0]} is one .npy memory map "
                             "(one pass): use engine='local' or write the embeddings as parquet shards")
    groups = [tuple(files[i:i + files_per_task]) for i in range(0, len(files), files_per_task)]
    t0 = time.perf_counter()
    conn = _Connection(scheduler, n_workers, threads_per_worker, connect_timeout)
    d, client = conn.d, conn.client
    token = uuid.uuid4().hex[:8]
    label = {}
    final = None
    try:
        leaves = []
        for i, g in enumerate(groups):
            key = f"treeprobe-stats-{i}-{token}"
            label[key] = _label(g)
            leaves.append(client.submit(_reduce_group, g, kwargs, key=key, retries=0))
        n_files = {f.key: len(g) for f, g in zip(leaves, groups)}
        level, span, nxt = list(leaves), [(i, i) for i in range(len(groups))], []
        while len(level) > 1:
            nxt, nspan = [], []
            for j in range(0, len(level) - 1, 2):
                lo, hi = span[j][0], span[j + 1][1]
                key = f"treeprobe-merge-{lo}-{hi}-{token}"
                label[key] = _label([f for g in groups[lo:hi + 1] for f in g])
                nxt.append(client.submit(_merge_pair, level[j], level[j + 1], key=key))
                nspan.append((lo, hi))
            if len(level) % 2:
                nxt.append(level[-1])
                nspan.append(span[-1])
            level, span = nxt, nspan
        final = level[0]
        pending = d.as_completed(leaves, loop=client.loop)
        del leaves, level, nxt  # partial results are released once merged (only `final` is kept here)
        with tqdm(total=len(files), unit="files", desc="species statistics (dask)", disable=not progress) as bar:
            for fut in pending:
                if fut.status != "finished":
                    try:
                        fut.result()
                    except BaseException as e:  # noqa: BLE001 - one clear line instead of a Dask traceback
                        raise _clean_error(e, label.get(fut.key, "?"), d) from None
                bar.update(n_files[fut.key])
                del fut
        try:
            out = final.result()
        except BaseException as e:  # noqa: BLE001
            raise _clean_error(e, label.get(final.key, "?"), d) from None
    except BaseException:
        if final is not None and not conn.own:
            client.cancel([final])
        raise
    finally:
        conn.close()
    if isinstance(out, _EmptyPart):
        raise TreeprobeError(f"no embeddings read from {files[0] if len(files) == 1 else f'{len(files)} files'} "
                             f"({out.n_rows} rows, {out.n_filtered} filtered out by where)")
    task = out.timings or {}
    out.timings = dict(seconds=time.perf_counter() - t0, task_seconds=float(task.get("seconds", 0.0)),
                       wait_read_seconds=float(task.get("wait_read_seconds", 0.0)), tasks=len(groups))
    return out
