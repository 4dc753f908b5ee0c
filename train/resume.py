"""Checkpoints and exact resume: what a stopped run needs to continue with the very losses of one that
never stopped.

* ``save_checkpoint`` writes atomically (:func:`recurzoo.checkpoint.atomic_write`); ``load_checkpoint``
  reads with :func:`recurzoo.checkpoint.read_checkpoint` (``weights_only``: no code runs).
* ``rng_state``/``set_rng_state`` save and restore Python's, NumPy's and torch's generators;
  ``gather_rng_states`` collects every rank's for the main process's checkpoint.
* ``EpochBatches``/``StepBatches`` give the batches of an epoch (or endlessly) in an order that a
  resumed run reproduces; ``BufferSnapshot`` undoes the normalization statistics of a step in flight.
* ``TrainCheckpointSaver`` is timm's ``CheckpointSaver`` writing such checkpoints with resume state;
  ``restore_training_state`` loads them back.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.utils import CheckpointSaver, random_seed
from timm.utils.model import get_state_dict
from torch import nn

from recurzoo.checkpoint import atomic_write, load_state_dict, read_checkpoint
from recurzoo.train.arguments import UsageError
from recurzoo.train.distributed import DistributedContext

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "save_safetensors",
    "resolve_resume",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
    "rank_rng_state",
    "EpochBatches",
    "StepBatches",
    "BufferSnapshot",
    "TrainCheckpointSaver",
    "restore_training_state",
]


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint of tensors and plain Python values (dicts, lists, numbers, str)."""
    atomic_write(path, lambda temporary: torch.save(dict(state), temporary))


def load_checkpoint(
    path: str, map_location: Any = "cpu", required: Sequence[str] = (), source: str = ""
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    A file that would run code, or a truncated or corrupt one, raises a one-line ``ValueError``
    (:func:`recurzoo.checkpoint.read_checkpoint`); so does a file that is not a mapping, or one without
    the ``required`` entries (``source``, e.g. ``'--resume FILE'``, names it in the message).
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path}: not a training checkpoint (holds a {type(checkpoint).__name__}, not a mapping)")
    if not set(required) <= set(checkpoint):
        needed = ", ".join(required[:-1]) + f" and {required[-1]}" if len(required) > 1 else required[0]
        raise UsageError(f"{source or path}: not a checkpoint of this script (needs {needed} entries)")
    return checkpoint


def save_safetensors(
    path: str, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Atomically write model weights as safetensors (tensors made contiguous and moved to the CPU)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


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


def rng_state() -> Dict[str, Any]:
    """The state of Python's, NumPy's and torch's global random generators (CPU, and the current CUDA
    device when CUDA is in use), as tensors and plain values that a ``weights_only`` checkpoint holds."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: Dict[str, Any] = dict(
        python=[version, list(internal), gauss_next],
        numpy=dict(
            kind=str(kind),
            keys=torch.from_numpy(keys.astype(np.int64)),
            position=int(position),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian),
        ),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators to a state :func:`rng_state` returned."""
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng_states(context: DistributedContext, state: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every rank's :func:`rng_state` (or ``state``), in rank order, on every rank: what a checkpoint
    written by the main process needs to resume all ranks exactly. A collective under torchrun."""
    state = rng_state() if state is None else state
    if not context.distributed:
        return [state]
    gathered: List[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def rank_rng_state(
    states: Optional[Sequence[Dict[str, Any]]], context: DistributedContext, logger: Optional[logging.Logger] = None
) -> Optional[Dict[str, Any]]:
    """This rank's entry of :func:`gather_rng_states`' list, or None (with a warning) when the checkpoint
    was written by another number of processes (the resumed run is then not bit-exact)."""
    if not states:
        return None
    if len(states) != context.world_size:
        if logger is not None:
            logger.warning(
                f"the checkpoint holds the random state of {len(states)} process(es), this run has "
                f"{context.world_size}: resuming with fresh random streams (not bit-exact)"
            )
        return None
    return states[context.rank]


_END = object()


class EpochBatches:
    """``(index, batch)`` pairs of one epoch of ``loader``, in an order that a resumed run reproduces exactly.

    Before the epoch, the global RNGs are seeded from ``(seed, epoch, rank)`` and a distributed sampler
    is told the epoch, so the sample order and augmentation are the same whenever the epoch is run
    again. A run resumed after ``skip`` batches draws and drops them without computing, then restores
    ``rng_state`` -- the state the interrupted run had before its next batch (:meth:`resume_rng_state`)
    -- so that augmentation, dropout, stochastic depth and mixup continue exactly as they would have.
    Exact with ``num_workers=0`` and with worker processes that are not persistent (persistent workers
    keep their random streams across epochs).
    """

    def __init__(
        self,
        loader: Iterable[Any],
        epoch: int,
        seed: int,
        rank: int = 0,
        skip: int = 0,
        rng_state: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.loader = loader
        self.epoch = epoch
        self.seed = seed
        self.rank = rank
        self.skip = skip
        self.rng_state = rng_state
        self._state_before_batch: Optional[Dict[str, Any]] = None

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        # one seed per run seed, epoch and rank, below 2**32 as NumPy requires
        random_seed((self.seed + 1_000_003 * (self.epoch + 1) + self.rank) % 2**32)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        batches = iter(self.loader)
        for _ in range(self.skip):
            if next(batches, _END) is _END:
                return
        if self.skip and self.rng_state is not None:
            set_rng_state(self.rng_state)
        for index in itertools.count(self.skip):
            self._state_before_batch = rng_state()
            batch = next(batches, _END)
            if batch is _END:
                return
            yield index, batch

    def resume_rng_state(self, pending: bool = False) -> Dict[str, Any]:
        """The RNG state to store with a mid-epoch checkpoint: the state before the batch last yielded when
        that batch was not trained (``pending``, e.g. a stop signal before its update), else the current
        state (the batch was trained; the next one is loaded from here)."""
        if pending and self._state_before_batch is not None:
            return self._state_before_batch
        return rng_state()


class StepBatches:
    """Batches of ``loader`` without end, for step-based training, resumable at any step.

    Epoch after epoch as :class:`EpochBatches` (seeded per epoch); a run resumed after ``start_step``
    batches continues at epoch ``start_step // len(loader)`` after its first ``start_step % len(loader)``
    batches, with ``rng_state`` restored (the state :meth:`resume_rng_state` gave the interrupted run).
    Raises ``ValueError`` at once when the loader has no batch (a dataset smaller than one batch).
    """

    def __init__(
        self, loader: Any, seed: int, rank: int = 0, start_step: int = 0, rng_state: Optional[Mapping[str, Any]] = None
    ) -> None:
        if len(loader) == 0:
            raise UsageError(
                f"the training data ({len(loader.dataset)} samples) makes no full batch of "
                f"{loader.batch_size}; lower the batch size"
            )
        self.loader = loader
        self.seed = seed
        self.rank = rank
        epoch, skip = divmod(start_step, len(loader))
        self._epoch = EpochBatches(loader, epoch, seed, rank, skip, rng_state)
        self._batches = iter(self._epoch)

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> Any:
        item = next(self._batches, _END)
        if item is _END:
            self._epoch = EpochBatches(self.loader, self._epoch.epoch + 1, self.seed, self.rank)
            self._batches = iter(self._epoch)
            item = next(self._batches)
        return item[1]

    def resume_rng_state(self, pending: bool = False) -> Dict[str, Any]:
        """See :meth:`EpochBatches.resume_rng_state`."""
        return self._epoch.resume_rng_state(pending)


class BufferSnapshot:
    """The normalization statistics (BatchNorm running mean/var/count) of a module before the step in flight.

    A stop signal is seen after the step's forward pass, which has already moved the running
    statistics; restoring them before the final checkpoint lets the resumed run repeat that step
    exactly. Call :meth:`take` before each forward pass and :meth:`restore` before a pending save.
    """

    def __init__(self, module: nn.Module) -> None:
        from torch.nn.modules.batchnorm import _NormBase

        self._buffers = [
            buffer
            for layer in module.modules()
            if isinstance(layer, _NormBase)
            for buffer in layer.buffers(recurse=False)
        ]
        self._saved: List[torch.Tensor] = []

    def take(self) -> None:
        self._saved = [buffer.detach().clone() for buffer in self._buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self._buffers, self._saved):
                buffer.copy_(saved)


class TrainCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` (``last``, ranked ``checkpoint-<epoch>`` files, ``model_best``) whose
    files are written by :func:`save_checkpoint` (atomic, loadable with ``weights_only=True``) and
    carry the resume state ``extra_state()`` returns (position in the epoch, scheduler, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        output_dir: str,
        arch: str,
        run_args: Optional[Mapping[str, Any]] = None,
        model_ema: Optional[nn.Module] = None,
        amp_scaler: Any = None,
        extra_state: Optional[Any] = None,
        decreasing: bool = False,
        max_history: int = 3,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            model_ema=model_ema,
            amp_scaler=amp_scaler,
            checkpoint_dir=output_dir,
            recovery_dir=output_dir,
            decreasing=decreasing,
            max_history=max_history,
        )  # timm's unwrap_fn: DDP, compiled and EMA wrappers
        self.arch = arch
        self.run_args = dict(run_args or {})
        self.extra_state = extra_state

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state: Dict[str, Any] = dict(
            epoch=epoch,
            arch=self.arch,
            version=2,
            args=self.run_args,
            state_dict=get_state_dict(self.model, self.unwrap_fn),
            optimizer=self.optimizer.state_dict(),
        )
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


def restore_training_state(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    model_ema: Optional[nn.Module] = None,
    amp_scaler: Any = None,
    saver: Any = None,
    source: str = "--resume",
) -> None:
    """Load what a ``TrainCheckpointSaver`` wrote back into the model, optimizer, EMA, scaler and saver.

    A checkpoint without ``state_dict`` or whose weights do not fit the model raises a ``ValueError``
    naming ``source``.
    """
    from timm.utils import unwrap_model  # DDP, compiled and EMA wrappers

    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UsageError(f"{source}: not a training checkpoint of this script (no 'state_dict' entry)")
    load_state_dict(unwrap_model(model), checkpoint["state_dict"], source, use_family_filter=False)
    if optimizer is not None and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if model_ema is not None and "state_dict_ema" in checkpoint:
        load_state_dict(unwrap_model(model_ema), checkpoint["state_dict_ema"], source, use_family_filter=False)
    if amp_scaler is not None and amp_scaler.state_dict_key in checkpoint:
        amp_scaler.load_state_dict(checkpoint[amp_scaler.state_dict_key])
    if saver is not None and checkpoint.get("saver") and hasattr(saver, "load_state_dict"):
        saver.load_state_dict(checkpoint["saver"])
