"""The benchmark's mechanics (not its numbers): results, tables and the README section."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from recurzoo.export import bench
from recurzoo.export import models as export_models
from recurzoo.export.bench import bench_in_process, to_csv, to_markdown, update_readme
from recurzoo.export.models import RunSettings


class _ScriptedModel(nn.Module):
    """Flatten + Linear(192, 10): 1,920 multiply-accumulates per 3x8x8 image.

    Each forward pass outside fvcore's trace advances ``clock`` by the next of ``seconds``, so the
    benchmark's timing is checked against known durations without sleeping.
    """

    def __init__(self, clock: SimpleNamespace, seconds: list) -> None:
        super().__init__()
        self.linear = nn.Linear(192, 10)
        self.clock, self.seconds = clock, list(seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            self.clock.now += self.seconds.pop(0)
        return self.linear(x.flatten(1))


# one warm-up call (not timed), then five timed calls
SECONDS = [5.0, 0.010, 0.011, 0.012, 0.013, 0.100]


@pytest.fixture
def result(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    model = _ScriptedModel(clock, SECONDS)
    monkeypatch.setattr(export_models, "create_model", lambda name: model)
    monkeypatch.setattr(export_models, "_now", lambda device: clock.now)
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda device: 50.0)
    outcome = bench_in_process(
        "scripted", backend="eager", batch=2, input_size=(3, 8, 8), settings=RunSettings(warmup=1, repeats=5)
    )
    assert model.seconds == [], "every scripted call was made"
    return outcome


def test_result_states_the_timed_calls_median_spread_and_rates(result):
    # the warm-up call is not timed; the median of 10, 11, 12, 13, 100 ms is 12 ms, not their mean
    assert result.latency_ms == pytest.approx(12.0)
    # statistics.quantiles' default (exclusive) quartiles of the five calls
    assert (result.latency_p25_ms, result.latency_p75_ms) == (pytest.approx(10.5), pytest.approx(56.5))
    assert result.images_per_s == pytest.approx(2 / 0.012)
    assert result.gmacs_per_image == pytest.approx(1920e-9)
    assert result.achieved_gflops == pytest.approx(2 * 1920e-9 * 2 / 0.012)
    assert result.peak_fraction == pytest.approx(result.achieved_gflops / 50.0)
    assert (result.batch, result.input_size, result.backend) == (2, "3x8x8", "eager")


def test_tables_list_each_run(result):
    markdown = to_markdown([result])
    assert "| scripted | eager | 2 | 3x8x8 |" in markdown
    assert "matmul peak measured in the same runs: 50.0 GFLOP/s" in markdown
    assert to_csv([result]).splitlines()[1].startswith("scripted,eager,2,3x8x8")


def test_readme_section_is_replaced_between_markers(tmp_path, result):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n")
    update_readme(readme, to_markdown([result]), "machine line")
    text = readme.read_text()
    assert "old" not in text and "machine line" in text and "| scripted | eager |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_readme_without_markers_is_refused(tmp_path, result):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        update_readme(readme, to_markdown([result]), "machine")


def test_bench_refuses_an_out_whose_table_is_the_readme_it_updates(tmp_path, capsys):
    from recurzoo.cli import main

    readme = tmp_path / "notes.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    argv = ["bench", "test_convnext@3x32x32", "--repeats", "1", "--readme", str(readme), "--overwrite"]
    assert main([*argv, "--out", str(tmp_path / "notes")]) == 2
    assert "would replace --readme" in capsys.readouterr().err
    assert readme.read_text() == "intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"
    assert sorted(os.listdir(tmp_path)) == ["notes.md"]


def test_onnxruntime_backend_runs_the_projects_export():
    result = bench_in_process(
        "test_convnext",
        backend="onnxruntime",
        batch=1,
        input_size=(3, 32, 32),
        settings=RunSettings(warmup=1, repeats=2),
    )
    assert result.backend == "onnxruntime" and result.latency_ms > 0 and not result.error


def test_model_spec_carries_its_own_input_size():
    from recurzoo.export.bench import parse_model_spec

    assert parse_model_spec("rgt_small_x2@3x64x48") == ("rgt_small_x2", (3, 64, 48))
    assert parse_model_spec("convnext_tiny") == ("convnext_tiny", None)
    with pytest.raises(ValueError, match="CxHxW"):
        parse_model_spec("convnext_tiny@224")


def test_markdown_states_speedup_over_eager_at_the_same_batch(result):
    from dataclasses import replace

    faster = replace(result, backend="onnxruntime", latency_ms=result.latency_ms / 2, graph_breaks=-1)
    compiled = replace(result, backend="compile", latency_ms=result.latency_ms * 4, graph_breaks=0)
    other_batch = replace(result, backend="compile", batch=5)
    lines = to_markdown([result, faster, compiled, other_batch]).splitlines()
    assert lines[-3].endswith("| 2.00x |  |")
    assert lines[-2].endswith("| 0.25x | 0 |")
    assert lines[-1].endswith("|  |  |")  # no eager run at batch 5, not traced


def test_growth_exponent_fits_power_laws():
    from recurzoo.export.scaling import fit_exponent

    sides = [256, 512, 1024]
    pixels = [s * s for s in sides]
    assert fit_exponent(pixels, [3e-6 * p for p in pixels]) == pytest.approx(1.0)
    assert fit_exponent(pixels, [0.5 * p**1.5 for p in pixels]) == pytest.approx(1.5)
    assert fit_exponent(pixels, [700.0] * 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        fit_exponent([1], [1])


def test_memory_table_states_the_saving_of_checkpointing():
    from recurzoo.export.scaling import MemoryResult, memory_markdown

    rows = [
        MemoryResult("rgt", "3x64x64", 2, False, 1.0, 3000.0, 2000.0),
        MemoryResult("rgt", "3x64x64", 2, True, 1.3, 1700.0, 700.0),
    ]
    table = memory_markdown(rows)
    assert table.splitlines()[-1].endswith("| 65% |")


def test_training_step_memory_and_growth_points_are_measured_in_fresh_processes():
    from recurzoo.export.scaling import measure_growth, measure_train_memory

    plain, checkpointed = measure_train_memory(
        [("test_convnext", (3, 32, 32))], batch=2, settings=RunSettings(threads=1)
    )
    for row in (plain, checkpointed):
        assert not row.error and row.peak_memory_mb >= row.step_memory_mb > 0 and row.step_seconds > 0
    assert (plain.grad_checkpointing, checkpointed.grad_checkpointing) == (False, True)
    (point,) = measure_growth(["test_convnext"], [32], settings=RunSettings(threads=1))
    assert not point.error and point.latency_s > 0 and point.peak_memory_mb > 0 and point.side == 32


def test_a_failed_worker_is_a_row_of_what_was_asked_with_nan_measurements_and_its_error():
    import math

    from recurzoo.export.scaling import measure_growth

    (point,) = measure_growth(["no_such_model"], [48], tile=16, settings=RunSettings(threads=1))
    assert (point.model, point.side, point.tile) == ("no_such_model", 48, 16)
    assert all(math.isnan(value) for value in (point.latency_s, point.peak_memory_mb, point.step_memory_mb))
    assert "no_such_model" in point.error


def test_a_worker_peak_memory_is_its_own_not_its_launchers(tmp_path):
    """Linux hands ``ru_maxrss`` down to a child process; the benchmark's peak must be the child's own."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)  # this process's peak rises 600 MB above anything a tiny child needs
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = "from recurzoo.export.models import peak_memory_mb; print(peak_memory_mb('cpu'))"
    peak = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    assert peak < export_models.peak_memory_mb("cpu") - 400
    del ballast


def test_a_reset_peak_window_sees_what_is_allocated_after_it():
    import mmap

    before = export_models.peak_memory_mb("cpu", reset=True)
    # pages fresh from the kernel: a malloc'd buffer may reuse freed memory that is still resident
    ballast = mmap.mmap(-1, 200 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert export_models.peak_memory_mb("cpu") > before + 150
    ballast.close()
