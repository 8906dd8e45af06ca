"""Methods from strings: ``"none"``, ``"lightkv@0.55"``, or a name plus ``key=value`` fields.

Used by the lmms-eval plugin (``--model_args method=fastv,budget=0.35``) and ``lightkv eval``
(``--methods none,lightkv@0.55``). A method is configured in one of two ways:

- ``budget``: ``lightkv.match_budget`` picks layers and ratio for that average retained vision fraction over all
  decoder layers (other given fields are fixed, e.g. ``guidance=uniform``);
- explicit dataclass fields: ``layers=[12,18,24]`` (or ``12;18;24``), ``windows=...``, ``ratios=...``.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from ..budget import match_budget
from ..methods import DART, FastV, LightKV, Method, PDrop, Random, SparseVLM, ToMe, VisionZip

__all__ = ["METHOD_CLASSES", "NO_METHOD", "parse_method_label", "parse_field", "method_fields", "build_method"]

METHOD_CLASSES: dict[str, type[Method]] = {
    "lightkv": LightKV, "tome": ToMe, "random": Random, "fastv": FastV, "pdrop": PDrop,
    "sparsevlm": SparseVLM, "visionzip": VisionZip, "dart": DART,
}
NO_METHOD = ("none", "")


def parse_method_label(label: str) -> tuple[str, float | None]:
    """``"lightkv@0.55"`` -> ("lightkv", 0.55); ``"none"`` -> ("none", None); ``"fastv"`` -> ("fastv", None)."""
    if not isinstance(label, str):
        raise TypeError(f"a method label is a string such as 'lightkv@0.55', got {label!r}")
    name, _, budget = label.strip().partition("@")
    name = name.strip().lower()
    if name not in METHOD_CLASSES and name not in NO_METHOD:
        raise ValueError(f"unknown method {name!r}; methods: none, {', '.join(METHOD_CLASSES)}")
    if not budget:
        return name or "none", None
    if name in NO_METHOD:
        raise ValueError(f"'none' takes no budget, got {label!r}")
    try:
        value = float(budget)
    except ValueError:
        raise ValueError(f"budget in {label!r} must be a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget in {label!r} must be a retained fraction in (0, 1]")
    return name, value


def parse_field(value: Any) -> Any:
    """A value as given on a command line: lists as ``[1,2]`` or ``1;2``, numbers, booleans, else the string."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("[") or text.startswith("("):
        try:
            return list(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot read the list {value!r}; write it as [1,2,3] or 1;2;3") from None
    if ";" in text:
        return [parse_field(part) for part in text.split(";") if part.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_fields(name: str) -> tuple[str, ...]:
    """Init fields of a method's dataclass (its hyperparameters)."""
    return tuple(f.name for f in dataclasses.fields(METHOD_CLASSES[name]) if f.init)


def build_method(name: str | None, *, budget: float | None = None, num_layers: int | None = None,
                 grid: tuple[int, int] | None = None, **fields: Any) -> Method | None:
    """The method called ``name`` (None for "none"), from a budget or from explicit fields.

    num_layers, grid: the decoder depth and one image's token grid (rows, cols); needed with ``budget``.
    fields: dataclass fields, as values or command-line strings (``parse_field``).
    """
    name = (name or "none").strip().lower()
    if name in NO_METHOD:
        if budget is not None or fields:
            raise ValueError(f"method 'none' takes no budget or fields, got budget={budget!r}, fields={fields}")
        return None
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; methods: none, {', '.join(METHOD_CLASSES)}")
    valid = method_fields(name)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown}; its fields are {', '.join(valid)} (or budget=)")
    values = {key: parse_field(value) for key, value in fields.items()}
    if budget is None:
        return METHOD_CLASSES[name](**values)
    if isinstance(budget, str):
        budget = float(budget)
    if num_layers is None or grid is None:
        raise ValueError("a budget needs the model's num_layers and grid (rows, cols)")
    return match_budget(name, budget, num_layers, grid, **values).method
