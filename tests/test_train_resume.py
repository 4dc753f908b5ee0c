"""Exact resume: a run stopped mid-epoch and resumed continues with the same losses and weights as one
that was never stopped (model, optimizer, scheduler, EMA, grad scaler and every RNG are restored).

The classification runs use stochastic depth, mixup/cutmix, random erasing and flips, so that the
data order, the augmentation and the model's own randomness all have to be restored; the
super-resolution runs use random crops and albumentations' flips/transpositions with an EMA.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from timm.utils import random_seed

import recurzoo  # noqa: F401
from recurzoo.train import classification, resume, run
from recurzoo.train import super_resolution as sr_train

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import TINY_SRET, classification_args, detection_args, make_image_folder, sr_args  # noqa: E402

STEPS_PER_EPOCH = 4  # 36 training images, batches of 8


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("colours")))


# SReT: BatchNorm in its stem (running statistics a stopped step must not leave moved), random slicing


def _classification_args(data_dir, output):
    return classification_args(
        data_dir,
        output,
        "sret_tiny",
        TINY_SRET,
        epochs=2,
        warmup_epochs=1,
        lr="2e-3",
        drop_path=0.3,
        mixup=0.8,
        cutmix=1.0,
        reprob=0.5,
        model_ema=True,
        model_ema_decay=0.8,
        val_split="",
        log_interval=1,
    )


def _step_losses(output):
    """{optimizer step: training loss} from the per-step metrics log (the last record of a step wins)."""
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as handle:
        return {record["step"]: record["loss"] for record in map(json.loads, handle) if "loss" in record}


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    classification.main(_classification_args(image_folder, output))
    return output


def _assert_identical(ours, theirs, where=""):
    """Nested dicts/lists of tensors and plain values, equal to the bit."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            _assert_identical(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for index, (mine, other) in enumerate(zip(ours, theirs)):
            _assert_identical(mine, other, f"{where}[{index}]")
    elif isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs), where
    else:
        assert ours == theirs, where


def _assert_same_final_state(resumed_dir, reference_dir):
    resumed = resume.load_checkpoint(str(resumed_dir / "last.pth.tar"))
    reference = resume.load_checkpoint(str(reference_dir / "last.pth.tar"))
    assert resumed["num_updates"] == reference["num_updates"] == 2 * STEPS_PER_EPOCH
    for part in ("state_dict", "state_dict_ema", "optimizer"):
        _assert_identical(resumed[part], reference[part], part)


@pytest.mark.parametrize("stop", ["sigterm", "nan"])
def test_resumed_classification_run_repeats_the_uninterrupted_losses_and_weights(
    image_folder, uninterrupted, tmp_path, stop
):
    output = tmp_path / "run"
    if stop == "sigterm":
        # stopped before the update of step 6 (the second of epoch 1): that batch is trained again
        with pytest.raises(run.TrainingInterrupted):
            classification.main(
                _classification_args(image_folder, output) + ["--fail-at-step", "5", "--fail-mode", "sigterm"]
            )
        expected = (1, 1, 5)
    else:
        # checkpoints after steps 2 and 6 (mid-epoch); the NaN at step 8 keeps the one after step 6
        with pytest.raises(run.NonFiniteLossError):
            classification.main(
                _classification_args(image_folder, output)
                + ["--checkpoint-every", "2", "--fail-at-step", "7", "--fail-mode", "nan"]
            )
        expected = (1, 2, 6)
    last = resume.load_checkpoint(str(output / "last.pth.tar"))
    assert (last["epoch"], last["batches_done"], last["num_updates"]) == expected
    assert "rng" in last

    classification.main(_classification_args(image_folder, output) + ["--resume", "auto"])
    reference, resumed = _step_losses(uninterrupted), _step_losses(output)
    assert sorted(reference) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    done = expected[2]
    for step in range(done + 1, 2 * STEPS_PER_EPOCH + 1):  # exactly the uninterrupted run's losses
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    _assert_same_final_state(output, uninterrupted)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    random_seed(3)
    state = resume.rng_state()
    resume.save_checkpoint(str(tmp_path / "rng.pt"), dict(rng=state))
    expected = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    random_seed(99)
    resume.set_rng_state(resume.load_checkpoint(str(tmp_path / "rng.pt"))["rng"])
    again = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_grad_scaler_state_round_trips_through_the_training_checkpoint(tmp_path):
    from timm.utils import NativeScaler

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = NativeScaler(device="cpu")
    scaler._scaler.scale(torch.ones(()))  # the scale is created lazily
    scaler._scaler.update(new_scale=512.0)  # as after overflows: not the initial 65536
    saver = resume.TrainCheckpointSaver(model, optimizer, str(tmp_path), arch="linear", amp_scaler=scaler)
    saver.save_last(0)
    saved = resume.load_checkpoint(saver.last_path)
    assert saved[scaler.state_dict_key]["scale"] == 512.0
    restored = NativeScaler(device="cpu")
    resume.restore_training_state(
        saved, torch.nn.Linear(3, 2), torch.optim.SGD(model.parameters(), lr=0.1), amp_scaler=restored
    )
    assert restored.state_dict() == scaler.state_dict() and restored._scaler.get_scale() == 512.0


# ------------------------------------------------------------------------------------ super-resolution


def _photos(root):
    from PIL import Image
    from skimage import data

    for name in ("astronaut", "chelsea"):
        Image.fromarray(getattr(data, name)()[:96, :96]).save(root / f"{name}.png")
    return root


def _sr_args(train_dir, output):
    # 2 photos x repeat 3 = 6 patches a pass, batches of 2: 3 steps an epoch
    return sr_args(train_dir, output, repeat=3, steps=7, milestones=0.5, ema_decay=0.5, save_every=2, log_every=1)


@pytest.mark.parametrize("stop", ["sigterm", "nan"])
def test_resumed_super_resolution_run_repeats_the_uninterrupted_losses_and_weights(tmp_path, stop):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    _photos(train_dir)
    sr_train.main(_sr_args(train_dir, tmp_path / "once"))
    stopped = tmp_path / "stopped"
    if stop == "sigterm":  # before the update of step 5 (the second of epoch 1): that batch is trained again
        with pytest.raises(run.TrainingInterrupted):
            sr_train.main(_sr_args(train_dir, stopped) + ["--fail-at-step", "4", "--fail-mode", "sigterm"])
    else:  # the NaN at step 6 keeps the checkpoint written after step 4
        with pytest.raises(run.NonFiniteLossError):
            sr_train.main(_sr_args(train_dir, stopped) + ["--fail-at-step", "5", "--fail-mode", "nan"])
    assert torch.load(stopped / "last.pt", weights_only=True)["step"] == 4
    sr_train.main(_sr_args(train_dir, stopped) + ["--resume", "auto"])
    reference, resumed = _step_losses(tmp_path / "once"), _step_losses(stopped)
    assert sorted(reference) == list(range(1, 8))
    for step in range(5, 8):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    once = torch.load(tmp_path / "once/last.pt", weights_only=True)
    again = torch.load(stopped / "last.pt", weights_only=True)
    assert once["step"] == again["step"] == 7
    for part in ("model", "ema", "optimizer", "scheduler"):
        _assert_identical(again[part], once[part], part)


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_resumed_detection_run_ends_with_the_uninterrupted_weights(tmp_path):
    from _train_data import make_coco

    from recurzoo.train import detection

    root = make_coco(str(tmp_path / "coco"), images=(12, 2), max_boxes=1)  # batches of 4: 3 steps an epoch

    def args(output):
        return detection_args(
            root,
            output,
            detector_kwargs=dict(rpn_batch_size_per_image=32, box_batch_size_per_image=32, rpn_post_nms_top_n_train=50),
            fpn_channels=16,
            epochs=2,
            opt="adamw",
            lr="1e-3",
            sched="cosine",
            eval_every=5,
        )

    detection.main(args(tmp_path / "once"))
    with pytest.raises(run.TrainingInterrupted):  # before the update of step 5 (the second of epoch 1)
        detection.main(args(tmp_path / "twice") + ["--fail-at-step", "4", "--fail-mode", "sigterm"])
    assert resume.load_checkpoint(str(tmp_path / "twice" / "last.pth.tar"))["batches_done"] == 1
    detection.main(args(tmp_path / "twice") + ["--resume", "auto"])
    once = resume.load_checkpoint(str(tmp_path / "once" / "last.pth.tar"))
    twice = resume.load_checkpoint(str(tmp_path / "twice" / "last.pth.tar"))
    assert once["num_updates"] == twice["num_updates"] == 6
    for part in ("state_dict", "optimizer"):
        _assert_identical(twice[part], once[part], part)


# ------------------------------------------------------------------------- camouflaged object detection


@pytest.mark.parametrize("stop", ["sigterm", "nan"])
def test_resumed_camouflage_run_repeats_the_uninterrupted_losses_and_weights(tmp_path, stop):
    from PIL import Image

    from recurzoo.train import camouflage as cod

    rng = np.random.default_rng(0)
    for sub in ("Image", "Mask"):
        (tmp_path / "cod" / sub).mkdir(parents=True)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "cod/Image" / f"{index}.png")
        Image.fromarray((rng.random((40, 48)) > 0.5).astype(np.uint8) * 255).save(
            tmp_path / "cod/Mask" / f"{index}.png"
        )
    model_kwargs = [
        "mid_dim=8",
        "scale_groups=2",
        "fusion_groups=2",
        "predictor_dim=8",
        "backbone_kwargs={'dims': (8, 16, 32, 64), 'depths': (1, 1, 1, 1), 'drop_path_rate': 0.2}",
    ]

    def args(output, *extra):  # 6 pairs in batches of 2: 3 steps an epoch; checkpoints every 2 steps
        return [
            "--backbone",
            "hornet_tiny_7x7",
            "--model-kwargs",
            *model_kwargs,
            "--train-sets",
            str(tmp_path / "cod"),
            "--base-size",
            "32",
            "--batch-size",
            "2",
            "--steps",
            "7",
            "--lr",
            "1e-2",
            "--save-every",
            "2",
            "--workers",
            "0",
            "--no-progress",
            "--device",
            "cpu",
            "--output",
            str(output),
            *extra,
        ]

    once = cod.main(args(tmp_path / "once"))
    stopped = tmp_path / "stopped"
    if stop == "sigterm":  # before the update of step 5: the final checkpoint holds 4 steps
        with pytest.raises(run.TrainingInterrupted):
            cod.main(args(stopped, "--fail-at-step", "4", "--fail-mode", "sigterm"))
    else:  # the NaN at step 6 keeps the checkpoint written after step 4
        with pytest.raises(run.NonFiniteLossError):
            cod.main(args(stopped, "--fail-at-step", "5", "--fail-mode", "nan"))
    assert torch.load(stopped / "last.pt", weights_only=True)["step"] == 4
    resumed = cod.main(args(stopped, "--resume", "auto"))
    assert len(once["history"]) == 7 and resumed["history"] == once["history"]  # steps 5 to 7 computed again
    _assert_identical(
        torch.load(stopped / "last.pt", weights_only=True)["model"],
        torch.load(tmp_path / "once/last.pt", weights_only=True)["model"],
        "model",
    )
