"""Pre-training heads: DINO projection head, per-patch part head, class-token attribute and CLIP-embedding heads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    The last layer's rows are L2-normalised in the forward pass, which is weight normalisation with
    the gain fixed at 1 (DINO's ``norm_last_layer=True``, the stable choice for ViTs), written
    without a parametrization so the state_dict is a plain ``last_layer.weight``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3
    ):
        super().__init__()
        if layers < 1:
            raise ValueError("model.loss.dino_head_layers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1, eps=1e-6))


class PartHead(nn.Module):
    """Per patch token -> part class logits: (B, N, D) -> (B, N, num_parts)."""

    def __init__(self, in_dim: int, num_parts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_parts)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        return self.linear(patch_tokens)


class AttributeHead(nn.Module):
    """Class token -> attribute logits: (B, D) -> (B, num_attributes)."""

    def __init__(self, in_dim: int, num_attributes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_attributes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cls_token: Tensor) -> Tensor:
        return self.linear(cls_token)


class EmbedHead(nn.Module):
    """Class token -> CLIP image-embedding space: (B, D) -> (B, E), not normalised (the loss normalises).

    One linear map on purpose: CLIP's embedding must be *linearly* readable from the backbone's class
    token, so the backbone itself (what is exported) carries it, not a deep head that is thrown away.
    """

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, embed_dim)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cls_token: Tensor) -> Tensor:
        return self.linear(cls_token)
