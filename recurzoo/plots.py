"""Every plot the zoo draws, in one place: training curves, heat maps and the zoo's FLOP/parameter chart.

Each function writes one PNG atomically with matplotlib's Agg backend (imported when called).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from recurzoo.checkpoint import atomic_write

__all__ = ["plot_curves", "save_heatmap", "save_phase_heatmap", "plot_zoo", "report_latency"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: str,
    xlabel: str = "step",
    ylabel: str = "",
    title: str = "",
    log_y: bool = False,
) -> None:
    """Save line plots of named series (e.g. losses per step) to a PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        axes.plot(range(len(values)), list(values), label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    _integer_ticks(axes.xaxis)
    if log_y:
        axes.set_yscale("log")
    if title:
        axes.set_title(title)
    if len(curves) > 1:
        axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def save_heatmap(
    matrix: Any,
    path: str,
    title: str = "",
    label: str = "",
    xlabel: str = "",
    ylabel: str = "",
    lines: Sequence[float] = (),
) -> None:
    """Save a 2-D array as a PNG heat map with a colour bar; ``lines`` draws separators before those indices."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(matrix, cmap="viridis", origin="upper")
    colorbar = figure.colorbar(image, ax=axes)
    if label:
        colorbar.set_label(label)
    for position in lines:
        axes.axhline(position - 0.5, color="white", linewidth=1.5)
        axes.axvline(position - 0.5, color="white", linewidth=1.5)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def plot_zoo(reports: Iterable[Dict[str, Any]], path: Path, title: str = "") -> Path:
    """Scatter plot of GFLOPs against parameters for ``reports`` (PNG).

    Filled markers are distinct parameters, hollow ones the unrolled parameters of the same model
    (joined by a line: the weight sharing); measured latencies are written beside the points.
    """
    plt = _pyplot()
    reports = list(reports)
    families = sorted({report.get("family", "other") for report in reports})
    colours = {family: plt.get_cmap("tab10")(i % 10) for i, family in enumerate(families)}
    figure, axes = plt.subplots(figsize=(14, 10))
    for report in reports:
        totals, colour = report["totals"], colours[report.get("family", "other")]
        params, unrolled, gflops = totals["params"] / 1e6, totals["unrolled_params"] / 1e6, totals["gflops"]
        if unrolled > params * 1.001:
            axes.plot([params, unrolled], [gflops, gflops], color=colour, linewidth=0.8, alpha=0.6)
            axes.scatter([unrolled], [gflops], facecolors="none", edgecolors=[colour], s=36)
        axes.scatter([params], [gflops], color=colour, s=36)
        label = report["model"]
        measured = report_latency(report)
        if measured is not None:
            label += f" ({measured[1]:.0f} ms {measured[0]})"
        axes.annotate(label, (params, gflops), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for family in families:
        axes.scatter([], [], color=colours[family], label=family)
    axes.scatter([], [], facecolors="none", edgecolors="gray", label="unrolled params (weights counted per use)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("parameters (M)")
    axes.set_ylabel("GFLOPs (fvcore, multiply-accumulates)")
    axes.set_title(title or "recurzoo: GFLOPs vs parameters at the model-card input sizes")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=150))
    plt.close(figure)
    return Path(path)


def save_phase_heatmap(split: Any, path: str, title: str = "") -> None:
    """The layer-similarity matrix of a recurrent ViT phase split (``find_phases``) with its phase boundaries."""
    save_heatmap(
        split.similarity.numpy(),
        path,
        title=title or f"phases {split.phases}",
        label="cosine similarity",
        xlabel="block",
        ylabel="block",
        lines=split.boundaries,
    )


def report_latency(report: Dict[str, Any]) -> Optional[Tuple[str, float]]:
    """The backend and latency (ms) a FLOP report measured: onnxruntime's if exported, else eager PyTorch's."""
    export = report.get("export") or {}
    latency = export.get("latency_ms") or report.get("latency_ms") or {}
    if "onnxruntime" in latency:
        return "onnxruntime", latency["onnxruntime"]
    if "pytorch" in latency:
        return "eager", latency["pytorch"]
    return None
