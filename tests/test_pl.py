"""treeprobe.pl: plots read what the tools stored, coloured by a rank or a covariate."""

import numpy as np
import pytest

import treeprobe as tp
from treeprobe.errors import TreeprobeError


@pytest.fixture(scope="module")
def ds():
    d = tp.datasets.bioclip2_1k()
    d = d[d.items.kingdom == "Animalia"]
    rng = np.random.default_rng(0)
    # a stand-in map (the tools' own maps are tested in test_tl): rows 0..9 not drawn
    full = rng.normal(size=(len(d), 2)).astype(np.float32)
    full[:10] = np.nan
    d.obsm["X_tsne"] = full
    return d


def _legend_counts(ax):
    out = {}
    for text in ax.get_legend().get_texts():
        name, n = text.get_text().rsplit(" (", 1)
        out[name] = int(n.rstrip(")"))
    return out


def test_tsne_coloured_by_one_rank(ds, tmp_path):
    fig = tp.pl.tsne(ds, color="order", top_n=3, save=str(tmp_path / "t"))
    assert len(fig.axes) == 1 and fig.axes[0].get_title().startswith("order (top 3 of")
    drawn = ds.items.order[np.isfinite(ds.obsm["X_tsne"]).all(axis=1)]
    top = drawn.value_counts().head(3)
    counts = _legend_counts(fig.axes[0])
    assert {k: counts[k] for k in top.index} == top.to_dict()  # only drawn rows are counted
    assert sum(counts.values()) == len(drawn)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"


def test_every_rank_by_default_and_covariates(ds):
    assert [a.get_title().split(" ")[0] for a in tp.pl.tsne(ds).axes] == list(tp.RANKS)
    fig = tp.pl.tsne(ds, color=["img_type", "class"])
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("img_type")
    with pytest.raises(TreeprobeError, match="cannot colour by 'colour'"):
        tp.pl.tsne(ds, color="colour")


def test_plots_say_which_tool_to_run_first(ds):
    fresh = ds[:50]
    with pytest.raises(TreeprobeError, match=r"no obsm\['X_umap'\].*tl.umap\(data\) first"):
        tp.pl.umap(fresh)
    with pytest.raises(TreeprobeError, match="tl.mantel"):
        tp.pl.mantel(fresh)
    with pytest.raises(TreeprobeError, match="tl.clustering"):
        tp.pl.rank_metrics(fresh)


def test_rank_metrics_and_mantel_after_the_tools(ds):
    sub = ds["Insecta"]
    tp.tl.knn(sub, k=5)
    fig = tp.pl.rank_metrics(sub)
    assert [a.get_title() for a in fig.axes] == ["kNN agreement"]
    tp.tl.mantel(sub, methods=("pearson",), levels=("image",), permutations=0)
    fig = tp.pl.mantel(sub)
    assert fig.axes[0].get_xlabel() == "tree distance"
    # the boxes are the stored pair sample: one per distinct tree distance, labelled with its pair count
    pairs = sub.uns["mantel_pairs"]
    values, counts = np.unique(pairs["d_tree"], return_counts=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"{v:g}" for v in values]
    assert [int(t.get_text()) for t in fig.axes[0].texts] == counts.tolist()
    assert fig.get_suptitle() == f"n = {counts.sum()} pairs" and counts.sum() == len(pairs["d_embed"])
