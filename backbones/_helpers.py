"""Small helpers shared by the model families."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def model_name(model: nn.Module) -> str:
    """The registered name of a model built by timm, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _skip_checks() -> bool:
    # TorchScript cannot compile the message formatting; a scripted model was checked eagerly first.
    return torch.jit.is_scripting()


def check_image_input(
        x: torch.Tensor,
        name: str,
        in_chans: int,
        min_size: int = 1,
        multiple_of: Optional[int] = None,
) -> None:
    """Raise a ``ValueError`` naming the model when ``x`` is not an image batch it can take.

    Args:
        x: the input batch, expected ``(B, in_chans, H, W)`` floating point.
        name: the model's name, for the message.
        in_chans: the channel count the model expects.
        min_size: the smallest height and width the model accepts (its total stride).
        multiple_of: when set, height and width must be multiples of it.
    """
    if _skip_checks():
        return
    shape = tuple(int(size) for size in x.shape)
    if x.ndim != 4:
        raise ValueError(f"{name}: expects a 4-D image batch (B, {in_chans}, H, W), received shape {shape}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name}: expects {in_chans} input channels (B, {in_chans}, H, W), received shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expects a floating-point image batch, received dtype {x.dtype} with shape {shape}")
    height, width = shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{name}: expects height and width of at least {min_size} (its total stride), received shape {shape}")
    if multiple_of and (height % multiple_of or width % multiple_of):
        raise ValueError(f"{name}: expects height and width that are multiples of {multiple_of}, received shape {shape}")
