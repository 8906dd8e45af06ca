"""Paired test of LightKV's guidance modes: faithful (the paper) vs uniform vs text_to_vision, same schedule.

For each bundled model and each budget, one schedule (``match_budget("lightkv", budget, ...)``: the paper's shape
scaled to the depth) is run three times on the same test questions, only ``guidance`` differing. Each pair of
modes is compared with an exact McNemar test on the per-question correctness (two-sided binomial test on the
discordant questions).

    python scripts/guidance_paired.py --out docs/results/guidance-paired --per-family 200

Every run's answers are cached in --cache (default out/eval-cache), so a rerun only runs what is missing
(scripts/calibration_table.py shares the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import platform
import time
from pathlib import Path

import torch

from lightkv.budget import match_budget
from lightkv.bundled import BUNDLED_MODEL, BUNDLED_QWEN_MODEL
from lightkv.evaluation.harness import Result, evaluate, load_model, model_label, question_set, vision_grid
from lightkv.guidance import GUIDANCE_MODES


def cached_evaluate(cache: Path, model, processor, method, items, split: str, *, name: str,
                    budget: float | None = None, reference: list[str] | None = None) -> Result:
    """``evaluate`` once per (model, split, questions, method): answers and row are kept in ``cache``."""
    key = f"{model.name_or_path}|{split}|{len(items)}|{method!r}|{reference is not None}"
    path = cache / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        data = json.loads(path.read_text())
        if data["key"] == key:
            result = Result(**data["row"], answers=data["answers"])
            result.method, result.budget = name, budget
            return result
    result = evaluate(model, processor, method, items, name=name, budget=budget, reference=reference,
                      progress=False)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "row": result.row(), "answers": result.answers}))
    return result


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: questions right under A only vs under B only, a fair coin under H0."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/results/guidance-paired")
    ap.add_argument("--per-family", type=int, default=200, help="test questions per family (5 families)")
    ap.add_argument("--budgets", default="0.55,0.35,0.30")
    ap.add_argument("--models", default="llava,qwen")
    ap.add_argument("--cache", default="out/eval-cache", help="folder of cached runs (answers per question)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    paths = {"llava": BUNDLED_MODEL, "qwen": BUNDLED_QWEN_MODEL}
    items = question_set(args.per_family, "test")
    truth = [q.answer for _, q in items]
    rows, tests = [], []
    cache = Path(args.cache)
    for key in args.models.split(","):
        model, processor = load_model(paths[key])
        label = model_label(model)
        num_layers, grid = model.config.text_config.num_hidden_layers, vision_grid(model)
        base = cached_evaluate(cache, model, processor, None, items, "test", name="none")
        rows.append(dict(model=label, budget=None, schedule="-", guidance="none", accuracy=base.accuracy,
                         loyalty=1.0, vision_kv=1.0))
        for budget in budgets:
            schedule = match_budget("lightkv", budget, num_layers, grid=grid).method
            text = f"layers {list(schedule.layers)}, windows {list(schedule.windows)}, ratios {list(schedule.ratios)}"
            correct = {}
            for mode in GUIDANCE_MODES:
                r = cached_evaluate(cache, model, processor, dataclasses.replace(schedule, guidance=mode), items,
                                    "test", name=f"{mode}@{budget:.2f}", budget=budget, reference=base.answers)
                correct[mode] = [a == t for a, t in zip(r.answers, truth)]
                rows.append(dict(model=label, budget=budget, schedule=text, guidance=mode, accuracy=r.accuracy,
                                 loyalty=r.loyalty, vision_kv=r.vision_kv_ratio))
                print(f"{label} {budget:.2f} {mode}: acc {100 * r.accuracy:.1f} loyalty {100 * r.loyalty:.1f} "
                      f"vision KV {r.vision_kv_ratio:.3f}", flush=True)
            for a, b in itertools.combinations(GUIDANCE_MODES, 2):
                only_a = sum(x and not y for x, y in zip(correct[a], correct[b]))
                only_b = sum(y and not x for x, y in zip(correct[a], correct[b]))
                tests.append(dict(model=label, budget=budget, a=a, b=b, acc_a=sum(correct[a]) / len(items),
                                  acc_b=sum(correct[b]) / len(items), only_a=only_a, only_b=only_b,
                                  p=mcnemar_exact(only_a, only_b)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "mcnemar": tests}, indent=1))
    lines = ["# Guidance modes, paired: faithful vs uniform vs text_to_vision", "",
             f"Command: `python scripts/guidance_paired.py --out {args.out} --per-family {args.per_family} "
             f"--budgets {args.budgets} --models {args.models}`  ",
             f"Date: {time.strftime('%Y-%m-%d', time.gmtime())}; machine: {platform.machine()}, CPU only; "
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}  ",
             f"Test split: {len(items)} questions ({args.per_family} per family), the same for every run. Each "
             "budget's schedule is `match_budget(\"lightkv\", budget, num_layers=8, grid=(16, 16))` (the paper's "
             "shape scaled to 8 layers); only `guidance` differs between the three runs of a budget.", "",
             "## Accuracy", "",
             "| model | budget | schedule | guidance | accuracy | loyalty | vision KV |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.2f}"
        lines.append(f"| {r['model']} | {budget} | {r['schedule']} | {r['guidance']} | {100 * r['accuracy']:.1f} | "
                     f"{100 * r['loyalty']:.1f} | {r['vision_kv']:.3f} |")
    lines += ["", "## Exact McNemar tests (paired correctness)", "",
              "A right / B wrong and A wrong / B right count the discordant questions; p is two-sided.", "",
              "| model | budget | A | B | acc A | acc B | A right, B wrong | A wrong, B right | p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['model']} | {t['budget']:.2f} | {t['a']} | {t['b']} | {100 * t['acc_a']:.1f} | "
                     f"{100 * t['acc_b']:.1f} | {t['only_a']} | {t['only_b']} | {t['p']:.3g} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
