"""Readers for the text-based person search datasets in their released layouts (as IRRA's ``datasets/`` reads them).

``--data`` may point at the dataset folder itself or at a parent holding it under its usual name:

- ``cuhk-pedes``: ``CUHK-PEDES/reid_raw.json`` + ``CUHK-PEDES/imgs/``; entries
  ``{"split": "train"|"val"|"test", "id": int, "file_path": "CUHK01/0363004.png", "captions": [str, ...],
  "processed_tokens": ...}`` (ids 1..13003; 11,003 / 1,000 / 1,000 identities per split).
- ``icfg-pedes``: ``ICFG-PEDES/ICFG-PEDES.json`` + ``imgs/``; the same fields, splits train and test only.
- ``rstpreid``: ``RSTPReid/data_captions.json`` + ``imgs/``; the image is ``"img_path"`` instead of ``"file_path"``.

Each image carries its own captions (usually two). Training items are (image, caption) pairs, one per caption,
with identities relabelled 0..C-1; the evaluation split gives the gallery (its images) and the queries (its
captions), both with their original ids. Bad input is one ``ClaspError`` naming the file, the entry and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ClaspError


@dataclass(frozen=True)
class _Layout:
    folders: tuple[str, ...]  # names the dataset folder usually has
    annotation: str  # the JSON file beside imgs/
    path_key: str  # entry field holding the image path relative to imgs/


LAYOUTS = {
    "cuhk-pedes": _Layout(("CUHK-PEDES", "cuhk_pedes", "cuhk-pedes"), "reid_raw.json", "file_path"),
    "icfg-pedes": _Layout(("ICFG-PEDES", "icfg_pedes", "icfg-pedes"), "ICFG-PEDES.json", "file_path"),
    "rstpreid": _Layout(("RSTPReid", "rstpreid", "RSTPReID"), "data_captions.json", "img_path"),
}
SPLITS = ("train", "val", "test")
IMAGES_DIR = "imgs"

TrainItem = tuple[str, int, str]  # (image path, relabelled person id, caption)


@dataclass
class EvalSplit:
    """The gallery (each image once) and the queries (each caption once) of one evaluation split."""

    images: list[tuple[str, int]] = field(default_factory=list)  # (image path, person id)
    captions: list[tuple[str, int]] = field(default_factory=list)  # (caption, person id)


@dataclass
class TextSearchData:
    name: str
    root: Path
    layout: str
    train: list[TrainItem] = field(default_factory=list)
    train_images: int = 0
    splits: dict[str, EvalSplit] = field(default_factory=dict)  # "val", "test"

    @property
    def num_train_ids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    def summary(self) -> dict[str, int]:
        out = {"train_images": self.train_images, "train_captions": len(self.train), "train_ids": self.num_train_ids}
        for name, split in self.splits.items():
            out[f"{name}_images"] = len(split.images)
            out[f"{name}_captions"] = len(split.captions)
            out[f"{name}_ids"] = len({pid for _, pid in split.images})
        return out


def load_text_search_dataset(name: str, root: str | Path) -> TextSearchData:
    """Read dataset ``name`` (a key of ``LAYOUTS``) from ``root``; every image file must exist."""
    key = name.lower().replace("_", "-")
    if key not in LAYOUTS:
        raise ClaspError(f"unknown text-search dataset '{name}': choose one of {', '.join(LAYOUTS)}")
    spec = LAYOUTS[key]
    base = _find_root(key, Path(root))
    annotation = base / spec.annotation
    entries = _read_entries(annotation)
    images_dir = base / IMAGES_DIR
    by_split: dict[str, list[tuple[Path, int, list[str]]]] = {s: [] for s in SPLITS}
    missing: list[Path] = []
    for index, entry in enumerate(entries):
        split, pid, rel, captions = _check_entry(entry, index, annotation, spec.path_key)
        path = images_dir / rel
        if not path.is_file():
            missing.append(path)
        by_split[split].append((path, pid, captions))
    if missing:
        raise ClaspError(
            f"{len(missing)} image(s) listed in {annotation} are missing (first: {missing[0]}); "
            f"the images belong under {images_dir}/ at the entries' '{spec.path_key}'"
        )
    if not by_split["train"] or not by_split["test"]:
        empty = "train" if not by_split["train"] else "test"
        raise ClaspError(f"{annotation} has no entries with split '{empty}'; text-search needs train and test")
    relabel = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in by_split["train"]}))}
    train = [(str(p), relabel[pid], text) for p, pid, captions in by_split["train"] for text in captions]
    splits = {
        s: EvalSplit(
            images=[(str(p), pid) for p, pid, _ in by_split[s]],
            captions=[(text, pid) for _, pid, captions in by_split[s] for text in captions],
        )
        for s in ("val", "test")
        if by_split[s]
    }
    layout = f"{key}: {base.name}/{spec.annotation} + {IMAGES_DIR}/ (image field '{spec.path_key}')"
    return TextSearchData(key, base, layout, train, len(by_split["train"]), splits)


def _find_root(key: str, root: Path) -> Path:
    spec = LAYOUTS[key]
    if not root.is_dir():
        raise ClaspError(f"text-search data folder {root} does not exist (pass --data pointing at the {key} folder)")
    for cand in (root, *(root / n for n in spec.folders)):
        if (cand / spec.annotation).is_file():
            if not (cand / IMAGES_DIR).is_dir():
                raise ClaspError(f"{cand / spec.annotation} found but its image folder {cand / IMAGES_DIR}/ is missing")
            return cand
    raise ClaspError(
        f"no {spec.annotation} under {root}: expected {root}/{spec.folders[0]}/{spec.annotation} with "
        f"{IMAGES_DIR}/ beside it (or both directly in {root})"
    )


def _read_entries(annotation: Path) -> list[Any]:
    try:
        entries = json.loads(annotation.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClaspError(f"{annotation} is not valid JSON ({exc}); re-download or re-extract the annotation") from None
    if not isinstance(entries, list) or not entries:
        raise ClaspError(f"{annotation} must hold a non-empty JSON list of image entries")
    return entries


def _check_entry(entry: Any, index: int, annotation: Path, path_key: str) -> tuple[str, int, str, list[str]]:
    where = f"{annotation}: entry {index}"
    if not isinstance(entry, dict):
        raise ClaspError(f"{where} is a {type(entry).__name__}, not an object with split/id/{path_key}/captions")
    absent = [k for k in ("split", "id", path_key, "captions") if k not in entry]
    if absent:
        raise ClaspError(f"{where} has no {', '.join(repr(k) for k in absent)} (fields found: {', '.join(entry)})")
    split = entry["split"]
    if split not in SPLITS:
        raise ClaspError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    pid = entry["id"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)) or not str(pid).lstrip("-").isdigit():
        raise ClaspError(f"{where}: id {pid!r} is not an integer person id")
    rel = entry[path_key]
    if not isinstance(rel, str) or not rel:
        raise ClaspError(f"{where}: '{path_key}' must be the image path relative to {IMAGES_DIR}/, got {rel!r}")
    captions = entry["captions"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ClaspError(f"{where}: 'captions' must be a non-empty list of non-empty strings, got {captions!r:.80}")
    return split, int(pid), rel, [c.strip() for c in captions]
