"""MSRNet: camouflaged object detection with a multi-scale recursive decoder over any timm backbone.

Paper: "MSRNet: A Multi-Scale Recursive Network for Camouflaged Object Detection", Alghamdi, Usman,
Anwar, Bais and Anwar, 2025 (https://arxiv.org/abs/2511.12810).
Official code: https://github.com/linaagh98/MSRNet (its decoder units come from ZoomNeXt,
https://github.com/lartpang/ZoomNeXt).

The image is seen at three scales (by default 1.5x, 1.0x and 2.0x a base size, called ``image_s``,
``image_m`` and ``image_l`` as in the official code; ``s`` is the 1.5x copy). One backbone with
shared weights turns each copy into a four-level feature pyramid (strides 4, 8, 16, 32). Per level,
the decoder

1. projects the three copies' features to ``mid_dim`` channels (a simple ASPP on the deepest level,
   a 3x3 conv elsewhere),
2. merges them in an attention-based scale integration unit (ABSIU): the 1.5x and 2.0x maps are
   pooled to the 1.0x size and a per-pixel softmax over the three scales, computed in channel
   groups, weights their sum,
3. adds every coarser level's decoded map (bilinearly resized) -- the recursive feedback -- and
   refines the sum with a multi-granularity fusion unit (MGFU): channel groups processed in a chain,
   each passing a "fork" to the next, gated by a channel softmax, with a residual connection.

The finest decoded map is upsampled twice (x2, x2) into mask logits at the 1.0x image size.
A backbone whose pyramid lacks some of the strides 4-32 (a plain ViT at stride 16, SReT at 8-32)
gets them ViTDet-style: transposed convolutions from its finest map, max-pooling from its coarsest.

``recurzoo.create_model('msrnet_pvt_v2_b2')`` builds a registered variant; :func:`create_cod_model`
puts the decoder over any timm backbone. Both take ``device``/``dtype``: a model built on ``meta``
and moved with ``to_empty()`` is made usable by :meth:`MSRNet.init_weights`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, LayerNorm2d
from timm.models import generate_default_cfgs
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

from recurzoo.backbones._helpers import build_with_weights, check_image_input, model_name
from recurzoo.checkpoint import timm_pretrained_overlay, unwrap_state_dict
from recurzoo.official import register_official
from recurzoo.registry import register_task_model

__all__ = [
    "MSRNet",
    "MSRNetDecoder",
    "SimpleASPP",
    "ScaleIntegrationUnit",
    "MultiGranularityFusion",
    "SimpleFeaturePyramid",
    "create_cod_model",
    "checkpoint_filter_fn",
    "PYRAMID_REDUCTIONS",
    "DEFAULT_SCALES",
]

# The strides of the four pyramid levels the decoder reads, finest first.
PYRAMID_REDUCTIONS: Tuple[int, ...] = (4, 8, 16, 32)
# Sizes of image_s, image_m and image_l relative to the base size (the official ``ms_resize`` scales).
DEFAULT_SCALES: Tuple[float, float, float] = (1.5, 1.0, 2.0)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of a feature map to ``size`` = (height, width)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_bn_relu(
    in_chs: int,
    out_chs: int,
    kernel_size: int = 1,
    dilation: int = 1,
    act: bool = True,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> ConvNormAct:
    """Conv (no bias, 'same' padding) + BatchNorm (+ ReLU): the official ``ConvBNReLU``."""
    return ConvNormAct(
        in_chs, out_chs, kernel_size=kernel_size, dilation=dilation, apply_act=act, device=device, dtype=dtype
    )


def reset_parameters(module: nn.Module, owner: str) -> None:
    """PyTorch's initialisation again for every submodule of ``module`` (after ``to_empty()``, say).

    Raises:
        ValueError: naming the tensors that no ``reset_parameters()`` (or timm's
            ``init_non_persistent_buffers()``) of their module sets, before anything is changed.
    """
    resettable = [m for m in module.modules() if hasattr(m, "reset_parameters")]
    uncovered = [
        f"{name}.{tensor_name}" if name else tensor_name
        for name, m in module.named_modules()
        if not hasattr(m, "reset_parameters")
        for tensor_name, _ in [
            *m.named_parameters(recurse=False),
            *(m.named_buffers(recurse=False) if not hasattr(m, "init_non_persistent_buffers") else ()),
        ]
    ]
    if uncovered:
        more = f", ... ({len(uncovered) - 5} more)" if len(uncovered) > 5 else ""
        raise ValueError(
            f"{owner}: cannot re-initialise {', '.join(uncovered[:5])}{more}: no reset_parameters() of their "
            f"module sets them; build the model on a real device instead of meta"
        )
    for m in resettable:
        m.reset_parameters()
    reinit_non_persistent_buffers(module)


class SimpleASPP(nn.Module):
    """Context block of the deepest level: a dilated-conv chain plus a global branch.

    A 1x1 conv gives two halves: one feeds three chained 3x3 convs of dilation ``dilation`` (the
    half itself and each conv's output are kept), the other is averaged over the map and projected
    (the global branch). The five maps are fused by a 1x1 and a 3x3 conv.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        dilation: int = 3,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.reduce = conv_bn_relu(in_chs, 2 * out_chs, kernel_size=1, **dd)
        self.global_proj = conv_bn_relu(out_chs, out_chs, kernel_size=1, **dd)
        self.dilated = nn.ModuleList(
            [conv_bn_relu(out_chs, out_chs, kernel_size=3, dilation=dilation, **dd) for _ in range(3)]
        )
        self.fuse = nn.Sequential(
            conv_bn_relu(5 * out_chs, out_chs, kernel_size=1, **dd),
            conv_bn_relu(out_chs, out_chs, kernel_size=3, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, context = self.reduce(x).chunk(2, dim=1)
        branches = [local]
        for conv in self.dilated:
            branches.append(conv(branches[-1]))
        global_context = self.global_proj(context.mean(dim=(2, 3), keepdim=True))
        global_context = global_context.expand(-1, -1, *local.shape[-2:])
        return self.fuse(torch.cat([global_context, *branches], dim=1))


class ScaleIntegrationUnit(nn.Module):
    """Attention-based scale integration unit (ABSIU): merges one level's features of the three scales.

    The 2.0x (``l``) and 1.5x (``s``) maps are brought to the 1.0x (``m``) size by adaptive max plus
    average pooling. In each of ``num_groups`` channel groups a small conv head predicts, per pixel,
    softmax weights over the three scales, which weight the sum of the scales' value maps.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int = 4,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"ScaleIntegrationUnit: dim ({dim}) must be divisible by num_groups ({num_groups})")
        dd = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        group_dim = dim // num_groups
        self.pre_conv_l = conv_bn_relu(dim, dim, kernel_size=3, **dd)
        self.pre_conv_s = conv_bn_relu(dim, dim, kernel_size=3, **dd)
        self.conv_l = conv_bn_relu(dim, dim, kernel_size=3, **dd)
        self.conv_m = conv_bn_relu(dim, dim, kernel_size=3, **dd)
        self.conv_s = conv_bn_relu(dim, dim, kernel_size=3, **dd)
        self.attention_proj = conv_bn_relu(3 * dim, 3 * dim, kernel_size=1, **dd)
        self.value_proj = conv_bn_relu(3 * dim, 3 * dim, kernel_size=1, **dd)
        self.attention_head = nn.Sequential(
            conv_bn_relu(3 * group_dim, group_dim, kernel_size=1, **dd),
            conv_bn_relu(group_dim, group_dim, kernel_size=3, **dd),
            nn.Conv2d(group_dim, 3, kernel_size=1, **dd),
        )

    @staticmethod
    def _pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.adaptive_max_pool2d(x, size) + F.adaptive_avg_pool2d(x, size)

    def forward(self, feat_l: torch.Tensor, feat_m: torch.Tensor, feat_s: torch.Tensor) -> torch.Tensor:
        size = feat_m.shape[-2:]
        feat_l = self._pool_to(self.pre_conv_l(feat_l), size)
        feat_s = self._pool_to(self.pre_conv_s(feat_s), size)
        scales = torch.cat([self.conv_l(feat_l), self.conv_m(feat_m), self.conv_s(feat_s)], dim=1)
        batch, channels, height, width = scales.shape
        groups, group_dim = self.num_groups, channels // (3 * self.num_groups)
        # channels are ordered (scale, group, group_dim): regroup to (batch * group, scale * group_dim)
        attention = self.attention_proj(scales).view(batch, 3, groups, group_dim, height, width).transpose(1, 2)
        weights = self.attention_head(attention.reshape(batch * groups, 3 * group_dim, height, width)).softmax(dim=1)
        values = self.value_proj(scales).view(batch, 3, groups, group_dim, height, width).transpose(1, 2)
        merged = (weights.view(batch, groups, 3, 1, height, width) * values).sum(dim=2)
        return merged.reshape(batch, groups * group_dim, height, width)


class MultiGranularityFusion(nn.Module):
    """Multi-granularity fusion unit (MGFU): a gated chain over channel groups with a residual.

    A 1x1 conv widens the input to ``num_groups`` groups of ``dim // 2`` channels. Group ``i`` (with
    the fork of group ``i - 1`` concatenated) passes a 3x3 conv that yields an output, a fork for
    the next group and a gate (the last group yields no fork). The gates, pooled over the map, give
    channel weights through a bottleneck and a softmax over all channels; the weighted outputs are
    fused back to ``dim`` channels and added to the input.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int = 6,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_groups < 2 or dim % 2:
            raise ValueError(
                f"MultiGranularityFusion: needs an even dim and at least 2 groups, "
                f"received dim={dim}, num_groups={num_groups}"
            )
        dd = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        hidden = dim // 2
        self.expand = conv_bn_relu(dim, hidden * num_groups, kernel_size=1, **dd)
        self.gate_reduce = nn.Conv2d(hidden * num_groups, hidden, kernel_size=1, **dd)
        self.gate_expand = nn.Conv2d(hidden, hidden * num_groups, kernel_size=1, **dd)
        self.branches = nn.ModuleList(
            [conv_bn_relu(hidden, 3 * hidden, kernel_size=3, **dd)]
            + [conv_bn_relu(2 * hidden, 3 * hidden, kernel_size=3, **dd) for _ in range(num_groups - 2)]
            + [conv_bn_relu(2 * hidden, 2 * hidden, kernel_size=3, **dd)]
        )
        self.fuse = conv_bn_relu(hidden * num_groups, dim, kernel_size=3, act=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.expand(x).chunk(self.num_groups, dim=1)
        outputs, gates = [], []
        fork: Optional[torch.Tensor] = None
        for index, (group, branch) in enumerate(zip(groups, self.branches)):
            y = branch(group if fork is None else torch.cat([group, fork], dim=1))
            if index < self.num_groups - 1:
                output, fork, gate = y.chunk(3, dim=1)
            else:
                output, gate = y.chunk(2, dim=1)
            outputs.append(output)
            gates.append(gate)
        gate = torch.cat(gates, dim=1).mean(dim=(2, 3), keepdim=True)
        gate = self.gate_expand(F.relu(self.gate_reduce(gate))).softmax(dim=1)
        return F.relu(x + self.fuse(torch.cat(outputs, dim=1) * gate))


class MSRNetDecoder(nn.Module):
    """The MSRNet decoder over the three scales' feature pyramids (finest level first).

    Args:
        in_channels: channels of the backbone's pyramid levels, finest first.
        mid_dim: width of the decoder.
        scale_groups: channel groups of the scale attention (ABSIU).
        fusion_groups: channel groups of the fusion chain (MGFU).
        predictor_dim: width of the last conv before the mask logits.
        num_classes: mask channels (1 for camouflaged object detection).
        device, dtype: where and as what the parameters are created.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        mid_dim: int = 64,
        scale_groups: int = 4,
        fusion_groups: int = 6,
        predictor_dim: int = 32,
        num_classes: int = 1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"MSRNetDecoder: needs at least 2 pyramid levels, received {len(in_channels)}")
        dd = {"device": device, "dtype": dtype}
        self.num_levels = len(in_channels)
        self.laterals = nn.ModuleList(
            [conv_bn_relu(chs, mid_dim, kernel_size=3, **dd) for chs in in_channels[:-1]]
            + [SimpleASPP(in_channels[-1], mid_dim, **dd)]
        )
        self.scale_merges = nn.ModuleList(
            [ScaleIntegrationUnit(mid_dim, num_groups=scale_groups, **dd) for _ in in_channels]
        )
        self.fusions = nn.ModuleList(
            [MultiGranularityFusion(mid_dim, num_groups=fusion_groups, **dd) for _ in in_channels]
        )
        self.upsample_conv = conv_bn_relu(mid_dim, mid_dim, kernel_size=3, **dd)
        self.mask_conv = conv_bn_relu(mid_dim, predictor_dim, kernel_size=3, **dd)
        self.mask_logits = nn.Conv2d(predictor_dim, num_classes, kernel_size=1, **dd)

    def forward(
        self,
        features_l: Sequence[torch.Tensor],
        features_m: Sequence[torch.Tensor],
        features_s: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Mask logits at 4x the resolution of the finest level of ``features_m``."""
        decoded: List[torch.Tensor] = []  # coarsest first
        for level in reversed(range(self.num_levels)):
            lateral = self.laterals[level]
            merged = self.scale_merges[level](
                lateral(features_l[level]), lateral(features_m[level]), lateral(features_s[level])
            )
            for coarser in decoded:  # recursive feedback: every coarser decoded map
                merged = merged + resize_to(coarser, merged.shape[-2:])
            decoded.append(self.fusions[level](merged))
        x = self.upsample_conv(F.interpolate(decoded[-1], scale_factor=2, mode="bilinear", align_corners=False))
        x = self.mask_conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.mask_logits(x)


def _upsampler(
    channels: int, steps: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
) -> nn.Sequential:
    """ViTDet-style x2**steps upsampling: transposed 2x2 convs halving the width, LayerNorm + GELU between."""
    dd = {"device": device, "dtype": dtype}
    layers: List[nn.Module] = []
    for step in range(steps):
        if step:
            layers += [LayerNorm2d(channels, **dd), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2, **dd))
        channels //= 2
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Builds the missing levels of a pyramid from the levels a backbone has (ViTDet's simple pyramid).

    A target stride the backbone gives is passed through; a finer one is upsampled from the
    backbone's finest level by transposed convolutions, a coarser one max-pooled from the nearest
    finer level the backbone gives.

    Args:
        in_channels: channels of the backbone's levels.
        in_reductions: their strides (powers of two, ascending).
        target_reductions: the strides to output.
        device, dtype: where and as what the parameters are created.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_reductions: Sequence[int],
        target_reductions: Sequence[int] = PYRAMID_REDUCTIONS,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.sources: List[int] = []
        self.out_channels: List[int] = []
        levels: List[nn.Module] = []
        for target in target_reductions:
            finer = [i for i, r in enumerate(in_reductions) if r <= target]
            source = finer[-1] if finer else 0
            ratio = in_reductions[source] / target
            channels = in_channels[source]
            if ratio == 1:
                levels.append(nn.Identity())
            elif ratio < 1:
                levels.append(nn.MaxPool2d(kernel_size=round(1 / ratio), stride=round(1 / ratio)))
            else:
                steps = round(math.log2(ratio))
                levels.append(_upsampler(channels, steps, device=device, dtype=dtype))
                channels //= 2**steps
            self.sources.append(source)
            self.out_channels.append(channels)
        self.levels = nn.ModuleList(levels)
        self.out_reductions = list(target_reductions)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [level(features[source]) for level, source in zip(self.levels, self.sources)]


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _create_backbone(
    name: str,
    in_chans: int,
    pretrained: bool,
    out_indices: Optional[Sequence[int]],
    backbone_kwargs: Mapping[str, Any],
    device: Optional[torch.device],
    dtype: Optional[torch.dtype],
) -> nn.Module:
    """timm's ``features_only`` form of ``name``, built once (on ``device``, as ``dtype``).

    With ``pretrained``, the weights are found (or their host probed) before timm builds anything, so
    that offline it fails within seconds and says which file to use.
    """
    if not timm.is_model(name):
        raise ValueError(
            f"create_cod_model: unknown backbone {name!r}: not a model in timm's registry "
            f"(import recurzoo registers the zoo's own backbones)"
        )
    kwargs = dict(backbone_kwargs, in_chans=in_chans, device=device, dtype=dtype)
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = timm_pretrained_overlay(
            name,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
            label=f"create_cod_model: backbone {name!r} (pass its pretrained_cfg_overlay in backbone_kwargs)",
        )
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    except AttributeError as error:  # timm's feature wrappers read the model's feature_info
        if "feature_info" not in str(error):
            raise
        raise ValueError(
            f"create_cod_model: backbone {name!r} has no feature_info, so timm cannot extract its feature maps "
            f"(features_only); the MSRNet head needs a feature pyramid"
        ) from None


def _choose_levels(name: str, info: Sequence[Mapping[str, Any]], simple_pyramid: bool) -> List[int]:
    """Positions in ``info`` (the backbone's feature levels) to decode: the deepest one of each stride 4-32."""
    deepest = {int(level["reduction"]): index for index, level in enumerate(info)}
    deepest = {reduction: index for reduction, index in deepest.items() if reduction in PYRAMID_REDUCTIONS}
    needed = ", ".join(map(str, PYRAMID_REDUCTIONS))
    if not deepest:
        strides = sorted({int(level["reduction"]) for level in info})
        odd = [s for s in strides if not _is_power_of_two(s)]
        why = f" (stride {odd[0]} is not a power of two)" if odd else ""
        raise ValueError(
            f"create_cod_model: backbone {name!r} gives feature strides {strides}{why}; the MSRNet "
            f"head needs a feature pyramid at strides {needed}, or at least one of them to build the "
            f"others from"
        )
    missing = [r for r in PYRAMID_REDUCTIONS if r not in deepest]
    if missing and not simple_pyramid:
        raise ValueError(
            f"create_cod_model: backbone {name!r} gives feature strides {sorted(deepest)} of the "
            f"{needed} the MSRNet head needs: strides {missing} are missing (pass simple_pyramid=True "
            f"to build them ViTDet-style)"
        )
    return [deepest[r] for r in sorted(deepest)]


def _backbone_model(backbone: nn.Module) -> nn.Module:
    """The model inside timm's ``FeatureGetterNet`` (which keeps it whole), else the feature wrapper itself."""
    inner = getattr(backbone, "model", None)
    return inner if isinstance(inner, nn.Module) else backbone


class MSRNet(nn.Module):
    """Camouflaged object detector: a timm backbone's feature pyramid + the MSRNet decoder.

    ``forward(x)`` takes images in [0, 1] at the base size, makes the three scales itself
    (bilinear) and returns mask logits at the base size; ``forward_multiscale`` takes the three
    scales explicitly (as the official model and data pipeline do).

    Args:
        backbone: timm model name (any model with ``features_only`` support; recurzoo's too).
        in_chans: input channels.
        num_classes: mask channels (1).
        mid_dim: decoder width (official: 64).
        scale_groups: channel groups of the scale attention units (official ``siu_groups``: 4).
        fusion_groups: channel groups of the fusion units (official ``hmu_groups``: 6).
        predictor_dim: width of the last conv before the logits (official: 32).
        scales: sizes of ``image_s``, ``image_m``, ``image_l`` relative to the base size.
        input_norm: normalize the [0, 1] input with ``mean``/``std`` inside the model.
        mean, std: normalization (default: the backbone's pretrained cfg, else ImageNet's).
        pretrained_backbone: load timm's pretrained weights of the backbone (from a local file or
            cache, else downloaded; offline it fails within seconds naming the file to use).
        backbone_kwargs: extra ``timm.create_model`` arguments of the backbone.
        out_indices: the backbone feature levels timm extracts (default: timm's ``features_only``
            levels); the decoder reads the deepest one of each stride 4-32 among them.
        simple_pyramid: build strides the backbone lacks (ViTDet-style); if False they are an error.
        device, dtype: where and as what every parameter and buffer is created (the backbone's too).
    """

    # An exported graph is tied to the traced size (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = False
    export_static_reason = "the sizes of the three input scales and of the scale-merging pools are fixed when traced"

    def __init__(
        self,
        backbone: str = "pvt_v2_b2",
        in_chans: int = 3,
        num_classes: int = 1,
        mid_dim: int = 64,
        scale_groups: int = 4,
        fusion_groups: int = 6,
        predictor_dim: int = 32,
        scales: Sequence[float] = DEFAULT_SCALES,
        input_norm: bool = True,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        pretrained_backbone: bool = False,
        backbone_kwargs: Optional[Mapping[str, Any]] = None,
        out_indices: Optional[Sequence[int]] = None,
        simple_pyramid: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if len(scales) != 3 or min(scales) <= 0:
            raise ValueError(
                f"MSRNet: scales must be three positive factors (image_s, image_m, image_l), received {tuple(scales)}"
            )
        dd = {"device": device, "dtype": dtype}
        self.backbone_name = backbone
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.scales = tuple(float(s) for s in scales)
        self.input_norm = input_norm

        self.backbone = _create_backbone(
            backbone,
            in_chans=in_chans,
            pretrained=pretrained_backbone,
            out_indices=out_indices,
            backbone_kwargs=backbone_kwargs or {},
            **dd,
        )
        levels = self.backbone.feature_info.get_dicts()
        self.feature_levels = _choose_levels(backbone, levels, simple_pyramid)
        channels = [levels[i]["num_chs"] for i in self.feature_levels]
        reductions = [levels[i]["reduction"] for i in self.feature_levels]
        modules = [f"backbone.{levels[i]['module']}" for i in self.feature_levels]
        self.channels_last_features = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"  # e.g. timm's Swin
        if reductions != list(PYRAMID_REDUCTIONS):
            self.neck: Optional[SimpleFeaturePyramid] = SimpleFeaturePyramid(channels, in_reductions=reductions, **dd)
            modules = [
                modules[s] if isinstance(level, nn.Identity) else f"neck.levels.{i}"
                for i, (level, s) in enumerate(zip(self.neck.levels, self.neck.sources))
            ]
            channels, reductions = self.neck.out_channels, self.neck.out_reductions
        else:
            self.neck = None
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(channels, reductions, modules)]
        self.decoder = MSRNetDecoder(
            channels,
            mid_dim=mid_dim,
            scale_groups=scale_groups,
            fusion_groups=fusion_groups,
            predictor_dim=predictor_dim,
            num_classes=num_classes,
            **dd,
        )

        backbone_cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.input_mean = tuple(mean or backbone_cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
        self.input_std = tuple(std or backbone_cfg.get("std") or IMAGENET_DEFAULT_STD)
        self.register_buffer("mean", torch.tensor(self.input_mean, **dd).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.input_std, **dd).view(1, -1, 1, 1), persistent=False)

    @property
    def total_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    def init_weights(self) -> None:
        """Initialise every parameter and buffer again, e.g. after ``to_empty()`` of a model built on ``meta``.

        The backbone runs its own ``init_weights`` when timm's feature wrapper kept it, else PyTorch's
        ``reset_parameters`` of each layer (and timm's ``init_non_persistent_buffers``); the neck and
        decoder get PyTorch's initialisation, as at construction; ``mean``/``std`` their values.

        Raises:
            ValueError: when the backbone has tensors that neither way initialises (named).
        """
        backbone = _backbone_model(self.backbone)
        if callable(getattr(backbone, "init_weights", None)):
            backbone.init_weights()
            reinit_non_persistent_buffers(backbone)
        else:
            reset_parameters(self.backbone, f"{model_name(self)}.init_weights: the backbone {self.backbone_name!r}")
        for part in (self.neck, self.decoder):
            if part is not None:
                reset_parameters(part, f"{model_name(self)}.init_weights")
        with torch.no_grad():
            self.mean.copy_(torch.tensor(self.input_mean).view(1, -1, 1, 1))
            self.std.copy_(torch.tensor(self.input_std).view(1, -1, 1, 1))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^backbone\.(?:model\.)?(?:patch_embed|stem|conv1|bn1|pos_embed|cls_token)",
            blocks=[(r"^backbone\.", (0,)), (r"^(?:neck|decoder)\.", (1,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in the backward pass (the decoder is small)."""
        _backbone_model(self.backbone).set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        backbone = _backbone_model(self.backbone)
        prefix = "backbone." if backbone is self.backbone else "backbone.model."
        names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        return {prefix + name for name in names}

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """[0, 1] image -> the backbone's input normalization (identity with ``input_norm=False``)."""
        return (image - self.mean) / self.std if self.input_norm else image

    def forward_features(self, image: torch.Tensor) -> List[torch.Tensor]:
        """The four pyramid levels (strides 4-32) of one [0, 1] image batch."""
        features = self.backbone(self.normalize(image))
        features = [features[i] for i in self.feature_levels]
        if self.channels_last_features:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return self.neck(features) if self.neck is not None else features

    def make_scales(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``image_s``, ``image_m``, ``image_l``: ``x`` resized bilinearly by ``self.scales``."""
        height, width = x.shape[-2:]
        return tuple(
            x
            if s == 1.0
            else F.interpolate(x, size=(int(height * s), int(width * s)), mode="bilinear", align_corners=False)
            for s in self.scales
        )

    def check_input(self, x: torch.Tensor, min_size: Optional[int] = None) -> None:
        """Raise a ``ValueError`` naming the model unless ``x`` is an image batch it takes.

        ``min_size`` defaults to the smallest base size: the total stride at the smallest scale.
        """
        if min_size is None:
            min_size = math.ceil(self.total_stride / min(self.scales))
        check_image_input(x, model_name(self), self.in_chans, min_size=min_size, dtype=next(self.parameters()).dtype)

    def forward_multiscale(self, image_s: torch.Tensor, image_m: torch.Tensor, image_l: torch.Tensor) -> torch.Tensor:
        """Mask logits at the size of ``image_m`` from the three scales (each in [0, 1]).

        With the default scales ``image_s`` is 1.5x, ``image_m`` 1.0x and ``image_l`` 2.0x the base size.
        """
        for image in (image_s, image_m, image_l):
            self.check_input(image, min_size=self.total_stride)
        logits = self.decoder(
            self.forward_features(image_l), self.forward_features(image_m), self.forward_features(image_s)
        )
        if logits.shape[-2:] != image_m.shape[-2:]:
            logits = resize_to(logits, image_m.shape[-2:])
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits at the size of ``x`` (images in [0, 1] at the base size)."""
        self.check_input(x)
        return self.forward_multiscale(*self.make_scales(x))


_OFFICIAL_VIDEO_KEYS = re.compile(r"\.fuse\.0\.temperal_")
# Official decoder names -> ours, as (pattern, replacement) applied in order.
_OFFICIAL_DECODER_RENAMES: Tuple[Tuple[str, Any], ...] = (
    (r"^tra_5\.conv1x1_1\.", "laterals.3.reduce."),
    (r"^tra_5\.conv1x1_2\.", "laterals.3.global_proj."),
    (r"^tra_5\.conv3x3_(\d)\.", lambda m: f"laterals.3.dilated.{int(m.group(1)) - 1}."),
    (r"^tra_5\.fuse\.", "laterals.3.fuse."),
    (r"^tra_([234])\.", lambda m: f"laterals.{int(m.group(1)) - 2}."),
    (r"^tra_1\.1\.", "upsample_conv."),
    (r"^siu_([2345])\.", lambda m: f"scale_merges.{int(m.group(1)) - 2}."),
    (r"^hmu_([2345])\.", lambda m: f"fusions.{int(m.group(1)) - 2}."),
    (r"\.conv_l_pre\.", ".pre_conv_l."),
    (r"\.conv_s_pre\.", ".pre_conv_s."),
    (r"\.conv_lms\.", ".attention_proj."),
    (r"\.initial_merge\.", ".value_proj."),
    (r"\.trans\.", ".attention_head."),
    (r"\.expand_conv\.", ".expand."),
    (r"\.gate_genator\.1\.", ".gate_reduce."),
    (r"\.gate_genator\.3\.", ".gate_expand."),
    (r"\.interact\.", ".branches."),
    (r"^(fusions\.\d)\.fuse\.1\.", r"\1.fuse."),
    (r"^predictor\.1\.", "mask_conv."),
    (r"^predictor\.2\.", "mask_logits."),
)


def _official_encoder_keys(encoder: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official encoder's keys as those of timm's ``features_only`` backbone."""
    if any(k.startswith("net.") for k in encoder):  # timm features_only inside a wrapper (the parity fixtures)
        return {k[len("net.") :]: v for k, v in encoder.items()}
    if "patch_embed1.proj.weight" in encoder:  # the authors' PVTv2 (pvt_v2_eff_*): timm's layout, then its features
        from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_v2_filter

        converted = pvt_v2_filter({k: v for k, v in encoder.items() if not k.startswith("head.")}, None)
        return {re.sub(r"^stages\.(\d+)\.", r"stages_\1.", k): v for k, v in converted.items()}
    return dict(encoder)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: Optional[MSRNet] = None) -> Dict[str, torch.Tensor]:
    """Convert an official MSRNet checkpoint (PVTv2 variants) to this implementation's keys.

    Handles the authors' PVTv2 encoder names (mapped onto timm's ``pvt_v2_*``) and a timm
    ``features_only`` encoder under ``encoder.net.``; drops the video-only difference-aware
    parameters (``*.fuse.0.temperal_*``, the identity on images) and the normalizer's mean/std.
    Checkpoints in this layout (``backbone.*``/``decoder.*``) pass through.
    """
    state_dict = unwrap_state_dict(state_dict)
    state_dict = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith("decoder.") for k in state_dict):
        return dict(state_dict)
    if any(k.startswith(("siu_1.", "hmu_1.")) for k in state_dict):
        raise ValueError(
            "checkpoint_filter_fn: this is an official five-level MSRNet (RN50_MSRNet / EffB*_MSRNet "
            "decode a stride-2 level too); recurzoo reproduces the four-level PVTv2 design only"
        )
    encoder = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    converted = {f"backbone.{k}": v for k, v in _official_encoder_keys(encoder).items()}
    for key, value in state_dict.items():
        if key.startswith(("encoder.", "normalizer.")) or _OFFICIAL_VIDEO_KEYS.search(key):
            continue
        for pattern, replacement in _OFFICIAL_DECODER_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[f"decoder.{key}"] = value
    return converted


_OFFICIAL_CONSTRUCTOR = "MSRNet.PvtV2B2_MSRNet (encoder replaced by timm pvt_v2)"


def _official_backbone(encoder: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """``'timm:pvt_v2_b0 features_only out_indices=(0,1,2,3)'`` -> ``('pvt_v2_b0', (0, 1, 2, 3))``."""
    match = re.match(r"\s*(?:timm:)?(\S+)", encoder)
    name = match.group(1) if match else "pvt_v2_b2"
    name = re.sub(r"^pvt_v2_eff_", "pvt_v2_", name)
    indices = re.search(r"out_indices=\(([\d,\s]+)\)", encoder)
    out_indices = tuple(int(i) for i in indices.group(1).split(",") if i.strip()) if indices else None
    return name, out_indices


def _official_msrnet(
    encoder: str = "timm:pvt_v2_b2",
    mid_dim: int = 64,
    siu_groups: int = 4,
    hmu_groups: int = 6,
    input_norm: bool = True,
    scales: Optional[Mapping[str, float]] = None,
    num_frames: int = 1,
    encoder_kwargs: Optional[Mapping[str, Any]] = None,
    **unused: Any,
) -> MSRNet:
    """The official ``PvtV2B*_MSRNet`` arguments mapped onto :class:`MSRNet`.

    ``encoder_kwargs`` are ``timm.create_model`` arguments of the encoder (a narrow one, in fixtures).
    """
    if num_frames != 1:
        raise ValueError(f"MSRNet: the video model (num_frames={num_frames}) is not reproduced; images only")
    backbone, out_indices = _official_backbone(encoder)
    scales = scales or dict(zip(("image_s", "image_m", "image_l"), DEFAULT_SCALES))
    return create_cod_model(
        backbone,
        mid_dim=mid_dim,
        scale_groups=siu_groups,
        fusion_groups=hmu_groups,
        input_norm=input_norm,
        scales=(scales["image_s"], scales["image_m"], scales["image_l"]),
        out_indices=out_indices,
        simple_pyramid=False,
        backbone_kwargs=dict(encoder_kwargs or {}),
    )


def _official_forward(model: MSRNet, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model.forward_multiscale(inputs["image_s"], inputs["image_m"], inputs["image_l"])


register_official(
    _OFFICIAL_CONSTRUCTOR, family="msrnet", checkpoint_filter_fn=checkpoint_filter_fn, forward_fn=_official_forward
)(_official_msrnet)


def _create_msrnet(variant: str, pretrained: bool = False, **kwargs: Any) -> MSRNet:
    if kwargs.pop("features_only", False):
        raise ValueError(
            f"{variant}: a camouflaged-object detector has no features_only form; create its "
            f"backbone ({kwargs.get('backbone')!r}) with features_only=True instead"
        )
    return build_with_weights(MSRNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def create_cod_model(backbone: str, pretrained_backbone: bool = False, **kwargs: Any) -> MSRNet:
    """An MSRNet camouflaged object detector over any timm backbone with (or given) a 4-level pyramid.

    ``backbone`` is a timm model name; ``kwargs`` are :class:`MSRNet`'s (``mid_dim``,
    ``scale_groups``, ``fusion_groups``, ``scales``, ``backbone_kwargs``, ``simple_pyramid``,
    ``device``, ``dtype`` ...). A backbone that cannot give the pyramid raises ``ValueError`` saying
    what is missing. ``pretrained_backbone=True`` loads timm's weights of the backbone: from
    ``backbone_kwargs=dict(pretrained_cfg_overlay=dict(file=...))``, timm's or the Hugging Face
    cache, else downloaded; offline it fails within seconds with a ``ValueError`` naming the file.
    """
    model = MSRNet(backbone=backbone, pretrained_backbone=pretrained_backbone, **kwargs)
    model.pretrained_cfg = _cfg(architecture=f"msrnet_{backbone}", mean=model.input_mean, std=model.input_std)
    return model


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1,
        "input_size": (3, 384, 384),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "",
        "classifier": "decoder.mask_logits",
        "license": "unknown",
        "paper_ids": "arXiv:2511.12810",
        "paper_name": "MSRNet: A Multi-Scale Recursive Network for Camouflaged Object Detection",
        "origin_url": "https://github.com/linaagh98/MSRNet",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "msrnet_pvt_v2_b2": _cfg(first_conv="backbone.patch_embed.proj"),
        "msrnet_pvt_v2_b3": _cfg(first_conv="backbone.patch_embed.proj"),
        "msrnet_pvt_v2_b4": _cfg(first_conv="backbone.patch_embed.proj"),
        "msrnet_pvt_v2_b5": _cfg(first_conv="backbone.patch_embed.proj"),
        "msrnet_hornet_tiny_7x7": _cfg(first_conv="backbone.stem_0"),
        "msrnet_sret_small": _cfg(first_conv="backbone.model.stem.0.conv"),
        "msrnet_resnet50": _cfg(first_conv="backbone.conv1"),
    }
)


@register_task_model("cod", family="camouflage")
def msrnet_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet with a PVTv2-B2 backbone (official ``PvtV2B2_MSRNet``)."""
    model_args = dict(backbone="pvt_v2_b2")
    return _create_msrnet("msrnet_pvt_v2_b2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_pvt_v2_b3(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet with a PVTv2-B3 backbone (official ``PvtV2B3_MSRNet``)."""
    model_args = dict(backbone="pvt_v2_b3")
    return _create_msrnet("msrnet_pvt_v2_b3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_pvt_v2_b4(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet with a PVTv2-B4 backbone (official ``PvtV2B4_MSRNet``, the released checkpoint)."""
    model_args = dict(backbone="pvt_v2_b4")
    return _create_msrnet("msrnet_pvt_v2_b4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_pvt_v2_b5(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet with a PVTv2-B5 backbone (official ``PvtV2B5_MSRNet``)."""
    model_args = dict(backbone="pvt_v2_b5")
    return _create_msrnet("msrnet_pvt_v2_b5", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_hornet_tiny_7x7(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet decoder over HorNet-T (7x7) of this zoo."""
    model_args = dict(backbone="hornet_tiny_7x7")
    return _create_msrnet("msrnet_hornet_tiny_7x7", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_sret_small(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet decoder over SReT-S of this zoo (strides 8-32; stride 4 by a transposed conv)."""
    model_args = dict(backbone="sret_small")
    return _create_msrnet("msrnet_sret_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_task_model("cod", family="camouflage")
def msrnet_resnet50(pretrained: bool = False, **kwargs: Any) -> MSRNet:
    """MSRNet (four-level PVT design) over timm's ResNet-50 (strides 4-32)."""
    model_args = dict(backbone="resnet50")
    return _create_msrnet("msrnet_resnet50", pretrained=pretrained, **dict(model_args, **kwargs))
