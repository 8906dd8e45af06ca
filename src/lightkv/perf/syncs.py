"""Count the operations that force a device -> host synchronisation on CUDA, on any device (CPU included).

A ``TorchDispatchMode`` sees every aten op; the ones below make the host wait for the GPU (they return a
Python value, or an output whose size depends on the data):

  ``_local_scalar_dense`` (``item``, ``int``, ``float``, ``bool`` of a tensor), ``is_nonzero``, ``equal``,
  ``nonzero``, ``unique*`` / ``_unique*``, ``masked_select``, ``bincount``, indexing with a boolean mask
  (``index`` / ``index_put`` with a bool or uint8 index), ``repeat_interleave`` without ``output_size``,
  and ``Tensor.tolist`` (not an aten op; counted by wrapping it while active).

``count_syncs(model, method, inputs)`` runs the same prefill and greedy decode steps on the unpatched model
and with ``method`` applied, and reports the extra syncs (patched minus unpatched) per prefill region (before
the decoder, each stage, after the last stage) and per decode step. ``lightkv bench`` prints it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "SyncCounter", "SyncReport", "count_syncs", "sync_op_name", "format_report"]

# aten overload packets that always sync on CUDA
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "masked_select", "bincount",
    "unique_consecutive", "unique_dim", "unique_dim_consecutive", "_unique", "_unique2",
})
_BOOL_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"})


def _packet_name(func: Any) -> str:
    name = getattr(getattr(func, "overloadpacket", None), "__name__", None) or str(func)
    return name.split(".")[-1]


def sync_op_name(func: Any, args: tuple, kwargs: dict | None) -> str | None:
    """The name under which ``func(*args, **kwargs)`` counts as a device -> host sync, or None."""
    name = _packet_name(func)
    if name in SYNC_OPS:
        return name
    if name in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else (kwargs or {}).get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{name}[bool mask]"
        return None
    if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None \
            and not (len(args) > 2 and isinstance(args[-1], int)):
        return "repeat_interleave"  # a repeats tensor without output_size: the output size is read back
    return None


class SyncCounter(TorchDispatchMode):
    """While active, records every syncing op as ``(label, op name)`` in ``events``; ``label`` is whatever the
    caller (or ``label_model``'s hooks) set last."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, str]] = []
        self.label: Any = None
        self._tolist: Any = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = sync_op_name(func, args, kwargs)
        if name is not None:
            self.events.append((self.label, name))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> "SyncCounter":
        original = torch.Tensor.tolist
        counter = self

        def tolist(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            counter.events.append((counter.label, "tolist"))
            return original(tensor, *a, **k)

        self._tolist = original
        torch.Tensor.tolist = tolist  # tolist copies to the host without an aten op the mode would see
        try:
            return super().__enter__()
        except BaseException:
            torch.Tensor.tolist = original
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            torch.Tensor.tolist = self._tolist

    def counts(self) -> collections.Counter:
        return collections.Counter(label for label, _ in self.events)


def _region_of_layer(index: int, stage_layers: Sequence[int]) -> str:
    """Prefill region of decoder layer ``index``: the stage whose work runs at or before it, or 'after'."""
    for s, layer in enumerate(stage_layers):
        if index <= max(layer, 0):
            return f"stage {s}"
    return "after"


def label_model(model: torch.nn.Module, counter: SyncCounter, stage_layers: Sequence[int]) -> list[Any]:
    """Hooks that label ``counter``'s events ``(call number, region)``: a new call at every forward of
    ``model``, regions 'before' (entry, vision encoder, layout), 'stage s' (decoder layers up to stage s's
    layer, its stage included) and 'after'. Returns the hook handles (remove them when done)."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    calls = [-1]

    def on_call(module: Any, args: Any) -> None:
        calls[0] += 1
        counter.label = (calls[0], "before")

    def on_layer(index: int) -> Callable:
        region = _region_of_layer(index, stage_layers)

        def hook(module: Any, args: Any) -> None:
            counter.label = (calls[0], region)
        return hook

    hooks = [model.register_forward_pre_hook(on_call, prepend=True)]
    for index, layer in enumerate(adapter.decoder_layers):
        hooks.append(layer.register_forward_pre_hook(on_layer(index), prepend=True))
    return hooks


def _greedy_run(model: torch.nn.Module, inputs: dict, decode_steps: int) -> None:
    """``generate``: one prefill and ``decode_steps`` greedy decode steps (a fixed number of tokens)."""
    tokens = decode_steps + 1  # the prefill gives the first token
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


@dataclass
class SyncReport:
    """Extra syncs of a method: patched minus unpatched on the same inputs.

    prefill: region -> extra syncs ('before' the decoder, 'stage s', 'after' the last stage).
    decode: extra syncs of each decode step. prefill_ops / decode_ops: extra syncs by op name.
    patched_prefill / unpatched_prefill: raw totals of the prefill call.
    """

    prefill: dict[str, int]
    decode: list[int]
    prefill_ops: dict[str, int] = field(default_factory=dict)
    decode_ops: dict[str, int] = field(default_factory=dict)
    patched_prefill: int = 0
    unpatched_prefill: int = 0

    @property
    def prefill_total(self) -> int:
        return sum(self.prefill.values())

    @property
    def per_stage(self) -> list[int]:
        return [v for k, v in self.prefill.items() if k.startswith("stage ")]


def _record(model: torch.nn.Module, stage_layers: Sequence[int], run: Callable[[], None]) -> list[tuple]:
    counter = SyncCounter()
    hooks = label_model(model, counter, stage_layers)
    try:
        with torch.no_grad(), counter:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return [(label, op) for label, op in counter.events if label is not None]


def count_syncs(model: torch.nn.Module, method: Any, inputs: dict, decode_steps: int = 3,
                run: Callable[[torch.nn.Module], None] | None = None, **apply_kwargs: Any) -> SyncReport:
    """Extra device -> host syncs of ``method`` on ``model``: one prefill of ``inputs`` and ``decode_steps``
    greedy decode steps through ``generate`` (or ``run(model)``: every forward call of ``model`` after the first
    is a decode step), unpatched then patched (``apply(model, method, **apply_kwargs)``)."""
    from ..engine import apply

    run = run or (lambda m: _greedy_run(m, inputs, decode_steps))
    stages = tuple(method.stage_layers)
    base = _record(model, stages, lambda: run(model))
    handle = apply(model, method, **apply_kwargs)
    try:
        patched = _record(model, stages, lambda: run(model))
    finally:
        handle.remove()

    def by(events: list[tuple], key: Callable) -> collections.Counter:
        return collections.Counter(key(label, op) for label, op in events)

    regions = ["before", *(f"stage {s}" for s in range(len(stages))), "after"]
    pre_p, pre_b = by(patched, lambda l, o: l[1] if l[0] == 0 else None), by(base, lambda l, o: l[1] if l[0] == 0 else None)
    prefill = {r: pre_p[r] - pre_b[r] for r in regions}
    calls = max([l[0] for l, _ in patched + base] + [0])
    dec_p, dec_b = by(patched, lambda l, o: l[0]), by(base, lambda l, o: l[0])
    decode = [dec_p[c] - dec_b[c] for c in range(1, calls + 1)]
    ops_p, ops_b = by(patched, lambda l, o: (l[0] == 0, o)), by(base, lambda l, o: (l[0] == 0, o))
    diff = {k: ops_p[k] - ops_b[k] for k in set(ops_p) | set(ops_b) if ops_p[k] != ops_b[k]}
    return SyncReport(prefill, decode, {o: n for (first, o), n in sorted(diff.items()) if first},
                      {o: n for (first, o), n in sorted(diff.items()) if not first},
                      sum(1 for l, _ in patched if l[0] == 0), sum(1 for l, _ in base if l[0] == 0))


def format_report(report: SyncReport) -> str:
    """One line: extra syncs per prefill region and per decode step."""
    regions = ", ".join(f"{k} {v:+d}" for k, v in report.prefill.items())
    ops = ", ".join(f"{k} {v:+d}" for k, v in report.prefill_ops.items())
    return (f"extra device->host syncs: prefill {report.prefill_total:+d} ({regions}; by op: {ops or 'none'}); "
            f"decode steps {report.decode}")
