"""Where datasets live, and how they get there: local lookup first, else download + checksum.

One setting decides the data location: the ``METABENCH_DATA`` environment variable (default
``./data``). Files already present are used as they are (their *structure* is validated by each
dataset); files that are missing are fetched from their canonical upstream URL and verified against
the published checksum before they are moved into place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "METABENCH_DATA"


class DataError(RuntimeError):
    """A dataset is missing, corrupt or cannot satisfy the request; the message names the fix."""


def data_root() -> Path:
    """The folder datasets live in: ``$METABENCH_DATA`` or ``./data``."""
    return Path(os.environ.get(DATA_ENV, "data")).expanduser().resolve()


def cache_root() -> Path:
    """Where decoded stores are cached: ``$METABENCH_CACHE`` or ``./.cache``.

    Never inside the data folder, which may be a shared, read-only mount.
    """
    return Path(os.environ.get("METABENCH_CACHE", ".cache")).expanduser().resolve()


@dataclass(frozen=True)
class RemoteFile:
    """A file with a canonical URL and the checksum its publisher gives (or we measured once)."""

    url: str
    md5: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch(remote: RemoteFile, destination: Path) -> Path:
    """Download ``remote`` to ``destination`` atomically, verifying its md5.

    Nothing is left at ``destination`` unless the checksum matches, so an interrupted or corrupt
    download never masquerades as a dataset.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(remote.url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:
            raise DataError(
                f"could not download {remote.url} ({error}). Place {remote.name} in "
                f"{destination.parent} yourself, or set {DATA_ENV} to a folder that has it."
            ) from error
        actual = md5sum(tmp)
        if actual != remote.md5:
            raise DataError(
                f"checksum mismatch for {remote.url}: md5 {actual}, expected {remote.md5}. "
                "The download is corrupt or the upstream file changed; nothing was written."
            )
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def locate_or_fetch(relative: Path, remote: RemoteFile | None, download: bool) -> Path:
    """Return ``<data root>/<relative>``, downloading it first when absent and allowed."""
    path = data_root() / relative
    if path.exists():
        return path
    if remote is None or not download:
        raise DataError(
            f"{path} not found. Place it there (see README, 'Data'), or point {DATA_ENV} at the "
            "folder that holds your datasets."
        )
    return fetch(remote, path)
