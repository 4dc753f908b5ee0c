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
from _train_data import TINY_HORNET, classification_args, make_image_folder  # noqa: E402


def _train_args(data_dir, output, *extra):
    return classification_args(data_dir, output, batch_size=3) + list(extra)


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """An ImageFolder with train/ only (3 classes, 1 image each): no validation split."""
    return make_image_folder(str(tmp_path_factory.mktemp("data") / "folder"), per_class=(1,), splits=("train",))


def test_resume_auto_with_nothing_to_resume_says_the_run_starts_anew(train_only, tmp_path):
    classification.main(_train_args(train_only, tmp_path / "run", "--val-split", "none", "--resume", "auto"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"--resume auto: no last.pth.tar in {tmp_path / 'run'} yet, starting a new run" in log


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
    model = recurzoo.create_model("hornet_tiny_7x7", num_classes=3, **TINY_HORNET)
    args = dict(
        model="hornet_tiny_7x7", model_kwargs=TINY_HORNET, img_size=32, crop_pct=1.0, mean=[0.5] * 3, std=[0.25] * 3
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


def test_validate_of_random_weights_warns_that_its_scores_say_nothing(trained_at_32, capsys):
    _, data_dir = trained_at_32
    argv = ["--data-dir", data_dir, "--model", "hornet_tiny_7x7", "--model-kwargs", "dims=(16,32,64,128)"]
    validate.main([*argv, "depths=(1,1,1,1)", "--img-size", "32", "--workers", "0", "--device", "cpu", "--no-progress"])
    assert "no --checkpoint and no --pretrained: hornet_tiny_7x7 has random weights" in capsys.readouterr().err


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


class _Oracle(torch.nn.Module):
    """A 'detector' that answers each image with the given outputs, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_coco_sets_skip_an_unreadable_image_in_training_and_leave_it_out_of_the_scores(tmp_path):
    import argparse
    import warnings

    from _train_data import make_coco

    from recurzoo.train import detection
    from recurzoo.train.distributed import DistributedContext

    root = make_coco(str(tmp_path / "coco"), images=(3, 4), max_boxes=1)
    (tmp_path / "coco" / "val2017" / "000001.png").write_text("not an image")
    (tmp_path / "coco" / "train2017" / "000000.png").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DatasetWarning)
        train = detection.CocoDetection(
            f"{root}/train2017", f"{root}/annotations/instances_train2017.json", train=True, hflip=0.0
        )
        assert train[0][1]["image_id"].item() == train.ids[1] and train.skip_unreadable.count == 1
        val = detection.CocoDetection(f"{root}/val2017", f"{root}/annotations/instances_val2017.json")
        readable = [val[index] for index in (0, 2, 3)]
        perfect = [
            dict(boxes=target["boxes"], labels=target["labels"], scores=torch.ones(len(target["labels"])))
            for _, target in readable
        ]
        args = argparse.Namespace(batch_size=2, workers=0, no_progress=True, amp=False, amp_dtype="bfloat16")
        scores = detection.evaluate(_Oracle(perfect), val, args, DistributedContext())
    assert scores["map"] == pytest.approx(1.0)  # the unreadable image's boxes are not counted as missed
    assert val.skip_unreadable.count == 1


def test_super_resolution_evaluation_leaves_a_truncated_image_out_and_counts_it(tmp_path):
    import warnings

    import numpy as np
    from _train_data import write_unreadable_images
    from PIL import Image

    from recurzoo.train import super_resolution as sr_train

    folder = tmp_path / "Set2"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    model = recurzoo.create_model("rgt_small_x2", embed_dim=12, num_heads=2, blocks_per_group=1).eval()
    clean = sr_train.evaluate(model, [sr_train.resolve_dataset(str(folder), 2)], 2, torch.device("cpu"), progress=False)
    truncated, not_an_image = write_unreadable_images(str(folder), side=64)
    os.remove(not_an_image)  # its header reads: only decoding finds the truncation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = sr_train.resolve_dataset(str(folder), 2)
        results = sr_train.evaluate(model, [spec], 2, torch.device("cpu"), progress=False)
    assert len(spec.hr_files) == 3 and results["Set2"]["images"] == 2 and results["Set2"]["unreadable"] == 1
    assert results["Set2"]["psnr"] == pytest.approx(clean["Set2"]["psnr"])
    assert any("1 of 3 images cannot be decoded" in str(w.message) for w in caught)
    assert "| Set2 | 2 (1 unreadable left out) |" in sr_train.format_markdown(results, "rgt", 2)


# ------------------------------------------------------------------------------------ offline fast-fail


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No host answers (the probe says so at once), the Hugging Face cache is empty, and any download
    attempt fails the test; returns the probed URLs."""
    import huggingface_hub
    import timm.models._hub as timm_hub
    from huggingface_hub import constants

    from recurzoo import checkpoint

    probes = []
    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: probes.append(url) or False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(timm_hub, "hf_hub_download", no_download, raising=False)
    monkeypatch.setattr(timm_hub, "download_cached_file", no_download)
    return probes


def _offline_cases(root):
    folder = _train_args(root, "<out>", "--val-split", "none")
    return {
        "classification-teacher": (
            classification,
            folder + ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", "img_size=32", "depth=1"],
            ("--teacher vit_tiny_patch16_224: ", "--teacher-checkpoint FILE", "huggingface.co is out of reach"),
        ),
        "classification-pretrained": (
            classification,
            _train_args(root, "<out>", "--val-split", "none", "--pretrained"),
            ("--model hornet_tiny_7x7: ", "--initial-checkpoint FILE", "hornet_tiny_7x7"),
        ),
    }


@pytest.mark.parametrize("case", ["classification-teacher", "classification-pretrained"])
def test_scripts_that_would_download_fail_at_once_offline_naming_the_local_option(
    offline, train_only, tmp_path, capsys, case
):
    script, argv, expected = _offline_cases(train_only)[case]
    argv = [str(tmp_path / "out") if item == "<out>" else item for item in argv]
    with pytest.raises(SystemExit) as exited:
        run_cli(script.main, argv)
    assert exited.value.code == 2 and offline  # a probe, no download
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(text in line for text in expected), line


def test_distillation_teacher_offline_names_teacher_checkpoint(offline, train_only, tmp_path):
    from recurzoo.checkpoint import CheckpointError
    from recurzoo.train import distill_recurrent

    argv = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", "img_size=32", "depth=2"]
    argv += ["--data-dir", train_only, "--device", "cpu", "--output", str(tmp_path / "out")]
    with pytest.raises(CheckpointError, match=r"--teacher vit_tiny_patch16_224: .* --teacher-checkpoint FILE"):
        distill_recurrent.main(argv)


@pytest.mark.parametrize(
    "teacher, flags, message",
    [
        ("vit_tiny_patch16_224", ["--k", "3"], "--k 3: expected between 1 and the teacher's depth 2"),
        ("vit_tiny_patch16_224", ["--phases", "3"], "--phases 3: expected positive lengths summing to the teacher's"),
        (
            "vit_tiny_patch16_224",
            ["--phases", "1", "2"],
            "--phases 1 2: expected positive lengths summing to the teacher's depth 2",
        ),
        ("hornet_tiny_7x7", [], "--teacher hornet_tiny_7x7: expected a timm VisionTransformer, found HorNet"),
    ],
)
def test_distillation_teacher_and_phases_that_cannot_fit_are_one_line(
    train_only, tmp_path, capsys, teacher, flags, message
):
    from recurzoo.train import distill_recurrent

    kwargs = ["img_size=32", "depth=2"] if teacher.startswith("vit") else ["depths=(1,1,1,1)"]
    argv = ["--teacher", teacher, "--teacher-kwargs", *kwargs, "--no-pretrained", *flags]
    argv += ["--data-dir", train_only, "--device", "cpu", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        run_cli(distill_recurrent.main, argv)
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("python -m recurzoo.train.distill_recurrent: error: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_detection_backbone_offline_names_backbone_checkpoint_and_unknown_backbones_are_one_line(offline, tmp_path):
    from recurzoo.checkpoint import CheckpointError
    from recurzoo.heads.detection import create_fpn_backbone
    from recurzoo.registry import UnknownModelError

    with pytest.raises(CheckpointError, match=r"backbone 'resnet18'.*out of reach"):
        create_fpn_backbone("resnet18", pretrained=True)
    with pytest.raises(UnknownModelError, match="unknown backbone 'nosuch'"):
        create_fpn_backbone("nosuch")


def test_numeric_options_out_of_range_are_one_line_from_the_command_line_and_from_config(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text("epochs: 0\n")
    for argv, message in (
        (["--epochs", "0"], "argument --epochs: expected an integer >= 1, received 0"),
        (["--lr", "nan"], "argument --lr: expected a finite number, received nan"),
        (["--lr", "-1"], "argument --lr: expected a number >= 0.0, received -1.0"),
        (["--smoothing", "1"], "argument --smoothing: expected a number in [0.0, 1.0), received 1.0"),
        (["--num-classes", "0"], "argument --num-classes: expected an integer >= 1, received 0"),
        (["--config", str(config)], "argument --epochs: expected an integer >= 1, received 0"),
    ):
        with pytest.raises(SystemExit) as exited:
            run_cli(classification.main, ["--model", "hornet_tiny_7x7", "--data-dir", str(tmp_path), *argv])
        assert exited.value.code == 2
        assert capsys.readouterr().err.strip() == f"python -m recurzoo.train.classification: error: {message}"


def test_run_cli_reports_documented_user_errors_in_one_line_and_keeps_a_bugs_traceback(capsys, monkeypatch):
    from recurzoo.train.arguments import UsageError

    def refuses(argv):
        raise UsageError("--thing: expected this, received that")

    def has_a_bug(argv):
        raise KeyError("internal")

    with pytest.raises(SystemExit) as exited:
        run_cli(refuses, [])
    assert exited.value.code == 2 and capsys.readouterr().err.endswith("error: --thing: expected this, received that\n")
    with pytest.raises(KeyError):
        run_cli(has_a_bug, [])
    monkeypatch.setenv("RECURZOO_TRACEBACK", "1")
    with pytest.raises(UsageError):
        run_cli(refuses, [])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--opt", "nosuch"], "--opt nosuch: Optimizer nosuch not found"),
        (["--model-kwargs", "nosuch=1"], "--model hornet_tiny_7x7 .*nosuch"),
        (["--teacher", "nosuch"], "--teacher: unknown model .nosuch."),
    ],
)
def test_option_values_a_library_refuses_are_one_line_naming_the_flag(train_only, tmp_path, capsys, extra, message):
    import re

    with pytest.raises(SystemExit) as exited:
        run_cli(classification.main, _train_args(train_only, tmp_path / "run", "--val-split", "none", *extra))
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    line = [text for text in stderr.splitlines() if ": error: " in text]
    assert len(line) == 1 and re.search(message, line[0]) and "Traceback" not in stderr, stderr


def test_super_resolution_data_without_its_lr_folder_says_that_lr_images_are_made_here(tmp_path):
    import numpy as np
    from PIL import Image

    from recurzoo.train import super_resolution as sr_train

    (tmp_path / "Set1" / "HR").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "Set1" / "HR" / "a.png")
    with pytest.warns(data.DatasetWarning, match=r"has no LR_bicubic/X4 beside it, so its LR images are made here"):
        spec = sr_train.resolve_dataset(str(tmp_path / "Set1"), 4)
    assert not spec.paired


def test_benchmark_device_is_checked_by_resolve_device(capsys):
    from recurzoo.cli import main

    assert main(["bench", "hornet_tiny_7x7", "--device", "bogus"]) == 2
    assert "--device: expected cpu, cuda, cuda:N or another accelerator, received 'bogus'" in capsys.readouterr().err


def test_folder_datasets_skip_a_decompression_bomb_naming_its_claimed_size(tmp_path):
    import warnings

    from _hostile import photo, png_header_only

    folder = tmp_path / "train" / "cats"
    photo(folder / "a.png")
    png_header_only(folder / "bomb.png", 100_000, 100_000)
    dataset = data.create_image_dataset("", str(tmp_path), "train", skip_unreadable="training set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [dataset[index] for index in range(len(dataset))]
    assert dataset.skip_unreadable.count == 1 and all(image.size == samples[0][0].size for image, _ in samples)
    assert any("bomb.png: its header claims 100000 x 100000 pixels" in str(w.message) for w in caught)


def test_a_missing_coco_split_names_its_flag(tmp_path):
    from _train_data import make_coco

    from recurzoo.train import detection

    root = make_coco(str(tmp_path / "coco"), images=(2,), splits=("train2017",))
    argv = ["--data-dir", root, "--device", "cpu", "--output", str(tmp_path / "run")]
    with pytest.raises(
        FileNotFoundError, match=r"--val-split val2017: --data-dir .*val2017 does not exist .*--val-images"
    ):
        detection.main(argv)


def test_camouflage_pretrained_backbone_offline_names_the_local_file_option(offline, tmp_path):
    from PIL import Image

    from recurzoo.checkpoint import CheckpointError
    from recurzoo.train import camouflage

    for sub, mode in (("Image", "RGB"), ("Mask", "L")):
        (tmp_path / "cod" / sub).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.new(mode, (32, 32)).save(tmp_path / "cod" / sub / name)
    argv = [
        "--backbone",
        "resnet18",
        "--pretrained-backbone",
        "--train-sets",
        str(tmp_path / "cod"),
        "--batch-size",
        "2",
    ]
    with pytest.raises(
        CheckpointError, match=r"--pretrained-backbone: .*out of reach.*backbone_kwargs=\{'pretrained_cfg"
    ):
        camouflage.main(argv + ["--device", "cpu", "--output", str(tmp_path / "run")])
