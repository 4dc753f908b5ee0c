"""SReT: published sizes, sliced attention, determinism, checkpoints and depth scaling.

Parity with the official code runs through tests/test_parity.py (fixtures in shared/parity/sret).
"""

from __future__ import annotations

import math
import re
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from _parity import in_repo_fixture

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


def test_every_drive_download_has_its_own_cache_file_name():
    # Every Google Drive url ends in ".../uc": timm would cache all tags in one file of that name.
    urls = [timm.models.get_pretrained_cfg(name).url for name in timm.list_pretrained("sret_*")]
    assert urls and all(isinstance(url, tuple) for url in urls)
    assert len({file_name for _, file_name in urls}) == len(urls)


def test_pretrained_without_network_fails_fast_with_instructions(monkeypatch):
    from recurzoo import checkpoint

    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: False)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-cache")
    with pytest.raises(
        ValueError, match=r"sret_tiny.*out of reach.*nonexistent-cache.*pretrained_cfg_overlay=dict\(file="
    ):
        recurzoo.create_model("sret_tiny.distill_in1k", pretrained=True)


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
