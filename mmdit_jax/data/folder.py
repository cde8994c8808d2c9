"""Image-caption folders: scanned once into (image, caption, size) items, sizes read from the image headers;
an item is decoded only when its batch needs it.

Images are files with the extensions below anywhere under the folder; `a/b.png`'s caption is `a/b.txt`
(the caption extension is configurable). A missing caption is the empty caption (counted). Files whose
header Pillow cannot read are skipped at the scan; files that fail to decode later (truncated, corrupt
data) are skipped by the pipeline; both are counted by the pipeline's `stats()`."""
from __future__ import annotations

import dataclasses
import os

from PIL import Image, ImageOps

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths
from mmdit_jax.progress import Progress

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# what Pillow raises on a bad file (UnidentifiedImageError is an OSError; DecompressionBombError too)
BAD_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class FolderItem:
    key: str            # path relative to the folder (stable across machines)
    image: str          # absolute paths
    caption: str | None
    height: int         # as displayed (EXIF orientation applied)
    width: int


@dataclasses.dataclass(frozen=True)
class FolderScan:
    items: list[FolderItem]
    skipped: dict[str, str]   # key -> why (unreadable header)
    uncaptioned: int


def _size(path: str) -> tuple[int, int]:
    with paths.open(path, "rb") as f, Image.open(f) as im:
        w, h = im.size
        # EXIF sits in the header of these formats (Pillow would read a whole PNG to look for it)
        if im.format in ("JPEG", "WEBP", "MPO") and im.getexif().get(0x0112, 1) in _TRANSPOSED:
            w, h = h, w
    if w < 1 or h < 1:
        raise ValueError(f"empty image {w}x{h}")
    return h, w


def scan_folder(root: str, caption_ext: str = ".txt") -> FolderScan:
    """Every image under `root`, sorted by relative path, with its displayed size."""
    if not paths.isdir(root):
        raise MMDiTError(f"{root}: data folder not found")
    remote = paths.is_remote(root)
    listed = set(paths.files_under(root)) if remote else None  # one listing, not a request per file
    if remote:
        files = [paths.join(root, rel) for rel in sorted(listed) if rel.lower().endswith(IMAGE_EXTS)]
    else:
        files = []
        for d, dirs, names in os.walk(root):
            dirs.sort()
            files += [os.path.join(d, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
        files.sort(key=lambda p: os.path.relpath(p, root))
    if not files:
        raise MMDiTError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found")
    items, skipped, uncaptioned = [], {}, 0
    progress = Progress(f"scanning {root}", len(files), unit="images", delay=10.0)
    for path in files:
        key = path[len(root.rstrip("/")) + 1:] if remote else os.path.relpath(path, root)
        try:
            h, w = _size(path)
        except BAD_IMAGE as e:
            skipped[key] = f"unreadable header: {type(e).__name__}: {e}"
            progress.update()
            continue
        caption = os.path.splitext(path)[0] + caption_ext
        if not (caption[len(root.rstrip("/")) + 1:] in listed if remote else os.path.isfile(caption)):
            caption, uncaptioned = None, uncaptioned + 1
        items.append(FolderItem(key, path, caption, h, w))
        progress.update()
    progress.close()
    return FolderScan(items, skipped, uncaptioned)


def read_image(item: FolderItem) -> Image.Image:
    """The decoded RGB image, upright. Raises one of BAD_IMAGE when the file is unreadable."""
    with paths.open(item.image, "rb") as f, Image.open(f) as im:
        im.load()  # decode now, inside the caller's error handling
        return ImageOps.exif_transpose(im).convert("RGB")


def read_caption(item: FolderItem) -> str:
    if item.caption is None:
        return ""
    with paths.open(item.caption, "rb") as f:
        return f.read().decode("utf-8").strip()
