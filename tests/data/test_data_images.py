"""Images as they come: odd modes, sideways phone photos, wrong extensions, empty files, bombs.

Each loads as upright 8-bit RGB with the right colours, or fails as a one-line per-sample
:class:`ImageError` naming the entry and the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer_cli.data import ImageError, Sample, load_image
from qformer_cli.data import sample as sample_module

RED, BLUE = (255, 0, 0), (0, 0, 255)


def load(path: Path) -> Image.Image:
    return load_image(Sample(image=path, image_id=0, origin="train.json: entry 0"))


def refused(path: Path) -> str:
    with pytest.raises(ImageError) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("train.json: entry 0: ")
    assert str(path) in message
    return message


def test_zero_byte_file(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "unreadable image" in refused(tmp_path / "empty.jpg")


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("P", None, (10, 20, 30)),  # a palette entry holding (10, 20, 30)
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # no cyan, full magenta + yellow: red
    ],
)
def test_image_modes_become_rgb(tmp_path: Path, mode: str, value, expected):
    if mode == "P":
        image = Image.new("P", (8, 8), 3)
        image.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    else:
        image = Image.new(mode, (8, 8), value)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path, quality=100) if mode == "CMYK" else image.save(path)
    loaded = load(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)
    got = loaded.getpixel((4, 4))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected, strict=True)), got  # JPEG rounding


def test_16_bit_greyscale_keeps_its_brightness(tmp_path: Path):
    levels = np.array([[0, 0x4000, 0x8000, 0xFFFF]], dtype=np.uint16)  # black .. white
    Image.fromarray(levels).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    loaded = load(tmp_path / "scan.png")
    # the top 8 bits of each 16-bit level, not values clipped at 255
    assert [loaded.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (64, 64, 64),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path: Path):
    # Stored 40 wide x 20 high, left half red, right half blue, with EXIF orientation 6
    # ("rotate 90 degrees clockwise to display"): upright it is 20 wide x 40 high, red on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = load(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 240 and top[2] < 15 and bottom[2] > 240 and bottom[0] < 15


def test_png_bytes_named_jpg_load(tmp_path: Path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert load(tmp_path / "really_a_png.jpg").getpixel((0, 0)) == RED


@pytest.mark.parametrize("side", [9_000, 14_000])  # over the limit; over twice it (PIL refuses)
def test_decompression_bomb_is_a_per_sample_error_not_a_warning(
    tmp_path: Path, side: int, monkeypatch: pytest.MonkeyPatch
):
    # a lower limit than the default (256 MP), so that the test's bombs fit in memory
    monkeypatch.setattr(sample_module, "MAX_IMAGE_PIXELS", 64_000_000)
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few kB on disk, side^2 pixels decoded
    assert path.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        message = refused(path)
    assert f"image {path} too large" in message


def test_the_pixel_limit_is_one_constant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    monkeypatch.setattr(sample_module, "MAX_IMAGE_PIXELS", 99)
    assert "too large (100 pixels; the limit is data.max_image_pixels=99)" in refused(
        tmp_path / "small.png"
    )


def test_a_108_megapixel_photo_is_decoded_reduced_and_upright(tmp_path: Path):
    """12000 x 9000 (a phone's 108 MP mode), stored sideways: decoded at a fraction of the
    size (JPEG draft mode), still upright, the shorter side never under 2048."""
    stored = Image.new("RGB", (12000, 9000), BLUE)
    stored.paste(RED, (0, 0, 6000, 9000))  # left half red: after the EXIF turn, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "PXL_108mp.jpg", exif=exif, quality=80)
    for name, image in (("jpg", load(tmp_path / "PXL_108mp.jpg")),):
        assert image.size == (2250, 3000), name  # 1/4 scale, turned upright
        top, bottom = image.getpixel((1000, 500)), image.getpixel((1000, 2500))
        assert top[0] > 240 and top[2] < 15 and bottom[2] > 240 and bottom[0] < 15
    stored.resize((6000, 4500)).save(tmp_path / "wide.png")  # no draft mode: reduced after
    assert load(tmp_path / "wide.png").size == (3000, 2250)
    Image.new("RGB", (4000, 3000)).save(tmp_path / "12mp.png")  # an ordinary photo: as it is
    assert load(tmp_path / "12mp.png").size == (4000, 3000)
