"""The whole CLASP pre-training algorithm behind one object: ``ClaspMetaArch``.

The trainer only calls::

    model = ClaspMetaArch(cfg.model, num_parts=P, num_attributes=A, prompt_init=None)
    optimizer = torch.optim.AdamW(model.get_params_groups(weight_decay=0.04), lr=...)
    loss, terms = model(batch, teacher_temp=teacher_temp_at(cfg.model.loss, step))
    loss.backward()                        # (accelerator.backward under Accelerate)
    model.cancel_last_layer_grads(step)    # DINO: last head layer frozen for loss.freeze_last_layer_steps
    optimizer.step()
    model.update_teacher(momentum)         # on the unwrapped model (accelerator.unwrap_model)

Batch contract (from the pre-training data stream; G global crops, L local crops, A attributes)::

    global_crops  float (B, G, 3, H, W)      normalised, H x W = model.img_size
    local_crops   float (B, L, 3, h, w)      L may be 0
    part_map      int64 (B, G, H/p, W/p)     CLIP part class of each patch token of each global crop, -1 = ignore
    part_conf     float (B, G, H/p, W/p)     confidence of that class in [0, 1]
    attr_prob     float (B, A)               CLIP attribute probabilities in [0, 1]
    clip_embed    float (B, E)               CLIP image embedding (only with loss.distill)
    key           list[str]                  (not used by the model)

Losses: DINO under the *instance* prompt on all crops (the EMA teacher sees the global crops); the part
loss on the student's patch tokens of the global crops under the *part* prompt; the attribute loss on
the student's class token of the global crops under the *attribute* prompt; the CLIP-embedding distillation
(``loss.distill``) on that same class token, through its own linear head. With MoE on, the three
global-crop passes share the blocks before the first MoE block and run the MoE tail batched; with MoE
off one pass serves all three.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pipeline.errors import ClaspError
from pretrain.backbone import ClaspViT, create_backbone
from pretrain.heads import AttributeHead, DINOHead, EmbedHead, PartHead
from pretrain.losses import DinoLoss, attribute_loss, embed_distill_loss, part_loss
from pretrain.model_config import ModelConfig

LOSS_TERMS = ("dino", "part", "attribute", "distill", "moe_balance", "total")


class ClaspMetaArch(nn.Module):
    """Student (backbone + heads) and EMA teacher (backbone + DINO head) with the CLASP losses."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        num_parts: int,
        num_attributes: int,
        clip_embed_dim: int = 0,
        prompt_init: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        loss = cfg.loss
        if not (loss.dino or loss.part or loss.attribute or loss.distill):
            raise ClaspError("model.loss: at least one of dino, part, attribute, distill must be true")
        if loss.distill and clip_embed_dim <= 0:
            raise ClaspError(
                "model.loss.distill=true needs the CLIP embedding width (clip_embed_dim): the label set must "
                "store embeddings (`clasp label --store-embeddings`)"
            )
        self.cfg = cfg
        self.num_parts, self.num_attributes = num_parts, num_attributes

        def backbone(drop_path_rate: float) -> ClaspViT:
            return create_backbone(
                cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size, moe=cfg.moe, drop_path_rate=drop_path_rate
            )

        student = backbone(cfg.drop_path)
        if prompt_init and student.has_moe:
            student.task_prompts.init_from(prompt_init)
        student.set_grad_checkpointing(cfg.activation_checkpointing)
        dim = student.embed_dim
        self.student = nn.ModuleDict({"backbone": student})
        if loss.dino:
            self.student["dino_head"] = DINOHead(
                dim,
                loss.dino_out_dim,
                hidden_dim=loss.dino_hidden_dim,
                bottleneck_dim=loss.dino_bottleneck_dim,
                layers=loss.dino_head_layers,
            )
            self.dino_loss = DinoLoss(
                loss.dino_out_dim, student_temp=loss.student_temp, center_momentum=loss.center_momentum
            )
        if loss.part:
            self.student["part_head"] = PartHead(dim, num_parts)
        if loss.attribute:
            self.student["attribute_head"] = AttributeHead(dim, num_attributes)
        if loss.distill:
            self.student["distill_head"] = EmbedHead(dim, clip_embed_dim)

        # the teacher has no stochastic depth (as in DINO) and starts as a copy of the student
        teacher = backbone(0.0)
        teacher.load_state_dict(student.state_dict())
        self.teacher = nn.ModuleDict({"backbone": teacher})
        if loss.dino:
            self.teacher["dino_head"] = copy.deepcopy(self.student["dino_head"])
        if loss.distill:  # EMA of the student's head: the export pairs it with the (EMA) teacher backbone
            self.teacher["distill_head"] = copy.deepcopy(self.student["distill_head"])
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @property
    def student_backbone(self) -> ClaspViT:
        return self.student["backbone"]

    @property
    def teacher_backbone(self) -> ClaspViT:
        return self.teacher["backbone"]

    def train(self, mode: bool = True) -> ClaspMetaArch:
        super().train(mode)
        self.teacher.eval()  # teacher targets never use training-mode behaviour
        return self

    # ---- the training step
    def forward(self, batch: dict, *, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (with grad) and its detached terms ``LOSS_TERMS`` as 0-dim tensors (no host sync)."""
        loss_cfg = self.cfg.loss
        global_crops = _crop_major(batch["global_crops"], "global_crops")
        n_global = batch["global_crops"].shape[1]
        # Distillation shares the attribute prompt rather than having its own: CLIP's attribute pseudo-labels
        # are this very embedding scored against attribute prompts, so the two objectives agree, and a fourth
        # prompt would add a fourth pass through the MoE tail (the term must stay under 5% of a step).
        semantic = loss_cfg.attribute or loss_cfg.distill
        prompts = [p for p, on in (("instance", loss_cfg.dino), ("part", loss_cfg.part), ("attribute", semantic)) if on]
        tokens, balance = self.student_backbone.forward_prompts(global_crops, prompts)
        tokens = dict(zip(prompts, tokens, strict=True))
        # The balance loss is taken only here, on the batch that mixes all prompts: over the union it keeps
        # every expert in use while leaving each prompt free to prefer its own experts. On the
        # instance-only local crops it would push that one prompt toward uniform expert use, against the
        # specialisation prompt control exists for (their router statistics are still logged).
        zero = balance.new_zeros(())
        terms = {"dino": zero, "part": zero, "attribute": zero, "distill": zero}

        if loss_cfg.dino:
            terms["dino"] = self._dino_term(batch, global_crops, tokens["instance"], teacher_temp=teacher_temp)
        if loss_cfg.part:
            terms["part"] = self._part_term(batch, global_crops, tokens["part"])
        if loss_cfg.attribute:
            terms["attribute"] = self._attribute_term(batch, tokens["attribute"], n_global=n_global)
        if loss_cfg.distill:
            terms["distill"] = self._distill_term(batch, tokens["attribute"], n_global=n_global)

        terms["moe_balance"] = balance
        total = (
            loss_cfg.dino_weight * terms["dino"]
            + loss_cfg.part_weight * terms["part"]
            + loss_cfg.attribute_weight * terms["attribute"]
            + loss_cfg.distill_weight * terms["distill"]
        )
        if self.student_backbone.has_moe:
            total = total + self.cfg.moe.balance_loss_weight * terms["moe_balance"]
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    def _dino_term(self, batch: dict, global_crops: Tensor, instance_tokens: Tensor, *, teacher_temp: float) -> Tensor:
        """DINO self-distillation: student global + local CLS against the teacher's global CLS; updates the center."""
        n_global, batch_size = batch["global_crops"].shape[1], batch["global_crops"].shape[0]
        with torch.no_grad():
            teacher_cls = self.teacher_backbone.forward_features(global_crops, "instance")[:, 0]
            teacher_logits = self.teacher["dino_head"](teacher_cls).unflatten(0, (n_global, batch_size))
        student_cls = instance_tokens[:, 0]
        local_crops = batch.get("local_crops")
        if local_crops is not None and local_crops.shape[1] > 0:
            local_tokens, _ = self.student_backbone.forward_tokens(_crop_major(local_crops, "local_crops"), "instance")
            student_cls = torch.cat([student_cls, local_tokens[:, 0]])
        student_logits = self.student["dino_head"](student_cls).unflatten(0, (-1, batch_size))
        loss = self.dino_loss(student_logits, teacher_logits, teacher_temp)
        self.dino_loss.update_center(teacher_logits)
        return loss

    def _part_term(self, batch: dict, global_crops: Tensor, part_tokens: Tensor) -> Tensor:
        """Per-patch part classification against the CLIP part map, confidence-gated."""
        loss_cfg = self.cfg.loss
        patch_tokens = part_tokens[:, self.student_backbone.num_prefix_tokens :]
        part_map, part_conf = self._part_targets(batch, global_crops.shape[-2:], patch_tokens.shape[1])
        return part_loss(
            self.student["part_head"](patch_tokens),
            part_map,
            part_conf,
            conf_threshold=loss_cfg.part_conf_threshold,
            conf_weighting=loss_cfg.part_conf_weighting,
        )

    def _attribute_term(self, batch: dict, attribute_tokens: Tensor, *, n_global: int) -> Tensor:
        """Multi-label attribute loss of the attribute-prompt CLS against CLIP's soft attribute probabilities."""
        attr_prob = batch["attr_prob"]
        batch_size = batch["global_crops"].shape[0]
        if attr_prob.shape != (batch_size, self.num_attributes):
            raise ClaspError(
                f"batch attr_prob has shape {tuple(attr_prob.shape)}, expected "
                f"({batch_size}, {self.num_attributes}): the label set's attribute vocabulary differs from "
                "the one the model was built with"
            )
        logits = self.student["attribute_head"](attribute_tokens[:, 0])
        return attribute_loss(
            logits, attr_prob.repeat(n_global, 1), conf_weighting=self.cfg.loss.attribute_conf_weighting
        )

    def _distill_term(self, batch: dict, attribute_tokens: Tensor, *, n_global: int) -> Tensor:
        """Regression of the attribute-prompt CLS onto the stored CLIP image embedding."""
        clip_embed = batch.get("clip_embed")
        batch_size = batch["global_crops"].shape[0]
        head = self.student["distill_head"]
        if clip_embed is None or clip_embed.shape != (batch_size, head.linear.out_features):
            got = "no clip_embed" if clip_embed is None else f"clip_embed of shape {tuple(clip_embed.shape)}"
            raise ClaspError(
                f"model.loss.distill=true but the batch has {got}, expected ({batch_size}, "
                f"{head.linear.out_features}): label with `clasp label --store-embeddings` and the same CLIP"
            )
        return embed_distill_loss(head(attribute_tokens[:, 0]), clip_embed.repeat(n_global, 1))

    def _part_targets(self, batch: dict, crop_hw: torch.Size, num_patches: int) -> tuple[Tensor, Tensor]:
        part_map, part_conf = batch["part_map"], batch["part_conf"]
        grid = self.student_backbone.patch_embed.dynamic_feat_size(tuple(crop_hw))
        if tuple(part_map.shape[-2:]) != tuple(grid) or part_map.shape[-2] * part_map.shape[-1] != num_patches:
            raise ClaspError(
                f"batch part_map grid {tuple(part_map.shape[-2:])} does not match the token grid {tuple(grid)} of "
                f"{tuple(crop_hw)} global crops with patch size {self.cfg.patch_size}: "
                "resample part maps to the token grid"
            )
        return _crop_major(part_map, "part_map").flatten(1), _crop_major(part_conf, "part_conf").flatten(1)

    # ---- optimisation helpers
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (backbone and DINO head)."""
        teacher_params, student_params = [], []
        for name, module in self.teacher.items():
            t_named = dict(module.named_parameters())
            s_named = dict(self.student[name].named_parameters())
            if t_named.keys() != s_named.keys():
                raise RuntimeError(f"teacher and student '{name}' have different parameters")
            teacher_params += [t_named[k] for k in t_named]
            student_params += [s_named[k].detach() for k in t_named]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def get_params_groups(self, weight_decay: float) -> list[dict]:
        """Student parameters in two optimizer groups; no weight decay on norms, biases, pos_embed, prompts.

        Each group carries ``wd_multiplier`` (1 or 0) so a weight-decay schedule can set
        ``group["weight_decay"] = wd * group["wd_multiplier"]``.
        """
        skip = {f"backbone.{n}" for n in self.student_backbone.no_weight_decay()}
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.endswith("bias") or name in skip:
                no_decay.append(param)
            else:
                decay.append(param)
        return [
            {"name": "decay", "params": decay, "weight_decay": weight_decay, "wd_multiplier": 1.0},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "wd_multiplier": 0.0},
        ]

    def cancel_last_layer_grads(self, step: int) -> None:
        """Drop the DINO head's last-layer gradients while ``step < loss.freeze_last_layer_steps``."""
        if self.cfg.loss.dino and step < self.cfg.loss.freeze_last_layer_steps:
            for param in self.student["dino_head"].last_layer.parameters():
                param.grad = None

    def moe_stats(self) -> dict[str, Tensor]:
        """Router statistics of the student's latest forward (see ``ClaspViT.moe_stats``)."""
        return self.student_backbone.moe_stats()


def _crop_major(crops: Tensor, what: str) -> Tensor:
    """(B, C, ...) -> (C*B, ...): crop-major order, so row c*B + b is crop c of sample b."""
    if crops.dim() < 3:
        raise ClaspError(f"batch {what} must have shape (B, crops, ...), got {tuple(crops.shape)}")
    return crops.transpose(0, 1).flatten(0, 1)
