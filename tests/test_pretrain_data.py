"""The pre-training stream: labels reach the right image, part maps follow the crop, ranks read disjoint data.

The corpora here are built by hand: image shards whose pixels encode the image's key and label
shards whose values encode the same key (or each cell's own position), so misalignment shows.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.pretraining import LABELSET, image_colour, stream_for, tiny_config, write_corpus
from PIL import Image

from pipeline import formats
from pretrain.augment import IGNORE_PART, CropBox, MultiCrop, crop_part_map
from pretrain.data import LabelMismatchError


@pytest.mark.parametrize("workers", [0, 2])
def test_labels_arrive_with_their_image(tmp_path: Path, workers: int) -> None:
    root = write_corpus(tmp_path)
    cfg = tiny_config(root, f"data.workers={workers}")
    stream = stream_for(cfg)
    assert stream.labelset.labelset == LABELSET and stream.num_images == 32
    seen = []
    batches = stream.batches()
    for _ in range(8):
        batch = next(batches)
        assert batch["global_crops"].shape == (4, 2, 32, 16, 3) and batch["global_crops"].dtype == torch.uint8
        assert batch["local_crops"].shape == (4, 2, 16, 8, 3)
        assert batch["part_map"].shape == (4, 2, 4, 2) and batch["part_conf"].shape == (4, 2, 4, 2)
        for b, key in enumerate(batch["key"]):
            s, i = int(key[4:6]), int(key[7:10])
            # the label row encodes its key ...
            assert np.allclose(batch["attr_prob"][b].numpy() * 255, [s, i, 7], atol=1e-3)
            # ... and the image pixels encode the same key
            colour = batch["global_crops"][b].float().mean(dim=(0, 1, 2)).numpy()
            assert np.abs(colour - np.array(image_colour(s, i))).max() < 6, (key, colour)
            seen.append(key)
    assert len(set(seen)) == 32  # one epoch covers the corpus exactly once


def test_label_rows_out_of_order_is_a_hard_error(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, shards=2, scramble_shard=1)
    stream = stream_for(tiny_config(root))
    with pytest.raises(LabelMismatchError) as err:
        batches = stream.batches()
        for _ in range(8):
            next(batches)
    message = str(err.value)
    assert "toy-000001.tar" in message and "toy-000001.parquet" in message


def test_missing_label_shard_is_named(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, shards=2)
    formats.label_shard_path(root, "toy", LABELSET, 1).unlink()
    with pytest.raises(Exception, match="toy-000001.parquet"):
        stream_for(tiny_config(root))


@pytest.mark.parametrize("shards,per_shard", [(4, 8), (2, 16)])  # whole shards; sample-stride slices
def test_ranks_and_workers_read_disjoint_data_within_an_epoch(tmp_path: Path, shards: int, per_shard: int) -> None:
    root = write_corpus(tmp_path, shards=shards, per_shard=per_shard)
    per_rank = []
    for rank in range(2):
        stream = stream_for(tiny_config(root, "data.workers=2"), rank=rank, world_size=2)
        batches = stream.batches()
        keys = [k for _ in range(4) for k in next(batches)["key"]]  # one epoch: 4 steps x 4 images x 2 ranks
        assert len(set(keys)) == len(keys) == 16
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 32


def test_a_resumed_stream_replays_exactly_and_epochs_differ(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, shards=2)
    cfg = tiny_config(root, "data.photometric=true")
    stream = stream_for(cfg)
    whole = list(itertools.islice(stream.batches(), 8))  # 2 epochs of 16 images in batches of 4
    resumed = list(itertools.islice(stream.batches(start_batch=3), 5))
    for x, y in zip(whole[3:], resumed, strict=True):
        assert x["key"] == y["key"] and (x["global_crops"] == y["global_crops"]).all()
        assert (x["local_crops"] == y["local_crops"]).all() and (x["part_map"] == y["part_map"]).all()
    assert sorted(k for b in whole[:4] for k in b["key"]) == sorted(k for b in whole[4:] for k in b["key"])
    assert [b["key"] for b in whole[:4]] != [b["key"] for b in whole[4:]]  # another order in epoch 1


# --- geometry ---------------------------------------------------------------------------------


def position_image(h: int, w: int) -> Image.Image:
    """R encodes x, G encodes y (pixel centres), so a crop's pixels say where they came from."""
    ys, xs = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xs + 0.5) * 255 / w, (ys + 0.5) * 255 / h, np.zeros_like(xs)], -1)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def decoded_cells(view: np.ndarray, token_hw: tuple[int, int], img_hw: tuple[int, int], grid: tuple[int, int]):
    """Label cell (row, col) under each token centre, read from the crop's own pixels."""
    th, tw = token_hw
    ph, pw = view.shape[0] // th, view.shape[1] // tw
    centre = view[ph // 2 :: ph, pw // 2 :: pw][:th, :tw].astype(np.float64)
    # average the 2x2 pixels around the token centre to sit exactly on it
    centre = (
        centre
        + view[ph // 2 - 1 :: ph, pw // 2 :: pw][:th, :tw]
        + view[ph // 2 :: ph, pw // 2 - 1 :: pw][:th, :tw]
        + view[ph // 2 - 1 :: ph, pw // 2 - 1 :: pw][:th, :tw]
    ) / 4
    x = centre[..., 0] / 255 * img_hw[1]
    y = centre[..., 1] / 255 * img_hw[0]
    return y * grid[0] / img_hw[0], x * grid[1] / img_hw[1]


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_part_map_follows_crop_resize_and_flip(flip_p: float) -> None:
    img_hw, grid = (320, 160), (16, 8)
    image = position_image(*img_hw)
    part_map = np.arange(grid[0] * grid[1], dtype=np.uint8).reshape(grid)  # each cell names itself
    conf = np.full(grid, 1.0, np.float32)
    crop = MultiCrop(
        global_hw=(128, 64), local_hw=(64, 32), patch_size=8, num_local=0, global_scale=(0.2, 0.9),
        flip_p=flip_p, photometric=False,
    )  # fmt: skip
    rng = random.Random(3)
    checked = 0
    for _ in range(10):
        out = crop(image, part_map, conf, rng)
        for g in range(2):
            view = out["global_crops"][g].numpy()
            cells = out["part_map"][g].numpy()
            rows_f, cols_f = decoded_cells(view, (16, 8), img_hw, grid)
            labelled_row, labelled_col = np.divmod(cells, grid[1])
            # the pixel under each token lies in the label cell that token got (within 0.15 cell of an edge)
            assert (cells >= 0).all()
            assert np.all((rows_f > labelled_row - 0.15) & (rows_f < labelled_row + 1.15))
            assert np.all((cols_f > labelled_col - 0.15) & (cols_f < labelled_col + 1.15))
            # the check can fail: the same labels mirrored disagree with the pixels
            mirrored_col = labelled_col[:, ::-1]
            assert not np.all((cols_f > mirrored_col - 0.15) & (cols_f < mirrored_col + 1.15))
            checked += cells.size
    assert checked == 10 * 2 * 128


def test_cells_outside_the_image_are_ignored_and_flip_swaps_sides() -> None:
    grid = (4, 2)
    part_map = np.array([[1, 1], [2, 3], [2, 3], [4, 4]], dtype=np.uint8)  # left_arm=2 left, right_arm=3 right
    conf = np.full(grid, 0.5, np.float32)
    # a box hanging half off the right edge of a 40x20 image
    box = CropBox(top=0, left=10, height=40, width=20, flip=False)
    classes, confs = crop_part_map(part_map, conf, box, (40, 20), (4, 2))
    assert (classes[:, 1] == IGNORE_PART).all() and (confs[:, 1] == 0).all()
    assert (classes[:, 0] == [1, 3, 3, 4]).all() and (confs[:, 0] == 0.5).all()
    # whole image mirrored, with and without the left/right class swap
    full = CropBox(top=0, left=0, height=40, width=20, flip=True)
    plain, _ = crop_part_map(part_map, conf, full, (40, 20), (4, 2))
    assert (plain == part_map[:, ::-1]).all()
    swap = np.array([0, 1, 3, 2, 4])
    swapped, _ = crop_part_map(part_map, conf, full, (40, 20), (4, 2), flip_map=swap)
    assert (swapped[1:3] == [[2, 3], [2, 3]]).all()  # left arm is on the left again, as in a real mirror image


def test_flip_pairs_from_config_reach_the_crop(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, shards=1)
    stream = stream_for(tiny_config(root, "data.part_flip={left_arm: right_arm}"))
    assert stream.labelset.flip_map == (0, 1, 3, 2, 4)
    with pytest.raises(Exception, match="left_leg"):
        stream_for(tiny_config(root, "data.part_flip={left_leg: right_leg}"))
