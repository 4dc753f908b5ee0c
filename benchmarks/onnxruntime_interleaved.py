"""onnxruntime over eager PyTorch at batch 1, both timed in one process, interleaved, by thread CPU time.

    python benchmarks/onnxruntime_interleaved.py hornet_tiny_7x7 rgt_small_x2@3x64x64 [--rounds 8]

Separate processes (``recurzoo bench``) run at whatever load the shared machine has at the time; here
each round times eager, then the exported graph in onnxruntime, on one thread, by the CPU time of that
thread, so other processes do not enter the ratio. The model is exported by the project's exporter
(parity-checked in onnxruntime first). Prints one line per model: the median ratio and its quartiles.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from recurzoo.export.bench import parse_model_spec
from recurzoo.export.models import model_and_inputs
from recurzoo.export.onnx import export_model, onnx_session


def _cpu_seconds(run: Callable[[], object]) -> float:
    start = time.thread_time()
    run()
    return time.thread_time() - start


def ratio_over_eager(spec: str, rounds: int) -> str:
    """``NAME[@CxHxW]``: 'eager / onnxruntime' per round, as a median and quartiles."""
    name, size = parse_model_spec(spec)
    model, inputs = model_and_inputs(name, 1, size, "cpu")
    with tempfile.TemporaryDirectory() as workdir:
        result = export_model(
            name,
            out_dir=workdir,
            input_size=tuple(inputs.shape[1:]),
            batch=1,
            report=False,
            benchmark=False,
            model=model,
        )
        session = onnx_session(result.onnx_path, threads=1)
        feed = {session.get_inputs()[0].name: inputs.numpy()}
        ratios = []
        with torch.inference_mode():
            model(inputs), session.run(None, feed)  # warm-up
            for _ in range(rounds):
                eager = _cpu_seconds(lambda: model(inputs))
                ratios.append(eager / _cpu_seconds(lambda: session.run(None, feed)))
    low, median, high = statistics.quantiles(ratios, n=4)
    return f"{spec}: onnxruntime over eager {median:.2f}x (quartiles {low:.2f}-{high:.2f}, {rounds} rounds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME or NAME@CxHxW")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds: expected at least 2, received {args.rounds}")
    torch.set_num_threads(1)
    for spec in args.models:
        try:
            print(ratio_over_eager(spec, args.rounds), flush=True)
        except ValueError as error:
            parser.error(str(error))


if __name__ == "__main__":
    main()
