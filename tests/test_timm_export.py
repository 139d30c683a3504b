"""CLASP backbones as registered timm models: exports load by name (MoE included), loads that would leave
weights untouched fail, and the model card's load code runs as printed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import pretrain  # noqa: F401  (registers the CLASP timm models)
from pipeline.config import to_dict
from pipeline.errors import ClaspError
from pretrain.backbone import ARCHS, ClaspViT, create_backbone
from pretrain.export import export_backbone, export_summary, load_backbone, load_instructions
from pretrain.model_config import ModelConfig, MoEConfig
from transfer.backbone import BackboneConfig, build_backbone

IMG = (64, 32)
DATA = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def _export(tmp_path: Path, moe: MoEConfig, name: str = "release") -> tuple[Path, ClaspViT]:
    """A trained-looking teacher backbone (random weights) written as a training checkpoint, then exported."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_micro", img_size=IMG, moe=moe)
    backbone = create_backbone("vit_micro", img_size=IMG, moe=cfg.moe)
    with torch.no_grad():  # experts and prompts away from their init, so a skipped weight shows
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state = {f"teacher.backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"model": state, "config": {"model": to_dict(cfg), "data": DATA}, "step": 3}, tmp_path / "ck.pt")
    return export_backbone(tmp_path / "ck.pt", tmp_path / name, card={}), backbone.eval()


MOE = MoEConfig(blocks=[1, 3], num_experts=3, top_k=1, expert_mlp_ratio=2.0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_registered_clasp_model_builds_and_runs(arch: str) -> None:
    model = timm.create_model(f"clasp_{arch}").eval()
    assert isinstance(model, ClaspViT) and not model.has_moe
    assert model.pretrained_cfg["input_size"] == (3, 256, 128)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 16))
    assert out.shape == (1, model.num_features) and torch.isfinite(out).all()


def test_moe_export_loads_by_registered_name_with_its_pretrained_cfg(tmp_path: Path) -> None:
    out, teacher = _export(tmp_path, MOE)
    config = json.loads((out / "config.json").read_text())
    assert config["timm_registered_name"] == "clasp_vit_micro"
    # the weights file alone is enough: the config travels in its safetensors header
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "model.safetensors", alone / "weights.safetensors")
    for file in (out / "model.safetensors", alone / "weights.safetensors"):
        model = timm.create_model("clasp_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        assert isinstance(model, ClaspViT) and model.moe_indices == [1, 3] and model.moe_cfg == MOE
        assert model.pretrained_cfg["input_size"] == (3, *IMG)
        assert model.pretrained_cfg["mean"] == tuple(DATA["mean"]) and model.pretrained_cfg["std"] == tuple(DATA["std"])
        x = torch.randn(2, 3, *IMG)
        with torch.no_grad():
            for prompt in ("instance", "part", "attribute"):
                assert torch.equal(model.eval().forward_features(x, prompt), teacher.forward_features(x, prompt))


def test_registered_name_resamples_to_another_input_size(tmp_path: Path) -> None:
    out, teacher = _export(tmp_path, MOE)
    file = str(out / "model.safetensors")
    model = timm.create_model(
        "clasp_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=file), img_size=(96, 32)
    )
    assert model.pos_embed.shape[1] == 1 + 6 * 2 and model.pretrained_cfg["input_size"] == (3, 96, 32)
    loaded, expected = model.state_dict(), teacher.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected if k != "pos_embed")


def test_registered_name_refuses_a_file_of_another_arch_or_no_file(tmp_path: Path) -> None:
    out, _ = _export(tmp_path, MOE)
    with pytest.raises(ClaspError, match="is a vit_micro export; load it as clasp_vit_micro"):
        timm.create_model(
            "clasp_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))
        )
    with pytest.raises(ClaspError, match="no downloadable weights"):
        timm.create_model("clasp_vit_micro", pretrained=True)


def test_moe_export_into_a_plain_vit_fails_loudly_in_our_loaders(tmp_path: Path) -> None:
    out, _ = _export(tmp_path, MOE)
    file = out / "model.safetensors"
    # transfer's timm:NAME@FILE with the stock layout (timm alone would load it non-strict)
    spec = BackboneConfig(
        spec=f"timm:vit_tiny_patch16_224@{file}", timm_kwargs=dict(embed_dim=128, depth=4, num_heads=4)
    )
    with pytest.raises(ClaspError, match="would stay untouched.*prompt-controlled MoE backbone"):
        build_backbone(spec, img_size=IMG)
    # an export whose config.json was edited to say MoE off
    config = json.loads((out / "config.json").read_text())
    config["moe"]["enabled"] = False
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClaspError, match="blocks.1.mlp.fc1.weight"):
        load_backbone(out)


def test_stock_timm_with_the_cards_overlay_is_strict(tmp_path: Path) -> None:
    """The card's stock-timm call loads a MoE-off export exactly and raises on a MoE export (no half-load)."""
    plain, teacher = _export(tmp_path, MoEConfig(enabled=False), name="plain")
    moe, _ = _export(tmp_path, MOE, name="moe")
    plain_cfg = json.loads((plain / "config.json").read_text())
    namespace: dict = {}
    exec(load_instructions(plain_cfg, weights=str(plain / "model.safetensors")), namespace)  # the card's code
    model = namespace["model"].eval()
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert model.pretrained_cfg["mean"] == tuple(DATA["mean"])
    x = torch.randn(1, 3, *IMG)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), teacher.forward_features(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        exec(load_instructions(plain_cfg, weights=str(moe / "model.safetensors")), {})


def test_moe_card_and_export_summary_show_the_registered_load(tmp_path: Path) -> None:
    out, teacher = _export(tmp_path, MOE)
    card = (out / "README.md").read_text()
    assert "timm.create_model('clasp_vit_micro', pretrained=True" in card and "vit_tiny_patch16_224'" not in card
    summary = export_summary(out)
    assert "MoE on: load it with the registered CLASP name" in summary
    code = "\n".join(line.strip() for line in summary.splitlines()[1:])  # the printed lines, run as they are
    namespace = {"images": torch.randn(2, 3, *IMG)}
    exec(code, namespace)
    with torch.no_grad():
        assert torch.equal(namespace["tokens"], teacher.forward_features(namespace["images"], "instance"))
    plain, _ = _export(tmp_path, MoEConfig(enabled=False), name="plain")
    assert "stock timm both load it" in export_summary(plain)
    assert "vit_tiny_patch16_224" in (plain / "README.md").read_text()


def test_transfer_loads_a_moe_export_by_registered_name(tmp_path: Path) -> None:
    out, teacher = _export(tmp_path, MOE)
    spec = BackboneConfig(spec=f"timm:clasp_vit_micro@{out / 'model.safetensors'}", prompt="part")
    backbone = build_backbone(spec, img_size=IMG)
    assert isinstance(backbone.model, ClaspViT) and backbone.model.has_moe and backbone.prompt_mode == "fixed"
    assert backbone.mean == tuple(DATA["mean"]) and backbone.std == tuple(DATA["std"])
    loaded, expected = backbone.model.state_dict(), teacher.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_bad_weights_files_and_configs_are_one_line_errors(tmp_path: Path) -> None:
    out, _ = _export(tmp_path, MOE)
    file = str(out / "model.safetensors")
    with pytest.raises(ClaspError, match=r"img_size \[70, 32\] must be a multiple of the patch size 16"):
        timm.create_model("clasp_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=file), img_size=(70, 32))
    torch.save({"a": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ClaspError, match="state.pt is not a safetensors file"):
        timm.create_model(
            "clasp_vit_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "state.pt"))
        )
    (out / "config.json").write_text("{not json")
    with pytest.raises(ClaspError, match="config.json is not a valid CLASP export config"):
        load_backbone(out)
