"""CFA's training recipe as a LightningModule: build the bank, train phi, validate, test, predict.

The method itself is the pure model in ``cfa.py`` (docs/method.md maps each equation to its
file). The rules around it live in their own homes: ``bank_build.py`` (the bank's build over
a loader, DDP included), ``tap_cache.py`` (the frozen backbone's taps kept across a fit),
``untrained_epoch.py`` (epoch 0 of a validated fit), ``validation.py`` (a validation epoch's
sums over ranks) and ``calibration.py`` (thresholds fitted on validation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..checkpoint import load_checkpoint, rebuild_module
from ..distributed import (
    PaddingFilter,
    current_eval_loader,
)
from ..metrics import AnomalyMetrics
from ..sizes import as_size
from ..utils import plain
from .backbone import build_backbone
from .bank_build import build_bank
from .calibration import ValidationCalibrator
from .cfa import CFA
from .distances import chunk_budget_bytes
from .memory_bank import image_ids
from .tap_cache import TapCache, tap_cache_bytes
from .untrained_epoch import UntrainedEpoch
from .validation import ValidationEpoch


class CFALitModule(pl.LightningModule):
    """Builds the memory bank once at the start of fit, then trains phi and r with AdamW.

    Hyper-parameters (including the backbone config) are saved in every checkpoint, so
    `CFALitModule.from_checkpoint(path)` rebuilds a model that scores identically.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        input_size: int | list[int] = 256,
        gamma_c: int = 1,
        gamma_d: int = 1,
        K: int = 3,
        J: int = 3,
        alpha: float = 0.1,
        nu: float = 1e-3,
        radius: float = 1e-5,
        learn_radius: bool = True,
        blur_sigma: float = 4.0,
        kmeans_seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        amsgrad: bool = True,
        lr_schedule: str = "none",
        chunk_mb: float | str = "auto",
        threshold_quantile: float = 0.99,
        threshold_rule: str = "auto",
        val_pixel_stride: int = 2,
        compile: bool = False,
        untrained_epoch: bool = False,
        tap_cache_mb: float = 2048,
        bank: Mapping[str, Any] | None = None,
        tap_norm: bool = False,
    ) -> None:
        super().__init__()
        backbone = plain(backbone)  # plain containers: checkpoints load with weights_only=True
        input_size = plain(input_size)
        bank = plain(bank) if bank is not None else {"construction": "positional"}
        self.save_hyperparameters()
        if int(val_pixel_stride) < 1:
            raise ValueError(f"model.val_pixel_stride must be >= 1, got {val_pixel_stride}")
        if lr_schedule not in ("none", "cosine"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; choose none or cosine")
        self.model = CFA(
            build_backbone(backbone), input_size=input_size, gamma_c=gamma_c, gamma_d=gamma_d,
            K=K, J=J, alpha=alpha, nu=nu, radius=radius, learn_radius=learn_radius,
            blur_sigma=blur_sigma, kmeans_seed=kmeans_seed,
            chunk_bytes=chunk_budget_bytes(chunk_mb), bank=bank, tap_norm=tap_norm,
        )  # fmt: skip
        self.val_metrics = AnomalyMetrics(pixel=True)
        self.test_metrics = AnomalyMetrics(pixel=True)
        self.test_results: dict[str, float] = {}
        self.untrained = UntrainedEpoch(untrained_epoch)
        self.calibrator = ValidationCalibrator(
            self.model.calibration, threshold_quantile, threshold_rule
        )
        self._taps = TapCache(tap_cache_bytes(tap_cache_mb))
        self._test_filter = PaddingFilter()  # drops the duplicates a DistributedSampler pads in

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

    def build_bank(self, loader) -> None:
        """The bank from phi's initial output over ``loader``'s images (bank_build.py)."""
        self.bank_build_s = build_bank(self, loader, cache_bytes=self._taps.max_bytes)

    # ---- 2. training phi (and r) -------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]  # phi's CoordConv and r
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, amsgrad=self.hparams.amsgrad,
                                      weight_decay=self.hparams.weight_decay)  # fmt: skip
        if self.hparams.get("lr_schedule", "none") == "none":  # the paper's constant rate
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
        self._val = ValidationEpoch(current_eval_loader(self.trainer, "val"))
        self.calibrator.start_epoch()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        n = self._val.filter.count(len(batch["image"]))  # padding only comes last
        if n == 0:
            return
        images, labels, masks = batch["image"][:n], batch["label"][:n], batch["mask"][:n, 0]
        paths = batch.get("image_path")
        taps = self.batch_taps(images, paths[:n] if paths is not None else None)
        normal = labels == 0  # (n,)
        scores, maps = images.new_zeros(n), images.new_zeros(n, *images.shape[-2:])  # (n, H, W)
        if normal.any():  # val/loss and the calibration see the normal images only
            loss, out = self.model.loss(
                images[normal], with_output=True, taps=[t[normal] for t in taps]
            )
            scores[normal], maps[normal] = out.image_scores, out.maps
            self._val.add_normal(loss, out.image_scores)
            self.calibrator.add_normal(out.image_scores, out.maps)
        if not normal.all():
            out = self.model(images[~normal], taps=[t[~normal] for t in taps])
            scores[~normal], maps[~normal] = out.image_scores, out.maps
        # Pixel metrics on every s-th pixel per axis (the exact curves would dominate a
        # validation epoch); test metrics use every pixel. An anomalous image with an empty mask
        # (a real defect from data.val_dir comes without one) counts in image metrics only.
        pixel_rows = normal | masks.flatten(1).any(dim=1)  # (n,)
        s = int(self.hparams.val_pixel_stride)
        self.val_metrics.update(
            scores, labels, maps[:, ::s, ::s], masks[:, ::s, ::s], pixel_rows=pixel_rows
        )
        synthetic = batch.get("synthetic", torch.zeros_like(labels, dtype=torch.bool))[:n]
        self._val.add_labels(labels, synthetic)

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
