"""SReT: published sizes, sliced attention, determinism, checkpoints, depth scaling and timm's model
contract (factory arguments, meta initialisation, fx, resizing, pruning, grad checkpointing).

Parity with the official code runs through tests/test_parity.py (fixtures in tests/parity/fixtures/sret).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Dict, List

import _contract as contract
import pytest
import timm
import torch
import torch.nn.functional as F
from _parity import in_repo_fixture
from _reduced import REDUCED

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones import sret
from recurzoo.export.flops import count_flops, count_params


def _tiny(**kwargs) -> sret.SReT:
    """A reduced-width SReT with slicing in every stage."""
    args = dict(
        img_size=64,
        embed_dims=(16, 32, 64),
        num_heads=(2, 2, 4),
        num_shared_blocks=(2, 2, 1),
        num_groups=(8, 4, 2),
        recursive_num_groups=(2, 2, 2),
        mlp_ratio=2.0,
        num_classes=10,
    )
    args.update(kwargs)
    return sret.SReT(**args)


def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter and statistic, gains around 1, so every branch shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "running_var" in name:
                tensor.copy_(noise.abs() + 0.5)
            elif name.endswith("gain"):
                tensor.copy_(1.0 + 0.3 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model


# --- published parameter and FLOP counts --------------------------------------------------------

# (params in M, fvcore GFLOPs) from the official README / model zoo, at the tag's input size.
PUBLISHED = {
    "sret_tiny": (4.76, 1.12),
    "sret_tiny_lt": (4.99, 1.17),
    "sret_small": (20.90, 4.19),
    "sret_tiny_noslice": (4.76, 1.37),
    "sret_tiny_lt_noslice": (4.99, 1.43),
    "sret_small_noslice": (20.90, 4.69),
    "sret_tiny_noslice.distill_in1k_384": (4.85, 6.44),
    "sret_small_noslice.distill_in1k_384": (21.09, 18.50),
    "sret_small_noslice.distill_in1k_512": (21.32, 42.77),
}
# Counting FLOPs of the S models at 384 and 512 is slow; their params test the 384/512 builds.
FLOPS_SKIPPED = {"sret_small_noslice.distill_in1k_384", "sret_small_noslice.distill_in1k_512"}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_params_and_flops_match_published_within_one_percent(name):
    params, gflops = PUBLISHED[name]
    model = recurzoo.create_model(name)
    input_size = model.pretrained_cfg["input_size"]
    assert model.pos_embed.shape[-1] == input_size[-1] // 8
    assert count_params(model) / 1e6 == pytest.approx(params, rel=0.01)
    if name not in FLOPS_SKIPPED:
        assert count_flops(model, input_size) / 1e9 == pytest.approx(gflops, rel=0.01)


# --- sliced group attention ----------------------------------------------------------------------


def _reference_group_attention(
    attn: sret.SlicedGroupAttention, x: torch.Tensor, groups: List[List[int]]
) -> torch.Tensor:
    """Attention written out with explicit softmax, one group of token indices at a time."""
    batch, _, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    out = torch.zeros_like(x)
    for index in groups:
        if not index:
            continue
        tokens = x[:, index]
        q, k, v = attn.qkv(tokens).view(batch, len(index), 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        out[:, index] = (weights @ v).transpose(1, 2).reshape(batch, len(index), dim)
    return attn.proj(out)


# (tokens, groups): divisible; padded; padded with a slice of padding only; fewer tokens than groups.
GROUPINGS = [(16, 4), (81, 8), (9, 4), (3, 4), (49, 1)]


@pytest.mark.parametrize("num_tokens,num_groups", GROUPINGS)
def test_first_pass_attends_within_contiguous_slices(num_tokens, num_groups):
    attn = sret.SlicedGroupAttention(16, num_heads=2, num_groups=num_groups).eval()
    x = torch.randn(2, num_tokens, 16)
    size = -(-num_tokens // num_groups)
    groups = [list(range(g * size, min((g + 1) * size, num_tokens))) for g in range(num_groups)]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, recursive=False), _reference_group_attention(attn, x, groups))


@pytest.mark.parametrize("num_tokens,num_groups", GROUPINGS)
def test_recursive_pass_in_eval_puts_token_i_in_slice_i_mod_g(num_tokens, num_groups):
    attn = sret.SlicedGroupAttention(16, num_heads=2, num_groups=1, recursive_num_groups=num_groups).eval()
    x = torch.randn(2, num_tokens, 16)
    groups = [list(range(g, num_tokens, num_groups)) for g in range(num_groups)]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, recursive=True), _reference_group_attention(attn, x, groups))


def test_slicing_changes_the_output_compared_to_full_attention():
    attn = sret.SlicedGroupAttention(16, num_heads=2, num_groups=4, recursive_num_groups=4).eval()
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        full = attn.attend(x, 1, interleaved=False)
        assert (attn(x, recursive=False) - full).abs().max() > 1e-3
        assert (attn(x, recursive=True) - attn(x, recursive=False)).abs().max() > 1e-3


def test_recursive_passes_are_the_odd_applications_of_a_stage():
    stage = sret.RecursiveStage(16, 16, num_heads=2, num_shared_blocks=2, recursions=3, downsample=False)
    assert [block.recursive_passes for block in stage.blocks] == [(False, True, False), (True, False, True)]
    assert len({id(block.shared) for block in stage.blocks}) == 2


# --- determinism and training-mode slicing -------------------------------------------------------


def test_two_eval_forwards_are_bit_identical():
    model = _randomize_(_tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_training_mode_draws_random_slices_unless_disabled():
    x = torch.randn(2, 3, 64, 64)
    random_model = _randomize_(_tiny()).train()
    fixed_model = _randomize_(_tiny(random_slices=False)).train()
    fixed_model.stem.eval()  # batch statistics aside, training and eval compute the same function here
    with torch.no_grad():
        assert (random_model(x) - random_model(x)).abs().max() > 1e-4
        trained = fixed_model(x)
        assert torch.equal(trained, fixed_model(x))
        torch.testing.assert_close(trained, fixed_model.eval()(x))


# --- any input size ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [72, 40, 33])
def test_token_counts_not_divisible_by_the_groups_give_finite_outputs(side):
    # 72: 81, 25 and 9 tokens; 40, and 33 (an odd side): 25, 9 and 4 tokens -- against 8/4/2 and 2/2/2 groups
    model = _randomize_(_tiny()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_sret_small_runs_at_288():
    model = recurzoo.create_model("sret_small").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 288)).shape == (1, 1000)


def test_fixed_size_model_rejects_other_sizes_by_name():
    model = recurzoo.create_model("sret_tiny", dynamic_img_size=False).eval()
    with pytest.raises(ValueError, match=r"sret_tiny.*\(224, 224\)"):
        model(torch.randn(1, 3, 256, 256))


# --- official checkpoints ------------------------------------------------------------------------


def to_official_state_dict(model: sret.SReT) -> Dict[str, torch.Tensor]:
    """This implementation's weights in the official layout (written independently of the filter)."""
    shared_names = {
        "attn_skip_gain": "coefficient1.bias",
        "attn_gain": "coefficient2.bias",
        "mlp_skip_gain": "coefficient3.bias",
        "mlp_gain": "coefficient4.bias",
    }
    projection_names = {
        "skip_gain": "coefficient1.bias",
        "mlp_gain": "coefficient2.bias",
        "norm.weight": "norm1.weight",
        "norm.bias": "norm1.bias",
    }
    official = {}
    for key, value in model.state_dict().items():
        if match := re.fullmatch(r"stem\.(\d)\.(conv|bn)\.(.+)", key):
            official[f"patch_embed.{match[2]}{int(match[1]) + 1}.{match[3]}"] = value
        elif match := re.fullmatch(r"stages\.(\d+)\.downsample\.(.+)", key):
            official[f"pools.{int(match[1]) - 1}.conv.{match[2]}"] = value
        elif match := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(shared|projections\.(\d+))\.(.+)", key):
            stage, block = int(match[1]), int(match[2])
            recursions = len(model.stages[stage].blocks[block].projections)
            if match[3] == "shared":
                for r in range(recursions):
                    use = block * recursions + r
                    official[f"transformers.{stage}.blocks.{2 * use}.{shared_names.get(match[5], match[5])}"] = value
            else:
                use = block * recursions + int(match[4])
                leaf = projection_names.get(match[5], match[5])
                official[f"transformers.{stage}.blocks.{2 * use + 1}.{leaf}"] = value
        elif key.startswith("head.norm."):
            official["norm." + key[len("head.norm.") :]] = value
        elif key.startswith("head.fc."):
            official["head." + key[len("head.fc.") :]] = value
        else:
            official[key] = value
    return official


def _fixture(name: str):
    return in_repo_fixture("sret", name)


@pytest.mark.parametrize("fixture_name", ["sret_slices_tiny", "sret_wo_slice_tiny"])
def test_official_checkpoint_converts_and_converts_back_exactly(fixture_name):
    fixture = _fixture(fixture_name)
    official = fixture["state_dict"]
    model = recurzoo.build_official(fixture["official"]["constructor"], fixture["official"]["kwargs"], official)
    back = to_official_state_dict(model)
    assert set(back) == set(official)
    assert all(torch.equal(back[key], official[key]) for key in official)


def test_pretrained_file_in_official_layout_loads_through_timm(tmp_path):
    source = _randomize_(recurzoo.create_model("sret_tiny"))
    path = tmp_path / "SReT_T.pth"
    torch.save({"model": to_official_state_dict(source), "epoch": 299}, path)
    model = recurzoo.create_model("sret_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_pos_embed_is_resampled_on_load_and_agrees_with_dynamic_resampling(tmp_path):
    source = _randomize_(_tiny(img_size=64)).eval()
    official = to_official_state_dict(source)
    target = _tiny(img_size=96).eval()
    target.load_state_dict(sret.checkpoint_filter_fn(official, target))
    stored = official["pos_embed"]
    expected = F.interpolate(stored, size=(12, 12), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(target.pos_embed.data, expected)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(source(x), target(x))


def test_fine_tuned_tag_builds_at_its_size_and_resamples_a_224_checkpoint(tmp_path):
    source = _randomize_(recurzoo.create_model("sret_tiny_noslice"))
    path = tmp_path / "SReT_T_wo_slice.pth"
    torch.save({"model": to_official_state_dict(source)}, path)
    model = recurzoo.create_model(
        "sret_tiny_noslice.distill_in1k_384", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.pos_embed.shape == (1, 64, 48, 48)
    torch.testing.assert_close(model.pos_embed.data, sret.resample_pos_embed(source.pos_embed.data, (48, 48)))
    torch.testing.assert_close(model.head.fc.weight.data, source.head.fc.weight.data)


# --- depth scaling and timm interface ------------------------------------------------------------


def test_recursions_add_only_projection_parameters():
    base, deep = _tiny(recursions=2), _tiny(recursions=5)
    projection_params = sum(count_params(block.projections[0]) for stage in base.stages for block in stage.blocks)
    assert count_params(deep) - count_params(base) == 3 * projection_params


def test_more_than_100_layer_sret_trains_without_nans():
    model = _tiny(
        img_size=32,
        num_shared_blocks=(2, 2, 2),
        recursions=18,
        num_groups=(4, 2, 1),
        recursive_num_groups=(2, 2, 1),
        drop_path_rate=0.1,
    )
    applications = sum(len(block.projections) for stage in model.stages for block in stage.blocks)
    assert applications == 108  # shared-block applications, each followed by a projection
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_grad_checkpointing_gives_the_same_gradients():
    model = _randomize_(_tiny(random_slices=False)).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], msg=name)


def test_forward_head_pre_logits_are_the_normalized_pooled_features():
    model = _randomize_(_tiny()).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))
        pre_logits = model.forward_head(features, pre_logits=True)
        expected = F.layer_norm(features.mean((2, 3)), (64,), model.head.norm.weight, model.head.norm.bias, 1e-6)
        torch.testing.assert_close(pre_logits, expected)
        torch.testing.assert_close(model.forward_head(features), model.head.fc(pre_logits))


def test_group_matcher_and_no_weight_decay():
    model = _tiny()
    groups = timm.models.group_parameters(model, model.group_matcher())
    grouped = {name for names in groups.values() for name in names}
    assert grouped == {name for name, _ in model.named_parameters()}
    # the stem, every recursive block of every stage (a stage's pooling with its first block), the head
    assert len(groups) == 1 + sum(len(stage.blocks) for stage in model.stages) + 1
    assert model.no_weight_decay() == {"pos_embed"}


# --- timm's model contract, on reduced widths (REDUCED["sret"]) -----------------------------------

VARIANTS = ("sret_tiny", "sret_tiny_noslice")  # with sliced attention and without


def _reduced(name: str = "sret_tiny", **kwargs) -> sret.SReT:
    return recurzoo.create_model(name, **dict(REDUCED["sret"], **kwargs))


def _trainable(model: torch.nn.Module) -> List[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def test_every_block_creates_its_parameters_on_the_given_device_and_dtype():
    dd = dict(device="meta", dtype=torch.float64)
    blocks = [
        sret.SlicedGroupAttention(16, 2, num_groups=4, recursive_num_groups=2, **dd),
        sret.TransformerBlock(16, 2, num_groups=4, recursive_num_groups=2, **dd),
        sret.NonLinearProjection(16, **dd),
        sret.RecursiveStage(8, 16, num_heads=2, num_shared_blocks=2, num_groups=4, **dd),
    ]
    for block in blocks:
        tensors = [*block.parameters(), *block.buffers()]
        assert tensors and all((t.device.type, t.dtype) == ("meta", torch.float64) for t in tensors), block


@pytest.mark.parametrize("name", VARIANTS)
def test_meta_built_model_initialises_as_at_construction_and_computes_like_an_eager_one(name):
    model = contract.assert_meta_init_gives_a_working_model(name, (3, 40, 40), **REDUCED["sret"])
    gains = [parameter for key, parameter in model.named_parameters() if key.endswith("gain")]
    assert len(gains) == 4 * 4 + 2 * 8 and all(gain.eq(1).all() for gain in gains)  # 4 shared blocks, 8 uses
    statistics = model.stem[0].bn
    assert statistics.running_mean.eq(0).all() and statistics.running_var.eq(1).all()
    assert 0.015 < model.pos_embed.std() < 0.025  # truncated normal, std 0.02, over 28 x 28 x 16 values
    qkv = model.stages[0].blocks[0].shared.attn.qkv.weight
    bound = 1 / math.sqrt(qkv.shape[1])  # PyTorch's default linear initialisation
    assert 0.5 * bound < qkv.abs().max() <= bound
    eager = _randomize_(_reduced(name)).double().eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))


def test_unknown_argument_raises_type_error_in_the_stages():
    """(The models' own: test_models.py's factory contract.)"""
    with pytest.raises(TypeError):
        sret.RecursiveStage(16, 16, num_heads=2, num_shared_blocks=1, not_a_block_arg=1)


@pytest.mark.parametrize("name", VARIANTS)
def test_dtype_change_after_a_forward_gives_outputs_in_the_new_dtype(name):
    model = _randomize_(_reduced(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 40, 40)  # 25, 9 and 4 tokens: padded slices in every stage of sret_tiny
    contract.assert_dtype_change_after_forward(model, x, dtype=torch.bfloat16, max_relative_error=0.1)


def test_reset_classifier_keeps_the_pooling_and_the_parent_device_dtype_and_mode():
    model = _randomize_(_reduced(global_pool="max", num_classes=4)).eval()
    x = torch.randn(2, 3, 64, 64)
    features, expected = contract.assert_reset_classifier_keeps_the_pooling(model, x)
    assert not torch.allclose(contract.pre_logits_after_reset(model, features, "avg"), expected)
    with torch.no_grad():
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape == (2, 64, 2, 2)
    contract.assert_reset_classifier_takes_the_parent_device_dtype_and_mode(model)


def test_frozen_parameters_stay_frozen_through_reset_classifier_and_set_input_size():
    model = recurzoo.create_model("sret_tiny", device="meta", dtype=torch.float32)  # as timm's suite: full size
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    model.set_input_size(img_size=(448, 384))
    assert model.pos_embed.shape == (1, 64, 56, 48) and model.pos_embed.device.type == "meta"
    assert not _trainable(model)


@pytest.mark.parametrize("side", [64, 40])  # 40: token counts the slices do not divide, padded
def test_set_input_size_resamples_the_position_embedding_as_dynamic_sizing_does(side):
    from timm.models import get_model_input_config

    x = torch.randn(1, 3, side, side)
    fixed = _randomize_(_reduced(img_size=32, dynamic_img_size=False)).eval()
    dynamic = _reduced(img_size=32).eval()
    dynamic.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        expected = dynamic(x)  # the 4x4 position embedding resampled on the fly
        fixed.set_input_size(img_size=side)
        torch.testing.assert_close(fixed(x), expected)
    grid = math.ceil(side / 8)
    assert fixed.pos_embed.shape == (1, 16, grid, grid) and fixed.pos_embed.requires_grad
    assert get_model_input_config(fixed)["input_size"] == (3, side, side)  # what timm's data config resolves
    with pytest.raises(ValueError, match=rf"sret_tiny.*\({side}, {side}\)"):
        fixed(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_intermediates_and_pruning_meet_timms_contract(name):
    """timm's test_prune_intermediate_layers_contract, which its suite runs on timm's own families only."""
    model = _randomize_(_reduced(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [tuple(tap.shape) for tap in taps] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    contract.assert_prune_intermediate_layers_contract(model, x)
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers([0])
    assert len(pruned.stages) == 1 and pruned.num_features == 16


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_features_are_the_eager_stage_outputs_and_back_propagate(name):
    eager = _randomize_(_reduced(name)).eval()
    traced = recurzoo.create_model(name, features_only=True, feature_cls="fx", **REDUCED["sret"]).eval()
    assert traced.feature_info.module_name() == ["stages.0", "stages.1", "stages.2"]
    missing, _ = traced.graph_module.load_state_dict(eager.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 64, 48)  # not the 224 of the position embedding: resampled in the traced graph
    with torch.no_grad():
        _, expected = eager.forward_intermediates(x)
    assert [tuple(f.shape) for f in expected] == [(2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
    contract.assert_fx_features_match(traced, x, expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_traces_the_whole_model_forward_and_backward(name):
    model = _randomize_(_reduced(name, num_classes=5))
    x = torch.randn(2, 3, 40, 56)
    contract.assert_torchvision_feature_extractor(model, x)
    traced = contract.assert_fx_trains_the_whole_model(model, x)
    with pytest.raises(ValueError, match=f"{name}: expects height and width of at least 32"):
        traced(torch.randn(1, 3, 16, 16))  # the input check is part of the traced graph


@pytest.mark.parametrize("name", VARIANTS)
def test_grad_checkpointing_keeps_gradients_of_the_classifier_and_of_features_only(name):
    x = torch.randn(2, 3, 64, 64)
    contract.assert_grad_checkpointing_keeps_gradients(name, x, **REDUCED["sret"])
    contract.assert_features_only_grad_checkpointing_keeps_gradients(name, x, (0, 2), **REDUCED["sret"])


def test_msrnet_over_sret_builds_on_meta_and_initialises_the_backbone():
    kwargs = dict(REDUCED["camouflage"], backbone_kwargs=REDUCED["sret"])
    contract.assert_factory_device_and_dtype("msrnet_sret_small", **kwargs)
    model = contract.assert_meta_init_gives_a_working_model("msrnet_sret_small", (3, 64, 64), **kwargs)
    backbone = model.backbone.model
    assert isinstance(backbone, sret.SReT)
    assert all(p.eq(1).all() for key, p in backbone.named_parameters() if key.endswith("gain"))
    assert 0.015 < backbone.pos_embed.std() < 0.025


def test_reset_classifier_of_a_pruned_model_reads_its_width_device_and_dtype():
    model = _reduced(num_classes=4).double().eval()
    model.prune_intermediate_layers([0])
    assert model.num_features == model.head_hidden_size == 16
    model.reset_classifier(3, "avg")
    assert model.head.fc.weight.shape == (3, 16) and model.head.fc.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 3)
