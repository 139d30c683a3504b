"""Re-ID dataset readers for the official on-disk layouts.

Layouts (``--data`` may point at the folder itself or at a parent that holds it):

- ``market1501``: ``Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}/*.jpg``, names
  ``<pid>_c<cam>s<seq>_<frame>_<n>.jpg``; pid -1 = junk (dropped), 0 = distractor (kept in the gallery).
- ``dukemtmc``: ``DukeMTMC-reID/{bounding_box_train,bounding_box_test,query}/<pid>_c<cam>_f<frame>.jpg``.
- ``cuhk03-np-labeled`` / ``cuhk03-np-detected``: ``cuhk03-np/{labeled,detected}/{bounding_box_train,
  bounding_box_test,query}/<pid>_c<cam>_<n>.png`` (the new protocol of Zhong et al. 2017, 767/700 ids).
- ``msmt17``: ``MSMT17_V1/{train,test}/`` or ``MSMT17_V2/{mask_train_v2,mask_test_v2}/`` plus
  ``list_{train,val,query,gallery}.txt`` (lines ``<pid>/<name>.jpg <pid>``; camera = 3rd ``_`` field of the
  name). V1 and V2 hold the same images (V2 has blurred faces); which one was read is stated in every
  result. Training uses list_train + list_val by default (TransReID / SOLIDER), ``with_val=False`` gives
  torchreid's list_train only.

Camera ids are 0-based; training identities are relabelled 0..C-1; query/gallery keep their ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ClaspError

MARKET_DIRS = ("bounding_box_train", "bounding_box_test", "query")
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
_NAME_RE = re.compile(r"^([-\d]+)_c(\d+)")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")

# name -> (folder names to look for under --data, sub-folder inside it, expected max camera id)
_MARKET_STYLE = {
    "market1501": (("Market-1501-v15.09.15", "market1501", "Market-1501"), "", 6),
    "dukemtmc": (("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid"), "", 8),
    "cuhk03-np-labeled": (("cuhk03-np", "CUHK03-NP", "cuhk03_np"), "labeled", 2),
    "cuhk03-np-detected": (("cuhk03-np", "CUHK03-NP", "cuhk03_np"), "detected", 2),
}
REID_DATASETS = (*_MARKET_STYLE, "msmt17")

Item = tuple[str, int, int]  # (image path, person id, 0-based camera id)


@dataclass
class ReidData:
    """Train / query / gallery lists of one re-ID dataset and a statement of the layout that was read."""

    name: str
    root: Path
    layout: str
    train: list[Item] = field(default_factory=list)
    query: list[Item] = field(default_factory=list)
    gallery: list[Item] = field(default_factory=list)

    @property
    def num_train_ids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def num_cameras(self) -> int:
        return len({cam for part in (self.train, self.query, self.gallery) for _, _, cam in part})

    def summary(self) -> dict[str, int]:
        return {
            "train_images": len(self.train),
            "train_ids": self.num_train_ids,
            "query_images": len(self.query),
            "query_ids": len({p for _, p, _ in self.query}),
            "gallery_images": len(self.gallery),
            "gallery_ids": len({p for _, p, _ in self.gallery}),
            "cameras": self.num_cameras,
        }


def load_reid_dataset(name: str, root: str | Path, *, msmt17_with_val: bool = True) -> ReidData:
    """Read dataset ``name`` (one of REID_DATASETS) from ``root``; ClaspError names any missing path."""
    key = name.lower().replace("_", "-")
    root = Path(root)
    if not root.is_dir():
        raise ClaspError(f"re-ID data folder {root} does not exist (pass --data pointing at the {name} folder)")
    if key == "msmt17":
        return _read_msmt17(root, with_val=msmt17_with_val)
    if key in _MARKET_STYLE:
        return _read_market_style(key, root)
    raise ClaspError(f"unknown re-ID dataset '{name}': choose one of {', '.join(REID_DATASETS)}")


def _find_market_root(key: str, root: Path) -> Path:
    names, sub, _ = _MARKET_STYLE[key]
    candidates = [root / sub] if sub else [root]
    for n in names:
        candidates.append(root / n / sub if sub else root / n)
        for inner in names:  # e.g. market1501/Market-1501-v15.09.15 (torchreid's convention)
            candidates.append(root / n / inner / sub if sub else root / n / inner)
    for cand in candidates:
        if all((cand / d).is_dir() for d in MARKET_DIRS):
            return cand
    partial = [c for c in candidates if c.is_dir() and any((c / d).is_dir() for d in MARKET_DIRS)]
    if partial:
        missing = [str(partial[0] / d) for d in MARKET_DIRS if not (partial[0] / d).is_dir()]
        raise ClaspError(f"{key} layout under {partial[0]} is incomplete: missing {', '.join(missing)}")
    expected = f"{names[0]}/{sub + '/' if sub else ''}{{{','.join(MARKET_DIRS)}}}/"
    raise ClaspError(f"no {key} folders under {root}: expected {root}/{expected} (or those folders directly in {root})")


def _read_market_style(key: str, root: Path) -> ReidData:
    base = _find_market_root(key, root)
    max_cam = _MARKET_STYLE[key][2]
    train = _scan_folder(base / "bounding_box_train", max_cam)
    query = _scan_folder(base / "query", max_cam)
    gallery = _scan_folder(base / "bounding_box_test", max_cam)
    layout = f"{key}: {base.name}/{{bounding_box_train,bounding_box_test,query}} (junk id -1 dropped, id 0 kept)"
    return ReidData(key, base, layout, _relabel(train), query, gallery)


def _scan_folder(folder: Path, max_cam: int) -> list[Item]:
    items: list[Item] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in _IMAGE_EXTS:
            continue
        match = _NAME_RE.match(path.name)
        if match is None:
            raise ClaspError(f"{path}: file name does not start with '<pid>_c<camera>' as the dataset names its images")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1:
            continue  # junk detections: excluded from evaluation by the official protocol
        if not 1 <= cam <= max_cam:
            raise ClaspError(f"{path}: camera {cam} outside 1..{max_cam}; is this the right dataset name?")
        items.append((str(path), pid, cam - 1))
    if not items:
        raise ClaspError(f"{folder} holds no images named '<pid>_c<camera>...' ({'/'.join(_IMAGE_EXTS)})")
    return items


def _relabel(items: list[Item]) -> list[Item]:
    labels = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, labels[pid], cam) for path, pid, cam in items]


def _read_msmt17(root: Path, *, with_val: bool) -> ReidData:
    bases = [root / v for v in MSMT_VERSIONS] + [root / "msmt17" / v for v in MSMT_VERSIONS] + [root]
    for base in bases:
        if not base.is_dir():
            continue
        version = base.name if base.name in MSMT_VERSIONS else _guess_version(base)
        if version is None:
            continue
        train_dir, test_dir = (base / d for d in MSMT_VERSIONS[version])
        missing = [str(p) for p in (train_dir, test_dir, *(base / n for n in MSMT_LISTS)) if not p.exists()]
        if missing:
            raise ClaspError(f"MSMT17 ({version}) layout under {base} is incomplete: missing {', '.join(missing)}")
        train = _read_msmt_list(base / "list_train.txt", train_dir)
        if with_val:
            train += _read_msmt_list(base / "list_val.txt", train_dir)
        query = _read_msmt_list(base / "list_query.txt", test_dir)
        gallery = _read_msmt_list(base / "list_gallery.txt", test_dir)
        split = "list_train+list_val" if with_val else "list_train"
        layout = f"msmt17 {version} ({'/'.join(MSMT_VERSIONS[version])}, list_*.txt; training on {split})"
        return ReidData("msmt17", base, layout, _relabel(train), query, gallery)
    raise ClaspError(
        f"no MSMT17 folders under {root}: expected {root}/MSMT17_V1/{{train,test,list_*.txt}} "
        f"or {root}/MSMT17_V2/{{mask_train_v2,mask_test_v2,list_*.txt}}"
    )


def _guess_version(base: Path) -> str | None:
    """Version of an MSMT17 folder not named MSMT17_V1/V2, from the image folders it holds."""
    if (base / "mask_train_v2").is_dir() or (base / "mask_test_v2").is_dir():
        return "MSMT17_V2"
    if (base / "train").is_dir() or (base / "test").is_dir() or (base / "list_train.txt").is_file():
        return "MSMT17_V1"
    return None


def _read_msmt_list(list_path: Path, image_dir: Path) -> list[Item]:
    items: list[Item] = []
    for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rel, pid = parts[0], int(parts[1])
            cam = int(Path(rel).name.split("_")[2])
        except (IndexError, ValueError):
            raise ClaspError(
                f"{list_path}:{line_no}: expected '<pid>/<pid>_<n>_<camera>_....jpg <pid>', got {line!r}"
            ) from None
        items.append((str(image_dir / rel), pid, cam - 1))
    if not items:
        raise ClaspError(f"{list_path} lists no images")
    return items
