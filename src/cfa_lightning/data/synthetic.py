"""A small synthetic data set in the MVTec AD layout, for tests and smoke runs.

Normal images are one texture (a stripe grid at a fixed orientation with a random
phase, mild noise). Two defect families of ``defects.py`` (the one place where defects
are drawn, shared with the synthetic-anomaly validation split) are painted on that
texture, each with a 0/255 mask ``<stem>_mask.png`` of the image's size:

- ``scratch``: one or two thin bright or dark polylines;
- ``spot``: a filled, rotated ellipse of a foreign (blue or red) colour.

Each defect covers roughly 1-5 % of the image. Output is deterministic for a seed.

CLI: ``python -m cfa_lightning.data.synthetic --root DIR [--category NAME]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .defects import draw_defect
from .mvtec import MVTecDataModule

__all__ = ["DEFECT_TYPES", "SyntheticDataModule", "generate_synthetic_dataset", "main"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")
MARKER = ".synthetic_complete.json"
_STREAM = {"train": 0, "good": 1, "scratch": 2, "spot": 3}  # separate RNG stream per folder

_BASE_COLOUR = np.array([0.62, 0.56, 0.46])  # beige; every normal image shares it


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Normal appearance: oriented stripe grid, random phase, mild noise. (H, W, 3) in [0, 1]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = max(min(h, w) / 10.0, 4.0)
    theta = math.radians(30.0 + rng.uniform(-2.0, 2.0))
    u = xx * math.cos(theta) + yy * math.sin(theta)  # along the main stripes' normal
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    phase_u, phase_v = rng.uniform(0.0, 2.0 * math.pi, size=2)
    luminance = (
        0.80
        + 0.18 * np.sin(2.0 * math.pi * u / period + phase_u)
        + 0.07 * np.sin(2.0 * math.pi * v / (1.7 * period) + phase_v)
    )  # (H, W)
    image = luminance[..., None] * _BASE_COLOUR  # (H, W, 3)
    image = image + rng.normal(0.0, 0.02, size=image.shape)
    return np.clip(image, 0.0, 1.0)


def _save_rgb(array: np.ndarray, path: Path) -> None:
    rgb = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)  # (H, W, 3)
    Image.fromarray(rgb).save(path)


def _expected_files(params: dict) -> list[str]:
    """Relative paths of every file a complete data set holds (for the completeness check)."""
    files = [f"train/good/{i:03d}.png" for i in range(params["n_train"])]
    files += [f"test/good/{i:03d}.png" for i in range(params["n_test_good"])]
    for defect in DEFECT_TYPES:
        for i in range(params["n_test_defect"]):
            files += [f"test/{defect}/{i:03d}.png", f"ground_truth/{defect}/{i:03d}_mask.png"]
    return files


def _is_complete(category_dir: Path, params: dict) -> bool:
    marker = category_dir / MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return stored == params and all((category_dir / f).is_file() for f in _expected_files(params))


def _write(target: Path, params: dict) -> None:
    size = tuple(params["image_size"])
    seed = params["seed"]

    def rng_for(stream: str, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, _STREAM[stream], index])

    for sub in ("train/good", "test/good", *(f"test/{d}" for d in DEFECT_TYPES)):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for defect in DEFECT_TYPES:
        (target / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)

    for i in range(params["n_train"]):
        _save_rgb(_texture(rng_for("train", i), size), target / "train/good" / f"{i:03d}.png")
    for i in range(params["n_test_good"]):
        _save_rgb(_texture(rng_for("good", i), size), target / "test/good" / f"{i:03d}.png")
    for defect in DEFECT_TYPES:
        for i in range(params["n_test_defect"]):
            rng = rng_for(defect, i)
            image, mask = draw_defect(defect, rng, _texture(rng, size))  # (H, W, 3), (H, W)
            _save_rgb(image, target / "test" / defect / f"{i:03d}.png")
            mask_u8 = mask.astype(np.uint8) * 255
            Image.fromarray(mask_u8).save(target / "ground_truth" / defect / f"{i:03d}_mask.png")
    (target / MARKER).write_text(json.dumps(params, indent=2))


def generate_synthetic_dataset(
    root: str | os.PathLike,
    category: str = "synthetic",
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    image_size: int | Sequence[int] = (128, 128),
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>`` in the MVTec layout and return that folder.

    ``n_test_defect`` images are written *per defect type* (``scratch``, ``spot``).
    ``image_size`` is an int (square) or (H, W). If the folder already holds the
    complete data set for the same arguments, nothing is written.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = [int(image_size[0]), int(image_size[1])]
    if min(size) < 32:
        raise ValueError(f"image_size must be at least 32x32 for visible defects, got {size}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if n_test_good < 0 or n_test_defect < 0 or n_test_good + n_test_defect == 0:
        raise ValueError(
            f"need at least one test image (n_test_good={n_test_good}, "
            f"n_test_defect={n_test_defect})"
        )
    params = {
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
        "image_size": size,
        "seed": int(seed),
    }
    root = Path(root)
    target = root / category
    if _is_complete(target, params):
        return target
    if target.exists():
        if (target / MARKER).is_file():  # our own data set, other arguments: regenerate
            shutil.rmtree(target)
        elif target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            raise FileExistsError(
                f"{target} exists and is not a synthetic data set written by this generator; "
                "choose another --root/--category or delete that folder."
            )

    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{category}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write(staging, params)
        try:
            os.replace(staging, target)  # atomic: readers never see a half-written set
        except OSError:
            if not _is_complete(target, params):  # another process did not win the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m cfa_lightning.data.synthetic",
        description="Write a small synthetic anomaly data set in the MVTec AD layout.",
    )
    parser.add_argument("--root", required=True, help="folder that will hold <category>/")
    parser.add_argument("--category", default="synthetic")
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-test-good", type=int, default=8)
    parser.add_argument("--n-test-defect", type=int, default=8, help="per defect type")
    parser.add_argument(
        "--image-size", type=int, nargs="+", default=[128, 128], metavar="N", help="S or H W"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.image_size) not in (1, 2):
        parser.error("--image-size takes one value (square) or two (H W)")
    size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
    path = generate_synthetic_dataset(
        args.root,
        category=args.category,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        image_size=size,
        seed=args.seed,
    )
    print(path)
    return path


class SyntheticDataModule(MVTecDataModule):
    """The MVTec-layout data module over a synthetic set generated on first use (rank 0)."""

    def __init__(
        self,
        root: str,
        category: str = "synthetic",
        n_train: int = 40,
        n_test_good: int = 12,
        n_test_defect: int = 12,
        generate_size: int | Sequence[int] = (128, 128),
        generator_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)
        self.generator_args = dict(
            category=category,
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
            image_size=list(generate_size) if not isinstance(generate_size, int) else generate_size,
            seed=generator_seed,
        )

    def prepare_data(self) -> None:
        generate_synthetic_dataset(self.root, **self.generator_args)
        super().prepare_data()


if __name__ == "__main__":
    main()
