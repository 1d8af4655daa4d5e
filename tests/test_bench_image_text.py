"""Smoke test of benchmarks/bench_image_text.py --quick: it runs, prints the RATIO lines, and its counts
and ratios agree with an independent count of the texts and with its own timings."""

import importlib.util
import json
import re

import pytest

from tests._paths import REPO, SHARED_DATA

LINEAGES = SHARED_DATA / "inat2021_taxonomy" / "metadata.csv"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_image_text", REPO / "benchmarks" / "bench_image_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_prints_ratios_and_consistent_counts(tmp_path, capsys):
    if not LINEAGES.exists():
        pytest.skip("iNat21 species table not available")
    bench = _bench()
    out = tmp_path / "out.json"
    assert bench.main(["--quick", "--n-species", "30", "--n-images", "500", "--lineages", str(LINEAGES),
                       "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    ratios = re.findall(r"^RATIO (text|zero-shot): (.+?) / (.+?) = ([0-9.]+)", printed, flags=re.M)
    names = {(part, a) for part, a, _, _ in ratios}
    assert {("text", "call, no cache"), ("text", "call, warm cache"), ("zero-shot", "zeroshot all modes"),
            ("zero-shot", "zeroshot flat"), ("zero-shot", "zeroshot top_down"),
            ("zero-shot", "zeroshot species_summed")} <= names
    assert all(float(v) > 0 for *_, v in ratios)

    res = json.loads(out.read_text())
    # independent count of the texts: one caption per taxon and rank for each of the 3 types
    from treeprobe._utils import RANKS
    from treeprobe.text_embed import taxon_texts

    lin = bench.read_lineages(str(LINEAGES), 30, 0)
    assert len(lin) == 30 and lin["species"].is_unique
    texts = {tt: [t for f in taxon_texts(lin, tt, RANKS).values() for t in f["text"]] for tt in bench.TEXT_TYPES}
    n_taxa = sum(lin[list(RANKS[:i + 1])].drop_duplicates().shape[0] for i in range(len(RANKS)))
    t = res["text"]
    assert t["per_type"] == {tt: n_taxa for tt in bench.TEXT_TYPES}
    assert t["unique_texts"] == len(set().union(*texts.values())) < t["texts"] == 3 * n_taxa
    assert t["n_batches"] == -(-t["unique_texts"] // 256)
    # the printed ratio is the per-repetition ratio of the recorded times (1 repetition in --quick)
    r = t["times"]["call, no cache"][0] / t["times"]["bare forward"][0]
    assert t["ratios"]["call, no cache"]["median_of_ratios"] == pytest.approx(r)

    z = res["zeroshot"]
    assert z["n_images"] == 500 and z["n_species"] == 30 and z["taxa"]["species"] == 30
    assert z["block_size"] == (1 << 22) // 30 and z["n_blocks"] == 1
    assert 0.0 <= z["top1"]["flat/species"] <= 1.0
