"""Recurrent ViT: conversion, phase discovery, relaxations, cost against the untied ViT, timm's model
contract (factory arguments, pruning, fx, grad checkpointing), distillation."""

from __future__ import annotations

import copy
import functools
import itertools
import os

import _contract as contract
import numpy as np
import pytest
import timm
import torch
from _reduced import REDUCED
from _train_data import cli_flags
from PIL import Image

import recurzoo
from recurzoo.backbones.recurrent_vit import (
    RecurrentViT,
    checkpoint_filter_fn,
    even_phases,
    find_phases,
    from_vit,
    layer_similarity,
    segment_phases,
    vit_step_tokens,
)
from recurzoo.export.flops import count_flops, count_params
from recurzoo.plots import save_phase_heatmap
from recurzoo.train import distill_recurrent

MODELS = recurzoo.list_models("vit_recurrent_*")
TINY = "vit_recurrent_tiny_patch16_224"
RELAXED = dict(depth_conditioning=True, lora_rank=2)  # the step parts: every tensor kind the model has
UNTIED = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224"}


def _untied_name(name: str) -> str:
    return UNTIED[name.split("_")[2]]


def _k(name: str) -> int:
    return 3 if name.endswith("_k3") else 2


@functools.lru_cache(maxsize=None)
def _flops_and_block_params(name: str):
    model = recurzoo.create_model(name)
    return count_flops(model), count_params(model.blocks), count_params(model)


def _tiny_vit(**kwargs) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=5)
    args.update(kwargs)
    return recurzoo.create_model("vit_tiny_patch16_224", **args).eval()


def _tiny_recurrent(**kwargs) -> RecurrentViT:
    args = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=5, phases=[2, 2])
    args.update(kwargs)
    return recurzoo.create_model(TINY, **args).eval()


def _reduced(**kwargs) -> RecurrentViT:
    """The reduced configuration of the zoo's tests: 6 steps of 2 shared blocks, width 32."""
    return recurzoo.create_model(TINY, **REDUCED["recurrent_vit"], **kwargs)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its start, so that the step conditioning and LoRA change the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_registry_has_tiny_small_base_with_two_and_three_shared_blocks():
    for width in ("tiny", "small", "base"):
        assert f"vit_recurrent_{width}_patch16_224" in MODELS and f"vit_recurrent_{width}_patch16_224_k3" in MODELS
    assert recurzoo.create_model("vit_recurrent_small_patch16_224").phases == [6, 6]
    assert recurzoo.create_model("vit_recurrent_tiny_patch16_224_k3").phases == [4, 4, 4]
    assert recurzoo.create_model("vit_recurrent_tiny_patch16_224", phases=[7, 5]).schedule[6:8] == [(0, 6), (1, 0)]
    assert even_phases(12, 5) == [3, 3, 2, 2, 2]


def test_phases_not_summing_to_depth_raise_value_error():
    with pytest.raises(ValueError, match=r"sum.*depth=12.*\[6, 5\]"):
        recurzoo.create_model("vit_recurrent_tiny_patch16_224", phases=[6, 5])


def test_fixed_size_model_rejects_other_sizes_with_value_error_naming_it():
    model = _tiny_recurrent(dynamic_img_size=False)  # built for 32x32 only
    with pytest.raises(ValueError, match=r"vit_recurrent_tiny_patch16_224: expects 32x32"):
        model(torch.randn(1, 3, 48, 48))
    dynamic = _tiny_recurrent()  # registered models resample their position embedding
    with pytest.raises(ValueError, match=r"vit_recurrent_tiny_patch16_224.*multiples of 8"):
        dynamic(torch.randn(1, 3, 44, 44))
    assert dynamic(torch.randn(1, 3, 48, 40)).shape == (1, 5)


@pytest.mark.parametrize("name", MODELS)
def test_flops_equal_the_untied_vit_and_block_params_are_k_over_depth(name):
    flops, block_params, params = _flops_and_block_params(name)
    vit_flops, vit_block_params, vit_params = _flops_and_block_params(_untied_name(name))
    assert flops == vit_flops
    assert block_params * 12 == vit_block_params * _k(name)
    assert params - block_params == vit_params - vit_block_params  # embeddings, norms and head unchanged


@pytest.mark.parametrize(
    "vit_kwargs",
    [
        dict(reg_tokens=2, init_values=0.1, no_embed_class=True, qk_norm=True),
        dict(class_token=False, global_pool="avg", dynamic_img_size=True),
    ],
)
def test_from_vit_with_one_step_phases_computes_the_source_vit(vit_kwargs):
    vit = _tiny_vit(**vit_kwargs)
    with torch.no_grad():  # layer scales and biases away from their defaults, so every part shows
        for parameter in vit.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model = from_vit(vit, [1] * 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - vit(x)).abs().max() < 1e-5
        ours = model.forward_intermediates(x, output_fmt="NLC", norm=True)[1]
        theirs = vit.forward_intermediates(x, output_fmt="NLC", norm=True)[1]
    assert len(ours) == 4
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-5


def test_from_vit_copies_each_phase_middle_block():
    vit = _tiny_vit(depth=6)
    model = from_vit(vit, [3, 1, 2])
    for shared, source in zip(model.blocks, (1, 3, 4)):
        assert torch.equal(shared.attn.qkv.weight, vit.blocks[source].attn.qkv.weight)
        assert torch.equal(shared.mlp.fc2.bias, vit.blocks[source].mlp.fc2.bias)
    first = from_vit(vit, [3, 1, 2], source_block="first")
    assert torch.equal(first.blocks[2].norm1.weight, vit.blocks[4].norm1.weight)


def test_checkpoint_filter_loads_an_untied_vit_state_dict_like_from_vit():
    vit = _tiny_vit(depth=6)
    model = _tiny_recurrent(depth=6, phases=[4, 2])
    model.load_state_dict(checkpoint_filter_fn(vit.state_dict(), model))
    reference = from_vit(vit, [4, 2]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    own = checkpoint_filter_fn({"model": model.state_dict()}, model)
    assert own.keys() == model.state_dict().keys()


def test_untied_vit_checkpoint_file_loads_through_pretrained_cfg_overlay(tmp_path):
    vit = _tiny_vit(depth=6, num_classes=1000)
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)  # a training-checkpoint wrapper, read by recurzoo.checkpoint
    args = dict(img_size=32, patch_size=8, depth=6, embed_dim=32, num_heads=2, phases=[4, 2])
    model = recurzoo.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), from_vit(vit, [4, 2]).eval()(x), rtol=0, atol=1e-6)


def test_depth_conditioning_and_lora_start_at_identity_and_receive_gradients():
    plain = _tiny_recurrent()
    relaxed = _tiny_recurrent(depth_conditioning=True, lora_rank=3)
    missing, unexpected = relaxed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".depth_scale." in k or ".lora." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(relaxed(x), plain(x))
    relaxed.train()
    relaxed(x).square().sum().backward()
    for block in relaxed.blocks:
        assert block.depth_scale.mlp.fc2.weight.grad.abs().sum() > 0
        assert block.depth_scale.mlp.fc2.bias.grad.abs().sum() > 0
        assert set(block.lora.keys()) == {"qkv", "proj", "fc1", "fc2"}
        for lora in block.lora.values():
            assert lora.up.grad.abs().sum() > 0
    # the relaxations change the function once they move from their start
    with torch.no_grad():
        relaxed.blocks[0].lora["fc1"].up.add_(0.1)
        relaxed.blocks[1].depth_scale.mlp.fc2.bias.add_(0.1)
        assert (relaxed.eval()(x) - plain(x)).abs().max() > 1e-3


def test_lora_svd_init_with_full_rank_recovers_each_step_weights():
    vit = _tiny_vit()
    model = from_vit(vit, [2, 2], lora_rank=32, lora_init="svd")
    for block, start in zip(model.blocks, (0, 2)):
        for step in range(2):
            merged = block.attn.qkv.weight + block.lora["qkv"].delta(step)
            torch.testing.assert_close(merged, vit.blocks[start + step].attn.qkv.weight, rtol=0, atol=1e-5)


def test_features_only_is_single_scale_at_stride_16_one_map_per_requested_step():
    full = recurzoo.create_model("vit_recurrent_tiny_patch16_224").eval()
    features = recurzoo.create_model("vit_recurrent_tiny_patch16_224", features_only=True, out_indices=(1, 4)).eval()
    missing, _ = features.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert features.feature_info.reduction() == [16, 16]
    assert len(features.model.blocks) == 1  # steps after 4 (the second shared block) were pruned
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        maps = features(x)
        expected = full.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 192, 4, 5)] * 2
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs)


def test_forward_intermediates_gives_one_output_per_step_with_prefix_tokens():
    model = _tiny_recurrent(reg_tokens=2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, steps = model.forward_intermediates(x, return_prefix_tokens=True)
    assert len(steps) == 4
    assert steps[0][0].shape == (1, 32, 4, 4) and steps[0][1].shape == (1, 3, 32)


# --------------------------------------------------------------------------------------------------
# timm's model contract, on the reduced configuration (6 steps of 2 shared blocks, width 32)
# --------------------------------------------------------------------------------------------------


def test_old_rvit_names_build_the_renamed_models_with_a_warning_and_leave_the_listings():
    for old in ("rvit_tiny_patch16_224", "rvit_base_patch16_224_k3"):
        with pytest.warns(UserWarning, match=f"deprecated model name {old} to current vit_recurrent_"):
            model = recurzoo.create_model(old, device="meta", **REDUCED["recurrent_vit"])
        assert model.pretrained_cfg["architecture"] == old.replace("rvit_", "vit_recurrent_")
    assert not recurzoo.list_models("rvit_*") and not timm.list_models("rvit_*")
    assert len(timm.list_models("vit_recurrent_*")) == 6


def test_meta_built_model_initialises_its_step_times_and_computes_like_an_eager_one():
    model = contract.assert_meta_init_gives_a_working_model(TINY, (3, 32, 32), **REDUCED["recurrent_vit"], **RELAXED)
    for block, start in zip(model.blocks, (0, 3)):
        expected = (torch.arange(start, start + 3, dtype=torch.float64) + 1) / 6
        torch.testing.assert_close(block.step_times.flatten(), expected)
        assert not block.depth_scale.mlp.fc2.weight.any() and not any(lora.up.any() for lora in block.lora.values())
    # the step times are not in the state dict: only right ones give the eager model's output
    eager = _perturbed(_reduced(**RELAXED).double()).eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))


def test_dtype_change_after_a_forward_gives_outputs_in_the_new_dtype():
    model = _perturbed(_reduced(**RELAXED))
    x = torch.randn(1, 3, 32, 32)
    contract.assert_dtype_change_after_forward(model, x, dtype=torch.bfloat16, max_relative_error=0.05)


def test_parameter_groups_and_no_weight_decay_name_the_model_parameters():
    from timm.models import group_parameters

    for kwargs in (dict(), dict(reg_tokens=2, class_token=False, global_pool="avg")):
        model = _reduced(device="meta", **kwargs)
        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        assert len(set(groups.values())) > 1
        names = {name for name, _ in model.named_parameters()}
        for pattern in model.no_weight_decay():  # a token this configuration does not have is allowed
            assert pattern in names or getattr(model, pattern) is None, pattern
        assert "pos_embed" in names and ("reg_token" in names) == bool(kwargs)


def test_reset_classifier_keeps_the_pooling_and_the_parent_device_dtype_and_mode():
    model = _perturbed(_reduced(global_pool="avg", num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    features, _ = contract.assert_reset_classifier_keeps_the_pooling(model, x)
    with torch.no_grad():
        class_token = model.fc_norm(features[:, 0])
    torch.testing.assert_close(contract.pre_logits_after_reset(model, features, "token"), class_token)
    for pool in ("map", "catavgmax"):  # a ValueError, and the AssertionError timm's models raise
        with pytest.raises(ValueError, match="global_pool must be"):
            model.reset_classifier(5, pool)
        with pytest.raises(AssertionError):
            recurzoo.create_model(TINY, device="meta", global_pool=pool, **REDUCED["recurrent_vit"])
    contract.assert_reset_classifier_takes_the_parent_device_dtype_and_mode(model)


def test_frozen_parameters_stay_frozen_through_reset_classifier_and_set_input_size():
    model = _reduced()
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, "")
    model.set_input_size(img_size=(64, 48), patch_size=8)
    assert model.pos_embed.shape[1] == 1 + 8 * 6
    assert not [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def test_set_input_size_resamples_the_position_embedding_as_dynamic_sizing_does():
    from timm.models import get_model_input_config

    x = torch.randn(1, 3, 64, 64)
    fixed = _perturbed(_reduced(img_size=32, dynamic_img_size=False)).eval()
    dynamic = _reduced(img_size=32).eval()
    dynamic.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        expected = dynamic(x)  # the 2x2-patch position embedding resampled to 4x4 on the fly
        fixed.set_input_size(img_size=64)
        torch.testing.assert_close(fixed(x), expected)
    assert fixed.pos_embed.shape == (1, 1 + 16, 32)
    assert get_model_input_config(fixed)["input_size"] == (3, 64, 64)  # what timm's data config now resolves
    with pytest.raises(ValueError, match=f"{TINY}: expects 64x64"):
        fixed(torch.randn(1, 3, 32, 32))
    fixed.set_input_size(patch_size=8)  # the patch embedding resampled, the feature stride follows
    maps = fixed.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert maps[0].shape == (1, 32, 8, 8) and fixed.feature_info[0]["reduction"] == 8


def test_forward_intermediates_are_each_steps_patch_tokens_and_end_at_forward_features():
    model = _perturbed(_reduced(reg_tokens=1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        steps = vit_step_tokens(model, x)[1:]
        torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
        sequences = model.forward_intermediates(x, output_fmt="NLC", norm=True, intermediates_only=True)
    assert len(maps) == len(model.feature_info) == 6
    for feature_map, sequence, tokens in zip(maps, sequences, steps):
        assert feature_map.shape == (2, 32, 4, 4)
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens[:, 2:])
        torch.testing.assert_close(sequence, model.norm(tokens)[:, 2:])


def test_prune_intermediate_layers_meets_timms_contract():
    """timm's test_prune_intermediate_layers_contract, on a model whose pruned phases end mid-phase: the
    pruned model keeps the phases up to the tap and only the shared blocks they use."""
    model = _perturbed(_reduced(**RELAXED)).eval()
    contract.assert_prune_intermediate_layers_contract(model, torch.randn(2, 3, 32, 32))
    for i in range(len(model.feature_info)):
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([i])
        assert (len(pruned.schedule), len(pruned.blocks)) == (i + 1, 1 if i < 3 else 2)


def test_pruned_models_use_every_parameter_and_stay_deterministic_in_eval():
    """timm's test_prune_intermediate_layers_params_used (DDP needs every kept parameter used)."""
    model = _reduced(drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    last = len(model.feature_info) - 1
    for indices, prune_norm in (([0], False), ([last], False), (list(range(last + 1)), True)):
        pruned = copy.deepcopy(model).train()
        take_indices = pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        features = pruned.forward_intermediates(x, indices=take_indices, norm=not prune_norm, intermediates_only=True)
        sum(f.sum() for f in features).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]
        pruned = copy.deepcopy(model).eval()
        pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        with torch.no_grad():
            assert torch.equal(pruned(x), pruned(x))


def test_fx_traces_the_whole_model_forward_and_backward():
    model = _perturbed(_reduced(num_classes=5, **RELAXED))
    x = torch.randn(2, 3, 32, 32)
    contract.assert_torchvision_feature_extractor(model, x)
    contract.assert_fx_trains_the_whole_model(model, x)


def test_fx_features_are_the_tokens_after_each_requested_step():
    eager = _perturbed(_reduced(**RELAXED)).eval()
    traced = recurzoo.create_model(
        TINY, features_only=True, feature_cls="fx", out_indices=(1, 3, 5), **REDUCED["recurrent_vit"], **RELAXED
    ).eval()
    assert traced.feature_info.module_name() == ["blocks.0_1", "blocks.1", "blocks.1_2"]
    missing, _ = traced.graph_module.load_state_dict(eager.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        steps = vit_step_tokens(eager, x)
    contract.assert_fx_features_match(traced, x, [steps[step + 1] for step in (1, 3, 5)])
    with pytest.raises(ValueError, match=f"{TINY}: expects height and width that are multiples of 16"):
        traced(torch.randn(1, 3, 40, 40))  # the input check is part of the traced graph


def test_grad_checkpointing_keeps_gradients_of_the_classifier_and_of_features_only():
    x = torch.randn(2, 3, 32, 32)
    contract.assert_grad_checkpointing_keeps_gradients(TINY, x, **REDUCED["recurrent_vit"], **RELAXED)
    contract.assert_features_only_grad_checkpointing_keeps_gradients(TINY, x, (1, 4), **REDUCED["recurrent_vit"])


def test_vit_step_tokens_of_a_timm_vit_are_its_blocks_input_and_outputs():
    vit = _tiny_vit(reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit_step_tokens(vit, x)
        blocks = vit.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        converted = vit_step_tokens(from_vit(vit, [1] * 4), x)
    assert len(tokens) == 5
    for ours, (patches, prefix) in zip(tokens[1:], blocks):
        torch.testing.assert_close(ours, torch.cat([prefix, patches], dim=1))
    torch.testing.assert_close(tokens[0], converted[0])
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in vit.blocks)


def test_segment_phases_is_the_exact_optimum():
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        similarity = torch.rand(7, 7, generator=generator)
        distance = 1 - (similarity + similarity.T) / 2
        for k in range(1, 5):

            def cost(lengths, distance=distance):
                edges = np.cumsum([0] + list(lengths))
                return sum(distance[a:b, a:b].sum().item() for a, b in zip(edges[:-1], edges[1:]))

            candidates = [c for c in itertools.product(range(1, 8), repeat=k) if sum(c) == 7]
            best = min(cost(c) for c in candidates)
            assert cost(segment_phases(similarity, k)) == pytest.approx(best, abs=1e-9)


def test_find_phases_recovers_a_vit_built_with_known_phases(tmp_path):
    # blocks 1, 3 and 4 are identities (zero output projections), so the block outputs are
    # A A B B B C: phases [2, 3, 1] have zero within-phase distance and any other split does not.
    vit = _tiny_vit(depth=6)
    with torch.no_grad():
        for index, block in enumerate(vit.blocks):
            for layer in (block.attn.proj, block.mlp.fc2):
                if index in (1, 3, 4):
                    layer.weight.zero_()
                    layer.bias.zero_()
                else:
                    layer.weight.normal_(0, 0.5)
    images = [torch.randn(4, 3, 32, 32), (torch.randn(4, 3, 32, 32), torch.zeros(4))]
    similarity = layer_similarity(vit, images)
    assert similarity.shape == (6, 6)
    assert similarity[0, 1] == pytest.approx(1.0, abs=1e-5) and similarity[1, 2] < 0.99
    pytest.importorskip("matplotlib")
    path = tmp_path / "similarity.png"
    split = find_phases(vit, images, k=3)
    assert split.phases == [2, 3, 1] and split.boundaries == [2, 5]
    save_phase_heatmap(split, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_image_folder(root, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).save(folder / f"{index}.png")


def _block_recurrent_teacher(path) -> list:
    """A random tiny ViT whose blocks come in two similar pairs (as in a trained ViT), saved to ``path``."""
    kwargs = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=2)
    teacher = recurzoo.create_model("vit_tiny_patch16_224", **kwargs)
    with torch.no_grad():
        for block in teacher.blocks:
            for parameter in block.parameters():
                if parameter.ndim == 2:
                    parameter.normal_(0, 0.05)
        for source, target in ((0, 1), (2, 3)):
            for a, b in zip(teacher.blocks[source].parameters(), teacher.blocks[target].parameters()):
                b.copy_(a + 0.1 * a.std() * torch.randn_like(a) if a.ndim == 2 else a)
    torch.save(teacher.state_dict(), path)
    return [f"{key}={value}" for key, value in kwargs.items()]


@pytest.fixture
def distill_args(tmp_path):
    """Writes a small image folder and a block-recurrent teacher into ``tmp_path``; returns the command line
    of a short CPU distillation of that teacher into k=2 shared blocks, writing ``tmp_path/output``
    (``options`` add or override flags, ``extra`` follow them)."""
    _write_image_folder(tmp_path / "data")
    teacher_kwargs = _block_recurrent_teacher(tmp_path / "teacher.pth")

    def args(output: str, *extra: str, **options) -> list:
        defaults = dict(
            k=2, data_dir=tmp_path / "data", split=".", batch_size=8, workers=0, init="random", device="cpu"
        )  # split ".": the class folders are directly in data/
        return [
            "--teacher",
            "vit_tiny_patch16_224",
            "--teacher-kwargs",
            *teacher_kwargs,
            "--teacher-checkpoint",
            str(tmp_path / "teacher.pth"),
            "--output",
            str(tmp_path / output),
            "--no-progress",
            *cli_flags(**{**defaults, **options}),
            *extra,
        ]

    return args


def test_distillation_drives_every_step_error_well_below_its_start_and_resumes(tmp_path, distill_args):
    output = tmp_path / "run"

    def argv(stage2_steps: int, *extra: str) -> list:
        recipe = dict(eval_images=16, stage1_steps=30, lr1="1e-3", lr2="3e-4", depth_conditioning=True, lora_rank=2)
        return distill_args("run", *extra, stage2_steps=stage2_steps, **recipe)

    result = distill_recurrent.main(argv(30))
    assert result["phases"] == [2, 2]
    initial, final = np.array(result["step_errors"]["initial"]), np.array(result["step_errors"]["final"])
    assert len(initial) == 4
    assert (final < 0.4 * initial).all(), (initial, final)
    assert final.mean() < 0.2 * initial.mean(), (initial, final)
    for name in ("student.safetensors", "student_config.json", "last.pt", "similarity.png", "step_errors.json"):
        assert (output / name).exists(), name
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]

    # resume: the finished stage 2 goes on for 5 more steps from its checkpoint, stage 1 is not rerun
    resumed = distill_recurrent.main(argv(35, "--resume", "auto"))
    assert len(resumed["history"]["stage1"]) == 30 and len(resumed["history"]["stage2"]) == 35
    assert resumed["history"]["stage2"][:30] == result["history"]["stage2"]


def test_distillation_stops_on_a_signal_or_a_nan_keeping_a_checkpoint_it_resumes_from(tmp_path, distill_args):
    from recurzoo.train import run

    def argv(output: str, *extra: str) -> list:
        return distill_args(output, *extra, eval_images=8, stage1_steps=4, stage2_steps=4, save_every=2)

    with pytest.raises(run.TrainingInterrupted):  # SIGTERM at the second step of stage 2
        distill_recurrent.main(argv("signal", "--fail-at-step", "5", "--fail-mode", "sigterm"))
    state = torch.load(tmp_path / "signal/last.pt", weights_only=True)
    assert (state["stage"], state["step"]) == (2, 1)  # the step in flight is trained again on resume
    resumed = distill_recurrent.main(argv("signal", "--resume", "auto"))
    assert len(resumed["history"]["stage2"]) == 4

    with pytest.raises(run.NonFiniteLossError):  # a NaN at stage 1's fourth step: the step-2 checkpoint stays
        distill_recurrent.main(argv("nan", "--fail-at-step", "3", "--fail-mode", "nan"))
    state = torch.load(tmp_path / "nan/last.pt", weights_only=True)
    assert (state["stage"], state["step"]) == (1, 2)


def test_distillation_help_needs_no_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill_recurrent.main(["--help"])
    assert exit_info.value.code == 0
    assert "--teacher" in capsys.readouterr().out
