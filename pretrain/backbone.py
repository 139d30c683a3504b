"""The CLASP backbone: timm's VisionTransformer with prompt-controlled MoE FFNs in chosen blocks.

``create_backbone("vit_small")`` returns a ``ClaspViT``. Its parameter names are timm's, so with the
MoE off its state_dict loads with ``strict=True`` into
``timm.create_model("vit_small_patch16_224", img_size=(256, 128), num_classes=0)``; with the MoE on,
only the ``blocks.<i>.mlp.*`` of the MoE blocks and the ``task_prompts.prompts`` table differ.

``forward_features(x, prompt)`` takes the task prompt as a name (``"instance"``, ``"part"``,
``"attribute"``), a weight vector over them ((T,) or (B, T), e.g. a learned softmax mix downstream),
or None (= instance). Smaller inputs than ``img_size`` (DINO's local crops) use interpolated
position embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.errors import ClaspError
from pretrain.model_config import TASK_PROMPTS, MoEConfig
from pretrain.moe import PromptMoE, TaskPrompts

Prompt = str | Tensor | Sequence[float] | None


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: the stock timm model it matches and the settings that define it."""

    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Pixels per token side taken by a convolutional stem before the patch projection (0 = plain patchify).
    # timm's R+ViT hybrids (``vit_tiny_r_s16_p8_224``): a 7x7/2 conv + norm + 3x3/2 max-pool, then a
    # (patch_size / 4) projection, so ``model.patch_size`` stays the token stride and stock timm builds the same.
    conv_stem_stride: int = 0


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec("vit_tiny_patch16_224", dict(embed_dim=192, depth=12, num_heads=3)),
    "vit_small": ArchSpec("vit_small_patch16_224", dict(embed_dim=384, depth=12, num_heads=6)),
    "vit_base": ArchSpec("vit_base_patch16_224", dict(embed_dim=768, depth=12, num_heads=12)),
    # a small model for the CPU demo and tests; stock timm builds it from the same kwargs
    "vit_micro": ArchSpec("vit_tiny_patch16_224", dict(embed_dim=128, depth=4, num_heads=4)),
    # vit_micro behind a convolutional stem (as TransReID-SSL's ViT-B on LUPerson): at CPU budgets a plain
    # ViT barely leaves its initialisation, while convolutions learn local structure within a few hundred steps
    "vit_micro_conv": ArchSpec("vit_tiny_r_s16_p8_224", dict(embed_dim=128, depth=4, num_heads=4, patch_size=4), 4),
    "vit_small_conv": ArchSpec("vit_tiny_r_s16_p8_224", dict(embed_dim=384, depth=12, num_heads=6, patch_size=4), 4),
}


def register_arch(name: str, spec: ArchSpec) -> None:
    """Add an architecture to the registry (e.g. from a plugin or a test)."""
    ARCHS[name] = spec


def arch_spec(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise ClaspError(f"model.arch '{name}' is not a registered backbone; choose one of {sorted(ARCHS)}")
    return ARCHS[name]


def moe_block_indices(blocks: str | Sequence[int], depth: int) -> list[int]:
    """Which blocks get a MoE FFN, from ``moe.blocks`` ("last_half", "last_third", "all", "every_other", or ids)."""
    named = {
        "all": list(range(depth)),
        "last_half": list(range(depth - depth // 2, depth)),
        "last_third": list(range(depth - max(1, depth // 3), depth)),
        "every_other": list(range(1, depth, 2)),
    }
    if isinstance(blocks, str):
        if blocks not in named:
            raise ClaspError(f"model.moe.blocks '{blocks}' is unknown; use one of {sorted(named)} or a list of ids")
        return named[blocks]
    ids = sorted(set(int(i) for i in blocks))
    if not ids or ids[0] < 0 or ids[-1] >= depth:
        raise ClaspError(f"model.moe.blocks {list(blocks)} must be non-empty block ids in [0, {depth - 1}]")
    return ids


class PromptMoEBlock(nn.Module):
    """A timm ``Block`` whose MLP is a ``PromptMoE``; keeps the block's submodules (and their names)."""

    def __init__(self, block: nn.Module, moe: PromptMoE) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.mlp = moe

    def forward(self, x: Tensor, prompt_emb: Tensor, group: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        y, balance_loss = self.mlp(self.norm2(x), prompt_emb, group)
        return x + self.drop_path2(self.ls2(y)), balance_loss


class ClaspViT(VisionTransformer):
    """timm VisionTransformer + optional prompt-controlled MoE; see the module docstring."""

    def __init__(self, *, moe: MoEConfig | None = None, prompt_names: tuple[str, ...] = TASK_PROMPTS, **kwargs: Any):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("dynamic_img_size", True)  # local crops are smaller than img_size
        super().__init__(**kwargs)
        self.moe_cfg = moe if (moe is not None and moe.enabled) else None
        self.moe_indices: list[int] = []
        if self.moe_cfg is None:
            return
        depth, dim = len(self.blocks), self.embed_dim
        self.moe_indices = moe_block_indices(self.moe_cfg.blocks, depth)
        mlp_ratio = kwargs.get("mlp_ratio", 4.0)
        ratio = self.moe_cfg.expert_mlp_ratio or mlp_ratio / self.moe_cfg.top_k
        self.task_prompts = TaskPrompts(prompt_names, self.moe_cfg.prompt_dim)
        for i in self.moe_indices:
            expert_ffn = PromptMoE(
                dim,
                max(1, int(dim * ratio)),
                num_experts=self.moe_cfg.num_experts,
                top_k=self.moe_cfg.top_k,
                prompt_dim=self.moe_cfg.prompt_dim,
                capacity_factor=self.moe_cfg.capacity_factor,
                eval_capacity_factor=self.moe_cfg.eval_capacity_factor,
                num_groups=len(prompt_names) + 1,  # router statistics per prompt, and one for mixes
            )
            self.blocks[i] = PromptMoEBlock(self.blocks[i], expert_ffn)

    @property
    def has_moe(self) -> bool:
        return self.moe_cfg is not None

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return self.task_prompts.names if self.has_moe else TASK_PROMPTS

    # ---- building blocks of the forward pass
    def _embed(self, x: Tensor) -> Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def _run_blocks(
        self, x: Tensor, prompt_emb: Tensor | None, start: int, stop: int, group: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Blocks ``start..stop-1``; returns tokens and the mean balance loss of the MoE blocks run.

        ``group`` (B,) names each sample's prompt for the router statistics (``prompt_group``)."""
        losses = []
        for blk in self.blocks[start:stop]:
            moe = isinstance(blk, PromptMoEBlock)
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = (
                    checkpoint(blk, x, prompt_emb, group, use_reentrant=False)
                    if moe
                    else checkpoint(blk, x, use_reentrant=False)
                )
            else:
                out = blk(x, prompt_emb, group) if moe else blk(x)
            if moe:
                x, loss = out
                losses.append(loss)
            else:
                x = out
        balance = torch.stack(losses).mean() if losses else x.new_zeros((), dtype=torch.float32)
        return x, balance

    def prompt_embedding(self, prompt: Prompt, batch_size: int) -> Tensor | None:
        return self.task_prompts(prompt, batch_size) if self.has_moe else None

    def prompt_group(self, prompt: Prompt, batch_size: int, device: torch.device) -> Tensor | None:
        """(B,) router-statistics group: the prompt's index for a named prompt, ``len(prompt_names)`` for a mix."""
        if not self.has_moe:
            return None
        names = self.task_prompts.names
        if prompt is None or (isinstance(prompt, str) and prompt in names):
            index = names.index(prompt or names[0])
        else:
            index = len(names)  # a weight vector (or an unknown name, which TaskPrompts rejects)
        return torch.full((batch_size,), index, dtype=torch.long, device=device)

    # ---- public interface
    def forward_tokens(self, x: Tensor, prompt: Prompt = None) -> tuple[Tensor, Tensor]:
        """(B, 1+N, D) tokens after the final norm, and the MoE balance loss (0 without MoE)."""
        batch = x.shape[0]
        group = self.prompt_group(prompt, batch, x.device)
        x, balance = self._run_blocks(self._embed(x), self.prompt_embedding(prompt, batch), 0, len(self.blocks), group)
        return self.norm(x), balance

    def forward_features(self, x: Tensor, prompt: Prompt = None) -> Tensor:  # type: ignore[override]
        return self.forward_tokens(x, prompt)[0]

    def forward_prompts(self, x: Tensor, prompts: Sequence[Prompt]) -> tuple[list[Tensor], Tensor]:
        """Tokens of ``x`` under each of ``prompts``, sharing the blocks before the first MoE block.

        The prompt-independent trunk runs once; the MoE tail runs once on the inputs repeated per
        prompt, batched. Without MoE every prompt gives the same tokens and one pass is made.
        """
        if not self.has_moe:
            tokens = self.forward_features(x)
            return [tokens] * len(prompts), tokens.new_zeros((), dtype=torch.float32)
        first = self.moe_indices[0]
        batch = x.shape[0]
        h, _ = self._run_blocks(self._embed(x), None, 0, first)
        h = h.repeat(len(prompts), 1, 1)
        emb = torch.cat([self.task_prompts(p, batch) for p in prompts])
        group = torch.cat([self.prompt_group(p, batch, x.device) for p in prompts])
        h, balance = self._run_blocks(h, emb, first, len(self.blocks), group)
        return list(self.norm(h).split(batch)), balance

    def forward(self, x: Tensor, prompt: Prompt = None) -> Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x, prompt))

    def forward_intermediates(  # type: ignore[override]
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        prompt: Prompt = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]] | dict[str, Any]:
        """timm's ``forward_intermediates`` (same arguments and outputs) under a task prompt."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        if attn_mask is not None:
            raise NotImplementedError("ClaspViT does not take attention masks")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        prompt_emb = self.prompt_embedding(prompt, batch)
        group = self.prompt_group(prompt, batch, x.device)
        x = self._embed(x)
        stop = max_index + 1 if stop_early else len(self.blocks)
        feats = []
        for i in range(stop):
            x, _ = self._run_blocks(x, prompt_emb, i, i + 1, group)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        npt = self.num_prefix_tokens
        prefix = [y[:, :npt] for y in feats]
        feats = [y[:, npt:] for y in feats]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size((height, width))
            feats = [y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in feats]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": feats}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            feats = list(zip(feats, prefix, strict=True))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = set(super().no_weight_decay())
        return names | {"task_prompts.prompts"} if self.has_moe else names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre|task_prompts",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def moe_stats(self) -> dict[str, Tensor]:
        """Router statistics since the last call; resets them. Per MoE block: token assignments kept per
        expert (``blocks.<i>.tokens_per_expert``, (E,) long) and the share dropped for capacity
        (``blocks.<i>.dropped_frac``); per prompt (``mix`` for weighted mixes), summed over the MoE blocks:
        ``prompt.<name>.tokens_per_expert`` and ``prompt.<name>.dropped`` (assignments)."""
        stats: dict[str, Tensor] = {}
        groups = (*self.task_prompts.names, "mix") if self.has_moe else ()
        per_group_routed, per_group_dropped = 0, 0
        for i in self.moe_indices:
            routed, dropped = self.blocks[i].mlp.pop_stats()
            per_group_routed, per_group_dropped = per_group_routed + routed, per_group_dropped + dropped
            routed, dropped = routed.sum(0), dropped.sum()
            stats[f"blocks.{i}.tokens_per_expert"] = routed
            stats[f"blocks.{i}.dropped_frac"] = dropped / (routed.sum() + dropped).clamp_min(1)
        for g, name in enumerate(groups):
            stats[f"prompt.{name}.tokens_per_expert"] = per_group_routed[g]
            stats[f"prompt.{name}.dropped"] = per_group_dropped[g]
        return stats


def timm_kwargs(arch: str, *, img_size: tuple[int, int], patch_size: int = 16) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(ARCHS[arch].timm_name, **kwargs)`` giving the same layout."""
    spec = arch_spec(arch)
    if spec.conv_stem_stride:  # timm's hybrid patch size counts stem output pixels
        if patch_size % spec.conv_stem_stride:
            raise ClaspError(f"model.patch_size {patch_size} must be a multiple of {arch}'s stem stride "
                             f"{spec.conv_stem_stride}")  # fmt: skip
        patch_size //= spec.conv_stem_stride
    return dict(spec.timm_kwargs, img_size=tuple(img_size), patch_size=patch_size, num_classes=0)


def conv_stem_embed(in_chans: int = 3) -> Any:
    """timm's R+ViT hybrid stem (ResNetV2 stem, no stages) as the ``embed_layer`` of a ViT; same parameter names."""
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import _resnetv2

    return partial(HybridEmbed, backbone=_resnetv2(layers=(), in_chans=in_chans))


def create_backbone(
    arch: str,
    *,
    img_size: tuple[int, int] = (256, 128),
    patch_size: int = 16,
    moe: MoEConfig | None = None,
    drop_path_rate: float = 0.0,
) -> ClaspViT:
    """Build a registered backbone (``ARCHS``) at ``img_size``, with the MoE of ``moe`` if enabled."""
    kwargs = timm_kwargs(arch, img_size=img_size, patch_size=patch_size)
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ClaspError(f"model.img_size {list(img_size)} must be a multiple of model.patch_size {patch_size}")
    if arch_spec(arch).conv_stem_stride:
        kwargs["embed_layer"] = conv_stem_embed()
    return ClaspViT(moe=moe, drop_path_rate=drop_path_rate, **kwargs)
