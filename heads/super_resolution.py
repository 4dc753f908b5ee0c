"""Super-resolution heads: from a stride-1 feature map to an upscaled image.

A complete super-resolution model is a backbone whose ``forward_features`` keeps the input's
resolution (reduction 1, e.g. ``rgt``) followed by one of the heads below, wrapped by
:class:`SuperResolutionModel`, which also does the input/output scaling of the BasicSR code
(subtract the training set's mean colour, multiply by ``img_range``; undo both on the output):

* :class:`PixelShuffleUpsampler` -- the reconstruction of RGT, SwinIR and EDSR (BasicSR's
  ``pixelshuffle`` upsampler): conv + LeakyReLU to 64 channels, one conv + PixelShuffle(2) per
  doubling (or one conv + PixelShuffle(3) for x3), conv to the image. Scales 1, 2, 3, 4, 8, ...
* :class:`OneStepPixelShuffle` -- SwinIR's lightweight ``pixelshuffledirect`` head: one conv to
  ``out_chans * scale**2`` channels and a single PixelShuffle(scale). Any integer scale.

``create_sr_model(backbone, scale, head=...)`` builds backbone + head for any backbone with a stride-1
feature map and says what is missing otherwise. The RGT super-resolution models ``rgt[_small]_x{2,3,4}``
are task models registered here (``recurzoo.create_model('rgt_small_x4')``), with the filter that reads
the authors' BasicSR checkpoints.

Inference helpers: :func:`tiled_super_resolve` (fixed-size tiles with overlap and linear blending, so
that memory does not grow with the image) and :func:`super_resolve_image` (uint8 array in, uint8 array
out). Reading and writing image files is :mod:`recurzoo.images`'; the ``recurzoo sr`` command is
:mod:`recurzoo.apps`'.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import generate_default_cfgs
from torch import nn

from recurzoo.backbones._helpers import build_with_weights, check_image_input, model_name
from recurzoo.backbones.rgt import DIV2K_RGB_MEAN, OFFICIAL_UPSAMPLER_PREFIXES, RGT, rgt_args, rgt_cfg
from recurzoo.checkpoint import family_filter, unwrap_state_dict
from recurzoo.official import register_official
from recurzoo.registry import register_task_model

__all__ = [
    "DIV2K_RGB_MEAN",
    "SR_HEADS",
    "ChannelsLastPixelShuffle",
    "PixelShuffleUpsampler",
    "OneStepPixelShuffle",
    "SuperResolutionModel",
    "create_sr_model",
    "tiled_super_resolve",
    "blend_weights",
    "tile_starts",
    "image_to_tensor",
    "tensor_to_image",
    "super_resolve_image",
    "checkpoint_filter_fn",
]


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _reset_convs(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            layer.reset_parameters()


class ChannelsLastPixelShuffle(nn.PixelShuffle):
    """``nn.PixelShuffle`` computed as a gather in channels-last order.

    Same result; the map comes out channels-last in memory (the order the convs around it compute
    in). Under ``torch.compile`` this matters: inductor writes a plain pixel shuffle's channels-last
    output one channel at a time, 1.6x slower than the convs around it in a 64-channel upsampler at
    64 px, where this form is a single pass with contiguous writes (and eager time is unchanged).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.upscale_factor
        batch, channels, height, width = x.shape
        channels_out = channels // (scale * scale)
        x = x.permute(0, 2, 3, 1).reshape(batch, height, width, channels_out, scale, scale)
        x = x.permute(0, 1, 4, 2, 5, 3).reshape(batch, height * scale, width * scale, channels_out)
        return x.permute(0, 3, 1, 2)


class PixelShuffleUpsampler(nn.Module):
    """The RGT/SwinIR reconstruction head (BasicSR's ``pixelshuffle`` upsampler).

    Args:
        in_chs: channels of the stride-1 feature map.
        upscale: 1, a power of two (one conv + PixelShuffle(2) per doubling) or 3.
        out_chans: image channels produced.
        num_feat: width of the upsampling convs (64 in RGT and SwinIR).
    """

    feature_reduction = 1  # the feature map this head takes has the image's resolution

    def __init__(
        self, in_chs: int, upscale: int, out_chans: int = 3, num_feat: int = 64, device=None, dtype=None
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not (_is_power_of_two(upscale) or upscale == 3):
            raise ValueError(f"PixelShuffleUpsampler: upscale must be a power of two or 3, received {upscale}")
        self.upscale = upscale
        self.out_chans = out_chans
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(in_chs, num_feat, kernel_size=3, padding=1, **dd), nn.LeakyReLU(inplace=True)
        )
        stages: List[nn.Module] = []
        if upscale == 3:
            stages += [nn.Conv2d(num_feat, 9 * num_feat, kernel_size=3, padding=1, **dd), ChannelsLastPixelShuffle(3)]
        else:
            for _ in range(upscale.bit_length() - 1):
                stages += [
                    nn.Conv2d(num_feat, 4 * num_feat, kernel_size=3, padding=1, **dd),
                    ChannelsLastPixelShuffle(2),
                ]
        self.upsample = nn.Sequential(*stages)
        self.conv_last = nn.Conv2d(num_feat, out_chans, kernel_size=3, padding=1, **dd)

    def init_weights(self) -> None:
        """Every conv back at PyTorch's default initialization (as when built)."""
        _reset_convs(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.upsample(self.conv_before_upsample(features)))


class OneStepPixelShuffle(nn.Module):
    """Lightweight head (SwinIR's ``pixelshuffledirect``): one 3x3 conv, then PixelShuffle(upscale)."""

    feature_reduction = 1

    def __init__(self, in_chs: int, upscale: int, out_chans: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        if upscale < 1:
            raise ValueError(f"OneStepPixelShuffle: upscale must be a positive integer, received {upscale}")
        self.upscale = upscale
        self.out_chans = out_chans
        self.conv = nn.Conv2d(in_chs, out_chans * upscale**2, kernel_size=3, padding=1, device=device, dtype=dtype)
        self.shuffle = nn.PixelShuffle(upscale)

    def init_weights(self) -> None:
        """The conv back at PyTorch's default initialization (as when built)."""
        _reset_convs(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(features))


# Head names as BasicSR/SwinIR spell the ``upsampler`` option.
SR_HEADS: Dict[str, Callable[..., nn.Module]] = {
    "pixelshuffle": PixelShuffleUpsampler,
    "pixelshuffledirect": OneStepPixelShuffle,
}


class SuperResolutionModel(nn.Module):
    """A stride-1 backbone and a super-resolution head, with BasicSR's input/output scaling.

    ``forward(x)`` takes images in ``[0, 1]`` of any size and returns them ``head.upscale`` times
    larger: ``head(backbone.forward_features((x - mean) * img_range)) / img_range + mean``. The
    backbone is only used through its public timm interface (``forward_features``,
    ``forward_intermediates``, ``prune_intermediate_layers``, ``feature_info``).

    It also behaves as a timm model: ``feature_info``/``forward_intermediates`` are the backbone's,
    and ``reset_classifier(n)`` replaces the upsampler by timm's pooled classifier head on the
    backbone features (``n=0``: pooled features), e.g. to reuse a trained SR body for recognition.

    Args:
        backbone: a module with ``forward_features`` returning a map of the input's size.
        head: a super-resolution head (``upscale`` attribute).
        img_mean: colour subtracted from the input (DIV2K's mean for 3 channels, 0 otherwise).
        img_range: multiplier after the mean subtraction (1 for RGT; 255 in some BasicSR models).
        name: the name used in error messages (timm's registered name when built by timm).
    """

    # What an exported graph of the model can take (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = True

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        img_mean: Optional[Sequence[float]] = None,
        img_range: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_chans = int(getattr(backbone, "in_chans", 3))
        self.upscale = int(head.upscale)
        self.img_range = float(img_range)
        if img_mean is None:
            img_mean = DIV2K_RGB_MEAN if self.in_chans == 3 else (0.0,) * self.in_chans
        if len(img_mean) != self.in_chans:
            raise ValueError(f"SuperResolutionModel: img_mean needs {self.in_chans} entries, received {len(img_mean)}")
        self.img_mean = tuple(float(v) for v in img_mean)  # a constant, as in the official code (no weight)
        self.num_features = self.head_hidden_size = int(backbone.num_features)
        self.num_classes = 0
        self.feature_info = [
            dict(level, module=f"backbone.{level['module']}") if "module" in level else dict(level)
            for level in backbone.feature_info
        ]
        self.name = name

    @property
    def is_super_resolution(self) -> bool:
        """True while the head is an upsampler (not replaced by ``reset_classifier``)."""
        return not isinstance(self.head, (ClassifierHead, nn.Identity))

    def _name(self) -> str:
        return self.name or model_name(self)

    def init_weights(self) -> None:
        """Initialise backbone and head as when built (also after ``create_model(device='meta')`` and
        ``to_empty``); a part without ``init_weights`` has its layers reset."""
        for part in (self.backbone, self.head):
            if callable(getattr(part, "init_weights", None)):
                part.init_weights()
            else:
                for layer in part.modules():
                    if callable(getattr(layer, "reset_parameters", None)):
                        layer.reset_parameters()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        inner = self.backbone.group_matcher(coarse)

        def prefixed(rule: Any) -> Any:
            if isinstance(rule, str):
                return "|".join(f"^backbone\\.{part.lstrip('^')}" for part in rule.split("|"))
            return [(prefixed(pattern), suffix) for pattern, suffix in rule]

        return {key: prefixed(rule) for key, rule in inner.items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc if isinstance(self.head, ClassifierHead) else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the upsampler by a pooled classifier (``num_classes=0``: pooled features) on the
        model's device and dtype; ``global_pool=None`` keeps a classifier's pooling (``'avg'`` first)."""
        if global_pool is None:
            global_pool = self.head.global_pool.pool_type if isinstance(self.head, ClassifierHead) else "avg"
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, **get_device_dtype(self))
        self.head.train(self.training)

    def check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self._name(), self.in_chans, dtype=next(self.parameters()).dtype)

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_tensor(self.img_mean).view(1, -1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the backbone's input scale (mean subtracted, times ``img_range``)."""
        return (x - self._mean(x)) * self.img_range

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output -> images in [0, 1] (not clamped)."""
        return x / self.img_range + self._mean(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.backbone.forward_features(self.normalize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.is_super_resolution:
            return self.denormalize(self.head(x))
        if isinstance(self.head, ClassifierHead):
            return self.head(x, pre_logits=pre_logits)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, **kwargs: Any
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """The backbone's ``forward_intermediates`` (same keyword arguments) for images in [0, 1]."""
        self.check_input(x)
        return self.backbone.forward_intermediates(self.normalize(x), indices=indices, **kwargs)

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Prune the backbone; with ``prune_head`` the upsampler goes too (a feature extractor remains)."""
        kept = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=True)
        if prune_head:
            self.reset_classifier(0, "")
        return kept

    @torch.no_grad()
    def super_resolve(
        self, x: torch.Tensor, tile: Optional[int] = None, tile_overlap: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """Eval-mode output for images in [0, 1], optionally tile by tile (see :func:`tiled_super_resolve`)."""
        if not self.is_super_resolution:
            raise ValueError(f"{self._name()}: the super-resolution head was replaced by reset_classifier")
        was_training = self.training
        self.eval()
        try:
            if tile is None:
                return self(x)
            return tiled_super_resolve(self, x, self.upscale, tile=tile, tile_overlap=tile_overlap, progress=progress)
        finally:
            self.train(was_training)


def _feature_reductions(backbone: nn.Module) -> List[int]:
    info = getattr(backbone, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "reduction") and callable(info.reduction):
        return list(info.reduction())
    return [level["reduction"] for level in info]


def create_sr_model(
    backbone: Union[str, nn.Module],
    scale: int,
    head: str = "pixelshuffle",
    img_mean: Optional[Sequence[float]] = None,
    img_range: float = 1.0,
    head_kwargs: Optional[Dict[str, Any]] = None,
    **backbone_kwargs: Any,
) -> SuperResolutionModel:
    """A super-resolution model: ``backbone`` (a timm name or module) + the head ``head`` for ``scale``.

    The backbone must map an image to a feature map of the same size (``forward_features`` with the
    last ``feature_info`` reduction 1) and declare ``num_features``. A ``ValueError`` says which of
    these is missing. ``backbone_kwargs`` go to ``timm.create_model`` when a name is given.
    """
    if head not in SR_HEADS:
        raise ValueError(f"create_sr_model: unknown head {head!r}; choose one of {sorted(SR_HEADS)}")
    if isinstance(backbone, str):
        import timm

        name = backbone
        backbone_kwargs.setdefault("num_classes", 0)
        backbone = timm.create_model(name, **backbone_kwargs)
    else:
        if backbone_kwargs:
            raise ValueError("create_sr_model: backbone keyword arguments need a backbone name, not a module")
        name = model_name(backbone)
    reductions = _feature_reductions(backbone)
    missing = []
    if not callable(getattr(backbone, "forward_features", None)):
        missing.append("a forward_features method")
    if not reductions:
        missing.append("feature_info (timm's list of feature levels with their reductions)")
    elif reductions[-1] != SR_HEADS[head].feature_reduction:
        missing.append(
            f"a stride-1 feature map: its forward_features has stride {reductions[-1]} "
            f"(feature reductions {reductions})"
        )
    if getattr(backbone, "num_features", None) is None:
        missing.append("num_features (the channels of its feature map)")
    if missing:
        raise ValueError(
            f"create_sr_model: the {head!r} head needs a backbone with "
            + "; ".join(missing)
            + f" -- backbone {name!r} lacks it"
        )
    sr_head = SR_HEADS[head](
        int(backbone.num_features),
        scale,
        out_chans=int(getattr(backbone, "in_chans", 3)),
        **get_device_dtype(backbone),  # beside the backbone (``device``/``dtype`` in backbone_kwargs)
        **(head_kwargs or {}),
    )
    return SuperResolutionModel(
        backbone, sr_head, img_mean=img_mean, img_range=img_range, name=f"{name}+{head}_x{scale}"
    )


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SuperResolutionModel) -> Dict[str, torch.Tensor]:
    """Convert a super-resolution checkpoint to ``model``'s keys (body under ``backbone.``, upsampler under ``head.``).

    Reads this package's layout, a body's weights alone (the upsampler keeps its initialisation, so
    load those with ``strict=False``) and the official BasicSR layout (RGT, SwinIR-style files, also
    wrapped in ``params``/``params_ema``): the upsampler's keys go to the head, the rest through the
    backbone family's own filter.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(key.startswith("backbone.") for key in state_dict):
        return state_dict
    head = {f"head.{key}": value for key, value in state_dict.items() if key.startswith(OFFICIAL_UPSAMPLER_PREFIXES)}
    body = {key: value for key, value in state_dict.items() if not key.startswith(OFFICIAL_UPSAMPLER_PREFIXES)}
    body_filter = family_filter(model.backbone)
    if body_filter is not None:
        body = body_filter(body, model.backbone)
    if not head:  # a body alone: its classifier (if any) has no place in an SR model
        body = {key: value for key, value in body.items() if not key.startswith("head.")}
    return {**{f"backbone.{key}": value for key, value in body.items()}, **head}


def _official_rgt(
    upscale: int = 2,
    in_chans: int = 3,
    embed_dim: int = 180,
    depth: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (2, 2, 2, 2),
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    qk_scale: Optional[float] = None,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    use_chk: bool = False,
    img_range: float = 1.0,
    resi_connection: str = "1conv",
    split_size: Sequence[int] = (8, 8),
    c_ratio: float = 0.5,
    **unused: Any,
) -> SuperResolutionModel:
    """The official ``rgt_arch.RGT`` arguments (its defaults too) mapped onto body + upsampler.

    ``img_size`` (the size of the stored masks) and ``upsampler`` are accepted and ignored: masks
    are computed for each input and the official model always uses the pixel-shuffle upsampler.
    """
    model = _build_rgt_sr(
        upscale,
        in_chans=in_chans,
        img_range=img_range,
        embed_dim=embed_dim,
        depths=tuple(depth),
        num_heads=list(num_heads),
        mlp_ratio=mlp_ratio,
        split_size=tuple(split_size),
        c_ratio=c_ratio,
        qkv_bias=qkv_bias,
        qk_scale=qk_scale,
        proj_drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        drop_path_rate=drop_path_rate,
        resi_connection=resi_connection,
    )
    model.name = "rgt_arch.RGT"  # errors name the official constructor
    model.set_grad_checkpointing(use_chk)
    return model


register_official("rgt_arch.RGT", family="rgt", checkpoint_filter_fn=checkpoint_filter_fn)(_official_rgt)


def _build_rgt_sr(
    upscale: int, in_chans: int = 3, img_range: float = 1.0, device=None, dtype=None, **body_kwargs: Any
) -> SuperResolutionModel:
    """RGT body + pixel-shuffle upsampler, both created on ``device`` in ``dtype``."""
    body = RGT(in_chans=in_chans, device=device, dtype=dtype, **body_kwargs)
    head = PixelShuffleUpsampler(body.num_features, upscale, out_chans=in_chans, device=device, dtype=dtype)
    return SuperResolutionModel(body, head, img_range=img_range)


def _create_rgt_sr(variant: str, upscale: int, pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    return build_with_weights(
        _build_rgt_sr,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(len(kwargs["depths"]))), feature_cls="getter"),
        upscale=upscale,
        **kwargs,
    )


def _sr_cfg(**kwargs: Any) -> Dict[str, Any]:
    """SR models take images in [0, 1] (they subtract the mean themselves) and return larger ones."""
    return rgt_cfg(
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), first_conv="backbone.conv_first", classifier=None, **kwargs
    )


# The official SR weights (DF2K-trained x2/x3/x4, BasicSR files) are on Google Drive / Baidu only (see the
# official README): download them by hand and pass ``pretrained_cfg_overlay=dict(file=...)``.
default_cfgs = generate_default_cfgs(
    {
        "rgt_x2": _sr_cfg(),
        "rgt_x3": _sr_cfg(),
        "rgt_x4": _sr_cfg(),
        "rgt_small_x2": _sr_cfg(),
        "rgt_small_x3": _sr_cfg(),
        "rgt_small_x4": _sr_cfg(),
    }
)


def _rgt_sr(
    variant: str, upscale: int, num_groups: int, pretrained: bool, kwargs: Dict[str, Any]
) -> SuperResolutionModel:
    return _create_rgt_sr(variant, upscale, pretrained, **rgt_args(num_groups, **kwargs))


@register_task_model("sr", family="rgt")
def rgt_x2(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT x2 super-resolution (body of 8 residual groups + pixel-shuffle upsampler)."""
    return _rgt_sr("rgt_x2", 2, 8, pretrained, kwargs)


@register_task_model("sr", family="rgt")
def rgt_x3(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT x3 super-resolution."""
    return _rgt_sr("rgt_x3", 3, 8, pretrained, kwargs)


@register_task_model("sr", family="rgt")
def rgt_x4(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT x4 super-resolution."""
    return _rgt_sr("rgt_x4", 4, 8, pretrained, kwargs)


@register_task_model("sr", family="rgt")
def rgt_small_x2(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT-S x2 super-resolution (6 residual groups)."""
    return _rgt_sr("rgt_small_x2", 2, 6, pretrained, kwargs)


@register_task_model("sr", family="rgt")
def rgt_small_x3(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT-S x3 super-resolution."""
    return _rgt_sr("rgt_small_x3", 3, 6, pretrained, kwargs)


@register_task_model("sr", family="rgt")
def rgt_small_x4(pretrained: bool = False, **kwargs: Any) -> SuperResolutionModel:
    """RGT-S x4 super-resolution."""
    return _rgt_sr("rgt_small_x4", 4, 6, pretrained, kwargs)


# ----------------------------------------------------------------------------------------------
# Tiled inference
# ----------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` shared."""
    if tile >= length:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def blend_weights(length: int, margin: int, ramp: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """Per-pixel weights along one side of a tile: at an interior end, ``margin`` pixels of weight 0
    (they saw the tile's zero padding), then a linear ramp over ``ramp`` pixels up to 1.

    Two tiles overlapping by ``2 * margin + ramp`` pixels get weights summing to one across the
    overlap: one tile alone, a linear cross-fade, the other tile alone.
    """
    position = torch.arange(length, dtype=torch.float64) + 0.5
    weight = torch.ones(length, dtype=torch.float64)
    if ramp_start:
        weight = torch.minimum(weight, ((position - margin) / max(ramp, 1)).clamp(min=0))
    if ramp_end:
        weight = torch.minimum(weight, ((length - position - margin) / max(ramp, 1)).clamp(min=0))
    return weight


@torch.no_grad()
def tiled_super_resolve(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    tile: int = 256,
    tile_overlap: int = 32,
    output_device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``model`` (x ``scale``) on ``tile x tile`` crops of ``image`` and blend them.

    Tiles overlap by at least ``tile_overlap`` input pixels. In each overlap the outer quarter on
    either side is discarded (those pixels saw the tile's zero padding) and the middle half is
    cross-faded linearly (:func:`blend_weights`), so tile borders leave no seam. Only one tile is on
    the model's device at a time, so the model's memory does not grow with the image; the input and
    the output (on ``output_device``, default the input's device) are the only full-size tensors.
    With a model whose receptive field reaches at most ``tile_overlap / 4`` input pixels, the result
    equals the untiled one.
    """
    if tile < 1 or tile_overlap < 0 or tile_overlap >= tile:
        raise ValueError(
            f"tiled inference needs tile >= 1 and 0 <= tile_overlap < tile, "
            f"received tile={tile}, tile_overlap={tile_overlap}"
        )
    batch, channels, height, width = image.shape
    model_device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), image.device)
    output_device = torch.device(output_device) if output_device is not None else image.device
    rows, cols = tile_starts(height, tile, tile_overlap), tile_starts(width, tile, tile_overlap)
    output: Optional[torch.Tensor] = None
    weight_sum = torch.zeros(height * scale, width * scale, dtype=torch.float32, device=output_device)
    margin = (tile_overlap // 4) * scale
    ramp = (tile_overlap - 2 * (tile_overlap // 4)) * scale
    from tqdm import tqdm

    with tqdm(total=len(rows) * len(cols), desc="tiles", unit="tile", disable=not progress, leave=False) as bar:
        for top in rows:
            tile_h = min(tile, height)
            weight_y = blend_weights(tile_h * scale, margin, ramp, top > 0, top + tile_h < height)
            for left in cols:
                tile_w = min(tile, width)
                weight_x = blend_weights(tile_w * scale, margin, ramp, left > 0, left + tile_w < width)
                crop = image[:, :, top : top + tile_h, left : left + tile_w].to(model_device)
                result = model(crop).to(output_device, torch.float32)
                if output is None:
                    output = torch.zeros(
                        batch, result.shape[1], height * scale, width * scale, dtype=torch.float32, device=output_device
                    )
                weight = (weight_y[:, None] * weight_x[None, :]).to(output_device, torch.float32)
                rows_out = slice(top * scale, (top + tile_h) * scale)
                cols_out = slice(left * scale, (left + tile_w) * scale)
                output[:, :, rows_out, cols_out] += result * weight
                weight_sum[rows_out, cols_out] += weight
                bar.update(1)
    assert output is not None
    return (output / weight_sum).to(image.dtype)


# ----------------------------------------------------------------------------------------------
# Images as arrays
# ----------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` uint8 -> ``(1, C, H, W)`` float in [0, 1]."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # PIL and albumentations may hand out read-only arrays
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """``(1, C, H, W)`` in [0, 1] -> ``(H, W, C)`` uint8, clamped and rounded (BasicSR's tensor2img)."""
    return tensor[0].clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def super_resolve_image(
    model: SuperResolutionModel,
    image: np.ndarray,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Super-resolve one uint8 ``(H, W, 3)`` image with ``model`` (eval mode), optionally tiled."""
    device = next(model.parameters()).device
    x = image_to_tensor(image)
    if tile is None:
        x = x.to(device)
    return tensor_to_image(model.super_resolve(x, tile=tile, tile_overlap=tile_overlap, progress=progress))
