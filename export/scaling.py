"""How memory and latency scale: training-step memory with gradient checkpointing, and input-size growth.

Two measurements behind ``recurzoo bench --train-memory`` and ``recurzoo bench --growth SIZES``;
like every benchmark configuration, each point runs in a fresh process (:func:`~recurzoo.export.bench.run_worker`).

* **Training-step memory**: one forward and backward pass in train mode, with and without
  ``set_grad_checkpointing()``. Reported are the process's peak resident memory during the step
  (on CUDA, the allocator's peak) and the part of it above the memory held before the step
  (weights and inputs): the activations and gradients the step needs.
* **Growth**: latency and peak memory of inference at increasing square input sizes (for
  super-resolution models optionally tiled, ``--tile``), with the exponents of a least-squares fit
  ``latency ~ pixels ** a`` and ``memory ~ pixels ** b`` (1 is linear; 0 is flat).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from recurzoo.export.bench import markdown_table, worker_result
from recurzoo.export.models import RunSettings, peak_memory_mb, resident_mb

__all__ = [
    "MemoryResult",
    "GrowthPoint",
    "train_step_memory",
    "growth_point",
    "fit_exponent",
    "measure_train_memory",
    "measure_growth",
    "memory_markdown",
    "growth_markdown",
]


@dataclass
class MemoryResult:
    """Memory of one training step of one model."""

    model: str
    input_size: str
    batch: int
    grad_checkpointing: bool
    step_seconds: float
    peak_memory_mb: float
    step_memory_mb: float  # the peak above what was held before the step
    error: str = ""


@dataclass
class GrowthPoint:
    """Latency and memory of inference at one input size."""

    model: str
    side: int
    tile: int
    latency_s: float
    peak_memory_mb: float
    step_memory_mb: float
    error: str = ""


def _measure_peak(device: str, run: Callable[[], object]) -> Tuple[float, float, float]:
    """(seconds, peak MB, peak MB above the memory held before) of one call of ``run``."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_mb()
    peak_memory_mb(device, reset=True)
    start = time.perf_counter()
    run()
    peak = peak_memory_mb(device)
    return time.perf_counter() - start, peak, peak - before


def train_step_memory(
    model_name: str,
    input_size: Sequence[int],
    batch: int,
    grad_checkpointing: bool,
    settings: Optional[RunSettings] = None,
) -> MemoryResult:
    """Peak memory of one forward + backward pass of ``model_name`` in train mode (in this process)."""
    settings = settings or RunSettings()
    model, inputs = settings.build(model_name, batch, input_size)
    model.train().set_grad_checkpointing(grad_checkpointing)

    def step() -> None:
        model(inputs).float().square().mean().backward()

    seconds, peak, above = _measure_peak(settings.device, step)
    return MemoryResult(model_name, "x".join(map(str, input_size)), batch, grad_checkpointing, seconds, peak, above)


def growth_point(
    model_name: str,
    side: int,
    tile: int = 0,
    tile_overlap: int = 32,
    in_chans: int = 3,
    settings: Optional[RunSettings] = None,
) -> GrowthPoint:
    """Latency and memory of one inference at ``side x side`` (tiled when ``tile``), in this process.

    One untimed pass at the smaller of ``side`` and ``tile`` warms the kernels first.
    """
    settings = settings or RunSettings()
    model, images = settings.build(model_name, 1, (in_chans, side, side))
    warm_side = min(side, tile) if tile else side
    if tile and not hasattr(model, "super_resolve"):
        raise ValueError(f"{model_name}: --tile needs a super-resolution model (one with super_resolve)")

    def infer() -> None:
        if tile:
            model.super_resolve(images, tile=tile, tile_overlap=tile_overlap, progress=False)
        else:
            model(images)

    with torch.inference_mode():
        model(images[..., :warm_side, :warm_side])
        seconds, peak, above = _measure_peak(settings.device, infer)
    return GrowthPoint(model_name, side, tile, seconds, peak, above)


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(sizes)``: ``values ~ sizes ** slope``."""
    if len(sizes) < 2:
        raise ValueError(f"fitting an exponent needs at least two points, received {len(sizes)}")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def measure_train_memory(
    models: Sequence[Tuple[str, Sequence[int]]], batch: int, settings: Optional[RunSettings] = None
) -> List[MemoryResult]:
    """Training-step memory of each (model, input size), without and with gradient checkpointing."""
    settings = settings or RunSettings()
    results = []
    for model_name, size in models:
        for checkpointing in (False, True):
            asked = dict(model_name=model_name, input_size=list(size), batch=batch, grad_checkpointing=checkpointing)
            known = dict(model=model_name, input_size="x".join(map(str, size)), batch=batch)
            results.append(
                worker_result(
                    MemoryResult, dict(asked, kind="train_memory"), settings, **known, grad_checkpointing=checkpointing
                )
            )
    return results


def measure_growth(
    models: Sequence[str],
    sides: Sequence[int],
    tile: int = 0,
    tile_overlap: int = 32,
    settings: Optional[RunSettings] = None,
) -> List[GrowthPoint]:
    """Latency and memory of each model at each side (fresh process per point)."""
    settings = settings or RunSettings()
    points = []
    for model_name in models:
        for side in sides:
            request = dict(kind="growth", model_name=model_name, side=side, tile=tile, tile_overlap=tile_overlap)
            points.append(worker_result(GrowthPoint, request, settings, model=model_name, side=side, tile=tile))
    return points


def memory_markdown(results: Sequence[MemoryResult]) -> str:
    """Markdown table of training-step memory; each checkpointed row states its saving."""
    plain = {(r.model, r.input_size, r.batch): r for r in results if not r.grad_checkpointing and not r.error}
    header = ["model", "input size", "batch", "grad checkpointing", "step s", "peak MB", "step MB", "step memory saved"]
    rows = []
    for r in results:
        if r.error:
            rows.append([r.model, r.input_size, r.batch, r.grad_checkpointing, f"failed: {r.error}"])
            continue
        reference = plain.get((r.model, r.input_size, r.batch))
        saved = f"{1 - r.step_memory_mb / reference.step_memory_mb:.0%}" if r.grad_checkpointing and reference else ""
        measured = [f"{r.step_seconds:.1f}", f"{r.peak_memory_mb:.0f}", f"{r.step_memory_mb:.0f}", saved]
        rows.append([r.model, r.input_size, r.batch, "yes" if r.grad_checkpointing else "no", *measured])
    return markdown_table(header, rows)


def growth_exponents(points: Sequence[GrowthPoint]) -> Dict[str, Tuple[float, float]]:
    """Per model: the fitted (latency, step-memory) exponents in the pixel count."""
    exponents = {}
    for model in dict.fromkeys(p.model for p in points):
        good = [p for p in points if p.model == model and not p.error]
        if len(good) >= 2:
            pixels = [p.side**2 for p in good]
            exponents[model] = (
                fit_exponent(pixels, [p.latency_s for p in good]),
                fit_exponent(pixels, [max(p.step_memory_mb, 1.0) for p in good]),
            )
    return exponents


def growth_markdown(points: Sequence[GrowthPoint]) -> str:
    """Markdown table of the growth points, then the fitted exponents per model."""
    rows = []
    for p in points:
        asked = [p.model, f"{p.side}x{p.side}", str(p.tile) if p.tile else "whole"]
        if p.error:
            rows.append([*asked, f"failed: {p.error}"])
        else:
            rows.append([*asked, f"{p.latency_s:.2f}", f"{p.peak_memory_mb:.0f}", f"{p.step_memory_mb:.0f}"])
    table = markdown_table(["model", "input", "tile", "latency s", "peak MB", "inference MB"], rows)
    fits = [
        f"- `{model}`: latency ~ pixels^{time_exp:.2f}, inference memory ~ pixels^{memory_exp:.2f}\n"
        for model, (time_exp, memory_exp) in growth_exponents(points).items()
    ]
    return table + "\n" + "".join(fits)
