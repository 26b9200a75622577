"""File helpers shared by every writer of the suite: atomic writes (a crash never leaves half a file under the
final name), a lock for the one-off cache entries that concurrent grid workers share, sha256 digests of files,
and the provenance that fingerprints and records carry (digests of the installed source, library versions)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_json", "cache_lock", "sha256_file", "source_digest", "library_versions"]

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, payload: bytes | str) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = payload.encode() if isinstance(payload, str) else payload
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private (0600); a result or page must be as readable as any file written here
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """``atomic_write`` of ``obj`` as JSON with sorted keys and a final newline."""
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike):
    """Hold an inter-process lock on the cache entry ``path`` (a ``filelock`` file ``<path>.lock`` beside it).

    A one-off cache entry (the segmenter, the editor's stand-in backbone, a pre-training stage) is built by
    whichever grid worker needs it first; a second worker needing it meanwhile waits here and then finds it,
    instead of training it a second time. Callers check for the entry again once they hold the lock:

    >>> import tempfile
    >>> entry = Path(tempfile.mkdtemp()) / "model.pt"
    >>> with cache_lock(entry):
    ...     if not entry.is_file():
    ...         atomic_write(entry, b"weights")
    >>> entry.read_bytes()
    b'weights'
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def split_cache_key(root: str | os.PathLike, split_sha256: str, **settings) -> str:
    """The name (32 hex digits) of a one-off cache file computed from one benchmark split, such as a segmenter
    or a pre-trained network: the sha256 of the data (its ``manifest.json``'s sha256, or the resolved ``root``
    without one), the split file's sha256 and the ``settings`` (JSON with sorted keys; other objects as ``str``).
    """
    manifest = Path(root) / "manifest.json"
    data = sha256_file(manifest) if manifest.is_file() else str(Path(root).resolve())
    key = json.dumps({"data": data, "split": split_sha256, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(packages=(), modules=()) -> dict[str, str]:
    """sha256 of each ``.py`` file of the installed ``packages`` (recursively) and of the ``modules``, keyed by
    its module path (``marbench/physics/geometry.py``), sorted.

    Raises:
        ModuleNotFoundError: a package or module that is not importable.
    """
    import importlib

    files: dict[str, str] = {}
    for name in packages:
        module = importlib.import_module(name)
        # a package whose folders are mapped apart (marbench, marbench.methods, marbench.datasets) has one per name
        folders = [Path(p) for p in getattr(module, "__path__", [Path(module.__file__).parent])]
        for folder in folders:
            for f in sorted(folder.rglob("*.py")):
                if "__pycache__" not in f.parts:
                    files[name.replace(".", "/") + "/" + f.relative_to(folder).as_posix()] = sha256_file(f)
    for name in modules:
        files[name.replace(".", "/") + ".py"] = sha256_file(importlib.import_module(name).__file__)
    return dict(sorted(files.items()))


def library_versions(names, missing: str | None = None) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (``missing`` for one that is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = missing
    return out
