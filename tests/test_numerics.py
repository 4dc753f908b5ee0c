"""Mixed precision: autocast inference of every family stays close to fp32 and never overflows.

bf16 autocast runs on the CPU; the same tests run in fp16 autocast on CUDA where a GPU is present.
The models are the reduced widths of ``tests/test_models.py`` with weights drawn at the scale of a
trained network (:func:`_trained_scale`): timm's 0.02 initialisation and HorNet's 1e-6 layer scales
keep the activations, attention logits and gnConv gates so small that low precision is never
stressed. Errors are measured as the RMS difference between the autocast and fp32 outputs over the
fp32 output's standard deviation (its spread: SR and COD outputs sit on a large constant), at the
inputs' own scale and 100x larger. Overflow is provoked directly: gnConv gates whose squares exceed
fp16's range, attention logits past the point where exp overflows.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recurzoo  # noqa: F401  (registers the models)
from recurzoo.backbones.hornet import RecursiveGatedConv

sys.path.insert(0, os.path.dirname(__file__))
from _reduced import REDUCED  # noqa: E402

# Reduced models: name -> (family, extra kwargs). The relaxed recurrent ViT has Raptor's depth
# conditioning and a per-step LoRA; the COD model runs the MSRNet decoder over a reduced HorNet.
CASES = {
    "hornet_tiny_7x7": ("hornet", {}),
    "hornet_tiny_gf": ("hornet", {}),
    "sret_tiny": ("sret", {}),
    "sret_tiny_noslice": ("sret", {}),
    "vit_recurrent_tiny_patch16_224": ("recurrent_vit", {}),
    "vit_recurrent_tiny_patch16_224-relaxed": ("recurrent_vit", dict(depth_conditioning=True, lora_rank=2)),
    "rgt_small_x2": ("rgt", {}),
    "msrnet_hornet_tiny_7x7": ("camouflage", dict(backbone_kwargs=REDUCED["hornet"])),
}
GATED_CASES = ["hornet_tiny_7x7", "hornet_tiny_gf"]
ATTENTION_CASES = [
    "sret_tiny",
    "sret_tiny_noslice",
    "vit_recurrent_tiny_patch16_224",
    "vit_recurrent_tiny_patch16_224-relaxed",
    "rgt_small_x2",
]

# Largest RMS error / fp32 output std allowed, per family, in bf16 (CPU) autocast. bf16 keeps 8
# significant bits: each rounding is off by up to 2**-9 (0.2%), an op that rounds its inputs and its
# output by ~0.4%, and a network of a few dozen such ops by about 1% as the roundings average out.
# Measured over 5 seeds at 1x and 100x input scale, the largest errors were: HorNet 0.75%, SReT 1.6%,
# recurrent ViT 1.45% (relaxed), RGT 1.5%, MSRNet 2.8% (its 3-scale backbone + decoder is deepest).
# The tolerances are 2-3x those: loose enough for other CPUs' bf16 kernels, tight enough that a model
# whose mixed-precision error is several times bf16's rounding (e.g. two bits fewer throughout) fails.
# One badly rounded op barely shows (4% noise injected into one mid-network op moved the outputs by
# 0.1-1%); overflow, the usual failure of one op, is caught by the large-magnitude tests below, whose
# sensitivity is itself tested.
BF16_TOLERANCE = {"hornet": 0.02, "sret": 0.04, "recurrent_vit": 0.04, "rgt": 0.04, "camouflage": 0.06}
# fp16 keeps 11 significant bits, 8x finer than bf16. CPU fp16 autocast (which, unlike CUDA's, also
# runs layer norms and softmax in fp16) measured at most 0.09% (HorNet), 0.14% (SReT), 0.13%
# (recurrent ViT), 0.19% (RGT), 0.41% (MSRNet); a quarter of the bf16 tolerance leaves >= 3.6x margin
# over those for the CUDA kernels, which this suite was not run on.
FP16_TOLERANCE = {family: tolerance / 4 for family, tolerance in BF16_TOLERANCE.items()}

PRECISIONS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-fp16",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="fp16 autocast is checked on CUDA; no CUDA device here"
        ),
    ),
]

# gnConv gates large enough that their squares overflow fp16 (max 65504), and attention logits past
# exp's overflow in fp32/bf16 (88.7, and 11.1 in fp16): a softmax without max subtraction fails there.
GATE_WEIGHT_GAIN = 8.0
MIN_GATE_PEAK = 256.0
QK_WEIGHT_GAIN = 6.0
MIN_LOGIT_PEAK = 100.0


def _trained_scale(model: nn.Module) -> nn.Module:
    """Redraw the weights at the scale of a trained network, so every path carries O(1) activations.

    Convs and linears get variance ``1 / fan_in`` (activations keep their scale through the depth)
    and biases std 0.1; HorNet's layer scales become 1 (1e-6 at init would mute every gnConv);
    the per-step LoRA updates become a quarter of the shared weights' scale (zero at init).
    Depth conditioning is a linear MLP, redrawn with the others.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.numel():
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
        for name, parameter in model.named_parameters():
            if name.endswith((".gamma1", ".gamma2")):
                parameter.fill_(1.0)
            elif ".lora." in name and name.endswith(".up"):
                parameter.normal_(0.0, 0.3)
    return model


def _build(case: str, device: str) -> nn.Module:
    family, kwargs = CASES[case]
    model = recurzoo.create_model(case.split("-")[0], **REDUCED[family], **kwargs)
    return _trained_scale(model).to(device).eval()


def _input(case: str, device: str, batch: int = 2) -> torch.Tensor:
    """Normalized images (N(0, 1)) for classifiers; [0, 1] images for the SR and COD models."""
    family = CASES[case][0]
    if family == "rgt":
        return torch.rand(batch, 3, 32, 32, device=device)
    if family == "camouflage":
        return torch.rand(batch, 3, 64, 64, device=device)
    return torch.randn(batch, 3, 64, 64, device=device)


def _tolerance(case: str, dtype: torch.dtype) -> float:
    table = BF16_TOLERANCE if dtype == torch.bfloat16 else FP16_TOLERANCE
    return table[CASES[case][0]]


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype):
    """The fp32 output and the autocast output of ``model`` on ``x``."""
    reference = model(x)
    with torch.autocast(device, dtype=dtype):
        low = model(x)
    return reference, low


def _relative_rms_error(low: torch.Tensor, reference: torch.Tensor) -> float:
    return ((low.float() - reference).norm() / (reference - reference.mean()).norm()).item()


@pytest.mark.parametrize("input_scale", [1.0, 100.0])
@pytest.mark.parametrize("device,dtype", PRECISIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_autocast_output_stays_within_tolerance_of_fp32(case, device, dtype, input_scale):
    model = _build(case, device)
    reference, low = _run(model, _input(case, device) * input_scale, device, dtype)
    assert low.dtype == dtype, "autocast did not reach the model's output layer"
    assert torch.isfinite(low).all(), f"{case}: non-finite outputs in {dtype} autocast"
    error = _relative_rms_error(low, reference)
    assert error <= _tolerance(case, dtype), f"{case}: {dtype} error {error:.2e} of the fp32 output's spread"


@pytest.mark.parametrize("device,dtype", PRECISIONS)
@pytest.mark.parametrize("case", GATED_CASES)
def test_gated_recursion_with_large_gates_does_not_overflow(case, device, dtype):
    model = _build(case, device)
    peaks = {}

    def record_peak(gnconv, inputs):  # the product of all orders, entering proj_out
        peaks[gnconv] = max(peaks.get(gnconv, 0.0), inputs[0].float().abs().max().item())

    with torch.no_grad():
        for gnconv in (m for m in model.modules() if isinstance(m, RecursiveGatedConv)):
            gnconv.proj_in.weight.mul_(GATE_WEIGHT_GAIN)
            gnconv.proj_out.register_forward_hook(lambda m, i, o, gnconv=gnconv: record_peak(gnconv, i))
    x = _input(case, device)
    with torch.no_grad():
        model(x)
        fp32_peaks = dict(peaks)
        peaks.clear()
        with torch.autocast(device, dtype=dtype):
            low = model(x)
    assert max(fp32_peaks.values()) >= MIN_GATE_PEAK, "the gates are not large enough to test overflow"
    assert torch.isfinite(low).all(), f"{case}: the gated recursion overflowed in {dtype}"
    for gnconv, peak in fp32_peaks.items():  # no recursion grows (or collapses) in low precision
        assert peaks[gnconv] == pytest.approx(peak, rel=0.25)


def _scale_queries_and_keys(model: nn.Module, gain: float) -> None:
    """Multiply the query and key projections (fused ``qkv`` or separate ``q``/``k`` linears) by ``gain``."""
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf == "qkv":
                module.weight[: 2 * module.out_features // 3].mul_(gain)
            elif isinstance(module, nn.Linear) and leaf in ("q", "k"):
                module.weight.mul_(gain)


def _record_logit_peak(monkeypatch, peak: list) -> None:
    """Wrap SDPA to record the largest |attention logit| it sees (in fp32)."""
    fused = F.scaled_dot_product_attention

    def recording(q, k, v, *args, scale=None, **kwargs):
        logit_scale = scale if scale is not None else q.shape[-1] ** -0.5
        logits = q.float() @ k.float().transpose(-2, -1) * logit_scale
        peak[0] = max(peak[0], logits.abs().max().item())
        return fused(q, k, v, *args, scale=scale, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)


def _naive_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """Textbook attention without the max subtraction: exp overflows past logits of 88.7 (11.1 in fp16)."""
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = logits.exp()
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


@pytest.mark.parametrize("device,dtype", PRECISIONS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_with_large_logits_does_not_overflow(case, device, dtype, monkeypatch):
    model = _build(case, device)
    _scale_queries_and_keys(model, QK_WEIGHT_GAIN)
    peak = [0.0]
    _record_logit_peak(monkeypatch, peak)
    x = _input(case, device)
    with torch.no_grad():
        model(x)
    assert peak[0] >= MIN_LOGIT_PEAK, f"attention logits peak at {peak[0]:.1f}: not large enough to test overflow"
    monkeypatch.undo()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        low = model(x)
    assert torch.isfinite(low).all(), f"{case}: the attention overflowed in {dtype}"


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_the_overflow_check_catches_a_softmax_without_max_subtraction(case, monkeypatch):
    """The large logits above are large enough: textbook attention in bf16 turns them into NaN."""
    model = _build(case, "cpu")
    _scale_queries_and_keys(model, QK_WEIGHT_GAIN)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _naive_attention)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(_input(case, "cpu"))
    assert not torch.isfinite(low).all()
