"""Parameter and FLOP counts with fvcore, including the operators fvcore does not know.

fvcore counts one multiply-accumulate as one FLOP (the convention of the papers' tables). Its
tracer sees ``scaled_dot_product_attention`` and the FFTs as single operators it has no formula
for; the handles below count them as the equivalent explicit computation would be counted, so that
totals match the authors' code (which writes attention as two matmuls).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "create_uninitialized",
    "count_params",
    "flop_analysis",
    "activation_analysis",
    "count_flops",
    "count_calls",
    "count_unrolled_params",
    "model_report",
    "EXTRA_FLOP_HANDLES",
    "EXTRA_ACTIVATION_HANDLES",
    "HANDLE_NOTES",
]


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


def bicubic_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """Bicubic resampling (e.g. of a position embedding): 16 taps per output element.

    fvcore's convention for bilinear resampling is one FLOP per tap (4 per output element).
    """
    return 16 * math.prod(_shape(outputs[0]))


def sdpa_activations(inputs: List[Any], outputs: List[Any]) -> int:
    """The outputs of the two matmuls of explicit attention: ``L*S`` scores plus ``L*Ev`` values."""
    query, key, value = (_shape(v) for v in inputs[:3])
    return math.prod(query[:-2]) * query[-2] * (key[-2] + value[-1])


def fft2_activations(inputs: List[Any], outputs: List[Any]) -> int:
    """Real numbers produced by an FFT (a complex output counts two)."""
    shape = _shape(outputs[0])
    is_complex = "Complex" in str(outputs[0].type().scalarType())
    return math.prod(shape) * (2 if is_complex else 1)


EXTRA_FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flops,
    "aten::fft_rfft2": fft2_flops,
    "aten::fft_irfft2": fft2_flops,
    "aten::_upsample_bicubic2d_aa": bicubic_flops,
    "aten::upsample_bicubic2d": bicubic_flops,
}

# fvcore counts activations as the outputs of convolutions and matmuls; these add the operators
# that hide matmuls (attention) or act as dense linear maps (FFTs).
EXTRA_ACTIVATION_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_activations,
    "aten::fft_rfft2": fft2_activations,
    "aten::fft_irfft2": fft2_activations,
}

# How the operators with this package's handles are counted, for the reports.
HANDLE_NOTES = {
    "aten::scaled_dot_product_attention": "FLOPs: the two matmuls softmax(q k^T) v, L*S*(E + Ev) per batch element "
    "and head (softmax and scaling not counted); activations: their "
    "outputs, L*S + L*Ev",
    "aten::fft_rfft2": "FLOPs: N*ceil(log2 N) per channel for an N-point 2-D FFT (zero in the HorNet paper's "
    "convention); activations: the real numbers produced",
    "aten::fft_irfft2": "as aten::fft_rfft2",
    "aten::_upsample_bicubic2d_aa": "FLOPs: 16 taps per output element (fvcore counts 4 for bilinear)",
    "aten::upsample_bicubic2d": "FLOPs: 16 taps per output element (fvcore counts 4 for bilinear)",
}


def create_uninitialized(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with every parameter and buffer zero instead of initialised.

    For counting: building on the meta device and then allocating zeros skips the weight init,
    which dominates the build time of large models. Use the result only for shapes and counts.
    """
    from recurzoo.export.models import create_model

    return create_model(model_name, uninitialized=True, **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (a tensor shared by several modules counts once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def count_calls(model: nn.Module) -> Iterator[Counter]:
    """Count the forward calls of every submodule of ``model`` while the block runs.

    Yields a ``Counter`` keyed by module object; a module reused by recursion is counted at every use.
    """
    calls: Counter = Counter()
    handles = [
        module.register_forward_hook(lambda module, args, output: calls.update((module,))) for module in model.modules()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def count_unrolled_params(model: nn.Module, calls: Counter) -> int:
    """Parameters counted once per use: each parameter times the forward calls of the module owning it.

    A module applied recursively (a shared block, a pooling conv applied k times) contributes its
    parameters at each application. A parameter whose module is not called as a module (a position
    embedding read by its parent, LoRA factors read by index) counts once.
    """
    total, seen = 0, set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            total += parameter.numel() * max(calls[module], 1)
    return total


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


def activation_analysis(model: nn.Module, inputs: Tuple[torch.Tensor, ...]):
    """An fvcore ``ActivationCountAnalysis`` of ``model(*inputs)`` with this package's extra handles."""
    from fvcore.nn import ActivationCountAnalysis

    analysis = ActivationCountAnalysis(model, inputs).set_op_handle(**EXTRA_ACTIVATION_HANDLES)
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
    """Params (distinct and unrolled), GFLOPs and feature strides of ``model`` at ``input_size``.

    The calls counted for the unrolled parameters are those of fvcore's traced forward pass.
    """
    info = getattr(model, "feature_info", None) or []
    with count_calls(model) as calls:
        flops = count_flops(model, input_size)
    return dict(
        params=count_params(model),
        unrolled_params=count_unrolled_params(model, calls),
        gflops=flops / 1e9,
        reductions=[level["reduction"] for level in info],
        channels=[level["num_chs"] for level in info],
    )
