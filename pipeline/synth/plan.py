"""What the synthetic world contains: every image as a ``Job`` (who, which camera, which shot, where).

Planning is cheap and runs in one process from the seed alone, so the world is the same whatever the
number of rendering workers. Three datasets are planned, each with its own people and cameras:

- a LUPerson-like corpus: videos grouped by country and city, several people per video, each person in
  ``tracks_per_identity`` videos with ``frames_per_track`` near-duplicate frames (variable crop sizes);
- Market-1501: 6 cameras (the last one low-resolution, as in the real set), disjoint train/test
  identities, one query per test identity and camera, junk (-1) and distractor (0000) gallery boxes;
- PA-100K: one pedestrian per image from many scenes, split 8:1:1 in file order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.synth.look import Look, random_look
from pipeline.synth.render import Shot, advance_shot, random_shot
from pipeline.synth.scene import Camera, make_camera

LUPERSON, MARKET, PA100K = "luperson", "market1501", "pa100k"
# (country, city) folders of the corpus; LUPerson's videos come from street-view footage of many cities.
PLACES = (
    ("brazil", "saopaulo"), ("canada", "toronto"), ("china", "shanghai"), ("egypt", "cairo"), ("france", "paris"),
    ("germany", "berlin"), ("india", "mumbai"), ("italy", "rome"), ("japan", "tokyo"), ("kenya", "nairobi"),
    ("mexico", "puebla"), ("spain", "madrid"), ("turkey", "istanbul"), ("uk", "london"), ("usa", "newyork"),
    ("vietnam", "hanoi"), ("china", "beijing"), ("japan", "osaka"), ("usa", "chicago"), ("france", "lyon"),
)  # fmt: skip
MARKET_CAMERAS = 6


@dataclass(frozen=True)
class Job:
    """One image to render and where it goes."""

    dataset: str
    path: str  # relative to the world's root
    key: str
    identity: int  # dataset label (Market: -1 junk, 0 distractor)
    look: Look
    camera: Camera
    shot: Shot
    height: int
    width: int
    split: str  # "" for the corpus; train/test/query (Market) or train/val/test (PA-100K)
    variant: int  # caption wording
    regions: int = 0  # region-caption pairs to describe (corpus images; pipeline.synth.regions)
    index: int = 0  # position in its dataset's plan (varies which regions are described)


def _crop_size(rng: np.random.Generator, cfg) -> tuple[int, int]:  # noqa: ANN001 - SynthConfig (import cycle)
    """LUPerson-like detector crops: heights log-uniform over the configured range, person aspect ratios."""
    h = int(round(math.exp(rng.uniform(math.log(cfg.min_height), math.log(cfg.max_height)))))
    w = max(16, int(round(h * rng.uniform(cfg.min_aspect, cfg.max_aspect))))
    return h, w


def plan_corpus(cfg) -> tuple[list[Job], int]:  # noqa: ANN001
    """Jobs of the LUPerson-like corpus sorted by key, and the number of videos."""
    rng = np.random.default_rng([cfg.seed, 10])
    looks = [random_look(np.random.default_rng([cfg.seed, 11, i])) for i in range(cfg.identities)]
    n_videos = max(1, math.ceil(cfg.identities * cfg.tracks_per_identity / cfg.people_per_video))
    tracks_per_id = min(cfg.tracks_per_identity, n_videos)
    videos: list[list[int]] = [[] for _ in range(n_videos)]
    for person in range(cfg.identities):
        for v in rng.choice(n_videos, size=tracks_per_id, replace=False):
            videos[int(v)].append(person)
    order = rng.permutation(len(PLACES))
    jobs: list[Job] = []
    for v, people in enumerate(videos):
        country, city = PLACES[int(order[v % len(PLACES)])]
        video = f"video{v:04d}"
        camera = make_camera(cfg.seed, v, group=0)
        frame = int(rng.integers(0, 500))
        for person in rng.permutation(people):
            track_rng = np.random.default_rng([cfg.seed, 12, v, int(person)])
            h, w = _crop_size(track_rng, cfg)
            shot = random_shot(track_rng, camera)
            for k in range(cfg.frames_per_track):
                if k:
                    shot = advance_shot(shot, track_rng)
                    frame += int(track_rng.integers(1, 6))
                scale = float(track_rng.uniform(0.97, 1.03))
                fh, fw = max(32, int(h * scale)), max(16, int(w * scale))
                name = f"{frame:06d}"
                jobs.append(
                    Job(
                        LUPERSON,
                        f"{LUPERSON}/{country}/{city}/{video}/{name}.jpg",
                        f"{country}_{city}_{video}_{name}",
                        int(person),
                        looks[int(person)],
                        camera,
                        shot,
                        fh,
                        fw,
                        "",
                        k % 3,
                    )  # fmt: skip
                )
            frame += int(rng.integers(20, 200))
    jobs.sort(key=lambda j: j.key)
    return jobs, n_videos


def _market_name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    """``PPPP_cCsS_FFFFFF_NN.jpg``; junk boxes are written ``-1_c...`` as in the real set."""
    person = "-1" if pid < 0 else f"{pid:04d}"
    return f"{person}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg"


def plan_market(cfg) -> list[Job]:  # noqa: ANN001
    """Market-1501 jobs: bounding_box_train, bounding_box_test (with junk and distractors) and query."""
    n = cfg.market_identities if cfg.market_identities is not None else cfg.identities
    rng = np.random.default_rng([cfg.seed, 20])
    cameras = [make_camera(cfg.seed, c, group=1, lowres=(c == MARKET_CAMERAS - 1)) for c in range(MARKET_CAMERAS)]
    pids = rng.permutation(np.arange(1, n + 1))
    n_train = (n + 1) // 2
    train = {int(p) for p in pids[:n_train]}
    jobs: list[Job] = []
    used: set[str] = set()
    test_tracks: list[tuple[int, Look, int, Shot]] = []  # junk boxes come from test people's tracks

    def add(folder: str, pid: int, cam: int, seq: int, frame: int, look: Look, shot: Shot, split: str) -> None:
        box = 1
        while (name := _market_name(pid, cam + 1, seq, frame, box)) in used:
            box += 1
        used.add(name)
        key = f"{folder}/{name}"
        jobs.append(Job(MARKET, f"{MARKET}/{key}", name[:-4], pid, look, cameras[cam], shot, cfg.market_height,
                        cfg.market_width, split, frame % 3))  # fmt: skip

    for pid in sorted(int(p) for p in pids):
        prng = np.random.default_rng([cfg.seed, 21, pid])
        look = random_look(np.random.default_rng([cfg.seed, 22, pid]))
        is_train = pid in train
        n_cams = int(prng.choice([2, 3, 4, 5, 6], p=[0.3, 0.3, 0.2, 0.12, 0.08]))
        cams = sorted(int(c) for c in prng.choice(MARKET_CAMERAS, size=n_cams, replace=False))
        for cam in cams:
            seq = int(prng.integers(1, 7))
            frame = int(prng.integers(100, 9000))
            low = 1 if is_train else 2  # test people need a query and a gallery image in every camera
            count = int(prng.integers(low, max(low, cfg.market_images_per_camera) + 1))
            shot = random_shot(prng, cameras[cam])
            for k in range(count):
                if k:
                    shot = advance_shot(shot, prng)
                    frame += int(prng.integers(3, 25))
                if is_train:
                    add("bounding_box_train", pid, cam, seq, frame, look, shot, "train")
                elif k == 0:  # hand-drawn query box: well aligned
                    add("query", pid, cam, seq, frame, look, random_shot(prng, cameras[cam], aligned=True), "query")
                else:
                    add("bounding_box_test", pid, cam, seq, frame, look, shot, "test")
                    test_tracks.append((pid, look, cam, shot))
    n_gallery = sum(j.split == "test" for j in jobs)
    # junk: boxes overlapping a test person by 20-50% IoU; distractors: false alarms (< 20%)
    n_junk = int(round(n_gallery * cfg.market_junk_ratio))
    n_distractors = int(round(n_gallery * cfg.market_distractor_ratio))
    junk_rng = np.random.default_rng([cfg.seed, 23])
    for _ in range(n_junk if test_tracks else 0):
        pid, look, cam, shot = test_tracks[int(junk_rng.integers(len(test_tracks)))]
        bad = replace(shot, fill=float(junk_rng.uniform(1.5, 2.2)), top=float(junk_rng.uniform(-0.9, 0.1)),
                      dx=float(junk_rng.uniform(-0.25, 0.25)), seed=int(junk_rng.integers(2**31)))  # fmt: skip
        add("bounding_box_test", -1, cam, int(junk_rng.integers(1, 7)), int(junk_rng.integers(100, 9000)), look, bad,
            "test")  # fmt: skip
    for i in range(n_distractors):
        cam = int(junk_rng.integers(MARKET_CAMERAS))
        look = random_look(np.random.default_rng([cfg.seed, 24, i]))
        shot = random_shot(junk_rng, cameras[cam])
        if junk_rng.random() < 0.5:  # a box beside the person: background with a sliver of someone
            shot = replace(shot, dx=float(junk_rng.choice((-1, 1)) * junk_rng.uniform(0.7, 0.95)))
        else:  # a box on a small part of a person (a leg, a bag)
            shot = replace(shot, fill=float(junk_rng.uniform(2.8, 4.0)), top=float(junk_rng.uniform(-2.8, -1.2)))
        add("bounding_box_test", 0, cam, int(junk_rng.integers(1, 7)), int(junk_rng.integers(100, 9000)), look, shot,
            "test")  # fmt: skip
    jobs.sort(key=lambda j: j.path)
    return jobs


def plan_pa100k(cfg) -> list[Job]:  # noqa: ANN001
    """PA-100K jobs: ``data/NNNNNN.jpg``, one pedestrian each; the first 80% train, then 10% val, 10% test."""
    n = cfg.pa100k_images if cfg.pa100k_images is not None else 5 * cfg.identities
    # PA-100K comes from 598 scenes; a small world needs fewer cameras (each scene is built once per process)
    cameras = [make_camera(cfg.seed, c, group=2) for c in range(min(cfg.pa100k_cameras, max(3, n // 8)))]
    n_train, n_val = int(round(n * 0.8)), int(round(n * 0.1))
    jobs = []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, 30, i])
        look = random_look(rng)
        camera = cameras[int(rng.integers(len(cameras)))]
        h, w = _crop_size(rng, cfg)
        split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
        name = f"{i + 1:06d}"
        jobs.append(Job(PA100K, f"{PA100K}/data/{name}.jpg", name, i, look, camera,
                        random_shot(rng, camera, aligned=rng.random() < 0.5), h, w, split, i % 3))  # fmt: skip
    return jobs
