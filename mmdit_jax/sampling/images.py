"""Images out: float [0, 1] arrays to PIL (as diffusers' numpy_to_pil rounds them) and PNG files whose
text chunks record how to reproduce them, written aside then renamed."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from mmdit_jax.errors import MMDiTError


def to_pil(images) -> list:
    from PIL import Image

    arr = (np.asarray(images, np.float32) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image, path: str, metadata: dict) -> str:
    """Write `image` (PIL) to `path` with `metadata` as PNG tEXt entries; atomic (temp file + rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        if v is not None:
            info.add_text(str(k), str(v))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_png_metadata(path: str) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(im.text)
    except (OSError, AttributeError) as e:
        raise MMDiTError(f"{path}: not a readable PNG ({e})") from None


def load_image(path: str):
    """An RGB image file as (H, W, 3) float32 in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise MMDiTError(f"{path}: cannot read image ({e})") from None
