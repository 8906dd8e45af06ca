"""Turning a method name from the command line into a configured method for a given model depth.

    make_method("lightkv", spec, depth=8)          # the spec's reference schedule scaled to 8 layers
    make_method("lightkv:guidance=uniform", spec, 32)
    make_method("fastv:ratio=0.75", spec, 32)       # any class that lightkv.methods exports

Syntax: ``NAME[:FIELD=VALUE[:FIELD=VALUE...]]``, values as Python literals (``layers=[2,4,5]``).
``lightkv`` is the spec's reference schedule scaled to the depth (``specs.scale_layers``). Every other method
that ``lightkv.match_budget`` knows is configured for a matched budget (shared/BASELINES.md): the average
retained vision fraction of that LightKV schedule at this depth, or ``NAME:budget=0.35``; other fields are
passed to the matcher. A class that ``lightkv.methods`` exports without a budget matcher gets its defaults,
with stage layer lists written for a 32-layer decoder scaled to the depth.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any

from .. import methods as methods_module
from ..budget import budget_methods, match_budget
from ..methods import LightKV, Method, predict_retained_fraction
from .specs import ModelSpec, scale_layers, scaled_schedule

__all__ = ["split_methods", "parse_method", "method_classes", "make_method"]

REFERENCE_DEPTH = 32  # depth the methods' default layer lists are written for (LLaVA-1.5-7B)


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list, leaving commas inside brackets alone."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return out


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:FIELD=VALUE:...`` -> (name, {field: value})."""
    name, *parts = text.split(":")
    fields: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad method option {part!r} in {text!r}; expected FIELD=VALUE")
        try:
            fields[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            fields[key.strip()] = value.strip()
    return name.strip().lower(), fields


def method_classes() -> dict[str, type]:
    """Method classes exported by ``lightkv.methods``, by lower-case class name."""
    out = {}
    for attr in getattr(methods_module, "__all__", dir(methods_module)):
        obj = getattr(methods_module, attr, None)
        if inspect.isclass(obj) and issubclass(obj, Method) and obj is not Method:
            out[obj.__name__.lower()] = obj
    return out


def _scaled_defaults(cls: type, depth: int) -> dict[str, Any]:
    """Default stage layers of ``cls`` moved to a ``depth``-layer decoder (other fields keep defaults)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.init and f.default is not dataclasses.MISSING}
    out: dict[str, Any] = {}
    layers = defaults.get("layers")
    if isinstance(layers, (tuple, list)) and layers and depth != REFERENCE_DEPTH:
        scaled = scale_layers(tuple(layers), REFERENCE_DEPTH, depth)
        out["layers"] = list(scaled)
        for name in ("windows", "ratios"):  # per-stage lists follow the stages that are kept
            if isinstance(defaults.get(name), (tuple, list)) and len(defaults[name]) == len(layers):
                out[name] = list(defaults[name][: len(scaled)])
    layer = defaults.get("layer")
    if isinstance(layer, int) and layer >= depth - 1:
        out["layer"] = (scale_layers((layer,), REFERENCE_DEPTH, depth) or (0,))[0]
    return out


def make_method(text: str, spec: ModelSpec, depth: int | None = None) -> tuple[str, Method | None]:
    """(label, method) for a method spec string; ``none`` gives (``"none"``, None)."""
    depth = depth or spec.num_layers
    name, fields = parse_method(text)
    if name in ("none", "uncompressed", "full"):
        if fields:
            raise ValueError("method 'none' takes no options")
        return "none", None
    budget = fields.pop("budget", None)
    if name == "lightkv" and budget is None:
        method = LightKV(**{**scaled_schedule(spec, depth), **fields})
    elif name in budget_methods():
        if budget is None:
            reference = LightKV(**scaled_schedule(spec, depth))
            budget = predict_retained_fraction(reference, depth, spec.grid())["retained_fraction"]
        method = match_budget(name, float(budget), depth, spec.grid(), **fields).method
    else:
        classes = method_classes()
        if name not in classes:
            raise ValueError(f"unknown method {name!r}; lightkv.methods exports {sorted(['none', *classes])}")
        if budget is not None:
            raise ValueError(f"no budget matcher for {name!r} (lightkv.register_budget adds one)")
        cls = classes[name]
        try:
            method = cls(**{**_scaled_defaults(cls, depth), **fields})
        except TypeError as err:
            raise ValueError(f"cannot configure {cls.__name__} from {text!r}: {err}") from None
    method.validate_for(depth)
    return text, method
