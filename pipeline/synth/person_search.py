"""Synthetic person search sets in CUHK-SYSU's and PRW's own on-disk layouts.

    from pipeline.synth.person_search import write_cuhk_sysu, write_prw
    write_cuhk_sysu(Path("data/synth/cuhk_sysu"), seed=0)
    write_prw(Path("data/synth/PRW-v16.04.20"), seed=0)

A pool of identities (one ``random_look`` each) walks through street scenes of camera group 5
(``compose_scene``): every scene holds a few known identities plus unknown passers-by, and every
identity recurs in several scenes (PRW: on different cameras). Training and test identities are
disjoint; queries come from test identities. Boxes are the full-body boxes measured from the pixels.
A person shown less than ``MIN_VISIBLE`` is not annotated at all; a known identity shown less than
``MIN_VISIBLE_LABELED`` is annotated as an unlabelled person (real annotators cannot name them either).

CUHK-SYSU (``write_cuhk_sysu``), the MATLAB structs OIM's ``psdb`` and SeqNet's ``cuhk_sysu.py`` read::

    Image/SSM/s<N>.jpg
    annotation/Images.mat       Img(1xN): imname, nAppear, box(1xn: idlocate [x y w h], ishard)
    annotation/Person.mat       Person(1xP): idname, nAppear, scene(1xn: imname, idlocate, ishard)
    annotation/pool.mat         pool: cell (Mx1) of test image names
    annotation/test/train_test/Train.mat     Train: cell (Tx1) of 1x1 Person-like structs
    annotation/test/train_test/TestG<G>.mat  TestG<G>(1xQ): Query(imname, idlocate, ishard, idname),
                                             Gallery(1xG: imname, idlocate ([] = target absent), ishard);
                                             frames holding the target first, as in the real files

PRW (``write_prw``), as PRW-v16.04.20 and SeqNet's ``prw.py``::

    frames/c<cam>s<seq>_<frame>.jpg
    annotations/c<cam>s<seq>_<frame>.jpg.mat   box_new: (n, 5) rows [id, x, y, w, h], id -2 = unlabelled
    frame_train.mat / frame_test.mat           img_index_train / img_index_test: cell (Nx1), names without .jpg
    ID_train.mat / ID_test.mat                 ID_train / ID_test: (1, n) identity ids
    query_info.txt                             "id x y w h frame" per line (CRLF, as the real file)
    query_box/<id>_<frame>.jpg                 the query crops

Each writer builds the set in a hidden sibling folder and renames it onto ``out_dir`` at the end, so a
partial set is never mistaken for a complete one. Output is deterministic in the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir
from pipeline.synth.crowd import compose_scene
from pipeline.synth.look import Look, random_look
from pipeline.synth.scene import make_camera

CAMERA_GROUP = 5
MIN_VISIBLE = 0.2  # fraction of a person's pixels visible for them to be annotated at all
MIN_VISIBLE_LABELED = 0.5  # ... and for a known identity to keep its id
MIN_BOX_PX = (6, 16)  # smallest annotated box (width, height)
PRW_UNLABELED = -2

XYWH = tuple[int, int, int, int]


@dataclass
class _Frame:
    name: str  # file name with .jpg
    camera: int  # camera index
    split: str  # train | test
    boxes: list[tuple[int, XYWH]]  # (world identity id or -1 unlabelled, box)


# --- shared world ----------------------------------------------------------------------------------


def _look(seed: int, pid: int) -> Look:
    return random_look(np.random.default_rng([seed, CAMERA_GROUP, pid, 0x1D]))


def _pack(rng: np.random.Generator, slots: list[int], per_scene: tuple[int, int]) -> list[list[int]]:
    """Cut a shuffled list of identity appearances into scenes of ``per_scene`` distinct identities."""
    slots = list(slots)
    rng.shuffle(slots)
    scenes = []
    while slots:
        size = int(rng.integers(per_scene[0], per_scene[1] + 1))
        cast: list[int] = []
        for pid in list(slots):
            if pid not in cast:
                cast.append(pid)
                slots.remove(pid)
            if len(cast) == size:
                break
        scenes.append(cast)
    return scenes


def _render(
    seed: int,
    scene_seed: int,
    camera: int,
    cast: list[int],
    *,
    height: int,
    width: int,
    passers_by: tuple[int, int],
) -> tuple[np.ndarray, list[tuple[int, XYWH]], int]:
    """(RGB, annotated boxes, JPEG quality) of one scene; re-drawn until at least one person is annotated."""
    cam = make_camera(seed, camera, group=CAMERA_GROUP)
    for attempt in range(20):
        scene = compose_scene(
            scene_seed * 32 + attempt,
            cam,
            height=height,
            width=width,
            people=[(pid, _look(seed, pid)) for pid in cast],
            extra=passers_by,
            min_person=max(MIN_BOX_PX[1] * 2, height // 7),
        )
        boxes = []
        for person in scene.persons:
            x, y, w, h = (int(round(v)) for v in person.bbox)
            if w < MIN_BOX_PX[0] or h < MIN_BOX_PX[1] or person.vis_ratio < MIN_VISIBLE:
                continue
            labeled = person.person_id >= 0 and person.vis_ratio >= MIN_VISIBLE_LABELED
            boxes.append((person.person_id if labeled else -1, (x, y, w, h)))
        if boxes:
            return scene.rgb, boxes, cam.jpeg_quality
    raise RuntimeError(f"scene {scene_seed} of camera {camera}: no visible person in 20 attempts")


def _appearances(frames: list[_Frame], split: str) -> dict[int, list[tuple[_Frame, XYWH]]]:
    seen: dict[int, list[tuple[_Frame, XYWH]]] = {}
    for frame in frames:
        if frame.split == split:
            for pid, box in frame.boxes:
                if pid >= 0:
                    seen.setdefault(pid, []).append((frame, box))
    return seen


def _demote(frames: list[_Frame], pids: set[int]) -> None:
    """Annotate ``pids`` as unlabelled people (a test identity seen once cannot be searched for)."""
    for frame in frames:
        frame.boxes = [(-1 if pid in pids else pid, box) for pid, box in frame.boxes]


def _save_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    Image.fromarray(rgb).save(path, quality=quality)


def _savemat(path: Path, content: dict) -> None:
    """scipy's savemat with a fixed text header: its default header holds the creation time, and the world
    must be byte-identical for a seed."""
    import io

    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, content)
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, written by clasp synth".ljust(116)
    Path(path).write_bytes(bytes(data))


# --- MATLAB structs (scipy.io.savemat writes numpy structured arrays as structs, object arrays as cells) ----


def _struct(fields: tuple[str, ...], rows: list[tuple]) -> np.ndarray:
    array = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        array[0, i] = row
    return array


def _cell(values: list) -> np.ndarray:
    cell = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        cell[i, 0] = value
    return cell


def _box_mat(box: XYWH | None) -> np.ndarray:
    return np.zeros((1, 0)) if box is None else np.asarray([box], dtype=np.float64)


_HARD = np.zeros((1, 1))
_SCENE_FIELDS = ("imname", "idlocate", "ishard")
_PERSON_FIELDS = ("idname", "nAppear", "scene")


def _person_struct(pid: int, seen: list[tuple[_Frame, XYWH]]) -> tuple:
    scenes = _struct(_SCENE_FIELDS, [(frame.name, _box_mat(box), _HARD) for frame, box in seen])
    return (f"p{pid}", np.array([[len(seen)]], dtype=np.float64), scenes)


# --- CUHK-SYSU -------------------------------------------------------------------------------------


def write_cuhk_sysu(
    out_dir: Path,
    *,
    seed: int = 0,
    train_ids: int = 48,
    test_ids: int = 24,
    appearances: tuple[int, int] = (2, 3),
    per_scene: tuple[int, int] = (1, 3),
    passers_by: tuple[int, int] = (1, 3),
    distractor_scenes: int = 12,
    gallery_sizes: tuple[int, ...] = (10, 20),
    cameras: int = 12,
    height: int = 256,
    width: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write a CUHK-SYSU-layout set to ``out_dir`` (the folder holding ``Image/`` and ``annotation/``).

    ``appearances``: (min, max) scenes per identity; ``distractor_scenes``: test scenes with passers-by
    only; ``gallery_sizes``: one ``TestG<G>.mat`` per size (each must be below the number of test scenes).
    """
    if train_ids < 2 or test_ids < 1 or appearances[0] < 2:
        raise ClaspError("write_cuhk_sysu needs train_ids >= 2, test_ids >= 1 and appearances of at least 2 scenes")
    rng = np.random.default_rng([seed, CAMERA_GROUP, 0xC5])
    train_pids = list(range(1, train_ids + 1))
    test_pids = list(range(train_ids + 1, train_ids + test_ids + 1))
    casts = []
    for split, pids in (("train", train_pids), ("test", test_pids)):
        slots = [pid for pid in pids for _ in range(int(rng.integers(appearances[0], appearances[1] + 1)))]
        casts += [(split, cast) for cast in _pack(rng, slots, per_scene)]
    casts += [("test", [])] * distractor_scenes
    numbers = rng.permutation(len(casts)) + 1  # s<N> names do not reveal the split, as in the real set
    pool_size = sum(split == "test" for split, _ in casts)
    too_big = [g for g in gallery_sizes if g >= pool_size]
    if too_big:
        raise ClaspError(f"gallery sizes {too_big} need more than {pool_size} test scenes; lower gallery_sizes")

    with atomic_dir(out_dir, replace=overwrite) as root:
        (root / "Image" / "SSM").mkdir(parents=True)
        frames: list[_Frame] = []
        for index, ((split, cast), number) in enumerate(zip(casts, numbers, strict=True)):
            camera = int(rng.integers(cameras))
            rgb, boxes, quality = _render(seed, index, camera, cast, height=height, width=width, passers_by=passers_by)
            frame = _Frame(f"s{number}.jpg", camera, split, boxes)
            _save_jpeg(root / "Image" / "SSM" / frame.name, rgb, quality)
            frames.append(frame)
        test_seen = _appearances(frames, "test")
        _demote(frames, {pid for pid, seen in test_seen.items() if len(seen) < 2})
        frames.sort(key=lambda f: int(f.name[1:-4]))
        _write_cuhk_annotation(root / "annotation", frames, gallery_sizes, rng)
    return Path(out_dir)


def _write_cuhk_annotation(
    folder: Path, frames: list[_Frame], gallery_sizes: tuple[int, ...], rng: np.random.Generator
) -> None:
    protocol = folder / "test" / "train_test"
    protocol.mkdir(parents=True)
    images = []
    for frame in frames:
        boxes = _struct(("idlocate", "ishard"), [(_box_mat(box), _HARD) for _, box in frame.boxes])
        images.append((frame.name, np.array([[len(frame.boxes)]], dtype=np.float64), boxes))
    _savemat(folder / "Images.mat", {"Img": _struct(("imname", "nAppear", "box"), images)})
    train_seen, test_seen = _appearances(frames, "train"), _appearances(frames, "test")
    people = {**train_seen, **test_seen}
    _savemat(folder / "Person.mat", {"Person": _struct(_PERSON_FIELDS, [_person_struct(p, people[p]) for p in people])})
    train = [_struct(_PERSON_FIELDS, [_person_struct(pid, seen)]) for pid, seen in sorted(train_seen.items())]
    _savemat(protocol / "Train.mat", {"Train": _cell(train)})
    pool = [frame.name for frame in frames if frame.split == "test"]
    _savemat(folder / "pool.mat", {"pool": _cell(pool)})

    # one query per test identity: its first scene; the gallery holds its other scenes, then distractors
    queries, galleries = [], {size: [] for size in gallery_sizes}
    for pid, seen in sorted(test_seen.items()):
        (query_frame, query_box), positives = seen[0], seen[1:]
        queries.append((query_frame.name, _box_mat(query_box), _HARD, f"p{pid}"))
        holders = {frame.name for frame, _ in seen}
        negatives = [name for name in pool if name not in holders]
        negatives = [negatives[i] for i in rng.permutation(len(negatives))]
        for size in gallery_sizes:
            rows = [(frame.name, _box_mat(box), _HARD) for frame, box in positives[:size]]
            rows += [(name, _box_mat(None), _HARD) for name in negatives[: size - len(rows)]]
            galleries[size].append(_struct(_SCENE_FIELDS, rows))
    query_fields = ("imname", "idlocate", "ishard", "idname")
    for size in gallery_sizes:
        rows = [(_struct(query_fields, [q]), g) for q, g in zip(queries, galleries[size], strict=True)]
        _savemat(protocol / f"TestG{size}.mat", {f"TestG{size}": _struct(("Query", "Gallery"), rows)})


# --- PRW -------------------------------------------------------------------------------------------


def write_prw(
    out_dir: Path,
    *,
    seed: int = 0,
    train_ids: int = 32,
    test_ids: int = 16,
    cameras: int = 6,
    appearances: tuple[int, int] = (2, 4),
    per_scene: tuple[int, int] = (1, 3),
    passers_by: tuple[int, int] = (1, 3),
    height: int = 256,
    width: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write a PRW-layout set to ``out_dir`` (the folder holding ``frames/``, ``annotations/``, ...).

    Every identity appears on ``appearances`` (min, max) distinct cameras of ``cameras``; one query per
    test identity and camera it is labelled on (its largest box there).
    """
    if not 2 <= appearances[0] <= appearances[1] <= cameras:
        raise ClaspError(f"write_prw: appearances {appearances} must lie in 2..cameras ({cameras})")
    if train_ids < 2 or test_ids < 1:
        raise ClaspError("write_prw needs train_ids >= 2 and test_ids >= 1")
    rng = np.random.default_rng([seed, CAMERA_GROUP, 0x9F])
    train_pids = list(range(1, train_ids + 1))
    test_pids = list(range(train_ids + 1, train_ids + test_ids + 1))
    casts: list[tuple[str, int, list[int]]] = []
    for split, pids in (("train", train_pids), ("test", test_pids)):
        by_camera: dict[int, list[int]] = {c: [] for c in range(cameras)}
        for pid in pids:
            count = int(rng.integers(appearances[0], appearances[1] + 1))
            for camera in rng.choice(cameras, size=count, replace=False):
                by_camera[int(camera)].append(pid)
        casts += [(split, c, cast) for c, slots in by_camera.items() for cast in _pack(rng, slots, per_scene)]
    order = rng.permutation(len(casts))  # train and test frames interleave along each camera's timeline
    frame_no = [0] * cameras

    with atomic_dir(out_dir, replace=overwrite) as root:
        for sub in ("frames", "annotations", "query_box"):
            (root / sub).mkdir()
        frames: list[_Frame] = []
        images: dict[str, tuple[np.ndarray, int]] = {}
        for index in order:
            split, camera, cast = casts[index]
            frame_no[camera] += int(rng.integers(20, 80))
            rgb, boxes, quality = _render(
                seed, 10_000 + int(index), 100 + camera, cast, height=height, width=width, passers_by=passers_by
            )
            frame = _Frame(f"c{camera + 1}s1_{frame_no[camera]:06d}.jpg", camera, split, boxes)
            _save_jpeg(root / "frames" / frame.name, rgb, quality)
            images[frame.name] = (rgb, quality)
            frames.append(frame)
        test_seen = _appearances(frames, "test")
        _demote(frames, {pid for pid, seen in test_seen.items() if len({f.name for f, _ in seen}) < 2})
        frames.sort(key=lambda f: f.name)
        _write_prw_annotation(root, frames, images, train_pids, test_pids)
    return Path(out_dir)


def _write_prw_annotation(
    root: Path,
    frames: list[_Frame],
    images: dict[str, tuple[np.ndarray, int]],
    train_pids: list[int],
    test_pids: list[int],
) -> None:
    for frame in frames:
        rows = [[PRW_UNLABELED if pid < 0 else pid, *box] for pid, box in frame.boxes]
        _savemat(root / "annotations" / f"{frame.name}.mat", {"box_new": np.asarray(rows, dtype=np.float64)})
    for split in ("train", "test"):
        names = [frame.name[:-4] for frame in frames if frame.split == split]
        _savemat(root / f"frame_{split}.mat", {f"img_index_{split}": _cell(names)})
    _savemat(root / "ID_train.mat", {"ID_train": np.asarray([train_pids], dtype=np.float64)})
    _savemat(root / "ID_test.mat", {"ID_test": np.asarray([test_pids], dtype=np.float64)})

    lines = []
    for pid, seen in sorted(_appearances(frames, "test").items()):
        by_camera: dict[int, tuple[_Frame, XYWH]] = {}
        for frame, box in seen:
            best = by_camera.get(frame.camera)
            if best is None or box[2] * box[3] > best[1][2] * best[1][3]:
                by_camera[frame.camera] = (frame, box)
        for _, (frame, (x, y, w, h)) in sorted(by_camera.items()):
            stem = frame.name[:-4]
            lines.append(f"{pid} {x:g} {y:g} {w:g} {h:g} {stem}\r\n")
            rgb, quality = images[frame.name]
            _save_jpeg(root / "query_box" / f"{pid}_{stem}.jpg", rgb[y : y + h, x : x + w], quality)
    (root / "query_info.txt").write_bytes("".join(lines).encode())
