"""Scaling sweeps of ``lightkv bench --scaling``.

  vision tokens  prefill time, KV bytes and FLOPs for 1..5 images per prompt (LLaVA-1.5: 576 tokens per
                 image, so 576..2,880 vision tokens), batch 1;
  batch          decode throughput at batch sizes 1..32 for a fixed prompt. On CPU the batch-1 prefill's cache
                 is tiled (``tile_cache``: identical prompts give identical caches, so this equals a real batched
                 prefill, at 1/B of the cost); on GPU the whole batch is prefilled;
  budget         the largest batch whose weights + KV cache fit a memory budget, from the analytic full-size
                 KV bytes per sample (prompt + decoded tokens) and parameter bytes; activations are left out
                 (a server prefills one request at a time).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..engine import apply
from ..methods import Method
from .analytic import Workload, kv_bytes_per_token, predict_profile, profile_from_stats
from .memory import PeakMemory, max_batch, parameter_count
from .methods import make_method
from .runs import cache_bytes, cache_of, decode, fmt, log, make_inputs, median, prefill, ratio, tile_cache
from .specs import ModelSpec

__all__ = ["run_scaling", "scaling_markdown"]


def _vision_sweep(model, spec, methods, config, depth, device, dtype) -> list[dict]:
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    per_token = kv_bytes_per_token(spec.dims(depth)[0], dtype_bytes)
    rows = []
    for images in config.scaling_images:
        workload = Workload(images=images, text_before=config.text_before, text_after=config.text_after)
        inputs = make_inputs(model, workload, device, dtype, config.seed)
        vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
        times: dict[str, list[float]] = {label: [] for label, _ in methods}
        cpu_times: dict[str, list[float]] = {label: [] for label, _ in methods}
        last: dict[str, Any] = {}
        for _ in range(config.scaling_repeats):
            for label, method in methods:
                handle = apply(model, method) if method is not None else None
                try:
                    with torch.no_grad():
                        out, seconds, cpu_seconds = prefill(model, inputs, device)
                    times[label].append(seconds)
                    cpu_times[label].append(cpu_seconds)
                    last[label] = (cache_bytes(cache_of(out)), handle.stats if handle else None)
                    del out
                finally:
                    if handle is not None:
                        handle.remove()
        group = []
        for label, method in methods:
            kv, stats = last[label]
            if stats is not None:
                profile = profile_from_stats(spec, method, stats, [images], [workload.text_after_first_image()],
                                             depth, dtype_bytes)
                vision_kv = sum(stats.vision_kv_bytes)
            else:
                profile = predict_profile(spec, None, workload, depth, dtype_bytes)
                vision_kv = per_token * vision * len(kv)
            group.append({"images": images, "vision_tokens": vision, "method": label,
                          "prefill_ms": 1000 * median(times[label]),
                          "prefill_ms_runs": [1000 * t for t in times[label]],
                          "prefill_cpu_ms": 1000 * median(cpu_times[label]),
                          "total_kv_bytes": sum(kv), "vision_kv_bytes": vision_kv, "flops": profile.flops.total})
        base = next(r for r in group if r["method"] == "none")
        for r in group:
            for key in ("prefill_ms", "prefill_cpu_ms", "total_kv_bytes", "vision_kv_bytes", "flops"):
                r[key.replace("_bytes", "").replace("_ms", "") + "_ratio"] = ratio(r[key], base[key])
        rows += group
        log(f"  scaling: {images} image(s), {vision} vision tokens: "
             + ", ".join(f"{r['method']} {r['prefill_ms']:.0f} ms" for r in group))
    return rows


def _batch_sweep(model, spec, methods, config, depth, device, dtype) -> list[dict]:
    tile = config.tile_decode == "yes" or (config.tile_decode == "auto" and device.type != "cuda")
    steps = config.scaling_decode_tokens
    workload = Workload(images=config.images, text_before=config.text_before, text_after=config.text_after)
    single = make_inputs(model, workload, device, dtype, config.seed)
    prefilled: dict[str, tuple] = {}
    if tile:  # one batch-1 prefill per method, tiled to every batch size below
        for label, method in methods:
            handle = apply(model, method) if method is not None else None
            try:
                with torch.no_grad():
                    out, _, _ = prefill(model, single, device)
                prefilled[label] = (cache_of(out), out.logits)  # a compressed cache carries its record
            finally:
                if handle is not None:
                    handle.remove()
    rows = []
    for batch in config.batch_sizes:
        tps: dict[str, list[float]] = {label: [] for label, _ in methods}
        cpu_tps: dict[str, list[float]] = {label: [] for label, _ in methods}
        peaks: dict[str, list[int]] = {label: [] for label, _ in methods}
        inputs = None if tile else make_inputs(model, Workload(**{**workload.__dict__, "batch": batch}), device,
                                               dtype, config.seed)
        for _ in range(config.scaling_repeats):
            for label, method in methods:
                handle = apply(model, method) if method is not None else None
                peak = PeakMemory(device)
                try:
                    with torch.no_grad():
                        peak.reset()
                        if tile:
                            cache1, logits1 = prefilled[label]
                            cache = tile_cache(cache1, batch)
                            logits = logits1.repeat(batch, 1, 1)
                            mask = single["attention_mask"].repeat(batch, 1)
                        else:
                            out, _, _ = prefill(model, inputs, device)
                            cache, logits, mask = cache_of(out), out.logits, inputs["attention_mask"]
                        seconds, cpu_seconds = decode(model, cache, logits, mask, steps, device)
                        peaks[label].append(peak.read()["extra"])
                        del cache, logits
                    tps[label].append(batch * steps / seconds)
                    cpu_tps[label].append(batch * steps / cpu_seconds)
                finally:
                    if handle is not None:
                        handle.remove()
        group = [{"batch": batch, "method": label, "decode_tokens": steps, "tiled_prefill": tile,
                  "decode_tokens_per_s": median(tps[label]), "decode_tokens_per_s_runs": tps[label],
                  "decode_tokens_per_cpu_s": median(cpu_tps[label]),
                  "peak_mem_extra_bytes": median(peaks[label])} for label, _ in methods]
        base = next(r for r in group if r["method"] == "none")
        for r in group:
            r["decode_ratio"] = ratio(r["decode_tokens_per_s"], base["decode_tokens_per_s"])
            r["decode_cpu_ratio"] = ratio(r["decode_tokens_per_cpu_s"], base["decode_tokens_per_cpu_s"])
        rows += group
        log(f"  scaling: batch {batch}: " + ", ".join(f"{r['method']} {r['decode_tokens_per_s']:.1f} tok/s"
                                                       for r in group))
    return rows


def _budget(spec: ModelSpec, methods_full: list[tuple[str, Method | None]], config, dtype) -> list[dict]:
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    t, v = spec.dims()
    weights = parameter_count(t, v) * dtype_bytes
    workload = Workload(images=config.images, text_before=config.text_before, text_after=config.text_after)
    decoded = config.decode_tokens * kv_bytes_per_token(t, dtype_bytes) * t.layers  # new tokens: every layer
    rows = []
    for label, method in methods_full:
        profile = predict_profile(spec, method, workload, dtype_bytes=dtype_bytes)
        if profile is None:
            continue
        per_sample = sum(profile.kv_bytes) + decoded
        for budget in config.budgets_gb:
            rows.append({"method": label, "budget_gb": budget, "weights_bytes": weights,
                         "kv_bytes_per_sample": per_sample,
                         "context_tokens": profile.tokens[0][0] + config.decode_tokens,
                         "max_batch": max_batch(budget * 2**30, weights, per_sample)})
    return rows


def run_scaling(model: torch.nn.Module, spec: ModelSpec, methods: list[tuple[str, Method | None]], texts: list[str],
                config: Any, depth: int, device: torch.device, dtype: torch.dtype) -> dict:
    started = time.perf_counter()
    out = {"vision_tokens": _vision_sweep(model, spec, methods, config, depth, device, dtype)}
    out["batch"] = _batch_sweep(model, spec, methods, config, depth, device, dtype)
    full = [make_method(text, spec, spec.num_layers) for text in texts]
    out["budget"] = _budget(spec, full, config, dtype)
    out["notes"] = [
        f"vision tokens: 1..{max(config.scaling_images)} images of {spec.grid()[0] * spec.grid()[1]} tokens per "
        f"prompt, batch 1, {config.scaling_repeats} interleaved repetition(s) (median)",
        "batch: decode throughput over " f"{config.scaling_decode_tokens} greedy steps; "
        + ("batch-1 prefill cache tiled to the batch (identical prompts)" if out["batch"] and
           out["batch"][0]["tiled_prefill"] else "whole batch prefilled"),
        f"budget: weights + KV (prompt + {config.decode_tokens} decoded tokens) of the full-size model "
        f"({spec.num_layers} layers, {str(dtype).replace('torch.', '')}), analytic; activations not counted"]
    out["wall_s"] = time.perf_counter() - started
    return out


def scaling_markdown(scaling: dict) -> list[str]:
    lines = ["## Scaling", ""] + [f"- {n}" for n in scaling.get("notes", [])] + [""]
    lines += ["| images | vision tokens | method | prefill ms | prefill | prefill (CPU time) | total KV MB | total KV "
              "| FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in scaling["vision_tokens"]:
        lines.append(f"| {r['images']} | {r['vision_tokens']} | {r['method']} | {fmt(r['prefill_ms'], '.1f')} | "
                     f"{fmt(r['prefill_ratio'])} | {fmt(r.get('prefill_cpu_ratio'))} | "
                     f"{fmt(r['total_kv_bytes'] / 2**20, '.1f')} | "
                     f"{fmt(r['total_kv_ratio'])} | {fmt(r['flops_ratio'])} |")
    lines += ["", "| batch | method | decode tok/s | ratio | ratio (CPU time) | peak extra MB |",
              "|---|---|---|---|---|---|"]
    for r in scaling["batch"]:
        extra = r["peak_mem_extra_bytes"]
        lines.append(f"| {r['batch']} | {r['method']} | {fmt(r['decode_tokens_per_s'], '.1f')} | "
                     f"{fmt(r['decode_ratio'])} | {fmt(r.get('decode_cpu_ratio'))} | "
                     f"{fmt(extra / 2**20 if extra is not None else None, '.0f')} |")
    if scaling.get("budget"):
        lines += ["", "| budget GB | method | weights GB | KV MB / sample | largest batch |", "|---|---|---|---|---|"]
        for r in scaling["budget"]:
            lines.append(f"| {r['budget_gb']:g} | {r['method']} | {r['weights_bytes'] / 2**30:.1f} | "
                         f"{r['kv_bytes_per_sample'] / 2**20:.1f} | {r['max_batch']} |")
    lines.append("")
    return lines
