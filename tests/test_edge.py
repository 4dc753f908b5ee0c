"""Edge deployment: int8 and fp16 ONNX artifacts, their metadata and fidelity, and a real accuracy check.

The ExecuTorch half needs the optional extra ``recurzoo[edge]`` and minutes per model; it runs in
``make edge-check`` (the digits check in both formats), and here only when executorch is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from _reduced import REDUCED
from torch import nn

import recurzoo
from recurzoo.cli import main
from recurzoo.export.digits import digits_check
from recurzoo.export.edge import EdgeExportError, ImageSet, builtin_photos, export_edge, fidelity
from recurzoo.export.models import export_support
from recurzoo.export.onnx import static_adaptive_pooling

SIDE = 32


def _reduced(name: str) -> nn.Module:
    return recurzoo.create_model(name, **REDUCED[recurzoo.model_family(name)]).eval()


def _metadata(path: str) -> dict:
    return {prop.key: json.loads(prop.value) for prop in onnx.load(path).metadata_props}


def test_digits_classifier_int8_onnx_is_within_one_point_of_fp32_on_held_out_digits():
    results = digits_check(("onnx",))["onnx"]
    assert results["fp32_top1_accuracy"] > 0.9  # the model really learned the digits
    assert results["top1_accuracy"] >= results["fp32_top1_accuracy"] - 0.01
    assert results["size_ratio"] < 0.5


def test_int8_onnx_is_quantized_per_channel_carries_its_preprocessing_and_reports_fidelity(tmp_path):
    model = _reduced("hornet_tiny_7x7")
    result = export_edge("hornet_tiny_7x7", tmp_path, precision="int8", model=model, input_size=(3, SIDE, SIDE))
    proto = onnx.load(result.path)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") > 5 and "Conv" in ops
    weight_scales = [
        init
        for init in proto.graph.initializer
        if init.name.endswith("_scale") and len(init.dims) == 1 and init.dims[0] > 1
    ]
    assert weight_scales, "weights are quantized per output channel"
    assert not proto.graph.value_info  # the quantizer's shape annotations are not stored
    meta = _metadata(result.path)
    assert meta["recurzoo.mean"] == list(model.pretrained_cfg["mean"]) and meta["recurzoo.input_size"] == [
        3,
        SIDE,
        SIDE,
    ]
    assert (
        meta["recurzoo.interpolation"] == model.pretrained_cfg["interpolation"] and len(meta["recurzoo.labels"]) == 1000
    )
    assert "built-in" in result.calibration and result.float_ops  # the float operators are listed
    report = json.loads(Path(result.report_paths[0]).read_text())
    assert report["fidelity"]["top1_agreement"] == result.fidelity["top1_agreement"]
    assert set(report["latency_ms"]) == {"fp32 eager", "fp32 onnxruntime", "onnx int8"}
    assert 0 < result.size_ratio < 0.5


def test_int8_onnx_stores_hornet_global_filters_as_int8_close_to_their_float_values(tmp_path, monkeypatch):
    model = _reduced("hornet_tiny_gf")
    result = export_edge("hornet_tiny_gf", tmp_path / "int8", precision="int8", model=model, input_size=(3, SIDE, SIDE))
    proto = onnx.load(result.path)
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    float_filters = [
        init.name
        for init in proto.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT
        and sum(extent > 1 for extent in init.dims) >= 2
        and set(readers.get(init.name, [])) == {"Mul"}
    ]
    int8_filters = [init for init in proto.graph.initializer if init.name.endswith("_int8")]
    assert not float_filters and len(int8_filters) == 4  # real and imaginary part of the two GF blocks
    assert all(init.data_type == onnx.TensorProto.INT8 for init in int8_filters)
    assert "Mul by a filter stored in int8 (4)" in result.float_ops

    monkeypatch.setattr("recurzoo.export.edge._store_filter_weights_int8", lambda proto: 0)
    reference = export_edge(
        "hornet_tiny_gf", tmp_path / "ref", precision="int8", model=model, input_size=(3, SIDE, SIDE)
    )
    float_weights = {
        init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(reference.path).graph.initializer
    }
    stored = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    for init in int8_filters:
        name = init.name[: -len("_int8")]
        original, scale = float_weights[name], stored[f"{name}_int8_scale"].reshape(-1, 1, 1)
        np.testing.assert_allclose(scale[:, 0, 0], np.abs(original).reshape(len(original), -1).max(axis=1) / 127)
        assert (np.abs(stored[init.name] * scale - original) <= scale / 2 + 1e-9).all()  # rounded, per channel
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = builtin_photos(model, (3, SIDE, SIDE)).images[:1].numpy()
    assert np.allclose(
        session.run(None, {"input": x})[0],
        ort.InferenceSession(str(reference.path)).run(None, {"input": x})[0],
        atol=1e-3,
    )


def test_int8_onnx_does_not_store_the_biases_onnxruntime_would_fold_out_of_small_tables(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from recurzoo.export.edge import quantize_onnx_int8

    # RGT's pattern: each block's bias comes from its own small table through one shared index (window x window)
    rng = np.random.default_rng(0)
    length, nodes = 65536, []
    initializers = [numpy_helper.from_array(rng.integers(0, 16, length), "index")]
    value = "input"
    for block in range(4):
        initializers += [
            numpy_helper.from_array(rng.normal(size=(16, 2)).astype(np.float32), f"table{block}"),
            numpy_helper.from_array(rng.normal(size=(2, 1)).astype(np.float32), f"mlp{block}"),
            numpy_helper.from_array(np.array([16], dtype=np.int64), f"flat{block}"),
        ]
        nodes += [
            helper.make_node("MatMul", [f"table{block}", f"mlp{block}"], [f"small{block}"]),
            helper.make_node("Reshape", [f"small{block}", f"flat{block}"], [f"values{block}"]),
            helper.make_node("Gather", [f"values{block}", "index"], [f"bias{block}"]),
            helper.make_node("Add", [value, f"bias{block}"], [f"out{block}"]),
        ]
        value = f"out{block}"
    graph = helper.make_graph(
        nodes,
        "biases",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, length])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [1, length])],
        initializers,
    )
    fp32_path = tmp_path / "biases.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(fp32_path))
    quantize_onnx_int8(fp32_path, tmp_path / "biases.int8.onnx", torch.randn(2, length), {})
    stored = onnx.load(str(tmp_path / "biases.int8.onnx")).graph.initializer
    # folded by onnxruntime's optimizer, four float biases of 65536 values each were stored (4x the index)
    assert not [t.name for t in stored if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= length]


def test_int8_onnx_quantizes_1x1_conv_weights_that_several_scales_share(tmp_path):
    from onnx import TensorProto

    from recurzoo.backbones.hornet import PointwiseConv2d
    from recurzoo.export.edge import quantize_onnx_int8
    from recurzoo.export.onnx_rewrite import rewrite_graph

    class TwoScales(nn.Module):  # MSRNet's pattern: HorNet's 1x1 convolutions on three scales, one weight each
        def __init__(self):
            super().__init__()
            self.first, self.second = PointwiseConv2d(32, 64), PointwiseConv2d(64, 32)

        def forward(self, x):
            return [self.second(self.first(scale, scale=0.5)) for scale in (x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4))]

    model, x = TwoScales().eval(), torch.randn(1, 32, 16, 16)
    fp32_path = tmp_path / "scales.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(fp32_path), dynamo=False, opset_version=18, input_names=["input"])
    graph = onnx.load(str(fp32_path))
    rewrite_graph(graph)
    onnx.save(graph, str(fp32_path))
    quantize_onnx_int8(fp32_path, tmp_path / "scales.int8.onnx", torch.randn(4, 32, 16, 16), {})
    stored = onnx.load(str(tmp_path / "scales.int8.onnx")).graph.initializer
    weights = [t for t in stored if np.prod(t.dims) == 32 * 64]
    # each weight once, in int8 (the quantizer left a computed weight in float, one copy a scale)
    assert sorted(t.data_type for t in weights) == [TensorProto.INT8] * 2


def test_fp16_onnx_keeps_fp32_inputs_and_outputs_and_stays_close(tmp_path):
    model = _reduced("sret_tiny")
    result = export_edge("sret_tiny", tmp_path, precision="fp16", model=model, input_size=(3, SIDE, SIDE))
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float)"
    weights = [init for init in onnx.load(result.path).graph.initializer if np.prod(init.dims) >= 256]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)
    x = builtin_photos(model, (3, SIDE, SIDE)).images[:2]
    with torch.no_grad():
        expected = model(x).numpy()
    output = session.run(None, {"input": x.numpy()})[0]
    assert 0 < np.abs(output - expected).max() < 1e-2 * np.abs(expected).max()
    assert result.float_ops == [] and result.size_ratio < 1


def test_labelled_evaluation_set_gives_accuracy_beside_agreement(tmp_path):
    model = _reduced("hornet_tiny_7x7")
    photos = builtin_photos(model, (3, SIDE, SIDE))
    labelled = ImageSet(photos.images, "photos", torch.arange(len(photos.images)) % 3)
    result = export_edge(
        "hornet_tiny_7x7", tmp_path, precision="int8", model=model, input_size=(3, SIDE, SIDE), evaluation=labelled
    )
    with torch.no_grad():
        fp32 = model(photos.images).argmax(1)
    assert result.fidelity["fp32_top1_accuracy"] == pytest.approx((fp32 == labelled.labels).float().mean().item())
    assert "top1_accuracy" in result.fidelity and result.evaluation == "photos"


def test_export_support_reads_the_declarations_of_every_module_class():
    class FixedBatch(nn.Identity):
        export_dynamic_batch = False
        export_static_reason = "a batch-sized buffer"

    class FixedSize(nn.Identity):
        export_dynamic_size = False
        export_static_reason = "a size-sized buffer"

    support = export_support(nn.Sequential(nn.Conv2d(3, 3, 1), FixedBatch(), FixedSize()))
    assert not support.dynamic_batch and not support.dynamic_hw
    assert support.reason == "a batch-sized buffer; a size-sized buffer"
    assert export_support(nn.Sequential(nn.Conv2d(3, 3, 1))) == export_support(nn.Identity())


def test_sliced_sret_declares_a_fixed_size_and_unsliced_sret_a_dynamic_one():
    sliced = recurzoo.create_model("sret_tiny", **REDUCED["sret"])
    unsliced = recurzoo.create_model("sret_tiny_noslice", **REDUCED["sret"])
    assert not export_support(sliced).dynamic_hw and "sliced attention" in export_support(sliced).reason
    assert export_support(unsliced).dynamic_hw


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--format", "executorch", "--precision", "fp16"], "expected onnx with fp16|int8 or executorch"),
        (["--precision", "int8", "--calibration", "/nonexistent/photos"], "/nonexistent/photos: not a folder"),
        (["--precision", "fp16", "--calibration", "photos"], "--calibration calibrates int8, not fp16"),
        (["--precision", "int8", "--features"], "apply to the fp32 ONNX export only"),
    ],
)
def test_cli_edge_export_mistakes_are_one_line_usage_errors(flags, expected, tmp_path, capsys):
    code = main(["export", "hornet_tiny_7x7", "--input-size", "3", "32", "32", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_adaptive_pooling_lowers_through_torch_export_as_exact_fixed_pools():
    class Pools(nn.Module):
        def forward(self, x):
            down = F.adaptive_max_pool2d(x, (3, 3)) + F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)
            return down, F.adaptive_max_pool2d(x, (8, 9)) + F.adaptive_avg_pool2d(x, (8, 9))  # and up

    x = torch.randn(2, 4, 5, 7)
    with torch.no_grad(), static_adaptive_pooling():
        program = torch.export.export(Pools(), (x,))
    operators = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not any("adaptive_max" in name for name in operators)  # not in ExecuTorch's core ATen opset
    # XNNPACK does not take a gather or an alias; its quantizer leaves narrow() unannotated
    assert not any(word in name for name in operators for word in ("index_select", "narrow", "alias"))
    assert any("aten.slice" in name for name in operators) and any("aten.cat" in name for name in operators)
    # global average pooling stays the operator that the XNNPACK quantizer annotates
    assert [name for name in operators if "adaptive" in name] == ["aten.adaptive_avg_pool2d.default"]
    (down, up), (expected_down, expected_up) = program.module()(x), Pools()(x)
    torch.testing.assert_close(down, expected_down, rtol=0, atol=0)
    torch.testing.assert_close(up, expected_up, rtol=0, atol=1e-6)  # averages summed one axis at a time


class _ScaleMerge(nn.Module):
    """MSRNet's scale merging in small: maps pooled down (9x7 to 6x5) and up (4x4 to 6x5) by adaptive pooling."""

    def __init__(self):
        super().__init__()
        self.wide, self.narrow = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.small, self.out = nn.Conv2d(3, 8, 3, stride=3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        wide, narrow, small = self.wide(x[..., :9, :7]), self.narrow(x), self.small(x)
        size = narrow.shape[-2:]

        def pool(t):
            return F.adaptive_max_pool2d(t, size) + F.adaptive_avg_pool2d(t, size)

        return self.out(narrow + pool(wide) + pool(small))


def _rms_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return ((output - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_adaptive_pooling_between_convolutions_lowers_whole_into_the_xnnpack_delegate(precision, tmp_path):
    # A gather left in the portable kernels between delegated pools and their consumers made XNNPACK's grouped
    # partition of MSRNet cyclic ("Invalid partition, found dependency cycles"). In int8, slices taken with
    # narrow() were not annotated by XNNPACK's quantizer and ran in float between quantize/dequantize pairs of
    # different parameters, which XNNPACK's slice refuses (the partition became cyclic again); a slice of a
    # whole axis (an alias) was refused as well.
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from executorch.runtime import Runtime

    from recurzoo.export.edge import lower_executorch

    torch.manual_seed(0)
    model, images = _ScaleMerge().eval(), torch.randn(8, 3, 12, 10)
    outside = lower_executorch(model, images[:1], tmp_path / "merge.pte", precision, images)
    assert not {"cat", "index_select", "slice_copy", "alias_copy", "max_pool2d", "avg_pool2d"} & set(outside), outside
    program = Runtime.get().load_program((tmp_path / "merge.pte").read_bytes())  # keeps the bytes alive
    method = program.load_method("forward")
    with torch.no_grad():
        expected = model(images[:2])
    output = torch.cat([method.execute([image[None]])[0] for image in images[:2]])
    if precision == "fp32":
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    else:
        assert _rms_error(output, expected) < 0.05


def test_int8_weights_shared_by_several_layers_are_quantized_at_every_use_and_load(tmp_path):
    # MSRNet runs one backbone on three scales: XNNPACK's quantizer annotated only the first use of each
    # weight, the others took float inputs with the int8 weight, and the program failed to load
    # ("Failed to create convolution node ... xnn_status_invalid_parameter", error 0x1).
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from executorch.runtime import Runtime

    from recurzoo.export.edge import lower_executorch

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            full, half = self.stem(x), self.stem(F.avg_pool2d(x, 2))
            return self.head(full + F.interpolate(half, size=full.shape[-2:], mode="bilinear"))

    torch.manual_seed(0)
    model, images = TwoScales().eval(), torch.randn(8, 3, 16, 16)
    lower_executorch(model, images[:1], tmp_path / "shared.pte", "int8", images)
    program = Runtime.get().load_program((tmp_path / "shared.pte").read_bytes())  # keeps the bytes alive
    method = program.load_method("forward")
    with torch.no_grad():
        expected = model(images[:2])
    output = torch.cat([method.execute([image[None]])[0] for image in images[:2]])
    assert _rms_error(output, expected) < 0.05


class _CoarseToFine(nn.Module):
    """A coarse map resized (or average-pooled) for the next operator and also passed on, as MSRNet's decoder does."""

    def __init__(self, mode: str):
        super().__init__()
        self.coarse, self.fine, self.mode = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(3, 8, 3, padding=1), mode

    def forward(self, x):
        coarse = self.coarse(x)
        if self.mode == "resize":
            return self.fine(x) + F.interpolate(coarse, size=x.shape[-2:], mode="bilinear"), coarse
        return F.avg_pool2d(coarse, 2), coarse


@pytest.mark.parametrize("mode", ["resize", "avg_pool"])
def test_int8_map_both_resized_and_returned_runs_with_its_channels_last_layout(mode, tmp_path):
    # MSRNet's int8 program failed when run ("Propagating input shapes failed with code: xnn_status_invalid_parameter"):
    # one dequantize fed a float channels-last operator (bilinear resize, average pooling) and the partition's
    # output; XNNPACK's layout pass, converting it back to channels-first for the output, moved the resize onto
    # the channels-first copy too. Each user now has its own dequantize.
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from executorch.runtime import Runtime

    from recurzoo.export.edge import lower_executorch

    torch.manual_seed(0)
    model, images = _CoarseToFine(mode).eval(), torch.rand(8, 3, 8, 8)
    outside = lower_executorch(model, images[:1], tmp_path / "coarse.pte", "int8", images)
    assert not {"upsample_bilinear2d", "avg_pool2d", "convolution"} & set(outside), outside
    method = Runtime.get().load_program(str(tmp_path / "coarse.pte")).load_method("forward")
    with torch.no_grad():
        expected = model(images[:1])
    outputs = method.execute([images[:1]])
    assert [output.shape for output in outputs] == [e.shape for e in expected]
    assert max(_rms_error(output, e) for output, e in zip(outputs, expected)) < 0.05


def test_hornet_global_filter_exports_as_real_dft_matmuls_equal_to_the_fft():
    model = _reduced("hornet_tiny_gf")
    x = builtin_photos(model, (3, SIDE, SIDE)).images[:2]
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = model(x)
    operators = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("fft" in name or "complex" in name for name in operators), operators
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_fidelity_measures_psnr_ssim_for_sr_and_mask_agreement_for_cod():
    reference = np.full((2, 3, 16, 16), 0.5, dtype=np.float32)
    sr = fidelity("sr", reference, reference + 0.01, None)
    assert sr["psnr_vs_fp32_db"] == pytest.approx(40.0, abs=1e-3) and 0.99 < sr["ssim_vs_fp32"] <= 1.0
    logits = np.sign(np.random.default_rng(0).standard_normal((2, 1, 16, 16))).astype(np.float32) * 20  # crisp masks
    same, flipped = fidelity("cod", logits, logits, None), fidelity("cod", logits, -logits, None)
    assert same["mask_mae_vs_fp32"] == 0 and same["s_measure_vs_fp32"] == pytest.approx(1.0)
    assert flipped["mask_mae_vs_fp32"] > 0.5 and flipped["s_measure_vs_fp32"] < 0.1


def test_executorch_program_runs_back_through_the_runtime_like_eager(tmp_path):
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    model = _reduced("hornet_tiny_7x7")
    result = export_edge(
        "hornet_tiny_7x7", tmp_path, fmt="executorch", precision="fp32", model=model, input_size=(3, SIDE, SIDE)
    )
    assert result.path.endswith(".fp32.pte") and result.fidelity["max_abs_diff"] < 1e-4
    from executorch.extension.pybindings import portable_lib

    from recurzoo.export.edge import _one_thread

    threads = portable_lib._threadpool_get_thread_count()
    with _one_thread(executorch=True):  # latency is measured on one thread, XNNPACK's threadpool included
        assert portable_lib._threadpool_get_thread_count() == 1 and torch.get_num_threads() == 1
    assert portable_lib._threadpool_get_thread_count() == threads
    meta = json.loads(Path(result.path).with_suffix(".json").read_text())
    assert meta["mean"] == list(model.pretrained_cfg["mean"]) and meta["precision"] == "fp32"


def test_int8_hornet_program_with_its_channel_splits_runs_like_eager(tmp_path):
    # gnConv splits its projected map by channels; rewritten into XNNPACK slices in int8, the program failed to
    # run ("Attempted to resize a static tensor", error 0x10): int8 splits are left as they are
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from recurzoo.export.edge import _pte_runner, lower_executorch

    torch.manual_seed(0)
    model = recurzoo.create_model("hornet_tiny_7x7", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), in_chans=1).eval()
    x = torch.randn(1, 1, SIDE, SIDE)
    lower_executorch(model, x, tmp_path / "hornet.pte", "int8", torch.randn(8, 1, SIDE, SIDE))
    with torch.no_grad():
        expected = model(x).numpy()
    actual = _pte_runner(tmp_path / "hornet.pte")(x)[0]
    assert np.abs(actual - expected).max() < 0.1 * np.abs(expected).max()


def test_latency_loads_the_artifact_once_the_threadpool_has_one_thread(tmp_path):
    # ExecuTorch replaces its threadpool to change the thread count, and an XNNPACK program keeps the pool it was
    # loaded with: MSRNet's int8 program, loaded before, crashed in execute (segmentation fault, futex abort).
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from executorch.extension.pybindings import portable_lib

    from recurzoo.export.edge import _latency

    model, x = nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "conv.onnx"), input_names=["input"], dynamo=False)
    pools = []

    def load():
        pools.append(portable_lib._threadpool_get_thread_count())
        return model

    latency = _latency(model, tmp_path / "conv.onnx", load, x, "artifact", executorch=True)
    assert pools == [1] and set(latency) == {"fp32 eager", "fp32 onnxruntime", "artifact"}


def test_peak_memory_of_a_program_calling_quantized_kernels_outside_the_delegate_is_measured(tmp_path):
    # An int8 program calls a dequantize outside XNNPACK where an operator the delegate refuses takes a quantized
    # weight (MSRNet-HorNet's addmm did): the fresh process that measures peak memory did not register the quantized
    # kernels ("Missing operator: quantized_decomposed::dequantize_per_channel.out"), and the report had none.
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    import executorch.kernels.quantized  # noqa: F401  (serializes the dequantize)
    from executorch.exir import to_edge

    from recurzoo.export.edge import _peak_memory_mib

    class PerChannelScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.tensor([1, -2, 3], dtype=torch.int8).view(3, 1, 1))
            self.register_buffer("scale", torch.tensor([0.5, 0.25, 0.125]))
            self.register_buffer("zero_point", torch.zeros(3, dtype=torch.int64))

        def forward(self, x):
            dequantize = torch.ops.quantized_decomposed.dequantize_per_channel
            return x * dequantize(self.weight, self.scale, self.zero_point, 0, -127, 127, torch.int8)

    x = torch.randn(1, 3, 4, 4)
    (tmp_path / "scale.pte").write_bytes(to_edge(torch.export.export(PerChannelScale(), (x,))).to_executorch().buffer)
    peak = _peak_memory_mib("executorch", tmp_path / "scale.pte", tuple(x.shape))
    assert peak is not None and peak > 0


def test_executorch_attention_and_computed_weights_run_inside_the_xnnpack_delegate(tmp_path):
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from recurzoo.export.edge import _pte_runner, lower_executorch

    class MaskedAttention(nn.Module):  # SReT's pattern: boolean key mask; weights scaled at run time
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.gain = nn.Parameter(torch.tensor(0.5))
            keys = torch.ones(1, 1, 1, 8, dtype=torch.bool)
            keys[..., 5:] = False
            self.register_buffer("keys", keys)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)[:, :8, :16]  # (1, 8, 16)
            q, k, v = F.linear(tokens, self.qkv.weight * self.gain, self.qkv.bias).view(1, 8, 3, 2, 8).unbind(2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.keys)
            return out.flatten(1)

    model = MaskedAttention().eval()
    x = torch.randn(1, 16, 4, 4)
    outside = lower_executorch(model, x, tmp_path / "attention.pte", "fp32", x)
    # PyTorch's decomposition left eq/any/logical_not/where (the masked-row guard) and the matmul with a
    # weight computed from parameters (addmm) to the portable kernels
    assert not {"any", "where", "logical_not", "eq", "addmm", "mm", "bmm"} & set(outside), outside
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_pte_runner(tmp_path / "attention.pte")(x)[0], expected, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_executorch_views_splits_and_no_op_copies_stay_inside_the_xnnpack_delegate(precision, tmp_path):
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from recurzoo.export.edge import _pte_runner, lower_executorch

    class Views(nn.Module):  # timm's qkv.unbind(0), chunked gates, RGT's whole-map slices and one-block joins
        def __init__(self):
            super().__init__()
            self.qkv, self.gate = nn.Linear(16, 48), nn.Linear(16, 32)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)  # (1, 16, 16)
            q, k, v = self.qkv(tokens).view(1, 16, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            attended = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).flatten(2)  # 4-D matmuls
            gate, value = self.gate(attended[:, :16]).chunk(2, dim=-1)
            first = torch.cat([(gate * value)[:, :, :16]], dim=1)  # one tensor joined; a slice of all of it
            last = value.select(-2, -1)[:, None]  # a part of a split, selected from the end
            return first + tokens[:, 0:1, :].squeeze(1)[:, None] + tokens.select(1, 3)[:, None] + last

    model = Views().eval()
    x = torch.randn(1, 16, 4, 4)
    outside = lower_executorch(model, x, tmp_path / "views.pte", precision, x)
    # nothing left outside; in int8 but the chunk of a dequantized map, which stays a split (rewritten into
    # slices, a HorNet int8 program failed to run: see the channel-split test)
    assert set(outside) <= ({"split_with_sizes_copy"} if precision == "int8" else set()), outside
    with torch.no_grad():
        expected = model(x).numpy()
    tolerance = 1e-5 if precision == "fp32" else 0.1 * np.abs(expected).max()
    np.testing.assert_allclose(_pte_runner(tmp_path / "views.pte")(x)[0], expected, atol=tolerance)


def test_executorch_does_not_store_biases_gathered_from_small_tables(tmp_path):
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")
    from recurzoo.export.edge import _pte_runner, lower_executorch

    class GatheredBiases(nn.Module):  # RGT's pattern: per-block tables, one shared (window x window) index
        def __init__(self):
            super().__init__()
            self.tables = nn.ParameterList([nn.Parameter(torch.randn(16, 2)) for _ in range(4)])
            self.mix = nn.Linear(2, 1)
            self.register_buffer("index", torch.randint(0, 16, (256, 256)), persistent=False)

        def forward(self, x):
            for table in self.tables:
                x = (x + self.mix(table)[:, 0][self.index]).softmax(-1)
            return x

    model = GatheredBiases().eval()
    x = torch.randn(1, 256, 256)
    lower_executorch(model, x, tmp_path / "biases.pte", "fp32", x)
    # folded, the four (256, 256) float biases took 1 MiB in place of the 0.5 MiB index
    assert (tmp_path / "biases.pte").stat().st_size < 0.75 * 2**20
    with torch.no_grad():
        np.testing.assert_allclose(_pte_runner(tmp_path / "biases.pte")(x)[0], model(x).numpy(), atol=1e-6)


def test_a_model_executorch_cannot_lower_is_one_line_with_the_lowering_reason(tmp_path):
    pytest.importorskip("executorch", reason="the recurzoo[edge] extra is not installed")

    class Spectral(nn.Module):  # complex tensors: no ExecuTorch kernel, no XNNPACK operator
        num_classes = 4

        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean(dim=(2, 3))[:, :1].expand(-1, 4).contiguous()

    with pytest.raises(EdgeExportError, match=r"^hornet_tiny_7x7: cannot be lowered to executorch fp32: \w+") as error:
        export_edge(
            "hornet_tiny_7x7",
            tmp_path,
            fmt="executorch",
            precision="fp32",
            model=Spectral(),
            input_size=(3, SIDE, SIDE),
        )
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("sret_tinyy", "model 'sret_tinyy': unknown model"), ("sret_tiny@3x0x32", "must be CxHxW")],
)
def test_edge_bench_refuses_a_misspelt_model_or_size_before_anything_runs(spec, expected, tmp_path, capsys):
    from recurzoo.export.edge_bench import main as edge_bench_main

    out = tmp_path / "edge"
    with pytest.raises(SystemExit) as stop:  # not a "not made" row in the table
        edge_bench_main([spec, "--artifacts", "onnx-int8", "--out", str(out)])
    assert stop.value.code == 2 and expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_edge_bench_rows_round_trip_through_csv_and_name_what_was_not_made(tmp_path):
    from recurzoo.export.edge_bench import (
        EdgeRow,
        _row_from_report,
        edge_markdown,
        load_edge_rows,
        merge_rows,
        write_rows,
    )

    model = _reduced("hornet_tiny_7x7")
    result = export_edge("hornet_tiny_7x7", tmp_path, precision="int8", model=model, input_size=(3, SIDE, SIDE))
    report = json.loads(Path(result.report_paths[0]).read_text())
    made = _row_from_report("hornet_tiny_7x7", "onnx-int8", "3x32x32", report)
    assert made.size_ratio == pytest.approx(result.size_ratio) and made.fidelity.startswith("top-1 agreement")
    assert made.speedup_vs_fp32_onnxruntime == pytest.approx(
        result.latency_ms["fp32 onnxruntime"] / result.latency_ms["onnx int8"]
    )
    assert "int8 compute" in made.int8_time_shares and made.peak_memory_mib > 0
    failed = EdgeRow("rgt_small_x2", "executorch-int8", "3x64x64", error="not measured: over 1800 s")
    write_rows([made, failed], tmp_path / "edge.csv")
    rows = load_edge_rows(tmp_path / "edge.csv")
    assert [row.artifact for row in rows] == ["onnx-int8", "executorch-int8"]
    assert rows[0].size_mib == pytest.approx(made.size_mib) and rows[1].error == failed.error
    table = edge_markdown(rows)
    assert "| `hornet_tiny_7x7` | ONNX int8 | 3x32x32 |" in table
    assert "`rgt_small_x2` ExecuTorch int8 (XNNPACK): not measured: over 1800 s" in table
    remeasured = EdgeRow("rgt_small_x2", "executorch-int8", "3x64x64", size_mib=1.0, fidelity="PSNR 40.0 dB")
    fp16 = EdgeRow("hornet_tiny_7x7", "onnx-fp16", "3x32x32", size_mib=2.0)
    merged = merge_rows(rows, [remeasured, fp16])  # a later sitting replaces its rows and keeps the others
    assert [(row.model, row.artifact) for row in merged] == [
        ("hornet_tiny_7x7", "onnx-int8"),
        ("hornet_tiny_7x7", "onnx-fp16"),
        ("rgt_small_x2", "executorch-int8"),
    ]
    assert merged[2] is remeasured and merged[0].size_mib == rows[0].size_mib


def test_int8_onnx_keeps_the_matmul_after_softmax_in_float_and_profiles_its_kernel_time(tmp_path):
    model = _reduced("sret_tiny_noslice")
    result = export_edge("sret_tiny_noslice", tmp_path, precision="int8", model=model, input_size=(3, SIDE, SIDE))
    proto = onnx.load(result.path)
    produced_by = {output: node for node in proto.graph.node for output in node.output}
    after_softmax = [
        node
        for node in proto.graph.node
        if node.op_type == "MatMul" and any(getattr(produced_by.get(i), "op_type", "") == "Softmax" for i in node.input)
    ]
    assert after_softmax, "the attention's probabilities feed a float MatMul"
    assert any(entry.startswith("MatMul after Softmax") for entry in result.float_ops)
    assert set(result.time_shares) == {"int8 compute", "quantize/dequantize", "float operators"}
    assert sum(result.time_shares.values()) == pytest.approx(1.0) and result.time_shares["int8 compute"] > 0
    assert set(result.peak_memory_mib) == {"fp32 onnxruntime", "onnx int8"}
