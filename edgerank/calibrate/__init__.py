"""Calibration: per-layer readouts fitted on unlabelled data, and the pruning setting that keeps P@K."""
