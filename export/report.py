"""FLOP, parameter and activation reports of a model at one input size, and the zoo's scatter plot.

:func:`build_report` counts one eval-mode forward pass with fvcore (multiply-accumulates, the
convention of the papers' tables, with :mod:`recurzoo.export.flops`' handles for the operators
fvcore has no formula for) and returns totals and a per-module table (stem, stages, blocks, head):

* params: distinct parameters, and "unrolled" parameters -- each parameter counted once per call of
  the module that owns it, so a block applied recursively counts at every application (the size
  of the untied network that computes the same thing);
* GFLOPs and activations (fvcore's ``ActivationCountAnalysis``: outputs of convolutions, matmuls
  and, here, attention and FFTs), per module summed over all of its calls;
* how each operator was counted.

:func:`write_report` writes it as JSON and Markdown; ``recurzoo export`` writes one beside each
``.onnx``. ``python -m recurzoo.export.report --out DIR`` writes the reports of the whole zoo at its
model-card sizes and a scatter plot of GFLOPs against parameters (``zoo_gflops_params.png``),
annotated with the latency measured by ``recurzoo export`` where a report in ``DIR`` has one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from recurzoo.export.flops import (
    EXTRA_ACTIVATION_HANDLES,
    EXTRA_FLOP_HANDLES,
    HANDLE_NOTES,
    activation_analysis,
    count_calls,
    count_params,
    count_unrolled_params,
    flop_analysis,
)
from recurzoo.plots import plot_zoo, report_latency

__all__ = ["build_report", "report_rows", "render_markdown", "write_report", "zoo_report", "main"]

# fvcore's own formulas, for the "how counted" table (keys as fvcore's ``by_operator`` names them).
_FVCORE_NOTES = {
    "conv": "fvcore: one per multiply-accumulate of the convolution",
    "linear": "fvcore: one per multiply-accumulate",
    "matmul": "fvcore: one per multiply-accumulate",
    "addmm": "fvcore: one per multiply-accumulate",
    "bmm": "fvcore: one per multiply-accumulate",
    "einsum": "fvcore: one per multiply-accumulate",
    "batch_norm": "fvcore: 1 per element in eval mode",
    "group_norm": "fvcore: 5 per element",
    "layer_norm": "fvcore: 5 per element",
    "instance_norm": "fvcore: 5 per element",
    "upsample_nearest2d": "fvcore: 1 per output element",
    "upsample_bilinear2d": "fvcore: 4 per output element",
    "adaptive_avg_pool2d": "fvcore: 1 per input element",
    "grid_sampler": "fvcore: 4 per output element (bilinear)",
}
# Module names that form a model's block level (shown in the table below the top two levels).
_BLOCK_NAME = re.compile(r"(^|\.)(blocks|groups|layers|stages|levels)\.\d+$")


def _operator_note(operator: str) -> str:
    for aten_name, note in HANDLE_NOTES.items():
        if aten_name.split("::")[-1].lstrip("_") == operator.lstrip("_"):
            return f"recurzoo handle: {note}"
    return _FVCORE_NOTES.get(operator, "fvcore's built-in handle")


def report_rows(model: nn.Module, max_depth: int = 2, max_block_depth: int = 4) -> List[str]:
    """Module names of the per-module table: the top ``max_depth`` levels and the blocks below them."""
    names = []
    for name, _ in model.named_modules():
        depth = name.count(".") + 1
        if name and (depth <= max_depth or (depth <= max_block_depth and _BLOCK_NAME.search(name))):
            names.append(name)
    return names


def _example_input(model: nn.Module, input_size: Sequence[int], batch: int) -> torch.Tensor:
    from recurzoo.export.models import random_batch

    return random_batch(model, batch, *input_size, seed=0)


def build_report(
    model: nn.Module,
    input_size: Sequence[int],
    name: Optional[str] = None,
    batch: int = 1,
    count_fft: bool = True,
    activations: bool = True,
) -> Dict[str, Any]:
    """FLOPs, parameters (distinct and unrolled) and activations of ``model`` at ``input_size``.

    Args:
        model: the model (any mode; counted in eval mode).
        input_size: ``(C, H, W)`` of one image.
        name: the model's name in the report (default: its registered name).
        batch: images per forward pass; the figures are per pass.
        count_fft: count FFTs as ``N log2 N`` per channel (False: zero, as the HorNet paper).
        activations: also run fvcore's activation count (a second traced pass).

    Returns:
        A JSON-serialisable dict: ``totals``, ``modules`` (the per-module table), ``operators``
        (GFLOPs per operator type and how it was counted) and ``uncounted`` (operators counted zero).
    """
    from recurzoo.backbones._helpers import model_name

    was_training = model.training
    model.eval()
    inputs = (_example_input(model, input_size, batch),)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with count_calls(model) as calls:
                flops = flop_analysis(model, inputs, count_fft=count_fft)
                total_flops = flops.total()
            flops_by_module = flops.by_module()
            flops_by_operator = flops.by_operator()
            uncounted = dict(flops.unsupported_ops())
            acts_by_module: Dict[str, int] = {}
            total_acts = None
            if activations:
                acts = activation_analysis(model, inputs)
                total_acts = acts.total()
                acts_by_module = dict(acts.by_module())
    finally:
        model.train(was_training)

    modules = dict(model.named_modules())
    rows = []
    for row in report_rows(model):
        module = modules[row]
        unique = count_params(module)
        row_flops = flops_by_module.get(row, 0)
        row_acts = acts_by_module.get(row, 0)
        if not (unique or row_flops or row_acts):
            continue  # identities, dropouts, activations
        rows.append(
            dict(
                module=row,
                type=type(module).__name__,
                calls=calls[module],
                params=unique,
                unrolled_params=count_unrolled_params(module, calls),
                gflops=row_flops / 1e9,
                activations=row_acts,
            )
        )
    children = sum(flops_by_module.get(name, 0) for name, _ in model.named_children())
    own_flops = flops_by_module.get("", total_flops) - children
    if own_flops:  # operators of the model's own forward, e.g. a position embedding resampled to the input
        own_acts = acts_by_module.get("", 0) - sum(acts_by_module.get(name, 0) for name, _ in model.named_children())
        rows.insert(
            0,
            dict(
                module="(own operators)",
                type=type(model).__name__,
                calls=calls[model],
                params=0,
                unrolled_params=0,
                gflops=own_flops / 1e9,
                activations=own_acts,
            ),
        )
    operators = [
        dict(operator=op, gflops=count / 1e9, counted_as=_operator_note(op))
        for op, count in sorted(flops_by_operator.items(), key=lambda item: -item[1])
    ]
    return dict(
        model=name or model_name(model),
        input_size=list(int(v) for v in input_size),
        batch=batch,
        convention="fvcore: one FLOP per multiply-accumulate; elementwise ops, softmax and data movement count "
        "zero" + ("" if count_fft else "; FFTs count zero"),
        totals=dict(
            gflops=total_flops / 1e9,
            params=count_params(model),
            unrolled_params=count_unrolled_params(model, calls),
            activations=total_acts,
        ),
        modules=rows,
        operators=operators,
        uncounted={op: int(n) for op, n in sorted(uncounted.items())},
        extra_handles=sorted(set(EXTRA_FLOP_HANDLES) | set(EXTRA_ACTIVATION_HANDLES)),
    )


def _millions(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def render_markdown(report: Dict[str, Any]) -> str:
    """The report as a Markdown page (totals, per-module table, counting rules, export checks)."""
    totals = report["totals"]
    size = "x".join(str(v) for v in report["input_size"])
    lines = [
        f"# {report['model']} at {size} (batch {report['batch']})",
        "",
        f"Counting convention: {report['convention']}. Unrolled parameters count each parameter once per "
        "call of its module (weights reused by recursion count at every use).",
        "",
        "| GFLOPs | params (M) | unrolled params (M) | activations (M) |",
        "| --- | --- | --- | --- |",
        f"| {totals['gflops']:.3f} | {_millions(totals['params'])} | {_millions(totals['unrolled_params'])} | "
        f"{_millions(totals['activations'])} |",
        "",
        "## Per module",
        "",
        "| module | type | calls | params (M) | unrolled params (M) | GFLOPs | activations (M) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["modules"]:
        module = row["module"] if row["module"].startswith("(") else f"`{row['module']}`"
        lines.append(
            f"| {module} | {row['type']} | {row['calls']} | {_millions(row['params'])} | "
            f"{_millions(row['unrolled_params'])} | {row['gflops']:.3f} | {_millions(row['activations'])} |"
        )
    lines += ["", "## How the operators were counted", "", "| operator | GFLOPs | counted as |", "| --- | --- | --- |"]
    lines += [f"| `{op['operator']}` | {op['gflops']:.3f} | {op['counted_as']} |" for op in report["operators"]]
    if report["uncounted"]:
        lines += [
            "",
            "Counted as zero (no multiply-accumulates in fvcore's convention; calls in brackets): "
            + ", ".join(f"`{op}` ({n})" for op, n in report["uncounted"].items())
            + ".",
        ]
    export = report.get("export")
    if export:
        lines += [
            "",
            "## ONNX export",
            "",
            f"`{Path(export['onnx_path']).name}`: opset {export['opset']}, {export['onnx_nodes']} nodes, "
            f"dynamic batch, dynamic height/width: "
            f"{'yes' if export['dynamic_hw'] else 'no'}"
            + ("" if export["support"]["dynamic_hw"] else f" (not possible: {export['support']['reason']})")
            + f". Exported in {export['export_seconds']:.1f} s with {export['exporter']}.",
            "",
            "| input | shape | max abs diff | max diff / output scale | ok |",
            "| --- | --- | --- | --- | --- |",
        ]
        for check in export["checks"]:
            shape = "x".join(str(v) for v in check["input_shape"])
            lines.append(
                f"| {check['name']} | {shape} | {check['max_abs']:.2e} | {check['max_rel']:.2e} | "
                f"{'yes' if check['ok'] else 'NO'} |"
            )
        latency = export.get("latency_ms") or {}
        if latency:
            lines += [
                "",
                f"Latency (median, CPU, {latency.get('threads', '?')} thread(s), batch {export['batch']}): "
                f"onnxruntime "
                f"{latency['onnxruntime']:.1f} ms, eager PyTorch {latency['pytorch']:.1f} ms "
                f"(ratio {export['speed_ratio']:.2f}).",
            ]
    return "\n".join(lines) + "\n"


def report_paths(directory: Union[str, Path], stem: str) -> Tuple[Path, Path]:
    """``<stem>.report.json`` and ``<stem>.report.md`` in ``directory``."""
    return Path(directory) / f"{stem}.report.json", Path(directory) / f"{stem}.report.md"


def write_report(report: Dict[str, Any], directory: Path, stem: str, overwrite: bool = True) -> Tuple[Path, Path]:
    """Write ``<stem>.report.json`` and ``<stem>.report.md`` in ``directory``, each atomically; returns both
    paths. Without ``overwrite`` an existing report is not replaced (``FileExistsError``)."""
    from recurzoo.checkpoint import atomic_write

    json_path, markdown_path = report_paths(directory, stem)
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(json_path, lambda temporary: Path(temporary).write_text(text), overwrite)
    atomic_write(markdown_path, lambda temporary: Path(temporary).write_text(render_markdown(report)), overwrite)
    return json_path, markdown_path


# --------------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------------


def zoo_report(model_name: str, latency: bool = False) -> Dict[str, Any]:
    """The report of one zoo model at its model-card size (uninitialised weights; counts only).

    With ``latency`` the eager PyTorch latency of one image (median of 3 runs) is measured too.
    """
    from recurzoo.export.cards import counting_model
    from recurzoo.export.models import median_ms
    from recurzoo.registry import model_family

    model, size = counting_model(model_name)
    report = build_report(model, size, name=model_name)
    report["family"] = model_family(model_name)
    if latency:
        x = _example_input(model, size, 1)
        with torch.no_grad():
            report["latency_ms"] = dict(pytorch=median_ms(lambda: model(x), repeats=3))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    import recurzoo

    parser = argparse.ArgumentParser(prog="python -m recurzoo.export.report", description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=["*"], help="wildcards of the models (default: the zoo)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder of the reports and the plot")
    parser.add_argument(
        "--latency", action="store_true", help="measure eager latency of models that have no export report in --out"
    )
    args = parser.parse_args(argv)
    names = sorted({name for pattern in args.patterns for name in recurzoo.list_models(pattern)})
    if not names:
        print(f"no model matches {args.patterns}", file=sys.stderr)
        return 2
    reports = []
    for name in names:
        existing = args.out / f"{name}.report.json"
        previous = json.loads(existing.read_text()) if existing.exists() else {}
        report = zoo_report(name, latency=args.latency and report_latency(previous) is None)
        if previous.get("export") and previous.get("input_size") == report["input_size"]:
            report["export"] = previous["export"]
        write_report(report, args.out, name)
        reports.append(report)
        totals = report["totals"]
        print(
            f"{name:<28} {totals['gflops']:9.2f} GFLOPs {totals['params'] / 1e6:8.2f} M params "
            f"{totals['unrolled_params'] / 1e6:8.2f} M unrolled",
            flush=True,
        )
    plot = plot_zoo(reports, args.out / "zoo_gflops_params.png")
    print(f"wrote {len(reports)} reports and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
