"""One CPU numeric mode for the `smoke` profile, so its checked numbers are the same on any x86-64 CPU.

Why: float reductions in MKL's GEMM and ATen's vectorised kernels are ordered differently per CPU
vendor, instruction set and thread count. Three epochs of training amplify the last-bit differences
(validation perplexity 1230.5 on one machine, 1222.1 on another), and sampled generation then
diverges token by token. Pinning the kernels removes the differences instead of hiding them:

- `ATEN_CPU_CAPABILITY=avx2`: ATen's AVX2 kernels (with their own SLEEF maths, no libm) on every
  CPU that has AVX2, including AVX-512 ones that would otherwise take the AVX-512 kernels;
- `MKL_CBWR=COMPATIBLE`: MKL's conditional numerical reproducibility branch that gives the same
  results on Intel and non-Intel CPUs (the `AVX2` branch does so only across Intel CPUs);
- `ONEDNN_MAX_CPU_ISA=AVX2`: the same ceiling for oneDNN, should an op route through it;
- `OPENBLAS_CORETYPE=Haswell`: numpy's OpenBLAS (the ridge probes of `evaluate.cost_fit`) on its
  AVX2 kernels on every x86 CPU, instead of the kernel it picks per CPU model;
- a fixed thread count (2): MKL's reproducibility and ATen's parallel reductions depend on it.

The variables must be in place before torch loads its kernels, so `pin` runs first in every entry
point (the CLI, `metabolic.report.notebook.setup`, the test suite) and child processes (papermill and nbval
kernels) inherit them. It costs speed (MKL's compatible branch is SSE2), which is why only the
reproducible profiles pin. `METABOLIC_NUMERICS=native` opts out (faster, last digits may differ from
the stored notebook outputs). Standard library only: importing this module never imports torch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, MutableMapping

log = logging.getLogger(__name__)

# Profiles whose numbers are checked (nbval, pytest) and so must not depend on the CPU.
REPRODUCIBLE_PROFILES = ("smoke",)
THREADS = 2
PINNED_ENV: Mapping[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}
OPT_OUT = "METABOLIC_NUMERICS"  # =native: keep the machine's own kernels and threads


def wanted(profile: str, environ: Mapping[str, str] = os.environ) -> bool:
    """True when `profile` runs in the pinned mode (a reproducible profile, not opted out)."""
    return profile in REPRODUCIBLE_PROFILES and environ.get(OPT_OUT, "pinned") != "native"


def pin(profile: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Put the pinned settings into `environ` for `profile`; return True when the mode is pinned.

    Settings the caller's environment already has are replaced (with one log line), because a
    different value would change the checked numbers. When torch is already loaded in this process
    its kernels are chosen: the variables still reach child processes, and a warning says that this
    process itself may differ in the last digits (start a fresh kernel to get the pinned mode).
    """
    if not wanted(profile, environ):
        return False
    changed = {k: (environ.get(k), v) for k, v in PINNED_ENV.items() if environ.get(k) != v}
    for key, (old, new) in changed.items():
        if old is not None:
            log.info("%s=%s replaced by %s for the %s profile (set %s=native to keep yours)", key, old, new, profile, OPT_OUT)
        environ[key] = new
    if changed and "torch" in sys.modules and environ is os.environ:
        import torch

        torch.set_num_threads(THREADS)
        log.warning("torch was loaded before the %s profile pinned its CPU numerics: this process keeps %s kernels, "
                    "so its numbers may differ in the last digits from the stored outputs; restart the kernel "
                    "and call metabolic.report.notebook.setup first", profile, torch.backends.cpu.get_cpu_capability())
    return True


def describe() -> dict[str, str | int | None]:
    """The numeric mode this process actually runs in (for notebooks and run records)."""
    info: dict[str, str | int | None] = {k: os.environ.get(k) for k in PINNED_ENV}
    if "torch" in sys.modules:
        import torch

        info["aten_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_threads"] = torch.get_num_threads()
    return info
