"""Stage 0's shard writer: one task = one tar of original image bytes plus its manifest rows.

Runs in the ingest's worker processes (spawned, so this module stays light: no config, no planning).
A shard's rows go to ``.ingest/<stem>.parquet`` (with the tar's size and the plan id) before its tar is
renamed into place; ``pipeline.ingest`` plans the tasks, resumes, and merges the rows into the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats import MANIFEST_COLUMNS, atomic_path, shard_stem
from pipeline.progress import progress
from pipeline.sources import Probe, SourceReader, probe_image

WORK_DIR = ".ingest"  # per-shard rows + rejects, plan.json, lock; hidden from `*.tar` globs
METADATA_KEY = b"clasp.ingest"
_PROGRESS_EVERY = 64

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("n_bytes", pa.int64(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
assert tuple(MANIFEST_SCHEMA.names) == MANIFEST_COLUMNS


@dataclass
class ShardTask:
    index: int
    items: list[tuple[str, str]]  # (key, source) in shuffled order
    out_dir: str
    corpus: str
    fmt: str
    source: str
    plan_id: str
    full_decode: bool


_worker_progress = None  # multiprocessing.Value in pool workers


def _pool_init(counter) -> None:  # noqa: ANN001 - multiprocessing.Value proxy
    global _worker_progress
    _worker_progress = counter


def _count_in_worker(n: int) -> None:
    with _worker_progress.get_lock():
        _worker_progress.value += n


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _work_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / WORK_DIR / name


def shard_rows_path(out_dir: str | Path, corpus: str, index: int) -> Path:
    return _work_path(out_dir, f"{shard_stem(corpus, index)}.parquet")


def _load(reader: SourceReader, source: str, full_decode: bool) -> tuple[bytes, Probe]:
    """The bytes of one source and what its headers say; ``Probe.reason`` is set for a reject."""
    try:
        data = reader.read(source)
    except OSError as exc:
        return b"", Probe(reason=f"unreadable: {exc.strerror or exc}")
    if data is None:
        return b"", Probe(reason="LMDB key has no value")
    return data, probe_image(data, full_decode)


def _add_sample(tar: tarfile.TarFile, key: str, data: bytes, probe: Probe, source: str) -> None:
    meta = {"height": probe.height, "source": source, "width": probe.width}
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    tar.addfile(_tar_info(f"{key}.{probe.ext}", len(data)), io.BytesIO(data))
    tar.addfile(_tar_info(f"{key}.json", len(meta_bytes)), io.BytesIO(meta_bytes))


def write_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Validate, hash and store one shard's images; returns (shard index, stored count)."""
    reader = SourceReader(task.fmt, task.source)
    rows: dict[str, list] = {name: [] for name in MANIFEST_COLUMNS}
    rejects: list[list[str]] = []
    tar_path = Path(task.out_dir) / f"{shard_stem(task.corpus, task.index)}.tar"
    try:
        with atomic_path(tar_path) as tmp_tar:
            with open(tmp_tar, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for n, (key, source) in enumerate(task.items, 1):
                    if progress is not None and n % _PROGRESS_EVERY == 0:
                        progress(_PROGRESS_EVERY)
                    data, probe = _load(reader, source, task.full_decode)
                    if probe.reason:
                        rejects.append([source, probe.reason])
                        continue
                    _add_sample(tar, key, data, probe, source)
                    row = (key, task.index, len(rows["key"]), probe.width, probe.height, len(data),
                           hashlib.sha256(data).hexdigest(), source)  # fmt: skip
                    for name, value in zip(MANIFEST_COLUMNS, row, strict=True):
                        rows[name].append(value)
            # Rows first, tar rename second: a tar on disk always has its rows beside it. The rows record the
            # tar's size, so a tar cut short later (copy, full disk) is not taken for a complete shard.
            meta = {"plan_id": task.plan_id, "rejects": rejects, "tar_bytes": os.path.getsize(tmp_tar)}
            schema = MANIFEST_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta)})
            with atomic_path(shard_rows_path(task.out_dir, task.corpus, task.index)) as tmp_rows:
                pq.write_table(pa.table(rows, schema=schema), tmp_rows, compression="zstd")
    finally:
        reader.close()
    if progress is not None:
        progress(len(task.items) % _PROGRESS_EVERY)
    return task.index, len(rows["key"])


def _write_shard_in_worker(task: ShardTask) -> tuple[int, int]:
    return write_shard(task, _count_in_worker)


def _resolve_workers(requested: int, n_tasks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, n_tasks))


def run_shard_tasks(tasks: list[ShardTask], *, workers: int, quiet: bool, total: int, done: int) -> None:
    """Write ``tasks`` on ``workers`` processes (0 = all cores), with one progress bar over ``total`` images."""
    if not tasks:
        return
    workers = _resolve_workers(workers, len(tasks))
    with progress(total, f"ingest {tasks[0].corpus}", quiet=quiet, initial=done) as advance:
        if workers == 1:
            for task in tasks:
                write_shard(task, advance)
            return
        ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (tqdm) and open LMDB handles
        counter = ctx.Value("q", 0)
        with ctx.Pool(workers, initializer=_pool_init, initargs=(counter,)) as pool:
            results = pool.imap_unordered(_write_shard_in_worker, tasks)
            remaining, shown = len(tasks), 0
            while remaining:
                try:
                    results.next(timeout=0.5)
                    remaining -= 1
                except mp.TimeoutError:
                    pass
                advance(counter.value - shown)
                shown = counter.value
