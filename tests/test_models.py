"""Every registered model honours timm's interface at a small input and a reduced width.

Parametrized over ``recurzoo.list_models()``, so a new family is covered by registering it. Each
variant is built through its own registered builder (so its architecture choices, such as the
HorNet global filters, are exercised) with the width and depth overrides of ``REDUCED`` below;
full-size models are counted in the family tests, not run here.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from _contract import assert_factory_device_and_dtype, assert_parameter_groups_match, assert_unknown_argument_raises
from _reduced import COD_CASES, REDUCED  # per-family test widths, shared with other test files

import recurzoo

SMALL_SIDE = 64


def _family(name: str) -> str:
    return recurzoo.model_family(name)


def _create(name: str, **kwargs) -> torch.nn.Module:
    return recurzoo.create_model(name, **REDUCED[_family(name)], **kwargs)


def _is_backbone(name: str) -> bool:
    """A classifier backbone with timm's interface (task models, whose outputs are images or masks,
    have their own tests)."""
    with torch.device("meta"):
        model = _create(name)
    return all(callable(getattr(model, method, None)) for method in ("reset_classifier", "forward_intermediates"))


ALL_MODELS = recurzoo.list_models()
MODELS = [name for name in ALL_MODELS if _is_backbone(name)]


# The variants whose construction differs within each family, task models included, with their test-size
# arguments: HorNet's two mixers, SReT with and without slices, RGT's classifier and its upscalers, the
# recurrent ViT with every step part (depth conditioning, per-step LoRA), MSRNet over three backbone kinds.
CONTRACT = {
    **{name: REDUCED["hornet"] for name in ("hornet_tiny_7x7", "hornet_tiny_gf")},
    **{name: REDUCED["sret"] for name in ("sret_tiny", "sret_tiny_noslice")},
    "rgt_small": dict(REDUCED["rgt"], num_classes=3),
    **{name: REDUCED["rgt"] for name in ("rgt_x2", "rgt_small_x2", "rgt_small_x3", "rgt_small_x4")},
    "vit_recurrent_tiny_patch16_224": dict(REDUCED["recurrent_vit"], depth_conditioning=True, lora_rank=2),
    **COD_CASES,
}


@functools.lru_cache(maxsize=2)
def _shared_model(name: str) -> torch.nn.Module:
    """One instance per model for the tests that only read it (building large models is slow)."""
    return _create(name).eval()


def _fresh_model(name: str) -> torch.nn.Module:
    """A private copy for tests that change the model."""
    return copy.deepcopy(_shared_model(name))


def _small_input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    side = max(SMALL_SIDE, model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 1)
    return torch.randn(batch, getattr(model, "in_chans", 3), side, side)


def test_registry_lists_the_zoo():
    assert "hornet_tiny_7x7" in MODELS and len(MODELS) >= 10
    assert all(recurzoo.registry.is_model(name) for name in ALL_MODELS)
    assert set(recurzoo.list_models(task="sr")) == {f"rgt{size}_x{s}" for size in ("", "_small") for s in (2, 3, 4)}
    assert not any(timm.is_model(name) for name in recurzoo.list_models(task="sr") + recurzoo.list_models(task="cod"))


def test_every_family_has_a_reduced_test_size():
    families = set(recurzoo.registry.list_families())
    assert families <= set(REDUCED), f"add REDUCED entries for {sorted(families - set(REDUCED))}"


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward_at_small_input(name):
    model = _fresh_model(name).train()
    model.reset_classifier(7)
    x = _small_input(model, batch=1)
    out = model(x)
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some parameter is not reached by the loss"
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", MODELS)
def test_features_only_matches_feature_info(name):
    model = _create(name, features_only=True).eval()
    x = _small_input(model, batch=1)
    with torch.no_grad():
        features = model(x)
    assert len(features) == len(model.feature_info.reduction())
    for feature, channels, reduction in zip(features, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape[1] == channels
        assert feature.shape[-1] == x.shape[-1] // reduction


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_agree_with_forward_features(name):
    model = _shared_model(name)
    x = _small_input(model, batch=1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(intermediates) == len(model.feature_info)
    torch.testing.assert_close(final, features)
    assert len(only) == 1
    torch.testing.assert_close(only[0], intermediates[-1])


@pytest.mark.parametrize("name", MODELS)
def test_prune_intermediate_layers_keeps_requested_outputs(name):
    model = _fresh_model(name)
    x = _small_input(model, batch=1)
    with torch.no_grad():
        reference = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices=[0])
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    torch.testing.assert_close(pruned[0], reference[0])


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_to_zero_gives_pooled_features(name):
    model = _fresh_model(name)
    model.reset_classifier(0)
    x = _small_input(model, batch=1)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_features)
    assert model.get_classifier() is not None


@pytest.mark.parametrize("name", MODELS)
def test_wrong_channel_count_raises_value_error_naming_model(name):
    model = _shared_model(name)
    x = _small_input(model, batch=1)
    with pytest.raises(ValueError, match=name):
        model(x[:, :1])


@pytest.mark.parametrize("name", MODELS)
def test_input_smaller_than_total_stride_raises_value_error(name):
    model = _shared_model(name)
    stride = model.feature_info[-1]["reduction"]
    if stride == 1:
        pytest.skip(f"{name} has stride 1: every size is large enough")
    x = torch.randn(1, model.in_chans, stride - 1, stride - 1)
    with pytest.raises(ValueError, match=rf"{name}.*at least {stride}"):
        model(x)


# ------------------------------------------------------------------ timm 1.0.31's factory contract


@pytest.mark.parametrize("name", CONTRACT)
@pytest.mark.parametrize("device,dtype", [("meta", torch.float64), ("cpu", torch.bfloat16)])
def test_factory_device_and_dtype_reach_every_parameter_and_buffer(name, device, dtype):
    assert_factory_device_and_dtype(name, device=device, dtype=dtype, **CONTRACT[name])


@pytest.mark.parametrize("name", CONTRACT)
def test_unknown_argument_raises_type_error(name):
    assert_unknown_argument_raises(name, **CONTRACT[name])


@pytest.mark.parametrize("name", CONTRACT)
def test_parameter_groups_and_no_weight_decay_name_the_model_parameters(name):
    assert_parameter_groups_match(recurzoo.create_model(name, device="meta", **CONTRACT[name]))


@pytest.mark.parametrize("name", CONTRACT)
def test_grad_checkpointing_recomputes_layers_in_the_backward_pass_until_turned_off(name):
    torch.manual_seed(0)
    model = recurzoo.create_model(name, **CONTRACT[name]).train()
    calls = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda *_: calls.append(1))
    x = _small_input(model)
    recomputed = []
    for enabled in (True, False):
        model.set_grad_checkpointing(enabled)
        output = model(x)
        calls.clear()
        sum(o.float().pow(2).mean() for o in (output if isinstance(output, (list, tuple)) else [output])).backward()
        recomputed.append(len(calls))
    assert recomputed[0] > 0 and recomputed[1] == 0
