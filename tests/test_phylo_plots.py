"""The K_mult and within-species-variation figures draw the tools' numbers (read back from the artists)."""

import numpy as np
import pytest

import treeprobe as tp
from treeprobe.errors import TreeprobeError
from treeprobe.simulate import simulate_world


@pytest.fixture(scope="module")
def world():
    w = simulate_world(seed=2, dim=16, trait_dim=8, noise=0.4, images_per_species=(1, 3))
    items = w.items.copy()
    items["source"] = np.where(np.arange(len(items)) % 2 == 0, "a", "b")
    return tp.TreeData(w.embeddings, items)


def test_physignal_figure_draws_the_statistic_its_null_and_the_axes(world):
    with pytest.raises(TreeprobeError, match="run treeprobe.tl.physignal"):
        tp.pl.physignal(world)
    res = tp.tl.physignal(world, permutations=49, n_axes=4)
    fig = tp.pl.physignal(world)
    hist, bars = fig.axes[0], fig.axes[1]
    vlines = [ln.get_xdata()[0] for ln in hist.get_lines()]
    assert vlines[0] == pytest.approx(res.statistic) and vlines[1] == 1.0
    assert sum(p.get_height() for p in hist.patches) == res.permutations  # every permuted K counted once
    assert [p.get_height() for p in bars.patches] == pytest.approx(res.per_axis["K"].tolist())
    assert f"{res.statistic:.3f}" in hist.get_title()


def test_variation_figure_draws_the_per_rank_table(world):
    res = tp.tl.within_species_variation(world, covariate="source", permutations=19)
    fig = tp.pl.within_species_variation(world)
    share, angle = fig.axes[0], fig.axes[1]
    lines = {ln.get_label(): ln.get_ydata() for ln in share.get_lines()}
    assert np.allclose(lines["within species"], res.ranks["within_outside_share"])
    assert np.allclose(lines["chance (isotropic)"], res.ranks["isotropic_outside_share"])
    alines = {ln.get_label(): ln.get_ydata() for ln in angle.get_lines()}
    assert np.allclose(alines["covariate shift"], res.ranks["shift_angle_deg"], equal_nan=True)
    assert [t.get_text() for t in share.get_xticklabels()] == res.ranks["rank"].tolist()


def test_covariate_alignment_figure_draws_the_null_and_every_r(world):
    from treeprobe.covariate_alignment import STATISTICS, covariate_alignment
    from treeprobe.phylo_plots import plot_covariate_alignment

    items = world.items
    z = items.groupby("species")["genus"].transform(lambda s: float(len(s.iloc[0])))  # constant within species
    data = tp.TreeData(world.X, items.assign(z=z.to_numpy() + items["species"].str.len().to_numpy()))
    res = covariate_alignment(data, "z", permutations=39, match_sizes=False)
    fig = plot_covariate_alignment(res)
    hist, bars = fig.axes
    assert sum(p.get_height() for p in hist.patches) == 39  # every permuted partial r counted once
    assert hist.get_lines()[0].get_xdata()[0] == pytest.approx(res.r)
    assert [p.get_width() for p in bars.patches] == pytest.approx(np.nan_to_num(res.table["r"].to_numpy()).tolist())
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert len(labels) == len(STATISTICS) and labels[3].endswith("n.t.")  # r_dt has no p-value
    assert f"{res.p_value:.2g}" in labels[1]
    fig2 = plot_covariate_alignment(res, statistic=STATISTICS[0])
    assert fig2.axes[0].get_lines()[0].get_xdata()[0] == pytest.approx(res.table["r"].iloc[0])
    with pytest.raises(TreeprobeError, match="no row 'nope'"):
        plot_covariate_alignment(res, statistic="nope")
