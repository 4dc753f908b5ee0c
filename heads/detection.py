"""Object detection and instance segmentation on the zoo's backbones with torchvision's detectors.

Any timm model with ``features_only`` (every recurzoo family, and timm's own) becomes a detection
backbone the way torchvision's ``BackboneWithFPN`` builds one: the feature maps go through
``torchvision.ops.FeaturePyramidNetwork`` with ``LastLevelMaxPool`` as the extra level, and the
result carries ``out_channels``. ``create_detector`` puts torchvision's Faster R-CNN or Mask R-CNN on
top, with anchors and RoI poolers sized from the backbone's feature strides.

    backbone = create_fpn_backbone("hornet_tiny_7x7", checkpoint="hornet_tiny_7x7.pth")
    model = create_detector("maskrcnn", backbone, num_classes=81)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["FeaturePyramidBackbone", "create_fpn_backbone", "create_detector", "DETECTORS"]

DETECTORS = ("fasterrcnn", "maskrcnn")


def _distinct_stride_positions(reductions: Sequence[int]) -> List[int]:
    """Positions of the deepest feature map of each stride (plain ViTs give several maps at one stride)."""
    last_of: Dict[int, int] = {}
    for position, reduction in enumerate(reductions):
        last_of[reduction] = position
    return sorted(last_of.values())


class FeaturePyramidBackbone(nn.Module):
    """A timm ``features_only`` model under torchvision's FPN (``BackboneWithFPN``'s layout).

    ``forward`` returns an ``OrderedDict`` of ``out_channels``-wide maps named ``'0'``, ``'1'``, ...
    (finest first) and ``'pool'`` (a stride-2 max-pool of the coarsest), as torchvision's detectors
    expect. ``strides`` lists their strides.

    Args:
        body: a timm model created with ``features_only=True``.
        out_channels: width of the pyramid.
        positions: which of ``body``'s outputs feed the pyramid (default: the deepest of each stride).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, positions: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        channels = body.feature_info.channels()
        reductions = body.feature_info.reduction()
        self.positions = list(positions) if positions is not None else _distinct_stride_positions(reductions)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [channels[p] for p in self.positions], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(self.positions))]
        self.strides = [reductions[p] for p in self.positions] + [2 * reductions[self.positions[-1]]]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        if isinstance(features, dict):
            features = list(features.values())
        return self.fpn(OrderedDict((name, features[p]) for name, p in zip(self.level_names, self.positions)))


def create_fpn_backbone(
    name: str,
    out_indices: Optional[Sequence[int]] = None,
    fpn_channels: int = 256,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    frozen_bn: Optional[bool] = None,
    **kwargs: Any,
) -> FeaturePyramidBackbone:
    """A :class:`FeaturePyramidBackbone` over ``timm.create_model(name, features_only=True, ...)``.

    Args:
        name: timm model name (e.g. ``hornet_tiny_7x7``, ``sret_tiny``).
        out_indices: feature levels to take (default: the model's, deepest map of each stride).
        fpn_channels: width of the pyramid.
        pretrained: load timm's pretrained weights (found in timm's or the Hugging Face cache, else
            downloaded; offline a ``CheckpointError`` within seconds names the file to place where).
        checkpoint: load these weights instead (a classification checkpoint of ``name``, a state dict,
            safetensors, or an official file), through timm's pretrained-loading path (the family's
            checkpoint filter; the classifier is dropped).
        frozen_bn: turn BatchNorm layers into frozen ones (default: when weights are loaded, as
            torchvision's detection backbones do).
        kwargs: further ``timm.create_model`` arguments (reduced widths, ...). Models that take
            ``dynamic_img_size`` get it, since detection inputs vary in size.
    """
    import timm
    from timm.layers import freeze_batch_norm_2d

    import recurzoo  # noqa: F401  (registers the zoo with timm)
    from recurzoo.checkpoint import timm_pretrained_overlay
    from recurzoo.registry import UnknownModelError

    if not timm.is_model(name):
        raise UnknownModelError(f"create_fpn_backbone: unknown backbone {name!r}: not a model in timm's registry")
    create_kwargs: Dict[str, Any] = dict(features_only=True, pretrained=pretrained or checkpoint is not None)
    if out_indices is not None:
        create_kwargs["out_indices"] = tuple(out_indices)
    if checkpoint is not None:
        create_kwargs["pretrained_cfg_overlay"] = dict(file=checkpoint)
    create_kwargs.update(kwargs)
    overlay = create_kwargs.get("pretrained_cfg_overlay") or {}
    if create_kwargs["pretrained"] and "state_dict" not in overlay:  # found (or its host probed) before timm builds
        create_kwargs["pretrained_cfg_overlay"] = timm_pretrained_overlay(
            name,
            pretrained_cfg=create_kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=overlay,
            label=f"create_fpn_backbone: backbone {name!r} (pass a local file with checkpoint=)",
        )
    try:
        body = timm.create_model(name, **{"dynamic_img_size": True, **create_kwargs})
    except TypeError:  # a model without position embeddings of a fixed size
        body = timm.create_model(name, **create_kwargs)
    if frozen_bn if frozen_bn is not None else create_kwargs["pretrained"]:
        body = freeze_batch_norm_2d(body)
    positions = list(range(len(body.feature_info.reduction()))) if out_indices is not None else None
    return FeaturePyramidBackbone(body, out_channels=fpn_channels, positions=positions)


def create_detector(
    kind: str,
    backbone: FeaturePyramidBackbone,
    num_classes: int,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_scale: float = 8.0,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's Faster R-CNN (``'fasterrcnn'``) or Mask R-CNN (``'maskrcnn'``) on ``backbone``.

    Args:
        kind: ``'fasterrcnn'`` or ``'maskrcnn'``.
        backbone: the feature pyramid.
        num_classes: classes including the background (index 0).
        min_size, max_size: torchvision's resizing of the input images.
        anchor_scale: anchor side = ``anchor_scale`` x the level's stride (8: torchvision's 32..512 px
            on strides 4..64), with ``aspect_ratios`` at every level.
        image_mean, image_std: normalization (default: the backbone's pretrained cfg).
        kwargs: further arguments of the torchvision detector (``box_score_thresh``, ...).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if kind not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, received {kind!r}")
    cfg = getattr(backbone.body, "pretrained_cfg", {}) or {}
    anchors = AnchorGenerator(
        sizes=tuple((int(round(anchor_scale * stride)),) for stride in backbone.strides),
        aspect_ratios=(tuple(aspect_ratios),) * len(backbone.strides),
    )
    options = dict(
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        image_mean=list(image_mean or cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(image_std or cfg.get("std", (0.229, 0.224, 0.225))),
        box_roi_pool=MultiScaleRoIAlign(backbone.level_names, output_size=7, sampling_ratio=2),
    )
    options.update(kwargs)
    if kind == "fasterrcnn":
        return FasterRCNN(backbone, num_classes=num_classes, **options)
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        mask_roi_pool=MultiScaleRoIAlign(backbone.level_names, output_size=14, sampling_ratio=2),
        **options,
    )
