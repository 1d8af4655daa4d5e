"""Text embeddings of taxa (treeprobe.text_embed): captions per rank and text type, encoding equal to a
direct forward pass, batching invariance, the per-text cache, files, and clear errors."""

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import torch

from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.text_embed import (ENSEMBLE_TEMPLATES, TEXT_TYPES, embed_texts, embeddings_frame, read_text_embeddings,
                                  taxon_text_embeddings, taxon_texts, text_cache_folder, text_tokenizer,
                                  write_text_embeddings)

DEMO = os.path.join(os.path.dirname(__file__), "..", "treeprobe", "assets", "demo_clip.pt")
LINEAGE = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "Pica pica"]
RANK_NAMES = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def _frame(rows, common=None):
    df = pd.DataFrame(rows, columns=list(RANK_NAMES))
    if common is not None:
        df["common_name"] = common
    return df


@pytest.fixture(scope="module")
def demo():
    from treeprobe.models import load_model

    return load_model(DEMO)


@pytest.fixture(scope="module")
def tiny():
    from treeprobe.models import load_model

    return load_model(model="tiny")


def _direct(loaded, texts):
    """encode_text of open_clip's own tokenizer for the architecture, normalised by torch."""
    import open_clip

    tok = open_clip.get_tokenizer("treeprobe-tiny")
    with torch.no_grad():
        f = loaded.model.encode_text(tok(list(texts)))
    return torch.nn.functional.normalize(f.float(), dim=-1).numpy()


class _Counter:
    """Wraps encode_text: counts forward calls and the texts they carried."""

    def __init__(self, loaded, monkeypatch):
        self.calls, self.rows, self._f = 0, 0, loaded.model.encode_text
        monkeypatch.setattr(loaded.model, "encode_text", self)

    def __call__(self, tokens, *a, **k):
        self.calls += 1
        self.rows += int(tokens.shape[0])
        return self._f(tokens, *a, **k)


# ----------------------------------------------------------------------------- texts


def test_every_text_type_and_rank_for_a_hand_written_lineage():
    lin = _frame([LINEAGE], common=["Eurasian magpie"])
    want_tax = ["Animalia", "Animalia Chordata", "Animalia Chordata Aves", "Animalia Chordata Aves Passeriformes",
                "Animalia Chordata Aves Passeriformes Corvidae", "Animalia Chordata Aves Passeriformes Corvidae Pica",
                "Animalia Chordata Aves Passeriformes Corvidae Pica pica"]
    want_sci = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "Pica pica"]
    clause = " with common name Eurasian magpie"
    want = {
        "taxonomic": want_tax,
        "scientific": want_sci,
        "common": want_sci[:6] + ["Eurasian magpie"],
        "scientific_common": want_sci[:6] + ["Pica pica" + clause],
        "taxonomic_common": want_tax[:6] + [want_tax[6] + clause],
    }
    assert set(want) == set(TEXT_TYPES)
    for tt, bodies in want.items():
        got = taxon_texts(lin, tt)
        assert list(got) == list(RANK_NAMES)
        for r, body in zip(RANK_NAMES, bodies):
            assert got[r]["text"].tolist() == [f"a photo of {body}."], (tt, r)
            assert got[r]["taxon"].tolist() == ["|".join(LINEAGE[: RANK_NAMES.index(r) + 1])]
            assert got[r]["name"].tolist() == [LINEAGE[RANK_NAMES.index(r)]]
            assert got[r]["n_items"].tolist() == [1]


def test_taxa_are_cumulative_homonyms_apart_gaps_dropped_and_counts_right():
    lin = _frame([
        ["Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Morus", "Morus bassanus"],
        ["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"],
        ["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"],
        ["Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "unknown", "Ficus", None],
    ], common=[None, "", "White mulberry", "fig"])
    g = taxon_texts(lin, "scientific", ranks=("genus",))["genus"]
    assert g["name"].tolist() == ["Morus", "Morus", "Ficus"]  # sorted by cumulative label ('|' after letters)
    assert g["taxon"].tolist() == ["Animalia|Chordata|Aves|Suliformes|Sulidae|Morus",
                                   "Plantae|Tracheophyta|Magnoliopsida|Rosales|Moraceae|Morus",
                                   "Plantae|Tracheophyta|Magnoliopsida|Rosales||Ficus"]
    assert g["n_items"].tolist() == [1, 2, 1]
    t = taxon_texts(lin, "taxonomic", ranks=("genus", "family"))
    assert list(t) == ["family", "genus"]  # ranks come back top first
    assert t["genus"]["text"].tolist()[2] == "a photo of Plantae Tracheophyta Magnoliopsida Rosales Ficus."
    assert t["family"]["n_items"].tolist() == [1, 2]  # the unknown family names no taxon
    sp = taxon_texts(lin, "common", ranks=("species",))["species"]
    assert sp["text"].tolist() == ["a photo of Morus bassanus.", "a photo of White mulberry."]  # first non-empty name
    lin["genus_common_name"] = ["gannets", "mulberries", "mulberries", "figs"]
    gc = taxon_texts(lin, "scientific_common", ranks=("genus",), template="an image of {}")["genus"]
    assert gc["text"].tolist() == ["an image of Morus with common name gannets",
                                   "an image of Morus with common name mulberries", "an image of Ficus with common name figs"]


# ----------------------------------------------------------------------------- encoding


TEXTS = ["a photo of Pica pica.", "a photo of Animalia Chordata Aves.", "a photo of Corvidae.", "a photo of Morus.",
         "a photo of Eurasian magpie.", "a photo of Plantae Tracheophyta Magnoliopsida Rosales Moraceae Morus alba."]


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_embeddings_equal_a_direct_forward_pass(which, request):
    loaded = request.getfixturevalue(which)
    got = embed_texts(loaded, TEXTS, cache_dir=False, progress=False)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, _direct(loaded, TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert text_tokenizer(loaded).context_length == 48  # the model's, not open_clip's default 77


def test_batching_invariance_and_repeated_texts(demo, monkeypatch):
    texts = TEXTS + TEXTS[:2] + TEXTS[::-1]
    counter = _Counter(demo, monkeypatch)
    small = embed_texts(demo, texts, batch_size=3, cache_dir=False, progress=False)
    assert (counter.calls, counter.rows) == (2, 6)  # 6 unique texts in batches of 3
    big = embed_texts(demo, texts, batch_size=256, cache_dir=False, progress=False)
    np.testing.assert_allclose(small, big, atol=1e-6)
    np.testing.assert_array_equal(big[6], big[0])
    np.testing.assert_array_equal(big[len(TEXTS) + 2], big[len(TEXTS) - 1])
    assert not np.allclose(big[0], big[1])


def test_cache_hit_runs_no_forward_and_misses_only_what_is_new(demo, tmp_path, monkeypatch):
    new = "a photo of Pica hudsonia."
    direct_new = _direct(demo, [new])[0]
    counter = _Counter(demo, monkeypatch)
    first = embed_texts(demo, TEXTS, batch_size=4, cache_dir=tmp_path, progress=False)
    assert (counter.calls, counter.rows) == (2, 6)
    again = embed_texts(demo, TEXTS[::-1], batch_size=4, cache_dir=tmp_path, progress=False)
    assert counter.calls == 2  # a hit: no forward call at all
    np.testing.assert_array_equal(again, first[::-1])
    more = embed_texts(demo, TEXTS + [new], batch_size=4, cache_dir=tmp_path, progress=False)
    assert (counter.calls, counter.rows) == (3, 7)  # only the new text
    np.testing.assert_allclose(more[-1], direct_new, atol=1e-6)
    other = dataclasses.replace(demo, digest="0" * 64)  # another checkpoint: its own cache
    embed_texts(other, TEXTS[:1], cache_dir=tmp_path, progress=False)
    assert (counter.calls, counter.rows) == (4, 8)
    assert text_cache_folder(other, tmp_path) != text_cache_folder(demo, tmp_path)
    shards = sorted(text_cache_folder(demo, tmp_path).glob("shard-*.npz"))
    assert len(shards) == 2
    # default folder: the embedding cache of treeprobe.extract ($TREEPROBE_CACHE)
    monkeypatch.setenv("TREEPROBE_CACHE", str(tmp_path / "env"))
    embed_texts(demo, TEXTS[:2], progress=False)
    assert text_cache_folder(demo).parent.parent == tmp_path / "env" and any(text_cache_folder(demo).iterdir())
    # a damaged shard is recomputed with a warning
    shards[0].write_bytes(b"not a zip")
    with pytest.warns(TreeprobeWarning, match="unreadable text-cache"):
        fixed = embed_texts(demo, TEXTS, batch_size=4, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(fixed, first, atol=1e-6)


def test_taxon_text_embeddings_and_template_ensemble(demo, tmp_path):
    lin = _frame([LINEAGE, ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "Pica hudsonia"]],
                 common=["Eurasian magpie", None])
    res = taxon_text_embeddings(demo, lin, text_types=("taxonomic", "common"), cache_dir=tmp_path, progress=False)
    assert list(res) == ["taxonomic", "common"] and list(res["common"]) == list(RANK_NAMES)
    taxa, X = res["common"]["species"]
    assert taxa == ["|".join(LINEAGE[:6] + ["Pica hudsonia"]), "|".join(LINEAGE)]
    np.testing.assert_allclose(X, _direct(demo, ["a photo of Pica hudsonia.", "a photo of Eurasian magpie."]), atol=1e-6)
    ens = taxon_text_embeddings(demo, lin, ranks=("genus",), templates="ensemble", cache_dir=False, progress=False)
    body = "Animalia Chordata Aves Passeriformes Corvidae Pica"
    per = _direct(demo, [t.format(body) for t in ENSEMBLE_TEMPLATES]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(ens["taxonomic"]["genus"][1][0], per / np.linalg.norm(per), atol=1e-6)
    single = taxon_text_embeddings(demo, lin, ranks=("genus",), cache_dir=False, progress=False)
    assert not np.allclose(single["taxonomic"]["genus"][1], ens["taxonomic"]["genus"][1], atol=1e-3)


# ----------------------------------------------------------------------------- files


def _nested(rng, d=5):
    return {"taxonomic": {"genus": (["A|b", "A|c"], rng.normal(size=(2, d))),
                          "species": (["A|b|b x"], rng.normal(size=(1, d)))},
            "common": {"genus": (["A|b", "A|c"], rng.normal(size=(2, d)))}}


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
def test_file_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    res = _nested(rng)
    path = write_text_embeddings(res, tmp_path / f"t{suffix}")
    back = read_text_embeddings(path, dim=5, normalise=False)
    assert list(back) == ["taxonomic", "common"] and list(back["taxonomic"]) == ["genus", "species"]
    for tt in res:
        for r, (taxa, X) in res[tt].items():
            assert back[tt][r][0] == taxa
            np.testing.assert_allclose(back[tt][r][1], X.astype(np.float32), rtol=0, atol=0)
    unit = read_text_embeddings(path)["common"]["genus"][1]
    np.testing.assert_allclose(unit, res["common"]["genus"][1] / np.linalg.norm(res["common"]["genus"][1], axis=1,
                                                                                 keepdims=True), atol=1e-6)


def test_reads_e_columns_without_text_type(tmp_path):
    X = np.arange(1, 7, dtype=float).reshape(2, 3)
    pd.DataFrame({"rank": ["species", "genus"], "taxon": ["A|b|b x", "A|b"], "e0": X[:, 0], "e1": X[:, 1],
                  "e2": X[:, 2]}).to_parquet(tmp_path / "e.parquet")
    back = read_text_embeddings(tmp_path / "e.parquet", text_type="scientific", normalise=False)
    assert list(back) == ["scientific"] and list(back["scientific"]) == ["genus", "species"]
    np.testing.assert_array_equal(back["scientific"]["species"][1], X[:1].astype(np.float32))


@pytest.mark.parametrize("case, match", [
    ("dup", "repeat a"), ("rank", "unknown rank"), ("lengths", "different lengths"), ("dim", "4-d were expected"),
    ("nan", "NaN or infinite"), ("zero", "all zeros"), ("nocol", "no taxon column"), ("gap", "without gaps"),
    ("noemb", "no 'embedding' column"),
])
def test_bad_files(tmp_path, case, match):
    df = pd.DataFrame({"rank": ["genus", "genus"], "taxon": ["A|b", "A|c"],
                       "embedding": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]})
    dim = None
    if case == "dup":
        df["taxon"] = "A|b"
    elif case == "rank":
        df["rank"] = ["genus", "tribe"]
    elif case == "lengths":
        df["embedding"] = [[1.0, 0.0, 0.0], [1.0, 0.0]]
    elif case == "dim":
        dim = 4
    elif case == "nan":
        df["embedding"] = [[1.0, np.nan, 0.0], [0.0, 1.0, 0.0]]
    elif case == "zero":
        df["embedding"] = [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    elif case == "nocol":
        df = df.drop(columns="taxon")
    elif case == "gap":
        df = df.drop(columns="embedding").assign(e0=1.0, e2=0.5)
    elif case == "noemb":
        df = df.drop(columns="embedding")
    df.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(TreeprobeError, match=match):
        read_text_embeddings(tmp_path / "bad.parquet", dim=dim)


def test_bad_paths(tmp_path):
    with pytest.raises(TreeprobeError, match="no such text-embedding file"):
        read_text_embeddings(tmp_path / "none.parquet")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(TreeprobeError, match=".parquet or .npz"):
        read_text_embeddings(tmp_path / "x.csv")
    (tmp_path / "broken.parquet").write_bytes(b"garbage")
    with pytest.raises(TreeprobeError, match="cannot read"):
        read_text_embeddings(tmp_path / "broken.parquet")
    with pytest.raises(TreeprobeError, match=".parquet or .npz"):
        write_text_embeddings(_nested(np.random.default_rng(0)), tmp_path / "t.csv")
    with pytest.raises(TreeprobeError, match="2 taxa but an array"):
        embeddings_frame({"taxonomic": {"genus": (["a", "b"], np.zeros((3, 2)))}})


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(demo):
    lin = _frame([LINEAGE])
    with pytest.raises(TreeprobeError, match="unknown text type 'latin'"):
        taxon_texts(lin, "latin")
    with pytest.raises(TreeprobeError, match="'mixed' draws"):
        taxon_texts(lin, "mixed")
    with pytest.raises(TreeprobeError, match="unknown rank 'tribe'"):
        taxon_texts(lin, "taxonomic", ranks=("genus", "tribe"))
    with pytest.raises(TreeprobeError, match=r"exactly one '\{\}'"):
        taxon_texts(lin, "taxonomic", template="a photo")
    with pytest.raises(TreeprobeError, match="missing rank column"):
        taxon_texts(lin.drop(columns="family"), "taxonomic")
    with pytest.raises(TreeprobeError, match="have no kingdom"):
        taxon_texts(_frame([[None] + LINEAGE[1:]]), "taxonomic")
    with pytest.raises(TreeprobeError, match="DataFrame"):
        taxon_texts(LINEAGE, "taxonomic")
    with pytest.raises(TreeprobeError, match="not one string"):
        embed_texts(demo, "a photo of Pica.", cache_dir=False)
    with pytest.raises(TreeprobeError, match="empty text"):
        embed_texts(demo, ["a photo of Pica.", " "], cache_dir=False)
    with pytest.raises(TreeprobeError, match="item 1 is a int"):
        embed_texts(demo, ["a photo of Pica.", 3], cache_dir=False)
    with pytest.raises(TreeprobeError, match="batch_size must be >= 1"):
        embed_texts(demo, ["a photo of Pica."], batch_size=0, cache_dir=False)
    with pytest.raises(TreeprobeError, match="LoadedModel"):
        embed_texts(demo.model, ["a photo of Pica."], cache_dir=False)
    with pytest.raises(TreeprobeError, match="templates is empty"):
        taxon_text_embeddings(demo, lin, templates=(), cache_dir=False)


def test_no_tokenizer_and_offline_hub_fail_clearly(demo, tiny_clip_checkpoint):
    from treeprobe.models import load_model

    small_vocab = load_model(tiny_clip_checkpoint[0])  # its own config, 1,000-token vocabulary
    with pytest.raises(TreeprobeError, match="no tokenizer found .*1000 tokens.*pass tokenizer="):
        embed_texts(small_vocab, ["a photo of Pica."], cache_dir=False)
    custom = dataclasses.replace(demo, model_name="custom")  # config carried by the checkpoint: BPE, context 48
    np.testing.assert_allclose(embed_texts(custom, TEXTS, cache_dir=False, progress=False), _direct(demo, TEXTS),
                               atol=1e-6)
    hub = dataclasses.replace(demo, model_name="hf-hub:nobody/nothing")
    with pytest.raises(TreeprobeError, match="Hugging Face hub is offline"):
        embed_texts(hub, ["a photo of Pica."], cache_dir=False)
    with pytest.raises(TreeprobeError, match="cannot load hf-hub:nobody/nothing"):
        load_model("hf-hub:nobody/nothing")
