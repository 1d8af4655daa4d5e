"""The I/O edge of ``treeprobe compare``: a :class:`~treeprobe.compare.Comparison` written to a folder.

``write_comparison(comp, out)`` writes

* ``compare.json``: every number (per-model table, paired differences, similarity, distance profiles,
  drill-down t-SNE coordinates, each model's intrinsic report), enough to redraw every figure
  (``figures/compare_figures.py compare.json``) without the embeddings;
* ``per_model.csv``, ``differences.csv``, ``similarity.csv``;
* ``report.md`` (readable) and ``report.html`` (one self-contained page: figures embedded,
  sortable tables, no network access needed);
* ``figures/``: per-rank metric panels with intervals, distance-by-tree-distance profiles and the
  drill-down t-SNE (PNG + vector PDF);
* ``models/<name>/``: each model's intrinsic report (``report.json``, ``per_rank.csv``, ``report.md``).

The folder is replaced as a whole (written into a temporary folder beside it, then renamed into place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from treeprobe._utils import atomic_output_dir, atomic_write_text, rebase_paths

__all__ = ["write_comparison", "write_compare_figures", "render_compare_markdown", "how_to_read", "PANEL_METRICS",
           "FIGURES"]

#: Metrics drawn in the per-rank panels (the other rows are in the tables).
PANEL_METRICS = ("knn agreement", "knn level agreement", "kmeans nmi", "kmeans purity")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "model"


#: Figure file stem → (the JSON key it is drawn from, its title).
FIGURES = {"metric_panels": ("per_model", "Scores per rank, all models (95 % intervals)"),
           "drilldown_tsne": ("drilldown_tsne", "Drill-down t-SNE (each column: the largest taxon of the rank above)"),
           "distance_profiles": ("distance_profiles", "Embedding distance by tree distance")}


def write_compare_figures(obj: dict, fig_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Draw the figures of a comparison from its JSON-ready dict (``Comparison.to_dict()`` or a loaded
    ``compare.json``) into ``fig_dir``: figure stem → (PNG, PDF path), in the order of :data:`FIGURES`;
    a figure whose key is absent or empty is not drawn. The metric panels show :data:`PANEL_METRICS`
    (all metrics when none of those is present)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from treeprobe import compare_plots
    from treeprobe.plots import save_figure

    fig_dir = Path(fig_dir)
    out = {}
    for stem, (key, _title) in FIGURES.items():
        part = obj.get(key)
        if not part:
            continue
        fig_dir.mkdir(parents=True, exist_ok=True)
        if stem == "metric_panels":
            table = pd.DataFrame(part)
            wanted = table["metric"].isin(PANEL_METRICS)
            fig = compare_plots.plot_metric_panels(table[wanted] if wanted.any() else table)
        elif stem == "distance_profiles":
            fig = compare_plots.plot_distance_profiles({m: pd.DataFrame(v) for m, v in part.items()})
        else:
            fig = compare_plots.plot_drilldown(pd.DataFrame(part))
        out[stem] = save_figure(fig, str(fig_dir / stem))
    return out


def _md(df: pd.DataFrame, cols=None, nd: int = 4) -> str:
    from treeprobe.report import _md_table

    if df is None or not len(df):
        return "(none)"
    return _md_table(df, [c for c in (cols or list(df.columns)) if c in df.columns], nd=nd)


def how_to_read() -> str:
    """What the tables of a comparison hold and what each p-value resampled (Markdown bullets)."""
    from treeprobe.compare import BOOTSTRAP_SCHEME, JACKKNIFE_SCHEME

    return "\n".join([
        "- `per model`: each metric with a 95 % interval and its chance value. Mantel p-values are each "
        "model's own test (species permuted among tree positions).",
        "- `paired differences`: model_a − model_b on the same items. The unit of resampling is the species, "
        f"never the image. Mantel r: {BOOTSTRAP_SCHEME}. kNN agreement and clustering: {JACKKNIFE_SCHEME}. "
        "`p_holm`: Holm-adjusted across ranks within each metric and model pair."])


def render_compare_markdown(comp, figures: dict[str, str] | None = None) -> str:
    """A readable report of a comparison; ``figures`` maps title → relative PNG path."""
    p = comp.params
    lines = ["# treeprobe comparison", "",
             f"Models: {', '.join(f'`{m}`' for m in comp.models)}. Items: {p.get('n_items')} "
             f"({p.get('n_species_units')} species units). Seed {p.get('seed')}, {p.get('bootstrap')} bootstrap "
             f"resamples, {p.get('permutations')} permutations per model's own tests.", "",
             "## How to read this comparison", "", how_to_read(), "",
             "## Paired differences", "",
             _md(comp.differences, ["metric", "rank", "model_a", "model_b", "estimate_a", "estimate_b",
                                    "difference", "ci_low", "ci_high", "p_value", "p_holm"]), "",
             "## Per model", "",
             _md(comp.per_model, ["model", "metric", "rank", "estimate", "ci_low", "ci_high", "chance",
                                  "p_value", "n"]), ""]
    if len(comp.similarity):
        lines += ["## Model-to-model similarity (debiased linear CKA, RSA)", "", _md(comp.similarity), ""]
    if figures:
        lines += ["## Figures", ""]
        for name, path in figures.items():
            lines += [f"### {name}", "", f"![{name}]({path})", ""]
    return "\n".join(lines)


def write_comparison(comp, out_dir: str | os.PathLike, *, figures: bool = True, model_reports: bool = True
                     ) -> dict[str, str]:
    """Write a comparison into ``out_dir`` (see the module docstring); returns the written paths (under
    ``out_dir``). Like :func:`~treeprobe.report.write_report`, the folder is checked first and replaced
    as a whole (temporary folder renamed into place): an error or an interrupt leaves an earlier
    comparison there untouched, and none of its files stay beside the new ones."""
    from treeprobe.report import report_bytes

    n_items = int(comp.params.get("n_items") or 0)
    need = report_bytes(n_items * (1 + (len(comp.reports) if model_reports else 0)))
    with atomic_output_dir(out_dir, need_bytes=need) as tmp:
        paths = _write_comparison_files(comp, tmp, figures=figures, model_reports=model_reports)
    return rebase_paths(paths, tmp, out_dir)


def _write_comparison_files(comp, out: Path, *, figures: bool, model_reports: bool) -> dict[str, str]:
    """The files of :func:`write_comparison` in the existing folder ``out``; compare.json comes last."""
    from treeprobe.html_report import compare_html, write_html
    from treeprobe.report import write_report_files

    obj = comp.to_dict()
    paths: dict[str, str] = {}
    for name, df in (("per_model", comp.per_model), ("differences", comp.differences),
                     ("similarity", comp.similarity)):
        atomic_write_text(out / f"{name}.csv", df.to_csv(index=False), fsync=False)
        paths[f"{name}_csv"] = str(out / f"{name}.csv")
    drawn = write_compare_figures(obj, out / "figures") if figures else {}
    fig_paths = {FIGURES[stem][1]: png for stem, (png, _pdf) in drawn.items()}
    if model_reports:
        for name, report in comp.reports.items():
            folder = out / "models" / _safe(name)
            folder.mkdir(parents=True, exist_ok=True)
            write_report_files(report, folder, figures=False)
    rel = {k: os.path.relpath(v, out) for k, v in fig_paths.items()}
    atomic_write_text(out / "report.md", render_compare_markdown(comp, rel))
    paths["markdown"] = str(out / "report.md")
    meta = {k: v for k, v in comp.params.items() if v is not None}
    write_html(compare_html(comp.per_model, comp.differences, similarity=comp.similarity, figures=fig_paths,
                            meta=meta, how_to_read=how_to_read()), out / "report.html")
    paths["html"] = str(out / "report.html")
    atomic_write_text(out / "compare.json", json.dumps(obj, indent=1, allow_nan=False))
    paths["json"] = str(out / "compare.json")
    paths.update({f"figure:{k}": v for k, v in fig_paths.items()})
    return paths
