"""What the pre-training loop reports: loss checks kept on the device, router statistics, hyper-parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import to_dict
from pipeline.errors import ClaspError
from pretrain.config import PretrainConfig
from pretrain.meta_arch import LOSS_TERMS


class NonFiniteLossError(ClaspError):
    """The loss became NaN/inf; training stopped before the optimizer could apply it."""


def flat_hparams(cfg: PretrainConfig) -> dict[str, Any]:
    """Scalars only (TensorBoard hparams): nested keys dotted, lists and None as strings."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, int | float | str | bool) else str(value)

    walk("", to_dict(cfg))
    return flat


def moe_log(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Router statistics as log values.

    Per prompt that routed tokens since the last log (student forwards, all MoE blocks together):
    ``moe/<prompt>/expert_share/<i>`` (share of its token-expert assignments that went to expert i) and
    ``moe/<prompt>/dropped_frac``. Per MoE block: the least-used expert's share (1/E = balanced) and the
    dropped share.
    """
    out = {}
    for name, value in stats.items():
        if name.startswith("prompt."):
            prompt, what = name.removeprefix("prompt.").rsplit(".", 1)
            if what != "tokens_per_expert":
                continue
            dropped = stats[f"prompt.{prompt}.dropped"]
            total = value.sum() + dropped
            if int(total) == 0:
                continue
            for i, count in enumerate((value.float() / total).tolist()):
                out[f"moe/{prompt}/expert_share/{i}"] = count
            out[f"moe/{prompt}/dropped_frac"] = float(dropped / total)
        elif name.endswith("tokens_per_expert"):
            share = value.float() / value.sum().clamp_min(1)
            out[f"moe/{name.removesuffix('.tokens_per_expert')}.min_expert_share"] = float(share.min())
        else:
            out[f"moe/{name}"] = float(value)
    return out


class LossWatch:
    """Device-side record of non-finite and all-zero loss terms, read on the host only when asked."""

    def __init__(self, device: torch.device, watched: list[bool], *, zero_warn_steps: int) -> None:
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(LOSS_TERMS), device=device)
        self.zero_run = torch.zeros(len(LOSS_TERMS), dtype=torch.long, device=device)
        self.watched = watched  # terms that are switched on (a switched-off term is 0 by design)
        self.zero_warn_steps = zero_warn_steps
        self.warned: set[str] = set()

    def update(self, step: int, terms: torch.Tensor) -> None:
        first = (self.bad_step < 0) & ~torch.isfinite(terms).all()
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = torch.where(first, terms, self.bad_terms)
        self.zero_run = (self.zero_run + 1) * (terms == 0)

    def check(self, last_ckpt: Path | None) -> None:
        bad = int(self.bad_step)
        if bad >= 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_TERMS, self.bad_terms.tolist(), strict=True))
            raise NonFiniteLossError(
                f"non-finite loss at step {bad} ({shown}); training stopped and nothing after it was saved. "
                f"Last good checkpoint: {last_ckpt or 'none (no checkpoint written yet)'}. "
                "Resume from it with a lower optim.lr, bf16 instead of fp16, or a smaller optim.clip_grad."
            )

    def zero_terms(self) -> list[str]:
        """Switched-on terms that have been exactly 0 for ``zero_warn_steps`` steps, each reported once."""
        runs = self.zero_run.tolist()
        found = [
            k
            for k, run, on in zip(LOSS_TERMS, runs, self.watched, strict=True)
            if on and run >= self.zero_warn_steps and k not in self.warned
        ]
        self.warned.update(found)
        return found
