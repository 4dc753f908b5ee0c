"""Write the in-repository parity fixtures from the authors' own code.

Usage (from the repository root, the authors' repositories checked out side by side)::

    python tests/parity/generate.py --official-root /path/to/official
    # or: make parity-fixtures OFFICIAL_ROOT=/path/to/official

``--official-root`` holds one checkout per repository, named as below, at these commits:

==========  ==========================  ==========================================
folder      repository                  commit
==========  ==========================  ==========================================
HorNet      raoyongming/HorNet          ac9e21058935f1cf8e27fcca72bbf598fa691d69
SReT        szq0214/SReT                af6db0ae413838d3144a6cd74f774bf670d5ddc6
RGT         zhengchen1999/RGT           01b4379d2feb7c9a58a91a5be1b677a970e27347
MSRNet      linaagh98/MSRNet            a0afd45e52088fd7bb1cfd5373be710405180200
ZoomNeXt    lartpang/ZoomNeXt           e742cc33f353099a30488dbba87dc46fb9d8d281
==========  ==========================  ==========================================

Each case builds one official class at a reduced width, gives every parameter, layer scale,
learnable coefficient and BatchNorm statistic a random value (seeded per case), runs it in eval
mode and saves ``tests/parity/fixtures/<family>/<case>.pt`` in the format of ``../shared/parity``
(see its README): ``family``, ``case``, ``official`` (constructor and kwargs), ``state_dict``,
``inputs``, ``output``, ``mode`` and ``notes``. The same torch version on the same machine writes
the same bytes.

The official files are loaded as they are published; what today's libraries need is shimmed
here, never edited there:

- ``timm.models.registry.register_model`` registers nothing while they load (their model names
  would clash with timm's registry and nothing here uses them);
- RGT's ``basicsr.utils.registry.ARCH_REGISTRY`` is a stub (BasicSR is not installed);
- MSRNet's ``layers.py`` uses ``DifferenceAwareOps`` without importing it: it is taken from
  ZoomNeXt's ``layers.py``, where the authors' decoder comes from;
- MSRNet's encoder is replaced by a timm ``features_only`` model under ``encoder.net`` (the keys of
  ``../shared/parity``), and where ``mid_dim`` is not 64 the two convolutions that the official
  class writes with 64 input channels (``tra_1.1`` and ``predictor.1``) take ``mid_dim`` channels,
  so that a narrow decoder can be captured.

Each official eval-mode behaviour that is random is fixed as the parity README states (SReT's
recursive slicing uses the ``i mod G`` grouping).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import math
import sys
import types
import warnings
import zipfile
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple

import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMITS = {
    "HorNet": ("raoyongming/HorNet", "ac9e21058935f1cf8e27fcca72bbf598fa691d69"),
    "SReT": ("szq0214/SReT", "af6db0ae413838d3144a6cd74f774bf670d5ddc6"),
    "RGT": ("zhengchen1999/RGT", "01b4379d2feb7c9a58a91a5be1b677a970e27347"),
    "MSRNet": ("linaagh98/MSRNet", "a0afd45e52088fd7bb1cfd5373be710405180200"),
    "ZoomNeXt": ("lartpang/ZoomNeXt", "e742cc33f353099a30488dbba87dc46fb9d8d281"),
}


def _source(folder: str) -> str:
    repo, commit = COMMITS[folder]
    return f"{repo}@{commit[:12]}"


# ------------------------------------------------------------------------------ loading the official code


@contextlib.contextmanager
def _timm_registration_off() -> Iterator[None]:
    """Let the official files decorate their builders with ``register_model`` without registering them."""
    import timm.models.registry as registry

    original = registry.register_model
    registry.register_model = lambda fn: fn
    try:
        yield
    finally:
        registry.register_model = original


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _timm_registration_off():
        spec.loader.exec_module(module)
    return module


def _load_from_package(alias: str, folder: Path, module: str) -> types.ModuleType:
    """Import ``folder/<module>.py`` as ``alias.<module>``: relative imports work, ``folder/__init__.py`` is skipped."""
    package = types.ModuleType(alias)
    package.__path__ = [str(folder)]
    sys.modules[alias] = package
    with _timm_registration_off():
        return importlib.import_module(f"{alias}.{module}")


def _load_rgt(root: Path) -> types.ModuleType:
    class _Registry:
        def register(self, obj: Any = None) -> Callable:
            return (lambda fn: fn) if obj is None else obj

    stubs = {name: types.ModuleType(name) for name in ("basicsr", "basicsr.utils", "basicsr.utils.registry")}
    stubs["basicsr.utils.registry"].ARCH_REGISTRY = _Registry()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return _load_file("_official_rgt_arch", root / "RGT" / "basicsr" / "archs" / "rgt_arch.py")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ------------------------------------------------------------------------------ random weights


def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter and BatchNorm statistic a random value of a sensible scale.

    Matrices and kernels get a normal of std ``1/sqrt(fan_in)``; norm weights, layer scales and
    learnable coefficients ``U(0.5, 1.5)``; biases ``N(0, 0.1)``; BatchNorm running means
    ``N(0, 0.1)`` and variances ``U(0.5, 1.5)``. Other buffers (masks, indices) are derived data
    and keep their values. Values are rounded to bfloat16's grid (and kept as float32): the model
    computes exactly as with any float32 weights, and git stores the files about half as large.
    """

    def normal(tensor: torch.Tensor, std: float) -> torch.Tensor:
        return _on_bfloat16_grid(torch.randn(tensor.shape, generator=generator) * std)

    def uniform(tensor: torch.Tensor) -> torch.Tensor:
        return _on_bfloat16_grid(torch.rand(tensor.shape, generator=generator) + 0.5)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() == 0:  # e.g. RGT's position-bias MLP below embed_dim 64
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "complex_weight" in leaf or "pos_embed" in leaf:
                value = normal(param, 0.5)
            elif param.ndim >= 2:
                value = normal(param, 1.0 / math.sqrt(param[0].numel()))
            elif leaf == "bias" and not _is_coefficient(model, name):
                value = normal(param, 0.1)
            else:
                value = uniform(param)
            param.copy_(value)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(normal(module.running_mean, 0.1))
                module.running_var.copy_(uniform(module.running_var))


def _on_bfloat16_grid(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(torch.float32)


def _is_coefficient(model: nn.Module, name: str) -> bool:
    """SReT's ``LearnableCoefficient`` stores its scale as a parameter named ``bias``."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return type(owner).__name__ == "LearnableCoefficient"


# ------------------------------------------------------------------------------ the cases


def _hornet(root: Path, case: str, kwargs: Dict[str, Any], input_hw: List[int]) -> Dict[str, Any]:
    official = _load_file("_official_hornet", root / "HorNet" / "hornet.py")
    stages = []
    for stage, order in enumerate(kwargs["gnconv_orders"]):
        layer = partial(official.gnconv, order=order, s=kwargs["gnconv_scale"])
        if kwargs["global_filter"] and stage >= 2:
            h, w = kwargs["global_filter_hw"][stage - 2]
            layer = partial(official.gnconv, order=order, s=kwargs["gnconv_scale"], h=h, w=w)
            layer = partial(layer, gflayer=official.GlobalLocalFilter)
        stages.append(layer)
    with contextlib.redirect_stdout(None):  # gnconv prints its dims
        model = official.HorNet(
            depths=kwargs["depths"],
            base_dim=kwargs["base_dim"],
            num_classes=kwargs["num_classes"],
            gnconv=stages,
            block=official.Block,
        )
    notes = (
        "gnconv orders 2,3,4,5 per stage, s=1/3; GF variants use GlobalLocalFilter in stages 3 and 4, "
        "its frequency weights resized bilinearly (align_corners=True) to the feature map's rfft size"
    )
    return dict(
        family="hornet",
        case=case,
        constructor="hornet.HorNet",
        kwargs=kwargs,
        model=model,
        inputs={"x": (2, 3, *input_hw)},
        notes=f"{notes}; official code {_source('HorNet')}",
    )


def _sret(root: Path, case: str, kwargs: Dict[str, Any], sliced: bool) -> Dict[str, Any]:
    if sliced:
        official = _load_file("_official_sret", root / "SReT" / "SReT.py")
        constructor, cls = "SReT.SReT", official.SReT
        _fix_sret_grouping(official)
    else:
        official = _load_file("_official_sret_wo_slice", root / "SReT" / "SReT_wo_slice.py")
        constructor, cls = "SReT_wo_slice.RecursiveTransformer", official.RecursiveTransformer
    size = kwargs["image_size"]
    notes = (
        "eval mode; in the recursive (second) pass of a sliced block with G>1 groups, token i belongs to "
        "group i mod G (row-major token order) instead of a random permutation"
    )
    return dict(
        family="sret",
        case=case,
        constructor=constructor,
        kwargs=kwargs,
        model=cls(**kwargs),
        inputs={"x": (2, 3, size, size)},
        notes=f"{notes}; official code {_source('SReT')}",
    )


def _fix_sret_grouping(official: types.ModuleType) -> None:
    """Replace ``torch.randperm`` in the official attention by the fixed eval-mode grouping.

    The official code gathers the tokens in a random order, splits them into G consecutive groups
    and scatters them back. With the order ``argsort(i mod G)`` (stable), group g holds the tokens
    ``i`` with ``i mod G == g`` in their original order: the grouping the parity README fixes.
    """
    attention = official.Group_Attention

    def forward(self: nn.Module, x: torch.Tensor, recursive_index: bool) -> torch.Tensor:
        groups = self.num_groups2 if recursive_index else 1
        if groups == 1:
            return original(self, x, recursive_index)
        order = torch.argsort(torch.arange(x.shape[1]) % groups, stable=True)
        randperm = official.torch.randperm
        official.torch.randperm = lambda n, *args, **kwargs: order
        try:
            return original(self, x, recursive_index)
        finally:
            official.torch.randperm = randperm

    original = attention.forward
    attention.forward = forward


def _rgt(root: Path, case: str, kwargs: Dict[str, Any], input_hw: List[int]) -> Dict[str, Any]:
    official = _load_rgt(root)
    notes = (
        "eval mode; input in [0,1]; output is the super-resolved image; the attention-mask buffers are "
        "computed for 64x64 (the official Block's default reso: img_size does not reach it)"
    )
    return dict(
        family="rgt",
        case=case,
        constructor="rgt_arch.RGT",
        kwargs=kwargs,
        model=official.RGT(**kwargs),
        inputs={"x": (1, 3, *input_hw)},
        uniform_inputs=True,
        notes=f"{notes}; official code {_source('RGT')}",
    )


class _TimmEncoder(nn.Module):
    """A timm ``features_only`` model giving the official ``reduction_2..5`` feature dict."""

    def __init__(self, name: str, out_indices: List[int], **kwargs: Any) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(
            name, features_only=True, out_indices=tuple(out_indices), pretrained=False, **kwargs
        )
        self.embed_dims = self.net.feature_info.channels()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {f"reduction_{level + 2}": feature for level, feature in enumerate(self.net(x))}


def _msrnet(root: Path, case: str, kwargs: Dict[str, Any], input_hw: List[int]) -> Dict[str, Any]:
    methods = root / "MSRNet" / "methods"
    layers = _load_from_package("_official_msrnet", methods, "MSRNet.layers")
    zoomnext = _load_from_package("_official_zoomnext", root / "ZoomNeXt" / "methods", "zoomnext.layers")
    layers.DifferenceAwareOps = zoomnext.DifferenceAwareOps
    msrnet = importlib.import_module("_official_msrnet.MSRNet.MSRNet")
    ops = importlib.import_module("_official_msrnet.MSRNet.ops")
    name, indices = kwargs["encoder"].split()[0].removeprefix("timm:"), kwargs["out_indices"]

    class TimmEncoderMSRNet(msrnet.PvtV2B2_MSRNet):
        def set_backbone(self, pretrained: bool, use_checkpoint: bool) -> None:
            self.encoder = _TimmEncoder(name, indices, **kwargs.get("encoder_kwargs", {}))

    mid_dim = kwargs["mid_dim"]
    model = TimmEncoderMSRNet(
        pretrained=False, mid_dim=mid_dim, siu_groups=kwargs["siu_groups"], hmu_groups=kwargs["hmu_groups"]
    )
    if mid_dim != 64:
        model.tra_1[1] = ops.ConvBNReLU(mid_dim, mid_dim, 3, 1, 1)
        model.predictor[1] = ops.ConvBNReLU(mid_dim, 32, 3, 1, 1)
    height, width = input_hw
    scales = kwargs["scales"]
    inputs = {key: (1, 3, round(height * s), round(width * s)) for key, s in scales.items()}
    notes = (
        "eval mode; inputs in [0,1]; PixelNormalizer applies ImageNet mean/std; output is mask logits. "
        "state_dict keys encoder.net.* are the timm features_only encoder; with mid_dim != 64, tra_1.1 and "
        "predictor.1 take mid_dim input channels (64 in the official class)"
    )
    return dict(
        family="msrnet",
        case=case,
        constructor="MSRNet.PvtV2B2_MSRNet (encoder replaced by timm pvt_v2)",
        kwargs={k: v for k, v in kwargs.items() if k != "out_indices"},
        model=model,
        inputs=inputs,
        uniform_inputs=True,
        forward=lambda m, x: m(x),
        notes=f"{notes}; official code {_source('MSRNet')} with ZoomNeXt {_source('ZoomNeXt')}",
    )


HORNET = dict(num_classes=10, gnconv_orders=[2, 3, 4, 5], gnconv_scale=1.0 / 3.0)
SRET = dict(image_size=48, depth=[2, 4, 2], recursive_num=[1, 2, 1], patch_size=16, stride=8, num_classes=10)
SRET_MLP = dict(mlp_ratio=3.6, np_mlp_ratio=1)
RGT = dict(in_chans=3, img_range=1.0, mlp_ratio=2, resi_connection="1conv", c_ratio=0.5, img_size=64)
MSRNET = dict(input_norm=True, scales={"image_s": 1.5, "image_m": 1.0, "image_l": 2.0})
PVT_V2 = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 2, 4, 8], mlp_ratios=[2, 2, 2, 2], depths=[1] * 4)

# Each case: its builder, the official constructor's arguments, and the builder's last argument (the input's
# height and width; for SReT whether the model slices).
CASES: Dict[str, Tuple[Callable[..., Dict[str, Any]], Dict[str, Any], Any]] = {
    "hornet_7x7_tiny": (
        _hornet,
        dict(depths=[1, 1, 2, 1], base_dim=4, global_filter=False, global_filter_hw=None, **HORNET),
        [48, 40],
    ),
    # Frequency weights stored for 224x224 inputs (14x8, 7x4), resized to the 48x40 input's 3x2 and 1x1.
    "hornet_gf_tiny": (
        _hornet,
        dict(depths=[1, 1, 2, 1], base_dim=4, global_filter=True, global_filter_hw=[[14, 8], [7, 4]], **HORNET),
        [48, 40],
    ),
    # Frequency weights stored at the input's own size: no resizing.
    "hornet_gf_native_tiny": (
        _hornet,
        dict(depths=[1, 1, 1, 1], base_dim=4, global_filter=True, global_filter_hw=[[3, 3], [1, 2]], **HORNET),
        [48, 64],
    ),
    # Recursive slicing in two stages, with a group count that is not a power of two.
    "sret_slices_tiny": (
        _sret,
        dict(base_dims=[4, 4, 4], heads=[2, 4, 8], groups1=[4, 3, 1], groups2=[2, 3, 1], **SRET_MLP, **SRET),
        True,
    ),
    "sret_wo_slice_tiny": (
        _sret,
        dict(base_dims=[8, 8, 8], heads=[1, 2, 4], mlp_ratio=3.0, np_mlp_ratio=2, **SRET),
        False,
    ),
    # Windows 2x4; blocks: plain L-SA, RG-SA, then shifted L-SA (masks). Width 64 is the narrowest
    # whose dynamic position bias is not a constant (its MLP is embed_dim/32 wide). The official blocks store their
    # masks for 64x64 whatever img_size says; inputs of another padded size get masks computed for them.
    "rgt_x2_tiny": (
        _rgt,
        dict(upscale=2, depth=[2, 1], embed_dim=64, num_heads=[2, 2], split_size=[2, 4], **RGT),
        [18, 23],
    ),
    # Two pixel-shuffle steps; square 2x2 windows; narrow (its position-bias MLP has width 0).
    "rgt_x4_tiny": (
        _rgt,
        dict(upscale=4, depth=[1, 1], embed_dim=16, num_heads=[4, 4], split_size=[2, 2], **RGT),
        [17, 19],
    ),
    # The official encoder family (PVTv2, timm's layout) at a narrow width, with the official group counts.
    "msrnet_pvt_v2_tiny": (
        _msrnet,
        dict(
            encoder="timm:pvt_v2_b0 features_only out_indices=(0,1,2,3)",
            encoder_kwargs=PVT_V2,
            out_indices=[0, 1, 2, 3],
            mid_dim=8,
            siu_groups=4,
            hmu_groups=6,
            **MSRNET,
        ),
        [32, 32],
    ),
}


def build_case(root: Path, case: str) -> Dict[str, Any]:
    """The official model of ``case`` with its inputs and notes (the authors' checkouts under ``root``)."""
    builder, kwargs, last = CASES[case]
    return builder(root, case, kwargs, last)


# ------------------------------------------------------------------------------ running and saving


def capture(spec: Mapping[str, Any], seed: int) -> Dict[str, Any]:
    """Randomize the official model of ``spec``, run it in eval mode and return the fixture dict."""
    generator = torch.Generator().manual_seed(seed)
    model = spec["model"].eval()
    randomize_(model, generator)
    inputs = {}
    for key, shape in spec["inputs"].items():
        if spec.get("uniform_inputs"):
            inputs[key] = _on_bfloat16_grid(torch.rand(shape, generator=generator)).clamp(0, 1)
        else:
            inputs[key] = _on_bfloat16_grid(torch.randn(shape, generator=generator))
    forward = spec.get("forward", lambda m, x: m(x["x"]))
    with torch.no_grad():
        output = forward(model, dict(inputs))
    return {
        "family": spec["family"],
        "case": spec["case"],
        "official": {"constructor": spec["constructor"], "kwargs": spec["kwargs"]},
        "state_dict": model.state_dict(),  # shared tensors (SReT) stay shared in the file
        "inputs": inputs,
        "output": output,
        "mode": "eval",
        "notes": spec["notes"],
    }


def save(fixture: Mapping[str, Any], path: Path) -> None:
    """``torch.save``, with the archive's records deflated (``torch.load`` reads them) and dated 1980.

    The weights lie on bfloat16's grid, so deflating halves the files; the fixed dates keep the
    bytes the same from one run to the next.
    """
    buffer = io.BytesIO()
    torch.save(dict(fixture), buffer)
    packed = io.BytesIO()
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(packed, "w") as target:
        for record in source.infolist():
            info = zipfile.ZipInfo(record.filename, date_time=(1980, 1, 1, 0, 0, 0))
            target.writestr(info, source.read(record), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(packed.getvalue())
    tmp.replace(path)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-root", type=Path, required=True, help="folder of the authors' checkouts")
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder (default: %(default)s)")
    parser.add_argument("cases", nargs="*", help=f"cases to write (default: all of {', '.join(CASES)})")
    args = parser.parse_args(argv)
    missing = [name for name in COMMITS if not (args.official_root / name).is_dir()]
    if missing:
        parser.exit(2, f"generate.py: {args.official_root} has no checkout of {', '.join(missing)}\n")
    if importlib.util.find_spec("einops") is None:
        parser.exit(2, "generate.py: the authors' code imports einops: pip install einops\n")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.exit(2, f"generate.py: unknown cases {unknown} (known: {', '.join(CASES)})\n")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")  # timm.models.layers etc.
    for case in CASES:
        if args.cases and case not in args.cases:
            continue
        fixture = capture(build_case(args.official_root, case), seed=zlib.crc32(case.encode()))  # a seed per case name
        path = args.out / fixture["family"] / f"{case}.pt"
        save(fixture, path)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
