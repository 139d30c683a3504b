"""Pedestrian detector: a ViTDet-style simple feature pyramid on the plain ViT, feeding torchvision's Faster R-CNN.

Simple feature pyramid (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection",
ECCV 2022): only the *last* ViT map (stride 16) is used; stride 4 comes from two 2x2 transposed
convolutions, stride 8 from one, stride 16 is the map itself, stride 32 a 2x2 max-pool; each level then
gets a 1x1 and a 3x3 convolution, both with channel LayerNorm. An optional P6 (stride 64, max-pool of
P5, ViTDet's ``LastLevelMaxPool``) serves the largest anchors.

Detector: ``torchvision.models.detection.FasterRCNN`` with that pyramid as its backbone, anchors of the
pedestrian aspect ratio h/w = 2.44 (w = 0.41 h, the CityPersons / Caltech convention), one anchor size
per level (x 1 and x sqrt 2), and ``MultiScaleRoIAlign`` over P2..P5. Training targets may carry
``ignore_boxes`` (xyxy, image pixels): anchors and proposals that would be background but lie at least
half inside an ignore region (intersection over their own area >= 0.5, mmdetection's ``ignore_iof_thr``
as used by Pedestron) are left out of the losses instead of being pushed to background.

Public contract (person search builds on it): ``build_detector(backbone_cfg, img_size=, min_size=,
max_size=, num_classes=2, **kwargs)``; train mode ``model(images, targets) -> {loss_*}``, eval mode
``model(images) -> [{"boxes" (xyxy, input pixels), "scores", "labels"}]``; images are 0..1 RGB
tensors (normalisation and resizing happen inside, with the backbone's mean/std).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipeline.errors import ClaspError
from transfer.backbone import BackboneConfig, FeatureBackbone, build_backbone

PEDESTRIAN_ASPECT_RATIO = 2.44  # height / width of a CityPersons full-body box (w = 0.41 h)
IGNORE_IOF = 0.5  # an anchor/proposal at least this much inside an ignore region takes no part in the loss
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)  # relative to the ViT map: strides 4, 8, 16, 32 for a /16 ViT


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's norm in the pyramid)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _up(channels: int) -> nn.Module:
    return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale maps from the last map of a plain ViT (``FeatureBackbone.feature_maps``).

    ``forward(images)`` takes normalised, padded images whose sides are multiples of the patch size and
    returns ``OrderedDict`` "0".."3" (one per ``scales`` entry, finest first) plus "pool" (P6) when ``p6``.
    ``strides`` gives the stride of each output in input pixels.
    """

    def __init__(
        self,
        vit: FeatureBackbone,
        *,
        out_channels: int = 256,
        scales: Sequence[float] = PYRAMID_SCALES,
        p6: bool = True,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.out_channels = out_channels
        self.p6 = p6
        dim = vit.num_features
        if not dim:
            raise ClaspError(f"backbone '{vit.source}' reports no feature width; the pyramid needs a ViT")
        self.stages = nn.ModuleList()
        self.strides: list[int] = []
        for scale in scales:
            if scale == 4.0:
                layers: list[nn.Module] = [_up(dim), LayerNorm2d(dim // 2), nn.GELU(), _up(dim // 2)]
                width = dim // 4
            elif scale == 2.0:
                layers, width = [_up(dim)], dim // 2
            elif scale == 1.0:
                layers, width = [], dim
            elif scale == 0.5:
                layers, width = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            else:
                raise ClaspError(f"pyramid scale {scale} is not supported; use a subset of {PYRAMID_SCALES}")
            layers += [
                nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))
            self.strides.append(int(round(vit.patch_size / scale)))
        if p6:
            self.strides.append(self.strides[-1] * 2)

    @property
    def names(self) -> list[str]:
        """Output keys in order (torchvision's convention: "0".. for the levels, "pool" for P6)."""
        return [str(i) for i in range(len(self.stages))] + (["pool"] if self.p6 else [])

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        patch = self.vit.patch_size
        if images.shape[-2] % patch or images.shape[-1] % patch:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {patch}")
        top = self.vit.feature_maps(images, indices=1)[-1]
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            out[str(i)] = stage(top)
        if self.p6:
            out["pool"] = nn.functional.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}


# --- ignore regions in training ----------------------------------------------------------------------


def _inside_ignore(boxes: Tensor, ignore: Tensor | None) -> Tensor:
    """(N,) bool: box lies at least IGNORE_IOF inside some ignore box (intersection / own area)."""
    if ignore is None or ignore.numel() == 0 or boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    lt = torch.max(boxes[:, None, :2], ignore[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], ignore[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6)
    return (inter / area[:, None]).max(dim=1).values >= IGNORE_IOF


class _IgnoreAwareRPN(RegionProposalNetwork):
    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]) -> Any:
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        for labels_i, anchors_i, target in zip(labels, anchors, targets, strict=True):
            labels_i[(labels_i == 0) & _inside_ignore(anchors_i, target.get("ignore_boxes"))] = -1.0
        return labels, matched


class _IgnoreAwareRoIHeads(RoIHeads):
    _ignore_boxes: list[Tensor | None] | None = None

    def select_training_samples(self, proposals: list[Tensor], targets: Any) -> Any:
        self._ignore_boxes = [t.get("ignore_boxes") for t in targets] if targets is not None else None
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._ignore_boxes = None

    def assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: Any, gt_labels: Any) -> Any:
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self._ignore_boxes is not None:
            for labels_i, proposals_i, ignore in zip(labels, proposals, self._ignore_boxes, strict=True):
                labels_i[(labels_i == 0) & _inside_ignore(proposals_i, ignore)] = -1
        return matched, labels


class _Transform(GeneralizedRCNNTransform):
    """torchvision's resize + normalise + pad, also rescaling ``ignore_boxes`` with the image."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> Any:
        size = image.shape[-2:]
        image, target = super().resize(image, target)
        if target is not None and "ignore_boxes" in target:
            target["ignore_boxes"] = resize_boxes(target["ignore_boxes"], size, image.shape[-2:])
        return image, target


class ViTDetFasterRCNN(FasterRCNN):
    """torchvision Faster R-CNN whose backbone is a :class:`SimpleFeaturePyramid` (weight-decay aware)."""

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


# --- the factory ---------------------------------------------------------------------------------------


def default_anchor_sizes(strides: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    """Two anchor sizes per level (8 x stride and x sqrt 2): heights 1.56x that at ratio 2.44."""
    return tuple((8.0 * s, 8.0 * s * 2**0.5) for s in strides)


def build_detector(
    backbone: BackboneConfig,
    *,
    img_size: tuple[int, int],
    min_size: int | Sequence[int],
    max_size: int,
    num_classes: int = 2,
    **detector_kwargs: Any,
) -> ViTDetFasterRCNN:
    """Faster R-CNN on a simple feature pyramid over the backbone named by ``backbone``.

    ``img_size``: (height, width) the ViT is built for (position embeddings are resampled to other
    sizes). ``min_size``/``max_size``: torchvision's resize (shorter side; a sequence picks one at
    random per training image, i.e. multi-scale training; the last is used in eval). ``num_classes``
    counts the background (2 = background + pedestrian). Extra keywords: ``out_channels`` (256),
    ``scales`` (4, 2, 1, 0.5), ``p6`` (True), ``anchor_sizes``, ``aspect_ratios`` ((2.44,)),
    ``representation_size`` (1024, box head MLP) and any ``FasterRCNN`` argument (``box_score_thresh``,
    ``box_detections_per_img``, ``rpn_*``, ``box_*``, ...).
    """
    kwargs = dict(detector_kwargs)
    out_channels = int(kwargs.pop("out_channels", 256))
    scales = tuple(kwargs.pop("scales", PYRAMID_SCALES))
    p6 = bool(kwargs.pop("p6", True))
    anchor_sizes = kwargs.pop("anchor_sizes", None)
    aspect_ratios = tuple(kwargs.pop("aspect_ratios", (PEDESTRIAN_ASPECT_RATIO,)))
    representation_size = int(kwargs.pop("representation_size", 1024))

    if backbone.spec.strip().startswith(("random:", "timm:")) and "dynamic_img_size" not in backbone.timm_kwargs:
        # detection batches come in many sizes (multi-scale training, padding); resample position embeddings
        backbone = dataclasses.replace(backbone, timm_kwargs={**backbone.timm_kwargs, "dynamic_img_size": True})
    vit = build_backbone(backbone, tuple(img_size))
    pyramid = SimpleFeaturePyramid(vit, out_channels=out_channels, scales=scales, p6=p6)

    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(pyramid.strides)
    anchor_sizes = tuple(tuple(float(s) for s in level) for level in anchor_sizes)
    if len(anchor_sizes) != len(pyramid.names):
        raise ClaspError(
            f"anchor_sizes has {len(anchor_sizes)} levels but the pyramid has {len(pyramid.names)} "
            f"({', '.join(pyramid.names)}); give one tuple of sizes per level"
        )
    anchors = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=(aspect_ratios,) * len(anchor_sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(len(scales))], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(out_channels * 7 * 7, representation_size)
    model = ViTDetFasterRCNN(
        pyramid,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(vit.mean),
        image_std=list(vit.std),
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **kwargs,
    )
    # torchvision builds these inside FasterRCNN.__init__; the subclasses only change target assignment,
    # so swapping the class keeps every setting torchvision gave them.
    model.rpn.__class__ = _IgnoreAwareRPN
    model.roi_heads.__class__ = _IgnoreAwareRoIHeads
    transform = model.transform
    model.transform = _Transform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        size_divisible=max(transform.size_divisible, 2 * vit.patch_size),
    )
    return model
