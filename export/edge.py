"""Edge deployment: int8 and fp16 ONNX, ExecuTorch (XNNPACK) programs, each with its measured fidelity.

``export_edge('hornet_tiny_7x7', 'out', fmt='onnx', precision='int8', calibration='photos/')``:

1. builds the model (:func:`recurzoo.export.models.create_model`) and exports the fp32 ONNX graph,
   checked in onnxruntime (:func:`recurzoo.export.onnx.export_model`);
2. reads the calibration and evaluation images with the preprocessing of the model's pretrained cfg
   (timm's eval transform: resize, centre crop, mean/std), the built-in photographs only when no
   folder is given (and the report says so);
3. lowers: onnxruntime static QDQ int8 (per-channel weights; Conv/MatMul/Gemm quantized, the other
   operators stay in float and are listed), fp16 (fp32 inputs and outputs), or ``torch.export`` to an
   XNNPACK-delegated ExecuTorch ``.pte`` (int8 through the PT2E flow with the XNNPACK quantizer),
   run back through ``executorch.runtime``;
4. measures fidelity against the fp32 model on the evaluation images (classifiers: top-1 agreement,
   and accuracy with labels; super-resolution: PSNR; camouflage: MAE of the masks), file size and
   latency (batch 1, one thread, against fp32 eager and fp32 onnxruntime);
5. writes the preprocessing into the artifact (ONNX ``metadata_props``; a JSON beside a ``.pte``) and
   the report (``<stem>.fidelity.json`` and ``.md``) beside it.

ExecuTorch and torchao come with the optional extra ``recurzoo[edge]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from recurzoo.export.models import create_model, median_ms, model_input_size, normalization, takes_unit_range

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "EdgeExportError",
    "EdgeResult",
    "ImageSet",
    "preprocessing",
    "load_images",
    "builtin_photos",
    "quantize_onnx_int8",
    "convert_onnx_fp16",
    "lower_executorch",
    "fidelity",
    "export_edge",
]

FORMATS = ("onnx", "executorch")
PRECISIONS = ("fp32", "fp16", "int8")
_QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]  # the compute; normalisation, softmax, GELU... stay in float
_LATENCY_RUNS = 5
_FOLDING_GROWTH = 1.1  # a prepared (optimized) graph this much larger than the fp32 one is prepared unoptimized
_BUILTIN_PHOTOS = (
    "chelsea",
    "astronaut",
    "coffee",
    "rocket",
    "cat",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)


class EdgeExportError(ValueError):
    """A model that cannot be lowered or quantized in the requested form (one line: the measured reason)."""


# --------------------------------------------------------------------------------------------------
# Preprocessing and images
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Images as the model takes them, where they came from, and their class indices when known."""

    images: torch.Tensor
    source: str
    labels: Optional[torch.Tensor] = None


def preprocessing(model: nn.Module, input_size: Sequence[int]) -> Dict[str, Any]:
    """What an edge app needs to feed the model: size, interpolation, crop, mean/std (None: [0, 1]), labels."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = normalization(model)
    meta: Dict[str, Any] = dict(
        input_size=list(input_size),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=cfg.get("crop_pct", 1.0),
        mean=list(mean) if mean else None,
        std=list(std) if std else None,
        input_range="[0, 1]" if mean is None else "normalised with mean/std after scaling to [0, 1]",
        layout="NCHW, RGB",
    )
    labels = class_labels(model)
    if labels:
        meta["labels"] = labels
    return meta


def class_labels(model: nn.Module) -> Optional[List[str]]:
    """The class names of an ImageNet classifier (from timm's packaged ImageNet info), else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num_classes = getattr(model, "num_classes", None)
    subset = infer_imagenet_subset(model) if num_classes else None
    if not subset:
        return None
    names = ImageNetInfo(subset).label_descriptions()
    return names if len(names) == num_classes else None


def _transform(model: nn.Module, input_size: Sequence[int]) -> Callable[..., torch.Tensor]:
    """timm's eval transform with the model's pretrained cfg, at ``input_size`` ([0, 1] for self-normalising models)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(model=model)
    config["input_size"] = tuple(input_size)
    if takes_unit_range(model):
        config.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return create_transform(**config)


def _to_pil(array: np.ndarray, channels: int) -> Any:
    from PIL import Image

    image = Image.fromarray(array)
    return image.convert("L") if channels == 1 else image.convert("RGB")


def load_images(
    model: nn.Module, input_size: Sequence[int], folder: Union[str, Path], count: int, option: str = "--calibration"
) -> ImageSet:
    """Up to ``count`` images of ``folder`` (or its class subfolders), preprocessed for ``model``.

    A folder of class subfolders (ImageFolder layout) gives labels: subfolder names that are class
    indices, or ImageNet synsets for ImageNet classifiers.

    Raises:
        EdgeExportError: for a folder without readable images, or subfolders that name no class.
    """
    from recurzoo.images import ImageError, collect_images, read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeExportError(f"{option} {folder}: not a folder of images")
    classes = sorted(path for path in folder.iterdir() if path.is_dir())
    try:
        files = [(path, None) for path in collect_images([folder])] if not classes else []
        for index, subfolder in enumerate(classes):
            label = _class_index(model, subfolder.name, index)
            files += [(path, label) for path in collect_images([subfolder])]
    except ImageError as error:  # an empty folder or class subfolder
        raise EdgeExportError(f"{option} {folder}: {error}, expected images or class subfolders of them") from None
    transform = _transform(model, input_size)
    images, labels, skipped = [], [], 0
    for path, label in files[:count] if count else files:
        try:
            images.append(transform(_to_pil(read_image(path), int(input_size[0]))))
        except ImageError:
            skipped += 1
            continue
        labels.append(label)
    if not images:
        raise EdgeExportError(
            f"{option} {folder}: no readable images (expected .png/.jpg files or class subfolders of them)"
        )
    source = f"{len(images)} images of {folder}" + (f" ({skipped} unreadable, skipped)" if skipped else "")
    has_labels = all(label is not None for label in labels)
    return ImageSet(torch.stack(images), source, torch.tensor(labels) if has_labels else None)


def _class_index(model: nn.Module, name: str, position: int) -> int:
    if name.isdigit():
        return int(name)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset:
        synsets = ImageNetInfo(subset).label_names()
        if name in synsets:
            return synsets.index(name)
    raise EdgeExportError(f"class folder {name!r}: expected a class index or an ImageNet synset (e.g. n01440764)")


def builtin_photos(model: nn.Module, input_size: Sequence[int]) -> ImageSet:
    """scikit-image's sample photographs (public domain), preprocessed for ``model``: the last resort."""
    from skimage import data

    transform = _transform(model, input_size)
    images = []
    for name in _BUILTIN_PHOTOS:
        photo = getattr(data, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        images.append(transform(_to_pil(np.ascontiguousarray(photo[..., :3]), int(input_size[0]))))
    return ImageSet(torch.stack(images), f"the {len(images)} built-in sample photographs (no folder given)")


# --------------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _write_onnx_metadata(proto: Any, meta: Dict[str, Any]) -> None:
    import onnx

    props = {f"recurzoo.{key}": json.dumps(value) for key, value in meta.items()}
    onnx.helper.set_model_props(proto, props)


def _onnx_float_ops(proto: Any) -> List[str]:
    """Operator types of the graph that compute in float (not fed by a DequantizeLinear of their weights)."""
    quantized = set()
    produced_by = {output: node for node in proto.graph.node for output in node.output}
    for node in proto.graph.node:
        sources = [produced_by.get(name) for name in node.input]
        if any(source is not None and source.op_type == "DequantizeLinear" for source in sources):
            quantized.add(node.name)
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Reshape", "Transpose", "Gather"}
    return sorted({n.op_type for n in proto.graph.node if n.name not in quantized and n.op_type not in skip})


class _CalibrationReader(CalibrationDataReader):
    """onnxruntime's calibration data reader over a batch of images, one image per call."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.index = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.index >= len(self.images):
            return None
        self.index += 1
        return {"input": self.images[self.index - 1 : self.index].numpy()}

    def rewind(self) -> None:
        self.index = 0


def quantize_onnx_int8(fp32_path: Path, out_path: Path, calibration: torch.Tensor, meta: Dict[str, Any]) -> List[str]:
    """Static QDQ int8 of the graph at ``fp32_path`` (per-channel weights, MinMax on ``calibration``).

    The MatMuls that multiply attention probabilities (fed by a Softmax) stay in float: quantized,
    onnxruntime fuses the Softmax into a QLinearSoftmax that is slower than the float one, and the
    probabilities lose most of their 8 bits (measured on ``sret_tiny``: int8 onnxruntime went from
    0.85x to 1.27x fp32's speed). Returns the operator types that stay in float.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _CalibrationReader(calibration)
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if prepared.stat().st_size > _FOLDING_GROWTH * fp32_path.stat().st_size:
            # onnxruntime's constant folding materialised what the graph computes from small tables (RGT's
            # position biases, one per window and head: int8 file 1.3x fp32's); the quantizer takes it unfolded
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True, skip_optimization=True)
        after_softmax = _matmuls_after_softmax(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=_QUANTIZED_OPS,
            nodes_to_exclude=after_softmax,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    proto = onnx.load(str(out_path))
    # The prepared graph's inferred shapes: onnxruntime infers them again when it loads the file
    # (2.2 MiB of rgt_small_x2's 22.6 MiB int8 file).
    del proto.graph.value_info[:]
    stored_int8 = _store_filter_weights_int8(proto)
    _write_onnx_metadata(proto, dict(meta, precision="int8"))
    onnx.save(proto, str(out_path))
    float_ops = _onnx_float_ops(proto)
    if after_softmax:
        float_ops.append(f"MatMul after Softmax ({len(after_softmax)})")
    if stored_int8:
        float_ops.append(f"Mul by a filter stored in int8 ({stored_int8})")
    return float_ops


def _store_filter_weights_int8(proto: Any) -> int:
    """Store the float weights that only elementwise ``Mul`` nodes read and that vary along more than one
    axis (HorNet GF's frequency filters) as int8, symmetric per channel of axis 0, read through a
    ``DequantizeLinear``; returns how many were stored so.

    onnxruntime's static quantization leaves a ``Mul`` in float and so kept these filters in fp32 (3.9 MiB of
    ``hornet_tiny_gf``'s 26.9 MiB int8 file). The multiplication still runs in float; only the stored weight
    changes. Per-channel scales (layer scale, one non-singleton axis) are small and stay as they are.
    """
    import onnx
    from onnx import helper, numpy_helper

    readers: Dict[str, List[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_inputs = {value.name for value in proto.graph.input}
    kept, count = [], 0
    for initializer in proto.graph.initializer:
        weight = numpy_helper.to_array(initializer)
        varying_axes = sum(extent > 1 for extent in weight.shape)
        only_mul = readers.get(initializer.name) and all(node.op_type == "Mul" for node in readers[initializer.name])
        if weight.dtype != np.float32 or varying_axes < 2 or not only_mul or initializer.name in graph_inputs:
            kept.append(initializer)
            continue
        peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        levels = np.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1)))
        name = initializer.name
        kept += [
            numpy_helper.from_array(np.clip(levels, -127, 127).astype(np.int8), f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_int8_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_int8_zero_point"),
        ]
        dequantize = helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero_point"], [name], axis=0
        )
        proto.graph.node.insert(0, dequantize)
        count += 1
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    if count:
        onnx.checker.check_model(proto)
    return count


def _matmuls_after_softmax(proto: Any) -> List[str]:
    """Names of the MatMul nodes whose input comes from a Softmax (through reshapes, casts or a Where)."""
    passes = {"Reshape", "Transpose", "Cast", "Where", "Identity", "Dropout", "Squeeze", "Unsqueeze"}
    produced_by = {output: node for node in proto.graph.node for output in node.output}

    def from_softmax(name: str, depth: int = 0) -> bool:
        node = produced_by.get(name)
        if node is None or depth > 4:
            return False
        if node.op_type == "Softmax":
            return True
        return node.op_type in passes and any(from_softmax(source, depth + 1) for source in node.input if source)

    return [node.name for node in proto.graph.node if node.op_type == "MatMul" and any(map(from_softmax, node.input))]


def convert_onnx_fp16(fp32_path: Path, out_path: Path, meta: Dict[str, Any]) -> List[str]:
    """fp16 weights and compute with fp32 inputs and outputs (onnxruntime's float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    source = onnx.load(str(fp32_path))
    _omit_empty_resize_inputs(source)
    kept = sorted({node.op_type for node in source.graph.node} & set(DEFAULT_OP_BLOCK_LIST))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = convert_float_to_float16(source, keep_io_types=True)
    _write_onnx_metadata(proto, dict(meta, precision="fp16"))
    onnx.save(proto, str(out_path))
    return kept


def _omit_empty_resize_inputs(proto: Any) -> None:
    """Empty ``roi``/``scales`` inputs of ``Resize`` as omitted inputs (``''``), as ONNX allows.

    The fp16 converter casts an empty constant to another empty tensor that shape inference no longer
    sees as empty, and onnxruntime then refuses the node (both sizes and scales given).
    """
    from onnx import numpy_helper

    empty = {
        output
        for node in proto.graph.node
        if node.op_type == "Constant" and node.attribute and numpy_helper.to_array(node.attribute[0].t).size == 0
        for output in node.output
    }
    empty |= {init.name for init in proto.graph.initializer if len(init.dims) > 0 and np.prod(init.dims) == 0}
    for node in proto.graph.node:
        if node.op_type == "Resize":
            for index in (1, 2):
                if index < len(node.input) and node.input[index] in empty:
                    node.input[index] = ""


def _require_executorch() -> None:
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError:
        raise EdgeExportError(
            "--format executorch needs executorch and torchao: pip install 'recurzoo[edge]'"
        ) from None


def lower_executorch(
    model: nn.Module, example: torch.Tensor, out_path: Path, precision: str, calibration: torch.Tensor
) -> List[str]:
    """``torch.export`` -> (PT2E int8 with the XNNPACK quantizer) -> XNNPACK-delegated ``.pte`` at ``out_path``.

    Returns the operator names left outside the XNNPACK delegate (run by ExecuTorch's portable kernels).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from recurzoo.export.onnx import static_adaptive_pooling

    # The math attention kernel: the fused CPU kernel's decomposition views permuted (non-contiguous) tensors,
    # which ExecuTorch's memory planning refuses (sliced SReT, RGT); the math one lowers to XNNPACK matmuls.
    model = _at_size(model, example.shape[-2:])
    with torch.no_grad(), static_adaptive_pooling(), sdpa_kernel(SDPBackend.MATH):
        program = torch.export.export(model, (example,))
        # Weights computed from parameters (HorNet's scaled pointwise weights and biases, its DFT matrices'
        # products) become constants: XNNPACK takes a matmul only with static weights, else it runs portable.
        # Gathers stay unfolded: folded, RGT's position biases (small tables gathered by one shared window index)
        # were stored once a block, full size (rgt_small_x2 program 2.6x its fp32 ONNX file).
        program = constant_prop_pass(
            program.run_decompositions({torch.ops.aten.scaled_dot_product_attention.default: _plain_attention}),
            custom_skip_targets={torch.ops.aten.index.Tensor},
        )
        if precision == "int8":
            # Registers the out variants of quantize/dequantize for those left outside the delegate (the weight
            # of an operator XNNPACK refuses, as HorNet's addmm): without it the program does not serialize.
            import executorch.kernels.quantized  # noqa: F401
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = _float_only(XNNPACKQuantizer)().set_global(
                get_symmetric_quantization_config(is_per_channel=True)
            )
            prepared = prepare_pt2e(program.module(), quantizer)
            for image in calibration:
                prepared(image[None])
            program = torch.export.export(_one_dequantize_per_user(convert_pt2e(prepared)), (example,))
        edge = to_edge_transform_and_lower(
            program,
            transform_passes=[_delegable_views_pass()],
            partitioner=[XnnpackPartitioner(configs=_xnnpack_configs())],
        )
    outside = sorted({_operator_name(node.target) for node in edge.exported_program().graph.nodes if _portable(node)})
    out_path.write_bytes(edge.to_executorch().buffer)
    return outside


def _delegable_views_pass() -> Any:
    """An ExecuTorch pass that rewrites the copies XNNPACK's partitioner refuses into ones it takes, or removes them.

    ``squeeze_copy`` and an ``unsqueeze_copy`` of any but the last dimension become ``view_copy``;
    ``select_copy`` (``unbind``) becomes ``slice_copy`` and ``view_copy``, and ``split_with_sizes_copy``
    (``chunk``, ``split``) of a float map becomes ``slice_copy`` (int8 splits stay: see ``rewrite``);
    ``expand_copy`` to the same shape, ``alias_copy`` and a one-tensor ``cat`` are dropped. Each refused
    copy ran in ExecuTorch's portable kernels and cut the delegate in two (a timm attention's
    ``qkv.unbind(0)``, RGT's whole-map window slices, the batch ``expand`` of every 4-D matmul).
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass, PassResult

    aten = exir_ops.edge.aten
    squeezes = (aten.squeeze_copy.dims, aten.squeeze_copy.dim, aten.squeeze_copy.default, aten.unsqueeze_copy.default)

    def shape(node: Any) -> List[int]:
        return list(node.meta["val"].shape)

    def view(graph: Any, source: Any, like: Any) -> Any:
        """A ``view_copy`` of ``source`` to the shape of the node ``like``, carrying its metadata."""
        node = graph.call_function(aten.view_copy.default, (source, shape(like)))
        node.meta["val"] = like.meta["val"]
        return node

    def rewrite(graph: Any, node: Any) -> bool:
        target, source = node.target, node.args[0]
        if target in squeezes:
            trailing = target == aten.unsqueeze_copy.default and node.args[1] in (-1, len(shape(node)) - 1)
            if trailing:  # XNNPACK takes it as it is
                return False
            with graph.inserting_before(node):
                node.replace_all_uses_with(view(graph, source, node))
            return True
        if target == aten.select_copy.int:
            dim = node.args[1] % source.meta["val"].dim()  # XNNPACK's layout pass reads dims as non-negative
            index = node.args[2] % source.meta["val"].shape[dim]
            with graph.inserting_before(node):
                sliced = graph.call_function(aten.slice_copy.Tensor, (source, dim, index, index + 1))
                sliced.meta["val"] = source.meta["val"].narrow(dim, index, 1)
                node.replace_all_uses_with(view(graph, sliced, node))
            return True
        if target == aten.split_with_sizes_copy.default:
            # Not in int8: the program then failed to run (an XNNPACK slice of a dequantized HorNet map
            # resized its output to zero channels, "Attempted to resize a static tensor").
            dequantized = source.op == "call_function" and "dequantize" in str(source.target)
            return not dequantized and _split_as_slices(graph, node, aten.slice_copy.Tensor)
        same_shape = target == aten.expand_copy.default and shape(source) == shape(node)
        if (same_shape or target == aten.alias_copy.default) and source.op != "placeholder":
            node.replace_all_uses_with(source)
            return True
        if target == aten.cat.default and len(source) == 1 and source[0].op != "placeholder":
            node.replace_all_uses_with(source[0])
            return True
        return False

    class DelegableViews(ExportPass):
        def call(self, graph_module: torch.fx.GraphModule) -> Any:
            graph = graph_module.graph
            changed = False
            for node in list(graph.nodes):
                if node.op == "call_function" and "val" in node.meta:
                    changed = rewrite(graph, node) or changed
            if not changed:
                return PassResult(graph_module, False)
            graph.eliminate_dead_code()
            graph_module.recompile()
            return PassResult(super().call(graph_module).graph_module, True)  # traced again: fresh metadata

    return DelegableViews()


def _split_as_slices(graph: Any, node: Any, slice_op: Any) -> bool:
    """Replace each read part (``getitem``) of the split ``node`` by a slice of its input; whether any was."""
    import operator

    source, sizes = node.args[0], node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else 0) % source.meta["val"].dim()
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    parts = [user for user in node.users if user.target is operator.getitem]
    if len(parts) != len(node.users):
        return False
    for part in parts:
        index = part.args[1]
        with graph.inserting_before(part):
            sliced = graph.call_function(slice_op, (source, dim, starts[index], starts[index] + sizes[index]))
        sliced.meta["val"] = part.meta["val"]  # read by the rewrites of the part's users
        part.replace_all_uses_with(sliced)
    return bool(parts)


def _plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``: scaled dot-product attention as XNNPACK's matmuls and softmax.

    PyTorch's own decomposition guards rows whose every key is masked (``_safe_softmax``: zeros, not NaN)
    with ``eq``/``any``/``where`` operators XNNPACK does not take; they ran in ExecuTorch's portable kernels
    between the delegated matmuls (SReT-T fp32 program: 63.6 -> 29.1 ms, ``edge_bench``). No model of the zoo
    masks a whole row (SReT keeps a padding slice's keys, RGT masks with -100), so the guard is left out.
    Dropout, causal masks and grouped queries keep PyTorch's decomposition.
    """
    if dropout_p or is_causal or enable_gqa:
        return torch.ops.aten.scaled_dot_product_attention.default.decompose(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1) @ value


def _float_only(quantizer_class: Any) -> Any:
    """``quantizer_class`` whose annotations leave integer tensors alone and quantize every use of a shared weight.

    XNNPACK's quantizer annotates every ``add``/``mul``, also integer ones: RGT computes the kind of
    each shifted window (an index) with them, and an observed index is no longer an integer tensor.
    It also annotates only the first convolution or linear layer of a weight used more than once
    (:func:`_annotate_shared_weights`).
    """

    def floating(node: Any) -> bool:
        value = node.meta.get("val")
        return not isinstance(value, torch.Tensor) or value.dtype.is_floating_point

    class FloatOnly(quantizer_class):  # type: ignore[misc, valid-type]
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            _annotate_shared_weights(model, self.global_config)
            for node in model.graph.nodes:
                annotation = node.meta.get("quantization_annotation")
                if annotation is None:
                    continue
                if not floating(node):
                    del node.meta["quantization_annotation"]
                    continue
                for source in [source for source in annotation.input_qspec_map if not floating(source)]:
                    del annotation.input_qspec_map[source]
            return model

    return FloatOnly


_WEIGHTED_OPS = ("conv1d", "conv2d", "linear")
_ANNOTATION = "quantization_annotation"


def _annotate_shared_weights(model: Any, config: Any) -> None:
    """Annotate the convolutions and linear layers whose weight XNNPACK's quantizer already gave to another one.

    Its annotators mark a layer's weight as done, so the second and later layers of a shared weight
    (MSRNet runs its backbone and decoder laterals on three scales) stay unannotated: float inputs
    with the int8 weight dequantized. XNNPACK's partitioner still takes such a convolution, and the
    program then fails to load ("Failed to create convolution node ... xnn_status_invalid_parameter",
    "error 0x1"). Each is annotated with the first one's observers: its input, its weight (one int8
    copy) and its output (after a single ReLU when one follows). Own input/output parameters are not
    enough: XNNPACK keys constants by the hash of their bytes and packs a weight once, with the input
    zero point and requantization scales folded in, so a second use with other parameters computed
    wrong values (measured on a two-scale stem: 10% RMS error against fp32, 1.3% with shared ones,
    1.2% for the quantized PyTorch model).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import propagate_annotation
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    if config is None:
        return
    relus = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
    added = False
    for node in model.graph.nodes:
        if node.op != "call_function" or _ANNOTATION in node.meta or len(node.args) < 2:
            continue
        if getattr(node.target, "_opname", None) not in _WEIGHTED_OPS or not isinstance(node.args[1], torch.fx.Node):
            continue
        weight = node.args[1]
        owners = [user for user in weight.users if weight in getattr(user.meta.get(_ANNOTATION), "input_qspec_map", {})]
        if not owners or not isinstance(node.args[0], torch.fx.Node):
            continue
        owner = owners[0]
        inputs = {
            node.args[0]: SharedQuantizationSpec((owner.args[0], owner)),
            weight: SharedQuantizationSpec((weight, owner)),
        }
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, torch.fx.Node) and config.bias is not None:
            inputs[bias] = config.bias
        owner_output = _annotated_output(owner)
        output = SharedQuantizationSpec(owner_output) if owner_output is not None else config.output_activation
        users = list(node.users)
        if len(users) == 1 and users[0].target in relus and _ANNOTATION not in users[0].meta:
            node.meta[_ANNOTATION] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
            users[0].meta[_ANNOTATION] = QuantizationAnnotation(output_qspec=output, _annotated=True)
        else:
            annotation = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)
            node.meta[_ANNOTATION] = annotation
        added = True
    if added:  # the pools, views and slices after them take their parameters
        propagate_annotation(model)


def _annotated_output(node: Any) -> Any:
    """The node whose output carries the quantization of ``node``'s result: itself, or the single ReLU after it."""
    annotation = node.meta.get(_ANNOTATION)
    if annotation is not None and annotation.output_qspec is not None:
        return node
    users = list(node.users)
    if len(users) == 1 and getattr(users[0].meta.get(_ANNOTATION), "output_qspec", None) is not None:
        return users[0]
    return None


def _one_dequantize_per_user(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``module`` with each activation's ``dequantize_per_tensor`` copied for every user (the same values).

    torchao's convert gives a copy to each quantized user but leaves one dequantize shared by the
    float users (average pooling and bilinear resizing, which XNNPACK's partitioner takes in fp32
    only, also in an int8 graph) and by the graph's output. XNNPACK runs convolutions
    channels-last, and its layout pass, bringing a shared dequantize back to channels-first for an
    output or a view, moves every user of it to the channels-first copy (``replace_all_uses_with``),
    also the channels-last pooling or resizing it had already placed: that operator then reads a
    channels-first tensor as channels-last, and the program fails when run ("Propagating input
    shapes failed with code: xnn_status_invalid_parameter"; MSRNet's decoded map, resized for every
    finer level and passed to the next partition). With one dequantize per user, each conversion
    moves its own user only.
    """
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor
    targets = (dequantize.default, dequantize.tensor)
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_after(node):
                copy = graph.node_copy(node)
            user.replace_input_with(node, copy)
    module.recompile()
    return module


_XNNPACK_MAX_RANK = 6  # XNN_MAX_TENSOR_DIMS: a delegate holding a 7-D tensor fails to load ("error 0x1")


def _xnnpack_configs() -> List[Any]:
    """XNNPACK's partitioner configurations, each refusing a node with a tensor of more than 6 dimensions.

    RGT's rectangle-window partition reshapes to 7-D; those views and permutes run in ExecuTorch's
    portable kernels, the rest in the delegate.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS

    def rank(value: Any) -> int:
        values = value if isinstance(value, (list, tuple)) else [value]
        return max((len(v.shape) for v in values if isinstance(v, torch.Tensor)), default=0)

    def within_rank(node: Any) -> bool:
        sources = [arg for arg in node.all_input_nodes] + [node]
        return all(rank(source.meta.get("val")) <= _XNNPACK_MAX_RANK for source in sources)

    def limited(config: Any) -> Any:
        def check_constraints(self: Any, node: Any, program: Any) -> bool:
            return within_rank(node) and config.check_constraints(self, node, program)

        return type(config.__name__, (config,), {"check_constraints": check_constraints})

    return [limited(config) for config in ALL_PARTITIONER_CONFIGS]


def _at_size(model: nn.Module, size: Sequence[int]) -> nn.Module:
    """A copy of ``model`` made for ``size`` inputs with its own ``set_input_size`` (timm's ViT API), else ``model``.

    The position embedding is then resampled once, eagerly, by the function the forward would call at
    that size (the same numbers), instead of in the program: its antialiased bicubic resampling
    (``_upsample_bicubic2d_aa``) is not in ExecuTorch's core ATen opset.
    """
    if not callable(getattr(model, "set_input_size", None)):
        return model
    import copy

    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=tuple(int(side) for side in size))
    return resized.eval()


def _portable(node: Any) -> bool:
    """A graph call the XNNPACK delegate did not take (run by ExecuTorch's portable kernels)."""
    target = str(node.target)
    return node.op == "call_function" and "executorch_call_delegate" not in target and "getitem" not in target


def _operator_name(target: Any) -> str:
    """``aten.native_layer_norm.default`` -> ``native_layer_norm``."""
    parts = getattr(target, "__name__", str(target)).split(".")
    return parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[0]


def _pte_runner(path: Path) -> Callable[[torch.Tensor], List[np.ndarray]]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda x: [np.asarray(t) for t in method.execute([x.contiguous()])]


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], List[np.ndarray]]:
    from recurzoo.export.onnx import onnx_session

    session = onnx_session(path, threads=1)
    return lambda x: session.run(None, {"input": x.numpy()})


# --------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------


def _run_each(run: Callable[[torch.Tensor], List[np.ndarray]], images: torch.Tensor) -> np.ndarray:
    """The first output of ``run`` on every image (batch 1: a ``.pte`` has a fixed batch)."""
    return np.concatenate([np.asarray(run(image[None])[0], dtype=np.float32) for image in images])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of ``(N, C, H, W)`` images in [0, 1] (scikit-image, Gaussian weights as in the paper)."""
    from skimage.metrics import structural_similarity

    a, b = np.clip(a, 0, 1).transpose(0, 2, 3, 1), np.clip(b, 0, 1).transpose(0, 2, 3, 1)
    scores = [
        structural_similarity(x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5)
        for x, y in zip(a, b)
    ]
    return float(np.mean(scores))


def _s_measure(masks: np.ndarray, reference: np.ndarray) -> float:
    """S-measure of ``masks`` against the fp32 masks binarised at 0.5 (pysodmetrics); ``(N, 1, H, W)`` in [0, 1]."""
    from py_sod_metrics import Smeasure

    metric = Smeasure()
    for mask, target in zip(masks, reference):
        metric.step(pred=np.round(mask[0] * 255).astype(np.uint8), gt=(target[0] > 0.5).astype(np.uint8) * 255)
    return float(metric.get_results()["sm"])


def fidelity(
    task: Optional[str], reference: np.ndarray, output: np.ndarray, labels: Optional[torch.Tensor]
) -> Dict[str, float]:
    """How close ``output`` is to the fp32 ``reference``.

    Classifiers: top-1 agreement (and top-1 accuracy of both with ``labels``); super-resolution: PSNR
    and SSIM; camouflage: MAE and S-measure of the masks (sigmoid of the logits).
    """
    result: Dict[str, float] = dict(max_abs_diff=float(np.abs(output - reference).max()))
    if task == "sr":
        result.update(psnr_vs_fp32_db=_psnr(output, reference), ssim_vs_fp32=_ssim(output, reference))
    elif task == "cod":
        masks, reference_masks = 1 / (1 + np.exp(-output)), 1 / (1 + np.exp(-reference))
        result["mask_mae_vs_fp32"] = float(np.abs(masks - reference_masks).mean())
        result["s_measure_vs_fp32"] = _s_measure(masks, reference_masks)
    else:
        top1, ref_top1 = output.reshape(len(output), -1).argmax(1), reference.reshape(len(reference), -1).argmax(1)
        result["top1_agreement"] = float((top1 == ref_top1).mean())
        if labels is not None:
            result["top1_accuracy"] = float((top1 == labels.numpy()).mean())
            result["fp32_top1_accuracy"] = float((ref_top1 == labels.numpy()).mean())
    return result


# --------------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------------


@dataclass
class EdgeResult:
    """What :func:`export_edge` wrote and measured."""

    model_name: str
    format: str
    precision: str
    path: str
    input_size: Tuple[int, int, int]
    size_bytes: int
    fp32_onnx_size_bytes: int
    calibration: str
    evaluation: str
    fidelity: Dict[str, float]
    latency_ms: Dict[str, float]
    peak_memory_mib: Dict[str, float] = field(default_factory=dict)
    time_shares: Dict[str, float] = field(default_factory=dict)
    float_ops: List[str] = field(default_factory=list)
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    report_paths: List[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.fp32_onnx_size_bytes

    def summary(self) -> str:
        """One line: the file, its size against fp32, fidelity and latency."""
        scores = ", ".join(f"{key} {value:.4g}" for key, value in self.fidelity.items())
        latency = ", ".join(f"{key} {value:.2f} ms" for key, value in self.latency_ms.items())
        return (
            f"{self.model_name}: {Path(self.path).name} ({self.format} {self.precision}), "
            f"{self.size_bytes / 2**20:.2f} MiB = {self.size_ratio:.2f}x fp32; {scores}; latency {latency}"
        )

    def to_markdown(self) -> str:
        rows = [
            ("artifact", f"`{Path(self.path).name}` ({self.format}, {self.precision})"),
            ("file size", f"{self.size_bytes / 2**20:.2f} MiB ({self.size_ratio:.2f}x the fp32 ONNX)"),
            ("calibration", self.calibration if self.precision == "int8" else "-"),
            ("evaluated on", self.evaluation),
            *[(key.replace("_", " "), f"{value:.4g}") for key, value in self.fidelity.items()],
            *[(f"latency {key} (batch 1, 1 thread)", f"{value:.2f} ms") for key, value in self.latency_ms.items()],
            *[
                (f"peak memory {key} (load + one run, fresh process)", f"{value:.1f} MiB")
                for key, value in self.peak_memory_mib.items()
            ],
            *[
                (f"share of int8 onnxruntime kernel time: {key}", f"{value:.0%}")
                for key, value in self.time_shares.items()
            ],
            ("operators left in float / outside the delegate", ", ".join(self.float_ops) or "none"),
        ]
        lines = [f"# {self.model_name}: {self.format} {self.precision}", "", "| | |", "| --- | --- |"]
        return "\n".join(lines + [f"| {key} | {value} |" for key, value in rows]) + "\n"


def _write_report(result: EdgeResult, out_dir: Path, stem: str) -> List[str]:
    from recurzoo.checkpoint import atomic_write

    data = dict(asdict(result), size_ratio=result.size_ratio)
    json_path = atomic_write(
        out_dir / f"{stem}.fidelity.json", lambda t: Path(t).write_text(json.dumps(data, indent=2))
    )
    md_path = atomic_write(out_dir / f"{stem}.fidelity.md", lambda t: Path(t).write_text(result.to_markdown()))
    return [str(json_path), str(md_path)]


def edge_paths(model_name: str, out_dir: Union[str, Path], fmt: str, precision: str) -> List[Path]:
    """The files :func:`export_edge` writes: the fp32 ONNX it starts from, the artifact, the ExecuTorch
    program's preprocessing JSON, and the fidelity report."""
    out_dir = Path(out_dir)
    path = out_dir / f"{model_name}.{precision}.{'onnx' if fmt == 'onnx' else 'pte'}"
    beside = [path.with_suffix(".json")] if fmt == "executorch" else []
    return [
        out_dir / f"{model_name}.onnx",
        path,
        *beside,
        *(out_dir / f"{path.name}.fidelity.{x}" for x in ("json", "md")),
    ]


def _images(model: nn.Module, size: Sequence[int], folder: Any, count: int, option: str) -> ImageSet:
    if isinstance(folder, ImageSet):
        return folder
    return load_images(model, size, folder, count, option) if folder is not None else builtin_photos(model, size)


def _lower(
    model: nn.Module, fmt: str, precision: str, fp32_path: Path, path: Path, calibration: ImageSet, meta: Dict[str, Any]
) -> Tuple[List[str], Callable[[torch.Tensor], List[np.ndarray]]]:
    """Write the artifact at ``path`` (atomically); return the operators left in float and a runner of it."""
    from recurzoo.checkpoint import atomic_write

    float_ops: List[str] = []

    def write(temporary: str) -> None:
        target = Path(temporary)
        if fmt == "onnx" and precision == "int8":
            float_ops.extend(quantize_onnx_int8(fp32_path, target, calibration.images, meta))
        elif fmt == "onnx":
            float_ops.extend(convert_onnx_fp16(fp32_path, target, meta))
        else:
            example = calibration.images[:1]
            float_ops.extend(lower_executorch(model, example, target, precision, calibration.images))

    atomic_write(path, write)
    if fmt == "executorch":
        atomic_write(
            path.with_suffix(".json"),
            lambda t: Path(t).write_text(json.dumps(dict(meta, precision=precision), indent=2)),
        )
        return float_ops, _pte_runner(path)
    return float_ops, _onnx_runner(path)


def export_edge(
    model_name: str,
    out_dir: Union[str, Path] = "out",
    fmt: str = "onnx",
    precision: str = "int8",
    checkpoint: Optional[Union[str, Path]] = None,
    input_size: Optional[Sequence[int]] = None,
    calibration: Union[str, Path, ImageSet, None] = None,
    calibration_count: int = 32,
    evaluation: Union[str, Path, ImageSet, None] = None,
    model: Optional[nn.Module] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> EdgeResult:
    """Export ``model_name`` as an edge artifact in ``out_dir`` and measure it against the fp32 model.

    Args:
        model_name: a registered model.
        fmt: ``'onnx'`` or ``'executorch'``.
        precision: ``'fp16'`` or ``'int8'`` for ONNX; ``'fp32'`` or ``'int8'`` for ExecuTorch.
        checkpoint: weights to load; random weights otherwise.
        input_size: ``(C, H, W)`` (default: the model's pretrained cfg).
        calibration: a folder of images (or an :class:`ImageSet`) for int8 calibration; the built-in
            photographs otherwise.
        calibration_count: at most this many calibration images.
        evaluation: a folder of images, labelled by class subfolders or not (or an :class:`ImageSet`);
            the calibration images otherwise.
        model: an already built model (tests); model_kwargs: more ``timm.create_model`` arguments.

    Raises:
        EdgeExportError: for an unsupported format/precision, or a model that cannot be lowered (one line).
    """
    from recurzoo.export.onnx import export_model
    from recurzoo.registry import model_task

    allowed = {"onnx": ("fp16", "int8"), "executorch": ("fp32", "int8")}
    if fmt not in allowed or precision not in allowed[fmt]:
        raise EdgeExportError(
            f"--format {fmt} --precision {precision}: expected onnx with fp16|int8 or executorch with fp32|int8 "
            "(plain fp32 ONNX: recurzoo export NAME)"
        )
    if fmt == "executorch":
        _require_executorch()
    if model is None:
        model = create_model(model_name, checkpoint, **(model_kwargs or {}))
    model = model.eval()
    size = model_input_size(model, input_size)
    calibration_set = _images(model, size, calibration, calibration_count, "--calibration")
    evaluation_set = _images(model, size, evaluation, 0, "--eval") if evaluation is not None else calibration_set
    out_dir = Path(out_dir)
    try:
        fp32 = export_model(model_name, out_dir, model=model, input_size=size, report=False, benchmark=False)
    except Exception as error:  # the exporter's own failure is the measured reason (the fp32 graph is the reference)
        raise EdgeExportError(
            f"{model_name}: cannot be lowered to {fmt} {precision}: its fp32 ONNX reference does not export: "
            f"{_one_line(error)}"
        ) from error
    if not fp32.ok:
        raise EdgeExportError(f"{model_name}: the fp32 ONNX graph does not match PyTorch: {fp32.parity_line()}")
    meta = preprocessing(model, size)
    path = edge_paths(model_name, out_dir, fmt, precision)[1]
    try:
        float_ops, run = _lower(model, fmt, precision, Path(fp32.onnx_path), path, calibration_set, meta)
    except EdgeExportError:
        raise
    except Exception as error:  # the lowering's own failure is the measured reason this model cannot be exported
        raise EdgeExportError(f"{model_name}: cannot be lowered to {fmt} {precision}: {_one_line(error)}") from error
    with torch.no_grad():
        reference = np.concatenate([model(image[None]).float().numpy() for image in evaluation_set.images])
    output = _run_each(run, evaluation_set.images)
    result = EdgeResult(
        model_name=model_name,
        format=fmt,
        precision=precision,
        path=str(path),
        input_size=size,
        size_bytes=path.stat().st_size,
        fp32_onnx_size_bytes=Path(fp32.onnx_path).stat().st_size,
        calibration=calibration_set.source,
        evaluation=evaluation_set.source
        if evaluation is not None
        else f"the calibration set: {calibration_set.source}",
        fidelity=fidelity(model_task(model_name), reference, output, evaluation_set.labels),
        latency_ms=_latency(
            model,
            Path(fp32.onnx_path),
            (lambda: _pte_runner(path)) if fmt == "executorch" else (lambda: run),
            evaluation_set.images[:1],
            f"{fmt} {precision}",
            executorch=fmt == "executorch",
        ),
        peak_memory_mib=_peak_memory(Path(fp32.onnx_path), path, fmt, precision, (1, *size)),
        time_shares=onnx_time_shares(path, evaluation_set.images[:1]) if fmt == "onnx" and precision == "int8" else {},
        float_ops=float_ops,
        preprocessing=meta,
    )
    result.report_paths = _write_report(result, out_dir, path.name)
    return result


_INT8_KERNELS = ("QLinear", "ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantize")


def onnx_time_shares(path: Path, x: torch.Tensor, runs: int = 5) -> Dict[str, float]:
    """Where an int8 graph spends its kernel time (onnxruntime's profiler, one thread, batch 1): the shares of
    int8 compute (the fused ``QLinear*`` kernels), quantize/dequantize, and operators left in float."""
    import tempfile

    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {"input": x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals = {"int8 compute": 0.0, "quantize/dequantize": 0.0, "float operators": 0.0}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            totals["quantize/dequantize"] += event["dur"]
        elif op.startswith(_INT8_KERNELS):
            totals["int8 compute"] += event["dur"]
        else:
            totals["float operators"] += event["dur"]
    total = sum(totals.values())
    return {key: value / total for key, value in totals.items()} if total else {}


_PEAK_MEMORY_SCRIPT = """
import json, sys
import numpy as np
kind, path, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if kind == "onnx":
    import onnxruntime
else:
    import torch
    import executorch.kernels.quantized  # the quantize/dequantize out variants an int8 program may call
    from executorch.runtime import Runtime

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) / 1024 for line in lines if line.startswith(field))

with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak resident size restarts here, after the imports
before = status("VmRSS:")
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
if kind == "onnx":
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, {"input": x})
else:
    Runtime.get().load_program(path).load_method("forward").execute([torch.from_numpy(x)])
print(json.dumps(status("VmHWM:") - before))
"""


def _peak_memory(fp32_path: Path, path: Path, fmt: str, precision: str, shape: Sequence[int]) -> Dict[str, float]:
    """MiB that loading and running each artifact once (batch 1, one thread) adds to a fresh process's peak
    resident size, measured after its runtime is imported. Empty where ``/proc`` cannot say (not Linux)."""
    result: Dict[str, float] = {}
    for label, kind, artifact in (("fp32 onnxruntime", "onnx", fp32_path), (f"{fmt} {precision}", fmt, path)):
        peak = _peak_memory_mib(kind, artifact, shape)
        if peak is None:
            return {}
        result[label] = peak
    return result


def _peak_memory_mib(kind: str, artifact: Path, shape: Sequence[int]) -> Optional[float]:
    """The peak memory of one ``'onnx'`` or ``'executorch'`` artifact (:func:`_peak_memory`); None if unmeasured."""
    import subprocess

    command = [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, kind, str(artifact), json.dumps(list(shape))]
    try:
        worker = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        return float(worker.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _latency(
    model: nn.Module,
    fp32_path: Path,
    load: Callable[[], Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    label: str,
    executorch: bool = False,
) -> Dict[str, float]:
    """Median ms at batch 1 on one thread: fp32 eager, fp32 onnxruntime and the artifact, in this process.

    ``load`` gives the artifact's runner, called on one thread: an ExecuTorch program must be loaded
    there (:func:`_one_thread`, with ``executorch``).
    """
    fp32_onnx = _onnx_runner(fp32_path)
    with torch.no_grad(), _one_thread(executorch):
        runners = [load()]
        result = {
            "fp32 eager": median_ms(lambda: model(x), _LATENCY_RUNS),
            "fp32 onnxruntime": median_ms(lambda: fp32_onnx(x), _LATENCY_RUNS),
            label: median_ms(lambda: runners[0](x), _LATENCY_RUNS),
        }
        runners.clear()  # released with the pool it was loaded with
    return result


@contextlib.contextmanager
def _one_thread(executorch: bool = False) -> Iterator[None]:
    """PyTorch and, with ``executorch``, ExecuTorch's threadpool (XNNPACK's threads; one a core by default) on
    one thread.

    The pool is replaced, not resized, and an XNNPACK program keeps the pool it was loaded with: one
    loaded before runs on a freed pool inside (measured: segmentation faults and futex aborts in
    ``execute``, two runs in four, on MSRNet's int8 program), so load programs inside.
    """
    threads = torch.get_num_threads()
    runtime = None
    if executorch:
        from executorch.extension.pybindings import portable_lib as runtime
    pool = runtime._threadpool_get_thread_count() if runtime is not None else None
    torch.set_num_threads(1)
    if runtime is not None:
        runtime._unsafe_reset_threadpool(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if runtime is not None:
            runtime._unsafe_reset_threadpool(pool)
