"""File helpers shared by every writer of the suite: atomic writes (a crash never leaves half a file under the
final name) and sha256 digests of files."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_json", "sha256_file"]


def atomic_write(path: str | os.PathLike, payload: bytes | str) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = payload.encode() if isinstance(payload, str) else payload
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """``atomic_write`` of ``obj`` as JSON with sorted keys and a final newline."""
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()
