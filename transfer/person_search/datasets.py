"""Person search readers for the official CUHK-SYSU and PRW layouts (data_manifests/cuhk_sysu.yaml, prw.yaml).

``--data`` may point at the dataset folder itself or at a parent holding it. What is read follows OIM's
``psdb`` / SeqNet's dataset code, so the test protocol is the published one:

- ``cuhk_sysu``: ``Image/SSM/*.jpg``; ``annotation/Images.mat`` (every box of every image, [x y w h];
  boxes without area dropped), ``annotation/pool.mat`` (test images; training images are all others),
  ``annotation/test/train_test/Train.mat`` (training identities: boxes of image i matching identity n's
  ``idlocate`` get id n), ``TestG<G>.mat`` (the same queries with galleries of G frames; every file present
  is read, so any of 50 .. 4000 can be evaluated). Test ids are query numbers (SeqNet's convention).
- ``prw``: ``frames/*.jpg``, ``annotations/<frame>.jpg.mat`` (``box_new``, or ``anno_file`` /
  ``anno_previous`` in older releases: rows [id, x, y, w, h], id -2 unlabelled; negative coordinates clipped
  to 0), ``frame_train.mat`` / ``frame_test.mat`` (``img_index_*``), ``query_info.txt`` ("id x y w h frame").

Boxes come out as float32 [x1, y1, x2, y2] in image pixels, ids as int64 with ``UNLABELED`` (-1) for people
without an identity; camera ids are 0-based (PRW's c1..c6; 0 for every CUHK-SYSU image).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ClaspError
from transfer.person_search.metrics import CuhkSysuProtocol, GalleryItem, PrwFrame, PrwQuery

UNLABELED = -1
PERSON_SEARCH_DATASETS = ("cuhk_sysu", "prw")
_CUHK_NAMES = ("cuhk_sysu", "CUHK-SYSU", "cuhk-sysu", "CUHK_SYSU", "dataset")
_PRW_NAMES = ("PRW-v16.04.20", "PRW", "prw")
_TESTG_RE = re.compile(r"^TestG(\d+)\.mat$")
_CAM_RE = re.compile(r"c(\d+)")


@dataclass
class SceneAnnotation:
    """One scene image with its annotated people."""

    name: str
    path: str
    boxes_xyxy: np.ndarray  # (N, 4) float32
    pids: np.ndarray  # (N,) int64, UNLABELED for people without an identity
    cam_id: int = 0


@dataclass
class SearchQueryItem:
    """A query person: the box to search for in its frame."""

    frame: str
    path: str
    box_xyxy: np.ndarray  # (4,) float32
    pid: int
    cam_id: int = 0


@dataclass
class PersonSearchData:
    """Training scenes, test scenes (the gallery pool), queries and the protocol of one person search set."""

    name: str
    root: Path
    layout: str
    train: list[SceneAnnotation] = field(default_factory=list)
    gallery: list[SceneAnnotation] = field(default_factory=list)
    queries: list[SearchQueryItem] = field(default_factory=list)
    cuhk_protocol: CuhkSysuProtocol | None = None  # CUHK-SYSU's per-query galleries

    @property
    def train_ids(self) -> list[int]:
        return sorted({int(p) for s in self.train for p in s.pids if p != UNLABELED})

    def prw_frames(self) -> list[PrwFrame]:
        return [PrwFrame(s.name, s.boxes_xyxy, s.pids, s.cam_id) for s in self.gallery]

    def prw_queries(self) -> list[PrwQuery]:
        return [PrwQuery(q.frame, q.pid, q.cam_id) for q in self.queries]

    def summary(self) -> dict[str, int | list[int]]:
        out: dict[str, int | list[int]] = {
            "train_images": len(self.train),
            "train_boxes": int(sum(len(s.pids) for s in self.train)),
            "train_ids": len(self.train_ids),
            "gallery_images": len(self.gallery),
            "queries": len(self.queries),
            "query_ids": len({q.pid for q in self.queries}),
        }
        if self.cuhk_protocol is not None:
            out["gallery_sizes"] = sorted(self.cuhk_protocol.galleries)
        return out


def load_person_search(name: str, root: str | Path, *, gallery_sizes: Sequence[int] | None = None) -> PersonSearchData:
    """Read dataset ``name`` (cuhk_sysu | prw) from ``root``; ClaspError names any missing file.

    ``gallery_sizes``: the CUHK-SYSU ``TestG<size>.mat`` files to read (None: every one present; the large
    ones are big, so a run reads only the size it evaluates).
    """
    key = name.lower().replace("-", "_")
    root = Path(root)
    if not root.is_dir():
        raise ClaspError(f"person search data folder {root} does not exist (pass --data pointing at the {name} folder)")
    if key == "cuhk_sysu":
        base = _find(root, _CUHK_NAMES, ("Image/SSM", "annotation/Images.mat"), "cuhk_sysu")
        return _read_cuhk_sysu(base, gallery_sizes)
    if key == "prw":
        return _read_prw(_find(root, _PRW_NAMES, ("frames", "annotations", "query_info.txt"), "prw"))
    raise ClaspError(f"unknown person search dataset '{name}': choose one of {', '.join(PERSON_SEARCH_DATASETS)}")


def _find(root: Path, names: tuple[str, ...], needed: tuple[str, ...], key: str) -> Path:
    for cand in (root, *(root / n for n in names)):
        if all((cand / n).exists() for n in needed):
            return cand
    raise ClaspError(f"no {key} layout under {root}: expected {', '.join(needed)} in it or in {root}/{names[0]}/")


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise ClaspError(f"{path} is missing (see data_manifests/ for the expected layout)")
    try:
        return loadmat(path)
    except (ValueError, OSError, NotImplementedError) as exc:
        raise ClaspError(f"cannot read MATLAB file {path}: {exc}") from None


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    boxes = np.asarray(xywh, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _match(boxes_xywh: np.ndarray, box: np.ndarray) -> int:
    """Index of the image box equal (as int32, as SeqNet compares) to ``box``; -1 if none."""
    hits = np.nonzero((boxes_xywh.astype(np.int32) == box.astype(np.int32)).all(axis=1))[0]
    return int(hits[0]) if len(hits) else -1


# --- CUHK-SYSU --------------------------------------------------------------------------------------


def _gallery_sizes(protocol_dir: Path, wanted: Sequence[int] | None) -> list[int]:
    """The gallery sizes to read: every TestG<size>.mat present, or the ``wanted`` ones (all must be present)."""
    sizes = sorted(int(m.group(1)) for p in protocol_dir.glob("TestG*.mat") if (m := _TESTG_RE.match(p.name)))
    if not sizes:
        raise ClaspError(f"no TestG<size>.mat under {protocol_dir} (the real set has TestG50.mat ... TestG4000.mat)")
    if wanted is None:
        return sizes
    missing_sizes = sorted(set(wanted) - set(sizes))
    if missing_sizes or not wanted:
        raise ClaspError(
            f"gallery size(s) {missing_sizes or list(wanted)} asked for, but {protocol_dir} has galleries of "
            f"sizes {sizes} only (TestG<size>.mat); pick one of those"
        )
    return sorted(set(wanted))


def _read_cuhk_sysu(base: Path, wanted: Sequence[int] | None) -> PersonSearchData:
    ann, protocol_dir = base / "annotation", base / "annotation" / "test" / "train_test"
    images = base / "Image" / "SSM"
    boxes_of: dict[str, np.ndarray] = {}  # x, y, w, h
    for item in _loadmat(ann / "Images.mat")["Img"].ravel():
        name = str(item["imname"][0])
        boxes = np.asarray([b[0] for b in item["box"][0]], dtype=np.float64).reshape(-1, 4)
        boxes_of[name] = boxes[(boxes[:, 2] > 0) & (boxes[:, 3] > 0)]
    pids_of = {name: np.full(len(b), UNLABELED, np.int64) for name, b in boxes_of.items()}
    pool = [str(a[0]) for a in _loadmat(ann / "pool.mat")["pool"].ravel()]
    missing = [n for n in pool if n not in boxes_of]
    if missing:
        raise ClaspError(f"{ann / 'pool.mat'} lists {missing[0]} which {ann / 'Images.mat'} does not annotate")

    def assign(name: str, box: np.ndarray, pid: int, source: Path) -> None:
        if name not in boxes_of:
            raise ClaspError(f"{source}: image {name} is not in {ann / 'Images.mat'}")
        index = _match(boxes_of[name], box)
        if index >= 0:
            pids_of[name][index] = pid

    train_mat = protocol_dir / "Train.mat"
    for n, item in enumerate(_loadmat(train_mat)["Train"].ravel()):
        for scene in item[0, 0]["scene"].ravel():
            assign(str(scene["imname"][0]), scene["idlocate"].ravel(), n + 1, train_mat)

    sizes = _gallery_sizes(protocol_dir, wanted)
    query_frames: list[str] = []
    queries: list[SearchQueryItem] = []
    galleries: dict[int, list[list[GalleryItem]]] = {}
    for size in sizes:
        path = protocol_dir / f"TestG{size}.mat"
        protoc = _loadmat(path)[f"TestG{size}"].ravel()
        frames_here, per_query = [], []
        for n, item in enumerate(protoc):
            query = item["Query"][0, 0]
            frame, box = str(query["imname"][0]), query["idlocate"].ravel()
            frames_here.append(frame)
            if size == sizes[0]:
                assign(frame, box, n + 1, path)
                queries.append(SearchQueryItem(frame, str(images / frame), _xyxy(box.astype(np.int32))[0], n + 1))
            gallery: list[GalleryItem] = []
            for entry in item["Gallery"].ravel():
                g_name, g_box = str(entry["imname"][0]), entry["idlocate"].ravel()
                if g_box.size:
                    if size == sizes[0]:
                        assign(g_name, g_box, n + 1, path)
                    gallery.append((g_name, _xyxy(g_box.astype(np.int32))[0].astype(np.float64)))
                else:
                    gallery.append((g_name, None))
            per_query.append(gallery)
        if query_frames and frames_here != query_frames:
            raise ClaspError(f"{path} lists other queries than TestG{sizes[0]}.mat; the protocol files disagree")
        query_frames = frames_here
        galleries[size] = per_query

    def scene(name: str) -> SceneAnnotation:
        return SceneAnnotation(name, str(images / name), _xyxy(boxes_of[name]), pids_of[name])

    pool_set = set(pool)
    train = [scene(n) for n in sorted(boxes_of, key=_natural) if n not in pool_set]
    layout = (
        f"cuhk_sysu: {base.name}/Image/SSM, annotation/{{Images,pool}}.mat, "
        f"test/train_test/{{Train,{','.join(f'TestG{s}' for s in sizes)}}}.mat"
    )
    return PersonSearchData(
        "cuhk_sysu",
        base,
        layout,
        train=train,
        gallery=[scene(n) for n in pool],
        queries=queries,
        cuhk_protocol=CuhkSysuProtocol(query_frames=query_frames, galleries=galleries, test_frames=pool),
    )


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# --- PRW --------------------------------------------------------------------------------------------


def _cam(name: str, source: Path) -> int:
    match = _CAM_RE.match(name)
    if match is None:
        raise ClaspError(f"{source}: frame name {name!r} does not start with c<camera> (e.g. c1s1_000151)")
    return int(match.group(1)) - 1


def _read_prw(base: Path) -> PersonSearchData:
    frames_dir = base / "frames"

    def frame_list(split: str) -> list[str]:
        path = base / f"frame_{split}.mat"
        key = f"img_index_{split}"
        mat = _loadmat(path)
        if key not in mat:
            raise ClaspError(f"{path} has no variable {key}")
        return [str(np.asarray(item).ravel()[0]).strip() + ".jpg" for item in mat[key].ravel()]

    def scene(name: str) -> SceneAnnotation:
        path = base / "annotations" / f"{name}.mat"
        mat = _loadmat(path)
        key = next((k for k in ("box_new", "anno_file", "anno_previous") if k in mat), None)
        if key is None:
            raise ClaspError(f"{path} has none of box_new / anno_file / anno_previous")
        rows = np.asarray(mat[key], dtype=np.float64).reshape(-1, 5)
        pids = rows[:, 0].astype(np.int64)
        pids[pids == -2] = UNLABELED
        boxes = _xyxy(np.clip(rows[:, 1:], 0, None))
        return SceneAnnotation(name, str(frames_dir / name), boxes, pids, _cam(name, path))

    queries = []
    info = base / "query_info.txt"
    for line_no, line in enumerate(info.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            pid, (x, y, w, h), stem = int(parts[0]), (float(v) for v in parts[1:5]), parts[5]
        except (IndexError, ValueError):
            raise ClaspError(f"{info}:{line_no}: expected 'id x y w h frame', got {line!r}") from None
        box = np.clip(np.array([x, y, x + w, y + h]), 0, None).astype(np.int32).astype(np.float32)  # as SeqNet
        name = stem + ".jpg"
        queries.append(SearchQueryItem(name, str(frames_dir / name), box, pid, _cam(name, info)))
    gallery = [scene(n) for n in frame_list("test")]
    names = {s.name for s in gallery}
    absent = [q.frame for q in queries if q.frame not in names]
    if absent:
        raise ClaspError(f"{info}: query frame {absent[0]} is not in frame_test.mat")
    layout = f"prw: {base.name}/frames, annotations/*.jpg.mat, frame_{{train,test}}.mat, query_info.txt"
    return PersonSearchData(
        "prw", base, layout, train=[scene(n) for n in frame_list("train")], gallery=gallery, queries=queries
    )
