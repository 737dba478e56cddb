"""Shared fixtures: a tiny synthetic data set and paths to the real images beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CFA_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture()
def hydra_ctx():
    """Hydra initialised on the project's conf/ (for `compose`), cleared afterwards."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cfa_lightning.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small MVTec-layout data set, generated once per test session."""
    from cfa_lightning.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(root, category="synthetic", n_train=12, n_test_good=4, n_test_defect=4,
                               image_size=(64, 80), seed=0)  # fmt: skip
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cookies").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """A tiny trained model (resnet18, random weights, 1 epoch) with calibrated thresholds."""
    import pytorch_lightning as pl

    from cfa_lightning.data import MVTecDataModule
    from tiny_models import tiny_module

    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("trained")
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                         eval_batch_size=4, val_fraction=0.25)  # fmt: skip
    module = tiny_module()
    trainer = pl.Trainer(default_root_dir=out, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    path = out / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def coreset_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """As trained_checkpoint, with a coreset bank sized by a fraction (larger than h * w) and
    the taps normalised (model.tap_norm)."""
    import pytorch_lightning as pl

    from cfa_lightning.data import MVTecDataModule
    from tiny_models import bank_group, tiny_module

    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("coreset")
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                         eval_batch_size=4, val_fraction=0.25)  # fmt: skip
    module = tiny_module(bank=bank_group("coreset", size=0.5), tap_norm=True)
    trainer = pl.Trainer(default_root_dir=out, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    path = out / "model.ckpt"
    trainer.save_checkpoint(path)
    return path
