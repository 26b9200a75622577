"""Loading released method checkpoints from local files: digest check, key-for-key state-dict loading.

Nothing is downloaded: a missing file stops with an error that names it and where its authors publish it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from marbench.files import sha256_file

__all__ = ["load_checkpoint_file", "load_state_dict_exactly"]


def load_checkpoint_file(path: str | Path, sha256: str | None, where_to_get: str) -> dict:
    """The object saved in a checkpoint file, loaded on the CPU with ``weights_only=True``.

    Args:
        path: the local file.
        sha256: its expected digest, or None to skip the check.
        where_to_get: the file's name and where users get it, for the error message.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the digest differs, or the file does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found. Expected {where_to_get}; put the file there or "
                                "pass its path.")
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256.lower():
            raise ValueError(f"{path}: sha256 {digest} differs from the expected {sha256}; the file is damaged or "
                             f"another release ({where_to_get}).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}")
    return state


def load_state_dict_exactly(module: nn.Module, state: dict, where: str) -> None:
    """``module.load_state_dict(state)`` after checking that keys and shapes match one for one.

    Raises:
        ValueError: names the missing, unexpected and reshaped keys (first five of each).
    """
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if ours != theirs:
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        raise ValueError(f"{where}: state dict does not match {type(module).__name__}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shape differs {reshaped[:5]}")
    module.load_state_dict(state, strict=True)
