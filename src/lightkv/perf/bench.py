"""``lightkv bench``: prefill time, KV bytes, FLOPs, decode throughput, peak memory and lightkv's overhead,
every figure also as a ratio to the uncompressed model measured in the same run.

Repetitions are interleaved (none, lightkv, none, lightkv, ...) and summarised by their median. One
repetition of one method is two passes over the same prompt:
  timing pass    prefill (``logits_to_keep=1``, as ``generate`` asks), then ``decode_tokens`` greedy steps on
                 its cache; gives prefill_ms, decode_tokens_per_s, peak memory and the real cache's bytes;
  overhead pass  the same with ``handle.timer`` set; gives the share of the prefill spent in lightkv's hooks
                 (kept apart because the timer synchronises the GPU around every hook).
FLOPs are analytic (``perf.flops``) for the token counts the run reports. ``full_size`` repeats the analytic
numbers at the spec's full depth with the schedule scaled to it, so a run on fewer layers still says what
the real model would save.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine import apply
from ..methods import Method
from .analytic import Workload, kv_bytes_per_token, predict_profile, profile_from_stats
from .memory import PeakMemory, parameter_count
from .methods import make_method, split_methods
from .specs import ModelSpec, get_spec
from .timer import OverheadTimer

__all__ = ["BenchConfig", "run_bench", "write_outputs", "add_arguments", "main", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("model", "method", "prefill_ms", "prefill_ratio", "vision_kv_ratio", "total_kv_ratio", "flops_ratio",
                 "decode_tokens_per_s", "overhead_fraction")


@dataclass
class BenchConfig:
    model: str = "llava-1.5-7b"
    methods: list[str] = field(default_factory=lambda: ["none", "lightkv"])
    layers: int | None = None  # decoder layers to build (None: all); the schedule is scaled to this depth
    dtype: str = "auto"  # auto: bfloat16 (fp32 for the tiny spec)
    device: str = "auto"  # auto: cuda when available
    attn: str = "sdpa"
    repeats: int = 3
    warmup: int = 1
    images: int = 1
    text_before: int = 40
    text_after: int = 20
    batch: int = 1
    decode_tokens: int = 16
    scaling: bool = False
    scaling_images: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    scaling_repeats: int = 1
    scaling_decode_tokens: int = 8
    tile_decode: str = "auto"  # batch scaling: "yes" tiles a batch-1 prefill's cache, "no" prefills the batch
    budgets_gb: list[float] = field(default_factory=lambda: [24.0, 80.0, 141.0])
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, spec: ModelSpec) -> torch.dtype:
    if name == "auto":
        return torch.float32 if spec.name == "tiny" else torch.bfloat16
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)} or auto, got {name!r}")
    return dtypes[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(value: float | None, base: float | None) -> float | None:
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


def _cache_kwarg(model: torch.nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_bytes(cache: Any) -> list[int]:
    """Bytes of keys + values held by each layer of a transformers cache."""
    return [layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers]


def _next_token(logits: torch.Tensor, banned: int) -> torch.Tensor:
    logits = logits[:, -1].float()
    logits[:, banned] = float("-inf")  # an image token id would start a new image prefill
    return logits.argmax(-1, keepdim=True)


def decode(model: torch.nn.Module, cache: Any, first_logits: torch.Tensor, attention_mask: torch.Tensor,
           steps: int, device: torch.device) -> tuple[float, float]:
    """``steps`` greedy decode steps on ``cache``; returns wall seconds (device-synchronised) and process CPU
    seconds."""
    kwarg = _cache_kwarg(model)
    banned = model.config.image_token_id
    token = _next_token(first_logits, banned)
    mask = attention_mask
    ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, logits_to_keep=1, **{kwarg: cache})
        token = _next_token(out.logits, banned)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def sequence_record(handle: Any, cache: Any) -> Any:
    """The engine's record of which prefill positions each shortened layer of ``cache`` holds (or None)."""
    records = getattr(handle, "_records", None) if handle is not None else None
    return records.get(cache) if records is not None else None


def tile_cache(handle: Any, cache: Any, batch: int, record: Any = None) -> Any:
    """A copy of a batch-1 prefill cache repeated ``batch`` times and registered with ``handle`` as a real
    batched prefill of ``batch`` identical prompts would be (that prefill gives the same cache).

    record: the engine's sequence record of ``cache`` (default: looked up in ``handle``); needed when the cache
    came from an earlier handle. Relies on the engine's private ``Handle._records``.
    """
    tiled = copy.deepcopy(cache)
    tiled.batch_repeat_interleave(batch)
    record = record if record is not None else sequence_record(handle, cache)
    if record is not None:
        if handle is None:
            raise ValueError("a compressed cache needs the handle it will be decoded with")
        segments = [tuple(t.repeat(batch, *([1] * (t.dim() - 1))) for t in segment) for segment in record.segments]
        handle._records[tiled] = dataclasses.replace(record, segments=segments)
    elif handle is not None and len({layer.keys.shape[-2] for layer in cache.layers}) > 1:
        raise RuntimeError("lightkv: cannot tile a compressed cache without the engine's sequence record")
    return tiled


# ---------------------------------------------------------------------------------------------------------------
# one measurement


def _prefill(model: torch.nn.Module, inputs: dict, device: torch.device) -> tuple[Any, float, float]:
    """Output, wall seconds and process CPU seconds of one prefill. On a shared CPU machine with one torch
    thread, CPU seconds are the time the prefill computed, whatever other processes took from the core."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    _sync(device)
    return out, time.perf_counter() - start, time.process_time() - cpu_start


def measure(model: torch.nn.Module, method: Method | None, inputs: dict, device: torch.device,
            decode_tokens: int, overhead: bool = True) -> dict:
    """Both passes (timing, then overhead) of one method on one prompt."""
    handle = apply(model, method) if method is not None else None
    try:
        with torch.no_grad():
            peak = PeakMemory(device)
            peak.reset()
            out, prefill_s, prefill_cpu_s = _prefill(model, inputs, device)
            cache = _cache_of(out)
            kv = cache_bytes(cache)
            stats = handle.stats if handle is not None else None
            decode_s, decode_cpu_s = decode(model, cache, out.logits, inputs["attention_mask"], decode_tokens,
                                            device) if decode_tokens else (None, None)
            memory = peak.read()
            del out, cache
            result = {"prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu_s, "decode_s": decode_s,
                      "decode_cpu_s": decode_cpu_s, "kv_bytes": kv, "stats": stats,
                      "peak_bytes": memory["peak"], "peak_extra_bytes": memory["extra"], "peak_exact": memory["exact"],
                      "overhead_s": 0.0, "overhead_prefill_s": prefill_s, "overhead_sections": {},
                      "decode_overhead_s": 0.0, "decode_overhead_total_s": decode_s}
            if handle is not None and overhead:
                timer = OverheadTimer.for_device(device)
                handle.timer = timer
                out, timed_prefill_s, _ = _prefill(model, inputs, device)
                prefill_sections = dict(timer.seconds)
                result.update(overhead_s=timer.total, overhead_prefill_s=timed_prefill_s,
                              overhead_sections=prefill_sections)
                if decode_tokens:
                    timer.reset()
                    timed_decode_s, _ = decode(model, _cache_of(out), out.logits, inputs["attention_mask"],
                                               decode_tokens, device)
                    result.update(decode_overhead_s=timer.total, decode_overhead_total_s=timed_decode_s)
                handle.timer = None
                del out
    finally:
        if handle is not None:
            handle.remove()
    return result


# ---------------------------------------------------------------------------------------------------------------
# the run


def _vision_tokens(inputs: dict, model: torch.nn.Module) -> int:
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def _row(spec: ModelSpec, label: str, method: Method | None, runs: list[dict], config: BenchConfig, depth: int,
         workload: Workload, inputs: dict, model: torch.nn.Module, dtype: torch.dtype) -> dict:
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    t, _ = spec.dims(depth)
    per_token = kv_bytes_per_token(t, dtype_bytes)
    B = workload.batch
    stats = runs[-1]["stats"]
    vision_in = _vision_tokens(inputs, model)
    kv = runs[-1]["kv_bytes"]
    if stats is not None and stats.vision_kv_bytes is not None:
        vision_kv = list(stats.vision_kv_bytes)
    else:
        vision_kv = [per_token * vision_in] * len(kv)
    images = [workload.images] * B
    text_after = [workload.text_after_first_image()] * B
    if stats is not None:
        profile = profile_from_stats(spec, method, stats, images, text_after, depth, dtype_bytes)
    else:  # the uncompressed model: every layer runs the whole prompt
        profile = predict_profile(spec, None, workload, depth, dtype_bytes)
    decode_tps = [B * config.decode_tokens / r["decode_s"] for r in runs if r["decode_s"]]
    decode_cpu_tps = [B * config.decode_tokens / r["decode_cpu_s"] for r in runs if r["decode_cpu_s"]]
    overhead = [r["overhead_s"] / r["overhead_prefill_s"] for r in runs if r["overhead_prefill_s"]]
    decode_overhead = [r["decode_overhead_s"] / r["decode_overhead_total_s"] for r in runs
                       if r.get("decode_overhead_total_s")]
    sections = sorted({k for r in runs for k in r["overhead_sections"]})
    row = {
        "model": spec.name, "method": label, "config": repr(method) if method is not None else "uncompressed",
        "device": str(inputs["input_ids"].device), "dtype": str(dtype).replace("torch.", ""),
        "layers": depth, "full_layers": spec.num_layers, "batch": B, "images": workload.images,
        "vision_tokens": vision_in // B, "prompt_tokens": inputs["input_ids"].shape[1],
        "retained_fraction": stats.mean_retained_fraction if stats is not None else 1.0,
        "tokens_per_layer": profile.tokens[0],
        "prefill_ms": 1000 * _median([r["prefill_s"] for r in runs]),
        "prefill_ms_runs": [1000 * r["prefill_s"] for r in runs],
        "prefill_cpu_ms": 1000 * _median([r["prefill_cpu_s"] for r in runs]),
        "prefill_cpu_ms_runs": [1000 * r["prefill_cpu_s"] for r in runs],
        "vision_kv_bytes": sum(vision_kv), "total_kv_bytes": sum(kv), "kv_bytes_per_layer": kv,
        "vision_kv_bytes_per_layer": vision_kv,
        "flops": profile.flops.total, "flops_matmul": profile.flops.matmul_total,
        "flops_decoder": profile.flops.group("decoder."), "flops_vision": profile.flops.group("vision."),
        "flops_method": profile.flops.group("lightkv."), "flops_extras_modelled": profile.extras_modelled,
        "decode_tokens": config.decode_tokens,
        "decode_tokens_per_s": _median(decode_tps),
        "decode_tokens_per_s_runs": decode_tps,
        "decode_tokens_per_cpu_s": _median(decode_cpu_tps),
        "peak_mem_bytes": _median([r["peak_bytes"] for r in runs]),
        "peak_mem_extra_bytes": _median([r["peak_extra_bytes"] for r in runs]),
        "peak_mem_exact": all(r["peak_exact"] for r in runs),
        "overhead_fraction": _median(overhead) if method is not None else 0.0,
        "overhead_ms": 1000 * _median([r["overhead_s"] for r in runs]) if method is not None else 0.0,
        "overhead_ms_by_hook": {s: 1000 * _median([r["overhead_sections"].get(s, 0.0) for r in runs])
                                for s in sections},
        "decode_overhead_fraction": _median(decode_overhead) if method is not None else 0.0,
    }
    return row


def _full_size(spec: ModelSpec, text: str, workload: Workload, dtype_bytes: int) -> dict | None:
    """Analytic numbers of the method at the spec's full depth (its schedule scaled to it)."""
    _, method = make_method(text, spec, spec.num_layers)
    profile = predict_profile(spec, method, workload, dtype_bytes=dtype_bytes)
    if profile is None:
        return None
    out = {"schedule": repr(method) if method is not None else "uncompressed",
           "retained_fraction": profile.retained_fraction, "vision_kv_bytes": sum(profile.vision_kv_bytes),
           "total_kv_bytes": sum(profile.kv_bytes), "flops": profile.flops.total,
           "flops_decoder": profile.flops.group("decoder."), "flops_vision": profile.flops.group("vision."),
           "flops_method": profile.flops.group("lightkv."), "extras_modelled": profile.extras_modelled}
    return out


def _add_ratios(rows: list[dict], base_key: str = "method") -> None:
    base = next(r for r in rows if r[base_key] == "none")
    for r in rows:
        r["prefill_ratio"] = _ratio(r["prefill_ms"], base["prefill_ms"])
        r["prefill_cpu_ratio"] = _ratio(r["prefill_cpu_ms"], base["prefill_cpu_ms"])
        r["vision_kv_ratio"] = _ratio(r["vision_kv_bytes"], base["vision_kv_bytes"])
        r["total_kv_ratio"] = _ratio(r["total_kv_bytes"], base["total_kv_bytes"])
        r["flops_ratio"] = _ratio(r["flops"], base["flops"])
        r["flops_decoder_ratio"] = _ratio(r["flops_decoder"], base["flops_decoder"])
        r["decode_ratio"] = _ratio(r["decode_tokens_per_s"], base["decode_tokens_per_s"])
        r["decode_cpu_ratio"] = _ratio(r["decode_tokens_per_cpu_s"], base["decode_tokens_per_cpu_s"])
        r["peak_mem_ratio"] = _ratio(r["peak_mem_bytes"], base["peak_mem_bytes"])
        r["peak_mem_extra_ratio"] = _ratio(r["peak_mem_extra_bytes"], base["peak_mem_extra_bytes"])
        full, full_base = r.get("full_size"), base.get("full_size")
        if full and full_base:
            full["vision_kv_ratio"] = _ratio(full["vision_kv_bytes"], full_base["vision_kv_bytes"])
            full["total_kv_ratio"] = _ratio(full["total_kv_bytes"], full_base["total_kv_bytes"])
            full["flops_ratio"] = _ratio(full["flops"], full_base["flops"])
            full["flops_decoder_ratio"] = _ratio(full["flops_decoder"], full_base["flops_decoder"])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; returns the bench.json dict (``rows``, ``meta``, and ``scaling`` when asked)."""
    spec = get_spec(config.model)
    device = _device(config.device)
    dtype = _dtype(config.dtype, spec)
    depth = config.layers or spec.num_layers
    texts = split_methods(",".join(config.methods)) if isinstance(config.methods, list) else \
        split_methods(config.methods)
    if not any(t.split(":")[0].strip().lower() == "none" for t in texts):
        texts = ["none", *texts]  # every ratio is to the uncompressed model measured in the same run
    methods = [make_method(t, spec, depth) for t in texts]
    workload = Workload(images=config.images, text_before=config.text_before, text_after=config.text_after,
                        batch=config.batch)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, spec, device, dtype, depth, texts, methods, workload, started)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype, depth: int,
         texts: list[str], methods: list, workload: Workload, started: float) -> dict:
    started_at = datetime.datetime.now(datetime.timezone.utc)
    _log(f"lightkv bench: building {spec.name} with {depth} of {spec.num_layers} decoder layers "
         f"({str(dtype).replace('torch.', '')}, {device}, random weights)")
    model = spec.build(num_layers=depth, dtype=dtype, device=device, attn_implementation=config.attn,
                       seed=config.seed)
    inputs = make_inputs(model, workload, device, dtype, config.seed)
    runs: dict[str, list[dict]] = {label: [] for label, _ in methods}
    for rep in range(config.warmup + config.repeats):
        for label, method in methods:
            result = measure(model, method, inputs, device, config.decode_tokens)
            if rep >= config.warmup:
                runs[label].append(result)
        _log(f"  repetition {rep + 1}/{config.warmup + config.repeats}"
             + (" (warm-up)" if rep < config.warmup else "")
             + "".join(f"  {label}: {1000 * runs[label][-1]['prefill_s']:.0f} ms" for label, _ in methods
                       if rep >= config.warmup))
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for text, (label, method) in zip(texts, methods):
        row = _row(spec, label, method, runs[label], config, depth, workload, inputs, model, dtype)
        row["full_size"] = _full_size(spec, text, workload, dtype_bytes)
        rows.append(row)
    _add_ratios(rows)
    notes = []
    if depth != spec.num_layers:
        notes.append(f"timing model: real widths, {depth} of {spec.num_layers} decoder layers; schedules scaled "
                     f"to that depth (specs.scale_layers); 'full_size' gives the analytic numbers at "
                     f"{spec.num_layers} layers")
    notes.append("random weights: merges and generated tokens are not meaningful, costs are")
    result = {"meta": _meta(config, spec, depth, dtype, device, texts, notes, started_at), "rows": rows}
    if config.scaling:
        from .scaling import run_scaling

        result["scaling"] = run_scaling(model, spec, methods, texts, config, depth, device, dtype)
    result["meta"]["wall_s"] = time.perf_counter() - started
    return result


def _meta(config: BenchConfig, spec: ModelSpec, depth: int, dtype: torch.dtype, device: torch.device,
          texts: list[str], notes: list[str], started_at: datetime.datetime) -> dict:
    import transformers

    info = {"command": "lightkv " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None,
            "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "config": dataclasses.asdict(config), "spec": spec.name, "description": spec.description,
            "layers": depth, "full_layers": spec.num_layers, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "methods": texts, "notes": notes,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    t, v = spec.dims()
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    info["full_size_weights_bytes"] = parameter_count(t, v) * dtype_bytes
    return info


# ---------------------------------------------------------------------------------------------------------------
# outputs


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    return format(value, spec)


def markdown(result: dict) -> str:
    """The markdown report of a bench.json dict."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"# lightkv bench: {meta['spec']}", "",
             f"{meta['description']}. Measured on {meta['device']} ({meta.get('gpu', meta['machine'])}), "
             f"{meta['dtype']}, {meta['layers']} of {meta['full_layers']} decoder layers, batch "
             f"{rows[0]['batch']}, {rows[0]['images']} image(s) = {rows[0]['vision_tokens']} vision tokens, "
             f"prompt {rows[0]['prompt_tokens']} tokens, {meta['config']['repeats']} interleaved repetitions "
             f"(medians). Ratios are to `none` in the same run.", ""]
    for note in meta["notes"]:
        lines.append(f"- {note}")
    lines += ["", "| method | retained | vision KV | total KV | FLOPs | prefill ms | prefill | prefill (CPU time) "
              "| decode tok/s | decode | peak extra MB | overhead |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['retained_fraction'])} | {_fmt(r['vision_kv_ratio'])} | "
            f"{_fmt(r['total_kv_ratio'])} | {_fmt(r['flops_ratio'])}{'' if r['flops_extras_modelled'] else '*'} | "
            f"{_fmt(r['prefill_ms'], '.1f')} | {_fmt(r['prefill_ratio'])} | {_fmt(r.get('prefill_cpu_ratio'))} | "
            f"{_fmt(r['decode_tokens_per_s'], '.1f')} | {_fmt(r['decode_ratio'])} | "
            f"{_fmt(r['peak_mem_extra_bytes'] / 2**20 if r['peak_mem_extra_bytes'] is not None else None, '.0f')} | "
            f"{_fmt(100 * r['overhead_fraction'] if r['overhead_fraction'] is not None else None, '.2f')}% |")
    lines += ["", "Columns: retained = average retained vision fraction over layers; vision KV / total KV / FLOPs / "
              "prefill / decode = ratio to `none` (FLOPs*: the method's own scoring is not in the FLOPs model); "
              "prefill (CPU time) = the same ratio of process CPU time (robust to "
              "other processes on a shared CPU, meaningless on GPU); overhead = share of the prefill spent in "
              "lightkv's hooks.", ""]
    full = [r for r in rows if r.get("full_size")]
    if full:
        lines += [f"Analytic at full size ({meta['full_layers']} layers, same prompt, no weights needed):", "",
                  "| method | schedule | retained | vision KV | total KV | FLOPs | decoder FLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for r in full:
            f = r["full_size"]
            lines.append(f"| {r['method']} | `{f['schedule']}` | {_fmt(f['retained_fraction'])} | "
                         f"{_fmt(f.get('vision_kv_ratio'))} | {_fmt(f.get('total_kv_ratio'))} | "
                         f"{_fmt(f.get('flops_ratio'))} | {_fmt(f.get('flops_decoder_ratio'))} |")
        lines.append("")
    if "scaling" in result:
        from .scaling import scaling_markdown

        lines += scaling_markdown(result["scaling"])
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """bench.json, bench.md and (with matplotlib and a scaling section) PNG plots in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    written[0].write_text(json.dumps(result, indent=1, default=str))
    written[1].write_text(markdown(result))
    if plots and "scaling" in result:
        try:
            from .plots import plot_scaling
        except ImportError as err:  # matplotlib missing: pip install lightkv[bench]
            _log(f"lightkv bench: no plots ({err})")
        else:
            written += plot_scaling(result, out)
    return written


# ---------------------------------------------------------------------------------------------------------------
# command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: Any) -> None:
    d = BenchConfig()
    parser.add_argument("--model", default=d.model,
                        help="llava-1.5-7b, llava-1.5-13b, tiny, trained[:PATH] (qwen2.5-vl-7b: analytic only)")
    parser.add_argument("--methods", default="none,lightkv",
                        help="comma-separated: none, lightkv, any lightkv.methods class; options as NAME:FIELD=VALUE")
    parser.add_argument("--out", default=None, help="folder for bench.json, bench.md and plots")
    parser.add_argument("--layers", type=int, default=None,
                        help="build only this many decoder layers (real widths); schedules are scaled to it")
    parser.add_argument("--dtype", default=d.dtype, help="auto (bfloat16), bfloat16, float32, float16")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--attn", default=d.attn, choices=("sdpa", "eager"))
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--images", type=int, default=d.images, help="images per prompt (576 tokens each)")
    parser.add_argument("--text-before", type=int, default=d.text_before)
    parser.add_argument("--text-after", type=int, default=d.text_after)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    parser.add_argument("--scaling", action="store_true",
                        help="also sweep images per prompt and decode batch size, and compute batch-per-budget")
    parser.add_argument("--scaling-images", type=_ints, default=d.scaling_images)
    parser.add_argument("--batch-sizes", type=_ints, default=d.batch_sizes)
    parser.add_argument("--scaling-repeats", type=int, default=d.scaling_repeats)
    parser.add_argument("--scaling-decode-tokens", type=int, default=d.scaling_decode_tokens)
    parser.add_argument("--tile-decode", default=d.tile_decode, choices=("auto", "yes", "no"),
                        help="batch sweep: tile a batch-1 prefill's cache (auto: on CPU) instead of prefilling "
                             "the whole batch")
    parser.add_argument("--budgets-gb", type=_floats, default=d.budgets_gb)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def config_from_args(args: Any) -> BenchConfig:
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["methods"] = split_methods(args.methods)
    return BenchConfig(**values)


def main(args: Any) -> int:
    config = config_from_args(args)
    result = run_bench(config)
    print(markdown(result))
    if args.out:
        for path in write_outputs(result, args.out):
            _log(f"wrote {path}")
    return 0
