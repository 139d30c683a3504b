#!/usr/bin/env bash
# Download, here, the wheels that the lent GPU machine lacks for benchmarks/gpu_all.sh, into .whl/ (ignored by git).
#
#     bash benchmarks/gpu_wheels.sh          # then: carry [".whl"] in the device run (see gpu_all.sh's header)
#
# That machine (.library/device/KINDS.md) runs Python 3.12 with torch, torchvision, timm, accelerate, pyarrow,
# pillow, pyyaml, safetensors, rich, regex, tqdm, huggingface-hub and numpy, and cannot reach a package index.
# What the labeling and pre-training paths import beyond that: open_clip_torch (+ ftfy, wcwidth) and webdataset
# (+ braceexpand), and for the synthetic ablation lmdb (the world's LMDB layout) and duckdb (its audit); the two
# compiled wheels are cp312. 27 MiB together, under the 64 MiB a call carries.
# The versions are the ones this checkout's tests run with; one version of each, since two stop the install there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 lmdb==3.0.0 duckdb==2.0.1)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
