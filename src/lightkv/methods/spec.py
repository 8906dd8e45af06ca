"""Methods from text: the one grammar used by the command line, the benchmarks and the lmms-eval plugin.

    none                                  no method (also: uncompressed, full, or an empty string)
    lightkv                               the class defaults
    lightkv@0.55                          matched to an average retained vision fraction of 0.55
    fastv:budget=0.35                     the same, as a field
    fastv:layer=3,ratio=0.75              fields, separated by ',' or ':' (fastv:layer=3:ratio=0.75)
    lightkv@0.35:guidance=uniform         a budget with fixed fields
    lightkv:layers=[12,18,24]             lists as [a,b,c] or a;b;c

Values are read as integers, floats, booleans (true/false), lists, else strings. A list of methods is
comma-separated (``split_method_list``); a comma followed by ``key=value`` continues the method before it.
This module imports no torch.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .registry import get_method, method_names

__all__ = ["MethodSpec", "NO_METHOD_NAMES", "parse_method_spec", "parse_field", "method_fields",
           "split_method_list", "build_method"]

NO_METHOD_NAMES = ("none", "uncompressed", "full", "")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: registered ``name`` (or "none"), ``budget`` in (0, 1] or None, and ``fields``."""

    name: str
    budget: float | None = None
    fields: dict = field(default_factory=dict)

    def __str__(self) -> str:
        text = self.name + (f"@{self.budget:g}" if self.budget is not None else "")
        if self.fields:
            text += ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.fields.items())
        return text


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _split_top(text: str, separators: str) -> list[str]:
    """Split at ``separators`` outside brackets."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch in separators and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    out.append(current)
    return out


def parse_field(value: Any) -> Any:
    """A value as written in a spec: ``[1,2]`` or ``1;2`` lists, integers, floats, true/false, else the string.
    Values that are not strings are returned as they are."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text[:1] in "[(":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot read the list {value!r}; write it as [1,2,3] or 1;2;3") from None
        return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    if ";" in text:
        return [parse_field(part) for part in text.split(";") if part.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_fields(name: str) -> tuple[str, ...]:
    """Init fields (hyperparameters) of the registered method ``name``; () for a budget-only entry."""
    cls = get_method(name).cls
    if cls is None or not dataclasses.is_dataclass(cls):
        return ()
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _known_names() -> str:
    return ", ".join(("none", *method_names()))


def _parse_budget(value: Any, text: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"the budget in {text!r} must be a number in (0, 1], got {value!r}")
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the budget in {text!r} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"the budget in {text!r} must be a retained fraction in (0, 1], got {budget:g}")
    return budget


def parse_method_spec(text: str | MethodSpec) -> MethodSpec:
    """Parse one method (see the module docstring); ValueError with one line on any mistake."""
    if isinstance(text, MethodSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a method spec is a string such as 'lightkv@0.55', got {text!r}")
    raw = text.strip()
    head, sep, rest = raw.partition(":")
    name, at, budget_text = head.partition("@")
    name = name.strip().lower()
    if name in NO_METHOD_NAMES:
        if at or rest.strip():
            raise ValueError(f"'none' takes no budget or fields, got {text!r}")
        return MethodSpec("none")
    try:
        get_method(name)
    except ValueError:
        raise ValueError(f"unknown method {name!r} in {text!r}; methods: {_known_names()}") from None
    budget = _parse_budget(budget_text.strip(), text) if at else None
    fields: dict[str, Any] = {}
    if sep:
        if not rest.strip():
            raise ValueError(f"nothing after ':' in {text!r}; expected FIELD=VALUE")
        valid = method_fields(name)
        for part in _split_top(rest, ",:"):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ValueError(f"malformed field {part.strip()!r} in {text!r}; expected FIELD=VALUE")
            if key == "budget":
                if budget is not None:
                    raise ValueError(f"{text!r} gives the budget twice")
                budget = _parse_budget(parse_field(value), text)
                continue
            if valid and key not in valid:
                raise ValueError(f"{name} has no field {key!r} (in {text!r}); its fields: "
                                 f"{', '.join(valid)}, or budget")
            if key in fields:
                raise ValueError(f"field {key!r} is given twice in {text!r}")
            fields[key] = parse_field(value)
    return MethodSpec(name, budget, fields)


def split_method_list(text: str) -> list[str]:
    """Split a comma-separated list of method specs; a chunk ``key=value`` (no ':' or '@' before the '=')
    continues the method before it, and commas inside brackets never split:
    ``"none,fastv:layer=3,ratio=0.75,lightkv@0.55"`` -> ["none", "fastv:layer=3,ratio=0.75", "lightkv@0.55"]."""
    if not isinstance(text, str):
        raise TypeError(f"a method list is a comma-separated string, got {text!r}")
    out: list[str] = []
    for chunk in _split_top(text, ","):
        chunk = chunk.strip()
        if not chunk:
            continue
        key, eq, _ = chunk.partition("=")
        if out and eq and not any(ch in key for ch in ":@"):
            out[-1] += "," + chunk
        else:
            out.append(chunk)
    return out


def _as_grids(grids: Any) -> tuple[tuple[int, int], ...]:
    from ._common import normalize_grids

    return normalize_grids(grids)


def build_method(spec: str | MethodSpec, *, num_layers: int | None = None,
                 grids: Sequence[tuple[int, int]] | None = None, grid: Any = None, budget: float | None = None,
                 model: Any = None, max_pixels: int | None = None, **fields: Any) -> Any:
    """The configured method of ``spec`` (None for "none").

    With a budget (``@0.55``, ``budget=0.35`` in the spec, or the ``budget`` argument) the method's matcher
    picks its schedule for ``num_layers`` decoder layers and one sample whose images have ``grids`` (rows,
    cols) (``grid=`` for one image); other fields stay fixed. A budget the method cannot reach there is a
    ValueError naming the lowest one it reaches. Without a budget, the class is built from the fields.
    ``fields`` (values or spec strings) add to and override the spec's.

    ``model`` (a transformers model lightkv has an adapter for) supplies what is not given: its decoder depth,
    and one image of the token grid its config implies (``max_pixels``: the largest image of your processor, for
    families whose grid follows the image size, e.g. Qwen2-VL). The method is checked against its depth.
    """
    if model is not None:
        return _build_for_model(spec, model, num_layers=num_layers, grids=grids, grid=grid, budget=budget,
                                max_pixels=max_pixels, **fields)
    if max_pixels is not None:
        raise ValueError("max_pixels= only helps with model=: it sets the image grid a model's config implies")
    parsed = parse_method_spec(spec)
    extra = {key: parse_field(value) for key, value in fields.items()}
    if "budget" in extra:
        budget = extra.pop("budget")
    if parsed.name == "none":
        if budget is not None or extra:
            raise ValueError(f"method 'none' takes no budget or fields, got budget={budget!r}, fields={extra}")
        return None
    if budget is not None and parsed.budget is not None:
        raise ValueError(f"{spec!s} already has a budget; got budget={budget!r} as well")
    budget = parsed.budget if budget is None else _parse_budget(budget, str(spec))
    valid = method_fields(parsed.name)
    unknown = sorted(k for k in extra if valid and k not in valid)
    if unknown:
        raise ValueError(f"{parsed.name} has no field(s) {unknown}; its fields: {', '.join(valid)}, or budget")
    values = {**parsed.fields, **extra}
    entry = get_method(parsed.name)
    if budget is None:
        if entry.cls is None:
            raise ValueError(f"{parsed.name!r} is registered for budgets only: give a budget, e.g. "
                             f"'{parsed.name}@0.5'")
        return entry.cls(**values)
    if grid is not None:
        if grids is not None:
            raise ValueError("give grid= (one image) or grids= (all images of a sample), not both")
        grids = [grid]
    if num_layers is None or grids is None:
        raise ValueError(f"a budget ({parsed.name}@{budget:g}) needs the model's num_layers and the image "
                         "grids=[(rows, cols), ...] of a sample")
    from ._budget import match_budget

    return match_budget(parsed.name, budget, num_layers, grids=_as_grids(grids), **values).method


def _build_for_model(spec: str | MethodSpec, model: Any, *, num_layers: int | None, grids: Any, grid: Any,
                     budget: float | None, max_pixels: int | None, **fields: Any) -> Any:
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    depth = len(adapter.decoder_layers)
    if num_layers is not None and num_layers != depth:
        raise ValueError(f"num_layers={num_layers} disagrees with the model, which has {depth} decoder layers")
    parsed = parse_method_spec(spec)
    needs_grid = parsed.name != "none" and (budget is not None or parsed.budget is not None or "budget" in fields)
    if needs_grid and grids is None and grid is None:
        found = adapter.default_grid(max_pixels)
        if found is None:
            raise ValueError(f"cannot tell the image token grid of {type(model).__name__} from its config"
                             f"{'' if max_pixels is None else f' and max_pixels={max_pixels}'}: give "
                             "grids=[(rows, cols)] (vision tokens per image of your prompts) or max_pixels= (the "
                             "largest image your processor makes)")
        grids = [found]
    method = build_method(parsed, num_layers=depth, grids=grids, grid=grid, budget=budget, **fields)
    if method is not None:
        try:
            method.validate_for(depth)
        except ValueError as error:
            hint = "" if needs_grid else f"; or give a budget, e.g. '{parsed.name}@0.55', to fit it to the model"
            raise ValueError(f"{parsed}: {error}{hint}") from None
    return method
