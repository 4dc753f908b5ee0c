"""Train and evaluate super-resolution models (RGT, or any stride-1 backbone + SR head) as BasicSR does.

    python -m recurzoo.train.super_resolution --model rgt_small_x2 --train-data datasets/DF2K \\
        --val-data datasets/benchmark/Set5 --output runs/rgt_small_x2
    python -m recurzoo.train.super_resolution --model rgt_x4 --checkpoint RGT_x4.pth --eval-only \\
        --val-data datasets/benchmark/{Set5,Set14,B100,Urban100,Manga109} --output runs/eval_rgt_x4

Data (``--train-data`` / ``--val-data``, any number of each), one of:

* a root with ``HR/`` and ``LR_bicubic/X{scale}/`` (DF2K and the benchmark sets Set5, Set14, B100,
  Urban100, Manga109 as the RGT repository lays them out); LR files are matched to HR files by
  name (``baby.png`` <- ``baby.png``, ``babyx4.png`` or ``baby_LRBI_x4.png``);
* a DIV2K HR folder ``.../DIV2K_train_HR`` with its sibling ``DIV2K_train_LR_bicubic/X{scale}``;
* ``HR_DIR:LR_DIR`` explicitly;
* a folder of HR images only (or a root whose ``HR/`` has no ``LR_bicubic/X{scale}``): low-resolution
  images are made on the fly by bicubic downscaling (PIL, antialiased, a = -0.5 like MATLAB's
  ``imresize``) of the HR image cropped to a multiple of the scale.

Training follows the official recipe by default: random LR patches of 64x64 with the matching HR
patch, random flips and transposition (the 8 symmetries of the square, albumentations, applied to
both), L1 loss, Adam (2e-4, betas 0.9/0.99), learning rate halved at 50/80/90/95% of the steps
(the official 250k/400k/450k/475k of 500k), EMA of the weights (``timm.utils.ModelEmaV3``).
Checkpoints (``last.pt``) are written atomically, with every rank's RNG states, and ``--resume auto``
continues from them exactly (the resumed run repeats an uninterrupted run's losses); SIGTERM/SIGINT
write a final checkpoint, a NaN/inf loss stops the run keeping the last one (the run control of
:class:`~recurzoo.train.loops.StepTraining`); ``--config`` reads option defaults from YAML. The final
weights (EMA if used) are saved as ``model.safetensors``, loadable with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``. Files that are
not readable images are left out with one counted warning; images smaller than the patch are left out
with a warning naming them; a truncated image met during training is replaced by the next one and
counted; a dataset without a usable image fails before training.

Evaluation reproduces BasicSR's ``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel=True``:
outputs are clamped and rounded to 8 bits, the HR image is cropped to ``scale x`` the LR size,
``scale`` pixels are cropped at every border, and PSNR/SSIM are computed on the BT.601 luma
(Y in [16, 235], float64) with scikit-image (SSIM: Gaussian weights, sigma 1.5, population
covariance, data range 255). Per-dataset means are written as ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.utils import random_seed
from torch import nn
from torch.utils.data import Dataset

from recurzoo.checkpoint import atomic_write, family_filter, load_state_dict, load_weights
from recurzoo.heads.super_resolution import SuperResolutionModel, create_sr_model, image_to_tensor, tensor_to_image
from recurzoo.images import IMAGE_SUFFIXES, read_image, write_png
from recurzoo.train.arguments import (
    UsageError,
    add_loader_arguments,
    add_model_arguments,
    add_run_arguments,
    add_step_arguments,
    model_option,
    run_cli,
    training_parser,
)
from recurzoo.train.data import (
    DatasetWarning,
    SkipUnreadable,
    UnreadableImageError,
    image_size,
    readable_groups,
    seed_albumentations,
    summarize,
    training_loader,
)
from recurzoo.train.distributed import DistributedContext, wrap_ddp
from recurzoo.train.loops import StepTraining
from recurzoo.train.run import progress_bar

__all__ = [
    "rgb_to_y",
    "psnr_y",
    "ssim_y",
    "SRDataSpec",
    "resolve_dataset",
    "bicubic_downscale",
    "SRTrainDataset",
    "SREvalDataset",
    "evaluate",
    "format_markdown",
    "build_parser",
    "main",
    "OFFICIAL_MILESTONES",
]

# The official schedule: halve the rate at 250k, 400k, 450k and 475k of 500k iterations.
OFFICIAL_MILESTONES = (0.5, 0.8, 0.9, 0.95)
# ITU-R BT.601 luma for 8-bit RGB, as BasicSR's bgr2ycbcr(y_only=True):
# Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an ``(H, W, 3)`` RGB image with values in [0, 255]: float64 in [16, 235]."""
    return image.astype(np.float64) @ _Y_WEIGHTS + 16.0


def _prepare_y(output: np.ndarray, target: np.ndarray, crop_border: int) -> Tuple[np.ndarray, np.ndarray]:
    if output.shape != target.shape:
        raise ValueError(f"output and target shapes differ: {output.shape} vs {target.shape}")
    if crop_border:
        output = output[crop_border:-crop_border, crop_border:-crop_border]
        target = target[crop_border:-crop_border, crop_border:-crop_border]
    return rgb_to_y(output), rgb_to_y(target)


def psnr_y(output: np.ndarray, target: np.ndarray, crop_border: int) -> float:
    """PSNR (dB) on the Y channel after cropping ``crop_border`` pixels (BasicSR's ``test_y_channel``)."""
    from skimage.metrics import peak_signal_noise_ratio

    output_y, target_y = _prepare_y(output, target, crop_border)
    if np.array_equal(output_y, target_y):
        return float("inf")
    return float(peak_signal_noise_ratio(target_y, output_y, data_range=255.0))


def ssim_y(output: np.ndarray, target: np.ndarray, crop_border: int) -> float:
    """SSIM on the Y channel: 11x11 Gaussian window (sigma 1.5), population covariance, data range 255."""
    from skimage.metrics import structural_similarity

    output_y, target_y = _prepare_y(output, target, crop_border)
    return float(
        structural_similarity(
            target_y, output_y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255.0
        )
    )


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRDataSpec:
    """A dataset: HR images and, unless degraded on the fly, the matching LR images."""

    name: str
    hr_files: Tuple[Path, ...]
    lr_files: Optional[Tuple[Path, ...]]

    @property
    def paired(self) -> bool:
        return self.lr_files is not None


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _without_unreadable(
    name: str, hr_files: Sequence[Path], lr_files: Optional[Sequence[Path]]
) -> Tuple[Tuple[Path, ...], Optional[Tuple[Path, ...]]]:
    """The (HR, LR) files whose headers are readable images; the others are dropped with one counted
    :class:`~recurzoo.train.data.DatasetWarning`. (Truncated files pass this check; training skips them.)"""
    groups = list(zip(hr_files, lr_files or hr_files))  # HR first; read once when unpaired
    kept = [group for group, _ in readable_groups(name, groups, "images", stacklevel=3)]
    kept_hr, kept_lr = tuple(hr for hr, _ in kept), tuple(lr for _, lr in kept)
    return kept_hr, (kept_lr if lr_files is not None else None)


def _match_lr(hr_files: Sequence[Path], lr_dir: Path, scale: int) -> Tuple[Path, ...]:
    by_stem = {p.stem: p for p in _images_in(lr_dir)}
    matched, missing = [], []
    for hr in hr_files:
        candidates = (hr.stem, f"{hr.stem}x{scale}", f"{hr.stem}_LRBI_x{scale}", f"{hr.stem}_x{scale}")
        found = next((by_stem[c] for c in candidates if c in by_stem), None)
        (matched if found else missing).append(found or hr)
    if missing:
        names = ", ".join(p.name for p in missing[:3])
        raise UsageError(f"{len(missing)} HR images have no LR image in {lr_dir} (e.g. {names})")
    return tuple(matched)


def resolve_datasets(specs: Sequence[str], scale: int, flag: str) -> List[SRDataSpec]:
    """:func:`resolve_dataset` of each of ``specs``; a missing folder is a UsageError naming ``flag``."""
    try:
        return [resolve_dataset(spec, scale) for spec in specs]
    except FileNotFoundError as error:
        raise UsageError(f"{flag}: {error}") from None


def resolve_dataset(spec: str, scale: int) -> SRDataSpec:
    """Find the HR (and LR) images of a dataset given as described in the module docstring."""
    if ":" in spec and not Path(spec).exists():
        hr_text, lr_text = spec.split(":", 1)
        hr_dir, lr_dir, name = Path(hr_text), Path(lr_text), Path(hr_text).name
    else:
        root = Path(spec)
        if not root.is_dir():
            raise FileNotFoundError(f"no such dataset folder: {spec}")
        lr_dir = None
        if (root / "HR").is_dir():
            hr_dir, name = root / "HR", root.name
            candidates = [root / "LR_bicubic" / f"X{scale}", root / "LR_bicubic" / f"x{scale}"]
        else:
            hr_dir, name = root, root.name
            prefix = root.name[:-3] if root.name.endswith("_HR") else None
            candidates = [root.parent / f"{prefix}_LR_bicubic" / f"X{scale}"] if prefix else []
        lr_dir = next((c for c in candidates if c.is_dir()), None)
        if lr_dir is None and (root / "HR").is_dir():
            warnings.warn(
                f"dataset {name!r}: {root / 'HR'} has no LR_bicubic/X{scale} beside it, so its LR images are made "
                f"here by bicubic downscaling (scores differ slightly from those on published LR files; "
                f"give HR_DIR:LR_DIR to use them)",
                DatasetWarning,
                stacklevel=2,
            )
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"no such HR folder: {hr_dir}")
    hr_files = _images_in(hr_dir)
    if not hr_files:
        raise UsageError(f"no PNG or JPEG images in {hr_dir}")
    lr_files = None
    if lr_dir is not None:
        if not lr_dir.is_dir():
            raise FileNotFoundError(f"no such LR folder: {lr_dir}")
        lr_files = _match_lr(hr_files, lr_dir, scale)
    hr_kept, lr_kept = _without_unreadable(name, hr_files, lr_files)
    if not hr_kept:
        raise UsageError(f"no readable images in {hr_dir}" + (f" and {lr_dir}" if lr_dir is not None else ""))
    return SRDataSpec(name, hr_kept, lr_kept)


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (uint8 HWC, sides multiples of ``scale``) reduced ``scale`` times, antialiased bicubic."""
    from PIL import Image

    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width // scale, height // scale), Image.BICUBIC))


def _mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def _square_symmetries(**targets: str) -> Any:
    """Random flips and transposition (the 8 symmetries of the square), shared by all targets."""
    import albumentations as A

    return A.Compose(
        [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Transpose(p=0.5)],
        additional_targets=targets,
        is_check_shapes=False,
    )


def _read_training_image(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except (ValueError, OSError) as error:
        raise UnreadableImageError(str(error)) from None


class SRTrainDataset(Dataset):
    """Random LR patches (``patch x patch``) with their HR patches, flipped and transposed at random.

    Paired data: the LR patch position is drawn and the HR patch is the same region ``scale`` times
    larger. HR-only data: an HR patch is cropped (albumentations ``RandomCrop``) and downscaled. The
    random draws come from NumPy's global generator (albumentations is reseeded from it per sample),
    so a run is reproducible from its seed and resumes exactly. Images smaller than the patch are left
    out with a warning naming them; an image that cannot be decoded during training is replaced by
    the next one with a counted warning (``skip_unreadable``).
    """

    def __init__(self, specs: Sequence[SRDataSpec], scale: int, patch: int = 64, repeat: int = 1) -> None:
        import albumentations as A

        items = [
            (hr, lr if spec.paired else None)
            for spec in specs
            for hr, lr in zip(spec.hr_files, spec.lr_files or spec.hr_files)
        ]
        if not items:
            raise UsageError("no training images")
        self.scale, self.patch, self.repeat = scale, patch, max(1, repeat)
        self.items = self._large_enough(items)
        self.symmetries = _square_symmetries(hr="image")
        self.hr_crop = A.Compose(
            [
                A.RandomCrop(patch * scale, patch * scale),
                A.HorizontalFlip(p=0.5),
                A.VerticalFlip(p=0.5),
                A.Transpose(p=0.5),
            ]
        )
        self.skip_unreadable = SkipUnreadable("training set")

    def _large_enough(self, items: Sequence[Tuple[Path, Optional[Path]]]) -> List[Tuple[Path, Optional[Path]]]:
        kept, small = [], []
        for hr, lr in items:
            path, side = (hr, self.patch * self.scale) if lr is None else (lr, self.patch)
            height, width = image_size(str(path))
            if min(height, width) < side:
                small.append(f"{path} ({width}x{height})")
            else:
                kept.append((hr, lr))
        if small:
            warnings.warn(
                f"{len(small)} of {len(items)} training images are too small for the "
                f"{self.patch}x{self.patch} LR patch (x{self.scale}) and are left out: "
                f"{summarize(small)}",
                DatasetWarning,
                stacklevel=3,
            )
        if not kept:
            raise UsageError(
                f"no training image is large enough for --patch-size {self.patch} at x{self.scale} (e.g. {small[0]})"
            )
        return kept

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.skip_unreadable(self._sample, index, len(self))

    def _sample(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        hr_path, lr_path = self.items[index % len(self.items)]
        hr = _read_training_image(hr_path)
        if lr_path is None:
            seed_albumentations(self.hr_crop, int(np.random.randint(2**31)))
            hr = self.hr_crop(image=hr)["image"]
            lr = bicubic_downscale(hr, self.scale)
        else:
            lr = _read_training_image(lr_path)
            top = np.random.randint(0, lr.shape[0] - self.patch + 1)
            left = np.random.randint(0, lr.shape[1] - self.patch + 1)
            lr = lr[top : top + self.patch, left : left + self.patch]
            s = self.scale
            hr = hr[top * s : (top + self.patch) * s, left * s : (left + self.patch) * s]
            seed_albumentations(self.symmetries, int(np.random.randint(2**31)))
            augmented = self.symmetries(image=lr, hr=hr)
            lr, hr = augmented["image"], augmented["hr"]
        return image_to_tensor(lr)[0], image_to_tensor(hr)[0]


class SREvalDataset(Dataset):
    """Whole images: the LR input (float CHW in [0, 1]), the HR target (uint8 HWC) and the file stem."""

    def __init__(self, spec: SRDataSpec, scale: int) -> None:
        self.spec, self.scale = spec, scale

    def __len__(self) -> int:
        return len(self.spec.hr_files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, np.ndarray, str]:
        """Raises :class:`~recurzoo.train.data.UnreadableImageError` for a file that cannot be decoded."""
        hr_path = self.spec.hr_files[index]
        hr = _read_training_image(hr_path)
        if self.spec.lr_files is None:
            hr = _mod_crop(hr, self.scale)
            lr = bicubic_downscale(hr, self.scale)
        else:
            lr = _read_training_image(self.spec.lr_files[index])
            hr = hr[: lr.shape[0] * self.scale, : lr.shape[1] * self.scale]  # BasicSR's crop of unmatched GT
        return image_to_tensor(lr)[0], hr, hr_path.stem


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: SuperResolutionModel,
    specs: Sequence[SRDataSpec],
    scale: int,
    device: torch.device,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    progress: bool = True,
    save_dir: Optional[str] = None,
) -> Dict[str, Dict[str, Any]]:
    """Mean PSNR/SSIM (Y channel, ``scale`` pixels of border cropped) per dataset, with per-image values.

    An image that cannot be decoded is left out of its dataset's means with a warning, and counted
    (``unreadable``); a dataset without a decodable image is an error."""

    was_training = model.training
    model.eval()
    results: Dict[str, Dict[str, Any]] = {}
    try:
        for spec in specs:
            dataset = SREvalDataset(spec, scale)
            per_image, unreadable = {}, []
            for index in progress_bar(range(len(dataset)), desc=f"eval {spec.name}", enabled=progress):
                try:
                    lr, hr, stem = dataset[index]
                except UnreadableImageError as error:
                    unreadable.append(str(error))
                    continue
                lr = lr[None] if tile is not None else lr[None].to(device)
                output = tensor_to_image(model.super_resolve(lr, tile=tile, tile_overlap=tile_overlap))
                if output.shape != hr.shape:
                    raise ValueError(f"{spec.name}/{stem}: output {output.shape} does not match HR {hr.shape}")
                per_image[stem] = dict(psnr=psnr_y(output, hr, scale), ssim=ssim_y(output, hr, scale))
                if save_dir:
                    write_png(Path(save_dir) / spec.name / f"{stem}.png", output)
            if unreadable:
                warnings.warn(
                    f"dataset {spec.name!r}: {len(unreadable)} of {len(dataset)} images cannot be decoded and are "
                    f"left out of its PSNR/SSIM: {summarize(unreadable)}",
                    DatasetWarning,
                    stacklevel=2,
                )
            if not per_image:
                raise UsageError(f"dataset {spec.name!r}: no decodable image, nothing was evaluated")
            results[spec.name] = dict(
                psnr=float(np.mean([v["psnr"] for v in per_image.values()])),
                ssim=float(np.mean([v["ssim"] for v in per_image.values()])),
                images=len(per_image),
                unreadable=len(unreadable),
                per_image=per_image,
            )
    finally:
        model.train(was_training)
    return results


def format_markdown(results: Dict[str, Dict[str, Any]], model_name: str, scale: int) -> str:
    """A markdown table of per-dataset PSNR/SSIM."""
    lines = [
        f"# {model_name} x{scale}",
        "",
        f"PSNR (dB) / SSIM on the Y channel, {scale} border pixels cropped (BasicSR protocol).",
        "",
        "| dataset | images | PSNR | SSIM |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        left_out = f" ({r['unreadable']} unreadable left out)" if r.get("unreadable") else ""
        lines.append(f"| {name} | {r['images']}{left_out} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines) + "\n"


def _write_report(
    results: Dict[str, Dict[str, Any]], output: str, model_name: str, scale: int, step: Optional[int] = None
) -> None:
    summary = {name: {k: v for k, v in r.items()} for name, r in results.items()}
    payload = dict(model=model_name, scale=scale, step=step, results=summary)
    text, table = json.dumps(payload, indent=2), format_markdown(results, model_name, scale)
    atomic_write(os.path.join(output, "eval.json"), lambda temporary: Path(temporary).write_text(text))
    atomic_write(os.path.join(output, "eval.md"), lambda temporary: Path(temporary).write_text(table))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.super_resolution", __doc__)
    group = add_model_arguments(
        parser,
        "registered SR model, e.g. rgt_small_x2",
        kwargs_help="extra timm.create_model arguments, e.g. embed_dim=60 blocks_per_group=2",
        checkpoint_help="initial weights: an official BasicSR file or one of ours (params/params_ema unwrapped)",
    )
    group.add_argument(
        "--backbone",
        default=None,
        help="instead of --model: any stride-1 timm backbone, combined with --head and --scale",
    )
    group.add_argument("--head", default="pixelshuffle", help="SR head for --backbone")
    group.add_argument("--scale", type=int, default=None, help="upscaling factor for --backbone")
    group = parser.add_argument_group("data")
    group.add_argument("--train-data", nargs="*", default=[], help="training datasets (see the module docstring)")
    group.add_argument("--val-data", nargs="*", default=[], help="evaluation datasets, reported one by one")
    group.add_argument("--patch-size", type=int, default=64, help="LR training patch side (HR: x scale)")
    add_loader_arguments(group, batch_size=8, batch_help="patches per process and step")
    group.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="passes over the training images per epoch (BasicSR's dataset_enlarge_ratio)",
    )
    group = parser.add_argument_group("optimization")
    group.add_argument("--steps", type=int, default=500000, help="training iterations")
    group.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    group.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99), help="Adam betas")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument(
        "--milestones",
        type=float,
        nargs="*",
        default=list(OFFICIAL_MILESTONES),
        help="fractions of --steps at which the rate is multiplied by --gamma",
    )
    group.add_argument("--gamma", type=float, default=0.5, help="multiplier at each milestone")
    group.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (0: no EMA)")
    group.add_argument("--clip-grad", type=float, default=0.0, help="gradient-norm clip (0: none)")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    group.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --val-data and exit")
    group.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step")
    group.add_argument("--tile", type=int, default=None, help="evaluate tile by tile (input pixels)")
    group.add_argument("--tile-overlap", type=int, default=32, help="overlap of the tiles (input pixels)")
    group.add_argument("--save-images", action="store_true", help="write the evaluated outputs as PNGs")
    group = add_run_arguments(parser, output="output/super_resolution", seed=10)
    group.add_argument("--val-every", type=int, default=5000, help="evaluate every N steps")
    add_step_arguments(group, save_every=5000, log_every=200)
    return parser


def build_model(args: argparse.Namespace) -> Tuple[SuperResolutionModel, str]:
    """The SR model the arguments describe, with ``--checkpoint`` loaded when given.

    The checkpoint is read by :func:`recurzoo.checkpoint.load_weights` (safetensors or a
    ``weights_only`` torch file; official BasicSR layouts converted by the family's filter).
    """
    import recurzoo

    kwargs = dict(args.model_kwargs)
    if bool(args.model) == bool(args.backbone):
        raise UsageError("give either --model (a registered SR model) or --backbone with --scale")
    if args.model:
        if recurzoo.model_task(args.model) != "sr":
            known = ", ".join(recurzoo.list_models(task="sr"))
            raise UsageError(f"--model {args.model}: not a super-resolution model of the zoo ({known})")
        with model_option("--model with --model-kwargs"):
            model = recurzoo.create_model(args.model, **kwargs)
        name = args.model
    else:
        if not args.scale:
            raise UsageError("--backbone needs --scale")
        with model_option("--backbone/--scale/--head with --model-kwargs"):
            model = create_sr_model(args.backbone, args.scale, head=args.head, **kwargs)
        name = f"{args.backbone}_{args.head}_x{args.scale}"
    if not isinstance(model, SuperResolutionModel):
        raise UsageError(f"{name} is not a super-resolution model")
    if args.checkpoint:
        load_weights(model, args.checkpoint, filter_fn=family_filter(args.model) if args.model else None)
    return model, name


def _multistep(
    optimizer: torch.optim.Optimizer, steps: int, fractions: Sequence[float], gamma: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    milestones = sorted({max(1, int(round(f * steps))) for f in fractions})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run training and/or evaluation; returns the last evaluation results and the output folder."""
    return _Training.main(build_parser(), argv)


class _Training(StepTraining):
    """One SR run: the model, ``--eval-only`` or the official recipe (L1, Adam, multistep decay, EMA) with
    evaluation every ``--val-every`` steps; ``model.safetensors`` holds the final (EMA) weights."""

    @classmethod
    def check_arguments(cls, args: argparse.Namespace) -> None:
        if args.eval_only and not args.val_data:
            raise UsageError("--eval-only needs --val-data")
        if not args.eval_only and not args.train_data:
            raise UsageError("training needs --train-data (or use --eval-only)")

    def __init__(self, args: argparse.Namespace, context: DistributedContext) -> None:
        super().__init__(args, context, "sr")
        self.clip_grad = args.clip_grad or None
        self.results: Dict[str, Dict[str, Any]] = {}
        self.skipped = 0  # unreadable training images, all ranks

    def run(self) -> Dict[str, Any]:
        args, context = self.args, self.context
        random_seed(args.seed, context.rank)
        model, self.name = build_model(args)
        self.scale = model.upscale
        self.val_specs = resolve_datasets(args.val_data, self.scale, "--val-data")
        self.model = model.to(context.device)
        if args.eval_only and not args.checkpoint:
            raise UsageError("--eval-only evaluates --checkpoint: give one (without it the model has random weights)")
        if args.eval_only:
            if context.is_main:
                os.makedirs(args.output, exist_ok=True)  # made once the model and the data are found
                self.run_evaluation(
                    model, step=0, save_dir=os.path.join(args.output, "images") if args.save_images else None
                )
                print(format_markdown(self.results, self.name, self.scale))
            return dict(results=self.results, output=args.output)
        # every training image is checked before anything is trained
        dataset = SRTrainDataset(
            resolve_datasets(args.train_data, self.scale, "--train-data"), self.scale, args.patch_size, args.repeat
        )
        os.makedirs(args.output, exist_ok=True)
        self.train(dataset)
        return dict(results=self.results, output=args.output, skipped_images=self.skipped)

    def run_evaluation(self, model: nn.Module, step: int, save_dir: Optional[str] = None, report: bool = True) -> None:
        """PSNR/SSIM of ``model`` on ``--val-data`` (main process), logged; with ``report`` written as
        ``eval.json`` and ``eval.md``."""
        args = self.args
        self.results = evaluate(
            model,
            self.val_specs,
            self.scale,
            self.context.device,
            args.tile,
            args.tile_overlap,
            self.show_progress,
            save_dir,
        )
        for name, r in self.results.items():
            self.logger.info(
                f"step {step} {name}: PSNR {r['psnr']:.3f} dB, SSIM {r['ssim']:.4f} ({r['images']} images)"
            )
            self.log_metrics(step=step, dataset=name, psnr=r["psnr"], ssim=r["ssim"])
        if report:
            _write_report(self.results, args.output, self.name, self.scale, step or None)

    def train(self, dataset: SRTrainDataset) -> None:
        """The training steps, then ``model.safetensors`` (the EMA weights if used) and ``loss.png``."""
        from timm.utils import ModelEmaV3

        args, context, model = self.args, self.context, self.model
        self.dataset = dataset
        loader = training_loader(dataset, args, context)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay
        )
        self.scheduler = _multistep(self.optimizer, args.steps, args.milestones, args.gamma)
        self.ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema_decay > 0 else None
        path, state = self.load_resume(("model", "optimizer", "scheduler", "step"))
        start_step, resume_rng = 0, None
        if state is not None:
            load_state_dict(model, state["model"], f"--resume {path}", use_family_filter=False)
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            start_step = int(state["step"])
            resume_rng = self.restore_optimization(state, start_step)
            self.logger.info(f"resumed from {path} at step {start_step}")
        self.forward = wrap_ddp(model, context)
        self.loss_fn = nn.L1Loss()
        self.eval_model = self.ema.module if self.ema is not None else model
        if args.eval_at_start and self.val_specs and context.is_main and start_step == 0:
            self.run_evaluation(self.eval_model, step=0, report=False)
        self.logger.info(
            f"training {self.name} x{self.scale} on {len(dataset)} images for {args.steps} steps "
            f"({context.world_size} process(es), batch {args.batch_size} each)"
        )
        self.started = time.perf_counter()
        model.train()
        self.train_steps(loader, start_step, args.steps, args.save_every, resume_rng)
        self.skipped += dataset.skip_unreadable.report(self.logger, "training", context)
        self.save_final(self.eval_model, dict(model=self.name, step=str(args.steps)), "L1", "L1 loss", log_y=True)

    def training_loss(self, batch: Sequence[torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        device = self.context.device
        lr, hr = (tensor.to(device, non_blocking=True) for tensor in batch)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.args.amp and device.type == "cuda"):
            return self.loss_fn(self.forward(lr).float(), hr), {}

    def checkpoint_state(self, updates: int) -> Dict[str, Any]:
        return dict(
            super().checkpoint_state(updates),
            model=self.model.state_dict(),
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            model_name=self.name,
        )

    def after_update(self, updates: int, total: int, parts: Mapping[str, float]) -> None:
        args, context = self.args, self.context
        if self.ema is not None:
            self.ema.update(self.model, step=updates)
        if updates % args.log_every == 0:
            self.skipped += self.dataset.skip_unreadable.report(self.logger, f"up to step {updates}", context)
            if context.is_main:
                recent = float(np.mean(self.history[-args.log_every :]))
                self.logger.info(
                    f"step {updates}: L1 {recent:.5f}, lr {self.scheduler.get_last_lr()[0]:.3e}, "
                    f"{time.perf_counter() - self.started:.0f} s"
                )
                self.log_metrics(step=updates, loss=recent)
        if self.val_specs and context.is_main and (updates % args.val_every == 0 or updates == total):
            self.run_evaluation(self.eval_model, updates)


if __name__ == "__main__":
    run_cli(main)
