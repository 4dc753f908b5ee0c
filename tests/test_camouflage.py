"""MSRNet camouflaged object detection: the head, the backbone factory, checkpoints, training, evaluation, CLI.

Training runs use a generated camouflage set (objects textured like their background, written as
image/mask PNG folders under a temporary directory); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import _contract as contract
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from _parity import in_repo_fixture
from _reduced import COD_CASES, REDUCED
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN

import recurzoo
from recurzoo import checkpoint
from recurzoo.heads.camouflage import (
    PYRAMID_REDUCTIONS,
    MultiGranularityFusion,
    ScaleIntegrationUnit,
    checkpoint_filter_fn,
    create_cod_model,
    reset_parameters,
)
from recurzoo.train import camouflage as cod

# The parity fixture: beside the checkout, or under a folder of RECURZOO_PARITY_DIRS (as in test_parity.py).
SMALL_HEAD = REDUCED["camouflage"]
# Three backbone kinds at test width: one of this zoo, a PVTv2 and a CNN.
SMALL_BACKBONES = {
    "hornet_tiny_7x7": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
    "pvt_v2_b0": dict(depths=(1, 1, 1, 1)),
    "resnet18": dict(channels=(16, 32, 64, 128), stem_width=16),
}
BASE = 64
BATCH = "2"
STEPS = 40
LR = {"pvt_v2_b0": "3e-3"}  # per backbone, default 1e-2


# ------------------------------------------------------------------------------ generated data set


def _texture(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth coloured noise: random colours on a coarse grid, bilinearly upsampled, plus fine grain."""
    coarse = torch.from_numpy(rng.uniform(0.25, 0.85, size=(1, 3, cells, cells)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    grain = torch.from_numpy(rng.normal(0.0, 0.04, size=(3, height, width)).astype(np.float32))
    return (smooth + grain).permute(1, 2, 0).numpy()


def _camouflage_pair(rng: np.random.Generator, height: int, width: int):
    """A background texture and an ellipse filled with the same kind of texture, slightly darker."""
    background = _texture(rng, height, width, cells=6)
    foreground = _texture(rng, height, width, cells=6) * 0.7
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image = np.where(inside[..., None], foreground, background)
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image, inside.astype(np.uint8) * 255


def write_camouflage_set(root: Path, count: int, seed: int, image_dir: str = "Image", mask_dir: str = "Mask"):
    """``count`` image/mask PNG pairs of varying original sizes under ``root``."""
    rng = np.random.default_rng(seed)
    (root / image_dir).mkdir(parents=True)
    (root / mask_dir).mkdir(parents=True)
    for index in range(count):
        height, width = (72, 80) if index % 2 else (64, 56)
        image, mask = _camouflage_pair(rng, height, width)
        Image.fromarray(image).save(root / image_dir / f"cam_{index:03d}.png")
        Image.fromarray(mask).save(root / mask_dir / f"cam_{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def camouflage_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cod")
    return dict(
        train=write_camouflage_set(root / "train", 16, seed=1),
        test=write_camouflage_set(root / "test", 6, seed=2, image_dir="Imgs", mask_dir="GT"),
    )


def _train_args(backbone: str, data, output: Path, steps: int, *extra: str):
    kwargs = dict(SMALL_HEAD, backbone_kwargs=SMALL_BACKBONES[backbone])
    return [
        "--backbone",
        backbone,
        "--model-kwargs",
        *[f"{k}={v!r}" for k, v in kwargs.items()],
        "--train-sets",
        str(data["train"]),
        "--test-sets",
        str(data["test"]),
        "--base-size",
        str(BASE),
        "--batch-size",
        BATCH,
        "--steps",
        str(steps),
        "--lr",
        LR.get(backbone, "1e-2"),
        "--backbone-lr-factor",
        "1",
        "--milestone",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--log-every",
        "5",
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_hornet(camouflage_data, tmp_path_factory):
    """One short training run (reused by the resume and CLI tests)."""
    output = tmp_path_factory.mktemp("hornet_run")
    torch.manual_seed(0)
    results = cod.main(_train_args("hornet_tiny_7x7", camouflage_data, output, STEPS, "--eval-at-start"))
    return output, results


# ------------------------------------------------------------------------------------- the model


def _small_model(backbone: str = "hornet_tiny_7x7", **kwargs):
    return create_cod_model(backbone, backbone_kwargs=SMALL_BACKBONES.get(backbone, {}), **dict(SMALL_HEAD, **kwargs))


def test_forward_makes_the_three_scales_and_returns_logits_at_base_size():
    model = _small_model().eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        image_s, image_m, image_l = model.make_scales(x)
        explicit = model.forward_multiscale(image_s, image_m, image_l)
    assert logits.shape == (2, 1, 64, 96)
    assert image_s.shape[-2:] == (96, 144) and image_m.shape[-2:] == (64, 96) and image_l.shape[-2:] == (128, 192)
    torch.testing.assert_close(image_s, F.interpolate(x, size=(96, 144), mode="bilinear", align_corners=False))
    torch.testing.assert_close(logits, explicit, rtol=0, atol=0)


def test_every_decoder_level_receives_all_coarser_outputs():
    """Recursive feedback: shifting one coarser level's output (the others pinned) shifts the finest input by it."""
    model = _small_model().eval()
    fusions = model.decoder.fusions
    outputs, finest_inputs = {}, []
    fusions[0].register_forward_pre_hook(lambda module, args: finest_inputs.append(args[0]))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        recorders = [
            fusions[level].register_forward_hook(
                lambda module, args, output, level=level: outputs.setdefault(level, output)
            )
            for level in (1, 2, 3)
        ]
        model(x)
        for recorder in recorders:
            recorder.remove()
        for shifted in (1, 2, 3):
            pins = [
                fusions[level].register_forward_hook(
                    lambda module, args, output, level=level, shifted=shifted: outputs[level] + float(level == shifted)
                )
                for level in (1, 2, 3)
            ]
            model(x)
            for pin in pins:
                pin.remove()
            # +1 on a coarse map resizes to +1 everywhere at stride 4
            torch.testing.assert_close(finest_inputs[-1] - finest_inputs[0], torch.ones_like(finest_inputs[0]))


def test_scale_attention_weights_are_a_softmax_over_the_three_scales():
    unit = ScaleIntegrationUnit(8, num_groups=2).eval()
    same = torch.rand(1, 8, 4, 4)
    with torch.no_grad():  # equal value maps: a convex combination returns them unchanged
        unit.conv_l = unit.conv_m = unit.conv_s = torch.nn.Identity()
        unit.pre_conv_l = unit.pre_conv_s = torch.nn.Identity()
        unit.value_proj = torch.nn.Identity()
        # same-size max + average pooling doubles the 1.5x/2.0x maps: halve them
        merged = unit(same / 2, same, same / 2)
    torch.testing.assert_close(merged, same)


def test_fusion_unit_rejects_a_single_group():
    with pytest.raises(ValueError, match="at least 2 groups"):
        MultiGranularityFusion(16, num_groups=1)


def test_wrong_channel_count_raises_value_error_naming_model():
    model = _small_model()
    with pytest.raises(ValueError, match=r"msrnet_hornet_tiny_7x7.*3 input channels"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.rand(1, 3, 16, 16))


def test_recurrent_vit_gets_a_vitdet_style_pyramid():
    model = create_cod_model(
        "vit_recurrent_tiny_patch16_224",
        backbone_kwargs=dict(embed_dim=48, num_heads=2, depth=3, num_unique_blocks=1),  # features: last 3 blocks
        **SMALL_HEAD,
    )
    assert [level["reduction"] for level in model.feature_info] == list(PYRAMID_REDUCTIONS)
    assert [level["num_chs"] for level in model.feature_info] == [12, 24, 48, 48]
    logits = model(torch.rand(2, 3, 64, 64))  # training mode: the global-context BatchNorm needs 2 images
    assert logits.shape == (2, 1, 64, 64)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sret_gets_its_missing_stride_4_level_by_a_transposed_conv():
    model = create_cod_model(
        "sret_tiny",
        backbone_kwargs=dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), num_shared_blocks=(1, 1, 1)),
        **SMALL_HEAD,
    )
    assert [level["num_chs"] for level in model.feature_info] == [8, 16, 32, 64]
    assert isinstance(model.neck.levels[0][0], torch.nn.ConvTranspose2d)
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_factory_says_which_strides_are_missing():
    with pytest.raises(ValueError, match=r"'sret_tiny'.*strides \[4\] are missing"):
        create_cod_model("sret_tiny", simple_pyramid=False)


def test_factory_rejects_a_stride_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="stride 14 is not a power of two"):
        create_cod_model("vit_small_patch14_dinov2")


def test_factory_rejects_unknown_backbones():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        create_cod_model("no_such_net")


def test_registered_variants_read_a_stride_4_to_32_pyramid_of_their_backbone():
    expected = {
        "msrnet_pvt_v2_b2": 512,
        "msrnet_pvt_v2_b5": 512,
        "msrnet_hornet_tiny_7x7": 512,
        "msrnet_sret_small": 504,
        "msrnet_resnet50": 2048,
    }
    assert set(expected) <= set(recurzoo.list_models("msrnet_*"))
    for name, deepest in expected.items():
        with torch.device("meta"):
            model = recurzoo.create_model(name)
        assert [level["reduction"] for level in model.feature_info] == [4, 8, 16, 32], name
        assert model.feature_info[-1]["num_chs"] == deepest
        assert model.decoder.laterals[3].reduce.conv.in_channels == deepest
        assert model.pretrained_cfg["input_size"] == (3, 384, 384)


# ------------------------------------------------------------------ construction and timm's model contract

# Registered variants at test size (shared with test_models.py's factory contract).
CONTRACT_CASES = COD_CASES
CONTRACT_SIDE = 32  # the smallest base size: the total stride at scale 1.0


def test_backbone_is_built_once_in_its_features_only_form(monkeypatch):
    calls = []
    create = timm.create_model

    def recording_create(name, **kwargs):
        calls.append((name, kwargs.get("features_only"), kwargs.get("device")))
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording_create)
    recurzoo.create_model("msrnet_resnet50", device="meta", **CONTRACT_CASES["msrnet_resnet50"])
    assert calls == [("resnet50", True, "meta")]


def test_backbone_without_feature_info_is_one_value_error(monkeypatch):
    from timm.models import _registry, build_model_with_cfg

    class PlainNet(torch.nn.Module):
        def __init__(self, in_chans: int = 3, num_classes: int = 1000) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(in_chans, 8, 3)

    def plain_net(pretrained=False, **kwargs):
        return build_model_with_cfg(PlainNet, "plain_net", pretrained, **dict(kwargs, pretrained_cfg={}))

    monkeypatch.setitem(_registry._model_entrypoints, "plain_net", plain_net)
    with pytest.raises(ValueError, match=r"^create_cod_model: backbone 'plain_net' has no feature_info"):
        create_cod_model("plain_net")


@pytest.mark.parametrize("name", CONTRACT_CASES)
def test_meta_build_then_init_weights_gives_a_working_model(name):
    model = contract.assert_meta_init_gives_a_working_model(
        name, (3, CONTRACT_SIDE, CONTRACT_SIDE), **CONTRACT_CASES[name]
    )
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64))
    statistics = model.decoder.mask_conv.bn
    assert statistics.running_mean.eq(0).all() and statistics.running_var.eq(1).all()


def test_full_size_model_built_on_meta_initialises_every_tensor():
    model = recurzoo.create_model("msrnet_pvt_v2_b2", device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    model.init_weights()
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not torch.isfinite(t).all()]
    assert not bad


def test_init_weights_names_backbone_tensors_no_layer_initialises():
    model = create_cod_model(
        "convnext_atto", backbone_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)), **SMALL_HEAD
    )
    before = model.backbone.stem_0.weight.clone()
    with pytest.raises(
        ValueError, match=r"msrnet_convnext_atto\.init_weights: .*'convnext_atto'.*stages_0\.blocks\.0\.gamma"
    ):
        model.init_weights()
    assert torch.equal(model.backbone.stem_0.weight, before)  # nothing half-initialised


def test_reset_parameters_reinitialises_the_decoder_as_at_construction():
    unit = MultiGranularityFusion(8, num_groups=2)
    with torch.no_grad():
        for tensor in unit.parameters():
            tensor.fill_(7.0)
    reset_parameters(unit, "unit")
    assert unit.expand.bn.weight.eq(1).all() and unit.expand.bn.bias.eq(0).all()
    bound = 1 / math.sqrt(unit.expand.conv.weight[0].numel())  # PyTorch's default conv init
    assert 0 < unit.expand.conv.weight.abs().max() <= bound


@pytest.mark.parametrize("name", CONTRACT_CASES)
def test_grad_checkpointing_keeps_gradients(name):
    x = torch.rand(2, 3, CONTRACT_SIDE, CONTRACT_SIDE)
    contract.assert_grad_checkpointing_keeps_gradients(name, x, **CONTRACT_CASES[name])
    model = recurzoo.create_model(name, device="meta", **CONTRACT_CASES[name])
    model.set_grad_checkpointing()
    assert model.backbone.grad_checkpointing


@pytest.mark.parametrize("name", CONTRACT_CASES)
def test_dtype_change_after_a_forward_gives_output_in_the_new_dtype(name):
    model = recurzoo.create_model(name, **CONTRACT_CASES[name])
    contract.assert_dtype_change_after_forward(model, torch.rand(1, 3, CONTRACT_SIDE, CONTRACT_SIDE))


def test_vit_backbone_keeps_its_weight_decay_exclusions_and_grad_checkpointing():
    model = create_cod_model(
        "vit_tiny_patch16_224",
        backbone_kwargs=dict(embed_dim=48, num_heads=2, depth=3, dynamic_img_size=True),
        device="meta",
        **SMALL_HEAD,
    )
    assert {"backbone.model.pos_embed", "backbone.model.cls_token"} <= model.no_weight_decay()
    contract.assert_parameter_groups_match(model)
    model.set_grad_checkpointing()
    assert model.backbone.model.grad_checkpointing


# ------------------------------------------------------------------------------- pretrained backbones


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches; timm must not be asked to download anything."""
    from huggingface_hub import constants

    def no_download(*args, **kwargs):
        raise AssertionError("timm was asked to download weights")

    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", no_download)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_download)
    return tmp_path / "hf"


NARROW_PVT = dict(depths=(1, 1, 1, 1))


@pytest.fixture
def pvt_weights(tmp_path):
    """A narrowed pvt_v2_b0 classifier with random weights, saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("pvt_v2_b0", **NARROW_PVT)
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file(source.state_dict(), str(path))
    return source, path


def _assert_backbone_weights(model, source) -> None:
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight, rtol=0, atol=0)
    ours, theirs = model.backbone.stages_3.blocks[0].attn.kv.weight, source.stages[3].blocks[0].attn.kv.weight
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_pretrained_backbone_offline_fails_within_seconds_naming_the_file(offline):
    from huggingface_hub import constants

    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        create_cod_model("pvt_v2_b0", pretrained_backbone=True, backbone_kwargs=NARROW_PVT, **SMALL_HEAD)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "\n" not in message and message.startswith("create_cod_model: backbone 'pvt_v2_b0'")
    assert f"{constants.ENDPOINT}/timm/pvt_v2_b0.in1k/resolve/main/model.safetensors" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "backbone_kwargs" in message


def test_pretrained_backbone_loads_a_local_file_without_network(offline, pvt_weights):
    source, path = pvt_weights
    backbone_kwargs = dict(NARROW_PVT, pretrained_cfg_overlay=dict(file=str(path)))
    model = create_cod_model("pvt_v2_b0", pretrained_backbone=True, backbone_kwargs=backbone_kwargs, **SMALL_HEAD)
    _assert_backbone_weights(model, source)


def test_pretrained_backbone_reads_the_hugging_face_cache_without_network(offline, pvt_weights):
    source, path = pvt_weights
    repository = offline / "models--timm--pvt_v2_b0.in1k"
    (repository / "snapshots" / "0123abcd").mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0123abcd")
    (repository / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(path.read_bytes())
    model = create_cod_model("pvt_v2_b0", pretrained_backbone=True, backbone_kwargs=NARROW_PVT, **SMALL_HEAD)
    _assert_backbone_weights(model, source)


# ---------------------------------------------------------------------------------- checkpoints


def _to_official_pvt_names(key: str) -> str:
    """timm features_only pvt_v2 names -> the authors' own PVTv2 names (the inverse of the mapping under test)."""
    key = key.replace("patch_embed.", "patch_embed1.")
    key = re.sub(r"stages_(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
    key = re.sub(r"stages_(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", key)
    key = re.sub(r"stages_(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
    return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


def test_checkpoint_with_the_authors_pvt_names_loads_like_the_timm_layout():
    fixture = in_repo_fixture("msrnet", "msrnet_pvt_v2_tiny")
    state = fixture["state_dict"]
    official = {
        ("encoder." + _to_official_pvt_names(k[len("encoder.net.") :]) if k.startswith("encoder.net.") else k): v
        for k, v in state.items()
    }
    assert "encoder.block1.0.mlp.dwconv.dwconv.weight" in official
    from_timm_layout = checkpoint_filter_fn(dict(state))
    from_official = checkpoint_filter_fn({"state_dict": official})
    assert from_official.keys() == from_timm_layout.keys()
    assert all(torch.equal(from_official[k], from_timm_layout[k]) for k in from_official)
    assert not any("temperal" in k or "normalizer" in k for k in from_official)
    model = recurzoo.build_official(fixture["official"]["constructor"], fixture["official"]["kwargs"])
    model.load_state_dict(from_official, strict=True)


def test_five_level_official_checkpoint_is_rejected_clearly():
    with pytest.raises(ValueError, match="five-level"):
        checkpoint_filter_fn({"siu_1.conv_m.conv.weight": torch.zeros(1), "encoder.conv1.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------ loss and schedule


def test_uncertainty_weight_ramps_as_a_half_cosine_from_zero_to_one():
    assert [cod.ual_coefficient(p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx(
        [0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, 1.0]
    )


def test_loss_is_bce_plus_weighted_uncertainty():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    loss, parts = cod.cod_loss(logits, mask, progress=0.5)
    p = logits.sigmoid()
    bce = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean()
    uncertainty = (1 - (2 * p - 1) ** 2).mean()
    assert float(loss) == pytest.approx(float(bce + 0.5 * uncertainty), rel=1e-6)
    assert parts["ual_weight"] == pytest.approx(0.5)


def test_step_schedule_drops_the_rate_tenfold_at_two_thirds():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    scheduler = cod.step_schedule(optimizer, total_steps=30)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:19] == [1.0] * 19 and rates[19:] == pytest.approx([0.1] * 11)


def test_optimizer_freezes_the_pvt_patch_embedding_and_slows_the_backbone():
    model = _small_model("pvt_v2_b0")
    optimizer = cod.build_optimizer(model, lr=1e-4)
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["lr"] == pytest.approx(1e-5) and head_group["lr"] == pytest.approx(1e-4)
    assert len(head_group["params"]) == len(list(model.decoder.parameters()))


# ---------------------------------------------------------------------------------------- datasets


def test_dataset_skips_unreadable_images_with_a_counted_warning(tmp_path):
    root = write_camouflage_set(tmp_path / "set", 4, seed=3)
    (root / "Image" / "cam_001.png").write_bytes(b"not an image")
    (root / "Image" / "cam_002.png").write_bytes(b"")
    with pytest.warns(cod.DatasetWarning, match=r"skipped 2 of 4 .*cam_001\.png.*cam_002\.png"):
        samples = cod.find_pairs(cod.resolve_dataset(str(root)))
    assert [s.name for s in samples] == ["cam_000", "cam_003"]


def test_images_without_a_mask_are_left_out_with_a_warning_naming_them(tmp_path):
    root = write_camouflage_set(tmp_path / "set", 3, seed=3)
    (root / "Mask" / "cam_001.png").unlink()
    with pytest.warns(cod.DatasetWarning, match=r"1 images have no mask .* left out: .*Image/cam_001\.png"):
        samples = cod.find_pairs(cod.resolve_dataset(str(root)), require_masks=False)
    assert [s.name for s in samples] == ["cam_000", "cam_002"]


def test_size_mismatch_warning_names_both_files(tmp_path):
    root = write_camouflage_set(tmp_path / "set", 2, seed=4)
    Image.new("L", (10, 12)).save(root / "Mask" / "cam_000.png")
    with pytest.warns(cod.DatasetWarning, match=r"Image/cam_000\.png \(56x64\) vs .*Mask/cam_000\.png \(10x12\)"):
        samples = cod.find_pairs(cod.resolve_dataset(str(root)))
    item = cod.CamouflageTrainSet(samples, base_size=32, augment=False)[0]
    assert item["image_m"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)


def test_dataset_yaml_in_the_official_layout(tmp_path):
    write_camouflage_set(tmp_path / "NC4K", 3, seed=5, image_dir="Imgs", mask_dir="GT")
    config = tmp_path / "dataset.yaml"
    config.write_text(
        f"nc4k: {{root: '{tmp_path / 'NC4K'}', image: {{path: Imgs, suffix: .png}}, "
        f"mask: {{path: GT, suffix: .png}}}}\n"
    )
    specs = cod.load_dataset_config(str(config))
    assert len(cod.find_pairs(cod.resolve_dataset("nc4k", specs))) == 3


def test_empty_dataset_fails_before_training_starts(tmp_path, camouflage_data):
    (tmp_path / "empty" / "Image").mkdir(parents=True)
    (tmp_path / "empty" / "Mask").mkdir()
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"dataset 'empty': no readable image/mask pairs"):
        cod.main(_train_args("hornet_tiny_7x7", dict(camouflage_data, train=tmp_path / "empty"), output, 2))
    assert not (output / "last.pt").exists()


def test_training_sample_gives_three_scales_and_a_binary_mask_at_base_size(camouflage_data):
    samples = cod.find_pairs(cod.resolve_dataset(str(camouflage_data["train"])))
    item = cod.CamouflageTrainSet(samples, base_size=BASE)[1]
    assert [tuple(item[n].shape) for n in cod.SCALE_NAMES] == [(3, 96, 96), (3, 64, 64), (3, 128, 128)]
    assert 0.0 <= float(item["image_l"].min()) and float(item["image_l"].max()) <= 1.0
    assert float(item["mask"].min()) == 0.0 and float(item["mask"].max()) == 1.0


# --------------------------------------------------------------------------- training and evaluation


def _assert_trained(output: Path, results, test_root: Path) -> None:
    start, end = results["initial_metrics"]["test"], results["metrics"]["test"]
    assert end["mae"] < 0.8 * start["mae"], (start["mae"], end["mae"])
    assert set(end) >= {"sm", "wfm", "mae", "mean_em", "max_em", "mean_fm", "images"} and end["images"] == 6
    assert json.loads((output / "eval" / "metrics.json").read_text())["test"]["mae"] == pytest.approx(end["mae"])
    assert "| test | 6 |" in (output / "eval" / "metrics.md").read_text()
    for image_path in sorted((test_root / "Imgs").glob("*.png")):
        prediction = Image.open(output / "eval" / "test" / image_path.name)
        assert prediction.size == Image.open(image_path).size and prediction.mode == "L"


def test_hornet_cod_model_learns_the_generated_set(trained_hornet, camouflage_data):
    output, results = trained_hornet
    _assert_trained(output, results, camouflage_data["test"])
    assert len(results["history"]) == STEPS and (output / "model.safetensors").exists()


@pytest.mark.parametrize("backbone", ["pvt_v2_b0", "resnet18"])
def test_cod_model_learns_the_generated_set(backbone, camouflage_data, tmp_path):
    torch.manual_seed(0)
    results = cod.main(
        _train_args(backbone, camouflage_data, tmp_path, STEPS, "--eval-at-start", "--save-every", "100")
    )
    _assert_trained(tmp_path, results, camouflage_data["test"])


def test_training_resumes_from_its_last_checkpoint(trained_hornet, camouflage_data, tmp_path):
    output, results = trained_hornet
    (tmp_path / "last.pt").write_bytes((output / "last.pt").read_bytes())
    resumed = cod.main(_train_args("hornet_tiny_7x7", camouflage_data, tmp_path, STEPS + 2, "--resume", "auto"))
    assert len(resumed["history"]) == STEPS + 2 and resumed["history"][:STEPS] == results["history"]


def test_cod_command_writes_masks_and_metrics(trained_hornet, camouflage_data, tmp_path):
    from recurzoo.cli import main as cli

    output, results = trained_hornet
    single = sorted((camouflage_data["train"] / "Image").glob("*.png"))[1]
    code = cli(
        [
            "cod",
            str(camouflage_data["test"]),
            str(single),
            "--checkpoint",
            str(output / "model.safetensors"),
            "--out",
            str(tmp_path),
            "--base-size",
            str(BASE),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["mae"] == pytest.approx(results["metrics"]["test"]["mae"], abs=1e-6)
    assert Image.open(tmp_path / "images" / single.name).size == Image.open(single).size


def test_cod_command_never_writes_over_an_input_or_an_earlier_run(trained_hornet, camouflage_data, tmp_path, capsys):
    """Every mask is placed before the model loads: an input is never replaced (not even with
    ``--overwrite``), an earlier mask only with ``--overwrite``, and no two inputs share a mask."""
    from recurzoo.cli import main as cli

    output, _ = trained_hornet
    photos = tmp_path / "photos"
    photos.mkdir()
    source = sorted((camouflage_data["train"] / "Image").glob("*.png"))[0]
    (photos / "a.png").write_bytes(source.read_bytes())
    common = ["--checkpoint", str(output / "model.safetensors"), "--base-size", str(BASE), "--device", "cpu"]

    def run(*argv: str) -> str:
        code = cli(["cod", *argv, *common])
        lines = capsys.readouterr().err.strip().splitlines()
        return f"{code} {lines[-1] if lines else ''}"

    # the masks of folder 'photos' go to OUT/photos/: with OUT the folder's parent, onto the photos
    for overwrite in ([], ["--overwrite"]):
        assert "would overwrite the input" in run(str(photos), "--out", str(tmp_path), *overwrite)
    assert (photos / "a.png").read_bytes() == source.read_bytes()
    assert run(str(photos), "--out", str(tmp_path / "masks")).startswith("0")
    mask = (tmp_path / "masks" / "photos" / "a.png").read_bytes()
    (tmp_path / "masks" / "photos" / "a.png").write_bytes(b"an earlier run")
    assert re.search("^2 .*1 output file.*--overwrite", run(str(photos), "--out", str(tmp_path / "masks")))
    assert (tmp_path / "masks" / "photos" / "a.png").read_bytes() == b"an earlier run"
    assert run(str(photos), "--out", str(tmp_path / "masks"), "--overwrite").startswith("0")
    assert (tmp_path / "masks" / "photos" / "a.png").read_bytes() == mask

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.png").write_bytes(source.read_bytes())
    clash = run(str(photos / "a.png"), str(other / "a.png"), "--out", str(tmp_path / "clash"))
    assert re.search("^2 .*several inputs would be written to the same file", clash)
    (other / "a.jpg").write_bytes(source.read_bytes())
    assert re.search("^2 .*a.jpg, a.png.*matched by name", run(str(other), "--out", str(tmp_path / "stems")))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert re.search("^2 .*wrote nothing", run(str(tmp_path / "broken.png"), "--out", str(tmp_path / "none")))
    assert not any((tmp_path / name).exists() for name in ("clash", "stems", "none"))


def test_cod_command_names_what_another_models_checkpoint_lacks(tmp_path, capsys):
    from recurzoo.cli import main as cli

    weights = checkpoint.save_weights(timm.create_model("hornet_tiny_7x7", **REDUCED["hornet"]), tmp_path / "w.pth")
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 32), (90, 120, 30)).save(photo)
    argv = ["cod", str(photo), "--model", "msrnet_resnet50", "--checkpoint", str(weights), "--out", str(tmp_path / "o")]
    assert cli([*argv, "--base-size", "32"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"w.safetensors: checkpoint does not fit msrnet_resnet50 .*: \d+ missing keys: .*\(\d+ more", line)


def test_cod_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from recurzoo.cli import main as cli

    code = cli(
        [
            "cod",
            str(tmp_path / "missing"),
            "--model",
            "msrnet_pvt_v2_b2",
            "--checkpoint",
            "x.pt",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "missing" in capsys.readouterr().err
