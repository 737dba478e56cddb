"""Image sizes as configs give them, parsed in one place: an int for a square, or an (H, W) pair."""

from __future__ import annotations

from collections.abc import Sequence


def as_size(size: int | Sequence[int], option: str = "size") -> tuple[int, int]:
    """``int`` -> square (s, s); a pair -> (H, W). ``option`` names the setting in errors."""
    if isinstance(size, bool):
        raise TypeError(f"{option} must be an int or an (H, W) pair, got {size!r}")
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise TypeError(
            f"{option} must be an int (square) or an (H, W) pair such as [256, 320], got {size!r}"
        )
    if min(pair) <= 0:
        raise ValueError(f"{option} must be positive, got {size!r}")
    return pair


def model_input_size(
    image_size: int | Sequence[int], crop_size: int | Sequence[int] | None = None
) -> tuple[int, int]:
    """The (H, W) the model sees: the crop if one is set, else the resize target."""
    if crop_size is not None:
        return as_size(crop_size, "data.crop_size")
    return as_size(image_size, "data.image_size")
