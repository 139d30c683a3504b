"""Pseudo-label quality on the synthetic world: CLIP labels vs ground truth, and a geometry-only baseline.

    .venv/bin/python -m benchmarks.label_quality --out runs/label_quality --identities 200

Steps (each skipped when its output already exists): ``clasp synth`` -> ``clasp ingest`` of the
LUPerson-like folder -> ``clasp clip-train`` of the tiny CLIP on the world's pairs.csv ->
``clasp label`` -> comparison with gt.parquet by key.

Protocols (labeling.quality): attribute mA = label-based mean of (TPR + TNR) / 2 over the 26
PA-100K-style attributes at threshold 0.5; part mIoU = mean IoU over the 9 part classes
(background included) of the label grid, ground truth = majority class of each cell's pixels;
foreground IoU = IoU of cells with class > 0. Baselines: ``geometry`` (fixed vertical bands,
position only, no training) and ``position prior`` (each cell's most frequent ground-truth class
over the evaluated images: the best any position-only rule can do, an upper bound for geometry).
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from labeling import quality
from labeling.clip_train import ClipTrainConfig, train_clip
from labeling.label import LabelConfig, run_labeling
from pipeline.formats import labels_dir, read_labelset


def build(args: argparse.Namespace) -> tuple[Path, str, dict[str, float]]:
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.synth import SynthConfig, write_world

    out = Path(args.out)
    world, root = out / "world", out / "data"
    timings = {}
    if not (world / "world.json").is_file():
        t = time.perf_counter()
        write_world(SynthConfig(identities=args.identities, seed=args.seed, quiet=True, dense=[]), world)
        timings["synth_s"] = time.perf_counter() - t
    if not (root / "synthetic" / "images" / "sizes.json").is_file():
        t = time.perf_counter()
        ingest(
            IngestConfig(
                source=str(world / "luperson"),
                corpus="synthetic",
                root=str(root),
                images_per_shard=args.images_per_shard,
                workers=1,
                quiet=True,
            )
        )
        timings["ingest_s"] = time.perf_counter() - t
    clip_dir = out / f"clip-{args.arch}-e{args.epochs}{args.tag}"
    if not (clip_dir / "open_clip_config.json").is_file():
        t = time.perf_counter()
        train_clip(
            ClipTrainConfig(
                pairs=args.pairs or str(world / "pairs.csv"),
                arch=args.arch,
                out=str(clip_dir),
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                workers=args.workers,
                quiet=False,
            )
        )
        timings["clip_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    overrides = json.loads(args.label_overrides) if args.label_overrides else {}
    set_id = run_labeling(
        LabelConfig(
            root=str(root),
            corpus="synthetic",
            clip_checkpoint=str(clip_dir),
            workers=args.workers,
            batch_size=64,
            quiet=True,
            **overrides,
        )
    ).labelset
    timings["label_s"] = time.perf_counter() - t
    return root, set_id, timings


def evaluate(root: Path, set_id: str, gt_path: Path) -> dict:
    meta = read_labelset(root, "synthetic", set_id)
    grid = tuple(meta["grid"])
    k = len(meta["parts"]["names"])
    labels = pq.ParquetDataset(sorted(labels_dir(root, "synthetic", set_id).glob("*.parquet"))).read()
    gt = pq.read_table(gt_path, columns=["key", "attributes", "part_mask"])
    gt_index = {key: i for i, key in enumerate(gt.column("key").to_pylist())}
    keys = labels.column("key").to_pylist()
    rows = [gt_index[key] for key in keys]
    gt_attr = np.array(gt.column("attributes").to_pylist(), np.uint8)[rows]
    prob = np.array(labels.column("attr_prob").to_pylist(), np.float64) / 255.0
    pred = np.stack([np.frombuffer(b, np.uint8).reshape(grid) for b in labels.column("part_map").to_pylist()])
    masks = gt.column("part_mask").to_pylist()
    gt_grid = np.stack([quality.gt_mask_to_grid(np.asarray(Image.open(io.BytesIO(masks[r]))), grid) for r in rows])

    ma, per_attr = quality.attribute_mA(gt_attr, prob)
    clip_miou, clip_iou = quality.miou(quality.part_confusion(gt_grid, pred, k))
    geo = np.broadcast_to(quality.geometry_baseline(grid, k, part_names=meta["parts"]["names"]), gt_grid.shape)
    geo_miou, geo_iou = quality.miou(quality.part_confusion(gt_grid, geo, k))
    prior = np.broadcast_to(quality.geometry_baseline(grid, k, gt_maps=gt_grid), gt_grid.shape)
    prior_miou, prior_iou = quality.miou(quality.part_confusion(gt_grid, prior, k))
    names = meta["parts"]["names"]
    return {
        "images": len(keys),
        "grid": list(grid),
        "attribute_mA": ma,
        "attribute_acc": dict(zip(meta["attributes"]["names"], np.round(per_attr, 3).tolist(), strict=True)),
        "part_mIoU": clip_miou,
        "part_IoU": dict(zip(names, np.round(clip_iou, 3).tolist(), strict=True)),
        "foreground_IoU": quality.foreground_iou(gt_grid, pred),
        "geometry_mIoU": geo_miou,
        "geometry_IoU": dict(zip(names, np.round(geo_iou, 3).tolist(), strict=True)),
        "geometry_foreground_IoU": quality.foreground_iou(gt_grid, geo),
        "position_prior_mIoU": prior_miou,
        "position_prior_IoU": dict(zip(names, np.round(prior_iou, 3).tolist(), strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/label_quality")
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-shard", type=int, default=1000)
    ap.add_argument("--arch", default="clasp-vit-tiny-8")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pairs", default=None, help="pairs file/folder (default: the world's pairs.csv)")
    ap.add_argument("--tag", default="", help="suffix of the CLIP folder name, to keep variants apart")
    ap.add_argument("--label-overrides", default="", help='JSON of LabelConfig fields, e.g. {"value_residual": true}')
    args = ap.parse_args()

    root, set_id, timings = build(args)
    res = evaluate(root, set_id, Path(args.out) / "world" / "gt.parquet")
    print(f"label set {set_id} on {res['images']} synthetic images, grid {res['grid']}")
    print(f"attribute mA (label-based, thr 0.5): {res['attribute_mA']:.4f}")
    print(
        f"part mIoU (9 classes incl. background): CLIP {res['part_mIoU']:.4f} | geometry bands "
        f"{res['geometry_mIoU']:.4f} | position prior (upper bound of position-only) {res['position_prior_mIoU']:.4f}"
    )
    print(f"foreground IoU: CLIP {res['foreground_IoU']:.4f} | geometry {res['geometry_foreground_IoU']:.4f}")
    for name in res["part_IoU"]:
        print(
            f"  IoU {name:>14}: CLIP {res['part_IoU'][name]:.3f}  geometry {res['geometry_IoU'][name]:.3f}  "
            f"prior {res['position_prior_IoU'][name]:.3f}"
        )
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(json.dumps({"labelset": set_id, "epochs": args.epochs, **res, **timings}))


if __name__ == "__main__":
    main()
