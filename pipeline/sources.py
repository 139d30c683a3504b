"""Image sources for ``clasp ingest``: a folder, an LMDB (LUPerson's ``convert_lmdb.py`` layout) or a list file.

Each source is described in two steps so the listing (cheap, in the main process) and the reading
(expensive, in worker processes) can be separated:

* ``list_source(format, path)`` returns every candidate image as ``(key, source)`` sorted by key, where
  ``source`` is the image's identity inside the source (a relative path, a list entry as written, or
  the LMDB key) and ``key`` is the WebDataset-safe sample key derived from it (``make_key``);
* ``SourceReader(format, path)`` returns the encoded bytes of one ``source``.

Header validation (``probe_image``) reads the few bytes that matter instead of decoding pixels: the JPEG
marker segments up to the first scan (frame size) and the End-Of-Image marker after it (truncation), or
the PNG IHDR and IEND chunks.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ClaspError

FORMATS = ("folder", "lmdb", "list")
# Files with these suffixes are candidates; anything else in a folder is ignored (and counted).
# Only JPEG and PNG are stored; the other formats are listed so they are rejected with a clear reason.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def make_key(source: str) -> str:
    """WebDataset-safe key of a source identity: ``ES/madrid/v01/f0003.jpg`` -> ``ES_madrid_v01_f0003``.

    A known image suffix is dropped, path components are joined with ``_`` and every character outside
    ``[A-Za-z0-9_-]`` becomes ``_`` (WebDataset splits a member name at its first dot).
    """
    stem = source
    lower = stem.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    parts = [p for p in re.split(r"[/\\]", stem) if p not in ("", ".")]
    return _UNSAFE.sub("_", "_".join(parts))


@dataclass
class Listing:
    """Candidates of one source, sorted by key, plus the count of files skipped for their suffix."""

    items: list[tuple[str, str]]
    ignored: int = 0


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _list_folder(root: Path) -> Listing:
    if not root.is_dir():
        raise ClaspError(f"--source {root}: not a directory (use --format lmdb or list for other sources)")
    items: list[tuple[str, str]] = []
    ignored = 0
    seen_dirs: set[tuple[int, int]] = set()
    # followlinks: datasets are often assembled from symlinked folders; the inode set stops link loops.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            if name.startswith("."):  # .DS_Store, AppleDouble ._x.jpg, our own temporary files
                continue
            if _has_image_suffix(name):
                rel = prefix + name
                items.append((make_key(rel), rel))
            else:
                ignored += 1
    return Listing(items, ignored)


def _list_file_entries(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise ClaspError(f"--source {list_file}: not a file (a list source is a text file, one image path a line)")
    entries = []
    with open(list_file, encoding="utf-8") as fh:
        for line in fh:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                entries.append(entry)
    return entries


def resolve_list_entry(list_dir: Path, entry: str) -> Path:
    """A list entry as a path: relative entries are relative to the list file's folder."""
    path = Path(entry)
    return path if path.is_absolute() else list_dir / path


def _list_key_path(list_dir: Path, entry: str) -> str:
    """Identity used for the key: the path under the list file's folder, else the whole absolute path."""
    full = os.path.normpath(resolve_list_entry(list_dir, entry))
    rel = os.path.relpath(full, os.path.normpath(list_dir))
    return full.lstrip("/") if rel.startswith("..") else rel


def _list_list(list_file: Path) -> Listing:
    list_dir = list_file.parent
    items = [(make_key(_list_key_path(list_dir, e)), e) for e in _list_file_entries(list_file)]
    return Listing(items)


def _open_lmdb(path: Path):  # noqa: ANN202 - lmdb.Environment has no stub
    import lmdb

    if not path.exists():
        raise ClaspError(f"--source {path}: no such LMDB (a directory with data.mdb, or a single .mdb file)")
    subdir = path.is_dir()
    if subdir and not (path / "data.mdb").is_file():
        raise ClaspError(f"--source {path}: directory has no data.mdb, so it is not an LMDB environment")
    try:
        return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as exc:
        raise ClaspError(f"--source {path}: cannot open as LMDB: {exc}") from None


def _list_lmdb(path: Path) -> Listing:
    env = _open_lmdb(path)
    items = []
    try:
        with env.begin(buffers=False) as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                try:
                    name = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ClaspError(f"{path}: LMDB key {raw!r} is not UTF-8; keys must be text") from None
                items.append((make_key(name), name))
    finally:
        env.close()
    return Listing(items)


def list_source(fmt: str, path: str | Path) -> Listing:
    """Every candidate image of a source as ``(key, source)``, sorted by key; key collisions are an error."""
    path = Path(path)
    if fmt == "folder":
        listing = _list_folder(path)
    elif fmt == "lmdb":
        listing = _list_lmdb(path)
    elif fmt == "list":
        listing = _list_list(path)
    else:
        raise ClaspError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    listing.items.sort()
    _check_unique(listing.items, fmt, path)
    return listing


def _check_unique(items: list[tuple[str, str]], fmt: str, path: Path) -> None:
    clashes = [(a, b) for a, b in zip(items, items[1:], strict=False) if a[0] == b[0]]
    if not clashes:
        return
    shown = "; ".join(f"'{a[1]}' and '{b[1]}' -> key '{a[0]}'" for a, b in clashes[:5])
    more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
    raise ClaspError(
        f"{path}: {len(clashes)} key collision(s) in {fmt} source: {shown}{more}. Keys are the path without its "
        "image suffix, '/' and characters outside [A-Za-z0-9_-] replaced by '_'; rename or remove one of each pair"
    )


class SourceReader:
    """Reads the encoded bytes of one source identity; one instance per worker process."""

    def __init__(self, fmt: str, path: str | Path) -> None:
        self.fmt = fmt
        self.path = Path(path)
        self._env = _open_lmdb(self.path) if fmt == "lmdb" else None
        self._txn = self._env.begin(buffers=False) if self._env is not None else None
        self._list_dir = self.path.parent

    def read(self, source: str) -> bytes | None:
        """The bytes of ``source``; ``None`` if an LMDB key has no value. File errors raise OSError."""
        if self.fmt == "folder":
            return (self.path / source).read_bytes()
        if self.fmt == "list":
            return resolve_list_entry(self._list_dir, source).read_bytes()
        return self._txn.get(source.encode("utf-8"))

    def close(self) -> None:
        if self._env is not None:
            self._txn.abort()
            self._env.close()
            self._env = self._txn = None


# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@dataclass(frozen=True)
class Probe:
    """What a header check found: ``ext`` ('jpg' | 'png') and size, or ``reason`` for a reject."""

    ext: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""


def _probe_jpeg(data: bytes) -> Probe:
    n = len(data)
    i = 2
    size = None
    while True:
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes before a marker
        if i + 1 >= n:
            return Probe(reason="truncated JPEG (ends inside the header segments)")
        if data[i] != 0xFF:
            return Probe(reason=f"corrupt JPEG (no marker at byte {i})")
        marker = data[i + 1]
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == 0xD9:
            return Probe(reason="corrupt JPEG (end-of-image before any scan)")
        if i + 4 > n:
            return Probe(reason="truncated JPEG (ends inside the header segments)")
        (length,) = struct.unpack_from(">H", data, i + 2)
        end = i + 2 + length
        if length < 2 or end > n:
            return Probe(reason="truncated JPEG (ends inside the header segments)")
        if marker in _SOF_MARKERS:
            if length < 7:
                return Probe(reason="corrupt JPEG (short frame header)")
            height, width = struct.unpack_from(">HH", data, i + 5)
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                return Probe(reason="corrupt JPEG (scan before any frame header)")
            # 0xFF inside entropy data is always stuffed (FF00) or a restart marker, so an FFD9 after the
            # first scan can only be the End-Of-Image marker: its absence means the file was cut short.
            if data.rfind(b"\xff\xd9", end) < 0:
                return Probe(reason="truncated JPEG (no end-of-image marker after the scan data)")
            width, height = size
            if width == 0 or height == 0:
                return Probe(reason=f"unsupported JPEG (frame size {width}x{height})")
            return Probe(ext="jpg", width=width, height=height)
        i = end


def _probe_png(data: bytes) -> Probe:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return Probe(reason="truncated PNG (no IHDR chunk)")
    width, height = struct.unpack_from(">II", data, 16)
    if data.rfind(_PNG_IEND, 33) < 0:
        return Probe(reason="truncated PNG (no IEND chunk)")
    if width == 0 or height == 0:
        return Probe(reason=f"corrupt PNG (size {width}x{height})")
    return Probe(ext="png", width=width, height=height)


def probe_image(data: bytes, full_decode: bool = False) -> Probe:
    """Format, size and integrity of encoded image bytes, from the headers and end marker only.

    ``full_decode`` additionally decodes the pixels with PIL (slow; catches corrupt entropy data).
    """
    if not data:
        return Probe(reason="empty file")
    if data[:3] == b"\xff\xd8\xff":
        probe = _probe_jpeg(data)
    elif data[:8] == _PNG_SIGNATURE:
        probe = _probe_png(data)
    else:
        return Probe(reason=_identify_other(data))
    if probe.reason or not full_decode:
        return probe
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return Probe(reason=f"decode failed: {type(exc).__name__}: {exc}")
    return probe


def _identify_other(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
    except (UnidentifiedImageError, OSError, ValueError):
        return "not an image (unrecognised header)"
    return f"unsupported image format {kind} (only JPEG and PNG are stored; convert it)"
