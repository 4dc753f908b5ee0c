"""Super-resolution heads, tiled inference, metrics, data layouts, training and the ``sr`` command."""

from __future__ import annotations

import json
from pathlib import Path

import _contract as contract
import numpy as np
import pytest
import torch
from _train_data import kwargs_flags
from PIL import Image
from torch import nn

import recurzoo
from recurzoo.apps import super_resolve_demo
from recurzoo.cli import main as cli_main
from recurzoo.heads.super_resolution import (
    DIV2K_RGB_MEAN,
    ChannelsLastPixelShuffle,
    OneStepPixelShuffle,
    PixelShuffleUpsampler,
    SuperResolutionModel,
    blend_weights,
    create_sr_model,
    tiled_super_resolve,
)
from recurzoo.images import read_image
from recurzoo.train import super_resolution as sr_train

TINY = dict(embed_dim=24, num_heads=2, blocks_per_group=2)


def _model_flags(name: str = "rgt_small_x2") -> list:
    """``--model NAME --model-kwargs ...`` at the test width ``TINY``."""
    return ["--model", name, "--model-kwargs", *kwargs_flags(TINY)]


# ---------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("scale,shuffles", [(2, 1), (3, 1), (4, 2), (8, 3)])
def test_pixel_shuffle_upsampler_has_one_stage_per_factor(scale, shuffles):
    head = PixelShuffleUpsampler(16, scale)
    assert sum(isinstance(m, nn.PixelShuffle) for m in head.upsample) == shuffles
    assert head(torch.randn(2, 16, 5, 7)).shape == (2, 3, 5 * scale, 7 * scale)


@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_pixel_shuffle_is_pixel_shuffle_with_a_channels_last_result(scale, memory_format):
    x = torch.randn(2, 5 * scale * scale, 4, 6).contiguous(memory_format=memory_format)
    shuffled = ChannelsLastPixelShuffle(scale)(x)
    assert torch.equal(shuffled, nn.functional.pixel_shuffle(x, scale))
    assert shuffled.is_contiguous(memory_format=torch.channels_last)


def test_pixel_shuffle_upsampler_rejects_unsupported_scales():
    with pytest.raises(ValueError, match="power of two or 3"):
        PixelShuffleUpsampler(16, 5)


@pytest.mark.parametrize("scale", [2, 3, 4, 5])
def test_one_step_head_is_a_single_conv_and_shuffle(scale):
    head = OneStepPixelShuffle(16, scale, out_chans=3)
    assert head.conv.out_channels == 3 * scale**2
    assert head(torch.randn(1, 16, 6, 4)).shape == (1, 3, 6 * scale, 4 * scale)


class _ConvBody(nn.Module):
    """A stride-1 conv backbone with timm's minimal interface and a receptive field of 5 pixels."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.in_chans, self.num_features = 3, width
        self.feature_info = [dict(num_chs=width, reduction=1, module="convs")]
        self.convs = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class _RecordingBody(_ConvBody):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return torch.zeros(x.shape[0], self.num_features, *x.shape[-2:])


def test_sr_model_applies_the_official_mean_and_range():
    body = _RecordingBody()
    head = OneStepPixelShuffle(body.num_features, 2)
    nn.init.zeros_(head.conv.weight)
    nn.init.zeros_(head.conv.bias)
    model = SuperResolutionModel(body, head, img_range=255.0)
    x = torch.rand(1, 3, 4, 6)
    out = model(x)
    mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(body.seen, (x - mean) * 255.0)
    torch.testing.assert_close(out, mean.expand(1, 3, 8, 12))  # a zero residual gives back the mean colour


def test_create_sr_model_combines_a_stride_one_backbone_with_either_head():
    model = create_sr_model("rgt_small", 3, head="pixelshuffledirect", **TINY).eval()
    assert isinstance(model.head, OneStepPixelShuffle) and model.upscale == 3
    with torch.no_grad():
        assert model(torch.rand(1, 3, 10, 12)).shape == (1, 3, 30, 36)
    assert create_sr_model(_ConvBody(), 2).upscale == 2


def test_create_sr_model_says_what_a_strided_backbone_lacks():
    with pytest.raises(ValueError, match=r"stride-1 feature map.*stride 32.*hornet_tiny_7x7"):
        create_sr_model("hornet_tiny_7x7", 2, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown head"):
        create_sr_model("rgt_small", 2, head="deconv", **TINY)
    with pytest.raises(ValueError, match="feature_info"):
        create_sr_model(nn.Conv2d(3, 3, 1), 2)


# ------------------------------------------------------------------------- the task models' contract


SR_MODELS = ["rgt_x2", "rgt_small_x3", "rgt_small_x4"]


@pytest.mark.parametrize("name", SR_MODELS)
def test_meta_built_sr_model_initialises_and_computes_like_an_eager_one(name):
    model = contract.assert_meta_init_gives_a_working_model(name, (3, 12, 20), **TINY)
    torch.manual_seed(0)
    eager = recurzoo.create_model(name, dtype=torch.float64, **TINY).eval()
    model.load_state_dict(eager.state_dict())
    x = torch.rand(1, 3, 12, 20, dtype=torch.float64)
    with torch.no_grad():
        output = model(x)
        torch.testing.assert_close(output, eager(x))
    assert output.shape == (1, 3, 12 * model.upscale, 20 * model.upscale)


def test_sr_model_keeps_gradients_with_checkpointing():
    contract.assert_grad_checkpointing_keeps_gradients("rgt_small_x2", torch.rand(1, 3, 12, 20), **TINY)


def test_sr_model_dtype_change_after_a_forward_gives_outputs_in_the_new_dtype():
    model = recurzoo.create_model("rgt_small_x2", **TINY)
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        reference = model.eval()(x)
    contract.assert_dtype_change_after_forward(model, x, dtype=torch.bfloat16)
    with torch.no_grad():
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.shape == (1, 3, 24, 40) and (low.float() - reference).abs().max() < 0.05


def test_sr_model_parameter_groups_and_classifier_reset_keep_device_dtype_and_pooling():
    model = recurzoo.create_model("rgt_small_x2", device="meta", **TINY)
    contract.assert_parameter_groups_match(model)
    model.to(dtype=torch.float64).eval()
    model.reset_classifier(0)
    model.reset_classifier(2, "max")
    model.reset_classifier(4)  # the pooling chosen before stays
    head = model.get_classifier()
    assert (head.weight.device.type, head.weight.dtype, head.training) == ("meta", torch.float64, False)
    assert model.head.global_pool.pool_type == "max" and not model.is_super_resolution


def test_create_sr_model_puts_the_head_beside_the_backbone():
    model = create_sr_model("rgt_small", 2, device="meta", dtype=torch.float64, **TINY)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}


# ---------------------------------------------------------------------------------------------- tiling


def test_tiled_inference_equals_untiled_for_a_limited_receptive_field():
    torch.manual_seed(0)
    model = create_sr_model(_ConvBody(), 2).eval()  # reaches 4.5 input pixels: 2 body + 2 head convs + 1 at x2
    image = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        whole = model(image)
        tiled = model.super_resolve(image, tile=32, tile_overlap=20)  # discards 5 pixels at inner tile edges
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tile_borders_cross_fade_without_seams():
    """A model whose output is each tile's mean: the blend must ramp linearly across every overlap."""

    def tile_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, x.shape[2] * 2, x.shape[3] * 2)

    image = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(1, 3, 16, 40).contiguous()
    out = tiled_super_resolve(tile_mean, image, scale=2, tile=16, tile_overlap=8)[0, 0, 0]
    # tiles start at 0, 8, 16, 24 (step 8): every output column is a convex mix of neighbouring tile means
    steps = out.diff().abs()
    means = torch.tensor([image[0, 0, 0, s : s + 16].mean() for s in (0, 8, 16, 24)])
    ramp = (8 - 2 * 2) * 2  # the middle half of each overlap, in output pixels
    assert steps.max() <= means.diff().abs().max() / ramp * 1.01  # no jump larger than one ramp step
    assert out.min() >= means.min() - 1e-6 and out.max() <= means.max() + 1e-6
    # two tiles overlapping by 2 * margin + ramp: weights sum to one over the whole overlap
    first, second = blend_weights(32, 4, 8, False, True), blend_weights(32, 4, 8, True, False)
    torch.testing.assert_close(first[-16:] + second[:16], torch.ones(16, dtype=torch.float64))
    assert (first[-4:] == 0).all() and (second[:4] == 0).all()


def test_tiled_rgt_matches_its_shape_and_stays_close_to_untiled():
    model = recurzoo.create_model("rgt_small_x2", **TINY).eval()
    image = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        whole = model(image)
        tiled = model.super_resolve(image, tile=32, tile_overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 80, 112)
    # RG-SA sees the whole tile, so tiles differ from the whole image, but only slightly at init
    assert (tiled - whole).abs().mean() < 0.1 * whole.abs().mean()


# ---------------------------------------------------------------------------------------------- metrics


def test_y_channel_uses_bt601_coefficients():
    colours = np.array(
        [[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8
    )
    y = sr_train.rgb_to_y(colours)[0]
    np.testing.assert_allclose(
        y, [235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 219 * 128 / 255], atol=1e-9
    )


def test_psnr_and_ssim_follow_basicsr_on_the_cropped_y_channel():
    from scipy.signal import convolve2d

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    output = np.clip(target.astype(int) + rng.integers(-20, 21, target.shape), 0, 255).astype(np.uint8)
    crop = 4
    y_out = sr_train.rgb_to_y(output)[crop:-crop, crop:-crop]
    y_ref = sr_train.rgb_to_y(target)[crop:-crop, crop:-crop]
    mse = np.mean((y_out - y_ref) ** 2)
    assert sr_train.psnr_y(output, target, crop) == pytest.approx(20 * np.log10(255 / np.sqrt(mse)), abs=1e-9)

    # BasicSR's _ssim: 11x11 Gaussian window (sigma 1.5), 'valid' filtering, C1/C2 for data range 255
    axis = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(axis, axis) / axis.sum() ** 2
    filt = lambda a: convolve2d(a, window, mode="valid")  # noqa: E731
    mu1, mu2 = filt(y_out), filt(y_ref)
    s11, s22, s12 = filt(y_out**2) - mu1**2, filt(y_ref**2) - mu2**2, filt(y_out * y_ref) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = np.mean((2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2)))
    assert sr_train.ssim_y(output, target, crop) == pytest.approx(expected, abs=1e-9)
    assert sr_train.ssim_y(target, target, crop) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- data


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_dataset_layouts_pair_lr_and_hr_files(tmp_path):
    rng = np.random.default_rng(0)
    image = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    _save(tmp_path / "Set5/HR/baby.png", image(16, 16))
    _save(tmp_path / "Set5/LR_bicubic/X2/babyx2.png", image(8, 8))
    _save(tmp_path / "Manga109/HR/Akuhamu.png", image(16, 16))
    _save(tmp_path / "Manga109/LR_bicubic/X4/Akuhamu_LRBI_x4.png", image(4, 4))
    _save(tmp_path / "DIV2K/DIV2K_train_HR/0001.png", image(16, 16))
    _save(tmp_path / "DIV2K/DIV2K_train_LR_bicubic/X2/0001x2.png", image(8, 8))
    _save(tmp_path / "photos/a.jpg", image(16, 16))
    spec = sr_train.resolve_dataset(str(tmp_path / "Set5"), 2)
    assert spec.name == "Set5" and [p.name for p in spec.lr_files] == ["babyx2.png"]
    assert sr_train.resolve_dataset(str(tmp_path / "Manga109"), 4).lr_files[0].name == "Akuhamu_LRBI_x4.png"
    assert sr_train.resolve_dataset(str(tmp_path / "DIV2K/DIV2K_train_HR"), 2).lr_files[0].name == "0001x2.png"
    assert not sr_train.resolve_dataset(str(tmp_path / "photos"), 2).paired
    assert not sr_train.resolve_dataset(str(tmp_path / "Set5"), 3).paired  # no X3 folder: degraded on the fly
    with pytest.raises(ValueError, match="no LR image"):
        sr_train.resolve_dataset(f"{tmp_path / 'Set5/HR'}:{tmp_path / 'Manga109/LR_bicubic/X4'}", 4)


def test_paired_random_crops_and_symmetries_stay_aligned(tmp_path):
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    high = np.kron(low, np.ones((3, 3, 1), dtype=np.uint8))  # every LR pixel is a 3x3 HR block
    _save(tmp_path / "d/HR/img.png", high)
    _save(tmp_path / "d/LR_bicubic/X3/imgx3.png", low)
    dataset = sr_train.SRTrainDataset([sr_train.resolve_dataset(str(tmp_path / "d"), 3)], scale=3, patch=8)
    np.random.seed(0)
    seen = set()
    for _ in range(24):
        lr, hr = dataset[0]
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 24, 24)
        torch.testing.assert_close(hr, lr.repeat_interleave(3, 1).repeat_interleave(3, 2))
        seen.add(lr.numpy().tobytes())
    assert len(seen) > 12  # crops and symmetries vary


# ---------------------------------------------------------------------------------------------- training


def _photo_folders(root: Path) -> tuple:
    from skimage import data

    for name in ("astronaut", "chelsea", "coffee"):
        photo = getattr(data, name)()
        h, w = photo.shape[:2]
        _save(root / "train" / f"{name}.png", photo[:192, :192])
        _save(root / "val" / f"{name}.png", photo[h // 2 - 48 : h // 2 + 48, w // 2 - 48 : w // 2 + 48])
    return root / "train", root / "val"


def test_training_on_photographs_raises_validation_psnr(tmp_path):
    train_dir, val_dir = _photo_folders(tmp_path)
    output = tmp_path / "run"
    sr_train.main(
        [
            *_model_flags(),
            "--train-data",
            str(train_dir),
            "--val-data",
            str(val_dir),
            "--output",
            str(output),
            "--steps",
            "40",
            "--batch-size",
            "4",
            "--patch-size",
            "24",
            "--lr",
            "2e-3",
            "--repeat",
            "8",
            "--workers",
            "0",
            "--val-every",
            "20",
            "--save-every",
            "40",
            "--eval-at-start",
            "--ema-decay",
            "0",
            "--no-progress",
        ]
    )
    records = [json.loads(line) for line in open(output / "metrics.jsonl")]
    psnr = [r["psnr"] for r in records if r.get("dataset") == "val"]
    # validation PSNR rises above the untrained model's by step 20 and well above it by step 40 (at step 20
    # the gain still depends on the augmentation draws: 2-6 dB over seeds 10-13)
    assert len(psnr) == 3 and psnr[1] > psnr[0] + 1.5 and psnr[2] > psnr[0] + 5
    report = json.loads((output / "eval.json").read_text())
    assert report["step"] == 40 and report["results"]["val"]["psnr"] == pytest.approx(psnr[-1])
    assert (output / "eval.md").read_text().count("| val | 3 |") == 1
    assert torch.load(output / "last.pt", weights_only=True)["step"] == 40

    # the saved weights evaluate identically through --eval-only (safetensors through timm's file loader)
    evaluated = sr_train.main(
        [
            *_model_flags(),
            "--checkpoint",
            str(output / "model.safetensors"),
            "--eval-only",
            "--val-data",
            str(val_dir),
            "--output",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    assert evaluated["results"]["val"]["psnr"] == pytest.approx(psnr[-1], abs=1e-6)


def test_training_resumes_from_its_last_checkpoint(tmp_path):
    train_dir, _ = _photo_folders(tmp_path)
    args = [
        "--model",
        "rgt_small_x2",
        "--model-kwargs",
        "embed_dim=12",
        "num_heads=2",
        "blocks_per_group=2",
        "--train-data",
        str(train_dir),
        "--output",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--patch-size",
        "16",
        "--workers",
        "0",
        "--save-every",
        "2",
        "--no-progress",
    ]
    sr_train.main(args + ["--steps", "2"])
    first = torch.load(tmp_path / "run/last.pt", weights_only=True)
    sr_train.main(args + ["--steps", "4", "--resume", "auto"])
    resumed = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert first["step"] == 2 and resumed["step"] == 4
    assert "resumed from" in (tmp_path / "run/log.txt").read_text()
    assert len(resumed["optimizer"]["state"]) > 0 and resumed["ema"] is not None


# ---------------------------------------------------------------------------------------------- command line


def test_sr_command_writes_upscaled_pngs_equal_to_direct_inference(tmp_path, capsys):
    model = recurzoo.create_model("rgt_small_x2", **TINY).eval()
    checkpoint = tmp_path / "model.pth"
    torch.save({"params": model.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    _save(tmp_path / "in/a.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _save(tmp_path / "more/b.jpg", rng.integers(0, 256, (18, 16, 3), dtype=np.uint8))
    code = cli_main(
        [
            "sr",
            str(tmp_path / "in/a.png"),
            str(tmp_path / "more"),
            *_model_flags(),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    a, b = read_image(tmp_path / "out/a.png"), read_image(tmp_path / "out/b.png")
    assert a.shape == (40, 60, 3) and b.shape == (36, 32, 3)
    with torch.no_grad():
        direct = model(torch.from_numpy(read_image(tmp_path / "in/a.png")).permute(2, 0, 1)[None].float() / 255)
    expected = direct[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(a, expected)


def test_sr_command_reports_missing_or_broken_inputs_in_one_line(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for inputs in ([str(tmp_path / "missing.png")], [str(tmp_path / "broken.png")]):
        assert cli_main(["sr", *inputs, "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and ("no such file" in error or "cannot read" in error)
    _save(tmp_path / "ok.png", np.zeros((8, 8, 3), dtype=np.uint8))
    assert (
        cli_main(
            [
                "sr",
                str(tmp_path / "ok.png"),
                *_model_flags("rgt_small"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "not a super-resolution model" in capsys.readouterr().err


def test_demo_super_resolves_the_bundled_photo(tmp_path):
    result = super_resolve_demo(tmp_path, model="rgt_small_x2", side=24, device="cpu", **TINY)
    assert result["output_shape"] == (48, 48, 3) and not result["pretrained"]
    assert read_image(result["paths"]["output"]).shape == (48, 48, 3)
    assert read_image(result["paths"]["bicubic"]).shape == (48, 48, 3)


def test_sr_models_are_listed_in_the_zoo():
    assert {"rgt", "rgt_small", "rgt_x2", "rgt_x3", "rgt_x4", "rgt_small_x2", "rgt_small_x3", "rgt_small_x4"} <= set(
        recurzoo.list_models("rgt*")
    )
