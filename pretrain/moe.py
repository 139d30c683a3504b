"""Prompt-Controlled Mixture-of-Experts FFN (DESIGN.md §3.2).

A ``PromptMoE`` replaces the MLP of a ViT block: ``num_experts`` expert MLPs, each token sent to its
``top_k`` experts by a router that sees the token *and* the embedding of a task prompt (instance,
part, attribute, or a weighted mix of them). The task prompts themselves are a small learned table,
``TaskPrompts``, shared by all MoE blocks of a backbone.

Dispatch has fixed shapes so it needs no host sync and no Python loop over tokens: every expert gets
``capacity`` slots, a token's slot is its running count among the tokens routed to that expert
(first choices of all tokens before second choices, as in GShard), tokens past the capacity skip the
FFN (the residual carries them), and all experts run as one batched matmul over (E, capacity, D).
The cost is ``capacity_factor`` times the dense MLP's at the same active width (padding included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskPrompts(nn.Module):
    """Learnable embedding per task family; a prompt is a name, a weight vector over tasks, or None."""

    def __init__(self, names: tuple[str, ...], dim: int, init: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        self.prompts = nn.Parameter(torch.randn(len(names), dim))
        if init:
            self.init_from(init)

    @torch.no_grad()
    def init_from(self, vectors: dict[str, Tensor]) -> None:
        """Start from given vectors (e.g. CLIP text embeddings of the task descriptions).

        They are L2-normalised and mapped to the prompt width by a fixed orthonormal projection
        (seeded, so it needs no storage), which keeps their cosine geometry, then scaled to the norm
        a random N(0, 1) prompt has, so router initialisation is the same either way.
        """
        unknown = set(vectors) - set(self.names)
        if unknown:
            raise ValueError(f"prompt_init has unknown task names {sorted(unknown)}; valid: {list(self.names)}")
        dim = self.prompts.shape[1]
        for name, vec in vectors.items():
            vec = torch.as_tensor(vec, dtype=torch.float32).flatten()
            proj = _fixed_projection(vec.numel(), dim)
            emb = F.normalize(vec, dim=0) @ proj
            self.prompts[self.names.index(name)] = F.normalize(emb, dim=0) * math.sqrt(dim)

    def weights(self, prompt: str | Tensor | list[float] | tuple[float, ...] | None) -> Tensor:
        """Mixing weights over the task prompts: (T,) or (B, T)."""
        if prompt is None:
            prompt = self.names[0]
        if isinstance(prompt, str):
            if prompt not in self.names:
                raise ValueError(f"unknown task prompt '{prompt}'; valid: {list(self.names)}")
            w = torch.zeros(len(self.names), device=self.prompts.device)
            w[self.names.index(prompt)] = 1.0
            return w
        w = torch.as_tensor(prompt, dtype=torch.float32, device=self.prompts.device)
        if w.shape[-1] != len(self.names) or w.dim() not in (1, 2):
            raise ValueError(f"a prompt weight vector must have shape ({len(self.names)},) or (B, {len(self.names)})")
        return w

    def forward(self, prompt: str | Tensor | list[float] | tuple[float, ...] | None, batch_size: int) -> Tensor:
        """Prompt embedding per sample, (batch_size, prompt_dim)."""
        emb = self.weights(prompt).to(self.prompts.dtype) @ self.prompts
        if emb.dim() == 1:
            return emb.expand(batch_size, -1)
        if emb.shape[0] != batch_size:
            raise ValueError(f"per-sample prompt weights have {emb.shape[0]} rows for a batch of {batch_size}")
        return emb


def _fixed_projection(in_dim: int, out_dim: int) -> Tensor:
    """(in_dim, out_dim) matrix with orthonormal columns (or rows when in_dim < out_dim), seed 0."""
    if in_dim == out_dim:
        return torch.eye(in_dim)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=gen))
    return q if in_dim > out_dim else q.T


class PromptMoE(nn.Module):
    """Top-k routed expert MLPs; ``forward(x, prompt_emb) -> (y, balance_loss)``.

    Args:
        dim: token width. hidden: hidden width of each expert MLP.
        prompt_dim: width of the task prompt embedding seen by the router.
        capacity_factor / eval_capacity_factor: expert capacity in training / eval mode (<= 0: dropless).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_experts: int,
        top_k: int,
        prompt_dim: int,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe.top_k must be between 1 and moe.num_experts ({num_experts}), got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.router_token = nn.Linear(dim, num_experts)
        self.router_prompt = nn.Linear(prompt_dim, num_experts, bias=False)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.act = act_layer()
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.init_weights()
        # router statistics summed over forwards until read (detached, no host sync); with activation
        # checkpointing the recomputed forward counts again
        self.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        # same scheme as timm's ViT MLP (trunc normal 0.02, zero bias) so MoE on/off start alike
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)
        nn.init.trunc_normal_(self.router_token.weight, std=0.02)
        nn.init.zeros_(self.router_token.bias)
        nn.init.trunc_normal_(self.router_prompt.weight, std=0.02)

    @torch.no_grad()
    def pop_stats(self) -> tuple[Tensor, Tensor]:
        """(kept assignments per expert, dropped assignments) since the last call; resets the counters."""
        stats = self.routed_tokens.clone(), self.dropped_tokens.clone()
        self.routed_tokens.zero_()
        self.dropped_tokens.zero_()
        return stats

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor <= 0:
            return num_tokens
        return min(num_tokens, max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts)))

    def route(self, x: Tensor, prompt_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities (T, E), top-k gate weights (T, k) and expert ids (T, k), float32."""
        logits = self.router_token(x) + self.router_prompt(prompt_emb.to(x.dtype)).unsqueeze(1)
        probs = logits.flatten(0, 1).float().softmax(dim=-1)
        gate, expert = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            # top-1 keeps the raw probability, else the router would get no gradient from the task loss
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return probs, gate, expert

    def forward(self, x: Tensor, prompt_emb: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, N, D) tokens; prompt_emb: (B, prompt_dim). Returns (B, N, D) and the balance loss."""
        batch, n, dim = x.shape
        num_tokens, e, k = batch * n, self.num_experts, self.top_k
        probs, gate, expert = self.route(x, prompt_emb)

        # Switch-Transformer balance loss: E * sum_e (share of assignments to e) * (mean router prob of e)
        assign = F.one_hot(expert.T.reshape(-1), e)  # (k*T, E), first choices of all tokens first
        share = assign.float().mean(dim=0)
        balance_loss = e * (share * probs.mean(dim=0)).sum()

        capacity = self.capacity(num_tokens)
        position = ((assign.cumsum(dim=0) - assign) * assign).sum(dim=-1)  # rank of the token at its expert
        kept = position < capacity
        slots = e * capacity
        slot = torch.where(kept, expert.T.reshape(-1) * capacity + position, slots)  # dropped -> spare slot
        token = torch.arange(num_tokens, device=x.device).repeat(k)
        # empty slots compute on token 0: their outputs are never read, so they get no gradient either
        slot_token = torch.zeros(slots + 1, dtype=torch.long, device=x.device).scatter_(0, slot, token)[:slots]

        h = x.reshape(num_tokens, dim)[slot_token].view(e, capacity, dim)
        h = self.act(torch.baddbmm(self.fc1_bias.unsqueeze(1).to(h.dtype), h, self.fc1_weight.to(h.dtype)))
        h = torch.baddbmm(self.fc2_bias.unsqueeze(1).to(h.dtype), h, self.fc2_weight.to(h.dtype))
        out = h.reshape(slots, dim)[torch.where(kept, slot, 0)]  # (k*T, D); dropped rows are zeroed by the gate
        out = out * (gate.T.reshape(-1) * kept).to(out.dtype).unsqueeze(1)
        out = out.view(k, num_tokens, dim).sum(dim=0).view(batch, n, dim)

        with torch.no_grad():
            self.routed_tokens += (assign * kept.unsqueeze(1)).sum(dim=0)
            self.dropped_tokens += (~kept).sum()
        return out, balance_loss
