"""Writers for the real datasets' on-disk formats: LUPerson LMDB, PA-100K annotation.mat, ground truth.

- LMDB as LUPerson's ``convert_lmdb.py`` makes it: one key per image (ASCII), the value is the JPEG file's
  bytes unchanged, and ``keys.pkl`` (a pickled ``list[str]`` of the keys in write order). We keep
  ``keys.pkl`` inside the LMDB folder; the original script drops it in its working directory.
- ``annotation.mat`` with PA-100K's field names: ``attributes`` (26x1 cell of names), ``{train,val,test}
  _images_name`` (Nx1 cells of file names) and ``{train,val,test}_label`` (NxA uint8 0/1).
- ground truth Parquet (``GT_SCHEMA``), one row per image; readable by pyarrow/DuckDB without project code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io

from pipeline.formats import atomic_path
from pipeline.synth.look import ATTRIBUTES

GT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # LMDB key / WebDataset key of the image
        pa.field("source", pa.string(), nullable=False),  # path under the dataset folder (e.g. luperson/)
        pa.field("split", pa.string(), nullable=False),  # "" (corpus), train/test/query, train/val/test
        pa.field("identity", pa.int32(), nullable=False),  # person id (Market: -1 junk, 0 distractor)
        pa.field("camera", pa.int32(), nullable=False),  # camera index (Market: 1..6 as in the file name)
        pa.field("view", pa.string(), nullable=False),  # front | back | side
        pa.field("attributes", pa.list_(pa.uint8(), len(ATTRIBUTES)), nullable=False),  # 0/1, PA-100K order
        pa.field("keypoints", pa.list_(pa.float32(), 51), nullable=False),  # 17 COCO x, y, visibility (pixels)
        pa.field("part_mask", pa.binary(), nullable=False),  # PNG of an HxW uint8 mask, ids of parts.yaml
        pa.field("caption", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)


class LmdbWriter:
    """Streams ``key -> JPEG bytes`` into an LMDB folder, then writes ``keys.pkl`` beside ``data.mdb``."""

    def __init__(self, path: Path, expected_images: int) -> None:
        import lmdb

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # map_size is only an upper bound (the file grows sparsely); 512 KiB per image is far above any crop
        self.env = lmdb.open(str(path), map_size=max(1 << 26, expected_images * (1 << 19)), subdir=True)
        self.txn = self.env.begin(write=True)
        self.keys: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.txn.put(key.encode("ascii"), data)
        self.keys.append(key)
        if len(self.keys) % 1000 == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def close(self) -> None:
        self.txn.commit()
        self.env.sync()
        self.env.close()
        with open(self.path / "keys.pkl", "wb") as fh:
            pickle.dump(self.keys, fh)


def write_pa100k_mat(path: Path, names: dict[str, list[str]], labels: dict[str, np.ndarray]) -> None:
    """``annotation.mat`` in PA-100K's layout; ``names``/``labels`` keyed by ``train``/``val``/``test``."""

    def cell(items: list[str]) -> np.ndarray:
        out = np.empty((len(items), 1), dtype=object)
        for i, item in enumerate(items):
            out[i, 0] = np.array([item])
        return out

    content: dict[str, np.ndarray] = {"attributes": cell(list(ATTRIBUTES))}
    for split in ("train", "val", "test"):
        content[f"{split}_images_name"] = cell(names[split])
        content[f"{split}_label"] = np.asarray(labels[split], dtype=np.uint8).reshape(-1, len(ATTRIBUTES))
    buf = io.BytesIO()
    scipy.io.savemat(buf, content, do_compression=False)
    data = bytearray(buf.getvalue())
    # The 116-byte text header carries a creation time; a fixed text keeps the file byte-identical per seed.
    data[:116] = b"MATLAB 5.0 MAT-file, written by clasp synth".ljust(116)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(data))


class GtWriter:
    """Streams ground-truth rows (dicts with ``GT_SCHEMA`` fields) into one Parquet file, a row group per
    ``rows_per_group`` rows, so memory stays flat however large the world is."""

    def __init__(self, path: Path, rows_per_group: int = 2048) -> None:
        self.writer = pq.ParquetWriter(str(path), GT_SCHEMA, compression="zstd")
        self.rows_per_group = rows_per_group
        self.pending: list[dict] = []

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            columns = {f.name: [r[f.name] for r in self.pending] for f in GT_SCHEMA}
            self.writer.write_table(pa.Table.from_pydict(columns, schema=GT_SCHEMA))
            self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
