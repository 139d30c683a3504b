"""Stage 0: ingest a person-image corpus into shuffled, keyed WebDataset shards (DESIGN.md section 2.1).

    clasp ingest --source /data/LUPerson --format folder --corpus luperson --root data
    clasp ingest --source /data/lup_lmdb --format lmdb --corpus luperson --root data --workers 16

Outputs under ``ROOT/<corpus>/images/`` (paths from pipeline.formats):

* ``<corpus>-NNNNNN.tar``: members ``<key>.jpg`` (or ``<key>.png`` for PNG input) with the ORIGINAL encoded
  bytes, and ``<key>.json`` = ``{"height", "source", "width"}``. Tar headers are fixed (mtime 0, uid/gid 0,
  no user names, mode 0644), so the same source and seed give byte-identical shards. Read them with
  ``webdataset.WebDataset(urls).decode("pil").to_tuple("jpg;png", "json")``.
* ``manifest.parquet``: MANIFEST_COLUMNS, one row per stored image in shard order, one row group per
  shard. ``shard`` is the shard number (int32, ``formats.image_shard_path(root, corpus, shard)``), ``index``
  the position in that shard, ``content_hash`` the SHA-256 hex of the stored bytes, ``source`` the image's
  identity in the source (relative path, list entry, or LMDB key). Schema metadata ``clasp.ingest`` holds the
  seed, shard size, source, format and ``plan_id`` (digest of the shuffled listing and settings).
* ``sizes.json`` (shard file name -> count), ``rejects.csv`` (source, reason), ``duplicates.csv``
  (key, source, content_hash, duplicate_of), ``ingest.json`` (summary) and ``ingest_config.yaml``.

Order of work: list the source (sorted by key; key collisions are an error), shuffle once with the seed
(consecutive frames of a video must not share a shard), cut the list into shards of ``images_per_shard``
candidates, then write shards in parallel (pipeline/ingest_shards.py). A shard's rows and rejects go to
``.ingest/<stem>.parquet`` before its tar is renamed into place, so a rerun skips every shard whose tar and
rows exist (and whose tar still has the size recorded in its rows: a tar cut short after the run is
rewritten). ``manifest.parquet`` and then ``sizes.json`` are written last: their presence means the ingest is complete.

Rejected inputs (empty, truncated, not an image, unsupported format) are skipped and listed. Images with
identical bytes are KEPT (dropping them would make a shard's content depend on other shards) and listed
in ``duplicates.csv``; filter them with DuckDB on ``content_hash`` if needed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq

from pipeline.config import NON_NEGATIVE, POSITIVE, save_config, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import (
    MANIFEST_FILE,
    REJECTS_FILE,
    SIZES_FILE,
    atomic_path,
    image_shard_path,
    images_dir,
    write_json_atomic,
)
from pipeline.guards import ensure_free_space
from pipeline.ingest_shards import MANIFEST_SCHEMA, METADATA_KEY, WORK_DIR, ShardTask, run_shard_tasks, shard_rows_path
from pipeline.sources import FORMATS, list_source

DUPLICATES_FILE = "duplicates.csv"
SUMMARY_FILE = "ingest.json"
CONFIG_FILE = "ingest_config.yaml"
PLAN_FILE = "plan.json"
PLAN_VERSION = 1  # bump when the shard layout changes, so old partial runs are not resumed
_TAR_OVERHEAD_BYTES = 1536  # two 512-byte headers, the json member, padding


@dataclass
class IngestConfig:
    """Settings of ``clasp ingest``; ``source``, ``format``, ``corpus``, ``images_per_shard`` and ``seed``
    (plus ``full_decode``) define the shards, the rest only how fast and how loud they are made."""

    source: str = ""  # folder, LMDB environment (dir or .mdb file), or list file (one image path per line)
    format: str = "folder"  # folder | lmdb | list
    corpus: str = ""  # output name: ROOT/<corpus>/images/<corpus>-NNNNNN.tar
    root: str = "data"
    images_per_shard: Annotated[int, POSITIVE] = 10000  # candidates per shard before rejects; DESIGN targets 5k-20k
    seed: int = 0  # of the one global shuffle of the image order
    workers: Annotated[int, NON_NEGATIVE] = 0  # processes; 0 = all cores available to this process
    quiet: bool = False  # no progress bar or summary
    overwrite: bool = False  # replace a previous ingest of this corpus made with other settings/source
    full_decode: bool = False  # also decode every image with PIL (slow; catches corrupt entropy data)


@dataclass
class IngestSummary:
    images: int  # stored images
    shards: int
    rejects: int
    duplicates: int  # images whose bytes equal an earlier image's (kept, listed in duplicates.csv)
    seconds: float
    n_bytes: int = 0  # encoded bytes stored
    shards_skipped: int = 0  # complete shards found from an earlier run
    ignored: int = 0  # files skipped for their suffix (folder sources)
    out_dir: str = ""


# --- planning and resume ---------------------------------------------------------------------------
def _validate(cfg: IngestConfig) -> None:
    if not cfg.source:
        raise ClaspError("ingest: --source is required (a folder, an LMDB or a list file)")
    if cfg.format not in FORMATS:
        raise ClaspError(f"ingest: --format {cfg.format!r} is not one of {', '.join(FORMATS)}")
    if not cfg.corpus or not all(c.isalnum() or c in "_-" for c in cfg.corpus):
        raise ClaspError(f"ingest: --corpus {cfg.corpus!r} must be a non-empty name of letters, digits, '_' or '-'")
    if cfg.images_per_shard < 1:
        raise ClaspError(f"ingest: images_per_shard must be >= 1, got {cfg.images_per_shard}")
    if cfg.workers < 0:
        raise ClaspError(f"ingest: workers must be >= 0 (0 = all cores), got {cfg.workers}")
    if not Path(cfg.source).exists():
        raise ClaspError(f"ingest: --source {cfg.source} does not exist")


def _plan_settings(cfg: IngestConfig) -> dict:
    return {
        "version": PLAN_VERSION,
        "source": str(Path(cfg.source).resolve()),
        "format": cfg.format,
        "corpus": cfg.corpus,
        "images_per_shard": cfg.images_per_shard,
        "seed": cfg.seed,
        "full_decode": cfg.full_decode,
    }


def _plan_id(settings: dict, items: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for start in range(0, len(items), 65536):
        digest.update(
            "\n".join(f"{k}\t{s}" for k, s in items[start : start + 65536]).encode("utf-8", "surrogateescape")
        )
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _ours(out: Path, corpus: str) -> Iterator[Path]:
    """Files a previous ingest of ``corpus`` may have left in ``out`` (for --overwrite)."""
    yield from out.glob(f"{corpus}-*.tar*")
    for name in (MANIFEST_FILE, SIZES_FILE, REJECTS_FILE, DUPLICATES_FILE, SUMMARY_FILE, CONFIG_FILE):
        yield from out.glob(f"{name}*")
    work = out / WORK_DIR
    if work.is_dir():
        yield from (p for p in work.iterdir() if p.name != "lock")


def _check_previous(out: Path, cfg: IngestConfig, plan: dict) -> None:
    """Refuse to mix with an earlier run made from other settings or another listing, unless --overwrite."""
    plan_path = out / WORK_DIR / PLAN_FILE
    previous = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    leftovers = [p for p in _ours(out, cfg.corpus) if p.name != PLAN_FILE]
    if previous == plan or (previous is None and not leftovers):
        return
    if not cfg.overwrite:
        if previous is None:
            why = f"{out} holds files of an ingest without a plan ({leftovers[0].name}, ...)"
        else:
            changed = [
                f"{k}: {previous['settings'].get(k)!r} -> {v!r}"
                for k, v in plan["settings"].items()
                if previous["settings"].get(k) != v
            ]
            if changed:
                why = "settings changed (" + "; ".join(changed) + ")"
            else:
                why = f"the source changed ({previous['candidates']} -> {plan['candidates']} candidate images)"
        raise ClaspError(
            f"ingest: {out} was made by an earlier run and {why}. Pass --overwrite to replace it, "
            "or choose another --corpus/--root"
        )
    labels = out.parent / "labels"
    if labels.is_dir() and any(labels.iterdir()):
        print(f"warning: {labels} was labeled from the shards being replaced; relabel after this ingest")
    for path in _ours(out, cfg.corpus):
        path.unlink()


def _lock(out: Path):  # noqa: ANN202 - an open file whose flock is held until closed
    path = out / WORK_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ClaspError(f"ingest: another `clasp ingest` is writing {out}; wait for it to finish") from None
    return fh


def _shard_complete(out: Path, corpus: str, index: int, plan_id: str) -> bool:
    """A shard is done when its tar and rows exist, the rows belong to this plan and the tar has its full size."""
    rows = shard_rows_path(out, corpus, index)
    tar = image_shard_path(out.parent.parent, corpus, index)
    if not (tar.is_file() and rows.is_file()):
        return False
    try:
        meta = json.loads((pq.read_schema(rows).metadata or {}).get(METADATA_KEY, b"{}"))
    except (OSError, ValueError):  # rows file damaged after the run: redo the shard
        return False
    expected = meta.get("tar_bytes")
    return meta.get("plan_id") == plan_id and (expected is None or tar.stat().st_size == expected)


# --- the stage ---------------------------------------------------------------------------------------
def ingest(cfg: IngestConfig) -> IngestSummary:
    """Write ``cfg.corpus``'s image shards, manifest and sizes under ``cfg.root``; resumes an interrupted run."""
    _validate(cfg)
    start = time.perf_counter()
    out = images_dir(cfg.root, cfg.corpus)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _ingest_locked(cfg, out, start)
    finally:
        lock.close()


def _ingest_locked(cfg: IngestConfig, out: Path, start: float) -> IngestSummary:
    say = (lambda *a: None) if cfg.quiet else print
    listing = list_source(cfg.format, cfg.source)
    items, ignored = listing.items, listing.ignored
    del listing
    if not items:
        raise ClaspError(f"ingest: no images found in {cfg.format} source {cfg.source}")
    random.Random(cfg.seed).shuffle(items)  # sorted by key before, so the order depends only on the seed
    settings = _plan_settings(cfg)
    n_shards = -(-len(items) // cfg.images_per_shard)
    plan = {"settings": settings, "candidates": len(items), "shards": n_shards, "plan_id": _plan_id(settings, items)}
    _check_previous(out, cfg, plan)
    complete = [_shard_complete(out, cfg.corpus, i, plan["plan_id"]) for i in range(n_shards)]
    if all((out / name).is_file() for name in (SIZES_FILE, MANIFEST_FILE, SUMMARY_FILE)):
        if all(complete):
            summary = IngestSummary(**json.loads((out / SUMMARY_FILE).read_text())["summary"])
            summary.seconds = time.perf_counter() - start
            summary.shards_skipped = n_shards
            summary.ignored = ignored
            say(f"{out}: already complete ({summary.images} images in {summary.shards} shards); nothing to do")
            return summary
        (out / SIZES_FILE).unlink()  # a shard went missing: the manifest no longer describes the disk

    ips = cfg.images_per_shard
    tasks = [
        ShardTask(i, items[i * ips : (i + 1) * ips], str(out), cfg.corpus, cfg.format, cfg.source, plan["plan_id"],
                   cfg.full_decode)
        for i in range(n_shards)
        if not complete[i]
    ]  # fmt: skip
    skipped = n_shards - len(tasks)
    del items  # the tasks' slices are all that is still needed
    # before the first byte of output: a full disk is refused up front, not found three hours in
    ensure_free_space(out, _estimate_bytes(tasks, cfg, plan["candidates"]), what=f"image shards of '{cfg.corpus}'")
    write_json_atomic(out / WORK_DIR / PLAN_FILE, plan)
    for stale in [*out.glob("*.tmp-*"), *(out / WORK_DIR).glob("*.tmp-*")]:
        stale.unlink()  # left by a crashed run; the lock says no other run owns them
    if ignored:
        say(f"ignored {ignored} files without an image suffix in {cfg.source}")
    if skipped:
        say(f"resuming: {skipped}/{n_shards} shards already complete")
    done = plan["candidates"] - sum(len(t.items) for t in tasks)
    run_shard_tasks(tasks, workers=cfg.workers, quiet=cfg.quiet, total=plan["candidates"], done=done)
    summary = _finalize(out, cfg, plan, start, shards_skipped=skipped, ignored=ignored)
    say(
        f"ingested {summary.images} images into {summary.shards} shards in {out} ({summary.seconds:.1f} s); "
        f"{summary.rejects} rejected (see {REJECTS_FILE}), {summary.duplicates} duplicate(s) kept "
        f"(see {DUPLICATES_FILE})"
    )
    return summary


def _estimate_bytes(tasks: list[ShardTask], cfg: IngestConfig, n_candidates: int) -> int:
    """Bytes the missing shards will take: source size from a sample of files (or the LMDB file) + tar headers."""
    n_todo = sum(len(t.items) for t in tasks)
    if cfg.format == "lmdb":
        mdb = Path(cfg.source) / "data.mdb" if Path(cfg.source).is_dir() else Path(cfg.source)
        payload = mdb.stat().st_size * n_todo / max(n_candidates, 1)
    else:
        rng = random.Random(0)
        sample = [rng.choice(t.items)[1] for t in rng.choices(tasks, k=min(256, n_todo)) if t.items]
        base = Path(cfg.source) if cfg.format == "folder" else Path(cfg.source).parent
        sizes = []
        for source in sample:
            with contextlib.suppress(OSError):
                sizes.append((base / source).stat().st_size)  # absolute list entries ignore `base`
        payload = n_todo * (sum(sizes) / len(sizes) if sizes else 0)
    return int(payload + n_todo * _TAR_OVERHEAD_BYTES)


def _finalize(out: Path, cfg: IngestConfig, plan: dict, start: float, **extra: int) -> IngestSummary:
    """Merge per-shard rows into manifest.parquet, list rejects and duplicates, then write sizes.json last."""
    n_shards = plan["shards"]
    row_files = [shard_rows_path(out, cfg.corpus, i) for i in range(n_shards)]
    metadata = {**plan["settings"], "plan_id": plan["plan_id"], "hash": "sha256"}
    schema = MANIFEST_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    sizes: dict[str, int] = {}
    n_images = n_bytes = n_rejects = 0
    with atomic_path(out / REJECTS_FILE) as tmp_rejects, open(tmp_rejects, "w", newline="") as rej_fh:
        rejects_csv = csv.writer(rej_fh)
        rejects_csv.writerow(["source", "reason"])
        with atomic_path(out / MANIFEST_FILE) as tmp_manifest:
            with pq.ParquetWriter(tmp_manifest, schema, compression="zstd") as writer:
                for index, path in enumerate(row_files):
                    table = pq.read_table(path)
                    rejects = json.loads(table.schema.metadata[METADATA_KEY])["rejects"]
                    rejects_csv.writerows(rejects)
                    n_rejects += len(rejects)
                    writer.write_table(table.cast(MANIFEST_SCHEMA))
                    sizes[image_shard_path(cfg.root, cfg.corpus, index).name] = table.num_rows
                    n_images += table.num_rows
                    n_bytes += sum(table.column("n_bytes").to_pylist())
            n_duplicates = _write_duplicates(out, row_files)
    summary = IngestSummary(
        images=n_images,
        shards=n_shards,
        rejects=n_rejects,
        duplicates=n_duplicates,
        seconds=time.perf_counter() - start,
        n_bytes=n_bytes,
        out_dir=str(out),
        **extra,
    )
    save_config(cfg, out / CONFIG_FILE)
    write_json_atomic(
        out / SUMMARY_FILE, {"config": to_dict(cfg), "plan": plan, "summary": dataclasses.asdict(summary)}
    )
    write_json_atomic(out / SIZES_FILE, sizes)  # last: read_sizes() treats its presence as "complete"
    return summary


def _write_duplicates(out: Path, row_files: list[Path]) -> int:
    """duplicates.csv: every image whose bytes equal an earlier one's (in shard order); returns the count.

    Memory is 16 bytes per image: the first 64 bits of each hash, sorted; only rows whose prefixes collide
    are then read in full and compared on the whole SHA-256.
    """
    import numpy as np

    prefixes, offsets = [], [0]
    for path in row_files:
        hashes = pq.read_table(path, columns=["content_hash"]).column(0).to_pylist()
        prefixes.append(np.frombuffer(bytes.fromhex("".join(h[:16] for h in hashes)), dtype=">u8"))
        offsets.append(offsets[-1] + len(hashes))
    prefix = np.concatenate(prefixes) if prefixes else np.zeros(0, ">u8")
    del prefixes
    order = np.argsort(prefix, kind="stable")
    same = prefix[order[1:]] == prefix[order[:-1]]
    suspects = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))  # global row positions, sorted
    del prefix, order, same
    first_of: dict[str, str] = {}
    duplicates = []
    shard_of = np.searchsorted(offsets, suspects, side="right") - 1
    for shard in np.unique(shard_of):
        table = pq.read_table(row_files[shard], columns=["key", "source", "content_hash"])
        for pos in suspects[shard_of == shard]:
            key, source, digest = (table.column(c)[int(pos - offsets[shard])].as_py() for c in range(3))
            if digest in first_of:
                duplicates.append([key, source, digest, first_of[digest]])
            else:
                first_of[digest] = key
    with atomic_path(out / DUPLICATES_FILE) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "source", "content_hash", "duplicate_of"])
        writer.writerows(duplicates)
    return len(duplicates)
