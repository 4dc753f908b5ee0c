"""Train object detectors (Faster R-CNN) and instance segmenters (Mask R-CNN) on any zoo backbone.

    python -m recurzoo.train.detection --data-dir COCO_ROOT --backbone hornet_tiny_7x7 --detector fasterrcnn \\
        --backbone-checkpoint hornet_tiny_7x7.pth --epochs 26 --lr-steps 16 22 --output runs/det
    torchrun --nproc_per_node 8 -m recurzoo.train.detection --data-dir COCO_ROOT --backbone sret_small \\
        --detector maskrcnn --opt adamw --lr 1e-4 --weight-decay 0.05 --amp
    python -m recurzoo.train.detection --data-dir COCO_ROOT --backbone hornet_tiny_7x7 --test-only \\
        --resume runs/det/model_best.pth.tar

The layout is torchvision's detection references': COCO-format data (``COCO_ROOT/train2017``,
``COCO_ROOT/val2017`` and ``COCO_ROOT/annotations/instances_{train2017,val2017}.json``; other
folders through ``--train-split``/``--val-split`` or ``--train-images``/``--train-ann`` ...),
torchvision's detectors, momentum SGD with a step schedule by default, COCO mAP from pycocotools
after every epoch. The backbone is any timm ``features_only`` model under torchvision's FPN
(:mod:`recurzoo.heads.detection`); ``--backbone-checkpoint`` starts it from a classification
checkpoint (of ``recurzoo.train.classification``, a state dict or an official file).

Category ids of the annotation file map to contiguous labels 1..K (0 is the background) and back
for the evaluation. Runs under ``torchrun`` (DDP, rank-0 logging and checkpoints); checkpoints,
``--resume auto``, signals, the NaN guard, ``summary.csv`` and ``--plot`` work as in
``recurzoo.train.classification``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.utils import random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from recurzoo.checkpoint import CheckpointError
from recurzoo.registry import UnknownModelError
from recurzoo.train.arguments import (
    UsageError,
    add_choice,
    add_epoch_arguments,
    add_kwargs_argument,
    add_loader_arguments,
    add_model_arguments,
    add_run_arguments,
    add_switch,
    model_option,
    one_line,
    run_cli,
    training_parser,
    user_option,
)
from recurzoo.train.data import SkipUnreadable, UnreadableImageError
from recurzoo.train.distributed import DistributedContext, wrap_ddp
from recurzoo.train.loops import EpochTraining
from recurzoo.train.run import RunGuard, progress_bar
from recurzoo.train.validate import autocast

__all__ = ["build_parser", "main", "CocoDetection", "coco_evaluate", "detections_to_coco", "collate"]


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.detection", __doc__)
    group = parser.add_argument_group("data (COCO format)")
    group.add_argument(
        "--data-dir", required=True, help="COCO root: <split>/ images and annotations/instances_<split>.json"
    )
    group.add_argument("--train-split", default="train2017", help="training image folder under --data-dir")
    group.add_argument("--val-split", default="val2017", help="evaluation image folder under --data-dir")
    group.add_argument("--train-images", default=None, help="training image folder (overrides --train-split)")
    group.add_argument("--train-ann", default=None, help="training annotation JSON (overrides --train-split)")
    group.add_argument("--val-images", default=None, help="evaluation image folder (overrides --val-split)")
    group.add_argument("--val-ann", default=None, help="evaluation annotation JSON (overrides --val-split)")
    add_loader_arguments(group, batch_size=2, short=True)
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability in training")
    group.add_argument("--min-size", type=int, default=800, help="shorter image side after resizing")
    group.add_argument("--max-size", type=int, default=1333, help="longest image side after resizing")
    group = add_model_arguments(
        parser,
        "timm/recurzoo model with features_only",
        flag="--backbone",
        default="hornet_tiny_7x7",
        kwargs_help="extra timm.create_model arguments, e.g. 'dims=(16,32,64,128)'",
        checkpoint=("--backbone-checkpoint",),
        checkpoint_help="backbone weights from a classification checkpoint",
        pretrained="--pretrained-backbone",
        pretrained_help="timm's pretrained backbone weights",
    )
    add_choice(
        group,
        "--detector",
        ("fasterrcnn", "maskrcnn"),
        "torchvision detector (maskrcnn adds instance masks and mask mAP)",
    )
    group.add_argument(
        "--out-indices",
        type=int,
        nargs="+",
        default=None,
        help="backbone feature levels (default: the deepest map of each stride)",
    )
    group.add_argument("--fpn-channels", type=int, default=256, help="feature-pyramid width")
    add_switch(
        group, "--frozen-bn", None, "freeze the backbone's BatchNorm (default: when backbone weights are loaded)"
    )
    group.add_argument("--anchor-scale", type=float, default=8.0, help="anchor side in units of the level's stride")
    group.add_argument("--box-score-thresh", type=float, default=0.05, help="lowest score of a kept detection")
    group.add_argument("--box-detections-per-img", type=int, default=100, help="detections kept per image")
    add_kwargs_argument(
        group,
        "--detector-kwargs",
        "further torchvision detector arguments, e.g. box_batch_size_per_image=128 rpn_post_nms_top_n_train=1000",
    )
    group = parser.add_argument_group("optimizer and schedule")
    group.add_argument("--opt", default="momentum", help="timm optimizer name (momentum = SGD as torchvision's)")
    group.add_argument("--lr", type=float, default=0.02, help="peak learning rate (0.02 for 16 images per step)")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", "--wd", type=float, default=1e-4)
    group.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clipping")
    group.add_argument("--sched", default="multistep", help="timm scheduler: multistep, cosine, step, ...")
    group.add_argument("--epochs", type=int, default=26)
    group.add_argument("--lr-steps", type=int, nargs="+", default=(16, 22), help="multistep decay epochs")
    group.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor at each step")
    group.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up, updated every step")
    group.add_argument("--warmup-lr", type=float, default=2e-5, help="learning rate the warm-up starts from")
    group.add_argument("--min-lr", type=float, default=0.0, help="floor of the cosine schedule")
    group = add_run_arguments(parser, output="output/detection", seed=42, checkpoint="last.pth.tar")
    group.add_argument("--test-only", action="store_true", help="only evaluate (the --resume weights)")
    group.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    add_epoch_arguments(group, log_interval=20, amp_dtype="float16")
    return parser


# ------------------------------------------------------------------------------------------- data
class CocoDetection(Dataset):
    """A COCO-format detection set as torchvision's detectors take it: ``(image, target)`` pairs with
    ``image`` a float tensor in [0, 1] and ``target`` holding ``boxes`` (x1, y1, x2, y2, pixels),
    ``labels`` (1..K), ``image_id`` and with ``masks=True`` ``masks`` (N, H, W uint8).

    Crowd annotations and boxes without area are left out; in training (``train=True``) so are
    images left without annotations, and images are flipped horizontally with probability ``hflip``.
    Images are read by :func:`recurzoo.images.open_image`; one that cannot be read is counted and
    warned about (``skip_unreadable``): in training replaced by the next image, in evaluation
    returned as None, left out by :func:`collate` and of the COCO scores.
    """

    def __init__(
        self, image_dir: str, annotation_file: str, train: bool = False, masks: bool = False, hflip: float = 0.5
    ) -> None:
        self.coco = read_coco(annotation_file)
        self.image_dir = image_dir
        self.train = train
        self.masks = masks
        self.hflip = hflip if train else 0.0
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {category: index + 1 for index, category in enumerate(self.category_ids)}
        self.ids = sorted(self.coco.getImgIds())
        if train:
            self.ids = [image_id for image_id in self.ids if self._annotations(image_id)]
        self.skip_unreadable = SkipUnreadable("training set" if train else "validation set", leaves_out=not train)

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return len(self.category_ids) + 1

    def _annotations(self, image_id: int) -> List[Dict[str, Any]]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in annotations if a["bbox"][2] > 1 and a["bbox"][3] > 1 and a["category_id"] in self.label_of]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        if self.train:
            return self.skip_unreadable(self._load, index, len(self))
        return self.skip_unreadable.drop(self._load, index)

    def _load(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        from torchvision.transforms.functional import pil_to_tensor

        from recurzoo.images import ImageError, open_image

        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            image = pil_to_tensor(open_image(path)).float().div_(255)
        except (ImageError, OSError) as error:
            raise UnreadableImageError(one_line(error)) from None
        height, width = image.shape[-2:]
        annotations = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target: Dict[str, torch.Tensor] = dict(
            boxes=boxes,
            labels=torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.int64),
            image_id=torch.tensor(image_id),
        )
        if self.masks:
            import numpy as np

            masks = [self.coco.annToMask(a) for a in annotations]
            target["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            )
        if self.hflip and random.random() < self.hflip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: Sequence[Any]) -> Tuple[Any, ...]:
    """Lists of images and targets (sizes differ; the detector batches them); unreadable samples (None)
    left out, so a batch may be empty."""
    kept = [sample for sample in batch if sample is not None]
    return tuple(zip(*kept)) if kept else ((), ())


# What pycocotools indexes in each record of a COCO annotation file (``annotations`` and ``categories``
# may be absent, as in an image-info file).
_COCO_RECORD_KEYS = {"images": ("id",), "annotations": ("id", "image_id", "category_id"), "categories": ("id",)}


def _coco_layout_problem(dataset: Any) -> Optional[str]:
    """What keeps pycocotools from indexing ``dataset`` (a parsed annotation file), or None."""
    if not isinstance(dataset, dict):
        return f"a JSON {type(dataset).__name__}, not an object"
    if "images" not in dataset:
        return "no 'images' list"
    for field, keys in _COCO_RECORD_KEYS.items():
        records = dataset.get(field, [])
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            return f"'{field}' is not a list of records"
        if any(key not in record for record in records for key in keys):
            return f"a record of '{field}' lacks one of {', '.join(keys)}"
    return None


def read_coco(annotation_file: str) -> Any:
    """A pycocotools ``COCO`` index of ``annotation_file``, whose layout is checked first: a file that is
    not JSON, or whose records lack what the index needs, is one ``UsageError`` line naming it."""
    import json

    from pycocotools.coco import COCO

    try:
        with open(annotation_file, encoding="utf-8") as handle:
            dataset = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise UsageError(f"{annotation_file}: expected COCO annotations (JSON), cannot read it ({reason})") from None
    problem = _coco_layout_problem(dataset)
    if problem:
        raise UsageError(f"{annotation_file}: expected COCO annotations, found {problem}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _paths(
    args: argparse.Namespace, split: str, images: Optional[str], annotations: Optional[str], kind: str = "val"
) -> Tuple[str, str]:
    """The image folder and annotation file of a split (``kind`` 'train' or 'val' names its flags)."""
    image_dir = images or os.path.join(args.data_dir, split)
    annotation_file = annotations or os.path.join(args.data_dir, "annotations", f"instances_{split}.json")
    for path, flag, explicit in (
        (image_dir, f"--{kind}-images", images),
        (annotation_file, f"--{kind}-ann", annotations),
    ):
        if not os.path.exists(path):
            given = f"{flag} {path}" if explicit else f"--{kind}-split {split}: --data-dir {args.data_dir}: {path}"
            raise FileNotFoundError(
                f"{given} does not exist (COCO layout: <split>/ and annotations/instances_<split>.json; "
                f"give --{kind}-split NAME, or {flag} for one elsewhere)"
            )
    return image_dir, annotation_file


# ------------------------------------------------------------------------------------- evaluation
def detections_to_coco(
    outputs: Sequence[Dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    masks: bool = False,
) -> List[Dict[str, Any]]:
    """torchvision detector outputs -> COCO result records (``bbox`` as x, y, w, h; labels 1..K -> ids).

    With ``masks``, each detection's mask (probabilities, thresholded at 0.5) becomes an RLE ``segmentation``.
    """
    records: List[Dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        rles = [None] * len(scores)
        if masks:
            import numpy as np
            from pycocotools import mask as mask_utils

            binary = (output["masks"].detach().float().cpu()[:, 0] > 0.5).numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
        for box, score, label, rle in zip(xywh, scores, labels, rles):
            record = dict(image_id=int(image_id), category_id=int(category_ids[label - 1]), bbox=box, score=score)
            if rle is not None:
                rle["counts"] = rle["counts"].decode("ascii")
                record["segmentation"] = rle
            records.append(record)
    return records


def coco_evaluate(
    coco_gt: Any, records: Sequence[Dict[str, Any]], image_ids: Sequence[int], iou_types: Sequence[str] = ("bbox",)
) -> Tuple[Dict[str, float], str]:
    """COCO AP with pycocotools: ``{'map', 'map50', 'map75'}`` for boxes (``mask_*`` for ``segm``) and
    the printed summary tables. No detections at all score 0."""
    from pycocotools.cocoeval import COCOeval

    metrics: Dict[str, float] = OrderedDict()
    report = io.StringIO()
    for iou_type in iou_types:
        prefix = "" if iou_type == "bbox" else "mask_"
        if not records:
            metrics.update({f"{prefix}map": 0.0, f"{prefix}map50": 0.0, f"{prefix}map75": 0.0})
            continue
        with contextlib.redirect_stdout(report):
            print(f"IoU metric: {iou_type}")
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(list(records)), iou_type)
            evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [max(0.0, float(value)) for value in evaluator.stats[:3]]  # -1 means "no such objects"
        metrics.update({f"{prefix}map": stats[0], f"{prefix}map50": stats[1], f"{prefix}map75": stats[2]})
    return metrics, report.getvalue()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    args: argparse.Namespace,
    context: DistributedContext,
    logger: Any = None,
) -> Dict[str, float]:
    """COCO mAP of ``model`` on ``dataset``; each rank detects on its share, rank 0 scores, all get it."""
    was_training = model.training
    model.eval()
    share = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    loader = DataLoader(share, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, collate_fn=collate)
    records: List[Dict[str, Any]] = []
    evaluated: List[int] = []
    for images, targets in progress_bar(loader, desc="eval", enabled=context.is_main and not args.no_progress):
        if not images:
            continue
        evaluated += [int(t["image_id"]) for t in targets]
        images = [image.to(context.device, non_blocking=True) for image in images]
        with autocast(context.device, args.amp, args.amp_dtype):
            outputs = model(images)
        records += detections_to_coco(
            outputs, [int(t["image_id"]) for t in targets], dataset.category_ids, masks=dataset.masks
        )
    if context.distributed:
        gathered: List[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, (records, evaluated))
        records = [record for part, _ in gathered for record in part]
        evaluated = [image_id for _, part in gathered for image_id in part]
    if not evaluated:
        raise UsageError(f"{dataset.image_dir}: no readable image, nothing was evaluated")
    metrics: List[Any] = [None]
    if context.is_main:
        iou_types = ("bbox", "segm") if dataset.masks else ("bbox",)
        scores, report = coco_evaluate(dataset.coco, records, sorted(evaluated), iou_types)
        left_out = len(dataset) - len(evaluated)
        if logger is not None and report:
            logger.info(
                "COCO evaluation (%d detections on %d images%s)\n%s",
                len(records),
                len(evaluated),
                f"; {left_out} unreadable images left out" if left_out else "",
                report,
            )
        metrics = [scores]
    if context.distributed:
        dist.broadcast_object_list(metrics, src=0)
    model.train(was_training)
    return metrics[0]


# --------------------------------------------------------------------------------------- training
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or with ``--test-only`` evaluate); returns the best mAP and epoch, the last metrics, the output."""
    return _Training.main(build_parser(), argv)


class _Training(EpochTraining):
    """One detection run: data, detector, optimization, checkpoints; ``run`` trains epoch by epoch."""

    def __init__(self, args: argparse.Namespace, context: DistributedContext) -> None:
        super().__init__(args, context, "detection")
        self.eval_metric = "map"
        self.skipped_images = 0

    def _setup(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import NativeScaler

        from recurzoo.heads.detection import create_detector, create_fpn_backbone

        args, context = self.args, self.context
        masks = args.detector == "maskrcnn"
        self.val_set = CocoDetection(*_paths(args, args.val_split, args.val_images, args.val_ann), masks=masks)
        self.train_set = None
        if not args.test_only:
            self.train_set = CocoDetection(
                *_paths(args, args.train_split, args.train_images, args.train_ann, kind="train"),
                train=True,
                masks=masks,
                hflip=args.hflip,
            )
            if self.train_set.category_ids != self.val_set.category_ids:
                raise UsageError("the training and evaluation annotation files list different categories")
        random_seed(args.seed)  # the same initial weights on every rank
        backbone_kwargs = dict(args.backbone_kwargs)
        if args.backbone_checkpoint:  # read safely here; timm's loader applies the family's filter to it
            from timm.models import clean_state_dict

            from recurzoo.checkpoint import read_state_dict

            weights = clean_state_dict(read_state_dict(args.backbone_checkpoint))
            backbone_kwargs["pretrained_cfg_overlay"] = dict(state_dict=weights)
        try:
            backbone = create_fpn_backbone(
                args.backbone,
                out_indices=args.out_indices,
                fpn_channels=args.fpn_channels,
                pretrained=args.pretrained_backbone or bool(args.backbone_checkpoint),
                frozen_bn=args.frozen_bn,
                **backbone_kwargs,
            )
        except UnknownModelError as error:
            raise UnknownModelError(f"--backbone: {error}") from None
        except IndexError:
            if not args.out_indices:
                raise
            indices = " ".join(map(str, args.out_indices))
            raise UsageError(
                f"--out-indices {indices}: not feature levels of {args.backbone} (`recurzoo info {args.backbone}` "
                "lists them; negative indices count from the deepest)"
            ) from None
        except CheckpointError as error:
            if args.backbone_checkpoint:  # its own message names the file
                raise
            local = "; or give its weights with --backbone-checkpoint FILE"
            raise CheckpointError(f"--backbone {args.backbone}: {error}{local}") from None
        with model_option(f"--detector {args.detector} with --detector-kwargs"):
            self.model = create_detector(
                args.detector,
                backbone,
                self.val_set.num_classes,
                min_size=args.min_size,
                max_size=args.max_size,
                anchor_scale=args.anchor_scale,
                box_score_thresh=args.box_score_thresh,
                box_detections_per_img=args.box_detections_per_img,
                **args.detector_kwargs,
            ).to(context.device)
        with user_option("--opt", ValueError, TypeError, AssertionError):
            self.optimizer = create_optimizer_v2(
                self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
            )
        self.train_loader = None
        self.scheduler, self.num_epochs = None, args.epochs
        if self.train_set is not None:
            sampler = DistributedSampler(self.train_set, seed=args.seed) if context.distributed else None
            self.train_loader = DataLoader(
                self.train_set,
                batch_size=args.batch_size,
                sampler=sampler,
                shuffle=sampler is None,
                num_workers=args.workers,
                collate_fn=collate,
                drop_last=True,
                pin_memory=context.device.type == "cuda",
                persistent_workers=args.workers > 0,
            )
            if len(self.train_loader) == 0:
                raise UsageError(
                    f"{len(self.train_set)} training images make no full batch of {args.batch_size} "
                    f"per process; lower --batch-size"
                )
            self.scheduler, self.num_epochs = create_scheduler_v2(
                self.optimizer,
                sched=args.sched,
                num_epochs=args.epochs,
                decay_milestones=list(args.lr_steps),
                decay_epochs=args.lr_steps[0],
                decay_rate=args.lr_gamma,
                min_lr=args.min_lr,
                warmup_lr=args.warmup_lr,
                warmup_epochs=args.warmup_epochs,
                step_on_epochs=False,
                updates_per_epoch=len(self.train_loader),
            )
        self.scaler = None
        if args.amp and args.amp_dtype == "float16" and context.device.type == "cuda":
            self.scaler = NativeScaler(device="cuda")
        self.saver = None
        if context.is_main and not args.test_only:
            self.saver = self.create_saver(f"{args.detector}_{args.backbone}")

    def run_state(self) -> Dict[str, Any]:
        return dict(category_ids=list(self.val_set.category_ids))

    def run(self) -> Dict[str, Any]:
        args, context = self.args, self.context
        self._setup()
        start_epoch = self.resume_epoch(None if args.test_only else self.optimizer)
        if start_epoch is None:
            if args.test_only:
                self.logger.warning("--test-only without --resume: evaluating untrained detection heads")
            start_epoch = 0
        if args.test_only:
            metrics = evaluate(self.model, self.val_set, args, context, self.logger)
            self.logger.info("mAP " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            return dict(eval=metrics, output=args.output)
        self.start_epochs(start_epoch)
        self.scheduler.step_update(self.num_updates)
        self.train_model = wrap_ddp(self.model, context)
        self.logger.info(
            f"{args.detector} on {args.backbone} (pyramid strides {self.model.backbone.strides}): "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters, "
            f"{self.val_set.num_classes - 1} classes, {len(self.train_loader)} steps per epoch on "
            f"{context.world_size} process(es)"
        )
        best, eval_metrics = self.train_epochs(start_epoch)
        if self.skipped_images:
            self.logger.warning(f"unreadable images: {self.skipped_images} training samples skipped in all")
        return self.epochs_result(best, eval_metrics, "best_map", skipped_images=self.skipped_images)

    def evaluate_epoch(self, epoch: int) -> Dict[str, float]:
        if (epoch + 1) % self.args.eval_every == 0 or epoch + 1 == self.num_epochs:
            return evaluate(self.model, self.val_set, self.args, self.context, self.logger)
        return {}

    def train_epoch(self, epoch: int, guard: RunGuard) -> Optional[Dict[str, float]]:
        args, context = self.args, self.context
        skip = self.batches_done or 0
        self.batches_done = skip
        if not skip:
            self.epoch_sums = {}
        self.train_model.train()
        total = len(self.train_loader)
        bar = progress_bar(
            total=total, initial=skip, desc=f"epoch {epoch}", enabled=context.is_main and not args.no_progress
        )
        started = time.perf_counter()
        batches = self.epoch_batches(self.train_loader, epoch)
        for index, (images, targets) in batches:
            images = [image.to(context.device, non_blocking=True) for image in images]
            targets = [
                {key: value.to(context.device, non_blocking=True) for key, value in target.items()}
                for target in targets
            ]
            self.snapshot_buffers()
            with autocast(context.device, args.amp, args.amp_dtype):
                losses = self.train_model(images, targets)
            loss = sum(losses.values())
            if guard.check(loss, self.num_updates, where=f"epoch {epoch}, batch {index}"):
                self.save_last(epoch, batches, pending=True)  # this batch is trained again on resume
                bar.close()
                return None
            self.optimizer_step(loss, self.args.clip_grad)
            self.num_updates += 1
            self.batches_done = index + 1
            values = {
                "loss": loss.detach().float().item(),
                **{key: value.detach().float().item() for key, value in losses.items()},
            }
            for key, value in values.items():
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value
            self.epoch_sums["steps"] = self.epoch_sums.get("steps", 0) + 1
            self.scheduler.step_update(num_updates=self.num_updates)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if context.is_main and (index + 1) % args.log_interval == 0:
                self.logger.info(
                    f"epoch {epoch} step {index + 1}/{total}: "
                    + ", ".join(f"{key} {value:.4f}" for key, value in values.items())
                    + f", lr {self.optimizer.param_groups[0]['lr']:.3e}"
                )
            if args.checkpoint_every and self.num_updates % args.checkpoint_every == 0 and index + 1 < total:
                self.save_last(epoch, batches)
        bar.close()
        self.skipped_images += self.train_set.skip_unreadable.report(self.logger, f"epoch {epoch}", context)
        keys = sorted(key for key in self.epoch_sums if key != "steps")
        sums = torch.tensor(
            [self.epoch_sums[key] for key in keys] + [self.epoch_sums.get("steps", 0)],
            dtype=torch.float64,
            device=context.device,
        )
        if context.distributed:
            dist.all_reduce(sums)
        steps = max(1.0, sums[-1].item())
        metrics = OrderedDict((key, sums[i].item() / steps) for i, key in enumerate(keys))
        metrics.move_to_end("loss", last=False)
        metrics["seconds"] = time.perf_counter() - started
        return metrics


if __name__ == "__main__":
    run_cli(main)
