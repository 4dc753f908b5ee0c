"""A real accuracy check of the edge exports: a small zoo classifier on scikit-learn's handwritten digits.

``python -m recurzoo.export.digits [--formats onnx,executorch]`` trains a reduced HorNet on the UCI
handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``: 1,797 real 8x8 scans,
offline), exports it as int8 ONNX (and int8 ExecuTorch with ``recurzoo[edge]``), calibrated on
training images, and prints the top-1 accuracy of each on the held-out quarter next to fp32's.
``tests/test_edge.py`` runs the ONNX part; ``make edge-check`` runs both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recurzoo.export.edge import ImageSet, export_edge

__all__ = ["DIGITS_MODEL", "digits_splits", "train_digits_classifier", "digits_check", "main"]

DIGITS_MODEL = "hornet_tiny_7x7"
DIGITS_SIDE = 32  # the 8x8 scans upsampled, so that the four stages of strides 4..32 see a map
_MODEL_KWARGS = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), in_chans=1, num_classes=10)


def digits_splits(seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """The digits as ``(1, 32, 32)`` images normalised to [-1, 1]: a stratified 75 / 25 train / held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target)
    train, test = train_test_split(range(len(labels)), test_size=0.25, stratify=digits.target, random_state=seed)
    source = "scikit-learn's handwritten digits (UCI), {} split: {} images"
    return (
        ImageSet(images[train], source.format("training", len(train)), labels[train]),
        ImageSet(images[test], source.format("held-out", len(test)), labels[test]),
    )


def train_digits_classifier(train: ImageSet, epochs: int = 12, seed: int = 0) -> nn.Module:
    """A reduced HorNet trained on ``train`` (AdamW, cosine schedule, batch 64), in eval mode."""
    from recurzoo.export.models import create_model

    torch.manual_seed(seed)
    model = create_model(DIGITS_MODEL, **_MODEL_KWARGS).train()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(1, DIGITS_SIDE, DIGITS_SIDE), mean=(0.5,), std=(0.5,))
    model.pretrained_cfg.update(num_classes=10, interpolation="bilinear", crop_pct=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    steps = epochs * -(-len(train.images) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train.images), generator=generator).split(64):
            loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def digits_check(formats: Sequence[str] = ("onnx",), out_dir: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Train, export int8 in each of ``formats`` and return the held-out top-1 of fp32 and of each artifact."""
    train, test = digits_splits()
    model = train_digits_classifier(train)
    calibration = ImageSet(train.images[:128], f"128 images of the {train.source}", train.labels[:128])
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        for fmt in formats:
            result = export_edge(
                DIGITS_MODEL,
                out_dir or temporary,
                fmt=fmt,
                precision="int8",
                input_size=(1, DIGITS_SIDE, DIGITS_SIDE),
                calibration=calibration,
                evaluation=test,
                model=model,
            )
            results[fmt] = dict(result.fidelity, size_ratio=result.size_ratio, **result.latency_ms)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurzoo.export.digits", description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="onnx,executorch", help="comma-separated: onnx, executorch")
    parser.add_argument("--out", default=None, help="keep the artifacts and reports in this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = digits_check([part for part in args.formats.split(",") if part], args.out)
    print("| artifact | fp32 top-1 | int8 top-1 | top-1 agreement | size vs fp32 |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for fmt, row in results.items():
        gap = row["fp32_top1_accuracy"] - row["top1_accuracy"]
        worst = max(worst, gap)
        print(
            f"| {fmt} int8 | {row['fp32_top1_accuracy']:.2%} | {row['top1_accuracy']:.2%} | "
            f"{row['top1_agreement']:.2%} | {row['size_ratio']:.2f}x |"
        )
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
