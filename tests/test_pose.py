"""Pose transfer: the synthetic COCO keypoints writer read back through the real reader, crop geometry,
heatmap encode/decode, flip pairs, OKS-NMS, and tiny end-to-end runs writing results with the protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import ClaspError
from pipeline.synth.coco_pose import write_coco_pose
from transfer.pose.datasets import (
    FLIP_PAIRS,
    CropSettings,
    PoseCrops,
    apply_affine,
    box_to_center_size,
    crop_affine,
    flip_permutation,
    load_coco_keypoints,
    warp_image,
)
from transfer.pose.heatmaps import decode_heatmaps, encode_heatmaps, from_heatmap_coords, to_heatmap_coords
from transfer.pose.metrics import COCO_KEYPOINT_NAMES, coco_keypoint_ap

TINY = [
    "backbone.spec=random:vit_tiny_patch16_224",
    "backbone.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
    "data.img_size=[64,48]",
    "data.batch_size=8",
    "data.workers=0",
    "head.channels=32",
    "device=cpu",
    "quiet=true",
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_pose(
        tmp_path_factory.mktemp("pose") / "coco", seed=3, train_images=10, val_images=4, height=128, width=192
    )


def _json(coco: Path, split: str) -> dict:
    return json.loads((coco / "annotations" / f"person_keypoints_{split}.json").read_text())


# --- the synthetic world in COCO's layout ----------------------------------------------------------


def test_writer_layout_and_annotations(coco: Path) -> None:
    from pycocotools import mask as mask_utils

    train, val = _json(coco, "train2017"), _json(coco, "val2017")
    assert len(train["images"]) == 10 and len(val["images"]) == 4
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}  # ids unique across splits
    (category,) = val["categories"]
    assert category["id"] == 1 and category["name"] == "person"
    assert tuple(category["keypoints"]) == COCO_KEYPOINT_NAMES and len(category["skeleton"]) == 19
    for split, record in (("train2017", train), ("val2017", val)):
        for img in record["images"]:
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"]) and int(img["file_name"][:12]) == img["id"]
            with Image.open(coco / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (192, 128)
    anns = train["annotations"] + val["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    people = [a for a in anns if not a["iscrowd"]]
    assert len(people) >= 14
    for a in anns:
        kp = np.asarray(a["keypoints"], dtype=float).reshape(17, 3)
        assert a["num_keypoints"] == int((kp[:, 2] > 0).sum()) and a["category_id"] == 1
        assert (kp[kp[:, 2] == 0, :2] == 0).all()  # unlabelled joints at (0, 0), as COCO writes them
        rle = mask_utils.frPyObjects(a["segmentation"], 128, 192)
        if a["iscrowd"]:
            assert a["num_keypoints"] == 0
        else:
            assert mask_utils.area(rle) == a["area"] > 0  # area of the visible segment
            x, y, w, h = a["bbox"]
            assert list(mask_utils.toBbox(rle)) == [x, y, w, h]  # box encloses the segment, as in COCO
            labelled = kp[kp[:, 2] > 0]
            assert (
                (labelled[:, 0] >= 0) & (labelled[:, 0] < 192) & (labelled[:, 1] >= 0) & (labelled[:, 1] < 128)
            ).all()


def test_writer_refuses_a_nonempty_folder(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "x").write_text("")
    with pytest.raises(ClaspError, match="not empty"):
        write_coco_pose(tmp_path / "coco", seed=0, train_images=1, val_images=1)


def test_reader_reads_the_synthetic_world(coco: Path) -> None:
    data = load_coco_keypoints(coco)
    train = _json(coco, "train2017")
    expected = [a for a in train["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    assert len(data.train) == len(expected)
    assert [p.bbox for p in data.train] == [tuple(a["bbox"]) for a in expected]
    assert all(Path(p.path).is_file() and p.score == 1.0 for p in data.train + data.test)
    np.testing.assert_allclose(data.train[0].keypoints.ravel(), expected[0]["keypoints"])
    assert data.test_gt.name == "person_keypoints_val2017.json" and data.boxes.startswith("ground truth")


def test_ground_truth_as_results_scores_ap_one(coco: Path) -> None:
    gt = _json(coco, "val2017")
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt["annotations"]
        if a["num_keypoints"] > 0
    ]
    assert coco_keypoint_ap(gt, results)["AP"] == pytest.approx(1.0)


def test_reader_detections_file(coco: Path, tmp_path: Path) -> None:
    val = _json(coco, "val2017")
    image_id = val["images"][0]["id"]
    dets = [
        {"image_id": image_id, "category_id": 1, "bbox": [10, 10, 30, 60], "score": 0.9},
        {"image_id": image_id, "category_id": 1, "bbox": [50, 10, 30, 60], "score": 0.05},  # below threshold
        {"image_id": image_id, "category_id": 2, "bbox": [50, 10, 30, 60], "score": 0.9},  # not a person
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    data = load_coco_keypoints(coco, detections=str(path), det_score_thr=0.1)
    assert [(p.image_id, p.bbox, p.score) for p in data.test] == [(image_id, (10.0, 10.0, 30.0, 60.0), 0.9)]
    assert data.test[0].keypoints is None and "detections file" in data.boxes
    path.write_text(json.dumps([{**dets[0], "image_id": -5}]))
    with pytest.raises(ClaspError, match="image_id -5"):
        load_coco_keypoints(coco, detections=str(path))


def test_reader_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    with pytest.raises(ClaspError, match="person_keypoints_train2017.json not found"):
        load_coco_keypoints(tmp_path)


# --- geometry, heatmaps, flips ---------------------------------------------------------------------


def test_box_grows_to_aspect_and_pads() -> None:
    center, size = box_to_center_size((10, 20, 30, 120), aspect_hw=256 / 192)
    np.testing.assert_allclose(center, [25, 80])
    np.testing.assert_allclose(size, [90 * 1.25, 120 * 1.25])  # width grown to 120 * 192 / 256 = 90
    _, size = box_to_center_size((0, 0, 100, 40), aspect_hw=2.0)
    np.testing.assert_allclose(size, [125, 250])


@pytest.mark.parametrize(("rotation", "flip"), [(0.0, False), (25.0, False), (0.0, True), (-30.0, True)])
def test_crop_moves_pixels_where_the_joints_go(rotation: float, flip: bool) -> None:
    img = np.zeros((100, 80, 3), np.uint8)
    img[40, 30] = 255
    matrix = crop_affine(np.array([35.0, 45.0]), np.array([40.0, 40.0]), (64, 48), rotation_deg=rotation, flip=flip)
    out = np.asarray(warp_image(Image.fromarray(img), matrix, (64, 48)))[..., 0].astype(float)
    ys, xs = np.mgrid[:64, :48]
    centroid = [(out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()]
    np.testing.assert_allclose(centroid, apply_affine(matrix, np.array([[30.0, 40.0]]))[0], atol=0.1)


def test_heatmap_round_trip_is_subpixel() -> None:
    rng = np.random.default_rng(0)
    joints = rng.uniform([1.5, 1.5], [46.5, 62.5], size=(17, 2))  # heatmap 48 wide, 64 high, away from the border
    targets, weights = encode_heatmaps(joints, np.ones(17, bool), (64, 48), sigma=2.0)
    assert weights.tolist() == [1.0] * 17 and targets.max() <= 1.0
    decoded = decode_heatmaps(torch.from_numpy(targets)[None])[0].numpy()
    error = np.abs(decoded[:, :2] - joints)
    assert error.max() <= 0.25 + 1e-6  # argmax error <= 0.5, the quarter step toward the higher neighbour halves it
    assert error.mean() < np.abs(np.round(joints) - joints).mean()  # better than the plain argmax
    # through the whole chain: image -> crop -> heatmap -> decoded -> image, 4 input pixels per heatmap pixel
    center, size = box_to_center_size((100, 50, 60, 200), aspect_hw=256 / 192)
    matrix = crop_affine(center, size, (256, 192))
    image_xy = rng.uniform([100, 50], [160, 250], size=(17, 2))
    hm = to_heatmap_coords(apply_affine(matrix, image_xy), 4)
    targets, _ = encode_heatmaps(hm, np.ones(17, bool), (64, 48))
    back = apply_affine(
        np.linalg.inv(matrix),
        from_heatmap_coords(decode_heatmaps(torch.from_numpy(targets)[None])[0, :, :2].numpy(), 4),
    )
    pixels_per_heatmap_px = 4 * size[0] / 192
    assert np.abs(back - image_xy).max() <= 0.25 * pixels_per_heatmap_px + 1e-6


def test_target_weights_follow_labels_and_bounds() -> None:
    joints = np.array([[10.0, 10.0], [10.0, 10.0], [-7.0, 10.0], [-5.0, 10.0], [10.0, 70.0]])
    _, weights = encode_heatmaps(joints, np.array([1, 0, 1, 1, 1], bool), (64, 48), sigma=2.0)
    assert weights.tolist() == [1, 0, 0, 1, 0]  # unlabelled; Gaussian fully outside (3 sigma); touching; below


def test_flip_pairs_swap_left_and_right() -> None:
    perm = flip_permutation()
    assert [perm[p] for p in perm] == list(range(17))
    for k, name in enumerate(COCO_KEYPOINT_NAMES):
        mirrored = name.replace("left", "#").replace("right", "left").replace("#", "right")
        assert COCO_KEYPOINT_NAMES[perm[k]] == mirrored
    assert len(FLIP_PAIRS) == 8


def test_flipped_heatmaps_line_up_without_shift() -> None:
    # the flip test flips heatmaps back by plain index reversal: it must equal encoding the mirrored joints
    rng = np.random.default_rng(1)
    crop_xy = rng.uniform([5, 5], [43, 59], size=(17, 2))
    mirrored = crop_xy.copy()
    mirrored[:, 0] = 47 - crop_xy[:, 0]  # input 48 wide, pixel centres at integers
    a, _ = encode_heatmaps(to_heatmap_coords(crop_xy, 4), np.ones(17, bool), (16, 12))
    b, _ = encode_heatmaps(to_heatmap_coords(mirrored, 4), np.ones(17, bool), (16, 12))
    np.testing.assert_allclose(np.flip(b, axis=2), a, atol=1e-6)


def test_training_flip_swaps_joints(coco: Path) -> None:
    data = load_coco_keypoints(coco)
    settings = CropSettings(img_size=(64, 48), scale_factor=0.0, rotation_prob=0.0, flip_prob=1.0)
    flipped = PoseCrops(data.train[:1], settings, mean=(0, 0, 0), std=(1, 1, 1), train=True)
    plain = PoseCrops(data.train[:1], CropSettings(img_size=(64, 48)), mean=(0, 0, 0), std=(1, 1, 1), train=False)
    image_f, (heat_f, weight_f), _ = flipped[0]
    image_p, _, _ = plain[0]
    torch.testing.assert_close(image_f, torch.flip(image_p, dims=[2]))
    plain_train = PoseCrops(data.train[:1], settings, mean=(0, 0, 0), std=(1, 1, 1), train=True)
    plain_train.settings = CropSettings(img_size=(64, 48), scale_factor=0.0, rotation_prob=0.0, flip_prob=0.0)
    _, (heat_p, weight_p), _ = plain_train[0]
    perm = flip_permutation()
    torch.testing.assert_close(heat_f, torch.flip(heat_p, dims=[2])[perm], atol=1e-6, rtol=0)
    assert weight_f.tolist() == weight_p[perm].tolist()


def test_oks_nms_keeps_the_best_of_duplicates() -> None:
    from transfer.pose.train import oks_nms

    pose = np.column_stack([np.linspace(10, 50, 17), np.linspace(20, 100, 17), np.ones(17)])
    far = pose + [200, 0, 0]

    def res(kps: np.ndarray, score: float) -> dict:
        return {"image_id": 1, "keypoints": kps.ravel().tolist(), "score": score, "area": 4000.0}

    kept = oks_nms([res(pose, 0.5), res(pose + [0.5, 0, 0], 0.9), res(far, 0.1)], 0.9)
    assert [r["score"] for r in kept] == [0.9, 0.1]


# --- the model and end-to-end runs ----------------------------------------------------------------


def test_heatmap_loss_decreases_and_model_shapes(coco: Path) -> None:
    from transfer.backbone import BackboneConfig, build_backbone
    from transfer.pose.model import PoseModel
    from transfer.pose.train import heatmap_loss

    torch.manual_seed(0)
    cfg = BackboneConfig(spec="random:vit_tiny_patch16_224", timm_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    model = PoseModel(build_backbone(cfg, (64, 48)), 17, channels=32)
    assert model.stride == 4
    data = load_coco_keypoints(coco)
    crops = PoseCrops(data.train[:4], CropSettings(img_size=(64, 48)), mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    images, (targets, weights), _ = next(iter(torch.utils.data.DataLoader(crops, batch_size=4)))
    assert model(images).shape == targets.shape == (4, 17, 16, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = heatmap_loss(model(images), targets, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_end_to_end_gt_boxes_and_detections(coco: Path, tmp_path: Path) -> None:
    from transfer.pose.train import CONFIG, run

    out = tmp_path / "run"
    cfg = load_config(CONFIG, overrides=[*TINY, f"data_dir={coco}", f"out_dir={out}", "epochs=2"])
    record = run(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == record["metrics"] and 0.0 <= saved["metrics"]["AP"] <= 1.0
    assert 0.0 <= saved["metrics"]["AR"] <= 1.0
    assert "ground truth" in saved["protocol"] and "flip test on" in saved["protocol"] and "64x48" in saved["protocol"]
    assert saved["training"]["steps"] == 2 * (len(load_coco_keypoints(coco).train) // 8)
    results = json.loads((out / "keypoints_val2017_results.json").read_text())
    assert results and all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in results)
    assert (out / "results.md").read_text().count("| AP |") == 1 and (out / "model.safetensors").is_file()
    assert run(cfg) == saved  # a finished run is not redone
    # the same fine-tune evaluated on a detections file
    val = _json(coco, "val2017")
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.8} for a in val["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    det_cfg = load_config(
        CONFIG,
        overrides=[*TINY, f"data_dir={coco}", f"out_dir={tmp_path / 'det'}", "epochs=1", "eval.flip_test=false",
                   f"data.detections={tmp_path / 'dets.json'}"],
    )  # fmt: skip
    det_record = run(det_cfg)
    assert "detections file" in det_record["protocol"] and "flip test off" in det_record["protocol"]
    assert 0.0 <= det_record["metrics"]["AP"] <= 1.0


def test_predictions_map_back_to_image_pixels(coco: Path) -> None:
    """A heatmap peak at heatmap pixel (6, 8) of a 64x48 crop lands where the geometry says, worked by hand."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from transfer.pose.datasets import PersonBox
    from transfer.pose.train import CONFIG, predict_keypoints

    class PeakModel(torch.nn.Module):
        backbone = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3)
        stride = 4

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            heat, _ = encode_heatmaps(np.tile([[6.0, 8.0]], (17, 1)), np.ones(17, bool), (16, 12))
            return torch.from_numpy(heat)[None].repeat(images.shape[0], 1, 1, 1)

    path = str(next((coco / "val2017").iterdir()))
    # box 30x80 grown to 60x80 (aspect 64:48), padded to 75x100 around (55, 60): 0.64 crop px per image px;
    # heatmap (6, 8) = crop pixel centre (26, 34) - 0.5 = 2 crop px right of and below the crop centre (24, 32)
    people = [PersonBox(7, path, (40, 20, 30, 80), 0.8), PersonBox(7, path, (40, 20, 30, 80), 0.5)]
    cfg = load_config(CONFIG, overrides=[*TINY, "eval.flip_test=false"])
    results = predict_keypoints(PeakModel(), people, cfg, Accelerator(cpu=True))
    assert len(results) == 1 and results[0]["score"] == pytest.approx(0.8)  # the duplicate pose is OKS-suppressed
    kps = np.asarray(results[0]["keypoints"]).reshape(17, 3)
    np.testing.assert_allclose(kps[:, :2], np.tile([55 + 2 / 0.64 - 0.5, 60 + 2 / 0.64 - 0.5], (17, 1)), atol=1e-3)
    np.testing.assert_allclose(kps[:, 2], 1.0)
