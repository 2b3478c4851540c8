"""The one image decoder of training, evaluation and prediction: any file PIL reads → 8-bit RGB.

PIL's ``convert("RGB")`` is right for 8-bit modes (``L``, ``P`` palettes, ``CMYK``,
``RGBA`` / ``LA`` whose alpha is dropped, ``1``) but clips integer modes: a 16-bit
grayscale PNG opens as ``I;16`` (or ``I``) with values up to 65535, and every value above
255 turns white. Those modes are scaled instead, ``round(v * 255 / 65535)`` (= ``v / 257``
rounded), so the picture keeps its contrast.

A file above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2, where PIL
raises) is refused in one line; between 1x and 2x PIL only warns, and the warning is
silenced here (it would be two lines per image per epoch).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from agvm_ds.data.errors import DatasetError

#: modes holding integers in 0..65535 (``I`` is how PIL holds 16-bit PNG/TIFF data too)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit modes scaled to 0..255, every other mode through PIL."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        # (v + 128) // 257 == round(v / 257) for integers (v / 257 is never exactly .5)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if image.mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def decode_image(path: str | Path) -> Image.Image:
    """The 8-bit RGB image of the file ``path``, fully decoded.

    Raises:
        DatasetError: one line starting with ``path``: missing, not an image, damaged
            (e.g. a truncated JPEG) or over PIL's decompression-bomb limit.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return to_rgb(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{path}: refused, too many pixels ({err})") from None
    except OSError as err:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        why = "not an image PIL can read" if isinstance(err, Image.UnidentifiedImageError) else str(err)
        raise DatasetError(f"{path}: cannot read image ({why})") from None
