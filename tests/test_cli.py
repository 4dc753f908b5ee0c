"""The ``recurzoo`` command line: listing, model info, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

import recurzoo
from recurzoo.cli import main


def test_list_filters_by_pattern(capsys):
    assert main(["list", "hornet_tiny*"]) == 0
    assert capsys.readouterr().out.split() == ["hornet_tiny_7x7", "hornet_tiny_gf"]


def test_info_prints_params_flops_and_strides(capsys):
    assert main(["info", "hornet_tiny_7x7", "--input-size", "3", "224", "224"]) == 0
    out = capsys.readouterr().out
    assert "22.41 M" in out
    assert "3.99" in out  # fvcore GFLOPs, LayerNorms counted
    assert "[4, 8, 16, 32]" in out


def test_info_at_the_card_size_reads_the_card_figures_which_equal_a_count(monkeypatch):
    """``recurzoo info NAME`` answers from the committed figures, without tracing; they equal fvcore's count."""
    from recurzoo import apps
    from recurzoo.export import flops

    counted = flops.model_report(recurzoo.create_model("sret_tiny"), (3, 224, 224))

    def no_counting(*args, **kwargs):
        raise AssertionError("the card's figures should have been used")

    monkeypatch.setattr(flops, "model_report", no_counting)
    info = apps.model_info("sret_tiny.in1k")
    assert info["input_size"] == (3, 224, 224)
    assert info["params"] / 1e6 == pytest.approx(counted["params"] / 1e6, abs=0.005)
    assert info["gflops"] == pytest.approx(counted["gflops"], abs=0.005)
    assert (info["reductions"], info["channels"]) == (counted["reductions"], counted["channels"])
    with pytest.raises(AssertionError, match="figures should have been used"):
        apps.model_info("sret_tiny", (3, 192, 192))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "no_such_model"], "unknown model 'no_such_model'"),
        (["info", "hornet_tiny_7x7", "--input-size", "3", "16", "16"], "at least 32"),
        (
            ["info", "hornet_tiny_7x7", "--input-size", "3", "x", "16"],
            "--input-size: expected a positive integer, received 'x'",
        ),
        (["list", "zzz*"], "no model of recurzoo matches"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_on_stderr_with_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "recurzoo", "list", "hornet_large*"], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["hornet_large_7x7", "hornet_large_gf", "hornet_large_gf_384"]
