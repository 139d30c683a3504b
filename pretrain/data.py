"""The pre-training stream: WebDataset image shards joined row by row with their CLIP label shards.

The pipeline is an explicit list of stages (``build_pipeline``)::

    epoch-seeded shard order -> split by node x worker at sample granularity (from the resume position)
    -> tar reader that seeks past what it skips, joined with the label rows -> block shuffle
    -> decode + multi-crop -> batch

* **An epoch is every image once.** Epoch ``e`` lays the shards out in a permutation seeded by
  (seed, e) and cuts that sequence into one contiguous span per reader (all processes of all nodes
  x their DataLoader workers; ``StreamLayout``). Spans differ by at most one image; where there are
  more readers than shards a shard is shared at sample granularity. A reader runs through its span
  of every epoch in turn and never reads what another reader yields, so an epoch yields every image
  exactly once whatever the number of nodes, processes, workers, shard size or checkpoint interval.
  Epochs are passes over the images, not a number of steps: the batches at the seam of two epochs
  mix both (no image is dropped to round an epoch to whole steps; the schedules' "epoch" is
  ``images // global batch`` steps).
* **Resume by position.** A process's DataLoader hands out batch ``k`` from worker ``k % workers``,
  so after ``n`` batches every reader's consumed sample count is known (``StreamLayout.consumed``).
  A resumed run starts every reader there: shard pieces before it are not opened, samples before it
  in a shard are passed header by header (no image bytes read, nothing decoded). Shuffling is by
  blocks whose order depends only on (seed, epoch, reader, block) and crops are seeded per image and
  epoch, so a resumed run yields the same batches, crops included, as an uninterrupted one. The
  layout depends on the number of processes and workers; a changed one is refused by the trainer.
* **What exactness costs.** Shuffling is by blocks, not by a reservoir buffer whose state would depend
  on everything read before (same memory: one block of undecoded samples per reader). A reader that
  starts inside a shard walks that tar's headers up to its first sample (no image bytes; at 640
  readers over 418 shards about 0.76 header reads per image, benchmarks/stream_coverage.py). A crop
  seed per image costs ~13 us. Stream throughput was unchanged (README, "LUPerson on 8 GPUs").
* **Label join.** ``ROOT/<corpus>/images/<corpus>-NNNNNN.tar`` pairs with
  ``ROOT/<corpus>/labels/<labelset>/<corpus>-NNNNNN.parquet`` (same rows, same order). A reader
  reads the label rows of a shard piece once, when it opens the piece; every sample it passes must
  carry its row's ``key`` or the stream stops with ``LabelMismatchError`` naming both files. With
  ``clip_embed=True`` (CLIP-embedding distillation) the ``clip_embed`` column is read too, and a label
  set without it is refused before training starts.
* Batches hold channels-last uint8 crops; ``to_model_batch`` moves them to the device, normalises
  and permutes them there.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pipeline.errors import ClaspError
from pretrain.augment import MultiCrop
from pretrain.labelsets import (
    EMBED_COLUMN,
    LabelMismatchError,
    LabelSetInfo,
    Shard,
    clip_embed_width,
    list_shards,
    read_labelset_info,
)
from pretrain.stream_layout import ReadTask, Slice, StreamLayout, StreamPosition

# names other modules import from here (the label set and the epoch layout have their own modules)
__all__ = [
    "BlockShuffle", "DecodeMultiCrop", "LabelMismatchError", "LabelSetInfo", "LabeledTarReader", "PretrainStream",
    "ReadTask", "Shard", "Slice", "SliceReader", "StreamLayout", "StreamPosition", "build_pipeline", "build_stream",
    "derive_seed", "read_labelset_info", "to_model_batch",
]  # fmt: skip

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("key", "attr_prob", "part_map", "part_conf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), identical in every process."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# --- pipeline stages --------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ReaderTasks(IterableDataset):
    """Source stage: this reader's tasks (epoch-seeded shard order, split by node x worker, resume position)."""

    def __init__(self, layout: StreamLayout, rank: int, position: StreamPosition) -> None:
        super().__init__()
        self.layout, self.rank, self.position = layout, rank, position

    def __iter__(self) -> Iterator[ReadTask]:
        worker, num_workers = _worker()
        if num_workers != self.layout.workers:
            raise ClaspError(f"the stream was laid out for {self.layout.workers} workers but runs in {num_workers}")
        reader = self.layout.reader_of(self.rank, worker)
        yield from self.layout.tasks(reader, self.position.start_batch, self.position.first_epoch)


class SliceReader:
    """Reads the samples of read tasks; a subclass says how one slice of a shard is read.

    Positions before a task's ``first`` and those in its ``skip`` are passed over without reading
    their data (``read_slice`` gets them as unwanted indices). Every sample a subclass yields carries
    ``epoch``, ``reader``, ``pos`` (its position in the reader's span: ``piece.span_start + index -
    piece.start``), ``shard``, ``index`` and ``key``.
    """

    def __call__(self, tasks: Iterable[ReadTask]) -> Iterator[dict[str, Any]]:
        for task in tasks:
            for piece in task.slices:
                end = piece.span_start + piece.stop - piece.start
                if end <= task.first:
                    continue
                start = piece.start + max(0, task.first - piece.span_start)
                skip = {p - piece.span_start + piece.start for p in task.skip if piece.span_start <= p < end}
                yield from self.read_slice(task, piece, start, skip)

    def read_slice(self, task: ReadTask, piece: Slice, start: int, skip: set[int]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


def _tar_members(
    path: str, start: int, stop: int, skip: set[int]
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """(index, key, {extension: bytes} or None if not wanted) of samples ``start..stop-1`` of a tar.

    A local tar is walked header by header and seeks past the data of samples before ``start`` or in
    ``skip``, so skipping costs one 512-byte header read per member, not the image bytes. A URL
    (``pipe:``, ``http://``) is streamed (skipped bytes are read but not kept).
    """
    local = "://" not in path and not path.startswith("pipe:")
    with (
        open(path, "rb") if local else wds.gopen(path) as fileobj,
        tarfile.open(fileobj=fileobj, mode="r:" if local else "r|") as tar,
    ):
        index, key, members = -1, None, None
        while (info := tar.next()) is not None:
            tar.members.clear()  # next() keeps every header; a shard's worth of them is not needed
            if not info.isfile():
                continue
            folder, _, name = info.name.rpartition("/")
            stem, _, ext = name.partition(".")
            prefix = f"{folder}/{stem}" if folder else stem
            if prefix != key:
                if key is not None and index >= start:
                    yield index, key, members
                index, key = index + 1, prefix
                if index >= stop:
                    return
                members = {} if index >= start and index not in skip else None
            if members is not None:
                members[ext.lower()] = tar.extractfile(info).read()
        if key is not None and start <= index < stop:
            yield index, key, members


class LabeledTarReader(SliceReader):
    """Tar reader joined with label rows; a shard that ends early (truncated, damaged) stops the run with its name.

    Every sample passed, read or skipped, must carry its label row's ``key`` (a header check, no data
    read); silently training on a shrinking or misaligned corpus is what is refused.
    """

    def __init__(self, shards: Sequence[Shard], grid_hw: tuple[int, int], *, clip_embed: bool = False) -> None:
        self.shards, self.grid_hw, self.clip_embed = shards, grid_hw, clip_embed

    def read_slice(self, task: ReadTask, piece: Slice, start: int, skip: set[int]) -> Iterator[dict[str, Any]]:
        shard, stop = piece.shard, piece.stop
        tar, label_path = self.shards[shard].tar, self.shards[shard].labels
        labels = _read_label_rows(label_path, self.grid_hw, start, stop, clip_embed=self.clip_embed)
        n_rows, count = labels["rows"], start
        try:
            for index, key, members in _tar_members(tar, start, stop, skip):
                count = index + 1
                row = index - start
                if index >= n_rows or key != labels["key"][row]:
                    has = f"has key '{labels['key'][row]}'" if index < n_rows else f"has only {n_rows} rows"
                    raise LabelMismatchError(
                        f"image shard {tar} sample {index} is '{key}' but label shard {label_path} row {index} {has}: "
                        "the labels were not made from this ingest (or their rows are out of order); "
                        "re-run `clasp label` for this corpus"
                    )
                if members is None:
                    continue
                image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                if image is None:
                    log.warning("%s: sample '%s' has no image member; skipped", tar, key)
                    continue
                sample = {
                    "epoch": task.epoch,
                    "reader": task.reader,
                    "pos": piece.span_start + index - piece.start,
                    "shard": shard,
                    "index": index,
                    "key": key,
                    "image": image,
                    "attr_prob": labels["attr_prob"][row],
                    "part_map": labels["part_map"][row],
                    "part_conf": labels["part_conf"][row],
                }
                if self.clip_embed:
                    sample[EMBED_COLUMN] = labels[EMBED_COLUMN][row]
                yield sample
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ClaspError(
                f"image shard {tar} is damaged: {count} of {n_rows} samples read ({exc}); "
                "re-run `clasp ingest` with the same settings, it rewrites damaged shards"
            ) from None
        if count < stop:
            raise LabelMismatchError(
                f"image shard {tar} has {count} samples but label shard {label_path} has {n_rows} rows: "
                "they come from different ingests; re-run `clasp label` for this corpus"
            )


def _read_label_rows(
    path: str, grid_hw: tuple[int, int], start: int, stop: int, *, clip_embed: bool = False
) -> dict[str, Any]:
    """Rows ``start..stop-1`` of a label shard (read once per slice; only the slice becomes Python objects)."""
    try:
        table = pq.read_table(path, columns=list(LABEL_COLUMNS) + ([EMBED_COLUMN] if clip_embed else []))
    except (OSError, KeyError, ValueError) as exc:
        raise ClaspError(
            f"cannot read label shard {path}: {exc}; re-run `clasp label` for this corpus, it relabels that shard"
        ) from None
    rows = table.num_rows
    table = table.slice(start, max(0, stop - start))
    n = table.num_rows
    cells = grid_hw[0] * grid_hw[1]
    part_map = table.column("part_map").to_pylist()
    part_conf = table.column("part_conf").to_pylist()
    if n and (len(part_map[0]) != cells or len(part_conf[0]) != cells):
        raise ClaspError(f"label shard {path}: part_map has {len(part_map[0])} cells, labelset grid says {cells}")
    attr = table.column("attr_prob").combine_chunks()
    out = {
        "rows": rows,
        "key": table.column("key").to_pylist(),
        "attr_prob": attr.flatten().to_numpy(zero_copy_only=False).reshape(n, -1),
        "part_map": part_map,
        "part_conf": part_conf,
    }
    if clip_embed:
        out[EMBED_COLUMN] = table.column(EMBED_COLUMN).to_pylist()
    return out


class BlockShuffle:
    """Yields each block of a reader's span in its seeded order (``StreamLayout.block_order``).

    Holds one block of undecoded samples. Unlike a reservoir buffer, whose state depends on everything
    read before, a block's order depends only on (seed, epoch, reader, block), so a resumed reader
    yields exactly the rest of the block it stopped in.
    """

    def __init__(self, layout: StreamLayout) -> None:
        self.layout = layout

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        size, epoch, block, reader = self.layout.block, -1, -1, -1
        buf: list[dict | None] = []
        for sample in src:
            pos = sample["pos"]
            if pos // size != block or sample["epoch"] != epoch:  # a reader's blocks arrive one after another
                if buf:
                    yield from self._flush(epoch, reader, block, buf)
                epoch, reader, block = sample["epoch"], sample["reader"], pos // size
                buf = [None] * size  # a list, not a dict: this runs once per sample
            buf[pos % size] = sample
        if buf:
            yield from self._flush(epoch, reader, block, buf)

    def _flush(self, epoch: int, reader: int, block: int, buf: list[dict | None]) -> Iterator[dict]:
        for offset in self.layout.block_order(epoch, reader, block).tolist():
            if (sample := buf[offset]) is not None:  # None: consumed before a resume, or not an image
                yield sample


def sample_rng(seed: int, epoch: int, shard: int, index: int) -> random.Random:
    """Crop randomness of one image in one epoch: the same whichever reader reads it, and after a resume.

    The four numbers packed into one integer seed: Mersenne Twister's seeding mixes every 32-bit word of
    it, and it costs a third of a SeedSequence (this runs once per image)."""
    m = 0xFFFFFFFF
    return random.Random((seed & m) << 96 | (epoch & m) << 64 | (shard & m) << 32 | (index & m))


class DecodeMultiCrop:
    """Decodes the image and turns a joined sample into crops and per-token labels (in the worker)."""

    def __init__(self, multicrop: MultiCrop, grid_hw: tuple[int, int], seed: int) -> None:
        self.multicrop, self.grid_hw, self.seed = multicrop, grid_hw, seed

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                with Image.open(io.BytesIO(sample["image"])) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as exc:
                log.warning("skipping undecodable image '%s': %s", sample["key"], exc)
                continue
            part_map = np.frombuffer(sample["part_map"], dtype=np.uint8).reshape(self.grid_hw)
            part_conf = np.frombuffer(sample["part_conf"], dtype=np.uint8).reshape(self.grid_hw) / np.float32(255)
            rng = sample_rng(self.seed, sample["epoch"], sample["shard"], sample["index"])
            out = self.multicrop(image, part_map, part_conf, rng)
            out["attr_prob"] = torch.from_numpy(sample["attr_prob"].astype(np.float32) / np.float32(255))
            if EMBED_COLUMN in sample:
                if not sample[EMBED_COLUMN]:
                    raise ClaspError(f"label row '{sample['key']}' has no clip_embed value; re-run `clasp label`")
                out[EMBED_COLUMN] = torch.from_numpy(np.frombuffer(sample[EMBED_COLUMN], "<f2").astype(np.float32))
            out["key"] = sample["key"]
            out["epoch"] = torch.tensor(sample["epoch"])
            yield out


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack per-sample tensors; keys stay a list of strings."""
    batch = {name: torch.stack([s[name] for s in samples]) for name in samples[0] if name != "key"}
    batch["key"] = [s["key"] for s in samples]
    return batch


# --- assembly ---------------------------------------------------------------------------------


def build_pipeline(
    layout: StreamLayout,
    *,
    rank: int,
    position: StreamPosition,
    reader: SliceReader,
    multicrop: MultiCrop,
    grid_hw: tuple[int, int],
) -> wds.DataPipeline:
    """The stream as a WebDataset ``DataPipeline`` of explicit stages (see the module docstring)."""
    return wds.DataPipeline(
        ReaderTasks(layout, rank, position),
        reader,
        BlockShuffle(layout),
        DecodeMultiCrop(multicrop, grid_hw, layout.seed),
        wds.batched(layout.batch_size, collation_fn=collate, partial=False),
    )


@dataclass
class PretrainStream:
    """The loader plus what the trainer needs to know about the data it streams."""

    loader: DataLoader
    position: StreamPosition
    layout: StreamLayout
    labelset: LabelSetInfo

    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def num_shards(self) -> int:
        return len(self.layout.shards)

    def batches(self, *, start_batch: int = 0, first_epoch: int = 0) -> Iterator[dict[str, Any]]:
        """This process's batches from the ``start_batch``-th on (0: the run's start; a resume passes the
        batches consumed before its checkpoint, and continues exactly where that run was). ``first_epoch``:
        the epoch the stream began with (not 0 only after a resume accepted a new stream layout)."""
        self.position.start_batch, self.position.first_epoch = start_batch, first_epoch
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
        last = text.rstrip().splitlines()[-1]  # "pretrain.labelsets.LabelMismatchError: <message>"
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from None


def build_stream(
    data: Any,
    *,
    global_hw: tuple[int, int],
    patch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    clip_embed: bool = False,
) -> PretrainStream:
    """Build the label-joined multi-crop stream for this process from a ``pretrain.config.DataConfig``;
    ``clip_embed``: batches also carry the stored CLIP image embedding (distillation)."""
    info = read_labelset_info(data.root, data.corpus, data.labelset, dict(data.part_flip))
    shards = list_shards(data.root, data.corpus, info.labelset)
    if clip_embed:
        info = dataclasses.replace(info, clip_embed_dim=clip_embed_width(shards, info.labelset))
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
    layout = StreamLayout(
        tuple(shards), processes=world_size, workers=max(1, data.workers), batch_size=data.batch_size, seed=seed,
        block=max(1, data.shuffle_buffer),
    )  # fmt: skip
    position = StreamPosition()
    reader = LabeledTarReader(layout.shards, info.grid_hw, clip_embed=clip_embed)
    pipeline = build_pipeline(
        layout, rank=rank, position=position, reader=reader,
        multicrop=multicrop, grid_hw=info.grid_hw,
    )  # fmt: skip
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=data.workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        prefetch_factor=data.prefetch_factor if data.workers > 0 else None,
        persistent_workers=False,  # a resume must hand the workers the new position
    )
    return PretrainStream(loader, position, layout, info)


def to_model_batch(
    batch: dict[str, Any], device: torch.device | str, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """Move a loader batch to ``device``; its uint8 (B, crops, H, W, 3) crops become the meta-arch's
    normalised float (B, crops, 3, H, W) there."""
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32) * 255
    std_t = torch.tensor(std, device=device, dtype=torch.float32) * 255
    out: dict[str, Any] = {"key": batch["key"]}
    for name, value in batch.items():
        if name in ("key", "epoch"):  # bookkeeping of the stream, not model input
            continue
        value = value.to(device, non_blocking=True)
        if name in ("global_crops", "local_crops"):
            value = ((value.float() - mean_t) / std_t).permute(0, 1, 4, 2, 3).contiguous()
        out[name] = value
    return out
