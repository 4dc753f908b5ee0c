"""HorNet: published figures, the recursive gated convolution, global filters, official checkpoints."""

from __future__ import annotations

from functools import partial

import _contract as contract
import pytest
import timm
import torch
import torch.nn.functional as F
from _parity import in_repo_fixture

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones.hornet import (
    GateContextConv,
    GlobalLocalFilter,
    HorNetBlock,
    PointwiseConv2d,
    RecursiveGatedConv,
    checkpoint_filter_fn,
)
from recurzoo.export.flops import count_flops, count_params, create_uninitialized

SMALL = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))

# Params (M) and fvcore GFLOPs of the official code with 1000 classes (measured on it; FFTs uncounted).
PUBLISHED = {
    "hornet_tiny_7x7": (22.41, 3.98, 224),
    "hornet_tiny_gf": (22.99, 3.90, 224),
    "hornet_small_7x7": (49.53, 8.83, 224),
    "hornet_small_gf": (50.40, 8.71, 224),
    "hornet_base_7x7": (87.26, 15.58, 224),
    "hornet_base_gf": (88.42, 15.42, 224),
    "hornet_large_7x7": (194.54, 34.82, 224),
    "hornet_large_gf": (196.29, 34.58, 224),
    "hornet_base_gf_384": (92.10, 45.33, 384),
    "hornet_large_gf_384": (201.81, 101.63, 384),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_flops_match_official_within_one_percent(name):
    params_m, gflops, side = PUBLISHED[name]
    model = create_uninitialized(name, num_classes=1000)
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.01, abs=0.006)
    measured = count_flops(model, (3, side, side), count_fft=False) / 1e9
    assert measured == pytest.approx(gflops, rel=0.01)


def test_fft_counting_adds_the_global_filter_cost_only_to_gf_models():
    gf = create_uninitialized("hornet_tiny_gf", **SMALL)
    plain = create_uninitialized("hornet_tiny_7x7", **SMALL)
    assert count_flops(gf, count_fft=True) > count_flops(gf, count_fft=False)
    assert count_flops(plain, count_fft=True) == count_flops(plain, count_fft=False)


def _reference_gnconv(module: RecursiveGatedConv, x: torch.Tensor) -> torch.Tensor:
    """The paper's recursion written out: p_0 = g * q_0, p_{k+1} = f_k(p_k) * q_{k+1}, out = proj(p_n)."""
    projected = F.conv2d(x, module.proj_in.weight, module.proj_in.bias)
    gate_width = module.widths[0]
    gate, context = projected[:, :gate_width], projected[:, gate_width:]
    context = module.spatial_mixer(context) * module.scale
    start, maps = 0, []
    for width in module.widths:
        maps.append(context[:, start : start + width])
        start += width
    p = gate * maps[0]
    for k in range(module.order - 1):
        p = F.conv2d(p, module.order_projs[k].weight, module.order_projs[k].bias) * maps[k + 1]
    return F.conv2d(p, module.proj_out.weight, module.proj_out.bias)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_gnconv_follows_the_recursive_formula(order):
    module = RecursiveGatedConv(32, order=order, scale=1 / 3).eval()
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _reference_gnconv(module, x))
    assert module.widths == [32 // 2**i for i in reversed(range(order))]


def test_gnconv_rejects_width_not_divisible_by_its_order():
    with pytest.raises(ValueError, match="divisible"):
        RecursiveGatedConv(20, order=4)


@pytest.mark.parametrize("side", [12, 14, 17])
def test_global_filter_with_unit_weight_is_the_identity_at_any_size(side):
    module = GlobalLocalFilter(8, filter_size=(14, 8)).eval()
    with torch.no_grad():
        module.complex_weight.zero_()
        module.complex_weight[..., 0] = 1.0  # 1 + 0j everywhere: the Fourier round trip only
    x = torch.randn(2, 4, side, side + 3)
    with torch.no_grad():
        assert torch.allclose(module.global_filter(x), x, atol=1e-5)
        module.complex_weight.zero_()
        assert module.global_filter(x).abs().max() == 0


def test_gf_model_runs_at_a_resolution_other_than_its_weights():
    model = recurzoo.create_model("hornet_tiny_gf", **SMALL, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 288, 192))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_checkpoint_at_224_loads_into_384_model_with_resized_filters():
    source = recurzoo.create_model("hornet_tiny_gf", **SMALL)
    target = recurzoo.create_model("hornet_base_gf_384", **SMALL)
    converted = checkpoint_filter_fn(source.state_dict(), target)
    target.load_state_dict(converted)
    weight = target.stages[2].blocks[0].gnconv.spatial_mixer.complex_weight
    assert weight.shape[1:3] == (24, 13)
    original = source.stages[2].blocks[0].gnconv.spatial_mixer.complex_weight
    torch.testing.assert_close(weight[:, 0, 0], original[:, 0, 0])  # align_corners keeps the corners
    torch.testing.assert_close(weight[:, -1, -1], original[:, -1, -1])


def _official_fixture(case: str) -> dict:
    return in_repo_fixture("hornet", case)


@pytest.mark.parametrize(
    "case, variant", [("hornet_7x7_tiny", "hornet_tiny_7x7"), ("hornet_gf_tiny", "hornet_tiny_gf")]
)
def test_official_checkpoint_file_loads_through_pretrained_cfg_overlay(tmp_path, case, variant):
    fixture = _official_fixture(case)
    kwargs = fixture["official"]["kwargs"]
    path = tmp_path / "official.pth"
    torch.save({"model": fixture["state_dict"], "epoch": 300}, path)  # the official training wrapper
    model = recurzoo.create_model(
        variant,
        pretrained=True,
        num_classes=kwargs["num_classes"],
        pretrained_cfg_overlay=dict(file=str(path), num_classes=kwargs["num_classes"]),
        depths=kwargs["depths"],
        dims=[kwargs["base_dim"] * 2**i for i in range(4)],
    ).eval()
    with torch.no_grad():
        out = model(fixture["inputs"]["x"])
    torch.testing.assert_close(out, fixture["output"], rtol=1e-4, atol=1e-4)


def test_fine_tuning_from_official_checkpoint_replaces_only_the_classifier(tmp_path):
    fixture = _official_fixture("hornet_7x7_tiny")
    kwargs = fixture["official"]["kwargs"]
    path = tmp_path / "official.pth"
    torch.save({"model": fixture["state_dict"]}, path)
    model = recurzoo.create_model(
        "hornet_tiny_7x7",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=4,
        depths=kwargs["depths"],
        dims=[kwargs["base_dim"] * 2**i for i in range(4)],
    )
    assert model.get_classifier().out_features == 4
    torch.testing.assert_close(model.stem[0].weight, fixture["state_dict"]["downsample_layers.0.0.weight"])


def test_grad_checkpointing_gives_the_same_gradients():
    model = recurzoo.create_model("hornet_tiny_gf", **SMALL, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for grad, reference in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(grad, reference)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = recurzoo.create_model("hornet_tiny_7x7", **SMALL, drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_no_weight_decay_lists_the_frequency_weights():
    model = recurzoo.create_model("hornet_tiny_gf", **SMALL)
    names = model.no_weight_decay()
    assert names and all(name.endswith("complex_weight") for name in names)
    assert len(names) == sum(model_depth for model_depth in SMALL["depths"][2:])


def test_group_matcher_covers_every_parameter():
    model = recurzoo.create_model("hornet_tiny_7x7", **SMALL)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(names) for names in groups.values()) == len(list(model.named_parameters()))


# --------------------------------------------------------------------------------------------------
# timm's model contract, at test widths (SMALL), for both spatial mixers
# --------------------------------------------------------------------------------------------------

BOTH = ["hornet_tiny_7x7", "hornet_tiny_gf"]


def _perturbed(model):
    """Layer scales, norms and frequency weights moved off their initial values, so that they count."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("gamma1", "gamma2")) or ".norm" in name or name.endswith("complex_weight"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


@pytest.mark.parametrize("name", BOTH)
def test_blocks_take_factory_device_and_dtype(name):
    mixer = GlobalLocalFilter if name.endswith("gf") else None
    block = HorNetBlock(16, partial(RecursiveGatedConv, order=3, spatial_mixer=mixer), device="meta", dtype=torch.half)
    assert {(p.device.type, p.dtype) for p in block.parameters()} == {("meta", torch.half)}


@pytest.mark.parametrize("name", BOTH)
def test_meta_built_model_initialises_like_an_eager_one(name):
    model = contract.assert_meta_init_gives_a_working_model(name, (3, 64, 64), ls_init_value=0.5, **SMALL)
    eager = recurzoo.create_model(name, ls_init_value=0.5, **SMALL).double()
    ours, theirs = model.state_dict(), eager.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.ndim == 1:  # layer scales, norms and biases start at constants: equal
            torch.testing.assert_close(ours[key], value, msg=key)
        else:  # timm's trunc_normal_, std 0.02 (the classifier and frequency weights included)
            assert 0.015 < ours[key].std() < 0.025 and ours[key].mean().abs() < 0.005, key
    weights = [k for k in ours if k.endswith("complex_weight")]
    assert bool(weights) == name.endswith("gf")


def test_meta_initialisation_scales_the_classifier():
    model = recurzoo.create_model("hornet_tiny_7x7", device="meta", head_init_scale=0.001, **SMALL)
    model = model.to_empty(device="cpu")
    model.init_weights()
    assert model.head.fc.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)


@pytest.mark.parametrize("name", BOTH)
def test_dtype_change_after_a_forward_gives_outputs_in_the_new_dtype(name):
    model = _perturbed(recurzoo.create_model(name, **SMALL)).eval()
    x = torch.randn(1, 3, 64, 64)
    contract.assert_dtype_change_after_forward(model, x, dtype=torch.bfloat16, max_relative_error=0.05)


def test_reset_classifier_keeps_the_pooling_and_the_parent_device_dtype_and_mode():
    model = _perturbed(recurzoo.create_model("hornet_tiny_gf", global_pool="max", num_classes=4, **SMALL)).eval()
    x = torch.randn(2, 3, 64, 64)
    features, expected = contract.assert_reset_classifier_keeps_the_pooling(model, x)
    assert not torch.allclose(contract.pre_logits_after_reset(model, features, "avg"), expected)
    contract.assert_reset_classifier_takes_the_parent_device_dtype_and_mode(model)


@pytest.mark.parametrize("name", BOTH)
def test_frozen_parameters_stay_frozen_through_reset_classifier_and_set_input_size(name):
    model = recurzoo.create_model(name, device="meta", **SMALL)
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    model.set_input_size(img_size=(448, 448))
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


def test_set_input_size_resamples_the_frequency_weights_as_the_forward_does():
    from timm.models import get_model_input_config

    fixed = _perturbed(recurzoo.create_model("hornet_tiny_gf", **SMALL)).eval()
    on_the_fly = recurzoo.create_model("hornet_tiny_gf", **SMALL).eval()
    on_the_fly.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        expected = on_the_fly(x)  # the 224-sized weights resized at run time
        fixed.set_input_size(img_size=(96, 160))
        torch.testing.assert_close(fixed(x), expected)
    sizes = [block.gnconv.spatial_mixer.complex_weight.shape[1:3] for block in fixed.stages[2].blocks]
    assert sizes == [(6, 6)] * 2 and fixed.stages[3].blocks[0].gnconv.spatial_mixer.complex_weight.shape[1:3] == (3, 3)
    assert get_model_input_config(fixed)["input_size"] == (3, 96, 160)


def test_forward_intermediates_are_the_stage_outputs_and_end_at_forward_features():
    model = _perturbed(recurzoo.create_model("hornet_tiny_gf", **SMALL)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        y, expected = model.stem(x), []
        for stage in model.stages:
            y = stage(y)
            expected.append(y)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", BOTH)
def test_prune_intermediate_layers_meets_timms_contract(name):
    model = _perturbed(recurzoo.create_model(name, drop_rate=0.1, **SMALL))
    contract.assert_prune_intermediate_layers_contract(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", BOTH)
def test_fx_traces_the_whole_model_forward_and_backward(name):
    model = _perturbed(recurzoo.create_model(name, num_classes=5, **SMALL))
    x = torch.randn(2, 3, 64, 64)
    contract.assert_torchvision_feature_extractor(model, x)
    contract.assert_fx_trains_the_whole_model(model, x)


@pytest.mark.parametrize("name", BOTH)
def test_fx_features_are_the_stage_outputs_and_check_the_input(name):
    full = _perturbed(recurzoo.create_model(name, **SMALL)).eval()
    traced = recurzoo.create_model(name, features_only=True, feature_cls="fx", **SMALL).eval()
    _, unexpected = traced.graph_module.load_state_dict(full.state_dict(), strict=False)
    assert all(key.startswith("head.") for key in unexpected)
    x = torch.randn(2, 3, 64, 96)  # not the weights' size: the frequency weights are resized in the graph
    with torch.no_grad():
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert len(expected) == 4
    contract.assert_fx_features_match(traced, x, expected)
    with pytest.raises(ValueError, match=f"{name}: expects height and width of at least 32"):
        traced(torch.randn(1, 3, 16, 16))  # the input check is part of the traced graph


@pytest.mark.parametrize("name", BOTH)
def test_features_only_with_grad_checkpointing_keeps_gradients(name):
    contract.assert_grad_checkpointing_keeps_gradients(name, torch.randn(2, 3, 64, 64), features_only=True, **SMALL)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_a_1x1_conv_and_keeps_its_state_dict(channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 20, kernel_size=1)
    pointwise = PointwiseConv2d(12, 20)
    assert {k: v.shape for k, v in pointwise.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    pointwise.load_state_dict(conv.state_dict())
    x = torch.randn(2, 12, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(pointwise(x), conv(x))
        torch.testing.assert_close(pointwise(x, 0.25), conv(x) * 0.25)
        assert pointwise(x).is_contiguous(memory_format=torch.channels_last)


def test_gate_and_context_are_the_rows_of_one_1x1_conv_with_the_gate_scaled():
    torch.manual_seed(0)
    projection = GateContextConv(8, 2, 6)
    x = torch.randn(2, 8, 4, 3)
    with torch.no_grad():
        whole = F.conv2d(x, projection.weight, projection.bias)
        gate, context = projection(x, 1 / 3)
    torch.testing.assert_close(gate, whole[:, :2] / 3)
    torch.testing.assert_close(context, whole[:, 2:])


def test_dft_matrices_first_built_under_an_exporters_fake_mode_are_real_afterwards():
    """A first call inside torch.export's fake mode must not leave fake tensors for every later call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from recurzoo.backbones.hornet import real_dft_matrices

    with FakeTensorMode():
        real_dft_matrices(5, 10)
    row_rfft = real_dft_matrices(5, 10)[0]
    assert type(row_rfft) is torch.Tensor
    torch.testing.assert_close(torch.ones(1, 10) @ row_rfft[:, :1], torch.full((1, 1), 10**0.5))
