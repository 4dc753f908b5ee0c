"""RGT: published figures, official checkpoints, the two attentions, HAI, any input size, timm's model
contract (factory arguments, meta init, pruning, fx, grad checkpointing)."""

from __future__ import annotations

import copy
import math

import _contract as contract
import pytest
import torch
from _parity import in_repo_fixture

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones.rgt import (
    RGT,
    RectangleWindowAttention,
    RectangleWindowBranch,
    RecursiveGeneralizationAttention,
    RGTBlock,
    check_rgt_input,
    checkpoint_filter_fn,
    is_shifted_block,
    recursion_steps,
    shifted_window_mask,
)
from recurzoo.export.flops import count_flops, count_params, create_uninitialized
from recurzoo.heads.super_resolution import SuperResolutionModel
from recurzoo.heads.super_resolution import checkpoint_filter_fn as sr_checkpoint_filter_fn

TINY = dict(embed_dim=24, num_heads=2, blocks_per_group=2)


def _fixture(scale: int) -> dict:
    """The official RGT x``scale`` fixture of the repository."""
    return in_repo_fixture("rgt", f"rgt_x{scale}_tiny")


def _body_kwargs(official: dict) -> dict:
    """Our body's arguments for the official constructor's (those a fixture sets)."""
    return dict(
        embed_dim=official["embed_dim"],
        depths=tuple(official["depth"]),
        num_heads=list(official["num_heads"]),
        mlp_ratio=official["mlp_ratio"],
        split_size=tuple(official.get("split_size", (8, 8))),
        c_ratio=official.get("c_ratio", 0.5),
    )


def test_x4_params_and_flops_match_published_within_one_percent():
    """RGT 13.37 M / 251.07 G and RGT-S 10.20 M / 193.08 G (fvcore, 3x128x128 in, 3x512x512 out).

    Parameters are counted on the full models. FLOPs grow exactly linearly with the number of
    residual groups (all groups are the same computation; shifting changes no count), so they are
    counted on full-width x4 models with one and two groups and extrapolated to 8 and 6 groups.
    """
    assert count_params(create_uninitialized("rgt_x4")) / 1e6 == pytest.approx(13.37, abs=0.006)
    assert count_params(create_uninitialized("rgt_small_x4")) / 1e6 == pytest.approx(10.20, abs=0.006)
    one, two = (count_flops(create_uninitialized("rgt_x4", depths=(6,) * n), (3, 128, 128)) for n in (1, 2))
    per_group = two - one
    assert (one + 7 * per_group) / 1e9 == pytest.approx(251.07, rel=0.01)
    assert (one + 5 * per_group) / 1e9 == pytest.approx(193.08, rel=0.01)


@pytest.mark.parametrize("wrapper", ["params", "params_ema"])
def test_official_basicsr_checkpoint_loads_through_timm_file_overlay(tmp_path, wrapper):
    fixture = _fixture(2)
    kwargs = _body_kwargs(fixture["official"]["kwargs"])
    path = tmp_path / "RGT_x2.pth"
    torch.save({wrapper: fixture["state_dict"]}, path)  # as BasicSR stores them, mask buffers included
    model = recurzoo.create_model(
        "rgt_x2", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    ).eval()
    with torch.no_grad():
        output = model(fixture["inputs"]["x"])
    torch.testing.assert_close(output, fixture["output"], rtol=1e-4, atol=1e-4 * fixture["output"].abs().max().item())

    body = recurzoo.create_model("rgt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            body.forward_features(model.normalize(fixture["inputs"]["x"])),
            model.forward_features(fixture["inputs"]["x"]),
        )


def test_checkpoint_filter_drops_derived_buffers_and_maps_every_official_key():
    fixture = _fixture(4)
    official = fixture["state_dict"]
    model = recurzoo.build_official("rgt_arch.RGT", fixture["official"]["kwargs"])
    converted = sr_checkpoint_filter_fn(official, model)
    derived = [
        k for k in official if k.endswith(("attn_mask_0", "attn_mask_1", "rpe_biases", "relative_position_index"))
    ]
    assert derived and len(converted) == len(official) - len(derived)
    assert set(converted) == set(model.state_dict())
    # our own SR checkpoint loads into the body alone, and back
    body = RGT(**_body_kwargs(fixture["official"]["kwargs"]))
    body_state = checkpoint_filter_fn(model.state_dict(), body)
    assert set(body_state) == set(body.state_dict())
    assert set(sr_checkpoint_filter_fn(body_state, model)) == {
        k for k in model.state_dict() if k.startswith("backbone.")
    }


@pytest.mark.parametrize(
    "height,width,training",
    [
        (64, 64, False),
        (128, 200, False),
        (256, 256, False),
        (1024, 64, False),
        (17, 400, False),
        (64, 64, True),
        (256, 72, True),
        (40, 24, True),
        (1024, 1024, True),
    ],
)
def test_recursion_steps_follow_the_official_rule_where_it_runs(height, width, training):
    if training:
        expected = max(int(math.log(height // 4, 4)), int(math.log(width // 4, 4)))
    else:
        expected = max(int(math.log(height // 16, 4)), int(math.log(width // 16, 4)), 2)
    assert recursion_steps(height, width, training) == expected


@pytest.mark.parametrize(
    "height,width,training,expected",
    [
        (8, 8, False, 1),
        (15, 200, False, 1),
        (3, 3, False, 0),
        (1030, 16, False, 2),
        (2, 64, True, 0),
    ],
)
def test_recursion_steps_are_capped_where_the_official_code_fails(height, width, training, expected):
    steps = recursion_steps(height, width, training)
    assert steps == expected and min(height, width) // 4**steps >= 1


def _reference_region_ids(height, width, window, shift):
    """The Swin/RGT construction: label the three slices of each axis, one id per slice pair."""
    ids = torch.zeros(height, width, dtype=torch.long)
    count = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            ids[rows, cols] = count
            count += 1
    return ids


@pytest.mark.parametrize(
    "height,width,window", [(16, 24, (4, 8)), (8, 32, (8, 32)), (64, 32, (32, 8)), (24, 8, (8, 8)), (8, 64, (8, 32))]
)
def test_shifted_window_mask_separates_regions_as_the_official_loop_does(height, width, window):
    shift = (window[0] // 2, window[1] // 2)
    mask = shifted_window_mask(height, width, window, shift, torch.device("cpu"))
    ids = _reference_region_ids(height, width, window, shift)
    windows = ids.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window[0] * window[1])
    expected = torch.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)
    torch.testing.assert_close(mask, expected)
    assert (mask[-1] < 0).any() and (mask[0] == 0).all() == (height > window[0] and width > window[1])


def _reference_window_attention(branch, qkv):
    """Roll, partition, attention with one mask per window (shifted_window_mask), reverse, roll back."""
    batch, height, width, _, channels = qkv.shape
    (wh, ww), heads = branch.window_size, branch.num_heads
    shift = branch.shift_size
    if shift:
        qkv = torch.roll(qkv, (-shift[0], -shift[1]), dims=(1, 2))
    windows = qkv.view(batch, height // wh, wh, width // ww, ww, 3, heads, channels // heads)
    windows = windows.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, batch, -1, heads, wh * ww, channels // heads)
    q, k, v = windows.unbind(0)
    logits = (q * branch.scale) @ k.transpose(-1, -2) + branch.relative_position_bias()
    if shift:
        logits = logits + shifted_window_mask(height, width, (wh, ww), shift)[:, None].to(logits.dtype)
    out = (logits.softmax(-1) @ v).view(batch, height // wh, width // ww, heads, wh, ww, -1)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, channels)
    return torch.roll(out, shift, dims=(1, 2)) if shift else out


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize(
    "height,width,window", [(16, 24, (4, 8)), (64, 64, (8, 32)), (64, 32, (32, 8)), (8, 8, (8, 8)), (24, 8, (4, 8))]
)
def test_window_groups_in_place_and_out_of_place_compute_the_rolled_masked_attention(height, width, window, shifted):
    # the windows are attended in groups sharing a mask, gathered and written back piece by piece
    torch.manual_seed(0)
    branch = RectangleWindowBranch(12, 2, window, shifted).double()
    with torch.no_grad():
        for parameter in branch.parameters():
            parameter.normal_()
    qkv = torch.randn(2, height, width, 3, 12, dtype=torch.float64)
    expected = _reference_window_attention(branch, qkv)
    torch.testing.assert_close(branch(qkv), expected, rtol=1e-10, atol=1e-10)
    out = torch.full((2, height, width, 20), float("nan"), dtype=torch.float64)
    assert branch(qkv, out=out[..., 4:16]) is None
    torch.testing.assert_close(out[..., 4:16], expected, rtol=1e-10, atol=1e-10)
    assert out[..., :4].isnan().all() and out[..., 16:].isnan().all()


def test_window_groups_in_place_path_gives_the_reference_gradients():
    torch.manual_seed(0)
    branch = RectangleWindowBranch(12, 2, (4, 8), shifted=True).double()
    qkv = torch.randn(1, 16, 24, 3, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 16, 24, 12, dtype=torch.float64)
    grads = []
    for compute in (lambda: _reference_window_attention(branch, qkv), lambda: _in_place(branch, qkv)):
        branch.zero_grad()
        qkv.grad = None
        (compute() * weight).sum().backward()
        grads.append((qkv.grad.clone(), branch.position_bias.proj_in.weight.grad.clone()))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def _in_place(branch, qkv):
    out = qkv.new_empty(*qkv.shape[:3], 2 * qkv.shape[-1])
    branch(qkv, out=out[..., 6:18])
    return out[..., 6:18]


def test_window_biases_are_reused_only_without_autograd_and_while_the_weights_give_the_same_table():
    torch.manual_seed(0)
    branch = RectangleWindowBranch(32, 2, (4, 8), shifted=True).eval()
    with torch.no_grad():
        first = branch.window_biases(torch.float32)
        assert branch.window_biases(torch.float32) is first  # reused
        assert branch.window_biases(torch.float64).dtype == torch.float64
        # a change that bumps no version counter (through .data) still rebuilds them
        branch.position_bias.mlp[-1].bias.data += 0.5
        changed = branch.window_biases(torch.float32)
    assert changed is not first
    torch.testing.assert_close(changed, first + 0.5)  # the last layer adds its bias to every logit
    with_grad = branch.window_biases(torch.float32)  # with autograd: built for the graph, nothing kept
    assert with_grad.requires_grad and branch._bias_cache is None
    torch.testing.assert_close(with_grad.detach(), changed)


def test_window_shifts_follow_the_official_pattern():
    assert [i for i in range(6) if is_shifted_block(0, i)] == [2]
    assert [i for i in range(0, 6, 2) if is_shifted_block(1, i)] == [0, 4]
    model = RGT(embed_dim=24, depths=(6, 6), num_heads=2, mlp_ratio=2)
    for group_index, group in enumerate(model.groups):
        kinds = [type(block.attn).__name__ for block in group.blocks]
        assert kinds == ["RectangleWindowAttention", "RecursiveGeneralizationAttention"] * 3
        shifted = [
            i
            for i, block in enumerate(group.blocks)
            if isinstance(block.attn, RectangleWindowAttention) and block.attn.branches[0].shift_size
        ]
        assert shifted == ([2] if group_index % 2 == 0 else [0, 4])


def test_rectangle_window_attention_is_local_and_recursive_attention_is_global():
    torch.manual_seed(0)
    local = RectangleWindowAttention(16, 2, split_size=(4, 8), shifted=False).eval()
    global_ = RecursiveGeneralizationAttention(16, 2).eval()
    x = torch.randn(1, 32, 32, 16)
    y = x.clone()
    y[0, 0, 0] += 1.0  # change one token in the top-left corner
    with torch.no_grad():
        local_change = (local(y) - local(x)).abs().sum(-1)[0]
        global_change = (global_(y) - global_(x)).abs().sum(-1)[0]
    # L-SA: horizontal 4x8 and vertical 8x4 windows around the token, plus the 3x3 conv of the values
    reach = torch.zeros(32, 32, dtype=torch.bool)
    reach[:4, :8] = reach[:8, :4] = reach[:2, :2] = True
    assert (local_change[~reach] == 0).all() and (local_change[reach] > 0).any()
    # RG-SA: the pooled summary carries the change to every position
    assert (global_change > 0).all()


def test_hybrid_adaptive_integration_adds_the_scaled_input():
    block = RGTBlock(16, 2, "recursive").eval()
    with torch.no_grad():
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
        block.skip_scale.copy_(torch.linspace(-1, 1, 16))
        x = torch.randn(2, 9, 11, 16)
        torch.testing.assert_close(block(x), x * (1 + block.skip_scale))


@pytest.mark.parametrize("size", [(5, 7), (24, 40), (33, 70)])
def test_sr_model_takes_any_input_size(size):
    model = recurzoo.create_model("rgt_small_x2", **TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, 2 * size[0], 2 * size[1]) and torch.isfinite(out).all()


def test_eval_is_deterministic_and_grad_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = recurzoo.create_model("rgt_x2", drop_path_rate=0.0, **TINY)
    x = torch.rand(1, 3, 20, 36)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    model(x).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for p, g in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_body_exposes_one_stride_one_level_per_group():
    body = recurzoo.create_model("rgt_small", **TINY)
    assert [level["reduction"] for level in body.feature_info] == [1] * 6
    assert not isinstance(body, SuperResolutionModel) and body.num_features == 24
    features = recurzoo.create_model("rgt_small", features_only=True, out_indices=(1, 5), **TINY)
    outs = features(torch.randn(1, 3, 20, 28))
    assert [tuple(o.shape) for o in outs] == [(1, 24, 20, 28)] * 2


# --------------------------------------------------------------------------------------------------
# timm's model contract, on the reduced body (6 groups of 2 blocks, width 24)
# --------------------------------------------------------------------------------------------------


def _tiny_body(**kwargs) -> RGT:
    """A reduced ``rgt_small`` with every weight (norms, HAI scales, biases) moved off its initial value."""
    torch.manual_seed(0)
    model = recurzoo.create_model("rgt_small", **TINY, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_meta_built_body_recomputes_its_window_buffers_and_computes_like_an_eager_one():
    model = contract.assert_meta_init_gives_a_working_model("rgt_small", (3, 20, 36), num_classes=3, **TINY)
    eager = _tiny_body(num_classes=3).double().eval()
    branches = [m for m in model.modules() if hasattr(m, "relative_position_index")]
    eager_branches = [m for m in eager.modules() if hasattr(m, "relative_position_index")]
    assert len(branches) == 12 and {b.window_size for b in branches} == {(8, 32), (32, 8)}
    for ours, reference in zip(branches, eager_branches):
        assert torch.equal(ours.relative_position_index, reference.relative_position_index)
        assert torch.equal(ours.offsets, reference.offsets) and ours.offsets.dtype == torch.float64
    assert all((block.skip_scale == 1e-4).all() for block in model.modules() if isinstance(block, RGTBlock))
    # the buffers are not in the state dict: only recomputed ones give the eager model's output
    model.load_state_dict(eager.state_dict())
    x = torch.rand(2, 3, 20, 36, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))


def test_dtype_change_after_a_forward_leaves_no_stale_mask_or_buffer():
    model = _tiny_body().eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        reference = model.forward_features(x)
    contract.assert_dtype_change_after_forward(model, x, dtype=torch.bfloat16)
    with torch.no_grad():
        low = model.to(torch.bfloat16).forward_features(x.to(torch.bfloat16))
        assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
        model.to(torch.float64)  # a model converted after its forwards computes as one built in float64
        fresh = recurzoo.create_model("rgt_small", dtype=torch.float64, **TINY).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model.forward_features(x.double()), fresh.forward_features(x.double()))


def test_parameter_groups_and_no_weight_decay_name_the_model_parameters():
    from timm.models import group_parameters

    model = recurzoo.create_model("rgt_small", device="meta", num_classes=3, **TINY)
    contract.assert_parameter_groups_match(model)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert len(groups) == 1 + 6 + 1  # the stem, one per residual group, the tail (norm, conv, head)


def test_reset_classifier_keeps_the_pooling_and_the_parent_device_dtype_and_mode():
    model = _tiny_body(num_classes=4, global_pool="max").eval()
    x = torch.rand(2, 3, 16, 24)
    features, pre_logits = contract.assert_reset_classifier_keeps_the_pooling(model, x)
    torch.testing.assert_close(pre_logits, features.amax((2, 3)))
    with torch.no_grad():
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features)
    contract.assert_reset_classifier_takes_the_parent_device_dtype_and_mode(model)


def test_frozen_parameters_stay_frozen_through_reset_classifier():
    model = recurzoo.create_model("rgt_small", device="meta", num_classes=3, **TINY)
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    assert not [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def test_forward_intermediates_are_the_group_outputs_and_end_at_forward_features():
    model = _tiny_body().eval()
    x = torch.rand(2, 3, 16, 40)
    taps = []
    hooks = [group.register_forward_hook(lambda m, i, o: taps.append(o)) for group in model.groups]
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        channels_last = model.forward_intermediates(
            x, indices=[5], norm=True, output_fmt="NHWC", intermediates_only=True
        )
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(maps) == 6 and all(m.shape == (2, 24, 16, 40) for m in maps)
    for feature_map, tap in zip(maps, taps[:6]):
        torch.testing.assert_close(feature_map, tap)
    torch.testing.assert_close(channels_last[0], model.norm(maps[5].permute(0, 2, 3, 1)))


def test_prune_intermediate_layers_meets_timms_contract():
    """timm's test_prune_intermediate_layers_contract; a pruned body keeps the groups up to the tap, drops
    the head, and without its norm ends exactly at the tap."""
    model = _tiny_body(num_classes=3).eval()
    x = torch.rand(2, 3, 16, 24)
    contract.assert_prune_intermediate_layers_contract(model, x)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        for i in range(len(model.feature_info)):
            pruned = copy.deepcopy(model)
            pruned.prune_intermediate_layers([i])
            assert len(pruned.groups) == i + 1 and pruned.num_classes == 0
            if i == len(model.feature_info) - 1:
                continue
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i], prune_norm=True)
            torch.testing.assert_close(pruned.forward_features(x), taps[i], rtol=0, atol=0)
            final, tapped = pruned.forward_intermediates(x, indices=take_indices)
            torch.testing.assert_close(final, tapped[0], rtol=0, atol=0)


def test_fx_traces_the_whole_body_forward_and_backward():
    model = _tiny_body(num_classes=5)
    x = torch.rand(2, 3, 20, 28)
    contract.assert_torchvision_feature_extractor(model, x)
    contract.assert_fx_trains_the_whole_model(model, x)


def test_fx_features_are_the_group_outputs_and_check_their_input():
    eager = _tiny_body().eval()
    traced = recurzoo.create_model("rgt_small", features_only=True, feature_cls="fx", out_indices=(1, 4), **TINY)
    assert traced.feature_info.module_name() == ["groups.1", "groups.4"]
    missing, _ = traced.graph_module.load_state_dict(eager.state_dict(), strict=False)
    assert not missing
    x = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        expected = eager.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    assert len(expected) == 2
    contract.assert_fx_features_match(traced, x, expected)
    with pytest.raises(ValueError, match="rgt_small: expects 3 input channels"):
        traced(torch.rand(1, 4, 20, 28))  # the input check is part of the traced graph
    assert check_rgt_input in __import__("timm").models.get_notrace_functions()


def test_grad_checkpointing_keeps_gradients_of_the_classifier_and_of_features_only():
    x = torch.rand(2, 3, 16, 24)
    contract.assert_grad_checkpointing_keeps_gradients("rgt_small", x, num_classes=3, **TINY)
    contract.assert_features_only_grad_checkpointing_keeps_gradients("rgt_small", x, (1, 4), **TINY)


def test_window_biases_made_under_a_fake_mode_are_not_kept_for_eager_calls():
    """An exporter's fake tensors (torch.export traces without autograd too) must never enter the cache."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    branch = RectangleWindowBranch(32, 2, (4, 8), shifted=True).eval()
    with torch.no_grad():
        expected = branch.window_biases(torch.float32).clone()
        branch._bias_cache = None
        with FakeTensorMode(allow_non_fake_inputs=True):
            branch.window_biases(torch.float32)
        assert branch._bias_cache is None
        torch.testing.assert_close(branch.window_biases(torch.float32), expected)
