"""A label set made from the synthetic world's ground truth instead of CLIP: the upper bound of labeling.

The ablation uses it to separate two questions that CLIP labels mix up: does pre-training with part and
attribute labels help on this world at all (GT labels), and how much of that survives the labels a CLIP
model actually gives (CLIP labels)? It is never a substitute for CLIP labels on a real corpus: it needs
``gt.parquet`` from ``clasp synth``, and its ``labelset.json`` says ``"ground_truth": true`` in large
letters so nothing mistakes it for CLIP output.

The set mirrors a completed CLIP label set of the same ingest (same shards, keys in the same order, same
grid, vocabularies and schema), so pre-training reads it unchanged. Per cell of the label grid: the part
class covering most of the cell's pixels (background included), its pixel share as confidence; attributes
are the 0/1 ground truth.

Degraded copies make the ablation's dose-response (label quality on the x axis, measured afterwards by
``clasp audit --gt``): ``attr_flip`` flips each 0/1 attribute value with that probability; ``part_noise``
shifts each image's part mask by up to ``part_noise`` x 20% of its height (and half that sideways; boundary
jitter) and relabels each of its foreground classes with that probability as another foreground class
(class swaps). Noise is drawn per image from (``noise_seed``, key), so a set is the same on every run.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from labeling.writer import finalize_labelset, quantize, write_shard
from pipeline.errors import ClaspError
from pipeline.formats import LABELSET_FILE, label_schema, labels_dir


def cell_parts(mask: np.ndarray, grid: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class of most pixels, its pixel share) per cell of a ``grid`` over a class-id ``mask``."""
    gh, gw = grid
    h, w = mask.shape
    ys = np.minimum((np.arange(h) * gh) // h, gh - 1)
    xs = np.minimum((np.arange(w) * gw) // w, gw - 1)
    cell = ys[:, None] * gw + xs[None, :]
    counts = np.zeros((gh * gw, num_classes), np.int64)
    np.add.at(counts, (cell.ravel(), np.minimum(mask.ravel(), num_classes - 1)), 1)
    cls = counts.argmax(1)
    share = counts.max(1) / np.maximum(counts.sum(1), 1)
    return cls.reshape(gh, gw).astype(np.uint8), share.reshape(gh, gw)


def _summaries(part_map: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Share of cells and mean row (0 top .. 1 bottom, NaN when absent) per non-background class."""
    gh, _ = part_map.shape
    rows = np.linspace(0.0, 1.0, gh) if gh > 1 else np.zeros(1)
    area, row = np.zeros(num_classes - 1), np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        hit = part_map == c
        if hit.any():
            area[c - 1] = hit.mean()
            row[c - 1] = (hit.sum(1) * rows).sum() / hit.sum()
    return area, row


def degrade_mask(mask: np.ndarray, level: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A part mask with its boundaries shifted and classes swapped at noise ``level`` (0 = unchanged)."""
    if level <= 0:
        return mask
    h, w = mask.shape
    jy, jx = int(round(level * 0.2 * h)), int(round(level * 0.1 * w))
    dy, dx = int(rng.integers(-jy, jy + 1)), int(rng.integers(-jx, jx + 1))
    shifted = np.zeros_like(mask)  # what moves in from outside the crop is background
    shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    lut = np.arange(256, dtype=mask.dtype)
    for c in range(1, num_classes):
        if rng.random() < level:
            lut[c] = rng.choice([k for k in range(1, num_classes) if k != c])
    return lut[shifted]


def write_gt_labelset(
    root: str | Path,
    corpus: str,
    source: str,
    gt_path: str | Path,
    *,
    attr_flip: float = 0.0,
    part_noise: float = 0.0,
    noise_seed: int = 0,
) -> str:
    """Write the ground-truth twin of CLIP label set ``source``, degraded by ``attr_flip`` / ``part_noise`` (module
    docstring); returns its id (``gt-<hash>``), reused if complete."""
    if not (0 <= attr_flip <= 1 and 0 <= part_noise <= 1):
        raise ClaspError(
            f"ground-truth label noise must lie in [0, 1] (attr_flip {attr_flip}, part_noise {part_noise})"
        )
    src_dir = labels_dir(root, corpus, source)
    header_path = src_dir / LABELSET_FILE
    if not header_path.is_file():
        raise ClaspError(f"{header_path} not found: label set '{source}' is not complete (run `clasp label`)")
    header = json.loads(header_path.read_text())
    gt_path = Path(gt_path)
    if not gt_path.is_file():
        raise ClaspError(f"{gt_path} not found: ground-truth labels need the synthetic world's gt.parquet")
    # by content: a regenerated, identical world maps to the same set (a file time would give it a new id)
    digest = hashlib.sha1()
    with gt_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    identity = f"{source}:{digest.hexdigest()}"
    noisy = attr_flip > 0 or part_noise > 0
    if noisy:
        identity += f":flip={attr_flip}:parts={part_noise}:seed={noise_seed}"
    gt_id = hashlib.sha1(identity.encode()).hexdigest()[:8]
    set_id = f"gt-{gt_id}"
    out_dir = labels_dir(root, corpus, set_id)
    if (out_dir / LABELSET_FILE).is_file():
        return set_id

    gt = pq.read_table(gt_path, columns=["key", "attributes", "part_mask"]).to_pydict()
    by_key = {k: i for i, k in enumerate(gt["key"])}
    grid = tuple(header["grid"])
    parts = list(header["parts"]["names"])
    attrs = list(header["attributes"]["names"])
    paths = []
    for shard in sorted(header["shards"]):
        keys = pq.read_table(src_dir / shard, columns=["key"]).column("key").to_pylist()
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise ClaspError(f"{gt_path} has no ground truth for {len(missing)} keys of {shard} (e.g. {missing[0]}); "
                             "it belongs to a different synthetic world than this corpus")  # fmt: skip
        n = len(keys)
        noise = (attr_flip, part_noise, noise_seed) if noisy else None
        table = _gt_shard_table(keys, [by_key[key] for key in keys], gt, grid, parts, attrs, noise)
        path = out_dir / shard
        write_shard(path, table, {"labelset": set_id, "rank": 0, "world_size": 1, "rows": n, "undecodable": []})
        paths.append(path)
    new_header = {
        **{key: value for key, value in header.items() if key not in ("shards", "rows", "failures", "columns")},
        "labelset": set_id,
        "ground_truth": True,
        "warning": "GROUND-TRUTH labels of the synthetic world, not CLIP output: an upper bound for ablations only",
        "source_labelset": source,
        "gt": str(gt_path),
        "model": {"arch": "ground truth", "weights": None, "random": False},
        "noise": {"attr_flip": attr_flip, "part_noise": part_noise, "seed": noise_seed},
    }
    finalize_labelset(out_dir, paths, new_header)
    return set_id


def _gt_shard_table(
    keys: list[str],
    rows: list[int],
    gt: dict,
    grid: tuple,
    parts: list[str],
    attrs: list[str],
    noise: tuple[float, float, int] | None,
) -> pa.Table:
    """One label shard's table from ground truth ``gt`` rows ``rows`` (for ``keys``), degraded when ``noise``
    is ``(attr_flip, part_noise, noise_seed)``: each key's noise comes from its own seeded generator."""
    schema = label_schema(len(attrs), parts)
    levels = 16
    n, k = len(keys), len(parts)
    attr = np.asarray([gt["attributes"][r] for r in rows], np.float32)
    maps, confs = np.zeros((n, *grid), np.uint8), np.zeros((n, *grid))
    area, row = np.zeros((n, k - 1)), np.zeros((n, k - 1))
    for i, (key, r) in enumerate(zip(keys, rows, strict=True)):
        mask = np.asarray(Image.open(io.BytesIO(gt["part_mask"][r])))
        if noise is not None:
            attr_flip, part_noise, noise_seed = noise
            rng = np.random.default_rng([noise_seed, int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)])
            attr[i] = np.where(rng.random(attr.shape[1]) < attr_flip, 1 - attr[i], attr[i])
            mask = degrade_mask(mask, part_noise, k, rng)
        maps[i], confs[i] = cell_parts(mask, grid, k)
        area[i], row[i] = _summaries(maps[i], k)
    cols = {
        "key": pa.array(keys, pa.string()),
        "attr_prob": pa.FixedSizeListArray.from_arrays(pa.array(quantize(attr).reshape(-1)), len(attrs)),
        "part_map": pa.array([m.tobytes() for m in maps.reshape(n, -1)], pa.binary()),
        "part_conf": pa.array([c.tobytes() for c in quantize(confs.reshape(n, -1), levels)], pa.binary()),
        "fg_ratio": pa.array((maps > 0).reshape(n, -1).mean(1).astype(np.float32)),
    }
    for j, name in enumerate(parts[1:]):
        cols[f"area_{name}"] = pa.array(quantize(area[:, j]))
    for j, name in enumerate(parts[1:]):
        cols[f"row_{name}"] = pa.array(quantize(row[:, j]), mask=np.isnan(row[:, j]))
    return pa.table([cols[f.name] for f in schema], schema=schema)
