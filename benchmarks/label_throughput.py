"""Labeling efficiency: end-to-end ``clasp label`` images/s / bare CLIP forward images/s, same model and batch.

    .venv/bin/python -m benchmarks.label_throughput                       # tiny CLIP, CPU
    .venv/bin/python -m benchmarks.label_throughput --arch ViT-B-16 --images 96 --batch-size 16

The corpus is ingested from generated 256x128 JPEG pedestrian-sized images (smooth colour fields
plus noise, so they compress like photos). The model has random weights (``allow_random_weights``):
speed does not depend on the weights. Bare forward = the dense CLIP pass (global + patch features)
on in-memory normalised tensors at the same resolution, batch size and precision. End-to-end =
the labeling loop of run_labeling (decode workers, forward, labelers, Parquet writes), without the
one-off model load and prompt embedding, which are reported separately. Bytes per image = size of
the label Parquet files (no embedding) / images. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from labeling.clip_model import DenseClip, load_clip
from labeling.label import LabelConfig, resolve_resolution, run_labeling
from pipeline.formats import labels_dir
from pipeline.ingest import IngestConfig, ingest


def make_corpus(root: Path, n: int, per_shard: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    src = root / "src"
    yy, xx = np.mgrid[0:256, 0:128] / 256.0
    for i in range(n):
        base = rng.uniform(0, 255, (4, 3))
        img = base[0] + (base[1] - base[0]) * yy[..., None] + (base[2] - base[3]) * xx[..., None] * 0.5
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        (src / f"v{i % 7}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / f"v{i % 7}" / f"f{i:05d}.jpg", quality=90)
    ingest(
        IngestConfig(source=str(src), corpus="bench", root=str(root), images_per_shard=per_shard, workers=1, quiet=True)
    )


def bare_forward_rate(dense: DenseClip, batch: torch.Tensor, seconds: float, device: str, bf16: bool) -> float:
    done, t0 = 0, None
    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        for i in range(10_000):
            if i == 1:  # first pass warms up allocators/kernels
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0, done = time.perf_counter(), 0
            dense(batch)
            done += batch.shape[0]
            if t0 is not None and time.perf_counter() - t0 > seconds and i >= 3:
                break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="clasp-vit-tiny-8")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clip-checkpoint", default=None, help="trained weights (labels compress better than random)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="clasp-label-bench-"))
    try:
        t = time.perf_counter()
        make_corpus(tmp, args.images, args.per_shard)
        print(f"corpus: {args.images} JPEGs 256x128 ingested in {time.perf_counter() - t:.1f} s")
        cfg = LabelConfig(
            root=str(tmp),
            corpus="bench",
            clip=args.arch,
            clip_checkpoint=args.clip_checkpoint,
            allow_random_weights=True,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            quiet=True,
        )
        run = run_labeling(cfg)
        e2e_rate = run.images / run.loop_s
        setup_s = run.total_s - run.loop_s
        label_bytes = sum(p.stat().st_size for p in labels_dir(tmp, "bench", run.labelset).glob("*.parquet"))

        from pipeline.guards import resolve_device

        device = resolve_device(args.device)
        loaded = load_clip(args.arch, args.clip_checkpoint, allow_random_weights=True, device=device)
        res = resolve_resolution(cfg, loaded)
        dense = DenseClip(loaded.model, res).to(device).eval()
        bf16 = device.startswith("cuda")
        x = torch.randn(args.batch_size, 3, *res, device=device)
        if bf16:
            dense, x = dense.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        bare_rate = bare_forward_rate(dense, x, seconds=max(3.0, run.loop_s / 2), device=device, bf16=bf16)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = e2e_rate / bare_rate
    per_image = label_bytes / args.images
    print(f"model {args.arch} at {res[0]}x{res[1]}, batch {args.batch_size}, device {device}, workers {args.workers}")
    print(f"bare dense forward:  {bare_rate:8.1f} images/s")
    print(f"end-to-end labeling: {e2e_rate:8.1f} images/s  (+ {setup_s:.1f} s one-off model load and prompts)")
    print(f"label efficiency (end-to-end / bare forward): {ratio:.3f}  (target >= 0.9)")
    print(f"label bytes per image (Parquet zstd, no embedding): {per_image:.1f}  (target <= 256)")
    print(
        json.dumps(
            {
                "label_efficiency": round(ratio, 4),
                "label_bytes_per_image": round(per_image, 1),
                "e2e_images_per_s": round(e2e_rate, 1),
                "bare_forward_images_per_s": round(bare_rate, 1),
                "arch": args.arch,
                "resolution": list(res),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "device": device,
                "images": args.images,
            }
        )
    )


if __name__ == "__main__":
    main()
