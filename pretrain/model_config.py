"""Settings of the CLASP pre-training model (backbone, prompt-controlled MoE, heads, losses).

These dataclasses are the ``model`` section of the pre-training config; every field has a default so
``ModelConfig()`` is the method as designed (DESIGN.md §3.2) and each component has an off switch for
ablations: ``moe.enabled=false`` (plain ViT), ``loss.part=false``, ``loss.attribute=false``,
``loss.dino=false``.

Why the MoE defaults are what they are (cost target: a step with MoE <= 1.5x the step without):
with MoE on, the part and attribute losses need their own forward passes under their own prompts.
Blocks before the first MoE block do not depend on the prompt, so they run once per global crop and
only the MoE tail runs once per prompt (batched). ``top_k=2`` of 4 experts with expert hidden =
mlp_hidden / top_k keeps the active FFN FLOPs per token equal to the dense MLP's, and dropless
dispatch (grouped matmul, no padding) keeps them there with no token dropped. Counted with torch's
FlopCounterMode for a ViT-S/16 training step (2 global 256x128 + 8 local 128x64 crops, all three
losses), relative to the same step without MoE: MoE in the last third of the blocks 1.31x, the last
half 1.46x (counted when capacity 1.0 padded to exactly these FLOPs; a fixed capacity factor c > 0
multiplies the expert FLOPs by c). Top-2 also gives the router a gradient through the renormalised
gate weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Task prompts of the prompt-controlled MoE, in the order of the learned prompt table.
TASK_PROMPTS: tuple[str, ...] = ("instance", "part", "attribute")


@dataclass
class MoEConfig:
    """Prompt-Controlled Mixture-of-Experts FFN in selected ViT blocks."""

    enabled: bool = True
    num_experts: int = 4
    top_k: int = 2
    # "last_third" | "last_half" | "all" | "every_other" | explicit block indices, e.g. [8, 9, 10, 11]
    blocks: str | list[int] = "last_third"
    # expert hidden width = embed_dim * expert_mlp_ratio; None: mlp_ratio / top_k (active FLOPs = dense MLP)
    expert_mlp_ratio: float | None = None
    prompt_dim: int = 64
    # <= 0: dropless (every token reaches its top_k experts in training and evaluation, under every prompt;
    # grouped matmul, no padding). > 0: expert capacity = capacity_factor * tokens * top_k / num_experts, tokens
    # over it skip the FFN (slots by router priority); opt-in for memory-bound runs only (see pretrain/moe.py)
    capacity_factor: float = 0.0
    eval_capacity_factor: float | None = None  # None: the training capacity (the same function in eval)
    balance_loss_weight: float = 0.01


@dataclass
class LossConfig:
    """Objectives: DINO self-distillation, CLIP part pseudo-labels, CLIP attribute pseudo-labels."""

    dino: bool = True
    dino_weight: float = 1.0
    dino_out_dim: int = 65536
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dino_head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0  # linear warm-up from warmup_teacher_temp to teacher_temp
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0  # DINO keeps the last head layer fixed early on for stability
    # the same in epochs (DINO: freeze_last_layer=1), independent of the global batch; the trainer turns it
    # into freeze_last_layer_steps (set one of the two)
    freeze_last_layer_epochs: float = 0.0

    part: bool = True
    part_weight: float = 1.0
    part_conf_threshold: float = 0.3  # cells whose CLIP confidence is below this are ignored
    part_conf_weighting: bool = True  # remaining cells weighted by their confidence

    attribute: bool = True
    attribute_weight: float = 1.0
    attribute_conf_weighting: bool = True  # weight = |2p - 1|: uncertain CLIP probabilities count less


@dataclass
class ModelConfig:
    """The CLASP pre-training model; ``arch`` names an entry of ``pretrain.backbone.ARCHS``."""

    arch: str = "vit_small"
    img_size: tuple[int, int] = (256, 128)
    patch_size: int = 16
    drop_path: float = 0.1
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
