"""The ``recurzoo`` command line: list the zoo, describe a model, run the demo.

Every failure the user can cause (an unknown model, a bad argument, an input the model cannot
take) is reported as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def _resolve_model(name: str) -> str:
    import recurzoo

    if name not in recurzoo.list_models():
        close = recurzoo.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; run 'recurzoo list' to see them"
        raise UsageError(f"unknown model {name!r}{hint}")
    return name


def cmd_list(args: argparse.Namespace) -> int:
    import recurzoo

    names = recurzoo.list_models(args.pattern)
    if not names:
        raise UsageError(f"no model of recurzoo matches {args.pattern!r}")
    print("\n".join(names))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import timm

    from recurzoo.export.flops import model_report

    name = _resolve_model(args.model)
    model = timm.create_model(name)
    input_size = tuple(args.input_size or model.pretrained_cfg["input_size"])
    try:
        report = model_report(model, input_size)
    except ValueError as error:
        raise UsageError(str(error)) from None
    cfg = {k: v for k, v in model.pretrained_cfg.items() if v is not None}
    print(f"model:           {name}")
    print(f"input size:      {'x'.join(str(s) for s in input_size)}")
    print(f"params:          {report['params'] / 1e6:.2f} M")
    print(f"GFLOPs (fvcore): {report['gflops']:.2f}")
    print(f"feature strides: {report['reductions']}")
    print(f"feature chans:   {report['channels']}")
    print("default cfg:     " + json.dumps(cfg, default=str, sort_keys=True))
    return 0


def _sample_image(side: int) -> "torch.Tensor":
    """A public-domain photograph shipped with scikit-image (Chelsea the cat), as a normalised batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1).float().div(255)
    image = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    import timm
    import torch
    from tqdm import tqdm

    import recurzoo
    from recurzoo.export.flops import count_params, create_uninitialized, model_report

    names = recurzoo.list_models(args.pattern)
    if not names:
        raise UsageError(f"no model of recurzoo matches {args.pattern!r}")
    rows = []
    for name in tqdm(names, desc="counting params and FLOPs", unit="model", file=sys.stderr):
        model = create_uninitialized(name)
        size = tuple(model.pretrained_cfg["input_size"])
        rows.append((name, size, model_report(model, size)))
    print(f"{'model':<28} {'input':>10} {'params (M)':>11} {'GFLOPs':>8}  feature strides")
    for name, size, report in rows:
        strides = "/".join(str(r) for r in report["reductions"])
        print(f"{name:<28} {'x'.join(map(str, size)):>10} {report['params'] / 1e6:>11.2f} "
              f"{report['gflops']:>8.2f}  {strides}")

    print("\nOne forward pass of each family's smallest model on a built-in photo (random weights, "
          "nothing downloaded):")
    for module_name in recurzoo.backbones.FAMILY_MODULES:
        family = module_name.rsplit(".", 1)[-1]
        members = [n for n in timm.list_models(module=family) if n in names]
        if not members:
            continue
        smallest = min(members, key=lambda n: count_params(create_uninitialized(n)))
        model = timm.create_model(smallest).eval()
        side = model.pretrained_cfg["input_size"][-1]
        image = _sample_image(side)
        start = time.perf_counter()
        with torch.no_grad():
            output = model(image)
        elapsed = (time.perf_counter() - start) * 1000
        print(f"  {family:<14} {smallest:<28} input {tuple(image.shape)} -> output {tuple(output.shape)} "
              f"in {elapsed:.0f} ms")
    return 0


def _input_size(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"input size entries must be positive, received {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recurzoo", description="Recursive and recurrent vision backbones for timm.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    list_parser = commands.add_parser("list", help="list the registered models")
    list_parser.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'hornet_*'")
    list_parser.set_defaults(handler=cmd_list)

    info = commands.add_parser("info", help="params, GFLOPs, feature strides and default cfg of a model")
    info.add_argument("model")
    info.add_argument("--input-size", nargs=3, type=_input_size, metavar=("C", "H", "W"),
                      help="input size (default: the model's default cfg)")
    info.set_defaults(handler=cmd_info)

    demo = commands.add_parser("demo", help="the zoo's table and one forward pass per family (no download)")
    demo.add_argument("pattern", nargs="?", default="*", help="wildcard filter of the models in the table")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``recurzoo`` console script and ``python -m recurzoo``."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as error:
        print(f"recurzoo: error: {error}".replace("recurzoo: error: recurzoo", "recurzoo"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
