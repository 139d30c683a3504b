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
uninterrupted run does. Output schema: pipeline/formats.py. The loop over a process's shards is
``labeling.label_loop``; the settings are ``labeling.label_config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch

from labeling.clip_model import DenseClip, LoadedClip, load_clip
from labeling.label_config import LabelConfig
from labeling.label_loop import LabelJob, ShardsDone, label_shards
from labeling.writer import code_version, finalize_labelset
from pipeline.config import ConfigError, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import (
    LABELSET_FILE,
    image_shard_digests,
    images_dir,
    label_shard_path,
    labels_dir,
    read_sizes,
    shard_index,
)
from pipeline.guards import ensure_free_space, resolve_device
from pipeline.vocab import AttributeVocab, PartVocab, load_attributes, load_parts

log = logging.getLogger(__name__)

# Bump when the label math changes without any config change, so old label sets are not reused.
LABEL_METHOD_VERSION = 2  # 2: part confidences above chance, comparable for background and parts
CONFIG_FILE = "label_config.yaml"
LABEL_BYTES_PER_IMAGE = 256  # disk estimate per image (measured 102-150 at 16x8 without clip_embed)
EMBED_BYTES_PER_IMAGE = 1024  # + clip_embed: a 512-d fp16 embedding (ViT-B)


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


def vocabulary_doc(attrs: AttributeVocab, parts: PartVocab) -> dict[str, dict]:
    """The vocabularies as ``labelset.json`` records them; made once per run, the identity hashes part of it."""
    return {
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
    }


def labelset_identity(
    cfg: LabelConfig, loaded: LoadedClip, vocab: dict[str, dict], resolution: tuple[int, int], dense_mode: str
) -> dict:
    """Everything that changes the labels; its hash is the label-set id.

    ``vocab``: ``vocabulary_doc``; ``dense_mode``: ``DenseClip.dense`` (``auto`` resolved) of the run's DenseClip.
    """
    attributes, parts = vocab["attributes"], vocab["parts"]
    return {
        "method_version": LABEL_METHOD_VERSION,
        "clip": {"arch": loaded.identity.arch, "weights_id": loaded.identity.weights_id},
        "attributes": {"templates": attributes["templates"], "attributes": attributes["prompts"]},
        "parts": {k: parts[k] for k in ("templates", "names", "prompts", "person", "background", "flip")},
        "resolution": list(resolution),
        "label_grid": list(cfg.label_grid),
        "dense": dense_mode,
        "value_residual": cfg.value_residual,
        "group_softmax": cfg.group_softmax,
        "fg_threshold": cfg.fg_threshold,
        "foreground": cfg.foreground,
        "conf_levels": cfg.conf_levels,
        "with_embed": cfg.with_embed,
    }


def labelset_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LabelRun:
    """What ``run_labeling`` did in this process (``clasp label`` prints it; benchmarks read its times)."""

    labelset: str  # the label-set id: the folder under ROOT/<corpus>/labels/
    images: int  # images this process labelled (0 when all its shards were already done)
    shards: int  # label shards it wrote
    undecodable: int  # images that did not decode (their rows are blank)
    loop_s: float  # the labelling loop: decode, forward, labelers, Parquet writes
    total_s: float  # loop_s + indexing the image shards and building the labelers (model load not included)
    complete: bool  # labelset.json is written: every shard of the corpus is done


def run_labeling(cfg: LabelConfig) -> LabelRun:
    """Label this process's share of the corpus; returns what it did (``.labelset`` is the label-set id)."""
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
    device = _process_device(device, env)
    loaded = load_clip(cfg.clip, cfg.clip_checkpoint, allow_random_weights=cfg.allow_random_weights, device=device)
    resolution = resolve_resolution(cfg, loaded)
    dense = DenseClip(loaded.model, resolution, dense=cfg.dense, value_residual=cfg.value_residual)
    vocab = vocabulary_doc(attrs, parts)
    identity = labelset_identity(cfg, loaded, vocab, resolution, dense.dense)
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
        (out_dir / LABELSET_FILE).unlink(missing_ok=True)
    # before anything is written: the shards still to do at about LABEL_BYTES_PER_IMAGE each
    per_image = LABEL_BYTES_PER_IMAGE + (EMBED_BYTES_PER_IMAGE if cfg.with_embed else 0)
    ensure_free_space(out_dir, per_image * sum(sizes[s] for s in mine), what="label shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = dataclasses.replace(cfg, resolution=resolution)
    if env.rank == 0:
        save_config(resolved, out_dir / CONFIG_FILE)

    job = LabelJob(resolved, loaded, dense, attrs, parts, set_id, sizes, digests, device, rank=env.rank)
    t0 = time.perf_counter()
    done = label_shards(job, mine) if mine else ShardsDone()
    elapsed = time.perf_counter() - t0
    if done.failed_shards:
        raise ClaspError(
            f"{len(done.failed_shards)} image shard(s) could not be labelled: "
            + "; ".join(done.failed_shards)
            + ". Fix or re-ingest them and re-run `clasp label` (finished shards are kept)."
        )
    # a run that labelled nothing leaves a complete label set's labelset.json as it is (its mtime picks
    # the latest label set; its content names the run that made the labels)
    complete = (done.shards == 0 and (out_dir / LABELSET_FILE).is_file()) or _finalize(job, identity, vocab)
    run = LabelRun(set_id, done.images, done.shards, len(done.undecodable), done.loop_s, elapsed, complete)
    if not cfg.quiet:
        rate = run.images / elapsed if elapsed > 0 else 0.0
        print(
            f"label set {set_id}: rank {env.rank}/{env.world_size} labelled {run.images} images in "
            f"{run.shards} shards ({run.undecodable} undecodable) in {elapsed:.1f} s ({rate:.0f} img/s); "
            + ("label set complete" if complete else "waiting for other processes' shards"),
            flush=True,
        )
    return run


def _process_device(device: str, env: DistEnv) -> str:
    """This process's device: with several processes on a GPU machine, the GPU of its local rank; with one, the
    current GPU. Always an indexed device: ``torch.cuda.set_device`` refuses a bare ``cuda``."""
    if device == "cuda":
        one = env.world_size == 1
        device = f"cuda:{torch.cuda.current_device() if one else env.local_rank % torch.cuda.device_count()}"
    if device.startswith("cuda"):
        # every process on its own GPU before any CUDA call: events, pinned copies and the loader's pinning
        # thread then use that device, and ranks 1.. open no context on GPU 0
        torch.cuda.set_device(torch.device(device))
    return device


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


def _finalize(job: LabelJob, identity: dict, vocab: dict[str, dict]) -> bool:
    """Write labelset.json once every shard is done (``_done``); returns whether the label set is complete."""
    cfg, loaded, set_id = job.cfg, job.loaded, job.set_id
    if not all(_done(cfg, set_id, name, job.sizes, job.digests) for name in job.sizes):
        return False
    visual = loaded.model.visual
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and job.device.startswith("cuda"))
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
            "dense": _dense_doc(job.dense.dense, cfg.value_residual),
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
        **vocab,
        "identity": identity,
        "config": to_dict(cfg),
    }
    paths = [label_shard_path(cfg.root, cfg.corpus, set_id, shard_index(name)) for name in job.sizes]
    return finalize_labelset(labels_dir(cfg.root, cfg.corpus, set_id), paths, header)


def _dense_doc(mode: str, residual: bool) -> str:
    if mode == "tokens":
        return "projected output patch tokens of an average-pooled tower (their mean is the image embedding)"
    return "MaskCLIP value path of the last block" + (" + residual" if residual else "")
