"""Turn CLIP image features into attribute and part pseudo-labels (DESIGN.md section 3.1).

Everything here is batched tensor math on the labeling device: the per-image Python work of a
batch is nil, so the GPU never waits for the host.

- Attributes: p(attr) = softmax over the (positive, negative) logits, logit = CLIP's temperature x
  cosine(image, prompt ensemble). Attributes of a mutually exclusive ``group`` (age band, view,
  sleeve, lower garment) optionally share one softmax over the members' positive logits.
- Parts: patch-text logits are averaged onto the label grid, softmax over the part classes; each
  cell takes the most likely non-background class, unless the foreground estimate says the cell is
  background (class 0).
- Part confidence means the same for background and parts: how far above chance the decisions behind
  the label are, ``(p - 1/n) / (1 - 1/n)`` clipped to [0, 1] for a decision among n options (0 = a coin
  flip, 1 = certain). A background cell rests on one decision (person vs background, n = 2); a part
  cell on two (person vs background, then its class among the K-1 parts) and takes their geometric
  mean, so a two-decision label is not penalised for being two. (Before: a part cell's confidence was
  P(class | person) x P(person), often < 0.3, and a background cell's 1 - P(person), always >= 0.5, so
  with the 0.3 threshold background dominated the part loss, and on a weak CLIP no part cell passed.)
- Foreground: P(person) per cell from person-vs-background prompts (``prompts``), from
  1 - P(background class of the part vocabulary) (``parts``), or the mean of the two (``both``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.vocab import AttributeVocab, PartVocab


@dataclass(frozen=True)
class LabelBatch:
    """Labels of one batch (on the labeling device until ``to_host``); rows align with the batch."""

    attr_prob: torch.Tensor  # (B, A) float in [0, 1]
    part_map: torch.Tensor  # (B, gh, gw) uint8 class ids, 0 = background
    part_conf: torch.Tensor  # (B, gh, gw) float in [0, 1]
    fg_ratio: torch.Tensor  # (B,) float
    area: torch.Tensor  # (B, K-1) share of cells of each non-background class
    row: torch.Tensor  # (B, K-1) mean row in [0, 1] of each class, NaN when absent

    def to_host(self, extra: torch.Tensor | None = None) -> tuple[LabelBatch, torch.Tensor | None, object]:
        """(labels on CPU, ``extra`` on CPU, event to wait for); from a GPU the copies are asynchronous."""
        if self.part_map.device.type != "cuda":
            return self, extra, None
        # on the device that made the labels (not the current one): there the event follows the copies
        with torch.cuda.device(self.part_map.device):
            moved = {f.name: getattr(self, f.name).to("cpu", non_blocking=True) for f in dataclasses.fields(self)}
            extra = extra.to("cpu", non_blocking=True) if extra is not None else None
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.part_map.device))
        return LabelBatch(**moved), extra, event


def above_chance(prob: torch.Tensor, options: int) -> torch.Tensor:
    """(p - 1/n) / (1 - 1/n) clipped to [0, 1]: 0 = no better than chance among n options, 1 = certain."""
    if options <= 1:
        return torch.ones_like(prob)
    chance = 1.0 / options
    return ((prob - chance) / (1.0 - chance)).clamp(0.0, 1.0)


def exclusive_groups(vocab: AttributeVocab) -> list[list[int]]:
    """Indices of attributes sharing a non-null ``group``, groups of two or more only."""
    groups: dict[str, list[int]] = {}
    for i, attr in enumerate(vocab.attributes):
        if attr.group:
            groups.setdefault(attr.group, []).append(i)
    return [idx for idx in groups.values() if len(idx) > 1]


class Labeler(nn.Module):
    """Holds the text embeddings (computed once) and maps (global, patch) features to labels."""

    def __init__(
        self,
        *,
        attr_pos: torch.Tensor,
        attr_neg: torch.Tensor,
        part_text: torch.Tensor,
        person_text: torch.Tensor,
        background_text: torch.Tensor,
        logit_scale: float,
        groups: list[list[int]],
        label_grid: tuple[int, int],
        group_softmax: bool = True,
        fg_threshold: float = 0.5,
        foreground: str = "both",
    ) -> None:
        super().__init__()
        if foreground not in ("both", "parts", "prompts"):
            raise ValueError(f"foreground estimate '{foreground}' is not one of both, parts, prompts")
        self.foreground = foreground
        self.register_buffer("attr_pos", attr_pos.float())
        self.register_buffer("attr_neg", attr_neg.float())
        self.register_buffer("part_text", part_text.float())
        self.register_buffer("fg_text", torch.stack([person_text.float(), background_text.float()]))
        self.logit_scale = float(logit_scale)
        self.groups = [list(g) for g in groups] if group_softmax else []
        self.label_grid = tuple(label_grid)
        self.fg_threshold = fg_threshold

    def attributes(self, image: torch.Tensor) -> torch.Tensor:
        pos = self.logit_scale * image @ self.attr_pos.T
        neg = self.logit_scale * image @ self.attr_neg.T
        prob = torch.sigmoid(pos - neg)  # == softmax over the (positive, negative) pair
        for idx in self.groups:
            prob[:, idx] = pos[:, idx].softmax(-1)
        return prob

    def _cell_logits(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, E) x (K, E) -> (B, K, label_h, label_w) logits averaged over each label cell."""
        logits = (self.logit_scale * patches @ text.T).permute(0, 3, 1, 2)
        if tuple(logits.shape[-2:]) != self.label_grid:
            logits = F.adaptive_avg_pool2d(logits, self.label_grid)
        return logits

    def parts(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prob = self._cell_logits(patches, self.part_text).softmax(1)
        fg_prob = 1.0 - prob[:, 0]
        if self.foreground != "parts":
            person = self._cell_logits(patches, self.fg_text).softmax(1)[:, 0]
            fg_prob = person if self.foreground == "prompts" else 0.5 * (person + fg_prob)
        fg_cls_prob = prob[:, 1:] / prob[:, 1:].sum(1, keepdim=True).clamp_min(1e-12)
        conf, cls = fg_cls_prob.max(1)
        is_fg = fg_prob >= self.fg_threshold
        part_map = torch.where(is_fg, cls + 1, torch.zeros_like(cls)).to(torch.uint8)
        part_conf = torch.where(
            is_fg,
            (above_chance(fg_prob, 2) * above_chance(conf, fg_cls_prob.shape[1])).sqrt(),
            above_chance(1.0 - fg_prob, 2),
        )
        return part_map, part_conf, is_fg.float().mean((1, 2))

    def summaries(self, part_map: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per non-background class: share of cells, and mean row (0 = top, 1 = bottom; NaN if absent)."""
        b, gh, gw = part_map.shape
        onehot = F.one_hot(part_map.long(), num_classes)[..., 1:].float()  # (B, gh, gw, K-1)
        count = onehot.sum((1, 2))
        rows = torch.linspace(0.0, 1.0, gh, device=part_map.device) if gh > 1 else part_map.new_zeros(1).float()
        row_sum = (onehot.sum(2) * rows[None, :, None]).sum(1)
        mean_row = torch.where(count > 0, row_sum / count.clamp_min(1), torch.full_like(count, float("nan")))
        return count / (gh * gw), mean_row

    @torch.no_grad()
    def forward(self, image: torch.Tensor, patches: torch.Tensor) -> LabelBatch:
        attr_prob = self.attributes(image.float())
        part_map, part_conf, fg_ratio = self.parts(patches.float())
        area, row = self.summaries(part_map, self.part_text.shape[0])
        return LabelBatch(attr_prob, part_map, part_conf, fg_ratio, area, row)


def build_labeler(
    loaded,  # labeling.clip_model.LoadedClip
    attributes: AttributeVocab,
    parts: PartVocab,
    *,
    label_grid: tuple[int, int],
    group_softmax: bool = True,
    fg_threshold: float = 0.5,
    foreground: str = "both",
    device: str | torch.device = "cpu",
) -> Labeler:
    """Embed every prompt ensemble once and return a Labeler on ``device``."""
    from labeling.clip_model import text_embeddings

    templates = list(attributes.templates)
    pos = text_embeddings(loaded, [list(a.positive) for a in attributes.attributes], templates, device)
    neg = text_embeddings(loaded, [list(a.negative) for a in attributes.attributes], templates, device)
    part_templates = list(parts.templates)
    part_text = text_embeddings(loaded, [list(p) for p in parts.prompts], part_templates, device)
    person = parts.person_prompts or ("a person",)
    background = parts.background_prompts or parts.prompts[0]
    fg_text = text_embeddings(loaded, [list(person), list(background)], part_templates, device)
    scale = float(loaded.model.logit_scale.detach().exp().clamp(max=100.0))
    return Labeler(
        attr_pos=pos,
        attr_neg=neg,
        part_text=part_text,
        person_text=fg_text[0],
        background_text=fg_text[1],
        logit_scale=scale,
        groups=exclusive_groups(attributes),
        label_grid=label_grid,
        group_softmax=group_softmax,
        fg_threshold=fg_threshold,
        foreground=foreground,
    ).to(device)
