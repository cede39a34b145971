#!/usr/bin/env bash
# Download the wheels the lent GPU machine's image lacks into .whl/ (git-ignored), for `carry`.
#
#   bench/gpu_wheels.sh                      # here, on any CPU machine that reaches the package registry
#   PYTHON=/path/to/python bench/gpu_wheels.sh
#
# The device image ('cuda'; /work/.library/device/KINDS.md) has Python 3.12, torch 2.11 (CUDA 13),
# transformers 5.17, accelerate 1.15, peft (version not listed), tokenizers 0.23.2, safetensors
# 0.8.0, huggingface_hub 1.33, pyarrow, pandas, fsspec, xxhash, anyio, idna, psutil, jinja2; it
# lacks trl, datasets (and its dill, multiprocess) and bitsandbytes. Its transformers is older than
# this project needs (>=5.23), and transformers 5.25 checks at import that huggingface_hub is
# >=2.4, whose own needs (httpx2, httpcore2, truststore, click>=8.4.2, hf-xet>=1.6) are not all
# in the image either; peft must be 0.21 (the fast path reads its ParamWrapper); accelerate 1.16
# is what the project is tested with here (the image has 1.15). Nothing can be fetched there, so
# these travel with the working tree, which with the carried paths must fit in 64 MiB per call
# (the tracked tree is ~16.4 MiB).
#
# bitsandbytes' wheel is ~41 MiB, almost all of it one library per CUDA/ROCm/XPU version; the
# image's torch is built for CUDA 13.0 and bitsandbytes loads libbitsandbytes_cuda<torch's CUDA>.so,
# so the copy here keeps libbitsandbytes_cuda130.so (+ cuda132) and the CPU library and drops the
# rest (~3.6 MiB left; pip installs the trimmed wheel: it does not check RECORD against the zip).
# The pip command is the one the device tool's README gives (no deps, binary only, cp312, manylinux).
# Prints each wheel's size and whether tree + .whl fits the 64 MiB carry limit. A failed download
# leaves an existing .whl/ as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The versions this project is tested with (pyproject.toml, DESIGN.md), one of each.
WHEELS=(transformers==5.25.0 peft==0.21.2 trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 click==8.5.1 hf-xet==1.8.0
        h11==0.16.0 idna==3.21 anyio==4.16.0 fsspec==2026.9.0 regex==2026.12.2 bitsandbytes==0.50.2)
KEEP_LIBS='libbitsandbytes_(cpu|cuda130|cuda132)\.so$'

git check-ignore -q .whl/x || { echo "gpu_wheels.sh: .whl/ is not ignored by git (add /.whl/ to .gitignore)" >&2; exit 2; }
tmp=$(mktemp -d)  # outside the tree: a half-finished download must never travel with it
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$tmp" "${WHEELS[@]}"
bnb=$(ls "$tmp"/bitsandbytes-*.whl)
drop=$(unzip -Z1 "$bnb" | grep -E '^bitsandbytes/libbitsandbytes_.*\.so$' | grep -vE "$KEEP_LIBS" || true)
[ -z "$drop" ] || zip -q -d "$bnb" $drop
rm -rf .whl && mv "$tmp" .whl  # swap in only a complete folder

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
size=$(du -cb .whl/*.whl | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
for w in .whl/*.whl; do printf '%8s MiB  %s\n' "$(mib "$(stat -c %s "$w")")" "${w##*/}"; done
printf '.whl: %s MiB; tracked tree: %s MiB; together %s MiB of the 64 MiB carry limit: %s\n' "$(mib "$size")" \
    "$(mib "$tree")" "$(mib $((tree + size)))" "$([ $((tree + size)) -le $limit ] && echo fits || echo 'DOES NOT FIT')"
