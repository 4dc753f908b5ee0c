"""Build this package's models from the constructor arguments of the authors' own code.

Each family registers, for every official class it reproduces, a function that turns that class's
keyword arguments into the equivalent model of this package, and the checkpoint filter that maps
the official ``state_dict`` onto it. ``build`` is what the parity tests and checkpoint converters use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

__all__ = ["OfficialConstructor", "register_official", "build", "run", "registered_constructors"]


def _forward_image(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"])


@dataclass(frozen=True)
class OfficialConstructor:
    """How one official class maps onto this package."""

    family: str
    build_fn: Callable[..., nn.Module]
    checkpoint_filter_fn: Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]
    forward_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any] = _forward_image


_REGISTRY: Dict[str, OfficialConstructor] = {}


def register_official(
    constructor: str,
    family: str,
    checkpoint_filter_fn: Callable,
    forward_fn: Callable = _forward_image,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(**official_kwargs) -> model`` for the official class ``constructor``."""

    def decorator(build_fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if constructor in _REGISTRY:
            raise ValueError(f"official constructor {constructor!r} is registered twice")
        _REGISTRY[constructor] = OfficialConstructor(family, build_fn, checkpoint_filter_fn, forward_fn)
        return build_fn

    return decorator


def registered_constructors() -> Dict[str, OfficialConstructor]:
    """The official classes this package can reproduce, by their qualified names."""
    return dict(_REGISTRY)


def _lookup(constructor: str) -> OfficialConstructor:
    if constructor not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"no model of recurzoo reproduces the official constructor {constructor!r} (known: {known})")
    return _REGISTRY[constructor]


def build(
    constructor: str,
    kwargs: Mapping[str, Any],
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> nn.Module:
    """Build the model that ``constructor(**kwargs)`` of the official code describes.

    When ``state_dict`` (official key layout) is given, it is converted by the family's
    ``checkpoint_filter_fn`` and loaded strictly.
    """
    entry = _lookup(constructor)
    model = entry.build_fn(**dict(kwargs))
    if state_dict is not None:
        converted = entry.checkpoint_filter_fn(dict(state_dict), model)
        model.load_state_dict(converted, strict=True)
    return model


def run(constructor: str, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> Any:
    """Call ``model`` on inputs named as the official model's forward names them."""
    return _lookup(constructor).forward_fn(model, inputs)
