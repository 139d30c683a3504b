"""``clasp synth``: write the synthetic world in the real datasets' layouts, with ground truth.

    clasp synth --out data/synth --identities 200 --preview
    clasp synth --out data/synth workers=4 market_identities=750 pa100k_images=5000

Output (everything under ``--out``)::

    luperson/<country>/<city>/<video>/<frame>.jpg     unlabeled corpus, as SOLIDER reads LUPerson
    luperson_lmdb/{data.mdb,lock.mdb,keys.pkl}        the same JPEG bytes, LUPerson convert_lmdb.py style;
                                                      key = folder path joined by '_' without '.jpg'
    gt.parquet                                        ground truth per corpus image (layouts.GT_SCHEMA)
    pairs.csv                                         image,caption,box (paths relative to --out) for CLIP training;
                                                      box rows: body-part/background regions (synth.regions)
    market1501/{bounding_box_train,bounding_box_test,query}/PPPP_cCsS_FFFFFF_NN.jpg
    market1501_gt.parquet                             ground truth per Market-1501 image (same schema)
    pa100k/data/NNNNNN.jpg, pa100k/annotation.mat     PA-100K layout, 8:1:1 split
    pa100k_gt.parquet
    coco/, citypersons/, cuhk_sysu/, prw/, lip/       multi-person scenes for the dense tasks, each in its real
                                                      layout (``dense``: pose, detection, person search, parsing)
    cuhk_pedes/{imgs/,reid_raw.json}                  text-based person search, CUHK-PEDES layout, several captions
                                                      per person in varied wording (also listed in ``dense``)
    synth_config.yaml, world.json                     resolved config; counts (written last: the world is complete)
    preview.png                                       with --preview: samples, part masks, keypoints

The world is built in a sibling folder ``<out>.tmp-<pid>`` renamed onto ``--out`` at the end
(``pipeline.formats.atomic_dir``), so an interrupted run never leaves a partial world that looks complete.
Rendering may use several worker processes; every image is fully determined by the seed and its plan, so
the bytes do not depend on ``workers``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image

from pipeline.config import POSITIVE, ConfigError, at_least, save_config
from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir, atomic_path, write_json_atomic
from pipeline.progress import progress
from pipeline.synth.layouts import GtWriter, LmdbWriter, write_pa100k_mat
from pipeline.synth.look import attributes, caption
from pipeline.synth.plan import LUPERSON, MARKET, PA100K, Job, plan_corpus, plan_market, plan_pa100k
from pipeline.synth.regions import region_pairs
from pipeline.synth.render import render_shot

OUTPUTS = ("luperson", "luperson_lmdb", "gt.parquet", "pairs.csv", "market1501", "market1501_gt.parquet", "pa100k",
           "pa100k_gt.parquet", "synth_config.yaml", "world.json", "preview.png", "coco", "citypersons", "cuhk_sysu",
           "prw", "lip", "cuhk_pedes")  # fmt: skip
DENSE_SETS = ("coco", "citypersons", "cuhk_sysu", "prw", "lip", "cuhk_pedes")


@dataclass
class SynthConfig:
    """Size and shape of the synthetic world. Defaults: 4,820 images (seed 0), under a minute on one core."""

    identities: Annotated[int, at_least(2)] = 200  # people in the LUPerson-like corpus
    seed: int = 0
    preview: bool = False  # also write preview.png
    workers: Annotated[int, POSITIVE] = 1  # rendering processes (output bytes do not depend on it)
    quiet: bool = False  # no progress bar
    overwrite: bool = False  # replace a previous world in --out (only the files synth writes)
    # LUPerson-like corpus
    tracks_per_identity: int = 2  # videos each person appears in
    frames_per_track: int = 4  # near-duplicate frames per appearance
    people_per_video: int = 6
    min_height: int = 128  # crop height range in pixels (log-uniform)
    max_height: int = 320
    min_aspect: float = 0.36  # crop width / height range
    max_aspect: float = 0.52
    # Market-1501
    market_identities: int | None = None  # default: same number as the corpus (other people)
    market_images_per_camera: int = 4  # at most, per person and camera
    market_height: int = 128
    market_width: int = 64
    market_junk_ratio: float = 0.29  # junk (-1) boxes per good gallery box (real set: 3,819 / 13,120)
    market_distractor_ratio: float = 0.21  # distractor (0000) boxes per good gallery box (2,793 / 13,120)
    # PA-100K
    pa100k_images: int | None = None  # default: 5 x identities
    pa100k_cameras: int = 24
    # Dense-task sets (multi-person scenes, pipeline.synth.crowd) at their writers' default sizes; each writer
    # draws from its own camera group and seed stream. [] skips them (the re-ID/attribute world only).
    # cuhk_pedes (text-to-person retrieval, pipeline.synth.pedes) is listed here too: its own people and cameras.
    dense: list[str] = field(default_factory=lambda: list(DENSE_SETS))
    # Size of the dense-task sets as a factor on their writers' defaults (1.0: 320 COCO, 96 CityPersons, 750 LIP
    # images, 72 CUHK-SYSU and 48 PRW identities). Independent of `identities`: scenes cost far more per image.
    # CUHK-SYSU keeps at least its default test identities, so its TestG20 gallery always has enough scenes.
    dense_scale: float = 1.0
    # Region-caption rows per corpus image in pairs.csv (body-part / background boxes with their phrases,
    # pipeline.synth.regions), so clip-train can teach patch tokens the part words; 0 = whole images only.
    region_pairs: int = 0


def _validate(cfg: SynthConfig) -> None:
    checks = [
        (cfg.identities >= 2, "identities must be >= 2"),
        (cfg.tracks_per_identity >= 1, "tracks_per_identity must be >= 1"),
        (cfg.frames_per_track >= 1, "frames_per_track must be >= 1"),
        (cfg.people_per_video >= 1, "people_per_video must be >= 1"),
        (16 <= cfg.min_height <= cfg.max_height, "need 16 <= min_height <= max_height"),
        (0.2 <= cfg.min_aspect <= cfg.max_aspect <= 1.0, "need 0.2 <= min_aspect <= max_aspect <= 1"),
        (cfg.market_identities is None or cfg.market_identities >= 2, "market_identities must be >= 2"),
        (cfg.market_images_per_camera >= 2, "market_images_per_camera must be >= 2 (a query and a gallery box)"),
        (cfg.market_height >= 32 and cfg.market_width >= 16, "market_height/market_width too small"),
        (cfg.pa100k_images is None or cfg.pa100k_images >= 10, "pa100k_images must be >= 10 (8:1:1 split)"),
        (cfg.pa100k_cameras >= 1, "pa100k_cameras must be >= 1"),
        (cfg.workers >= 1, "workers must be >= 1"),
        (cfg.region_pairs >= 0, "region_pairs must be >= 0"),
        (0 < cfg.dense_scale <= 100, "dense_scale must be in (0, 100] (a factor on the dense sets' default sizes)"),
        (not set(cfg.dense) - set(DENSE_SETS), f"dense may list only {', '.join(DENSE_SETS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"synth config: {message}")


@dataclass
class Rendered:
    jpeg: bytes
    row: dict


def render_job(job: Job) -> Rendered:
    """Render one planned image: JPEG bytes (the camera's quality) and its ground-truth row."""
    sample = render_shot(job.look, job.camera, job.shot, job.height, job.width)
    buf = io.BytesIO()
    Image.fromarray(sample.rgb).save(buf, format="JPEG", quality=job.camera.jpeg_quality)
    mask = io.BytesIO()
    Image.fromarray(sample.part_mask).save(mask, format="PNG", compress_level=6)
    source = job.path.split("/", 1)[1]
    row = {
        "key": job.key,
        "source": source,
        "split": job.split,
        "identity": job.identity,
        "camera": job.camera.index + 1 if job.dataset == MARKET else job.camera.index,
        "view": sample.view,
        "attributes": attributes(job.look, sample.view).tolist(),
        "keypoints": sample.keypoints.reshape(-1).tolist(),
        "part_mask": mask.getvalue(),
        "caption": caption(job.look, sample.view, job.variant),
        "regions": region_pairs(sample.part_mask, job.look, sample.view, count=job.regions, pick=job.index)
        if job.regions
        else [],
        "width": job.width,
        "height": job.height,
    }
    return Rendered(buf.getvalue(), row)


def _render_all(jobs: list[Job], workers: int) -> Iterator[Rendered]:
    if workers <= 1:
        yield from map(render_job, jobs)
        return
    # spawn, not fork: the parent may hold threads (progress bar) and an open LMDB environment
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(render_job, jobs, chunksize=16)


def _check_out(out: Path, overwrite: bool) -> None:
    """``out`` may be new, empty, or (with ``overwrite``) hold a previous world and nothing else."""
    found = list(out.iterdir()) if out.is_dir() else []
    others = [p for p in found if p.name not in OUTPUTS]
    if others or (out.exists() and not out.is_dir()):
        name = others[0].name if others else out.name
        raise ClaspError(f"--out {out}: not empty ({name} ...); choose a new directory for the world")
    if found and not overwrite:
        raise ClaspError(f"--out {out}: already holds a synthetic world; pass overwrite=true to replace it")


def write_world(cfg: SynthConfig, out: Path) -> dict:
    """Render the whole world under ``out`` (see the module docstring) and return its counts."""
    _validate(cfg)
    out = Path(out)
    _check_out(out, cfg.overwrite)
    # a failed or interrupted run leaves no partial folder behind (it can be tens of MB) and the previous world
    # stays until the new one is complete
    with atomic_dir(out, replace=True) as tmp:
        return _write_world(cfg, out, tmp)


def _write_world(cfg: SynthConfig, out: Path, tmp: Path) -> dict:
    start = time.perf_counter()
    corpus, n_videos = plan_corpus(cfg)
    corpus = [dataclasses.replace(job, regions=cfg.region_pairs, index=i) for i, job in enumerate(corpus)]
    market = plan_market(cfg)
    pa100k = plan_pa100k(cfg)
    jobs = corpus + market + pa100k
    lmdb = LmdbWriter(tmp / "luperson_lmdb", len(corpus))
    gt = {LUPERSON: GtWriter(tmp / "gt.parquet"), MARKET: GtWriter(tmp / "market1501_gt.parquet"),
          PA100K: GtWriter(tmp / "pa100k_gt.parquet")}  # fmt: skip
    rows: dict[str, list[dict]] = {LUPERSON: [], MARKET: [], PA100K: []}  # without the masks, for the summary
    made_dirs: set[Path] = set()
    try:
        with progress(len(jobs), "synth", quiet=cfg.quiet) as advance:
            for job, done in zip(jobs, _render_all(jobs, cfg.workers), strict=True):
                path = tmp / job.path
                if path.parent not in made_dirs:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made_dirs.add(path.parent)
                path.write_bytes(done.jpeg)
                if job.dataset == LUPERSON:
                    lmdb.put(job.key, done.jpeg)
                gt[job.dataset].add(done.row)
                rows[job.dataset].append({k: v for k, v in done.row.items() if k not in ("part_mask", "keypoints")})
                advance()
    finally:
        lmdb.close()
        for writer in gt.values():
            writer.close()
    with atomic_path(tmp / "pairs.csv") as p, open(p, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "box"])
        for r in rows[LUPERSON]:
            image = f"{LUPERSON}/{r['source']}"
            writer.writerow((image, r["caption"], ""))
            writer.writerows((image, text, " ".join(map(str, box))) for box, text in r["regions"])
    pa_rows = rows[PA100K]
    write_pa100k_mat(
        tmp / PA100K / "annotation.mat",
        {s: [r["source"].split("/")[-1] for r in pa_rows if r["split"] == s] for s in ("train", "val", "test")},
        {s: np.array([r["attributes"] for r in pa_rows if r["split"] == s]) for s in ("train", "val", "test")},
    )
    if cfg.preview:
        from pipeline.synth.preview import write_preview

        write_preview(tmp / "preview.png", corpus)
    dense = _write_dense(cfg, tmp)
    save_config(cfg, tmp / "synth_config.yaml")
    summary = {**_summary(cfg, corpus, n_videos, rows), "dense": sorted(dense)}
    write_json_atomic(tmp / "world.json", summary)  # last, so its presence means "complete"
    seconds = time.perf_counter() - start
    if not cfg.quiet:
        print(f"synth: {len(jobs)} images in {seconds:.1f} s ({len(jobs) / seconds:.0f} img/s) -> {out}")
    return {**summary, "seconds": round(seconds, 2), "dense_seconds": dense}


def _write_dense(cfg: SynthConfig, tmp: Path) -> dict[str, float]:
    """Write the requested dense-task sets under ``tmp``; returns seconds per set."""
    from pipeline.synth.citypersons import write_citypersons
    from pipeline.synth.coco_pose import write_coco_pose
    from pipeline.synth.lip import write_lip
    from pipeline.synth.pedes import write_cuhk_pedes
    from pipeline.synth.person_search import write_cuhk_sysu, write_prw

    writers = {"coco": write_coco_pose, "citypersons": write_citypersons, "cuhk_sysu": write_cuhk_sysu,
               "prw": write_prw, "lip": write_lip, "cuhk_pedes": write_cuhk_pedes}  # fmt: skip
    seconds = {}
    for name in cfg.dense:
        start = time.perf_counter()
        if not cfg.quiet:
            print(f"synth: {name} (dense-task scenes)", flush=True)
        writers[name](tmp / name, seed=cfg.seed, **dense_sizes(name, cfg.dense_scale))
        seconds[name] = round(time.perf_counter() - start, 2)
    return seconds


# The dense writers' default counts and the smallest count each stays valid with: (default, floor).
DENSE_SIZES = {
    "coco": {"train_images": (256, 4), "val_images": (64, 2)},
    "citypersons": {"train_images": (64, 4), "val_images": (32, 2)},
    "lip": {"train_images": (600, 4), "val_images": (150, 2)},
    "cuhk_sysu": {"train_ids": (48, 4), "test_ids": (24, 24), "distractor_scenes": (12, 12)},
    "prw": {"train_ids": (32, 4), "test_ids": (16, 4)},
    "cuhk_pedes": {"train_ids": (64, 2), "val_ids": (16, 0), "test_ids": (16, 2)},
}


def dense_sizes(name: str, scale: float) -> dict[str, int]:
    """Keyword arguments of dense writer ``name`` at ``scale`` times its default counts (1.0: the defaults)."""
    if scale == 1.0:
        return {}
    return {key: max(floor, round(default * scale)) for key, (default, floor) in DENSE_SIZES[name].items()}


def _summary(cfg: SynthConfig, corpus: list[Job], n_videos: int, rows: dict[str, list[dict]]) -> dict:
    market = rows[MARKET]

    def ids(split: str) -> set[int]:
        return {r["identity"] for r in market if r["split"] == split and r["identity"] > 0}

    return {
        "seed": cfg.seed,
        "luperson": {"images": len(corpus), "identities": cfg.identities, "videos": n_videos},
        "market1501": {
            "train_images": sum(r["split"] == "train" for r in market),
            "train_identities": len(ids("train")),
            "gallery_images": sum(r["split"] == "test" for r in market),
            "gallery_identities": len(ids("test")),
            "query_images": sum(r["split"] == "query" for r in market),
            "query_identities": len(ids("query")),
            "junk_images": sum(r["identity"] == -1 for r in market),
            "distractor_images": sum(r["identity"] == 0 for r in market),
            "cameras": 6,
        },
        "pa100k": {s: sum(r["split"] == s for r in rows[PA100K]) for s in ("train", "val", "test")},
    }
