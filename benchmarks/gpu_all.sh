#!/usr/bin/env bash
# All GPU evidence in one command of under 9 minutes on one H200: labeling throughput (CLIP ViT-B-16, 448x224,
# RANDOM weights, real ingest -> label path), pre-training throughput (ViT-B/16 256x128, 2 global + 8 local crops,
# MoE on/off, bf16, eager and torch.compile) and, if benchmarks/gpu_ablation.sh exists, the synthetic ablation in
# whatever time is left. Human-readable lines, then one JSON line; everything also under $OUT:
#   gpu_all.log (all output), gpu_all.json (the last line), label.json, pretrain.json, ablation.{json,log,tar.gz}
#
# With this workplace's device tool (one H200, 16 cores, Python 3.12, no network; .library/device/):
#   1. here, once:   bash benchmarks/gpu_wheels.sh   # open_clip_torch, ftfy, wcwidth, webdataset, braceexpand, lmdb, duckdb (the ablation's):
#                                                    # 2.4 MiB of wheels into .whl/ (git-ignored)
#   2. device run:   command "bash benchmarks/gpu_all.sh", carry [".whl"], timeout_s 600
#      (this script installs .whl/*.whl into /tmp/site when open_clip or webdataset is missing there)
# Anywhere else:   OUT=runs/gpu_all bash benchmarks/gpu_all.sh     (needs the project's dependencies, a GPU)
# CPU dry run:     GPU_ALL_DRY_RUN=1 OUT=/tmp/g bash benchmarks/gpu_all.sh   (tiny models, seconds; a test runs it)
#
# Time guards: GPU_ALL_BUDGET_S (default 525 s) for the whole run; each part gets its share (label 190 s,
# pretrain 300 s or, with no ablation to run, the rest; ablation the rest) and is killed at its limit; a part
# with too little time left is skipped with a note. Parts write their figures as they go, so a killed part keeps what it measured.
# Other settings: GPU_ALL_PARTS ("label pretrain ablation"), PYTHON (python3), LABEL_IMAGES (32768),
# PRETRAIN_BATCH (128), GPU_ALL_ABLATION_SCRIPT (benchmarks/gpu_ablation.sh; run with OUT=<its own dir>,
# TINY=1 in a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-runs/gpu_all}
DRY=${GPU_ALL_DRY_RUN:-0}
BUDGET_S=${GPU_ALL_BUDGET_S:-525}
PARTS=${GPU_ALL_PARTS:-label pretrain ablation}
ABLATION_SCRIPT=${GPU_ALL_ABLATION_SCRIPT:-benchmarks/gpu_ablation.sh}
PY=${PYTHON:-python3}
CORES=$(nproc)
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_all.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
: >"$OUT/gpu_all.log"
exec > >(tee -a "$OUT/gpu_all.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ $DRY == 1 ]]; then
    export CUDA_VISIBLE_DEVICES=""
    echo "gpu_all: DRY RUN on the CPU (tiny models, few images): checks the script, measures nothing"
fi
if ! "$PY" -c "import open_clip, webdataset, lmdb, duckdb" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
            { echo "error: pip could not install .whl/*.whl"; exit 2; }
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        echo "error: open_clip / webdataset / lmdb / duckdb missing and no wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' here" \
            "and carry .whl, or pip install open_clip_torch webdataset"
        exit 2
    fi
fi

# preflight: versions, device, the measured bf16 matmul ceiling (MFU is reported against it and the datasheet)
"$PY" - "$WORK/meta.json" "$DRY" "$BUDGET_S" <<'EOF' || { echo "error: preflight failed (see above)"; exit 2; }
import json, os, platform, subprocess, sys, time
import open_clip, timm, torch, torchvision, webdataset
from benchmarks.gpu_common import datasheet_peak, matmul_peak_flops
meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "dry_run": sys.argv[2] == "1",
        "budget_s": int(sys.argv[3]), "cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "open_clip": open_clip.__version__, "webdataset": getattr(webdataset, "__version__", "?")}
try:  # GPU_ALL_COMMIT names the code when the tree that travelled is a copy without its .git
    meta["git_commit"] = os.environ.get("GPU_ALL_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
if torch.cuda.is_available():
    meta["device"] = torch.cuda.get_device_name()
    meta["matmul_bf16_tflops"] = round(matmul_peak_flops() / 1e12, 1)
    meta["datasheet_bf16_tflops"] = (datasheet_peak(meta["device"]) or 0) / 1e12
else:
    meta["device"] = "cpu"
print("preflight: " + ", ".join(f"{k} {v}" for k, v in meta.items()))
json.dump(meta, open(sys.argv[1], "w"))
EOF
PEAK=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('matmul_bf16_tflops', 0) * 1e12)" "$WORK/meta.json")

left_s() {
    local left=$((BUDGET_S - (SECONDS - START)))
    echo $((left > 0 ? left : 0))
}

# run_part NAME WANT_S MIN_S: runs part_NAME GIVE_S under `timeout GIVE_S` (GIVE_S = min(WANT_S, time left));
# records "NAME<TAB>status<TAB>seconds" for the summary
run_part() {
    local name=$1 want=$2 min=$3 left give t0 rc status
    if [[ " $PARTS " != *" $name "* ]]; then
        return
    fi
    if [[ $name == ablation && ! -f $ABLATION_SCRIPT ]]; then
        echo "== ablation: skipped: $ABLATION_SCRIPT does not exist"
        printf '%s\t%s\t0\n' "$name" "skipped: $ABLATION_SCRIPT does not exist" >>"$WORK/parts.tsv"
        return
    fi
    left=$(left_s)
    give=$((want < left ? want : left))
    if ((give < min)); then
        status="skipped: ${left} s of the ${BUDGET_S} s budget left, needs ${min} s"
        echo "== $name: $status"
        printf '%s\t%s\t0\n' "$name" "$status" >>"$WORK/parts.tsv"
        return
    fi
    echo "== $name: up to $give s ($left s of the budget left)"
    t0=$SECONDS
    "part_$name" "$give"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out at ${give} s (figures measured until then kept)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    echo "== $name: $status after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$WORK/parts.tsv"
}

part_label() {
    local args=(--out "$OUT/label.json" --budget-s $(($1 - 25)) --peak-flops "$PEAK")
    if [[ $DRY == 1 ]]; then
        args+=(--dry-run)
    else
        args+=(--images "${LABEL_IMAGES:-32768}" --workers "$CORES")
    fi
    timeout --kill-after=10 "$1" "$PY" -m benchmarks.gpu_label "${args[@]}"
}

part_pretrain() {
    local args=(--out "$OUT/pretrain.json" --budget-s $(($1 - 30)) --skip-rss)
    if [[ $DRY == 1 ]]; then  # no compile: tracing alone takes most of a minute on 2 busy cores
        args+=(--arch vit_tiny --img 64 32 --batch 4 --local-crops 2 --dino-out-dim 256 --workers 0 --steps 1
            --warmup 1 --rounds 1 --images 32 --shards 2 --loader-batches 2)
    else
        args+=(--compile --arch vit_base --img 256 128 --patch 16 --batch "${PRETRAIN_BATCH:-128}" --local-crops 8
            --precision bf16 --workers "$CORES" --steps 15 --warmup 5 --rounds 2 --loop-rounds 1 --images 8192 --shards 32
            --loader-batches 20 --peak-flops "$PEAK")
    fi
    timeout --kill-after=10 "$1" "$PY" -m benchmarks.pretrain_step "${args[@]}"
}

part_ablation() {
    local dir="$WORK/ablation" log="$OUT/ablation.log" rc
    mkdir -p "$dir"
    if [[ $DRY == 1 ]]; then
        OUT=$dir TINY=1 timeout --kill-after=10 "$1" bash "$ABLATION_SCRIPT" >"$log" 2>&1
    else
        OUT=$dir timeout --kill-after=10 "$1" bash "$ABLATION_SCRIPT" >"$log" 2>&1
    fi
    rc=$?
    tail -n 20 "$OUT/ablation.log"
    # its last line is its JSON (DESIGN.md section 6); its files travel back as one archive (the device
    # tool returns at most 8 files)
    tail -n 1 "$OUT/ablation.log" | "$PY" -c "import json,sys; json.dump(json.loads(sys.stdin.read()), sys.stdout)" \
        >"$OUT/ablation.json" 2>/dev/null || rm -f "$OUT/ablation.json"
    tar -czf "$OUT/ablation.tar.gz" -C "$dir" . 2>/dev/null
    if (($(stat -c %s "$OUT/ablation.tar.gz") > 15 * 1024 * 1024)); then
        rm -f "$OUT/ablation.tar.gz"
        echo "ablation outputs over 15 MiB: not kept under \$OUT (its log and JSON are)"
    fi
    return $rc
}

run_part label 190 60
if [[ -f $ABLATION_SCRIPT && " $PARTS " == *" ablation "* ]]; then
    run_part pretrain 300 90
else  # nothing after it: pre-training may use the rest (a second compiled model, if it fits)
    run_part pretrain "$(left_s)" 90
fi
run_part ablation $(($(left_s) - 10)) 60
echo "== gpu_all: $((SECONDS - START)) s in all"
"$PY" -m benchmarks.gpu_common summary "$OUT" "$WORK"
