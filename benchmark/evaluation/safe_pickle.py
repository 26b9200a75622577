"""A restricted unpickler for reference data that arrives as pickles (the AAPM CT-MAR scoring program's
``1_data_dicts/*.pkl``).

``pickle.load`` runs whatever callable a pickle names, so a pickle from elsewhere is never loaded with it here.
``load_restricted`` admits only what plain data needs: dicts, lists, tuples, strings, numbers, booleans, ``None``
(pickle opcodes that call nothing), and numpy arrays and scalars (the few numpy reconstruction functions that
``ndarray.__reduce__`` names: ``numpy.core.multiarray._reconstruct`` and ``scalar``, ``numpy.ndarray``,
``numpy.dtype``, ``numpy.core.numeric._frombuffer`` for protocol-5 buffers, and ``_codecs.encode``, with which
protocol 2 writes an array's raw bytes; ``numpy._core`` is numpy 2's name of the same module). Any other global
(``os.system``, ``builtins.eval``, a class of some package) is refused before it is imported, with an
``UnpicklingError`` naming it; arrays of Python objects are refused after loading.

>>> import io, pickle
>>> load_restricted(io.BytesIO(pickle.dumps({"01": {"voxelsize": [0.78, 0.78, 1.0], "bonetrs": 1600}})))
{'01': {'voxelsize': [0.78, 0.78, 1.0], 'bonetrs': 1600}}
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load_restricted", "load_restricted_file"]

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    (module, name)
    for core in ("numpy.core", "numpy._core")
    for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                         (f"{core}.numeric", "_frombuffer"))
) | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` answers only ``ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: this loader admits only numpy arrays, dicts, lists and "
                f"scalars (allowed globals: {sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)})")
        return super().find_class(module, name)


def _check_plain(obj, where: str = "the pickle") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: expected a numeric numpy array, found dtype {obj.dtype}")
    elif not isinstance(obj, (str, bytes, int, float, complex, bool, type(None), np.generic)):
        raise pickle.UnpicklingError(f"{where}: expected plain data, found {type(obj).__name__}")


def load_restricted(file: io.BufferedIOBase):
    """Unpickle plain data from a binary file object (see the module docstring).

    Raises:
        pickle.UnpicklingError: the pickle names a global outside ``ALLOWED_GLOBALS`` or holds an object array.
    """
    obj = RestrictedUnpickler(file).load()
    _check_plain(obj)
    return obj


def load_restricted_file(path: str | os.PathLike):
    """``load_restricted`` of a file; errors name the file.

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: as ``load_restricted``, with the path in front.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            return load_restricted(f)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
