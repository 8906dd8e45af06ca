"""``lightkv compare``: methods at matched KV budgets on the bundled model's shapes test split.

Methods are specs (``lightkv.methods.spec``): a method without a budget (``fastv``, ``lightkv:guidance=uniform``)
runs at every budget of the list, its fields fixed; ``NAME@BUDGET`` (or ``NAME:budget=B``) runs at that budget
only; ``none`` is left out (the uncompressed model is always the first row).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..bundled import BUNDLED_MODEL
from ..methods.spec import MethodSpec, build_method, parse_method_spec
from .harness import (Result, analytic_flops, evaluate, load_model, markdown_table, model_label, question_set,
                      vision_grid_side, write_results)

__all__ = ["run_compare", "compare_runs"]


def _label(spec: MethodSpec, budget: float) -> str:
    """``name@0.55`` with the spec's fields after it (``lightkv@0.35:guidance=uniform``)."""
    fields = str(MethodSpec(spec.name, None, spec.fields))[len(spec.name):]
    return f"{spec.name}@{budget:.2f}{fields}"


def compare_runs(methods: list[str | MethodSpec], budgets: list[float]) -> list[tuple[str, MethodSpec]]:
    """(label, spec with its budget) of every run: a method without a budget once per budget, in that order."""
    runs = []
    for text in methods:
        spec = parse_method_spec(text)
        if spec.name == "none":
            continue
        for budget in (budgets if spec.budget is None else [spec.budget]):
            runs.append((_label(spec, budget), MethodSpec(spec.name, budget, spec.fields)))
    return runs


def run_compare(methods: list[str], budgets: list[float], out: str | Path, model_path: str | Path = BUNDLED_MODEL,
                per_family: int = 100, batch_size: int = 25, progress: bool = True) -> list[Result]:
    """Evaluate every run of ``compare_runs`` and write results.json, results.md and meta.json to ``out``.
    Every method is configured before the first evaluation, so a bad spec fails before any work."""
    runs = compare_runs(methods, budgets)
    model, processor = load_model(model_path)
    num_layers = model.config.text_config.num_hidden_layers
    side = vision_grid_side(model)
    items = question_set(per_family)
    grids = [(side, side)]
    configured = [(label, spec.budget, build_method(spec, num_layers=num_layers, grids=grids))
                  for label, spec in runs]
    print(f"{model_path}: {num_layers} decoder layers, {side}x{side} vision tokens; {len(items)} test questions")
    base = evaluate(model, processor, None, items, name="none", batch_size=batch_size, progress=progress)
    base.loyalty = 1.0
    results = [base]
    for label, target, method in configured:
        r = evaluate(model, processor, method, items, name=label, budget=target, reference=base.answers,
                     batch_size=batch_size, progress=progress, flops_fn=analytic_flops(model))
        r.params["predicted_fraction"] = sum(method.kept_per_layer(num_layers, grids)) / (num_layers * side * side)
        results.append(r)
        print(f"  {r.method:18} retained {r.retained_fraction:.3f}  accuracy {100 * r.accuracy:5.1f}  "
              f"loyalty {100 * r.loyalty:5.1f}", flush=True)
    out = Path(out)
    write_results(results, out, title=f"matched budgets, bundled {model_label(model)}")
    table = markdown_table(results)
    print(table)
    meta = {"command": " ".join(["lightkv"] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": f"{platform.machine()}, CPU only", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "model": str(model_path), "questions": len(items)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return results
