"""The intrinsic-analysis report: a data structure first, renderings second.

:class:`Report` holds every number (tables as DataFrames, 2-D maps as arrays,
provenance as a dict). :func:`write_report` renders it to a folder:

- ``report.json``  — every number and the provenance (machine-readable);
- ``per_rank.csv`` — one row per rank: taxa counts, clustering and kNN scores with chance;
- ``figures/*.png|pdf`` — rank-coloured t-SNE/UMAP maps, per-rank metrics, Mantel distance plot;
- ``report.md``    — a short human-readable report that shows the figures;
- ``trees/*.nwk``  — the trees recovered from the embeddings (with ``phylo``).
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

__all__ = ["Report", "STREAM_SECTION", "n_skipped", "stream_summary_text", "PHYLO_TABLES", "PHYLO_SECTIONS", "IMAGE_TEXT_TABLES", "IMAGE_TEXT_SECTIONS", "write_report", "write_report_files", "report_bytes", "write_figures", "load_report",
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
    #: tree-level analyses (``tl.intrinsic(phylo=True)``): name (:data:`PHYLO_TABLES`) → DataFrame
    phylo: dict = field(default_factory=dict)
    #: image-text analyses (``tl.image_text``): name (:data:`IMAGE_TEXT_TABLES`) → DataFrame
    image_text: dict = field(default_factory=dict)
    #: the recovered trees as Newick: "<level>_<method>" → text (written to ``trees/``)
    trees: dict = field(default_factory=dict)
    #: the tools' result objects, for the figures only (not written; absent in a loaded report)
    results: dict = field(default_factory=dict, repr=False)

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
        phylo, trees, results = _phylo_parts(uns)
        image_text = {name: uns[key] for name, (key, _) in IMAGE_TEXT_TABLES.items()
                      if isinstance(uns.get(key), pd.DataFrame)}
        return cls(
            mantel=frame("mantel"), clustering=frame("clustering"), knn=frame("knn"),
            rank_summary=tax.rank_summary(), maps=maps, labels_by_rank=tax.labels_by_rank(),
            provenance=dict(uns.get("provenance", {})),
            skipped=pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(columns=["item", "reason"]),
            mantel_sample=uns.get("mantel_pairs"), items=data.items, phylo=phylo, trees=trees, results=results,
            image_text=image_text,
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
        out.update(_phylo_headline(self.phylo))
        out.update(_image_text_headline(self.image_text))
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
                **({"phylo": {k: v.to_dict(orient="records") for k, v in self.phylo.items()}} if self.phylo else {}),
                **({"image_text": {k: v.to_dict(orient="records") for k, v in self.image_text.items()
                                   if k != "fewshot_splits"}} if self.image_text else {}),
            )
        )


#: The tables of the tree-level analyses in :attr:`Report.phylo` (and ``report.json["phylo"]``), from the
#: keys :mod:`treeprobe.tl` stores: name → (uns key, what it holds).
PHYLO_TABLES = {
    "physignal": ("physignal", "K_mult of the species centroids (one row)"),
    "physignal_axes": ("physignal_axes", "K per principal axis"),
    "tree_recovery": ("tree_recovery", "recovered-tree scores, one row per level"),
    "tree_recovery_ranks": ("tree_recovery_ranks", "dendrogram purity and monophyly per level × rank"),
    "within_species_variation": ("within_species_variation", "within- vs between-species variation (one row)"),
    "within_species_variation_ranks": ("within_species_variation_ranks", "the same per rank"),
    "covariate_alignment": ("covariate_alignment_table", "embedding vs species covariate distance, given the tree"),
}


#: The tables of the image-text analyses in :attr:`Report.image_text` (``report.json["image_text"]``; the
#: few-shot splits go to ``fewshot_splits.csv`` instead): name → (uns key, what it holds).
IMAGE_TEXT_TABLES = {
    "zeroshot": ("zeroshot", "zero-shot accuracy per text type × rank × mode"),
    "mistakes": ("mistakes", "mistake severity of the top-1 species, per text type"),
    "mistake_depths": ("mistake_depths", "distance-of-mistakes histogram, per text type"),
    "fewshot": ("fewshot", "few-shot accuracy per rank × k × method over seeds"),
    "fewshot_splits": ("fewshot_splits", "the few-shot splits (fewshot_splits.csv)"),
    "text_tree": ("text_tree", "the text tower's tree: species-name embeddings against the taxonomy"),
    "image_text_alignment": ("image_text_alignment", "own vs sibling taxon text cosine per rank"),
}


def _image_text_headline(tables: dict) -> dict:
    out = {}
    z = tables.get("zeroshot")
    if z is not None and len(z):
        for _, row in z[z["mode"] == "species_summed"].iterrows():
            out[f"zeroshot_{row['text_type']}_{row['rank']}_top1"] = row["top1"]
    m = tables.get("mistakes")
    if m is not None and len(m):
        for _, row in m[m["metric"].isin(["mistake_severity", "nlca"])].iterrows():
            out[f"mistakes_{row['text_type']}_{row['metric']}"] = row["value"]
    f = tables.get("fewshot")
    if f is not None and len(f):
        for _, row in f[(f["method"] == "simpleshot")].iterrows():
            out[f"fewshot_{int(row['k'])}shot_{row['rank']}"] = row["mean"]
    t = tables.get("text_tree")
    if t is not None and len(t):
        for _, row in t.iterrows():
            if str(row["statistic"]).startswith("Mantel"):
                out.update(text_tree_mantel_r=row["value"], text_tree_mantel_p=row["p_value"])
            if str(row["statistic"]).startswith("K_mult"):
                out.update(text_tree_K=row["value"], text_tree_K_p=row["p_value"])
    return out


def _one_row(value) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    flat = {k: ("; ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
            for k, v in dict(value).items() if not isinstance(v, dict)}
    return pd.DataFrame([flat])


def _phylo_parts(uns) -> tuple[dict, dict, dict]:
    """(tables, Newick trees, result objects) of the tree-level tools stored in ``uns``."""
    tables = {name: _one_row(uns[key]) for name, (key, _) in PHYLO_TABLES.items() if key in uns}
    results = {k: uns[f"{k}_result"] for k in ("physignal", "tree_recovery", "covariate_alignment")
               if f"{k}_result" in uns}
    trees = {}
    if "tree_recovery" in results:
        res = results["tree_recovery"]
        trees = {f"{level}_{res.method}": t.to_newick() for level, t in res.trees.items()}
    return tables, trees, results


def _phylo_headline(phylo: dict) -> dict:
    out = {}
    if "physignal" in phylo and len(phylo["physignal"]):
        row = phylo["physignal"].iloc[0]
        out.update(physignal_K=row.get("statistic"), physignal_p=row.get("p_value"), physignal_z=row.get("z"))
    if "tree_recovery" in phylo:
        for _, row in phylo["tree_recovery"].iterrows():
            for key in ("cophenetic_r", "cophenetic_r_p", "nrf", "nrf_p"):
                out[f"tree_{row['level']}_{key}"] = row.get(key)
    if "within_species_variation" in phylo and len(phylo["within_species_variation"]):
        row = phylo["within_species_variation"].iloc[0]
        for key in ("within_outside_share", "isotropic_outside_share", "shift_angle_deg", "p_angle", "p_norm"):
            if key in row.index:
                out[f"variation_{key}"] = row[key]
    if "covariate_alignment" in phylo and len(phylo["covariate_alignment"]):
        for _, row in phylo["covariate_alignment"].iterrows():
            if row["statistic"].startswith("partial"):
                out.update(covariate_partial_r=row["r"], covariate_partial_p=row["p_value"])
    return out


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
    for i in range(len(df)):  # by column, not iterrows: a row of ints and floats would come back as floats
        lines.append("| " + " | ".join(_fmt(df[c].iat[i], nd).replace("|", "\\|") for c in cols) + " |")
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


#: Title of the section of a streamed report that says which numbers are exact and which sampled.
STREAM_SECTION = "Exact over all rows, or from the sample"


def n_skipped(report: Report) -> int:
    """Inputs left out: the rows a streaming pass set aside (``provenance["stream"]``), else ``len(skipped)``."""
    st = report.provenance.get("stream") or {}
    return int(st["n_set_aside"]) if "n_set_aside" in st else len(report.skipped)


def stream_summary_text(prov: dict) -> str | None:
    """The paragraph and list of a streamed report (``provenance["stream"]``, see
    :func:`treeprobe.stream.intrinsic_from_stats`) saying which numbers are exact over all rows and which come
    from the sample (None for an in-memory report). Markdown; the HTML page renders the same text."""
    st = prov.get("stream")
    if not st:
        return None
    smp = st.get("sample") or {}
    where = st.get("where")
    where_text = "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in where.items()) if where else ""
    set_aside = st.get("n_set_aside_by_reason") or {}
    rate = st.get("rows_per_second")
    lines = [
        f"Streamed: one pass over {st.get('n_files')} file(s), {st.get('n_rows', 0):,} rows read"
        + (f", {st.get('n_filtered_by_where', 0):,} left out by `where` ({where_text})" if where else "")
        + f", {st.get('n_set_aside', 0):,} set aside"
        + (" (" + ", ".join(f"{r}: {n:,}" for r, n in set_aside.items()) + ")" if set_aside else "")
        + f"; {st.get('n_items', 0):,} items of {st.get('n_species', 0):,} species used"
        + (f" (and {st['n_single_item_units']:,} items unknown at species, each its own unit)"
           if st.get("n_single_item_units") else "")
        + f". Engine `{st.get('engine', 'local')}`"
        + (f", {st['pass_seconds']:.1f} s" if isinstance(st.get("pass_seconds"), (int, float)) else "")
        + (f" ({rate:,.0f} rows/s)" if isinstance(rate, (int, float)) else "") + ".",
        "",
        f"- **Exact over all {st.get('n_items', 0):,} items** (from per-species sums, the same numbers and "
        "p-values as the in-memory analysis of every row): " + "; ".join(st.get("exact", [])) + ".",
        f"- **From the stratified sample** of {smp.get('n_sampled', 0):,} items (asked {smp.get('size', 0):,}, "
        f"seed {smp.get('seed')}; "
        + ("every item kept" if smp.get("cap") is None else
           f"at most {smp['cap']} items per stratum, {smp.get('n_extra', 0):,} strata given {smp['cap'] + 1}")
        + f"; {smp.get('n_strata_whole', 0):,} of {smp.get('n_strata', 0):,} strata kept whole): "
        + "; ".join(st.get("from_sample", [])) + ". Sampling rule: " + str(smp.get("rule", "")) + ".",
    ]
    for miss in st.get("not_computed", []):
        lines.append(f"- **Not computed**: {'; '.join(miss['rows'])} (`estimator` says so): {miss['reason']}.")
    return "\n".join(lines)


def render_markdown(report: Report, figures: dict[str, str] | None = None) -> str:
    """A short readable report; ``figures`` maps figure name → relative PNG path."""
    prov = report.provenance
    lines = [f"# treeprobe {prov.get('analysis', 'intrinsic')} report", ""]
    lines.append(f"Model: `{prov.get('model', {}).get('name', 'precomputed embeddings')}` "
                 f"(digest `{str(prov.get('model', {}).get('digest', '–'))[:16]}`). "
                 f"Data: `{prov.get('data', {}).get('source', '–')}`. "
                 f"Items analysed: {prov.get('n_items')}; skipped: {n_skipped(report)}. Seed: {prov.get('seed')}.")
    streamed = stream_summary_text(prov)
    if streamed:
        lines += ["", f"## {STREAM_SECTION}", "", streamed]
    lines += ["", HOW_TO_READ]
    every = prov.get("analysis", "intrinsic") != "image-text"  # an intrinsic report shows every section, even empty
    if every or len(report.mantel):
        lines += ["", "## Does embedding distance follow the tree? (Mantel)", "",
                  "Correlation between cosine distance of embeddings and patristic distance on the tree "
                  f"({prov.get('tree', {}).get('kind', 'rank taxonomy')}); one-sided permutation p-value "
                  "(H1: closer on the tree → closer in embedding space). `permuted` says what each p-value permuted.", ""]
        lines.append(_md_table(report.mantel, ["level", "scheme", "method", "statistic", "p_value", "permutations",
                                               "n_items", "n_pairs", "estimator", "permuted"]))
    if every or len(report.clustering):
        lines += ["", "## Rank-wise clustering", "",
                  "k-means / agglomerative clustering with k = number of taxa at each rank. Every score is shown "
                  "next to its chance value (same k, permuted labels); `purity_excess` = (purity − chance)/(1 − chance). "
                  "At fine ranks with many single-image taxa raw purity is high by construction: read the excess.", ""]
        lines.append(_md_table(report.clustering, ["rank", "method", "k", "purity", "purity_chance", "purity_excess",
                                                   "nmi", "nmi_chance", "ami", "ari", "note"]))
    if every or len(report.knn):
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
    lines += _phylo_markdown(report.phylo)
    lines += _phylo_markdown(report.image_text, IMAGE_TEXT_SECTIONS)
    lines += ["", "## Taxa per rank", "", _md_table(report.rank_summary, list(report.rank_summary.columns))]
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            lines += [f"### {name}", "", f"![{name}]({path})", ""]
    by_reason = (prov.get("stream") or {}).get("n_set_aside_by_reason")
    if by_reason:  # a streamed report: the counts of the pass, a few examples in report.json
        lines += ["", "## Skipped inputs", "", f"{n_skipped(report)} input(s) left out; by reason:", ""]
        lines += [f"- {reason}: {n}" for reason, n in by_reason.items()]
        lines += ["", "Up to 5 examples per reason (file and row) are in `report.json` (`skipped.items`)."]
    elif len(report.skipped):
        lines += ["", "## Skipped inputs", "", f"{len(report.skipped)} input(s) left out; by reason:", ""]
        for reason, n in report.skipped["reason"].astype(str).str.split(":").str[0].value_counts().items():
            lines.append(f"- {reason}: {n}")
        lines.append("")
        lines.append("The full list is in `report.json` (`skipped.items`).")
    lines += ["", "## Provenance", "", "```json", json.dumps(_jsonable(prov), indent=1)[:4000], "```", ""]
    return "\n".join(lines)


#: Text and columns of each tree-level section (markdown and HTML): title, explanation, [(table, columns)].
PHYLO_SECTIONS = [
    ("Phylogenetic signal (K_mult)",
     "Adams' (2014) multivariate K of the species centroids on the tree: K = 1 is what Brownian motion along "
     "the tree gives, K < 1 less resemblance between relatives than that, K > 1 more; `z` is K's effect size "
     "in its permutation distribution (log scale). `permuted` says what the p-value permuted. Per principal "
     "axis of the centroids: K of that axis alone.",
     [("physignal", ["statistic", "p_value", "z", "permutations", "n_species", "n_dims", "permuted"]),
      ("physignal_axes", ["axis", "variance_share", "K", "p_value", "z", "K_cumulative"])]),
    ("Tree recovered from the embeddings",
     "A tree of taxon centroids (cosine distance) against the rank taxonomy: cophenetic r (1 = the same "
     "distances), normalised Robinson-Foulds distance `nrf` (0 = the same splits; `nrf_best` is the lowest a "
     "binary tree can reach against the polytomies of the taxonomy), the share of the taxonomy's splits "
     "recovered (`split_recall`); per rank, dendrogram purity and the share of taxa that form a clade "
     "(`monophyly`). Each next to its permutation null (`_null`: mean over the permutations) and p; `_best` "
     "is the ceiling. The trees are in `trees/` (Newick).",
     [("tree_recovery", ["level", "n_leaves", "cophenetic_r", "cophenetic_r_null", "cophenetic_r_p", "nrf",
                         "nrf_null", "nrf_best", "nrf_p", "split_recall", "split_recall_null", "split_recall_p",
                         "permuted"]),
      ("tree_recovery_ranks", ["level", "rank", "n_taxa", "purity", "purity_null", "purity_p", "monophyly",
                               "monophyly_null", "monophyly_p", "n_monophyletic"])]),
    ("Within- vs between-species variation",
     "Share of the within-species deviations (image minus its species centroid) outside the principal "
     "subspace of the between-taxon differences at each rank, next to the share an isotropic spread leaves "
     "outside (`isotropic_outside_share`; `within_outside_z` in random-subspace sd). With a covariate: the "
     "mean within-species shift between its two levels, its angle to that subspace (90° = orthogonal) next to "
     "the permutation mean, and p-values with the covariate shuffled within species (`p_norm`: is there a "
     "shift; `p_angle`: is it further from the subspace than chance).",
     [("within_species_variation", ["covariate", "levels", "n_species_both", "shift_norm", "p_norm",
                                    "shift_angle_deg", "p_angle", "within_outside_share",
                                    "isotropic_outside_share", "within_outside_z", "n_items_within"]),
      ("within_species_variation_ranks", ["rank", "n_taxa", "n_components", "variance_explained",
                                          "within_outside_share", "isotropic_outside_share", "within_outside_z",
                                          "shift_angle_deg", "perm_angle_mean_deg", "p_angle"])]),
    ("Covariate alignment",
     "Mantel correlation between the embedding distance of species centroids and the distance of a species "
     "covariate, and the same given the tree (partial Mantel): does the embedding follow the covariate beyond "
     "what relatedness explains? `permuted` says what each p-value permuted.",
     [("covariate_alignment", ["statistic", "r", "p_value", "permutations", "n_species", "permuted"])]),
]


#: Text and columns of each image-text section (markdown and HTML), as :data:`PHYLO_SECTIONS`.
IMAGE_TEXT_SECTIONS = [
    ("Zero-shot classification per rank",
     "Each image classified among the taxa of its data set by cosine to the text embedding of each taxon "
     "(`text_type`: the caption type). `flat`: the best of all taxa of the rank; `top_down`: the best "
     "kingdom, then the best phylum within it, ...; `species_summed`: species probabilities summed up the "
     "tree (as pybioclip). Intervals (`_lo`, `_hi`) resample species with all their images; `chance_top1` is "
     "uniform guessing among the rank's taxa, `majority` always naming the most frequent one.",
     [("zeroshot", ["text_type", "rank", "mode", "n_items", "n_taxa", "top1", "top1_lo", "top1_hi", "topk",
                    "topk_lo", "topk_hi", "k", "chance_top1", "chance_topk", "majority"])]),
    ("How far wrong the mistakes are",
     "For the top-1 species: `mean_lca_depth` (ranks shared with the truth, 7 = right species), "
     "`mistake_severity` (mean height of the lowest common ancestor over the mistakes only; Bertinetto et al. "
     "2020), `hdist@k` (mean LCA height of the k best species), `nlca` (LCA height / tree height, over all "
     "images), each next to uniform guessing among the candidate species (`chance`, exact). The histogram "
     "says at which rank prediction and truth part.",
     [("mistakes", ["text_type", "metric", "value", "lo", "hi", "chance", "n_items"]),
      ("mistake_depths", ["text_type", "depth", "lca_rank", "count", "fraction", "chance_fraction"])]),
    ("Few-shot classification per rank",
     "k support images per taxon (seeded splits, in `fewshot_splits.csv`: rerun them with "
     "`treeprobe.fewshot.read_splits`), the rest queries; SimpleShot (nearest centred, normalised class "
     "mean) and a logistic-regression probe on the image embeddings. Mean, sd, min and max over the seeds, "
     "next to chance (1 / taxa evaluated); taxa with fewer than k + 1 images are excluded and counted.",
     [("fewshot", ["rank", "k", "method", "mean", "sd", "min", "max", "n_seeds", "n_taxa", "chance",
                   "n_excluded_taxa"])]),
    ("The text tower's tree",
     "The text embeddings of the species names as a data set of their own, scored against the taxonomy: "
     "Mantel r, K_mult and the recovered tree, with permutation p-values. Then, per rank, each image's cosine "
     "to its own taxon's text and to its sibling taxa's texts (same parent): `margin` = own − sibling and "
     "`top1_siblings` (own text beats every sibling) next to chance, with species-bootstrap intervals (how "
     "precisely the margin of these taxa is measured). `margin_p` is the test: the texts permuted among "
     "siblings (same parent), so it asks whether each taxon's own text fits its images better than a sibling's; "
     "with few sibling sets (`n_sibling_sets`) it cannot reach small values.",
     [("text_tree", ["text_type", "statistic", "value", "p_value", "chance", "n", "permuted"]),
      ("image_text_alignment", ["text_type", "rank", "n_items", "n_no_siblings", "own_cos", "sibling_cos",
                                "margin", "margin_lo", "margin_hi", "margin_p", "n_sibling_sets", "top1_siblings",
                                "top1_siblings_lo", "top1_siblings_hi", "chance"])]),
]


def _phylo_markdown(phylo: dict, sections=None) -> list[str]:
    lines = []
    for title, text, tables in PHYLO_SECTIONS if sections is None else sections:
        present = [(name, cols) for name, cols in tables if name in phylo and len(phylo[name])]
        if not present:
            continue
        lines += ["", f"## {title}", "", text, ""]
        for name, cols in present:
            df = phylo[name]
            lines += [_md_table(df, list(df.columns) if cols is None else cols), ""]
    return lines


def report_bytes(n_items: int) -> int:
    """Free space (bytes) asked for before writing the report of ``n_items`` items: a fixed margin
    (:data:`~treeprobe._utils.OUTPUT_MIN_FREE_BYTES`) plus :data:`~treeprobe._utils.OUTPUT_BYTES_PER_ITEM` per item."""
    return OUTPUT_MIN_FREE_BYTES + OUTPUT_BYTES_PER_ITEM * max(int(n_items), 0)


def _rows_written(report: Report) -> int:
    """Rows of items.csv: the analysed items, or for a streamed report (``provenance["stream"]``) its sample."""
    if report.provenance.get("stream") and report.items is not None:
        return len(report.items)
    return report.n_items


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
    with atomic_output_dir(out_dir, need_bytes=report_bytes(_rows_written(report))) as tmp:
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
    splits = report.image_text.get("fewshot_splits")
    if splits is not None and len(splits):
        from treeprobe.fewshot import write_splits

        write_splits(splits, out / "fewshot_splits.csv")
        paths["fewshot_splits_csv"] = str(out / "fewshot_splits.csv")
    for name, text in report.trees.items():
        (out / "trees").mkdir(exist_ok=True)
        atomic_write_text(out / "trees" / f"{name}.nwk", text + "\n", fsync=False)
        paths[f"tree:{name}"] = str(out / "trees" / f"{name}.nwk")
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
    out.update(_phylo_figures(report, fig_dir))
    out.update(_image_text_figures(report.image_text, fig_dir))
    return out


def _image_text_figures(tables: dict, fig_dir: Path) -> dict[str, str]:
    """The image-text figures, drawn from their tables (so a loaded report redraws them)."""
    from treeprobe import image_text_plots as itp
    from treeprobe import plots

    out = {}
    for name, fn, title in (("zeroshot", itp.plot_zeroshot, "Zero-shot accuracy per rank"),
                            ("mistake_depths", itp.plot_mistake_depths, "Distance of mistakes"),
                            ("fewshot", itp.plot_fewshot, "Few-shot accuracy per rank"),
                            ("image_text_alignment", itp.plot_image_text_alignment, "Image-text alignment per rank")):
        if name in tables and len(tables[name]):
            png, _ = plots.save_figure(fn(tables[name]), str(fig_dir / name))
            out[title] = png
    return out


def _phylo_figures(report: Report, fig_dir: Path) -> dict[str, str]:
    """The tree-level figures: K_mult and the tanglegram need the result objects (a freshly made report),
    the variation figure only its table."""
    from treeprobe import phylo_plots, plots

    out = {}
    if "physignal" in report.results:
        png, _ = plots.save_figure(phylo_plots.plot_physignal(report.results["physignal"]),
                                   str(fig_dir / "physignal"))
        out["K_mult against its permutation null"] = png
    if "tree_recovery" in report.results:
        from treeprobe.tree_recovery import plot_tree_recovery

        res = report.results["tree_recovery"]
        level = "species" if "species" in res.trees else next(iter(res.trees))
        ranks = res.ranks[res.ranks["level"] == level]["rank"].tolist()
        rank = "order" if "order" in ranks else (ranks[-1] if ranks else None)
        if rank is not None:
            png, _ = plots.save_figure(plot_tree_recovery(res, level=level, rank=rank),
                                       str(fig_dir / f"tree_recovery_{level}"))
            out[f"Recovered tree ({level}) beside the taxonomy, coloured by {rank}"] = png
    table = report.phylo.get("within_species_variation_ranks")
    if table is not None and len(table):
        png, _ = plots.save_figure(phylo_plots.plot_within_species_variation(table),
                                   str(fig_dir / "within_species_variation"))
        out["Within-species variation outside the between-taxon subspace"] = png
    if "covariate_alignment" in report.results:
        png, _ = plots.save_figure(phylo_plots.plot_covariate_alignment(report.results["covariate_alignment"]),
                                   str(fig_dir / "covariate_alignment"))
        out["Covariate alignment given the tree"] = png
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
    phylo = {k: pd.DataFrame(v) for k, v in rep.get("phylo", {}).items()}
    trees = {p.stem: p.read_text().strip() for p in sorted((out / "trees").glob("*.nwk"))}
    image_text = {k: pd.DataFrame(v) for k, v in rep.get("image_text", {}).items()}
    if (out / "fewshot_splits.csv").exists():
        from treeprobe.fewshot import read_splits

        image_text["fewshot_splits"] = read_splits(out / "fewshot_splits.csv")
    return Report(mantel=frame("mantel"), clustering=frame("clustering"), knn=frame("knn"),
                  rank_summary=frame("rank_summary"), maps=maps, labels_by_rank=tax.labels_by_rank(),
                  provenance=rep.get("provenance", {}), skipped=skipped, mantel_sample=sample,
                  phylo=phylo, trees=trees, image_text=image_text,
                  items=items.drop(columns=[c for c in items.columns if c[:5] in ("tsne_", "umap_")]))
