"""Pieces of one measured run that ``bench`` and ``scaling`` share: prompts, prefill, greedy decode, cache
bytes, tiled caches, medians and ratios, table cells.

    inputs = make_inputs(model, Workload(images=2), device, dtype)
    out, wall_s, cpu_s = prefill(model, inputs, device)
    kv = cache_bytes(cache_of(out))                       # bytes per layer
    decode(model, cache_of(out), out.logits, inputs["attention_mask"], steps=8, device=device)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import statistics
import sys
import time
from typing import Any

import torch

from ..engine import attach_record, record_of
from .analytic import Workload

__all__ = ["sync", "median", "ratio", "make_inputs", "cache_kwarg", "cache_of", "cache_bytes", "next_token", "decode",
           "prefill", "tile_cache", "fmt", "log"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float | None:
    """Median of the values that are not None (None when none are)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def make_inputs(model: torch.nn.Module, workload: Workload, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict:
    """A LLaVA prompt: text_before tokens, ``images`` images (one separator between two), text_after tokens,
    replicated ``batch`` times (identical samples: no padding)."""
    from ..testing import llava_prompt

    config = model.config
    vocab = config.text_config.vocab_size
    usable = [i for i in range(10, vocab) if i != config.image_token_id][: max(1, vocab - 20)]
    before = [1] + [usable[i % len(usable)] for i in range(workload.text_before - 1)]
    after = [usable[(workload.text_before + i) % len(usable)] for i in range(workload.text_after)]
    prompt = llava_prompt(model, before, after, num_images=workload.images, seed=seed)
    B = workload.batch
    out = {"input_ids": prompt["input_ids"].repeat(B, 1).to(device),
           "attention_mask": prompt["attention_mask"].repeat(B, 1).to(device)}
    if "pixel_values" in prompt:
        out["pixel_values"] = prompt["pixel_values"].repeat(B, 1, 1, 1).to(device=device, dtype=dtype)
    return out


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the cache argument of ``model.forward`` (``cache`` or ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The cache a forward returned, under either attribute name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_bytes(cache: Any) -> list[int]:
    """Bytes of keys + values held by each layer of a transformers cache."""
    return [layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers]


def next_token(logits: torch.Tensor, banned: int) -> torch.Tensor:
    """Greedy next token (B, 1) from logits (B, T, V), never ``banned``."""
    logits = logits[:, -1].float()
    logits[:, banned] = float("-inf")  # an image token id would start a new image prefill
    return logits.argmax(-1, keepdim=True)


def decode(model: torch.nn.Module, cache: Any, first_logits: torch.Tensor, attention_mask: torch.Tensor,
           steps: int, device: torch.device) -> tuple[float, float]:
    """``steps`` greedy decode steps on ``cache``; returns wall seconds (device-synchronised) and process CPU
    seconds."""
    kwarg = cache_kwarg(model)
    banned = model.config.image_token_id
    token = next_token(first_logits, banned)
    mask = attention_mask
    ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{kwarg: cache})
        token = next_token(out.logits, banned)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def prefill(model: torch.nn.Module, inputs: dict, device: torch.device,
            split: dict | None = None) -> tuple[Any, float, float]:
    """Output, wall seconds and process CPU seconds of one prefill. On a shared CPU machine with one torch
    thread, CPU seconds are the time the prefill computed, whatever other processes took from the core.

    split: a dict that receives ``decoder_s`` (wall seconds from the first decoder layer's start to the last
    one's end: the layers and any lightkv hooks inside them) and ``outside_s`` (the rest: vision tower,
    projector, embeddings, LM head, lightkv's layout work before the decoder). On CUDA the two boundaries
    synchronise the device once each."""
    hooks = _decoder_span_hooks(model, device, split) if split is not None else []
    try:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        sync(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for hook in hooks:
            hook.remove()
    if split is not None:
        split["outside_s"] = wall - split.get("decoder_s", 0.0)
    return out, wall, cpu


def _decoder_span_hooks(model: torch.nn.Module, device: torch.device, split: dict) -> list:
    """Forward hooks that write the wall time spent between the first decoder layer's start and the last
    decoder layer's end into ``split["decoder_s"]``."""
    from ..adapters import get_adapter

    layers = get_adapter(model).decoder_layers
    marks: dict[str, float] = {}

    def begin(module, args):
        sync(device)
        marks["start"] = time.perf_counter()

    def end(module, args, output):
        sync(device)
        split["decoder_s"] = time.perf_counter() - marks["start"]

    # first among the pre-hooks and last among the hooks, so lightkv's own hooks on those layers count inside
    return [layers[0].register_forward_pre_hook(begin, prepend=True), layers[-1].register_forward_hook(end)]


def tile_cache(cache: Any, batch: int) -> Any:
    """A copy of a batch-1 prefill cache repeated ``batch`` times, as a real batched prefill of ``batch``
    identical prompts would give it; a cache compressed by lightkv keeps its record (``engine.record_of``),
    repeated too, so any handle on the model continues it."""
    record = record_of(cache)
    tiled = copy.deepcopy(cache)
    tiled.batch_repeat_interleave(batch)
    if record is not None:
        segments = [tuple(t.repeat(batch, *([1] * (t.dim() - 1))) for t in segment) for segment in record.segments]
        attach_record(tiled, dataclasses.replace(record, segments=segments))
    return tiled


def fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: ``value`` formatted, or an en dash when it is missing."""
    if value is None:
        return "–"
    return format(value, spec)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the report)."""
    print(message, file=sys.stderr, flush=True)
