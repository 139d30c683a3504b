"""open_clip loading, weight identity, text embeddings and dense (MaskCLIP-style) patch features.

A CLIP is named ``ARCH[:TAG]`` (``ViT-B-16:openai``: open_clip builds the architecture and fetches
the tagged weights) or given as a local checkpoint: a directory holding ``open_clip_config.json``
plus a weights file (what ``clasp clip-train`` writes; open_clip's ``local-dir:`` layout), or a
weights file for ``ARCH``. An architecture with no weights is random: labels from it are noise, so
loading one is refused unless ``allow_random_weights`` is set.

Dense features (``dense="auto"`` picks by how the tower pools):
- ``value`` (MaskCLIP; for class-token towers such as OpenAI's ViT-B-16): in the last block the
  query/key mixing is dropped and each patch token's *value* (``W_v`` then the output projection)
  goes through the final LayerNorm and the image projection into the joint image-text space, so
  patch i's feature describes patch i rather than the whole image.
- ``tokens`` (for average-pooled towers such as the project's tiny CLIP): the image embedding *is*
  the mean of the projected patch tokens, so each projected token already lives in the joint space
  and contrastive training made the patches add up to the caption (CAM-style).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from pipeline.errors import ClaspError

log = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir / hf-hub config file name
_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's initial value: an untouched one means untrained weights

open_clip.add_model_config(MODEL_CONFIGS_DIR)


@dataclass(frozen=True)
class ClipIdentity:
    """What a label set records about its CLIP: enough to rebuild it, and a hashable weights id."""

    arch: str
    weights: str  # tag, checkpoint path, or "random"
    weights_id: str  # tag name, or sha256 (16 hex) of the checkpoint file, or "random"
    random: bool


@dataclass
class LoadedClip:
    model: nn.Module
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: ClipIdentity


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """``"ViT-B-16:openai"`` -> ("ViT-B-16", "openai"); ``"ViT-B-16"`` -> ("ViT-B-16", None)."""
    arch, _, tag = spec.partition(":")
    if not arch:
        raise ClaspError(f"--clip '{spec}': expected ARCH[:TAG], e.g. ViT-B-16:openai")
    return arch, (tag or None)


def file_sha256(path: str | Path, n_hex: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:n_hex]


def _find_weights(directory: Path) -> Path | None:
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    return None


def looks_untrained(model: nn.Module) -> bool:
    """True when the temperature is still open_clip's initial value: no CLIP training touched it."""
    scale = getattr(model, "logit_scale", None)
    return scale is not None and abs(float(scale.detach().float().reshape(-1)[0]) - _INIT_LOGIT_SCALE) < 1e-6


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _fail_fast_offline(arch: str, tag: str) -> None:
    """Weights ARCH:TAG that are not cached here and cannot be downloaded: one line in seconds, where
    open_clip would spend about a minute in download retries before failing."""
    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return
        source = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    elif url:
        if (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file():
            return
        source, offline = url, False
    else:  # a file path or a tag open_clip does not know: open_clip's own message says so
        return
    if offline or not _reachable(source):
        why = "HF_HUB_OFFLINE is set" if offline else f"{source} cannot be reached"
        raise ClaspError(
            f"CLIP weights '{tag}' for {arch} are not in the local cache and {why}: download them once with network "
            "access, or pass a local checkpoint with --clip-checkpoint PATH (or train one with `clasp clip-train`)"
        )


def _create(arch: str, pretrained: str | None) -> tuple[nn.Module, object]:
    if pretrained is not None and not Path(pretrained).exists():
        _fail_fast_offline(arch, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except RuntimeError as exc:
        if "not found in built-ins" in str(exc):
            raise ClaspError(
                f"CLIP architecture '{arch}' is unknown to open_clip; see open_clip.list_models() "
                f"or the configs in {MODEL_CONFIGS_DIR}"
            ) from None
        raise ClaspError(
            f"could not load CLIP weights '{pretrained}' for {arch}: {exc}. Without network access, pass a local "
            "checkpoint with --clip-checkpoint PATH, or train a small CLIP with `clasp clip-train`."
        ) from None
    return model, preprocess


def load_clip(
    clip: str = "ViT-B-16:openai",
    checkpoint: str | Path | None = None,
    *,
    allow_random_weights: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedClip:
    """Build an open_clip model from ``ARCH[:TAG]`` or a local checkpoint (file or directory), in eval mode."""
    arch, tag = parse_clip_spec(clip)
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.exists():
            raise ClaspError(f"--clip-checkpoint {ckpt} does not exist")
        config_dir = ckpt if ckpt.is_dir() else ckpt.parent
        if (config_dir / OPEN_CLIP_CONFIG).is_file() and (ckpt.is_dir() or ckpt == _find_weights(config_dir)):
            weights = _find_weights(config_dir)
            if weights is None:
                raise ClaspError(f"{config_dir} has {OPEN_CLIP_CONFIG} but no weights file (*.safetensors, *.bin)")
            name = f"local-dir:{config_dir}"
            arch = _local_arch_name(config_dir, arch)
            model, preprocess = _create(name, None)
            tokenizer = open_clip.get_tokenizer(name)
        else:
            if ckpt.is_dir():
                raise ClaspError(f"--clip-checkpoint {ckpt} is a directory without {OPEN_CLIP_CONFIG}")
            weights = ckpt
            try:
                model, preprocess = _create(arch, str(ckpt))
            except ClaspError:
                raise
            except Exception as exc:  # torch.load / state_dict errors of a file that is not a CLIP of `arch`
                raise ClaspError(
                    f"--clip-checkpoint {ckpt} is not an open_clip checkpoint of {arch} ({type(exc).__name__}: "
                    f"{str(exc)[:120]}): give a `clasp clip-train` output folder or the weights file of --clip ARCH"
                ) from None
            tokenizer = open_clip.get_tokenizer(arch)
        identity = ClipIdentity(arch=arch, weights=str(weights), weights_id=file_sha256(weights), random=False)
    else:
        model, preprocess = _create(arch, tag)
        tokenizer = open_clip.get_tokenizer(arch)
        identity = ClipIdentity(arch=arch, weights=tag or "random", weights_id=tag or "random", random=tag is None)
    if not identity.random and looks_untrained(model):
        identity = ClipIdentity(identity.arch, identity.weights, identity.weights_id, random=True)
    if identity.random:
        what = f"CLIP {identity.arch} from {checkpoint}" if checkpoint else f"CLIP '{clip}'"
        if not allow_random_weights:
            raise ClaspError(
                f"{what} has random (untrained) weights, so its "
                "labels would be meaningless. Give trained weights (ARCH:TAG or --clip-checkpoint), or set "
                "allow_random_weights=true if you only test the plumbing."
            )
        msg = f"LABELING WITH RANDOM WEIGHTS: {what} is untrained; its labels are noise, for plumbing tests only"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    model = model.to(device).eval()
    normalize = _find_normalize(preprocess)
    return LoadedClip(model, tokenizer, normalize[0], normalize[1], identity)


def _local_arch_name(config_dir: Path, fallback: str) -> str:
    import json

    data = json.loads((config_dir / OPEN_CLIP_CONFIG).read_text())
    return str(data.get("arch") or data.get("model_name") or fallback)


def _find_normalize(preprocess: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


@torch.no_grad()
def text_embeddings(
    loaded: LoadedClip, class_prompts: list[list[str]], templates: list[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(num_classes, embed_dim) unit vectors: the mean over templates x prompts of each class, renormalised."""
    out = []
    for prompts in class_prompts:
        texts = [tpl.format(p) for p in prompts for tpl in templates]
        tokens = loaded.tokenizer(texts).to(device)
        emb = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1 + gh*gw, D) position table (class token first) to another patch grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, grid = pos_embed[:1], pos_embed[1:]
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], 0)


class DenseClip(nn.Module):
    """One image pass giving the global embedding and per-patch embeddings in the joint space.

    Input: normalised images (B, 3, H, W) at ``resolution``; position embeddings are resized once to
    that patch grid. ``value_residual`` adds the last block's input to the value path (MaskCLIP's
    original ViT variant); without it the patch feature is the value path alone, which keeps
    patches more independent of the rest of the image.
    """

    def __init__(
        self, model: nn.Module, resolution: tuple[int, int], *, dense: str = "auto", value_residual: bool = False
    ) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer) or not all(
            isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks
        ):
            raise ClaspError(
                f"dense part labels need an open_clip VisionTransformer image tower with standard blocks; "
                f"this CLIP has {type(visual).__name__}"
            )
        if not visual.transformer.batch_first:
            raise ClaspError("dense part labels need a batch-first open_clip VisionTransformer")
        ph, pw = visual.patch_size
        h, w = resolution
        if h % ph or w % pw:
            raise ClaspError(f"resolution {h}x{w} must be a multiple of the CLIP patch size {ph}x{pw}")
        self.visual = visual
        self.grid = (h // ph, w // pw)
        self.value_residual = value_residual
        if dense not in ("auto", "value", "tokens"):
            raise ClaspError(f"dense feature mode '{dense}' is not one of auto, value, tokens")
        avg_pooled = visual.pool_type == "avg" and visual.attn_pool is None
        self.dense = ("tokens" if avg_pooled else "value") if dense == "auto" else dense
        pos = resize_pos_embed(visual.positional_embedding.detach(), visual.grid_size, self.grid)
        self.register_buffer("pos_embed", pos, persistent=False)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (global (B, E), patches (B, gh, gw, E)), both L2-normalised."""
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.pos_embed.to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        if self.dense == "tokens":
            out = last(x)
            pooled = v._pool(out)[0]
            pooled = pooled @ v.proj if v.proj is not None else pooled
            patches = self._project(out[:, 1:]).reshape(x.shape[0], self.grid[0], self.grid[1], -1)
            return F.normalize(pooled.float(), dim=-1), F.normalize(patches.float(), dim=-1)
        y = last.ln_1(x)
        d = x.shape[-1]
        attn = last.attn
        value = F.linear(y[:, 1:], attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        dense = last.ls_1(attn.out_proj(value))
        if self.value_residual:
            dense = dense + x[:, 1:]
        if v.pool_type == "tok" and v.attn_pool is None:
            # The global embedding needs only the class token's output: attend with one query.
            q = x[:, :1] + last.ls_1(attn(y[:, :1], y, y, need_weights=False)[0])
            pooled = self._project(q + last.ls_2(last.mlp(last.ln_2(q))))[:, 0]
        else:
            pooled = v._pool(last(x))[0]
            pooled = pooled @ v.proj if v.proj is not None else pooled
        patches = self._project(dense).reshape(x.shape[0], self.grid[0], self.grid[1], -1)
        return F.normalize(pooled.float(), dim=-1), F.normalize(patches.float(), dim=-1)
