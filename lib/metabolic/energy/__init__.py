"""Measured inference energy: the NVML meter, workloads, per-query measurement, e-tokens, joule calibration."""
