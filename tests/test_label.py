"""Stage 1 labeling: alignment, orientation, resume after kill -9, disjoint multi-process split,
stock readers, random-weight refusal, label-set identity, and the label-quality metrics.

Corpora are made by the real ``clasp ingest`` from small folders of JPEGs; the CLIP is a tiny
open_clip model built in-process with random weights (hence ``allow_random_weights``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.labels import ingest_folder, label_cfg, noise_images, write_clip_dir
from PIL import Image

import labeling.label as label_stage
from labeling import quality
from labeling.clip_model import load_clip
from labeling.label import LabelConfig, assign_shards, labelset_id, labelset_identity, run_labeling, vocabulary_doc
from pipeline.errors import ClaspError
from pipeline.formats import LABELSET_FILE, image_shard_path, label_shard_path, labels_dir, read_sizes
from pipeline.ingest import IngestConfig, ingest
from pipeline.vocab import DEFAULT_PARTS, load_attributes, load_parts

REPO = Path(__file__).resolve().parent.parent


def tar_image_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name.rsplit(".", 1)[0] for m in tf if m.name.endswith((".jpg", ".png"))]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_folder(noise_images(30), tmp_path_factory.mktemp("root"), "toy", per_shard=12)


@pytest.fixture(scope="module")
def labelled(corpus: Path, clip_dir: Path) -> tuple[Path, str]:
    return corpus, run_labeling(label_cfg(corpus, "toy", clip_dir, workers=1)).labelset


def test_one_run_builds_one_dense_clip(tmp_path: Path, clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the label-set identity, the loop and labelset.json all take the dense mode from the run's one DenseClip
    built = []
    original = label_stage.DenseClip.__init__

    def count(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(label_stage.DenseClip, "__init__", count)
    root = ingest_folder(noise_images(4, seed=3), tmp_path, "once", per_shard=4)
    run = run_labeling(label_cfg(root, "once", clip_dir))
    assert run.complete and run.images == 4 and len(built) == 1


def test_label_shards_match_image_shards_row_for_row(labelled: tuple[Path, str]) -> None:
    root, set_id = labelled
    sizes = read_sizes(root, "toy")
    assert len(sizes) == 3
    doc = json.loads((labels_dir(root, "toy", set_id) / LABELSET_FILE).read_text())
    grid = doc["grid"]
    for i, (name, count) in enumerate(sizes.items()):
        table = pq.read_table(label_shard_path(root, "toy", set_id, i))
        assert table.column("key").to_pylist() == tar_image_keys(image_shard_path(root, "toy", i))
        assert table.num_rows == count == doc["shards"][f"{Path(name).stem}.parquet"]
        assert {len(b) for b in table.column("part_map").to_pylist()} == {grid[0] * grid[1]}
    assert doc["rows"] == 30 and doc["failures"] == []
    assert doc["model"]["random"] is True and doc["attributes"]["names"][0] == "Female"


def test_stock_duckdb_and_pyarrow_read_labels_without_project_code(labelled: tuple[Path, str]) -> None:
    root, set_id = labelled
    script = textwrap.dedent(f"""
        import glob, json, sys, duckdb, pyarrow.dataset as ds
        assert not any(m.split(".")[0] in ("pipeline", "labeling") for m in sys.modules)
        d = "{labels_dir(root, "toy", set_id)}"
        meta = json.load(open(d + "/labelset.json"))
        sql = "select count(*), count(distinct octet_length(part_map)), avg(fg_ratio) from read_parquet('{{}}')"
        n, sizes, _ = duckdb.sql(sql.format(d + "/*.parquet")).fetchall()[0]
        t = ds.dataset(sorted(glob.glob(d + "/*.parquet"))).to_table(columns=["key", "attr_prob", "area_head"])
        print(json.dumps([n, sizes, t.num_rows, len(t.column("attr_prob")[0]), len(meta["attributes"]["names"])]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout) == [30, 1, 30, 26, 26]


@pytest.mark.parametrize("pool", ["tok", "avg"])  # MaskCLIP value path / projected output tokens
def test_upside_down_image_gives_upside_down_part_map(tmp_path: Path, pool: str) -> None:
    # With zero position embeddings a ViT is permutation-equivariant over patches, so the only way
    # the map can follow the image is through correct row/column bookkeeping from pixels to Parquet.
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(colours, 8, 0), 8, 1)  # 64x32, one colour per 8x8 patch
    # PNG: lossless, so the stored upside-down image is exactly the flipped pixels (JPEG rounding is not).
    root = ingest_folder({"a/up.png": image, "a/down.png": image[::-1].copy()}, tmp_path, "flip", per_shard=8)
    set_id = run_labeling(
        label_cfg(root, "flip", write_clip_dir(tmp_path / "clip", zero_pos=True, pool=pool), label_grid=(8, 4))
    ).labelset
    table = pq.read_table(label_shard_path(root, "flip", set_id, 0)).to_pylist()
    maps = {r["key"]: np.frombuffer(r["part_map"], np.uint8).reshape(8, 4) for r in table}
    up, down = maps["a_up"], maps["a_down"]
    assert not np.array_equal(up, up[::-1]), "test image must give a map that is not vertically symmetric"
    np.testing.assert_array_equal(down, up[::-1])


def _subprocess_label(root: Path, corpus: str, clip: Path, resolution: tuple[int, int], env: dict | None = None):
    code = (
        "from labeling.label import LabelConfig, run_labeling;"
        f"run_labeling(LabelConfig(root={str(root)!r}, corpus={corpus!r}, clip_checkpoint={str(clip)!r},"
        f" allow_random_weights=True, resolution={resolution!r}, workers=0, batch_size=4, quiet=False))"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_processes_write_the_same_label_shards_as_one(tmp_path: Path, clip_dir: Path) -> None:
    root = ingest_folder(noise_images(30, seed=9), tmp_path / "two", "two", per_shard=6)
    single = tmp_path / "one"
    shutil.copytree(root, single)
    procs = [_subprocess_label(root, "two", clip_dir, (64, 32), {"RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    procs.append(_subprocess_label(single, "two", clip_dir, (64, 32)))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    sizes = read_sizes(root, "two")
    set_id = next(p.name for p in (root / "two" / "labels").iterdir())
    counted = [int(o.split("labelled ")[1].split(" images")[0]) for o, _ in outs[:2]]
    assert sum(counted) == 30 and all(c > 0 for c in counted)  # both processes labelled
    for i in range(len(sizes)):
        two, one = label_shard_path(root, "two", set_id, i), label_shard_path(single, "two", set_id, i)
        assert two.read_bytes() == one.read_bytes(), two.name  # byte-identical however many processes ran
    doc = labels_dir(root, "two", set_id) / LABELSET_FILE
    before = (doc.read_bytes(), doc.stat().st_mtime_ns)
    # a re-run with nothing left to label does not rewrite labelset.json (its mtime picks the latest label set)
    cfg = LabelConfig(root=str(root), corpus="two", clip_checkpoint=str(clip_dir), allow_random_weights=True,
                      resolution=(64, 32), workers=0, batch_size=4, quiet=True)  # fmt: skip
    run = run_labeling(cfg)
    assert run.labelset == set_id and (run.images, run.shards, run.complete) == (0, 0, True)
    assert (doc.read_bytes(), doc.stat().st_mtime_ns) == before


def test_assign_shards_is_a_partition() -> None:
    shards = [f"c-{i:06d}.tar" for i in range(11)]
    for world in (1, 2, 3, 8, 16):
        parts = [assign_shards(shards, r, world) for r in range(world)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == shards and len(flat) == len(set(flat))


def test_random_weights_are_refused_without_the_flag(corpus: Path, clip_dir: Path) -> None:
    with pytest.raises(ClaspError, match="random"):
        run_labeling(label_cfg(corpus, "toy", clip_dir, allow_random_weights=False))
    with pytest.raises(ClaspError, match="random"):
        load_clip("ViT-B-16")  # an architecture without a weights tag


def test_changing_a_prompt_makes_a_new_labelset(tmp_path: Path, clip_dir: Path) -> None:
    loaded = load_clip("test-tiny", clip_dir, allow_random_weights=True)
    attrs = load_attributes()
    cfg = label_cfg(tmp_path, "x", clip_dir)

    def set_id(parts_file: Path = DEFAULT_PARTS, resolution: tuple[int, int] = (64, 32)) -> str:
        vocab = vocabulary_doc(attrs, load_parts(parts_file))
        return labelset_id(labelset_identity(cfg, loaded, vocab, resolution, "value"))

    base = set_id()
    assert base == set_id()
    edited = tmp_path / "parts.yaml"
    edited.write_text(DEFAULT_PARTS.read_text().replace('"a person\'s face"', '"a face seen from the front"'))
    assert edited.read_text() != DEFAULT_PARTS.read_text()
    assert set_id(edited) != base
    assert set_id(resolution=(128, 64)) != base


def test_undecodable_image_keeps_its_row_with_zero_confidence(tmp_path: Path, clip_dir: Path) -> None:
    root = ingest_folder(noise_images(5, seed=1), tmp_path, "bad", per_shard=8)
    shard = image_shard_path(root, "bad", 0)
    with tarfile.open(shard) as tf:  # truncate one image's entropy data in place (headers still parse)
        member = next(m for m in tf if m.name.endswith(".jpg"))
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data + member.size // 2)
        fh.write(b"\x00" * (member.size // 2))
    run = run_labeling(label_cfg(root, "bad", clip_dir))
    set_id = run.labelset
    doc = json.loads((labels_dir(root, "bad", set_id) / LABELSET_FILE).read_text())
    table = pq.read_table(label_shard_path(root, "bad", set_id, 0)).to_pylist()
    assert table[0]["key"] == member.name.rsplit(".", 1)[0] and len(table) == 5
    if doc["failures"]:  # PIL may still decode a half-zeroed JPEG; if it did not, the row is blank
        assert doc["failures"][0]["key"] == table[0]["key"]
        assert set(table[0]["part_conf"]) == {0}
    assert run.undecodable == len(doc["failures"]) and run.images == 5 and run.complete


def test_rerun_after_ingest_overwrite_relabels_shards_of_the_old_ingest(tmp_path: Path, clip_dir: Path) -> None:
    root = ingest_folder(noise_images(10, seed=1), tmp_path, "re", per_shard=4)
    set_id = run_labeling(label_cfg(root, "re", clip_dir)).labelset
    labelset = labels_dir(root, "re", set_id) / LABELSET_FILE
    old_keys = pq.read_table(label_shard_path(root, "re", set_id, 0)).column("key").to_pylist()
    # another source with as many images per shard: the old label shards' row counts still match
    src = tmp_path / "other-source"
    for i, arr in enumerate(noise_images(10, seed=2).values()):
        (src / f"b{i:02d}.jpg").parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(src / f"b{i:02d}.jpg", quality=95)
    ingest(
        IngestConfig(
            source=str(src), corpus="re", root=str(root), images_per_shard=4, workers=1, quiet=True, overwrite=True
        )
    )
    run = run_labeling(label_cfg(root, "re", clip_dir))
    assert run.labelset == set_id and run.shards == 3  # every shard of the old ingest is labelled again
    assert labelset.is_file()
    for shard in range(3):
        keys = pq.read_table(label_shard_path(root, "re", set_id, shard)).column("key").to_pylist()
        assert keys == tar_image_keys(image_shard_path(root, "re", shard)) and keys != old_keys
    before = label_shard_path(root, "re", set_id, 0).stat().st_mtime_ns
    assert run_labeling(label_cfg(root, "re", clip_dir)).images == 0  # nothing stale now: nothing is redone
    assert label_shard_path(root, "re", set_id, 0).stat().st_mtime_ns == before


# --- label quality metrics ------------------------------------------------------------------


def test_attribute_mA_matches_hand_count() -> None:
    gt = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    prob = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.8], [0.1, 0.3]])
    ma, per = quality.attribute_mA(gt, prob)
    # attr 0: TP 1/2, TN 1/2 -> 0.5; attr 1: TP 1/2, TN 1/2 -> 0.5
    np.testing.assert_allclose(per, [0.5, 0.5])
    assert ma == pytest.approx(0.5)
    ma_perfect, _ = quality.attribute_mA(gt, gt.astype(float))
    assert ma_perfect == pytest.approx(1.0)


def test_miou_confusion_grid_and_baseline() -> None:
    mask = np.zeros((8, 4), np.uint8)
    mask[:2] = 1
    mask[2:6, 1:3] = 3
    grid = quality.gt_mask_to_grid(mask, (4, 2))
    np.testing.assert_array_equal(grid, [[1, 1], [0, 0], [0, 0], [0, 0]])  # ties go to the lower class id
    conf = quality.part_confusion(grid, np.array([[1, 0], [0, 0], [1, 0], [0, 0]]), 4)
    m, per = quality.miou(conf)
    assert per[0] == pytest.approx(5 / 7) and per[1] == pytest.approx(1 / 3) and np.isnan(per[2])
    assert m == pytest.approx((5 / 7 + 1 / 3) / 2)
    assert quality.foreground_iou(grid, np.array([[1, 0], [0, 0], [1, 0], [0, 0]])) == pytest.approx(1 / 3)
    base = quality.geometry_baseline((16, 8), 9)
    assert base[0, 4] == 1 and base[-1, 4] == 7 and base[8, 0] == 0
    learned = quality.geometry_baseline((4, 2), 4, gt_maps=np.stack([grid, grid, np.zeros_like(grid)]))
    np.testing.assert_array_equal(learned, grid)


@pytest.mark.parametrize("world_size,local_rank,expected", [(1, 0, "cuda:3"), (2, 1, "cuda:1")])
def test_a_bare_cuda_device_becomes_an_indexed_one_before_set_device(
    corpus: Path, clip_dir: Path, monkeypatch: pytest.MonkeyPatch, world_size: int, local_rank: int, expected: str
) -> None:
    # torch.cuda.set_device refuses a bare "cuda" (found on an H200: `clasp label` on one GPU stopped there);
    # one process keeps the current device, several take their local rank's GPU
    import labeling.label as label_stage

    seen: list[torch.device] = []
    monkeypatch.setattr(label_stage, "resolve_device", lambda _: "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))

    def stop(*args: object, device: str, **kwargs: object) -> None:
        raise RuntimeError(f"stop at load_clip on {device}")

    monkeypatch.setattr(label_stage, "load_clip", stop)
    with pytest.raises(RuntimeError, match=f"stop at load_clip on {expected}$"):
        run_labeling(label_cfg(corpus, "toy", clip_dir))
    assert seen == [torch.device(expected)]
