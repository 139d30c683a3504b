"""The synthetic world read back with stock readers (PIL, lmdb + pickle, scipy.io.loadmat, pyarrow).

Most tests use the session world of tests/conftest.py (12 identities, seed 7); the determinism test
builds two tiny worlds of its own.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import defaultdict
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from labeling.clip_train import read_pairs
from pipeline.config import ConfigError, load_config
from pipeline.errors import ClaspError
from pipeline.synth import (
    ATTRIBUTES,
    VIEW_DEPENDENT,
    SynthConfig,
    make_camera,
    random_look,
    render_person,
    write_world,
)
from pipeline.synth.pose import COCO_KEYPOINTS
from pipeline.vocab import load_attributes, load_parts

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
PARTS = load_parts().names
# Part classes a visible keypoint may sit on (the drawn pixel under the joint).
ALLOWED = {
    "nose": {"face"}, "eye": {"face"}, "ear": {"head", "face"},
    "shoulder": {"upper_clothes", "arms", "head", "accessories"}, "elbow": {"upper_clothes", "arms"},
    "wrist": {"upper_clothes", "arms"}, "hip": {"upper_clothes", "lower_clothes", "legs"},
    "knee": {"upper_clothes", "lower_clothes", "legs"}, "ankle": {"lower_clothes", "legs", "shoes"},
}  # fmt: skip


def _gt(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _mask(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["part_mask"])))


def test_luperson_folder_and_lmdb_hold_the_same_images(synth_world: Path) -> None:
    files = sorted((synth_world / "luperson").rglob("*.jpg"))
    assert files, "no corpus images"
    by_key = {}
    for f in files:
        rel = f.relative_to(synth_world / "luperson")
        assert len(rel.parts) == 4, f"{rel}: expected <country>/<city>/<video>/<frame>.jpg"
        by_key["_".join(rel.with_suffix("").parts)] = f
    with open(synth_world / "luperson_lmdb" / "keys.pkl", "rb") as fh:
        keys = pickle.load(fh)
    assert keys == sorted(by_key)
    env = lmdb.open(str(synth_world / "luperson_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == len(files)
        for key, f in by_key.items():
            assert txn.get(key.encode("ascii")) == f.read_bytes()
    env.close()
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) > len(files) // 4, "LUPerson-like crops must vary in size"
    assert all(Image.open(f).format == "JPEG" for f in files[:10])


def test_ground_truth_schema_and_contents(synth_world: Path) -> None:
    table = pq.read_table(synth_world / "gt.parquet")
    schema = table.schema
    assert schema.field("attributes").type.list_size == len(ATTRIBUTES) == 26
    assert str(schema.field("attributes").type.value_type) == "uint8"
    assert schema.field("keypoints").type.list_size == 51
    assert str(schema.field("keypoints").type.value_type) == "float"
    rows = table.to_pylist()
    keys = {r["key"] for r in rows}
    assert keys == {"_".join(Path(r["source"]).with_suffix("").parts) for r in rows}
    assert len(keys) == len(rows) == len(list((synth_world / "luperson").rglob("*.jpg")))
    for r in rows:
        assert Image.open(synth_world / "luperson" / r["source"]).size == (r["width"], r["height"])
        mask = _mask(r)
        assert mask.shape == (r["height"], r["width"]) and mask.dtype == np.uint8
        assert mask.max() < len(PARTS)
        assert {PARTS.index("upper_clothes"), PARTS.index("head")} & set(np.unique(mask).tolist())
        assert set(r["attributes"]) <= {0, 1}
        assert r["view"] in ("front", "back", "side")
        assert r["caption"].startswith(("a ", "an "))
    images, captions, boxes = read_pairs(synth_world / "pairs.csv")
    assert boxes == [None] * len(rows)  # region_pairs=0 (default): whole images only
    assert sorted(captions) == sorted(r["caption"] for r in rows)
    assert tuple(load_attributes().names) == ATTRIBUTES


def test_market1501_follows_the_real_conventions(synth_world: Path) -> None:
    root = synth_world / "market1501"
    ids: dict[str, list[tuple[int, int]]] = {}
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        names = sorted(p.name for p in (root / folder).glob("*.jpg"))
        assert names, folder
        parsed = []
        for name in names:
            m = MARKET_NAME.match(name)
            assert m, f"{folder}/{name} is not PPPP_cCsS_FFFFFF_NN.jpg"
            assert 1 <= int(m.group(2)) <= 6
            parsed.append((int(m.group(1)), int(m.group(2))))
        ids[folder] = parsed
        assert Image.open(root / folder / names[0]).size == (64, 128)
    train = {p for p, _ in ids["bounding_box_train"]}
    gallery = {p for p, _ in ids["bounding_box_test"] if p > 0}
    query = {p for p, _ in ids["query"]}
    assert not train & gallery, "train and test identities must be disjoint"
    assert min(train) > 0 and min(query) > 0, "junk and distractors only in the gallery"
    assert {-1, 0} <= {p for p, _ in ids["bounding_box_test"]}, "gallery needs junk (-1) and distractors (0000)"
    assert query == gallery
    pairs = ids["query"]
    assert len(pairs) == len(set(pairs)), "one query per identity and camera"
    gallery_cams = defaultdict(set)
    for p, c in ids["bounding_box_test"]:
        gallery_cams[p].add(c)
    for p, c in pairs:
        assert len(gallery_cams[p]) >= 2 and gallery_cams[p] - {c}, f"query {p} c{c} has no cross-camera match"
    rows = _gt(synth_world / "market1501_gt.parquet")
    assert len(rows) == sum(len(v) for v in ids.values())


def test_pa100k_annotation_mat(synth_world: Path) -> None:
    mat = scipy.io.loadmat(synth_world / "pa100k" / "annotation.mat")
    assert [str(a[0][0]) for a in mat["attributes"]] == list(ATTRIBUTES)
    counts = {}
    for split in ("train", "val", "test"):
        names = [str(mat[f"{split}_images_name"][i][0][0]) for i in range(len(mat[f"{split}_images_name"]))]
        labels = mat[f"{split}_label"]
        assert labels.shape == (len(names), 26) and set(np.unique(labels)) <= {0, 1}
        assert all((synth_world / "pa100k" / "data" / n).is_file() for n in names)
        counts[split] = len(names)
        gt = {r["key"]: r for r in _gt(synth_world / "pa100k_gt.parquet") if r["split"] == split}
        for name, label in zip(names, labels, strict=True):
            assert list(label) == gt[name[:-4]]["attributes"]
    total = sum(counts.values())
    assert counts["train"] == round(0.8 * total) and counts["val"] == round(0.1 * total)


def test_identity_keeps_its_look_across_cameras(synth_world: Path) -> None:
    rows = _gt(synth_world / "gt.parquet")
    stable = [i for i, name in enumerate(ATTRIBUTES) if name not in VIEW_DEPENDENT]
    by_id = defaultdict(list)
    for r in rows:
        by_id[r["identity"]].append(r)
    assert len(by_id) == 12
    for person, items in by_id.items():
        vectors = {tuple(np.asarray(r["attributes"])[stable]) for r in items}
        assert len(vectors) == 1, f"identity {person} changes attributes between images"
        assert len({r["camera"] for r in items}) >= 2, f"identity {person} seen by one camera only"
    views = {r["view"] for r in rows}
    assert views == {"front", "back", "side"}
    for r in rows:  # captions say what the attributes say
        a = dict(zip(ATTRIBUTES, r["attributes"], strict=True))
        text = r["caption"]
        assert ("backpack" in text) == bool(a["Backpack"])
        assert ("skirt" in text) == bool(a["Skirt&Dress"])
        assert bool(re.search(r"long [a-z ]*coat", text)) == bool(a["LongCoat"])
        assert ("woman" in text or "girl" in text) == bool(a["Female"])


def test_keypoints_agree_with_part_mask(synth_world: Path) -> None:
    rows = _gt(synth_world / "gt.parquet") + _gt(synth_world / "pa100k_gt.parquet")
    visible = total = 0
    for r in rows:
        mask = _mask(r)
        kps = np.asarray(r["keypoints"], np.float32).reshape(17, 3)
        for name, (x, y, v) in zip(COCO_KEYPOINTS, kps, strict=True):
            total += 1
            if v == 0:
                assert x == 0 and y == 0
                continue
            assert 0 <= x < r["width"] and 0 <= y < r["height"], f"{r['key']} {name} outside but v={v}"
            if v == 2:
                visible += 1
                part = PARTS[mask[int(y), int(x)]]
                assert part in ALLOWED[name.split("_")[-1]], f"{r['key']}: visible {name} lies on {part}"
        if r["view"] == "back":
            assert kps[0, 2] < 2, "the nose is hidden when seen from behind"
    assert visible > 0.6 * total


def test_render_person_is_deterministic() -> None:
    look = random_look(np.random.default_rng(1))
    camera = make_camera(3, 0)
    a = render_person(np.random.default_rng(5), look, camera, 256, 128)
    b = render_person(np.random.default_rng(5), look, camera, 256, 128)
    c = render_person(np.random.default_rng(6), look, camera, 256, 128)
    assert a[0].shape == (256, 128, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (256, 128) and a[2].shape == (17, 3) and a[2].dtype == np.float32
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_is_byte_identical_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    tiny = ["identities=4", "seed=11", "quiet=true", "pa100k_images=10", "frames_per_track=2", "dense=[prw]",
            "region_pairs=2"]  # fmt: skip
    one = write_world(load_config(SynthConfig, overrides=[*tiny, "preview=true"]), tmp_path / "one")
    two = write_world(load_config(SynthConfig, overrides=[*tiny, "workers=2"]), tmp_path / "two")
    other = write_world(
        load_config(SynthConfig, overrides=["identities=4", "seed=12", "quiet=true", "dense=[]"]), tmp_path / "o"
    )
    assert one["luperson"] == two["luperson"]
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    a.pop("preview.png")
    assert a.pop("synth_config.yaml") != b.pop("synth_config.yaml")  # records workers
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    c = _files(tmp_path / "o")
    shared = [k for k in a if k.endswith(".jpg") and k in c]
    assert shared and all(a[k] != c[k] for k in shared)
    preview = Image.open(tmp_path / "one" / "preview.png")
    assert preview.width > 1000 and preview.height > 256
    assert other["market1501"]["query_images"] > 0
    # the dense sets are written in place, in their real layout, and only those asked for
    assert (tmp_path / "one" / "prw" / "query_info.txt").is_file() and "prw" in one["dense"]
    assert not (tmp_path / "o" / "prw").exists() and other["dense"] == []
    # region_pairs=2: region rows (boxes inside their image) next to every whole-image row, read by clip-train
    images, _, boxes = read_pairs(tmp_path / "one" / "pairs.csv")
    regions = [(i, box) for i, box in zip(images, boxes, strict=True) if box is not None]
    assert len(regions) > len(images) - len(regions) == one["luperson"]["images"]
    for image, (x0, y0, x1, y1) in regions:
        width, height = Image.open(image).size
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    with pytest.raises(ConfigError, match="dense may list only"):
        write_world(load_config(SynthConfig, overrides=["dense=[kitti]"]), tmp_path / "k")


def test_config_and_output_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="identities"):
        load_config(SynthConfig, overrides=["identitis=3"])
    with pytest.raises(ConfigError, match="identities must be"):
        write_world(SynthConfig(identities=1), tmp_path / "w")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ClaspError, match="not empty"):
        write_world(SynthConfig(identities=2, quiet=True), tmp_path / "busy")


@pytest.mark.parametrize("height", [169, 338, 591])
def test_background_window_when_the_scale_is_capped_at_the_scene_height(height: int) -> None:
    # A tiny person makes the window as tall as the scene: SCENE_H - height * (SCENE_H / height) is -5.7e-14 for
    # these heights, which crashed `clasp synth -n 600` at image 1,413 ("box offset can't be negative").
    from pipeline.synth.scene import background_window

    window = background_window(
        make_camera(0, 1), height=height, width=height // 2, scene_x=0.5, depth=0.5, person_px=1.0,
        feet_y=height * 0.95, cx=height / 4,
    )  # fmt: skip
    assert window.size == (height // 2, height)


def test_a_failed_world_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.synth.world as world

    def broken(job):  # noqa: ANN001
        raise ValueError("render failed")

    monkeypatch.setattr(world, "render_job", broken)
    with pytest.raises(ValueError, match="render failed"):
        write_world(load_config(SynthConfig, overrides=["identities=2", "quiet=true", "dense=[]"]), tmp_path / "w")
    assert list(tmp_path.iterdir()) == []  # neither the world nor its temporary folder


def test_dense_scale_sizes_the_dense_sets(tmp_path: Path) -> None:
    from pipeline.synth.world import dense_sizes

    assert dense_sizes("lip", 1.0) == {}
    assert dense_sizes("lip", 2.0) == {"train_images": 1200, "val_images": 300}
    assert dense_sizes("cuhk_sysu", 0.01)["test_ids"] == 24  # TestG20 needs its test scenes
    summary = write_world(
        load_config(SynthConfig, overrides=["identities=2", "quiet=true", "dense=[citypersons]", "dense_scale=0.1"]),
        tmp_path / "w",
    )
    images = sorted((tmp_path / "w" / "citypersons" / "leftImg8bit").rglob("*.png"))
    assert summary["dense"] == ["citypersons"] and len(images) == 6 + 3
    with pytest.raises(ConfigError, match="dense_scale"):
        write_world(load_config(SynthConfig, overrides=["dense_scale=0"]), tmp_path / "z")


@pytest.mark.slow
@pytest.mark.parametrize("identities", [600, 5000])
def test_world_at_size(tmp_path: Path, identities: int) -> None:
    # 600 identities crashed at image 1,413 before the background window fix; 5,000 is ~45k images (minutes).
    cfg = load_config(SynthConfig, overrides=[f"identities={identities}", "quiet=true", "dense=[]", "workers=2"])
    summary = write_world(cfg, tmp_path / "w")
    assert summary["luperson"]["images"] == identities * cfg.tracks_per_identity * cfg.frames_per_track
    assert (tmp_path / "w" / "world.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary folder left beside it
