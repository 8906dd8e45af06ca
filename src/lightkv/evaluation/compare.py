"""``lightkv compare``: every method at matched KV budgets on the bundled model's shapes test split."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..budget import budget_methods, match_budget
from .harness import (Result, analytic_flops, evaluate, load_model, markdown_table, model_label, question_set,
                      vision_grid_side, write_results)
from .tiny_model import BUNDLED_MODEL

__all__ = ["run_compare"]


def run_compare(methods: list[str], budgets: list[float], out: str | Path, model_path: str | Path = BUNDLED_MODEL,
                per_family: int = 100, batch_size: int = 25, progress: bool = True) -> list[Result]:
    unknown = [m for m in methods if m not in budget_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(budget_methods())}")
    model, processor = load_model(model_path)
    num_layers = model.config.text_config.num_hidden_layers
    side = vision_grid_side(model)
    items = question_set(per_family)
    print(f"{model_path}: {num_layers} decoder layers, {side}x{side} vision tokens; {len(items)} test questions")
    base = evaluate(model, processor, None, items, name="none", batch_size=batch_size, progress=progress)
    base.loyalty = 1.0
    results = [base]
    for name in methods:
        for target in budgets:
            match = match_budget(name, target, num_layers, (side, side))
            r = evaluate(model, processor, match.method, items, name=f"{name}@{target:.2f}", budget=target,
                         reference=base.answers, batch_size=batch_size, progress=progress,
                         flops_fn=analytic_flops(model))
            r.params["predicted_fraction"] = match.retained_fraction
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
