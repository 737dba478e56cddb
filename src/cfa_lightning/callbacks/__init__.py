"""Callbacks: test overlays, W&B test media (Lightning); launcher check, sweep report (Hydra)."""

from .launcher_check import LauncherCheck
from .overlays import TestOverlays
from .sweep_report import SweepReport, sweep_status
from .wandb_media import WandbTestMedia

__all__ = ["LauncherCheck", "SweepReport", "TestOverlays", "WandbTestMedia", "sweep_status"]
