"""The full-size GPU measurement suite behind ``scripts/gpu_bench.sh`` (LLaVA-1.5-7B and -13B, bf16, random
weights, one GPU, about 8 minutes on an H200), and the issue's targets checked against a bench result.

    python -m lightkv.perf.suite --out out/gpu-bench           # on the GPU machine
    python -m lightkv.perf.suite --out /tmp/check --tiny       # same steps on tiny configs, CPU, seconds

Writes one folder per model (bench.json, bench.md, plots), analytic.md (every spec, including Qwen2.5-VL-7B,
from configs alone) and SUMMARY.md (the targets, measured and analytic). Parts that would overrun
``--deadline-s`` are skipped and listed in SUMMARY.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from ..methods import LightKV
from .analytic import Workload, predict_profile
from .bench import BenchConfig, run_bench, write_outputs
from .specs import SPECS

__all__ = ["targets", "targets_markdown", "analytic_markdown", "main"]


def targets(result: dict, method: str = "lightkv") -> list[dict]:
    """The issue's targets for ``method`` in a bench result: what was measured and whether it holds."""
    rows = {r["method"]: r for r in result["rows"]}
    r = rows[method]
    full = r.get("full_size") or {}
    out = []

    def add(name: str, value, holds, source: str) -> None:
        out.append({"target": name, "value": value, "holds": holds, "source": source})

    add("vision KV <= 0.50 of uncompressed", r["vision_kv_ratio"], r["vision_kv_ratio"] <= 0.50,
        "measured (real cache)")
    if full.get("vision_kv_ratio") is not None:
        add("vision KV <= 0.50 of uncompressed (full size)", full["vision_kv_ratio"], full["vision_kv_ratio"] <= 0.50,
            "analytic")
    add("prefill FLOPs >= 35% lower", r["flops_ratio"], r["flops_ratio"] <= 0.65, "analytic, measured counts")
    if full.get("flops_ratio") is not None:
        add("prefill FLOPs >= 35% lower (full size)", full["flops_ratio"], full["flops_ratio"] <= 0.65, "analytic")
    gap = r["prefill_ratio"] - r["flops_ratio"]
    add("prefill time ratio close to FLOPs ratio (within 0.05)", r["prefill_ratio"], abs(gap) <= 0.05,
        f"measured (FLOPs ratio {r['flops_ratio']:.3f})")
    add("lightkv overhead <= 3% of prefill", r["overhead_fraction"], r["overhead_fraction"] <= 0.03, "measured")
    batch = [b for b in result.get("scaling", {}).get("batch", []) if b["method"] == method]
    if batch:
        largest = max(batch, key=lambda b: b["batch"])
        add(f"decode throughput at batch {largest['batch']} higher than uncompressed", largest["decode_ratio"],
            largest["decode_ratio"] > 1.0, "measured")
    return out


def targets_markdown(result: dict, method: str = "lightkv") -> list[str]:
    meta = result["meta"]
    lines = [f"### {meta['spec']} ({meta['layers']} of {meta['full_layers']} layers, {meta['dtype']}, "
             f"{meta['config']['attn']} attention, {meta.get('gpu', meta['device'])})", "",
             "| target | value | holds | source |", "|---|---|---|---|"]
    for t in targets(result, method):
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['target']} | {value} | {'yes' if t['holds'] else 'no'} | {t['source']} |")
    return lines + [""]


def analytic_markdown(workloads: list[Workload] | None = None) -> str:
    """Reference-schedule savings of every real-size spec, from configs alone (bf16 KV)."""
    workloads = workloads or [Workload(images=1), Workload(images=5)]
    lines = ["# Analytic prefill FLOPs and KV bytes at full size (no weights)", "",
             "Reference schedules (METHOD.md; LLaVA-1.5-13B: the 7B schedule scaled to 40 layers), prompt = 40 text "
             "tokens + images + 20 text tokens, bf16 cache. Qwen2.5-VL-7B: analytic only (no lightkv adapter yet); "
             "its 672x672 reference image gives 576 tokens.", "",
             "| model | schedule | images | vision tokens | retained | vision KV | total KV | FLOPs | decoder FLOPs "
             "| uncompressed TFLOPs | uncompressed KV MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, spec in SPECS.items():
        if name == "tiny":
            continue
        method = LightKV(**spec.reference_schedule())
        for w in workloads:
            base, ours = predict_profile(spec, None, w), predict_profile(spec, method, w)
            lines.append(
                f"| {name} | {list(method.layers)}/{list(method.windows)}/{list(method.ratios)} | {w.images} | "
                f"{base.vision_tokens[0][0]} | {ours.retained_fraction:.3f} | "
                f"{sum(ours.vision_kv_bytes) / sum(base.vision_kv_bytes):.3f} | "
                f"{sum(ours.kv_bytes) / sum(base.kv_bytes):.3f} | {ours.flops.total / base.flops.total:.3f} | "
                f"{ours.flops.group('decoder.') / base.flops.group('decoder.'):.3f} | {base.flops.total / 1e12:.2f} | "
                f"{sum(base.kv_bytes) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def _plan(tiny: bool) -> list[tuple[str, BenchConfig]]:
    if tiny:
        small = dict(repeats=2, warmup=1, decode_tokens=4, scaling=True, scaling_images=[1, 2, 3],
                     batch_sizes=[1, 4], scaling_decode_tokens=2, tile_decode="no", budgets_gb=[1.0],
                     device="cpu", text_before=8, text_after=6)
        return [("tiny-a", BenchConfig(model="tiny", **small)),
                ("tiny-b", BenchConfig(model="tiny", attn="eager", **small))]
    full = dict(repeats=5, warmup=2, decode_tokens=32, scaling=True, scaling_images=[1, 2, 3, 4, 5],
                batch_sizes=[1, 2, 4, 8, 16, 32], scaling_repeats=3, scaling_decode_tokens=32, tile_decode="no",
                budgets_gb=[24.0, 80.0, 141.0], dtype="bfloat16", device="cuda")
    return [("llava-1.5-7b", BenchConfig(model="llava-1.5-7b", **full)),
            ("llava-1.5-13b", BenchConfig(model="llava-1.5-13b", **full))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv.perf.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu-bench")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU: checks the script in seconds")
    parser.add_argument("--deadline-s", type=float, default=450.0,
                        help="skip the remaining models once this much time has passed")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analytic.md").write_text(analytic_markdown())
    summary = ["# LightKV GPU suite", "", f"torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"), ""]
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    skipped = []
    for name, config in _plan(args.tiny):
        elapsed = time.perf_counter() - started
        if elapsed > args.deadline_s:
            skipped.append(f"{name} (deadline: {elapsed:.0f} s elapsed)")
            continue
        print(f"[{elapsed:.0f} s] {name}", file=sys.stderr, flush=True)
        try:
            result = run_bench(config)
        except torch.cuda.OutOfMemoryError as err:  # keep what the other models measured
            skipped.append(f"{name} (out of memory: {err})")
            continue
        write_outputs(result, out / name)
        summary += targets_markdown(result)
        del result
        gc.collect()  # the model of this run goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if skipped:
        summary += ["Skipped: " + "; ".join(skipped), ""]
    summary.append(f"Total wall time {time.perf_counter() - started:.0f} s. Analytic numbers for every spec: "
                   "analytic.md.")
    (out / "SUMMARY.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
