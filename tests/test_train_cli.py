"""The training scripts as commands: a user's mistake (a bad flag or value, missing data, a checkpoint that
does not fit or would run code) is one line on stderr with exit code 2, never a usage block or traceback;
every checkpoint flag reads through recurzoo.checkpoint, so a crafted pickle's payload never runs."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import recurzoo  # noqa: F401
from recurzoo.train.arguments import run_cli

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import (  # noqa: E402
    TINY_HORNET,
    TINY_RGT,
    classification_args,
    kwargs_flags,
    make_coco,
    make_image_folder,
    sr_args,
    write_code_running_checkpoints,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:pycocotools", "ignore:Detected pickle protocol:UserWarning"
)

HORNET = ["--model-kwargs", "dims=(8,16,32,64)", "depths=(1,1,1,1)"]


def _command(module, *arguments):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"recurzoo.train.{module}", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny ImageFolder, COCO set, SR folder and COD folder, and two crafted code-running checkpoints."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    make_image_folder(str(root / "folder"), per_class=(2, 1))
    make_coco(str(root / "coco"), images=(2, 1))
    (root / "sr").mkdir()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "sr" / "photo.png")
    for sub in ("Image", "Mask"):
        (root / "cod" / sub).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert(
                "L" if sub == "Mask" else "RGB"
            ).save(root / "cod" / sub / f"{name}.png")
    marker = root / "payload_ran"
    legacy, zipped = write_code_running_checkpoints(str(root / "evil"), str(marker))
    return dict(root=root, marker=marker, evil=legacy, evil_zip=zipped)


def _fill(arguments, **values):
    """``arguments`` with ``<name>`` placeholders replaced (model kwargs hold braces of their own)."""
    filled = []
    for argument in arguments:
        for name, value in values.items():
            argument = argument.replace(f"<{name}>", str(value))
        filled.append(argument)
    return filled


def _one_error_line(stderr, prog):
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if f"{prog}: error: " in line]
    assert len(errors) == 1 and "Traceback" not in stderr and "usage:" not in stderr, stderr
    return errors[0]


# ------------------------------------------------------------------------------------ real commands


def test_unknown_flag_is_one_line_with_exit_code_2_from_the_command_line():
    result = _command("classification", "--model", "x", "--data-dir", "y", "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "python -m recurzoo.train.classification: error: unrecognized arguments: --no-such-flag"
    )


def test_bad_value_is_one_line_with_exit_code_2_from_the_command_line():
    result = _command("super_resolution", "--model", "rgt_small_x2", "--lr", "fast")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "python -m recurzoo.train.super_resolution: error: argument --lr: invalid float value: 'fast'"
    )


def test_crafted_checkpoint_is_refused_in_one_line_and_its_payload_never_runs(data, tmp_path):
    result = _command(
        "classification",
        "--data-dir",
        str(data["root"] / "folder"),
        "--model",
        "hornet_tiny_7x7",
        *HORNET,
        "--initial-checkpoint",
        data["evil_zip"],
        "--output",
        str(tmp_path),
        "--device",
        "cpu",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # nothing else printed before it
    line = _one_error_line(result.stderr, "recurzoo.train.classification")
    assert "evil_zip.pth: refused to load: the file contains pickled objects that would run code" in line
    assert not data["marker"].exists()


# -------------------------------------------------- every script's checkpoint flags (through run_cli)


def _evil_cases():
    folder = classification_args("<root>/folder", "<out>", batch_size=2)
    coco = [
        "--data-dir",
        "<root>/coco",
        "--backbone",
        "hornet_tiny_7x7",
        "--backbone-kwargs",
        *kwargs_flags(TINY_HORNET),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--output",
        "<out>",
    ]
    sr = sr_args("<root>/sr", "<out>", batch_size=1)
    cod = [
        "--backbone",
        "hornet_tiny_7x7",
        "--model-kwargs",
        f"backbone_kwargs={TINY_HORNET}",
        "--device",
        "cpu",
        "--output",
        "<out>",
    ]
    distill = [
        "--teacher",
        "vit_tiny_patch16_224",
        "--data-dir",
        "<root>/folder",
        "--device",
        "cpu",
        "--output",
        "<out>",
    ]
    return [
        ("classification", folder + ["--initial-checkpoint", "<evil>"]),
        (
            "classification",
            folder
            + [
                "--teacher",
                "hornet_tiny_7x7",
                "--teacher-kwargs",
                *kwargs_flags(TINY_HORNET),
                "--teacher-checkpoint",
                "<evil>",
            ],
        ),
        ("classification", folder + ["--resume", "<evil>"]),
        (
            "validate",
            [
                "--data-dir",
                "<root>/folder",
                "--split",
                "val",
                "--model",
                "hornet_tiny_7x7",
                *HORNET,
                "--workers",
                "0",
                "--device",
                "cpu",
                "--checkpoint",
                "<evil>",
            ],
        ),
        ("detection", coco + ["--backbone-checkpoint", "<evil>"]),
        ("detection", coco + ["--resume", "<evil>"]),
        ("super_resolution", sr + ["--checkpoint", "<evil>"]),
        ("super_resolution", sr + ["--resume", "<evil>"]),
        ("camouflage", cod + ["--evaluate", "--test-sets", "<root>/cod", "--checkpoint", "<evil>"]),
        (
            "camouflage",
            cod + ["--train-sets", "<root>/cod", "--batch-size", "2", "--workers", "0", "--resume", "<evil>"],
        ),
        (
            "distill_recurrent",
            distill + ["--teacher-kwargs", "img_size=32", "depth=2", "--teacher-checkpoint", "<evil>"],
        ),
        ("distill_recurrent", distill + ["--resume", "<evil>"]),
    ]


@pytest.mark.parametrize("module, arguments", _evil_cases(), ids=[f"{m}-{a[-2].lstrip('-')}" for m, a in _evil_cases()])
def test_every_checkpoint_flag_refuses_a_crafted_pickle_in_one_line(data, tmp_path, capsys, module, arguments):
    script = importlib.import_module(f"recurzoo.train.{module}")
    for evil in (data["evil"], data["evil_zip"]):
        argv = _fill(arguments, root=data["root"], out=tmp_path / "out", evil=evil)
        with pytest.raises(SystemExit) as exited:
            run_cli(script.main, argv)
        assert exited.value.code == 2
        line = _one_error_line(capsys.readouterr().err, f"recurzoo.train.{module}")
        assert f"{os.path.basename(evil)}: refused to load" in line
    assert not data["marker"].exists()


# ------------------------------------------------------------------------------------ other mistakes


@pytest.mark.parametrize(
    "module, arguments, message",
    [
        ("classification", ["--data-dir", "<tmp>/absent", "--model", "hornet_tiny_7x7"], "absent: no such folder"),
        ("validate", ["--data-dir", "<tmp>/absent", "--model", "hornet_tiny_7x7"], "absent: no such folder"),
        ("detection", ["--data-dir", "<tmp>/absent"], "absent/val2017 does not exist"),
        (
            "super_resolution",
            [
                "--model",
                "rgt_small_x2",
                "--model-kwargs",
                *kwargs_flags(TINY_RGT),
                "--train-data",
                "<tmp>/absent",
            ],
            "no such dataset folder",
        ),
        ("camouflage", ["--backbone", "resnet18", "--train-sets", "<tmp>/absent"], "neither a folder nor a name"),
        (
            "distill_recurrent",
            [
                "--teacher",
                "vit_tiny_patch16_224",
                "--teacher-kwargs",
                "img_size=32",
                "depth=2",
                "--teacher-checkpoint",
                "<tmp>/absent.pth",
                "--data-dir",
                "<tmp>",
            ],
            "absent.pth: no such checkpoint file",
        ),
        ("super_resolution", ["--model", "no_such_model_x2", "--train-data", "<tmp>"], "--model no_such_model_x2"),
        ("classification", ["--config", "<tmp>/absent.yaml"], "--config .*absent.yaml"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, module, arguments, message):
    script = importlib.import_module(f"recurzoo.train.{module}")
    argv = _fill(arguments, tmp=tmp_path) + ["--device", "cpu"]
    if module != "validate":  # validate writes nothing
        argv += ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        run_cli(script.main, argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    line = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(line) == 1 and re.search(message, line[0]) and "Traceback" not in stderr, stderr


def test_checkpoint_of_another_width_is_one_line_naming_the_mismatch(data, tmp_path, capsys):

    from recurzoo.train import classification

    wide = recurzoo.create_model("hornet_tiny_7x7", num_classes=3, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
    torch.save(dict(state_dict=wide.state_dict()), tmp_path / "wide.pth")
    argv = classification_args(data["root"] / "folder", tmp_path / "out") + [
        "--initial-checkpoint",
        str(tmp_path / "wide.pth"),
    ]
    with pytest.raises(SystemExit) as exited:
        run_cli(classification.main, argv)
    assert exited.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "recurzoo.train.classification")
    assert re.search(
        r"wide\.pth: checkpoint does not fit hornet_tiny_7x7 .*: \d+ shape mismatches \(checkpoint vs "
        r"model\): .*\(32, 16, 1, 1\) vs \(16, 8, 1, 1\)",
        line,
    ), line


# ------------------------------------------------------------------------- options every script shares

_REQUIRED = {  # what each script needs on top of the shared options, given here by the config file
    "classification": "model: hornet_tiny_7x7\ndata_dir: data\n",
    "detection": "data-dir: coco\n",
    "camouflage": "",
    "super_resolution": "",
    "distill_recurrent": "teacher: vit_tiny_patch16_224\ndata_dir: data\nteacher_kwargs: [img_size=32, depth=2]\n",
}


@pytest.mark.parametrize("module", sorted(_REQUIRED))
def test_every_training_script_reads_the_shared_options_from_a_config_file(module, tmp_path):
    from recurzoo.train.arguments import parse_args_with_config

    script = importlib.import_module(f"recurzoo.train.{module}")
    config = tmp_path / "recipe.yaml"
    config.write_text(
        _REQUIRED[module] + "seed: 7\nfail-at-step: 3\nfail_mode: nan\nno_progress: true\noutput: there\n"
    )
    args = parse_args_with_config(script.build_parser(), ["--config", str(config), "--seed", "8", "--resume", "auto"])
    assert (args.seed, args.fail_at_step, args.fail_mode, args.no_progress) == (8, 3, "nan", True)  # the flag wins
    assert (args.output, args.resume, args.device) == ("there", "auto", None)
    interval = (
        ("log_every", "save_every")
        if module in ("camouflage", "super_resolution", "distill_recurrent")
        else (
            "log_interval",
            "checkpoint_every",
        )
    )
    assert all(isinstance(getattr(args, name), int) for name in interval)
    if module == "distill_recurrent":
        assert args.teacher_kwargs == dict(img_size=32, depth=2)
