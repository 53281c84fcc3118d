"""Run folders, atomic writes and fingerprinted, resumable stage artefacts.

A stage's artefact is a folder `data/<profile>/<stage>/` holding its files, `manifest.json` (the
fingerprint of everything it was made from) and `study_config.json` (the resolved config). It is
built in `<stage>.partial/`, which survives an interruption so that long builds resume, and moved
into place with a rename only when complete: a reader never sees a half-written artefact.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from metabolic import __version__
from metabolic.core.errors import ConfigError, DivergedError, StaleArtefactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG_FILE = "study_config.json"
PARTIAL_KEY = ".fingerprint"  # a partial's fingerprint: its work can be resumed only with the same inputs
_REUSE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("reuse_only", default=False)


def project_root() -> Path:
    """The repository root: $METABOLIC_ROOT, else the nearest parent holding `pyproject.toml` and `lib/metabolic`."""
    env = os.environ.get("METABOLIC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "lib" / "metabolic").is_dir():
            return candidate
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / "pyproject.toml").is_file():
        return package_root
    return here


def shown(path: Path | str) -> str:
    """`path` as logs show it: relative to the project root when under it (`data/smoke/backbone`), so stored
    notebook outputs carry no machine path; else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(project_root().resolve()))
    except ValueError:
        return str(path)


def output_root(variable: str, default: str) -> Path:
    """The folder `$variable` names (else `project_root()/default`), checked before anything is written: a
    `ConfigError` naming the variable when it is a file or lies under one, or cannot be written."""
    value = os.environ.get(variable)
    base = Path(value) if value else project_root() / default
    existing = next((p for p in (base, *base.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{variable}={base} cannot be a folder: {existing} is a file; point {variable} at a folder "
                          f"(it is created if missing)")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{variable}={base} cannot be written: {existing} is not writable; point {variable} at a "
                          f"folder you can write")
    return base


def run_dir(run: str) -> Path:
    """`data/<run>/` under the project root (or under $METABOLIC_DATA when set): `run` is a config's
    `run_name`, the profile or `<profile>+<hash>` for a study run with overrides (`metabolic.core.runs`)."""
    return output_root("METABOLIC_DATA", "data") / run


def figures_dir(run: str) -> Path:
    """`figures/<run>/` under the project root (or under $METABOLIC_FIGURES when set); `run` as in `run_dir`."""
    return output_root("METABOLIC_FIGURES", "figures") / run


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write or fsync does not name its file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, _json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_torch_save(path: Path, obj: Any) -> None:
    """`torch.save` through a temporary file and a rename, so a crash never leaves a truncated file."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def hash_path(path: Path) -> Path:
    """Where `write_hashed` records the SHA-256 of `path`: `<name>.sha256` beside it."""
    return Path(path).with_name(Path(path).name + ".sha256")


def write_hashed(path: Path, data: bytes) -> None:
    """`data` to `path` (atomic), then its SHA-256 beside it: a crash between the two leaves a file that fails
    its hash, never one that passes with the wrong bytes. For work a later run resumes from (checkpoints, chunks)."""
    atomic_write_bytes(path, data)
    atomic_write_text(hash_path(path), hashlib.sha256(data).hexdigest() + "\n")


def write_hashed_json(path: Path, obj: Any) -> None:
    """`obj` as JSON through `write_hashed` (a record a later run resumes from, e.g. one e-token unit)."""
    write_hashed(path, _json_text(obj).encode("utf-8"))


def read_hashed(path: Path) -> tuple[bytes | None, str]:
    """(the bytes of `path`, "") when they match the SHA-256 `write_hashed` recorded, else (None, why)."""
    path = Path(path)
    data = path.read_bytes()
    digest = hash_path(path)
    expected = digest.read_text(encoding="utf-8").strip() if digest.exists() else None
    if expected is None:
        return None, "it has no recorded hash"
    if expected != hashlib.sha256(data).hexdigest():
        return None, "its bytes do not match their recorded hash"
    return data, ""


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (keys sorted), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def pack_ragged(arrays, dtype) -> tuple[Any, Any]:
    """Ragged sequences as (flat array of `dtype`, int64 offsets of length n + 1) for compact storage."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if len(arrays) else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), offsets


def unpack_ragged(flat, offsets) -> list:
    """The inverse of `pack_ragged`: views of `flat`, one per sequence."""
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint(obj: Any) -> str:
    """A stable sha256 of a JSON-able description (config sections, upstream fingerprints, versions)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete artefact folder, or None if absent or unreadable."""
    try:
        manifest = read_json(Path(folder) / MANIFEST)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "fingerprint" in manifest else None


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def content_record(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a finished artefact (its manifest and partial marker excluded)."""
    folder = Path(folder)
    record = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in (MANIFEST, PARTIAL_KEY):
            record[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return record


# (folder, fingerprint) -> the stat signature of files whose hashes were checked in this process, so a
# notebook that asks for a stage ten times hashes its files once (a change of size, mtime or inode
# since then is checked again).
_verified: dict[tuple[str, str], tuple] = {}


def content_problem(folder: Path, manifest: dict[str, Any]) -> str | None:
    """Why the files of `folder` are not the ones its manifest recorded at the commit, or None if they are."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "its manifest records no file hashes (made by an older version)"
    signature = []
    for name, recorded in sorted(files.items()):
        try:
            stat = (Path(folder) / name).stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != recorded["bytes"]:
            return f"{name} has {stat.st_size} bytes, not the {recorded['bytes']} it was committed with"
        signature.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    memo_key = (str(Path(folder).resolve()), manifest["fingerprint"])
    if _verified.get(memo_key) == tuple(signature):
        return None
    for name, recorded in sorted(files.items()):
        if file_sha256(Path(folder) / name) != recorded["sha256"]:
            return f"{name} changed since it was committed (sha256 mismatch)"
    _verified[memo_key] = tuple(signature)
    return None


def staleness(folder: Path, key: str, required: tuple[str, ...] = ()) -> str | None:
    """Why `folder` is not a complete artefact made from `key` with intact files, or None when it is."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "absent, incomplete or without a readable manifest"
    if manifest.get("fingerprint") != key:
        return "stale (made from other inputs)"
    missing = [name for name in required if not (Path(folder) / name).exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    return content_problem(folder, manifest)


def is_fresh(folder: Path, key: str, required: tuple[str, ...] = ()) -> bool:
    """True when `folder` holds a complete, intact artefact made from `key` with all `required` files."""
    return staleness(folder, key, required) is None


class Built(NamedTuple):
    """A committed artefact: its folder and the key its manifest records (what a later stage's description cites)."""

    folder: Path
    key: str


def artefact_key(description: dict[str, Any]) -> str:
    """The key an artefact made from `description` is committed under: its fingerprint with the library's version.
    `build_artefact` computes it; a caller needs it beforehand only to agree on it with other processes."""
    return fingerprint({**description, "library_version": __version__})


def stat_signature(folder: Path) -> tuple:
    """(name, bytes, mtime, inode) of every file under `folder`: equal signatures, the same files as before."""
    folder = Path(folder)
    return tuple((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino)
                 for p in sorted(folder.rglob("*")) if p.is_file() for st in (p.stat(),))


def build_artefact(
    folder: Path,
    description: dict[str, Any],
    build: Callable[[Path], dict[str, Any] | None],
    config_json: str | None = None,
    required: tuple[str, ...] = (),
    force: bool = False,
) -> Built:
    """The artefact in `folder`, built with `build(work_dir)` unless a fresh copy already exists.

    `description` is everything the artefact depends on; its key (`artefact_key`) decides freshness. A
    stale or corrupt folder is rebuilt, never reused. `build` writes into `work_dir` (`<folder>.partial`,
    kept across interruptions when its key matches, so a build can resume from checkpoints) and may
    return extra manifest fields.
    """
    folder = Path(folder)
    key = artefact_key(description)
    description = {**description, "library_version": __version__}
    if not force and is_fresh(folder, key, required):
        log.info("reusing %s (fingerprint %s)", shown(folder), key[:12])
        shutil.rmtree(_trash_name(folder), ignore_errors=True)  # left by a kill just after a commit
        return Built(folder, key)
    if _REUSE_ONLY.get():
        raise StaleArtefactError(f"{shown(folder)} is {staleness(folder, key, required)}: rerun the stages that make it "
                                 "(python -m metabolic run --profile <profile>)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time per artefact (two notebooks or processes may ask for the same stage).
    with _exclusive(folder.with_name(f".{folder.name}.lock")):
        if not force and is_fresh(folder, key, required):
            return Built(folder, key)
        _build_locked(folder, key, description, build, config_json, required)
        return Built(folder, key)


# Disk faults a library writer can hit; their own exceptions (safetensors' SafetensorError: "... No space left on
# device (os error 28)") and numpy's OSError(28) name no path, so the CLI could not say where the disk is full.
_DISK_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def naming_faults(path: Path):
    """Within: a disk fault that names no file (a library's write into `path`) is re-raised as an `OSError`
    naming `path`, so the one-line error says where (`metabolic.core.errors.os_fault_message`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in _DISK_FAULTS:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    except Exception as exc:
        match = re.search(r"\(os error (\d+)\)", str(exc))
        if match is None or int(match[1]) not in _DISK_FAULTS:
            raise
        code = int(match[1])
        raise OSError(code, os.strerror(code), str(path)) from exc


@contextlib.contextmanager
def reuse_only():
    """Within this block, an artefact that is not fresh raises `StaleArtefactError` instead of being built:
    for readers that must show what is on disk, not start a long build (the explorer's strongest run)."""
    token = _REUSE_ONLY.set(True)
    try:
        yield
    finally:
        _REUSE_ONLY.reset(token)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    import fcntl

    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process builds the same artefact: say so, then wait for it
            log.info("waiting for another process building %s (lock %s)", shown(lock_path.with_name(
                lock_path.name[1:].removesuffix(".lock"))), shown(lock_path))
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_locked(folder: Path, key: str, description: dict[str, Any], build, config_json: str | None,
                  required: tuple[str, ...]) -> None:
    """Build into `<folder>.partial`, then commit it with renames that a kill at any point cannot undo.

    A partial keeps its `.fingerprint` until it is in place, and a finished one also holds the
    manifest: a rerun after a kill during the commit adopts it instead of building again.
    """
    _recover_swap(folder)
    if folder.exists():
        log.warning("%s is %s: rebuilding it", shown(folder), staleness(folder, key, required))
    work = folder.with_name(folder.name + ".partial")
    work_key = work / PARTIAL_KEY
    if work.exists() and (not work_key.exists() or work_key.read_text().strip() != key):
        shutil.rmtree(work)  # a partial build made from other inputs cannot be resumed
    done = read_manifest(work)
    finished = done is not None and done.get("fingerprint") == key and content_problem(work, done) is None
    if finished:
        log.info("adopting %s: it was finished before an interrupted commit", shown(work))
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_key, key)
        try:
            with naming_faults(work):
                extra = build(work) or {}
        except DivergedError:
            shutil.rmtree(work, ignore_errors=True)  # its checkpoints would only diverge again
            raise
        if config_json is not None:
            atomic_write_text(work / CONFIG_FILE, config_json)
        # Hashed last, when every file is written; checked on every reuse (see `content_problem`).
        atomic_write_json(work / MANIFEST, {"fingerprint": key, "description": description, **extra,
                                            "files": content_record(work)})
    _replace_dir(work, folder)
    (folder / PARTIAL_KEY).unlink(missing_ok=True)  # only partials carry it; a leftover here is harmless


def _trash_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def _recover_swap(dst: Path) -> None:
    """Finish or undo a commit a kill interrupted: the old folder renamed away, the new not yet in place.

    With a finished partial waiting, the old copy is obsolete; without one, the old copy goes back.
    """
    trash = _trash_name(dst)
    if not trash.exists():
        return
    if not dst.exists() and not (dst.with_name(dst.name + ".partial") / MANIFEST).exists():
        os.replace(trash, dst)
        log.info("restored %s from an interrupted commit", shown(dst))
    else:
        shutil.rmtree(trash, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; the old one is renamed away first, then deleted."""
    trash = None
    if dst.exists():
        trash = _trash_name(dst)
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
