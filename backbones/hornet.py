"""HorNet: high-order spatial interactions with recursive gated convolutions.

Paper: "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions",
Rao, Zhao, Tang, Zhou, Lim and Lu, NeurIPS 2022 (https://arxiv.org/abs/2207.14284).
Official code and weights: https://github.com/raoyongming/HorNet (MIT license).

A HorNet block is a ConvNeXt-style block whose depthwise convolution is replaced by the recursive
gated convolution gnConv: one projection produces a gate and a stack of context maps at
geometrically growing widths; a spatial mixer (a 7x7 depthwise conv, or the global-local filter
that mixes half of the channels in the Fourier domain) filters the context; the gate is then
multiplied by each context map in turn, widening through 1x1 convs between the orders.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm,
    LayerNorm2d,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.models import checkpoint_seq, generate_default_cfgs, named_apply, register_model, register_notrace_function
from timm.models._input import update_model_input_size  # keeps resolve_data_config's size current
from torch import nn

from recurzoo.backbones._helpers import (
    FusedGeluMlp,
    StagedClassifierMixin,
    build_with_weights,
    fused_linear,
    imagenet_cfg,
    imagenet_cfg_at,
)
from recurzoo.checkpoint import unwrap_state_dict
from recurzoo.official import register_official

__all__ = [
    "HorNet",
    "PointwiseConv2d",
    "GateContextConv",
    "RecursiveGatedConv",
    "GlobalLocalFilter",
    "HorNetBlock",
    "HorNetStage",
]

_NORM_EPS = 1e-6


def global_filter_size(img_size: int, reduction: int) -> Tuple[int, int]:
    """Height and width of the learned frequency weights for a feature map of ``img_size / reduction``.

    The real FFT of an ``s x s`` map keeps ``s // 2 + 1`` frequencies along the last axis.
    """
    side = img_size // reduction
    return side, side // 2 + 1


def real_dft_matrices(height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real matrices that compute ``rfft2``/``irfft2`` (``norm='ortho'``) of ``height x width`` maps as matmuls.

    Returns float32 ``(row_rfft, col_dft, col_idft, row_irfft)``, with
    ``F = C + iS`` the unitary DFT (``C = cos / sqrt(n)``, ``S = -sin / sqrt(n)``):

    * ``row_rfft`` ``(width, 2 * (width // 2 + 1))``: ``x @ row_rfft = [Re | Im]`` of the real FFT of each row;
    * ``col_dft`` ``(2 * height, 2 * height)``: ``[Re^T | Im^T] @ col_dft`` is the complex DFT over the
      columns (``[[C, S], [-S, C]]``), and ``col_idft`` the inverse (``[[C, -S], [S, C]]``);
    * ``row_irfft`` ``(2 * (width // 2 + 1), width)``: ``[Re | Im] @ row_irfft`` is the inverse real
      FFT of each row: the non-redundant frequencies count twice, the imaginary parts of the zero and
      Nyquist frequencies are ignored (their sines vanish), as ``torch.fft.irfft`` does.
    """

    return tuple(torch.from_numpy(matrix) for matrix in _real_dft_arrays(height, width))


# Cached as numpy arrays, built in float64 with numpy, not torch: a tensor made while torch.export traces
# is a fake one (a cached one would break every later export), and its construction would be recorded.
@lru_cache(maxsize=16)
def _real_dft_arrays(height: int, width: int) -> Tuple[np.ndarray, ...]:
    """The float32 arrays of :func:`real_dft_matrices`."""

    def angles(frequencies: int, length: int) -> np.ndarray:
        return 2 * np.pi * np.outer(np.arange(frequencies), np.arange(length)) / length  # (frequencies, length)

    num_freq = width // 2 + 1
    row = angles(num_freq, width)
    row_rfft = np.concatenate([np.cos(row), -np.sin(row)], axis=0).T / width**0.5
    twice = np.full((num_freq, 1), 2.0)
    twice[0] = 1.0
    if width % 2 == 0:
        twice[-1] = 1.0
    row_irfft = np.concatenate([twice * np.cos(row), -twice * np.sin(row)], axis=0) / width**0.5
    col = angles(height, height)
    cos, sin = np.cos(col) / height**0.5, -np.sin(col) / height**0.5  # symmetric matrices
    col_dft = np.block([[cos, sin], [-sin, cos]])
    col_idft = np.block([[cos, -sin], [sin, cos]])
    return tuple(np.ascontiguousarray(m, dtype=np.float32) for m in (row_rfft, col_dft, col_idft, row_irfft))


def resize_frequency_weight(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A real ``(C, h, w, 2)`` frequency weight for a ``height x width`` map: ``(C, height, width // 2 + 1, 2)``.

    Resized bilinearly with ``align_corners=True`` when the size differs, as the official code does.
    """
    size = (height, width // 2 + 1)
    if tuple(weight.shape[1:3]) != size:
        weight = F.interpolate(weight.permute(3, 0, 1, 2), size=size, mode="bilinear", align_corners=True)
        weight = weight.permute(1, 2, 3, 0)
    return weight


# torch.fx records this call instead of tracing it: the weight's size depends on the map's.
@register_notrace_function
def fourier_filter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply ``x`` in the 2-D real Fourier domain (``norm='ortho'``, float32) by the complex ``weight``.

    ``weight`` is real ``(C, h, w, 2)``, resized to the map's frequencies when its size differs.
    """
    height, width = x.shape[-2:]
    weight = torch.view_as_complex(resize_frequency_weight(weight, height, width).float().contiguous())
    spectrum = torch.fft.rfft2(x.float(), dim=(2, 3), norm="ortho")
    return torch.fft.irfft2(spectrum * weight, s=(height, width), dim=(2, 3), norm="ortho").to(x.dtype)


class GlobalLocalFilter(nn.Module):
    """Mixes half of the channels with a 3x3 depthwise conv and half with a learned global filter.

    The global half is multiplied, in the 2-D real Fourier domain, by a learned complex weight of
    size ``filter_size``; a feature map of another size uses the weight resized bilinearly
    (``align_corners=True``), as the official code does. During ONNX export and ``torch.export``
    the filter runs as real matrix products (:meth:`global_filter_real`), which ONNX (any opset)
    and ExecuTorch's XNNPACK delegate express.
    """

    # An exported graph is tied to the traced size (recurzoo.export reads these, the model cards show them).
    export_dynamic_size = False
    export_static_reason = (
        "the global filter runs as DFT matrices, and with frequency weights resized, for the traced feature-map size"
    )

    def __init__(self, dim: int, filter_size: Tuple[int, int] = (14, 8), device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        half = dim // 2
        self.pre_norm = LayerNorm2d(dim, eps=_NORM_EPS, **dd)
        self.dw = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False, **dd)
        self.complex_weight = nn.Parameter(torch.empty(half, *filter_size, 2, **dd))
        self.post_norm = LayerNorm2d(dim, eps=_NORM_EPS, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The frequency weights' initialisation (the convs and norms have their own)."""
        trunc_normal_(self.complex_weight, std=0.02)

    def frequency_weight(self, height: int, width: int) -> torch.Tensor:
        """The learned weight as a real ``(C, height, width // 2 + 1, 2)`` tensor for a map of that size."""
        return resize_frequency_weight(self.complex_weight, height, width)

    def set_feature_size(self, height: int, width: int) -> None:
        """Store the frequency weights resized for a ``height x width`` map, as the forward resizes them.

        A model then computes at that size exactly as before, without resizing at run time; a frozen
        weight stays frozen.
        """
        with torch.no_grad():
            resized = self.frequency_weight(height, width).contiguous()
        self.complex_weight = nn.Parameter(resized, requires_grad=self.complex_weight.requires_grad)

    def global_filter(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX and torch.export (ExecuTorch) have no complex tensors: the exact real reformulation.
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            return self.global_filter_real(x)
        return fourier_filter(x, self.complex_weight)

    def global_filter_real(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`global_filter` as real matmuls with the DFT matrices of this map size (eval and export).

        Equal to the FFT version up to float32 rounding. The sizes become constants when traced,
        so an exported graph is fixed to the traced feature size.
        """
        batch, channels = x.shape[:2]
        height, width = int(x.shape[-2]), int(x.shape[-1])
        num_freq = width // 2 + 1
        row_rfft, col_dft, col_idft, row_irfft = (m.to(x.device) for m in real_dft_matrices(height, width))
        weight = self.frequency_weight(height, width).float().permute(0, 2, 3, 1)  # (C, freq, 2, height)
        weight_re, weight_im = weight[:, :, 0], weight[:, :, 1]

        # rows: [Re | Im] (B, C, H, 2F), then columns in the transposed layout (B, C, F, [Re^T | Im^T])
        spectrum = (x.float() @ row_rfft).view(batch, channels, height, 2, num_freq)
        spectrum = spectrum.permute(0, 1, 4, 3, 2).reshape(batch, channels, num_freq, 2 * height) @ col_dft
        real, imag = spectrum.view(batch, channels, num_freq, 2, height).unbind(3)
        filtered = torch.cat([real * weight_re - imag * weight_im, real * weight_im + imag * weight_re], dim=-1)
        filtered = (filtered @ col_idft).view(batch, channels, num_freq, 2, height)
        filtered = filtered.permute(0, 1, 4, 3, 2).reshape(batch, channels, height, 2 * num_freq) @ row_irfft
        return filtered.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        local_half, global_half = x.chunk(2, dim=1)
        # The official layout interleaves the two halves channel by channel (local 0, global 0, ...).
        x = torch.stack([self.dw(local_half), self.global_filter(global_half)], dim=2).flatten(1, 2)
        return self.post_norm(x)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution computed as a matmul over the channels of a channels-last map.

    Parameters and ``state_dict`` are those of ``nn.Conv2d(in_chs, out_chs, 1)``. The input is read
    as ``(B, H, W, C)`` through a permuted view: a channels-last map needs no copy, and the output is
    channels-last too. ``scale`` multiplies the output through the weight and bias (one pass fewer
    over the map than a separate multiply).
    """

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_chs, out_chs, kernel_size=1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.project(x, self.weight.flatten(1), self.bias, scale)

    @staticmethod
    def project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """``x`` (``B, C, H, W``) times ``scale * weight`` (``out, C``) plus ``scale * bias``, channels-last out."""
        if scale != 1.0:
            weight, bias = weight * scale, None if bias is None else bias * scale
        return fused_linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


class GateContextConv(PointwiseConv2d):
    """gnConv's input projection: one 1x1 conv whose first ``gate_width`` outputs are the gate, the rest
    the context maps.

    The two parts are computed as two matmuls (row blocks of the one weight), so that each comes out
    contiguous for what follows it (the spatial mixer takes the context without a copy); the gate
    carries gnConv's scale.
    """

    def __init__(self, dim: int, gate_width: int, context_width: int, device=None, dtype=None) -> None:
        super().__init__(dim, gate_width + context_width, device=device, dtype=dtype)
        self.gate_width = gate_width

    def forward(self, x: torch.Tensor, gate_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, width = self.weight.flatten(1), self.gate_width
        gate = self.project(x, weight[:width], self.bias[:width], gate_scale)
        return gate, self.project(x, weight[width:], self.bias[width:], 1.0)


class RecursiveGatedConv(nn.Module):
    """gnConv: an order-``n`` recursive gated convolution.

    ``proj_in`` yields a gate of width ``dim / 2**(n-1)`` and context maps of widths
    ``dim / 2**(n-1), ..., dim / 2, dim``; after the spatial mixer, the gate is multiplied by the
    first context map, then, for each higher order, widened by a 1x1 conv and multiplied by the next.

    Every context map is multiplied by ``scale``; the product of order ``k`` carries ``k + 1`` such
    factors, so the scale is applied through the gate and each widening conv instead (fewer passes
    over the maps, same products). The 1x1 convs run as matmuls on channels-last maps
    (:class:`PointwiseConv2d`): the model keeps its maps channels-last from the first stage on.
    """

    def __init__(
        self,
        dim: int,
        order: int = 5,
        scale: float = 1.0,
        spatial_mixer: Optional[Callable[..., nn.Module]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % 2 ** (order - 1):
            raise ValueError(
                f"RecursiveGatedConv: dim must be divisible by 2**(order-1) = {2 ** (order - 1)}, "
                f"received dim={dim}, order={order}"
            )
        self.order = order
        self.scale = scale
        self.widths = [dim // 2**i for i in reversed(range(order))]
        context_width = sum(self.widths)
        self.proj_in = GateContextConv(dim, gate_width=self.widths[0], context_width=context_width, **dd)
        if spatial_mixer is None:
            self.spatial_mixer = nn.Conv2d(
                context_width, context_width, kernel_size=7, padding=3, groups=context_width, **dd
            )
        else:
            self.spatial_mixer = spatial_mixer(context_width, **dd)
        self.order_projs = nn.ModuleList(
            PointwiseConv2d(self.widths[i], self.widths[i + 1], **dd) for i in range(order - 1)
        )
        self.proj_out = PointwiseConv2d(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, context = self.proj_in(x, self.scale)
        contexts = self.spatial_mixer(context).split(self.widths, dim=1)
        x = gate * contexts[0]
        for i, proj in enumerate(self.order_projs):  # indexed, not zipped: torch.fx cannot iterate a split
            x = proj(x, self.scale) * contexts[i + 1]
        return self.proj_out(x)


class HorNetBlock(nn.Module):
    """Pre-norm residual block: gnConv, then a channels-last MLP (4x), each with a layer scale."""

    def __init__(
        self,
        dim: int,
        gnconv: Callable[..., nn.Module],
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ls_init_value: Optional[float] = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = LayerNorm2d(dim, eps=_NORM_EPS, **dd)
        self.gnconv = gnconv(dim, **dd)
        self.norm2 = LayerNorm(dim, eps=_NORM_EPS, **dd)
        self.mlp = FusedGeluMlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.ls_init_value = ls_init_value
        if ls_init_value:
            self.gamma1 = nn.Parameter(torch.empty(dim, **dd))
            self.gamma2 = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer scales back to ``ls_init_value`` (the layers inside have their own initialisation)."""
        for gamma in (self.gamma1, self.gamma2):
            if gamma is not None:
                nn.init.constant_(gamma, float(self.ls_init_value))

    def _residual(self, x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        """``x + drop_path(gamma * y)``; without drop path, one fused multiply-add."""
        if gamma is None:
            return x + self.drop_path(y)
        if isinstance(self.drop_path, nn.Identity):
            return torch.addcmul(x, y, gamma.view(-1, 1, 1))
        return x + self.drop_path(y * gamma.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.gnconv(self.norm1(x)), self.gamma1)
        y = self.mlp(self.norm2(x.permute(0, 2, 3, 1)))
        return self._residual(x, y.permute(0, 3, 1, 2), self.gamma2)


class HorNetStage(nn.Module):
    """A downsampling layer (the stem for the first stage) followed by HorNet blocks."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        gnconv: Callable[..., nn.Module],
        drop_path_rates: Sequence[float],
        ls_init_value: Optional[float],
        mlp_ratio: float = 4.0,
        downsample: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_chs, eps=_NORM_EPS, **dd),
                nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2, **dd),
            )
        else:  # the stem downsamples for the first stage
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                HorNetBlock(
                    out_chs,
                    gnconv=gnconv,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path_rates[i],
                    ls_init_value=ls_init_value,
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last from here on: the blocks' 1x1 convs and MLP read the maps as (B, H, W, C) views
        x = self.downsample(x).contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class HorNet(StagedClassifierMixin, nn.Module):
    """HorNet backbone and classifier with timm's model interface.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        depths: blocks per stage.
        dims: widths of the four stages (the official ``base_dim`` times 1, 2, 4, 8).
        gnconv_orders: order of the recursive gated conv in each stage.
        gnconv_scale: scale applied to the spatially mixed context (the paper uses 1/3).
        global_filter_sizes: per stage, ``None`` for the 7x7 depthwise mixer, or the ``(h, w)`` of
            the learned frequency weights of a global-local filter.
        mlp_ratio: hidden width of the block MLP relative to the stage width.
        ls_init_value: initial layer scale (``None`` or 0 disables it).
        global_pool: pooling type of the head.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        head_init_scale: multiplier of the initial classifier weights.
        device, dtype: where and as what every parameter is created (``meta``, then ``to_empty()`` and
            :meth:`init_weights`, gives a working model).
    """

    # What an exported graph of the model can take (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 3, 18, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        gnconv_orders: Sequence[int] = (2, 3, 4, 5),
        gnconv_scale: float = 1.0 / 3.0,
        global_filter_sizes: Sequence[Optional[Tuple[int, int]]] = (None, None, None, None),
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = 1e-6,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not len(depths) == len(dims) == len(gnconv_orders) == len(global_filter_sizes) == 4:
            raise ValueError(
                "HorNet: depths, dims, gnconv_orders and global_filter_sizes need one entry per stage "
                f"(4), received {len(depths)}, {len(dims)}, {len(gnconv_orders)}, "
                f"{len(global_filter_sizes)}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.head_init_scale = head_init_scale

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4, **dd),
            LayerNorm2d(dims[0], eps=_NORM_EPS, **dd),
        )
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        for i in range(4):
            spatial_mixer = None
            if global_filter_sizes[i] is not None:
                spatial_mixer = partial(GlobalLocalFilter, filter_size=tuple(global_filter_sizes[i]))
            gnconv = partial(
                RecursiveGatedConv, order=gnconv_orders[i], scale=gnconv_scale, spatial_mixer=spatial_mixer
            )
            stages.append(
                HorNetStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth=depths[i],
                    gnconv=gnconv,
                    drop_path_rates=drop_path_rates[i],
                    ls_init_value=ls_init_value,
                    mlp_ratio=mlp_ratio,
                    downsample=i > 0,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.init_head(dims[-1], num_classes, global_pool, drop_rate, **dd)
        self.init_weights(needs_reset=False)

    def init_weights(self, needs_reset: bool = True) -> None:
        """The official initialisation: truncated-normal convs and linears, the classifier scaled.

        With ``needs_reset`` (after ``to_empty()`` of a model built on ``meta``, say) the norms, the
        layer scales and the frequency weights are set again too; at construction they already are.
        """
        named_apply(partial(_init_weights, head_init_scale=self.head_init_scale, needs_reset=needs_reset), self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last from the stem on (see HorNetStage.forward): converting the 3-channel input is
        # cheaper than the stem's output, and the stem's conv and norm run faster on it
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Size the global filters' frequency weights for ``img_size`` input, as the forward resizes them.

        The model then computes at that size as before, without resizing the weights at run time, and
        timm's data config follows; frozen weights stay frozen. 7x7 models have nothing to resize.
        """
        if img_size is None:
            return
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for info, stage in zip(self.feature_info, self.stages):
            reduction = info["reduction"]
            for module in stage.modules():
                if isinstance(module, GlobalLocalFilter):
                    module.set_feature_size(height // reduction, width // reduction)
        update_model_input_size(self, (height, width))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Layer scales, norms and biases are 1-D and excluded by timm's optimizer factory already.
        return {name for name, _ in self.named_parameters() if name.endswith("complex_weight")}


def _init_weights(module: nn.Module, name: str = "", head_init_scale: float = 1.0, needs_reset: bool = True) -> None:
    """HorNet's initialisation of one module (for ``named_apply``): see :meth:`HorNet.init_weights`."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if name.startswith("head.fc"):
            with torch.no_grad():
                module.weight.mul_(head_init_scale)
                module.bias.mul_(head_init_scale)
    elif needs_reset and isinstance(module, (nn.LayerNorm, HorNetBlock, GlobalLocalFilter)):
        module.reset_parameters()


# Official names -> ours, applied in order to every key of an official checkpoint.
_OFFICIAL_KEY_RENAMES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.gnconv\.dwconv\.", ".gnconv.spatial_mixer."),
    (r"\.gnconv\.pws\.", ".gnconv.order_projs."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: HorNet) -> Dict[str, torch.Tensor]:
    """Convert an official HorNet checkpoint (or a wrapped one) to this implementation's keys.

    Checkpoints already in this layout pass through. Global-filter weights stored for another
    feature size are resized bilinearly to the model's, as the official code does at run time.
    """
    import re

    state_dict = unwrap_state_dict(state_dict)
    if "stem.0.weight" in state_dict:
        converted = dict(state_dict)
    else:
        converted = {}
        for key, value in state_dict.items():
            for pattern, replacement in _OFFICIAL_KEY_RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
    target = model.state_dict()
    for key, value in converted.items():
        if key.endswith("complex_weight") and key in target and value.shape != target[key].shape:
            resized = F.interpolate(
                value.permute(3, 0, 1, 2), size=target[key].shape[1:3], mode="bilinear", align_corners=True
            )
            converted[key] = resized.permute(1, 2, 3, 0).contiguous()
    return converted


def _official_hornet(
    depths: Sequence[int],
    base_dim: int,
    num_classes: int = 1000,
    gnconv_orders: Sequence[int] = (2, 3, 4, 5),
    gnconv_scale: float = 1.0 / 3.0,
    global_filter: bool = False,
    global_filter_hw: Optional[Sequence[Sequence[int]]] = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    **unused: Any,
) -> HorNet:
    """The official ``hornet.HorNet`` arguments mapped onto :class:`HorNet`."""
    filter_sizes: List[Optional[Tuple[int, int]]] = [None, None, None, None]
    if global_filter:
        hw = global_filter_hw or [global_filter_size(224, 16), global_filter_size(224, 32)]
        filter_sizes[2:] = [tuple(size) for size in hw]
    return HorNet(
        in_chans=in_chans,
        num_classes=num_classes,
        depths=depths,
        dims=[base_dim * 2**i for i in range(4)],
        gnconv_orders=gnconv_orders,
        gnconv_scale=gnconv_scale,
        global_filter_sizes=filter_sizes,
        drop_path_rate=drop_path_rate,
    )


register_official("hornet.HorNet", family="hornet", checkpoint_filter_fn=checkpoint_filter_fn)(_official_hornet)


def _create_hornet(variant: str, pretrained: bool = False, **kwargs: Any) -> HorNet:
    return build_with_weights(
        HorNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _tsinghua(file_id: str) -> Tuple[str, str]:
    """A Tsinghua Cloud download and the cache file name timm stores it under (its URL path has none)."""
    return f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1", f"hornet_{file_id}.pth"


# timm's pretrained cfg of an ImageNet classifier (imagenet_cfg), with what every weight of the family shares.
_cfg = partial(
    imagenet_cfg,
    first_conv="stem.0",
    license="mit",
    paper_ids="arXiv:2207.14284",
    paper_name="HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions",
    origin_url="https://github.com/raoyongming/HorNet",
)


_IN22K = dict(num_classes=21841)

default_cfgs = generate_default_cfgs(
    {
        "hornet_tiny_7x7.in1k": _cfg(url=_tsinghua("bac9690c72944d19aca1")),
        "hornet_tiny_gf.in1k": _cfg(url=_tsinghua("460e759c82324ea6bfa3")),
        "hornet_small_7x7.in1k": _cfg(url=_tsinghua("8ef64277da0e469ea857")),
        "hornet_small_gf.in1k": _cfg(url=_tsinghua("959603ca287d4c09ad49")),
        "hornet_base_7x7.in1k": _cfg(url=_tsinghua("13a748487711492e9704")),
        "hornet_base_gf.in1k": _cfg(url=_tsinghua("c212d1d8a3914b47a5c1")),
        "hornet_base_gf_384": _cfg(**imagenet_cfg_at(384)),
        "hornet_large_7x7.in22k": _cfg(url=_tsinghua("c2fc23caae084a3aa73d"), **_IN22K),
        "hornet_large_gf.in22k": _cfg(url=_tsinghua("8600206ebdfa485f98d0"), **_IN22K),
        "hornet_large_gf_384.in22k": _cfg(url=_tsinghua("eec48d5eca5a48d98fd2"), **_IN22K, **imagenet_cfg_at(384)),
    }
)


def _hornet_args(base_dim: int, global_filter: bool, img_size: int = 224) -> Dict[str, Any]:
    """The official architecture: depths 2-3-18-2, widths base_dim x 1/2/4/8, gnConv orders 2-5."""
    filter_sizes: List[Optional[Tuple[int, int]]] = [None, None, None, None]
    if global_filter:
        filter_sizes[2:] = [global_filter_size(img_size, 16), global_filter_size(img_size, 32)]
    return dict(
        depths=(2, 3, 18, 2),
        dims=tuple(base_dim * 2**i for i in range(4)),
        gnconv_orders=(2, 3, 4, 5),
        gnconv_scale=1.0 / 3.0,
        global_filter_sizes=tuple(filter_sizes),
    )


@register_model
def hornet_tiny_7x7(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-T (7x7): base width 64, 7x7 depthwise gnConv."""
    return _create_hornet("hornet_tiny_7x7", pretrained, **dict(_hornet_args(64, global_filter=False), **kwargs))


@register_model
def hornet_tiny_gf(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-T (GF): base width 64, global-local filters in stages 3 and 4."""
    return _create_hornet("hornet_tiny_gf", pretrained, **dict(_hornet_args(64, global_filter=True), **kwargs))


@register_model
def hornet_small_7x7(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-S (7x7): base width 96."""
    return _create_hornet("hornet_small_7x7", pretrained, **dict(_hornet_args(96, global_filter=False), **kwargs))


@register_model
def hornet_small_gf(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-S (GF): base width 96."""
    return _create_hornet("hornet_small_gf", pretrained, **dict(_hornet_args(96, global_filter=True), **kwargs))


@register_model
def hornet_base_7x7(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-B (7x7): base width 128."""
    return _create_hornet("hornet_base_7x7", pretrained, **dict(_hornet_args(128, global_filter=False), **kwargs))


@register_model
def hornet_base_gf(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-B (GF): base width 128."""
    return _create_hornet("hornet_base_gf", pretrained, **dict(_hornet_args(128, global_filter=True), **kwargs))


@register_model
def hornet_base_gf_384(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-B (GF) with frequency weights sized for 384x384 input."""
    model_args = _hornet_args(128, global_filter=True, img_size=384)
    return _create_hornet("hornet_base_gf_384", pretrained, **dict(model_args, **kwargs))


@register_model
def hornet_large_7x7(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-L (7x7): base width 192."""
    return _create_hornet("hornet_large_7x7", pretrained, **dict(_hornet_args(192, global_filter=False), **kwargs))


@register_model
def hornet_large_gf(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-L (GF): base width 192."""
    return _create_hornet("hornet_large_gf", pretrained, **dict(_hornet_args(192, global_filter=True), **kwargs))


@register_model
def hornet_large_gf_384(pretrained: bool = False, **kwargs: Any) -> HorNet:
    """HorNet-L (GF) with frequency weights sized for 384x384 input."""
    model_args = _hornet_args(192, global_filter=True, img_size=384)
    return _create_hornet("hornet_large_gf_384", pretrained, **dict(model_args, **kwargs))
