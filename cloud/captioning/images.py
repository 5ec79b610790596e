"""Reading image files into RGB uint8 arrays, with errors that name the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)


class ImageLoadError(ValueError):
    """An image file is missing, unreadable or not an image; the message names the file."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB uint8 array of shape (H, W, 3).

    Raises ImageLoadError (a ValueError) naming the file when it is missing or does not decode.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: not a readable image ({err})") from err
