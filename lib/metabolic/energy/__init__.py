"""Measured inference energy: the meter (zeus: NVML, RAPL), workloads, per-query measurement, e-tokens, the joule fit (semantic cost -> joules)."""
