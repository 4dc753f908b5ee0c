"""Building, feeding and timing a model: the one place the exporters, bench, flops, the cards and the CLI use.

- :func:`create_model`: any zoo model or timm peer by name, in eval mode, with a checkpoint's weights
  (read and loaded by :mod:`recurzoo.checkpoint`, through the family's filter) or uninitialised for
  counting.
- :func:`photo_batch` / :func:`random_batch`: inputs as the model takes them (normalised with its
  pretrained cfg, or in [0, 1] for models that normalise themselves).
- :func:`model_and_inputs`: a model by name with a random batch for it (what the benchmarks time).
- :func:`time_forward` / :func:`median_ms` / :func:`median_and_quartiles`: the timing loop and its
  summary; :class:`RunSettings`: how one benchmark configuration is run.
- :func:`export_support`: what an exported graph can take, read from what the model's classes declare.

What a model declares: every module class may state, as class attributes, ``export_dynamic_batch``
and ``export_dynamic_size`` (both True when absent) and ``export_static_reason`` (why a graph is tied
to the traced size). A model's graph is as dynamic as its least dynamic module; timm's own
``dynamic_img_size=False`` (a fixed position embedding) counts too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "ExportSupport",
    "export_support",
    "create_model",
    "unwrap_features",
    "takes_unit_range",
    "model_input_size",
    "normalization",
    "photo_batch",
    "random_batch",
    "model_and_inputs",
    "RunSettings",
    "time_forward",
    "median_ms",
    "median_and_quartiles",
]

_FIXED_POSITION_EMBEDDING = "built with dynamic_img_size=False (a fixed position embedding)"
_FIXED_BATCH = "the batch is fixed when traced"


# --------------------------------------------------------------------------------------------------
# What a model declares
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSupport:
    """What an exported graph of a model can take: a dynamic batch, dynamic height/width, and why not."""

    dynamic_hw: bool
    reason: str = ""
    dynamic_batch: bool = True

    def describe(self) -> str:
        return "yes" if self.dynamic_hw else f"no: {self.reason}"


def _module_limits(module: nn.Module) -> Tuple[bool, bool, str]:
    """``(dynamic batch, dynamic size, reason)`` as ``module``'s class declares them."""
    dynamic_batch = bool(getattr(module, "export_dynamic_batch", True))
    dynamic_size = bool(getattr(module, "export_dynamic_size", True))
    reason = getattr(module, "export_static_reason", "") if not (dynamic_batch and dynamic_size) else ""
    if dynamic_size and getattr(module, "dynamic_img_size", True) is False:  # timm's own declaration
        dynamic_size, reason = False, _FIXED_POSITION_EMBEDDING
    if not reason and not dynamic_batch:
        reason = _FIXED_BATCH
    return dynamic_batch, dynamic_size, reason


def export_support(model: nn.Module) -> ExportSupport:
    """What ``model``'s exported graph can take, from the declarations of its modules' classes.

    ``tests/test_export.py`` runs every model that claims dynamic height/width at a second size in
    onnxruntime, so a wrong declaration fails there.
    """
    reasons: Dict[str, None] = {}  # ordered set, in module order
    dynamic_batch = dynamic_hw = True
    for module in model.modules():
        batch, size, reason = _module_limits(module)
        dynamic_batch, dynamic_hw = dynamic_batch and batch, dynamic_hw and size
        if reason:
            reasons[reason] = None
    return ExportSupport(dynamic_hw=dynamic_hw, reason="; ".join(reasons), dynamic_batch=dynamic_batch)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _create_uninitialized(model_name: str, **kwargs: Any) -> nn.Module:
    """Built on the meta device, then zeros: skips the weight init, which dominates large models' build time."""
    from recurzoo.registry import create_model as create_any

    with torch.device("meta"):
        model = create_any(model_name, **kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def _checkpoint_num_classes(
    model_name: str, state_dict: Dict[str, torch.Tensor], kwargs: Dict[str, Any]
) -> Optional[int]:
    """The class count of the classifier stored in ``state_dict`` (after the family's filter), when it differs."""
    from recurzoo.checkpoint import family_filter
    from recurzoo.registry import create_model as create_any

    try:
        with torch.device("meta"):
            probe = create_any(model_name, **kwargs)
    except (RuntimeError, NotImplementedError):  # a constructor that computes on its tensors
        probe = create_any(model_name, **kwargs)
    filter_fn = family_filter(probe)
    filtered = filter_fn(dict(state_dict), probe) if filter_fn is not None else state_dict
    classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier")
    weight = filtered.get(f"{classifier}.weight") if classifier else None
    if weight is None or weight.ndim < 1 or weight.shape[0] == getattr(probe, "num_classes", None):
        return None
    return int(weight.shape[0])


def create_model(
    model_name: str,
    checkpoint: Optional[Union[str, Path]] = None,
    uninitialized: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Any zoo model or timm peer by name, in eval mode.

    Args:
        model_name: a registered name (``recurzoo.list_models()`` or timm's).
        checkpoint: weights to load: a state dict saved from the model (``torch.save`` or
            safetensors, in a training checkpoint's wrapper or not) or the authors' checkpoint,
            converted by the family's ``checkpoint_filter_fn``. A classifier stored for another class
            count sets ``num_classes``.
        uninitialized: every parameter and buffer zero, without the weight init (for counting
            parameters and FLOPs only).
        **kwargs: ``timm.create_model`` arguments (``features_only``, ``num_classes``, ...).

    Raises:
        UnknownModelError, CheckpointError: (both ``ValueError``) for an unknown name, or a checkpoint
            that cannot be read or does not fit.
    """
    from recurzoo.checkpoint import load_state_dict, read_state_dict
    from recurzoo.registry import create_model as create_any

    if uninitialized:
        return _create_uninitialized(model_name, **kwargs).eval()
    if checkpoint is None:
        return create_any(model_name, **kwargs).eval()
    features_only = kwargs.pop("features_only", False)
    state_dict = read_state_dict(checkpoint)
    if not kwargs.get("num_classes"):
        num_classes = _checkpoint_num_classes(model_name, state_dict, kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
    model = load_state_dict(create_any(model_name, **kwargs), state_dict, source=str(checkpoint))
    if features_only:  # timm's feature wrapper renames modules: it takes the weights the full model fits
        overlay = dict(state_dict=model.state_dict())
        model = create_any(model_name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **kwargs)
        model.pretrained_cfg.pop("state_dict", None)  # the weights are in the model; keep the cfg printable
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def unwrap_features(model: nn.Module) -> nn.Module:
    """The model inside timm's ``features_only`` getter wrapper (other models as they are)."""
    return getattr(model, "model", model) if type(model).__name__ == "FeatureGetterNet" else model


def takes_unit_range(model: nn.Module) -> bool:
    """True for models that take images in [0, 1] and normalise them themselves (SR and COD models)."""
    return callable(getattr(unwrap_features(model), "normalize", None))


def model_input_size(model: nn.Module, input_size: Optional[Tuple[int, ...]] = None) -> Tuple[int, int, int]:
    """``input_size`` as ``(C, H, W)``, else the model's pretrained cfg's (224 x 224 RGB without one)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = (int(v) for v in (input_size or cfg.get("input_size") or (3, 224, 224)))
    return channels, height, width


def normalization(model: nn.Module) -> Tuple[Optional[Tuple[float, ...]], Optional[Tuple[float, ...]]]:
    """The ``(mean, std)`` the model's inputs are normalised with before it (None, None: it takes [0, 1])."""
    if takes_unit_range(model):
        return None, None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or (0.485, 0.456, 0.406), cfg.get("std") or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def photo_batch(model: nn.Module, batch: int, height: int, width: int) -> torch.Tensor:
    """The sample photograph resized to ``height x width``, as ``model`` takes it.

    Normalised with the model's pretrained cfg mean/std, or left in [0, 1] for models that
    normalise their input themselves.
    """
    from recurzoo.images import normalized_photo_batch

    channels = int(getattr(unwrap_features(model), "in_chans", 3))
    mean, std = normalization(model)
    return normalized_photo_batch(batch, height, width, mean, std, channels=channels)


def random_batch(model: nn.Module, batch: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Seeded random inputs in the model's range: uniform [0, 1] or standard normal (normalised images)."""
    generator = torch.Generator().manual_seed(seed)
    if takes_unit_range(model):
        return torch.rand(batch, channels, height, width, generator=generator)
    return torch.randn(batch, channels, height, width, generator=generator)


def model_and_inputs(
    model_name: str, batch: int, input_size: Optional[Sequence[int]] = None, device: str = "cpu", **kwargs: Any
) -> Tuple[nn.Module, torch.Tensor]:
    """:func:`create_model` on ``device`` and a standard-normal batch of ``batch`` inputs for it at
    ``input_size`` (``(C, H, W)``; the model's pretrained cfg's by default)."""
    model = create_model(model_name, **kwargs).to(device)
    return model, torch.randn(batch, *model_input_size(model, input_size), device=device)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """How one benchmark configuration is run: intra-op ``threads`` (None: torch's default),
    ``device``, ``warmup`` untimed and ``repeats`` timed calls, ``max_seconds`` of timing (at least
    three calls), and ``timeout``, after which a configuration's fresh process is given up."""

    threads: Optional[int] = None
    device: str = "cpu"
    warmup: int = 3
    repeats: int = 10
    max_seconds: Optional[float] = None
    timeout: Optional[float] = None

    def where(self) -> Dict[str, Any]:
        """The ``threads`` and ``device`` fields of a result row run with these settings."""
        return dict(threads=self.threads or torch.get_num_threads(), device=self.device)

    def build(
        self, model_name: str, batch: int, input_size: Optional[Sequence[int]] = None
    ) -> Tuple[nn.Module, torch.Tensor]:
        """Set this process to ``threads`` (when given), then :func:`model_and_inputs` on ``device``."""
        if self.threads:
            torch.set_num_threads(self.threads)
        return model_and_inputs(model_name, batch, input_size, self.device)

    def time(self, run: Callable[[], object], warmup: Optional[int] = None) -> List[float]:
        """:func:`time_forward` of ``run`` with these settings (``warmup`` overrides theirs)."""
        warmup = self.warmup if warmup is None else warmup
        return time_forward(run, self.device, warmup, self.repeats, self.max_seconds)


def resident_mb() -> float:
    """This process's current resident set in MB (Linux ``/proc``)."""
    import resource

    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_memory_mb(device: str, reset: bool = False) -> float:
    """The peak memory so far in MB: CUDA's allocator peak, or this process's resident high-water mark.

    On CPU this reads ``VmHWM``, not ``ru_maxrss``: a process started by another inherits its parent's
    ``ru_maxrss``, which would floor every benchmark worker's peak at the launcher's. ``reset`` starts a
    new window (the peak is then what is resident now).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**20
    if reset:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def time_forward(
    run: Callable[[], object],
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: Optional[float] = None,
) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed ones.

    With ``max_seconds``, timing stops early once three calls are timed and the budget is spent
    (large models keep a benchmark within minutes).
    """
    for _ in range(warmup):
        run()
    times: List[float] = []
    for _ in range(repeats):
        start = _now(device)
        run()
        times.append(_now(device) - start)
        if max_seconds is not None and len(times) >= 3 and sum(times) > max_seconds:
            break
    return times


def median_ms(run: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median milliseconds of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    return statistics.median(time_forward(run, device, warmup, repeats)) * 1e3


def median_and_quartiles(times: Sequence[float]) -> Tuple[float, float, float]:
    """The median, first and third quartile of ``times`` (all three the median of a single time)."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, median, median
    first, _, third = statistics.quantiles(times, n=4)
    return median, first, third
