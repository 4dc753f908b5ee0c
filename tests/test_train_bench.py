"""The training benchmark's mechanics (not its numbers): a timed step really trains, rows are tabled."""

from __future__ import annotations

import pytest
import torch
from _reduced import REDUCED

import recurzoo
from recurzoo.export.models import RunSettings
from recurzoo.export.train_bench import (
    TrainResult,
    default_variants,
    make_train_step,
    parse_variant,
    train_in_process,
    train_markdown,
)


def _small_hornet() -> torch.nn.Module:
    torch.manual_seed(0)
    return recurzoo.create_model("hornet_tiny_7x7", num_classes=5, **REDUCED["hornet"]).eval()


@pytest.mark.parametrize("variant", ["fp32", "bf16-cl"])
def test_train_step_updates_every_trainable_parameter_from_its_gradient(variant):
    model = _small_hornet()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step, optimizer = make_train_step(model, torch.randn(2, 3, 32, 32), variant)
    first, second = step(), step()
    assert model.training and torch.isfinite(first) and torch.isfinite(second)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert optimizer.state[param]["step"].item() == 2, name
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change"
    if variant.endswith("-cl"):
        assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model = _small_hornet()
    step, _ = make_train_step(model, torch.randn(4, 3, 32, 32), "fp32", lr=1e-3)
    losses = [step().item() for _ in range(8)]
    assert losses[-1] < losses[0]


def test_variants_name_a_precision_and_a_layout():
    assert parse_variant("fp32") == ("fp32", False)
    assert parse_variant("bf16-cl") == ("bf16", True)
    assert default_variants("cpu") == ["fp32", "fp32-cl", "bf16", "bf16-cl"]
    assert {"fp16", "fp16-cl"} <= set(default_variants("cuda"))
    for bad in ("fp64", "bf16-nhwc", ""):
        with pytest.raises(ValueError, match="training variant"):
            parse_variant(bad)


def test_timed_configuration_reports_throughput_and_memory():
    result = train_in_process(
        "sret_tiny", "fp32", batch=2, input_size=(3, 32, 32), settings=RunSettings(threads=1, warmup=1, repeats=2)
    )
    assert not result.error and result.model == "sret_tiny" and result.input_size == "3x32x32"
    assert result.step_p25_ms <= result.step_ms <= result.step_p75_ms
    assert result.images_per_s == pytest.approx(2 / (result.step_ms / 1e3))
    assert result.peak_memory_mb > 0


def test_table_has_a_row_per_run_with_the_ratio_over_fp32():
    nan = float("nan")
    rows = [
        TrainResult("m", "fp32", 16, "3x224x224", 2, "cpu", 1000.0, 990.0, 1010.0, 16.0, 900.0),
        TrainResult("m", "bf16-cl", 16, "3x224x224", 2, "cpu", 500.0, 490.0, 510.0, 32.0, 700.0),
        TrainResult("m", "bf16", 16, "3x224x224", 2, "cpu", nan, nan, nan, nan, nan, error="boom"),
    ]
    lines = train_markdown(rows).splitlines()
    assert lines[2].startswith("| m | fp32 | 16 | 3x224x224 | 2 | 1000 | 990-1010 | 16.0 | 900 |")
    assert lines[3].endswith("| 32.0 | 700 | 2.00x |")
    assert lines[4] == "| m | bf16 | 16 | 3x224x224 | 2 | failed: boom |"
