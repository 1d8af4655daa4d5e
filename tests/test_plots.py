import numpy as np
import pandas as pd
import pytest

from treeprobe.errors import TreeprobeError
from treeprobe.plots import plot_mantel_scatter, plot_rank_maps, plot_rank_metrics, save_figure


# --- maps -----------------------------------------------------------------------------

def test_plot_rank_maps(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(50, 2))
    fam = rng.choice(["A|f1", "A|f2", "B|f3", "B|f4", "B|f5"], size=50, p=[.4, .3, .1, .1, .1])
    labels = {"kingdom": np.array([s[0] for s in fam]), "family": fam,
              "species": np.array([f"{f}|sp{i % 20}" for i, f in enumerate(fam)])}
    fig = plot_rank_maps(coords, labels, top_n=2, title="demo", n_total=80)
    assert len(fig.axes) == 3
    assert fig.axes[0].get_title() == "kingdom (all 2 taxa)"
    assert fig.axes[1].get_title() == "family (top 2 of 5 taxa)"
    assert "n = 50 of 80 points" in fig.get_suptitle()
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    n1 = int((fam == "A|f1").sum())
    assert f"f1 ({n1})" in legend and any(t.startswith("other 3 taxa") for t in legend)
    png, pdf = save_figure(fig, tmp_path / "sub" / "maps")
    assert png.name == "maps.png" and pdf.name == "maps.pdf"
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    with pytest.raises(TreeprobeError):
        plot_rank_maps(coords, {"family": fam[:10]})


def test_plot_rank_metrics(tmp_path):
    ranks = ["species", "kingdom", "family"]  # deliberately out of order
    clus = pd.DataFrame({
        "rank": ranks * 2, "method": ["kmeans"] * 3 + ["agglomerative"] * 3,
        "purity": [.9, .8, .6, .95, .85, .65], "purity_chance": [.85, .5, .3] * 2,
        "nmi": [.9, .2, .5] * 2, "nmi_chance": [.88, .01, .3] * 2,
    })
    knn = pd.DataFrame({"rank": ranks, "k": 10, "agreement": [.1, .8, .3], "chance": [.01, .45, .05]})
    fig = plot_rank_metrics(clus, knn)
    assert len(fig.axes) == 3
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["kingdom", "family", "species"]
    assert len(fig.axes[0].lines) == 4  # observed + chance per method
    assert len(plot_rank_metrics(knn).axes) == 1
    png, pdf = save_figure(fig, tmp_path / "metrics")
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    with pytest.raises(TreeprobeError):
        plot_rank_metrics(pd.DataFrame({"rank": ["a"], "x": [1]}))


def test_plot_mantel_scatter(tmp_path):
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(120, 4)).cumsum(axis=1)  # nested-ish labels
    d_tree = pdist(codes, metric="hamming") * 8
    d_emb = d_tree / 8 + 0.1 * rng.random(d_tree.size)
    fig = plot_mantel_scatter(d_emb, d_tree, max_points=2000, seed=0)
    assert len(fig.axes) == 1
    n_groups = np.unique(d_tree).size
    assert len(fig.axes[0].get_xticklabels()) == n_groups
    assert "of 7140 pairs" in fig.get_suptitle()
    png, pdf = save_figure(fig, tmp_path / "mantel")
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    fig = plot_mantel_scatter(d_emb, d_tree + rng.random(d_tree.size), max_points=1000)
    assert len(fig.axes) == 2  # hexbin + colour bar
    save_figure(fig, tmp_path / "mantel_cont")
    with pytest.raises(TreeprobeError):
        plot_mantel_scatter(d_emb, d_tree[:-1])
