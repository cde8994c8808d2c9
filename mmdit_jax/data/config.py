"""What the training data is and how it is cut: the one config the trainer passes to `make_train_data`."""
from __future__ import annotations

import dataclasses

from mmdit_jax.errors import MMDiTError

KINDS = ("toy", "folder", "arrayrecord")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "toy"                  # "toy" (procedural) | "folder" (images + captions) | "arrayrecord"
    path: str | None = None            # folder, or a precompute output folder / .array_record file or glob
    resolution: int = 256              # target side in pixels: buckets hold ~resolution**2 pixels
    buckets: bool = True               # aspect-ratio buckets (each batch one shape)
    bucket_step: int = 64              # bucket sides are multiples of this (>= the model's constraint)
    random_flip: bool = False
    caption_ext: str = ".txt"
    num_workers: int = 0               # threads decoding and resizing images (0: in the calling thread)
    shuffle: bool = True
    max_sequence_length: int | None = None
    random_crop: bool = False          # crop to the bucket at a random offset instead of the centre

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MMDiTError(f"data kind {self.kind!r} unknown; expected one of {', '.join(KINDS)}")
        for name in ("resolution", "bucket_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MMDiTError(f"data {name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise MMDiTError(f"data num_workers must be a non-negative integer, got {self.num_workers!r}")
        n = self.max_sequence_length
        if n is not None and (not isinstance(n, int) or n < 1):
            raise MMDiTError(f"data max_sequence_length must be a positive integer or None, got {n!r}")
        if not self.caption_ext.startswith("."):
            raise MMDiTError(f"data caption_ext must start with '.', got {self.caption_ext!r}")

    def check_path(self):
        """A folder or precomputed set needs a path; checked where the data is made, not at construction,
        so a preset can name the kind and a command line add the path."""
        if self.kind in ("folder", "arrayrecord") and not self.path:
            raise MMDiTError(f"data kind {self.kind!r} needs a path (--set=data.path=...)")
