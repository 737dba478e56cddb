"""Evaluation metrics of cfa_spec.md section 5: AUROC, AUPRO and best F1, image and pixel level."""

from cfa_lightning.metrics.anomaly import AnomalyMetrics
from cfa_lightning.metrics.aupro import AUPRO, compute_aupro, compute_pro_curve

__all__ = ["AUPRO", "AnomalyMetrics", "compute_aupro", "compute_pro_curve"]
