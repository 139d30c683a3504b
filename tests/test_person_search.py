"""Person search: the synthetic CUHK-SYSU / PRW writers produce the real files, the readers read them with
the protocol's structure intact, the protocol scores a perfect searcher 1.0, and a tiny two-stage run writes
its results."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat

from pipeline.config import load_config
from pipeline.errors import ClaspError
from pipeline.synth.person_search import write_cuhk_sysu, write_prw
from transfer.person_search import metrics as ps_metrics
from transfer.person_search.datasets import UNLABELED, PersonSearchData, load_person_search
from transfer.person_search.train import CONFIG, run, search_scores

SMALL = {"height": 128, "width": 256, "per_scene": (1, 2), "passers_by": (0, 1)}


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ps") / "cuhk_sysu"
    return write_cuhk_sysu(out, seed=3, train_ids=8, test_ids=6, distractor_scenes=4, gallery_sizes=(5, 8), **SMALL)


@pytest.fixture(scope="module")
def prw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ps") / "PRW-v16.04.20"
    return write_prw(out, seed=4, train_ids=8, test_ids=5, cameras=4, appearances=(2, 3), **SMALL)


def _fields(array: np.ndarray) -> tuple[str, ...]:
    return tuple(array.dtype.names)


def test_cuhk_sysu_files_are_the_real_structs(cuhk: Path) -> None:
    ann = cuhk / "annotation"
    img = loadmat(ann / "Images.mat")["Img"]
    assert _fields(img) == ("imname", "nAppear", "box") and img.shape[0] == 1
    assert _fields(img[0, 0]["box"]) == ("idlocate", "ishard")
    names = [str(item["imname"][0]) for item in img[0]]
    assert all(re.fullmatch(r"s\d+\.jpg", n) and (cuhk / "Image" / "SSM" / n).is_file() for n in names)
    for item in img[0]:  # nAppear counts the boxes; every box has area
        boxes = np.array([b[0].ravel() for b in item["box"][0]])
        assert int(item["nAppear"][0, 0]) == len(boxes) >= 1 and (boxes[:, 2:] > 0).all()
    pool = loadmat(ann / "pool.mat")["pool"]
    assert pool.dtype == object and pool.shape[1] == 1  # a MATLAB cell column
    test = loadmat(ann / "test" / "train_test" / "TestG5.mat")["TestG5"]
    assert _fields(test) == ("Query", "Gallery")
    assert _fields(test[0, 0]["Query"]) == ("imname", "idlocate", "ishard", "idname")
    assert _fields(test[0, 0]["Gallery"]) == ("imname", "idlocate", "ishard")
    train = loadmat(ann / "test" / "train_test" / "Train.mat")["Train"]
    assert train.dtype == object and _fields(train[0, 0]) == ("idname", "nAppear", "scene")
    person = loadmat(ann / "Person.mat")["Person"]
    train_names = {str(t[0, 0]["idname"][0]) for t in train.ravel()}
    query_names = {str(q["Query"][0, 0]["idname"][0]) for q in test[0]}
    assert train_names.isdisjoint(query_names)  # disjoint identities
    assert {str(p["idname"][0]) for p in person[0]} == train_names | query_names


def test_cuhk_sysu_reader_and_gallery_invariants(cuhk: Path) -> None:
    data = load_person_search("cuhk_sysu", cuhk.parent)  # a parent folder is found too
    protocol = data.cuhk_protocol
    assert protocol is not None and sorted(protocol.galleries) == [5, 8]
    pool = set(protocol.test_frames)
    assert {s.name for s in data.gallery} == pool and pool.isdisjoint({s.name for s in data.train})
    assert len(data.queries) >= 4 and len(data.train_ids) >= 6
    scenes = {s.name: s for s in data.gallery}  # test ids are query numbers, train ids Train.mat's: separate
    for size, galleries in protocol.galleries.items():
        for query, gallery in zip(data.queries, galleries, strict=True):
            names = [name for name, _ in gallery]
            assert len(names) == len(set(names)) == size and query.frame not in names and set(names) <= pool
            has_target = [box is not None for _, box in gallery]
            assert any(has_target) and has_target == sorted(has_target, reverse=True)  # targets listed first
            for name, box in gallery:  # a target box is that identity's annotated box; others lack it
                hit = (np.abs(scenes[name].boxes_xyxy - np.asarray(box if box is not None else -9)) < 1e-3).all(1)
                assert (box is not None) == (query.pid in scenes[name].pids)
                if box is not None:
                    assert scenes[name].pids[hit].tolist() == [query.pid]
            holders = {n for n, s in scenes.items() if query.pid in s.pids} - {query.frame}
            assert holders <= set(names)  # every other scene of the query identity is in its gallery
            assert query.pid in scenes[query.frame].pids


def test_prw_files_and_reader(prw: Path) -> None:
    ids = {s: set(loadmat(prw / f"ID_{s}.mat")[f"ID_{s}"].ravel().astype(int)) for s in ("train", "test")}
    assert ids["train"].isdisjoint(ids["test"])
    raw = (prw / "query_info.txt").read_bytes()
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    data = load_person_search("prw", prw)
    assert all(re.fullmatch(r"c\ds1_\d{6}\.jpg", s.name) for s in data.train + data.gallery)
    for split, scenes in (("train", data.train), ("test", data.gallery)):
        for scene in scenes:
            rows = loadmat(prw / "annotations" / f"{scene.name}.mat")["box_new"]
            assert rows.shape == (len(scene.pids), 5)
            assert set(rows[:, 0].astype(int)) <= ids[split] | {-2}
            assert np.allclose(scene.boxes_xyxy[:, 2:] - scene.boxes_xyxy[:, :2], rows[:, 3:])
            assert scene.cam_id == int(scene.name[1]) - 1
    frames = {s.name: s for s in data.gallery}
    assert data.queries and {q.pid for q in data.queries} <= ids["test"]
    for q in data.queries:
        scene = frames[q.frame]
        assert q.pid in scene.pids and np.allclose(scene.boxes_xyxy[scene.pids == q.pid][0], q.box_xyxy)
        other_cams = {s.cam_id for s in data.gallery if q.pid in s.pids} - {q.cam_id}
        assert other_cams  # findable across cameras
        crop = prw / "query_box" / f"{q.pid}_{q.frame[:-4]}.jpg"
        assert crop.is_file()
    assert (UNLABELED == -1) and any((s.pids == UNLABELED).any() for s in data.gallery)


def _one_hot_search(data: PersonSearchData, *, scramble: bool) -> dict:
    """Search with ground-truth boxes as detections and identity one-hot embeddings (unlabelled: zeros)."""
    dim = 1 + max(max(int(p) for s in data.gallery for p in s.pids), max(q.pid for q in data.queries))
    rng = np.random.default_rng(0)

    def embed(pids: np.ndarray) -> np.ndarray:
        feats = np.zeros((len(pids), dim), np.float32)
        for i, pid in enumerate(pids):
            if pid != UNLABELED:
                feats[i, int(rng.integers(dim)) if scramble else int(pid)] = 1.0
        return feats

    detections = {
        s.name: ps_metrics.FrameDetections(s.boxes_xyxy, np.ones(len(s.pids)), embed(s.pids)) for s in data.gallery
    }
    query_feats = embed(np.array([q.pid for q in data.queries]))
    cfg = load_config(CONFIG, None, ["eval.gallery_size=8"])
    return search_scores(data, query_feats, detections, cfg)


def test_perfect_searcher_scores_one(cuhk: Path, prw: Path) -> None:
    for data in (load_person_search("cuhk_sysu", cuhk), load_person_search("prw", prw)):
        perfect = _one_hot_search(data, scramble=False)
        assert perfect["mAP"] == pytest.approx(1.0) and perfect["top1"] == pytest.approx(1.0)
        assert _one_hot_search(data, scramble=True)["mAP"] < 0.9


def test_reader_errors_name_the_file(cuhk: Path, tmp_path: Path) -> None:
    with pytest.raises(ClaspError, match="no cuhk_sysu layout"):
        load_person_search("cuhk_sysu", tmp_path)
    with pytest.raises(ClaspError, match="unknown person search dataset"):
        load_person_search("psdb", cuhk)
    assert sorted(load_person_search("cuhk_sysu", cuhk, gallery_sizes=[8]).cuhk_protocol.galleries) == [8]
    with pytest.raises(ClaspError, match=r"galleries of sizes \[5, 8\] only"):
        load_person_search("cuhk_sysu", cuhk, gallery_sizes=[100])
    with pytest.raises(ClaspError, match="gallery sizes"):
        write_cuhk_sysu(tmp_path / "x", seed=0, train_ids=2, test_ids=1, distractor_scenes=0, gallery_sizes=(50,))


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on the shared machine
    yield
    torch.set_num_threads(threads)


def test_tiny_end_to_end_run(cuhk: Path, tmp_path: Path, one_thread: None) -> None:
    overrides = [
        f"data_dir={cuhk}",
        "dataset=cuhk_sysu",
        f"out_dir={tmp_path / 'run'}",
        "quiet=true",
        "backbone.spec=random:vit_tiny_patch16_224",
        "backbone.timm_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "detector.img_size=[128, 256]",
        "detector.min_size=128",
        "detector.max_size=256",
        "detector.epochs=1",
        "detector.max_steps_per_epoch=1",
        "detector.out_channels=32",
        "detector.representation_size=64",
        "detector.extra={scales: [1.0, 0.5], anchor_sizes: [[32, 45], [64, 90], [128, 181]],"
        " rpn_pre_nms_top_n_train: 200, rpn_post_nms_top_n_train: 100,"
        " rpn_pre_nms_top_n_test: 200, rpn_post_nms_top_n_test: 50,"
        " box_batch_size_per_image: 64}",
        "detector.detections_per_img=20",
        "detector.box_score_thresh=0.0",
        "embed.data.img_size=[64, 32]",
        "embed.data.p_identities=4",
        "embed.data.k_instances=2",
        "embed.epochs=2",
        "embed.max_steps_per_epoch=2",
        "eval.gallery_size=5",
        "eval.det_thresh=0.0",
        "workers=0",
        "device=cpu",
    ]
    cfg = load_config(CONFIG, None, overrides)
    record = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"] == record["metrics"]
    for key in ("metrics", "metrics_gt_boxes"):
        assert 0.0 <= saved[key]["mAP"] <= 1.0 and 0.0 <= saved[key]["top1"] <= 1.0
    assert saved["training"]["detector"]["steps"] == 1 and saved["training"]["embedding"]["steps"] == 4
    assert "gallery size 5" in saved["protocol"] and "CUHK-SYSU" in (tmp_path / "run" / "results.md").read_text()
    assert not (tmp_path / "run" / "detector" / "checkpoint.pt").exists()
    assert run(cfg) == record  # a finished run is returned, not redone
    with pytest.raises(ClaspError, match="galleries of sizes"):
        run(load_config(CONFIG, None, [*overrides, f"out_dir={tmp_path / 'bad'}", "eval.gallery_size=100"]))
