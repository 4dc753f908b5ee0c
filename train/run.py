"""Run control shared by the training scripts: stop signals, the non-finite-loss guard, fault injection,
logging, the metrics log and the per-epoch summary.

``RunGuard`` surrounds a training loop: SIGTERM/SIGINT only set a flag that the loop sees at its next
step (it then writes a final checkpoint and raises :class:`TrainingInterrupted`), a NaN/inf loss raises
:class:`NonFiniteLossError` before the bad update, and ``--fail-at-step`` injects either on purpose.
``setup_logging``, ``progress_bar`` and ``append_jsonl`` give a console/file log, tqdm bars and a JSON-lines
metrics log on the main process; ``trim_summary``/``plot_summary`` keep timm's ``summary.csv`` right
across a resume and plot it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from recurzoo.checkpoint import atomic_write
from recurzoo.plots import plot_curves
from recurzoo.train.distributed import DistributedContext

__all__ = [
    "EXIT_NON_FINITE",
    "FAULT_MODES",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "RunGuard",
    "setup_logging",
    "progress_bar",
    "append_jsonl",
    "trim_summary",
    "read_summary",
    "plot_summary",
]


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


class RunGuard:
    """Per-step safety of a training loop: stop signals, the non-finite-loss guard, fault injection.

    Use as a context manager around the loop (it installs SIGTERM/SIGINT handlers that only record the
    signal and restores the previous handlers on exit) and call :meth:`check` with every step's loss
    before the backward pass. ``check`` agrees across ranks in one small all-reduce: a NaN/inf loss
    on any rank raises :class:`NonFiniteLossError` everywhere (the model still holds the last good
    update), and a signal received by any rank makes ``check`` return True on all of them, so that
    every rank stops at the same step and the main one writes the final checkpoint.
    """

    def __init__(
        self,
        context: DistributedContext,
        fail_at_step: Optional[int] = None,
        fail_mode: str = "sigkill",
        signals: Sequence[int] = (),
    ) -> None:
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
        signum = {"sigterm": signal_module.SIGTERM, "sigint": signal_module.SIGINT, "sigkill": signal_module.SIGKILL}[
            self.fail_mode
        ]
        os.kill(os.getpid(), signum)
        return loss

    def check(self, loss: torch.Tensor, step: int, where: str = "") -> bool:
        """Raise on a non-finite loss (any rank); return True when a stop signal arrived (any rank)."""
        if self.fail_at_step is not None and step == self.fail_at_step:
            loss = self._inject(loss)
        flags = torch.stack(
            [torch.tensor(float(self.received), device=loss.device), (~torch.isfinite(loss.detach())).any().float()]
        )
        if self.context.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, non_finite = flags.tolist()
        if non_finite:
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach().float().sum())}) at step {step}"
                + (f" ({where})" if where else "")
            )
        if signum and not self.received:
            self.received = int(signum)
        return bool(signum)


class _FolderMakingFileHandler(logging.FileHandler):
    """A log file (and its folder) made at the first record: a run refused before it logs leaves nothing."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def setup_logging(output_dir: Optional[str], is_main: bool = True, name: str = "recurzoo") -> logging.Logger:
    """A logger printing to stderr and appending to ``output_dir/log.txt`` (main process; others warn only)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir and is_main:
        handlers.append(_FolderMakingFileHandler(os.path.join(output_dir, "log.txt"), delay=True))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def progress_bar(
    iterable: Optional[Iterable[Any]] = None,
    total: Optional[int] = None,
    desc: str = "",
    enabled: bool = True,
    initial: int = 0,
):
    """A tqdm progress bar (silent when ``enabled`` is False, e.g. on non-main ranks)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, dynamic_ncols=True, leave=False)


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line of ``path`` (a metrics log that survives interruption)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


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

    atomic_write(path, write)


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
