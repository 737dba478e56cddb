"""Training policy around the pure CFA model: bank building, optimiser, logging, metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from ..distributed import PaddingFilter, current_eval_loader
from ..metrics import AnomalyMetrics
from .backbone import Backbone
from .cfa import CFA

MIN_CALIBRATION_IMAGES = 20  # below this, a warning that the thresholds are unreliable


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_backbone(cfg: Mapping[str, Any]) -> Backbone:
    """A Backbone from its config group (with or without `_target_`)."""
    cfg = dict(cfg)
    if "_target_" in cfg:
        return instantiate(cfg)
    return Backbone(**cfg)


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
        chunk_mb: int = 32,
        naive_loss: bool = False,
        threshold_quantile: float = 0.99,
        compile: bool = False,
    ) -> None:
        super().__init__()
        backbone = _plain(backbone)
        input_size = _plain(input_size)
        self.save_hyperparameters()
        self.model = CFA(
            build_backbone(backbone),
            input_size=input_size,
            gamma_c=gamma_c,
            gamma_d=gamma_d,
            K=K,
            J=J,
            alpha=alpha,
            nu=nu,
            radius=radius,
            learn_radius=learn_radius,
            blur_sigma=blur_sigma,
            kmeans_seed=kmeans_seed,
            chunk_bytes=chunk_mb * 2**20,
        )
        self.val_metrics = AnomalyMetrics(pixel=True)
        self.test_metrics = AnomalyMetrics(pixel=True)
        self.test_results: dict[str, float] = {}
        self._test_filter = PaddingFilter()  # drops the duplicates a DistributedSampler pads in
        self._val_has_anomaly = False
        self._val_scores: list[torch.Tensor] = []
        self._val_low = float("inf")
        self._calibrated_from = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> CFALitModule:
        """Rebuild from a checkpoint; the backbone weights come from the checkpoint, not the hub."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        hparams = ckpt.get("hyper_parameters")
        if not hparams or "backbone" not in hparams:
            raise ValueError(
                f"{path} is not a cfa-lightning checkpoint (no CFA hyper-parameters in it)"
            )
        backbone = {**hparams["backbone"], "pretrained": False, "checkpoint_path": None}
        module = cls(**{**hparams, "backbone": backbone})
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise ValueError(
                f"{path} does not match the model its own hyper-parameters describe: {err}"
            ) from err
        return module

    def setup(self, stage: str) -> None:
        if self.hparams.compile and not hasattr(self.model.describe, "_torchdynamo_orig_callable"):
            # Backbone + descriptor only: the distance search has data-dependent chunking.
            self.model.describe = torch.compile(self.model.describe)

    # ---- memory bank -------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if bool(self.model.bank.fitted):
            rank_zero_info("memory bank restored from the checkpoint; not rebuilt")
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "bank_dataloader"):
            raise RuntimeError(
                "CFA builds its memory bank from `datamodule.bank_dataloader()`; pass a datamodule"
            )
        self.build_bank(datamodule.bank_dataloader())

    @torch.no_grad()
    def build_bank(self, loader) -> None:
        """Exact mean of phi's initial output over the training set (sums reduced across ranks)."""
        bank = self.model.bank
        bank.reset()
        trainer = self._trainer  # None when called outside a Trainer
        show = trainer is None or (
            trainer.is_global_zero and trainer.progress_bar_callback is not None
        )
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        for i, batch in enumerate(
            tqdm(loader, desc="Building memory bank", disable=not show, leave=False)
        ):
            if i % world == rank:  # each rank runs phi on its share of the batches only
                bank.update(self.model.describe(batch["image"].to(self.device)))
        total_sum, total_count = bank._sum, bank._count
        if world > 1:
            total_sum = trainer.strategy.reduce(total_sum.clone(), reduce_op="sum")
            total_count = trainer.strategy.reduce(total_count.clone(), reduce_op="sum")
        n_images = int(total_count)
        bank.finalize(total_sum, total_count)
        if world > 1:
            # Identical inputs give identical banks, but k-means on a GPU is not bit-reproducible:
            # every rank takes rank 0's centres.
            bank.centres.copy_(trainer.strategy.broadcast(bank.centres, src=0))
        rank_zero_info(
            f"memory bank built from {n_images} training images: {tuple(bank.centres.shape)} centres"
        )

    # ---- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]  # phi's CoordConv and r
        return torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            amsgrad=self.hparams.amsgrad,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model.loss(batch["image"], naive=self.hparams.naive_loss)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log(
            "train/radius",
            self.model.loss_fn.radius.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=bs,
        )
        return loss

    # ---- evaluation --------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, out = self.model.loss(batch["image"], with_output=True)
        bs = batch["image"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs)
        self.log("val/score_mean", out.image_scores.mean(), batch_size=bs)
        self.val_metrics.update(out.image_scores, batch["label"], out.maps, batch["mask"][:, 0])
        self._val_has_anomaly |= bool(batch["label"].any())
        self._val_scores.append(out.image_scores.detach())
        self._val_low = min(self._val_low, float(out.maps.min()))

    def on_validation_epoch_start(self) -> None:
        self._val_has_anomaly = False
        self._val_scores: list[torch.Tensor] = []
        self._val_low = float("inf")

    def on_validation_epoch_end(self) -> None:
        # The default validation split is normal images only: image metrics need a user-given
        # split with anomalies; val/loss and val/score_mean are logged either way.
        f1_thresholds = {}
        if self._val_has_anomaly:
            results = self.val_metrics.compute()
            for name, value in results.items():
                self.log(f"val/{name}", value)
            f1_thresholds = {k: v for k, v in results.items() if k.endswith("_threshold")}
        self.val_metrics.reset()
        self._calibrate(f1_thresholds)

    def _calibrate(self, f1_thresholds: dict[str, float]) -> None:
        """Thresholds and normalisation from this epoch's validation images (kept in checkpoints)."""
        if not self._val_scores:
            return
        scores = self.all_gather(torch.cat(self._val_scores)).flatten()
        low = float(self.all_gather(torch.tensor(self._val_low, device=self.device)).min())
        cal = self.model.calibration
        cal.fit(scores, low, self.hparams.threshold_quantile, f1_thresholds)
        self._calibrated_from = scores.numel()
        self.log("val/image_threshold", cal.image_threshold)
        self.log("val/pixel_threshold", cal.pixel_threshold)

    def on_train_end(self) -> None:
        if not bool(self.model.calibration.fitted):
            rank_zero_warn(
                "no validation images, so no calibrated thresholds: predictions will carry raw "
                "scores only. Keep data.val_fraction > 0 (or give a validation folder)."
            )
        elif self._calibrated_from < MIN_CALIBRATION_IMAGES:
            rank_zero_warn(
                f"thresholds were calibrated on only {self._calibrated_from} validation images: "
                "the tail of the normal scores is barely seen, so expect false alarms. Raise "
                "data.val_fraction or give a larger validation folder."
            )

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
        keep = self._test_filter.keep(len(batch["image"]))
        n = len(keep) if keep is not None else len(batch["image"])  # real samples come first
        if n:
            self.test_metrics.update(
                out.image_scores[:n], batch["label"][:n], out.maps[:n], batch["mask"][:n, 0]
            )
        return out  # for callbacks (W&B media)

    def on_test_epoch_end(self) -> None:
        self.test_results = {f"test/{k}": float(v) for k, v in self.test_metrics.compute().items()}
        for name, value in self.test_results.items():
            self.log(name, value)
        self.test_metrics.reset()
