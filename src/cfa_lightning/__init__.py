"""cfa-lightning: CFA (Lee, Lee & Song 2022) for industrial anomaly detection and localization."""

__version__ = "0.1.0"
