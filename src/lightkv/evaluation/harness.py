"""Evaluation harness: run a method over a split of the shapes QA set, batched, and report accuracy and cost.

Answers are one word, and one word is one token of the bundled model's word-level tokenizer, so the answer
is the greedy first token after the prompt (``model(...)`` with ``logits_to_keep=1``, which is exactly what
``generate`` would pick first); the prefill is where every compression method acts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import get_adapter
from ..bundled import BUNDLED_MODEL
from ..engine import apply
from ..methods import Method
from .shapes import CHANCE, FAMILIES, Question, Scene
from .shapes import IMAGE_SIZE
from .tiny_model import QwenShapesProcessor, format_prompt, format_qwen_prompt

__all__ = ["load_model", "question_set", "Result", "evaluate", "write_results", "markdown_table", "analytic_flops",
           "prompt_for", "vision_grid", "vision_grid_side", "model_label"]


def load_model(path: str | Path = BUNDLED_MODEL, attn_implementation: str = "sdpa"):
    """Load a bundled model saved with ``save_pretrained`` (offline) and its processor: a LLaVA or a
    Qwen2.5-VL architecture (the latter with ``QwenShapesProcessor``, as transformers' Qwen processor class
    needs torchvision)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path}; train one with scripts/train_tiny_llava.py")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        processor = QwenShapesProcessor.from_pretrained(path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation)
    elif model_type == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation)
    else:
        raise ValueError(f"{path}: model_type {model_type!r}; the shapes harness runs 'llava' and 'qwen2_5_vl' models")
    return model.eval(), processor


def prompt_for(processor):
    """The function that turns a question into the model's one-image prompt."""
    return format_qwen_prompt if isinstance(processor, QwenShapesProcessor) else format_prompt


def model_label(model) -> str:
    """A short name of the bundled architecture for titles."""
    return {"qwen2_5_vl": "tiny Qwen2.5-VL", "llava": "tiny LLaVA"}.get(model.config.model_type,
                                                                       model.config.model_type)


def vision_grid(model) -> tuple[int, int]:
    """(rows, cols) vision tokens of a shapes image (IMAGE_SIZE px square) in the decoder: the model's adapter
    says (``Adapter.default_grid``)."""
    grid = get_adapter(model).default_grid(max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    if grid is None:
        raise ValueError(f"cannot tell the image token grid of {type(model).__name__} from its config")
    return grid


def vision_grid_side(model) -> int:
    """Vision tokens per side of a shapes image in the decoder (the image is square, so is its grid)."""
    return vision_grid(model)[0]


def question_set(num_per_family: int = 100, split: str = "test") -> list[tuple[Scene, Question]]:
    """A family-balanced list of (scene, question): one question per image, families in turn; existence
    answers alternate yes / no (exactly balanced)."""
    from .shapes import make_questions, make_scene, SPLIT_SEEDS
    import numpy as np

    items: list[tuple[Scene, Question]] = []
    counts = {f: 0 for f in FAMILIES}
    seed = SPLIT_SEEDS[split]
    while min(counts.values()) < num_per_family:
        rng = np.random.default_rng(seed)
        seed += 1
        scene = make_scene(rng)
        family = FAMILIES[len(items) % len(FAMILIES)]
        if counts[family] >= num_per_family:
            family = min(counts, key=counts.get)
        answer = ("yes", "no")[counts["existence"] % 2] if family == "existence" else None
        qs = make_questions(scene, rng, 1, families=(family,), existence_answer=answer)
        if qs:
            items.append((scene, qs[0]))
            counts[family] += 1
    return items


def analytic_flops(model):
    """A ``flops_fn`` for ``evaluate``: analytic prefill FLOPs (lightkv.perf) of the run and of the uncompressed
    model, from the per-layer token counts the run reports and the model's config."""
    from types import SimpleNamespace

    from ..perf.analytic import profile_from_stats
    from ..perf.specs import dims_from_config

    dims = dims_from_config(model.config, get_adapter(model).family, image_px=IMAGE_SIZE)
    grid = vision_grid(model)
    spec = SimpleNamespace(dims=lambda depth=None: dims, grid=lambda: grid)  # what profile_from_stats reads
    image_token = model.config.image_token_id

    def flops_fn(method, stats, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        is_image = (ids == image_token) & mask
        images = [1 if bool(row.any()) else 0 for row in is_image]
        last_image = torch.where(is_image.any(1), is_image.long().cumsum(1).argmax(1), 0)
        text_after = [int((mask[b] & ~is_image[b])[int(last_image[b]) + 1:].sum()) for b in range(len(ids))]
        L = len(stats.tokens[0])
        full = SimpleNamespace(tokens=[[int(n)] * L for n in mask.sum(1)],
                               vision_tokens=[[int(v)] * L for v in is_image.sum(1)])
        ours = profile_from_stats(spec, method, stats, images, text_after, dtype_bytes=4).flops.total
        base = profile_from_stats(spec, None, full, images, text_after, dtype_bytes=4).flops.total
        return ours, base

    return flops_fn


@dataclass
class Result:
    method: str
    budget: float | None
    retained_fraction: float
    accuracy: float
    loyalty: float | None
    per_family: dict[str, float]
    vision_kv_ratio: float
    total_kv_ratio: float
    flops_ratio: float | None
    wall_s: float
    params: dict[str, Any] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "answers"}
        return out


@torch.no_grad()
def evaluate(model, processor, method: Method | None, items: list[tuple[Scene, Question]], *, name: str | None = None,
             budget: float | None = None, reference: list[str] | None = None, batch_size: int = 25,
             progress: bool = True, flops_fn=None) -> Result:
    """Accuracy, loyalty (agreement with ``reference`` answers) and cache statistics of ``method`` on ``items``.

    flops_fn(method, stats, inputs) -> (method_flops, uncompressed_flops), optional, for the prefill FLOPs
    ratio (``analytic_flops(model)`` builds one from the config).
    """
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    prompt = prompt_for(processor)
    handle = apply(model, method) if method is not None else None
    answers: list[str] = []
    retained: list[float] = []
    vis_kv = vis_full = kv = kv_full = 0
    flops = flops_full = 0.0
    start = time.perf_counter()
    try:
        bar = tqdm(range(0, len(items), batch_size), desc=name or "none", disable=not progress, leave=False)
        for i in bar:
            chunk = items[i : i + batch_size]
            inputs = processor(images=[s.image for s, _ in chunk], text=[prompt(q.question) for _, q in chunk],
                               return_tensors="pt", padding=True)
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            answers += tokenizer.convert_ids_to_tokens(out.logits[:, -1].argmax(-1).tolist())
            if handle is not None:
                stats = handle.stats
                retained += [r for r in stats.retained_fraction if r is not None]
                vis_kv += sum(stats.vision_kv_bytes)
                vis_full += sum(stats.uncompressed_vision_kv_bytes)
                kv += sum(stats.kv_bytes)
                kv_full += sum(stats.uncompressed_kv_bytes)
                if flops_fn is not None:
                    f, f_full = flops_fn(method, stats, inputs)
                    flops, flops_full = flops + f, flops_full + f_full
            else:
                retained += [1.0] * len(chunk)
    finally:
        if handle is not None:
            handle.remove()
    wall = time.perf_counter() - start
    correct = [a == q.answer for a, (_, q) in zip(answers, items)]
    per_family = {}
    for f in FAMILIES:
        idx = [j for j, (_, q) in enumerate(items) if q.family == f]
        per_family[f] = sum(correct[j] for j in idx) / max(1, len(idx))
    loyalty = None if reference is None else sum(a == r for a, r in zip(answers, reference)) / len(answers)
    return Result(
        method=name or ("none" if method is None else type(method).__name__.lower()),
        budget=budget, retained_fraction=sum(retained) / max(1, len(retained)),
        accuracy=sum(correct) / len(correct), loyalty=loyalty, per_family=per_family,
        vision_kv_ratio=vis_kv / vis_full if vis_full else 1.0, total_kv_ratio=kv / kv_full if kv_full else 1.0,
        flops_ratio=(flops / flops_full) if flops_full else (1.0 if method is None else None), wall_s=wall,
        params={} if method is None else {f.name: (list(v) if isinstance(v, tuple) else v)
                                          for f in dataclasses.fields(method)
                                          for v in [getattr(method, f.name)]},
        answers=answers)


def markdown_table(results: list[Result]) -> str:
    head = ("| method | budget | retained | accuracy | loyalty | " + " | ".join(FAMILIES)
            + " | vision KV | total KV | FLOPs | wall s |")
    sep = "|" + "---|" * (10 + len(FAMILIES) - 1)
    lines = [head, sep]
    for r in results:
        fam = " | ".join(f"{100 * r.per_family[f]:.1f}" for f in FAMILIES)
        loyalty = "-" if r.loyalty is None else f"{100 * r.loyalty:.1f}"
        flops = "-" if r.flops_ratio is None else f"{r.flops_ratio:.3f}"
        budget = "-" if r.budget is None else f"{r.budget:.2f}"
        lines.append(f"| {r.method} | {budget} | {r.retained_fraction:.3f} | {100 * r.accuracy:.1f} | {loyalty} | "
                     f"{fam} | {r.vision_kv_ratio:.3f} | {r.total_kv_ratio:.3f} | {flops} | {r.wall_s:.1f} |")
    chance = " | ".join(f"{100 * CHANCE[f]:.1f}" for f in FAMILIES)
    lines.append(f"| chance | - | - | - | - | {chance} | - | - | - | - |")
    return "\n".join(lines)


def write_results(results: list[Result], out: str | Path, title: str = "results") -> None:
    """results.json (rows), results.md (table) and accuracy-vs-budget plot in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.row() for r in results], indent=1, default=str))
    (out / "results.md").write_text(markdown_table(results) + "\n")
    plot_accuracy(results, out / "accuracy_vs_budget.png", title)


def plot_accuracy(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[Result]] = {}
    for r in results:
        key = r.method.split("@")[0]
        groups.setdefault(key, []).append(r)
    base = next((r for r in results if r.method == "none"), None)
    for key, rs in groups.items():
        if key == "none":
            continue
        pts = sorted(rs, key=lambda r: r.retained_fraction)
        if base is not None:
            pts = pts + [base]
        ax.plot([r.retained_fraction for r in pts], [100 * r.accuracy for r in pts], marker="o", label=key)
    if base is not None:
        ax.axhline(100 * base.accuracy, color="gray", ls="--", lw=1, label="uncompressed")
    ax.set_xlabel("average retained vision fraction (over layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
