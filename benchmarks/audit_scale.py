"""Standard label audit at LUPerson scale: 4.2M simulated label rows, 2 DuckDB threads, a memory limit.

    .venv/bin/python -m benchmarks.audit_scale                   # 1.05M and 4.2M images, 2 threads, 2GB
    .venv/bin/python -m benchmarks.audit_scale --images 200000   # quick look
    .venv/bin/python -m benchmarks.audit_scale --keep /tmp/ab    # keep the corpora, reuse them next time

Builds, in a temporary directory, what `clasp ingest` + `clasp label` would leave for a corpus of
that size (manifest.parquet, sizes.json, label shards + labelset.json; no image tars, since the
timed audit has no mosaics) with realistic value distributions: PA-100K-like attribute base rates
with CLIP-like soft probabilities, part maps of a standing person with jittered part boundaries,
shuffled LUPerson-style keys. It then times the full standard audit (no ground truth, no mosaics,
no second label set), each audit in a fresh process, and reports its peak RSS at two corpus sizes
(it must not grow with the corpus beyond DuckDB's memory limit). Target (DESIGN.md section 6):
<= 5 s on 2 cores.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats import (
    LABELSET_FILE,
    MANIFEST_FILE,
    SIZES_FILE,
    images_dir,
    label_schema,
    label_shard_path,
    labels_dir,
    shard_stem,
)
from pipeline.vocab import load_attributes, load_parts

# Approximate PA-100K positive rates, in the attribute vocabulary's order.
CORPUS = "luperson"
PA100K_RATES = [0.45, 0.02, 0.92, 0.02, 0.32, 0.32, 0.36, 0.04, 0.19, 0.18, 0.19, 0.15, 0.06, 0.42,
                0.58, 0.04, 0.14, 0.03, 0.07, 0.01, 0.02, 0.04, 0.55, 0.16, 0.11, 0.06]  # fmt: skip
# (part, top, bottom) of a standing person as fractions of the crop height; columns 25%..75%.
BODY = (("head", 0.02, 0.14), ("face", 0.06, 0.13), ("upper_clothes", 0.14, 0.48), ("arms", 0.20, 0.45),
        ("lower_clothes", 0.48, 0.80), ("legs", 0.80, 0.92), ("shoes", 0.92, 0.99))  # fmt: skip


def _part_templates(n: int, grid: tuple[int, int], parts: list[str], rng: np.random.Generator):
    """``n`` jittered person layouts: (maps (n, gh*gw) uint8, conf (n, gh*gw) uint8)."""
    gh, gw = grid
    rows = (np.arange(gh) + 0.5) / gh
    cols = (np.arange(gw) + 0.5) / gw
    maps = np.zeros((n, gh, gw), np.uint8)
    for i in range(n):
        shift, scale = rng.normal(0, 0.03), rng.uniform(0.85, 1.05)
        left, right = 0.5 - rng.uniform(0.18, 0.3), 0.5 + rng.uniform(0.18, 0.3)
        body = (cols >= left) & (cols <= right)
        for name, top, bottom in BODY:
            if name not in parts:
                continue
            t, b = shift + top * scale, shift + bottom * scale
            band = (rows >= t) & (rows < b)
            if name == "arms":
                m = band[:, None] & ((np.abs(cols - left) < 0.08) | (np.abs(cols - right) < 0.08))[None, :]
            elif name == "face":  # the front of the head, narrower than the body
                m = band[:, None] & (np.abs(cols - (left + right) / 2) < 0.12)[None, :]
            else:
                m = band[:, None] & body[None, :]
            maps[i][m] = parts.index(name)
        if "accessories" in parts and rng.random() < 0.4:
            r0 = rng.integers(gh // 4, gh // 2)
            maps[i, r0 : r0 + gh // 6, max(0, int(right * gw) - 1) : int(right * gw) + 2] = parts.index("accessories")
    conf = np.clip(rng.normal(0.65, 0.18, size=maps.shape), 0.05, 1.0)
    conf = np.round(np.round(conf * 15) * (255 / 15)).astype(np.uint8)  # 16 levels, as labeling.writer stores it
    return maps.reshape(n, -1), conf.reshape(n, -1)


def _summaries(maps: np.ndarray, grid: tuple[int, int], n_parts: int):
    """area_<part> and row_<part> (uint8; row NaN where absent) per template, as in formats.py."""
    gh, gw = grid
    row_of_cell = np.repeat(np.arange(gh), gw)
    area = np.zeros((len(maps), n_parts), np.uint8)
    row = np.full((len(maps), n_parts), np.nan)
    for c in range(1, n_parts):
        hit = maps == c
        cnt = hit.sum(1)
        area[:, c] = np.round(cnt / (gh * gw) * 255)
        with np.errstate(invalid="ignore"):
            mean_row = (hit * row_of_cell).sum(1) / cnt
        row[:, c] = np.where(cnt > 0, np.round(mean_row / max(gh - 1, 1) * 255), np.nan)
    return area, row


def _luperson_keys(ids: np.ndarray) -> pa.Array:
    """LUPerson-style keys of image ``ids``; video = id // 500, so neighbouring frames share a video."""
    video = np.char.add("cn_beijing_v", np.char.zfill((ids // 500).astype(str), 6))
    return pa.array(np.char.add(video, np.char.add("_f", np.char.zfill((ids % 500).astype(str), 6))))


def build_corpus(root: Path, corpus: str, n_images: int, per_shard: int, grid: tuple[int, int], seed: int = 0) -> str:
    """Write manifest.parquet, sizes.json, label shards and labelset.json; return the label set id."""
    rng = np.random.default_rng(seed)
    attrs = load_attributes().names
    parts = list(load_parts().names)
    rates = np.array((PA100K_RATES + [0.1] * len(attrs))[: len(attrs)])
    labelset = "bench0000"
    schema = label_schema(len(attrs), parts)
    maps, conf = _part_templates(4096, grid, parts, rng)
    area, row = _summaries(maps, grid, len(parts))
    fg = (maps > 0).mean(1).astype(np.float32)
    n_shards = -(-n_images // per_shard)
    # unique ids in ingest's shuffled order
    order = rng.permutation(n_images)
    sizes, manifest_parts = {}, []
    for s in range(n_shards):
        n = min(per_shard, n_images - s * per_shard)
        ids = order[s * per_shard : s * per_shard + n]
        keys = _luperson_keys(ids)
        truth = rng.random((n, len(attrs))) < rates
        prob = np.where(truth, rng.beta(5, 2, truth.shape), rng.beta(1.5, 6, truth.shape))
        attr = pa.FixedSizeListArray.from_arrays(pa.array(np.round(prob * 255).astype(np.uint8).ravel()), len(attrs))
        t = rng.integers(0, len(maps), n)
        cells = grid[0] * grid[1]
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * cells)
        cols = {
            "key": keys,
            "attr_prob": attr,
            "part_map": pa.BinaryArray.from_buffers(
                pa.binary(), n, [None, offsets.buffers()[1], pa.py_buffer(maps[t])]
            ),
            "part_conf": pa.BinaryArray.from_buffers(
                pa.binary(), n, [None, offsets.buffers()[1], pa.py_buffer(conf[rng.integers(0, len(conf), n)])]
            ),
            "fg_ratio": pa.array(fg[t]),
        }
        for c, name in enumerate(parts[1:], start=1):
            cols[f"area_{name}"] = pa.array(area[t, c])
        for c, name in enumerate(parts[1:], start=1):
            r = row[t, c]
            cols[f"row_{name}"] = pa.array(np.nan_to_num(r).astype(np.uint8), mask=np.isnan(r))
        path = label_shard_path(root, corpus, labelset, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), path, compression="zstd", compression_level=9)
        tar = f"{shard_stem(corpus, s)}.tar"
        sizes[tar] = n
        manifest_parts.append(
            pa.table(
                {
                    "key": keys,
                    "shard": pa.array(np.full(n, s, np.int32)),
                    "index": pa.array(np.arange(n, dtype=np.int32)),
                    "width": pa.array(rng.integers(40, 200, n).astype(np.int32)),
                    "height": pa.array(rng.integers(100, 400, n).astype(np.int32)),
                    "n_bytes": pa.array(rng.integers(3000, 30000, n).astype(np.int64)),
                    "content_hash": pa.array(np.char.mod("%016x", ids).astype(object)),
                    "source": pa.array(np.char.add("lmdb:", keys.to_numpy(zero_copy_only=False).astype(str)).tolist()),
                }
            )
        )
        if sys.stdout.isatty() or (s + 1) % max(1, n_shards // 10) == 0:
            print(f"  building: shard {s + 1}/{n_shards}", end="\r" if sys.stdout.isatty() else "\n", flush=True)
    img_dir = images_dir(root, corpus)
    img_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(manifest_parts), img_dir / MANIFEST_FILE, compression="zstd")
    (img_dir / SIZES_FILE).write_text(json.dumps(sizes))
    meta = {
        "labelset": labelset,
        "corpus": corpus,
        "grid": list(grid),
        "attributes": attrs,
        "parts": parts,
        "shards": {f"{shard_stem(corpus, s)}.parquet": sizes[f"{shard_stem(corpus, s)}.tar"] for s in range(n_shards)},
    }
    (labels_dir(root, corpus, labelset) / LABELSET_FILE).write_text(json.dumps(meta))
    print()
    return labelset


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss survives exec, so it could report the parent's peak instead)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _audit_once(root: Path, labelset: str, threads: int, memory_limit: str) -> dict:
    """One standard audit in this process (run in a child so its peak RSS is the audit's alone)."""
    from labeling.audit import AuditConfig, run_standard_audit

    cfg = AuditConfig(root=str(root), corpus=CORPUS, labelset=labelset, threads=threads, memory_limit=memory_limit)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_standard_audit(cfg)
    audit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {
        "audit_s": audit_s,
        "cpu_s": cpu_s,
        "cpu_by_step_s": result.cpu_s,
        "rows": result.rows,
        "findings": [f"{f.severity}: {f.what}" for f in result.findings],
        "timings_s": result.timings_s,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _audit_child(root: Path, labelset: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.audit_scale", "--child", str(root), labelset]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--memory-limit", args.memory_limit]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default="1050000,4200000", help="corpus sizes, comma-separated (RSS must not grow)")
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--grid", default="16x8", help="label grid HxW (clasp label's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--repeat", type=int, default=3, help="audits per size; the fastest is reported")
    ap.add_argument("--keep", type=Path, default=None, help="build under this directory and reuse it next time")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "LABELSET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_audit_once(Path(args.child[0]), args.child[1], args.threads, args.memory_limit)))
        return
    grid = tuple(int(x) for x in args.grid.lower().split("x"))
    figures: dict = {"threads": args.threads, "memory_limit": args.memory_limit, "audit_target_s": 5.0, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="clasp_audit_bench_") as tmp:
        for n in (int(x) for x in args.images.split(",")):
            root = (args.keep or Path(tmp)) / f"n{n}"
            done = (labels_dir(root, CORPUS, "bench0000") / LABELSET_FILE).is_file()
            t0 = time.perf_counter()
            labelset = "bench0000" if done else build_corpus(root, CORPUS, n, args.per_shard, grid)
            build_s = time.perf_counter() - t0
            label_bytes = sum(p.stat().st_size for p in labels_dir(root, CORPUS, labelset).glob("*.parquet"))
            how = "reused" if done else f"built in {build_s:.0f} s"
            print(f"{n:,} label rows: {label_bytes / n:.0f} B/image on disk ({how})")
            runs = [_audit_child(root, labelset, args) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["audit_s"])
            for name, secs in best["timings_s"].items():
                print(f"    {name:<28} {secs:6.2f} s wall  {best['cpu_by_step_s'][name]:6.2f} s CPU")
            times = ", ".join(f"{r['audit_s']:.2f}" for r in runs)
            peak = max(r["peak_rss_mb"] for r in runs)
            print(
                f"  standard audit, {args.threads} threads, {args.memory_limit}: best {best['audit_s']:.2f} s wall, "
                f"{best['cpu_s']:.2f} s CPU (runs: {times}); peak RSS {peak:.0f} MB; findings: {best['findings']}"
            )
            figures["sizes"][str(n)] = {
                "audit_s": round(best["audit_s"], 3),
                "audit_cpu_s": round(best["cpu_s"], 3),
                "audit_runs_s": [round(r["audit_s"], 3) for r in runs],
                "peak_rss_mb": round(peak),
                "label_bytes_per_image_disk": round(label_bytes / n, 1),
            }
            if best["rows"] != n:
                raise SystemExit(f"audit saw {best['rows']} rows, expected {n}")
    largest = figures["sizes"][max(figures["sizes"], key=int)]
    figures["audit_s"] = largest["audit_s"]
    figures["audit_cpu_s"] = largest["audit_cpu_s"]
    figures["peak_rss_mb"] = largest["peak_rss_mb"]
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
