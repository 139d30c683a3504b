"""On-disk contracts between stages (DESIGN.md section 2): paths, names, schemas, atomic writes.

Layout under a data root ``ROOT``::

    ROOT/<corpus>/images/<corpus>-NNNNNN.tar          WebDataset shards: <key>.jpg (original bytes) + <key>.json
    ROOT/<corpus>/images/manifest.parquet             one row per image (MANIFEST_COLUMNS)
    ROOT/<corpus>/images/sizes.json                   {"<corpus>-NNNNNN.tar": count, ...}
    ROOT/<corpus>/images/rejects.csv                  unreadable inputs: source, reason
    ROOT/<corpus>/labels/<labelset>/<corpus>-NNNNNN.parquet   one label file per image shard, same rows/order
    ROOT/<corpus>/labels/<labelset>/labelset.json      vocabularies, model identity, grid, counts, failures

Label shard columns (pyarrow types; readable by DuckDB and pyarrow with no project code):

    key            string                       same value and row order as the image shard
    attr_prob      fixed_size_list<uint8>[A]    P(attribute) * 255, rounded; order = labelset.json "attributes"
    part_map       binary (grid_h*grid_w bytes) row-major uint8 part class ids, 0 = background
    part_conf      binary (grid_h*grid_w bytes) row-major uint8 confidence * 255 of the part_map class
    fg_ratio       float32                      share of the crop estimated to be person (0..1)
    area_<part>    uint8                        share of grid cells of that part class * 255 (not for background)
    row_<part>     uint8, null if absent        mean row of that class's cells, 0 = top .. 255 = bottom
    clip_embed     binary, optional             image embedding, float16 little-endian bytes

``grid`` ([grid_h, grid_w]) and the part/attribute names are recorded in labelset.json. Each label shard's
Parquet key-value metadata ``clasp`` (JSON) holds ``labelset``, ``rows``, ``undecodable`` (keys) and
``image_shard_digest`` (``image_shard_digests``: which ingest of its tar the labels were made from).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ClaspError

SHARD_DIGITS = 6
MANIFEST_COLUMNS = ("key", "shard", "index", "width", "height", "n_bytes", "content_hash", "source")
LABELSET_FILE = "labelset.json"
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.csv"


def shard_stem(corpus: str, index: int) -> str:
    """``<corpus>-NNNNNN``: the shared stem of an image shard and its label shard."""
    return f"{corpus}-{index:0{SHARD_DIGITS}d}"


def images_dir(root: str | Path, corpus: str) -> Path:
    return Path(root) / corpus / "images"


def labels_dir(root: str | Path, corpus: str, labelset: str | None = None) -> Path:
    base = Path(root) / corpus / "labels"
    return base / labelset if labelset else base


def image_shard_path(root: str | Path, corpus: str, index: int) -> Path:
    return images_dir(root, corpus) / f"{shard_stem(corpus, index)}.tar"


def label_shard_path(root: str | Path, corpus: str, labelset: str, index: int) -> Path:
    return labels_dir(root, corpus, labelset) / f"{shard_stem(corpus, index)}.parquet"


def shard_index(path: str | Path) -> int:
    """Shard number from a shard file name (``luperson-000012.tar`` -> 12)."""
    stem = Path(path).name.split(".")[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: not a shard file name of the form <corpus>-{'N' * SHARD_DIGITS}.<ext>") from None


def read_sizes(root: str | Path, corpus: str) -> dict[str, int]:
    """``sizes.json`` of an ingested corpus: shard file name -> image count (sorted by name)."""
    path = images_dir(root, corpus) / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: corpus '{corpus}' has not been ingested under {root} (run `clasp ingest`)"
        )
    sizes = json.loads(path.read_text())
    return dict(sorted(sizes.items()))


def image_shard_digests(root: str | Path, corpus: str) -> dict[str, str]:
    """Shard file name -> sha256 of its manifest rows (``key`` and ``content_hash``, in shard order).

    Identifies what an ingest put in each tar: a label shard made from another ingest of the same tar
    (``clasp ingest --overwrite``) carries another digest, even when its row count matches. Streams the
    manifest one row group (= one shard) at a time.
    """
    path = images_dir(root, corpus) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: corpus '{corpus}' has no complete ingest (run `clasp ingest`)")
    hashers: dict[int, Any] = {}
    manifest = pq.ParquetFile(path)
    for group in range(manifest.num_row_groups):
        rows = manifest.read_row_group(group, columns=["shard", "key", "content_hash"]).to_pydict()
        for shard, key, content_hash in zip(rows["shard"], rows["key"], rows["content_hash"], strict=True):
            hashers.setdefault(shard, hashlib.sha256()).update(f"{key}\t{content_hash}\n".encode())
    return {image_shard_path(root, corpus, shard).name: h.hexdigest() for shard, h in sorted(hashers.items())}


def read_labelset(root: str | Path, corpus: str, labelset: str) -> dict:
    path = labels_dir(root, corpus, labelset) / LABELSET_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: label set '{labelset}' is missing or incomplete (run `clasp label`)"
        )
    return json.loads(path.read_text())


def latest_labelset(root: str | Path, corpus: str) -> str:
    """Id of the most recently completed CLIP label set of a corpus (one with a labelset.json).

    Ground-truth label sets of the synthetic world (``labeling.oracle``, ``"ground_truth": true``) are
    never picked implicitly: they are an ablation's upper bound and must be named explicitly.
    """
    base = labels_dir(root, corpus)
    done = [p.parent for p in base.glob(f"*/{LABELSET_FILE}")] if base.is_dir() else []
    done = [p for p in done if not _is_ground_truth(p / LABELSET_FILE)]
    if not done:
        raise FileNotFoundError(f"no completed label set under {base} (run `clasp label --corpus {corpus}`)")
    return max(done, key=lambda p: (p / LABELSET_FILE).stat().st_mtime).name


def _is_ground_truth(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("ground_truth"))
    except (OSError, ValueError):
        return False


def label_schema(num_attributes: int, part_names: list[str], with_embed: bool = False) -> pa.Schema:
    """Arrow schema of a label shard; ``part_names[0]`` is the background class."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("attr_prob", pa.list_(pa.uint8(), num_attributes), nullable=False),
        pa.field("part_map", pa.binary(), nullable=False),
        pa.field("part_conf", pa.binary(), nullable=False),
        pa.field("fg_ratio", pa.float32(), nullable=False),
    ]
    for name in part_names[1:]:
        fields.append(pa.field(f"area_{name}", pa.uint8(), nullable=False))
    for name in part_names[1:]:
        fields.append(pa.field(f"row_{name}", pa.uint8(), nullable=True))
    if with_embed:
        fields.append(pa.field("clip_embed", pa.binary(), nullable=True))
    return pa.schema(fields)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is fsynced and renamed onto ``path``.

    A crash leaves only ``*.tmp-<pid>`` files, which readers ignore, so a partial output is never
    mistaken for a complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty sibling folder ``<name>.tmp-<pid>``; when the block succeeds it is renamed onto ``path``.

    A folder already at ``path`` must be empty unless ``replace``; it stays in place until the new one is
    complete (then it is moved aside and deleted). A failure removes the temporary folder, so a partial output
    never stands under the final name and nothing is left behind.
    """
    path = Path(os.path.abspath(path))  # "." has no name to put a sibling beside
    if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not replace:
        raise ClaspError(f"{path} already exists and is not empty; delete it or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f"{path.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_json_input(source: object, what: str) -> object:
    """A JSON file path (str/Path) -> its parsed content; anything else is returned as given (already loaded)."""
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ClaspError(f"{what} file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ClaspError(f"{what} file {path} is not valid JSON: {exc}") from None
    return source


def write_json_atomic(path: str | Path, obj: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)
