#!/usr/bin/env bash
# The synthetic ablation table on one GPU: a 50k-image world (all CPU cores), CLIP trained on its captions,
# labels, audits, then ViT-S (conv stem) at 256x128 in bf16 pre-trained per variant (the CPU ablation's regime:
# attribute weight 10, no colour jitter, crops of 80-100%; configs/ablation_synthetic.yaml) and read out frozen
# (retrieval mAP on the Market-1501 layout, closed-form ridge mA on the PA-100K layout). Sized for < 9 min
# on one H200; prints the table (results.md) and, last line, one JSON object with the table.
#
#     bash benchmarks/gpu_ablation.sh                 # the GPU run
#     OUT=/tmp/abl TINY=1 bash benchmarks/gpu_ablation.sh    # tiny CPU run of the same steps (a minute or two)
#     bash benchmarks/gpu_ablation.sh --dry-run       # write $OUT/config.yaml, check it loads, run nothing
#
# Interface (benchmarks/gpu_all.sh calls this as its part 3):
#   env OUT         output folder (default runs/gpu_ablation); the world, runs, results.{md,json,png} go there
#   env TINY=1      tiny sizes on CPU (no GPU needed), same code path; `--dry-run` only writes the config
#   env IDENTITIES  corpus people, one image each as in configs/ablation_synthetic.yaml (default 50,400; attributes
#                   generalise only across many people), plus a 750-person Market-1501 and a PA-100K layout
#   env STEPS       pre-training steps per variant (default 300), BATCH images per step (default 128)
#   env PYTHON      interpreter (default .venv/bin/python if present, else python3)
# Exit status 0 only when the table was written. Every step is resumable (`clasp ablate`): rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "gpu_ablation.sh: unknown argument '$arg' (use --dry-run, or env OUT/TINY/IDENTITIES/STEPS)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then PYTHON=$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3); fi
OUT=${OUT:-runs/gpu_ablation}
CORES=$(nproc)
if [[ "${TINY:-0}" == 1 ]]; then
    IDENTITIES=${IDENTITIES:-48}; MARKET=6; STEPS=${STEPS:-2}; BATCH=${BATCH:-4}; PA100K=40; CLIP_S=20; PRECISION=no
    ARCH=vit_micro_conv; IMG="[128,64]"; WORKERS=0; DINO_DIM=256
else
    IDENTITIES=${IDENTITIES:-50400}; MARKET=750; STEPS=${STEPS:-300}; BATCH=${BATCH:-128}; PA100K=5000; CLIP_S=60; PRECISION=bf16
    ARCH=vit_small_conv; IMG="[256,128]"; WORKERS=$(( CORES > 2 ? CORES - 2 : 1 )); DINO_DIM=65536
fi
EPOCHS=$(( (STEPS + 19) / 20 ))
mkdir -p "$OUT"
cat > "$OUT/config.yaml" <<EOF
# written by benchmarks/gpu_ablation.sh (TINY=${TINY:-0}); rerun the script to continue an interrupted run
out: $OUT
synth_overrides: [identities=$IDENTITIES, tracks_per_identity=1, frames_per_track=1, market_identities=$MARKET,
  pa100k_images=$PA100K, "dense=[]", workers=$CORES]
images_per_shard: 2048
clip_train_overrides: [epochs=100, time_limit_s=$CLIP_S, workers=$WORKERS, batch_size=256]
label_overrides: [workers=$WORKERS]
pretrain_config: configs/pretrain/vit_s_luperson.yaml
pretrain_overrides: [model.arch=$ARCH, "model.img_size=$IMG", data.batch_size=$BATCH, data.workers=$WORKERS,
  data.steps_per_epoch=20, optim.epochs=$EPOCHS, optim.warmup_epochs=1, optim.lr=1.0e-3, optim.scale_lr_with_batch=false,
  data.num_local_crops=2, model.loss.dino_out_dim=$DINO_DIM, model.loss.freeze_last_layer_steps=0,
  model.loss.attribute_weight=10, data.photometric=false, "data.global_scale=[0.8,1.0]",
  mixed_precision=$PRECISION, checkpoint_every=100000, tensorboard=false, data.shuffle_buffer=512]
variants:
  - {name: raw_pixels, pretrain: false, backbone: "pixels:16x8"}
  - {name: random_init, pretrain: false}
  - {name: dino_only, overrides: [model.loss.part=false, model.loss.attribute=false]}
  - {name: clasp}
  - {name: gt_labels, labels: gt}
  - {name: gt_labels_noise_0.1, labels: gt, attr_flip: 0.1, part_noise: 0.1}
  - {name: gt_labels_noise_0.25, labels: gt, attr_flip: 0.25, part_noise: 0.25}
  - {name: gt_labels_noise_0.4, labels: gt, attr_flip: 0.4, part_noise: 0.5}
transfers:
  - {task: frozen, dataset: market1501, data: market1501, metric: mAP, overrides: ["img_size=$IMG", workers=$WORKERS]}
  - {task: frozen, dataset: pa100k, data: pa100k, metric: mA, overrides: ["img_size=$IMG", workers=$WORKERS]}
seeds: [0]
EOF
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PYTHON" -c "
import sys
from pipeline.ablate import AblationConfig
from pipeline.config import load_config
cfg = load_config(AblationConfig, '$OUT/config.yaml')
print(f'gpu_ablation: {len(cfg.variants)} variants x {len(cfg.transfers)} read-outs, config $OUT/config.yaml')
"
if [[ $DRY == 1 ]]; then exit 0; fi
if [[ "${TINY:-0}" != 1 ]]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible (TINY=1 runs on CPU)'; print(torch.cuda.get_device_name())"
fi
START=$(date +%s)
"$PYTHON" -m pipeline.cli ablate --config "$OUT/config.yaml"
"$PYTHON" -c "
import json
r = json.load(open('$OUT/results.json'))
table = {e['variant']: {k: round(100 * v['mean'], 2) for k, v in e.items() if k != 'variant'} for e in r['table']}
quality = {k: {m: round(100 * v, 1) for m, v in q.items()} for k, q in r['label_quality'].items()}
print(json.dumps({'gpu_ablation_s': $(date +%s) - $START, 'table': table, 'label_quality': quality}))
"
