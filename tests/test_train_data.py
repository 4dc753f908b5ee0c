"""Training data that is partly broken: unreadable images are skipped with a counted warning instead of
ending the run mid-epoch, and a dataset without usable images fails before anything is trained."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import recurzoo  # noqa: F401
from recurzoo.train import classification, data
from recurzoo.train import super_resolution as sr_train

sys.path.insert(0, os.path.dirname(__file__))
from _train_data import classification_args, make_image_folder, sr_args, write_unreadable_images  # noqa: E402


def _classification_args(data_dir, output):
    return classification_args(data_dir, output, batch_size=4, val_split="")


def test_classification_epoch_skips_a_truncated_jpeg_and_a_non_image_and_counts_them(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), per_class=(2,), splits=("train",))
    truncated, text_in_red = write_unreadable_images(os.path.join(root, "train", "red"))
    truncated_in_green, not_an_image = write_unreadable_images(os.path.join(root, "train", "green"))
    for path in (text_in_red, truncated_in_green):  # one broken file per class: 3 x 2 good + 2 = 2 batches of 4
        os.remove(path)
    output = tmp_path / "run"
    with pytest.warns(data.DatasetWarning) as caught:
        result = classification.main(_classification_args(root, output))
    named = " ".join(str(w.message) for w in caught)
    assert os.path.basename(truncated) in named and os.path.basename(not_an_image) in named
    assert result["skipped_images"] == 2 and result["num_updates"] == 2  # the epoch ran to its end
    assert "epoch 0: 2 unreadable images of the training set skipped" in (output / "log.txt").read_text()


def test_classification_fails_before_training_on_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir .*absent: no such folder"):
        classification.main(_classification_args(tmp_path / "absent", tmp_path / "run"))
    for name in ("red", "green"):
        (tmp_path / "empty" / "train" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="--data-dir .*empty: no images for split 'train'"):
        classification.main(_classification_args(tmp_path / "empty", tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pth.tar").exists()


def _sr_args(train_dir, output, steps=2):
    return sr_args(train_dir, output, batch_size=5, steps=steps, ema_decay=0)


def test_super_resolution_drops_non_images_up_front_and_skips_truncated_ones_while_training(tmp_path):
    train_dir = tmp_path / "train"
    rng = np.random.default_rng(0)
    for index in range(4):
        train_dir.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(train_dir / f"{index}.png")
    truncated, not_an_image = write_unreadable_images(str(train_dir))
    with pytest.warns(data.DatasetWarning) as caught:
        result = sr_train.main(_sr_args(train_dir, tmp_path / "run"))  # 5 readable headers: 1 batch an epoch
    messages = [str(w.message) for w in caught]
    assert any("skipped 1 of 6 images" in m and os.path.basename(not_an_image) in m for m in messages)
    assert any(os.path.basename(truncated) in m and "skipped an unreadable image" in m for m in messages)
    assert result["skipped_images"] == 2  # the truncated JPEG, once in each of the 2 epochs
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_super_resolution_fails_before_training_without_usable_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG or JPEG images in .*empty"):
        sr_train.main(_sr_args(tmp_path / "empty", tmp_path / "run"))
    truncated, _ = write_unreadable_images(str(tmp_path / "broken"))
    os.remove(truncated)  # its header reads: only the text file named .png is left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DatasetWarning)
        with pytest.raises(ValueError, match="no readable images in .*broken"):
            sr_train.main(_sr_args(tmp_path / "broken", tmp_path / "run"))
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (16, 16)).save(small / "tiny.png")
    with (
        pytest.warns(data.DatasetWarning, match="too small"),
        pytest.raises(ValueError, match="no training image is large enough for --patch-size 12"),
    ):
        sr_train.main(_sr_args(small, tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


class _HalfBroken(torch.utils.data.Dataset):
    """Indices 1 and 3 of 8 are 'unreadable'."""

    def __init__(self, broken=(1, 3)):
        self.broken = set(broken)
        self.skip_unreadable = data.SkipUnreadable("test set")

    def __len__(self):
        return 8

    def _load(self, index):
        if index in self.broken:
            raise data.UnreadableImageError(f"image{index}.png (OSError)")
        return torch.tensor(index)

    def __getitem__(self, index):
        return self.skip_unreadable(self._load, index, len(self))


def test_skips_are_counted_across_loader_workers_and_replaced_by_the_next_sample():
    dataset = _HalfBroken()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DatasetWarning)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
        values = torch.cat(list(loader)).tolist()
    assert values == [0, 2, 2, 4, 4, 5, 6, 7]
    assert dataset.skip_unreadable.count == 2  # counted in the worker processes, seen here


def test_a_run_of_unreadable_samples_ends_with_a_clear_error():
    dataset = _HalfBroken(broken=range(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DatasetWarning)
        with pytest.raises(ValueError, match="test set: 8 samples in a row from index 5 cannot be read"):
            dataset[5]


def test_seeded_augmentations_draw_their_transforms_independently():
    import albumentations as A

    from recurzoo.train.camouflage import train_augmentation

    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    flips = data.seed_albumentations(
        A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Transpose(p=0.5)]), seed=0
    )
    assert len({flips(image=image)["image"].tobytes() for _ in range(100)}) == 8  # all symmetries of the square
    # COD's four transforms (p = 0.5 each) in all 16 combinations, not all-or-nothing
    augment = train_augmentation(seed=0)
    augment.save_applied_params = True
    combinations = set()
    for _ in range(200):
        applied = augment(image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((16, 16), np.float32))
        combinations.add(tuple(sorted(name for name, _ in applied["applied_transforms"])))
    assert len(combinations) == 16
    # the same seed gives the same stream (a run is reproducible)
    again = data.seed_albumentations(
        A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Transpose(p=0.5)]), seed=0
    )
    first = data.seed_albumentations(flips, seed=0)
    assert [first(image=image)["image"].tobytes() for _ in range(20)] == [
        again(image=image)["image"].tobytes() for _ in range(20)
    ]
