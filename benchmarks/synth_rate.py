"""Synthetic-world rendering rate on one core: crops per second at 256x128 (render, then render + JPEG).

    python -m benchmarks.synth_rate                 # 2,000 crops
    python -m benchmarks.synth_rate --count 10000   # the issue's figure directly

The target (issue 2): 10,000 crops at 256x128 in under about a minute on one core, i.e. >= ~170 crops/s.
The rate per core is computed from this process's CPU time (the renderer is single-threaded), so it
stays meaningful on a shared machine; the wall-clock rate is printed beside it. The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from pipeline.synth import make_camera, random_look, random_shot, render_shot


def _run(count: int, encode: bool, seed: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to render ``count`` crops of 256x128, optionally JPEG-encoded."""
    rng = np.random.default_rng(seed)
    cameras = [make_camera(seed, i) for i in range(8)]
    looks = [random_look(rng) for _ in range(200)]
    for cam in cameras:  # build each camera's scene outside the timed loop (once per process in real use)
        render_shot(looks[0], cam, random_shot(rng, cam), 256, 128)
    shots = [(looks[i % len(looks)], cameras[i % len(cameras)]) for i in range(count)]
    wall, cpu = time.perf_counter(), time.process_time()
    for look, cam in shots:
        sample = render_shot(look, cam, random_shot(rng, cam), 256, 128)
        if encode:
            Image.fromarray(sample.rgb).save(io.BytesIO(), format="JPEG", quality=cam.jpeg_quality)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="crops per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"synth rate: {args.count} crops of 256x128 per measurement, one process (load average {load:.1f})")
    wall_r, cpu_r = _run(args.count, encode=False, seed=args.seed)
    wall_j, cpu_j = _run(args.count, encode=True, seed=args.seed + 1)
    rate_r, rate_j = args.count / cpu_r, args.count / cpu_j
    print(f"render only:   {rate_r:7.1f} crops/s per core (CPU time)  {args.count / wall_r:7.1f} crops/s wall")
    print(f"render + JPEG: {rate_j:7.1f} crops/s per core (CPU time)  {args.count / wall_j:7.1f} crops/s wall")
    print(f"10,000 crops with JPEG on one core: {10000 / rate_j:.1f} s (target: under about 60 s)")
    print(
        json.dumps(
            {
                "synth_crops_per_s_per_core": round(rate_r, 1),
                "synth_crops_per_s_per_core_jpeg": round(rate_j, 1),
                "synth_crops_per_s_wall_jpeg": round(args.count / wall_j, 1),
                "synth_seconds_per_10k_jpeg": round(10000 / rate_j, 1),
                "crop": [256, 128],
                "count": args.count,
                "load_average": round(load, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
