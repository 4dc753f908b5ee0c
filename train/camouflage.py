"""Train and evaluate MSRNet camouflaged-object detectors on COD10K / CAMO / CHAMELEON / NC4K folders.

    python -m recurzoo.train.camouflage --model msrnet_pvt_v2_b2 --pretrained-backbone \\
        --data-config dataset.yaml --train-sets cod10k_tr camo_tr \\
        --test-sets chameleon camo_te cod10k_te nc4k --output runs/msrnet_b2

Datasets are named in a YAML file laid out like the official ``dataset.yaml`` (``name: {root: ...,
image: {path: Image, suffix: .jpg}, mask: {path: Mask, suffix: .png}}``), or given as folders
holding an image and a mask folder (``Image``/``Mask``, ``Imgs``/``GT``, ``images``/``masks``),
files matched by name. Unreadable files are skipped with one counted warning per dataset; an
image whose size differs from its mask's is resized to the mask (as the official code does) with
a warning naming both files; a dataset without a usable pair is an error before anything runs.

The recipe is the official one: albumentations flips, rotations and colour jitter applied to
image and mask together; the image resized from its original to 1.5x, 1.0x and 2.0x the base size
(384); Adam at 1e-4 (backbone x0.1, PVT patch embedding frozen, backbone BatchNorm frozen), a
x0.1 step at two thirds of the iterations, 150 epochs of batch 8, mixed precision on CUDA; the loss
is BCE plus the uncertainty-aware loss ``mean(1 - |2p - 1|^2)`` weighted by a cosine ramp from 0
to 1 over training. Evaluation reports the metrics COD papers use (S-measure, weighted F-measure,
mean/max/adaptive E-measure, mean/max/adaptive F-measure, MAE), computed by PySODMetrics, per
dataset as ``metrics.json`` and ``metrics.md``, and writes each predicted mask as a PNG at its
image's original size. Runs under ``torchrun``; ``--config`` reads option defaults from YAML. The
run control is :class:`~recurzoo.train.loops.StepTraining`'s: ``last.pt`` every ``--save-every`` steps
(atomic, with every rank's RNG state), ``--resume auto`` continues from it exactly, SIGTERM/SIGINT write
a final checkpoint and a NaN/inf loss stops the run keeping the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import NativeScaler, random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from recurzoo.checkpoint import (
    CheckpointError,
    atomic_write,
    load_state_dict,
    read_checkpoint,
    read_safetensors_metadata,
    unwrap_state_dict,
)
from recurzoo.devices import resolve_device
from recurzoo.train.arguments import (
    UsageError,
    add_loader_arguments,
    add_model_arguments,
    add_run_arguments,
    add_step_arguments,
    add_switch,
    model_option,
    one_line,
    run_cli,
    training_parser,
)
from recurzoo.train.data import (
    DatasetWarning,
    SkipUnreadable,
    UnreadableImageError,
    readable_groups,
    seed_albumentations,
    summarize,
    training_loader,
)
from recurzoo.train.distributed import DistributedContext, wrap_ddp
from recurzoo.train.loops import StepTraining
from recurzoo.train.run import progress_bar

__all__ = [
    "DatasetSpec",
    "DatasetWarning",
    "load_dataset_config",
    "resolve_dataset",
    "find_pairs",
    "CamouflageTrainSet",
    "CamouflageTestSet",
    "train_augmentation",
    "ual_coefficient",
    "cod_loss",
    "build_optimizer",
    "step_schedule",
    "CODMetrics",
    "evaluate",
    "build_model",
    "load_model",
    "build_parser",
    "main",
    "prediction_datasets",
    "mask_path",
    "predict",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# (image folder, mask folder) layouts of the public COD datasets and common exports.
KNOWN_LAYOUTS = (
    ("Image", "Mask"),
    ("Imgs", "GT"),
    ("Imgs", "GT_Object"),
    ("images", "masks"),
    ("Images", "Masks"),
    ("image", "mask"),
    ("img", "gt"),
)
SCALE_NAMES = ("image_s", "image_m", "image_l")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's images (and masks, if any) are; ``None`` suffix means any image extension."""

    name: str
    image_dir: str
    mask_dir: Optional[str] = None
    image_suffix: Optional[str] = None
    mask_suffix: Optional[str] = None


@dataclass(frozen=True)
class Sample:
    """One image (and its mask, if known) of a dataset."""

    name: str
    image_path: str
    mask_path: Optional[str]


# ----------------------------------------------------------------------------------------- datasets


def load_dataset_config(path: str) -> Dict[str, DatasetSpec]:
    """The datasets of a YAML file in the official ``dataset.yaml`` layout, by name."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        entries = yaml.safe_load(handle) or {}
    specs = {}
    for name, entry in entries.items():
        try:
            root, image, mask = entry["root"], entry["image"], entry.get("mask")
            specs[name] = DatasetSpec(
                name,
                os.path.join(root, image["path"]),
                os.path.join(root, mask["path"]) if mask else None,
                image.get("suffix"),
                mask.get("suffix") if mask else None,
            )
        except (KeyError, TypeError) as error:
            raise UsageError(
                f"{path}: dataset {name!r} needs root, image: {{path, suffix}} and mask: {{path, suffix}}"
                f" ({error!r} missing or malformed)"
            ) from None
    return specs


def resolve_dataset(name_or_path: str, config: Optional[Mapping[str, DatasetSpec]] = None) -> DatasetSpec:
    """A dataset named in ``config``, or a folder: with image/mask sub-folders, or of images alone."""
    if config and name_or_path in config:
        return config[name_or_path]
    path = name_or_path.rstrip("/\\") or name_or_path
    if not os.path.isdir(path):
        known = f" (known names: {', '.join(sorted(config))})" if config else ""
        raise FileNotFoundError(f"dataset {name_or_path!r} is neither a folder nor a name of the data config{known}")
    name = os.path.basename(os.path.abspath(path))
    for image_dir, mask_dir in KNOWN_LAYOUTS:
        if os.path.isdir(os.path.join(path, image_dir)) and os.path.isdir(os.path.join(path, mask_dir)):
            return DatasetSpec(name, os.path.join(path, image_dir), os.path.join(path, mask_dir))
    return DatasetSpec(name, path)


def _list_images(folder: str, suffix: Optional[str]) -> Dict[str, str]:
    """``{stem: path}`` of the files of ``folder`` with ``suffix`` (or any image extension).

    Images and masks are matched by stem, so two files of one stem (``x.jpg``, ``x.png``) are an error.
    """
    found: Dict[str, List[str]] = {}
    for entry in sorted(os.listdir(folder)):
        if suffix is not None:
            if entry.endswith(suffix):
                found.setdefault(entry[: -len(suffix)], []).append(entry)
        elif entry.lower().endswith(IMAGE_EXTENSIONS):
            found.setdefault(os.path.splitext(entry)[0], []).append(entry)
    shared = [", ".join(entries) for entries in found.values() if len(entries) > 1]
    if shared:
        raise UsageError(
            f"{folder}: {len(shared)} file name(s) stand for several images ({'; '.join(shared[:3])}); "
            "images, masks and predictions are matched by name without the extension: keep one of each"
        )
    return {stem: os.path.join(folder, entries[0]) for stem, entries in found.items()}


def find_pairs(spec: DatasetSpec, require_masks: bool = True) -> List[Sample]:
    """The readable (image, mask) pairs of ``spec``, matched by file name.

    Unreadable files are skipped with one :class:`DatasetWarning` that counts and names them;
    images whose size differs from their mask's are named in another. Raises ``ValueError`` when
    no usable sample is left.
    """
    if not os.path.isdir(spec.image_dir):
        raise FileNotFoundError(f"dataset {spec.name!r}: image folder {spec.image_dir} does not exist")
    images = _list_images(spec.image_dir, spec.image_suffix)
    masks: Dict[str, str] = {}
    if spec.mask_dir is not None:
        if not os.path.isdir(spec.mask_dir):
            raise FileNotFoundError(f"dataset {spec.name!r}: mask folder {spec.mask_dir} does not exist")
        masks = _list_images(spec.mask_dir, spec.mask_suffix)
    elif require_masks:
        raise UsageError(
            f"dataset {spec.name!r}: no mask folder (looked for {', '.join(m for _, m in KNOWN_LAYOUTS)} "
            f"beside the images in {spec.image_dir})"
        )
    names = sorted(set(images) & set(masks)) if require_masks or masks else sorted(images)
    unpaired = sorted(set(images) - set(names))
    if unpaired:
        warnings.warn(
            f"dataset {spec.name!r}: {len(unpaired)} images have no mask of the same name and are left out: "
            f"{summarize([images[name] for name in unpaired])}",
            DatasetWarning,
            stacklevel=2,
        )
    mismatched, samples = [], []
    names_of = {(images[name], masks.get(name)): name for name in names}
    for (image_path, mask_path), sizes in readable_groups(spec.name, list(names_of), "samples", verify=True):
        image_shape, mask_shape = sizes[0], sizes[-1]  # (the image's twice when there is no mask)
        if mask_shape != image_shape:
            mismatched.append(
                f"{image_path} ({image_shape[1]}x{image_shape[0]}) vs {mask_path} ({mask_shape[1]}x{mask_shape[0]})"
            )
        samples.append(Sample(names_of[image_path, mask_path], image_path, mask_path))
    if mismatched:
        warnings.warn(
            f"dataset {spec.name!r}: {len(mismatched)} images differ in size from their masks and are "
            f"resized to the mask: {summarize(mismatched)}",
            DatasetWarning,
            stacklevel=2,
        )
    if not samples:
        what = "image/mask pairs (files matched by name)" if require_masks else "images"
        raise UsageError(
            f"dataset {spec.name!r}: no readable {what} in {spec.image_dir}"
            + (f" and {spec.mask_dir}" if spec.mask_dir else "")
        )
    return samples


def read_rgb(path: str) -> Optional[np.ndarray]:
    """An RGB uint8 array read by :func:`recurzoo.images.read_image` (EXIF orientation, 16-bit samples
    scaled, the decompression-bomb limit), or ``None`` when the file cannot be decoded."""
    from recurzoo.images import ImageError, read_image

    try:
        return read_image(path)
    except (ImageError, OSError):
        return None


def read_mask(path: str) -> Optional[np.ndarray]:
    """A binary float32 mask (grey levels > 0 are the object; a colour mask by its luma, as OpenCV's
    ``IMREAD_GRAYSCALE``) read by :func:`recurzoo.images.open_image`, or ``None`` when undecodable."""
    from recurzoo.images import ImageError, open_image

    try:
        gray = np.asarray(open_image(path).convert("L"))
    except (ImageError, OSError):
        return None
    return (gray > 0).astype(np.float32)


def resize_array(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (OpenCV's ``INTER_LINEAR``, as the official pipeline)."""
    import cv2

    if array.shape[:2] == (height, width):
        return array
    return cv2.resize(array, dsize=(width, height), interpolation=cv2.INTER_LINEAR)


def image_scales(image: np.ndarray, base_size: int, scales: Sequence[float]) -> Dict[str, torch.Tensor]:
    """``image_s``/``image_m``/``image_l``: the uint8 image resized to ``base_size * scale``, in [0, 1]."""
    return {
        name: torch.from_numpy(resize_array(image, int(base_size * s), int(base_size * s)))
        .permute(2, 0, 1)
        .float()
        .div(255)
        for name, s in zip(SCALE_NAMES, scales)
    }


def train_augmentation(seed: Optional[int] = None):
    """The official augmentation, applied to image and mask together (albumentations, own random state:
    one generator shared by the four transforms, so that each is applied independently)."""
    import albumentations as A
    import cv2

    return seed_albumentations(
        A.Compose(
            [
                A.HorizontalFlip(p=0.5),
                A.Rotate(limit=90, p=0.5, interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_REPLICATE),
                A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
                A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=10, val_shift_limit=10, p=0.5),
            ]
        ),
        seed,
    )


class CamouflageTrainSet(Dataset):
    """Augmented training samples: the three image scales and the mask at the base size.

    The augmentation of each sample is seeded from NumPy's global generator (which the DataLoader
    seeds in every worker), so a run is reproducible from its seed and resumes exactly. A sample
    whose file cannot be decoded is replaced by the next one with a counted warning.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        base_size: int = 384,
        scales: Sequence[float] = (1.5, 1.0, 2.0),
        augment: bool = True,
    ) -> None:
        if not samples:
            raise UsageError("CamouflageTrainSet: no samples")
        self.samples = list(samples)
        self.base_size = base_size
        self.scales = tuple(scales)
        self.augment = train_augmentation() if augment else None
        self.skip_unreadable = SkipUnreadable("training set")

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image, mask = read_rgb(sample.image_path), read_mask(sample.mask_path)
        if image is None or mask is None:
            unreadable = sample.image_path if image is None else sample.mask_path
            raise UnreadableImageError(f"cannot decode {unreadable}")
        if image.shape[:2] != mask.shape:
            image = resize_array(image, *mask.shape)
        return image, mask

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image, mask = self.skip_unreadable(self._load, index, len(self.samples))
        if self.augment is not None:
            seed_albumentations(self.augment, int(np.random.randint(2**31)))
            transformed = self.augment(image=image, mask=mask)
            image, mask = transformed["image"], transformed["mask"]
        item = image_scales(image, self.base_size, self.scales)
        item["mask"] = torch.from_numpy(resize_array(mask, self.base_size, self.base_size)).unsqueeze(0)
        return item


class CamouflageTestSet(Dataset):
    """Evaluation samples: the three image scales and the sample's index (masks are read at full size)."""

    def __init__(self, samples: Sequence[Sample], base_size: int = 384, scales: Sequence[float] = (1.5, 1.0, 2.0)):
        self.samples = list(samples)
        self.base_size = base_size
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image = read_rgb(self.samples[index].image_path)
        if image is None:
            warnings.warn(
                f"cannot decode {self.samples[index].image_path}: no prediction for it", DatasetWarning, stacklevel=2
            )
            image = np.zeros((self.base_size, self.base_size, 3), np.uint8)
            height = width = 0
        else:
            height, width = image.shape[:2]
        item: Dict[str, Any] = image_scales(image, self.base_size, self.scales)
        item.update(index=index, height=height, width=width)
        return item


# ------------------------------------------------------------------------------------ optimization


def ual_coefficient(progress: float) -> float:
    """Weight of the uncertainty-aware loss: a cosine ramp from 0 (start) to 1 (end of training)."""
    progress = min(max(progress, 0.0), 1.0)
    return (1.0 - math.cos(progress * math.pi)) / 2.0


def cod_loss(logits: torch.Tensor, mask: torch.Tensor, progress: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """BCE + ``ual_coefficient(progress) * mean(1 - |2 sigmoid(logits) - 1|^2)`` (the official loss)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, mask.float())
    coefficient = ual_coefficient(progress)
    uncertainty = (1.0 - (2.0 * logits.sigmoid() - 1.0).abs().pow(2)).mean()
    loss = bce + coefficient * uncertainty
    return loss, dict(bce=float(bce.detach()), ual=float(uncertainty.detach()), ual_weight=coefficient)


def freeze_backbone_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers of the backbone in eval mode (statistics frozen) -- official ``freeze_status``."""
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    backbone_lr_factor: float = 0.1,
    freeze_patch_embed: bool = True,
    freeze_bn_affine: bool = True,
) -> torch.optim.Adam:
    """Adam without weight decay: backbone at ``lr * backbone_lr_factor``, the rest at ``lr``.

    As the official ``finetune`` grouping: the PVT patch embedding (``backbone.patch_embed``) and the
    backbone's BatchNorm affine parameters are frozen.
    """
    frozen_types = (nn.modules.batchnorm._BatchNorm,) if freeze_bn_affine else ()
    for module in model.backbone.modules():
        if isinstance(module, frozen_types):
            module.requires_grad_(False)
    backbone, head = [], []
    for name, parameter in model.named_parameters():
        if freeze_patch_embed and name.startswith("backbone.patch_embed."):
            parameter.requires_grad_(False)
        if parameter.requires_grad:
            (backbone if name.startswith("backbone.") else head).append(parameter)
    groups = [dict(params=backbone, lr=lr * backbone_lr_factor), dict(params=head, lr=lr)]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)


def step_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, milestone_fraction: float = 2 / 3, gamma: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """The official step decay: the rates times ``gamma`` from ``milestone_fraction`` of the steps on."""
    milestone = max(1, int(total_steps * milestone_fraction))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: gamma ** ((step + 1) // milestone))


# -------------------------------------------------------------------------------------- evaluation


class CODMetrics:
    """The COD metrics of one dataset, accumulated image by image with PySODMetrics."""

    def __init__(self) -> None:
        import py_sod_metrics as metrics

        self.smeasure = metrics.Smeasure()
        self.weighted_fmeasure = metrics.WeightedFmeasure()
        self.emeasure = metrics.Emeasure()
        self.mae = metrics.MAE()
        self.fmeasure = metrics.FmeasureV2(
            metric_handlers=dict(
                fm=metrics.FmeasureHandler(with_dynamic=True, with_adaptive=True, with_binary=False, beta=0.3)
            )
        )
        self.count = 0

    def step(self, prediction: np.ndarray, mask: np.ndarray) -> None:
        """``prediction``: uint8 probability map; ``mask``: uint8 ground truth (object > 128), same size."""
        for metric in (self.smeasure, self.weighted_fmeasure, self.emeasure, self.mae, self.fmeasure):
            metric.step(prediction, mask)
        self.count += 1

    def results(self) -> Dict[str, float]:
        emeasure = self.emeasure.get_results()["em"]
        fmeasure = self.fmeasure.get_results()["fm"]
        return dict(
            sm=float(self.smeasure.get_results()["sm"]),
            wfm=float(self.weighted_fmeasure.get_results()["wfm"]),
            mae=float(self.mae.get_results()["mae"]),
            mean_em=float(emeasure["curve"].mean()),
            max_em=float(emeasure["curve"].max()),
            adp_em=float(emeasure["adp"]),
            mean_fm=float(fmeasure["dynamic"].mean()),
            max_fm=float(fmeasure["dynamic"].max()),
            adp_fm=float(fmeasure["adaptive"]),
            images=self.count,
        )


METRIC_COLUMNS = (
    ("sm", "S<sub>m</sub>"),
    ("wfm", "F<sup>w</sup><sub>b</sub>"),
    ("mae", "MAE"),
    ("mean_em", "mean E<sub>m</sub>"),
    ("max_em", "max E<sub>m</sub>"),
    ("adp_em", "adp E<sub>m</sub>"),
    ("mean_fm", "mean F<sub>b</sub>"),
    ("max_fm", "max F<sub>b</sub>"),
    ("adp_fm", "adp F<sub>b</sub>"),
)


def metrics_markdown(results: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A markdown table of per-dataset metrics."""
    lines = [f"# {title}", ""] if title else []
    lines += [
        "| dataset | images | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
        "| --- | --- |" + " --- |" * len(METRIC_COLUMNS),
    ]
    for name, values in results.items():
        cells = " | ".join(f"{values[key]:.3f}" for key, _ in METRIC_COLUMNS)
        left_out = f" ({values['unreadable']} unreadable left out)" if values.get("unreadable") else ""
        lines.append(f"| {name} | {values['images']}{left_out} | {cells} |")
    return "\n".join(lines) + "\n"


def mask_path(out_dir: str, dataset_name: str, sample: Sample) -> str:
    """Where :func:`evaluate` writes the predicted mask of ``sample``: ``out_dir/<dataset>/<name>.png``."""
    return os.path.join(out_dir, dataset_name, sample.name + ".png")


def _save_png(path: str, array: np.ndarray) -> None:
    """Write ``array`` as a PNG atomically (an interrupted run leaves no half-written mask)."""
    import cv2

    encoded, data = cv2.imencode(".png", array)
    if not encoded:
        raise OSError(f"cannot encode the mask for {path}")
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(data.tobytes()))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    datasets: Mapping[str, Sequence[Sample]],
    device: torch.device,
    base_size: int = 384,
    out_dir: Optional[str] = None,
    save_masks: bool = True,
    batch_size: int = 8,
    workers: int = 0,
    amp: bool = False,
    show_progress: bool = False,
    written: Optional[List[str]] = None,
) -> Dict[str, Dict[str, float]]:
    """Predict every sample of each dataset; metrics for the datasets with masks.

    Predictions (sigmoid x 255, resized bilinearly to each image's original size) are written as
    ``out_dir/<dataset>/<name>.png`` (:func:`mask_path`) when ``save_masks``, and their paths appended
    to ``written`` when given; the metrics go to ``out_dir/metrics.json`` and ``out_dir/metrics.md``
    when ``out_dir`` is given. Returns ``{dataset: metrics}``.
    """

    was_training = model.training
    model.eval()
    results: Dict[str, Dict[str, float]] = {}
    scales = getattr(model, "scales", (1.5, 1.0, 2.0))
    for dataset_name, samples in datasets.items():
        loader = DataLoader(
            CamouflageTestSet(samples, base_size, scales), batch_size=batch_size, shuffle=False, num_workers=workers
        )
        metrics = CODMetrics() if all(s.mask_path for s in samples) else None
        unreadable = []
        for batch in progress_bar(loader, desc=f"eval {dataset_name}", enabled=show_progress):
            autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()
            with autocast:
                logits = model.forward_multiscale(*(batch[n].to(device, non_blocking=True) for n in SCALE_NAMES))
            probabilities = logits.float().sigmoid()[:, 0].cpu().numpy()
            for probability, index, height, width in zip(
                probabilities, batch["index"].tolist(), batch["height"].tolist(), batch["width"].tolist()
            ):
                sample = samples[index]
                if not height:
                    unreadable.append(sample.image_path)  # undecodable image (warned by the dataset)
                    continue
                prediction = np.clip(resize_array(probability, height, width) * 255.0 + 0.5, 0, 255).astype(np.uint8)
                if save_masks and out_dir:
                    path = mask_path(out_dir, dataset_name, sample)
                    _save_png(path, prediction)
                    if written is not None:
                        written.append(path)
                if metrics is not None:
                    binary = read_mask(sample.mask_path)
                    if binary is None:
                        unreadable.append(sample.mask_path)
                        warnings.warn(f"cannot decode {sample.mask_path}: left out", DatasetWarning, stacklevel=2)
                        continue
                    mask = (binary * 255).astype(np.uint8)
                    if mask.shape != prediction.shape:
                        prediction = resize_array(probability, *mask.shape)
                        prediction = np.clip(prediction * 255.0 + 0.5, 0, 255).astype(np.uint8)
                    metrics.step(prediction, mask)
        if unreadable:
            warnings.warn(
                f"dataset {dataset_name!r}: {len(unreadable)} of {len(samples)} samples unreadable during "
                f"evaluation, left out of its metrics: {summarize(unreadable)}",
                DatasetWarning,
                stacklevel=2,
            )
        if metrics is not None and metrics.count:
            results[dataset_name] = dict(metrics.results(), unreadable=len(unreadable))
    if out_dir and results:
        text = json.dumps(results, indent=2)
        table = metrics_markdown(results, title="Camouflaged object detection")
        atomic_write(os.path.join(out_dir, "metrics.json"), lambda temporary: Path(temporary).write_text(text))
        atomic_write(os.path.join(out_dir, "metrics.md"), lambda temporary: Path(temporary).write_text(table))
    model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------- models


def build_model(
    model: Optional[str] = None, backbone: Optional[str] = None, pretrained_backbone: bool = False, **kwargs: Any
) -> nn.Module:
    """A registered COD model (``msrnet_*``) or ``create_cod_model(backbone)``, with ``kwargs``.

    The arguments are recorded as ``cod_config`` on the model (checkpoints store it).
    """

    import recurzoo
    from recurzoo.heads.camouflage import create_cod_model

    if model:
        if model not in recurzoo.list_models("msrnet_*"):
            raise UsageError(
                f"unknown COD model {model!r}; registered: {', '.join(recurzoo.list_models('msrnet_*'))}"
                f" (or give a timm backbone name with --backbone)"
            )
        with model_option("--model with --model-kwargs"):
            network = recurzoo.create_model(model, pretrained_backbone=pretrained_backbone, **kwargs)
    elif backbone:
        with model_option("--backbone with --model-kwargs"):
            network = create_cod_model(backbone, pretrained_backbone=pretrained_backbone, **kwargs)
    else:
        raise UsageError("give --model (a registered msrnet_* model) or --backbone (any timm backbone)")
    # how to build it again: stored with the checkpoints, so that evaluation needs only the weights
    network.cod_config = dict(model=model, backbone=None if model else backbone, kwargs=kwargs)
    return network


def _read_state(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Weights and, when stored with them, the model's build config (this module's checkpoints).

    Read through :mod:`recurzoo.checkpoint` (safetensors, or ``weights_only=True``): a file that would
    run code, or a truncated one, is refused with a one-line ``ValueError``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = read_checkpoint(path)
    config = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    if path.endswith(".safetensors"):
        metadata = read_safetensors_metadata(path)
        config = json.loads(metadata["model_config"]) if "model_config" in metadata else None
    return unwrap_state_dict(checkpoint), config


def load_model(
    checkpoint: str, model: Optional[str] = None, backbone: Optional[str] = None, **kwargs: Any
) -> nn.Module:
    """A COD model with the weights of ``checkpoint`` (this module's, or an official MSRNet one).

    Without ``model``/``backbone`` the build config stored in the checkpoint is used.
    """
    from recurzoo.heads.camouflage import checkpoint_filter_fn

    state, config = _read_state(checkpoint)
    if not model and not backbone:
        if config is None:
            raise UsageError(f"checkpoint {checkpoint} does not record its model: give --model")
        model, backbone = config.get("model"), config.get("backbone")
        kwargs = dict(config.get("kwargs", {}), **kwargs)
    network = build_model(model, backbone, **kwargs)
    return load_state_dict(network, state, source=checkpoint, filter_fn=checkpoint_filter_fn)


# -------------------------------------------------------------------------------------- training


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.camouflage", __doc__)
    group = add_model_arguments(
        parser,
        "registered COD model, e.g. msrnet_pvt_v2_b2",
        kwargs_help="model arguments, e.g. mid_dim=32 backbone_kwargs=\"{'depths': (1, 1, 1, 1)}\"",
        checkpoint_help="initial weights (ours or an official MSRNet checkpoint)",
        pretrained="--pretrained-backbone",
        pretrained_help="timm's ImageNet weights (downloads them)",
    )
    group.add_argument("--backbone", default=None, help="any timm backbone (instead of --model): create_cod_model")
    group = parser.add_argument_group("data")
    group.add_argument("--data-config", default=None, help="YAML of the datasets (the official dataset.yaml layout)")
    group.add_argument("--train-sets", nargs="*", default=[], help="training dataset names or folders")
    group.add_argument("--test-sets", nargs="*", default=[], help="evaluation dataset names or folders")
    group.add_argument("--base-size", type=int, default=384, help="side of the 1.0x image (and the mask)")
    add_loader_arguments(group, batch_size=8, workers=2)
    group.add_argument("--no-augment", action="store_true", help="no flips, rotations or colour jitter")
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=150)
    group.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--backbone-lr-factor", type=float, default=0.1, help="backbone learning rate / --lr")
    group.add_argument("--milestone", type=float, default=2 / 3, help="fraction of the steps where the rate drops")
    group.add_argument("--gamma", type=float, default=0.1, help="rate factor at the milestone")
    group.add_argument("--train-patch-embed", action="store_true", help="do not freeze the PVT patch embedding")
    group.add_argument(
        "--train-backbone-bn",
        action="store_true",
        help="update the backbone's BatchNorm statistics and affine parameters",
    )
    add_switch(group, "--amp", None, "float16 autocast with loss scaling (default: on CUDA)")
    group = add_run_arguments(parser, output="output/camouflage", seed=112358)
    group.add_argument("--evaluate", action="store_true", help="evaluate only (no training)")
    group.add_argument("--eval-at-start", action="store_true", help="also evaluate before training")
    add_switch(group, "--save-masks", True, "write the predicted masks of the test sets as PNGs")
    add_step_arguments(
        group, save_every=0, log_every=20, save_help="checkpoint OUTPUT/last.pt every N steps (0: every epoch)"
    )
    return parser


def _datasets(names: Sequence[str], config: Optional[Mapping[str, DatasetSpec]], flag: str) -> Dict[str, List[Sample]]:
    datasets: Dict[str, List[Sample]] = {}
    for name in names:
        try:
            spec = resolve_dataset(name, config)
            datasets[spec.name if spec.name not in datasets else name] = find_pairs(spec)
        except (FileNotFoundError, UsageError) as error:
            raise UsageError(f"{flag}: {error}") from None
    return datasets


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (unless ``--evaluate``) and evaluate; returns the loss history and the metrics."""
    return _Training.main(build_parser(), argv)


def _format_metrics(values: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {values[key]:.3f}" for key, _ in METRIC_COLUMNS)


def _check_batches(num_samples: int, batch_size: int, world_size: int) -> None:
    if batch_size < 2:
        raise UsageError(
            "--batch-size must be at least 2: the decoder's global-context BatchNorm normalizes one value per image"
        )
    if num_samples < batch_size * world_size:
        raise UsageError(
            f"the training data ({num_samples} pairs) is smaller than one batch ({batch_size} x {world_size} processes)"
        )


class _Training(StepTraining):
    """One COD run: datasets checked up front, the model, evaluation before and after, and the official
    recipe's training steps (Adam, step decay, float16 autocast on CUDA, the UAL-weighted loss)."""

    zero_grad_to_none = False  # the official loop keeps zeroed gradients

    def __init__(self, args: argparse.Namespace, context: DistributedContext) -> None:
        super().__init__(args, context, "camouflage")
        device = context.device.type
        self.use_amp = device == "cuda" if args.amp is None else bool(args.amp and device == "cuda")

    def run(self) -> Dict[str, Any]:
        args, context = self.args, self.context
        random_seed(args.seed, context.rank)
        config = load_dataset_config(args.data_config) if args.data_config else None
        # every dataset is checked before the model is built or anything trained
        train_sets = _datasets(args.train_sets, config, "--train-sets") if not args.evaluate else {}
        test_sets = _datasets(args.test_sets, config, "--test-sets")
        if args.evaluate and not test_sets:
            raise UsageError("--evaluate needs --test-sets")
        if args.evaluate and not args.checkpoint:
            raise UsageError("--evaluate evaluates --checkpoint: give one (without it the decoder has random weights)")
        if not args.evaluate:
            _check_batches(sum(len(samples) for samples in train_sets.values()), args.batch_size, context.world_size)
        kwargs = dict(args.model_kwargs, pretrained_backbone=args.pretrained_backbone)
        try:
            if args.checkpoint:
                self.model = load_model(args.checkpoint, args.model, args.backbone, **kwargs)
            else:
                self.model = build_model(args.model, args.backbone, **kwargs)
        except CheckpointError as error:
            if not args.pretrained_backbone or args.checkpoint:
                raise
            local = "--model-kwargs \"backbone_kwargs={'pretrained_cfg_overlay': {'file': 'FILE'}}\""
            raise CheckpointError(f"--pretrained-backbone: {one_line(error)}; a local file: {local}") from None
        self.model.to(context.device)
        results: Dict[str, Any] = dict(output=args.output, history=[], metrics={})
        if test_sets and context.is_main and (args.evaluate or args.eval_at_start):
            results["initial_metrics"] = self.run_evaluation(
                test_sets, "eval_start", save_masks=False, when="before training, "
            )
        if not args.evaluate:
            results["history"] = self.train(train_sets)
        if test_sets and context.is_main:
            results["metrics"] = self.run_evaluation(test_sets, "eval", save_masks=args.save_masks)
        return results

    def run_evaluation(
        self, test_sets: Mapping[str, Sequence[Sample]], folder: str, save_masks: bool, when: str = ""
    ) -> Dict[str, Dict[str, float]]:
        args = self.args
        metrics = evaluate(
            self.model,
            test_sets,
            self.context.device,
            args.base_size,
            os.path.join(args.output, folder),
            save_masks,
            args.batch_size,
            amp=self.use_amp,
            show_progress=self.show_progress,
        )
        for name, values in metrics.items():
            self.logger.info(f"{when}{name}: " + _format_metrics(values))
        return metrics

    def train(self, train_sets: Mapping[str, Sequence[Sample]]) -> List[float]:
        """The training steps on the union of ``train_sets``; returns the loss of every step of the run."""
        args, context, model = self.args, self.context, self.model
        for name, samples in train_sets.items():
            self.logger.info(f"training set {name}: {len(samples)} pairs")
        dataset = CamouflageTrainSet(
            [sample for samples in train_sets.values() for sample in samples],
            args.base_size,
            getattr(model, "scales", (1.5, 1.0, 2.0)),
            augment=not args.no_augment,
        )
        loader = training_loader(dataset, args, context)
        self.total = args.steps or args.epochs * len(loader)
        self.optimizer = build_optimizer(
            model,
            args.lr,
            args.backbone_lr_factor,
            freeze_patch_embed=not args.train_patch_embed,
            freeze_bn_affine=not args.train_backbone_bn,
        )
        self.scheduler = step_schedule(self.optimizer, self.total, args.milestone, args.gamma)
        self.scaler = NativeScaler(device="cuda") if self.use_amp else None
        path, state = self.load_resume(("model", "optimizer", "scheduler", "scaler", "step", "history"))
        start_step, resume_rng = 0, None
        if state is not None:
            load_state_dict(model, state["model"], f"--resume {path}", use_family_filter=False)
            start_step, self.history = int(state["step"]), list(state["history"])
            resume_rng = self.restore_optimization(state, start_step)
            self.logger.info(f"resumed {path} at step {start_step}/{self.total}")
        self.forward = wrap_ddp(_MultiscaleForward(model), context)
        model.train()
        if not args.train_backbone_bn:
            freeze_backbone_batchnorm(model)
        self.train_steps(loader, start_step, self.total, args.save_every or len(loader), resume_rng)
        self.save_final(model, dict(model_config=json.dumps(model.cod_config)))
        return self.history

    def training_loss(self, batch: Mapping[str, torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        device = self.context.device
        images = [batch[name].to(device, non_blocking=True) for name in SCALE_NAMES]
        with torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext():
            logits = self.forward(*images)
        return cod_loss(logits, batch["mask"].to(device, non_blocking=True), progress=step / self.total)

    def checkpoint_state(self, updates: int) -> Dict[str, Any]:
        return dict(
            super().checkpoint_state(updates),
            model=self.model.state_dict(),
            history=self.history,
            model_config=self.model.cod_config,
        )

    def after_update(self, updates: int, total: int, parts: Mapping[str, float]) -> None:
        detail = f" (bce {parts['bce']:.4f}, ual {parts['ual']:.4f} x {parts['ual_weight']:.3f})"
        self.log_update(updates, total, self.scheduler.get_last_lr()[-1], detail=detail, **parts)


class _MultiscaleForward(nn.Module):
    """Makes a COD model's ``forward_multiscale`` the ``forward`` of a module (what DDP wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_s: torch.Tensor, image_m: torch.Tensor, image_l: torch.Tensor) -> torch.Tensor:
        return self.model.forward_multiscale(image_s, image_m, image_l)


# ------------------------------------------------------------------------------------- prediction


def prediction_datasets(inputs: Sequence[str], data_config: Optional[str] = None) -> Dict[str, List[Sample]]:
    """The samples :func:`predict` works on, by dataset name (what the masks' folder is called).

    Each input is an image file (all of them go to ``images``), a folder of images, a dataset folder
    (image and mask sub-folders) or a dataset name of ``data_config``.
    """
    config = load_dataset_config(data_config) if data_config else None
    datasets: Dict[str, List[Sample]] = {}
    for item in inputs:
        if os.path.isfile(item):
            name = os.path.splitext(os.path.basename(item))[0]
            datasets.setdefault("images", []).append(Sample(name, item, None))
            continue
        spec = resolve_dataset(item, config)
        datasets[spec.name if spec.name not in datasets else item] = find_pairs(spec, require_masks=False)
    return datasets


def predict(
    datasets: Mapping[str, Sequence[Sample]],
    out_dir: str,
    checkpoint: str,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    base_size: int = 384,
    batch_size: int = 8,
    device: Optional[str] = None,
    show_progress: bool = True,
) -> Tuple[Dict[str, Dict[str, float]], List[str]]:
    """Masks for the samples of :func:`prediction_datasets` (``recurzoo cod``), metrics for the datasets
    with masks; returns the metrics and the masks written (an undecodable image is warned and skipped)."""
    target = resolve_device(device)
    network = load_model(checkpoint, model, **dict(model_kwargs or {})).to(target)
    with_masks = {name: samples for name, samples in datasets.items() if all(s.mask_path for s in samples)}
    without = {name: samples for name, samples in datasets.items() if name not in with_masks}
    written: List[str] = []
    options = dict(save_masks=True, batch_size=batch_size, show_progress=show_progress, written=written)
    results = evaluate(network, with_masks, target, base_size, out_dir, **options)
    evaluate(network, without, target, base_size, out_dir, **options)
    return results, written


if __name__ == "__main__":
    run_cli(main)
