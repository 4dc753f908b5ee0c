"""Small helpers shared by the model families."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, Mlp, NormMlpClassifierHead, get_device_dtype, trunc_normal_
from timm.models import register_notrace_function
from timm.models._features import feature_take_indices  # timm exports no public equivalent
from torch import nn
from torch.fx.node import has_side_effect
from torch.nn import functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def model_name(model: nn.Module) -> str:
    """The registered name of a model built by timm, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def imagenet_cfg(url: Union[str, Tuple[str, str]] = "", **kwargs: Any) -> Dict[str, Any]:
    """timm's pretrained cfg of an ImageNet-1k classifier with stride-32 features and its classifier at
    ``head.fc``: 224 inputs (crop 0.875, bicubic, ImageNet mean and std); ``kwargs`` add or override."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "head.fc",
        **kwargs,
    }


def imagenet_cfg_at(size: int) -> Dict[str, Any]:
    """:func:`imagenet_cfg` entries of weights fine-tuned on ``size`` x ``size`` inputs: that input,
    its stride-32 feature grid, no crop."""
    return {"input_size": (3, size, size), "pool_size": (size // 32, size // 32), "crop_pct": 1.0}


def init_linear(module: nn.Module) -> None:
    """timm's ViT initialisation of a linear layer (for ``Module.apply``): weight truncated normal
    (std 0.02), bias zero; other modules are left as they are."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _skip_checks() -> bool:
    # TorchScript cannot compile the message formatting; a scripted model was checked eagerly first.
    return torch.jit.is_scripting()


# torch.fx records this call instead of tracing it and keeps it in the graph (it returns nothing),
# so a traced model checks its real input too.
@has_side_effect
@register_notrace_function
def check_image_input(
    x: torch.Tensor,
    name: str,
    in_chans: int,
    min_size: int = 1,
    multiple_of: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Raise a ``ValueError`` naming the model when ``x`` is not an image batch it can take.

    Args:
        x: the input batch, expected ``(B, in_chans, H, W)`` floating point with ``B >= 1``.
        name: the model's name, for the message.
        in_chans: the channel count the model expects.
        min_size: the smallest height and width the model accepts (its total stride).
        multiple_of: when set, height and width must be multiples of it.
        dtype: when set, the weights' dtype, which a floating input must match outside autocast
            (a float64 numpy batch would otherwise fail deep inside the first layer).
    """
    if _skip_checks():
        return
    shape = tuple(int(size) for size in x.shape)
    if x.ndim != 4:
        raise ValueError(f"{name}: expects a 4-D image batch (B, {in_chans}, H, W), received shape {shape}")
    if shape[0] == 0:  # an empty batch would fail deep inside (FFTs, reshapes), model by model
        raise ValueError(f"{name}: expects at least one image in the batch, received shape {shape}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name}: expects {in_chans} input channels (B, {in_chans}, H, W), received shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expects a floating-point image batch, received dtype {x.dtype} with shape {shape}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name}: expects {dtype} input like its weights (or torch.autocast for mixed precision), "
            f"received dtype {x.dtype} with shape {shape}"
        )
    height, width = shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{name}: expects height and width of at least {min_size} (its total stride), received shape {shape}"
        )
    if multiple_of and (height % multiple_of or width % multiple_of):
        raise ValueError(
            f"{name}: expects height and width that are multiples of {multiple_of}, received shape {shape}"
        )


def plain_eager(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real tensor computed eagerly: nothing traces, compiles or exports the model (torch.fx,
    TorchScript, dynamo, torch.export, ONNX) and no dispatch mode (the FLOP counter, fake tensors) watches."""
    # Checked first: dynamo resolves it while tracing and never looks at the rest.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    # Exporters' fake and functional tensors, and fx's proxies, are not plain tensors.
    if type(x) is not torch.Tensor or torch.compiler.is_exporting():
        return False
    return not is_in_torch_dispatch_mode()


def _onednn_inference(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether oneDNN's fused linear kernel may run: eager CPU float32 inference (no autograd graph to
    record, oneDNN not switched off by the user)."""
    if not plain_eager(x) or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast casts F.linear's inputs; the oneDNN op it does not know
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))


# torch.fx keeps this call as one node (its branch reads tensor properties, which fx cannot trace).
@register_notrace_function
def fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, followed by the exact (erf) GELU when ``gelu`` is set.

    In eager CPU float32 inference this is one oneDNN kernel (bias and GELU applied as the matmul
    writes its output, as inductor does), which saves the separate bias and activation passes over the
    output; otherwise, and always where gradients are recorded, it is ``F.linear`` then ``F.gelu``.
    """
    if _onednn_inference(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def _unhooked(*modules: nn.Module) -> bool:
    """Whether no forward hook (the modules' own or a global one) would miss a call that bypasses them."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain ``nn.Linear`` (not replaced, wrapped or quantized) without hooks runs through
    :func:`fused_linear` (bias fused into the matmul in CPU inference)."""
    if type(layer) is nn.Linear and _unhooked(layer):
        return fused_linear(x, layer.weight, layer.bias)
    return layer(x)


def apply_linear_act(layer: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(layer(x))``; a plain ``nn.Linear`` followed by the exact ``nn.GELU``, neither hooked, runs
    through :func:`fused_linear` (bias and GELU fused into the matmul in CPU inference)."""
    exact_gelu = type(act) is nn.GELU and act.approximate == "none"
    if type(layer) is nn.Linear and exact_gelu and _unhooked(layer, act):
        return fused_linear(x, layer.weight, layer.bias, gelu=True)
    return act(layer(x))


class FusedGeluMlp(Mlp):
    """timm's ``Mlp`` (same arguments, modules and ``state_dict``) whose ``fc1 -> GELU`` and ``fc2`` go through
    :func:`apply_linear_act` and :func:`apply_linear`: fused in CPU inference when the layers are the plain
    ones it was built with and no hook watches them, the modules' own calls otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.norm) is not nn.Identity:
            return super().forward(x)
        x = self.drop1(apply_linear_act(self.fc1, self.act, x))
        return self.drop2(apply_linear(self.fc2, x))


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg``, with pretrained weights read by :mod:`recurzoo.checkpoint`.

    The cfg's ``file``, its URL's file in timm's cache or a download is read safely
    (``weights_only`` or safetensors) and handed to timm as a state dict, so timm's first-conv
    adaptation and classifier handling apply unchanged. Before timm loads it, the converted weights
    are checked against the model: what does not fit is one ``CheckpointError`` line, a dropped
    classifier a WARNING. Offline, a missing file fails within seconds and names where to put it.
    Task models (not in timm's registry) take their cfg from :mod:`recurzoo.registry`.
    """
    from timm.models import build_model_with_cfg, resolve_pretrained_cfg

    from recurzoo import registry
    from recurzoo.checkpoint import check_pretrained_fit, pretrained_state_dict

    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    if pretrained_cfg is None:
        pretrained_cfg = registry.get_pretrained_cfg(variant)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained:
        resolved = resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
        weights = pretrained_state_dict(variant, resolved)
        if weights is not None:
            state_dict, source = weights
            family_fn = kwargs.pop("pretrained_filter_fn", None)

            def checked_filter(checkpoint: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
                converted = family_fn(checkpoint, model) if family_fn is not None else checkpoint
                num_classes = 0 if kwargs.get("features_only") else getattr(model, "num_classes", 1000)
                check_pretrained_fit(
                    converted, model, resolved.to_dict(), num_classes, kwargs.get("in_chans", 3), source
                )
                return converted

            kwargs["pretrained_filter_fn"] = checked_filter
            overlay = dict(overlay or {}, state_dict=state_dict)
    model = build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay, **kwargs
    )
    for cfg in (getattr(model, "pretrained_cfg", None), getattr(getattr(model, "model", None), "pretrained_cfg", None)):
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)  # the weights are in the model now; keep the cfg printable
    return model


class IntermediatesMixin:
    """timm's ``forward_intermediates``, ``prune_intermediate_layers`` and ``set_grad_checkpointing``,
    written once for every family.

    A model is a stem, then ``num_steps`` steps (stages, residual groups, recurrent steps) whose outputs
    are the intermediates, then an ending (final norm, closing conv). It provides the hooks:

    - ``num_steps``: how many steps it has now (a pruned model fewer);
    - ``check_input(x)``: the input check, raising a ``ValueError`` naming the model;
    - ``embed(x)``: images -> the state entering step 0 (any value: a map, tokens, a tuple);
    - ``run_step(state, index)``: one step;
    - ``intermediate(state, index, norm)``: step ``index``'s output, normed as ``norm`` asks;
    - ``end_steps(state, complete)``: the final features once the steps ran (``complete``: all of them);
    - ``keep_steps(count, prune_norm, prune_head)``: keep the first ``count`` steps and drop what
      the rest fed (the final norm and head as timm's pruned models do);
    - ``checkpointed_modules()``: the modules whose ``grad_checkpointing`` flag
      :meth:`set_grad_checkpointing` sets (a model that checkpoints otherwise overrides that method);
    - ``intermediate_formats`` (a class attribute, ``NCHW`` first) and may override
      ``format_intermediates`` (the default turns ``NCHW`` maps into ``NHWC`` on request).
    """

    intermediate_formats: Tuple[str, ...] = ("NCHW",)

    def format_intermediates(
        self, intermediates: List[torch.Tensor], x: torch.Tensor, output_fmt: str
    ) -> List[torch.Tensor]:
        """The intermediates of input ``x`` in ``output_fmt`` (they arrive as ``NCHW`` maps)."""
        if output_fmt == "NHWC":
            return [feature.permute(0, 2, 3, 1) for feature in intermediates]
        return intermediates

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Run the steps, returning the outputs of those in ``indices`` (all by default; an int ``n``:
        the last ``n``; negative indices count from the end); ``stop_early`` ends at the last one asked."""
        return self.run_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)

    def run_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]],
        norm: bool,
        stop_early: bool,
        output_fmt: str,
        intermediates_only: bool,
        **format_kwargs: Any,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """:meth:`forward_intermediates`; ``format_kwargs`` go to :meth:`format_intermediates`."""
        if output_fmt not in self.intermediate_formats:
            expected = " or ".join(repr(fmt) for fmt in self.intermediate_formats)
            raise ValueError(f"{model_name(self)}: output_fmt must be {expected}, received {output_fmt!r}")
        self.check_input(x)
        num_steps = self.num_steps
        take_indices, max_index = feature_take_indices(num_steps, indices)
        end = max_index + 1 if stop_early and not torch.jit.is_scripting() else num_steps
        state = self.embed(x)
        intermediates = []
        for index in range(end):
            state = self.run_step(state, index)
            if index in take_indices:
                intermediates.append(self.intermediate(state, index, norm))
        intermediates = self.format_intermediates(intermediates, x, output_fmt, **format_kwargs)
        if intermediates_only:
            return intermediates
        return self.end_steps(state, end == num_steps), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the steps (and norm, head) that the requested intermediates do not need; returns the
        indices kept, as timm's models do."""
        take_indices, max_index = feature_take_indices(self.num_steps, indices)
        self.keep_steps(max_index + 1, prune_norm=prune_norm, prune_head=prune_head)
        return take_indices

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of each of :meth:`checkpointed_modules` in the backward pass."""
        for module in self.checkpointed_modules():
            module.grad_checkpointing = enable


class StagedClassifierMixin(IntermediatesMixin):
    """timm's model interface for a network made of ``embed`` -> ``stages`` -> ``norm_pre`` -> ``head``.

    The model defines ``stages`` (an ``nn.Sequential`` of modules with a ``grad_checkpointing``
    flag), ``norm_pre``, ``head`` (a timm ``NormMlpClassifierHead``), ``feature_info``,
    ``num_features``, ``in_chans``, ``embed(x)`` (the stem, up to the first stage) and may override
    ``check_input(x)`` and ``stem_pattern`` (the regex of the stem's parameter names).
    """

    stem_pattern = r"^stem"

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float, **dd: Any) -> None:
        """Set ``num_features``, an identity ``norm_pre`` and ``head``: timm's ``NormMlpClassifierHead``,
        pooling then a channels-first LayerNorm (eps 1e-6) before the classifier. ``dd``: device, dtype."""
        self.num_features = self.head_hidden_size = num_features
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(
            num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-6),
            **dd,
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    @property
    def total_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    def check_input(self, x: torch.Tensor) -> None:
        check_image_input(
            x, model_name(self), self.in_chans, min_size=self.total_stride, dtype=next(self.parameters()).dtype
        )

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=self.stem_pattern,
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new classifier for ``num_classes`` (0 for none) on the model's device and dtype, reading the
        model's current width (a pruned model's too); ``global_pool=None`` keeps the current pooling."""
        self.num_classes = num_classes
        self.head.reset(
            num_classes, global_pool, reset_other=reset_other, in_features=self.num_features, **get_device_dtype(self)
        )
        self.head_hidden_size = self.head.num_features

    @property
    def num_steps(self) -> int:
        return len(self.stages)

    def run_step(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return self.stages[index](x)

    def checkpointed_modules(self) -> nn.Sequential:
        return self.stages

    def intermediate(self, x: torch.Tensor, index: int, norm: bool) -> torch.Tensor:
        return self.norm_pre(x) if norm and index == len(self.stages) - 1 else x

    def end_steps(self, x: torch.Tensor, complete: bool) -> torch.Tensor:
        return self.norm_pre(x) if complete else x

    def keep_steps(self, count: int, prune_norm: bool, prune_head: bool) -> None:
        prune_end = count < len(self.stages)
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        self.stages = self.stages[:count]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[count - 1]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.norm_pre(self.stages(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
