"""The zoo's applications on image files: super-resolution (``recurzoo sr``), model info and the demo.

Models, heads and training live below this module; it reads and writes the user's files through
:mod:`recurzoo.images` and loads checkpoints through :mod:`recurzoo.checkpoint`.

What the applications promise about files: an input is never written over (an output path that is
one of the inputs is refused, even with ``overwrite``); an existing output is replaced only with
``overwrite``; every file is written under a temporary name and renamed into place, so an
interrupted run leaves no half-written file and no empty folder. Everything is checked before
the model is built, and a user's mistake raises :class:`UsageError` (or the documented errors of
:mod:`recurzoo.images`, :mod:`recurzoo.checkpoint` and :mod:`recurzoo.registry`) with one line that
names the option (by its command-line name) or the file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from recurzoo.devices import resolve_device
from recurzoo.errors import UsageError
from recurzoo.heads.super_resolution import SuperResolutionModel, super_resolve_image
from recurzoo.images import ImageError, collect_images, image_size, read_image, sample_photo, write_png
from recurzoo.registry import create_model, list_models, model_task, split_model_name

__all__ = [
    "UsageError",
    "RESERVED_MODEL_KWARGS",
    "resolve_device",
    "build_model",
    "check_output_folder",
    "check_outputs",
    "model_info",
    "load_sr_model",
    "SuperResolved",
    "super_resolve_files",
    "super_resolve_demo",
    "run_demo",
]

_logger = logging.getLogger(__name__)

# Model arguments that a command sets itself (its own flags), refused in --model-kwargs.
RESERVED_MODEL_KWARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "device",
    "dtype",
)
# What a model's constructor raises for arguments it cannot take (timm's builders assert some).
_MODEL_ARGUMENT_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError, IndexError, KeyError)
_SHOWN = 3  # paths named in a message about several
MAX_COUNTED_SIZE = 8192  # largest input side (and channel count) that `recurzoo info` runs a model at


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


# --------------------------------------------------------------------------------------------------
# Checks shared by the applications
# --------------------------------------------------------------------------------------------------


def build_model(model_name: str, model_kwargs: Optional[Mapping[str, Any]] = None, **arguments: Any) -> nn.Module:
    """``create_model(model_name, **arguments, **model_kwargs)``, where ``model_kwargs`` are the user's
    (``--model-kwargs``): arguments the model cannot take are the user's mistake, a :class:`UsageError`.

    Raises:
        UsageError: for a reserved key (:data:`RESERVED_MODEL_KWARGS`) or arguments the model rejects.
        UnknownModelError, CheckpointError: as :func:`recurzoo.create_model`.
    """
    model_kwargs = dict(model_kwargs or {})
    reserved = sorted(set(model_kwargs) & set(RESERVED_MODEL_KWARGS))
    if reserved:
        raise UsageError(f"--model-kwargs: {', '.join(reserved)} is set by the command's own flags, not here")
    if not model_kwargs:
        return create_model(model_name, **arguments)
    from recurzoo.checkpoint import CheckpointError
    from recurzoo.registry import UnknownModelError

    try:
        return create_model(model_name, **arguments, **model_kwargs)
    except (CheckpointError, UnknownModelError):
        raise
    except _MODEL_ARGUMENT_ERRORS as error:
        given = " ".join(f"{key}={value!r}" for key, value in model_kwargs.items())
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            f"--model-kwargs {given}: {model_name} cannot be built with them ({type(error).__name__}: {reason})"
        ) from error


def check_output_folder(folder: Union[str, Path], option: str = "--out") -> Path:
    """``folder`` when it is, or can be created as, a folder that takes files; nothing is left behind
    (a probe file is written and removed, as are the folders created for it).

    Raises:
        UsageError: when it is a file, or it cannot be created or written (the system's reason).
    """
    from recurzoo.checkpoint import probe_writable

    if not str(folder).strip():
        raise UsageError(f"{option}: expected a folder, received {str(folder)!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option}: {folder} is a file, expected a folder")
    try:
        probe_writable(folder)
    except OSError as error:
        where = f" ({error.filename})" if error.filename and Path(error.filename) != folder else ""
        raise UsageError(f"{option}: cannot write into {folder}{where}: {error.strerror or error}") from None
    return folder


def _file_identity(path: Path) -> Optional[tuple]:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def check_outputs(
    outputs: Iterable[Union[str, Path]],
    inputs: Iterable[Union[str, Path]] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> None:
    """Refuse outputs named twice (several inputs would write one file), outputs that are one of the
    ``inputs`` (the same file, by any path or link), that are folders, or, unless ``overwrite``, that
    exist already.

    Raises:
        UsageError: one line naming the files and the way out (another folder, or ``--overwrite``).
    """
    outputs = [Path(output) for output in outputs]
    clashes = sorted(str(output) for output, count in Counter(outputs).items() if count > 1)
    if clashes:
        raise UsageError(f"{option}: several inputs would be written to the same file ({_listing(clashes)})")
    inputs_by_identity = {}
    for path in inputs:
        identity = _file_identity(Path(path))
        if identity is not None:
            inputs_by_identity[identity] = path
    existing = []
    for output in outputs:
        if output.is_dir():
            raise UsageError(f"{option}: the output {output} is a folder, expected a file name")
        identity = _file_identity(output)
        if identity is None:
            continue
        if identity in inputs_by_identity:
            raise UsageError(
                f"{option}: writing {output} would overwrite the input {inputs_by_identity[identity]}; "
                f"choose another {option} folder"
            )
        existing.append(output)
    if existing and not overwrite:
        raise UsageError(
            f"{option}: {len(existing)} output file(s) exist already ({_listing(existing)}); pass --overwrite "
            f"to replace them, or choose another {option} folder"
        )


def out_of_memory(error: BaseException) -> bool:
    """True for an allocation that failed (CUDA's OutOfMemoryError, or the CPU allocator's message)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


# --------------------------------------------------------------------------------------------------
# recurzoo info
# --------------------------------------------------------------------------------------------------


def model_info(model_name: str, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Params, fvcore GFLOPs, feature strides and channels, and the default cfg of a model at
    ``input_size`` (``(C, H, W)``, default the cfg's).

    Raises:
        UsageError: for an input size the model cannot take (its own message), or one too large for
            the memory.
    """
    from recurzoo.export.flops import model_report

    figures = _card_figures(model_name, input_size)
    if figures is not None:
        return figures
    if input_size is not None and max(input_size) > MAX_COUNTED_SIZE:
        raise UsageError(
            f"--input-size: FLOPs are counted in one forward pass, so each entry is at most {MAX_COUNTED_SIZE}, "
            f"received {' '.join(map(str, input_size))}"
        )
    model = create_model(model_name)
    size = tuple(input_size or model.pretrained_cfg["input_size"])
    try:
        report = model_report(model, size)
    except ValueError as error:  # the model's input checks
        raise UsageError(f"--input-size: {error}") from None
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        raise UsageError(f"--input-size {' '.join(map(str, size))}: not enough memory to count FLOPs") from None
    cfg = {key: value for key, value in model.pretrained_cfg.items() if value is not None}
    return dict(report, model=model_name, input_size=size, pretrained_cfg=cfg)


def _card_figures(model_name: str, input_size: Optional[Sequence[int]]) -> Optional[Dict[str, Any]]:
    """:func:`model_info` from the committed card figures when asked for the card's input size.

    The model is built on the ``meta`` device for its feature channels and cfg, so nothing is
    allocated or traced; None when the figures do not apply (another size, a model not in the cards).
    """
    name, _ = split_model_name(model_name)
    row = next((row for row in zoo_figures() if row["model"] == name), None)
    if row is None:
        return None
    size = tuple(int(side) for side in row["input_size"].split("x"))
    if input_size is not None and tuple(input_size) != size:
        return None
    with torch.device("meta"):
        model = create_model(model_name)
    info = getattr(model, "feature_info", None) or []
    cfg = {key: value for key, value in model.pretrained_cfg.items() if value is not None}
    return dict(
        model=model_name,
        input_size=size,
        params=float(row["params_m"]) * 1e6,
        unrolled_params=float(row["unrolled_params_m"]) * 1e6,
        gflops=float(row["gflops"]),
        reductions=[level["reduction"] for level in info],
        channels=[level["num_chs"] for level in info],
        pretrained_cfg=cfg,
    )


# --------------------------------------------------------------------------------------------------
# recurzoo sr
# --------------------------------------------------------------------------------------------------


def load_sr_model(
    model: str,
    checkpoint: Optional[str] = None,
    device: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> SuperResolutionModel:
    """The super-resolution model ``model`` in eval mode on ``device``, with the weights of ``checkpoint``.

    ``checkpoint`` may be an official BasicSR file (``params``/``params_ema``) or one of ours; it is
    read and converted by :mod:`recurzoo.checkpoint` (one-line errors). ``model_kwargs`` are the
    user's extra model arguments (:func:`build_model`).
    """
    if model_task(model) != "sr":
        known = ", ".join(list_models(task="sr"))
        raise UsageError(f"--model: {model} is not a super-resolution model (the zoo's: {known})")
    if checkpoint is not None and not str(checkpoint).strip():
        raise UsageError(f"--checkpoint: expected a file, received {str(checkpoint)!r}")
    target = resolve_device(device)
    net = build_model(model, model_kwargs, checkpoint_path=checkpoint)
    if net.in_chans != 3:
        raise UsageError(
            f"--model-kwargs: the images are read as RGB (3 channels), {model} was built for {net.in_chans}"
        )
    return net.to(target).eval()


class SuperResolved(NamedTuple):
    """What :func:`super_resolve_files` did: the files written, and the inputs skipped (with why)."""

    written: List[Path]
    skipped: List[str]


def _check_tiling(tile: Optional[int], tile_overlap: int) -> None:
    if tile_overlap < 0:
        raise UsageError(f"--tile-overlap: expected a non-negative number of pixels, received {tile_overlap}")
    if tile is not None and (tile < 1 or tile_overlap >= tile):
        raise UsageError(
            f"--tile: expected a positive size larger than --tile-overlap ({tile_overlap}), received {tile}"
        )


def _readable_inputs(
    inputs: Sequence[Union[str, Path]], max_pixels: Optional[int], warn: Callable[[str], None]
) -> tuple:
    """The image files of ``inputs`` whose headers read, and the messages of those skipped.

    A file named by the user that cannot be read is an error; one found in a folder is skipped.
    """
    named = {Path(entry) for entry in inputs if not Path(entry).is_dir()}
    files, skipped = [], []
    for path in dict.fromkeys(collect_images(inputs)):  # a file named twice is processed once
        try:
            image_size(path, max_pixels)
        except ImageError as error:
            if path in named:
                raise
            skipped.append(str(error))
            warn(f"skipped {error}")
            continue
        files.append(path)
    return files, skipped


def super_resolve_files(
    inputs: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    model: str = "rgt_small_x4",
    checkpoint: Optional[str] = None,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    device: Optional[str] = None,
    progress: bool = True,
    model_kwargs: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    max_pixels: Optional[int] = None,
    warn: Callable[[str], None] = _logger.warning,
) -> SuperResolved:
    """Super-resolve PNG/JPEG files (or folders of them) into ``out_dir/<name>.png``.

    Everything is checked before the model is built: the inputs exist and their headers read (an
    image in a folder that does not is skipped, with a ``warn``), the outputs are not inputs and do
    not exist unless ``overwrite``, the tiling and the device make sense. Without ``checkpoint`` the
    model has random weights, which ``warn`` says before any image is processed. An image that
    fails to decode while processing is skipped too.

    Raises:
        UsageError, ImageError, FileNotFoundError, CheckpointError, UnknownModelError: the user's
            mistakes, in one line.
    """
    from tqdm import tqdm

    _check_tiling(tile, tile_overlap)
    files, skipped = _readable_inputs(inputs, max_pixels, warn)
    targets = {path: Path(out_dir) / f"{path.stem}.png" for path in files}
    check_output_folder(out_dir)
    check_outputs(targets.values(), [*files, *([checkpoint] if checkpoint else [])], overwrite)
    net = load_sr_model(model, checkpoint, device, model_kwargs)
    if checkpoint is None:
        warn(f"no --checkpoint given: {model} has random weights, its output is noise")
    written = []
    for path in tqdm(files, desc=f"{model} x{net.upscale}", unit="image", disable=not progress):
        try:
            image = read_image(path, max_pixels)
        except ImageError as error:
            skipped.append(str(error))
            warn(f"skipped {error}")
            continue
        try:
            output = super_resolve_image(net, image, tile, tile_overlap, progress=progress)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            height, width = image.shape[:2]
            raise UsageError(
                f"not enough memory to super-resolve {path} ({width} x {height}) at once; pass --tile 256 "
                "(or smaller) to process it in tiles"
            ) from None
        written.append(write_png(targets[path], output, overwrite=overwrite))
    return SuperResolved(written, skipped)


def super_resolve_demo(
    out_dir: Optional[Union[str, Path]] = None,
    model: str = "rgt_small_x4",
    checkpoint: Optional[str] = None,
    side: int = 64,
    tile: Optional[int] = None,
    device: Optional[str] = None,
    overwrite: bool = False,
    **model_kwargs: Any,
) -> Dict[str, Any]:
    """Super-resolve a bundled photograph (scikit-image's Chelsea the cat, public domain).

    The photo is centre-cropped, reduced to ``side x side`` with bicubic interpolation and
    super-resolved by ``model`` (random weights unless ``checkpoint``: then the output is noise,
    which the returned dict says). Returns shapes, timing and, when ``out_dir`` is given, the paths
    of the low-resolution input, the bicubic upscaling and the model's output (PNGs; existing ones
    are replaced only with ``overwrite``). Nothing is downloaded.
    """
    from PIL import Image

    paths = demo_paths(out_dir, model) if out_dir is not None else {}
    if paths:
        check_output_folder(out_dir)
        check_outputs(paths.values(), [checkpoint] if checkpoint else [], overwrite)
    net = load_sr_model(model, checkpoint, device, model_kwargs)
    low_res = sample_photo((side, side), square=True)
    start = time.perf_counter()
    output = super_resolve_image(net, low_res, tile=tile)
    seconds = time.perf_counter() - start
    bicubic = np.asarray(Image.fromarray(low_res).resize(output.shape[1::-1], Image.BICUBIC))
    result: Dict[str, Any] = dict(
        model=model,
        scale=net.upscale,
        input_shape=low_res.shape,
        output_shape=output.shape,
        seconds=seconds,
        pretrained=checkpoint is not None,
    )
    if paths:
        for key, image in (("low_res", low_res), ("bicubic", bicubic), ("output", output)):
            write_png(paths[key], image, overwrite=overwrite)
        result["paths"] = {key: str(path) for key, path in paths.items()}
    return result


def demo_paths(out_dir: Union[str, Path], model: str) -> Dict[str, Path]:
    """The PNGs :func:`super_resolve_demo` writes: the low-resolution input, its bicubic upscaling, the output."""
    out = Path(out_dir)
    return dict(
        low_res=out / "chelsea_lr.png",
        bicubic=out / f"chelsea_{model}_bicubic.png",
        output=out / f"chelsea_{model}.png",
    )


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------

ZOO_FIGURES = Path(__file__).resolve().parent / "assets" / "zoo.csv"


def zoo_figures(path: Path = ZOO_FIGURES) -> List[Dict[str, str]]:
    """The committed parameter and FLOP counts of every zoo model (written by ``make cards``, checked by the tests)."""
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


DEMO_SR_MODEL = "rgt_small_x4"
# Each family's forward pass in the demo is sized to about this many GFLOPs, so it stays quick on 2 cores.
DEMO_GFLOPS = 8.0


def run_demo(
    pattern: str = "*",
    out_dir: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """The zoo's table, one forward pass per family, a super-resolution and an ONNX export.

    The table is the committed, test-checked figures of the model cards (nothing is counted). Each
    family's smallest model runs once on the sample photo, with random weights; the super-resolved
    pictures go to ``out_dir`` (a temporary folder when None, removed afterwards; existing pictures
    are replaced only with ``overwrite``, which is checked first). Nothing is downloaded.
    """
    import tempfile

    figures = [row for row in zoo_figures() if row["model"] in set(list_models(pattern))]
    if not figures:
        raise UsageError(f"PATTERN: no model of recurzoo matches {pattern!r}")
    if out_dir is not None:
        check_output_folder(out_dir)
        check_outputs(demo_paths(out_dir, DEMO_SR_MODEL).values(), overwrite=overwrite)
    echo("Params and fvcore GFLOPs as in the model cards (classifiers with 1000 classes):")
    width = max(len(row["model"]) for row in figures)
    echo(f"{'model':<{width}} {'input':>10} {'params (M)':>11} {'GFLOPs':>8}  feature strides")
    for row in figures:
        counts = f"{row['input_size']:>10} {row['params_m']:>11} {row['gflops']:>8}"
        echo(f"{row['model']:<{width}} {counts}  {row['strides']}")

    echo(
        "\nOne forward pass of each family's smallest model on the sample photo, at most about "
        f"{DEMO_GFLOPS:g} GFLOPs (random weights, nothing downloaded):"
    )
    results: Dict[str, Any] = {"families": {}}
    for family in dict.fromkeys(row["family"] for row in figures):
        members = [row for row in figures if row["family"] == family]
        smallest = min(members, key=lambda row: float(row["gflops"]))
        results["families"][family] = _demo_forward(smallest, echo)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(out_dir) if out_dir is not None else Path(temporary)
        results["sr"] = super_resolve_demo(folder, model=DEMO_SR_MODEL, side=48, overwrite=overwrite)
        where = f"PNGs in {folder}/" if out_dir is not None else "pass --out DIR to keep the PNGs"
        echo(
            f"\nSuper-resolution of the sample photo with {DEMO_SR_MODEL} (random weights; pass a checkpoint to "
            f"`recurzoo sr` for real output): {tuple(results['sr']['input_shape'])} -> "
            f"{tuple(results['sr']['output_shape'])} in {results['sr']['seconds']:.1f} s, {where}"
        )
        results["export"] = _demo_export("sret_tiny", Path(temporary) / "onnx", echo)
    return results


def _demo_export(name: str, folder: Path, echo) -> Any:
    """Export one model to ONNX (checked in onnxruntime) in ``folder`` and print its parity line."""
    from recurzoo.export.onnx import export_model

    echo(f"\nONNX export of {name} (recurzoo export {name} --out DIR keeps the files and writes the FLOP report):")
    result = export_model(name, out_dir=folder, dynamic="batch", report=False)
    echo("  " + result.parity_line())
    return result


def demo_input_size(row: Mapping[str, str]) -> Tuple[int, int]:
    """The card's input size scaled down so that a forward pass costs about ``DEMO_GFLOPS``.

    FLOPs grow with the number of pixels, so both sides shrink by the square root of the ratio; they
    stay multiples of the model's largest feature stride (and at least twice it).
    """
    _, height, width = (int(side) for side in row["input_size"].split("x"))
    stride = max(int(s) for s in row["strides"].split("/"))
    scale = min(1.0, (DEMO_GFLOPS / float(row["gflops"])) ** 0.5)
    return tuple(max(2 * stride, int(side * scale) // stride * stride) for side in (height, width))


def _demo_forward(row: Dict[str, str], echo) -> Dict[str, Any]:
    from recurzoo.export.models import photo_batch

    name = row["model"]
    model = create_model(name).eval()
    height, width = demo_input_size(row)
    image = photo_batch(model, 1, height, width)
    start = time.perf_counter()
    with torch.no_grad():
        output = model(image)
    elapsed = (time.perf_counter() - start) * 1000
    echo(
        f"  {row['family']:<14} {name:<31} input {tuple(image.shape)} -> output {tuple(output.shape)} "
        f"in {elapsed:.0f} ms"
    )
    return {"model": name, "output_shape": tuple(output.shape), "ms": elapsed}
