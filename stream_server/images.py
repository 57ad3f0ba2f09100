"""Start images sent by clients: base64 or raw PNG/JPEG bytes -> ``(H, W, 3)`` uint8 RGB, checked."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

_DATA_URL = re.compile(r"^data:image/[a-z]+;base64,", re.IGNORECASE)
ALLOWED_FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """An unusable image; ``status`` is the HTTP status to answer with (400, 413 or 415)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def decode_base64(text: str) -> bytes:
    """Strict base64 (a ``data:image/...;base64,`` prefix is allowed)."""
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(400, "bad_image", "image is not valid base64") from None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode PNG or JPEG ``data`` to RGB; refuses other formats (415) and huge images (413)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageError(415, "unsupported_image", f"image format {image.format} is not PNG or JPEG")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, "image_too_large", f"image is {width}x{height}; at most {max_pixels} pixels")
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(400, "bad_image", "image is not a readable PNG or JPEG") from None
    except OSError:
        raise ImageError(400, "bad_image", "image data is truncated or corrupt") from None
    return rgb
