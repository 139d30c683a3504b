"""GPU labeling speed: ViT-B-16 dense CLIP at the default person resolution, bf16, images/s and MFU.

    python benchmarks/gpu_label.py                 # on a GPU machine, < 5 min
    python benchmarks/gpu_label.py --smoke         # tiny model on CPU: checks the script itself

Needs torch, open_clip_torch, numpy, pillow, pyarrow, pyyaml, rich and this checkout (no install,
no network: random weights, speed does not depend on them); it says which package is missing.
Measures, in one run:
1. bare forward: DenseClip (global + MaskCLIP patch features) on in-memory bf16 channels-last
   batches, plus the same with torch.compile; FLOPs per image counted by torch's FlopCounterMode;
   MFU = achieved FLOP/s / the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s, A100 312).
2. end-to-end ``run_labeling`` over generated JPEGs (DataLoader decode workers, pinned memory,
   labelers, Parquet writes): images/s and its ratio to the bare forward.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def check_deps() -> None:
    missing = []
    for mod in ("torch", "open_clip", "numpy", "PIL", "pyarrow", "yaml", "rich"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        sys.exit(
            f"gpu_label: missing Python packages {missing}; "
            "pip install torch open_clip_torch pillow pyarrow pyyaml rich"
        )


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_image(dense, res: tuple[int, int], device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, *res, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense(x)
    return counter.get_total_flops() / 2


def timed_rate(fn, batch, seconds: float, device: str) -> float:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        fn(batch)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(5):
            fn(batch)
            n += batch.shape[0]
        sync()
    return n / (time.perf_counter() - t0)


def main() -> None:
    check_deps()
    import torch

    from labeling.clip_model import DenseClip, load_clip
    from labeling.label import LAST_RUN, LabelConfig, run_labeling

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--resolution", default="448x224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--e2e-images", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, seconds: test the script")
    args = ap.parse_args()
    if args.smoke:
        args.arch, args.resolution, args.batch_size, args.seconds, args.e2e_images = (
            "clasp-vit-tiny-8",
            "128x64",
            16,
            2.0,
            64,
        )
        args.workers, args.no_compile = 1, True
    res = tuple(int(v) for v in args.resolution.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("gpu_label: no CUDA GPU visible; nothing measured (use --smoke to check the script on CPU)")
        print(json.dumps({"skipped": "no GPU"}))
        return
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bf16 = device == "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    loaded = load_clip(args.arch, None, allow_random_weights=True, device=device)
    dense = DenseClip(loaded.model, res).to(device).eval()
    flops = flops_per_image(dense, res, device)
    x = torch.randn(args.batch_size, 3, *res, device=device)
    if bf16:
        dense, x = dense.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run(model):
        def fn(batch):
            with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                return model(batch)

        return fn

    eager = timed_rate(run(dense), x, args.seconds, device)
    print(
        f"{name}: {args.arch} dense forward at {res[0]}x{res[1]}, batch {args.batch_size}, "
        f"{'bf16' if bf16 else 'fp32'}: {flops / 1e9:.1f} GFLOP/image"
    )
    print(f"bare forward eager:    {eager:9.1f} images/s")
    compiled = None
    if not args.no_compile:
        try:
            compiled = timed_rate(run(torch.compile(dense)), x, args.seconds, device)
            print(f"bare forward compiled: {compiled:9.1f} images/s")
        except Exception as exc:  # noqa: BLE001 - a compile failure must not lose the other figures
            print(f"torch.compile failed: {type(exc).__name__}: {exc}")
    best = max(eager, compiled or 0.0)
    peak = peak_tflops(name)
    mfu = best * flops / (peak * 1e12) if peak else None
    if mfu is not None:
        print(f"MFU (best bare forward) = {best * flops / 1e12:.1f} TFLOP/s / {peak:.0f} peak = {mfu:.1%}")

    import tempfile

    from benchmarks.label_throughput import make_corpus

    with tempfile.TemporaryDirectory(prefix="clasp-gpu-label-") as tmp:
        t = time.perf_counter()
        make_corpus(Path(tmp), args.e2e_images, per_shard=max(1, args.e2e_images // 8))
        print(f"corpus of {args.e2e_images} JPEGs ingested in {time.perf_counter() - t:.0f} s")
        run_labeling(
            LabelConfig(
                root=tmp,
                corpus="bench",
                clip=args.arch,
                allow_random_weights=True,
                resolution=res,
                batch_size=args.batch_size,
                workers=args.workers,
                quiet=True,
            )
        )
    e2e = LAST_RUN["images"] / LAST_RUN["loop_s"]
    print(
        f"end-to-end labeling:   {e2e:9.1f} images/s with {args.workers} decode workers; "
        f"ratio to eager bare forward {e2e / eager:.3f}"
    )
    print(
        json.dumps(
            {
                "device": name,
                "arch": args.arch,
                "resolution": list(res),
                "batch_size": args.batch_size,
                "gflop_per_image": round(flops / 1e9, 2),
                "bare_images_per_s": round(eager, 1),
                "compiled_images_per_s": round(compiled, 1) if compiled else None,
                "mfu": round(mfu, 4) if mfu is not None else None,
                "e2e_images_per_s": round(e2e, 1),
                "label_efficiency": round(e2e / eager, 4),
                "workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
