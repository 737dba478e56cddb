"""Evaluation metrics (docs/method.md, "Evaluation protocol"): AUROC, AUPRO, best F1, image and
pixel level."""

from cfa_lightning.metrics.anomaly import AnomalyMetrics, is_anomalous
from cfa_lightning.metrics.aupro import compute_aupro, compute_pro_curve

__all__ = ["AnomalyMetrics", "compute_aupro", "compute_pro_curve", "is_anomalous"]
