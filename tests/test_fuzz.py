"""Fuzzing the input checks: every family gives the right output shape or its documented ValueError.

Hypothesis draws batches of 1-3 images with sides of 1-96 pixels (biased towards each model's limits),
and in about half of the examples one more fault: an unbatched 3-D or a 5-D tensor, an empty batch,
1, 2 or 4 channels, an integer dtype, or float64 (numpy's default) for float32 weights. For each model the
expectation is computed from its documented input constraints (``CONSTRAINTS``): either the output
has the documented shape, or a ValueError names the model and the received shape. Any other exception fails the test.
Examples are derandomized (the same on every run) and few, so that the file stays fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recurzoo  # noqa: F401  (registers the models)

sys.path.insert(0, os.path.dirname(__file__))
from _reduced import REDUCED  # noqa: E402

NUM_CLASSES = 5
MAX_SIDE = 96


@dataclass(frozen=True)
class Constraint:
    """What a model documents about its input, and what it returns.

    ``output`` is ``'classifier'`` (``(B, NUM_CLASSES)`` logits), ``'sr'`` (``(B, 3, scale*H, scale*W)``
    images) or ``'cod'`` (``(B, 1, H, W)`` mask logits).
    """

    family: str
    min_size: int
    multiple_of: Optional[int] = None
    output: str = "classifier"
    scale: int = 1


# Every model takes float (B >= 1, 3, H, W) batches (check_image_input) and, besides:
CONSTRAINTS = {
    # HorNet, SReT: height and width of at least the total stride, 32 (any size above it).
    "hornet_tiny_7x7": Constraint("hornet", min_size=32),
    "hornet_tiny_gf": Constraint("hornet", min_size=32),
    "sret_tiny": Constraint("sret", min_size=32),
    "sret_tiny_noslice": Constraint("sret", min_size=32),
    # Recurrent ViT (dynamic_img_size): sides that are multiples of the 16-pixel patch.
    "vit_recurrent_tiny_patch16_224": Constraint("recurrent_vit", min_size=16, multiple_of=16),
    # RGT super-resolution: any size, returned twice as large.
    "rgt_small_x2": Constraint("rgt", min_size=1, output="sr", scale=2),
    # MSRNet: the base size at least the backbone's stride over the smallest scale (32 / 1.0).
    "msrnet_hornet_tiny_7x7": Constraint("camouflage", min_size=32, output="cod"),
}
# Examples per model: the SR model costs up to 1 s per large batch, the others a few tens of ms.
MAX_EXAMPLES = {"rgt_small_x2": 40}
DEFAULT_EXAMPLES = 100


def _build(name: str) -> torch.nn.Module:
    constraint = CONSTRAINTS[name]
    kwargs = dict(REDUCED[constraint.family])
    if constraint.output == "classifier":
        kwargs["num_classes"] = NUM_CLASSES
    if constraint.family == "camouflage":
        kwargs["backbone_kwargs"] = REDUCED["hornet"]
    return recurzoo.create_model(name, **kwargs).eval()


_MODELS = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = _build(name)
    return _MODELS[name]


def _violation(constraint: Constraint, shape: Tuple[int, ...], dtype: torch.dtype) -> Optional[str]:
    """The documented constraint that an input of ``shape`` and ``dtype`` breaks, or None."""
    if len(shape) != 4:
        return "rank"
    batch, channels, height, width = shape
    if batch < 1:
        return "empty batch"
    if channels != 3:
        return "channels"
    if not dtype.is_floating_point:
        return "dtype"
    if dtype != torch.float32:
        return "float dtype other than the weights'"
    if min(height, width) < constraint.min_size:
        return "min size"
    if constraint.multiple_of and (height % constraint.multiple_of or width % constraint.multiple_of):
        return "multiple"
    return None


def _expected_shape(constraint: Constraint, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    batch, _, height, width = shape
    if constraint.output == "sr":
        return (batch, 3, height * constraint.scale, width * constraint.scale)
    if constraint.output == "cod":
        return (batch, 1, height, width)
    return (batch, NUM_CLASSES)


# The faults drawn, one at a time, into about half of the examples.
FAULTS = ("unbatched", "5-D", "empty batch", "channels", "integer dtype", "float64")


def _sides(constraint: Constraint, allowed: bool) -> st.SearchStrategy:
    """Sides the model accepts, or any side from 1 to ``MAX_SIDE`` with its limits (+-1) drawn often."""
    step = constraint.multiple_of or 1
    if allowed:
        return st.integers(-(-constraint.min_size // step), MAX_SIDE // step).map(lambda k: k * step)
    limits = {1, 2, constraint.min_size - 1, constraint.min_size, constraint.min_size + 1, MAX_SIDE}
    limits |= {step * k + d for k in (1, 2, 3) for d in (-1, 0, 1)}
    return st.one_of(st.integers(1, MAX_SIDE), st.sampled_from(sorted(s for s in limits if 1 <= s <= MAX_SIDE)))


@st.composite
def image_inputs(draw, constraint: Constraint):
    """A shape and dtype: sides the model accepts or any sides, and at most one other fault."""
    sides = _sides(constraint, allowed=draw(st.booleans()))
    height, width = draw(sides), draw(sides)
    fault = draw(st.sampled_from(FAULTS)) if draw(st.booleans()) else None
    batch = 0 if fault == "empty batch" else draw(st.integers(1, 3))
    channels = draw(st.sampled_from([1, 2, 4])) if fault == "channels" else 3
    dtype = draw(st.sampled_from([torch.uint8, torch.int64])) if fault == "integer dtype" else torch.float32
    dtype = torch.float64 if fault == "float64" else dtype
    if fault == "unbatched":
        return (channels, height, width), dtype
    if fault == "5-D":  # a clip, or an extra axis
        return (batch, draw(st.integers(1, 2)), channels, height, width), dtype
    return (batch, channels, height, width), dtype


def _make(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    images = torch.rand(shape)
    return (images * 255).to(dtype) if not dtype.is_floating_point else images.to(dtype)


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_input_gives_output_shape_or_documented_value_error(name):
    constraint = CONSTRAINTS[name]
    model = _model(name)

    @settings(
        max_examples=MAX_EXAMPLES.get(name, DEFAULT_EXAMPLES),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(image_inputs(constraint))
    def check(drawn):
        shape, dtype = drawn
        x = _make(shape, dtype)
        violation = _violation(constraint, shape, dtype)
        if violation is None:
            with torch.no_grad():
                out = model(x)
            assert tuple(out.shape) == _expected_shape(constraint, shape)
            assert torch.isfinite(out).all()
        else:
            with pytest.raises(ValueError) as error:
                with torch.no_grad():
                    model(x)
            message = str(error.value)
            assert message.startswith(f"{name}: "), f"the message does not name the model: {message}"
            assert str(shape) in message, f"the message does not show the received shape ({violation}): {message}"

    check()
