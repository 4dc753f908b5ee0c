"""The ``recurzoo`` command line: list the zoo, describe a model, super-resolve images, run the demo.

Every failure the user can cause (an unknown model, a bad flag value, a missing or unreadable file,
an output that would overwrite an input or an earlier output, an unavailable device, weights that
would need a download offline) is reported as one line on stderr, naming the flag or the file, with
exit code 2. Only the documented error types are caught (:data:`USER_ERRORS`): an internal bug keeps
its traceback, and ``RECURZOO_TRACEBACK=1`` shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from recurzoo.apps import UsageError
from recurzoo.checkpoint import CheckpointError
from recurzoo.devices import DeviceError, resolve_device
from recurzoo.export.bench import add_input_size_argument, non_negative_int, number_type, positive_int
from recurzoo.images import ImageError, default_max_pixels
from recurzoo.registry import UnknownModelError
from recurzoo.train.arguments import HelpFormatter, add_kwargs_argument

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised where the command is (like ``KeyboardInterrupt`` for SIGINT), so that its cleanup
    runs: temporary files removed, a partial export deleted."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread only; the old handler returns after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# The errors that are the user's: each message is one line naming the flag or the file.
USER_ERRORS = (
    UsageError,
    DeviceError,
    ImageError,
    CheckpointError,
    UnknownModelError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


class _ArgumentError(UsageError):
    """argparse's complaint about the command line, with the program (sub-command) it concerns."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise _ArgumentError(self.prog, message)


def _resolve_model(name: str, option: str = "MODEL") -> str:
    """``name`` (or ``name.tag``) when it is a zoo model; a one-line error naming ``option`` otherwise."""
    import recurzoo
    from recurzoo.registry import split_model_name

    base, tag = split_model_name(name)
    if name.endswith(".") or name.startswith("."):
        raise UsageError(
            f"{option}: {name!r} has an empty name or tag, expected NAME or NAME.TAG (e.g. sret_tiny.in1k)"
        )
    names = recurzoo.list_models()
    renamed = _deprecated_names().get(base)
    if renamed in names:  # timm.create_model builds it too, with the same warning
        print(f"recurzoo: warning: {base} is deprecated, use {renamed}", file=sys.stderr)
        return f"{renamed}.{tag}" if tag else renamed
    if not base or base not in names:
        raise UsageError(f"{option}: unknown model {name!r}, expected one of the zoo's{_closest_hint(base, names)}")
    return name


def _deprecated_names() -> Dict[str, Optional[str]]:
    """timm's deprecated model names and the names that replace them (the zoo's first names among them)."""
    from timm.models import get_deprecated_models

    return get_deprecated_models()


def _closest_hint(name: str, names: Sequence[str]) -> str:
    """``'; closest: a, b'``: the registered names nearest to ``name`` (spelling first, then shared prefix)."""
    import difflib

    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    stem = name.split("_")[0]
    if stem:
        close += [other for other in names if other.startswith(stem) and other not in close][: 5 - len(close)]
    return f"; closest: {', '.join(close)}" if close else "; 'recurzoo list' shows them"


def _device(name: Optional[str]) -> Optional[str]:
    """``--device`` checked (a known device that this machine has); None stays None (the default)."""
    return None if name is None else str(resolve_device(name))


def cmd_list(args: argparse.Namespace) -> int:
    import recurzoo

    names = recurzoo.list_models(args.pattern)
    if not names:
        raise UsageError(f"PATTERN: no model of recurzoo matches {args.pattern!r}")
    print("\n".join(names))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from recurzoo.apps import model_info

    info = model_info(_resolve_model(args.model), args.input_size)
    print(f"model:           {info['model']}")
    print(f"input size:      {'x'.join(str(s) for s in info['input_size'])}")
    print(f"params:          {info['params'] / 1e6:.2f} M")
    print(f"GFLOPs (fvcore): {info['gflops']:.2f}")
    print(f"feature strides: {info['reductions']}")
    print(f"feature chans:   {info['channels']}")
    print("default cfg:     " + json.dumps(info["pretrained_cfg"], default=str, sort_keys=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recurzoo.apps import run_demo

    run_demo(args.pattern, out_dir=args.out, overwrite=args.overwrite)
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from recurzoo.export.bench import add_arguments

    add_arguments(parser)


def cmd_bench(args: argparse.Namespace) -> int:
    import recurzoo
    from recurzoo.export.bench import check_outputs, parse_model_spec, run_from_args
    from recurzoo.registry import is_model

    try:
        names = [parse_model_spec(spec)[0] for spec in args.models]
    except ValueError as error:
        raise UsageError(str(error)) from None
    unknown = [name for name in names if not is_model(name)]
    if unknown:
        import timm

        known = sorted(set(recurzoo.list_models()) | set(timm.list_models()))
        raise UsageError(
            f"MODELS: unknown model(s) {', '.join(unknown)}: neither in recurzoo nor in timm"
            + _closest_hint(unknown[0], known)
        )
    if args.tile and not args.growth:
        raise UsageError("--tile applies to --growth only")
    if args.train_variants and not args.train:
        raise UsageError("--train-variants applies to --train only")
    try:
        check_outputs(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return run_from_args(args)


def cmd_convert(args: argparse.Namespace) -> int:
    """The authors' checkpoints as timm Hub folders, each loaded back and checked against the checkpoint."""
    from recurzoo.apps import check_output_folder
    from recurzoo.export import hub

    if bool(args.all) == bool(args.model):
        raise UsageError("give MODEL CHECKPOINT, or --all DOWNLOAD_DIR")
    if args.push:
        _check_push(args)
    check_output_folder(args.out)
    try:
        if args.all:
            results = hub.convert_all(args.all, args.out, overwrite=args.overwrite)
        else:
            if not args.checkpoint:
                raise UsageError("give the checkpoint file after MODEL")
            name = _resolve_model(args.model if not args.tag else f"{args.model}.{args.tag}")
            results = [hub.convert(name, args.checkpoint, args.out, args.model_kwargs, args.overwrite)]
            print(
                f"wrote {results[0].folder} ({', '.join(Path(f).name for f in results[0].files)}); loaded back "
                f"with local-dir:, max abs difference to the checkpoint {results[0].max_abs_diff:.1e}"
            )
        if args.push:
            if len(results) != 1 or not results[0].ok:
                raise UsageError("--push takes one successful conversion")
            print(f"pushed to {hub.push(results[0].folder, args.push)}")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.all and not any(result.ok for result in results):
        raise UsageError(f"--all {args.all}: converted nothing ({len(results)} file(s) tried; the table says why)")
    return 0 if results and all(result.ok for result in results) else 1


def _check_push(args: argparse.Namespace) -> None:
    """``--push`` names one conversion and a valid Hub repository, checked before any work."""
    from huggingface_hub.utils import validate_repo_id

    if args.all:
        raise UsageError("--push takes one conversion: give MODEL CHECKPOINT, not --all")
    try:
        validate_repo_id(args.push)
    except ValueError as error:
        raise UsageError(f"--push {args.push}: expected ORG/NAME, a Hugging Face repository id ({error})") from None


def _options(args: argparse.Namespace, *names: str, **renamed: str) -> Dict[str, Any]:
    """Keyword arguments from parsed options: each of ``names`` under its own name, and each
    ``parameter=option`` of ``renamed`` under the parameter's."""
    return {
        **{name: getattr(args, name) for name in names},
        **{key: getattr(args, dest) for key, dest in renamed.items()},
    }


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX export checked in onnxruntime, with the FLOP/parameter report beside the ``.onnx``; or an
    int8/fp16 ONNX or ExecuTorch artifact, with its fidelity report beside it. Every output is checked
    before any work; a failed or interrupted export removes the files it wrote."""
    from recurzoo.apps import MAX_COUNTED_SIZE
    from recurzoo.checkpoint import removed_on_failure

    name = _resolve_model(args.model)
    if args.input_size and max(args.input_size) > MAX_COUNTED_SIZE:
        raise UsageError(
            f"--input-size: the export runs the model at it, so each entry is at most {MAX_COUNTED_SIZE}, "
            f"received {' '.join(map(str, args.input_size))}"
        )
    edge = args.format != "onnx" or args.precision != "fp32"
    if edge:
        _check_edge_flags(args)
    else:
        given = [flag for flag, value in _EDGE_ONLY_FLAGS.items() if getattr(args, value) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)}: expected with --precision int8/fp16 or --format executorch; the fp32 ONNX "
                "export neither calibrates nor measures fidelity, and would ignore it"
            )
    paths = _export_outputs(name, args, edge)
    common = _options(args, "checkpoint", "input_size", out_dir="out")
    try:
        if edge:
            from recurzoo.export.edge import export_edge

            options = _options(args, "precision", "calibration", fmt="format", evaluation="eval")
            count = args.calibration_count or DEFAULT_CALIBRATION_COUNT
            with removed_on_failure(args.out, paths):  # export_model removes its own files
                result = export_edge(name, calibration_count=count, **options, **common)
        else:
            from recurzoo.export.onnx import export_model

            options = _options(args, "batch", "dynamic", "opset", "simplify", "overwrite", features_only="features")
            result = export_model(name, report=not args.no_report, benchmark=not args.no_benchmark, **options, **common)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except RuntimeError as error:
        raise _export_error(name, args, error) from None
    print(f"wrote {result.path if edge else result.onnx_path}" + "".join(f", {path}" for path in result.report_paths))
    print(result.summary() if edge else result.parity_line())
    return 0 if edge or result.ok else 1


def _export_error(name: str, args: argparse.Namespace, error: RuntimeError) -> BaseException:
    """The user's error behind an exporter's or allocator's failure (a chosen --opset, an --input-size
    too large for this machine) as a one-line UsageError; any other failure stays as it is (a bug)."""
    import torch

    from recurzoo.apps import out_of_memory
    from recurzoo.export.onnx import DEFAULT_OPSET

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if isinstance(error, torch.onnx.errors.OnnxExporterError) and args.opset != DEFAULT_OPSET:
        return UsageError(
            f"--opset {args.opset}: torch.onnx cannot export {name} at this opset ({reason}); "
            f"expected an opset it can, such as the default {DEFAULT_OPSET}"
        )
    if out_of_memory(error):
        size = "x".join(map(str, args.input_size)) if args.input_size else "the default"
        return UsageError(f"--input-size {size}, --batch {args.batch}: out of memory exporting {name} ({reason})")
    return error


_EDGE_ONLY_FLAGS = {"--calibration": "calibration", "--calibration-count": "calibration_count", "--eval": "eval"}
DEFAULT_CALIBRATION_COUNT = 32


def _check_edge_flags(args: argparse.Namespace) -> None:
    """The flags of an edge export that would be ignored, refused."""
    fp32_only = dict(
        features=args.features,
        dynamic=args.dynamic != "batch",
        simplify=args.simplify,
        batch=args.batch != 1,
        opset=args.opset != 18,
        no_report=args.no_report,
        no_benchmark=args.no_benchmark,
    )
    given = ["--" + flag.replace("_", "-") for flag, value in fp32_only.items() if value]
    if given:
        raise UsageError(
            f"{', '.join(given)}: apply to the fp32 ONNX export only, expected none with --precision "
            f"{args.precision} --format {args.format} (it always reports fidelity and latency at batch 1)"
        )
    if args.calibration and args.precision != "int8":
        raise UsageError(f"--calibration calibrates int8, not {args.precision}")
    if args.calibration_count is not None and not args.calibration:
        raise UsageError(
            f"--calibration-count {args.calibration_count}: counts the images of --calibration DIR (int8 only); "
            "without it the built-in photographs are used, all of them"
        )


def _export_outputs(name: str, args: argparse.Namespace, edge: bool) -> List[Path]:
    """The files the export will write, checked before any work: a folder that takes files, no input
    among them, and none there already unless ``--overwrite``."""
    from recurzoo.apps import check_output_folder, check_outputs
    from recurzoo.export.edge import edge_paths
    from recurzoo.export.onnx import export_paths

    check_output_folder(args.out)
    if edge:
        paths = edge_paths(name, args.out, args.format, args.precision)
    else:
        paths = export_paths(name, args.out, args.features, not args.no_report)
    check_outputs(paths, inputs=[args.checkpoint] if args.checkpoint else [], overwrite=args.overwrite)
    return paths


def cmd_cod(args: argparse.Namespace) -> int:
    """Camouflaged-object masks (PNG, original size) for images or datasets; metrics where masks exist."""
    from pathlib import Path

    from recurzoo.apps import check_output_folder
    from recurzoo.train import camouflage

    names = _dataset_names(args.data_config)
    missing = [item for item in args.inputs if not os.path.exists(item) and item not in names]
    if missing:
        raise UsageError(f"INPUT: no such image, folder or dataset: {', '.join(missing)}")
    if not os.path.isfile(args.checkpoint):
        found = "a folder" if os.path.isdir(args.checkpoint) else "nothing"
        raise UsageError(f"--checkpoint {args.checkpoint}: expected a checkpoint file, found {found}")
    out = check_output_folder(args.out)
    if any(out.resolve() == Path(item).resolve() for item in args.inputs if os.path.exists(item)):
        raise UsageError(f"--out: {args.out} is one of the inputs; choose another folder for the masks")
    device = _device(args.device)
    try:
        datasets = camouflage.prediction_datasets(args.inputs, args.data_config)
        _check_mask_outputs(datasets, args)
        options = _options(args, "model", "model_kwargs", "base_size", "batch_size")
        results, written = camouflage.predict(datasets, args.out, args.checkpoint, device=device, **options)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if not written:
        raise UsageError("wrote nothing: no readable image among the inputs")
    for name, values in results.items():
        print(f"{name}: " + ", ".join(f"{key} {values[key]:.3f}" for key, _ in camouflage.METRIC_COLUMNS))
    print(f"{len(written)} mask(s) written under {args.out}")
    return 0


def _check_mask_outputs(datasets: Dict[str, Any], args: argparse.Namespace) -> None:
    """Before any work: no two inputs write the same mask, no output is an input (image, mask or
    checkpoint), and none exists already unless ``--overwrite`` (:func:`recurzoo.apps.check_outputs`)."""
    from recurzoo.apps import check_outputs
    from recurzoo.train.camouflage import mask_path

    masks = [mask_path(args.out, name, sample) for name, samples in datasets.items() for sample in samples]
    scored = any(samples and all(sample.mask_path for sample in samples) for samples in datasets.values())
    metrics = [os.path.join(args.out, name) for name in ("metrics.json", "metrics.md")] if scored else []
    samples = [sample for dataset in datasets.values() for sample in dataset]
    inputs = [path for sample in samples for path in (sample.image_path, sample.mask_path) if path]
    check_outputs([*masks, *metrics], inputs=[*inputs, args.checkpoint], overwrite=args.overwrite)


def cmd_sr(args: argparse.Namespace) -> int:
    """Super-resolve PNG/JPEG files or folders with an SR model; PNGs are written to ``--out``."""
    from recurzoo.apps import super_resolve_files

    result = super_resolve_files(
        args.inputs,
        args.out,
        model=_resolve_model(args.model, "--model"),
        **_options(args, "checkpoint", "tile", "tile_overlap", "device", "model_kwargs", "overwrite", "max_pixels"),
        warn=lambda message: print(f"recurzoo sr: warning: {message}", file=sys.stderr),
    )
    skipped = f", {len(result.skipped)} unreadable image(s) skipped" if result.skipped else ""
    if not result.written:
        raise UsageError(f"wrote nothing: no readable image among the inputs{skipped}")
    print(f"{len(result.written)} image(s) written under {args.out}{skipped}")
    return 0


# Training scripts reachable as sub-commands; everything after the sub-command goes to the script.
TRAINING_COMMANDS = {
    "train": ("recurzoo.train.classification", "train or fine-tune a classifier (timm's flags; --help for them)"),
    "validate": ("recurzoo.train.validate", "top-1/top-5 of a classifier on an image dataset"),
    "train-detection": ("recurzoo.train.detection", "Faster/Mask R-CNN with an FPN on a zoo backbone, COCO data"),
}


def cmd_training(args: argparse.Namespace) -> int:
    """Run a training script with the rest of the command line (exit codes as ``python -m`` gives them)."""
    import importlib

    from recurzoo.train.arguments import run_cli

    module = importlib.import_module(TRAINING_COMMANDS[args.command][0])
    try:
        run_cli(module.main, args.script_args, prog=f"recurzoo {args.command}")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def _dataset_names(path: Optional[str]) -> List[str]:
    """The dataset names of ``--data-config`` (a YAML mapping of names to datasets), checked."""
    if not path:
        return []
    import yaml

    from recurzoo.train.camouflage import load_dataset_config

    try:
        with open(path, encoding="utf-8") as handle:
            entries = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise UsageError(f"--data-config: cannot read {path} as YAML ({reason})") from None
    if entries is not None and not isinstance(entries, dict):
        raise UsageError(
            f"--data-config: {path} holds a {type(entries).__name__}, expected a mapping of dataset names to "
            "root, image and mask entries (the official dataset.yaml layout)"
        )
    try:
        return list(load_dataset_config(path))
    except ValueError as error:
        raise UsageError(f"--data-config: {error}") from None


def _opset(text: str) -> int:
    """argparse type: an ONNX opset that torch's TorchScript exporter writes."""
    from torch.onnx import _constants

    low, high = _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    return number_type(int, lambda value: low <= value <= high, f"an ONNX opset from {low} to {high}")(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recurzoo", description="Recursive and recurrent vision backbones for timm.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    list_parser = commands.add_parser("list", help="list the registered models")
    list_parser.add_argument(
        "pattern", nargs="?", default="*", metavar="PATTERN", help="wildcard filter, e.g. 'hornet_*'"
    )
    list_parser.set_defaults(handler=cmd_list)

    info = commands.add_parser("info", help="params, GFLOPs, feature strides and default cfg of a model")
    info.add_argument("model", metavar="MODEL", help="a zoo model, optionally with its pretrained tag (name.tag)")
    add_input_size_argument(info, help="input size (default: the model's default cfg)")
    info.set_defaults(handler=cmd_info)

    bench = commands.add_parser("bench", help="latency, throughput, memory and FLOP rate against timm's peers")
    _add_bench_arguments(bench)
    bench.set_defaults(handler=cmd_bench)

    export = commands.add_parser(
        "export", help="ONNX export checked in onnxruntime, or an int8/fp16 ONNX or ExecuTorch edge artifact"
    )
    export.add_argument("model")
    export.add_argument(
        "--checkpoint",
        default=None,
        help="weights: a state_dict of the model (.pth/.safetensors) or an official checkpoint",
    )
    add_input_size_argument(export, help="input size to export at (default: the model's default cfg)")
    export.add_argument("--batch", type=positive_int, default=1, help="batch of the example and parity inputs")
    export.add_argument(
        "--dynamic",
        choices=("batch", "batch,hw"),
        default="batch",
        metavar="batch|batch,hw",
        help="dynamic axes: 'batch', or 'batch,hw' for batch, height and width (where the model allows)",
    )
    export.add_argument("--opset", type=_opset, default=18, help="ONNX opset, 7 to 20 (default: 18)")
    export.add_argument("--features", action="store_true", help="export the features_only backbone")
    export.add_argument("--simplify", action="store_true", help="simplify the graph with onnxscript's optimizer")
    export.add_argument("--no-report", action="store_true", help="skip the FLOP/parameter report")
    export.add_argument("--no-benchmark", action="store_true", help="skip the latency comparison")
    export.add_argument("--out", default="out", help="output folder (default: out)")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    edge = export.add_argument_group(
        "edge deployment (an int8/fp16 ONNX or ExecuTorch artifact with its fidelity report)"
    )
    edge.add_argument("--format", choices=("onnx", "executorch"), default="onnx", help="artifact format")
    edge.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="onnx: fp32 (the checked export), fp16 or int8; executorch: fp32 or int8",
    )
    edge.add_argument("--calibration", metavar="DIR", help="images to calibrate int8 on (default: built-in photos)")
    edge.add_argument(
        "--calibration-count",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"at most this many images of --calibration (default: {DEFAULT_CALIBRATION_COUNT})",
    )
    edge.add_argument("--eval", metavar="DIR", help="images to measure fidelity on; class subfolders give accuracy too")
    export.set_defaults(handler=cmd_export)

    convert = commands.add_parser(
        "convert", help="the authors' checkpoint as a timm Hugging Face Hub folder, loaded back and checked"
    )
    convert.add_argument("model", nargs="?", help="zoo model with its pretrained tag, e.g. hornet_tiny_7x7.in1k")
    convert.add_argument("checkpoint", nargs="?", help="the authors' checkpoint file, downloaded by hand")
    convert.add_argument("--all", metavar="DOWNLOAD_DIR", help="convert every checkpoint file in this folder")
    convert.add_argument("--out", required=True, help="parent folder of the Hub folders (one per model.tag)")
    convert.add_argument("--tag", default=None, help="pretrained tag, when MODEL has none (e.g. in1k)")
    _add_model_kwargs(convert)
    convert.add_argument("--overwrite", action="store_true", help="replace an existing Hub folder")
    convert.add_argument("--push", metavar="ORG/NAME", help="publish the folder to the Hugging Face Hub")
    convert.set_defaults(handler=cmd_convert)

    cod = commands.add_parser("cod", help="camouflaged-object masks and COD metrics with an MSRNet model")
    cod.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders of images, dataset folders (image + mask folders) or dataset names",
    )
    cod.add_argument("--model", default=None, help="registered COD model (default: recorded in the checkpoint)")
    _add_model_kwargs(cod)
    cod.add_argument("--checkpoint", required=True, help="weights: recurzoo's or an official MSRNet checkpoint")
    cod.add_argument("--out", required=True, help="output folder (masks per input, metrics.json, metrics.md)")
    cod.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    cod.add_argument("--data-config", default=None, help="YAML of named datasets (the official dataset.yaml layout)")
    cod.add_argument("--base-size", type=positive_int, default=384, help="side of the 1.0x image")
    cod.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    _add_device(cod)
    cod.set_defaults(handler=cmd_cod)

    sr = commands.add_parser("sr", help="super-resolve PNG/JPEG images with an SR model (e.g. rgt_small_x4)")
    sr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    sr.add_argument("--model", default="rgt_small_x4", help="registered SR model, optionally name.tag")
    _add_model_kwargs(sr)
    sr.add_argument("--checkpoint", default=None, help="weights: an official RGT (BasicSR) file or one of ours")
    sr.add_argument("--tile", type=positive_int, default=None, help="process tiles of this many input pixels")
    sr.add_argument("--tile-overlap", type=non_negative_int, default=32, help="overlap of neighbouring tiles (pixels)")
    sr.add_argument("--out", required=True, help="output folder (one PNG per input, never one of the inputs)")
    sr.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    sr.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help=f"refuse images with more pixels as decompression bombs (default: Pillow's limit, {default_max_pixels()})",
    )
    _add_device(sr)
    sr.set_defaults(handler=cmd_sr)

    for name, (_, summary) in TRAINING_COMMANDS.items():
        script = commands.add_parser(name, help=summary, prefix_chars="+", add_help=False)  # flags go through
        script.add_argument("script_args", nargs=argparse.REMAINDER)
        script.set_defaults(handler=cmd_training)

    demo = commands.add_parser("demo", help="the zoo's table and one forward pass per family (no download)")
    demo.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="wildcard filter of the models")
    demo.add_argument("--out", default=None, help="folder for the demo's pictures (default: a temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="replace pictures of an earlier run in --out")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _add_model_kwargs(parser: argparse.ArgumentParser) -> None:
    add_kwargs_argument(parser, "--model-kwargs", "extra model arguments (values are Python literals, else strings)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N, ... (default: the accelerator if there is one, else cpu)"
    )


def _one_line(error: BaseException) -> str:
    """The message of a user error on one line (an OSError as ``file: reason``)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error.args[0]) if isinstance(error, OSError) and len(error.args) == 1 else str(error)
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``recurzoo`` console script and ``python -m recurzoo``."""
    prog = "recurzoo"
    try:
        args, unknown = build_parser().parse_known_args(argv)
        prog = f"recurzoo {args.command}"
        if unknown:  # argparse would blame the top-level program for a sub-command's unknown flag
            raise _ArgumentError(
                prog, f"unrecognized arguments: {' '.join(unknown)}; 'recurzoo {args.command} --help' lists the flags"
            )
        with _sigterm_raises():
            return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("RECURZOO_TRACEBACK", "").strip() not in ("", "0"):
            traceback.print_exc()
        print(f"{getattr(error, 'prog', prog)}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # The reader of stdout went away (``recurzoo info NAME | head``): nothing left to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
