"""Fetch an official checkpoint from the Hugging Face Hub by name, verified (``fastsam3d download``).

The only network access in fastsam3d, and only when the user runs that command. Files go into a
Hugging Face cache folder (``--cache``, else ``$FASTSAM3D_CACHE``, else huggingface_hub's
default), so other tools share them; ``--offline`` (or ``HF_HUB_OFFLINE=1``) uses only the cache.

Each file is checked twice. First its sha256: against the digest pinned in
:data:`fastsam3d.weights.KNOWN_CHECKPOINTS`, or without one against the Hub's LFS sha256 (the
file's ETag; offline, the cache's record of it: the name of the blob the snapshot links to). A
file that differs is moved aside as ``<blob>.rejected`` (nothing is deleted) and its snapshot
link removed, so neither fastsam3d nor huggingface_hub will find it as good again. Then the file
must load with the safe loader (:func:`fastsam3d.build_model`) as the expected architecture.

The user's Hugging Face token is never sent (the checkpoints are public, and a mirror given with
``--endpoint`` must not receive it).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastsam3d import weights
from fastsam3d.errors import CheckpointError, DownloadError
from fastsam3d.weights import KnownCheckpoint

CACHE_ENV = "FASTSAM3D_CACHE"
INSTALL_HINT = "pip install 'fastsam3d[download]'"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Fetched:
    """A checkpoint found or downloaded, checksummed and loaded once."""

    name: str
    path: Path
    """The file in the cache (a snapshot link): what ``--model PATH`` takes."""
    sha256: str
    checked_against: str | None
    """What the digest matched; None when there was nothing to compare with."""
    revision: str
    commit: str
    arch: str
    parameters: int
    size: int


def known(name: str) -> KnownCheckpoint:
    """The entry of :data:`fastsam3d.weights.KNOWN_CHECKPOINTS` called ``name``."""
    for entry in weights.KNOWN_CHECKPOINTS:
        if entry.name == name:
            return entry
    names = ", ".join(entry.name for entry in weights.KNOWN_CHECKPOINTS)
    raise DownloadError(
        f"unknown checkpoint {name!r}; known names: {names} (see `fastsam3d models`)"
    )


def cache_folder(cache: Path | None = None) -> Path:
    """``cache``, else ``$FASTSAM3D_CACHE``, else huggingface_hub's default cache folder."""
    _require_hub()
    from huggingface_hub import constants

    return Path(cache or os.environ.get(CACHE_ENV) or constants.HF_HUB_CACHE).expanduser()


def cached_path(entry: KnownCheckpoint, cache: Path | None = None) -> Path | None:
    """The cached file of ``entry`` at its revision, without any network access; None when it is
    not cached or huggingface_hub is not installed. The file is not re-verified."""
    try:
        folder = cache_folder(cache)
    except DownloadError:
        return None
    return _cached(entry, entry.revision, folder)


def fetch(
    name: str,
    *,
    cache: Path | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    offline: bool = False,
) -> Fetched:
    """Download checkpoint ``name`` (or find it in the cache), verify its sha256 and that it loads.

    Args:
        name: an entry of :data:`fastsam3d.weights.KNOWN_CHECKPOINTS`.
        cache: cache folder (default: ``$FASTSAM3D_CACHE``, else huggingface_hub's).
        revision: branch, tag or commit (default: the entry's).
        endpoint: Hub URL, e.g. a mirror (default: huggingface_hub's, ``$HF_ENDPOINT``).
        offline: use only the cache (also when ``HF_HUB_OFFLINE`` is set).

    Raises:
        DownloadError: unknown name, huggingface_hub missing, Hub unreachable or without the file,
            not cached (offline), or a checksum mismatch (the file is then moved aside).
        CheckpointError: the file does not load as the entry's architecture.
    """
    entry = known(name)
    folder = cache_folder(cache)
    revision = revision or entry.revision
    if offline or _offline_env():
        path = _cached(entry, revision, folder)
        if path is None:
            raise DownloadError(
                f"{entry.name} ({entry.repo_id}/{entry.filename} at {revision}) is not in the cache "
                f"{folder}; run `fastsam3d download {entry.name}` online once (without --offline "
                "and HF_HUB_OFFLINE), or pass --cache with the folder it was downloaded to"
            )
        hub_sha, hub_label = _cache_record(path), "the Hub's LFS sha256 recorded in the cache"
    else:
        hub_sha, path = _download(entry, revision, folder, endpoint)
        hub_label = "the Hub's LFS sha256"
    digest = sha256_file(path)
    expected, against = (
        (entry.sha256.lower(), "the sha256 pinned in fastsam3d")
        if entry.sha256
        else (hub_sha, hub_label)
    )
    if expected is not None and digest != expected:
        kept = _reject(path)
        upstream = (
            "; the Hub's own sha256 matches the file, so the repository changed since fastsam3d "
            "pinned it"
            if entry.sha256 and hub_sha == digest
            else ""
        )
        raise DownloadError(
            f"{entry.name}: sha256 mismatch: the file has {digest} but {against} is {expected}"
            f"{upstream}. The file was moved aside to {kept} (kept for inspection, delete it when "
            "done) and is no longer in the cache; run the command again to download it afresh"
        )
    arch, parameters = _check_loads(path, entry)
    return Fetched(
        name=entry.name,
        path=path,
        sha256=digest,
        checked_against=against if expected is not None else None,
        revision=revision,
        commit=path.parents[len(PurePosixPath(entry.filename).parts) - 1].name,
        arch=arch,
        parameters=parameters,
        size=path.stat().st_size,
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _require_hub() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise DownloadError(
            f"downloading checkpoints needs huggingface_hub: {INSTALL_HINT}"
        ) from None


def _offline_env() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (now, not at its import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def _cached(entry: KnownCheckpoint, revision: str, folder: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        entry.repo_id, entry.filename, cache_dir=folder, revision=revision
    )
    return Path(found) if isinstance(found, str) else None


def _download(
    entry: KnownCheckpoint, revision: str, folder: Path, endpoint: str | None
) -> tuple[str | None, Path]:
    """(the Hub's LFS sha256 or None, the downloaded file). One HEAD first: it fails fast without
    a network (hf_hub_download would retry with backoff) and gives the Hub's digest."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(entry.repo_id, entry.filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=False)
    except RepositoryNotFoundError:
        raise DownloadError(f"{url}: no public repository {entry.repo_id} on this Hub") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{url}: {entry.repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise DownloadError(
            f"{url}: {entry.repo_id} has no file {entry.filename} at {revision}"
        ) from None
    except Exception as exc:  # transport errors differ between huggingface_hub versions
        raise _unreachable(url, entry, folder, exc) from exc
    try:
        path = hf_hub_download(
            entry.repo_id,
            entry.filename,
            revision=revision,
            cache_dir=folder,
            endpoint=endpoint,
            token=False,
        )
    except Exception as exc:  # the connection can drop after the HEAD, the disk fill up, ...
        raise _unreachable(url, entry, folder, exc) from exc
    etag = (meta.etag or "").lower()
    return (etag if _SHA256.fullmatch(etag) else None), Path(path)


def _unreachable(url: str, entry: KnownCheckpoint, folder: Path, exc: Exception) -> DownloadError:
    return DownloadError(
        f"could not download {url} ({type(exc).__name__}: {exc}). Without a network, use "
        f"--offline for a copy already in the cache ({folder}); behind a firewall, give a Hub "
        f"mirror with --endpoint URL; or download the file by hand ({entry.url}) and pass it "
        "with --model PATH"
    )


def _cache_record(path: Path) -> str | None:
    """The LFS sha256 the Hub gave when the file was cached: the name of its blob."""
    name = path.resolve().name
    return name if path.is_symlink() and _SHA256.fullmatch(name) else None


def _reject(path: Path) -> Path:
    """Move a file that failed its checksum aside (its blob becomes ``*.rejected``) and remove the
    snapshot link to it, so the cache no longer offers it; returns where the bytes are now."""
    blob = path.resolve()
    kept = blob.with_name(blob.name + ".rejected")
    try:
        os.replace(blob, kept)
        if path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise DownloadError(
            f"{path} failed its checksum and could not be moved aside ({exc}); delete it by hand"
        ) from exc
    return kept


def _check_loads(path: Path, entry: KnownCheckpoint) -> tuple[str, int]:
    """Load the file with the safe loader; (architecture, parameter count)."""
    from fastsam3d.registry import build_model

    try:
        model = build_model(checkpoint=path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{entry.name}: the checksum matches, but the file does not load as a {entry.arch} "
            f"checkpoint: {exc}"
        ) from exc
    if model.config.arch != entry.arch:
        raise CheckpointError(
            f"{entry.name}: {path} loads as {model.config.arch}, not the expected {entry.arch}"
        )
    return model.config.arch, sum(p.numel() for p in model.parameters())
