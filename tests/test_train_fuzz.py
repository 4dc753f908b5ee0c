"""Fuzzing the training scripts' command lines (the pattern of tests/test_cli_fuzz.py): argument lists drawn
from each script's own parser, every flag with valid and hostile values (empty, negative, zero, NaN, huge,
non-numeric, unknown names, broken --config files), must end in exit code 0, or 2 with one error line, and
never a traceback. Only the cheap paths run: parsing, --config, the value ranges, --help and the --device
check; the training itself (``run_distributed``) is replaced by that check, so nothing trains here."""

from __future__ import annotations

import argparse
import importlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recurzoo.devices import resolve_device
from recurzoo.train import loops, validate
from recurzoo.train.arguments import ParseKwargs, run_cli

SCRIPTS = ["classification", "validate", "detection", "super_resolution", "camouflage", "distill_recurrent"]
HOSTILE = ["", " ", "0", "-1", "x", "1e999", "nan", "-inf", "None", "ü", "a=b", "/", "9" * 30, "%s", "[1,", "--"]
VALID = {int: ["1", "2", "16"], float: ["0.5", "1e-4", "0.9"], None: ["a", "data", "out"]}
KWARGS = [["depth=2"], ["img_size=32", "depth=1"], ["foo"], ["=1"], ["a=b=c"], ["depth=[1,"], []]
CONFIGS = {
    "list.yaml": "- a\n- b\n",
    "bad.yaml": "a: [1,\n",
    "unknown.yaml": "no_such_option: 1\n",
    "epochs.yaml": "epochs: 0\nbatch_size: -3\n",
    "nan.yaml": "lr: .nan\n",
    "good.yaml": "seed: 3\n",
}
EXAMPLES = 25
EXTRA = {"super_resolution": ["--train-data", "data"]}  # what the script checks after parsing (training or eval)


def _values(action: argparse.Action, hostile: bool):
    """The strings that follow a flag (as many as its ``nargs`` takes); with ``hostile`` one value in three
    is hostile, else all are valid."""
    if isinstance(action, ParseKwargs):
        return st.sampled_from(KWARGS if hostile else KWARGS[:2])
    if action.dest == "config":
        return st.sampled_from([[name] for name in CONFIGS] + [["missing.yaml"]] if hostile else [["good.yaml"]])
    if action.dest == "device":
        return st.sampled_from([["cpu"], ["bogus"], ["cuda:9"], ["meta"], [""]] if hostile else [["cpu"]])
    valid = list(action.choices) if action.choices else VALID.get(action.type, VALID[None])

    @st.composite
    def value(draw):
        return draw(st.sampled_from(HOSTILE if hostile and draw(st.integers(0, 2)) == 0 else valid))

    if isinstance(action.nargs, int):
        return st.lists(value(), min_size=action.nargs, max_size=action.nargs)
    if action.nargs in ("+", "*"):
        return st.lists(value(), min_size=1 if action.nargs == "+" else 0, max_size=3)
    if action.nargs == "?":
        return st.lists(value(), min_size=0, max_size=1)
    return st.lists(value(), min_size=1, max_size=1)


@st.composite
def _command_lines(draw, parser: argparse.ArgumentParser):
    """Required flags always, each other flag one time in four (``--help`` one time in forty); the values of
    one command line in three are all valid."""
    hostile = draw(st.integers(0, 2)) > 0
    arguments = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            if draw(st.integers(0, 39)) == 0:
                arguments.append("--help")
            continue
        if action.required or draw(st.integers(0, 3)) == 0:
            arguments.append(draw(st.sampled_from(action.option_strings)))
            if action.nargs != 0:
                arguments += draw(_values(action, hostile))
    return arguments


_counter = itertools.count()


def _check(argv, code, captured):
    assert "Traceback" not in captured.err and code in (0, 2), (argv, code, captured.err)
    if code == 2:
        errors = [line for line in captured.err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and len(captured.err.strip().splitlines()) == 1, (argv, captured.err)


@pytest.mark.parametrize(
    "name, command",
    [(name, None) for name in SCRIPTS] + [("classification", "train"), ("detection", "train-detection")],
)
def test_random_training_command_lines_end_in_exit_0_or_2_without_traceback(
    name, command, tmp_path, monkeypatch, capsys
):
    """Through the script's run_cli (``python -m``), or with ``command`` through ``recurzoo COMMAND``."""
    from recurzoo.cli import main as recurzoo_main

    script = importlib.import_module(f"recurzoo.train.{name}")
    ran = []
    for owner in (loops, validate):  # Training.launch of the training scripts, and validate's main
        monkeypatch.setattr(owner, "run_distributed", lambda run, args: ran.append(resolve_device(args.device)))
    for file_name, text in CONFIGS.items():
        (tmp_path / file_name).write_text(text)
    monkeypatch.chdir(tmp_path)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argv=_command_lines(script.build_parser()))
    def run(argv):
        argv = EXTRA.get(name, []) + argv
        if command is not None:
            _check(argv, recurzoo_main([command, *argv]), capsys.readouterr())
            return
        try:
            run_cli(script.main, argv)
            code = 0
        except SystemExit as exited:
            code = exited.code
        _check(argv, code, capsys.readouterr())

    run()
    assert ran  # some drawn command lines passed every check (the pools are not all hostile)
