"""Top-1/top-5 accuracy of a classifier on an image dataset, with the model's own preprocessing.

    python -m recurzoo.train.validate --data-dir DIR --model sret_tiny --checkpoint runs/x/model_best.pth.tar
    python -m recurzoo.train.validate --data-dir DIR --model hornet_tiny_7x7 --pretrained --split val

Any dataset timm's ``create_dataset`` reads works: an ImageFolder (the ``--split`` sub-folder of
``--data-dir``, or ``--split .`` for class folders directly in it; a missing split is an error, never
the whole folder), a tar of one, or ``--dataset torch/cifar10``, ``hfds/...``, ``wds/...``. Images
are resized, center-cropped and normalized as the model's pretrained cfg says (``input_size``,
``crop_pct``, ``interpolation``, ``mean``, ``std``); a training checkpoint's saved arguments replace
that (the input size and preprocessing it was trained and evaluated at, and its ``--model-kwargs``),
and ``--img-size``, ``--crop-pct`` and friends override both. A class count of the data that differs
from the model's outputs is an error; unreadable images are left out, warned about and counted in
the final line. Runs under ``torchrun`` too: each process scores its share and the counts are summed
(the padding that evens the shares out is not counted).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from recurzoo.checkpoint import atomic_write
from recurzoo.train.arguments import (
    UsageError,
    add_choice,
    add_loader_arguments,
    add_model_arguments,
    add_switch,
    model_option,
    parse_args_with_config,
    run_cli,
    training_parser,
    user_option,
)
from recurzoo.train.data import collate_readable, create_image_dataset
from recurzoo.train.distributed import DistributedContext, run_distributed
from recurzoo.train.run import progress_bar, setup_logging

__all__ = [
    "build_parser",
    "main",
    "evaluate",
    "read_weights",
    "checkpoint_num_classes",
    "load_weights",
    "load_initial_checkpoint",
    "create_eval_loader",
    "autocast",
    "read_weights_and_args",
    "create_named_model",
    "apply_saved_arguments",
    "check_dataset_classes",
    "dataset_num_classes",
]


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("recurzoo.train.validate", __doc__)
    group = add_model_arguments(
        parser,
        "timm model name, e.g. sret_tiny",
        required=True,
        kwargs_help="extra timm.create_model arguments, e.g. dims='(16,32,64,128)'",
        checkpoint=("--checkpoint", "--initial-checkpoint"),
        checkpoint_help="weights: a training checkpoint, a state dict, safetensors or an official file",
        pretrained_help="timm's pretrained weights of --model",
    )
    add_switch(group, "--use-ema", True, "take the EMA weights when the checkpoint has them")
    group.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs (default: the checkpoint's, else the dataset's class count)",
    )
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="dataset root")
    group.add_argument("--dataset", default="", help="timm dataset type ('' = folder/tar, torch/..., hfds/...)")
    group.add_argument(
        "--split",
        default="validation",
        help="split: a sub-folder of --data-dir (val/, eval/ are found for 'validation'); '.' for --data-dir itself",
    )
    group.add_argument("--class-map", default="", help="file mapping class folder names to indices")
    add_loader_arguments(group, batch_size=64)
    add_preprocessing_arguments(group)
    group = parser.add_argument_group("run")
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    add_choice(group, "--amp-dtype", ("bfloat16", "float16"), "autocast's dtype")
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    group.add_argument("--results-file", default=None, help="also write the results as JSON here")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_preprocessing_arguments(group: Any) -> None:
    """timm's preprocessing overrides (all default to the model's pretrained cfg)."""
    group.add_argument("--img-size", type=int, default=None, help="input image size")
    group.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="full input size (overrides --img-size)",
    )
    group.add_argument("--crop-pct", type=float, default=None, help="eval center-crop fraction")
    group.add_argument("--crop-mode", default=None, help="eval crop mode: center, squash or border")
    group.add_argument("--interpolation", default="", help="resize interpolation (bilinear, bicubic, ...)")
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalization mean")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalization std")


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    """``torch.autocast`` on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def read_weights(path: str, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict in ``path``, read by :func:`recurzoo.checkpoint.read_state_dict` (safetensors or
    ``weights_only=True``: a file that would run code is refused): a training checkpoint (its EMA weights
    when ``use_ema`` and present), a bare state dict or a safetensors file; DDP prefixes removed."""
    from timm.models import clean_state_dict

    from recurzoo.checkpoint import read_state_dict

    return clean_state_dict(read_state_dict(path, use_ema=use_ema))


def _classifier_prefixes(pretrained_cfg: Dict[str, Any]) -> tuple:
    names = pretrained_cfg.get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor], model_name: str) -> Optional[int]:
    """The class count of the classifier in ``state_dict`` (timm layout), or None if it has none."""
    from timm.models import get_pretrained_cfg_value

    for prefix in _classifier_prefixes(dict(classifier=get_pretrained_cfg_value(model_name, "classifier"))):
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "the checkpoint") -> List[str]:
    """Load ``state_dict`` into ``model``, leaving a classifier whose class count differs at its fresh init.

    A state dict in a zoo family's official layout passes through that family's
    ``checkpoint_filter_fn`` first (which also resizes position embeddings and global filters).
    Every other tensor must fit: a missing or unexpected backbone key or a shape mismatch is one
    ``ValueError`` listing them all. Returns the classifier keys left at their fresh init.
    """
    import sys

    from recurzoo.checkpoint import CheckpointError, Mismatch, compare_state_dict

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    prefixes = _classifier_prefixes(model.pretrained_cfg)

    def is_classifier(key: str) -> bool:
        return bool(prefixes) and key.startswith(prefixes)

    state_dict = {
        key: value
        for key, value in state_dict.items()
        if not (is_classifier(key) and (key not in own or own[key].shape != value.shape))
    }
    mismatch = compare_state_dict(model, state_dict)
    missing = [key for key in mismatch.missing if not is_classifier(key)]
    if missing or mismatch.unexpected or mismatch.shapes:
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise CheckpointError(f"{source}: " + Mismatch(missing, mismatch.unexpected, mismatch.shapes).describe(name))
    model.load_state_dict(state_dict, strict=False)
    return [key for key in own if is_classifier(key) and key not in state_dict]


def create_named_model(name: str, pretrained: bool, flag: str, local_flag: str, **kwargs: Any) -> nn.Module:
    """``recurzoo.create_model(name, pretrained=pretrained, **kwargs)`` for a script's ``flag`` (``--model``,
    ``--teacher``): an unknown name is an ``UnknownModelError`` and pretrained weights that cannot be had
    offline a ``CheckpointError`` within seconds (timm's cache file to fill), both one line naming
    ``flag`` and the option that takes a local file instead (``local_flag``)."""
    import recurzoo
    from recurzoo.checkpoint import CheckpointError
    from recurzoo.registry import UnknownModelError

    try:
        with model_option(f"{flag} {name} (with --model-kwargs or --teacher-kwargs)"):
            return recurzoo.create_model(name, pretrained=pretrained, **kwargs)
    except UnknownModelError as error:
        raise UnknownModelError(f"{flag}: {error}") from None
    except CheckpointError as error:
        if not pretrained:
            raise
        text = str(error).removeprefix(f"{name}: ")
        raise CheckpointError(f"{flag} {name}: {text}; or give its weights with {local_flag} FILE") from None


def load_initial_checkpoint(model: nn.Module, path: str, use_ema: bool = True) -> List[str]:
    """:func:`read_weights` then :func:`load_weights`: fine-tuning from a checkpoint to any class count."""
    return load_weights(model, read_weights(path, use_ema), source=path)


def create_eval_loader(
    dataset: Any, data_config: Dict[str, Any], batch_size: int, workers: int, context: DistributedContext
):
    """timm's eval loader (resize, center crop, normalize) over ``dataset``, sharded across ranks."""
    from timm.data import create_loader

    return create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=batch_size,
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
        num_workers=workers,
        distributed=context.distributed,
        pin_memory=context.device.type == "cuda",
        device=context.device,
        use_prefetcher=False,
        persistent_workers=False,
        collate_fn=collate_readable,  # unreadable images left out, not scored twice
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    context: DistributedContext,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    progress: bool = False,
    desc: str = "eval",
) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``, summed over ranks.

    Top-5 becomes top-k with k = the class count when there are fewer than five classes.
    """
    was_training = model.training
    model.eval()
    valid = getattr(getattr(loader, "sampler", None), "num_valid_samples", None)
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    seen = 0
    for batch in progress_bar(loader, total=len(loader), desc=desc, enabled=progress):
        if batch is None:  # every image of the batch unreadable (counted by the dataset)
            continue
        images, targets = batch
        images = images.to(context.device, non_blocking=True)
        targets = targets.to(context.device, non_blocking=True)
        if valid is not None:  # drop the samples that only pad this rank's share
            keep = max(0, min(len(targets), valid - seen))
            seen += len(targets)
            images, targets = images[:keep], targets[:keep]
            if keep == 0:
                continue
        with autocast(context.device, amp, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        ranked = logits.topk(k, dim=-1).indices
        hits = ranked.eq(targets[:, None])
        sums += torch.tensor(
            [
                nn.functional.cross_entropy(logits, targets, reduction="sum").item(),
                hits[:, 0].sum().item(),
                hits.any(dim=-1).sum().item(),
                len(targets),
            ],
            dtype=torch.float64,
        )
    if context.distributed:
        reduced = sums.to(context.device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    model.train(was_training)
    count = max(1.0, sums[3].item())
    return OrderedDict(
        loss=sums[0].item() / count,
        top1=100.0 * sums[1].item() / count,
        top5=100.0 * sums[2].item() / count,
        images=int(sums[3].item()),
    )


def resolve_eval_data_config(args: argparse.Namespace, model: nn.Module, verbose: bool = False) -> Dict[str, Any]:
    """The model's pretrained-cfg preprocessing with the command line's overrides."""
    from timm.data import resolve_data_config

    return resolve_data_config(vars(args), model=model, verbose=verbose)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Score the model; returns ``{'top1', 'top5', 'loss', 'images', ...}``."""
    args = parse_args_with_config(build_parser(), argv)
    return run_distributed(_run, args)


def _run(args: argparse.Namespace, context: DistributedContext) -> Dict[str, Any]:

    import recurzoo  # noqa: F401  (registers the zoo with timm)

    logger = setup_logging(None, context.is_main, name="recurzoo.validate")
    dataset = create_image_dataset(
        args.dataset,
        args.data_dir,
        args.split,
        skip_unreadable="evaluation set",
        evaluation=True,
        class_map=args.class_map or None,
        batch_size=args.batch_size,
    )
    weights, saved = (None, {})
    if args.checkpoint:
        weights, saved = read_weights_and_args(args.checkpoint, args.use_ema)
        taken = apply_saved_arguments(args, saved)
        if taken and context.is_main:
            logger.info(
                f"--checkpoint {args.checkpoint}: preprocessing and model arguments of its training run "
                f"({', '.join(f'{key}={value}' for key, value in taken.items())}); flags override them"
            )
    num_classes = (
        args.num_classes
        or (weights is not None and checkpoint_num_classes(weights, args.model))
        or dataset_num_classes(dataset)
    )
    kwargs = dict(args.model_kwargs)
    if num_classes:
        kwargs["num_classes"] = num_classes
    with model_option(f"--model {args.model} with --model-kwargs"):
        model = recurzoo.create_model(args.model, pretrained=args.pretrained, **kwargs)
    check_dataset_classes(
        dataset, getattr(model, "num_classes", None), f"--data-dir {args.data_dir} --split {args.split}"
    )
    if weights is not None:
        load_weights(model, weights, source=args.checkpoint)
    elif not args.pretrained:
        logger.warning(f"no --checkpoint and no --pretrained: {args.model} has random weights, its scores say nothing")
    model.to(context.device)
    data_config = resolve_eval_data_config(args, model, verbose=context.is_main)
    with user_option(
        "--interpolation/--crop-mode/--mean/--std/--img-size", KeyError, ValueError, AssertionError, TypeError
    ):
        loader = create_eval_loader(dataset, data_config, args.batch_size, args.workers, context)
    metrics = evaluate(
        model,
        loader,
        context,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        progress=context.is_main and not args.no_progress,
    )
    skipper = getattr(dataset, "skip_unreadable", None)
    skipped = skipper.count if skipper is not None else 0
    if context.distributed:
        total = torch.tensor(skipped, device=context.device)
        dist.all_reduce(total)
        skipped = int(total.item())
    if metrics["images"] == 0:
        raise UsageError(f"--data-dir {args.data_dir} --split {args.split}: no readable image, nothing was scored")
    results = dict(
        model=args.model,
        checkpoint=args.checkpoint,
        split=args.split,
        num_classes=num_classes,
        input_size=list(data_config["input_size"]),
        crop_pct=data_config["crop_pct"],
        unreadable=skipped,
        **metrics,
    )
    if context.is_main:
        logger.info(
            f"{args.model}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
            f"loss {metrics['loss']:.4f}  ({metrics['images']} images"
            + (f"; {skipped} unreadable images left out)" if skipped else ")")
        )
        print(json.dumps(results))
        if args.results_file:
            text = json.dumps(results, indent=2)
            atomic_write(args.results_file, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    return results


# The options of validate that a training checkpoint's saved arguments fill in when not given.
PREPROCESSING_ARGUMENTS = ("img_size", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def read_weights_and_args(path: str, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """:func:`read_weights` and the training arguments the checkpoint saved (``{}`` when it has none)."""
    from timm.models import clean_state_dict

    from recurzoo.checkpoint import read_checkpoint, unwrap_state_dict

    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    weights = clean_state_dict(unwrap_state_dict(checkpoint, source=str(path), use_ema=use_ema))
    return weights, (dict(saved) if isinstance(saved, dict) else {})


def apply_saved_arguments(args: argparse.Namespace, saved: Dict[str, Any]) -> Dict[str, Any]:
    """Fill the preprocessing options not given on the command line (still at their empty default) from a
    training run's saved arguments, and ``--model-kwargs`` too when the run trained the same ``--model``;
    returns what was taken. The model is then scored at the input size and normalisation it was trained at."""
    taken = {}
    for key in PREPROCESSING_ARGUMENTS:
        if getattr(args, key, None) in (None, "") and saved.get(key) not in (None, ""):
            taken[key] = saved[key]
    if args.input_size is not None:  # the full size given here wins over a saved --img-size
        taken.pop("img_size", None)
    if not args.model_kwargs and saved.get("model") == args.model and isinstance(saved.get("model_kwargs"), dict):
        if saved["model_kwargs"]:
            taken["model_kwargs"] = dict(saved["model_kwargs"])
    for key, value in taken.items():
        setattr(args, key, value)
    return taken


def check_dataset_classes(dataset: Any, num_classes: Optional[int], what: str) -> None:
    """Raise unless the dataset's class folders (or ``--class-map``) give ``num_classes`` classes: labels of
    another count would be scored against the wrong outputs, or fall outside them."""
    found = dataset_num_classes(dataset)
    if found is not None and num_classes is not None and found != num_classes:
        raise UsageError(
            f"{what}: {found} classes in the data, the model has {num_classes} outputs; give the matching "
            f"--num-classes, or a --class-map mapping the class folders to the model's outputs"
        )


def dataset_num_classes(dataset: Any) -> Optional[int]:
    """The class count a folder/tar dataset found, when its reader knows it."""
    reader = getattr(dataset, "reader", None) or getattr(dataset, "parser", None)
    class_to_idx = getattr(reader, "class_to_idx", None)
    return len(class_to_idx) if class_to_idx else None


if __name__ == "__main__":
    run_cli(main)
