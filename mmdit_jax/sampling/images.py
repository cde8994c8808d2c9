"""Images out: float [0, 1] arrays to PIL (as diffusers' numpy_to_pil rounds them) and PNG files whose
text chunks record how to reproduce them, written aside then renamed (io/files.py)."""
from __future__ import annotations

import numpy as np

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io.files import atomic_file


def to_pil(images) -> list:
    from PIL import Image

    arr = (np.asarray(images, np.float32) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image, path: str, metadata: dict | None = None) -> str:
    """Write `image` (PIL) to `path` with `metadata` as PNG tEXt entries; atomic (temp file + rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        if v is not None:
            info.add_text(str(k), str(v))
    with atomic_file(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(im.text)
    except (OSError, AttributeError) as e:
        raise MMDiTError(f"{path}: not a readable PNG ({e})") from None
