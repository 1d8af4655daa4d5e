"""Tree-agreement evaluation of a model being trained (``--eval-data``/``--eval-every``).

Embeds a held-out metadata CSV with the in-memory model and scores it:

* always: kNN rank agreement (:func:`treeprobe.neighbors.knn_rank_agreement`, cosine,
  k = :data:`EVAL_K`) per rank — logged as ``knn_<rank>`` (agreement) and ``knn_excess_<rank>``
  ((agreement − chance)/(1 − chance); 0 = chance, 1 = perfect);
* when the lead's :func:`treeprobe.pipeline.analyse_embeddings` is importable: its
  report's headline numbers, logged under ``tp_<name>``.

Evaluation never touches the training RNG streams (torch/numpy/python states are
restored) nor torch's CPU thread count (numba's OpenMP layer, started by the kNN kernels,
resets it: restored too), so it does not change the course of a seeded run, and a run
resumed past an evaluation computes like one that went through it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

log = logging.getLogger(__package__)

__all__ = ["EVAL_K", "EVAL_PERMUTATIONS", "EVAL_BATCH_SIZE", "preserved_rng", "kept_torch_threads", "embed_images",
           "knn_metrics", "pipeline_headline", "light_kwargs", "evaluate"]

#: Neighbours of the kNN rank agreement.
EVAL_K = 10
#: Mantel permutations of the in-training evaluation (``--eval-permutations``).
EVAL_PERMUTATIONS = 199
#: Images per forward pass when embedding.
EVAL_BATCH_SIZE = 64
#: Permutations for the chance level of the pipeline's kNN agreement (kept low: it runs every eval).
CHANCE_PERMUTATIONS = 5
_MAX_DEPTH = 3  # of the report dict flattened into headline numbers


@contextlib.contextmanager
def preserved_rng(cuda: bool = True):
    """Restore torch (CPU, and CUDA if ``cuda``), numpy and python RNG states on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) \
        if cuda and torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def kept_torch_threads():
    """Restore torch's intra-op CPU thread count on exit (the float reduction order depends on it)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@torch.no_grad()
def embed_images(model, paths: Sequence[str], transform: Callable, *, device="cpu",
                 batch_size: int = EVAL_BATCH_SIZE, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """L2-normalised image embeddings, float32 array (N, embed_dim)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(paths), batch_size):
            imgs = []
            for p in paths[i:i + batch_size]:
                with Image.open(p) as im:
                    imgs.append(transform(im.convert("RGB")))
            x = torch.stack(imgs).to(device)
            ctx = torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype) \
                if autocast_dtype is not None else contextlib.nullcontext()
            with ctx:
                f = model.encode_image(x, normalize=True)
            out.append(f.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def knn_metrics(emb: np.ndarray, items: pd.DataFrame, k: int = EVAL_K, *, chance: bool = False) -> dict:
    """``knn_<rank>`` and ``knn_excess_<rank>`` (and ``chance_<rank>`` if ``chance``) for every rank
    (treeprobe's kNN agreement) of embeddings (N, D) of ``items`` (N rows)."""
    from treeprobe._utils import RANKS
    from treeprobe.neighbors import knn_rank_agreement
    from treeprobe.taxonomy import Taxonomy

    tax = Taxonomy.from_frame(items)
    k = int(min(k, len(items) - 1))
    df = knn_rank_agreement(emb, {r: tax.codes(r) for r in RANKS}, k=k)
    res = {}
    for row in df.itertuples():
        res[f"knn_{row.rank}"] = float(row.agreement)
        res[f"knn_excess_{row.rank}"] = float(row.agreement_excess)
    if chance:
        res.update({f"chance_{row.rank}": float(row.chance) for row in df.itertuples()})
    return res


def _flatten_numbers(obj, prefix="", out=None, depth=0) -> dict:
    out = {} if out is None else out
    if depth > _MAX_DEPTH:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten_numbers(v, f"{prefix}{k}_", out, depth + 1)
    elif isinstance(obj, (int, float, np.integer, np.floating)) and not isinstance(obj, bool):
        v = float(obj)
        if math.isfinite(v):
            out[prefix.rstrip("_")] = v
    return out


def pipeline_headline(report) -> dict:
    """Headline numbers of a treeprobe ``Report`` as a flat {name: float} dict.

    Uses ``report.headline`` (dict or method) when the Report has it, else the
    numeric top-level fields of ``report.to_dict()``.
    """
    h = getattr(report, "headline", None)
    if callable(h):
        h = h()
    if h is None and hasattr(report, "to_dict"):
        h = report.to_dict()
    if isinstance(h, pd.DataFrame):
        h = h.to_dict("records")
        h = {str(i): r for i, r in enumerate(h)}
    return _flatten_numbers(h or {})


def light_kwargs(fn, permutations: int) -> dict:
    """Fast settings for an in-training evaluation, for the options ``fn`` accepts."""
    import inspect

    want = {"permutations": permutations, "maps": (), "progress": False,
            "chance_permutations": CHANCE_PERMUTATIONS}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in want.items() if k in params}


def evaluate(model, items: pd.DataFrame, transform: Callable, *, device="cpu", seed: int = 0,
             batch_size: int = EVAL_BATCH_SIZE, autocast_dtype=None, k: int = EVAL_K, use_pipeline: bool = True,
             permutations: int = EVAL_PERMUTATIONS) -> dict:
    """Embed ``items`` (absolute ``path`` + ranks) and return headline metrics (flat dict)."""
    with preserved_rng(), kept_torch_threads():
        emb = embed_images(model, list(items["path"]), transform, device=device, batch_size=batch_size,
                           autocast_dtype=autocast_dtype)
        res = {"eval_n": int(len(items))}
        res.update(knn_metrics(emb, items, k=k))
        if use_pipeline:
            try:
                from treeprobe.pipeline import analyse_embeddings
            except ImportError as e:
                res["tp_note"] = f"treeprobe.pipeline.analyse_embeddings not available ({e}); kNN metrics only"
            else:
                try:
                    from treeprobe.tl import intrinsic  # analyse_embeddings forwards its options to it

                    report = analyse_embeddings(emb, items, seed=seed, **light_kwargs(intrinsic, permutations))
                    res.update({f"tp_{k_}": v for k_, v in pipeline_headline(report).items()})
                except Exception as e:  # noqa: BLE001 - evaluation must not kill training
                    log.warning("treeprobe pipeline evaluation failed: %s", e)
                    res["tp_note"] = f"analyse_embeddings failed: {type(e).__name__}: {e}"
    return res
