"""Tiny datasets in real on-disk formats for the training-script tests (generated, nothing downloaded)."""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# One colour per class: separable at a glance, and by any network after a few steps.
CLASS_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220)}


def make_image_folder(
    root: str,
    per_class: Sequence[int] = (12, 6),
    side: int = 40,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> str:
    """``root/<split>/<class>/<i>.png``: noisy images dominated by their class colour, with random stripes."""
    rng = np.random.default_rng(seed)
    for split, count in zip(splits, per_class):
        for name, colour in CLASS_COLOURS.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                image = np.asarray(colour, dtype=np.float32) * rng.uniform(0.6, 1.0)
                image = np.broadcast_to(image, (side, side, 3)).copy()
                image += rng.normal(0, 25, size=image.shape)
                period = int(rng.integers(4, 10))
                image[:, ::period] *= 0.7  # distractor stripes, not tied to the class
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{index}.png"))
    return root


def _box_image(rng: np.random.Generator, side: int, max_boxes: int) -> Tuple[np.ndarray, list]:
    image = np.full((side, side, 3), 235, dtype=np.float32) + rng.normal(0, 6, size=(side, side, 3))
    boxes = []
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        label = int(rng.integers(0, len(CLASS_COLOURS)))
        width, height = (int(v) for v in rng.integers(side // 4, side // 2, size=2))
        x0, y0 = int(rng.integers(0, side - width)), int(rng.integers(0, side - height))
        image[y0 : y0 + height, x0 : x0 + width] = list(CLASS_COLOURS.values())[label]
        boxes.append((label, x0, y0, width, height))
    return image.clip(0, 255).astype(np.uint8), boxes


def make_coco(
    root: str,
    images: Sequence[int] = (12, 6),
    side: int = 64,
    max_boxes: int = 2,
    seed: int = 0,
    splits: Sequence[str] = ("train2017", "val2017"),
) -> str:
    """COCO layout: ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json`` with boxes
    and polygon masks of coloured rectangles (category ids 1, 3, 5: not contiguous, on purpose)."""
    rng = np.random.default_rng(seed)
    category_ids = [1, 3, 5]
    categories = [dict(id=cid, name=name, supercategory="shape") for cid, name in zip(category_ids, CLASS_COLOURS)]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    annotation_id = 1
    for split, count in zip(splits, images):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        entries, annotations = [], []
        for index in range(count):
            image, boxes = _box_image(rng, side, max_boxes)
            file_name = f"{index:06d}.png"
            Image.fromarray(image).save(os.path.join(root, split, file_name))
            image_id = index + 1
            entries.append(dict(id=image_id, file_name=file_name, width=side, height=side))
            for label, x0, y0, width, height in boxes:
                polygon = [x0, y0, x0 + width, y0, x0 + width, y0 + height, x0, y0 + height]
                annotations.append(
                    dict(
                        id=annotation_id,
                        image_id=image_id,
                        category_id=category_ids[label],
                        bbox=[x0, y0, width, height],
                        area=width * height,
                        iscrowd=0,
                        segmentation=[polygon],
                    )
                )
                annotation_id += 1
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as handle:
            json.dump(dict(images=entries, annotations=annotations, categories=categories), handle)
    return root


def write_unreadable_images(folder: str, stem: str = "broken", side: int = 40, seed: int = 0) -> Tuple[str, str]:
    """Two files a dataset must survive in ``folder``: a JPEG cut off halfway (its header reads, its
    pixels do not decode) and a text file named ``.png``. Returns their paths."""
    import io

    os.makedirs(folder, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG")
    truncated = os.path.join(folder, f"{stem}_truncated.jpg")
    with open(truncated, "wb") as handle:
        handle.write(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    not_an_image = os.path.join(folder, f"{stem}_text.png")
    with open(not_an_image, "w", encoding="utf-8") as handle:
        handle.write("this is not an image\n")
    return truncated, not_an_image


class _RunsCode:
    """Unpickling this calls ``os.system``: a loader that runs code creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_code_running_checkpoints(folder: str, marker: str) -> Tuple[str, str]:
    """Two crafted checkpoints whose unpickling would run ``touch marker``: a legacy (non-zip) pickle with
    a ``state_dict``, and a zip ``torch.save`` file with a ``model`` entry (tensors beside the payload)."""
    import pickle

    import torch

    os.makedirs(folder, exist_ok=True)
    legacy, zipped = os.path.join(folder, "evil.pth"), os.path.join(folder, "evil_zip.pth")
    with open(legacy, "wb") as handle:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, handle)
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, zipped)
    return legacy, zipped


# Reduced widths the training tests build their models with (a few thousand parameters, a 32-pixel input).
TINY_HORNET = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
TINY_SRET = dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), num_shared_blocks=(1, 1, 1))  # BatchNorm in its stem
TINY_RGT = dict(embed_dim=12, num_heads=2, blocks_per_group=1)


def kwargs_flags(kwargs: dict) -> List[str]:
    """``--model-kwargs`` items of a dict: ``dims=(8,16,32,64)`` (Python literals without spaces)."""
    return [f"{key}={value!r}".replace(" ", "") for key, value in kwargs.items()]


def cli_flags(**options: Any) -> List[str]:
    """Flags of keyword options: ``img_size=32`` -> ``--img-size 32``; ``True`` is a bare flag; a dict is a
    ``KEY=VALUE`` list (:func:`kwargs_flags`); ``None`` leaves the flag out (the script's default)."""
    flags = []
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, *kwargs_flags(value)]
        else:
            flags += [flag, str(value)]
    return flags


def classification_args(
    data_dir: Any, output: Any, model: str = "hornet_tiny_7x7", kwargs: Optional[dict] = None, **options: Any
) -> List[str]:
    """A short CPU classification run of ``model`` (default: :data:`TINY_HORNET` widths) on 32-pixel
    images, one epoch, no warm-up, no loader workers, no progress bars; ``options`` add or override flags."""
    run = dict(data_dir=data_dir, output=output, model=model, model_kwargs=TINY_HORNET if kwargs is None else kwargs)
    defaults = dict(img_size=32, batch_size=8, epochs=1, warmup_epochs=0, workers=0, device="cpu", no_progress=True)
    return cli_flags(**run, **{**defaults, **options})


def sr_args(train_dir: Any, output: Any, **options: Any) -> List[str]:
    """A short CPU super-resolution run of ``rgt_small_x2`` at :data:`TINY_RGT` widths on 12-pixel LR
    patches, no loader workers, no progress bars; ``options`` add or override flags."""
    run = dict(train_data=train_dir, output=output, model="rgt_small_x2", model_kwargs=TINY_RGT)
    defaults = dict(patch_size=12, batch_size=2, workers=0, device="cpu", no_progress=True)
    return cli_flags(**run, **{**defaults, **options})


def detection_args(
    data_dir: Any,
    output: Any,
    backbone: str = "hornet_tiny_7x7",
    kwargs: Optional[dict] = None,
    detector_kwargs: Optional[dict] = None,
    **options: Any,
) -> List[str]:
    """A short CPU detection run on 64-pixel COCO images with ``backbone`` (default: :data:`TINY_HORNET`
    widths), batches of 4, no warm-up, no loader workers, no progress bars; ``options`` add or override flags."""
    run = dict(data_dir=data_dir, output=output, backbone=backbone, detector_kwargs=detector_kwargs or {})
    run.update(backbone_kwargs=TINY_HORNET if kwargs is None else kwargs)
    defaults = dict(min_size=64, max_size=64, batch_size=4, warmup_epochs=0, workers=0, device="cpu", no_progress=True)
    return cli_flags(**run, **{**defaults, **options})
