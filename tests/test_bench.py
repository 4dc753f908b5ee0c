"""The benchmark's mechanics (not its numbers): results, tables and the README section."""

from __future__ import annotations

import pytest

from recurzoo.export.bench import bench_in_process, to_csv, to_markdown, update_readme


@pytest.fixture(scope="module")
def result():
    return bench_in_process("hornet_tiny_7x7", backend="eager", batch=2, input_size=(3, 64, 64), warmup=1, repeats=3)


def test_result_relates_latency_throughput_and_flop_rate(result):
    assert result.latency_p25_ms <= result.latency_ms <= result.latency_p75_ms
    assert result.images_per_s == pytest.approx(2 / (result.latency_ms / 1e3))
    # fvcore counts 3.99 GMACs at 224; at 64 px the count scales with the pixel count
    assert result.gmacs_per_image == pytest.approx(3.99 * (64 / 224) ** 2, rel=0.05)
    assert result.achieved_gflops == pytest.approx(2 * result.gmacs_per_image * 2 / (result.latency_ms / 1e3))
    assert result.peak_fraction == pytest.approx(result.achieved_gflops / result.matmul_peak_gflops)
    assert result.peak_memory_mb > 0 and result.matmul_peak_gflops > 0


def test_tables_list_each_run(result):
    markdown = to_markdown([result])
    assert "| hornet_tiny_7x7 | eager | 2 | 3x64x64 |" in markdown
    assert "matmul peak" in markdown
    assert to_csv([result]).splitlines()[1].startswith("hornet_tiny_7x7,eager,2,3x64x64")


def test_readme_section_is_replaced_between_markers(tmp_path, result):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n")
    update_readme(readme, to_markdown([result]), "machine line")
    text = readme.read_text()
    assert "old" not in text and "machine line" in text and "| hornet_tiny_7x7 | eager |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_readme_without_markers_is_refused(tmp_path, result):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        update_readme(readme, to_markdown([result]), "machine")


def test_onnxruntime_backend_runs_the_projects_export():
    result = bench_in_process(
        "hornet_tiny_gf", backend="onnxruntime", batch=1, input_size=(3, 64, 64), warmup=1, repeats=2
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

    plain, checkpointed = measure_train_memory([("hornet_tiny_7x7", (3, 64, 64))], batch=2, threads=1)
    for row in (plain, checkpointed):
        assert not row.error and row.peak_memory_mb >= row.step_memory_mb > 0 and row.step_seconds > 0
    assert (plain.grad_checkpointing, checkpointed.grad_checkpointing) == (False, True)
    (point,) = measure_growth(["sret_tiny"], [64], threads=1)
    assert not point.error and point.latency_s > 0 and point.peak_memory_mb > 0 and point.side == 64
