"""Image decoding with limits checked before any pixel is decompressed."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from deepgen_common.errors import ImageError
from deepgen_common.types import ImageFormat

_PILLOW_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # the modes a 16-bit grayscale PNG opens in


def decode_image(data: bytes, declared: ImageFormat, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode PNG / JPEG / WebP bytes to an RGB image.

    The header is read first and the image rejected when it is larger than `max_pixels`, so a small
    file that expands to gigabytes (a decompression bomb) is never decompressed.

    Raises:
        ImageError: empty, oversized, undecodable, truncated, or not the declared format.
    """
    image = _open(data, declared, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{image.format} image is corrupt or truncated: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image of any mode, with the range of 16-bit samples kept.

    Pillow's `convert("RGB")` clips samples above 255, which turns a 16-bit grayscale PNG (mode I;16,
    or I in older Pillow) white; its samples are scaled from 0..65535 onto 0..255 first. 16-bit RGB
    and RGBA PNGs already open as 8-bit RGB / RGBA (Pillow keeps the high byte).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        image = image.convert("I").point(lambda v: v * (255 / 65535)).convert("L")
    return image.convert("RGB")


def inspect_image(data: bytes, declared: ImageFormat, *, max_bytes: int, max_pixels: int) -> str:
    """Check an image that is passed on rather than used here (e.g. to a judge model) without
    decoding its pixels: the same limits as `decode_image`, plus Pillow's structural check (PNG
    chunk CRCs and completeness). Returns its MIME type.

    Raises:
        ImageError: as `decode_image`.
    """
    image = _open(data, declared, max_bytes=max_bytes, max_pixels=max_pixels)
    kind = image.format or "PNG"
    try:
        image.verify()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{kind} image is corrupt or truncated: {exc}") from None
    return Image.MIME.get(kind, "application/octet-stream")


def pass_on_image(data: bytes, declared: ImageFormat, *, max_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    """The bytes and MIME type to pass an image on to a model that decodes it itself (a judge): checked
    as by `inspect_image`, and unchanged unless it is a 16-bit grayscale PNG, which Pillow-based
    decoders clip to white; that one is decoded and sent as an 8-bit PNG with its range kept.

    Raises:
        ImageError: as `decode_image`.
    """
    mime = inspect_image(data, declared, max_bytes=max_bytes, max_pixels=max_pixels)
    if _open(data, declared, max_bytes=max_bytes, max_pixels=max_pixels).mode not in _SIXTEEN_BIT:
        return data, mime
    buffer = io.BytesIO()
    decode_image(data, declared, max_bytes=max_bytes, max_pixels=max_pixels).save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _open(data: bytes, declared: ImageFormat, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the byte and pixel limits."""
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    allowed = list(_PILLOW_FORMATS.values()) if declared is ImageFormat.UNSPECIFIED else [_PILLOW_FORMATS[declared]]
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its global limit; ours below is the real one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=allowed)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is over the limit of {max_pixels} pixels (MAX_IMAGE_PIXELS): {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(f"bytes are not a decodable {' / '.join(allowed)} image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)"
        )
    return image
