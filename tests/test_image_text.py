"""The image-text side on a TreeData: tl.text_embeddings / zeroshot / fewshot / text_tree / image_text, the
report sections and `treeprobe zeroshot` (treeprobe.image_text, tl, report, cli)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import treeprobe as tp
from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError
from treeprobe.text_embed import write_text_embeddings


def _world(seed=0, n_species=16, per=5, dim=24, noise=0.6, unknown_species=0):
    """16 species on a 7-rank tree (kingdom = s // 8, phylum/class = s // 4, order..genus = s // 2); each image =
    its species' direction + noise. Returns (TreeData, species directions (S, D), lineage frame of the species)."""
    rng = np.random.default_rng(seed)
    groups = {"kingdom": 8, "phylum": 4, "class": 4, "order": 2, "family": 2, "genus": 2, "species": 1}
    species = pd.DataFrame({r: [f"{r[:2]}{s // g}" for s in range(n_species)] for r, g in groups.items()})
    species["species"] = [f"Ge{s // 2} sp{s}" for s in range(n_species)]
    species["genus"] = [f"Ge{s // 2}" for s in range(n_species)]
    centres = rng.normal(size=(n_species, dim))
    code = np.repeat(np.arange(n_species), per)
    items = species.iloc[code].reset_index(drop=True)
    items["path"] = [f"img{i}.jpg" for i in range(len(items))]
    if unknown_species:
        items.loc[: unknown_species - 1, "species"] = ""
    X = centres[code] + noise * rng.normal(size=(len(code), dim))
    return tp.TreeData(X.astype(np.float32), items), centres, species


def _labels(frame: pd.DataFrame, rank: str) -> list:
    upto = RANKS[: RANKS.index(rank) + 1]
    return ["|".join(row) for row in frame[list(upto)].astype(str).itertuples(index=False, name=None)]


def _text_from(vectors_by_rank: dict, species: pd.DataFrame, text_type="taxonomic") -> dict:
    """{text_type: {rank: (labels, array)}} with one vector per taxon: ``vectors_by_rank[rank]`` (T_r, D) in the
    order of the sorted unique labels, given back in *reversed* order (so alignment is exercised)."""
    out = {}
    for r in RANKS:
        labs = sorted(set(_labels(species, r)))
        V = vectors_by_rank[r]
        out[r] = (labs[::-1], V[::-1])
    return {text_type: out}


def _centroid_text(species, centres):
    """Text of a taxon = the mean direction of its species (the signal a perfect model would have)."""
    out = {}
    for r in RANKS:
        labs = np.array(_labels(species, r))
        uniq = sorted(set(labs))
        out[r] = np.stack([centres[labs == u].mean(axis=0) for u in uniq])
    return out


def test_zeroshot_flat_top1_equals_a_brute_force_argmax():
    data, centres, species = _world()
    rng = np.random.default_rng(1)
    vecs = {r: rng.normal(size=(len(set(_labels(species, r))), centres.shape[1])) for r in RANKS}
    vecs["species"] = centres + 0.8 * rng.normal(size=centres.shape)
    data.uns["text_embeddings"] = _text_from(vecs, species)
    table = tp.tl.zeroshot(data, n_boot=50)
    X = data.X / np.linalg.norm(data.X, axis=1, keepdims=True)
    item_labels = {r: np.array(_labels(data.items, r)) for r in RANKS}
    for r in RANKS:
        uniq = sorted(set(_labels(species, r)))
        T = vecs[r] / np.linalg.norm(vecs[r], axis=1, keepdims=True)
        pred = np.array(uniq)[np.argmax(X @ T.T, axis=1)]
        expected = float(np.mean(pred == item_labels[r]))
        row = table[(table["rank"] == r) & (table["mode"] == "flat")].iloc[0]
        assert row["top1"] == pytest.approx(expected, abs=1e-12), r
        assert row["chance_top1"] == pytest.approx(1 / len(uniq))
        assert row["top1_lo"] <= row["top1"] <= row["top1_hi"]
    # species_summed above species: chance = the mean share of candidate species in the image's taxon (an
    # unbalanced tree: the first 3 species left out, so kingdom 0 keeps 5 species and kingdom 1 has 8)
    part = data[~data.items["species"].isin(species["species"][:3]).to_numpy()]
    part.uns["text_embeddings"] = data.uns["text_embeddings"]
    t2 = tp.tl.zeroshot(part, n_boot=10, modes=("species_summed",))
    kept = species.iloc[3:]
    for r in RANKS[:-1]:
        labs = np.array(_labels(kept, r))
        share = np.array([np.mean(labs == lab) for lab in _labels(part.items, r)])
        row = t2[t2["rank"] == r].iloc[0]
        assert row["chance_top1"] == pytest.approx(share.mean()), r
    assert t2[t2["rank"] == "kingdom"]["chance_top1"].iloc[0] != pytest.approx(0.5)
    # species_summed at species = flat at species (same arg-max); mistakes scored on it
    sp = table[table["rank"] == "species"].set_index("mode")["top1"]
    assert sp["species_summed"] == pytest.approx(sp["flat"])
    acc = data.uns["mistakes"].set_index("metric").loc["accuracy", "value"]
    assert acc == pytest.approx(sp["flat"])
    assert data.uns["mistake_depths"]["count"].sum() == len(data)
    assert set(data.uns["zeroshot"]["text_type"]) == {"taxonomic"}


@pytest.mark.parametrize("unknown", ["separate", "placeholder"])
def test_signal_is_recovered_and_unknown_species_are_left_out(unknown):
    data, centres, species = _world(noise=0.3, unknown_species=5)
    data = tp.TreeData(data.X, data.items, unknown=unknown)  # a placeholder is never a candidate species
    data.uns["text_embeddings"] = _text_from(_centroid_text(species, centres), species)
    table = tp.tl.zeroshot(data, n_boot=50)
    assert data.uns["zeroshot_params"]["n_unknown_species"] == 5
    flat = table[table["mode"] == "flat"].set_index("rank")
    assert (flat["n_items"] == len(data) - 5).all()
    assert flat.loc["species", "top1"] > 0.9 and flat.loc["kingdom", "top1"] > 0.9
    ms = data.uns["mistakes"].set_index("metric")
    assert ms.loc["nlca", "value"] < 0.5 * ms.loc["nlca", "chance"]


def test_missing_text_for_a_taxon_is_one_clear_error():
    data, centres, species = _world()
    text = _text_from(_centroid_text(species, centres), species)
    labs, V = text["taxonomic"]["genus"]
    text["taxonomic"]["genus"] = (labs[1:], V[1:])
    data.uns["text_embeddings"] = text
    with pytest.raises(TreeprobeError, match="rank genus: 1 taxa have no text embedding"):
        tp.tl.zeroshot(data, n_boot=10)
    with pytest.raises(TreeprobeError, match="no text embeddings of type 'common'"):
        tp.tl.zeroshot(data, text_types=["common"], n_boot=10)
    data.uns.pop("text_embeddings")
    with pytest.raises(TreeprobeError, match="run tl.text_embeddings first"):
        tp.tl.zeroshot(data)


def test_text_tree_mantel_equals_an_explicit_pair_correlation():
    data, centres, species = _world()
    rng = np.random.default_rng(3)
    vecs = {r: rng.normal(size=(len(set(_labels(species, r))), centres.shape[1])) for r in RANKS}
    vecs["species"] = centres + rng.normal(size=centres.shape)
    data.uns["text_embeddings"] = _text_from(vecs, species)
    tt = tp.tl.text_tree(data, permutations=49, bootstrap=20).set_index("statistic")
    V = vecs["species"].astype(np.float32).astype(np.float64)  # the stored text vectors are float32
    V = V / np.linalg.norm(V, axis=1, keepdims=True)
    d_text = 1 - V @ V.T
    lab = {r: np.array(_labels(species, r)) for r in RANKS}
    shared = sum((lab[r][:, None] == lab[r][None, :]).astype(int) for r in RANKS)  # ranks in common
    d_tree = 2.0 * (len(RANKS) - shared)
    iu = np.triu_indices(len(V), 1)
    r_explicit = np.corrcoef(d_text[iu], d_tree[iu])[0, 1]
    assert tt.loc["Mantel r (text distance vs tree distance)", "value"] == pytest.approx(r_explicit, abs=1e-7)  # float32 unit vectors
    al = data.uns["image_text_alignment"].set_index("rank")
    assert list(al.index) == list(RANKS)
    # species texts are noisy copies of the image directions: own text beats the sibling's well above chance
    assert al.loc["species", "top1_siblings"] > al.loc["species", "chance"] + 0.2


def test_fewshot_splits_reproduce_through_the_report(tmp_path):
    from treeprobe.fewshot import fewshot_eval, read_splits

    data, centres, species = _world()
    data.uns["text_embeddings"] = _text_from(_centroid_text(species, centres), species)
    tp.tl.image_text(data, permutations=19, n_boot=20, fewshot_seeds=2)
    data.uns["provenance"] = dict(analysis="image-text", n_items=len(data), seed=0)
    report = tp.report.Report.from_data(data)
    paths = tp.report.write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# treeprobe image-text report")
    for heading in ("## Zero-shot classification per rank", "## How far wrong the mistakes are",
                    "## Few-shot classification per rank", "## The text tower's tree"):
        assert heading in md
    assert "(Mantel)" not in md.split("## The text tower")[0]  # no empty intrinsic sections
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Zero-shot classification per rank" in html and "Rank-wise clustering" not in html
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "fewshot_splits" not in rep["image_text"]
    sp = rep["image_text"]["zeroshot"]
    flat_species = [r for r in sp if r["mode"] == "species_summed" and r["rank"] == "species"][0]
    assert rep["headline"]["zeroshot_taxonomic_species_top1"] == pytest.approx(flat_species["top1"])
    # the splits file reruns the few-shot numbers exactly
    splits = read_splits(paths["fewshot_splits_csv"])
    again = fewshot_eval(data.X, data.taxonomy, splits=splits, items=data.items["path"].to_numpy())
    pd.testing.assert_frame_equal(again.summary.reset_index(drop=True), data.uns["fewshot"].reset_index(drop=True))
    loaded = tp.report.load_report(tmp_path / "out")
    pd.testing.assert_frame_equal(loaded.image_text["mistakes"], data.uns["mistakes"], check_dtype=False)
    assert len(loaded.image_text["fewshot_splits"]) == len(data.uns["fewshot_splits"])
    for name in ("zeroshot", "mistake_depths", "fewshot", "image_text_alignment"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").stat().st_size > 5000


def test_cli_zeroshot_from_files_and_errors(tmp_path, capsys):
    from treeprobe.cli import main
    from treeprobe.text_embed import embeddings_frame

    data, centres, species = _world()
    emb = tmp_path / "emb.parquet"
    frame = data.items.copy()
    frame["emb"] = list(data.X)
    frame.to_parquet(emb)
    text = _text_from(_centroid_text(species, centres), species)
    write_text_embeddings(embeddings_frame(text), tmp_path / "taxa.parquet")
    rc = main(["zeroshot", "--embeddings", str(emb), "--text-embeddings", str(tmp_path / "taxa.parquet"),
               "--permutations", "19", "--bootstrap", "20", "--fewshot-seeds", "2", "--no-figures", "--quiet",
               "--out", str(tmp_path / "zs")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "zero-shot top-1 (taxonomic, flat): kingdom" in out and "text tree (taxonomic): Mantel r" in out
    rep = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert rep["provenance"]["analysis"] == "image-text"
    assert rep["provenance"]["text_model"]["kind"] == "text-embedding file"
    # no text source: one line, exit 2, before any analysis
    rc = main(["zeroshot", "--embeddings", str(emb), "--quiet", "--out", str(tmp_path / "zs2")])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --ckpt" in err and "--text-embeddings" in err
    assert not (tmp_path / "zs2").exists()
    rc = main(["zeroshot", "--embeddings", str(emb), "--text-types", "latin", "--quiet", "--out", str(tmp_path / "z3")])
    assert rc == 2 and "text type" in capsys.readouterr().err


def test_text_embeddings_from_the_demo_checkpoint_match_text_embed():
    from treeprobe import text_embed
    from treeprobe.image_text import lineage_table
    from treeprobe.models import load_model
    from treeprobe.pipeline import DEMO_CKPT

    data, _, _ = _world()
    got = tp.tl.text_embeddings(data, ckpt=str(DEMO_CKPT), text_types=("scientific",), cache_dir=False,
                                progress=False)
    ref = text_embed.taxon_text_embeddings(load_model(ckpt=str(DEMO_CKPT)), lineage_table(data),
                                           text_types=("scientific",), cache_dir=False, progress=False)
    for r in RANKS:
        assert got["scientific"][r][0] == ref["scientific"][r][0]
        np.testing.assert_array_equal(got["scientific"][r][1], ref["scientific"][r][1])
    assert data.uns["text_model"]["text_types"] == ["scientific"]
    with pytest.raises(TreeprobeError, match="need a model with a text tower"):
        tp.tl.text_embeddings(data)


def test_compare_lines_up_zeroshot_with_paired_species_bootstrap(tmp_path, capsys):
    from treeprobe.cli import main
    from treeprobe.text_embed import embeddings_frame

    data, centres, species = _world(noise=0.8)
    text = _text_from(_centroid_text(species, centres), species)
    rng = np.random.default_rng(5)
    noisy = tp.TreeData(data.X + 1.5 * rng.normal(size=data.X.shape).astype(np.float32), data.items)
    data.uns["text_embeddings"] = text
    noisy.uns["text_embeddings"] = text
    comp = tp.tl.compare({"a": data, "b": noisy}, permutations=19, bootstrap=199, jackknife=0, cluster_methods=(),
                         similarity=False, distance_profiles=False)
    own = {m: tp.tl.zeroshot(ds, n_boot=20, modes=("flat", "species_summed")).set_index(["mode", "rank"])["top1"]
           for m, ds in (("a", data), ("b", noisy))}
    d = comp.differences[comp.differences["metric"].str.startswith("zeroshot")]
    assert len(d) == 2 * len(RANKS)
    for row in d.itertuples():
        mode = row.metric.split()[1]
        assert row.estimate_a == pytest.approx(own["a"][(mode, row.rank)])
        assert row.difference == pytest.approx(own["a"][(mode, row.rank)] - own["b"][(mode, row.rank)])
        assert row.ci_low <= row.difference <= row.ci_high
    assert (d["p_value"] < 0.05).all()  # the noisy copy is clearly worse here (differences 0.16-0.25)
    same = tp.tl.compare({"a": data, "a2": tp.TreeData(data.X, data.items, uns={"text_embeddings": text})},
                         permutations=19, bootstrap=99, jackknife=0, cluster_methods=(), similarity=False,
                         distance_profiles=False)
    z = same.differences[same.differences["metric"].str.startswith("zeroshot")]
    assert (z["difference"] == 0).all() and (z["p_value"] == 1).all()
    with pytest.raises(TreeprobeError, match="missing for b"):
        tp.tl.compare({"a": data, "b": tp.TreeData(noisy.X, noisy.items)}, zeroshot=True, jackknife=0,
                      cluster_methods=())
    # the command line: one text file per embeddings-file model
    paths = {}
    for name, ds in (("a", data), ("b", noisy)):
        frame = ds.items.copy()
        frame["emb"] = list(ds.X)
        frame.to_parquet(tmp_path / f"{name}.parquet")
        paths[name] = tmp_path / f"{name}.parquet"
    write_text_embeddings(embeddings_frame(text), tmp_path / "taxa.parquet")
    base = ["compare", "--model", f"a={paths['a']}", "--model", f"b={paths['b']}", "--permutations", "19",
            "--bootstrap", "99", "--jackknife", "0", "--cluster-methods", "none", "--no-similarity", "--no-figures",
            "--quiet", "--zeroshot"]
    rc = main(base + ["--text-embeddings", f"a={tmp_path / 'taxa.parquet'}", "--out", str(tmp_path / "c1")])
    assert rc == 2 and "--text-embeddings b=FILE" in capsys.readouterr().err
    rc = main(base + ["--text-embeddings", f"a={tmp_path / 'taxa.parquet'}", "--text-embeddings",
                      f"b={tmp_path / 'taxa.parquet'}", "--out", str(tmp_path / "c2")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "c2" / "compare.json").read_text())
    rows = [r for r in rep["differences"] if r["metric"] == "zeroshot flat top1" and r["rank"] == "species"]
    assert rows and rows[0]["difference"] == pytest.approx(d.set_index(["metric", "rank"]).loc[
        ("zeroshot flat top1", "species"), "difference"])
