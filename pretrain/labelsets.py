"""Which shards a pre-training stream reads: the label set (resolved, its grid and vocabularies) and the
image shards paired with their label shards, checked before training starts.

``ROOT/<corpus>/images/<corpus>-NNNNNN.tar`` pairs with ``ROOT/<corpus>/labels/<labelset>/<corpus>-NNNNNN.parquet``
(same rows, same order; DESIGN.md 2.2). ``pretrain.data`` streams them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import formats
from pipeline.errors import ClaspError


class LabelMismatchError(ClaspError):
    """An image shard and its label shard disagree on which image a row belongs to."""


@dataclass(frozen=True)
class Shard:
    """An image shard, its label shard and its image count (sizes.json)."""

    tar: str
    labels: str
    size: int


@dataclass(frozen=True)
class LabelSetInfo:
    """What the stream needs to know about a label set (from labelset.json and the shard schema)."""

    labelset: str
    grid_hw: tuple[int, int]
    attributes: tuple[str, ...]
    parts: tuple[str, ...]
    flip_map: tuple[int, ...] | None  # class id -> class id after a horizontal flip; None = identity
    clip: dict | None = None  # labelset.json "model" (arch, weights, weights_id, logit_scale, ...) + "resolution"
    clip_embed_dim: int = 0  # width of clip_embed when the stream reads it, else 0


def _names(section: Any) -> tuple[str, ...]:
    """Names of a labelset.json vocabulary section: ``{"names": [...]}``, or a list of names / ``{name: ...}``."""
    entries = section["names"] if isinstance(section, dict) else section
    return tuple(e["name"] if isinstance(e, dict) else str(e) for e in entries)


def _flip_pairs(section: Any) -> dict[str, str]:
    """Left/right pairs of a part section: ``{"flip": {a: b}}`` or entries ``{name, flip}``."""
    if isinstance(section, dict):
        return dict(section.get("flip") or {})
    return {e["name"]: e["flip"] for e in section if isinstance(e, dict) and e.get("flip")}


def build_flip_map(parts: Sequence[str], pairs: dict[str, str]) -> tuple[int, ...] | None:
    """Class-id permutation for horizontal flips from name pairs (``{left_arm: right_arm}``), symmetric."""
    if not pairs:
        return None
    index = {name: i for i, name in enumerate(parts)}
    mapping = list(range(len(parts)))
    for a, b in pairs.items():
        if a not in index or b not in index:
            missing = a if a not in index else b
            raise ClaspError(f"part flip pair {a}<->{b}: '{missing}' is not a part class ({', '.join(parts)})")
        mapping[index[a]], mapping[index[b]] = index[b], index[a]
    return tuple(mapping)


def read_labelset_info(root: str | Path, corpus: str, labelset: str | None, part_flip: dict[str, str]) -> LabelSetInfo:
    """Resolve the label set (None = the latest completed one) and read its grid and vocabularies."""
    if not formats.images_dir(root, corpus).is_dir():
        raise ClaspError(
            f"data.root={root}, data.corpus={corpus}: {formats.images_dir(root, corpus)} does not exist; "
            "fix data.root / data.corpus, or run `clasp ingest` and `clasp label` first"
        )
    try:
        labelset = labelset or formats.latest_labelset(root, corpus)
        meta = formats.read_labelset(root, corpus, labelset)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    where = formats.labels_dir(root, corpus, labelset) / formats.LABELSET_FILE
    try:
        grid = tuple(int(v) for v in meta["grid"])
        attributes = _names(meta["attributes"])
        parts = _names(meta["parts"])
        pairs = {**_flip_pairs(meta["parts"]), **part_flip}
    except (KeyError, TypeError, ValueError) as exc:
        raise ClaspError(f"{where}: missing or malformed field {exc}; re-run `clasp label`") from None
    clip = {**meta["model"], "resolution": meta.get("resolution")} if isinstance(meta.get("model"), dict) else None
    return LabelSetInfo(labelset, (grid[0], grid[1]), attributes, parts, build_flip_map(parts, pairs), clip)


def list_shards(root: str | Path, corpus: str, labelset: str) -> list[Shard]:
    """The corpus's (image tar, label parquet, image count) in sizes.json order; a missing label shard is an error."""
    try:
        sizes = formats.read_sizes(root, corpus)
    except FileNotFoundError as exc:
        raise ClaspError(str(exc)) from None
    shards, missing = [], []
    for name, count in sizes.items():
        index = formats.shard_index(name)
        labels = formats.label_shard_path(root, corpus, labelset, index)
        if not labels.is_file():
            missing.append(labels.name)
        shards.append(Shard(str(formats.images_dir(root, corpus) / name), str(labels), int(count)))
    if missing:
        raise ClaspError(
            f"label set '{labelset}' of corpus '{corpus}' lacks {len(missing)} of {len(sizes)} label shards "
            f"(e.g. {missing[0]} in {formats.labels_dir(root, corpus, labelset)}); finish `clasp label` first"
        )
    if not shards:
        raise ClaspError(f"{formats.images_dir(root, corpus) / formats.SIZES_FILE} lists no shards")
    for shard in shards:
        _check_label_footer(shard.labels, shard.tar, shard.size)
    return shards


def _check_label_footer(labels: str, tar: str, count: int) -> None:
    """Refuse, before training starts, a label shard that does not read or has another row count than its tar.

    Only the Parquet footer is read (cheap for thousands of shards); key-by-key agreement is checked as
    the stream reads each shard (LabelMismatchError).
    """
    try:
        rows = pq.read_metadata(labels).num_rows
    except (OSError, ValueError) as exc:
        raise ClaspError(
            f"label shard {labels} is unreadable ({exc}); re-run `clasp label` for this corpus, it relabels that shard"
        ) from None
    if rows != count:
        raise LabelMismatchError(
            f"label shard {labels} has {rows} rows but image shard {tar} has {count} images (sizes.json): the labels "
            "were made for a different ingest; re-run `clasp label` for this corpus"
        )


EMBED_COLUMN = "clip_embed"  # optional: fp16 CLIP image embedding (`clasp label --store-embeddings`)


def clip_embed_width(shards: Sequence[Shard], labelset: str) -> int:
    """Width of the stored CLIP embedding; every label shard must have the column (footers and one row read)."""
    for shard in shards:
        if EMBED_COLUMN not in pq.read_schema(shard.labels).names:
            raise ClaspError(
                f"model.loss.distill=true but label set '{labelset}' stores no CLIP embeddings ({shard.labels} has no "
                f"{EMBED_COLUMN} column): label the corpus again with `clasp label --store-embeddings` (a new label "
                "set; give it as data.labelset) or set model.loss.distill=false"
            )
    first = next((s for s in shards if s.size > 0), shards[0])
    value = pq.read_table(first.labels, columns=[EMBED_COLUMN]).column(0)[0].as_py()
    if not value or len(value) % 2:
        raise ClaspError(f"{first.labels}: {EMBED_COLUMN} of row 0 is not float16 bytes; re-run `clasp label`")
    return len(value) // 2
