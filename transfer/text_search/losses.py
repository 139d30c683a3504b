"""Identity-aware image-text matching: IRRA's similarity distribution matching (SDM) and ID losses.

SDM (Jiang & Ye, CVPR 2023): in a batch of (image, caption) pairs, the softmax over scaled cosine similarities
of each caption to all images (and of each image to all captions) is pulled toward the true matching
distribution, uniform over the batch entries of the *same identity* (not only the paired one, as InfoNCE
would have it), by KL(predicted || true). The true distribution has zeros, so its log is taken of
``q + eps`` (IRRA: eps = 1e-8), which makes the loss a large finite penalty on mass put on other identities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdm_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, pids: torch.Tensor, *, logit_scale: float, eps: float = 1e-8
) -> torch.Tensor:
    """Image-to-text plus text-to-image KL(p || q), each a mean over the batch rows."""
    same = (pids.reshape(-1, 1) == pids.reshape(1, -1)).float()
    target = same / same.sum(dim=1, keepdim=True)  # uniform over the row's same-identity entries
    log_target = torch.log(target + eps)
    t2i = logit_scale * F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).t()
    loss = image_emb.new_zeros(())
    for logits in (t2i, t2i.t()):
        log_p = F.log_softmax(logits, dim=1)
        loss = loss + (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()
    return loss


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one identity classifier on both modalities (IRRA's ID loss, Zheng et al. 2020)."""
    return F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)
