"""Image files as they are: bit depth, orientation and colour modes converted explicitly, decompression
bombs refused from the header, and writes that are atomic and never clobber unless told."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from recurzoo.images import ImageError, collect_images, image_size, read_image, write_png

sys.path.insert(0, os.path.dirname(__file__))
from _hostile import png_header_only  # noqa: E402

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------- bit depth


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    samples = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(samples).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], samples >> 8)
    assert (image == 255).mean() < 0.01  # Pillow's convert('RGB') saturates ~99% of these to 255
    assert (np.asarray(Image.open(tmp_path / "deep.png").convert("RGB")) == 255).mean() > 0.9


def test_sixteen_bit_grey_and_colour_pngs_give_the_same_pixels(tmp_path):
    import cv2

    grey = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.repeat(grey[..., None], 3, axis=2))  # 16-bit colour PNG
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"), read_image(tmp_path / "rgb16.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png")[..., 1], grey >> 8)


def test_floating_point_and_32_bit_images_are_refused_not_guessed(tmp_path):
    Image.fromarray(RNG.random((4, 4), dtype=np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray(RNG.integers(0, 2**31, (4, 4), dtype=np.int32)).save(tmp_path / "int32.tiff")
    for name, mode in (("float.tiff", "'F'"), ("int32.tiff", "'I'")):
        with pytest.raises(ImageError, match=rf"{name}: images of mode {mode} .* not supported"):
            read_image(tmp_path / name)


# ----------------------------------------------------------------------------------- orientation, modes


@pytest.mark.parametrize(
    "orientation, turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1))]
)
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png"), turn(stored))


def test_grey_black_and_white_and_grey_alpha_are_replicated_to_rgb(tmp_path):
    grey = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(grey > 127).save(tmp_path / "bw.png")
    for name, expected in (("l.png", grey), ("la.png", grey), ("bw.png", np.where(grey > 127, 255, 0))):
        image = read_image(tmp_path / name)
        assert image.shape == (5, 6, 3)
        for channel in range(3):
            np.testing.assert_array_equal(image[..., channel], expected)


def test_palette_colours_are_looked_up(tmp_path):
    indices = RNG.integers(0, 3, (4, 5), dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    colours = [(200, 10, 30), (0, 90, 250), (17, 255, 0)]
    palette_image.putpalette([value for colour in colours for value in colour])
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), np.array(colours, dtype=np.uint8)[indices])


def test_alpha_is_dropped_keeping_the_stored_colours(tmp_path):
    rgba = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a transparent pixel keeps its colour, not black or white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])


def test_cmyk_is_converted_to_rgb(tmp_path):
    cmyk = np.array([[[0, 255, 255, 0], [255, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tiff")
    expected = [[[255, 0, 0], [0, 255, 0], [0, 0, 0], [255, 255, 255]]]
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tiff"), np.array(expected, dtype=np.uint8))


def test_the_array_is_writable(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    image[0, 0] = 1  # datasets augment in place
    assert image.flags.writeable


# ----------------------------------------------------------------------------------------- bad files


def test_broken_files_are_one_line_errors_naming_them(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("truncated.png", "text.png", "empty.jpg"):
        with pytest.raises(ImageError, match=rf"cannot read .*{name} as an image") as caught:
            read_image(tmp_path / name)
        assert "\n" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.png"):
        read_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    for read in (read_image, image_size):
        with pytest.raises(ImageError, match=r"bomb.png: its header claims 100000 x 100000 pixels .*--max-pixels"):
            read(bomb)
    assert time.perf_counter() - start < 1.0  # nothing decoded
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's own setting is restored


def test_max_pixels_lowers_and_raises_the_limit(tmp_path, monkeypatch):
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"8 x 8 pixels \(64\), more than the limit of 63 pixels"):
        read_image(tmp_path / "small.png", max_pixels=63)
    assert read_image(tmp_path / "small.png", max_pixels=64).shape == (8, 8, 3)
    # By default the limit is Pillow's (twice MAX_IMAGE_PIXELS); a higher max_pixels lifts Pillow's own check.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageError, match="more than the limit of 20 pixels"):
        read_image(tmp_path / "small.png")
    assert read_image(tmp_path / "small.png", max_pixels=100).shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 10


def test_image_size_applies_opencvs_limit_for_opencv_readers(tmp_path, monkeypatch):
    import cv2

    bomb = png_header_only(tmp_path / "bomb.png", 40_000, 30_000)  # 1.2e9 pixels, above OpenCV's 2**30
    with pytest.raises(cv2.error):
        cv2.imread(str(bomb))  # what a dataset would get without the check: a traceback
    with pytest.raises(ImageError, match="OpenCV refuses it.*OPENCV_IO_MAX_IMAGE_PIXELS"):
        image_size(bomb, max_pixels=2 * 10**9, reader="opencv")
    assert image_size(bomb, max_pixels=2 * 10**9) == (30_000, 40_000)  # Pillow's reader could take it
    Image.fromarray(np.zeros((20, 10, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ImageError, match="10 x 20 pixels"):
        image_size(tmp_path / "small.png", reader="opencv")
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS")
    assert image_size(tmp_path / "small.png", reader="opencv") == (20, 10)


def test_folder_without_images_is_an_image_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageError, match="no PNG/JPG/JPEG images in folder"):
        collect_images([tmp_path])


# ---------------------------------------------------------------------------------------------- writing


def test_write_png_refuses_to_replace_a_file_unless_told(tmp_path):
    first, second = np.zeros((2, 2, 3), dtype=np.uint8), np.full((2, 2, 3), 9, dtype=np.uint8)
    write_png(tmp_path / "out.png", first, overwrite=False)
    with pytest.raises(FileExistsError):
        write_png(tmp_path / "out.png", second, overwrite=False)
    np.testing.assert_array_equal(read_image(tmp_path / "out.png"), first)
    write_png(tmp_path / "out.png", second, overwrite=True)
    np.testing.assert_array_equal(read_image(tmp_path / "out.png"), second)
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temporary file left


def test_a_failed_write_leaves_no_file_and_no_empty_folder(tmp_path):
    with pytest.raises(TypeError):
        write_png(tmp_path / "new" / "deeper" / "out.png", np.zeros((2, 2, 3), dtype=object))
    assert os.listdir(tmp_path) == []


def test_files_are_created_with_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_png(tmp_path / "out.png", np.zeros((2, 2, 3), dtype=np.uint8))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
