"""The skeletons of the training loops: what every script's loop does alike.

``EpochTraining`` (classification, detection) keeps a run's position within an epoch, writes mid-epoch
checkpoints with every rank's RNG state, resumes them, steps the optimizer and logs a NaN stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn

from recurzoo.train.distributed import DistributedContext
from recurzoo.train.resume import BufferSnapshot, EpochBatches, gather_rng_states, rank_rng_state
from recurzoo.train.run import NonFiniteLossError, setup_logging

__all__ = ["EpochTraining"]


class EpochTraining:
    """What the epoch-based training scripts (classification, detection) share: their run's position
    (updates done, batches done of the current epoch, the epoch's running sums), mid-epoch checkpoints
    with every rank's RNG state, resume, the optimizer step and the NaN-stop log line.

    A subclass sets ``model``, ``optimizer``, ``scaler`` (timm's ``NativeScaler`` or None) and ``saver``
    (a :func:`create_checkpoint_saver`, main process only, whose ``extra_state`` includes
    :meth:`position_state`), iterates each epoch over :meth:`epoch_batches` and calls :meth:`save_last`
    for mid-epoch checkpoints.
    """

    def __init__(self, args: argparse.Namespace, context: DistributedContext, name: str) -> None:
        self.args = args
        self.context = context
        self.logger = setup_logging(args.output, context.is_main, name=f"recurzoo.{name}")
        self.summary_path = os.path.join(args.output, "summary.csv")
        self.num_updates = 0
        self.batches_done: Optional[int] = None  # of the current epoch; None between epochs
        self.epoch_sums: Any = None  # the current epoch's running loss sums (kept across a resume)
        self.resume_rng: Optional[Dict[str, Any]] = None  # this rank's RNG state of a mid-epoch checkpoint
        self.rng_states: List[Dict[str, Any]] = []  # every rank's, for the next mid-epoch checkpoint
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scaler: Any = None
        self.saver: Any = None
        self.buffers_before_step: Optional[BufferSnapshot] = None

    def snapshot_buffers(self) -> None:
        """Remember the normalization statistics before a forward pass (see :class:`BufferSnapshot`)."""
        if self.buffers_before_step is None:
            self.buffers_before_step = BufferSnapshot(self.model)
        self.buffers_before_step.take()

    def position_state(self) -> Dict[str, Any]:
        """The run's position, stored in every checkpoint (with the RNG states when mid-epoch)."""
        state: Dict[str, Any] = dict(
            num_updates=self.num_updates, batches_done=self.batches_done, epoch_sums=self.epoch_sums
        )
        if self.batches_done is not None:
            state["rng"] = self.rng_states
        return state

    def restore_position(self, state: Mapping[str, Any], path: str) -> int:
        """Take the position of a checkpoint :meth:`position_state` wrote; returns the epoch to start with."""
        self.num_updates = int(state.get("num_updates", 0))
        self.batches_done = state.get("batches_done")
        if self.batches_done is None:
            start_epoch = int(state.get("epoch", -1)) + 1
        else:
            start_epoch = int(state["epoch"])
            self.epoch_sums = state.get("epoch_sums", self.epoch_sums)
            self.resume_rng = rank_rng_state(state.get("rng"), self.context, self.logger)
        self.logger.info(
            f"resumed {path}: epoch {start_epoch}"
            + (f", after step {self.batches_done} of it" if self.batches_done else "")
            + f" ({self.num_updates} updates done)"
        )
        return start_epoch

    def epoch_batches(self, loader: Any, epoch: int) -> EpochBatches:
        """The epoch's batches, from ``batches_done`` on with the saved RNG state when resumed mid-epoch."""
        batches = EpochBatches(
            loader, epoch, self.args.seed, self.context.rank, self.batches_done or 0, self.resume_rng
        )
        self.resume_rng = None
        return batches

    def save_last(self, epoch: int, batches: EpochBatches, pending: bool = False) -> None:
        """Write the mid-epoch ``last`` checkpoint with every rank's RNG state; ``pending``: the batch just
        drawn was not trained (a stop signal before its update) and is trained again on resume.
        A collective under torchrun: every rank calls it."""
        self.rng_states = gather_rng_states(self.context, batches.resume_rng_state(pending))
        if pending and self.buffers_before_step is not None:
            self.buffers_before_step.restore()
        if self.saver is not None:
            path = self.saver.save_last(epoch)
            self.logger.info(f"checkpoint {path}: epoch {epoch}, step {self.batches_done} of it")

    def optimizer_step(self, loss: torch.Tensor, clip_mode: str = "norm") -> None:
        """Backward (scaled with float16 autocast), ``--clip-grad``, then the optimizer's step."""
        from timm.utils import dispatch_clip_grad

        clip_grad = self.args.clip_grad
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler(
                loss, self.optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=self.model.parameters()
            )
            return
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(self.model.parameters(), clip_grad, mode=clip_mode)
        self.optimizer.step()

    @contextlib.contextmanager
    def log_failure(self) -> Iterator[None]:
        """Record a NaN/inf stop in the log, naming the checkpoint that is kept."""
        try:
            yield
        except NonFiniteLossError as error:
            kept = self.saver.last_path if self.saver is not None and os.path.exists(self.saver.last_path) else None
            self.logger.error(f"{error}: stopping; the last good checkpoint is {kept or 'none (none written yet)'}")
            raise
