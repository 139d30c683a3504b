"""Random access to the images of ingested WebDataset shards, in shard order, for DataLoader workers.

The main process walks each tar's headers once (``index_shard``: key, byte offset and size of every
image member, in member order, which is the shard's row order). Workers then read and decode any
image by offset, so all workers help with every shard while the DataLoader keeps the order.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ClaspError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardIndex:
    path: Path
    keys: list[str]
    offsets: np.ndarray  # byte offset of each image's data in the tar
    sizes: np.ndarray  # byte size of each image


def index_shard(path: str | Path) -> ShardIndex:
    """Keys and byte ranges of a tar's image members, in member order (key = name up to the first dot)."""
    path = Path(path)
    keys, offsets, sizes, seen = [], [], [], set()
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                prefix = member.name[: len(member.name) - len(base)]
                key = prefix + stem
                if ext.lower() not in IMAGE_EXTENSIONS or key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                offsets.append(member.offset_data)
                sizes.append(member.size)
    except (OSError, tarfile.TarError) as exc:
        raise ClaspError(f"{path}: not a readable tar shard ({exc}); re-run `clasp ingest` for this corpus") from None
    return ShardIndex(path, keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))


def decode_image(data: bytes, resolution: tuple[int, int]) -> torch.Tensor:
    """Encoded bytes -> (3, H, W) uint8 RGB at ``resolution`` (bilinear, aspect not preserved: crops are ~2:1)."""
    h, w = resolution
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (w, h))  # JPEG: let libjpeg decode at a reduced scale when the source is larger
        img = img.convert("RGB").resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ShardImages(torch.utils.data.Dataset):
    """Item i = i-th image over the concatenated shards; returns (i, image uint8, decoded ok)."""

    def __init__(self, indices: list[ShardIndex], resolution: tuple[int, int]) -> None:
        self.indices = indices
        self.resolution = tuple(resolution)
        self.starts = np.cumsum([0] + [len(i.keys) for i in indices])
        self._handle: tuple[Path, object] | None = None  # one open shard per worker

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, path: Path, offset: int, size: int) -> bytes:
        if self._handle is None or self._handle[0] != path:
            if self._handle is not None:
                self._handle[1].close()
            self._handle = (path, open(path, "rb"))  # noqa: SIM115 - kept open across items on purpose
        fh = self._handle[1]
        fh.seek(offset)
        return fh.read(size)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool]:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        idx, j = self.indices[s], i - int(self.starts[s])
        data = self._read(idx.path, int(idx.offsets[j]), int(idx.sizes[j]))
        try:
            return i, decode_image(data, self.resolution), True
        except (OSError, ValueError, Image.DecompressionBombError):
            return i, torch.zeros(3, *self.resolution, dtype=torch.uint8), False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None  # file handles do not travel to worker processes
        return state
