"""Training data that is partly broken: images that cannot be read are skipped with a counted warning
instead of ending the run, and a dataset without usable images fails before anything is trained.

``SkipUnreadable`` is the policy a dataset applies in ``__getitem__``; ``ImageFolderDataset`` is timm's
``ImageDataset`` under that policy and ``create_image_dataset`` timm's ``create_dataset`` that fails
clearly on a missing or empty folder. ``image_size``/``summarize`` check files up front and name them.
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm.data import ImageDataset

from recurzoo.train.arguments import UsageError, one_line, user_option
from recurzoo.train.distributed import DistributedContext

__all__ = [
    "DatasetWarning",
    "UnreadableImageError",
    "image_size",
    "summarize",
    "readable_groups",
    "training_loader",
    "seed_albumentations",
    "SkipUnreadable",
    "ImageFolderDataset",
    "collate_readable",
    "NO_SPLIT",
    "split_folder",
    "create_image_dataset",
]


class DatasetWarning(UserWarning):
    """Files of a dataset that are skipped or adjusted."""


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (missing, truncated, not an image); the message names it."""


def image_size(path: str, verify: bool = False, max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """``(height, width)`` from an image file's header, checked by :func:`recurzoo.images.image_size`
    (decompression-bomb limit ``max_pixels``); ``verify`` also checks the file's integrity (PIL's
    ``verify``, which reads it without decoding). Raises :class:`UnreadableImageError` naming the file."""
    from PIL import Image

    from recurzoo.images import ImageError
    from recurzoo.images import image_size as header_size

    try:
        size = header_size(path, max_pixels)
        if verify:
            with Image.open(path) as image:
                image.verify()
    except (ImageError, OSError) as error:
        reason = one_line(error)
        raise UnreadableImageError(reason if str(path) in reason else f"{path} ({reason})") from None
    except Exception as error:  # PIL's verify raises several types for broken files
        raise UnreadableImageError(f"{path} ({type(error).__name__})") from None
    return size


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


def readable_groups(
    dataset: str, groups: Sequence[Sequence[Any]], what: str, verify: bool = False, stacklevel: int = 2
) -> List[Tuple[Sequence[Any], List[Tuple[int, int]]]]:
    """The groups of files (an image and its mask, an HR image and its LR one; None stands for no file)
    whose every file reads as an image, each with the ``(height, width)`` of its files (each file once);
    the others are dropped with one :class:`DatasetWarning` that counts them as ``what`` and names them.
    ``verify``: see :func:`image_size`; ``stacklevel`` as ``warnings.warn``'s, counted from the caller."""
    kept, unreadable = [], []
    for group in groups:
        try:
            sizes = [image_size(str(path), verify=verify) for path in dict.fromkeys(group) if path is not None]
        except UnreadableImageError as error:
            unreadable.append(str(error))
            continue
        kept.append((group, sizes))
    if unreadable:
        warnings.warn(
            f"dataset {dataset!r}: skipped {len(unreadable)} of {len(groups)} {what} with unreadable files: "
            f"{summarize(unreadable)}",
            DatasetWarning,
            stacklevel=stacklevel + 1,
        )
    return kept


def training_loader(
    dataset: Any, args: Any, context: DistributedContext, drop_last: bool = True, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """The training loader of a step-based script: ``--batch-size`` images per process from ``--workers``
    processes, shuffled (under torchrun by a ``DistributedSampler`` seeded with ``--seed``), the incomplete
    last batch dropped unless ``drop_last`` is False. Its workers are not persistent: every pass over the
    data seeds them afresh, as a resumed run does. ``kwargs``: more ``DataLoader`` arguments."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, seed=args.seed, drop_last=True) if context.distributed else None
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=args.workers,
        drop_last=drop_last,
        pin_memory=context.device.type == "cuda",
        **kwargs,
    )


class SkipUnreadable:
    """A dataset's policy for samples whose image cannot be decoded: use the next readable sample instead.

    A dataset calls it in ``__getitem__`` with its own loading function, which raises
    :class:`UnreadableImageError` for a bad file: ``return self.skip_unreadable(self._load, index, len(self))``.
    Each skip is counted (one counter shared with the DataLoader's worker processes) and warned about
    once per file and process (:class:`DatasetWarning`); :meth:`report` logs the skips since its last
    call (once per epoch). ``max_consecutive`` unreadable samples in a row raise a ``ValueError``.
    """

    def __init__(self, name: str, max_consecutive: int = 16, leaves_out: bool = False) -> None:
        import multiprocessing

        self.name = name
        self.leaves_out = leaves_out  # an evaluation set's policy (drop), as the report says
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
                self.record(str(error))
        raise UsageError(
            f"{self.name}: {len(failures)} samples in a row from index {index} cannot be read "
            f"(e.g. {failures[0]}); is the dataset intact?"
        )

    def drop(self, load: Callable[[int], Any], index: int) -> Any:
        """``load(index)``, or None (counted and warned about) when its image cannot be read: for
        evaluation sets, whose loader leaves such samples out (:func:`collate_readable`) instead of
        scoring another sample twice."""
        try:
            return load(index)
        except UnreadableImageError as error:
            self.record(str(error), replaced=False)
            return None

    def record(self, what: str, replaced: bool = True) -> None:
        """Count one unreadable sample (``what`` names it) and warn about it once per file and process."""
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        if what not in self._warned:
            self._warned.add(what)
            instead = "the next sample is used instead" if replaced else "it is left out"
            warnings.warn(
                f"{self.name}: skipped an unreadable image, {instead}: {what} ({count} skipped so far)",
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
            how = "left out" if self.leaves_out else "each replaced by the next readable sample"
            logger.warning(f"{when}: {new} unreadable images of the {self.name} skipped ({how}); remove or repair them")
        return new


class ImageFolderDataset(ImageDataset):
    """timm's ``ImageDataset`` (folder or tar reader) whose images are read by
    :func:`recurzoo.images.open_image` (EXIF orientation, 16-bit samples scaled, every mode converted
    explicitly, the decompression-bomb limit ``max_pixels``), and whose unreadable images are
    counted and named in a warning (:class:`SkipUnreadable`) where timm only logs an index: in
    training (``leave_out=False``) replaced by the next readable sample, in evaluation
    (``leave_out=True``) returned as None, for :func:`collate_readable` to leave out."""

    def __init__(
        self,
        *args: Any,
        unreadable_name: str = "training set",
        leave_out: bool = False,
        max_pixels: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.leave_out = leave_out
        self.max_pixels = max_pixels
        self.skip_unreadable = SkipUnreadable(unreadable_name, leaves_out=leave_out)

    def __getitem__(self, index: int) -> Any:
        if self.leave_out:
            return self.skip_unreadable.drop(self._load, index)
        return self.skip_unreadable(self._load, index, len(self))

    def _read(self, handle: Any, path: str) -> Any:
        from recurzoo.images import ImageError, open_image

        try:
            if self.load_bytes:
                return handle.read()
            image = open_image(path if os.path.isfile(path) else handle, self.max_pixels)
        except (ImageError, OSError) as error:
            reason = one_line(error) if os.path.isfile(path) else type(error).__name__
            raise UnreadableImageError(reason if path in reason else f"{path} ({reason})") from None
        finally:
            if hasattr(handle, "close"):
                handle.close()
        return image.convert(self.input_img_mode) if self.input_img_mode not in (None, "", "RGB") else image

    def _load(self, index: int) -> Any:
        handle, target, *features = self.reader[index]
        image = self._read(handle, self.filename(index, absolute=True))
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target) if self.additional_features is None else (image, target, *features)


def collate_readable(batch: Sequence[Any]) -> Any:
    """torch's ``default_collate`` of the samples that are not None (unreadable images an evaluation set
    left out); None when none is left."""
    from torch.utils.data import default_collate

    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


NO_SPLIT = ("none", "")
# The sub-folder names timm's create_dataset also tries for a split of these names (its synonyms).
_SPLIT_SYNONYMS = (("train", "training"), ("validation", "val", "evaluation", "eval"))


def split_folder(root: str, split: str, flag: str = "--data-dir", split_flag: str = "--split") -> str:
    """The folder of ``split`` under the dataset folder ``root``, never ``root`` in its place.

    ``root/split`` when it exists, else the first existing synonym timm accepts for that split
    (``val``/``eval`` for ``validation``, ``training`` for ``train``); ``split='.'`` is ``root`` itself
    (class folders directly under it). timm's own search falls back to the whole of ``root``, so that
    training would "evaluate" on its training images; here that is an error.

    Raises:
        FileNotFoundError: naming the folders looked for, ``split_flag`` and how to choose another split.
    """
    name = split.split("[")[0]
    tried = next((group for group in _SPLIT_SYNONYMS if name in group), (name,))
    tried = (name,) + tuple(other for other in tried if other != name)
    for candidate in tried:
        folder = os.path.join(root, candidate)
        if os.path.isdir(folder):
            return os.path.normpath(folder)
    looked = "/, ".join(tried) + "/"
    hint = f"give {split_flag} NAME (a sub-folder), or {split_flag} . for the class folders in {flag} itself"
    if name in _SPLIT_SYNONYMS[1]:
        hint += f", or {split_flag} none for no evaluation"
    raise FileNotFoundError(f"{split_flag} {split}: {flag} {root} has no {looked} folder for this split; {hint}")


def create_image_dataset(
    name: str,
    root: str,
    split: str,
    skip_unreadable: Optional[str] = None,
    flag: str = "--data-dir",
    split_flag: str = "--split",
    evaluation: bool = False,
    **kwargs: Any,
) -> Any:
    """timm's ``create_dataset(name, root=root, split=split, **kwargs)`` that fails clearly before training.

    A folder dataset reads the split's own folder (:func:`split_folder`: a missing split is a
    ``FileNotFoundError`` naming ``split_flag``, never the whole of ``root`` in its place). A tar
    file holds one split only: it takes ``split='.'``. A missing folder raises ``FileNotFoundError``
    and a split without images ``ValueError``, both naming ``flag`` and the path. With
    ``skip_unreadable`` (a name such as ``'training set'``) a folder or tar dataset becomes an
    :class:`ImageFolderDataset` reading through :mod:`recurzoo.images`, whose undecodable images are
    skipped with a counted warning (``dataset.skip_unreadable``): replaced by the next readable one,
    or in an ``evaluation`` split left out by the loader's :func:`collate_readable`. timm's
    ``is_training`` is ``not evaluation`` unless given.
    """
    from timm.data import create_dataset

    folder_like = not name or name.split("/")[0] in ("folder", "imagefolder", "tar")
    given = root
    if folder_like and not os.path.exists(root):
        raise FileNotFoundError(f"{flag} {root}: no such folder or file")
    if folder_like and os.path.isdir(root):
        root = split_folder(root, split, flag, split_flag)
        kwargs["search_split"] = False
    elif folder_like and not tarfile.is_tarfile(root):
        raise UsageError(f"{flag} {root}: expected a dataset folder or a tar of one, found a file that is not a tar")
    elif folder_like and split != ".":
        raise UsageError(
            f"{split_flag} {split}: {flag} {root} is a file (a tar), read whole as one split; give "
            f"{split_flag} . for it, or a folder with one sub-folder per split"
        )
    kwargs.setdefault("is_training", not evaluation)
    try:
        with user_option(f"--dataset {name!r}", ValueError, AssertionError, TypeError):
            dataset = create_dataset(name, root=root, split=split, **kwargs)
    except RuntimeError as error:
        if "Found 0 images" not in str(error):
            raise
        raise UsageError(f"{flag} {given}: no images for split {split!r} ({one_line(error)})") from None
    if not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) == 0:
        raise UsageError(f"{flag} {given}: split {split!r} holds no images")
    if skip_unreadable and type(dataset) is ImageDataset:  # timm's reader and settings, read our way
        settings = ("reader", "load_bytes", "input_img_mode", "transform", "target_transform", "additional_features")
        dataset = ImageFolderDataset(
            root,
            unreadable_name=skip_unreadable,
            leave_out=evaluation,
            **{key: getattr(dataset, key) for key in settings},
        )
    return dataset
