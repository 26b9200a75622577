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

import numpy as np

__all__ = ["Split", "read_split", "write_split", "read_category_csv", "make_editmar_split"]

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


def write_split(path: str | os.PathLike, cases: dict[str, list[tuple[str, str | None]]], header: str) -> str:
    """Write a split file atomically; returns its sha256."""
    from marbench.files import atomic_write

    lines = [f"# {line}" for line in header.splitlines()]
    for name, rows in cases.items():
        lines += [f"{name} {cid}" + (f" {cat}" if cat else "") for cid, cat in rows]
    payload = ("\n".join(lines) + "\n").encode()
    atomic_write(path, payload)
    return hashlib.sha256(payload).hexdigest()


def read_category_csv(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """``(case_id, category, patient)`` rows of a category CSV with columns ``case_id,category[,patient]``.

    The AAPM release does not label anatomical categories or patients; the CT-EditMAR protocol needs both, so
    users supply this table (one row per slice). Without a ``patient`` column every slice counts as its own
    patient.

    Raises:
        FileNotFoundError: missing file. ValueError: a missing column or empty field (file, line).
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: category CSV not found (columns case_id,category[,patient])")
    rows = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            cid, cat = (row.get("case_id") or "").strip(), (row.get("category") or "").strip()
            if not cid or not cat:
                raise ValueError(f"{path}:{line}: expected non-empty case_id and category, found {row}")
            rows.append((cid, cat, (row.get("patient") or cid).strip()))
    return rows


def make_editmar_split(rows: list[tuple[str, str, str]], test_size: int = 1000,
                       train_sizes: tuple[int, ...] = (16, 32, 64, 128), references: int = 5, seed: int = 0
                       ) -> tuple[list[tuple[str, str]], dict[int, list[tuple[str, str]]], dict[str, list[str]]]:
    """The CT-EditMAR protocol (Emirdagi et al., Sec. 3.1): a held-out test set balanced over categories,
    training subsets of N slices sampled uniformly from the rest (nested: each is a prefix of one random
    permutation, so a larger N adds slices), and for every test slice a pool of ``references`` metal-free
    reference slices of the same category from other patients.

    Args:
        rows: ``(case_id, category, patient)`` (``read_category_csv``).
    Returns:
        ``(test, train, pools)``: test ``[(case_id, category)]``; N -> training ``[(case_id, category)]``;
        test case -> its reference case ids.
    Raises:
        ValueError: too few slices for the test set, the largest training subset or a reference pool.
    """
    rng = np.random.default_rng(seed)
    categories = sorted({c for _, c, _ in rows})
    per_cat = test_size // len(categories)
    if per_cat * len(categories) != test_size:
        raise ValueError(f"test_size {test_size} does not divide over {len(categories)} categories")
    test: list[tuple[str, str, str]] = []
    for cat in categories:
        members = [r for r in rows if r[1] == cat]
        if len(members) < per_cat:
            raise ValueError(f"category {cat!r}: expected at least {per_cat} slices for the test set, "
                             f"found {len(members)}")
        test += [members[i] for i in sorted(rng.choice(len(members), per_cat, replace=False))]
    test_ids = {r[0] for r in test}
    rest = [r for r in rows if r[0] not in test_ids]
    if len(rest) < max(train_sizes):
        raise ValueError(f"expected at least {max(train_sizes)} slices outside the test set, found {len(rest)}")
    order = rng.permutation(len(rest))
    train = {n: [(rest[i][0], rest[i][1]) for i in sorted(order[:n])] for n in train_sizes}
    pools = {}
    for cid, cat, patient in test:
        candidates = [r[0] for r in rest if r[1] == cat and r[2] != patient]
        if len(candidates) < references:
            raise ValueError(f"test slice {cid}: expected {references} reference slices of category {cat!r} "
                             f"from other patients, found {len(candidates)}")
        pools[cid] = [candidates[i] for i in sorted(rng.choice(len(candidates), references, replace=False))]
    return [(r[0], r[1]) for r in test], train, pools
