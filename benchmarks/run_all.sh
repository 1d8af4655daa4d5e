#!/usr/bin/env bash
# Slow tests and benchmarks: kept out of the default test run (pytest's default is -m 'not slow').
# Usage: bash benchmarks/run_all.sh [--quick]     (--quick: skip the N = 1,000,000 runs: Mantel, kNN, full intrinsic, ~35 min)
# Results go to benchmarks/out/ (not committed); copy the medians into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/out
mkdir -p "$OUT"

# 1. the slow tests, in the machine's normal environment (OPENBLAS_* as set here)
"$PY" -m pytest -q -m slow

# 2. benchmarks. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where this machine sets them for old OpenBLAS
#    builds, slow a current numpy: they are unset for the benchmark commands only (see RESULTS.md).
BENCH_ENV=(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)

# Mantel: treeprobe vs scikit-bio at N = 1,000 / 5,000 / 10,000, medians of 3 runs
"${BENCH_ENV[@]}" "$PY" benchmarks/bench_mantel.py --json "$OUT/mantel.json" | tee "$OUT/mantel.txt"
# Mantel at N = 1,000,000 (treeprobe alone; one run of ~5-10 min)
if [[ "${1:-}" != "--quick" ]]; then
  "${BENCH_ENV[@]}" "$PY" benchmarks/bench_mantel.py --n 1000000 --repeats 1 --json "$OUT/mantel_1m.json" \
    | tee "$OUT/mantel_1m.txt"
fi
# Other benchmark scripts: add them here (each times treeprobe against its anchor in the same run).
# Image-text side: text embeddings of 10K iNat21 species x 7 ranks x 3 text types vs the bare text-tower forward;
# zero-shot of 100K images at all ranks vs one blocked matrix-product pass (RESULTS_image_text.md)
"${BENCH_ENV[@]}" "$PY" benchmarks/bench_image_text.py --json-out "$OUT/image_text.json" | tee "$OUT/image_text.txt"
# Extraction end to end vs the bare forward pass (CPU, ViT-B-32 random init, 256 real photos)
"$PY" benchmarks/bench_extract.py --repeats 3 --json-out "$OUT/extract.json" | tee "$OUT/extract.txt"
# t-SNE / UMAP vs sklearn, openTSNE and umap-learn (RESULTS_intrinsic.md numbers were taken with OPENBLAS_* set)
"$PY" benchmarks/bench_maps.py --sizes 5000,20000 --big 100000 --json "$OUT/maps.json" | tee "$OUT/maps.txt"
# Full `treeprobe intrinsic` at 100K x 512, 10K iNat21 species (data generated once into benchmarks/_data)
"$PY" benchmarks/make_synthetic_embeddings.py
"$PY" benchmarks/bench_intrinsic.py --json "$OUT/intrinsic.json" | tee "$OUT/intrinsic.txt"
# kNN agreement: query-subsample estimator vs exact at 100K; the estimator alone at 1M (~10 min)
"${BENCH_ENV[@]}" "$PY" benchmarks/bench_knn.py --per-species 10 --queries 10000 --exact --json "$OUT/knn_100k.json" \
  | tee "$OUT/knn_100k.txt"
if [[ "${1:-}" != "--quick" ]]; then
  "${BENCH_ENV[@]}" "$PY" benchmarks/bench_knn.py --json "$OUT/knn_1m.json" | tee "$OUT/knn_1m.txt"
  # full `treeprobe intrinsic` at 1M x 512 (~17 min; the data, 2 GB, is generated into benchmarks/_data)
  "$PY" benchmarks/make_synthetic_embeddings.py --per-species 100 --out benchmarks/_data/inat21_synth_1m
  "$PY" benchmarks/bench_intrinsic.py --data benchmarks/_data/inat21_synth_1m --no-openblas-env \
    --json "$OUT/intrinsic_1m.json" | tee "$OUT/intrinsic_1m.txt"
fi
# Streaming (issue 14): 10M x 768 float16 parquet shards written to /tmp (~15 GB, removed afterwards): raw pyarrow
# scan vs the streaming pass, the streamed `treeprobe intrinsic` report, species-level Mantel at 1M species x 1024
# (~1 h; RESULTS_stream.md); --quick: 300K rows, Mantel at 50K species x 256
if [[ "${1:-}" != "--quick" ]]; then
  "${BENCH_ENV[@]}" nice -n 5 "$PY" benchmarks/bench_stream.py --json-out "$OUT/stream.json" | tee "$OUT/stream.txt"
else
  "${BENCH_ENV[@]}" "$PY" benchmarks/bench_stream.py --rows 300000 --mantel-species 50000 --mantel-dim 256 \
    --json-out "$OUT/stream_quick.json" | tee "$OUT/stream_quick.txt"
fi
# Comparisons: 3 models, paired tests (20K x 512 here; --per-species 10 for the issue's 100K target, ~1 h)
"$PY" benchmarks/bench_compare.py --per-species 2 | tee "$OUT/compare_20k.txt"
"$PY" benchmarks/bench_similarity.py | tee "$OUT/similarity.txt"
# K_mult at 10K species x 512 (999 permutations) and tree recovery at 1K / 5K species
OMP_NUM_THREADS=1 "$PY" benchmarks/bench_physignal.py | tee "$OUT/physignal.txt"
OMP_NUM_THREADS=1 "$PY" benchmarks/bench_tree_recovery.py --sizes 1000 5000 --nj-max 5000 | tee "$OUT/tree_recovery.txt"
# resume-chunk cost of extraction; kill-and-rerun of intrinsic and train (~25 min)
"$PY" benchmarks/bench_extract_chunks.py --n 256 --repeats 3 | tee "$OUT/extract_chunks.txt"
"$PY" benchmarks/kill_and_rerun.py | tee "$OUT/kill_and_rerun.txt"
# Training throughput vs open_clip's trainer needs a GPU; on the CPU only the smoke test runs:
"$PY" benchmarks/train_throughput.py --model tiny --batch-size 8 --steps 5 --workers 0 | tee "$OUT/train_smoke.txt"
# The design issue's "numbers do not change" check: compare two report.json files (old vs new code)
#   "$PY" benchmarks/compare_reports.py OLD/report.json NEW/report.json
