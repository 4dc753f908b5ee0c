"""RGT: published figures, official checkpoints, the two attentions, HAI, any input size."""

from __future__ import annotations

import math

import pytest
import torch
from _parity import in_repo_fixture

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones.rgt import (
    RGT,
    RectangleWindowAttention,
    RecursiveGeneralizationAttention,
    RGTBlock,
    checkpoint_filter_fn,
    is_shifted_block,
    recursion_steps,
    shifted_window_mask,
)
from recurzoo.export.flops import count_flops, count_params, create_uninitialized
from recurzoo.heads.super_resolution import SuperResolutionModel
from recurzoo.heads.super_resolution import checkpoint_filter_fn as sr_checkpoint_filter_fn

TINY = dict(embed_dim=24, num_heads=2, blocks_per_group=2)


def _fixture(name: str) -> dict:
    return in_repo_fixture("rgt", name)


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
    fixture = _fixture("rgt_x2_tiny")
    kwargs = fixture["official"]["kwargs"]
    path = tmp_path / "RGT_x2.pth"
    torch.save({wrapper: fixture["state_dict"]}, path)  # as BasicSR stores them, mask buffers included
    model = recurzoo.create_model(
        "rgt_x2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        embed_dim=kwargs["embed_dim"],
        depths=tuple(kwargs["depth"]),
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs["mlp_ratio"],
        split_size=tuple(kwargs["split_size"]),
    ).eval()
    with torch.no_grad():
        output = model(fixture["inputs"]["x"])
    torch.testing.assert_close(output, fixture["output"], rtol=1e-4, atol=1e-4 * fixture["output"].abs().max().item())

    body = recurzoo.create_model(
        "rgt",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        embed_dim=kwargs["embed_dim"],
        depths=tuple(kwargs["depth"]),
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs["mlp_ratio"],
        split_size=tuple(kwargs["split_size"]),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            body.forward_features(model.normalize(fixture["inputs"]["x"])),
            model.forward_features(fixture["inputs"]["x"]),
        )


def test_checkpoint_filter_drops_derived_buffers_and_maps_every_official_key():
    fixture = _fixture("rgt_x4_tiny")
    official = fixture["state_dict"]
    model = recurzoo.build_official("rgt_arch.RGT", fixture["official"]["kwargs"])
    converted = sr_checkpoint_filter_fn(official, model)
    derived = [
        k for k in official if k.endswith(("attn_mask_0", "attn_mask_1", "rpe_biases", "relative_position_index"))
    ]
    assert derived and len(converted) == len(official) - len(derived)
    assert set(converted) == set(model.state_dict())
    # our own SR checkpoint loads into the body alone, and back
    body = RGT(embed_dim=16, depths=(1, 1), num_heads=4, mlp_ratio=2, split_size=(2, 2))
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


def test_shifted_window_mask_separates_regions_as_the_official_loop_does():
    height, width, window, shift = 16, 24, (4, 8), (2, 4)
    mask = shifted_window_mask(height, width, window, shift, torch.device("cpu"))
    ids = _reference_region_ids(height, width, window, shift)
    windows = ids.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window[0] * window[1])
    expected = torch.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)
    torch.testing.assert_close(mask, expected)
    assert (mask[0] == 0).all() and (mask[-1] < 0).any()  # interior windows are unmasked


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
