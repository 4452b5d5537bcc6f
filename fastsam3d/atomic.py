"""Atomic file writes: write beside the target, then rename over it.

A failed or interrupted write leaves neither a partial output nor a stray temporary file, and
the finished file gets the usual permissions (``mkstemp`` alone would make it owner-only).
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

_UMASK = os.umask(0)  # read once at import (single-threaded), then restored
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``.

    Raises OSError if the folder is not writable; the temporary file is always removed.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # After the write: some writers (safetensors) replace the file, making it owner-only.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(path: Path, rows: Iterable[Mapping], fieldnames: Iterable[str]) -> Path:
    """Write ``rows`` (dicts) as CSV with a header, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    return path
