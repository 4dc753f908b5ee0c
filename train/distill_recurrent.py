"""Distil a timm ViT into a recurrent ViT with ``k`` shared blocks (Raptor's two-stage recipe).

    python -m recurzoo.train.distill_recurrent --teacher vit_small_patch16_224 --k 2 --data-dir DIR \\
        --output runs/rvit_s_k2 [--teacher-checkpoint F] [--depth-conditioning] [--lora-rank 8]

1. Phases: unless ``--phases`` gives them, the teacher's layer-by-layer token similarity on a fixed
   set of images is segmented into ``k`` contiguous phases (``find_phases``; heat map saved as
   ``similarity.png``). The student is the teacher rewritten by ``from_vit`` (each shared block
   copied from its phase's middle block), or with freshly initialized blocks (``--init random``).
2. Stage 1 trains every shared block on its own phase from the teacher's tokens: teacher-forced
   (one step from each teacher activation of the phase) annealed into a roll-out of the whole
   phase from the teacher's activation at the phase entry, both matched to the teacher's
   activation after every step of the phase.
3. Stage 2 fine-tunes the whole student (classifier head frozen) end to end, autoregressively from
   the image: the tokens after every step (class, register and patch tokens, weighted) and the final
   normalized features are matched to the teacher's.

The per-step error of the student (``||student - teacher||^2 / ||teacher - channel mean||^2`` on a
fixed set of images) is logged before, between and after the stages. Any ImageFolder-style data works:
the ``--split`` sub-folder of ``--data-dir`` (``train``; ``--split .`` for class folders directly in it).
Runs under ``torchrun`` for data-parallel training; ``--config`` reads option defaults from YAML. Both
stages are loops of
:class:`~recurzoo.train.loops.StepTraining` sharing one ``last.pt`` (atomic, with every rank's RNG
state): ``--resume auto`` continues exactly, SIGTERM/SIGINT write a final checkpoint, a NaN/inf loss
stops the run keeping the last one. The student ends in ``student.safetensors`` with
``student_config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler
from timm.utils import random_seed
from torch import nn
from torch.utils.data import DataLoader, Subset

from recurzoo.backbones._helpers import init_linear
from recurzoo.backbones.recurrent_vit import (
    RecurrentViT,
    even_phases,
    find_phases,
    from_vit,
    phase_starts,
    vit_step_tokens,
)
from recurzoo.checkpoint import load_state_dict, read_state_dict
from recurzoo.plots import plot_curves, save_phase_heatmap
from recurzoo.train.arguments import (
    UsageError,
    add_choice,
    add_loader_arguments,
    add_run_arguments,
    add_step_arguments,
    add_teacher_arguments,
    run_cli,
    training_parser,
)
from recurzoo.train.data import collate_readable, create_image_dataset, training_loader
from recurzoo.train.distributed import DistributedContext, wrap_ddp
from recurzoo.train.loops import StepTraining
from recurzoo.train.resume import save_safetensors

__all__ = ["build_parser", "main", "TokenLoss", "PhaseObjective", "SequenceObjective", "step_errors", "cosine_schedule"]


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.distill_recurrent", __doc__)
    add_teacher_arguments(parser, "teacher (a timm ViT)", required=True, pretrained="--pretrained")
    group = parser.add_argument_group("student")
    group.add_argument("--k", type=int, default=2, help="number of shared blocks")
    group.add_argument(
        "--phases",
        type=int,
        nargs="+",
        default=None,
        help="phase lengths (sum = teacher depth); default: found by --phase-split",
    )
    add_choice(group, "--phase-split", ("similarity", "even"), "how phases are chosen when --phases is not given")
    add_choice(group, "--init", ("teacher", "random"), "shared blocks copied from the teacher or freshly initialized")
    add_choice(
        group,
        "--source-block",
        ("first", "middle", "last"),
        "which teacher block of each phase the shared block is copied from",
        default="middle",
    )
    group.add_argument("--depth-conditioning", action="store_true", help="Raptor's step-dependent scales")
    group.add_argument("--lora-rank", type=int, default=0, help="per-step LoRA rank (0: none)")
    add_choice(
        group,
        "--lora-init",
        ("zero", "svd"),
        "per-step LoRA starting at zero or at the SVD of the teacher's per-step weights",
    )
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="ImageFolder root with a --split sub-folder of class folders")
    group.add_argument("--split", default="train", help="sub-folder of --data-dir ('.' for --data-dir itself)")
    add_loader_arguments(group, batch_size=64)
    group.add_argument("--eval-images", type=int, default=64, help="fixed images of phase discovery and step errors")
    group.add_argument("--min-crop", type=float, default=0.25, help="smallest random-resized-crop area")
    group = parser.add_argument_group("optimization")
    group.add_argument("--stage1-steps", type=int, default=20000, help="teacher-forced phase training steps")
    group.add_argument("--stage2-steps", type=int, default=20000, help="end-to-end autoregressive steps")
    group.add_argument("--lr1", type=float, default=3e-4, help="stage-1 learning rate")
    group.add_argument("--lr2", type=float, default=1e-4, help="stage-2 learning rate")
    group.add_argument("--weight-decay", type=float, default=1e-4)
    group.add_argument("--warmup-frac", type=float, default=0.05, help="warm-up share of each stage")
    group.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: none)")
    group.add_argument("--forcing-frac", type=float, default=0.25, help="stage-1 share where teacher forcing goes 1->0")
    group.add_argument("--cls-weight", type=float, default=0.45, help="loss weight of the class token")
    group.add_argument("--reg-weight", type=float, default=0.10, help="loss weight of register tokens")
    group.add_argument("--patch-weight", type=float, default=0.45, help="loss weight of patch tokens")
    group.add_argument("--final-weight", type=float, default=1.0, help="stage-2 weight of the final features")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute steps in stage 2's backward")
    group.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    group = add_run_arguments(parser, output="output/distill_recurrent", seed=0)
    add_step_arguments(group, save_every=1000, log_every=50)
    return parser


class TokenLoss(nn.Module):
    """Mean squared error of token sequences, weighted by token kind (class, registers, patches).

    Weights of kinds the model does not have are dropped and the rest renormalized to sum to one.
    """

    def __init__(
        self, num_class_tokens: int, num_reg_tokens: int, cls_weight: float, reg_weight: float, patch_weight: float
    ) -> None:
        super().__init__()
        spans = [
            (0, num_class_tokens, cls_weight),
            (num_class_tokens, num_class_tokens + num_reg_tokens, reg_weight),
            (num_class_tokens + num_reg_tokens, None, patch_weight),
        ]
        spans = [(start, end, weight) for start, end, weight in spans if (end is None or end > start) and weight > 0]
        if not spans:
            raise UsageError("TokenLoss: every token kind present has weight 0")
        total = sum(weight for _, _, weight in spans)
        self.spans = [(start, end, weight / total) for start, end, weight in spans]

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(
            weight * F.mse_loss(prediction[:, start:end].float(), target[:, start:end].float())
            for start, end, weight in self.spans
        )


class PhaseObjective(nn.Module):
    """Stage 1: each shared block trained on its own phase, from the teacher's tokens.

    ``forcing`` mixes the teacher-forced loss (each step from the teacher's previous activation) with
    the roll-out loss (the whole phase from the teacher's activation at phase entry); both compare
    with the teacher's activation after every step of the phase.
    """

    def __init__(self, student: RecurrentViT, token_loss: TokenLoss) -> None:
        super().__init__()
        self.student = student
        self.token_loss = token_loss

    def forward(self, teacher_tokens: Sequence[torch.Tensor], forcing: float) -> torch.Tensor:
        loss = teacher_tokens[0].new_zeros(())
        for block, start, length in zip(self.student.blocks, phase_starts(self.student.phases), self.student.phases):
            targets = teacher_tokens[start + 1 : start + length + 1]
            if forcing > 0:
                forced = sum(self.token_loss(block(teacher_tokens[start + s], s), targets[s]) for s in range(length))
                loss = loss + forcing * forced / length
            if forcing < 1:
                x, rolled = teacher_tokens[start], 0.0
                for s in range(length):
                    x = block(x, s)
                    rolled = rolled + self.token_loss(x, targets[s])
                loss = loss + (1.0 - forcing) * rolled / length
        return loss


class SequenceObjective(nn.Module):
    """Stage 2: the student run from the image, matched step by step and at the end to the teacher."""

    def __init__(self, student: RecurrentViT, token_loss: TokenLoss, final_weight: float) -> None:
        super().__init__()
        self.student = student
        self.token_loss = token_loss
        self.final_weight = final_weight

    def forward(
        self, images: torch.Tensor, teacher_tokens: Sequence[torch.Tensor], teacher_features: torch.Tensor
    ) -> torch.Tensor:
        x = self.student.embed_tokens(images)
        loss = x.new_zeros(())
        steps = len(self.student.schedule)
        for step in range(steps):
            x = self.student.forward_step(x, step)
            loss = loss + self.token_loss(x, teacher_tokens[step + 1]) / steps
        if self.final_weight:
            loss = loss + self.final_weight * F.mse_loss(self.student.norm(x).float(), teacher_features.float())
        return loss


@torch.no_grad()
def step_errors(student: RecurrentViT, teacher: nn.Module, batches: Sequence[torch.Tensor]) -> List[float]:
    """Per step, ``sum ||student - teacher||^2 / sum ||teacher - its channel mean||^2`` over ``batches``.

    The student runs autoregressively from the image; 0 is a perfect match, 1 is as far as the
    teacher's own spread.
    """
    was_training = student.training
    student.eval()
    errors = denominators = None
    for images in batches:
        ours = torch.stack(vit_step_tokens(student, images)[1:]).float()
        theirs = torch.stack(vit_step_tokens(teacher, images)[1:]).float()
        error = (ours - theirs).square().sum(dim=(1, 2, 3))
        spread = (theirs - theirs.mean(dim=(1, 2), keepdim=True)).square().sum(dim=(1, 2, 3))
        errors = error if errors is None else errors + error
        denominators = spread if denominators is None else denominators + spread
    student.train(was_training)
    return (errors / denominators.clamp_min(1e-12)).tolist()


def _load_teacher(args: argparse.Namespace) -> nn.Module:
    from recurzoo.train.validate import create_named_model

    pretrained = args.pretrained if args.pretrained is not None else args.teacher_checkpoint is None
    teacher = create_named_model(args.teacher, pretrained, "--teacher", "--teacher-checkpoint", **args.teacher_kwargs)
    _check_teacher_and_phases(teacher, args)
    if args.teacher_checkpoint:
        source = f"--teacher-checkpoint {args.teacher_checkpoint}"
        load_state_dict(teacher, read_state_dict(args.teacher_checkpoint), source, use_family_filter=False)
    return teacher.eval().requires_grad_(False)


def _check_teacher_and_phases(teacher: nn.Module, args: argparse.Namespace) -> None:
    """The teacher is a timm ViT, and ``--k``/``--phases`` fit its depth (one line, before any data is read)."""
    if not isinstance(teacher, VisionTransformer):
        raise UsageError(f"--teacher {args.teacher}: expected a timm VisionTransformer, found {type(teacher).__name__}")
    depth = len(teacher.blocks)
    if args.phases:
        if sum(args.phases) != depth or min(args.phases) < 1:
            phases = " ".join(map(str, args.phases))
            raise UsageError(f"--phases {phases}: expected positive lengths summing to the teacher's depth {depth}")
    elif not 1 <= args.k <= depth:
        raise UsageError(f"--k {args.k}: expected between 1 and the teacher's depth {depth}")


def _datasets(args: argparse.Namespace, teacher: nn.Module):
    from timm.data import create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=teacher)
    img_size = getattr(teacher.patch_embed, "img_size", None)  # the teacher's own size, when built for another
    if img_size is not None:
        data_config["input_size"] = (data_config["input_size"][0], *img_size)
    train_transform = create_transform(
        **data_config, is_training=True, scale=(args.min_crop, 1.0), hflip=0.5, color_jitter=None
    )
    eval_transform = create_transform(**data_config, is_training=False)
    train_set = create_image_dataset(
        "",
        args.data_dir,
        args.split,
        skip_unreadable="training set",
        transform=train_transform,
    )
    eval_set = create_image_dataset(
        "",
        args.data_dir,
        args.split,
        skip_unreadable="evaluation images",
        evaluation=True,
        transform=eval_transform,
    )
    eval_set = Subset(eval_set, range(min(args.eval_images, len(eval_set))))
    return train_set, eval_set


def _random_blocks(student: RecurrentViT) -> None:
    """Re-initialize the shared blocks (timm's ViT init), keeping the teacher's embeddings, norms and head."""
    for block in student.blocks:
        for module in block.modules():
            if module is not block and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        block.apply(init_linear)
        block.reset_step_parameters()


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01
) -> CosineLRScheduler:
    """timm's cosine schedule counted in updates (``step_update(n)`` after ``n`` of them): a linear
    warm-up from ``1 / warmup_steps`` of the rate to the rate over ``warmup_steps`` updates, then a
    cosine decay to ``min_ratio`` of it at ``total_steps``."""
    lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=min_ratio * lr,
        warmup_t=warmup_steps,
        warmup_lr_init=lr / max(1, warmup_steps),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _optimizer(model: RecurrentViT, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=lr)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the distillation; returns the phases, per-step errors and loss history."""
    return _Distillation.main(build_parser(), argv)


class _Distillation(StepTraining):
    """One distillation run: the teacher, its phases, the student, stage 1 and stage 2 (each a loop of
    :class:`StepTraining`, checkpointed in one ``last.pt`` with the phases, losses and per-step errors)."""

    def __init__(self, args: argparse.Namespace, context: DistributedContext) -> None:
        super().__init__(args, context, "distill_recurrent")
        self.clip_grad = args.clip_grad or None
        self.state: Dict[str, Any] = dict(phases=[], history={}, errors={})  # what every checkpoint carries
        self.stage = 1

    def run(self) -> Dict[str, Any]:
        args, context = self.args, self.context
        random_seed(args.seed, context.rank)
        path, resumed = self.load_resume(("phases", "student", "stage", "step", "history", "errors"))
        self.teacher = _load_teacher(args).to(context.device)
        train_set, eval_set = _datasets(args, self.teacher)
        loader = training_loader(train_set, args, context, drop_last=len(train_set) >= args.batch_size)
        self.eval_batches = [
            batch[0].to(context.device)
            for batch in DataLoader(
                eval_set, batch_size=args.batch_size, shuffle=False, num_workers=0, collate_fn=collate_readable
            )
            if batch is not None  # unreadable images are left out (counted and warned about)
        ]
        if not self.eval_batches:
            raise UsageError(f"--data-dir {args.data_dir} --split {args.split}: no readable image to measure on")
        phases = list(resumed["phases"]) if resumed is not None else self._phases()
        self.logger.info(f"teacher {args.teacher}: depth {len(self.teacher.blocks)}, phases {phases}")
        student = from_vit(
            self.teacher,
            phases,
            depth_conditioning=args.depth_conditioning,
            lora_rank=args.lora_rank,
            lora_init=args.lora_init,
            source_block=args.source_block,
        )
        if args.init == "random":
            _random_blocks(student)
        self.model = student.requires_grad_(True).to(context.device)
        token_loss = TokenLoss(
            int(student.has_class_token), student.num_reg_tokens, args.cls_weight, args.reg_weight, args.patch_weight
        )
        self.state["phases"] = phases
        start_stage, start_step = 1, 0
        if resumed is not None:
            load_state_dict(student, resumed["student"], f"--resume {path}", use_family_filter=False)
            self.state.update(history=resumed["history"], errors=resumed["errors"])
            start_stage, start_step = resumed["stage"], resumed["step"]
            if start_stage == 1 and start_step >= args.stage1_steps:
                start_stage, start_step = 2, 0
            self.logger.info(f"resumed {path} at stage {start_stage}, step {start_step}")
        else:
            self._record_errors("initial", "at start")

        if start_stage == 1:
            for name, parameter in student.named_parameters():
                parameter.requires_grad_(name.startswith("blocks."))
            resume_stage1 = resumed if resumed is not None and resumed["stage"] == 1 else None
            self.train_stage(1, PhaseObjective(student, token_loss), loader, start_step, resume_stage1)
            self._record_errors("stage1", "after stage 1")
            start_step = 0

        frozen = ("head.", "fc_norm.", "attn_pool.")
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(not name.startswith(frozen))
        student.set_grad_checkpointing(args.grad_checkpointing)
        resume_stage2 = resumed if resumed is not None and resumed["stage"] == 2 and start_stage == 2 else None
        self.train_stage(
            2, SequenceObjective(student, token_loss, args.final_weight), loader, start_step, resume_stage2
        )
        student.set_grad_checkpointing(False)
        self._record_errors("final", "at the end")

        if context.is_main:
            _write_results(args, student, self.state, self.logger)
        return dict(phases=phases, step_errors=self.state["errors"], history=self.state["history"], output=args.output)

    def _phases(self) -> List[int]:
        """``--phases``, or phases of the teacher split evenly or by its token similarity (heat map saved)."""
        args, depth = self.args, len(self.teacher.blocks)
        if args.phases:
            phases = list(args.phases)
        elif args.phase_split == "even":
            phases = even_phases(depth, args.k)
        else:
            split = find_phases(self.teacher, self.eval_batches, args.k)
            phases = split.phases
            if self.context.is_main:
                save_phase_heatmap(split, os.path.join(args.output, "similarity.png"))
                torch.save(split.similarity, os.path.join(args.output, "similarity.pt"))
        return phases

    def _record_errors(self, key: str, when: str) -> None:
        self.state["errors"][key] = step_errors(self.model, self.teacher, self.eval_batches)
        self.logger.info(f"per-step error {when}: {_format(self.state['errors'][key])}")

    def train_stage(
        self, stage: int, objective: nn.Module, loader: DataLoader, start_step: int, resumed: Optional[Dict[str, Any]]
    ) -> None:
        """Stage ``stage``'s updates from ``start_step`` (with ``resumed``, the checkpoint of this stage)."""
        args = self.args
        self.stage = stage
        total = args.stage1_steps if stage == 1 else args.stage2_steps
        self.optimizer = _optimizer(self.model, args.lr1 if stage == 1 else args.lr2, args.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, total, int(args.warmup_frac * total))
        resume_rng = self.restore_optimization(resumed, start_step) if resumed is not None else None
        self.objective = wrap_ddp(objective, self.context)
        self.history = self.state["history"].setdefault(f"stage{stage}", [])
        self.model.train()
        steps_before = args.stage1_steps if stage == 2 else 0  # the guard counts steps over the whole run
        self.train_steps(loader, start_step, total, args.save_every, resume_rng, steps_before, f"stage {stage}")

    def training_loss(self, batch: Sequence[torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        args, device = self.args, self.context.device
        images = batch[0].to(device, non_blocking=True)
        use_amp = args.amp and device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            teacher_tokens = vit_step_tokens(self.teacher, images)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            if self.stage == 1:
                total = args.stage1_steps
                forcing = max(0.0, 1.0 - step / max(1.0, args.forcing_frac * total)) if args.forcing_frac > 0 else 0.0
                return self.objective(teacher_tokens, forcing), {}
            return self.objective(images, teacher_tokens, self.teacher.norm(teacher_tokens[-1])), {}

    def trained_parameters(self) -> List[nn.Parameter]:
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def checkpoint_state(self, updates: int) -> Dict[str, Any]:
        return dict(super().checkpoint_state(updates), **self.state, stage=self.stage, student=self.model.state_dict())

    def after_update(self, updates: int, total: int, parts: Mapping[str, float]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.log_update(updates, total, lr, prefix=f"stage {self.stage} ", stage=self.stage)


def _format(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _write_results(args: argparse.Namespace, student: RecurrentViT, state: Dict[str, Any], logger: Any) -> None:
    save_safetensors(os.path.join(args.output, "student.safetensors"), student.state_dict())
    config = dict(
        teacher=args.teacher,
        teacher_kwargs=args.teacher_kwargs,
        phases=state["phases"],
        depth_conditioning=args.depth_conditioning,
        lora_rank=args.lora_rank,
        rebuild="from_vit(timm.create_model(teacher, **teacher_kwargs), phases, depth_conditioning, "
        "lora_rank).load_state_dict(safetensors.torch.load_file('student.safetensors'))",
    )
    with open(os.path.join(args.output, "student_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    with open(os.path.join(args.output, "step_errors.json"), "w", encoding="utf-8") as handle:
        json.dump(state["errors"], handle, indent=2)
    try:
        plot_curves(
            {f"stage {k[-1]}": v for k, v in state["history"].items()},
            os.path.join(args.output, "loss.png"),
            ylabel="loss",
            log_y=True,
        )
        plot_curves(
            state["errors"],
            os.path.join(args.output, "step_errors.png"),
            xlabel="step",
            ylabel="relative squared error",
            log_y=True,
        )
    except ImportError:
        logger.warning("matplotlib is not installed: loss.png and step_errors.png not written")
    logger.info(f"student written to {os.path.join(args.output, 'student.safetensors')}")


if __name__ == "__main__":
    run_cli(main)
