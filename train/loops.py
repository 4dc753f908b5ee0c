"""The skeletons of the training loops: what every script's loop does alike.

* :class:`EpochTraining` (classification, detection): epochs of a data loader, a run's position within
  an epoch, mid-epoch checkpoints through timm's ``CheckpointSaver``, the per-epoch summary.
* :class:`StepTraining` (camouflage, super-resolution, distillation): a number of updates drawn from
  an endless loader, checkpoints in ``OUTPUT/last.pt`` every so many updates.

Both run their loop under a :class:`~recurzoo.train.run.RunGuard` (a stop signal writes a final
checkpoint of the state before the update in flight and raises ``TrainingInterrupted``; a NaN/inf loss
raises ``NonFiniteLossError`` before its update, logged with the checkpoint that is kept; ``--fail-at-step``
injects either), store every rank's RNG state with each checkpoint and resume from it exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from recurzoo.plots import plot_curves
from recurzoo.train.arguments import parse_args_with_config, save_args_yaml
from recurzoo.train.distributed import DistributedContext, run_distributed
from recurzoo.train.resume import (
    BufferSnapshot,
    EpochBatches,
    StepBatches,
    TrainCheckpointSaver,
    gather_rng_states,
    load_checkpoint,
    rank_rng_state,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
    save_safetensors,
)
from recurzoo.train.run import (
    NonFiniteLossError,
    RunGuard,
    TrainingInterrupted,
    append_jsonl,
    plot_summary,
    progress_bar,
    setup_logging,
    trim_summary,
)

__all__ = ["Training", "EpochTraining", "StepTraining"]


class Training:
    """What both loops share: the run's arguments, process and log, the optimizer step, the guarded loop.

    A subclass sets ``model``, ``optimizer`` and ``scaler`` (timm's ``NativeScaler`` for float16 autocast,
    else None), says where its last checkpoint is (:attr:`last_checkpoint`) and implements :meth:`run`;
    a script's ``main`` is ``Subclass.main(build_parser(), argv)`` (or ``Subclass.launch(args)``).
    """

    zero_grad_to_none = True  # as ``optimizer.zero_grad(set_to_none=...)`` before each backward

    def __init__(self, args: argparse.Namespace, context: DistributedContext, name: str) -> None:
        self.args = args
        self.context = context
        self.logger = setup_logging(args.output, context.is_main, name=f"recurzoo.{name}")
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scaler: Any = None
        self.buffers_before_step: Optional[BufferSnapshot] = None

    def _note_fresh_start(self, checkpoint: str) -> None:
        """Say so when ``--resume auto`` found nothing to resume (the run starts from the beginning)."""
        if self.args.resume == "auto":
            self.logger.info(f"--resume auto: no {checkpoint} in {self.args.output} yet, starting a new run")

    @classmethod
    def main(cls, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> Any:
        """Parse ``argv`` with ``parser`` (option defaults from ``--config``), :meth:`check_arguments`, then
        :meth:`launch` the run."""
        args = parse_args_with_config(parser, argv)
        cls.check_arguments(args)
        return cls.launch(args)

    @classmethod
    def check_arguments(cls, args: argparse.Namespace) -> None:
        """Refuse (``UsageError``) options that do not go together, before any process group or device."""

    @classmethod
    def launch(cls, args: argparse.Namespace) -> Any:
        """Run a training of this class with ``args`` in the process group ``torchrun`` describes (one
        process without it): what every script's ``main`` ends with. Returns :meth:`run`'s result."""
        return run_distributed(lambda args, context: cls(args, context).run(), args)

    def run(self) -> Any:
        """The whole run: data, model, resume, the loop, the final weights; returns the script's result."""
        raise NotImplementedError

    @property
    def last_checkpoint(self) -> Optional[str]:
        """The checkpoint a stopped run resumes from (None where this process writes none)."""
        raise NotImplementedError

    @property
    def show_progress(self) -> bool:
        return self.context.is_main and not self.args.no_progress

    def snapshot_buffers(self) -> None:
        """Remember the normalization statistics before a forward pass (see :class:`BufferSnapshot`)."""
        if self.buffers_before_step is None:
            self.buffers_before_step = BufferSnapshot(self.model)
        self.buffers_before_step.take()

    def restore_buffers(self) -> None:
        """Undo what the forward pass of a step that is not trained did to the normalization statistics."""
        if self.buffers_before_step is not None:
            self.buffers_before_step.restore()

    def optimizer_step(
        self,
        loss: torch.Tensor,
        clip_grad: Optional[float] = None,
        clip_mode: str = "norm",
        parameters: Optional[Iterable[nn.Parameter]] = None,
    ) -> None:
        """Backward (scaled by ``scaler`` if any), gradient clipping to ``clip_grad`` of ``parameters``
        (default: the model's; None or 0: no clipping), then the optimizer's step."""
        from timm.utils import dispatch_clip_grad

        parameters = list(self.model.parameters() if parameters is None else parameters)
        self.optimizer.zero_grad(set_to_none=self.zero_grad_to_none)
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, clip_grad=clip_grad or None, clip_mode=clip_mode, parameters=parameters)
            return
        loss.backward()
        if clip_grad:
            dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        self.optimizer.step()

    @contextlib.contextmanager
    def guarded(self) -> Iterator[RunGuard]:
        """The :class:`RunGuard` of ``--fail-at-step``/``--fail-mode`` around a loop; a NaN/inf stop is
        logged with the checkpoint that is kept."""
        with RunGuard(self.context, self.args.fail_at_step, self.args.fail_mode) as guard:
            try:
                yield guard
            except NonFiniteLossError as error:
                path = self.last_checkpoint
                kept = path if path is not None and os.path.exists(path) else "none (none written yet)"
                self.logger.error(f"{error}: stopping; the last good checkpoint is {kept}")
                raise

    def stop(self, guard: RunGuard) -> None:
        """End the run after a stop signal (its final checkpoint written)."""
        raise TrainingInterrupted(guard.received, self.last_checkpoint if self.context.is_main else None)


class EpochTraining(Training):
    """The epoch-based loop (classification, detection): the run's position (updates done, batches done
    of the current epoch, the epoch's running sums), mid-epoch checkpoints with every rank's RNG state,
    resume, and :meth:`train_epochs`: epochs with BatchNorm sync, evaluation, schedule, summary, ranked
    checkpoints and plots.

    A subclass makes its ``saver`` with :meth:`create_saver` (main process only), sets ``scheduler``
    (timm's or None), ``num_epochs`` and ``eval_metric`` (the evaluation metric that ranks checkpoints),
    resumes with :meth:`resume_epoch` and starts with :meth:`start_epochs`, and implements
    :meth:`train_epoch` (over :meth:`epoch_batches`, calling :meth:`save_last` for mid-epoch checkpoints)
    and :meth:`evaluate_epoch`; :meth:`run_state` adds what its checkpoints need beyond the position.
    """

    def __init__(self, args: argparse.Namespace, context: DistributedContext, name: str) -> None:
        super().__init__(args, context, name)
        self.summary_path = os.path.join(args.output, "summary.csv")
        self.num_updates = 0
        self.batches_done: Optional[int] = None  # of the current epoch; None between epochs
        self.epoch_sums: Any = None  # the current epoch's running loss sums (kept across a resume)
        self.resume_rng: Optional[Dict[str, Any]] = None  # this rank's RNG state of a mid-epoch checkpoint
        self.rng_states: List[Dict[str, Any]] = []  # every rank's, for the next mid-epoch checkpoint
        self.saver: Any = None
        self.scheduler: Any = None
        self.num_epochs = 0
        self.eval_metric = "loss"

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self.saver.last_path if self.saver is not None else None

    def position_state(self) -> Dict[str, Any]:
        """The run's position, stored in every checkpoint (with the RNG states when mid-epoch)."""
        state: Dict[str, Any] = dict(
            num_updates=self.num_updates, batches_done=self.batches_done, epoch_sums=self.epoch_sums
        )
        if self.batches_done is not None:
            state["rng"] = self.rng_states
        return state

    def run_state(self) -> Dict[str, Any]:
        """What a subclass stores in every checkpoint beside the position (e.g. its class count)."""
        return {}

    def create_saver(self, arch: str, model_ema: Any = None, decreasing: bool = False) -> TrainCheckpointSaver:
        """timm's checkpoint saver for this run (``last``, ``--checkpoint-hist`` ranked epochs, the best by
        ``eval_metric``, ``decreasing`` when lower is better), each file holding the run's position."""
        return TrainCheckpointSaver(
            self.model,
            self.optimizer,
            self.args.output,
            arch=arch,
            run_args=vars(self.args),
            model_ema=model_ema,
            amp_scaler=self.scaler,
            extra_state=lambda: dict(self.position_state(), **self.run_state()),
            decreasing=decreasing,
            max_history=self.args.checkpoint_hist,
        )

    def resume_epoch(self, optimizer: Optional[torch.optim.Optimizer], model_ema: Any = None) -> Optional[int]:
        """Restore ``--resume``'s checkpoint (``auto``: ``OUTPUT/last.pth.tar`` if there is one) into the
        model, ``optimizer``, ``model_ema``, scaler and saver; returns the epoch to start with (the run's
        position set when mid-epoch), or None when not resuming."""
        path = resolve_resume(self.args.resume, self.args.output, name="last.pth.tar")
        if path is None:
            self._note_fresh_start("last.pth.tar")
            return None
        state = load_checkpoint(path)
        restore_training_state(
            state, self.model, optimizer, model_ema, self.scaler, self.saver, source=f"--resume {path}"
        )
        return self.restore_position(state, path)

    def epochs_result(
        self, best: Tuple[Optional[float], Optional[int]], eval_metrics: Dict[str, float], best_key: str, **extra: Any
    ) -> Dict[str, Any]:
        """What ``run`` returns after :meth:`train_epochs`: the best ``eval_metric`` (as ``best_key``) and its
        epoch, the last evaluation's metrics, the updates done, the summary and output paths, and ``extra``."""
        return {
            best_key: best[0],
            "best_epoch": best[1],
            "eval": eval_metrics,
            "num_updates": self.num_updates,
            "summary": self.summary_path,
            "output": self.args.output,
            **extra,
        }

    def start_epochs(self, start_epoch: int) -> None:
        """Before the first epoch: the output folder made (only now, once the data, the model and the resume
        point are found), the resolved options in ``OUTPUT/args.yaml`` and the summary rows of the epochs to
        run again dropped (main process only)."""
        if self.context.is_main:
            os.makedirs(self.args.output, exist_ok=True)
            save_args_yaml(self.args, os.path.join(self.args.output, "args.yaml"))
            trim_summary(self.summary_path, start_epoch)

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
        if pending:
            self.restore_buffers()
        if self.saver is not None:
            path = self.saver.save_last(epoch)
            self.logger.info(f"checkpoint {path}: epoch {epoch}, step {self.batches_done} of it")

    def train_epoch(self, epoch: int, guard: RunGuard) -> Optional[Dict[str, float]]:
        """One epoch (from ``batches_done`` when resumed mid-epoch): its training metrics, or None after a
        stop signal (the pending checkpoint written)."""
        raise NotImplementedError

    def evaluate_epoch(self, epoch: int) -> Dict[str, float]:
        """The evaluation metrics after ``epoch`` ({} when there is no evaluation then)."""
        raise NotImplementedError

    def train_epochs(self, start_epoch: int) -> Tuple[Tuple[Optional[float], Optional[int]], Dict[str, float]]:
        """Epochs ``start_epoch`` to ``num_epochs - 1``; returns the best ``eval_metric`` with its epoch, and
        the last evaluation's metrics. Each epoch ends with the BatchNorm sync (``--dist-bn``), the
        evaluation, the schedule's epoch step, a ``summary.csv`` row, the ranked checkpoints, and with
        ``--plot`` the curves; with ``--rank-weights`` every rank writes its final weights."""
        from timm.utils import distribute_bn, update_summary

        args, context = self.args, self.context
        best: Tuple[Optional[float], Optional[int]] = (None, None)
        eval_metrics: Dict[str, float] = {}
        with self.guarded() as guard:
            for epoch in range(start_epoch, self.num_epochs):
                train_metrics = self.train_epoch(epoch, guard)
                if train_metrics is None:
                    self.stop(guard)
                if context.distributed and args.dist_bn:
                    distribute_bn(self.model, context.world_size, args.dist_bn == "reduce")
                last_lr = max(group["lr"] for group in self.optimizer.param_groups)  # the epoch's last
                eval_metrics = self.evaluate_epoch(epoch)
                metric = eval_metrics.get(self.eval_metric)
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1, metric)
                self.batches_done = self.epoch_sums = None
                if context.is_main:
                    update_summary(epoch, train_metrics, eval_metrics, self.summary_path, lr=last_lr)
                    best = self.saver.save_checkpoint(epoch, metric=metric)
                    if args.plot:
                        plot_summary(self.summary_path, args.output)
                    shown = {
                        **{f"train_{k}": v for k, v in train_metrics.items()},
                        **{f"eval_{k}": v for k, v in eval_metrics.items()},
                    }
                    self.logger.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if args.rank_weights:
            save_safetensors(os.path.join(args.output, f"rank{context.rank}.safetensors"), self.model.state_dict())
        return best, eval_metrics


class StepTraining(Training):
    """The step-based loop (camouflage, super-resolution, distillation): :meth:`train_steps` runs updates
    from an endless, exactly resumable loader, with the loss history, the schedule stepped every update
    and ``OUTPUT/last.pt`` written every ``save_every`` updates and at the end.

    A subclass sets ``model``, ``optimizer``, ``scheduler`` (torch's, stepped once per update, or timm's,
    given the update count) and, if it wants them, ``scaler`` and ``clip_grad``; it implements
    :meth:`training_loss` and :meth:`checkpoint_state`, and may extend :meth:`after_update` (logging,
    evaluation, EMA). :meth:`load_resume` reads ``--resume``, :meth:`restore_optimization` loads it back.
    """

    clip_grad: Optional[float] = None  # gradient-norm clipping of every update (None: none)

    def __init__(self, args: argparse.Namespace, context: DistributedContext, name: str) -> None:
        super().__init__(args, context, name)
        self.last_path = os.path.join(args.output, "last.pt")
        self.scheduler: Any = None
        self.history: List[float] = []  # the loss of every update (of the current loop)
        self.batches: Optional[StepBatches] = None

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self.last_path

    def load_resume(self, required: Sequence[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """The checkpoint ``--resume`` names (``auto``: ``OUTPUT/last.pt`` if there is one) and its contents,
        which must hold the ``required`` entries; ``(None, None)`` when not resuming."""
        path = resolve_resume(self.args.resume, self.args.output)
        if path is None:
            self._note_fresh_start("last.pt")
            return None, None
        return path, load_checkpoint(path, required=required, source=f"--resume {path}")

    def restore_optimization(self, state: Mapping[str, Any], updates: int) -> Optional[Dict[str, Any]]:
        """Load a checkpoint's optimizer, scheduler (at ``updates``) and grad-scaler state; returns this rank's
        RNG state from it, for :meth:`train_steps`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if hasattr(self.scheduler, "step_update"):  # timm's: the rate of the update count
            self.scheduler.step_update(updates)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return rank_rng_state(state.get("rng"), self.context, self.logger)

    def training_loss(self, batch: Any, step: int) -> Tuple[torch.Tensor, Mapping[str, float]]:
        """The loss of update ``step`` (0-based) on ``batch``, and any parts of it worth logging."""
        raise NotImplementedError

    def checkpoint_state(self, updates: int) -> Dict[str, Any]:
        """What ``last.pt`` holds after ``updates`` updates; a subclass adds its model and extras."""
        return dict(
            step=updates,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            args=vars(self.args),
        )

    def trained_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradient norm ``clip_grad`` bounds."""
        return self.model.parameters()

    def after_update(self, updates: int, total: int, parts: Mapping[str, float]) -> None:
        """Called after each update (``updates`` done of ``total``) with the parts of its loss."""

    def log_metrics(self, **values: Any) -> None:
        """One line of ``OUTPUT/metrics.jsonl`` (main process only)."""
        if self.context.is_main:
            append_jsonl(os.path.join(self.args.output, "metrics.jsonl"), values)

    def log_update(
        self, updates: int, total: int, lr: float, prefix: str = "", detail: str = "", **values: Any
    ) -> None:
        """Every ``--log-every`` updates and after the last (main process only): the mean loss since the last
        such line and ``lr`` in the log, as ``{prefix}step U/T loss L{detail} lr R``, and the update's loss,
        ``lr`` and ``values`` in ``OUTPUT/metrics.jsonl``."""
        log_every = self.args.log_every
        if not self.context.is_main or (updates % log_every and updates != total):
            return
        recent = self.history[-log_every:]
        self.logger.info(f"{prefix}step {updates}/{total} loss {sum(recent) / len(recent):.5f}{detail} lr {lr:.2e}")
        self.log_metrics(**values, step=updates, loss=self.history[-1], lr=lr)

    def save_final(
        self,
        model: nn.Module,
        metadata: Mapping[str, str],
        curve: str = "loss",
        ylabel: str = "loss",
        log_y: bool = False,
    ) -> None:
        """On the main process: ``model``'s weights as ``OUTPUT/model.safetensors`` with ``metadata``, and the
        loss of every update (named ``curve``) as ``OUTPUT/loss.png`` (left out, with a warning, without
        matplotlib)."""
        if not self.context.is_main:
            return
        output = self.args.output
        save_safetensors(os.path.join(output, "model.safetensors"), model.state_dict(), metadata=dict(metadata))
        if self.history:
            try:
                plot_curves({curve: self.history}, os.path.join(output, "loss.png"), ylabel=ylabel, log_y=log_y)
            except ImportError:
                self.logger.warning("matplotlib is not installed: loss.png not written")

    def save(self, updates: int, pending: bool = False) -> None:
        """Write ``last.pt`` after ``updates`` updates, with every rank's RNG state; ``pending``: the batch
        just drawn was not trained (a stop signal before its update) and is trained again on resume.
        A collective under torchrun: every rank calls it."""
        rng = gather_rng_states(self.context, self.batches.resume_rng_state(pending))
        if pending:
            self.restore_buffers()
        if self.context.is_main:
            save_checkpoint(self.last_path, dict(self.checkpoint_state(updates), rng=rng))

    def train_steps(
        self,
        loader: Any,
        start_step: int,
        total: int,
        save_every: int,
        resume_rng: Optional[Mapping[str, Any]] = None,
        step_offset: int = 0,
        desc: str = "train",
    ) -> None:
        """Updates ``start_step`` to ``total - 1`` on batches of ``loader``, continuing exactly where a run
        stopped after ``start_step`` updates with ``resume_rng`` (its checkpoint's RNG state).
        ``step_offset`` (updates of earlier loops of the run) makes ``--fail-at-step`` count over the run."""
        self.batches = StepBatches(loader, self.args.seed, self.context.rank, start_step, resume_rng)
        bar = progress_bar(total=total, initial=start_step, desc=desc, enabled=self.show_progress)
        with self.guarded() as guard:
            for step in range(start_step, total):
                batch = next(self.batches)
                self.snapshot_buffers()
                loss, parts = self.training_loss(batch, step)
                if guard.check(loss, step_offset + step, where=f"{desc} step {step + 1}/{total}"):
                    self.save(step, pending=True)
                    bar.close()
                    self.stop(guard)
                self.optimizer_step(loss, self.clip_grad, parameters=self.trained_parameters())
                if hasattr(self.scheduler, "step_update"):
                    self.scheduler.step_update(step + 1)
                else:
                    self.scheduler.step()
                self.history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{self.history[-1]:.4f}")
                self.after_update(step + 1, total, parts)
                if (step + 1) % save_every == 0 or step + 1 == total:
                    self.save(step + 1)
        bar.close()
