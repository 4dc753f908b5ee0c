"""RGT: the Recursive Generalization Transformer for image super-resolution.

Paper: "Recursive Generalization Transformer for Image Super-Resolution", Chen, Zhang, Gu, Kong and
Yang, ICLR 2024 (https://arxiv.org/abs/2303.06373).
Official code and weights: https://github.com/zhengchen1999/RGT (Apache-2.0 license).

The body keeps the image's resolution: a 3x3 shallow conv, residual groups of transformer blocks
(each group ends with a 3x3 conv and a skip), a norm and a 3x3 conv, plus a skip from the shallow
conv. Inside a group, blocks alternate two attentions:

* L-SA (local): rectangle-window self-attention. Half of the channels attend inside horizontal
  windows (e.g. 8 x 32), the other half inside vertical ones (32 x 8), with a dynamic relative
  position bias (a small MLP of the offsets); some blocks shift the windows by half their size;
  a depthwise 3x3 conv of the values is added.
* RG-SA (global): the map is pooled recursively by one shared 4x4 stride-4 depthwise conv into a
  small representative map, which the full-resolution queries cross-attend to, in reduced channels.

Every block adds its own input back scaled by a learnable vector (hybrid adaptive integration, HAI).
``rgt`` and ``rgt_small`` are the bodies (image -> full-resolution features, plus a pooled classifier
head for timm). They take timm's factory arguments (``device``, ``dtype``; ``init_weights()`` after a
``meta`` build) and trace with torch.fx: the two attentions, which decide on the map's size in Python,
are leaf modules. The complete super-resolution models ``rgt_x2`` ... ``rgt_small_x4`` (body +
pixel-shuffle upsampler) are task models of :mod:`recurzoo.heads.super_resolution`.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, get_device_dtype
from timm.models import (
    checkpoint_seq,
    generate_default_cfgs,
    named_apply,
    register_model,
    register_notrace_function,
    register_notrace_module,
)
from torch import nn
from torch.fx.node import has_side_effect

from recurzoo.backbones._helpers import (
    IntermediatesMixin,
    apply_linear,
    apply_linear_act,
    build_with_weights,
    check_image_input,
    init_linear,
    model_name,
    plain_eager,
)
from recurzoo.checkpoint import unwrap_state_dict

__all__ = [
    "RGT",
    "RGTBlock",
    "ResidualGroup",
    "RectangleWindowAttention",
    "RecursiveGeneralizationAttention",
    "GatedConvMlp",
    "DynamicPositionBias",
    "recursion_steps",
    "shifted_window_mask",
    "shifted_window_masks",
    "shifted_window_kinds",
    "check_rgt_input",
    "checkpoint_filter_fn",
    "rgt_args",
    "rgt_cfg",
    "DIV2K_RGB_MEAN",
    "OFFICIAL_UPSAMPLER_PREFIXES",
]

# Mean colour of the DIV2K training images, subtracted from the input by the official model (BasicSR).
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
_MASK_VALUE = -100.0  # the official additive mask between regions of a shifted window


def _floor_log4(value: int) -> int:
    """``floor(log4(value))`` for ``value >= 1`` in integer arithmetic (0 for 0)."""
    return max(value.bit_length() - 1, 0) // 2


def recursion_steps(height: int, width: int, training: bool) -> int:
    """How many times RG-SA pools a ``height x width`` map with its 4x4 stride-4 conv.

    As in the official code: ``max(log4(H/4), log4(W/4))`` (floored) in training, and
    ``max(log4(H/16), log4(W/16), 2)`` at evaluation. Where the official code fails (a side that
    would be pooled to nothing), the count is capped so the smaller side keeps at least one pixel.
    """
    height, width = int(height), int(width)  # plain ints, also when traced
    divisor = 4 if training else 16
    steps = max(_floor_log4(height // divisor), _floor_log4(width // divisor))
    if not training:
        steps = max(steps, 2)
    return min(steps, _floor_log4(min(height, width)))


def shifted_window_masks(window: Tuple[int, int], shift: Tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """``(4, N, N)`` additive masks of the four kinds of window of a shifted-window attention.

    After the cyclic shift, the last window of each row/column mixes regions of the original map
    (before ``-window``, between ``-window`` and ``-shift``, after ``-shift``); tokens from different
    regions may not attend to each other (``-100`` in the logits, as in Swin and RGT). Kind 0 is an
    interior window (no mask), 1 one of the last row, 2 of the last column, 3 the corner.
    """

    def last_window_regions(size: int, offset: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return 1 + (index >= size - offset).long()

    rows_last, cols_last = last_window_regions(window[0], shift[0]), last_window_regions(window[1], shift[1])
    rows_inner, cols_inner = torch.zeros_like(rows_last), torch.zeros_like(cols_last)
    kinds = ((rows_inner, cols_inner), (rows_last, cols_inner), (rows_inner, cols_last), (rows_last, cols_last))
    ids = torch.stack([(rows[:, None] * 3 + cols[None, :]).flatten() for rows, cols in kinds])
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, _MASK_VALUE)


def shifted_window_kinds(rows: int, cols: int, device=None) -> torch.Tensor:
    """``(rows * cols,)`` kind (:func:`shifted_window_masks`) of every window, in row-major order."""
    last_row = (torch.arange(rows, device=device) == rows - 1).long()
    last_col = (torch.arange(cols, device=device) == cols - 1).long()
    # last_col twice, not 2 * last_col: quantizers (PT2E) turn a scalar factor into a float constant,
    # which would make this index a float tensor
    return (last_row[:, None] + last_col[None, :] + last_col[None, :]).flatten()


def shifted_window_mask(
    height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int], device=None
) -> torch.Tensor:
    """``(num_windows, N, N)`` additive mask of a shifted-window attention on a ``height x width`` map."""
    kinds = shifted_window_kinds(height // window[0], width // window[1], device)
    return shifted_window_masks(window, shift, device)[kinds]


# One side of a window grid, as the in-place window path reads it: a group is ``(last, count, pieces)``,
# ``count`` windows that share a mask (``last``: the group of the last window of a shifted map), and a
# piece ``(map_start, first_window, window_stop, offset_start, offset_stop)`` is a block of the map
# (from ``map_start``) holding those windows' rows (or columns) ``offset_start:offset_stop``.
WindowPiece = Tuple[int, int, int, int, int]
WindowGroup = Tuple[int, int, List[WindowPiece]]


def window_groups(size: int, window: int, shift: int) -> List[WindowGroup]:
    """How a side of ``size`` (a multiple of ``window``) is cut into windows after rolling it by ``-shift``.

    Unshifted: one group, one piece. Shifted: the windows before the last one read the map from
    ``shift`` on (one piece), the last one wraps around (two pieces, the map's end then its start).
    """
    size, window, shift = int(size), int(window), int(shift)  # plain ints, also when traced
    count = size // window
    if not shift:
        return [(0, count, [(0, 0, count, 0, window)])]
    groups: List[WindowGroup] = []
    if count > 1:
        groups.append((0, count - 1, [(shift, 0, count - 1, 0, window)]))
    last = [(shift + (count - 1) * window, 0, 1, 0, window - shift), (0, 0, 1, window - shift, window)]
    groups.append((1, 1, last))
    return groups


def _map_block(tensor: torch.Tensor, rows: WindowPiece, cols: WindowPiece) -> torch.Tensor:
    """The block of a ``(B, H, W, ...)`` map that ``rows`` x ``cols`` pieces cover, as ``(B, wr, r, wc, c, ...)``."""
    (row_start, row_first, row_stop, row_in_start, row_in_stop) = rows
    (col_start, col_first, col_stop, col_in_start, col_in_stop) = cols
    row_counts = (row_stop - row_first, row_in_stop - row_in_start)
    col_counts = (col_stop - col_first, col_in_stop - col_in_start)
    block = tensor[
        :, row_start : row_start + row_counts[0] * row_counts[1], col_start : col_start + col_counts[0] * col_counts[1]
    ]
    return block.unflatten(1, row_counts).unflatten(3, col_counts)


def _window_block(windows: torch.Tensor, rows: WindowPiece, cols: WindowPiece) -> torch.Tensor:
    """The same block in a ``(B, rows, Wh, cols, Ww, ...)`` view of windows."""
    return windows[:, rows[1] : rows[2], rows[3] : rows[4], cols[1] : cols[2], cols[3] : cols[4]]


class DynamicPositionBias(nn.Module):
    """Relative position bias computed by an MLP of the offsets (CrossFormer's DPB, no residuals).

    Maps every offset ``(dy, dx)`` inside a window to one bias per head: a linear layer to
    ``hidden`` channels, then three (LayerNorm, ReLU, Linear) stages, the last one to ``num_heads``.
    """

    def __init__(self, hidden: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        with warnings.catch_warnings():  # a zero width (tiny models) makes torch warn that init is a no-op
            warnings.simplefilter("ignore")
            self.proj_in = nn.Linear(2, hidden, **dd)
            layers: List[nn.Module] = []
            for out_features in (hidden, hidden, num_heads):
                layers += [nn.LayerNorm(hidden, **dd), nn.ReLU(), nn.Linear(hidden, out_features, **dd)]
            self.mlp = nn.Sequential(*layers)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj_in(offsets))


def window_offsets(window_size: Tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """``((2 * Wh - 1) * (2 * Ww - 1), 2)`` every ``(dy, dx)`` offset between two tokens of a window."""
    offsets_h = torch.arange(1 - window_size[0], window_size[0], device=device, dtype=dtype or torch.float32)
    offsets_w = torch.arange(1 - window_size[1], window_size[1], device=device, dtype=dtype or torch.float32)
    return torch.stack(torch.meshgrid(offsets_h, offsets_w, indexing="ij"), dim=-1).reshape(-1, 2)


def window_relative_index(window_size: Tuple[int, int], device=None) -> torch.Tensor:
    """``(N, N)`` row of :func:`window_offsets` holding the offset between tokens ``i`` and ``j``."""
    window_h, window_w = window_size
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_h, device=device), torch.arange(window_w, device=device), indexing="ij")
    ).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]
    return (relative[0] + window_h - 1) * (2 * window_w - 1) + relative[1] + window_w - 1


class RectangleWindowBranch(nn.Module):
    """Multi-head attention inside ``window_size`` rectangles, with a dynamic position bias.

    Takes the stacked ``(B, H, W, 3, C)`` queries, keys and values of a map whose sides are
    multiples of the window; with ``shifted``, the map is rolled by half a window first (and back
    after), and tokens from different regions are masked. The offsets and their index are
    non-persistent buffers derived from the window size (:meth:`init_weights` recomputes them).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Tuple[int, int],
        shifted: bool,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.shift_size = (window_size[0] // 2, window_size[1] // 2) if shifted else None
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        # The official bias MLP is a quarter of a quarter of the branch width wide.
        self.position_bias = DynamicPositionBias((dim // 4) // 4, num_heads, **dd)
        self.register_buffer("offsets", window_offsets(self.window_size, **dd), persistent=False)
        self.register_buffer(
            "relative_position_index", window_relative_index(self.window_size, device=device), persistent=False
        )
        # (table, biases) of the last call without autograd (see window_biases)
        self._bias_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def init_weights(self) -> None:
        """Recompute the size-derived buffers in place (after ``to_empty``), on their device and dtype."""
        with torch.no_grad():
            self.offsets.copy_(window_offsets(self.window_size, self.offsets.device, self.offsets.dtype))
            self.relative_position_index.copy_(
                window_relative_index(self.window_size, self.relative_position_index.device)
            )

    def relative_position_bias(self, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(num_heads, N, N)`` bias of the attention logits inside one window, from the position-bias
        MLP's ``(offsets, num_heads)`` ``table`` (computed when not given)."""
        if table is None:
            table = self.position_bias(self.offsets)
        tokens = self.relative_position_index.shape[0]
        # (heads, offsets) first: the gather is then contiguous
        return table.t()[:, self.relative_position_index.view(-1)].view(-1, tokens, tokens)

    def window_biases(self, dtype: torch.dtype) -> torch.Tensor:
        """``(kinds, num_heads, N, N)`` additive logits of each kind of window (one kind unshifted, the
        four of :func:`shifted_window_masks` shifted).

        Without autograd (inference), the biases of the last call are reused while the MLP's table
        equals, value for value, the one they were built from: only the small MLP runs again, and no
        change of the weights (in place, through ``.data``, by loading) can leave a stale bias.
        What is kept between calls is ``kinds * heads * N^2`` numbers per branch (3 MB for a shifted
        8x32 branch of 3 heads in float32: about 70 MB over RGT-S); a call with autograd drops it.
        """
        table = self.position_bias(self.offsets)
        reuse = not torch.is_grad_enabled() and plain_eager(table)
        cached = self._bias_cache if reuse else None
        if (
            cached is not None
            and cached[1].dtype == dtype
            and (cached[0].device, cached[0].dtype) == (table.device, table.dtype)
            and torch.equal(cached[0], table)
        ):
            return cached[1]
        bias = self.relative_position_bias(table)
        if self.shift_size is None:
            biases = bias[None].to(dtype)
        else:
            masks = shifted_window_masks(self.window_size, self.shift_size, bias.device, bias.dtype)
            biases = (bias[None] + masks[:, None]).to(dtype)
        self._bias_cache = (table, biases) if reuse else None
        return biases

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # 4-D inputs with a mask broadcast over the first axis keep SDPA on its fused kernel
        dropout = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)

    def forward(self, qkv: torch.Tensor, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Attend within windows of ``qkv`` ``(B, H, W, 3, C)``; the result is ``(B, H, W, C)``.

        The windows are taken in groups that share one mask (all of them unshifted; shifted, the
        interior ones, the last row, the last column and the corner), each attended with its mask
        broadcast over its windows, so no per-window mask is built. A group is gathered from the map
        in one pass, the roll of a shifted branch included. With ``out`` (a channel slice of the
        caller's tensor; eager mode) each group is written there in one pass (window reversal, roll
        back and the concatenation of the branches fused); without it (the exporters' and the
        compiler's path, which need out-of-place ops) the blocks are joined and returned.
        """
        biases = self.window_biases(qkv.dtype)
        if out is None:
            return self._attend_out_of_place(qkv, biases)
        batch, height, width, _, channels = qkv.shape
        window_h, window_w = self.window_size
        heads, head_dim = self.num_heads, channels // self.num_heads
        shift_h, shift_w = self.shift_size or (0, 0)
        source = qkv.unflatten(-1, (heads, head_dim))
        target = out.unflatten(-1, (heads, head_dim))
        for last_row, rows, row_pieces in window_groups(height, window_h, shift_h):
            for last_col, cols, col_pieces in window_groups(width, window_w, shift_w):
                # copied piece by piece into (3, B, rows, cols, heads, Wh, Ww, d)
                windows = qkv.new_empty(3, batch, rows, cols, heads, window_h, window_w, head_dim)
                windows_as_map = windows.permute(1, 2, 5, 3, 6, 0, 4, 7)
                for r in row_pieces:
                    for c in col_pieces:
                        _window_block(windows_as_map, r, c).copy_(_map_block(source, r, c))
                windows = windows.reshape(3, batch * rows * cols, heads, window_h * window_w, head_dim)
                bias = biases[last_row + 2 * last_col if self.shift_size is not None else 0]
                attended = self.attend(*windows.unbind(0), bias[None])
                # (B, rows, Wh, cols, Ww, heads, d): the window order of the map
                attended = attended.view(batch, rows, cols, heads, window_h, window_w, head_dim)
                attended = attended.permute(0, 1, 4, 2, 5, 3, 6)
                for r in row_pieces:
                    for c in col_pieces:
                        _map_block(target, r, c).copy_(_window_block(attended, r, c))
        return None

    def _attend_out_of_place(self, qkv: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without ``out``, in out-of-place operators on tensors of at most six dimensions
        (XNNPACK's limit: the ExecuTorch program keeps its views and permutes inside the delegate)."""
        batch, height, width, _, channels = qkv.shape
        window_h, window_w = self.window_size
        heads, head_dim = self.num_heads, channels // self.num_heads
        shift_h, shift_w = self.shift_size or (0, 0)
        source = qkv.reshape(batch, height, width, 3 * channels)
        blocks: Dict[Tuple[int, int], torch.Tensor] = {}  # the result's blocks by position
        for last_row, rows, row_pieces in window_groups(height, window_h, shift_h):
            for last_col, cols, col_pieces in window_groups(width, window_w, shift_w):
                # (B, rows, Wh, cols, Ww, 3C), the pieces joined, to (3, B * rows * cols, heads, Wh * Ww, d)
                windows = torch.cat(
                    [torch.cat([_map_block(source, r, c) for c in col_pieces], dim=4) for r in row_pieces], dim=2
                )
                windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_h * window_w, 3, heads, head_dim)
                windows = windows.permute(2, 0, 3, 1, 4)
                bias = biases[last_row + 2 * last_col if self.shift_size is not None else 0]
                attended = self.attend(*windows.unbind(0), bias[None])
                # (B, rows, Wh, cols, Ww, C): the window order of the map
                attended = attended.transpose(1, 2).reshape(batch, rows, cols, window_h, window_w, channels)
                attended = attended.permute(0, 1, 3, 2, 4, 5)
                for r in row_pieces:
                    for c in col_pieces:
                        blocks[r[0], c[0]] = _window_block(attended, r, c).flatten(3, 4).flatten(1, 2)
        row_starts, col_starts = sorted({r for r, _ in blocks}), sorted({c for _, c in blocks})
        return torch.cat([torch.cat([blocks[r, c] for c in col_starts], dim=2) for r in row_starts], dim=1)


# The two attentions take Python decisions on the map's size (padding, how often RG-SA pools):
# torch.fx keeps them as leaf modules (their parameters stay in the traced model).
@register_notrace_module
class RectangleWindowAttention(nn.Module):
    """L-SA: horizontal- and vertical-rectangle window attention on the two channel halves.

    The map is zero-padded (after the qkv projection) to a multiple of the longer window side,
    as in the official code; a depthwise 3x3 conv of the (unpadded) values is added to the result.
    """

    # An exported graph is tied to the traced size (recurzoo.export reads these, the model cards show them).
    export_dynamic_size = False
    export_static_reason = (
        "the rectangle windows pad the map to a multiple of their size and mask shifted windows for the traced size"
    )

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: Sequence[int] = (8, 32),
        shifted: bool = False,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % 2 or num_heads % 2 or dim % num_heads:
            raise ValueError(
                f"RectangleWindowAttention: dim and num_heads must be even and dim divisible by "
                f"num_heads, received dim={dim}, num_heads={num_heads}"
            )
        short, long = split_size
        self.pad_multiple = max(short, long)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.branches = nn.ModuleList(
            [
                RectangleWindowBranch(
                    dim // 2,
                    num_heads=num_heads // 2,
                    window_size=window,
                    shifted=shifted,
                    qk_scale=qk_scale,
                    attn_drop=attn_drop,
                    **dd,
                )
                for window in ((short, long), (long, short))
            ]
        )
        self.local_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = apply_linear(self.qkv, x)
        values = qkv[..., 2 * channels :]
        pad_bottom, pad_right = -height % self.pad_multiple, -width % self.pad_multiple
        if pad_bottom or pad_right:
            qkv = F.pad(qkv, (0, 0, 0, pad_right, 0, pad_bottom))
        qkv = qkv.view(batch, height + pad_bottom, width + pad_right, 3, channels)
        half = channels // 2
        halves = [qkv[..., i * half : (i + 1) * half] for i in range(2)]
        # the ONNX exporter needs out-of-place ops; inductor fuses the concatenation itself (the in-place
        # writes into slices only cost it extra copies after functionalization)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            x = torch.cat([branch(part) for branch, part in zip(self.branches, halves)], dim=-1)
        else:
            x = qkv.new_empty(batch, height + pad_bottom, width + pad_right, channels)
            for i, (branch, part) in enumerate(zip(self.branches, halves)):
                branch(part, out=x[..., i * half : (i + 1) * half])
        x = x[:, :height, :width]
        x = x + self.local_conv(values.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj_drop(apply_linear(self.proj, x))


@register_notrace_module
class RecursiveGeneralizationAttention(nn.Module):
    """RG-SA: cross-attention from every position to a recursively pooled summary of the map.

    One depthwise 4x4 stride-4 conv is applied :func:`recursion_steps` times, then a depthwise 3x3
    conv and a 1x1 conv to ``c_ratio * dim`` channels, LayerNorm and GELU give the representative
    tokens. Queries and keys have ``c_ratio * dim`` channels, values ``dim``; a depthwise 3x3 conv of
    the values over the pooled map (CPE) is added to them.
    """

    # An exported graph is tied to the traced size (recurzoo.export reads these, the model cards show them).
    export_dynamic_size = False
    export_static_reason = "RG-SA pools the map log4(side)-many times, a count fixed when traced"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        c_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.reduced_dim = int(dim * c_ratio)
        if dim % num_heads or self.reduced_dim % num_heads:
            raise ValueError(
                f"RecursiveGeneralizationAttention: dim={dim} and dim*c_ratio={self.reduced_dim} "
                f"must be divisible by num_heads={num_heads}"
            )
        self.scale = qk_scale or (dim // num_heads * c_ratio) ** -0.5
        self.attn_drop = attn_drop
        self.recursive_pool = nn.Conv2d(dim, dim, kernel_size=4, stride=4, groups=dim, **dd)
        self.pooled_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        self.pooled_proj = nn.Conv2d(dim, self.reduced_dim, kernel_size=1, **dd)
        self.pooled_norm = nn.LayerNorm(self.reduced_dim, **dd)
        self.pooled_act = nn.GELU()
        self.q = nn.Linear(dim, self.reduced_dim, bias=qkv_bias, **dd)
        self.k = nn.Linear(self.reduced_dim, self.reduced_dim, bias=qkv_bias, **dd)
        self.v = nn.Linear(self.reduced_dim, dim, bias=qkv_bias, **dd)
        self.cpe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        pooled = x.permute(0, 3, 1, 2)
        for _ in range(recursion_steps(height, width, self.training)):
            pooled = self.recursive_pool(pooled)
        pooled = self.pooled_proj(self.pooled_dwconv(pooled))
        pooled_h, pooled_w = pooled.shape[-2:]
        tokens = self.pooled_act(self.pooled_norm(pooled.flatten(2).transpose(1, 2)))

        heads = self.num_heads
        q = apply_linear(self.q, x).reshape(batch, height * width, heads, -1).transpose(1, 2)
        # (B, heads, head_dim, tokens), the scale applied to the few keys instead of the many logits
        k = (self.k(tokens) * self.scale).reshape(batch, -1, heads, self.reduced_dim // heads).permute(0, 2, 3, 1)
        v = self.v(tokens)
        v = v + self.cpe(v.transpose(1, 2).reshape(batch, channels, pooled_h, pooled_w)).flatten(2).transpose(1, 2)
        v = v.reshape(batch, -1, heads, channels // heads).transpose(1, 2)
        # explicit attention: the values are wider than the queries, which sends SDPA to its
        # unfused path (a masked-row-safe softmax and extra scaling passes over the logits)
        attn = F.dropout(torch.matmul(q, k).softmax(-1), self.attn_drop, self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj_drop(apply_linear(self.proj, out))


class ConvGate(nn.Module):
    """Spatial gate of the MLP: one half of the channels times a depthwise conv of the normed other half."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **dd)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passthrough, gate = x.chunk(2, dim=-1)
        gate = self.conv(self.norm(gate).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return passthrough * gate


class GatedConvMlp(nn.Module):
    """Channels-last MLP with a convolutional gate: fc1, GELU, :class:`ConvGate` (halves the width), fc2."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = nn.GELU()
        self.gate = ConvGate(hidden_dim // 2, **dd)
        self.fc2 = nn.Linear(hidden_dim // 2, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.fc2, self.gate(apply_linear_act(self.fc1, self.act, x)))


class RGTBlock(nn.Module):
    """Pre-norm transformer block (L-SA or RG-SA, then the gated MLP) with HAI.

    HAI adds the block's input back, multiplied by the learnable per-channel ``skip_scale``
    (initialised to 1e-4), on top of the two usual residuals. Works on ``(B, H, W, C)`` maps.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str,
        shifted: bool = False,
        mlp_ratio: float = 2.0,
        split_size: Sequence[int] = (8, 32),
        c_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        skip_scale_init: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        attn_kwargs = dict(
            num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop, **dd
        )
        if attention == "local":
            self.attn = RectangleWindowAttention(dim, split_size=split_size, shifted=shifted, **attn_kwargs)
        elif attention == "recursive":
            self.attn = RecursiveGeneralizationAttention(dim, c_ratio=c_ratio, **attn_kwargs)
        else:
            raise ValueError(f"RGTBlock: attention must be 'local' or 'recursive', received {attention!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = GatedConvMlp(dim, int(dim * mlp_ratio), **dd)
        self.skip_scale_init = float(skip_scale_init)
        self.skip_scale = nn.Parameter(torch.full((dim,), self.skip_scale_init, **dd))

    def init_weights(self) -> None:
        """The HAI scale back at its initial value (its sub-layers initialise themselves)."""
        with torch.no_grad():
            self.skip_scale.fill_(self.skip_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return torch.addcmul(x, shortcut, self.skip_scale)  # HAI skip in one pass


def is_shifted_block(group_index: int, block_index: int) -> bool:
    """Whether the L-SA block ``block_index`` of group ``group_index`` shifts its windows (official rule).

    Even groups shift blocks 2, 6, 10, ...; odd groups blocks 0, 4, 8, ...
    """
    return block_index % 4 == (2 if group_index % 2 == 0 else 0)


def _residual_conv(dim: int, kind: str, device=None, dtype=None) -> nn.Module:
    """The conv closing a residual group (and the body): ``'1conv'`` or the cheaper ``'3conv'``."""
    dd = {"device": device, "dtype": dtype}
    if kind == "1conv":
        return nn.Conv2d(dim, dim, kernel_size=3, padding=1, **dd)
    if kind == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, kernel_size=3, padding=1, **dd),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, kernel_size=1, **dd),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, kernel_size=3, padding=1, **dd),
        )
    raise ValueError(f"RGT: resi_connection must be '1conv' or '3conv', received {kind!r}")


def _init_rgt_module(module: nn.Module, name: str = "") -> None:
    """One module's share of :meth:`RGT.init_weights` (applied to every module, children first)."""
    if isinstance(module, nn.Linear):
        init_linear(module)
    elif isinstance(module, (RGTBlock, RectangleWindowBranch)):
        module.init_weights()
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()


# torch.fx records this call instead of tracing it and keeps it in the graph (it returns nothing),
# so a traced model checks its real input too.
@has_side_effect
@register_notrace_function
def check_rgt_input(x: torch.Tensor, weight: torch.Tensor, name: str, in_chans: int) -> None:
    """Raise a ``ValueError`` naming the model when ``x`` is not an image batch of ``weight``'s dtype."""
    check_image_input(x, name, in_chans, dtype=weight.dtype)


class ResidualGroup(nn.Module):
    """Blocks alternating L-SA (even positions) and RG-SA (odd), a 3x3 conv, and a skip over the group."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        group_index: int,
        drop_path_rates: Sequence[float],
        resi_connection: str = "1conv",
        device=None,
        dtype=None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(
            *[
                RGTBlock(
                    dim,
                    num_heads=num_heads,
                    attention="local" if i % 2 == 0 else "recursive",
                    shifted=i % 2 == 0 and is_shifted_block(group_index, i),
                    drop_path=drop_path_rates[i],
                    **block_kwargs,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        self.conv = _residual_conv(dim, resi_connection, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in and out (channels-last in memory: the permutes are views)."""
        shortcut = x
        x = x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return shortcut + self.conv(x.permute(0, 3, 1, 2))


class RGT(IntermediatesMixin, nn.Module):
    """The RGT body (image -> full-resolution features) with timm's model interface.

    ``forward_features`` returns ``conv_after_body(norm(groups(norm_pre(s)))) + s`` with
    ``s = conv_first(x)``: a ``(B, embed_dim, H, W)`` map for any input size. ``forward`` pools it
    into timm's classifier head (``num_classes=0``, the default, gives pooled features).
    The input is expected as the SR models feed it: ``x - DIV2K mean`` (times ``img_range``).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        embed_dim: width of the body.
        depths: blocks per residual group.
        num_heads: attention heads, one number or one per group.
        mlp_ratio: hidden width of the gated MLP relative to ``embed_dim``.
        split_size: short and long side of the L-SA rectangles.
        c_ratio: channel ratio of the RG-SA queries and keys.
        qkv_bias: biases of the q, k, v projections.
        qk_scale: overrides the attention scale (``head_dim ** -0.5``).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projections (the official ``drop_rate``).
        attn_drop_rate: dropout of the attention weights.
        drop_path_rate: stochastic depth, rising linearly over all blocks (0.1 in the official training).
        resi_connection: ``'1conv'`` or ``'3conv'``, the conv ending each group and the body.
        global_pool: pooling of the classifier head.
        device: where parameters and buffers are created (``'meta'`` allocates nothing; then
            ``to_empty`` and :meth:`init_weights`).
        dtype: their floating-point type.
    """

    # What an exported graph of the model can take (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = True
    intermediate_formats = ("NCHW", "NHWC")

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        num_heads: Union[int, Sequence[int]] = 6,
        mlp_ratio: float = 2.0,
        split_size: Sequence[int] = (8, 32),
        c_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        resi_connection: str = "1conv",
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        heads = [num_heads] * len(depths) if isinstance(num_heads, int) else list(num_heads)
        if len(heads) != len(depths):
            raise ValueError(f"RGT: num_heads needs one entry per group ({len(depths)}), received {len(heads)}")
        if len(split_size) != 2:
            raise ValueError(f"RGT: split_size must be (short side, long side), received {split_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.drop_rate = drop_rate

        self.conv_first = nn.Conv2d(in_chans, embed_dim, kernel_size=3, padding=1, **dd)
        self.norm_pre = nn.LayerNorm(embed_dim, **dd)
        rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)  # per group, per block
        block_kwargs = dict(
            mlp_ratio=mlp_ratio,
            split_size=tuple(split_size),
            c_ratio=c_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
        )
        groups: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        for i, depth in enumerate(depths):
            group = ResidualGroup(
                embed_dim,
                depth=depth,
                num_heads=heads[i],
                group_index=i,
                drop_path_rates=rates[i],
                resi_connection=resi_connection,
                **block_kwargs,
                **dd,
            )
            groups.append(group)
            self.feature_info.append(dict(num_chs=embed_dim, reduction=1, module=f"groups.{i}"))
        self.groups = nn.Sequential(*groups)
        self.norm = nn.LayerNorm(embed_dim, **dd)
        # None once prune_intermediate_layers cut the body before its last group (features end at the tap)
        self.conv_after_body: Optional[nn.Module] = _residual_conv(embed_dim, resi_connection, **dd)
        self.num_features = self.head_hidden_size = embed_dim
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialization, also after ``create_model(device='meta')`` and ``to_empty``.

        Linear layers truncated normal (std 0.02) with zero biases, every other layer its own reset,
        HAI scales at 1e-4, and the size-derived buffers (window offsets and their index) recomputed.
        """
        with warnings.catch_warnings():  # zero-width position-bias layers of tiny models: init is a no-op
            warnings.simplefilter("ignore")
            named_apply(_init_rgt_module, self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^conv_first|^norm_pre",
            blocks=r"^groups\.(\d+)"
            if coarse
            else [
                (r"^groups\.(\d+)\.blocks\.(\d+)", None),
                (r"^groups\.(\d+)\.conv", (99999,)),
                (r"^norm\.|^conv_after_body", (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier of ``num_classes`` outputs (0: pooled features) on the model's device and
        dtype; the pooling changes only when ``global_pool`` is given (``''``: none)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def check_input(self, x: torch.Tensor) -> None:
        check_rgt_input(x, self.conv_first.weight, model_name(self), self.in_chans)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images -> (the shallow features ``conv_first(x)``, their norm entering the first group)."""
        shallow = self.conv_first(x)
        return shallow, self.norm_pre(shallow.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm (over channels) of a ``(B, C, H, W)`` map."""
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _body_output(self, x: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        if self.conv_after_body is None:  # pruned before the last group: the features end at the tap
            return x
        return self.conv_after_body(self._norm(x)) + shallow

    # The hooks of IntermediatesMixin: the steps are the residual groups; their outputs are the
    # intermediates (``norm=True`` applies the final norm to the last group's); the final output is
    # forward_features'.
    @property
    def num_steps(self) -> int:
        return len(self.groups)

    def run_step(self, state: Tuple[torch.Tensor, torch.Tensor], index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        shallow, x = state
        return shallow, self.groups[index](x)

    def checkpointed_modules(self) -> nn.Sequential:
        return self.groups

    def intermediate(self, state: Tuple[torch.Tensor, torch.Tensor], index: int, norm: bool) -> torch.Tensor:
        x = state[1]
        return self._norm(x) if norm and index == len(self.groups) - 1 else x

    def end_steps(self, state: Tuple[torch.Tensor, torch.Tensor], complete: bool) -> torch.Tensor:
        shallow, x = state
        return self._body_output(x, shallow)

    def keep_steps(self, count: int, prune_norm: bool, prune_head: bool) -> None:
        """Cut before the last group, the body's closing conv and skip go too: ``forward_features``
        then ends at the last kept group's output, as timm's pruned models do."""
        prune_end = count < len(self.groups)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.conv_after_body = None
        self.groups = self.groups[:count]
        if prune_head or prune_end:
            self.reset_classifier(0, "")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        shallow, x = self.embed(x)
        return self._body_output(self.groups(x), shallow)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Official names -> ours (body keys), applied in order to every key of an official checkpoint.
_OFFICIAL_KEY_RENAMES = (
    (r"^before_RG\.1\.", "norm_pre."),
    (r"^layers\.(\d+)\.", r"groups.\1."),
    (r"\.gamma$", ".skip_scale"),
    (r"\.attn\.attns\.(\d+)\.pos\.pos_proj\.", r".attn.branches.\1.position_bias.proj_in."),
    (r"\.attn\.attns\.(\d+)\.pos\.pos1\.(\d+)\.", lambda m: f".attn.branches.{m[1]}.position_bias.mlp.{int(m[2])}."),
    (
        r"\.attn\.attns\.(\d+)\.pos\.pos2\.(\d+)\.",
        lambda m: f".attn.branches.{m[1]}.position_bias.mlp.{3 + int(m[2])}.",
    ),
    (
        r"\.attn\.attns\.(\d+)\.pos\.pos3\.(\d+)\.",
        lambda m: f".attn.branches.{m[1]}.position_bias.mlp.{6 + int(m[2])}.",
    ),
    (r"\.attn\.get_v\.", ".attn.local_conv."),
    (r"\.attn\.reduction1\.", ".attn.recursive_pool."),
    (r"\.attn\.dwconv\.", ".attn.pooled_dwconv."),
    (r"\.attn\.conv\.", ".attn.pooled_proj."),
    (r"\.attn\.norm_act\.0\.", ".attn.pooled_norm."),
    (r"\.mlp\.sg\.", ".mlp.gate."),
)
# Buffers the official model stores but derives from its sizes: recomputed here, never loaded.
_DERIVED_BUFFERS = re.compile(r"(attn_mask_\d|rpe_biases|relative_position_index)$")
# The upsampler of the official super-resolution model (loaded by recurzoo.heads.super_resolution).
OFFICIAL_UPSAMPLER_PREFIXES = ("conv_before_upsample.", "upsample.", "conv_last.")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an RGT checkpoint to the keys of the body :class:`RGT`.

    Reads the official layout (BasicSR, optionally wrapped: its upsampler is dropped), the body of one
    of this package's super-resolution models (keys under ``backbone.``) and the body's own layout.
    The attention masks and position indices the official file stores are derived from sizes and
    dropped; the body computes them for each input.
    """
    state_dict = {
        key: value for key, value in unwrap_state_dict(state_dict).items() if not _DERIVED_BUFFERS.search(key)
    }
    if any(key.startswith("backbone.") for key in state_dict):  # a super-resolution model's body
        return {key[len("backbone.") :]: value for key, value in state_dict.items() if key.startswith("backbone.")}
    if not any(key.startswith(("layers.", "before_RG.")) for key in state_dict):  # already the body's layout
        return state_dict
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_UPSAMPLER_PREFIXES):
            continue
        for pattern, replacement in _OFFICIAL_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def _feature_cfg(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return dict(out_indices=tuple(range(len(kwargs["depths"]))), feature_cls="getter")


def _create_rgt(variant: str, pretrained: bool = False, **kwargs: Any) -> RGT:
    return build_with_weights(
        RGT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=_feature_cfg(kwargs),
        **kwargs,
    )


def rgt_cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    """The default cfg of an RGT model: inputs minus the DIV2K mean colour, any size, Apache-2.0 weights."""
    return {
        "url": url,
        "num_classes": 0,
        "input_size": (3, 64, 64),
        "pool_size": (64, 64),  # stride-1 features: the input's size
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": DIV2K_RGB_MEAN,
        "std": (1.0, 1.0, 1.0),
        "first_conv": "conv_first",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2303.06373",
        "paper_name": "Recursive Generalization Transformer for Image Super-Resolution",
        "origin_url": "https://github.com/zhengchen1999/RGT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "rgt": rgt_cfg(),
        "rgt_small": rgt_cfg(),
    }
)


def rgt_args(num_groups: int, blocks_per_group: int = 6, **kwargs: Any) -> Dict[str, Any]:
    """The official architecture: width 180, ``num_groups`` groups of 6 blocks, 6 heads, MLP ratio 2,
    8x32 rectangles, channel ratio 0.5. ``blocks_per_group`` shrinks the groups (tests)."""
    args = dict(
        embed_dim=180,
        depths=(blocks_per_group,) * num_groups,
        num_heads=6,
        mlp_ratio=2.0,
        split_size=(8, 32),
        c_ratio=0.5,
    )
    args.update(kwargs)
    return args


@register_model
def rgt(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT body: 8 residual groups of 6 blocks, width 180 (stride-1 features)."""
    return _create_rgt("rgt", pretrained, **rgt_args(8, **kwargs))


@register_model
def rgt_small(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT-S body: 6 residual groups of 6 blocks, width 180."""
    return _create_rgt("rgt_small", pretrained, **rgt_args(6, **kwargs))
