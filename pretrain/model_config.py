"""Settings of the CLASP pre-training model (backbone, prompt-controlled MoE, heads, losses).

These dataclasses are the ``model`` section of the pre-training config; every field has a default so
``ModelConfig()`` is the method as designed (DESIGN.md §3.2) and each component has an off switch for
ablations: ``moe.enabled=false`` (plain ViT), ``loss.part=false``, ``loss.attribute=false``,
``loss.dino=false``; ``loss.distill=true`` adds the CLIP-embedding distillation term.

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
from typing import Annotated

from pipeline.config import POSITIVE, PROBABILITY

#: Task prompts of the prompt-controlled MoE, in the order of the learned prompt table.
TASK_PROMPTS: tuple[str, ...] = ("instance", "part", "attribute")
#: Input normalisation (RGB) of ImageNet-trained models: the default of pre-training, exports and transfer.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class MoEConfig:
    """Prompt-Controlled Mixture-of-Experts FFN in selected ViT blocks."""

    enabled: bool = True  # false: plain ViT MLPs everywhere (the ablation without MoE)
    num_experts: Annotated[int, POSITIVE] = 4  # experts per MoE block
    top_k: Annotated[int, POSITIVE] = 2  # experts each token is sent to
    # "last_third" | "last_half" | "all" | "every_other" | explicit block indices, e.g. [8, 9, 10, 11]
    blocks: str | list[int] = "last_third"
    # expert hidden width = embed_dim * expert_mlp_ratio; None: mlp_ratio / top_k (active FLOPs = dense MLP)
    expert_mlp_ratio: float | None = None
    prompt_dim: Annotated[int, POSITIVE] = 64  # width of the learned task prompt the router reads
    # <= 0: dropless (every token reaches its top_k experts in training and evaluation, under every prompt;
    # grouped matmul, no padding). > 0: expert capacity = capacity_factor * tokens * top_k / num_experts, tokens
    # over it skip the FFN (slots by router priority); opt-in for memory-bound runs only (see pretrain/moe.py)
    capacity_factor: float = 0.0
    eval_capacity_factor: float | None = None  # None: the training capacity (the same function in eval)
    balance_loss_weight: float = 0.01  # load-balancing auxiliary loss (on the prompt-mixed batch)


@dataclass
class LossConfig:
    """Objectives: DINO self-distillation, CLIP part pseudo-labels, CLIP attribute pseudo-labels."""

    dino: bool = True  # DINO self-distillation loss on the class token
    dino_weight: float = 1.0  # its weight in the total loss
    dino_out_dim: Annotated[int, POSITIVE] = 65536  # prototypes of the DINO head
    dino_hidden_dim: Annotated[int, POSITIVE] = 2048  # DINO head MLP width
    dino_bottleneck_dim: Annotated[int, POSITIVE] = 256  # DINO head output before the prototypes
    dino_head_layers: Annotated[int, POSITIVE] = 3  # DINO head MLP depth
    student_temp: Annotated[float, POSITIVE] = 0.1  # softmax temperature of the student
    teacher_temp: Annotated[float, POSITIVE] = 0.07  # after warm-up
    warmup_teacher_temp: Annotated[float, POSITIVE] = 0.04  # teacher temperature at the start
    warmup_teacher_temp_steps: int = 0  # linear warm-up from warmup_teacher_temp to teacher_temp
    center_momentum: float = 0.9  # EMA of the teacher output centre
    freeze_last_layer_steps: int = 0  # DINO keeps the last head layer fixed early on for stability
    # the same in epochs (DINO: freeze_last_layer=1), independent of the global batch; the trainer turns it
    # into freeze_last_layer_steps (set one of the two)
    freeze_last_layer_epochs: float = 0.0

    part: bool = True  # part-map loss on the patch tokens (CLIP part pseudo-labels)
    part_weight: float = 1.0  # its weight in the total loss
    part_conf_threshold: float = 0.3  # cells whose CLIP confidence is below this are ignored
    part_conf_weighting: bool = True  # remaining cells weighted by their confidence

    attribute: bool = True  # attribute loss on the class token (CLIP attribute pseudo-labels)
    attribute_weight: float = 1.0  # its weight in the total loss
    attribute_conf_weighting: bool = True  # weight = |2p - 1|: uncertain CLIP probabilities count less

    # CLIP image-embedding distillation (issue 21): a linear head on the class token under the *attribute*
    # prompt regresses the clip_embed column of the label shards (`clasp label --store-embeddings`) with a
    # cosine loss, so the exported backbone keeps CLIP's joint image-text space (zero-shot attributes by text,
    # `clasp zeroshot`). Off by default: on the synthetic world it has not been measured to help the six tasks.
    distill: bool = False
    distill_weight: float = 1.0  # its weight in the total loss


@dataclass
class ModelConfig:
    """The CLASP pre-training model; ``arch`` names an entry of ``pretrain.backbone.ARCHS``."""

    arch: str = "vit_small"  # backbone: vit_micro | vit_tiny | vit_small | vit_base ...
    img_size: Annotated[tuple[int, int], POSITIVE] = (256, 128)  # (height, width) of a global crop
    patch_size: Annotated[int, POSITIVE] = 16  # ViT patch side; divides img_size
    drop_path: Annotated[float, PROBABILITY] = 0.1  # stochastic depth rate of the student
    activation_checkpointing: bool = False  # recompute block activations: less memory, slower
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def config_errors(self, prefix: str) -> list[str]:
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            return [
                f"{prefix}img_size={[h, w]} is not a multiple of {prefix}patch_size={self.patch_size}: "
                f"pick sides divisible by {self.patch_size}"
            ]
        if self.moe.enabled and self.moe.top_k > self.moe.num_experts:
            return [f"{prefix}moe.top_k={self.moe.top_k} is more than {prefix}moe.num_experts={self.moe.num_experts}"]
        return []
