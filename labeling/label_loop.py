"""The labelling loop of ``clasp label``: one process's image shards through DenseClip and the labelers into
label shards (``labeling.label`` decides which shards, and writes ``labelset.json`` afterwards).

Batches never straddle two shards, so a resumed run computes each shard exactly as an uninterrupted
run does; a shard's Parquet file is written (atomically) as soon as its last batch is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from labeling.clip_model import DenseClip, LoadedClip
from labeling.image_shards import ShardImages, ShardIndex, index_shard
from labeling.label_config import LabelConfig
from labeling.labelers import build_labeler
from labeling.writer import ShardBuffer, blank_rows, write_shard
from pipeline.errors import ClaspError
from pipeline.formats import image_shard_path, label_schema, label_shard_path, shard_index
from pipeline.progress import progress
from pipeline.vocab import AttributeVocab, PartVocab


@dataclass(frozen=True)
class LabelJob:
    """Everything the loop needs, resolved once by ``run_labeling`` (``cfg.resolution`` is set)."""

    cfg: LabelConfig  # cfg.resolution resolved
    loaded: LoadedClip
    dense: DenseClip  # built once per run: its mode is part of the label-set identity too
    attrs: AttributeVocab
    parts: PartVocab
    set_id: str
    sizes: dict[str, int]  # image shard name -> image count (sizes.json)
    digests: dict[str, str]  # image shard name -> digest of its manifest rows
    device: str
    rank: int = 0


@dataclass
class ShardsDone:
    """What the loop did: counts, undecodable images, shards it could not read, time in the loop."""

    images: int = 0
    shards: int = 0
    undecodable: list[dict[str, str]] = field(default_factory=list)  # {"shard", "key"}
    failed_shards: list[str] = field(default_factory=list)  # one message per unreadable image shard
    loop_s: float = 0.0


def label_shards(job: LabelJob, shards: list[str]) -> ShardsDone:
    """Label ``shards`` (image shard names) and write their label shards; returns what was done."""
    done = ShardsDone()
    indices = _index_shards(job, shards, done)
    if not indices:
        return done
    cfg, device = job.cfg, job.device
    on_gpu = device.startswith("cuda")
    dense = job.dense.to(device).eval()
    if on_gpu:
        dense = dense.to(memory_format=torch.channels_last)
    labeler = build_labeler(
        job.loaded,
        job.attrs,
        job.parts,
        label_grid=cfg.label_grid,
        group_softmax=cfg.group_softmax,
        fg_threshold=cfg.fg_threshold,
        foreground=cfg.foreground,
        device=device,
    )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    mean = torch.tensor(job.loaded.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(job.loaded.std, device=device).view(1, 3, 1, 1) * 255.0
    loader = torch.utils.data.DataLoader(
        ShardImages(indices, cfg.resolution),
        batch_sampler=_batches(indices, cfg.batch_size),
        num_workers=cfg.workers,
        pin_memory=on_gpu,
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    writer = _ShardWriter(job, indices, done)
    pending = None  # previous batch: its device->host copy overlaps this batch's forward
    t0 = time.perf_counter()
    with progress(sum(len(i.keys) for i in indices), "label", quiet=cfg.quiet or job.rank != 0) as advance:
        for item_ids, images, ok in loader:
            x = (images.to(device, non_blocking=True).float() - mean) / std
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with (
                torch.no_grad(),
                torch.autocast(device_type=device.split(":")[0], enabled=use_bf16, dtype=torch.bfloat16),
            ):
                image_emb, patch_emb = dense(x)
            labels = labeler(image_emb, patch_emb)
            host = labels.to_host(image_emb.half() if cfg.with_embed else None)
            if pending is not None:
                writer.consume(*pending)
            pending = (item_ids, ok, host)
            done.images += len(item_ids)
            advance(len(item_ids))
        if pending is not None:
            writer.consume(*pending)
    done.loop_s = time.perf_counter() - t0
    return done


def _index_shards(job: LabelJob, shards: list[str], done: ShardsDone) -> list[ShardIndex]:
    """Member offsets of each image shard; a shard that does not read or has the wrong count is recorded."""
    indices = []
    for name in shards:
        path = image_shard_path(job.cfg.root, job.cfg.corpus, shard_index(name))
        try:
            idx = index_shard(path)
        except ClaspError as exc:
            done.failed_shards.append(str(exc))
            continue
        if len(idx.keys) != job.sizes[name]:
            done.failed_shards.append(f"{path} holds {len(idx.keys)} images but sizes.json says {job.sizes[name]}")
            continue
        indices.append(idx)
    return indices


def _batches(indices: list[ShardIndex], batch_size: int) -> list[list[int]]:
    """Global item ids cut into batches that never cross a shard boundary."""
    out, start = [], 0
    for idx in indices:
        n = len(idx.keys)
        out.extend(list(range(start + i, start + min(i + batch_size, n))) for i in range(0, n, batch_size))
        start += n
    return out


class _ShardWriter:
    """Collects each batch's labels into its shard's buffer and writes the shard once it is complete."""

    def __init__(self, job: LabelJob, indices: list[ShardIndex], done: ShardsDone) -> None:
        self.job, self.done = job, done
        self.buffers: list[ShardBuffer | None] = [ShardBuffer(idx) for idx in indices]
        self.starts = np.cumsum([0] + [len(i.keys) for i in indices])
        cfg = job.cfg
        self.schema = label_schema(len(job.attrs.attributes), list(job.parts.names), with_embed=cfg.with_embed)

    def consume(self, item_ids: torch.Tensor, ok: torch.Tensor, host: tuple) -> None:
        """Store one batch's labels (already on the host) and write its shard when complete."""
        labels, embed, ready = host
        if ready is not None:
            ready.synchronize()
        shard_pos = int(np.searchsorted(self.starts, int(item_ids[0]), side="right") - 1)
        buf, first = self.buffers[shard_pos], int(self.starts[shard_pos])
        bad = np.flatnonzero(~ok.numpy())
        if bad.size:
            blank_rows(labels, bad)
            if embed is not None:
                embed[torch.as_tensor(bad)] = 0  # no embedding: distillation skips all-zero rows
            self.done.undecodable += [
                {"shard": buf.index.path.name, "key": buf.index.keys[int(item_ids[b]) - first]} for b in bad
            ]
        buf.add(item_ids.numpy() - first, labels, embed)
        if buf.complete:
            self._write(buf)
            self.buffers[shard_pos] = None  # free the shard's rows

    def _write(self, buf: ShardBuffer) -> None:
        job, name = self.job, buf.index.path.name
        failures = [f["key"] for f in self.done.undecodable if f["shard"] == name]
        path = label_shard_path(job.cfg.root, job.cfg.corpus, job.set_id, shard_index(buf.index.path))
        table = buf.table(self.schema, list(job.parts.names), job.cfg.conf_levels)
        # no rank or world size: a shard is the same bytes however many processes ran
        meta = {
            "labelset": job.set_id, "rows": table.num_rows, "undecodable": failures,
            "image_shard_digest": job.digests[name],
        }  # fmt: skip
        write_shard(path, table, meta)
        self.done.shards += 1
