"""Reading and writing model weights safely.

Every checkpoint this package reads goes through :func:`read_state_dict`: safetensors files, or
PyTorch files loaded with ``torch.load(..., weights_only=True)``, which refuses any pickle that would
run code. Failures are ``ValueError`` messages that name the file and say what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["read_checkpoint", "read_state_dict", "load_weights", "save_weights", "compare_state_dict", "Mismatch"]

PathLike = Union[str, os.PathLike]
_EMA_KEYS = ("state_dict_ema", "model_ema", "params_ema")
_WRAPPER_KEYS = _EMA_KEYS + ("state_dict", "model", "params")


def _unwrap(checkpoint: Any, path: PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensor mapping inside a training checkpoint's wrapper (EMA weights first, as timm does)."""
    if isinstance(checkpoint, Mapping):
        for key in _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS[len(_EMA_KEYS) :]:
            if isinstance(checkpoint.get(key), Mapping):
                return _unwrap(checkpoint[key], path, use_ema)
        tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError(f"{path}: holds no tensors (expected a state_dict, or one under {'/'.join(_WRAPPER_KEYS)})")


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Everything stored in a checkpoint file (tensors and plain values), without running any code.

    A ``.safetensors`` file gives its tensors; anything else is read with
    ``torch.load(weights_only=True)`` (training checkpoints with optimizer state, step counters, ...).
    A file that would run code, or that is truncated or corrupt, raises a one-line ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else "cpu"
        try:
            return load_file(str(path), device=device)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path}: refused to load: the file contains pickled objects that would run code ({first_line}). "
            "Only tensors are accepted: re-save it as torch.save(model.state_dict()) or as safetensors "
            "in an environment you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None


def read_state_dict(path: PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, without running any code stored in it.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, unwrapping ``model``/``state_dict``/``params`` entries (their EMA
    counterparts first, unless ``use_ema`` is False).
    """
    return _unwrap(read_checkpoint(path), path, use_ema)


class Mismatch(NamedTuple):
    """How a state dict differs from a model's: key names and (key, checkpoint shape, model shape)."""

    missing: List[str]
    unexpected: List[str]
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]

    def describe(self, target: str) -> str:
        """One readable paragraph ('' when nothing differs)."""
        parts = []
        shapes = [f"{key} {ours} vs {theirs}" for key, ours, theirs in self.shapes]
        for label, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches (checkpoint vs model)", shapes),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        if not parts:
            return ""
        return f"checkpoint does not fit {target} (is it for another architecture or size?): " + "; ".join(parts)


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mismatch:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``model``."""
    expected = model.state_dict()
    return Mismatch(
        missing=sorted(set(expected) - set(state_dict)),
        unexpected=sorted(set(state_dict) - set(expected)),
        shapes=[
            (key, tuple(state_dict[key].shape), tuple(expected[key].shape))
            for key in sorted(set(expected) & set(state_dict))
            if state_dict[key].shape != expected[key].shape
        ],
    )


def _family_filter(model: nn.Module) -> Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict]]:
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_weights(
    model: nn.Module,
    path: PathLike,
    strict: bool = True,
    filter_fn: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
) -> nn.Module:
    """Load a checkpoint file into ``model``, converting official layouts with the family's filter.

    ``filter_fn`` defaults to the ``checkpoint_filter_fn`` of the module that defines the model's
    class (a no-op for checkpoints already in this package's layout). A shape mismatch, and with
    ``strict`` any missing or unexpected key, raises one ``ValueError`` that lists them all.
    """
    state_dict = read_state_dict(path)
    filter_fn = filter_fn or _family_filter(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    mismatch = compare_state_dict(model, state_dict)
    if mismatch.shapes or (strict and (mismatch.missing or mismatch.unexpected)):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise ValueError(f"{path}: {mismatch.describe(name)}")
    model.load_state_dict(state_dict, strict=False)
    return model


def save_weights(model: nn.Module, path: PathLike, config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights as safetensors and its configuration beside them (``.json``).

    The configuration records the registered architecture, its pretrained cfg and ``config``.
    Returns the path of the weights.
    """
    from safetensors.torch import save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_model(model, str(temporary))
    os.replace(temporary, path)
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    record = dict(
        architecture=pretrained_cfg.get("architecture", type(model).__name__),
        pretrained_cfg=pretrained_cfg,
        config=dict(config or {}),
    )
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str, sort_keys=True) + "\n")
    return path
