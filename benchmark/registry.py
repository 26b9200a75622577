"""One registry type for everything the suite looks up by name: methods, evaluation protocols, weight files,
geometry presets.

A ``Registry`` maps names to objects of one kind, checks each entry against the kind's base class (classes:
subclass; objects: instance), refuses a name taken by another object, and answers an unknown name with an error
that lists the known ones. A registry with an entry-point group also loads the entries that installed
distributions declare there (``[project.entry-points."<group>"] name = "package.module:Object"``), lazily, on
first lookup; marbench's own methods are declared the same way in its ``pyproject.toml``, so a method in the tree
and one in a separate package are found alike.

>>> shapes = Registry("shape", base=int)
>>> shapes.register("square", 4)
4
>>> shapes.get("square")
4
>>> shapes.get("circle")
Traceback (most recent call last):
...
KeyError: "unknown shape 'circle'; known: ['square']"
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object of one kind.

    Args:
        kind: what the entries are, for messages (``"method"``, ``"evaluation protocol"``).
        base: entries must be subclasses (for classes) or instances (otherwise) of ``base``; ``None``: no check.
        entry_point_group: entry-point group whose entries are loaded on first lookup.
        check: extra validation ``check(name, obj)`` that raises ``ValueError`` (e.g. a method's card name must
            equal its registered name).
    """

    def __init__(self, kind: str, base: type | None = None, entry_point_group: str | None = None,
                 check: Callable[[str, T], None] | None = None):
        self.kind, self.base, self.entry_point_group, self._check = kind, base, entry_point_group, check
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def _validate(self, name: str, obj, origin: str) -> None:
        if self.base is not None:
            ok = issubclass(obj, self.base) if isinstance(obj, type) else isinstance(obj, self.base)
            if not ok:
                raise TypeError(f"{origin}: {self.kind} {name!r} must be a {self.base.__name__} "
                                f"(subclass or instance), found {obj!r}")
        if self._check is not None:
            self._check(name, obj)

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` as ``name`` and return it; without ``obj``, a decorator doing the same.

        Raises:
            ValueError: ``name`` is taken by another object, or the registry's ``check`` refuses it.
            TypeError: ``obj`` is not of the registry's base class.
        """
        if obj is None:
            return lambda o: self.register(name, o)
        self._validate(name, obj, "register")
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} name {name!r} is already registered by {self._entries[name]!r}")
        self._entries[name] = obj
        return obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue
            obj = ep.load()
            self._validate(ep.name, obj, f"entry point {ep.name} = {ep.value} (group {self.entry_point_group})")
            self._entries[ep.name] = obj

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            KeyError: unknown name; the message lists the known names.
        """
        self._load_entry_points()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load_entry_points()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"
