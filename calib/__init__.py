"""Calibration data: images → tensors → activation statistics."""
