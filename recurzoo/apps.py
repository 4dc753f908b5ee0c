"""The zoo's applications on image files: super-resolution (``recurzoo sr``) and the demo.

Models, heads and training live below this module; it reads and writes the user's files through
:mod:`recurzoo.images` and loads checkpoints through :mod:`recurzoo.checkpoint`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from recurzoo.heads.super_resolution import SuperResolutionModel, super_resolve_image
from recurzoo.images import collect_images, read_image, sample_photo, write_png
from recurzoo.registry import create_model, list_models

__all__ = ["load_sr_model", "super_resolve_files", "super_resolve_demo", "run_demo"]


def load_sr_model(
    model: str, checkpoint: Optional[str] = None, device: Optional[str] = None, **kwargs: Any
) -> SuperResolutionModel:
    """The super-resolution model ``model`` in eval mode, with the weights of ``checkpoint`` when given.

    ``checkpoint`` may be an official BasicSR file (``params``/``params_ema``) or one of ours; it is
    read and converted by :mod:`recurzoo.checkpoint` (one-line errors).
    """
    from recurzoo.registry import model_task

    if model_task(model) != "sr":
        known = ", ".join(list_models(task="sr"))
        raise ValueError(f"{model} is not a super-resolution model (the zoo's: {known})")
    net = create_model(model, checkpoint_path=checkpoint, **kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(device).eval()


def super_resolve_files(
    inputs: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    model: str = "rgt_small_x4",
    checkpoint: Optional[str] = None,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    device: Optional[str] = None,
    progress: bool = True,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> List[Path]:
    """Super-resolve PNG/JPEG files (or folders of them) into ``out_dir/<name>.png``.

    Every input is checked (exists, decodes) before the model is built. Raises ``FileNotFoundError``
    or ``ValueError`` with a one-line message for the user's mistakes.
    """
    from tqdm import tqdm

    files = collect_images(inputs)
    if tile is not None and (tile < 1 or not 0 <= tile_overlap < tile):
        raise ValueError(f"--tile must be positive and larger than --tile-overlap, received {tile} and {tile_overlap}")
    targets: Dict[Path, Path] = {}
    for path in files:
        read_image(path)  # fail early on an unreadable image
        target = Path(out_dir) / f"{path.stem}.png"
        if target in targets.values():
            raise ValueError(f"two inputs would both be written to {target}")
        targets[path] = target
    net = load_sr_model(model, checkpoint, device, **(model_kwargs or {}))
    written = []
    for path in tqdm(files, desc=f"{model} x{net.upscale}", unit="image", disable=not progress):
        write_png(targets[path], super_resolve_image(net, read_image(path), tile, tile_overlap, progress=progress))
        written.append(targets[path])
    return written


def super_resolve_demo(
    out_dir: Optional[Union[str, Path]] = None,
    model: str = "rgt_small_x4",
    checkpoint: Optional[str] = None,
    side: int = 64,
    tile: Optional[int] = None,
    device: Optional[str] = None,
    **model_kwargs: Any,
) -> Dict[str, Any]:
    """Super-resolve a bundled photograph (scikit-image's Chelsea the cat, public domain).

    The photo is centre-cropped, reduced to ``side x side`` with bicubic interpolation and
    super-resolved by ``model`` (random weights unless ``checkpoint``: then the output is noise,
    which the returned dict says). Returns shapes, timing and, when ``out_dir`` is given, the paths
    of the low-resolution input, the bicubic upscaling and the model's output (PNGs). Nothing is
    downloaded.
    """
    from PIL import Image

    net = load_sr_model(model, checkpoint, device, **model_kwargs)
    low_res = sample_photo((side, side), square=True)
    start = time.perf_counter()
    output = super_resolve_image(net, low_res, tile=tile)
    seconds = time.perf_counter() - start
    bicubic = np.asarray(Image.fromarray(low_res).resize(output.shape[1::-1], Image.BICUBIC))
    result: Dict[str, Any] = dict(
        model=model,
        scale=net.upscale,
        input_shape=low_res.shape,
        output_shape=output.shape,
        seconds=seconds,
        pretrained=checkpoint is not None,
    )
    if out_dir is not None:
        out = Path(out_dir)
        paths = dict(
            low_res=out / "chelsea_lr.png",
            bicubic=out / f"chelsea_bicubic_x{net.upscale}.png",
            output=out / f"chelsea_{model}.png",
        )
        for key, image in (("low_res", low_res), ("bicubic", bicubic), ("output", output)):
            write_png(paths[key], image)
        result["paths"] = {key: str(path) for key, path in paths.items()}
    return result


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------

ZOO_FIGURES = Path(__file__).resolve().parent / "assets" / "zoo.csv"


def zoo_figures(path: Path = ZOO_FIGURES) -> List[Dict[str, str]]:
    """The committed parameter and FLOP counts of every zoo model (written by ``make cards``, checked by the tests)."""
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_demo(pattern: str = "*", out_dir: Optional[Union[str, Path]] = None, echo=print) -> Dict[str, Any]:
    """The zoo's table, one forward pass per family, a super-resolution and an ONNX export.

    The table is the committed, test-checked figures of the model cards (nothing is counted). Each
    family's smallest model runs once on the sample photo, with random weights; the super-resolved
    pictures go to ``out_dir`` (a temporary folder when None, removed afterwards). Nothing is downloaded.
    """
    import tempfile

    figures = [row for row in zoo_figures() if row["model"] in set(list_models(pattern))]
    if not figures:
        raise ValueError(f"no model of recurzoo matches {pattern!r}")
    echo("Params and fvcore GFLOPs as in the model cards (classifiers with 1000 classes):")
    echo(f"{'model':<28} {'input':>10} {'params (M)':>11} {'GFLOPs':>8}  feature strides")
    for row in figures:
        echo(f"{row['model']:<28} {row['input_size']:>10} {row['params_m']:>11} {row['gflops']:>8}  {row['strides']}")

    echo("\nOne forward pass of each family's smallest model on the sample photo (random weights, nothing downloaded):")
    results: Dict[str, Any] = {"families": {}}
    for family in dict.fromkeys(row["family"] for row in figures):
        members = [row for row in figures if row["family"] == family]
        smallest = min(members, key=lambda row: float(row["params_m"]))
        results["families"][family] = _demo_forward(smallest, echo)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(out_dir) if out_dir is not None else Path(temporary)
        results["sr"] = super_resolve_demo(folder, model="rgt_small_x4", side=48)
        where = f"PNGs in {folder}/" if out_dir is not None else "pass --out DIR to keep the PNGs"
        echo(
            f"\nSuper-resolution of the sample photo with rgt_small_x4 (random weights; pass a checkpoint to "
            f"`recurzoo sr` for real output): {tuple(results['sr']['input_shape'])} -> "
            f"{tuple(results['sr']['output_shape'])} in {results['sr']['seconds']:.1f} s, {where}"
        )
        results["export"] = _demo_export("sret_tiny", Path(temporary) / "onnx", echo)
    return results


def _demo_export(name: str, folder: Path, echo) -> Any:
    """Export one model to ONNX (checked in onnxruntime) in ``folder`` and print its parity line."""
    from recurzoo.export.onnx import export_model

    echo(f"\nONNX export of {name} (recurzoo export {name} --out DIR keeps the files and writes the FLOP report):")
    result = export_model(name, out_dir=folder, dynamic="batch", report=False)
    echo("  " + result.parity_line())
    return result


def _demo_forward(row: Dict[str, str], echo) -> Dict[str, Any]:
    name = row["model"]
    model = create_model(name).eval()
    channels, height, width = (int(s) for s in row["input_size"].split("x"))
    photo = torch.from_numpy(sample_photo((height, width))).permute(2, 0, 1)[None].float().div(255)
    cfg = model.pretrained_cfg
    image = (photo - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    start = time.perf_counter()
    with torch.no_grad():
        output = model(image)
    elapsed = (time.perf_counter() - start) * 1000
    echo(
        f"  {row['family']:<14} {name:<28} input {tuple(image.shape)} -> output {tuple(output.shape)} "
        f"in {elapsed:.0f} ms"
    )
    return {"model": name, "output_shape": tuple(output.shape), "ms": elapsed}
