"""ONNX export of any registered model, checked in onnxruntime against PyTorch.

``export_model('sret_small', out_dir='out')`` builds the model (optionally loading a checkpoint
through the family's pretrained filter), exports its eval-mode forward pass with
``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``: measured 30-50x faster
than the dynamo exporter on these models, which also fails on RGT's 5-D attention, and it covers
every operator of the zoo with the additions below), checks the graph with ``onnx.checker``, runs
it in onnxruntime on random
inputs and on a real photograph, and compares with PyTorch: the export fails when the largest
absolute difference exceeds ``1e-4`` of the output's scale (its largest magnitude). The FLOP /
parameter report (:mod:`recurzoo.export.report`) is written beside the ``.onnx``.

The export runs in short steps: :func:`plan_export` (sizes, dynamic axes, parity inputs),
:func:`trace_to_onnx`, :func:`simplify_onnx` (optional), :func:`check_parity` and
:func:`measure_latency`. Dynamic axes: the batch is dynamic for every model; height and width are
dynamic where the model's classes declare they can be (``export_dynamic_size``; see
:mod:`recurzoo.export.models`, which also builds, feeds and times the model). The ``recurzoo
export`` command calls :func:`export_model`.

Operators the exporter lacks, added for the duration of an export: bicubic antialiased
resampling (position embeddings resized to another input size; ONNX ``Resize`` with
``antialias=1``, opset 18), and adaptive pooling to a size that does not divide the input (the
scale merging of MSRNet), traced as an exact decomposition into fixed pools and a ``Gather`` for
the traced size. Replaced for speed in onnxruntime: ``scaled_dot_product_attention`` is exported as
``softmax(q k^T * scale + mask) v`` with a constant scale, which onnxruntime folds into one
``FusedMatMul`` (torch's own symbolic scales q and k separately by a square root computed at run time).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recurzoo.export.models import (
    ExportSupport,
    create_model,
    export_support,
    median_ms,
    model_input_size,
    photo_batch,
    random_batch,
)
from recurzoo.export.onnx_rewrite import rewrite_graph

__all__ = [
    "DEFAULT_OPSET",
    "PARITY_TOLERANCE",
    "ExportSupport",
    "ExportPlan",
    "ParityCheck",
    "ExportResult",
    "export_support",
    "create_model",
    "photo_batch",
    "plan_export",
    "trace_to_onnx",
    "simplify_onnx",
    "check_parity",
    "measure_latency",
    "onnx_session",
    "export_model",
    "export_symbolics",
    "static_adaptive_pooling",
]

DEFAULT_OPSET = 18  # Resize with antialias (position-embedding resampling) needs opset 18
PARITY_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| allowed, relative to the largest |PyTorch output|
_INT64 = 7  # ONNX TensorProto.INT64
BENCHMARK_RUNS = 5  # timed runs of each backend in the latency comparison (the median is reported)


# --------------------------------------------------------------------------------------------------
# Symbolics the TorchScript exporter lacks
# --------------------------------------------------------------------------------------------------


def _size_tensor(g: Any, output_size: Any) -> Any:
    """An INT64 1-D tensor of the sizes in ``output_size`` (constant or traced values)."""
    from torch.onnx import symbolic_helper as helper

    if helper._is_constant(output_size) or not helper._is_value(output_size):
        return g.op("Constant", value_t=torch.tensor(helper._maybe_get_const(output_size, "is"), dtype=torch.int64))
    if not helper._is_packed_list(output_size):
        return g.op("Cast", output_size, to_i=_INT64)
    axis = g.op("Constant", value_t=torch.tensor([0]))
    parts = []
    for item in helper._unpack_list(output_size):
        if helper._is_constant(item):
            parts.append(g.op("Constant", value_t=torch.tensor([helper._get_const(item, "i", "size")])))
        else:
            parts.append(g.op("Unsqueeze", g.op("Cast", item, to_i=_INT64), axis))
    return g.op("Concat", *parts, axis_i=0)


def _bicubic_antialias_symbolic(g: Any, x: Any, output_size: Any, align_corners: Any, *scales: Any) -> Any:
    """``aten::_upsample_bicubic2d_aa`` as ``Resize`` (cubic, a = -0.5, antialias, as PyTorch and PIL resample)."""
    from torch.onnx import symbolic_helper as helper

    batch_channels = g.op(
        "Slice",
        g.op("Shape", x),
        g.op("Constant", value_t=torch.tensor([0])),
        g.op("Constant", value_t=torch.tensor([2])),
    )
    sizes = g.op("Concat", batch_channels, _size_tensor(g, output_size), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    corners = bool(helper._maybe_get_const(align_corners, "b"))
    return g.op(
        "Resize",
        x,
        empty,
        empty,
        sizes,
        mode_s="cubic",
        cubic_coeff_a_f=-0.5,
        antialias_i=1,
        exclude_outside_i=1,
        coordinate_transformation_mode_s="align_corners" if corners else "half_pixel",
    )


def _attention_symbolic(
    g: Any,
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Any = None,
    enable_gqa: bool = False,
) -> Any:
    """``aten::scaled_dot_product_attention`` (eval, no causal mask) as ``softmax(q k^T * scale + mask) v``.

    torch's own symbolic scales q and k^T each by ``sqrt(scale)``, with the scale computed at run time from
    ``Shape``: two extra multiplies per call, and a transpose and a multiply between ``k`` and the matmul
    that keep onnxruntime from folding them into one ``FusedMatMul`` (``transB``, ``alpha``). Here the
    scale is a constant (the head size is known when traced) applied after the matmul, which onnxruntime
    folds into it. Anything else (a causal mask, dropout, grouped heads, a head size unknown when traced)
    goes to torch's symbolic.
    """
    from torch.onnx import symbolic_helper as helper
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14

    def constant(value: Any, kind: str) -> Any:
        return None if value is None or helper._is_none(value) else helper._maybe_get_const(value, kind)

    head_size = (helper._get_tensor_sizes(query) or [None])[-1]
    scale_value = constant(scale, "f")
    mask_type = None if constant(attn_mask, "v") is None else attn_mask.type().scalarType()
    flags = [constant(dropout_p, "f"), constant(is_causal, "b"), constant(enable_gqa, "b")]
    if (
        any(flag is None or helper._is_value(flag) or flag for flag in flags)
        or not isinstance(scale_value if scale_value is not None else head_size, (int, float))
        or mask_type not in (None, "Float")
    ):
        return symbolic_opset14.scaled_dot_product_attention(
            g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    rank = helper._get_tensor_rank(key)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    scores = g.op("MatMul", query, g.op("Transpose", key, perm_i=perm))
    factor = 1.0 / math.sqrt(head_size) if scale_value is None else scale_value
    scores = g.op("Mul", scores, g.op("Constant", value_t=torch.tensor(factor, dtype=torch.float32)))
    if mask_type is not None:
        scores = g.op("Add", scores, attn_mask)
    return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)


def _pool_axis(x: torch.Tensor, axis: int, size_out: int, pool: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Adaptive pooling along one spatial axis with PyTorch's bins ``[floor(i*n/m), ceil((i+1)*n/m))``.

    Uses only fixed-window pools, slices and a concatenation: each distinct bin length ``k`` is pooled at
    every position (window ``k``, stride 1) and the bins are taken from those maps as contiguous slices
    (one per run of consecutive bins of one length). No ``index_select``: XNNPACK does not take it,
    and a gather left outside the delegate between delegated pools made its grouped partition cyclic
    (MSRNet's scale merging, at 64x64 and above).
    """
    size_in = int(x.shape[axis])
    if size_in == size_out:
        return x

    def window(k: int) -> Tuple[int, int]:
        return (k, 1) if axis == 2 else (1, k)

    if size_in % size_out == 0:
        k = size_in // size_out
        return pool(x, window(k), window(k))
    starts = [i * size_in // size_out for i in range(size_out)]
    lengths = [-(-(i + 1) * size_in // size_out) - start for i, start in enumerate(starts)]
    pooled = {k: pool(x, window(k), (1, 1)) if k > 1 else x for k in sorted(set(lengths))}
    runs: List[List[int]] = []  # [length, first start, bins]: consecutive bins of one length, contiguous starts
    for k, start in zip(lengths, starts):
        if runs and runs[-1][0] == k and runs[-1][1] + runs[-1][2] == start:
            runs[-1][2] += 1
        else:
            runs.append([k, start, 1])
    # Indexing (``aten.slice``), not ``narrow``: XNNPACK's quantizer lets a slice share its input's
    # quantization parameters, and its delegate takes a slice only with matching ones.
    # A slice of a whole axis is an alias, which XNNPACK does not take: the map itself is used instead.
    parts = [
        pooled[k]
        if start == 0 and count == pooled[k].shape[axis]
        else pooled[k][(slice(None),) * axis + (slice(start, start + count),)]
        for k, start, count in runs
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def _exporting() -> bool:
    """True while the TorchScript exporter traces or ``torch.export`` exports."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _static_adaptive_pool(
    original: Callable[..., Any],
    pool: Callable[..., torch.Tensor],
    global_pool: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[..., Any]:
    """``F.adaptive_*_pool2d`` that, while exported, pools to a size fixed at the traced one.

    The TorchScript exporter only exports adaptive pooling to a constant size that divides the input,
    and ExecuTorch's core ATen opset has no adaptive max pooling; MSRNet pools 1.5x maps to 1x (to
    sizes taken from another tensor's traced shape). Global pooling (output 1x1) stays global, for
    any input size: under ``torch.export`` a reduction (``global_pool``), or the original operator when
    ``global_pool`` is None (global average pooling: the XNNPACK quantizer annotates
    ``adaptive_avg_pool2d``, not the ``mean`` it lowers to, and refuses the partition otherwise).
    """

    def adaptive_pool(x: torch.Tensor, output_size: Any, *args: Any, **kwargs: Any) -> Any:
        if not _exporting() or args or kwargs.get("return_indices"):
            return original(x, output_size, *args, **kwargs)
        sizes = [output_size] * 2 if isinstance(output_size, int) else list(output_size)
        sizes = [int(x.shape[2 + i]) if size is None else int(size) for i, size in enumerate(sizes)]
        if sizes == [1, 1]:
            return original(x, 1) if torch.jit.is_tracing() or global_pool is None else global_pool(x)
        for axis, size in zip((2, 3), sizes):
            x = _pool_axis(x, axis, size, pool)
        return x

    return adaptive_pool


@contextlib.contextmanager
def static_adaptive_pooling() -> Iterator[None]:
    """While the block runs, adaptive pooling that is exported (TorchScript or ``torch.export``) runs as an
    exact decomposition into fixed pools (:func:`_pool_axis`)."""

    def max_pool(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
        return F.max_pool2d(x, kernel, stride)

    def avg_pool(x: torch.Tensor, kernel: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
        return F.avg_pool2d(x, kernel, stride)

    originals = dict(adaptive_max_pool2d=F.adaptive_max_pool2d, adaptive_avg_pool2d=F.adaptive_avg_pool2d)
    F.adaptive_max_pool2d = _static_adaptive_pool(
        originals["adaptive_max_pool2d"], max_pool, lambda x: x.amax(dim=(2, 3), keepdim=True)
    )
    F.adaptive_avg_pool2d = _static_adaptive_pool(originals["adaptive_avg_pool2d"], avg_pool, None)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


@contextlib.contextmanager
def traced_attention_scale() -> Iterator[None]:
    """While the block runs, ``F.scaled_dot_product_attention`` traced by the TorchScript exporter without a
    ``scale`` gets its default, ``head_size ** -0.5``, as a constant: the head size is fixed by the model,
    but the exporter's shape inference loses it where the heads come out of a reshape to traced sizes
    (SReT's groups), and :func:`_attention_symbolic` needs the scale as a constant."""
    original = F.scaled_dot_product_attention

    def attention(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.jit.is_tracing() and len(args) < 6 and kwargs.get("scale") is None:
            kwargs["scale"] = float(int(query.shape[-1]) ** -0.5)
        return original(query, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def export_symbolics(opset: int) -> Iterator[None]:
    """While the block runs: the symbolics of :data:`_SYMBOLICS` (bicubic antialias, attention) are
    registered with the TorchScript exporter, adaptive pooling to sizes that do not divide the input
    traces as fixed pools, and attention without a scale traces with its default one as a constant."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    registered = [(name, symbolic) for name, symbolic, minimum in _SYMBOLICS if opset >= minimum]
    for name, symbolic in registered:
        register_custom_op_symbolic(name, symbolic, opset)
    try:
        with static_adaptive_pooling(), traced_attention_scale():
            yield
    finally:
        for name, _ in registered:
            unregister_custom_op_symbolic(name, opset)
            _drop_empty_symbolic_group(name)


# (operator, symbolic, lowest opset) registered by export_symbolics; a custom symbolic takes precedence
# over torch's own for the same operator while registered
_SYMBOLICS: List[Tuple[str, Callable[..., Any], int]] = [
    ("aten::_upsample_bicubic2d_aa", _bicubic_antialias_symbolic, 18),  # Resize with antialias: opset 18
    ("aten::scaled_dot_product_attention", _attention_symbolic, 14),  # torch's fallback needs opset 14
]


def _drop_empty_symbolic_group(name: str) -> None:
    """Forget ``name`` in torch's symbolic registry when unregistering left it no function: torch keeps
    an empty group, and a later export at an opset without the operator then fails inside torch
    (``min() arg is an empty sequence``) instead of saying that the operator is not supported."""
    with contextlib.suppress(ImportError, AttributeError):
        from torch.onnx._internal.torchscript_exporter import registration

        group = registration.registry.get_function_group(name)
        if group is not None and not group._functions:
            registration.registry._registry.pop(name, None)


# --------------------------------------------------------------------------------------------------
# Export and parity
# --------------------------------------------------------------------------------------------------


@dataclass
class ParityCheck:
    """ONNX Runtime against PyTorch on one input: largest absolute difference and its ratio to the output scale."""

    name: str
    input_shape: Tuple[int, ...]
    max_abs: float
    scale: float

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs) and self.max_rel <= PARITY_TOLERANCE


@dataclass
class ExportPlan:
    """What one export traces and checks: the sizes, the dynamic axes and the parity inputs."""

    model_name: str
    stem: str
    input_size: Tuple[int, int, int]
    batch: int
    dynamic_hw: bool
    opset: int
    features_only: bool
    inputs: List[Tuple[str, torch.Tensor]]  # (name, input) of the parity checks; the photo first
    example: torch.Tensor  # the traced input


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    model_name: str
    onnx_path: str
    input_size: Tuple[int, int, int]
    batch: int
    dynamic_batch: bool
    dynamic_hw: bool
    support: ExportSupport
    opset: int
    features_only: bool = False
    simplified: bool = False
    exporter: str = "torch.onnx.export (TorchScript, dynamo=False)"
    checks: List[ParityCheck] = field(default_factory=list)
    export_seconds: float = 0.0
    onnx_nodes: int = 0
    latency_ms: Dict[str, float] = field(default_factory=dict)  # onnxruntime, pytorch, threads
    report_paths: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def speed_ratio(self) -> Optional[float]:
        """Eager PyTorch latency over ONNX Runtime latency (above 1: ONNX Runtime is faster)."""
        if "onnxruntime" in self.latency_ms and "pytorch" in self.latency_ms:
            return self.latency_ms["pytorch"] / self.latency_ms["onnxruntime"]
        return None

    def parity_line(self) -> str:
        """One line: the file, its dynamic axes and the largest ONNX Runtime vs PyTorch differences."""
        axes = "batch" + (", height, width" if self.dynamic_hw else "")
        parts = [
            f"{self.model_name}: {'OK' if self.ok else 'FAILED'} {Path(self.onnx_path).name} "
            f"(opset {self.opset}, dynamic {axes}), onnxruntime vs PyTorch"
        ]
        if self.checks:
            worst = max(self.checks, key=lambda check: check.max_rel)
            parts.append(
                f"max abs diff {max(c.max_abs for c in self.checks):.2e}, "
                f"max rel {worst.max_rel:.2e} over {len(self.checks)} inputs "
                f"(tolerance {PARITY_TOLERANCE:.0e})"
            )
        photo = next((check for check in self.checks if check.name.startswith("photo")), None)
        if photo is not None:
            parts.append(f"photo {photo.max_abs:.2e}")
        if self.speed_ratio is not None:
            parts.append(
                f"latency {self.latency_ms['onnxruntime']:.1f} ms vs eager "
                f"{self.latency_ms['pytorch']:.1f} ms ({self.speed_ratio:.2f}x, "
                f"{self.latency_ms.get('threads', '?')} thread(s))"
            )
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        result = asdict(self)
        result["checks"] = [dict(asdict(check), max_rel=check.max_rel, ok=check.ok) for check in self.checks]
        result.update(ok=self.ok, speed_ratio=self.speed_ratio)
        return result


def _as_list(output: Any) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return list(output.values())
    return list(output)


def _output_names(outputs: Sequence[torch.Tensor], features_only: bool) -> List[str]:
    if len(outputs) == 1 and not features_only:
        return ["output"]
    return [f"feature_{i}" if features_only else f"output_{i}" for i in range(len(outputs))]


def _dynamic_axes(
    output_names: Sequence[str], outputs: Sequence[torch.Tensor], dynamic_hw: bool
) -> Dict[str, Dict[int, str]]:
    axes: Dict[str, Dict[int, str]] = {"input": {0: "batch"}}
    if dynamic_hw:
        axes["input"].update({2: "height", 3: "width"})
    for name, output in zip(output_names, outputs):
        axes[name] = {0: "batch"}
        if dynamic_hw and output.ndim == 4:
            axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    return axes


def _compare(
    reference: Sequence[torch.Tensor], onnx_outputs: Sequence[np.ndarray], name: str, shape: Tuple[int, ...]
) -> ParityCheck:
    max_abs, scale = 0.0, 0.0
    if len(reference) != len(onnx_outputs):
        return ParityCheck(name, shape, float("inf"), 1.0)
    for expected, actual in zip(reference, onnx_outputs):
        expected = expected.detach().float().numpy()
        if expected.shape != actual.shape:
            return ParityCheck(name, shape, float("inf"), 1.0)
        max_abs = max(max_abs, float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)))
        scale = max(scale, float(np.abs(expected).max(initial=0.0)))
    return ParityCheck(name, shape, max_abs, scale)


def onnx_session(path: Union[str, Path], threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of ``path`` (``threads`` intra-op threads; default: its own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _parse_dynamic(dynamic: Union[str, Sequence[str], None]) -> bool:
    """``'batch'`` or ``'batch,hw'`` -> whether height/width are dynamic (the batch always is)."""
    if dynamic is None:
        return False
    parts = {part.strip().lower() for part in (dynamic.split(",") if isinstance(dynamic, str) else dynamic)}
    unknown = parts - {"batch", "hw", ""}
    if unknown or "batch" not in parts:
        raise ValueError(f"dynamic axes must be 'batch' or 'batch,hw', received {dynamic!r}")
    return "hw" in parts


def _second_size(height: int, width: int, stride: int) -> Tuple[int, int]:
    """Another input size for tracing or checking a dynamic-size graph: larger by one or two strides."""
    return height + stride, width + 2 * stride


def _largest_stride(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    reductions = info.reduction() if hasattr(info, "reduction") else [level["reduction"] for level in info or []]
    return max(max(reductions, default=1), 8)


def plan_export(
    model: nn.Module,
    model_name: str,
    input_size: Optional[Sequence[int]] = None,
    batch: int = 1,
    dynamic: Union[str, Sequence[str]] = "batch",
    opset: int = DEFAULT_OPSET,
    features_only: bool = False,
) -> ExportPlan:
    """The sizes and inputs of an export of ``model``, refusing axes its classes declare fixed.

    The parity inputs are the photo at ``batch``, random inputs at another batch (the batch is dynamic)
    and, for a dynamic size, at another size. The traced input has a batch of at least 2 (a batch of 1
    can get folded into the graph) and, for a dynamic size, another size than the requested one (so
    that size-dependent steps such as a position-embedding resampling are in the graph).
    """
    dynamic_hw = _parse_dynamic(dynamic)
    if batch < 1:
        raise ValueError(f"{model_name}: batch must be positive, received {batch}")
    support = export_support(model)
    if dynamic_hw and not support.dynamic_hw:
        raise ValueError(f"{model_name}: dynamic height/width is not possible: {support.reason}")
    channels, height, width = model_input_size(model, input_size)
    inputs = [
        (f"photo batch {batch}", photo_batch(model, batch, height, width)),
        (f"random batch {batch + 1}", random_batch(model, batch + 1, channels, height, width, seed=1)),
    ]
    trace_hw = (height, width)
    if dynamic_hw:
        trace_hw = other_h, other_w = _second_size(height, width, _largest_stride(model))
        inputs.append((f"random {other_h}x{other_w}", random_batch(model, batch, channels, other_h, other_w, seed=2)))
    return ExportPlan(
        model_name=model_name,
        stem=model_name + ("_features" if features_only else ""),
        input_size=(channels, height, width),
        batch=batch,
        dynamic_hw=dynamic_hw,
        opset=opset,
        features_only=features_only,
        inputs=inputs,
        example=random_batch(model, max(batch, 2), channels, *trace_hw, seed=0),
    )


def trace_to_onnx(model: nn.Module, plan: ExportPlan, path: Path, references: Sequence[torch.Tensor]) -> None:
    """``torch.onnx.export`` of ``model`` at ``plan``'s example with its dynamic axes, checked by ``onnx.checker``."""
    import onnx

    output_names = _output_names(references, plan.features_only)
    with torch.no_grad(), warnings.catch_warnings(), export_symbolics(plan.opset):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (plan.example,),
            str(path),
            dynamo=False,
            opset_version=plan.opset,
            input_names=["input"],
            output_names=output_names,
            dynamic_axes=_dynamic_axes(output_names, references, plan.dynamic_hw),
            do_constant_folding=True,
        )
    graph = onnx.load(str(path))
    if any(rewrite_graph(graph).values()):
        onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))


def simplify_onnx(path: Path) -> None:
    """onnxscript's optimizer (constant folding, dead-code removal) on the graph at ``path``, in place."""
    import onnx
    from onnxscript import optimizer

    onnx.save(optimizer.optimize(onnx.load(str(path))), str(path))
    onnx.checker.check_model(str(path))


def check_parity(
    path: Path, plan: ExportPlan, references: Sequence[Sequence[torch.Tensor]], threads: Optional[int] = None
) -> List[ParityCheck]:
    """The graph at ``path`` in onnxruntime against PyTorch's ``references`` on every parity input."""
    session = onnx_session(path, threads)
    checks = []
    for (name, x), reference in zip(plan.inputs, references):
        try:
            outputs = session.run(None, {"input": x.numpy()})
        except Exception as error:  # onnxruntime refuses the input: the graph does not take it (a failed check)
            warnings.warn(
                f"{plan.model_name}: onnxruntime failed on {name}: {str(error).splitlines()[0]}", stacklevel=2
            )
            outputs = []
        checks.append(_compare(reference, outputs, name, tuple(x.shape)))
    return checks


def measure_latency(model: nn.Module, path: Path, x: torch.Tensor, threads: int = 1) -> Dict[str, float]:
    """Median latency (ms) of onnxruntime and of eager PyTorch on ``x``, both with ``threads`` threads."""
    session = onnx_session(path, threads)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feed = {"input": x.numpy()}
        onnx_ms = median_ms(lambda: session.run(None, feed), BENCHMARK_RUNS)
        with torch.no_grad():
            eager_ms = median_ms(lambda: model(x), BENCHMARK_RUNS)
    finally:
        torch.set_num_threads(torch_threads)
    return dict(onnxruntime=onnx_ms, pytorch=eager_ms, threads=threads)


def _write_report(model: nn.Module, result: ExportResult, out_dir: Path, stem: str, overwrite: bool) -> List[str]:
    from recurzoo.export.report import build_report, write_report

    model_report = build_report(model, result.input_size, name=stem)
    model_report["export"] = result.to_dict()
    return [str(path) for path in write_report(model_report, out_dir, stem, overwrite)]


def export_paths(
    model_name: str, out_dir: Union[str, Path] = "out", features_only: bool = False, report: bool = True
) -> List[Path]:
    """The files :func:`export_model` writes: the ``.onnx`` and, with ``report``, its report's JSON and Markdown."""
    from recurzoo.export.report import report_paths

    stem = model_name + ("_features" if features_only else "")
    return [Path(out_dir) / f"{stem}.onnx", *(report_paths(out_dir, stem) if report else ())]


def refuse_existing(paths: Sequence[Path]) -> None:
    """``FileExistsError`` naming the first of ``paths`` that exists (outputs not to be overwritten)."""
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(
                errno.EEXIST, "exists already and is not overwritten (--overwrite replaces it)", str(path)
            )


def export_model(
    model_name: str,
    out_dir: Union[str, Path] = "out",
    checkpoint: Optional[Union[str, Path]] = None,
    input_size: Optional[Sequence[int]] = None,
    batch: int = 1,
    dynamic: Union[str, Sequence[str]] = "batch",
    opset: int = DEFAULT_OPSET,
    features_only: bool = False,
    simplify: bool = False,
    report: bool = True,
    benchmark: bool = True,
    model: Optional[nn.Module] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    num_threads: Optional[int] = None,
    overwrite: bool = True,
) -> ExportResult:
    """Export ``model_name`` to ``out_dir/<model_name>.onnx`` and check it in onnxruntime.

    Args:
        model_name: a registered model (``recurzoo.list_models()``).
        out_dir: folder of the ``.onnx`` and of the report (``<stem>.report.json`` / ``.md``).
        checkpoint: weights to load (see :func:`recurzoo.export.models.create_model`); random otherwise.
        input_size: ``(C, H, W)`` to export at (default: the model's pretrained cfg).
        batch: batch of the example input and of the parity checks.
        dynamic: ``'batch'`` or ``'batch,hw'`` (dynamic height and width, where the model declares it can).
        opset: ONNX opset (18 or later for models that resample a position embedding).
        features_only: export timm's ``features_only`` form (one output per feature level).
        simplify: run onnxscript's optimizer (constant folding, dead-code removal) on the graph.
        report: write the FLOP/parameter report of the model at ``input_size`` beside the ``.onnx``.
        benchmark: time ONNX Runtime and eager PyTorch on the photo batch (one thread each).
        model: an already built model to export instead of creating ``model_name`` (tests).
        model_kwargs: more ``timm.create_model`` arguments.
        num_threads: onnxruntime's intra-op threads for the parity checks (default: its own choice).
        overwrite: replace the files of an earlier export; without it an existing one is refused before any
            work (``FileExistsError``).

    The ``.onnx`` is traced, checked and timed under a temporary name and renamed into place last, the
    report written atomically before it; an export that fails or is interrupted removes what it wrote
    and the folders it created.

    Returns:
        An :class:`ExportResult`; ``result.ok`` is False when a parity check exceeds the tolerance.
    """
    from recurzoo.checkpoint import atomic_write, removed_on_failure

    outputs = export_paths(model_name, out_dir, features_only, report)
    if not overwrite:
        refuse_existing(outputs)
    if model is None:
        model = create_model(model_name, checkpoint, features_only=features_only, **(model_kwargs or {}))
    model = model.eval()
    plan = plan_export(model, model_name, input_size, batch, dynamic, opset, features_only)
    with torch.no_grad():
        references = [_as_list(model(x)) for _, x in plan.inputs]
    out_dir, onnx_path = Path(out_dir), outputs[0]
    result = ExportResult(
        model_name=model_name,
        onnx_path=str(onnx_path),
        input_size=plan.input_size,
        batch=batch,
        dynamic_batch=True,
        dynamic_hw=plan.dynamic_hw,
        support=export_support(model),
        opset=opset,
        features_only=features_only,
        simplified=simplify,
    )

    def write(temporary: str) -> None:
        start = time.perf_counter()
        trace_to_onnx(model, plan, Path(temporary), references[0])
        if simplify:
            simplify_onnx(Path(temporary))
        result.export_seconds = time.perf_counter() - start
        result.checks = check_parity(Path(temporary), plan, references, num_threads)
        result.onnx_nodes = _node_count(Path(temporary))
        if benchmark:
            result.latency_ms = measure_latency(model, Path(temporary), plan.inputs[0][1])
        if report:
            result.report_paths = _write_report(model, result, out_dir, plan.stem, overwrite)

    with removed_on_failure(out_dir, outputs):
        atomic_write(onnx_path, write, overwrite)
    return result


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
