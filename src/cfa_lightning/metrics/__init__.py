"""Evaluation metrics of cfa_spec.md section 5: AUROC, AUPRO and best F1, image and pixel level."""

from cfa_lightning.metrics.anomaly import AnomalyMetrics, is_anomalous
from cfa_lightning.metrics.aupro import compute_aupro, compute_pro_curve

__all__ = ["AnomalyMetrics", "compute_aupro", "compute_pro_curve", "is_anomalous"]
