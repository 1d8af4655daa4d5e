#!/usr/bin/env bash
# The whole GPU check in one command, for a session that is lent a GPU machine (see benchmarks/README.md,
# "GPU check"). Here first: `bash benchmarks/fetch_gpu_wheels.sh` (fills .whl/); then the device `run` with
#     command: bash benchmarks/gpu_check.sh      carry: [".whl"]      timeout_s: 540
#
# Stages, in this order, each under its own `timeout`; a failed stage does not stop the next ones:
#   wheels      install .whl/*.whl into $GPU_CHECK_SITE (/tmp/site); PYTHONPATH = that folder + a package shim
#               ($WORK/pkg: treeprobe/ as links to the repo's treeprobe/*, plus treeprobe/training -> training/)
#   imports     nvidia-smi, torch/CUDA versions, `import treeprobe, treeprobe.training, open_clip, open_clip_train.main`
#   train       benchmarks/train_throughput.py: ViT-B-16, batch 256, bf16, treeprobe train vs open_clip_train
#   train_gc    the same with --grad-checkpointing, fewer steps; only when the time left allows it
#   photos      writes synthetic photo-like JPEGs + metadata.csv to the scratch folder (../shared does not travel)
#   extract     benchmarks/bench_extract.py on cuda, on those JPEGs (ViT-B-16, random init)
#   ddp_smoke   torchrun (1 process) `python -m treeprobe.training --data synthetic` with --local-loss --gather-with-grad
#               --grad-checkpointing --precision amp_bf16, a few steps, one checkpoint
#   ckpt_load   that checkpoint through treeprobe.models.load_model, one forward pass
#   ddp2        torchrun, 2 processes sharing GPU 0 over gloo (NCCL refuses two ranks on one GPU): DDP +
#               --local-loss --gather-with-grad on CUDA tensors, tiny model, bf16, 4 steps
#   ddp2_check  that run's checkpoint has world_size 2 and step 4; its log says device cuda, amp_bf16
# It ends with one summary line per stage (also in $OUT/summary.txt). Results land in $OUT (the device
# tool's folder; default benchmarks/out, git-ignored): gpu_check.log, summary.txt, train_throughput.json,
# train_throughput_gc.json, extract_gpu.json, ddp_smoke_log.jsonl (6 files; the tool returns at most 8).
# The stages stop within GPU_CHECK_BUDGET seconds (default 450) of the start; expected total ~6 min on an H100.
#
# Environment:
#   PY=python3                 the interpreter (the GPU image's python3; here e.g. PY=/tmp/devlike/bin/python)
#   GPU_CHECK_CPU_SMOKE=1      dry run on a CPU: tiny model / few steps / few images, device cpu
#   GPU_CHECK_SITE=/tmp/site   where the wheels are installed
#   GPU_CHECK_BUDGET=450       seconds for all the stages (900 in the CPU smoke run)
#   GPU_CHECK_WORK=DIR         scratch folder (trainer logs, checkpoints, photos); default a new /tmp folder
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
SITE=${GPU_CHECK_SITE:-/tmp/site}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
if [[ "$SMOKE" == 1 ]]; then BUDGET=${GPU_CHECK_BUDGET:-900}; else BUDGET=${GPU_CHECK_BUDGET:-450}; fi
LOG=$OUT/gpu_check.log
: > "$LOG"
rm -f "$OUT"/summary.txt "$OUT"/train_throughput.json "$OUT"/train_throughput_gc.json "$OUT"/extract_gpu.json \
  "$OUT"/ddp_smoke_log.jsonl   # no stale results from an earlier run in the same folder
export PYTHONUNBUFFERED=1
T0=$SECONDS
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - (SECONDS - T0) )); }
min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }
record() { SUMMARY+=("$(printf '%-10s %-8s %s' "$1" "$2" "$3")"); say ">>> $1: $2 $3"; }

# stage NAME TIMEOUT_S CMD...: run CMD under `timeout`, its output into the log; record its status
stage() {
  local name=$1 lim=$2; shift 2
  if (( lim < 15 )); then record "$name" SKIPPED "too little time left (${lim}s of the ${BUDGET}s budget)"; return 99; fi
  say ""
  say "=== [$(date -u +%H:%M:%S) UTC, t=$((SECONDS - T0))s] $name (timeout ${lim}s): $*"
  local t=$SECONDS rcs
  timeout -k 15 "$lim" "$@" 2>&1 | tee -a "$LOG"
  rcs=("${PIPESTATUS[@]}")
  local rc=${rcs[0]} dt=$((SECONDS - t))
  if (( rc == 0 )); then record "$name" OK "${dt}s"
  elif (( rc == 124 || rc == 137 )); then record "$name" TIMEOUT "killed after ${dt}s (limit ${lim}s)"
  else record "$name" FAILED "rc $rc after ${dt}s"; fi
  return "$rc"
}

say "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, host $(hostname), repo $REPO, PY=$PY, OUT=$OUT, WORK=$WORK," \
    "smoke=$SMOKE, budget ${BUDGET}s"

# ---------------------------------------------------------------- wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  stage wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
else
  record wheels FAILED "no .whl/*.whl here: run 'bash benchmarks/fetch_gpu_wheels.sh' first and carry .whl"
fi
# the repo itself goes on the path (a --target install of an editable package would need a .pth file,
# which Python reads only in site directories, not on PYTHONPATH). The repo's top-level training/ installs as
# treeprobe.training (pyproject's package-dir mapping), which a plain path entry lacks: a shim folder holds
# treeprobe/ as links to the repo's treeprobe/* plus treeprobe/training -> training/ (always the current files)
SHIM=$WORK/pkg
rm -rf "$SHIM" && mkdir -p "$SHIM/treeprobe"
for f in "$REPO"/treeprobe/*; do ln -s "$f" "$SHIM/treeprobe/"; done
ln -s "$REPO/training" "$SHIM/treeprobe/training"
export PYTHONPATH="$SITE:$SHIM"
say "PYTHONPATH=$PYTHONPATH"

# ---------------------------------------------------------------- environment + imports
{ command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi || echo "nvidia-smi: not found"
  echo "cpus: $(nproc); memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}'); /dev/shm (data-loader workers" \
       "pass batches through it): $(df -h /dev/shm 2>/dev/null | awk 'NR == 2 {print $2 " size, " $4 " free"}')"
} 2>&1 | tee -a "$LOG"
stage imports 90 "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys, time
t = time.time()
import torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} device(s), bf16 supported: {torch.cuda.is_bf16_supported()}")
import treeprobe, treeprobe.training, open_clip, open_clip_train.main  # noqa: E401,F401 - the point of the stage
for m in (treeprobe, treeprobe.training, open_clip, open_clip_train.main):
    print(f"  {m.__name__:<22} {m.__file__}")
vers = []
for name in ("torchvision", "open_clip_torch", "timm", "huggingface-hub", "numpy", "pandas", "scipy",
             "scikit-learn", "numba", "pillow", "safetensors", "ftfy", "wcwidth", "webdataset", "ete3"):
    try:
        vers.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        vers.append(f"{name} MISSING")
print("versions: " + ", ".join(vers))
import ete3, webdataset  # noqa: E401,F401 - lazily imported by treeprobe.taxonomy / treeprobe.training.data
print(f"imports took {time.time() - t:.1f}s")
EOF

HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$SMOKE" != 1 && "$HAVE_CUDA" != 1 ]]; then
  say "no CUDA device visible to $PY: the GPU stages are skipped (for a CPU dry run set GPU_CHECK_CPU_SMOKE=1)"
  for s in train train_gc photos extract ddp_smoke ckpt_load ddp2 ddp2_check; do record "$s" SKIPPED "no CUDA"; done
  NO_CUDA=1
else
  # ---------------------------------------------------------------- settings
  if [[ "$SMOKE" == 1 ]]; then
    DEV=cpu
    TT=(--model tiny --batch-size 8 --workers 0)
    TT_STEPS=5; TT_SKIP=2; GC_STEPS=4; GC_SKIP=2
    EX_MODEL=ViT-B-32; EX_N=16; EX_BS=8; EX_WORKERS=(0 1); EX_REPEATS=1
    DDP=(--model tiny --workers 0 --device cpu); DDP_BS=8; DDP_STEPS=3
    RES_EXTRACT=60; RES_DDP=120; RES_DDP2=60   # seconds kept back for the later stages
  else
    DEV=cuda
    TT=(--model ViT-B-16 --batch-size 256 --workers 8)   # bf16 is train_throughput.py's default on CUDA
    TT_STEPS=80; TT_SKIP=20; GC_STEPS=36; GC_SKIP=10
    EX_MODEL=ViT-B-16; EX_N=2048; EX_BS=256; EX_WORKERS=(4 8 16); EX_REPEATS=3
    DDP=(--model ViT-B-16 --workers 4); DDP_BS=64; DDP_STEPS=6
    RES_EXTRACT=70; RES_DDP=100; RES_DDP2=50
  fi
  RES_DDP=$((RES_DDP + RES_DDP2))
  RESERVE=$((RES_EXTRACT + RES_DDP))

  # loader workers hand batches over through /dev/shm (a 256-image batch is 154 MB); a small one (a
  # container's 64 MB default) kills them with a bus error. Grow it if we may, else use fewer workers
  # (the same for both trainers, so the comparison stays fair) and say so.
  shm_free() { df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}'; }
  if [[ "$SMOKE" != 1 ]] && (( $(shm_free || echo 0) < 4096 )); then
    mount -o remount,size=16G /dev/shm 2>/dev/null && say "remounted /dev/shm with 16G"
    if (( $(shm_free || echo 0) < 4096 )); then
      say "WARNING: /dev/shm has $(shm_free || echo '?') MB free: loader workers cut to 2 (train) / 0 2 (extract)"
      TT=(--model ViT-B-16 --batch-size 256 --workers 2); EX_WORKERS=(0 2); DDP=(--model ViT-B-16 --workers 2)
    fi
  fi

  # print the tails of train_throughput.py's trainer logs when its stage failed
  tails() { for f in "$1"/ours.log "$1"/open_clip.log; do
              [[ -f "$f" ]] && { say "--- last lines of $f:"; tail -n 30 "$f" | tee -a "$LOG"; }; done; }

  # ---------------------------------------------------------------- (a) training throughput
  lim=$(min 240 $(( $(left) - RESERVE )))
  stage train "$lim" "$PY" benchmarks/train_throughput.py "${TT[@]}" --steps "$TT_STEPS" --skip "$TT_SKIP" \
    --timeout $(( (lim - 10) / 2 )) --work "$WORK/train" --json-out "$OUT/train_throughput.json" \
    || tails "$WORK/train"

  # ---------------------------------------------------------------- (b) with gradient checkpointing
  lim=$(min 150 $(( $(left) - RESERVE )))
  if (( lim >= (SMOKE == 1 ? 15 : 90) )); then
    stage train_gc "$lim" "$PY" benchmarks/train_throughput.py "${TT[@]}" --steps "$GC_STEPS" --skip "$GC_SKIP" \
      --grad-checkpointing --timeout $(( (lim - 10) / 2 )) --work "$WORK/train_gc" \
      --json-out "$OUT/train_throughput_gc.json" || tails "$WORK/train_gc"
  else
    record train_gc SKIPPED "only ${lim}s left before the reserve for extract + ddp_smoke"
  fi

  # ---------------------------------------------------------------- (c) extraction on synthetic JPEGs
  # bench_extract.py reads photos listed in a metadata CSV (column 'path'); ../shared/data does not travel
  # to the GPU machine, so photo-like JPEGs (smooth random colour fields + grain, 500x375 and 375x500,
  # ~30-60 KB each, like the real photos) are written to $WORK/photos first.
  stage photos "$(min 60 $(( $(left) - RES_DDP - 30 )))" "$PY" - "$WORK/photos" "$EX_N" <<'EOF'
import os, sys, time
import numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
rng, t = np.random.default_rng(0), time.time()
rows = []
for i in range(n):
    w, h = (500, 375) if i % 3 else (375, 500)
    small = rng.integers(0, 256, (6, 8, 3) if w > h else (8, 6, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    im = np.clip(im + rng.integers(-12, 13, im.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    name = f"img_{i:05d}.jpg"
    Image.fromarray(im).save(os.path.join(out, name), quality=85)
    rows.append(name)
with open(os.path.join(out, "metadata.csv"), "w") as f:
    f.write("path\n" + "\n".join(rows) + "\n")
size = sum(os.path.getsize(os.path.join(out, r)) for r in rows)
print(f"wrote {n} synthetic JPEGs ({size / n / 1024:.0f} KB each on average) to {out} in {time.time() - t:.1f}s")
EOF
  stage extract "$(min 120 $(( $(left) - RES_DDP )))" "$PY" benchmarks/bench_extract.py \
    --csv "$WORK/photos/metadata.csv" --n "$EX_N" --model "$EX_MODEL" --batch-size "$EX_BS" \
    --workers "${EX_WORKERS[@]}" --repeats "$EX_REPEATS" --device "$DEV" --json-out "$OUT/extract_gpu.json"

  # ---------------------------------------------------------------- (d) torchrun smoke + checkpoint load
  rm -rf "$WORK/ddp_smoke"
  stage ddp_smoke "$(min 150 $(( $(left) - 30 - RES_DDP2 )))" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m treeprobe.training --data synthetic --train-num-samples $(( DDP_STEPS * DDP_BS )) --batch-size "$DDP_BS" "${DDP[@]}" --epochs 1 \
    --local-loss --gather-with-grad --grad-checkpointing --precision amp_bf16 --lr 5e-4 --warmup 1 --log-every 1 \
    --no-progress --seed 0 --out "$WORK/ddp_smoke"
  [[ -f "$WORK/ddp_smoke/log.jsonl" ]] && cp "$WORK/ddp_smoke/log.jsonl" "$OUT/ddp_smoke_log.jsonl"
  stage ckpt_load "$(min 90 $(( $(left) - RES_DDP2 )))" "$PY" - "$WORK/ddp_smoke" "$DEV" <<'EOF'
import json, sys, time
from pathlib import Path
import torch
from treeprobe.training.checkpoint import find_latest
from treeprobe.models import load_model
run, dev = Path(sys.argv[1]), sys.argv[2]
steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == "train"]
print(f"ddp_smoke: {len(steps)} train steps logged; losses {[round(r['loss'], 4) for r in steps]}; "
      f"img/s {[round(r['img_s'], 1) for r in steps]}; gpu_mem_gb {[r.get('gpu_mem_gb') for r in steps][-1:]}")
ck = find_latest(run / "checkpoints")
assert ck is not None, f"no checkpoint in {run / 'checkpoints'}"
t = time.time()
lm = load_model(ckpt=str(ck), device=dev)
print(f"loaded {ck} ({ck.stat().st_size / 2**20:.0f} MiB) in {time.time() - t:.1f}s: model {lm.model_name}, "
      f"embed_dim {lm.embed_dim}, source {lm.source}, digest {lm.digest[:12]}")
size = lm.model.visual.image_size
size = size[0] if isinstance(size, (tuple, list)) else size
with torch.inference_mode():
    z = lm.model.encode_image(torch.randn(4, 3, size, size, device=dev))
assert z.shape == (4, lm.embed_dim) and torch.isfinite(z).all(), (z.shape, z)
sd = torch.load(ck, map_location="cpu", weights_only=True)["state_dict"]
diff = max((lm.model.state_dict()[k.removeprefix("module.")].float().cpu() - v.float()).abs().max().item()
           for k, v in sd.items())
assert diff == 0.0, f"loaded weights differ from the checkpoint by {diff}"
print(f"encode_image on {dev}: {tuple(z.shape)}, finite; loaded weights equal the checkpoint's")
EOF

  # ---------------------------------------------------------------- (e) two DDP ranks on one GPU (gloo)
  rm -rf "$WORK/ddp2"
  if [[ "$SMOKE" == 1 ]]; then D2DEV=cpu; else D2DEV=cuda:0; fi
  stage ddp2 "$(min 120 $(( $(left) - 15 )))" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m treeprobe.training --data synthetic --train-num-samples 256 --batch-size 32 --model tiny --workers 2 --epochs 1 \
    --device "$D2DEV" --dist-backend gloo --local-loss --gather-with-grad --precision amp_bf16 --lr 5e-4 \
    --warmup 1 --log-every 1 --no-progress --seed 0 --out "$WORK/ddp2"
  stage ddp2_check 30 "$PY" - "$WORK/ddp2" "$D2DEV" <<'EOF'
import json, sys
import torch
run, dev = sys.argv[1], sys.argv[2]
ck = torch.load(f"{run}/checkpoints/epoch_1.pt", map_location="cpu", weights_only=True)
logs = [json.loads(line) for line in open(f"{run}/log.jsonl")]
start, train = logs[0], [r for r in logs if r["event"] == "train"]
assert (ck["world_size"], ck["step"]) == (2, 4), (ck["world_size"], ck["step"])
assert start["device"].split(":")[0] == dev.split(":")[0] and start["precision"] == "amp_bf16", start
assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())
print(f"ddp2: 2 ranks on {start['device']}, steps {[r['step'] for r in train]}, "
      f"losses {[round(r['loss'], 4) for r in train]}, checkpoint world_size {ck['world_size']}")
EOF
fi

# ---------------------------------------------------------------- summary
say ""
say "=== summary ($(date -u '+%Y-%m-%d %H:%M:%S') UTC, $((SECONDS - T0))s in all; results in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt" | tee -a "$LOG"
for f in train_throughput train_throughput_gc; do
  [[ -f "$OUT/$f.json" ]] && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(sys.argv[2], {k: r[k] for k in ('device','model','batch_size','precision','steps','skip','workers','torch',\
'ours_img_s','open_clip_img_s','ratio_ours_over_open_clip')})" "$OUT/$f.json" "$f" 2>&1 | tee -a "$LOG"
done
[[ -f "$OUT/extract_gpu.json" ]] && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('extract', r['model'], 'n', r['n'], 'batch', r['batch_size'], r['device'], 'bare img/s', round(r['medians']['bare'], 1), \
{k: (round(v['median_img_s'], 1), round(v['median_of_ratios'], 3)) for k, v in r['e2e'].items()})" \
  "$OUT/extract_gpu.json" 2>&1 | tee -a "$LOG"
# exit status: 0 when no stage failed or timed out (and, outside the CPU smoke run, CUDA was there)
[[ -z "${NO_CUDA:-}" ]] && ! grep -qE ' (FAILED|TIMEOUT) ' "$OUT/summary.txt"
