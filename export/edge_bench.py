"""The edge benchmark: every edge artifact of one model a family, measured, for the README and the cards.

``python -m recurzoo.export.edge_bench sret_tiny hornet_tiny_gf rgt_small_x2@3x64x64 --out benchmarks/edge
--readme README.md`` exports each model (``name@CxHxW`` sets the input size) as int8 and fp16 ONNX and as
fp32 and int8 ExecuTorch programs (:func:`recurzoo.export.edge.export_edge`, random weights, calibrated on
the built-in photographs), each in a fresh interpreter with a time limit, and writes one row per
artifact: file size and latency against fp32 onnxruntime (batch 1, one thread), fidelity against the
fp32 model, peak memory, and for int8 ONNX where its kernel time goes. An artifact that cannot be made
is a row with the one-line reason; one that does not finish in time says so. ``make edge-bench`` runs it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ARTIFACTS", "EdgeRow", "bench_edge", "edge_markdown", "load_edge_rows", "merge_rows", "main"]

ARTIFACTS = ("onnx-int8", "onnx-fp16", "executorch-fp32", "executorch-int8")
EDGE_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "edge.csv"
_LABELS = {
    "onnx-int8": "ONNX int8",
    "onnx-fp16": "ONNX fp16",
    "executorch-fp32": "ExecuTorch fp32 (XNNPACK)",
    "executorch-int8": "ExecuTorch int8 (XNNPACK)",
}


@dataclass
class EdgeRow:
    """One artifact of one model: what was measured, or why nothing was (``error``)."""

    model: str
    artifact: str
    input_size: str
    size_mib: float = float("nan")
    size_ratio: float = float("nan")
    latency_ms: float = float("nan")
    fp32_onnxruntime_ms: float = float("nan")
    speedup_vs_fp32_onnxruntime: float = float("nan")
    fidelity: str = ""
    peak_memory_mib: float = float("nan")
    fp32_peak_memory_mib: float = float("nan")
    int8_time_shares: str = ""
    float_ops: str = ""
    error: str = ""


def _fidelity_cell(fidelity: Dict[str, float]) -> str:
    if "top1_agreement" in fidelity:
        return f"top-1 agreement {fidelity['top1_agreement']:.1%}"
    if "psnr_vs_fp32_db" in fidelity:
        return f"PSNR {fidelity['psnr_vs_fp32_db']:.1f} dB, SSIM {fidelity['ssim_vs_fp32']:.4f}"
    if "mask_mae_vs_fp32" in fidelity:
        return f"mask MAE {fidelity['mask_mae_vs_fp32']:.2g}, S-measure {fidelity['s_measure_vs_fp32']:.3f}"
    return f"max abs diff {fidelity['max_abs_diff']:.2g}"


def _row_from_report(model: str, artifact: str, size: str, report: Dict[str, Any]) -> EdgeRow:
    latency = report["latency_ms"]
    label = f"{report['format']} {report['precision']}"
    memory = report.get("peak_memory_mib") or {}
    shares = report.get("time_shares") or {}
    return EdgeRow(
        model=model,
        artifact=artifact,
        input_size=size,
        size_mib=report["size_bytes"] / 2**20,
        size_ratio=report["size_ratio"],
        latency_ms=latency[label],
        fp32_onnxruntime_ms=latency["fp32 onnxruntime"],
        speedup_vs_fp32_onnxruntime=latency["fp32 onnxruntime"] / latency[label],
        fidelity=_fidelity_cell(report["fidelity"]),
        peak_memory_mib=memory.get(label, float("nan")),
        fp32_peak_memory_mib=memory.get("fp32 onnxruntime", float("nan")),
        int8_time_shares=", ".join(f"{key} {value:.0%}" for key, value in shares.items()),
        float_ops=", ".join(report.get("float_ops", [])),
    )


def _worker(request: Dict[str, Any]) -> int:
    """Export one artifact (in this fresh interpreter) and print its report as JSON, or its one-line error."""
    import torch

    from recurzoo.export.edge import EdgeExportError, export_edge

    torch.manual_seed(0)
    size = tuple(request["input_size"]) if request["input_size"] else None
    try:
        result = export_edge(
            request["model"],
            request["out_dir"],
            fmt=request["format"],
            precision=request["precision"],
            input_size=size,
            calibration_count=request["calibration_count"],
        )
    except EdgeExportError as error:
        print(json.dumps({"error": str(error)}))
        return 0
    print(json.dumps(dict(asdict(result), size_ratio=result.size_ratio)))
    return 0


def bench_edge(
    models: Sequence[str],
    artifacts: Sequence[str] = ARTIFACTS,
    timeout: float = 1200.0,
    calibration_count: int = 8,
    progress: bool = True,
) -> List[EdgeRow]:
    """One :class:`EdgeRow` per (model, artifact), each exported in its own interpreter within ``timeout`` s."""
    from recurzoo.export.bench import parse_model_spec

    rows = []
    for spec in models:
        name, size = parse_model_spec(spec)
        size_text = "x".join(map(str, size)) if size else "default"
        for artifact in artifacts:
            fmt, precision = artifact.split("-")
            with tempfile.TemporaryDirectory() as out_dir:
                request = dict(
                    model=name,
                    format=fmt,
                    precision=precision,
                    input_size=list(size) if size else None,
                    out_dir=out_dir,
                    calibration_count=calibration_count,
                )
                command = [sys.executable, "-m", "recurzoo.export.edge_bench", "--worker", json.dumps(request)]
                try:
                    worker = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                    lines = worker.stdout.strip().splitlines()
                    if worker.returncode == 0 and lines:
                        outcome = json.loads(lines[-1])
                    elif worker.returncode < 0:
                        outcome = {"error": f"not measured: the export was stopped (signal {-worker.returncode})"}
                    else:
                        outcome = {"error": (worker.stderr.strip().splitlines() or ["failed"])[-1]}
                except subprocess.TimeoutExpired:
                    outcome = {"error": f"not measured: the export did not finish within {timeout:.0f} s"}
            row = (
                EdgeRow(name, artifact, size_text, error=outcome["error"])
                if set(outcome) == {"error"}
                else _row_from_report(name, artifact, "x".join(map(str, outcome["input_size"])), outcome)
            )
            rows.append(row)
            if progress:
                print(f"{name} {artifact}: {row.error or row.fidelity}", file=sys.stderr, flush=True)
    return rows


def _ratio(value: float, suffix: str = "x") -> str:
    return "" if value != value else f"{value:.2f}{suffix}"  # NaN: not measured


def edge_markdown(rows: Sequence[EdgeRow]) -> str:
    """The table of the README's and the cards' edge sections."""
    lines = [
        "| model | artifact | input | size MiB | vs fp32 size | latency ms | fp32 onnxruntime ms | "
        "speed vs fp32 onnxruntime | fidelity vs fp32 | peak MiB (fp32 onnxruntime) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for row in rows:
        if row.error:
            notes.append(f"- `{row.model}` {_LABELS.get(row.artifact, row.artifact)}: {row.error}")
            lines.append(
                f"| `{row.model}` | {_LABELS.get(row.artifact, row.artifact)} | {row.input_size} | "
                "| | | | | not made (below) | |"
            )
            continue
        memory = (
            ""
            if row.peak_memory_mib != row.peak_memory_mib
            else f"{row.peak_memory_mib:.0f} ({row.fp32_peak_memory_mib:.0f})"
        )
        lines.append(
            f"| `{row.model}` | {_LABELS.get(row.artifact, row.artifact)} | {row.input_size} | {row.size_mib:.2f} | "
            f"{_ratio(row.size_ratio)} | {row.latency_ms:.1f} | {row.fp32_onnxruntime_ms:.1f} | "
            f"{_ratio(row.speedup_vs_fp32_onnxruntime)} | {row.fidelity} | {memory} |"
        )
    shares = [row for row in rows if row.int8_time_shares]
    if shares:
        notes += [f"- `{row.model}` int8 onnxruntime kernel time: {row.int8_time_shares}" for row in shares]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def write_rows(rows: Sequence[EdgeRow], path: Path) -> None:
    """``path`` as CSV (written atomically)."""
    from recurzoo.checkpoint import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    atomic_write(path, lambda temporary: Path(temporary).write_text(buffer.getvalue()))


def load_edge_rows(path: Path = EDGE_CSV) -> List[EdgeRow]:
    """The rows of the committed edge benchmark (none when it was never generated)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [
            EdgeRow(**{key: (value if key in _TEXT else float(value)) for key, value in row.items()})
            for row in csv.DictReader(handle)
        ]


_TEXT = ("model", "artifact", "input_size", "fidelity", "int8_time_shares", "float_ops", "error")


def merge_rows(previous: Sequence[EdgeRow], new: Sequence[EdgeRow]) -> List[EdgeRow]:
    """``previous`` with the (model, artifact) rows of ``new`` replaced or added; models in first-seen order."""
    merged = {(row.model, row.artifact): row for row in previous}
    merged.update({(row.model, row.artifact): row for row in new})
    models = list(dict.fromkeys(row.model for row in [*previous, *new]))
    return sorted(merged.values(), key=lambda row: (models.index(row.model), ARTIFACTS.index(row.artifact)))


def _artifact_list(text: str) -> Tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in ARTIFACTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(ARTIFACTS)}, got {text!r}")
    return chosen


def _check_specs(specs: Sequence[str]) -> None:
    """A ``ValueError`` naming the first spec whose size is malformed or whose model is not registered."""
    from recurzoo.export.bench import parse_model_spec
    from recurzoo.registry import UnknownModelError, model_builder

    for spec in specs:
        name, _ = parse_model_spec(spec)
        try:
            model_builder(name)
        except UnknownModelError as error:
            raise ValueError(f"model {spec!r}: {error}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(json.loads(argv[1]))
    from recurzoo.export.bench import check_readme, update_readme

    parser = argparse.ArgumentParser(prog="python -m recurzoo.export.edge_bench", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model names, optionally NAME@CxHxW")
    parser.add_argument("--artifacts", type=_artifact_list, default=ARTIFACTS, help=f"default: {','.join(ARTIFACTS)}")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per artifact (default 1200)")
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write FILE.csv and FILE.md (suffix replaced)")
    parser.add_argument("--readme", type=Path, default=None, help="replace the <!-- edge:start --> section here")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of --out's CSV that this run does not measure again (measure in several sittings)",
    )
    args = parser.parse_args(argv)
    try:  # a misspelt name or size is a usage error before anything runs, not a "not made" row
        _check_specs(args.models)
        if args.readme is not None:
            check_readme(args.readme, "edge", args.out)
    except ValueError as error:
        parser.error(str(error))
    rows = bench_edge(args.models, args.artifacts, args.timeout, args.calibration_count)
    if args.merge and args.out:
        rows = merge_rows(load_edge_rows(args.out.with_suffix(".csv")), rows)
    markdown = edge_markdown(rows)
    print(markdown)
    if args.out:
        from recurzoo.checkpoint import atomic_write

        write_rows(rows, args.out.with_suffix(".csv"))
        atomic_write(args.out.with_suffix(".md"), lambda temporary: Path(temporary).write_text(markdown))
    if args.readme:
        import platform

        import torch

        machine = (
            f"Measured by `make edge-bench` on {platform.machine()}, one thread, batch 1, torch {torch.__version__}, "
            "random weights, calibrated on the 8 built-in photographs."
        )
        update_readme(args.readme, markdown, machine, "edge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
