"""The I/O edge of ``treeprobe intrinsic``: inputs in, a written report out.

:func:`load_inputs` turns what the user passed (an example name, an embeddings file, images + a
model, the demo) into one :class:`~treeprobe.core.TreeData` with embeddings; :func:`run_intrinsic`
adds the tree file, runs :func:`treeprobe.tl.intrinsic` and writes the report.
:func:`analyse_embeddings` is the same analysis on arrays (no I/O). :func:`run_intrinsic_stream` is
``treeprobe intrinsic`` on parquet shards too large for memory: one streaming pass
(:func:`treeprobe.stream.species_statistics`), then :func:`treeprobe.stream.intrinsic_from_stats`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from treeprobe._utils import check_output_dir
from treeprobe.core import TreeData
from treeprobe.errors import TreeprobeError

__all__ = ["analyse_embeddings", "load_inputs", "run_intrinsic", "run_intrinsic_stream", "run_zeroshot", "add_text_embeddings", "parse_model_spec", "load_models",
           "run_compare"]

DEMO_CKPT = Path(__file__).resolve().parent / "assets" / "demo_clip.pt"


def analyse_embeddings(embeddings: np.ndarray, items: pd.DataFrame, *, skipped: pd.DataFrame | None = None,
                       **kwargs):
    """Intrinsic analysis of embeddings (N, D) against the lineages in ``items`` (N rows, 7 rank columns).

    The same as ``treeprobe.tl.intrinsic(TreeData(embeddings, items, skipped=skipped), **kwargs)``;
    returns the :class:`~treeprobe.report.Report`, nothing is written.
    """
    from treeprobe import tl

    return tl.intrinsic(TreeData(embeddings, items, skipped=skipped), **kwargs)


def _demo(*, cache_dir, seed, batch_size, progress, device) -> tuple[TreeData, dict]:
    """The simulated tree of life: rendered as images and embedded by the bundled demo checkpoint
    (the full image path), or its simulated embeddings when the checkpoint is absent."""
    from treeprobe import datasets, tl
    from treeprobe._utils import default_cache_dir

    prov = dict(data=dict(source=f"simulated tree of life (seed {seed})", kind="demo"))
    if not DEMO_CKPT.exists():
        prov["model"] = dict(name="simulated embeddings (Brownian traits)", digest=None)
        return datasets.simulated_world(seed=seed), prov
    folder = Path(cache_dir or default_cache_dir()) / f"demo_world_seed{seed}"
    images = datasets.synthetic_images(seed=seed, folder=folder)
    ds = tl.embed(images, ckpt=str(DEMO_CKPT), cache_dir=cache_dir, batch_size=batch_size, workers=0,
                  device=device, progress=progress)
    prov["model"] = ds.uns["model"]
    prov["data"]["kind"] = "demo: synthetic images of simulated species, bundled demo checkpoint"
    return ds, prov


def load_inputs(*, example: str | None = None, data: str | None = None, embeddings: str | None = None,
                metadata: str | None = None, demo: bool = False, ckpt: str | None = None, model: str | None = None,
                pretrained: str | None = None, cache_dir=None, batch_size: int = 64, workers: int = 0,
                device: str | None = None, progress: bool = True, trust_checkpoint: bool = False,
                seed: int = 0) -> tuple[TreeData, dict]:
    """One TreeData with embeddings from exactly one input, and its provenance (data + model)."""
    from treeprobe import data as data_mod
    from treeprobe import datasets, tl

    given = [name for name, v in (("--example", example), ("--data", data), ("--embeddings", embeddings),
                                  ("--demo", demo)) if v]
    if len(given) > 1:
        raise TreeprobeError(f"pass one input, not {' and '.join(given)}")
    if demo:
        return _demo(cache_dir=cache_dir, seed=seed, batch_size=batch_size, progress=progress, device=device)
    prov: dict = {}
    if example is not None:
        if example not in datasets.EXAMPLES:
            raise TreeprobeError(f"unknown example {example!r}; choose from {', '.join(datasets.EXAMPLES)}")
        ds = datasets.EXAMPLES[example]()
        prov["data"] = dict(source=f"example {example} (bundled)", kind="precomputed embeddings",
                            n_rows=len(ds) + len(ds.skipped))
    elif embeddings is not None:
        ds = data_mod.load_embeddings(embeddings, metadata=metadata)
        prov["data"] = dict(source=str(embeddings), kind="precomputed embeddings", n_rows=len(ds) + len(ds.skipped))
    elif data is not None:
        ds = data_mod.load_data(data)
        prov["data"] = dict(source=str(data), n_rows=len(ds) + len(ds.skipped))
    else:
        raise TreeprobeError("nothing to analyse: pass --example bioclip2-1k, --embeddings, --data or --demo")
    if ds.X is None:
        ds = tl.embed(ds, ckpt=ckpt, model=model, pretrained=pretrained, cache_dir=cache_dir,
                      batch_size=batch_size, workers=workers, device=device, progress=progress,
                      trust_checkpoint=trust_checkpoint)
        prov["model"] = ds.uns["model"]
    else:
        prov["model"] = dict(name="precomputed embeddings", digest=None)
    return ds, prov


def add_text_embeddings(ds: TreeData, prov: dict, inputs: dict, *, text: dict) -> None:
    """Text embeddings of the taxa of ``ds`` (:func:`treeprobe.tl.text_embeddings`) from ``text["file"]`` or
    the model of ``inputs`` (``ckpt`` / ``model`` / ``pretrained``; the bundled demo checkpoint with
    ``demo``), with ``text["text_types"]`` and ``text["templates"]``; records them in ``prov``."""
    from treeprobe import tl

    text = dict(text)
    source = dict(ckpt=inputs.get("ckpt"), model=inputs.get("model"), pretrained=inputs.get("pretrained"))
    if inputs.get("demo") and not any(source.values()):
        source["ckpt"] = str(DEMO_CKPT)
    if text.get("file") is None and not any(source.values()):
        raise TreeprobeError("zero-shot needs text embeddings of the taxa: pass --ckpt (a CLIP checkpoint with its "
                             "text tower) or --text-embeddings FILE")
    tl.text_embeddings(ds, file=text.get("file"), text_types=text.get("text_types", ("taxonomic",)),
                       templates=text.get("templates"), cache_dir=inputs.get("cache_dir"),
                       batch_size=max(int(inputs.get("batch_size", 64)), 64), device=inputs.get("device"),
                       progress=inputs.get("progress", True), trust_checkpoint=inputs.get("trust_checkpoint", False),
                       **({} if text.get("file") else source))
    prov["text_model"] = ds.uns["text_model"]


def run_zeroshot(*, out: str | None = None, figures: bool = True, inputs: dict | None = None,
                 text: dict | None = None, **analysis_kwargs):
    """``treeprobe zeroshot``: load (:func:`load_inputs`) → text embeddings (:func:`add_text_embeddings`)
    → :func:`treeprobe.tl.image_text` (zero-shot per rank, mistakes, few-shot, the text tower's tree) →
    write a report with those sections. Returns ``(report, written paths)``."""
    from treeprobe import tl
    from treeprobe.report import Report, report_bytes, write_report

    if out:
        check_output_dir(out)
    inputs = dict(inputs or {})
    inputs.setdefault("progress", analysis_kwargs.get("progress", True))
    seed = analysis_kwargs.get("seed", 0)
    ds, prov = load_inputs(seed=seed, **inputs)
    tl.check_analysable(ds)
    if out:
        check_output_dir(out, need_bytes=report_bytes(len(ds)))
    add_text_embeddings(ds, prov, inputs, text=text or {})
    timings = tl.image_text(ds, **analysis_kwargs)
    tax = ds.taxonomy
    prov.update(analysis="image-text", seed=seed, n_items=len(ds), embedding_dim=ds.n_dims,
                n_taxa={r: tax.n_taxa(r) for r in tax.ranks}, taxonomy=dict(unknown=ds.unknown, missing=list(ds.missing)),
                zeroshot=ds.uns.get("zeroshot_params", {}), timings=timings, versions=tl.package_versions(),
                command=" ".join(sys.argv))
    ds.uns["provenance"] = prov
    report = Report.from_data(ds)
    paths = write_report(report, out, figures=figures) if out else {}
    return report, paths


def run_intrinsic(*, out: str | None = None, tree: str | None = None, figures: bool = True,
                  inputs: dict | None = None, text: dict | None = None, **analysis_kwargs):
    """Load (:func:`load_inputs` with ``inputs``) → analyse (:func:`treeprobe.tl.intrinsic`) → write.

    Returns ``(report, written paths)``; nothing is written when ``out`` is None. ``out`` is checked
    (:func:`~treeprobe._utils.check_output_dir`) before the inputs are loaded and again, with the space
    the report of that many items needs, before the analysis; the report replaces ``out`` as a whole.
    """
    from treeprobe import tl
    from treeprobe.report import report_bytes, write_report
    from treeprobe.tree import read_newick

    if out:
        check_output_dir(out)  # before any long work: an unwritable --out fails now, not after the analysis
    inputs = dict(inputs or {})
    inputs.setdefault("progress", analysis_kwargs.get("progress", True))
    ds, prov = load_inputs(seed=analysis_kwargs.get("seed", 0), **inputs)
    if out:
        check_output_dir(out, need_bytes=report_bytes(len(ds)))
    if tree:
        prov["tree_file"] = str(tree)
    if text is not None:
        add_text_embeddings(ds, prov, inputs, text=text)
        analysis_kwargs["image_text"] = True
    report = tl.intrinsic(ds, tree=read_newick(tree) if tree else None, provenance=prov, **analysis_kwargs)
    paths = write_report(report, out, figures=figures) if out else {}
    return report, paths


#: Items drawn by ``treeprobe intrinsic --sample`` (streamed embeddings) for kNN, clustering and maps.
DEFAULT_STREAM_SAMPLE = 100_000


def is_stream_source(path) -> bool:
    """Whether ``--embeddings PATH`` names shards to stream: a folder or a glob (``*``, ``?``, ``[``)."""
    import os

    p = os.fspath(path)
    return os.path.isdir(p) or any(c in p for c in "*?[")


def run_intrinsic_stream(source, *, out: str | None = None, figures: bool = True, where=None,
                         sample: int = DEFAULT_STREAM_SAMPLE, engine: str = "local", scheduler=None, metadata=None,
                         columns=None, batch_rows: int | None = None, progress: bool = True, **analysis_kwargs):
    """``treeprobe intrinsic`` on streamed embeddings: one bounded-memory pass over ``source`` (a folder or
    glob of parquet shards, a list, or one .parquet / .npy file) with
    ``species_statistics(source, where=where, gram=True, covariate=control, sample=sample, sample_seed=seed,
    engine=engine, scheduler=scheduler)`` (the columns ``control`` / ``covariate`` / ``species_covariates`` kept
    with the sample; per (species, category) sums of ``control`` for the partial Mantel test), then
    :func:`treeprobe.stream.intrinsic_from_stats` (``analysis_kwargs``: its options, as
    :func:`treeprobe.tl.intrinsic`'s) → write. The Mantel rows the statistics give and K_mult are exact over
    all rows; kNN, clustering and maps come from the sample; the report says which (``provenance["stream"]``).
    Returns ``(report, written paths)``; ``out`` is checked before the pass."""
    import time

    from treeprobe import stream
    from treeprobe.report import report_bytes, write_report

    if out:
        check_output_dir(out)  # before the pass, which can take hours
    seed = analysis_kwargs.get("seed", 0)
    keep = [analysis_kwargs.get("control"), analysis_kwargs.get("covariate")]
    sc = analysis_kwargs.get("species_covariates")
    keep += [sc] if isinstance(sc, str) else list(sc or ())
    kw = {} if batch_rows is None else dict(batch_rows=batch_rows)
    t0 = time.perf_counter()
    stats = stream.species_statistics(source, where=where, gram=True, sample=sample, sample_seed=seed,
                                      covariate=analysis_kwargs.get("control"),
                                      sample_columns=[c for c in dict.fromkeys(keep) if c], engine=engine,
                                      scheduler=scheduler, metadata=metadata, columns=columns, progress=progress, **kw)
    seconds = time.perf_counter() - t0
    n_sampled = stats.sample_info["n_sampled"]
    if out:
        check_output_dir(out, need_bytes=report_bytes(n_sampled))
    where_text = None if not where else {k: ([v] if isinstance(v, str) else list(v)) for k, v in where.items()}
    prov = dict(data=dict(source=str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} files",
                          kind="precomputed embeddings (streamed)", n_rows=int(stats.n_rows)),
                model=dict(name="precomputed embeddings", digest=None),
                stream=dict(engine=engine, scheduler=None if scheduler is None else str(scheduler), where=where_text,
                            pass_seconds=seconds, rows_per_second=stats.n_rows / seconds if seconds > 0 else None,
                            pass_timings=dict(stats.timings)))
    report = stream.intrinsic_from_stats(stats, progress=progress, provenance=prov, **analysis_kwargs)
    paths = write_report(report, out, figures=figures) if out else {}
    return report, paths


CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
EMBEDDING_SUFFIXES = (".npy", ".parquet", ".npz")


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``NAME=SOURCE`` or ``SOURCE`` → (name, :func:`load_inputs` keywords for the model part).

    SOURCE: a checkpoint file (.pt, .pth, .bin, .safetensors, .ckpt) or ``hf-hub:ORG/NAME``
    (embeds ``--data``); an embeddings file (.npy, .parquet, .npz); ``example:NAME`` (a bundled
    example); or ``ARCH:PRETRAINED`` (an open_clip architecture and pretrained tag, e.g.
    ``ViT-B-16:openai``). NAME defaults to the file's stem (or the source text).

    >>> parse_model_spec("bioclip=hf-hub:imageomics/bioclip")
    ('bioclip', {'ckpt': 'hf-hub:imageomics/bioclip'})
    >>> parse_model_spec("ViT-B-16:openai")
    ('ViT-B-16:openai', {'model': 'ViT-B-16', 'pretrained': 'openai'})
    """
    name, sep, source = spec.partition("=")
    if not sep or not name or "/" in name or name.startswith("hf-hub:"):
        name, source = "", spec
    source = source.strip()
    if not source:
        raise TreeprobeError(f"empty model source in {spec!r}; use NAME=CHECKPOINT, NAME=EMBEDDINGS or ARCH:TAG")
    suffix = Path(source).suffix.lower()
    if source.startswith("hf-hub:") or suffix in CKPT_SUFFIXES:
        kw = dict(ckpt=source)
    elif suffix in EMBEDDING_SUFFIXES:
        kw = dict(embeddings=source)
    elif source.startswith("example:"):
        from treeprobe.datasets import EXAMPLES

        kw = dict(example=source.split(":", 1)[1])
        if kw["example"] not in EXAMPLES:
            raise TreeprobeError(f"unknown example {kw['example']!r} in {spec!r}; choose from {', '.join(EXAMPLES)}")
    elif ":" in source:
        arch, tag = source.split(":", 1)
        kw = dict(model=arch, pretrained=tag or None)
    else:
        raise TreeprobeError(f"cannot tell what model source {source!r} is: give a checkpoint (.pt, .safetensors, "
                             "hf-hub:ORG/NAME), an embeddings file (.npy, .parquet), example:NAME or ARCH:PRETRAINED")
    if not name:
        name = Path(source).stem if ("ckpt" in kw or "embeddings" in kw) and not source.startswith("hf-hub:") else source
    return name, kw


def load_models(specs, *, data: str | None = None, metadata: str | None = None, **common) -> tuple[dict, dict]:
    """One TreeData per model spec (:func:`parse_model_spec`) and their provenance: models given as
    checkpoints / architectures embed the images of ``data``; embedding files and examples are read.
    ``common``: the other :func:`load_inputs` keywords (cache_dir, batch_size, device, ...)."""
    parsed: dict[str, dict] = {}
    for spec in specs:  # every spec checked before the first model is loaded (embedding can take hours)
        name, kw = parse_model_spec(spec)
        if name in parsed:
            raise TreeprobeError(f"two models are named {name!r}; name them: NAME=SOURCE")
        if "ckpt" in kw or "model" in kw:
            if data is None:
                raise TreeprobeError(f"model {name!r} is a checkpoint: pass --data with the images to embed")
            kw["data"] = data
        elif "embeddings" in kw:
            kw["metadata"] = metadata
        parsed[name] = kw
    out, prov = {}, {}
    for name, kw in parsed.items():
        ds, p = load_inputs(**kw, **common)
        out[name], prov[name] = ds, p
    return out, prov


def run_compare(*, models, out: str | None = None, figures: bool = True, inputs: dict | None = None,
                text: dict | None = None, **compare_kwargs):
    """Load every model (:func:`load_models` with ``inputs``) → :func:`treeprobe.compare.compare` → write
    (:func:`treeprobe.compare_report.write_comparison`). Returns ``(comparison, written paths)``.
    ``text`` (``text_types``, ``templates``, ``files``: model name → text-embedding file): zero-shot for every
    model too, with its own text tower (or its file)."""
    from treeprobe.compare import compare
    from treeprobe.compare_report import write_comparison

    if out:
        check_output_dir(out)  # before any model is loaded or embedded
    inputs = dict(inputs or {})
    inputs.setdefault("progress", compare_kwargs.get("progress", False))
    if text is not None:  # every text source checked before the first model is loaded
        specs = dict(parse_model_spec(spec) for spec in models)
        unknown = sorted(set(text.get("files", {})) - set(specs))
        if unknown:
            raise TreeprobeError(f"--text-embeddings names model {unknown[0]!r}, which is not a --model "
                                 f"(models: {', '.join(specs)})")
        lacking = [n for n, kw in specs.items() if n not in text.get("files", {}) and not
                   any(kw.get(k) for k in ("ckpt", "model"))]
        if lacking:
            raise TreeprobeError(f"zero-shot needs text embeddings for model {lacking[0]!r}: it is an embeddings file, "
                                 f"so pass --text-embeddings {lacking[0]}=FILE")
    datasets, prov = load_models(models, **inputs)
    for name, ds in datasets.items():
        ds.uns["provenance"] = prov[name]
        if text is not None:
            kw = specs[name]
            file = text.get("files", {}).get(name)
            add_text_embeddings(ds, prov[name], dict(inputs, **{k: v for k, v in kw.items() if k != "data"}),
                                text=dict(text, file=file))
    comp = compare(datasets, zeroshot=text is not None, **compare_kwargs)
    paths = write_comparison(comp, out, figures=figures) if out else {}
    return comp, paths
