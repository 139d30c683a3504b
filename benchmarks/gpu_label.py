"""GPU labeling throughput: CLIP ViT-B-16 at 448x224, bf16, through the real ingest -> label path.

    python -m benchmarks.gpu_label --out $OUT/label.json            # part 1 of benchmarks/gpu_all.sh
    python -m benchmarks.gpu_label --dry-run                         # tiny CLIP on the CPU: checks the script

The CLIP has RANDOM weights (``allow_random_weights``; no network there): speed does not depend on
them, the label values are noise. Measured in one run:

1. corpus: ``--images`` distinct JPEGs of LUPerson-like sizes (96-384 px high) written by all cores,
   then ``pipeline.ingest.ingest`` (the code of ``clasp ingest``) into WebDataset shards;
2. end-to-end: ``labeling.label.run_labeling`` (``clasp label``: DataLoader decode workers = the
   machine's cores, pinned memory, dense CLIP, labelers, Parquet writes); images/s of its loop,
   the one-off model load and prompt embedding apart; label bytes per image on disk; and the same
   DataLoader alone (decode + resize, no model) over up to 16k images: the CPU side's ceiling;
3. bare forward: the same ``DenseClip`` on device-resident random bf16 channels-last batches of the
   same size, eager (the path labeling runs) and ``torch.compile``d; FLOPs per image counted by
   ``torch.utils.flop_counter``; MFU against the measured bf16 matrix-product rate and the datasheet;
4. GPU decode (optional, on by default on CUDA): the encoded bytes of the corpus held in memory,
   ``torchvision.io.decode_jpeg(device="cuda")`` per batch, bilinear resize on the GPU, then the
   same forward: images/s of that feed + forward (no labelers, no writes).
Without a GPU and without ``--dry-run`` it prints a skip line (so ``make bench`` stays CPU-safe).
Last line: one JSON object (also rewritten to ``--out`` after every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks.gpu_common import Budget, Results, datasheet_peak, matmul_peak_flops, write_person_folder


def parse_args() -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--resolution", type=int, nargs=2, default=[448, 224], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=65536, help="corpus size for the end-to-end run")
    p.add_argument("--per-shard", type=int, default=4096)
    p.add_argument("--workers", type=int, default=cores, help="decode workers (default: the machine's cores)")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per bare measurement")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip measurements that would not fit")
    p.add_argument("--peak-flops", type=float, default=None, help="measured bf16 matmul FLOP/s (else measured here)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-gpu-decode", action="store_true")
    p.add_argument("--out", default=None, help="JSON file rewritten after every figure")
    p.add_argument("--dry-run", action="store_true", help="tiny CLIP, CPU, a few images: checks the script")
    args = p.parse_args()
    if args.dry_run:
        args.arch, args.resolution, args.batch_size, args.images, args.per_shard = (
            "clasp-vit-tiny-8",
            [64, 32],
            8,
            48,
            16,
        )
        args.workers, args.seconds, args.no_compile = 0, 0.3, True
    return args


def timed_rate(fn, inputs: list, seconds: float, on_gpu: bool) -> float:
    """Images/s of ``fn`` cycling over ``inputs`` (several batches, so no run re-reads one cached buffer);
    median over 1-s windows after 3 warm-up calls."""
    import torch

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    for i in range(3):
        fn(inputs[i % len(inputs)])
    sync()
    rates, end, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < end or len(rates) < 2:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(1.0, seconds):
            n += fn(inputs[i % len(inputs)])
            i += 1
            if on_gpu and i % 4 == 0:
                sync()
        sync()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def flops_per_image(dense, res: tuple[int, int], device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # With gradients on: under no_grad, eval-mode nn.MultiheadAttention takes its fused fast path, which
    # FlopCounterMode does not see (the in/out projections, a third of a ViT's FLOPs, would go uncounted).
    x = torch.randn(2, 3, *res, device=device)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        dense(x)
    return counter.get_total_flops() / 2


def build_corpus(root: Path, args: argparse.Namespace, results: Results) -> None:
    from pipeline.ingest import IngestConfig, ingest

    t = time.perf_counter()
    write_person_folder(root / "src", args.images, processes=args.workers)
    made = time.perf_counter() - t
    summary = ingest(
        IngestConfig(
            source=str(root / "src"),
            corpus="bench",
            root=str(root),
            images_per_shard=args.per_shard,
            workers=args.workers,
            quiet=True,
        )
    )
    mean_kib = summary.n_bytes / max(1, summary.images) / 1024
    print(
        f"corpus: {summary.images} JPEGs (mean {mean_kib:.1f} KiB) written in {made:.1f} s, "
        f"ingested into {summary.shards} shards in {summary.seconds:.1f} s",
        flush=True,
    )
    results.update(images=summary.images, shards=summary.shards, jpeg_mean_bytes=summary.n_bytes / summary.images)


def end_to_end(root: Path, args: argparse.Namespace, device: str, results: Results) -> float:
    from labeling.label import LabelConfig, run_labeling
    from pipeline.formats import labels_dir

    run = run_labeling(
        LabelConfig(
            root=str(root),
            corpus="bench",
            clip=args.arch,
            allow_random_weights=True,
            resolution=tuple(args.resolution),
            batch_size=args.batch_size,
            workers=args.workers,
            device=device,
            quiet=True,
        )
    )
    rate = run.images / run.loop_s
    label_bytes = sum(p.stat().st_size for p in labels_dir(root, "bench", run.labelset).glob("*.parquet"))
    setup = run.total_s - run.loop_s  # indexing the shards, building the labelers (prompts); not the model load
    print(
        f"end-to-end clasp label: {rate:9.1f} images/s over {run.images} images, {args.workers} decode "
        f"workers (+ {setup:.1f} s shard index and prompts); {label_bytes / run.images:.1f} label bytes/image",
        flush=True,
    )
    results.update(e2e_images_per_s=rate, e2e_setup_s=setup, label_bytes_per_image=label_bytes / run.images)
    return rate


def decode_rate(root: Path, args: argparse.Namespace, on_gpu: bool, max_images: int = 16384) -> float:
    """Images/s of labeling's decode stage alone: ``ShardImages`` in a DataLoader with the same workers, batch
    and pinning as ``run_labeling``, over the first shards (up to ``max_images``), worker start-up excluded."""
    import torch

    from labeling.image_shards import ShardImages, index_shard
    from pipeline.formats import images_dir

    indices = [index_shard(p) for p in sorted(images_dir(root, "bench").glob("*.tar"))]
    indices = indices[: max(1, max_images // len(indices[0].keys))]
    loader = torch.utils.data.DataLoader(
        ShardImages(indices, tuple(args.resolution)),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=on_gpu,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    n, t0 = 0, None
    for ids, _, _ in loader:
        if t0 is None:  # the first batch waits for the workers to start
            t0 = time.perf_counter()
            continue
        n += len(ids)
    return n / (time.perf_counter() - t0) if n else float("nan")


def read_encoded(root: Path, limit: int) -> list[bytes]:
    """The first ``limit`` encoded images of the corpus's shards, in shard order."""
    from labeling.image_shards import index_shard
    from pipeline.formats import images_dir

    out: list[bytes] = []
    for shard in sorted(images_dir(root, "bench").glob("*.tar")):
        idx = index_shard(shard)
        with open(shard, "rb") as fh:
            for offset, size in zip(idx.offsets, idx.sizes, strict=True):
                fh.seek(int(offset))
                out.append(fh.read(int(size)))
                if len(out) >= limit:
                    return out
    return out


def main() -> None:
    args = parse_args()
    import torch

    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        print("gpu_label: no CUDA GPU visible; nothing measured (--dry-run checks the script on the CPU)")
        print(json.dumps({"skipped": "no GPU"}))
        return
    device = "cuda" if on_gpu else "cpu"
    budget = Budget(args.budget_s)
    name = torch.cuda.get_device_name() if on_gpu else "cpu (dry run)"
    res = tuple(args.resolution)
    results = Results(args.out, part="label", device=name, arch=args.arch, random_weights=True)
    results.update(resolution=list(res), batch_size=args.batch_size, workers=args.workers, bf16=on_gpu)
    print(f"gpu_label on {name}: {args.arch} with RANDOM weights (speed only; labels are noise)", flush=True)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = args.peak_flops or matmul_peak_flops()
        results.update(matmul_bf16_tflops=peak / 1e12, datasheet_bf16_tflops=(datasheet_peak(name) or 0) / 1e12)

    with tempfile.TemporaryDirectory(prefix="clasp-gpu-label-") as tmp:
        root = Path(tmp)
        build_corpus(root, args, results)
        e2e = end_to_end(root, args, device, results)
        decode = decode_rate(root, args, on_gpu)
        results.update(decode_images_per_s=decode)
        print(f"decode alone (same DataLoader, no model): {decode:9.1f} images/s", flush=True)

        from labeling.clip_model import DenseClip, load_clip

        loaded = load_clip(args.arch, None, allow_random_weights=True, device=device)
        dense = DenseClip(loaded.model, res).to(device).eval()
        flops = flops_per_image(dense, res, device)
        if on_gpu:
            dense = dense.to(memory_format=torch.channels_last)
        inputs = [
            torch.randn(args.batch_size, 3, *res, device=device).contiguous(memory_format=torch.channels_last)
            for _ in range(4)
        ]

        forward = partial(_forward_fn, device=device, on_gpu=on_gpu)
        bare = timed_rate(forward(dense), inputs, args.seconds, on_gpu)
        results.update(gflop_per_image=flops / 1e9, bare_images_per_s=bare, e2e_over_bare=e2e / bare)
        print(f"bare forward (eager):    {bare:9.1f} images/s, {flops / 1e9:.1f} GFLOP/image (counted)", flush=True)
        print(f"end-to-end / bare: {e2e / bare:.3f} (target >= 0.9)", flush=True)

        report_mfu = partial(_report_mfu, results, flops=flops, peak=peak if on_gpu else 0.0, e2e=e2e, name=name)
        if on_gpu:
            report_mfu(bare, "eager")
        if not args.no_gpu_decode and budget.allows(10 + args.seconds, "GPU JPEG decode", results):
            try:
                rate = gpu_decode_rate(dense, read_encoded(root, 16 * args.batch_size), loaded, args, device)
                results.update(gpu_decode_images_per_s=rate, gpu_decode_over_bare=rate / bare)
                print(f"GPU-decode feed + forward: {rate:9.1f} images/s ({rate / bare:.3f} of bare)", flush=True)
            except Exception as exc:  # noqa: BLE001 - optional path: report, keep the other figures
                results.note(f"GPU decode failed: {type(exc).__name__}: {str(exc)[:300]}")
                print(f"GPU decode failed: {type(exc).__name__}: {exc}", flush=True)
        if not args.no_compile and budget.allows(60 + args.seconds, "torch.compile bare forward", results):
            try:
                compiled = timed_rate(forward(torch.compile(dense)), inputs, args.seconds, on_gpu)
                results.update(compiled_images_per_s=compiled)
                print(f"bare forward (compiled): {compiled:9.1f} images/s", flush=True)
                if on_gpu and compiled > bare:
                    report_mfu(compiled, "compiled")
            except Exception as exc:  # noqa: BLE001 - a compile failure must not lose the other figures
                results.note(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
                print(f"torch.compile failed: {type(exc).__name__}: {exc}", flush=True)
    print(results.json_line())


def _forward_fn(model, *, device: str, on_gpu: bool):
    """A timed_rate step: one no-grad forward of ``model`` (bf16 autocast on CUDA); returns the batch size."""
    import torch

    def fn(x) -> int:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=on_gpu):
            model(x)
        return x.shape[0]

    return fn


def _report_mfu(results: Results, best: float, which: str, *, flops: float, peak: float, e2e: float, name: str) -> None:
    """Record and print the model FLOP utilisation of ``best`` images/s against the measured (and datasheet) peak."""
    mfu = {"mfu_matmul": best * flops / peak, "mfu_e2e_matmul": e2e * flops / peak}
    if datasheet_peak(name):
        mfu["mfu_datasheet"] = best * flops / datasheet_peak(name)
    results.update(**mfu)
    print(
        f"MFU ({which} bare forward, {best * flops / 1e12:.0f} TFLOP/s): {mfu['mfu_matmul']:.1%} of the "
        f"measured {peak / 1e12:.0f} TFLOP/s bf16 matmul; end-to-end {mfu['mfu_e2e_matmul']:.1%} "
        "(target >= 50%)",
        flush=True,
    )


def gpu_decode_rate(dense, encoded: list[bytes], loaded, args: argparse.Namespace, device: str) -> float:
    """Images/s of: decode_jpeg on ``device`` -> bilinear resize -> normalise -> dense forward (bf16 on CUDA)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    on_gpu = device.startswith("cuda")
    res = tuple(args.resolution)
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1) * 255.0
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    batches = [data[i : i + args.batch_size] for i in range(0, len(data) - args.batch_size + 1, args.batch_size)]

    def fn(chunk) -> int:
        images = decode_jpeg(chunk, device=device)
        x = torch.cat([F.interpolate(im[None].float(), size=res, mode="bilinear", antialias=True) for im in images])
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=on_gpu):
            dense(x)
        return len(chunk)

    return timed_rate(fn, batches, args.seconds, on_gpu)


if __name__ == "__main__":
    main()
