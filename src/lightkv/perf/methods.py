"""``lightkv bench``'s methods: the shared method specs (``lightkv.methods.spec``) with bench's own defaults.

    make_method("lightkv", spec, depth=8)             # the spec's reference schedule scaled to 8 layers
    make_method("lightkv:guidance=uniform", spec, 32)  # the same with fields changed
    make_method("fastv", spec, 32)                     # matched to that schedule's budget at this depth
    make_method("fastv@0.35", spec, 32)                # matched to 0.35 (also fastv:budget=0.35)

Only the defaults differ from every other command: plain ``lightkv`` is the model spec's reference schedule
scaled to the depth (``specs.scaled_schedule``), and another method without a budget is configured for the
budget of that schedule (the average retained vision fraction at this depth, shared/BASELINES.md), its other
fields fixed. A registered method without a budget matcher gets its defaults, with stage layer lists written
for a 32-layer decoder scaled to the depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..methods import LightKV, Method
from ..methods.registry import get_method
from ..methods.spec import build_method, parse_method_spec
from .specs import ModelSpec, scale_layers, scaled_schedule

__all__ = ["make_method", "reference_budget"]

REFERENCE_DEPTH = 32  # depth the methods' default layer lists are written for (LLaVA-1.5-7B)


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


def _retained_fraction(method: Method, depth: int, grid: tuple[int, int]) -> float:
    """Average retained vision fraction over ``depth`` layers for one image of ``grid`` tokens."""
    kept = method.kept_per_layer(depth, (grid,))
    return sum(kept) / (depth * grid[0] * grid[1])


def reference_budget(spec: ModelSpec, depth: int) -> float:
    """The budget of the spec's reference LightKV schedule scaled to ``depth`` layers."""
    return _retained_fraction(LightKV(**scaled_schedule(spec, depth)), depth, spec.grid())


def make_method(text: str, spec: ModelSpec, depth: int | None = None) -> tuple[str, Method | None]:
    """(label, method) for a method spec string at ``depth`` layers (default: the spec's); ``none`` gives
    (``"none"``, None). ValueError for an unknown method, a bad budget or fields, or layers beyond ``depth``."""
    depth = depth or spec.num_layers
    parsed = parse_method_spec(text)
    if parsed.name == "none":
        return "none", None
    entry = get_method(parsed.name)
    grids = [spec.grid()]
    if parsed.budget is not None:
        method = build_method(parsed, num_layers=depth, grids=grids)
    elif parsed.name == "lightkv":
        method = LightKV(**{**scaled_schedule(spec, depth), **parsed.fields})
    elif entry.matcher is not None:
        method = build_method(parsed, budget=reference_budget(spec, depth), num_layers=depth, grids=grids)
    else:
        try:
            method = entry.cls(**{**_scaled_defaults(entry.cls, depth), **parsed.fields})
        except TypeError as err:
            raise ValueError(f"cannot configure {entry.cls.__name__} from {text!r}: {err}") from None
    method.validate_for(depth)
    return text, method
