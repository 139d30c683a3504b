"""Prompt-Controlled Mixture-of-Experts FFN (DESIGN.md §3.2).

A ``PromptMoE`` replaces the MLP of a ViT block: ``num_experts`` expert MLPs, each token sent to its
``top_k`` experts by a router that sees the token *and* the embedding of a task prompt (instance,
part, attribute, or a weighted mix of them). The task prompts themselves are a small learned table,
``TaskPrompts``, shared by all MoE blocks of a backbone.

Dispatch is **dropless** by default (``capacity_factor <= 0``): every token reaches all of its
``top_k`` experts in training and in evaluation, under every prompt, so the student, the EMA teacher
and a downstream fine-tune all compute the same function of a token whatever else is in the batch.
The token-expert assignments are sorted by expert and all experts run as one grouped matmul
(``torch.nn.functional.grouped_mm``, group offsets on the device): fixed shapes, no host sync, no
padding, so the FFN cost equals the dense MLP's at the same active width. Where grouped_mm cannot run
(an old torch, a dtype/device it does not support, widths that break its alignment rules) the same
function is computed with one slot per token per expert (capacity = all tokens; E/k times the FFN
cost).

``capacity_factor > 0`` restores a fixed capacity (tokens over it skip the FFN; the residual carries
them). It is an explicit opt-in for memory-bound runs: the same capacity applies in training and
evaluation unless ``eval_capacity_factor`` says otherwise, and slots go by Batch Prioritized Routing
(all first choices before second choices, each by descending router probability; Riquelme et al.
2021), so no prompt, crop or position in the batch is dropped first because of where it sits.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskPrompts(nn.Module):
    """Learnable embedding per task family; a prompt is a name, a weight vector over tasks, or None.

    Initialisation: pairwise orthogonal rows of norm sqrt(dim) (a fixed, seeded orthonormal basis), so
    every prompt starts equally distinct from every other, with the norm a N(0, 1) vector has, and a
    run does not depend on the global RNG for it. ``init_from`` starts from given vectors instead (e.g.
    CLIP text embeddings of the task descriptions, when a caller has them).
    """

    def __init__(self, names: tuple[str, ...], dim: int, init: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        basis = _fixed_projection(dim, len(names)).T if len(names) <= dim else torch.randn(len(names), dim)
        self.prompts = nn.Parameter(basis * math.sqrt(dim))
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


def _register_grouped_mm_flops() -> None:
    """Teach torch's FlopCounterMode (the benchmarks' MFU) the cost of grouped_mm, which it counts as 0."""
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None:
        return
    from torch.utils import flop_counter

    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    def flops(a_shape: torch.Size, b_shape: torch.Size, *args: object, out_shape: torch.Size, **kwargs: object) -> int:
        if len(a_shape) == 2 and len(b_shape) == 2:  # weight gradient: (K, T) x (T, N) -> (E, K, N)
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        return 2 * math.prod(out_shape) * a_shape[-1]

    flop_counter.register_flop_formula(op)(flops)


_register_grouped_mm_flops()


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether ``F.grouped_mm`` runs forward and backward here at these widths (probed once, tiny sizes)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)  # never the global RNG: a probe must not shift a run's randomness

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen).to(device_type, dtype).requires_grad_()

        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x, w1, w2 = rand(3, dim), rand(2, dim, hidden), rand(2, hidden, dim)
            offs = torch.tensor([1, 3], device=device_type, dtype=torch.int32)
            y = F.grouped_mm(F.grouped_mm(x, w1, offs=offs), w2, offs=offs)
            (y * rand(*y.shape).detach()).sum().backward()
            ref = torch.cat([x[:1] @ w1[0] @ w2[0], x[1:] @ w1[1] @ w2[1]])
            y, ref = y.detach().float(), ref.detach().float()
        return bool(torch.allclose(y, ref, rtol=0.05, atol=0.05 * float(ref.abs().max())))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class PromptMoE(nn.Module):
    """Top-k routed expert MLPs; ``forward(x, prompt_emb, group) -> (y, balance_loss)``.

    Args:
        dim: token width. hidden: hidden width of each expert MLP.
        prompt_dim: width of the task prompt embedding seen by the router.
        capacity_factor: <= 0 (default): dropless. > 0: expert capacity = factor * tokens * top_k / E.
        eval_capacity_factor: capacity in eval mode; None = the same as in training (same function).
        num_groups: how many prompt groups the router statistics are kept for (``group`` ids in forward).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_experts: int,
        top_k: int,
        prompt_dim: int,
        capacity_factor: float = 0.0,
        eval_capacity_factor: float | None = None,
        num_groups: int = 1,
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
        # router statistics per prompt group, summed over forwards until read (detached, no host sync);
        # with activation checkpointing the recomputed forward counts again
        self.register_buffer("routed_tokens", torch.zeros(num_groups, num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(num_groups, dtype=torch.long), persistent=False)

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
        """(kept assignments (groups, E), dropped assignments (groups,)) since the last call; resets them."""
        stats = self.routed_tokens.clone(), self.dropped_tokens.clone()
        self.routed_tokens.zero_()
        self.dropped_tokens.zero_()
        return stats

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert; ``num_tokens`` (no token can be dropped) when dropless."""
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor <= 0:
            return num_tokens
        return min(num_tokens, max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts)))

    def route(self, x: Tensor, prompt_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities (T, E), top-k gate weights (T, k) and expert ids (T, k), float32.

        The router runs in float32 with autocast off: in bf16 its logits (differences of a few 1e-2 at
        initialisation) would be rounded to the same value and the top-k choice decided by rounding.
        """
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router_token.weight.float(), self.router_token.bias.float())
            logits = logits + F.linear(prompt_emb.float(), self.router_prompt.weight.float()).unsqueeze(1)
        probs = logits.flatten(0, 1).softmax(dim=-1)
        gate, expert = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            # top-1 keeps the raw probability, else the router would get no gradient from the task loss
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return probs, gate, expert

    def forward(self, x: Tensor, prompt_emb: Tensor, group: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, N, D) tokens; prompt_emb: (B, prompt_dim); group: (B,) statistics group of each sample.

        Returns (B, N, D) and the Switch-Transformer balance loss of this batch.
        """
        batch, n, dim = x.shape
        num_tokens, e, k = batch * n, self.num_experts, self.top_k
        probs, gate, expert = self.route(x, prompt_emb)
        # assignments choice-major: first choices of all tokens, then second choices
        flat_expert, flat_gate = expert.T.reshape(-1), gate.T.reshape(-1)
        token = torch.arange(num_tokens, device=x.device).repeat(k)

        # Switch-Transformer balance loss: E * sum_e (share of assignments to e) * (mean router prob of e)
        share = torch.zeros(e, device=x.device).index_add_(0, flat_expert, torch.ones_like(flat_gate)) / (
            k * num_tokens
        )
        balance_loss = e * (share * probs.mean(dim=0)).sum()

        dtype = x.dtype  # under autocast, the experts run in its dtype (torch < 2.4: the bmm path casts itself)
        if hasattr(torch, "get_autocast_dtype") and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        h = x.reshape(num_tokens, dim).to(dtype)
        capacity = self.capacity(num_tokens)
        if capacity >= num_tokens and _grouped_mm_works(x.device.type, dtype, dim, self.fc1_weight.shape[-1]):
            out = self._grouped(h, flat_expert, flat_gate, token)
            kept = torch.ones_like(flat_expert, dtype=torch.bool)
        else:
            out, kept = self._slotted(h, flat_expert, flat_gate, token, capacity)
        out = out.view(batch, n, dim)

        with torch.no_grad():
            group = torch.zeros(batch, dtype=torch.long, device=x.device) if group is None else group.long()
            flat_group = group.repeat_interleave(n).repeat(k)
            self.routed_tokens.view(-1).index_add_(0, flat_group * e + flat_expert, kept.long())
            self.dropped_tokens.index_add_(0, flat_group, (~kept).long())
        return out, balance_loss

    def _grouped(self, h: Tensor, flat_expert: Tensor, flat_gate: Tensor, token: Tensor) -> Tensor:
        """Dropless: assignments sorted by expert, one grouped matmul per layer, outputs summed per token.

        Written for the GPU's backward pass: the per-row expert biases come from a one-hot matmul and the tokens
        from ``index_select``, whose gradients are a matmul and an ``index_add``. Indexing (``bias[expert]``,
        ``h[idx]``) would back-propagate through a sort-based ``index_put`` that funnels every row's gradient
        into 4 bias rows: on an H200 (ViT-B width, 33k tokens, bf16) that one kernel took 84% of the layer's
        time, 40.3 ms against 7.5 ms for this form (dense MLP 2.4 ms; scratch measurement, 2026-12-04).
        """
        dtype, e = h.dtype, self.num_experts
        order = torch.argsort(flat_expert, stable=True)
        onehot = F.one_hot(flat_expert[order], e)  # (k*T, E), rows sorted by expert
        offs = onehot.sum(dim=0).cumsum(0).to(torch.int32)  # group ends, on the device: no host sync
        onehot = onehot.to(dtype)
        tok = token[order]
        y = h.index_select(0, tok)
        y = F.grouped_mm(y, self.fc1_weight.to(dtype), offs=offs) + onehot @ self.fc1_bias.to(dtype)
        y = F.grouped_mm(self.act(y), self.fc2_weight.to(dtype), offs=offs) + onehot @ self.fc2_bias.to(dtype)
        y = y * flat_gate[order].to(dtype).unsqueeze(1)
        return torch.zeros_like(h).index_add_(0, tok, y)

    def _slotted(
        self, h: Tensor, flat_expert: Tensor, flat_gate: Tensor, token: Tensor, capacity: int
    ) -> tuple[Tensor, Tensor]:
        """Every expert gets ``capacity`` slots, filled by Batch Prioritized Routing; all experts run as one bmm."""
        num_tokens, dim = h.shape
        e, k = self.num_experts, self.top_k
        # priority: choice index first, then descending gate (choice c has keys in [2c - 1, 2c])
        choice = torch.arange(k, device=h.device).repeat_interleave(num_tokens)
        order = torch.argsort(2 * choice - flat_gate.detach(), stable=True)
        assign = F.one_hot(flat_expert[order], e)
        position = torch.empty_like(flat_expert)
        position[order] = ((assign.cumsum(dim=0) - assign) * assign).sum(dim=-1)  # rank of the assignment at its expert
        kept = position < capacity
        slots = e * capacity
        slot = torch.where(kept, flat_expert * capacity + position, slots)  # dropped -> spare slot
        # empty slots compute on token 0: their outputs are never read, so they get no gradient either
        slot_token = torch.zeros(slots + 1, dtype=torch.long, device=h.device).scatter_(0, slot, token)[:slots]

        y = h[slot_token].view(e, capacity, dim)
        y = self.act(torch.baddbmm(self.fc1_bias.unsqueeze(1).to(y.dtype), y, self.fc1_weight.to(y.dtype)))
        y = torch.baddbmm(self.fc2_bias.unsqueeze(1).to(y.dtype), y, self.fc2_weight.to(y.dtype))
        out = y.reshape(slots, dim)[torch.where(kept, slot, 0)]  # (k*T, D); dropped rows are zeroed by the gate
        out = out * (flat_gate * kept).to(out.dtype).unsqueeze(1)
        return out.view(k, num_tokens, dim).sum(dim=0), kept
