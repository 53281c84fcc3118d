"""Measured inference energy: the NVML meter, workloads, per-query measurement, e-tokens, the joule fit (semantic cost -> joules)."""
