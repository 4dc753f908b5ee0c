"""The ``recurzoo`` command line against a careless or hostile user: inputs are never written over,
earlier outputs are not clobbered without ``--overwrite``, interrupted runs leave nothing behind, and
every user error is one line naming the flag or file, with exit code 2 (internal bugs keep their traceback)."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from recurzoo import apps
from recurzoo.cli import build_parser, main
from recurzoo.images import read_image

sys.path.insert(0, os.path.dirname(__file__))
from _hostile import photo as _photo  # noqa: E402
from _hostile import png_header_only  # noqa: E402

TINY_SR = ["--model", "rgt_small_x2", "--model-kwargs", "embed_dim=24", "num_heads=2", "blocks_per_group=2"]
RNG = np.random.default_rng(0)


def _sr(*arguments):
    return main(["sr", *map(str, arguments), *TINY_SR, "--device", "cpu"])


def _one_error_line(capsys, *expected):
    """The run's single error line (stderr may hold warnings and progress before it); checks its parts."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for part in expected:
        assert part in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------- inputs, outputs


def test_sr_refuses_to_write_over_its_input(tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png")
    before = photo.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        assert _sr(photo, "--out", tmp_path, *overwrite) == 2
        _one_error_line(capsys, "--out", "would overwrite the input", "photo.png")
    (tmp_path / "link").symlink_to(tmp_path)  # the same folder under another name
    assert _sr(photo, "--out", tmp_path / "link", "--overwrite") == 2
    _one_error_line(capsys, "would overwrite the input")
    assert photo.read_bytes() == before


def test_sr_refuses_to_overwrite_earlier_outputs_unless_told(tmp_path, capsys):
    photo = _photo(tmp_path / "in" / "photo.png")
    assert _sr(photo, "--out", tmp_path / "out") == 0
    first = (tmp_path / "out" / "photo.png").read_bytes()
    _photo(photo, seed=1)  # a different picture under the same name
    assert _sr(photo, "--out", tmp_path / "out") == 2
    _one_error_line(capsys, "--out", "exist already", "out/photo.png", "--overwrite")
    assert (tmp_path / "out" / "photo.png").read_bytes() == first
    assert _sr(photo, "--out", tmp_path / "out", "--overwrite") == 0
    assert (tmp_path / "out" / "photo.png").read_bytes() != first
    assert sorted(os.listdir(tmp_path / "out")) == ["photo.png"]


@pytest.mark.parametrize("make_out", ["file", "under_a_file", "empty"])
def test_sr_output_folder_that_cannot_be_one_is_one_line(tmp_path, capsys, make_out):
    photo = _photo(tmp_path / "photo.png")
    (tmp_path / "taken").write_text("x")
    out = {"file": tmp_path / "taken", "under_a_file": tmp_path / "taken" / "sub", "empty": ""}[make_out]
    assert _sr(photo, "--out", out) == 2
    _one_error_line(capsys, "--out")
    assert sorted(os.listdir(tmp_path)) == ["photo.png", "taken"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sr_unwritable_output_folder_is_one_line(tmp_path, capsys):
    photo = _photo(tmp_path / "photo.png")
    (tmp_path / "locked").mkdir(mode=0o555)
    assert _sr(photo, "--out", tmp_path / "locked" / "out") == 2
    _one_error_line(capsys, "--out", "Permission denied")


def test_interrupted_sr_leaves_no_file_and_no_empty_folder(tmp_path, monkeypatch, capsys):
    photo = _photo(tmp_path / "photo.png")

    def interrupted_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    assert _sr(photo, "--out", tmp_path / "out" / "deeper") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["photo.png"]


def test_sixteen_bit_input_is_super_resolved_as_its_scaled_8_bit_image(tmp_path):
    deep = RNG.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "shallow.png")
    torch.manual_seed(0)
    assert _sr(tmp_path / "deep.png", "--out", tmp_path / "a") == 0
    torch.manual_seed(0)
    assert _sr(tmp_path / "shallow.png", "--out", tmp_path / "b") == 0
    np.testing.assert_array_equal(read_image(tmp_path / "a" / "deep.png"), read_image(tmp_path / "b" / "shallow.png"))


def test_an_image_named_twice_is_written_once_and_clashing_names_are_refused(tmp_path, capsys):
    photo = _photo(tmp_path / "in" / "photo.png")
    assert _sr(photo, tmp_path / "in", "--out", tmp_path / "out") == 0
    assert "1 image(s) written" in capsys.readouterr().out
    _photo(tmp_path / "in" / "photo.jpg")
    assert _sr(tmp_path / "in", "--out", tmp_path / "other") == 2
    _one_error_line(capsys, "several inputs would be written to the same file", "other/photo.png")


def test_unreadable_images_in_a_folder_are_skipped_and_counted(tmp_path, capsys):
    _photo(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "broken.png").write_text("not an image")
    assert _sr(tmp_path / "in", "--out", tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "1 image(s) written" in captured.out and "1 unreadable image(s) skipped" in captured.out
    assert "warning: skipped" in captured.err and "broken.png" in captured.err
    assert os.listdir(tmp_path / "out") == ["good.png"]


def test_a_run_that_writes_nothing_says_so_and_exits_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_text("not an image")
    assert _sr(tmp_path / "in", "--out", tmp_path / "out") == 2
    _one_error_line(capsys, "wrote nothing", "1 unreadable image(s) skipped")
    assert not (tmp_path / "out").exists()


def test_decompression_bomb_is_one_line_and_max_pixels_sets_the_limit(tmp_path, capsys):
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert _sr(bomb, "--out", tmp_path / "out") == 2
    _one_error_line(capsys, "bomb.png", "100000 x 100000", "--max-pixels")
    photo = _photo(tmp_path / "photo.png", 10, 12)
    assert _sr(photo, "--out", tmp_path / "out", "--max-pixels", "119") == 2
    _one_error_line(capsys, "photo.png", "12 x 10")
    assert _sr(photo, "--out", tmp_path / "out", "--max-pixels", "120") == 0


def test_random_weights_are_announced_before_any_image_is_processed(tmp_path, monkeypatch):
    events = []
    real = apps.super_resolve_image
    monkeypatch.setattr(apps, "super_resolve_image", lambda *a, **k: events.append("processed") or real(*a, **k))
    apps.super_resolve_files(
        [_photo(tmp_path / "photo.png")],
        tmp_path / "out",
        model="rgt_small_x2",
        device="cpu",
        progress=False,
        model_kwargs=dict(embed_dim=24, num_heads=2, blocks_per_group=2),
        warn=events.append,
    )
    assert len(events) == 2 and "random weights" in events[0] and events[1] == "processed"


# -------------------------------------------------------------------------------- flags and models


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["sr", str(_photo(tmp_path / "p.png")), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    _one_error_line(capsys, "--device", "'cuda' is not available")


@pytest.mark.parametrize("device", ["bogus", "meta", "", "cuda:99"])
def test_unknown_devices_are_one_line(tmp_path, capsys, device):
    assert main(["sr", str(_photo(tmp_path / "p.png")), "--out", str(tmp_path / "o"), "--device", device]) == 2
    _one_error_line(capsys, "--device")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (["foo"], "argument --model-kwargs: expected KEY=VALUE"),
        (["foo=1"], "--model-kwargs foo=1: rgt_small_x2 cannot be built with them (TypeError"),
        (["num_heads=0"], "--model-kwargs num_heads=0"),
        (["device='meta'"], "--model-kwargs: device is set by the command's own flags"),
        (
            ["in_chans=1", "embed_dim=24", "num_heads=2", "blocks_per_group=2"],
            "--model-kwargs: the images are read as RGB (3 channels), rgt_small_x2 was built for 1",
        ),
    ],
)
def test_model_kwargs_the_model_cannot_take_are_one_line(tmp_path, capsys, kwargs, message):
    photo = _photo(tmp_path / "p.png")
    assert (
        main(["sr", str(photo), "--out", str(tmp_path / "o"), "--model", "rgt_small_x2", "--model-kwargs", *kwargs])
        == 2
    )
    _one_error_line(capsys, message)


def test_an_empty_checkpoint_name_is_refused_not_ignored(tmp_path, capsys):
    assert _sr(_photo(tmp_path / "p.png"), "--out", tmp_path / "o", "--checkpoint", "") == 2
    _one_error_line(capsys, "--checkpoint: expected a file")


def test_info_takes_name_dot_tag(capsys):
    assert main(["info", "sret_tiny.in1k", "--input-size", "3", "32", "32"]) == 0
    assert "model:           sret_tiny.in1k" in capsys.readouterr().out
    assert main(["info", "sret_tiny.bogus"]) == 2
    _one_error_line(capsys, "sret_tiny.bogus: no such pretrained tag", "sret_tiny.in1k")


def test_the_deprecated_first_names_work_in_every_command_as_in_timm(capsys):
    assert main(["info", "rvit_tiny_patch16_224", "--input-size", "3", "32", "32"]) == 0
    captured = capsys.readouterr()
    assert "model:           vit_recurrent_tiny_patch16_224" in captured.out
    assert "rvit_tiny_patch16_224 is deprecated, use vit_recurrent_tiny_patch16_224" in captured.err


def test_info_refuses_input_sizes_it_cannot_count(capsys):
    assert main(["info", "sret_tiny", "--input-size", "3", "100000", "100000"]) == 2
    _one_error_line(capsys, "--input-size", "at most 8192")


def test_cod_argument_checks_are_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    _photo(images / "a.png")
    (tmp_path / "weights.pth").write_bytes(b"\x80\x04")
    base = ["cod", str(images), "--checkpoint", str(tmp_path / "weights.pth")]
    cases = [
        (
            ["cod", str(images), "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")],
            "--checkpoint",
        ),
        ([*base, "--out", str(images)], "--out: "),
        ([*base, "--out", str(images / "a.png")], "is a file"),
        ([*base, "--out", str(tmp_path / "o"), "--device", "bogus"], "--device"),
        ([*base, "--out", str(tmp_path / "o"), "--model-kwargs", "x"], "--model-kwargs"),
        (["cod", str(tmp_path / "missing"), "--checkpoint", "w", "--out", "o"], "INPUT: no such image"),
        (["cod", str(images), "--checkpoint", str(images), "--out", "o"], "expected a checkpoint file, found a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        _one_error_line(capsys, message)
    assert sorted(os.listdir(tmp_path)) == ["images", "weights.pth"]


def test_demo_checks_its_outputs_before_running_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(apps, "_demo_forward", lambda *args: pytest.fail("ran before checking --out"))
    (tmp_path / "chelsea_lr.png").write_bytes(b"an earlier run")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "--out", "chelsea_lr.png", "--overwrite")
    assert main(["demo", "--out", str(tmp_path / "chelsea_lr.png")]) == 2
    _one_error_line(capsys, "--out", "is a file")
    assert (tmp_path / "chelsea_lr.png").read_bytes() == b"an earlier run"


# ----------------------------------------------------------------------------------- error handling


def test_recurzoo_traceback_shows_the_traceback_of_a_user_error(monkeypatch, capsys):
    monkeypatch.setenv("RECURZOO_TRACEBACK", "1")
    assert main(["list", "zzz*"]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" in err
        and err.strip().splitlines()[-1] == "recurzoo list: error: PATTERN: no model of recurzoo matches 'zzz*'"
    )


@pytest.mark.parametrize("bug", [ZeroDivisionError("a bug"), ValueError("an internal ValueError"), KeyError("k")])
def test_internal_bugs_keep_their_traceback(monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(apps, "model_info", broken)
    with pytest.raises(type(bug)):
        main(["info", "sret_tiny"])


def _subcommand_parsers():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    return commands.choices


def test_help_states_each_default_once_and_every_sub_command_has_help(capsys):
    for name, sub in _subcommand_parsers().items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help:
                assert formatter._expand_help(action).count("(default") <= 1, (name, action.dest)
        if name not in ("train", "validate", "train-detection"):
            with pytest.raises(SystemExit) as stop:
                main([name, "--help"])
            assert stop.value.code == 0 and "usage: recurzoo " + name in capsys.readouterr().out


def test_type_errors_name_the_flag_and_no_internal_function(capsys):
    for name, sub in _subcommand_parsers().items():
        if name not in MY_COMMANDS:  # export and bench are checked by their own tests
            continue
        for action in sub._actions:
            if action.type is None or not action.option_strings:
                continue
            value_count = action.nargs if isinstance(action.nargs, int) else 1
            assert main([name, *_required(name), action.option_strings[0], *["x"] * value_count]) == 2, action.dest
            line = _one_error_line(capsys, f"argument {action.option_strings[0]}")
            assert "_" + action.dest not in line and "invalid" not in line, line


MY_COMMANDS = ("list", "info", "sr", "demo", "cod")


def _required(command):
    return {"info": ["sret_tiny"], "sr": ["a.png", "--out", "o"], "cod": ["a", "--out", "o", "--checkpoint", "w"]}.get(
        command, []
    )


# ------------------------------------------------------------------------- names, flags, programs


@pytest.mark.parametrize("name", ["sret_tiny.", ".in1k", "."])
def test_info_refuses_an_empty_name_or_tag(capsys, name):
    assert main(["info", name]) == 2
    _one_error_line(capsys, "recurzoo info: error: MODEL:", repr(name), "expected NAME or NAME.TAG")


@pytest.mark.parametrize("typo, closest", [("sret_tny", "sret_tiny"), ("hornet_tiny_7x7x", "hornet_tiny_7x7")])
def test_an_unknown_model_suggests_the_closest_names_first(capsys, typo, closest):
    assert main(["info", typo]) == 2
    line = _one_error_line(capsys, f"unknown model {typo!r}")
    assert line.split("closest: ")[1].startswith(closest), line


def test_bench_suggests_the_closest_names_of_an_unknown_model(capsys):
    assert main(["bench", "sret_tny", "convnext_tny"]) == 2
    line = _one_error_line(capsys, "recurzoo bench: error: MODELS: unknown model(s) sret_tny, convnext_tny")
    assert line.split("closest: ")[1].startswith("sret_tiny"), line


@pytest.mark.parametrize("command", ["info sret_tiny", "export sret_tiny", "bench sret_tiny", "sr a.png --out o"])
def test_an_unknown_flag_is_blamed_on_its_sub_command(capsys, command):
    name = command.split()[0]
    assert main([*command.split(), "--no-such-flag"]) == 2
    _one_error_line(capsys, f"recurzoo {name}: error: unrecognized arguments: --no-such-flag", f"{name} --help")


def test_the_command_is_named_once_in_an_error_line(tmp_path, capsys):
    assert main(["export", "sret_tiny", "--precision", "int8", "--features", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "recurzoo export: error: --features")
    assert main(["convert", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "recurzoo convert: error: give MODEL CHECKPOINT")


# ----------------------------------------------------------------------------------------- export

EXPORT = ["export", "sret_tiny", "--input-size", "3", "32", "32"]


def _export(out, *flags):
    return main([*EXPORT, "--out", str(out), *map(str, flags)])


def test_export_refuses_to_overwrite_an_earlier_export_unless_told_and_checks_before_any_work(
    tmp_path, monkeypatch, capsys
):
    assert _export(tmp_path) == 0
    capsys.readouterr()
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["sret_tiny.onnx", "sret_tiny.report.json", "sret_tiny.report.md"]
    from recurzoo.export import onnx

    real = onnx.create_model
    monkeypatch.setattr(onnx, "create_model", lambda *a, **k: pytest.fail("built the model before checking --out"))
    assert _export(tmp_path) == 2
    _one_error_line(capsys, "--out: 3 output file(s) exist already", "sret_tiny.onnx", "--overwrite")
    assert _export(tmp_path, "--precision", "int8") == 2  # the edge export writes the fp32 ONNX too
    _one_error_line(capsys, "--out: 1 output file(s) exist already", "sret_tiny.onnx", "--overwrite")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    monkeypatch.setattr(onnx, "create_model", real)
    assert _export(tmp_path, "--overwrite") == 0
    assert sorted(os.listdir(tmp_path)) == sorted(before)


@pytest.mark.parametrize("make_out", ["file", "under_a_file"])
def test_export_output_folder_that_is_a_file_is_one_line(tmp_path, capsys, make_out):
    (tmp_path / "taken").write_text("x")
    assert _export(tmp_path / "taken" / ("sub" if make_out == "under_a_file" else "")) == 2
    _one_error_line(capsys, "--out", "taken")
    assert os.listdir(tmp_path) == ["taken"] and (tmp_path / "taken").read_text() == "x"


@pytest.mark.parametrize("stage", ["check_parity", "_write_report"])
def test_interrupted_or_failed_export_removes_its_files_and_keeps_earlier_ones(tmp_path, monkeypatch, capsys, stage):
    from recurzoo.export import onnx

    real = getattr(onnx, stage)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # the stage wrote what it writes, then the user pressed Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, stage, interrupted)
    assert _export(tmp_path / "new" / "deeper") == 130
    assert "recurzoo export: interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    (tmp_path / "sret_tiny.onnx").write_bytes(b"an earlier export")
    assert _export(tmp_path, "--overwrite") == 130
    assert (
        os.listdir(tmp_path) == ["sret_tiny.onnx"]
        and (tmp_path / "sret_tiny.onnx").read_bytes() == b"an earlier export"
    )
    monkeypatch.setattr(onnx, stage, lambda *a, **k: (_ for _ in ()).throw(ValueError("a failed step")))
    assert _export(tmp_path / "failed") == 2
    _one_error_line(capsys, "a failed step")
    assert os.listdir(tmp_path) == ["sret_tiny.onnx"]


def test_terminated_export_removes_its_files_and_gives_the_handler_back(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's or ``kill``'s stop) cleans up as Ctrl-C does, and exits 128 + 15."""
    import signal
    import threading

    from recurzoo.export import onnx

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    real = onnx.check_parity

    def terminated(*args, **kwargs):
        real(*args, **kwargs)  # the ONNX file is written; then the process is told to stop
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the export")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(onnx, "check_parity", terminated)
    assert _export(tmp_path / "new") == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "recurzoo export: terminated"
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is before


def test_interrupted_edge_export_removes_its_files(tmp_path, monkeypatch, capsys):
    from recurzoo.export import edge

    monkeypatch.setattr(edge, "_latency", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _export(tmp_path / "out", "--precision", "fp16") == 130
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval", "."], "--eval: expected with --precision int8/fp16"),
        (["--calibration", "."], "--calibration: expected with --precision int8/fp16"),
        (["--calibration-count", "5"], "--calibration-count: expected with --precision int8/fp16"),
        (["--precision", "fp16", "--calibration-count", "5"], "--calibration-count 5: counts the images of"),
        (["--precision", "int8", "--calibration-count", "5"], "--calibration-count 5: counts the images of"),
        (["--precision", "int8", "--batch", "2", "--no-report"], "--batch, --no-report: apply to the fp32 ONNX"),
        (["--precision", "int8", "--calibration", "EMPTY"], "--calibration EMPTY: no PNG/JPG/JPEG images"),
        (["--precision", "int8", "--eval", "EMPTY"], "--eval EMPTY: no PNG/JPG/JPEG images"),
        (["--checkpoint", "NOTES"], "NOTES: a text file"),
        (["--checkpoint", "EMPTY"], "EMPTY: is a folder, expected a checkpoint file"),
        (["--checkpoint", "MISSING"], "MISSING: no such checkpoint file"),
        (["--batch", "0"], "argument --batch: expected a positive integer, received '0'"),
        (["--opset", "-1"], "argument --opset: expected an ONNX opset from 7 to 20, received '-1'"),
        (["--opset", "99"], "argument --opset: expected an ONNX opset from 7 to 20, received '99'"),
        (["--opset", "12"], "--opset 12: torch.onnx cannot export sret_tiny at this opset (Exporting the operator"),
        (
            ["--input-size", "3", "9000", "32"],
            "--input-size: the export runs the model at it, so each entry is at most",
        ),
    ],
)
def test_export_flags_that_would_be_ignored_or_are_wrong_are_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOTES").write_text("hello")
    assert _export(tmp_path / "out", *flags) == 2
    _one_error_line(capsys, message)
    assert sorted(os.listdir(tmp_path)) == ["EMPTY", "NOTES"]


# ------------------------------------------------------------------------------------------ bench


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--threads 0", "argument --threads: expected an integer >= 1, received '0'"),
        ("--repeats 0", "argument --repeats: expected an integer >= 1"),
        ("--warmup -1", "argument --warmup: expected an integer >= 0"),
        ("--max-seconds nan", "argument --max-seconds: expected a number of seconds above 0"),
        ("--timeout -1", "argument --timeout: expected a number of seconds above 0"),
        ("--tile -3", "argument --tile: expected an integer >= 0"),
        ("--tile-overlap -1", "argument --tile-overlap: expected an integer >= 0"),
        ("--input-size 3 0 32", "argument --input-size: expected an integer >= 1, received '0'"),
        ("--batch 0", "argument --batch: expected positive integers"),
        ("--out .", "--out .: expected a file name"),
        ("--out FOLDER", "--out FOLDER: expected a file name (FILE gives FILE.md and FILE.csv), found a folder"),
        ("--out NOTES/table", "--out NOTES/table: cannot write into NOTES"),
        ("--out EARLIER", "--out EARLIER: EARLIER.md exist(s) already; pass --overwrite"),
        ("--readme MISSING.md", "--readme MISSING.md: expected a text file with a <!-- bench:start -->"),
        (
            "--readme FOLDER",
            "--readme FOLDER: expected a text file with a <!-- bench:start --> ... <!-- bench:end --> section, "
            "found a folder",
        ),
        ("--readme NOTES", "--readme NOTES: has no <!-- bench:start --> ... <!-- bench:end --> section"),
        ("--readme NOTES --growth 32", "--readme NOTES: has no <!-- bench-growth-whole:start -->"),
    ],
)
def test_bench_numbers_and_outputs_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys, flags, message):
    from recurzoo.export import bench

    monkeypatch.chdir(tmp_path)
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "NOTES").write_text("no markers\n")
    (tmp_path / "EARLIER.md").write_text("an earlier table")
    for runner in ("bench", "_run_scaling", "_run_train"):
        monkeypatch.setattr(bench, runner, lambda *a, **k: pytest.fail("ran before checking its flags"))
    assert main(["bench", "sret_tiny", *flags.split()]) == 2
    _one_error_line(capsys, message)
    assert sorted(os.listdir(tmp_path)) == ["EARLIER.md", "FOLDER", "NOTES"]
    assert (tmp_path / "EARLIER.md").read_text() == "an earlier table" and (
        tmp_path / "NOTES"
    ).read_text() == "no markers\n"


def test_bench_overwrite_replaces_its_tables_atomically(tmp_path, monkeypatch, capsys):
    from recurzoo.export import bench

    (tmp_path / "table.md").write_text("an earlier table")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:start -->\nold\n<!-- bench:end -->\nb\n")
    monkeypatch.setattr(bench, "bench", lambda *a, **k: [])
    flags = ["--out", str(tmp_path / "table"), "--readme", str(readme), "--device", "cpu"]
    assert main(["bench", "sret_tiny", *flags]) == 2
    assert main(["bench", "sret_tiny", *flags, "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["README.md", "table.csv", "table.md"]
    assert "old" not in readme.read_text() and readme.read_text().endswith("<!-- bench:end -->\nb\n")


# ------------------------------------------------------------------------------- training scripts

TRAINING_SCRIPTS = ("classification", "validate", "detection", "super_resolution", "camouflage", "distill_recurrent")


@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("super_resolution", ["--model", "rgt_small_x2", "--eval-only", "--val-data", "data/Image"], "--eval-only"),
        ("camouflage", ["--model", "msrnet_resnet50", "--evaluate", "--test-sets", "data"], "--evaluate"),
    ],
)
def test_evaluating_without_a_checkpoint_is_refused_not_scored_on_random_weights(
    tmp_path, monkeypatch, capsys, script, arguments, message
):
    import importlib

    from recurzoo.train.arguments import run_cli

    monkeypatch.chdir(tmp_path)
    for sub in ("Image", "Mask"):
        _photo(tmp_path / "data" / sub / "a.png")
    module = importlib.import_module(f"recurzoo.train.{script}")
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, [*arguments, "--output", "run", "--device", "cpu"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"error: {message} evaluates --checkpoint: give one" in line, line
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_script_help_states_only_defaults_that_exist_each_once(capsys, script):
    import importlib

    from recurzoo.train.arguments import run_cli

    module = importlib.import_module(f"recurzoo.train.{script}")
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, ["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith(f"usage: python -m recurzoo.train.{script} ")
    flat = " ".join(text.split())
    for empty in ("(default: None)", "(default: False)", "(default: )", "(default: {})", "(default: [])"):
        assert empty not in flat, (empty, flat)
    assert not re.search(r"\(default: [^()]*\) \(default:", flat), flat  # a stated default stated again


@pytest.mark.parametrize("command", ["train", "validate", "train-detection"])
def test_training_commands_name_themselves_in_usage_and_errors(tmp_path, capsys, command):
    assert main([command, "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recurzoo {command}: error: ") and "python -m" not in err, err
    assert main([command, "--help"]) == 0 and capsys.readouterr().out.startswith(f"usage: recurzoo {command} ")
    (tmp_path / "notes.pth").write_text("hello")
    assert main([command, "--model", "sret_tiny", "--data-dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"recurzoo {command}: error: ")


@pytest.mark.parametrize("script", ["classification", "camouflage"])
def test_a_new_training_run_does_not_mix_with_an_earlier_one_in_its_output(tmp_path, capsys, script):
    """An --output holding an earlier run is refused before anything runs, unless the run resumes it
    or is told to --overwrite (both then go on to the next check: here, the missing data)."""
    import importlib

    from recurzoo.train.arguments import run_cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text("an earlier run")
    data = ["--data-dir", str(tmp_path / "missing")] if script == "classification" else ["--train-sets", "missing"]
    argv = ["--model", "sret_tiny" if script == "classification" else "msrnet_resnet50", *data, "--output", str(run)]
    module = importlib.import_module(f"recurzoo.train.{script}")
    lines = []
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        with pytest.raises(SystemExit) as stop:
            run_cli(module.main, [*argv, *extra, "--device", "cpu"])
        assert stop.value.code == 2
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert f"--output: {run} holds an earlier run (args.yaml); pass --resume auto" in lines[0], lines[0]
    assert all("holds an earlier run" not in line and "missing" in line for line in lines[1:]), lines
    assert os.listdir(run) == ["args.yaml"] and (run / "args.yaml").read_text() == "an earlier run"


def test_a_training_run_refused_before_it_starts_leaves_no_output_folder(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("hello")
    data = ["--data-dir", str(tmp_path / "notes.pth"), "--model", "sret_tiny", "--output", str(tmp_path / "run")]
    assert main(["train", *data]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"recurzoo train: error: --data-dir {tmp_path / 'notes.pth'}: expected a dataset folder or a tar of one, "
        "found a file that is not a tar"
    )
    assert os.listdir(tmp_path) == ["notes.pth"]


@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("super_resolution", ["--model", "rgt_small_x2", "--train-data", "MISSING"], "--train-data: no such dataset"),
        (
            "super_resolution",
            ["--model", "rgt_small_x2", "--eval-only", "--val-data", "MISSING"],
            "--val-data: no such",
        ),
        ("camouflage", ["--model", "msrnet_resnet50", "--train-sets", "MISSING"], "--train-sets: dataset 'MISSING'"),
        ("camouflage", ["--model", "msrnet_resnet50", "--evaluate", "--test-sets", "MISSING"], "--test-sets: dataset"),
        (
            "camouflage",
            ["--model", "msrnet_resnet50", "--train-sets", "."],
            "--train-sets: dataset '.*': no mask folder",
        ),
    ],
)
def test_a_missing_dataset_names_its_flag_and_leaves_no_output_folder(
    tmp_path, monkeypatch, capsys, script, arguments, message
):
    import importlib

    from recurzoo.train.arguments import run_cli

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"recurzoo.train.{script}")
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, [*arguments, "--output", "run", "--device", "cpu"])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(f"python -m recurzoo.train.{script}: error: {message}", line), line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--config", "FOLDER"],
            "--config FOLDER: expected a YAML file of option defaults, cannot read it (Is a directory)",
        ),
        (["--config", "BINARY"], "--config BINARY: expected a YAML file of option defaults, cannot read it ('utf-8'"),
        (["--config", "MISSING"], "--config MISSING: expected a YAML file of option defaults, cannot read it (No such"),
        (["--output", "NOTES"], "argument --output: expected a folder, found the file NOTES"),
    ],
)
def test_training_config_and_output_mistakes_are_one_line_before_anything_is_built(
    tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "BINARY").write_bytes(b"\xcc\x80\xff binary")
    (tmp_path / "NOTES").write_text("hello")
    assert main(["train", "--model", "sret_tiny", "--data-dir", "FOLDER", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recurzoo train: error: {message}") and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["BINARY", "FOLDER", "NOTES"] and (tmp_path / "NOTES").read_text() == "hello"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("input_size: 224", "input_size (--input-size): expected a list of 3 values, received 224"),
        ("input_size: [3, 32]", "input_size (--input-size): expected a list of 3 values, received [3, 32]"),
        ("mean: 0.5", "mean (--mean): expected a list of one or more values, received 0.5"),
        ('pretrained: "no"', "pretrained (--no-pretrained): expected true or false, received 'no'"),
        ("epochs: abc", "epochs (--epochs): expected a value that --epochs takes, received 'abc'"),
        ("model_kwargs: 3", "model_kwargs (--model-kwargs): expected a mapping or a list of KEY=VALUE strings"),
    ],
)
def test_training_config_values_are_checked_as_the_flags_would_check_them(
    tmp_path, monkeypatch, capsys, yaml_text, message
):
    """argparse converts what it reads from the command line only: a file's value of the wrong form
    is one line naming the option, not an assertion or a TypeError deep in timm."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "run.yaml").write_text(yaml_text + "\n")
    assert main(["train", "--model", "sret_tiny", "--data-dir", "data", "--config", "run.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recurzoo train: error: --config run.yaml: {message}") and "\n" not in err, err


def test_an_unknown_training_model_suggests_each_close_name_once(tmp_path, capsys):
    _photo(tmp_path / "validation" / "0" / "a.png")
    assert main(["validate", "--model", "sret_tny", "--data-dir", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    suggestions = line.split("did you mean ")[1].rstrip("?").split(", ")
    assert suggestions[0] == "sret_tiny" and len(set(suggestions)) == len(suggestions), line


@pytest.mark.parametrize("make_out", ["file", "under_a_file"])
def test_convert_output_folder_that_is_a_file_is_one_line(tmp_path, capsys, make_out):
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" / ("sub" if make_out == "under_a_file" else "")
    assert main(["convert", "sret_tiny.in1k", str(tmp_path / "weights.pth"), "--out", str(out)]) == 2
    _one_error_line(capsys, "recurzoo convert: error: --out", "taken")
    assert os.listdir(tmp_path) == ["taken"] and (tmp_path / "taken").read_text() == "x"


def test_a_second_export_at_an_opset_without_an_operator_says_so(tmp_path):
    from recurzoo.export.onnx import export_model

    size = dict(input_size=(3, 32, 32), report=False, benchmark=False)
    assert export_model("sret_tiny", tmp_path / "a", **size).ok  # registers and unregisters the bicubic symbolic
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="_upsample_bicubic2d_aa.*opset version 12"):
        export_model("sret_tiny", tmp_path / "b", opset=12, **size)
    assert os.listdir(tmp_path) == ["a"]
