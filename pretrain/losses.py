"""CLASP objectives: DINO self-distillation, CLIP part pseudo-label loss, CLIP attribute loss, CLIP embedding
distillation.

All losses are computed in float32 (logits are cast) and never call ``.item()``, so they add no
host sync to a GPU step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model_config import LossConfig


def teacher_temp_at(cfg: LossConfig, step: int) -> float:
    """DINO teacher temperature at ``step``: linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``."""
    if step >= cfg.warmup_teacher_temp_steps:
        return cfg.teacher_temp
    frac = step / cfg.warmup_teacher_temp_steps
    return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over all crop pairs.

    ``forward(student_logits, teacher_logits, teacher_temp)`` takes (S, B, K) student outputs with the
    global crops first and (T, B, K) teacher outputs for the T global crops; each teacher crop is
    compared with every student crop except the same view, and the pairs are averaged. The centre
    (an EMA of the teacher's mean output, averaged over all processes) is updated by
    ``update_center`` after the loss, as in DINO.
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        n_teacher, n_student = teacher_logits.shape[0], student_logits.shape[0]
        log_p_student = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        p_teacher = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1).detach()
        # pair_ce[t, s] = mean over the batch of -sum_k p_teacher[t] * log p_student[s]
        pair_ce = -torch.einsum("tbk,sbk->ts", p_teacher, log_p_student) / student_logits.shape[1]
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=pair_ce.device)
        n_pairs = n_teacher * n_student - min(n_teacher, n_student)
        return pair_ce.masked_fill(same_view, 0.0).sum() / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        batch_sum = teacher_logits.float().flatten(0, -2).sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_logits.flatten(0, -2).shape[0]), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def part_loss(
    logits: Tensor, part_map: Tensor, part_conf: Tensor, *, conf_threshold: float, conf_weighting: bool
) -> Tensor:
    """Per-patch cross-entropy against CLIP part classes.

    ``logits`` (M, N, C); ``part_map`` (M, N) int class ids, -1 = ignore; ``part_conf`` (M, N) in [0, 1].
    Cells with id -1 or confidence below ``conf_threshold`` are ignored; the rest are weighted by their
    confidence when ``conf_weighting``. Returns the weighted mean (0 when no cell counts).
    """
    target = part_map.long()
    valid = (target >= 0) & (part_conf >= conf_threshold)
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
    weight = valid.float() * (part_conf.float() if conf_weighting else 1.0)
    weight = weight.flatten()
    return (ce * weight).sum() / weight.sum().clamp_min(1e-6)


def attribute_loss(logits: Tensor, attr_prob: Tensor, *, conf_weighting: bool) -> Tensor:
    """BCE of attribute logits (M, A) against CLIP's soft probabilities (M, A).

    With ``conf_weighting`` each term is weighted by |2p - 1|, so attributes CLIP is unsure about
    (p near 0.5) count little; the result is the weighted mean.
    """
    target = attr_prob.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    if not conf_weighting:
        return bce.mean()
    weight = (2 * target - 1).abs()
    return (bce * weight).sum() / weight.sum().clamp_min(1e-6)


def embed_distill_loss(pred: Tensor, clip_embed: Tensor) -> Tensor:
    """Cosine distance ``1 - cos(pred, clip_embed)`` of (M, E) predictions to CLIP image embeddings (M, E).

    Only the direction counts (CLIP compares embeddings by cosine with text). Rows whose target is all
    zeros (an image that did not decode at labelling time) are left out; the result is the mean over the
    rest (0 when none is left).
    """
    target = clip_embed.float()
    valid = (target.norm(dim=-1) > 0).float()
    cos = F.cosine_similarity(pred.float(), target, dim=-1, eps=1e-6)
    return ((1.0 - cos) * valid).sum() / valid.sum().clamp_min(1.0)
