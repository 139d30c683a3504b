"""The pre-training stream: WebDataset image shards joined row by row with their CLIP label shards.

The pipeline is an explicit list of stages (``build_pipeline``)::

    resampled shard order (seed, epoch, segment) -> split by node -> split by worker
    -> strict tar reader joined with the label shard -> shuffle buffer -> decode + multi-crop -> batch

* **Label join.** ``ROOT/<corpus>/images/<corpus>-NNNNNN.tar`` pairs with
  ``ROOT/<corpus>/labels/<labelset>/<corpus>-NNNNNN.parquet`` (same rows, same order). The label
  shard is read when its tar is opened; the i-th sample must carry the i-th row's ``key`` or the
  stream stops with ``LabelMismatchError`` naming both files (wrong order, labels of another ingest).
* **Disjoint ranks.** Every rank draws the *same* shard permutation (seeded by seed, epoch and
  segment start) and keeps every ``world``-th shard, then every ``workers``-th of those, so within
  a segment ranks and workers read disjoint shards. With fewer shards than readers a shard is split
  into sample-stride slices (``ShardUnit.offset/stride``) so that still holds. Exactly disjoint when
  every reader's share is what it consumes; when shards do not divide evenly among readers (or a
  segment's batches among workers), a reader that runs out starts its next pass early, so a few
  samples can repeat within an epoch.
* **Resume without skipping.** A *segment* is the stretch of steps between two restarts of the
  loader: the trainer restarts it at every epoch start and after every checkpoint, at a known
  step. All randomness of a segment (shard order, shuffle buffer, crops) is derived from
  (seed, epoch, segment start step, rank, worker), so a run resumed from a checkpoint sees exactly
  the batches the uninterrupted run saw, without reading and discarding anything. Shards are
  *resampled*: a segment starts a fresh permutation rather than continuing the last one.
* Batches hold channels-last uint8 crops; ``to_model_batch`` moves them to the device, normalises
  and permutes them there.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pipeline import formats
from pipeline.errors import ClaspError
from pretrain.augment import MultiCrop

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("key", "attr_prob", "part_map", "part_conf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class LabelMismatchError(ClaspError):
    """An image shard and its label shard disagree on which image a row belongs to."""


@dataclass(frozen=True)
class ShardUnit:
    """One reading assignment: the samples ``i`` of a shard with ``i % stride == offset``."""

    tar: str
    labels: str
    offset: int = 0
    stride: int = 1


@dataclass(frozen=True)
class LabelSetInfo:
    """What the stream needs to know about a label set (from labelset.json and the shard schema)."""

    labelset: str
    grid_hw: tuple[int, int]
    attributes: tuple[str, ...]
    parts: tuple[str, ...]
    flip_map: tuple[int, ...] | None  # class id -> class id after a horizontal flip; None = identity


@dataclass
class StreamPosition:
    """Where the current segment of the stream starts; set by the trainer before each ``iter(loader)``."""

    epoch: int = 0
    start_step: int = 0


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), identical in every process."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# --- locating shards and label sets -----------------------------------------------------------


def _names(section: Any) -> tuple[str, ...]:
    """Names of a labelset.json vocabulary section: ``{"names": [...]}``, or a list of names / ``{name: ...}``."""
    entries = section["names"] if isinstance(section, dict) else section
    return tuple(e["name"] if isinstance(e, dict) else str(e) for e in entries)


def _flip_pairs(section: Any) -> dict[str, str]:
    """Left/right pairs of a part section: ``{"flip": {a: b}}`` or entries ``{name, flip}``."""
    if isinstance(section, dict):
        return dict(section.get("flip") or {})
    return {e["name"]: e["flip"] for e in section if isinstance(e, dict) and e.get("flip")}


def build_flip_map(parts: Sequence[str], pairs: dict[str, str]) -> tuple[int, ...] | None:
    """Class-id permutation for horizontal flips from name pairs (``{left_arm: right_arm}``), symmetric."""
    if not pairs:
        return None
    index = {name: i for i, name in enumerate(parts)}
    mapping = list(range(len(parts)))
    for a, b in pairs.items():
        if a not in index or b not in index:
            missing = a if a not in index else b
            raise ClaspError(f"part flip pair {a}<->{b}: '{missing}' is not a part class ({', '.join(parts)})")
        mapping[index[a]], mapping[index[b]] = index[b], index[a]
    return tuple(mapping)


def read_labelset_info(root: str | Path, corpus: str, labelset: str | None, part_flip: dict[str, str]) -> LabelSetInfo:
    """Resolve the label set (None = the latest completed one) and read its grid and vocabularies."""
    if not formats.images_dir(root, corpus).is_dir():
        raise ClaspError(
            f"data.root={root}, data.corpus={corpus}: {formats.images_dir(root, corpus)} does not exist; "
            "fix data.root / data.corpus, or run `clasp ingest` and `clasp label` first"
        )
    try:
        labelset = labelset or formats.latest_labelset(root, corpus)
        meta = formats.read_labelset(root, corpus, labelset)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    where = formats.labels_dir(root, corpus, labelset) / formats.LABELSET_FILE
    try:
        grid = tuple(int(v) for v in meta["grid"])
        attributes = _names(meta["attributes"])
        parts = _names(meta["parts"])
        pairs = {**_flip_pairs(meta["parts"]), **part_flip}
    except (KeyError, TypeError, ValueError) as exc:
        raise ClaspError(f"{where}: missing or malformed field {exc}; re-run `clasp label`") from None
    return LabelSetInfo(labelset, (grid[0], grid[1]), attributes, parts, build_flip_map(parts, pairs))


def list_shards(root: str | Path, corpus: str, labelset: str) -> tuple[list[tuple[str, str]], int]:
    """(image tar, label parquet) pairs of a corpus and its image count; a missing label shard is an error."""
    try:
        sizes = formats.read_sizes(root, corpus)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    pairs, missing = [], []
    for name in sizes:
        index = formats.shard_index(name)
        tar = formats.images_dir(root, corpus) / name
        labels = formats.label_shard_path(root, corpus, labelset, index)
        if not labels.is_file():
            missing.append(labels.name)
        pairs.append((str(tar), str(labels)))
    if missing:
        raise ClaspError(
            f"label set '{labelset}' of corpus '{corpus}' lacks {len(missing)} of {len(sizes)} label shards "
            f"(e.g. {missing[0]} in {formats.labels_dir(root, corpus, labelset)}); finish `clasp label` first"
        )
    if not pairs:
        raise ClaspError(f"{formats.images_dir(root, corpus) / formats.SIZES_FILE} lists no shards")
    for (tar, labels), count in zip(pairs, sizes.values(), strict=True):
        _check_label_footer(labels, tar, count)
    return pairs, sum(sizes.values())


def _check_label_footer(labels: str, tar: str, count: int) -> None:
    """Refuse, before training starts, a label shard that does not read or has another row count than its tar.

    Only the Parquet footer is read (cheap for thousands of shards); key-by-key agreement is checked as
    the stream reads each shard (LabelMismatchError).
    """
    try:
        rows = pq.read_metadata(labels).num_rows
    except (OSError, ValueError) as exc:
        raise ClaspError(
            f"label shard {labels} is unreadable ({exc}); re-run `clasp label` for this corpus, it relabels that shard"
        ) from None
    if rows != count:
        raise LabelMismatchError(
            f"label shard {labels} has {rows} rows but image shard {tar} has {count} images (sizes.json): the labels "
            "were made for a different ingest; re-run `clasp label` for this corpus"
        )


def make_units(pairs: Sequence[tuple[str, str]], readers: int) -> list[ShardUnit]:
    """Shards as reading units for ``readers`` (processes x workers) that read disjoint data.

    With at least as many shards as readers a unit is a shard (each reader gets whole shards; if the
    count does not divide evenly some readers hold one shard more and wrap into the next pass early).
    With fewer shards, each is cut into ``stride`` sample-stride slices, the stride chosen so that the
    slices divide evenly among readers; every reader then scans all shards but keeps only its slice.
    """
    stride = 1
    if len(pairs) < readers:
        stride = math.ceil(readers / len(pairs))
        while (len(pairs) * stride) % readers:
            stride += 1
    return [ShardUnit(tar, labels, offset, stride) for tar, labels in pairs for offset in range(stride)]


# --- pipeline stages --------------------------------------------------------------------------


class ResampledUnits(IterableDataset):
    """Endless shard order: a fresh permutation per pass, identical in every process of a segment."""

    def __init__(self, units: Sequence[ShardUnit], seed: int, position: StreamPosition) -> None:
        super().__init__()
        self.units, self.seed, self.position = list(units), seed, position

    def __iter__(self) -> Iterator[tuple[int, ShardUnit]]:
        for n_pass in itertools.count():
            order = list(self.units)
            random.Random(derive_seed(self.seed, self.position.epoch, self.position.start_step, n_pass)).shuffle(order)
            yield from ((n_pass, unit) for unit in order)


def split_by_node(rank: int, world_size: int) -> Callable[[Iterable], Iterator]:
    """Keep every ``world_size``-th item starting at ``rank`` (the process index of ``accelerate launch``)."""

    def stage(src: Iterable) -> Iterator:
        return itertools.islice(src, rank, None, world_size)

    return stage


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _read_label_shard(path: str, grid_hw: tuple[int, int]) -> dict[str, Any]:
    try:
        table = pq.read_table(path, columns=list(LABEL_COLUMNS))
    except (OSError, KeyError, ValueError) as exc:
        raise ClaspError(
            f"cannot read label shard {path}: {exc}; re-run `clasp label` for this corpus, it relabels that shard"
        ) from None
    n = table.num_rows
    cells = grid_hw[0] * grid_hw[1]
    attr = table.column("attr_prob").combine_chunks()
    part_map = table.column("part_map").to_pylist()
    part_conf = table.column("part_conf").to_pylist()
    if n and (len(part_map[0]) != cells or len(part_conf[0]) != cells):
        raise ClaspError(f"label shard {path}: part_map has {len(part_map[0])} cells, labelset grid says {cells}")
    return {
        "key": table.column("key").to_pylist(),
        "attr_prob": attr.flatten().to_numpy(zero_copy_only=False).reshape(n, -1),
        "part_map": part_map,
        "part_conf": part_conf,
    }


class LabeledTarReader:
    """Tar reader joined with label rows; a shard that ends early (truncated, damaged) stops the run with its name.

    Read errors are logged as they happen; silently training on a shrinking corpus is what is refused.
    """

    def __init__(self, grid_hw: tuple[int, int]) -> None:
        self.grid_hw = grid_hw

    def __call__(self, units: Iterable[tuple[int, ShardUnit]]) -> Iterator[dict[str, Any]]:
        failures_in_a_row = 0
        for n_pass, unit in units:
            read_errors: list[Exception] = []

            def handler(exc: Exception, errors: list[Exception] = read_errors, tar: str = unit.tar) -> bool:
                errors.append(exc)
                log.warning("skipping unreadable data in %s: %s", tar, exc)
                return True

            labels = _read_label_shard(unit.labels, self.grid_hw)
            n_rows = len(labels["key"])
            files = wds.tariterators.tar_file_expander(
                wds.tariterators.url_opener([{"url": unit.tar}], handler=handler), handler=handler
            )
            count = 0
            for i, sample in enumerate(wds.tariterators.group_by_keys(files, handler=handler)):
                count = i + 1
                key = sample["__key__"]
                if i >= n_rows or key != labels["key"][i]:
                    row = f"has key '{labels['key'][i]}'" if i < n_rows else f"has only {n_rows} rows"
                    raise LabelMismatchError(
                        f"image shard {unit.tar} sample {i} is '{key}' but label shard {unit.labels} row {i} {row}: "
                        "the labels were not made from this ingest (or their rows are out of order); "
                        "re-run `clasp label` for this corpus"
                    )
                if i % unit.stride != unit.offset:
                    continue
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                if image is None:
                    log.warning("%s: sample '%s' has no image member; skipped", unit.tar, key)
                    continue
                yield {
                    "pass": n_pass,
                    "key": key,
                    "image": image,
                    "attr_prob": labels["attr_prob"][i],
                    "part_map": labels["part_map"][i],
                    "part_conf": labels["part_conf"][i],
                }
            if count < n_rows and read_errors:
                raise ClaspError(
                    f"image shard {unit.tar} is damaged: {count} of {n_rows} samples read ({read_errors[0]}); "
                    "re-run `clasp ingest` with the same settings, it rewrites damaged shards"
                )
            if count < n_rows:
                raise LabelMismatchError(
                    f"image shard {unit.tar} has {count} samples but label shard {unit.labels} has {n_rows} rows: "
                    "they come from different ingests; re-run `clasp label` for this corpus"
                )
            failures_in_a_row = failures_in_a_row + 1 if count == 0 else 0
            if failures_in_a_row > 100:
                raise ClaspError(f"100 shards in a row yielded no samples (last: {unit.tar}); check the image shards")


class WorkerRandom:
    """A stage that needs randomness gets a ``random.Random`` seeded from (seed, segment, rank, worker, tag)."""

    def __init__(self, seed: int, position: StreamPosition, rank: int, tag: int) -> None:
        self.seed, self.position, self.rank, self.tag = seed, position, rank, tag

    def rng(self) -> random.Random:
        worker, _ = _worker()
        p = self.position
        return random.Random(derive_seed(self.seed, p.epoch, p.start_step, self.rank, worker, self.tag))


class ShuffleBuffer(WorkerRandom):
    """Mixes samples of the shards a worker has open (before decoding, so the buffer holds only bytes).

    The buffer is emptied at the end of each pass over the worker's shards, so samples of the next
    pass never overtake samples of this one (an epoch then sees each sample at most once).
    """

    def __init__(self, size: int, **kw: Any) -> None:
        super().__init__(tag=1, **kw)
        self.size = size

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        if self.size <= 1:
            yield from src
            return
        rng, buf = self.rng(), []
        for sample in src:
            if buf and sample["pass"] != buf[0]["pass"]:
                rng.shuffle(buf)
                yield from buf
                buf = []
            buf.append(sample)
            if len(buf) >= self.size:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class DecodeMultiCrop(WorkerRandom):
    """Decodes the image and turns a joined sample into crops and per-token labels (in the worker)."""

    def __init__(self, multicrop: MultiCrop, grid_hw: tuple[int, int], **kw: Any) -> None:
        super().__init__(tag=2, **kw)
        self.multicrop, self.grid_hw = multicrop, grid_hw

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = self.rng()
        for sample in src:
            try:
                with Image.open(io.BytesIO(sample["image"])) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as exc:
                log.warning("skipping undecodable image '%s': %s", sample["key"], exc)
                continue
            part_map = np.frombuffer(sample["part_map"], dtype=np.uint8).reshape(self.grid_hw)
            part_conf = np.frombuffer(sample["part_conf"], dtype=np.uint8).reshape(self.grid_hw) / np.float32(255)
            out = self.multicrop(image, part_map, part_conf, rng)
            out["attr_prob"] = torch.from_numpy(sample["attr_prob"].astype(np.float32) / np.float32(255))
            out["key"] = sample["key"]
            yield out


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack per-sample tensors; keys stay a list of strings."""
    batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0] if name != "key"}
    batch["key"] = [s["key"] for s in samples]
    return batch


# --- assembly ---------------------------------------------------------------------------------


def build_pipeline(
    units: Sequence[ShardUnit],
    *,
    multicrop: MultiCrop,
    grid_hw: tuple[int, int],
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    position: StreamPosition,
    shuffle_buffer: int = 1000,
) -> wds.DataPipeline:
    """The stream as a WebDataset ``DataPipeline`` of explicit stages (see the module docstring)."""
    rand = {"seed": seed, "position": position, "rank": rank}
    return wds.DataPipeline(
        ResampledUnits(units, seed, position),
        split_by_node(rank, world_size),
        wds.split_by_worker,
        LabeledTarReader(grid_hw),
        ShuffleBuffer(shuffle_buffer, **rand),
        DecodeMultiCrop(multicrop, grid_hw, **rand),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )


@dataclass
class PretrainStream:
    """The loader plus what the trainer needs to know about the data it streams."""

    loader: DataLoader
    position: StreamPosition
    labelset: LabelSetInfo
    num_images: int
    num_shards: int

    def segment(self, *, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        """Start a new segment of batches (fresh workers) whose randomness depends only on where it starts."""
        self.position.epoch, self.position.start_step = epoch, start_step
        return _plain_errors(iter(self.loader))


def _plain_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Batches as they come; a user error raised in a loader worker keeps its one-line message.

    The DataLoader re-raises a worker's exception with the worker's whole traceback in the message;
    for a ClaspError (wrong labels, unreadable shard) only the original line is useful to the user.
    """
    try:
        yield from batches
    except ClaspError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]  # "pretrain.data.LabelMismatchError: <message>"
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from None


def build_stream(
    data: Any,
    *,
    global_hw: tuple[int, int],
    patch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainStream:
    """Build the label-joined multi-crop stream for this process from a ``pretrain.config.DataConfig``."""
    info = read_labelset_info(data.root, data.corpus, data.labelset, dict(data.part_flip))
    pairs, num_images = list_shards(data.root, data.corpus, info.labelset)
    local_hw = tuple(data.local_size) if data.local_size else (global_hw[0] // 2, global_hw[1] // 2)
    multicrop = MultiCrop(
        global_hw=global_hw,
        local_hw=local_hw,
        patch_size=patch_size,
        num_global=data.num_global_crops,
        num_local=data.num_local_crops,
        global_scale=tuple(data.global_scale),
        local_scale=tuple(data.local_scale),
        ratio=tuple(data.crop_ratio) if data.crop_ratio else None,
        flip_p=data.flip_p,
        photometric=data.photometric,
        flip_map=info.flip_map,
    )
    position = StreamPosition()
    units = make_units(pairs, readers=world_size * max(1, data.workers))
    pipeline = build_pipeline(
        units,
        multicrop=multicrop,
        grid_hw=info.grid_hw,
        batch_size=data.batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        position=position,
        shuffle_buffer=data.shuffle_buffer,
    )
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=data.workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        prefetch_factor=data.prefetch_factor if data.workers > 0 else None,
        persistent_workers=False,  # a segment restart must hand workers the new position
    )
    return PretrainStream(loader, position, info, num_images, len(pairs))


def to_model_batch(
    batch: dict[str, Any], device: torch.device | str, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """Move a loader batch to ``device``; its uint8 (B, crops, H, W, 3) crops become the meta-arch's
    normalised float (B, crops, 3, H, W) there."""
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32) * 255
    std_t = torch.tensor(std, device=device, dtype=torch.float32) * 255
    out: dict[str, Any] = {"key": batch["key"]}
    for name, value in batch.items():
        if name == "key":
            continue
        value = value.to(device, non_blocking=True)
        if name in ("global_crops", "local_crops"):
            value = ((value.float() - mean_t) / std_t).permute(0, 1, 4, 2, 3).contiguous()
        out[name] = value
    return out
