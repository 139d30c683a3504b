"""CLASP backbones as registered timm models (DESIGN.md §2.3).

Importing ``pretrain`` registers one timm model per architecture of ``pretrain.backbone.ARCHS``,
named ``clasp_<arch>`` (``clasp_vit_micro``, ``clasp_vit_small``, ...), so a released backbone loads
with timm's own entry point, MoE included::

    import pretrain  # registers the CLASP architectures with timm
    import timm
    model = timm.create_model("clasp_vit_small", pretrained=True,
                              pretrained_cfg_overlay=dict(file="release/model.safetensors"))
    model.pretrained_cfg["input_size"], model.pretrained_cfg["mean"]   # (3, 256, 128), the run's mean

Everything else that defines the network (image size, patch size, MoE blocks / experts / top-k /
expert width / capacity, prompt names) comes from the weights file's own config: ``clasp export``
stores config.json inside the safetensors header (``clasp_config``) as well as beside it. The name
does not encode those settings on purpose: several of them change no tensor shape (``top_k`` with an
explicit ``expert_mlp_ratio``, the capacity factors, the order of explicit block ids within a shape),
so a name that disagreed with the file would load strict and silently compute another function.
With ``pretrained=False`` the model is the plain architecture at 256x128 unless ``moe=`` (a
``MoEConfig`` or dict) and ``img_size=`` are given.

A load that would leave any weight of the model untouched, or bring a weight the model does not have,
is a ``ClaspError`` (timm itself loads non-strict whenever ``num_classes`` differs from the
pretrained config's; only the classifier ``head`` may then stay new).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError, safe_open
from timm.models import build_model_with_cfg, register_model

from pipeline.config import ConfigError, from_dict
from pipeline.errors import ClaspError
from pretrain.backbone import ARCHS, ClaspViT, conv_stem_embed, timm_kwargs
from pretrain.model_config import IMAGENET_MEAN, IMAGENET_STD, TASK_PROMPTS, MoEConfig

NAME_PREFIX = "clasp_"
EXPORT_CONFIG_FILE = "config.json"
CONFIG_METADATA_KEY = "clasp_config"  # safetensors header entry holding the export's config.json
DEFAULT_IMG_SIZE = (256, 128)


def timm_name(arch: str) -> str:
    """The registered timm name of a CLASP architecture (``vit_small`` -> ``clasp_vit_small``)."""
    return NAME_PREFIX + arch


def read_export_config(weights_file: str | Path) -> dict[str, Any]:
    """The config of a CLASP export, from the safetensors header or else config.json beside the file."""
    path = Path(weights_file)
    if not path.is_file():
        raise ClaspError(f"weights file {path} does not exist (pass the model.safetensors of a `clasp export`)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ClaspError(
            f"{path} is not a safetensors file ({exc}); pass the model.safetensors of a `clasp export`"
        ) from None
    if CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    beside = path.parent / EXPORT_CONFIG_FILE
    if beside.is_file():
        return json.loads(beside.read_text())
    raise ClaspError(f"{path} carries no CLASP config and has no {EXPORT_CONFIG_FILE} beside it: not a CLASP export")


def weight_keys(weights_file: str | Path) -> set[str]:
    with safe_open(str(weights_file), framework="pt") as fh:
        return set(fh.keys())


def pretrained_cfg_of(config: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """timm pretrained_cfg (input size, mean/std, no classifier) of an export config (None: defaults)."""
    config = config or {}
    height, width = config.get("img_size", DEFAULT_IMG_SIZE)
    spec = ARCHS.get(str(config.get("arch")))
    # timm adapts (and checks) the input channels of first_conv: with a conv stem that is the stem's conv,
    # not the patch projection (whose input is the stem's 64 channels; naming it failed every such load)
    first_conv = "patch_embed.backbone.conv" if spec is not None and spec.conv_stem_stride else "patch_embed.proj"
    return dict(
        architecture=name,
        input_size=(3, height, width),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        interpolation="bicubic",
        crop_pct=1.0,
        num_classes=0,
        first_conv=first_conv,
        classifier="head",
        license="apache-2.0",
    )


def check_loaded_keys(model: Any, weights_file: str | Path, *, what: str) -> None:
    """Refuse a load that left model weights untouched or brought weights the model does not have."""
    file_keys, model_keys = weight_keys(weights_file), set(model.state_dict())
    new_head = {k for k in model_keys - file_keys if k.startswith("head.")}  # a new classifier is expected
    missing, unexpected = sorted(model_keys - file_keys - new_head), sorted(file_keys - model_keys)
    if missing or unexpected:
        hint = ""
        if any(".mlp.router" in k or k.startswith("task_prompts") for k in unexpected):
            hint = (
                " The file is a prompt-controlled MoE backbone: load it with its registered CLASP name "
                "(timm.create_model('clasp_<arch>', pretrained=True, pretrained_cfg_overlay=dict(file=...)) "
                "after `import pretrain`) or as a CLASP export folder."
            )
        raise ClaspError(
            f"{weights_file} does not fit {what}: {len(missing)} model weights would stay untouched "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) and {len(unexpected)} weights have no "
            f"place ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}).{hint}"
        )


def _create(arch: str, pretrained: bool = False, **kwargs: Any) -> ClaspViT:
    name = timm_name(arch)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    given_cfg = kwargs.pop("pretrained_cfg", None)
    file = overlay.get("file") or (given_cfg.get("file") if isinstance(given_cfg, dict) else None)
    img_size = kwargs.pop("img_size", None)
    config = None
    if pretrained:
        if not file:
            raise ClaspError(
                f"{name} has no downloadable weights; pass "
                "pretrained_cfg_overlay=dict(file='<export>/model.safetensors')"
            )
        config = read_export_config(file)
        if config.get("arch") != arch:
            raise ClaspError(
                f"{file} is a {config.get('arch')} export; load it as {timm_name(str(config.get('arch')))}"
            )
        if "moe" in kwargs:
            raise ClaspError(f"{name}: the MoE settings of a pretrained model come from {file}; do not pass moe=")
        try:
            moe = from_dict(MoEConfig, config["moe"], prefix="moe.")
        except (KeyError, TypeError, ConfigError) as exc:
            raise ClaspError(f"{file}: its CLASP config has no valid 'moe' section ({exc})") from None
        # dropless whatever capacity the run trained with: fine-tuning and evaluation compute one function
        moe = dataclasses.replace(moe, capacity_factor=0.0, eval_capacity_factor=None)
        kwargs.update(moe=moe, prompt_names=tuple(config.get("prompt_names") or TASK_PROMPTS))
        build_size, patch_size = tuple(config["img_size"]), int(config["patch_size"])
    else:
        moe = kwargs.pop("moe", None)
        kwargs["moe"] = from_dict(MoEConfig, moe, prefix="moe.") if isinstance(moe, dict) else moe
        build_size, patch_size = tuple(img_size or DEFAULT_IMG_SIZE), int(kwargs.pop("patch_size", 16))
    for size in (build_size, tuple(img_size or build_size)):
        if size[0] % patch_size or size[1] % patch_size:
            raise ClaspError(f"{name}: img_size {list(size)} must be a multiple of the patch size {patch_size}")
    kwargs = {**timm_kwargs(arch, img_size=build_size, patch_size=patch_size), **kwargs}
    if ARCHS[arch].conv_stem_stride:  # the R+ViT stem, as create_backbone builds it (else: a plain patch-4 ViT)
        kwargs["embed_layer"] = conv_stem_embed()
    # the layer that sees the input channels (timm checks and adapts it): behind a conv stem, the stem's conv
    first_conv = "patch_embed.backbone.conv" if ARCHS[arch].conv_stem_stride else "patch_embed.proj"
    pretrained_cfg = {**pretrained_cfg_of(config, name), "first_conv": first_conv, **overlay}
    model = build_model_with_cfg(
        ClaspViT, name, pretrained, pretrained_cfg=pretrained_cfg, pretrained_strict=True, **kwargs
    )
    if pretrained:
        check_loaded_keys(model, file, what=f"timm model {name}")
    if img_size is not None and tuple(img_size) != build_size:  # e.g. 384x128 for re-ID: resample pos_embed
        model.set_input_size(img_size=tuple(img_size))
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, *img_size)}
    return model


def register_timm_model(arch: str) -> str:
    """Register ``clasp_<arch>`` with timm (idempotent); returns the name."""
    name = timm_name(arch)
    if name in timm.list_models(name):
        return name

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ClaspViT:
        return _create(arch, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"CLASP {arch} backbone; weights and MoE settings from pretrained_cfg_overlay=dict(file=...)."
    register_model(entrypoint)
    return name


for _arch in ARCHS:
    register_timm_model(_arch)
