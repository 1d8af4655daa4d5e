#!/usr/bin/env bash
# Fill .whl/ (git-ignored, repo root) with the wheels the GPU machine lacks, for benchmarks/gpu_check.sh.
#
# Run here, where PyPI is reachable, from anywhere inside the repo:
#     bash benchmarks/fetch_gpu_wheels.sh
# then, on the lent GPU machine: device `run`, command `bash benchmarks/gpu_check.sh`, carry [".whl"].
#
# The GPU image (python 3.12 at /opt/torch/.venv, torch 2.11 + torchvision 0.26, numpy, pandas, scipy,
# scikit-learn, timm, huggingface-hub, regex, safetensors, tqdm, pillow, pyyaml, fsspec, ...; see the
# device notes' KINDS.md) lacks exactly these packages that
#     import treeprobe, treeprobe.training, open_clip, open_clip_train.main
# needs (found from the imports and each wheel's Requires-Dist, checked below):
#     open_clip_torch  (open_clip + open_clip_train; Requires-Dist: ftfy, and torch, torchvision, regex, tqdm,
#                       huggingface-hub, safetensors, timm>=1.0.17, which the image has)
#     ftfy -> wcwidth  (open_clip's tokenizer imports ftfy)
#     webdataset -> braceexpand  (open_clip_train.data imports both; treeprobe.training.data imports webdataset lazily
#                       for shards)
#     ete3             (treeprobe.taxonomy imports it lazily, for Newick trees; sdist only on PyPI, so a pure
#                       wheel is built here)
# Not fetched: openTSNE, umap-learn, pynndescent (only treeprobe.embedding_maps needs them, lazily; the GPU
# check makes no t-SNE/UMAP maps). Pass --with-maps to add them anyway (openTSNE is a cp312 binary wheel).
# wcwidth 0.9.4 is a binary wheel too (cp310-abi3 manylinux x86_64, which installs on cp310 and later).
#
# Versions are pinned to what the project's venv has (.venv/bin/pip freeze; override with PIP_FREEZE_FROM=).
# One version per package: older wheels of these packages in .whl/ are removed first.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHL_DIR:-.whl}   # WHL_DIR: another folder, for testing this script
PYTHON=${PYTHON:-python3}
FREEZE_PIP=${PIP_FREEZE_FROM:-.venv/bin/pip}
WITH_MAPS=0
[[ "${1:-}" == "--with-maps" ]] && WITH_MAPS=1

PKGS=(open_clip_torch ftfy wcwidth webdataset braceexpand)
(( WITH_MAPS )) && PKGS+=(openTSNE umap-learn pynndescent)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

norm() { echo "$1" | tr 'A-Z' 'a-z' | tr '_.' '--'; }   # PEP 503 name
freeze=$("$FREEZE_PIP" freeze 2>/dev/null)
pin() {  # version of package $1 in the project's venv
  local want; want=$(norm "$1")
  echo "$freeze" | while IFS= read -r line; do
    [[ "$line" == *==* ]] || continue
    if [[ "$(norm "${line%%==*}")" == "$want" ]]; then echo "${line#*==}"; break; fi
  done
}

mkdir -p "$DEST"
# .whl/ must stay out of git (the project's .gitignore has /.whl/; else add it to info/exclude)
if ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; echo '/.whl/' >> "$exclude"
fi

wheel_name() { echo "$1" | tr 'A-Z-' 'a-z_'; }   # the name as wheel files spell it (lower-cased here)
drop_old() {  # remove wheels of package $1 other than version $2
  local w base
  for w in "$DEST"/*.whl; do
    [[ -e "$w" ]] || continue
    base=$(basename "$w")
    if [[ "$(wheel_name "${base%%-*}")" == "$(wheel_name "$1")" && "$base" != *"-$2-"* ]]; then
      echo "removing old $base"; rm -f "$w"
    fi
  done
}

specs=()
for p in "${PKGS[@]}"; do
  v=$(pin "$p")
  [[ -n "$v" ]] || { echo "error: $p is not installed in $FREEZE_PIP's environment; cannot pin it" >&2; exit 1; }
  drop_old "$p" "$v"
  specs+=("$p==$v")
done
echo "downloading: ${specs[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${specs[@]}"

# ete3 3.1.3 exists only as an sdist: build a pure-python wheel (py3-none-any)
ETE=$(pin ete3); ETE=${ETE:-3.1.3}
drop_old ete3 "$ETE"
if ! ls "$DEST"/ete3-"$ETE"-*.whl >/dev/null 2>&1; then
  echo "building ete3==$ETE wheel"
  "$PYTHON" -m pip wheel -q --no-deps "ete3==$ETE" -w "$DEST"
fi
# The built wheel carries one data file, ete3-X.data/data/ete3/tools/ete_build.cfg (config of the `ete3 build`
# tool, which treeprobe never runs). `pip install --target DIR --upgrade` puts data files at DIR's top, so it
# lands in DIR/ete3/ and --upgrade then REPLACES the ete3 package with that folder: `import ete3` finds a
# namespace package with no Tree. Drop the data file (and its RECORD line) from the wheel.
for w in "$DEST"/ete3-*.whl; do
  "$PYTHON" - "$w" <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i)) for i in z.infolist()]
if any(".data/data/" in i.filename for i, _ in items):
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for i, data in items:
            if ".data/data/" in i.filename:
                continue
            if i.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if b".data/data/" not in l)
            z.writestr(i, data)
    os.replace(tmp, path)
    print(f"dropped the data files from {os.path.basename(path)}")
EOF
done

# ---- checks: one version per package; every wheel pure or cp312 manylinux x86_64; no unmet requirement
echo
echo "wheels in $DEST:"
bad=0
declare -A seen=()
for w in "$DEST"/*.whl; do
  base=$(basename "$w"); name=$(wheel_name "${base%%-*}")
  if [[ -n "${seen[$name]:-}" ]]; then echo "error: two versions of $name: ${seen[$name]} $base" >&2; bad=1; fi
  seen[$name]=$base
  tag=${base%.whl}; tag=${tag#*-*-}     # python-abi-platform (no build tag in these)
  case "$tag" in
    py3-none-any|py2.py3-none-any|cp312-cp312-manylinux*x86_64*) ;;
    cp3[2-9]-abi3-manylinux*x86_64*|cp31[0-2]-abi3-manylinux*x86_64*) ;;   # stable ABI (wcwidth 0.9.4)
    *) echo "error: $base does not install on cp312 x86_64 ($tag)" >&2; bad=1 ;;
  esac
  if unzip -l "$w" | grep -q '\.data/data/'; then
    echo "error: $base has data files (*.data/data/), which pip install --target --upgrade can clobber packages with" >&2
    bad=1
  fi
  printf '  %-60s %8s bytes\n' "$base" "$(stat -c %s "$w")"
done

# Requires-Dist of each wheel (no extras, no markers for other platforms) must be on the image or in .whl/
IMAGE_LIST=${GPU_IMAGE_PACKAGES:-/work/.library/device/KINDS.md}
if [[ -f "$IMAGE_LIST" ]]; then
  have=$(sed -n 's/^nvidia-h100-x1, nvidia-h200: .*Packages: //p' "$IMAGE_LIST" | tr -d '.' | tr ',' '\n' \
         | sed 's/^ *//; s/ *$//' | while read -r n; do [[ -n "$n" ]] && norm "$n"; done)
  for w in "$DEST"/*.whl; do
    while IFS= read -r req; do
      r=$(norm "$(echo "$req" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/')")
      in_whl=0
      for n in "${!seen[@]}"; do [[ "$(norm "$n")" == "$r" ]] && in_whl=1; done
      if (( ! in_whl )) && ! grep -qxF "$r" <<<"$have"; then
        echo "error: $(basename "$w") needs $r, which is neither on the GPU image nor in $DEST" >&2; bad=1
      fi
    done < <(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
             | grep -v 'python_version *< *"3\.\(1[01]\|[0-9]\)"' || true)
  done
else
  echo "note: $IMAGE_LIST not found; skipped the Requires-Dist check against the GPU image's package list"
fi

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
printf '\n.whl total: %d bytes (%.1f MiB); tracked files: %d bytes (%.1f MiB); together %.1f MiB of the 64 MiB a device call may carry\n' \
  "$total" "$(echo "$total/1048576" | bc -l)" "$tracked" "$(echo "$tracked/1048576" | bc -l)" \
  "$(echo "($total+$tracked)/1048576" | bc -l)"
(( total + tracked < 48 * 1048576 )) || { echo "error: over 48 MiB together; too close to the 64 MiB limit" >&2; bad=1; }
exit $bad
