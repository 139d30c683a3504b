"""Part pseudo-labels that can teach: confidences that mean the same for background and parts, and the
vocabulary's left/right flip pairs reaching the pre-training flip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.labels import ingest_folder, label_cfg, noise_images, write_clip_dir

from labeling.label import run_labeling
from labeling.labelers import Labeler, above_chance
from pipeline.formats import LABELSET_FILE, labels_dir
from pipeline.vocab import DEFAULT_PARTS, load_parts
from pretrain.data import read_labelset_info


def part_labeler(num_classes: int) -> Labeler:
    """Text embeddings = the identity, logit scale 1: a patch feature *is* its part logits."""
    return Labeler(
        attr_pos=torch.zeros(1, num_classes),
        attr_neg=torch.zeros(1, num_classes),
        part_text=torch.eye(num_classes),
        person_text=torch.zeros(num_classes),
        background_text=torch.zeros(num_classes),
        logit_scale=1.0,
        groups=[],
        label_grid=(1, 4),
        foreground="parts",  # P(person) = 1 - P(background class)
    )


def test_part_and_background_confidences_mean_the_same_thing():
    # cells (background, class a, class b): a coin flip either side of the person/background decision,
    # then a certain part cell and a certain background cell
    probs = torch.tensor([[0.49, 0.255, 0.255], [0.51, 0.245, 0.245], [0.001, 0.998, 0.001], [0.998, 0.001, 0.001]])
    part_map, part_conf, _ = part_labeler(3).parts(probs.log().view(1, 1, 4, 3))
    assert part_map.flatten().tolist() == [1, 0, 1, 0]
    conf = part_conf.flatten()
    # a coin flip is near 0 whether it fell to a part or to the background (before: 0.255 and 0.51, so
    # with the 0.3 threshold only the background one counted); certainty is near 1 for both
    assert conf[0] < 0.05 and conf[1] < 0.05
    assert conf[2] > 0.99 and conf[3] > 0.99
    assert above_chance(torch.tensor([0.5, 0.75, 1.0]), 2).tolist() == [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("clip"))


def test_flip_pairs_of_the_vocabulary_reach_the_pre_training_flip(tmp_path: Path, clip_dir: Path) -> None:
    vocab = tmp_path / "parts.yaml"
    vocab.write_text(
        DEFAULT_PARTS.read_text().replace(
            '  - {name: arms, prompts: ["a person\'s arm", "a person\'s hand"]}',
            '  - {name: left_arm, prompts: ["a left arm"], flip: right_arm}\n'
            '  - {name: right_arm, prompts: ["a right arm"]}',
        )
    )
    parts = load_parts(vocab)
    assert parts.flip == {"left_arm": "right_arm", "right_arm": "left_arm"}
    root = ingest_folder(noise_images(6), tmp_path / "root", "toy", per_shard=6)
    labelset = run_labeling(label_cfg(root, "toy", clip_dir, parts=str(vocab))).labelset
    meta = json.loads((labels_dir(root, "toy", labelset) / LABELSET_FILE).read_text())
    assert meta["parts"]["flip"] == parts.flip
    info = read_labelset_info(root, "toy", labelset, part_flip={})
    left, right = info.parts.index("left_arm"), info.parts.index("right_arm")
    assert info.flip_map[left] == right and info.flip_map[right] == left
    assert info.flip_map[0] == 0 and info.flip_map[1] == 1


def test_a_flip_to_an_unknown_class_is_refused(tmp_path: Path) -> None:
    vocab = tmp_path / "parts.yaml"
    vocab.write_text(DEFAULT_PARTS.read_text().replace("{name: shoes, ", "{name: shoes, flip: gloves, "))
    with pytest.raises(ValueError, match="shoes.*gloves"):
        load_parts(vocab)
