"""Callbacks: test overlays and W&B test media (Lightning), the end-of-sweep report (Hydra)."""

from .overlays import TestOverlays
from .sweep_report import SweepReport, sweep_status
from .wandb_media import WandbTestMedia

__all__ = ["SweepReport", "TestOverlays", "WandbTestMedia", "sweep_status"]
