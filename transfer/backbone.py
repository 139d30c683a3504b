"""The backbone every transfer task fine-tunes, built from one spec string.

Spec forms (``backbone.spec`` / ``--backbone``):

- ``PATH`` or ``clasp:PATH`` — a released CLASP backbone folder (``model.safetensors`` + ``config.json``)
  loaded with ``pretrain.export.load_backbone``; with the prompt-controlled MoE its
  ``forward_features(x, prompt)`` takes a prompt name or a weight vector over its prompts;
- ``timm:NAME`` — timm weights (``pretrained=True``; needs the network or the Hugging Face cache),
  ``timm:NAME@FILE`` loads the weights from a local file instead;
- ``random:ARCH`` — a timm architecture with random weights (the from-scratch baseline); CLASP's own
  architecture names (``pretrain.backbone.ARCHS``: vit_micro, vit_small, ...) give exactly the layout
  pre-training used.

Prompt choice (MoE backbones only; ignored with a note for plain ViTs when left at ``learned``):
``prompt: instance|part|attribute`` (one fixed prompt), ``prompt: mix`` with fixed ``prompt_mix``
weights, or ``prompt: learned`` — a softmax over learnable logits, initialised from ``prompt_mix``,
fine-tuned with the task.

Like with like: every backbone kind gets stochastic depth at ``backbone.drop_path_rate`` (CLASP exports
included), and ``provenance()`` — what ``results.json`` records under ``backbone`` — states the spec,
the drop-path rate actually found in the model, the MoE settings, the prompt mix and, when the input
size differs from the pre-training size, how the position embeddings were resampled.

The router of a MoE backbone is frozen during fine-tuning (the experts, the rest of the backbone and
a learned prompt mix still train): a fine-tune runs a single task under one prompt (or a fixed mix),
where the pre-training balance loss would push that prompt toward uniform expert use (against the
specialisation pre-training learned) and no balance loss would let the router collapse onto one expert
on a small dataset; a frozen router keeps the routing pre-training learned, with no extra loss weight
to tune.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import ClaspError
from pretrain.model_config import IMAGENET_MEAN, IMAGENET_STD, TASK_PROMPTS

_UNLISTED_PROMPT_WEIGHT = 0.01  # learned mixes start every prompt above zero so all stay trainable
_ROUTER_PARAMS = (".router_token.", ".router_prompt.", "task_prompts.")

log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    spec: str = "random:vit_small_patch16_224"
    prompt: str = "learned"  # learned | mix | a prompt name (instance, part, attribute)
    prompt_mix: dict[str, float] = field(default_factory=dict)  # fixed weights (mix) or initial weights (learned)
    pool: Literal["cls", "avg"] = "cls"  # class token (TransReID/SOLIDER ViT) or mean of patch tokens
    drop_path_rate: float = 0.1
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args, e.g. depth: 2
    # Layer-wise lr decay (BEiT / MAE / ViTPose): block i of n trains at lr x layer_decay ** (n - i), the embeddings
    # at layer_decay ** (n + 1), the final norm and the task head at lr. 1.0 = off (one lr for every weight).
    layer_decay: float = 1.0
    # Linear probe: the backbone's weights stay fixed (and in eval mode); only the task head and a learned
    # prompt mix train. The standard read-out of a self-supervised backbone when the fine-tune budget is small.
    freeze: bool = False


def part_prompt_backbone() -> BackboneConfig:
    """Default backbone of the dense tasks: a learned prompt mix that starts at the part prompt."""
    return BackboneConfig(prompt="learned", prompt_mix={"part": 1.0})


class FeatureBackbone(nn.Module):
    """Uniform wrapper: ``forward(images) -> (B, num_features)`` pooled features under the chosen prompt."""

    def __init__(
        self,
        model: nn.Module,
        *,
        source: str,
        prompt_names: tuple[str, ...],
        prompt_mode: str,
        prompt_weights: torch.Tensor | None,
        pool: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        freeze: bool = False,
        layer_decay: float = 1.0,
        spec: str = "",
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.frozen = freeze
        self.layer_decay = layer_decay
        if freeze:
            self.model.requires_grad_(False)
        for name, param in model.named_parameters():
            if any(key in f".{name}" for key in _ROUTER_PARAMS):
                param.requires_grad_(False)  # frozen router (module docstring)
        self.source = source
        self.spec = spec or source
        self.settings = dict(settings or {})
        self.prompt_names = prompt_names
        self.prompt_mode = prompt_mode  # none | fixed | mix | learned
        self.pool = pool
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_features = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        if prompt_mode == "learned":
            self.prompt_logits = nn.Parameter(torch.log(prompt_weights))
        elif prompt_mode == "mix":
            self.register_buffer("prompt_fixed", prompt_weights, persistent=True)

    def train(self, mode: bool = True) -> FeatureBackbone:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # no drop-path / dropout / BN updates in a frozen backbone
        return self

    def current_prompt(self) -> str | torch.Tensor | None:
        if self.prompt_mode == "fixed":
            return self.prompt_names[0]
        if self.prompt_mode == "mix":
            return self.prompt_fixed
        if self.prompt_mode == "learned":
            return torch.softmax(self.prompt_logits, dim=0)
        return None

    def describe_prompt(self) -> str:
        prompt = self.current_prompt()
        if prompt is None:
            return "none (backbone has no prompt-controlled MoE)"
        if isinstance(prompt, str):
            return f"fixed: {prompt}"
        weights = ", ".join(f"{n} {w:.3f}" for n, w in zip(self.prompt_names, prompt.tolist(), strict=True))
        return f"{self.prompt_mode} mix: {weights}"

    @property
    def drop_path_rate(self) -> float:
        """The stochastic-depth rate the model applies (its largest per-block drop probability)."""
        probs = [float(getattr(m, "drop_prob", 0.0) or 0.0) for m in self.model.modules()]
        return max(probs, default=0.0)

    def provenance(self) -> dict[str, Any]:
        """What a published number was fine-tuned from (``results.json``'s ``backbone``)."""
        prompt = self.current_prompt()
        mix = {}
        if isinstance(prompt, torch.Tensor):
            mix = {n: round(w, 4) for n, w in zip(self.prompt_names, prompt.detach().float().tolist(), strict=True)}
        elif isinstance(prompt, str):
            mix = {prompt: 1.0}
        return {
            "spec": self.spec,
            "source": self.source,
            "drop_path_rate": self.drop_path_rate,
            "moe": self.settings.get("moe", "off"),
            "router": "frozen" if self.prompt_mode != "none" else None,
            "prompt": self.describe_prompt(),
            "prompt_mix": mix,
            "frozen_backbone": self.frozen,
            **(
                {"position_embedding": self.settings["position_embedding"]}
                if "position_embedding" in self.settings
                else {}
            ),
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prompt = self.current_prompt()
        tokens = self.model.forward_features(images) if prompt is None else self.model.forward_features(images, prompt)
        if tokens.ndim == 4:  # CNN feature map (B, C, H, W)
            return tokens.mean(dim=(2, 3))
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    @property
    def patch_size(self) -> int:
        """Stride of the token grid in pixels (16 for ViT-*/16)."""
        embed = getattr(self.model, "patch_embed", None)
        if hasattr(embed, "feat_ratio"):  # timm PatchEmbed / HybridEmbed: a conv stem's stride included
            ratio = embed.feat_ratio()  # an int (as_scalar) or (h, w)
            return int(ratio if isinstance(ratio, int) else ratio[0])
        size = getattr(embed, "patch_size", (16, 16))
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def feature_maps(self, images: torch.Tensor, indices: int | list[int] = 1) -> list[torch.Tensor]:
        """Dense features for pose, detection and parsing heads: a list of (B, C, H/p, W/p) maps.

        ``indices`` follows timm's ``forward_intermediates``: an int takes the last n blocks, a list
        names block indices (negative from the end). Maps are normalised by the final norm and computed
        under the chosen prompt (MoE backbones), so the learned prompt mix trains with the dense task.
        Inputs of any size divisible by the patch size work (position embeddings are resampled).
        """
        prompt = self.current_prompt()
        kwargs: dict[str, Any] = {"indices": indices, "norm": True, "output_fmt": "NCHW", "intermediates_only": True}
        if prompt is not None:
            kwargs["prompt"] = prompt
        if not hasattr(self.model, "forward_intermediates"):
            raise ClaspError(f"backbone '{self.source}' has no forward_intermediates; dense tasks need a timm ViT")
        return list(self.model.forward_intermediates(images, **kwargs))

    def allow_any_input_size(self) -> None:
        """Let a timm ViT built for one size take any size divisible by the patch size (position embeddings
        resampled per input, as timm's ``dynamic_img_size=True``), e.g. for a multi-scale test."""
        from timm.layers import Format

        model, patch_embed = self.model, getattr(self.model, "patch_embed", None)
        if getattr(model, "dynamic_img_size", True) or patch_embed is None:
            return  # already dynamic (CLASP's ViT) or not a timm ViT
        model.dynamic_img_size = True
        patch_embed.strict_img_size, patch_embed.flatten, patch_embed.output_fmt = False, False, Format.NHWC

    def no_weight_decay(self) -> set[str]:
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        names = {f"model.{n}" for n in inner}
        if self.prompt_mode == "learned":
            names.add("prompt_logits")
        return names


def build_backbone(cfg: BackboneConfig, img_size: tuple[int, int]) -> FeatureBackbone:
    """Create the backbone named by ``cfg.spec`` at input size ``img_size`` (height, width)."""
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ClaspError(f"backbone.layer_decay={cfg.layer_decay} must be in (0, 1]; 1 turns it off")
    spec = cfg.spec.strip()
    if spec.startswith("random:"):
        model = _create_timm(spec[len("random:") :], False, img_size, cfg)
        source, file_cfg = f"{spec} (random init)", {}
    elif spec.startswith("timm:"):
        name, _, weights_file = spec[len("timm:") :].partition("@")
        model = _create_timm(name, True, img_size, cfg, weights_file or None)
        source, file_cfg = spec, {}
    else:
        path = Path(spec[len("clasp:") :] if spec.startswith("clasp:") else spec)
        model, file_cfg = _load_clasp(path, img_size, cfg.drop_path_rate)
        source = f"CLASP export {path}"
    names, mode, weights = _resolve_prompt(model, file_cfg, cfg)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = file_cfg.get("mean") or pretrained_cfg.get("mean") or IMAGENET_MEAN
    std = file_cfg.get("std") or pretrained_cfg.get("std") or IMAGENET_STD
    return FeatureBackbone(
        model,
        spec=spec,
        settings=_settings(file_cfg, img_size),
        source=source,
        prompt_names=names,
        prompt_mode=mode,
        prompt_weights=weights,
        pool=cfg.pool,
        mean=tuple(mean),
        std=tuple(std),
        freeze=cfg.freeze,
        layer_decay=cfg.layer_decay,
    )


def layer_lr_scales(backbone: FeatureBackbone) -> dict[str, float]:
    """lr multiplier of each parameter of ``backbone`` (names relative to it) under ``backbone.layer_decay``.

    Layers from timm's ``group_matcher``: embeddings 0, block i -> i + 1, the final norm with the task head at
    num_blocks + 1, as ViTPose's ``LayerDecayOptimizerConstructor`` (and BEiT / MAE) number them.
    """
    from timm.models import group_parameters

    if not 0.0 < backbone.layer_decay <= 1.0:
        raise ClaspError(f"backbone.layer_decay={backbone.layer_decay} must be in (0, 1]; 1 turns it off")
    names = [f"model.{n}" for n, _ in backbone.model.named_parameters()]
    if backbone.layer_decay == 1.0:
        return dict.fromkeys(names, 1.0)
    if not hasattr(backbone.model, "group_matcher"):
        raise ClaspError(f"backbone.layer_decay needs timm's group_matcher; '{backbone.source}' has none (use 1.0)")
    layer_of = group_parameters(backbone.model, backbone.model.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values()) + 1  # the task head's layer (BEiT / ViTPose count num_blocks + 2 layers)
    # timm files the final norm with the last block; it feeds the head, so it trains at the head's lr
    # (ViTPose's last_norm), not one decay step lower
    layer_of |= {n: top for n, _ in backbone.model.named_parameters() if n.startswith(("norm.", "fc_norm."))}
    decay = backbone.layer_decay
    return {f"model.{n}": decay ** (top - layer_of.get(n, top)) for n, _ in backbone.model.named_parameters()}


def _create_timm(
    name: str, pretrained: bool, img_size: tuple[int, int], cfg: BackboneConfig, weights_file: str | None = None
) -> nn.Module:
    import timm

    if not name:
        raise ClaspError(f"backbone spec '{cfg.spec}' names no architecture (e.g. random:vit_small_patch16_224)")
    name, arch_kwargs = _registered_arch(name)
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": cfg.drop_path_rate, **arch_kwargs, **cfg.timm_kwargs}
    if weights_file:
        if not Path(weights_file).is_file():
            raise ClaspError(f"backbone weights file {weights_file} (from '{cfg.spec}') does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": weights_file}
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, img_size=tuple(img_size), **kwargs)
        except TypeError as exc:  # CNNs take no img_size
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if weights_file and weights_file.endswith(".safetensors"):
            # timm loads non-strict when num_classes differs from its pretrained config (here always 0):
            # a file that leaves weights untouched (e.g. a MoE export into a plain ViT) must not pass
            from pretrain.timm_models import check_loaded_keys

            check_loaded_keys(model, weights_file, what=f"timm model {name} (backbone '{cfg.spec}')")
        return model
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ClaspError(f"backbone '{cfg.spec}': timm has no model '{name}' (see timm.list_models())") from None
        raise
    except (OSError, ValueError) as exc:
        if not pretrained:
            raise
        raise ClaspError(
            f"could not load pretrained timm weights for '{name}' ({type(exc).__name__}: {exc}); without network "
            f"access pass a local file as timm:{name}@/path/to/weights.safetensors, or use random:{name}"
        ) from None


def _registered_arch(name: str) -> tuple[str, dict[str, Any]]:
    """CLASP architecture names (``pretrain.backbone.ARCHS``, e.g. vit_micro) -> (timm name, settings)."""
    from pretrain.backbone import ARCHS

    spec = ARCHS.get(name)
    return (spec.timm_name, dict(spec.timm_kwargs)) if spec else (name, {})


def _settings(file_cfg: dict[str, Any], img_size: tuple[int, int]) -> dict[str, Any]:
    """MoE settings of a CLASP export, and a note (also logged) when its position embeddings were resampled."""
    settings: dict[str, Any] = {}
    moe = file_cfg.get("moe") or {}
    if moe.get("enabled"):
        keep = ("num_experts", "top_k", "blocks", "prompt_dim")
        settings["moe"] = {**{k: moe[k] for k in keep if k in moe}, "dispatch": "dropless"}
    trained = file_cfg.get("img_size")
    if trained and tuple(trained) != tuple(img_size):
        patch = int(file_cfg.get("patch_size", 16))
        note = (
            f"pre-trained at {trained[0]}x{trained[1]}, fine-tuned at {img_size[0]}x{img_size[1]}: position "
            f"embeddings resampled from a {trained[0] // patch}x{trained[1] // patch} to a "
            f"{img_size[0] // patch}x{img_size[1] // patch} token grid (timm resample_abs_pos_embed: bicubic, "
            "antialiased; class token kept)"
        )
        settings["position_embedding"] = note
        log.warning("backbone %s", note)
    return settings


def _load_clasp(path: Path, img_size: tuple[int, int], drop_path_rate: float) -> tuple[nn.Module, dict[str, Any]]:
    if not path.is_dir():
        raise ClaspError(
            f"backbone '{path}' is not a folder; use a CLASP export folder (model.safetensors + config.json), "
            "timm:NAME, timm:NAME@FILE or random:ARCH"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ClaspError(f"{config_path} not found: '{path}' is not a CLASP backbone export (run `clasp export`)")
    try:
        file_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ClaspError(f"{config_path} is not valid JSON: {exc}") from None
    from pretrain.export import load_backbone

    # resamples position embeddings if needed
    return load_backbone(path, img_size=tuple(img_size), drop_path_rate=drop_path_rate), file_cfg


def _resolve_prompt(
    model: nn.Module, file_cfg: dict[str, Any], cfg: BackboneConfig
) -> tuple[tuple[str, ...], str, torch.Tensor | None]:
    """(prompt names, mode, initial weights) for the requested prompt choice on this model."""
    # stock timm ViTs (CLASP exports with the MoE off) have no prompt argument; ClaspViT reports has_moe
    takes_prompt = "prompt" in inspect.signature(model.forward_features).parameters and getattr(model, "has_moe", True)
    names = tuple(getattr(model, "prompt_names", None) or _file_prompt_names(file_cfg) or TASK_PROMPTS)
    choice = cfg.prompt.strip().lower()
    unknown = sorted(set(cfg.prompt_mix) - set(names))
    if unknown:
        raise ClaspError(f"backbone.prompt_mix names unknown prompts {unknown}; this backbone has {list(names)}")
    if not takes_prompt:
        if choice == "learned":
            return (), "none", None
        raise ClaspError(
            f"backbone.prompt={cfg.prompt} but '{cfg.spec}' has no prompt-controlled MoE; "
            "use backbone.prompt=learned (ignored for plain backbones) or a MoE export"
        )
    if choice in names:
        return (choice,), "fixed", None
    if choice == "mix":
        weights = torch.tensor([float(cfg.prompt_mix.get(n, 0.0)) for n in names])
        if not cfg.prompt_mix or weights.sum() <= 0 or (weights < 0).any():
            raise ClaspError("backbone.prompt=mix needs non-negative backbone.prompt_mix weights, e.g. {instance: 0.8}")
        return names, "mix", weights / weights.sum()
    if choice == "learned":
        init = [max(float(cfg.prompt_mix.get(n, 0.0)), _UNLISTED_PROMPT_WEIGHT) for n in names]
        if not cfg.prompt_mix:
            init = [1.0] * len(names)
        total = math.fsum(init)
        return names, "learned", torch.tensor([w / total for w in init])
    raise ClaspError(f"backbone.prompt '{cfg.prompt}' is not one of learned, mix, {', '.join(names)}")


def _file_prompt_names(file_cfg: dict[str, Any]) -> list[str] | None:
    for holder in (file_cfg, file_cfg.get("moe") or {}):
        names = holder.get("prompt_names") or holder.get("prompts")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return names
    return None
