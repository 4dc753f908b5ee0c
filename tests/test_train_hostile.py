"""The training scripts against a user's mistakes: a missing split is an error naming its flag (never the
training images evaluated in its place), class counts that disagree with the data fail before training,
validate scores a checkpoint at the preprocessing it was trained with, and a bad --device is one line."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import recurzoo
from recurzoo.train import classification, data, validate
from recurzoo.train.arguments import run_cli

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import make_image_folder  # noqa: E402

HORNET_KWARGS = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
HORNET = ["--model-kwargs", "dims=(8,16,32,64)", "depths=(1,1,1,1)"]


def _train_args(data_dir, output, *extra):
    return [
        "--data-dir",
        str(data_dir),
        "--model",
        "hornet_tiny_7x7",
        *HORNET,
        "--img-size",
        "32",
        "--batch-size",
        "3",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--workers",
        "0",
        "--output",
        str(output),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """An ImageFolder with train/ only (3 classes, 1 image each): no validation split."""
    return make_image_folder(str(tmp_path_factory.mktemp("data") / "folder"), per_class=(1,), splits=("train",))


def test_a_missing_validation_split_is_an_error_naming_val_split_not_the_training_images(train_only, tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        classification.main(_train_args(train_only, tmp_path / "run"))
    message = str(raised.value)
    assert (
        message.startswith("--val-split validation: --data-dir ") and "validation/, val/, evaluation/, eval/" in message
    )
    assert "--val-split none for no evaluation" in message
    assert not (tmp_path / "run" / "last.pth.tar").exists()


def test_a_missing_training_split_names_train_split(train_only, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--train-split training2: --data-dir .* has no training2/ folder"):
        classification.main(_train_args(train_only, tmp_path / "run", "--train-split", "training2"))


def test_val_split_none_trains_without_evaluation(train_only, tmp_path):
    result = classification.main(_train_args(train_only, tmp_path / "run", "--val-split", "none"))
    assert result["num_updates"] == 1 and result["eval"] == {} and result["best_metric"] is None
    assert (tmp_path / "run" / "last.pth.tar").exists() and not (tmp_path / "run" / "model_best.pth.tar").exists()
    assert "training without evaluation" in (tmp_path / "run" / "log.txt").read_text()


def test_split_folder_takes_timm_synonyms_and_dot_but_never_the_root(tmp_path):
    (tmp_path / "val").mkdir()
    assert data.split_folder(str(tmp_path), "validation") == str(tmp_path / "val")
    assert data.split_folder(str(tmp_path), ".") == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="--split train: --data-dir .* has no train/, training/ folder"):
        data.split_folder(str(tmp_path), "train")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-classes", "2"], "--num-classes 2: --data-dir .* --train-split train has 3 classes"),
        (["--num-classes", "0"], "--num-classes: expected a positive class count, received 0"),
    ],
)
def test_a_class_count_disagreeing_with_the_data_fails_before_training(train_only, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        classification.main(_train_args(train_only, tmp_path / "run", "--val-split", "none", *extra))
    assert not (tmp_path / "run" / "args.yaml").exists()


def test_a_validation_split_with_other_classes_fails_before_training(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), per_class=(1, 1))
    (tmp_path / "data" / "val" / "red").rename(tmp_path / "data" / "val" / "yellow")  # indices would shift
    with pytest.raises(
        ValueError,
        match=r"--val-split validation: its classes differ .* \(only in training: red; only in evaluation: yellow\)",
    ):
        classification.main(_train_args(root, tmp_path / "run"))


# ------------------------------------------------------------------------------------------ validate


@pytest.fixture(scope="module")
def trained_at_32(tmp_path_factory):
    """A checkpoint as the classification script writes it: weights and the run's arguments (32 px)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = recurzoo.create_model("hornet_tiny_7x7", num_classes=3, **HORNET_KWARGS)
    args = dict(
        model="hornet_tiny_7x7", model_kwargs=HORNET_KWARGS, img_size=32, crop_pct=1.0, mean=[0.5] * 3, std=[0.25] * 3
    )
    torch.save(dict(state_dict=model.state_dict(), args=args, epoch=0), folder / "model_best.pth.tar")
    data_dir = make_image_folder(str(folder / "data"), per_class=(1, 2))
    return str(folder / "model_best.pth.tar"), data_dir


def _validate_args(checkpoint, data_dir, *extra):
    return [
        "--data-dir",
        data_dir,
        "--model",
        "hornet_tiny_7x7",
        "--checkpoint",
        checkpoint,
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_validate_takes_the_training_input_size_and_preprocessing_from_the_checkpoint(trained_at_32):
    results = validate.main(_validate_args(*trained_at_32))  # no --model-kwargs: the checkpoint's
    assert results["input_size"] == [3, 32, 32] and results["crop_pct"] == 1.0 and results["images"] == 6


def test_validate_flags_override_the_checkpoints_preprocessing(trained_at_32):
    results = validate.main(_validate_args(*trained_at_32, "--img-size", "48", "--crop-pct", "0.5"))
    assert results["input_size"] == [3, 48, 48] and results["crop_pct"] == 0.5


def test_validate_refuses_data_of_another_class_count_and_a_missing_split(trained_at_32, tmp_path):
    checkpoint, data_dir = trained_at_32
    with pytest.raises(ValueError, match="--split validation: 3 classes in the data, the model has 2 outputs"):
        validate.main(_validate_args(checkpoint, data_dir, "--num-classes", "2"))
    with pytest.raises(FileNotFoundError, match="--split test: --data-dir .* has no test/ folder"):
        validate.main(_validate_args(checkpoint, data_dir, "--split", "test"))


def test_an_unavailable_device_is_one_line_with_exit_code_2(train_only, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(classification.main, _train_args(train_only, tmp_path / "run", "--device", "bogus"))
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().endswith(
        "error: --device: expected cpu, cuda, cuda:N or another accelerator, received 'bogus'"
    )
    assert stderr.count("\n") == 1


# ---------------------------------------------------------------------------------- unreadable images


def test_validate_leaves_unreadable_images_out_and_counts_them_in_its_final_line(trained_at_32, tmp_path, capsys):
    import shutil
    import warnings

    from _train_data import write_unreadable_images

    checkpoint, data_dir = trained_at_32
    clean = validate.main(_validate_args(checkpoint, data_dir))
    assert clean["unreadable"] == 0
    broken = shutil.copytree(data_dir, tmp_path / "broken")
    write_unreadable_images(str(broken / "val" / "red"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = validate.main(_validate_args(checkpoint, str(broken)))
    assert results["unreadable"] == 2 and results["images"] == clean["images"] == 6
    assert (results["top1"], results["loss"]) == (clean["top1"], clean["loss"])  # nothing scored twice
    assert any("broken_text.png" in str(w.message) and "left out" in str(w.message) for w in caught)
    assert "(6 images; 2 unreadable images left out)" in capsys.readouterr().err
    for path in (broken / "val").rglob("[0-9].png"):
        path.write_text("not an image either")
    with pytest.raises(ValueError, match="--split validation: no readable image, nothing was scored"):
        validate.main(_validate_args(checkpoint, str(broken)))


def test_folder_datasets_read_through_recurzoo_images_16_bit_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "train" / "grey"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(folder / "sixteen.png")
    dataset = data.create_image_dataset("", str(tmp_path), "train", skip_unreadable="training set")
    image, label = dataset[0]
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [128, 128, 128]  # Pillow alone: 255
