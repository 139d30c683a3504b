"""Pedestrian detection: the synthetic CityPersons writer read back through the real-layout reader, the
training targets (ignore boxes, flip), the ViTDet pyramid's strides, ignore regions kept out of the
detector's losses, and a tiny fine-tune writing MR^-2 results in the official protocol."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import ClaspError
from pipeline.synth.citypersons import scene_annotations, write_citypersons
from pipeline.synth.crowd import compose_scene
from pipeline.synth.scene import make_camera
from transfer.backbone import BackboneConfig, build_backbone
from transfer.detection.datasets import CityPersonsDataset, collate, load_citypersons
from transfer.detection.metrics import citypersons_all_setups, citypersons_miss_rate
from transfer.detection.model import SimpleFeaturePyramid, build_detector

TINY = BackboneConfig(spec="random:vit_micro", timm_kwargs={"depth": 1, "dynamic_img_size": True}, drop_path_rate=0.0)
NAME = re.compile(r"^([a-z]+)_\d{6}_\d{6}_leftImg8bit\.png$")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cp") / "citypersons"
    return write_citypersons(root, seed=3, train_images=4, val_images=3, height=128, width=256, cities=2)


def _gt_detections(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["ignore"]
    ]


# --- writer + reader -----------------------------------------------------------------------------------


def test_synthetic_citypersons_has_the_real_layout_and_fields(synth):
    for split, count, cities in (("train", 4, {"aachen", "bochum"}), ("val", 3, {"frankfurt", "lindau"})):
        data = load_citypersons(synth, split)
        assert data.gt_file == synth / "annotations" / f"{split}_gt.json"
        assert len(data) == count and data.image_ids == list(range(1, count + 1))
        for image, path in zip(data.gt["images"], data.paths, strict=True):
            match = NAME.match(image["im_name"])
            assert match and match.group(1) in cities
            assert path == synth / "leftImg8bit" / split / match.group(1) / image["im_name"]
            assert Image.open(path).size == (256, 128) and (image["width"], image["height"]) == (256, 128)
        anns = data.gt["annotations"]
        assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))  # id 0 would score as a false positive
        for a in anns:
            assert a["category_id"] == 1 and a["height"] == a["bbox"][3]
            x, y, w, h = a["bbox"]
            vx, vy, vw, vh = a["vis_bbox"]
            assert 0 < a["vis_ratio"] <= 1 and vw > 0 and vh > 0
            assert x <= vx and y <= vy and vx + vw <= x + w and vy + vh <= y + h  # visible part inside full body
    assert not list(synth.parent.glob("*.tmp-*"))  # no partial folder left behind
    with pytest.raises(ClaspError, match="not empty"):
        write_citypersons(synth, seed=3, train_images=1, val_images=1)


def test_scene_ignore_regions_become_ignore_annotations_and_hidden_people_none():
    scene = compose_scene(7, make_camera(0, 0, group=4), height=192, width=384, crowd_p=1.0, extra=(4, 6))
    anns = scene_annotations(scene)
    regions = [a for a in anns if a["ignore"]]
    assert scene.ignore and [tuple(a["bbox"]) for a in regions] == [tuple(round(v, 2) for v in b) for b in scene.ignore]
    people = [a for a in anns if not a["ignore"]]
    assert len(people) == sum(p.area > 0 for p in scene.persons)


def test_ground_truth_as_detections_scores_zero_miss_rate(synth):
    gt = json.loads((synth / "annotations" / "val_gt.json").read_text())
    dets = _gt_detections(gt)
    assert citypersons_miss_rate(gt, dets, "Reasonable") == 0.0
    assert citypersons_miss_rate(gt, [], "Reasonable") == 1.0


def _hand_dataset(root: Path) -> Path:
    """The official val_gt.json form: images named by ``im_name`` only, a rider (category 2) among them."""
    path = root / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(path)
    ann = {"iscrowd": 0, "vis_bbox": [0, 0, 1, 1]}
    gt = {
        "images": [{"id": 5, "im_name": path.name, "height": 100, "width": 200}],
        "categories": [{"id": 1, "name": "pedestrian"}],
        "annotations": [
            {**ann, "id": 1, "image_id": 5, "category_id": 1, "ignore": 0, "bbox": [10, 5, 24, 60], "height": 60,
             "vis_ratio": 0.9},  # positive
            {**ann, "id": 2, "image_id": 5, "category_id": 1, "ignore": 0, "bbox": [50, 5, 16, 40], "height": 40,
             "vis_ratio": 1.0},  # too small to train on: ignore box
            {**ann, "id": 3, "image_id": 5, "category_id": 1, "ignore": 1, "bbox": [100, 0, 30, 20], "height": 20,
             "vis_ratio": 1.0},  # ignore region
            {**ann, "id": 4, "image_id": 5, "category_id": 2, "ignore": 0, "bbox": [150, 10, 40, 80], "height": 80,
             "vis_ratio": 1.0},  # rider
        ],
    }  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations" / "val_gt.json").write_text(json.dumps(gt))
    return root


def test_reader_targets_ignore_boxes_and_flip(tmp_path):
    data = load_citypersons(_hand_dataset(tmp_path), "val")
    image, target, _ = CityPersonsDataset(data, train=False)[0]
    assert image.shape == (3, 100, 200) and target["image_id"].item() == 0 and data.image_ids == [5]
    assert target["boxes"].tolist() == [[10, 5, 34, 65]] and target["labels"].tolist() == [1]
    assert target["ignore_boxes"].tolist() == [[50, 5, 66, 45], [100, 0, 130, 20], [150, 10, 190, 90]]
    _, flipped, _ = CityPersonsDataset(data, train=True, flip_prob=1.0)[0]
    assert flipped["boxes"].tolist() == [[166, 5, 190, 65]]
    assert flipped["ignore_boxes"].tolist()[0] == [134, 5, 150, 45]
    images, targets, index = collate([CityPersonsDataset(data, train=False)[0]] * 2)
    assert images.shape == (2, 3, 100, 200) and len(targets) == 2 and index.tolist() == [0, 0]
    with pytest.raises(ClaspError, match="train_gt.json"):
        load_citypersons(tmp_path, "train")


# --- model -----------------------------------------------------------------------------------------------


def test_simple_feature_pyramid_strides_and_shapes():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(build_backbone(TINY, (64, 128)), out_channels=8)
    assert pyramid.strides == [4, 8, 16, 32, 64] and pyramid.names == ["0", "1", "2", "3", "pool"]
    maps = pyramid(torch.randn(2, 3, 64, 128))
    assert [tuple(m.shape) for m in maps.values()] == [(2, 8, 64 // s, 128 // s) for s in pyramid.strides]
    coarse = SimpleFeaturePyramid(build_backbone(TINY, (64, 128)), out_channels=8, scales=(2.0, 1.0), p6=False)
    assert coarse.strides == [8, 16] and [m.shape[-1] for m in coarse(torch.randn(1, 3, 96, 64)).values()] == [8, 4]


def test_anchors_and_proposals_inside_ignore_regions_leave_the_loss():
    torch.manual_seed(0)
    model = build_detector(TINY, img_size=(64, 128), min_size=64, max_size=128, out_channels=8)
    anchors = [torch.tensor([[0.0, 0, 10, 25], [100, 0, 110, 25], [103, 0, 113, 25], [60, 30, 70, 55]])]
    target = {"boxes": torch.tensor([[0.0, 0, 10, 25]]), "labels": torch.tensor([1])}
    ignore = {**target, "ignore_boxes": torch.tensor([[95.0, 0, 108, 30]])}
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [target])
    assert labels[0].tolist() == [1, 0, 0, 0]
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [ignore])
    assert labels[0].tolist() == [1, -1, -1, 0]  # IoA 0.8 and 0.5 (inclusive) drop out; 0.0 stays background
    model.roi_heads._ignore_boxes = [ignore["ignore_boxes"]]
    _, roi_labels = model.roi_heads.assign_targets_to_proposals(anchors, [target["boxes"]], [target["labels"]])
    assert roi_labels[0].tolist() == [1, -1, -1, 0]
    model.roi_heads._ignore_boxes = None


def test_detector_contract_train_losses_decrease_and_eval_boxes():
    torch.manual_seed(0)
    model = build_detector(TINY, img_size=(64, 128), min_size=64, max_size=128, out_channels=16,
                           representation_size=32, box_batch_size_per_image=64)  # fmt: skip
    images = torch.rand(2, 3, 64, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 5, 30, 55]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[70.0, 10, 86, 50], [20, 0, 40, 48]]), "labels": torch.tensor([1, 1])},
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    totals = []
    for _ in range(12):
        losses = model(list(images), targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert np.mean(totals[-3:]) < 0.7 * np.mean(totals[:3])
    model.eval()
    with torch.no_grad():
        out = model(list(images))
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    boxes = out[0]["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] <= 64).all()


# --- end to end ------------------------------------------------------------------------------------------


def test_tiny_fine_tune_writes_official_detections_and_mr(synth, tmp_path):
    from transfer.detection import train

    overrides = [
        f"data_dir={synth}", f"out_dir={tmp_path / 'run'}", "backbone.spec=random:vit_micro",
        "backbone.timm_kwargs={depth: 1}", "data.train_sizes=[128]", "data.test_size=128", "data.max_size=256",
        "data.batch_size=2", "data.workers=0", "data.min_height_px=30", "model.out_channels=16",
        "model.representation_size=32", "model.extra={box_batch_size_per_image: 64}", "epochs=1",
        "max_steps_per_epoch=2", "quiet=true", "device=cpu",
    ]  # fmt: skip
    record = train.run(load_config(train.CONFIG, None, overrides))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == record["metrics"]
    assert set(saved["metrics"]) == {
        f"MR-2 {s}" for s in ("Reasonable", "Reasonable_small", "Reasonable_occ=heavy", "All")
    }
    for value in saved["metrics"].values():
        assert value is None or 0.0 <= value <= 1.0
    assert saved["metrics"]["MR-2 Reasonable"] is not None
    assert "eval_MR_multisetup" in saved["protocol"] and "MR^-2 Reasonable (%)" in (out / "results.md").read_text()
    dets = json.loads((out / "detections_val.json").read_text())
    gt = json.loads((synth / "annotations" / "val_gt.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} and d["category_id"] == 1 for d in dets)
    assert {d["image_id"] for d in dets} <= {img["id"] for img in gt["images"]}
    rescored = citypersons_all_setups(gt, dets)
    assert all(saved["metrics"][f"MR-2 {k}"] == (None if math.isnan(v) else v) for k, v in rescored.items())
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint.pt").exists()

    # eval-only: the ground truth as detections file scores MR 0 on Reasonable
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(_gt_detections(gt)))
    scored = train.run(
        load_config(train.CONFIG, None, [f"data_dir={synth}", f"out_dir={tmp_path / 'eval'}", f"detections={perfect}"])
    )
    assert scored["metrics"]["MR-2 Reasonable"] == 0.0 and scored["detections_file"] == str(perfect)
