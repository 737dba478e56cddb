"""Training policy around the pure CFA model: bank building, optimiser, logging, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, load_checkpoint
from ..distributed import (
    PaddingFilter,
    all_gather_rows,
    current_eval_loader,
    gather_objects,
    shard_loader,
    world_and_rank,
)
from ..metrics import AnomalyMetrics
from ..utils import plain
from .backbone import Backbone
from .cfa import CFA

MIN_CALIBRATION_IMAGES = 20  # below this, a warning that the thresholds are unreliable
# Options of the removed pruned search (and the naive-loss switch), still in older checkpoints.
RETIRED_HPARAMS = {"search_dims", "search_groups", "prune", "naive_loss"}


class TapCache:
    """The frozen backbone's taps of each image, kept across the epochs of a fit.

    The backbone never trains and CFA draws no augmentation, so an image's taps are the same in
    every epoch: the bank build keeps those of the training images and the first validation
    those of the validation images and their synthetic defects. Later training steps and
    validations run only phi and the search. Keyed by image path; images past ``max_bytes``
    are recomputed every time, and a batch with any such image is recomputed whole.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        self._taps: dict[str, list[Tensor]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._taps)

    def taps(
        self, backbone: nn.Module, images: Tensor, paths: Sequence[str] | None
    ) -> list[Tensor]:
        if paths is None or self.max_bytes <= 0:
            return backbone(images)
        kept = [self._taps.get(path) for path in paths]
        # Taps kept under inference mode (validation) cannot enter autograd (a training step).
        usable = torch.is_inference_mode_enabled() or not any(
            k is not None and k[0].is_inference() for k in kept
        )
        if usable and all(k is not None for k in kept):
            return [torch.cat(level) for level in zip(*kept, strict=True)]  # [(B, C_l, h_l, w_l)]
        taps = backbone(images)  # [(B, C_l, h_l, w_l)]
        for i, path in enumerate(paths):
            if path in self._taps:
                continue
            one = [t[i : i + 1].clone() for t in taps]  # (1, C_l, h_l, w_l), its own storage
            size = sum(t.numel() * t.element_size() for t in one)
            if self.bytes + size > self.max_bytes:
                break
            self._taps[path] = one
            self.bytes += size
        return taps


def chunk_budget_bytes(chunk_mb: float | str) -> int | str:
    """model.chunk_mb -> CFA's chunk_bytes: "auto" stays, a number of MB becomes bytes."""
    if chunk_mb == "auto":
        return "auto"
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, int | float) or chunk_mb <= 0:
        raise ValueError(f"model.chunk_mb={chunk_mb!r}; give a positive number of MB or auto")
    return int(chunk_mb * 2**20)


def tap_cache_bytes(tap_cache_mb: float) -> int:
    """model.tap_cache_mb -> the TapCache budget in bytes (0: keep no taps)."""
    number = isinstance(tap_cache_mb, int | float) and not isinstance(tap_cache_mb, bool)
    if not number or tap_cache_mb < 0:
        raise ValueError(f"model.tap_cache_mb={tap_cache_mb!r}; give a number of MB >= 0 (0: none)")
    return int(tap_cache_mb * 2**20)


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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
        lr_schedule: str = "none",
        chunk_mb: float | str = "auto",
        threshold_quantile: float = 0.99,
        threshold_rule: str = "auto",
        val_pixel_stride: int = 2,
        compile: bool = False,
        untrained_epoch: bool = False,
        tap_cache_mb: float = 2048,
        bank: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        backbone = plain(backbone)  # plain containers: checkpoints load with weights_only=True
        input_size = plain(input_size)
        bank = plain(bank) if bank is not None else {"construction": "positional"}
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
            chunk_bytes=chunk_budget_bytes(chunk_mb),
            bank=bank,
        )
        self.val_metrics = AnomalyMetrics(pixel=True)
        self.test_metrics = AnomalyMetrics(pixel=True)
        self.test_results: dict[str, float] = {}
        self._test_filter = PaddingFilter()  # drops the duplicates a DistributedSampler pads in
        if int(val_pixel_stride) < 1:
            raise ValueError(f"model.val_pixel_stride must be >= 1, got {val_pixel_stride}")
        if lr_schedule not in ("none", "cosine"):
            raise ValueError(f"model.lr_schedule={lr_schedule!r}; choose none or cosine")
        if threshold_rule not in ("auto", "quantile", "f1"):
            raise ValueError(
                f"model.threshold_rule={threshold_rule!r}; choose auto, quantile or f1"
            )
        self._val_has_anomaly = False
        self._val_real_anomaly = False
        self._val_filter = PaddingFilter()
        self._val_scores: list[torch.Tensor] = []
        self._val_low = float("inf")
        self._calibrated_from = 0
        self._taps = TapCache(tap_cache_bytes(tap_cache_mb))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> CFALitModule:
        """Rebuild from a checkpoint file, read with `weights_only=True` (see checkpoint.py)."""
        return cls.from_checkpoint_dict(load_checkpoint(path, map_location), path)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: Mapping[str, Any], path: str | Path) -> CFALitModule:
        """Rebuild from a loaded checkpoint; the backbone weights come from it, not the hub."""
        hparams = ckpt.get("hyper_parameters")
        if not isinstance(hparams, Mapping) or "backbone" not in hparams:
            raise CheckpointError(
                f"{path} is not a cfa-lightning checkpoint (no CFA hyper-parameters in it)"
            )
        backbone = {**hparams["backbone"], "pretrained": False, "checkpoint_path": None}
        kept = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}  # older checkpoints
        module = cls(**{**kept, "backbone": backbone})
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            reason = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"{path} does not match the model its own hyper-parameters describe: {reason}"
            ) from None
        return module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A datamodule built by Hydra keeps DictConfig arguments in its hyper-parameters; stored
        # as plain containers, every checkpoint loads with weights_only=True (checkpoint.py).
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))

    def setup(self, stage: str) -> None:
        if self.hparams.compile and not hasattr(self.model.describe, "_torchdynamo_orig_callable"):
            # Backbone + descriptor only (the search also traces, see tests/test_cfa.py, but is
            # one large matmul per block already).
            self.model.describe = torch.compile(self.model.describe)

    # ---- memory bank -------------------------------------------------------------------------

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

    @torch.no_grad()
    def build_bank(self, loader) -> None:
        """The bank from phi's initial output over the training set (memory_bank.py).

        phi runs under the training forward's precision (bf16 autocast under bf16-mixed), so the
        centres live where the training and test descriptors do. Under DDP each rank reads only
        its own share of the images; the sums and counts are reduced (positional) or the pools
        gathered (kmeans, coreset), and all ranks take rank 0's centres.
        """
        bank = self.model.bank
        n_images = len(loader.dataset)
        self._check_bank_build(n_images)
        bank.reset(n_images)
        trainer = self._trainer  # None when called outside a Trainer
        show = trainer is None or (
            trainer.is_global_zero and trainer.progress_bar_callback is not None
        )
        precision = trainer.precision_plugin.train_step_context() if trainer else nullcontext()
        world, rank = world_and_rank()
        if world > 1:
            loader = shard_loader(loader, rank, world)
        start = time.perf_counter()
        with precision:
            for batch in tqdm(loader, desc="Building memory bank", disable=not show, leave=False):
                images = batch["image"].to(self.device)
                taps = self._fit_taps(images, batch.get("image_path"))
                bank.update(self.model.describe(images, taps))
        stats, count = bank.statistics()  # temporaries of this build
        if world > 1:
            torch.distributed.all_reduce(count)
            if bank.pooled:
                stats = all_gather_rows(stats)  # every rank's pool, in rank order
            else:
                torch.distributed.all_reduce(stats)
        bank.finalize(stats, count)
        if world > 1:
            torch.distributed.broadcast(bank.centres, src=0)
        self.bank_build_s = time.perf_counter() - start
        rank_zero_info(
            f"memory bank ({bank.construction}) built from {int(count)} training images in "
            f"{self.bank_build_s:.1f} s: {bank.n_centres} centres of {bank.dim} dims"
        )

    def _check_bank_build(self, n_images: int) -> None:
        """Stop before the build when the bank's size or memory cannot work for n_images."""
        bank = self.model.bank
        if n_images < 1:
            raise RuntimeError("memory bank has no training image; is the train split empty?")
        self.model.check_bank_size(bank.centres_for(n_images))
        need = bank.build_bytes(n_images)
        available = available_memory_bytes()
        if available is not None and need > available:
            raise MemoryError(
                f"building the {bank.construction} bank needs about {need / 2**30:.1f} GiB for "
                f"{bank.pool_size(n_images)} patches of {bank.dim} dims, but only "
                f"{available / 2**30:.1f} GiB is available; lower model.bank.max_patches, "
                "model.gamma_d or data.image_size"
            )

    # ---- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]  # phi's CoordConv and r
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            amsgrad=self.hparams.amsgrad,
        )
        if self.hparams.get("lr_schedule", "none") == "none":  # the paper's constant rate
            return optimizer
        # cosine: lr for the first trained epoch, decaying towards 0 over the trained epochs
        # (trainer.max_epochs, less the untrained epoch 0 of a validated fit); stepped per epoch
        offset = int(bool(self.hparams.get("untrained_epoch")))
        epochs = max(int(self.trainer.max_epochs or 1) - offset, 1)

        def factor(epoch: int) -> float:  # epoch: Lightning epochs finished so far
            return 0.5 * (1.0 + math.cos(math.pi * max(epoch - offset, 0) / epochs))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "epoch"},
        }

    def _untrained_epoch(self) -> bool:
        """Epoch 0 of a validated fit trains nothing: its validation scores the un-adapted phi,
        so that selection can choose it (train.py: epoch k = the model after k training epochs)."""
        return bool(self.hparams.get("untrained_epoch")) and self.current_epoch == 0

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Epoch 0 of a validated fit: the closure runs (DDP syncs its zero gradients) but the
        # optimiser does not step, so no weight decay and no AdamW state. Lightning counts this
        # hook's calls, so trainer.global_step still advances by one per batch.
        if self._untrained_epoch():
            optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._untrained_epoch():
            # A zero loss through the trainable parameters only (no backbone pass): DDP needs a
            # backward on every rank, and returning None is refused under DDP.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        images = batch["image"]
        loss, _ = self.model.loss(images, taps=self._fit_taps(images, batch.get("image_path")))
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log(
            "train/radius",
            self.model.loss_fn.radius.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=bs,
        )
        return loss

    def on_fit_end(self) -> None:
        self._taps.clear()  # frees the kept taps; trainer.validate() outside a fit keeps none

    def _fit_taps(self, images: Tensor, paths: Sequence[str] | None) -> list[Tensor]:
        """The backbone's taps of a batch; kept across the epochs of a fit only (TapCache)."""
        state = getattr(self._trainer, "state", None)  # no trainer, or a stand-in without one
        if state is None or state.fn != TrainerFn.FITTING:
            return self.model.backbone(images)
        return self._taps.taps(self.model.backbone, images, paths)

    # ---- evaluation --------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = self._val_filter.keep(len(batch["image"]))
        n = len(keep) if keep is not None else len(batch["image"])  # padding only comes last
        if n == 0:
            return
        images, labels, masks = batch["image"][:n], batch["label"][:n], batch["mask"][:n, 0]
        paths = batch.get("image_path")
        taps = self._fit_taps(images, paths[:n] if paths is not None else None)
        synthetic = batch.get("synthetic", torch.zeros_like(labels, dtype=torch.bool))[:n]
        normal = labels == 0  # (n,)
        scores = images.new_zeros(n)  # (n,)
        maps = images.new_zeros(n, *images.shape[-2:])  # (n, H, W)
        if normal.any():  # val/loss and the calibration see the normal images only
            loss, out = self.model.loss(
                images[normal], with_output=True, taps=[t[normal] for t in taps]
            )
            bs = int(normal.sum())
            # Sums, reduced once at the epoch's end on every rank: a rank whose share of the
            # split holds no normal image still takes part in that reduction.
            self._val_loss_sum += float(loss) * bs
            self._val_score_sum += float(out.image_scores.sum())
            self._val_normal += bs
            scores[normal], maps[normal] = out.image_scores, out.maps
            self._val_scores.append(out.image_scores.detach())
            self._val_low = min(self._val_low, float(out.maps.min()))
        if not normal.all():
            out = self.model(images[~normal], taps=[t[~normal] for t in taps])
            scores[~normal], maps[~normal] = out.image_scores, out.maps
        # Validation pixel metrics on every s-th pixel per axis (s^2 fewer pixels: the exact
        # curves dominate a validation epoch otherwise); test metrics use every pixel.
        # An anomalous image with an empty mask has no pixel ground truth (a real defect from
        # data.val_dir comes without a mask): it counts in the image metrics only.
        pixel_rows = (labels == 0) | masks.flatten(1).any(dim=1)  # (n,)
        s = int(self.hparams.val_pixel_stride)
        self.val_metrics.update(
            scores, labels, maps[:, ::s, ::s], masks[:, ::s, ::s], pixel_rows=pixel_rows
        )
        self._val_has_anomaly |= bool(labels.any())
        self._val_real_anomaly |= bool((labels.bool() & ~synthetic.bool()).any())

    def on_validation_epoch_start(self) -> None:
        self._val_has_anomaly = False
        self._val_real_anomaly = False
        self._val_scores: list[torch.Tensor] = []
        self._val_low = float("inf")
        self._val_loss_sum = self._val_score_sum = 0.0  # over this rank's normal images
        self._val_normal = 0
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self._val_filter = PaddingFilter(loader)  # drops the sampler's padded duplicates
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        # Decided across ranks: compute() gathers from every rank, so every rank must call it,
        # also one whose share of the split happens to hold no anomaly (or no normal image).
        sums = torch.tensor(
            [self._val_loss_sum, self._val_score_sum, self._val_normal], device=self.device
        )
        loss_sum, score_sum, n_normal = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if n_normal > 0:  # the same on every rank
            self.log("val/loss", loss_sum / n_normal, prog_bar=True)
            self.log("val/score_mean", score_sum / n_normal)
        has_anomaly = self._any_rank(self._val_has_anomaly)
        real_anomaly = self._any_rank(self._val_real_anomaly)
        f1_thresholds = {}
        if has_anomaly:  # a split with real or synthetic anomalies
            results = self.val_metrics.compute()
            for name, value in results.items():  # val/image_threshold is the calibrated one
                self.log(f"val/{name.replace('_threshold', '_F1_threshold')}", value)
            rule = self.hparams.threshold_rule
            if rule == "f1" or (rule == "auto" and real_anomaly):
                f1_thresholds = {k: v for k, v in results.items() if k.endswith("_threshold")}
        self.val_metrics.reset()
        self._calibrate(f1_thresholds)
        if not self.trainer.sanity_checking:
            self.log("time/val_epoch_s", time.perf_counter() - self._val_start)

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` OR-ed over all ranks (the value itself when not distributed)."""
        return bool(self.all_gather(torch.tensor(int(flag), device=self.device)).any())

    def _calibrate(self, f1_thresholds: dict[str, float]) -> None:
        """Thresholds and normalisation from this epoch's normal validation images (in checkpoints).

        ``model.threshold_rule``: ``auto`` (default) takes the quantile rule on the normal
        images unless the split holds real (not synthetic) anomalies, where it takes the best-F1
        thresholds; ``quantile`` always takes the quantile rule, ``f1`` the F1 optimum whenever
        the split has anomalies, synthetic ones included.
        """
        local = torch.cat(self._val_scores).cpu() if self._val_scores else torch.zeros(0)
        scores = torch.cat(gather_objects(local)).flatten()  # every rank, any count
        if scores.numel() == 0:
            return
        low = float(self.all_gather(torch.tensor(self._val_low, device=self.device)).min())
        cal = self.model.calibration
        cal.fit(scores, low, self.hparams.threshold_quantile, f1_thresholds)
        self._calibrated_from = scores.numel()
        self.log("val/image_threshold", cal.image_threshold)
        self.log("val/pixel_threshold", cal.pixel_threshold)

    def on_train_epoch_start(self) -> None:
        self._train_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        # Includes the validation run at the end of the epoch (time/val_epoch_s of it).
        self.log("time/epoch_s", time.perf_counter() - self._train_start)

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        """`trainer.predict`: float32 image scores (B,) and maps (B, H, W), whatever the precision."""
        return self.model(batch["image"])

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
