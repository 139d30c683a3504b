"""Release a pre-trained backbone (DESIGN.md §2.3) and load it back for transfer.

``export_backbone(checkpoint, out_dir, card=...)`` reads a training-state checkpoint written by the
trainer and writes the **teacher** backbone only::

    out_dir/model.safetensors   timm key layout (MoE off: loads strict into stock timm); its header
                                metadata ``clasp_config`` holds config.json, so the file alone suffices
    out_dir/config.json         arch, timm_registered_name, timm_name, timm_kwargs, img_size, patch_size,
                                mean/std, num_features, moe settings, prompt names, step
    out_dir/README.md           model card: data, label set, steps, settings, how to load
    out_dir/distill_head.safetensors   only with ``model.loss.distill``: the (EMA) linear head from the class
                                token under the attribute prompt to the CLIP image-embedding space;
                                config.json ``distill`` names it, the prompt and the CLIP of the labels
                                (arch, weights, weights_id: `clasp zeroshot` uses that text tower)

Loading (``load_instructions``; printed by ``clasp export`` and shown in the card): always the
registered CLASP timm model (``pretrain.timm_models``), MoE included::

    import pretrain, timm
    timm.create_model("clasp_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))

and, with the MoE off, also stock timm (``timm_name`` + ``timm_kwargs``). Stock timm given a MoE
export with only ``pretrained_cfg_overlay=dict(file=...)`` and ``num_classes=0`` loads non-strict
(its pretrained config says 1000 classes, so timm drops strictness) and leaves the MoE blocks' MLPs
random with only an "Unexpected keys" warning; the card's stock call therefore also overlays
``num_classes=0``, which keeps timm strict, so the same call on a MoE export raises.

The checkpoint is a ``torch.save``'d dict with at least::

    "model"   ClaspMetaArch.state_dict()  (keys "teacher.backbone.*", ...; a "module." or
              "_orig_mod." prefix from DDP / torch.compile is accepted)
    "config"  the resolved pre-training config as a plain dict with a "model" section
              (pretrain.model_config.ModelConfig) and optionally "data" with "mean"/"std"
    "step"    optimizer steps done (int)

``load_backbone(path)`` returns a stock ``timm`` VisionTransformer when the MoE was off and a
``ClaspViT`` otherwise, loaded with ``strict=True``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.errors import ClaspError
from pipeline.formats import atomic_dir
from pipeline.guards import ensure_free_space
from pretrain.backbone import arch_spec, create_backbone, timm_kwargs
from pretrain.model_config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, MoEConfig
from pretrain.timm_models import CONFIG_METADATA_KEY, check_loaded_keys, register_timm_model

WEIGHTS_FILE = "model.safetensors"
DISTILL_HEAD_FILE = "distill_head.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CARD_BYTES = 64 * 1024  # config.json + README.md, generously


def _teacher_state(model_state: dict[str, torch.Tensor], module: str = "backbone") -> dict[str, torch.Tensor]:
    prefix = f"teacher.{module}."
    out = {}
    for key, value in model_state.items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key.removeprefix(wrapper)
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
    return out


def export_backbone(checkpoint: Path | str, out_dir: Path, *, card: dict[str, Any]) -> Path:
    """Write the teacher backbone of a training checkpoint as a release directory; returns ``out_dir``.

    ``card`` holds free-form facts for the model card (e.g. ``corpus``, ``labelset_id``, ``images``,
    ``notes``). The directory appears complete or not at all (written beside it, then renamed).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise ClaspError(
            f"checkpoint {checkpoint} does not exist (pass a training checkpoint file written by the trainer)"
        )
    try:  # mmap: only the teacher's tensors are read, not the optimizer state
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise ClaspError(f"{checkpoint} cannot be read as a CLASP training checkpoint: {exc}") from None
    missing = [k for k in ("model", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ClaspError(f"{checkpoint} is not a CLASP training checkpoint: it has no {missing} entries")
    try:
        model_cfg = from_dict(ModelConfig, state["config"]["model"], prefix="model.")
    except (KeyError, TypeError, ConfigError) as exc:
        raise ClaspError(f"{checkpoint}: its config has no valid 'model' section ({exc})") from None
    weights = _teacher_state(state["model"])
    if not weights:
        raise ClaspError(f"{checkpoint}: its model state has no 'teacher.backbone.*' weights")

    # rebuild the backbone and load strict: the export is checked against its own architecture
    backbone = create_backbone(
        model_cfg.arch, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size, moe=model_cfg.moe
    )
    backbone.load_state_dict(weights, strict=True)
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}

    data_cfg = state["config"].get("data") or {}
    step = int(state.get("step", 0))
    config = {
        "format": "clasp-backbone/1",
        "arch": model_cfg.arch,
        "timm_registered_name": register_timm_model(model_cfg.arch),
        "timm_name": arch_spec(model_cfg.arch).timm_name,
        "timm_kwargs": timm_kwargs(model_cfg.arch, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size),
        "img_size": list(model_cfg.img_size),
        "patch_size": model_cfg.patch_size,
        "num_features": backbone.num_features,
        "mean": list(data_cfg.get("mean", IMAGENET_MEAN)),
        "std": list(data_cfg.get("std", IMAGENET_STD)),
        "moe": to_dict(model_cfg.moe),
        "moe_blocks": backbone.moe_indices,
        "prompt_names": list(backbone.prompt_names) if backbone.has_moe else [],
        "step": step,
    }
    head = _teacher_state(state["model"], "distill_head") if model_cfg.loss.distill else {}
    if model_cfg.loss.distill:
        if not head:
            raise ClaspError(f"{checkpoint}: model.loss.distill is on but the state has no 'teacher.distill_head.*'")
        config["distill"] = {
            "head_file": DISTILL_HEAD_FILE,
            "input": "class token of forward_features(x, prompt)",
            "prompt": "attribute" if backbone.has_moe else None,
            "embed_dim": int(head["linear.weight"].shape[0]),
            "clip": (state.get("data") or {}).get("clip"),  # labelset.json "model" of the label set trained on
        }

    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    ensure_free_space(out_dir.parent, weight_bytes + _CARD_BYTES, what=f"the backbone export {out_dir.name}")
    with atomic_dir(out_dir, replace=True) as tmp:
        metadata = {"format": "pt", "arch": model_cfg.arch, CONFIG_METADATA_KEY: json.dumps(config)}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(_model_card(config, card, state["config"]))
        if head:
            save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / DISTILL_HEAD_FILE))
    return out_dir


def load_instructions(config: dict[str, Any], weights: str = WEIGHTS_FILE) -> str:
    """Python that loads an export (``config``: its config.json; ``weights``: path of model.safetensors)."""
    registered = config.get("timm_registered_name") or f"clasp_{config['arch']}"
    lines = [
        "import pretrain  # registers the CLASP architectures with timm",
        "import timm",
        f"model = timm.create_model('{registered}', pretrained=True, pretrained_cfg_overlay=dict(file={weights!r}))",
        "model.eval()",
    ]
    if config["moe"]["enabled"]:
        lines.append("tokens = model.forward_features(images, prompt='instance')  # or 'part', 'attribute', or weights")
        return "\n".join(lines)
    kwargs = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in config["timm_kwargs"].items())
    height, width = config["img_size"]
    overlay = (
        f"dict(file={weights!r}, num_classes=0, input_size=(3, {height}, {width}), "
        f"mean={tuple(config['mean'])}, std={tuple(config['std'])})"
    )
    return "\n".join(
        lines
        + [
            "",
            "# MoE off: stock timm builds the same plain ViT (num_classes=0 in the overlay keeps its load strict)",
            "import timm",
            f"model = timm.create_model('{config['timm_name']}', pretrained=True, {kwargs},",
            f"                          pretrained_cfg_overlay={overlay})",
            "model.eval()",
        ]
    )


def export_summary(out_dir: Path) -> str:
    """What ``clasp export`` prints: where the release is and the load that applies to it."""
    config = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    which = (
        "MoE on: load it with the registered CLASP name (stock timm cannot build it)"
        if config["moe"]["enabled"]
        else "MoE off: the registered CLASP name and stock timm both load it"
    )
    code = load_instructions(config, weights=str(Path(out_dir) / WEIGHTS_FILE))
    return f"export: {out_dir} ({which}):\n" + "\n".join(f"    {line}" for line in code.splitlines())


def _model_card(config: dict[str, Any], card: dict[str, Any], run_config: dict[str, Any]) -> str:
    moe = config["moe"]
    moe_line = (
        f"prompt-controlled MoE in blocks {config['moe_blocks']}: {moe['num_experts']} experts, top-{moe['top_k']}, "
        f"prompts {config['prompt_names']} (load with the registered CLASP name; stock timm cannot build it)"
        if moe["enabled"]
        else "none (plain ViT: loads into stock timm too)"
    )
    facts = "\n".join(f"- {k}: {v}" for k, v in card.items()) or "- (no data facts were given)"
    clip = (config.get("distill") or {}).get("clip") or {}
    distill_line = (
        f"except the CLIP-embedding head ({DISTILL_HEAD_FILE}, for `clasp zeroshot`; labels' CLIP "
        f"{clip.get('arch', 'unknown')}, weights {clip.get('weights_id', 'unknown')})"
        if "distill" in config
        else "(trained without CLIP-embedding distillation)"
    )
    load = load_instructions(config)
    return f"""# CLASP backbone: {config["arch"]} at {config["img_size"][0]}x{config["img_size"][1]}

Teacher (EMA) backbone of a CLASP pre-training run (CLIP-guided self-supervised pre-training for
human-centric vision), after {config["step"]} optimizer steps. Weights only; no pre-training heads
{distill_line}.

- architecture: {config["timm_name"]} layout, patch {config["patch_size"]}, {config["num_features"]} features
- input: RGB {config["img_size"][0]}x{config["img_size"][1]} (height x width), normalised with
  mean {config["mean"]} and std {config["std"]}
- mixture of experts: {moe_line}

## Training data

{facts}

## How to load

```python
{load}
```

## Settings

```yaml
{yaml.safe_dump(run_config, sort_keys=False).rstrip()}
```

## Limitations

Pseudo-labels come from CLIP and carry its biases; the backbone was trained on person crops and is
meant for human-centric transfer (re-ID, attributes, pose, detection, parsing), not general images.
"""


def load_backbone(
    path: str | Path, *, img_size: tuple[int, int] | None = None, drop_path_rate: float = 0.0
) -> nn.Module:
    """Load an export directory: stock timm model (MoE off) or the registered ``clasp_<arch>`` (MoE on), strict.

    ``img_size`` other than the export's (e.g. 384x128 for re-ID) resamples the position embedding.
    ``drop_path_rate``: stochastic depth for fine-tuning (linear over the blocks, as timm builds it).
    The MoE is built dropless whatever capacity the export was trained with (``clasp_<arch>`` loads
    always are): a fine-tune and its evaluation must compute the same function of a token.
    """
    import timm

    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ClaspError(f"{path} is not a CLASP backbone export (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
        moe = from_dict(MoEConfig, config["moe"], prefix="moe.")
        size = tuple(img_size or config["img_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise ClaspError(f"{config_path} is not a valid CLASP export config ({type(exc).__name__}: {exc})") from None
    if moe.enabled:
        name = register_timm_model(config["arch"])
        model = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path / WEIGHTS_FILE)),
            img_size=size,
            drop_path_rate=drop_path_rate,
        )
        return model.eval()
    kwargs = dict(config["timm_kwargs"], img_size=tuple(config["img_size"]), drop_path_rate=drop_path_rate)
    model = timm.create_model(config["timm_name"], pretrained=False, **kwargs)
    check_loaded_keys(model, path / WEIGHTS_FILE, what=f"{config['timm_name']} ({config_path})")
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    if size != tuple(config["img_size"]):
        model.set_input_size(img_size=size)
    model.pretrained_cfg = dict(
        getattr(model, "pretrained_cfg", {}) or {},
        input_size=(3, *size),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    return model.eval()


def load_distill_head(path: str | Path) -> tuple[nn.Linear, dict[str, Any]]:
    """The CLIP-embedding head of an export and its config.json ``distill`` section (prompt, CLIP identity)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ClaspError(f"{path} is not a CLASP backbone export (no {CONFIG_FILE}); give a `clasp export` folder")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClaspError(f"{path / CONFIG_FILE} is not a CLASP export config ({exc})") from None
    info = config.get("distill")
    if not info or not (path / info["head_file"]).is_file():
        raise ClaspError(
            f"backbone {path} was pre-trained without CLIP-embedding distillation (no 'distill' in its config.json "
            f"or no {DISTILL_HEAD_FILE}): zero-shot attributes need model.loss.distill=true in pre-training"
        )
    state = load_file(str(path / info["head_file"]))
    head = nn.Linear(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    head.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
    return head.eval(), info
