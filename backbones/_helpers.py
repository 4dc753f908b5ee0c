"""Small helpers shared by the model families."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

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


def _weights_url(pretrained_cfg: Any) -> Optional[str]:
    url = getattr(pretrained_cfg, "url", None)
    return url[0] if isinstance(url, (tuple, list)) else url


def _reachable(url: str, timeout: float) -> bool:
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` that fails fast, with instructions, when weights cannot be fetched.

    With ``pretrained=True`` and neither a local ``file`` in the pretrained cfg nor a cached download,
    the weights' host is probed for a few seconds first; when it is out of reach (no network, as on
    air-gapped machines) a ``RuntimeError`` says how to load a file downloaded by hand instead of
    letting the download hang or fail deep inside.
    """
    from timm.models import build_model_with_cfg
    from timm.models._builder import resolve_pretrained_cfg
    from timm.models._hub import get_cache_dir

    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        url = _weights_url(cfg)
        cached_name = cfg.url[1] if isinstance(cfg.url, (tuple, list)) else None
        cached = cached_name and os.path.exists(os.path.join(get_cache_dir(), cached_name))
        if url and not (cfg.file or cfg.state_dict or cached) and not _reachable(url, timeout=5.0):
            raise RuntimeError(
                f"{variant}: cannot download the pretrained weights ({url} is out of reach). Download the file "
                f"by hand and load it with timm.create_model('{variant}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth')).")
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
