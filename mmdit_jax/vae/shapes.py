"""Input checks shared by the VAEs (the KL autoencoder and the pixel-space map)."""
from mmdit_jax.errors import MMDiTError


def check_nhwc(x, channels: int, what: str, factor: int) -> None:
    """`x` must be (B, H, W, channels) with H and W multiples of `factor`."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise MMDiTError(f"{what} must be (B, H, W, {channels}) NHWC, got shape {tuple(x.shape)}")
    if factor > 1 and (x.shape[1] % factor or x.shape[2] % factor):
        raise MMDiTError(f"{what} height and width must be multiples of {factor}, got "
                         f"{x.shape[1]}x{x.shape[2]}")
