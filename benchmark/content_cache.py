"""Values computed from tensors, kept in this process by the tensors' content: the one home of the suite's
in-memory caches of pure functions of an input (the perceptual protocols' reference features, the synthetic
benchmark's clinical scoring cases, latent GSI alignment's frozen-VAE latents).

An item is one entry along the first dimension of a batch tensor, or of each tensor of a tuple of batches (a
function of several inputs). Its key is the caller's namespace (which function, which weights), the shape and
dtype of each of its tensors and the sha256 of their bytes, so a value is never served for other data (an
augmenting datamodule gets fresh values);
past ``max_items`` the least recently used items are dropped. Hashing reads each item on the host: for a tensor
on a GPU that is a device-to-host copy per call (a few MB per training step at the smoke sizes), and a
synchronisation that the callers' steps already make when they log a loss.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import torch

__all__ = ["ContentCache"]


class ContentCache:
    """Per-item values of tensor batches, kept by content (see the module docstring).

    >>> cache = ContentCache(max_items=8)
    >>> seen = []
    >>> def double(xs):
    ...     seen.append(len(xs))
    ...     return [2 * x for x in xs]
    >>> x = torch.tensor([[1.0], [2.0], [1.0]])
    >>> [float(v) for v in cache(x, double, "double")], seen
    ([2.0, 4.0, 2.0], [2])
    >>> [float(v) for v in cache(x[:2], double, "double")], seen, len(cache)
    ([2.0, 4.0], [2], 2)
    >>> [float(v) for v in cache(torch.tensor([3.0, 1.0]), double, "scalars")], seen
    ([6.0, 2.0], [2, 2])
    >>> pairs = (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5, 5, 6]))  # a function of two inputs per item
    >>> cache(pairs, lambda xs: [float(a) + int(b) for a, b in zip(*xs)], "sum")
    [6.0, 6.0, 7.0]

    Raises:
        ValueError: ``max_items < 1``; the tensors of a tuple disagree on the number of items; ``compute``
            returned another number of values than items it was given.
    """

    def __init__(self, max_items: int):
        if max_items < 1:
            raise ValueError(f"a content cache keeps at least one item, found max_items={max_items}")
        self.max_items = max_items
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every item (say, when the function's weights change without a new namespace)."""
        self._items.clear()

    @staticmethod
    def key(item: torch.Tensor | tuple[torch.Tensor, ...], namespace: Hashable = ()) -> tuple:
        """The key of one item (a tensor, or a tuple of tensors): namespace, then the shape, dtype and sha256 of the
        bytes of each tensor."""
        parts = []
        for t in item if isinstance(item, tuple) else (item,):
            # flat first: a 0-d item (one scalar of a (B,) batch) has no last dimension to view as bytes
            data = t.detach().reshape(-1).contiguous().cpu()
            digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()  # any dtype, bfloat16 too
            parts.append((tuple(t.shape), str(t.dtype), digest))
        return namespace, tuple(parts)

    def __call__(self, x: torch.Tensor | tuple[torch.Tensor, ...], compute: Callable[..., Iterable],
                 namespace: Hashable = ()) -> list:
        """The value of every item of ``x`` (its first dimension; of a tuple of tensors, the items of each taken
        together), in order: cached ones from the cache, the others from one call ``compute(x[missing])`` (of a
        tuple, ``compute(tuple(t[missing] for t in x))``), which returns one value per item it is given (each
        distinct item once)."""
        if isinstance(x, tuple):
            sizes = {len(t) for t in x}
            if len(sizes) != 1:
                raise ValueError(f"content cache {namespace!r}: the tensors of a tuple must hold as many items each, "
                                 f"found {[len(t) for t in x]}")
            items = list(zip(*x, strict=True))
        else:
            items = list(x)
        keys = [self.key(item, namespace) for item in items]
        missing, seen = [], set()
        for i, key in enumerate(keys):  # the first index of each distinct item not cached
            if key not in self._items and key not in seen:
                seen.add(key)
                missing.append(i)
        if missing:
            values = list(compute(tuple(t[missing] for t in x) if isinstance(x, tuple) else x[missing]))
            if len(values) != len(missing):
                raise ValueError(f"content cache {namespace!r}: compute returned {len(values)} values for "
                                 f"{len(missing)} items")
            for i, value in zip(missing, values, strict=True):
                self._items[keys[i]] = value
        out = []
        for key in keys:
            self._items.move_to_end(key)
            out.append(self._items[key])
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return out
