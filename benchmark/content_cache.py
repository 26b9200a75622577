"""Values computed from tensors, kept in this process by the tensors' content: the one home of the suite's
in-memory caches of pure functions of an input (the perceptual protocols' reference features, latent GSI
alignment's frozen-VAE latents).

An item's key is the caller's namespace (which function, which weights), the item's shape and dtype and the
sha256 of its bytes, so a value is never served for other data (an augmenting datamodule gets fresh values);
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

    Raises:
        ValueError: ``max_items < 1``; ``compute`` returned another number of values than items it was given.
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
    def key(item: torch.Tensor, namespace: Hashable = ()) -> tuple:
        """The key of one item: namespace, shape, dtype and the sha256 of its bytes."""
        # flat first: a 0-d item (one scalar of a (B,) batch) has no last dimension to view as bytes
        data = item.detach().reshape(-1).contiguous().cpu()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()  # any dtype, bfloat16 too
        return namespace, tuple(item.shape), str(item.dtype), digest

    def __call__(self, x: torch.Tensor, compute: Callable[[torch.Tensor], Iterable], namespace: Hashable = ()) -> list:
        """The value of every item of ``x`` (its first dimension), in order: cached ones from the cache, the others
        from one call ``compute(x[missing])``, which returns one value per item it is given (each distinct item
        once)."""
        keys = [self.key(item, namespace) for item in x]
        missing, seen = [], set()
        for i, key in enumerate(keys):  # the first index of each distinct item not cached
            if key not in self._items and key not in seen:
                seen.add(key)
                missing.append(i)
        if missing:
            values = list(compute(x[missing]))
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
