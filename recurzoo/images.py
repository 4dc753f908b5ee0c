"""Image files in and out, in one place: what every command, dataset and exporter reads and writes.

:func:`read_image` decodes a file into an ``(H, W, 3)`` uint8 RGB array (:func:`open_image` gives
the same image as a PIL image, for torchvision transforms), as the file means it to be seen:

- the EXIF orientation is applied (a phone photo stored sideways comes out upright);
- 16-bit samples (16-bit and high-dynamic-range PNGs, 16-bit TIFFs) are reduced to 8 bits by their
  high byte, as Pillow does for 16-bit colour PNGs: 0..65535 becomes 0..255, nothing is clipped;
- grey, black-and-white, palette, CMYK and YCbCr images are converted to RGB (grey replicated,
  palette colours looked up, CMYK by Pillow's formula without a colour profile); an alpha channel
  is dropped, keeping the stored colours (as OpenCV's ``IMREAD_COLOR`` does);
- other modes (32-bit integer or floating-point samples, Lab) are refused with a one-line
  :class:`ImageError`, never guessed.

A file's header is checked before anything is decoded: an image that claims more pixels than
``max_pixels`` (by default Pillow's own decompression-bomb limit) is refused with an
:class:`ImageError` naming the file and its claimed size. :func:`image_size` makes the same check
from the header alone, for readers that decode with OpenCV (whose own limit,
``OPENCV_IO_MAX_IMAGE_PIXELS``, raises a ``cv2.error`` instead).

:func:`write_png` writes atomically and, unless told to overwrite, never replaces an existing file;
:func:`collect_images` expands folders; :func:`sample_photo` gives the public-domain photograph that
the demo, the exporters' parity checks and the benchmarks use when no image is given (scikit-image's
Chelsea the cat; nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageError",
    "default_max_pixels",
    "opencv_pixel_limit",
    "image_size",
    "open_image",
    "read_image",
    "write_png",
    "collect_images",
    "sample_photo",
    "normalized_photo_batch",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PathLike = Union[str, Path]

_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_CONVERTED_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
_OPENCV_DEFAULT_PIXELS = 1 << 30  # OpenCV's CV_IO_MAX_IMAGE_PIXELS when the variable is not set
_OPENCV_DEFAULT_SIDE = 1 << 20  # OpenCV's CV_IO_MAX_IMAGE_WIDTH / _HEIGHT
# Errors Pillow raises for a file that is not a (complete, valid) image.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
# Pillow's decompression-bomb limit is one process-wide setting; it is lifted under this lock only.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """An image file or folder that cannot be used: not decodable, too large, of an unsupported mode,
    or a folder without images. The message is one line and names the file."""


def default_max_pixels() -> Optional[int]:
    """The pixel limit of :func:`read_image` when none is given: the size at which Pillow itself refuses
    an image (twice ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels); None when that is disabled."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def opencv_pixel_limit() -> Tuple[int, int, int]:
    """OpenCV's own limits on what ``cv2.imread`` decodes: ``(pixels, width, height)``, from the
    ``OPENCV_IO_MAX_IMAGE_PIXELS``/``_WIDTH``/``_HEIGHT`` environment variables or their defaults."""

    def read(name: str, default: int) -> int:
        text = os.environ.get(name, "").strip()
        return int(text) if text.isdigit() else default

    return (
        read("OPENCV_IO_MAX_IMAGE_PIXELS", _OPENCV_DEFAULT_PIXELS),
        read("OPENCV_IO_MAX_IMAGE_WIDTH", _OPENCV_DEFAULT_SIDE),
        read("OPENCV_IO_MAX_IMAGE_HEIGHT", _OPENCV_DEFAULT_SIDE),
    )


@contextlib.contextmanager
def _pil_limit_lifted() -> Iterator[None]:
    """Pillow's own size check off, while this module applies its own (``max_pixels``)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _resolve_limit(max_pixels: Optional[int]) -> Optional[int]:
    if max_pixels is None:
        return default_max_pixels()
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, received {max_pixels!r}")
    return max_pixels


def _open_header(path: PathLike) -> "PILImage.Image":
    """The file opened by Pillow (header read, nothing decoded), with Pillow's size check off."""
    from PIL import Image

    try:
        with _pil_limit_lifted():
            return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except (PermissionError, IsADirectoryError):
        raise
    except _DECODE_ERRORS as error:
        raise ImageError(f"cannot read {path} as an image ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _too_large(path: PathLike, width: int, height: int, limit: int, remedy: str) -> ImageError:
    return ImageError(
        f"{path}: its header claims {width} x {height} pixels ({width * height:,}), more than the limit of "
        f"{limit:,} pixels (a decompression bomb?); {remedy}"
    )


def _check_size(path: PathLike, size: Tuple[int, int], limit: Optional[int]) -> None:
    width, height = size
    if limit is not None and width * height > limit:
        raise _too_large(path, width, height, limit, "if the image is genuine, raise the limit with --max-pixels")


def image_size(path: PathLike, max_pixels: Optional[int] = None, reader: str = "pillow") -> Tuple[int, int]:
    """``(height, width)`` from an image file's header, after the size check of :func:`read_image`.

    Nothing is decoded, so this is what a dataset calls before it decodes a file itself.
    ``reader='opencv'`` also applies OpenCV's own limits (:func:`opencv_pixel_limit`), above which
    ``cv2.imread`` raises a ``cv2.error``: the message then names the variable that raises them.

    Raises:
        FileNotFoundError: for a missing file.
        ImageError: for a file that is not an image, or one larger than the limit (one line).
    """
    if reader not in ("pillow", "opencv"):
        raise ValueError(f"image_size: reader must be 'pillow' or 'opencv', received {reader!r}")
    with _open_header(path) as image:
        size = image.size
    _check_size(path, size, _resolve_limit(max_pixels))
    if reader == "opencv":
        pixels, max_width, max_height = opencv_pixel_limit()
        width, height = size
        if width * height > pixels or width > max_width or height > max_height:
            raise _too_large(
                path,
                width,
                height,
                pixels,
                f"OpenCV refuses it (at most {max_width} x {max_height} and {pixels:,} pixels): raise "
                "OPENCV_IO_MAX_IMAGE_PIXELS (and _WIDTH/_HEIGHT) in the environment if the image is genuine",
            )
    return size[1], size[0]


def open_image(path: PathLike, max_pixels: Optional[int] = None) -> "PILImage.Image":
    """An image file as an 8-bit RGB PIL image, upright (see the module's description for each mode).

    Args:
        path: the file (any format Pillow reads; the suffix is not trusted).
        max_pixels: refuse an image whose header claims more pixels (default :func:`default_max_pixels`).

    Raises:
        FileNotFoundError: for a missing file (PermissionError, IsADirectoryError as the system says).
        ImageError: for a file that is not a complete image, is too large, or has an unsupported mode.
    """
    from PIL import Image

    limit = _resolve_limit(max_pixels)
    pil_limit = default_max_pixels()
    beyond_pillow = pil_limit is not None and (limit is None or limit > pil_limit)
    with _open_header(path) as image:
        _check_size(path, image.size, limit)
        file_format = image.format
        try:
            # Some formats check their size again while decoding: lifted too when the caller's limit is higher.
            with _pil_limit_lifted() if beyond_pillow else contextlib.nullcontext():
                image.load()
                upright = _upright(image)
        except Image.DecompressionBombError as error:
            raise ImageError(f"cannot read {path}: Pillow refuses it ({_reason(error)})") from None
        except _DECODE_ERRORS as error:
            raise ImageError(f"cannot read {path} as an image ({_reason(error)})") from None
    return _to_rgb(upright, file_format, path)


def _upright(image: "PILImage.Image") -> "PILImage.Image":
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) or image


def _to_rgb(image: "PILImage.Image", file_format: Optional[str], path: PathLike) -> "PILImage.Image":
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY or (mode == "I" and file_format == "PNG"):  # PNG's 16-bit grey opens as "I"
        samples = np.asarray(image).astype(np.uint16)  # native byte order, 0..65535
        return Image.fromarray((samples >> 8).astype(np.uint8)).convert("RGB")
    if mode in ("LA", "La"):
        return image.getchannel("L").convert("RGB")  # alpha dropped
    if mode in _CONVERTED_MODES or mode in ("RGBA", "RGBa", "RGBX", "PA"):  # Pillow drops alpha, keeps colours
        return image.convert("RGB")
    raise ImageError(
        f"{path}: images of mode {mode!r} ({file_format or 'unknown format'}) are not supported: "
        "expected 8- or 16-bit grey, RGB, RGBA, palette, CMYK or YCbCr samples"
    )


def read_image(path: PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 RGB array: :func:`open_image` as an array."""
    return np.array(open_image(path, max_pixels))  # writable, as callers may modify it in place


def write_png(path: PathLike, image: np.ndarray, overwrite: bool = True) -> Path:
    """Write an ``(H, W, C)`` uint8 array as a PNG, atomically (folders are created).

    With ``overwrite=False`` an existing file is never replaced (``FileExistsError``).
    """
    from PIL import Image

    from recurzoo.checkpoint import atomic_write

    return atomic_write(
        path, lambda temporary: Image.fromarray(image).save(temporary, format="PNG"), overwrite=overwrite
    )


def collect_images(inputs: Iterable[PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> List[Path]:
    """Image files among ``inputs``, folders expanded (sorted, not recursive).

    Files are taken by their suffix (case-insensitive); whether they decode is for the reader to find.

    Raises:
        FileNotFoundError: for an input that does not exist.
        ImageError: for a folder without images.
    """
    files: List[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ImageError(f"no {'/'.join(s.lstrip('.').upper() for s in suffixes)} images in folder {path}")
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
        photo = np.array(Image.fromarray(photo).resize((size[1], size[0]), Image.BICUBIC))
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
