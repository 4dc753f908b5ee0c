"""recurzoo.train.classification and recurzoo.train.validate on a tiny generated ImageFolder.

The data: three classes told apart by colour (PNG files, 40 px, 24 training and 6 validation images
per class), trained at 32 px with reduced widths, so each run takes about a second of compute.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.utils import random_seed

import recurzoo  # noqa: F401
from recurzoo.train import arguments, classification, resume, validate

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import classification_args, kwargs_flags, make_image_folder  # noqa: E402

HORNET = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))
SRET = dict(embed_dims=(32, 64, 128), num_heads=(1, 2, 4), num_shared_blocks=(1, 1, 1))
CHANCE = 100.0 / 3


def _base_args(data_dir, output, model, kwargs, epochs=2):
    return classification_args(data_dir, output, model, kwargs, epochs=epochs, lr="2e-3", seed=1, device=None)


def _summary(output):
    with open(os.path.join(output, "summary.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("colours")), per_class=(24, 6))


def _save_random_classifier(path, name, kwargs, num_classes):
    """A 'pretrained' checkpoint of another class count, in the training-checkpoint layout."""
    model = recurzoo.create_model(name, num_classes=num_classes, **kwargs)
    torch.save(dict(state_dict=model.state_dict(), epoch=3), path)
    return model


@pytest.mark.parametrize("name, kwargs", [("hornet_tiny_7x7", HORNET), ("sret_tiny", SRET)])
def test_cli_fine_tunes_from_a_checkpoint_to_a_new_class_count_above_chance(image_folder, tmp_path, name, kwargs):
    source = _save_random_classifier(tmp_path / "source10.pth", name, kwargs, num_classes=10)
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "recurzoo.train.classification",
        *_base_args(image_folder, output, name, kwargs),
        "--initial-checkpoint",
        str(tmp_path / "source10.pth"),
        "--plot",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]

    rows = _summary(output)
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert float(rows[-1]["eval_top1"]) > CHANCE + 25, rows
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for file in ("last.pth.tar", "model_best.pth.tar", "checkpoint-1.pth.tar", "args.yaml", "log.txt"):
        assert (output / file).exists(), file
    for file in ("loss.png", "metrics.png"):
        assert (output / file).read_bytes()[:4] == b"\x89PNG"
    state = resume.load_checkpoint(str(output / "last.pth.tar"))  # weights_only=True
    assert state["epoch"] == 1 and state["batches_done"] is None and state["num_updates"] == 18  # 2 x 72 / 8
    assert state["state_dict"]["head.fc.weight"].shape[0] == 3
    # the backbone started from the checkpoint: 18 AdamW steps of 2e-3 moved it a little from there, while
    # the fresh init the run would otherwise have used (seed 1) lies far away
    random_seed(1)
    fresh = recurzoo.create_model(name, num_classes=3, **kwargs).state_dict()
    keys = [key for key, value in fresh.items() if value.dim() > 1 and not key.startswith("head.")]
    for key in (keys[0], keys[-1]):
        trained, start = state["state_dict"][key], source.state_dict()[key]
        moved, elsewhere = (trained - start).abs().max(), (trained - fresh[key]).abs().max()
        assert 0 < moved < 0.4 * elsewhere, (key, moved, elsewhere)


def test_sret_fine_tunes_above_chance_with_ema_and_layer_decay(image_folder, tmp_path):
    output = tmp_path / "run"
    result = classification.main(
        _base_args(image_folder, output, "sret_tiny", SRET)
        + ["--model-ema", "--model-ema-decay", "0.5", "--layer-decay", "0.8", "--smoothing", "0"]
    )
    rows = _summary(output)
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert float(rows[-1]["eval_top1"]) > CHANCE + 25, rows
    assert "eval_ema_top1" in rows[-1]
    assert result["best_metric"] == max(float(row["eval_top1"]) for row in rows)
    state = resume.load_checkpoint(str(output / "model_best.pth.tar"))
    assert "state_dict_ema" in state and state["epoch"] == result["best_epoch"]
    scales = sorted({group["lr_scale"] for group in state["optimizer"]["param_groups"]})
    assert len(scales) > 3 and scales[-1] == pytest.approx(1.0) and scales[0] < 0.8**3  # layer-wise decay


def test_initial_checkpoint_keeps_the_backbone_and_resets_a_classifier_of_another_size(tmp_path):
    source = _save_random_classifier(tmp_path / "source.pth", "sret_tiny", SRET, num_classes=10)
    target = recurzoo.create_model("sret_tiny", num_classes=4, **SRET)
    fresh_head = target.head.fc.weight.detach().clone()
    fresh = validate.load_initial_checkpoint(target, str(tmp_path / "source.pth"))
    assert fresh == ["head.fc.weight", "head.fc.bias"]
    for key, value in source.state_dict().items():
        if not key.startswith("head.fc."):
            torch.testing.assert_close(target.state_dict()[key], value, msg=key)
    assert torch.equal(target.head.fc.weight, fresh_head)
    # the same class count loads the classifier too
    same = recurzoo.create_model("sret_tiny", num_classes=10, **SRET)
    assert validate.load_initial_checkpoint(same, str(tmp_path / "source.pth")) == []
    torch.testing.assert_close(same.head.fc.weight, source.head.fc.weight)
    # another width is refused
    wider = recurzoo.create_model("sret_tiny", num_classes=4, **{**SRET, "embed_dims": (64, 128, 256)})
    with pytest.raises((ValueError, RuntimeError)):
        validate.load_initial_checkpoint(wider, str(tmp_path / "source.pth"))


class _Teacher(torch.nn.Module):
    pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * 3.0


def test_kd_loss_is_sret_soft_label_cross_entropy_mixed_with_the_task_loss():
    torch.manual_seed(0)
    student_logits, images = torch.randn(6, 3), torch.randn(6, 3, 4, 4)
    targets = torch.randint(0, 3, (6,))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    temperature = 2.0
    teacher = _Teacher()
    loss = classification.KnowledgeDistillationLoss(teacher, torch.nn.CrossEntropyLoss(), temperature, 0.7, mean, std)
    # SReT's kd_loss.KDLoss: -sum softmax(t / T) * log_softmax(s / T), averaged over the batch, on images
    # renormalized from the student's mean/std to the teacher's
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    teacher_logits = teacher((pixels - 0.5) / 0.25)
    soft_labels = F.softmax(teacher_logits / temperature, -1)
    soft = -(soft_labels * F.log_softmax(student_logits / temperature, -1)).sum(-1).mean()
    expected = 0.7 * soft + 0.3 * F.cross_entropy(student_logits, targets)
    torch.testing.assert_close(loss(student_logits, targets, images), expected)
    only_soft = classification.KnowledgeDistillationLoss(
        teacher, torch.nn.CrossEntropyLoss(), temperature, 1.0, mean, std
    )
    torch.testing.assert_close(only_soft(student_logits, targets, images), soft)


def test_distillation_run_with_mixup_from_a_frozen_teacher_checkpoint(image_folder, tmp_path):
    _save_random_classifier(tmp_path / "teacher3.pth", "hornet_tiny_7x7", HORNET, num_classes=3)
    _save_random_classifier(tmp_path / "teacher10.pth", "hornet_tiny_7x7", HORNET, num_classes=10)
    teacher_flags = [
        "--teacher",
        "hornet_tiny_7x7",
        "--teacher-kwargs",
        *kwargs_flags(HORNET),
        "--kd-temperature",
        "2",
        "--kd-weight",
        "1",
    ]
    output = tmp_path / "kd"
    classification.main(
        _base_args(image_folder, output, "sret_tiny", SRET, epochs=1)
        + teacher_flags
        + ["--teacher-checkpoint", str(tmp_path / "teacher3.pth"), "--mixup", "0.8", "--cutmix", "1.0"]
    )
    (row,) = _summary(output)
    assert float(row["train_kd_loss"]) == pytest.approx(float(row["train_loss"]))  # W = 1: soft labels only
    assert 0 < float(row["train_kd_loss"]) < 10
    with pytest.raises(ValueError, match="10|classes"):
        classification.main(
            _base_args(image_folder, tmp_path / "bad", "sret_tiny", SRET, epochs=1)
            + teacher_flags
            + ["--teacher-checkpoint", str(tmp_path / "teacher10.pth")]
        )


def test_validate_matches_a_hand_computed_top1_and_top5(image_folder, tmp_path, capsys):
    model = _save_random_classifier(tmp_path / "model.pth", "hornet_tiny_7x7", HORNET, num_classes=3).eval()
    from recurzoo.cli import main as recurzoo_cli

    code = recurzoo_cli(
        [
            "validate",
            "--data-dir",
            str(image_folder),
            "--model",
            "hornet_tiny_7x7",
            "--model-kwargs",
            *kwargs_flags(HORNET),
            "--checkpoint",
            str(tmp_path / "model.pth"),
            "--img-size",
            "32",
            "--batch-size",
            "5",
            "--workers",
            "0",
            "--no-progress",
            "--results-file",
            str(tmp_path / "results.json"),
        ]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results == json.loads((tmp_path / "results.json").read_text())
    # by hand: the model's pretrained-cfg preprocessing (resize to 32 / crop_pct, center crop, normalize)
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(dict(img_size=32), model=model)
    assert config["crop_pct"] == model.pretrained_cfg["crop_pct"]
    transform = create_transform(**config)
    correct = total = 0
    for index, name in enumerate(sorted(os.listdir(os.path.join(image_folder, "val")))):
        folder = os.path.join(image_folder, "val", name)
        for file in sorted(os.listdir(folder)):
            with torch.no_grad():
                logits = model(transform(Image.open(os.path.join(folder, file)).convert("RGB"))[None])
            correct += int(logits.argmax() == index)
            total += 1
    assert results["images"] == total == 18
    assert results["top1"] == pytest.approx(100.0 * correct / total)
    assert results["top5"] == pytest.approx(100.0)  # three classes: top-3 always hits


def test_config_yaml_gives_defaults_and_flags_win(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model: sret_tiny\ndata-dir: /data\nlr: 0.001\nbatch_size: 16\nmixup: 0.8\n")
    args = arguments.parse_args_with_config(classification.build_parser(), ["--config", str(config), "--lr", "0.01"])
    assert (args.model, args.data_dir, args.lr, args.batch_size, args.mixup) == ("sret_tiny", "/data", 0.01, 16, 0.8)
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        arguments.parse_args_with_config(
            classification.build_parser(), ["--config", str(config), "--model", "x", "--data-dir", "y"]
        )


def test_recurzoo_cli_forwards_its_training_sub_commands(capsys):
    from recurzoo.cli import main as recurzoo_cli

    assert recurzoo_cli(["train", "--help"]) == 0
    assert "--kd-temperature" in capsys.readouterr().out
    assert recurzoo_cli(["train-detection", "--help"]) == 0
    assert "--backbone-checkpoint" in capsys.readouterr().out
    assert recurzoo_cli(["train", "--model", "sret_tiny"]) == 2  # --data-dir missing
    assert "--data-dir" in capsys.readouterr().err
