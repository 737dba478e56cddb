"""CFA's training recipe as a LightningModule: build the bank, train phi, validate, test, predict.

The method itself is the pure model in ``cfa.py`` (docs/method.md maps each equation to its
file); the module is given one and keeps the recipe's own settings (optimiser, schedule,
validation, calibration, tap cache). ``conf/model/cfa.yaml`` stays one flat list of keys
(``model.K``, ``model.lr``, ``model.bank.size``, ...); its ``_target_``, `CFALitModule.from_config`,
gives each key to the constructor that takes it (`CFALoss`, `CFA`, this module: their
keyword-only parameters, none with a default) and saves the whole list as the hyper-parameters,
so every value has one home, the config, and a checkpoint rebuilds the model alone
(`from_checkpoint`; checkpoint.py reads older checkpoints, which hold the same flat list). In
Python, `model_config` composes that list with Hydra overrides, as the command line does.

The rules around it live in their own homes: ``bank_build.py`` (the bank's build over
a loader, DDP included), ``tap_cache.py`` (the frozen backbone's taps kept across a fit),
``untrained_epoch.py`` (epoch 0 of a validated fit), ``validation.py`` (a validation epoch's
sums over ranks) and ``calibration.py`` (thresholds fitted on validation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from .. import __version__
from ..checkpoint import load_checkpoint, rebuild_module
from ..config import CONFIG_DIR, register_resolvers
from ..distributed import PaddingFilter, current_eval_loader
from ..metrics import AnomalyMetrics
from ..sizes import as_size
from ..utils import plain
from .bank_build import fill_bank
from .calibration import ValidationCalibrator
from .cfa import CFA, settings_of
from .memory_bank import image_ids
from .tap_cache import TapCache, tap_cache_bytes
from .untrained_epoch import UntrainedEpoch
from .validation import ValidationEpoch


def model_config(*overrides: str) -> dict[str, Any]:
    """The flat model config the command line builds (``conf/train.yaml``'s ``model`` group),
    with Hydra ``overrides`` ("model.K=3", "backbone=resnet18", "model/bank=positional"), as
    plain values for `CFALitModule.from_config`. Give the input size ("model.input_size=[64,80]"
    or "data.image_size=256"): the default, auto, is measured by train.py on the images."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra job or test: its config folder
        cfg = compose("train", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
    config = plain(cfg.model)
    return {key: value for key, value in config.items() if not key.startswith("_")}


class CFALitModule(pl.LightningModule):
    """Builds the memory bank once at the start of fit, then trains phi and r with AdamW.

    ``model``: the pure CFA. The keyword settings are the recipe's; their values come from
    conf/model/cfa.yaml. Built by `from_config`, the module saves the whole flat config as its
    hyper-parameters, and `CFALitModule.from_checkpoint(path)` rebuilds a model that scores
    identically. ``untrained_epoch``: train.py's ``validate_untrained`` (no model key).
    """

    def __init__(
        self,
        model: CFA,
        *,
        lr: float,
        weight_decay: float,
        amsgrad: bool,
        lr_schedule: str,
        threshold_quantile: float,
        threshold_rule: str,
        val_pixel_stride: int,
        compile: bool,
        tap_cache_mb: float,
        untrained_epoch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if int(val_pixel_stride) < 1:
            raise ValueError(f"model.val_pixel_stride must be >= 1, got {val_pixel_stride}")
        if lr_schedule not in ("none", "cosine"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; choose none or cosine")
        self.model = model
        self.val_metrics = AnomalyMetrics(pixel=True)
        self.test_metrics = AnomalyMetrics(pixel=True)
        self.test_results: dict[str, float] = {}
        self.untrained = UntrainedEpoch(untrained_epoch)
        self.calibrator = ValidationCalibrator(
            model.calibration, threshold_quantile, threshold_rule
        )
        self.bank_build_s = math.nan  # seconds of this fit's bank build; a resumed fit has none
        self._taps = TapCache(tap_cache_bytes(tap_cache_mb))
        self._train_start = time.perf_counter()  # reset when each training epoch starts
        self._val = ValidationEpoch(self.val_metrics, int(val_pixel_stride))  # reset per epoch
        self._test_filter = PaddingFilter()  # drops the duplicates a DistributedSampler pads in

    @classmethod
    def from_config(cls, **config: Any) -> CFALitModule:
        """The module of a flat model config: conf/model/cfa.yaml's ``_target_``, and what a
        checkpoint's hyper-parameters rebuild. This constructor's keys go to it, the others to
        `CFA.from_config`; the whole config becomes the hyper-parameters."""
        config = plain(config)  # plain containers: checkpoints load with weights_only=True
        recipe = {key: config[key] for key in settings_of(cls) if key in config}
        model = CFA.from_config(**{k: v for k, v in config.items() if k not in recipe})
        module = cls(model, **recipe)
        module.save_hyperparameters({**config, **module.hparams})
        return module

    @classmethod
    def config_keys(cls) -> list[str]:
        """Every key of the flat config: the model's (`CFA.config_keys`), then the recipe's."""
        return [*CFA.config_keys(), *settings_of(cls)]

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> CFALitModule:
        """Rebuild from a checkpoint file, read with `weights_only=True` (see checkpoint.py)."""
        return cls.from_checkpoint_dict(load_checkpoint(path, map_location), path)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: Mapping[str, Any], path: str | Path) -> CFALitModule:
        """Rebuild from a loaded checkpoint; the backbone weights come from it, not the hub."""
        return rebuild_module(cls, ckpt, path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming (ckpt_path=) into a model of another input size would train on with a bank
        # of another resolution: refuse it, naming both sizes.
        saved = checkpoint.get("hyper_parameters", {}).get("input_size")
        if saved is None:
            return
        trained, current = list(as_size(saved)), list(self.model.input_size)
        if trained != current:
            raise ValueError(
                f"the checkpoint was trained at input size {trained} (H, W), but this run's model "
                f"is {current}: set data.image_size={trained} (an auto-sized run keeps its size "
                "only with the same images), or train anew"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A datamodule built by Hydra keeps DictConfig arguments in its hyper-parameters; stored
        # as plain containers, every checkpoint loads with weights_only=True (checkpoint.py).
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))
        checkpoint["cfa_lightning_version"] = __version__  # named when a later one cannot load it

    def setup(self, stage: str) -> None:
        if self.hparams.compile and not hasattr(self.model.describe, "_torchdynamo_orig_callable"):
            # Backbone + descriptor only (the search is one large matmul per block already).
            self.model.describe = torch.compile(self.model.describe)

    def batch_taps(self, images: Tensor, paths: Sequence[str] | None) -> list[Tensor]:
        """The frozen backbone's taps of a batch, kept across a fit's epochs (tap_cache.py)."""
        return self._taps.for_batch(self._trainer, self.model.backbone, images, paths)

    # ---- 1. the memory bank, once per fit ---------------------------------------------------

    def on_fit_start(self) -> None:
        # Runs before Lightning's sanity check. Resuming a fit (`ckpt_path=`) keeps the bank of
        # that fit, restored with it; any other fit builds the bank from the data it is given.
        self._taps.clear()
        if self.trainer.ckpt_path is not None:
            rank_zero_info("resuming: memory bank restored from the checkpoint, not rebuilt")
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "bank_dataloader"):
            raise RuntimeError(
                "CFA builds its memory bank from `datamodule.bank_dataloader()`; pass a datamodule"
            )
        if bool(self.model.bank.fitted):
            rank_zero_warn(
                "this model already has a memory bank: it is rebuilt from this fit's training data "
                "with the current (trained) phi, not a freshly initialised one. To continue an "
                "interrupted fit instead, pass ckpt_path= to fit."
            )
        self.build_bank(datamodule.bank_dataloader())

    def build_bank(self, loader: Any) -> None:
        """The bank from phi's initial output over ``loader``'s images (bank_build.py), under
        the training precision; the tap cache keeps the images' taps for the epochs to come."""
        trainer = self._trainer  # None outside a Trainer
        self.bank_build_s = fill_bank(
            self.model,
            loader,
            device=self.device,
            taps=self.batch_taps,
            precision=trainer.precision_plugin.train_step_context() if trainer else nullcontext(),
            progress=trainer is None
            or bool(trainer.is_global_zero and trainer.progress_bar_callback),
            cache_bytes=self._taps.max_bytes,
        )

    # ---- 2. training phi (and r) -------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]  # phi's CoordConv and r
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            amsgrad=self.hparams.amsgrad,
            weight_decay=self.hparams.weight_decay,
        )
        if self.hparams.lr_schedule == "none":  # the paper's constant rate
            return optimizer
        factor = self.untrained.cosine(int(self.trainer.max_epochs or 1))  # stepped per epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "epoch"},
        }

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The untrained epoch: the closure runs (DDP syncs its zero gradients) but the optimiser
        # does not step, so no weight decay and no AdamW state. Lightning counts this hook's
        # calls, so trainer.global_step still advances by one per batch.
        if self.untrained.active(self.current_epoch):
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.untrained.active(self.current_epoch):
            return self.untrained.zero_loss(self)
        images, paths = batch["image"], batch.get("image_path")
        owners = image_ids(paths, len(images), images.device)  # own copies leave the search
        loss, _ = self.model.loss(images, taps=self.batch_taps(images, paths), owners=owners)
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        radius = self.model.loss_fn.radius.detach()
        self.log("train/radius", radius, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        # Includes the validation run at the end of the epoch (time/val_epoch_s of it).
        self.log("time/epoch_s", time.perf_counter() - self._train_start)

    def on_train_end(self) -> None:
        self.calibrator.warn_if_unreliable()

    def on_fit_end(self) -> None:
        self._taps.clear()  # frees the kept taps; trainer.validate() outside a fit keeps none

    # ---- 3. validation: selection metrics and calibrated thresholds --------------------------

    def on_validation_epoch_start(self) -> None:
        self._val.start(current_eval_loader(self.trainer, "val"))
        self.calibrator.start_epoch()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = self._val.filter.count(len(batch["image"]))  # the sampler's padding comes last
        if n == 0:
            return
        images, labels, paths = batch["image"][:n], batch["label"][:n], batch.get("image_path")
        taps = self.batch_taps(images, paths[:n] if paths is not None else None)
        losses, out = self.model.validate(images, taps)  # one pass: (n,) losses, scores, maps
        synthetic = batch.get("synthetic", torch.zeros_like(labels, dtype=torch.bool))[:n]
        self._val.add(losses, out, labels, batch["mask"][:n, 0], synthetic)
        normal = labels == 0  # (n,): the calibration sees the normal images only
        self.calibrator.add_normal(out.image_scores[normal], out.maps[normal])

    def on_validation_epoch_end(self) -> None:
        anomaly, real_anomaly = self._val.end(self)  # every rank calls every reduction
        results = self.val_metrics.compute() if anomaly else {}  # real or synthetic anomalies
        for name, value in results.items():  # val/image_threshold is the calibrated one
            self.log(f"val/{name.replace('_threshold', '_F1_threshold')}", value)
        self.val_metrics.reset()
        self.calibrator.fit(self, results, real_anomaly)
        if not self.trainer.sanity_checking:
            self.log("time/val_epoch_s", self._val.seconds())

    # ---- 4. test and predict ---------------------------------------------------------------

    def on_test_start(self) -> None:
        # A test set without any ground-truth mask (data=folder without data.mask_dir) gets
        # image metrics only, rather than pixel metrics against all-zero masks.
        has_masks = getattr(self.trainer.datamodule, "has_masks", True)
        self.test_metrics.pixel = bool(has_masks)
        if not has_masks:
            rank_zero_info("no ground-truth masks in the test set: pixel metrics skipped")

    def on_test_epoch_start(self) -> None:
        self._test_filter = PaddingFilter(current_eval_loader(self.trainer))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        out = self.model(batch["image"])
        n = self._test_filter.count(len(batch["image"]))  # real samples come first
        if n:
            self.test_metrics.update(
                out.image_scores[:n], batch["label"][:n], out.maps[:n], batch["mask"][:n, 0]
            )
        return out  # for callbacks (W&B media)

    def on_test_epoch_end(self) -> None:
        # The best-F1 thresholds describe the test set, they are not deployable values: named
        # test/*_F1max_threshold. Decisions use the calibrated validation thresholds in the model.
        self.test_results = {
            f"test/{k.replace('_threshold', '_F1max_threshold')}": float(v)
            for k, v in self.test_metrics.compute().items()
        }
        for name, value in self.test_results.items():
            self.log(name, value)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        """`trainer.predict`: float32 image scores (B,) and maps (B, H, W), whatever the precision."""
        return self.model(batch["image"])
