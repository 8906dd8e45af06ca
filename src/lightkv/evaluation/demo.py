"""``lightkv demo``: the bundled model, uncompressed and with LightKV at about 55% and 30% of the vision tokens."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..bundled import BUNDLED_MODEL
from ..methods import LightKV
from ..methods.spec import build_method
from .harness import (analytic_flops, evaluate, load_model, markdown_table, model_label, prompt_for, question_set,
                      vision_grid_side, write_results)

__all__ = ["run_demo", "lightkv_schedule", "merge_map_figure"]


def lightkv_schedule(num_layers: int, grid: tuple[int, int], target: float) -> LightKV:
    """LightKV's reference schedule scaled to the model's depth, ratios matched to ``target`` (``match_budget``)."""
    return build_method("lightkv", budget=target, num_layers=num_layers, grids=[tuple(grid)])


def merge_map_figure(model, processor, method: LightKV, items, path: Path) -> None:
    """For a few images: which image regions were merged together after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..engine import apply

    grid = vision_grid_side(model)
    prompt = prompt_for(processor)
    rows = len(items)
    stages = len(method.layers)
    fig, axes = plt.subplots(rows, stages + 1, figsize=(2.3 * (stages + 1), 2.5 * rows))
    axes = np.atleast_2d(axes)
    with apply(model, method, record=True) as handle, torch.no_grad():
        for r, (scene, question) in enumerate(items):
            inputs = processor(images=[scene.image], text=[prompt(question.question)], return_tensors="pt")
            out = model(**inputs, logits_to_keep=1)
            answer = processor.tokenizer.convert_ids_to_tokens([int(out.logits[0, -1].argmax())])[0]
            image_positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
            first = int(image_positions[0])
            axes[r, 0].imshow(scene.image)
            axes[r, 0].set_title(f"{question.question}\n-> {answer} (true: {question.answer})", fontsize=6)
            rng = np.random.default_rng(0)
            palette = rng.uniform(0.15, 1.0, size=(grid * grid, 3))
            for s in range(stages):
                rep = handle.stats.merge_maps[s][0][image_positions] - first  # representative patch
                kept = rep == torch.arange(grid * grid)
                sizes = torch.bincount(rep, minlength=grid * grid)[rep]  # tokens in each patch's group
                alpha = np.where(sizes.numpy() > 1, 0.65, 0.0).reshape(grid, grid, 1)  # singletons stay as is
                colours = palette[rep.numpy()].reshape(grid, grid, 3)
                up = np.ones((8, 8, 1))
                ax = axes[r, s + 1]
                ax.imshow(np.asarray(scene.image.resize((grid * 8, grid * 8), 0)) / 255.0 * (1 - np.kron(alpha, up))
                          + np.kron(alpha * colours, up))
                ax.set_title(f"after layer {method.layers[s]}: {int(kept.sum())}/{grid * grid} tokens", fontsize=7)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle("merge maps: patches of one colour were merged into one token (unmerged patches: image)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path | None, model_path: str | Path = BUNDLED_MODEL, per_family: int = 60,
             batch_size: int = 25) -> int:
    """Evaluate and print; with ``out`` (``lightkv demo`` always gives one) also write results.json,
    results.md, the accuracy plot, merge_maps.png and meta.json there."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor = load_model(model_path)
    num_layers = model.config.text_config.num_hidden_layers
    side = vision_grid_side(model)
    items = question_set(per_family)
    print(f"bundled model: {model_path} ({num_layers} decoder layers, {side}x{side} vision tokens); "
          f"{len(items)} test questions ({per_family} per family)")
    results = [evaluate(model, processor, None, items, name="none", batch_size=batch_size)]
    reference = results[0].answers
    for target in (0.55, 0.30):
        method = lightkv_schedule(num_layers, (side, side), target)
        name = f"lightkv@{target:.2f}"
        results.append(evaluate(model, processor, method, items, name=name, budget=target, reference=reference,
                                batch_size=batch_size, flops_fn=analytic_flops(model)))
        print(f"  {name}: layers {list(method.layers)} windows {list(method.windows)} ratios {list(method.ratios)}")
    results[0].loyalty = 1.0
    print(markdown_table(results))
    base = results[0].accuracy
    for r in results[1:] if base > 0 else []:
        print(f"{r.method}: keeps {100 * r.accuracy / base:.1f}% of the uncompressed accuracy at "
              f"{r.retained_fraction:.3f} retained vision tokens (vision KV {r.vision_kv_ratio:.3f})")
    if out is not None:
        out = Path(out)
        write_results(results, out, title=f"bundled {model_label(model)}, shapes test split")
        figure_items = [items[i] for i in (0, 1, 3, 4)]
        merge_map_figure(model, processor, lightkv_schedule(num_layers, (side, side), 0.55), figure_items,
                         out / "merge_maps.png")
        meta = {"command": " ".join(["lightkv"] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, no GPU",
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": __import__("transformers").__version__, "model": str(model_path)}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"wrote {out}/results.json, results.md, accuracy_vs_budget.png, merge_maps.png")
    return 0
