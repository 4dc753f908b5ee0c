"""HorNet: published figures, the recursive gated convolution, global filters, official checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from _parity import in_repo_fixture

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones.hornet import GlobalLocalFilter, RecursiveGatedConv, checkpoint_filter_fn
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
    projected = module.proj_in(x)
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
    return module.proj_out(p)


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


def test_weight_downloads_have_distinct_named_cache_files():
    # The Tsinghua Cloud URLs end in "/?dl=1": without a name timm would cache to a directory path.
    urls = [timm.models.get_pretrained_cfg(name).url for name in timm.list_pretrained("hornet_*")]
    assert urls and all(isinstance(url, tuple) and url[1].endswith(".pth") for url in urls)
    assert len({name for _, name in urls}) == len(urls)


def test_pretrained_without_network_fails_fast_with_instructions(monkeypatch):
    from recurzoo import checkpoint

    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: False)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-cache")
    with pytest.raises(
        ValueError, match=r"hornet_tiny_7x7.*out of reach.*nonexistent-cache.*pretrained_cfg_overlay=dict\(file="
    ):
        recurzoo.create_model("hornet_tiny_7x7", pretrained=True)
