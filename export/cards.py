"""Generate the model cards (``model_cards/<family>.md``) from timm's registry.

Every figure in a card is computed here: parameters and fvcore GFLOPs of each registered variant,
its feature strides and its pretrained tags. Run ``python -m recurzoo.export.cards`` after changing
a model; ``--check`` exits non-zero when a committed card differs from what would be written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
from timm.models import get_pretrained_cfg

import recurzoo
from recurzoo.export.flops import create_uninitialized, model_report
from recurzoo.export.onnx import DEFAULT_OPSET, PARITY_TOLERANCE, ExportSupport, export_support

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model_cards"
# Written by `make bench` (recurzoo bench ... --out benchmarks/cpu); the cards quote its rows.
BENCH_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu.csv"


def family_name(module_name: str) -> str:
    """``recurzoo.backbones.hornet`` -> ``hornet``."""
    return module_name.rsplit(".", 1)[-1]


def pretrained_tags(model_name: str) -> List[str]:
    """The ``name.tag`` entries of the model's default cfgs that point at weights."""
    tags = []
    for full_name in timm.list_pretrained(f"{model_name}.*"):
        cfg = get_pretrained_cfg(full_name)
        if cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file):
            tags.append(full_name)
    return tags


def _weights_cell(model_name: str) -> str:
    cells = []
    for full_name in pretrained_tags(model_name):
        cfg = get_pretrained_cfg(full_name)
        tag = full_name.split(".", 1)[1]
        url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url
        cells.append(f"[`{tag}`]({url})" if url else f"`{tag}`")
    return ", ".join(cells) or "none published"


def variant_row(model_name: str, create_kwargs: Dict[str, Any], input_size: Optional[Sequence[int]]) -> str:
    """The variant's row of the Variants table (counted on the full-size model)."""
    model = create_uninitialized(model_name, **create_kwargs)
    size = tuple(input_size or model.pretrained_cfg["input_size"])
    report = model_report(model, size)
    strides = "/".join(str(r) for r in report["reductions"]) or "-"
    return (
        f"| `{model_name}` | {report['params'] / 1e6:.2f} | {report['gflops']:.2f} | "
        f"{'x'.join(str(s) for s in size)} | {strides} | {report['unrolled_params'] / 1e6:.2f} | "
        f"{_weights_cell(model_name)} |"
    )


def variant_export_support(model_name: str, create_kwargs: Dict[str, Any]) -> ExportSupport:
    """What the variant's ONNX export can take (from its modules: built on the meta device, nothing counted)."""
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, **create_kwargs)
    return export_support(model)


def export_section(
    models: Sequence[str], supports: Sequence[ExportSupport], shown: Optional[Sequence[str]] = None
) -> List[str]:
    """The ONNX export status of the variants (all, or those in ``shown``), with the reasons where
    height/width cannot be dynamic (numbered over all variants, so that the notes do not depend on ``shown``)."""
    reasons: List[str] = []
    rows = []
    for name, support in zip(models, supports):
        cell = "yes"
        if not support.dynamic_hw:
            if support.reason not in reasons:
                reasons.append(support.reason)
            cell = f"no ({reasons.index(support.reason) + 1})"
        if shown is None or name in shown:
            rows.append(f"| `{name}` | yes | yes | {cell} |")
    lines = [
        "## ONNX export",
        "",
        f"`recurzoo export NAME [--dynamic batch|batch,hw] [--checkpoint FILE]` writes `NAME.onnx` (torch.onnx, "
        f"opset {DEFAULT_OPSET}) with its FLOP/parameter report and checks it in onnxruntime against PyTorch "
        f"(random inputs and a photograph; at most {PARITY_TOLERANCE:.0e} of the output scale). "
        "`tests/test_export.py` exports every variant at a reduced width this way, with the dynamic axes below.",
        "",
        "| model | exports | dynamic batch | dynamic height/width |",
        "| --- | --- | --- | --- |",
        *rows,
    ]
    if reasons:
        lines += ["", "Where height and width are not dynamic, the graph takes the size it was exported at:", ""]
        lines += [f"{i}. {reason[0].upper()}{reason[1:]}." for i, reason in enumerate(reasons, start=1)]
    return lines


def load_bench_rows(path: Path = BENCH_CSV) -> List[Dict[str, str]]:
    """The rows of the committed benchmark CSV (none when it was never generated)."""
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if not row.get("error")]


def latency_cell(model_name: str, bench_rows: Sequence[Dict[str, str]]) -> str:
    """Eager CPU latency in ms per benchmarked batch, e.g. ``"41 (b1), 290 (b8) at 3x224x224"``; ``-`` if none."""
    eager = [row for row in bench_rows if row["model"] == model_name and row["backend"] == "eager"]
    if not eager:
        return "-"
    cells = ", ".join(f"{float(row['latency_ms']):.0f} (b{row['batch']})" for row in eager)
    return f"{cells} at {eager[0]['input_size']}"


def speed_section(
    models: Sequence[str], bench_rows: Sequence[Dict[str, str]], note: str, shown: Optional[Sequence[str]] = None
) -> List[str]:
    """Every benchmark row of the family's models (those in ``shown``), with the family's performance note."""
    from recurzoo.export.bench import BenchResult, speedups_over_eager

    if not any(row["model"] in models for row in bench_rows):
        return []
    rows = [row for row in bench_rows if row["model"] in models and (shown is None or row["model"] in shown)]
    results = [
        BenchResult(
            **{
                k: (
                    v
                    if k in ("model", "backend", "input_size", "device", "error")
                    else (int(v) if k in ("batch", "threads", "graph_breaks") else float(v))
                )
                for k, v in row.items()
            }
        )
        for row in rows
    ]
    lines = [
        "## Speed on CPU",
        "",
        "Measured by `make bench` (see the README's Benchmark section for the machine and the timm peers): "
        "median latency, throughput, achieved GFLOP/s (2 x fvcore multiply-accumulates over the latency) as "
        "a fraction of an fp32 matmul measured in the same process, and each backend's speed-up over eager "
        "PyTorch at the same batch.",
        "",
        "| model | backend | batch | input | threads | latency ms | images/s | of matmul peak | vs eager | "
        "graph breaks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result, speedup in zip(results, speedups_over_eager(results)):
        vs_eager = "" if speedup is None or result.backend == "eager" else f"{speedup:.2f}x"
        breaks = str(result.graph_breaks) if result.graph_breaks >= 0 else ""
        lines.append(
            f"| `{result.model}` | {result.backend} | {result.batch} | {result.input_size} | "
            f"{result.threads} | {result.latency_ms:.1f} | {result.images_per_s:.1f} | "
            f"{result.peak_fraction:.0%} | {vs_eager} | {breaks} |"
        )
    if note:
        lines += ["", note.strip()]
    return lines + [""]


def default_usage(example: str) -> str:
    """The usage section of a classification family with official checkpoints."""
    return "\n".join(
        [
            "```python",
            "import recurzoo, timm",
            "",
            f"model = timm.create_model('{example}')  # random init",
            "# the authors' checkpoint, downloaded by hand (nothing is fetched at import):",
            f"model = timm.create_model('{example}', pretrained=True,",
            "                          pretrained_cfg_overlay=dict(file='/path/to/official_checkpoint.pth'))",
            "# fine-tune on another label set: the classifier is re-initialised, the rest is loaded",
            f"model = timm.create_model('{example}', pretrained=True, num_classes=10,",
            "                          pretrained_cfg_overlay=dict(file='/path/to/official_checkpoint.pth'))",
            "# a feature pyramid for dense tasks",
            f"backbone = timm.create_model('{example}', features_only=True)",
            "```",
        ]
    )


def family_models(module_name: str) -> List[str]:
    """The models a family module registers, in the order of its card."""
    return timm.list_models(module=family_name(module_name))


def render_card(module_name: str, only: Optional[Sequence[str]] = None) -> str:
    """The markdown card of one family module (one that defines ``MODEL_CARD``).

    ``only`` restricts the variants table to those models (for checks that cannot afford to count
    every large model); the rest of the card is unchanged.
    """
    module = importlib.import_module(module_name)
    card: Dict[str, Any] = module.MODEL_CARD
    all_models = family_models(module_name)
    models = [name for name in all_models if only is None or name in only]
    create_kwargs = card.get("create_kwargs", {})
    bench_rows = load_bench_rows()
    rows = [
        variant_row(name, create_kwargs, card.get("input_size")) + f" {latency_cell(name, bench_rows)} |"
        for name in models
    ]
    supports = [variant_export_support(name, create_kwargs) for name in all_models]
    example = card.get("example_model", family_models(module_name)[0])
    lines = [
        f"# {card['title']}",
        "",
        "<!-- Generated by `python -m recurzoo.export.cards`; do not edit by hand. -->",
        "",
        card["summary"].strip(),
        "",
        f"- Paper: [{card['paper']}]({card['paper_url']})",
        f"- Official code: {card['code_url']}",
        f"- License of the official code and weights: {card['license']}",
        "",
        "## Variants",
        "",
        card.get(
            "table_note",
            "Parameters and fvcore GFLOPs (multiply-accumulates) of one image at the input size "
            "shown, counted on the model as created below.",
        ).strip(),
        "Unrolled parameters count each parameter once per use in the forward pass (weights reused by "
        "recursion count at every use); `python -m recurzoo.export.report` gives the per-module figures.",
        "",
        "| model | params (M) | GFLOPs | input | feature strides | unrolled params (M) | official weights | "
        "CPU latency ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *speed_section(all_models, bench_rows, card.get("performance_note", ""), shown=models),
        *export_section(all_models, supports, shown=models),
        "",
        "## Usage",
        "",
        (card.get("usage") or default_usage(example)).strip(),
        "",
        card.get("notes", "").strip(),
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurzoo.export.cards", description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="family names (default: all), e.g. hornet")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the cards")
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    modules = [m for m in recurzoo.backbones.FAMILY_MODULES if not args.families or family_name(m) in args.families]
    stale = []
    for module_name in modules:
        path = args.out / f"{family_name(module_name)}.md"
        text = render_card(module_name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale model cards (run python -m recurzoo.export.cards): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
