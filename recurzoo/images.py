"""Image files in and out, in one place: what every command, dataset and exporter reads and writes.

:func:`read_image` decodes a file into an ``(H, W, 3)`` uint8 RGB array, :func:`write_png` writes
one atomically, :func:`collect_images` expands folders, and :func:`sample_photo` gives the
public-domain photograph that the demo, the exporters' parity checks and the benchmarks use when
no image is given (scikit-image's Chelsea the cat; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "read_image",
    "write_png",
    "collect_images",
    "sample_photo",
    "normalized_photo_batch",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PathLike = Union[str, Path]


def read_image(path: PathLike) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 RGB array (grey and RGBA images are converted).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file that does not decode as an image (one line naming it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {path} as an image ({type(error).__name__}: {error})") from None


def write_png(path: PathLike, image: np.ndarray) -> Path:
    """Write an ``(H, W, C)`` uint8 array as a PNG, atomically (folders are created)."""
    from PIL import Image

    from recurzoo.checkpoint import atomic_write

    return atomic_write(path, lambda temporary: Image.fromarray(image).save(temporary, format="PNG"))


def collect_images(inputs: Iterable[PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> List[Path]:
    """Image files among ``inputs``, folders expanded (sorted, not recursive).

    Raises:
        FileNotFoundError: for an input that does not exist.
        ValueError: for a folder without images.
    """
    files: List[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ValueError(f"no {'/'.join(s.lstrip('.').upper() for s in suffixes)} images in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def sample_photo(size: Optional[Tuple[int, int]] = None, square: bool = False) -> np.ndarray:
    """scikit-image's photograph of Chelsea the cat (public domain) as ``(H, W, 3)`` uint8.

    ``square`` crops the centre square first; ``size`` = ``(height, width)`` resizes (bicubic).
    """
    from PIL import Image
    from skimage import data

    photo = data.chelsea()
    if square:
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        photo = photo[top : top + side, left : left + side]
    if size is not None:
        photo = np.asarray(Image.fromarray(photo).resize((size[1], size[0]), Image.BICUBIC))
    return np.ascontiguousarray(photo)


def normalized_photo_batch(
    batch: int,
    height: int,
    width: int,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: int = 3,
):
    """:func:`sample_photo` as a float ``(batch, channels, height, width)`` tensor in [0, 1], normalised
    with ``mean``/``std`` when given (antialiased bilinear resize; colour channels repeated or
    dropped to make ``channels``)."""
    import math

    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(sample_photo()).permute(2, 0, 1).float().div(255)
    image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    image = image.repeat(1, math.ceil(channels / 3), 1, 1)[:, :channels]
    if mean is not None and std is not None:
        image = (image - torch.tensor(mean)[:channels].view(1, -1, 1, 1)) / torch.tensor(std)[:channels].view(
            1, -1, 1, 1
        )
    return image.expand(batch, -1, -1, -1).contiguous()
