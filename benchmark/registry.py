"""The method registry: in-tree methods register with ``@register``; third-party packages through the
``marbench.methods`` entry-point group (``[project.entry-points."marbench.methods"] name = "pkg.module:Class"``).
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

__all__ = ["register", "get_method", "available_methods", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "marbench.methods"
_REGISTRY: dict[str, type] = {}
_IN_TREE = ("marbench.methods.classic", "marbench.methods.unet", "marbench.methods.adn", "marbench.methods.oscnet",
            "marbench.methods.sscd")


def register(name: str):
    """Class decorator: make a ``MARMethod`` subclass available as ``name``.

    Raises:
        ValueError: ``name`` is already taken by another class.
    """

    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> dict[str, type]:
    """All methods: in-tree ones and those of installed distributions (entry points), by name."""
    for module in _IN_TREE:
        import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type:
    """The method class registered as ``name``.

    Raises:
        KeyError: unknown name; the message lists the known methods.
    """
    methods = available_methods()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {sorted(methods)}")
    return methods[name]
