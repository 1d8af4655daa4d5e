"""Smoke test of benchmarks/bench_stream.py at tiny sizes: the data it writes is what its docstring says
(checked by reading it back independently), every part runs and prints its RATIO / TARGET lines, and the data
is removed afterwards, also when a part fails."""

import importlib.util
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._paths import REPO, SHARED_DATA

SPECIES = SHARED_DATA / "inat2021_taxonomy" / "metadata.csv"
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

pytestmark = pytest.mark.skipif(not SPECIES.exists(), reason="iNat21 species table not available")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stream", REPO / "benchmarks" / "bench_stream.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_data_is_sorted_float16_shards_of_real_species(tmp_path):
    bench = _bench()
    info = bench.write_dataset(tmp_path, rows=5000, dim=12, files=3, species_list=str(SPECIES), progress=False)
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) == 3 and info["rows"] == 5000 and info["bytes"] == sum(f.stat().st_size for f in files)
    t = pa.concat_tables([pq.read_table(f) for f in files])
    assert t.num_rows == 5000 and t.schema.field("emb").type == pa.list_(pa.float16(), 12)
    assert t.column_names == ["emb", *RANKS, "uuid"]
    lin = t.select(list(RANKS)).to_pandas()
    assert lin.equals(lin.sort_values(list(RANKS)).reset_index(drop=True))  # sorted by taxonomy
    real = bench.read_species(str(SPECIES))
    assert set(map(tuple, lin.drop_duplicates().to_numpy())) <= set(map(tuple, real.to_numpy()))
    assert lin.species.nunique() == info["n_species"] > 1000
    uu = t.column("uuid").to_pylist()
    assert len(set(uu)) == 5000 and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uu[:50])
    # a tree signal: items of one species are closer than items of different kingdoms
    X = np.stack(t.column("emb").to_numpy(zero_copy_only=False)).astype(np.float64)
    X /= np.linalg.norm(X, axis=1)[:, None]
    sp = lin.species.to_numpy()
    same = [(i, i + 1) for i in range(4999) if sp[i] == sp[i + 1]][:300]
    king = lin.kingdom.to_numpy()
    far = [(i, j) for i, j in zip(range(0, 2500, 7), range(4999, 2500, -7)) if king[i] != king[j]]
    assert len(same) > 50 and len(far) > 50
    cos = lambda pairs: np.mean([X[i] @ X[j] for i, j in pairs])  # noqa: E731
    assert cos(same) > cos(far) + 0.1
    # the raw scan touches every value: its checksum is the sum of the float16 bits
    res = bench.child_raw(str(tmp_path))
    bits = sum(int(np.asarray(pq.read_table(f).column("emb").combine_chunks().values).view(np.uint16)
                   .astype(np.uint64).sum()) for f in files)
    assert res["rows"] == 5000 and res["checksum"] == bits % (1 << 61)


def test_tiny_run_prints_ratios_and_removes_the_data(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out.json"
    assert bench.main(["--rows", "3000", "--dim", "16", "--files", "3", "--sample", "400", "--tmp", str(tmp_path),
                       "--species-list", str(SPECIES), "--report-args",
                       "--maps none --cluster-methods none --permutations 9", "--mantel-species", "3000",
                       "--mantel-dim", "8", "--mantel-permutations", "9", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^RATIO stream sums / raw scan = [0-9.]+ .*TARGET >= 0.80", printed, flags=re.M)
    assert re.search(r"^TARGET report <= 15 min: ", printed, flags=re.M)
    assert re.search(r"^TARGET Mantel image level at 3,000 species x 8, 9 permutations", printed, flags=re.M)
    assert re.search(r"^TARGET Mantel centroid level", printed, flags=re.M)
    res = json.loads(out.read_text())
    assert res["raw"]["rows"] == res["stream_sums"]["rows"] == 3000 == res["stream_sample"]["n_items"]
    assert res["stream_sample"]["n_sampled"] == 400 and res["stream_sums"]["n_sampled"] is None
    assert res["stream_sums"]["ratio_to_raw"] == pytest.approx(
        res["stream_sums"]["rows_per_second"] / max(res["raw"]["rows_per_second"], res["raw_after"]["rows_per_second"]))
    rep = res["report"]
    assert rep["n_items"] == 3000 and rep["n_sampled"] == 400 and rep["maxrss_gib"] > 0.05
    image = rep["mantel"][0]
    assert image["level"] == "image" and image["estimator"] == "exact" and image["statistic"] > 0.02
    assert rep["physignal"] is None and rep["figures"]  # no --phylo in these report options
    m = res["mantel_image"]
    assert m["n_species"] == 3000 and m["permutations"] == 9 and m["statistic"] > 0 and m["p_value"] == 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # data and report folders removed


def test_data_removed_when_a_part_fails(tmp_path):
    bench = _bench()
    with pytest.raises(RuntimeError, match="treeprobe intrinsic"):
        bench.main(["--rows", "500", "--dim", "8", "--files", "2", "--tmp", str(tmp_path), "--species-list",
                    str(SPECIES), "--parts", "report", "--report-args=--no-such-option"])
    assert list(tmp_path.iterdir()) == []
