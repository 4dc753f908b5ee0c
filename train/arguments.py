"""The command line of the training scripts: the argument groups they share, ``--config`` YAML defaults,
and the one place (:func:`run_cli`) where a user's error becomes one line on stderr with exit code 2.

A script builds its parser with :func:`training_parser` (``--config`` included), adds its own groups
(:func:`add_model_arguments` and :func:`add_loader_arguments` for the options every script names alike,
:func:`add_switch` for a ``--x``/``--no-x`` pair, :func:`add_choice` for a closed set of values),
then the shared ones: :func:`add_run_arguments` (output, resume, device, seed, progress, and the fault
injection of :func:`add_fault_arguments`) with :func:`add_step_arguments` or :func:`add_epoch_arguments`. It parses with
:func:`parse_args_with_config` and its ``__main__`` is ``run_cli(main)``. Model arguments (``KEY=VALUE``
lists) use timm's :class:`~timm.utils.ParseKwargs` through :func:`add_kwargs_argument`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence, Type

import timm.utils

from recurzoo.checkpoint import CheckpointError, atomic_write
from recurzoo.devices import DeviceError
from recurzoo.errors import UsageError
from recurzoo.images import ImageError
from recurzoo.registry import UnknownModelError
from recurzoo.train.run import EXIT_NON_FINITE, FAULT_MODES, NonFiniteLossError, TrainingInterrupted

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "ParseKwargs",
    "add_kwargs_argument",
    "add_switch",
    "add_choice",
    "add_model_arguments",
    "add_teacher_arguments",
    "add_loader_arguments",
    "training_parser",
    "add_run_arguments",
    "add_step_arguments",
    "add_epoch_arguments",
    "add_fault_arguments",
    "parse_args_with_config",
    "check_bounds",
    "BOUNDS",
    "save_args_yaml",
    "run_cli",
    "one_line",
    "EXIT_USAGE",
    "USER_ERRORS",
    "UsageError",
    "user_option",
    "model_option",
    "MODEL_ARGUMENT_ERRORS",
]

EXIT_USAGE = 2


# The documented errors of a user's input (a bad option value, a missing or unreadable file or folder,
# an unknown model, a checkpoint that does not fit or would run code, an unavailable device): reported
# by run_cli in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    UsageError,
    CheckpointError,
    ImageError,
    UnknownModelError,
    DeviceError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


# What a model's constructor (or timm's builder) raises for arguments it cannot take.
MODEL_ARGUMENT_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError, IndexError, KeyError)


@contextlib.contextmanager
def user_option(flags: str, *errors: Type[BaseException]) -> Iterator[None]:
    """Turn the ``errors`` a library raises for the user's option values (timm's ``ValueError`` for an
    unknown optimizer, ``KeyError`` for an unknown interpolation, a model's ``TypeError`` for an
    unknown argument, ...) into one :class:`UsageError` naming ``flags``; documented errors pass."""
    try:
        yield
    except USER_ERRORS:
        raise
    except errors as error:
        raise UsageError(f"{flags}: {one_line(error)}") from None


def model_option(flags: str) -> contextlib.AbstractContextManager:
    """:func:`user_option` for building a model from ``flags`` (a name and its keyword arguments): what a
    constructor or timm's builder raises for arguments it cannot take (:data:`MODEL_ARGUMENT_ERRORS`)."""
    return user_option(flags, *MODEL_ARGUMENT_ERRORS)


# The program name a script runs under when a command runs it (``recurzoo train``), set by run_cli.
_PROG: Optional[str] = None


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already states its default, or there
    is none to state (None, False, an empty string, list or dict)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default is argparse.SUPPRESS
        empty = empty or (isinstance(default, (str, list, tuple, dict)) and not default)
        if empty or "%(default)" in text or "default" in text.lower() or action.nargs == argparse.REMAINDER:
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a bad value, a missing option) are one line on
    stderr, ``prog: error: message``, with exit code 2 -- not the usage block. Under a command that runs
    the script (:func:`run_cli` with ``prog``) it takes that command's name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _PROG is not None and kwargs.get("prog"):
            kwargs["prog"] = _PROG
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


def _is_key_value(item: str) -> bool:
    key, separator, _ = item.partition("=")
    return bool(separator) and key.isidentifier()


class ParseKwargs(timm.utils.ParseKwargs):
    """timm's ``KEY=VALUE ...`` action (values are Python literals, else strings) into a dict; an item
    without ``=`` is a parser error naming the flag, not a traceback."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string=None):
        malformed = [item for item in values if item and not _is_key_value(item)]
        if malformed:
            raise argparse.ArgumentError(
                self, f"expected KEY=VALUE with a Python name as KEY, received {malformed[0]!r}"
            )
        super().__call__(parser, namespace, values, option_string)


def add_kwargs_argument(group: argparse._ActionsContainer, flag: str, help: str) -> None:
    """Add a ``KEY=VALUE ...`` option (default ``{}``) parsed by :class:`ParseKwargs` into a dict."""
    group.add_argument(flag, nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help=help)


def add_switch(group: argparse._ActionsContainer, flag: str, default: Optional[bool], help: str) -> None:
    """A ``--x``/``--no-x`` pair; ``default`` None leaves the choice to the script (e.g. "on CUDA")."""
    group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_choice(
    group: argparse._ActionsContainer, flag: str, choices: Sequence[str], help: str, default: Optional[str] = None
) -> None:
    """An option taking one of ``choices``; the default is ``default``, else the first choice."""
    group.add_argument(flag, choices=tuple(choices), default=choices[0] if default is None else default, help=help)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    flag: str = "--model",
    title: str = "model",
    required: bool = False,
    default: Optional[str] = None,
    kwargs_help: str = "",
    checkpoint: Sequence[str] = ("--checkpoint",),
    checkpoint_help: str = "",
    pretrained: str = "--pretrained",
    pretrained_help: str = "",
    pretrained_default: Optional[bool] = False,
) -> argparse._ArgumentGroup:
    """The model group: the model's name (``flag``), its ``FLAG-kwargs`` (``KEY=VALUE ...``, when
    ``kwargs_help``), its initial weights (the ``checkpoint`` flags, when ``checkpoint_help``) and a switch
    for timm's pretrained weights (``pretrained``, when ``pretrained_help``; ``pretrained_default`` None:
    decided by the script). Returns the group for the script's own model options."""
    group = parser.add_argument_group(title)
    group.add_argument(flag, required=required, default=default, help=help)
    if kwargs_help:
        add_kwargs_argument(group, f"{flag}-kwargs", kwargs_help)
    if checkpoint_help:
        group.add_argument(*checkpoint, default=None, help=checkpoint_help)
    if pretrained_help:
        add_switch(group, pretrained, pretrained_default, pretrained_help)
    return group


def add_teacher_arguments(
    parser: argparse.ArgumentParser, title: str, required: bool = False, pretrained: str = "--teacher-pretrained"
) -> argparse._ArgumentGroup:
    """The group of a frozen timm teacher (knowledge distillation): ``--teacher``, ``--teacher-kwargs``,
    ``--teacher-checkpoint`` and the ``pretrained`` switch (default: timm's weights when no checkpoint)."""
    return add_model_arguments(
        parser,
        "timm model name of the frozen teacher",
        flag="--teacher",
        title=title,
        required=required,
        kwargs_help="extra timm.create_model arguments of the teacher, e.g. img_size=32 depth=4",
        checkpoint=("--teacher-checkpoint",),
        checkpoint_help="teacher weights (.safetensors, or a torch checkpoint read with weights_only=True)",
        pretrained=pretrained,
        pretrained_help="timm's pretrained teacher weights (default: when no --teacher-checkpoint)",
        pretrained_default=None,
    )


def add_loader_arguments(
    group: argparse._ActionsContainer,
    batch_size: int,
    workers: int = 4,
    batch_help: str = "images per process and step",
    short: bool = False,
) -> None:
    """``--batch-size`` (per process) and ``--workers`` (data-loading processes per process); ``short``
    adds timm's ``-b``/``-j``."""
    group.add_argument(
        *(("--batch-size", "-b") if short else ("--batch-size",)), type=int, default=batch_size, help=batch_help
    )
    group.add_argument(
        *(("--workers", "-j") if short else ("--workers",)),
        type=int,
        default=workers,
        help="data-loading processes per rank",
    )


def training_parser(module: str, doc: Optional[str]) -> ArgumentParser:
    """The parser of the script ``python -m module`` (one-line errors, defaults shown in ``--help``) with
    ``--config``; its description is the first paragraph of the script's docstring ``doc``."""
    description = " ".join((doc or "").strip().split("\n\n")[0].split())
    parser = ArgumentParser(prog=f"python -m {module}", description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="YAML file of option defaults, keys as the flags' names (command-line flags win)",
    )
    return parser


def add_run_arguments(
    parser: argparse.ArgumentParser, output: str, seed: int, checkpoint: str = "last.pt"
) -> argparse._ArgumentGroup:
    """The ``run`` group every training script has: ``--output``, ``--resume`` (``auto``: ``OUTPUT/checkpoint``),
    ``--device``, ``--seed``, ``--no-progress``; then the fault-injection group (:func:`add_fault_arguments`).
    Returns the run group for the script's own run options."""
    group = parser.add_argument_group("run")
    add_fault_arguments(parser)
    group.add_argument("--output", default=output, help="folder for checkpoints, logs, plots and results")
    group.add_argument("--resume", default=None, help=f"checkpoint to resume, or 'auto' for OUTPUT/{checkpoint}")
    group.add_argument(
        "--overwrite", action="store_true", help="start a new run in an --output that holds an earlier one"
    )
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    group.add_argument("--seed", type=int, default=seed, help="random seed (each process adds its rank)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return group


def add_step_arguments(group: argparse._ArgumentGroup, save_every: int, log_every: int, save_help: str = "") -> None:
    """The checkpoint and log intervals of a step-based script (:class:`~recurzoo.train.loops.StepTraining`)."""
    group.add_argument(
        "--save-every", type=int, default=save_every, help=save_help or "checkpoint OUTPUT/last.pt every N steps"
    )
    group.add_argument("--log-every", type=int, default=log_every, help="log the loss every N steps")


def add_epoch_arguments(group: argparse._ArgumentGroup, log_interval: int, amp_dtype: str) -> None:
    """The run options of an epoch-based script (:class:`~recurzoo.train.loops.EpochTraining`): ranked
    checkpoints, mid-epoch checkpoints, BatchNorm sync, mixed precision, logging, plots, rank weights."""
    group.add_argument("--checkpoint-hist", type=int, default=3, help="ranked epoch checkpoints to keep")
    group.add_argument("--checkpoint-every", type=int, default=0, help="also a mid-epoch last.pth.tar every N steps")
    add_choice(group, "--dist-bn", ("reduce", "broadcast", ""), "sync BatchNorm statistics across ranks at epoch ends")
    group.add_argument("--amp", action="store_true", help="mixed precision (autocast; GradScaler for float16)")
    add_choice(group, "--amp-dtype", ("bfloat16", "float16"), "autocast's dtype", default=amp_dtype)
    group.add_argument("--log-interval", type=int, default=log_interval, help="log the training loss every N steps")
    group.add_argument("--plot", action="store_true", help="write loss.png and metrics.png after every epoch")
    group.add_argument(
        "--rank-weights",
        action="store_true",
        help="every rank also writes its final weights to OUTPUT/rank<R>.safetensors "
        "(to check that data-parallel replicas agree)",
    )


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """The documented fault-injection options (``--fail-at-step``, ``--fail-mode``) of
    :class:`~recurzoo.train.run.RunGuard`."""
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


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, config_flag: str = "--config"
) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from the YAML file named by ``--config`` (timm's scheme).

    The file maps option names (``lr``, ``batch_size`` or ``batch-size``) to values; flags given on the
    command line win over the file. Unknown names are an error; options the file sets are no longer
    required on the command line. A ``KEY=VALUE`` option may be a mapping or a list of such strings.
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
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
            parser.error(f"{config_flag} {path}: expected a YAML file of option defaults, cannot read it ({reason})")
        if not isinstance(loaded, dict):
            parser.error(f"{config_flag} {path}: expected a mapping of option names to values")
        values = {str(key).replace("-", "_"): value for key, value in loaded.items()}
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"{config_flag} {path}: unknown options {', '.join(unknown)}")
        for dest, value in values.items():
            actions[dest].required = False
            if isinstance(actions[dest], ParseKwargs) and isinstance(value, str):
                value = [value]
            problem = _config_value_problem(actions[dest], value)
            if problem:
                flag = actions[dest].option_strings[-1] if actions[dest].option_strings else dest
                parser.error(f"{config_flag} {path}: {dest} ({flag}): expected {problem}, received {value!r}")
            if isinstance(actions[dest], ParseKwargs) and isinstance(value, list):
                parsed = argparse.Namespace()
                try:
                    actions[dest](parser, parsed, [str(item) for item in value])
                except argparse.ArgumentError as error:
                    parser.error(f"{config_flag} {path}: {error}")
                values[dest] = vars(parsed)[dest]
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    check_bounds(parser, args)
    output = getattr(args, "output", None)
    if output and os.path.exists(output) and not os.path.isdir(output):  # refused before anything is built
        parser.error(f"argument --output: expected a folder, found the file {output}")
    earlier = _earlier_run(args)
    if earlier:
        parser.error(
            f"argument --output: {output} holds an earlier run ({', '.join(earlier)}); pass --resume auto to "
            "continue it, --overwrite to start a new one there, or choose another --output"
        )
    return args


# What a training run leaves in its --output folder (a run refused before it started leaves only log.txt).
EARLIER_RUN_FILES = ("args.yaml", "summary.csv", "metrics.jsonl", "last.pth.tar", "last.pt", "model.safetensors")
_EVALUATION_ONLY = ("eval_only", "evaluate", "test_only")


def _earlier_run(args: argparse.Namespace) -> List[str]:
    """The files of an earlier run in ``--output`` that a new training run (not resumed, not told to
    ``--overwrite``, not evaluation only) would replace or mix with its own."""
    output = getattr(args, "output", None)
    if not hasattr(args, "overwrite") or args.overwrite or getattr(args, "resume", None) or not output:
        return []
    if any(getattr(args, name, False) for name in _EVALUATION_ONLY) or not os.path.isdir(output):
        return []
    return [name for name in EARLIER_RUN_FILES if os.path.exists(os.path.join(output, name))]


def _config_value_problem(action: argparse.Action, value: Any) -> Optional[str]:
    """What a ``--config`` value for ``action`` should have been, or None when the flag would take it.

    argparse converts only what it reads from the command line, so a file's value is checked here
    against the flag's form: on/off flags take true/false, list flags a list of the right length,
    ``KEY=VALUE`` flags a mapping or a list of such strings, and typed flags values their type accepts.
    """
    if value is None:
        return None
    if action.nargs == 0:  # an on/off flag (store_true, store_false, --no-X)
        return None if isinstance(value, bool) or value in (action.const, action.default) else "true or false"
    if isinstance(action, ParseKwargs):
        return None if isinstance(value, (dict, list)) else "a mapping or a list of KEY=VALUE strings"
    items = [value]
    if action.nargs not in (None, "?"):
        count = action.nargs if isinstance(action.nargs, int) else None
        if not isinstance(value, list) or (count is not None and len(value) != count):
            return f"a list of {count if count is not None else 'one or more'} values"
        items = value
    for item in items:
        if action.choices is not None and item not in action.choices:
            return f"one of {', '.join(map(str, action.choices))}"
        if callable(action.type) and not isinstance(item, bool):
            try:
                action.type(item if isinstance(item, str) else str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return f"a value that {action.option_strings[-1] if action.option_strings else action.dest} takes"
    return None


# The ranges of the numeric options the training scripts share by name: (kind, low, high, low excluded,
# high excluded). A value outside (or NaN/inf) is a parser error naming the flag, from the command line
# and from --config alike, before anything is read or built.
_COUNT = ("int", 1, None, False, False)
_AT_LEAST_ZERO = ("int", 0, None, False, False)
_POSITIVE = ("float", 0.0, None, True, False)
_NON_NEGATIVE = ("float", 0.0, None, False, False)
_FRACTION = ("float", 0.0, 1.0, False, False)
_NAMES = {
    _COUNT: "batch_size validation_batch_size epochs steps stage1_steps stage2_steps patch_size img_size input_size "
    "min_size max_size fpn_channels num_classes log_interval log_every eval_every val_every base_size eval_images "
    "k repeat box_detections_per_img tile checkpoint_hist recount phases",
    _AT_LEAST_ZERO: "workers warmup_epochs cooldown_epochs checkpoint_every save_every mixup_off_epoch lora_rank "
    "tile_overlap seed fail_at_step lr_steps decay_milestones",
    _POSITIVE: "kd_temperature decay_epochs anchor_scale crop_pct std gamma lr_gamma decay_rate",
    _NON_NEGATIVE: "lr lr1 lr2 weight_decay wd warmup_lr min_lr clip_grad mixup cutmix color_jitter momentum "
    "backbone_lr_factor cls_weight reg_weight patch_weight final_weight layer_decay opt_eps",
    _FRACTION: "drop drop_path hflip vflip reprob mixup_prob mixup_switch_prob kd_weight model_ema_decay ema_decay "
    "box_score_thresh warmup_frac forcing_frac min_crop milestone milestones betas opt_betas",
}
BOUNDS = {name: bounds for bounds, names in _NAMES.items() for name in names.split()}
BOUNDS["smoothing"] = ("float", 0.0, 1.0, False, True)


def _out_of_bounds(value: Any, bounds: tuple) -> Optional[str]:
    """What ``value`` should have been, or None when it is within ``bounds``."""
    import math

    kind, low, high, low_open, high_open = bounds
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and not (number and float(value).is_integer()):
        return "an integer"
    if not number or not math.isfinite(value):
        return "a finite number"
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if not (below or above):
        return None
    what = "an integer" if kind == "int" else "a number"
    if high is None:
        return f"{what} {'>' if low_open else '>='} {low}"
    return f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error (one line, exit 2) for a numeric option outside its range in :data:`BOUNDS`."""
    for action in parser._actions:
        bounds = BOUNDS.get(action.dest)
        value = getattr(args, action.dest, None)
        if bounds is None or value is None or not action.option_strings:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            expected = _out_of_bounds(item, bounds)
            if expected:
                parser.error(f"argument {action.option_strings[-1]}: expected {expected}, received {item!r}")


def save_args_yaml(args: argparse.Namespace, path: str) -> None:
    """Write the resolved options as YAML (usable again with ``--config``)."""
    import yaml

    text = yaml.safe_dump({key: value for key, value in vars(args).items() if key != "config"}, sort_keys=True)

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def one_line(error: Any) -> str:
    """An error (or message) as one line: its whitespace runs, newlines included, made single spaces."""
    return " ".join(str(error).split()) or type(error).__name__


def run_cli(
    main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None, prog: Optional[str] = None
) -> None:
    """Run a training script's ``main`` as a command (``prog``, e.g. ``recurzoo train``, names it in its
    usage and errors; by default ``python -m <module>``).

    Exit codes: 2 with one line ``<prog>: error: <message>`` for a user error (the documented types of
    :data:`USER_ERRORS` only: bad values, missing data, unknown models, unavailable devices, unreadable
    or unfit checkpoints; argparse's errors exit 2 in one line too, see :class:`ArgumentParser`);
    128+signal after a signal stop (final checkpoint written); ``EXIT_NON_FINITE`` (3) when the loss
    became NaN/inf. Any other exception is a bug and keeps its traceback. Set ``RECURZOO_TRACEBACK=1``
    to see the traceback of a user error too.
    """
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    spec = getattr(module, "__spec__", None)
    global _PROG
    outer = _PROG
    _PROG = prog or outer
    prog = _PROG or f"python -m {spec.name if spec is not None else getattr(main, '__module__', 'recurzoo')}"
    try:
        main(argv)
    except TrainingInterrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except NonFiniteLossError as error:
        print(f"error: {error}; the last good checkpoint is kept", file=sys.stderr)
        sys.exit(EXIT_NON_FINITE)
    except USER_ERRORS as error:
        if os.environ.get("RECURZOO_TRACEBACK", "").strip() not in ("", "0"):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        _PROG = outer
