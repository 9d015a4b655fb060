"""Image decoding and its limits, on real encoded images."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from deepgen_common.errors import ImageError
from deepgen_common.images import decode_image, inspect_image
from deepgen_common.types import ImageFormat
from tests.helpers import png_bomb

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 4096 * 4096}


def encode(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "white" if mode != "L" else 255).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "declared"),
    [
        ("PNG", ImageFormat.PNG),
        ("JPEG", ImageFormat.JPEG),
        ("WEBP", ImageFormat.WEBP),
        ("PNG", ImageFormat.UNSPECIFIED),
    ],
)
def test_decodes_supported_formats_to_rgb(fmt: str, declared: ImageFormat):
    image = decode_image(encode(fmt), declared, **LIMITS)
    assert image.size == (64, 48)
    assert image.mode == "RGB"


def test_grayscale_and_alpha_become_rgb():
    assert decode_image(encode("PNG", mode="L"), ImageFormat.PNG, **LIMITS).mode == "RGB"
    assert decode_image(encode("PNG", mode="RGBA"), ImageFormat.PNG, **LIMITS).mode == "RGB"


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", ImageFormat.PNG, **LIMITS)


def test_non_image_bytes():
    with pytest.raises(ImageError, match="not a decodable PNG / JPEG / WEBP image"):
        decode_image(b"%PDF-1.7 definitely not an image", ImageFormat.UNSPECIFIED, **LIMITS)


def test_declared_format_must_match():
    with pytest.raises(ImageError, match="not a decodable JPEG image"):
        decode_image(encode("PNG"), ImageFormat.JPEG, **LIMITS)


def test_truncated_png():
    image = Image.effect_noise((256, 256), 64).convert("RGB")  # noise does not compress: many IDAT bytes
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], ImageFormat.PNG, **LIMITS)


def test_over_byte_limit():
    with pytest.raises(ImageError, match=r"over the limit of 100 bytes \(MAX_IMAGE_BYTES\)"):
        decode_image(encode("PNG"), ImageFormat.PNG, max_bytes=100, max_pixels=1 << 30)


def test_decompression_bomb_rejected_from_header():
    bomb = png_bomb(20000, 20000)  # ~400 KB that would decode to 400 MB
    assert len(bomb) < LIMITS["max_bytes"]
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        decode_image(bomb, ImageFormat.PNG, **LIMITS)


def test_pixel_limit_below_pillows_own():
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels, over the limit of 1000"):
        decode_image(encode("PNG"), ImageFormat.PNG, max_bytes=1 << 20, max_pixels=1000)


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_inspect_checks_without_decoding_and_names_the_mime_type(fmt: str, mime: str):
    assert inspect_image(encode(fmt), ImageFormat.UNSPECIFIED, **LIMITS) == mime


def test_inspect_applies_the_same_limits_and_catches_truncation():
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        inspect_image(png_bomb(20000, 20000), ImageFormat.PNG, **LIMITS)
    with pytest.raises(ImageError, match="not a decodable"):
        inspect_image(b"junk", ImageFormat.UNSPECIFIED, **LIMITS)
    noise = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(noise, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        inspect_image(noise.getvalue()[:-2000], ImageFormat.PNG, **LIMITS)
