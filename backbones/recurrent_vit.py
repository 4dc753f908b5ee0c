"""Recurrent ViT: a Vision Transformer whose depth is run by a few shared blocks applied recurrently.

Papers: "Block-Recurrent Dynamics in Vision Transformers", Jacobs, Fel, Hakim, Brondetta, Ba and
Keller, 2025 (https://arxiv.org/abs/2512.19941; code https://github.com/KempnerInstitute/raptor, MIT
license), and "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA",
Bae et al., 2024 (https://arxiv.org/abs/2410.20672).

Raptor shows that the ``L`` blocks of a trained ViT fall into ``k << L`` contiguous phases whose
blocks act alike, so that each phase can be rewritten as one block applied recurrently. This module
builds such a model from timm's own ViT parts (``PatchEmbed``, class/register tokens, position
embedding, ``vision_transformer.Block`` with fused attention): ``depth`` steps are executed by
``k`` shared blocks along a contiguous phase schedule, e.g. ``phases=[6, 6]``. Two optional
relaxations of the weight tying:

* depth conditioning (Raptor): each shared block receives the normalized step ``t = (step + 1) /
  depth`` (Raptor feeds the integer layer index) and scales its attention residual, MLP residual and
  output by ``1 + f(t)``, with ``f`` a small MLP whose last layer starts at zero (the identity);
* relaxed recursion (Bae et al.): a per-step LoRA of rank ``r`` on the shared block's ``qkv``,
  ``proj``, ``fc1`` and ``fc2`` weights, its up-projection zero-initialized.

``from_vit`` turns any timm ``VisionTransformer`` into this model for a given phase schedule, and
``find_phases`` finds the schedule from the layer-by-layer similarity of a trained ViT's tokens.
Distillation from a ViT teacher is ``python -m recurzoo.train.distill_recurrent``.

The registered names follow timm's naming of ViT variants (``vit_recurrent_small_patch16_224``,
like ``vit_relpos_small_patch16_224``); the first names, ``rvit_*``, still build them with a
deprecation warning.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (
    LayerNorm,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    drop_path,
    get_act_layer,
    get_device_dtype,
    get_norm_layer,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import checkpoint, generate_default_cfgs, named_apply, register_model, register_model_deprecations
from timm.models._input import update_model_input_size  # ditto: keeps resolve_data_config's size current
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc, init_weights_vit_timm
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn
from torch.func import functional_call
from torch.fx.node import has_side_effect

from recurzoo.backbones._helpers import (
    FusedGeluMlp,
    IntermediatesMixin,
    build_with_weights,
    check_image_input,
    model_name,
)
from recurzoo.checkpoint import unwrap_state_dict

__all__ = [
    "RecurrentViT",
    "RecurrentBlock",
    "DepthScale",
    "StepLoRA",
    "UnsupportedPoolError",
    "from_vit",
    "find_phases",
    "PhaseSplit",
    "layer_similarity",
    "segment_phases",
    "even_phases",
    "vit_step_tokens",
]


_LORA_TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))
_SOURCE_BLOCK_CHOICES = ("first", "middle", "last")
_POOL_TYPES = ("", "token", "avg", "avgmax", "max")


def even_phases(depth: int, num_unique_blocks: int) -> List[int]:
    """Split ``depth`` steps into ``num_unique_blocks`` contiguous phases as evenly as possible.

    Earlier phases take the remainder, e.g. ``even_phases(12, 5) == [3, 3, 2, 2, 2]``.
    """
    base, extra = divmod(depth, num_unique_blocks)
    return [base + (1 if i < extra else 0) for i in range(num_unique_blocks)]


def resolve_phases(
    depth: int,
    num_unique_blocks: Optional[int] = None,
    phases: Optional[Sequence[int]] = None,
    name: str = "RecurrentViT",
) -> List[int]:
    """The phase lengths for ``depth`` steps: ``phases`` checked, or derived evenly from ``num_unique_blocks``."""
    if phases is None:
        if num_unique_blocks is None or not 1 <= num_unique_blocks <= depth:
            raise ValueError(
                f"{name}: num_unique_blocks must be between 1 and depth={depth}, received {num_unique_blocks}"
            )
        return even_phases(depth, num_unique_blocks)
    phases = [int(p) for p in phases]
    if not phases or min(phases) < 1 or sum(phases) != depth:
        raise ValueError(f"{name}: phases must be positive lengths summing to depth={depth}, received {phases}")
    if num_unique_blocks is not None and num_unique_blocks != len(phases):
        raise ValueError(
            f"{name}: num_unique_blocks={num_unique_blocks} disagrees with the {len(phases)} phases {phases}"
        )
    return phases


def phase_starts(phases: Sequence[int]) -> List[int]:
    """The step at which each phase begins, e.g. ``[0, 6]`` for ``[6, 6]``."""
    starts, position = [], 0
    for length in phases:
        starts.append(position)
        position += length
    return starts


def source_step(start: int, length: int, choice: str = "middle") -> int:
    """Which block of an untied ViT a phase's shared block is copied from.

    ``first`` and ``last`` are the phase's ends; ``middle`` is block ``start + (length - 1) // 2``.
    """
    if choice not in _SOURCE_BLOCK_CHOICES:
        raise ValueError(f"source block must be one of {_SOURCE_BLOCK_CHOICES}, received {choice!r}")
    offset = {"first": 0, "middle": (length - 1) // 2, "last": length - 1}[choice]
    return start + offset


class UnsupportedPoolError(ValueError, AssertionError):
    """A ``global_pool`` the model cannot take. A ``ValueError``, and an ``AssertionError`` as well because
    timm's models assert their pool type and timm's tests (and callers) expect that (cf. numpy's
    ``AxisError``, both a ``ValueError`` and an ``IndexError``)."""


def _check_pool(name: str, global_pool: str, has_class_token: bool) -> None:
    if global_pool not in _POOL_TYPES:
        raise UnsupportedPoolError(
            f"{name}: global_pool must be '', 'token', 'avg', 'avgmax' or 'max', received {global_pool!r}"
        )
    if global_pool == "token" and not has_class_token:
        raise UnsupportedPoolError(f"{name}: global_pool='token' needs a class token (class_token=True)")


def step_node_name(block_index: int, step_in_phase: int) -> str:
    """The name torch.fx (torchvision's feature extraction) gives a step's call of its shared block.

    A shared block is one module called once per step of its phase; the tracer names the first
    call ``blocks.j`` and the later ones ``blocks.j_1``, ``blocks.j_2``, ...
    """
    return f"blocks.{block_index}" if step_in_phase == 0 else f"blocks.{block_index}_{step_in_phase}"


class DepthScale(nn.Module):
    """Raptor's depth conditioning: three per-channel scales ``1 + f(t)`` of the normalized step ``t``.

    ``f`` is an MLP ``1 -> hidden -> 3 * dim`` (SiLU) whose last layer starts at zero, so the scales
    start at exactly one; they multiply the attention residual, the MLP residual and the block output.
    """

    def __init__(self, dim: int, hidden: int = 16, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = Mlp(
            in_features=1, hidden_features=hidden, out_features=3 * dim, act_layer=nn.SiLU, device=device, dtype=dtype
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.mlp.fc1.reset_parameters()
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scales for attention residual, MLP residual and output, each ``(dim,)``, from ``t`` of shape ``(1,)``."""
        scales = 1.0 + self.mlp(t).view(3, self.dim)
        return scales[0], scales[1], scales[2]


class StepLoRA(nn.Module):
    """Per-step low-rank updates of one linear layer: at step ``s`` its weight is ``W + up[s] @ down[s]``.

    ``down`` is drawn uniformly in ``+-1/sqrt(in_features)`` and ``up`` starts at zero, so every step
    starts with the shared weight and both factors receive gradients.
    """

    def __init__(self, in_features: int, out_features: int, num_steps: int, rank: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(num_steps, rank, in_features, **dd))
        self.up = nn.Parameter(torch.empty(num_steps, out_features, rank, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.down.shape[-1])
        nn.init.uniform_(self.down, -bound, bound)
        nn.init.zeros_(self.up)

    def delta(self, step: int) -> torch.Tensor:
        """The weight update ``(out_features, in_features)`` of ``step``."""
        return self.up[step] @ self.down[step]


# Traced as one call per step, so each step is a node of its own (``step_node_name``) and the
# per-step LoRA's functional_call stays out of the symbolic trace.
@register_notrace_module
class RecurrentBlock(nn.Module):
    """A timm ViT ``Block`` shared by the consecutive steps of one phase.

    The block's own parts (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) are adopted, so
    their parameter names match the untied ViT's. Stochastic depth is applied per step with the
    rate of that step. Depth conditioning and per-step LoRA are optional.

    Args:
        block: the timm ``Block`` (pre-norm attention and MLP residuals) whose parts compute each step.
        step_indices: the global step index (0-based) of each step of the phase.
        depth: total steps of the model, to normalize the step for the depth conditioning.
        drop_path_rates: stochastic-depth rate of each step of the phase.
        depth_conditioning: scale residuals and output by ``1 + f(t)`` (Raptor).
        depth_hidden: hidden width of ``f``.
        lora_rank: rank of the per-step LoRA (0 for none).
        device: where the step parameters and buffers are created (``block`` is adopted as it is).
        dtype: their floating-point type.
    """

    def __init__(
        self,
        block: nn.Module,
        step_indices: Sequence[int],
        depth: int,
        drop_path_rates: Optional[Sequence[float]] = None,
        depth_conditioning: bool = False,
        depth_hidden: int = 16,
        lora_rank: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        for part in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"):
            if not hasattr(block, part):
                raise ValueError(
                    f"RecurrentBlock: needs a pre-norm ViT block with `{part}`, received {type(block).__name__}"
                )
            setattr(self, part, getattr(block, part))
        self.step_indices = [int(index) for index in step_indices]
        self.depth = depth
        self.num_steps = len(self.step_indices)
        self.drop_path_rates = [float(r) for r in (drop_path_rates or [0.0] * self.num_steps)]
        if len(self.drop_path_rates) != self.num_steps:
            raise ValueError(
                f"RecurrentBlock: needs one drop-path rate per step ({self.num_steps}), "
                f"received {len(self.drop_path_rates)}"
            )
        self.register_buffer("step_times", torch.empty(self.num_steps, 1, **dd), persistent=False)
        dim = self.attn.qkv.in_features
        self.depth_scale = DepthScale(dim=dim, hidden=depth_hidden, **dd) if depth_conditioning else None
        self.lora = None
        if lora_rank:
            targets = {}
            for parent, name in _LORA_TARGETS:
                layer = getattr(getattr(self, parent), name, None)
                if isinstance(layer, nn.Linear):
                    targets[name] = StepLoRA(
                        in_features=layer.in_features,
                        out_features=layer.out_features,
                        num_steps=self.num_steps,
                        rank=lora_rank,
                        **dd,
                    )
            if not targets:
                raise ValueError("RecurrentBlock: lora_rank > 0 needs linear qkv, proj, fc1 or fc2 layers")
            self.lora = nn.ModuleDict(targets)
        self.init_weights()

    def init_weights(self) -> None:
        """Fill the ``step_times`` buffer, ``(step + 1) / depth`` per step: derived from the schedule and
        never saved, it is lost by ``to_empty`` (the block's parts initialize themselves)."""
        with torch.no_grad():
            times = torch.tensor(self.step_indices, device=self.step_times.device, dtype=torch.float32)
            self.step_times.copy_(((times + 1.0) / self.depth).unsqueeze(-1))

    def reset_step_parameters(self) -> None:
        """Return depth conditioning and LoRA to their initial state (identity, zero update)."""
        if self.depth_scale is not None:
            self.depth_scale.reset_parameters()
        if self.lora is not None:
            for lora in self.lora.values():
                lora.reset_parameters()

    def _sublayer(self, parent: str, x: torch.Tensor, step: int) -> torch.Tensor:
        """``self.attn(x)`` or ``self.mlp(x)`` with this step's LoRA updates merged into their linear weights."""
        module = getattr(self, parent)
        if self.lora is None:
            return module(x)
        weights = {
            f"{name}.weight": getattr(module, name).weight + self.lora[name].delta(step)
            for owner, name in _LORA_TARGETS
            if owner == parent and name in self.lora
        }
        return functional_call(module, weights, (x,)) if weights else module(x)

    def _drop_path(self, x: torch.Tensor, step: int) -> torch.Tensor:
        rate = self.drop_path_rates[step]
        return drop_path(x, rate, self.training) if rate > 0.0 and self.training else x

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Apply the block for step ``step`` of its phase (0-based) to tokens ``(B, N, C)``."""
        attn_out = self.ls1(self._sublayer("attn", self.norm1(x), step))
        if self.depth_scale is None:
            x = x + self._drop_path(attn_out, step)
            return x + self._drop_path(self.ls2(self._sublayer("mlp", self.norm2(x), step)), step)
        attn_scale, mlp_scale, out_scale = self.depth_scale(self.step_times[step])
        x = x + self._drop_path(attn_scale * attn_out, step)
        x = x + self._drop_path(mlp_scale * self.ls2(self._sublayer("mlp", self.norm2(x), step)), step)
        return out_scale * x


# torch.fx records this call instead of tracing it and keeps it in the graph (it returns nothing),
# so a traced model checks its real input too.
@has_side_effect
@register_notrace_function
def check_patch_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    name: str,
    in_chans: int,
    patch_size: Tuple[int, int],
    dynamic_pad: bool,
    fixed_size: Optional[Tuple[int, int]],
) -> None:
    """Raise a ``ValueError`` naming the model when ``x`` is not an image batch its patch embedding takes.

    ``weight`` is one of the model's parameters: the input must have its dtype (outside autocast).
    Sides must be at least a patch, multiples of a square patch unless ``dynamic_pad``, and equal to
    ``fixed_size`` when it is given (a model built without ``dynamic_img_size``).
    """
    check_image_input(
        x,
        name,
        in_chans,
        min_size=max(patch_size),
        multiple_of=None if dynamic_pad or patch_size[0] != patch_size[1] else patch_size[0],
        dtype=weight.dtype,
    )
    if (
        fixed_size is not None
        and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        and tuple(x.shape[-2:]) != tuple(fixed_size)
    ):
        raise ValueError(
            f"{name}: expects {fixed_size[0]}x{fixed_size[1]} images (create it with dynamic_img_size=True or "
            f"img_size=... for others), received shape {tuple(x.shape)}"
        )


class RecurrentViT(IntermediatesMixin, nn.Module):
    """Vision Transformer whose ``depth`` steps are run by ``k`` shared blocks along contiguous phases.

    Embeddings, tokens, norms and head are timm's ViT parts with the same names and meaning as in
    ``timm.models.vision_transformer.VisionTransformer``; ``blocks`` holds the ``k`` shared blocks.
    ``feature_info`` has one entry per step (the tokens after it, at stride ``patch_size``); its
    ``module`` is the name torch.fx gives that step's call of its shared block (``step_node_name``),
    so ``features_only=True, feature_cls='fx'`` returns each step's tokens.

    Args:
        img_size: input image size.
        patch_size: patch size (the feature stride).
        in_chans: input channels.
        num_classes: classifier outputs (0 for none).
        global_pool: ``'token'``, ``'avg'``, ``'avgmax'``, ``'max'`` or ``''``.
        embed_dim: token width.
        depth: number of recurrent steps (the depth of the untied ViT).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        qkv_bias: bias on the qkv projection.
        qk_norm: normalize queries and keys.
        init_values: layer-scale initial value (``None`` for no layer scale).
        class_token: use a class token.
        reg_tokens: number of register tokens.
        no_embed_class: position embedding only on patch tokens.
        pre_norm: norm after the embedding.
        final_norm: norm after the last step.
        fc_norm: norm after pooling instead of before (default: with average-type pooling).
        dynamic_img_size: accept any input size, resampling the position embedding.
        dynamic_img_pad: pad inputs to a multiple of the patch size.
        num_unique_blocks: ``k``, the number of shared blocks (ignored when ``phases`` is given).
        phases: steps executed by each shared block, in order; they sum to ``depth``.
        depth_conditioning: Raptor's step-dependent residual and output scales (start at identity).
        depth_hidden: hidden width of the depth-conditioning MLP.
        lora_rank: rank of a per-step LoRA on qkv, proj, fc1 and fc2 (0 for none; starts at zero).
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after the position embedding.
        proj_drop_rate: dropout after the attention and MLP projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, rising linearly over the steps.
        norm_layer: normalization layer (timm ``LayerNorm``, eps 1e-6, by default).
        act_layer: MLP activation (GELU by default).
        device: where parameters and buffers are created (``'meta'`` allocates nothing; then
            ``to_empty`` and ``init_weights()``).
        dtype: their floating-point type.
    """

    # What an exported graph of the model can take (recurzoo.export reads these, the model cards show them).
    export_dynamic_batch = True
    export_dynamic_size = True
    intermediate_formats = ("NCHW", "NLC")

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        num_unique_blocks: Optional[int] = 2,
        phases: Optional[Sequence[int]] = None,
        depth_conditioning: bool = False,
        depth_hidden: int = 16,
        lora_rank: int = 0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Optional[Any] = None,
        act_layer: Optional[Any] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_pool("RecurrentViT", global_pool, class_token)
        phases = resolve_phases(depth, None if phases is not None else num_unique_blocks, phases)
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = False
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        embed_args: Dict[str, Any] = {}
        if dynamic_img_size:
            embed_args.update(strict_img_size=False, output_fmt="NHWC")
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not pre_norm,
            dynamic_img_pad=dynamic_img_pad,
            **embed_args,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = norm_layer(embed_dim, **dd) if pre_norm else nn.Identity()

        step_drop_rates = calculate_drop_path_rates(drop_path_rate, depth)
        blocks = []
        for start, length in zip(phase_starts(phases), phases):
            block = Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                init_values=init_values,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                norm_layer=norm_layer,
                act_layer=act_layer,
                mlp_layer=FusedGeluMlp,
                **dd,
            )
            blocks.append(
                RecurrentBlock(
                    block=block,
                    step_indices=range(start, start + length),
                    depth=depth,
                    drop_path_rates=step_drop_rates[start : start + length],
                    depth_conditioning=depth_conditioning,
                    depth_hidden=depth_hidden,
                    lora_rank=lora_rank,
                    **dd,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.depth = depth
        self._set_schedule(phases)
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module=step_node_name(j, s), num_chs=embed_dim, reduction=reduction) for j, s in self.schedule
        ]

        self.norm = norm_layer(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None  # an attention pool (global_pool 'map') is only taken over by from_vit
        self.fc_norm = norm_layer(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def _set_schedule(self, phases: Sequence[int]) -> None:
        """Record the phases and, per step, (shared block index, step within its phase)."""
        self.phases = list(phases)
        self.schedule: List[Tuple[int, int]] = [(j, s) for j, length in enumerate(self.phases) for s in range(length)]

    def init_weights(self) -> None:
        """timm's ViT initialization: position embedding and linear layers truncated normal (std 0.02),
        tokens normal (std 1e-6), every other layer reset; the step parameters at their identity start
        and the step-time buffers recomputed (all of it, as after ``to_empty``)."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)  # each layer its own init_weights or reset_parameters

    @property
    def num_unique_blocks(self) -> int:
        return len(self.blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head of ``num_classes`` outputs (0 for none) on the model's device and dtype; the
        pooling changes only when ``global_pool`` is given (an attention pool is then dropped)."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            _check_pool(model_name(self), global_pool, self.has_class_token)
            self.attn_pool = None
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def set_input_size(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Resize the model as timm's ViT does: the patch embedding (resampled for a new ``patch_size``)
        and the position embedding (resampled to the new grid) follow; frozen parameters stay frozen."""
        previous_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed is not None:
            num_prefix_tokens = 0 if self.no_embed_class else self.num_prefix_tokens
            num_tokens = self.patch_embed.num_patches + num_prefix_tokens
            if num_tokens != self.pos_embed.shape[1] or self.patch_embed.grid_size != previous_grid:
                with torch.no_grad():
                    resampled = resample_abs_pos_embed(
                        self.pos_embed,
                        new_size=self.patch_embed.grid_size,
                        old_size=previous_grid,
                        num_prefix_tokens=num_prefix_tokens,
                    )
                self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        for info in self.feature_info:
            info["reduction"] = self.patch_embed.feat_ratio()
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the model when ``x`` is not an image batch it takes."""
        patch_embed = self.patch_embed
        check_patch_input(
            x,
            next(self.parameters()),
            model_name(self),
            self.in_chans,
            tuple(patch_embed.patch_size),
            getattr(patch_embed, "dynamic_img_pad", False),
            tuple(patch_embed.img_size) if getattr(patch_embed, "strict_img_size", False) else None,
        )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix tokens and position embedding (resampled to the input's grid with ``dynamic_img_size``)."""
        pos_embed = self.pos_embed
        if self.dynamic_img_size:  # patch tokens arrive as (B, H, W, C)
            # timm resamples unconditionally under torch.export (for symbolic sizes); at the grid's own
            # static size that is the identity, and its antialiased bicubic operator is not in
            # ExecuTorch's core ATen opset. A traced ONNX graph (dynamic height/width) keeps it.
            grid = x.shape[1:3]
            static_same_grid = (
                not torch.jit.is_tracing()
                and isinstance(grid, torch.Size)  # not a torch.fx proxy
                and all(isinstance(side, int) for side in grid)
                and tuple(grid) == tuple(self.patch_embed.grid_size)
            )
            if pos_embed is not None and not static_same_grid:
                pos_embed = resample_abs_pos_embed(
                    pos_embed,
                    new_size=x.shape[1:3],
                    old_size=self.patch_embed.grid_size,
                    num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                )
            x = x.flatten(1, 2)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if pos_embed is not None and self.no_embed_class:
            x = x + pos_embed
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        if pos_embed is not None and not self.no_embed_class:
            x = x + pos_embed
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> the tokens entering step 0, ``(B, prefix + patches, C)`` (unchecked)."""
        x = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`embed` of a checked input."""
        self.check_input(x)
        return self.embed(x)

    def forward_step(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Apply global step ``step`` (its shared block, with that step's conditioning) to tokens ``x``."""
        block_index, step_in_phase = self.schedule[step]
        block = self.blocks[block_index]
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(block, x, step_in_phase)
        return block(x, step_in_phase)

    # The hooks of IntermediatesMixin: the steps are the recurrent steps, their tokens the intermediates
    # (``norm`` applies the final norm to each, as timm's ViT does).
    run_step = forward_step

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    def intermediate(self, x: torch.Tensor, index: int, norm: bool) -> torch.Tensor:
        return self.norm(x) if norm else x

    def end_steps(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        return self.norm(x)

    def format_intermediates(
        self, intermediates: List[torch.Tensor], x: torch.Tensor, output_fmt: str, return_prefix_tokens: bool = False
    ) -> List[Any]:
        """As timm's ViT: ``NCHW``, the patch tokens as a map at stride ``patch_size``; ``NLC``, the
        patch-token sequence; with ``return_prefix_tokens`` (and prefix tokens) ``(patch, prefix)`` pairs."""
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            intermediates = [y.reshape(x.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2) for y in intermediates]
        if return_prefix_tokens and self.num_prefix_tokens:
            return list(zip(intermediates, prefix_tokens))
        return intermediates

    def keep_steps(self, count: int, prune_norm: bool, prune_head: bool) -> None:
        """Keep the first ``count`` steps and the shared blocks they use; norm and head as timm's ViT."""
        kept = self.schedule[:count]
        num_blocks = kept[-1][0] + 1
        self.blocks = self.blocks[:num_blocks]
        self._set_schedule([sum(1 for j, _ in kept if j == block) for block in range(num_blocks)])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """Run the steps, returning the tokens after each step in ``indices`` (all steps by default),
        as timm's ``VisionTransformer.forward_intermediates`` (see :meth:`format_intermediates`)."""
        return self.run_intermediates(
            x, indices, norm, stop_early, output_fmt, intermediates_only, return_prefix_tokens=return_prefix_tokens
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalized tokens ``(B, prefix + patches, C)`` after the last step."""
        x = self.embed_tokens(x)
        for step in range(len(self.schedule)):
            x = self.forward_step(x, step)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens :])
        return global_pool_nlc(
            x,
            pool_type=self.global_pool if pool_type is None else pool_type,
            num_prefix_tokens=self.num_prefix_tokens,
            reduce_include_prefix=self.pool_include_prefix,
        )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------
# Conversion from an untied ViT
# --------------------------------------------------------------------------------------------------


def _drop_path_rate(block: nn.Module) -> float:
    module = getattr(block, "drop_path1", None)
    return float(getattr(module, "drop_prob", 0.0) or 0.0)


def _lora_from_svd(model: RecurrentViT, vit: VisionTransformer, rank: int) -> None:
    """Start each step's LoRA at the rank-``rank`` SVD of (that step's ViT weight - the shared weight)."""
    with torch.no_grad():
        for block, start in zip(model.blocks, phase_starts(model.phases)):
            if block.lora is None:
                continue
            for parent, name in _LORA_TARGETS:
                if name not in block.lora:
                    continue
                shared = getattr(getattr(block, parent), name).weight
                lora = block.lora[name]
                for step in range(block.num_steps):
                    target = getattr(getattr(vit.blocks[start + step], parent), name).weight
                    residual = (target - shared).float()
                    if residual.abs().max() == 0:
                        continue  # the source step itself: keep the zero-update initialization
                    left, singular, right = torch.linalg.svd(residual, full_matrices=False)
                    root = singular[:rank].sqrt()
                    lora.up[step].copy_(left[:, :rank] * root)
                    lora.down[step].copy_(root[:, None] * right[:rank])


def from_vit(
    vit: VisionTransformer,
    phases: Sequence[int],
    depth_conditioning: bool = False,
    lora_rank: int = 0,
    lora_init: str = "zero",
    source_block: str = "middle",
    depth_hidden: int = 16,
) -> RecurrentViT:
    """Rewrite a timm ``VisionTransformer`` as a :class:`RecurrentViT` with the given phase schedule.

    Each phase's shared block is a copy of one block of that phase: by default its middle block
    (index ``start + (length - 1) // 2``; ``source_block='first'`` or ``'last'`` pick the ends).
    Patch embedding, class/register tokens, position embedding, norms, pooling and head are copied.
    With ``phases=[1] * depth`` and neither conditioning nor LoRA the result computes the ViT exactly.
    The result is on the ViT's device and dtype, in its training mode.

    Args:
        vit: the source model; its blocks must be timm's pre-norm ``Block``.
        phases: steps per shared block, summing to the ViT's depth.
        depth_conditioning: add Raptor's depth conditioning (starts at the identity).
        lora_rank: rank of per-step LoRA (0 for none).
        lora_init: ``'zero'`` (every step starts at the shared weights) or ``'svd'`` (each step starts
            at the rank-``lora_rank`` approximation of its own ViT weights, as in Relaxed Recursive
            Transformers).
        source_block: ``'first'``, ``'middle'`` or ``'last'`` block of each phase.
        depth_hidden: hidden width of the depth-conditioning MLP.
    """
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"from_vit: expects a timm VisionTransformer, received {type(vit).__name__}")
    depth = len(vit.blocks)
    phases = resolve_phases(depth, None, phases, name="from_vit")
    if lora_init not in ("zero", "svd"):
        raise ValueError(f"from_vit: lora_init must be 'zero' or 'svd', received {lora_init!r}")
    for index, block in enumerate(vit.blocks):
        if not isinstance(block, Block):
            raise ValueError(
                f"from_vit: block {index} is a {type(block).__name__}; only timm's pre-norm "
                "vision_transformer.Block can be shared"
            )

    dd = get_device_dtype(vit)
    patch_embed = vit.patch_embed
    model = RecurrentViT(
        img_size=patch_embed.img_size or 224,
        patch_size=patch_embed.patch_size,
        in_chans=vit.in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=vit.embed_dim,
        depth=depth,
        num_heads=vit.blocks[0].attn.num_heads,
        class_token=vit.has_class_token,
        reg_tokens=vit.num_reg_tokens,
        no_embed_class=vit.no_embed_class,
        phases=phases,
        dynamic_img_size=vit.dynamic_img_size,
        **dd,
    )
    for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre", "norm", "fc_norm", "head_drop", "head"):
        setattr(model, name, copy.deepcopy(getattr(vit, name)))
    for name in ("cls_token", "reg_token", "pos_embed"):
        value = getattr(vit, name)
        setattr(
            model,
            name,
            None if value is None else nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad),
        )
    model.attn_pool = copy.deepcopy(vit.attn_pool)
    model.global_pool = vit.global_pool
    model.pool_include_prefix = vit.pool_include_prefix
    model.num_classes = vit.num_classes
    model.num_features = vit.num_features
    model.head_hidden_size = getattr(vit, "head_hidden_size", vit.num_features)

    blocks = []
    for start, length in zip(phase_starts(phases), phases):
        blocks.append(
            RecurrentBlock(
                block=copy.deepcopy(vit.blocks[source_step(start, length, source_block)]),
                step_indices=range(start, start + length),
                depth=depth,
                drop_path_rates=[_drop_path_rate(vit.blocks[i]) for i in range(start, start + length)],
                depth_conditioning=depth_conditioning,
                depth_hidden=depth_hidden,
                lora_rank=lora_rank,
                **dd,
            )
        )
    model.blocks = nn.ModuleList(blocks)
    if lora_rank and lora_init == "svd":
        _lora_from_svd(model, vit, lora_rank)
    return model.train(vit.training)


# --------------------------------------------------------------------------------------------------
# Phase discovery
# --------------------------------------------------------------------------------------------------


def vit_step_tokens(vit: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Tokens of a timm ViT (or a RecurrentViT) at the entry of step 0 and after each step.

    Returns ``depth + 1`` tensors ``(B, N, C)`` (prefix tokens included, before the final norm). A
    timm ViT runs its own ``forward_features``; hooks on its blocks read their input and outputs.
    """
    if isinstance(vit, RecurrentViT):
        tokens = [vit.embed_tokens(images)]
        for step in range(len(vit.schedule)):
            tokens.append(vit.forward_step(tokens[-1], step))
        return tokens
    tokens: List[torch.Tensor] = []
    hooks = [vit.blocks[0].register_forward_pre_hook(lambda block, args: tokens.append(args[0]))]
    hooks += [block.register_forward_hook(lambda block, args, output: tokens.append(output)) for block in vit.blocks]
    try:
        vit.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens


@torch.no_grad()
def layer_similarity(vit: nn.Module, images: Union[torch.Tensor, Iterable[Any]]) -> torch.Tensor:
    """``(L, L)`` mean cosine similarity between the tokens output by every pair of the ViT's blocks.

    Entry ``(i, j)`` averages, over images and token positions (prefix tokens included), the cosine
    similarity of a token after block ``i`` with the same token after block ``j``. ``images`` is a
    batch ``(B, C, H, W)`` or an iterable of batches (or of ``(images, labels)`` pairs).
    """
    was_training = vit.training
    vit.eval()
    batches = [images] if isinstance(images, torch.Tensor) else images
    device = next(vit.parameters()).device
    total, count = None, 0
    try:
        for batch in batches:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            tokens = torch.stack(vit_step_tokens(vit, batch.to(device))[1:]).float()
            unit = F.normalize(tokens, dim=-1).flatten(1, 2)  # (L, B * N, C)
            products = torch.einsum("imc,jmc->ij", unit, unit)
            total = products if total is None else total + products
            count += unit.shape[1]
    finally:
        vit.train(was_training)
    if total is None:
        raise ValueError("layer_similarity: received no images")
    return (total / count).cpu()


def segment_phases(similarity: torch.Tensor, k: int) -> List[int]:
    """Exact contiguous ``k``-way segmentation of ``L`` layers maximizing within-phase similarity.

    The score of a phase is the sum over its ordered pairs of layers of ``S[i, j] - 1`` (minus the
    cosine distance), so the optimum minimizes the total within-phase distance: the max-cut of the
    distance graph that Raptor solves, restricted to contiguous phases. Dynamic programming over
    (phases used, layers covered) finds it exactly in ``O(k L^2)``. Returns the phase lengths.
    """
    distance = 1.0 - similarity.double()
    distance = 0.5 * (distance + distance.T)
    layers = distance.shape[0]
    if not 1 <= k <= layers:
        raise ValueError(f"segment_phases: k must be between 1 and the number of layers {layers}, received {k}")
    # prefix[a, b] = sum of distance[:a, :b]; cost(s, e) = within-phase distance of layers s..e-1
    prefix = F.pad(distance.cumsum(0).cumsum(1), (1, 0, 1, 0))

    def cost(start: int, end: int) -> float:
        return float(prefix[end, end] - prefix[start, end] - prefix[end, start] + prefix[start, start])

    best = [[math.inf] * (layers + 1) for _ in range(k + 1)]
    cut = [[0] * (layers + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for used in range(1, k + 1):
        for end in range(used, layers - (k - used) + 1):
            for start in range(used - 1, end):
                value = best[used - 1][start] + cost(start, end)
                if value < best[used][end]:
                    best[used][end], cut[used][end] = value, start
    lengths, end = [], layers
    for used in range(k, 0, -1):
        start = cut[used][end]
        lengths.append(end - start)
        end = start
    return lengths[::-1]


class PhaseSplit(NamedTuple):
    """Result of :func:`find_phases`.

    ``boundaries`` are the ``k - 1`` steps at which a new phase begins (``[6]`` for phases
    ``[6, 6]``); ``similarity`` is the ``(L, L)`` layer-similarity matrix.
    """

    boundaries: List[int]
    similarity: torch.Tensor

    @property
    def phases(self) -> List[int]:
        """The phase lengths, as :func:`from_vit` and ``RecurrentViT(phases=...)`` take them."""
        edges = [0] + list(self.boundaries) + [self.similarity.shape[0]]
        return [b - a for a, b in zip(edges[:-1], edges[1:])]


def find_phases(
    vit: nn.Module,
    images: Union[torch.Tensor, Iterable[Any]],
    k: int,
) -> PhaseSplit:
    """Find the contiguous ``k``-phase schedule of a ViT from its layer-by-layer token similarity.

    Computes :func:`layer_similarity` on ``images`` and segments it exactly with
    :func:`segment_phases`. ``recurzoo.plots.save_heatmap`` draws the result's ``similarity`` with
    its ``boundaries``.
    """
    similarity = layer_similarity(vit, images)
    lengths = segment_phases(similarity, k)
    return PhaseSplit(boundaries=phase_starts(lengths)[1:], similarity=similarity)


# --------------------------------------------------------------------------------------------------
# Checkpoints, registry
# --------------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RecurrentViT) -> Dict[str, torch.Tensor]:
    """Load a RecurrentViT checkpoint, or start one from an untied timm ViT checkpoint.

    timm's ViT filter resamples patch and position embeddings (and reads the other ViT layouts it
    knows). When the checkpoint has more blocks than the model has shared blocks, it is an untied
    ViT of depth ``sum(phases)``: each shared block takes the weights of its phase's middle block.
    """
    state_dict = vit_checkpoint_filter_fn(unwrap_state_dict(state_dict), model)
    pattern = re.compile(r"^blocks\.(\d+)\.(.*)$")
    block_ids = {int(match.group(1)) for match in map(pattern.match, state_dict) if match}
    if not block_ids or max(block_ids) < len(model.blocks):
        return state_dict
    sources = {
        source_step(start, length): j for j, (start, length) in enumerate(zip(phase_starts(model.phases), model.phases))
    }
    converted = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match is None:
            converted[key] = value
        elif int(match.group(1)) in sources:
            converted[f"blocks.{sources[int(match.group(1))]}.{match.group(2)}"] = value
    for key, value in model.state_dict().items():
        if ".depth_scale." in key or ".lora." in key:
            converted.setdefault(key, value)  # new step parameters keep their identity initialization
    return converted


def _create_recurrent_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_with_weights(
        RecurrentViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2512.19941",
        "paper_name": "Block-Recurrent Dynamics in Vision Transformers",
        "origin_url": "https://github.com/KempnerInstitute/raptor",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_recurrent_tiny_patch16_224": _cfg(),
        "vit_recurrent_tiny_patch16_224_k3": _cfg(),
        "vit_recurrent_small_patch16_224": _cfg(),
        "vit_recurrent_small_patch16_224_k3": _cfg(),
        "vit_recurrent_base_patch16_224": _cfg(),
        "vit_recurrent_base_patch16_224_k3": _cfg(),
    }
)


# timm's ViT-Ti/S/B widths and head counts; every variant runs 12 steps over 16x16 patches.
_VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _recurrent_vit_args(size: str, num_unique_blocks: int) -> Dict[str, Any]:
    """The architecture of a registered variant: ViT-``size`` blocks, ``num_unique_blocks`` of them shared."""
    embed_dim, num_heads = _VIT_SIZES[size]
    return dict(
        patch_size=16,
        embed_dim=embed_dim,
        depth=12,
        num_heads=num_heads,
        num_unique_blocks=num_unique_blocks,
        dynamic_img_size=True,
    )


@register_model
def vit_recurrent_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-Ti/16: 12 steps of 2 shared ViT-Ti blocks (phases [6, 6])."""
    args = _recurrent_vit_args("tiny", num_unique_blocks=2)
    return _create_recurrent_vit("vit_recurrent_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vit_recurrent_tiny_patch16_224_k3(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-Ti/16: 12 steps of 3 shared ViT-Ti blocks (phases [4, 4, 4])."""
    args = _recurrent_vit_args("tiny", num_unique_blocks=3)
    return _create_recurrent_vit("vit_recurrent_tiny_patch16_224_k3", pretrained, **dict(args, **kwargs))


@register_model
def vit_recurrent_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-S/16: 12 steps of 2 shared ViT-S blocks (phases [6, 6])."""
    args = _recurrent_vit_args("small", num_unique_blocks=2)
    return _create_recurrent_vit("vit_recurrent_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vit_recurrent_small_patch16_224_k3(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-S/16: 12 steps of 3 shared ViT-S blocks (phases [4, 4, 4])."""
    args = _recurrent_vit_args("small", num_unique_blocks=3)
    return _create_recurrent_vit("vit_recurrent_small_patch16_224_k3", pretrained, **dict(args, **kwargs))


@register_model
def vit_recurrent_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-B/16: 12 steps of 2 shared ViT-B blocks (phases [6, 6])."""
    args = _recurrent_vit_args("base", num_unique_blocks=2)
    return _create_recurrent_vit("vit_recurrent_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vit_recurrent_base_patch16_224_k3(pretrained: bool = False, **kwargs: Any) -> RecurrentViT:
    """Recurrent ViT-B/16: 12 steps of 3 shared ViT-B blocks (phases [4, 4, 4])."""
    args = _recurrent_vit_args("base", num_unique_blocks=3)
    return _create_recurrent_vit("vit_recurrent_base_patch16_224_k3", pretrained, **dict(args, **kwargs))


# The first names, before they followed timm's naming of ViT variants (`vit_*`, which timm's own
# tests treat as token models): they build the same models, with a deprecation warning.
register_model_deprecations(
    __name__,
    {
        "rvit_tiny_patch16_224": "vit_recurrent_tiny_patch16_224",
        "rvit_tiny_patch16_224_k3": "vit_recurrent_tiny_patch16_224_k3",
        "rvit_small_patch16_224": "vit_recurrent_small_patch16_224",
        "rvit_small_patch16_224_k3": "vit_recurrent_small_patch16_224_k3",
        "rvit_base_patch16_224": "vit_recurrent_base_patch16_224",
        "rvit_base_patch16_224_k3": "vit_recurrent_base_patch16_224_k3",
    },
)
