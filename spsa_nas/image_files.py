"""Image files a user sends (PNG or JPEG): decoded with Pillow under size limits, with errors that say
what is wrong; no torch, so the API can check an upload before anything heavy starts."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 25_000_000  # decoded size refused beyond this (decompression bombs)
MAX_IMAGE_BYTES = 20 * 2**20
IMAGE_FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """An image that cannot be used (unreadable, not PNG/JPEG, too large): the message says which."""


def open_image(raw: bytes, *, decode: bool = True) -> Image.Image:
    """`raw` as a Pillow image, decoded (`decode`), or only checked without decoding its pixels
    (header, size, and PNG's chunk checksums: cheap, for a server to refuse a bad upload early);
    ImageError when it is too large, not a PNG or JPEG, or does not decode."""
    if len(raw) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image has {len(raw)} bytes; at most {MAX_IMAGE_BYTES} are accepted")
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in IMAGE_FORMATS:
            raise ImageError(f"the image is {image.format or 'of an unknown format'}; send a PNG or JPEG")
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} are accepted")
        if decode:
            image.load()
        else:
            image.verify()  # the image cannot be used after this: the caller only wanted the check
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the image cannot be read as PNG or JPEG: no image format found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the image cannot be read as PNG or JPEG: {exc}") from None
    return image


__all__ = ["IMAGE_FORMATS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "ImageError", "open_image"]
