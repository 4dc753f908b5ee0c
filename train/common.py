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
* Epoch-based scripts also share: ``parse_args_with_config`` (a ``--config`` YAML of defaults),
  ``RunGuard`` (SIGTERM/SIGINT -> final checkpoint, NaN/inf loss -> stop, ``--fail-at-step`` fault
  injection), ``create_checkpoint_saver`` (timm's ``CheckpointSaver`` writing atomic weights-only
  files with resume state) with ``restore_training_state``, ``trim_summary``/``plot_summary`` for
  timm's ``summary.csv``.
* Exact resume: ``EpochBatches`` / ``StepBatches`` give the batches of an epoch (or endlessly) in an
  order that a resumed run reproduces, and ``rng_state``/``gather_rng_states``/``set_rng_state``
  save and restore every random generator, so that a resumed run continues with the very losses of
  an uninterrupted one.
* Data: ``SkipUnreadable`` (a sample whose image cannot be decoded is replaced by the next readable
  one, with a counted warning), ``image_size``/``summarize`` for checking files up front, and
  ``create_image_dataset`` (timm's datasets, failing clearly on a missing or empty folder).
* Command line: ``ArgumentParser`` (argparse whose errors are one line and exit code 2) and
  ``run_cli`` (user errors one line with exit 2, never a traceback; exit codes of signal and NaN stops).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import itertools
import json
import logging
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.data import ImageDataset
from torch import nn

from recurzoo.checkpoint import atomic_write
from recurzoo.plots import plot_curves

__all__ = [
    "DistributedContext",
    "init_distributed",
    "cleanup_distributed",
    "wrap_ddp",
    "unwrap_model",
    "seed_everything",
    "setup_logging",
    "progress",
    "append_jsonl",
    "save_checkpoint",
    "load_checkpoint",
    "save_safetensors",
    "resolve_resume",
    "cosine_schedule",
    "infinite_batches",
    "epoch_batches",
    "parse_kwargs",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
    "rank_rng_state",
    "EpochBatches",
    "StepBatches",
    "DatasetWarning",
    "UnreadableImageError",
    "image_size",
    "summarize",
    "seed_albumentations",
    "SkipUnreadable",
    "ImageFolderDataset",
    "create_image_dataset",
    "registered_filter_fn",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "ArgumentParser",
    "parse_args_with_config",
    "save_args_yaml",
    "add_fault_arguments",
    "RunGuard",
    "BufferSnapshot",
    "create_checkpoint_saver",
    "restore_training_state",
    "trim_summary",
    "read_summary",
    "plot_summary",
    "run_cli",
    "load_fitting_state_dict",
    "EpochTraining",
    "run_distributed",
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
    np.random.seed(seed % 2**32)
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


def progress(
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


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint of tensors and plain Python values (dicts, lists, numbers, str)."""
    atomic_write(path, lambda temporary: torch.save(dict(state), temporary))


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    A file that would run code, or a truncated or corrupt one, raises a one-line ``ValueError``
    (:func:`recurzoo.checkpoint.read_checkpoint`); so does a file that is not a mapping.
    """
    from recurzoo.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, map_location=map_location)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a training checkpoint (holds a {type(checkpoint).__name__}, not a mapping)")
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


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
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
        seed_everything(self.seed + 1_000_003 * (self.epoch + 1), self.rank)
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


def epoch_batches(
    loader: Iterable[Any],
    epoch: int,
    seed: int,
    rank: int = 0,
    skip: int = 0,
    rng_state: Optional[Mapping[str, Any]] = None,
) -> EpochBatches:
    """The :class:`EpochBatches` of ``loader``'s epoch ``epoch`` (see there)."""
    return EpochBatches(loader, epoch, seed, rank, skip, rng_state)


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
            raise ValueError(
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


# --------------------------------------------------------------------------------------------------
# Data: images that cannot be read are skipped with a counted warning instead of ending the run.
# --------------------------------------------------------------------------------------------------


class DatasetWarning(UserWarning):
    """Files of a dataset that are skipped or adjusted."""


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (missing, truncated, not an image); the message names it."""


def image_size(path: str, verify: bool = False) -> Tuple[int, int]:
    """``(height, width)`` from an image file's header; ``verify`` also checks the file's integrity
    (PIL's ``verify``, which reads it whole). Raises :class:`UnreadableImageError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if verify:
                image.verify()
            width, height = image.size
    except Exception as error:  # PIL raises several types for broken files
        raise UnreadableImageError(f"{path} ({type(error).__name__})") from None
    return height, width


def seed_albumentations(transform: Any, seed: Optional[int]) -> Any:
    """Give an albumentations ``Compose`` one pair of generators seeded with ``seed``, shared by all its
    transforms; returns it. (``Compose(seed=...)`` and ``set_random_seed`` give every transform its own
    generator with the same seed, so their draws coincide: three flips of probability 0.5 then happen
    all together or not at all.)"""
    import numpy as np

    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def summarize(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class SkipUnreadable:
    """A dataset's policy for samples whose image cannot be decoded: use the next readable sample instead.

    A dataset calls it in ``__getitem__`` with its own loading function, which raises
    :class:`UnreadableImageError` for a bad file: ``return self.skip_unreadable(self._load, index, len(self))``.
    Each skip is counted (one counter shared with the DataLoader's worker processes) and warned about
    once per file and process (:class:`DatasetWarning`); :meth:`report` logs the skips since its last
    call (once per epoch). ``max_consecutive`` unreadable samples in a row raise a ``ValueError``.
    """

    def __init__(self, name: str, max_consecutive: int = 16) -> None:
        import multiprocessing

        self.name = name
        self.max_consecutive = max_consecutive
        self._count = multiprocessing.Value("q", 0)  # shared memory: inherited by the loader's workers
        self._reported = 0
        self._warned: set = set()

    def __call__(self, load: Callable[[int], Any], index: int, length: int) -> Any:
        failures = []
        for offset in range(min(length, self.max_consecutive)):
            try:
                return load((index + offset) % length)
            except UnreadableImageError as error:
                failures.append(str(error))
                self._record(str(error))
        raise ValueError(
            f"{self.name}: {len(failures)} samples in a row from index {index} cannot be read "
            f"(e.g. {failures[0]}); is the dataset intact?"
        )

    def _record(self, what: str) -> None:
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(
                f"{self.name}: skipped an unreadable image, the next sample is used instead: {what} "
                f"({count} skipped so far)",
                DatasetWarning,
                stacklevel=3,
            )

    @property
    def count(self) -> int:
        """Samples skipped so far, in all processes of this rank."""
        return int(self._count.value)

    def report(self, logger: logging.Logger, when: str, context: Optional[DistributedContext] = None) -> int:
        """Log how many samples were skipped since the last report (summed over ranks: call it on every
        rank, it is a collective under torchrun); returns that number."""
        new = self.count - self._reported
        self._reported += new
        if context is not None and context.distributed:
            total = torch.tensor(new, dtype=torch.int64, device=context.device)
            dist.all_reduce(total)
            new = int(total.item())
        if new:
            logger.warning(
                f"{when}: {new} unreadable images of the {self.name} skipped (each replaced by the next "
                f"readable sample); remove or repair them"
            )
        return new


class ImageFolderDataset(ImageDataset):
    """timm's ``ImageDataset`` (folder or tar reader) that replaces an undecodable image by the next
    readable sample with a counted warning (:class:`SkipUnreadable`), where timm skips it uncounted."""

    def __init__(self, *args: Any, unreadable_name: str = "training set", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_unreadable = SkipUnreadable(unreadable_name)

    def __getitem__(self, index: int) -> Any:
        return self.skip_unreadable(self._load, index, len(self))

    def _load(self, index: int) -> Any:
        from PIL import Image

        try:
            image, target, *features = self.reader[index]
            if self.load_bytes:
                image = image.read()
            else:
                image = Image.open(image)
                if self.input_img_mode:
                    image = image.convert(self.input_img_mode)  # decodes the pixels
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImageError(
                f"{self.filename(index, absolute=True)} ({type(error).__name__}: {_one_line(error)})"
            ) from None
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target) if self.additional_features is None else (image, target, *features)


def registered_filter_fn(model_name: str) -> Optional[Callable[..., Dict[str, torch.Tensor]]]:
    """The ``checkpoint_filter_fn`` of the module that registers ``model_name`` (official layouts ->
    this package's), or None when it has none."""
    from recurzoo.checkpoint import family_filter

    return family_filter(model_name)


def create_image_dataset(
    name: str, root: str, split: str, skip_unreadable: Optional[str] = None, flag: str = "--data-dir", **kwargs: Any
) -> Any:
    """timm's ``create_dataset(name, root=root, split=split, **kwargs)`` that fails clearly before training.

    A missing folder raises ``FileNotFoundError`` and a split without images ``ValueError``, both naming
    ``flag`` and the path. With ``skip_unreadable`` (a name such as ``'training set'``) a folder or tar
    dataset becomes an :class:`ImageFolderDataset`, whose undecodable images are skipped with a
    counted warning (``dataset.skip_unreadable``).
    """
    from timm.data import create_dataset

    if not name and not os.path.exists(root):
        raise FileNotFoundError(f"{flag} {root}: no such folder or file")
    try:
        dataset = create_dataset(name, root=root, split=split, **kwargs)
    except RuntimeError as error:
        if "Found 0 images" not in str(error):
            raise
        raise ValueError(f"{flag} {root}: no images for split {split!r} ({_one_line(error)})") from None
    if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) == 0:
        raise ValueError(f"{flag} {root}: split {split!r} holds no images")
    if skip_unreadable and type(dataset) is ImageDataset:
        dataset = ImageFolderDataset(
            root,
            reader=dataset.reader,
            load_bytes=dataset.load_bytes,
            input_img_mode=dataset.input_img_mode,
            transform=dataset.transform,
            target_transform=dataset.target_transform,
            additional_features=dataset.additional_features,
            unreadable_name=skip_unreadable,
        )
    return dataset


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a bad value, a missing option) are one line on
    stderr, ``prog: error: message``, with exit code 2 -- not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, config_flag: str = "--config"
) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from the YAML file named by ``--config`` (timm's scheme).

    The file maps option names (``lr``, ``batch_size`` or ``batch-size``) to values; flags given on the
    command line win over the file. Unknown names are an error; options the file sets are no longer
    required on the command line.
    """
    import yaml

    if not any(config_flag in action.option_strings for action in parser._actions):
        parser.add_argument(
            config_flag, default=None, metavar="YAML", help="YAML file of option defaults (command-line flags win)"
        )
    pre_parser = ArgumentParser(prog=parser.prog, add_help=False)
    pre_parser.add_argument(config_flag, default=None)
    known, _ = pre_parser.parse_known_args(argv)
    path = getattr(known, config_flag.lstrip("-").replace("-", "_"))
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"{config_flag} {path}: {error}")
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

    atomic_write(path, write)


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """The documented fault-injection options (``--fail-at-step``, ``--fail-mode``) of :class:`RunGuard`."""
    group = parser.add_argument_group("fault injection (test recovery: resume, signals, the NaN guard)")
    group.add_argument(
        "--fail-at-step",
        type=int,
        default=None,
        metavar="N",
        help="fail when the run reaches optimizer step N (counted over the whole run)",
    )
    group.add_argument(
        "--fail-mode",
        choices=FAULT_MODES,
        default="sigkill",
        help="how: send this process SIGTERM/SIGINT (final checkpoint, clean stop), SIGKILL "
        "(a hard crash: no final checkpoint), or make the loss NaN (the guard stops the run)",
    )


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

    def stop_on_signal(
        self,
        loss: torch.Tensor,
        step: int,
        save_pending: Callable[[], None],
        checkpoint: str,
        where: str = "",
        bar: Any = None,
    ) -> None:
        """:meth:`check`; after a stop signal, write the final checkpoint and raise :class:`TrainingInterrupted`.

        ``save_pending`` saves the state from before the step in flight (trained again on resume); it
        runs on every rank, since gathering the RNG states is a collective.
        """
        if self.check(loss, step, where):
            save_pending()
            if bar is not None:
                bar.close()
            raise TrainingInterrupted(self.received, checkpoint if self.context.is_main else None)


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


def _checkpoint_saver_class():
    from timm.utils import CheckpointSaver
    from timm.utils.model import get_state_dict

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

    return TrainCheckpointSaver


def create_checkpoint_saver(
    model: nn.Module, optimizer: torch.optim.Optimizer, output_dir: str, arch: str, **kwargs: Any
):
    """A ``TrainCheckpointSaver`` (timm's ``CheckpointSaver`` writing atomic, weights-only checkpoints)."""
    return _checkpoint_saver_class()(model, optimizer, output_dir, arch, **kwargs)


def load_fitting_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict)``, or one ``ValueError`` naming ``source`` and listing the
    missing/unexpected keys and shape mismatches (a checkpoint of another model or width)."""
    from recurzoo.checkpoint import compare_state_dict

    mismatch = compare_state_dict(module, state_dict)
    if mismatch.missing or mismatch.unexpected or mismatch.shapes:
        raise ValueError(f"{source}: {mismatch.describe(type(module).__name__)}")
    module.load_state_dict(state_dict)


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
    from timm.models import clean_state_dict
    from timm.utils import unwrap_model as unwrap_any  # also unwraps EMA wrappers

    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{source}: not a training checkpoint of this script (no 'state_dict' entry)")
    load_fitting_state_dict(unwrap_any(model), clean_state_dict(checkpoint["state_dict"]), source)
    if optimizer is not None and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if model_ema is not None and "state_dict_ema" in checkpoint:
        load_fitting_state_dict(unwrap_any(model_ema), clean_state_dict(checkpoint["state_dict_ema"]), source)
    if amp_scaler is not None and amp_scaler.state_dict_key in checkpoint:
        amp_scaler.load_state_dict(checkpoint[amp_scaler.state_dict_key])
    if saver is not None and checkpoint.get("saver") and hasattr(saver, "load_state_dict"):
        saver.load_state_dict(checkpoint["saver"])


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


def run_distributed(run: Callable[[argparse.Namespace, DistributedContext], Any], args: argparse.Namespace) -> Any:
    """``run(args, context)`` in the process group ``torchrun`` describes (on ``args.device``), left afterwards."""
    context = init_distributed(args.device)
    try:
        return run(args, context)
    finally:
        cleanup_distributed()


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


EXIT_USAGE = 2
# What a user's input causes (a bad option value, a missing or unreadable file or folder, a checkpoint
# that does not fit or would run code): reported in one line, not as a traceback.
USER_ERRORS = (ValueError, OSError)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a training script's ``main`` as a command.

    Exit codes: 2 with one line ``<module>: error: <message>`` for a user error (``ValueError`` or
    ``OSError``: bad values, missing data, unreadable or unfit checkpoints; argparse's errors exit 2
    in one line too, see :class:`ArgumentParser`); 128+signal after a signal stop (final checkpoint
    written); ``EXIT_NON_FINITE`` (3) when the loss became NaN/inf. Set ``RECURZOO_TRACEBACK=1`` to see
    the traceback of a user error.
    """
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    spec = getattr(module, "__spec__", None)
    prog = spec.name if spec is not None else getattr(main, "__module__", "recurzoo")
    try:
        main(argv)
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except NonFiniteLossError as error:
        print(f"error: {error}; the last good checkpoint is kept", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
    except USER_ERRORS as error:
        if os.environ.get("RECURZOO_TRACEBACK"):
            raise
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
