"""MetabolicGPT-2 (eq. 12-16), the proxy <-> CSC calibration (eq. 17-21) and the GPT-2 backbone."""
