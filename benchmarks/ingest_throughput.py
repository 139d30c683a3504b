"""Ingest throughput (images/s per core) and peak RSS at two corpus sizes, on LUPerson-like JPEG crops.

    .venv/bin/python -m benchmarks.ingest_throughput [--small 4000 --large 20000]

The corpus is a folder ``country/city/video/frame.jpg`` of JPEG crops with LUPerson-like sizes (height
96-384 px, width/height 0.30-0.55, quality 95 as OpenCV writes them). To keep corpus creation cheap, a pool
of encoded crops (pipeline.synth pedestrians, or blurred noise without it) is reused and each file is made
unique by a JPEG comment segment (COM, FFFE) after the start-of-image marker, so every file has distinct
bytes and a valid structure. Each corpus is ingested with ``workers=1`` in a fresh subprocess (whole run:
listing, shuffle, validation, hashing, tar writing, manifest, duplicates), from a warm page cache; the
figure is stored images per CPU-second of that one process (wall-clock rate printed beside it). Last
line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _crop_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        h = rng.randint(96, 384)
        sizes.append((h, max(32, int(h * rng.uniform(0.30, 0.55)))))
    return sizes


def _encode_pool(n: int, seed: int) -> tuple[list[bytes], str]:
    """``n`` JPEG crops of LUPerson-like sizes: synthetic pedestrians if pipeline.synth is there, else blurred noise."""
    from PIL import Image, ImageFilter

    pool = []
    try:
        import numpy as np

        from pipeline.synth import make_camera, random_look, random_shot, render_shot

        rng = np.random.default_rng(seed)
        cameras = [make_camera(seed, i) for i in range(8)]
        for i, (h, w) in enumerate(_crop_sizes(n, seed)):
            cam = cameras[i % len(cameras)]
            rgb = render_shot(random_look(rng), cam, random_shot(rng, cam), h, w).rgb
            pool.append(_jpeg_bytes(Image.fromarray(rgb)))
        return pool, "pipeline.synth pedestrians"
    except ImportError:
        pass
    rng = random.Random(seed)
    for h, w in _crop_sizes(n, seed):
        sw, sh = max(2, w // 8), max(2, h // 8)  # low-res noise, upscaled and blurred: compresses like a photo
        small = Image.frombytes("RGB", (sw, sh), rng.randbytes(3 * sw * sh))
        pool.append(_jpeg_bytes(small.resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))))
    return pool, "PIL blurred noise"


def _jpeg_bytes(im: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)  # OpenCV's default, which LUPerson's extract.py used
    return buf.getvalue()


def _unique(jpeg: bytes, tag: str) -> bytes:
    comment = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def build_corpus(root: Path, n_images: int, pool: list[bytes], frames_per_video: int = 50) -> int:
    """Write ``n_images`` unique JPEG files under ``root``; returns their total size in bytes."""
    total = 0
    for i in range(n_images):
        video, frame = divmod(i, frames_per_video)
        d = root / f"c{video % 7:02d}" / f"city{video % 3}" / f"v{video:06d}"
        if frame == 0:
            d.mkdir(parents=True, exist_ok=True)
        data = _unique(pool[i % len(pool)], f"clasp-bench-{i}")
        (d / f"{frame:08d}.jpg").write_bytes(data)
        total += len(data)
    return total


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, because ru_maxrss survives exec and would report the
    forking parent's size for a child started by subprocess."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(source: str, root: str) -> None:
    """Run one ingest in this (fresh) process and print its figures as JSON."""
    from pipeline.ingest import IngestConfig, ingest

    rss_before = _peak_rss_mb()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    summary = ingest(
        IngestConfig(
            source=source, format="folder", corpus="bench", root=root, images_per_shard=2000, workers=1, quiet=True
        )
    )
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    peak = _peak_rss_mb()
    print(json.dumps({"images": summary.images, "rejects": summary.rejects, "seconds": seconds, "cpu_s": cpu,
                      "rss_after_imports_mb": rss_before, "peak_rss_mb": peak}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=4000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--pool", type=int, default=256, help="distinct encoded crops reused across the corpus")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the corpora (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("SOURCE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        pool, kind = _encode_pool(args.pool, seed=0)
        print(f"pool: {len(pool)} crops ({kind}), mean {sum(map(len, pool)) / len(pool) / 1024:.1f} KiB")
        results = {}
        for name, n in (("small", args.small), ("large", args.large)):
            src = Path(tmp) / f"corpus_{name}"
            size = build_corpus(src, n, pool)
            child = [sys.executable, "-m", "benchmarks.ingest_throughput", "--child", str(src)]
            run = subprocess.run(
                [*child, str(Path(tmp) / f"root_{name}")],
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(run.stdout.strip().splitlines()[-1])
            res["mb"] = size / 2**20
            results[name] = res
            print(
                f"{name}: {res['images']} images ({res['mb']:.0f} MiB), workers=1: {res['seconds']:.2f} s wall, "
                f"{res['cpu_s']:.2f} s CPU = {res['images'] / res['cpu_s']:.0f} images per CPU-second "
                f"({res['images'] / res['seconds']:.0f}/s wall); peak RSS {res['peak_rss_mb']:.0f} MiB "
                f"(after imports {res['rss_after_imports_mb']:.0f} MiB)"
            )
    large, small = results["large"], results["small"]
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    extra = large["images"] - small["images"]
    print(f"peak RSS growth {growth:.1f} MiB for {extra} more images ({growth * 2**20 / max(extra, 1):.0f} B/image)")
    print(
        "images/s per core = stored images / CPU seconds (user+sys) of the single-process ingest, so other "
        "load on a shared machine does not count against it; the wall-clock rate is reported beside it"
    )
    figures = {
        "ingest_images_per_s_per_core": round(large["images"] / large["cpu_s"], 1),
        "ingest_images_per_s_wall_1proc": round(large["images"] / large["seconds"], 1),
        "ingest_images_per_s_per_core_small": round(small["images"] / small["cpu_s"], 1),
        "peak_rss_mb_small": round(small["peak_rss_mb"], 1),
        "peak_rss_mb_large": round(large["peak_rss_mb"], 1),
        "images_small": small["images"],
        "images_large": large["images"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
