"""timm's model contract on the smallest configuration of every family and task model of the zoo.

The fast part of timm's own generic model tests (``make timm-suite`` runs the whole of them on the
full-size models): factory ``device``/``dtype``, a ``meta`` build made usable by ``to_empty`` and
``init_weights``, and torch.fx tracing (timm's ``FeatureGraphNet`` and torchvision's feature
extractor, forward and backward). Families still being brought to the contract are strict xfails,
so that they fail loudly once they pass.
"""

from __future__ import annotations

import pytest
import torch
from _contract import (
    assert_factory_device_and_dtype,
    assert_fx_features_trace,
    assert_meta_init_gives_a_working_model,
    assert_torchvision_feature_extractor,
    assert_unknown_argument_raises,
)
from _reduced import REDUCED

import recurzoo
from recurzoo.registry import model_family, model_task


def _not_yet(family: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(
        strict=True, reason=f"{family}: factory device/dtype, meta init and fx are being brought to timm's contract"
    )


# family -> (smallest variant, test-width overrides, input side, marks)
CLASSIFIERS = {
    "hornet": ("hornet_tiny_gf", REDUCED["hornet"], 64, ()),  # the GF variant has both spatial mixers
    "recurrent_vit": (
        "vit_recurrent_tiny_patch16_224",
        dict(REDUCED["recurrent_vit"], depth_conditioning=True, lora_rank=2),
        32,
        (),
    ),
    "sret": ("sret_tiny", REDUCED["sret"], 224, (_not_yet("SReT"),)),
    "rgt": ("rgt_small", REDUCED["rgt"], 64, (_not_yet("RGT"),)),
}
# task -> (smallest model, test-width overrides, input side, marks)
TASK_MODELS = {
    "cod": (
        "msrnet_hornet_tiny_7x7",
        dict(REDUCED["camouflage"], backbone_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))),
        32,
        (),
    ),
    "sr": ("rgt_small_x2", REDUCED["rgt"], 32, (_not_yet("RGT super-resolution"),)),
}


def _cases(table):
    return [pytest.param(name, kwargs, side, id=name, marks=marks) for name, kwargs, side, marks in table.values()]


def test_every_family_and_task_has_a_case():
    classification = recurzoo.list_models(task="classification")
    assert {model_family(name) for name in classification} == set(CLASSIFIERS)
    assert {model_task(name) for name in recurzoo.list_models()} - {"classification"} == set(TASK_MODELS)
    for family, (name, *_) in CLASSIFIERS.items():
        assert model_family(name) == family
    for task, (name, *_) in TASK_MODELS.items():
        assert model_task(name) == task


@pytest.mark.parametrize("name,kwargs,side", _cases(CLASSIFIERS) + _cases(TASK_MODELS))
def test_factory_device_dtype_and_meta_init(name, kwargs, side):
    assert_factory_device_and_dtype(name, device="meta", dtype=torch.float64, **kwargs)
    assert_unknown_argument_raises(name, **kwargs)
    assert_meta_init_gives_a_working_model(name, (3, side, side), **kwargs)


@pytest.mark.parametrize("name,kwargs,side", _cases(CLASSIFIERS))
def test_fx_traces_forward_and_backward(name, kwargs, side):
    x = torch.randn(2, 3, side, side)
    assert_fx_features_trace(name, x, **kwargs)
    assert_torchvision_feature_extractor(recurzoo.create_model(name, num_classes=3, **kwargs), x)
