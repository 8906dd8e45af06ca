"""The one table of compression methods: name -> (class, budget matcher). Each method file registers itself.

    @register_method("mymethod", matcher=my_matcher)
    @dataclass(frozen=True)
    class MyMethod(ScorePruneMethod): ...

A matcher configures the method for an average retained vision fraction (``lightkv.match_budget``):
``matcher(target, num_layers, grids, **fields) -> BudgetMatch`` with ``grids`` a tuple of (rows, cols), one per
image of the sample. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["MethodEntry", "register_method", "get_method", "method_names", "unregister_method"]

# matcher(target, num_layers, grids, **fields) -> BudgetMatch
Matcher = Callable[..., Any]


@dataclass(frozen=True)
class MethodEntry:
    """One registered method. cls is None for a name registered with a budget matcher only
    (``lightkv.register_budget``)."""

    name: str
    cls: type | None
    matcher: Matcher | None = None


_REGISTRY: dict[str, MethodEntry] = {}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a method name must be a non-empty string, got {name!r}")
    name = name.strip().lower()
    if any(ch in name for ch in ":@,=;[] "):
        raise ValueError(f"a method name cannot contain any of ':@,=;[] ' (they are spec syntax), got {name!r}")
    if name in ("none", "uncompressed", "full"):
        raise ValueError(f"{name!r} means 'no method' and cannot be registered")
    return name


def register_method(name: str, cls: type | None = None, matcher: Matcher | None = None, replace: bool = False
                    ) -> Any:
    """Register ``cls`` under ``name`` (lower case), with its budget matcher if it has one.

    Without ``cls`` it returns a class decorator: ``@register_method("fastv", matcher=...)``. Registering a name
    twice raises ValueError unless ``replace=True``. Returns ``cls`` (so the decorator keeps the class).
    """
    key = _check_name(name)
    if cls is None:
        def decorator(target: type) -> type:
            return register_method(key, target, matcher=matcher, replace=replace)
        return decorator
    if not isinstance(cls, type):
        raise TypeError(f"register_method({key!r}, cls): cls must be a class, got {cls!r}")
    if matcher is not None and not callable(matcher):
        raise TypeError(f"the budget matcher of {key!r} must be callable, got {matcher!r}")
    if key in _REGISTRY and not replace:
        raise ValueError(f"a method named {key!r} is already registered (pass replace=True)")
    _REGISTRY[key] = MethodEntry(key, cls, matcher)
    return cls


def _set_matcher(name: str, matcher: Matcher, replace: bool = False) -> None:
    """Give ``name`` a budget matcher; a name without a class is registered budget-only."""
    key = _check_name(name)
    entry = _REGISTRY.get(key)
    if entry is not None and entry.matcher is not None and not replace:
        raise ValueError(f"a budget matcher for {key!r} is already registered (pass replace=True)")
    _REGISTRY[key] = MethodEntry(key, entry.cls if entry else None, matcher)


def unregister_method(name: str) -> None:
    """Remove ``name`` from the table (tests and plug-ins that clean up after themselves)."""
    _REGISTRY.pop(_check_name(name), None)


def method_names() -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodEntry:
    """The entry of ``name`` (case-insensitive); ValueError naming the valid names when unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    entry = _REGISTRY.get(key)
    if entry is None:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(_REGISTRY)}")
    return entry
