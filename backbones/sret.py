"""SReT: sliced recursive transformers.

Paper: "Sliced Recursive Transformer", Shen, Liu and Xing, ECCV 2022 (https://arxiv.org/abs/2111.05297).
Official code and weights: https://github.com/szq0214/SReT (MIT license).

SReT is a three-stage vision transformer that reuses its weights across depth. Each stage holds a
few shared transformer blocks; each shared block is applied ``recursions`` times in a row (two in
the published models), and every application is followed by its own light "non-linear
projection" (a pre-norm MLP). All residual branches and skips carry learnable scalar gains. A
3-conv stem reaches stride 8; depthwise strided convs pool to strides 16 and 32.

Sliced group attention restricts self-attention to groups ("slices") of tokens. On the first
application of a shared block (and on every even-numbered application of a stage, counting from
zero, as the official code marks them) the row-major token sequence is cut into ``num_groups``
contiguous slices. On the recursive (odd-numbered) applications, ``recursive_num_groups`` slices
are taken across the sequence: in training, after a random token permutation as in the paper; in
eval mode, deterministically, token ``i`` going to slice ``i mod G`` (a reshape and a transpose).
When the token count is not a multiple of the group count, the sequence is padded to the next
multiple and the padded keys are masked out of the attention: the groups then differ in size by
at most one token, and nothing else changes.

Every constructor takes timm's factory arguments ``device`` and ``dtype``: a model built with
``device='meta'`` is made usable by ``to_empty()`` and :meth:`SReT.init_weights`. The slice layout
is computed from each input's token count (no buffers, nothing to go stale after ``.to(dtype)``).
torch.fx traces the model with the sliced attention as a leaf, so timm's ``feature_cls='fx'`` and
torchvision's ``create_feature_extractor`` work in training and in eval.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import (
    ConvNormAct,
    DropPath,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import checkpoint_seq, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._input import update_model_input_size  # timm exports no public equivalent
from torch import nn
from torch.fx.node import has_side_effect

from recurzoo.backbones._helpers import (
    FusedGeluMlp,
    StagedClassifierMixin,
    apply_linear,
    build_with_weights,
    check_image_input,
    imagenet_cfg,
    imagenet_cfg_at,
    model_name,
)
from recurzoo.checkpoint import unwrap_state_dict
from recurzoo.official import register_official

__all__ = [
    "SReT",
    "SlicedGroupAttention",
    "TransformerBlock",
    "NonLinearProjection",
    "RecursiveBlock",
    "RecursiveStage",
    "resample_pos_embed",
]

_NORM_EPS = 1e-6
_STEM_STRIDE = 8


def stem_grid(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """The feature-map size after the stem's three stride-2 convs (padding 1): ``ceil(side / 8)``."""
    height, width = to_2tuple(img_size)
    return math.ceil(height / _STEM_STRIDE), math.ceil(width / _STEM_STRIDE)


# torch.fx calls this with the input's runtime size instead of tracing the shape comparison. Besides
# timm's registry (read by its feature extraction), ``torch.fx.wrap`` makes every tracer keep it whole:
# the model's ``forward`` lives in ``_helpers``, whose globals timm's autowrapping would patch instead.
@torch.fx.wrap
@register_notrace_function
def resample_pos_embed(pos_embed: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a ``(1, C, H, W)`` position embedding to ``size`` with timm's ``resample_abs_pos_embed``."""
    if tuple(pos_embed.shape[-2:]) == tuple(size):
        return pos_embed
    channels, old_size = pos_embed.shape[1], pos_embed.shape[-2:]
    tokens = resample_abs_pos_embed(
        pos_embed.flatten(2).transpose(1, 2), new_size=list(size), old_size=list(old_size), num_prefix_tokens=0
    )
    return tokens.transpose(1, 2).reshape(1, channels, *size)


# A leaf of torch.fx traces: the slice layout (group size, padding, mask) is computed from the runtime token count.
@register_notrace_module
class SlicedGroupAttention(nn.Module):
    """Multi-head self-attention within groups of tokens, as one batched SDPA call over the groups.

    Args:
        dim: token width.
        num_heads: attention heads.
        num_groups: contiguous slices of the row-major token sequence for a first (non-recursive)
            application.
        recursive_num_groups: slices for a recursive application, taken across the sequence.
        random_slices: in training, slice the recursive applications after a random token
            permutation (as the paper does); otherwise token ``i`` goes to slice ``i mod G``,
            which is always the rule in eval mode.
        device: where the parameters are created.
        dtype: their floating-point type.

    The slice layout is derived from the token count of each input, so it needs no buffer and
    follows any input size, device and dtype.
    """

    # Read by recurzoo.export and the model cards: sliced attention ties an exported graph to the traced size.
    export_static_reason = (
        "sliced attention pads the token sequence to a multiple of the slice count and shapes the slices for the "
        "traced token count"
    )

    @property
    def export_dynamic_size(self) -> bool:
        """Whether an exported graph takes other sizes than the traced one: only without slicing."""
        return max(self.num_groups, self.recursive_num_groups) <= 1

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_groups: int = 1,
        recursive_num_groups: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        random_slices: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(
                f"SlicedGroupAttention: dim must be divisible by num_heads, received dim={dim}, num_heads={num_heads}"
            )
        if num_groups < 1 or recursive_num_groups < 1:
            raise ValueError(
                f"SlicedGroupAttention: group counts must be positive, received {num_groups} and {recursive_num_groups}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_groups = num_groups
        self.recursive_num_groups = recursive_num_groups
        self.random_slices = random_slices
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, recursive: bool = False) -> torch.Tensor:
        """Attend within the slices of ``x`` (``B, N, C``, row-major tokens) for a first or recursive pass."""
        if not recursive:
            return self.attend(x, self.num_groups, interleaved=False)
        num_groups = self.recursive_num_groups
        if num_groups == 1 or not (self.training and self.random_slices):
            return self.attend(x, num_groups, interleaved=num_groups > 1)
        order = torch.randperm(x.shape[1], device=x.device)
        return self.attend(x[:, order], num_groups, interleaved=False)[:, torch.argsort(order)]

    def attend(self, x: torch.Tensor, num_groups: int, interleaved: bool) -> torch.Tensor:
        """Attention within ``num_groups`` slices: contiguous runs of tokens, or every ``num_groups``-th token."""
        batch, num_tokens, dim = x.shape
        group_size = (num_tokens + num_groups - 1) // num_groups  # ceil; ONNX integer division truncates
        padding = group_size * num_groups - num_tokens
        mask = None
        if padding:
            x = F.pad(x, (0, 0, 0, padding))
            mask = _slice_padding_mask(num_tokens, num_groups, group_size, interleaved, x.device)
            mask = mask.expand(batch, -1, -1, -1, -1).reshape(batch * num_groups, 1, 1, group_size)
        if interleaved:
            # token i = slot * G + group: move the group axis in front (the one copy of this mode)
            x = x.view(batch, group_size, num_groups, dim).transpose(1, 2)
        x = x.reshape(batch * num_groups, group_size, dim)
        q, k, v = (
            apply_linear(self.qkv, x)
            .view(batch * num_groups, group_size, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        # (B, G, heads, slot, head_dim) back to row-major tokens
        x = x.view(batch, num_groups, self.num_heads, group_size, self.head_dim)
        x = x.permute(0, 3, 1, 2, 4) if interleaved else x.permute(0, 1, 3, 2, 4)
        x = x.reshape(batch, group_size * num_groups, dim)
        if padding:
            x = x[:, :num_tokens]
        return self.proj_drop(apply_linear(self.proj, x))


def _slice_padding_mask(
    num_tokens: int,
    num_groups: int,
    group_size: int,
    interleaved: bool,
    device: torch.device,
) -> torch.Tensor:
    """``(1, G, 1, 1, n)`` booleans: which keys of each slice are real tokens of a padded sequence.

    A slice made only of padding keeps its keys, so that its softmax stays finite; its outputs are dropped.
    """
    token = torch.arange(num_groups * group_size, device=device)
    token = token.view(group_size, num_groups).t() if interleaved else token.view(num_groups, group_size)
    real = token < num_tokens
    real = real | ~real.any(dim=-1, keepdim=True)
    return real.view(1, num_groups, 1, 1, group_size)


def scaled_sum(x: torch.Tensor, x_gain: torch.Tensor, y: torch.Tensor, y_gain: torch.Tensor) -> torch.Tensor:
    """``x * x_gain + y * y_gain`` (scalar gains) in two kernels instead of three."""
    return torch.addcmul(y * y_gain, x, x_gain)


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP, every skip and branch scaled by a learnable scalar (initially 1).

    One such block is shared by several applications within a stage; ``forward(x, recursive)``
    tells the attention whether this application is a recursive pass.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_groups: int = 1,
        recursive_num_groups: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        random_slices: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=_NORM_EPS, **dd)
        self.attn = SlicedGroupAttention(
            dim,
            num_heads=num_heads,
            num_groups=num_groups,
            recursive_num_groups=recursive_num_groups,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            random_slices=random_slices,
            **dd,
        )
        self.norm2 = nn.LayerNorm(dim, eps=_NORM_EPS, **dd)
        self.mlp = FusedGeluMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn_skip_gain = nn.Parameter(torch.empty(1, **dd))
        self.attn_gain = nn.Parameter(torch.empty(1, **dd))
        self.mlp_skip_gain = nn.Parameter(torch.empty(1, **dd))
        self.mlp_gain = nn.Parameter(torch.empty(1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The block's own scalar gains back to one (its layers reset themselves)."""
        for gain in (self.attn_skip_gain, self.attn_gain, self.mlp_skip_gain, self.mlp_gain):
            nn.init.ones_(gain)

    def forward(self, x: torch.Tensor, recursive: bool = False) -> torch.Tensor:
        x = scaled_sum(x, self.attn_skip_gain, self.drop_path(self.attn(self.norm1(x), recursive)), self.attn_gain)
        return scaled_sum(x, self.mlp_skip_gain, self.drop_path(self.mlp(self.norm2(x))), self.mlp_gain)


class NonLinearProjection(nn.Module):
    """The light non-shared layer after each application of a shared block: a pre-norm MLP with
    learnable scalar gains on its skip and its branch."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, proj_drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, eps=_NORM_EPS, **dd)
        self.mlp = FusedGeluMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.skip_gain = nn.Parameter(torch.empty(1, **dd))
        self.mlp_gain = nn.Parameter(torch.empty(1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The projection's own scalar gains back to one (its layers reset themselves)."""
        nn.init.ones_(self.skip_gain)
        nn.init.ones_(self.mlp_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_sum(x, self.skip_gain, self.mlp(self.norm(x)), self.mlp_gain)


class RecursiveBlock(nn.Module):
    """One shared :class:`TransformerBlock` applied ``len(recursive_passes)`` times, each
    application followed by its own :class:`NonLinearProjection`.

    ``recursive_passes[r]`` says whether application ``r`` is a recursive pass (sliced with the
    recursive group count).
    """

    def __init__(
        self, shared: TransformerBlock, projections: Sequence[NonLinearProjection], recursive_passes: Sequence[bool]
    ) -> None:
        super().__init__()
        if len(projections) != len(recursive_passes):
            raise ValueError(
                "RecursiveBlock: one projection per application is needed, "
                f"received {len(projections)} projections for {len(recursive_passes)} applications"
            )
        self.shared = shared
        self.projections = nn.ModuleList(projections)
        self.recursive_passes = tuple(bool(flag) for flag in recursive_passes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for projection, recursive in zip(self.projections, self.recursive_passes):
            x = projection(self.shared(x, recursive))
        return x


class RecursiveStage(nn.Module):
    """A depthwise strided-conv pooling (none for the first stage), then recursive blocks on the tokens.

    The stage applies its ``num_shared_blocks`` shared blocks in turn, each ``recursions`` times.
    As in the official code, the odd-numbered applications of the stage (counting from zero over
    all its applications) are the recursive passes; with two recursions that is the second
    application of every shared block.
    """

    def __init__(
        self,
        in_chs: int,
        dim: int,
        num_heads: int,
        num_shared_blocks: int,
        recursions: int = 2,
        num_groups: int = 1,
        recursive_num_groups: int = 1,
        mlp_ratio: float = 4.0,
        projection_mlp_ratio: float = 1.0,
        downsample: bool = True,
        proj_drop: float = 0.0,
        drop_path_rates: Optional[Sequence[float]] = None,
        device=None,
        dtype=None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_shared_blocks < 1 or recursions < 1:
            raise ValueError(
                f"RecursiveStage: needs at least one shared block and one recursion, "
                f"received num_shared_blocks={num_shared_blocks}, recursions={recursions}"
            )
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Conv2d(in_chs, dim, kernel_size=3, stride=2, padding=1, groups=in_chs, **dd)
        else:
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.0] * num_shared_blocks
        blocks = []
        for index in range(num_shared_blocks):
            shared = TransformerBlock(
                dim,
                num_heads=num_heads,
                num_groups=num_groups,
                recursive_num_groups=recursive_num_groups,
                mlp_ratio=mlp_ratio,
                proj_drop=proj_drop,
                drop_path=drop_path_rates[index],
                **block_kwargs,
                **dd,
            )
            projections = [
                NonLinearProjection(dim, mlp_ratio=projection_mlp_ratio, proj_drop=proj_drop, **dd)
                for _ in range(recursions)
            ]
            passes = [(index * recursions + r) % 2 == 1 for r in range(recursions)]
            blocks.append(RecursiveBlock(shared, projections=projections, recursive_passes=passes))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        shape = x.shape  # kept whole (no Python arithmetic on it), so torch.fx traces the stage
        x = x.flatten(2).transpose(1, 2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.transpose(1, 2).reshape(shape)


# torch.fx records this call instead of tracing it (wrapped as ``resample_pos_embed``) and keeps it
# in the graph (it returns nothing), so a traced model checks its real input too.
@has_side_effect
@torch.fx.wrap
@register_notrace_function
def check_sret_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    name: str,
    in_chans: int,
    min_size: int,
    fixed_size: Optional[Tuple[int, int]],
) -> None:
    """Raise a ``ValueError`` naming the model when ``x`` is not an image batch SReT takes.

    ``weight`` is one of the model's parameters, whose dtype a floating input must have (outside
    autocast); sides must be at least ``min_size`` (the total stride) and equal ``fixed_size`` when
    given (a model built with ``dynamic_img_size=False``).
    """
    check_image_input(x, name, in_chans, min_size=min_size, dtype=weight.dtype)
    if fixed_size is not None and tuple(x.shape[-2:]) != tuple(fixed_size) and not torch.jit.is_tracing():
        raise ValueError(
            f"{name}: built with dynamic_img_size=False expects inputs of size {tuple(fixed_size)}, "
            f"received shape {tuple(x.shape)}"
        )


class SReT(StagedClassifierMixin, nn.Module):
    """Sliced Recursive Transformer backbone and classifier with timm's model interface.

    Args:
        img_size: input size the position embedding is made for.
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: pooling type of the head.
        embed_dims: widths of the stages (the official ``base_dims * heads``).
        num_heads: attention heads per stage.
        num_shared_blocks: shared transformer blocks per stage (the official ``recursive_num``).
        recursions: applications of each shared block, per stage or for all (2 in the published
            models; the official ``depth`` is ``num_shared_blocks * recursions``).
        num_groups: slices of a first application, per stage (official ``groups1``).
        recursive_num_groups: slices of a recursive application, per stage (official ``groups2``).
        mlp_ratio: hidden width of the shared blocks' MLPs.
        projection_mlp_ratio: hidden width of the non-linear projections (official ``np_mlp_ratio``).
        qkv_bias: bias of the query/key/value projection.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout in the MLPs and after the attention projection.
        attn_drop_rate: dropout of the attention weights.
        drop_path_rate: stochastic depth of the shared blocks; as in the official code, shared
            block ``i`` of a stage starting at block ``k`` gets ``rate * (k + i) / total depth``.
        dynamic_img_size: resample the position embedding to each input's feature map (bicubic,
            on the fly) when it differs from ``img_size``; when False, inputs must be ``img_size``.
        random_slices: random slicing of the recursive passes in training (see
            :class:`SlicedGroupAttention`).
        device: where parameters and buffers are created (``'meta'`` allocates nothing; then
            ``to_empty()`` and :meth:`init_weights`).
        dtype: their floating-point type.
    """

    # What an exported graph of the model can take (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = True

    stem_pattern = r"^stem|^pos_embed"

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256),
        num_heads: Sequence[int] = (2, 4, 8),
        num_shared_blocks: Sequence[int] = (2, 5, 3),
        recursions: Union[int, Sequence[int]] = 2,
        num_groups: Sequence[int] = (8, 4, 1),
        recursive_num_groups: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 3.6,
        projection_mlp_ratio: float = 1.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = True,
        random_slices: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(embed_dims)
        recursions = (recursions,) * num_stages if isinstance(recursions, int) else tuple(recursions)
        per_stage = dict(
            num_heads=num_heads,
            num_shared_blocks=num_shared_blocks,
            recursions=recursions,
            num_groups=num_groups,
            recursive_num_groups=recursive_num_groups,
        )
        if any(len(value) != num_stages for value in per_stage.values()):
            lengths = ", ".join(f"{key}={len(value)}" for key, value in per_stage.items())
            raise ValueError(
                f"SReT: every per-stage argument needs {num_stages} entries (one per embed_dims), received {lengths}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.drop_rate = drop_rate

        self.stem = nn.Sequential(
            *[
                ConvNormAct(chs_in, chs_out, kernel_size=3, stride=2, padding=1, bias=True, act_layer=nn.ReLU, **dd)
                for chs_in, chs_out in (
                    (in_chans, embed_dims[0] // 2),
                    (embed_dims[0] // 2, embed_dims[0]),
                    (embed_dims[0], embed_dims[0]),
                )
            ]
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dims[0], *stem_grid(self.img_size), **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        depths = [blocks * loops for blocks, loops in zip(num_shared_blocks, recursions)]
        total_depth, first_block = sum(depths), 0
        stages: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        for i in range(num_stages):
            rates = [drop_path_rate * (first_block + j) / total_depth for j in range(num_shared_blocks[i])]
            first_block += depths[i]
            stages.append(
                RecursiveStage(
                    in_chs=embed_dims[max(i - 1, 0)],
                    dim=embed_dims[i],
                    num_heads=num_heads[i],
                    num_shared_blocks=num_shared_blocks[i],
                    recursions=recursions[i],
                    num_groups=num_groups[i],
                    recursive_num_groups=recursive_num_groups[i],
                    mlp_ratio=mlp_ratio,
                    projection_mlp_ratio=projection_mlp_ratio,
                    downsample=i > 0,
                    drop_path_rates=rates,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    random_slices=random_slices,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=_STEM_STRIDE * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.init_head(embed_dims[-1], num_classes, global_pool, drop_rate, **dd)
        # The official code keeps PyTorch's default initialisation except for the position embedding.
        trunc_normal_(self.pos_embed, std=0.02)

    def init_weights(self) -> None:
        """Initialise every parameter and buffer as at construction, e.g. after ``to_empty()`` of a model
        built on ``meta``: PyTorch's default for each layer (batch-norm statistics included), the
        scalar gains at one, the position embedding truncated normal (std 0.02), as the official code."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # The scalar gains, norms and biases are 1-D and excluded by timm's optimizer factory already.
        return {"pos_embed"}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the model when ``x`` is not an image batch it takes."""
        fixed_size = None if self.dynamic_img_size else self.img_size
        check_sret_input(x, next(self.parameters()), model_name(self), self.in_chans, self.total_stride, fixed_size)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Make ``img_size`` the model's input size, as timm's ViT does: the position embedding is
        resampled (bicubic) to the new feature grid and keeps its ``requires_grad``; a model built with
        ``dynamic_img_size=False`` then takes that size only. The slices follow the token count of
        each input, so the grouping needs no change."""
        if img_size is None:
            return
        self.img_size = to_2tuple(img_size)
        grid = stem_grid(self.img_size)
        if tuple(self.pos_embed.shape[-2:]) != grid:
            with torch.no_grad():
                resampled = resample_pos_embed(self.pos_embed, grid)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        update_model_input_size(self, self.img_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # The stem's convs run channels-last (faster in oneDNN, forward and backward), and the map then
        # becomes row-major tokens ``(B, H*W, C)`` as a view, without a copy.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        return self.pos_drop(x + resample_pos_embed(self.pos_embed, x.shape[-2:]))


def _official_key_map(model: SReT) -> Dict[str, str]:
    """Official key prefix -> this implementation's, for every module of ``model``.

    Official stage ``s`` lists its applications in order: ``blocks.{2u}`` is the shared block of
    application ``u`` (stored again for every application) and ``blocks.{2u + 1}`` its projection.
    """
    prefixes = {f"patch_embed.conv{i + 1}.": f"stem.{i}.conv." for i in range(3)}
    prefixes.update({f"patch_embed.bn{i + 1}.": f"stem.{i}.bn." for i in range(3)})
    for s, stage in enumerate(model.stages):
        if s > 0:
            prefixes[f"pools.{s - 1}.conv."] = f"stages.{s}.downsample."
        recursions = len(stage.blocks[0].projections)
        for u in range(len(stage.blocks) * recursions):
            ours = f"stages.{s}.blocks.{u // recursions}"
            prefixes[f"transformers.{s}.blocks.{2 * u}."] = f"{ours}.shared."
            prefixes[f"transformers.{s}.blocks.{2 * u + 1}."] = f"{ours}.projections.{u % recursions}."
    prefixes.update({"norm.": "head.norm.", "head.": "head.fc."})
    return prefixes


# Official names of the scalar gains and the projection's norm -> ours, by module kind.
_SHARED_RENAMES = {
    "coefficient1.bias": "attn_skip_gain",
    "coefficient2.bias": "attn_gain",
    "coefficient3.bias": "mlp_skip_gain",
    "coefficient4.bias": "mlp_gain",
}
_PROJECTION_RENAMES = {
    "coefficient1.bias": "skip_gain",
    "coefficient2.bias": "mlp_gain",
    "norm1.weight": "norm.weight",
    "norm1.bias": "norm.bias",
}
# An official key: the prefix of its module (a key of ``_official_key_map``), then the parameter's name.
_OFFICIAL_PREFIX = re.compile(
    r"^(patch_embed\.(?:conv|bn)\d\.|transformers\.\d+\.blocks\.\d+\.|pools\.\d+\.conv\.|norm\.|head\.)(.+)$"
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SReT) -> Dict[str, torch.Tensor]:
    """Convert an official SReT checkpoint (or a wrapped one) to this implementation's keys.

    A shared block, stored once per application, is taken from its first application. Checkpoints
    already in this layout pass through. A position embedding stored for another input size is
    resampled (bicubic, timm's ``resample_abs_pos_embed``) to the model's.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "stem.0.conv.weight" in state_dict:
        converted = dict(state_dict)
    else:
        prefixes = _official_key_map(model)
        converted = {}
        for key, value in state_dict.items():
            match = _OFFICIAL_PREFIX.match(key)
            if match is None or match.group(1) not in prefixes:
                converted[key] = value
                continue
            target, leaf = prefixes[match.group(1)], match.group(2)
            if target.endswith(".shared."):
                leaf = _SHARED_RENAMES.get(leaf, leaf)
            elif ".projections." in target:
                leaf = _PROJECTION_RENAMES.get(leaf, leaf)
            converted.setdefault(target + leaf, value)
    pos_embed = converted.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        converted["pos_embed"] = resample_pos_embed(pos_embed, model.pos_embed.shape[-2:])
    return converted


def _official_sret(
    image_size: int,
    base_dims: Sequence[int],
    depth: Sequence[int],
    recursive_num: Sequence[int],
    heads: Sequence[int],
    mlp_ratio: float,
    np_mlp_ratio: float,
    groups1: Optional[Sequence[int]] = None,
    groups2: Optional[Sequence[int]] = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    attn_drop_rate: float = 0.0,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    **unused: Any,  # patch_size and stride: the official stem ignores them
) -> SReT:
    """The official ``SReT.SReT`` arguments mapped onto :class:`SReT`."""
    ones = [1] * len(depth)
    return SReT(
        img_size=image_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dims=[dim * head for dim, head in zip(base_dims, heads)],
        num_heads=heads,
        num_shared_blocks=recursive_num,
        recursions=[d // r for d, r in zip(depth, recursive_num)],
        num_groups=groups1 or ones,
        recursive_num_groups=groups2 or ones,
        mlp_ratio=mlp_ratio,
        projection_mlp_ratio=np_mlp_ratio,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        drop_path_rate=drop_path_rate,
    )


def _official_sret_without_slices(drop_path_rate: float = 0.0, **kwargs: Any) -> SReT:
    """The official ``SReT_wo_slice.RecursiveTransformer`` arguments: SReT with one group everywhere."""
    return _official_sret(drop_path_rate=drop_path_rate, **kwargs)


register_official("SReT.SReT", family="sret", checkpoint_filter_fn=checkpoint_filter_fn)(_official_sret)
register_official("SReT_wo_slice.RecursiveTransformer", family="sret", checkpoint_filter_fn=checkpoint_filter_fn)(
    _official_sret_without_slices
)


def _create_sret(variant: str, pretrained: bool = False, **kwargs: Any) -> SReT:
    pretrained_cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    # The fine-tuned tags are stored for 384 and 512 inputs: their position embedding is built at that size.
    kwargs.setdefault("img_size", pretrained_cfg.input_size[-2:])
    return build_with_weights(
        SReT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2), feature_cls="getter"),
        **kwargs,
    )


def _drive(file_id: str) -> Tuple[str, str]:
    """A Google Drive download and the cache file name timm stores it under.

    Every Drive link ends in the same path (``uc``), which timm would otherwise take as the file name.
    """
    return f"https://drive.google.com/uc?export=download&confirm=t&id={file_id}", f"sret_{file_id}.pth"


# timm's pretrained cfg of an ImageNet classifier (imagenet_cfg), with what every weight of the family shares.
_cfg = partial(
    imagenet_cfg,
    first_conv="stem.0.conv",
    license="mit",
    paper_ids="arXiv:2111.05297",
    paper_name="Sliced Recursive Transformer",
    origin_url="https://github.com/szq0214/SReT",
)


default_cfgs = generate_default_cfgs(
    {
        "sret_tiny.in1k": _cfg(url=_drive("1FDTpva6y-I_bKmyVmLFDn_3BlDq3dwni")),
        "sret_tiny.distill_in1k": _cfg(url=_drive("1xzG4VQyQyxWJfQTcGCE-fuMuK3BwPCjK")),
        "sret_tiny_lt.in1k": _cfg(url=_drive("1uSWvoVLHmOH6rNYiXSxD_rlN5dSBvEm3")),
        "sret_tiny_lt.distill_in1k": _cfg(url=_drive("1l6u0q4kwli5czEyo4TeJANtqsulh-J5G")),
        "sret_small.in1k": _cfg(url=_drive("1y6F_bCgS1sagm7pxjAtuSPUB5HoNb8Ed")),
        "sret_tiny_noslice.in1k": _cfg(url=_drive("1wHM7NRSkz-WykCSES17xFV56h_m5RMXj")),
        "sret_tiny_noslice.distill_in1k": _cfg(url=_drive("1P1qK-j1Cac5le8-DNUFBbjmIpRThuiVp")),
        "sret_tiny_noslice.distill_in1k_384": _cfg(
            url=_drive("11mWAktu6LrNa0Qt61WJGA0eTWoKYD1Be"), **imagenet_cfg_at(384)
        ),
        "sret_tiny_lt_noslice.in1k": _cfg(url=_drive("1EXwfiMMa1UVQ_tmY6YQJ-Se0b3bW5NpC")),
        "sret_tiny_lt_noslice.distill_in1k": _cfg(url=_drive("1FDqkfkw5nZEuTcBmiBKg3lvPJOPQWS6i")),
        "sret_small_noslice.in1k": _cfg(url=_drive("1vlsxJieKhfnw-F6xFiwczvXBuk7ugXxm")),
        "sret_small_noslice.distill_in1k_384": _cfg(
            url=_drive("1z5whJpXbbtFdjLpS1pCPvKcJhVnYCeo-"), **imagenet_cfg_at(384)
        ),
        "sret_small_noslice.distill_in1k_512": _cfg(
            url=_drive("1AZXIGMiGboI-nkoKuPnHnhDlBwZumuiB"), **imagenet_cfg_at(512)
        ),
    }
)


def _sret_args(size: str, sliced: bool) -> Dict[str, Any]:
    """The official architectures: 2-5-3 shared blocks applied twice; T/LT 64-128-256 wide, S 126-252-504."""
    if size == "small":
        args = dict(embed_dims=(126, 252, 504), num_heads=(3, 6, 12), mlp_ratio=3.0, projection_mlp_ratio=2.0)
    else:
        args = dict(
            embed_dims=(64, 128, 256),
            num_heads=(2, 4, 8),
            mlp_ratio=4.0 if size == "tiny_lt" else 3.6,
            projection_mlp_ratio=1.0,
        )
    groups = (
        dict(num_groups=(8, 4, 1), recursive_num_groups=(2, 1, 1))
        if sliced
        else dict(num_groups=(1, 1, 1), recursive_num_groups=(1, 1, 1))
    )
    return dict(num_shared_blocks=(2, 5, 3), recursions=2, **groups, **args)


@register_model
def sret_tiny(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-T: width 64-128-256, slices 8-4-1 (first passes) and 2-1-1 (recursive passes)."""
    return _create_sret("sret_tiny", pretrained, **dict(_sret_args("tiny", sliced=True), **kwargs))


@register_model
def sret_tiny_lt(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-LT: SReT-T with MLP ratio 4."""
    return _create_sret("sret_tiny_lt", pretrained, **dict(_sret_args("tiny_lt", sliced=True), **kwargs))


@register_model
def sret_small(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-S: width 126-252-504, 3-6-12 heads, MLP ratio 3, projection ratio 2."""
    return _create_sret("sret_small", pretrained, **dict(_sret_args("small", sliced=True), **kwargs))


@register_model
def sret_tiny_noslice(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-T without slicing: full attention in every pass."""
    return _create_sret("sret_tiny_noslice", pretrained, **dict(_sret_args("tiny", sliced=False), **kwargs))


@register_model
def sret_tiny_lt_noslice(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-LT without slicing."""
    return _create_sret("sret_tiny_lt_noslice", pretrained, **dict(_sret_args("tiny_lt", sliced=False), **kwargs))


@register_model
def sret_small_noslice(pretrained: bool = False, **kwargs: Any) -> SReT:
    """SReT-S without slicing."""
    return _create_sret("sret_small_noslice", pretrained, **dict(_sret_args("small", sliced=False), **kwargs))
