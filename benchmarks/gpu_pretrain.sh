#!/usr/bin/env bash
# ViT-B/16 CLASP pre-training throughput on one GPU, bf16, multi-crop (2 x 256x128 + 8 x 128x64), MoE on
# and off, fed by the label-joined WebDataset stream; prints images/s, MFU and the ratios of
# benchmarks/pretrain_step.py, last line JSON. One command, about 3 minutes on an H100:
#
#     bash benchmarks/gpu_pretrain.sh            # env: BATCH (per step, default 128), WORKERS (default 14)
#
# Needs python3 with CUDA torch, torchvision, timm, accelerate, pyarrow, pillow, pyyaml, safetensors, tqdm
# and webdataset (+ braceexpand). A GPU image without webdataset can be given wheels in .whl/ (see
# .library/device/README.md), which this script installs into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import webdataset" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "webdataset is missing: pip install webdataset (or put its wheel and braceexpand's in .whl/)" >&2
        exit 1
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())"
exec "$PY" benchmarks/pretrain_step.py --arch vit_base --img 256 128 --patch 16 --batch "${BATCH:-128}" \
    --local-crops 8 --precision bf16 --workers "${WORKERS:-14}" --steps 20 --warmup 5 \
    --images 8192 --shards 32 --loader-batches 20 "$@"
