"""``clasp label``: run CLIP once over an ingested corpus and write part/attribute label shards.

    clasp label --corpus synthetic --root data --clip-checkpoint runs/clip          # one process
    accelerate launch --num_processes 8 -m pipeline.cli label --corpus luperson    # one per GPU

Every process reads RANK / WORLD_SIZE / LOCAL_RANK (set by accelerate launch and torchrun) and
takes the image shards at positions ``rank, rank + world, ...``: disjoint across any number of
nodes, no communication. A finished shard is one renamed Parquet file; a restart skips it unless its
footer no longer reads, its row count is wrong or it was made from another ingest of its tar (the
digest of the tar's manifest rows in its metadata differs, e.g. after `clasp ingest --overwrite`): then
it is labelled again, and a stale labelset.json is removed until every shard is current. The
process that finds every shard done writes ``labelset.json``, which marks the label set complete.
Batches never straddle two shards, so a resumed run computes each shard exactly as an
uninterrupted run does. Output schema: pipeline/formats.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pyarrow.parquet as pq
import torch

from labeling.clip_model import DenseClip, LoadedClip, load_clip
from labeling.image_shards import ShardImages, ShardIndex, index_shard
from labeling.labelers import build_labeler
from labeling.writer import ShardBuffer, blank_rows, code_version, finalize_labelset, write_shard
from pipeline.config import NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, at_least, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import (
    LABELSET_FILE,
    image_shard_digests,
    image_shard_path,
    images_dir,
    label_schema,
    label_shard_path,
    labels_dir,
    read_sizes,
    shard_index,
)
from pipeline.guards import ensure_free_space, resolve_device
from pipeline.progress import progress
from pipeline.vocab import DEFAULT_ATTRIBUTES, DEFAULT_PARTS, AttributeVocab, PartVocab, load_attributes, load_parts

log = logging.getLogger(__name__)

# Bump when the label math changes without any config change, so old label sets are not reused.
LABEL_METHOD_VERSION = 2  # 2: part confidences above chance, comparable for background and parts
CONFIG_FILE = "label_config.yaml"
LABEL_BYTES_PER_IMAGE = 256  # disk estimate per image (measured 102-150 at 16x8 without clip_embed)
EMBED_BYTES_PER_IMAGE = 1024  # + clip_embed: a 512-d fp16 embedding (ViT-B)
# Figures of the latest run_labeling in this process (benchmarks read them): images, shards, loop_s, total_s.
LAST_RUN: dict = {}


@dataclass
class LabelConfig:
    root: str = "data"
    corpus: str = "synthetic"
    clip: str = "ViT-B-16:openai"  # ARCH[:TAG]; with clip_checkpoint only ARCH is used (if no config beside it)
    clip_checkpoint: str | None = None  # directory from `clasp clip-train` / open_clip local-dir, or weights file
    allow_random_weights: bool = False  # label with untrained weights (plumbing tests only)
    parts: str = str(DEFAULT_PARTS)
    attributes: str = str(DEFAULT_ATTRIBUTES)
    # (H, W) fed to CLIP; None = (2w, w) for a square CLIP of native width w (448x224 for ViT-B-16:
    # CLIP's trained scale across the shoulders, a pedestrian's 2:1 height), or the native size if not square.
    resolution: Annotated[tuple[int, int] | None, POSITIVE] = None
    label_grid: Annotated[tuple[int, int], POSITIVE] = (16, 8)  # stored part map cells (the ViT's patch grid)
    dense: Literal["auto", "value", "tokens"] = "auto"  # patch features; auto: tokens if avg-pooled, else value
    value_residual: bool = False  # MaskCLIP dense path: add the last block's input to the value path
    group_softmax: bool = True  # exclusive attribute groups share one softmax
    fg_threshold: Annotated[float, PROBABILITY] = 0.5
    foreground: Literal["both", "parts", "prompts"] = "both"  # person-vs-background prompts and/or part classes
    conf_levels: Annotated[int, at_least(2)] = 16  # part_conf levels (few: small after zstd)
    with_embed: bool = False  # --store-embeddings: also store the CLIP image embedding (fp16) as clip_embed
    batch_size: Annotated[int, POSITIVE] = 64
    workers: Annotated[int, NON_NEGATIVE] = 2
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    quiet: bool = False


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv:
    """Process rank/world from accelerate/torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if not 0 <= rank < world:
        raise ClaspError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return DistEnv(rank, world, local)


def assign_shards(shards: list[str], rank: int, world_size: int) -> list[str]:
    """Shards of one process: every ``world_size``-th of the sorted list, starting at ``rank``."""
    return sorted(shards)[rank::world_size]


def resolve_resolution(cfg: LabelConfig, loaded: LoadedClip) -> tuple[int, int]:
    if cfg.resolution is not None:
        return tuple(cfg.resolution)
    h, w = loaded.model.visual.image_size
    return (2 * w, w) if h == w else (h, w)


def labelset_identity(
    cfg: LabelConfig, loaded: LoadedClip, attrs: AttributeVocab, parts: PartVocab, resolution: tuple[int, int]
) -> dict:
    """Everything that changes the labels; its hash is the label-set id."""
    return {
        "method_version": LABEL_METHOD_VERSION,
        "clip": {"arch": loaded.identity.arch, "weights_id": loaded.identity.weights_id},
        "attributes": {
            "templates": list(attrs.templates),
            "attributes": [dataclasses.asdict(a) for a in attrs.attributes],
        },
        "parts": {
            "templates": list(parts.templates),
            "names": list(parts.names),
            "prompts": [list(p) for p in parts.prompts],
            "person": list(parts.person_prompts),
            "background": list(parts.background_prompts),
            "flip": dict(parts.flip),
        },
        "resolution": list(resolution),
        "label_grid": list(cfg.label_grid),
        "dense": DenseClip(loaded.model, resolution, dense=cfg.dense).dense,
        "value_residual": cfg.value_residual,
        "group_softmax": cfg.group_softmax,
        "fg_threshold": cfg.fg_threshold,
        "foreground": cfg.foreground,
        "conf_levels": cfg.conf_levels,
        "with_embed": cfg.with_embed,
    }


def labelset_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _batches(indices: list[ShardIndex], batch_size: int) -> list[list[int]]:
    """Global item ids cut into batches that never cross a shard boundary."""
    out, start = [], 0
    for idx in indices:
        n = len(idx.keys)
        out.extend(list(range(start + i, start + min(i + batch_size, n))) for i in range(0, n, batch_size))
        start += n
    return out


def run_labeling(cfg: LabelConfig) -> str:
    """Label this process's share of the corpus; returns the label-set id."""
    _validate(cfg)
    env = dist_env()
    device = resolve_device(cfg.device)  # first: a missing GPU is reported before any work
    try:
        sizes = read_sizes(cfg.root, cfg.corpus)
        digests = image_shard_digests(cfg.root, cfg.corpus)
        attrs, parts = load_attributes(cfg.attributes), load_parts(cfg.parts)
    except (FileNotFoundError, ValueError) as exc:
        raise ClaspError(str(exc)) from None
    if not sizes:
        raise ClaspError(f"corpus '{cfg.corpus}' under {cfg.root} has no image shards (sizes.json is empty)")
    if device == "cuda" and env.world_size > 1:
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
    if device.startswith("cuda"):
        # every process on its own GPU before any CUDA call: events, pinned copies and the loader's pinning
        # thread then use that device, and ranks 1.. open no context on GPU 0
        torch.cuda.set_device(torch.device(device))
    loaded = load_clip(cfg.clip, cfg.clip_checkpoint, allow_random_weights=cfg.allow_random_weights, device=device)
    resolution = resolve_resolution(cfg, loaded)
    identity = labelset_identity(cfg, loaded, attrs, parts, resolution)
    set_id = labelset_id(identity)
    out_dir = labels_dir(cfg.root, cfg.corpus, set_id)
    if sorted(digests) != list(sizes):
        raise ClaspError(
            f"{images_dir(cfg.root, cfg.corpus)}: manifest.parquet and sizes.json list different "
            "shards (an interrupted ingest?); re-run `clasp ingest` for this corpus"
        )
    mine = [
        s for s in assign_shards(list(sizes), env.rank, env.world_size) if not _done(cfg, set_id, s, sizes, digests)
    ]
    if mine:  # labels of this corpus are (re)made: the label set is not complete until they are
        (labels_dir(cfg.root, cfg.corpus, set_id) / LABELSET_FILE).unlink(missing_ok=True)
    # before anything is written: the shards still to do at about LABEL_BYTES_PER_IMAGE each
    per_image = LABEL_BYTES_PER_IMAGE + (EMBED_BYTES_PER_IMAGE if cfg.with_embed else 0)
    ensure_free_space(out_dir, per_image * sum(sizes[s] for s in mine), what="label shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(cfg, resolution=resolution)
    if env.rank == 0:
        save_config(resolved, out_dir / CONFIG_FILE)

    t0 = time.perf_counter()
    stats = {"images": 0, "shards": 0, "failures": [], "failed_shards": []}
    if mine:
        _label_shards(resolved, loaded, attrs, parts, set_id, mine, sizes, digests, device, stats)
    elapsed = time.perf_counter() - t0
    LAST_RUN.clear()
    LAST_RUN.update(images=stats["images"], shards=stats["shards"], loop_s=stats.get("loop_s", 0.0), total_s=elapsed)
    if stats["failed_shards"]:
        raise ClaspError(
            f"{len(stats['failed_shards'])} image shard(s) could not be labelled: "
            + "; ".join(stats["failed_shards"])
            + ". Fix or re-ingest them and re-run `clasp label` (finished shards are kept)."
        )
    doc = out_dir / LABELSET_FILE
    # a run that labelled nothing leaves a complete label set's labelset.json as it is (its mtime picks
    # the latest label set; its content names the run that made the labels)
    if stats["shards"] == 0 and doc.is_file():
        complete = True
    else:
        complete = _finalize(resolved, loaded, attrs, parts, set_id, identity, sizes, digests, device)
    if not cfg.quiet:
        rate = stats["images"] / elapsed if elapsed > 0 else 0.0
        print(
            f"label set {set_id}: rank {env.rank}/{env.world_size} labelled {stats['images']} images in "
            f"{stats['shards']} shards ({len(stats['failures'])} undecodable) in {elapsed:.1f} s ({rate:.0f} img/s); "
            + ("label set complete" if complete else "waiting for other processes' shards"),
            flush=True,
        )
    return set_id


def _validate(cfg: LabelConfig) -> None:
    checks = [
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (cfg.workers >= 0, "workers must be 0 or more"),
        (len(cfg.label_grid) == 2 and min(cfg.label_grid) >= 1, "label_grid must be two positive numbers [h, w]"),
        (cfg.resolution is None or (len(cfg.resolution) == 2 and min(cfg.resolution) >= 1), "resolution must be HxW"),
        (2 <= cfg.conf_levels <= 256, "conf_levels must be between 2 and 256"),
        (0.0 <= cfg.fg_threshold <= 1.0, "fg_threshold must be between 0 and 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"label config: {msg}")


def _done(cfg: LabelConfig, set_id: str, shard: str, sizes: dict[str, int], digests: dict[str, str]) -> bool:
    """A label shard is done when its Parquet footer reads, it has the image shard's row count and it was
    made from this ingest of the tar (same ``image_shard_digest``).

    A file damaged after it was written (truncated copy, full disk) is labelled again, not trusted; so is
    one made from an earlier ingest (or by a version that recorded no digest).
    """
    path = label_shard_path(cfg.root, cfg.corpus, set_id, shard_index(shard))
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
        info = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(b"clasp", b"{}"))
    except (OSError, ValueError):
        log.warning("%s is unreadable; labelling that shard again", path)
        return False
    if meta.num_rows != sizes[shard] or info.get("image_shard_digest") != digests[shard]:
        log.warning("%s was made from another ingest of %s; labelling that shard again", path, shard)
        return False
    return True


def _label_shards(
    cfg: LabelConfig,
    loaded: LoadedClip,
    attrs: AttributeVocab,
    parts: PartVocab,
    set_id: str,
    shards: list[str],
    sizes: dict[str, int],
    digests: dict[str, str],
    device: str,
    stats: dict,
) -> None:
    env = dist_env()
    indices: list[ShardIndex] = []
    for name in shards:
        path = image_shard_path(cfg.root, cfg.corpus, shard_index(name))
        try:
            idx = index_shard(path)
        except ClaspError as exc:
            stats["failed_shards"].append(str(exc))
            continue
        if len(idx.keys) != sizes[name]:
            stats["failed_shards"].append(f"{path} holds {len(idx.keys)} images but sizes.json says {sizes[name]}")
            continue
        indices.append(idx)
    if not indices:
        return

    dense = (
        DenseClip(loaded.model, cfg.resolution, dense=cfg.dense, value_residual=cfg.value_residual).to(device).eval()
    )
    labeler = build_labeler(
        loaded,
        attrs,
        parts,
        label_grid=cfg.label_grid,
        group_softmax=cfg.group_softmax,
        fg_threshold=cfg.fg_threshold,
        foreground=cfg.foreground,
        device=device,
    )
    on_gpu = device.startswith("cuda")
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    if on_gpu:
        dense = dense.to(memory_format=torch.channels_last)
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1) * 255.0
    schema = label_schema(len(attrs.attributes), list(parts.names), with_embed=cfg.with_embed)

    dataset = ShardImages(indices, cfg.resolution)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_batches(indices, cfg.batch_size),
        num_workers=cfg.workers,
        pin_memory=on_gpu,
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    buffers = [ShardBuffer(idx) for idx in indices]
    starts = np.cumsum([0] + [len(i.keys) for i in indices])
    meta_base = {"labelset": set_id}  # no rank or world size: a shard is the same bytes however many processes ran

    def consume(item_ids: torch.Tensor, ok: torch.Tensor, host: tuple) -> None:
        """Store one batch's labels (already on the host) and write its shard when complete."""
        labels, embed, ready = host
        if ready is not None:
            ready.synchronize()
        shard_pos = int(np.searchsorted(starts, int(item_ids[0]), side="right") - 1)
        buf, first = buffers[shard_pos], int(starts[shard_pos])
        bad = np.flatnonzero(~ok.numpy())
        if bad.size:
            blank_rows(labels, bad)
            if embed is not None:
                embed[torch.as_tensor(bad)] = 0  # no embedding: distillation skips all-zero rows
            stats["failures"] += [
                {"shard": buf.index.path.name, "key": buf.index.keys[int(item_ids[b]) - first]} for b in bad
            ]
        buf.add(item_ids.numpy() - first, labels, embed)
        if buf.complete:
            failures = [f["key"] for f in stats["failures"] if f["shard"] == buf.index.path.name]
            path = label_shard_path(cfg.root, cfg.corpus, set_id, shard_index(buf.index.path))
            table = buf.table(schema, list(parts.names), cfg.conf_levels)
            digest = digests[buf.index.path.name]
            meta = {**meta_base, "rows": table.num_rows, "undecodable": failures, "image_shard_digest": digest}
            write_shard(path, table, meta)
            buffers[shard_pos] = None  # free the shard's rows
            stats["shards"] += 1

    total = sum(len(i.keys) for i in indices)
    pending = None  # previous batch: its device->host copy overlaps this batch's forward
    t0 = time.perf_counter()
    with progress(total, "label", quiet=cfg.quiet or env.rank != 0) as advance:
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
                consume(*pending)
            pending = (item_ids, ok, host)
            stats["images"] += len(item_ids)
            advance(len(item_ids))
        if pending is not None:
            consume(*pending)
    stats["loop_s"] = time.perf_counter() - t0


def _finalize(
    cfg: LabelConfig,
    loaded: LoadedClip,
    attrs: AttributeVocab,
    parts: PartVocab,
    set_id: str,
    identity: dict,
    sizes: dict[str, int],
    digests: dict[str, str],
    device: str,
) -> bool:
    """Write labelset.json once every shard is done (``_done``); returns whether the label set is complete."""
    if not all(_done(cfg, set_id, name, sizes, digests) for name in sizes):
        return False
    visual = loaded.model.visual
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
    header = {
        "labelset": set_id,
        "corpus": cfg.corpus,
        "code_version": code_version(),
        "model": {
            **dataclasses.asdict(loaded.identity),
            "patch_size": list(visual.patch_size),
            "logit_scale": float(loaded.model.logit_scale.detach().exp()),
            "mean": list(loaded.mean),
            "std": list(loaded.std),
        },
        "resolution": list(cfg.resolution),
        "feature_grid": [cfg.resolution[0] // visual.patch_size[0], cfg.resolution[1] // visual.patch_size[1]],
        "grid": list(cfg.label_grid),
        "method": {
            "dense": _dense_doc(DenseClip(loaded.model, cfg.resolution, dense=cfg.dense).dense, cfg.value_residual),
            "foreground": {
                "both": "mean of P(person | person vs background prompts) and 1 - P(background part class)",
                "parts": "1 - P(background part class)",
                "prompts": "P(person | person vs background prompts)",
            }[cfg.foreground],
            "group_softmax": cfg.group_softmax,
            "fg_threshold": cfg.fg_threshold,
            "part_conf_levels": cfg.conf_levels,
            "precision_last_run": "bf16" if bf16 else "fp32",
        },
        "attributes": {
            "vocabulary": attrs.name,
            "names": attrs.names,
            "templates": list(attrs.templates),
            "prompts": [dataclasses.asdict(a) for a in attrs.attributes],
        },
        "parts": {
            "vocabulary": parts.name,
            "names": list(parts.names),
            "templates": list(parts.templates),
            "prompts": [list(p) for p in parts.prompts],
            "person": list(parts.person_prompts),
            "background": list(parts.background_prompts),
            "flip": dict(parts.flip),  # left/right pairs; pre-training renames them in flipped crops
        },
        "identity": identity,
        "config": to_dict(cfg),
    }
    paths = [label_shard_path(cfg.root, cfg.corpus, set_id, shard_index(name)) for name in sizes]
    return finalize_labelset(labels_dir(cfg.root, cfg.corpus, set_id), paths, header)


def _dense_doc(mode: str, residual: bool) -> str:
    if mode == "tokens":
        return "projected output patch tokens of an average-pooled tower (their mean is the image embedding)"
    return "MaskCLIP value path of the last block" + (" + residual" if residual else "")
