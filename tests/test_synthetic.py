"""Tests for data/synthetic.py: layout, counts, masks, visibility, determinism, caching, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cfa_lightning.data.layout import scan_mvtec_category
from cfa_lightning.data.synthetic import DEFECT_TYPES, generate_synthetic_dataset, main

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 3, "image_size": (96, 128)}


def _pngs(folder):
    return sorted(folder.rglob("*.png"))


def test_counts_layout_and_mask_agreement(tmp_path):
    category_dir = generate_synthetic_dataset(tmp_path, "synthetic", seed=0, **SMALL)
    assert category_dir == tmp_path / "synthetic"
    samples = scan_mvtec_category(tmp_path, "synthetic")  # a valid MVTec layout
    assert len(samples["train"]) == 4
    defect_counts = {d: sum(s.defect_type == d for s in samples["test"]) for d in DEFECT_TYPES}
    assert defect_counts == {"scratch": 3, "spot": 3}  # n_test_defect is per defect type
    assert sum(s.defect_type == "good" for s in samples["test"]) == 2

    for s in samples["test"]:
        image = Image.open(s.path)
        assert image.mode == "RGB" and image.size == (128, 96)  # (W, H)
        if s.mask_path is None:
            continue
        mask = np.asarray(Image.open(s.mask_path))
        assert mask.shape == (96, 128)
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert 0.005 <= (mask > 0).mean() <= 0.06  # small but not tiny


def test_defects_are_clearly_visible(tmp_path):
    generate_synthetic_dataset(tmp_path, "synthetic", seed=1, **SMALL)
    normal = np.asarray(Image.open(tmp_path / "synthetic/train/good/000.png"), np.float64)
    normal_range = normal.mean(axis=(0, 1))  # (3,) typical colour of the texture
    for s in scan_mvtec_category(tmp_path, "synthetic")["test"]:
        if s.mask_path is None:
            continue
        image = np.asarray(Image.open(s.path), np.float64)  # (H, W, 3)
        inside = np.asarray(Image.open(s.mask_path)) > 0
        gap = np.abs(image[inside].mean(axis=0) - normal_range).max()
        assert gap > 60, f"{s.path} defect too faint ({gap:.0f} grey levels)"


def test_deterministic_for_a_seed(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b = _pngs(a), _pngs(b)
    assert [p.relative_to(a) for p in files_a] == [p.relative_to(b) for p in files_b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files_a, files_b, strict=True))
    assert any(x.read_bytes() != y.read_bytes() for x, y in zip(files_a, _pngs(c), strict=True))


def test_skips_complete_regenerates_changed_refuses_foreign(tmp_path):
    path = generate_synthetic_dataset(tmp_path, seed=0, **SMALL)
    probe = path / "train/good/000.png"
    stamp = probe.stat().st_mtime_ns
    assert generate_synthetic_dataset(tmp_path, seed=0, **SMALL) == path
    assert probe.stat().st_mtime_ns == stamp  # nothing rewritten

    generate_synthetic_dataset(tmp_path, seed=0, **{**SMALL, "n_train": 5})  # other arguments
    assert len(list((path / "train/good").glob("*.png"))) == 5
    assert not list(tmp_path.glob(".synthetic.tmp-*"))  # staging folder cleaned up

    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic_dataset(tmp_path, category="mine", **SMALL)


def test_cli(tmp_path, capsys):
    path = main(["--root", str(tmp_path), "--category", "tex", "--n-train", "2",
                 "--n-test-good", "1", "--n-test-defect", "1", "--image-size", "64"])  # fmt: skip
    assert path == tmp_path / "tex" and str(path) in capsys.readouterr().out
    assert Image.open(path / "test/spot/000.png").size == (64, 64)
    assert len(_pngs(path)) == 2 + 1 + 2 * 2  # train, good, (image + mask) per defect type
