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

import dataclasses
import datetime
import json
import platform
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
from ..methods.spec import parse_method_spec, split_method_list
from .methods import make_method
from .runs import cache_bytes, cache_of, decode, fmt, log, make_inputs, median, prefill, ratio
from .scaling import run_scaling, scaling_markdown
from .specs import ModelSpec, get_spec
from .syncs import count_syncs
from .timer import OverheadTimer

__all__ = ["BenchConfig", "run_bench", "write_outputs", "markdown", "config_from_args", "main", "REQUIRED_KEYS"]

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
    syncs: bool = True  # count each method's extra device -> host syncs (perf.syncs): 2 more prefills per method
    sync_decode_steps: int = 2


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


# ---------------------------------------------------------------------------------------------------------------
# one measurement


def measure(model: torch.nn.Module, method: Method | None, inputs: dict, device: torch.device,
            decode_tokens: int, overhead: bool = True) -> dict:
    """Both passes (timing, then overhead) of one method on one prompt."""
    handle = apply(model, method) if method is not None else None
    try:
        with torch.no_grad():
            peak = PeakMemory(device)
            peak.reset()
            split: dict = {}
            out, prefill_s, prefill_cpu_s = prefill(model, inputs, device, split)
            cache = cache_of(out)
            kv = cache_bytes(cache)
            stats = handle.stats if handle is not None else None
            decode_s, decode_cpu_s = decode(model, cache, out.logits, inputs["attention_mask"], decode_tokens,
                                            device) if decode_tokens else (None, None)
            memory = peak.read()
            del out, cache
            result = {"prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu_s, "decode_s": decode_s,
                      "prefill_decoder_s": split.get("decoder_s"), "prefill_outside_s": split.get("outside_s"),
                      "decode_cpu_s": decode_cpu_s, "kv_bytes": kv, "stats": stats,
                      "peak_bytes": memory["peak"], "peak_extra_bytes": memory["extra"], "peak_exact": memory["exact"],
                      "overhead_s": 0.0, "overhead_prefill_s": prefill_s, "overhead_sections": {},
                      "decode_overhead_s": 0.0, "decode_overhead_total_s": decode_s}
            if handle is not None and overhead:
                timer = OverheadTimer.for_device(device)
                handle.timer = timer
                out, timed_prefill_s, _ = prefill(model, inputs, device)
                prefill_sections = dict(timer.seconds)
                result.update(overhead_s=timer.total, overhead_prefill_s=timed_prefill_s,
                              overhead_sections=prefill_sections)
                if decode_tokens:
                    timer.reset()
                    timed_decode_s, _ = decode(model, cache_of(out), out.logits, inputs["attention_mask"],
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
        "prefill_ms": 1000 * median([r["prefill_s"] for r in runs]),
        "prefill_ms_runs": [1000 * r["prefill_s"] for r in runs],
        "prefill_cpu_ms": 1000 * median([r["prefill_cpu_s"] for r in runs]),
        "prefill_decoder_ms": _ms(median([r.get("prefill_decoder_s") for r in runs])),
        "prefill_outside_ms": _ms(median([r.get("prefill_outside_s") for r in runs])),
        "prefill_cpu_ms_runs": [1000 * r["prefill_cpu_s"] for r in runs],
        "vision_kv_bytes": sum(vision_kv), "total_kv_bytes": sum(kv), "kv_bytes_per_layer": kv,
        "vision_kv_bytes_per_layer": vision_kv,
        "flops": profile.flops.total, "flops_matmul": profile.flops.matmul_total,
        "flops_decoder": profile.flops.group("decoder."), "flops_vision": profile.flops.group("vision."),
        "flops_method": profile.flops.group("lightkv."), "flops_extras_modelled": profile.extras_modelled,
        # FLOPs inside the timed decoder span: the layers and the method's stages (not the LM head)
        "flops_layers": sum(profile.flops.per_layer) + profile.flops.group("lightkv."),
        "decode_tokens": config.decode_tokens,
        "decode_tokens_per_s": median(decode_tps),
        "decode_tokens_per_s_runs": decode_tps,
        "decode_tokens_per_cpu_s": median(decode_cpu_tps),
        "peak_mem_bytes": median([r["peak_bytes"] for r in runs]),
        "peak_mem_extra_bytes": median([r["peak_extra_bytes"] for r in runs]),
        "peak_mem_exact": all(r["peak_exact"] for r in runs),
        "overhead_fraction": median(overhead) if method is not None else 0.0,
        "overhead_ms": 1000 * median([r["overhead_s"] for r in runs]) if method is not None else 0.0,
        "overhead_ms_by_hook": {s: 1000 * median([r["overhead_sections"].get(s, 0.0) for r in runs])
                                for s in sections},
        "decode_overhead_fraction": median(decode_overhead) if method is not None else 0.0,
    }
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


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
        r["prefill_ratio"] = ratio(r["prefill_ms"], base["prefill_ms"])
        r["prefill_cpu_ratio"] = ratio(r["prefill_cpu_ms"], base["prefill_cpu_ms"])
        r["vision_kv_ratio"] = ratio(r["vision_kv_bytes"], base["vision_kv_bytes"])
        r["total_kv_ratio"] = ratio(r["total_kv_bytes"], base["total_kv_bytes"])
        r["flops_ratio"] = ratio(r["flops"], base["flops"])
        r["flops_decoder_ratio"] = ratio(r["flops_decoder"], base["flops_decoder"])
        r["flops_layers_ratio"] = ratio(r["flops_layers"], base["flops_layers"])
        r["prefill_decoder_ratio"] = ratio(r.get("prefill_decoder_ms"), base.get("prefill_decoder_ms"))
        r["prefill_flops_expected_ratio"] = _expected_ratio(r, base)
        r["decode_ratio"] = ratio(r["decode_tokens_per_s"], base["decode_tokens_per_s"])
        r["decode_cpu_ratio"] = ratio(r["decode_tokens_per_cpu_s"], base["decode_tokens_per_cpu_s"])
        r["peak_mem_ratio"] = ratio(r["peak_mem_bytes"], base["peak_mem_bytes"])
        r["peak_mem_extra_ratio"] = ratio(r["peak_mem_extra_bytes"], base["peak_mem_extra_bytes"])
        full, full_base = r.get("full_size"), base.get("full_size")
        if full and full_base:
            full["vision_kv_ratio"] = ratio(full["vision_kv_bytes"], full_base["vision_kv_bytes"])
            full["total_kv_ratio"] = ratio(full["total_kv_bytes"], full_base["total_kv_bytes"])
            full["flops_ratio"] = ratio(full["flops"], full_base["flops"])
            full["flops_decoder_ratio"] = ratio(full["flops_decoder"], full_base["flops_decoder"])


def _expected_ratio(row: dict, base: dict) -> float | None:
    """The prefill time ratio to expect if each part's time followed its own FLOPs: the uncompressed run's
    measured split (decoder span vs the rest), each part scaled by its FLOPs ratio. It differs from the plain
    FLOPs ratio when the parts run at different FLOP rates."""
    decoder, outside = base.get("prefill_decoder_ms"), base.get("prefill_outside_ms")
    if decoder is None or outside is None or decoder + outside <= 0 or not base["flops_layers"]:
        return None
    total = decoder + outside  # the split's own total (medians of the parts need not add up to the median)
    outside_flops = ratio(row["flops"] - row["flops_layers"], base["flops"] - base["flops_layers"])
    if outside_flops is None:
        return None
    return (decoder * row["flops_layers"] / base["flops_layers"] + outside * outside_flops) / total


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; returns the bench.json dict (``rows``, ``meta``, and ``scaling`` when asked)."""
    spec = get_spec(config.model)
    device = _device(config.device)
    dtype = _dtype(config.dtype, spec)
    depth = config.layers or spec.num_layers
    texts = split_method_list(",".join(config.methods) if isinstance(config.methods, list) else config.methods)
    if not any(parse_method_spec(t).name == "none" for t in texts):
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
    log(f"lightkv bench: building {spec.name} with {depth} of {spec.num_layers} decoder layers "
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
        log(f"  repetition {rep + 1}/{config.warmup + config.repeats}"
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
    if config.syncs:
        for row, (label, method) in zip(rows, methods):
            row["syncs"] = None if method is None else _sync_counts(model, method, inputs, device,
                                                                    config.sync_decode_steps)
    notes = []
    if depth != spec.num_layers:
        notes.append(f"timing model: real widths, {depth} of {spec.num_layers} decoder layers; schedules scaled "
                     f"to that depth (specs.scale_layers); 'full_size' gives the analytic numbers at "
                     f"{spec.num_layers} layers")
    notes.append("random weights: merges and generated tokens are not meaningful, costs are")
    result = {"meta": _meta(config, spec, depth, dtype, device, texts, notes, started_at), "rows": rows}
    if config.scaling:
        result["scaling"] = run_scaling(model, spec, methods, texts, config, depth, device, dtype)
    result["meta"]["wall_s"] = time.perf_counter() - started
    return result


def _sync_counts(model: torch.nn.Module, method: Method, inputs: dict, device: torch.device, steps: int) -> dict:
    """Extra device -> host syncs of ``method`` (patched minus unpatched, ``perf.syncs``): per prefill region
    and per decode step of one prefill and ``steps`` greedy decode steps, as the timing pass runs them."""
    def run(m: torch.nn.Module) -> None:
        out, _, _ = prefill(m, inputs, device)
        if steps:
            decode(m, cache_of(out), out.logits, inputs["attention_mask"], steps, device)

    report = count_syncs(model, method, inputs, run=run)
    log(f"  syncs {method.__class__.__name__}: prefill {report.prefill_total:+d} {report.prefill}, "
        f"decode steps {report.decode}")
    return {"prefill": report.prefill, "prefill_total": report.prefill_total, "per_stage": report.per_stage,
            "decode": report.decode, "prefill_ops": report.prefill_ops, "decode_ops": report.decode_ops}


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
            f"| {r['method']} | {fmt(r['retained_fraction'])} | {fmt(r['vision_kv_ratio'])} | "
            f"{fmt(r['total_kv_ratio'])} | {fmt(r['flops_ratio'])}{'' if r['flops_extras_modelled'] else '*'} | "
            f"{fmt(r['prefill_ms'], '.1f')} | {fmt(r['prefill_ratio'])} | {fmt(r.get('prefill_cpu_ratio'))} | "
            f"{fmt(r['decode_tokens_per_s'], '.1f')} | {fmt(r['decode_ratio'])} | "
            f"{fmt(r['peak_mem_extra_bytes'] / 2**20 if r['peak_mem_extra_bytes'] is not None else None, '.0f')} | "
            f"{fmt(100 * r['overhead_fraction'] if r['overhead_fraction'] is not None else None, '.2f')}% |")
    lines += ["", "Columns: retained = average retained vision fraction over layers; vision KV / total KV / FLOPs / "
              "prefill / decode = ratio to `none` (FLOPs*: the method's own scoring is not in the FLOPs model); "
              "prefill (CPU time) = the same ratio of process CPU time (robust to "
              "other processes on a shared CPU, meaningless on GPU); overhead = share of the prefill spent in "
              "lightkv's hooks.", ""]
    split = [r for r in rows if r.get("prefill_decoder_ms") is not None]
    if split:
        lines += ["Where the prefill time goes (the same timed runs, medians): decoder = from the first decoder "
                  "layer's start to the last one's end, lightkv's stages included; outside = the rest (vision "
                  "tower, projector, embeddings, LM head). 'at measured shares' = the time ratio to expect if "
                  "the decoder and the rest each took time in proportion to their own FLOPs, weighted by how the "
                  "uncompressed run's time splits between them.", "",
                  "| method | decoder ms | outside ms | decoder time | decoder FLOPs | prefill time | FLOPs | "
                  "FLOPs at measured shares |", "|---" * 8 + "|"]
        for r in split:
            lines.append(f"| {r['method']} | {fmt(r['prefill_decoder_ms'], '.1f')} | "
                         f"{fmt(r['prefill_outside_ms'], '.1f')} | {fmt(r.get('prefill_decoder_ratio'))} | "
                         f"{fmt(r.get('flops_layers_ratio'))} | {fmt(r['prefill_ratio'])} | "
                         f"{fmt(r['flops_ratio'])} | {fmt(r.get('prefill_flops_expected_ratio'))} |")
        lines.append("")
    counted = [r for r in rows if r.get("syncs")]
    if counted:
        lines += ["Extra device -> host syncs (ops that make the host wait for a GPU, counted on any device; the "
                  "method's run minus the uncompressed run on the same inputs, `lightkv.perf.syncs`):", "",
                  "| method | prefill | before decoder | per stage | after | decode steps | prefill ops |",
                  "|---|---|---|---|---|---|---|"]
        for r in counted:
            c = r["syncs"]
            ops = ", ".join(f"{k} {v:+d}" for k, v in c["prefill_ops"].items()) or "-"
            lines.append(f"| {r['method']} | {c['prefill_total']:+d} | {c['prefill']['before']:+d} | "
                         f"{', '.join(f'{v:+d}' for v in c['per_stage'])} | {c['prefill']['after']:+d} | "
                         f"{', '.join(f'{v:+d}' for v in c['decode'])} | {ops} |")
        lines.append("")
    full = [r for r in rows if r.get("full_size")]
    if full:
        lines += [f"Analytic at full size ({meta['full_layers']} layers, same prompt, no weights needed):", "",
                  "| method | schedule | retained | vision KV | total KV | FLOPs | decoder FLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for r in full:
            f = r["full_size"]
            lines.append(f"| {r['method']} | `{f['schedule']}` | {fmt(f['retained_fraction'])} | "
                         f"{fmt(f.get('vision_kv_ratio'))} | {fmt(f.get('total_kv_ratio'))} | "
                         f"{fmt(f.get('flops_ratio'))} | {fmt(f.get('flops_decoder_ratio'))} |")
        lines.append("")
    if "scaling" in result:
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
            log(f"lightkv bench: no plots ({err})")
        else:
            written += plot_scaling(result, out)
    return written


# ---------------------------------------------------------------------------------------------------------------
# command line


def config_from_args(args: Any) -> BenchConfig:
    """The BenchConfig of parsed ``lightkv bench`` arguments (``lightkv.cli`` defines them); ``methods`` is a
    list of specs or one comma-separated string."""
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if isinstance(values.get("methods"), str):
        values["methods"] = split_method_list(values["methods"])
    return BenchConfig(**values)


def main(args: Any) -> int:
    """``lightkv bench`` with arguments parsed by ``lightkv.cli``: run, print the report, write ``args.out``."""
    config = config_from_args(args)
    result = run_bench(config)
    print(markdown(result))
    if args.out:
        for path in write_outputs(result, args.out):
            log(f"wrote {path}")
    return 0
