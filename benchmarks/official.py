"""The zoo against the authors' own code at equal weights: inference and training steps, in one run.

    python benchmarks/official.py --official-root DIR [--threads 1 --clock cpu] [--out benchmarks/official_cpu.md]

``DIR`` holds the authors' repositories, unpacked as ``HorNet/``, ``SReT/`` and ``RGT/``. For each case
the official model is built by the authors' builder (with random weights, perturbed so that layer
scales and coefficients are not at their initial values), the zoo's model is built from the same
constructor arguments by ``recurzoo.build_official`` and loads the official ``state_dict``; the
eval outputs must agree before anything is timed. Then both are timed in the same process,
interleaved (ours, theirs, theirs, ours, ...), on the same inputs, and the table gives the medians
and their ratio. Training steps (train mode, drop-path off on both sides, cross-entropy, backward,
AdamW) are timed the same way; their peak memory is measured in a fresh process per side.

Shims (here only, never in the package): the authors' files import ``timm.models.registry`` (their
``@register_model`` would overwrite the zoo's names in timm's registry, so it is a no-op while they
load), ``basicsr.utils.registry`` (a stand-in registry) and, when it is not installed, ``einops``
(the two ``rearrange`` patterns they use). The official SReT slices tokens after a random
permutation in eval mode; it is fixed to the interleaved order the zoo (and the parity fixtures)
use: token ``i`` in group ``i mod G``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import recurzoo

# --- shims for the authors' imports -------------------------------------------------------------


def _rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    pattern = " ".join(pattern.split())
    if pattern == "b c h w -> b (h w) c":
        return x.flatten(2).transpose(1, 2)
    if pattern == "b (h w) c -> b c h w":
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], sizes["h"], sizes["w"])
    raise NotImplementedError(f"einops stand-in: pattern {pattern!r}")


class _Rearrange(nn.Module):
    def __init__(self, pattern: str, **sizes: int) -> None:
        super().__init__()
        self.pattern, self.sizes = pattern, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rearrange(x, self.pattern, **self.sizes)


def _install_shims() -> None:
    try:
        import einops  # noqa: F401
    except ImportError:
        einops = types.ModuleType("einops")
        einops.rearrange = _rearrange
        einops.repeat = None
        layers = types.ModuleType("einops.layers")
        layers_torch = types.ModuleType("einops.layers.torch")
        layers_torch.Rearrange = _Rearrange
        sys.modules.update({"einops": einops, "einops.layers": layers, "einops.layers.torch": layers_torch})
    if "basicsr.utils.registry" not in sys.modules:
        registry = types.ModuleType("basicsr.utils.registry")
        registry.ARCH_REGISTRY = types.SimpleNamespace(register=lambda *a, **k: lambda obj: obj)
        for name in ("basicsr", "basicsr.utils"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["basicsr.utils.registry"] = registry


@contextlib.contextmanager
def _timm_registry_untouched() -> Iterator[None]:
    import warnings

    import timm.models.registry as timm_registry

    original = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        timm_registry.register_model = original


def load_official(root: Path, relative: str, name: str) -> types.ModuleType:
    """Import the authors' file ``root/relative`` as module ``name`` (with the shims above)."""
    path = root / relative
    if not path.is_file():
        raise SystemExit(f"official code: {path} not found (expected --official-root with HorNet/, SReT/, RGT/)")
    _install_shims()
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _timm_registry_untouched():
        spec.loader.exec_module(module)
    return module


def _interleaved_randperm(groups: int) -> Callable[..., torch.Tensor]:
    def randperm(n: int, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.arange(n).view(n // groups, groups).t().reshape(-1)

    return randperm


# --- the cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One comparison: both models, the input and how to time it."""

    name: str
    theirs: nn.Module
    ours: nn.Module
    inputs: torch.Tensor
    train_size: Optional[int]  # square training input side; None: inference only


def _perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def _pair(theirs: nn.Module, constructor: str, kwargs: Dict[str, object], seed: int) -> Tuple[nn.Module, nn.Module]:
    _perturb(theirs, seed)
    ours = recurzoo.build_official(constructor, kwargs, theirs.state_dict())
    return theirs, ours


def hornet_case(root: Path, batch: int, train: bool) -> Case:
    module = load_official(root, "HorNet/hornet.py", "official_hornet")
    theirs = module.hornet_tiny_7x7(drop_path_rate=0.0)
    kwargs = dict(depths=[2, 3, 18, 2], base_dim=64, num_classes=1000, gnconv_orders=[2, 3, 4, 5])
    theirs, ours = _pair(theirs, "hornet.HorNet", dict(kwargs, gnconv_scale=1 / 3, drop_path_rate=0.0), 0)
    return Case("HorNet-T 7x7", theirs, ours, torch.randn(batch, 3, 224, 224), 224 if train else None)


def sret_case(root: Path, batch: int, train: bool) -> Case:
    module = load_official(root, "SReT/SReT.py", "official_sret")
    kwargs = dict(
        image_size=224,
        patch_size=16,
        stride=8,
        base_dims=[42, 42, 42],
        depth=[4, 10, 6],
        recursive_num=[2, 5, 3],
        heads=[3, 6, 12],
        groups1=[8, 4, 1],
        groups2=[2, 1, 1],
        mlp_ratio=3.0,
        np_mlp_ratio=2,
        drop_path_rate=0.0,
    )
    module.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    module.torch.randperm = _interleaved_randperm(2)  # the only sliced recursion of SReT-S has 2 groups
    theirs, ours = _pair(module.SReT(**kwargs), "SReT.SReT", kwargs, 1)
    return Case("SReT-S", theirs, ours, torch.randn(batch, 3, 224, 224), 224 if train else None)


def rgt_case(root: Path, batch: int) -> Case:
    module = load_official(root, "RGT/basicsr/archs/rgt_arch.py", "official_rgt")
    kwargs = dict(
        upscale=4,
        in_chans=3,
        img_size=64,
        img_range=1.0,
        depth=[6] * 6,
        embed_dim=180,
        num_heads=[6] * 6,
        mlp_ratio=2,
        resi_connection="1conv",
        split_size=[8, 32],
        c_ratio=0.5,
    )
    theirs, ours = _pair(module.RGT(**kwargs), "rgt_arch.RGT", kwargs, 2)
    return Case("RGT-S x4", theirs, ours, torch.rand(batch, 3, 64, 64), None)


# --- measurements ----------------------------------------------------------------------------------


def check_outputs(case: Case) -> float:
    """Max abs difference of the eval outputs (raises when they disagree)."""
    case.theirs.eval()
    case.ours.eval()
    with torch.no_grad():
        expected, actual = case.theirs(case.inputs), case.ours(case.inputs)
    scale = max(1.0, expected.abs().max().item())
    difference = (actual - expected).abs().max().item()
    if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale):
        raise SystemExit(f"{case.name}: outputs differ by {difference:.3e} (scale {scale:.3g}); not timing")
    return difference


# The clock of every timing: wall time, or with --clock cpu the CPU time of this thread (one thread
# only: then every kernel runs on it, and the time another process holds the core is not counted).
CLOCK: Callable[[], float] = time.perf_counter


def interleaved(ours: Callable[[], object], theirs: Callable[[], object], rounds: int) -> Tuple[List[float], ...]:
    """Seconds per call of each, alternating which goes first, after one untimed call of each."""
    ours(), theirs()
    times: Dict[str, List[float]] = {"ours": [], "theirs": []}
    for index in range(rounds):
        order = [("ours", ours), ("theirs", theirs)]
        for name, run in order if index % 2 == 0 else order[::-1]:
            start = CLOCK()
            run()
            times[name].append(CLOCK() - start)
    return times["ours"], times["theirs"]


def _train_step(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.arange(inputs.shape[0]) % 1000

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    return step


def time_inference(case: Case, rounds: int) -> Tuple[List[float], List[float]]:
    case.theirs.eval()
    case.ours.eval()
    with torch.inference_mode():
        return interleaved(partial(case.ours, case.inputs), partial(case.theirs, case.inputs), rounds)


def time_training(case: Case, batch: int, rounds: int) -> Tuple[List[float], List[float]]:
    inputs = torch.randn(batch, 3, case.train_size, case.train_size)
    return interleaved(_train_step(case.ours, inputs), _train_step(case.theirs, inputs), rounds)


def training_memory(root: Path, case: str, side: str, batch: int, threads: int) -> Dict[str, float]:
    """Peak resident MB (and MB above the resident set before it) of one training step, in a fresh process."""
    command = [sys.executable, __file__, "--official-root", str(root), "--threads", str(threads)]
    command += ["--memory-worker", f"{case}:{side}", "--train-batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_worker(root: Path, spec: str, batch: int) -> Dict[str, float]:
    from recurzoo.export.scaling import _measure_peak

    case_name, side = spec.split(":")
    case = CASES[case_name](root, 1, True)
    model = case.ours if side == "ours" else case.theirs
    del case
    step = _train_step(model, torch.randn(batch, 3, 224, 224))
    step()  # allocates the optimizer state
    _, peak, above = _measure_peak("cpu", step)
    return {"peak_mb": peak, "step_mb": above}


CASES: Dict[str, Callable[..., Case]] = {
    "hornet": hornet_case,
    "sret": sret_case,
    "rgt": lambda root, batch, train: rgt_case(root, batch),
}


def _row(name: str, what: str, ours: List[float], theirs: List[float]) -> str:
    """Medians of each side, and the median and quartiles of the per-round ratios (theirs / ours)."""
    mo, mt = statistics.median(ours), statistics.median(theirs)
    ratios = [t / o for t, o in zip(theirs, ours)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return (
        f"| {name} | {what} | {mt * 1e3:.0f} | {mo * 1e3:.0f} | {statistics.median(ratios):.2f}x "
        f"| {low:.2f}-{high:.2f} |"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-root", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="hornet,sret,rgt")
    parser.add_argument("--batch", type=int, default=8, help="inference batch (HorNet, SReT)")
    parser.add_argument("--rgt-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=16, help="0: no training steps")
    parser.add_argument("--rounds", type=int, default=6, help="timed calls of each side (inference)")
    parser.add_argument("--train-rounds", type=int, default=4)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this thread's CPU time (needs --threads 1; robust to other processes on the machine)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error(f"--clock cpu times one thread: it needs --threads 1, received --threads {args.threads}")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.official_root, args.memory_worker, args.train_batch)))
        return 0
    lines = [
        f"Ours against the authors' code at equal weights and inputs, one process, interleaved; "
        f"{args.threads} threads, {args.clock} clock, torch {torch.__version__}, `python benchmarks/official.py`. "
        "Median ms per call; ratio = theirs / ours per round (above 1: ours is faster), median and quartiles.",
        "",
        "| model | measurement | theirs ms | ours ms | ours faster by | ratio quartiles |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for key in args.cases.split(","):
        batch = args.rgt_batch if key == "rgt" else args.batch
        case = CASES[key](args.official_root, batch, args.train_batch > 0)
        difference = check_outputs(case)
        notes.append(f"- {case.name}: eval outputs agree (max abs difference {difference:.1e}).")
        print(notes[-1], flush=True)
        size = "x".join(map(str, case.inputs.shape[1:]))
        ours, theirs = time_inference(case, args.rounds)
        lines.append(_row(case.name, f"inference, eager, batch {batch}, {size}", ours, theirs))
        print(lines[-1], flush=True)
        if case.train_size and args.train_batch:
            ours, theirs = time_training(case, args.train_batch, args.train_rounds)
            memory = {
                side: training_memory(args.official_root, key, side, args.train_batch, args.threads)
                for side in ("theirs", "ours")
            }
            what = f"training step, batch {args.train_batch}, {case.train_size} px"
            lines.append(_row(case.name, what, ours, theirs))
            print(lines[-1], flush=True)
            notes.append(f"- {case.name} training-step peak resident MB (fresh process each): " + _memory_text(memory))
            print(notes[-1], flush=True)
        del case
    text = "\n".join(lines + [""] + notes) + "\n"
    print(text)
    if args.out:
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(args.out)
    return 0


def _memory_text(memory: Dict[str, Dict[str, float]]) -> str:
    parts = []
    for side, values in memory.items():
        if "error" in values:
            parts.append(f"{side}: failed ({values['error']})")
        else:
            parts.append(f"{side} {values['peak_mb']:.0f} (step {values['step_mb']:.0f})")
    return ", ".join(parts) + "."


if __name__ == "__main__":
    sys.exit(main())
