"""Data-parallel training under torchrun, resume after a crash or a signal, and the NaN guard.

Uses recurzoo.train.classification with a reduced model on a tiny colour ImageFolder: 36 training
images in batches of 8 make 4 steps per epoch (2 x 4 images per step under 2 processes).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch
from timm.utils import random_seed

import recurzoo  # noqa: F401
from recurzoo.train import arguments, classification, resume, run

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import TINY_HORNET, TINY_SRET, classification_args, make_image_folder  # noqa: E402

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("colours")))


def _args(data_dir, output, epochs=3, batch_size=8, model="hornet_tiny_7x7", kwargs=TINY_HORNET):
    return classification_args(data_dir, output, model, kwargs, epochs=epochs, batch_size=batch_size, lr="2e-3")


def _run_cli(arguments, launcher=(sys.executable, "-m")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "recurzoo.train.classification", *arguments], capture_output=True, text=True, timeout=300, env=env
    )


def _epochs(output):
    with open(os.path.join(output, "summary.csv"), newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_killed_mid_epoch_run_resumes_and_records_every_epoch(image_folder, tmp_path):
    output = tmp_path / "run"
    killed = _run_cli(_args(image_folder, output) + ["--fail-at-step", "6", "--fail-mode", "sigkill"])
    assert killed.returncode == -signal.SIGKILL  # died in epoch 1, at its third step
    assert _epochs(output) == [0]
    last = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert (last["epoch"], last["batches_done"], last["num_updates"]) == (0, None, STEPS_PER_EPOCH)
    assert not [name for name in os.listdir(output) if name.endswith(".tmp") or name.startswith("tmp")]

    resumed = _run_cli(_args(image_folder, output) + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    assert _epochs(output) == [0, 1, 2]
    final = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert (final["epoch"], final["num_updates"]) == (2, 3 * STEPS_PER_EPOCH)


def test_sigterm_writes_a_final_checkpoint_and_resume_finishes_that_epoch(image_folder, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(run.TrainingInterrupted) as stopped:
        classification.main(_args(image_folder, output) + ["--fail-at-step", "6", "--fail-mode", "sigterm"])
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    last = resume.load_checkpoint(str(output / "last.pth.tar"))
    # stopped before the update of step 6: epoch 1 has 2 of its 4 batches done
    assert (last["epoch"], last["batches_done"], last["num_updates"]) == (1, 2, 6)
    assert _epochs(output) == [0]

    result = classification.main(_args(image_folder, output) + ["--resume", "auto"])
    assert result["num_updates"] == 3 * STEPS_PER_EPOCH  # exactly the missing steps were run
    assert _epochs(output) == [0, 1, 2]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(run.NonFiniteLossError, match="non-finite loss.*step 5"):
        classification.main(_args(image_folder, output) + ["--fail-at-step", "5", "--fail-mode", "nan"])
    last = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert (last["epoch"], last["batches_done"], last["num_updates"]) == (0, None, STEPS_PER_EPOCH)
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values() if value.is_floating_point())
    assert _epochs(output) == [0]
    log = (output / "log.txt").read_text()
    assert "non-finite loss" in log and "last good checkpoint is" in log and "last.pth.tar" in log


def test_resuming_an_earlier_checkpoint_rewrites_the_later_summary_rows(image_folder, tmp_path):
    output = tmp_path / "run"
    classification.main(_args(image_folder, output, epochs=2))
    first = (output / "summary.csv").read_text().splitlines()
    result = classification.main(
        _args(image_folder, output, epochs=2) + ["--resume", str(output / "checkpoint-0.pth.tar")]
    )
    assert result["num_updates"] == 2 * STEPS_PER_EPOCH
    again = (output / "summary.csv").read_text().splitlines()
    assert _epochs(output) == [0, 1] and again[:2] == first[:2]  # epoch 1 was trained again, recorded once


def test_nan_loss_exits_with_code_3_and_a_message_from_the_command_line(image_folder, tmp_path, capsys):
    # ``python -m recurzoo.train.classification`` runs ``arguments.run_cli(main)``
    with pytest.raises(SystemExit) as exited:
        arguments.run_cli(
            classification.main,
            _args(image_folder, tmp_path / "run", epochs=1) + ["--fail-at-step", "1", "--fail-mode", "nan"],
        )
    assert exited.value.code == run.EXIT_NON_FINITE == 3
    message = capsys.readouterr().err
    assert "non-finite loss" in message and "last good checkpoint" in message


def test_two_torchrun_processes_end_with_identical_weights(image_folder, tmp_path):
    output = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--module"]
    args = _args(image_folder, output, epochs=2, batch_size=4, model="sret_tiny", kwargs=TINY_SRET)
    result = _run_cli(args + ["--rank-weights", "--model-ema", "--model-ema-decay", "0.9"], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr and f"{STEPS_PER_EPOCH} steps per epoch" in result.stderr
    from safetensors.torch import load_file

    rank0, rank1 = load_file(str(output / "rank0.safetensors")), load_file(str(output / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert any("running_var" in key for key in rank0)  # BatchNorm statistics are compared too
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    last = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert last["num_updates"] == 2 * STEPS_PER_EPOCH and _epochs(output) == [0, 1]
    for key, value in last["state_dict"].items():  # rank 0 wrote the checkpoint of the same weights
        assert torch.equal(value, rank0[key]), key
    # trained: the ranks moved away from their common starting point
    random_seed(42)

    start = recurzoo.create_model("sret_tiny", num_classes=3, **TINY_SRET).state_dict()
    assert not torch.equal(start["stem.0.conv.weight"], rank0["stem.0.conv.weight"])
