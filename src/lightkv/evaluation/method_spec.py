"""Method specs as lmms-eval ``--model_args``: the one grammar of ``lightkv.methods.spec`` carried through
lmms-eval's ``key=value,key=value`` string.

lmms-eval splits ``--model_args`` at every ',' and '=', so ``method=fastv:layer=3`` cannot pass through it.
``lightkv eval`` therefore writes a spec as ``method=NAME``, ``budget=B`` and one ``FIELD=VALUE`` per field
(lists as ``1;2;3``), and the plugin puts them back together:

    spec_to_model_args(parse_method_spec("fastv:layer=3,ratio=0.75"))  # {"method": "fastv", "layer": 3, "ratio": 0.75}
    spec_from_model_args("fastv", None, {"layer": 3, "ratio": 0.75})  # == parse_method_spec("fastv:layer=3,ratio=0.75")

``method=`` itself may be any spec without '=' or ',' (``lightkv@0.55``).
"""

from __future__ import annotations

from typing import Any

from ..methods.spec import MethodSpec, build_method, parse_field, parse_method_spec, split_method_list

__all__ = ["MethodSpec", "parse_method_spec", "split_method_list", "build_method", "parse_field",
           "spec_to_model_args", "spec_from_model_args"]


def spec_to_model_args(spec: str | MethodSpec) -> dict[str, Any]:
    """``method``, ``budget`` (when set) and the fields of ``spec``, in that order."""
    parsed = parse_method_spec(spec)
    out: dict[str, Any] = {"method": parsed.name}
    if parsed.budget is not None:
        out["budget"] = parsed.budget
    out.update(parsed.fields)
    return out


def spec_from_model_args(method: str | None, budget: Any = None, fields: dict[str, Any] | None = None) -> MethodSpec:
    """The MethodSpec of the plugin's ``method=``, ``budget=`` and other method fields (values as lmms-eval
    passes them: numbers, booleans, or strings such as ``12;18;24``). A budget or field given both in
    ``method`` and separately is a ValueError."""
    parsed = parse_method_spec(method or "none")
    extra = {key: parse_field(value) for key, value in (fields or {}).items()}
    if budget is not None:
        if "budget" in extra:
            raise ValueError(f"budget given twice: budget={budget!r} and {extra['budget']!r}")
        extra["budget"] = budget
    if not extra:
        return parsed
    if parsed.name == "none":
        raise ValueError(f"method 'none' takes no budget or fields, got {extra}")
    doubled = sorted(set(extra) & (set(parsed.fields) | ({"budget"} if parsed.budget is not None else set())))
    if doubled:
        raise ValueError(f"{', '.join(doubled)} given both in method={method!r} and as separate model_args")
    # through the one parser, so that names, budgets and fields are checked exactly as for a spec string
    values = {**parsed.fields, **extra}
    if parsed.budget is not None:
        values["budget"] = parsed.budget
    return parse_method_spec(parsed.name + ":" + ",".join(f"{key}={_spec_value(v)}" for key, v in values.items()))


def _spec_value(value: Any) -> str:
    """``value`` as spec text that ``parse_field`` reads back exactly (floats by repr)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_spec_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
