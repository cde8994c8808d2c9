"""The one exception type users see for bad input; its message names the file, key or flag."""


class MMDiTError(ValueError):
    """Bad input (missing or corrupt file, unknown layout, wrong shape, bad flag)."""
