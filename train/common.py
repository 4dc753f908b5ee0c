"""Shared mechanics of recurzoo's training scripts: distributed set-up, checkpoints, logging, plots.

Every training script (distillation, classification, detection, super-resolution, COD) uses these
helpers so that they behave alike:

* ``init_distributed`` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``) and falls back to a single process; ``wrap_ddp`` / ``unwrap_model`` wrap a module
  for data-parallel training and get it back.
* ``save_checkpoint`` writes atomically (a temporary file in the same folder, then ``os.replace``),
  so an interrupted run never leaves a truncated checkpoint; checkpoints hold tensors and plain
  Python values only and ``load_checkpoint`` reads them with ``weights_only=True``.
* ``setup_logging``, ``progress``, ``append_jsonl``: console/file log, tqdm bars and a metrics log,
  all active on the main process only.
* ``plot_curves`` and ``save_heatmap`` write PNGs with matplotlib (imported when called).
* Epoch-based scripts also share: ``parse_args_with_config`` (a ``--config`` YAML of defaults),
  ``RunGuard`` (SIGTERM/SIGINT -> final checkpoint, NaN/inf loss -> stop, ``--fail-at-step`` fault
  injection), ``create_checkpoint_saver`` (timm's ``CheckpointSaver`` writing atomic weights-only
  files with resume state) with ``restore_training_state``, ``trim_summary``/``plot_summary`` for
  timm's ``summary.csv``, and ``run_cli`` (exit codes of signal stops and NaN stops).
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext", "init_distributed", "cleanup_distributed", "wrap_ddp", "unwrap_model", "seed_everything",
    "setup_logging", "progress", "append_jsonl", "save_checkpoint", "load_checkpoint", "save_safetensors",
    "resolve_resume", "cosine_schedule", "infinite_batches", "epoch_batches", "parse_kwargs", "plot_curves",
    "save_heatmap",
    "TrainingInterrupted", "NonFiniteLossError", "parse_args_with_config", "save_args_yaml", "add_fault_arguments",
    "RunGuard", "create_checkpoint_saver", "restore_training_state", "trim_summary", "read_summary", "plot_summary",
    "run_cli",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, plots and writes checkpoints."""
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    ``device`` (e.g. ``'cpu'``, ``'cuda'``) defaults to CUDA when available; under ``torchrun`` each
    process takes GPU ``LOCAL_RANK``. The backend is NCCL on CUDA, Gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(kind)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, context: DistributedContext, **kwargs: Any) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when running distributed, else unchanged."""
    if not context.distributed:
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets ``seed + rank``."""
    import numpy as np

    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_logging(output_dir: Optional[str], is_main: bool = True, name: str = "recurzoo") -> logging.Logger:
    """A logger printing to stderr and appending to ``output_dir/log.txt`` (main process; others warn only)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir and is_main:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def progress(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, initial: int = 0):
    """A tqdm progress bar (silent when ``enabled`` is False, e.g. on non-main ranks)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True,
                leave=False)


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line of ``path`` (a metrics log that survives interruption)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _atomic_write(path: str, write: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint of tensors and plain Python values (dicts, lists, numbers, str)."""
    _atomic_write(path, lambda temporary: torch.save(dict(state), temporary))


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_safetensors(path: str, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically write model weights as safetensors (tensors made contiguous and moved to the CPU)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    _atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def resolve_resume(resume: Optional[str], output_dir: str, name: str = "last.pt") -> Optional[str]:
    """The checkpoint to resume from: ``resume`` itself, or with ``'auto'`` ``output_dir/name`` if it exists."""
    if not resume:
        return None
    if resume == "auto":
        candidate = os.path.join(output_dir, name)
        return candidate if os.path.exists(candidate) else None
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    return resume


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` of the base rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ratio = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress_ratio))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def infinite_batches(loader: Iterable[Any], start_epoch: int = 0) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch, telling a distributed sampler the epoch."""
    epoch = start_epoch
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the data loader yields no batches (is the dataset smaller than one batch?)")
        epoch += 1


def epoch_batches(loader: Iterable[Any], epoch: int, seed: int, rank: int = 0,
                  skip: int = 0) -> Iterator[Any]:
    """``(index, batch)`` pairs of one epoch, in an order that a resumed run reproduces.

    The global RNGs are seeded from ``(seed, epoch, rank)`` and a distributed sampler is told the epoch
    before iterating, so the epoch's sample order is the same when it is run again; the first
    ``skip`` batches (trained before an interruption) are drawn and dropped without computing.
    """
    seed_everything(seed + 1_000_003 * (epoch + 1), rank)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    for index, batch in enumerate(loader):
        if index >= skip:
            yield index, batch


def parse_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['depth=4', 'img_size=32', 'act_layer=gelu']`` -> ``{'depth': 4, 'img_size': 32, 'act_layer': 'gelu'}``.

    Values are Python literals when they parse as one, strings otherwise.
    """
    parsed: Dict[str, Any] = {}
    for item in items or []:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"expected KEY=VALUE, received {item!r}")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(curves: Mapping[str, Sequence[float]], path: str, xlabel: str = "step", ylabel: str = "",
                title: str = "", log_y: bool = False) -> None:
    """Save line plots of named series (e.g. losses per step) to a PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        axes.plot(range(len(values)), list(values), label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    _integer_ticks(axes.xaxis)
    if log_y:
        axes.set_yscale("log")
    if title:
        axes.set_title(title)
    if len(curves) > 1:
        axes.legend()
    figure.tight_layout()
    _atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def save_heatmap(matrix: Any, path: str, title: str = "", label: str = "", xlabel: str = "", ylabel: str = "",
                 lines: Sequence[float] = ()) -> None:
    """Save a 2-D array as a PNG heat map with a colour bar; ``lines`` draws separators before those indices."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(matrix, cmap="viridis", origin="upper")
    colorbar = figure.colorbar(image, ax=axes)
    if label:
        colorbar.set_label(label)
    for position in lines:
        axes.axhline(position - 0.5, color="white", linewidth=1.5)
        axes.axvline(position - 0.5, color="white", linewidth=1.5)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    _atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Run control shared by the epoch-based scripts (classification, detection, ...): a --config YAML,
# stop signals, the non-finite-loss guard, fault injection for recovery tests, timm's checkpoint
# saver writing atomic weights-only checkpoints, resume, the epoch summary and its plots.
# --------------------------------------------------------------------------------------------------

EXIT_NON_FINITE = 3
FAULT_MODES = ("sigterm", "sigint", "sigkill", "nan")


class TrainingInterrupted(Exception):
    """A stop signal (SIGTERM/SIGINT) ended the run after its final checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Optional[str] = None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by signal {signum}; final checkpoint: {checkpoint or 'none written'}")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the bad update and keeps its last checkpoint."""


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                           config_flag: str = "--config") -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from the YAML file named by ``--config`` (timm's scheme).

    The file maps option names (``lr``, ``batch_size`` or ``batch-size``) to values; flags given on the
    command line win over the file. Unknown names are an error; options the file sets are no longer
    required on the command line.
    """
    import yaml

    if not any(config_flag in action.option_strings for action in parser._actions):
        parser.add_argument(config_flag, default=None, metavar="YAML",
                            help="YAML file of option defaults (command-line flags win)")
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument(config_flag, default=None)
    known, _ = pre_parser.parse_known_args(argv)
    path = getattr(known, config_flag.lstrip("-").replace("-", "_"))
    if path:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{config_flag} {path}: expected a mapping of option names to values")
        values = {str(key).replace("-", "_"): value for key, value in loaded.items()}
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"{config_flag} {path}: unknown options {', '.join(unknown)}")
        for dest in values:
            actions[dest].required = False
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def save_args_yaml(args: argparse.Namespace, path: str) -> None:
    """Write the resolved options as YAML (usable again with ``--config``)."""
    import yaml

    text = yaml.safe_dump({key: value for key, value in vars(args).items() if key != "config"}, sort_keys=True)

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_write(path, write)


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """The documented fault-injection options (``--fail-at-step``, ``--fail-mode``) of :class:`RunGuard`."""
    group = parser.add_argument_group("fault injection (test recovery: resume, signals, the NaN guard)")
    group.add_argument("--fail-at-step", type=int, default=None, metavar="N",
                       help="fail when the run reaches optimizer step N (counted over the whole run)")
    group.add_argument("--fail-mode", choices=FAULT_MODES, default="sigkill",
                       help="how: send this process SIGTERM/SIGINT (final checkpoint, clean stop), SIGKILL "
                            "(a hard crash: no final checkpoint), or make the loss NaN (the guard stops the run)")


class RunGuard:
    """Per-step safety of a training loop: stop signals, the non-finite-loss guard, fault injection.

    Use as a context manager around the loop (it installs SIGTERM/SIGINT handlers that only record the
    signal and restores the previous handlers on exit) and call :meth:`check` with every step's loss
    before the backward pass. ``check`` agrees across ranks in one small all-reduce: a NaN/inf loss
    on any rank raises :class:`NonFiniteLossError` everywhere (the model still holds the last good
    update), and a signal received by any rank makes ``check`` return True on all of them, so that
    every rank stops at the same step and the main one writes the final checkpoint.
    """

    def __init__(self, context: DistributedContext, fail_at_step: Optional[int] = None,
                 fail_mode: str = "sigkill", signals: Sequence[int] = ()) -> None:
        import signal as signal_module

        if fail_mode not in FAULT_MODES:
            raise ValueError(f"fail_mode must be one of {FAULT_MODES}, received {fail_mode!r}")
        self.context = context
        self.fail_at_step = fail_at_step
        self.fail_mode = fail_mode
        self.signals = tuple(signals) or (signal_module.SIGTERM, signal_module.SIGINT)
        self.received: int = 0
        self._previous: Dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> "RunGuard":
        import signal as signal_module
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal_module.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        import signal as signal_module

        for signum, handler in self._previous.items():
            signal_module.signal(signum, handler)
        self._previous.clear()

    def _inject(self, loss: torch.Tensor) -> torch.Tensor:
        import signal as signal_module

        if self.fail_mode == "nan":
            return loss * float("nan")
        signum = {"sigterm": signal_module.SIGTERM, "sigint": signal_module.SIGINT,
                  "sigkill": signal_module.SIGKILL}[self.fail_mode]
        os.kill(os.getpid(), signum)
        return loss

    def check(self, loss: torch.Tensor, step: int, where: str = "") -> bool:
        """Raise on a non-finite loss (any rank); return True when a stop signal arrived (any rank)."""
        if self.fail_at_step is not None and step == self.fail_at_step:
            loss = self._inject(loss)
        flags = torch.stack([torch.tensor(float(self.received), device=loss.device),
                             (~torch.isfinite(loss.detach())).any().float()])
        if self.context.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, non_finite = flags.tolist()
        if non_finite:
            raise NonFiniteLossError(f"non-finite loss ({float(loss.detach().float().sum())}) at step {step}"
                                     + (f" ({where})" if where else ""))
        if signum and not self.received:
            self.received = int(signum)
        return bool(signum)


def _checkpoint_saver_class():
    from timm.utils import CheckpointSaver
    from timm.utils.model import get_state_dict

    class TrainCheckpointSaver(CheckpointSaver):
        """timm's ``CheckpointSaver`` (``last``, ranked ``checkpoint-<epoch>`` files, ``model_best``) whose
        files are written by :func:`save_checkpoint` (atomic, loadable with ``weights_only=True``) and
        carry the resume state ``extra_state()`` returns (position in the epoch, scheduler, ...).
        """

        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, output_dir: str, arch: str,
                     run_args: Optional[Mapping[str, Any]] = None, model_ema: Optional[nn.Module] = None,
                     amp_scaler: Any = None, extra_state: Optional[Any] = None, decreasing: bool = False,
                     max_history: int = 3) -> None:
            super().__init__(model, optimizer, model_ema=model_ema, amp_scaler=amp_scaler,
                             checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing,
                             max_history=max_history)  # timm's unwrap_fn: DDP, compiled and EMA wrappers
            self.arch = arch
            self.run_args = dict(run_args or {})
            self.extra_state = extra_state

        def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
            state: Dict[str, Any] = dict(epoch=epoch, arch=self.arch, version=2, args=self.run_args,
                                         state_dict=get_state_dict(self.model, self.unwrap_fn),
                                         optimizer=self.optimizer.state_dict())
            if self.amp_scaler is not None:
                state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
            if self.model_ema is not None:
                state["state_dict_ema"] = get_state_dict(self.model_ema, self.unwrap_fn)
            if metric is not None:
                state["metric"] = metric
            if hasattr(self, "state_dict"):  # ranked-checkpoint bookkeeping (newer timm)
                state["saver"] = self.state_dict(epoch, metric)
            if self.extra_state is not None:
                state.update(self.extra_state())
            save_checkpoint(save_path, state)

        @property
        def last_path(self) -> str:
            return os.path.join(self.checkpoint_dir, "last" + self.extension)

        def save_last(self, epoch: int) -> str:
            """Write the current (e.g. mid-epoch) state to ``last`` only, atomically; returns its path."""
            temporary = os.path.join(self.checkpoint_dir, "tmp" + self.extension)
            self._save(temporary, epoch)
            self._replace(temporary, self.last_path)
            return self.last_path

    return TrainCheckpointSaver


def create_checkpoint_saver(model: nn.Module, optimizer: torch.optim.Optimizer, output_dir: str, arch: str,
                            **kwargs: Any):
    """A ``TrainCheckpointSaver`` (timm's ``CheckpointSaver`` writing atomic, weights-only checkpoints)."""
    return _checkpoint_saver_class()(model, optimizer, output_dir, arch, **kwargs)


def restore_training_state(checkpoint: Mapping[str, Any], model: nn.Module,
                           optimizer: Optional[torch.optim.Optimizer] = None, model_ema: Optional[nn.Module] = None,
                           amp_scaler: Any = None, saver: Any = None) -> None:
    """Load what a ``TrainCheckpointSaver`` wrote back into the model, optimizer, EMA, scaler and saver."""
    from timm.models import clean_state_dict
    from timm.utils import unwrap_model as unwrap_any  # also unwraps EMA wrappers

    unwrap_any(model).load_state_dict(clean_state_dict(checkpoint["state_dict"]))
    if optimizer is not None and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if model_ema is not None and "state_dict_ema" in checkpoint:
        unwrap_any(model_ema).load_state_dict(clean_state_dict(checkpoint["state_dict_ema"]))
    if amp_scaler is not None and amp_scaler.state_dict_key in checkpoint:
        amp_scaler.load_state_dict(checkpoint[amp_scaler.state_dict_key])
    if saver is not None and checkpoint.get("saver") and hasattr(saver, "load_state_dict"):
        saver.load_state_dict(checkpoint["saver"])


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the rows of epochs ``>= start_epoch`` from a summary CSV, so a resumed run does not repeat them."""
    import csv

    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [row for row in rows[1:] if row and int(float(row[0])) < start_epoch]
    if len(kept) == len(rows) - 1:
        return

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if kept:
                writer.writerow(rows[0])
                writer.writerows(kept)

    _atomic_write(path, write)


def read_summary(path: str) -> Dict[str, List[float]]:
    """The columns of a summary CSV (as ``timm.utils.update_summary`` writes it) as lists of floats."""
    import csv

    columns: Dict[str, List[float]] = {}
    if not os.path.exists(path):
        return columns
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                try:
                    columns.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    continue
    return columns


def plot_summary(summary_path: str, output_dir: str) -> List[str]:
    """Plot a summary CSV's per-epoch curves: ``loss.png`` (the ``*loss*`` columns) and ``metrics.png``
    (the other ``eval_*`` columns); returns the files written."""
    columns = read_summary(summary_path)
    losses = {key: values for key, values in columns.items() if "loss" in key}
    metrics = {key: values for key, values in columns.items() if key.startswith("eval_") and "loss" not in key}
    written = []
    for name, curves, ylabel in (("loss.png", losses, "loss"), ("metrics.png", metrics, "metric")):
        if curves:
            path = os.path.join(output_dir, name)
            plot_curves(curves, path, xlabel="epoch", ylabel=ylabel)
            written.append(path)
    return written


def run_cli(main: Any, argv: Optional[Sequence[str]] = None) -> None:
    """Run a training script's ``main`` as a command: exit 128+signal after a signal stop, and exit
    ``EXIT_NON_FINITE`` with a one-line message when the loss became NaN/inf."""
    try:
        main(argv)
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except NonFiniteLossError as error:
        print(f"error: {error}; the last good checkpoint is kept", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
