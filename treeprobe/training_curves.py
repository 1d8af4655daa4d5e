"""Training curves of a ``treeprobe train`` run: tree agreement checkpoint by checkpoint.

A run folder (``treeprobe train --out DIR``) holds ``log.jsonl`` (JSON lines, ``event`` =
start | train | checkpoint | eval | stop), ``args.json`` and ``checkpoints/{epoch_N,step_N}.pt``.

* :func:`read_run` reads it into a :class:`TrainingRun` (options, checkpoints sorted by step, the
  log, the ``event=eval`` lines flattened);
* :func:`evaluate_run` embeds held-out images with every (``every``-th, always the last)
  checkpoint and scores them with :func:`treeprobe.tl.mantel` and :func:`treeprobe.tl.knn`, with
  the **same seed for every checkpoint** (so the curves move with the weights, not with the
  permutations);
* :func:`curves_from_log` builds the same table from the run's ``event=eval`` lines (runs trained
  with ``--eval-data``/``--eval-every``), without embedding anything;
* :func:`plot_training_curves` draws the table: one panel per metric, one line per rank / level,
  x = global step (epochs on the top axis), plus the training loss when asked.

The table is long, one row per checkpoint × metric × rank: ``step``, ``epoch``, ``checkpoint``,
``metric``, ``rank``, ``estimate``, ``ci_low``, ``ci_high``, ``p_value`` (see :data:`CURVE_COLUMNS`).
Metric names: ``"mantel <level> <method>"`` (``rank`` = the level, ``image`` or
``species-centroid``; `` images-permuted`` appended for the images-permutation scheme) and
``"knn <score>"`` (``agreement``, ``agreement_normalised``, ``agreement_excess``; ``rank`` =
kingdom .. species). Intervals are 95 %: the estimator's own when it has one (a subsampled kNN
or Mantel estimate), otherwise NaN — exact full-data estimates carry none here (no bootstrap is
run). From the log, only ``knn agreement``, ``knn agreement_excess`` and the Mantel rows of the
pipeline's headline are available (other numbers stay in :attr:`TrainingRun.evals`).

>>> sorted(METRICS)
['knn', 'mantel']
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError

__all__ = ["METRICS", "KNN_SCORES", "CURVE_COLUMNS", "TrainingRun", "read_run", "evaluate_run",
           "curves_from_log", "plot_training_curves"]

#: What :func:`evaluate_run` can compute.
METRICS = ("mantel", "knn")
#: kNN scores reported per rank (columns of :func:`treeprobe.tl.knn`'s table).
KNN_SCORES = ("agreement", "agreement_normalised", "agreement_excess")
#: Columns of a curves table.
CURVE_COLUMNS = ("step", "epoch", "checkpoint", "metric", "rank", "estimate", "ci_low", "ci_high", "p_value")

LOG_FILE = "log.jsonl"
ARGS_FILE = "args.json"
CHECKPOINT_DIR = "checkpoints"
_MISSING_CHOICES = ("error", "skip")
_Z95 = 1.959963984540054
_SHOWN_BAD_LINES = 3
_MANTEL_KEY = re.compile(r"^tp_mantel_(?P<level>.+)_(?P<method>pearson|spearman)(?P<images>_images_permuted)?"
                         r"_(?P<stat>r|p)$")


@dataclass
class TrainingRun:
    """A ``treeprobe train`` output folder, as :func:`read_run` reads it.

    path: the run folder. args: the run's options (``args.json``; ``{}`` when absent).
    checkpoints: DataFrame ``path`` (absolute), ``name``, ``step``, ``epoch``, ``source`` (where
    step/epoch were read: ``log`` or ``checkpoint``), sorted by step. log: every readable line of
    ``log.jsonl`` (columns = the union of keys, plus ``line``, 1-based). evals: the ``event=eval``
    lines (``step``, ``epoch``, then their numbers, nested dicts flattened with ``_``).
    bad_lines: 1-based numbers of the log lines that could not be read (skipped with a warning).
    """

    path: Path
    args: dict
    checkpoints: pd.DataFrame
    log: pd.DataFrame
    evals: pd.DataFrame
    bad_lines: list = field(default_factory=list)

    @property
    def n_bad_lines(self) -> int:
        """How many log lines were unreadable (truncated or corrupt) and skipped."""
        return len(self.bad_lines)

    @property
    def train(self) -> pd.DataFrame:
        """The ``event=train`` lines of the log (step, epoch, loss, lr, ...)."""
        return _events(self.log, "train")

    def checkpoint(self, name: str) -> Path:
        """The path of the checkpoint ``name`` (``epoch_2.pt``, or ``epoch_2``)."""
        names = list(self.checkpoints["name"])
        for cand in (name, f"{name}.pt"):
            if cand in names:
                return Path(self.checkpoints["path"].iloc[names.index(cand)])
        raise TreeprobeError(f"no checkpoint {name!r} in {self.path / CHECKPOINT_DIR} "
                             f"(have: {', '.join(names) or 'none'})")


# ----------------------------------------------------------------------------- reading a run


def _events(log: pd.DataFrame, event: str) -> pd.DataFrame:
    if "event" not in log.columns:
        return pd.DataFrame()
    return log[log["event"] == event].dropna(axis=1, how="all").reset_index(drop=True)


def _read_log(path: Path) -> tuple[list[dict], list[int], list[str], int]:
    """(records, bad line numbers, a short reason per bad line, number of the last non-empty line) of a
    JSON-lines file."""
    records, bad, why, last = [], [], [], 0
    with open(path, "rb") as f:
        raw = f.read()
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        last = i
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            bad.append(i)
            why.append(f"line {i}: {type(e).__name__}: {str(e)[:80]}")
            continue
        if not isinstance(rec, dict):
            bad.append(i)
            why.append(f"line {i}: a JSON {type(rec).__name__}, not an object")
            continue
        rec["line"] = i
        records.append(rec)
    return records, bad, why, last


def _checkpoint_meta(path: Path) -> tuple[int, int] | None:
    """(step, epoch) stored in a checkpoint file (memory-mapped: the tensors are not read), or None."""
    import torch

    try:
        try:
            ck = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the caller
        return None
    if not isinstance(ck, dict) or "step" not in ck:
        return None
    return int(ck.get("step", 0)), int(ck.get("epoch", 0))


def _checkpoint_table(run_dir: Path, records: list[dict], missing: str) -> pd.DataFrame:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    logged: dict[str, tuple[int, int]] = {}
    for rec in records:  # the last line naming a file wins (a restarted run rewrites it)
        if rec.get("event") == "checkpoint" and rec.get("path"):
            try:
                logged[os.path.basename(str(rec["path"]))] = (int(rec.get("step", 0)), int(rec.get("epoch", 0)))
            except (TypeError, ValueError):  # a line without usable numbers: read the file's own instead
                continue
    files = {p.name: p for p in ckpt_dir.glob("*.pt") if p.is_file()} if ckpt_dir.is_dir() else {}
    gone = [n for n in logged if n not in files]
    if gone:
        msg = (f"{len(gone)} checkpoint(s) named in {run_dir / LOG_FILE} are missing from {ckpt_dir}: "
               f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''} (deleted or moved?)")
        if missing == "error":
            raise TreeprobeError(msg + "; pass missing='skip' to use the checkpoints that are there")
        warnings.warn(msg + "; using the others", stacklevel=3)
    rows = []
    for name, p in files.items():
        if name in logged:
            (step, epoch), source = logged[name], "log"
        else:
            meta = _checkpoint_meta(p)
            if meta is None:
                warnings.warn(f"{p} is not a readable training checkpoint (no step stored); left out", stacklevel=3)
                continue
            (step, epoch), source = meta, "checkpoint"
        rows.append(dict(path=str(p.resolve()), name=name, step=step, epoch=epoch, source=source))
    df = pd.DataFrame(rows, columns=["path", "name", "step", "epoch", "source"])
    df = df.sort_values(["step", "epoch", "name"], kind="stable").reset_index(drop=True)
    return df.astype({"step": "int64", "epoch": "int64"})


def read_run(run_dir, *, missing: str = "error", require_checkpoints: bool = True) -> TrainingRun:
    """Read a ``treeprobe train --out`` folder into a :class:`TrainingRun`.

    Unreadable log lines (a partial last line of a run killed mid-write, a corrupt line) are
    skipped with one warning and counted (:attr:`TrainingRun.bad_lines`). Checkpoint step/epoch come
    from the log's ``event=checkpoint`` lines (matched by file name, so a moved run folder reads
    too), else from the file's own ``step``/``epoch`` entries. missing: a checkpoint named in the log
    but absent is an error (``"error"``) or left out with a warning (``"skip"``).
    require_checkpoints: a run without any checkpoint is an error (``False``: an empty table).

    Raises :class:`TreeprobeError` for a path that is not a run folder.
    """
    if missing not in _MISSING_CHOICES:
        raise TreeprobeError(f"missing must be one of {', '.join(_MISSING_CHOICES)}; got {missing!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TreeprobeError(f"no such run folder: {run_dir}")
    log_path, args_path = run_dir / LOG_FILE, run_dir / ARGS_FILE
    if not (log_path.is_file() or args_path.is_file() or (run_dir / CHECKPOINT_DIR).is_dir()):
        raise TreeprobeError(f"{run_dir} is not a treeprobe train run folder (no {LOG_FILE}, {ARGS_FILE} or "
                             f"{CHECKPOINT_DIR}/); pass the --out folder of `treeprobe train`")
    args: dict = {}
    if args_path.is_file():
        try:
            args = json.loads(args_path.read_text())
        except (OSError, ValueError) as e:
            warnings.warn(f"{args_path} is unreadable ({type(e).__name__}: {e}); args left empty", stacklevel=2)
        if not isinstance(args, dict):
            args = {}
    records, bad, why, last_line = _read_log(log_path) if log_path.is_file() else ([], [], [], 0)
    if bad:
        last = " (the last line: a run stopped mid-write leaves it partial)" if bad == [last_line] else ""
        warnings.warn(f"{log_path}: skipped {len(bad)} unreadable line(s){last}: "
                      + "; ".join(why[:_SHOWN_BAD_LINES]) + (" ..." if len(why) > _SHOWN_BAD_LINES else ""),
                      stacklevel=2)
    ckpts = _checkpoint_table(run_dir, records, missing)
    if require_checkpoints and ckpts.empty:
        raise TreeprobeError(f"no checkpoints in {run_dir / CHECKPOINT_DIR}: the run has not saved one yet "
                             "(every epoch writes epoch_N.pt; --save-every-steps N adds step_N.pt)")
    log = pd.DataFrame(records)
    evals = pd.json_normalize([r for r in records if r.get("event") == "eval"], sep="_")
    if len(evals):
        evals = evals.drop(columns=[c for c in ("event",) if c in evals.columns])
        first = [c for c in ("step", "epoch") if c in evals.columns]
        evals = evals[first + [c for c in evals.columns if c not in first]]
    return TrainingRun(path=run_dir, args=args, checkpoints=ckpts, log=log, evals=evals, bad_lines=bad)


# ----------------------------------------------------------------------------- evaluating checkpoints


def _selected(n: int, every: int) -> list[int]:
    """Positions of the checkpoints to evaluate: every ``every``-th from the first, and always the last."""
    if n <= 0:
        return []
    return sorted(set(range(0, n, every)) | {n - 1})


def _interval(ci) -> tuple[float, float]:
    if ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return math.nan, math.nan
    lo, hi = ci
    return float(lo), float(hi)


def _mantel_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for r in table.to_dict("records"):
        suffix = " images-permuted" if r.get("scheme") == "images" else ""
        lo, hi = _interval(r.get("ci"))
        rows.append(dict(metric=f"mantel {r['level']} {r['method']}{suffix}", rank=str(r["level"]),
                         estimate=float(r["statistic"]), ci_low=lo, ci_high=hi, p_value=float(r["p_value"])))
    return rows


def _knn_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for score in KNN_SCORES:
        if score not in table.columns:
            continue
        for r in table.to_dict("records"):
            est = float(r[score])
            hw = r.get(f"{score}_ci95")
            hw = float(hw) if hw is not None else math.nan
            lo, hi = (est - hw, est + hw) if math.isfinite(hw) else (math.nan, math.nan)
            rows.append(dict(metric=f"knn {score}", rank=str(r["rank"]), estimate=est, ci_low=lo, ci_high=hi,
                             p_value=math.nan))
    return rows


def _heldout(data):
    from treeprobe.core import TreeData

    if isinstance(data, (str, os.PathLike)):
        from treeprobe.data import load_data

        data = load_data(data)
    if not isinstance(data, TreeData):
        raise TreeprobeError(f"data must be a TreeData of held-out images (or a metadata CSV / image folder); "
                             f"got {type(data).__name__}")
    if "path" not in data.items.columns:
        raise TreeprobeError("the held-out data has no 'path' column: evaluate_run embeds images, so it needs "
                             "a metadata CSV or image folder (treeprobe.read(path))")
    return data


def evaluate_run(run_dir, data, *, metrics: Sequence[str] = METRICS, permutations: int = 99, seed: int = 0,
                 device: str = "cpu", every: int = 1, progress: bool = True, methods: Sequence[str] = ("pearson",
                 "spearman"), permute: Sequence[str] = ("species",), k: int = 10, max_queries: int | None = 100_000,
                 batch_size: int = 64, cache_dir=None, missing: str = "error") -> pd.DataFrame:
    """Tree agreement of held-out images, embedded by each checkpoint of a run → curves table.

    run_dir: a run folder or a :class:`TrainingRun`. data: a :class:`~treeprobe.core.TreeData` of
    held-out images (``items.path``), or the path of a metadata CSV / image folder. For the
    checkpoints at positions 0, every, 2·every, ... and always the last (sorted by step), the
    images are embedded (:func:`treeprobe.tl.embed`, cached under ``cache_dir``) and scored with
    the same ``seed`` each time: ``"mantel"`` — :func:`treeprobe.tl.mantel` (``methods`` at both
    levels, image and species-centroid, p-values from ``permutations`` permutations of the
    ``permute`` schemes; the species scheme by default), statistic and p-value; ``"knn"`` —
    :func:`treeprobe.tl.knn` (``k`` neighbours; above ``max_queries`` items estimated from that many
    seeded queries, with a 95 % interval) per rank, the scores of :data:`KNN_SCORES`. ``missing``:
    as :func:`read_run`. Embeddings are cached by :func:`treeprobe.tl.embed` under ``cache_dir``
    (default ``$TREEPROBE_CACHE`` or ~/.cache/treeprobe), keyed by the checkpoint's digest.
    Returns the long table of :data:`CURVE_COLUMNS` (see the module docstring).
    """
    from treeprobe import tl

    metrics = tuple(metrics)
    for m in metrics:
        if m not in METRICS:
            raise TreeprobeError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise TreeprobeError("no metrics asked for; pass metrics=('mantel', 'knn') or one of them")
    if int(every) < 1:
        raise TreeprobeError(f"every must be a positive integer; got {every}")
    run = run_dir if isinstance(run_dir, TrainingRun) else read_run(run_dir, missing=missing)
    if run.checkpoints.empty:
        raise TreeprobeError(f"no checkpoints in {run.path / CHECKPOINT_DIR} to evaluate")
    data = _heldout(data)
    picked = run.checkpoints.iloc[_selected(len(run.checkpoints), int(every))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(picked), desc="checkpoints", unit="ckpt", dynamic_ncols=True)
    rows = []
    try:
        for ck in picked.itertuples(index=False):
            emb = tl.embed(data, ckpt=ck.path, device=device, batch_size=batch_size, cache_dir=cache_dir,
                           progress=False)
            tl.check_analysable(emb)
            found = []
            if "mantel" in metrics:
                found += _mantel_rows(tl.mantel(emb, methods=tuple(methods), permute=tuple(permute),
                                                permutations=permutations, seed=seed))
            if "knn" in metrics:
                found += _knn_rows(tl.knn(emb, k=k, max_queries=max_queries, seed=seed))
            rows += [dict(step=int(ck.step), epoch=int(ck.epoch), checkpoint=ck.name, **r) for r in found]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _curves_frame(rows)


def _curves_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    return df.astype({"step": "int64", "epoch": "int64", "estimate": "float64", "ci_low": "float64",
                      "ci_high": "float64", "p_value": "float64"})


# ----------------------------------------------------------------------------- curves from the log


def _log_rows(rec: dict) -> list[dict]:
    """Curve rows (no step/epoch) of one flattened ``event=eval`` record."""
    rows, mantel = [], {}
    for key, value in rec.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
            continue
        if key.startswith("knn_excess_") and key[len("knn_excess_"):] in RANKS:
            rows.append(dict(metric="knn agreement_excess", rank=key[len("knn_excess_"):], estimate=float(value)))
        elif key.startswith("knn_") and key[len("knn_"):] in RANKS:
            rows.append(dict(metric="knn agreement", rank=key[len("knn_"):], estimate=float(value)))
        elif (m := _MANTEL_KEY.match(key)) is not None:
            name = f"mantel {m['level']} {m['method']}" + (" images-permuted" if m["images"] else "")
            mantel.setdefault((name, m["level"]), {})[m["stat"]] = float(value)
    have = {(r["metric"], r["rank"]) for r in rows}
    for rank in RANKS:  # the pipeline's copy, only where the plain kNN numbers are absent
        key = f"tp_knn_{rank}_agreement_excess"
        v = rec.get(key)
        if ("knn agreement_excess", rank) not in have and isinstance(v, (int, float)) and math.isfinite(v):
            rows.append(dict(metric="knn agreement_excess", rank=rank, estimate=float(v)))
    for (name, level), st in mantel.items():
        if "r" in st:
            rows.append(dict(metric=name, rank=level, estimate=st["r"], p_value=st.get("p", math.nan)))
    return [dict(dict(ci_low=math.nan, ci_high=math.nan, p_value=math.nan), **r) for r in rows]


def curves_from_log(run) -> pd.DataFrame:
    """The curves table (:data:`CURVE_COLUMNS`) from a run's ``event=eval`` lines: nothing is embedded.

    run: a run folder or a :class:`TrainingRun`. For runs trained with ``--eval-data`` and
    ``--eval-every``; the first line (step 0) scores the initial model (``checkpoint`` = ``""``),
    the others the checkpoint written at the same step. Rows: ``knn agreement`` and ``knn
    agreement_excess`` per rank, and the pipeline's Mantel rows (r and p) unless the run used
    ``--eval-knn-only``; no intervals (NaN). An empty table when the run logged no evaluation.
    A log appended to by several runs: lines before the last fresh start (``event=start`` at step
    0) are dropped, and of two lines for one step (a resumed run repeating steps) the later is kept.
    """
    if not isinstance(run, TrainingRun):
        run = read_run(run, require_checkpoints=False, missing="skip")
    by_step = {}
    for rec in run.log.to_dict("records") if "event" in run.log.columns else []:
        if rec.get("event") == "checkpoint" and rec.get("path"):
            by_step[int(rec["step"])] = os.path.basename(str(rec["path"]))
    by_step |= dict(zip(run.checkpoints["step"].astype(int), run.checkpoints["name"]))
    rows = []
    evals = run.evals
    if len(evals) and "line" in evals.columns and "event" in run.log.columns:
        starts = run.log[(run.log["event"] == "start") & (run.log.get("step", 0) == 0)]["line"]
        if len(starts):
            evals = evals[evals["line"] > starts.max()]
    if len(evals) and "step" in evals.columns:
        evals = evals.drop_duplicates("step", keep="last")
    for rec in evals.to_dict("records"):
        step, epoch = int(rec.get("step", 0)), int(rec.get("epoch", 0))
        name = by_step.get(step, "")
        rows += [dict(step=step, epoch=epoch, checkpoint=name, **r) for r in _log_rows(rec)]
    return _curves_frame(rows)


# ----------------------------------------------------------------------------- the figure


def _rank_order(values) -> list:
    seen = list(dict.fromkeys(values))
    return [r for r in RANKS if r in seen] + [r for r in seen if r not in RANKS]


def _epoch_axis(ax, steps: np.ndarray, epochs: np.ndarray, *, completed: bool = True) -> None:
    """Top axis ticks at the end of each epoch, ``ep 1`` at the end of the first. ``completed``:
    ``epochs`` counts the epochs done (checkpoints, evals: the end of epoch e is the first step with
    e done); else the epoch in progress, 0-based (train lines: the end of epoch e + 1 is its last step)."""
    ticks, labels = [], []
    for e in sorted(set(int(v) for v in epochs)):
        if completed and e <= 0:
            continue
        at = steps[epochs == e]
        ticks.append(float(at.min() if completed else at.max()))
        labels.append(f"ep {e if completed else e + 1}")
    if not ticks:
        return
    sec = ax.secondary_xaxis("top")
    sec.set_xticks(ticks, labels=labels, fontsize=7)


def plot_training_curves(table: pd.DataFrame, *, metrics: Sequence[str] | None = None, loss=None,
                         title: str = "", max_cols: int = 3):
    """The curves of a table from :func:`evaluate_run` / :func:`curves_from_log` as a Figure.

    One panel per metric (``metrics``: which and in what order; default all in the table's order),
    x = step, epochs ticked on the top axis; one line per rank / level (kingdom → species), with a
    shaded band where ``ci_low``/``ci_high`` are finite. loss: the run's log (``run.log``, or a
    :class:`TrainingRun`) adds a last panel with the training loss of its ``event=train`` lines.
    No pyplot state is touched; save with :func:`treeprobe.plots.save_figure`.
    """
    from treeprobe.plots import DisplayFigure, _grid, _palette

    if not isinstance(table, pd.DataFrame) or not {"step", "metric", "rank", "estimate"} <= set(table.columns):
        raise TreeprobeError("plot_training_curves needs a curves table (from evaluate_run or curves_from_log)")
    present = list(dict.fromkeys(table["metric"]))
    if metrics is None:
        metrics = present
    else:
        metrics = list(metrics)
        unknown = [m for m in metrics if m not in present]
        if unknown:
            raise TreeprobeError(f"metric(s) not in the table: {', '.join(unknown)} "
                                 f"(the table has: {', '.join(present) or 'none'})")
    train = None
    if loss is not None:
        log = loss.log if isinstance(loss, TrainingRun) else loss
        train = _events(log, "train") if isinstance(log, pd.DataFrame) else pd.DataFrame()
        if "loss" not in train.columns or train.empty:
            raise TreeprobeError("loss: the log has no event=train lines with a loss")
    n_panels = len(metrics) + (train is not None)
    if n_panels == 0:
        raise TreeprobeError("nothing to plot: the table is empty and no loss was given")
    nrows, ncols = _grid(n_panels, max_cols)
    fig = DisplayFigure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    ranks_all = _rank_order(table["rank"].astype(str))
    colours = dict(zip(ranks_all, _palette(max(len(ranks_all), 1))))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        sub = table[table["metric"] == metric]
        for rank in _rank_order(sub["rank"].astype(str)):
            g = sub[sub["rank"].astype(str) == rank].sort_values("step")
            x = g["step"].to_numpy(float)
            ax.plot(x, g["estimate"].to_numpy(float), "o-", ms=3, color=colours[rank], label=rank)
            if {"ci_low", "ci_high"} <= set(g.columns):
                lo, hi = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    ax.fill_between(x, np.where(ok, lo, np.nan), np.where(ok, hi, np.nan), color=colours[rank],
                                    alpha=0.2, linewidth=0)
        if "epoch" in sub.columns and len(sub):
            _epoch_axis(ax, sub["step"].to_numpy(float), sub["epoch"].to_numpy())
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if sub["rank"].nunique() > 4 else 1)
    if train is not None:
        ax = fig.add_subplot(nrows, ncols, len(metrics) + 1)
        t = train.sort_values("step")
        ax.plot(t["step"].to_numpy(float), t["loss"].to_numpy(float), "-", color="0.2", label="train loss")
        if "epoch" in t.columns:
            _epoch_axis(ax, t["step"].to_numpy(float), t["epoch"].to_numpy(), completed=False)
        ax.set_title("training loss", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
