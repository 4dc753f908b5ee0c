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
    result = bench_in_process("hornet_tiny_gf", backend="onnxruntime", batch=1, input_size=(3, 64, 64),
                              warmup=1, repeats=2)
    assert result.backend == "onnxruntime" and result.latency_ms > 0 and not result.error
