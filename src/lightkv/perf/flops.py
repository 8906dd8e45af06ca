"""Analytic prefill FLOPs from a config and per-layer token counts (no weights, no model run).

One multiply-add counts 2 FLOPs. Two kinds of terms:
  matmul: every matrix product (projections, attention scores and weighted sum, MLP, LM head, vision tower,
      projector, LightKV's cosine matching and guidance block). ``torch.utils.flop_counter`` counts exactly these
      on a model run with eager attention, so ``tests/test_perf.py`` checks them against it to the FLOP.
  other: element-wise work (norms, RoPE, softmax, activations, residuals, LightKV's normalisation and weighted
      averages), a few FLOPs per element; estimates, below 1% of the total on real sizes.

Formulas, per sample, for a decoder layer that runs n tokens (d hidden, H/Hkv heads of dh, f intermediate):
  projections  2 n d (H + 2 Hkv) dh + 2 n H dh d
  attention    4 H n n dh        (q k^T and p v over the dense n x n block, as sdpa/eager kernels compute it;
                                  ``causal=True`` halves it to 4 H n (n + 1)/2 dh, what a causal flash kernel skips)
  mlp          6 n d f           (gate, up, down)
  lm_head      2 d V per sample  (logits of the last token only, as ``generate`` asks with logits_to_keep=1)
Vision tower per image (T tokens inside the tower, P patches to the decoder, dv hidden, fv intermediate):
  patch_embed  2 P (C p^2 t) dv;  per layer 8 T dv^2 + 4 T T_att dv + (4 or 6) T dv fv;  projector 2 P in out.
LightKV stage on a sample with N current tokens, Pr prompt tokens and windows of n_w tokens:
  matching     sum_w 2 ceil(n_w / 2) floor(n_w / 2) d        (cosine similarity A x B in each window)
  guidance     2 H N Pr dh (faithful: all queries x prompt keys) or 2 H T N dh (text_to_vision, T text queries)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .specs import TextDims, VisionDims

__all__ = ["FlopsReport", "decoder_layer_flops", "vision_flops", "stage_flops", "prefill_flops", "window_sizes"]


@dataclass
class FlopsReport:
    """Prefill FLOPs by component. ``matmul`` and ``other`` map a component name to FLOPs."""

    matmul: dict[str, float] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)
    per_layer: list[float] = field(default_factory=list)  # decoder FLOPs of each layer (all samples)

    def add(self, kind: str, name: str, value: float) -> None:
        table = self.matmul if kind == "matmul" else self.other
        table[name] = table.get(name, 0.0) + float(value)

    @property
    def matmul_total(self) -> float:
        return sum(self.matmul.values())

    @property
    def total(self) -> float:
        return self.matmul_total + sum(self.other.values())

    def group(self, prefix: str) -> float:
        """Total of the components whose name starts with ``prefix`` (both kinds)."""
        return sum(v for table in (self.matmul, self.other) for k, v in table.items() if k.startswith(prefix))

    def as_dict(self) -> dict:
        return {"total": self.total, "matmul_total": self.matmul_total, "matmul": dict(self.matmul),
                "other": dict(self.other), "decoder": self.group("decoder."), "vision": self.group("vision."),
                "lightkv": self.group("lightkv."), "per_layer": list(self.per_layer)}


def decoder_layer_flops(t: TextDims, n: int, causal: bool = False) -> dict[str, tuple[str, float]]:
    """FLOPs of one decoder layer running ``n`` tokens at prefill: name -> (kind, FLOPs)."""
    d, H, Hkv, dh, f = t.hidden, t.heads, t.kv_heads, t.head_dim, t.intermediate
    keys = (n + 1) / 2 if causal else n  # mean number of keys a query is scored against
    return {
        "decoder.qkv_proj": ("matmul", 2 * n * d * (H + 2 * Hkv) * dh),
        "decoder.o_proj": ("matmul", 2 * n * H * dh * d),
        "decoder.attention": ("matmul", 4 * H * n * keys * dh),
        "decoder.mlp": ("matmul", 6 * n * d * f),
        # two RMSNorms (~4 per element), RoPE on q and k (~3), softmax (~5 per score), SiLU * up (~5),
        # two residual adds
        "decoder.elementwise": ("other", 8 * n * d + 3 * n * (H + Hkv) * dh + 5 * H * n * keys + 5 * n * f + 2 * n * d),
    }


def vision_flops(v: VisionDims, images: int) -> dict[str, tuple[str, float]]:
    """FLOPs of the vision tower and projector for ``images`` images."""
    T, dv, fv = v.tokens, v.hidden, v.intermediate
    patch_tokens = T - int(v.cls_token)
    window = v.attention_window or T
    global_layers = v.full_attention_layers if v.attention_window else v.layers
    attn_keys = global_layers * T + (v.layers - global_layers) * window  # keys per query, summed over layers
    mlp = (6 if v.gated_mlp else 4) * T * dv * fv
    out = {
        "vision.patch_embed": ("matmul", 2 * patch_tokens * v.channels * v.patch * v.patch * v.patch_depth * dv),
        "vision.proj": ("matmul", v.layers * 8 * T * dv * dv),
        "vision.attention": ("matmul", 4 * T * attn_keys * dv),
        "vision.mlp": ("matmul", v.layers * mlp),
        "vision.projector": ("matmul", sum(2 * v.projector_tokens * i * o for i, o in v.projector)),
        "vision.elementwise": ("other", v.layers * (10 * T * dv + 8 * T * fv) + 5 * v.heads * T * attn_keys),
    }
    return {k: (kind, value * images) for k, (kind, value) in out.items()}


def window_sizes(grid: tuple[int, int], windows: int, current: int) -> list[int]:
    """Tokens per window when ``current`` patches of an H x W grid are spread evenly over its windows.

    Windows are W x W near-equal bands (the first H mod W bands one row larger, METHOD.md step 1); the count
    of a window is ``current`` times its share of the grid's cells, rounded.
    """
    H, W = grid

    def bands(size: int) -> list[int]:
        base, extra = divmod(size, windows)
        return [base + (1 if b < extra else 0) for b in range(windows)]

    cells = [r * c for r in bands(H) for c in bands(W)]
    return [round(current * c / (H * W)) for c in cells]


def stage_flops(t: TextDims, tokens: int, prompt_tokens: int, window_counts: Sequence[int],
                guidance: str = "faithful", text_queries: int = 0) -> dict[str, tuple[str, float]]:
    """LightKV's own work at one stage for one sample: matching, guidance block and merging.

    tokens: current real tokens N of the sample; prompt_tokens: non-vision tokens (the prompt keys);
    window_counts: tokens per window of every image of the sample that takes part;
    text_queries: text tokens after the first image (for ``text_to_vision``).
    """
    d, H, Hkv, dh = t.hidden, t.heads, t.kv_heads, t.head_dim
    pairs = sum(math.ceil(n / 2) * (n // 2) for n in window_counts)
    members = sum(window_counts)
    out: dict[str, tuple[str, float]] = {
        "lightkv.matching": ("matmul", 2 * pairs * d),
        # normalise members (3/element), weighted sums into receivers (~3 per merged element, at most half)
        "lightkv.merge": ("other", 3 * members * d + 3 * members * d / 2),
    }
    if guidance == "faithful":
        out["lightkv.guidance"] = ("matmul", 2 * H * tokens * prompt_tokens * dh)
        out["lightkv.guidance_other"] = ("other", 3 * tokens * (H + Hkv) * dh + 5 * H * tokens * prompt_tokens)
    elif guidance == "text_to_vision":
        out["lightkv.guidance"] = ("matmul", 2 * H * text_queries * tokens * dh)
        out["lightkv.guidance_other"] = ("other", 3 * tokens * (H + Hkv) * dh + 5 * H * text_queries * tokens)
    return out


def prefill_flops(t: TextDims, v: VisionDims | None, tokens_per_layer: Sequence[Sequence[int]],
                  images: Sequence[int], stages: Sequence[Sequence[dict]] = (), causal: bool = False,
                  logits_tokens: int = 1) -> FlopsReport:
    """Prefill FLOPs of a batch.

    tokens_per_layer: [sample][layer] real tokens each decoder layer runs (``PrefillStats.tokens``).
    images: images per sample (vision tower cost). stages: [sample] list of ``stage_flops`` keyword
    dicts (LightKV's extra work), empty for the uncompressed model.
    logits_tokens: positions per sample that go through the LM head (1 for ``generate``'s prefill).
    """
    report = FlopsReport()
    L = len(tokens_per_layer[0]) if tokens_per_layer else t.layers
    per_layer = [0.0] * L
    for sample in tokens_per_layer:
        for layer, n in enumerate(sample):
            for name, (kind, value) in decoder_layer_flops(t, n, causal).items():
                report.add(kind, name, value)
                per_layer[layer] += value
    report.per_layer = per_layer
    report.add("matmul", "decoder.lm_head", 2 * t.hidden * t.vocab * logits_tokens * len(tokens_per_layer))
    if v is not None and sum(images):
        for name, (kind, value) in vision_flops(v, sum(images)).items():
            report.add(kind, name, value)
    for sample_stages in stages:
        for kwargs in sample_stages:
            for name, (kind, value) in stage_flops(t, **kwargs).items():
                report.add(kind, name, value)
    return report
