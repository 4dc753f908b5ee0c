"""Parameter and FLOP counts with fvcore, including the operators fvcore does not know.

fvcore counts one multiply-accumulate as one FLOP (the convention of the papers' tables). Its
tracer sees ``scaled_dot_product_attention`` and the FFTs as single operators it has no formula
for; the handles below count them as the equivalent explicit computation would be counted, so that
totals match the authors' code (which writes attention as two matmuls).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["create_uninitialized", "count_params", "flop_analysis", "count_flops", "model_report", "EXTRA_FLOP_HANDLES"]


def _shape(value: Any) -> List[int]:
    return list(value.type().sizes())


def sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``softmax(q k^T) v`` as two batched matmuls: ``L*S*E`` plus ``L*S*Ev`` per batch element."""
    query, key, value = (_shape(v) for v in inputs[:3])
    batch = math.prod(query[:-2])
    length, embed = query[-2:]
    source, value_embed = key[-2], value[-1]
    return batch * length * source * (embed + value_embed)


def fft2_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """A 2-D FFT over ``N = H * W`` points of every channel: ``N * ceil(log2 N)`` each."""
    real_shape = _shape(outputs[0]) if _shape(outputs[0])[-1] > _shape(inputs[0])[-1] else _shape(inputs[0])
    points = real_shape[-1] * real_shape[-2]
    return math.prod(real_shape[:-2]) * points * math.ceil(math.log2(max(points, 2)))


EXTRA_FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flops,
    "aten::fft_rfft2": fft2_flops,
    "aten::fft_irfft2": fft2_flops,
}


def create_uninitialized(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with every parameter and buffer zero instead of initialised.

    For counting: building on the meta device and then allocating zeros skips the weight init,
    which dominates the build time of large models. Use the result only for shapes and counts.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, **kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (a tensor shared by several modules counts once)."""
    return sum(p.numel() for p in model.parameters())


def flop_analysis(model: nn.Module, inputs: Tuple[torch.Tensor, ...], count_fft: bool = True):
    """An fvcore ``FlopCountAnalysis`` of ``model(*inputs)`` with this package's extra handles.

    With ``count_fft=False`` FFTs count zero, as in plain fvcore (the convention of the published
    HorNet figures, whose authors measured without their FFT handles).
    """
    from fvcore.nn import FlopCountAnalysis

    handles = dict(EXTRA_FLOP_HANDLES)
    if not count_fft:
        handles.update({name: None for name in handles if "fft" in name})
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def count_flops(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 1,
        count_fft: bool = True,
) -> int:
    """fvcore FLOPs (multiply-accumulates) of one eval-mode forward pass at ``input_size``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inputs = (torch.randn(batch_size, *input_size),)
            return int(flop_analysis(model, inputs, count_fft=count_fft).total())
    finally:
        model.train(was_training)


def model_report(model: nn.Module, input_size: Sequence[int]) -> Dict[str, Any]:
    """Params, GFLOPs and feature strides of ``model`` at ``input_size``, for tables and cards."""
    info = getattr(model, "feature_info", None) or []
    return dict(
        params=count_params(model),
        gflops=count_flops(model, input_size) / 1e9,
        reductions=[level["reduction"] for level in info],
        channels=[level["num_chs"] for level in info],
    )
