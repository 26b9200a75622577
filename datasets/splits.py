"""Split files: plain text under ``datasets/splits/``, one case per line.

Format: ``<split> <case_id> [<category>]`` with ``split`` in ``train``/``val``/``test`` (or a protocol's own
names), ``case_id`` as ``<part>/<anatomy><index>`` (e.g. ``body1/body12``); ``#`` starts a comment. The
file's sha256 goes into every result manifest, so a result names exactly the cases it was computed on.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Split", "read_split"]

_LINE = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)\s+(?P<case>[^\s/]+/[a-z]+\d+)(?:\s+(?P<category>\S+))?$")


@dataclass
class Split:
    """Parsed split file: ``cases[split] = [(case_id, category or None), ...]`` in file order."""

    path: Path
    sha256: str
    cases: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)


def read_split(path: str | os.PathLike) -> Split:
    """Read and check a split file.

    Raises:
        FileNotFoundError: missing file.
        ValueError: a malformed line or a case listed twice (file, line number, expected and found).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    raw = path.read_bytes()
    split = Split(path=path, sha256=hashlib.sha256(raw).hexdigest())
    seen: dict[str, int] = {}
    for number, line in enumerate(raw.decode().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = _LINE.match(text)
        if not m:
            raise ValueError(f"{path}:{number}: expected '<split> <part>/<anatomy><index> [<category>]', "
                             f"found {text!r}")
        case = m.group("case")
        if case in seen:
            raise ValueError(f"{path}:{number}: case {case} already listed on line {seen[case]}")
        seen[case] = number
        split.cases.setdefault(m.group("split"), []).append((case, m.group("category")))
    return split
