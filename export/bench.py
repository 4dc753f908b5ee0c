"""Latency, throughput, peak memory and achieved FLOP rate of models of the zoo and of timm's peers.

``recurzoo bench MODEL... --batch 1,8 --backends eager,compile,onnxruntime`` runs every
(model, backend, batch) in a fresh process, so that peak memory (the process's maximum resident set
on CPU, the allocator's peak on CUDA) belongs to that configuration alone. Each run warms up, then
times ``--repeats`` forward passes and reports the median latency and the spread (25th-75th
percentile). The achieved rate is ``2 x`` the fvcore multiply-accumulates of the batch over the
median latency, compared with the peak of a large fp32 matmul measured in the same process with the
same thread count (also counted as 2 FLOPs per multiply-accumulate).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, TypeVar

import torch

from recurzoo.devices import resolve_device
from recurzoo.export.models import RunSettings, median_and_quartiles, peak_memory_mb, time_forward

__all__ = [
    "BenchResult",
    "measure_matmul_peak",
    "time_forward",
    "bench_in_process",
    "bench",
    "to_markdown",
    "to_csv",
    "main",
]

BACKENDS = ("eager", "compile", "onnxruntime")
_Row = TypeVar("_Row")


@dataclass
class BenchResult:
    """One timed configuration."""

    model: str
    backend: str
    batch: int
    input_size: str
    threads: int
    device: str
    latency_ms: float
    latency_p25_ms: float
    latency_p75_ms: float
    images_per_s: float
    peak_memory_mb: float
    gmacs_per_image: float
    achieved_gflops: float
    matmul_peak_gflops: float
    peak_fraction: float
    graph_breaks: int = -1  # torch.compile only: breaks dynamo reported in the model (-1: not traced)
    error: str = ""


def measure_matmul_peak(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` ``size x size`` fp32 matmuls (2 n^3 FLOPs each)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = min(time_forward(lambda: torch.mm(a, b), device, warmup=1, repeats=repeats))
    return 2 * size**3 / best / 1e9


def parse_model_spec(spec: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """``"rgt_small_x2@3x64x64"`` -> ``("rgt_small_x2", (3, 64, 64))``; a plain name has no size."""
    name, _, size = spec.partition("@")
    if not size:
        return name, None
    try:
        dims = tuple(int(part) for part in size.split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"model spec {spec!r}: the size after '@' must be CxHxW, e.g. {name}@3x224x224")
    return name, dims


def _runner(
    model_name: str, model: torch.nn.Module, backend: str, inputs: torch.Tensor, workdir: str
) -> Callable[[], object]:
    if backend == "eager":
        return lambda: model(inputs)
    if backend == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(inputs)
    if backend == "onnxruntime":
        from recurzoo.export.onnx import export_model, onnx_session

        # the project's exporter: export-friendly eval paths (HorNet's DFT filter, ...) and a parity check
        result = export_model(
            model_name,
            out_dir=workdir,
            input_size=tuple(inputs.shape[1:]),
            batch=inputs.shape[0],
            report=False,
            benchmark=False,
            model=model,
        )
        if not result.ok:
            raise RuntimeError(result.parity_line())
        session = onnx_session(result.onnx_path, torch.get_num_threads())
        feed = {session.get_inputs()[0].name: inputs.cpu().numpy()}
        return lambda: session.run(None, feed)
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def bench_in_process(
    model_name: str,
    backend: str = "eager",
    batch: int = 1,
    input_size: Optional[Sequence[int]] = None,
    settings: Optional[RunSettings] = None,
) -> BenchResult:
    """Time one configuration in this process (peak memory is this process's high-water mark)."""
    from recurzoo.export.flops import count_flops

    settings = settings or RunSettings()
    device = settings.device
    model, inputs = settings.build(model_name, batch, input_size)
    size = tuple(inputs.shape[1:])
    macs = count_flops(model, size) / 1e9
    peak_gflops = measure_matmul_peak(device)
    breaks = count_graph_breaks(model, inputs) if backend == "compile" else -1
    if device.startswith("cuda"):
        peak_memory_mb(device, reset=True)
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        times = settings.time(_runner(model_name, model, backend, inputs, workdir))
    peak_memory = peak_memory_mb(device)
    median, p25, p75 = median_and_quartiles(times)
    achieved = 2 * macs * batch / median
    return BenchResult(
        model=model_name,
        backend=backend,
        batch=batch,
        input_size="x".join(map(str, size)),
        threads=torch.get_num_threads(),
        device=device,
        latency_ms=median * 1e3,
        latency_p25_ms=p25 * 1e3,
        latency_p75_ms=p75 * 1e3,
        images_per_s=batch / median,
        peak_memory_mb=peak_memory,
        gmacs_per_image=macs,
        achieved_gflops=achieved,
        matmul_peak_gflops=peak_gflops,
        peak_fraction=achieved / peak_gflops,
        graph_breaks=breaks,
    )


def count_graph_breaks(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Graph breaks dynamo finds when tracing ``model(inputs)`` (0: one graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(inputs)
    torch._dynamo.reset()
    return int(explanation.graph_break_count)


def run_worker(request: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run ``request`` (a ``kind`` and its keyword arguments) in a fresh interpreter; return its JSON.

    A fresh process per configuration keeps peak memory and compiled state from leaking between
    runs. Failures come back as ``{"error": "<last line of stderr>"}``.
    """
    command = [sys.executable, "-m", "recurzoo.export.bench", "--worker", json.dumps(request)]
    try:
        worker = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if worker.returncode != 0:
        return {"error": (worker.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(worker.stdout.strip().splitlines()[-1])


def worker_result(result_type: Type[_Row], request: Dict[str, Any], settings: RunSettings, **known: Any) -> _Row:
    """``result_type(**run_worker(request))``, run with ``settings``; when the worker fails, a row of
    the ``known`` fields (what was asked for), NaN for every measured field and the worker's ``error``."""
    outcome = run_worker(dict(request, settings=asdict(settings)), settings.timeout)
    if set(outcome) == {"error"}:
        measured = {field.name: float("nan") for field in fields(result_type) if field.name not in known}
        outcome = {**measured, **known, "error": outcome["error"]}
    return result_type(**outcome)


def bench(
    models: Sequence[str],
    backends: Sequence[str] = ("eager",),
    batches: Sequence[int] = (1,),
    input_size: Optional[Sequence[int]] = None,
    settings: Optional[RunSettings] = None,
    progress: bool = True,
    compare_batches: Optional[Sequence[int]] = None,
) -> List[BenchResult]:
    """Time every (model, backend, batch) in its own process; failures are recorded, not raised.

    ``models`` may carry their own input size (``name@CxHxW``, else ``input_size`` or the model's
    default). Backends other than eager run only at ``compare_batches`` when given.
    """
    from tqdm import tqdm

    settings = settings or RunSettings()
    settings = replace(settings, threads=settings.threads or torch.get_num_threads())
    configs = [
        (spec, backend, batch)
        for spec in models
        for backend in backends
        for batch in batches
        if backend == "eager" or compare_batches is None or batch in compare_batches
    ]
    results = []
    for spec, backend, batch in tqdm(configs, desc="benchmark", unit="run", disable=not progress, file=sys.stderr):
        model_name, size = parse_model_spec(spec)
        request = dict(
            kind="latency", model_name=model_name, backend=backend, batch=batch, input_size=size or input_size
        )
        known = dict(model=model_name, backend=backend, batch=batch, input_size="", graph_breaks=-1)
        results.append(worker_result(BenchResult, request, settings, **known, **settings.where()))
    return results


_COLUMNS = [
    ("model", "{}"),
    ("backend", "{}"),
    ("batch", "{}"),
    ("input_size", "{}"),
    ("threads", "{}"),
    ("latency_ms", "{:.1f}"),
    ("latency_p25_ms", "{:.1f}"),
    ("latency_p75_ms", "{:.1f}"),
    ("images_per_s", "{:.1f}"),
    ("peak_memory_mb", "{:.0f}"),
    ("gmacs_per_image", "{:.2f}"),
    ("achieved_gflops", "{:.1f}"),
    ("peak_fraction", "{:.0%}"),
]


def speedups_over_eager(results: Sequence[BenchResult]) -> List[Optional[float]]:
    """Eager latency over each result's latency, for the same model, batch and input size."""
    eager = {(r.model, r.batch, r.input_size): r.latency_ms for r in results if r.backend == "eager" and not r.error}
    return [
        None
        if r.error or (r.model, r.batch, r.input_size) not in eager
        else eager[(r.model, r.batch, r.input_size)] / r.latency_ms
        for r in results
    ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: ``header``, its rule and one line per row (a failed run's row may be shorter)."""
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(str(cell) for cell in line) + " |\n" for line in lines)


def to_markdown(results: Sequence[BenchResult]) -> str:
    """A markdown table of the results (the matmul peak of the run in a line above it)."""
    peaks = [r.matmul_peak_gflops for r in results if not r.error]
    header = f"fp32 matmul peak measured in the same runs: {statistics.median(peaks):.1f} GFLOP/s\n\n" if peaks else ""
    names = [name.replace("_", " ") for name, _ in _COLUMNS] + ["speed-up vs eager", "graph breaks"]
    rows = []
    for result, speedup in zip(results, speedups_over_eager(results)):
        if result.error:
            rows.append([result.model, result.backend, result.batch, f"failed: {result.error}"])
            continue
        values = [fmt.format(getattr(result, name)) for name, fmt in _COLUMNS]
        values.append("" if speedup is None or result.backend == "eager" else f"{speedup:.2f}x")
        values.append(str(result.graph_breaks) if result.graph_breaks >= 0 else "")
        rows.append(values)
    return header + markdown_table(names, rows)


def to_csv(rows: Sequence[Any]) -> str:
    """CSV of dataclass rows (BenchResult, TrainResult, MemoryResult, GrowthPoint)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(rows[0])])
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buffer.getvalue()


def write_outputs(markdown: str, rows: Sequence[Any], out: Optional[Path]) -> None:
    """Write ``out.md`` and ``out.csv`` (suffix replaced), each atomically, when ``out`` is given."""
    from recurzoo.checkpoint import atomic_write

    if out:
        for suffix, text in ((".md", markdown), (".csv", to_csv(rows))):
            atomic_write(out.with_suffix(suffix), lambda temporary, text=text: Path(temporary).write_text(text))


_Number = TypeVar("_Number", int, float)


def number_type(
    cast: Callable[[str], _Number], ok: Callable[[_Number], bool], expected: str
) -> Callable[[str], _Number]:
    """argparse type: ``cast(text)`` where ``ok`` holds of it; otherwise the error "expected ``expected``,
    received 'text'"."""

    def parse(text: str) -> _Number:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}")
        return value

    return parse


def _count(minimum: int, expected: str = "") -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum`` (the error says ``expected``, by default
    "an integer >= minimum")."""
    return number_type(int, lambda value: value >= minimum, expected or f"an integer >= {minimum}")


positive_int = _count(1, "a positive integer")  # argparse type: sizes, counts
non_negative_int = _count(0, "a non-negative integer")  # argparse type: overlaps


def add_input_size_argument(
    parser: argparse.ArgumentParser, help: str, type: Callable[[str], int] = positive_int
) -> None:
    """``--input-size C H W``, three positive integers (read by ``type``)."""
    parser.add_argument("--input-size", nargs=3, type=type, metavar=("C", "H", "W"), help=help)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, received {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, received {text!r}")
    return values


def _variant_list(text: str) -> List[str]:
    from recurzoo.export.train_bench import parse_variant

    values = [part for part in text.split(",") if part]
    try:
        for value in values:
            parse_variant(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated training variants, received {text!r}")
    return values


_seconds = number_type(float, lambda value: 0 < value < float("inf"), "a number of seconds above 0")  # finite


def _backend_list(text: str) -> List[str]:
    values = [part for part in text.split(",") if part]
    unknown = sorted(set(values) - set(BACKENDS))
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or text!r}; choose from {', '.join(BACKENDS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``recurzoo bench`` (shared with ``python -m recurzoo.export.bench``)."""
    parser.add_argument(
        "models",
        nargs="+",
        help="zoo models or timm peers, each optionally with its input size: "
        "hornet_tiny_7x7 convnext_tiny rgt_small_x2@3x64x64",
    )
    parser.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes (default 1)")
    add_input_size_argument(parser, type=_count(1), help="input size (default: each model's default cfg)")
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=["eager"],
        help=f"comma-separated, from {','.join(BACKENDS)} (default eager)",
    )
    parser.add_argument(
        "--compare-batch",
        type=_int_list,
        default=None,
        help="run the non-eager backends only at these batch sizes (default: every --batch)",
    )
    parser.add_argument("--threads", type=_count(1), default=None, help="intra-op threads (default: torch's default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator if there is one)")
    parser.add_argument("--warmup", type=_count(0), default=3)
    parser.add_argument("--repeats", type=_count(1), default=10)
    parser.add_argument(
        "--max-seconds",
        type=_seconds,
        default=None,
        help="stop timing a configuration after this many seconds (at least 3 runs)",
    )
    parser.add_argument("--timeout", type=_seconds, default=None, help="give up on one configuration after this long")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--train-memory",
        action="store_true",
        help="instead: peak memory of one training step without and with grad checkpointing (batch: the first --batch)",
    )
    mode.add_argument(
        "--growth",
        type=_int_list,
        default=None,
        metavar="SIDES",
        help="instead: latency and memory at these square input sides, with fitted exponents",
    )
    mode.add_argument(
        "--train",
        action="store_true",
        help="instead: images/s and peak memory of whole training steps (forward, backward, AdamW) at each --batch",
    )
    parser.add_argument(
        "--train-variants",
        type=_variant_list,
        default=None,
        help="with --train: comma-separated precisions fp32, bf16, fp16 (autocast), each optionally -cl for "
        "channels_last (default fp32,fp32-cl,bf16,bf16-cl on CPU; fp16 and fp16-cl too on CUDA)",
    )
    parser.add_argument("--tile", type=_count(0), default=0, help="with --growth: tiled super-resolution at this tile")
    parser.add_argument("--tile-overlap", type=_count(0), default=32)
    parser.add_argument("--out", type=Path, default=None, help="write FILE.md and FILE.csv (suffix replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace the FILE.md and FILE.csv of an earlier run")
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="replace this mode's section between its markers in this file "
        f"({README_START} ... {README_END} for the latency table)",
    )


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _markers(section: str) -> Tuple[str, str]:
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def _readme_text(path: Path, section: str) -> str:
    """The text of ``path``, which must hold the markers of ``section``; ``ValueError`` naming ``--readme``."""
    start, end = _markers(section)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise ValueError(f"--readme {path}: expected a text file with a {start} ... {end} section, found {found}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ValueError(f"--readme {path}: cannot read it ({reason})") from None
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"--readme {path}: has no {start} ... {end} section to update")
    return text


def update_readme(path: Path, markdown: str, machine: str, section: str = "bench") -> None:
    """Put ``markdown`` between the markers of ``section`` in ``path`` (which must contain both), atomically."""
    from recurzoo.checkpoint import atomic_write

    start, end = _markers(section)
    head, rest = _readme_text(path, section).split(start, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{start}\n{machine}\n\n{markdown}{end}{tail}"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _section(args: argparse.Namespace) -> str:
    """The README section that the mode of ``args`` updates."""
    if args.train_memory:
        return "bench-memory"
    if args.growth:
        return f"bench-growth-{'tiled' if args.tile else 'whole'}"
    return "bench-train" if args.train else "bench"


def check_outputs(args: argparse.Namespace) -> None:
    """``--out`` and ``--readme`` checked before anything runs: ``ValueError`` naming the flag for a
    name that cannot take a suffix, a folder that cannot be written, earlier tables (unless
    ``--overwrite``), or a README without the mode's section."""
    if args.out is not None:
        if not args.out.name or args.out.name in (".", "..") or args.out.is_dir():
            found = "a folder" if args.out.is_dir() else "no name"
            raise ValueError(f"--out {args.out}: expected a file name (FILE gives FILE.md and FILE.csv), found {found}")
        from recurzoo.checkpoint import probe_writable

        try:
            probe_writable(args.out.parent)
        except OSError as error:
            raise ValueError(f"--out {args.out}: cannot write into {args.out.parent} ({error.strerror})") from None
        outputs = [args.out.with_suffix(suffix) for suffix in (".md", ".csv")]
        folders = [str(path) for path in outputs if path.is_dir()]
        if folders:
            raise ValueError(f"--out {args.out}: {folders[0]} is a folder, expected a file name")
        existing = [str(path) for path in outputs if path.exists()]
        if existing and not getattr(args, "overwrite", False):
            raise ValueError(
                f"--out {args.out}: {', '.join(existing)} exist(s) already; pass --overwrite to replace, or "
                "choose another --out"
            )
    if args.readme is not None:
        check_readme(args.readme, _section(args), args.out)


def check_readme(readme: Path, section: str, out: Optional[Path] = None) -> None:
    """Before anything runs: ``readme`` holds the markers of ``section``, and neither table of ``out``
    (``.md``, ``.csv``) is that file; ``ValueError`` naming the flag otherwise."""
    _readme_text(readme, section)
    tables = [out.with_suffix(suffix) for suffix in (".md", ".csv")] if out is not None else []
    if any(table.exists() and os.path.samefile(table, readme) for table in tables):
        raise ValueError(f"--out {out}: its tables would replace --readme {readme}; choose another --out")


def _machine_line(threads: int, device: str) -> str:
    import platform

    processor = platform.processor() or platform.machine()
    return (
        f"Measured by `make bench` on {os.cpu_count()} CPU cores ({processor}), {threads} threads, "
        f"device {device}, torch {torch.__version__}."
    )


def _model_sizes(args: argparse.Namespace) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
    specs = [parse_model_spec(spec) for spec in args.models]
    return [(name, size or (tuple(args.input_size) if args.input_size else None)) for name, size in specs]


def _run_scaling(args: argparse.Namespace, settings: RunSettings) -> Tuple[Sequence[Any], str]:
    from recurzoo.export import scaling

    if args.train_memory:
        models = [(name, size or _default_input_size(name)) for name, size in _model_sizes(args)]
        rows = scaling.measure_train_memory(models, args.batch[0], settings)
        return rows, scaling.memory_markdown(rows)
    names = [name for name, _ in _model_sizes(args)]
    rows = scaling.measure_growth(names, args.growth, args.tile, args.tile_overlap, settings)
    return rows, scaling.growth_markdown(rows)


def _run_train(args: argparse.Namespace, settings: RunSettings) -> Tuple[Sequence[Any], str]:
    from recurzoo.export import train_bench

    variants = args.train_variants or train_bench.default_variants(settings.device)
    rows = train_bench.bench_train(_model_sizes(args), args.batch, variants, settings)
    return rows, train_bench.train_markdown(rows)


def _run_latency(args: argparse.Namespace, settings: RunSettings) -> Tuple[Sequence[Any], str]:
    rows = bench(args.models, args.backends, args.batch, args.input_size, settings, compare_batches=args.compare_batch)
    return rows, to_markdown(rows)


def _default_input_size(model_name: str) -> Tuple[int, ...]:
    import timm

    import recurzoo  # noqa: F401

    return tuple(timm.get_pretrained_cfg(model_name).input_size)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed arguments; print the table and write the files."""
    for spec in args.models:
        parse_model_spec(spec)  # a malformed size fails before anything runs
    check_outputs(args)
    settings = RunSettings(
        threads=args.threads or torch.get_num_threads(),
        device=str(resolve_device(args.device)),  # checked (DeviceError names --device) and resolved
        warmup=args.warmup,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        timeout=args.timeout,
    )
    if args.train_memory or args.growth:
        rows, markdown = _run_scaling(args, settings)
    elif args.train:
        rows, markdown = _run_train(args, settings)
    else:
        rows, markdown = _run_latency(args, settings)
    print(markdown)
    write_outputs(markdown, rows, args.out)
    if args.readme:
        update_readme(args.readme, markdown, _machine_line(settings.threads, settings.device), _section(args))
    return 0 if all(not row.error for row in rows) else 1


def _run_worker_request(request: Dict[str, Any]) -> Dict[str, Any]:
    """One configuration, in the fresh process :func:`run_worker` started."""
    from recurzoo.export import scaling

    kind = request.pop("kind", "latency")
    request["settings"] = RunSettings(**request.get("settings", {}))
    if kind == "latency":
        return asdict(bench_in_process(**request))
    if kind == "train_memory":
        return asdict(scaling.train_step_memory(**request))
    if kind == "growth":
        return asdict(scaling.growth_point(**request))
    if kind == "train":
        from recurzoo.export.train_bench import train_in_process

        return asdict(train_in_process(**request))
    raise ValueError(f"unknown benchmark kind {kind!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(_run_worker_request(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m recurzoo.export.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
    except ValueError as error:
        parser.error(str(error))
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
