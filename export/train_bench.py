"""Training throughput: one optimizer step (forward, backward, AdamW) per timed call.

``recurzoo bench MODEL... --train --batch 16`` times, for every (model, batch, variant), whole
training steps in train mode: the forward pass, a loss, the backward pass and an AdamW step (on
CUDA with fp16, through a gradient scaler). A variant is a precision, ``fp32`` or autocast in
``bf16`` / ``fp16``, optionally with ``-cl``: model and inputs in ``channels_last``. Like every
benchmark configuration, each runs in a fresh process; peak memory is the process's high-water
mark of resident memory during the timed steps (on CUDA, the allocator's peak): weights, gradients,
optimizer state and the step's activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from recurzoo.export.bench import markdown_table, worker_result
from recurzoo.export.models import RunSettings, median_and_quartiles, peak_memory_mb

__all__ = [
    "TrainResult",
    "parse_variant",
    "default_variants",
    "make_train_step",
    "train_in_process",
    "bench_train",
    "train_markdown",
]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainResult:
    """One timed training configuration."""

    model: str
    variant: str
    batch: int
    input_size: str
    threads: int
    device: str
    step_ms: float
    step_p25_ms: float
    step_p75_ms: float
    images_per_s: float
    peak_memory_mb: float
    error: str = ""


def parse_variant(variant: str) -> Tuple[str, bool]:
    """``"bf16-cl"`` -> ``("bf16", True)``: the precision and whether the layout is channels_last."""
    precision, _, layout = variant.partition("-")
    if precision not in PRECISIONS or layout not in ("", "cl"):
        raise ValueError(f"training variant {variant!r}: expected one of {', '.join(PRECISIONS)}, optionally + '-cl'")
    return precision, layout == "cl"


def default_variants(device: str) -> List[str]:
    """fp32 and autocast (bf16 on CPU; fp16 and bf16 on CUDA), each contiguous and channels_last."""
    precisions = ["fp32", "fp16", "bf16"] if device.startswith("cuda") else ["fp32", "bf16"]
    return [f"{precision}{suffix}" for precision in precisions for suffix in ("", "-cl")]


def _loss(output: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed labels for logits; the mean square for dense outputs (images, masks)."""
    output = output.float()
    if output.ndim == 2:
        labels = torch.arange(output.shape[0], device=output.device) % output.shape[1]
        return F.cross_entropy(output, labels)
    return output.square().mean()


def make_train_step(
    model: torch.nn.Module, inputs: torch.Tensor, variant: str = "fp32", lr: float = 1e-4
) -> Tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """A function that runs one training step of ``model`` on ``inputs`` and returns its loss.

    The model is put in train mode (and, for a ``-cl`` variant, with its inputs, in channels_last);
    the step zeroes the gradients, runs forward and backward under the variant's autocast and steps
    a fresh AdamW optimizer, which is returned with it.
    """
    precision, channels_last = parse_variant(variant)
    device_type = inputs.device.type
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" and device_type == "cuda" else None
    if precision == "fp32":
        autocast = contextlib.nullcontext
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device_type, dtype=dtype)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = _loss(model(inputs))
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step, optimizer


def _train_settings(settings: Optional[RunSettings]) -> RunSettings:
    """``settings``, or one warm-up and five timed training steps by default."""
    return settings or RunSettings(warmup=1, repeats=5)


def train_in_process(
    model_name: str,
    variant: str = "fp32",
    batch: int = 16,
    input_size: Optional[Sequence[int]] = None,
    settings: Optional[RunSettings] = None,
) -> TrainResult:
    """Time training steps of one configuration in this process (after ``settings.warmup`` untimed steps)."""
    settings = _train_settings(settings)
    model, inputs = settings.build(model_name, batch, input_size)
    step, _ = make_train_step(model, inputs, variant)
    for _ in range(max(settings.warmup, 1)):  # the first step allocates the optimizer state
        step()
    peak_memory_mb(settings.device, reset=True)
    times = settings.time(step, warmup=0)
    peak = peak_memory_mb(settings.device)
    median, p25, p75 = median_and_quartiles(times)
    return TrainResult(
        model=model_name,
        variant=variant,
        batch=batch,
        input_size="x".join(map(str, inputs.shape[1:])),
        threads=torch.get_num_threads(),
        device=settings.device,
        step_ms=median * 1e3,
        step_p25_ms=p25 * 1e3,
        step_p75_ms=p75 * 1e3,
        images_per_s=batch / median,
        peak_memory_mb=peak,
    )


def bench_train(
    models: Sequence[Tuple[str, Optional[Sequence[int]]]],
    batches: Sequence[int],
    variants: Sequence[str],
    settings: Optional[RunSettings] = None,
) -> List[TrainResult]:
    """Every (model and input size, batch, variant) in its own process; failures are recorded, not raised."""
    settings = _train_settings(settings)
    results = []
    for model_name, size in models:
        input_size = list(size) if size else None
        for batch in batches:
            for variant in variants:
                request = dict(kind="train", model_name=model_name, variant=variant, batch=batch, input_size=input_size)
                size_text = "x".join(map(str, size)) if size else ""
                known = dict(model=model_name, variant=variant, batch=batch, input_size=size_text)
                results.append(worker_result(TrainResult, request, settings, **known, **settings.where()))
    return results


_TRAIN_COLUMNS = [
    "model",
    "variant",
    "batch",
    "input size",
    "threads",
    "step ms",
    "p25-p75 ms",
    "images/s",
    "peak MB",
    "vs fp32",
]


def train_markdown(results: Sequence[TrainResult]) -> str:
    """Markdown table of training steps; each row's speed-up is over fp32 contiguous of the same model and batch."""
    reference = {(r.model, r.batch, r.input_size): r.step_ms for r in results if r.variant == "fp32" and not r.error}
    rows = []
    for r in results:
        if r.error:
            rows.append([r.model, r.variant, r.batch, r.input_size, r.threads, f"failed: {r.error}"])
            continue
        base = reference.get((r.model, r.batch, r.input_size))
        ratio = f"{base / r.step_ms:.2f}x" if base and r.variant != "fp32" else ""
        spread = f"{r.step_p25_ms:.0f}-{r.step_p75_ms:.0f}"
        measured = [f"{r.step_ms:.0f}", spread, f"{r.images_per_s:.1f}", f"{r.peak_memory_mb:.0f}", ratio]
        rows.append([r.model, r.variant, r.batch, r.input_size, r.threads, *measured])
    return markdown_table(_TRAIN_COLUMNS, rows)
