"""analyses/zeroshot_text_types.py (zero-shot by training text type) and the zero-shot columns of
analyses/text_type_study.py: pure pieces, and one end-to-end run on a tiny budget (~20 s)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "treeprobe" / "assets" / "demo_clip.pt"
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def _load(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "analyses" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


zt = _load("zeroshot_text_types")


@pytest.fixture(scope="module")
def world():
    from treeprobe.simulate import simulate_world

    return simulate_world(seed=0)


def test_choose_species_covers_every_phylum_and_is_seeded(world):
    sp = zt.choose_species(world, 12, seed=3)
    assert len(sp) == len(set(sp.tolist())) == 12 and np.all(np.diff(sp) > 0)
    assert set(world.species_ancestors[sp, 1]) == set(world.species_ancestors[:, 1])  # all 8 phyla
    np.testing.assert_array_equal(sp, zt.choose_species(world, 12, seed=3))
    assert not np.array_equal(sp, zt.choose_species(world, 12, seed=4))
    from treeprobe.errors import TreeprobeError

    with pytest.raises(TreeprobeError, match="n-species"):
        zt.choose_species(world, world.n_species + 1, seed=0)


def test_subset_world_keeps_the_species_looks(world):
    from treeprobe.synthetic_images import species_looks

    sp = np.array([0, 7, 50, 200])
    sub = zt.subset_world(world, sp)
    full, part = species_looks(world), species_looks(sub)
    np.testing.assert_allclose(part.body_rgb, full.body_rgb[sp])
    np.testing.assert_allclose(part.background_rgb, full.background_rgb[sp])
    np.testing.assert_array_equal(part.vertices, full.vertices[sp])
    assert sub.species_lineage["species"].tolist() == [world.species_names[s] for s in sp]
    assert set(sub.item_species.tolist()) == {0, 1, 2, 3}
    assert len(sub.items) == int(np.isin(world.item_species, sp).sum())


def test_paired_difference_numbers():
    # 4 images of 2 species, 2 ranks, 2 seeds: a hits everything at rank 0, b half of it
    truth = np.array([0, 0, 1, 1])
    a = [{"flat": np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)}] * 2
    b = [{"flat": np.array([[1, 1], [0, 0], [1, 0], [0, 0]], bool)},
         {"flat": np.array([[0, 0], [0, 1], [1, 1], [0, 1]], bool)}]
    df = zt.paired_difference(a, b, truth, ("kingdom", "species"), modes=("flat",), n_boot=200, seed=0)
    k, s = df.iloc[0], df.iloc[1]
    assert (k["rank"], k["mode"]) == ("kingdom", "flat")
    assert k["diff_seed0"] == pytest.approx(0.5) and k["diff_seed1"] == pytest.approx(0.75)
    assert k["mean"] == pytest.approx(0.625) and k["sd"] == pytest.approx(np.std([0.5, 0.75], ddof=1))
    assert k["n_positive"] == 2 and k["lo"] <= k["mean"] <= k["hi"]
    assert s["diff_seed0"] == pytest.approx(0.25) and s["diff_seed1"] == pytest.approx(-0.25)
    assert s["mean"] == pytest.approx(0.0) and s["n_positive"] == 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not DEMO_CKPT.exists():
        pytest.skip("the bundled demo checkpoint is absent")
    import torch

    out = tmp_path_factory.mktemp("zs_text_types")
    threads = torch.get_num_threads()
    try:
        rc = zt.main(["--out", str(out), "--demo-per-species", "1", "--n-species", "12", "--train-per-species", "2",
                      "--heldout-per-species", "2", "--seeds", "0", "--epochs", "1", "--batch-size", "8",
                      "--n-boot", "50"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_demo_table(run, world):
    from treeprobe.zeroshot import RESULT_COLUMNS

    tab = pd.read_csv(run / "demo_zeroshot.csv")
    assert set(RESULT_COLUMNS) <= set(tab.columns) and set(tab["text_type"]) == {"taxonomic", "scientific"}
    assert len(tab) == 2 * 3 * 7
    for c in ("top1", "top1_lo", "top1_hi"):
        assert tab[c].between(0, 1).all()
    assert (tab["top1_lo"] <= tab["top1"] + 1e-12).all() and (tab["top1"] <= tab["top1_hi"] + 1e-12).all()
    uniform = tab[tab["mode"] != "species_summed"]  # species_summed: the species share of the taxon
    np.testing.assert_allclose(uniform["chance_top1"], 1.0 / uniform["n_taxa"])
    flat = tab[tab["mode"] == "flat"].set_index(["text_type", "rank"])
    assert [flat.at[("taxonomic", r), "n_taxa"] for r in RANKS] == [world.n_taxa(r) for r in RANKS]
    assert (tab["n_items"] == world.n_species).all()  # one render per species
    # kingdom captions are the same string in both text types
    assert flat.at[("taxonomic", "kingdom"), "top1"] == flat.at[("scientific", "kingdom"), "top1"]
    # the demo checkpoint names its species from the taxonomic text far above chance (1/335);
    # a misaligned text/taxon order would sit at chance
    assert flat.at[("taxonomic", "species"), "top1"] > 0.3
    mis = pd.read_csv(run / "demo_mistakes.csv")
    acc = mis[(mis["metric"] == "accuracy") & (mis["text_type"] == "taxonomic")].iloc[0]
    assert acc["value"] == pytest.approx(flat.at[("taxonomic", "species"), "top1"])
    assert acc["chance"] == pytest.approx(1 / world.n_species)


def test_subset_tables(run):
    runs = pd.read_csv(run / "subset_runs.csv")
    assert set(runs["model"]) == {"untrained", "taxonomic", "scientific"}
    assert set(runs["class_text"]) == {"taxonomic", "scientific"}
    assert runs["top1"].between(0, 1).all()
    uniform = runs[runs["mode"] != "species_summed"]
    np.testing.assert_allclose(uniform["chance_top1"], 1.0 / uniform["n_taxa"])
    species = runs[runs["rank"] == "species"]
    assert (species["n_taxa"] == 12).all() and (species["n_items"] == 24).all()
    assert (runs[runs["rank"] == "kingdom"]["n_taxa"] >= 2).all() and (runs[runs["rank"] == "phylum"]["n_taxa"] >= 2).all()
    own = runs[runs["own"]]
    assert (own["model"].replace({"untrained": "taxonomic"}) == own["class_text"]).all()
    paired = pd.read_csv(run / "subset_paired.csv")
    assert len(paired) == 2 * 7 and set(paired["mode"]) == {"flat", "species_summed"}
    for p in paired.itertuples():
        def top1(model):
            return own[(own["model"] == model) & (own["rank"] == p.rank) & (own["mode"] == p.mode)]["top1"].iloc[0]
        assert p.mean == pytest.approx(top1("taxonomic") - top1("scientific"))
        assert p.lo <= p.mean + 1e-12 <= p.hi + 2e-12
    md = (run / "summary.md").read_text()
    assert "taxonomic − scientific" in md and "1 epochs x batch 8 (3 steps)" in md and "Verdict" in md


def test_text_type_study_zeroshot_columns(run):
    tts = _load("text_type_study")
    from treeprobe.models import load_model
    from treeprobe.training.data import load_items

    held = load_items(run / "subset_heldout" / "metadata.csv")
    lm = load_model(ckpt=str(DEMO_CKPT))
    emb = zt._embed(lm, list(held["path"]))
    cols = tts.zeroshot_columns(lm, emb, held, "mixed")
    assert cols["zs_text_type"] == "taxonomic" and cols["zs_n_species"] == 12
    for r in RANKS:
        assert cols[f"zs_{r}_chance"] == pytest.approx(1 / held[r].nunique())
        assert 0 <= cols[f"zs_{r}_flat_top1"] <= 1 and 0 <= cols[f"zs_{r}_summed_top1"] <= 1
    assert cols["zs_species_flat_top1"] == cols["zs_species_summed_top1"]  # the same arg-max species
    sci = tts.zeroshot_columns(lm, emb, held, "scientific")
    assert sci["zs_text_type"] == "scientific" and sci["zs_kingdom_flat_top1"] == cols["zs_kingdom_flat_top1"]
    # the same numbers as the study script's own scoring with taxonomic class texts
    ref = zt.zeroshot_by_text_type(lm, emb, held, ("taxonomic",), n_boot=1)["taxonomic"]["zeroshot"]
    flat = ref[ref["mode"] == "flat"].set_index("rank")["top1"]
    assert all(cols[f"zs_{r}_flat_top1"] == pytest.approx(flat[r]) for r in RANKS)
