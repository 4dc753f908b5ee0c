"""Train or fine-tune any classifier of the zoo (or of timm) on an image dataset, assembled from timm.

    python -m recurzoo.train.classification --data-dir DIR --model sret_small --epochs 30 --lr 5e-4 \\
        --initial-checkpoint sret_small.pth --num-classes 10 --mixup 0.8 --cutmix 1.0 --model-ema \\
        --layer-decay 0.75 --output runs/sret_small_ft --plot
    torchrun --nproc_per_node 8 -m recurzoo.train.classification --config recipe.yaml ...

The parts are timm's: ``create_dataset``/``create_loader``/``resolve_data_config`` (any reader:
ImageFolder, tar, ``torch/...``, ``hfds/...``), ``Mixup``/CutMix, ``create_optimizer_v2`` (with
layer-wise learning-rate decay from the model's ``group_matcher``), ``create_scheduler_v2``,
timm's losses, ``ModelEmaV3``, ``CheckpointSaver``, ``distribute_bn`` and ``update_summary``;
flags carry timm's names. ``--config`` reads option defaults from YAML.

Fine-tuning: ``--pretrained`` (timm's weights) or ``--initial-checkpoint FILE`` (a training
checkpoint, state dict, safetensors or official file) into a model with ``--num-classes`` classes
(default: the dataset's); a classifier of another class count starts fresh, everything else must fit.

Knowledge distillation as SReT trains its distilled models (soft labels of a frozen teacher, as in
MEAL V2): ``--teacher MODEL [--teacher-checkpoint FILE] --kd-temperature T --kd-weight W``. The loss
is ``W * CE(softmax(teacher / T), student / T) + (1 - W) * task loss``; the default ``W = 1`` uses the
soft labels only, as the paper does.

Runs under ``torchrun`` (DDP: NCCL on GPU, Gloo on CPU; distributed samplers; rank 0 logs and
writes checkpoints). Into ``--output``: ``last.pth.tar``, ranked ``checkpoint-<epoch>.pth.tar``,
``model_best.pth.tar`` (atomic, loadable with ``weights_only=True``), ``summary.csv``, ``log.txt``,
``args.yaml``, ``metrics.jsonl`` (the loss every ``--log-interval`` steps) and with ``--plot``
``loss.png``/``metrics.png``. ``--resume auto`` continues from ``last.pth.tar``, mid-epoch included,
exactly: model, optimizer, scheduler, EMA, grad scaler and every rank's RNG states are restored, so
the resumed run repeats the losses of an uninterrupted one. SIGTERM/SIGINT write a final checkpoint
and exit 128+signal; a NaN/inf loss stops the run (exit 3) before the bad update, keeping the last
checkpoint. Data: ``--train-split`` and ``--val-split`` name sub-folders of ``--data-dir`` (timm's
``val``/``eval`` synonyms are found); a missing one is an error, never the training images evaluated
in its place, and ``--val-split none`` trains without evaluation. ``--num-classes`` and the validation
classes must match the training split's. Images are read by :mod:`recurzoo.images`; training images
that cannot be decoded are replaced by the next one, validation images left out, both counted and
reported. A missing or empty data folder, a bad option or a checkpoint that does not fit (or would
run code) is one line on stderr with exit code 2; ``--pretrained`` and ``--teacher`` fail within
seconds offline, naming timm's cache file and ``--initial-checkpoint``/``--teacher-checkpoint``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.utils import random_seed
from torch import nn

from recurzoo.train.arguments import (
    UsageError,
    add_choice,
    add_epoch_arguments,
    add_loader_arguments,
    add_model_arguments,
    add_run_arguments,
    add_switch,
    add_teacher_arguments,
    run_cli,
    training_parser,
    user_option,
)
from recurzoo.train.data import NO_SPLIT, create_image_dataset
from recurzoo.train.distributed import DistributedContext, wrap_ddp
from recurzoo.train.loops import EpochTraining
from recurzoo.train.run import RunGuard, append_jsonl, progress_bar
from recurzoo.train.validate import (
    add_preprocessing_arguments,
    autocast,
    checkpoint_num_classes,
    create_eval_loader,
    create_named_model,
    dataset_num_classes,
    evaluate,
    load_weights,
    read_weights,
)

__all__ = ["build_parser", "main", "KnowledgeDistillationLoss", "create_teacher"]


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.classification", __doc__)
    group = add_model_arguments(
        parser,
        "timm model name, e.g. sret_small or hornet_tiny_7x7",
        required=True,
        kwargs_help="extra timm.create_model arguments, e.g. 'dims=(16,32,64,128)' 'depths=(1,1,2,1)'",
        checkpoint=("--initial-checkpoint",),
        checkpoint_help="start from these weights (classifier re-initialized if the class count differs)",
        pretrained_help="start from timm's pretrained weights",
    )
    add_switch(group, "--initial-use-ema", True, "take --initial-checkpoint's EMA weights when it has them")
    group.add_argument("--num-classes", type=int, default=None, help="classes (default: the dataset's)")
    group.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="dataset root (e.g. an ImageFolder with train/ and val/)")
    group.add_argument("--dataset", default="", help="timm dataset type ('' = folder/tar, torch/..., hfds/...)")
    group.add_argument(
        "--train-split", default="train", help="training split: a sub-folder of --data-dir ('.' for --data-dir itself)"
    )
    group.add_argument(
        "--val-split",
        default="validation",
        help="evaluation split: a sub-folder of --data-dir (val/, eval/ are found for 'validation'); "
        "'none' to train without evaluation. A missing split is an error, never the training images",
    )
    group.add_argument("--class-map", default="", help="file mapping class folder names to indices")
    group.add_argument("--dataset-download", action="store_true", help="let torch/ and tfds/ datasets download")
    add_loader_arguments(group, batch_size=128, short=True)
    group.add_argument("--validation-batch-size", type=int, default=None, help="eval batch (default: --batch-size)")
    add_preprocessing_arguments(group)
    group.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    group = parser.add_argument_group("augmentation and regularization")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation")
    group.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
    group.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random-resized-crop aspect")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    group.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter factor")
    group.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    group.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability")
    group.add_argument("--remode", default="pixel", help="random-erasing mode")
    group.add_argument("--recount", type=int, default=1, help="random-erasing count")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix box ratio range")
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both on")
    add_choice(group, "--mixup-mode", ("batch", "pair", "elem"), "timm's Mixup mode: per batch, pair or element")
    group.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--bce-loss", action="store_true", help="binary cross-entropy instead of softmax CE")
    group = parser.add_argument_group("optimizer and schedule")
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay, e.g. 0.75")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient clipping value")
    add_choice(group, "--clip-mode", ("norm", "value", "agc"), "what --clip-grad bounds (timm's dispatch_clip_grad)")
    group.add_argument("--sched", default="cosine", help="timm scheduler: cosine, step, multistep, ...")
    add_switch(group, "--sched-on-updates", True, "update the learning rate every step (else every epoch)")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--warmup-epochs", type=int, default=5)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-6)
    group.add_argument("--warmup-prefix", action="store_true", help="warm-up epochs come before the schedule")
    group.add_argument("--cooldown-epochs", type=int, default=0)
    group.add_argument("--decay-epochs", type=float, default=90, help="step schedule interval")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=(90, 180, 270), help="multistep epochs")
    group.add_argument("--decay-rate", type=float, default=0.1)
    group = parser.add_argument_group("model EMA")
    group.add_argument("--model-ema", action="store_true", help="keep an exponential moving average (ModelEmaV3)")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-warmup", action="store_true", help="ramp the EMA decay up early on")
    group.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")
    group = add_teacher_arguments(parser, "knowledge distillation (SReT's soft-label KD)")
    group.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T")
    group.add_argument(
        "--kd-weight", type=float, default=1.0, help="weight W of the soft-label loss; the task loss gets 1 - W"
    )
    group = add_run_arguments(parser, output="output/classification", seed=42, checkpoint="last.pth.tar")
    group.add_argument("--eval-metric", default="top1", help="metric ranking the checkpoints (top1, top5, loss)")
    add_epoch_arguments(group, log_interval=50, amp_dtype="bfloat16")
    return parser


class KnowledgeDistillationLoss(nn.Module):
    """SReT's KD objective (soft labels of a frozen teacher, as MEAL V2) mixed with the task loss.

    ``weight * CE(softmax(teacher / T), log_softmax(student / T)) + (1 - weight) * task(student, target)``
    with timm's ``SoftTargetCrossEntropy`` as the soft cross-entropy (SReT's ``KDLoss``). The teacher
    sees the student's input, renormalized when its mean/std differ; it runs without gradients.
    """

    def __init__(
        self,
        teacher: nn.Module,
        task_loss: nn.Module,
        temperature: float = 1.0,
        weight: float = 1.0,
        student_mean: Sequence[float] = (),
        student_std: Sequence[float] = (),
    ) -> None:
        super().__init__()
        from timm.loss import SoftTargetCrossEntropy

        if temperature <= 0 or not 0.0 <= weight <= 1.0:
            raise UsageError(
                f"knowledge distillation: need --kd-temperature > 0 and 0 <= --kd-weight <= 1, "
                f"received {temperature} and {weight}"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.task_loss = task_loss
        self.soft_loss = SoftTargetCrossEntropy()
        self.temperature = temperature
        self.weight = weight
        cfg = getattr(teacher, "pretrained_cfg", {}) or {}
        teacher_mean, teacher_std = cfg.get("mean"), cfg.get("std")
        self.renormalize = (
            bool(student_mean)
            and teacher_mean is not None
            and (tuple(teacher_mean) != tuple(student_mean) or tuple(teacher_std) != tuple(student_std))
        )
        if self.renormalize:

            def column(values: Sequence[float]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

            self.register_buffer(
                "shift", (column(student_mean) - column(teacher_mean)) / column(teacher_std), persistent=False
            )
            self.register_buffer("scale", column(student_std) / column(teacher_std), persistent=False)
        self.last: Dict[str, float] = {}

    def train(self, mode: bool = True) -> "KnowledgeDistillationLoss":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_input = images * self.scale + self.shift if self.renormalize else images
            teacher_logits = self.teacher(teacher_input).float()
        soft_targets = F.softmax(teacher_logits / self.temperature, dim=-1)
        kd = self.soft_loss(logits.float() / self.temperature, soft_targets)
        loss = self.weight * kd
        task = None
        if self.weight < 1.0:
            task = self.task_loss(logits, target)
            loss = loss + (1.0 - self.weight) * task
        self.last = dict(kd_loss=kd.detach(), task_loss=task.detach() if task is not None else None)
        return loss


def create_teacher(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The frozen teacher: timm's pretrained weights or ``--teacher-checkpoint``, with ``num_classes`` outputs."""
    pretrained = args.teacher_pretrained if args.teacher_pretrained is not None else not args.teacher_checkpoint
    kwargs = dict(args.teacher_kwargs, num_classes=num_classes)
    teacher = create_named_model(args.teacher, pretrained, "--teacher", "--teacher-checkpoint", **kwargs)
    if args.teacher_checkpoint:
        fresh = load_weights(teacher, read_weights(args.teacher_checkpoint), source=args.teacher_checkpoint)
        if fresh:
            raise UsageError(
                f"--teacher-checkpoint {args.teacher_checkpoint}: its classifier does not have the "
                f"{num_classes} classes of the data, so the teacher could not teach them"
            )
    elif pretrained and teacher.pretrained_cfg.get("num_classes") not in (None, num_classes):
        raise UsageError(
            f"--teacher {args.teacher}: its pretrained classifier has "
            f"{teacher.pretrained_cfg['num_classes']} classes, the data {num_classes}; give a "
            f"--teacher-checkpoint fine-tuned on these classes"
        )
    return teacher.eval().requires_grad_(False)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train; returns the best metric and epoch, the last epoch's metrics and the output folder."""
    return _Training.main(build_parser(), argv)


class _Training(EpochTraining):
    """The state of one run: data, model, optimization, checkpoints; ``run`` trains epoch by epoch."""

    def __init__(self, args: argparse.Namespace, context: DistributedContext) -> None:
        super().__init__(args, context, "classification")
        self.eval_metric = args.eval_metric
        self.skipped_images = 0
        self.skipped_eval_images = 0

    # ----------------------------------------------------------------------------------- set-up
    def _datasets(self) -> None:
        args = self.args

        def split_dataset(split: str, flag: str, what: str, evaluation: bool = False) -> Any:
            return create_image_dataset(
                args.dataset,
                args.data_dir,
                split,
                skip_unreadable=what,
                split_flag=flag,
                evaluation=evaluation,
                class_map=args.class_map or None,
                download=args.dataset_download,
                batch_size=args.batch_size,
                seed=args.seed,
            )

        self.train_set = split_dataset(args.train_split, "--train-split", "training set")
        self.eval_set = None
        if args.val_split.strip().lower() not in NO_SPLIT:
            self.eval_set = split_dataset(args.val_split, "--val-split", "validation set", evaluation=True)
        else:
            self.logger.info("--val-split none: training without evaluation (model_best is not written)")
        self._check_classes()

    def _check_classes(self) -> None:
        """Before anything is built: ``--num-classes`` and the evaluation split agree with the training
        split's classes (labels of another count fall outside the classifier, or mean other classes)."""
        args = self.args
        if args.num_classes is not None and args.num_classes < 1:
            raise UsageError(f"--num-classes: expected a positive class count, received {args.num_classes}")
        found = dataset_num_classes(self.train_set)
        where = f"--data-dir {args.data_dir} --train-split {args.train_split}"
        if args.num_classes and found and args.num_classes != found:
            raise UsageError(
                f"--num-classes {args.num_classes}: {where} has {found} classes; give --num-classes {found} "
                "(or leave it out), or a --class-map that maps the class folders to the classifier's outputs"
            )
        train_map = _class_to_idx(self.train_set)
        eval_map = _class_to_idx(self.eval_set) if self.eval_set is not None else None
        if train_map and eval_map and eval_map != train_map:
            only_train = ", ".join(sorted(set(train_map) - set(eval_map))) or "none"
            only_eval = ", ".join(sorted(set(eval_map) - set(train_map))) or "none"
            raise UsageError(
                f"--val-split {args.val_split}: its classes differ from those of {where} (only in training: "
                f"{only_train}; only in evaluation: {only_eval}), so its labels would mean other classes; give "
                "both splits the same class folders, or a --class-map"
            )

    def _model(self) -> None:

        import recurzoo  # noqa: F401  (registers the zoo with timm)

        args = self.args
        weights = read_weights(args.initial_checkpoint, args.initial_use_ema) if args.initial_checkpoint else None
        self.num_classes = (
            args.num_classes
            or dataset_num_classes(self.train_set)
            or (weights is not None and checkpoint_num_classes(weights, args.model))
            or None
        )
        if not self.num_classes:
            raise UsageError(f"--data-dir {args.data_dir}: cannot tell the class count, give --num-classes")
        args.num_classes = self.num_classes
        kwargs = dict(num_classes=self.num_classes, drop_rate=args.drop)
        if args.drop_path is not None:
            kwargs["drop_path_rate"] = args.drop_path
        kwargs.update(args.model_kwargs)
        random_seed(args.seed)  # the same initial weights on every rank
        model = create_named_model(args.model, args.pretrained, "--model", "--initial-checkpoint", **kwargs)
        if weights is not None:
            fresh = load_weights(model, weights, source=args.initial_checkpoint)
            self.logger.info(f"loaded {args.initial_checkpoint}" + (f"; new classifier {fresh}" if fresh else ""))
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model = model.to(self.context.device)
        self.data_config = _resolve_data_config(args, model, self.context.is_main)

    def _loaders(self) -> None:
        from timm.data import create_loader

        args, context, config = self.args, self.context, self.data_config
        with user_option(
            "--train-interpolation/--aa/--remode/--scale/--ratio/--color-jitter",
            KeyError,
            ValueError,
            AssertionError,
            TypeError,
        ):
            self.train_loader = create_loader(
                self.train_set,
                input_size=config["input_size"],
                batch_size=args.batch_size,
                is_training=True,
                no_aug=args.no_aug,
                re_prob=args.reprob,
                re_mode=args.remode,
                re_count=args.recount,
                scale=tuple(args.scale),
                ratio=tuple(args.ratio),
                hflip=args.hflip,
                vflip=args.vflip,
                color_jitter=args.color_jitter,
                auto_augment=args.aa,
                interpolation=args.train_interpolation,
                mean=config["mean"],
                std=config["std"],
                num_workers=args.workers,
                distributed=context.distributed,
                pin_memory=context.device.type == "cuda",
                device=context.device,
                use_prefetcher=False,
                persistent_workers=False,
            )  # workers seeded afresh each epoch, as a resumed run seeds them
        if len(self.train_loader) == 0:
            raise UsageError(
                f"--data-dir {args.data_dir}: {len(self.train_set)} training images make no full "
                f"batch of {args.batch_size} per process; lower --batch-size"
            )
        self.eval_loader = None
        if self.eval_set is not None:
            with user_option(
                "--interpolation/--crop-mode/--mean/--std/--img-size", KeyError, ValueError, AssertionError, TypeError
            ):
                self.eval_loader = create_eval_loader(
                    self.eval_set, config, args.validation_batch_size or args.batch_size, args.workers, context
                )

    def _objective(self) -> None:
        from timm.data import Mixup
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        args = self.args
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
            if args.batch_size % 2:
                raise UsageError(f"--mixup/--cutmix need an even --batch-size, received {args.batch_size}")
            self.mixup = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                mode=args.mixup_mode,
                label_smoothing=args.smoothing,
                num_classes=self.num_classes,
            )
        if args.bce_loss:
            task: nn.Module = BinaryCrossEntropy(smoothing=0.0 if self.mixup else args.smoothing)
        elif self.mixup is not None:
            task = SoftTargetCrossEntropy()
        elif args.smoothing:
            task = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            task = nn.CrossEntropyLoss()
        self.kd = None
        if args.teacher:
            teacher = create_teacher(args, self.num_classes).to(self.context.device)
            self.kd = KnowledgeDistillationLoss(
                teacher, task, args.kd_temperature, args.kd_weight, self.data_config["mean"], self.data_config["std"]
            )
            self.kd.to(self.context.device)
            self.logger.info(f"knowledge distillation from {args.teacher}: T={args.kd_temperature}, W={args.kd_weight}")
        self.task_loss = task.to(self.context.device)

    def _optimization(self) -> None:
        from timm.optim import create_optimizer_v2, optimizer_kwargs
        from timm.scheduler import create_scheduler_v2, scheduler_kwargs
        from timm.utils import ModelEmaV3, NativeScaler

        args = self.args
        with user_option(f"--opt {args.opt}", ValueError, TypeError, AssertionError):
            self.optimizer = create_optimizer_v2(self.model, **optimizer_kwargs(cfg=args))
        with user_option(f"--sched {args.sched}", ValueError, TypeError, AssertionError):
            self.scheduler, self.num_epochs = create_scheduler_v2(
                self.optimizer, **scheduler_kwargs(args), updates_per_epoch=len(self.train_loader)
            )
        self.scaler = None
        if args.amp and args.amp_dtype == "float16" and self.context.device.type == "cuda":
            self.scaler = NativeScaler(device="cuda")
        self.model_ema = None
        if args.model_ema:
            self.model_ema = ModelEmaV3(
                self.model,
                decay=args.model_ema_decay,
                use_warmup=args.model_ema_warmup,
                device=torch.device("cpu") if args.model_ema_force_cpu else None,
            )
        self.saver = None
        if self.context.is_main:
            self.saver = self.create_saver(args.model, self.model_ema, decreasing=args.eval_metric == "loss")

    def run_state(self) -> Dict[str, Any]:
        return dict(num_classes=self.num_classes)

    # ------------------------------------------------------------------------------- training
    def run(self) -> Dict[str, Any]:
        args, context = self.args, self.context
        self._datasets()
        self._model()
        self._loaders()
        self._objective()
        self._optimization()
        start_epoch = self.resume_epoch(self.optimizer, self.model_ema) or 0
        self.start_epochs(start_epoch)
        if self.scheduler is not None:
            if args.sched_on_updates:
                self.scheduler.step_update(self.num_updates)
            else:
                self.scheduler.step(start_epoch)
        self.train_model = wrap_ddp(self.model, context)
        params = sum(p.numel() for p in self.model.parameters())
        self.logger.info(
            f"{args.model}: {params / 1e6:.2f} M parameters, {self.num_classes} classes, input "
            f"{tuple(self.data_config['input_size'])}, {len(self.train_loader)} steps per epoch "
            f"on {context.world_size} process(es)"
        )
        best, eval_metrics = self.train_epochs(start_epoch)
        if best[0] is not None:
            self.logger.info(f"best {args.eval_metric} {best[0]:.4f} at epoch {best[1]}")
        if self.skipped_images or self.skipped_eval_images:
            self.logger.warning(
                f"unreadable images: {self.skipped_images} training samples skipped in all, "
                f"{self.skipped_eval_images} validation images left out of each evaluation"
            )
        skipped = dict(skipped_images=self.skipped_images, skipped_eval_images=self.skipped_eval_images)
        return self.epochs_result(best, eval_metrics, "best_metric", **skipped)

    def train_epoch(self, epoch: int, guard: RunGuard) -> Optional[Dict[str, float]]:
        args, context = self.args, self.context
        if self.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        skip = self.batches_done or 0
        self.batches_done = skip
        if not skip:
            self.epoch_sums = [0.0, 0]
        self.train_model.train()
        if self.kd is not None:
            self.kd.train()
        total = len(self.train_loader)
        bar = progress_bar(
            total=total, initial=skip, desc=f"epoch {epoch}", enabled=context.is_main and not args.no_progress
        )
        kd_sums = [0.0, 0.0]
        started = time.perf_counter()
        batches = self.epoch_batches(self.train_loader, epoch)
        for index, (images, targets) in batches:
            images = images.to(context.device, non_blocking=True)
            targets = targets.to(context.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            self.snapshot_buffers()
            with autocast(context.device, args.amp, args.amp_dtype):
                logits = self.train_model(images)
                if self.kd is not None:
                    loss = self.kd(logits, targets, images)
                else:
                    loss = self.task_loss(logits, targets)
            if guard.check(loss, self.num_updates, where=f"epoch {epoch}, batch {index}"):
                self.save_last(epoch, batches, pending=True)  # this batch is trained again on resume
                bar.close()
                return None
            self.optimizer_step(loss, args.clip_grad, args.clip_mode)
            self.num_updates += 1
            self.batches_done = index + 1
            loss_value = loss.detach().float().item()
            self.epoch_sums = [self.epoch_sums[0] + loss_value, self.epoch_sums[1] + 1]
            if self.kd is not None:
                kd_sums[0] += float(self.kd.last["kd_loss"])
                kd_sums[1] += 1
            if self.model_ema is not None:
                self.model_ema.update(self.model, step=self.num_updates)
            if self.scheduler is not None and args.sched_on_updates:
                self.scheduler.step_update(num_updates=self.num_updates)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if context.is_main and (index + 1) % args.log_interval == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                self.logger.info(f"epoch {epoch} step {index + 1}/{total}: loss {loss_value:.4f}, lr {lr:.3e}")
                append_jsonl(
                    os.path.join(args.output, "metrics.jsonl"),
                    dict(epoch=epoch, step=self.num_updates, loss=loss_value, lr=lr),
                )
            if args.checkpoint_every and self.num_updates % args.checkpoint_every == 0 and index + 1 < total:
                self.save_last(epoch, batches)
        bar.close()
        self.skipped_images += self._report_skips(f"epoch {epoch}")
        metrics = OrderedDict(loss=self._mean_over_ranks(*self.epoch_sums))
        if self.kd is not None:
            metrics["kd_loss"] = self._mean_over_ranks(*kd_sums)
        metrics["seconds"] = time.perf_counter() - started
        return metrics

    def _report_skips(self, when: str) -> int:
        """Report (and return) the unreadable training images skipped since the last report, all ranks."""
        skipper = getattr(self.train_set, "skip_unreadable", None)
        return skipper.report(self.logger, when, self.context) if skipper is not None else 0

    def _mean_over_ranks(self, total: float, count: float) -> float:
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.context.device)
        if self.context.distributed:
            torch.distributed.all_reduce(sums)
        return (sums[0] / sums[1].clamp_min(1)).item()

    def evaluate_epoch(self, epoch: int) -> Dict[str, float]:
        if self.eval_loader is None:
            return {}
        args = self.args
        show = self.context.is_main and not args.no_progress
        metrics = evaluate(
            self.model, self.eval_loader, self.context, args.amp, args.amp_dtype, show, desc=f"eval {epoch}"
        )
        if metrics.pop("images") == 0:
            raise UsageError(f"--val-split {args.val_split}: no readable image, nothing was evaluated")
        skipper = getattr(self.eval_set, "skip_unreadable", None)
        if skipper is not None:  # the same files at every evaluation: the last one's count is kept
            self.skipped_eval_images = skipper.report(self.logger, f"eval {epoch}", self.context)
        if self.model_ema is not None:
            ema = evaluate(
                self.model_ema.module,
                self.eval_loader,
                self.context,
                args.amp,
                args.amp_dtype,
                show,
                desc=f"eval EMA {epoch}",
            )
            metrics.update((f"ema_{key}", value) for key, value in ema.items() if key != "images")
        if not all(math.isfinite(value) for value in metrics.values()):
            self.logger.warning(f"epoch {epoch}: non-finite evaluation metrics {dict(metrics)}")
        return metrics


def _class_to_idx(dataset: Any) -> Dict[str, int]:
    reader = getattr(dataset, "reader", None)
    return dict(getattr(reader, "class_to_idx", None) or {})


def _resolve_data_config(args: argparse.Namespace, model: nn.Module, verbose: bool) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    return resolve_data_config(vars(args), model=model, verbose=verbose)


if __name__ == "__main__":
    run_cli(main)
