"""CLIP-embedding distillation (issue 21 part B): the loss, the head under the attribute prompt, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.model import IMG, NUM_ATTRS, NUM_PARTS, checkpoint_dict, distill_cfg, random_batch, tiny_cfg

from pipeline.errors import ClaspError
from pretrain.export import export_backbone, load_backbone, load_distill_head
from pretrain.losses import embed_distill_loss
from pretrain.meta_arch import ClaspMetaArch

EMBED = 12


def distill_batch(batch_size: int = 3, seed: int = 0) -> dict:
    batch = random_batch(batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["clip_embed"] = F.normalize(torch.randn(batch_size, EMBED, generator=g), dim=-1)
    return batch


def test_distill_loss_is_cosine_distance_and_skips_rows_without_an_embedding():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])  # same, opposite, no embedding
    # (1 - 1) and (1 - (-1)) over the two rows that have a target
    assert embed_distill_loss(pred, target).item() == pytest.approx(1.0)
    assert embed_distill_loss(pred[:1] * 7, target[:1]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert embed_distill_loss(pred[2:], target[2:]).item() == 0.0


def test_distill_term_reaches_the_attribute_prompt_and_the_teacher_head_is_an_ema():
    torch.manual_seed(0)
    model = ClaspMetaArch(distill_cfg(), num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=EMBED)
    assert "distill_head" in model.student and "distill_head" in model.teacher
    loss, terms = model(distill_batch(), teacher_temp=0.04)
    assert 0 < terms["distill"] <= 2 and torch.isfinite(loss)
    # the term alone: only the attribute prompt (row 2 of the prompt table) gets its gradient
    terms_only = distill_cfg(dino=False, part=False, attribute=False)
    torch.manual_seed(0)
    alone = ClaspMetaArch(terms_only, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=EMBED)
    loss, terms = alone(distill_batch(), teacher_temp=0.04)
    assert torch.allclose(terms["total"], terms["distill"] + terms_only.moe.balance_loss_weight * terms["moe_balance"])
    loss.backward()
    grad = alone.student_backbone.task_prompts.prompts.grad
    assert grad[2].abs().sum() > 0 and grad[:2].abs().sum() == 0
    before = alone.teacher["distill_head"].linear.weight.clone()
    torch.optim.SGD(alone.get_params_groups(0.0), lr=1.0).step()
    alone.update_teacher(0.5)
    student = alone.student["distill_head"].linear.weight.detach()
    assert torch.allclose(alone.teacher["distill_head"].linear.weight, 0.5 * before + 0.5 * student)


def test_distill_off_adds_no_head_and_no_term():
    model = ClaspMetaArch(tiny_cfg(), num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=EMBED)
    assert "distill_head" not in model.student
    _, terms = model(distill_batch(), teacher_temp=0.04)
    assert terms["distill"] == 0


def test_distill_without_embeddings_is_a_clear_error():
    with pytest.raises(ClaspError, match="store-embeddings"):
        ClaspMetaArch(distill_cfg(), num_parts=NUM_PARTS, num_attributes=NUM_ATTRS)
    model = ClaspMetaArch(distill_cfg(), num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=EMBED)
    with pytest.raises(ClaspError, match="no clip_embed"):
        model(random_batch(), teacher_temp=0.04)


def test_export_writes_the_teacher_head_and_the_clip_identity(tmp_path):
    torch.manual_seed(0)
    cfg = distill_cfg()
    model = ClaspMetaArch(cfg, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS, clip_embed_dim=EMBED)
    loss, _ = model(distill_batch(), teacher_temp=0.04)
    loss.backward()
    torch.optim.SGD(model.get_params_groups(0.0), lr=0.5).step()
    model.update_teacher(0.5)
    clip = {"arch": "clasp-vit-tiny-8", "weights": "/x/clip.safetensors", "weights_id": "0123abcd", "logit_scale": 20}
    state = checkpoint_dict(model, cfg, step=3) | {"data": {"clip": clip}}
    torch.save(state, tmp_path / "ck.pt")

    out = export_backbone(tmp_path / "ck.pt", tmp_path / "release", card={})
    head, info = load_distill_head(out)
    assert info["clip"] == clip and info["prompt"] == "attribute" and info["embed_dim"] == EMBED
    assert json.loads((out / "config.json").read_text())["distill"]["head_file"] == "distill_head.safetensors"
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        tokens = load_backbone(out).forward_features(x, "attribute")[:, 0]
        expected = model.teacher["distill_head"](model.teacher_backbone.forward_features(x, "attribute")[:, 0])
        assert torch.allclose(head(tokens), expected, atol=1e-6)
        assert not torch.allclose(expected, model.student["distill_head"](tokens), atol=1e-4)  # the teacher head


def test_an_export_without_distillation_is_refused_by_load_distill_head(tmp_path):
    cfg = tiny_cfg()
    model = ClaspMetaArch(cfg, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS)
    torch.save(checkpoint_dict(model, cfg, step=1), tmp_path / "ck.pt")
    out = export_backbone(tmp_path / "ck.pt", tmp_path / "release", card={})
    with pytest.raises(ClaspError, match="without CLIP-embedding distillation"):
        load_distill_head(out)


def test_a_conv_stem_moe_export_loads_through_the_registered_timm_model(tmp_path):
    # the registered clasp_vit_micro_conv was built with a plain patchify and named the wrong first conv,
    # so every MoE export of a conv-stem run (the ablation's regime) failed to load for transfer and zero-shot
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.arch = "vit_micro_conv"
    model = ClaspMetaArch(cfg, num_parts=NUM_PARTS, num_attributes=NUM_ATTRS)
    torch.save(checkpoint_dict(model, cfg, step=1), tmp_path / "ck.pt")
    loaded = load_backbone(export_backbone(tmp_path / "ck.pt", tmp_path / "release", card={}))
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x, "part"), model.teacher_backbone.forward_features(x, "part"))
