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
from _reduced import REDUCED
from torch import nn

import recurzoo
from recurzoo.cli import main
from recurzoo.export.digits import digits_check
from recurzoo.export.edge import ImageSet, builtin_photos, export_edge
from recurzoo.export.models import export_support

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
