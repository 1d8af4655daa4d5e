"""The intrinsic-analysis report: a data structure first, renderings second.

:class:`Report` holds every number (tables as DataFrames, 2-D maps as arrays,
provenance as a dict). :func:`write_report` renders it to a folder:

- ``report.json``  — every number and the provenance (machine-readable);
- ``per_rank.csv`` — one row per rank: taxa counts, clustering and kNN scores with chance;
- ``figures/*.png|pdf`` — rank-coloured t-SNE/UMAP maps, per-rank metrics, Mantel distance plot;
- ``report.md``    — a short human-readable report that shows the figures.
- ``report.html``  — the same report as one self-contained page (figures embedded, sortable tables, opens offline).

The folder is replaced as a whole (written into a temporary folder beside it, then renamed into place):
a reader sees the previous complete report or the new complete one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from treeprobe._utils import (OUTPUT_BYTES_PER_ITEM, OUTPUT_MIN_FREE_BYTES, atomic_output_dir, atomic_write,
                              atomic_write_text, rebase_paths)

__all__ = ["Report", "write_report", "write_report_files", "report_bytes", "write_figures", "load_report",
           "render_markdown"]


@dataclass
class Report:
    """Everything an intrinsic analysis produced.

    mantel: one row per (level, method): level 'image' or 'species-centroid', r, p, ...
    clustering: rank × method clustering scores with chance baselines (see treeprobe.clustering).
    knn: per-rank kNN agreement with chance (see treeprobe.neighbors).
    rank_summary: per-rank taxa counts.
    maps: name ('tsne', 'umap') → dict(coords (n, 2) float32, index (n,) int64 rows used).
    labels_by_rank: rank → cumulative labels (N,) of the analysed items (for plots).
    provenance: versions, seed, checkpoint digest, data source, counts, timings.
    skipped: DataFrame[item, reason] of inputs that were left out.
    """

    mantel: pd.DataFrame
    clustering: pd.DataFrame
    knn: pd.DataFrame
    rank_summary: pd.DataFrame
    maps: dict = field(default_factory=dict)
    labels_by_rank: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    mantel_sample: dict | None = None  # condensed (d_embed, d_tree) sample for the Mantel figure
    items: pd.DataFrame | None = None  # the analysed items (path, ranks, covariates), row i ↔ labels i

    @classmethod
    def from_data(cls, data) -> "Report":
        """The report of what the tools stored in a :class:`~treeprobe.core.TreeData` (see :mod:`treeprobe.tl`).

        Tables a tool has not produced are empty; ``skipped`` lists the inputs set aside and, with a
        user tree, the items whose species is not on it.
        """
        uns = data.uns
        maps = {}
        for name in ("tsne", "umap"):
            if f"X_{name}" in data.obsm:
                full = data.obsm[f"X_{name}"]
                index = np.flatnonzero(np.isfinite(full).all(axis=1))
                info = {k: uns.get(name, {}).get(k) for k in ("subsampled", "title")}
                maps[name] = dict(coords=full[index], index=index, info=info)
        frame = lambda key: uns[key] if key in uns else pd.DataFrame()  # noqa: E731
        tax = data.taxonomy
        skipped = [s for s in (data.skipped, uns.get("mantel_not_in_tree")) if s is not None and len(s)]
        return cls(
            mantel=frame("mantel"), clustering=frame("clustering"), knn=frame("knn"),
            rank_summary=tax.rank_summary(), maps=maps, labels_by_rank=tax.labels_by_rank(),
            provenance=dict(uns.get("provenance", {})),
            skipped=pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(columns=["item", "reason"]),
            mantel_sample=uns.get("mantel_pairs"), items=data.items,
        )

    @property
    def n_items(self) -> int:
        return int(self.provenance.get("n_items", 0))

    def headline(self) -> dict:
        """The few numbers a reader looks at first."""
        out = {}
        for _, row in self.mantel.iterrows():
            scheme = row.get("scheme")
            key = f"mantel_{row['level']}_{row['method']}" + (f"_{scheme}_permuted" if scheme == "images" else "")
            out[f"{key}_r"] = row["statistic"]
            out[f"{key}_p"] = row["p_value"]
        if len(self.knn):
            for _, row in self.knn.iterrows():
                out[f"knn_{row['rank']}_agreement_excess"] = row.get("agreement_excess")
        return out

    def per_rank(self) -> pd.DataFrame:
        """One row per rank: counts, clustering (k-means) and kNN scores next to their chance values."""
        df = self.rank_summary.copy()
        if len(self.clustering):
            for method, sub in self.clustering.groupby("method", sort=False):
                cols = [c for c in sub.columns if c not in ("rank", "method", "k", "n_items",
                                                            "n_singleton_taxa")]
                wide = sub.set_index("rank")[cols].add_prefix(f"{method}_")
                df = df.merge(wide, left_on="rank", right_index=True, how="left")
        if len(self.knn):
            cols = [c for c in self.knn.columns if c != "rank"]
            df = df.merge(self.knn.set_index("rank")[cols].add_prefix("knn_"), left_on="rank",
                          right_index=True, how="left")
        return df

    def items_table(self) -> pd.DataFrame:
        """One row per analysed item: its metadata plus the map coordinates (NaN if not drawn)."""
        if self.items is not None:
            df = self.items.copy()
        else:
            df = pd.DataFrame({r: [str(v).rsplit("|", 1)[-1] for v in labels]
                               for r, labels in self.labels_by_rank.items()})
        for name, m in self.maps.items():
            for axis in (0, 1):
                col = np.full(len(df), np.nan, dtype=np.float32)
                col[m["index"]] = m["coords"][:, axis]
                df[f"{name}_{axis + 1}"] = col
        return df

    def to_dict(self) -> dict:
        """JSON-ready dict of every number (maps as coordinates are left to the figures)."""
        return _jsonable(
            dict(
                treeprobe_report_version=1,
                headline=self.headline(),
                mantel=self.mantel.to_dict(orient="records"),
                clustering=self.clustering.to_dict(orient="records"),
                knn=self.knn.to_dict(orient="records"),
                rank_summary=self.rank_summary.to_dict(orient="records"),
                maps={k: dict(n_points=int(len(v["coords"])), **v.get("info", {})) for k, v in self.maps.items()},
                provenance=self.provenance,
                skipped=dict(count=int(len(self.skipped)), items=self.skipped.to_dict(orient="records")),
            )
        )


def _jsonable(obj):
    """Recursively convert numpy / pandas scalars; NaN and inf → None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj


def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{nd}f}"
    return str(x)


def _md_table(df: pd.DataFrame, cols: list[str], nd=3) -> str:
    cols = [c for c in cols if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], nd) for c in cols) + " |")
    return "\n".join(lines)


HOW_TO_READ = """## How to read this report

- **Each number comes with its reference.** A score is shown next to its chance value (what a representation
  unrelated to the taxonomy scores with these taxon sizes) and, where one exists, its ceiling (the most any
  representation can score here); read the excess over chance, or the normalised score (0 = chance, 1 = ceiling).
- **Each p-value says what was permuted** (column `permuted`), and so which question it answers. Images of one
  species are not independent draws: a test that permutes images only asks whether images are exchangeable,
  which within-species similarity alone rejects. The species-level tests move whole species between tree
  positions (and only between species with the same number of images), so they ask whether the representation
  follows the tree *above* species.
- **Unknown ranks are not evidence of identity.** Items unknown at a rank are not scored at that rank, and two
  unknowns are never counted as the same taxon; the counts lost at each rank are in the taxa table.
- **Skipped inputs** are listed with their reason at the end; nothing is dropped silently."""


def render_markdown(report: Report, figures: dict[str, str] | None = None) -> str:
    """A short readable report; ``figures`` maps figure name → relative PNG path."""
    prov = report.provenance
    lines = ["# treeprobe intrinsic report", ""]
    lines.append(f"Model: `{prov.get('model', {}).get('name', 'precomputed embeddings')}` "
                 f"(digest `{str(prov.get('model', {}).get('digest', '–'))[:16]}`). "
                 f"Data: `{prov.get('data', {}).get('source', '–')}`. "
                 f"Items analysed: {prov.get('n_items')}; skipped: {len(report.skipped)}. Seed: {prov.get('seed')}.")
    lines += ["", HOW_TO_READ]
    lines += ["", "## Does embedding distance follow the tree? (Mantel)", "",
              "Correlation between cosine distance of embeddings and patristic distance on the tree "
              f"({prov.get('tree', {}).get('kind', 'rank taxonomy')}); one-sided permutation p-value "
              "(H1: closer on the tree → closer in embedding space). `permuted` says what each p-value permuted.", ""]
    lines.append(_md_table(report.mantel, ["level", "scheme", "method", "statistic", "p_value", "permutations",
                                           "n_items", "n_pairs", "estimator", "permuted"]))
    lines += ["", "## Rank-wise clustering", "",
              "k-means / agglomerative clustering with k = number of taxa at each rank. Every score is shown "
              "next to its chance value (same k, permuted labels); `purity_excess` = (purity − chance)/(1 − chance). "
              "At fine ranks with many single-image taxa raw purity is high by construction: read the excess.", ""]
    lines.append(_md_table(report.clustering, ["rank", "method", "k", "purity", "purity_chance", "purity_excess",
                                               "nmi", "nmi_chance", "ami", "ari", "note"]))
    lines += ["", "## Nearest-neighbour rank agreement", "",
              "Share of each item's k nearest neighbours (cosine) in its own taxon; items alone in their taxon are "
              "excluded and counted. `ceiling`: the most any embedding can reach with these taxon sizes and k; "
              "`agreement_normalised` = (agreement − chance) / (ceiling − chance), comparable across ranks. "
              "`level_agreement`: the same among neighbours outside the item's own taxon one rank below, so a "
              "rank is not credited with its children's agreement.", ""]
    knn_cols = ["rank", "k", "agreement", "chance", "ceiling", "agreement_normalised", "agreement_excess",
                "level_agreement", "level_chance", "level_ceiling", "top1", "n_evaluated",
                "n_excluded_singletons", "n_unknown"]
    if "estimator" in report.knn and (report.knn["estimator"] == "query-subsample").any():
        n_q = int(report.knn["n_queries"].iloc[0])
        lines += [f"Estimated from {n_q:,} random query items (each with its exact neighbours among all "
                  f"items); `agreement_ci95` / `top1_ci95` are 95 % half-widths.", ""]
        knn_cols[3:3] = ["agreement_ci95"]
        knn_cols.insert(knn_cols.index("top1") + 1, "top1_ci95")
    lines.append(_md_table(report.knn, knn_cols))
    lines += ["", "## Taxa per rank", "", _md_table(report.rank_summary, list(report.rank_summary.columns))]
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            lines += [f"### {name}", "", f"![{name}]({path})", ""]
    if len(report.skipped):
        lines += ["", "## Skipped inputs", "", f"{len(report.skipped)} input(s) left out; by reason:", ""]
        for reason, n in report.skipped["reason"].astype(str).str.split(":").str[0].value_counts().items():
            lines.append(f"- {reason}: {n}")
        lines.append("")
        lines.append("The full list is in `report.json` (`skipped.items`).")
    lines += ["", "## Provenance", "", "```json", json.dumps(_jsonable(prov), indent=1)[:4000], "```", ""]
    return "\n".join(lines)


def report_bytes(n_items: int) -> int:
    """Free space (bytes) asked for before writing the report of ``n_items`` items: a fixed margin
    (:data:`~treeprobe._utils.OUTPUT_MIN_FREE_BYTES`) plus :data:`~treeprobe._utils.OUTPUT_BYTES_PER_ITEM` per item."""
    return OUTPUT_MIN_FREE_BYTES + OUTPUT_BYTES_PER_ITEM * max(int(n_items), 0)


def write_report(report: Report, out_dir: str | os.PathLike, *, figures: bool = True) -> dict[str, str]:
    """Write report.json, per_rank.csv, items.csv, figures/, report.md and report.html (one self-contained
    page: figures embedded, sortable tables) into ``out_dir``; return their paths (under ``out_dir``).

    The folder is written whole or not at all (:func:`~treeprobe._utils.atomic_output_dir`): the files go
    into a temporary folder beside ``out_dir`` that then replaces it, so an earlier report there is
    replaced entirely (none of its figures stay beside the new ones) and an error or an interrupt leaves
    it untouched. ``out_dir`` is checked first (:func:`~treeprobe._utils.check_output_dir`: an existing
    file, a folder that is neither empty nor a treeprobe output, an unwritable place or a full disk
    raise :class:`~treeprobe.errors.TreeprobeError`).
    """
    with atomic_output_dir(out_dir, need_bytes=report_bytes(report.n_items)) as tmp:
        paths = write_report_files(report, tmp, figures=figures)
    return rebase_paths(paths, tmp, out_dir)


def write_report_files(report: Report, out: Path, *, figures: bool = True) -> dict[str, str]:
    """The files of :func:`write_report`, written into the existing folder ``out`` as they are made (not
    atomically: callers write into a temporary folder). report.json comes last, so a folder without
    it is incomplete even when written in place."""
    paths: dict[str, str] = {}
    fig_paths: dict[str, str] = {}
    if figures:
        fig_paths = write_figures(report, out / "figures")
    atomic_write_text(out / "items.csv", report.items_table().to_csv(index=False), fsync=False)
    paths["items_csv"] = str(out / "items.csv")
    if report.mantel_sample is not None:
        atomic_write(out / "mantel_pairs.npz", lambda f: np.savez_compressed(f, **report.mantel_sample), fsync=False)
    per_rank = report.per_rank()
    atomic_write_text(out / "per_rank.csv", per_rank.to_csv(index=False), fsync=False)
    paths["per_rank_csv"] = str(out / "per_rank.csv")
    rel = {k: os.path.relpath(v, out) for k, v in fig_paths.items()}
    atomic_write_text(out / "report.md", render_markdown(report, rel))
    paths["markdown"] = str(out / "report.md")
    from treeprobe.html_report import intrinsic_html, write_html

    write_html(intrinsic_html(report, fig_paths), out / "report.html")
    paths["html"] = str(out / "report.html")
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, allow_nan=False))
    paths["json"] = str(out / "report.json")
    paths.update({f"figure:{k}": v for k, v in fig_paths.items()})
    return {k: paths[k] for k in ("json", *[k for k in paths if k != "json"])}


def write_figures(report: Report, fig_dir: Path) -> dict[str, str]:
    """Draw the report's maps, per-rank scores and Mantel distance plot into ``fig_dir`` (PNG + PDF);
    returns figure title → PNG path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from treeprobe import plots

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    names = {"tsne": "t-SNE", "umap": "UMAP"}
    for key, m in report.maps.items():
        labels = {r: np.asarray(v)[m["index"]] for r, v in report.labels_by_rank.items()}
        fig = plots.plot_rank_maps(m["coords"], labels, method_name=names.get(key, key),
                                   n_total=len(next(iter(report.labels_by_rank.values()))))
        png, _pdf = plots.save_figure(fig, str(fig_dir / f"{key}_by_rank"))
        out[f"{names.get(key, key)} coloured by rank"] = png
    if len(report.clustering) or len(report.knn):
        fig = plots.plot_rank_metrics(report.clustering, report.knn)
        png, _ = plots.save_figure(fig, str(fig_dir / "rank_metrics"))
        out["Scores per rank vs chance"] = png
    if report.mantel_sample is not None:
        fig = plots.plot_mantel_scatter(report.mantel_sample["d_embed"], report.mantel_sample["d_tree"])
        png, _ = plots.save_figure(fig, str(fig_dir / "mantel_distances"))
        out["Embedding distance by tree distance"] = png
    return out


def load_report(out_dir: str | os.PathLike) -> Report:
    """Read a folder written by :func:`write_report` back into a :class:`Report` (tables, maps,
    labels, provenance), e.g. to redraw its figures."""
    from treeprobe.errors import TreeprobeError
    from treeprobe._utils import RANKS
    from treeprobe.taxonomy import Taxonomy

    out = Path(out_dir)
    if not (out / "report.json").exists():
        raise TreeprobeError(f"no report.json in {out}")
    rep = json.loads((out / "report.json").read_text())
    items = pd.read_csv(out / "items.csv", keep_default_na=False, na_values=[""], low_memory=False)
    for r in RANKS:
        items[r] = items[r].fillna("").astype(str)
    rules = rep.get("provenance", {}).get("taxonomy", {"unknown": "placeholder"})  # reports before 0.2: placeholders
    tax = Taxonomy.from_frame(items, unknown=rules.get("unknown", "placeholder"),
                              **({"missing": rules["missing"]} if "missing" in rules else {}))
    maps = {}
    for name in ("tsne", "umap"):
        if f"{name}_1" in items.columns:
            xy = items[[f"{name}_1", f"{name}_2"]].to_numpy(dtype=np.float32)
            idx = np.flatnonzero(np.isfinite(xy).all(axis=1))
            maps[name] = dict(coords=xy[idx], index=idx, info=rep.get("maps", {}).get(name, {}))
    sample = None
    if (out / "mantel_pairs.npz").exists():
        with np.load(out / "mantel_pairs.npz") as z:
            sample = {k: z[k] for k in z.files}
    skipped = pd.DataFrame(rep["skipped"]["items"], columns=["item", "reason"])
    frame = lambda key: pd.DataFrame(rep.get(key, []))  # noqa: E731
    return Report(mantel=frame("mantel"), clustering=frame("clustering"), knn=frame("knn"),
                  rank_summary=frame("rank_summary"), maps=maps, labels_by_rank=tax.labels_by_rank(),
                  provenance=rep.get("provenance", {}), skipped=skipped, mantel_sample=sample,
                  items=items.drop(columns=[c for c in items.columns if c[:5] in ("tsne_", "umap_")]))
