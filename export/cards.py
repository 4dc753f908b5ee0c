"""Generate the model cards (``model_cards/<family>.md``) from their templates and the registry.

A family's prose and counting settings are in ``model_cards/templates/<family>.yaml`` (title, paper,
licence, summary, notes, ``create_kwargs`` and ``input_size`` for the figures). Every figure in a card
is computed here: parameters and fvcore GFLOPs of each registered variant, its feature strides and
its pretrained tags. Run ``python -m recurzoo.export.cards`` after changing a model; ``--check``
exits non-zero when a committed card differs from what would be written.
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

import recurzoo
from recurzoo.checkpoint import cached_weights_path
from recurzoo.export.flops import model_report
from recurzoo.export.models import ExportSupport, create_model, export_support, model_input_size
from recurzoo.export.onnx import DEFAULT_OPSET, PARITY_TOLERANCE
from recurzoo.registry import pretrained_cfgs

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model_cards"
# The committed figures of every variant, packaged for `recurzoo demo`.
ZOO_FIGURES = Path(__file__).resolve().parents[1] / "recurzoo" / "assets" / "zoo.csv"
TEMPLATES = DEFAULT_OUT / "templates"
# Written by `make bench` (recurzoo bench ... --out benchmarks/cpu); the cards quote its rows.
BENCH_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu.csv"


@lru_cache(maxsize=None)
def load_template(family: str) -> Dict[str, Any]:
    """The prose and counting settings of a family's card (``model_cards/templates/<family>.yaml``)."""
    import yaml

    path = TEMPLATES / f"{family}.yaml"
    if not path.is_file():
        raise ValueError(f"no card template for family {family!r}: {path} is missing")
    return yaml.safe_load(path.read_text())


def counting_model(model_name: str) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """The model a zoo model's card figures are counted on (its card's ``create_kwargs``, every weight
    zero, for counting only) and the input size they are counted at (the card's, else the cfg's)."""
    from recurzoo.registry import model_family

    template = load_template(model_family(model_name))
    model = create_model(model_name, uninitialized=True, **(template.get("create_kwargs") or {}))
    return model, model_input_size(model, template.get("input_size"))


def pretrained_tags(model_name: str) -> List[str]:
    """The ``name.tag`` entries of the model's default cfgs that point at weights."""
    return list(pretrained_cfgs(model_name))


def _weights_cell(model_name: str) -> str:
    cells = []
    for full_name, cfg in pretrained_cfgs(model_name).items():
        tag = full_name.split(".", 1)[1]
        url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url
        cached = cached_weights_path(cfg)
        cell = f"[`{tag}`]({url})" if url else f"`{tag}`"
        cells.append(f"{cell} as `{cached.name}`" if cached is not None else cell)
    return ", ".join(cells) or "none published"


def variant_figures(model_name: str) -> Dict[str, str]:
    """The figures of a variant's row, counted on the full-size model with its card's settings."""
    model, size = counting_model(model_name)
    report = model_report(model, size)
    return {
        "model": model_name,
        "family": recurzoo.model_family(model_name),
        "task": recurzoo.model_task(model_name),
        "input_size": "x".join(str(s) for s in size),
        "params_m": f"{report['params'] / 1e6:.2f}",
        "gflops": f"{report['gflops']:.2f}",
        "strides": "/".join(str(r) for r in report["reductions"]) or "-",
        "unrolled_params_m": f"{report['unrolled_params'] / 1e6:.2f}",
    }


def variant_row(figures: Dict[str, str]) -> str:
    """The variant's row of the Variants table."""
    return (
        f"| `{figures['model']}` | {figures['params_m']} | {figures['gflops']} | {figures['input_size']} | "
        f"{figures['strides']} | {figures['unrolled_params_m']} | {_weights_cell(figures['model'])} |"
    )


def write_zoo_figures(rows: Sequence[Dict[str, str]], path: Path = ZOO_FIGURES) -> None:
    """The figures of every variant as the CSV that ``recurzoo demo`` shows."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def variant_export_support(model_name: str, create_kwargs: Dict[str, Any]) -> ExportSupport:
    """What the variant's ONNX export can take, as its classes declare it (built on the meta device)."""
    import torch

    with torch.device("meta"):
        model = recurzoo.create_model(model_name, **create_kwargs)
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
            rows.append(f"| `{name}` | yes | {'yes' if support.dynamic_batch else 'no'} | {cell} |")
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


def edge_section(models: Sequence[str], note: str) -> List[str]:
    """The family's rows of the edge benchmark (``make edge-bench``: int8/fp16 ONNX, ExecuTorch), with its note."""
    from recurzoo.export.edge_bench import edge_markdown, load_edge_rows

    rows = [row for row in load_edge_rows() if row.model in models]
    if not rows:
        return []
    lines = [
        "",
        "## Edge deployment",
        "",
        "Measured by `make edge-bench` (`recurzoo export NAME --precision int8|fp16`, `--format executorch`; "
        "see the README's Edge deployment section): file size and latency (batch 1, one thread) against the "
        "fp32 ONNX graph in onnxruntime, fidelity against the fp32 model on the built-in photographs (random "
        "weights), and the memory that loading and one run add to a fresh process.",
        "",
        edge_markdown(rows).rstrip(),
    ]
    return lines + (["", note.strip()] if note.strip() else [])


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


def family_models(family: str) -> List[str]:
    """The models of a family, in the order of its card."""
    return recurzoo.list_models(family=family)


def render_card(
    family: str, only: Optional[Sequence[str]] = None, figures: Optional[List[Dict[str, str]]] = None
) -> str:
    """The markdown card of one family, from its template and its registered models.

    ``only`` restricts the variants table to those models (for checks that cannot afford to count
    every large model); the rest of the card is unchanged. The variants' figures are appended to
    ``figures`` when given.
    """
    card = load_template(family)
    all_models = family_models(family)
    models = [name for name in all_models if only is None or name in only]
    create_kwargs = card.get("create_kwargs") or {}
    bench_rows = load_bench_rows()
    counted = [variant_figures(name) for name in models]
    if figures is not None:
        figures.extend(counted)
    rows = [variant_row(row) + f" {latency_cell(row['model'], bench_rows)} |" for row in counted]
    supports = [variant_export_support(name, create_kwargs) for name in all_models]
    example = card.get("example_model", all_models[0])
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
        "Offline, `pretrained=True` reads an official file placed in timm's cache folder "
        "(`~/.cache/torch/hub/checkpoints/` by default) under the name shown; the authors publish no "
        "SHA-256 sums, so compare the file with the authors' download page.",
        "",
        "| model | params (M) | GFLOPs | input | feature strides | unrolled params (M) | official weights | "
        "CPU latency ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *speed_section(all_models, bench_rows, card.get("performance_note", ""), shown=models),
        *export_section(all_models, supports, shown=models),
        *edge_section(all_models, card.get("edge_note", "")),
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
    families = [f for f in recurzoo.registry.list_families() if not args.families or f in args.families]
    stale, figures = [], []
    for family in families:
        path = args.out / f"{family}.md"
        text = render_card(family, figures=figures)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if not args.check and not args.families:
        write_zoo_figures(figures)
        print(f"wrote {ZOO_FIGURES}")
    if stale:
        print("stale model cards (run python -m recurzoo.export.cards): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
