"""Fuzzing the ``recurzoo`` command line: argument lists drawn from each sub-command's own parser (its
positionals and flags, each with values from a pool of valid and hostile ones: empty, negative, huge,
non-numeric, unknown names, missing or unwritable paths, broken images, a decompression bomb, ...)
must end with exit code 0, or 2 and one error line, and never a traceback.

Kept fast: every example runs in a fresh folder of tiny files, models are built at the reduced test
widths of tests/_reduced.py (the user's ``--model-kwargs`` still apply on top), the demo runs its
forward passes at 32 x 32, and its ONNX export (``export`` has its own tests) is replaced by a no-op.
``cod`` is drawn with unreadable checkpoints only: its prediction (train/camouflage.py) is not run here. Examples are
derandomized (the same on every run) and few. ``export``, ``bench`` and the training scripts are not
drawn here: their own tests cover them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recurzoo import apps, registry
from recurzoo.cli import build_parser, main

sys.path.insert(0, os.path.dirname(__file__))
from _hostile import photo, png_header_only  # noqa: E402
from _reduced import REDUCED  # noqa: E402

# Values for any argument: what a careless or hostile user types.
HOSTILE = ["", " ", "0", "1", "-1", "x", "1e9", "nan", "-", "None", "ü", "a=b", "/", "../..", "9" * 30, "%s", "[1,"]
# Per argument (by dest, or (command, dest)): (valid values, invalid ones besides HOSTILE). Files are those
# of _make_files, in the example's folder. Models have default input sizes that run fast at test widths
# (RGT runs ~4 s at its 128 x 128, so `info` draws it only with a bad tag; `sr` draws it on tiny images).
POOLS = {
    "pattern": (["*", "hornet_*", "*tiny*", "rgt*"], ["zzz", "[", "*]"]),
    "model": (
        ["sret_tiny", "sret_tiny.in1k", "hornet_tiny_gf", "rvit_tiny_patch16_224"],
        ["sret_tiny.bogus", "resnet18"],
    ),
    ("sr", "model"): (["rgt_small_x2", "rgt_small_x3."], ["rgt_small_x2.bogus", "sret_tiny", "rgt_small", "rgt_x9"]),
    ("cod", "model"): (["msrnet_hornet_tiny_7x7"], ["rgt_small_x2", "msrnet_nope"]),
    "model_kwargs": (
        [[], ["embed_dim=24"]],
        [["num_heads=0"], ["embed_dim=-3"], ["foo=1"], ["foo"], ["=1"], ["a=b=c"], ["depth=[1,"], ["device='meta'"]]
        + [["pretrained=True"], ["embed_dim='x'"], ["blocks_per_group=-2"], ["embed_dim=1.5"]],
    ),
    "device": (["cpu"], ["cuda", "cuda:7", "meta", "bogus", "mps", "CPU", "cpu:0"]),
    "inputs": (
        ["a.png", "b.jpg", "deep.png", "images", "mixed"],
        ["broken.png", "bomb.png", "notes.txt", "empty", "missing"],
    ),
    "out": (["out", "out/deeper"], ["images", "a.png", "notes.txt/sub", ".", "/proc/none"]),
    ("sr", "checkpoint"): (["tiny_x2.pth"], ["notes.txt", "missing.pth", "images", "a.png", "empty.pth"]),
    "checkpoint": ([], ["notes.txt", "missing.pth", "images", "a.png", "empty.pth"]),  # cod: fails before predict
    "data_config": ([], ["notes.txt", "missing.yaml", "images", "a.png", "list.yaml", "bad.yaml"]),
    "input_size": (["3", "32", "48"], ["100000", "2"]),
    "tile": (["8", "16", "100000"], []),
    "tile_overlap": (["0", "4"], ["32"]),
    "max_pixels": (["120", "1000000"], ["2"]),
    "base_size": (["32", "64"], []),
    "batch_size": (["1", "2"], []),
}
EXAMPLES = {"list": 20, "info": 8, "sr": 30, "demo": 2, "cod": 15}


def _make_files(folder, checkpoint):
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copy(checkpoint, folder / "tiny_x2.pth")
    photo(folder / "a.png")
    photo(folder / "b.jpg", 9, 7, seed=1)
    Image.fromarray(np.random.default_rng(2).integers(0, 65536, (8, 8), dtype=np.uint16)).save(folder / "deep.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    png_header_only(folder / "bomb.png", 100_000, 100_000)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "list.yaml").write_text("- a\n- b\n")
    (folder / "bad.yaml").write_text("a: [1,\n")
    (folder / "empty.pth").write_bytes(b"")
    photo(folder / "images" / "c.png", 8, 8, seed=3)
    photo(folder / "mixed" / "d.png", 8, 10, seed=4)
    (folder / "mixed" / "e.png").write_text("not an image either")
    (folder / "empty").mkdir()


def _tiny_create_model(name, **kwargs):
    family = registry.model_family(name)
    reduced = dict(REDUCED.get(family, {}))
    if family == "camouflage":  # MSRNet: the backbone (named after "msrnet_") at its test widths
        reduced["backbone_kwargs"] = REDUCED.get(registry.model_family(name[len("msrnet_") :]), {})
    return registry.create_model(name, **{**reduced, **kwargs})


def _sub_parser(command: str) -> argparse.ArgumentParser:
    commands = next(action for action in build_parser()._actions if action.dest == "command")
    return commands.choices[command]


def _values(action: argparse.Action, command: str):
    """A strategy for the strings that follow this argument (as many as its ``nargs`` takes); one value
    in four is invalid."""
    valid, invalid = POOLS.get((command, action.dest), POOLS.get(action.dest, ([], [])))
    if action.choices:
        valid, invalid = list(action.choices), []
    if action.dest == "model_kwargs":
        return st.sampled_from(invalid) if not valid else st.one_of(st.sampled_from(valid), st.sampled_from(invalid))
    invalid = invalid + HOSTILE

    @st.composite
    def value(draw):
        use_invalid = not valid or draw(st.integers(0, 3)) == 0
        return draw(st.sampled_from(invalid if use_invalid else valid))

    if isinstance(action.nargs, int):
        return st.lists(value(), min_size=action.nargs, max_size=action.nargs)
    if action.nargs in ("+", "*"):
        return st.lists(value(), min_size=1 if action.nargs == "+" else 0, max_size=3)
    return st.lists(value(), min_size=1, max_size=1)


@st.composite
def _command_lines(draw, command: str):
    """``[command, *positionals, *flags]``: required flags always, each other flag one time in three."""
    arguments = [command]
    for action in _sub_parser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positional
            if action.nargs == "?" and not draw(st.booleans()):
                continue
            arguments += draw(_values(action, command))
        elif action.required or draw(st.integers(0, 2)) == 0:
            arguments.append(action.option_strings[-1])
            if action.nargs != 0:
                arguments += draw(_values(action, command))
    return arguments


_counter = itertools.count()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Tiny models, the demo's forward passes at 32 x 32 and no ONNX export; each example gets its own
    folder (see ``_make_files``)."""
    monkeypatch.setattr(apps, "create_model", _tiny_create_model)
    monkeypatch.setattr(apps, "_demo_export", lambda name, folder, echo: None)
    figures = [dict(row, input_size="3x32x32") for row in apps.zoo_figures()]
    monkeypatch.setattr(apps, "zoo_figures", lambda: figures)

    checkpoint = tmp_path / "tiny_x2.pth"
    torch.save(_tiny_create_model("rgt_small_x2").state_dict(), checkpoint)

    def fresh_folder():
        folder = tmp_path / f"example{next(_counter)}"
        folder.mkdir()
        _make_files(folder, checkpoint)
        monkeypatch.chdir(folder)
        return folder

    return fresh_folder


def _check_outcome(argv, code, captured):
    assert "Traceback" not in captured.err, (argv, captured.err)
    assert code in (0, 2), (argv, code, captured.err)
    if code == 2:
        errors = [line for line in captured.err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and errors[0].startswith("recurzoo"), (argv, captured.err)


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_random_command_lines_end_in_exit_0_or_2_without_traceback(command, sandbox, capsys):
    @settings(
        max_examples=EXAMPLES[command],
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argv=_command_lines(command))
    def run(argv):
        sandbox()
        code = main(argv)
        _check_outcome(argv, code, capsys.readouterr())

    run()
