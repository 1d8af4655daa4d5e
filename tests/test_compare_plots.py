"""treeprobe.compare_plots and figures/compare_figures.py: what the comparison figures draw."""

import importlib.util
import io
import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text

from treeprobe._utils import RANKS
from treeprobe.compare_plots import (CHANCE_COLOUR, MIN_FONT_SIZE, TAXON_COLOURS, plot_distance_profiles,
                                     plot_drilldown, plot_metric_panels, taxon_colours)
from treeprobe.errors import TreeprobeError
from tests._paths import REPO


def _min_font(fig) -> float:
    fig.savefig(io.BytesIO(), format="png", dpi=40)  # lay out and draw every text
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    assert sizes
    return min(sizes)


def _tsne_table(seed=0):
    """A drill-down table as drilldown_tsne makes it, for models m1 and m2 (rows in different orders)."""
    rng = np.random.default_rng(seed)
    parts = []
    for rank, parent, n_taxa in (("phylum", "A", 3), ("class", "A|P0", 14), ("order", "A|P0|C0", 5)):
        n = 60
        sizes = rng.permutation(np.arange(1, n_taxa + 1))                 # distinct taxon sizes
        lab = np.repeat([f"{parent}|{rank[0]}{k}" for k in range(n_taxa)], sizes)[:n]
        lab = np.r_[lab, [""] * (n - lab.size)]                            # the rest unknown
        rows = np.arange(n) + 100 * len(parts)
        for model in ("m1", "m2"):
            order = rng.permutation(n)                                     # models list the rows differently
            parts.append(pd.DataFrame({"model": model, "column_rank": rank, "parent_rank": "x",
                                       "parent_label": parent, "row": rows[order],
                                       "x": rng.normal(size=n), "y": rng.normal(size=n),
                                       "label": lab[order], "perplexity": 19.7}))
    return pd.concat(parts, ignore_index=True)


def test_taxon_colours_largest_first_unknown_never():
    c = taxon_colours(["b", "a", "b", "", "", "", "c", "a"], top_n=3)
    assert list(c) == ["a", "b", "c"] and c["a"] == TAXON_COLOURS[0] and "" not in c  # tie a/b by name


def test_plot_drilldown_panels_colours_legends():
    tab = _tsne_table()
    fig = plot_drilldown(tab, top_n=10)
    assert len(fig.axes) == 6                                              # 2 models x 3 ranks
    axes = np.array(fig.axes).reshape(2, 3)
    assert [a.get_title() for a in axes[0]] == ["phylum (within A)", "class (within P0)", "order (within C0)"]
    assert [a.get_ylabel() for a in axes[:, 0]] == ["m1", "m2"]
    for j, rank in enumerate(("phylum", "class", "order")):
        col = tab[(tab.column_rank == rank) & (tab.model == "m1")]
        expected = taxon_colours(col.label, top_n=10)
        colour = [{c.get_label(): tuple(c.get_facecolor()[0]) for c in axes[i, j].collections} for i in range(2)]
        for taxon, hexcol in expected.items():
            assert colour[0][taxon] == colour[1][taxon] == to_rgba(hexcol), (rank, taxon)
        for i in range(2):
            n_drawn = sum(len(c.get_offsets()) for c in axes[i, j].collections)
            assert n_drawn == len(col)                                     # every point, once
        legend = [t.get_text() for t in axes[1, j].get_legend().get_texts()]
        counts = col.label[col.label != ""].value_counts()
        top = sorted(counts.index, key=lambda t: (-counts[t], t))[:10]
        assert legend[:len(top)] == [f"{t.rsplit('|', 1)[-1]} ({counts[t]})" for t in top]
        if len(counts) > 10:
            assert legend[len(top)] == f"other {len(counts) - 10} taxa ({counts.iloc[10:].sum()})"
        n_unknown = int((col.label == "").sum())
        assert (f"unknown {rank} ({n_unknown})" in legend) == (n_unknown > 0)
        assert axes[0, j].get_legend() is None                             # one legend per column
    assert _min_font(fig) >= MIN_FONT_SIZE
    # records (as in a report's JSON) draw the same figure
    assert len(plot_drilldown(tab.to_dict(orient="records")).axes) == 6
    with pytest.raises(TreeprobeError, match="missing"):
        plot_drilldown(tab.drop(columns="label"))


def _metric_table():
    rows = []
    for m, off in (("BioCLIP 2", 0.0), ("CLIP", -0.2)):
        for metric in ("kNN agreement", "NMI"):
            for k, r in enumerate(RANKS[::-1]):                           # ranks deliberately bottom first
                e = 0.3 + 0.08 * k + off
                rows.append(dict(model=m, metric=metric, rank=r, estimate=e, ci_low=e - 0.05, ci_high=e + 0.02,
                                 chance=0.05 * k if metric == "kNN agreement" else None))
    return pd.DataFrame(rows)


def test_plot_metric_panels_lines_errorbars_chance():
    tab = _metric_table()
    fig = plot_metric_panels(tab)
    assert len(fig.axes) == 2
    assert [a.get_title() for a in fig.axes] == ["kNN agreement", "NMI"]
    for p, ax in enumerate(fig.axes):
        assert [t.get_text() for t in ax.get_xticklabels()] == list(RANKS)
        for model in ("BioCLIP 2", "CLIP"):
            lines = [ln for ln in ax.lines if ln.get_label() == model]
            assert len(lines) == 1
            sub = tab[(tab.model == model) & (tab.metric == ax.get_title())].set_index("rank").loc[list(RANKS)]
            np.testing.assert_allclose(lines[0].get_ydata(), sub.estimate)
        conts = [c for c in ax.containers if c.get_label() in ("BioCLIP 2", "CLIP")]
        segs = conts[0].lines[2][0].get_segments()                         # the error bars of the first model
        sub = tab[(tab.model == "BioCLIP 2") & (tab.metric == ax.get_title())].set_index("rank").loc[list(RANKS)]
        np.testing.assert_allclose([s[0][1] for s in segs], sub.ci_low)
        np.testing.assert_allclose([s[1][1] for s in segs], sub.ci_high)
        chance = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        if p == 0:                                                         # one dashed grey line (same for both models)
            assert len(chance) == 1 and to_rgba(chance[0].get_color()) == to_rgba(CHANCE_COLOUR)
            np.testing.assert_allclose(chance[0].get_ydata(), 0.05 * np.arange(7)[::-1])
        else:
            assert chance == []                                            # NMI rows have no chance values
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["BioCLIP 2", "CLIP", "chance"]
    assert _min_font(fig) >= MIN_FONT_SIZE
    c1, c2 = (ln.get_color() for ln in fig.axes[0].lines if ln.get_label() in ("BioCLIP 2", "CLIP"))
    assert c1 != c2


def _profile(shift):
    return pd.DataFrame({"lca_rank": [*RANKS[::-1], "root"], "tree_distance": range(8), "n_pairs": 10,
                         "mean_distance": np.linspace(0.1, 0.5, 8) + shift,
                         "ci_low": np.linspace(0.05, 0.45, 8) + shift, "ci_high": np.linspace(0.15, 0.55, 8) + shift})


def test_plot_distance_profiles_lines_and_bands():
    profiles = {"a": _profile(0.0), "b": _profile(0.1).to_dict(orient="records")}
    profiles["a"].loc[0, ["ci_low", "ci_high"]] = np.nan                   # an interval may be unknown
    fig = plot_distance_profiles(profiles)
    (ax,) = fig.axes
    assert [ln.get_label() for ln in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), np.linspace(0.1, 0.5, 8) + 0.1)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), range(8))
    assert len(ax.collections) == 2                                        # one band per model
    for band, line in zip(ax.collections, ax.lines):
        assert to_rgba(band.get_facecolor()[0], 1) == to_rgba(line.get_color(), 1)
    ys = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.15) and ys.max() == pytest.approx(0.65)
    assert [t.get_text() for t in ax.get_xticklabels()] == [*RANKS[::-1], "root"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert _min_font(fig) >= MIN_FONT_SIZE


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_figures", REPO / "figures" / "compare_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figures_from_json_writes_three_figures(tmp_path, capsys):
    from treeprobe.drilldown import distance_profile

    rng = np.random.default_rng(0)
    codes = {"kingdom": np.zeros(30, int), "genus": np.arange(30) // 6, "species": np.arange(30) // 2}
    X = rng.normal(size=(30, 4))
    report = {
        "per_model": _metric_table().to_dict(orient="records"),
        "drilldown_tsne": _tsne_table().to_dict(orient="records"),
        "distance_profiles": {m: distance_profile(X + s, codes, bootstrap=10).to_dict(orient="records")
                              for m, s in (("a", 0.0), ("b", 0.5))},
    }
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(report))
    mod = _load_script()
    written = mod.figures_from_json(path, tmp_path / "figs")
    assert list(written) == ["metric_panels", "drilldown_tsne", "distance_profiles"]
    for name in written:
        png, pdf = tmp_path / "figs" / f"{name}.png", tmp_path / "figs" / f"{name}.pdf"
        assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    # the command line, on a JSON with only some of the keys: the others are skipped and said so
    del report["drilldown_tsne"], report["per_model"]
    path.write_text(json.dumps(report))
    assert mod.main([str(path), "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["distance_profiles.pdf", "distance_profiles.png"]
    err = capsys.readouterr().err
    assert "drilldown_tsne" in err and "per_model" in err
    (tmp_path / "bad.json").write_text("{not json")
    assert mod.main([str(tmp_path / "bad.json")]) == 2
